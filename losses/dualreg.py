"""DualReg: dropout-consistency regularisation of a dual-encoder's score distributions.

The batch is encoded twice with independent dropout (one forward over a duplicated batch),
giving views 1 and 2 of every query and passage.
"""

from __future__ import annotations

import torch

from losses.contrastive import candidate_scores
from losses.score_kl import kl_rows, masked_log_softmax


def symmetric_kl(
    scores_1: torch.Tensor,
    scores_2: torch.Tensor,
    tau: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric KL ``1/2 (KL(P_1 || P_2) + KL(P_2 || P_1))`` over each row, mean over rows.

    ``P_v = softmax(scores_v / tau)``; both sides receive gradients (R-Drop's convention,
    including the 1/2).

    Args:
        scores_1, scores_2: (Q, C) scores of the same candidates under two views.
        tau: temperature.
        mask: (Q, C) bool, True on valid candidates, or None.

    Returns:
        scalar loss, >= 0, zero when the views agree.

    Reference: Liang et al., "R-Drop: Regularized Dropout for Neural Networks", NeurIPS 2021.

    >>> symmetric_kl(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))  # (e - 1) / (e + 1)
    tensor(0.4621)
    """
    logp_1 = masked_log_softmax(scores_1 / tau, mask)  # (Q, C)
    logp_2 = masked_log_softmax(scores_2 / tau, mask)  # (Q, C)
    kl = kl_rows(logp_1, logp_2, mask) + kl_rows(logp_2, logp_1, mask)  # (Q,)
    return 0.5 * kl.mean()


def dualreg_loss(
    q_reps_1: torch.Tensor,
    q_reps_2: torch.Tensor,
    p_reps_1: torch.Tensor,
    p_reps_2: torch.Tensor,
    group_size: int,
    tau: float = 1.0,
    in_batch: bool = True,
) -> torch.Tensor:
    """Query-side plus passage-side dropout consistency of ``P(p | q)``.

    ``L = SKL(P(. | q^1, p^1) , P(. | q^2, p^1))  +  SKL(P(. | q^1, p^1) , P(. | q^1, p^2))``

    Query side: the same passages (view 1) ranked by the query's two views. Passage side: the
    same query (view 1) ranking the passages' two views. ``SKL`` is ``symmetric_kl``; the
    candidate lists are built by ``candidate_scores`` (own group, or every passage in the batch).

    Args:
        q_reps_1, q_reps_2: (Q, D) query vectors, two dropout views.
        p_reps_1, p_reps_2: (Q * G, D) passage vectors in group layout, two dropout views.
        group_size: G.
        tau: temperature of both distributions.
        in_batch: candidates are all batch passages (True) or each query's group only.

    Returns:
        scalar loss, >= 0, zero when the two views are identical.

    Reference: Lu et al., "ERNIE-Search", 2022 (DualReg).

    >>> q, p = torch.eye(2), torch.eye(2).repeat_interleave(2, dim=0)
    >>> dualreg_loss(q, q, p, p, group_size=2).item()
    0.0
    """
    s_11, _ = candidate_scores(q_reps_1, p_reps_1, group_size, in_batch)  # (Q, C)
    s_21, _ = candidate_scores(q_reps_2, p_reps_1, group_size, in_batch)  # (Q, C)
    s_12, _ = candidate_scores(q_reps_1, p_reps_2, group_size, in_batch)  # (Q, C)
    return symmetric_kl(s_11, s_21, tau) + symmetric_kl(s_11, s_12, tau)
