"""Hard negatives from a ranking (BM25 first, later the current dual-encoder through FAISS)."""

from __future__ import annotations

from data.beir import Qrels


def negatives_from_ranking(ranking: dict[str, list[str]], qrels: Qrels, depth: int) -> dict[str, list[str]]:
    """Each query's top-``depth`` ranked documents that are not judged relevant, best first.

    Documents judged relevant (score > 0) never appear among a query's negatives.

    >>> negatives_from_ranking({"q": ["b", "a", "c"]}, {"q": {"b": 1}}, depth=5)
    {'q': ['a', 'c']}
    """
    negatives = {}
    for qid, ranked in ranking.items():
        positives = {doc for doc, score in qrels.get(qid, {}).items() if score > 0}
        negatives[qid] = [doc for doc in ranked if doc not in positives][:depth]
    return negatives
