"""LoRA adapters through peft (``pip install "retriever-train[lora]"``): only the adapters
train, and the saved model is the merged network, which loads without peft.

    model = add_lora(model, {"r": 16, "alpha": 32, "dropout": 0.05,
                             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})

:func:`merged_state_dict` computes W + delta W of every adapted layer without changing the
model, so saving ``best/`` in the middle of training leaves the trained weights bit-exact (a
merge and unmerge in place would round them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

LORA_KEYS = {
    "r": int,
    "alpha": (int, float),
    "dropout": (int, float),
    "target_modules": (list, str),
}


def add_lora(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """``model`` with LoRA adapters (peft's ``get_peft_model``) in its own dtype; only they
    require grad."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError(
            'model.lora needs peft: pip install "retriever-train[lora]" (or pip install peft)'
        ) from None
    r = int(options.get("r", 8))
    config = LoraConfig(
        r=r,
        lora_alpha=float(options.get("alpha", 2 * r)),
        lora_dropout=float(options.get("dropout", 0.0)),
        target_modules=options.get("target_modules", "all-linear"),
        bias="none",
    )
    # Adapters in the network's dtype: a bf16 network trains them on fp32 master weights
    # (train.precision) like every other weight. peft's default, fp32 adapters on bf16 layers,
    # runs every adapter in fp32 without autocast: on an H200 a 0.5B Qwen2 with LoRA on all
    # linear layers stepped 1.2x slower than sentence-transformers under autocast.
    return get_peft_model(model, config, autocast_adapter_dtype=False)


def is_lora(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain network's state dict with every adapter merged (W + scale * B A), computed
    from the adapted model without changing it; its keys are the network's own."""
    from peft.tuners.lora import LoraLayer

    network = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    for name, module in network.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight.detach()
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            merged[f"{name}.weight"] = weight
    out = {}
    for key, value in network.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        out[key] = merged.get(key, value).detach().clone()
    return out


def save_merged(model: nn.Module, path: Path) -> None:
    """The merged network (config and weights) in ``path``, as ``save_pretrained`` writes it."""
    network = model.get_base_model()
    network.save_pretrained(path, state_dict=merged_state_dict(model))


def save_adapter(model: nn.Module, path: Path) -> None:
    """Only the adapters (``adapter_config.json``, ``adapter_model.safetensors``): peft's
    ``PeftModel.from_pretrained(base, path)`` puts them back on the base model."""
    model.save_pretrained(path)
