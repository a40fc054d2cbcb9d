"""What both paths of the loss (one process, and the ring across processes) check and resolve
before any math: the inputs, the scale, and which implementation and tile backend to run.

The Triton backend is imported here, lazily, only when it is the one chosen: importing the loss
never needs triton.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from retriever.loss.triton_mode import triton_usable

IMPLS = ("auto", "naive", "torch", "triton")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# "auto" builds the logits below this many entries: one GEMM wins and the memory is small.
NAIVE_MAX_LOGITS = 1 << 22


def triton_backend() -> ModuleType:
    try:
        return importlib.import_module("retriever.loss.triton_tiles")
    except ImportError as exc:  # no triton wheel on this platform
        raise RuntimeError(
            "impl='triton' needs the `triton` package (Linux); install it or use impl='torch'"
        ) from exc


def check_inputs(
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


def scale_tensor(scale: float | Tensor, device: torch.device) -> Tensor:
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


def resolve_impl(
    impl: str, n_queries: int, n_candidates: int, device: torch.device, *, tiled: bool = False
) -> str:
    """The implementation `impl` stands for on this device and problem size. ``tiled``: only
    tiled ones (the ring needs each block's backward with the global lse, which the autograd of
    full logits cannot give, so "naive" runs the torch tiles there)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if tiled and impl == "naive":
        return "torch"
    if impl == "auto":
        if not tiled and n_queries * n_candidates <= NAIVE_MAX_LOGITS:
            return "naive"
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if impl == "triton" and not triton_usable(device):
        raise ValueError(
            "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on CPU)"
        )
    return impl


def sigmoid_backend(impl: str) -> ModuleType:
    """The sigmoid loss's block kernels for a resolved tiled implementation."""
    if impl == "triton":
        triton_backend()  # the same message when triton is missing
        return importlib.import_module("retriever.loss.sigmoid_triton")
    from retriever.loss import sigmoid_tiles

    return sigmoid_tiles


def tile_backend(impl: str) -> ModuleType:
    """The module of block kernels for a resolved tiled implementation ("torch" or "triton")."""
    if impl == "triton":
        return triton_backend()
    from retriever.loss import torch_tiles

    return torch_tiles
