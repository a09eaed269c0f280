"""Checks that need the data or the model: what a stage would otherwise find out only when it got there.

A batch larger than the training queries, more accumulation than batches, a group larger than
the corpus allows, an attention layer the teacher does not have, an IVF index with more lists
than passages, a tokenizer without a vocabulary, weights that are missing, truncated or of other
shapes than their config: each is an :class:`InputError` (one line, exit status 2) raised by
``pipeline.run.prepare`` before the first stage starts. Config-only checks are in
``pipeline/config.py``; the order and inputs of the stages in ``pipeline/plan.py``.
"""

from __future__ import annotations

from typing import Sequence

from data.beir import BeirData
from data.errors import InputError
from pipeline.config import PipelineConfig
from pipeline.plan import check_model_path, stage_plan
from pipeline.stages.configs import needs, term_weights

TRAINED_ON_GROUPS = ("teacher", "warmup", "distill")
SAMPLE = 200  # passages and queries the tokenizer check reads


def check_model(config: PipelineConfig, model_path: str):
    """(tokenizer, transformers config) of the starting model, which must load whole: config, tokenizer, weights."""
    from transformers import AutoConfig, AutoTokenizer

    check_model_path(model_path)
    trust = config.model.trust_remote_code
    try:
        model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust)
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load model ({_first_line(e)})", model_path) from None
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise InputError(f"the tokenizer has no vocabulary, only its {len(tokenizer)} special tokens (are the "
                         "tokenizer files, such as tokenizer.json or vocab.txt, missing?)", model_path)
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise InputError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab}: "
                         "they do not belong together", model_path)
    _check_lengths(model_config, config.eval.query_max_len, config.eval.passage_max_len,
                   "eval.query_max_len + eval.passage_max_len", model_path)
    if "scores" in config.stage_names and config.scores.passage_max_len:
        _check_lengths(model_config, config.eval.query_max_len, config.scores.passage_max_len,
                       "eval.query_max_len + scores.passage_max_len", model_path)
    _check_weights(config, model_path, model_config)
    return tokenizer, model_config


def _check_lengths(model_config, query_len: int, passage_len: int, what: str, model_path: str) -> None:
    positions = getattr(model_config, "max_position_embeddings", None)
    longest = 3 + query_len + passage_len  # the cross-encoder's [CLS] q [SEP] p [SEP]
    if positions is not None and longest > positions:
        raise InputError(f"{what} + 3 = {longest} exceeds the model's max_position_embeddings ({positions})", model_path)


def _check_weights(config: PipelineConfig, model_path: str, model_config) -> None:
    """The encoder's weights load, every tensor present and of the shape ``config.json`` gives."""
    from transformers import AutoModel

    try:
        _, info = AutoModel.from_pretrained(model_path, config=model_config, output_loading_info=True,
                                            ignore_mismatched_sizes=True,
                                            trust_remote_code=config.model.trust_remote_code)
    except Exception as e:  # safetensors, torch and the hub raise many kinds; each is one line here
        raise InputError(f"cannot load the weights ({_first_line(e)})", model_path) from None
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, found, expected = mismatched[0]
        raise InputError(f"the weights do not match config.json: {len(mismatched)} tensors have other shapes (first: "
                         f"{key}, {list(found)} in the weights, {list(expected)} by config.json)", model_path)
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.startswith("pooler."))  # unused: dropped
    if missing:
        raise InputError(f"the weights do not match config.json: {len(missing)} of the encoder's tensors are missing "
                         f"(first: {missing[0]})", model_path)


def check_inputs(config: PipelineConfig, data: BeirData, tokenizer, model_config, model_path: str,
                 only: Sequence[str] | None = None) -> None:
    """The config against the data and the model; raises :class:`InputError` on the first misfit."""
    for name in only or []:
        if name not in config.stage_names:
            raise InputError(f"--stages: {name!r} is not in run.stages ({config.run.stages})")
    stage_plan(config)  # the stages against what they need
    split = config.data.train_split
    queries, passages = len(data.judged_queries(split)), len(data.corpus)
    for name in config.stage_names:
        stage = getattr(config, name)
        if name == "posttrain":
            _check_steps(name, stage, passages, "passages in the corpus")
        elif name in TRAINED_ON_GROUPS:
            _check_steps(name, stage, queries, f"judged queries in the training split '{split}'")
            _check_group(name, stage.group_size, data, split)
        if name in ("warmup", "distill"):
            _check_attention_layer(name, stage, model_config)
    _check_splits(config, data)
    _check_index(config, passages)
    _check_tokenizer(tokenizer, data, model_path)


def _check_steps(name: str, stage, units: int, what: str) -> None:
    """At least one batch, and at least one optimizer step."""
    if stage.batch_size > units:
        raise InputError(f"{name}.batch_size: {stage.batch_size} is more than the {units} {what}, so not one batch "
                         "can be formed")
    batches, train = units // stage.batch_size, stage.train
    if train.epochs * batches < train.grad_accum:
        raise InputError(f"{name}.train.grad_accum: {train.grad_accum} batches per optimizer step, but "
                         f"{train.epochs} epoch(s) of {batches} batches give fewer, so no step would be taken")


def _check_group(name: str, group_size: int, data: BeirData, split: str) -> None:
    """Every training query can fill its group with passages not judged relevant to it."""
    most = max((sum(s > 0 for s in docs.values()) for docs in data.qrels[split].values()), default=0)
    if len(data.corpus) - most < group_size - 1:
        raise InputError(f"{name}.group_size: {group_size} needs {group_size - 1} negatives per query, but the corpus "
                         f"has {len(data.corpus)} passages and a query has up to {most} relevant ones")


def _check_attention_layer(name: str, stage, model_config) -> None:
    """``attn_layer`` indexes the cross-encoder's layers, which the starting model gives (``-L <= layer < L``)."""
    weights = term_weights(stage)
    layers = getattr(model_config, "num_hidden_layers", None)
    if not weights["attn"] or not needs(weights, stage.teacher)["ce"] or layers is None:
        return
    if not -layers <= stage.attn_layer < layers:
        raise InputError(f"{name}.attn_layer: {stage.attn_layer} is not a layer of the cross-encoder, which has "
                         f"{layers} (expected {-layers} to {layers - 1})")


def _check_splits(config: PipelineConfig, data: BeirData) -> None:
    """No query is both trained on and evaluated on."""
    train, evaluated = config.data.train_split, config.eval.split
    if train not in data.qrels or evaluated not in data.qrels:
        return
    shared = sorted(set(data.judged_queries(train)) & set(data.judged_queries(evaluated)))
    if shared:
        raise InputError(f"eval.split: {len(shared)} of its queries are also judged in the training split '{train}' "
                         f"(first: {shared[0]!r}): its metrics would reward memorised queries")


def _check_index(config: PipelineConfig, passages: int) -> None:
    index = config.eval.index
    if index.kind == "ivf" and index.ivf_nlist > passages:
        raise InputError(f"eval.index.ivf_nlist: {index.ivf_nlist} lists need at least as many passages to train, "
                         f"the corpus has {passages} (0 picks a number that fits)")


def _check_tokenizer(tokenizer, data: BeirData, model_path: str) -> None:
    """A tokenizer that maps every word of the data to [UNK] does not belong to it (or lacks its files)."""
    texts = data.passage_texts()[:SAMPLE] + list(data.queries["text"][:SAMPLE])
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    if ids and tokenizer.unk_token_id is not None and all(i == tokenizer.unk_token_id for i in ids):
        raise InputError(f"the tokenizer maps every word of the first {len(texts)} passages and queries to "
                         f"{tokenizer.unk_token}: it does not fit this data", model_path)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
