"""A small FAISS wrapper: exact inner product by default, HNSW or IVF for large corpora."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from data.fields import bounded, one_of

INDEX_KINDS = ("flat", "hnsw", "ivf")
ADD_ROWS = 65_536  # rows of float16 vectors converted to float32 at a time
MAX_POINTS_PER_LIST = 256  # FAISS's k-means default: training points kept per list


@dataclass(frozen=True)
class IndexConfig:
    """Which FAISS index to build. Scores are inner products (cosine when vectors are normalised)."""

    kind: str = one_of("flat", INDEX_KINDS)
    hnsw_m: int = bounded(32, ge=2)
    hnsw_ef_construction: int = bounded(200, ge=1)
    hnsw_ef_search: int = bounded(256, ge=1)
    # 0: 4 * sqrt(corpus size), at most corpus size / 39 (FAISS wants 39 training points per list).
    ivf_nlist: int = bounded(0, ge=0, note="at most the corpus size; 0 picks one")
    ivf_nprobe: int = bounded(32, ge=1)


def float32_blocks(p_reps: np.ndarray, rows: int = ADD_ROWS) -> Iterator[np.ndarray]:
    """``p_reps`` as FAISS takes it: a float32 array whole (no copy), another dtype converted ``rows`` at a time.

    ``p_reps`` may be any array-like with ``dtype``, ``len`` and row slicing (vectors in shards on disk).

    >>> [b.dtype.name for b in float32_blocks(np.zeros((5, 2), np.float16), rows=2)]
    ['float32', 'float32', 'float32']
    """
    if isinstance(p_reps, np.ndarray) and p_reps.dtype == np.float32:
        yield np.ascontiguousarray(p_reps)
        return
    for start in range(0, len(p_reps), rows):
        yield np.ascontiguousarray(p_reps[start : start + rows], dtype=np.float32)


def ivf_training_rows(p_reps: np.ndarray, nlist: int) -> np.ndarray:
    """What IVF's k-means trains on: every row while there are at most 256 per list (as FAISS would take
    them), else a seeded sample of 256 per list, the same whatever holds the vectors; float32.

    >>> ivf_training_rows(np.zeros((600, 2), np.float16), nlist=2).shape
    (512, 2)
    """
    if isinstance(p_reps, np.ndarray) and p_reps.dtype == np.float32 and len(p_reps) <= MAX_POINTS_PER_LIST * nlist:
        return np.ascontiguousarray(p_reps)
    rows = np.arange(len(p_reps))
    if len(p_reps) > MAX_POINTS_PER_LIST * nlist:
        rows = np.sort(np.random.default_rng(0).choice(len(p_reps), MAX_POINTS_PER_LIST * nlist, replace=False))
    return np.ascontiguousarray(p_reps[rows], dtype=np.float32)


def build_index(p_reps: np.ndarray, config: IndexConfig = IndexConfig()) -> faiss.Index:
    """Index passage vectors (P, D) for inner-product search; float16 vectors are added as float32 in blocks.

    ``p_reps`` may be an array-like that reads rows when sliced (:class:`pipeline.evaluate.VectorShards`).

    >>> index = build_index(np.eye(3, dtype=np.float32))
    >>> index.ntotal
    3
    """
    dim = p_reps.shape[1]
    if config.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        index.hnsw.efSearch = config.hnsw_ef_search
    elif config.kind == "ivf":
        # FAISS wants at least 39 training points per list.
        nlist = config.ivf_nlist or max(1, min(int(4 * math.sqrt(len(p_reps))), len(p_reps) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(ivf_training_rows(p_reps, nlist))
        index.nprobe = min(config.ivf_nprobe, nlist)
    else:
        raise ValueError(f"unknown index kind {config.kind!r} (expected one of {', '.join(INDEX_KINDS)})")
    for block in float32_blocks(p_reps):
        index.add(block)
    return index


def search(index: faiss.Index, q_reps: np.ndarray, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores (Q, k), indices (Q, k)) in query batches; ``k`` is capped at the index size.

    >>> scores, indices = search(build_index(np.eye(3, dtype=np.float32)), np.array([[0, 1, 0]], np.float32), k=2)
    >>> int(indices[0, 0]), float(scores[0, 0])
    (1, 1.0)
    """
    k = min(k, index.ntotal)
    q_reps = np.ascontiguousarray(q_reps, dtype=np.float32)
    scores, indices = zip(*(index.search(q_reps[i : i + batch_size], k) for i in range(0, len(q_reps), batch_size)))
    return np.concatenate(scores), np.concatenate(indices)
