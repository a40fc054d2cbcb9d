"""Activation checkpointing recomputes each layer inside backward, outside the encoder's SDPA
context: the recomputation must see the same attention backends as the forward (on Hopper GPUs
cuDNN attention would otherwise be picked in the recomputation only, and torch refuses the
mismatched saved tensors; seen on an H200 with a 0.5B Qwen2). On CPU the check is on the
backend flags each attention call sees."""

from __future__ import annotations

import pytest
import torch
from tiny_encoder import save_tiny_decoder

from retriever.model import Encoder


@pytest.mark.parametrize("cudnn_attention", [False, True])
def test_recomputation_sees_the_forward_attention_backends(tmp_path, monkeypatch, cudnn_attention):
    path = save_tiny_decoder(tmp_path / "m")
    encoder = Encoder.from_pretrained(
        str(path), gradient_checkpointing=True, cudnn_attention=cudnn_attention,
        attn_implementation="sdpa",
    )  # fmt: skip
    encoder.train()
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    features = encoder.tokenize(["a cell", "the protein of the virus"], "query")
    encoder(features).sum().backward()
    layers = encoder.model.config.num_hidden_layers
    assert len(seen) == 2 * layers  # the forward's calls, then the recomputation's
    assert seen == [cudnn_attention] * (2 * layers)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the caller's setting is restored
