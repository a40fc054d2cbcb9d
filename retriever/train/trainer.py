"""The training loop: Accelerate, the cached step, AdamW, checkpoints, evaluation and logging.

    result = train(load_config("configs/scifact-minilm.yaml"))

Run directory (``training.output_dir``; written and replaced as `retriever.train.run_directory` says)::

    config.yaml               the effective configuration
    checkpoints/step-000100/  resumable state: model, optimizer, scheduler, RNG of every
                              process, temperature, data position and step; manifest.json
    best/                     sentence-transformers model with the best eval.metric so far
    final/                    sentence-transformers model at the end of training
    log.jsonl, eval.jsonl     every logged record / evaluation, one JSON object a line
    logs/                     TensorBoard (and other trackers') files

Everything a run needs (model, data, evaluation task, options) is loaded and checked before the
directory is touched, so a start that fails changes nothing there.

One optimizer step is one global batch (``training.batch_size`` queries over all processes),
computed by :func:`retriever.train.step.cached_step`. Across processes the loss is the ring over
Accelerate's process group, and DDP all-reduces the gradients once per step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from tqdm.auto import tqdm

from retriever.fileio import atomic_directory, partial_path, publish
from retriever.loss import InfoNCELoss
from retriever.loss.inputs import resolve_impl
from retriever.model import Encoder, ModelNotFoundError
from retriever.model.network import dropout_probability, max_length_problems
from retriever.train.chunk_sizes import (
    ChunkSizeError,
    ChunkSizes,
    budget_bytes,
    fixed_costs,
    plan_chunk_sizes,
    probe_bytes_per_text,
)
from retriever.train.chunk_sizes import describe as describe_chunks
from retriever.train.config import ConfigError, TrainConfig, apply_mapping, differing_options
from retriever.train.data import Collator, TrainSet, epoch_batches, load_examples
from retriever.train.loader import Position, StepBatches, run_loader
from retriever.train.run_directory import (
    CHECKPOINTS,
    RunDirectory,
    RunError,
    checkpoint_dir,
    list_checkpoints,
    newest_valid_checkpoint,
    remove_checkpoint,
    truncate_logs,
    verify_checkpoint,
    write_manifest,
)
from retriever.train.step import cached_step
from retriever.train.tokens import default_cache_dir

logger = logging.getLogger(__name__)

# Options that must not change when a run is resumed: they change the model, the data order or
# the random stream, so the continuation would not be the run that was started.
FIXED_ON_RESUME = (
    "model.",
    "data.train",
    "data.format",
    "data.split",
    "data.negatives",
    "data.max_examples",
    "loss.",
    "training.batch_size",
    "training.chunk_size",
    "training.embed_chunk_size",
    "training.seed",
    "training.sort_by_length",
    "training.mixed_precision",
    "mining.dynamic",
)


@dataclasses.dataclass
class TrainState:
    """Where training is: saved in every checkpoint (Accelerate custom state)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already trained on
    best_metric: float | None = None
    best_step: int | None = None
    evaluated_step: int | None = None  # the step of the last evaluation
    chunk_sizes: list[int] | None = None  # [gradient pass, no-grad pass], also when auto
    data_fingerprint: str | None = None  # of the training examples, checked on resume

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# --- run directory ------------------------------------------------------------------------


def read_run_config(path: Path) -> TrainConfig:
    """The config saved in a run directory or checkpoint (``path`` holds config.yaml)."""
    path = Path(path) / "config.yaml"
    config = TrainConfig()
    apply_mapping(config, yaml.compose(path.read_text(encoding="utf-8")), str(path))
    return config


def _check_unchanged(config: TrainConfig, checkpoint: Path, output_dir: Path) -> None:
    """A resumed run must keep what shapes the model, the data order and the random stream."""
    saved_in = checkpoint if (checkpoint / "config.yaml").is_file() else output_dir
    if not (saved_in / "config.yaml").is_file():
        return
    changed = [
        key
        for key in differing_options(read_run_config(saved_in), config)
        if key.startswith(FIXED_ON_RESUME)
    ]
    if changed:
        raise RunError(
            f"--resume: {', '.join(changed)} differ from {saved_in / 'config.yaml'}; "
            "a resumed run must keep the model, data, loss, batch and seed"
        )


def plan_run_directory(
    config: TrainConfig, resume: bool | str | None, overwrite: bool
) -> Path | None:
    """Check the run directory (read-only); return the verified checkpoint to resume from.

    A directory that holds no results (its run stopped before saving a checkpoint, a final or a
    trained best model) is not protected: a plain start replaces what is there, as with
    ``--overwrite`` (put back if this start fails first)."""
    output_dir = Path(config.training.output_dir)
    run = RunDirectory(output_dir)
    if resume:
        if overwrite:
            raise RunError("--resume and --overwrite contradict each other; pick one")
        if resume is True:
            if run.artifacts() and not run.holds_results():
                raise RunError(
                    f"--resume: the run in {output_dir} stopped before its first checkpoint, so "
                    "there is nothing to resume; start it again without --resume"
                )
            checkpoint, skipped = newest_valid_checkpoint(output_dir)
            for reason in skipped:
                logger.warning("--resume: skipped %s", reason)
        else:
            checkpoint = Path(resume)
            if not checkpoint.is_dir():
                raise RunError(f"--resume: {checkpoint}: no such checkpoint directory")
            if (checkpoint / CHECKPOINTS).is_dir() or (checkpoint / "final").is_dir():
                raise RunError(
                    f"--resume {checkpoint}: that is a run directory, not a checkpoint; pass "
                    f"--resume alone (with --output-dir {checkpoint}), or one of its "
                    f"{CHECKPOINTS}/step-N directories"
                )
            verify_checkpoint(checkpoint)
        _check_unchanged(config, checkpoint, output_dir)
        return checkpoint
    existing = run.artifacts()
    if existing and not overwrite and run.holds_results():
        raise RunError(
            f"{output_dir} already holds a run ({', '.join(existing)}); pass --resume to "
            "continue it or --overwrite to replace it"
        )
    return None


# --- building blocks ----------------------------------------------------------------------


def build_encoder(config: TrainConfig) -> Encoder:
    m = config.model
    kwargs: dict[str, Any] = {}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    try:
        encoder = _load_encoder(m, kwargs)
    except (ModelNotFoundError, NotImplementedError, OSError, ValueError, ImportError) as exc:
        key = "model.name_or_path"
        if m.attn_implementation and "attn" in str(exc).lower() or isinstance(exc, ImportError):
            key = "model.attn_implementation"  # transformers refused the attention kernel
        raise ConfigError(f"{config.where(key)}: {key}: {exc}") from None
    for side, length, limit in max_length_problems(encoder):
        key = f"model.{side}_max_length"
        raise ConfigError(
            f"{config.where(key)}: {key}: {length} tokens, more than the model's {limit} "
            f"positions (max_position_embeddings); set {key} to at most {limit}"
        )
    return encoder


def _load_encoder(m: Any, kwargs: dict[str, Any]) -> Encoder:
    return Encoder.from_pretrained(
        m.name_or_path,
        pooling=m.pooling,
        normalize=m.normalize,
        query_prefix=m.query_prefix,
        document_prefix=m.document_prefix,
        query_max_length=m.query_max_length,
        document_max_length=m.document_max_length,
        torch_dtype=getattr(torch, m.dtype),
        gradient_checkpointing=m.gradient_checkpointing,
        cudnn_attention=m.cudnn_attention,
        dropout=m.dropout,
        fused_layer_norm=torch.cuda.is_available()
        if m.fused_layer_norm is None
        else m.fused_layer_norm,
        **kwargs,
    )


def build_loss(config: TrainConfig) -> InfoNCELoss:
    c = config.loss
    return InfoNCELoss(
        scale=1.0 / c.temperature,
        learnable_scale=c.learnable_temperature,
        min_scale=1.0 / c.max_temperature,
        max_scale=1.0 / c.min_temperature,
        symmetric=c.symmetric,
        impl=c.impl,
    )


def build_optimizer(
    config: TrainConfig, params: Iterable[torch.nn.Parameter], loss_fn: InfoNCELoss
) -> torch.optim.Optimizer:
    """AdamW over the network's ``params`` and a learnable temperature; biases, norms and the
    temperature get no weight decay."""
    t = config.training
    decay, no_decay = [], []
    for param in params:
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    no_decay += [p for p in loss_fn.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
    )


def build_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak learning rate, then linear or cosine decay to 0 (or constant)."""
    t = config.training
    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total_steps)
    kind = t.scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def shrink_task(task: Any, max_queries: int | None, max_documents: int | None) -> Any:
    """The first ``max_queries`` queries and a corpus of their judged documents plus the first
    other documents, ``max_documents`` in all (a quick smoke-test evaluation)."""
    query_ids = list(task.queries)[:max_queries] if max_queries else list(task.queries)
    qrels = {q: task.qrels[q] for q in query_ids}
    corpus = task.corpus
    if max_documents:
        keep = dict.fromkeys(d for q in query_ids for d in qrels[q])
        for doc_id in task.corpus:
            if len(keep) >= max_documents:
                break
            keep.setdefault(doc_id)
        corpus = {d: task.corpus[d] for d in keep}
    return dataclasses.replace(
        task, corpus=corpus, queries={q: task.queries[q] for q in query_ids}, qrels=qrels
    )


def _build_accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    t = config.training
    cpu = t.cpu or not torch.cuda.is_available()
    mixed = t.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    for tracker in t.report_to:
        module = "tensorboard" if tracker == "tensorboard" else tracker
        if importlib.util.find_spec(module) is None and not (
            tracker == "tensorboard" and importlib.util.find_spec("tensorboardX")
        ):
            raise ConfigError(
                f"{config.where('training.report_to')}: training.report_to: {tracker} is "
                f"not installed (pip install {tracker})"
            )
    output_dir = Path(t.output_dir)
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed,
        log_with=list(t.report_to) or None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        step_scheduler_with_optimizer=False,  # one scheduler step per global batch
        kwargs_handlers=[
            # The pooler of BERT-like models gets no gradient; buffers never change.
            DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
        ],
    )


def load_eval_task(config: TrainConfig) -> Any:
    """The (shrunk) evaluation task of ``eval.data``, or None; errors name the option."""
    if not config.eval.data:
        return None
    from retriever.eval.data import load_task

    try:
        task = load_task(config.eval.data, config.eval.split)
    except (FileNotFoundError, ValueError, OSError) as exc:
        # A BEIR directory without that split's qrels: the split is what to change.
        key = "eval.split" if f"qrels/{config.eval.split}.tsv" in str(exc) else "eval.data"
        raise ConfigError(f"{config.where(key)}: {key}: {exc}") from None
    return shrink_task(task, config.eval.max_queries, config.eval.max_documents)


def _flat_hparams(config: TrainConfig) -> dict[str, Any]:
    """The config as the scalar dict trackers accept."""
    out = {}
    for section, values in config.to_dict().items():
        for name, value in values.items():
            if value is None or isinstance(value, (list, dict)):
                value = json.dumps(value)
            out[f"{section}.{name}"] = value
    return out


# --- the trainer --------------------------------------------------------------------------


class Trainer:
    """Trains an encoder as ``config`` says; :meth:`train` runs it to the end."""

    def __init__(
        self, config: TrainConfig, *, resume: bool | str | None = None, overwrite: bool = False
    ) -> None:
        self.config = config
        self.output_dir = Path(config.training.output_dir)
        self.run_dir = RunDirectory(self.output_dir)
        self.accelerator = _build_accelerator(config)
        if self.accelerator.is_main_process:
            self.run_dir.lock()  # before anything reads or repairs the directory
        try:
            self._set_up(resume, overwrite)
        except BaseException:
            self.run_dir.unlock()
            raise

    def _set_up(self, resume: bool | str | None, overwrite: bool) -> None:
        config, acc, t = self.config, self.accelerator, self.config.training
        if t.batch_size % acc.num_processes:
            raise ConfigError(
                f"{config.where('training.batch_size')}: training.batch_size ({t.batch_size}) "
                f"must be divisible by the number of processes ({acc.num_processes})"
            )
        if acc.is_main_process:
            repaired = self.run_dir.recover()  # what an interrupted --overwrite left
            if repaired:
                logger.warning(repaired)
        acc.wait_for_everyone()
        self.resume_from = plan_run_directory(config, resume, overwrite)
        # Replace what is there: on --overwrite, or the leftovers of a start that saved nothing.
        self.replace = self.resume_from is None and bool(self.run_dir.artifacts())
        try:
            resolve_impl(config.loss.impl, 1 << 16, 1 << 16, acc.device)
        except ValueError as exc:
            raise ConfigError(f"{config.where('loss.impl')}: loss.impl: {exc}") from None

        from accelerate.utils import set_seed

        set_seed(t.seed)
        self.encoder = build_encoder(config)
        self.encoder.train()  # from_pretrained leaves the network in eval mode: no dropout
        self.loss_fn = build_loss(config).to(acc.device)
        self._load_data()
        self.task = load_eval_task(config)
        self.chunks = self._plan_chunks()  # before the optimizer: the probe makes gradients
        self._prepare_optimization()
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)
        self.state.data_fingerprint = self.data_fingerprint
        self.state.chunk_sizes = [self.chunks.grad, self.chunks.embed]
        self.collator = Collator(
            self.train_set.queries,
            self.train_set.documents,
            self.encoder.tokenizer,
            self.chunks.embed,
            t.sort_by_length,
        )
        self.group = dist.group.WORLD if acc.num_processes > 1 else None

        # Only now that everything has loaded: a start that fails changes nothing on disk.
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._prepare_run_directory()
        acc.wait_for_everyone()
        if t.report_to:
            acc.init_trackers(t.run_name, config=_flat_hparams(config))

    def _load_data(self) -> None:
        config, t = self.config, self.config.training
        examples = load_examples(
            config.data.train,
            format=config.data.format,
            split=config.data.split,
            negatives=config.data.negatives,
            max_examples=config.data.max_examples,
        )
        self.train_set = TrainSet(examples, config.data.negatives, t.seed)
        self.data_fingerprint = self.train_set.fingerprint()  # as read, before any re-mining
        first = epoch_batches(self.train_set, 0, t.batch_size)
        if not first:
            distinct = len({p for e in examples for p in e.positives})
            raise ConfigError(
                f"{config.where('training.batch_size')}: training.batch_size ({t.batch_size}) "
                f"is larger than any batch of distinct positives the data can make "
                f"({len(examples)} examples, {distinct} distinct positive texts)"
            )
        self.batches_per_epoch = len(first)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.batches_per_epoch))
        cache = config.data.token_cache
        cache_dir = None if cache == "off" else Path(cache) if cache else default_cache_dir()
        with self.accelerator.main_process_first():  # the main process fills the cache
            self.train_set.attach_tokens(
                self.encoder.tokenizer,
                self.encoder.side_settings("query"),
                self.encoder.side_settings("document"),
                cache_dir,
                show_progress=self.accelerator.is_local_main_process,
            )
        self.miner = None
        if config.mining.dynamic:  # keeps the hard negatives hard: retriever/mining/dynamic.py
            from retriever.mining.dynamic import DynamicMiner

            self.miner = DynamicMiner.from_train_config(config, self.train_set)

    def _plan_chunks(self) -> ChunkSizes:
        """The chunk sizes of both passes: as configured, measured (``auto``), or as the
        checkpoint being resumed recorded them (an auto size must not change on resume)."""
        config, acc, t = self.config, self.accelerator, self.config.training
        if self.resume_from is not None:
            saved = json.loads((self.resume_from / "trainer_state.json").read_text("utf-8"))
            if saved.get("chunk_sizes"):
                return ChunkSizes(*saved["chunk_sizes"])
        measure = available = None
        if acc.device.type == "cuda" and "auto" in (t.chunk_size, t.embed_chunk_size):
            encoder, device = self.encoder.to(acc.device), acc.device
            length = max(encoder.query_max_length, encoder.document_max_length)

            def embed(features: dict[str, torch.Tensor]) -> torch.Tensor:
                with acc.autocast():
                    return encoder(features)

            def measure(grad: bool) -> float:
                vocab = len(encoder.tokenizer)
                return probe_bytes_per_text(embed, encoder, device, length, vocab, grad)

            texts = t.batch_size // acc.num_processes * (2 + config.data.negatives)
            fixed = fixed_costs(
                encoder, config.model.dtype == "bfloat16", texts, encoder.embedding_dim
            )

            def available() -> int:
                budget = budget_bytes(t.memory_gb, device)
                return budget - torch.cuda.memory_allocated(device) - fixed

        try:
            sizes = plan_chunk_sizes(
                t.chunk_size,
                t.embed_chunk_size,
                dropout=dropout_probability(self.encoder.model),
                device=acc.device,
                measure=measure,
                available=available,
            )
        except ChunkSizeError as exc:
            raise ConfigError(f"{config.where('training.embed_chunk_size')}: {exc}") from None
        logger.info(describe_chunks(sizes, t.memory_gb))
        return sizes

    def _prepare_optimization(self) -> None:
        """Optimizer and schedule (on fp32 master weights for a bf16 network), and what a
        checkpoint holds."""
        acc, config = self.accelerator, self.config
        self.master = None
        if config.model.dtype == "bfloat16":
            # bf16 network, fp32 master weights and gradients (retriever/precision.py). The
            # master gradients are averaged by hand, so the model is not wrapped in DDP.
            from retriever.train.precision import MasterWeights

            self.encoder.to(acc.device)
            self.master = MasterWeights(self.encoder.parameters())
            optimizer = build_optimizer(config, self.master.master, self.loss_fn)
            scheduler = build_scheduler(config, optimizer, self.total_steps)
            self.optimizer, self.scheduler = acc.prepare(optimizer, scheduler)
            self.model = self.encoder
        else:
            optimizer = build_optimizer(config, self.encoder.parameters(), self.loss_fn)
            scheduler = build_scheduler(config, optimizer, self.total_steps)
            self.model, self.optimizer, self.scheduler = acc.prepare(
                self.encoder, optimizer, scheduler
            )
        self.state = TrainState()
        acc.register_for_checkpointing(self.state, self.loss_fn)
        if self.miner is not None:
            acc.register_for_checkpointing(self.miner)
        if self.master is not None:
            acc.register_for_checkpointing(self.master)

    def _load_checkpoint(self, path: Path) -> None:
        saved = json.loads((path / "trainer_state.json").read_text("utf-8"))
        fingerprint = saved.get("data_fingerprint")
        if fingerprint and fingerprint != self.data_fingerprint:
            raise RunError(
                f"--resume: {self.config.data.train} is not the training data {path} was "
                "trained on (its examples changed); a resumed run must see the same data"
            )
        try:
            self.accelerator.load_state(str(path))
        except Exception as exc:  # verified files that still do not fit this model or run
            raise RunError(f"--resume: {path} could not be loaded: {exc}") from None
        if self.state.step > self.total_steps:
            where = self.config.where("training.max_steps")
            raise RunError(
                f"--resume: {path} is at step {self.state.step}, past the {self.total_steps} "
                f"steps this run is to train ({where}); raise training.max_steps or resume an "
                "earlier checkpoint"
            )
        logger.info("resumed from %s at step %d", path, self.state.step)

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
        if self.resume_from is not None:
            truncate_logs(self.output_dir, self.state.step)
        self.run_dir.write_config(self.config.to_yaml())

    # -- pieces of the loop --

    def _loader(self) -> torch.utils.data.DataLoader:
        """One loader from the current position to the last step (across epochs)."""
        acc, state, t = self.accelerator, self.state, self.config.training
        dataset = StepBatches(
            self.train_set,
            self.collator,
            t.batch_size,
            Position(state.epoch, state.batch_in_epoch),
            self.total_steps - state.step,
            rank=acc.process_index,
            world=acc.num_processes,
        )
        return run_loader(dataset, self.config.data.num_workers, acc.device.type == "cuda", t.seed)

    def _step(self, batch: Any) -> torch.Tensor:
        acc = self.accelerator
        # A learnable temperature lives outside DDP; the ring gives every rank the gradient of
        # the global loss for it, so it needs no all-reduce.
        loss = cached_step(
            self.model,
            batch,
            self.loss_fn,
            device=acc.device,
            chunk_size=self.chunks.grad,
            group=self.group,
            no_sync=None if self.master is not None else lambda: acc.no_sync(self.model),
        )
        if self.master is not None and acc.num_processes > 1:
            self.master.all_reduce()
        return loss

    def _remine(self) -> None:
        """A dynamic-mining pass (every process takes part), logged to mining.jsonl."""
        acc = self.accelerator
        record = self.miner.run(
            acc.unwrap_model(self.model),
            self.state.step,
            rank=acc.process_index,
            world_size=acc.num_processes,
        )
        self._write("mining.jsonl", record)
        acc.log({f"mining/{k}": v for k, v in record.items() if k != "step"}, step=self.state.step)
        acc.print(self.miner.describe(record))

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` under a temporary name, its manifest last, then rename:
        a run killed while saving leaves the previous checkpoints, never a half-written one."""
        acc = self.accelerator
        path = checkpoint_dir(self.output_dir, self.state.step)
        partial = partial_path(path)
        if acc.is_main_process and partial.exists():
            shutil.rmtree(partial)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(partial))
            acc.wait_for_everyone()  # every process's files (RNG states) are on disk
            if acc.is_main_process:
                state = json.dumps(self.state.state_dict(), indent=2) + "\n"
                (partial / "trainer_state.json").write_text(state, encoding="utf-8")
                (partial / "config.yaml").write_text(self.config.to_yaml(), encoding="utf-8")
                write_manifest(partial, self.state.step)
                publish(partial, path)
        except (OSError, RuntimeError) as exc:  # a full disk, a quota, a vanished mount
            shutil.rmtree(partial, ignore_errors=True)
            newest = list_checkpoints(self.output_dir)
            raise RunError(
                f"{path}: could not write the checkpoint ({exc}); "
                + (f"the newest complete one is {newest[-1]}" if newest else "none is complete")
            ) from None
        if acc.is_main_process:
            self.run_dir.discard_replaced()  # the new run now stands on its own
            limit = self.config.training.save_total_limit
            for stale in list_checkpoints(self.output_dir)[:-limit] if limit else []:
                remove_checkpoint(stale)
        acc.wait_for_everyone()
        return path

    def _write(self, name: str, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.output_dir / name, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(self) -> dict[str, Any]:
        """Evaluate on eval.data (main process); keep best/ when eval.metric improves."""
        from accelerate.utils import broadcast_object_list

        from retriever.eval.evaluator import evaluate_task

        acc, metric = self.accelerator, self.config.eval.metric
        result: list[Any] = [None]
        if acc.is_main_process:
            encoder = acc.unwrap_model(self.model)
            scores = evaluate_task(
                encoder, self.task, batch_size=self.config.eval.batch_size, show_progress=False
            )
            result = [{k: v for k, v in scores.items() if isinstance(v, (int, float))}]
            if self.state.best_metric is None or result[0][metric] > self.state.best_metric:
                with atomic_directory(self.output_dir / "best") as best:
                    encoder.save(best)
                    (best / "eval.json").write_text(
                        json.dumps({"step": self.state.step, **scores}, indent=2, default=str)
                        + "\n",
                        encoding="utf-8",
                    )
        result = broadcast_object_list(result) if acc.num_processes > 1 else result
        scores = result[0]
        if self.state.best_metric is None or scores[metric] > self.state.best_metric:
            self.state.best_metric, self.state.best_step = scores[metric], self.state.step
        self.state.evaluated_step = self.state.step
        record = {"step": self.state.step, **scores}
        self._write("eval.jsonl", record)
        acc.log({f"eval/{k}": v for k, v in scores.items()}, step=self.state.step)
        acc.print(
            f"eval at step {self.state.step}: {metric} = {scores[metric]:.4f} "
            f"({scores.get('num_queries')} queries, {scores.get('num_documents')} documents)"
        )
        return record

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
        if self.task is not None and cfg.eval.at_start and state.step == 0:
            evaluations.append(self.evaluate())
        acc.print(
            f"training {self.total_steps} steps of {t.batch_size} queries "
            f"(+{cfg.data.negatives} hard negatives each) on {acc.num_processes} process(es), "
            f"{self.batches_per_epoch} batches per epoch"
        )
        progress = tqdm(
            total=self.total_steps,
            initial=state.step,
            disable=not acc.is_local_main_process,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        window = _new_window()
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(acc.device)
        last_loss = None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        while state.step < self.total_steps:
            batches = iter(self._loader())
            while True:
                waited = time.perf_counter()
                item = next(batches, None)
                window["data_wait"] += time.perf_counter() - waited
                if item is None:
                    break
                state.epoch, index, batch = item
                state.batch_in_epoch = index + 1
                loss, grad_norm = self._optimizer_step(batch, params)
                state.step += 1
                window["loss"] += loss
                window["steps"] += 1
                window["tokens"] += batch.num_tokens
                progress.update(1)
                if state.step % t.logging_steps == 0 or state.step == self.total_steps:
                    last_loss = self._log(window, grad_norm, progress)
                    window = _new_window()
                unfinished = state.step < self.total_steps
                # Before the checkpoint, so that a resumed run has the re-mined negatives.
                remined = self.miner is not None and unfinished and self.miner.due(state.step)
                if remined:
                    self._remine()
                # Evaluate before the checkpoint, so that it holds the best metric so far.
                evaluate = self.task is not None and cfg.eval.steps
                if evaluate and state.step % cfg.eval.steps == 0 and unfinished:
                    evaluations.append(self.evaluate())
                if t.save_steps and state.step % t.save_steps == 0 and unfinished:
                    self.save_checkpoint()
                if state.step >= self.total_steps or remined:
                    break  # after re-mining: a new loader, whose workers see the new negatives
        progress.close()
        return self._finish(evaluations, last_loss)

    def _optimizer_step(self, batch: Any, params: list[torch.nn.Parameter]) -> tuple[float, Any]:
        """One global batch: gradient, clipping, the update; returns (loss, gradient norm)."""
        acc, t = self.accelerator, self.config.training
        loss = float(self._step(batch))
        grad_norm = None
        if t.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm)
        self._stop_unless_finite(loss, grad_norm)
        self.optimizer.step()
        if self.master is not None:
            self.master.copy_to_model()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def _stop_unless_finite(self, loss: float, grad_norm: Any) -> None:
        """A NaN or inf loss or gradient stops the run before the update reaches the model."""
        acc = self.accelerator
        norm = float(grad_norm) if grad_norm is not None else 0.0
        bad = torch.tensor(float(not (math.isfinite(loss) and math.isfinite(norm))))
        if acc.num_processes > 1:  # every rank must stop together
            bad = acc.reduce(bad.to(acc.device), reduction="sum").cpu()
        if not bad.item():
            return
        checkpoints = list_checkpoints(self.output_dir)
        after = (
            f"then --resume from the newest checkpoint, {checkpoints[-1]}"
            if checkpoints
            else "then start again (nothing was saved)"
        )
        raise RunError(
            f"step {self.state.step + 1}: the loss is {loss}"
            + (f" and the gradient norm {norm}" if grad_norm is not None else "")
            + "; the model was not updated and training stopped. Lower "
            f"training.learning_rate or set training.max_grad_norm, {after}"
        )

    def _finish(self, evaluations: list[dict[str, Any]], last_loss: float | None) -> dict:
        acc, cfg, state = self.accelerator, self.config, self.state
        if self.task is not None and state.evaluated_step != state.step:
            evaluations.append(self.evaluate())
        self.save_checkpoint()
        if acc.is_main_process:
            encoder = acc.unwrap_model(self.model)
            if self.master is not None:  # save the fp32 master weights, not their bf16 copy
                encoder.float()
                self.master.copy_to_model()
            with atomic_directory(self.output_dir / "final") as final:
                encoder.save(final)
        acc.wait_for_everyone()
        acc.end_training()
        summary = {
            "steps": state.step,
            "final_loss": last_loss,
            "evaluations": evaluations,
            "best_step": state.best_step,
            "best_metric": state.best_metric,
            "output_dir": str(self.output_dir),
        }
        if evaluations:
            first, last = evaluations[0], evaluations[-1]
            metric = cfg.eval.metric
            acc.print(
                f"{metric}: {first[metric]:.4f} at step {first['step']} -> "
                f"{last[metric]:.4f} at step {last['step']} (best {state.best_metric:.4f} at "
                f"step {state.best_step}, saved in {self.output_dir / 'best'})"
            )
        acc.print(f"final model: {self.output_dir / 'final'}")
        return summary

    def _log(self, window: dict[str, Any], grad_norm: Any, progress: tqdm) -> float:
        acc, t = self.accelerator, self.config.training
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        local = torch.tensor([window["loss"], float(window["tokens"])], device=acc.device)
        total = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
        loss = float(total[0]) / window["steps"] / acc.num_processes
        record = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "temperature": float(1.0 / self.loss_fn.scale.detach()),
            "queries_per_s": window["steps"] * t.batch_size / elapsed,
            "tokens_per_s": float(total[1]) / elapsed,
            "step_s": elapsed / window["steps"],
            "data_wait_s": window["data_wait"] / window["steps"],  # waiting for the loader
        }
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if acc.device.type == "cuda":
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        self._write("log.jsonl", record)
        acc.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=self.state.step)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        return loss


def _new_window() -> dict[str, Any]:
    """What the next log record sums over."""
    return {"loss": 0.0, "steps": 0, "tokens": 0, "data_wait": 0.0, "start": time.perf_counter()}


def train(
    config: TrainConfig, *, resume: bool | str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Train as ``config`` says; returns a summary (steps, final loss, evaluations, best)."""
    return Trainer(config, resume=resume, overwrite=overwrite).train()
