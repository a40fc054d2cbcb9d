"""What the trainer is built from, each from the config: the Accelerator, the encoder, the
loss, the dynamic miner, the optimizer and its schedule, and the evaluation task. Every bad
value becomes a `ConfigError` naming the option."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from retriever.eval.subset import shrink_task
from retriever.loss import InfoNCELoss
from retriever.model import Encoder, ModelNotFoundError
from retriever.model.network import max_length_problems
from retriever.train.config import ConfigError, TrainConfig
from retriever.train.data import TrainSet


def build_accelerator(config: TrainConfig) -> Any:
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


def build_miner(config: TrainConfig, train_set: TrainSet) -> Any:
    """The dynamic miner ``config.mining`` asks for; data.train must be a mined file."""
    from retriever.mining.dynamic import DynamicMiner
    from retriever.mining.files import MiningDataError

    if not str(config.data.train).endswith((".jsonl", ".jsonl.gz")):
        raise ConfigError(
            f"{config.where('mining.dynamic')}: mining.dynamic needs data.train to be a file "
            f"written by `retriever mine` (with ranked candidate lists), got {config.data.train!r}"
        )
    try:
        return DynamicMiner.from_mined_file(
            config.data.train, train_set, config.mining, corpus=config.mining.corpus
        )
    except MiningDataError as exc:
        raise ConfigError(f"mining.dynamic: {exc}") from None


def build_loss(config: TrainConfig, device: torch.device) -> InfoNCELoss:
    """The InfoNCE loss on ``device``; a ``loss.impl`` that cannot run there is refused."""
    from retriever.loss.inputs import resolve_impl

    c = config.loss
    try:
        resolve_impl(c.impl, 1 << 16, 1 << 16, device)
    except ValueError as exc:
        raise ConfigError(f"{config.where('loss.impl')}: loss.impl: {exc}") from None
    loss = InfoNCELoss(
        scale=1.0 / c.temperature,
        learnable_scale=c.learnable_temperature,
        min_scale=1.0 / c.max_temperature,
        max_scale=1.0 / c.min_temperature,
        symmetric=c.symmetric,
        impl=c.impl,
    )
    return loss.to(device)


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


def prepare_optimization(
    config: TrainConfig, accelerator: Any, encoder: Encoder, loss_fn: InfoNCELoss, total_steps: int
) -> tuple[Any, Any, Any, Any]:
    """(model, optimizer, scheduler, master weights) as Accelerate prepared them. A bf16 network
    trains on fp32 master weights and gradients (`train.precision`), averaged by hand, so it is
    not wrapped in DDP; otherwise ``master`` is None."""
    acc, master = accelerator, None
    if config.model.dtype == "bfloat16":
        from retriever.train.precision import MasterWeights

        encoder.to(acc.device)
        master = MasterWeights(encoder.parameters())
        optimizer = build_optimizer(config, master.master, loss_fn)
        scheduler = build_scheduler(config, optimizer, total_steps)
        return (encoder, *acc.prepare(optimizer, scheduler), master)
    optimizer = build_optimizer(config, encoder.parameters(), loss_fn)
    scheduler = build_scheduler(config, optimizer, total_steps)
    return (*acc.prepare(encoder, optimizer, scheduler), master)


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


def load_eval_tasks(config: TrainConfig) -> list[Any]:
    """The tasks of ``eval.data`` (retrieval tasks, shrunk as ``eval.max_*`` say, and STS
    sets), and a check that ``eval.metric`` names a score they report; errors name the option."""
    from retriever.eval.data import RetrievalTask
    from retriever.eval.tasks import load_any_task

    specs = [config.eval.data] if isinstance(config.eval.data, str) else config.eval.data or []
    tasks = []
    for i, spec in enumerate(specs):
        key = "eval.data" if isinstance(config.eval.data, str) else f"eval.data[{i}]"
        try:
            task = load_any_task(spec, config.eval.split)
            if isinstance(task, RetrievalTask):
                task = shrink_task(task, config.eval.max_queries, config.eval.max_documents)
            tasks.append(task)
        except (FileNotFoundError, ValueError, OSError) as exc:
            # A BEIR directory without that split's qrels: the split is what to change.
            if f"qrels/{config.eval.split}.tsv" in str(exc):
                key = "eval.split"
            raise ConfigError(f"{config.where(key)}: {key}: {exc}") from None
    _check_metric_task(config, tasks)
    return tasks


def _check_metric_task(config: TrainConfig, tasks: list[Any]) -> None:
    """eval.metric must be a score of the tasks loaded: ``TASK/METRIC`` of one of them, or a
    plain metric of the only one, or ``mean_main_score``."""
    from retriever.eval.metrics import metric_names
    from retriever.eval.sts import STSTask

    metric, by_name = config.eval.metric, {t.name: t for t in tasks}
    where = config.where("eval.metric")
    if not tasks or metric == "mean_main_score":
        return
    if "/" in metric:
        name, score = metric.rsplit("/", 1)
        if name not in by_name:
            raise ConfigError(
                f"{where}: eval.metric: {metric!r} names no evaluation task (tasks: "
                f"{', '.join(by_name)})"
            )
        task = by_name[name]
    elif len(tasks) > 1:
        raise ConfigError(
            f"{where}: eval.metric: {metric!r} is ambiguous with {len(tasks)} tasks; use "
            f"TASK/METRIC (e.g. {tasks[0].name}/main_score) or mean_main_score"
        )
    else:
        task, score = tasks[0], metric
    reported = (
        ["main_score", "spearman", "pearson"]
        if isinstance(task, STSTask)
        else ["main_score", *metric_names()]
    )
    if score not in reported:
        kind = "an STS" if isinstance(task, STSTask) else "a retrieval"
        raise ConfigError(
            f"{where}: eval.metric: {task.name} is {kind} task, which does not report "
            f"{score!r} (e.g. {', '.join(reported[:3])})"
        )


def flat_hparams(config: TrainConfig) -> dict[str, Any]:
    """The config as the scalar dict trackers accept."""
    out = {}
    for section, values in config.to_dict().items():
        for name, value in values.items():
            if value is None or isinstance(value, (list, dict)):
                value = json.dumps(value)
            out[f"{section}.{name}"] = value
    return out


def build_datasets(config: TrainConfig, encoder: Encoder, accelerator: Any) -> list[Any]:
    """Every source's examples (a TrainSet for retrieval, a PairSet for STS), tokenised through
    the token cache with the source's own prefixes."""
    from retriever.train.sources import sources_of
    from retriever.train.tokens import default_cache_dir

    d = config.data
    cache_dir = None if d.token_cache == "off" else Path(d.token_cache or default_cache_dir())
    datasets = []
    with accelerator.main_process_first():  # the main process fills the cache
        for source in sources_of(config):
            datasets.append(_source_dataset(config, source, encoder, cache_dir, accelerator))
    return datasets


def _source_dataset(
    config: TrainConfig, source: Any, encoder: Encoder, cache_dir: Any, accelerator: Any
) -> Any:
    from retriever.examples import load_examples
    from retriever.train.pairs import PairSet

    settings = encoder.settings
    query = dataclasses.replace(
        settings.side("query"), prefix=_prefix(source.query_prefix, settings.query_prefix)
    )
    document = dataclasses.replace(
        settings.side("document"), prefix=_prefix(source.document_prefix, settings.document_prefix)
    )
    progress = accelerator.is_local_main_process
    if source.task == "sts":
        pairs = PairSet(source.path, source.split, config.training.seed, source.max_examples)
        pairs.attach_tokens(encoder.tokenizer, query, cache_dir, show_progress=progress)
        return pairs
    examples = load_examples(
        source.path,
        format=source.format,
        split=source.split,
        negatives=source.negatives,
        max_examples=source.max_examples,
    )
    train_set = TrainSet(examples, source.negatives, config.training.seed)
    train_set.attach_tokens(encoder.tokenizer, query, document, cache_dir, show_progress=progress)
    return train_set


def _prefix(own: str | None, model: str) -> str:
    return model if own is None else own


def batches_per_epoch(config: TrainConfig, dataset: Any, share: int, where: str) -> int:
    """How many batches of ``share`` one epoch of ``dataset`` makes; none is an error."""
    plan = dataset.epoch_plan(0, share)
    if not plan:
        size = config.training.batch_size
        examples = getattr(dataset, "examples", None)
        what = (
            f"any batch of distinct positives {where} can make ({len(examples)} examples, "
            f"{len({p for e in examples for p in e.positives})} distinct positive texts)"
            if examples is not None
            else f"the {len(dataset)} pairs of {where}"
        )
        raise ConfigError(
            f"{config.where('training.batch_size')}: training.batch_size ({size}) asks for "
            f"{share} rows of it a step, more than {what}"
        )
    return len(plan)
