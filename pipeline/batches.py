"""Tokenised training batches built from groups, under the token alignment contract.

Texts are tokenised once per stage; a micro-batch is a slice of the epoch's group order, so
``batch_at(epoch, index)`` is a pure function of seed, epoch and index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data.beir import BeirData
from data.collate import SpecialTokens, cross_inputs, encoder_inputs, tokenize
from data.groups import TrainGroups


@dataclass
class GroupBatch:
    """Q queries with G passages each, passage rows in group layout (positive first)."""

    queries: dict[str, torch.Tensor]  # encoder_inputs, Q rows
    passages: dict[str, torch.Tensor]  # encoder_inputs, Q * G rows
    pairs: dict[str, torch.Tensor]  # cross_inputs, Q * G rows: query q with each of its passages
    group_size: int

    def to(self, device) -> "GroupBatch":
        move = lambda inputs: {k: v.to(device) for k, v in inputs.items()}  # noqa: E731
        return GroupBatch(move(self.queries), move(self.passages), move(self.pairs), self.group_size)


class TokenizedText:
    """Token ids of every passage and of the split's queries, looked up by id."""

    def __init__(self, tokenizer, data: BeirData, query_ids: list[str], query_max_len: int, passage_max_len: int):
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.passages = dict(zip(data.corpus["_id"], tokenize(tokenizer, data.passage_texts(), passage_max_len)))
        self.queries = dict(zip(query_ids, tokenize(tokenizer, data.query_texts(query_ids), query_max_len)))


class GroupBatches:
    """``batch_at(epoch, index)``: micro-batch ``index`` of ``epoch`` (the last partial batch is dropped)."""

    def __init__(self, groups: TrainGroups, text: TokenizedText, batch_size: int, with_pairs: bool):
        if len(groups) < batch_size:
            raise ValueError(f"{len(groups)} training queries cannot fill one batch of {batch_size}")
        self.groups, self.text, self.batch_size, self.with_pairs = groups, text, batch_size, with_pairs
        self.per_epoch = len(groups) // batch_size

    def batch_at(self, epoch: int, index: int) -> GroupBatch:
        order = self.groups.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        groups = [self.groups.group(epoch, int(i)) for i in order]
        q_ids = [self.text.queries[g.query_id] for g in groups]
        p_ids = [self.text.passages[p] for g in groups for p in g.passage_ids]
        pair_q = [q for q in q_ids for _ in range(self.groups.group_size)]
        return GroupBatch(
            queries=encoder_inputs(q_ids, self.text.special),
            passages=encoder_inputs(p_ids, self.text.special),
            pairs=cross_inputs(pair_q, p_ids, self.text.special) if self.with_pairs else {},
            group_size=self.groups.group_size,
        )


class PassageBatches:
    """Corpus passages in a seeded order per epoch, for post-training (MLM, SimCSE, Mirror-BERT)."""

    def __init__(self, text: TokenizedText, batch_size: int, seed: int):
        self.ids = [ids for ids in text.passages.values() if ids]
        self.special, self.batch_size, self.seed = text.special, batch_size, seed
        self.per_epoch = len(self.ids) // batch_size
        if self.per_epoch < 1:
            raise ValueError(f"{len(self.ids)} passages cannot fill one batch of {batch_size}")

    def batch_at(self, epoch: int, index: int) -> tuple[dict[str, torch.Tensor], int]:
        """(encoder inputs, a seed for this batch's masking)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
        rows = order[index * self.batch_size : (index + 1) * self.batch_size]
        return encoder_inputs([self.ids[i] for i in rows], self.special), int(np.random.default_rng([self.seed, epoch, index]).integers(2**31))
