"""``posttrain``: continue pre-training the encoder on the corpus (MLM, optional SimCSE / Mirror-BERT)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForMaskedLM

from losses import IGNORE_INDEX, infonce_loss, mask_random_span, mask_tokens, mlm_loss
from models.dual_encoder import DualEncoder, pool
from models.encoder import model_inputs
from pipeline.batches import PassageBatches
from pipeline.io import atomic_dir
from pipeline.stages.common import StageContext, evaluate_dual_encoder
from pipeline.stages.configs import PosttrainConfig
from pipeline.train import train

log = logging.getLogger(__name__)


def _special_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    lengths = batch["lengths"].unsqueeze(1)  # (B, 1)
    positions = torch.arange(batch["input_ids"].shape[1], device=lengths.device)  # (T,)
    real = (positions >= 1) & (positions <= lengths)  # (B, T): content tokens only
    return ~real


@dataclass
class PostTrainOutput:
    """What the post-training terms read; None where no term needs it."""

    # On the masked inputs: (M, V) and (M,) at the M picked positions when the head is known
    # (``mlm_head``), else (B, T, V) and (B, T) with IGNORE_INDEX where nothing was picked.
    mlm_logits: torch.Tensor | None = None
    mlm_labels: torch.Tensor | None = None
    reps: torch.Tensor | None = None  # (B, H) pooled view 1 (dropout)
    simcse_reps: torch.Tensor | None = None  # (B, H) view 2: independent dropout
    mirror_reps: torch.Tensor | None = None  # (B, H) view 2: dropout and a masked span


def mlm_head(model: nn.Module) -> nn.Module | None:
    """The masked LM's head when its logits are ``head(base_model(...).last_hidden_state)``, else None.

    BERT-family models keep it as ``cls``, RoBERTa, XLM-R and MPNet as ``lm_head``; applying it to
    the picked positions alone skips the vocabulary projection (V x H per token) at the other 85%.
    Other architectures fall back to the model's own forward at every position.
    """
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


class PostTrainer(nn.Module):
    """The MLM model: one ``forward`` per step (what DDP needs) gives what ``posttrain_terms`` reads."""

    def __init__(self, model, stage: PosttrainConfig, tokenizer, pooling: str):
        super().__init__()
        self.model, self.stage, self.pooling = model, stage, pooling
        self.vocab_size, self.mask_id = len(tokenizer), tokenizer.mask_token_id

    def forward(self, batch: dict[str, torch.Tensor], seed: int) -> PostTrainOutput:
        stage, model = self.stage, self.model
        special = _special_mask(batch)
        generator = torch.Generator(device=batch["input_ids"].device).manual_seed(seed)
        out = PostTrainOutput()
        if stage.mlm:
            masked, out.mlm_labels = mask_tokens(batch["input_ids"], special, self.vocab_size, self.mask_id,
                                                 generator, mlm_probability=stage.mlm_probability)
            head = mlm_head(model)
            if head is None:
                out.mlm_logits = model(**model_inputs(model, {**batch, "input_ids": masked})).logits  # (B, T, V)
            else:  # the vocabulary projection at the ~15% picked positions only: the same logits there
                encoder = model.base_model
                hidden = encoder(**model_inputs(encoder, {**batch, "input_ids": masked})).last_hidden_state
                picked = out.mlm_labels != IGNORE_INDEX  # (B, T)
                out.mlm_logits, out.mlm_labels = head(hidden[picked]), out.mlm_labels[picked]  # (M, V), (M,)
        if stage.simcse or stage.mirror:
            encoder = model.base_model

            def view(input_ids):
                hidden = encoder(**model_inputs(encoder, {**batch, "input_ids": input_ids})).last_hidden_state
                return pool(hidden, batch["attention_mask"], self.pooling)  # (B, H)

            out.reps = view(batch["input_ids"])
            if stage.simcse:
                out.simcse_reps = view(batch["input_ids"])
            if stage.mirror:
                spans = mask_random_span(batch["input_ids"], special, self.mask_id, generator,
                                         span_length=stage.mirror_span)
                out.mirror_reps = view(spans)
        return out


def posttrain_terms(out: PostTrainOutput, stage: PosttrainConfig) -> dict[str, torch.Tensor]:
    """Every non-zero-weighted post-training term, from the trainer's outputs."""
    terms = {}
    if stage.mlm:
        terms["mlm"] = mlm_loss(out.mlm_logits, out.mlm_labels)
    if stage.simcse:
        terms["simcse"] = infonce_loss(out.reps, out.simcse_reps, tau=stage.simcse_tau)
    if stage.mirror:
        terms["mirror"] = infonce_loss(out.reps, out.mirror_reps, tau=stage.mirror_tau)
    return terms


def load_masked_lm(name_or_path: str, trust_remote_code: bool = False) -> tuple[nn.Module, frozenset[str]]:
    """The checkpoint as a masked LM, and the names of the parameters it lacked (initialised here).

    An encoder-only checkpoint (a sentence-transformers model, a ``BertModel``) has no MLM head:
    ``transformers`` ties the decoder to the input embeddings and initialises the rest at random.
    A parameter counts as new only when none of its tied names was loaded, so the decoder's
    weight, shared with the loaded word embeddings, is not new.
    """
    model, info = AutoModelForMaskedLM.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                       output_loading_info=True)
    missing = set(info["missing_keys"])
    aliases: dict[int, list[str]] = {}  # parameter -> every name it has; the first is ``named_parameters()``'s
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    return model, frozenset(names[0] for names in aliases.values() if missing.issuperset(names))


def _log_new_head(model: nn.Module, name_or_path: str, new: frozenset[str], stage: PosttrainConfig) -> None:
    modules = ", ".join(sorted({name.rpartition(".")[0] for name in new}))
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    if not stage.mlm:
        how = "not trained (posttrain.mlm is 0)"
    elif stage.train.head_lr:
        how = f"trained at posttrain.train.head_lr={stage.train.head_lr:g}"
    else:
        how = f"trained at posttrain.train.lr={stage.train.lr:g} (posttrain.train.head_lr is 0)"
    log.info("posttrain: %s has no MLM head: %snewly initialised %s, %s", name_or_path,
             "the decoder is tied to the input embeddings; " if tied else "", modules, how)


def run_posttrain(ctx: StageContext, stage: PosttrainConfig) -> dict[str, dict[str, float]]:
    model, new = load_masked_lm(ctx.inputs["encoder"], ctx.config.model.trust_remote_code)
    if new:
        _log_new_head(model, ctx.inputs["encoder"], new, stage)
    batches = PassageBatches(ctx.text, stage.batch_size, ctx.config.run.seed,
                             **ctx.process)
    tokenizer, pooling = ctx.tokenizer, ctx.config.model.pooling
    weights = {"mlm": stage.mlm, "simcse": stage.simcse, "mirror": stage.mirror}
    if not stage.mlm:  # the LM head would get no gradient, which DDP does not allow
        for name, param in model.named_parameters():
            if not name.startswith(model.base_model_prefix):
                param.requires_grad_(False)
    trainer = PostTrainer(model, stage, tokenizer, pooling)

    def step(module, item) -> dict[str, torch.Tensor]:
        inputs, seed = item
        out = module({k: v.to(ctx.device) for k, v in inputs.items()}, seed)
        with ctx.accelerator.autocast():  # the terms' precision as inside the forward
            return posttrain_terms(out, stage)

    train(ctx.accelerator, trainer, step, batches.batch_at, batches.per_epoch,
          {k: v for k, v in weights.items() if v}, stage.train, ctx.stage_dir,
          new_parameters=frozenset(f"model.{name}" for name in new))
    final = ctx.stage_dir / "final"
    if ctx.accelerator.is_main_process:
        with atomic_dir(final) as staging:
            ctx.accelerator.unwrap_model(trainer).model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    ctx.accelerator.wait_for_everyone()
    encoder = DualEncoder.from_pretrained(final, pooling=pooling, normalize=ctx.config.model.normalize).to(ctx.device)
    metrics, _ = evaluate_dual_encoder(ctx, encoder)
    return {"dual-encoder": metrics}
