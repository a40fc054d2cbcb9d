"""The mteb wrapper: mteb scores our encoder like our evaluator, and like its own ST wrapper."""

import pytest
from eval_helpers import random_task
from sentence_transformers import SentenceTransformer
from tiny_encoder import save_tiny_bert

from retriever.eval import evaluate_task, load_beir
from retriever.model import Encoder

mteb = pytest.importorskip("mteb", reason="the optional extra `mteb` is not installed")
if int(mteb.__version__.split(".")[0]) < 2:
    pytest.skip("to_mteb_task needs mteb >= 2", allow_module_level=True)

from retriever.eval.mteb_encoder import MTEBEncoder, to_mteb_task  # noqa: E402

KEYS = ("ndcg_at_10", "mrr_at_10", "map_at_10", "recall_at_10", "precision_at_1")


def _mteb_scores(model, task):
    result = mteb.evaluate(model, to_mteb_task(task), cache=None, show_progress_bar=False)
    return result.task_results[0].scores[task.split][0]


def test_mteb_scores_our_encoder_like_our_evaluator_and_its_own_st_wrapper(tmp_path):
    tiny = save_tiny_bert(tmp_path / "tiny")
    Encoder.from_pretrained(str(tiny), query_prefix="q: ", document_prefix="d: ").save(
        tmp_path / "model"
    )
    task = load_beir(random_task(tmp_path / "task", seed=5))
    encoder = Encoder.from_pretrained(str(tmp_path / "model"))

    ours = evaluate_task(encoder, task, show_progress=False)
    via_wrapper = _mteb_scores(MTEBEncoder(encoder), task)
    via_st = _mteb_scores(SentenceTransformer(str(tmp_path / "model"), device="cpu"), task)
    for key in KEYS:
        # mteb rounds its scores to 5 decimals.
        assert via_wrapper[key] == pytest.approx(ours[key], abs=6e-6), key
        assert via_wrapper[key] == pytest.approx(via_st[key], abs=1e-9), key


def test_encode_accepts_plain_lists_and_picks_the_side():
    encoder = MTEBEncoder.__new__(MTEBEncoder)
    calls = []

    class Fake:
        normalize = True

        def encode(self, texts, side, **kwargs):
            calls.append((texts, side))
            return texts

    encoder.encoder, encoder.batch_size, encoder.dtype, encoder.show_progress = (
        Fake(),
        4,
        None,
        False,
    )
    encoder.encode(["a", "b"], prompt_type=mteb.types.PromptType.document)
    encoder.encode([{"text": ["c"]}, {"text": ["d"]}], prompt_type=None)
    assert calls == [(["a", "b"], "document"), (["c", "d"], "query")]
