"""Unsupervised InfoNCE between two views of the same texts (SimCSE, Mirror-BERT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def infonce_loss(
    reps_1: torch.Tensor,
    reps_2: torch.Tensor,
    tau: float = 0.05,
    symmetric: bool = False,
) -> torch.Tensor:
    """InfoNCE with in-batch negatives and cosine similarity.

    ``L = -1/B sum_b log( exp(cos(h_b^1, h_b^2) / tau) / sum_k exp(cos(h_b^1, h_k^2) / tau) )``

    The positive of text b is its other view; the other texts' second views are its negatives.
    ``symmetric`` averages this with the same loss with the views swapped.

    Args:
        reps_1: (B, D) pooled vectors, view 1 (dropout).
        reps_2: (B, D) pooled vectors, view 2 (dropout, plus a masked span for Mirror-BERT).
        tau: temperature: 0.05 SimCSE; 0.04 Mirror-BERT sentences, 0.2 Mirror-BERT words.
        symmetric: also contrast view 2 against view 1.

    Returns:
        scalar loss.

    Reference: Gao et al., "SimCSE", EMNLP 2021; Liu et al., "Fast, Effective, and
    Self-Supervised: Mirror-BERT", EMNLP 2021.

    >>> reps = torch.eye(3)
    >>> round(infonce_loss(reps, reps, tau=1.0).item(), 4)  # -log(e / (e + 2))
    0.5514
    """
    sims = F.normalize(reps_1, dim=-1) @ F.normalize(reps_2, dim=-1).T / tau  # (B, B)
    labels = torch.arange(sims.shape[0], device=sims.device)  # (B,)
    loss = F.cross_entropy(sims, labels)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(sims.T, labels))
    return loss
