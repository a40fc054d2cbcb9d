"""Decoder embedders on tiny random Qwen2 and Llama configs: last-token pooling with EOS against
a float64 loop, templates, sentence-transformers reload; LoRA (only adapters train, the merged
save reloads without peft, exact resume); cached gradient = direct gradient with LoRA and with
gradient checkpointing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_encoder import save_tiny_decoder

from retriever.model import Encoder

TEXTS = ["a cell", "the protein of the virus", "blood", "tumor dose about the liver"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def decoder(request, tmp_path_factory):
    return str(save_tiny_decoder(tmp_path_factory.mktemp(request.param) / "m", kind=request.param))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_last_token_with_eos_equals_a_float64_loop(decoder, padding_side):
    encoder = Encoder.from_pretrained(decoder, append_eos=True, padding_side=padding_side)
    assert encoder.settings.pooling == "last"  # a decoder's default
    got = encoder.encode(TEXTS, "query", batch_size=3, show_progress=False)
    network = copy.deepcopy(encoder.model).double()
    eos = encoder.tokenizer.eos_token_id
    for text, vector in zip(TEXTS, got):
        ids = encoder.tokenizer(text)["input_ids"]
        assert ids[-1] == eos and ids.count(eos) == 1  # appended once, not cut off
        with torch.no_grad():
            hidden = network(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        want = (hidden / hidden.norm()).numpy()
        np.testing.assert_allclose(vector, want, atol=1e-5)
    truncated = encoder.tokenizer(" ".join(TEXTS) * 5, truncation=True, max_length=8)["input_ids"]
    assert len(truncated) == 8 and truncated[-1] == eos


def test_saved_decoder_reloads_in_sentence_transformers(decoder, tmp_path):
    from sentence_transformers import SentenceTransformer

    from retriever.model.settings import template_prefix

    prefix = template_prefix("Instruct: {instruction}\nQuery: {text}", "find the gene")
    encoder = Encoder.from_pretrained(decoder, append_eos=True, query_prefix=prefix)
    encoder.save(tmp_path / "saved")
    model = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    np.testing.assert_allclose(
        model.encode_query(TEXTS), encoder.encode(TEXTS, "query", show_progress=False), atol=1e-5
    )
    documents = encoder.encode(TEXTS, "document", show_progress=False)
    np.testing.assert_allclose(model.encode_document(TEXTS), documents, atol=1e-5)
    assert (
        json.loads((tmp_path / "saved" / "config_sentence_transformers.json").read_text())[
            "prompts"
        ]["query"]
        == "Instruct: find the gene\nQuery: "
    )


def test_what_does_not_combine_is_refused(decoder):
    from retriever.model.settings import template_prefix

    with pytest.raises(ValueError, match="pooling cls takes the first token"):
        Encoder.from_pretrained(decoder, pooling="cls")
    with pytest.raises(ValueError, match="must end with"):
        template_prefix("{text} (a query)", None)
    with pytest.raises(ValueError, match="none is given"):
        template_prefix("Instruct: {instruction}\nQuery: {text}", None)
    with pytest.raises(ValueError, match=r"unknown placeholder \{txt\}"):
        template_prefix("Q: {txt} {text}", None)


TEMPLATE = "Instruct: {instruction}\nQuery: {text}"


@pytest.mark.parametrize(
    "model, message",
    [
        ({"instruction": "Find"}, r"model.instruction needs a model.query_template with an"),
        ({"instruction": "Find", "query_template": "Q: {text}"}, r"model.instruction needs"),
        ({"query_template": TEMPLATE}, r"has an \{instruction\} but model.instruction is not"),
        ({"query_template": "Q: {txt} {text}"}, r"unknown placeholder \{txt\}"),
        ({"document_template": "{instruction} D: {text}"}, r"documents take no instruction"),
    ],
)
def test_templates_and_instructions_that_do_not_fit_are_refused(model, message):
    from retriever.train.config import ConfigError, config_from_dict

    values = {"model": {"name_or_path": "m", **model}, "data": {"train": "a.jsonl"},
              "training": {"output_dir": "unused"}}  # fmt: skip
    with pytest.raises(ConfigError, match=message) as info:
        config_from_dict(values, where="cfg.yaml")  # checks the whole config
    assert str(info.value).startswith("cfg.yaml:")


LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def test_lora_merged_save_reloads_without_peft(decoder, tmp_path):
    pytest.importorskip("peft")
    from sentence_transformers import SentenceTransformer

    from retriever.model.lora import add_lora

    encoder = Encoder.from_pretrained(decoder, append_eos=True)
    encoder.model = add_lora(encoder.model, LORA)
    trainable = {n for n, p in encoder.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # adapters that change the output (peft starts B at zero)
        for name, p in encoder.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    want = encoder.encode(TEXTS, "query", show_progress=False)
    encoder.save(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    reloaded = Encoder.from_pretrained(str(tmp_path / "merged"))
    np.testing.assert_allclose(reloaded.encode(TEXTS, "query", show_progress=False), want,
                               atol=1e-5)  # fmt: skip
    model = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    np.testing.assert_allclose(model.encode(TEXTS), want, atol=1e-5)
    plain = Encoder.from_pretrained(decoder, append_eos=True)
    assert np.abs(plain.encode(TEXTS, "query", show_progress=False) - want).max() > 1e-3


def test_lora_adapters_take_the_network_dtype(decoder):
    """A bf16 network gets bf16 adapters (trained on fp32 master weights like the rest of a bf16
    network); peft's own default would run fp32 adapters without autocast."""
    pytest.importorskip("peft")
    from retriever.model.lora import add_lora

    for dtype in (torch.bfloat16, torch.float32):
        encoder = Encoder.from_pretrained(decoder, torch_dtype=dtype)
        model = add_lora(encoder.model, LORA)
        adapters = [p for n, p in model.named_parameters() if "lora_" in n]
        assert adapters and all(p.dtype == dtype for p in adapters)


def _batch(encoder):
    from retriever.train.data import batch_of_texts

    groups = [(f"question {i} about the cell", f"passage {i} about the gene " + "x " * i,
               ["shared word"]) for i in range(6)]  # fmt: skip
    return batch_of_texts(encoder, groups, chunk_size=4)


@pytest.mark.parametrize("variant", ["lora", "checkpointing", "both"])
def test_cached_gradient_equals_the_direct_one(decoder, variant):
    from train_helpers import assert_grads_close, embed_directly, grads_or_zeros

    from retriever.loss import InfoNCELoss
    from retriever.model.lora import add_lora
    from retriever.train.step import cached_step

    if variant != "checkpointing":
        pytest.importorskip("peft")
    checkpointing = variant in ("checkpointing", "both")
    encoder = Encoder.from_pretrained(decoder, append_eos=True,
                                      gradient_checkpointing=checkpointing)  # fmt: skip
    if variant in ("lora", "both"):
        encoder.model = add_lora(encoder.model, {**LORA, "dropout": 0.1})
    encoder.train()  # LoRA dropout on: the cache's RNG replay must hold under checkpointing
    batch = _batch(encoder)
    loss_fn = InfoNCELoss(scale=20.0)
    params = [p for p in encoder.parameters() if p.requires_grad]

    def grads():
        out = grads_or_zeros(params)
        for p in params:
            p.grad = None
        return out

    torch.manual_seed(7)
    cached_step(encoder, batch, loss_fn)
    got = grads()
    torch.manual_seed(7)
    q, d = embed_directly(encoder, batch)
    loss_fn(q, d, candidate_ids=batch.candidate_ids).backward()
    want = grads()
    assert max(w.abs().max().item() for w in want) > 0
    assert_grads_close(got, want)


def test_lora_training_resumes_exactly_and_saves_the_adapters(decoder, tmp_path):
    peft = pytest.importorskip("peft")
    from train_helpers import (
        config_for,
        copy_checkpoint,
        load_weights,
        read_log,
        reset_accelerate_state,
        tiny_config,
        write_examples,
    )

    from retriever.train.trainer import Trainer

    data = write_examples(tmp_path / "train.jsonl", n=32, negatives=1)
    model = {"append_eos": True, "lora": LORA, "save_adapter": True, "query_max_length": 40,
             "query_template": "Instruct: {instruction}\nQuery: {text}",
             "instruction": "find the passage"}  # fmt: skip
    training = {"max_steps": 4, "save_steps": 2, "save_total_limit": None}
    config = tiny_config(decoder, data, tmp_path / "a", model=model, training=training)
    Trainer(config).train()
    run_b = tmp_path / "b"
    copy_checkpoint(tmp_path / "a", run_b, 2)
    resumed = config_for(config, run_b)
    reset_accelerate_state()
    Trainer(resumed, resume=True).train()

    want, got = load_weights(tmp_path / "a" / "final"), load_weights(run_b / "final")
    assert want.keys() == got.keys() and not any("lora" in k for k in want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [r["loss"] for r in read_log(run_b)] == [r["loss"] for r in read_log(tmp_path / "a")][2:]
    # Only the adapted projections moved; every other weight is the base model's.
    base = load_weights(Path(decoder))
    changed = {k for k in base if not torch.equal(base[k], want[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    # The adapters alone, on the base model, give the merged model's embeddings.
    from transformers import AutoModel

    adapted = peft.PeftModel.from_pretrained(
        AutoModel.from_pretrained(decoder), str(tmp_path / "a" / "final-adapter")
    )
    merged = Encoder.from_pretrained(str(tmp_path / "a" / "final"))
    on_base = Encoder(adapted, merged.tokenizer, merged.settings)
    want = merged.encode(TEXTS, "query", show_progress=False)
    np.testing.assert_allclose(on_base.encode(TEXTS, "query", show_progress=False), want, atol=1e-5)


def test_a_prompt_that_fills_the_max_length_is_refused(decoder, tmp_path):
    """An instruction as long as query_max_length would cut every query to its prompt: all
    queries alike. The start stops, naming the option, before anything is written."""
    from train_helpers import tiny_config, write_examples

    from retriever.train.config import ConfigError
    from retriever.train.trainer import Trainer

    data = write_examples(tmp_path / "train.jsonl", n=16, negatives=1)
    instruction = "find the passage about the protein of the virus in the cell"
    model = {"query_max_length": 8, "query_template": "Instruct: {instruction}\nQuery: {text}",
             "instruction": instruction}  # fmt: skip
    config = tiny_config(decoder, data, tmp_path / "run", model=model)
    with pytest.raises(ConfigError, match=r"model.query_max_length \(8 tokens\) leaves no room"):
        Trainer(config)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    config.model.query_max_length = 64  # room enough: it starts
    Trainer(config)
