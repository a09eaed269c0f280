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


def test_main_reports_each_scores_stage_of_a_run_folder(tmp_path, capsys):
    write_jsonl(tmp_path / "refresh-1" / "final" / "negatives.jsonl", [{"query_id": "q", "negatives": list("abcd")}])
    for name, scores in (("scores-same", [4, 3, 2, 1]), ("scores-reverse", [1, 2, 3, 4])):
        write_jsonl(tmp_path / name / "final" / "teacher_scores.jsonl",
                    [{"query_id": "q", "scores": dict(zip("abcd", map(float, scores)))}])
        (tmp_path / name / "eval").mkdir()
        (tmp_path / name / "eval" / "metrics.json").write_text(json.dumps({f"teacher {name}": {"ndcg@10": 0.5}}))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("scores-reverse: teacher scores-reverse") and "mean -1.000" in out[0]
    assert out[1].startswith("scores-same: teacher scores-same") and "mean 1.000" in out[1]


def test_main_refuses_a_folder_without_one_refresh_stage(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
