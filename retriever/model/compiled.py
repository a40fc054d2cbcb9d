"""torch.compile over a network's layers, for padding-free chunks (design notes section 9).

Between its matrix products a small encoder's layer is a chain of elementwise kernels and
reductions (bias adds, GELU, dropout, residual adds, LayerNorm, dtype casts): 42% of the GPU
time of a profiled all-MiniLM-L6-v2 step, as much as the matrices. Inductor fuses such chains
into a few Triton kernels (bias + GELU; dropout + residual + LayerNorm, forward and backward;
RMSNorm, SwiGLU and RoPE in decoders), so that is done here by compiling each repeated layer
(`nn.Module.compile`, in place: parameters and state dict unchanged) rather than by
hand-written kernels. All layers share one graph (their parameters are graph inputs).

Modes: ``dynamic`` lets the stream length vary (one graph after the first recompile);
``static`` compiles one shape, which padding-free chunks padded to their budget
(`retriever.train.batches.StreamChunk`) give; ``cudagraphs`` also records the static graph
as CUDA graphs and replays it (Inductor's ``reduce-overhead``), removing the launches' host
time. Attention stays the varlen kernel (`retriever.model.varlen`, a custom op or an
autograd.Function Dynamo traces through). Dropout inside compiled graphs draws from Inductor's
philox generator, seeded from the CUDA generator at each call, so the embedding cache's RNG
replay (which restores that generator) gives the same masks in both passes.
"""

from __future__ import annotations

from torch import nn

from retriever.model.fused import unfuse

MODES = ("dynamic", "static", "cudagraphs")
RECOMPILE_LIMIT = 64  # grad / no-grad, query / document budgets, bound counts: a few graphs


def repeated_layers(model: nn.Module) -> nn.ModuleList:
    """The network's stack of layers: its ModuleList with the most parameters (BERT's
    ``encoder.layer``, a decoder's ``layers``)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no stack of layers to compile")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def compile_layers(model: nn.Module, mode: str) -> int:
    """Compile each layer of ``model`` in place (``mode``: one of `MODES`); returns how many.
    Retriever's Triton LayerNorms and fused layers (`retriever.model.fused`) in them become
    plain modules again: Inductor fuses these chains itself."""
    import torch._dynamo

    if mode not in MODES:
        raise ValueError(f"model.compile must be one of {MODES} or off, got {mode!r}")
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    layers = repeated_layers(model)
    for module in layers.modules():
        if isinstance(module, nn.LayerNorm) and type(module).__name__ == "FusedLayerNorm":
            module.__class__ = nn.LayerNorm
    unfuse(layers)
    options = {"dynamic": None if mode == "dynamic" else False}
    if mode == "cudagraphs":
        options["mode"] = "reduce-overhead"
    for layer in layers:
        layer.compile(**options)
    return len(layers)
