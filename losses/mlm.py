"""Masked-language-model objective: BERT's token masking and its cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    vocab_size: int,
    mask_token_id: int,
    generator: torch.Generator,
    mlm_probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick ``mlm_probability`` of the tokens; of those 80% -> [MASK], 10% -> a
    random token, 10% unchanged.

    Args:
        input_ids: (B, T) token ids.
        special_mask: (B, T) bool, True on special and padding tokens, which are never picked.
        vocab_size: random replacements are drawn uniformly from ``[0, vocab_size)``.
        mask_token_id: id of [MASK].
        generator: torch.Generator on ``input_ids``' device; the same seed gives the same masks.
        mlm_probability, mask_fraction, random_fraction: the 15% / 80% / 10% rates.

    Returns:
        masked_input_ids: (B, T), a new tensor.
        labels: (B, T), the original id at picked positions and -100 elsewhere.

    Reference: Devlin et al., "BERT", NAACL 2019, section 3.1.

    >>> ids = torch.tensor([[101, 7, 8, 9, 102]])
    >>> special = torch.tensor([[True, False, False, False, True]])
    >>> gen = torch.Generator().manual_seed(0)
    >>> masked, labels = mask_tokens(ids, special, 30, 103, gen, mlm_probability=1, mask_fraction=1)
    >>> masked, labels
    (tensor([[101, 103, 103, 103, 102]]), tensor([[-100,    7,    8,    9, -100]]))
    """
    shape, device = input_ids.shape, input_ids.device
    pick_draw = torch.rand(shape, generator=generator, device=device)  # (B, T)
    picked = (pick_draw < mlm_probability) & ~special_mask.bool()  # (B, T)
    labels = input_ids.masked_fill(~picked, IGNORE_INDEX)  # (B, T)

    # one draw splits the picked tokens into [MASK] / random / unchanged
    action = torch.rand(shape, generator=generator, device=device)  # (B, T)
    to_mask = picked & (action < mask_fraction)
    to_random = picked & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=device)
    masked = input_ids.masked_fill(to_mask, mask_token_id)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the picked tokens (labels != -100).

    ``L = -1/|M| sum_{(b, t) in M} log softmax(logits_bt)[labels_bt]``; 0 when nothing is picked.

    Args:
        logits: (..., V) MLM head outputs: (B, T, V) at every position, or (M, V) at picked ones.
        labels: (...) long, target ids at picked positions, -100 elsewhere.

    Returns:
        scalar loss.

    >>> logits = torch.zeros(1, 2, 4)
    >>> mlm_loss(logits, torch.tensor([[2, -100]]))  # uniform over 4: log 4
    tensor(1.3863)
    """
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)
