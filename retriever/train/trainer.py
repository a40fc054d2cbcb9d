"""The training loop: Accelerate, the cached step, AdamW, checkpoints, evaluation and logging.

    result = train(load_config("configs/scifact-minilm.yaml"))

Run directory (``training.output_dir``; written and replaced as `train.run_directory` says)::

    config.yaml               the effective configuration
    checkpoints/step-000100/  resumable state: model, optimizer, scheduler, RNG of every
                              process, temperature, data position and step; manifest.json
    best/                     sentence-transformers model with the best eval.metric so far
    final/                    sentence-transformers model at the end of training (LoRA: merged)
    final-adapter/            with model.save_adapter, the LoRA adapters alone (peft's format)
    log.jsonl, eval.jsonl     every logged record / evaluation, one JSON object a line
    logs/                     TensorBoard (and other trackers') files

Everything a run needs (model, data, evaluation task, options) is loaded and checked before the
directory is touched, so a start that fails changes nothing there.

One optimizer step is one global batch (``training.batch_size`` queries over all processes),
computed by :func:`retriever.train.step.cached_step`. Across processes the loss is the ring over
Accelerate's process group, and DDP all-reduces the gradients once per step (FSDP, with
``training.fsdp``, reduce-scatters them once: `train.sharding`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from retriever.train import evaluation
from retriever.train.batches import Collator
from retriever.train.builders import (
    batches_per_epoch,
    build_accelerator,
    build_datasets,
    build_encoder,
    build_loss,
    build_miner,
    example_offsets,
    flat_hparams,
    name_given_model,
    prepare_optimization,
)
from retriever.train.callbacks import Callbacks, checked_callbacks, training_arguments
from retriever.train.checkpoints import save_checkpoint, save_final
from retriever.train.chunk_sizes import plan_checked
from retriever.train.config import ConfigError, TrainConfig, check_types
from retriever.train.config_checks import validate
from retriever.train.loader import Part, Position, StepBatches, Stream, run_loader, steps_of
from retriever.train.model_card import model_card, push_final
from retriever.train.resume import load_checkpoint, plan_run_directory, saved_chunk_sizes
from retriever.train.run_directory import (
    RunDirectory,
    RunError,
    checkpoint_dir,
    list_checkpoints,
    remove_checkpoint,
    truncate_logs,
)
from retriever.train.sharding import clip_grad_norm, no_sync_for, sharding_for
from retriever.train.sources import (
    SourceError,
    batch_shares,
    describe_plan,
    loss_weight,
    sources_of,
    sources_of_datasets,
)
from retriever.train.state import TrainState
from retriever.train.step import cached_parts_step, loss_part
from retriever.train.step_log import StepLog, sigmoid_bias, stop_unless_finite

logger = logging.getLogger(__name__)


class Trainer:
    """Trains an encoder as ``config`` says; :meth:`train` runs it to the end.

    From a script, what the config would name can be passed as objects instead:

    * ``model``: a Hub id or path, a ``SentenceTransformer`` or an ``Encoder`` (trained in
      place; the model options that are set apply to it);
    * ``train_dataset``: a list of dicts, a ``datasets.Dataset``, a stream (a
      ``datasets.IterableDataset``, a generator function), or a dict of name -> dataset (or
      name -> ``{"dataset": ..., "task": ..., "weight": ..., ...}``) for several sources, with
      the columns of the JSONL format; ``config.data.train`` is then left unset;
    * ``eval_datasets``: evaluation tasks (``load_task``, ``load_sts``), one, a list, or a
      dict of name -> task, evaluated beside ``eval.data``;
    * ``callbacks``: ``transformers.TrainerCallback`` instances (`train.callbacks`).

    ``step_context``, when set, is called with each optimizer step's number (1-based) and the
    context manager it returns is entered around that step (a profiler for one step, say)."""

    step_context: Callable[[int], AbstractContextManager] | None = None

    def __init__(
        self,
        config: TrainConfig | dict[str, Any] | str | Path,
        *,
        model: Any = None,
        train_dataset: Any = None,
        eval_datasets: Any = None,
        callbacks: Sequence[Any] | None = None,
        resume: bool | str | None = None,
        overwrite: bool = False,
    ) -> None:
        self.config = config = config_of(config)
        self.given = {"model": model, "eval": eval_datasets, "sources": None}
        if train_dataset is not None:
            self.given["sources"] = given_sources(config, train_dataset)
        validate(
            config,
            sources=self.given["sources"],
            model_given=model is not None,
            eval_given=eval_datasets is not None,
        )
        name_given_model(config, model)
        evaluates = bool(config.eval.data) or eval_datasets is not None
        self.callback_list = checked_callbacks(callbacks, evaluates)
        self.stopped: str | None = None  # why the run stops before its last step, if it does
        self.output_dir = Path(config.training.output_dir)
        self.run_dir = RunDirectory(self.output_dir)
        self.accelerator = build_accelerator(config)
        if self.accelerator.is_main_process:
            self.run_dir.lock()  # before anything reads or repairs the directory
        try:
            self._set_up(resume, overwrite)
        except BaseException:
            self.run_dir.unlock()
            raise

    def _set_up(self, resume: bool | str | None, overwrite: bool) -> None:
        config, acc, t = self.config, self.accelerator, self.config.training
        if acc.is_main_process:
            repaired = self.run_dir.recover()  # what an interrupted --overwrite left
            if repaired:
                logger.warning(repaired)
        acc.wait_for_everyone()
        self.resume_from = plan_run_directory(config, resume, overwrite)
        # Replace what is there: on --overwrite, or the leftovers of a start that saved nothing.
        self.replace = self.resume_from is None and bool(self.run_dir.artifacts())
        from accelerate.utils import set_seed

        set_seed(t.seed)
        self.encoder = build_encoder(config, self.given["model"])
        self.encoder.train()  # from_pretrained leaves the network in eval mode: no dropout
        self._load_data()
        self.loss_fn = build_loss(config, acc.device, self.encoder, self.datasets, self.total_steps)
        self.offsets = example_offsets(self.datasets)
        self.tasks = evaluation.load_eval_tasks(config, self.given["eval"])
        # As configured, measured (auto), or as the resumed checkpoint recorded them; before
        # the optimizer: the probe makes gradients.
        recorded = saved_chunk_sizes(self.resume_from)
        self.chunks = plan_checked(config, acc, self.encoder, recorded)
        self._prepare_optimization()
        if self.resume_from is not None:
            load_checkpoint(acc, config, self.resume_from, self.data_fingerprint, self.state,
                            self.total_steps, self.sharding is not None)  # fmt: skip
        try:
            self.state.start_positions(len(self.sources), acc.process_index, acc.num_processes)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        self.state.data_fingerprint = self.data_fingerprint
        self.state.chunk_sizes = self.chunks.record()
        self.state.sharded = self.sharding is not None
        tokenizer, embed, packing = self.encoder.tokenizer, self.chunks.embed, self.chunks.packing
        self.collators = [
            Collator.of(d, tokenizer, embed, t.sort_by_length, packing) for d in self.datasets
        ]
        self.log = StepLog(acc, self.output_dir, t.batch_size)
        self.group = dist.group.WORLD if acc.num_processes > 1 else None
        args = training_arguments(config, self.total_steps, bool(self.tasks))
        self.callbacks = Callbacks(self.callback_list, args, acc)

        # Only now that everything has loaded: a start that fails changes nothing on disk.
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._prepare_run_directory()
        acc.wait_for_everyone()
        if t.report_to:
            acc.init_trackers(t.run_name, config=flat_hparams(config))

    def _load_data(self) -> None:
        """Every source's examples and its share of each step; the number of steps (epochs
        count those of the first source)."""
        config, t, acc = self.config, self.config.training, self.accelerator
        self.sources = self.given["sources"] or sources_of(config)
        self.source_names = [source.name for source in self.sources]
        try:
            self.shares = batch_shares(t.batch_size, self.sources, acc.num_processes)
        except ValueError as exc:
            raise ConfigError(f"{config.where('training.batch_size')}: {exc}") from None
        self.datasets = build_datasets(config, self.encoder, acc, self.sources)
        self.batches_per_epoch = [
            batches_per_epoch(config, dataset, share, f"source {source.name!r}")
            for source, dataset, share in zip(self.sources, self.datasets, self.shares)
        ]
        # As read, before any re-mining: a resumed run must see the same examples.
        self.data_fingerprint = "/".join(d.fingerprint() for d in self.datasets)
        # A streamed first source has no known epoch: max_steps is then required (checked).
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.batches_per_epoch[0]))
        self.train_set = self.datasets[0]
        self.miner = None
        if config.mining.dynamic:  # keeps the hard negatives hard: retriever/mining/dynamic.py
            self.miner = build_miner(config, self.train_set, self.encoder.settings)

    def _prepare_optimization(self) -> None:
        """Optimizer and schedule, and what a checkpoint holds."""
        acc = self.accelerator
        self.sharding = sharding_for(self.config, acc, self.encoder, self.shares, self.source_names)
        self.model, self.optimizer, self.scheduler, self.master = prepare_optimization(
            self.config, acc, self.encoder, self.loss_fn, self.total_steps, bool(self.sharding)
        )
        self.state = TrainState()
        acc.register_for_checkpointing(self.state, self.loss_fn)
        for extra in (self.miner, self.master):
            if extra is not None:
                acc.register_for_checkpointing(extra)
        if self.sharding is not None:
            acc.register_for_checkpointing(self.sharding.full_state(self.optimizer, self.loss_fn))

    def _prepare_run_directory(self) -> None:
        """Main process: set a replaced run aside (restored if this one fails before its first
        checkpoint), drop logs past the resumed step, write the effective config."""
        if self.replace:
            if not self.run_dir.holds_results():
                logger.warning(
                    "%s: replacing what a start that saved no checkpoint left there (%s)",
                    self.output_dir,
                    ", ".join(self.run_dir.artifacts()),
                )
            self.run_dir.set_aside()
        self.run_dir.mark()
        if self.resume_from is not None:
            truncate_logs(self.output_dir, self.state.step)
        self.run_dir.write_config(self.config.to_yaml())

    # -- pieces of the loop --

    def _loader(self) -> torch.utils.data.DataLoader:
        """One loader from the current position to the last step (across epochs)."""
        acc, state, t = self.accelerator, self.state, self.config.training
        streams = [
            Stream(dataset, collator, share, Position(*position))
            for dataset, collator, share, position in zip(
                self.datasets, self.collators, self.shares, state.positions
            )
        ]
        dataset = StepBatches(
            streams, self.total_steps - state.step, acc.process_index, acc.num_processes
        )
        return run_loader(dataset, self.config.data.num_workers, acc.device.type == "cuda", t.seed)

    def _step(self, parts: list[Part]) -> torch.Tensor:
        """The gradient of one step over every source (the per-source losses go to the log)."""
        acc, device = self.accelerator, self.accelerator.device
        # A learnable temperature lives outside DDP; the ring gives every rank the gradient of
        # the global loss for it, so it needs no all-reduce.
        size, options = self.config.training.batch_size, self.config.loss
        weights = [
            loss_weight(source, share, size) for source, share in zip(self.sources, self.shares)
        ]
        loss_parts = [
            loss_part(source, part.batch, w, self.loss_fn, options, device, self.group, offset)
            for source, part, w, offset in zip(self.sources, parts, weights, self.offsets)
        ]
        loss, per_source = cached_parts_step(
            self.model,
            loss_parts,
            device=device,
            chunk_size=self.chunks.grad,
            no_sync=no_sync_for(acc, self.model, self.master, self.sharding),
        )
        self.source_losses = [float(x) for x in per_source]
        if self.master is not None and acc.num_processes > 1:
            self.master.all_reduce()
        return loss

    def _remine(self) -> None:
        """A dynamic-mining pass (every process takes part), logged to mining.jsonl."""
        acc = self.accelerator
        encoder, step = acc.unwrap_model(self.model), self.state.step
        record = self.miner.run(encoder, step, rank=acc.process_index, world_size=acc.num_processes)
        self.log.write("mining.jsonl", record)
        acc.log({f"mining/{k}": v for k, v in record.items() if k != "step"}, step=self.state.step)
        acc.print(self.miner.describe(record))

    def save_checkpoint(self) -> Path:
        """``checkpoints/step-N``, whole or absent (`train.checkpoints`); once the first one
        stands, a run that ``--overwrite`` set aside is deleted."""
        acc = self.accelerator
        if acc.num_processes > 1 and any(s.streaming for s in self.sources):
            from accelerate.utils import gather_object

            # Each process reads its own shard of a stream: the checkpoint keeps every place.
            self.state.rank_positions = gather_object([self.state.positions])
        path = save_checkpoint(
            acc,
            checkpoint_dir(self.output_dir, self.state.step),
            {
                "trainer_state.json": json.dumps(self.state.state_dict(), indent=2) + "\n",
                "config.yaml": self.config.to_yaml(),
            },
        )
        if acc.is_main_process:
            self.run_dir.discard_replaced()  # the new run now stands on its own
            limit = self.config.training.save_total_limit
            for stale in list_checkpoints(self.output_dir)[:-limit] if limit else []:
                remove_checkpoint(stale)
        acc.wait_for_everyone()
        self.callbacks.save()
        return path

    def evaluate(self) -> dict[str, Any]:
        """Evaluate on eval.data (main process); keep best/ (with its model card) when
        eval.metric improves."""
        encoder = self.accelerator.unwrap_model(self.model)
        card = partial(model_card, self.config, self.sources, self.shares, self.state)  # best/'s
        record = evaluation.evaluate_step(
            self.accelerator, encoder, self.tasks, self.config, self.state, self.output_dir,
            self.sharding, card,
        )  # fmt: skip
        self.log.write("eval.jsonl", record)
        self._stop_early_after(record)
        if self.callbacks:
            control = self.callbacks.evaluate(record, self.state.best_metric)
            self._stop_if(control.should_training_stop, "a callback asked to stop")
        return record

    def _stop_early_after(self, record: dict[str, Any]) -> None:
        """eval.early_stopping_patience: stop once that many evaluations in a row have not
        beaten the best eval.metric (the count is checkpointed, so a resumed run goes on
        counting)."""
        state, patience = self.state, self.config.eval.early_stopping_patience
        if state.best_step == record["step"]:
            state.evaluations_without_improvement = 0
        else:
            state.evaluations_without_improvement += 1
        if patience is not None and state.evaluations_without_improvement >= patience:
            metric = self.config.eval.metric
            why = (
                f"{patience} evaluation(s) without a better {metric} (eval.early_stopping_patience)"
            )
            self._stop_if(True, why)

    def _stop_if(self, stop: bool, reason: str) -> None:
        if stop and self.stopped is None:
            self.stopped = reason

    # -- the loop --

    def train(self) -> dict[str, Any]:
        """Run to the end; a failure before this run's first checkpoint puts back the run that
        ``--overwrite`` was replacing."""
        try:
            return self._train()
        except BaseException:
            if self.accelerator.is_main_process:
                self.run_dir.restore_replaced()
            raise
        finally:
            self.run_dir.unlock()

    def _train(self) -> dict[str, Any]:
        acc, cfg, state = self.accelerator, self.config, self.state
        t = cfg.training
        evaluations = []
        if self.tasks and cfg.eval.at_start and state.step == 0:
            evaluations.append(self.evaluate())
        acc.print(
            f"training {self.total_steps} steps of {t.batch_size} queries on "
            f"{acc.num_processes} process(es){' (FSDP)' if self.sharding else ''}: "
            + describe_plan(self.sources, self.shares, self.batches_per_epoch)
        )
        show = dict(desc="train", unit="step", dynamic_ncols=True)
        progress = tqdm(total=self.total_steps, initial=state.step, **show,
                        disable=not acc.is_local_main_process)  # fmt: skip
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(acc.device)
        last_loss = None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.callbacks.train_begin(state.step, self.encoder)
        while state.step < self.total_steps and self.stopped is None:
            batches = steps_of(self._loader())
            while True:
                waited = time.perf_counter()
                item = next(batches, None)
                self.log.data_wait += time.perf_counter() - waited
                if item is None:
                    break
                self.callbacks.step_begin()
                hook = self.step_context
                with hook(state.step + 1) if hook else contextlib.nullcontext():
                    loss, grad_norm = self._optimizer_step(item, params)
                state.advance([[part.epoch, part.index + 1] for part in item])
                tokens = sum(part.batch.num_tokens for part in item)
                self.log.add(loss, tokens, dict(zip(self.source_names, self.source_losses)))
                progress.update(1)
                if state.step % t.logging_steps == 0 or state.step == self.total_steps:
                    last_loss = self._log(grad_norm, progress)
                remined = self._after_step(evaluations)
                if state.step >= self.total_steps or remined or self.stopped is not None:
                    break  # after re-mining: a new loader, whose workers see the new negatives
        progress.close()
        return self._finish(evaluations, last_loss)

    def _log(self, grad_norm: Any, progress: tqdm) -> float:
        temperature = float(1.0 / self.loss_fn.scale.detach())
        lr = self.scheduler.get_last_lr()[0]
        bias = sigmoid_bias(self.loss_fn)
        record = self.log.flush(self.state, lr, temperature, grad_norm, bias)
        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
        self.callbacks.log(record)
        return record["loss"]

    def _after_step(self, evaluations: list[dict[str, Any]]) -> bool:
        """Re-mining, evaluation and checkpoint due after a step, in that order (a resumed run
        then has the re-mined negatives and the best metric so far); whether it re-mined."""
        state, cfg = self.state, self.config
        control = self.callbacks.step_end(state.step, self._epoch())
        self._stop_if(control.should_training_stop, "a callback asked to stop")
        if state.step >= self.total_steps or self.stopped is not None:
            return False  # the end: _finish evaluates and saves
        remined = self.miner is not None and self.miner.due(state.step)
        if remined:
            self._remine()
        due = bool(cfg.eval.steps) and state.step % cfg.eval.steps == 0
        if self.tasks and (due or control.should_evaluate):
            evaluations.append(self.evaluate())
        save_steps = cfg.training.save_steps
        due = bool(save_steps) and state.step % save_steps == 0
        if cfg.training.save_checkpoints and (due or control.should_save):
            self.save_checkpoint()
        return remined

    def _epoch(self) -> float:
        """Epochs of the first source done, with the fraction of the current one (when known)."""
        epoch, batch = self.state.positions[0]
        count = self.batches_per_epoch[0]
        return epoch + (batch / count if count else 0.0)

    def _optimizer_step(self, batch: Any, params: list[torch.nn.Parameter]) -> tuple[float, Any]:
        """One global batch: gradient, clipping, the update; returns (loss, gradient norm)."""
        acc, t = self.accelerator, self.config.training
        loss = float(self._step(batch))
        grad_norm = None
        if t.max_grad_norm is not None:
            clip = clip_grad_norm if self.sharding is not None else acc.clip_grad_norm_
            grad_norm = clip(params, t.max_grad_norm)
        stop_unless_finite(acc, loss, grad_norm, self.state.step + 1, self.output_dir)
        self.optimizer.step()
        if self.master is not None:
            self.master.copy_to_model()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def _finish(self, evaluations: list[dict[str, Any]], last_loss: float | None) -> dict:
        acc, cfg, state = self.accelerator, self.config, self.state
        if self.tasks and state.evaluated_step != state.step:
            evaluations.append(self.evaluate())
        if cfg.training.save_checkpoints:
            self.save_checkpoint()
        final = self.output_dir / "final"
        sharding, main = self.sharding, acc.is_main_process
        whole = sharding.whole_encoder(main) if sharding else acc.unwrap_model(self.model)
        if main:
            last = evaluation.last_evaluation(self.output_dir)
            card = model_card(cfg, self.sources, self.shares, state, last)
            adapter = self.output_dir / "final-adapter" if cfg.model.save_adapter else None
            save_final(whole, self.master, final, card, adapter)
            self.run_dir.discard_replaced()  # without checkpoints, final/ stands for the run
            if cfg.training.push_to_hub:
                where = cfg.where("training.push_to_hub")
                url = push_final(final, cfg.training.push_to_hub, where)
                acc.print(f"pushed the final model to {url}")
        acc.wait_for_everyone()
        self.callbacks.train_end(whole)
        acc.end_training()
        summary = state.summary(evaluations, last_loss, self.output_dir)
        summary["stopped_early"] = self.stopped
        if self.stopped is not None:
            acc.print(f"stopped at step {state.step} of {self.total_steps}: {self.stopped}")
        if evaluations:
            best = self.output_dir / "best"
            acc.print(evaluation.describe_progress(evaluations, cfg.eval.metric, state, best))
        acc.print(f"final model: {final}")
        return summary


def train(config: TrainConfig, **options: Any) -> dict[str, Any]:
    """Train as ``config`` says; returns a summary (steps, final loss, evaluations, best).
    ``options`` are the Trainer's (model, train_dataset, ..., resume, overwrite)."""
    return Trainer(config, **options).train()


def config_of(config: Any) -> TrainConfig:
    """The run's own TrainConfig from a TrainConfig (copied), a dict of sections
    (`TrainConfig.from_dict`) or a YAML file's path."""
    if isinstance(config, TrainConfig):
        config = copy.deepcopy(config)  # the run fills in options: the script's object stays
        check_types(config)  # its sections may have been built directly
        return config
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    if isinstance(config, (str, Path)):
        return TrainConfig.from_yaml(config)
    raise TypeError(
        "Trainer(config): expected a TrainConfig, a dict of sections or a YAML file's path, got "
        f"{type(config).__name__}"
    )


def given_sources(config: TrainConfig, train_dataset: Any) -> list[Any]:
    """The sources of ``Trainer(train_dataset=...)``, checked (`train.sources`)."""
    if config.data.train is not None:
        raise ConfigError(
            f"{config.where('data.train')}: data.train and Trainer(train_dataset=...) both give "
            "training data; keep one"
        )
    try:
        return sources_of_datasets(config, train_dataset)
    except SourceError as exc:
        raise ConfigError(str(exc)) from None
