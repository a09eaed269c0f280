"""Ablation variants: the same pipeline with distill terms switched off, sharing upstream stages."""

from __future__ import annotations

import dataclasses
import re

from data.errors import InputError
from pipeline.config import PipelineConfig, check_config, yaml_problem
from pipeline.distributed import world
from pipeline.plan import stage_plan
from pipeline.report import write_ablation_report
from pipeline.run import run
from pipeline.stages.configs import DISTILL_TERMS, term_weights

BASELINE = "full"  # the full run's row in the ablation table; no variant may take its name
VARIANT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # variants name files: config-<variant>.yaml


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


def check_variant(config: PipelineConfig, name, terms: list[str], source: str) -> None:
    """A variant that can be told apart: a name that is a file name and not the baseline's, and terms that
    some stage of the run uses (otherwise its results would equal the full run's); ``source`` names where
    it was given (``--ablate`` or the variants file)."""
    where = f"{source}: variant {name!r}"
    if not isinstance(name, str):
        raise InputError(f"{where}: a variant name must be a string, got {type(name).__name__} (YAML reads an "
                         "unquoted yes, no, on, off, true, false or a number as such: quote it)")
    if not VARIANT_NAME.fullmatch(name) or name == BASELINE:
        raise InputError(f"{where}: expected a name of letters, digits, . _ - (not starting with . or -) other "
                         f"than '{BASELINE}', the full run's")
    if not terms:
        raise InputError(f"{where}: no term to switch off, so it would equal the full run")
    variant = ablated(config, terms)
    trained = [s for s in config.stage_names if s in ("warmup", "distill")]
    for term in terms:
        if not any(term_weights(getattr(config, s))[term] for s in trained):
            raise InputError(f"{where}: no stage of run.stages ({config.run.stages}) trains with the term '{term}' "
                             "(no warmup or distill stage, or its weight is already 0), so the variant would equal "
                             "the full run")
    try:
        check_config(variant)
        stage_plan(variant)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def load_variants(path: str) -> dict[str, list[str]]:
    """A YAML mapping ``variant name -> [terms switched off]``; the names are checked by :func:`check_variant`."""
    import yaml

    try:
        variants = yaml.safe_load(open(path, encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason} at byte {e.start})", path) from None
    except OSError as e:
        raise InputError(f"cannot read variants file ({e.strerror})", path) from None
    except yaml.YAMLError as e:
        raise InputError(f"invalid YAML ({yaml_problem(e)})", path) from None
    if not isinstance(variants, dict) or not all(
        isinstance(terms, list) and all(isinstance(t, str) for t in terms) for terms in variants.values()
    ):
        raise InputError("expected a mapping of variant name to a list of terms to switch off", path)
    for terms in variants.values():
        ablated(PipelineConfig(), terms)  # unknown terms fail here, before anything runs
    return variants


def run_ablation(config: PipelineConfig, variants: dict[str, list[str]], only: list[str] | None = None) -> dict:
    """Run the full pipeline and every variant (shared stages run once); write ``ablation.md`` (and
    ``ablation.html``, ``ablation.png``).

    The table compares the last stage's models, variant by variant, with each one's difference to
    the full run, like a paper's ablation table.
    """
    results = {BASELINE: run(config, only)}
    for name, terms in variants.items():
        results[name] = run(ablated(config, terms), only, variant=name)
    if world()[0] == 0:  # one process writes the report
        print(write_ablation_report(config.run_dir, results, variants, config.stage_names[-1]))
    return results
