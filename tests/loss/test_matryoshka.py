"""Matryoshka: the loss on nested prefixes against float64, the trained model's prefixes through
sentence-transformers' truncate_dim, and ``--truncate-dim`` in evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from objective_reference import truncated
from reference import error_bounds, reference_loss

from retriever.loss import InfoNCELoss
from retriever.loss.matryoshka import MatryoshkaLoss


def test_loss_and_gradients_match_float64():
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(7, 24, generator=g), torch.randn(19, 24, generator=g)
    ids = torch.randint(0, 10, (19,), generator=g)
    dims, weights = [24, 12, 5], [1.0, 0.5, 2.0]
    loss_fn = MatryoshkaLoss(InfoNCELoss(scale=10.0, impl="torch"), dims, weights)
    q_in, d_in = q.clone().requires_grad_(), d.clone().requires_grad_()
    loss_fn(q_in, d_in, candidate_ids=ids).backward()

    q64, d64 = q.double().requires_grad_(), d.double().requires_grad_()
    labels, scale = torch.arange(7), torch.tensor(10.0, dtype=torch.float64)
    want = sum(w * reference_loss(truncated(q64, k), truncated(d64, k), scale, labels, ids)
               for k, w in zip(dims, weights))  # fmt: skip
    want.backward()
    # Each term's bound on its normalised prefix, carried back through the normalisation
    # (whose Jacobian has norm 1 / |x_:k|) and the term's weight.
    allowed_q = allowed_d = 0.0
    for k, w in zip(dims, weights):
        qk, dk = truncated(q, k).float(), truncated(d, k).float()
        bound = error_bounds(qk, dk, 10.0, labels, ids)
        allowed_q += w * bound.dq / float(q[:, :k].norm(dim=1).min())
        allowed_d += w * bound.dd / float(d[:, :k].norm(dim=1).min())
    assert float((q_in.grad.double() - q64.grad).norm()) <= allowed_q
    assert float((d_in.grad.double() - d64.grad).norm()) <= allowed_d
    # The test can fail: one dimension's term dropped changes the gradient far beyond that.
    other = MatryoshkaLoss(InfoNCELoss(scale=10.0, impl="torch"), dims[:2], weights[:2])
    q_other = q.clone().requires_grad_()
    other(q_other, d, candidate_ids=ids).backward()
    assert float((q_other.grad.double() - q64.grad).norm()) > 100 * allowed_q


def test_bad_dims_are_refused():
    from retriever.loss.gcl import GlobalContrastiveLoss

    with pytest.raises(ValueError, match="distinct positive sizes"):
        MatryoshkaLoss(InfoNCELoss(), [64, 64])
    with pytest.raises(ValueError, match="per-example state"):
        MatryoshkaLoss(GlobalContrastiveLoss(4), [8])
    with pytest.raises(ValueError, match="exceed the embedding size 8"):
        MatryoshkaLoss(InfoNCELoss(), [16])(torch.randn(2, 8), torch.randn(2, 8))


def test_truncated_model_equals_sentence_transformers_truncate_dim(tmp_path):
    from sentence_transformers import SentenceTransformer
    from tiny_encoder import save_tiny_bert

    from retriever.model import Encoder

    path = save_tiny_bert(tmp_path / "model")
    texts = ["a cell divides", "proteins fold", "the heart pumps blood"]
    ours = Encoder.from_pretrained(str(path), truncate_dim=12)
    assert ours.embedding_dim == 12
    got = ours.encode(texts, "query", show_progress=False)
    ours.save(tmp_path / "saved")  # records truncate_dim for sentence-transformers
    assert (
        json.loads((tmp_path / "saved" / "config_sentence_transformers.json").read_text())[
            "truncate_dim"
        ]
        == 12
    )
    for model in (SentenceTransformer(str(path), truncate_dim=12, device="cpu"),
                  SentenceTransformer(str(tmp_path / "saved"), device="cpu")):  # fmt: skip
        theirs = model.encode(texts)  # truncated after their Normalize: renormalise to compare
        assert theirs.shape == (3, 12)
        theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
        np.testing.assert_allclose(got, theirs, atol=1e-5)
    reloaded = Encoder.from_pretrained(str(tmp_path / "saved"))
    assert reloaded.settings.truncate_dim == 12
    np.testing.assert_allclose(reloaded.encode(texts, "query", show_progress=False), got, atol=1e-6)
    with pytest.raises(ValueError, match="truncate_dim 99 exceeds"):
        Encoder.from_pretrained(str(path), truncate_dim=99)


def test_eval_cli_truncates(tmp_path, capsys):
    from tiny_encoder import save_tiny_bert
    from train_helpers import write_beir, write_examples

    from retriever.cli import main
    from retriever.eval import evaluate_task, load_beir
    from retriever.model import Encoder

    model = str(save_tiny_bert(tmp_path / "model"))
    task = write_beir(tmp_path / "task", write_examples(tmp_path / "t.jsonl", n=20), n=10)
    out = tmp_path / "r.json"
    argv = ["eval", "--model", model, "--data", task, "--no-progress", "--device", "cpu"]
    assert main([*argv, "--truncate-dim", "8", "--output", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    direct = evaluate_task(Encoder.from_pretrained(model, truncate_dim=8), load_beir(task, "test"))
    assert result["ndcg_at_10"] == pytest.approx(direct["ndcg_at_10"], abs=1e-9)
    assert json.loads(out.read_text())["arguments"]["truncate_dim"] == 8
    assert main([*argv, "--truncate-dim", "64"]) == 2
    assert "--truncate-dim 64: the model has 32 dimensions" in capsys.readouterr().err
