"""`InfCLLoss`: the tiled InfoNCE as a drop-in sentence-transformers loss.

It follows the sentence-transformers loss contract (``forward(sentence_features, labels)``, the
model stored as ``self.model``, ``get_config_dict``, ``citation``), so it plugs into
``SentenceTransformerTrainer``, ``model.fit`` and wrappers such as ``MatryoshkaLoss``.

With ``mini_batch_size`` it is an embedding cache (GradCache, design notes section 4) built on
`retriever.loss.gradcache`, with the same contract as sentence-transformers'
``CachedMultipleNegativesRankingLoss``: ``forward`` embeds without gradients, computes the loss
and its gradient with respect to every embedding, and returns a detached loss whose backward
hook re-embeds each mini-batch with gradients.  The trainer calls ``loss.backward()`` itself, so
the re-embedding has to live in that hook.  ``calculate_loss`` and ``uses_gradient_cache`` are
the two names ``MatryoshkaLoss`` looks for on a gradient-caching loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retriever.loss.columns import column_rows, embed_columns_like_mnrl, feature_devices
from retriever.loss.functional import contrastive_loss
from retriever.loss.gradcache import backward_from_cached_grads, embed_without_grad
from retriever.loss.inputs import IMPLS
from retriever.loss.mini_batches import chunk_ends, plan_column, trim_padding
from retriever.loss.objective import DIRECTIONS, make_objective
from retriever.model.sdpa import attention_backends

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

# The mini-batch helpers' former names here, which the tests import.
_chunk_ends, _trim_padding = chunk_ends, trim_padding

SIMILARITIES = ("cosine", "dot")
LOSS_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

INFCL_CITATION = """
@misc{cheng2024breaking,
    title={Breaking the Memory Barrier: Near Infinite Batch Size Scaling for Contrastive Loss},
    author={Zesen Cheng and Hang Zhang and Kehan Li and Sicong Leng and Zhiqiang Hu and Fei Wu
            and Deli Zhao and Xin Li and Lidong Bing},
    year={2024},
    eprint={2410.17243},
    archivePrefix={arXiv},
    primaryClass={cs.CV}
}
"""
GTE_CITATION = """
@misc{li2023generaltextembeddingsmultistage,
    title={Towards General Text Embeddings with Multi-stage Contrastive Learning},
    author={Zehan Li and Xin Zhang and Yanzhao Zhang and Dingkun Long and Pengjun Xie
            and Meishan Zhang},
    year={2023},
    eprint={2308.03281},
    archivePrefix={arXiv},
    primaryClass={cs.CL}
}
"""
GRADCACHE_CITATION = """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""


class InfCLLoss(nn.Module):
    r"""InfoNCE with in-batch and hard negatives, computed tile by tile: a drop-in replacement for
    ``MultipleNegativesRankingLoss`` (and, with ``mini_batch_size``, for
    ``CachedMultipleNegativesRankingLoss``) whose memory does not grow with batch².

    For anchors :math:`a_i` and candidates :math:`c_j` (every positive, then every negative
    column), with :math:`\cos` the cosine similarity and :math:`s` the scale:

    .. math::
        L = \frac{1}{B} \sum_{i=1}^{B} \Big( \log \sum_{j} e^{s \cos(a_i, c_j)}
            - s \cos(a_i, p_i) \Big)

    ``symmetric=True`` averages it with the positive-to-anchor direction
    :math:`\frac{1}{B} \sum_i \big( \log \sum_k e^{s \cos(p_i, a_k)} - s \cos(p_i, a_i) \big)`,
    as ``MultipleNegativesSymmetricRankingLoss`` does (both directions from the same tiles).
    ``directions``, ``partition_mode``, ``hardness_mode`` and ``hardness_strength`` are
    sentence-transformers' (MultipleNegativesRankingLoss's), so a script swaps the class and
    nothing else: e.g. GTE's improved contrastive loss is all four directions, joint. The
    similarity matrix is never built: the loss keeps one logsumexp per row and recomputes the
    logits tile by tile in backward (fused Triton kernels on CUDA), so its extra memory is
    O(batch).

    Args:
        model: the SentenceTransformer to train.
        scale: s = 1 / temperature (20 is temperature 0.05, sentence-transformers' default).
        symmetric: also the positive-to-anchor direction; the loss is the average of both
            (``directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"``).
        directions: the terms of each anchor's softmax, from "query_to_doc" (required),
            "query_to_query", "doc_to_query", "doc_to_doc"; None: ("query_to_doc",). As
            sentence-transformers' MultipleNegativesRankingLoss.
        partition_mode: "joint" (one softmax over every direction's terms) or "per_direction"
            (query_to_doc and doc_to_query only, averaged). None: "joint".
        hardness_mode, hardness_strength: add ``hardness_strength * sg(cos)`` to the
            query_to_doc negatives of one class: "in_batch_negatives" (Lan et al. 2025, 9),
            "hard_negatives" (EmbeddingGemma, 5) or "all_negatives". As sentence-transformers.
        false_negative_margin: drop a negative whose similarity exceeds the positive's + margin
            (Qwen3-Embedding: 0.1); None: off.
        debias: tau+ of the debiased contrastive loss (Chuang et al. 2020); 0: off.
        label_smoothing: cross-entropy's label smoothing over each softmax's terms; 0: off.
        gather_across_devices: under ``torch.distributed``, compute the loss over the global
            batch of all processes with the ring loss (candidate blocks pass from rank to rank;
            nothing is all-gathered). Each process returns the mean over its own anchors, and the
            gradients are such that DDP's averaging gives the gradient of the global-batch loss.
        mini_batch_size: embed in mini-batches of this many texts and cache the gradients of the
            embeddings (GradCache): the batch is limited by the memory of its embeddings, not by
            activations. ``None`` embeds the whole batch with gradients, like MNRL.
        similarity: ``"cosine"`` (sentence-transformers' default ``cos_sim``) or ``"dot"``.
        sort_by_length: with ``mini_batch_size``, embed each column's texts longest first and trim
            each mini-batch's padding, so a mini-batch of short texts costs little. The result is
            the same loss; only which texts share a mini-batch changes (and hence, with dropout,
            which dropout masks they draw).
        loss_dtype: the dtype the embeddings enter the loss in (``torch.bfloat16`` halves the
            memory of the cached embeddings and doubles the loss's speed on GPU, at bfloat16
            precision). ``None`` keeps the model's output dtype. Logits, logsumexp and
            accumulation are float32 whatever this is.
        impl: the loss implementation (see :func:`retriever.loss.contrastive_loss`): ``"auto"``
            picks the fused Triton kernels on CUDA for large batches.
        cudnn_attention: let the model's SDPA attention use cuDNN while this loss embeds. Off by
            default: on H100-class GPUs cuDNN builds an execution plan for every new (mini-batch,
            length) shape, and trimmed mini-batches have many shapes
            (``retriever.model.sdpa``). The flash and memory-efficient kernels need no plan.

    Inputs: (anchor, positive) pairs or (anchor, positive, negative_1, ..., negative_n) tuples;
    no labels. Use ``BatchSamplers.NO_DUPLICATES`` so that no in-batch negative is a copy of an
    anchor's positive.

    Example::

        from datasets import Dataset
        from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
        from retriever.loss import InfCLLoss

        model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
        train_dataset = Dataset.from_dict({
            "anchor": ["It's nice weather outside today.", "He drove to work."],
            "positive": ["It's so sunny.", "He took the car to the office."],
        })
        loss = InfCLLoss(model, scale=20.0, mini_batch_size=256)
        trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
        trainer.train()

    Citation: Cheng et al., "Breaking the Memory Barrier: Near Infinite Batch Size Scaling for
    Contrastive Loss" (arXiv 2410.17243); with ``mini_batch_size`` also Gao et al., "Scaling Deep
    Contrastive Learning Batch Size under Memory Limited Setup" (arXiv 2101.06983). See
    :attr:`citation`.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        scale: float = 20.0,
        symmetric: bool = False,
        gather_across_devices: bool = False,
        mini_batch_size: int | None = None,
        similarity: str = "cosine",
        sort_by_length: bool = True,
        loss_dtype: torch.dtype | str | None = None,
        impl: str = "auto",
        cudnn_attention: bool = False,
        directions: tuple[str, ...] | None = None,
        partition_mode: str | None = None,
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        false_negative_margin: float | None = None,
        debias: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        for name, flag in (
            ("symmetric", symmetric),
            ("gather_across_devices", gather_across_devices),
            ("sort_by_length", sort_by_length),
            ("cudnn_attention", cudnn_attention),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if mini_batch_size is not None and (
            isinstance(mini_batch_size, bool)
            or not isinstance(mini_batch_size, int)
            or mini_batch_size < 1
        ):
            raise ValueError(
                f"mini_batch_size must be a positive int or None, got {mini_batch_size!r}"
            )
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.objective = make_objective(
            symmetric=symmetric,
            directions=directions,
            partition_mode=partition_mode,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
            false_negative_margin=false_negative_margin,
            debias=debias,
            label_smoothing=label_smoothing,
        )
        self.model = model
        self.scale = float(scale)
        self.symmetric = symmetric
        self.gather_across_devices = gather_across_devices
        self.mini_batch_size = mini_batch_size
        self.similarity = similarity
        self.sort_by_length = sort_by_length
        self.loss_dtype = _resolve_dtype(loss_dtype)
        self.impl = impl
        self.cudnn_attention = cudnn_attention
        # MatryoshkaLoss reads this (sentence_transformers' `uses_gradient_cache`): a caching loss
        # back-propagates from a hook, so Matryoshka wraps `calculate_loss` instead of the model.
        self.uses_gradient_cache = mini_batch_size is not None

    # -- the loss over embeddings -------------------------------------------------------------

    def _finish(self, embeddings: Tensor) -> Tensor:
        """Model output -> what enters the loss: normalised for cosine, cast to `loss_dtype`.

        Done per mini-batch before caching, so the cache holds the (smaller) loss inputs and the
        re-embedding backpropagates through the normalisation by itself.
        """
        if self.similarity == "cosine":
            embeddings = F.normalize(embeddings, p=2, dim=-1)
        if self.loss_dtype is not None:
            embeddings = embeddings.to(self.loss_dtype)
        return embeddings

    def _embed(self, features: dict[str, Any]) -> Tensor:
        # A copy: SentenceTransformer.forward adds its outputs (token embeddings) to the dict it
        # is given, and the cached mini-batches live until the replay, so the whole batch's token
        # embeddings would stay in memory.
        with attention_backends(cudnn=self.cudnn_attention):
            return self._finish(self.model(dict(features))["sentence_embedding"])

    def _group(self) -> Any:
        """The trainer's process group for the ring loss, or None for a single process."""
        if not self.gather_across_devices:
            return None
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    def compute_loss_from_embeddings(self, embeddings: list[Tensor]) -> Tensor:
        """The loss from per-column embeddings [anchor, positive, negative_1, ...], as returned
        by `_finish` (already normalised for cosine similarity)."""
        if len(embeddings) < 2:
            raise ValueError(
                f"InfCLLoss needs (anchor, positive[, negatives...]) columns, got {len(embeddings)}"
            )
        queries = embeddings[0]
        candidates = embeddings[1] if len(embeddings) == 2 else torch.cat(embeddings[1:])
        return contrastive_loss(
            queries,
            candidates,
            scale=self.scale,
            group=self._group(),
            impl=self.impl,
            **self.objective.config(),
        )

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """The loss from cached embeddings given as lists of mini-batch tensors (the contract of
        sentence-transformers' cached losses, which ``MatryoshkaLoss`` wraps): ``reps[0]`` holds
        the anchors, ``reps[1:]`` the candidates, in order (positives first).

        With `with_backward`, backpropagate into `reps` and return the detached loss.
        """
        anchors = reps[0][0] if len(reps[0]) == 1 else torch.cat(reps[0])
        candidates = [t for column in reps[1:] for t in column]
        loss = self.compute_loss_from_embeddings([anchors, *candidates])
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    # -- sentence-transformers entry point ----------------------------------------------------

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None
    ) -> Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(
                f"InfCLLoss needs (anchor, positive[, negatives...]) columns, got {len(features)}"
            )
        if self.mini_batch_size is None:
            with attention_backends(cudnn=self.cudnn_attention):
                embeddings = embed_columns_like_mnrl(self.model, features)
            return self.compute_loss_from_embeddings([self._finish(e) for e in embeddings])
        return self._forward_cached(features, labels)

    def _forward_cached(self, features: list[dict[str, Any]], labels: Tensor | None) -> Tensor:
        # Two leaves in batch order: the anchors, and every candidate column back to back (the
        # loss's candidate layout, so nothing is concatenated or sliced in the autograd graph).
        chunks, states, orders = [], [], []
        leaves: list[Tensor] = []
        for column, column_features in enumerate(features):
            column_chunks, order = self._plan(column_features, column)
            embedded, column_states = embed_without_grad(
                self._embed, column_chunks, feature_devices(column_features)
            )
            if not leaves:
                batch, dim = embedded.shape
                leaves = [
                    embedded.new_empty((batch, dim)),
                    embedded.new_empty((batch * (len(features) - 1), dim)),
                ]
            if embedded.shape[0] != batch:
                raise ValueError(
                    f"column {column} has {embedded.shape[0]} rows but column 0 has {batch}"
                )
            rows = column_rows(leaves, column, batch)
            if order is None:
                rows.copy_(embedded.detach())
            else:
                rows[order] = embedded.detach()  # sorted row k is the column's row order[k]
            del embedded
            chunks += column_chunks
            states += column_states
            orders.append(order)
        anchors, candidates = (leaf.requires_grad_() for leaf in leaves)
        reps = [[anchors], [candidates]]

        if not torch.is_grad_enabled():  # evaluation: nothing to cache
            return self.calculate_loss(reps, labels)

        # `self.calculate_loss`, not the method: MatryoshkaLoss replaces it on the instance.
        loss = self.calculate_loss(reps, labels, with_backward=True)
        if anchors.grad is None or candidates.grad is None:
            raise RuntimeError("the loss did not reach the embeddings: no gradient to cache")
        # The cached gradients in chunk order, the order the re-embedding produces rows in.
        grads = [anchors.grad, candidates.grad]
        del anchors, candidates, reps, leaves
        cached = grads[0].new_empty((batch * len(features), grads[0].shape[1]))
        for column, order in enumerate(orders):
            rows = column_rows(grads, column, batch)
            cached[column * batch : (column + 1) * batch] = rows if order is None else rows[order]
        del grads
        loss = loss.detach().requires_grad_()
        loss.register_hook(partial(self._replay, chunks=chunks, states=states, cached=[cached]))
        return loss

    def _replay(
        self, grad_output: Tensor, *, chunks: list[dict], states: list, cached: list[Tensor]
    ) -> None:
        """Backward hook: re-embed every mini-batch with gradients and backpropagate the cached
        embedding gradients, scaled by the incoming gradient (gradient accumulation, AMP loss
        scaling). Under DDP the all-reduce runs once, on the last mini-batch."""
        if not cached:
            raise RuntimeError(
                "InfCLLoss's backward ran twice on the same loss; the cached gradients are spent"
            )
        grads = cached.pop()
        grads.mul_(grad_output.to(grads.dtype))
        model = getattr(self.model, "_orig_mod", self.model)  # under torch.compile
        no_sync = model.no_sync if _is_ddp(model) else None
        with torch.enable_grad():
            backward_from_cached_grads(self._embed, chunks, states, grads, no_sync=no_sync)

    def _plan(self, features: dict[str, Any], column: int) -> tuple[list[dict], Tensor | None]:
        """One column's mini-batches and row order, as `plan_column` makes them."""
        return plan_column(features, column, self.mini_batch_size, self.sort_by_length)

    # -- sentence-transformers bookkeeping ----------------------------------------------------

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity": self.similarity,
            "symmetric": self.symmetric,
            "gather_across_devices": self.gather_across_devices,
            "mini_batch_size": self.mini_batch_size,
            "sort_by_length": self.sort_by_length,
            "loss_dtype": None if self.loss_dtype is None else str(self.loss_dtype),
            "impl": self.impl,
            "cudnn_attention": self.cudnn_attention,
            **self.objective.config(),
            "directions": self.directions,  # a tuple, as sentence-transformers reports it
        }

    @property
    def directions(self) -> tuple[str, ...]:
        return self.objective.directions

    @property
    def partition_mode(self) -> str:
        return self.objective.partition_mode

    @property
    def hardness_mode(self) -> str | None:
        return self.objective.hardness_mode

    @property
    def hardness_strength(self) -> float:
        return self.objective.hardness_strength

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        out = INFCL_CITATION
        if self.directions == DIRECTIONS and self.partition_mode == "joint":
            out += GTE_CITATION
        if self.mini_batch_size is not None:
            out += GRADCACHE_CITATION
        return out


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or dtype in LOSS_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in LOSS_DTYPES:
        return LOSS_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"loss_dtype must be None or one of {sorted(LOSS_DTYPES)}, got {dtype!r}")


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)
