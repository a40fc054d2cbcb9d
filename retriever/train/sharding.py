"""Sharded training (``training.fsdp``): the network's parameters, gradients and optimizer
state split across processes with FSDP2 (`torch.distributed.fsdp.fully_shard`, each
transformer layer one unit) instead of a whole copy on every process (DDP).

The embedding cache works unchanged on a sharded network: each chunk's forward all-gathers one
layer at a time, the no-grad pass keeps nothing, and the gradient pass turns gradient
reduction off for every chunk but the last (:meth:`Sharding.no_sync`), so gradients are
reduce-scattered once a step, as DDP all-reduces once. A sharded forward is collective, so
every process runs the same forwards: the trainer checks that each source's share of the batch
splits evenly across processes (the same chunks everywhere), every process evaluates, and
models are saved from :meth:`Sharding.whole_encoder`, which gathers the weights into a plain
copy on the main process. Checkpoints hold the whole model and optimizer state
(:class:`FullState`), so a sharded run resumes exactly.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from retriever.model import Encoder


def layer_classes(network: nn.Module) -> set[str]:
    """The class names of the network's transformer layers (transformers' ``_no_split_modules``;
    for a peft model, its base model's)."""
    base = network.get_base_model() if hasattr(network, "get_base_model") else network
    return set(getattr(base, "_no_split_modules", None) or [])


def shard(network: nn.Module, bf16: bool) -> None:
    """Shard ``network`` in place: each layer, then the rest. ``bf16``: compute in bf16 on fp32
    shards, gradients reduced in fp32 (FSDP's mixed precision, in place of autocast)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = layer_classes(network)
    layers = [m for m in network.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(network).__name__} names no layer classes to shard")
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
    )
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(network, mp_policy=policy)


class Sharding:
    """``encoder``'s network sharded across the processes, and what the trainer does with it."""

    def __init__(self, encoder: Encoder, device: torch.device, bf16: bool, main: bool) -> None:
        self.encoder = encoder
        # The network's structure without storage, on the main process: whole_encoder loads
        # the gathered weights into it.
        self._template = copy.deepcopy(encoder.model).to("meta") if main else None
        encoder.to(device)
        shard(encoder.model, bf16)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients without reducing them."""
        network = self.encoder.model
        network.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            network.set_requires_gradient_sync(True)

    def whole_encoder(self, main: bool) -> Encoder | None:
        """A plain (unsharded, CPU) copy of the encoder on the main process, None elsewhere.
        Collective: every process calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.encoder.model, options=options)
        if not main or self._template is None:
            return None
        self._template.load_state_dict(weights, assign=True)
        e = self.encoder
        return Encoder(self._template, e.tokenizer, e.settings, cudnn_attention=e.cudnn_attention)

    def full_state(self, optimizer: torch.optim.Optimizer, loss_fn: nn.Module) -> FullState:
        return FullState(nn.ModuleDict({"network": self.encoder.model, "loss": loss_fn}), optimizer)


class FullState:
    """The sharded modules' and optimizer's state, whole, for Accelerate's checkpoints
    (``register_for_checkpointing``): gathered to the main process to save (every process
    calls ``state_dict``; Accelerate writes the main one's), loaded whole on every process."""

    def __init__(self, modules: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.modules, self.optimizer = modules, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint import state_dict as dcp

        options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {
            "model": dcp.get_model_state_dict(self.modules, options=options),
            "optimizer": dcp.get_optimizer_state_dict(
                self.modules, self.optimizer, options=options
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint import state_dict as dcp

        options = dcp.StateDictOptions(full_state_dict=True)
        dcp.set_model_state_dict(self.modules, state["model"], options=options)
        dcp.set_optimizer_state_dict(
            self.modules, self.optimizer, state["optimizer"], options=options
        )


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over sharded (DTensor) and plain gradients at once (a
    learnable temperature is not sharded); returns the total norm before clipping."""
    from torch.distributed.tensor import DTensor

    norms = []
    for p in params:
        if p.grad is not None:
            norm = torch.linalg.vector_norm(p.grad.float())
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([n.cpu() for n in norms]))
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total


def no_sync_for(acc: Any, model: Any, master: Any, sharding: Sharding | None) -> Any:
    """What holds back gradient reduction for all chunks but a step's last one: FSDP's, DDP's,
    or nothing (a bf16 network's master gradients are averaged by hand after the step)."""
    if sharding is not None:
        return sharding.no_sync
    if master is not None:
        return None
    return lambda: acc.no_sync(model)


def sharding_for(
    config: Any, acc: Any, encoder: Encoder, shares: list[int], names: list[str]
) -> Sharding | None:
    """The run's `Sharding` when ``training.fsdp`` is on (or Accelerate was launched with
    FSDP) and there are several processes; None otherwise (one process has nothing to shard
    across, and trains as without the option)."""
    from accelerate.utils import DistributedType

    from retriever.train.config_checks import check_fsdp

    if acc.distributed_type == DistributedType.DEEPSPEED:
        from retriever.train.options import ConfigError

        raise ConfigError(
            "accelerate launch --use_deepspeed: DeepSpeed is not supported: its engine owns "
            "backward and gradient reduction, while the embedding cache backpropagates chunk "
            "by chunk itself; shard with training.fsdp: true (or --use_fsdp) instead"
        )
    if acc.distributed_type == DistributedType.FSDP and not config.training.fsdp:
        config.training.fsdp = True  # accelerate launch --use_fsdp: the same sharding
        check_fsdp(config)
    if not config.training.fsdp or acc.num_processes == 1:
        return None
    _check_even_shares(shares, names, acc.num_processes, config.where("training.batch_size"))
    return Sharding(encoder, acc.device, acc.mixed_precision == "bf16", acc.is_main_process)


def _check_even_shares(shares: list[int], names: list[str], processes: int, where: str) -> None:
    """Every source's rows a step must split evenly: each process then cuts the same chunks and
    runs the same (collective) forwards."""
    from retriever.train.options import ConfigError

    for share, name in zip(shares, names):
        if share % processes:
            raise ConfigError(
                f"{where}: training.fsdp: source {name!r} has {share} rows a step, which "
                f"{processes} processes cannot share evenly (a sharded forward is collective: "
                "every process must embed the same chunks); pick a batch size that gives "
                f"every source a multiple of {processes}"
            )
