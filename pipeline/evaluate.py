"""Retrieval evaluation: encode the corpus with any encoder, search it with FAISS, score the ranking;
re-rank the top candidates with a cross-encoder or ColBERT.

An encoder is any callable mapping a batch from :func:`data.collate.encoder_inputs` to vectors
(B, D), one for queries and one for passages (the same callable for a shared tower); texts are
tokenised under the alignment contract and encoded longest first with dynamic padding, so padding
waste stays small. The corpus streams through in chunks of ``eval.encode_chunk`` texts: one pass
keeps only each text's length (for the order), a second tokenises and encodes a chunk of that
order at a time into one preallocated array, so memory grows with N x D, never with N x tokens,
and the vectors equal those of a single chunk bit for bit. A re-ranker is any callable scoring
aligned (query ids, passage ids) pairs. The stages and ``run_pipeline.py evaluate`` both evaluate here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from data.beir import BeirData
from data.bm25 import BM25Config, BM25Index
from data.collate import SpecialTokens, cross_inputs, encoder_inputs, tokenize
from data.errors import InputError
from data.fields import bounded, file_name, noted, one_of
from pipeline.distributed import broadcast_object, gather_objects, gather_rows, world
from pipeline.faiss_index import IndexConfig, build_index, search
from pipeline.metrics import Ranking, evaluate_ranking, query_metrics, ranking_from_arrays

Encoder = Callable[[dict[str, torch.Tensor]], torch.Tensor]
PairScorer = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], torch.Tensor]  # (q ids, p ids) -> (N,)
TextRows = Callable[[Sequence[int]], list[str]]  # rows -> the texts at those rows
VECTOR_DTYPES = ("float32", "float16")
PER_QUERY = "ndcg@10 per query"  # {query id: nDCG@10}, kept with each model's metrics for paired tests


@dataclass(frozen=True)
class EvalConfig:
    """How a split is evaluated; ``top_k`` is the retrieval depth (Recall@1000 needs 1000)."""

    split: str = file_name("test", note="not data.train_split")
    query_max_len: int = bounded(32, ge=1)
    passage_max_len: int = bounded(64, ge=1)  # demo passages are under 30 tokens; raise it for real corpora
    batch_size: int = bounded(128, ge=1)
    top_k: int = bounded(1000, ge=1)
    # Candidates per query that a re-ranker (ColBERT, cross-encoder) scores.
    rerank_depth: int = bounded(100, ge=1, note="at most top_k")
    # Texts tokenised and encoded at a time (rounded down to whole batches, at least one). The vectors
    # do not depend on it, so it is in no stage hash.
    encode_chunk: int = bounded(10_000, ge=1, note="texts; rounded down to whole batches")
    # How the corpus vectors are held until indexed: float16 halves them; FAISS still indexes float32.
    vectors_dtype: str = one_of("float32", VECTOR_DTYPES)
    # Empty: the main process gathers the corpus vectors in memory. A folder every process can read
    # (shared across nodes): each process writes its vectors there (a temporary shard, removed after
    # the search) and the main process indexes them from disk, so no process holds them twice.
    vectors_dir: str = noted("", "a folder; empty: in memory")
    index: IndexConfig = IndexConfig()


def token_lengths(tokenizer, texts: TextRows, count: int, max_len: int, chunk: int) -> np.ndarray:
    """Content tokens (N,) int32 of each of ``count`` texts, tokenised ``chunk`` at a time.

    Under N processes each process tokenises a contiguous N-th of the texts and all receive every length.
    """
    rank, size = world()
    bounds = [count * r // size for r in range(size + 1)]  # this process's rows: bounds[rank] to bounds[rank + 1]
    lengths = [np.array([len(ids) for ids in tokenize(tokenizer, texts(range(s, min(s + chunk, bounds[rank + 1]))),
                                                      max_len)], dtype=np.int32)
               for s in range(bounds[rank], bounds[rank + 1], chunk)]
    mine = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)
    return np.concatenate(gather_objects(mine)) if size > 1 else mine


def _encoded_chunks(
    encoder: Encoder,
    order: np.ndarray,
    token_ids: Callable[[np.ndarray], Sequence[Sequence[int]]],
    special: SpecialTokens,
    batch_size: int,
    device: torch.device | str,
    desc: str | None,
    chunk: int | None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """This process's share of ``order`` (every N-th text under N processes), encoded ``chunk`` at a time.

    Yields (start, vectors (R, D)) with ``start`` the offset into the share; every process yields as
    many chunks (the last ones may be empty), so collectives in the caller's loop stay in step.
    """
    rank, size = world()
    mine = order[rank::size]
    per_process = -(-len(order) // size)  # rows of rank 0, the most: every process takes as many chunk steps
    step = max(1, per_process if chunk is None else max(1, chunk // batch_size) * batch_size)
    hidden = None if desc is not None and rank == 0 else True  # None: a bar on a terminal only
    with tqdm(total=len(mine), desc=desc, disable=hidden, leave=False) as bar:
        for start in range(0, max(per_process, 1), step):
            rows = mine[start : start + step]
            ids = token_ids(rows) if len(rows) else []
            vectors = []
            for b in range(0, len(rows), batch_size):
                batch = encoder_inputs(ids[b : b + batch_size], special)
                vectors.append(encoder({k: v.to(device) for k, v in batch.items()}).float())
                bar.update(len(batch["lengths"]))
            yield start, torch.cat(vectors) if vectors else torch.zeros(0, 0, device=device)


def length_order(lengths: np.ndarray) -> np.ndarray:
    """Rows longest first (stable): the order texts are encoded in, so batches pad little."""
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")


@torch.inference_mode()
def encode_rows(
    encoder: Encoder,
    lengths: np.ndarray,
    token_ids: Callable[[np.ndarray], Sequence[Sequence[int]]],
    special: SpecialTokens,
    batch_size: int,
    device: torch.device | str = "cpu",
    desc: str | None = None,
    chunk: int | None = None,
    dtype: str = "float32",
    main_only: bool = False,
) -> np.ndarray | None:
    """Vectors (N, D) of N texts of ``lengths`` content tokens, in input order, longest first internally.

    ``token_ids(rows)`` gives the ids of the texts at ``rows``; it is asked for ``chunk`` texts at a
    time (rounded down to whole batches; None: all at once), whose vectors go straight into the
    (N, D) array of ``dtype``. Batches do not depend on ``chunk``, so neither do the vectors.
    Under N processes each process encodes every N-th text of the length order (so the work is
    balanced) and every process returns all N vectors, or with ``main_only`` the main process
    does and the others return None (they receive each chunk from every process and keep none);
    call it on every process.
    """
    rank, size = world()
    order = length_order(lengths)
    keep = rank == 0 or not main_only
    out = None
    for start, vectors in _encoded_chunks(encoder, order, token_ids, special, batch_size, device, desc, chunk):
        parts = gather_rows(vectors) if size > 1 else [vectors.cpu()]
        if not keep:
            continue
        if out is None:
            out = np.empty((len(order), max(part.shape[1] for part in parts)), dtype=dtype)
        for r, part in enumerate(parts):
            out[order[r::size][start : start + len(part)]] = part.numpy()
    return out


class VectorShards:
    """Corpus vectors on disk, read as an (N, D) array in corpus order: ``shards[rows]`` gathers those rows.

    Process r's rows are in ``paths[r]`` (a .npy, opened as a read-only memory map), corpus row
    ``rows[p]`` at position p of the shards taken in rank order. Added in corpus order, they give a
    flat or IVF index equal to the one the gathered array gives (an HNSW graph built with threads
    differs from run to run either way).
    """

    def __init__(self, paths: Sequence[Path], rows: np.ndarray):
        self.paths = tuple(paths)
        self.shards = [np.load(path, mmap_mode="r") for path in self.paths]
        sizes = [len(shard) for shard in self.shards]
        self.shard_of = np.empty(len(rows), dtype=np.int32)  # corpus row -> shard
        self.offset_of = np.empty(len(rows), dtype=np.int64)  # corpus row -> row within it
        self.shard_of[rows] = np.repeat(np.arange(len(sizes)), sizes)
        self.offset_of[rows] = np.concatenate([np.arange(n) for n in sizes])
        self.dtype = self.shards[0].dtype
        self.shape = (len(rows), max(shard.shape[1] for shard in self.shards))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        """Rows (a slice or an index array) as an array; each shard is read in file order."""
        rows = np.arange(*rows.indices(len(self))) if isinstance(rows, slice) else np.asarray(rows)
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        shard_of, offset_of = self.shard_of[rows], self.offset_of[rows]
        for s, shard in enumerate(self.shards):
            here = np.flatnonzero(shard_of == s)
            here = here[np.argsort(offset_of[here], kind="stable")]
            out[here] = shard[offset_of[here]]
        return out


def npy_header(f, dtype: np.dtype, shape: tuple[int, int]) -> None:
    """The .npy header of a C-order array of ``dtype`` and ``shape``, whose rows the caller then writes."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                             "shape": shape})


@torch.inference_mode()
def encode_to_shards(
    encoder: Encoder,
    lengths: np.ndarray,
    token_ids: Callable[[np.ndarray], Sequence[Sequence[int]]],
    special: SpecialTokens,
    batch_size: int,
    folder: Path,
    device: torch.device | str = "cpu",
    desc: str | None = None,
    chunk: int | None = None,
    dtype: str = "float32",
) -> VectorShards | None:
    """:func:`encode_rows`'s vectors written, not gathered: each process appends its rows to its own shard.

    Process r writes ``folder/rank-<r>.npy`` (its share of the length order, ``chunk`` texts at a
    time, in file order, so a full disk is an error, not a crash) and holds one chunk; nothing
    crosses between processes but the shard widths. ``folder`` must be one every process can read
    (shared across nodes). The main process gets the shards, the others None; call it on every process.
    """
    rank, size = world()
    order = length_order(lengths)
    mine = len(order[rank::size])
    dtype = np.dtype(dtype)
    with open(Path(folder) / f"rank-{rank}.npy", "wb") as f:
        written = 0
        for _, vectors in _encoded_chunks(encoder, order, token_ids, special, batch_size, device, desc, chunk):
            if len(vectors) and not written:  # the header, once the width is known
                npy_header(f, dtype, (mine, vectors.shape[1]))
            f.write(np.ascontiguousarray(vectors.cpu().numpy(), dtype=dtype).tobytes())
            written += len(vectors)
        widths = gather_objects(vectors.shape[1] if written else 0) if size > 1 else [vectors.shape[1]]
        if not written:  # no rows here: an empty shard of the others' width
            npy_header(f, dtype, (0, max(widths)))
        f.flush()
        os.fsync(f.fileno())
    gather_objects(None)  # every shard is complete before any is read
    if rank != 0:
        return None
    return VectorShards(tuple(Path(folder) / f"rank-{r}.npy" for r in range(size)),
                        np.concatenate([order[r::size] for r in range(size)]))


def encode(
    encoder: Encoder,
    ids: Sequence[Sequence[int]],
    special: SpecialTokens,
    batch_size: int,
    device: torch.device | str = "cpu",
    desc: str | None = None,
) -> np.ndarray:
    """Vectors (N, D) float32 of pre-tokenised texts, in input order (:func:`encode_rows` in one chunk)."""
    lengths = np.array([len(row) for row in ids], dtype=np.int64)
    return encode_rows(encoder, lengths, lambda rows: [ids[i] for i in rows], special, batch_size, device, desc)


def encode_texts(
    encoder: Encoder,
    tokenizer,
    texts: TextRows,
    count: int,
    max_len: int,
    batch_size: int,
    chunk: int,
    device: torch.device | str = "cpu",
    desc: str | None = None,
    dtype: str = "float32",
    main_only: bool = False,
    folder: Path | None = None,
) -> np.ndarray | VectorShards | None:
    """Vectors (N, D) of ``count`` texts, ``texts(rows)`` giving those at ``rows``, streamed ``chunk`` at a time.

    Each text is tokenised twice (once for the length order, once to encode it), so no more
    than ``chunk`` texts' token ids are ever held. ``main_only``: as :func:`encode_rows`;
    ``folder``: written there as :func:`encode_to_shards` does, and described. Call it on every process.
    """
    lengths = token_lengths(tokenizer, texts, count, max_len, chunk)
    rows = lambda rows: tokenize(tokenizer, texts(rows), max_len)  # noqa: E731
    special = SpecialTokens.from_tokenizer(tokenizer)
    if folder is not None:
        return encode_to_shards(encoder, lengths, rows, special, batch_size, folder, device, desc, chunk, dtype)
    return encode_rows(encoder, lengths, rows, special, batch_size, device, desc, chunk, dtype, main_only)


@contextmanager
def vectors_folder(parent: str) -> Iterator[Path | None]:
    """A fresh folder under ``parent`` for one search's shards, the same on every process; removed after.

    ``parent`` empty: None (the vectors stay in memory).
    """
    if not parent:
        yield None
        return
    rank = world()[0]
    made = None
    if rank == 0:
        Path(parent).mkdir(parents=True, exist_ok=True)
        made = tempfile.mkdtemp(prefix="vectors-", dir=parent)
    folder = Path(broadcast_object(made))
    try:
        seen = gather_objects(folder.is_dir())  # every process stops here if one cannot see the folder
        if not all(seen):
            raise InputError(f"eval.vectors_dir: {parent} is not shared by every process (process "
                             f"{seen.index(False)} does not see {folder}); give a folder every process can read")
        yield folder
    finally:  # each process removes its own shard (also when it fails), the main process the folder
        (folder / f"rank-{rank}.npy").unlink(missing_ok=True)
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
    gather_objects(None)  # after a search that went well, no process returns before the folder is gone


def dense_search(
    query_encoder: Encoder,
    passage_encoder: Encoder,
    tokenizer,
    data: BeirData,
    query_ids: Sequence[str],
    config: EvalConfig,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
) -> Ranking:
    """Encode corpus and queries, index the corpus, return each query's top ``config.top_k``.

    Under N processes the encoding is split over them, and only the main process holds the
    vectors (gathered, or with ``eval.vectors_dir`` read back from each process's shard), builds
    the index and searches; every process receives the ranking: call it on every process.
    """
    query_texts = data.query_texts(list(query_ids))
    progress = (lambda name: name) if show_progress else (lambda name: None)
    shared = dict(tokenizer=tokenizer, batch_size=config.batch_size, chunk=config.encode_chunk, device=device,
                  main_only=True)
    with vectors_folder(config.vectors_dir) as folder:
        p_reps = encode_texts(passage_encoder, texts=data.passage_texts, count=len(data.corpus),
                              max_len=config.passage_max_len, desc=progress("encode corpus"),
                              dtype=config.vectors_dtype, folder=folder, **shared)
        q_reps = encode_texts(query_encoder, texts=lambda rows: [query_texts[i] for i in rows],
                              count=len(query_texts), max_len=config.query_max_len, desc=progress("encode queries"),
                              **shared)
        ranking = None
        if world()[0] == 0:
            index = build_index(p_reps, config.index)
            del p_reps  # the index holds its own copy
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


def ranking_metrics(qrels: dict[str, dict[str, int]], ranking: Ranking) -> dict:
    """Mean metrics of ``ranking``, with each judged query's nDCG@10 under :data:`PER_QUERY`."""
    per_query = {q: round(query_metrics(qrels[q], ranking.get(q, []))["ndcg@10"], 6) for q in sorted(qrels)
                 if any(s > 0 for s in qrels[q].values())}
    return {**evaluate_ranking(qrels, ranking), PER_QUERY: per_query}


def reranked_metrics(qrels: dict[str, dict[str, int]], ranking: Ranking) -> dict:
    """``ranking_metrics`` of a re-ranked top ``depth``: no Recall@1000, as only those were re-ranked."""
    metrics = ranking_metrics(qrels, ranking)
    metrics.pop("recall@1000")
    return metrics


def rerank_label(model: str, candidates: str, depth: int) -> str:
    """The report row of a re-ranker: ``cross-encoder (re-rank BM25 top 100)``."""
    return f"{model} (re-rank {candidates} top {depth})"


@torch.inference_mode()
def rerank(
    candidates: Ranking,
    score_pairs: PairScorer,
    queries: Mapping[str, Sequence[int]],
    passages: Mapping[str, Sequence[int]],
    depth: int,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> Ranking:
    """Each query's top ``depth`` candidates re-ordered by ``score_pairs`` (ties keep their order).

    ``queries`` and ``passages`` map ids to content token ids (no special tokens). Under N
    processes each process re-ranks every N-th query and all of them receive the whole ranking.
    """
    rank, size = world()
    reranked: Ranking = {}
    for qid in list(candidates)[rank::size]:
        docs = candidates[qid][:depth]
        scores = []
        for start in range(0, len(docs), batch_size):
            chunk = docs[start : start + batch_size]
            with autocast():
                scores.append(score_pairs([queries[qid]] * len(chunk), [passages[d] for d in chunk]).float().cpu())
        order = np.argsort(-torch.cat(scores).numpy(), kind="stable") if scores else []
        reranked[qid] = [docs[i] for i in order]
    if size > 1:
        reranked = {qid: docs for part in gather_objects(reranked) for qid, docs in part.items()}
    return reranked


def cross_encoder_scorer(cross_encoder, special: SpecialTokens, device: torch.device | str) -> PairScorer:
    """``s_CE`` of aligned pairs, ``[CLS] q [SEP] p [SEP]`` built from the token ids."""
    cross_encoder.eval()

    def score(q_ids, p_ids):
        batch = {k: v.to(device) for k, v in cross_inputs(q_ids, p_ids, special).items()}
        return cross_encoder(batch).scores

    return score


def colbert_scorer(dual_encoder, colbert, special: SpecialTokens, device: torch.device | str) -> PairScorer:
    """``s_Col`` of aligned pairs; a ColBERT without its own encoder reads the dual-encoder's token states."""
    from models.scoring import maxsim_paired

    dual_encoder.eval()
    colbert.eval()

    def tokens(ids, side):
        batch = {k: v.to(device) for k, v in encoder_inputs(ids, special).items()}
        hidden = None if colbert.encoder is not None else dual_encoder(batch, side=side).last_hidden_state
        return colbert(batch, last_hidden_state=hidden)

    def score(q_ids, p_ids):
        q, p = tokens(q_ids, "query"), tokens(p_ids, "passage")
        return maxsim_paired(q.tokens, q.mask, p.tokens, p.mask)

    return score
