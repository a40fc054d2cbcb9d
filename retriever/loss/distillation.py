"""Distillation from teacher scores over each query's own group (its positive and hard
negatives), beside the contrastive loss: never [Bq, Bd], only [Bq, 1 + n]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def distillation_loss(
    queries: Tensor,
    documents: Tensor,
    teacher_scores: Tensor,
    *,
    scale: float | Tensor,
    teacher_temperature: float = 1.0,
    group: object | None = None,
) -> Tensor:
    r"""KL divergence from the teacher's to the student's distribution over each query's group.

    .. math::
        L = \frac{1}{B_q} \sum_i \mathrm{KL}\Big(\mathrm{softmax}(t_i / T_t) \,\Big\|\,
            \mathrm{softmax}(s \langle q_i, d_{i,\cdot} \rangle)\Big)

    where query i's group is its positive and its n hard negatives, t_i [1 + n] the teacher's
    scores for them (a cross-encoder's, or the mined file's ``pos_scores`` / ``neg_scores``)
    and s the student's logit scale (1 / temperature), as FlagEmbedding and Tevatron distil.

    Args:
        queries: [Bq, D].
        documents: [(1 + n) Bq, D] in the trainer's layout: the positives, then every query's
            first negative, then every query's second, ...: query i's group is documents
            i, Bq + i, 2 Bq + i, ...
        teacher_scores: [Bq, 1 + n], in the group's order (the positive first).
        scale: the student's scale s (a learnable one gets its gradient).
        teacher_temperature: T_t.
        group: a torch.distributed group: the loss of the global batch, whose gradient for this
            rank's rows is W times the global loss's (the ring's convention); the value is the
            mean over this rank's queries.

    Returns:
        A 0-dim float32 tensor.
    """
    n_queries, width = queries.shape[0], teacher_scores.shape[1] if teacher_scores.dim() == 2 else 0
    if teacher_scores.shape != (n_queries, width) or documents.shape[0] != n_queries * width:
        raise ValueError(
            f"teacher_scores must be [Bq, 1 + n] and documents [(1 + n) Bq, D]: got "
            f"{tuple(teacher_scores.shape)} and {tuple(documents.shape)} for {n_queries} queries"
        )
    if not teacher_temperature > 0:
        raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature}")
    groups = documents.float().view(width, n_queries, -1).transpose(0, 1)  # [Bq, 1 + n, D]
    student = torch.einsum("qd,qkd->qk", queries.float(), groups) * scale
    teacher = teacher_scores.to(student.device, torch.float32) / teacher_temperature
    kl = (F.softmax(teacher, -1) * (F.log_softmax(teacher, -1) - F.log_softmax(student, -1))).sum(
        -1
    )
    value = kl.mean()
    if group is None:
        return value
    import torch.distributed as dist

    count = torch.tensor(float(n_queries), device=kl.device)
    dist.all_reduce(count, group=group)
    weighted = kl.sum() * dist.get_world_size(group) / count
    return value.detach() + weighted - weighted.detach()
