"""What every stage receives, and the evaluation helpers they share."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from data.beir import BeirData
from data.bm25 import BM25Index
from data.collate import SpecialTokens, cross_inputs, encoder_inputs
from pipeline.batches import TokenizedText
from pipeline.config import PipelineConfig
from pipeline.distributed import gather_objects, world
from pipeline.evaluate import dense_search
from pipeline.metrics import Ranking, evaluate_ranking, query_metrics

PER_QUERY = "ndcg@10 per query"  # {query id: nDCG@10}, kept with each model's metrics for paired tests

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
    bm25: BM25Index | None = None  # the corpus's BM25 index (the ``scores`` stage reads its scores)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def process(self) -> dict[str, int]:
        """``rank`` and ``num_processes`` for a batch source (``run.check_launch`` checked the batch sizes split)."""
        return {"rank": self.accelerator.process_index, "num_processes": self.accelerator.num_processes}

    @cached_property
    def special(self) -> SpecialTokens:
        return SpecialTokens.from_tokenizer(self.tokenizer)

    @cached_property
    def text(self) -> TokenizedText:
        """Every passage and the judged queries of the training and evaluation splits, tokenised once."""
        splits = (self.config.data.train_split, self.config.eval.split)
        query_ids = sorted({q for split in splits for q in self.data.judged_queries(split)})
        return TokenizedText(self.tokenizer, self.data, query_ids,
                             self.config.eval.query_max_len, self.config.eval.passage_max_len)

    @property
    def corpus_ids(self) -> list:
        """Token ids of every passage, in corpus order (``text`` holds them under the eval lengths)."""
        return list(self.text.passages.values())


def evaluate_dual_encoder(ctx: StageContext, model) -> tuple[dict[str, float], Ranking]:
    model.eval()
    query_ids = ctx.data.judged_queries(ctx.config.eval.split)
    with ctx.accelerator.autocast():  # run.mixed_precision applies to evaluation too
        ranking = dense_search(model.encode_queries, model.encode_passages, ctx.tokenizer, ctx.data, query_ids,
                               ctx.config.eval, device=ctx.device, passage_ids=ctx.corpus_ids)
    return ranking_metrics(ctx, ranking), ranking


def ranking_metrics(ctx: StageContext, ranking: Ranking) -> dict:
    """Mean metrics of ``ranking`` on the eval split, with each query's nDCG@10 under :data:`PER_QUERY`."""
    qrels = ctx.data.qrels[ctx.config.eval.split]
    per_query = {q: round(query_metrics(qrels[q], ranking.get(q, []))["ndcg@10"], 6) for q in sorted(qrels)
                 if any(s > 0 for s in qrels[q].values())}
    return {**evaluate_ranking(qrels, ranking), PER_QUERY: per_query}


@torch.inference_mode()
def rerank(ctx: StageContext, candidates: Ranking, score_pairs) -> dict[str, float]:
    """Re-rank each query's top ``eval.rerank_depth`` candidates with ``score_pairs(q_ids, p_ids) -> (N,)``."""
    split, text, depth = ctx.config.eval.split, ctx.text, ctx.config.eval.rerank_depth
    rank, size = world()
    reranked: Ranking = {}
    for qid in list(candidates)[rank::size]:  # each process re-ranks every N-th query
        docs = candidates[qid][:depth]
        scores = []
        for start in range(0, len(docs), ctx.config.eval.batch_size):
            chunk = docs[start : start + ctx.config.eval.batch_size]
            with ctx.accelerator.autocast():
                scores.append(score_pairs([text.queries[qid]] * len(chunk), [text.passages[d] for d in chunk]).float().cpu())
        order = np.argsort(-torch.cat(scores).numpy(), kind="stable")
        reranked[qid] = [docs[i] for i in order]
    if size > 1:
        reranked = {qid: docs for part in gather_objects(reranked) for qid, docs in part.items()}
    metrics = ranking_metrics(ctx, reranked)
    metrics.pop("recall@1000")  # only the top ``depth`` candidates were re-ranked
    return metrics


def rerank_label(model: str, candidates: str, ctx: StageContext) -> str:
    """The report row of a re-ranker: ``cross-encoder (re-rank BM25 top 100)``."""
    return f"{model} (re-rank {candidates} top {ctx.config.eval.rerank_depth})"


def cross_encoder_scorer(ctx: StageContext, cross_encoder):
    cross_encoder.eval()
    special = ctx.special

    def score(q_ids, p_ids):
        batch = {k: v.to(ctx.device) for k, v in cross_inputs(q_ids, p_ids, special).items()}
        return cross_encoder(batch).scores

    return score


def colbert_scorer(ctx: StageContext, dual_encoder, colbert):
    from models.scoring import maxsim_paired

    dual_encoder.eval()
    colbert.eval()
    special = ctx.special

    def tokens(ids, side):
        batch = {k: v.to(ctx.device) for k, v in encoder_inputs(ids, special).items()}
        hidden = None if colbert.encoder is not None else dual_encoder(batch, side=side).last_hidden_state
        return colbert(batch, last_hidden_state=hidden)

    def score(q_ids, p_ids):
        q, p = tokens(q_ids, "query"), tokens(p_ids, "passage")
        return maxsim_paired(q.tokens, q.mask, p.tokens, p.mask)

    return score
