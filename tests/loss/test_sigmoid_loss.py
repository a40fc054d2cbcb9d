"""The sigmoid loss (tiled PyTorch, Triton under the interpreter, the full-logits path, the ring)
against the float64 reference, within the rounding-error model of tests/objective_reference.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from objective_reference import precision, reference_sigmoid, sigmoid_bounds
from ring_cases import launch

from retriever.loss.sigmoid import SigmoidLoss, sigmoid_loss


def _case(seed: int, n_q: int, n_d: int, dim: int, ids: bool):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n_q, dim, generator=g), dim=1)
    d = torch.nn.functional.normalize(torch.randn(n_d, dim, generator=g), dim=1)
    labels = torch.randperm(n_d, generator=g)[:n_q]
    cand_ids = torch.randint(0, max(2, n_d // 2), (n_d,), generator=g) if ids else None
    return q, d, labels, cand_ids


def _errors(q, d, labels, ids, t, b, impl, dtype=torch.float32, perturb=0.0):
    """Each quantity's error against float64, as a fraction of its bound (<= 1 passes)."""
    q, d = q.to(dtype), d.to(dtype)
    q_in, d_in = q.clone().requires_grad_(), d.clone().requires_grad_()
    t_in = torch.tensor(t, requires_grad=True)
    b_in = torch.tensor(b + perturb, requires_grad=True)
    loss = sigmoid_loss(q_in, d_in, scale=t_in, bias=b_in, labels=labels, candidate_ids=ids,
                        impl=impl)  # fmt: skip
    loss.backward()
    q64, d64 = q.double().requires_grad_(), d.double().requires_grad_()
    t64 = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    b64 = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    want = reference_sigmoid(q64, d64, t64, b64, labels, ids)
    want.backward()
    bound, bias_bound = sigmoid_bounds(q, d, t, b, labels, ids, **precision(dtype, impl))
    got = {"loss": loss, "dq": q_in.grad, "dd": d_in.grad, "dscale": t_in.grad, "db": b_in.grad}
    ref = {"loss": want, "dq": q64.grad, "dd": d64.grad, "dscale": t64.grad, "db": b64.grad}
    allowed = {**vars(bound), "db": bias_bound}
    return {k: float((got[k].detach().double() - ref[k]).norm()) / allowed[k] for k in got}


@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
@pytest.mark.parametrize("shape", [(37, 80, 40, True), (5, 5, 3, False), (64, 130, 24, True)])
def test_matches_float64_within_the_error_model(impl, shape):
    q, d, labels, ids = _case(0, *shape)
    errors = _errors(q, d, labels, ids, t=7.0, b=-3.0, impl=impl)
    assert max(errors.values()) <= 1.0, errors


def test_bf16_kernels_within_the_error_model():
    q, d, labels, ids = _case(1, 40, 96, 32, True)
    errors = _errors(q, d, labels, ids, t=10.0, b=-10.0, impl="triton", dtype=torch.bfloat16)
    assert max(errors.values()) <= 1.0, errors


def test_triton_runs_inputs_past_32_bit_offsets_in_pieces(monkeypatch):
    # Real inputs pass 2^31 elements at 1M candidates x 7 negatives x D = 768: the sigmoid
    # kernels' offsets are 32-bit, so larger inputs run in pieces. A limit of 50 rows makes
    # queries and candidates both split.
    from retriever.loss import triton_tiles

    monkeypatch.setattr(triton_tiles, "MAX_BLOCK_ELEMENTS", 50 * 16)
    q, d, labels, ids = _case(5, 64, 130, 16, True)
    errors = _errors(q, d, labels, ids, t=7.0, b=-3.0, impl="triton")
    assert max(errors.values()) <= 1.0, errors


def test_a_defect_is_far_outside_the_bounds():
    """A bias off by 1e-3 (a small defect) already breaks the bounds: they can fail."""
    q, d, labels, ids = _case(2, 37, 80, 40, True)
    errors = _errors(q, d, labels, ids, t=7.0, b=-3.0, impl="torch", perturb=1e-3)
    assert max(errors.values()) > 10, errors


def test_module_learns_scale_and_bias_and_reports_its_config():
    q, d, labels, ids = _case(3, 8, 16, 8, True)
    loss_fn = SigmoidLoss(scale=10.0, bias=-10.0, learnable_scale=True)
    loss_fn(q, d, labels=labels, candidate_ids=ids).backward()
    assert loss_fn.log_scale.grad is not None and loss_fn.bias.grad is not None
    assert loss_fn.get_config_dict()["bias"] == -10.0
    with pytest.raises(ValueError, match="bias must be"):
        sigmoid_loss(q, d, bias=float("nan"))


def _ring_rank(rank, world, impl, results):
    """Rank `rank` of an uneven global batch (rank r: 2 + r queries, 5 + 3 r candidates)."""
    sizes_q = [2 + r for r in range(world)]
    sizes_d = [5 + 3 * r for r in range(world)]
    q, d, _, ids = _case(4, sum(sizes_q), sum(sizes_d), 16, True)
    q0, d0 = sum(sizes_q[:rank]), sum(sizes_d[:rank])
    local_q = q[q0 : q0 + sizes_q[rank]].clone().requires_grad_()
    local_d = d[d0 : d0 + sizes_d[rank]].clone().requires_grad_()
    labels = torch.arange(sizes_q[rank])  # each rank's positives first
    t = torch.tensor(7.0, requires_grad=True)
    b = torch.tensor(-3.0, requires_grad=True)
    loss = sigmoid_loss(local_q, local_d, scale=t, bias=b, labels=labels,
                        candidate_ids=ids[d0 : d0 + sizes_d[rank]], group=dist.group.WORLD,
                        impl=impl)  # fmt: skip
    loss.backward()
    # The global problem: query i's positive is its rank's candidate i.
    global_labels = torch.cat([torch.arange(n) + sum(sizes_d[:r]) for r, n in enumerate(sizes_q)])
    q64, d64 = q.double().requires_grad_(), d.double().requires_grad_()
    t64 = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    b64 = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    want = reference_sigmoid(q64, d64, t64, b64, global_labels, ids)
    want.backward()
    bound, bias_bound = sigmoid_bounds(q, d, 7.0, -3.0, global_labels, ids)
    rows = slice(q0, q0 + sizes_q[rank])
    cols = slice(d0, d0 + sizes_d[rank])
    errors = {
        # The DDP convention: W times the global gradient for this rank's rows; t and b get
        # the global gradient itself on every rank.
        "dq": float((local_q.grad.double() - world * q64.grad[rows]).norm()) / (world * bound.dq),
        "dd": float((local_d.grad.double() - world * d64.grad[cols]).norm()) / (world * bound.dd),
        "dscale": abs(float(t.grad) - float(t64.grad)) / bound.dscale,
        "db": abs(float(b.grad) - float(b64.grad)) / bias_bound,
    }
    total = torch.tensor([float(loss) * sizes_q[rank]])
    dist.all_reduce(total)
    errors["loss"] = abs(float(total) / sum(sizes_q) - float(want)) / bound.loss
    results[rank] = errors


@pytest.mark.parametrize("world, impl", [(2, "torch"), (3, "torch"), (2, "triton")])
def test_ring_matches_the_global_float64_loss(world, impl, tmp_path):
    results = torch.multiprocessing.Manager().dict()
    launch(_ring_rank, world, str(tmp_path / "init"), impl, results)
    for rank in range(world):
        assert max(results[rank].values()) <= 1.0, (rank, dict(results[rank]))
