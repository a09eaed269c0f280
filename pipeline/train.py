"""The one training loop, shared by every stage (Accelerate's checkpointing pattern).

A stage supplies ``batch_at(epoch, index)`` (a pure function, so data order depends on nothing
but seed, epoch and index; under N processes it returns this process's share of the global
batch) and ``step(model, batch) -> {term: unweighted loss}``, where ``model`` is the prepared
(possibly DDP-wrapped) module and the step calls it exactly once. The loop owns the weighted sum,
gradient accumulation, clipping, mixed precision, the learning-rate schedule, logging,
checkpoints and resume.
"""

from __future__ import annotations

import json
import logging
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from data.errors import InputError
from data.fields import bounded
from pipeline import interrupt
from pipeline.distributed import any_true, mean_over_processes
from pipeline.io import remove_tree, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)
StepFn = Callable[[torch.nn.Module, Any], dict[str, torch.Tensor]]
_CHECKPOINT = re.compile(r"^step-(\d+)$")


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of one stage; ``batch_at`` yields one micro-batch per call."""

    epochs: int = bounded(1, ge=1)
    max_steps: int = bounded(0, ge=0)  # optimizer steps; 0: as many as the epochs give
    grad_accum: int = bounded(1, ge=1, note="at most the batches of all epochs")
    lr: float = bounded(5e-5, gt=0)
    weight_decay: float = bounded(0.01, ge=0)
    warmup_ratio: float = bounded(0.1, ge=0, lt=1)
    max_grad_norm: float = bounded(1.0, ge=0)  # 0: no clipping
    log_every: int = bounded(10, ge=1)
    checkpoint_every: int = bounded(50, ge=1)  # optimizer steps
    keep_checkpoints: int = bounded(2, ge=1)
    max_bad_steps: int = bounded(5, ge=1)  # consecutive steps with a non-finite loss or gradient before the run stops
    # Learning rate of the parameters a stage creates from scratch (a cross-encoder's new head, the
    # ColBERT projection): a random head at the encoder's small rate barely moves in a short stage
    # while its gradients flow into the pretrained encoder. 0: the same as ``lr``.
    head_lr: float = bounded(0.0, ge=0)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup then linear decay to 0, a pure function of the step (resume needs no state).

    >>> [round(lr_factor(s, total=10, warmup=2), 2) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class TrainState:
    """Where training stands: saved next to every checkpoint, read back on resume."""

    step: int = 0  # optimizer steps taken (skipped ones included, so the schedule and data stay aligned)
    micro_step: int = 0  # micro-batches consumed, across epochs
    skipped_steps: int = 0  # steps dropped for a non-finite loss or gradient
    bad_in_a_row: int = 0
    num_processes: int = 1  # who wrote the checkpoint: resuming needs the same number

    def position(self, batches_per_epoch: int) -> tuple[int, int]:
        return divmod(self.micro_step, batches_per_epoch)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint (``step-N`` with its state file), or None."""
    found = [
        (int(m.group(1)), p)
        for p in checkpoint_dir.glob("step-*")
        if (m := _CHECKPOINT.match(p.name)) and (p / "train_state.json").exists()
    ]
    return max(found)[1] if found else None


def _save_checkpoint(accelerator: Accelerator, state: TrainState, checkpoint_dir: Path, keep: int) -> None:
    final = checkpoint_dir / f"step-{state.step}"
    staging = checkpoint_dir / f".tmp-step-{state.step}"
    if accelerator.is_main_process:
        remove_tree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        write_json_atomic(staging / "train_state.json", vars(state))
        remove_tree(final)
        staging.rename(final)
        done = sorted((int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := _CHECKPOINT.match(p.name)))
        for _, old in done[:-keep]:
            remove_tree(old)
    accelerator.wait_for_everyone()


def train(
    accelerator: Accelerator,
    model: torch.nn.Module,
    step_fn: StepFn,
    batch_at: Callable[[int, int], Any],
    batches_per_epoch: int,
    weights: dict[str, float],
    config: TrainConfig,
    stage_dir: Path,
    new_parameters: frozenset[str] = frozenset(),
) -> TrainState:
    """Train ``model`` (already free of its optimizer) and return the final state.

    ``step_fn`` returns unweighted loss terms by name; only terms with a non-zero weight may be
    returned (a term switched off is never computed). Resumes from ``stage_dir/checkpoints`` when a
    checkpoint is there. ``new_parameters`` (names in ``model.named_parameters()``) train at
    ``config.head_lr`` when it is set.
    """
    if batches_per_epoch < 1:
        raise ValueError("no training batches")
    total_micro = config.epochs * batches_per_epoch
    total_steps = total_micro // config.grad_accum
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    warmup = int(config.warmup_ratio * total_steps)
    groups: dict[tuple[float, float], list] = {}  # (lr, weight decay) -> parameters
    for name, param in model.named_parameters():
        if param.requires_grad:
            lr = config.head_lr if config.head_lr and name in new_parameters else config.lr
            decay = 0.0 if param.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else config.weight_decay
            groups.setdefault((lr, decay), []).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in sorted(groups.items())],
        lr=config.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    accelerator.free_memory()  # forget earlier stages' objects: a checkpoint holds this stage's alone
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    checkpoint_dir = stage_dir / "checkpoints"
    log_path = stage_dir / "train_log.jsonl"
    state = TrainState(num_processes=accelerator.num_processes)
    resume_from = latest_checkpoint(checkpoint_dir)
    if resume_from is not None:
        saved = TrainState(**json.loads((resume_from / "train_state.json").read_text()))
        if saved.num_processes != accelerator.num_processes:
            raise InputError(
                f"the checkpoint was written by {saved.num_processes} process(es) and this run has "
                f"{accelerator.num_processes}: resume with --num_processes {saved.num_processes}, or delete "
                "the checkpoints folder to train this stage again", resume_from)
        accelerator.load_state(str(resume_from))
        state = saved
        log.info("resumed from %s (step %d)", resume_from, state.step)
    if accelerator.is_main_process and log_path.exists():
        _truncate_log(log_path, state.step)

    model.train()
    # A bar on a terminal only (tqdm's disable=None); in a log file, one plain line per logging step instead.
    progress = tqdm(total=total_steps, initial=state.step, desc=stage_dir.name,
                    disable=None if accelerator.is_main_process else True)
    plain_lines = accelerator.is_main_process and progress.disable
    started, first_step = time.monotonic(), state.step
    running: dict[str, float] = {}
    bad_step = False
    with interrupt.located(step=lambda: state.step):  # Ctrl-C: the message names the step reached
        while state.step < total_steps:
            interrupt.check()  # a Ctrl-C that a library swallowed still stops the run here
            epoch, index = state.position(batches_per_epoch)
            last_micro = (state.micro_step + 1) % config.grad_accum == 0
            # Gradients are averaged over processes once per optimizer step, not per micro-batch.
            with nullcontext() if last_micro else accelerator.no_sync(model):
                terms = step_fn(model, batch_at(epoch, index))
                unknown = [name for name in terms if not weights.get(name)]
                if unknown:
                    raise RuntimeError(f"step returned terms with no weight: {unknown}")
                loss = sum(weights[name] * value for name, value in terms.items())
                # Every process skips together: one skipping backward alone would hang the others.
                finite = not any_true(not bool(torch.isfinite(loss)), accelerator.device)
                if finite:
                    accelerator.backward(loss / config.grad_accum)
            bad_step = bad_step or not finite
            for name, value in {"loss": loss, **terms}.items():
                running[name] = running.get(name, 0.0) + float(value.detach()) / config.grad_accum
            state.micro_step += 1
            if not last_micro:
                continue
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf"))
            if grad_norm is not None:  # None under DeepSpeed, which clips (and checks) in its own step
                bad_step = bad_step or not bool(torch.isfinite(torch.as_tensor(grad_norm)))
            if bad_step:
                state.skipped_steps += 1
                state.bad_in_a_row += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row, %d in all)",
                            state.step + 1, state.bad_in_a_row, state.skipped_steps)
                if state.bad_in_a_row >= config.max_bad_steps:
                    raise TrainingDiverged(
                        f"{stage_dir.name}: {state.bad_in_a_row} steps in a row had a non-finite loss or gradient "
                        f"(max_bad_steps={config.max_bad_steps}); the last good checkpoint is kept in "
                        f"{checkpoint_dir}. Lower the learning rate or check the data."
                    )
            else:
                optimizer.step()
                state.bad_in_a_row = 0
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bad_step = False
            state.step += 1
            progress.update(1)
            if state.step % config.log_every == 0 or state.step == total_steps:
                running = mean_over_processes(running, accelerator.device)  # each process's loss is over its own rows
                factor = scheduler.get_last_lr()[0] / optimizer.param_groups[0]["initial_lr"]  # same for every group
                record = {"step": state.step, "epoch": epoch, "lr": config.lr * factor,
                          "skipped_steps": state.skipped_steps, **running}
                _log(accelerator, log_path, record, prefix=stage_dir.name.split("-")[0])
                progress.set_postfix(loss=f"{running['loss']:.4f}")
                if plain_lines:
                    log.info(progress_line(stage_dir.name, record, total_steps, time.monotonic() - started,
                                           state.step - first_step))
            running = {}
            if state.step % config.checkpoint_every == 0 and state.step < total_steps:
                _save_checkpoint(accelerator, state, checkpoint_dir, config.keep_checkpoints)
    progress.close()
    return state


def progress_line(name: str, record: dict, total_steps: int, elapsed: float, steps_taken: int) -> str:
    """The plain progress line written at each logging step when no terminal shows a bar.

    >>> progress_line("distill-0a1b2c3d", {"step": 30, "epoch": 0, "lr": 4.5e-4, "skipped_steps": 0, "loss": 2.5,
    ...                "de": 1.25}, 300, elapsed=12.0, steps_taken=30)
    'distill-0a1b2c3d step 30/300 (10%): loss 2.5000, de 1.2500, lr 4.50e-04, 12s elapsed, about 1m48s left'
    """
    terms = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "epoch", "lr", "skipped_steps"))
    left = elapsed / max(steps_taken, 1) * (total_steps - record["step"])
    skipped = f", {record['skipped_steps']} skipped" if record["skipped_steps"] else ""
    return (f"{name} step {record['step']}/{total_steps} ({100 * record['step'] // total_steps}%): {terms}, "
            f"lr {record['lr']:.2e}{skipped}, {_duration(elapsed)} elapsed, about {_duration(left)} left")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _truncate_log(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from, so no step is logged twice."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line torn by a crash
            continue
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _log(accelerator: Accelerator, path: Path, record: dict, prefix: str) -> None:
    accelerator.log({f"{prefix}/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
