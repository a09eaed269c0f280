"""``scores``: a frozen teacher, scored once, whose scores the distillation stages read.

The teacher is a hybrid ranker: BM25, the starting dual-encoder and (optionally) the dual-encoder
an earlier ``warmup`` or ``distill`` stage trained and the trained cross-encoder, each z-normalised
over a query's candidate list and summed with weights. On
SciFact-like data no single small model is a better teacher than the student, but lexical and
neural scores fused often are (hybrid retrieval). Scoring once (as Margin-MSE, TAS-B, GPL and
ColBERTv2 do) also takes the teacher's forward out of every training step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.collate import tokenize
from models.cross_encoder import CrossEncoder
from models.dual_encoder import DualEncoder
from pipeline.distributed import gather_objects, world
from pipeline.evaluate import encode
from pipeline.io import atomic_dir, read_jsonl, write_jsonl_atomic
from pipeline.metrics import Ranking
from pipeline.stages.common import StageContext, cross_encoder_scorer, ranking_metrics, rerank_label
from pipeline.stages.configs import SCORE_COMPONENTS, ScoresConfig

TEACHER_SCORES_FILE = "teacher_scores.jsonl"


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


def read_teacher_scores(path: str | Path) -> dict[str, dict[str, float]]:
    """``{query id: {passage id: fused score}}`` as the ``scores`` stage wrote it."""
    return {row["query_id"]: row["scores"] for row in read_jsonl(Path(path))}


class HybridTeacher:
    """Scores (query, candidates) lists with every component whose weight is non-zero, then fuses them."""

    def __init__(self, ctx: StageContext, stage: ScoresConfig):
        self.ctx, self.weights = ctx, {name: getattr(stage, name) for name in SCORE_COMPONENTS}
        self.passage_max_len = stage.passage_max_len or ctx.config.eval.passage_max_len
        self.row = {doc: i for i, doc in enumerate(ctx.data.corpus["_id"])}
        trust = ctx.config.model.trust_remote_code
        self.cross_encoder = None
        # component -> model: the starting encoder, and the dual-encoder an earlier stage trained
        self.dual_encoders = {name: DualEncoder.from_pretrained(ctx.inputs[role], pooling=ctx.config.model.pooling,
                                                                normalize=ctx.config.model.normalize,
                                                                trust_remote_code=trust).to(ctx.device).eval()
                              for name, role in (("dual_encoder", "encoder"), ("trained_dual_encoder", "dual_encoder"))
                              if self.weights[name]}
        # component -> passage id -> vector: encoded once for the training and the evaluation lists
        self.passage_vectors: dict[str, dict[str, np.ndarray]] = {name: {} for name in self.dual_encoders}
        if self.weights["cross_encoder"]:
            self.cross_encoder = CrossEncoder.from_pretrained(ctx.inputs["cross_encoder"],
                                                              trust_remote_code=trust).to(ctx.device).eval()

    def passage_ids(self, doc_ids: list[str]) -> list:
        """Token ids of passages at the teacher's length (the stage's cache when it is the eval length)."""
        if self.passage_max_len == self.ctx.config.eval.passage_max_len:
            return [self.ctx.text.passages[d] for d in doc_ids]
        texts = self.ctx.data.passage_texts()
        return tokenize(self.ctx.tokenizer, [texts[self.row[d]] for d in doc_ids], self.passage_max_len)

    @torch.inference_mode()
    def score(self, lists: dict[str, list[str]]) -> dict[str, np.ndarray]:
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
        for name, model in self.dual_encoders.items():
            vectors = self.passage_vectors[name]
            new = sorted({d for docs in lists.values() for d in docs} - set(vectors))
            with ctx.accelerator.autocast():
                if new:
                    p_reps = encode(model.encode_passages, self.passage_ids(new), ctx.special,
                                    ctx.config.eval.batch_size, ctx.device, f"teacher: encode passages ({name})")
                    vectors.update(zip(new, p_reps))
                q_reps = encode(model.encode_queries, [ctx.text.queries[q] for q in lists], ctx.special,
                                ctx.config.eval.batch_size, ctx.device)
            for i, q in enumerate(lists):
                p_reps = np.stack([vectors[d] for d in lists[q]])  # (len(list), D)
                parts[q][name] = p_reps @ q_reps[i]  # (len(list),)
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


def rerank_with(ctx: StageContext, candidates: Ranking, scores: dict[str, np.ndarray]) -> Ranking:
    """Each query's candidates re-ordered by ``scores`` (ties keep the candidates' order)."""
    return {q: [candidates[q][i] for i in np.argsort(-scores[q], kind="stable")] for q in candidates}


def run_scores(ctx: StageContext, stage: ScoresConfig) -> dict[str, dict[str, float]]:
    teacher = HybridTeacher(ctx, stage)
    split = ctx.config.data.train_split
    lists = {q: sorted(d for d, s in ctx.data.qrels[split][q].items() if s > 0) + list(ctx.negatives.get(q, []))
             for q in ctx.data.judged_queries(split)}
    lists = {q: list(dict.fromkeys(docs)) for q, docs in lists.items()}  # a positive never counts twice
    fused = teacher.score(lists)
    if stage.label_correction:
        qrels = ctx.data.qrels[split]
        fused = {q: correct_with_labels(s, np.array([qrels[q].get(d, 0) > 0 for d in lists[q]]), stage.positive_margin)
                 for q, s in fused.items()}
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
    return {rerank_label(f"teacher ({used})", "BM25", ctx): ranking_metrics(ctx, rerank_with(ctx, candidates, eval_scores))}
