"""Time retriever's Triton LayerNorm (retriever.model.layer_norm) against PyTorch's on one GPU.

For each shape and dtype: forward time, and forward + backward time (weight and bias gradients
included), each the median of triton.testing.do_bench, plus the largest difference from a float64
reference. The shapes are a training chunk of all-MiniLM-L6-v2 (512 rows x 128 tokens, hidden 384)
and of BERT-base / large sized encoders. --sweep also times other tile sizes and backward program
counts (the module constants) so the defaults can be checked.

    python scripts/bench_layer_norm.py --output bench_layer_norm.json
    python scripts/bench_layer_norm.py --sweep --shapes 65536x384
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F
from harness import Results, do_bench, profiled, sync

import retriever.model.layer_norm as fused

SETTINGS = (
    "FORWARD_TILE",
    "FORWARD_WARPS",
    "BACKWARD_TILE",
    "BACKWARD_WARPS",
    "BACKWARD_PROGRAMS_PER_SM",
)


def inputs(m: int, n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, n, device="cuda", generator=g, dtype=torch.float32) * 2 + 0.5
    w = 1 + 0.1 * torch.randn(n, device="cuda", generator=g)
    b = 0.1 * torch.randn(n, device="cuda", generator=g)
    dy = torch.randn(m, n, device="cuda", generator=g)
    x, w, b, dy = (t.to(dtype) for t in (x, w, b, dy))
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), dy


def time_impl(layer_norm, x, w, b, dy) -> dict[str, float]:
    def forward():
        with torch.no_grad():
            layer_norm(x, w, b)

    def forward_backward():
        x.grad = w.grad = b.grad = None
        layer_norm(x, w, b).backward(dy)

    # Medians: single GPU timings of a ~50 us kernel vary by tens of percent.
    def bench(fn):
        return do_bench(fn, warmup=50, rep=300, return_mode="median")

    return {"forward_ms": bench(forward), "forward_backward_ms": bench(forward_backward)}


def print_kernels(impls: dict, x, w, b, dy) -> None:
    """Per implementation, the CUDA kernels of 20 forward + backward calls (kernel time only,
    without the host-side launch cost that do_bench's timings include)."""
    for name, layer_norm in impls.items():
        for _ in range(3):
            layer_norm(x, w, b).backward(dy)
        sync("cuda")
        with profiled("cuda") as prof:
            for _ in range(20):
                x.grad = w.grad = b.grad = None
                layer_norm(x, w, b).backward(dy)
        print(f"--- {name}")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12))


def max_errors(x, w, b, dy) -> dict[str, float]:
    """Largest |ours - float64 reference| of y and of each gradient."""
    ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y_ref = F.layer_norm(ref[0], ref[0].shape[-1:], ref[1], ref[2], 1e-5)
    y_ref.backward(dy.double())
    for t in (x, w, b):
        t.grad = None
    y = fused.layer_norm(x, w, b, 1e-5)
    y.backward(dy)
    out = {"y": (y.double() - y_ref).abs().max().item()}
    for name, t, r in zip(("dx", "dw", "db"), (x, w, b), ref):
        out[name] = (t.grad.double() - r.grad).abs().max().item()
    return out


def set_kernel_settings(settings: dict[str, int]) -> None:
    """Set retriever.model.layer_norm's tile and launch constants (its public module settings,
    SETTINGS; read at every launch) for this process."""
    for k, v in settings.items():
        setattr(fused, k, v)


def shape(text: str) -> tuple[int, int]:
    """'ROWSxWIDTH', e.g. 65536x384."""
    try:
        rows, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROWSxWIDTH (e.g. 65536x384)") from None
    if rows < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: rows and width must be positive")
    return rows, width


def measure_shape(row: dict, args, defaults: dict[str, int]) -> None:
    """Fill ``row`` (shape, dtype): errors, both implementations' times, the speed-ups, and
    with --sweep the times of other kernel settings."""
    m, n = row["shape"]
    x, w, b, dy = inputs(m, n, getattr(torch, row["dtype"]))
    row["errors"] = max_errors(x, w, b, dy)
    row["torch"] = time_impl(torch_layer_norm, x, w, b, dy)
    row["retriever"] = time_impl(fused_layer_norm, x, w, b, dy)
    for key in ("forward_ms", "forward_backward_ms"):
        row[f"speedup_{key[:-3]}"] = row["torch"][key] / row["retriever"][key]
    if args.profile:
        print_kernels({"torch": torch_layer_norm, "retriever": fused_layer_norm}, x, w, b, dy)
    if args.sweep:
        row["sweep"] = []
        # Forward settings timed with the default backward, then backward settings with the
        # default forward.
        grid = [
            dict(FORWARD_TILE=tile, FORWARD_WARPS=warps)
            for tile, warps in itertools.product((1024, 2048, 4096, 8192), (2, 4, 8))
        ] + [
            dict(BACKWARD_TILE=tile, BACKWARD_WARPS=warps, BACKWARD_PROGRAMS_PER_SM=programs)
            for tile, warps, programs in itertools.product(
                (1024, 2048, 4096, 8192), (1, 2, 4), (2, 4, 8)
            )
        ]
        try:
            for settings in grid:
                set_kernel_settings({**defaults, **settings})
                row["sweep"].append({**settings, **time_impl(fused_layer_norm, x, w, b, dy)})
        finally:
            set_kernel_settings(defaults)


def fused_layer_norm(x, w, b):
    return fused.layer_norm(x, w, b, 1e-5)


def torch_layer_norm(x, w, b):
    return F.layer_norm(x, x.shape[-1:], w, b, 1e-5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", nargs="+", type=shape, default=[(65536, 384), (65536, 768), (32768, 1024)]
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=["bfloat16", "float16", "float32"],
        default=["bfloat16", "float32"],
    )
    parser.add_argument("--sweep", action="store_true", help="also time other kernel settings")
    parser.add_argument(
        "--profile", action="store_true", help="print the kernels of 20 forward + backward calls"
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_layer_norm.py needs a CUDA GPU")

    defaults = {k: getattr(fused, k) for k in SETTINGS}
    # Every row is written to --output as it comes, after the run header.
    results = Results(args.output, vars(args), "cuda", echo=False,
                      fields={"torch": torch.__version__, "defaults": defaults})  # fmt: skip
    for (m, n), dtype_name in itertools.product(args.shapes, args.dtypes):
        row = {"shape": [m, n], "dtype": dtype_name}
        with results.case(row, "cuda"):  # out of memory: recorded, not raised
            measure_shape(row, args, defaults)
        print(json.dumps({k: v for k, v in row.items() if k != "sweep"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
