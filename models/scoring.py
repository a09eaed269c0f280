"""Relevance scores shared by the losses, evaluation and re-ranking.

Pure functions of tensors (PyLate ``scores/colbert.py`` style):

- ``dot``: dual-encoder score ``s_DE(q, p) = vec(q) . vec(p)``, all pairs;
- ``token_similarities``: ``t_i^q . t_j^p`` for aligned (query, passage) pairs;
- ``maxsim``: ColBERT late interaction ``s_Col(q, p) = sum_i max_j t_i^q . t_j^p``, all pairs;
- ``maxsim_paired``: the same for aligned pairs, as re-ranking needs.

Masks are bool, True on real tokens. Padded passage tokens never win the max, padded query tokens
contribute 0, and a passage with no real token scores 0.
"""

from __future__ import annotations

import torch


def dot(q_reps: torch.Tensor, p_reps: torch.Tensor) -> torch.Tensor:
    """All-pairs dot product ``s(q, p) = q . p``.

    Args:
        q_reps: (Q, D) query vectors.
        p_reps: (P, D) passage vectors.

    Returns:
        (Q, P) scores.

    >>> dot(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 3.0]]))
    tensor([[2.],
            [5.]])
    """
    return q_reps @ p_reps.T  # (Q, P)


def token_similarities(q_tokens: torch.Tensor, p_tokens: torch.Tensor) -> torch.Tensor:
    """Token-to-token dot products ``t_i^q . t_j^p`` of aligned (query, passage) pairs.

    Args:
        q_tokens: (B, Lq, D) query token vectors.
        p_tokens: (B, Lp, D) passage token vectors of the same pairs.

    Returns:
        (B, Lq, Lp) similarities; padding is not masked here.

    >>> token_similarities(torch.ones(1, 2, 3), torch.ones(1, 4, 3)).shape
    torch.Size([1, 2, 4])
    """
    return torch.einsum("bid,bjd->bij", q_tokens, p_tokens)  # (B, Lq, Lp)


def _masked_maxsim(sims: torch.Tensor, q_mask: torch.Tensor, p_mask: torch.Tensor) -> torch.Tensor:
    """Sum over real query tokens of the max over real passage tokens; ``sims`` is (..., Lq, Lp)."""
    sims = sims.masked_fill(~p_mask.unsqueeze(-2), torch.finfo(sims.dtype).min)
    best = sims.amax(dim=-1)  # (..., Lq)
    best = best.masked_fill(~(q_mask & p_mask.any(dim=-1, keepdim=True)), 0.0)
    return best.sum(dim=-1)  # (...)


def maxsim(
    q_tokens: torch.Tensor,
    q_mask: torch.Tensor,
    p_tokens: torch.Tensor,
    p_mask: torch.Tensor,
    chunk_size: int = 64,
) -> torch.Tensor:
    """ColBERT late-interaction scores of every query against every passage.

    ``s_Col(q, p) = sum_{i real in q} max_{j real in p} t_i^q . t_j^p``

    The (Q, P, Lq, Lp) similarity tensor is built ``chunk_size`` passages at a time, so peak memory
    is Q * chunk_size * Lq * Lp values. Gradients flow through every chunk.

    Args:
        q_tokens: (Q, Lq, D) query token vectors.
        q_mask: (Q, Lq) bool, True on real query tokens.
        p_tokens: (P, Lp, D) passage token vectors.
        p_mask: (P, Lp) bool, True on real passage tokens.
        chunk_size: passages scored per chunk.

    Returns:
        (Q, P) scores.

    Reference: Khattab & Zaharia, "ColBERT", SIGIR 2020.

    >>> q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])              # 1 query, 2 tokens
    >>> p = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [9.0, 9.0]]])  # last token is padding
    >>> maxsim(q, torch.tensor([[True, True]]), p, torch.tensor([[True, True, False]]))
    tensor([[1.5000]])
    """
    scores = []
    q_mask = q_mask.bool().unsqueeze(1)  # (Q, 1, Lq)
    for start in range(0, p_tokens.shape[0], chunk_size):
        p_chunk = p_tokens[start : start + chunk_size]  # (C, Lp, D)
        m_chunk = p_mask[start : start + chunk_size].bool().unsqueeze(0)  # (1, C, Lp)
        sims = torch.einsum("qid,pjd->qpij", q_tokens, p_chunk)  # (Q, C, Lq, Lp)
        scores.append(_masked_maxsim(sims, q_mask, m_chunk))  # (Q, C)
    if not scores:
        return q_tokens.new_zeros(q_tokens.shape[0], 0)
    return torch.cat(scores, dim=1)  # (Q, P)


def maxsim_paired(
    q_tokens: torch.Tensor,
    q_mask: torch.Tensor,
    p_tokens: torch.Tensor,
    p_mask: torch.Tensor,
) -> torch.Tensor:
    """ColBERT scores of aligned pairs: query row b against passage row b.

    Args:
        q_tokens: (B, Lq, D), q_mask: (B, Lq) bool.
        p_tokens: (B, Lp, D), p_mask: (B, Lp) bool.

    Returns:
        (B,) scores, equal to the diagonal of ``maxsim`` at O(B) rather than O(B^2) cost.

    >>> q = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    >>> p = torch.tensor([[[2.0, 0.0], [0.0, 5.0]], [[2.0, 0.0], [0.0, 5.0]]])
    >>> p_mask = torch.tensor([[True, True], [True, False]])
    >>> maxsim_paired(q, torch.ones(2, 1, dtype=torch.bool), p, p_mask)
    tensor([2., 0.])
    """
    sims = token_similarities(q_tokens, p_tokens)  # (B, Lq, Lp)
    return _masked_maxsim(sims, q_mask.bool(), p_mask.bool())  # (B,)
