"""The ring loss: InfoNCE (with its options) over the global batch of a torch.distributed group.

Each of W ranks holds its own queries and candidates.  Queries stay put; candidate blocks (and
their ids) travel around the ring, rank r -> r + 1, with point-to-point ops.  At step t rank r
computes its queries against the block that started on rank r - t, with the same tile backend
as one device (`torch_tiles` or `triton_tiles`: two-level tiling), while the next block is
already in flight.  Row logsumexps merge with logaddexp, so after W steps every query has seen
every candidate and no rank ever holds more than two foreign blocks.  InfoNCE's passes
(`retriever.loss.passes`) run through `ring_passes.RingRunner`; the sigmoid loss's blocks
through the block ring below.

Backward runs the ring again.  dq accumulates locally; each block's fp32 candidate gradient
follows one step behind the block (sent while the next block is computed) and after W steps
reaches its owner.  Per step a rank sends one block of Bd_r x D in forward, and a block plus
its fp32 gradient in backward.

Gradient convention (the one that makes DDP exact): the value returned on a rank is the mean
loss over its own queries, but the gradients it produces are W times those of the global-batch
loss (the mean over all ranks' queries) with respect to this rank's rows.  DDP averages
parameter gradients over ranks, so the average is exactly the gradient of the loss on the
concatenated batch, even when ranks hold different numbers of queries.  A learnable scale
receives the gradient of the global loss itself on every rank (it is replicated; DDP's average
leaves it unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist
from torch import Tensor

from retriever.loss.inputs import (
    check_inputs,
    check_owners,
    check_prefixes,
    resolve_impl,
    scale_tensor,
    sigmoid_backend,
    tile_backend,
)
from retriever.loss.objective import Objective
from retriever.loss.passes import ObjectiveEngine, Prefixes, make_layout
from retriever.loss.ring_agreement import FIELDS, agree, local_meta, setting_bits
from retriever.loss.ring_passes import Geometry, RingRunner
from retriever.loss.ring_transport import Ring


def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for n in sizes:
        out.append(total)
        total += n
    return out


# -- the block ring: a block backend's rows (the sigmoid loss) ---------------------------------


@dataclass
class _Plan:
    """Everything the block ring needs besides the embeddings and the scale."""

    ring: Ring
    backend: ModuleType
    labels: Tensor  # [Bq] global column of each query's positive
    ids: Tensor | None  # [Bd] local candidate ids
    query_sizes: list[int]  # Bq of every rank
    candidate_sizes: list[int]  # Bd of every rank
    scale_grad: bool  # some rank learns the scale: every rank joins its all_reduce
    per_row: bool = False  # return each local row's loss, not their mean

    def block_spec(self, src: int, dim: int, dtype: torch.dtype) -> list:
        """Shapes and dtypes of the block (and ids) that started on rank `src`."""
        spec = [((self.candidate_sizes[src], dim), dtype)]
        if self.ids is not None:
            spec.append(((self.candidate_sizes[src],), torch.int64))
        return spec


def _ring_forward(plan: _Plan, rows: Tensor, block: Tensor, scale: Tensor) -> tuple:
    """Each row's statistic over every rank's block (merged as the backend says) and its
    positive's logit; both fp32 [rows]."""
    ring, backend = plan.ring, plan.backend
    offsets = _offsets(plan.candidate_sizes)
    stat = torch.full((rows.shape[0],), backend.EMPTY_ROW, device=rows.device)
    pos = torch.zeros(rows.shape[0], device=rows.device)
    ids = plan.ids
    pos_ids = None if ids is None else ids[plan.labels - offsets[ring.rank]]
    for step in range(ring.world):
        src = (ring.rank - step) % ring.world
        transfer = None
        if step < ring.world - 1:  # post the next block before computing on this one
            payload = [block] if ids is None else [block, ids]
            spec = plan.block_spec((src - 1) % ring.world, block.shape[1], block.dtype)
            transfer = ring.shift(payload, spec)
        blk_stat, blk_pos = backend.forward_block(
            rows, block, scale, plan.labels - offsets[src], pos_ids, ids
        )
        stat = backend.merge_rows(stat, blk_stat)
        pos += blk_pos
        if transfer is not None:
            block, *rest = transfer.wait()
            ids = rest[0] if rest else None
    return stat, pos


def _ring_backward(
    plan: _Plan, rows: Tensor, block: Tensor, scale: Tensor, stat: Tensor, weight: Tensor,
    d_rows: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Gradients of sum_i weight_i * loss_i: added into `d_rows` (fp32) for the rows; returned
    for this rank's own block (fp32, summed over every rank's rows) and for the scale (this
    rank's rows only)."""
    ring, dim = plan.ring, rows.shape[1]
    offsets = _offsets(plan.candidate_sizes)
    dscale = torch.zeros(scale.shape, dtype=torch.float32, device=rows.device)
    ids = plan.ids
    pos_ids = None if ids is None else ids[plan.labels - offsets[ring.rank]]
    carried = None  # the finished gradient of the block computed in the previous step
    for step in range(ring.world):
        src = (ring.rank - step) % ring.world
        sends, spec = [], []
        if step < ring.world - 1:  # prefetch the next block
            sends += [block] if ids is None else [block, ids]
            spec += plan.block_spec((src - 1) % ring.world, dim, block.dtype)
        if step > 0:
            # The previous block's gradient goes on to the rank that computes on it now; this
            # block's gradient so far (from the ranks before us) comes in meanwhile.
            sends.append(carried)
            spec.append(((plan.candidate_sizes[src], dim), torch.float32))
        transfer = ring.shift(sends, spec) if sends else None
        partial = torch.zeros((plan.candidate_sizes[src], dim), dtype=torch.float32,
                              device=rows.device)  # fmt: skip
        dscale += plan.backend.backward_block(
            rows, block, scale, stat, weight, plan.labels - offsets[src], pos_ids, ids, d_rows,
            partial,
        )  # fmt: skip
        if transfer is not None:
            received = transfer.wait()
            if step > 0:
                partial += received.pop()
            if step < ring.world - 1:
                block, *rest = received
                ids = rest[0] if rest else None
        carried = partial
    if ring.world == 1:
        return carried, dscale
    # The last block's gradient is complete; one more hop takes it home, and ours comes back.
    (own,) = ring.shift([carried], [((plan.candidate_sizes[ring.rank], dim), torch.float32)]).wait()
    return own, dscale


class RingLoss(torch.autograd.Function):
    """A block backend's local mean loss over the global batch (or, with ``plan.per_row``, each
    local row's loss); backward follows the DDP convention."""

    @staticmethod
    def forward(ctx, queries: Tensor, candidates: Tensor, scale: Tensor, plan: _Plan) -> Tensor:
        queries, candidates = queries.contiguous(), candidates.contiguous()
        scale_value = scale.detach().float()
        stat, pos = _ring_forward(plan, queries, candidates, scale_value)
        ctx.save_for_backward(queries, candidates, scale_value, stat)
        ctx.plan = plan
        return stat - pos if plan.per_row else (stat - pos).mean()

    @staticmethod
    def backward(ctx, grad: Tensor):
        queries, candidates, scale, stat = ctx.saved_tensors
        plan: _Plan = ctx.plan
        # Every row of the global batch weighs 1 / N in the global loss; W times that is the
        # DDP convention.  Not the autograd of the local mean, whose weight 1 / Bq_local would
        # differ from rank to rank.
        factor = plan.ring.world if plan.per_row else plan.ring.world / sum(plan.query_sizes)
        weight = (grad.detach().float() * factor).expand(queries.shape[0]).contiguous()
        dq = torch.zeros(queries.shape, dtype=torch.float32, device=queries.device)
        dc, dscale = _ring_backward(plan, queries, candidates, scale, stat, weight, dq)
        if plan.scale_grad:
            # Each rank's part carries the factor W; the sum over ranks / W is dL_global/ds.
            dscale = plan.ring.all_reduce_sum(dscale) / plan.ring.world
        return (
            dq.to(queries.dtype),
            dc.to(candidates.dtype),
            dscale if ctx.needs_input_grad[2] else None,
            None,
        )


# -- InfoNCE and its options -------------------------------------------------------------------


@dataclass
class _ObjectivePlan:
    engine: ObjectiveEngine
    ring: Ring
    n_total: int  # queries of the global batch
    scale_grad: bool
    per_row: bool


class RingObjective(torch.autograd.Function):
    """Per prefix, this rank's mean loss over its queries ([NP]; with ``per_row`` each row's,
    [NP, Bq]), each against the global batch; backward follows the DDP convention."""

    @staticmethod
    def forward(ctx, queries: Tensor, candidates: Tensor, scale: Tensor, plan) -> Tensor:
        queries, candidates = queries.contiguous(), candidates.contiguous()
        scale_value = scale.detach().float()
        losses, saved = plan.engine.forward(queries, candidates, scale_value)
        ctx.save_for_backward(queries, candidates, scale_value)
        ctx.plan, ctx.state = plan, saved
        return losses if plan.per_row else losses.mean(dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        queries, candidates, scale = ctx.saved_tensors
        plan: _ObjectivePlan = ctx.plan
        world = plan.ring.world
        if plan.per_row:  # the caller weighs each row; W times its weight
            weights = grad.float() * world
        else:  # every row of the global batch weighs 1 / N: W / N per local row
            weights = (grad.float() * world / plan.n_total)[:, None].expand(-1, queries.shape[0])
        dq, dc, dscale = plan.engine.backward(queries, candidates, scale, ctx.state, weights)
        if plan.scale_grad:
            # Each rank's part carries the factor W; the sum over ranks / W is dL_global/ds.
            dscale = plan.ring.all_reduce_sum(dscale) / world
        return (
            dq.to(queries.dtype),
            dc.to(candidates.dtype),
            dscale if ctx.needs_input_grad[2] else None,
            None,
        )


def _objective_plan(
    ring: Ring, table: list[dict[str, int]], backend: ModuleType, objective: Objective,
    prefixes: Prefixes, layout, reduction: str,
) -> _ObjectivePlan:  # fmt: skip
    """The engine of this rank's share, its passes' columns laid out over the ranks."""
    query_sizes = [row["n_queries"] for row in table]
    candidate_sizes = [row["n_candidates"] for row in table]
    q_offsets, c_offsets = _offsets(query_sizes), _offsets(candidate_sizes)
    layout.query_offset, layout.candidate_offset = q_offsets[ring.rank], c_offsets[ring.rank]
    if layout.owners is not None:  # owners become global query indices
        layout.owners = torch.where(layout.owners >= 0, layout.owners + layout.query_offset, -1)
    none = [0] * ring.world
    geometry = {
        "qd": Geometry(candidate_sizes, [row["stat_cols"] for row in table]),
        "qq": Geometry(query_sizes, none),
        "dd": Geometry(candidate_sizes, none),
    }
    engine = ObjectiveEngine(objective, prefixes, layout, RingRunner(ring, backend, geometry))
    return _ObjectivePlan(
        engine, ring, sum(query_sizes), any(row["scale_grad"] for row in table),
        reduction == "none",
    )  # fmt: skip


def ring_loss(
    queries: Tensor,
    candidates: Tensor,
    *,
    scale: float | Tensor,
    labels: Tensor | None,
    candidate_ids: Tensor | None,
    group: dist.ProcessGroup,
    impl: str,
    objective: Objective | None = None,
    candidate_owners: Tensor | None = None,
    matryoshka: tuple = (None, None, True),
    reduction: str = "mean",
    kind: str = "infonce",
) -> Tensor:
    r"""InfoNCE over the global batch of `group`: every rank's queries against every rank's
    candidates, without any rank holding all candidates.  Called by
    ``contrastive_loss(..., group=group)``; arguments as there, all local to this rank
    (``objective`` its options, ``matryoshka`` its (dims, weights, normalize)).
    ``reduction="none"``: each local query's loss [Bq] (no prefixes), whose gradient weights
    the caller sets (W times each is used, the convention below). ``kind="sigmoid"``: the
    sigmoid loss's blocks (`sigmoid_tiles`) instead, ``scale`` its [t, b] tensor
    (`retriever.loss.sigmoid`).

    Every rank of `group` must call it (and, when gradients are needed, call backward) with the
    same D, dtype, scale, options and presence of `candidate_ids`; Bq and Bd may differ.
    Rank r's candidate j has the global index (Bd_0 + ... + Bd_{r-1}) + j, and its query
    ``candidate_owners[j]`` the global index (Bq_0 + ... + Bq_{r-1}) + that.  A rank whose
    inputs are invalid, or ranks that disagree, make every rank raise the same ValueError.

    Returns:
        The mean loss over this rank's queries (0-dim fp32; summed over Matryoshka prefixes
        with their weights).  Its gradients follow the DDP convention: every rank's embedding
        gradients are W times the gradient of the global loss (the mean over all N queries of
        all ranks) with respect to its own rows, so DDP's average of parameter gradients
        equals the single-process gradient on the concatenated batch.  A scale tensor that
        requires grad gets dL_global/ds on every rank.  The global loss is
        sum_r Bq_r * value_r / N (the plain mean of the values when all Bq are equal).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "group=... needs torch.distributed to be initialised (init_process_group first)"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(
            f"group must be a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD)"
            f", got {type(group).__name__}"
        )
    device = next(
        (t.device for t in (queries, candidates) if isinstance(t, Tensor)), torch.device("cpu")
    )
    objective = objective or Objective()
    ring = Ring(group, device)
    meta, error, layout, prefixes = [0] * len(FIELDS), None, None, None
    try:
        check_inputs(queries, candidates, labels, candidate_ids)
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        resolved = resolve_impl(impl, 0, 0, device, tiled=True)
        if kind == "sigmoid":
            backend, scale_t = sigmoid_backend(resolved), scale
        else:
            backend, scale_t = tile_backend(resolved), scale_tensor(scale, device)
            prefixes = Prefixes(*check_prefixes(*matryoshka, queries.shape[1]))
            n_q, n_c = queries.shape[0], candidates.shape[0]
            owners = check_owners(candidate_owners, labels, n_q, n_c)
            layout = make_layout(objective, n_q, n_c, labels, candidate_ids, owners, device)
        settings = setting_bits(kind, objective, prefixes)
        meta = local_meta(queries, candidates, scale_t, candidate_ids, settings,
                          0 if layout is None else layout.stat_cols)  # fmt: skip
    except (ValueError, RuntimeError) as exc:
        error = str(exc)
    table = agree(ring, meta, error)

    if kind == "sigmoid":
        offset = _offsets([row["n_candidates"] for row in table])[ring.rank]
        local = torch.arange(queries.shape[0], device=device) if labels is None else labels.long()
        plan = _Plan(
            ring=ring,
            backend=backend,
            labels=local + offset,
            ids=None if candidate_ids is None else candidate_ids.long(),
            query_sizes=[row["n_queries"] for row in table],
            candidate_sizes=[row["n_candidates"] for row in table],
            scale_grad=any(row["scale_grad"] for row in table),
            per_row=reduction == "none",
        )
        return RingLoss.apply(queries, candidates, scale_t, plan)
    plan = _objective_plan(ring, table, backend, objective, prefixes, layout, reduction)
    out = RingObjective.apply(queries, candidates, scale_t, plan)
    if reduction == "none":
        return out[0]
    return (out * torch.tensor(prefixes.weights, device=out.device)).sum()
