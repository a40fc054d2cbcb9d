"""STS evaluation against sentence-transformers' EmbeddingSimilarityEvaluator on the same model."""

from __future__ import annotations

import json

import pytest
from tiny_encoder import minilm_path
from train_helpers import SHARED_DATA

from retriever.eval.sts import evaluate_sts, is_sts, load_sts


def test_spearman_equals_sentence_transformers_on_stsb(tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import (
        EmbeddingSimilarityEvaluator,
    )

    from retriever.model import Encoder

    lines = (SHARED_DATA / "stsb" / "test.jsonl").read_text().splitlines()[:200]
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    task = load_sts(tmp_path, "test")
    assert is_sts(tmp_path / "test.jsonl") and len(task.scores) == 200
    ours = evaluate_sts(Encoder.from_pretrained(minilm_path()), task)
    model = SentenceTransformer(minilm_path(), device="cpu")
    theirs = EmbeddingSimilarityEvaluator(task.first, task.second, task.scores.tolist())(model)
    spearman = next(v for k, v in theirs.items() if k.endswith("spearman_cosine"))
    assert ours["main_score"] == ours["spearman"] == pytest.approx(spearman, abs=1e-4)


def test_bad_lines_are_named(tmp_path):
    path = tmp_path / "sts.jsonl"
    rows = [{"sentence1": "a", "sentence2": "b", "score": 1}, {"sentence1": "a", "sentence2": ""}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"sts.jsonl:2: 'sentence1' and 'sentence2'"):
        load_sts(path)
    path.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "score": "high"}) + "\n")
    with pytest.raises(ValueError, match=r"sts.jsonl:1: 'score' must be a number"):
        load_sts(path)


def test_eval_cli_scores_an_sts_file_as_evaluate_sts_does(tmp_path, capsys):
    from tiny_encoder import save_tiny_bert

    from retriever.cli import main
    from retriever.model import Encoder

    model = save_tiny_bert(tmp_path / "model")
    lines = (SHARED_DATA / "stsb" / "test.jsonl").read_text().splitlines()[:40]
    (tmp_path / "sts.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "results.json"
    argv = [
        "eval",
        "--model",
        str(model),
        "--data",
        str(tmp_path / "sts.jsonl"),
        "--output",
        str(out),
    ]
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 0
    assert "Spearman" in capsys.readouterr().out
    (result,) = json.loads(out.read_text())["results"]
    direct = evaluate_sts(Encoder.from_pretrained(str(model)), load_sts(tmp_path / "sts.jsonl"))
    assert result["spearman"] == pytest.approx(direct["spearman"], abs=1e-6)
    assert result["num_pairs"] == 40

    (tmp_path / "sts.jsonl").write_text('{"sentence1": "a", "sentence2": "b"}\n')
    assert main([*argv, "--overwrite", "--no-progress"]) == 2
    assert "sts.jsonl:1: 'score' must be a number" in capsys.readouterr().err
    assert json.loads(out.read_text())["results"] == [result]  # the saved results stand
