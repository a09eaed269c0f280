"""The training loop: schedule, accumulation, weights, checkpoints, and resume equals uninterrupted."""

import json

import pytest
import torch
from accelerate import Accelerator

from pipeline.train import TrainConfig, latest_checkpoint, train


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 4)
        self.dropout = torch.nn.Dropout(0.3)  # makes the RNG part of the state to restore

    def forward(self, x):
        return self.dropout(self.layer(x))


def batch_at(epoch, index):
    g = torch.Generator().manual_seed(1000 * epoch + index)
    return torch.randn(8, 4, generator=g)


class Interrupt(Exception):
    pass


def make_step(fail_at=None):
    calls = {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise Interrupt
        out = model(batch)
        return {"fit": (out - batch.flip(1)).pow(2).mean(), "small": out.pow(2).mean()}

    return step


CONFIG = TrainConfig(epochs=3, grad_accum=2, lr=1e-2, log_every=1, checkpoint_every=2, keep_checkpoints=2)
WEIGHTS = {"fit": 1.0, "small": 0.1}


def run(stage_dir, fail_at=None, config=CONFIG):
    model = Toy()
    state = train(Accelerator(cpu=True), model, make_step(fail_at), batch_at, 5, WEIGHTS, config, stage_dir)
    return model, state


def test_resume_after_a_failure_equals_an_uninterrupted_run(tmp_path):
    reference, state = run(tmp_path / "straight")
    assert state.step == 7  # 3 epochs x 5 micro-batches // 2
    with pytest.raises(Interrupt):
        run(tmp_path / "resumed", fail_at=12)  # inside epoch 2, after the step-4 checkpoint
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step-4"
    resumed, _ = run(tmp_path / "resumed")
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    straight_log = (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()
    resumed_log = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in resumed_log] == list(range(1, 8))
    assert [json.loads(r)["fit"] for r in resumed_log] == pytest.approx([json.loads(r)["fit"] for r in straight_log])


def test_checkpoints_are_rotated_and_complete(tmp_path):
    run(tmp_path, config=TrainConfig(epochs=4, grad_accum=1, checkpoint_every=3, keep_checkpoints=2))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-15", "step-18"]
    assert all((tmp_path / "checkpoints" / n / "train_state.json").exists() for n in names)


def test_every_term_is_logged_by_name_and_unweighted_terms_are_refused(tmp_path):
    run(tmp_path, config=TrainConfig(epochs=1, grad_accum=1, log_every=2, checkpoint_every=100))
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    for r in records:
        assert r["loss"] == pytest.approx(r["fit"] + 0.1 * r["small"], rel=1e-5)
    model = Toy()
    with pytest.raises(RuntimeError, match="no weight"):
        train(Accelerator(cpu=True), model, make_step(), batch_at, 5, {"fit": 1.0, "small": 0.0},
              TrainConfig(), tmp_path / "other")


def nan_at(bad_calls):
    calls = {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        out = model(batch)
        fit = (out - batch.flip(1)).pow(2).mean()
        if calls["n"] in bad_calls:
            fit = fit * float("nan")
        return {"fit": fit}

    return step


def test_a_non_finite_step_is_skipped_and_counted(tmp_path):
    from pipeline.train import TrainConfig as Config

    config = Config(epochs=1, grad_accum=1, log_every=1, checkpoint_every=100, warmup_ratio=0.0)
    model = Toy()
    state = train(Accelerator(cpu=True), model, nan_at({3}), batch_at, 5, {"fit": 1.0}, config, tmp_path)
    assert state.step == 5 and state.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]


def test_too_many_bad_steps_in_a_row_stop_the_run_and_keep_the_checkpoint(tmp_path):
    from pipeline.train import TrainConfig as Config, TrainingDiverged

    config = Config(epochs=4, grad_accum=1, checkpoint_every=2, max_bad_steps=3)
    model = Toy()
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        train(Accelerator(cpu=True), model, nan_at(set(range(5, 100))), batch_at, 5, {"fit": 1.0}, config, tmp_path)
    kept = latest_checkpoint(tmp_path / "checkpoints")
    assert kept.name == "step-6"  # steps 5 and 6 were skipped, so its weights are still step 4's
    assert json.loads((kept / "train_state.json").read_text())["skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resuming_with_another_number_of_processes_is_refused(tmp_path):
    from data.errors import InputError

    with pytest.raises(Interrupt):
        run(tmp_path, fail_at=12)
    state_file = latest_checkpoint(tmp_path / "checkpoints") / "train_state.json"
    state = json.loads(state_file.read_text())
    assert state["num_processes"] == 1
    state_file.write_text(json.dumps({**state, "num_processes": 2}))  # as if 2 processes had written it
    with pytest.raises(InputError, match=r"written by 2 process\(es\) and this run has 1"):
        run(tmp_path)


def test_new_parameters_train_at_the_head_learning_rate(tmp_path):
    """With ``head_lr`` the named (freshly initialised) parameters move at their own rate, the rest at ``lr``."""
    config = TrainConfig(epochs=1, lr=1e-6, head_lr=1e-1, warmup_ratio=0.0, log_every=1, checkpoint_every=100)
    moved = {}
    for head_lr in (0.0, 1e-1):
        model = Toy()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        train(Accelerator(cpu=True), model, make_step(), batch_at, 2, WEIGHTS,
              TrainConfig(**{**vars(config), "head_lr": head_lr}), tmp_path / str(head_lr),
              new_parameters=frozenset({"layer.bias"}))
        moved[head_lr] = {k: (v - start[k]).abs().max().item() for k, v in model.state_dict().items()}
    assert moved[1e-1]["layer.bias"] > 1e3 * moved[0.0]["layer.bias"]  # the head at 1e-1, not 1e-6
    assert moved[1e-1]["layer.weight"] == pytest.approx(moved[0.0]["layer.weight"], rel=1e-4)  # the rest unchanged
