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
from typing import Any

import torch

from retriever.data.examples import DataError
from retriever.train.batches import Batch, Collator
from retriever.train.sources import rank_rows


@dataclass(frozen=True)
class Position:
    """Where a source's data stands: its next batch is batch ``batch`` of epoch ``epoch``."""

    epoch: int
    batch: int


@dataclass(frozen=True)
class Stream:
    """One source in the loader: its examples (a TrainSet or a PairSet: ``epoch_plan``,
    ``rows``, ``scores_of``), its Collator, its share of each global batch, where it stands."""

    dataset: Any
    collator: Collator
    share: int
    start: Position


@dataclass
class Part:
    """One source's part of a step: where its data stood, and this process's batch of it."""

    epoch: int
    index: int
    batch: Batch

    def pin_memory(self) -> Part:
        """Called by the DataLoader (pin_memory=True): without it the loader passes an object
        it does not know through unpinned, and every chunk's copy to the GPU waits for the
        stream."""
        return Part(self.epoch, self.index, self.batch.pin_memory())


def stream_plan(stream: Stream) -> Iterator[tuple[int, int, Any]]:
    """(epoch, index in the epoch, batch) of a source, epoch after epoch, without end: a source
    that runs out starts its next epoch while the others go on. A batch is the global batch's
    example indices, or, for a streamed source, this process's examples (walked, not
    collated, up to where the run resumes)."""
    epoch, skip = stream.start.epoch, stream.start.batch
    while True:
        count = 0
        for index, batch in enumerate(stream.dataset.epoch_plan(epoch, stream.share)):
            count += 1
            if index >= skip:
                yield epoch, index, batch
        if count == 0:
            raise DataError(
                f"epoch {epoch} of a source makes no batch of {stream.share} rows (too few "
                "examples with distinct positives, or an empty stream)"
            )
        epoch, skip = epoch + 1, 0


class StepBatches(torch.utils.data.IterableDataset):
    """Items: for each of ``steps`` steps, a list of every source's :class:`Part` (each process
    collates its own rows of every source's global batch: `train.sources.rank_rows`)."""

    def __init__(self, streams: list[Stream], steps: int, rank: int = 0, world: int = 1) -> None:
        self.streams, self.steps, self.rank, self.world = streams, steps, rank, world

    def __iter__(self) -> Iterator[list[Part] | DataProblem]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plans = [stream_plan(stream) for stream in self.streams]
        try:
            for step in range(self.steps):
                items = [next(plan) for plan in plans]  # every worker walks every plan
                if step % workers == worker:
                    yield [self._part(s, *item) for s, item in zip(self.streams, items)]
        except DataError as exc:  # a bad streamed line: its message, not a worker's traceback
            yield DataProblem(str(exc))

    def _part(self, stream: Stream, epoch: int, index: int, batch: Any) -> Part:
        if getattr(stream.dataset, "streaming", False):  # already this process's examples
            return Part(epoch, index, stream.dataset.collate(stream.collator, epoch, batch))
        local = batch[rank_rows(stream.share, self.rank, self.world)]
        collated = stream.collator([stream.dataset.rows(epoch, i) for i in local])
        collated.scores = stream.dataset.scores_of(epoch, local)
        collated.example_indices = torch.as_tensor(local, dtype=torch.int64)
        return Part(epoch, index, collated)


@dataclass(frozen=True)
class DataProblem:
    """Bad data met in a DataLoader worker, handed over as an item: the DataLoader would raise
    it in the training process with the worker's traceback folded into its message."""

    message: str


def steps_of(loader: torch.utils.data.DataLoader) -> Iterator[list[Part]]:
    """The loader's items; bad data found while loading them stops the run with its message."""
    for item in loader:
        if isinstance(item, DataProblem):
            raise DataError(item.message)
        yield item


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
