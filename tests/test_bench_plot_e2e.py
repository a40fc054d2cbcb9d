"""scripts/plot_e2e.py draws each case once: the run that got furthest."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from plot_e2e import most_informative  # noqa: E402


def record(peer: str, status: str, steps: int = 0, batch: int = 65536) -> dict:
    return {"peer": peer, "batch": batch, "negatives": 7, "status": status,
            "step_s": [1.0] * steps or None}  # fmt: skip


def test_a_longer_stopped_run_replaces_a_shorter_one():
    short = record("st-cmnrl", "timed out after 210 s")
    long = record("st-cmnrl", "timed out after 480 s")
    assert most_informative([short, long]) == [long]
    assert most_informative([long, short]) == [long]


def test_a_finished_run_wins_and_cases_stay_apart():
    stopped = record("retriever", "timed out after 210 s", steps=1)
    done = record("retriever", "ok", steps=3)
    other = record("retriever", "timed out after 210 s", batch=16384)
    theirs = record("st-cmnrl", "timed out after 480 s")
    kept = most_informative([stopped, done, other, theirs])
    assert kept == [done, other, theirs]
