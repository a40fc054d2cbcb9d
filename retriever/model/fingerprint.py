"""Fingerprints: hashes of what determines token ids (a tokenizer) and embeddings (an encoder's
weights, tokenizer and settings), the keys of the token cache and the corpus-embedding cache."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import torch


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about a tokenizer that changes token ids: its full serialisation
    (vocabulary, normaliser, pre-tokeniser, post-processor) and special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Truncation and padding are per-call state that encoding leaves on the backend; the
        # settings that matter are in the cache key already.
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = getattr(tokenizer, "special_tokens_map", {})
    h.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return h.hexdigest()


def encoder_fingerprint(encoder: Any) -> str:
    """A hash of everything that determines an encoder's embeddings: weights, buffers,
    tokenizer, pooling, normalisation, prefixes and max lengths."""
    h = hashlib.sha256()
    for name, tensor in list(encoder.model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(tokenizer_fingerprint(encoder.tokenizer).encode())
    settings = {"padding_side": encoder.tokenizer.padding_side, **asdict(encoder.settings)}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()
