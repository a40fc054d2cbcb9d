"""`Encoder`: a Hugging Face network, its tokenizer and one `EncoderSettings`.

One wrapper serves training (``tokenize`` + differentiable ``forward``), evaluation and mining
(``encode``: no grad, length-sorted batches, autocast on GPU). It loads a plain Hugging Face
model or a sentence-transformers directory (reading its max_seq_length, Pooling mode, Normalize
module and prompts), and ``save`` writes a sentence-transformers directory, so
``SentenceTransformer(path)`` reproduces the embeddings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from retriever.model.decoder import append_eos as append_eos_token
from retriever.model.decoder import is_decoder, pooling_problem
from retriever.model.locate import locate_model
from retriever.model.lora import is_lora, save_merged
from retriever.model.network import (
    MODEL_INPUTS,
    max_length_problems,
    pool,
    pool_stream,
    set_dropout,
)
from retriever.model.sdpa import attention_backends
from retriever.model.settings import EncoderSettings, SideSettings
from retriever.model.st_dir import (
    read_sentence_transformers_dir,
    resolve_settings,
    write_sentence_transformers_config,
)


class Encoder(nn.Module):
    """A text encoder: Hugging Face model -> pooled (and L2-normalised) embeddings.

    Build it with :meth:`from_pretrained`. ``forward`` is differentiable (training);
    ``encode`` is the inference path used by evaluation and hard-negative mining. The settings
    are one frozen object (``encoder.settings``; ``encoder.pooling`` and the like read it):
    change them with ``encoder.settings = dataclasses.replace(encoder.settings, ...)``.

    Example::

        encoder = Encoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
        q = encoder.encode(["what is a cell?"], side="query")  # numpy [1, 384]
        features = encoder.tokenize(["a cell is ..."], side="document")
        d = encoder(features)  # torch [1, 384], with gradients
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        settings: EncoderSettings | None = None,
        *,
        cudnn_attention: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or EncoderSettings()
        # Off: length-sorted chunks have many shapes, and cuDNN plans each one (model.sdpa).
        self.cudnn_attention = cudnn_attention
        if self.tokenizer.pad_token is None:
            # Decoder tokenizers often have no pad token; any token works under the mask.
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # Read-only views of the settings (one object holds them; these are not copies).
    pooling = property(lambda self: self.settings.pooling)
    normalize = property(lambda self: self.settings.normalize)
    query_prefix = property(lambda self: self.settings.query_prefix)
    document_prefix = property(lambda self: self.settings.document_prefix)
    query_max_length = property(lambda self: self.settings.query_max_length)
    document_max_length = property(lambda self: self.settings.document_max_length)
    do_lower_case = property(lambda self: self.settings.do_lower_case)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        query_prefix: str | None = None,
        document_prefix: str | None = None,
        query_max_length: int | None = None,
        document_max_length: int | None = None,
        truncate_dim: int | None = None,
        append_eos: bool = False,
        padding_side: str | None = None,
        torch_dtype: torch.dtype | None = None,
        gradient_checkpointing: bool = False,
        cudnn_attention: bool = False,
        fused_layer_norm: bool = False,
        fused_kernels: bool = False,
        dropout: float | None = None,
        **model_kwargs: Any,
    ) -> Encoder:
        """Load a Hugging Face model (a local directory, Hub id or ``pkg:PACKAGE``) as an Encoder.

        Settings left as None come from a sentence-transformers directory when ``name_or_path``
        is one (Pooling mode, Normalize module, ``prompts["query"]`` / ``["document"]``,
        ``query_length`` / ``document_length`` / ``max_seq_length``); otherwise they default to
        mean pooling, normalisation, no prefixes and max lengths 128 (query) / 256 (document),
        at most the model's positions. ``cudnn_attention`` lets SDPA use cuDNN attention (see
        `retriever.model.sdpa`). ``fused_layer_norm`` runs the model's LayerNorms on large CUDA
        inputs with the Triton kernels of `retriever.model.layer_norm` (same parameters; other
        inputs use PyTorch's). ``fused_kernels`` gives BERT-family layers Triton kernels for
        their work between matrix products (bias + GELU; bias + dropout + residual + LayerNorm:
        `retriever.model.fused`; same parameters; small and CPU inputs take the layers' own
        path), and Llama-style decoder layers Liger-Kernel's RMSNorm and SwiGLU where
        liger-kernel is installed. ``dropout`` sets every dropout probability of the network.
        ``truncate_dim`` keeps the first k dimensions of each embedding (a Matryoshka prefix),
        normalised after the cut when ``normalize``. For decoder LLMs (`retriever.model.decoder`)
        the default pooling is ``last``; ``append_eos`` makes the tokenizer end every text with
        its EOS token (saved with it), and ``padding_side`` sets the tokenizer's ("left" or
        "right"; last-token pooling handles both).
        ``model_kwargs`` go to ``AutoModel.from_pretrained`` (e.g. ``attn_implementation``).
        """
        from transformers import AutoModel

        name_or_path = locate_model(name_or_path)
        st = read_sentence_transformers_dir(name_or_path) if os.path.isdir(name_or_path) else None
        model_path = str((st or {}).get("transformer_path", name_or_path))
        if torch_dtype is not None:
            model_kwargs[_dtype_argument()] = torch_dtype
        model = AutoModel.from_pretrained(model_path, **model_kwargs)
        tokenizer = _load_tokenizer(model_path, padding_side, append_eos)
        adapt_network(model, gradient_checkpointing, dropout, fused_layer_norm, cudnn_attention,
                      fused_kernels)  # fmt: skip
        overrides = dict(
            pooling=pooling,
            normalize=normalize,
            query_prefix=query_prefix,
            document_prefix=document_prefix,
            query_max_length=query_max_length,
            document_max_length=document_max_length,
            truncate_dim=truncate_dim,
        )
        settings = _settings_for(model.config, st, overrides)
        encoder = cls(model, tokenizer, settings, cudnn_attention=cudnn_attention)
        # Like transformers' from_pretrained, return the whole module in eval mode: the network
        # already is, and a wrapper left claiming training mode would hide that dropout is off.
        # Training code calls .train().
        return encoder.eval()

    @classmethod
    def from_sentence_transformer(
        cls, model: Any, *, cudnn_attention: bool = False, **overrides: Any
    ) -> Encoder:
        """An Encoder around a loaded ``SentenceTransformer``'s network and tokenizer (the same
        modules: training it trains ``model``), with its pooling, normalisation, prompts and
        max lengths; ``overrides`` (the settings of :meth:`from_pretrained`) replace them."""
        from retriever.model.st_dir import read_sentence_transformer

        st = read_sentence_transformer(model)
        network, tokenizer = st.pop("network"), st.pop("tokenizer")
        settings = _settings_for(network.config, st, overrides)
        return cls(network, tokenizer, settings, cudnn_attention=cudnn_attention)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embedding_dim(self) -> int:
        """The size of the embeddings: ``truncate_dim`` when set, else the hidden size."""
        return self.settings.truncate_dim or int(self.model.config.hidden_size)

    def side_settings(self, side: str) -> SideSettings:
        """How ``side`` ('query' | 'document') is tokenised (for the token cache)."""
        return self.settings.side(side)

    def length_problems(self) -> list[tuple[str, int, int]]:
        """(side, max length, limit) where a max length exceeds the model's positions."""
        return max_length_problems(self)

    def tokenize(self, texts: Sequence[str], side: str) -> dict[str, Tensor]:
        """Tokenize ``texts`` for ``side`` ('query' | 'document'): its prefix, its max length,
        padded to the longest text (on the tokenizer's padding side)."""
        settings = self.settings.side(side)
        return dict(
            self.tokenizer(
                [settings.text(t) for t in texts],
                padding=True,
                truncation="longest_first",
                max_length=settings.max_length,
                return_tensors="pt",
            )
        )

    def forward(self, features: dict[str, Any]) -> Tensor:
        """[B, D] pooled (and, if ``normalize``, unit-length) embeddings, with gradients.

        ``features`` are a tokenizer's padded batch (``no_padding = True``, set by the training
        collator, says no row is padded) or a token stream (``cu_seqlens`` and the rest of
        `retriever.train.batches.StreamChunk.features`; see :meth:`use_padding_free`).
        """
        if "cu_seqlens" in features:
            from retriever.model.packed import stream_hidden

            with attention_backends(cudnn=self.cudnn_attention):
                hidden = stream_hidden(self.model, features)
            embeddings = pool_stream(
                hidden, features["cu_seqlens"], features["texts"], self.settings.pooling
            )
        else:
            embeddings = self._padded(features)
        if self.settings.truncate_dim is not None:  # a Matryoshka prefix, normalised on its own
            embeddings = embeddings[:, : self.settings.truncate_dim]
        if self.settings.normalize:
            embeddings = F.normalize(embeddings, p=2, dim=-1)
        return embeddings

    def _padded(self, features: dict[str, Any]) -> Tensor:
        inputs = {k: v for k, v in features.items() if k in MODEL_INPUTS}
        if features.get("no_padding") is True:
            # The caller knows on the host that no token is padding: without a mask SDPA can use
            # its flash kernel, and transformers does not read the mask back from the device.
            inputs.pop("attention_mask", None)
        with attention_backends(cudnn=self.cudnn_attention):
            hidden = self.model(**inputs).last_hidden_state
        return pool(hidden, features["attention_mask"], self.settings.pooling)

    def use_padding_free(self) -> str | None:
        """Let ``forward`` take token streams (padding-free chunks: `retriever.model.packed`).
        Returns why this network cannot (it is then left as it was), or None."""
        from retriever.model.packed import packing_problem, use_packed_attention

        before = self.model.config._attn_implementation
        switched = use_packed_attention(self.model)
        longest = max(self.settings.query_max_length, self.settings.document_max_length)
        problem = packing_problem(self.model, len(self.tokenizer), longest)
        if problem is not None and switched:
            self.model.set_attn_implementation(before)
        return problem

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        side: str,
        *,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        show_progress: bool = True,
        dtype: torch.dtype | None = None,
        convert_to_numpy: bool = True,
    ) -> np.ndarray | Tensor:
        """Embed ``texts`` without gradients; returns [N, D] float32 in input order.

        Texts are batched longest first (similar lengths share a batch, so little padding is
        computed). ``device`` moves the module there first (default: where it is). On a GPU
        the forward runs under autocast in ``dtype`` (default bf16 where supported, else fp16);
        pass ``torch.float32`` to disable it. On CPU it runs in the model's own dtype.
        """
        self.settings.side(side)  # validate before any work
        if device is not None:
            self.to(device)
        device = self.device
        autocast_dtype = _autocast_dtype(device, dtype)
        was_training = self.training
        self.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        chunks: list[Tensor] = []
        try:
            for start in tqdm(
                range(0, len(texts), batch_size),
                desc=f"encode {side}s",
                disable=not show_progress,
                unit="batch",
            ):
                batch = [texts[i] for i in order[start : start + batch_size]]
                features = {k: v.to(device) for k, v in self.tokenize(batch, side).items()}
                with torch.autocast(
                    device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
                ):
                    chunks.append(self(features).float())
        finally:
            self.train(was_training)
        dim = chunks[0].size(1) if chunks else self.embedding_dim
        out = torch.empty(len(texts), dim, dtype=torch.float32, device=device)
        if chunks:
            out[torch.as_tensor(order, device=device)] = torch.cat(chunks)
        return out.cpu().numpy() if convert_to_numpy else out

    def save(self, path: str | os.PathLike) -> None:
        """Write a sentence-transformers directory (Transformer, Pooling, optional Normalize,
        prompts for the prefixes); ``SentenceTransformer(path)`` then gives the same embeddings
        (``encode_query`` / ``encode_document``, or ``prompt_name='query'`` / ``'document'``)."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        if is_lora(self.model):  # the merged network: it loads without peft
            save_merged(self.model, root)
        else:
            self.model.save_pretrained(root)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # Encoding leaves its last call's truncation and padding on the backend, which
            # would be saved with it: the saved tokenizer must not depend on what ran last.
            backend.no_truncation()
            backend.no_padding()
        self.tokenizer.save_pretrained(root)
        write_sentence_transformers_config(root, self.settings, int(self.model.config.hidden_size))

    def extra_repr(self) -> str:
        fields = dataclasses.asdict(self.settings)
        return ", ".join(f"{k}={v!r}" for k, v in fields.items())


def _load_tokenizer(model_path: str, padding_side: str | None, append_eos: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    if append_eos:
        append_eos_token(tokenizer)
    return tokenizer


def adapt_network(
    model: nn.Module,
    gradient_checkpointing: bool,
    dropout: float | None,
    fused_layer_norm: bool,
    cudnn_attention: bool,
    fused_kernels: bool = False,
) -> None:
    """What loading with these options does to a network (also to one a script passes)."""
    if gradient_checkpointing:
        enable_checkpointing(model, cudnn_attention)
    if dropout is not None:
        set_dropout(model, dropout)
    if fused_layer_norm:  # imported only here: it needs triton
        from retriever.model.layer_norm import use_fused_layer_norm

        use_fused_layer_norm(model)
    if fused_kernels:
        from retriever.model.fused import use_fused_kernels

        use_fused_kernels(model)


def _settings_for(config: Any, st: dict | None, overrides: dict[str, Any]) -> EncoderSettings:
    """The settings from ``overrides``, then the sentence-transformers directory, then defaults."""
    limit = getattr(config, "max_position_embeddings", None)
    default_pooling = "last" if is_decoder(config) else "mean"
    settings = resolve_settings(
        st, overrides, limit if isinstance(limit, int) else None, default_pooling
    )
    problem = pooling_problem(config, settings.pooling)
    if problem:
        raise ValueError(problem)
    if settings.truncate_dim is not None and settings.truncate_dim > config.hidden_size:
        raise ValueError(
            f"truncate_dim {settings.truncate_dim} exceeds the model's embedding size "
            f"{config.hidden_size}"
        )
    return settings


def _autocast_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype of ``encode`` on ``device`` (None: no autocast)."""
    if device.type != "cuda":
        return None
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def _dtype_argument() -> str:
    """transformers >= 4.56 calls it `dtype`; older versions only know `torch_dtype`."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def enable_checkpointing(model: nn.Module, cudnn_attention: bool = False) -> None:
    """Activation checkpointing in every layer, non-reentrant: it works under no_grad (the
    cache's first pass) and with frozen inputs (LoRA), and replays the chunk's RNG state
    (dropout) in the recomputation. transformers 5.x calls it activation checkpointing.

    The recomputation runs inside backward, outside `Encoder.forward`'s SDPA context, so it is
    given the same context: otherwise it may pick another attention kernel (cuDNN's on Hopper)
    than the forward did, and torch refuses the mismatched saved tensors."""

    def contexts() -> tuple[AbstractContextManager, AbstractContextManager]:
        return contextlib.nullcontext(), attention_backends(cudnn=cudnn_attention)

    kwargs = {"use_reentrant": False, "context_fn": contexts}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
