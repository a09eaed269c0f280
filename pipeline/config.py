"""Typed configuration: one dataclass per concern, composed into :class:`PipelineConfig`.

YAML files and ``key.sub=value`` overrides are checked against the dataclasses: an unknown key or
a value of the wrong type is an :class:`InputError` naming the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from data.bm25 import BM25Config
from data.demo import DemoSpec
from data.errors import InputError
from pipeline.evaluate import EvalConfig
from pipeline.faiss_index import INDEX_KINDS, IndexConfig
from pipeline.io import write_text_atomic
from pipeline.stages.configs import (DistillConfig, PosttrainConfig, RefreshConfig, ScoresConfig, TeacherConfig,
                                     warmup_config)

DEMO = "demo"
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
STAGE_NAMES = ("posttrain", "teacher", "scores", "warmup", "refresh", "distill")


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives: ``<output_dir>/<name>/``."""

    name: str = "demo"
    output_dir: str = "runs"
    seed: int = 13
    stages: str = "posttrain,teacher,distill"  # in order; any of posttrain, teacher, scores, warmup, refresh, distill
    mixed_precision: str = "no"  # "no", "fp16" or "bf16" (Accelerate)


@dataclass(frozen=True)
class DataConfig:
    """A BEIR-layout folder, or ``demo`` for the embedded generated dataset (evaluated on ``eval.split``)."""

    path: str = DEMO
    train_split: str = "train"
    # Queries of ``train_split`` held out as the split ``dev`` (never trained on), for choosing a
    # recipe without reading the test split: the first N by sha256("dev:" + query id), fixed.
    dev_queries: int = 0
    # Title queries from the corpus added to ``train_split`` (data/pseudo.py): the first N passages
    # by sha256("pseudo:" + id), each query judged relevant to its own passage; 0 adds none.
    pseudo_queries: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """The encoder every model starts from: a local path, a hub id, or ``demo`` (tiny random BERT)."""

    name_or_path: str = DEMO
    pooling: str = "mean"  # "mean" (E5, Mirror-BERT) or "cls" (SimLM, ERNIE-Search)
    normalize: bool = True
    trust_remote_code: bool = False


@dataclass(frozen=True)
class NegativesConfig:
    """BM25 hard negatives: the top ``depth`` non-relevant passages of each training query."""

    depth: int = 30
    bm25: BM25Config = BM25Config()


@dataclass(frozen=True)
class PipelineConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    posttrain: PosttrainConfig = field(default_factory=PosttrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    scores: ScoresConfig = field(default_factory=ScoresConfig)
    warmup: DistillConfig = field(default_factory=warmup_config)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    demo: DemoSpec = field(default_factory=DemoSpec)  # used where data.path or model.name_or_path is "demo"

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @property
    def stage_names(self) -> list[str]:
        return [s.strip() for s in self.run.stages.split(",") if s.strip()]


def _check_choices(config: PipelineConfig) -> None:
    for name in config.stage_names:
        if name not in STAGE_NAMES:
            raise InputError(f"run.stages: unknown stage '{name}' (known: {', '.join(STAGE_NAMES)})")
    choices = {
        "run.mixed_precision": (config.run.mixed_precision, ("no", "fp16", "bf16")),
        "distill.attn_heads": (config.distill.attn_heads, ("mean", "max")),
        "distill.attn_pairs": (config.distill.attn_pairs, ("positive", "all")),
        "distill.teacher": (config.distill.teacher, ("cross_encoder", "scores")),
        "warmup.teacher": (config.warmup.teacher, ("cross_encoder", "scores")),
        "model.pooling": (config.model.pooling, ("mean", "cls")),
        "eval.index.kind": (config.eval.index.kind, INDEX_KINDS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise InputError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")
    positive = {
        "eval.query_max_len": config.eval.query_max_len,
        "eval.passage_max_len": config.eval.passage_max_len,
        "eval.batch_size": config.eval.batch_size,
        "eval.top_k": config.eval.top_k,
        "eval.rerank_depth": config.eval.rerank_depth,
        "negatives.depth": config.negatives.depth,
        "refresh.depth": config.refresh.depth,
        "negatives.bm25.chunk_size": config.negatives.bm25.chunk_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise InputError(f"{key}: must be >= 1, got {value}")
    weights = {f"scores.{k}": getattr(config.scores, k) for k in ("bm25", "dual_encoder", "cross_encoder")}
    mini_batches = {f"{stage}.memory.mini_batch": getattr(config, stage).memory.mini_batch
                    for stage in ("warmup", "distill")}
    for key, value in {"data.dev_queries": config.data.dev_queries, "data.pseudo_queries": config.data.pseudo_queries,
                       **mini_batches, **weights}.items():
        if value < 0:
            raise InputError(f"{key}: must be >= 0, got {value}")
    if "scores" in config.stage_names and not any(weights.values()):
        raise InputError("scores: every component weight (bm25, dual_encoder, cross_encoder) is 0")


def _build(default, values: Any, where: str, source: str | None):
    """``default`` (a dataclass instance) updated by the nested mapping ``values``, type-checked."""
    if not isinstance(values, dict):
        raise InputError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}", source)
    hints = typing.get_type_hints(type(default))
    known = {f.name for f in dataclasses.fields(default)}
    unknown = sorted(set(values) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise InputError(f"unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(known))})", source)
    changes = {}
    for name, value in values.items():
        key, hint = f"{where}.{name}" if where else name, hints[name]
        if dataclasses.is_dataclass(hint):
            changes[name] = _build(getattr(default, name), value, key, source)
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            changes[name] = float(value)
        elif hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            changes[name] = float(value)  # YAML 1.1 reads 5e-5 (no dot) as a string
        elif not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise InputError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}", source)
        else:
            changes[name] = value
    return dataclasses.replace(default, **changes)


def to_dict(config) -> dict:
    """Plain nested dict of a config dataclass (what ``config.yaml`` holds)."""
    return dataclasses.asdict(config)


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise InputError(f"override {dotted}: '{part}' is not a section")
    tree[leaf] = value


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Defaults, updated by the YAML file at ``path``, updated by ``key.sub=value`` overrides.

    >>> load_config(None, ["run.name=ablation", "eval.index.kind=hnsw"]).eval.index.kind
    'hnsw'
    """
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise InputError(f"cannot read config ({e.strerror})", path) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise InputError(f"invalid YAML ({getattr(e, 'problem', e)})", path, mark and mark.line + 1) from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"override {item!r}: expected key.sub=value")
        _set(values, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    config = _build(PipelineConfig(), values, "", None if path is None else os.fspath(path))
    _check_choices(config)
    return config


def save_config(config: PipelineConfig, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))
