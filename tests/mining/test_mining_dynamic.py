"""Dynamic hard-negative mining: the replacement rule on designed scores, the ranks replacements
come from, sharding, checkpoints, and the trainer hook on a tiny model.

Scores are designed with fixed vectors (query i is the axis e_i; a document's score with its own
query is chosen), so which negatives must be replaced is computed here from the rule itself in
plain Python, independently of the miner.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mining_helpers import TableEncoder, unit_with_score

from retriever.data.examples import load_examples
from retriever.data.texts import text_id
from retriever.mining.dynamic import DynamicMiner, DynamicMiningConfig, stale_negatives
from retriever.mining.files import MiningDataError
from retriever.train.data import TrainSet

DIM, RANGE_MIN, N_NEG = 48, 2, 3
# Per example: candidate count, the initial scores in the file, and the current model's scores
# of the three initial negatives (ranks 2, 3, 4 of the list).
CASES = [
    (12, [0.70, 0.60, 0.50], [0.50, 0.40, 0.30]),  # all three fell past the rule
    (12, [0.70, 0.60, 0.50], [0.65, 0.51, 0.45]),  # only the second (0.5865 < 0.60)
    (12, [0.95, 0.90, 0.60], [0.81, -0.85, -0.50]),  # |score| >= 0.8 stays hard; third goes
    (6, [0.70, 0.60, 0.50], [0.10, 0.10, 0.10]),  # all stale, one candidate left
    (12, [0.70, 0.60, 0.50], [0.70, 0.60, 0.50]),  # unchanged
]
# Current scores of the other candidates of example i (rank k): distinct, below the negatives.
REPLACEMENT_SCORE = lambda i, k: 0.45 - 0.01 * k - 0.001 * i  # noqa: E731


def _noise(rng):
    v = np.zeros(DIM)
    v[len(CASES) :] = rng.standard_normal(DIM - len(CASES))
    return v / np.linalg.norm(v)


def _cand(i, k):
    return f"c{i}-{k}", f"candidate {i} {k}"


def write_mined(root, *, with_scores=True):
    """A mined file as `retriever mine` writes it (and its sidecars)."""
    rows, corpus = [], []
    for i, (n_cand, initial, _) in enumerate(CASES):
        cands = [_cand(i, k) for k in range(n_cand)]
        corpus += [{"_id": c, "title": "", "text": t} for c, t in cands]
        negs = cands[RANGE_MIN : RANGE_MIN + N_NEG]
        row = {
            "query": f"query {i}",
            "pos": [f"positive {i}"],
            "neg": [t for _, t in negs],
            "pos_ids": [f"p{i}"],
            "neg_ids": [c for c, _ in negs],
            "candidates": [c for c, _ in cands],
        }
        if with_scores:
            row["neg_scores"] = initial
        rows.append(row)
    mined = root / "mined.jsonl"
    mined.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "mined.corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    meta = {"mining": {"num_negatives": N_NEG, "range_min": RANGE_MIN, "range_max": 12}}
    (root / "mined.meta.json").write_text(json.dumps(meta))
    return mined


def current_encoder(scores_of=None, seed=0):
    """Encoder whose scores are: the CASES' current scores for the initial negatives,
    REPLACEMENT_SCORE for other candidates (or ``scores_of(i, k)`` for every candidate)."""
    rng = np.random.default_rng(seed)
    queries = {f"query {i}": np.eye(DIM)[i] for i in range(len(CASES))}
    docs = {}
    for i, (n_cand, _, current) in enumerate(CASES):
        for k in range(n_cand):
            if scores_of is not None:
                s = scores_of(i, k)
            elif RANGE_MIN <= k < RANGE_MIN + N_NEG:
                s = current[k - RANGE_MIN]
            else:
                s = REPLACEMENT_SCORE(i, k)
            docs[_cand(i, k)[1]] = unit_with_score(np.eye(DIM)[i], _noise(rng), s)
        docs[f"positive {i}"] = unit_with_score(np.eye(DIM)[i], _noise(rng), 0.9)
    return TableEncoder(queries, docs)


def make_miner(mined, config=None, **kw):
    train_set = TrainSet(load_examples(str(mined), negatives=N_NEG), N_NEG, seed=0)
    return DynamicMiner.from_mined_file(mined, train_set, config or DynamicMiningConfig(), **kw)


def _ids(miner):
    return [list(s.negatives) for s in miner.states]


def test_replaces_exactly_the_negatives_past_the_rule(tmp_path):
    miner = make_miner(write_mined(tmp_path))
    record = miner.run(current_encoder(), step=100)

    expected, baselines, before, after, replaced_examples = [], [], [], [], 0
    for i, (n_cand, initial, current) in enumerate(CASES):
        cands = [_cand(i, k)[0] for k in range(n_cand)]
        negs = cands[RANGE_MIN : RANGE_MIN + N_NEG]
        # The unused list: the ranked list without the negatives already used.
        unused = [c for c in cands if c not in negs]
        nxt = iter(unused[RANGE_MIN:])
        new, scores, baseline = list(negs), list(current), list(initial)
        for j in range(N_NEG):
            if current[j] * 1.15 < initial[j] and abs(current[j]) < 0.8:
                doc = next(nxt, None)
                if doc is not None:
                    new[j] = doc
                    scores[j] = baseline[j] = REPLACEMENT_SCORE(i, cands.index(doc))
        expected.append(new)
        baselines.append(baseline)
        before += current
        after += scores
        replaced_examples += new != negs
    assert _ids(miner) == expected
    # A replacement's initial score is its score when it came in; the others keep theirs.
    for state, baseline in zip(miner.states, baselines):
        np.testing.assert_allclose(state.initial_scores, baseline, atol=1e-6)
    assert expected[0] == ["c0-5", "c0-6", "c0-7"] and expected[3] == ["c3-5", "c3-3", "c3-4"]
    # The training set now serves the new texts.
    text = {f"c{i}-{k}": f"candidate {i} {k}" for i in range(5) for k in range(12)}
    for i, ids in enumerate(expected):
        assert miner.train_set.examples[i].negatives == tuple(text[d] for d in ids)
        assert sorted(miner.train_set[(0, i)][2]) == sorted(text[d] for d in ids)
    assert record["fraction_remined"] == pytest.approx(replaced_examples / len(CASES))
    assert record["negatives_replaced"] == 3 + 1 + 1 + 1
    assert record["exhausted"] == 2
    assert record["mean_negative_score_before"] == pytest.approx(np.mean(before), abs=1e-5)
    assert record["mean_negative_score_after"] == pytest.approx(np.mean(after), abs=1e-5)
    assert "re-mined at step 100: 80.0% of 5 examples" in DynamicMiner.describe(record)


def test_later_replacements_take_the_next_blocks_of_ranks(tmp_path):
    """The i-th replacement of all n takes ranks (i-1)*n + range_min .. i*n + range_min of the
    list without the negatives used so far."""
    miner = make_miner(write_mined(tmp_path))
    initial_negs = [f"c0-{k}" for k in range(RANGE_MIN, RANGE_MIN + N_NEG)]
    unused = [f"c0-{k}" for k in range(12) if f"c0-{k}" not in initial_negs]
    miner.run(current_encoder(), step=1)  # example 0: all three replaced (i = 1)
    assert _ids(miner)[0] == unused[RANGE_MIN : N_NEG + RANGE_MIN]
    # Everything scores 0: stale wherever the initial score was positive (i = 2).
    miner.run(current_encoder(scores_of=lambda i, k: 0.0), step=2)
    i = 2
    assert _ids(miner)[0] == unused[(i - 1) * N_NEG + RANGE_MIN : i * N_NEG + RANGE_MIN]
    # Everything scores -0.5, below the 0 of the last ones (i = 3): one candidate is left.
    record = miner.run(current_encoder(scores_of=lambda i, k: -0.5), step=3)
    assert _ids(miner)[0] == ["c0-11", "c0-9", "c0-10"]
    assert record["exhausted"] >= 2
    # Never a candidate twice, never a rank below range_min.
    used = miner.states[0].used
    assert len(used) == len(set(used)) and not {"c0-0", "c0-1"} & set(used)


def test_rule_function():
    scores = np.array([0.5, 0.61, 0.85, -0.85, -0.1, 0.0])
    initial = np.array([0.7, 0.70, 1.00, 0.10, 0.1, -0.1])
    want = [s * 1.15 < i and abs(s) < 0.8 for s, i in zip(scores, initial)]
    assert stale_negatives(scores, initial, 1.15, 0.8).tolist() == want == [
        True, False, False, False, True, False
    ]  # fmt: skip


def test_sharded_passes_equal_one_pass(tmp_path):
    """Ranks compute disjoint shares; the merged changes equal one process's."""
    from retriever.mining.dynamic import _merge

    one = make_miner(write_mined(tmp_path))
    one.run(current_encoder(), step=1)
    two = make_miner(tmp_path / "mined.jsonl")
    parts = [two.compute(current_encoder(), range(r, len(CASES), 2)) for r in range(2)]
    two.apply(_merge(parts))
    assert _ids(two) == _ids(one)
    assert [s.initial_scores for s in two.states] == [s.initial_scores for s in one.states]
    assert two.train_set.examples == one.train_set.examples


def _gloo_worker(rank, root, world_size):
    import torch.distributed as dist

    init = f"file://{root / 'rendezvous'}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        miner = make_miner(root / "mined.jsonl")
        record = miner.run(current_encoder(), step=1, rank=rank, world_size=world_size)
        state = {"negatives": _ids(miner), "record": {**record, "seconds": 0}}
        (root / f"rank{rank}.json").write_text(json.dumps(state))
    finally:
        dist.destroy_process_group()


def test_two_processes_exchange_their_changes(tmp_path):
    """Over gloo, each rank re-scores half the examples; both end with one process's result."""
    one = make_miner(write_mined(tmp_path))
    record = one.run(current_encoder(), step=1)
    torch.multiprocessing.spawn(_gloo_worker, args=(tmp_path, 2), nprocs=2)
    for rank in range(2):
        state = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert state["negatives"] == _ids(one)
        assert state["record"] == pytest.approx({**record, "seconds": 0})


def test_state_survives_a_checkpoint(tmp_path):
    miner = make_miner(write_mined(tmp_path))
    miner.run(current_encoder(), step=1)
    torch.save(miner.state_dict(), tmp_path / "state.pkl")
    fresh = make_miner(tmp_path / "mined.jsonl")
    fresh.load_state_dict(torch.load(tmp_path / "state.pkl", weights_only=False))
    assert fresh.train_set.examples == miner.train_set.examples
    assert fresh.passes == 1
    # And it continues identically.
    zero = current_encoder(scores_of=lambda i, k: 0.0)
    miner.run(zero, step=2)
    fresh.run(zero, step=2)
    assert _ids(fresh) == _ids(miner)


def test_initial_scores_are_recorded_when_the_file_has_none(tmp_path):
    miner = make_miner(write_mined(tmp_path, with_scores=False))
    record = miner.run(current_encoder(), step=1)
    assert record["initialised"] == len(CASES) and record["negatives_replaced"] == 0
    current = [c for _, _, cur in CASES for c in cur]
    got = [s for st in miner.states for s in st.initial_scores]
    np.testing.assert_allclose(got, current, atol=1e-6)
    # Against those baselines, scores of 0 are stale wherever the baseline is positive.
    record = miner.run(current_encoder(scores_of=lambda i, k: 0.0), step=2)
    assert record["initialised"] == 0 and record["negatives_replaced"] > 0


def test_refresh_renews_the_ranked_lists(tmp_path):
    mined = write_mined(tmp_path)
    config = DynamicMiningConfig(remine_every=100, refresh_every=10)
    miner = make_miner(mined, config)
    assert miner.due(10) and not miner.due(5) and miner.due(100)
    # The new model reverses example 0's order: higher ranks now score higher.
    encoder = current_encoder(scores_of=lambda i, k: 0.2 + 0.05 * k if i == 0 else 0.3)
    record = miner.run(encoder, step=10)
    assert record["refreshed"]
    state = miner.states[0]
    # Rank 0 of the new list is the old rank 11, and so on; other examples' documents score
    # 0 with query 0, below all of its own.
    assert state.candidates[:12] == [f"c0-{k}" for k in reversed(range(12))]
    assert "p0" not in state.candidates
    # The old negatives now score 0.30, 0.35, 0.40 against 0.70, 0.60, 0.50: all stale. Their
    # replacements come from the new list, from rank range_min on: old ranks 9, 8, 7.
    assert state.negatives == ["c0-9", "c0-8", "c0-7"]
    assert state.cursor == RANGE_MIN + 3


def test_bad_mined_files_are_named(tmp_path):
    mined = write_mined(tmp_path)
    lines = mined.read_text().splitlines()

    def rewrite(index, **changes):
        row = json.loads(lines[index])
        row.update(changes)
        copy = list(lines)
        copy[index] = json.dumps({k: v for k, v in row.items() if v is not None})
        mined.write_text("\n".join(copy) + "\n")

    train_set = TrainSet(load_examples(str(mined), negatives=N_NEG), N_NEG, seed=0)
    rewrite(1, candidates=None)
    with pytest.raises(MiningDataError, match=r"mined.jsonl:2: field 'candidates'"):
        DynamicMiner.from_mined_file(mined, train_set)
    rewrite(2, neg_ids=["c2-2", "c2-9", "c2-4"])
    with pytest.raises(MiningDataError, match=r"mined.jsonl:3: 'neg_ids' id 'c2-9'"):
        DynamicMiner.from_mined_file(mined, train_set)
    rewrite(0, query="another query")
    with pytest.raises(MiningDataError, match=r"mined.jsonl:1: 'query' differs"):
        DynamicMiner.from_mined_file(mined, train_set)
    rewrite(0, neg_scores=[0.1])
    with pytest.raises(MiningDataError, match=r"mined.jsonl:1: 'neg_scores'"):
        DynamicMiner.from_mined_file(mined, train_set)
    mined.write_text("\n".join(lines) + "\n")
    (tmp_path / "mined.meta.json").unlink()
    with pytest.raises(MiningDataError, match=r"mined.meta.json: missing"):
        DynamicMiner.from_mined_file(mined, train_set)


def test_config_checks(tmp_path):
    from train_helpers import tiny_config

    from retriever.train.config import ConfigError

    with pytest.raises(ConfigError, match="mining.dynamic re-mines .* data.negatives is 0"):
        tiny_config("m", "d.jsonl", tmp_path, mining={"dynamic": True}, data={"negatives": 0})
    with pytest.raises(ConfigError, match="mining.remine_every: expected a positive integer"):
        tiny_config("m", "d.jsonl", tmp_path, mining={"remine_every": 0})
    from retriever.train.builders import build_miner

    config = tiny_config("m", str(tmp_path), tmp_path, mining={"dynamic": True})
    with pytest.raises(ConfigError, match="mining.dynamic needs data.train to be a file"):
        build_miner(config, None, None)


# --------------------------------------------------------------------------- in the trainer


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory):
    """Mine a tiny training file with `retriever mine`, then train 6 steps re-mining every 2
    (rule loosened so that passes replace negatives), one DataLoader worker, checkpoint at 3.
    Records each batch's per-query negatives and the pools after each pass."""
    from train_helpers import make_tiny_model, reset_accelerate_state, tiny_config, write_examples

    from retriever.cli import main
    from retriever.train.trainer import Trainer

    root = tmp_path_factory.mktemp("dynamic")
    model = make_tiny_model(root / "model", dropout=0.1)
    data = write_examples(root / "train.jsonl", n=48, negatives=3)
    mined = root / "mined.jsonl"
    args = ["--model", model, "--data", data, "--output", str(mined), "--num-negatives", "3"]
    args += ["--query-max-length", "16", "--document-max-length", "24"]  # as tiny_config trains
    assert main(["mine", *args, "--range-min", "1", "--range-max", "40", "--no-progress"]) == 0
    config = tiny_config(
        model,
        str(mined),
        root / "run_a",
        data={"negatives": 2, "num_workers": 1},
        training={"save_steps": 3, "save_total_limit": None},
        mining={"dynamic": True, "remine_every": 2, "score_ratio": 0.01, "max_abs_score": 2.0},
    )
    trainer = Trainer(config)
    batches, pools = [], [_pools(trainer)]
    step, run = trainer._step, trainer.miner.run

    def record_step(parts):  # one part: the step's batch of the one source
        batches.append(_query_negatives(parts[0].batch, trainer))
        return step(parts)

    def record_run(*a, **kw):
        result = run(*a, **kw)
        pools.append(_pools(trainer))
        return result

    trainer._step, trainer.miner.run = record_step, record_run
    trainer.train()
    reset_accelerate_state()
    return {"root": root, "config": config, "batches": batches, "pools": pools}


def _pools(trainer):
    return [{text_id(t) for t in e.negatives} for e in trainer.train_set.examples]


def _query_negatives(batch, trainer):
    """{example index: its negatives' text ids} of a batch (documents are positives first,
    then the first negatives, then the second; positives name the example)."""
    example_of = {text_id(e.positives[0]): i for i, e in enumerate(trainer.train_set.examples)}
    ids, n = batch.candidate_ids.tolist(), batch.num_queries
    return {example_of[ids[q]]: {ids[n + j * n + q] for j in range(2)} for q in range(n)}


def test_trainer_remines_and_trains_on_the_new_negatives(dynamic_run):
    root, batches, pools = dynamic_run["root"], dynamic_run["batches"], dynamic_run["pools"]
    records = [json.loads(line) for line in (root / "run_a" / "mining.jsonl").open()]
    assert [r["step"] for r in records] == [2, 4]  # not after the last step
    assert all(r["negatives_replaced"] > 0 for r in records)
    assert len(batches) == 6 and len(pools) == 3
    assert pools[1] != pools[0] and pools[2] != pools[1]
    # Steps 1-2 draw from the mined pools, 3-4 from those after the first pass, 5-6 after the
    # second: the DataLoader worker saw the new negatives.
    for step, batch in enumerate(batches, start=1):
        pool = pools[(step - 1) // 2]
        for example, negatives in batch.items():
            assert negatives <= pool[example], (step, example)


def test_resume_after_remining_continues_exactly(dynamic_run):
    from train_helpers import copy_checkpoint, load_weights, read_log, reset_accelerate_state

    from retriever.train.trainer import Trainer

    root = dynamic_run["root"]
    run_b = root / "run_b"
    copy_checkpoint(root / "run_a", run_b, 3)
    config = dynamic_run["config"]
    config.training.output_dir = str(run_b)
    Trainer(config, resume=True).train()
    reset_accelerate_state()

    want, got = load_weights(root / "run_a" / "final"), load_weights(run_b / "final")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    assert [r["loss"] for r in read_log(run_b)] == [r["loss"] for r in read_log(root / "run_a")][3:]
    a = [json.loads(line) for line in (root / "run_a" / "mining.jsonl").open()][1:]
    b = [json.loads(line) for line in (run_b / "mining.jsonl").open()]
    for r in a + b:
        r.pop("seconds")
    assert a == b
