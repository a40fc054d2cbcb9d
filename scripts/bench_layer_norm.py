"""Time retriever's Triton LayerNorm (retriever.model.layer_norm) against PyTorch's on one GPU;
with --layers, the fused layer kernels (retriever.model.fused) against the eager modules.

For each shape and dtype: forward time, and forward + backward time (weight and bias gradients
included), each the median of triton.testing.do_bench, plus the largest difference from a float64
reference. The shapes are a training chunk of all-MiniLM-L6-v2 (512 rows x 128 tokens, hidden 384)
and of BERT-base / large sized encoders. --sweep also times other tile sizes and backward program
counts (the module constants) so the defaults can be checked.

    python scripts/bench_layer_norm.py --output bench_layer_norm.json
    python scripts/bench_layer_norm.py --sweep --shapes 65536x384
    python scripts/bench_layer_norm.py --layers --output pack_kernels.json

--layers: on [tokens, hidden] bf16 (default one packed chunk of 65,536
tokens, MiniLM's widths 384 / 1536), each kernel's errors against float64 next to the eager
bf16 ops' errors (the same dropout mask, drawn again from the kernel's seed), and the times of
BERT's three modules (SelfOutput, Intermediate, Output; GEMMs included) eager and fused, forward
and forward + backward, with the kernels' own times and bandwidth.
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


# --- the fused layer kernels (--layers) ------------------------------------------------------


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (float64)."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-300)).item()


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().requires_grad_() for t in tensors]


def _random(device: str, dtype: torch.dtype, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=g) * scale + shift).to(dtype)

    return rand


def check_residual_norm(tokens: int, hidden: int, dtype: torch.dtype, p: float,
                        device: str = "cuda") -> dict:  # fmt: skip
    """bias + dropout + residual + LayerNorm: the kernels' output and gradients against float64,
    beside the eager ops in ``dtype`` (bias add, dropout with the kernel's mask, residual add,
    LayerNorm), relative errors; and the mask's share kept."""
    from retriever.model.residual_norm import draw_seed, dropout_mask, residual_layer_norm

    rand = _random(device, dtype, 1)
    y, r = rand(tokens, hidden, scale=2.0, shift=0.5), rand(tokens, hidden, scale=1.5)
    b, w, beta = rand(hidden, scale=0.1), rand(hidden, scale=0.1, shift=1.0), rand(hidden)
    dout = rand(tokens, hidden)
    torch.manual_seed(3)
    keep = dropout_mask(draw_seed(y.device), tokens, hidden, p) if p > 0 else None
    torch.manual_seed(3)  # the call draws the same seed
    leaves = _leaves(y, b, r, w, beta)
    out = residual_layer_norm(*leaves, 1e-12, p)  # MiniLM's eps
    out.backward(dout)
    values = {"fused": [out.detach()] + [t.grad for t in leaves]}
    for label, cast in (("float64", torch.float64), ("eager", dtype)):
        ref = _leaves(*(t.to(cast) for t in (y, b, r, w, beta)))
        z = ref[0] + ref[1]
        if keep is not None:
            z = torch.where(keep, z / (1 - p), 0.0).to(cast)
        out = F.layer_norm(z + ref[2], (hidden,), ref[3], ref[4], 1e-12)
        out.backward(dout.to(cast))
        values[label] = [out.detach()] + [t.grad for t in ref]
    record = {"op": "residual_norm", "shape": [tokens, hidden], "dtype": str(dtype), "dropout": p,
              **errors(values, ("out", "dy", "db", "dr", "dw", "dbeta"))}  # fmt: skip
    if keep is not None:
        record["kept"] = keep.float().mean().item()
        record["dy_zero_where_dropped"] = bool((leaves[0].grad[~keep] == 0).all())
    return record


def errors(values: dict[str, list[torch.Tensor]], names: tuple[str, ...]) -> dict[str, dict]:
    """Relative errors of the fused and eager values against the float64 ones, by name."""
    want = values["float64"]
    return {f"{label}_error": {n: relative_error(v, w)
                               for n, v, w in zip(names, values[label], want)}
            for label in ("fused", "eager")}  # fmt: skip


def check_bias_gelu(tokens: int, width: int, dtype: torch.dtype, device: str = "cuda") -> dict:
    """bias + GELU against float64, beside the eager ops in ``dtype``, relative errors."""
    from retriever.model.bias_gelu import bias_gelu

    rand = _random(device, dtype, 2)
    y, b, dout = rand(tokens, width, scale=2.0), rand(width, scale=0.5), rand(tokens, width)
    values = {}
    for label, cast in (("float64", torch.float64), ("eager", dtype), ("fused", None)):
        leaves = _leaves(y.to(cast or dtype), b.to(cast or dtype))
        out = bias_gelu(*leaves) if cast is None else F.gelu(leaves[0] + leaves[1])
        out.backward(dout.to(out.dtype))
        values[label] = [out.detach()] + [t.grad for t in leaves]
    return {"op": "bias_gelu", "shape": [tokens, width], "dtype": str(dtype),
            **errors(values, ("out", "dy", "db"))}  # fmt: skip


def time_modules(tokens: int, hidden: int, intermediate: int, dtype: torch.dtype,
                 p: float) -> list[dict]:  # fmt: skip
    """BERT's SelfOutput, Intermediate and Output modules (train mode, dropout ``p``), eager and
    fused (`use_fused_kernels`), forward without gradients and forward + backward."""
    import copy

    from transformers import BertConfig
    from transformers.models.bert import modeling_bert as bert

    from retriever.model.fused import use_fused_kernels

    config = BertConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="gelu",
                        hidden_dropout_prob=p)  # fmt: skip
    rows = []
    for name, cls, width in (("self_output", bert.BertSelfOutput, hidden),
                             ("intermediate", bert.BertIntermediate, hidden),
                             ("output", bert.BertOutput, intermediate)):  # fmt: skip
        eager = cls(config).to("cuda", dtype).train()
        fused = copy.deepcopy(eager)
        assert use_fused_kernels(fused) == 1, name
        h = torch.randn(tokens, width, device="cuda", dtype=dtype, requires_grad=True)
        args = [h]
        if name != "intermediate":
            args.append(torch.randn(tokens, hidden, device="cuda", dtype=dtype,
                                    requires_grad=True))  # fmt: skip
        out_width = intermediate if name == "intermediate" else hidden
        dout = torch.randn(tokens, out_width, device="cuda", dtype=dtype)
        row: dict = {"module": name, "tokens": tokens, "dtype": str(dtype), "dropout": p}
        for label, module in (("eager", eager), ("fused", fused)):
            row[label] = time_call(module, args, dout)
        for key in ("forward_ms", "forward_backward_ms"):
            row[f"speedup_{key[:-3]}"] = row["eager"][key] / row["fused"][key]
        rows.append(row)
    return rows


def time_call(module, args: list[torch.Tensor], dout: torch.Tensor) -> dict[str, float]:
    def forward():
        with torch.no_grad():
            module(*args)

    def forward_backward():
        for t in args:
            t.grad = None
        module(*args).backward(dout)

    def bench(fn):
        return do_bench(fn, warmup=25, rep=150, return_mode="median")

    return {"forward_ms": bench(forward), "forward_backward_ms": bench(forward_backward)}


def time_kernels(tokens: int, hidden: int, intermediate: int, p: float,
                 only: str | None = None) -> list[dict]:  # fmt: skip
    """The fused kernels alone (bf16, forward and forward + backward), with the bandwidth their
    fewest bytes give (each input read once, each output written once)."""
    from retriever.model.bias_gelu import bias_gelu
    from retriever.model.residual_norm import residual_layer_norm

    rand = _random("cuda", torch.bfloat16, 4)
    y, r, b, w, beta = (rand(tokens, hidden), rand(tokens, hidden), rand(hidden),
                        rand(hidden, shift=1.0), rand(hidden))  # fmt: skip
    wide, wide_b = rand(tokens, intermediate), rand(intermediate)
    cases = [
        # forward reads y and r, writes out; backward reads dout, y, r, writes dr (and dy)
        ("residual_norm", lambda y, r: residual_layer_norm(y, b, r, w, beta, 1e-12, p),
         [y, r], 3, 5 if p > 0 else 4, hidden),
        ("bias_gelu", lambda y: bias_gelu(y, wide_b), [wide], 2, 3, intermediate),
    ]  # fmt: skip
    rows = []
    for name, call, args, forward_tensors, backward_tensors, width in cases:
        if only not in (None, name):
            continue
        args = _leaves(*args)
        times = time_call(call, args, rand(tokens, width))
        size = tokens * width * 2  # bytes of one bf16 tensor
        gbps = {"forward_gb_s": forward_tensors * size / times["forward_ms"] / 1e6,
                "forward_backward_gb_s": (forward_tensors + backward_tensors) * size
                / times["forward_backward_ms"] / 1e6}  # fmt: skip
        rows.append({"kernel": name, "shape": [tokens, width], "dropout": p, **times, **gbps})
    return rows


LAYER_SWEEP = {  # --layers --sweep: kernel settings tried around the defaults
    "residual_norm": [dict(FORWARD_TILE=t, FORWARD_WARPS=w) for t, w in
                      ((2048, 4), (4096, 8), (8192, 8))]
    + [dict(BACKWARD_TILE=t, BACKWARD_WARPS=w, BACKWARD_PROGRAMS_PER_SM=p) for t, w, p in
       ((2048, 4, 4), (4096, 8, 4), (4096, 4, 8), (8192, 8, 2))],
    "bias_gelu": [dict(FORWARD_TILE=t, FORWARD_WARPS=w) for t, w in ((4096, 4), (16384, 8))]
    + [dict(BACKWARD_TILE=t, BACKWARD_WARPS=w, BACKWARD_PROGRAMS_PER_SM=p) for t, w, p in
       ((4096, 4, 4), (8192, 8, 8), (16384, 8, 4))],
}  # fmt: skip


def sweep_layer_kernels(tokens: int, results: Results) -> None:
    """Each kernel's times under the settings of LAYER_SWEEP (module constants, read at every
    launch; restored after), dropout 0.1."""
    import importlib

    for name, grid in LAYER_SWEEP.items():
        module = importlib.import_module(f"retriever.model.{name}")
        defaults = {k: getattr(module, k) for settings in grid for k in settings}
        try:
            for settings in grid:
                for k, v in {**defaults, **settings}.items():
                    setattr(module, k, v)
                (row,) = time_kernels(tokens, 384, 1536, 0.1, only=name)
                results.add({"table": "sweep", **settings, **row})
        finally:
            for k, v in defaults.items():
                setattr(module, k, v)


def short(record: dict) -> str:
    """One line of a --layers record: the worst relative errors, or the times."""
    if record.get("table") == "check":
        worst = {k: max(record.get(k, {}).values(), default=None)
                 for k in ("fused_error", "eager_error")}  # fmt: skip
        extra = {k: record[k] for k in ("kept", "dy_zero_where_dropped") if k in record}
        return (f"check {record.get('op')} {record.get('dtype')} p={record.get('dropout', 0)}: "
                f"{worst} {extra} {record.get('status')}")  # fmt: skip
    keys = ("module", "kernel", "dropout", "eager", "fused", "speedup_forward",
            "speedup_forward_backward", "forward_ms", "forward_backward_ms", "forward_gb_s",
            "forward_backward_gb_s", "FORWARD_TILE", "BACKWARD_TILE", "BACKWARD_WARPS")  # fmt: skip
    return json.dumps({k: _rounded(record[k]) for k in keys if k in record})


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 3) if isinstance(value, float) else value


def run_layers(args) -> int:
    """--layers: the checks, then the module and kernel times, each record written as it comes
    (on a CPU, under TRITON_INTERPRET=1, the checks only: a smoke test of the script)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = Results(args.output, vars(args), device, show=short,
                      fields={"torch": torch.__version__})  # fmt: skip
    t, hidden, intermediate = args.tokens, 384, 1536
    cases = [lambda: check_residual_norm(t, hidden, torch.bfloat16, 0.0, device),
             lambda: check_residual_norm(t, hidden, torch.bfloat16, 0.1, device),
             lambda: check_residual_norm(t, 768, torch.float32, 0.1, device),
             lambda: check_bias_gelu(t, intermediate, torch.bfloat16, device),
             lambda: check_bias_gelu(t, 3072, torch.float32, device)]  # fmt: skip
    for case in cases:
        record: dict = {"table": "check"}
        with results.case(record, device):
            record.update(case())
    if device != "cuda":
        return 0
    for p in (0.1, 0.0):
        for row in time_modules(t, hidden, intermediate, torch.bfloat16, p):
            results.add({"table": "modules", **row})
        for row in time_kernels(t, hidden, intermediate, p):
            results.add({"table": "kernels", **row})
    if args.sweep:
        sweep_layer_kernels(t, results)
    return 0


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
    parser.add_argument("--layers", action="store_true",
                        help="the fused layer kernels instead (see above)")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=65536, help="--layers: rows")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.layers:
        return run_layers(args)
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
