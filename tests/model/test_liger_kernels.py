"""Liger-Kernel's RMSNorm and SwiGLU in decoder layers (`retriever.model.fused`,
``model.fused_kernels``): tiny random Qwen2, Qwen3 and Llama networks with the kernels against
the eager ones in float32 (embeddings and every parameter gradient, padded and padding-free),
with LoRA; which modules qualify and how many; the message when liger-kernel is missing.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), with
two shims (`_liger_in_the_interpreter`): sizes are tiny."""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys

import numpy as np
import pytest
import torch
from torch import nn

from retriever.model import Encoder, EncoderSettings, fused
from retriever.model.fused import (
    FusedRMSNorm,
    FusedSwiGLU,
    liger_missing,
    unfuse,
    use_fused_kernels,
)
from retriever.train.batches import StreamChunk, TokenChunk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS32 = torch.finfo(torch.float32).eps
VOCAB = 120
LENGTHS = [3, 1, 5, 2]
HIDDEN, INTERMEDIATE, LAYERS = 32, 48, 2
# Modules that take Liger's kernels in a 2-layer network: per layer two RMSNorms (Qwen3: and
# its per-head q and k norms) and one MLP, plus the final norm.
PATCHED = {"qwen2": 7, "llama": 7, "qwen3": 11}

needs_liger = pytest.mark.skipif(
    importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel"
)


@pytest.fixture(autouse=True)
def _liger_in_the_interpreter(monkeypatch):
    """Tiny inputs take the kernels (on a GPU too), and Liger's kernels run in the interpreter.

    Compiled Triton passes a Python float argument to a kernel as an fp32 scalar and links
    libdevice's ``rsqrt``. Triton's interpreter leaves the float a Python float (Liger's kernels
    call ``eps.to(tl.float32)`` on it) and runs only ``tl.math``'s functions (libdevice's are
    stubs that return None), so here a float becomes an fp32 scalar and the ``rsqrt`` Liger
    imported from libdevice becomes ``tl.math``'s: what the compiler does, in numpy."""
    monkeypatch.setattr(fused, "MIN_FUSED_ELEMENTS", 0)
    if DEVICE == "cuda" or importlib.util.find_spec("liger_kernel") is None:
        return
    import liger_kernel.ops.rms_norm as liger_rms_norm_ops
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    convert = getattr(interpreter, "_implicit_cvt", None)
    if convert is not None:

        def fp32_floats(arg):
            if isinstance(arg, float):
                ty = tl.str_to_ty(triton.runtime.jit.mangle_type(arg), None)  # fp32
                return tl.tensor(interpreter.TensorHandle(np.array([arg], np.float32), ty), ty)
            return convert(arg)

        monkeypatch.setattr(interpreter, "_implicit_cvt", fp32_floats)
    if hasattr(liger_rms_norm_ops, "rsqrt"):
        monkeypatch.setattr(liger_rms_norm_ops, "rsqrt", lambda x: tl.math.rsqrt(x))


def _network(kind: str, **overrides) -> nn.Module:
    """A 2-layer random decoder in float32. rms_norm_eps 1e-2 and norm weights drawn around 1
    (not transformers' ones), so a kernel given the wrong eps or no weight computes something
    else, far outside the tolerance."""
    import transformers as hf

    config = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                  num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=64, rms_norm_eps=1e-2, **overrides)  # fmt: skip
    config_class, model_class = {
        "qwen2": (hf.Qwen2Config, hf.Qwen2Model),
        "qwen3": (hf.Qwen3Config, hf.Qwen3Model),
        "llama": (hf.LlamaConfig, hf.LlamaModel),
        "gemma": (hf.GemmaConfig, hf.GemmaModel),
    }[kind]
    if kind in ("qwen3", "gemma"):
        config["head_dim"] = HIDDEN // 2
    torch.manual_seed(0)
    model = model_class(config_class(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    return model.float().train()


class _Tokenizer:
    """What Encoder needs of a tokenizer here: a pad token and a vocabulary size."""

    pad_token, eos_token, pad_token_id = "<pad>", "<pad>", 0

    def __len__(self) -> int:
        return VOCAB


def _encoder(network: nn.Module) -> Encoder:
    return Encoder(network.to(DEVICE), _Tokenizer(), EncoderSettings(pooling="last"))


def _chunk(packed: bool):
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(3, VOCAB, (n,), generator=g, dtype=torch.int32) for n in LENGTHS]
    if packed:
        return StreamChunk(torch.cat(texts), torch.tensor(LENGTHS), 8)
    ids = torch.zeros(len(texts), max(LENGTHS), dtype=torch.int32)
    for row, t in enumerate(texts):  # decoders pad on the left
        ids[row, ids.shape[1] - len(t) :] = t
    return TokenChunk(ids, torch.tensor(LENGTHS), True)


def _embed_and_grads(encoder: Encoder, chunk) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    encoder.zero_grad(set_to_none=True)
    embeddings = encoder(chunk.features(DEVICE))
    weights = torch.linspace(-1, 1, embeddings.numel(), device=embeddings.device)
    (embeddings * weights.view_as(embeddings)).pow(3).sum().backward()  # not uniform in rows
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    return embeddings.detach(), grads


class _Calls:
    """Counts the calls of Liger's functional API (what the fused forwards import)."""

    def __init__(self, monkeypatch):
        import liger_kernel.transformers.functional as functional

        self.counts = {"liger_rms_norm": 0, "liger_swiglu": 0}
        for name in self.counts:
            monkeypatch.setattr(functional, name, self._counted(name, getattr(functional, name)))

    def _counted(self, name, function):
        def counted(*args, **kwargs):
            self.counts[name] += 1
            return function(*args, **kwargs)

        return counted


# Error model. Both networks run in fp32 and differ only in how the kernels round: a norm sums
# the squares of a row of HIDDEN values in another order (Liger's tree against PyTorch's), its
# mean square off by up to about HIDDEN roundings (2^-24 relative each), and the same holds for
# its backward's row sums; the weight gradients of Liger's norm sum over the rows in another
# order (about as many roundings as tokens, LENGTHS' 11), and SwiGLU is elementwise (a few).
# Two layers and the pooling carry these relative errors to the embeddings and gradients
# without blowing them up (the random weights are O(1) in norm), so both are compared with a
# relative tolerance of a few times max(HIDDEN, tokens) fp32 ulps, of each tensor's scale for
# the gradients: 8 * 32 * 2^-23 = 3.1e-5 (measured: at most 8 ulps). A kernel that computes
# something else (another eps, no weight, gate and up swapped) misses by far more: 0.29 for
# eps 1e-6 instead of the model's 1e-2.
TOL = 8 * max(HIDDEN, sum(LENGTHS)) * EPS32


def _assert_same(got: tuple, want: tuple) -> None:
    (e_got, g_got), (e_want, g_want) = got, want
    torch.testing.assert_close(e_got, e_want, rtol=TOL, atol=TOL * e_want.abs().max().item())
    assert g_got.keys() == g_want.keys()
    for name, want_grad in g_want.items():
        scale = want_grad.abs().max().item()
        torch.testing.assert_close(g_got[name], want_grad, rtol=TOL, atol=TOL * scale, msg=name)


@needs_liger
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama"])
def test_a_decoder_with_liger_kernels_equals_the_eager_one(kind, packed, monkeypatch):
    eager = _network(kind)
    network = copy.deepcopy(eager)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    assert use_fused_kernels(network) == PATCHED[kind]
    after = network.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    encoders = [_encoder(eager), _encoder(network)]
    if packed:
        for encoder in encoders:
            assert encoder.use_padding_free() is None
    want = _embed_and_grads(encoders[0], _chunk(packed))
    calls = _Calls(monkeypatch)
    got = _embed_and_grads(encoders[1], _chunk(packed))
    norms = PATCHED[kind] - LAYERS
    assert calls.counts == {"liger_rms_norm": norms, "liger_swiglu": LAYERS}  # the kernels ran
    _assert_same(got, want)


@needs_liger
@pytest.mark.parametrize("order", ["fused-then-lora", "lora-then-fused"])
def test_lora_adapters_train_through_the_liger_mlp(order, monkeypatch):
    """peft wraps the MLP's projections; the fused forward calls them as modules."""
    from peft.tuners.lora import LoraLayer

    from retriever.model.lora import add_lora

    options = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
    base = _network("qwen2")
    torch.manual_seed(1)
    eager = add_lora(copy.deepcopy(base), options)
    with torch.no_grad():  # B = 0 at first: A's gradient would be zero, and B A untested
        for name, p in eager.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    if order == "fused-then-lora":
        network = copy.deepcopy(base)
        assert use_fused_kernels(network) == PATCHED["qwen2"]
        network = add_lora(network, options)
        network.load_state_dict(eager.state_dict())
    else:
        network = copy.deepcopy(eager)
        assert use_fused_kernels(network) == PATCHED["qwen2"]
    mlps = [m for m in network.modules() if isinstance(m, FusedSwiGLU)]
    assert len(mlps) == LAYERS and all(isinstance(m.gate_proj, LoraLayer) for m in mlps)
    want = _embed_and_grads(_encoder(eager), _chunk(False))
    calls = _Calls(monkeypatch)
    got = _embed_and_grads(_encoder(network), _chunk(False))
    assert calls.counts["liger_swiglu"] == LAYERS
    assert all("lora_" in name for name in got[1])  # only the adapters train
    _assert_same(got, want)


@needs_liger
def test_modules_that_compute_something_else_stay_eager():
    # Gemma: x * (1 + w) in fp32, and a tanh-GELU MLP. A Llama with GELU: only its norms.
    assert use_fused_kernels(_network("gemma")) == 0
    gelu = _network("llama", hidden_act="gelu")
    assert use_fused_kernels(gelu) == PATCHED["llama"] - LAYERS
    assert not any(isinstance(m, FusedSwiGLU) for m in gelu.modules())
    assert use_fused_kernels(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.SiLU())) == 0


@needs_liger
def test_the_swap_is_per_instance_and_undone_by_unfuse(tmp_path):
    from transformers import AutoModel
    from transformers.models.qwen2 import modeling_qwen2

    forwards = (modeling_qwen2.Qwen2RMSNorm.forward, modeling_qwen2.Qwen2MLP.forward)
    network, other = _network("qwen2"), _network("qwen2")
    assert use_fused_kernels(network) == PATCHED["qwen2"]
    assert use_fused_kernels(network) == 0  # already fused
    mixins = [type(m).__mro__[1] for m in network.modules() if hasattr(m, "_unfused_class")]
    assert mixins.count(FusedRMSNorm) == 5 and mixins.count(FusedSwiGLU) == LAYERS
    # transformers' classes and the other network are untouched.
    assert (modeling_qwen2.Qwen2RMSNorm.forward, modeling_qwen2.Qwen2MLP.forward) == forwards
    assert not any(hasattr(m, "_unfused_class") for m in other.modules())
    network.save_pretrained(tmp_path)  # the state dict is the network's own
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in other.state_dict().items())
    assert unfuse(network) == PATCHED["qwen2"]
    assert not any(hasattr(m, "_unfused_class") for m in network.modules())


@needs_liger
def test_mixed_dtypes_and_cpu_tensors_take_the_modules_own_forward(monkeypatch):
    """An RMSNorm whose input and weight differ in dtype (transformers promotes the product)
    and, off the interpreter, CPU tensors run transformers' code: same numbers, no kernel."""
    network, eager = _network("qwen3"), _network("qwen3")
    use_fused_kernels(network)
    norm, plain = network.layers[0].self_attn.q_norm, eager.layers[0].self_attn.q_norm
    assert isinstance(norm, FusedRMSNorm)
    calls = _Calls(monkeypatch)
    x = torch.randn(3, 2, HIDDEN // 2).bfloat16()
    torch.testing.assert_close(norm(x), plain(x), rtol=0, atol=0)
    assert norm(x).dtype == torch.float32 and calls.counts["liger_rms_norm"] == 0
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ids = torch.tensor(np.arange(3, 15).reshape(2, 6))
    torch.testing.assert_close(network(input_ids=ids).last_hidden_state,
                               eager(input_ids=ids).last_hidden_state, rtol=0, atol=0)  # fmt: skip
    assert calls.counts == {"liger_rms_norm": 0, "liger_swiglu": 0}


def _block_liger(monkeypatch) -> None:
    """liger-kernel as on a machine without it: every liger module unimportable."""
    names = [n for n in sys.modules if n == "liger_kernel" or n.startswith("liger_kernel.")]
    for name in {"liger_kernel", *names}:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("option", [None, True, False])
def test_without_liger_decoders_stay_eager_and_the_trainer_says_why(
    option, tmp_path, monkeypatch, caplog
):
    """null on a GPU: one INFO line; true: a warning naming the option; false: nothing. A BERT
    network says nothing (its kernels are retriever's)."""
    from tiny_encoder import save_tiny_bert, save_tiny_decoder
    from train_helpers import tiny_config

    from retriever.train.builders import build_encoder

    _block_liger(monkeypatch)
    network = _network("qwen2")
    assert liger_missing(network) and use_fused_kernels(network) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    caplog.set_level(logging.INFO, logger="retriever")
    model = {"fused_kernels": option, "fused_layer_norm": False}
    decoder = str(save_tiny_decoder(tmp_path / "decoder"))
    encoder = build_encoder(tiny_config(decoder, "unused.jsonl", tmp_path, model=model))
    assert not any(hasattr(m, "_unfused_class") for m in encoder.model.modules())
    said = [r for r in caplog.records if "retriever-train[liger]" in r.getMessage()]
    if option is False:
        assert not said
    else:
        assert len(said) == 1
        message = said[0].getMessage()
        assert said[0].levelno == (logging.INFO if option is None else logging.WARNING)
        assert "model.fused_kernels" in message and "RMSNorm, SwiGLU" in message
        assert ("true, but" in message) == (option is True)
    caplog.clear()
    bert = str(save_tiny_bert(tmp_path / "bert"))
    build_encoder(tiny_config(bert, "unused.jsonl", tmp_path, model=model))
    assert not [r for r in caplog.records if "retriever-train[liger]" in r.getMessage()]
