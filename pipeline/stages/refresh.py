"""``refresh``: replace the BM25 negatives with the current dual-encoder's top-ranked non-relevant passages."""

from __future__ import annotations

import dataclasses

from data.negatives import mine_negatives
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

    def search(qids, k):
        with ctx.accelerator.autocast():
            return dense_search(model.encode_queries, model.encode_passages, ctx.tokenizer, ctx.data, qids,
                                dataclasses.replace(config.eval, top_k=k), device=ctx.device)

    mined = mine_negatives(ctx.data.qrels[split], query_ids, search, stage.depth, stage.skip_top)
    if ctx.accelerator.is_main_process:
        rows = ({"query_id": q, "negatives": mined[q]} for q in query_ids)
        with atomic_dir(ctx.stage_dir / "final") as staging:
            write_jsonl_atomic(staging / NEGATIVES_FILE, rows)
    ctx.accelerator.wait_for_everyone()
    return {"dual-encoder (mining)": evaluate_dual_encoder(ctx, model)[0]}
