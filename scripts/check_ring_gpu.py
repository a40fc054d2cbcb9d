"""The ring loss with the Triton kernels on ONE GPU: two processes share the device over gloo.

Each process is a rank of a gloo group (gloo stages every block through host memory, which is
what lets two ranks share one GPU); every block runs the fused Triton kernels.  Each rank's
loss and gradients are compared with a float64 reference on the concatenated batch, computed
on the GPU from the naive formulas (tests/ring_cases.py, the same cases the CPU tests use, plus
larger ones at D = 768).  The inputs are rounded to the tested dtype first, so the errors are
those of the computation: fp32 runs TF32 on the matrix units (expect ~1e-3), 16-bit inputs keep
fp32 accumulation but a 16-bit softmax-gradient slab (expect ~1e-2).

    python scripts/check_ring_gpu.py --output ring_gpu.json
    python scripts/check_ring_gpu.py --device cpu --impl torch --dtypes fp32 --small-only  # smoke

Exits non-zero when an error exceeds the sanity bound of its dtype (--tol-fp32, --tol-16bit):
bounds that a wrong block offset, mask or gradient hop (errors of order 1) cannot pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ring_cases import Case, launch, run_case  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cases(small_only: bool) -> list[Case]:
    small = [
        Case(seed=1, world=2),
        Case(seed=2, world=2, symmetric=True, ids=True, learnable_scale=True),
        Case(seed=3, world=2, labels="repeat", ids=True, learnable_scale=True),
    ]
    if small_only:
        return small
    big = dict(world=2, dim=768, max_queries=2048, scale=20.0)
    return small + [
        Case(seed=4, **big),
        Case(seed=5, symmetric=True, ids=True, learnable_scale=True, **big),
    ]


def _worker(rank: int, world: int, out_dir: str, device: str, impl: str, dtypes, small_only):
    records = []
    for dtype_name in dtypes:
        for case in cases(small_only):
            errors = run_case(
                case, dist.group.WORLD, device=device, impl=impl, dtype=DTYPES[dtype_name]
            )
            records.append(dict(rank=rank, dtype=dtype_name, case=asdict(case), errors=errors))
            print(f"rank {rank} {dtype_name} {case}: {errors}", flush=True)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(records))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda:0", help="both ranks use this device")
    p.add_argument("--impl", default="triton", choices=["triton", "torch", "auto"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--small-only", action="store_true", help="only the tiny CPU-test cases")
    p.add_argument("--tol-fp32", type=float, default=1e-2)
    p.add_argument("--tol-16bit", type=float, default=5e-2)
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        launch(
            _worker,
            2,
            str(Path(tmp) / "init"),
            tmp,
            args.device,
            args.impl,
            args.dtypes,
            args.small_only,
        )
        records = [r for k in range(2) for r in json.loads(Path(tmp, f"rank{k}.json").read_text())]

    worst: dict[str, float] = {}
    for r in records:
        worst[r["dtype"]] = max(worst.get(r["dtype"], 0.0), *r["errors"].values())
    bounds = {d: args.tol_fp32 if d == "fp32" else args.tol_16bit for d in worst}
    ok = all(worst[d] <= bounds[d] for d in worst)
    device_name = torch.cuda.get_device_name(args.device) if "cuda" in args.device else "CPU"
    summary = dict(
        device=device_name,
        world_size=2,
        backend="gloo",
        impl=args.impl,
        worst_relative_error=worst,
        bounds=bounds,
        ok=ok,
        records=records,
    )
    args.output.write_text(json.dumps(summary, indent=1))
    print(f"{device_name}, impl={args.impl}: worst relative errors {worst} (bounds {bounds})")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
