#!/usr/bin/env python
"""Fault-injection harness: SIGKILL the pipeline at many points, rerun it, compare with a clean run.

Kill points are of three kinds, cycled: at a random time after start; the moment a checkpoint is
being written (a ``.tmp-step-*`` folder appears); and during a stage's evaluation (its ``final/``
exists but its ``DONE.json`` does not yet). After the kills the run is completed by a plain rerun,
and every stage's metrics and the distilled dual-encoder's weights must equal an uninterrupted
run's. Prints the kill points and exits 1 on any difference.

    python tests/fault_injection.py --kills 10 --out /tmp/faults
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_pipeline import TINY  # noqa: E402

KINDS = ("random", "checkpoint", "evaluation")
# Longer stages and a checkpoint every step than the tests' tiny run, so kills land everywhere.
HARNESS = ["teacher.train.epochs=6", "distill.train.epochs=8", "posttrain.train.epochs=3",
           "posttrain.train.checkpoint_every=1", "teacher.train.checkpoint_every=1", "distill.train.checkpoint_every=1"]


def command(out: Path, name: str) -> list[str]:
    return [sys.executable, str(ROOT / "run_pipeline.py"), f"run.output_dir={out}", f"run.name={name}",
            "run.stages=posttrain,teacher,distill", *TINY, *HARNESS]


def finished(run_dir: Path) -> bool:
    return (run_dir / "report.md").exists() and len(list(run_dir.glob("*-*/DONE.json"))) == 3


def trigger(kind: str, run_dir: Path, started: float, delay: float) -> bool:
    if kind == "random":
        return time.monotonic() - started > delay
    if kind == "checkpoint":
        return any(run_dir.glob("*-*/checkpoints/.tmp-step-*"))
    return any((p / "final").exists() and not (p / "DONE.json").exists() for p in run_dir.glob("*-*"))


def kill_once(out: Path, name: str, kind: str, rng: random.Random, env: dict) -> str | None:
    """Start the run and kill it when ``kind`` triggers; None if it finished first."""
    run_dir = out / name
    victim = subprocess.Popen(command(out, name), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started, delay = time.monotonic(), rng.uniform(2.0, 12.0)
    while victim.poll() is None:
        if trigger(kind, run_dir, started, delay):
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            stages = sorted(p.parent.name.split("-")[0] for p in run_dir.glob("*-*/DONE.json"))
            return f"{kind} kill after {time.monotonic() - started:.1f}s (finished stages: {stages or 'none'})"
        time.sleep(0.002)
    return None


def outcome(run_dir: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    metrics = {p.parent.parent.name.split("-")[0]: json.loads(p.read_text()) for p in run_dir.glob("*-*/eval/metrics.json")}
    (distill,) = run_dir.glob("distill-*")
    weights = load_file(distill / "final" / "dual_encoder" / "model.safetensors")
    return metrics, weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="a scratch folder (it is written to)")
    args = parser.parse_args(argv)
    out, rng = Path(args.out), random.Random(args.seed)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    subprocess.run(command(out, "clean"), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import torch

    clean_metrics, clean_weights = outcome(out / "clean")
    points, victims, same = [], 0, True
    while len(points) < args.kills:
        # Each victim run is killed until it finishes on its own; then it is checked and a new one starts.
        victims += 1
        name = f"killed-{victims}"
        while not finished(out / name):
            point = kill_once(out, name, KINDS[len(points) % len(KINDS)], rng, env)
            if point:
                points.append(point)
                print(f"kill {len(points)} ({name}): {point}", flush=True)
        metrics, weights = outcome(out / name)
        equal = metrics == clean_metrics and all(torch.equal(clean_weights[k], weights[k]) for k in clean_weights)
        print(f"{name}: results {'equal' if equal else 'DIFFER from'} the uninterrupted run", flush=True)
        same = same and equal
    print(f"{len(points)} kill points over {victims} runs; results {'equal' if same else 'DIFFER from'} "
          "the uninterrupted run")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
