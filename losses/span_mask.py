"""Mirror-BERT's random span masking, the input augmentation of its second view."""

from __future__ import annotations

import torch


def mask_random_span(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator,
    span_length: int = 5,
) -> torch.Tensor:
    """Replace ``min(span_length, n)`` consecutive real tokens of each row by [MASK].

    ``n`` is the row's number of real tokens (not special, not padding); the span's start is drawn
    uniformly among the ``n - k + 1`` positions where a span of length ``k = min(span_length, n)``
    fits. Real tokens are counted in order, so the span skips no real token.

    Args:
        input_ids: (B, T) token ids.
        special_mask: (B, T) bool, True on special and padding tokens, which are never replaced.
        mask_token_id: id of [MASK].
        generator: torch.Generator on ``input_ids``' device; the same seed gives the same spans.
        span_length: k, 5 in Mirror-BERT.

    Returns:
        (B, T) a new tensor of ids.

    Reference: Liu et al., "Mirror-BERT", EMNLP 2021, section 2.

    >>> ids = torch.tensor([[101, 7, 8, 102, 0]])
    >>> special = torch.tensor([[True, False, False, True, True]])
    >>> mask_random_span(ids, special, 103, torch.Generator().manual_seed(0))
    tensor([[101, 103, 103, 102,   0]])
    """
    real = ~special_mask.bool()  # (B, T)
    rank = real.cumsum(dim=-1) - 1  # (B, T) index of each real token among its row's real tokens
    n_real = real.sum(dim=-1, keepdim=True)  # (B, 1)
    span = n_real.clamp_max(span_length)  # (B, 1)
    draw = torch.rand(n_real.shape, generator=generator, device=input_ids.device)  # (B, 1)
    start = (draw * (n_real - span + 1)).long().clamp_max(n_real - span)  # (B, 1)
    in_span = real & (rank >= start) & (rank < start + span)  # (B, T)
    return input_ids.masked_fill(in_span, mask_token_id)
