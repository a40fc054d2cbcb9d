"""What the ranks of the ring agree on before any block moves: every rank's sizes and settings,
gathered in one all_gather.  A rank whose inputs are invalid, or ranks that disagree, make every
rank raise the same ValueError, so that no rank is left waiting in a collective the others skip.
"""

from __future__ import annotations

import struct
import zlib

import torch
from torch import Tensor

from retriever.loss.inputs import FLOAT_DTYPES
from retriever.loss.ring_transport import Ring

# What every rank tells the others before any block moves (one int64 per field).
FIELDS = (
    "ok",
    "n_queries",
    "n_candidates",
    "dim",
    "dtype",
    "has_ids",
    "settings",
    "stat_cols",
    "needs_grad",
    "scale_grad",
    "scale_bits",
)
_DTYPE_CODES = {dtype: code for code, dtype in enumerate(FLOAT_DTYPES)}
_MESSAGE_BYTES = 1024


def _float_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _scale_bits(scale_t: Tensor) -> int:
    """The scale's float bits (the sigmoid loss's [t, b]: both, xor-ed), compared across ranks."""
    bits = 0
    for value in scale_t.detach().flatten().tolist():
        bits ^= _float_bits(value)
    return bits


def setting_bits(kind: str, objective, prefixes) -> int:
    """The loss's settings (which loss, its options, its Matryoshka prefixes) as one number,
    the same on every rank that has the same settings."""
    text = repr((kind, objective, prefixes)).encode()
    return zlib.crc32(text)


def local_meta(queries, candidates, scale_t, candidate_ids, settings, stat_cols) -> list[int]:
    """This rank's row of the table `agree` exchanges, one value per field of FIELDS;
    ``stat_cols``: the leading candidates that are positives (doc_to_query's columns)."""
    wants_grad = any(
        isinstance(t, Tensor) and t.requires_grad for t in (queries, candidates, scale_t)
    )
    return [
        1,
        queries.shape[0],
        candidates.shape[0],
        queries.shape[1],
        _DTYPE_CODES[queries.dtype],
        int(candidate_ids is not None),
        settings,
        stat_cols,
        int(torch.is_grad_enabled() and wants_grad),
        int(torch.is_grad_enabled() and scale_t.requires_grad),
        _scale_bits(scale_t),
    ]


def _by_value(column: list[int], show=str) -> str:
    groups: dict[int, list[int]] = {}
    for rank, value in enumerate(column):
        groups.setdefault(value, []).append(rank)
    return "; ".join(f"{show(v)} on ranks {ranks}" for v, ranks in groups.items())


def _mismatch(table: list[dict[str, int]]) -> str | None:
    """What the ranks disagree on, described the same way on every rank (None if nothing)."""
    dtypes = {code: str(dtype) for dtype, code in _DTYPE_CODES.items()}
    checks = (
        ("dim", "the embedding size D differs across ranks", str),
        ("dtype", "the embedding dtype differs across ranks", dtypes.get),
        (
            "has_ids",
            "candidate_ids must be given on every rank or on none",
            ("absent", "given").__getitem__,
        ),
        (
            "settings",
            "the loss's options (symmetric, directions, partition_mode, hardness, margin, debias, "
            "label_smoothing, matryoshka) must be the same on every rank",
            lambda v: f"settings {v:08x}",
        ),
        (
            "needs_grad",
            "every rank must compute gradients (and call backward) or none",
            ("no gradients", "gradients").__getitem__,
        ),
        (
            "scale_bits",
            "scale must be the same on every rank",
            lambda v: repr(struct.unpack("<f", struct.pack("<i", v))[0]),
        ),
    )
    for field, what, show in checks:
        column = [row[field] for row in table]
        if len(set(column)) > 1:
            return f"{what}: {_by_value(column, show)}"
    return None


def agree(ring: Ring, meta: list[int], error: str | None) -> list[dict[str, int]]:
    """Exchange every rank's sizes and settings; raise the same ValueError on every rank when
    any rank's inputs are invalid or the ranks disagree, so that no rank is left waiting."""
    table_t = ring.all_gather(torch.tensor(meta, dtype=torch.int64, device=ring.device))
    table = [dict(zip(FIELDS, row)) for row in table_t.tolist()]
    failed = [rank for rank, row in enumerate(table) if not row["ok"]]
    if failed:
        # Every rank knows someone failed, so every rank joins this second exchange.
        text = (error or "").encode()[:_MESSAGE_BYTES]
        buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
        buf[: len(text)] = torch.tensor(list(text), dtype=torch.uint8)
        messages = ring.all_gather(buf.to(ring.device)).cpu()
        texts = [bytes(row.tolist()).rstrip(b"\0").decode(errors="replace") for row in messages]
        details = "; ".join(f"rank {r}: {texts[r]}" for r in failed)
        raise ValueError(f"contrastive_loss(group=...): invalid inputs on {details}")
    mismatch = _mismatch(table)
    if mismatch is not None:
        raise ValueError(f"contrastive_loss(group=...): {mismatch}")
    return table
