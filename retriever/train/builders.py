"""What the trainer is built from, each from the config: the Accelerator, the encoder, the
loss, the dynamic miner, the optimizer and its schedule, and the evaluation task. Every bad
value becomes a `ConfigError` naming the option."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from retriever.fileio import directory_problem
from retriever.loss import InfoNCELoss
from retriever.model import Encoder, EncoderSettings, ModelNotFoundError
from retriever.model.network import max_length_problems
from retriever.train.config import ConfigError, TrainConfig
from retriever.train.data import TrainSet

logger = logging.getLogger(__name__)


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


def build_encoder(config: TrainConfig, model: Any = None) -> Encoder:
    """The encoder ``model`` describes (with LoRA adapters when ``model.lora``), or the model a
    script passed: a Hub id or path, a ``SentenceTransformer`` or an ``Encoder`` (trained in
    place), with the model options that are set applied to it."""
    m = config.model
    if isinstance(model, (str, os.PathLike)):
        m.name_or_path, model = str(model), None
    kwargs: dict[str, Any] = {}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    try:
        encoder = _load_encoder(m, kwargs) if model is None else _given_encoder(m, model)
    except (ModelNotFoundError, NotImplementedError, OSError, ValueError, ImportError) as exc:
        key = _encoder_option(m, exc)
        where = config.where(key) if model is None else "Trainer(model=...)"
        raise ConfigError(f"{where}: {key}: {exc}") from None
    _say_if_liger_is_missing(config, encoder)
    if m.lora is not None:
        from retriever.model.lora import add_lora

        try:
            encoder.model = add_lora(encoder.model, m.lora)
        except (ImportError, ValueError) as exc:  # peft missing, a target module not found
            raise ConfigError(f"{config.where('model.lora')}: model.lora: {exc}") from None
    for side, length, limit in max_length_problems(encoder):
        key = f"model.{side}_max_length"
        raise ConfigError(
            f"{config.where(key)}: {key}: {length} tokens, more than the model's {limit} "
            f"positions (max_position_embeddings); set {key} to at most {limit}"
        )
    return encoder


def _check_prompt_room(
    config: TrainConfig, source: Any, tokenizer: Any, side: str, settings: Any
) -> None:
    """A prompt (prefix, template, instruction) that fills the side's max length would leave
    every text cut to nothing: all queries alike, nothing learned."""
    if not settings.prefix or settings.max_length is None:
        return
    used = len(tokenizer(settings.prefix + "x")["input_ids"])  # the prompt, one text token
    if used > settings.max_length:
        key = f"model.{side}_max_length"
        raise ConfigError(
            f"{config.where(key)}: {key} ({settings.max_length} tokens) leaves no room for "
            f"the text after source {source.name!r}'s {side} prompt {settings.prefix!r} "
            f"({used - 1} tokens with the special ones): raise {key} or shorten the prompt"
        )


def _encoder_option(m: Any, exc: Exception) -> str:
    """The model option an error loading the encoder is about."""
    message = str(exc)
    if m.attn_implementation and "attn" in message.lower() or isinstance(exc, ImportError):
        return "model.attn_implementation"  # transformers refused the attention kernel
    if message.startswith("pooling "):
        return "model.pooling"
    if message.startswith("append_eos:"):
        return "model.append_eos"
    if message.startswith("a template") or message.startswith("the template"):
        return "model.query_template"
    return "model.name_or_path"


def _settings_options(m: Any) -> dict[str, Any]:
    """The encoder settings the model options ask for (None: the model's own)."""
    from retriever.model.settings import template_prefix

    query_prefix, document_prefix = m.query_prefix, m.document_prefix
    if m.query_template is not None:
        query_prefix = template_prefix(m.query_template, m.instruction)
    if m.document_template is not None:
        document_prefix = template_prefix(m.document_template, None)
    return dict(
        pooling=m.pooling,
        normalize=m.normalize,
        query_prefix=query_prefix,
        document_prefix=document_prefix,
        query_max_length=m.query_max_length,
        document_max_length=m.document_max_length,
    )


def _network_options(m: Any) -> dict[str, Any]:
    """What the model options do to the network once it is loaded."""
    gpu = torch.cuda.is_available()
    return dict(
        gradient_checkpointing=m.gradient_checkpointing,
        dropout=m.dropout,
        fused_layer_norm=gpu if m.fused_layer_norm is None else m.fused_layer_norm,
        cudnn_attention=m.cudnn_attention,
        fused_kernels=gpu if m.fused_kernels is None else m.fused_kernels,
    )


def _say_if_liger_is_missing(config: TrainConfig, encoder: Encoder) -> None:
    """A decoder whose RMSNorm and SwiGLU would take Liger-Kernel's kernels, without
    liger-kernel: one line where model.fused_kernels is null on a GPU, a warning where it is
    true. Not an error, as elsewhere: a layer the kernels do not cover runs eager."""
    m = config.model
    if not _network_options(m)["fused_kernels"]:
        return
    from retriever.model.fused import liger_missing

    if not liger_missing(encoder.model):
        return
    text = ("fused decoder kernels (RMSNorm, SwiGLU) need liger-kernel: "
            'pip install "retriever-train[liger]"; the decoder layers run eager')  # fmt: skip
    if m.fused_kernels is None:
        logger.info("model.fused_kernels: %s", text)
    else:
        key = "model.fused_kernels"
        logger.warning("%s: %s: true, but %s", config.where(key), key, text)


def _load_encoder(m: Any, kwargs: dict[str, Any]) -> Encoder:
    return Encoder.from_pretrained(
        m.name_or_path,
        **_settings_options(m),
        append_eos=m.append_eos,
        padding_side=m.padding_side,
        torch_dtype=getattr(torch, m.dtype),
        **_network_options(m),
        **kwargs,
    )


def _given_encoder(m: Any, model: Any) -> Encoder:
    """A script's ``Encoder`` or ``SentenceTransformer`` (trained in place), with the model
    options that are set applied to it."""
    from retriever.model.decoder import append_eos
    from retriever.model.encoder import adapt_network

    asked = {k: v for k, v in _settings_options(m).items() if v is not None}
    network = _network_options(m)
    if isinstance(model, Encoder):
        encoder = model
        encoder.settings = dataclasses.replace(encoder.settings, **asked)
        encoder.cudnn_attention = network["cudnn_attention"]
    elif type(model).__name__ == "SentenceTransformer":
        encoder = Encoder.from_sentence_transformer(
            model, cudnn_attention=network["cudnn_attention"], **asked
        )
    else:
        raise ValueError(
            "expected a Hub id, a local path, a SentenceTransformer or a retriever Encoder, got "
            f"{type(model).__name__}"
        )
    adapt_network(encoder.model, **network)
    encoder.model.to(getattr(torch, m.dtype))
    if m.padding_side is not None:
        encoder.tokenizer.padding_side = m.padding_side
    if m.append_eos:
        append_eos(encoder.tokenizer)
    return encoder


def name_given_model(config: TrainConfig, model: Any) -> None:
    """Record the model a script passed as ``model.name_or_path`` (config.yaml and the model
    card name it; ``--resume`` compares it), before the run directory is planned. A config that
    names another model is refused: which one trains would be silently decided."""
    if model is None:
        return
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
    else:  # an Encoder's or a SentenceTransformer's network: the path it was loaded from
        network = getattr(model, "model", None)
        if type(model).__name__ == "SentenceTransformer":
            network = getattr(model[0], "auto_model", None) if len(model) else None
        name = str(getattr(getattr(network, "config", None), "_name_or_path", "") or "")
        name = name or "a given model"
    m, key = config.model, "model.name_or_path"
    if m.name_or_path not in (None, "", name):
        raise ConfigError(
            f"{config.where(key)}: {key}: {m.name_or_path}, but Trainer(model=...) is {name}: "
            f"give the model in one place (leave {key} unset, or pass no model)"
        )
    m.name_or_path = name
    config.sources[key] = "Trainer(model=...)"


def build_miner(config: TrainConfig, train_set: TrainSet, settings: EncoderSettings) -> Any:
    """The dynamic miner ``config.mining`` asks for; data.train must be a mined file, mined
    with the encoder ``settings`` the run trains with."""
    from retriever.mining.dynamic import DynamicMiner
    from retriever.mining.files import MiningDataError, read_meta

    if not str(config.data.train).endswith((".jsonl", ".jsonl.gz")):
        raise ConfigError(
            f"{config.where('mining.dynamic')}: mining.dynamic needs data.train to be a file "
            f"written by `retriever mine` (with ranked candidate lists), got {config.data.train!r}"
        )
    try:
        _check_mined_with(config, read_meta(config.data.train).get("encoder"), settings)
        return DynamicMiner.from_mined_file(
            config.data.train, train_set, config.mining, corpus=config.mining.corpus
        )
    except MiningDataError as exc:
        raise ConfigError(f"mining.dynamic: {exc}") from None


# EncoderSettings field -> the option that sets it in training (None: the model's own)
_MINED_SETTINGS = {
    "query_prefix": "model.query_prefix",
    "document_prefix": "model.document_prefix",
    "query_max_length": "model.query_max_length",
    "document_max_length": "model.document_max_length",
    "pooling": "model.pooling",
    "normalize": "model.normalize",
    "do_lower_case": None,
    "truncate_dim": None,
}


def _check_mined_with(config: TrainConfig, mined: Any, settings: EncoderSettings) -> None:
    """Re-mining compares each negative's score now with its score when mined: under other
    prefixes or max lengths the scores move with the model unchanged, and most negatives would
    be replaced at the first pass."""
    if not isinstance(mined, dict):
        return  # mined by a version that did not record them
    for name, option in _MINED_SETTINGS.items():
        ours = getattr(settings, name)
        if name not in mined or mined[name] == ours:
            continue
        fix = f"Set {option}: {mined[name]!r}" if option else "Train the model that was mined"
        raise ConfigError(
            f"{config.where(option or 'mining.dynamic')}: mining.dynamic: {config.data.train} "
            f"was mined with {name} = {mined[name]!r} (its .meta.json), this run trains with "
            f"{name} = {ours!r}: re-scoring under other settings moves every score, and most "
            "negatives would be replaced at the first re-mine with the model unchanged. "
            f"{fix}, or mine again with the settings of this run"
        )


def build_loss(
    config: TrainConfig, device: torch.device, encoder: Encoder, datasets: list[Any], steps: int
) -> torch.nn.Module:
    """The loss of the retrieval sources on ``device`` (`loss.objective`, wrapped for
    Matryoshka), refusing a ``loss.impl`` that cannot run there. The global contrastive loss
    keeps one entry per example of every retrieval source (``example_offsets``)."""
    from retriever.loss.inputs import resolve_impl
    from retriever.train.config_checks import LOSS_OPTIONS

    c = config.loss
    try:
        resolve_impl(c.impl, 1 << 16, 1 << 16, device)
    except ValueError as exc:
        raise ConfigError(f"{config.where('loss.impl')}: loss.impl: {exc}") from None
    common = dict(
        scale=1.0 / c.temperature,
        learnable_scale=c.learnable_temperature,
        min_scale=1.0 / c.max_temperature,
        max_scale=1.0 / c.min_temperature,
        impl=c.impl,
    )
    if c.objective == "sigmoid":
        from retriever.loss.sigmoid import SigmoidLoss

        loss: torch.nn.Module = SigmoidLoss(bias=c.sigmoid_bias, **common)
    elif c.objective == "gcl":
        from retriever.loss.gcl import GlobalContrastiveLoss

        examples = sum(len(d) for d in datasets if not hasattr(d, "pool"))
        decay = c.gcl_decay_steps or steps
        loss = GlobalContrastiveLoss(
            examples, gamma_min=c.gcl_gamma_min, decay_steps=decay, symmetric=c.symmetric, **common
        )
    else:
        options = {name: getattr(c, name) for name in LOSS_OPTIONS}
        loss = InfoNCELoss(symmetric=c.symmetric, **options, **common)
    if c.matryoshka_dims:
        from retriever.loss.matryoshka import MatryoshkaLoss

        if max(c.matryoshka_dims) > encoder.embedding_dim:
            raise ConfigError(
                f"{config.where('loss.matryoshka_dims')}: loss.matryoshka_dims "
                f"{c.matryoshka_dims}: the model's embeddings have {encoder.embedding_dim}"
            )
        loss = MatryoshkaLoss(loss, c.matryoshka_dims, c.matryoshka_weights, encoder.normalize)
    return loss.to(device)


def example_offsets(datasets: list[Any]) -> list[int]:
    """Where each source's examples start in a loss's per-example state (map-style retrieval
    sources only, in order; STS and streamed sources get the end, which they never index)."""
    offsets, total = [], 0
    for dataset in datasets:
        offsets.append(total)
        if not hasattr(dataset, "pool") and not getattr(dataset, "streaming", False):
            total += len(dataset)
    return offsets


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
    config: TrainConfig,
    accelerator: Any,
    encoder: Encoder,
    loss_fn: InfoNCELoss,
    total_steps: int,
    sharded: bool = False,
) -> tuple[Any, Any, Any, Any]:
    """(model, optimizer, scheduler, master weights) as Accelerate prepared them. A bf16 network
    trains on fp32 master weights and gradients (`train.precision`), averaged by hand, so it is
    not wrapped in DDP; otherwise ``master`` is None. A ``sharded`` encoder (`train.sharding`)
    is not wrapped either, and its optimizer's state is checkpointed whole by `FullState`."""
    acc, master = accelerator, None
    if sharded:
        optimizer = build_optimizer(config, encoder.parameters(), loss_fn)
        scheduler = build_scheduler(config, optimizer, total_steps)
        return encoder, optimizer, acc.prepare(scheduler), None
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


def flat_hparams(config: TrainConfig) -> dict[str, Any]:
    """The config as the scalar dict trackers accept."""
    out = {}
    for section, values in config.to_dict().items():
        for name, value in values.items():
            if value is None or isinstance(value, (list, dict)):
                value = json.dumps(value)
            out[f"{section}.{name}"] = value
    return out


def build_datasets(
    config: TrainConfig, encoder: Encoder, accelerator: Any, sources: list[Any]
) -> list[Any]:
    """Every source's examples (a TrainSet for retrieval, a PairSet for STS), tokenised through
    the token cache with the source's own prefixes; a streamed source's StreamSet (tokenised as
    training goes)."""
    from retriever.train.tokens import default_cache_dir

    d = config.data
    cache_dir = None if d.token_cache == "off" else Path(d.token_cache or default_cache_dir())
    problem = None if cache_dir is None else directory_problem(cache_dir)
    if problem:
        raise ConfigError(f"{config.where('data.token_cache')}: data.token_cache: {problem}")
    datasets = []
    with accelerator.main_process_first():  # the main process fills the cache
        for source in sources:
            datasets.append(_source_dataset(config, source, encoder, cache_dir, accelerator))
    return datasets


def _source_dataset(
    config: TrainConfig, source: Any, encoder: Encoder, cache_dir: Any, accelerator: Any
) -> Any:
    from retriever.train.pairs import PairSet

    settings = encoder.settings
    own = source.query_prefix
    if source.instruction is not None:  # checked: model.query_template is set
        from retriever.model.settings import template_prefix

        own = template_prefix(config.model.query_template, source.instruction)
    query = dataclasses.replace(settings.side("query"), prefix=_prefix(own, settings.query_prefix))
    document = dataclasses.replace(
        settings.side("document"), prefix=_prefix(source.document_prefix, settings.document_prefix)
    )
    for side, side_settings in (("query", query), ("document", document)):
        _check_prompt_room(config, source, encoder.tokenizer, side, side_settings)
    progress = accelerator.is_local_main_process
    seed = config.training.seed
    if source.task == "sts":
        pairs = PairSet(_sts_task(source), seed, source.max_examples)
        pairs.attach_tokens(encoder.tokenizer, query, cache_dir, show_progress=progress)
        return pairs
    teacher = config.loss.distill_weight > 0 and source.negatives > 0
    if source.streaming:
        from retriever.train.streams import StreamSet

        rank, world = accelerator.process_index, accelerator.num_processes
        stream = StreamSet(
            _record_stream(source), source.negatives, seed, teacher=teacher, rank=rank, world=world
        )
        stream.attach_tokens(encoder.tokenizer, query, document, None)
        return stream
    train_set = TrainSet(_examples(source), source.negatives, seed, teacher=teacher)
    train_set.attach_tokens(encoder.tokenizer, query, document, cache_dir, show_progress=progress)
    return train_set


def _examples(source: Any) -> list[Any]:
    """A map-style retrieval source's examples: read from its path, or from what a script
    passed (a list of dicts, a datasets.Dataset)."""
    from retriever.data.examples import check_negatives, example_from_record, load_examples
    from retriever.data.inputs import records_in_memory

    if source.data is None:
        return load_examples(
            source.path,
            format=source.format,
            split=source.split,
            negatives=source.negatives,
            max_examples=source.max_examples,
        )
    records = records_in_memory(source.data, source.path)[: source.max_examples]
    examples = [example_from_record(record, where) for where, record in records]
    check_negatives(examples, source.negatives)
    return examples


def _sts_task(source: Any) -> Any:
    """An STS source's pairs: read from its path, or from the rows a script passed."""
    from retriever.data.examples import DataError
    from retriever.data.inputs import records_in_memory
    from retriever.eval.sts import load_sts, sts_from_records

    try:
        if source.data is None:
            return load_sts(source.path, source.split)
        return sts_from_records(records_in_memory(source.data, source.path), source.name)
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(str(exc)) from None


def _record_stream(source: Any) -> Any:
    """A streamed source's records: the stream a script passed, a JSONL file read line by line,
    or a Hub (or saved) dataset loaded with streaming=True."""
    from retriever.data.examples import DataError, detect_format
    from retriever.data.inputs import RecordStream

    limit = source.max_examples
    if source.data is not None:
        return RecordStream(source.data, source.path, limit=limit)
    kind = detect_format(source.path) if source.format == "auto" else source.format
    if kind == "jsonl":
        return RecordStream.jsonl(source.path, limit)
    if kind != "datasets":
        raise DataError(f"{source.path}: a {kind} source is read whole: set streaming: false")
    import datasets

    try:
        if os.path.isdir(source.path):  # save_to_disk: memory-mapped, read as a stream
            loaded = datasets.load_from_disk(source.path)
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[source.split]
            loaded = loaded.to_iterable_dataset()
        else:
            loaded = datasets.load_dataset(source.path, split=source.split, streaming=True)
    except Exception as exc:  # datasets raises many kinds (not found, offline, bad files)
        raise DataError(
            f"{source.path}: cannot be streamed as a dataset ({type(exc).__name__}: {exc})"
        ) from None
    return RecordStream(loaded, source.path, limit=limit)


def _prefix(own: str | None, model: str) -> str:
    return model if own is None else own


def batches_per_epoch(config: TrainConfig, dataset: Any, share: int, where: str) -> int | None:
    """How many batches of ``share`` one epoch of ``dataset`` makes (None for a stream: not
    known in advance); none is an error."""
    if getattr(dataset, "streaming", False):
        return None
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
