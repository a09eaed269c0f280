"""The staged pipeline end to end on a tiny demo: stages, skip, resume, single stages, ablations."""

import json

import pytest
import torch
from safetensors.torch import load_file

import pipeline.stages.distill as distill_module
from pipeline.ablation import ablated, run_ablation
from pipeline.config import load_config
from pipeline.run import run

TINY = [
    "demo.n_entities=20", "demo.n_train_queries=24", "demo.n_test_queries=8", "demo.vocab_size=2000",
    "demo.hidden_size=32", "eval.top_k=100", "eval.passage_max_len=48",
    "posttrain.train.epochs=1", "posttrain.batch_size=16",
    "teacher.train.epochs=1", "teacher.batch_size=4", "teacher.group_size=3",
    "distill.train.epochs=2", "distill.batch_size=4", "distill.group_size=3",
    "distill.train.checkpoint_every=2", "distill.train.log_every=1",
]


def tiny_config(tmp_path, *extra, name="demo"):
    return load_config(None, [f"run.output_dir={tmp_path}", f"run.name={name}", *TINY, *extra])


def stage_dir(config, name):
    (found,) = config.run_dir.glob(f"{name}-*")
    return found


def dual_encoder_weights(config):
    return load_file(stage_dir(config, "distill") / "final" / "dual_encoder" / "model.safetensors")


def test_every_stage_finishes_with_metrics_and_a_rerun_skips_them(tmp_path):
    config = tiny_config(tmp_path)
    results = run(config)
    for name in ("posttrain", "teacher", "distill"):
        folder = stage_dir(config, name)
        done = json.loads((folder / "DONE.json").read_text())
        assert done["stage"] == name and folder.name == f"{name}-{done['hash'][:8]}"
        metrics = json.loads((folder / "eval" / "metrics.json").read_text())
        for model_metrics in metrics.values():
            assert {"ndcg@10", "mrr@10", "recall@100"} <= set(model_metrics)
    assert set(results["distill"]) == {"dual-encoder", "colbert (re-rank DE top 100)", "cross-encoder (re-rank DE top 100)"}
    assert (config.run_dir / "report.md").exists() and (config.run_dir / "loss-distill.png").exists()
    log = [json.loads(line) for line in (stage_dir(config, "distill") / "train_log.jsonl").read_text().splitlines()]
    assert set(log[0]) >= {"loss", "ce", "col", "de", "kl_ce_col", "kl_col_de", "kl_ce_de", "attn", "dualreg"}

    done_times = {n: (stage_dir(config, n) / "DONE.json").stat().st_mtime_ns for n in ("posttrain", "teacher", "distill")}
    assert run(config)["distill"] == results["distill"]
    assert done_times == {n: (stage_dir(config, n) / "DONE.json").stat().st_mtime_ns for n in done_times}


def test_resume_inside_distill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    # One output folder: both runs read the same generated demo assets.
    straight = tiny_config(tmp_path, name="straight")
    expected = run(straight)["distill"]

    interrupted = tiny_config(tmp_path, name="interrupted")
    real_step, calls = distill_module.distill_step, {"n": 0}

    def failing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # after the step-2 and step-4 checkpoints
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(distill_module, "distill_step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted)
    assert not (stage_dir(interrupted, "distill") / "DONE.json").exists()
    assert (stage_dir(interrupted, "distill") / "checkpoints" / "step-4").exists()
    monkeypatch.setattr(distill_module, "distill_step", real_step)
    assert run(interrupted)["distill"] == expected
    for key, value in dual_encoder_weights(straight).items():
        torch.testing.assert_close(value, dual_encoder_weights(interrupted)[key], rtol=0, atol=0)


def test_single_stage_rerun_and_changed_config_goes_to_a_new_folder(tmp_path):
    config = tiny_config(tmp_path)
    run(config)
    teacher_done = (stage_dir(config, "teacher") / "DONE.json").stat().st_mtime_ns
    first_distill = stage_dir(config, "distill")
    run(config, only=["distill"])
    assert (stage_dir(config, "teacher") / "DONE.json").stat().st_mtime_ns == teacher_done
    assert (first_distill / "DONE.json").exists()

    changed = tiny_config(tmp_path, "distill.tau_de=0.1")
    run(changed)
    assert len(list(changed.run_dir.glob("distill-*"))) == 2
    assert len(list(changed.run_dir.glob("teacher-*"))) == 1


def test_ablation_shares_upstream_stages_and_never_computes_switched_off_terms(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    run(config)
    upstream = {n: (stage_dir(config, n) / "DONE.json").stat().st_mtime_ns for n in ("posttrain", "teacher")}

    seen = []
    real_step = distill_module.distill_step

    def spy(cascade, batch, stage, weights, autocast):
        terms = real_step(cascade, batch, stage, weights, autocast)
        seen.append((set(terms), cascade.colbert is None, cascade.cross_encoder is None))
        return terms

    monkeypatch.setattr(distill_module, "distill_step", spy)
    probe_calls = []
    import models.cross_encoder as ce_module

    real_record = ce_module.AttentionProbe.record
    monkeypatch.setattr(ce_module.AttentionProbe, "record", lambda self: probe_calls.append(1) or real_record(self))
    run_ablation(config, {"no-attn-dualreg": ["attn", "dualreg"]})
    assert {n: (stage_dir(config, n) / "DONE.json").stat().st_mtime_ns for n in upstream} == upstream
    assert len(list(config.run_dir.glob("distill-*"))) == 2
    assert seen and all("attn" not in terms and "dualreg" not in terms for terms, _, _ in seen)
    assert probe_calls == []  # no attention probabilities when attn is off
    assert (config.run_dir / "ablation.md").exists()

    seen.clear()
    no_teacher = ablated(config, ["ce", "kl_ce_col", "kl_ce_de", "attn"])
    run(no_teacher, variant="no-ce")
    assert seen and all(ce_absent for _, _, ce_absent in seen)  # no cross-encoder at all


def test_a_killed_process_resumes_to_the_same_weights_and_metrics(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    command = [sys.executable, str(ROOT / "run_pipeline.py"), f"run.output_dir={tmp_path}", *TINY]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert subprocess.run([*command, "run.name=straight"], timeout=300, **quiet).returncode == 0

    victim = subprocess.Popen([*command, "run.name=killed"], **quiet)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "killed").glob("distill-*/checkpoints/step-4")):
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed = tiny_config(tmp_path, name="killed")
    assert not (stage_dir(killed, "distill") / "DONE.json").exists()

    assert subprocess.run([*command, "run.name=killed"], timeout=300, **quiet).returncode == 0
    straight = tiny_config(tmp_path, name="straight")
    metrics = lambda config: json.loads((stage_dir(config, "distill") / "eval" / "metrics.json").read_text())  # noqa: E731
    assert metrics(killed) == metrics(straight)
    for key, value in dual_encoder_weights(straight).items():
        torch.testing.assert_close(value, dual_encoder_weights(killed)[key], rtol=0, atol=0)


def test_refresh_mines_dense_negatives_that_the_next_stage_trains_on(tmp_path):
    from data.beir import load_beir

    config = tiny_config(tmp_path, "run.stages=posttrain,teacher,refresh,distill", "refresh.depth=5")
    run(config)
    rows = [json.loads(line) for line in (stage_dir(config, "refresh") / "final" / "negatives.jsonl").read_text().splitlines()]
    qrels = load_beir(tmp_path / "demo_assets" / "data", ("train",)).qrels["train"]
    assert len(rows) == 24
    for row in rows:
        assert len(row["negatives"]) == 5
        assert not set(row["negatives"]) & set(qrels[row["query_id"]])
    done = json.loads((stage_dir(config, "distill") / "DONE.json").read_text())
    refresh_hash = json.loads((stage_dir(config, "refresh") / "DONE.json").read_text())["hash"]
    assert done["inputs"]["negatives"] == refresh_hash


def test_same_seed_and_config_give_identical_metrics_in_another_folder(tmp_path):
    first = run(tiny_config(tmp_path / "one", "run.stages=posttrain,distill", "distill.weights.ce=0",
                            "distill.weights.kl_ce_col=0", "distill.weights.kl_ce_de=0", "distill.weights.attn=0"))
    second = run(tiny_config(tmp_path / "two", "run.stages=posttrain,distill", "distill.weights.ce=0",
                             "distill.weights.kl_ce_col=0", "distill.weights.kl_ce_de=0", "distill.weights.attn=0"))
    assert first == second


def test_posttrain_with_simcse_and_mirror_bert_logs_every_term(tmp_path):
    config = tiny_config(tmp_path, "run.stages=posttrain", "posttrain.simcse=0.5", "posttrain.mirror=0.5",
                         "posttrain.train.log_every=1")
    results = run(config)
    log = [json.loads(line) for line in (stage_dir(config, "posttrain") / "train_log.jsonl").read_text().splitlines()]
    assert {"mlm", "simcse", "mirror"} <= set(log[0])
    assert all(r["loss"] == pytest.approx(r["mlm"] + 0.5 * r["simcse"] + 0.5 * r["mirror"], rel=1e-4) for r in log)
    assert "dual-encoder" in results["posttrain"]
