"""Listwise contrastive loss ``-log P(p+ | q)`` over each query's candidate list.

Group layout (Tevatron): passages arrive as (Q * G, D), query q's group is rows
``[q * G, (q + 1) * G)`` = ``[positive, neg_1, ..., neg_{G-1}]``, so the positive of query q is
row ``q * G``. With in-batch negatives every query scores every passage of the batch and its
label is ``q * G``, not ``q``: row ``q`` belongs to query ``q // G`` and is mostly a hard
negative, so labels of ``arange(Q)`` silently train queries toward hard negatives.
``positive_labels`` is the one place that knows this layout; use it for every scorer.

Across devices the passages of all processes are gathered (by the one distributed helper, never
here) in rank order; this process's passages then start at row ``rank * Q * G``, which is the
``label_offset`` to pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.scoring import dot


def positive_labels(
    num_queries: int,
    group_size: int,
    in_batch: bool,
    label_offset: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Column of each query's positive in its candidate scores, for any scorer (DE, Col, CE).

    Returns:
        (Q,) long: 0 for group-only scores (Q, G); ``label_offset + q * G`` for in-batch scores.

    >>> positive_labels(3, group_size=4, in_batch=True, label_offset=12)
    tensor([12, 16, 20])
    """
    if not in_batch:
        if label_offset:
            raise ValueError("label_offset only applies to in-batch candidates")
        return torch.zeros(num_queries, dtype=torch.long, device=device)
    return label_offset + torch.arange(num_queries, device=device) * group_size


def candidate_scores(
    q_reps: torch.Tensor,
    p_reps: torch.Tensor,
    group_size: int,
    in_batch: bool = False,
    label_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-encoder scores of each query's candidates and the column of its positive.

    Args:
        q_reps: (Q, D) query vectors.
        p_reps: group-only: (Q * G, D) this process's passages in group layout. In-batch: (N, D)
            any passage pool in which rows ``label_offset + q * G`` .. ``+ G - 1`` are query q's
            group, e.g. the local (Q * G, D) passages (offset 0) or those of all processes
            gathered in rank order (offset ``rank * Q * G``).
        group_size: G, passages per query (1 positive + G - 1 negatives).
        in_batch: score every passage of ``p_reps`` rather than the query's own group only.
        label_offset: row of this process's first passage in ``p_reps`` (in-batch only).

    Returns:
        scores: (Q, G) group-only or (Q, N) in-batch.
        labels: (Q,) long, the column of each query's positive: 0 group-only,
            ``label_offset + q * G`` in-batch.

    >>> q, p = torch.eye(2), torch.eye(2).repeat_interleave(2, dim=0)  # G = 2
    >>> candidate_scores(q, p, group_size=2, in_batch=True)[1]
    tensor([0, 2])
    """
    num_queries = q_reps.shape[0]
    labels = positive_labels(num_queries, group_size, in_batch, label_offset, q_reps.device)
    if in_batch:
        if p_reps.shape[0] < label_offset + num_queries * group_size:
            raise ValueError(
                f"{p_reps.shape[0]} passages cannot hold {num_queries} groups of {group_size} "
                f"from row {label_offset}"
            )
        return dot(q_reps, p_reps), labels  # (Q, N), (Q,)
    groups = p_reps.view(num_queries, group_size, -1)  # (Q, G, D)
    return torch.einsum("qd,qgd->qg", q_reps, groups), labels  # (Q, G), (Q,)


def contrastive_loss(scores: torch.Tensor, labels: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Mean over queries of ``-log softmax(scores / tau)[label]``.

    ``L = -1/Q sum_q log( exp(s(q, p+) / tau) / sum_{p in C(q)} exp(s(q, p) / tau) )``

    Args:
        scores: (Q, C) scores of each query's candidate list (any scorer: DE, Col, CE).
        labels: (Q,) long, the column of each query's positive (see ``candidate_scores``).
        tau: temperature.

    Returns:
        scalar loss.

    Reference: Karpukhin et al., "Dense Passage Retrieval", EMNLP 2020; van den Oord et al.,
    "Representation Learning with Contrastive Predictive Coding", 2018.

    >>> contrastive_loss(torch.zeros(2, 3), torch.tensor([0, 2]))  # uniform: log 3
    tensor(1.0986)
    """
    return F.cross_entropy(scores / tau, labels)
