"""Metrics against pytrec_eval (trec_eval) on random runs with ties and graded relevance."""

import numpy as np
import pytest
import pytrec_eval

from pipeline.metrics import evaluate_ranking, query_metrics, rank_run, ranking_from_arrays


def _random_case(seed: int, n_queries=20, n_docs=300):
    rng = np.random.default_rng(seed)
    docs = [f"d{i}" for i in range(n_docs)]
    qrels, run = {}, {}
    for q in range(n_queries):
        judged = rng.choice(n_docs, size=int(rng.integers(1, 15)), replace=False)
        grades = rng.integers(0, 4, size=len(judged))
        grades[0] = max(grades[0], 1)  # at least one relevant document
        qrels[f"q{q}"] = {docs[d]: int(g) for d, g in zip(judged, grades)}
        retrieved = rng.choice(n_docs, size=int(rng.integers(5, n_docs)), replace=False)
        # Scores rounded to one decimal: many ties, which trec_eval breaks by doc id.
        run[f"q{q}"] = {docs[d]: float(np.round(rng.random(), 1)) for d in retrieved}
    return qrels, run


@pytest.mark.parametrize("seed", range(5))
def test_per_query_metrics_equal_pytrec_eval(seed):
    qrels, run = _random_case(seed)
    measures = {"ndcg_cut.10", "recall.10,100,1000"}
    reference = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    top10 = {q: dict(sorted(s.items(), key=lambda x: (x[1], x[0]), reverse=True)[:10]) for q, s in run.items()}
    reference_rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    ranking = rank_run(run)
    for qid in qrels:
        ours = query_metrics(qrels[qid], ranking[qid])
        assert ours["ndcg@10"] == pytest.approx(reference[qid]["ndcg_cut_10"], abs=1e-9)
        for k in (10, 100, 1000):
            assert ours[f"recall@{k}"] == pytest.approx(reference[qid][f"recall_{k}"], abs=1e-9)
        assert ours["mrr@10"] == pytest.approx(reference_rr[qid]["recip_rank"], abs=1e-9)


def test_mean_metrics_equal_pytrec_eval_means():
    qrels, run = _random_case(42)
    reference = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    ours = evaluate_ranking(qrels, rank_run(run))
    assert ours["ndcg@10"] == pytest.approx(np.mean([m["ndcg_cut_10"] for m in reference.values()]))
    assert ours["recall@100"] == pytest.approx(np.mean([m["recall_100"] for m in reference.values()]))


def test_ties_are_broken_by_descending_doc_id():
    qrels = {"q": {"a": 1}}
    tied = {"q": {"a": 1.0, "b": 1.0}}
    reference = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(tied)["q"]["recip_rank"]
    assert reference == 0.5
    assert query_metrics(qrels["q"], rank_run(tied)["q"])["mrr@10"] == 0.5


def test_arrays_and_dicts_give_the_same_ranking():
    qrels, run = _random_case(7, n_queries=5, n_docs=50)
    doc_ids = [f"d{i}" for i in range(50)]
    for qid, scores in run.items():
        idx = np.array([[doc_ids.index(d) for d in scores]])
        vals = np.array([list(scores.values())], dtype=np.float32)
        assert ranking_from_arrays([qid], doc_ids, idx, vals)[qid] == rank_run({qid: scores})[qid]


def test_faiss_missing_results_are_dropped_and_unretrieved_queries_score_zero():
    ranking = ranking_from_arrays(["q"], ["a", "b"], np.array([[1, -1]]), np.array([[0.5, -np.inf]]))
    assert ranking == {"q": ["b"]}
    metrics = evaluate_ranking({"q": {"a": 1}, "r": {"b": 2}}, {"q": ["b", "a"]})
    assert metrics["mrr@10"] == pytest.approx(0.25)
    assert metrics["recall@10"] == pytest.approx(0.5)


def test_non_relevant_judgements_do_not_count():
    m = query_metrics({"a": 0, "b": 1}, ["a", "b"])
    assert m["mrr@10"] == 0.5
    assert m["recall@10"] == 1.0
    with pytest.raises(ValueError):
        evaluate_ranking({"q": {"a": 0}}, {"q": ["a"]})
