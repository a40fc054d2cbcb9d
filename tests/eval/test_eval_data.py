"""BEIR / Hub loaders: correct content, and an error or report that names the problem."""

import gzip
import json
import logging

import pytest
from eval_helpers import write_beir

from retriever.eval.data import document_text, load_beir, load_task, task_from_rows


def test_load_beir_reads_corpus_queries_and_graded_qrels(tmp_path):
    task = load_beir(write_beir(tmp_path / "toy"), "test")
    assert task.name == "toy" and task.split == "test"
    assert task.qrels == {"q1": {"d1": 2, "d3": 0}, "q2": {"d2": 1}}
    assert task.queries == {"q1": "what purrs", "q2": "what barks"}  # q3 has no judgement
    assert task.report.queries_without_qrels == 1
    ids, texts = task.document_texts()
    assert ids == ["d1", "d2", "d3"]
    assert texts == ["Cats Cats purr.", "Dogs bark.", "Fish swim."]  # title + " " + text, stripped


def test_gzipped_files_are_read(tmp_path):
    root = write_beir(tmp_path / "toy")
    for name in ("corpus.jsonl", "queries.jsonl"):
        data = (root / name).read_bytes()
        (root / name).unlink()
        with gzip.open(root / f"{name}.gz", "wb") as f:
            f.write(data)
    assert len(load_beir(root).corpus) == 3


def test_missing_files_are_all_named(tmp_path):
    root = write_beir(tmp_path / "toy")
    (root / "queries.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"queries\.jsonl.*dev\.tsv.*splits: test"):
        load_beir(root, "dev")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_beir(tmp_path / "nowhere")


def test_malformed_json_line_names_file_and_line(tmp_path):
    good = json.dumps({"_id": "d1", "text": "a"})
    root = write_beir(tmp_path / "toy", corpus=f"{good}\n\n{{'_id': 'd2'\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl:3: malformed JSON"):
        load_beir(root)
    root = write_beir(tmp_path / "toy2", queries="[1, 2]\n")
    with pytest.raises(ValueError, match=r"queries\.jsonl:1: expected a JSON object"):
        load_beir(root)
    root = write_beir(tmp_path / "toy3", queries=[{"text": "no id"}])
    with pytest.raises(ValueError, match=r"queries\.jsonl:1: missing field '_id'"):
        load_beir(root)


def test_duplicate_ids_are_errors(tmp_path):
    corpus = [{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"}, {"_id": "d1", "text": "c"}]
    with pytest.raises(ValueError, match=r"corpus\.jsonl:3: duplicate document id 'd1'.*line 1"):
        load_beir(write_beir(tmp_path / "a", corpus=corpus))
    queries = [{"_id": "q1", "text": "a"}, {"_id": "q1", "text": "b"}]
    with pytest.raises(ValueError, match=r"queries\.jsonl:2: duplicate query id 'q1'"):
        load_beir(write_beir(tmp_path / "b", queries=queries))


def test_repeated_qrels_pair_keeps_last_and_is_counted(tmp_path, caplog):
    qrels = [("q1", "d1", 1), ("q1", "d1", 2)]
    with caplog.at_level(logging.WARNING):
        task = load_beir(write_beir(tmp_path / "toy", qrels=qrels))
    assert task.qrels == {"q1": {"d1": 2}}
    assert task.report.duplicate_qrels == 1
    assert "repeated" in caplog.text


def test_empty_corpus_or_queries_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"corpus\.jsonl: the corpus is empty"):
        load_beir(write_beir(tmp_path / "a", corpus="\n"))
    with pytest.raises(ValueError, match=r"queries\.jsonl: no queries"):
        load_beir(write_beir(tmp_path / "b", queries="\n"))
    with pytest.raises(ValueError, match=r"test\.tsv: no relevance judgements"):
        load_beir(write_beir(tmp_path / "c", qrels=[]))


def test_unknown_ids_in_qrels_are_counted_and_reported(tmp_path, caplog):
    qrels = [("q1", "d1", 1), ("q1", "ghost", 1), ("q9", "d1", 1), ("q2", "nope", 1)]
    with caplog.at_level(logging.WARNING):
        task = load_beir(write_beir(tmp_path / "toy", qrels=qrels))
    assert task.qrels == {"q1": {"d1": 1}}  # q2 lost its only judgement
    assert task.report.unknown_corpus_ids == 2 and task.report.unknown_query_ids == 1
    assert "1 qrels line(s) naming unknown queries and 2 naming unknown documents" in caplog.text
    assert "'ghost'" in caplog.text
    # Every judgement unknown: nothing left to evaluate is an error, not an empty result.
    with pytest.raises(ValueError, match="no judged query"):
        load_beir(write_beir(tmp_path / "bad", qrels=[("q9", "d1", 1)]))


def test_malformed_qrels_lines(tmp_path):
    with pytest.raises(ValueError, match=r"test\.tsv:3: expected 3 tab-separated fields"):
        load_beir(
            write_beir(tmp_path / "a", qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq1 d1 1\n")
        )
    with pytest.raises(ValueError, match=r"test\.tsv:2: score 'high' is not a number"):
        load_beir(write_beir(tmp_path / "b", qrels="query-id\tcorpus-id\tscore\nq1\td1\thigh\n"))
    with pytest.raises(ValueError, match=r"test\.tsv:1: score '0.5' is not an integer"):
        load_beir(write_beir(tmp_path / "c", qrels="q1\td1\t0.5\n"))


def test_task_from_hub_style_rows():
    corpus = [{"_id": "d1", "title": "T", "text": "x"}, {"_id": "d2", "title": "", "text": "y"}]
    queries = [{"_id": "q1", "text": "x?"}]
    qrels = [
        {"query-id": "q1", "corpus-id": "d1", "score": 1},
        {"query-id": "q1", "corpus-id": "dx", "score": 1},
    ]
    task = task_from_rows("mteb/toy", "test", corpus, queries, qrels)
    assert task.name == "toy" and task.qrels == {"q1": {"d1": 1}}
    assert task.report.unknown_corpus_ids == 1
    with pytest.raises(ValueError, match=r"mteb/toy qrels/test row 1: missing field 'score'"):
        task_from_rows("mteb/toy", "test", corpus, queries, [{"query-id": "q1", "corpus-id": "d1"}])


def test_load_task_rejects_a_path_that_is_neither(tmp_path):
    with pytest.raises(FileNotFoundError, match="nor a Hugging Face dataset id"):
        load_task(str(tmp_path / "missing" / "dir"))


def test_document_text():
    assert document_text({"title": None, "text": "body "}) == "body"
    assert document_text({"title": "T", "text": ""}) == "T"


def test_load_hub_reads_the_mteb_layout_through_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    tables = {
        ("mteb/toy", "corpus", None): [{"_id": "d1", "title": "T", "text": "x"}],
        ("mteb/toy", "queries", None): [{"_id": "q1", "text": "x?"}],
        ("mteb/toy", "default", "test"): [{"query-id": "q1", "corpus-id": "d1", "score": 1}],
    }
    calls = []

    def fake_load_dataset(repo, config=None, split=None, revision=None):
        calls.append((repo, config, split))
        if (repo, config, split) not in tables:
            raise FileNotFoundError(f"{repo} {config} {split}")
        rows = datasets.Dataset.from_list(tables[repo, config, split])
        return rows if split else datasets.DatasetDict({"train": rows})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task("mteb/toy", "test")
    assert task.corpus == {"d1": {"title": "T", "text": "x"}} and task.qrels == {"q1": {"d1": 1}}
    with pytest.raises(FileNotFoundError, match="no qrels for split 'dev'.*mteb/toy-qrels"):
        load_task("mteb/toy", "dev")
