"""Dual-encoder: one vector per text, ``s_DE(q, p) = vec(q) . vec(p)``.

``vec(x) = [normalize](pooler(pool(E(x))))`` where ``pool`` is ``cls`` (SimLM, ERNIE-Search) or
``mean`` over real tokens (E5, Mirror-BERT), ``pooler`` an optional Linear(H, H) (SimLM's
``add_pooler``, off by default) and normalisation optional. Query and passage share one tower
unless ``shared=False``.

``save_pretrained`` writes each tower as a Hugging Face model plus the sentence-transformers layout
(``modules.json``: Transformer, Pooling, [Dense], [Normalize]), so ``SentenceTransformer(dir)``
reproduces ``vec`` from raw text; separate towers go to ``query/`` and ``passage/``.
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

POOLINGS = ("cls", "mean")
CONFIG_NAME = "dual_encoder.json"
DEFAULTS = {"pooling": "cls", "normalize": False, "shared": True, "add_pooler": False}


@dataclass
class EncoderOutput:
    """``reps`` (B, D): the text vectors; ``last_hidden_state`` (B, T, H): for ColBERT's token vectors."""

    reps: torch.Tensor
    last_hidden_state: torch.Tensor


def pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states into one vector per text, as sentence-transformers' ``Pooling`` does.

    ``cls``: ``h_0``; ``mean``: ``sum_t m_t h_t / max(sum_t m_t, 1e-9)`` over every real token,
    [CLS] and [SEP] included, accumulated in float32 for half-precision inputs.

    Args:
        last_hidden_state: (B, T, H).
        attention_mask: (B, T), 1 on real tokens.
        pooling: ``"cls"`` or ``"mean"``.

    Returns:
        (B, H).

    >>> h = torch.tensor([[[1.0], [3.0], [9.0]]])
    >>> pool(h, torch.tensor([[1, 1, 0]]), "mean"), pool(h, torch.tensor([[1, 1, 0]]), "cls")
    (tensor([[2.]]), tensor([[1.]]))
    """
    if pooling == "cls":
        return last_hidden_state[:, 0]  # (B, H)
    if pooling == "mean":
        dtype = last_hidden_state.dtype
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        mask = attention_mask.unsqueeze(-1).to(dtype)  # (B, T, 1)
        total = (last_hidden_state * mask).sum(dim=1, dtype=acc)  # (B, H)
        count = mask.sum(dim=1, dtype=acc).clamp_min(1e-9)  # (B, 1)
        return (total / count).to(dtype)
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")


class DualEncoder(nn.Module):
    """Query and passage vectors from one shared encoder (default) or two.

    ``vec(x) = [normalize](pooler(pool(E(x))))`` (B, H); ``s_DE(q, p) = vec(q) . vec(p)`` is
    ``models.scoring.dot``.

    Reference: Karpukhin et al., "Dense Passage Retrieval", 2020; Wang et al., "SimLM", 2022.

    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(vocab_size=9, hidden_size=8, num_hidden_layers=1, num_attention_heads=2))
    >>> de = DualEncoder(bert, pooling="mean", normalize=True)
    >>> batch = {"input_ids": torch.tensor([[2, 5, 3]]), "attention_mask": torch.ones(1, 3)}
    >>> out = de(batch, side="query")
    >>> out.reps.shape, out.last_hidden_state.shape, round(out.reps.norm().item(), 4)
    (torch.Size([1, 8]), torch.Size([1, 3, 8]), 1.0)
    """

    def __init__(
        self,
        query_encoder: PreTrainedModel,
        passage_encoder: PreTrainedModel | None = None,
        pooling: str = "cls",
        normalize: bool = False,
        add_pooler: bool = False,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        self.pooling = pooling
        self.normalize = normalize
        self.add_pooler = add_pooler
        self.query_encoder = query_encoder
        self.passage_encoder = passage_encoder
        hidden = query_encoder.config.hidden_size
        self.query_pooler = nn.Linear(hidden, hidden) if add_pooler else None
        self.passage_pooler = nn.Linear(hidden, hidden) if add_pooler and passage_encoder is not None else None

    @property
    def shared(self) -> bool:
        return self.passage_encoder is None

    @property
    def hidden_size(self) -> int:
        return self.query_encoder.config.hidden_size

    def _tower(self, side: str) -> tuple[PreTrainedModel, nn.Linear | None]:
        if side not in ("query", "passage"):
            raise ValueError(f"side must be 'query' or 'passage', got {side!r}")
        if side == "passage" and not self.shared:
            return self.passage_encoder, self.passage_pooler
        return self.query_encoder, self.query_pooler

    def forward(self, batch: dict[str, torch.Tensor], side: str = "query") -> EncoderOutput:
        """Encode a batch from ``data.collate.encoder_inputs`` with the ``side`` tower."""
        encoder, pooler = self._tower(side)
        hidden = encoder(**model_inputs(encoder, batch)).last_hidden_state  # (B, T, H)
        reps = pool(hidden, batch["attention_mask"], self.pooling)  # (B, H)
        if pooler is not None:
            reps = pooler(reps)  # (B, H)
        if self.normalize:
            reps = nn.functional.normalize(reps, dim=-1)
        return EncoderOutput(reps=reps, last_hidden_state=hidden)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each encoder layer in the backward pass instead of keeping its activations (every tower).

        Dropout replays exactly (``torch.utils.checkpoint`` restores the RNG), so the gradients are
        those of the plain forward.
        """
        for encoder in (self.query_encoder, self.passage_encoder):
            if encoder is not None:
                encoder.activation_checkpointing_enable()

    def encode_queries(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Query vectors (B, D), as evaluation and search need them."""
        return self(batch, side="query").reps

    def encode_passages(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Passage vectors (B, D)."""
        return self(batch, side="passage").reps

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        pooling: str | None = None,
        normalize: bool | None = None,
        shared: bool | None = None,
        add_pooler: bool | None = None,
        trust_remote_code: bool = False,
        **kwargs,
    ) -> "DualEncoder":
        """A saved ``DualEncoder`` folder, or a new one around any encoder (local path or hub id).

        Options left as None take the saved value, else what a sentence-transformers folder's
        modules say (pooling, normalisation), else ``DEFAULTS``; an option that contradicts a saved
        ``DualEncoder`` folder is an error. A new pooler is randomly initialised. ``kwargs`` go to
        ``AutoModel.from_pretrained``.
        """
        path = Path(name_or_path)
        saved = json.loads((path / CONFIG_NAME).read_text()) if (path / CONFIG_NAME).is_file() else {}
        layout = {} if saved else sentence_transformers_layout(path) or {}
        given = {"pooling": pooling, "normalize": normalize, "shared": shared, "add_pooler": add_pooler}
        given = {k: v for k, v in given.items() if v is not None}
        clash = {k: (v, saved[k]) for k, v in given.items() if k in saved and saved[k] != v}
        if clash:
            raise ValueError(f"{path}: options contradict the saved {CONFIG_NAME} (given, saved): {clash}")
        from_layout = {k: layout[k] for k in ("pooling", "normalize") if layout.get(k) is not None}
        options = {**DEFAULTS, **from_layout, **saved, **given}

        subfolders = [""] if options["shared"] else ["query", "passage"]
        source = str(path / layout["transformer"]) if layout.get("transformer") else str(name_or_path)
        encoders = [
            load_encoder(str(path / sub) if saved else source, trust_remote_code=trust_remote_code, **kwargs)
            for sub in subfolders
        ]
        passage = encoders[1] if len(encoders) == 2 else None
        model = cls(encoders[0], passage, options["pooling"], options["normalize"], options["add_pooler"])
        if saved and options["add_pooler"]:
            for sub, pooler in zip(subfolders, (model.query_pooler, model.passage_pooler)):
                weights = load_file(path / sub / "2_Dense" / "model.safetensors")
                pooler.load_state_dict({"weight": weights["linear.weight"], "bias": weights["linear.bias"]})
        return model

    def save_pretrained(self, save_directory: str | Path, tokenizer=None, max_seq_length: int | None = None) -> None:
        """Write the model as a ``DualEncoder`` folder that is also a sentence-transformers model.

        ``tokenizer`` is saved with each tower (sentence-transformers needs it). ``max_seq_length``
        counts special tokens; to truncate as this project does, pass ``passage_max_len + 2``.
        Without it sentence-transformers uses the tokenizer's / model's limit.
        """
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        towers = [("", "query")] if self.shared else [("query", "query"), ("passage", "passage")]
        for subfolder, side in towers:
            encoder, pooler = self._tower(side)
            self._save_tower(path / subfolder, encoder, pooler, tokenizer, max_seq_length)
        config = {
            "pooling": self.pooling,
            "normalize": self.normalize,
            "shared": self.shared,
            "add_pooler": self.add_pooler,
        }
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    def _save_tower(self, path: Path, encoder, pooler, tokenizer, max_seq_length: int | None) -> None:
        """One tower in the sentence-transformers layout (module paths of every release since 2.x)."""
        path.mkdir(parents=True, exist_ok=True)
        encoder.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        bert_config = {"do_lower_case": False}
        if max_seq_length is not None:
            bert_config["max_seq_length"] = max_seq_length
        _write_json(path / "sentence_bert_config.json", bert_config)
        modules = [("", "Transformer"), ("1_Pooling", "Pooling")]
        hidden = encoder.config.hidden_size
        _write_json(
            path / "1_Pooling" / "config.json",
            {
                "word_embedding_dimension": hidden,
                "pooling_mode_cls_token": self.pooling == "cls",
                "pooling_mode_mean_tokens": self.pooling == "mean",
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
                "pooling_mode_weightedmean_tokens": False,
                "pooling_mode_lasttoken": False,
                "include_prompt": True,
            },
        )
        if pooler is not None:
            modules.append(("2_Dense", "Dense"))
            _write_json(
                path / "2_Dense" / "config.json",
                {
                    "in_features": hidden,
                    "out_features": hidden,
                    "bias": True,
                    "activation_function": "torch.nn.modules.linear.Identity",
                },
            )
            weights = {"linear.weight": pooler.weight, "linear.bias": pooler.bias}
            save_file({k: v.detach().contiguous() for k, v in weights.items()}, path / "2_Dense" / "model.safetensors")
        if self.normalize:
            modules.append((f"{len(modules)}_Normalize", "Normalize"))
            (path / modules[-1][0]).mkdir(exist_ok=True)
        _write_json(
            path / "modules.json",
            [
                {"idx": i, "name": str(i), "path": sub, "type": f"sentence_transformers.models.{kind}"}
                for i, (sub, kind) in enumerate(modules)
            ],
        )


def sentence_transformers_layout(path: str | Path) -> dict | None:
    """What a sentence-transformers folder's ``modules.json`` describes, or None without one.

    Returns ``transformer`` (the subfolder of the Transformer module), ``pooling`` (``cls``,
    ``mean``, or None for another mode), ``normalize``, ``max_seq_length`` (special tokens
    included; None if unset) and ``unsupported``: the modules a ``DualEncoder`` does not reproduce.
    """
    path = Path(path)
    if not (path / "modules.json").is_file():
        return None
    layout = {"transformer": "", "pooling": None, "normalize": False, "max_seq_length": None, "unsupported": []}
    modes = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}
    for module in json.loads((path / "modules.json").read_text()):
        kind, folder = module["type"].rsplit(".", 1)[-1], path / module["path"]
        if kind == "Transformer":
            layout["transformer"] = module["path"]
            settings = folder / "sentence_bert_config.json"
            if settings.is_file():
                layout["max_seq_length"] = json.loads(settings.read_text()).get("max_seq_length")
        elif kind == "Pooling":
            chosen = [k for k, v in json.loads((folder / "config.json").read_text()).items()
                      if k.startswith("pooling_mode_") and v is True]
            if len(chosen) == 1 and chosen[0] in modes:
                layout["pooling"] = modes[chosen[0]]
            else:
                layout["unsupported"].append(f"Pooling ({', '.join(chosen) or 'no mode'})")
        elif kind == "Normalize":
            layout["normalize"] = True
        else:
            layout["unsupported"].append(kind)
    return layout


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
