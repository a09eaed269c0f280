"""Load and validate retrieval data in BEIR layout (or saved with ``datasets.save_to_disk``).

Layout under ``root``::

    corpus.jsonl      {"_id", "title" (optional), "text"} per line   (or corpus/  from save_to_disk)
    queries.jsonl     {"_id", "text"} per line                     (or queries/ from save_to_disk)
    qrels/<split>.tsv query-id <TAB> corpus-id <TAB> score, with a header line, LF or CRLF

Only ``_id``, ``title`` and ``text`` are kept: other fields (BEIR's ``metadata``) may hold gold
labels and never reach a model. Ids are stripped of surrounding whitespace in every file alike. A
text is empty when it has no character a tokenizer keeps (whitespace, control characters such as
NUL, and format characters such as zero-width spaces do not count). A qrels row that judges a
(query, document) pair already judged with another score is refused, not resolved by the last row.
Every problem is an :class:`InputError` naming file and line, raised before anything downstream starts.
"""

from __future__ import annotations

import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import datasets

from data.errors import InputError

QRELS_HEADER = ("query-id", "corpus-id", "score")
Qrels = dict[str, dict[str, int]]  # query id -> {doc id: graded relevance}


@dataclass(frozen=True)
class BeirData:
    """A validated corpus, its queries and the qrels of the requested splits."""

    corpus: datasets.Dataset  # columns _id, title, text
    queries: datasets.Dataset  # columns _id, text
    qrels: dict[str, Qrels]  # split -> qrels

    def passage_texts(self, rows: Sequence[int] | None = None) -> list[str]:
        """``title + " " + text``, stripped: the passage string every model and BM25 sees (BEIR's).

        Every passage, or those of corpus ``rows`` only (read from the memory-mapped table, so a
        chunk of the corpus never needs the whole of it in memory).
        """
        columns = self.corpus if rows is None else self.corpus[[int(i) for i in rows]]
        return [f"{t} {x}".strip() for t, x in zip(columns["title"], columns["text"])]

    def query_texts(self, query_ids: list[str]) -> list[str]:
        row = {qid: i for i, qid in enumerate(self.queries["_id"])}
        texts = self.queries["text"]
        return [texts[row[qid]] for qid in query_ids]

    def judged_queries(self, split: str) -> list[str]:
        """Ids of the split's queries with at least one relevant (score > 0) document, sorted."""
        return sorted(q for q, docs in self.qrels[split].items() if any(s > 0 for s in docs.values()))


def visible(text: str) -> bool:
    """Whether ``text`` holds a character that a tokenizer keeps.

    >>> visible(" \\u200b\\x00\\t"), visible("\\u200ba")
    (False, True)
    """
    return any(not (c.isspace() or unicodedata.category(c) in ("Cc", "Cf")) for c in text)


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                yield number, line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason} at byte {e.start})", path) from None
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror})", path) from None


def _jsonl_rows(path: str, fields: tuple[str, ...], required: tuple[str, ...]) -> Iterator[dict]:
    seen: set[str] = set()
    for number, line in _read_lines(Path(path)):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON ({e.msg} at column {e.colno})", path, number) from None
        if not isinstance(obj, dict):
            raise InputError(f"expected a JSON object, got {type(obj).__name__}", path, number)
        for field in required:
            if field not in obj or obj[field] is None:
                raise InputError(f"missing field '{field}' (expected fields: {', '.join(fields)})", path, number)
        row = {}
        for field in fields:
            value = obj.get(field, "")
            if field == "_id" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                raise InputError(f"field '{field}' must be a string, got {type(value).__name__}", path, number)
            row[field] = value
        row["_id"] = row["_id"].strip()
        if not visible(row["_id"]):
            raise InputError("empty '_id'", path, number)
        if not (visible(row["text"]) or visible(row.get("title", ""))):
            raise InputError(f"empty text for id {row['_id']!r} (no character but whitespace, control or "
                             "zero-width ones)", path, number)
        if row["_id"] in seen:
            raise InputError(f"duplicate id {row['_id']!r}", path, number)
        seen.add(row["_id"])
        yield row


def _load_jsonl(path: Path, fields: tuple[str, ...], required: tuple[str, ...]) -> datasets.Dataset:
    stat = path.stat()
    empty = InputError("no records (expected one JSON object per line)", path)
    if stat.st_size == 0:
        raise empty
    features = datasets.Features({f: datasets.Value("string") for f in fields})
    try:
        dataset = datasets.Dataset.from_generator(
            _jsonl_rows,
            features=features,
            # The size and mtime make the Arrow cache follow edits of the file.
            gen_kwargs={"path": str(path), "fields": fields, "required": required},
            fingerprint=f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{','.join(fields)}",
        )
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, InputError):
            raise cause from None
        raise
    except ValueError as e:
        if "corresponds to no data" in str(e):  # only blank lines
            raise empty from None
        raise
    return dataset


def _load_saved(path: Path, fields: tuple[str, ...], required: tuple[str, ...]) -> datasets.Dataset:
    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"not a dataset saved with save_to_disk ({e})", path) from None
    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1:
            raise InputError(f"expected one split, found {sorted(dataset)}", path)
        dataset = next(iter(dataset.values()))
    for field in required:
        if field not in dataset.column_names:
            raise InputError(f"missing column '{field}' (columns: {', '.join(dataset.column_names)})", path)
    if "title" in fields and "title" not in dataset.column_names:
        dataset = dataset.add_column("title", [""] * len(dataset))
    dataset = dataset.select_columns(list(fields)).cast(
        datasets.Features({f: datasets.Value("string") for f in fields})
    )
    if len(dataset) == 0:
        raise InputError("no records", path)
    if "title" in fields:
        dataset = dataset.map(lambda row: {"title": row["title"] or ""})
    for i, row in enumerate(dataset):
        for field in required:
            if row[field] is None:
                raise InputError(f"row {i}: missing '{field}'", path)
    dataset = dataset.map(lambda row: {"_id": row["_id"].strip()})
    seen: set[str] = set()
    for i, row in enumerate(dataset):
        if not visible(row["_id"]):
            raise InputError(f"row {i}: empty '_id'", path)
        if not (visible(row["text"]) or visible(row.get("title") or "")):
            raise InputError(f"row {i}: empty text for id {row['_id']!r} (no character but whitespace, control or "
                             "zero-width ones)", path)
        if row["_id"] in seen:
            raise InputError(f"row {i}: duplicate id {row['_id']!r}", path)
        seen.add(row["_id"])
    return dataset


def load_records(root: Path, name: str, fields: tuple[str, ...], required: tuple[str, ...]) -> datasets.Dataset:
    """``root/<name>.jsonl`` or ``root/<name>/`` (save_to_disk), validated, with only ``fields`` kept."""
    jsonl, saved = root / f"{name}.jsonl", root / name
    if jsonl.is_file():
        return _load_jsonl(jsonl, fields, required)
    if saved.is_dir():
        return _load_saved(saved, fields, required)
    raise InputError(f"missing file (expected {jsonl.name} or a saved dataset folder {saved.name}/)", jsonl)


def load_qrels(path: Path, query_ids: set[str], doc_ids: set[str]) -> Qrels:
    """Parse one BEIR qrels TSV, checking the header, every row, and that ids exist."""
    if not path.is_file():
        raise InputError("missing qrels file", path)
    qrels: Qrels = {}
    judged_on: dict[tuple[str, str], int] = {}  # (query id, doc id) -> the line that judged it
    lines = _read_lines(path)
    first = next(lines, None)
    if first is None or tuple(c.strip().lower() for c in first[1].split("\t")) != QRELS_HEADER:
        got = "an empty file" if first is None else repr(first[1][:60])
        raise InputError(f"expected the header 'query-id<TAB>corpus-id<TAB>score', got {got}", path, 1)
    for number, line in lines:
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) != 3:
            raise InputError(f"expected 3 tab-separated columns, got {len(columns)}", path, number)
        qid, did, score = (c.strip() for c in columns)
        try:
            relevance = int(score)
        except ValueError:
            raise InputError(f"score must be an integer, got {score!r}", path, number) from None
        if qid not in query_ids:
            raise InputError(f"query id {qid!r} is not in queries", path, number)
        if did not in doc_ids:
            raise InputError(f"corpus id {did!r} is not in the corpus", path, number)
        earlier = qrels.get(qid, {}).get(did)
        if earlier is not None and earlier != relevance:
            raise InputError(f"query {qid!r} and document {did!r} are judged again with another score ({relevance}; "
                             f"line {judged_on[qid, did]} gave {earlier})", path, number)
        judged_on[qid, did] = number
        qrels.setdefault(qid, {})[did] = relevance
    if not any(s > 0 for docs in qrels.values() for s in docs.values()):
        raise InputError("no judged queries (no row with score > 0)", path)
    return qrels


def load_beir(root: str | os.PathLike, splits: tuple[str, ...]) -> BeirData:
    """Load ``root`` in BEIR layout with the qrels of ``splits``; raises :class:`InputError` on bad data."""
    root = Path(root)
    if not root.is_dir():
        raise InputError("data directory not found", root)
    corpus = load_records(root, "corpus", ("_id", "title", "text"), ("_id", "text"))
    queries = load_records(root, "queries", ("_id", "text"), ("_id", "text"))
    query_ids, doc_ids = set(queries["_id"]), set(corpus["_id"])
    qrels = {split: load_qrels(root / "qrels" / f"{split}.tsv", query_ids, doc_ids) for split in splits}
    return BeirData(corpus=corpus, queries=queries, qrels=qrels)
