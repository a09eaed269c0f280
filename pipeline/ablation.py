"""Ablation variants: the same pipeline with distill terms switched off, sharing upstream stages."""

from __future__ import annotations

import dataclasses

from data.errors import InputError
from pipeline.config import PipelineConfig
from pipeline.io import write_text_atomic
from pipeline.report import metrics_table
from pipeline.run import run
from pipeline.stages.configs import DISTILL_TERMS


def ablated(config: PipelineConfig, terms: list[str]) -> PipelineConfig:
    """``config`` with ``terms`` at weight 0 in the warmup and distill stages."""
    unknown = [t for t in terms if t not in DISTILL_TERMS]
    if unknown:
        raise InputError(f"--ablate: unknown term '{unknown[0]}' (terms: {', '.join(DISTILL_TERMS)})")
    off = {t: 0.0 for t in terms}
    return dataclasses.replace(
        config,
        warmup=dataclasses.replace(config.warmup, weights=dataclasses.replace(config.warmup.weights, **off)),
        distill=dataclasses.replace(config.distill, weights=dataclasses.replace(config.distill.weights, **off)),
    )


def run_ablation(config: PipelineConfig, terms: list[str], only: list[str] | None = None) -> dict:
    """Run the variant (finished shared stages are skipped) and write ``ablation.md`` comparing it."""
    name = "no-" + "-".join(terms)
    variants = {"full": run(config, only), name: run(ablated(config, terms), only, variant=name)}
    last = config.stage_names[-1]
    rows = [(f"{variant} / {model}", metrics) for variant, results in variants.items()
            for model, metrics in results[last].items()]
    table = metrics_table(rows, ("ndcg@10", "mrr@10", "recall@100"))
    write_text_atomic(config.run_dir / "ablation.md", f"# Ablation: {', '.join(terms)} off (stage {last})\n\n{table}\n")
    print(table)
    return variants
