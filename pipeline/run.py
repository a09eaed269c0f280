"""The pipeline's main job: prepare inputs, mine negatives, evaluate, report.

Stages (post-training, teacher, distillation) plug into this sequence; every step reads only what
earlier steps wrote to the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import PartialState

from data.beir import BeirData, load_beir
from data.demo import ensure_demo
from data.errors import InputError
from data.negatives import negatives_from_ranking
from pipeline.config import DEMO, PipelineConfig, save_config
from pipeline.evaluate import bm25_search, evaluate_bm25, evaluate_dense
from pipeline.io import read_jsonl, write_json_atomic, write_jsonl_atomic, write_text_atomic
from pipeline.report import metrics_table

log = logging.getLogger(__name__)


def resolve_inputs(config: PipelineConfig) -> tuple[Path, str]:
    """(data dir, model name or path), building the embedded demo where ``demo`` is asked for."""
    data_path, model_path = config.data.path, config.model.name_or_path
    if DEMO in (data_path, model_path):
        demo_data, demo_model = ensure_demo(config.run_dir / "demo_assets", config.demo)
        data_path = str(demo_data) if data_path == DEMO else data_path
        model_path = str(demo_model) if model_path == DEMO else model_path
    return Path(data_path), model_path


def load_data(config: PipelineConfig, data_dir: Path) -> BeirData:
    splits = tuple(dict.fromkeys((config.data.train_split, config.eval.split)))
    return load_beir(data_dir, splits)


def mine_bm25_negatives(config: PipelineConfig, data: BeirData, path: Path) -> dict[str, list[str]]:
    """Top BM25 non-relevant passages of every training query, cached in ``path`` (JSONL)."""
    if path.exists():
        return {row["query_id"]: row["negatives"] for row in read_jsonl(path)}
    split = config.data.train_split
    query_ids = data.judged_queries(split)
    most_positives = max(len(data.qrels[split][q]) for q in query_ids)
    ranking = bm25_search(data, query_ids, config.negatives.bm25, config.negatives.depth + most_positives)
    negatives = negatives_from_ranking(ranking, data.qrels[split], config.negatives.depth)
    write_jsonl_atomic(path, ({"query_id": q, "negatives": negatives[q]} for q in query_ids))
    return negatives


def load_encoder(config: PipelineConfig, model_path: str):
    """The dual-encoder and tokenizer to start from; a path or id that cannot be loaded is an InputError."""
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from transformers import AutoTokenizer

    from models.dual_encoder import DualEncoder

    local = Path(model_path)
    if model_path.startswith((".", "/", "~")) or local.exists():
        if not (local / "config.json").is_file() and not (local / "dual_encoder.json").is_file():
            raise InputError("model not found (expected a folder with config.json)", model_path)
    elif HF_HUB_OFFLINE:
        raise InputError("not a local folder, and the hub is offline (HF_HUB_OFFLINE=1)", model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=config.model.trust_remote_code)
        model = DualEncoder.from_pretrained(
            model_path,
            pooling=config.model.pooling,
            normalize=config.model.normalize,
            trust_remote_code=config.model.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load model ({first_line})", model_path) from None
    return model, tokenizer


def run(config: PipelineConfig) -> dict[str, dict[str, float]]:
    """Run the pipeline for ``config``; returns the metrics of every evaluated model."""
    state = PartialState()
    run_dir = config.run_dir
    data_dir, model_path = resolve_inputs(config)
    data = load_data(config, data_dir)
    model, tokenizer = load_encoder(config, model_path)
    save_config(config, run_dir / "config.yaml")
    negatives = mine_bm25_negatives(config, data, run_dir / "negatives" / "bm25.jsonl")
    log.info("mined BM25 negatives for %d training queries", len(negatives))

    split = config.eval.split
    results = {"bm25": evaluate_bm25(data, split, config.negatives.bm25, config.eval.top_k)}
    model.to(state.device).eval()
    results["dual-encoder (initial)"] = evaluate_dense(
        model, tokenizer, data, config.eval, device=state.device, show_progress=True
    )
    write_json_atomic(run_dir / "eval" / "metrics.json", results)
    table = metrics_table(list(results.items()))
    write_text_atomic(run_dir / "report.md", f"# Run {config.run.name}\n\nEvaluation on `{split}`.\n\n{table}\n")
    print(table)
    return results
