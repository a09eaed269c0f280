"""The pipeline's main job: prepare inputs, then run the configured stages with one lifecycle.

Every stage lives in ``<run dir>/<stage>-<hash>/`` where the hash covers the stage's config and
everything upstream of it. A rerun skips finished stages (``DONE.json`` with the same hash),
resumes an interrupted one from its last checkpoint, and trains a stage whose config changed in a
new folder (and says so). Ablation variants share every stage whose hash is unchanged.

Before anything runs, :func:`prepare` checks the config, the data, the model and how they fit
together; a run then holds the run folder's lock (``pipeline/lock.py``) and logs to its ``run.log``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from data.beir import BeirData, load_beir
from data.errors import InputError
from data.bm25 import BM25Index
from data.negatives import mine_negatives
from data.pseudo import add_pseudo_queries
from pipeline import interrupt
from pipeline.batches import check_divisible
from pipeline.config import PipelineConfig, check_config, save_config
from pipeline.distributed import any_true, broadcast_object, world
from pipeline.evaluate import bm25_search, evaluate_dense
from pipeline.io import atomic_dir, read_jsonl, remove_tree, write_json_atomic, write_jsonl_atomic
from pipeline.lock import run_lock
from pipeline.metrics import Ranking, evaluate_ranking
from pipeline.model_card import write_model_cards
from pipeline.plan import (base_key, bm25_index_dir, code_version, initial_file, negatives_file, plan_stages,
                           resolve_inputs, stage_action, stage_state)
from pipeline.report import stage_table, write_report
from pipeline.stages.common import StageContext
from pipeline.stages.configs import stage_seed
from pipeline.stages.distill import run_distill
from pipeline.stages.posttrain import run_posttrain
from pipeline.stages.refresh import NEGATIVES_FILE, run_refresh
from pipeline.stages.scores import TEACHER_SCORES_FILE, run_scores
from pipeline.stages.teacher import run_teacher
from pipeline.validate import check_inputs, check_model

log = logging.getLogger(__name__)
DEV = "dev"
LOG_FILE = "run.log"  # in the run folder: every log line of its runs, and the traceback of an unexpected error
RUNNERS = {"posttrain": run_posttrain, "teacher": run_teacher, "scores": run_scores, "warmup": run_distill, "refresh": run_refresh,
           "distill": run_distill}


def load_data(config: PipelineConfig, data_dir: Path) -> BeirData:
    """The data, with ``data.dev_queries`` judged training queries moved to the split ``dev``, then
    ``data.pseudo_queries`` title queries added to the training split (the dev split never holds one)."""
    held_out = config.data.dev_queries
    wanted = (config.data.train_split,) + (() if held_out and config.eval.split == DEV else (config.eval.split,))
    data = load_beir(data_dir, tuple(dict.fromkeys(wanted)))
    if held_out:
        data = carve_dev(data, config.data.train_split, held_out)
    return add_pseudo_queries(data, config.data.train_split, config.data.pseudo_queries)


def carve_dev(data: BeirData, train_split: str, size: int) -> BeirData:
    """``data`` with ``size`` judged queries of ``train_split`` moved to the split ``dev``.

    The choice depends on the query ids alone (first ``size`` by sha256("dev:" + id)), so it is the
    same on every machine, for every seed and whatever else the run does.
    """
    judged = data.judged_queries(train_split)
    if size >= len(judged):
        raise InputError(f"data.dev_queries: {size} would leave no training query ({len(judged)} judged)")
    dev = set(sorted(judged, key=lambda q: hashlib.sha256(f"dev:{q}".encode()).hexdigest())[:size])
    train = data.qrels[train_split]
    qrels = {**data.qrels, train_split: {q: d for q, d in train.items() if q not in dev},
             DEV: {q: d for q, d in train.items() if q in dev}}
    return dataclasses.replace(data, qrels=qrels)


@dataclass(frozen=True)
class Inputs:
    """A run's inputs, checked: the data (dev split carved, pseudo-queries added), the model's tokenizer and config."""

    data_dir: Path
    model_path: str
    data: BeirData
    tokenizer: object
    model_config: object


def prepare(config: PipelineConfig, only: list[str] | None = None, accelerator: Accelerator | None = None) -> Inputs:
    """The one validation pass before anything runs: the config, the data, the model, and how they fit.

    Builds the demo assets where ``demo`` is asked for (the main process first, under an accelerator).
    Every problem is an :class:`InputError`.
    """
    check_config(config)  # again: an ablation variant is built in code, not loaded
    with accelerator.main_process_first() if accelerator else nullcontext():
        data_dir, model_path = resolve_inputs(config)
        data = load_data(config, data_dir)
    tokenizer, model_config = check_model(config, model_path)
    check_inputs(config, data, tokenizer, model_config, model_path, only)
    if accelerator:
        check_launch(config, accelerator)
    return Inputs(data_dir, model_path, data, tokenizer, model_config)


@dataclass(frozen=True)
class BM25Inputs:
    """What BM25 gives a run: its saved index, the training queries' negatives, the eval split's top ``eval.top_k``."""

    index_dir: Path
    negatives: dict[str, list[str]]
    ranking: Ranking


def prepare_bm25(config: PipelineConfig, data: BeirData, data_dir: Path) -> BM25Inputs:
    """Index, mine and rank once, on the main process; call it on every process, which all get the same result.

    The index is saved with the run and the negatives cached, both written atomically and keyed by
    the data and the settings, so a rerun reads them instead. The other processes wait for the main
    process and read what it wrote: BM25 costs one process's work and memory, not one per process.
    """
    done = negatives = None
    if world()[0] == 0:  # the file keys read every data file: once, not on every process
        index_dir, negatives_path = bm25_index_dir(config, data_dir), negatives_file(config, data_dir)
        index = saved_bm25_index(config, data, index_dir)
        negatives = mine_bm25_negatives(config, data, index, negatives_path)
        ranking = bm25_search(index, data, data.judged_queries(config.eval.split), config.eval.top_k)
        done = (index_dir, negatives_path, ranking)
    index_dir, negatives_path, ranking = broadcast_object(done)  # the other processes wait here for the files
    if negatives is None:
        negatives = read_negatives(negatives_path)
    return BM25Inputs(index_dir, negatives, ranking)


def saved_bm25_index(config: PipelineConfig, data: BeirData, folder: Path) -> BM25Index:
    """The corpus's BM25 index saved in ``folder`` (memory-mapped), built and saved first when it is not there."""
    if not folder.is_dir():  # written whole or not at all (atomic_dir)
        started = time.perf_counter()
        with atomic_dir(folder) as staging:
            BM25Index(data.passage_texts(), config.negatives.bm25).save(staging)
        log.info("bm25: indexed %d passages in %.1f s, saved in %s", len(data.corpus), time.perf_counter() - started,
                 folder)
    else:
        log.info("bm25: reading the index saved in %s", folder)
    return BM25Index.load(folder, config.negatives.bm25, threads=config.run.bm25_threads)


def mine_bm25_negatives(config: PipelineConfig, data: BeirData, index: BM25Index, path: Path) -> dict[str, list[str]]:
    """Top BM25 non-relevant passages of every training query, cached in ``path`` (JSONL)."""
    if path.exists():
        return read_negatives(path)
    split = config.data.train_split
    query_ids = data.judged_queries(split)
    started = time.perf_counter()
    negatives = mine_negatives(data.qrels[split], query_ids, lambda qids, k: bm25_search(index, data, qids, k),
                               config.negatives.depth)
    write_jsonl_atomic(path, ({"query_id": q, "negatives": negatives[q]} for q in query_ids))
    log.info("bm25: mined the negatives of %d training queries in %.1f s (%d threads)", len(query_ids),
             time.perf_counter() - started, index.threads)
    return negatives


def read_negatives(path: Path) -> dict[str, list[str]]:
    return {row["query_id"]: row["negatives"] for row in read_jsonl(path)}


def _input_folder(role: str, upstream: str, stage_dir: Path) -> Path:
    final = stage_dir / "final"
    if role == "negatives":
        return final / NEGATIVES_FILE
    if role == "teacher_scores":
        return final / TEACHER_SCORES_FILE
    if upstream in ("warmup", "distill"):
        return final / ("cross_encoder" if role == "cross_encoder" else "dual_encoder")
    return final


# The other processes wait in a collective while the main process indexes and mines BM25 or searches
# FAISS alone: at MS MARCO size that passes NCCL's default 10 minutes.
COLLECTIVE_TIMEOUT = timedelta(hours=3)


def run(config: PipelineConfig, only: list[str] | None = None, variant: str = "") -> dict[str, dict]:
    """Run (or resume) ``config``'s stages; ``only`` reruns just those, reading the others' ``final/``.

    Returns ``{stage: {model: metrics}}``, stage by stage.
    """
    run_dir = config.run_dir
    tracker = "tensorboard" if importlib.util.find_spec("tensorboard") else None
    accelerator = Accelerator(mixed_precision=config.run.mixed_precision, log_with=tracker,
                              project_dir=str(run_dir / "tensorboard"), cpu=_cpu_processes(),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)])
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{accelerator.process_index}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write the run directory ({e.strerror})", run_dir) from None
    with ExitStack() as held:
        refusal = None
        if accelerator.is_main_process:
            try:
                held.enter_context(run_lock(run_dir))
            except InputError as e:
                refusal = e
        if any_true(refusal is not None, accelerator.device):  # every process stops, not only the one that tried
            raise refusal or InputError("another run is using this folder", run_dir)
        held.enter_context(_log_file(run_dir / LOG_FILE, accelerator))
        return _run(config, only, variant, accelerator, tracker)


@contextmanager
def _log_file(path: Path, accelerator: Accelerator) -> Iterator[None]:
    """The pipeline's log records also go to ``path`` (main process) while the block runs."""
    if not accelerator.is_main_process:
        yield
        return
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)  # created with its first line
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    loggers = [logging.getLogger(package) for package in ("pipeline", "data", "models")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


def _run(config: PipelineConfig, only: list[str] | None, variant: str, accelerator: Accelerator,
         tracker: str | None) -> dict[str, dict]:
    run_dir = config.run_dir
    checked = prepare(config, only, accelerator)
    data, tokenizer, model_path = checked.data, checked.tokenizer, checked.model_path
    base = base_key(config, checked.data_dir, model_path)
    stages = plan_stages(config, base)
    for stage in stages:  # --stages reads the other stages' final/: refused now, not after the first has trained
        if stage_action(stage_state(stage), stage.name, only) == "refuse":
            raise InputError(f"--stages: '{stage.name}' has not finished with this config; run it first")
    if tracker:
        accelerator.init_trackers(variant or config.run.name)
    if accelerator.is_main_process:
        save_config(config, run_dir / (f"config-{variant}.yaml" if variant else "config.yaml"))

    bm25 = prepare_bm25(config, data, checked.data_dir)
    results: dict[str, dict] = {"bm25": {"bm25": evaluate_ranking(data.qrels[config.eval.split], bm25.ranking)}}
    results["initial"] = {"dual-encoder": _evaluate_initial(config, model_path, tokenizer, data, accelerator,
                                                            initial_file(config, base))}
    folders = {stage.name: stage.folder for stage in stages}
    for stage in stages:
        name, roles, stage_dir = stage.name, stage.roles, stage.folder
        interrupt.check()
        with interrupt.located(stage=name):  # Ctrl-C: one line naming the stage and its step
            state = stage_state(stage)
            action = stage_action(state, name, only)
            if action == "skip":
                log.info("stage %s: finished earlier (%s), skipped", name, stage_dir.name)
                results[name] = json.loads((stage_dir / "eval" / "metrics.json").read_text())
                continue
            if action == "refuse":
                raise InputError(f"--stages: '{name}' has not finished with this config; run it first")
            if action == "rerun" and stage_dir.exists() and accelerator.is_main_process:
                remove_tree(stage_dir)
            accelerator.wait_for_everyone()
            if state.other:
                log.warning("stage %s: not reusing the finished %s (%s); training anew in %s",
                            name, state.other, "; ".join(state.changes), stage_dir.name)
            inputs = {role: _input_folder(role, up, folders[up]) for role, up in roles.items()}
            inputs.setdefault("encoder", Path(model_path))
            inputs.setdefault("dual_encoder", inputs["encoder"])
            for role, up in roles.items():
                if not (folders[up] / "DONE.json").exists():
                    raise InputError(f"stage {name} needs {up}, which has not finished", folders[up])
            log.info("stage %s: %s", name, f"resuming at step {state.resume_step}" if action == "resume" else "starting")
            # A stage's randomness depends on its seed (the run's, or the teacher's own) and its name
            # alone: not on what ran before in this process, nor on where the files live.
            name_offset = int(hashlib.sha256(name.encode()).hexdigest()[:6], 16) % 1000
            set_seed(stage_seed(config, name) + name_offset)
            stage_negatives = read_negatives(inputs["negatives"]) if "negatives" in inputs else bm25.negatives
            ctx = StageContext(config=config, accelerator=accelerator, data=data, tokenizer=tokenizer,
                               negatives=stage_negatives, stage_dir=stage_dir,
                               inputs={k: str(v) for k, v in inputs.items()}, bm25_test_ranking=bm25.ranking,
                               bm25_dir=bm25.index_dir)
            metrics = RUNNERS[name](ctx, getattr(config, name))
            results[name] = metrics
            if accelerator.is_main_process:
                write_model_cards(config, stages, name, results, data, model_path)
                write_json_atomic(stage_dir / "eval" / "metrics.json", metrics)
                write_json_atomic(stage.done_file, {"stage": name, "hash": stage.hash, "code_version": code_version(),
                                                    "key": stage.key, "inputs": stage.key["inputs"]})
            accelerator.wait_for_everyone()
            if name in ("teacher", "scores"):
                _warn_if_weaker(name, metrics, results["initial"]["dual-encoder"], config.eval.split)
    for open_tracker in accelerator.trackers:
        open_tracker.finish()
    if accelerator.is_main_process:
        write_report(run_dir, results, folders, variant)
        print(stage_table(results))
    return results


def check_launch(config: PipelineConfig, accelerator: Accelerator) -> None:
    """Refuse, before anything runs, a launch the stages cannot honour."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    zero = getattr(accelerator.state.deepspeed_plugin, "zero_stage", None) if kind == DistributedType.DEEPSPEED else None
    if kind == DistributedType.FSDP or zero == 3:
        raise InputError("FSDP and DeepSpeed ZeRO-3 shard the weights, but evaluation and saving need them whole "
                         "on every process: use DDP or DeepSpeed ZeRO-1/2")
    for name in config.stage_names:
        stage = getattr(config, name)
        if not hasattr(stage, "batch_size"):
            continue
        check_divisible(stage.batch_size, accelerator.num_processes, f"{name}.batch_size")
        if zero is not None and stage.train.grad_accum > 1:
            raise InputError(f"{name}.train.grad_accum: under DeepSpeed the engine steps at every backward; "
                             "use 1 and a larger global batch")


def _cpu_processes() -> bool:
    """Launched as several processes on a machine without CUDA: run them on CPU (gloo).

    Accelerate's ``--cpu`` launcher needs ``mpirun``; ``accelerate launch --multi_gpu`` (torchrun)
    on a CPU-only machine would otherwise give N independent single-process runs.
    """
    import os

    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _evaluate_initial(config, model_path, tokenizer, data, accelerator, cache: Path) -> dict[str, float]:
    """The starting encoder's metrics, computed once per model, data and config (variants share them)."""
    if cache.exists():
        return json.loads(cache.read_text())
    from models.dual_encoder import DualEncoder

    model = DualEncoder.from_pretrained(model_path, pooling=config.model.pooling, normalize=config.model.normalize,
                                        trust_remote_code=config.model.trust_remote_code)
    with accelerator.autocast():
        metrics = evaluate_dense(model.to(accelerator.device).eval(), tokenizer, data, config.eval,
                                 device=accelerator.device)
    if accelerator.is_main_process:
        write_json_atomic(cache, metrics)
    return metrics


def _warn_if_weaker(name: str, metrics: dict, student: dict, split: str) -> None:
    """Distilling from a teacher that ranks worse than the student starts out is how distillation hurts."""
    teacher = next(iter(metrics.values()))["ndcg@10"]
    if teacher < student["ndcg@10"]:
        log.warning("stage %s: the teacher's nDCG@10 on %s (%.4f) is below the starting dual-encoder's (%.4f): "
                    "distilling from it is likely to make the student worse", name, split, teacher, student["ndcg@10"])
