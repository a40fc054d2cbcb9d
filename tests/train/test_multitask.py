"""Several sources in one run: entries checked, batches split by weight, each source's loss on
its own batch only (against float64 references), resume mid-epoch of one source, several
evaluation tasks, the model card and the Hub upload."""

from __future__ import annotations

import json
import random

import pytest
import torch
from reference import reference_cosent, reference_loss
from train_helpers import (
    WORDS,
    copy_checkpoint,
    embed_directly,
    grads_or_zeros,
    load_weights,
    make_tiny_model,
    read_log,
    reset_accelerate_state,
    tiny_config,
    write_beir,
    write_examples,
)

from retriever.model import Encoder
from retriever.train.config import ConfigError
from retriever.train.data import batch_of_texts
from retriever.train.sources import batch_shares, rank_rows, sources_of
from retriever.train.step import LossPart, cached_parts_step
from retriever.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def write_sts(path, n=40, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a = rng.sample(WORDS, 4)
            b = a[:2] + rng.sample(WORDS, 2)
            f.write(
                json.dumps(
                    {
                        "sentence1": " ".join(a) + f" {i}",
                        "sentence2": " ".join(b),
                        "score": float(rng.randint(0, 5)),
                    }
                )
                + "\n"
            )
    return str(path)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"path": "x", "task": "stss"}, r"data.train\[1\]: task: 'stss' is not one of"),
        ({"task": "sts"}, r"data.train\[1\]: missing field 'path'"),
        ({"path": "x", "weight": 0}, r"data.train\[1\]: weight: expected a number > 0"),
        ({"path": "x", "weight": -2}, r"data.train\[1\]: weight: expected a number > 0"),
        ({"path": "x", "wieght": 2}, r"unknown field 'wieght' \(did you mean 'weight'\?\)"),
        ({"path": "x", "task": "sts", "negatives": 3}, r"an sts source has none"),
        ({"path": "x", "name": "first"}, r"name 'first' is already the name of data.train\[0\]"),
        ({"path": "x", "name": "b", "weight": "high"}, r"data.train\[1\] \(b\): weight: got"),
        ({"path": "x", "loss_weight": -1}, r"data.train\[1\]: loss_weight: expected a number >= 0"),
    ],
)
def test_bad_source_entries_name_the_source_field_and_line(tmp_path, entry, message):
    import yaml

    from retriever.train.config import load_config

    config = {
        "model": {"name_or_path": "m"},
        "training": {"output_dir": str(tmp_path)},
        "data": {"train": [{"path": "a", "name": "first"}, entry]},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config, default_flow_style=False))
    from retriever.train.config import validate

    with pytest.raises(ConfigError, match=message) as info:
        validate(load_config(path))
    assert f"{path}:" in str(info.value)  # the line of the entry


def test_batches_follow_the_weights_and_every_rank_holds_every_source(tmp_path):
    config = tiny_config(
        "m",
        [{"path": "a", "weight": 3}, {"path": "b", "task": "sts"}],
        tmp_path,
        data={"negatives": 0},
    )
    sources = sources_of(config)
    assert batch_shares(64, sources, 1) == [48, 16]
    assert batch_shares(10, sources, 2) == [8, 2]  # 7.5 / 2.5: the remainder goes to the first
    for share in (7, 8, 2):
        rows = [rank_rows(share, r, 3) for r in range(3)]
        assert sum(s.stop - s.start for s in rows) == share  # every row, once, in rank order
        assert [s.start for s in rows[1:]] == [s.stop for s in rows[:-1]]
    with pytest.raises(ValueError, match="gets 1 of the 4 rows a step, fewer than one for each"):
        batch_shares(4, sources, 2)


def test_a_batch_too_small_for_every_source_names_the_option(tmp_path):
    config = _two_source_config(tmp_path, tmp_path / "run", batch_size=2)
    config.data.train[1]["weight"] = 0.1  # 2 rows a step: none for the STS source
    with pytest.raises(
        ConfigError,
        match=r"data.train: source 'sts' gets 0 of the 2 rows.*raise training.batch_size",
    ):
        Trainer(config)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def _groups(prefix, n):
    return [
        (
            f"{prefix} question {i} " + "x " * (i % 3),
            f"{prefix} passage {i}",
            [f"{prefix} other {(i + 1) % n}"],
        )
        for i in range(n)
    ]


def test_each_source_sees_only_its_own_batch_and_the_gradient_is_exact(tmp_path):
    encoder = Encoder.from_pretrained(
        make_tiny_model(tmp_path / "model", dropout=0.1),
        query_max_length=16,
        document_max_length=24,
    )
    encoder.train()
    a = batch_of_texts(encoder, _groups("alpha", 6), chunk_size=4)
    # "shared" appears in both sources: in one loss it would be a negative of the other's queries
    b = batch_of_texts(encoder, [*_groups("beta", 4), ("q", "shared", ["alpha passage 0"])], 3)
    pairs = batch_of_texts(
        encoder, [(f"s {i} {WORDS[i]}", f"t {WORDS[i + 1]}", []) for i in range(5)], 2
    )
    pairs.scores = torch.tensor([0.0, 1.0, 4.0, 2.0, 5.0])
    scale = torch.tensor(20.0)
    params = list(encoder.parameters())

    def infonce(q, d, batch):
        return reference_loss(q, d, scale, torch.arange(len(q)), batch.candidate_ids.cpu())

    def cosent(x, y, batch):  # float64, written out pair by pair (reference_cosent)
        return torch.tensor(reference_cosent(x.detach(), y.detach(), batch.scores, 20.0))

    from retriever.loss import contrastive_loss
    from retriever.loss.cosent import cosent_loss

    parts = [
        LossPart(
            a,
            lambda q, d, x: contrastive_loss(q, d, scale=20.0, candidate_ids=x.candidate_ids),
            0.5,
        ),
        LossPart(
            b,
            lambda q, d, x: contrastive_loss(q, d, scale=20.0, candidate_ids=x.candidate_ids),
            0.3,
        ),
        LossPart(pairs, lambda q, d, x: cosent_loss(q, d, x.scores), 0.2),
    ]
    torch.manual_seed(5)
    total, losses = cached_parts_step(encoder, parts)
    got = grads_or_zeros(params)

    # The same losses in one graph, in float64 (CoSENT's value from the loop; its gradient via
    # the package's function on the same embeddings, whose value the loop checks).
    for p in params:
        p.grad = None
    torch.manual_seed(5)
    embedded = [(*embed_directly(encoder, batch), batch) for batch in (a, b, pairs)]
    want = [infonce(*embedded[0]), infonce(*embedded[1])]
    assert float(losses[2]) == pytest.approx(float(cosent(*embedded[2])), rel=1e-5)
    for value, expected in zip(losses[:2], want):
        assert float(value) == pytest.approx(float(expected.detach()), rel=1e-5)
    direct = (
        0.5 * want[0] + 0.3 * want[1] + 0.2 * cosent_loss(*embedded[2][:2], pairs.scores).double()
    )
    assert float(total) == pytest.approx(float(direct), rel=1e-5)
    direct.backward()
    for g, p in zip(got, params):
        w = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-6)


def _two_source_config(tmp_path, output, **training):
    model = make_tiny_model(tmp_path / "model", dropout=0.1)
    data = write_examples(tmp_path / "train.jsonl", n=48, negatives=2)
    sts = write_sts(tmp_path / "sts.jsonl", n=18)
    sources = [
        {"name": "pairs", "path": data, "weight": 3, "negatives": 1},
        {"name": "sts", "path": sts, "task": "sts", "weight": 1},
    ]
    return tiny_config(model, sources, output, training={"max_steps": 8, **training})


def test_a_loss_weight_replaces_the_share_in_the_summed_loss(tmp_path):
    """By default each source's loss counts with its share of the batch (9 and 3 of 12 rows);
    a source's loss_weight replaces that weight in the sum that is backpropagated."""
    for weights, output in (({}, "default"), ({"sts": 0.05}, "weighted")):
        config = _two_source_config(tmp_path, tmp_path / output, batch_size=12, max_steps=2)
        config.data.train = [{**s, "loss_weight": weights[s["name"]]} if s["name"] in weights
                             else s for s in config.data.train]  # fmt: skip
        Trainer(config).train()
        reset_accelerate_state()
        want = {"pairs": 9 / 12, "sts": 3 / 12, **weights}
        for record in read_log(tmp_path / output):
            total = want["pairs"] * record["loss/pairs"] + want["sts"] * record["loss/sts"]
            assert record["loss"] == pytest.approx(total, rel=1e-5)


def test_two_sources_train_log_each_loss_and_describe_the_model(tmp_path):
    config = _two_source_config(tmp_path, tmp_path / "run", batch_size=12)
    Trainer(config).train()
    log = read_log(tmp_path / "run")
    assert all("loss/pairs" in r and "loss/sts" in r for r in log)
    # 9 retrieval rows (48 examples: 5 batches an epoch) and 3 STS pairs (18: 6) a step
    assert [r["epoch"] for r in log] == [0] * 5 + [1] * 3
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "| pairs | retrieval |" in card and "| sts | sts |" in card and "CoSENT" in card


def test_resume_mid_epoch_of_one_source_is_exact(tmp_path):
    a = _two_source_config(
        tmp_path, tmp_path / "a", batch_size=12, save_steps=4, save_total_limit=None
    )
    Trainer(a).train()
    reset_accelerate_state()
    # At step 4 the retrieval source is in its first epoch, the STS source in its second.
    b = tmp_path / "b"
    copy_checkpoint(tmp_path / "a", b, 4, config=False)
    config = _two_source_config(tmp_path, b, batch_size=12, save_steps=4, save_total_limit=None)
    Trainer(config, resume=True).train()
    want, got = load_weights(tmp_path / "a" / "final"), load_weights(b / "final")
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_several_evaluation_tasks_and_the_mean_of_their_main_scores(tmp_path):
    model = make_tiny_model(tmp_path / "model", dropout=0.1)
    data = write_examples(tmp_path / "train.jsonl", n=48, negatives=2)
    task = write_beir(tmp_path / "task", data, n=12)
    sts = write_sts(tmp_path / "sts.jsonl", n=20)
    config = tiny_config(
        model,
        data,
        tmp_path / "run",
        eval={"data": [task, sts], "metric": "mean_main_score", "steps": 3},
    )
    Trainer(config).train()
    records = read_log(tmp_path / "run", "eval.jsonl")
    assert [r["step"] for r in records] == [0, 3, 6]
    last = records[-1]
    assert {"task/ndcg_at_10", "sts/spearman", "mean_main_score"} <= set(last)
    mean = (last["task/main_score"] + last["sts/main_score"]) / 2
    assert last["mean_main_score"] == pytest.approx(mean)
    ambiguous = {"data": [task, sts], "metric": "ndcg_at_10"}
    with pytest.raises(ConfigError, match="ambiguous with 2 tasks"):
        Trainer(tiny_config(model, data, tmp_path / "r2", eval=ambiguous))
    left_unset = tiny_config(model, data, tmp_path / "r3", eval={"data": [task, sts]})
    trainer = Trainer(left_unset)
    trainer.run_dir.unlock()
    assert trainer.config.eval.metric == "mean_main_score"  # the default, with several tasks


def test_the_final_model_goes_to_the_hub_only_when_asked(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **k: calls.append(k))
    model = make_tiny_model(tmp_path / "model", dropout=0.1)
    data = write_examples(tmp_path / "train.jsonl", n=24, negatives=2)
    Trainer(tiny_config(model, data, tmp_path / "quiet", training={"max_steps": 1})).train()
    assert calls == []
    reset_accelerate_state()
    config = tiny_config(
        model, data, tmp_path / "pushed", training={"max_steps": 1, "push_to_hub": "me/tiny"}
    )
    Trainer(config).train()
    assert calls and calls[0]["repo_id"] == "me/tiny"
    assert calls[0]["folder_path"] == str(tmp_path / "pushed" / "final")
