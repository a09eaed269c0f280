"""Tokenised training batches built from groups, under the token alignment contract.

Texts are tokenised once per stage; a micro-batch is a slice of the epoch's group order, so
``batch_at(epoch, index)`` is a pure function of seed, epoch and index. Under N processes the
global batch (``batch_size`` groups, padded as one) is built the same way and each process keeps
its contiguous share of the rows: the global batch, its padding and the sample order do not
depend on N.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from data.beir import BeirData
from data.errors import InputError
from data.collate import SpecialTokens, cross_inputs, encoder_inputs, tokenize
from data.groups import TrainGroups
from pipeline.distributed import shard_slice


@dataclass
class GroupBatch:
    """Q queries with G passages each, passage rows in group layout (positive first)."""

    queries: dict[str, torch.Tensor]  # encoder_inputs, Q rows
    passages: dict[str, torch.Tensor]  # encoder_inputs, Q * G rows
    pairs: dict[str, torch.Tensor]  # cross_inputs, Q * G rows: query q with each of its passages
    group_size: int
    teacher_scores: torch.Tensor | None = None  # (Q, G) float32 cached teacher scores, NaN where unscored

    def to(self, device) -> "GroupBatch":
        move = lambda inputs: {k: v.to(device) for k, v in inputs.items()}  # noqa: E731
        teacher = None if self.teacher_scores is None else self.teacher_scores.to(device)
        return GroupBatch(move(self.queries), move(self.passages), move(self.pairs), self.group_size, teacher)

    def shard(self, rank: int, num_processes: int) -> "GroupBatch":
        """Process ``rank``'s groups: its queries and, in group layout, their passages and pairs."""
        if num_processes == 1:
            return self
        queries = shard_slice(len(self.queries["input_ids"]), rank, num_processes)
        groups = slice(queries.start * self.group_size, queries.stop * self.group_size)
        cut = lambda inputs, rows: {k: v[rows] for k, v in inputs.items()}  # noqa: E731
        teacher = None if self.teacher_scores is None else self.teacher_scores[queries]
        return GroupBatch(cut(self.queries, queries), cut(self.passages, groups), cut(self.pairs, groups),
                          self.group_size, teacher)


CHUNK = 20_000  # texts tokenised per tokenizer call


def compact_tokens(tokenizer, texts: Sequence[str], max_len: int) -> list[np.ndarray]:
    """Token ids of each text as an int32 array, tokenised ``CHUNK`` texts at a time.

    Millions of passages then take a few GB per process, not the tens that Python lists of ints would.
    """
    return [np.asarray(ids, dtype=np.int32) for start in range(0, len(texts), CHUNK)
            for ids in tokenize(tokenizer, texts[start : start + CHUNK], max_len)]


class LazyTokens(Mapping[str, np.ndarray]):
    """Token ids of texts by id, tokenised on first use and kept: only the texts read are ever tokenised.

    ``texts(rows)`` gives the texts at ``rows`` of ``ids``. ``many(keys)`` tokenises the missing ones
    together, ``CHUNK`` per tokenizer call; a single lookup tokenises one text.
    """

    def __init__(self, tokenizer, ids: Sequence[str], texts: Callable[[Sequence[int]], list[str]], max_len: int):
        self.row = {key: i for i, key in enumerate(ids)}
        self.tokenizer, self.texts, self.max_len = tokenizer, texts, max_len
        self.cache: dict[str, np.ndarray] = {}

    def many(self, keys: Sequence[str], keep: bool = True) -> list[np.ndarray]:
        """The token ids of ``keys``; ``keep=False`` does not cache what it tokenises (a stream)."""
        missing = [key for key in dict.fromkeys(keys) if key not in self.cache]
        fresh: dict[str, np.ndarray] = {}
        for start in range(0, len(missing), CHUNK):  # at most CHUNK texts held at once
            part = missing[start : start + CHUNK]
            texts = self.texts([self.row[key] for key in part])
            (self.cache if keep else fresh).update(zip(part, compact_tokens(self.tokenizer, texts, self.max_len)))
        return [self.cache[key] if key in self.cache else fresh[key] for key in keys]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.cache[key] if key in self.cache else self.many([key])[0]

    def __contains__(self, key: object) -> bool:
        return key in self.row

    def __iter__(self) -> Iterator[str]:
        return iter(self.row)

    def __len__(self) -> int:
        return len(self.row)


class TokenizedText:
    """Token ids of the corpus passages and of the given queries, looked up by id.

    Queries are tokenised up front; passages when first read (:class:`LazyTokens`), so a stage
    holds the ids of the passages its groups and re-rankings read, not the whole corpus's.
    """

    def __init__(self, tokenizer, data: BeirData, query_ids: list[str], query_max_len: int, passage_max_len: int):
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.passages = LazyTokens(tokenizer, data.corpus["_id"], data.passage_texts, passage_max_len)
        self.queries = dict(zip(query_ids, compact_tokens(tokenizer, data.query_texts(query_ids), query_max_len)))


def check_divisible(batch_size: int, num_processes: int, key: str) -> None:
    if batch_size % num_processes:
        raise InputError(f"{key}: the global batch ({batch_size}) must split evenly over {num_processes} processes")


class GroupBatches:
    """``batch_at(epoch, index)``: this process's share of global micro-batch ``index`` of ``epoch``.

    ``batch_size`` is the global batch in groups (the last partial batch of an epoch is dropped).
    ``teacher_scores`` (query id -> {passage id: score}), when given, fills ``GroupBatch.teacher_scores``.
    """

    def __init__(self, groups: TrainGroups, text: TokenizedText, batch_size: int, with_pairs: bool,
                 rank: int = 0, num_processes: int = 1, teacher_scores: dict[str, dict[str, float]] | None = None):
        if len(groups) < batch_size:
            raise ValueError(f"{len(groups)} training queries cannot fill one batch of {batch_size}")
        self.groups, self.text, self.batch_size, self.with_pairs = groups, text, batch_size, with_pairs
        self.rank, self.num_processes = rank, num_processes
        self.teacher_scores = teacher_scores
        self.per_epoch = len(groups) // batch_size

    def batch_at(self, epoch: int, index: int) -> GroupBatch:
        order = self.groups.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        groups = [self.groups.group(epoch, int(i)) for i in order]
        q_ids = [self.text.queries[g.query_id] for g in groups]
        p_ids = self.text.passages.many([p for g in groups for p in g.passage_ids])
        pair_q = [q for q in q_ids for _ in range(self.groups.group_size)]
        return GroupBatch(
            queries=encoder_inputs(q_ids, self.text.special),
            passages=encoder_inputs(p_ids, self.text.special),
            pairs=cross_inputs(pair_q, p_ids, self.text.special) if self.with_pairs else {},
            group_size=self.groups.group_size,
            teacher_scores=None if self.teacher_scores is None else self._teacher_rows(groups),
        ).shard(self.rank, self.num_processes)

    def _teacher_rows(self, groups) -> torch.Tensor:
        nan = float("nan")
        rows = [[self.teacher_scores.get(g.query_id, {}).get(p, nan) for p in g.passage_ids] for g in groups]
        return torch.tensor(rows, dtype=torch.float32)  # (Q, G)


class PassageBatches:
    """Corpus passages in a seeded order per epoch, for post-training (MLM, SimCSE, Mirror-BERT).

    ``batch_size`` is global; each process gets its share of the rows and its own masking seed.
    The corpus is streamed: a batch's passages are tokenised when the batch is read and not kept,
    so memory holds the passage ids and one batch, never the tokenised corpus. A passage that
    tokenises to nothing (after truncation) is left out of its batch.
    """

    def __init__(self, text: TokenizedText, batch_size: int, seed: int, rank: int = 0, num_processes: int = 1):
        self.passages, self.ids = text.passages, list(text.passages)  # every passage id, in corpus order
        self.special, self.batch_size, self.seed = text.special, batch_size, seed
        self.rank, self.num_processes = rank, num_processes
        self.per_epoch = len(self.ids) // batch_size
        if self.per_epoch < 1:
            raise ValueError(f"{len(self.ids)} passages cannot fill one batch of {batch_size}")
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation), drawn once per epoch

    def batch_at(self, epoch: int, index: int) -> tuple[dict[str, torch.Tensor], int]:
        """(encoder inputs, a seed for this batch's masking)."""
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
        rows = self._order[1][index * self.batch_size : (index + 1) * self.batch_size]
        tokens = [ids for ids in self.passages.many([self.ids[i] for i in rows], keep=False) if len(ids)]
        inputs = encoder_inputs(tokens, self.special)
        if self.num_processes > 1:
            share = shard_slice(len(tokens), self.rank, self.num_processes)
            inputs = {k: v[share] for k, v in inputs.items()}
        key = [self.seed, epoch, index] + ([self.rank] if self.rank else [])  # rank 0 masks as one process does
        return inputs, int(np.random.default_rng(key).integers(2**31))
