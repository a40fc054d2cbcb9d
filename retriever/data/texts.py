"""Reading text files, and naming texts: the one home of what training data, evaluation tasks and
mining all read.

* :func:`read_jsonl`: (line number, object) for each line of a JSONL(.gz) file; a malformed,
  non-UTF-8 or unreadable line raises naming the file and line.
* :func:`text_id`: a stable 64-bit id of a text (``candidate_ids``, duplicate positives).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; a bad line raises naming it."""
    path = Path(path)
    line_no = 0
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:  # bytes, decoded line by line: errors name their line
            for line_no, raw in enumerate(f, start=1):
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: malformed JSON line ({exc.msg})") from None
                if not isinstance(obj, dict):
                    kind = type(obj).__name__
                    raise ValueError(f"{path}:{line_no}: expected a JSON object, got {kind}")
                yield line_no, obj
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}:{line_no}: not UTF-8 text ({exc.reason})") from None
    except (OSError, EOFError) as exc:  # a .gz that is not gzip, a truncated archive, ...
        raise ValueError(f"{path}: cannot be read ({exc})") from None


def text_id(text: str) -> int:
    """A 64-bit id of a text (stable across processes and runs), for ``candidate_ids``."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)
