#!/usr/bin/env python
"""Train and evaluate dense retrievers, ERNIE-Search style. With no arguments: the embedded demo.

Examples:
    python run_pipeline.py                                   # demo: generated data, tiny BERT, no download
    python run_pipeline.py --plan distill.tau_de=0.1         # what would run, resume or be reused; writes nothing
    python run_pipeline.py --check data.path=/data/beir      # validate config, data and model; train nothing
    python run_pipeline.py run.name=try1 eval.index.kind=hnsw distill.train.lr=3e-4
    python run_pipeline.py evaluate runs/demo/distill-<hash> --data runs/demo_assets/data
    accelerate launch --config_file configs/accelerate/8gpu_ddp.yaml run_pipeline.py --config configs/msmarco_bert_base.yaml
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from data.errors import InputError
from pipeline.interrupt import EXIT_STATUS as INTERRUPTED, Interrupted, handle_ctrl_c
from pipeline.train import TrainingDiverged

OVERRIDES_HELP = ("Overrides are key.sub=value pairs over the config's fields (listed below, and in "
                  "configs/demo.yaml). Bad input exits with status 2 and a one-line error, before anything runs.")


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (not the usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def fields_help() -> str:
    """Every config field with its type, what it accepts and its default (the same table as the README's)."""
    from pipeline.config import field_rows

    rows = field_rows()
    width = max(len(key) for key, *_ in rows)
    lines = [f"  {key:<{width}}  {kind:<5}  {accepts}  (default {default})" for key, kind, accepts, default in rows]
    return "Config fields (key, type, what it accepts, default):\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="run_pipeline.py",
        description=__doc__.split("\n\n")[0],
        epilog=OVERRIDES_HELP + " Under `accelerate launch` every stage's batch_size is the global batch, split over "
        "the processes (see configs/accelerate/). A run stopped by the numerical guard exits with status 1, by "
        "Ctrl-C with status 130 (rerun the same command to resume; a second Ctrl-C exits at once).\n\n"
        "Evaluate a saved model without training: run_pipeline.py evaluate MODEL --data DIR "
        "(see run_pipeline.py evaluate --help).\n\n" + fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (default: the built-in demo config)")
    parser.add_argument("--stages", help="run or rerun only these stages (comma-separated), reading the "
                        "other stages' final/ outputs; stages: posttrain, teacher, scores, warmup, refresh, distill")
    parser.add_argument("--ablate", help="also run a variant with these distill terms switched off "
                        "(comma-separated; terms: ce, col, de, kl_ce_col, kl_col_de, kl_ce_de, attn, dualreg)")
    parser.add_argument("--variants", help="YAML file mapping variant names to lists of terms to switch off; "
                        "runs them all and ends with one comparison table (ablation.md)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print what the command would do and write nothing: "
                      "each stage's hash and status (done, resumes at step N, will run, reused from another variant), "
                      "and the settings that changed where a finished stage is not reused")
    mode.add_argument("--check", action="store_true", help="run every check of the config, the data and the model "
                      "(and how they fit together) that a run makes before its first stage, then stop; trains nothing "
                      "(the demo's data and model are built if asked for)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def build_evaluate_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    config = None
    with handle_ctrl_c():
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
        except KeyboardInterrupt as error:
            if evaluating:
                print("interrupted; nothing was written", file=sys.stderr)
            else:
                print(error if isinstance(error, Interrupted) else Interrupted(), file=sys.stderr)
            return INTERRUPTED
        except Exception as error:  # a bug or a library's failure: one line here, the traceback in the log
            writes = not (evaluating or args.plan or args.check) and config is not None
            kept = keep_traceback(config.run_dir if writes else None)
            what = ": ".join([type(error).__name__, *str(error).strip().splitlines()[:1]])
            print(f"error: {what} (the traceback is in {kept})", file=sys.stderr)
            return 2
    return 0


def keep_traceback(run_dir: Path | None) -> Path:
    """Append the exception being handled, with its traceback, to the run folder's log (or a temporary file)."""
    from pipeline.run import LOG_FILE

    text = f"{time.strftime('%Y-%m-%d %H:%M:%S')} unexpected error:\n{traceback.format_exc()}"
    fallback = Path(tempfile.gettempdir()) / f"run_pipeline-{os.getpid()}.log"
    for path in ([run_dir / LOG_FILE] if run_dir is not None and run_dir.is_dir() else []) + [fallback]:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return fallback


def _train(args: argparse.Namespace, config) -> None:
    from pipeline.ablation import ablated, check_variant, load_variants, run_ablation
    from pipeline.run import run

    only = [name.strip() for name in args.stages.split(",")] if args.stages else None
    variants = load_variants(args.variants) if args.variants else {}
    given_in = dict.fromkeys(variants, args.variants)
    if args.ablate:
        terms = [term.strip() for term in args.ablate.split(",")]
        name = "no-" + "-".join(terms)
        if name in variants:
            raise InputError(f"--ablate: its variant {name!r} is also in the variants file {args.variants}")
        variants[name], given_in[name] = terms, "--ablate"
    for name, terms in variants.items():
        check_variant(config, name, terms, given_in[name])  # before anything runs
    if args.plan:
        from pipeline.plan import describe_plan

        print(describe_plan([("full", config)] + [(name, ablated(config, terms)) for name, terms in variants.items()], only))
    elif args.check:
        from pipeline.run import prepare

        checked = prepare(config, only)
        split = config.data.train_split
        print(f"ok: {len(checked.data.corpus)} passages, {len(checked.data.judged_queries(split))} training queries "
              f"('{split}'), {len(checked.data.judged_queries(config.eval.split))} evaluation queries "
              f"('{config.eval.split}'), model {checked.model_path}; the stages {config.run.stages} can start")
    elif variants:
        run_ablation(config, variants, only)
    else:
        run(config, only)


def _evaluate(args: argparse.Namespace, config) -> None:
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
    status = main()
    if status == INTERRUPTED:  # a further Ctrl-C while the interpreter shuts down ends it at once, silently
        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(INTERRUPTED))
    sys.exit(status)
