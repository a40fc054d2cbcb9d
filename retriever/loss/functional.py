"""`contrastive_loss`: InfoNCE over a batch of queries and candidates, tiled so it scales.

This module checks the inputs, picks an implementation and assembles the loss; the tile math
lives in `torch_tiles` / `triton_tiles` and the autograd in `tiled`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch
from torch import Tensor

from retriever.loss import torch_tiles
from retriever.loss.naive import naive_row_losses
from retriever.loss.tiled import tiled_row_losses

IMPLS = ("auto", "naive", "torch", "triton")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# "auto" builds the logits below this many entries: one GEMM wins and the memory is small.
NAIVE_MAX_LOGITS = 1 << 22


def _triton_backend():
    try:
        return importlib.import_module("retriever.loss.triton_tiles")
    except ImportError as exc:  # no triton wheel on this platform
        raise RuntimeError(
            "impl='triton' needs the `triton` package (Linux); install it or use impl='torch'"
        ) from exc


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_inputs(
    queries: Tensor,
    candidates: Tensor,
    labels: Tensor | None,
    candidate_ids: Tensor | None,
) -> None:
    for name, t in (("queries", queries), ("candidates", candidates)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    n_queries, dim = queries.shape
    n_candidates = candidates.shape[0]
    if n_queries == 0:
        raise ValueError("queries is empty: the batch needs at least one query")
    if n_candidates == 0:
        raise ValueError("candidates is empty: the batch needs at least one candidate")
    if candidates.shape[1] != dim:
        raise ValueError(
            f"queries and candidates differ in embedding size: {dim} vs {candidates.shape[1]}"
        )
    if candidates.dtype != queries.dtype:
        raise ValueError(
            f"queries and candidates differ in dtype: {queries.dtype} vs {candidates.dtype}"
        )
    if candidates.device != queries.device:
        raise ValueError(
            f"queries and candidates are on different devices: {queries.device} vs "
            f"{candidates.device}"
        )
    if labels is None:
        if n_candidates < n_queries:
            raise ValueError(
                f"without labels, query i's positive is candidate i, so candidates ({n_candidates})"
                f" must be at least as many as queries ({n_queries}); pass labels otherwise"
            )
    else:
        _check_index_tensor("labels", labels, n_queries, queries.device)
        if bool(((labels < 0) | (labels >= n_candidates)).any()):
            raise ValueError(
                f"labels must index candidates, i.e. lie in [0, {n_candidates}); got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
    if candidate_ids is not None:
        _check_index_tensor("candidate_ids", candidate_ids, n_candidates, queries.device)


def _check_index_tensor(name: str, t: Tensor, length: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor (int64), got {t.dtype}")
    if t.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the embeddings are on {device}")


def _scale_tensor(scale: float | Tensor, device: torch.device) -> Tensor:
    if isinstance(scale, Tensor):
        if scale.dim() != 0:
            raise ValueError(
                f"scale must be a float or a 0-dim tensor, got shape {tuple(scale.shape)}"
            )
        # A CPU value is checked at no cost; reading a GPU one back would stall the stream.
        if scale.device.type == "cpu" and not bool(scale.detach() > 0):
            raise ValueError(f"scale must be > 0 (it is 1 / temperature), got {float(scale)}")
        return scale.to(device=device, dtype=torch.float32)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"scale must be a float or a 0-dim tensor, got {type(scale).__name__}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0 (it is 1 / temperature), got {scale}")
    return torch.tensor(float(scale), dtype=torch.float32, device=device)


def resolve_impl(impl: str, n_queries: int, n_candidates: int, device: torch.device) -> str:
    """The implementation `impl` stands for on this device and problem size."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if n_queries * n_candidates <= NAIVE_MAX_LOGITS:
            return "naive"
        return "triton" if device.type == "cuda" and _triton_usable(device) else "torch"
    if impl == "triton" and not _triton_usable(device):
        raise ValueError(
            "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on CPU)"
        )
    return impl


def row_losses(
    queries: Tensor,
    candidates: Tensor,
    scale: Tensor,
    labels: Tensor,
    row_pos_ids: Tensor | None,
    col_ids: Tensor | None,
    impl: str,
) -> Tensor:
    """Per-query InfoNCE losses [Bq] with an already-resolved implementation."""
    if impl == "naive":
        return naive_row_losses(queries, candidates, scale, labels, row_pos_ids, col_ids)
    backend = torch_tiles if impl == "torch" else _triton_backend()
    return tiled_row_losses(queries, candidates, scale, labels, row_pos_ids, col_ids, backend)


def contrastive_loss(
    queries: Tensor,
    candidates: Tensor,
    *,
    scale: float | Tensor = 20.0,
    labels: Tensor | None = None,
    candidate_ids: Tensor | None = None,
    symmetric: bool = False,
    group: object | None = None,
    impl: str = "auto",
) -> Tensor:
    r"""InfoNCE of queries against candidates, computed tile by tile.

    .. math::
        S_{ij} = s \langle q_i, d_j \rangle, \qquad
        L = \frac{1}{B_q} \sum_i \Big( \log \sum_j e^{S_{ij}} - S_{i, y_i} \Big)

    Args:
        queries: [Bq, D] float32, bfloat16 or float16. Need not be normalised.
        candidates: [Bd, D], same dtype and device. Usually positives first, then hard negatives.
        scale: s = 1 / temperature; a float or a 0-dim tensor. A tensor that requires grad
            receives its exact gradient (learnable temperature).
        labels: [Bq] int64, index in `candidates` of each query's positive. Default
            ``arange(Bq)`` (needs Bd >= Bq).
        candidate_ids: [Bd] int64, e.g. a hash of each candidate's text. Candidate j is left out
            of row i's denominator when ``candidate_ids[j] == candidate_ids[labels[i]]`` and
            ``j != labels[i]``: duplicates of the positive are not negatives. No [Bq, Bd] mask
            is built.
        symmetric: also add the positive-to-query direction (each positive's logsumexp over all
            queries) and return the average of both directions.
        group: a torch.distributed process group (e.g. ``torch.distributed.group.WORLD``):
            the loss over the global batch, every rank's queries against every rank's
            candidates, with candidate blocks passed around a ring (`retriever.loss.ring`).
            All arguments stay local; rank r's candidate j has the global index
            sum(Bd of ranks < r) + j.  The value is this rank's mean; its gradients are W times
            those of the global loss w.r.t. this rank's rows, so DDP's average is the
            single-process gradient (docs/ring.md).  None: this process's batch only.
        impl: "naive" (full logits), "torch" (tiled PyTorch), "triton" (fused kernels; CUDA,
            or CPU under TRITON_INTERPRET=1) or "auto" (naive for small batches, then triton on
            CUDA and torch elsewhere).

    Returns:
        The mean loss over queries, a 0-dim float32 tensor. Gradients reach the inputs in their
        own dtype; logits, logsumexp and accumulation are float32 throughout.
    """
    if group is not None:
        # Imported here: the single-process path never needs torch.distributed.  The ring checks
        # the inputs itself, after the ranks have exchanged sizes, so all ranks raise together.
        from retriever.loss.ring import ring_loss

        return ring_loss(
            queries,
            candidates,
            scale=scale,
            labels=labels,
            candidate_ids=candidate_ids,
            symmetric=symmetric,
            group=group,
            impl=impl,
        )
    _check_inputs(queries, candidates, labels, candidate_ids)
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    n_queries = queries.shape[0]
    device = queries.device
    impl = resolve_impl(impl, n_queries, candidates.shape[0], device)
    scale_t = _scale_tensor(scale, device)
    if labels is None:
        labels = torch.arange(n_queries, device=device)
    labels = labels.long()
    ids = None if candidate_ids is None else candidate_ids.long()
    pos_ids = None if ids is None else ids[labels]

    loss = row_losses(queries, candidates, scale_t, labels, pos_ids, ids, impl).mean()
    if not symmetric:
        return loss
    # Positive-to-query direction: row i is positive i against every query k; its own query
    # is the target and, with ids, queries whose positive duplicates positive i are masked out.
    # That is the same row loss with the roles swapped, so it reuses the same tiles.
    positives = candidates[labels]
    reverse = row_losses(
        positives, queries, scale_t, torch.arange(n_queries, device=device), pos_ids, pos_ids, impl
    )
    return (loss + reverse.mean()) / 2
