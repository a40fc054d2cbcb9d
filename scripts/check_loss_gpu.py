"""Relative errors of every implementation at large batch sizes on a GPU, against float64.

The float64 reference is computed in row chunks on the GPU (the fp64 matrix units make a 64k x
64k reference take seconds), written from the formulas of design notes section 2:

    P = softmax_j(S),  dq = s/Bq (P - Y) d,  dd = s/Bq (P - Y)^T q,  ds = 1/Bq sum (P - Y) * q d^T

    python scripts/check_loss_gpu.py --batches 4096 65536 --output errors.json
    python scripts/check_loss_gpu.py --options --batches 4096 16384 --dtypes bf16 fp32 \
        --output options_errors.json

--options: InfoNCE's options (issue 30) through the Triton kernels against the float64
reference of tests/objective_reference.py (the one CI checks both backends against, here on the
GPU), per option: symmetric (one pass), GTE's four directions with Qwen3's margin and hardness,
debias, label smoothing, fused Matryoshka over 5 prefixes; beside each, the plain loss's errors
at the same size and the leading terms of the error model (bf16: the rounding of the inputs'
gradients and of the G slab, u_out + u_g = 2^-7; fp32 in TF32: about 10 * 2^-11 for the
logits). Then the kernels on inputs of more than 2^31 elements (64-bit offsets) against the
PyTorch tiles.

--output gets the run header (scripts/harness.py) and the records under "results", rewritten
after every record.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import Results

from retriever.loss import contrastive_loss

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def reference(q: torch.Tensor, d: torch.Tensor, scale: float, chunk: int = 2048):
    q, d = q.double(), d.double()
    n = q.shape[0]
    loss = torch.zeros((), dtype=torch.float64, device=q.device)
    dscale = torch.zeros_like(loss)
    dq, dd = torch.zeros_like(q), torch.zeros_like(d)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        dots = q[rows] @ d.T
        logits = scale * dots
        labels = torch.arange(rows.start, rows.stop, device=q.device)
        loss += (torch.logsumexp(logits, 1) - logits[torch.arange(len(labels)), labels]).sum()
        p = torch.softmax(logits, 1)
        p[torch.arange(len(labels)), labels] -= 1.0
        dq[rows] = scale / n * (p @ d)
        dd += scale / n * (p.T @ q[rows])
        dscale += (p * dots).sum() / n
    return loss / n, dq, dd, dscale


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm()).item()


def errors(q_in, d_in, want, impl: str, scale: float) -> dict[str, float]:
    """Relative errors of ``impl``'s loss and gradients against the float64 ``want``."""
    q = q_in.clone().requires_grad_()
    d = d_in.clone().requires_grad_()
    s = torch.tensor(scale, device=q.device, requires_grad=True)
    loss = contrastive_loss(q, d, scale=s, impl=impl)
    loss.backward()
    return dict(
        loss=rel(loss, want[0]),
        d_queries=rel(q.grad, want[1]),
        d_candidates=rel(d.grad, want[2]),
        d_scale=rel(s.grad, want[3]),
    )


ROOT = Path(__file__).resolve().parents[1]
ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def option_cases(dim: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))  # the float64 reference CI uses
    from objective_reference import Options

    dims = tuple(sorted({dim // 12, dim // 6, dim // 3, dim // 2, dim}))
    return {
        "plain": Options(),
        "symmetric": Options(directions=("query_to_doc", "doc_to_query"),
                             partition_mode="per_direction"),
        "gte + margin + hardness": Options(directions=ALL, margin=0.1,
                                           hardness_mode="in_batch_negatives",
                                           hardness_strength=9.0),
        "symmetric + debias": Options(directions=("query_to_doc", "doc_to_query"),
                                      partition_mode="per_direction", debias=0.01),
        "gte + label smoothing": Options(directions=ALL, label_smoothing=0.1),
        "matryoshka x5": Options(dims=dims),
    }  # fmt: skip


def option_errors(q_in, d_in, opts, scale: float) -> dict[str, float]:
    """Relative errors of the Triton kernels against the float64 reference, on the same
    (rounded) inputs."""
    from objective_reference import reference_option_loss

    q64, d64 = q_in.double().requires_grad_(), d_in.double().requires_grad_()
    s64 = torch.tensor(scale, dtype=torch.float64, device=q_in.device, requires_grad=True)
    labels = torch.arange(q_in.shape[0], device=q_in.device)
    want = reference_option_loss(q64, d64, s64, labels, None, None, opts)
    want.backward()
    q, d = q_in.clone().requires_grad_(), d_in.clone().requires_grad_()
    s = torch.tensor(scale, device=q.device, requires_grad=True)
    loss = contrastive_loss(q, d, scale=s, impl="triton", **opts.kwargs())
    loss.backward()
    return dict(loss=rel(loss, want), d_queries=rel(q.grad, q64.grad),
                d_candidates=rel(d.grad, d64.grad), d_scale=rel(s.grad, s64.grad))  # fmt: skip


def check_options(args, results) -> None:
    for batch in args.batches:
        g = torch.Generator(device="cuda").manual_seed(batch)
        q32 = F.normalize(torch.randn(batch, args.dim, device="cuda", generator=g), dim=-1)
        d32 = F.normalize(torch.randn(batch * (1 + args.negatives), args.dim, device="cuda",
                                      generator=g), dim=-1)  # fmt: skip
        d32[:batch] = F.normalize(d32[:batch] + 0.3 * q32, dim=-1)
        for dtype_name in args.dtypes:
            q_in, d_in = q32.to(DTYPES[dtype_name]), d32.to(DTYPES[dtype_name])
            model = 2.0**-7 if dtype_name != "fp32" else 10 * 2.0**-11
            for name, opts in option_cases(args.dim).items():
                record = dict(check="options", option=name, batch=batch, dtype=dtype_name,
                              error_model_leading_terms=model)  # fmt: skip
                with results.case(record, "cuda"):
                    record.update(status="ok", **option_errors(q_in, d_in, opts, args.scale))
                print(f"B={batch} {dtype_name} {name}: "
                      + ", ".join(f"{k} {v:.1e}" for k, v in record.items()
                                  if isinstance(v, float)), flush=True)  # fmt: skip


def check_offsets(results, dim: int = 256) -> None:
    """Candidates of more than 2^31 elements: the kernels' 64-bit offsets, against the
    PyTorch tiles on the same inputs (symmetric, so the column statistics cross it too)."""
    n_q, n_c = 1024, (1 << 31) // dim + 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    q = F.normalize(torch.randn(n_q, dim, device="cuda", generator=g), dim=-1).bfloat16()
    d = torch.empty(n_c, dim, device="cuda", dtype=torch.bfloat16)
    for start in range(0, n_c, 1 << 20):  # in pieces: an fp32 copy would not fit beside it
        piece = torch.randn(min(1 << 20, n_c - start), dim, device="cuda", generator=g)
        d[start : start + piece.shape[0]] = F.normalize(piece, dim=-1).bfloat16()
    labels = torch.arange(n_q, device="cuda") * (n_c // n_q) + n_c // n_q - 1
    record = dict(check="offsets", batch=n_q, candidates=n_c, dim=dim, dtype="bf16")
    with results.case(record, "cuda"):
        out = {}
        for impl in ("torch", "triton"):
            qq, dd = q.clone().requires_grad_(), d.clone().requires_grad_()
            loss = contrastive_loss(qq, dd, labels=labels, symmetric=True, impl=impl)
            loss.backward()
            out[impl] = (loss.detach(), qq.grad, dd.grad[labels])
        record.update(status="ok", **{
            name: rel(a, b) for name, a, b in zip(("loss", "d_queries", "d_positives"),
                                                  out["triton"], out["torch"])})  # fmt: skip
    print(f"offsets past 2^31 ({n_c} x {dim}): {record}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", nargs="+", type=int, default=[4096, 16384, 65536])
    p.add_argument("--negatives", type=int, default=1)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"])
    p.add_argument("--impls", nargs="+", default=["naive", "torch", "triton"])
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--output", type=Path)
    p.add_argument("--options", action="store_true", help="InfoNCE's options (see above)")
    args = p.parse_args()
    # Every record is written to --output as it comes, after the run header.
    results = Results(args.output, vars(args), "cuda", echo=False, indent=1)
    print(f"device: {results.data['device']}", flush=True)
    if args.options:
        check_options(args, results)
        check_offsets(results)
        return
    for batch in args.batches:
        g = torch.Generator(device="cuda").manual_seed(batch)
        q32 = F.normalize(torch.randn(batch, args.dim, device="cuda", generator=g), dim=-1)
        d32 = F.normalize(
            torch.randn(batch * (1 + args.negatives), args.dim, device="cuda", generator=g), dim=-1
        )
        d32[:batch] = F.normalize(d32[:batch] + 0.3 * q32, dim=-1)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            # Reference on the rounded inputs: what is left is the implementation's own error.
            q_in, d_in = q32.to(dtype), d32.to(dtype)
            want = reference(q_in, d_in, args.scale)
            for impl in args.impls:
                record = dict(batch=batch, dtype=dtype_name, impl=impl)
                with results.case(record, "cuda"):  # out of memory: recorded, not raised
                    errs = errors(q_in, d_in, want, impl, args.scale)
                    record.update(status="ok", **errs)
                    print(
                        f"B={batch} Bd={d_in.shape[0]} {dtype_name} {impl}: "
                        + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()),
                        flush=True,
                    )
                if record["status"] != "ok":
                    print(f"B={batch} {dtype_name} {impl}: {record['status']}", flush=True)


if __name__ == "__main__":
    main()
