"""``run_pipeline.py evaluate``: any dual-encoder on a BEIR dataset, without training.

The model goes through the stages' own evaluation (``pipeline/evaluate.py``: the same tokenisation,
FAISS search and metrics), so a stage's saved dual-encoder scores here what the stage reported.
A cross-encoder or a ColBERT may re-rank the dual-encoder's top ``eval.rerank_depth``, as after a
stage. Lengths, depth, index and batch size come from the config's ``eval`` section.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from accelerate import Accelerator

from data.beir import BeirData, load_beir
from data.collate import SpecialTokens, tokenize
from data.errors import InputError
from pipeline.config import PipelineConfig, to_dict
from pipeline.evaluate import (PairScorer, colbert_scorer, cross_encoder_scorer, dense_search, evaluate_bm25,
                               ranking_metrics, rerank, rerank_label, reranked_metrics)
from pipeline.metrics import Ranking
from pipeline.plan import check_model_path, code_digest

log = logging.getLogger(__name__)
STAGE_FOLDERS = ("final/dual_encoder", "dual_encoder")  # where a stage folder, or its final/, keeps the dual-encoder


@dataclass
class LoadedModel:
    """A model ready to evaluate, its tokenizer, the folder it came from and what kind of folder that is."""

    model: object
    tokenizer: object
    folder: Path
    kind: str
    max_seq_length: int | None = None  # special tokens included, as sentence-transformers counts


def model_folder(name: str, inside: Sequence[str] = ()) -> Path:
    """A local model folder (or its first subfolder in ``inside`` that exists), or a hub id downloaded.

    Fails with an ``InputError`` for a missing folder, or a hub id while the hub is offline.
    """
    local = Path(name).expanduser()
    for sub in inside:
        if (local / sub).is_dir():
            local = local / sub
            break
    if local.is_dir() and (local / "modules.json").is_file():
        return local  # a sentence-transformers folder keeps config.json in its Transformer's subfolder
    check_model_path(str(local) if local.exists() else name)
    if local.exists():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.bin"],
                                      ignore_patterns=["onnx/*", "openvino/*"]))
    except Exception as e:  # the hub client raises many kinds; each is one line for the user
        raise InputError(f"cannot download the model ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})",
                         name) from None


def load_dual_encoder(name: str, config: PipelineConfig) -> LoadedModel:
    """This project's dual-encoder folder, a sentence-transformers folder, or a plain encoder.

    A plain encoder (no ``dual_encoder.json``, no ``modules.json``) pools as ``model.pooling`` and
    ``model.normalize`` say; the other two carry their own settings.
    """
    from transformers import AutoTokenizer

    from models.dual_encoder import CONFIG_NAME, DualEncoder, sentence_transformers_layout

    folder = model_folder(name, STAGE_FOLDERS)
    layout = sentence_transformers_layout(folder)
    trust = config.model.trust_remote_code
    if (folder / CONFIG_NAME).is_file():
        kind, options = "dual-encoder of this project", {}
    elif layout is not None:
        if layout["unsupported"] or layout["pooling"] is None:
            raise InputError("a sentence-transformers model with modules a dual-encoder here does not reproduce: "
                             + ", ".join(layout["unsupported"]), folder)
        kind, options = "sentence-transformers model", {}
    else:
        kind, options = "encoder", {"pooling": config.model.pooling, "normalize": config.model.normalize}
    tokenizer_folder = folder / (layout["transformer"] if layout else "")
    try:
        model = DualEncoder.from_pretrained(folder, trust_remote_code=trust, **options)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the dual-encoder ({_first_line(e)})", folder) from None
    return LoadedModel(model, tokenizer, folder, kind, layout["max_seq_length"] if layout else None)


def load_reranker(name: str, dual_encoder, config: PipelineConfig) -> LoadedModel:
    """A ColBERT folder (``colbert.json``) or a cross-encoder (a sequence-classification model, one label).

    A ColBERT saved without its own encoder (the default: it shares the dual-encoder's) reads the
    evaluated dual-encoder's token states, so evaluate the dual-encoder it was trained with.
    """
    from transformers import AutoTokenizer

    from models.colbert import CONFIG_NAME as COLBERT_CONFIG, ENCODER_FOLDER, ColBERT
    from models.cross_encoder import CrossEncoder

    folder = model_folder(name) if not (Path(name) / COLBERT_CONFIG).is_file() else Path(name)
    trust = config.model.trust_remote_code
    try:
        if (folder / COLBERT_CONFIG).is_file():
            colbert = ColBERT.from_pretrained(folder, trust_remote_code=trust)
            if colbert.encoder is None and colbert.hidden_size != dual_encoder.model.hidden_size:
                raise InputError(f"this ColBERT reads a dual-encoder's token states of width {colbert.hidden_size}, "
                                 f"but the dual-encoder's are {dual_encoder.model.hidden_size}", folder)
            tokenizer = (AutoTokenizer.from_pretrained(folder / ENCODER_FOLDER, trust_remote_code=trust)
                         if colbert.encoder is not None else dual_encoder.tokenizer)
            return LoadedModel(colbert, tokenizer, folder, "colbert")
        cross_encoder = CrossEncoder.from_pretrained(folder, trust_remote_code=trust)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the re-ranker ({_first_line(e)})", folder) from None
    if cross_encoder.new_parameters:
        raise InputError("not a trained cross-encoder: its scoring head is missing (initialised at random on load)",
                         folder)
    return LoadedModel(cross_encoder, tokenizer, folder, "cross-encoder")


def load_eval_data(data_dir: Path, split: str, config: PipelineConfig) -> BeirData:
    """The corpus, queries and qrels of ``split``; ``dev`` is carved out of the training split as the run does."""
    from pipeline.run import DEV, load_data

    if split == DEV and config.data.dev_queries:
        return load_data(dataclasses.replace(config, eval=dataclasses.replace(config.eval, split=DEV)), data_dir)
    return load_beir(data_dir, (split,))


def evaluate_model(config: PipelineConfig, model: str, data_dir: str, split: str, rerankers: Sequence[str] = (),
                   with_bm25: bool = False) -> dict:
    """Evaluate ``model`` (and re-rank its top candidates with each of ``rerankers``) on ``split``.

    Returns the record ``run_pipeline.py evaluate`` writes: what was evaluated, how, and
    ``metrics`` as ``{row: metrics}`` with each query's nDCG@10, as a stage's ``metrics.json``.
    """
    data_path = Path(data_dir)
    if not data_path.is_dir():
        raise InputError("data directory not found", data_path)
    eval_config = dataclasses.replace(config.eval, split=split)
    dual_encoder = load_dual_encoder(model, config)
    loaded = [load_reranker(name, dual_encoder, config) for name in rerankers]
    data = load_eval_data(data_path, split, config)
    if dual_encoder.max_seq_length and dual_encoder.max_seq_length != eval_config.passage_max_len + 2:
        log.warning("%s truncates at max_seq_length %d (special tokens included); passages are cut at "
                    "eval.passage_max_len=%d content tokens here (+2 special): pass eval.passage_max_len=%d to "
                    "evaluate it as sentence-transformers would", dual_encoder.folder, dual_encoder.max_seq_length,
                    eval_config.passage_max_len, dual_encoder.max_seq_length - 2)

    accelerator = Accelerator(mixed_precision=config.run.mixed_precision)
    device = accelerator.device
    qrels = data.qrels[split]
    query_ids = data.judged_queries(split)
    de = dual_encoder.model.to(device).eval()
    with accelerator.autocast():
        ranking = dense_search(de.encode_queries, de.encode_passages, dual_encoder.tokenizer, data, query_ids,
                               eval_config, device=device)
    metrics: dict[str, dict] = {}
    if with_bm25:
        metrics["bm25"] = evaluate_bm25(data, split, config.negatives.bm25, eval_config.top_k)
    metrics["dual-encoder"] = ranking_metrics(qrels, ranking)
    for reranker in loaded:
        scoring = reranker.model.to(device).eval()
        special = SpecialTokens.from_tokenizer(reranker.tokenizer)
        scorer: PairScorer = (colbert_scorer(de, scoring, special, device) if reranker.kind == "colbert"
                              else cross_encoder_scorer(scoring, special, device))
        reranked = rerank(ranking, scorer, *_token_ids(reranker.tokenizer, data, ranking, eval_config),
                          eval_config.rerank_depth, eval_config.batch_size, accelerator.autocast)
        label = rerank_label(reranker.kind, "DE", eval_config.rerank_depth)
        metrics[label if label not in metrics else f"{label} {reranker.folder}"] = reranked_metrics(qrels, reranked)
    return {
        "model": str(dual_encoder.folder), "kind": dual_encoder.kind,
        "pooling": de.pooling, "normalize": de.normalize,
        "rerankers": {r.kind: str(r.folder) for r in loaded},
        "data": str(data_path), "split": split, "queries": len(query_ids), "corpus": len(data.corpus["_id"]),
        "eval": to_dict(eval_config), "mixed_precision": config.run.mixed_precision, "code": code_digest()[:12],
        "metrics": metrics,
    }


def default_output(config: PipelineConfig, model: str, data_dir: str, split: str) -> Path:
    """``<run.output_dir>/evaluate/<model>--<data>--<split>.json``, names from the last parts of the paths.

    >>> default_output(PipelineConfig(), "runs/demo/distill-0a1b2c3d/final/dual_encoder", "/data/scifact", "test").as_posix()
    'runs/evaluate/distill-0a1b2c3d_final_dual_encoder--scifact--test.json'
    """
    slug = lambda text: re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"  # noqa: E731
    model_name = "_".join(Path(model).parts[-3:])
    return Path(config.run.output_dir) / "evaluate" / f"{slug(model_name)}--{slug(Path(data_dir).name)}--{slug(split)}.json"


def _token_ids(tokenizer, data: BeirData, ranking: Ranking, config) -> tuple[dict, dict]:
    """Token ids of the queries and of the candidates a re-ranker scores (the top ``rerank_depth`` only)."""
    query_ids = list(ranking)
    doc_ids = sorted({d for docs in ranking.values() for d in docs[: config.rerank_depth]})
    row = {d: i for i, d in enumerate(data.corpus["_id"])}
    queries = dict(zip(query_ids, tokenize(tokenizer, data.query_texts(query_ids), config.query_max_len)))
    passages = dict(zip(doc_ids, tokenize(tokenizer, data.passage_texts([row[d] for d in doc_ids]),
                                          config.passage_max_len)))
    return queries, passages


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
