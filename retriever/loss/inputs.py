"""What both paths of the loss (one process, and the ring across processes) check and resolve
before any math: the inputs, the scale, and which implementation and tile backend to run.

The Triton backend is imported here, lazily, only when it is the one chosen: importing the loss
never needs triton.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
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


def check_owners(
    owners: Tensor | None, labels: Tensor | None, n_queries: int, n_candidates: int
) -> Tensor | None:
    """``candidate_owners`` checked: [Bd] int, each candidate's query in [0, Bq) or -1 (none),
    every query owning its positive. None stays None (the caller decides the default)."""
    if owners is None:
        return None
    _check_index_tensor("candidate_owners", owners, n_candidates, owners.device)
    owners = owners.long()
    if bool(((owners < -1) | (owners >= n_queries)).any()):
        raise ValueError(
            f"candidate_owners must be query indices in [0, {n_queries}) or -1 (no query); got "
            f"values in [{int(owners.min())}, {int(owners.max())}]"
        )
    positives = torch.arange(n_queries, device=owners.device) if labels is None else labels.long()
    if not torch.equal(owners[positives], torch.arange(n_queries, device=owners.device)):
        raise ValueError(
            "candidate_owners must give each query's positive (candidate labels[i]) to query i"
        )
    return owners


def check_prefixes(
    dims: Sequence[int] | None, weights: Sequence[float] | None, normalize: bool, dim: int
) -> tuple[tuple[int, ...], tuple[float, ...], bool]:
    """Matryoshka's prefixes checked: (sizes increasing, one weight each, normalize); without
    ``dims``, the whole embedding, weight 1, as is."""
    if dims is None:
        if weights is not None:
            raise ValueError("matryoshka_weights needs matryoshka_dims")
        return (dim,), (1.0,), False
    if isinstance(dims, (int, str)) or not len(dims):
        raise ValueError(f"matryoshka_dims must be a non-empty list of sizes, got {dims!r}")
    if any(isinstance(k, bool) or not isinstance(k, int) for k in dims):
        raise ValueError(f"matryoshka_dims must be integers, got {list(dims)}")
    if len(set(dims)) != len(dims) or min(dims) < 1 or max(dims) > dim:
        raise ValueError(
            f"matryoshka_dims must be distinct sizes in [1, {dim}] (the embedding size), got "
            f"{list(dims)}"
        )
    weights = [1.0] * len(dims) if weights is None else list(weights)
    if len(weights) != len(dims) or not all(isinstance(w, (int, float)) for w in weights):
        raise ValueError(
            f"matryoshka_weights must be one number per matryoshka_dims entry, got {weights}"
        )
    if not isinstance(normalize, bool):
        raise ValueError(f"matryoshka_normalize must be a bool, got {normalize!r}")
    order = sorted(range(len(dims)), key=lambda i: dims[i])  # the kernels want them increasing
    return tuple(dims[i] for i in order), tuple(float(weights[i]) for i in order), normalize


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
