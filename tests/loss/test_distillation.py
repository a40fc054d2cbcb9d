"""Distillation from teacher scores: the KL over each query's group against float64, across two
gloo processes with uneven batches, and the data and option errors a user can make."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from objective_reference import distillation_bounds, reference_distillation
from ring_cases import launch

from retriever.loss.distillation import distillation_loss


def _inputs(seed: int, n_q: int, width: int, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n_q, dim, generator=g), dim=1)
    docs = torch.nn.functional.normalize(torch.randn(n_q * width, dim, generator=g), dim=1)
    teacher = torch.rand(n_q, width, generator=g)
    return q, docs, teacher


def _errors(q, docs, teacher, scale, temperature, perturb=0.0):
    q_in, d_in = q.clone().requires_grad_(), docs.clone().requires_grad_()
    s_in = torch.tensor(scale, requires_grad=True)
    loss = distillation_loss(q_in, d_in, teacher + perturb * torch.arange(teacher.shape[1]),
                             scale=s_in, teacher_temperature=temperature)  # fmt: skip
    loss.backward()
    q64, d64 = q.double().requires_grad_(), docs.double().requires_grad_()
    s64 = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    want = reference_distillation(q64, d64, teacher, s64, temperature)
    want.backward()
    bound = distillation_bounds(q, docs, teacher, scale, temperature)
    got = {"loss": loss, "dq": q_in.grad, "dd": d_in.grad, "dscale": s_in.grad}
    ref = {"loss": want, "dq": q64.grad, "dd": d64.grad, "dscale": s64.grad}
    return {k: float((got[k].detach().double() - ref[k].detach()).norm()) / getattr(bound, k)
            for k in got}  # fmt: skip


@pytest.mark.parametrize("n_q, width", [(9, 4), (1, 2), (33, 8)])
def test_matches_float64_within_the_error_model(n_q, width):
    errors = _errors(*_inputs(0, n_q, width), scale=20.0, temperature=0.05)
    assert max(errors.values()) <= 1.0, errors


def test_a_defect_is_far_outside_the_bounds():
    errors = _errors(*_inputs(1, 9, 4), scale=20.0, temperature=0.05, perturb=1e-3)
    assert max(errors.values()) > 10, errors


def test_shapes_are_checked():
    q, docs, teacher = _inputs(2, 4, 3)
    with pytest.raises(ValueError, match=r"teacher_scores must be \[Bq, 1 \+ n\]"):
        distillation_loss(q, docs[:-1], teacher, scale=20.0)
    with pytest.raises(ValueError, match="teacher_temperature must be > 0"):
        distillation_loss(q, docs, teacher, scale=20.0, teacher_temperature=0.0)


def _rank(rank, world, results):
    sizes = [2 + 3 * r for r in range(world)]
    q, docs, teacher = _inputs(3, sum(sizes), 3)
    groups = docs.reshape(3, sum(sizes), -1)
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    local_q = q[rows].clone().requires_grad_()
    local_docs = groups[:, rows].reshape(-1, docs.shape[1]).clone().requires_grad_()
    loss = distillation_loss(local_q, local_docs, teacher[rows], scale=20.0,
                             teacher_temperature=0.05, group=dist.group.WORLD)  # fmt: skip
    loss.backward()
    q64 = q.double().requires_grad_()
    want = reference_distillation(q64, docs.double(), teacher, torch.tensor(20.0), 0.05)
    want.backward()
    bound = distillation_bounds(q, docs, teacher, 20.0, 0.05)
    results[rank] = {
        "dq": float((local_q.grad.double() - world * q64.grad[rows]).norm()) / (world * bound.dq),
        "loss": abs(float(loss.detach()) - float(reference_distillation(
            q[rows], local_docs.detach(), teacher[rows], torch.tensor(20.0), 0.05))) / bound.loss,
    }  # fmt: skip


def test_across_processes_the_gradient_is_the_global_one(tmp_path):
    results = torch.multiprocessing.Manager().dict()
    launch(_rank, 2, str(tmp_path / "init"), results)
    for rank in range(2):
        assert max(results[rank].values()) <= 1.0, dict(results[rank])


@pytest.fixture()
def tiny(tmp_path):
    from train_helpers import make_tiny_model, write_examples

    model = make_tiny_model(tmp_path / "model")
    data = write_examples(tmp_path / "plain.jsonl", n=24, negatives=2)
    return tmp_path, model, data


def _train(argv, capsys):
    from retriever.cli import main

    code = main(["train", *argv, "--training.cpu", "true", "--max-steps", "2",
                 "--batch-size", "4", "--training.report_to", "[]"])  # fmt: skip
    return code, capsys.readouterr().err


def test_missing_or_bad_teacher_scores_name_the_line(tiny, capsys):
    root, model, data = tiny
    base = ["--model", model, "--negatives", "2", "--loss.distill_weight", "1"]
    code, err = _train([*base, "--data", data, "--output-dir", str(root / "a")], capsys)
    assert code == 2 and "plain.jsonl:1: no teacher scores ('pos_scores' and 'neg_scores'" in err
    rows = [json.loads(line) for line in open(data)]
    for row in rows:
        row["pos_scores"], row["neg_scores"] = [0.9], [0.5, 0.4]
    rows[3]["neg_scores"] = [0.5]
    scored = root / "scored.jsonl"
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = _train([*base, "--data", str(scored), "--output-dir", str(root / "b")], capsys)
    assert code == 2 and "scored.jsonl:4: 'neg_scores' must be a list of 2 finite numbers" in err
    assert not (root / "a").exists() and not (root / "b").exists()  # nothing was written


def test_options_that_cannot_combine_are_refused(tiny, capsys):
    root, model, data = tiny
    base = ["--model", model, "--data", data, "--output-dir", str(root / "run")]
    cases = [
        (["--loss.distill_weight", "1", "--negatives", "0"], "no source has hard negatives"),
        (["--loss.distill_weight", "1", "--mining.dynamic", "true", "--negatives", "2"],
         "mining.dynamic replaces the negatives"),
        (["--loss.objective", "gcl", "--loss.matryoshka_dims", "[16]"], "cannot combine"),
        (["--loss.matryoshka_dims", "[16, 16]"], "expected distinct positive sizes"),
        (["--loss.matryoshka_dims", "[64]"], "the model's embeddings have 32"),
        (["--loss.matryoshka_weights", "[1.0]"], "one weight >= 0 per loss.matryoshka_dims"),
        (["--loss.objective", "sigmoid", "--loss.symmetric", "true"], "set it to false"),
        (["--loss.gcl_gamma_min", "1.5"], "expected a number in (0, 1]"),
        (["--loss.objective", "softmax"], "one of infonce, gcl, sigmoid"),
    ]  # fmt: skip
    for options, message in cases:
        code, err = _train([*base, *options], capsys)
        assert code == 2 and message in err, (options, err)
        assert "Traceback" not in err
