"""Interaction (attention-map) distillation from the cross-encoder into ColBERT token vectors.

The teacher block is the CE's attention at one layer with rows = query tokens and columns =
passage tokens (positions ``1 + i`` and ``2 + n_q + j`` under the token alignment contract of
``data/collate.py``), reduced over heads by ``reduce_heads``. Query token i and passage token j
are then row i / column j on both sides.
"""

from __future__ import annotations

import torch

from losses.score_kl import kl_rows, masked_log_softmax
from models.scoring import token_similarities


def reduce_heads(attn: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Reduce per-head attention probabilities to one map per pair.

    Args:
        attn: (B, H, Lq, Lp) attention probabilities.
        how: ``"mean"`` (average over heads) or ``"max"`` (strongest head per entry).

    Returns:
        (B, Lq, Lp); rows are re-normalised later, over real passage tokens, by ``attention_kl``.

    >>> reduce_heads(torch.tensor([[[[0.2]], [[0.6]]]]), "max")
    tensor([[[0.6000]]])
    """
    if how == "mean":
        return attn.mean(dim=1)
    if how == "max":
        return attn.amax(dim=1)
    raise ValueError(f"unknown head reduction {how!r}; expected 'mean' or 'max'")


def attention_kl(
    teacher_attn: torch.Tensor,
    q_tokens: torch.Tensor,
    q_mask: torch.Tensor,
    p_tokens: torch.Tensor,
    p_mask: torch.Tensor,
    tau_attn: float = 1.0,
    pair_mask: torch.Tensor | None = None,
    detach_teacher: bool = True,
) -> torch.Tensor:
    """Row-wise ``KL(teacher || student)`` between query-to-passage attention maps.

    ``A_t(j | i) = a_ij / sum_{j' real} a_ij'``   (teacher row, re-normalised over real columns)

    ``A_s(j | i) = softmax_{j real}(t_i^q . t_j^p / tau_attn)``

    ``L = mean_{pairs b} mean_{real query tokens i} KL(A_t(. | i) || A_s(. | i))``

    Padded tokens have no effect, whatever they hold. A query row whose teacher mass over the
    real passage tokens is 0 is skipped; a pair with no row left, or outside ``pair_mask``, is
    skipped; with nothing left the loss is 0 (and keeps the graph).

    Args:
        teacher_attn: (B, Lq, Lp) head-reduced CE attention block (see ``reduce_heads``).
        q_tokens: (B, Lq, D) ColBERT query token vectors; q_mask: (B, Lq) bool, True on real tokens.
        p_tokens: (B, Lp, D) ColBERT passage token vectors; p_mask: (B, Lp) bool.
        tau_attn: student temperature.
        pair_mask: (B,) bool, the pairs to distil (e.g. positives only); None means all.
        detach_teacher: stop gradients into the teacher (default).

    Returns:
        scalar loss, >= 0.

    Reference: Lu et al., "ERNIE-Search", 2022 (interaction distillation).

    >>> q, p = torch.eye(2).unsqueeze(0), torch.eye(2).unsqueeze(0)  # (1, 2, 2)
    >>> mask = torch.ones(1, 2, dtype=torch.bool)
    >>> teacher = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    >>> attention_kl(teacher, q, mask, p, mask)  # KL([.5, .5] || softmax([1, 0]))
    tensor(0.1201)
    """
    if detach_teacher:
        teacher_attn = teacher_attn.detach()
    q_mask, p_mask = q_mask.bool(), p_mask.bool()
    cols = p_mask.unsqueeze(1)  # (B, 1, Lp)
    teacher = torch.where(cols & q_mask.unsqueeze(-1), teacher_attn, 0.0)  # (B, Lq, Lp)
    mass = teacher.sum(dim=-1, keepdim=True)  # (B, Lq, 1)
    rows = q_mask & (mass.squeeze(-1) > 0)  # (B, Lq)
    finfo = torch.finfo(teacher.dtype)
    teacher = teacher / mass.clamp_min(finfo.tiny)  # (B, Lq, Lp)
    teacher_logp = torch.where(teacher > 0, teacher.clamp_min(finfo.tiny).log(), finfo.min)

    # zeroed padding keeps garbage (even inf) out of the softmax and out of the gradients
    q_tokens = q_tokens.masked_fill(~q_mask.unsqueeze(-1), 0.0)
    p_tokens = p_tokens.masked_fill(~p_mask.unsqueeze(-1), 0.0)
    sims = token_similarities(q_tokens, p_tokens) / tau_attn  # (B, Lq, Lp)
    student_logp = masked_log_softmax(sims, cols)  # (B, Lq, Lp)

    row_kl = kl_rows(teacher_logp, student_logp, cols).masked_fill(~rows, 0.0)  # (B, Lq)
    n_rows = rows.sum(dim=-1)  # (B,)
    pair_loss = row_kl.sum(dim=-1) / n_rows.clamp_min(1)  # (B,)
    pairs = n_rows > 0
    if pair_mask is not None:
        pairs = pairs & pair_mask.bool()
    return (pair_loss * pairs).sum() / pairs.sum().clamp_min(1)
