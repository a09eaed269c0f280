"""BEIR loading: good data in both layouts, and one clear error per kind of bad input."""

import json

import datasets
import pytest

from data.beir import load_beir
from data.errors import InputError

CORPUS = [
    {"_id": "d1", "title": "Apples", "text": "red fruit", "metadata": {"gold": "q1"}},
    {"_id": "d2", "title": "", "text": "green pears"},
    {"_id": "d3", "text": "a yellow banana"},
]
QUERIES = [{"_id": "q1", "text": "which fruit is red"}, {"_id": "q2", "text": "pears"}]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\nq2\td3\t0\n"


def write_beir(root, corpus=None, queries=None, qrels=None, corpus_text=None, queries_text=None):
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text(
        corpus_text if corpus_text is not None else "".join(json.dumps(r) + "\n" for r in corpus or CORPUS)
    )
    (root / "queries.jsonl").write_text(
        queries_text if queries_text is not None else "".join(json.dumps(r) + "\n" for r in queries or QUERIES)
    )
    (root / "qrels" / "test.tsv").write_bytes((qrels if qrels is not None else QRELS).encode())
    return root


def test_loads_only_id_title_text_and_graded_qrels(tmp_path):
    data = load_beir(write_beir(tmp_path), ("test",))
    assert data.corpus.column_names == ["_id", "title", "text"]
    assert data.queries.column_names == ["_id", "text"]
    assert data.qrels["test"] == {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 0}}
    assert data.passage_texts() == ["Apples red fruit", "green pears", "a yellow banana"]
    assert data.judged_queries("test") == ["q1", "q2"]


def test_crlf_qrels_blank_lines_and_integer_ids(tmp_path):
    corpus = "\n".join(json.dumps(r) for r in [{"_id": 1, "text": "one"}, {"_id": 2, "text": "two"}]) + "\n\n"
    qrels = "query-id\tcorpus-id\tscore\r\nq1\t1\t1\r\nq2\t2\t1\r\n"
    data = load_beir(write_beir(tmp_path, corpus_text=corpus, qrels=qrels), ("test",))
    assert data.corpus["_id"] == ["1", "2"]
    assert data.qrels["test"] == {"q1": {"1": 1}, "q2": {"2": 1}}


def test_datasets_saved_to_disk(tmp_path):
    write_beir(tmp_path)
    datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "metadata"} for r in CORPUS]).save_to_disk(
        str(tmp_path / "corpus")
    )
    datasets.Dataset.from_list(QUERIES).save_to_disk(str(tmp_path / "queries"))
    (tmp_path / "corpus.jsonl").unlink()
    (tmp_path / "queries.jsonl").unlink()
    data = load_beir(tmp_path, ("test",))
    assert data.corpus["_id"] == ["d1", "d2", "d3"]
    assert data.corpus["title"][2] == ""


BAD = {
    "missing corpus": (dict(), lambda root: (root / "corpus.jsonl").unlink(), "corpus.jsonl: missing file"),
    "invalid json": (dict(corpus_text='{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": \n'), None, "corpus.jsonl:2: invalid JSON"),
    "not an object": (dict(queries_text='["q1", "text"]\n'), None, "queries.jsonl:1: expected a JSON object"),
    "missing _id": (dict(corpus=[{"text": "x"}]), None, "corpus.jsonl:1: missing field '_id'"),
    "missing text": (dict(queries=[{"_id": "q1"}]), None, "queries.jsonl:1: missing field 'text'"),
    "text not a string": (dict(corpus=[{"_id": "d1", "text": 3}]), None, "corpus.jsonl:1: field 'text' must be a string"),
    "duplicate id": (dict(corpus=CORPUS + [{"_id": "d2", "text": "again"}]), None, "corpus.jsonl:4: duplicate id 'd2'"),
    "empty corpus": (dict(corpus_text=""), None, "corpus.jsonl: no records"),
    "empty query text": (dict(queries=[QUERIES[0], {"_id": "q2", "text": "  "}]), None, "queries.jsonl:2: empty text"),
    "qrels header missing": (dict(qrels="q1\td1\t1\n"), None, "test.tsv:1: expected the header"),
    "qrels empty file": (dict(qrels=""), None, "test.tsv:1: expected the header"),
    "qrels column count": (dict(qrels="query-id\tcorpus-id\tscore\nq1\td1\n"), None, "test.tsv:2: expected 3 tab-separated columns, got 2"),
    "qrels score": (dict(qrels="query-id\tcorpus-id\tscore\nq1\td1\thigh\n"), None, "test.tsv:2: score must be an integer"),
    "qrels unknown query": (dict(qrels="query-id\tcorpus-id\tscore\nq9\td1\t1\n"), None, "test.tsv:2: query id 'q9' is not in queries"),
    "qrels unknown doc": (dict(qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n"), None, "test.tsv:3: corpus id 'd9' is not in the corpus"),
    "split with no judged queries": (dict(qrels="query-id\tcorpus-id\tscore\nq1\td1\t0\n"), None, "test.tsv: no judged queries"),
    "missing qrels split": (dict(), lambda root: (root / "qrels" / "test.tsv").unlink(), "test.tsv: missing qrels file"),
    "not utf-8": (dict(), lambda root: (root / "queries.jsonl").write_bytes(b'{"_id": "q1", "text": "\xff"}\n'), "queries.jsonl: not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_line_and_expectation(tmp_path, case):
    kwargs, mutate, expected = BAD[case]
    root = write_beir(tmp_path, **kwargs)
    if mutate:
        mutate(root)
    with pytest.raises(InputError) as error:
        load_beir(root, ("test",))
    message = str(error.value)
    assert expected in message
    assert "\n" not in message
    assert message.startswith(str(tmp_path))


def test_missing_data_directory(tmp_path):
    with pytest.raises(InputError, match="data directory not found"):
        load_beir(tmp_path / "nowhere", ("test",))


def test_edited_file_is_reloaded_not_served_from_cache(tmp_path):
    root = write_beir(tmp_path)
    assert len(load_beir(root, ("test",)).corpus) == 3
    write_beir(root, corpus=CORPUS + [{"_id": "d4", "text": "a fourth document"}])
    assert len(load_beir(root, ("test",)).corpus) == 4


def test_scifact_loads_with_its_published_sizes_and_no_label_fields():
    from tests.conftest import SCIFACT

    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    data = load_beir(SCIFACT, ("train", "test"))
    assert len(data.corpus) == 5183
    assert len(data.judged_queries("train")) == 809 and len(data.judged_queries("test")) == 300
    assert "metadata" not in data.queries.column_names + data.corpus.column_names
