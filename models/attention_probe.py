"""Explicit attention probabilities of one layer, while every other layer keeps its fused kernel.

transformers (5.x) runs each self-attention module through ``ALL_ATTENTION_FUNCTIONS``, keyed by
``module.config._attn_implementation``. All layers share one config, so the usual route to
probabilities (``attn_implementation="eager"`` + ``output_attentions=True``) makes every layer
materialise its (B, H, T, T) matrix. Instead, inside ``AttentionProbe.record()``:

- the chosen module alone gets a shallow copy of the config naming ``PROBE_ATTENTION``, a function
  registered once under this project's own name (no existing name, hence no other model, changes);
- a forward hook on that module keeps the probabilities it returns, the same hook point
  transformers uses to record ``attentions``;
- on exit the module's own config comes back and the hook is removed.

The model's mask is built once for the whole model, so the probe reads both the SDPA masks (bool,
True = attend, or None without padding) and the eager additive float masks. Works for encoders
whose attention modules dispatch this way and are recorded by ``_can_record_outputs``: BERT
(MiniLM is a BERT), RoBERTa, XLM-R, ELECTRA, DistilBERT.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from transformers import AttentionInterface

PROBE_ATTENTION = "ernie_search_probe"
UNSUPPORTED_KWARGS = ("position_bias", "softcap", "sliding_window", "s_aux")


def probe_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention returning the probabilities before dropout.

    ``P = softmax(Q K^T * scaling + mask)``, ``out = dropout(P) V``: the computation and the dropout
    call of transformers' ``eager_attention_forward``, so the layer output is the eager one in
    training too; the returned ``P`` is taken before dropout, so its rows are distributions.

    Args:
        query, key, value: (B, H, T, d).
        attention_mask: None, bool (B, 1, T, T) with True = attend, or an additive float mask.

    Returns:
        (B, T, H, d) attention output and (B, H, T, T) probabilities.

    >>> q = torch.zeros(1, 1, 2, 4)
    >>> mask = torch.tensor([True, False]).expand(1, 1, 2, 2)
    >>> probe_attention_forward(nn.Module(), q, q, q, mask)[1]
    tensor([[[[1., 0.],
              [1., 0.]]]])
    """
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{PROBE_ATTENTION} does not support {name!r}")
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, T)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)  # (B, H, T, T)
    dropped = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(dropped, value).transpose(1, 2).contiguous()  # (B, T, H, d)
    return output, probs


AttentionInterface.register(PROBE_ATTENTION, probe_attention_forward)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of ``model`` in layer order, one per hidden layer."""
    target = getattr(model, "_can_record_outputs", None) or {}
    target = target.get("attentions")
    target_class = getattr(target, "target_class", target)
    if not isinstance(target_class, type):
        raise ValueError(f"{type(model).__name__} does not declare the modules that compute its attentions")
    modules = [m for m in model.modules() if isinstance(m, target_class)]
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if not modules or (n_layers is not None and len(modules) != n_layers):
        raise ValueError(
            f"{type(model).__name__}: found {len(modules)} {target_class.__name__} modules for "
            f"{n_layers} layers; one attention module per layer is required"
        )
    return modules


def checkpointing_unit(model: nn.Module, module: nn.Module) -> nn.Module | None:
    """The layer that transformers checkpoints as one unit (a ``GradientCheckpointingLayer``) holding ``module``."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return next((unit for unit in model.modules() if isinstance(unit, GradientCheckpointingLayer)
                 and any(sub is module for sub in unit.modules())), None)


@dataclass
class Recording:
    """Filled by ``AttentionProbe.record``: ``probs`` (B, H, T, T) of the chosen layer."""

    probs: torch.Tensor | None = None


class AttentionProbe:
    """Records the attention probabilities of one layer of a transformers encoder.

    ``layer`` indexes the hidden layers (negative from the end; default the last). The
    probabilities keep their graph, so losses on them train the encoder. The probed layer must not
    be gradient-checkpointed (its recomputation would run after ``record()`` has restored the fused
    kernel); the other layers may be (``checkpointing_unit``).

    Usage::

        probe = AttentionProbe(model, layer=-1)
        with probe.record() as rec:
            logits = model(**inputs).logits
        rec.probs  # (B, H, T, T)
    """

    def __init__(self, model: nn.Module, layer: int = -1):
        self.model = model
        modules = attention_modules(model)
        if not -len(modules) <= layer < len(modules):
            raise IndexError(f"layer {layer} out of range for {len(modules)} layers")
        self.layer = layer % len(modules)
        self.module = modules[self.layer]
        self.output_index = getattr(model._can_record_outputs["attentions"], "index", 1)
        self.unit = checkpointing_unit(model, self.module)

    @contextmanager
    def record(self) -> Iterator[Recording]:
        """Within the block, the chosen layer computes explicit probabilities into the recording."""
        config = self.module.config
        if config._attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"the probe reads SDPA or eager attention masks; the model uses {config._attn_implementation!r}"
            )
        checkpointed = (self.unit.gradient_checkpointing if self.unit is not None
                        else getattr(self.model, "is_activation_checkpointing", False))
        if checkpointed:
            raise ValueError("the probed layer has gradient checkpointing on, which the probe does not support")
        recording = Recording()

        def keep(module, args, output):
            recording.probs = output[self.output_index]

        probe_config = copy.copy(config)
        probe_config._attn_implementation = PROBE_ATTENTION
        self.module.config = probe_config
        handle = self.module.register_forward_hook(keep)
        try:
            yield recording
        finally:
            handle.remove()
            self.module.config = config
