"""benchmarks/posttrain_scifact.py end to end on the small generated demo, at a few steps per stage."""

from __future__ import annotations

import json

from benchmarks.posttrain_scifact import main

FEW_STEPS = ["data.dev_queries=10", "eval.passage_max_len=64", "eval.top_k=100", "eval.rerank_depth=10",
             "posttrain.batch_size=4", "posttrain.train.max_steps=2", "warmup.batch_size=4", "warmup.train.max_steps=2"]
POST = "MLM + Mirror-BERT post-training, seed 1"
BASELINE = "fine-tuned, no post-training, seed 1"


def test_each_row_is_measured_timed_and_compared_with_its_reference(demo_dirs, tmp_path):
    data, model = demo_dirs
    out = tmp_path / "results" / "posttrain.json"
    assert main(["--data", str(data), "--model", str(model), "--work-dir", str(tmp_path / "runs"), "--out", str(out),
                 "--only", "none,mlm+mirror,cls", *FEW_STEPS]) == 0
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == [
        "BM25", "zero-shot, mean pooling", BASELINE, f"zero-shot after {POST}", f"fine-tuned after {POST}",
        "zero-shot, CLS pooling", "fine-tuned, no post-training, CLS pooling, seed 1"]
    assert all(row["seconds"] > 0 for row in rows.values())
    for name, reference in [(f"zero-shot after {POST}", "zero-shot, mean pooling"),
                            (f"fine-tuned after {POST}", BASELINE),
                            ("fine-tuned, no post-training, CLS pooling, seed 1", BASELINE),
                            ("zero-shot, CLS pooling", "zero-shot, mean pooling")]:
        assert rows[name]["reference"] == reference
    assert 0 <= rows[f"fine-tuned after {POST}"]["p_value"] <= 1  # per-query scores of both fine-tuned models
    assert "reference" not in rows[BASELINE]
    # Each experiment trains its own stages, in one run folder.
    run_dir = tmp_path / "runs" / "posttrain_scifact_cpu"
    assert (len(list(run_dir.glob("posttrain-*/DONE.json"))), len(list(run_dir.glob("warmup-*/DONE.json")))) == (1, 3)
    text = out.read_text() + out.with_suffix(".md").read_text()
    assert str(tmp_path) not in text and str(data) not in text  # no machine paths in the results
