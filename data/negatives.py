"""Hard negatives from a ranking (BM25 first, later the current dual-encoder through FAISS)."""

from __future__ import annotations

from typing import Callable, Sequence

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


def mine_negatives(
    qrels: Qrels,
    query_ids: Sequence[str],
    search: Callable[[Sequence[str], int], dict[str, list[str]]],
    depth: int,
    skip_top: int = 0,
) -> dict[str, list[str]]:
    """Negatives of each query from ``search(query_ids, k)`` (BM25 or a dense retriever).

    Searches deep enough that ``depth`` negatives remain after removing the query's positives and
    skipping the ``skip_top`` best-ranked non-relevant passages (often unlabelled positives).

    >>> search = lambda qids, k: {q: ["a", "b", "c", "d"][:k] for q in qids}
    >>> mine_negatives({"q": {"a": 1}}, ["q"], search, depth=2, skip_top=1)
    {'q': ['c', 'd']}
    """
    most_positives = max(len(qrels.get(q, {})) for q in query_ids)
    ranking = search(query_ids, skip_top + depth + most_positives)
    mined = negatives_from_ranking(ranking, qrels, skip_top + depth)
    return {q: mined[q][skip_top:] for q in query_ids}
