"""Benchmark the ring loss against gathering every candidate, one process per GPU (torchrun).

Per rank, on the same inputs and in the same run:
  ring    contrastive_loss(q, d, group=WORLD): candidate blocks travel around the ring and each
          block runs the tiled kernels (--impl); no rank holds more than two foreign blocks;
  gather  all candidates gathered with gradient (torch.distributed.nn.functional.all_gather,
          as sentence-transformers' gather_across_devices and OpenCLIP do), then the loss of
          the local queries against all of them (--gather-impl: "naive" builds the
          [Bq, W * Bd] logits like those libraries; "triton"/"torch" tile them).

Reported per rank: forward+backward seconds (median of --repeat), peak extra memory (CUDA: peak
allocated minus the inputs and their gradients), and bytes sent per step.  The ring's bytes are
measured (every tensor it hands to batch_isend_irecv is counted); both approaches also get the
model: ring (W-1) blocks forward, (W-1) blocks + W fp32 block gradients backward; gather a
ring all-gather forward and a reduce-scatter backward, (W-1) blocks each.

    torchrun --nproc-per-node 8 scripts/bench_ring.py --batches 8192 32768 --output ring.json
    torchrun --nproc-per-node 2 scripts/bench_ring.py --device cpu --batches 512 --dim 64 \
        --dtype fp32 --output ring_cpu.json                    # CPU smoke run over gloo
    torchrun --nproc-per-node 2 scripts/bench_ring.py --backend gloo --batches 4096 \
        --output ring_1gpu.json     # two ranks sharing one GPU (gloo stages through the host)
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from harness import GB, Results, Stopwatch, free, peak_memory, recording_oom, sync

from retriever.loss import contrastive_loss

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCALE = 20.0


class SentBytes:
    """Counts the bytes of every isend in batch_isend_irecv while active (the ring's traffic)."""

    def __init__(self) -> None:
        self.total = 0
        self._original = dist.batch_isend_irecv

    def __enter__(self) -> SentBytes:
        def counting(ops):
            for op in ops:
                if op.op is dist.isend:
                    self.total += op.tensor.numel() * op.tensor.element_size()
            return self._original(ops)

        dist.batch_isend_irecv = counting
        return self

    def __exit__(self, *exc) -> None:
        dist.batch_isend_irecv = self._original


def ring_step(q, d, args) -> torch.Tensor:
    loss = contrastive_loss(
        q, d, scale=SCALE, symmetric=args.symmetric, group=dist.group.WORLD, impl=args.impl
    )
    loss.backward()
    return loss.detach()


def gather_step(q, d, args) -> torch.Tensor:
    # What sentence-transformers' all_gather_with_grad calls (deprecated in recent torch).
    rank, n_q = dist.get_rank(), q.shape[0]
    everyone = torch.cat(dist_fn.all_gather(d), dim=0)
    labels = torch.arange(n_q, device=q.device) + rank * d.shape[0]
    loss = contrastive_loss(q, everyone, scale=SCALE, labels=labels, impl=args.gather_impl)
    if args.symmetric:  # the same global loss as the ring's: local positives vs all queries
        all_queries = torch.cat(dist_fn.all_gather(q), dim=0)
        own = torch.arange(n_q, device=q.device) + rank * n_q
        reverse = contrastive_loss(
            d[:n_q], all_queries, scale=SCALE, labels=own, impl=args.gather_impl
        )
        loss = (loss + reverse) / 2
    loss.backward()
    return loss.detach()


def model_bytes(mode: str, n_q: int, n_d: int, dim: int, elt: int, world: int, sym: bool):
    """Bytes a rank sends per forward+backward step (equal sizes on every rank; no ids)."""
    if world == 1:
        return 0
    if mode == "gather":  # ring all-gather forward, reduce-scatter backward
        per_direction = lambda n: 2 * (world - 1) * n * dim * elt
    else:  # forward: W-1 blocks; backward: W-1 blocks again + W fp32 gradient hops
        per_direction = lambda n: 2 * (world - 1) * n * dim * elt + world * n * dim * 4
    return per_direction(n_d) + (per_direction(n_q) if sym else 0)


def measure(step, q, d, args, device) -> dict:
    """Median time, peak extra memory, bytes the ring sent and the loss (the same for both
    modes: a sanity check that they compute the same thing)."""
    times, extra, sent = [], None, 0
    grad_bytes = q.numel() * q.element_size() + d.numel() * d.element_size()
    watch = Stopwatch(device)
    for i in range(args.warmup + args.repeat):
        q.grad = d.grad = None
        sync(device)
        with peak_memory(device) as memory:
            dist.barrier()
            with watch, SentBytes() as counter:
                loss = step(q, d, args)
        if i >= args.warmup:
            times.append(watch.seconds)
            sent = counter.total
            if memory.extra is not None:
                extra = (memory.extra - grad_bytes) / GB
    return dict(seconds=statistics.median(times), extra=extra, sent=sent, loss=float(loss))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help="nccl on CUDA, gloo on CPU by default")
    p.add_argument("--batches", nargs="+", type=int, default=[4096, 16384], help="Bq per rank")
    p.add_argument("--negatives", type=int, default=1, help="Bd = Bq * (1 + negatives)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--modes", nargs="+", default=["ring", "gather"], choices=["ring", "gather"])
    p.add_argument("--impl", default="auto", help="ring block backend (auto: triton on CUDA)")
    p.add_argument("--gather-impl", default="naive", help="local loss after the all-gather")
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--output", type=Path, required=True)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = args.backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[args.dtype]
    elt = torch.empty((), dtype=dtype).element_size()
    steps = {"ring": ring_step, "gather": gather_step}
    # Rank 0 writes every rank's records, in rank order, after each batch size.
    fields = dict(world_size=world, backend=backend)
    results = (
        Results(args.output, vars(args), device, key="records", fields=fields, echo=False)
        if rank == 0
        else None
    )
    per_rank: list[list[dict]] = [[] for _ in range(world)]
    for n_q in args.batches:
        n_d = n_q * (1 + args.negatives)
        g = torch.Generator(device=device).manual_seed(1000 + rank)
        q = F.normalize(torch.randn(n_q, args.dim, device=device, generator=g), dim=-1)
        d = F.normalize(torch.randn(n_d, args.dim, device=device, generator=g), dim=-1)
        q, d = q.to(dtype).requires_grad_(), d.to(dtype).requires_grad_()
        records = []
        for mode in args.modes:
            record = dict(
                rank=rank,
                mode=mode,
                impl=args.impl if mode == "ring" else args.gather_impl,
                batch_per_rank=n_q,
                candidates_per_rank=n_d,
                global_candidates=world * n_d,
                dim=args.dim,
                dtype=args.dtype,
                symmetric=args.symmetric,
                model_bytes_sent=model_bytes(mode, n_q, n_d, args.dim, elt, world, args.symmetric),
            )
            # Every rank runs the same sizes, so every rank fails at the same point.
            with recording_oom(record, device):
                m = measure(steps[mode], q, d, args, device)
                flops = 6 * n_q * world * n_d * args.dim * (2 if args.symmetric else 1)
                record.update(
                    status="ok",
                    seconds=m["seconds"],
                    tflops=flops / m["seconds"] / 1e12,
                    extra_memory_gb=m["extra"],
                    measured_bytes_sent=m["sent"] if mode == "ring" else None,
                    loss=m["loss"],
                )
            records.append(record)
        del q, d
        free(device)
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        if results is not None:
            for mine, theirs in zip(per_rank, gathered):
                mine.extend(theirs)
            results.put("records", [r for rank_records in per_rank for r in rank_records])

    if results is not None:
        flat = results.records()
        name = results.data["device"]
        print(f"{name}, W={world}, {backend}")
        for r in flat:
            if r["status"] != "ok":
                print(f"rank {r['rank']} {r['mode']:6s} Bq={r['batch_per_rank']}: {r['status']}")
                continue
            mem = "n/a" if r["extra_memory_gb"] is None else f"{r['extra_memory_gb']:.3f} GB"
            print(
                f"rank {r['rank']} {r['mode']:6s} Bq={r['batch_per_rank']} "
                f"Bd={r['candidates_per_rank']}: loss {r['loss']:.5f}, {r['seconds']:.4g} s, "
                f"extra memory {mem}, "
                f"sent {r['model_bytes_sent'] / 1e6:.1f} MB (model)"
                + (
                    f", {r['measured_bytes_sent'] / 1e6:.1f} MB (measured)"
                    if r["measured_bytes_sent"] is not None
                    else ""
                )
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
