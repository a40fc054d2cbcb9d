"""Test support for the ring loss: random global batches split unevenly over ranks, an
independent float64 reference on the concatenated batch, and a launcher for gloo process groups.

Shared by tests/loss/test_ring.py (CPU) and tests/loss/test_ring_gpu.py (two processes on one GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from objective_reference import Options, option_bounds, reference_option_rows
from reference import U32, error_bounds, gamma, reference_row_losses
from torch import Tensor

from retriever.loss import contrastive_loss


@dataclass(frozen=True)
class Case:
    seed: int
    world: int
    dim: int = 8
    symmetric: bool = False
    ids: bool = False
    learnable_scale: bool = False
    labels: str = "perm"  # "perm": distinct positives; "repeat": shared ones; "none": default
    max_queries: int = 5
    scale: float = 5.0
    options: Options | None = None  # InfoNCE's options (tests/objective_reference.py)
    owners: bool = False  # give each candidate's query (candidate_owners)


@dataclass
class Batch:
    """The global batch: rank r owns query rows q_slices[r] and candidate rows c_slices[r]."""

    q: Tensor  # [N, D] fp32
    c: Tensor  # [M, D] fp32
    local_labels: list[Tensor | None]
    ids: Tensor | None  # [M] int64
    q_slices: list[slice]
    c_slices: list[slice]
    local_owners: list[Tensor | None] | None = None  # each candidate's local query, -1 none

    def global_owners(self) -> Tensor | None:
        if self.local_owners is None:
            return None
        parts = [
            torch.where(own >= 0, own + q.start, -1)
            for own, q in zip(self.local_owners, self.q_slices)
        ]
        return torch.cat(parts)

    def global_labels(self) -> Tensor:
        parts = []
        for r, lab in enumerate(self.local_labels):
            n = self.q_slices[r].stop - self.q_slices[r].start
            local = torch.arange(n) if lab is None else lab
            parts.append(local + self.c_slices[r].start)
        return torch.cat(parts)


def _slices(sizes: list[int]) -> list[slice]:
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def make_batch(case: Case) -> Batch:
    """Uneven Bq and Bd per rank (hard negatives: Bd usually > Bq), permuted or shared positives,
    and candidate ids drawn from a small range so duplicates occur within and across ranks."""
    g = torch.Generator().manual_seed(case.seed)
    n_q = torch.randint(1, case.max_queries + 1, (case.world,), generator=g).tolist()
    n_c, labels = [], []
    for bq in n_q:
        if case.labels == "repeat":  # Bd may be smaller than Bq: positives shared by queries
            bd = int(torch.randint(1, 2 * bq + 2, (), generator=g))
            labels.append(torch.randint(0, bd, (bq,), generator=g))
        else:
            bd = bq + int(torch.randint(0, 2 * bq + 1, (), generator=g))
            perm = torch.randperm(bd, generator=g)[:bq]
            labels.append(None if case.labels == "none" else perm)
        n_c.append(bd)
    q = torch.nn.functional.normalize(torch.randn(sum(n_q), case.dim, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(sum(n_c), case.dim, generator=g), dim=1)
    ids = None
    if case.ids:
        ids = torch.randint(0, max(2, sum(n_c) // 2), (sum(n_c),), generator=g)
    owners = None
    if case.owners:  # each positive is its query's; the other candidates a random one's or none
        owners = []
        for bq, bd, lab in zip(n_q, n_c, labels):
            own = torch.randint(-1, bq, (bd,), generator=g)
            own[torch.arange(bq) if lab is None else lab] = torch.arange(bq)
            owners.append(own)
    return Batch(q, c, labels, ids, _slices(n_q), _slices(n_c), owners)


def reference_global_loss(q, c, scale, labels, ids, symmetric) -> tuple[Tensor, Tensor]:
    """(global loss, per-row loss averaged over directions), both float64."""
    per_row = reference_row_losses(q, c, scale, labels, ids, symmetric)
    return per_row.mean(), per_row


def expected_for_rank(case: Case, batch: Batch, rank: int, device="cpu") -> dict[str, Tensor]:
    """What the ring must give on `rank`: its local mean, W x the global loss's gradients for
    its own rows, and the global loss's gradient for the scale."""
    q = batch.q.to(device, torch.float64).requires_grad_()
    c = batch.c.to(device, torch.float64).requires_grad_()
    scale = torch.tensor(case.scale, dtype=torch.float64, device=device, requires_grad=True)
    ids = None if batch.ids is None else batch.ids.to(device)
    if case.options is None:
        loss, per_row = reference_global_loss(
            q, c, scale, batch.global_labels().to(device), ids, case.symmetric
        )
    else:
        rows = reference_option_rows(q.cpu(), c.cpu(), scale.cpu(), batch.global_labels(),
                                     batch.ids, batch.global_owners(), case.options)  # fmt: skip
        weights = [w for _, w, _ in case.options.prefixes(q.shape[1])]
        per_row = (rows * torch.tensor(weights, dtype=torch.float64)[:, None]).sum(0)
        loss = per_row.mean()
    dq, dc, ds = torch.autograd.grad(loss, (q, c, scale))
    return {
        "loss": per_row[batch.q_slices[rank]].mean().detach(),
        "dq": case.world * dq[batch.q_slices[rank]],
        "dc": case.world * dc[batch.c_slices[rank]],
        "dscale": ds,
    }


def run_case(
    case: Case,
    group: dist.ProcessGroup,
    *,
    device: str = "cpu",
    impl: str = "torch",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Run the ring on this rank's share of `case`; return each quantity's error as a fraction of
    the bound the rounding-error model of tests/reference.py allows (<= 1 passes)."""
    rank = dist.get_rank(group)
    batch = make_batch(case)
    # The reference sees exactly the (rounded) inputs the ring gets.
    batch.q, batch.c = batch.q.to(dtype).float(), batch.c.to(dtype).float()
    q = batch.q[batch.q_slices[rank]].to(device, dtype).requires_grad_()
    c = batch.c[batch.c_slices[rank]].to(device, dtype).requires_grad_()
    labels = batch.local_labels[rank]
    ids = None if batch.ids is None else batch.ids[batch.c_slices[rank]].to(device)
    scale: float | Tensor = case.scale
    if case.learnable_scale:
        scale = torch.tensor(case.scale, device=device, requires_grad=True)
    owners = None if batch.local_owners is None else batch.local_owners[rank].to(device)
    options = {} if case.options is None else case.options.kwargs()
    loss = contrastive_loss(
        q,
        c,
        scale=scale,
        labels=None if labels is None else labels.to(device),
        candidate_ids=ids,
        candidate_owners=owners,
        symmetric=case.symmetric,
        group=group,
        impl=impl,
        **options,
    )
    loss.backward()
    want = expected_for_rank(case, batch, rank, device)
    got = {"loss": loss, "dq": q.grad, "dc": c.grad}
    if case.learnable_scale:
        got["dscale"] = scale.grad
    # The global problem's bounds; a rank's gradients are W times the global ones for its rows,
    # and merging W partial logsumexps adds g(W) to each row's lse.
    tf32 = impl == "triton" and device != "cpu" and dtype == torch.float32
    if case.options is None:
        bound = error_bounds(
            batch.q.to(dtype),
            batch.c.to(dtype),
            case.scale,
            batch.global_labels(),
            batch.ids,
            case.symmetric,
            tf32=tf32,
            gradient_slab_dtype=dtype if impl == "triton" else None,
        )
    else:
        sixteen = dtype in (torch.bfloat16, torch.float16)
        bound = option_bounds(
            batch.q.to(dtype), batch.c.to(dtype), case.scale, batch.global_labels(), batch.ids,
            batch.global_owners(), case.options, u_in=2.0**-11 if tf32 else 0.0,
            u_g=2.0**-8 if impl == "triton" and sixteen else 0.0, u_out=2.0**-8 if sixteen else U32,
        )  # fmt: skip
    allowed = {
        "loss": bound.loss + gamma(case.world),
        "dq": case.world * bound.dq,
        "dc": case.world * bound.dd,
        "dscale": bound.dscale,
    }
    return {
        name: float((value.detach().double().cpu() - want[name].detach().double().cpu()).norm())
        / allowed[name]
        for name, value in got.items()
    }


def launch(fn, world: int, init_file: str, *args) -> None:
    """Run fn(rank, world, *args) in `world` spawned processes joined in a gloo group."""
    torch.multiprocessing.spawn(
        _bootstrap, args=(fn, world, init_file, args), nprocs=world, join=True
    )


def _bootstrap(rank: int, fn, world: int, init_file: str, args: tuple) -> None:
    torch.set_num_threads(1)  # the machine's cores are shared by every rank
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),  # a hang becomes an error, not a stuck test run
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
