"""``run_pipeline.py evaluate``: a saved model scored on a dataset without training, and its model cards."""

import json
import shutil

import pytest

import run_pipeline
from pipeline.config import load_config
from pipeline.run import run

FAST = ["run.stages=teacher,distill", "eval.top_k=100", "eval.passage_max_len=48",
        "teacher.train.max_steps=2", "teacher.batch_size=4", "teacher.group_size=3",
        "distill.train.max_steps=2", "distill.batch_size=4", "distill.group_size=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dirs):
    """(config, overrides, data dir) of a finished teacher + distill run on the small demo."""
    data, model = demo_dirs
    overrides = [f"run.output_dir={tmp_path_factory.mktemp('evaluate') / 'runs'}", f"data.path={data}",
                 f"model.name_or_path={model}", *FAST]
    config = load_config(None, overrides)
    run(config)
    return config, overrides, data


def stage_dir(config, name):
    (found,) = config.run_dir.glob(f"{name}-*")
    return found


def evaluate(capsys, *argv):
    code = run_pipeline.main(["evaluate", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_evaluate_scores_a_saved_stage_as_the_stage_did(trained, tmp_path, capsys):
    config, overrides, data = trained
    distill = stage_dir(config, "distill")
    output = tmp_path / "eval.json"
    out = evaluate(capsys, str(distill), "--data", str(data), "--rerank", str(distill / "final" / "colbert"),
                   "--rerank", str(distill / "final" / "cross_encoder"), "--output", str(output), *overrides)
    record = json.loads(output.read_text())
    stage_metrics = json.loads((distill / "eval" / "metrics.json").read_text())
    assert set(record["metrics"]) == set(stage_metrics) == {
        "dual-encoder", "colbert (re-rank DE top 100)", "cross-encoder (re-rank DE top 100)"}
    assert record["metrics"] == stage_metrics  # every metric and every query's nDCG@10
    assert record["kind"] == "dual-encoder of this project" and record["split"] == "test"
    assert "| dual-encoder |" in out and "| cross-encoder (re-rank DE top 100) |" in out


def test_a_sentence_transformers_folder_is_evaluated_with_its_own_pooling(trained, tmp_path, capsys):
    config, overrides, data = trained
    folder = tmp_path / "st"
    shutil.copytree(stage_dir(config, "distill") / "final" / "dual_encoder", folder)
    (folder / "dual_encoder.json").unlink()  # what is left is a plain sentence-transformers folder
    evaluate(capsys, str(folder), "--data", str(data), "--output", str(tmp_path / "st.json"), *overrides,
             "model.pooling=cls", "model.normalize=false")  # ignored: the folder's modules say mean + Normalize
    record = json.loads((tmp_path / "st.json").read_text())
    stage_metrics = json.loads((stage_dir(config, "distill") / "eval" / "metrics.json").read_text())
    assert record["kind"] == "sentence-transformers model" and (record["pooling"], record["normalize"]) == ("mean", True)
    assert record["metrics"]["dual-encoder"] == stage_metrics["dual-encoder"]


@pytest.mark.parametrize("model, data, expected", [
    ("/nonexistent/model", None, "error: /nonexistent/model: model not found"),
    (None, "/nonexistent/beir", "error: /nonexistent/beir: data directory not found"),
])
def test_bad_paths_are_one_line_with_status_2(trained, model, data, expected, capsys):
    config, overrides, data_dir = trained
    model = model or str(stage_dir(config, "distill"))
    assert run_pipeline.main(["evaluate", model, "--data", data or str(data_dir), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(expected) and len(err.splitlines()) == 1


def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_saved_models_carry_model_cards_that_name_their_metrics(trained):
    config, _, _ = trained
    distill, teacher = stage_dir(config, "distill"), stage_dir(config, "teacher")
    metrics = json.loads((distill / "eval" / "metrics.json").read_text())

    card = (distill / "final" / "dual_encoder" / "README.md").read_text()
    meta = front_matter(card)
    assert (meta["library_name"], meta["pipeline_tag"]) == ("sentence-transformers", "sentence-similarity")
    assert "sentence-transformers" in meta["tags"]
    reported = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert reported == {k: round(metrics["dual-encoder"][k], 4) for k in ("mrr@10", "ndcg@10", "recall@10", "recall@100",
                                                                          "recall@1000")}
    assert f"| distill / dual-encoder (this model) | **{metrics['dual-encoder']['ndcg@10']:.4f}**" in card
    for text in ("nDCG@10", "SentenceTransformer(", "DualEncoder.from_pretrained", "| teacher |", "kl_ce_de 1",
                 "Output Dimensionality:** 32 dimensions", "### Framework Versions"):
        assert text in card, text

    for folder, row in ((distill / "final" / "cross_encoder", "cross-encoder (re-rank DE top 100)"),
                        (teacher / "final", "cross-encoder (re-rank BM25 top 100)")):
        card = (folder / "README.md").read_text()
        assert front_matter(card)["pipeline_tag"] == "text-ranking"
        assert "(this model) | **" in card and row in card and "CrossEncoder(" in card

    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(distill / "final" / "dual_encoder")).get_embedding_dimension() == 32
