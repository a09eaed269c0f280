"""``teacher``: a cross-encoder trained on (query, positive, BM25 negatives) groups."""

from __future__ import annotations

import torch

from data.groups import TrainGroups
from losses import contrastive_loss
from models.cross_encoder import CrossEncoder
from pipeline.batches import GroupBatches
from pipeline.io import atomic_dir
from pipeline.stages.common import StageContext, cross_encoder_scorer, rerank, rerank_label
from pipeline.stages.configs import TeacherConfig, stage_seed
from pipeline.train import train


def training_groups(ctx: StageContext, group_size: int, seed: int) -> TrainGroups:
    split = ctx.config.data.train_split
    return TrainGroups(ctx.data.qrels[split], ctx.negatives, ctx.data.corpus["_id"], group_size, seed)


def run_teacher(ctx: StageContext, stage: TeacherConfig) -> dict[str, dict[str, float]]:
    model = CrossEncoder.from_pretrained(ctx.inputs["encoder"], trust_remote_code=ctx.config.model.trust_remote_code)
    groups = training_groups(ctx, stage.group_size, stage_seed(ctx.config, "teacher"))
    batches = GroupBatches(groups, ctx.text, stage.batch_size, with_pairs=True, **ctx.process)

    def step(model, batch) -> dict[str, torch.Tensor]:
        batch = batch.to(ctx.device)
        scores = model(batch.pairs).scores.view(-1, batch.group_size)  # (Q, G)
        labels = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
        return {"ce": contrastive_loss(scores, labels, stage.tau)}

    train(ctx.accelerator, model, step, batches.batch_at, batches.per_epoch, {"ce": 1.0}, stage.train, ctx.stage_dir,
          new_parameters=model.new_parameters)
    model = ctx.accelerator.unwrap_model(model)
    if ctx.accelerator.is_main_process:
        with atomic_dir(ctx.stage_dir / "final") as staging:
            model.save_pretrained(staging, ctx.tokenizer)
    ctx.accelerator.wait_for_everyone()
    # No dual-encoder has been trained yet: the teacher re-ranks BM25's top candidates.
    return {rerank_label("cross-encoder", "BM25", ctx): rerank(ctx, ctx.bm25_test_ranking, cross_encoder_scorer(ctx, model))}
