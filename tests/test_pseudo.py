"""Pseudo-queries from the corpus: which passages, what they add to training, and what they never touch."""

import dataclasses

import pytest

from data.errors import InputError
from data.pseudo import add_pseudo_queries
from pipeline.config import load_config
from pipeline.run import load_data
from tests.test_pipeline import tiny_config


def test_title_queries_join_the_training_split_each_judged_relevant_to_its_own_passage(demo_dirs):
    config = tiny_config("/tmp/unused", f"data.path={demo_dirs[0]}", "data.dev_queries=5", "eval.split=dev")
    plain = load_data(config, demo_dirs[0])
    data = load_data(dataclasses.replace(config, data=dataclasses.replace(config.data, pseudo_queries=12)), demo_dirs[0])
    added = sorted(set(data.judged_queries("train")) - set(plain.judged_queries("train")))
    assert len(added) == 12 and all(q.startswith("pseudo:") for q in added)
    titles = dict(zip(data.corpus["_id"], data.corpus["title"]))
    for qid in added:
        (doc, relevance), = data.qrels["train"][qid].items()
        assert relevance == 1 and qid == f"pseudo:{doc}" and data.query_texts([qid]) == [titles[doc].strip()]
    assert data.qrels["dev"] == plain.qrels["dev"]  # the dev split is carved first and never gets one
    assert {q: data.qrels["train"][q] for q in plain.qrels["train"]} == plain.qrels["train"]


def test_the_choice_depends_on_passage_ids_alone_never_on_judgements(demo_dirs):
    config = tiny_config("/tmp/unused", f"data.path={demo_dirs[0]}")
    data = load_data(config, demo_dirs[0])
    relabelled = dataclasses.replace(data, qrels={"train": {"x": {data.corpus["_id"][0]: 1}}, "test": {}})
    chosen = sorted(add_pseudo_queries(data, "train", 7).qrels["train"].keys() - data.qrels["train"].keys())
    again = sorted(add_pseudo_queries(relabelled, "train", 7).qrels["train"].keys() - {"x"})
    assert chosen == again and len(chosen) == 7
    assert add_pseudo_queries(data, "train", 0) is data


def test_too_many_or_negative_pseudo_queries_are_one_clear_error(demo_dirs, tmp_path):
    config = tiny_config("/tmp/unused", f"data.path={demo_dirs[0]}")
    data = load_data(config, demo_dirs[0])
    with pytest.raises(InputError, match=r"data.pseudo_queries: 100000 asked for, but only \d+ passages have a title"):
        add_pseudo_queries(data, "train", 100_000)
    with pytest.raises(InputError, match="data.pseudo_queries: must be >= 0, got -1"):
        load_config(None, ["data.pseudo_queries=-1"])
