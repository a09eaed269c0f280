#!/usr/bin/env python
"""Train and evaluate dense retrievers, ERNIE-Search style. With no arguments: the embedded demo.

Examples:
    python run_pipeline.py                                   # demo: generated data, tiny BERT, no download
    python run_pipeline.py --plan distill.tau_de=0.1         # what would run, resume or be reused; writes nothing
    python run_pipeline.py run.name=try1 eval.index.kind=hnsw distill.train.lr=3e-4
    python run_pipeline.py evaluate runs/demo/distill-<hash> --data runs/demo_assets/data
    accelerate launch --config_file configs/accelerate/8gpu_ddp.yaml run_pipeline.py --config configs/msmarco_bert_base.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys

from data.errors import InputError
from pipeline.train import TrainingDiverged

OVERRIDES_HELP = ("Overrides are key.sub=value pairs over the config's fields (see configs/demo.yaml for every "
                  "field). Bad input exits with status 2 and a one-line error.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=OVERRIDES_HELP + " Under `accelerate launch` every stage's batch_size is the global batch, split over "
        "the processes (see configs/accelerate/). A run stopped by the numerical guard exits with status 1.\n\n"
        "Evaluate a saved model without training: run_pipeline.py evaluate MODEL --data DIR "
        "(see run_pipeline.py evaluate --help).",
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


def build_evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_pipeline.py evaluate",
        description="Evaluate a dual-encoder on a BEIR dataset without training, through the stages' own "
        "evaluation (FAISS search, MRR@10, nDCG@10, Recall@k), optionally re-ranking its top eval.rerank_depth "
        "with a cross-encoder or ColBERT. Prints the table and writes the metrics (with each query's nDCG@10) as JSON.",
        epilog=OVERRIDES_HELP + " The eval section sets lengths, depth, index and batch size; model.pooling and "
        "model.normalize apply to a plain encoder only (the other folders carry their own).",
    )
    parser.add_argument("model", metavar="MODEL", help="a dual-encoder folder of this project (or a stage folder, or "
                        "its final/, holding one), a sentence-transformers folder, a plain encoder folder, or a hub id "
                        "(needs the hub online)")
    parser.add_argument("--data", required=True, metavar="DIR", help="BEIR-layout folder (corpus.jsonl, queries.jsonl, "
                        "qrels/<split>.tsv)")
    parser.add_argument("--split", help="qrels split to evaluate (default: eval.split, test)")
    parser.add_argument("--rerank", action="append", default=[], metavar="PATH", help="re-rank the dual-encoder's top "
                        "eval.rerank_depth with this cross-encoder folder or ColBERT folder (colbert.json); repeatable. "
                        "A ColBERT that shares its dual-encoder's encoder (a distill stage's final/colbert) reads MODEL's "
                        "token states, so pass that stage's dual-encoder as MODEL")
    parser.add_argument("--bm25", action="store_true", help="add BM25 on the same split as a reference row")
    parser.add_argument("--output", metavar="FILE", help="where to write the JSON (default: "
                        "<run.output_dir>/evaluate/<model>--<data>--<split>.json)")
    parser.add_argument("--config", help="YAML config file (default: the built-in demo config)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    evaluating = argv[:1] == ["evaluate"]
    args = (build_evaluate_parser().parse_intermixed_args(argv[1:]) if evaluating
            else build_parser().parse_intermixed_args(argv))
    configure_logging()
    try:
        from pipeline.config import load_config

        config = load_config(args.config, args.overrides)
        if evaluating:
            _evaluate(args, config)
        else:
            _train(args, config)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _train(args: argparse.Namespace, config) -> None:
    from pipeline.ablation import ablated, load_variants, run_ablation
    from pipeline.run import run

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


def _evaluate(args: argparse.Namespace, config) -> None:
    from pathlib import Path

    from pipeline.evaluate_model import default_output, evaluate_model
    from pipeline.io import write_json_atomic
    from pipeline.report import metrics_table

    split = args.split or config.eval.split
    record = evaluate_model(config, args.model, args.data, split, args.rerank, args.bm25)
    output = Path(args.output) if args.output else default_output(config, args.model, args.data, split)
    try:
        write_json_atomic(output, record)
    except OSError as e:
        raise InputError(f"cannot write the results ({e.strerror})", output) from None
    print(f"{record['kind']} {record['model']} on {record['data']} ({split}, {record['queries']} queries, "
          f"{record['corpus']} passages)")
    print(metrics_table(list(record["metrics"].items()), ("ndcg@10", "mrr@10", "recall@100")))
    print(f"written to {output}")


def configure_logging() -> None:
    """Pipeline progress at INFO on stderr; the libraries' own progress bars and chatter off."""
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


if __name__ == "__main__":
    sys.exit(main())
