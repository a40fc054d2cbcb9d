"""What every benchmark and check script shares: the run header (command, device, versions,
settings), device synchronisation, timing with warm-up, peak memory, out-of-memory records,
profiler tables and results written as they come (a run cut short keeps what it measured).

    from harness import GIB, Results, peak_memory, timed

    results = Results(args.output, settings=vars(args), device=args.device)
    record = {"case": "64k"}
    with results.case(record, args.device):   # an out-of-memory error is recorded, not raised
        with peak_memory(args.device) as memory:
            record["seconds"] = timed(step, args.device, repeats=3, warmup=1)
        if memory.extra is not None:            # CUDA only
            record["extra_memory_gb"] = memory.extra / GIB

Scripts import it as ``import harness`` / ``from harness import ...``: Python puts the running
script's directory (scripts/) on sys.path. Inputs more than one script builds (synthetic
vectors, ...) live in scripts/workloads.py.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

PACKAGES = (
    "torch",
    "triton",
    "numpy",
    "transformers",
    "sentence-transformers",
    "accelerate",
    "faiss-cpu",
    "faiss-gpu",
    "retriever",
)
GIB = 2**30  # GiB (torch.cuda's memory figures)
GB = 1e9  # decimal GB
OUT_OF_MEMORY = "out of memory"  # the status of a case that ran out of device memory


# ---------------------------------------------------------------------------- the header


def device_name(device: str | torch.device = "cuda") -> str:
    """The GPU's name for a CUDA device (when CUDA is available), else the processor's."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def versions() -> dict[str, str]:
    """Python's version and those of the installed packages of PACKAGES."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, (int, float, bool, str, type(None))):
        return value
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float, bool, str, type(None))) for v in value
    ):
        return list(value)
    return str(value)


def header(
    settings: dict[str, Any] | None = None,
    device: str | torch.device = "cuda",
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Command, device, versions, date, CPU count and settings: the first fields of every result
    file. ``argv``: the arguments when main() was called with some (default: sys.argv's)."""
    command = sys.argv if argv is None else [sys.argv[0], *argv]
    out: dict[str, Any] = {
        "command": " ".join(command),
        "device": device_name(device),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        out["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / GIB
    if settings is not None:
        out["settings"] = {k: _jsonable(v) for k, v in settings.items()}
    return out


# ---------------------------------------------------------------------------- the device


def _cuda(device: str | torch.device | None) -> bool:
    """Whether ``device`` is a CUDA device with a context to wait for (an uninitialised CUDA
    has nothing queued, and a timer should not start it)."""
    return (
        device is not None
        and torch.device(device).type == "cuda"
        and torch.cuda.is_available()
        and torch.cuda.is_initialized()
    )


def sync(device: str | torch.device | None) -> None:
    """Wait for the work queued on ``device`` (a no-op off CUDA)."""
    if _cuda(device):
        torch.cuda.synchronize(device)


def free(device: str | torch.device | None) -> None:
    """Collect garbage and hand cached device memory back."""
    gc.collect()
    if _cuda(device):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- timing


def now() -> float:
    """The clock every timing here uses (seconds, monotonic)."""
    return time.perf_counter()


class Stopwatch:
    """Seconds between a device synchronisation at start() and another at stop(); as a context
    manager, of its block. ``device=None`` times host work without synchronising. ``seconds``
    is the last interval, ``laps`` every one."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = device
        self.seconds = 0.0
        self.laps: list[float] = []
        self._start: float | None = None

    def start(self) -> Stopwatch:
        sync(self.device)
        self._start = now()
        return self

    def stop(self) -> float:
        if self._start is None:
            raise RuntimeError("Stopwatch.stop() without start()")
        sync(self.device)
        self.seconds = now() - self._start
        self.laps.append(self.seconds)
        self._start = None
        return self.seconds

    def elapsed(self) -> float:
        """Seconds since start(), without stopping (nor synchronising)."""
        if self._start is None:
            raise RuntimeError("Stopwatch.elapsed() without start()")
        return now() - self._start

    def __enter__(self) -> Stopwatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.stop()
        else:
            self._start = None


def timed(
    fn: Callable[[], Any],
    device: str | torch.device | None,
    repeats: int = 1,
    warmup: int = 0,
    setup: Callable[[], Any] | None = None,
) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` (after ``warmup`` untimed ones), each
    between two device synchronisations; ``setup`` runs, untimed, before every call."""
    watch = Stopwatch(device)
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        if i < warmup:
            fn()
            continue
        with watch:
            fn()
    return watch.laps


def do_bench(fn: Callable[[], Any], **kwargs: Any) -> float:
    """Milliseconds of a GPU kernel launch by triton.testing.do_bench (CUDA events, its own
    warm-up and cache flush): for kernels too short for :func:`timed`'s host clock."""
    from triton.testing import do_bench as triton_do_bench

    return triton_do_bench(fn, **kwargs)


# ---------------------------------------------------------------------------- memory


class PeakMemory:
    """The most memory allocated on a CUDA device between start() and stop() (or in a ``with``
    block): ``base`` (allocated at the start), ``peak`` and ``extra`` (peak - base), in bytes;
    all None off CUDA."""

    def __init__(self, device: str | torch.device | None) -> None:
        self.device = device
        self.base: int | None = None
        self.peak: int | None = None

    @property
    def extra(self) -> int | None:
        return None if self.peak is None or self.base is None else self.peak - self.base

    def start(self) -> PeakMemory:
        self.peak = None
        if _cuda(self.device):
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def stop(self) -> int | None:
        """The peak in bytes (None off CUDA)."""
        if _cuda(self.device):
            self.peak = torch.cuda.max_memory_allocated(self.device)
        return self.peak

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def peak_memory(device: str | torch.device | None) -> PeakMemory:
    """``with peak_memory(device) as memory: ...``, then ``memory.peak`` / ``memory.extra``."""
    return PeakMemory(device)


# ---------------------------------------------------------------------------- out of memory


def is_oom(error: BaseException | str) -> bool:
    """Whether an exception (or a subprocess's stderr) says the device ran out of memory
    (torch.cuda.OutOfMemoryError, or e.g. a cuBLAS / cuDNN allocation failure)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = error if isinstance(error, str) else str(error)
    return "OutOfMemoryError" in text or OUT_OF_MEMORY in text.lower()


@contextlib.contextmanager
def recording_oom(record: dict[str, Any], device: str | torch.device | None) -> Iterator[None]:
    """Run a block; an out-of-memory error becomes ``status: out of memory`` and ``error`` (its
    first line) in ``record`` instead of propagating; any other error propagates. A block that
    ends normally gets ``status: ok`` unless it set one. Device memory is freed either way,
    including what the failed call's frames held."""
    try:
        yield
        record.setdefault("status", "ok")
    except Exception as exc:
        if not is_oom(exc):
            raise
        record["status"] = OUT_OF_MEMORY
        record["error"] = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        # The traceback holds the frames of the call that failed, and their tensors.
        traceback.clear_frames(exc.__traceback__)
        del exc
    finally:
        free(device)


# ---------------------------------------------------------------------------- profiles


@contextlib.contextmanager
def profiled(device: str | torch.device | None) -> Iterator[Any]:
    """torch.profiler over the block (CPU, plus CUDA on a CUDA device), the device synchronised
    before the profile ends."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device is not None and torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        yield prof
        sync(device)


def write_profile(profiler: Any, path: Path) -> None:
    """A finished torch.profiler run's top operators, by GPU and by CPU time, to ``path``."""
    table = profiler.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        table.table(sort_by="self_device_time_total", row_limit=40)
        + "\n\n"
        + table.table(sort_by="self_cpu_time_total", row_limit=25)
        + "\n"
    )


# ---------------------------------------------------------------------------- the result file


OVERWRITE = "BENCH_OVERWRITE"  # =1: a script may replace an existing result file


class Results:
    """A result file: the header, then records appended (under ``key``, or the key add() names)
    and the file rewritten after every one.

    ``fields``: more header fields (they win over the standard ones of the same name).
    ``summary(data)``: fields derived from the records, recomputed before every write.
    ``echo``: print each record when it is added, as a JSON line or as ``show(record)`` says.
    ``path=None``: nothing is
    written (the records are still kept in ``data``). An existing file is never replaced: the
    script stops before measuring anything, unless ``BENCH_OVERWRITE=1`` is set."""

    def __init__(
        self,
        path: Path | str | None,
        settings: dict[str, Any] | None = None,
        device: str | torch.device = "cuda",
        *,
        key: str | None = "results",
        fields: dict[str, Any] | None = None,
        summary: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        echo: bool = True,
        show: Callable[[dict[str, Any]], str] | None = None,
        argv: list[str] | None = None,
        indent: int = 2,
    ) -> None:
        self.path = None if path is None else Path(path)
        if self.path is not None and self.path.exists() and os.environ.get(OVERWRITE) != "1":
            raise SystemExit(
                f"{self.path} exists: give another --output, remove it, or set {OVERWRITE}=1"
            )
        self.key, self.summary, self.echo, self.indent = key, summary, echo, indent
        self.show = show or (lambda record: json.dumps(record, default=str))
        self.data = header(settings, device, argv)
        self.data.update(fields or {})
        if key is not None:
            self.data[key] = []

    def records(self, key: str | None = None) -> list[dict[str, Any]]:
        return self.data.setdefault(key or self._key(), [])

    def add(
        self, record: dict[str, Any], key: str | None = None, echo: bool | None = None
    ) -> dict[str, Any]:
        """Append ``record`` (to ``key``'s list, default the Results' key), print it if ``echo``
        (default: the Results' echo) and write the file."""
        self.records(key).append(record)
        if self.echo if echo is None else echo:
            print(self.show(record), flush=True)
        self.write()
        return record

    def put(self, key: str, value: Any) -> None:
        """Set a top-level field (a section, a summary) and write."""
        self.data[key] = value
        self.write()

    def write(self) -> None:
        if self.summary is not None:
            self.data.update(self.summary(self.data))
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.data, indent=self.indent, default=str) + "\n"
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text(text)
            partial.replace(self.path)  # a reader never sees half a file

    @contextlib.contextmanager
    def case(
        self,
        record: dict[str, Any],
        device: str | torch.device | None = "cuda",
        key: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Run one case under :func:`recording_oom` and add its record (and write the file)
        either way; a record whose case raised another error is added with ``status: failed:
        ...`` before the error propagates."""
        try:
            with recording_oom(record, device):
                yield record
        except Exception as exc:
            record["status"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
            self.add(record, key)
            raise
        self.add(record, key)

    def _key(self) -> str:
        if self.key is None:
            raise ValueError("this Results has no default key: name one")
        return self.key
