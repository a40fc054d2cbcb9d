"""Grid sizes shared by the encoder's Triton kernels (`layer_norm`, `bias_gelu`,
`residual_norm`). No triton import: the numbers are plain Python."""

from __future__ import annotations

import functools

import torch

# Under the interpreter: few programs and small row blocks, so that the tests walk partial
# blocks and several blocks per program (the persistent loops' every path).
INTERPRETER_PROGRAMS = 3
INTERPRETER_BLOCK_M = 4


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def reduction_programs(blocks: int, device: torch.device, per_sm: int, groups: int = 1) -> int:
    """Programs per group (a group: the columns one program sums) of a kernel that walks
    ``blocks`` row blocks and sums columns over them, each program writing one row of partial
    sums that a torch sum finishes: ``per_sm`` per SM over all ``groups`` on a GPU,
    `INTERPRETER_PROGRAMS` in the interpreter, never more than there are blocks."""
    if device.type == "cuda":
        return max(1, min(blocks, -(-sm_count(device) * per_sm // groups)))
    return max(1, min(blocks, INTERPRETER_PROGRAMS))


def row_block(
    tile: int, block_n: int, device: torch.device, interpreted: int = INTERPRETER_BLOCK_M
) -> int:
    """Rows per program for tiles of about ``tile`` elements, ``block_n`` columns wide
    (``interpreted`` in the interpreter, where a program's cost is its operations' count)."""
    if device.type != "cuda":
        return interpreted
    return max(1, tile // block_n)
