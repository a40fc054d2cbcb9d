"""Dynamic hard-negative mining during training (Conan-embedding, arXiv 2408.15710; design
notes section 5).

Every ``every`` steps the trainer calls :meth:`DynamicMiner.run`: each example's current hard
negatives are re-scored with the current model, and a negative whose score ``s`` has fallen
past the rule

    s * score_ratio < initial_score   and   |s| < max_abs_score        (1.15 and 0.8)

is no longer hard: it is replaced by the next candidate of its example's ranked list (written
by ``retriever mine``). A replacement's initial score is its score when it comes in.

Which candidates: replacements are the example's next candidates in rank order, from rank
``range_min`` of its list on, skipping every document it has already used as a negative (none
is used twice). So the i-th replacement of a full set of n negatives takes ranks
``(i-1)*n + range_min .. i*n + range_min`` of the list without its initial negatives (Conan's
rule; with ``--sampling top`` the initial negatives are ranks ``range_min .. range_min + n``, so
the first replacement is ranks ``range_min + n .. range_min + 2n`` of the full list); replacing
fewer than n takes the next ones in the same order. When the list runs out, the stale negative
stays and is counted as ``exhausted``.

With ``refresh_every``, the ranked lists themselves are renewed: the corpus is re-encoded and
searched with the current model and the miner's filters (positives, margins), and the next
replacement starts again at ``range_min`` of the new list.

Across processes each rank re-scores every ``world_size``-th example, the changes are
exchanged with ``all_gather_object``, and every rank applies all of them, so the training sets
stay identical. The state (current negatives, initial scores, positions in the lists) is saved
in checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from retriever.mining.example_states import ExampleState, read_mining_config, read_states
from retriever.mining.files import load_corpus, read_candidate_corpus
from retriever.mining.miner import Corpus, MiningConfig, MiningQuery

logger = logging.getLogger(__name__)


def _setting(default: Any, help: str, **bounds: float) -> Any:
    return field(default=default, metadata={"help": help, "choices": None, **bounds})


@dataclass
class DynamicMiningConfig:
    """The settings of re-mining during training: the one declaration of them (training's
    ``mining`` section is these plus whether to re-mine and which corpus a refresh searches).
    ``help`` and the bounds (``min``: inclusive, ``gt``: exclusive) are field metadata."""

    remine_every: int = _setting(
        100, "Re-score every example's hard negatives with the current model every N steps.", min=1
    )
    score_ratio: float = _setting(
        1.15,
        "A negative is no longer hard when score * score_ratio < its initial score and "
        "|score| < max_abs_score; it is replaced by the next candidate of its ranked list.",
        gt=0,
    )
    max_abs_score: float = _setting(
        0.8, "See score_ratio: a negative with |score| >= this stays (it is still hard).", gt=0
    )
    refresh_every: int | None = _setting(
        None,
        "Every N steps also renew the ranked lists: re-encode mining.corpus and search it "
        "with the current model; null: never.",
        min=1,
    )
    batch_size: int = _setting(256, "Texts per forward pass when re-scoring negatives.", min=1)


def stale_negatives(
    scores: np.ndarray, initial_scores: np.ndarray, score_ratio: float, max_abs_score: float
) -> np.ndarray:
    """Which negatives are no longer hard: ``score * ratio < initial and |score| < max``."""
    return (scores * score_ratio < initial_scores) & (np.abs(scores) < max_abs_score)


class _Plan(NamedTuple):
    """One example's replacements in a pass: the slots of its stale negatives that get one,
    the candidates they get, the current scores of its negatives and its new cursor."""

    index: int
    slots: list[int]
    found: list[str]
    scores: list[float]
    cursor: int


class DynamicMiner:
    """Keeps a training set's hard negatives hard; see the module docstring.

    Build it with :meth:`from_mined_file`.
    """

    def __init__(
        self,
        train_set: Any,
        states: list[ExampleState],
        texts: dict[str, str],
        config: DynamicMiningConfig,
        mining: MiningConfig,
        queries: list[MiningQuery],
        refresh_corpus: Corpus | None = None,
    ) -> None:
        if len(states) != len(train_set.examples):
            raise ValueError(f"{len(states)} states for {len(train_set.examples)} examples")
        self.train_set = train_set
        self.states = states
        self.texts = texts
        self.config = config
        self.mining = mining
        self.queries = queries
        self.refresh_corpus = refresh_corpus
        self.passes = 0

    # -- construction

    @classmethod
    def from_mined_file(
        cls,
        path: str | os.PathLike,
        train_set: Any,
        config: DynamicMiningConfig | None = None,
        *,
        corpus: str | os.PathLike | None = None,
    ) -> DynamicMiner:
        """Read ``path`` (written by ``retriever mine``; its ``.corpus.jsonl`` and
        ``.meta.json`` beside it) for the examples of ``train_set``, which were read from the
        same file. ``corpus`` is searched by refreshes (default: the ``.corpus.jsonl``)."""
        config = config or DynamicMiningConfig()
        mining = read_mining_config(path)
        candidate_corpus = read_candidate_corpus(path)
        texts = dict(zip(candidate_corpus.ids, candidate_corpus.texts))
        refresh_corpus = None
        if config.refresh_every:
            refresh_corpus = load_corpus(corpus) if corpus else candidate_corpus
            texts.update(zip(refresh_corpus.ids, refresh_corpus.texts))
        states, queries = read_states(path, train_set.examples, texts, mining.range_min)
        return cls(train_set, states, texts, config, mining, queries, refresh_corpus)

    # -- the trainer's calls

    def due(self, step: int) -> bool:
        """Whether step ``step`` (1-based, just finished) ends with a re-mining pass."""
        return step % self.config.remine_every == 0 or self._refresh_due(step)

    def _refresh_due(self, step: int) -> bool:
        return bool(self.config.refresh_every) and step % self.config.refresh_every == 0

    def run(self, encoder: Any, step: int, *, rank: int = 0, world_size: int = 1) -> dict:
        """One pass over this rank's share of the examples; changes are exchanged and applied
        on every rank. Returns the logged record (fractions, mean scores, seconds)."""
        start = time.perf_counter()
        refresh = self._refresh_due(step)
        update = self.compute(encoder, range(rank, len(self.states), world_size), refresh)
        if world_size > 1:
            import torch.distributed as dist

            parts: list[Any] = [None] * world_size
            dist.all_gather_object(parts, update)
            update = _merge(parts)
        self.apply(update)
        self.passes += 1
        stats = update["stats"]
        n_negatives = max(stats["negatives"], 1)
        return {
            "step": step,
            "examples": stats["examples"],
            "fraction_remined": stats["examples_remined"] / max(stats["examples"], 1),
            "fraction_negatives_replaced": stats["replaced"] / n_negatives,
            "negatives_replaced": stats["replaced"],
            "exhausted": stats["exhausted"],
            "mean_negative_score_before": stats["score_before"] / n_negatives,
            "mean_negative_score_after": stats["score_after"] / n_negatives,
            "refreshed": refresh,
            "initialised": stats["initialised"],
            "seconds": time.perf_counter() - start,
        }

    @staticmethod
    def describe(record: dict) -> str:
        return (
            f"re-mined at step {record['step']}: {100 * record['fraction_remined']:.1f}% of "
            f"{record['examples']} examples ({record['negatives_replaced']} negatives replaced, "
            f"{record['exhausted']} left for lack of candidates), mean negative score "
            f"{record['mean_negative_score_before']:.4f} -> "
            f"{record['mean_negative_score_after']:.4f}"
            f"{', lists refreshed' if record['refreshed'] else ''} in {record['seconds']:.1f}s"
        )

    # -- the work

    def _encode(self, encoder: Any, texts: list[str], side: str) -> np.ndarray:
        vectors = encoder.encode(
            texts, side, batch_size=self.config.batch_size, show_progress=False
        )
        return np.asarray(vectors, dtype=np.float64)

    def _score(self, encoder: Any, query_vectors: np.ndarray, ids: list[list[str]]) -> list:
        """Scores of each row's ids against that row's query vector (each text encoded once)."""
        unique = list(dict.fromkeys(i for row in ids for i in row))
        if not unique:
            return [np.zeros(0) for _ in ids]
        vectors = self._encode(encoder, [self.texts[i] for i in unique], "document")
        where = {doc_id: n for n, doc_id in enumerate(unique)}
        return [
            vectors[[where[i] for i in row]] @ query_vectors[r] if row else np.zeros(0)
            for r, row in enumerate(ids)
        ]

    def compute(self, encoder: Any, indices: Sequence[int], refresh: bool = False) -> dict:
        """The changes one pass makes to the examples ``indices`` (nothing is applied)."""
        indices = list(indices)
        states = self._pass_states(encoder, indices, refresh)
        stats = _empty_stats(len(indices))
        if not indices:
            return {"changes": [], "stats": stats}
        query_vectors = self._encode(
            encoder, [self.train_set.examples[i].query for i in indices], "query"
        )
        current = self._score(encoder, query_vectors, [states[i].negatives for i in indices])
        plans = [self._plan(i, states[i], scores, stats) for i, scores in zip(indices, current)]
        added = self._score(encoder, query_vectors, [plan.found for plan in plans])
        changes = [
            _change(states[plan.index], plan, scores, refresh, stats)
            for plan, scores in zip(plans, added)
        ]
        return {"changes": changes, "stats": stats}

    def _pass_states(
        self, encoder: Any, indices: list[int], refresh: bool
    ) -> dict[int, ExampleState]:
        """The states of ``indices`` that a pass starts from: with ``refresh``, copies with the
        new ranked lists (apply() makes the change)."""
        states = {i: self.states[i] for i in indices}
        new_lists = self._refresh(encoder, indices) if refresh else {}
        if new_lists:
            states = {
                i: dataclasses.replace(s, candidates=new_lists[i], cursor=self.mining.range_min)
                for i, s in states.items()
            }
        return states

    def _plan(self, i: int, state: ExampleState, scores: np.ndarray, stats: dict) -> _Plan:
        """Which of example ``i``'s negatives (now scoring ``scores``) are stale, and the
        candidates that replace them; counted in ``stats``."""
        stats["negatives"] += len(scores)
        stats["score_before"] += float(scores.sum())
        if state.initial_scores is None:  # the file had no scores: these are the baseline
            stats["initialised"] += 1
            return _Plan(i, [], [], scores.tolist(), state.cursor)
        stale = stale_negatives(
            scores,
            np.asarray(state.initial_scores, dtype=np.float64),
            self.config.score_ratio,
            self.config.max_abs_score,
        )
        slots = np.flatnonzero(stale).tolist()
        found, cursor = state.next_candidates(len(slots))
        stats["exhausted"] += len(slots) - len(found)
        return _Plan(i, slots[: len(found)], found, scores.tolist(), cursor)

    def _refresh(self, encoder: Any, indices: list[int]) -> dict[int, list[str]]:
        """New ranked lists for ``indices``: the refresh corpus searched with this model."""
        from retriever.eval.search import IndexConfig
        from retriever.mining.miner import mine

        assert self.refresh_corpus is not None
        corpus = self.refresh_corpus
        device = getattr(encoder, "device", None)
        kind = "torch" if getattr(device, "type", "cpu") == "cuda" else "flat"
        mined = mine(
            encoder,
            [self.queries[i] for i in indices],
            corpus,
            self.mining,
            index=IndexConfig(kind=kind),
            batch_size=self.config.batch_size,
            show_progress=False,
        )
        return {indices[m.index]: [corpus.ids[p] for p in m.candidates] for m in mined}

    def apply(self, update: dict) -> None:
        """Apply :meth:`compute`'s changes to the states and the training set's examples."""
        for change in update["changes"]:
            i = change["index"]
            state = self.states[i]
            state.negatives = list(change["negatives"])
            state.initial_scores = list(change["initial_scores"])
            state.used.extend(change["used_added"])
            state.cursor = change["cursor"]
            if change["candidates"] is not None:
                state.candidates = list(change["candidates"])
            self._sync_example(i)

    def _sync_example(self, i: int) -> None:
        self.train_set.set_negatives(i, [self.texts[d] for d in self.states[i].negatives])

    # -- checkpoints (Accelerate's register_for_checkpointing)

    def state_dict(self) -> dict[str, Any]:
        return {"passes": self.passes, "states": [dataclasses.asdict(s) for s in self.states]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["states"]) != len(self.states):
            raise ValueError(
                f"the checkpoint's dynamic-mining state has {len(state['states'])} examples, "
                f"the training set {len(self.states)}"
            )
        self.passes = state["passes"]
        self.states = [ExampleState(**s) for s in state["states"]]
        missing = {d for s in self.states for d in (*s.negatives, *s.candidates)} - set(self.texts)
        if missing:
            raise ValueError(
                f"the checkpoint's dynamic-mining state names {len(missing)} documents the "
                f"corpus does not have (e.g. {sorted(missing)[:3]}); was mining.corpus changed?"
            )
        for i in range(len(self.states)):
            self._sync_example(i)


# What a pass counts; _merge sums them over the ranks and run() reports them.
_PASS_COUNTS = (
    "examples",
    "examples_remined",
    "negatives",
    "replaced",
    "exhausted",
    "initialised",
    "score_before",
    "score_after",
)


def _empty_stats(examples: int) -> dict[str, Any]:
    stats = dict.fromkeys(_PASS_COUNTS, 0)
    stats["examples"] = examples
    return stats


def _change(
    state: ExampleState, plan: _Plan, added: np.ndarray, refresh: bool, stats: dict
) -> dict[str, Any]:
    """What ``plan`` makes of ``state`` (``added``: its replacements' scores, which become
    their initial scores), as :meth:`DynamicMiner.apply` takes it; counted in ``stats``."""
    negatives = list(state.negatives)
    initial = list(state.initial_scores) if state.initial_scores is not None else plan.scores
    after = list(plan.scores)
    for slot, doc_id, score in zip(plan.slots, plan.found, added.tolist()):
        negatives[slot], initial[slot], after[slot] = doc_id, score, score
    stats["score_after"] += sum(after)
    stats["replaced"] += len(plan.found)
    stats["examples_remined"] += bool(plan.found)
    return {
        "index": plan.index,
        "negatives": negatives,
        "initial_scores": initial,
        "used_added": plan.found,
        "cursor": plan.cursor,
        "candidates": state.candidates if refresh else None,
    }


def _merge(parts: list[dict]) -> dict:
    stats = dict.fromkeys(parts[0]["stats"], 0)
    for part in parts:
        for key, value in part["stats"].items():
            stats[key] += value
    return {"changes": [c for part in parts for c in part["changes"]], "stats": stats}


__all__ = ["DynamicMiner", "DynamicMiningConfig", "ExampleState", "stale_negatives"]
