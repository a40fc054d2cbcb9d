"""CoSENT against a float64 loop over pairs and against sentence-transformers' CoSENTLoss, and
across gloo processes against one process on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
from reference import reference_cosent, reference_cosent_graph
from ring_cases import launch

from retriever.loss.cosent import cosent_loss


def _case(n=9, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    first, second = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    scores = torch.randint(0, 5, (n,), generator=g).float()  # ties included
    return first, second, scores


def test_matches_a_float64_loop_and_its_gradient():
    first, second, scores = _case()
    a, b = first.clone().requires_grad_(), second.clone().requires_grad_()
    loss = cosent_loss(a, b, scores, scale=20.0)
    assert loss.item() == pytest.approx(reference_cosent(first, second, scores, 20.0), rel=1e-5)
    loss.backward()
    a64, b64 = first.double().requires_grad_(), second.double().requires_grad_()
    reference_cosent_graph(a64, b64, scores, 20.0).backward()
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-4, atol=1e-6)


def test_equals_sentence_transformers_cosent_loss():
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss

    first, second, scores = _case(seed=3)

    class Fixed(torch.nn.Module):  # a "model" whose embeddings are the given vectors
        def forward(self, features):
            return {"sentence_embedding": features["x"]}

    theirs = CoSENTLoss(Fixed(), scale=20.0)
    want = theirs([{"x": first}, {"x": second}], scores)
    assert cosent_loss(first, second, scores).item() == pytest.approx(want.item(), rel=1e-5)


def _two_process_worker(rank: int, world: int, out: str) -> None:
    first, second, scores = _case(n=7, seed=5)  # the same global batch on every rank
    rows = [slice(0, 3), slice(3, 7)][rank]  # uneven shares
    a = first[rows].clone().requires_grad_()
    loss = cosent_loss(a, second[rows], scores[rows], group=torch.distributed.group.WORLD)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": a.grad}, f"{out}.{rank}")


def test_across_processes_gives_world_times_the_global_gradient(tmp_path):
    launch(_two_process_worker, 2, str(tmp_path / "init"), str(tmp_path / "out"))
    first, second, scores = _case(n=7, seed=5)
    a = first.clone().requires_grad_()
    want = cosent_loss(a, second, scores)
    want.backward()
    for rank, rows in enumerate([slice(0, 3), slice(3, 7)]):
        got = torch.load(f"{tmp_path / 'out'}.{rank}")
        assert got["loss"].item() == pytest.approx(want.item(), rel=1e-6)
        torch.testing.assert_close(got["grad"], 2 * a.grad[rows], rtol=1e-5, atol=1e-7)
