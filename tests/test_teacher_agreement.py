"""benchmarks/teacher_agreement.py: a teacher's agreement with the student's order of its mined negatives."""

from __future__ import annotations

import json

import pytest

from benchmarks.teacher_agreement import agreement, main


def test_agreement_is_plus_one_for_the_students_order_and_minus_one_for_its_reverse():
    negatives = {"q1": ["a", "b", "c", "d", "e"], "q2": ["x", "y", "z"]}  # q2: too few negatives to count
    same = {"q1": {"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "e": 1.0, "pos": 9.0}, "q2": {"x": 1.0, "y": 2.0, "z": 3.0}}
    reverse = {"q1": {d: -s for d, s in same["q1"].items()}, "q2": same["q2"]}
    assert agreement(negatives, same) == pytest.approx([1.0])
    assert agreement(negatives, reverse) == pytest.approx([-1.0])


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_teacher_that_scores_every_negative_alike_counts_no_query():
    assert agreement({"q": list("abcd")}, {"q": dict.fromkeys("abcd", 0.0)}) == []


def scores_stage(root, name, negatives_hash, scores):
    write_jsonl(root / name / "final" / "teacher_scores.jsonl",
                [{"query_id": "q", "scores": dict(zip("abcd", map(float, scores)))}])
    (root / name / "eval").mkdir()
    (root / name / "eval" / "metrics.json").write_text(json.dumps({f"teacher {name}": {"ndcg@10": 0.5}}))
    inputs = {"negatives": negatives_hash} if negatives_hash else {}
    (root / name / "DONE.json").write_text(json.dumps({"stage": "scores", "inputs": inputs}))


def test_main_pairs_each_scores_stage_with_the_refresh_it_scored(tmp_path, capsys):
    write_jsonl(tmp_path / "refresh-aaaaaaaa" / "final" / "negatives.jsonl", [{"query_id": "q", "negatives": list("abcd")}])
    write_jsonl(tmp_path / "refresh-bbbbbbbb" / "final" / "negatives.jsonl", [{"query_id": "q", "negatives": list("dcba")}])
    scores_stage(tmp_path, "scores-1", "a" * 64, [4, 3, 2, 1])  # the order of refresh-aaaaaaaa
    scores_stage(tmp_path, "scores-2", "b" * 64, [4, 3, 2, 1])  # the reverse of refresh-bbbbbbbb
    scores_stage(tmp_path, "scores-3", None, [1, 2, 3, 4])  # BM25's negatives: skipped
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[0].startswith("scores-1 (negatives of refresh-aaaaaaaa): teacher scores-1") and "mean 1.000" in out[0]
    assert out[1].startswith("scores-2 (negatives of refresh-bbbbbbbb): teacher scores-2") and "mean -1.000" in out[1]


def test_main_refuses_a_folder_without_a_teacher_on_refreshed_negatives(tmp_path):
    scores_stage(tmp_path, "scores-3", None, [1, 2, 3, 4])
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
