"""Where Triton kernels can run: a leaf module, so that nothing imports triton to ask.

Kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter when the environment has
``TRITON_INTERPRET=1`` (how CI tests them; the variable is read when a kernel module is
imported, so set it before).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    """Whether Triton kernels can run on ``device`` here (installed, and CUDA or interpreted)."""
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return interpreting()
