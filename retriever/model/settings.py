"""`EncoderSettings`: everything that turns texts into an encoder's inputs and its outputs into
embeddings (pooling, normalisation, per-side prefixes and max lengths, lower-casing, a
Matryoshka truncation), in one frozen object that training, evaluation, mining and the token
cache all read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

POOLING_MODES = ("cls", "mean", "last")
SIDES = ("query", "document")


@dataclass(frozen=True)
class SideSettings:
    """How one side (queries or documents) is tokenised."""

    prefix: str
    max_length: int
    lower_case: bool = False

    def text(self, text: str) -> str:
        text = self.prefix + text
        return text.lower() if self.lower_case else text


@dataclass(frozen=True)
class EncoderSettings:
    pooling: str = "mean"
    normalize: bool = True
    query_prefix: str = ""
    document_prefix: str = ""
    query_max_length: int = 128
    document_max_length: int = 256
    do_lower_case: bool = False
    truncate_dim: int | None = None  # keep the first k dimensions (then normalise), or all

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {self.pooling!r}")
        k = self.truncate_dim
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"truncate_dim must be a positive integer, got {self.truncate_dim!r}")

    def side(self, side: str) -> SideSettings:
        """How ``side`` ('query' | 'document') is tokenised."""
        if side == "query":
            return SideSettings(self.query_prefix, self.query_max_length, self.do_lower_case)
        if side == "document":
            return SideSettings(self.document_prefix, self.document_max_length, self.do_lower_case)
        raise ValueError(f"side must be 'query' or 'document', got {side!r}")


def template_prefix(template: str, instruction: str | None) -> str:
    """The prefix a text template stands for: the part before ``{text}`` (which must end it;
    a prefix is what the token cache and sentence-transformers' prompts know), with
    ``{instruction}`` filled in."""
    if not template.endswith("{text}") or template.count("{text}") != 1:
        raise ValueError(f"a template must end with {{text}} (once), got {template!r}")
    prefix = template[: -len("{text}")]
    unknown = sorted(set(re.findall(r"\{(\w*)\}", prefix)) - {"instruction"})
    if unknown:
        raise ValueError(
            f"unknown placeholder {{{unknown[0]}}} in {template!r} (a template knows {{text}} "
            "and, for queries, {instruction})"
        )
    if "{instruction}" in prefix:
        if instruction is None:
            raise ValueError(f"the template {template!r} has an {{instruction}} but none is given")
        prefix = prefix.replace("{instruction}", instruction)
    return prefix


# The settings a caller may override when loading a model (None: the model's own).
OVERRIDABLE = (
    "pooling",
    "normalize",
    "query_prefix",
    "document_prefix",
    "query_max_length",
    "document_max_length",
    "truncate_dim",
)
