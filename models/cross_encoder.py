"""Cross-encoder teacher ``s_CE(q, p) = head(E_ce([CLS] q [SEP] p [SEP]))``, one score per pair.

The head is the architecture's own sequence-classification head with one label
(``AutoModelForSequenceClassification``, ``num_labels=1``). For BERT that is ``w . tanh(W_p h_CLS)``:
this project's reading of DESIGN.md's ``w . E_ce(...)[CLS]``, chosen so that a saved teacher loads
unchanged in ``AutoModelForSequenceClassification`` and in sentence-transformers' CrossEncoder.
(A checkpoint without a pooler, such as a masked-LM one, starts with a random pooler.)

On request it also returns the attention probabilities of one layer (default: the last), computed
by ``AttentionProbe``; every other layer keeps the fused SDPA kernel.
``query_passage_attention`` cuts the query x passage block out of them in ColBERT's layout.

Reference: Nogueira & Cho, "Passage Re-ranking with BERT", 2019; Lu et al., "ERNIE-Search", 2022.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from models.attention_probe import AttentionProbe, attention_modules, checkpointing_unit
from models.encoder import model_inputs


@dataclass
class CrossEncoderOutput:
    """``scores`` (B,); ``attention`` (B, H, T, T) probabilities of the chosen layer, or None."""

    scores: torch.Tensor
    attention: torch.Tensor | None = None


class AttentionBlock(NamedTuple):
    """``attention`` (B, H, Lq, Lp), 0 outside the masks; ``query_mask`` (B, Lq), ``passage_mask`` (B, Lp)."""

    attention: torch.Tensor
    query_mask: torch.Tensor
    passage_mask: torch.Tensor


def query_passage_attention(
    attention: torch.Tensor,
    query_lengths: torch.Tensor,
    passage_lengths: torch.Tensor,
    query_width: int | None = None,
    passage_width: int | None = None,
) -> AttentionBlock:
    """Rows = query tokens, columns = passage tokens, in ColBERT's token order.

    Under the token alignment contract (``data/collate.py``) query token i sits at position
    ``1 + i`` and passage token j at ``2 + n_q + j`` of ``[CLS] q [SEP] p [SEP]``, so
    ``block[b, h, i, j] = attention[b, h, 1 + i, 2 + query_lengths[b] + j]``.

    Args:
        attention: (B, H, T, T) probabilities.
        query_lengths, passage_lengths: (B,) content tokens per pair.
        query_width, passage_width: Lq, Lp; the widths of ColBERT's query / passage token tensors
            (default: the longest query / passage of the batch).

    Returns:
        ``AttentionBlock`` with the (B, H, Lq, Lp) block and its masks.

    >>> attn = torch.arange(36.0).view(1, 1, 6, 6)  # [CLS] q0 [SEP] p0 p1 [SEP]
    >>> query_passage_attention(attn, torch.tensor([1]), torch.tensor([2])).attention.tolist()
    [[[[9.0, 10.0]]]]
    """
    batch, heads, width, _ = attention.shape
    lq = int(query_lengths.max()) if query_width is None else query_width
    lp = int(passage_lengths.max()) if passage_width is None else passage_width
    device = attention.device
    query_lengths, passage_lengths = query_lengths.to(device), passage_lengths.to(device)
    i = torch.arange(lq, device=device)  # (Lq,)
    j = torch.arange(lp, device=device)  # (Lp,)
    rows = (1 + i).clamp(max=width - 1)  # (Lq,)
    cols = (2 + query_lengths.unsqueeze(-1) + j).clamp(max=width - 1)  # (B, Lp)
    block = attention.index_select(2, rows)  # (B, H, Lq, T)
    block = block.gather(3, cols.view(batch, 1, 1, lp).expand(batch, heads, lq, lp))  # (B, H, Lq, Lp)
    query_mask = i < query_lengths.unsqueeze(-1)  # (B, Lq)
    passage_mask = j < passage_lengths.unsqueeze(-1)  # (B, Lp)
    pair_mask = query_mask.unsqueeze(-1) & passage_mask.unsqueeze(-2)  # (B, Lq, Lp)
    block = block.masked_fill(~pair_mask.unsqueeze(1), 0.0)
    return AttentionBlock(block, query_mask, passage_mask)


class CrossEncoder(nn.Module):
    """Scores (query, passage) pairs from ``data.collate.cross_inputs`` batches.

    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> config = BertConfig(vocab_size=9, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_labels=1)
    >>> ce = CrossEncoder(BertForSequenceClassification(config), attention_layer=-1)
    >>> batch = {"input_ids": torch.tensor([[2, 5, 3, 6, 7, 3]]), "attention_mask": torch.ones(1, 6)}
    >>> out = ce(batch, return_attention=True)
    >>> out.scores.shape, out.attention.shape  # (B,), (B, H, T, T)
    (torch.Size([1]), torch.Size([1, 2, 6, 6]))
    """

    def __init__(self, model: PreTrainedModel, attention_layer: int = -1):
        super().__init__()
        if model.config.num_labels != 1:
            raise ValueError(f"a cross-encoder scores with one label, got num_labels={model.config.num_labels}")
        n_layers = model.config.num_hidden_layers
        if not -n_layers <= attention_layer < n_layers:
            raise IndexError(f"attention_layer {attention_layer} out of range for {n_layers} layers")
        self.model = model
        self.attention_layer = attention_layer % n_layers
        self._probe: AttentionProbe | None = None  # built on first use: scoring alone works for any architecture
        self.new_parameters: frozenset[str] = frozenset()  # set by from_pretrained

    def forward(self, batch: dict[str, torch.Tensor], return_attention: bool = False) -> CrossEncoderOutput:
        """``scores`` (B,); with ``return_attention`` the chosen layer's (B, H, T, T) probabilities too."""
        inputs = model_inputs(self.model, batch)
        if not return_attention:
            return CrossEncoderOutput(scores=self.model(**inputs).logits.squeeze(-1))
        if self._probe is None:
            self._probe = AttentionProbe(self.model, self.attention_layer)
        with self._probe.record() as recording:
            logits = self.model(**inputs).logits  # (B, 1)
        return CrossEncoderOutput(scores=logits.squeeze(-1), attention=recording.probs)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute every layer in the backward pass instead of keeping its activations, but the probed one.

        The probe swaps that layer's kernel only while ``forward(return_attention=True)`` runs, so
        its recomputation in the backward pass would not replay the forward it checkpointed.
        """
        self.model.activation_checkpointing_enable()
        probed = checkpointing_unit(self.model, attention_modules(self.model)[self.attention_layer])
        if probed is not None:
            probed.gradient_checkpointing = False

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, attention_layer: int = -1, trust_remote_code: bool = False, **kwargs
    ) -> "CrossEncoder":
        """Any encoder or saved cross-encoder; ``kwargs`` go to ``AutoModelForSequenceClassification``."""
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(name_or_path), num_labels=1, trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs
        )
        cross_encoder = cls(model, attention_layer)
        # Weights the checkpoint did not hold (the head of an encoder-only checkpoint): initialised here.
        cross_encoder.new_parameters = frozenset(f"model.{name}" for name in info["missing_keys"])
        return cross_encoder

    def save_pretrained(self, save_directory: str | Path, tokenizer=None) -> None:
        """A plain ``AutoModelForSequenceClassification`` folder (safetensors), with the tokenizer if given."""
        self.model.save_pretrained(save_directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
