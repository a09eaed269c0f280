"""Pseudo-queries from the corpus: a passage's title as a query whose one relevant passage is its own.

Labelled queries are few on a new domain (709 on SciFact train); its corpus is not. GPL (Wang et
al., 2022) generates queries for corpus passages and lets a teacher label the candidates; with no
query generator offline, the title stands in for the generated query (as in title-to-abstract
pre-training, e.g. SPECTER). Which passages are used depends on their ids alone (the first N by
sha256("pseudo:" + id)), never on a judgement, so no evaluation label reaches training.
"""

from __future__ import annotations

import dataclasses
import hashlib

import datasets

from data.beir import BeirData
from data.errors import InputError

PREFIX = "pseudo:"


def pseudo_query_id(doc_id: str) -> str:
    """The query id of the pseudo-query built from passage ``doc_id``.

    >>> pseudo_query_id("4983")
    'pseudo:4983'
    """
    return PREFIX + doc_id


def add_pseudo_queries(data: BeirData, split: str, count: int) -> BeirData:
    """``data`` with ``count`` title queries added to ``split``, each judged relevant to its own passage.

    Passages with an empty title, or whose title is already a query's text, are not used.
    """
    if count <= 0:
        return data
    taken = {text.strip().lower() for text in data.queries["text"]}
    titled = [(doc, title.strip()) for doc, title in zip(data.corpus["_id"], data.corpus["title"])
              if title and title.strip() and title.strip().lower() not in taken]
    if count > len(titled):
        raise InputError(f"data.pseudo_queries: {count} asked for, but only {len(titled)} passages have a title "
                         "that is not already a query")
    chosen = sorted(titled, key=lambda pair: hashlib.sha256(f"{PREFIX}{pair[0]}".encode()).hexdigest())[:count]
    ids = [pseudo_query_id(doc) for doc, _ in chosen]
    clash = set(ids) & set(data.queries["_id"])
    if clash:
        raise InputError(f"data.pseudo_queries: query id {sorted(clash)[0]!r} already exists in queries")
    added = datasets.Dataset.from_dict({"_id": ids, "text": [title for _, title in chosen]},
                                       features=data.queries.features)
    queries = datasets.concatenate_datasets([data.queries, added])
    judged = {**data.qrels[split], **{q: {doc: 1} for q, (doc, _) in zip(ids, chosen)}}
    return dataclasses.replace(data, queries=queries, qrels={**data.qrels, split: judged})
