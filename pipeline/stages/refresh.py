"""``refresh``: replace the BM25 negatives with the current dual-encoder's top-ranked non-relevant passages."""

from __future__ import annotations

import dataclasses

from data.negatives import negatives_from_ranking
from models.dual_encoder import DualEncoder
from pipeline.evaluate import dense_search
from pipeline.io import atomic_dir, write_jsonl_atomic
from pipeline.stages.common import StageContext, evaluate_dual_encoder
from pipeline.stages.configs import RefreshConfig

NEGATIVES_FILE = "negatives.jsonl"


def run_refresh(ctx: StageContext, stage: RefreshConfig) -> dict[str, dict[str, float]]:
    config = ctx.config
    model = DualEncoder.from_pretrained(ctx.inputs["dual_encoder"], pooling=config.model.pooling,
                                        normalize=config.model.normalize,
                                        trust_remote_code=config.model.trust_remote_code).to(ctx.device).eval()
    split = config.data.train_split
    query_ids = ctx.data.judged_queries(split)
    most_positives = max(len(ctx.data.qrels[split][q]) for q in query_ids)
    search = dataclasses.replace(config.eval, top_k=stage.skip_top + stage.depth + most_positives)
    ranking = dense_search(model.encode_queries, model.encode_passages, ctx.tokenizer, ctx.data, query_ids, search,
                           device=ctx.device)
    mined = negatives_from_ranking(ranking, ctx.data.qrels[split], stage.skip_top + stage.depth)
    if ctx.accelerator.is_main_process:
        rows = ({"query_id": q, "negatives": mined[q][stage.skip_top :]} for q in query_ids)
        with atomic_dir(ctx.stage_dir / "final") as staging:
            write_jsonl_atomic(staging / NEGATIVES_FILE, rows)
    ctx.accelerator.wait_for_everyone()
    return {"dual-encoder (mining)": evaluate_dual_encoder(ctx, model)[0]}
