"""FastCLIP's global contrastive loss (FCCO): one step against the float64 reference (value,
surrogate gradient, moving averages), across three gloo processes with uneven batches, and a
resumed training run that continues its state bit-exactly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from objective_reference import reference_gcl_step
from reference import error_bounds
from ring_cases import launch

from retriever.loss.gcl import GlobalContrastiveLoss

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _batch(seed: int, n_q: int, n_d: int, dim: int = 12):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n_q, dim, generator=g), dim=1)
    d = torch.nn.functional.normalize(torch.randn(n_d, dim, generator=g), dim=1)
    ids = torch.randint(0, n_d, (n_d,), generator=g)
    return q, d, ids


def _state(loss_fn, steps: int, seed: int) -> None:
    """Some examples seen before (u > 0), the others not (u = 0), ``steps`` steps done."""
    g = torch.Generator().manual_seed(seed)
    n = loss_fn.u_query.shape[0]
    seen = torch.rand(n, generator=g) < 0.5
    loss_fn.u_query.copy_(torch.where(seen, 1 + 20 * torch.rand(n, generator=g), 0.0))
    loss_fn.u_document.copy_(torch.where(seen, 1 + 20 * torch.rand(n, generator=g), 0.0))
    loss_fn.steps.fill_(steps)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("steps", [0, 7, 50])  # gamma 1, on the way down, at gamma_min
def test_one_step_matches_float64(symmetric, steps):
    q, d, ids = _batch(0, 9, 27)
    loss_fn = GlobalContrastiveLoss(40, scale=8.0, learnable_scale=True, gamma_min=0.3,
                                    decay_steps=20, symmetric=symmetric, impl="torch")  # fmt: skip
    _state(loss_fn, steps, seed=steps)
    indices = torch.randperm(40)[:9]
    u_q, u_d, gamma = loss_fn.u_query.clone(), loss_fn.u_document.clone(), loss_fn.gamma()
    q_in, d_in = q.clone().requires_grad_(), d.clone().requires_grad_()
    value = loss_fn(q_in, d_in, example_indices=indices, candidate_ids=ids)
    value.backward()

    q64, d64 = q.double().requires_grad_(), d.double().requires_grad_()
    scale64 = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
    want, surrogate, (want_u_q, want_u_d) = reference_gcl_step(
        q64, d64, scale64, u_q, u_d, indices, gamma, symmetric, ids
    )
    surrogate.backward()
    # The gradient is InfoNCE's with row weights g / u instead of 1: its bound scales with the
    # largest weight (u >= gamma g, so g / u <= 1 / gamma), plus the weights' own error (each
    # e^l is off by about dl, the row loss's error).
    bound = error_bounds(q, d, 8.0, torch.arange(9), ids, symmetric)
    weight = 1 / gamma
    assert float(value.detach()) == pytest.approx(float(want.detach()), abs=bound.loss)
    for got, ref, b in ((q_in.grad, q64.grad, bound.dq), (d_in.grad, d64.grad, bound.dd),
                        (loss_fn.log_scale.grad / 8.0, scale64.grad, bound.dscale)):  # fmt: skip
        allowed = weight * b + 2 * bound.loss * float(ref.norm())
        assert float((got.double() - ref).norm()) <= allowed
    for got, ref in ((loss_fn.u_query, want_u_q), (loss_fn.u_document, want_u_d)):
        if not symmetric and got is loss_fn.u_document:
            assert torch.equal(got, u_d)  # one direction: the other state is untouched
            continue
        torch.testing.assert_close(got.double(), ref, rtol=4 * bound.loss, atol=0)
    assert int(loss_fn.steps) == steps + 1


def test_first_step_is_infonce_and_eval_mode_leaves_the_state():
    from retriever.loss import contrastive_loss

    q, d, ids = _batch(1, 6, 12)
    loss_fn = GlobalContrastiveLoss(6, scale=10.0, impl="torch")
    q_in = q.clone().requires_grad_()
    loss_fn(q_in, d, example_indices=torch.arange(6), candidate_ids=ids).backward()
    q_ref = q.clone().requires_grad_()
    contrastive_loss(q_ref, d, scale=10.0, candidate_ids=ids, impl="torch").backward()
    torch.testing.assert_close(q_in.grad, q_ref.grad)  # gamma = 1 and u = g: weights 1
    state = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    loss_fn.eval()
    loss_fn(q, d, example_indices=torch.arange(6), candidate_ids=ids)
    assert all(torch.equal(state[k], v) for k, v in loss_fn.state_dict().items())
    assert loss_fn.gamma() == pytest.approx(loss_fn.gamma_min + (1 - loss_fn.gamma_min)
                                            * (1 + torch.cos(torch.tensor(torch.pi / 1000)))
                                            / 2)  # fmt: skip
    with pytest.raises(ValueError, match="example_indices must have shape"):
        loss_fn(q, d, example_indices=torch.arange(5))


def _ring_rank(rank, world, results):
    sizes_q = [2 + r for r in range(world)]
    sizes_d = [3 + 2 * r for r in range(world)]
    q, d, ids = _batch(5, sum(sizes_q), sum(sizes_d))
    loss_fn = GlobalContrastiveLoss(30, scale=8.0, gamma_min=0.3, decay_steps=20, impl="torch")
    _state(loss_fn, 5, seed=1)
    indices = torch.arange(sum(sizes_q)) * 2  # distinct examples across ranks
    u_q, gamma = loss_fn.u_query.clone(), loss_fn.gamma()
    q0, d0 = sum(sizes_q[:rank]), sum(sizes_d[:rank])
    rows, cols = slice(q0, q0 + sizes_q[rank]), slice(d0, d0 + sizes_d[rank])
    local_q, local_d = q[rows].clone().requires_grad_(), d[cols].clone().requires_grad_()
    loss_fn(local_q, local_d, example_indices=indices[rows], candidate_ids=ids[cols],
            group=dist.group.WORLD).backward()  # fmt: skip
    # The global reference: query i's positive is its rank's first candidates, in order.
    positives = torch.cat([torch.arange(n) + sum(sizes_d[:r]) for r, n in enumerate(sizes_q)])
    order = torch.cat([positives, torch.tensor([j for j in range(sum(sizes_d))
                                                if j not in set(positives.tolist())])])  # fmt: skip
    q64, d64 = q.double().requires_grad_(), d.double().requires_grad_()
    scale = torch.tensor(8.0, dtype=torch.float64)
    _, surrogate, (want_u, _) = reference_gcl_step(
        q64,
        d64[order],
        scale,
        u_q,
        loss_fn.u_document,
        indices,
        gamma,
        False,
        ids[order],
    )
    surrogate.backward()
    bound = error_bounds(q, d[order], 8.0, torch.arange(len(q)), ids[order])
    allowed = world * bound.dq / gamma + 2 * bound.loss * world * float(q64.grad.norm())
    results[rank] = {
        "dq": float((local_q.grad.double() - world * q64.grad[rows]).norm()) / allowed,
        "u": float((loss_fn.u_query.double() - want_u).abs().max() / want_u.abs().max()),
    }


def test_ring_gives_the_global_step_and_one_state_on_every_rank(tmp_path):
    results = torch.multiprocessing.Manager().dict()
    launch(_ring_rank, 3, str(tmp_path / "init"), results)
    for rank in range(3):
        assert results[rank]["dq"] <= 1.0, dict(results[rank])
        assert results[rank]["u"] <= 1e-5, dict(results[rank])


def test_resumed_training_continues_the_state_bit_exactly(tmp_path):
    from train_helpers import (
        config_for,
        copy_checkpoint,
        load_weights,
        make_tiny_model,
        read_log,
        reset_accelerate_state,
        tiny_config,
        write_examples,
    )

    from retriever.train.trainer import Trainer

    model = make_tiny_model(tmp_path / "model")
    data = write_examples(tmp_path / "train.jsonl", n=48, negatives=2)
    loss = {"objective": "gcl", "symmetric": True, "gcl_decay_steps": 3}
    training = {"max_steps": 4, "save_steps": 2, "save_total_limit": None}
    config = tiny_config(model, data, tmp_path / "run_a", loss=loss, training=training)
    Trainer(config).train()
    reset_accelerate_state()
    run_b = tmp_path / "run_b"
    copy_checkpoint(tmp_path / "run_a", run_b, 2)
    Trainer(config_for(config, run_b), resume=True).train()

    want, got = load_weights(tmp_path / "run_a" / "final"), load_weights(run_b / "final")
    assert all(torch.equal(got[name], want[name]) for name in want)
    assert [r["loss"] for r in read_log(run_b)] == [
        r["loss"] for r in read_log(tmp_path / "run_a")
    ][2:]
    states = [torch.load(run / "checkpoints" / "step-00000004" / "custom_checkpoint_1.pkl",
                         weights_only=True) for run in (tmp_path / "run_a", run_b)]  # fmt: skip
    assert states[0].keys() == states[1].keys() and "u_query" in states[0]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert int(states[0]["steps"]) == 4 and bool((states[0]["u_query"] > 0).any())
