"""The tile shapes of the Triton kernels (InfoNCE's in `triton_tiles`, the sigmoid loss's in
`sigmoid_triton`), per input dtype: a table measured on the GPU, one small shape for the
interpreter, and a way to try others (scripts/tune_triton.py). Imports no triton.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from retriever.loss.triton_mode import interpreting

# Column splits are multiples of this, so a BLOCK_N tile never straddles two splits.
SPLIT_ALIGN = 256
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")

# Tile shapes from the sweep in scripts/tune_triton.py on an H100 at B = 32k, D = 768
# (docs/benchmarks.md): 128 x 256 tiles win for both kernels and both dtypes.
# Keys: 16-bit inputs?  fp32 operands take half the K chunk so the pipeline fits shared memory.
_CONFIGS = {
    True: dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    False: dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, num_warps=8, num_stages=4),
}
_INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)


def tile_config(dtype: torch.dtype) -> dict[str, int]:
    """The tile shape (``TILE_KEYS``) every kernel uses for ``dtype`` inputs; under
    TRITON_INTERPRET=1 a small one (block sizes only)."""
    if interpreting():
        return dict(_INTERPRET_CONFIG)
    return dict(_CONFIGS[dtype != torch.float32])


@contextlib.contextmanager
def use_tile_config(dtype: torch.dtype, config: dict[str, int]) -> Iterator[None]:
    """Within the block, every kernel uses ``config`` for ``dtype`` inputs (16-bit inputs share
    one entry). Block sizes are powers of two and BLOCK_N divides ``SPLIT_ALIGN``."""
    if set(config) != set(TILE_KEYS):
        raise ValueError(f"a tile config has exactly the keys {', '.join(TILE_KEYS)}: {config}")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if config[key] < 16 or config[key] & (config[key] - 1):
            raise ValueError(f"{key} must be a power of two >= 16, got {config[key]}")
    if SPLIT_ALIGN % config["BLOCK_N"]:
        raise ValueError(f"BLOCK_N must divide {SPLIT_ALIGN}, got {config['BLOCK_N']}")
    key = dtype != torch.float32
    saved = _CONFIGS[key]
    _CONFIGS[key] = dict(config)
    try:
        yield
    finally:
        _CONFIGS[key] = saved
