"""bf16 weights with fp32 master copies: the network runs entirely in bf16, the optimizer in fp32.

Autocast keeps weights in fp32 and casts them for every matrix product; its norms and residual
additions produce fp32 activations, so a small encoder spends much of its step moving fp32
tensors and casting them back. With ``model.dtype: bfloat16`` the network itself is bf16 (every
activation is), while this module keeps what makes training sound in fp32:

* the master weights the optimizer updates (a bf16 weight cannot take an update smaller than
  2^-8 of itself, which is most of them at fine-tuning learning rates);
* the gradient accumulation: the embedding cache backpropagates one chunk at a time, and
  summing hundreds of chunk gradients in bf16 would lose most of their bits. At the end of every
  backward call the bf16 gradients are added into the fp32 master gradients (one foreach add)
  and dropped. A small model's step is bound by host time, so this is one callback per backward
  rather than a Python hook with its own kernel per parameter (14,500 per step of 8,192 queries
  with 7 hard negatives).

Across processes the master gradients are averaged with one all-reduce per step (what DDP does
for fp32 models), so the model is not wrapped in DDP in this mode.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Variable


class MasterWeights:
    """fp32 master copies of (bf16) parameters, with gradients accumulated in fp32.

    Give ``master`` to the optimizer; after ``optimizer.step()`` call :meth:`copy_to_model`.
    """

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.master = [nn.Parameter(p.detach().float().clone()) for p in self.params]
        self._flush_queued = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._queue_flush) for p in self.params]

    def _queue_flush(self, param: Tensor) -> None:
        # The first gradient of a backward call queues one flush for the end of that call.
        if not self._flush_queued:
            self._flush_queued = True
            Variable._execution_engine.queue_callback(self.flush)

    def flush(self) -> None:
        """Add the parameters' (bf16) gradients into the fp32 master gradients and drop them."""
        self._flush_queued = False
        add_to, add_from = [], []
        for p, m in zip(self.params, self.master):
            if p.grad is None:
                continue
            if m.grad is None:
                m.grad = p.grad.float()
            else:
                add_to.append(m.grad)
                add_from.append(p.grad)
            p.grad = None  # the bf16 gradient never accumulates
        if add_to:
            torch._foreach_add_(add_to, add_from)  # fp32 += bf16, no fp32 copies

    def all_reduce(self, group: Any = None) -> None:
        """Average the master gradients over the processes of ``group`` (one flat all-reduce)."""
        grads = [m.grad if m.grad is not None else torch.zeros_like(m) for m in self.master]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)
        offset = 0
        for m in self.master:
            m.grad = flat[offset : offset + m.numel()].view_as(m).clone()
            offset += m.numel()

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_(self.params, self.master)

    def state_dict(self) -> dict[str, Any]:
        return {"master": [m.detach().cpu() for m in self.master]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for m, saved in zip(self.master, state["master"], strict=True):
                m.copy_(saved)
        self.copy_to_model()

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
