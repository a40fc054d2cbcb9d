"""Relative errors of every implementation at large batch sizes on a GPU, against float64.

The float64 reference is computed in row chunks on the GPU (the fp64 matrix units make a 64k x
64k reference take seconds), written from the formulas of design notes section 2:

    P = softmax_j(S),  dq = s/Bq (P - Y) d,  dd = s/Bq (P - Y)^T q,  ds = 1/Bq sum (P - Y) * q d^T

    python scripts/check_loss_gpu.py --batches 4096 65536 --output errors.json

--output gets the run header (scripts/harness.py) and the records under "results", rewritten
after every record.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", nargs="+", type=int, default=[4096, 16384, 65536])
    p.add_argument("--negatives", type=int, default=1)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"])
    p.add_argument("--impls", nargs="+", default=["naive", "torch", "triton"])
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    # Every record is written to --output as it comes, after the run header.
    results = Results(args.output, vars(args), "cuda", echo=False, indent=1)
    print(f"device: {results.data['device']}", flush=True)
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
