"""BM25 retrieval with the ``bm25s`` library, searched in query chunks so memory stays flat.

An index can be saved to a folder and loaded back memory-mapped, so processes that read the same
folder share one copy of it in the page cache.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import bm25s
import numpy as np
from tqdm.auto import tqdm

from data.fields import bounded, one_of

logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets its own logger to DEBUG when imported
# What bm25s.tokenize accepts as a stopword list (by name), and "none".
STOPWORDS = ("en", "english", "en_plus", "english_plus", "da", "danish", "de", "german", "es", "spanish", "fr", "french",
             "it", "italian", "ko", "korean", "nl", "dutch", "no", "norwegian", "pt", "portuguese", "ru", "russian",
             "sv", "swedish", "tr", "turkish", "zh", "chinese", "none")


def stemmers() -> tuple[str, ...]:
    """PyStemmer's languages, and "none"."""
    import Stemmer

    return (*Stemmer.algorithms(), "none")


@dataclass(frozen=True)
class BM25Config:
    """Lucene BM25 (``bm25s`` ``method="lucene"``); English stopwords and Snowball stemming by default."""

    k1: float = bounded(0.9, ge=0)
    b: float = bounded(0.4, ge=0, le=1)
    stemmer: str = one_of("english", stemmers, "a PyStemmer language (english, french, porter, ...) or none")
    stopwords: str = one_of("en", STOPWORDS, "a bm25s stopword list (en, en_plus, de, fr, zh, ...) or none")
    chunk_size: int = bounded(1024, ge=1)  # queries scored at once

    def analysis(self) -> dict:
        """The settings a saved index depends on (the chunk size only paces the search)."""
        return {k: v for k, v in asdict(self).items() if k != "chunk_size"}


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class BM25Index:
    """A corpus indexed for BM25; :meth:`search` returns top-k (scores, indices) arrays.

    :meth:`search` scores ``threads`` queries at once (``bm25s``'s thread pool; 0: one per CPU core).

    >>> index = BM25Index(["red apples", "green pears", "apple pie recipes"], BM25Config(stemmer="none", stopwords="none"))
    >>> scores, indices = index.search(["pears"], k=1)
    >>> int(indices[0, 0])
    1
    """

    SETTINGS = "bm25_settings.json"  # next to bm25s's files in a saved index: what it was built with

    def __init__(self, passages: Sequence[str], config: BM25Config = BM25Config(), show_progress: bool = False,
                 threads: int = 1):
        self._setup(config, show_progress, threads)
        self._retriever = bm25s.BM25(k1=config.k1, b=config.b, method="lucene")
        self._retriever.index(self._tokenize(passages, return_ids=True), show_progress=show_progress)

    def _setup(self, config: BM25Config, show_progress: bool, threads: int) -> None:
        self.config = config
        self.show_progress = show_progress
        self.threads = threads or cpu_cores()
        self._stemmer = None
        if config.stemmer != "none":
            import Stemmer

            self._stemmer = Stemmer.Stemmer(config.stemmer)
        self._stopwords = None if config.stopwords == "none" else config.stopwords

    @property
    def size(self) -> int:
        """Passages in the index."""
        return int(self._retriever.scores["num_docs"])

    def save(self, folder: Path) -> None:
        """Write the index into ``folder`` (bm25s's arrays and vocabulary, and the settings it was built with)."""
        self._retriever.save(str(folder), show_progress=False)
        (Path(folder) / self.SETTINGS).write_text(json.dumps(self.config.analysis(), indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path, config: BM25Config = BM25Config(), show_progress: bool = False,
             threads: int = 1) -> BM25Index:
        """The index :meth:`save` wrote to ``folder``, its arrays memory-mapped; ``config`` must be the one it was built with.

        >>> import tempfile
        >>> plain = BM25Config(stemmer="none", stopwords="none")
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     BM25Index(["red apples", "green pears", "apple pie recipes"], plain).save(Path(folder))
        ...     int(BM25Index.load(Path(folder), plain).search(["pears"], k=1)[1][0, 0])
        1
        """
        saved = json.loads((Path(folder) / cls.SETTINGS).read_text())
        if saved != config.analysis():
            raise ValueError(f"{folder}: the BM25 index was built with {saved}, not {config.analysis()}")
        index = cls.__new__(cls)
        index._setup(config, show_progress, threads)
        index._retriever = bm25s.BM25.load(str(folder), mmap=True, show_progress=False)
        return index

    def _tokenize(self, texts: Sequence[str], return_ids: bool):
        return bm25s.tokenize(
            list(texts), stopwords=self._stopwords, stemmer=self._stemmer, return_ids=return_ids, show_progress=False
        )

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` passages per query: scores (Q, k) float32 and indices (Q, k); ``k`` capped at corpus size.

        A query with no known term gets score 0 everywhere (its order is then arbitrary).
        """
        k = min(k, self.size)
        scores, indices = [], []
        chunks = range(0, len(queries), self.config.chunk_size)
        for start in tqdm(chunks, desc="bm25 search", disable=None if self.show_progress else True, leave=False):
            tokens = self._tokenize(queries[start : start + self.config.chunk_size], return_ids=False)
            found, found_scores = self._retriever.retrieve(tokens, k=k, show_progress=False,
                                                           n_threads=self.threads if self.threads > 1 else 0)
            indices.append(np.asarray(found, dtype=np.int64))
            scores.append(np.asarray(found_scores, dtype=np.float32))
        return np.concatenate(scores), np.concatenate(indices)

    def score_pairs(self, query: str, indices: Sequence[int]) -> np.ndarray:
        """BM25 scores (len(indices),) float32 of one query against the passages at ``indices``.

        bm25s scores the query against the whole corpus (one sparse pass), and the wanted rows are taken.
        """
        tokens = self._tokenize([query], return_ids=False)[0]
        scores = self._retriever.get_scores(list(tokens)) if len(tokens) else np.zeros(self.size, dtype=np.float32)
        return np.asarray(scores, dtype=np.float32)[np.asarray(indices, dtype=np.int64)]
