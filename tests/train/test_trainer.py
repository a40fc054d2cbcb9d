"""The trainer on a tiny random BERT (CPU): exact cached gradient, learning, exact resume,
sentence-transformers reload, run-directory safety."""

from __future__ import annotations

import copy

import pytest
import torch
from train_helpers import (
    assert_cached_step_is_exact,
    config_for,
    copy_checkpoint,
    load_weights,
    make_tiny_model,
    read_log,
    reset_accelerate_state,
    text_groups,
    tiny_config,
    write_beir,
    write_examples,
)

from retriever.loss import InfoNCELoss
from retriever.model import Encoder
from retriever.train.cli import add_arguments, run
from retriever.train.data import batch_of_texts
from retriever.train.resume import plan_run_directory
from retriever.train.run_directory import RunDirectory, RunError, write_manifest
from retriever.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.mark.parametrize(
    "dropout, embed_chunk, grad_chunk",
    [(0.1, 4, None), (0.0, 8, 3)],  # RNG replay with dropout; larger no-grad chunks without
)
def test_cached_step_equals_the_direct_full_batch_gradient(
    tmp_path, dropout, embed_chunk, grad_chunk
):
    encoder = Encoder.from_pretrained(
        make_tiny_model(tmp_path / "model", dropout=dropout),
        query_max_length=16,
        document_max_length=24,
    )
    encoder.train()  # dropout on: only RNG replay makes the two passes agree
    # Candidate ids must reach the loss for the values to match (see text_groups).
    batch = batch_of_texts(encoder, text_groups(11), chunk_size=embed_chunk)
    loss_fn = InfoNCELoss(scale=20.0, learnable_scale=True)
    assert_cached_step_is_exact(encoder, batch, loss_fn, grad_chunk, dropout=bool(dropout))


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def trained(request, tmp_path_factory):
    """Run A: 6 steps with a checkpoint every 3 and evaluation on a small task, with fp32
    weights or with bf16 weights and fp32 master weights."""
    root = tmp_path_factory.mktemp(f"trainer-{request.param}")
    model = make_tiny_model(root / "model", dropout=0.1)
    data = write_examples(root / "train.jsonl", n=96, negatives=3)
    task = write_beir(root / "task", data, n=24)
    config = tiny_config(
        model,
        data,
        root / "run_a",
        model={"query_prefix": "query: ", "dtype": request.param},
        training={"save_steps": 3, "save_total_limit": None},
        eval={"data": task, "steps": 3, "batch_size": 16},
    )
    trainer = Trainer(config)
    summary = trainer.train()
    encoder = trainer.accelerator.unwrap_model(trainer.model)
    reset_accelerate_state()
    return {"root": root, "config": config, "summary": summary, "encoder": encoder}


def test_loss_decreases_and_run_directory_is_complete(trained):
    run_dir = trained["root"] / "run_a"
    assert all(t.dtype == torch.float32 for t in load_weights(run_dir / "final").values())
    losses = [r["loss"] for r in read_log(run_dir)]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    assert [r["step"] for r in read_log(run_dir, "eval.jsonl")] == [0, 3, 6]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "final" / "modules.json").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-00000003",
        "step-00000006",
    ]
    best = trained["summary"]["best_step"]
    assert (run_dir / "best" / "eval.json").is_file() and best in (0, 3, 6)
    card = (run_dir / "best" / "README.md").read_text()  # best/ describes itself too
    assert f"for {best} steps" in card and f"at step {best}:" in card


def test_resume_continues_exactly(trained):
    """Train 6 steps == train 3, then resume for 3 more: identical parameters and losses."""
    root = trained["root"]
    run_b = root / "run_b"
    copy_checkpoint(root / "run_a", run_b, 3)
    config = config_for(trained["config"], run_b)
    config.eval.data = None
    Trainer(config, resume=True).train()

    want, got = load_weights(root / "run_a" / "final"), load_weights(run_b / "final")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    assert [r["loss"] for r in read_log(run_b)] == [r["loss"] for r in read_log(root / "run_a")][3:]


def test_saved_model_reloads_in_sentence_transformers(trained):
    from sentence_transformers import SentenceTransformer

    encoder = trained["encoder"]
    model = SentenceTransformer(str(trained["root"] / "run_a" / "final"), device="cpu")
    texts = ["cell protein gene", "a much longer text about the liver and kidney " * 3, "dose"]
    for side, st_encode in (("query", model.encode_query), ("document", model.encode_document)):
        want = encoder.encode(texts, side, show_progress=False)
        got = st_encode(texts, convert_to_numpy=True)
        assert abs(got - want).max() < 1e-5, side
    # the query prefix travelled with the model
    assert not abs(model.encode_query(texts) - model.encode_document(texts)).max() < 1e-3


def test_existing_run_is_never_overwritten_silently(tmp_path, trained):
    config = copy.deepcopy(trained["config"])
    run_dir = tmp_path / "run"
    step = run_dir / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    write_manifest(step, 2)  # a complete (if empty) checkpoint: a result to protect
    (run_dir / "notes.txt").write_text("mine")
    config.training.output_dir = str(run_dir)
    with pytest.raises(RunError, match="already holds a run.*--resume.*--overwrite"):
        plan_run_directory(config, resume=None, overwrite=False)
    RunDirectory(run_dir).set_aside()  # what --overwrite does first
    assert not (run_dir / "checkpoints").exists() and (run_dir / "notes.txt").read_text() == "mine"
    with pytest.raises(RunError, match="holds no checkpoint"):
        plan_run_directory(config, resume=True, overwrite=False)


def test_resume_refuses_a_changed_batch(trained):
    config = copy.deepcopy(trained["config"])
    config.training.output_dir = str(trained["root"] / "run_a")
    config.training.batch_size = 16
    with pytest.raises(RunError, match=r"training\.batch_size differ"):
        plan_run_directory(config, resume=True, overwrite=False)


def test_command_line_reports_bad_data_with_its_line(tmp_path, capsys):
    import argparse

    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "q", "pos": "p"}\n{"query": "q2"}\n')
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--model", make_tiny_model(tmp_path / "model"), "--data", str(data), "--output-dir",
            str(tmp_path / "run"), "--training.report_to", "[]", "--training.cpu", "true",
            "--max-steps", "1", "--batch-size", "2", "--model.query_max_length", "16",
            "--model.document_max_length", "24"]  # fmt: skip
    assert run(parser.parse_args(argv)) == 2
    assert f"{data}:2: missing field 'pos'" in capsys.readouterr().err
    # A start that failed on its input leaves nothing that would block the corrected start.
    assert not (tmp_path / "run" / "config.yaml").exists()
    data.write_text('{"query": "q", "pos": "p"}\n{"query": "q2", "pos": "p2"}\n')
    assert run(parser.parse_args(argv)) == 0
    assert (tmp_path / "run" / "final").is_dir()


def test_master_weights_accumulate_chunk_gradients_in_fp32():
    from retriever.train.precision import MasterWeights

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16).to(torch.bfloat16)
    master = MasterWeights(layer.parameters())
    want = [torch.zeros_like(m, dtype=torch.float64) for m in master.master]
    for _ in range(300):  # like 300 chunks backpropagated one after the other
        x = torch.randn(4, 16, dtype=torch.bfloat16)
        grads = torch.autograd.grad(layer(x).float().square().sum(), list(layer.parameters()))
        want = [w + g.double() for w, g in zip(want, grads)]
        layer(x).float().square().sum().backward()
    for m, p, w in zip(master.master, master.params, want):
        assert p.grad is None  # nothing accumulated in bf16
        torch.testing.assert_close(m.grad.double(), w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
    naive = torch.zeros_like(want[0], dtype=torch.bfloat16)
    for _ in range(300):  # the same sum in bf16 is visibly off: what the master copy avoids
        naive += (want[0] / 300).to(torch.bfloat16)
    assert (naive.double() - want[0]).abs().max() > 1e-3 * want[0].abs().max()

    optimizer = torch.optim.SGD(master.master, lr=1e-3)
    optimizer.step()
    master.copy_to_model()
    for m, p in zip(master.master, master.params):
        assert torch.equal(p, m.to(torch.bfloat16))


def test_step_context_is_entered_around_every_step(tmp_path):
    import contextlib

    model = make_tiny_model(tmp_path / "model")
    data = write_examples(tmp_path / "train.jsonl", n=32, negatives=1)
    trainer = Trainer(tiny_config(model, data, tmp_path / "run", training={"max_steps": 3}))
    entered = []

    @contextlib.contextmanager
    def around(step):
        entered.append(step)
        yield
        assert trainer.state.step == step - 1  # the step is counted after its update

    trainer.step_context = around
    trainer.train()
    assert entered == [1, 2, 3]


def test_the_summary_names_where_best_is_kept(tmp_path):
    """A run resumed into another directory that never beat the best it resumed with has no
    best/ of its own: the summary says so instead of naming a directory that does not exist."""
    from types import SimpleNamespace

    from retriever.train.evaluation import describe_progress

    evaluations = [{"step": 3, "ndcg_at_10": 0.5}, {"step": 4, "ndcg_at_10": 0.6}]
    state = SimpleNamespace(best_metric=0.7, best_step=1)
    text = describe_progress(evaluations, "ndcg_at_10", state, tmp_path / "best")
    assert "-> 0.6000 at step 4 (best 0.7000 at step 1, saved in best/ of the run" in text
    (tmp_path / "best").mkdir()
    assert f"saved in {tmp_path / 'best'})" in describe_progress(evaluations, "ndcg_at_10", state,
                                                                 tmp_path / "best")  # fmt: skip
