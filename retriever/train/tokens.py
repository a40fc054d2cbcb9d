"""The token cache: every distinct text of the training data is tokenised once, on disk, and
reused across epochs and runs; collation is then a gather and a pad.

A :class:`TokenTable` holds the token ids of a list of texts as one flat int32 array and row
offsets (CSR), tokenised as ``Encoder.tokenize`` would (the side's prefix, lower-casing,
special tokens, truncation to the side's max length) but unpadded. :func:`load_or_build`
keys a table by a hash of the texts (in order), of the tokenizer (its full serialisation and
special tokens) and of the side's settings, so a changed data file, tokenizer or setting is a
different cache entry and never a stale hit. Entries are written whole or not at all (a
temporary directory renamed into place) and read back memory-mapped, so DataLoader workers
share one copy of the pages.

    <cache_dir>/<key>/ids.npy  offsets.npy  meta.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from retriever.model.fingerprint import tokenizer_fingerprint
from retriever.model.settings import SideSettings

logger = logging.getLogger(__name__)

CACHE_VERSION = "retriever-tokens-v1"
TOKENIZE_BATCH = 8192  # texts per call of the fast tokenizer (it parallelises within a call)


class TokenTable:
    """Token ids of ``len(offsets) - 1`` texts: row i is ``ids[offsets[i]:offsets[i + 1]]``."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray) -> None:
        self.ids = ids
        self.offsets = offsets
        self.lengths = np.diff(offsets).astype(np.int32)

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, index: int) -> np.ndarray:
        return np.asarray(self.ids[self.offsets[index] : self.offsets[index + 1]])

    def padded(self, rows: np.ndarray, pad_id: int, left: bool = False) -> np.ndarray:
        """[len(rows), longest] int32 token ids of ``rows``, padded with ``pad_id`` on the
        right (or the left): one vectorised gather, no Python loop over rows."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows].astype(np.int64)
        width = int(lengths.max()) if len(rows) else 0
        out = np.full((len(rows), width), pad_id, dtype=np.int32)
        total = int(lengths.sum())
        if total == 0:
            return out
        row_of = np.repeat(np.arange(len(rows)), lengths)
        starts = np.cumsum(lengths) - lengths
        within = np.arange(total) - np.repeat(starts, lengths)
        source = np.repeat(self.offsets[rows], lengths) + within
        column = within + np.repeat(width - lengths, lengths) if left else within
        out[row_of, column] = self.ids[source]
        return out

    def concatenated(self, rows: np.ndarray) -> np.ndarray:
        """[sum of their lengths] int32 token ids of ``rows``, one after another (a
        padding-free stream): one vectorised gather."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows].astype(np.int64)
        starts = np.cumsum(lengths) - lengths
        within = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
        return np.asarray(self.ids[np.repeat(self.offsets[rows], lengths) + within], np.int32)

    @classmethod
    def concatenate(cls, tables: Sequence[TokenTable]) -> TokenTable:
        ids = np.concatenate([np.asarray(t.ids) for t in tables])
        shifts = np.cumsum([0, *(t.offsets[-1] for t in tables[:-1])])
        offsets = np.concatenate(
            [[0], *(np.asarray(t.offsets[1:]) + s for t, s in zip(tables, shifts))]
        )
        return cls(ids, offsets.astype(np.int64))


def tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    settings: SideSettings,
    *,
    show_progress: bool = False,
    desc: str = "tokenize",
) -> TokenTable:
    """Tokenise ``texts`` for one side, unpadded, as ``Encoder.tokenize`` would."""
    pieces: list[np.ndarray] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    batches = _id_batches(tokenizer, texts, settings)
    total = -(-len(texts) // TOKENIZE_BATCH)
    start = 0
    for encoded in tqdm(batches, desc=desc, unit="batch", total=total, disable=not show_progress):
        for i, ids in enumerate(encoded):
            lengths[start + i] = len(ids)
            pieces.append(np.asarray(ids, dtype=np.int32))
        start += len(encoded)
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenTable(ids, offsets)


def _id_batches(
    tokenizer: Any, texts: Sequence[str], settings: SideSettings
) -> Iterator[list[list[int]]]:
    """The token ids of ``texts``, TOKENIZE_BATCH texts at a time. With a fast tokenizer the
    next batch is encoded on a helper thread while this thread turns the current one into
    Python lists of ids: the Rust encoder releases the GIL and uses every core, and the
    conversion (by estimate, about half the time on 16 cores) then overlaps it instead of
    adding to it."""
    starts = range(0, len(texts), TOKENIZE_BATCH)

    def prepared(start: int) -> list[str]:
        return [settings.text(t) for t in texts[start : start + TOKENIZE_BATCH]]

    # One batch (a text dynamic mining brings in): the plain call, which copies nothing.
    many = len(texts) > TOKENIZE_BATCH
    backend = _truncating_backend(tokenizer, settings.max_length) if many else None
    if backend is None:  # a slow (Python) tokenizer, or one batch: one call after another
        for start in starts:
            yield tokenizer(
                prepared(start),
                truncation="longest_first",
                max_length=settings.max_length,
                padding=False,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
        return

    def encode(start: int) -> list[Any]:
        return backend.encode_batch(prepared(start), add_special_tokens=True)

    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(encode, starts[0])  # there are at least two batches here
        for start in starts[1:]:
            current, ahead = ahead, pool.submit(encode, start)
            yield [e.ids for e in current.result()]
        yield [e.ids for e in ahead.result()]


def _truncating_backend(tokenizer: Any, max_length: int) -> Any | None:
    """A copy of the fast tokenizer's Rust backend set up as ``tokenizer(..., truncation=
    "longest_first", max_length=max_length, padding=False)`` sets its own (the copy leaves the
    caller's tokenizer as it was); None where that cannot be done faithfully: a slow
    tokenizer, no max length, a backend with Python parts (it does not serialise)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False) or max_length is None:
        return None
    from tokenizers import Tokenizer

    try:
        copy = Tokenizer.from_str(backend.to_str())
    except Exception:  # e.g. "Custom PreTokenizer cannot be serialized"
        return None
    # Not part of the serialisation: transformers sets it from split_special_tokens.
    copy.encode_special_tokens = backend.encode_special_tokens
    direction = getattr(tokenizer, "truncation_side", "right")
    copy.enable_truncation(max_length, strategy="longest_first", direction=direction)
    copy.no_padding()
    return copy


def texts_fingerprint(texts: Sequence[str]) -> str:
    """A hash of the texts, in order (length-prefixed, so no two lists collide at a join)."""
    import xxhash

    h = xxhash.xxh3_128()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def cache_key(tokenizer_hash: str, texts: Sequence[str], settings: SideSettings) -> str:
    fields = [CACHE_VERSION, tokenizer_hash, texts_fingerprint(texts), repr(settings)]
    return hashlib.sha256("\n".join(fields).encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    """``$RETRIEVER_CACHE/tokens``, else ``$XDG_CACHE_HOME/retriever/tokens``, else
    ``~/.cache/retriever/tokens``."""
    if os.environ.get("RETRIEVER_CACHE"):
        return Path(os.environ["RETRIEVER_CACHE"]) / "tokens"
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "retriever" / "tokens"


def load_or_build(
    tokenizer: Any,
    texts: Sequence[str],
    settings: SideSettings,
    cache_dir: str | os.PathLike | None,
    *,
    tokenizer_hash: str | None = None,
    desc: str = "tokenize",
    show_progress: bool = True,
) -> TokenTable:
    """The table of ``texts``: read from ``cache_dir`` when this exact (texts, tokenizer,
    settings) entry exists, else tokenised (with a progress bar) and written there. With
    ``cache_dir=None`` nothing touches the disk."""
    if cache_dir is None:
        return tokenize(tokenizer, texts, settings, show_progress=show_progress, desc=desc)
    tokenizer_hash = tokenizer_hash or tokenizer_fingerprint(tokenizer)
    entry = Path(cache_dir) / cache_key(tokenizer_hash, texts, settings)
    if (entry / "meta.json").is_file():
        try:
            table = TokenTable(
                np.load(entry / "ids.npy", mmap_mode="r"),
                np.load(entry / "offsets.npy", mmap_mode="r"),
            )
            if len(table) == len(texts):
                logger.info("%s: %d texts read from the token cache %s", desc, len(texts), entry)
                return table
        except (OSError, ValueError) as exc:  # unreadable entry: rebuild it
            logger.warning("token cache %s unreadable (%s); tokenising again", entry, exc)
    start = time.perf_counter()
    table = tokenize(tokenizer, texts, settings, show_progress=show_progress, desc=desc)
    _write_entry(entry, table, settings, len(texts), time.perf_counter() - start)
    return TokenTable(
        np.load(entry / "ids.npy", mmap_mode="r"), np.load(entry / "offsets.npy", mmap_mode="r")
    )


def _write_entry(
    entry: Path, table: TokenTable, settings: SideSettings, n: int, seconds: float
) -> None:
    from retriever.fileio import atomic_directory

    entry.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(entry) as tmp:
        np.save(tmp / "ids.npy", np.asarray(table.ids))
        np.save(tmp / "offsets.npy", np.asarray(table.offsets))
        meta = {
            "version": CACHE_VERSION,
            "texts": n,
            "tokens": int(table.offsets[-1]),
            "prefix": settings.prefix,
            "max_length": settings.max_length,
            "lower_case": settings.lower_case,
            "tokenize_seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    logger.info("token cache: %d texts tokenised in %.1f s, kept in %s", n, seconds, entry)
