"""A benchmark's result file is never silently replaced: scripts/harness.Results refuses an
existing --output before anything is measured, unless BENCH_OVERWRITE=1."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from harness import Results  # noqa: E402


def test_an_existing_result_file_is_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_OVERWRITE", raising=False)
    path = tmp_path / "bench.json"
    first = Results(path, {"a": 1}, "cpu", echo=False)
    first.add({"case": 1})
    saved = path.read_text()
    with pytest.raises(SystemExit, match="bench.json exists"):
        Results(path, {"a": 2}, "cpu", echo=False)
    assert path.read_text() == saved


def test_overwrite_when_asked(tmp_path, monkeypatch):
    path = tmp_path / "bench.json"
    path.write_text("{}")
    monkeypatch.setenv("BENCH_OVERWRITE", "1")
    Results(path, {"a": 2}, "cpu", echo=False).add({"case": 2})
    assert json.loads(path.read_text())["results"] == [{"case": 2}]
