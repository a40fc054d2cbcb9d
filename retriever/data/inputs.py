"""Training data passed from Python: what a script may hand the trainer, as records.

* in memory: a list of dicts or a ``datasets.Dataset``, read whole (:func:`records_in_memory`);
* streams: a ``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``), a JSONL file
  read line by line, a generator function or any re-iterable object (:class:`RecordStream`),
  read as training goes and never held whole.

A record is a mapping with the columns of the JSONL format (``query``/``anchor``,
``pos``/``positive``, ``neg``/``negative_i``, ``pos_scores``/``neg_scores``; for STS,
``sentence1``, ``sentence2``, ``score``); each comes with a ``where`` (``file:line`` or
``NAME row N``) that errors name.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from retriever.data.examples import DataError
from retriever.data.texts import read_jsonl

Record = tuple[str, Mapping[str, Any]]  # (where, record)


def is_stream(data: Any) -> bool:
    """Whether ``data`` is read as a stream: anything iterable that is neither a list, a tuple
    nor a ``datasets.Dataset`` (those are read whole)."""
    if isinstance(data, (list, tuple, str, bytes, Mapping)):
        return False
    if _is_datasets(data, "Dataset") or _is_table(data):
        return False
    return isinstance(data, RecordStream) or callable(data) or isinstance(data, Iterable)


def records_in_memory(data: Any, name: str) -> list[Record]:
    """Every record of a list of dicts or a ``datasets.Dataset``, with where it stands."""
    if not isinstance(data, (list, tuple)) and not _is_datasets(data, "Dataset"):
        hint = ""
        if _is_datasets(data, "DatasetDict") or _is_datasets(data, "IterableDatasetDict"):
            hint = f" (pick a split: dataset[{next(iter(data), 'train')!r}])"
        elif _is_table(data) and type(data).__name__ == "ndarray":
            hint = " (convert it: array.tolist())"
        elif _is_table(data):
            hint = " (convert it: datasets.Dataset.from_pandas(frame) or frame.to_dict('records'))"
        elif is_stream(data):
            hint = " (a stream, but its source says streaming: false)"
        raise DataError(
            f"{name}: expected a list of dicts, a datasets.Dataset or a stream, got "
            f"{type(data).__name__}{hint}"
        )
    records = [(f"{name} row {n}", _mapping(row, name, n)) for n, row in enumerate(data, 1)]
    if not records:
        raise DataError(f"{name}: the dataset has no rows")
    return records


def _is_table(data: Any) -> bool:
    """A pandas or polars DataFrame, or a numpy array: iterating one yields its column names
    or rows of values, not records."""
    kind, home = type(data), type(data).__module__.split(".")[0]
    return kind.__name__ in ("DataFrame", "ndarray") and home in ("pandas", "polars", "numpy")


class RecordStream:
    """Records read as training goes, epoch after epoch: :meth:`epoch` restarts the stream
    (a ``datasets.IterableDataset`` gets ``set_epoch``, so its shuffle changes), and
    :meth:`shard` keeps one process's part of it (``split_dataset_by_node`` for a
    ``datasets.IterableDataset``; every ``world``-th record otherwise)."""

    def __init__(
        self, data: Any, name: str, rank: int = 0, world: int = 1, limit: int | None = None
    ) -> None:
        """``limit``: read only the first records of the stream (before it is sharded)."""
        if isinstance(data, RecordStream):
            data, name, limit = data.data, data.name, data.limit if limit is None else limit
        self.data, self.name, self.rank, self.world, self.limit = data, name, rank, world, limit
        if isinstance(data, Iterator):  # a generator object: read once, never again
            raise DataError(
                f"{name}: a generator (or other iterator) can be read only once, but the "
                "trainer reads a stream again for each epoch, on resume and in each DataLoader "
                "worker: pass the generator function itself, a re-iterable object or a "
                "datasets.IterableDataset (e.g. IterableDataset.from_generator(function))"
            )
        known = isinstance(data, _JsonlFile) or _is_datasets(data, "IterableDataset")
        if not (known or callable(data) or _iterable(data)):
            raise DataError(f"{name}: expected a stream of records, got {type(data).__name__}")

    @classmethod
    def jsonl(cls, path: str, limit: int | None = None) -> RecordStream:
        """A JSONL(.gz) file, line by line (its lines are named in errors)."""
        return cls(_JsonlFile(path), path, limit=limit)

    def shard(self, rank: int, world: int) -> RecordStream:
        data = self.data
        if world > 1 and _is_datasets(data, "IterableDataset"):
            from datasets.distributed import split_dataset_by_node

            if self.limit is not None:
                data = data.take(self.limit)
            data = split_dataset_by_node(data, rank=rank, world_size=world)
            return _Sharded(data, self.name, rank, world)
        return RecordStream(data, self.name, rank, world, self.limit)

    def epoch(self, epoch: int) -> Iterator[Record]:
        """The records of ``epoch`` (this process's share of them)."""
        records = itertools.islice(self._records(epoch), self.limit)
        if self.world > 1:
            records = itertools.islice(records, self.rank, None, self.world)
        return records

    def _records(self, epoch: int) -> Iterator[Record]:
        data = self.data
        if isinstance(data, _JsonlFile):
            return data.records()
        if _is_datasets(data, "IterableDataset"):
            return self._rows_of(data, epoch)
        return self._numbered(data() if callable(data) else data)

    def _rows_of(self, data: Any, epoch: int) -> Iterator[Record]:
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        # .iter() reads the whole (process's) stream in every DataLoader worker, where
        # iterating the dataset itself would split it between the workers.
        rows = (
            dict(zip(batch, values))
            for batch in data.iter(batch_size=256)
            for values in zip(*batch.values())
        )
        return self._numbered(rows)

    def _numbered(self, rows: Iterable[Any]) -> Iterator[Record]:
        for n, row in enumerate(rows, 1):
            yield f"{self.name} row {n}", _mapping(row, self.name, n)


class _Sharded(RecordStream):
    """A ``datasets.IterableDataset`` already cut and split by ``split_dataset_by_node``."""

    def epoch(self, epoch: int) -> Iterator[Record]:
        return self._records(epoch)


class _JsonlFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def records(self) -> Iterator[Record]:
        try:
            for line_no, record in read_jsonl(self.path):
                yield f"{self.path}:{line_no}", record
        except ValueError as exc:  # malformed lines, named
            raise DataError(str(exc)) from None


def first_record(stream: RecordStream) -> Record:
    """The first record of the stream's first epoch (checked before training starts)."""
    record = next(iter(stream.epoch(0)), None)
    if record is None:
        raise DataError(f"{stream.name}: the stream is empty (it yielded no record)")
    return record


def _mapping(row: Any, name: str, n: int) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise DataError(
            f"{name} row {n}: expected a mapping of columns (query, pos, neg, ...), got "
            f"{type(row).__name__}"
        )
    return row


def _iterable(data: Any) -> bool:
    return isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping))


def _is_datasets(data: Any, kind: str) -> bool:
    """Whether ``data`` is a ``datasets.{kind}`` (without importing datasets when it is not)."""
    module = type(data).__module__ or ""
    if not module.startswith("datasets"):
        return False
    import datasets

    return isinstance(data, getattr(datasets, kind))


__all__ = ["RecordStream", "first_record", "is_stream", "records_in_memory"]
