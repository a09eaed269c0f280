#!/usr/bin/env python
"""The README's demo table, from one committed command: the default demo, its contrastive-only ablation
and the same run without post-training.

Runs the pipeline's main job on its embedded default (generated data, tiny random BERT, stages
posttrain, teacher, distill) together with two variants, in a fresh temporary folder: the distill
stage trained with the contrastive ``de`` term alone (same steps, negatives and batches), and the
run without the ``posttrain`` stage (teacher and distill start from the random model, with the same
settings and seed), which shows what post-training is worth downstream. It writes
``benchmarks/results/demo_<cpu|gpu>.{json,md}`` with the machine and the code commit.
Figures move with the CPU: floating-point sums run in a different order on another processor
(vector width, BLAS kernels, thread count), and from random weights the differences grow over
training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from provenance import code_version  # noqa: E402  (benchmarks/, next to this script)

NO_POSTTRAIN = "no-posttrain"
CONTRASTIVE_ONLY = ["ce", "col", "kl_ce_col", "kl_col_de", "kl_ce_de", "attn", "dualreg"]
METRICS = ("ndcg@10", "mrr@10", "recall@100")


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def rows(results: dict) -> list[dict]:
    """The README's rows: every (stage, model) of the full run, then the variants' dual-encoders."""
    names = {"bm25 / bm25": "BM25", "initial / dual-encoder": "initial (random) dual-encoder"}
    out = []
    for stage, models in results["full"].items():
        for model, metrics in models.items():
            name = names.get(f"{stage} / {model}", f"{stage} / {model}")
            out.append({"name": name, **{k: round(metrics[k], 4) for k in METRICS}})
    alone = results["contrastive-only"]["distill"]["dual-encoder"]
    out.append({"name": "distill / dual-encoder, contrastive term alone (same steps, same negatives)",
                **{k: round(alone[k], 4) for k in METRICS}})
    bare = results[NO_POSTTRAIN]["distill"]["dual-encoder"]
    out.append({"name": "distill / dual-encoder, without post-training (run.stages=teacher,distill)",
                **{k: round(bare[k], 4) for k in METRICS}})
    return out


def markdown(record: dict) -> str:
    m = record["machine"]
    lines = [f"# Demo ({record['device']})", "",
             f"`{record['command']}` at code `{record['code']}`, {m['cpu']} ({m['cpu_count']} cores, "
             f"{m['torch_threads']} torch threads), torch {m['torch']}, {record['seconds']:.0f} s in all.", "",
             f"Test split of the generated data ({record['test_queries']} queries), seed {record['seed']}.", "",
             "| stage / model | nDCG@10 | MRR@10 | Recall@100 |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['name']} | {r['ndcg@10']:.4f} | {r['mrr@10']:.4f} | {r['recall@100']:.4f} |" for r in record["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", help="run folder to keep (default: a temporary folder, removed afterwards)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where the JSON and markdown go")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides (none for the README's table; recorded in the JSON)")
    args = parser.parse_args(argv)
    from run_pipeline import configure_logging

    configure_logging()

    import torch

    from pipeline.ablation import run_ablation
    from pipeline.config import load_config
    from pipeline.run import run

    code = code_version()  # before the run: the code that trained the rows
    device = "gpu" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="demo-table-") as scratch:
        config = load_config(None, [f"run.output_dir={args.output_dir or scratch}", *args.overrides])
        started = time.perf_counter()
        results = run_ablation(config, {"contrastive-only": CONTRASTIVE_ONLY})
        stages = ",".join(name for name in config.stage_names if name != "posttrain")
        results[NO_POSTTRAIN] = run(replace(config, run=replace(config.run, stages=stages)), variant=NO_POSTTRAIN)
        seconds = time.perf_counter() - started
    record = {
        "benchmark": "demo", "command": " ".join(["python benchmarks/demo_table.py", *args.overrides]), "device": device,
        "code": code, "overrides": args.overrides,
        "machine": machine(), "seconds": round(seconds, 1), "seed": config.run.seed,
        "test_queries": config.demo.n_test_queries, "rows": rows(results),
        "note": "figures move with the CPU (floating-point order differs between processors and the differences "
                "grow over training from random weights): compare runs on the same machine",
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"demo_{device}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"demo_{device}.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
