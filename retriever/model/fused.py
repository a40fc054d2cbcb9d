"""Fused kernels swapped into a loaded network's layers, in place (issue 28, item 3): retriever's
in BERT-family encoders, Liger-Kernel's in decoders.

Between its matrix products a BERT layer does elementwise work and reductions: bias adds,
GELU, dropout, residual adds, LayerNorm and their backwards (39% of a packed all-MiniLM-L6-v2
step's GPU time on an H100; docs/benchmarks.md). `use_fused_kernels` gives the modules that do
it Triton kernels:

* ``*SelfOutput`` / ``*Output`` (``LayerNorm(dropout(dense(h)) + input)``): ``F.linear`` without
  the bias, then `retriever.model.residual_norm` (bias, dropout, residual, LayerNorm: one
  kernel each way, the mask drawn in the kernel from a seed of torch's generator);
* ``*Intermediate`` (``gelu(dense(h))``) when the activation is erf GELU (``hidden_act:
  gelu``): ``F.linear`` without the bias, then `retriever.model.bias_gelu`. Other activations
  keep the module as it was.

A module qualifies when its class's ``forward`` is BERT's own code (``BertSelfOutput`` /
``BertIntermediate``: the same bytecode, names and constants; transformers copies these classes
into RoBERTa, XLM-R, MPNet, ELECTRA and most other encoders) over plain ``nn.Linear``,
``nn.Dropout`` and ``nn.LayerNorm`` submodules (a `FusedLayerNorm` too). No modelling code is
copied. The swap changes a module's class only: parameters, their names, the state dict and
hooks stay. The fused path runs on CUDA inputs of at least `MIN_FUSED_ELEMENTS` elements (and on
CPU tensors under TRITON_INTERPRET=1, for tests); others take the module's own forward.

Decoder layers (Llama, Qwen2, Qwen3, Mistral and the families that copy their modules) get
Liger-Kernel's Triton kernels (`pip install "retriever-train[liger]"`), through its functional
API and per module instance, never by patching transformers (Liger's own
``apply_liger_kernel_to_*`` replaces classes and functions process-wide):

* an RMSNorm whose ``forward`` is ``LlamaRMSNorm``'s (the layers' norms, the final norm and
  Qwen3's per-head q/k norms): `liger_rms_norm` (Llama casting: the mean square and its
  reciprocal root in fp32, the product with the weight in the input's dtype), when the input
  and the weight share a dtype (otherwise transformers' type promotion gives another dtype,
  so the module's own forward runs);
* an MLP whose ``forward`` is ``LlamaMLP``'s (``down(act(gate(x)) * up(x))``) with a SiLU
  activation: `liger_swiglu` between the projections. The projections are called as modules,
  so LoRA's wrapped linears (peft) work.

Gemma's RMSNorm (``x * (1 + w)`` in fp32) and GELU MLPs compute something else and stay eager.
RoPE stays eager too: transformers applies it through a module-level function
(``apply_rotary_pos_emb``) called from the attention's forward, so Liger's RoPE can only be
installed by patching that function for every model in the process. Without liger-kernel
these modules keep their own forward (`liger_missing` tells the trainer to say so).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from retriever.loss.triton_mode import interpreting

# Below this many elements a call keeps PyTorch's path. A fused call replaces 3 to 5 PyTorch
# launches with 1 or 2 (the seed's and the kernel's), so unlike the LayerNorm alone
# (`retriever.model.layer_norm.MIN_FUSED_ELEMENTS`, 2^23) it costs the host no more than the
# eager path; the floor only keeps the tiny calls of evaluation and of `packing_problem`'s probe
# off Triton's launcher and compiler. 2^20: e.g. 2,730 tokens at width 384.
MIN_FUSED_ELEMENTS = 2**20


def _fused(x: Tensor) -> bool:
    return x.numel() >= MIN_FUSED_ELEMENTS if x.is_cuda else interpreting()


class FusedResidualNorm(nn.Module):
    """The fused ``forward`` of a ``BertSelfOutput``-like module (a mixin: `use_fused_kernels`
    puts it before the module's own class)."""

    dense: nn.Linear
    dropout: nn.Dropout
    LayerNorm: nn.LayerNorm

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        if not _fused(input_tensor):
            return super().forward(hidden_states, input_tensor)
        from retriever.model.residual_norm import residual_layer_norm  # triton: only here

        norm = self.LayerNorm
        p = self.dropout.p if self.dropout.training else 0.0
        return residual_layer_norm(F.linear(hidden_states, self.dense.weight), self.dense.bias,
                                   input_tensor, norm.weight, norm.bias, norm.eps, p)  # fmt: skip


class FusedBiasGelu(nn.Module):
    """The fused ``forward`` of a ``BertIntermediate``-like module with erf GELU (a mixin)."""

    dense: nn.Linear

    def forward(self, hidden_states: Tensor) -> Tensor:
        if not _fused(hidden_states):
            return super().forward(hidden_states)
        from retriever.model.bias_gelu import bias_gelu  # triton: only here

        return bias_gelu(F.linear(hidden_states, self.dense.weight), self.dense.bias)


class FusedRMSNorm(nn.Module):
    """The ``forward`` of a ``LlamaRMSNorm``-like module through Liger's RMSNorm (a mixin)."""

    weight: nn.Parameter
    variance_epsilon: float

    def forward(self, hidden_states: Tensor) -> Tensor:
        if not _fused(hidden_states) or hidden_states.dtype != self.weight.dtype:
            return super().forward(hidden_states)
        from liger_kernel.transformers.functional import liger_rms_norm  # triton: only here

        # in_place=False: Liger's default writes dX over the incoming gradient dY, which is
        # only safe when nothing else reads dY; the copy costs one buffer of the input's size.
        return liger_rms_norm(hidden_states, self.weight, self.variance_epsilon, offset=0.0,
                              casting_mode="llama", in_place=False)  # fmt: skip


class FusedSwiGLU(nn.Module):
    """The ``forward`` of a ``LlamaMLP``-like module (SiLU) with Liger's SwiGLU (a mixin)."""

    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    act_fn: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        if not _fused(x):
            return super().forward(x)
        from liger_kernel.transformers.functional import liger_swiglu  # triton: only here

        # The projections are called as modules (peft's LoRA layers wrap them). Liger's
        # backward writes the gradients over the saved gate and up outputs, which nothing else
        # keeps; its output takes the gate's dtype, so mixed dtypes take the eager product.
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.dtype != up.dtype:
            return self.down_proj(self.act_fn(gate) * up)
        return self.down_proj(liger_swiglu(gate, up))


def _code(function: Callable) -> tuple:
    code = function.__code__
    return code.co_code, code.co_names, code.co_consts, code.co_varnames


@functools.cache
def _bert_code() -> dict[str, tuple]:
    from transformers.models.bert import modeling_bert as bert

    return {"residual_norm": _code(bert.BertSelfOutput.forward),
            "bias_gelu": _code(bert.BertIntermediate.forward)}  # fmt: skip


@functools.cache
def _llama_code() -> dict[str, tuple]:
    from transformers.models.llama import modeling_llama as llama

    return {"rms_norm": _code(llama.LlamaRMSNorm.forward),
            "swiglu": _code(llama.LlamaMLP.forward)}  # fmt: skip


def _is_silu(act: Any) -> bool:
    """``nn.SiLU`` or transformers' ``SiLUActivation`` (``hidden_act: silu`` / ``swish``)."""
    from transformers import activations

    return type(act) in (nn.SiLU, getattr(activations, "SiLUActivation", nn.SiLU))


def _is_erf_gelu(act: Any) -> bool:
    from transformers.activations import GELUActivation

    return type(act) is GELUActivation and getattr(act, "act", None) is F.gelu


def _plain_linear(module: Any) -> bool:
    return type(module) is nn.Linear and module.bias is not None


def fusion_of(module: nn.Module) -> type[nn.Module] | None:
    """The mixin `use_fused_kernels` gives ``module``, or None when it does not qualify
    (decoder modules qualify whether or not liger-kernel is installed)."""
    forward = getattr(type(module), "forward", None)
    if not hasattr(forward, "__code__"):
        return None
    if not _plain_linear(getattr(module, "dense", None)):
        return _decoder_fusion(module, forward)
    code = _code(forward)
    if code == _bert_code()["residual_norm"]:
        norm = getattr(module, "LayerNorm", None)
        if (isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1
                and norm.weight is not None and norm.bias is not None
                and type(getattr(module, "dropout", None)) is nn.Dropout):  # fmt: skip
            return FusedResidualNorm
    act = getattr(module, "intermediate_act_fn", None)
    if code == _bert_code()["bias_gelu"] and _is_erf_gelu(act):
        return FusedBiasGelu
    return None


def _decoder_fusion(module: nn.Module, forward: Callable) -> type[nn.Module] | None:
    # Cheap attribute checks first: a BERT-only network never imports Llama's modelling file.
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if isinstance(weight, nn.Parameter) and weight.dim() == 1 and type(eps) in (float, int):
        return FusedRMSNorm if _code(forward) == _llama_code()["rms_norm"] else None
    parts = ("gate_proj", "up_proj", "down_proj", "act_fn")
    if all(isinstance(getattr(module, p, None), nn.Module) for p in parts):
        if _code(forward) == _llama_code()["swiglu"] and _is_silu(module.act_fn):
            return FusedSwiGLU
    return None


DECODER_MIXINS = (FusedRMSNorm, FusedSwiGLU)


def liger_installed() -> bool:
    """Whether Liger-Kernel's functional API imports here (``pip install liger-kernel``)."""
    try:
        importlib.import_module("liger_kernel.transformers.functional")
    except ImportError:
        return False
    return True


def liger_missing(model: nn.Module) -> bool:
    """Whether ``model`` has decoder modules that would run Liger's kernels, and liger-kernel
    is not installed."""
    return any(fusion_of(m) in DECODER_MIXINS for m in model.modules()) and not liger_installed()


@functools.cache
def _fused_class(mixin: type[nn.Module], base: type[nn.Module]) -> type[nn.Module]:
    name = f"Fused{base.__name__}"
    fused = type(name, (mixin, base), {"_unfused_class": base, "__module__": __name__})
    globals().setdefault(name, fused)  # so that pickle finds it by name
    return fused


def use_fused_kernels(model: nn.Module) -> int:
    """Give every qualifying module of ``model`` its fused forward, in place (parameters, state
    dict and hooks are kept; decoder modules only where liger-kernel is installed). Returns how
    many were changed."""
    changed = 0
    liger: bool | None = None  # asked once, at the first decoder module
    for module in model.modules():
        if hasattr(module, "_unfused_class"):
            continue
        mixin = fusion_of(module)
        if mixin in DECODER_MIXINS:
            liger = liger_installed() if liger is None else liger
            if not liger:
                continue
        if mixin is not None:
            module.__class__ = _fused_class(mixin, type(module))
            changed += 1
    return changed


def unfuse(model: nn.Module) -> int:
    """Give the modules `use_fused_kernels` changed their own classes back (``torch.compile``
    fuses these chains itself). Returns how many."""
    changed = 0
    for module in model.modules():
        base = getattr(type(module), "_unfused_class", None)
        if base is not None:
            module.__class__ = base
            changed += 1
    return changed
