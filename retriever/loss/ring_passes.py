"""The ring's `Runner` for InfoNCE and its options: each pass of `retriever.loss.passes` over
the global batch of a process group.

A pass's rows stay on their rank; its columns (with their ids, owners, thresholds, prefix
norms) travel around the ring, rank r -> r + 1, and every rank computes its rows against every
block with its tile backend, the next block already in flight. Row statistics merge with
logaddexp. A block's column statistics (doc_to_query's softmax) are summed over every rank's
rows: they follow one step behind the block, each rank merging its share, and one last hop
takes them home. The backward runs the ring again: the block travels with its columns'
softmax coefficients, and its fp32 gradient (and per-column dot sums) follow one step behind
it, as the statistics did. The ring has no self passes: query_to_query and doc_to_doc are
computed in full (every pair from both ends).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType

import torch
from torch import Tensor

from retriever.loss.ring_transport import Ring
from retriever.loss.tile_pass import Coefs, PassStats, Stats, TilePass, empty_stats


@dataclass
class Geometry:
    """Where each rank's block of a pass's columns lies in the global batch."""

    sizes: list[int]  # columns of each rank's block
    stats: list[int]  # of those, how many (the first) have column statistics

    @property
    def offsets(self) -> list[int]:
        out, total = [], 0
        for n in self.sizes:
            out.append(total)
            total += n
        return out


def _stats_spec(n_p: int, n: int, counts: bool) -> list[tuple[tuple, torch.dtype]]:
    return [((n_p, n), torch.float32)] * (3 if counts else 1)


def _coefs_tensors(coefs: Coefs) -> list[Tensor]:
    return [t for t in (coefs.lse, coefs.p, coefs.u) if t is not None]


class RingRunner:
    """Passes over the global batch of ``ring``'s group (`retriever.loss.passes.Runner`)."""

    self_passes = False

    def __init__(self, ring: Ring, backend: ModuleType, geometry: dict[str, Geometry]) -> None:
        self.ring, self.backend, self.geometry = ring, backend, geometry

    def _travel(
        self,
        name: str,
        tp: TilePass,
        block: list[Tensor],
        block_spec: Callable[[int], list],
        compute: Callable[[int, list[Tensor]], list[Tensor]],
        merge: Callable[[list[Tensor], list[Tensor]], list[Tensor]],
        partial_spec: Callable[[int], list],
    ) -> list[Tensor]:
        """Send ``block`` around the ring; at each step ``compute(src, block)`` gives this rank's
        share of the block's partial result, ``merge``d with the share of the ranks before (it
        follows one step behind the block). Returns this rank's own block's complete result."""
        ring = self.ring
        carried: list[Tensor] = []
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            sends, spec = [], []
            if step < ring.world - 1:  # post the next block before computing on this one
                sends += block
                spec += block_spec((src - 1) % ring.world)
            n_block = len(spec)
            if step > 0 and carried:
                # The previous block's result goes on to the rank that computes on it now; this
                # block's result so far (from the ranks before us) comes in meanwhile.
                sends += carried
                spec += partial_spec(src)
            transfer = ring.shift(sends, spec) if sends else None
            partial = compute(src, block)
            if transfer is not None:
                received = transfer.wait()
                if len(received) > n_block:
                    partial = merge(partial, received[n_block:])
                if n_block:
                    block = received[:n_block]
            carried = partial
        if ring.world == 1 or not carried:
            return carried
        # The last block's result is complete; one more hop takes it home, and ours comes back.
        return ring.shift(carried, partial_spec(ring.rank)).wait()

    def _at(self, tp: TilePass, src: int, geo: Geometry, block: list[Tensor]) -> TilePass:
        """The pass of this rank's rows against the block that started on rank ``src``."""
        col = tp.col.arriving(block, geo.stats[src])
        row = replace(tp.row, target=tp.row.target - geo.offsets[src])
        return replace(tp, row=row, col=col)

    def forward(self, name: str, tp: TilePass, scale: Tensor) -> PassStats:
        geo, n_p = self.geometry[name], tp.n_prefixes
        n_rows, device = tp.row.rows.shape[0], tp.row.rows.device
        rows = [empty_stats(n_p, n_rows, tp.counts, device)]
        pos = torch.zeros(n_p, n_rows, device=device)
        with_cols = tp.col.n_stats > 0

        def compute(src: int, block: list[Tensor]) -> list[Tensor]:
            nonlocal pos
            stats = self.backend.forward_pass(self._at(tp, src, geo, block), scale)
            rows[0] = rows[0].merge(stats.rows)
            pos = pos + stats.pos
            return stats.cols.tensors() if with_cols else []

        def merge(ours: list[Tensor], theirs: list[Tensor]) -> list[Tensor]:
            return Stats(*ours).merge(Stats(*theirs)).tensors()

        home = self._travel(
            name, tp, tp.col.travelling(),
            lambda src: tp.col.specs(geo.sizes[src], geo.stats[src]), compute, merge,
            lambda src: _stats_spec(n_p, geo.stats[src], tp.counts),
        )  # fmt: skip
        return PassStats(rows[0], pos, Stats(*home) if with_cols else None)

    def backward(
        self,
        name: str,
        tp: TilePass,
        scale: Tensor,
        row_coefs: Coefs,
        col_coefs: Coefs | None,
        d_rows: Tensor,
        d_cols: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """As the backends' backward_pass, over every rank's columns: ``d_rows`` gets this
        rank's rows' gradients; ``d_cols`` this rank's columns', summed over every rank's rows;
        the column dot sums likewise."""
        geo, n_p, dim = self.geometry[name], tp.n_prefixes, tp.col.cols.shape[1]
        device = tp.row.rows.device
        row_dots = torch.zeros(n_p, tp.row.rows.shape[0], device=device)
        with_cols = col_coefs is not None
        travelling = tp.col.travelling()
        n_side = len(travelling)
        if with_cols:
            travelling += _coefs_tensors(col_coefs)
        n_coefs = len(travelling) - n_side

        def block_spec(src: int) -> list:
            spec = tp.col.specs(geo.sizes[src], geo.stats[src])
            return spec + [((n_p, geo.stats[src]), torch.float32)] * n_coefs

        def compute(src: int, block: list[Tensor]) -> list[Tensor]:
            nonlocal row_dots
            cc = None
            if with_cols:
                lse, p, *u = block[n_side:]
                cc = Coefs(lse, p, u[0] if u else None)
            part = torch.zeros((geo.sizes[src], dim), dtype=torch.float32, device=device)
            dots_r, dots_c = self.backend.backward_pass(
                self._at(tp, src, geo, block[:n_side]), scale, row_coefs, cc, d_rows, part
            )
            row_dots = row_dots + dots_r
            return [part, dots_c]

        own = self._travel(
            name, tp, travelling, block_spec, compute,
            lambda ours, theirs: [a + b for a, b in zip(ours, theirs)],
            lambda src: [((geo.sizes[src], dim), torch.float32), ((n_p, geo.sizes[src]),
                                                                   torch.float32)],
        )  # fmt: skip
        d_cols += own[0]
        return row_dots, own[1]
