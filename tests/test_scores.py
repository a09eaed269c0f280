"""The cached hybrid teacher (``scores`` stage), the dev split, and the stage hash's code digest."""

import json

import numpy as np
import pytest
import torch

import pipeline.plan as plan_module
from data.bm25 import BM25Config, BM25Index
from data.errors import InputError
from pipeline.batches import GroupBatch
from pipeline.plan import stage_plan
from pipeline.run import carve_dev, load_data, run
from pipeline.stages.distill import needs
from pipeline.stages.scores import fuse, read_teacher_scores, zscore
from tests.test_pipeline import stage_dir, tiny_config

CACHED = ["run.stages=scores,distill", "distill.teacher=scores", "distill.weights.ce=0", "distill.weights.attn=0"]


def test_bm25_pair_scores_equal_its_search_scores():
    index = BM25Index(["red apples", "green pears", "apple pie recipes", "pears and apples"],
                      BM25Config(stemmer="none", stopwords="none"))
    scores, indices = index.search(["pears apples"], k=4)
    pairs = index.score_pairs("pears apples", indices[0])
    np.testing.assert_allclose(pairs, scores[0], rtol=1e-6)


def test_fusion_is_a_weighted_sum_of_per_list_z_scores():
    bm25, dense = np.array([12.0, 3.0, 7.0]), np.array([0.2, 0.9, 0.5])
    fused = fuse({"bm25": bm25, "dual_encoder": dense, "cross_encoder": np.array([np.nan] * 3)},
                 {"bm25": 2.0, "dual_encoder": 1.0, "cross_encoder": 0.0})
    expected = 2 * (bm25 - bm25.mean()) / bm25.std() + (dense - dense.mean()) / dense.std()
    np.testing.assert_allclose(fused, expected)
    # Invariant to each component's scale and offset: BM25's unbounded scores cannot dominate.
    np.testing.assert_allclose(zscore(100 * bm25 + 5), zscore(bm25))


def test_dev_split_is_fixed_disjoint_and_leaves_training_queries(demo_dirs):
    config = tiny_config("/tmp/unused", f"data.path={demo_dirs[0]}")
    data = load_data(config, demo_dirs[0])
    carved = carve_dev(data, "train", 5)
    dev, train = set(carved.judged_queries("dev")), set(carved.judged_queries("train"))
    assert len(dev) == 5 and not dev & train and dev | train == set(data.judged_queries("train"))
    assert carve_dev(data, "train", 5).qrels["dev"] == carved.qrels["dev"]  # the same every time
    with pytest.raises(InputError, match="dev_queries"):
        carve_dev(data, "train", len(data.judged_queries("train")))


def test_a_cached_teacher_needs_no_cross_encoder_and_refuses_its_own_terms(tmp_path):
    weights = {t: 1.0 for t in ("ce", "col", "de", "kl_ce_col", "kl_col_de", "kl_ce_de", "attn", "dualreg")}
    assert needs(weights, "scores") == {"ce": False, "cached": True, "col": True}
    assert needs({**weights, "kl_ce_col": 0, "kl_ce_de": 0, "ce": 0, "attn": 0}, "scores")["cached"] is False
    plan = dict(stage_plan(tiny_config(tmp_path, *CACHED)))
    assert plan["distill"]["teacher_scores"] == "scores" and "cross_encoder" not in plan["distill"]
    with pytest.raises(InputError, match="distill.weights.attn: must be 0"):
        stage_plan(tiny_config(tmp_path, *CACHED, "distill.weights.attn=1"))
    with pytest.raises(InputError, match="'scores' stage must come before 'distill'"):
        stage_plan(tiny_config(tmp_path, "run.stages=distill", "distill.teacher=scores", "distill.weights.ce=0",
                               "distill.weights.attn=0"))


def test_the_scores_stage_writes_fused_scores_that_distill_reads(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, *CACHED, "data.dev_queries=4", "eval.split=dev", "scores.passage_max_len=40")
    seen = []
    original = GroupBatch.to

    def spy(batch, device):  # the teacher scores each step's KL term reads
        seen.append(batch.teacher_scores.clone())
        return original(batch, device)

    monkeypatch.setattr(GroupBatch, "to", spy)
    results = run(config)
    scores = read_teacher_scores(stage_dir(config, "scores") / "final" / "teacher_scores.jsonl")
    negatives = {json.loads(line)["query_id"]: json.loads(line)["negatives"]
                 for line in next((config.run_dir / "negatives").glob("bm25-*.jsonl")).read_text().splitlines()}
    assert set(scores) == set(negatives)  # every training query, none of the dev split
    qrels = load_data(config, stage_dir(config, "scores").parents[1] / "demo_assets" / "data").qrels["train"]
    for qid, row in scores.items():
        assert set(negatives[qid]) <= set(row)
        positives = [s for d, s in row.items() if qrels[qid].get(d, 0) > 0]
        best_negative = max(s for d, s in row.items() if qrels[qid].get(d, 0) <= 0)
        assert min(positives) >= best_negative + 1.0 - 1e-5  # label correction, positive_margin 1
    assert seen and all(b.shape[1] == 3 and torch.isfinite(b).all() for b in seen)
    label = next(iter(results["scores"]))
    assert label.startswith("teacher (bm25 1 + dual-encoder 1)") and "ndcg@10" in results["scores"][label]
    assert len(results["distill"]["dual-encoder"]["ndcg@10 per query"]) == 4  # the dev queries
    log = [json.loads(line) for line in (stage_dir(config, "distill") / "train_log.jsonl").read_text().splitlines()]
    assert "kl_ce_de" in log[0] and "ce" not in log[0] and "attn" not in log[0]


def test_a_code_change_retrains_instead_of_reusing(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, "run.stages=teacher", "teacher.train.max_steps=1")
    run(config)
    first = stage_dir(config, "teacher")
    monkeypatch.setattr(plan_module, "code_digest", lambda: "other code")
    run(config)
    assert first.exists() and len(list(config.run_dir.glob("teacher-*"))) == 2  # trained anew beside it


def test_seeds_share_the_deterministic_scores_stage_only(tmp_path):
    for seed in (1, 2):
        run(tiny_config(tmp_path, *CACHED, f"run.seed={seed}", "distill.train.max_steps=1"))
    config = tiny_config(tmp_path, *CACHED)
    assert len(list(config.run_dir.glob("scores-*"))) == 1 and len(list(config.run_dir.glob("distill-*"))) == 2


def test_a_teacher_with_its_own_seed_is_trained_once_for_every_run_seed(tmp_path):
    from safetensors.torch import load_file

    def heads(name):  # the classifier weights of each teacher stage of run ``name``
        folders = sorted(tiny_config(tmp_path, name=name).run_dir.glob("teacher-*"))
        return [load_file(f / "final" / "model.safetensors")["classifier.weight"] for f in folders]

    short = ("teacher.train.max_steps=2", "distill.train.max_steps=1")
    for seed in (1, 2):
        run(tiny_config(tmp_path, "run.stages=teacher,distill", *short, "teacher.seed=7", f"run.seed={seed}",
                        name="shared"))
    config = tiny_config(tmp_path, name="shared")
    (shared,) = heads("shared")
    assert len(list(config.run_dir.glob("distill-*"))) == 2
    # It trains with its own seed: the same weights as the teacher of run seed 7; run seeds 1 and 2
    # without a seed of its own train two different teachers.
    own = {}
    for seed in (1, 2, 7):
        run(tiny_config(tmp_path, "run.stages=teacher", *short, f"run.seed={seed}", name=f"own{seed}"))
        (own[seed],) = heads(f"own{seed}")
    assert torch.equal(own[7], shared) and not torch.equal(own[1], shared) and not torch.equal(own[1], own[2])


def test_a_teacher_weaker_than_the_student_is_reported(caplog):
    from pipeline.run import _warn_if_weaker

    student = {"ndcg@10": 0.62}
    with caplog.at_level("WARNING"):
        _warn_if_weaker("scores", {"teacher (bm25 1)": {"ndcg@10": 0.72}}, student, "dev")
        assert not caplog.records
        _warn_if_weaker("teacher", {"cross-encoder": {"ndcg@10": 0.46}}, student, "dev")
    assert "below the starting dual-encoder's (0.6200)" in caplog.records[0].getMessage()


def test_a_refresh_between_the_cached_teacher_and_its_reader_is_refused(tmp_path):
    with pytest.raises(InputError, match="same negatives"):
        stage_plan(tiny_config(tmp_path, "run.stages=scores,refresh,distill", *CACHED[1:]))
    assert "teacher_scores" in dict(stage_plan(tiny_config(tmp_path, "run.stages=refresh,scores,distill", *CACHED[1:])))["distill"]
    with pytest.raises(InputError, match="every component weight"):
        tiny_config(tmp_path, *CACHED, "scores.bm25=0", "scores.dual_encoder=0")


WARMED = ["run.stages=warmup,scores,distill", "warmup.weights.ce=0", "warmup.weights.kl_ce_de=0",
          "warmup.weights.dualreg=0", "warmup.train.max_steps=3", "warmup.train.lr=1e-3", "scores.bm25=0",
          "scores.dual_encoder=0", "scores.trained_dual_encoder=1", "scores.label_correction=false",
          *CACHED[1:], "distill.train.max_steps=1"]


def test_the_teacher_can_fuse_the_dual_encoder_an_earlier_stage_trained(tmp_path):
    from data.collate import SpecialTokens, tokenize
    from models.dual_encoder import DualEncoder
    from pipeline.evaluate import encode
    from transformers import AutoTokenizer

    with pytest.raises(InputError, match="'warmup' or 'distill' stage must come before 'scores'"):
        stage_plan(tiny_config(tmp_path, *CACHED, "scores.trained_dual_encoder=1"))
    config = tiny_config(tmp_path, *WARMED)
    plan = dict(stage_plan(config))
    assert plan["scores"]["dual_encoder"] == "warmup" and plan["distill"]["dual_encoder"] == "warmup"
    results = run(config)
    assert next(iter(results["scores"])).startswith("teacher (trained-dual-encoder 1)")
    scores = read_teacher_scores(stage_dir(config, "scores") / "final" / "teacher_scores.jsonl")

    # The written scores are the z-scored dot products of the warmup's model, not the starting encoder's.
    folder = stage_dir(config, "warmup") / "final" / "dual_encoder"
    model, tokenizer = DualEncoder.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    data = load_data(config, config.run_dir.parent / "demo_assets" / "data")
    row = {d: i for i, d in enumerate(data.corpus["_id"])}
    texts, special = data.passage_texts(), SpecialTokens.from_tokenizer(tokenizer)
    for qid in list(scores)[:3]:
        docs = list(scores[qid])
        q = encode(model.encode_queries, tokenize(tokenizer, data.query_texts([qid]), config.eval.query_max_len),
                   special, 8)
        p = encode(model.encode_passages, tokenize(tokenizer, [texts[row[d]] for d in docs],
                                                   config.eval.passage_max_len), special, 8)
        np.testing.assert_allclose([scores[qid][d] for d in docs], zscore(p @ q[0]), atol=2e-4)

    # A warmup trained with another seed is another teacher: the scores stage is not shared.
    run(tiny_config(tmp_path, *WARMED, "run.seed=2"))
    assert len(list(config.run_dir.glob("scores-*"))) == 2


CROSS_FIT = ["run.stages=scores,distill", "scores.bm25=0", "scores.dual_encoder=0", "scores.cross_fitted_dual_encoder=1",
             "scores.label_correction=false", "scores.cross_fit.train.max_steps=2", "scores.cross_fit.train.lr=1e-3",
             "scores.cross_fit.batch_size=4", *CACHED[1:], "distill.train.max_steps=1"]


def test_a_cross_fitted_teacher_scores_each_training_query_with_the_model_that_never_saw_it(tmp_path, monkeypatch):
    import pipeline.stages.scores as scores_module
    from data.collate import SpecialTokens, tokenize
    from models.dual_encoder import DualEncoder
    from pipeline.evaluate import encode
    from pipeline.stages.scores import fold_of
    from transformers import AutoTokenizer

    config = tiny_config(tmp_path, *CROSS_FIT)
    assert "dual_encoder" not in dict(stage_plan(config))["scores"]  # no earlier stage needed
    trained_on, real = [], scores_module.run_distill
    monkeypatch.setattr(scores_module, "run_distill",
                        lambda ctx, stage: (trained_on.append(set(ctx.data.qrels["train"])), real(ctx, stage))[1])
    results = run(config)
    labels = list(results["scores"])
    assert labels[0].startswith("teacher (cross-fitted-dual-encoder 1)")
    assert [label.split(" (")[0] for label in labels[1:]] == ["cross-fitted dual-encoder 0", "cross-fitted dual-encoder 1"]
    scores = read_teacher_scores(stage_dir(config, "scores") / "final" / "teacher_scores.jsonl")
    data = load_data(config, config.run_dir.parent / "demo_assets" / "data")
    row = {d: i for i, d in enumerate(data.corpus["_id"])}
    texts = data.passage_texts()
    folders = [stage_dir(config, "scores") / f"fold-{k}" / "final" / "dual_encoder" for k in (0, 1)]
    models = [DualEncoder.from_pretrained(folder).eval() for folder in folders]
    tokenizer = AutoTokenizer.from_pretrained(folders[0])
    special = SpecialTokens.from_tokenizer(tokenizer)

    def zscored(model, qid, docs):
        q = encode(model.encode_queries, tokenize(tokenizer, data.query_texts([qid]), config.eval.query_max_len),
                   special, 8)
        p = encode(model.encode_passages, tokenize(tokenizer, [texts[row[d]] for d in docs],
                                                   config.eval.passage_max_len), special, 8)
        return zscore(p @ q[0])

    seen = {0: 0, 1: 0}
    for qid in sorted(scores):
        k = fold_of(qid, 2)
        if seen[k] == 2:
            continue
        seen[k] += 1
        docs = list(scores[qid])
        own, other = zscored(models[k], qid, docs), zscored(models[1 - k], qid, docs)
        np.testing.assert_allclose([scores[qid][d] for d in docs], own, atol=2e-4)
        assert not np.allclose(own, other, atol=1e-3)  # the other fold's model would score it differently
    assert seen == {0: 2, 1: 2}
    # Model k trained on exactly the training queries outside fold k.
    assert [{fold_of(q, 2) for q in queries} for queries in trained_on] == [{1}, {0}]
    assert trained_on[0] | trained_on[1] == set(scores)

    # Shared by every seed: another run seed reads the same scores stage back.
    run(tiny_config(tmp_path, *CROSS_FIT, "run.seed=2"))
    assert len(list(config.run_dir.glob("scores-*"))) == 1
