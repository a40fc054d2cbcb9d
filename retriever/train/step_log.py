"""What training writes as it goes: ``log.jsonl`` (one record per logging window: loss, learning
rate, temperature, throughput, time per step and waiting for data, gradient norm, peak memory),
``eval.jsonl`` and ``mining.jsonl``, the trackers, and the progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from retriever.loss.matryoshka import MatryoshkaLoss
from retriever.loss.sigmoid import SigmoidLoss


class StepLog:
    """Sums a window of steps and writes its record every ``logging_steps``."""

    def __init__(self, accelerator: Any, output_dir: Path, batch_size: int) -> None:
        self.acc, self.output_dir, self.batch_size = accelerator, output_dir, batch_size
        self._reset()

    def _reset(self) -> None:
        self.loss, self.steps, self.tokens, self.data_wait = 0.0, 0, 0, 0.0
        self.by_source: dict[str, float] = {}
        self.start = time.perf_counter()

    def add(self, loss: float, tokens: int, by_source: dict[str, float] | None = None) -> None:
        self.loss, self.steps, self.tokens = self.loss + loss, self.steps + 1, self.tokens + tokens
        for name, value in (by_source or {}).items():
            self.by_source[name] = self.by_source.get(name, 0.0) + value

    def write(self, name: str, record: dict[str, Any]) -> None:
        """Append ``record`` to ``name`` (main process)."""
        if self.acc.is_main_process:
            with open(self.output_dir / name, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def flush(
        self,
        state: Any,
        lr: float,
        temperature: float,
        grad_norm: Any,
        bias: float | None = None,
    ) -> dict[str, Any]:
        """The window's record (losses averaged over steps and processes), written and logged;
        ``bias``: the sigmoid loss's, where the objective has one."""
        acc = self.acc
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        local = torch.tensor([self.loss, float(self.tokens)], device=acc.device)
        total = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
        record = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": float(total[0]) / self.steps / acc.num_processes,
            "lr": lr,
            "temperature": temperature,
            **({} if bias is None else {"bias": bias}),
            "queries_per_s": self.steps * self.batch_size / elapsed,
            "tokens_per_s": float(total[1]) / elapsed,
            "step_s": elapsed / self.steps,
            "data_wait_s": self.data_wait / self.steps,  # waiting for the loader
        }
        if len(self.by_source) > 1:  # each source's own loss (this process's value)
            record.update({f"loss/{k}": v / self.steps for k, v in self.by_source.items()})
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if acc.device.type == "cuda":
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        self.write("log.jsonl", record)
        acc.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=state.step)
        self._reset()
        return record


def sigmoid_bias(loss_fn: Any) -> float | None:
    """The sigmoid loss's bias (also inside a Matryoshka wrapper), or None for a loss without
    one."""
    inner = loss_fn.loss if isinstance(loss_fn, MatryoshkaLoss) else loss_fn
    return float(inner.bias.detach()) if isinstance(inner, SigmoidLoss) else None


def stop_unless_finite(acc: Any, loss: float, grad_norm: Any, step: int, output_dir: Path) -> None:
    """A NaN or inf loss or gradient norm stops the run (on every rank together) before the
    update reaches the model, naming the step and what to do next."""
    import math

    from retriever.train.run_directory import RunError, list_checkpoints

    norm = float(grad_norm) if grad_norm is not None else 0.0
    bad = torch.tensor(float(not (math.isfinite(loss) and math.isfinite(norm))))
    if acc.num_processes > 1:
        bad = acc.reduce(bad.to(acc.device), reduction="sum").cpu()
    if not bad.item():
        return
    checkpoints = list_checkpoints(output_dir)
    after = (
        f"then --resume from the newest checkpoint, {checkpoints[-1]}"
        if checkpoints
        else "then start again (nothing was saved)"
    )
    raise RunError(
        f"step {step}: the loss is {loss}"
        + (f" and the gradient norm {norm}" if grad_norm is not None else "")
        + "; the model was not updated and training stopped. Lower "
        f"training.learning_rate or set training.max_grad_norm, {after}"
    )
