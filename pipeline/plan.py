"""What a run will do, before it does it: each stage's hash, its state on disk, and why a finished
stage is not reused.

A stage's identity is the sha256 of its *key*: its own config, the config sections every stage
reads (data, model, negatives, eval), the seed, the precision (``run.mixed_precision``), a digest
of the pipeline's source, fingerprints of the data and model files, and the hashes of the stages it
reads. ``DONE.json`` keeps the key and the code version (git commit and source digest), so a later
command can name the setting that changed, and the two code versions when the source did. The run (``pipeline/run.py``) and
``run_pipeline.py --plan`` both decide through these functions, so the plan and the run cannot
drift apart. Nothing here writes a file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from data.demo import built_demo, ensure_demo
from data.errors import InputError
from pipeline.config import DEMO, PipelineConfig, to_dict
from pipeline.stages.configs import needs, stage_seed
from pipeline.train import latest_checkpoint

SOURCE_PACKAGES = ("data", "models", "losses", "pipeline")
DETERMINISTIC_STAGES = ("scores",)  # no randomness: every seed shares them
SHARED_SECTIONS = ("data", "model", "negatives", "eval")  # config sections every stage depends on
UNHASHED = {"eval": ("encode_chunk", "vectors_dir")}  # settings of those sections that no result depends on
_EXPLAINED = {
    "code": "the pipeline's source changed (data/, models/, losses/, pipeline/)",  # see changed_settings
    "data_files": "the data files changed (their content)",
    "model_files": "the starting model's files changed (their content)",
}


def resolve_inputs(config: PipelineConfig, build: bool = True) -> tuple[Path | None, str | None]:
    """(data dir, model name or path), building the embedded demo where ``demo`` is asked for.

    With ``build=False`` nothing is written, and a demo that is not built yet gives None.
    """
    data_path, model_path = config.data.path, config.model.name_or_path
    if DEMO in (data_path, model_path):
        root = Path(config.run.output_dir) / "demo_assets"
        demo_data, demo_model = ensure_demo(root, config.demo) if build else built_demo(root, config.demo) or (None, None)
        data_path = (demo_data and str(demo_data)) if data_path == DEMO else data_path
        model_path = (demo_model and str(demo_model)) if model_path == DEMO else model_path
    return (Path(data_path) if data_path else None), model_path


def check_model_path(model_path: str) -> None:
    """A local model folder must hold ``config.json``; a hub id needs the hub to be online."""
    from huggingface_hub.constants import HF_HUB_OFFLINE

    local = Path(model_path)
    if model_path.startswith((".", "/", "~")) or local.exists():
        if not (local / "config.json").is_file():
            raise InputError("model not found (expected a folder with config.json)", model_path)
    elif HF_HUB_OFFLINE:
        raise InputError("not a local folder, and the hub is offline (HF_HUB_OFFLINE=1)", model_path)


def fingerprint(path: Path) -> list:
    """(name, size, sha256 of the content) of every file under ``path`` (or of ``path`` itself).

    Content, not modification time: the same files copied again to the same path (new times, same
    bytes) keep every finished stage, and an edit shows even when the size stays. (Another path is
    another ``data.path`` or ``model.name_or_path``, which the stage key holds too.) Reading costs
    about a second per GB, once per process (``file_digest`` caches it).
    """
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [(p, p.stat()) for p in files if p.exists()]
    return [(str(p.relative_to(path) if path.is_dir() else p.name), st.st_size,
             file_digest(p.resolve(), st.st_size, st.st_mtime_ns)) for p, st in stats]


@functools.lru_cache(maxsize=4096)
def file_digest(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file's content, read once per process while its size and time stay the same."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@functools.cache
def code_digest() -> str:
    """sha256 of the pipeline's own source (data, models, losses, pipeline): in every stage hash, so a
    stage trained by other code is trained anew rather than silently reused. Read once per process,
    when the code is loaded: an edit made while a run goes on does not change its hashes."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for package in SOURCE_PACKAGES for p in (root / package).rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def code_version() -> str:
    """The code that runs, as ``DONE.json`` records it: the git commit, ``+changes`` when the pipeline's
    source differs from it (``unknown`` outside git), and the source digest the stage hashes hold."""
    root = Path(__file__).resolve().parents[1]
    git = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,  # noqa: E731
                                       check=True, timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        commit += "+changes" if git("status", "--porcelain", "--", *SOURCE_PACKAGES) else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return f"{commit}, source {code_digest()[:8]}"


def digest(obj) -> str:
    """sha256 of the canonical JSON of ``obj``.

    >>> digest({"b": 1, "a": [1, 2]}) == digest({"a": (1, 2), "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _plain(obj):
    """``obj`` as it reads back from JSON (tuples become lists), so a stored key compares equal."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def stage_plan(config: PipelineConfig) -> list[tuple[str, dict[str, str]]]:
    """Each stage with the upstream stages it reads, by role: ``{"encoder": "posttrain", ...}``.

    Roles: ``encoder`` (the post-trained encoder), ``dual_encoder`` (the latest trained one; for
    ``scores`` only when ``scores.trained_dual_encoder`` is on),
    ``cross_encoder`` (the latest trained one) and ``negatives`` (the latest refresh, else BM25).
    """
    plan, seen = [], []
    for name in config.stage_names:
        latest = lambda *kinds: next((s for s in reversed(seen) if s in kinds), None)  # noqa: E731
        roles: dict[str, str | None] = {"encoder": latest("posttrain"), "negatives": latest("refresh")}
        if name in ("warmup", "distill", "refresh"):
            roles["dual_encoder"] = latest("warmup", "distill", "posttrain")
        if name == "scores" and config.scores.trained_dual_encoder:
            roles["dual_encoder"] = _required(latest("warmup", "distill"), "warmup' or 'distill", name,
                                              "scores.trained_dual_encoder is not 0")
        if name == "scores" and config.scores.cross_encoder:
            roles["cross_encoder"] = _required(latest("teacher"), "teacher", name, "scores.cross_encoder is not 0")
        if name in ("warmup", "distill"):
            stage = getattr(config, name)
            use = needs(dataclasses.asdict(stage.weights), stage.teacher)
            if use["ce"]:
                roles["cross_encoder"] = _required(latest("warmup", "distill", "teacher"), "teacher", name,
                                                   "it needs a cross-encoder")
            if use["cached"]:
                scored_on = dict(plan).get("scores", {}).get("negatives")  # the refresh the teacher scored, if any
                if latest("scores") and latest("refresh") != scored_on:
                    raise InputError(f"run.stages: '{name}' and the 'scores' stage before it must train on the same "
                                     "negatives (no 'refresh' between them): the cached teacher scored those")
                for term in ("ce", "attn"):
                    if getattr(stage.weights, term):
                        raise InputError(f"{name}.weights.{term}: must be 0 with {name}.teacher=scores "
                                         "(a cached teacher neither trains nor has attention maps)")
                roles["teacher_scores"] = _required(latest("scores"), "scores", name, f"{name}.teacher is scores")
        plan.append((name, {role: up for role, up in roles.items() if up is not None}))
        seen.append(name)
    return plan


def _required(upstream: str | None, kind: str, name: str, why: str) -> str:
    if upstream is None:
        raise InputError(f"run.stages: a '{kind}' stage must come before '{name}' ({why})")
    return upstream


def base_key(config: PipelineConfig, data_dir: Path, model_path: str) -> dict:
    """What every stage of a run depends on: code, data and model files, precision, and the shared config sections."""
    sections = {k: to_dict(config)[k] for k in SHARED_SECTIONS}
    for section, keys in UNHASHED.items():
        for key in keys:
            del sections[section][key]
    return {"code": code_digest(), "data_files": fingerprint(data_dir), "model_path": model_path,
            "model_files": fingerprint(Path(model_path)), "run": {"mixed_precision": config.run.mixed_precision},
            **sections}


def negatives_file(config: PipelineConfig, data_dir: Path) -> Path:
    """The BM25 negatives cache, keyed by what decides them: another dev split, depth or data gets its own file."""
    key = digest({"data": to_dict(config.data), "files": fingerprint(data_dir), "negatives": to_dict(config.negatives)})
    return config.run_dir / "negatives" / f"bm25-{key[:8]}.jsonl"


def bm25_index_dir(config: PipelineConfig, data_dir: Path) -> Path:
    """The run's saved BM25 index, keyed by what decides it: the data files' content and the BM25 settings."""
    key = digest({"files": fingerprint(data_dir), "bm25": config.negatives.bm25.analysis()})
    return config.run_dir / "bm25" / f"index-{key[:8]}"


def initial_file(config: PipelineConfig, base: dict) -> Path:
    """The starting encoder's metrics, computed once per model, data and config (variants share them)."""
    return config.run_dir / f"initial-{digest(base)[:8]}.json"


@dataclass(frozen=True)
class PlannedStage:
    """A stage of a run: the stages it reads (role -> stage), its key, hash and folder."""

    name: str
    roles: dict[str, str]
    key: dict
    hash: str
    folder: Path

    @property
    def done_file(self) -> Path:
        return self.folder / "DONE.json"


def plan_stages(config: PipelineConfig, base: dict) -> list[PlannedStage]:
    """Every stage of ``config`` with its hash and folder; a pure function of the config and ``base``."""
    stages: dict[str, PlannedStage] = {}
    for name, roles in stage_plan(config):
        seed = None if name in DETERMINISTIC_STAGES else stage_seed(config, name)
        key = _plain({"stage": name, name: to_dict(getattr(config, name)), **base,
                      "run": {**base.get("run", {}), "seed": seed},
                      "inputs": {role: stages[up].hash for role, up in roles.items()}})
        stage_hash = digest(key)
        stages[name] = PlannedStage(name, roles, key, stage_hash, config.run_dir / f"{name}-{stage_hash[:8]}")
    return list(stages.values())


@dataclass(frozen=True)
class StageState:
    """A stage's folder on disk: finished, or resumable from a checkpoint, and the finished folder
    of the same stage it does not reuse (``other``), with what changed since (``changes``)."""

    done: bool
    resume_step: int | None = None
    other: str | None = None
    changes: tuple[str, ...] = ()


def stage_state(stage: PlannedStage) -> StageState:
    """Read (never write) the stage's folder and its finished siblings."""
    if stage.done_file.exists():
        return StageState(done=True)
    checkpoint = latest_checkpoint(stage.folder / "checkpoints")
    resume_step = json.loads((checkpoint / "train_state.json").read_text())["step"] if checkpoint else None
    closest: tuple[int, str, tuple[str, ...]] | None = None
    for other in sorted(stage.folder.parent.glob(f"{stage.name}-*")):
        if other == stage.folder or not (other / "DONE.json").is_file():
            continue
        done = json.loads((other / "DONE.json").read_text())
        old_key, versions = done.get("key"), (done.get("code_version", "an older version"), code_version())
        changes = (tuple(changed_settings(old_key, stage.key, stage.roles, versions)) if old_key is not None
                   else ("its settings were not recorded (finished by an older version of the pipeline)",))
        rank = len(changes) if old_key is not None else 10**6
        if closest is None or rank < closest[0]:
            closest = (rank, other.name, changes)
    return StageState(False, resume_step, *(closest[1:] if closest else (None, ())))


def stage_action(state: StageState, name: str, only: Sequence[str] | None) -> str:
    """What the run does with a stage: ``skip`` (finished), ``rerun`` (named by ``--stages``: trained
    anew), ``resume``, ``run``, or ``refuse`` (``--stages`` leaves out a stage that has not finished)."""
    if only is not None and name in only:
        return "rerun"
    if state.done:
        return "skip"
    if only is not None:
        return "refuse"
    return "resume" if state.resume_step is not None else "run"


def changed_settings(old: dict, new: dict, roles: dict[str, str] | None = None,
                     versions: tuple[str, str] | None = None) -> list[str]:
    """What differs between two stage keys, one line per setting, as ``dotted.name: old -> new``.

    ``versions`` (the old and the new code version) are named when the source changed.

    >>> changed_settings({"distill": {"tau_de": 0.05}, "run": {"mixed_precision": "no"}},
    ...                  {"distill": {"tau_de": 0.1}, "run": {"mixed_precision": "bf16"}})
    ['distill.tau_de: 0.05 -> 0.1', 'run.mixed_precision: no -> bf16']
    >>> changed_settings({"code": "a", "inputs": {"encoder": "1"}}, {"code": "b", "inputs": {"encoder": "2"}}, {"encoder": "posttrain"})
    ["code: the pipeline's source changed (data/, models/, losses/, pipeline/)", 'inputs.encoder: the posttrain stage it reads changed']
    >>> changed_settings({"code": "a"}, {"code": "b"}, versions=("2b4d4fa, source 1a2b3c4d", "9e8f7a6+changes, source 5e6f7a8b"))
    ["code: the pipeline's source changed (data/, models/, losses/, pipeline/): finished by 2b4d4fa, source 1a2b3c4d; this is 9e8f7a6+changes, source 5e6f7a8b"]
    """
    before, after = _flatten(old), _flatten(new)
    settings, files, inputs = [], [], []  # the settings first: the inputs' changes follow from theirs
    for name in [*after, *(n for n in before if n not in after)]:
        if before.get(name, _ABSENT) == after.get(name, _ABSENT):
            continue
        if name == "code" and versions:
            files.append(f"code: {_EXPLAINED['code']}: finished by {versions[0]}; this is {versions[1]}")
        elif name in _EXPLAINED:
            files.append(f"{name}: {_EXPLAINED[name]}")
        elif name.startswith("inputs."):
            upstream = (roles or {}).get(name.split(".", 1)[1])
            inputs.append(f"{name}: " + (f"the {upstream} stage it reads changed" if upstream else "an input changed"))
        else:
            settings.append(f"{name}: {_show(before.get(name, _ABSENT))} -> {_show(after.get(name, _ABSENT))}")
    return settings + files + inputs


_ABSENT = object()


def _show(value) -> str:
    """A setting's value as the config spells it: strings bare (``bf16``), others as Python writes them."""
    if value is _ABSENT:
        return "(absent)"
    return value if isinstance(value, str) and value.strip() == value and value else repr(value)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def describe_plan(runs: Sequence[tuple[str, PipelineConfig]], only: Sequence[str] | None = None) -> str:
    """What running ``runs`` (``[("full", config), (variant, config), ...]``) would do, stage by stage.

    Each stage gets its hash, its status (``done``, ``resumes at step N``, ``will run``, ``reused
    from <variant>``) and, when a finished folder of the same stage is not reused, what changed.
    Raises ``InputError`` where the run would refuse to start on the same arguments.
    """
    lines: list[str] = []
    planned_by: dict[str, str] = {}  # stage hash -> the variant that runs it first
    for variant, config in runs:
        data_dir, model_path = resolve_inputs(config, build=False)  # checked in the run's order
        if data_dir is not None and not data_dir.is_dir():
            raise InputError("data directory not found", data_dir)
        if model_path is not None:
            check_model_path(model_path)
        for name in only or []:
            if name not in config.stage_names:
                raise InputError(f"--stages: {name!r} is not in run.stages ({config.run.stages})")
        lines += ["", f"{variant}: run '{config.run.name}' in {config.run_dir}" +
                  ("" if config.run_dir.exists() else " (not created yet)")]
        known = data_dir is not None and model_path is not None
        if known:
            base = base_key(config, data_dir, model_path)
            negatives = negatives_file(config, data_dir)
            lines.append(f"  data {data_dir}, model {model_path}, evaluated on '{config.eval.split}'")
            lines.append(f"  BM25 negatives: {'cached in ' + negatives.name if negatives.exists() else 'will be mined'}; "
                         f"initial evaluation: {'cached' if initial_file(config, base).exists() else 'will run'}")
        else:  # every stage will run; the variants of one command still share their upstream stages
            base = {"demo_assets": "not built yet"}
            lines.append(f"  the demo assets are not built yet ({Path(config.run.output_dir) / 'demo_assets'}): the "
                         "hashes cover their files, so they are known once the run has built them")
        stages = plan_stages(config, base)
        rows, notes = [], {}
        for stage in stages:
            state = stage_state(stage) if known else StageState(done=False)
            action = stage_action(state, stage.name, only)
            status = {"skip": "done", "rerun": "will run anew (--stages)", "run": "will run",
                      "resume": f"resumes at step {state.resume_step}",
                      "refuse": "not finished: --stages stops here (run it first)"}[action]
            shared = action in ("run", "resume") and stage.hash in planned_by
            if shared:
                status = f"reused from {planned_by[stage.hash]}"
            planned_by.setdefault(stage.hash, variant)
            rows.append((stage.name, stage.hash[:8] if known else "-", status, _inputs(stage.roles)))
            if state.other and not shared:
                notes[stage.name] = [f"    not reusing the finished {state.other}:"] + [f"      {c}" for c in state.changes]
        for row, table_line in zip([None, None, *rows], _table(rows)):
            lines.append(table_line)
            if row is not None:
                lines += notes.get(row[0], [])
    return "\n".join(["Plan (nothing is written):", *lines[1:]]) if lines else "Plan: no stages"


def _inputs(roles: dict[str, str]) -> str:
    return ", ".join(f"{role}={up}" for role, up in roles.items()) or "-"


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    header = ("stage", "hash", "status", "reads")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(3)]
    line = lambda r: "  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + r[3]  # noqa: E731
    return [line(header), line(tuple("-" * w for w in widths) + ("-----",)), *[line(r) for r in rows]]


code_digest()  # taken when the code is loaded, not when a later run starts
code_version()
