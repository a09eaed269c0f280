"""Token alignment contract shared by the dual-encoder, ColBERT and the cross-encoder.

Queries and passages are tokenised once, without special tokens, and truncated to
``query_max_len`` / ``passage_max_len``. Every model input is then built from those ids:

- dual-encoder / ColBERT: ``[CLS] q [SEP]`` and ``[CLS] p [SEP]``; query token i sits at
  position ``1 + i``, passage token j at ``1 + j``;
- cross-encoder: ``[CLS] q [SEP] p [SEP]``; query token i at ``1 + i``, passage token j at
  ``2 + n_q + j`` where ``n_q`` is that query's own length.

The attention-map loss relies on these positions, so nothing else may re-tokenise text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SpecialTokens:
    """The three ids the contract needs (``cls``/``sep`` are ``<s>``/``</s>`` for RoBERTa-like models)."""

    cls: int
    sep: int
    pad: int

    @classmethod
    def from_tokenizer(cls_, tokenizer) -> "SpecialTokens":
        ids = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
        if any(i is None for i in ids):
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} lacks a cls, sep or pad token (got {ids})"
            )
        return cls_(*ids)


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of each text without special tokens, truncated to ``max_len``.

    >>> from data.demo import train_tokenizer
    >>> tok = train_tokenizer(["alpha beta gamma"], vocab_size=60)
    >>> [len(ids) for ids in tokenize(tok, ["alpha beta gamma", "alpha"], max_len=2)]
    [2, 1]
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    encoded = tokenizer(
        list(texts), add_special_tokens=False, truncation=True, max_length=max_len
    )
    return encoded["input_ids"]


def encoder_inputs(ids: Sequence[Sequence[int]], special: SpecialTokens) -> dict[str, torch.Tensor]:
    """``[CLS] x [SEP]`` per row, right-padded to the longest row of the batch.

    Returns ``input_ids``, ``attention_mask`` and ``token_type_ids`` of shape (B, 2 + max_len) and
    ``lengths`` (B,), the number of content tokens per row.

    >>> batch = encoder_inputs([[7, 8, 9], [5]], SpecialTokens(cls=1, sep=2, pad=0))
    >>> batch["input_ids"].tolist()
    [[1, 7, 8, 9, 2], [1, 5, 2, 0, 0]]
    >>> batch["lengths"].tolist()
    [3, 1]
    """
    width = 2 + max((len(row) for row in ids), default=0)
    input_ids = torch.full((len(ids), width), special.pad, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
    for b, row in enumerate(ids):
        n = len(row)
        input_ids[b, 0] = special.cls
        input_ids[b, 1 : 1 + n] = torch.as_tensor(row, dtype=torch.long)
        input_ids[b, 1 + n] = special.sep
        attention_mask[b, : 2 + n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "lengths": torch.as_tensor([len(row) for row in ids], dtype=torch.long),
    }


def cross_inputs(
    query_ids: Sequence[Sequence[int]],
    passage_ids: Sequence[Sequence[int]],
    special: SpecialTokens,
) -> dict[str, torch.Tensor]:
    """``[CLS] q [SEP] p [SEP]`` per (query, passage) pair, right-padded.

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` (1 on ``p [SEP]``), all (B, T), and
    ``query_lengths`` / ``passage_lengths`` (B,). Passage token j of row b is at position
    ``2 + query_lengths[b] + j``.

    >>> batch = cross_inputs([[7, 8], [9]], [[5], [6, 6]], SpecialTokens(cls=1, sep=2, pad=0))
    >>> batch["input_ids"].tolist()
    [[1, 7, 8, 2, 5, 2], [1, 9, 2, 6, 6, 2]]
    >>> batch["token_type_ids"].tolist()
    [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]
    """
    if len(query_ids) != len(passage_ids):
        raise ValueError(f"{len(query_ids)} queries but {len(passage_ids)} passages")
    width = 3 + max((len(q) + len(p) for q, p in zip(query_ids, passage_ids)), default=0)
    input_ids = torch.full((len(query_ids), width), special.pad, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros_like(input_ids)
    token_type_ids = torch.zeros_like(input_ids)
    for b, (q, p) in enumerate(zip(query_ids, passage_ids)):
        nq, np_ = len(q), len(p)
        input_ids[b, 0] = special.cls
        input_ids[b, 1 : 1 + nq] = torch.as_tensor(q, dtype=torch.long)
        input_ids[b, 1 + nq] = special.sep
        input_ids[b, 2 + nq : 2 + nq + np_] = torch.as_tensor(p, dtype=torch.long)
        input_ids[b, 2 + nq + np_] = special.sep
        attention_mask[b, : 3 + nq + np_] = 1
        token_type_ids[b, 2 + nq : 3 + nq + np_] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "query_lengths": torch.as_tensor([len(q) for q in query_ids], dtype=torch.long),
        "passage_lengths": torch.as_tensor([len(p) for p in passage_ids], dtype=torch.long),
    }
