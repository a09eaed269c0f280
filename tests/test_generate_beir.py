"""The generated large corpus (data/generate_beir.py): deterministic, streamed, loadable, judged correctly."""

import dataclasses
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

import data.generate_beir as generator
from data.beir import load_beir
from data.errors import InputError
from data.generate_beir import CorpusSpec, generate_beir

ROOT = Path(__file__).resolve().parents[1]
SMALL = CorpusSpec(passages=700, queries=60, test_queries=12, seed=3, vocab_size=2_000, topics=20)
FILES = ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "qrels/train.tsv", "generated.json")


def read(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in FILES}


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_ones(tmp_path):
    first = read(generate_beir(SMALL, tmp_path / "a"))
    assert read(generate_beir(SMALL, tmp_path / "b")) == first
    other = read(generate_beir(dataclasses.replace(SMALL, seed=4), tmp_path / "c"))
    assert other["corpus.jsonl"] != first["corpus.jsonl"] and other["queries.jsonl"] != first["queries.jsonl"]
    # Passage i depends on the seed and i alone: a smaller corpus is the start of a larger one.
    smaller = read(generate_beir(dataclasses.replace(SMALL, passages=150, queries=20), tmp_path / "d"))
    assert first["corpus.jsonl"].startswith(smaller["corpus.jsonl"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "d"]  # no staging folder left behind


def test_it_loads_as_beir_and_every_query_is_judged_on_a_passage_holding_its_words(tmp_path):
    folder = generate_beir(SMALL, tmp_path / "beir")
    data = load_beir(folder, ("train", "test"))
    assert len(data.corpus) == 700 and len(data.queries) == 60
    assert len(data.judged_queries("test")) == 12 and len(data.judged_queries("train")) == 48
    doc_ids, query_ids = set(data.corpus["_id"]), set(data.queries["_id"])
    texts = dict(zip(data.corpus["_id"], data.passage_texts()))
    for split in ("train", "test"):
        for qid, judged in data.qrels[split].items():
            assert qid in query_ids and set(judged) <= doc_ids and list(judged.values()) == [1]
            (doc,) = judged
            query_words = data.query_texts([qid])[0].split()
            assert len(query_words) == SMALL.query_words and set(query_words) <= set(texts[doc].split())
    assert not set(data.qrels["train"]) & set(data.qrels["test"])
    assert json.loads((folder / "generated.json").read_text())["passages"] == 700


def test_memory_does_not_grow_with_the_number_of_passages(tmp_path, monkeypatch):
    monkeypatch.setattr(generator, "BLOCK", 100)  # many blocks from few passages

    def peak(passages: int, name: str) -> int:
        tracemalloc.start()
        generate_beir(CorpusSpec(passages=passages, queries=50, test_queries=5, vocab_size=500, topics=10),
                      tmp_path / name)
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return size

    peak(1_000, "warm-up")  # the first call also allocates what stays cached
    small, large = peak(1_000, "small"), peak(8_000, "large")
    assert large < small + 500_000, (small, large)  # holding the passages would add about 2.5 MB of strings


@pytest.mark.parametrize("args, message", [
    (["--passages", "10", "--queries", "20"], "error: queries: 20 is more than passages (10)"),
    (["--passages", "0", "--queries", "2"], "error: passages: must be >= 1, got 0"),
    (["--passages", "10", "--queries", "5", "--test-queries", "5"], "error: test_queries: 5 is more than queries - 1"),
    (["--passages", "ten", "--queries", "5"], "error: argument --passages: invalid int value: 'ten'"),
    (["--queries", "5"], "error: the following arguments are required: --passages"),
])
def test_bad_arguments_are_one_line_with_status_2(tmp_path, args, message):
    done = subprocess.run([sys.executable, "-m", "data.generate_beir", *args, "--out", str(tmp_path / "x")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith(message) and len(done.stderr.splitlines()) == 1, done.stderr
    assert not (tmp_path / "x").exists()


def test_an_existing_folder_is_refused_and_kept(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        generate_beir(SMALL, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_the_command_line_writes_the_folder(tmp_path):
    assert generator.main(["--passages", "50", "--queries", "10", "--seed", "7", "--out", str(tmp_path / "g")]) == 0
    spec = json.loads((tmp_path / "g" / "generated.json").read_text())
    assert (spec["passages"], spec["queries"], spec["test_queries"], spec["seed"]) == (50, 10, 1, 7)
