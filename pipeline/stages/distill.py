"""``distill``: cascaded CE -> ColBERT -> DE distillation, all three trained jointly.

ColBERT shares the dual-encoder's encoder: one forward pass gives the pooled vectors and the token
vectors ("self on-the-fly distillation"). ``Cascade.forward`` runs the models and returns their
outputs; ``distill_terms`` builds the loss terms from them with ``losses/``. A term whose weight is
0 is not computed, and neither is the model work only it needs: no CE forward when no term uses the
CE, no attention probabilities when ``attn`` is 0, no ColBERT when no term uses it, no second
dropout view without ``dualreg``.

With ``memory.mini_batch`` the same outputs come from chunks (``pipeline/grad_cache.py``): the
student's through gradient caching, a frozen teacher's under ``no_grad``, and a training
teacher's ``ce`` term chunk by chunk of whole groups, forward and backward, since it is a sum over
groups. Only the detached teacher scores and head-reduced attention blocks stay for the student
terms. The training loop still calls backward once; the replay runs inside it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from itertools import chain
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from data.errors import InputError
from losses import (attention_kl, candidate_scores, contrastive_loss, dualreg_loss, positive_labels, reduce_heads,
                    score_kl)
from models.colbert import ColBERT, TokenOutput, token_mask
from models.cross_encoder import CrossEncoder, query_passage_attention
from models.dual_encoder import DualEncoder
from models.scoring import maxsim_paired
from pipeline.batches import GroupBatch, GroupBatches
from pipeline.distributed import gather_with_grad
from pipeline.grad_cache import Inputs, cached_encode, chunked_loss, split_rows
from pipeline.io import atomic_dir
from pipeline.stages.common import (StageContext, colbert_scorer, cross_encoder_scorer, evaluate_dual_encoder,
                                    read_teacher_scores, rerank, rerank_label)
from pipeline.stages.configs import TEACHER_TARGETS, DistillConfig, needs, term_weights
from pipeline.stages.teacher import training_groups
from pipeline.train import train

@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` without dropout inside the block; its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@dataclass
class CascadeOutput:
    """What the loss terms read, for Q queries with G passages each; None where no term needs it."""

    q_reps: torch.Tensor  # (Q, D) dual-encoder query vectors
    p_reps: torch.Tensor  # (Q * G, D) dual-encoder passage vectors, group layout
    q_reps_2: torch.Tensor | None = None  # (Q, D) DualReg's second dropout view
    p_reps_2: torch.Tensor | None = None  # (Q * G, D)
    q_tokens: TokenOutput | None = None  # ColBERT query tokens (Q, Lq, dim), mask (Q, Lq)
    p_tokens: TokenOutput | None = None  # ColBERT passage tokens (Q * G, Lp, dim), mask (Q * G, Lp)
    ce_scores: torch.Tensor | None = None  # (Q, G) training CE scores (dropout, graph): the ``ce`` term
    ce_loss: torch.Tensor | None = None  # the ``ce`` term itself, when the CE trained group chunk by chunk
    teacher_scores: torch.Tensor | None = None  # (Q, G) KL targets: eval-mode CE scores or cached scores
    teacher_mask: torch.Tensor | None = None  # (Q, G) bool, False where the cached teacher did not score
    teacher_attention: torch.Tensor | None = None  # (Q * G, Lq, Lp) CE query x passage attention, eval mode,
    # reduced over heads


def repeat_rows(inputs: Inputs, times: int) -> Inputs:
    """The batch ``times`` times over, stacked along the rows: DualReg's views in one forward."""
    return {k: v.repeat(times, *[1] * (v.dim() - 1)) for k, v in inputs.items()} if times > 1 else inputs


class Cascade(nn.Module):
    """The models of the cascade in one module, so one optimizer and one checkpoint hold them.

    ``forward(batch)`` runs every model the weights need, once per step as DDP requires, and
    returns a ``CascadeOutput``; ``distill_terms`` turns it into the loss terms. The CE trains
    exactly when ``weights["ce"]`` is non-zero (see ``term_weights``); otherwise it has no
    gradients and scores in eval mode. ``stage.memory`` sets chunking and gradient checkpointing.
    """

    def __init__(self, dual_encoder: DualEncoder, colbert: ColBERT | None, cross_encoder: CrossEncoder | None,
                 stage: DistillConfig, weights: dict[str, float]):
        super().__init__()
        self.dual_encoder, self.colbert, self.cross_encoder = dual_encoder, colbert, cross_encoder
        self.stage, self.weights = stage, weights
        self.mini_batch = stage.memory.mini_batch
        self.train_teacher = cross_encoder is not None and bool(weights["ce"])
        if cross_encoder is not None and not self.train_teacher:
            cross_encoder.requires_grad_(False)
        if stage.memory.checkpoint_dual_encoder:
            dual_encoder.enable_gradient_checkpointing()
        if stage.memory.checkpoint_cross_encoder and self.train_teacher:
            cross_encoder.enable_gradient_checkpointing()

    def train(self, mode: bool = True) -> "Cascade":
        super().train(mode)
        if self.cross_encoder is not None and not self.train_teacher:
            self.cross_encoder.eval()  # a frozen teacher scores without dropout
        return self

    def forward(self, batch: GroupBatch) -> CascadeOutput:
        G, weights = batch.group_size, self.weights
        use = needs(weights, self.stage.teacher)
        Q = len(batch.queries["input_ids"])
        # DualReg's two dropout views in one forward over a doubled batch, unless view 2 has no graph
        views = 2 if weights["dualreg"] and not self.stage.dualreg_one_sided else 1
        q_reps, q_tokens = self._student(batch.queries, "query", views, use["col"])  # (views * Q, D)
        p_reps, p_tokens = self._student(batch.passages, "passage", views, use["col"])  # (views * Q * G, D)
        out = CascadeOutput(q_reps[:Q], p_reps[: Q * G], q_tokens=q_tokens, p_tokens=p_tokens)
        if views == 2:
            out.q_reps_2, out.p_reps_2 = q_reps[Q:], p_reps[Q * G :]
        elif weights["dualreg"]:
            with torch.no_grad():
                out.q_reps_2 = self._student(batch.queries, "query", 1, False)[0]  # (Q, D)
                out.p_reps_2 = self._student(batch.passages, "passage", 1, False)[0]  # (Q * G, D)
        if use["ce"]:
            if self.train_teacher and self.mini_batch:
                out.ce_loss = self._teacher_loss(batch.pairs, Q, G)
            elif self.train_teacher:
                out.ce_scores = self.cross_encoder(batch.pairs).scores.view(Q, G)  # (Q, G)
            if any(weights[t] for t in TEACHER_TARGETS):
                # Targets without dropout: a training CE's own scores would carry its dropout noise.
                out.teacher_scores, out.teacher_attention = self._teacher_targets(
                    batch.pairs, G, batch.queries["input_ids"].shape[1] - 2, batch.passages["input_ids"].shape[1] - 2)
        if use["cached"]:  # a frozen teacher's scores, read with the batch; NaN: a candidate it did not score
            out.teacher_mask = torch.isfinite(batch.teacher_scores)  # (Q, G)
            out.teacher_scores = batch.teacher_scores.nan_to_num(0.0)  # (Q, G)
        return out

    def _student(self, inputs: Inputs, side: str, views: int,
                 with_tokens: bool) -> tuple[torch.Tensor, TokenOutput | None]:
        """Dual-encoder vectors (views * B, D) of ``views`` dropout views of the B rows, and view 1's ColBERT tokens.

        One encoder pass per row gives both; the token vectors of views 2.. are a projection
        computed and dropped. Plain: one forward over the views. Chunked: gradient caching when
        grad is on, chunks under ``no_grad`` otherwise.
        """
        rows, width = len(inputs["input_ids"]), inputs["input_ids"].shape[1] - 2  # ColBERT's L: no [CLS], [SEP]
        inputs = repeat_rows(inputs, views)

        def encode(chunk: Inputs) -> tuple[torch.Tensor, ...]:
            out = self.dual_encoder(chunk, side=side)
            if not with_tokens:
                return (out.reps,)  # (b, D)
            tokens = self.colbert(chunk, last_hidden_state=out.last_hidden_state).tokens  # (b, l, dim), l <= L
            return out.reps, F.pad(tokens, (0, 0, 0, width - tokens.shape[1]))  # (b, D), (b, L, dim)

        if not self.mini_batch:
            outputs = encode(inputs)
        elif torch.is_grad_enabled():
            params = chain(self.dual_encoder.parameters(), self.colbert.parameters() if with_tokens else ())
            outputs = cached_encode(encode, split_rows(inputs, self.mini_batch), list(params))
        else:
            outputs = [torch.cat(parts) for parts in zip(*map(encode, split_rows(inputs, self.mini_batch)))]
        if not with_tokens:
            return outputs[0], None
        return outputs[0], TokenOutput(outputs[1][:rows], token_mask(inputs["lengths"][:rows], width))

    def _teacher_loss(self, pairs: Inputs, Q: int, G: int) -> torch.Tensor:
        """The ``ce`` term (mean over queries of each group's listwise loss), forward and backward by group chunks."""
        ce = self.cross_encoder

        def group_loss(chunk: Inputs) -> torch.Tensor:
            scores = ce(chunk).scores.view(-1, G)  # (n, G), n groups
            labels = positive_labels(len(scores), G, in_batch=False, device=scores.device)  # (n,)
            return contrastive_loss(scores, labels, self.stage.tau_ce) * len(scores) / Q

        groups = max(1, self.mini_batch // G)
        return chunked_loss(group_loss, split_rows(pairs, groups * G), list(ce.parameters()))

    @torch.no_grad()
    def _teacher_targets(self, pairs: Inputs, G: int, Lq: int, Lp: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eval-mode CE scores (Q, G) and, with ``attn``, the head-reduced attention blocks (Q * G, Lq, Lp)."""
        attn = bool(self.weights["attn"])
        scores, blocks = [], []
        with eval_mode(self.cross_encoder):
            for chunk in split_rows(pairs, self.mini_batch or len(pairs["input_ids"])):
                teacher = self.cross_encoder(chunk, return_attention=attn)
                scores.append(teacher.scores)  # (n,)
                if attn:
                    block = query_passage_attention(teacher.attention, chunk["query_lengths"],
                                                    chunk["passage_lengths"], Lq, Lp).attention  # (n, H, Lq, Lp)
                    blocks.append(reduce_heads(block, self.stage.attn_heads))  # (n, Lq, Lp)
        return torch.cat(scores).view(-1, G), torch.cat(blocks) if attn else None  # (Q, G), (Q * G, Lq, Lp)


def distill_terms(out: CascadeOutput, group_size: int, stage: DistillConfig,
                  weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Every non-zero-weighted term of one batch, from the cascade's outputs (``ce``: ``ce_scores`` or ``ce_loss``)."""
    G, Q = group_size, out.q_reps.shape[0]
    group_labels = positive_labels(Q, G, in_batch=False, device=out.q_reps.device)  # (Q,) 0: positives lead
    # In-batch candidates: this process's passages, or every process's (RocketQA cross-batch
    # negatives), gathered in rank order with gradients flowing back to their owners.
    across = lambda reps: gather_with_grad(reps) if stage.in_batch and stage.cross_device else (reps, 0)  # noqa: E731
    if weights["de"] or weights["dualreg"]:
        passages, offset = across(out.p_reps)  # (P, D): (processes * Q * G, D) across devices
    if weights["kl_col_de"] or weights["kl_ce_de"]:
        de_group = candidate_scores(out.q_reps, out.p_reps, G)[0]  # (Q, G)
    terms = {}
    if weights["de"]:
        scores, labels = candidate_scores(out.q_reps, passages, G, in_batch=stage.in_batch, label_offset=offset)
        terms["de"] = contrastive_loss(scores, labels, stage.tau_de)  # scores (Q, P)
    if needs(weights, stage.teacher)["col"]:
        q_rep = out.q_tokens.tokens.repeat_interleave(G, dim=0)  # (Q * G, Lq, dim)
        q_rep_mask = out.q_tokens.mask.repeat_interleave(G, dim=0)  # (Q * G, Lq)
        p_tok, p_mask = out.p_tokens.tokens, out.p_tokens.mask  # (Q * G, Lp, dim), (Q * G, Lp)
        col_group = maxsim_paired(q_rep, q_rep_mask, p_tok, p_mask).view(Q, G)  # (Q, G)
    if weights["col"]:
        terms["col"] = contrastive_loss(col_group, group_labels, stage.tau_col)
    if weights["ce"]:
        terms["ce"] = out.ce_loss if out.ce_loss is not None else contrastive_loss(out.ce_scores, group_labels,
                                                                                     stage.tau_ce)
    kl = dict(scale_by_temperature=stage.kl_temperature_squared, negatives_weight=stage.kl_negatives)
    if weights["kl_ce_col"]:
        terms["kl_ce_col"] = score_kl(out.teacher_scores, col_group, stage.tau_ce, stage.tau_col,
                                      mask=out.teacher_mask, **kl)
    if weights["kl_col_de"]:
        terms["kl_col_de"] = score_kl(col_group, de_group, stage.tau_col, stage.tau_de, **kl)
    if weights["kl_ce_de"]:
        terms["kl_ce_de"] = score_kl(out.teacher_scores, de_group, stage.tau_ce, stage.tau_de,
                                     mask=out.teacher_mask, **kl)
    if weights["attn"]:
        positives = torch.arange(Q * G, device=q_rep.device) % G == 0  # (Q * G,)
        pair_mask = positives if stage.attn_pairs == "positive" else None
        terms["attn"] = attention_kl(out.teacher_attention, q_rep, q_rep_mask, p_tok, p_mask, stage.tau_attn,
                                     pair_mask)
    if weights["dualreg"]:
        terms["dualreg"] = dualreg_loss(out.q_reps, out.q_reps_2, passages, across(out.p_reps_2)[0], G,
                                        stage.tau_de, stage.in_batch)
    return terms


def distill_step(model: nn.Module, batch: GroupBatch, stage: DistillConfig, weights: dict[str, float],
                 autocast: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, torch.Tensor]:
    """One step's terms: the (prepared) cascade called once, then ``distill_terms`` of its outputs.

    ``autocast`` (the accelerator's) gives the terms the precision they had inside the forward.
    """
    out = model(batch)
    with autocast():
        return distill_terms(out, batch.group_size, stage, weights)


def run_distill(ctx: StageContext, stage: DistillConfig) -> dict[str, dict[str, float]]:
    use = needs(vars(stage.weights), stage.teacher)  # a frozen CE with only ``ce`` on is still saved and evaluated
    weights = term_weights(stage)
    trust = ctx.config.model.trust_remote_code
    de = DualEncoder.from_pretrained(ctx.inputs["dual_encoder"], pooling=ctx.config.model.pooling,
                                     normalize=ctx.config.model.normalize, trust_remote_code=trust)
    col = ColBERT(de.hidden_size, stage.colbert_dim) if use["col"] else None
    ce = None
    if use["ce"]:
        ce = CrossEncoder.from_pretrained(ctx.inputs["cross_encoder"], attention_layer=stage.attn_layer,
                                          trust_remote_code=trust)
    if stage.memory.mini_batch and weights["ce"] and ctx.config.run.mixed_precision == "fp16":
        raise InputError(f"{ctx.stage_dir.name}: memory.mini_batch with a teacher trained on the fly computes the "
                         "teacher's gradients chunk by chunk, outside fp16's loss scaling: use run.mixed_precision "
                         "bf16 or no, or freeze the teacher")
    cascade = Cascade(de, col, ce, stage, weights)
    active = {k: v for k, v in weights.items() if v}
    teacher_scores = read_teacher_scores(ctx.inputs["teacher_scores"]) if use["cached"] else None
    batches = GroupBatches(training_groups(ctx, stage.group_size, ctx.config.run.seed), ctx.text, stage.batch_size,
                           with_pairs=use["ce"], teacher_scores=teacher_scores, **ctx.process)

    def step(model, batch: GroupBatch) -> dict[str, torch.Tensor]:
        return distill_step(model, batch.to(ctx.device), stage, weights, ctx.accelerator.autocast)

    # Created here, so trained at ``train.head_lr``: the ColBERT projection, and a CE head the checkpoint lacked.
    new = {f"colbert.{name}" for name, _ in col.named_parameters()} if col is not None else set()
    new |= {f"cross_encoder.{name}" for name in ce.new_parameters} if ce is not None else set()
    train(ctx.accelerator, cascade, step, batches.batch_at, batches.per_epoch, active, stage.train, ctx.stage_dir,
          new_parameters=frozenset(new))
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
