"""Training groups (query, 1 positive, k negatives), sampled from (seed, epoch, index) alone.

A resumed or re-sharded run therefore sees exactly the same groups in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from data.beir import Qrels


@dataclass(frozen=True)
class Group:
    """One query and its passages: ``passage_ids[0]`` is the positive, the rest are negatives."""

    query_id: str
    passage_ids: tuple[str, ...]


class TrainGroups:
    """Deterministic group sampler over the judged queries of a split.

    The positive is drawn uniformly from the query's relevant documents, the ``group_size - 1``
    negatives without replacement from its mined negatives; when too few were mined the rest come
    from random corpus documents that are not relevant to the query.

    >>> groups = TrainGroups({"q": {"a": 1}}, {"q": ["b", "c"]}, ["a", "b", "c", "d"], group_size=3, seed=0)
    >>> g = groups.group(epoch=0, index=0)
    >>> g.passage_ids[0], sorted(g.passage_ids[1:])
    ('a', ['b', 'c'])
    >>> groups.group(epoch=0, index=0) == g
    True
    """

    def __init__(
        self,
        qrels: Qrels,
        negatives: dict[str, list[str]],
        doc_ids: Sequence[str],
        group_size: int,
        seed: int,
    ):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.query_ids = sorted(q for q, docs in qrels.items() if any(s > 0 for s in docs.values()))
        self.positives = {q: sorted(d for d, s in qrels[q].items() if s > 0) for q in self.query_ids}
        self.negatives = {q: list(negatives.get(q, [])) for q in self.query_ids}
        self.doc_ids = list(doc_ids)
        self.group_size = group_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.query_ids)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of query indices (a function of seed and epoch only)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.query_ids))

    def group(self, epoch: int, index: int) -> Group:
        """The group of query ``index`` (in :attr:`query_ids` order) for ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch, index])
        qid = self.query_ids[index]
        positives = self.positives[qid]
        positive = positives[rng.integers(len(positives))]
        wanted = self.group_size - 1
        pool = self.negatives[qid]
        chosen = [pool[i] for i in rng.choice(len(pool), min(wanted, len(pool)), replace=False)]
        excluded = set(positives).union(chosen)
        while len(chosen) < wanted and len(excluded) < len(self.doc_ids):
            doc = self.doc_ids[rng.integers(len(self.doc_ids))]
            if doc not in excluded:
                excluded.add(doc)
                chosen.append(doc)
        if len(chosen) < wanted:
            raise ValueError(f"corpus too small for group_size {self.group_size}")
        return Group(query_id=qid, passage_ids=(positive, *chosen))

    def epoch_groups(self, epoch: int) -> list[Group]:
        """All groups of an epoch in training order."""
        return [self.group(epoch, int(i)) for i in self.order(epoch)]
