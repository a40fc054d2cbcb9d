"""An STS training source: sentence pairs with gold scores (``sentence1``, ``sentence2``,
``score``), trained with CoSENT beside the retrieval sources.

Both sentences are tokenised with the query side's settings (a symmetric task) into one token
pool; a group is (first row, second row, []) as the Collator expects, so a pair batch is a
``Batch`` whose "queries" are the first sentences and "documents" the second, plus the scores.
Each epoch is a seeded shuffle cut into batches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from retriever.eval.sts import STSTask
from retriever.model.settings import SideSettings
from retriever.train.batches import TextPool
from retriever.train.tokens import tokenizer_fingerprint


class PairSet:
    """Scored sentence pairs as per-epoch batches of token rows."""

    def __init__(self, task: STSTask, seed: int, max_examples: int | None = None):
        limit = max_examples or len(task.scores)
        self.first, self.second = task.first[:limit], task.second[:limit]
        self.scores = task.scores[:limit].astype(np.float32)
        self.seed = seed
        self.pool: TextPool | None = None

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def queries(self) -> TextPool | None:
        """Both sentences' pool: the Collator's query and document pools are this one."""
        return self.pool

    documents = queries

    def attach_tokens(
        self, tokenizer: Any, settings: SideSettings, cache_dir: str | os.PathLike | None,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        self.pool = TextPool(settings)
        self._rows = np.array([[self.pool.add(a), self.pool.add(b)]
                               for a, b in zip(self.first, self.second)])  # fmt: skip
        self.pool.tokenize(tokenizer, cache_dir, "tokenize pairs",
                           tokenizer_hash=tokenizer_fingerprint(tokenizer), **kwargs)  # fmt: skip

    def epoch_plan(self, epoch: int, batch_size: int) -> list[list[int]]:
        """A seeded shuffle of the pairs, cut into batches (the incomplete last one dropped)."""
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self))
        return [order[i : i + batch_size].tolist()
                for i in range(0, len(order) - batch_size + 1, batch_size)]  # fmt: skip

    def rows(self, epoch: int, index: int) -> tuple[int, int, list[int]]:
        first, second = self._rows[index]
        return int(first), int(second), []

    def scores_of(self, epoch: int, indices: Sequence[int]) -> torch.Tensor:
        """The gold scores of the pairs ``indices`` (the same in every epoch)."""
        return torch.from_numpy(self.scores[np.asarray(indices, dtype=np.int64)])

    def fingerprint(self) -> str:
        import xxhash

        h = xxhash.xxh3_128()
        for a, b, s in zip(self.first, self.second, self.scores.tolist()):
            h.update(f"{a}\x1f{b}\x1f{s!r}\x1e".encode())
        return h.hexdigest()
