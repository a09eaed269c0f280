"""Hard negatives from a ranking (BM25 first, later the current dual-encoder through FAISS)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from data.beir import Qrels


def negatives_from_search(
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    indices: np.ndarray,
    qrels: Qrels,
    depth: int,
) -> dict[str, list[str]]:
    """Each query's top-``depth`` retrieved documents that are not judged relevant, best first.

    ``indices`` (Q, k) are search results in ``doc_ids`` order, aligned with ``query_ids``. Documents
    judged relevant (score > 0) never appear among a query's negatives.

    >>> negatives_from_search(["q"], ["a", "b", "c"], np.array([[1, 0, 2]]), {"q": {"b": 1}}, depth=5)
    {'q': ['a', 'c']}
    """
    negatives = {}
    for qid, row in zip(query_ids, indices):
        positives = {doc for doc, score in qrels.get(qid, {}).items() if score > 0}
        ranked = (doc_ids[i] for i in row if i >= 0)
        negatives[qid] = [doc for doc in ranked if doc not in positives][:depth]
    return negatives
