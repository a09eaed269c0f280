"""``run_pipeline.py --plan``: what a command will do, read from the run folder, with nothing written."""

import logging
import os
import re

import pytest

import pipeline.stages.teacher as teacher_module
import run_pipeline
from pipeline.config import load_config
from pipeline.plan import changed_settings
from pipeline.run import run

FAST = ["run.stages=posttrain,teacher", "eval.top_k=100", "eval.passage_max_len=48",
        "posttrain.train.max_steps=1", "posttrain.batch_size=16",
        "teacher.train.max_steps=3", "teacher.train.checkpoint_every=1", "teacher.batch_size=4", "teacher.group_size=3"]


def overrides(tmp_path, demo_dirs, *extra):
    data, model = demo_dirs
    return [f"run.output_dir={tmp_path / 'runs'}", f"data.path={data}", f"model.name_or_path={model}", *FAST, *extra]


def plan(capsys, *argv) -> str:
    assert run_pipeline.main(["--plan", *argv]) == 0
    return capsys.readouterr().out


def statuses(text: str) -> dict[str, tuple[str, str]]:
    """{stage: (hash, status)} from the plan's table rows (the first table of the text)."""
    found = {}
    for line in text.splitlines():
        match = re.match(r"  (posttrain|teacher|scores|warmup|refresh|distill) +(\S+) +(.+?)  +\S", line)
        if match and match.group(1) not in found:
            found[match.group(1)] = (match.group(2), match.group(3))
    return found


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_a_fresh_folder_plans_every_stage_and_writes_nothing(tmp_path, demo_dirs, capsys):
    text = plan(capsys, *overrides(tmp_path, demo_dirs))
    stages = statuses(text)
    assert {name: status for name, (_, status) in stages.items()} == {"posttrain": "will run", "teacher": "will run"}
    assert all(re.fullmatch(r"[0-9a-f]{8}", stage_hash) for stage_hash, _ in stages.values())
    assert "not created yet" in text and "BM25 negatives: will be mined" in text
    assert not (tmp_path / "runs").exists()


def test_an_unbuilt_demo_and_an_ablation_show_which_stages_the_variant_reuses(tmp_path, capsys):
    text = plan(capsys, f"run.output_dir={tmp_path / 'runs'}", "--ablate", "attn")
    assert "the demo assets are not built yet" in text
    full, variant = text.split("\nno-attn: ")
    assert set(s for _, s in statuses(full).values()) == {"will run"}
    assert {name: status for name, (_, status) in statuses(variant).items()} == {
        "posttrain": "reused from full", "teacher": "reused from full", "distill": "will run"}
    assert not (tmp_path / "runs").exists()


def test_the_plan_follows_a_run_through_interruption_resume_and_a_changed_setting(tmp_path, demo_dirs, capsys,
                                                                                  monkeypatch):
    args = overrides(tmp_path, demo_dirs)
    config = load_config(None, args)
    real_loss, calls = teacher_module.contrastive_loss, {"n": 0}

    def interrupted_at_step_3(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # after the step-2 checkpoint
            raise KeyboardInterrupt
        return real_loss(*a, **kw)

    monkeypatch.setattr(teacher_module, "contrastive_loss", interrupted_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    monkeypatch.setattr(teacher_module, "contrastive_loss", real_loss)
    before = snapshot(config.run_dir)
    half = statuses(plan(capsys, *args))
    assert half["posttrain"][1] == "done" and half["teacher"][1] == "resumes at step 2"
    assert snapshot(config.run_dir) == before

    messages = []  # a handler of our own: run_pipeline.main reconfigures logging, which drops caplog's
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("pipeline.run")
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    try:
        run(config)
    finally:
        logger.removeHandler(handler)
    assert "stage teacher: resuming at step 2" in messages  # the run does what the plan said
    capsys.readouterr()
    before = snapshot(config.run_dir)
    finished = statuses(plan(capsys, *args))
    assert {name: status for name, (_, status) in finished.items()} == {"posttrain": "done", "teacher": "done"}
    assert finished["teacher"][0] == half["teacher"][0]

    changed = plan(capsys, *args, "teacher.tau=0.5")
    assert {n: s for n, (_, s) in statuses(changed).items()} == {"posttrain": "done", "teacher": "will run"}
    assert f"not reusing the finished teacher-{half['teacher'][0]}:" in changed
    assert "teacher.tau: 1.0 -> 0.5" in changed

    upstream = plan(capsys, *args, "posttrain.mlm_probability=0.2")
    assert "posttrain.mlm_probability: 0.15 -> 0.2" in upstream
    assert "inputs.encoder: the posttrain stage it reads changed" in upstream

    rerun = statuses(plan(capsys, "--stages", "teacher", *args))
    assert rerun["posttrain"][1] == "done" and rerun["teacher"][1] == "will run anew (--stages)"
    assert snapshot(config.run_dir) == before


@pytest.mark.parametrize("arg, expected", [
    ("data.path=/nonexistent/beir", "error: /nonexistent/beir: data directory not found"),
    ("model.name_or_path=/nonexistent/model", "error: /nonexistent/model: model not found"),
])
def test_a_plan_on_bad_paths_is_one_line_with_status_2(tmp_path, arg, expected, capsys):
    assert run_pipeline.main(["--plan", f"run.output_dir={tmp_path}", arg]) == 2
    assert capsys.readouterr().err.strip().startswith(expected)


def test_changed_settings_name_the_setting_and_the_upstream_stage():
    old = {"distill": {"tau_de": 0.05, "weights": {"attn": 1.0}}, "run": {"seed": 13}, "inputs": {"cross_encoder": "a"}}
    new = {"distill": {"tau_de": 0.05, "weights": {"attn": 0.0}}, "run": {"seed": 14}, "inputs": {"cross_encoder": "b"}}
    assert changed_settings(old, new, {"cross_encoder": "teacher"}) == [
        "distill.weights.attn: 1.0 -> 0.0", "run.seed: 13 -> 14", "inputs.cross_encoder: the teacher stage it reads changed"]


def test_stage_hashes_follow_the_data_content_not_its_file_times(tmp_path):
    from pipeline.plan import fingerprint

    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.jsonl").write_text('{"_id": "1", "text": "a"}\n')
    before = fingerprint(data)
    os.utime(data / "corpus.jsonl", (1, 1))  # copied to another machine: new times, same bytes
    assert fingerprint(data) == before
    (data / "corpus.jsonl").write_text('{"_id": "1", "text": "b"}\n')  # same size, other content
    assert fingerprint(data) != before
