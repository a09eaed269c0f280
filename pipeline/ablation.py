"""Ablation variants: the same pipeline with distill terms switched off, sharing upstream stages."""

from __future__ import annotations

import dataclasses

from data.errors import InputError
from pipeline.config import PipelineConfig
from pipeline.distributed import world
from pipeline.report import write_ablation_report
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


def load_variants(path: str) -> dict[str, list[str]]:
    """A YAML mapping ``variant name -> [terms switched off]``, checked."""
    import yaml

    try:
        variants = yaml.safe_load(open(path, encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read variants file ({e.strerror})", path) from None
    except yaml.YAMLError as e:
        raise InputError(f"invalid YAML ({getattr(e, 'problem', e)})", path) from None
    if not isinstance(variants, dict) or not all(
        isinstance(terms, list) and all(isinstance(t, str) for t in terms) for terms in variants.values()
    ):
        raise InputError("expected a mapping of variant name to a list of terms to switch off", path)
    for terms in variants.values():
        ablated(PipelineConfig(), terms)  # unknown terms fail here, before anything runs
    return {str(name): terms for name, terms in variants.items()}


def run_ablation(config: PipelineConfig, variants: dict[str, list[str]], only: list[str] | None = None) -> dict:
    """Run the full pipeline and every variant (shared stages run once); write ``ablation.md`` (and
    ``ablation.html``, ``ablation.png``).

    The table compares the last stage's models, variant by variant, with each one's difference to
    the full run, like a paper's ablation table.
    """
    results = {"full": run(config, only)}
    for name, terms in variants.items():
        results[name] = run(ablated(config, terms), only, variant=name)
    if world()[0] == 0:  # one process writes the report
        print(write_ablation_report(config.run_dir, results, variants, config.stage_names[-1]))
    return results
