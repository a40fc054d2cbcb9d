"""Which kernels PyTorch's scaled_dot_product_attention may pick while we embed.

On Hopper and Blackwell GPUs recent PyTorch tries cuDNN attention first when a padding mask is
given. cuDNN builds an execution plan for every new (batch, length) shape, for the forward and
again for the backward, and a length-sorted embedding cache produces a new shape for nearly every
chunk: the first step of a 4,096-query batch took 4.95 s instead of 0.56 s on an H100
(docs/benchmarks.md, "First steps and cuDNN attention"). The memory-efficient and flash kernels
need no plan, so by default the encoders embed with cuDNN attention switched off, inside a
context that restores the caller's settings afterwards.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

from torch.nn.attention import SDPBackend, sdpa_kernel

# Every backend but cuDNN, in PyTorch's own priority order.
_WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends(cudnn: bool) -> AbstractContextManager:
    """A context in which SDPA may use cuDNN attention only if `cudnn` is true."""
    if cudnn:
        return contextlib.nullcontext()
    return sdpa_kernel(_WITHOUT_CUDNN)
