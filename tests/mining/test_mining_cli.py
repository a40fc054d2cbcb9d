"""`retriever mine` end to end on a tiny BEIR directory and a training JSONL file.

The reference is independent of our encoder and search: sentence-transformers embeddings and
a brute-force float64 ranking (``mining_helpers.reference_ranked``).
"""

import json
import re

import numpy as np
import pytest
from mining_helpers import reference_ranked
from sentence_transformers import SentenceTransformer
from tiny_encoder import save_tiny_bert

from retriever.cli import main
from retriever.data.examples import load_examples
from retriever.model import Encoder

WORDS = "cat dog fish bird tree rock river cloud apple bread stone light moon sand".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tiny = save_tiny_bert(tmp_path_factory.mktemp("tiny"))
    path = tmp_path_factory.mktemp("st") / "model"
    Encoder.from_pretrained(str(tiny), pooling="mean").save(path)
    return str(path)


@pytest.fixture(scope="module")
def st_model(model_dir):
    return SentenceTransformer(model_dir, device="cpu")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory):
    """60 documents, 10 train queries; q0's positive text also appears under another id, q1
    has two positives, q2 has a document judged non-relevant (score 0)."""
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("beir")
    texts = [" ".join(rng.choice(WORDS, 6)) for _ in range(60)]
    texts[59] = texts[0]
    _write_jsonl(
        root / "corpus.jsonl",
        [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(texts)],
    )
    _write_jsonl(
        root / "queries.jsonl",
        [{"_id": f"q{i}", "text": " ".join(rng.choice(WORDS, 3))} for i in range(10)],
    )
    (root / "qrels").mkdir()
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t1" for i in range(10)]
    lines += ["q1\td20\t1", "q2\td21\t0"]
    (root / "qrels" / "train.tsv").write_text("\n".join(lines) + "\n")
    return root


def _mine(args, capsys):
    try:
        code = main(["mine", "--no-progress", "--device", "cpu", *map(str, args)])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr()


def _check_against_reference(st_model, rows, doc_ids, doc_texts, positive_ids_of, range_max):
    doc_vectors = st_model.encode_document(doc_texts)
    for row in rows:
        query_vector = st_model.encode_query([row["query"]])[0]
        pos_vectors = st_model.encode_document(row["pos"])
        pos_scores = (pos_vectors.astype(np.float64) @ query_vector.astype(np.float64)).tolist()
        np.testing.assert_allclose(row["pos_scores"], pos_scores, atol=1e-4)
        _, scores = reference_ranked(
            query_vector,
            doc_vectors,
            doc_ids,
            doc_texts,
            positive_ids_of(row),
            {p.strip() for p in row["pos"]},
            pos_scores,
            length=range_max,
        )
        # Scores, not ids: a random tiny model may tie two texts.
        np.testing.assert_allclose(row["candidate_scores"], scores, atol=1e-4)
        assert not set(row["candidates"]) & positive_ids_of(row)
        assert not set(row["neg"]) & set(row["pos"])


def test_beir_directory_end_to_end(model_dir, st_model, beir_dir, tmp_path, capsys):
    out = tmp_path / "mined.jsonl"
    args = ["--model", model_dir, "--data", beir_dir, "--output", out]
    code, captured = _mine(
        [*args, "--num-negatives", "3", "--range-min", "2", "--range-max", "12"], capsys
    )
    assert code == 0, captured.err
    rows = _read_jsonl(out)
    corpus = _read_jsonl(beir_dir / "corpus.jsonl")
    qrels = {}
    for line in (beir_dir / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        if int(s) > 0:
            qrels.setdefault(q, set()).add(d)
    assert [r["query_id"] for r in rows] == [f"q{i}" for i in range(10)]
    assert sorted(rows[1]["pos_ids"]) == ["d1", "d20"]
    for row in rows:
        assert len(row["neg"]) == len(row["neg_ids"]) == len(row["neg_scores"]) == 3
        assert len(row["candidates"]) == len(row["candidate_scores"]) == 12
        assert row["neg_ids"] == row["candidates"][2:5]  # --sampling top: ranks 2, 3, 4
    assert "d59" not in rows[0]["candidates"]  # q0's positive text under another id
    _check_against_reference(
        st_model,
        rows,
        [d["_id"] for d in corpus],
        [d["text"] for d in corpus],
        lambda row: qrels[row["query_id"]],
        12,
    )
    # The sidecars: every candidate's text, and the settings.
    side = {d["_id"]: d["text"] for d in _read_jsonl(tmp_path / "mined.corpus.jsonl")}
    assert {c for r in rows for c in r["candidates"]} == set(side)
    meta = json.loads((tmp_path / "mined.meta.json").read_text())
    assert meta["mining"]["range_min"] == 2 and meta["written"] == 10
    assert meta["encoder"]["pooling"] == "mean" and meta["encoder"]["truncate_dim"] is None
    # The output is training data as it stands.
    examples = load_examples(str(out), negatives=3)
    assert [e.negatives for e in examples] == [tuple(r["neg"]) for r in rows]


def test_training_jsonl_with_its_own_corpus(model_dir, st_model, tmp_path, capsys):
    rng = np.random.default_rng(2)
    rows = [
        {
            "query": " ".join(rng.choice(WORDS, 3)),
            "pos": " ".join(rng.choice(WORDS, 5)),
            "neg": [" ".join(rng.choice(WORDS, 5)) for _ in range(2)],
        }
        for _ in range(15)
    ]
    rows[3]["neg"].append(rows[4]["pos"])  # another query's positive is fair game
    rows[5]["neg"].append(rows[5]["pos"] + "  ")  # its own positive (by text) is not
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out" / "mined.jsonl"
    code, captured = _mine(
        ["--model", model_dir, "--data", data, "--output", out, "--num-negatives", "2",
         "--range-min", "1", "--range-max", "8", "--sampling", "random", "--seed", "3"],
        capsys,
    )  # fmt: skip
    assert code == 0, captured.err
    mined = _read_jsonl(out)
    texts = list(dict.fromkeys(t.strip() for r in rows for t in [r["pos"], *r["neg"]]))
    assert len(mined) == 15 and mined[0]["source"].endswith("train.jsonl:1")
    assert [m["pos"] for m in mined] == [[r["pos"]] for r in rows]
    text_of = {d["_id"]: d["text"] for d in _read_jsonl(out.parent / "mined.corpus.jsonl")}
    for m in mined:
        assert [text_of[i] for i in m["neg_ids"]] == m["neg"]
        ranks = [m["candidates"].index(i) for i in m["neg_ids"]]
        assert all(1 <= r < 8 for r in ranks) and ranks == sorted(ranks)
    ids = [f"t{i}" for i in range(len(texts))]  # the reference needs ids only to exclude them
    _check_against_reference(st_model, mined, ids, texts, lambda row: set(), 8)


def test_jsonl_data_against_a_beir_corpus(model_dir, beir_dir, tmp_path, capsys):
    corpus = _read_jsonl(beir_dir / "corpus.jsonl")
    data = _write_jsonl(
        tmp_path / "train.jsonl", [{"query": "cat dog", "pos": [corpus[7]["text"]]}]
    )
    out = tmp_path / "mined.jsonl"
    code, captured = _mine(
        ["--model", model_dir, "--data", data, "--corpus", beir_dir, "--output", out,
         "--num-negatives", "2", "--range-min", "0", "--range-max", "5",
         "--truncate-dim", "8", "--query-prefix", "q: "],
        capsys,
    )  # fmt: skip
    assert code == 0, captured.err
    (row,) = _read_jsonl(out)
    assert row["pos_ids"] == ["d7"] and "d7" not in row["candidates"]
    # The meta records the encoder settings the negatives were mined with.
    encoder = json.loads((tmp_path / "mined.meta.json").read_text())["encoder"]
    assert encoder["truncate_dim"] == 8 and encoder["query_prefix"] == "q: "


def test_refuses_to_overwrite(model_dir, beir_dir, tmp_path, capsys):
    out = tmp_path / "mined.jsonl"
    args = ["--model", model_dir, "--data", beir_dir, "--output", out, "--range-max", "20"]
    assert _mine(args, capsys)[0] == 0
    before = out.read_text()
    (tmp_path / "mined.jsonl").unlink()  # a sidecar alone still blocks
    code, captured = _mine(args, capsys)
    assert code == 2 and "mined.corpus.jsonl" in captured.err and "--overwrite" in captured.err
    assert not out.exists()
    code, captured = _mine([*args, "--overwrite", "--range-min", "0"], capsys)
    assert code == 0 and out.read_text() != before
    assert not list(tmp_path.glob("*.partial"))


def test_queries_with_too_few_candidates_are_reported(model_dir, beir_dir, tmp_path, capsys):
    out = tmp_path / "mined.jsonl"
    # 60 documents minus positives: ranks 52..59 hold fewer than 7 candidates.
    args = ["--model", model_dir, "--data", beir_dir, "--range-min", "52", "--range-max", "60"]
    code, captured = _mine([*args, "--output", out], capsys)
    assert code == 0
    assert "10 of 10 queries had fewer than 7 candidates" in captured.err
    assert "kept with fewer negatives" in captured.err and "query q0" in captured.err
    rows = _read_jsonl(out)
    assert len(rows) == 10 and all(len(r["neg"]) < 7 for r in rows)
    assert all(len(set(r["neg_ids"])) == len(r["neg_ids"]) for r in rows)
    # Leaving out every query would write an empty training file: refused, nothing written.
    code, captured = _mine([*args, "--output", tmp_path / "d.jsonl", "--drop-incomplete"], capsys)
    assert code == 2 and "nothing was written" in captured.err
    assert not list(tmp_path.glob("d.*"))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda tmp: ["--data", tmp / "missing.jsonl"], "missing.jsonl: no such file"),
        (
            lambda tmp: ["--data", _bad_file(tmp, '{"query": "a", "pos": "b"}\n{"query": \n')],
            r"train.jsonl:2: malformed JSON",
        ),
        (
            lambda tmp: ["--data", _bad_file(tmp, '{"query": "a", "positives": "b"}\n')],
            r"train.jsonl:1: missing field 'pos'",
        ),
        (
            lambda tmp: [
                "--data",
                _bad_file(tmp, '{"query": "a", "pos": "b"}\n'),
                "--corpus",
                _bad_file(tmp, '{"body": "x"}\n', "corpus.jsonl"),
            ],
            r"corpus.jsonl:1: neither a corpus line .* found fields \['body'\]",
        ),
        (
            lambda tmp: [
                "--data",
                _bad_file(tmp, '{"query": "a", "pos": "b"}\n'),
                "--range-min",
                "98",
            ],
            r"range_max \(100\) must be at least range_min \+ num_negatives",
        ),
        (lambda tmp: ["--data", tmp, "--split", "dev"], "missing .*qrels/dev.tsv"),
        (
            lambda tmp: [
                "--data",
                _bad_file(tmp, '{"query": "a", "pos": "b"}\n'),
                "--model",
                tmp / "nope",
            ],  # fmt: skip
            r"--model .*nope: no such directory",
        ),
        (
            lambda tmp: [
                "--data",
                _bad_file(tmp, '{"query": "a", "pos": "b"}\n'),
                "--index",
                "hnsw",
                "--hnsw-m",
                "1",
            ],  # fmt: skip
            r"--hnsw-m: expected an integer >= 2",
        ),
        (
            lambda tmp: [
                "--data",
                _bad_file(tmp, '{"query": "a", "pos": "b"}\n'),
                "--index",
                "ivf",
                "--nlist",
                "5",
            ],  # fmt: skip
            r"nlist=5: .* more cells than the corpus has documents \(1\)",
        ),
        (lambda tmp: ["--data", tmp, "--output", tmp], r"--output .* is a directory"),
    ],
)
def test_bad_inputs_name_the_file_line_or_field(model_dir, tmp_path, capsys, setup, message):
    code, captured = _mine(
        ["--model", model_dir, "--output", tmp_path / "o.jsonl", *setup(tmp_path)], capsys
    )  # a later --model / --output overrides the first
    assert code == 2
    assert "retriever mine: error: " in captured.err or "error: argument" in captured.err
    assert re.search(message, captured.err), captured.err
    assert not (tmp_path / "o.jsonl").exists()


def _bad_file(tmp, text, name="train.jsonl"):
    path = tmp / name
    path.write_text(text)
    return path


def test_files_of_another_mine_run_are_detected(model_dir, beir_dir, tmp_path, capsys):
    from retriever.mining.files import MiningDataError, read_meta

    out = tmp_path / "mined.jsonl"
    code, _ = _mine(["--model", model_dir, "--data", beir_dir, "--output", out], capsys)
    assert code == 0 and read_meta(out)["files"]["mined.jsonl"]["size"] == out.stat().st_size
    # As a kill between the renames of an --overwrite would leave: a new file, the old meta.
    out.write_text(out.read_text() + out.read_text().splitlines()[0] + "\n")
    with pytest.raises(MiningDataError, match=r"mined.jsonl: does not match .*mined.meta.json"):
        read_meta(out)
