"""``scores``: a frozen teacher, scored once, whose scores the distillation stages read.

The teacher is a hybrid ranker: BM25, the starting dual-encoder and (optionally) the dual-encoder
an earlier ``warmup`` or ``distill`` stage trained, cross-fitted dual-encoders this stage trains
itself, and the trained cross-encoder, each z-normalised over a query's candidate list and summed
with weights. On
SciFact-like data no single small model is a better teacher than the student, but lexical and
neural scores fused often are (hybrid retrieval). Scoring once (as Margin-MSE, TAS-B, GPL and
ColBERTv2 do) also takes the teacher's forward out of every training step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed

from data.collate import tokenize
from models.cross_encoder import CrossEncoder
from models.dual_encoder import DualEncoder
from pipeline.distributed import gather_objects, world
from pipeline.evaluate import encode
from pipeline.io import atomic_dir, write_json_atomic, write_jsonl_atomic
from pipeline.metrics import Ranking
from pipeline.stages.common import (TEACHER_SCORES_FILE, StageContext, cross_encoder_scorer, ranking_metrics,
                                    read_teacher_scores, rerank_label)
from pipeline.stages.configs import SCORE_COMPONENTS, DistillConfig, LossWeights, ScoresConfig
from pipeline.stages.distill import run_distill

__all__ = ["TEACHER_SCORES_FILE", "read_teacher_scores", "run_scores", "fold_of", "fuse", "zscore"]

log = logging.getLogger(__name__)
CROSS_FITTED = "cross_fitted_dual_encoder"
FOLD_METRICS = "metrics.json"  # a cross-fitted model's evaluation, written last: the fold is done


def zscore(scores: np.ndarray) -> np.ndarray:
    """``(s - mean(s)) / std(s)`` over one candidate list; all zeros when the scores are all equal.

    >>> zscore(np.array([1.0, 2.0, 3.0])).round(4).tolist()
    [-1.2247, 0.0, 1.2247]
    >>> zscore(np.array([5.0, 5.0])).tolist()
    [0.0, 0.0]
    """
    scores = np.asarray(scores, dtype=np.float64)
    std = scores.std()
    return np.zeros_like(scores) if std < 1e-12 else (scores - scores.mean()) / std


def fuse(components: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """``sum_k w_k * zscore(s_k)`` over one candidate list (components with weight 0 are left out).

    >>> fuse({"bm25": np.array([0.0, 10.0]), "dual_encoder": np.array([0.9, 0.1])}, {"bm25": 1.0, "dual_encoder": 1.0})
    array([0., 0.])
    """
    return sum(w * zscore(components[name]) for name, w in weights.items() if w)


def correct_with_labels(scores: np.ndarray, positive: np.ndarray, margin: float) -> np.ndarray:
    """Each positive lifted to at least ``max(negative scores) + margin``; negatives unchanged.

    >>> correct_with_labels(np.array([0.5, 2.0, 1.0, 3.0]), np.array([True, False, False, True]), 1.0).tolist()
    [3.0, 2.0, 1.0, 3.0]
    """
    if positive.all() or not positive.any():
        return scores
    floor = scores[~positive].max() + margin
    return np.where(positive, np.maximum(scores, floor), scores)


def fold_of(query_id: str, folds: int) -> int:
    """The cross-fitting fold of a training query: sha256("fold:" + id) mod ``folds`` (its id alone decides).

    >>> [fold_of(q, 2) for q in ("q1", "q2", "q3", "q4")]
    [1, 0, 0, 1]
    """
    return int(hashlib.sha256(f"fold:{query_id}".encode()).hexdigest(), 16) % folds


def train_cross_fitted(ctx: StageContext, stage: ScoresConfig) -> tuple[list[Path], dict[str, dict[str, float]]]:
    """Fold k's dual-encoder trained on the training queries outside fold k; its folder and eval metrics.

    Each model is a contrastive (``de`` only) ``distill`` run from the starting encoder in
    ``<stage>/fold-k``, resumable like any stage; a finished one (its ``final`` written) is read back.
    """
    fit, split = stage.cross_fit, ctx.config.data.train_split
    qrels = ctx.data.qrels[split]
    config = dataclasses.replace(ctx.config, run=dataclasses.replace(ctx.config.run, seed=fit.seed))
    contrastive = LossWeights(**{term: float(term == "de") for term in vars(LossWeights())})
    student = DistillConfig(train=fit.train, batch_size=fit.batch_size, group_size=fit.group_size, tau_de=fit.tau,
                            teacher="scores", weights=contrastive)
    folders, metrics = [], {}
    for k in range(fit.folds):
        fold_dir = ctx.stage_dir / f"fold-{k}"
        folders.append(fold_dir / "final" / "dual_encoder")
        kept = {q: judged for q, judged in qrels.items() if fold_of(q, fit.folds) != k}
        label = f"cross-fitted dual-encoder {k} (trained on {len(kept)} of {len(qrels)} queries)"
        if (fold_dir / FOLD_METRICS).exists():
            log.info("scores: cross-fitted model %d of %d already trained (%s)", k + 1, fit.folds, fold_dir.name)
            metrics[label] = json.loads((fold_dir / FOLD_METRICS).read_text())
            continue
        log.info("scores: training cross-fitted model %d of %d on %d of %d training queries", k + 1, fit.folds,
                 len(kept), len(qrels))
        data = dataclasses.replace(ctx.data, qrels={**ctx.data.qrels, split: kept})
        fold_ctx = dataclasses.replace(ctx, config=config, data=data, stage_dir=fold_dir,
                                       inputs={**ctx.inputs, "dual_encoder": ctx.inputs["encoder"]})
        fold_ctx.__dict__["text"] = ctx.text  # tokenised once: a fold's queries are among the stage's
        set_seed(fit.seed + k)
        metrics[label] = run_distill(fold_ctx, student)["dual-encoder"]
        if ctx.accelerator.is_main_process:
            write_json_atomic(fold_dir / FOLD_METRICS, metrics[label])
        ctx.accelerator.wait_for_everyone()
    return folders, metrics


class HybridTeacher:
    """Scores (query, candidates) lists with every component whose weight is non-zero, then fuses them.

    ``cross_fitted`` are the folders of the cross-fitted models, fold k's first; ``score(lists,
    folds)`` scores a query of fold k with model k alone, and any other query with their mean.
    """

    def __init__(self, ctx: StageContext, stage: ScoresConfig, cross_fitted: list[Path] = ()):
        self.ctx, self.weights = ctx, {name: getattr(stage, name) for name in SCORE_COMPONENTS}
        self.passage_max_len = stage.passage_max_len or ctx.config.eval.passage_max_len
        self.row = {doc: i for i, doc in enumerate(ctx.data.corpus["_id"])}
        trust = ctx.config.model.trust_remote_code
        self.cross_encoder = None
        load = lambda path: DualEncoder.from_pretrained(path, pooling=ctx.config.model.pooling,  # noqa: E731
                                                        normalize=ctx.config.model.normalize,
                                                        trust_remote_code=trust).to(ctx.device).eval()
        # component -> its models: the starting encoder, the dual-encoder an earlier stage trained,
        # the cross-fitted ones (one per fold)
        self.dual_encoders = {name: [load(ctx.inputs[role])]
                              for name, role in (("dual_encoder", "encoder"), ("trained_dual_encoder", "dual_encoder"))
                              if self.weights[name]}
        if self.weights[CROSS_FITTED]:
            self.dual_encoders[CROSS_FITTED] = [load(path) for path in cross_fitted]
        # (component, model index) -> passage id -> vector: encoded once for the training and the evaluation lists
        self.passage_vectors: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        if self.weights["cross_encoder"]:
            self.cross_encoder = CrossEncoder.from_pretrained(ctx.inputs["cross_encoder"],
                                                              trust_remote_code=trust).to(ctx.device).eval()

    def passage_ids(self, doc_ids: list[str]) -> list:
        """Token ids of passages at the teacher's length (the stage's cache when it is the eval length)."""
        if self.passage_max_len == self.ctx.config.eval.passage_max_len:
            return self.ctx.text.passages.many(doc_ids)
        return tokenize(self.ctx.tokenizer, self.ctx.data.passage_texts([self.row[d] for d in doc_ids]),
                        self.passage_max_len)

    def dense_scores(self, name: str, index: int, lists: dict[str, list[str]]) -> dict[str, np.ndarray]:
        """``{query id: dot products with its list}`` of model ``index`` of component ``name``."""
        ctx, model = self.ctx, self.dual_encoders[name][index]
        vectors = self.passage_vectors.setdefault((name, index), {})
        new = sorted({d for docs in lists.values() for d in docs} - set(vectors))
        label = name if len(self.dual_encoders[name]) == 1 else f"{name} {index}"
        with ctx.accelerator.autocast():
            if new:
                p_reps = encode(model.encode_passages, self.passage_ids(new), ctx.special,
                                ctx.config.eval.batch_size, ctx.device, f"teacher: encode passages ({label})")
                vectors.update(zip(new, p_reps))
            q_reps = encode(model.encode_queries, [ctx.text.queries[q] for q in lists], ctx.special,
                            ctx.config.eval.batch_size, ctx.device)
        return {q: np.stack([vectors[d] for d in lists[q]]) @ q_reps[i] for i, q in enumerate(lists)}  # (len(list),)

    @torch.inference_mode()
    def score(self, lists: dict[str, list[str]], folds: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """Fused scores of each query's candidate list, ``{query id: (len(list),)}``; call on every process."""
        ctx = self.ctx
        parts: dict[str, dict[str, np.ndarray]] = {qid: {} for qid in lists}
        rank, size = world()
        mine = list(lists)[rank::size]
        if self.weights["bm25"]:
            texts = dict(zip(mine, ctx.data.query_texts(mine)))
            local = {q: ctx.bm25.score_pairs(texts[q], [self.row[d] for d in lists[q]]) for q in mine}
            for part in gather_objects(local) if size > 1 else [local]:
                for q, s in part.items():
                    parts[q]["bm25"] = s
        for name, models in self.dual_encoders.items():
            folds_here = folds or {}
            own = [{q: docs for q, docs in lists.items() if folds_here.get(q) == k} for k in range(len(models))]
            rest = {q: docs for q, docs in lists.items() if folds_here.get(q) is None}
            for k, chosen in enumerate(own):
                for q, s in (self.dense_scores(name, k, chosen) if chosen else {}).items():
                    parts[q][name] = s
            if rest:
                each = [self.dense_scores(name, k, rest) for k in range(len(models))]
                for q in rest:
                    parts[q][name] = np.mean([scores[q] for scores in each], axis=0)
        if self.cross_encoder is not None:
            score_pairs = cross_encoder_scorer(ctx, self.cross_encoder)
            local = {}
            for q in mine:
                docs, chunks = lists[q], []
                for start in range(0, len(docs), ctx.config.eval.batch_size):
                    chunk = docs[start : start + ctx.config.eval.batch_size]
                    with ctx.accelerator.autocast():
                        chunks.append(score_pairs([ctx.text.queries[q]] * len(chunk),
                                                  self.passage_ids(chunk)).float().cpu().numpy())
                local[q] = np.concatenate(chunks)
            for part in gather_objects(local) if size > 1 else [local]:
                for q, s in part.items():
                    parts[q]["cross_encoder"] = s
        return {q: fuse(parts[q], self.weights) for q in lists}


def positive_probability(scores: dict[str, np.ndarray], lists: dict[str, list[str]], qrels, tau: float = 1.0,
                         group_size: int = 0, samples: int = 5, seed: int = 0) -> float:
    """How sure a teacher is: the mean softmax(scores / tau) mass on the positives.

    Over each query's whole list, or (``group_size`` > 0) over groups like the ones the KL terms see:
    one positive and ``group_size - 1`` of the list's negatives, ``samples`` random groups per query.

    >>> round(positive_probability({"q": np.array([1.0, 0.0])}, {"q": ["a", "b"]}, {"q": {"a": 1}}), 4)
    0.7311
    >>> round(positive_probability({"q": np.array([1.0, 0.0, 0.0])}, {"q": ["a", "b", "c"]}, {"q": {"a": 1}},
    ...                            group_size=2), 4)
    0.7311
    """
    rng, mass = np.random.default_rng(seed), []
    for q, s in scores.items():
        positive = np.array([qrels[q].get(d, 0) > 0 for d in lists[q]])
        if not group_size:
            p = np.exp((s - s.max()) / tau)
            mass.append(float(p[positive].sum() / p.sum()))
            continue
        pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
        if not len(pos) or len(neg) < group_size - 1:
            continue
        for _ in range(samples):
            group = s[[rng.choice(pos), *rng.choice(neg, group_size - 1, replace=False)]] / tau
            p = np.exp(group - group.max())
            mass.append(float(p[0] / p.sum()))
    return float(np.mean(mass))


def rerank_with(ctx: StageContext, candidates: Ranking, scores: dict[str, np.ndarray]) -> Ranking:
    """Each query's candidates re-ordered by ``scores`` (ties keep the candidates' order)."""
    return {q: [candidates[q][i] for i in np.argsort(-scores[q], kind="stable")] for q in candidates}


def run_scores(ctx: StageContext, stage: ScoresConfig) -> dict[str, dict[str, float]]:
    cross_fitted, results = train_cross_fitted(ctx, stage) if stage.cross_fitted_dual_encoder else ([], {})
    teacher = HybridTeacher(ctx, stage, cross_fitted)
    split = ctx.config.data.train_split
    lists = {q: sorted(d for d, s in ctx.data.qrels[split][q].items() if s > 0) + list(ctx.negatives.get(q, []))
             for q in ctx.data.judged_queries(split)}
    lists = {q: list(dict.fromkeys(docs)) for q, docs in lists.items()}  # a positive never counts twice
    folds = {q: fold_of(q, stage.cross_fit.folds) for q in lists} if cross_fitted else None
    fused = teacher.score(lists, folds)
    if stage.label_correction:
        qrels = ctx.data.qrels[split]
        fused = {q: correct_with_labels(s, np.array([qrels[q].get(d, 0) > 0 for d in lists[q]]), stage.positive_margin)
                 for q, s in fused.items()}
    qrels, group, tau = ctx.data.qrels[split], ctx.config.distill.group_size, ctx.config.distill.tau_ce
    log.info("scores: how sure the teacher is (mean softmax probability on the positive): %.3f over a training list "
             "(%.1f candidates on average) at tau 1; %.3f over a group of distill.group_size=%d at distill.tau_ce=%g",
             positive_probability(fused, lists, qrels), np.mean([len(docs) for docs in lists.values()]),
             positive_probability(fused, lists, qrels, tau, group), group, tau)
    if ctx.accelerator.is_main_process:
        with atomic_dir(ctx.stage_dir / "final") as staging:
            write_jsonl_atomic(staging / TEACHER_SCORES_FILE, (
                {"query_id": q, "scores": {d: round(float(s), 6) for d, s in zip(lists[q], fused[q])}}
                for q in lists))
    ctx.accelerator.wait_for_everyone()
    # How good a teacher it is: the same fusion re-ranking BM25's top candidates on the eval split.
    depth = ctx.config.eval.rerank_depth
    candidates = {q: docs[:depth] for q, docs in ctx.bm25_test_ranking.items()}
    eval_scores = teacher.score(candidates)
    used = " + ".join(f"{name.replace('_', '-')} {w:g}" for name, w in teacher.weights.items() if w)
    label = rerank_label(f"teacher ({used})", "BM25", ctx)
    return {label: ranking_metrics(ctx, rerank_with(ctx, candidates, eval_scores)), **results}
