"""Benchmark the contrastive loss: forward+backward time, peak extra memory and TFLOP/s.

Compares, in one run and on the same inputs:
  naive    the logits built in the input dtype, then fp32 cross-entropy (what a plain
           MultipleNegativesRankingLoss does);
  chunked  row chunks of 4096 queries, each chunk's logits built and backpropagated in turn
           (what GradCache-style cached losses do);
  torch    retriever's tiled PyTorch path (`impl="torch"`);
  triton   retriever's fused Triton kernels (`impl="triton"`);
  inf-cl   the public `inf-cl` package's `cal_flash_loss` (pip install inf-cl); it upcasts
           any input to fp32 and multiplies in TF32.

--shared: the cases retriever shares with memeff 0.3.1 (pip install memeff; its rows are
skipped when it is absent), every one in one run, bf16 by default, Bq = Bd (pairs):
  infonce     query_to_doc                      memeff Qwen3Loss, mask off (margin 2)
  symmetric   query_to_doc + doc_to_query       memeff CLIPLoss
  joint3      q-d, q-q, d-d joint, margin 0.1    memeff Qwen3Loss(use_qq, use_dd, margin 0.1)
  joint4      all four directions, margin 0.1   (no peer: memeff has no doc_to_query term)
  matryoshka  InfoNCE on 5 prefixes, fused      memeff MatryoshkaQwen3Loss, mask off
and a summary per (batch, D): retriever's speed-up over memeff per case, and its symmetric,
joint4 and Matryoshka times over its own InfoNCE's (issue 30's targets: >= 1.5x memeff,
<= 1.2x, <= 2.2x, <= 1.6x).

Work is counted as 6 * Bq * Bd * D flops (design notes section 2).  Extra memory is the peak
allocated during forward+backward minus the inputs and their gradients (CUDA only).

    python scripts/bench_loss.py --device cuda --output bench.json --plot bench.png
    python scripts/bench_loss.py --device cpu --quick          # the README's smoke run
    python scripts/bench_loss.py --shared --batches 65536 262144 1048576 --dims 384 768 1024 \
        --output shared.json                                   # retriever against memeff
    python scripts/bench_loss.py --world-size 8 --batches 8192 32768 --output ring.json
        # the ring across 8 processes against the all-gather approach (scripts/bench_ring.py)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import GB, Results, Stopwatch, peak_memory

from retriever.loss import contrastive_loss

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCALE = 20.0
CHUNK = 4096


def naive_loss(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    logits = (q @ d.T) * SCALE
    return F.cross_entropy(logits.float(), torch.arange(q.shape[0], device=q.device))


def chunked_loss_backward(q: torch.Tensor, d: torch.Tensor) -> None:
    # Each chunk's graph is freed by its own backward, so only CHUNK x Bd logits live at once.
    labels = torch.arange(q.shape[0], device=q.device)
    for start in range(0, q.shape[0], CHUNK):
        logits = (q[start : start + CHUNK] @ d.T) * SCALE
        loss = F.cross_entropy(logits.float(), labels[start : start + CHUNK], reduction="sum")
        (loss / q.shape[0]).backward()


def inf_cl_loss(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    from inf_cl import cal_flash_loss

    # inf-cl returns the per-row losses and upcasts its inputs to fp32 itself.
    return cal_flash_loss(q, d, scale=SCALE).mean()


def forward_backward(impl: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    if impl == "naive":
        return lambda q, d: naive_loss(q, d).backward()
    if impl == "chunked":
        return chunked_loss_backward
    if impl == "inf-cl":
        return lambda q, d: inf_cl_loss(q, d).backward()
    return lambda q, d: contrastive_loss(q, d, scale=SCALE, impl=impl).backward()


def make_inputs(n_queries, n_candidates, dim, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(n_queries, dim, device=device, dtype=dtype, generator=g)
    d = torch.randn(n_candidates, dim, device=device, dtype=dtype, generator=g)
    # Unit rows, as real embeddings: logits stay in the range the scale is meant for.
    q = F.normalize(q.float(), dim=-1).to(dtype).requires_grad_()
    d = F.normalize(d.float(), dim=-1).to(dtype).requires_grad_()
    return q, d


def measure(impl, n_queries, n_candidates, dim, dtype, device, repeat, step=None):
    """Median seconds of `repeat` forward+backward runs and the peak extra memory (bytes, of
    the last run; None off CUDA). ``step``: the forward+backward (default ``impl``'s)."""
    step = step or forward_backward(impl)
    q, d = make_inputs(n_queries, n_candidates, dim, dtype, device)
    input_bytes = q.numel() * q.element_size() + d.numel() * d.element_size()
    watch, extra = Stopwatch(device), None
    for _ in range(repeat):
        q.grad = d.grad = None
        with peak_memory(device) as memory, watch:
            step(q, d)
        if memory.extra is not None:
            # Gradients of the inputs are outputs, not working memory.
            extra = memory.extra - input_bytes
    return statistics.median(watch.laps), extra


def run_case(
    results, impl, n_queries, n_negatives, dim, dtype_name, device, repeat, est_tflops, budget_s
) -> dict:
    """Measure one case (or skip it) and add its record to ``results``; return the record."""
    n_candidates = n_queries * (1 + n_negatives)
    flops = 6 * n_queries * n_candidates * dim
    record = dict(
        impl=impl,
        batch=n_queries,
        candidates=n_candidates,
        negatives=n_negatives,
        dim=dim,
        dtype=dtype_name,
        flops=flops,
        device=results.data["device"],
    )
    # Only a rate measured at a smaller size may skip a case.  Without one, a modest assumed
    # rate still decides how to warm up, so a huge first case is compiled at a small size and
    # timed once instead of run twice at full size.
    rate = est_tflops or (50.0 if device == "cuda" else 0.05)
    estimate = flops / (rate * 1e12)
    if est_tflops and estimate > budget_s:
        record["status"] = f"skipped (estimated {estimate:.0f} s > budget {budget_s} s)"
        return results.add(record)
    dtype = DTYPES[dtype_name]
    with results.case(record, device):  # out of memory: recorded, not raised
        if estimate < 1.0:  # cheap: compile/warm up at full size, then time several runs
            measure(impl, n_queries, n_candidates, dim, dtype, device, 1)
        else:  # expensive: compile at a small size, time one run
            measure(impl, 1024, 1024 * (1 + n_negatives), dim, dtype, device, 1)
            repeat = 1
        seconds, extra = measure(impl, n_queries, n_candidates, dim, dtype, device, repeat)
        record.update(
            status="ok",
            seconds=seconds,
            tflops=flops / seconds / 1e12,
            extra_memory_gb=None if extra is None else extra / GB,
        )
    return record


# -- the cases shared with memeff ----------------------------------------------------------------

ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
SHARED_CASES = ("infonce", "symmetric", "joint3", "joint4", "matryoshka")
MARGIN = 0.1
TARGETS = {"speedup_vs_memeff": 1.5, "symmetric": 1.2, "joint4": 2.2, "matryoshka": 1.6}


def matryoshka_dims(dim: int) -> tuple[int, ...]:
    """Five prefixes, multiples of 64 ending at D (memeff's fused loss needs both)."""
    dims = {k for k in (64, 128, 256, 512) if k < dim} | {dim}
    extra = [k for k in range(64, dim, 64) if k not in dims]
    while len(dims) < 5 and extra:
        dims.add(extra.pop(len(extra) // 2))
    return tuple(sorted(dims))


def ours(case: str, dim: int) -> Callable:
    options = {
        "infonce": {},
        "symmetric": dict(symmetric=True),
        "joint3": dict(directions=("query_to_doc", "query_to_query", "doc_to_doc"),
                       false_negative_margin=MARGIN),
        "joint4": dict(directions=ALL_DIRECTIONS, false_negative_margin=MARGIN),
        "matryoshka": dict(matryoshka_dims=matryoshka_dims(dim)),
    }[case]  # fmt: skip
    return lambda q, d: contrastive_loss(
        q, d, scale=SCALE, impl="triton" if q.is_cuda else "torch", **options
    ).backward()


def memeff_peer(case: str, dim: int) -> Callable | None:
    """memeff's loss for the case (None: no peer), textbook gradients (stable=False)."""
    import memeff

    temperature = 1.0 / SCALE
    plain = dict(temperature=temperature, stable=False)
    if case == "infonce":  # margin >= 2 switches its false-negative mask off
        loss = memeff.MemoryEfficientQwen3Loss(margin=2.0, normalized_inputs=True, **plain)
    elif case == "symmetric":
        loss = memeff.MemoryEfficientCLIPLoss(normalized_inputs=True, **plain)
    elif case == "joint3":
        loss = memeff.MemoryEfficientQwen3Loss(margin=MARGIN, use_qq_negatives=True,
                                               use_dd_negatives=True, normalized_inputs=True,
                                               **plain)  # fmt: skip
    elif case == "matryoshka":  # re-normalises each prefix itself, as ours does
        loss = memeff.MemoryEfficientMatryoshkaQwen3Loss(matryoshka_dims(dim), margin=2.0, **plain)
    else:
        return None
    return lambda q, d: loss(q, d).backward()


def run_shared_case(results, case, impl, batch, dim, dtype_name, device, repeat) -> dict:
    """One shared case for one implementation: compiled at 8k, then timed (once above 2 s)."""
    record = dict(suite="shared", case=case, impl=impl, batch=batch, candidates=batch, dim=dim,
                  dtype=dtype_name, device=results.data["device"])  # fmt: skip
    if impl == "memeff" and importlib.util.find_spec("memeff") is None:
        record["status"] = "skipped (memeff not installed: pip install memeff==0.3.1)"
        return results.add(record)
    if impl == "memeff" and device != "cuda":
        record["status"] = "skipped (memeff's kernels need CUDA)"
        return results.add(record)
    step = ours(case, dim) if impl == "retriever" else memeff_peer(case, dim)
    if step is None:
        record["status"] = "skipped (no peer)"
        return results.add(record)
    dtype = DTYPES[dtype_name]
    with results.case(record, device):  # out of memory: recorded, not raised
        first, _ = measure(impl, min(batch, 8192), min(batch, 8192), dim, dtype, device, 1, step)
        if batch > 8192:
            first, _ = measure(impl, batch, batch, dim, dtype, device, 1, step)
        seconds, extra = first, None
        if first < 2.0:
            seconds, extra = measure(impl, batch, batch, dim, dtype, device, repeat, step)
        record.update(status="ok", seconds=seconds,
                      extra_memory_gb=None if extra is None else extra / GB)  # fmt: skip
    return record


def shared_summary(data: dict) -> dict:
    """Per (batch, D): speed-ups over memeff and ratios to retriever's InfoNCE, and whether
    issue 30's targets hold."""
    times: dict[tuple, float] = {}
    for r in data.get("records", []):
        if r.get("suite") == "shared" and r.get("status") == "ok":
            times[(r["batch"], r["dim"], r["case"], r["impl"])] = r["seconds"]
    out = []
    for batch, dim in sorted({(b, d) for b, d, _, _ in times}):
        row: dict = {"batch": batch, "dim": dim}
        base = times.get((batch, dim, "infonce", "retriever"))
        for case in SHARED_CASES:
            t, peer = times.get((batch, dim, case, "retriever")), times.get(
                (batch, dim, case, "memeff"))  # fmt: skip
            if t and peer:
                row[f"{case}_speedup_vs_memeff"] = peer / t
            if t and base and case != "infonce":
                row[f"{case}_vs_infonce"] = t / base
        speedups = [v for k, v in row.items() if k.endswith("_speedup_vs_memeff")]
        checks = {
            "speedup_vs_memeff": bool(speedups) and min(speedups) >= TARGETS["speedup_vs_memeff"],
            **{c: row.get(f"{c}_vs_infonce", float("inf")) <= TARGETS[c]
               for c in ("symmetric", "joint4", "matryoshka")},
        }  # fmt: skip
        row["targets_met"] = checks
        out.append(row)
    return {"shared_summary": out}


def run_shared(args: argparse.Namespace) -> None:
    results = Results(args.output, vars(args), args.device, key="records", echo=False,
                      summary=shared_summary)  # fmt: skip
    print(f"device: {results.data['device']}; torch {torch.__version__}", flush=True)
    for dtype_name in args.dtypes:
        for dim in args.dims:
            for batch in sorted(args.batches):
                for case in args.cases:
                    for impl in args.peers:
                        r = run_shared_case(results, case, impl, batch, dim, dtype_name,
                                            args.device, args.repeat)  # fmt: skip
                        took = f"{r['seconds'] * 1e3:.1f} ms" if r["status"] == "ok" else ""
                        print(f"{case:10s} {impl:9s} {dtype_name} D={dim} B={batch}: "
                              f"{took or r['status']}", flush=True)  # fmt: skip
    print(json.dumps(results.data["shared_summary"], indent=1))


def fmt_batch(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def markdown_table(records: list[dict]) -> str:
    lines = [
        "| impl | dtype | D | Bq | Bd | time (s) | TFLOP/s | extra memory (GB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["status"] == "ok":
            mem = "-" if r["extra_memory_gb"] is None else f"{r['extra_memory_gb']:.2f}"
            cells = f"{r['seconds']:.4g} | {r['tflops']:.3g} | {mem}"
        else:
            cells = f"{r['status']} | | "
        lines.append(
            f"| {r['impl']} | {r['dtype']} | {r['dim']} | {fmt_batch(r['batch'])} | "
            f"{fmt_batch(r['candidates'])} | {cells} |"
        )
    return "\n".join(lines)


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["status"] == "ok":
            groups.setdefault((r["impl"], r["dtype"], r["dim"], r["negatives"]), []).append(r)
    for (impl, dtype, dim, negatives), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["batch"])
        label = f"{impl} {dtype} D={dim}" + (f" +{negatives}neg" if negatives else "")
        xs = [r["batch"] for r in rs]
        ax_t.plot(xs, [r["seconds"] for r in rs], marker="o", label=label)
        if rs[0]["extra_memory_gb"] is not None:
            ax_m.plot(xs, [max(r["extra_memory_gb"], 1e-3) for r in rs], marker="o", label=label)
    for ax, ylabel in ((ax_t, "forward+backward time (s)"), (ax_m, "peak extra memory (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("queries per batch (Bq)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impls", nargs="+", default=["naive", "chunked", "torch", "triton", "inf-cl"])
    p.add_argument("--batches", nargs="+", type=int, default=[8192, 32768, 65536, 262144, 1 << 20])
    p.add_argument("--dims", nargs="+", type=int, default=[768])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--negatives", nargs="+", type=int, default=[0, 7])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--budget", type=float, default=30.0, help="skip cases estimated above this")
    p.add_argument("--output", type=Path, help="write all records as JSON")
    p.add_argument("--markdown", type=Path, help="write the table as markdown")
    p.add_argument("--plot", type=Path, help="write a log-log PNG of time and memory")
    p.add_argument(
        "--quick", action="store_true", help="small CPU-sized run: B in {1024, 2048}, D=128, fp32"
    )
    p.add_argument(
        "--shared",
        action="store_true",
        help="the cases shared with memeff (see above): bf16, --batches, --dims, --cases, --peers",
    )
    p.add_argument("--cases", nargs="+", default=list(SHARED_CASES), choices=SHARED_CASES)
    p.add_argument("--peers", nargs="+", default=["retriever", "memeff"],
                   choices=["retriever", "memeff"])  # fmt: skip
    p.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="> 1: benchmark the ring loss across this many processes against the all-gather "
        "approach, by launching torchrun scripts/bench_ring.py (further options pass through)",
    )
    args, ring_extra = p.parse_known_args(argv)
    if args.world_size > 1:
        args.ring_args = [
            f"--device={args.device}",
            "--batches",
            *map(str, args.batches),
            f"--dim={args.dims[0]}",
            f"--dtype={args.dtypes[0]}",
            f"--negatives={args.negatives[0]}",
            f"--repeat={args.repeat}",
            *([f"--output={args.output}"] if args.output else []),
            *ring_extra,
        ]
        return args
    if ring_extra:
        p.error(f"unrecognized arguments: {' '.join(ring_extra)}")
    if args.shared and "--dtypes" not in (argv if argv is not None else sys.argv):
        args.dtypes = ["bf16"]
    if args.quick:
        args.batches, args.dims, args.dtypes, args.negatives = [1024, 2048], [128], ["fp32"], [0]
        args.impls = [i for i in args.impls if i not in ("inf-cl",)]
        if args.device == "cpu":
            args.impls = [i for i in args.impls if i != "triton"]
    if args.device == "cpu":
        args.impls = [i for i in args.impls if i != "inf-cl"]
    return args


def run_ring(args: argparse.Namespace) -> int:
    """The --world-size mode: one process per rank through torchrun, on scripts/bench_ring.py."""
    if not args.output:
        raise SystemExit("--world-size needs --output (bench_ring.py writes its results there)")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={args.world_size}",
        str(Path(__file__).with_name("bench_ring.py")),
        *args.ring_args,
    ]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.world_size > 1:
        raise SystemExit(run_ring(args))
    if args.shared:
        run_shared(args)
        return
    # Every record is written to --output as it comes (with the run header).
    results = Results(args.output, vars(args), args.device, key="records", echo=False)
    device_name = results.data["device"]
    print(f"device: {device_name}; torch {torch.__version__}", flush=True)
    records = results.records()
    for dtype_name in args.dtypes:
        for dim in args.dims:
            for negatives in args.negatives:
                for impl in args.impls:
                    tflops = None  # the previous size's rate predicts the next size's time
                    for batch in sorted(args.batches):
                        r = run_case(
                            results,
                            impl,
                            batch,
                            negatives,
                            dim,
                            dtype_name,
                            args.device,
                            args.repeat,
                            tflops,
                            args.budget,
                        )
                        if r["status"] == "ok":
                            tflops = r["tflops"]
                            mem = r["extra_memory_gb"]
                            print(
                                f"{impl:8s} {dtype_name} D={dim} Bq={batch} Bd={r['candidates']}:"
                                f" {r['seconds']:.4g} s, {r['tflops']:.3g} TFLOP/s, extra memory "
                                f"{'n/a' if mem is None else f'{mem:.3f} GB'}",
                                flush=True,
                            )
                        else:
                            print(f"{impl:8s} {dtype_name} D={dim} Bq={batch}: {r['status']}")
    table = markdown_table(records)
    print(f"\n{device_name}\n{table}")
    if args.markdown:
        args.markdown.write_text(f"Device: {device_name}\n\n{table}\n")
    if args.plot and records:
        plot(records, args.plot, f"contrastive loss forward+backward on {device_name}")
    if not math.isfinite(sum(r.get("seconds", 0.0) for r in records)):
        raise SystemExit("a benchmark produced a non-finite time")


if __name__ == "__main__":
    main()
