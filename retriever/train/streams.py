"""A retrieval source read as a stream (``data.streaming``, or a stream passed from Python):
examples are read, grouped into batches, tokenised and collated as training goes, in the
DataLoader's workers, and never held whole.

Each process reads its own shard of the stream (`retriever.data.inputs.RecordStream.shard`)
and cuts it into batches of its rows of the source's share, with the rule of map-style data:
no batch holds the same positive text twice (an example whose positive is already in the batch
waits for the next one), and the incomplete last batch of an epoch is dropped. Every worker
walks the whole shard (reading is cheap next to tokenising) and collates only its own steps, so
a step's batch does not depend on the number of workers. A position is ``(epoch, batch)``, as
for map-style data: a resumed run walks the epoch again up to it (reading, not tokenising).
Groups draw their positive and negatives from ``(seed, epoch, place in the stream)``.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import xxhash

from retriever.data.examples import DataError, Example, example_from_record
from retriever.data.inputs import RecordStream, first_record
from retriever.data.texts import text_id
from retriever.model.settings import SideSettings
from retriever.train.batches import Batch, Collator
from retriever.train.data import TrainSet, check_teacher_scores, positive_index
from retriever.train.sources import rank_rows

FINGERPRINT_RECORDS = 1000  # a resumed run checks that the stream starts as it did

StreamBatch = list[tuple[int, Example]]  # (place in this process's stream, example)


class StreamSet:
    """One process's shard of a streamed retrieval source, as batches of examples."""

    streaming = True
    queries = documents = None  # no token pools: each batch is tokenised on its own

    def __init__(
        self,
        stream: RecordStream,
        negatives: int,
        seed: int,
        *,
        teacher: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.stream = stream.shard(rank, world)
        self.negatives, self.seed, self.teacher = negatives, seed, teacher
        self.rank, self.world = rank, world
        self._example(*first_record(self.stream))  # a bad first record stops the start

    def attach_tokens(
        self, tokenizer: Any, query: SideSettings, document: SideSettings, cache_dir: Any,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        """Remember how to tokenise (batches are tokenised as they are collated; no cache)."""
        self.tokenizer, self.query, self.document = tokenizer, query, document

    def _example(self, where: str, record: Any) -> Example:
        example = example_from_record(record, where)
        if self.negatives > 0 and not example.negatives:
            raise DataError(
                f"{where}: no hard negatives, but this source takes {self.negatives} per query "
                "(data.negatives); streamed examples each need some"
            )
        if self.teacher:
            check_teacher_scores(example)
        return example

    def _positive_id(self, epoch: int, key: int, example: Example) -> int:
        rng = np.random.default_rng([self.seed, epoch, key])
        return text_id(example.positives[positive_index(rng, len(example.positives))])

    def epoch_plan(self, epoch: int, share: int) -> Iterator[StreamBatch]:
        """The batches of ``epoch``: this process's rows of each global batch of ``share``."""
        size = rank_rows(share, self.rank, self.world)
        size = size.stop - size.start
        records = enumerate(self.stream.epoch(epoch))
        waiting: deque[tuple[int, Example]] = deque()
        while True:
            batch: StreamBatch = []
            seen: set[int] = set()
            deferred: StreamBatch = []
            while len(batch) < size:
                if waiting:
                    key, example = waiting.popleft()
                else:
                    item = next(records, None)
                    if item is None:
                        return  # the incomplete last batch is dropped
                    key, (where, record) = item
                    example = self._example(where, record)
                positive = self._positive_id(epoch, key, example)
                if positive in seen:
                    deferred.append((key, example))
                else:
                    seen.add(positive)
                    batch.append((key, example))
            waiting.extendleft(reversed(deferred))  # they open the next batch
            yield batch

    def collate(self, collator: Collator, epoch: int, batch: StreamBatch) -> Batch:
        """Tokenise a batch's texts and collate them as ``collator`` does map-style rows."""
        keys = [key for key, _ in batch]
        part = TrainSet([e for _, e in batch], self.negatives, self.seed, self.teacher, keys)
        part.attach_tokens(self.tokenizer, self.query, self.document, None, show_progress=False)
        own = copy.copy(collator)
        own.queries, own.documents = part.queries, part.documents
        collated = own([part.rows(epoch, i) for i in range(len(batch))])
        collated.scores = part.scores_of(epoch, range(len(batch)))
        collated.example_indices = torch.as_tensor(keys, dtype=torch.int64)
        return collated

    def fingerprint(self) -> str:
        """A hash of the stream's first records (all of it is never read in advance)."""
        h = xxhash.xxh3_128()
        records = self.stream.epoch(0)
        for _, (where, record) in zip(range(FINGERPRINT_RECORDS), records):
            example = example_from_record(record, where)
            for text in (example.query, *example.positives, "\x00", *example.negatives, "\x01"):
                h.update(text.encode("utf-8"))
                h.update(b"\x1f")
        return "stream:" + h.hexdigest()
