"""A Hugging Face encoder fed with the batches of ``data/collate.py``.

Shared by the dual-encoder and ColBERT: ``load_encoder`` gives ``AutoModel`` without its unused
pooler head, ``model_inputs`` picks from a collate batch the tensors the model's ``forward`` takes.
"""

from __future__ import annotations

import inspect

import torch
from transformers import AutoConfig, AutoModel, PreTrainedModel

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def load_encoder(name_or_path: str, trust_remote_code: bool = False, **kwargs) -> PreTrainedModel:
    """``AutoModel.from_pretrained`` with the pooler head (BERT's dense + tanh on [CLS]) removed.

    Retrieval pools ``last_hidden_state`` itself; a pooler that no loss reaches would hold
    parameters without gradients, which DDP rejects. ``kwargs`` go to ``from_pretrained``
    (``dtype``, ``attn_implementation``, ``revision`` ...).
    """
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model_class = AutoModel._model_mapping.get(type(config), None)
    if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        kwargs = {"add_pooling_layer": False, **kwargs}
    model = AutoModel.from_pretrained(name_or_path, config=config, trust_remote_code=trust_remote_code, **kwargs)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``batch`` that ``model.forward`` accepts (DistilBERT takes no ``token_type_ids``).

    >>> class Model(torch.nn.Module):
    ...     def forward(self, input_ids, attention_mask=None): ...
    >>> sorted(model_inputs(Model(), {"input_ids": 1, "token_type_ids": 2, "lengths": 3}))
    ['input_ids']
    """
    accepted = inspect.signature(model.forward).parameters
    return {name: batch[name] for name in INPUT_NAMES if name in batch and name in accepted}
