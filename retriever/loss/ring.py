"""The ring loss: InfoNCE over the global batch of a torch.distributed group.

Each of W ranks holds its own queries and candidates.  Queries stay put; candidate blocks (and
their ids) travel around the ring, rank r -> r + 1, with point-to-point ops.  At step t rank r
computes its queries against the block that started on rank r - t, with the same block backend
as one device (`torch_tiles` or `triton_tiles`: two-level tiling), while the next block is
already in flight.  Row logsumexps merge with logaddexp, so after W steps every query has seen
every candidate and no rank ever holds more than two foreign blocks.

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
    resolve_impl,
    scale_tensor,
    sigmoid_backend,
    tile_backend,
)
from retriever.loss.ring_agreement import FIELDS, agree, local_meta
from retriever.loss.ring_transport import Ring


@dataclass
class _Plan:
    """Everything the autograd Function needs besides the embeddings and the scale."""

    ring: Ring
    backend: ModuleType
    labels: Tensor  # [Bq] local index of each query's positive in this rank's candidates
    ids: Tensor | None  # [Bd] local candidate ids
    query_sizes: list[int]  # Bq of every rank
    candidate_sizes: list[int]  # Bd of every rank
    symmetric: bool
    scale_grad: bool  # some rank learns the scale: every rank joins its all_reduce
    per_row: bool = False  # return each local row's loss, not their mean


@dataclass
class _Direction:
    """One ring pass: `rows` stay, `block` (with `block_ids`) travels.  `labels` are global
    column indices; the block that started on rank r covers global columns
    offsets[r] .. offsets[r] + sizes[r]."""

    rows: Tensor
    labels: Tensor
    row_pos_ids: Tensor | None
    block: Tensor
    block_ids: Tensor | None
    sizes: list[int]
    offsets: list[int]

    def block_spec(self, src: int) -> list[tuple[tuple, torch.dtype]]:
        """Shapes and dtypes of the block (and ids) that started on rank `src`."""
        spec = [((self.sizes[src], self.block.shape[1]), self.block.dtype)]
        if self.block_ids is not None:
            spec.append(((self.sizes[src],), torch.int64))
        return spec

    def payload(self, block: Tensor, ids: Tensor | None) -> list[Tensor]:
        return [block] if ids is None else [block, ids]


def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for n in sizes:
        out.append(total)
        total += n
    return out


def _directions(queries: Tensor, candidates: Tensor, plan: _Plan) -> list[_Direction]:
    """The query-to-candidate pass and, when symmetric, the positive-to-query pass: the same
    ring with roles swapped (local positives are the rows, queries travel, a row's target is
    its own query, and a query whose positive shares the row's positive id is masked)."""
    rank = plan.ring.rank
    pos_ids = None if plan.ids is None else plan.ids[plan.labels]
    c_offsets = _offsets(plan.candidate_sizes)
    forward = _Direction(
        queries,
        plan.labels + c_offsets[rank],
        pos_ids,
        candidates,
        plan.ids,
        plan.candidate_sizes,
        c_offsets,
    )
    if not plan.symmetric:
        return [forward]
    q_offsets = _offsets(plan.query_sizes)
    own = torch.arange(queries.shape[0], device=queries.device) + q_offsets[rank]
    reverse = _Direction(
        candidates[plan.labels], own, pos_ids, queries, pos_ids, plan.query_sizes, q_offsets
    )
    return [forward, reverse]


def _ring_forward(plan: _Plan, d: _Direction, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Row lse over every rank's block and the positive logit; both fp32 [rows]. (For a
    backend of another objective, its row statistic, merged as that backend says.)"""
    ring, backend = plan.ring, plan.backend
    lse = torch.full((d.rows.shape[0],), backend.EMPTY_ROW, device=d.rows.device)
    pos = torch.zeros(d.rows.shape[0], device=d.rows.device)
    block, ids = d.block, d.block_ids
    for step in range(ring.world):
        src = (ring.rank - step) % ring.world
        transfer = None
        if step < ring.world - 1:  # post the next block before computing on this one
            transfer = ring.shift(d.payload(block, ids), d.block_spec((src - 1) % ring.world))
        blk_lse, blk_pos = backend.forward_block(
            d.rows, block, scale, d.labels - d.offsets[src], d.row_pos_ids, ids
        )
        lse = backend.merge_rows(lse, blk_lse)
        pos += blk_pos
        if transfer is not None:
            block, *rest = transfer.wait()
            ids = rest[0] if rest else None
    return lse, pos


def _ring_backward(
    plan: _Plan, d: _Direction, scale: Tensor, lse: Tensor, weight: Tensor, d_rows: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of sum_i weight_i * loss_i: added into `d_rows` (fp32) for the rows; returned
    for this rank's own block (fp32, summed over every rank's rows) and for the scale (this
    rank's rows only)."""
    ring = plan.ring
    dim = d.rows.shape[1]
    dscale = torch.zeros(scale.shape, dtype=torch.float32, device=d.rows.device)
    block, ids = d.block, d.block_ids
    carried = None  # the finished gradient of the block computed in the previous step
    for step in range(ring.world):
        src = (ring.rank - step) % ring.world
        sends, spec = [], []
        if step < ring.world - 1:  # prefetch the next block
            sends += d.payload(block, ids)
            spec += d.block_spec((src - 1) % ring.world)
        if step > 0:
            # The previous block's gradient goes on to the rank that computes on it now; this
            # block's gradient so far (from the ranks before us) comes in meanwhile.
            sends.append(carried)
            spec.append(((d.sizes[src], dim), torch.float32))
        transfer = ring.shift(sends, spec) if sends else None
        partial = torch.zeros((d.sizes[src], dim), dtype=torch.float32, device=d.rows.device)
        dscale += plan.backend.backward_block(
            d.rows,
            block,
            scale,
            lse,
            weight,
            d.labels - d.offsets[src],
            d.row_pos_ids,
            ids,
            d_rows,
            partial,
        )
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
    (own,) = ring.shift([carried], [((d.sizes[ring.rank], dim), torch.float32)]).wait()
    return own, dscale


class RingLoss(torch.autograd.Function):
    """The local mean loss over the global batch (or, with ``plan.per_row``, each local row's
    loss); backward follows the DDP convention."""

    @staticmethod
    def forward(ctx, queries: Tensor, candidates: Tensor, scale: Tensor, plan: _Plan) -> Tensor:
        queries, candidates = queries.contiguous(), candidates.contiguous()
        scale_value = scale.detach().float()
        lses, loss = [], torch.zeros((), device=queries.device)
        for d in _directions(queries, candidates, plan):
            lse, pos = _ring_forward(plan, d, scale_value)
            lses.append(lse)
            loss = loss + (lse - pos).mean()
        ctx.save_for_backward(queries, candidates, scale_value, *lses)
        ctx.plan = plan
        if plan.per_row:  # one direction (ring_loss refuses symmetric per-row losses)
            return lse - pos
        return loss / len(lses)

    @staticmethod
    def backward(ctx, grad: Tensor):
        queries, candidates, scale, *lses = ctx.saved_tensors
        plan: _Plan = ctx.plan
        directions = _directions(queries, candidates, plan)
        # Every row of the global batch weighs 1 / N in the global loss (halved per direction
        # when symmetric); W times that is the DDP convention.  Not the autograd of the local
        # mean, whose weight 1 / Bq_local would differ from rank to rank.
        n_total = sum(plan.query_sizes)
        factor = plan.ring.world / (n_total * len(directions))
        if plan.per_row:  # the caller weighs each row; W times its weight, as above
            factor = plan.ring.world
        weight = (grad.detach().float() * factor).expand(queries.shape[0]).contiguous()
        dq = torch.zeros(queries.shape, dtype=torch.float32, device=queries.device)
        dc, dscale = _ring_backward(plan, directions[0], scale, lses[0], weight, dq)
        if plan.symmetric:  # rows were candidates[labels]; the travelling block was the queries
            d_pos = torch.zeros(directions[1].rows.shape, dtype=torch.float32, device=dq.device)
            dq_block, ds = _ring_backward(plan, directions[1], scale, lses[1], weight, d_pos)
            dc.index_add_(0, plan.labels, d_pos)
            dq += dq_block
            dscale += ds
        if plan.scale_grad:
            # Each rank's part carries the factor W; the sum over ranks / W is dL_global/ds.
            dscale = plan.ring.all_reduce_sum(dscale) / plan.ring.world
        return (
            dq.to(queries.dtype),
            dc.to(candidates.dtype),
            dscale if ctx.needs_input_grad[2] else None,
            None,
        )


def ring_loss(
    queries: Tensor,
    candidates: Tensor,
    *,
    scale: float | Tensor,
    labels: Tensor | None,
    candidate_ids: Tensor | None,
    symmetric: bool,
    group: dist.ProcessGroup,
    impl: str,
    reduction: str = "mean",
    objective: str = "infonce",
) -> Tensor:
    r"""InfoNCE over the global batch of `group`: every rank's queries against every rank's
    candidates, without any rank holding all candidates.  Called by
    ``contrastive_loss(..., group=group)``; arguments as there, all local to this rank.
    ``reduction="none"``: each local query's loss [Bq] (not symmetric), whose gradient weights
    the caller sets (W times each is used, the convention below). ``objective="sigmoid"``: the
    sigmoid loss's blocks (`sigmoid_tiles`) instead, ``scale`` its [t, b] tensor
    (`retriever.loss.sigmoid`).

    Every rank of `group` must call it (and, when gradients are needed, call backward) with the
    same D, dtype, scale, `symmetric` and presence of `candidate_ids`; Bq and Bd may differ.
    Rank r's candidate j has the global index (Bd_0 + ... + Bd_{r-1}) + j.  A rank whose inputs
    are invalid, or ranks that disagree, make every rank raise the same ValueError.

    Returns:
        The mean loss over this rank's queries (0-dim fp32).  Its gradients follow the DDP
        convention: every rank's embedding gradients are W times the gradient of the global
        loss (the mean over all N queries of all ranks, averaged over both directions when
        symmetric) with respect to its own rows, so DDP's average of parameter gradients
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
    ring = Ring(group, device)
    meta, error = [0] * len(FIELDS), None
    try:
        check_inputs(queries, candidates, labels, candidate_ids)
        if not isinstance(symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {type(symmetric).__name__}")
        if reduction not in ("mean", "none") or (reduction == "none" and symmetric):
            raise ValueError(
                f"reduction must be 'mean' or, without symmetric, 'none': {reduction!r}"
            )
        resolved = resolve_impl(impl, 0, 0, device, tiled=True)
        if objective == "sigmoid":
            backend, scale_t = sigmoid_backend(resolved), scale
        else:
            backend, scale_t = tile_backend(resolved), scale_tensor(scale, device)
        meta = local_meta(queries, candidates, scale_t, candidate_ids, symmetric)
    except (ValueError, RuntimeError) as exc:
        error = str(exc)
    table = agree(ring, meta, error)

    if labels is None:
        labels = torch.arange(queries.shape[0], device=device)
    plan = _Plan(
        ring=ring,
        backend=backend,
        labels=labels.long(),
        ids=None if candidate_ids is None else candidate_ids.long(),
        query_sizes=[row["n_queries"] for row in table],
        candidate_sizes=[row["n_candidates"] for row in table],
        symmetric=symmetric,
        scale_grad=any(row["scale_grad"] for row in table),
        per_row=reduction == "none",
    )
    return RingLoss.apply(queries, candidates, scale_t, plan)
