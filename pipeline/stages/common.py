"""What every stage receives, and the evaluation helpers they share."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from accelerate import Accelerator

from data.beir import BeirData
from data.bm25 import BM25Index
from data.collate import SpecialTokens
from pipeline import evaluate
from pipeline.batches import TokenizedText
from pipeline.config import PipelineConfig
from pipeline.evaluate import dense_search
from pipeline.io import read_jsonl
from pipeline.metrics import Ranking

TEACHER_SCORES_FILE = "teacher_scores.jsonl"  # what a ``scores`` stage writes under ``final/``


@dataclass
class StageContext:
    """Inputs of one stage run: nothing else is read."""

    config: PipelineConfig
    accelerator: Accelerator
    data: BeirData
    tokenizer: object
    negatives: dict[str, list[str]]
    stage_dir: Path
    inputs: dict[str, Path]  # role ("encoder", "cross_encoder", "dual_encoder") -> folder to load
    bm25_test_ranking: Ranking
    bm25_dir: Path | None = None  # the run's saved BM25 index (pipeline.run.prepare_bm25)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def process(self) -> dict[str, int]:
        """``rank`` and ``num_processes`` for a batch source (``run.check_launch`` checked the batch sizes split)."""
        return {"rank": self.accelerator.process_index, "num_processes": self.accelerator.num_processes}

    @cached_property
    def bm25(self) -> BM25Index:
        """The corpus's BM25 index (the ``scores`` stage reads its scores), memory-mapped when first asked for."""
        return BM25Index.load(self.bm25_dir, self.config.negatives.bm25)

    @cached_property
    def special(self) -> SpecialTokens:
        return SpecialTokens.from_tokenizer(self.tokenizer)

    @cached_property
    def text(self) -> TokenizedText:
        """The judged queries of the training and evaluation splits, and passages when first read, tokenised once."""
        splits = (self.config.data.train_split, self.config.eval.split)
        query_ids = sorted({q for split in splits for q in self.data.judged_queries(split)})
        return TokenizedText(self.tokenizer, self.data, query_ids,
                             self.config.eval.query_max_len, self.config.eval.passage_max_len)


def evaluate_dual_encoder(ctx: StageContext, model) -> tuple[dict[str, float], Ranking]:
    model.eval()
    query_ids = ctx.data.judged_queries(ctx.config.eval.split)
    with ctx.accelerator.autocast():  # run.mixed_precision applies to evaluation too
        ranking = dense_search(model.encode_queries, model.encode_passages, ctx.tokenizer, ctx.data, query_ids,
                               ctx.config.eval, device=ctx.device)
    return ranking_metrics(ctx, ranking), ranking


def ranking_metrics(ctx: StageContext, ranking: Ranking) -> dict:
    """Mean metrics of ``ranking`` on the eval split, with each query's nDCG@10 under :data:`pipeline.evaluate.PER_QUERY`."""
    return evaluate.ranking_metrics(ctx.data.qrels[ctx.config.eval.split], ranking)


def rerank(ctx: StageContext, candidates: Ranking, score_pairs) -> dict[str, float]:
    """Metrics of each query's top ``eval.rerank_depth`` candidates re-ranked by ``score_pairs(q_ids, p_ids) -> (N,)``."""
    depth = ctx.config.eval.rerank_depth
    ctx.text.passages.many([d for docs in candidates.values() for d in docs[:depth]])  # tokenised together
    ranking = evaluate.rerank(candidates, score_pairs, ctx.text.queries, ctx.text.passages, ctx.config.eval.rerank_depth,
                              ctx.config.eval.batch_size, ctx.accelerator.autocast)
    return evaluate.reranked_metrics(ctx.data.qrels[ctx.config.eval.split], ranking)


def rerank_label(model: str, candidates: str, ctx: StageContext) -> str:
    """The report row of a re-ranker: ``cross-encoder (re-rank BM25 top 100)``."""
    return evaluate.rerank_label(model, candidates, ctx.config.eval.rerank_depth)


def cross_encoder_scorer(ctx: StageContext, cross_encoder):
    return evaluate.cross_encoder_scorer(cross_encoder, ctx.special, ctx.device)


def colbert_scorer(ctx: StageContext, dual_encoder, colbert):
    return evaluate.colbert_scorer(dual_encoder, colbert, ctx.special, ctx.device)


def read_teacher_scores(path: str | Path) -> dict[str, dict[str, float]]:
    """``{query id: {passage id: fused score}}`` as the ``scores`` stage wrote it."""
    return {row["query_id"]: row["scores"] for row in read_jsonl(Path(path))}
