"""What the trainer is built from, each from the config: the Accelerator, the encoder, the
loss, the dynamic miner, the optimizer and its schedule, and the evaluation task. Every bad
value becomes a `ConfigError` naming the option."""

from __future__ import annotations

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


def flat_hparams(config: TrainConfig) -> dict[str, Any]:
    """The config as the scalar dict trackers accept."""
    out = {}
    for section, values in config.to_dict().items():
        for name, value in values.items():
            if value is None or isinstance(value, (list, dict)):
                value = json.dumps(value)
            out[f"{section}.{name}"] = value
    return out


def build_train_set(
    config: TrainConfig, encoder: Encoder, accelerator: Any
) -> tuple[TrainSet, int]:
    """The training set of ``data.*``, tokenised through the token cache, and its batches per
    epoch; a batch larger than the distinct positives allow is an error naming the option."""
    from retriever.examples import load_examples
    from retriever.train.data import epoch_batches
    from retriever.train.tokens import default_cache_dir

    t, d = config.training, config.data
    examples = load_examples(
        d.train, format=d.format, split=d.split, negatives=d.negatives, max_examples=d.max_examples
    )
    train_set = TrainSet(examples, d.negatives, t.seed)
    first = epoch_batches(train_set, 0, t.batch_size)
    if not first:
        distinct = len({p for e in examples for p in e.positives})
        raise ConfigError(
            f"{config.where('training.batch_size')}: training.batch_size ({t.batch_size}) "
            f"is larger than any batch of distinct positives the data can make "
            f"({len(examples)} examples, {distinct} distinct positive texts)"
        )
    cache_dir = None if d.token_cache == "off" else Path(d.token_cache or default_cache_dir())
    with accelerator.main_process_first():  # the main process fills the cache
        train_set.attach_tokens(
            encoder.tokenizer,
            encoder.side_settings("query"),
            encoder.side_settings("document"),
            cache_dir,
            show_progress=accelerator.is_local_main_process,
        )
    return train_set, len(first)
