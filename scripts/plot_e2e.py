"""Plot end-to-end training runs from bench_e2e.py's JSON files (and, where given, the step-only
rates from bench_train.py) into one PNG.

Left: queries/s against the batch size: ours end to end (steps after the first; a single step
where only one ran), ours step only, and sentence-transformers + CMNRL end to end; a peer that
timed out is drawn as an upper bound (a downward triangle: it had not finished k steps in T
seconds from its start, so its rate over them is below batch x k / T).
Right: steps finished against seconds since the process started (start-up included), for each
case, so an epoch-start stall shows as a flat stretch.

    python scripts/plot_e2e.py docs/results/e2e_*_h200.json \\
        --steps docs/results/train_step_16k_smoke_h200.json \\
        docs/results/train_step_65k_neg0_h200.json --output docs/results/e2e_h200.png --overwrite

A case measured in several files (a peer re-run alone for longer) is drawn once, from the run
that got furthest.
"""

from __future__ import annotations

import argparse
import json
import re
from itertools import accumulate
from pathlib import Path

STYLE = {  # colour and line of each peer
    "retriever": ("tab:blue", "-"),
    "st-cmnrl": ("tab:orange", "--"),
}


def load(paths: list[Path]) -> list[dict]:
    """Every record of the result files, or a message naming the file that is not one."""
    records = []
    for path in paths:
        try:
            records += json.loads(path.read_text(encoding="utf-8"))["results"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = f"no 'results' list ({exc})" if isinstance(exc, (KeyError, TypeError)) else exc
            message = f"{path}: not a bench_e2e.py / bench_train.py result file: {why}"
            raise SystemExit(message) from None
    return records


def timeout_of(record: dict) -> float | None:
    found = re.search(r"timed out after (\d+)", record.get("status", ""))
    return float(found.group(1)) if found else None


def most_informative(runs: list[dict]) -> list[dict]:
    """One record per (peer, batch, negatives): a finished run wins over a stopped one, and among
    stopped runs the one that went furthest (most steps, then the longest time), so a case
    measured again in a longer run of its own is drawn once."""

    def reach(r: dict) -> tuple:
        return (r.get("status") == "ok", len(r.get("step_s") or []), timeout_of(r) or 0.0)

    best: dict[tuple, dict] = {}
    for r in runs:
        key = (r["peer"], r["batch"], r["negatives"])
        if key not in best or reach(r) > reach(best[key]):
            best[key] = r
    return list(best.values())


def rate_panel(ax, runs: list[dict], steps: list[dict]) -> None:
    for peer, (color, line) in STYLE.items():
        for negatives, marker in ((0, "o"), (7, "s")):
            rs = sorted((r for r in runs if r["peer"] == peer and r["negatives"] == negatives
                         and r.get("status") == "ok"), key=lambda r: r["batch"])  # fmt: skip
            if rs:
                label = f"{peer} end to end, {negatives} neg"
                ax.plot([r["batch"] for r in rs], [r["queries_per_s"] for r in rs], line,
                        color=color, marker=marker, label=label)  # fmt: skip
            measured = {r["batch"] for r in rs}
            for r in runs:
                if (r["peer"] == peer and r["negatives"] == negatives and timeout_of(r)
                        and r["batch"] not in measured):  # fmt: skip
                    # it had not finished step k + 1 (older files: all its steps) in the time
                    unfinished = r["steps"] if "steps_done" not in r else r["steps_done"] + 1
                    bound = r["batch"] * unfinished / timeout_of(r)
                    ax.plot(r["batch"], bound, "v", color=color, markersize=9)
    ours = sorted((r for r in steps if r["peer"].startswith("retriever") and r["status"] == "ok"
                   and r["chunk_size"] == 512), key=lambda r: r["batch"])  # fmt: skip
    if ours:
        ax.plot([r["batch"] for r in ours], [r["queries_per_s"] for r in ours], ":",
                color="tab:blue", marker="x", label="retriever step only, 0 neg")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("queries per batch")
    ax.set_ylabel("queries / s")
    ax.set_title("throughput (triangle: upper bound, timed out)", fontsize=9)
    ax.legend(fontsize=7)


def timeline_panel(ax, runs: list[dict]) -> None:
    cases = sorted({(r["batch"], r["negatives"]) for r in runs})
    colors = dict(zip(cases, ("tab:green", "tab:purple", "tab:red", "tab:brown", "tab:gray")))
    for r in runs:
        walls = r.get("step_s") or []
        if walls and "startup_cold_s" not in r:  # an older timed-out record: no start-up time
            continue
        start = r.get("startup_cold_s", 0.0)
        xs = [0.0, start, *(start + t for t in accumulate(walls))]
        ys = [0, *range(len(xs) - 1)]
        if timeout_of(r):  # still inside the next step when it was stopped
            xs, ys = [*xs, timeout_of(r)], [*ys, ys[-1]]
        case = f"{r['batch']:,}" + (f" +{r['negatives']} neg" if r["negatives"] else "")
        stopped = " (stopped)" if timeout_of(r) else ""
        ax.step(xs, ys, STYLE[r["peer"]][1], where="post", color=colors[r["batch"], r["negatives"]],
                label=f"{r['peer']} {case}{stopped}")  # fmt: skip
    ax.set_xlabel("seconds since the process started (start-up included)")
    ax.set_ylabel("steps finished")
    ax.set_title("progress (solid: retriever, dashed: sentence-transformers)", fontsize=9)
    ax.legend(fontsize=6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench_e2e.py JSON files")
    parser.add_argument("--steps", nargs="*", type=Path, default=[], help="bench_train.py JSON")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--title", default="retriever train vs SentenceTransformerTrainer+CMNRL")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args()
    if args.output.exists() and not args.overwrite:
        raise SystemExit(f"{args.output} exists; pass --overwrite to replace it")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = most_informative([r for r in load(args.runs) if "step_s" in r or timeout_of(r)])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rate_panel(left, runs, load(args.steps))
    timeline_panel(right, runs)
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
