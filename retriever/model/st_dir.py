"""Reading and writing sentence-transformers directories (modules.json, the Transformer's
sentence_bert_config.json, Pooling, Normalize, prompts), for the settings Encoder supports."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from retriever.model.settings import POOLING_MODES, EncoderSettings

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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def read_sentence_transformers_dir(path: str | os.PathLike) -> dict[str, Any] | None:
    """The settings of a sentence-transformers directory, or None if ``path`` is not one.

    Returns ``transformer_path``, ``pooling``, ``normalize``, ``prompts``, ``max_seq_length``,
    ``query_length``, ``document_length``, ``do_lower_case`` and ``truncate_dim``. Modules this
    wrapper cannot reproduce (Dense, max pooling, ...) raise ``NotImplementedError`` rather
    than silently giving different embeddings.
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
        "truncate_dim": None,
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
            settings["pooling"] = _pooling(config, str(module_dir / "config.json"))
        elif kind == "Normalize":
            settings["normalize"] = True
        else:
            raise NotImplementedError(
                f"{modules_file}: module {module['type']!r} is not supported by retriever's "
                "Encoder (supported: Transformer, Pooling, Normalize)"
            )
    st_config = root / "config_sentence_transformers.json"
    if st_config.is_file():
        model_config = _read_json(st_config)
        settings["prompts"] = model_config.get("prompts") or {}
        settings["truncate_dim"] = model_config.get("truncate_dim")
    return settings


def _pooling(config: dict[str, Any], where: str) -> str:
    """Our pooling mode for a sentence-transformers Pooling config (current or legacy keys)."""
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [m for k, m in _ST_LEGACY_POOLING.items() if config.get(k)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or _ST_POOLING.get(modes[0], modes[0]) not in POOLING_MODES:
        raise NotImplementedError(
            f"{where}: pooling {modes} is not supported (supported: cls, mean, lasttoken)"
        )
    if config.get("include_prompt", True) is False:
        raise NotImplementedError(f"{where}: include_prompt=false is not supported")
    return _ST_POOLING.get(modes[0], modes[0])


def read_sentence_transformer(model: Any) -> dict[str, Any]:
    """The settings of a loaded ``SentenceTransformer`` (as :func:`read_sentence_transformers_dir`
    reads them from its directory), with ``network`` and ``tokenizer``: its modules themselves."""
    settings: dict[str, Any] = {
        "pooling": None, "normalize": False, "prompts": dict(getattr(model, "prompts", {}) or {}),
        "max_seq_length": None, "query_length": None, "document_length": None,
        "do_lower_case": False, "truncate_dim": getattr(model, "truncate_dim", None),
    }  # fmt: skip
    for index, module in enumerate(model):
        kind, where = type(module).__name__, f"the SentenceTransformer's module {index}"
        if kind == "Transformer" and index == 0:
            settings["network"] = getattr(module, "auto_model", None) or module.model
            settings["tokenizer"] = getattr(module, "tokenizer", None) or module.processor
            for key in ("max_seq_length", "query_length", "document_length", "do_lower_case"):
                settings[key] = getattr(module, key, settings[key])
        elif kind == "Pooling":
            settings["pooling"] = _pooling(module.get_config_dict(), where)
        elif kind == "Normalize":
            settings["normalize"] = True
        else:
            raise NotImplementedError(
                f"{where} ({kind}) is not supported by retriever's Encoder (supported: "
                "Transformer first, Pooling, Normalize)"
            )
    if "network" not in settings:
        raise NotImplementedError("the SentenceTransformer has no Transformer module first")
    settings["do_lower_case"] = bool(settings["do_lower_case"])
    return settings


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


def resolve_settings(
    st: dict[str, Any] | None,
    overrides: dict[str, Any],
    limit: int | None = None,
    default_pooling: str = "mean",
) -> EncoderSettings:
    """The encoder's settings: each override that is not None, else the sentence-transformers
    directory's (``st``, from :func:`read_sentence_transformers_dir`), else ``default_pooling``
    (mean; last for a decoder), normalisation, no prefixes and max lengths 128 / 256. A max
    length that was not asked for never exceeds the model's positions (``limit``); one that was
    is the caller's to report."""
    st = st or {}
    prompts = st.get("prompts", {})
    max_seq_length = st.get("max_seq_length")
    defaults = {
        "pooling": st.get("pooling") or default_pooling,
        "normalize": st.get("normalize", True) if st else True,
        "query_prefix": prompts.get("query", ""),
        "document_prefix": next((prompts[k] for k in _ST_DOCUMENT_PROMPTS if k in prompts), ""),
        "query_max_length": st.get("query_length") or max_seq_length or 128,
        "document_max_length": st.get("document_length") or max_seq_length or 256,
        "truncate_dim": st.get("truncate_dim"),
    }
    values = {k: v if overrides.get(k) is None else overrides[k] for k, v in defaults.items()}
    for side in ("query", "document"):
        key = f"{side}_max_length"
        values[key] = int(values[key])
        if overrides.get(key) is None and limit is not None:
            values[key] = min(values[key], limit)
    return EncoderSettings(**values, do_lower_case=bool(st.get("do_lower_case", False)))


def write_sentence_transformers_config(
    root: Path, settings: EncoderSettings, embedding_dim: int
) -> None:
    """modules.json, the Transformer's and Pooling's configs, Normalize and the prompts, in the
    legacy format that sentence-transformers 3.x to 6.x all read. ``max_seq_length`` is the
    document max length; the per-side lengths are written too when the installed
    sentence-transformers understands them, and ``truncate_dim`` when set (sentence-transformers
    5+ reads it; it truncates after its Normalize module, so cosine similarities agree).
    ``embedding_dim`` is the network's hidden size (what the Pooling module outputs)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if settings.normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize",
             "type": "sentence_transformers.models.Normalize"}
        )  # fmt: skip
        (root / "2_Normalize").mkdir(exist_ok=True)
    bert_config: dict[str, Any] = {
        "max_seq_length": settings.document_max_length,
        "do_lower_case": settings.do_lower_case,
    }
    if _st_supports_side_lengths():
        bert_config["query_length"] = settings.query_max_length
        bert_config["document_length"] = settings.document_max_length
    st_pooling = {v: k for k, v in _ST_LEGACY_POOLING.items()}
    pooling_config: dict[str, Any] = {"word_embedding_dimension": embedding_dim}
    pooling_config.update({key: False for key in _ST_LEGACY_POOLING})
    pooling_config[st_pooling[settings.pooling]] = True
    (root / "1_Pooling").mkdir(exist_ok=True)
    _write_json(root / "modules.json", modules)
    _write_json(root / "sentence_bert_config.json", bert_config)
    _write_json(root / "1_Pooling" / "config.json", pooling_config)
    prompts = {}
    if settings.query_prefix:
        prompts["query"] = settings.query_prefix
    if settings.document_prefix:
        prompts["document"] = settings.document_prefix
    model_config: dict[str, Any] = {
        "prompts": prompts,
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if settings.normalize else "dot",
    }
    if settings.truncate_dim is not None:
        model_config["truncate_dim"] = settings.truncate_dim
    _write_json(root / "config_sentence_transformers.json", model_config)
