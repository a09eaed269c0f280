"""benchmarks/compare_metrics.py: two evaluations of the same queries, paired query by query."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from benchmarks.compare_metrics import compare, main

PER_QUERY = "ndcg@10 per query"


def metrics_file(path, scores: dict[str, float], model: str = "dual-encoder"):
    path.write_text(json.dumps({model: {"ndcg@10": float(np.mean(list(scores.values()))), PER_QUERY: scores}}))
    return path


def test_compare_pairs_by_query_id_and_agrees_with_scipy():
    rng = np.random.default_rng(0)
    queries = [f"q{i}" for i in range(40)]
    a = {q: float(v) for q, v in zip(queries, rng.random(40))}
    b = {q: float(np.clip(v - 0.05 + 0.1 * rng.standard_normal(), 0, 1)) for q, v in a.items()}
    shuffled = dict(reversed(list(b.items())))  # the order of the file must not matter, only the ids
    result = compare(a, shuffled)
    expected = stats.ttest_rel([a[q] for q in queries], [b[q] for q in queries])
    assert result["queries"] == 40
    assert result["difference"] == pytest.approx(np.mean([a[q] - b[q] for q in queries]))
    assert result["t"] == pytest.approx(expected.statistic, rel=1e-6)
    assert result["p"] == pytest.approx(expected.pvalue, rel=1e-6)
    assert result["p_randomization"] == pytest.approx(expected.pvalue, abs=0.03)  # the two tests agree (Smucker)


def test_compare_refuses_evaluations_of_different_queries():
    with pytest.raises(ValueError, match="different queries"):
        compare({"q1": 1.0, "q2": 0.0}, {"q1": 1.0, "q3": 0.0})


def test_main_prints_the_difference_and_explains_a_file_without_per_query_scores(tmp_path, capsys):
    a = metrics_file(tmp_path / "a.json", {"q1": 1.0, "q2": 0.5, "q3": 0.0, "q4": 1.0})
    b = metrics_file(tmp_path / "b.json", {"q1": 0.5, "q2": 0.5, "q3": 0.0, "q4": 0.5})
    assert main([str(a), str(b)]) == 0
    line = capsys.readouterr().out
    assert line.startswith("dual-encoder: nDCG@10 0.6250 - 0.3750 = +0.2500 over 4 queries")
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"dual-encoder": {"ndcg@10": 0.5}}))
    with pytest.raises(SystemExit, match="no model with 'ndcg@10 per query'"):
        main([str(a), str(bare)])
    with pytest.raises(SystemExit, match="colbert is not in both files"):
        main([str(a), str(b), "--model", "colbert"])
