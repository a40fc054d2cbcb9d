"""`Objective`: which terms an InfoNCE row's denominator holds and how its loss is formed, with
sentence-transformers' argument names (``MultipleNegativesRankingLoss``) and the options of
current embedding recipes (docs/objectives.md, "Loss options"). Pure settings: no tensors.

For query i with positive p_i = d[labels[i]], S = s * similarity, the terms are

    query_to_doc    S(q_i, d_j)  for every candidate j            (holds the positive)
    query_to_query  S(q_i, q_k)  for every other query k
    doc_to_query    S(p_i, q_k)  for every query k                (k = i: the positive again)
    doc_to_doc      S(p_i, d_j)  for every candidate j not of query i's group

``partition_mode="joint"``: one softmax over every term of the chosen directions;
``"per_direction"``: one per direction, the row's loss the mean of theirs (the positive always
from query_to_doc).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

QUERY_TO_DOC = "query_to_doc"
QUERY_TO_QUERY = "query_to_query"
DOC_TO_QUERY = "doc_to_query"
DOC_TO_DOC = "doc_to_doc"
DIRECTIONS = (QUERY_TO_DOC, QUERY_TO_QUERY, DOC_TO_QUERY, DOC_TO_DOC)
PARTITION_MODES = ("joint", "per_direction")
HARDNESS_MODES = ("in_batch_negatives", "hard_negatives", "all_negatives")
# The kernels' code for each hardness mode (0: none).
HARDNESS_CODES = {None: 0, "in_batch_negatives": 1, "hard_negatives": 2, "all_negatives": 3}


@dataclass(frozen=True)
class Objective:
    """The loss of each query row; the arguments are checked (ValueError naming the argument).

    Args:
        directions: a subset of DIRECTIONS holding ``"query_to_doc"``, in any order.
        partition_mode: ``"joint"`` or ``"per_direction"`` (the latter only with
            query_to_doc and doc_to_query: the other two hold no positive).
        hardness_mode: None, or which query_to_doc negatives get ``hardness_strength *
            sg(similarity)`` added to their logit (Lan et al. 2025; EmbeddingGemma):
            ``"in_batch_negatives"`` (other queries' candidates), ``"hard_negatives"`` (the
            query's own negatives) or ``"all_negatives"``.
        hardness_strength: alpha >= 0.
        false_negative_margin: None, or m: a negative whose similarity exceeds the row's
            positive similarity + m leaves the denominator (Qwen3-Embedding: 0.1); in every
            direction, never a labelled (query, positive) pair.
        debias: tau+ in [0, 1) of the debiased contrastive loss (Chuang et al. 2020): the
            negatives' sum N * mean becomes N * max((mean - tau+ e^pos) / (1 - tau+), e^-s).
        label_smoothing: eps in [0, 1): cross-entropy's convention, target (1 - eps) on the
            positive plus eps / K on each of the row's K terms.
    """

    directions: tuple[str, ...] = (QUERY_TO_DOC,)
    partition_mode: str = "joint"
    hardness_mode: str | None = None
    hardness_strength: float = 0.0
    false_negative_margin: float | None = None
    debias: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        directions = self.directions
        if isinstance(directions, str) or not isinstance(directions, (tuple, list)):
            raise ValueError(f"directions must be a tuple of direction names, got {directions!r}")
        unknown = [d for d in directions if d not in DIRECTIONS]
        if unknown or not directions or len(set(directions)) != len(directions):
            raise ValueError(
                f"directions must be distinct names from {DIRECTIONS}, got {tuple(directions)}"
            )
        if QUERY_TO_DOC not in directions:
            raise ValueError("directions must include 'query_to_doc' (it holds the positive)")
        # One canonical order: the same objective compares and hashes equal whatever the order.
        object.__setattr__(self, "directions", tuple(d for d in DIRECTIONS if d in directions))
        if self.partition_mode not in PARTITION_MODES:
            raise ValueError(
                f"partition_mode must be one of {PARTITION_MODES}, got {self.partition_mode!r}"
            )
        if self.partition_mode == "per_direction" and set(directions) & {
            QUERY_TO_QUERY,
            DOC_TO_DOC,
        }:
            raise ValueError(
                "partition_mode='per_direction' needs every direction to hold the positive; "
                "query_to_query and doc_to_doc hold none: use partition_mode='joint'"
            )
        if self.hardness_mode is not None and self.hardness_mode not in HARDNESS_MODES:
            raise ValueError(
                f"hardness_mode must be None or one of {HARDNESS_MODES}, got {self.hardness_mode!r}"
            )
        _check_number("hardness_strength", self.hardness_strength, low=0.0)
        if self.false_negative_margin is not None:
            _check_number("false_negative_margin", self.false_negative_margin)
        _check_number("debias", self.debias, low=0.0, below=1.0)
        _check_number("label_smoothing", self.label_smoothing, low=0.0, below=1.0)
        if self.debias > 0 and self.label_smoothing > 0:
            raise ValueError(
                "debias and label_smoothing cannot be combined: the debiased denominator has no "
                "uniform target over its terms; use one of them"
            )

    @property
    def alpha(self) -> float:
        """The hardness strength in effect (0 without a hardness mode)."""
        return float(self.hardness_strength) if self.hardness_mode is not None else 0.0

    @property
    def hardness_code(self) -> int:
        return HARDNESS_CODES[self.hardness_mode] if self.alpha > 0 else 0

    @property
    def symmetric(self) -> bool:
        """The classic symmetric InfoNCE: both directions, averaged."""
        return self.directions == (QUERY_TO_DOC, DOC_TO_QUERY) and (
            self.partition_mode == "per_direction"
        )

    @property
    def plain(self) -> bool:
        """One direction and no option: the loss the plain kernels compute."""
        return (
            self.directions == (QUERY_TO_DOC,)
            and self.hardness_code == 0
            and self.false_negative_margin is None
            and self.debias == 0
            and self.label_smoothing == 0
        )

    @property
    def needs_owners(self) -> bool:
        """Whether the loss must know which query each candidate belongs to."""
        return DOC_TO_DOC in self.directions or self.hardness_code != 0

    @property
    def needs_counts(self) -> bool:
        """Whether the loss needs each row's number of terms (and sum of logits)."""
        return self.debias > 0 or self.label_smoothing > 0

    @property
    def n_blocks(self) -> int:
        """How many softmaxes a row has."""
        return len(self.directions) if self.partition_mode == "per_direction" else 1

    def config(self) -> dict:
        return {
            "directions": list(self.directions),
            "partition_mode": self.partition_mode,
            "hardness_mode": self.hardness_mode,
            "hardness_strength": float(self.hardness_strength),
            "false_negative_margin": self.false_negative_margin,
            "debias": float(self.debias),
            "label_smoothing": float(self.label_smoothing),
        }


def _check_number(name: str, value: object, *, low: float | None = None, below=None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{name} must be < {below}, got {value}")


def make_objective(
    *,
    symmetric: bool = False,
    directions: tuple[str, ...] | list[str] | None = None,
    partition_mode: str | None = None,
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    false_negative_margin: float | None = None,
    debias: float = 0.0,
    label_smoothing: float = 0.0,
) -> Objective:
    """The Objective of the public arguments; ``symmetric=True`` is ``directions=(query_to_doc,
    doc_to_query), partition_mode="per_direction"`` and refuses other directions."""
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if symmetric:
        wanted = (QUERY_TO_DOC, DOC_TO_QUERY)
        if directions is not None and set(directions) != set(wanted):
            raise ValueError(
                f"symmetric=True means directions={wanted}; got directions={tuple(directions)}"
            )
        if partition_mode not in (None, "per_direction"):
            raise ValueError(
                "symmetric=True averages both directions (partition_mode='per_direction'); "
                f"got partition_mode={partition_mode!r}"
            )
        directions, partition_mode = wanted, "per_direction"
    return Objective(
        directions=directions if directions is not None else (QUERY_TO_DOC,),
        partition_mode=partition_mode or "joint",
        hardness_mode=hardness_mode,
        hardness_strength=hardness_strength,
        false_negative_margin=false_negative_margin,
        debias=debias,
        label_smoothing=label_smoothing,
    )
