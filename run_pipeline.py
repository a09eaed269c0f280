#!/usr/bin/env python
"""Train and evaluate dense retrievers, ERNIE-Search style. With no arguments: the embedded demo.

Examples:
    python run_pipeline.py                                   # demo: generated data, tiny BERT, no download
    python run_pipeline.py run.name=try1 eval.index.kind=hnsw distill.train.lr=3e-4
    accelerate launch --config_file configs/accelerate/8gpu_ddp.yaml run_pipeline.py --config configs/msmarco_bert_base.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys

from data.errors import InputError
from pipeline.train import TrainingDiverged


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Overrides are key.sub=value pairs over the config's fields (see configs/demo.yaml for every "
        "field). Under `accelerate launch` every stage's batch_size is the global batch, split over the processes "
        "(see configs/accelerate/). Bad input exits with status 2 and a one-line error; a run stopped by the numerical guard "
        "exits with status 1.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (default: the built-in demo config)")
    parser.add_argument("--stages", help="run or rerun only these stages (comma-separated), reading the "
                        "other stages' final/ outputs; stages: posttrain, teacher, scores, warmup, refresh, distill")
    parser.add_argument("--ablate", help="also run a variant with these distill terms switched off "
                        "(comma-separated; terms: ce, col, de, kl_ce_col, kl_col_de, kl_ce_de, attn, dualreg)")
    parser.add_argument("--variants", help="YAML file mapping variant names to lists of terms to switch off; "
                        "runs them all and ends with one comparison table (ablation.md)")
    parser.add_argument("--plan", action="store_true", help="print what the command would do and write nothing: "
                        "each stage's hash and status (done, resumes at step N, will run, reused from another variant), "
                        "and the settings that changed where a finished stage is not reused")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    for package in ("pipeline", "data", "models"):
        logging.getLogger(package).setLevel(logging.INFO)
    for noisy in ("bm25s", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        from pipeline.config import load_config
        from pipeline.ablation import ablated, load_variants, run_ablation
        from pipeline.run import run

        config = load_config(args.config, args.overrides)
        only = args.stages.split(",") if args.stages else None
        variants = load_variants(args.variants) if args.variants else {}
        if args.ablate:
            variants["no-" + "-".join(args.ablate.split(","))] = args.ablate.split(",")
        for terms in variants.values():
            ablated(config, terms)  # an unknown term fails here, before anything runs
        if args.plan:
            from pipeline.plan import describe_plan

            print(describe_plan([("full", config)] + [(name, ablated(config, terms)) for name, terms in variants.items()], only))
        elif variants:
            run_ablation(config, variants, only)
        else:
            run(config, only)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
