"""Retrieval evaluation: encode the corpus with any encoder, search it with FAISS, score the ranking.

An encoder is any callable mapping a batch from :func:`data.collate.encoder_inputs` to vectors
(B, D), one for queries and one for passages (the same callable for a shared tower); texts are tokenised once under the alignment contract and encoded longest first with
dynamic padding, so padding waste stays small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from data.beir import BeirData
from data.bm25 import BM25Config, BM25Index
from data.collate import SpecialTokens, encoder_inputs, tokenize
from pipeline.distributed import broadcast_object, gather_rows, world
from pipeline.faiss_index import IndexConfig, build_index, search
from pipeline.metrics import Ranking, evaluate_ranking, ranking_from_arrays

Encoder = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class EvalConfig:
    """How a split is evaluated; ``top_k`` is the retrieval depth (Recall@1000 needs 1000)."""

    split: str = "test"
    query_max_len: int = 32
    passage_max_len: int = 64  # demo passages are under 30 tokens; raise it for real corpora
    batch_size: int = 128
    top_k: int = 1000
    rerank_depth: int = 100  # candidates per query that a re-ranker (ColBERT, cross-encoder) scores
    index: IndexConfig = IndexConfig()


@torch.inference_mode()
def encode(
    encoder: Encoder,
    ids: Sequence[Sequence[int]],
    special: SpecialTokens,
    batch_size: int,
    device: torch.device | str = "cpu",
    desc: str | None = None,
) -> np.ndarray:
    """Vectors (N, D) float32 of pre-tokenised texts, in input order, longest texts first internally.

    Under N processes each process encodes every N-th text of the length order (so the work is
    balanced) and every process returns all N vectors; call it on every process.
    """
    rank, size = world()
    order = np.argsort([-len(row) for row in ids], kind="stable")
    mine = order[rank::size]
    chunks = []
    for start in tqdm(range(0, len(mine), batch_size), desc=desc, disable=desc is None or rank > 0, leave=False):
        batch = encoder_inputs([ids[i] for i in mine[start : start + batch_size]], special)
        batch = {k: v.to(device) for k, v in batch.items()}
        chunks.append(encoder(batch).float())
    vectors = torch.cat(chunks) if chunks else torch.zeros(0, 0, device=device)  # (len(mine), D)
    parts = gather_rows(vectors) if size > 1 else [vectors.cpu()]
    out = np.empty((len(ids), parts[0].shape[1]), dtype=np.float32)
    for r, part in enumerate(parts):
        out[order[r::size]] = part.numpy()
    return out


def dense_search(
    query_encoder: Encoder,
    passage_encoder: Encoder,
    tokenizer,
    data: BeirData,
    query_ids: Sequence[str],
    config: EvalConfig,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
    passage_ids: Sequence[Sequence[int]] | None = None,
) -> Ranking:
    """Encode corpus and queries, index the corpus, return each query's top ``config.top_k``.

    Under N processes the encoding is split over them, the main process builds the index and
    searches, and every process receives the ranking: call it on every process. ``passage_ids``:
    the corpus already tokenised at ``config.passage_max_len``, in corpus order.
    """
    special = SpecialTokens.from_tokenizer(tokenizer)
    if passage_ids is None:
        passage_ids = tokenize(tokenizer, data.passage_texts(), config.passage_max_len)
    query_token_ids = tokenize(tokenizer, data.query_texts(list(query_ids)), config.query_max_len)
    progress = (lambda name: name) if show_progress else (lambda name: None)
    p_reps = encode(passage_encoder, passage_ids, special, config.batch_size, device, progress("encode corpus"))
    q_reps = encode(query_encoder, query_token_ids, special, config.batch_size, device, progress("encode queries"))
    ranking = None
    if world()[0] == 0:
        index = build_index(p_reps, config.index)
        scores, indices = search(index, q_reps, config.top_k)
        ranking = ranking_from_arrays(list(query_ids), data.corpus["_id"], indices, scores)
    return broadcast_object(ranking)


def bm25_search(index: BM25Index, data: BeirData, query_ids: Sequence[str], top_k: int) -> Ranking:
    """BM25 top-``top_k`` of each query over the whole corpus indexed in ``index``."""
    scores, indices = index.search(data.query_texts(list(query_ids)), top_k)
    return ranking_from_arrays(list(query_ids), data.corpus["_id"], indices, scores)


def evaluate_dense(model, tokenizer, data: BeirData, config: EvalConfig, **kw) -> dict[str, float]:
    """MRR@10, nDCG@10, Recall@{10,100,1000} of a dual-encoder (``encode_queries``/``encode_passages``)."""
    query_ids = data.judged_queries(config.split)
    ranking = dense_search(model.encode_queries, model.encode_passages, tokenizer, data, query_ids, config, **kw)
    return evaluate_ranking(data.qrels[config.split], ranking)


def evaluate_bm25(data: BeirData, split: str, config: BM25Config = BM25Config(), top_k: int = 1000) -> dict[str, float]:
    """The same metrics for BM25 on ``split``."""
    ranking = bm25_search(BM25Index(data.passage_texts(), config), data, data.judged_queries(split), top_k)
    return evaluate_ranking(data.qrels[split], ranking)
