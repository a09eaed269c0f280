"""Retrieval metrics with trec_eval's conventions, so figures match ``pytrec_eval`` and BEIR.

- A run is ranked by score descending, ties broken by document id descending (trec_eval's order).
- Relevance is graded: nDCG uses the qrels score as linear gain; MRR and Recall count score > 0.
- Means are over the judged queries (at least one relevant document); a judged query missing from
  the run scores 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Qrels = dict[str, dict[str, int]]
Ranking = dict[str, list[str]]  # query id -> document ids, best first
METRIC_KEYS = ("mrr@10", "ndcg@10", "recall@10", "recall@100", "recall@1000")


def rank_run(run: dict[str, dict[str, float]]) -> Ranking:
    """Order each query's ``{doc id: score}`` the way trec_eval does.

    >>> rank_run({"q": {"a": 1.0, "b": 2.0, "c": 1.0}})
    {'q': ['b', 'c', 'a']}
    """
    return {
        qid: [doc for doc, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]
        for qid, scores in run.items()
    }


def ranking_from_arrays(
    query_ids: Sequence[str], doc_ids: Sequence[str], indices: np.ndarray, scores: np.ndarray
) -> Ranking:
    """Turn top-k search output (Q, k) into a ranking, re-ordering ties as trec_eval does.

    Negative indices (FAISS's "no result") are dropped.

    >>> ranking_from_arrays(["q"], ["a", "b", "c"], np.array([[0, 2, 1]]), np.array([[1.0, 1.0, 0.5]]))
    {'q': ['c', 'a', 'b']}
    """
    ids = np.asarray(doc_ids, dtype=object)  # read once: a datasets column reads each item through Arrow
    id_rank = np.empty(len(ids), dtype=np.int64)
    id_rank[np.argsort(ids, kind="stable")] = np.arange(len(ids))
    ranking: Ranking = {}
    for qid, row_idx, row_scores in zip(query_ids, indices, scores):
        keep = row_idx >= 0
        row_idx, row_scores = row_idx[keep], row_scores[keep].astype(np.float64)
        best_first = np.lexsort((-id_rank[row_idx], -row_scores))  # last key is primary
        ranking[qid] = ids[row_idx[best_first]].tolist()
    return ranking


def query_metrics(relevance: dict[str, int], ranked: Sequence[str]) -> dict[str, float]:
    """MRR@10, nDCG@10 and Recall@{10,100,1000} of one query.

    >>> m = query_metrics({"a": 2, "b": 1}, ["x", "a", "b"])
    >>> round(m["mrr@10"], 4), round(m["ndcg@10"], 4), m["recall@10"]
    (0.5, 0.6697, 1.0)
    """
    relevant = {doc for doc, score in relevance.items() if score > 0}
    first = next((i for i, doc in enumerate(ranked[:10]) if doc in relevant), None)
    dcg = sum(max(relevance.get(doc, 0), 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:10]))
    ideal = sorted((s for s in relevance.values() if s > 0), reverse=True)[:10]
    idcg = sum(gain / math.log2(i + 2) for i, gain in enumerate(ideal))
    metrics = {"mrr@10": 0.0 if first is None else 1.0 / (first + 1), "ndcg@10": dcg / idcg if idcg else 0.0}
    for k in (10, 100, 1000):
        metrics[f"recall@{k}"] = len(relevant.intersection(ranked[:k])) / len(relevant)
    return metrics


def evaluate_ranking(qrels: Qrels, ranking: Ranking) -> dict[str, float]:
    """Mean of :func:`query_metrics` over the judged queries of ``qrels``.

    >>> evaluate_ranking({"q1": {"a": 1}, "q2": {"b": 1}}, {"q1": ["a"]})["mrr@10"]
    0.5
    """
    judged = [qid for qid, docs in qrels.items() if any(s > 0 for s in docs.values())]
    if not judged:
        raise ValueError("qrels hold no judged query")
    per_query = [query_metrics(qrels[qid], ranking.get(qid, [])) for qid in judged]
    return {key: float(np.mean([m[key] for m in per_query])) for key in METRIC_KEYS}
