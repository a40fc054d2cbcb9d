"""Sweep the Triton kernels' tile shapes on this GPU (the table in retriever/loss/tile_configs.py).

Times the forward kernel and the whole backward (slab kernel + GEMMs) per config, at one square
batch, and prints the best per (dtype, D). --output gets the run header (scripts/harness.py) and
one record per config that ran (under "results"), rewritten after every config.

    python scripts/tune_triton.py --batch 32768 --dims 768 --output tune.json
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from harness import Results, do_bench

from retriever.loss import tile_configs, triton_tiles

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def candidates(dtype_name: str):
    ks = [64] if dtype_name == "bf16" else [32]
    for bm, bn, bk, warps, stages in itertools.product([128], [64, 128, 256], ks, [4, 8], [3, 4]):
        if bn == 256 and warps == 4:
            continue
        yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    yield dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=ks[0], num_warps=4, num_stages=4)
    yield dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=ks[0], num_warps=8, num_stages=3)


def time_config(q, c, scale, labels, lse, w) -> tuple[float, float]:
    """Milliseconds of the forward kernel and of the whole backward, with the current config."""
    fwd = do_bench(lambda: triton_tiles.forward_block(q, c, scale, labels), rep=200)
    dq = torch.zeros_like(q)
    dc = torch.zeros(c.shape, device=c.device)
    bwd = do_bench(
        lambda: triton_tiles.backward_block(q, c, scale, lse, w, labels, None, None, dq, dc),
        rep=200,
    )
    return fwd, bwd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=32768)
    p.add_argument("--dims", nargs="+", type=int, default=[768])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    n = args.batch
    results = Results(args.output, vars(args), "cuda", echo=False, indent=1)
    for dtype_name, dim in itertools.product(args.dtypes, args.dims):
        dtype = DTYPES[dtype_name]
        q = torch.nn.functional.normalize(torch.randn(n, dim, device="cuda"), dim=-1).to(dtype)
        c = torch.nn.functional.normalize(torch.randn(n, dim, device="cuda"), dim=-1).to(dtype)
        labels = torch.arange(n, device="cuda")
        scale = torch.tensor(20.0, device="cuda")
        lse, _ = triton_tiles.forward_block(q, c, scale, labels)
        w = torch.full((n,), 1.0 / n, device="cuda")
        flops_fwd = 2 * n * n * dim
        for cfg in candidates(dtype_name):
            row = dict(dtype=dtype_name, dim=dim, batch=n, **cfg)
            try:
                with tile_configs.use_tile_config(dtype, cfg):  # the public way to choose one
                    fwd, bwd = time_config(q, c, scale, labels, lse, w)
            except Exception as exc:  # out of resources for this tile shape
                print(f"{row}: {type(exc).__name__}", flush=True)
                continue
            row.update(
                forward_ms=fwd,
                backward_ms=bwd,
                forward_tflops=flops_fwd / fwd / 1e9,
                total_tflops_counted=3 * flops_fwd / (fwd + bwd) / 1e9,
            )
            results.add(row)
            print(
                f"{dtype_name} D={dim} {cfg}: fwd {fwd:.2f} ms "
                f"({row['forward_tflops']:.0f} TFLOP/s)"
                f" bwd {bwd:.2f} ms; counted {row['total_tflops_counted']:.0f} TFLOP/s",
                flush=True,
            )
        done = [r for r in results.records() if r["dtype"] == dtype_name and r["dim"] == dim]
        best_f = min(done, key=lambda r: r["forward_ms"], default=None)
        best_b = min(done, key=lambda r: r["backward_ms"], default=None)
        print(f"BEST {dtype_name} D={dim} forward: {best_f}\nBEST backward: {best_b}", flush=True)


if __name__ == "__main__":
    main()
