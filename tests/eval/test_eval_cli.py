"""`retriever eval` end to end on generated BEIR tasks with a tiny random model.

The reference is independent of our encode, search and metrics code: sentence-transformers
embeddings, a numpy score matrix and pytrec_eval.
"""

import json

import numpy as np
import pytest
from eval_helpers import random_task
from sentence_transformers import SentenceTransformer
from tiny_encoder import save_tiny_bert

from retriever.cli import main
from retriever.model import Encoder

pytrec_eval = pytest.importorskip("pytrec_eval", reason="needs pytrec-eval-terrier")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tiny = save_tiny_bert(tmp_path_factory.mktemp("tiny"))
    path = tmp_path_factory.mktemp("st") / "model"
    Encoder.from_pretrained(str(tiny), pooling="mean", query_prefix="q: ").save(path)
    return str(path)


def _reference(model_dir, root):
    """nDCG@10 etc. from sentence-transformers embeddings, numpy scores and pytrec_eval."""
    corpus = [json.loads(line) for line in (root / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (root / "queries.jsonl").read_text().splitlines()]
    qrels = {}
    for line in (root / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        qrels.setdefault(q, {})[d] = int(s)
    st = SentenceTransformer(model_dir, device="cpu")
    doc_emb = st.encode_document([(d["title"] + " " + d["text"]).strip() for d in corpus])
    query_emb = st.encode_query([q["text"] for q in queries])
    scores = query_emb.astype(np.float64) @ doc_emb.astype(np.float64).T
    run = {
        q["_id"]: {d["_id"]: float(s) for d, s in zip(corpus, row, strict=True)}
        for q, row in zip(queries, scores, strict=True)
        if q["_id"] in qrels
    }
    measures = {"ndcg_cut.10", "recall.5", "P.1", "map_cut.10"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    return {
        ours: np.mean([r[theirs] for r in per_query.values()])
        for ours, theirs in [
            ("ndcg_at_10", "ndcg_cut_10"),
            ("recall_at_5", "recall_5"),
            ("precision_at_1", "P_1"),
            ("map_at_10", "map_cut_10"),
        ]
    }


def test_cli_end_to_end_matches_independent_reference(model_dir, tmp_path, capsys):
    task_a = random_task(tmp_path / "task_a", seed=0)
    task_b = random_task(tmp_path / "task_b", seed=1)
    output = tmp_path / "out" / "results.json"
    argv = ["eval", "--model", model_dir, "--data", str(task_a), str(task_b)]
    argv += ["--split", "test", "--output", str(output), "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "nDCG@10" in printed and "task_a" in printed and "task_b" in printed

    report = json.loads(output.read_text())
    assert report["model"] == model_dir and report["split"] == "test"
    assert [r["task"] for r in report["results"]] == ["task_a", "task_b"]
    for result, root in zip(report["results"], (task_a, task_b), strict=True):
        assert result["num_documents"] == 60 and result["num_queries"] == 12
        assert result["main_score"] == result["ndcg_at_10"]
        for key in ("ndcg_at_1000", "mrr_at_10", "recall_at_100", "map_at_5", "precision_at_3"):
            assert key in result
        assert result["timings"]["total_s"] > 0 and result["documents_per_s"] > 0
        for key, value in _reference(model_dir, root).items():
            assert result[key] == pytest.approx(value, abs=1e-5), key

    # The output exists now: a second run must refuse and leave it untouched.
    before = output.read_text()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert output.read_text() == before
    rerun = [*argv, "--overwrite", "--index", "torch", "--k-values", "1,10"]
    assert main(rerun) == 0
    assert "ndcg_at_100" not in json.loads(output.read_text())["results"][0]


def test_cli_reports_bad_data_without_a_traceback(model_dir, tmp_path, capsys):
    root = random_task(tmp_path / "task", seed=2)
    (root / "corpus.jsonl").unlink()
    argv = ["eval", "--model", model_dir, "--data", str(root), "--no-progress"]
    assert main(argv) == 2
    assert "corpus.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--model", "/no/such/dir"], r"--model /no/such/dir: no such directory"),
        (["--model", "EMPTY"], r"not a model directory \(no config.json"),
        (["--model", "pkg:no_such_package"], r"no installed package 'no_such_package'"),
        (["--index", "hnsw", "--hnsw-m", "0"], r"--hnsw-m: expected an integer >= 2"),
        (["--index", "hnsw", "--hnsw-m", "1"], r"--hnsw-m: expected an integer >= 2"),
        (["--index", "flat", "--nlist", "200"], r"--nlist applies to --index ivf only"),
        (["--device", "tpu9"], r"--device tpu9: not a device"),
        (["--cache-dir", "AFILE"], r"--cache-dir .*afile is a file, not a directory"),
        (["--cache-dir", "AFILE_SUB"], r"--cache-dir .*afile/sub: .*afile is a file"),
        (["--truncate-dim", "0"], r"--truncate-dim: expected a positive integer"),
        (["--document-max-length", "1000"], r"--document-max-length: 1000 tokens, more than"),
        (["--index", "ivf", "--nprobe", "0"], r"--nprobe: expected a positive integer"),
        (["--index", "ivf", "--nlist", "0"], r"--nlist: expected a positive integer"),
        (["--index", "ivf", "--nlist", "61"], r"nlist=61: .* more cells than .* documents \(60\)"),
        (["--batch-size", "0"], r"--batch-size: expected a positive integer"),
        (["--output", "OUTDIR"], r"--output .* is a directory"),
    ],
)
def test_bad_options_are_refused_before_any_work(model_dir, tmp_path, capsys, options, message):
    import re

    root = random_task(tmp_path / "task", seed=3)
    (tmp_path / "empty").mkdir()
    (tmp_path / "outdir").mkdir()
    (tmp_path / "afile").write_text("x")
    where = {
        "EMPTY": str(tmp_path / "empty"),
        "OUTDIR": str(tmp_path / "outdir"),
        "AFILE": str(tmp_path / "afile"),
        "AFILE_SUB": str(tmp_path / "afile" / "sub"),
    }
    options = [where.get(o, o) for o in options]
    argv = ["eval", "--model", model_dir, "--data", str(root), "--no-progress", *options]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err
    assert "Traceback" not in err


def test_a_corpus_line_without_text_is_an_error(model_dir, tmp_path, capsys):
    root = random_task(tmp_path / "task", seed=4)
    lines = (root / "corpus.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"_id": "doc2", "title": "only a title"})
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["eval", "--model", model_dir, "--data", str(root), "--no-progress"]) == 2
    assert "corpus.jsonl:3: document 'doc2' has no 'text'" in capsys.readouterr().err
