"""A large generated BEIR folder for measuring: N passages and M queries, deterministic from a seed.

    python -m data.generate_beir --passages 1000000 --queries 10000 --out /tmp/generated-1m --seed 0

The world: a vocabulary of pseudo-words drawn with Zipf frequencies, and topics that each own a
few words. A passage is about one topic: a share ``topic_rate`` of its words are its topic's, the
others come from the background. A query is ``query_words`` words at distinct places of one passage, its one
relevant passage, a topic word ``query_topic_weight`` times as likely as another; other passages
of the topic share its topic words, so BM25 ranks the relevant one high but not always first. The first ``test_queries`` queries (``q0``, ``q1``, ...) are the
split ``test``, the others ``train``.

Written as a stream: passages are drawn in blocks of :data:`BLOCK` from a generator seeded by
(seed, block), so passage ``i`` depends on the seed and ``i`` alone (a smaller corpus is a prefix
of a larger one), and memory holds one block and the M queries, never the N passages. The folder
is written under a temporary name and renamed into place. Same seed, sizes and numpy version, same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data.demo import SYLLABLES
from data.errors import InputError
from data.fields import bounded, check_fields

BLOCK = 10_000  # passages drawn at once; part of what a seed means, so fixed


@dataclass(frozen=True)
class CorpusSpec:
    """Sizes of a generated corpus, and the statistics of its words."""

    passages: int = bounded(10_000, ge=1)
    queries: int = bounded(1_000, ge=2, note="at most passages")
    test_queries: int = bounded(100, ge=1, note="fewer than queries")
    seed: int = bounded(0, ge=0)
    vocab_size: int = bounded(100_000, ge=2)
    zipf_exponent: float = bounded(1.0, gt=0)
    topics: int = bounded(1_000, ge=1)
    words_per_topic: int = bounded(20, ge=1, note="at most vocab_size")
    topic_rate: float = bounded(0.3, ge=0, le=1)
    query_topic_weight: float = bounded(10.0, gt=0)  # how much likelier a query takes a topic word than another
    min_words: int = bounded(20, ge=1, note="at least query_words")
    max_words: int = bounded(80, ge=1, note="at least min_words")
    query_words: int = bounded(5, ge=1)


def check_spec(spec: CorpusSpec) -> None:
    """Every field within its range, and sizes that fit together (an :class:`InputError` otherwise)."""
    check_fields(spec)
    limits = [("queries", spec.queries, spec.passages, "passages"),
              ("test_queries", spec.test_queries, spec.queries - 1, "queries - 1, leaving a training query"),
              ("words_per_topic", spec.words_per_topic, spec.vocab_size, "vocab_size"),
              ("query_words", spec.query_words, spec.min_words, "min_words"),
              ("min_words", spec.min_words, spec.max_words, "max_words")]
    for name, value, limit, what in limits:
        if value > limit:
            raise InputError(f"{name}: {value} is more than {what} ({limit})")


def vocabulary(size: int) -> list[str]:
    """``size`` distinct pseudo-words: the base-70 digits of ``i + 70`` as syllables (two or more).

    >>> vocabulary(3)
    ['beba', 'bebe', 'bebi']
    """
    base, words = len(SYLLABLES), []
    for i in range(size):
        n, digits = i + base, []
        while n:
            n, digit = divmod(n, base)
            digits.append(SYLLABLES[digit])
        words.append("".join(reversed(digits)))
    return words


class _World:
    """The vocabulary, the background frequencies and the topics' own words, from the seed."""

    def __init__(self, spec: CorpusSpec):
        rng = np.random.default_rng([spec.seed, 0])
        self.words = vocabulary(spec.vocab_size)
        self.by_rank = rng.permutation(spec.vocab_size)  # background rank -> word id
        weights = 1.0 / np.arange(1, spec.vocab_size + 1) ** spec.zipf_exponent
        self.cdf = np.cumsum(weights) / weights.sum()
        # Topic words are ordinary words: any word id, not the most frequent ones only.
        self.topic_words = np.stack([rng.choice(spec.vocab_size, spec.words_per_topic, replace=False)
                                     for _ in range(spec.topics)])  # (topics, words_per_topic)

    def block(self, spec: CorpusSpec, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Word ids (BLOCK, max_words), which are topic words (BLOCK, max_words) and lengths (BLOCK,) of
        passages ``block * BLOCK`` on."""
        rng = np.random.default_rng([spec.seed, 1, block])
        shape = (BLOCK, spec.max_words)
        lengths = rng.integers(spec.min_words, spec.max_words + 1, BLOCK)
        topics = rng.integers(spec.topics, size=BLOCK)
        ranks = np.minimum(np.searchsorted(self.cdf, rng.random(shape), side="right"), spec.vocab_size - 1)
        own = self.topic_words[topics[:, None], rng.integers(spec.words_per_topic, size=shape)]  # (BLOCK, max_words)
        topical = rng.random(shape) < spec.topic_rate
        return np.where(topical, own, self.by_rank[ranks]), topical, lengths

    def text(self, ids: np.ndarray) -> str:
        return " ".join(self.words[i] for i in ids.tolist())


def generate_beir(spec: CorpusSpec, out: str | os.PathLike) -> Path:
    """Write the BEIR folder of ``spec`` to ``out`` (which must not exist); returns its path."""
    check_spec(spec)
    out = Path(out)
    if out.exists():
        raise InputError("already exists (the generator writes a new folder)", out)
    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write(spec, staging)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write(spec: CorpusSpec, folder: Path) -> None:
    world = _World(spec)
    targets = np.random.default_rng([spec.seed, 2]).choice(spec.passages, spec.queries, replace=False)  # query -> passage
    by_passage = np.argsort(targets, kind="stable")  # queries in the order their passages are written
    queries: list[str] = [""] * spec.queries
    next_query = 0
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as corpus:
        for block in range(-(-spec.passages // BLOCK)):
            start = block * BLOCK
            words, topical, lengths = world.block(spec, block)
            for row in range(min(BLOCK, spec.passages - start)):
                text = world.text(words[row, : lengths[row]])
                corpus.write(json.dumps({"_id": f"d{start + row}", "title": "", "text": text}) + "\n")
            rng = np.random.default_rng([spec.seed, 3, block])
            while next_query < spec.queries and targets[by_passage[next_query]] < start + BLOCK:
                query = by_passage[next_query]
                row = targets[query] - start
                weights = np.where(topical[row, : lengths[row]], spec.query_topic_weight, 1.0)
                picked = np.sort(rng.choice(lengths[row], spec.query_words, replace=False, p=weights / weights.sum()))
                queries[query] = world.text(words[row, picked])
                next_query += 1
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"_id": f"q{k}", "text": text}) + "\n" for k, text in enumerate(queries))
    (folder / "qrels").mkdir()
    for split, ks in (("test", range(spec.test_queries)), ("train", range(spec.test_queries, spec.queries))):
        with open(folder / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            f.writelines(f"q{k}\td{targets[k]}\t1\n" for k in ks)
    (folder / "generated.json").write_text(json.dumps({"generator": "data.generate_beir", **asdict(spec)}, indent=1))


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (not the usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m data.generate_beir", description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, required=True, help="N, passages in corpus.jsonl")
    parser.add_argument("--queries", type=int, required=True, help="M, queries in all (train and test)")
    parser.add_argument("--test-queries", type=int, help="queries of the split test (default: M // 10, at least 1)")
    parser.add_argument("--seed", type=int, default=CorpusSpec.seed)
    parser.add_argument("--out", required=True, help="the BEIR folder to write (must not exist)")
    args = parser.parse_args(argv)
    test_queries = max(1, args.queries // 10) if args.test_queries is None else args.test_queries
    spec = CorpusSpec(passages=args.passages, queries=args.queries, test_queries=test_queries, seed=args.seed)
    started = time.perf_counter()
    try:
        out = generate_beir(spec, args.out)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {spec.passages} passages and {spec.queries} queries ({spec.test_queries} test) to {out} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
