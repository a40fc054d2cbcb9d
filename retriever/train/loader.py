"""One DataLoader for a whole run: every batch from the resume point to the last step, in step
order, across epoch boundaries.

Its dataset is an iterable over steps. With W workers, worker k collates steps k, k + W, ...
and the DataLoader hands them out in step order, so the next epoch's first batches are ready
while the current epoch ends: workers start once, nothing waits at an epoch boundary. Each
worker computes the epoch plans it needs (`retriever.train.data.epoch_batches`) itself, off the
training process. A step's batch is the same whatever the number of workers and whether the
run was resumed, since groups and plans depend only on (seed, epoch, example).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from retriever.train.batches import Batch, Collator
from retriever.train.data import TrainSet, epoch_batches


@dataclass(frozen=True)
class Position:
    """Where the data stands: the next batch is batch ``batch`` of epoch ``epoch``."""

    epoch: int
    batch: int


class StepBatches(torch.utils.data.IterableDataset):
    """Items ``(epoch, batch index in the epoch, Batch)`` for ``steps`` steps from ``start``;
    each process collates its own share (``rank`` of ``world``) of every global batch."""

    def __init__(
        self,
        train_set: TrainSet,
        collator: Collator,
        batch_size: int,
        start: Position,
        steps: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.train_set, self.collator = train_set, collator
        self.batch_size, self.start, self.steps = batch_size, start, steps
        self.rank, self.world = rank, world

    def plan(self) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, index in the epoch, global batch) for every step, in order."""
        epoch, skip, produced = self.start.epoch, self.start.batch, 0
        while produced < self.steps:
            batches = epoch_batches(self.train_set, epoch, self.batch_size)
            if not batches:
                raise RuntimeError(f"epoch {epoch} makes no batch of {self.batch_size}")
            for index in range(skip, len(batches)):
                if produced == self.steps:
                    return
                yield epoch, index, batches[index]
                produced += 1
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[int, int, Batch]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        size = self.batch_size // self.world
        for step, (epoch, index, batch) in enumerate(self.plan()):
            if step % workers == worker:
                local = batch[self.rank * size : (self.rank + 1) * size]
                groups = [self.train_set.rows(epoch, i) for i in local]
                yield epoch, index, self.collator(groups)


def run_loader(
    dataset: StepBatches, num_workers: int, pin_memory: bool, seed: int
) -> torch.utils.data.DataLoader:
    """The run's DataLoader over ``dataset`` (items are whole batches)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Its own generator: starting workers must not draw from the global RNG, or a resumed
        # run would see different dropout masks.
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=2 if num_workers else None,
    )
