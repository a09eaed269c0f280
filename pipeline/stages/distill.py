"""``distill``: cascaded CE -> ColBERT -> DE distillation, all three trained jointly.

ColBERT shares the dual-encoder's encoder: one forward pass gives the pooled vectors and the token
vectors ("self on-the-fly distillation"). A term whose weight is 0 is not computed, and neither is
the model work only it needs: no CE forward when no term uses the CE, no attention probabilities
when ``attn`` is 0, no ColBERT when no term uses it, no second forward without ``dualreg``.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from losses import attention_kl, candidate_scores, contrastive_loss, dualreg_loss, reduce_heads, score_kl
from models.colbert import ColBERT
from models.cross_encoder import CrossEncoder, query_passage_attention
from models.dual_encoder import DualEncoder
from models.scoring import maxsim_paired
from pipeline.batches import GroupBatch, GroupBatches
from pipeline.distributed import gather_with_grad
from pipeline.io import atomic_dir
from pipeline.stages.common import (StageContext, colbert_scorer, cross_encoder_scorer, evaluate_dual_encoder, rerank,
                                    rerank_label)
from pipeline.stages.configs import DistillConfig
from pipeline.stages.scores import read_teacher_scores
from pipeline.stages.teacher import training_groups
from pipeline.train import train


class Cascade(nn.Module):
    """The models of the cascade in one module, so one optimizer and one checkpoint hold them.

    ``forward(batch)`` returns the step's loss terms (``distill_step``): the prepared (DDP) module
    is called once per step, as DDP requires.
    """

    def __init__(self, dual_encoder: DualEncoder, colbert: ColBERT | None, cross_encoder: CrossEncoder | None,
                 stage: DistillConfig | None = None, weights: dict[str, float] | None = None,
                 train_teacher: bool = True):
        super().__init__()
        self.dual_encoder, self.colbert, self.cross_encoder = dual_encoder, colbert, cross_encoder
        self.stage, self.weights, self.train_teacher = stage, weights, train_teacher

    def train(self, mode: bool = True) -> "Cascade":
        super().train(mode)
        if self.cross_encoder is not None and not self.train_teacher:
            self.cross_encoder.eval()  # a frozen teacher scores without dropout
        return self

    def forward(self, batch: GroupBatch) -> dict[str, torch.Tensor]:
        return distill_step(self, batch, self.stage, self.weights, self.train_teacher)


def needs(weights: dict[str, float], teacher: str = "cross_encoder") -> dict[str, bool]:
    """What a set of weights needs: the CE model (``ce``), cached teacher scores (``cached``), ColBERT (``col``)."""
    reads_teacher = any(weights[t] for t in ("ce", "kl_ce_col", "kl_ce_de", "attn"))
    return {
        "ce": reads_teacher and teacher == "cross_encoder",
        "cached": reads_teacher and teacher == "scores",
        "col": any(weights[t] for t in ("col", "kl_ce_col", "kl_col_de", "attn")),
    }


def distill_step(cascade: Cascade, batch: GroupBatch, stage: DistillConfig, weights: dict[str, float],
                 train_teacher: bool) -> dict[str, torch.Tensor]:
    """Every non-zero-weighted term of the cascade on one batch."""
    G = batch.group_size
    de, col, ce = cascade.dual_encoder, cascade.colbert, cascade.cross_encoder
    use = needs(weights, stage.teacher)
    q_out, p_out = de(batch.queries, side="query"), de(batch.passages, side="passage")
    Q = q_out.reps.shape[0]
    zeros = torch.zeros(Q, dtype=torch.long, device=q_out.reps.device)
    if weights["kl_col_de"] or weights["kl_ce_de"]:
        de_group = candidate_scores(q_out.reps, p_out.reps, G)[0]  # (Q, G)
    # In-batch candidates: this process's passages, or every process's (RocketQA cross-batch
    # negatives), gathered in rank order with gradients flowing back to their owners.
    across = lambda reps: gather_with_grad(reps) if stage.in_batch and stage.cross_device else (reps, 0)  # noqa: E731
    if weights["de"] or weights["dualreg"]:
        passages, offset = across(p_out.reps)  # (P, D): (processes * Q * G, D) across devices
    terms = {}
    if weights["de"]:
        scores, labels = candidate_scores(q_out.reps, passages, G, in_batch=stage.in_batch, label_offset=offset)
        terms["de"] = contrastive_loss(scores, labels, stage.tau_de)  # scores (Q, P)
    if use["col"]:
        q_tok = col(batch.queries, last_hidden_state=q_out.last_hidden_state)
        p_tok = col(batch.passages, last_hidden_state=p_out.last_hidden_state)
        q_rep = q_tok.tokens.repeat_interleave(G, dim=0)  # (Q * G, Lq, dim)
        q_rep_mask = q_tok.mask.repeat_interleave(G, dim=0)  # (Q * G, Lq)
        col_group = maxsim_paired(q_rep, q_rep_mask, p_tok.tokens, p_tok.mask).view(Q, G)  # (Q, G)
        if weights["col"]:
            terms["col"] = contrastive_loss(col_group, zeros, stage.tau_col)
    if use["ce"]:
        with nullcontext() if train_teacher else torch.no_grad():
            ce_out = ce(batch.pairs, return_attention=bool(weights["attn"]))
        ce_group = ce_out.scores.view(Q, G)  # (Q, G)
        if weights["ce"] and train_teacher:
            terms["ce"] = contrastive_loss(ce_group, zeros, stage.tau_ce)
    teacher_mask = None
    if use["cached"]:  # a frozen teacher's scores, read with the batch; NaN: a candidate it did not score
        teacher_mask = torch.isfinite(batch.teacher_scores)  # (Q, G)
        ce_group = batch.teacher_scores.nan_to_num(0.0)  # (Q, G)
    kl = dict(scale_by_temperature=stage.kl_temperature_squared)
    if weights["kl_ce_col"]:
        terms["kl_ce_col"] = score_kl(ce_group, col_group, stage.tau_ce, stage.tau_col, mask=teacher_mask, **kl)
    if weights["kl_col_de"]:
        terms["kl_col_de"] = score_kl(col_group, de_group, stage.tau_col, stage.tau_de, **kl)
    if weights["kl_ce_de"]:
        terms["kl_ce_de"] = score_kl(ce_group, de_group, stage.tau_ce, stage.tau_de, mask=teacher_mask, **kl)
    if weights["attn"]:
        block = query_passage_attention(ce_out.attention, batch.pairs["query_lengths"], batch.pairs["passage_lengths"],
                                        q_rep.shape[1], p_tok.tokens.shape[1])
        teacher = reduce_heads(block.attention, stage.attn_heads)  # (Q * G, Lq, Lp)
        positives = torch.arange(Q * G, device=teacher.device) % G == 0  # (Q * G,)
        pair_mask = positives if stage.attn_pairs == "positive" else None
        terms["attn"] = attention_kl(teacher, q_rep, q_rep_mask, p_tok.tokens, p_tok.mask, stage.tau_attn, pair_mask)
    if weights["dualreg"]:
        q_2, p_2 = de(batch.queries, side="query").reps, de(batch.passages, side="passage").reps
        terms["dualreg"] = dualreg_loss(q_out.reps, q_2, passages, across(p_2)[0], G, stage.tau_de,
                                        stage.in_batch)
    return terms


def run_distill(ctx: StageContext, stage: DistillConfig) -> dict[str, dict[str, float]]:
    weights = {name: float(value) for name, value in vars(stage.weights).items()}
    use = needs(weights, stage.teacher)
    trust = ctx.config.model.trust_remote_code
    de = DualEncoder.from_pretrained(ctx.inputs["dual_encoder"], pooling=ctx.config.model.pooling,
                                     normalize=ctx.config.model.normalize, trust_remote_code=trust)
    col = ColBERT(de.hidden_size, stage.colbert_dim) if use["col"] else None
    ce = None
    if use["ce"]:
        ce = CrossEncoder.from_pretrained(ctx.inputs["cross_encoder"], attention_layer=stage.attn_layer,
                                          trust_remote_code=trust)
    # The teacher trains on the fly only when its own term is on: with ``ce`` at 0 it is frozen
    # (no graph, no dropout, no unused parameters under DDP) even if other terms read it.
    train_teacher = use["ce"] and bool(weights["ce"]) and not stage.freeze_teacher
    if ce is not None and not train_teacher:
        ce.requires_grad_(False)
    cascade = Cascade(de, col, ce, stage, weights, train_teacher)
    active = {k: v for k, v in weights.items() if v and (k != "ce" or train_teacher)}
    teacher_scores = read_teacher_scores(ctx.inputs["teacher_scores"]) if use["cached"] else None
    batches = GroupBatches(training_groups(ctx, stage.group_size), ctx.text, stage.batch_size,
                           with_pairs=use["ce"], teacher_scores=teacher_scores, **ctx.process)

    def step(model, batch: GroupBatch) -> dict[str, torch.Tensor]:
        return model(batch.to(ctx.device))

    train(ctx.accelerator, cascade, step, batches.batch_at, batches.per_epoch, active, stage.train, ctx.stage_dir)
    cascade = ctx.accelerator.unwrap_model(cascade)
    final = ctx.stage_dir / "final"
    if ctx.accelerator.is_main_process:
        max_len = ctx.config.eval.passage_max_len + 2
        with atomic_dir(final) as staging:
            cascade.dual_encoder.save_pretrained(staging / "dual_encoder", ctx.tokenizer, max_seq_length=max_len)
            if col is not None:
                cascade.colbert.save_pretrained(staging / "colbert", ctx.tokenizer)
            if ce is not None:
                cascade.cross_encoder.save_pretrained(staging / "cross_encoder", ctx.tokenizer)
    ctx.accelerator.wait_for_everyone()
    metrics, ranking = evaluate_dual_encoder(ctx, cascade.dual_encoder)
    results = {"dual-encoder": metrics}
    if col is not None:
        results[rerank_label("colbert", "DE", ctx)] = rerank(ctx, ranking, colbert_scorer(ctx, cascade.dual_encoder, cascade.colbert))
    if ce is not None:
        results[rerank_label("cross-encoder", "DE", ctx)] = rerank(ctx, ranking, cross_encoder_scorer(ctx, cascade.cross_encoder))
    return results
