"""What receiving one training batch from a DataLoader worker costs the main process: a batch
of `--chunks` chunks of `--rows` texts sent as the trainer sends it now (each side packed into
two flat tensors, retriever.train.batches.PackedChunks) against one tensor pair per chunk (how
it was sent before), in one run. The defaults are a 262,144-query batch without negatives at
chunk 512: 512 query chunks of 24 tokens and 512 document chunks of 200.

    python scripts/bench_batch_transfer.py --output batch_transfer.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from harness import Results
from torch.utils.data import DataLoader, Dataset

from retriever.train.batches import Batch, TokenChunk


class PerChunk(Batch):
    """A Batch pickled the old way: every chunk's two tensors on their own."""

    def __reduce__(self) -> tuple:
        return (Batch, (self.query_chunks, self.document_chunks, *self._rest()))


class Batches(Dataset):
    def __init__(self, kind: type, chunks: int, rows: int) -> None:
        self.kind, self.chunks, self.rows = kind, chunks, rows

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> Batch:
        g = torch.Generator().manual_seed(i)

        def side(width: int) -> list[TokenChunk]:
            return [TokenChunk(torch.randint(0, 30000, (self.rows, width), dtype=torch.int32,
                                             generator=g), torch.full((self.rows,), width))
                    for _ in range(self.chunks // 2)]  # fmt: skip

        n = self.rows * self.chunks // 2
        return self.kind(side(24), side(200), torch.arange(n), torch.arange(n), torch.arange(n),
                         n, 0)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=1024, help="both sides together")
    parser.add_argument("--rows", type=int, default=512, help="texts per chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    if min(args.chunks, args.rows, args.repeats) < 1:
        parser.error("--chunks, --rows and --repeats must be at least 1")
    results = Results(args.output, vars(args), "cpu", argv=argv)
    for name, kind in (("one tensor pair per chunk", PerChunk), ("packed", Batch)):
        loader = DataLoader(Batches(kind, args.chunks, args.rows), batch_size=None,
                            num_workers=1, prefetch_factor=4, persistent_workers=True)  # fmt: skip
        batches = iter(loader)
        next(batches)
        for repeat in range(args.repeats):
            time.sleep(3)  # the worker has the next batches ready: only receiving is timed
            wall, cpu = time.perf_counter(), time.process_time()
            next(batches)
            results.add({"mode": name, "repeat": repeat, "chunks": args.chunks,
                         "wall_s": time.perf_counter() - wall,
                         "main_process_cpu_s": time.process_time() - cpu})  # fmt: skip
        del batches
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
