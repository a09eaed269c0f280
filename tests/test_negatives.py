"""BM25 search, hard-negative mining and deterministic training groups."""

import numpy as np
import pytest

from data.bm25 import BM25Config, BM25Index
from data.groups import TrainGroups
from data.negatives import negatives_from_ranking
from pipeline.evaluate import bm25_search
from data.beir import load_beir

PLAIN = BM25Config(stemmer="none", stopwords="none")


def test_bm25_ranks_the_matching_passage_first():
    index = BM25Index(["the cat sat", "dogs bark loudly", "cats and dogs"], PLAIN)
    scores, indices = index.search(["bark", "sat cat"], k=3)
    assert indices[:, 0].tolist() == [1, 0]
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_chunked_search_equals_one_chunk(demo_dirs):
    data = load_beir(demo_dirs[0], ("train",))
    queries = data.query_texts(data.judged_queries("train"))
    whole = BM25Index(data.passage_texts(), BM25Config(chunk_size=10_000)).search(queries, k=20)
    chunked = BM25Index(data.passage_texts(), BM25Config(chunk_size=7)).search(queries, k=20)
    np.testing.assert_array_equal(whole[1], chunked[1])
    np.testing.assert_allclose(whole[0], chunked[0])


def test_mined_negatives_never_contain_a_positive(demo_dirs):
    data = load_beir(demo_dirs[0], ("train",))
    qids = data.judged_queries("train")
    ranking = bm25_search(BM25Index(data.passage_texts()), data, qids, top_k=30)
    negatives = negatives_from_ranking(ranking, data.qrels["train"], depth=10)
    positives_retrieved = 0
    for qid in qids:
        positives = set(data.qrels["train"][qid])
        assert not positives.intersection(negatives[qid])
        assert len(negatives[qid]) == 10
        positives_retrieved += bool(positives.intersection(ranking[qid][:11]))
    assert positives_retrieved > 0  # the check above is not vacuous


def test_threaded_search_equals_one_thread(demo_dirs):
    data = load_beir(demo_dirs[0], ("train",))
    queries = data.query_texts(data.judged_queries("train"))
    one = BM25Index(data.passage_texts(), BM25Config(chunk_size=25)).search(queries, k=20)
    threaded = BM25Index(data.passage_texts(), BM25Config(chunk_size=25), threads=3).search(queries, k=20)
    np.testing.assert_array_equal(one[1], threaded[1])
    np.testing.assert_array_equal(one[0], threaded[0])


def test_a_second_run_loads_the_saved_bm25_index_instead_of_rebuilding_it(tmp_path, demo_dirs, monkeypatch):
    import bm25s

    from data.negatives import mine_negatives
    from pipeline.config import load_config
    from pipeline.run import load_data, prepare_bm25

    builds = []
    build = bm25s.BM25.index

    def counted_build(self, *a, **kw):
        builds.append(1)
        return build(self, *a, **kw)

    monkeypatch.setattr(bm25s.BM25, "index", counted_build)
    data_dir = demo_dirs[0]
    config = load_config(None, [f"data.path={data_dir}", f"run.output_dir={tmp_path}", "eval.top_k=50",
                                "eval.rerank_depth=50"])
    data = load_data(config, data_dir)
    first = prepare_bm25(config, data, data_dir)
    assert len(builds) == 1 and (first.index_dir / BM25Index.SETTINGS).is_file()
    (negatives_file,) = (config.run_dir / "negatives").glob("bm25-*.jsonl")
    negatives_file.unlink()  # mined again by the second run, from the index it loads
    second = prepare_bm25(config, data, data_dir)
    assert len(builds) == 1 and negatives_file.is_file()
    assert second == first

    # What the saved index gives is what an index built in memory gives.
    built = BM25Index(data.passage_texts(), config.negatives.bm25)
    train = data.judged_queries("train")
    search = lambda qids, k: bm25_search(built, data, qids, k)  # noqa: E731
    assert first.negatives == mine_negatives(data.qrels["train"], train, search, config.negatives.depth)
    assert first.ranking == bm25_search(built, data, data.judged_queries("test"), 50)
    assert len(builds) == 2

    # Other BM25 settings are another index; the saved one refuses them.
    other = load_config(None, [f"data.path={data_dir}", f"run.output_dir={tmp_path}", "eval.top_k=50",
                               "eval.rerank_depth=50", "negatives.bm25.k1=1.2"])
    assert prepare_bm25(other, data, data_dir).index_dir != first.index_dir and len(builds) == 3
    with pytest.raises(ValueError, match="was built with"):
        BM25Index.load(first.index_dir, other.negatives.bm25)


def _groups(seed=0, negatives=None, group_size=4):
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 1, "z": 0}, "q3": {"d": 0}}
    negatives = negatives or {"q1": ["c", "d", "e", "f"], "q2": ["a", "b"]}
    return TrainGroups(qrels, negatives, list("abcdefghz"), group_size=group_size, seed=seed)


def test_groups_are_deterministic_and_depend_on_seed_epoch_index():
    groups = _groups()
    assert groups.query_ids == ["q1", "q2"]  # q3 has no relevant document
    assert groups.epoch_groups(0) == _groups().epoch_groups(0)
    epochs = {tuple(g.passage_ids for g in groups.epoch_groups(e)) for e in range(8)}
    seeds = {tuple(g.passage_ids for g in _groups(seed=s).epoch_groups(0)) for s in range(8)}
    assert len(epochs) > 1 and len(seeds) > 1


def test_group_layout_positive_first_then_distinct_negatives():
    groups = _groups()
    for epoch in range(20):
        for index in range(len(groups)):
            g = groups.group(epoch, index)
            positives = set(groups.positives[g.query_id])
            assert g.passage_ids[0] in positives
            assert len(set(g.passage_ids)) == groups.group_size
            assert not positives.intersection(g.passage_ids[1:])
    q2 = [groups.group(e, 1) for e in range(20)]
    # q2 has two mined negatives; the third comes from the corpus, never its positive.
    assert all({"a", "b"} <= set(g.passage_ids[1:]) for g in q2)
    assert len({g.passage_ids[3] for g in q2}) > 1


def test_group_does_not_depend_on_iteration_history():
    fresh, used = _groups(), _groups()
    used.epoch_groups(0), used.epoch_groups(1)
    assert used.group(3, 1) == fresh.group(3, 1)


def test_group_size_larger_than_corpus_is_an_error():
    with pytest.raises(ValueError, match="corpus too small"):
        _groups(group_size=12).group(0, 0)
