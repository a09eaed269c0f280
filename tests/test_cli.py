"""The command line end to end on a small demo, and its one-line errors."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

from tests.test_pipeline import TINY as SMALL_DEMO


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def test_demo_runs_every_stage_and_writes_the_run_directory(tmp_path):
    result = run_cli(f"run.output_dir={tmp_path}", "run.name=smoke", *SMALL_DEMO)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "smoke"
    for stage in ("posttrain", "teacher", "distill"):
        (folder,) = run_dir.glob(f"{stage}-*")
        assert (folder / "DONE.json").exists()
        for values in json.loads((folder / "eval" / "metrics.json").read_text()).values():
            assert {"mrr@10", "ndcg@10", "recall@10", "recall@100"} <= set(values)
            per_query = values.pop("ndcg@10 per query")
            assert all(0.0 <= v <= 1.0 for v in [*values.values(), *per_query.values()])
    assert "| distill / dual-encoder |" in result.stdout
    # Output to pipes, as on a cluster: no progress bars, a plain line per logging step instead.
    assert "\r" not in result.stdout and "\r" not in result.stderr
    assert re.search(r"distill-[0-9a-f]{8} step 1/\d+ \(\d+%\): loss ", result.stderr)
    negatives = [json.loads(line) for line in next((run_dir / "negatives").glob("bm25-*.jsonl")).read_text().splitlines()]
    assert len(negatives) == 24 and all(len(row["negatives"]) == 30 for row in negatives)
    assert (run_dir / "config.yaml").exists() and (run_dir / "report.md").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["eval.batch_sise=3"], "error: unknown key 'eval.batch_sise'"),
        (["data.path=/nonexistent/beir"], "error: /nonexistent/beir: data directory not found"),
        (["model.name_or_path=/nonexistent/model"], "error: /nonexistent/model: model not found"),
        (["model.name_or_path=someone/some-model"], "error: someone/some-model: not a local folder, and the hub is offline"),
    ],
)
def test_user_errors_are_one_line_with_status_2(tmp_path, args, expected):
    result = run_cli(f"run.output_dir={tmp_path}", *SMALL_DEMO, *args)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(expected)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_corpus_line_is_reported_with_file_and_line(tmp_path):
    data = tmp_path / "beir"
    (data / "qrels").mkdir(parents=True)
    (data / "corpus.jsonl").write_text('{"_id": "d1", "text": "ok"}\n{"_id": "d2" "text": "broken"}\n')
    (data / "queries.jsonl").write_text('{"_id": "q1", "text": "ok"}\n')
    (data / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    result = run_cli(f"run.output_dir={tmp_path}", f"data.path={data}", *SMALL_DEMO)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {data / 'corpus.jsonl'}:2: invalid JSON (Expecting ',' delimiter at column 14)"


def test_help_lists_the_config_and_overrides():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "--config" in result.stdout and "key.sub=value" in result.stdout
