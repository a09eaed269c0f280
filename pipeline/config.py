"""Typed configuration: one dataclass per concern, composed into :class:`PipelineConfig`.

YAML files and ``key.sub=value`` overrides are checked against the dataclasses: an unknown key, a
value of the wrong type, or one outside the range or choices its field declares (``data/fields.py``)
is an :class:`InputError` naming the key, never silently ignored; so are settings that contradict
each other. Checks that need the data or the model are in ``pipeline/validate.py``.
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
from data.fields import bounded, check_fields, choices, describe, file_name, listed, nonempty, one_of, walk
from pipeline.evaluate import EvalConfig
from pipeline.io import write_text_atomic
from pipeline.stages.configs import (SCORE_COMPONENTS, DistillConfig, PosttrainConfig, RefreshConfig, ScoresConfig,
                                     TeacherConfig, term_weights, warmup_config)

DEMO = "demo"
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
STAGE_NAMES = ("posttrain", "teacher", "scores", "warmup", "refresh", "distill")


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives (``<output_dir>/<name>/``) and how it uses the machine."""

    name: str = file_name("demo")
    output_dir: str = nonempty("runs")
    seed: int = bounded(13, ge=0, le=2**31 - 1)
    stages: str = listed("posttrain,teacher,distill", STAGE_NAMES, "stage")  # in order
    mixed_precision: str = one_of("no", ("no", "fp16", "bf16"))  # Accelerate's
    # Threads of the main process's BM25 search (mining, the BM25 evaluation row): it runs while the other
    # processes wait. Not in any stage hash: the results do not depend on it.
    bm25_threads: int = bounded(0, ge=0, note="0: one per CPU core")


@dataclass(frozen=True)
class DataConfig:
    """A BEIR-layout folder, or ``demo`` for the embedded generated dataset (evaluated on ``eval.split``)."""

    path: str = nonempty(DEMO)
    train_split: str = file_name("train")
    # Queries of ``train_split`` held out as the split ``dev`` (never trained on), for choosing a
    # recipe without reading the test split: the first N by sha256("dev:" + query id), fixed.
    dev_queries: int = bounded(0, ge=0)
    # Title queries from the corpus added to ``train_split`` (data/pseudo.py): the first N passages
    # by sha256("pseudo:" + id), each query judged relevant to its own passage; 0 adds none.
    pseudo_queries: int = bounded(0, ge=0)


@dataclass(frozen=True)
class ModelConfig:
    """The encoder every model starts from: a local path, a hub id, or ``demo`` (tiny random BERT)."""

    name_or_path: str = nonempty(DEMO)
    pooling: str = one_of("mean", ("mean", "cls"))  # mean: E5, Mirror-BERT; cls: SimLM, ERNIE-Search
    normalize: bool = True
    trust_remote_code: bool = False


@dataclass(frozen=True)
class NegativesConfig:
    """BM25 hard negatives: the top ``depth`` non-relevant passages of each training query."""

    depth: int = bounded(30, ge=1)
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


def check_config(config: PipelineConfig) -> None:
    """Every field within what it declares, and settings that contradict each other (no data or model needed)."""
    check_fields(config)
    stages = config.stage_names
    if config.eval.split == config.data.train_split:
        raise InputError(f"eval.split: '{config.eval.split}' is also data.train_split, whose queries the stages train "
                         "on, so its metrics would not show retrieval for new queries (hold out a dev split: "
                         "data.dev_queries=N eval.split=dev)")
    if config.eval.rerank_depth > config.eval.top_k:
        raise InputError(f"eval.rerank_depth: {config.eval.rerank_depth} is more than eval.top_k ({config.eval.top_k}), "
                         "the candidates a re-ranker receives")
    posttrain = config.posttrain
    if "posttrain" in stages and not (posttrain.mlm or posttrain.simcse or posttrain.mirror):
        raise InputError("posttrain: every loss weight (mlm, simcse, mirror) is 0, so the stage would not train")
    if "scores" in stages and not any(getattr(config.scores, k) for k in SCORE_COMPONENTS):
        raise InputError(f"scores: every component weight ({', '.join(SCORE_COMPONENTS)}) is 0")
    for stage in ("warmup", "distill"):
        if stage in stages:
            check_distill(stage, getattr(config, stage))
    if DEMO in (config.data.path, config.model.name_or_path):
        demo = config.demo
        if demo.key_concepts > demo.concepts_per_topic:
            raise InputError(f"demo.key_concepts: {demo.key_concepts} is more than demo.concepts_per_topic "
                             f"({demo.concepts_per_topic})")
        if demo.hidden_size % demo.num_heads:
            raise InputError(f"demo.hidden_size: {demo.hidden_size} must be a multiple of demo.num_heads "
                             f"({demo.num_heads})")


def check_distill(name: str, stage: DistillConfig) -> None:
    """A distillation stage that trains something, on groups its terms can rank."""
    weights = term_weights(stage)
    if not any(weights.values()):
        frozen = " (ce trains only a cross-encoder that is not frozen)" if stage.weights.ce else ""
        raise InputError(f"{name}.weights: every term is 0{frozen}, so the stage would not train")
    within = [t for t, w in weights.items() if w and not (t in ("de", "dualreg") and stage.in_batch)]
    if stage.group_size < 2 and within:
        raise InputError(f"{name}.group_size: 1 leaves no negative in a group, so {', '.join(within)} would be "
                         "identically 0; use >= 2 (1 only with de and dualreg alone, in_batch)")


def yaml_problem(error: yaml.YAMLError) -> str:
    """What the YAML parser objects to, on one line."""
    return " ".join(str(getattr(error, "problem", None) or error).split())


def _build(default, values: Any, where: str, source: str | None):
    """``default`` (a dataclass instance) updated by the nested mapping ``values``, type-checked."""
    if not isinstance(values, dict):
        raise InputError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}", source)
    hints = typing.get_type_hints(type(default))
    fields = {f.name: f for f in dataclasses.fields(default)}
    unknown = sorted(str(k) for k in set(values) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise InputError(f"unknown key {prefix + unknown[0]!r} (known: {', '.join(sorted(fields))})", source)
    changes = {}
    for name, value in values.items():
        key, hint = f"{where}.{name}" if where else name, hints[name]
        if dataclasses.is_dataclass(hint):
            changes[name] = _build(getattr(default, name), value, key, source)
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            changes[name] = float(value)
        elif hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            changes[name] = float(value)  # YAML 1.1 reads 5e-5 (no dot) as a string
        elif hint is str and value is False and "no" in choices(fields[name]):
            changes[name] = "no"  # YAML 1.1 reads an unquoted no (run.mixed_precision, a stopword list) as false
        elif hint is str and isinstance(value, bool):
            raise InputError(f"{key}: expected str, got bool {value!r} (YAML reads an unquoted yes, no, on, off, "
                             "true or false as a boolean: quote it)", source)
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
    for depth, part in enumerate(parents, start=1):
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise InputError(f"override {dotted!r}: {'.'.join(parents[:depth])!r} is not a section")
    tree[leaf] = value


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Defaults, updated by the YAML file at ``path``, updated by ``key.sub=value`` overrides.

    >>> load_config(None, ["run.name=ablation", "eval.index.kind=hnsw"]).eval.index.kind
    'hnsw'
    """
    source = None if path is None else os.fspath(path)
    values: Any = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise InputError(f"cannot read config ({e.strerror})", path) from None
        except UnicodeDecodeError as e:
            raise InputError(f"not UTF-8 text ({e.reason} at byte {e.start})", path) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise InputError(f"invalid YAML ({yaml_problem(e)})", path, mark and mark.line + 1) from None
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise InputError(f"expected a mapping of sections (run, data, model, ...) at the top level, got "
                             f"{type(values).__name__}", path)
    # The file alone first, so that its errors read the same with or without overrides.
    config = _build(PipelineConfig(), values, "", source)
    if overrides:
        tree = to_dict(config)
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise InputError(f"override {item!r}: expected key.sub=value")
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as e:
                raise InputError(f"override {item!r}: invalid YAML value ({yaml_problem(e)})") from None
            _set(tree, key.strip(), value)
        config = _build(PipelineConfig(), tree, "", None)
    check_config(config)
    return config


def save_config(config: PipelineConfig, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def _yaml_scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def config_yaml(config: PipelineConfig | None = None, header: str = "") -> str:
    """``config`` (the defaults if None) as YAML, each field with what it accepts as a comment.

    ``configs/demo.yaml`` is this text (a test checks it): the YAML cannot drift from the fields.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]

    def emit(section, indent: str) -> None:
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:")
                emit(value, indent + "  ")
                continue
            text, accepts = f"{indent}{f.name}: {_yaml_scalar(value)}", describe(f)
            lines.append(f"{text:<40}  # {accepts}" if accepts else text)

    emit(config or PipelineConfig(), "")
    return "\n".join(lines) + "\n"


def field_rows(config: PipelineConfig | None = None) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, what it accepts, default) of every field: ``--help`` and the README's table."""
    rows = []
    for key, f, value in walk(config or PipelineConfig()):
        accepts = "true or false" if isinstance(value, bool) else describe(f) or "any"
        rows.append((key, type(value).__name__, accepts, _yaml_scalar(value)))
    return rows


def fields_markdown() -> str:
    """The README's table of configuration fields (a test checks that the README holds this text)."""
    rows = [f"| `{key}` | {kind} | {accepts} | `{default}` |" for key, kind, accepts, default in field_rows()]
    return "\n".join(["| field | type | accepts | default |", "| --- | --- | --- | --- |", *rows])
