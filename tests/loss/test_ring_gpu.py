"""The ring loss with the Triton kernels on ONE GPU: two processes share the device over gloo.

Each process is a rank of a gloo group (gloo stages every block through host memory, which is
what lets two ranks share one GPU); every block runs the fused Triton kernels. Each rank's loss
and gradients are compared with a float64 reference on the concatenated batch, computed on the
GPU from the naive formulas (tests/ring_cases.py: the cases the CPU tests use, plus larger ones
at D = 768 with up to 2048 queries per rank). The inputs are rounded to the tested dtype first,
and run_case's rounding-error model (tests/reference.py) knows that fp32 runs TF32 on the
matrix units and 16-bit inputs keep a 16-bit softmax-gradient slab: every error must be within
its bound (run_case reports errors as fractions of it, <= 1 passes).

    pytest tests/loss/test_ring_gpu.py -m gpu

(`-m gpu` replaces pyproject's default `-m 'not slow'`; without a CUDA device the test is
skipped.)
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from ring_cases import Case, launch, run_case

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ring_gpu_cases() -> list[Case]:
    big = dict(world=2, dim=768, max_queries=2048, scale=20.0)
    return [
        Case(seed=1, world=2),
        Case(seed=2, world=2, symmetric=True, ids=True, learnable_scale=True),
        Case(seed=3, world=2, labels="repeat", ids=True, learnable_scale=True),
        Case(seed=4, **big),
        Case(seed=5, symmetric=True, ids=True, learnable_scale=True, **big),
    ]


def _worker(rank: int, world: int, device: str, impl: str, dtype_name: str, cases) -> None:
    failures = []
    for case in cases:
        dtype = DTYPES[dtype_name]
        errors = run_case(case, dist.group.WORLD, device=device, impl=impl, dtype=dtype)
        print(f"rank {rank} {dtype_name} {case}: {errors}", flush=True)
        bad = {k: v for k, v in errors.items() if not v <= 1.0}
        if bad:
            failures.append(f"{case}: {bad}")
    assert not failures, (
        f"rank {rank} {dtype_name} {impl}: errors above the error model's bound (as fractions "
        f"of it): {failures}"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_ring_with_triton_kernels_two_ranks_on_one_gpu(dtype_name, tmp_path):
    launch(_worker, 2, str(tmp_path / "init"), "cuda:0", "triton", dtype_name, ring_gpu_cases())
