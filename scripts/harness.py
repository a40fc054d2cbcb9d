"""What every benchmark script shares: the run header (device and versions), device
synchronisation, timing with warm-up, peak memory, out-of-memory records and results written
as they come (a run cut short keeps what it measured).

    from harness import Results, timed

    results = Results(args.output, settings=vars(args))
    record = {"case": "64k"}
    with results.case(record):           # an out-of-memory error is recorded, not raised
        record["seconds"] = timed(step, device, repeats=3)
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "triton", "transformers", "sentence-transformers", "accelerate", "retriever")


def device_name(device: str | torch.device = "cuda") -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def header(settings: dict[str, Any] | None = None, device: str = "cuda") -> dict[str, Any]:
    """Command, device, versions, date and settings: the first fields of every result file."""
    out: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "device": device_name(device),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        out["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    if settings is not None:
        out["settings"] = {k: v if isinstance(v, (int, float, bool, type(None))) else str(v)
                           for k, v in settings.items()}  # fmt: skip
    return out


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free(device: str | torch.device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def timed(fn: Callable[[], Any], device: str | torch.device, repeats: int = 1,
          warmup: int = 0) -> list[float]:  # fmt: skip
    """Seconds of each of ``repeats`` calls of ``fn`` (after ``warmup`` untimed ones), each
    between two device synchronisations."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def peak_memory(record: dict[str, Any], device: str | torch.device) -> Iterator[None]:
    """Record ``peak_memory_gb`` (all allocated) and ``extra_memory_gb`` (above the start)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    yield
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        record["peak_memory_gb"] = peak / 2**30
        record["extra_memory_gb"] = (peak - base) / 2**30


class Results:
    """A result file: the header, then records appended and written after every case."""

    def __init__(self, path: Path | None, settings: dict[str, Any] | None = None,
                 device: str = "cuda") -> None:  # fmt: skip
        self.path = path
        self.data = header(settings, device)
        self.data["results"] = []

    def add(self, record: dict[str, Any]) -> None:
        self.data["results"].append(record)
        print(json.dumps(record), flush=True)
        self.write()

    def write(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=2) + "\n")

    @contextlib.contextmanager
    def case(self, record: dict[str, Any], device: str | torch.device = "cuda") -> Iterator[None]:
        """Run one case; an out-of-memory error becomes ``status: out of memory``. The record
        is added (and written) either way."""
        try:
            yield
            record.setdefault("status", "ok")
        except torch.cuda.OutOfMemoryError as exc:
            record["status"] = "out of memory"
            record["error"] = str(exc).splitlines()[0][:300]
        finally:
            free(device)
            self.add(record)
