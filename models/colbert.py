"""ColBERT token vectors ``t_i = normalize(W E(x)_i)`` over the real, non-special tokens of a text.

Scores are ``models.scoring.maxsim``: ``s_Col(q, p) = sum_i max_j t_i^q . t_j^p``. Token i of the
output is content token i of ``data.collate.encoder_inputs``, i.e. encoder position ``1 + i``;
[CLS], [SEP] and padding are dropped. By default ColBERT has no encoder of its own and projects the
dual-encoder's ``last_hidden_state`` (one forward pass serves both: "self on-the-fly
distillation"); with ``encoder`` set it runs its own.

Reference: Khattab & Zaharia, "ColBERT", SIGIR 2020; Lu et al., "ERNIE-Search", 2022.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from models.encoder import load_encoder, model_inputs

CONFIG_NAME = "colbert.json"
WEIGHTS_NAME = "projection.safetensors"
ENCODER_FOLDER = "encoder"


@dataclass
class TokenOutput:
    """``tokens`` (B, L, dim): unit token vectors, 0 on padding; ``mask`` (B, L) bool, True on real tokens."""

    tokens: torch.Tensor
    mask: torch.Tensor


def content_tokens(last_hidden_state: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """States of the content tokens of ``[CLS] x [SEP]`` batches, and their mask.

    The batch width is ``2 + max(lengths)`` (``encoder_inputs``), so L = T - 2 needs no host sync.

    Args:
        last_hidden_state: (B, T, H).
        lengths: (B,) content tokens per row.

    Returns:
        (B, T - 2, H) states at positions 1 .. T - 2, and the (B, T - 2) bool mask ``i < lengths``.

    >>> h = torch.arange(5.0).view(1, 5, 1)  # [CLS] a b [SEP] [PAD]
    >>> states, mask = content_tokens(h, torch.tensor([2]))
    >>> states.flatten().tolist(), mask.tolist()
    ([1.0, 2.0, 3.0], [[True, True, False]])
    """
    width = last_hidden_state.shape[1] - 2
    states = last_hidden_state[:, 1 : 1 + width]  # (B, L, H)
    return states, token_mask(lengths, width).to(last_hidden_state.device)


def token_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool, True on the ``lengths[b]`` content tokens of row b.

    >>> token_mask(torch.tensor([2, 0]), 3).tolist()
    [[True, True, False], [False, False, False]]
    """
    return torch.arange(width, device=lengths.device) < lengths.unsqueeze(-1)  # (B, L)


class ColBERT(nn.Module):
    """Late-interaction token vectors, on a shared (default) or own encoder.

    >>> col = ColBERT(hidden_size=8, dim=4)
    >>> batch = {"lengths": torch.tensor([2, 1])}
    >>> out = col(batch, last_hidden_state=torch.randn(2, 4, 8))
    >>> out.tokens.shape, out.mask.tolist()
    (torch.Size([2, 2, 4]), [[True, True], [True, False]])
    """

    def __init__(self, hidden_size: int, dim: int = 128, encoder: PreTrainedModel | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.dim = dim
        self.encoder = encoder
        self.projection = nn.Linear(hidden_size, dim, bias=False)

    def forward(self, batch: dict[str, torch.Tensor], last_hidden_state: torch.Tensor | None = None) -> TokenOutput:
        """Token vectors of a batch from ``encoder_inputs``.

        Pass the dual-encoder's ``last_hidden_state`` (B, T, H) when sharing its encoder; leave it
        out when ColBERT has its own.
        """
        if (last_hidden_state is None) == (self.encoder is None):
            raise ValueError("pass last_hidden_state exactly when ColBERT has no encoder of its own")
        if last_hidden_state is None:
            last_hidden_state = self.encoder(**model_inputs(self.encoder, batch)).last_hidden_state
        states, mask = content_tokens(last_hidden_state, batch["lengths"])  # (B, L, H), (B, L)
        tokens = nn.functional.normalize(self.projection(states), dim=-1)  # (B, L, dim)
        tokens = tokens.masked_fill(~mask.unsqueeze(-1), 0.0)
        return TokenOutput(tokens=tokens, mask=mask)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, dim: int = 128, trust_remote_code: bool = False, **kwargs
    ) -> "ColBERT":
        """A saved ``ColBERT`` folder, or a new ColBERT with its own encoder loaded from ``name_or_path``.

        For a saved folder ``dim`` is read from it; a new projection is randomly initialised.
        ``kwargs`` go to ``AutoModel.from_pretrained``.
        """
        path = Path(name_or_path)
        if not (path / CONFIG_NAME).is_file():
            encoder = load_encoder(str(name_or_path), trust_remote_code=trust_remote_code, **kwargs)
            return cls(encoder.config.hidden_size, dim, encoder)
        config = json.loads((path / CONFIG_NAME).read_text())
        encoder = None
        if config["own_encoder"]:
            encoder = load_encoder(str(path / ENCODER_FOLDER), trust_remote_code=trust_remote_code, **kwargs)
        model = cls(config["hidden_size"], config["dim"], encoder)
        model.projection.load_state_dict(load_file(path / WEIGHTS_NAME))
        return model

    def save_pretrained(self, save_directory: str | Path, tokenizer=None) -> None:
        """``colbert.json``, ``projection.safetensors`` and, if it has one, the encoder in ``encoder/``."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        config = {"hidden_size": self.hidden_size, "dim": self.dim, "own_encoder": self.encoder is not None}
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file({"weight": self.projection.weight.detach().contiguous()}, path / WEIGHTS_NAME)
        if self.encoder is not None:
            self.encoder.save_pretrained(path / ENCODER_FOLDER)
            if tokenizer is not None:
                tokenizer.save_pretrained(path / ENCODER_FOLDER)
