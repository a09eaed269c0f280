"""Training objectives: pure functions of tensors, one concept per file."""

from losses.attention_kl import attention_kl, reduce_heads
from losses.contrastive import candidate_scores, contrastive_loss, positive_labels
from losses.dualreg import dualreg_loss, symmetric_kl
from losses.infonce import infonce_loss
from losses.mlm import IGNORE_INDEX, mask_tokens, mlm_loss
from losses.score_kl import decoupled_kl_rows, kl_rows, masked_log_softmax, score_kl
from losses.span_mask import mask_random_span

__all__ = [
    "IGNORE_INDEX",
    "attention_kl",
    "candidate_scores",
    "contrastive_loss",
    "decoupled_kl_rows",
    "dualreg_loss",
    "infonce_loss",
    "kl_rows",
    "mask_random_span",
    "mask_tokens",
    "masked_log_softmax",
    "mlm_loss",
    "positive_labels",
    "reduce_heads",
    "score_kl",
    "symmetric_kl",
]
