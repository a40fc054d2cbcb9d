"""Training examples as per-epoch groups, and the global batches of an epoch.

Each epoch, every example yields a *group*: one of its positives and ``negatives`` of its hard
negatives, drawn from a generator seeded by (seed, epoch, example), so a group does not depend
on which worker builds it or on whether the run was resumed. Batches are global (all processes)
and never hold the same positive text twice; candidates that still coincide (a negative of one
query that is another's positive) are told apart by ``candidate_ids`` (a hash of the text),
which the loss uses to leave them out of the denominator instead of counting a false negative.

Every distinct query and document text is tokenised once, before training, into a token cache
on disk that later epochs and runs reuse (:meth:`TrainSet.attach_tokens`, `train.tokens`). A
group is then three token-table rows, which the Collator (`train.batches`) turns into chunks.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from retriever.data.examples import DataError, Example
from retriever.data.texts import text_id
from retriever.model import Encoder
from retriever.model.settings import SideSettings
from retriever.train.batches import Batch, Collator, TextPool
from retriever.train.tokens import tokenizer_fingerprint


class TrainSet(torch.utils.data.Dataset):
    """Examples as per-epoch groups. Indexed by ``(epoch, example index)``, returns
    ``(query, positive, [negatives])``, the same for a given key in any process.

    After :meth:`attach_tokens`, :meth:`rows` gives the same group as token-table rows, which
    is what the DataLoader's workers collate (no tokenisation during training)."""

    def __init__(
        self,
        examples: Sequence[Example],
        negatives: int,
        seed: int,
        teacher: bool = False,
        keys: Sequence[int] | None = None,
    ) -> None:
        """``teacher``: batches carry the examples' teacher scores (every example needs them
        for its positives and negatives). ``keys``: what seeds each example's draws instead of
        its index (a streamed batch's examples: their places in the stream)."""
        self.examples = list(examples)
        self.negatives = negatives
        self.seed = seed
        self.teacher = teacher
        self.keys = list(keys) if keys is not None else None
        for e in self.examples if teacher else []:
            check_teacher_scores(e)
        # Positive text ids, to keep duplicates out of a batch without hashing every epoch.
        self._positive_ids = [[text_id(p) for p in e.positives] for e in self.examples]
        self.queries: TextPool | None = None
        self.documents: TextPool | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def attach_tokens(
        self,
        tokenizer: Any,
        query: SideSettings,
        document: SideSettings,
        cache_dir: str | os.PathLike | None,
        **kwargs: Any,
    ) -> None:
        """Tokenise every query, positive and negative once (``retriever.train.tokens``)."""
        self.queries, self.documents = TextPool(query), TextPool(document)
        self._query_rows = np.array([self.queries.add(e.query) for e in self.examples])
        self._positive_rows = [tuple(map(self.documents.add, e.positives)) for e in self.examples]
        self._negative_rows = [tuple(map(self.documents.add, e.negatives)) for e in self.examples]
        # The cache's key (hashing the tokenizer takes ~1 s): not for in-memory tables.
        fingerprint = tokenizer_fingerprint(tokenizer) if cache_dir is not None else None
        for pool, side in ((self.queries, "queries"), (self.documents, "documents")):
            pool.tokenize(
                tokenizer, cache_dir, f"tokenize {side}", tokenizer_hash=fingerprint, **kwargs
            )

    def fingerprint(self) -> str:
        """A hash of every example's texts, in order (a resumed run checks it)."""
        import xxhash

        h = xxhash.xxh3_128()
        for e in self.examples:
            for text in (e.query, *e.positives, "\x00", *e.negatives, "\x01"):
                h.update(text.encode("utf-8"))
                h.update(b"\x1f")
        return h.hexdigest()

    def set_negatives(self, index: int, negatives: Sequence[str]) -> None:
        """Replace an example's hard negatives (dynamic mining); new texts are tokenised."""
        example = self.examples[index]
        if tuple(negatives) == example.negatives:
            return
        self.examples[index] = dataclasses.replace(
            example, negatives=tuple(negatives), negative_scores=None
        )
        if self.documents is not None:
            self._negative_rows[index] = tuple(map(self.documents.row_of, negatives))

    def _rng(self, epoch: int, index: int) -> np.random.Generator:
        key = index if self.keys is None else self.keys[index]
        return np.random.default_rng([self.seed, epoch, key])

    def _positive_index(self, rng: np.random.Generator, index: int) -> int:
        return positive_index(rng, len(self.examples[index].positives))

    def positive_id(self, epoch: int, index: int) -> int:
        ids = self._positive_ids[index]
        return ids[self._positive_index(self._rng(epoch, index), index)] if len(ids) > 1 else ids[0]

    def _pick(self, epoch: int, index: int) -> tuple[int, list[int]]:
        """(positive, negatives) of this epoch's group, as indices into the example's lists."""
        example = self.examples[index]
        if len(example.positives) == 1 and self.negatives == 0:
            return 0, []  # nothing to draw: no generator (it costs more than the rest)
        rng = self._rng(epoch, index)
        positive = self._positive_index(rng, index)
        pool, n = len(example.negatives), self.negatives
        if n == 0:
            return positive, []
        if pool >= n:
            picked = rng.choice(pool, size=n, replace=False)
        else:  # every negative once, the rest drawn with replacement
            extra = rng.integers(pool, size=n - pool)
            picked = rng.permutation(np.concatenate([np.arange(pool), extra]))
        return positive, [int(i) for i in picked]

    def __getitem__(self, key: tuple[int, int]) -> tuple[str, str, list[str]]:
        epoch, index = key
        example = self.examples[index]
        positive, negatives = self._pick(epoch, index)
        return example.query, example.positives[positive], [example.negatives[i] for i in negatives]

    def epoch_plan(self, epoch: int, batch_size: int) -> list[list[int]]:
        """The global batches of ``epoch`` (:func:`epoch_batches`)."""
        return epoch_batches(self, epoch, batch_size)

    def scores_of(self, epoch: int, indices: Sequence[int]) -> torch.Tensor | None:
        """The teacher scores of ``epoch``'s groups [len(indices), 1 + negatives] (the
        positive's first, in the groups' order), or None without a teacher."""
        if not self.teacher:
            return None
        rows = []
        for index in indices:
            example = self.examples[index]
            positive, negatives = self._pick(epoch, index)
            scores = example.negative_scores or ()
            rows.append([example.positive_scores[positive], *(scores[i] for i in negatives)])
        return torch.tensor(rows, dtype=torch.float32)

    def rows(self, epoch: int, index: int) -> tuple[int, int, list[int]]:
        """The group of ``(epoch, index)`` as (query row, positive row, negative rows)."""
        positive, negatives = self._pick(epoch, index)
        negative_rows = self._negative_rows[index]
        return (
            int(self._query_rows[index]),
            self._positive_rows[index][positive],
            [negative_rows[i] for i in negatives],
        )


def positive_index(rng: np.random.Generator, count: int) -> int:
    """Which of ``count`` positives a group takes (the first draw of its generator)."""
    return int(rng.integers(count)) if count > 1 else 0


def check_teacher_scores(example: Example) -> None:
    if example.positive_scores is None or (example.negatives and example.negative_scores is None):
        raise DataError(
            f"{example.source}: no teacher scores ('pos_scores' and 'neg_scores', one number "
            "per positive and negative): loss.distill_weight needs them on every line"
        )


def epoch_batches(train_set: TrainSet, epoch: int, batch_size: int) -> list[list[int]]:
    """The global batches of ``epoch``: a seeded shuffle cut into batches of ``batch_size``
    examples whose positives are all different texts. An example whose positive is already in
    the batch waits for the next one; the incomplete last batch is dropped."""
    order = np.random.default_rng([train_set.seed, epoch]).permutation(len(train_set))
    pending = deque(int(i) for i in order)
    batches: list[list[int]] = []
    while len(pending) >= batch_size:
        batch: list[int] = []
        seen: set[int] = set()
        deferred: list[int] = []
        while pending and len(batch) < batch_size:
            index = pending.popleft()
            key = train_set.positive_id(epoch, index)
            if key in seen:
                deferred.append(index)
            else:
                seen.add(key)
                batch.append(index)
        pending.extendleft(reversed(deferred))  # they open the next batch
        if len(batch) < batch_size:
            break
        batches.append(batch)
    return batches


def batch_of_texts(
    encoder: Encoder,
    groups: Sequence[tuple[str, str, Sequence[str]]],
    chunk_size: int,
    sort_by_length: bool = True,
) -> Batch:
    """The ``Batch`` the trainer makes of text groups ``(query, positive, [negatives])``,
    tokenised in memory (for tests, scripts and one-off steps)."""
    examples = [Example(q, (p,), tuple(n), f"group {i}") for i, (q, p, n) in enumerate(groups)]
    train_set = TrainSet(examples, len(groups[0][2]), seed=0)
    train_set.attach_tokens(
        encoder.tokenizer,
        encoder.side_settings("query"),
        encoder.side_settings("document"),
        None,
        show_progress=False,
    )
    assert train_set.queries is not None and train_set.documents is not None
    collator = Collator(
        train_set.queries, train_set.documents, encoder.tokenizer, chunk_size, sort_by_length
    )
    # Each group's own negatives, in order (no sampling: the groups are given).
    rows = [
        (
            int(train_set._query_rows[i]),
            train_set._positive_rows[i][0],
            list(train_set._negative_rows[i]),
        )
        for i in range(len(groups))
    ]
    return collator(rows)
