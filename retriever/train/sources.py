"""Several training sources in one run (Conan-embedding's multi-task training): what each is, and
how a global batch is shared between them.

``data.train`` is one path (a single retrieval source, configured by the other ``data.*``
options) or a list of sources::

    data:
      train:
        - {name: scifact, path: ../shared/data/scifact, split: train, task: retrieval, weight: 3}
        - {name: stsb, path: ../shared/data/stsb/train.jsonl, task: sts, weight: 1}

Every step holds every source (no alternating between tasks): the global batch is split by
weight, and each source's share is split again over the processes, so that each source's global
batch is the same every step (cross-GPU batch balance). A bad entry is an error naming the
source (its index and name), the field and the line it was set on.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

TASKS = ("retrieval", "sts")


@dataclass(frozen=True)
class Source:
    """One training source. Unset fields take the ``data.*`` option of the same name (and the
    model's prefixes)."""

    name: str
    path: str
    task: str = "retrieval"
    weight: float = 1.0
    split: str = "train"
    format: str = "auto"
    negatives: int = 0
    max_examples: int | None = None
    query_prefix: str | None = None  # an instruction for this source's queries
    document_prefix: str | None = None
    instruction: str | None = None  # fills model.query_template's {instruction}
    loss_weight: float | None = None  # its loss's weight in the sum; None: its batch share
    streaming: bool = False  # read as a stream (train.streams), not whole
    # The examples themselves, when a script passed them (Trainer(train_dataset=...)): a list
    # of dicts, a datasets.Dataset, or a stream; ``path`` then only names them.
    data: Any = field(default=None, compare=False, repr=False)


_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "path": (str,),
    "task": (str,),
    "weight": (int, float),
    "loss_weight": (int, float, type(None)),
    "split": (str,),
    "format": (str,),
    "negatives": (int,),
    "max_examples": (int, type(None)),
    "query_prefix": (str, type(None)),
    "document_prefix": (str, type(None)),
    "instruction": (str, type(None)),
    "streaming": (bool,),
}


class SourceError(ValueError):
    """A bad source entry; the message names the source, the field and where it was set."""


def sources_of(config: Any) -> list[Source]:
    """The sources ``config.data.train`` names (one for a plain path)."""
    d = config.data
    if isinstance(d.train, str):
        name = Path(d.train.rstrip("/")).name.split(".")[0] or "train"
        return [Source(name, d.train, "retrieval", 1.0, d.split, d.format, d.negatives,
                       d.max_examples, streaming=d.streaming)]  # fmt: skip
    sources = [_parse(config, i, entry) for i, entry in enumerate(d.train)]
    if not sources:
        raise SourceError(f"{config.where('data.train')}: data.train: the list of sources is empty")
    _check_names(config, sources)
    return sources


def sources_of_datasets(config: Any, train_dataset: Any) -> list[Source]:
    """The sources of ``Trainer(train_dataset=...)``: one dataset (a list of dicts, a
    ``datasets.Dataset``, a stream), or a dict of name -> dataset, or name -> ``{"dataset":
    ..., task, weight, ...}`` with a source's fields; unset fields take the data.* options."""
    from retriever.data.inputs import is_stream

    named = train_dataset if _is_plain_dict(train_dataset) else {"train": train_dataset}
    sources = []
    for i, (name, value) in enumerate(named.items()):
        entry = dict(value) if _is_plain_dict(value) else {"dataset": value}
        label = f"train_dataset[{name!r}]"
        if "dataset" not in entry:
            raise SourceError(f"{label}: missing 'dataset' (the examples of this source)")
        data = entry.pop("dataset")
        if "path" in entry:
            raise SourceError(f"{label}: 'path' and 'dataset' both given; keep one")
        entry = {"name": str(name), "path": f"train_dataset[{name!r}]", **entry}
        entry.setdefault("streaming", is_stream(data))
        source = _parse(config, i, entry, where=label)
        sources.append(dataclasses.replace(source, data=data))
    _check_names(config, sources)
    return sources


def _is_plain_dict(value: Any) -> bool:
    """A dict a script wrote (a datasets.DatasetDict is a dict too, but one dataset)."""
    return isinstance(value, dict) and not type(value).__module__.startswith("datasets")


def _check_names(config: Any, sources: list[Source]) -> None:
    seen: dict[str, int] = {}
    for i, source in enumerate(sources):
        if source.name in seen:
            raise SourceError(
                f"{config.where(f'data.train[{i}]')}: data.train[{i}]: name {source.name!r} is "
                f"already the name of data.train[{seen[source.name]}]; names must differ"
            )
        seen[source.name] = i


def _parse(config: Any, index: int, entry: Any, where: str | None = None) -> Source:
    label = where or f"data.train[{index}]"
    where = config.where(f"data.train[{index}]") if where is None else "Trainer"
    if not isinstance(entry, dict):
        raise SourceError(f"{where}: {label}: expected a mapping (path, task, weight, ...)")
    if isinstance(entry.get("name"), str):
        label += f" ({entry['name']})"
    for key, value in entry.items():
        if key not in _TYPES:
            close = difflib.get_close_matches(str(key), list(_TYPES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SourceError(f"{where}: {label}: unknown field {key!r}{hint}; fields are "
                              f"{', '.join(_TYPES)}")  # fmt: skip
        if (isinstance(value, bool) and bool not in _TYPES[key]) or not isinstance(
            value, _TYPES[key]
        ):
            raise SourceError(f"{where}: {label}: {key}: got {value!r}, of the wrong type")
    if "path" not in entry:
        raise SourceError(f"{where}: {label}: missing field 'path'")
    d = config.data
    values = {
        "name": entry.get("name", f"source{index}"),
        "split": d.split,
        "format": d.format,
        "negatives": d.negatives if entry.get("task", "retrieval") == "retrieval" else 0,
        "streaming": d.streaming,
        **entry,
    }
    source = Source(**{f.name: values[f.name] for f in fields(Source) if f.name in values})
    _check(source, where, label)
    return source


FORMATS = ("auto", "jsonl", "beir", "datasets")


def _check(source: Source, where: str, label: str) -> None:
    if source.task not in TASKS:
        tasks = ", ".join(TASKS)
        raise SourceError(f"{where}: {label}: task: {source.task!r} is not one of {tasks}")
    if source.format not in FORMATS:
        close = difflib.get_close_matches(source.format, FORMATS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SourceError(
            f"{where}: {label}: format: {source.format!r} is not one of {', '.join(FORMATS)}{hint}"
        )
    if not (math.isfinite(source.weight) and source.weight > 0):
        raise SourceError(f"{where}: {label}: weight: expected a number > 0, got {source.weight}")
    if source.loss_weight is not None and not (
        math.isfinite(source.loss_weight) and source.loss_weight >= 0
    ):
        raise SourceError(
            f"{where}: {label}: loss_weight: expected a number >= 0, got {source.loss_weight}"
        )
    if source.negatives < 0:
        raise SourceError(f"{where}: {label}: negatives: expected an integer >= 0")
    if source.task == "sts" and source.negatives:
        raise SourceError(f"{where}: {label}: negatives: an sts source has none (pairs only)")
    if source.max_examples is not None and source.max_examples < 1:
        raise SourceError(f"{where}: {label}: max_examples: expected a positive integer")


def batch_shares(batch_size: int, sources: list[Source], processes: int) -> list[int]:
    """Each source's share of a global batch of ``batch_size``, by weight (largest remainders
    get the rows that rounding leaves); every share must give every process a row."""
    total = sum(s.weight for s in sources)
    exact = [batch_size * s.weight / total for s in sources]
    shares = [math.floor(x) for x in exact]
    for i in sorted(range(len(sources)), key=lambda i: shares[i] - exact[i])[
        : batch_size - sum(shares)
    ]:
        shares[i] += 1
    for source, share in zip(sources, shares):
        if share < processes:
            raise SourceError(
                f"data.train: source {source.name!r} gets {share} of the {batch_size} rows a "
                f"step, fewer than one for each of the {processes} process(es): raise "
                "training.batch_size or the source's weight"
            )
    return shares


def rank_rows(share: int, rank: int, processes: int) -> slice:
    """The rows of a source's global share that process ``rank`` holds (the first
    ``share % processes`` ranks hold one more)."""
    base, extra = divmod(share, processes)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def describe_plan(sources: list[Source], shares: list[int], batches: list[int | None]) -> str:
    """Each source's task, rows a step, hard negatives and batches an epoch, for the log."""
    return "; ".join(
        f"{s.name} ({s.task}) {share} a step (+{s.negatives} hard negatives each), "
        + ("streamed" if count is None else f"{count} batches an epoch")
        for s, share, count in zip(sources, shares, batches)
    )


def loss_weight(source: Source, share: int, batch_size: int) -> float:
    """The weight of ``source``'s loss in the step's sum: its ``loss_weight``, else its share
    of the global batch (``share / batch_size``)."""
    return source.loss_weight if source.loss_weight is not None else share / batch_size
