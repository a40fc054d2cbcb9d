"""The Triton LayerNorm (retriever.model.layer_norm) against PyTorch's LayerNorm in float64.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

import pytest
import torch
import torch.nn.functional as F
from reference import reference_layer_norm
from torch import nn

from retriever.model import Encoder
from retriever.model.layer_norm import FusedLayerNorm, layer_norm, use_fused_layer_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# Shapes: rows that do not fill the last block, a width that is not a power of two, a 3-D
# input, and a single row.
@pytest.mark.parametrize(
    "shape, affine, bias",
    [((37, 24), True, True), ((5, 7, 48), True, True), ((70, 30), True, False),
     ((70, 30), False, False), ((1, 16), True, True)],
)  # fmt: skip
def test_matches_float64_layer_norm(shape, affine, bias):
    g = torch.Generator().manual_seed(0)
    n = shape[-1]
    # An offset and a spread, so the mean and variance matter.
    x = (torch.randn(shape, generator=g) * 3 + 1.5).to(DEVICE).requires_grad_()
    w = (torch.randn(n, generator=g)).to(DEVICE).requires_grad_() if affine else None
    b = (torch.randn(n, generator=g)).to(DEVICE).requires_grad_() if bias else None
    dy = torch.randn(shape, generator=g).to(DEVICE)

    y = layer_norm(x, w, b, 1e-5)
    y.backward(dy)
    y_ref, grads_ref = reference_layer_norm(x, w, b, dy, 1e-5)

    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    for t, ref in zip((x, w, b), grads_ref):
        if t is not None:
            torch.testing.assert_close(t.grad.double(), ref, atol=1e-4, rtol=1e-5)


def test_bfloat16_inputs_are_normalised_in_float32():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(40, 64, generator=g) * 4 - 2).bfloat16().to(DEVICE).requires_grad_()
    w = (1 + 0.1 * torch.randn(64, generator=g)).bfloat16().to(DEVICE).requires_grad_()
    b = (0.1 * torch.randn(64, generator=g)).bfloat16().to(DEVICE).requires_grad_()
    dy = torch.randn(40, 64, generator=g).bfloat16().to(DEVICE)

    y = layer_norm(x, w, b, 1e-5)
    y.backward(dy)
    y_ref, (dx_ref, dw_ref, db_ref) = reference_layer_norm(x, w, b, dy, 1e-5)

    assert y.dtype == x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.bfloat16
    # One bf16 rounding of the result (2^-8 relative), not an error accumulated in bf16.
    torch.testing.assert_close(y.double(), y_ref, atol=0.02, rtol=2**-8)
    torch.testing.assert_close(x.grad.double(), dx_ref, atol=0.02, rtol=2**-8)
    torch.testing.assert_close(w.grad.double(), dw_ref, atol=0.05, rtol=2**-8)
    torch.testing.assert_close(b.grad.double(), db_ref, atol=0.05, rtol=2**-8)


def test_backward_is_deterministic():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100, 32, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(32, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(100, 32, generator=g).to(DEVICE)
    grads = []
    for _ in range(2):
        x.grad = w.grad = None
        layer_norm(x, w, None, 1e-5).backward(dy)
        grads.append((x.grad.clone(), w.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        layer_norm(torch.randn(2, 8), None, None, 1e-5)


def test_fused_module_falls_back_to_torch_off_the_gpu(monkeypatch):
    """Without CUDA and without the interpreter FusedLayerNorm is PyTorch's LayerNorm."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    module = nn.LayerNorm(16)
    use_fused_layer_norm(module)
    x = torch.randn(3, 16)
    assert isinstance(module, FusedLayerNorm)
    torch.testing.assert_close(module(x), F.layer_norm(x, (16,), module.weight, module.bias))


def test_encoder_with_fused_layer_norm_gives_the_same_embeddings_and_gradients(tiny_dir):
    plain = Encoder.from_pretrained(tiny_dir).to(DEVICE)
    fused = Encoder.from_pretrained(tiny_dir, fused_layer_norm=True).to(DEVICE)
    layer_norms = [m for m in fused.model.modules() if isinstance(m, nn.LayerNorm)]
    # embeddings + 2 per layer, all switched; parameters and their names unchanged.
    assert len(layer_norms) == 5 and all(type(m) is FusedLayerNorm for m in layer_norms)
    assert not any(type(m) is FusedLayerNorm for m in plain.model.modules())
    assert plain.model.state_dict().keys() == fused.model.state_dict().keys()

    features = {k: v.to(DEVICE) for k, v in plain.tokenize(["a cell", "the unit of life"],
                                                            "query").items()}  # fmt: skip
    outputs = []
    for encoder in (plain, fused):
        embedding = encoder(features)
        embedding.pow(3).sum().backward()  # a gradient that is not uniform across rows
        grads = {n: p.grad for n, p in encoder.model.named_parameters() if p.grad is not None}
        outputs.append((embedding, grads))
    (e_plain, g_plain), (e_fused, g_fused) = outputs
    torch.testing.assert_close(e_fused, e_plain, atol=1e-5, rtol=1e-5)
    assert g_plain.keys() == g_fused.keys()
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("option", [None, True, False])
def test_trainer_option_chooses_the_layer_norm(tiny_dir, tmp_path, monkeypatch, option):
    """model.fused_layer_norm: null follows the GPU's presence; true and false are obeyed."""
    from train_helpers import tiny_config

    from retriever.train.builders import build_encoder

    def layer_norm_types() -> set[type]:
        modules = build_encoder(config).model.modules()
        return {type(m) for m in modules if isinstance(m, nn.LayerNorm)}

    config = tiny_config(tiny_dir, "unused.jsonl", tmp_path, model={"fused_layer_norm": option})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert layer_norm_types() == ({FusedLayerNorm} if option else {nn.LayerNorm})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert layer_norm_types() == ({nn.LayerNorm} if option is False else {FusedLayerNorm})
