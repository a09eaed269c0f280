import re

import pytest

from data.errors import InputError
from pipeline.config import PipelineConfig, config_yaml, field_rows, fields_markdown, load_config, save_config, to_dict


def test_defaults_yaml_and_overrides_compose(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: from_file\neval:\n  batch_size: 8\n  index:\n    kind: ivf\n")
    config = load_config(path, ["eval.batch_size=16", "negatives.bm25.k1=1"])
    assert config.run.name == "from_file"
    assert config.eval.batch_size == 16
    assert config.eval.index.kind == "ivf"
    assert config.negatives.bm25.k1 == 1.0 and isinstance(config.negatives.bm25.k1, float)
    assert config.eval.query_max_len == PipelineConfig().eval.query_max_len


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(None, ["run.name=x", "model.pooling=cls"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert set(to_dict(config)) == {"run", "data", "model", "negatives", "eval", "posttrain", "teacher", "scores", "warmup",
                                    "refresh", "distill", "demo"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["run.nmae=x"], "unknown key 'run.nmae'"),
        (["nope.x=1"], "unknown key 'nope'"),
        (["eval.batch_size=many"], "eval.batch_size: expected int, got str"),
        (["model.normalize=3"], "model.normalize: expected bool, got int"),
        (["eval.top_k=true"], "eval.top_k: expected int, got bool"),
        (["model.pooling=max"], "model.pooling: expected one of mean, cls"),
        (["eval.index.kind=lsh"], "eval.index.kind: expected one of flat, hnsw, ivf"),
        (["eval.batch_size=0"], "eval.batch_size: must be >= 1"),
        (["teacher.group_size=1"], "teacher.group_size: must be >= 2, got 1"),
        (["posttrain.mlm_probability=1.5"], "posttrain.mlm_probability: must be > 0 and <= 1, got 1.5"),
        (["run.stages=teacher,teacher"], "run.stages: stage 'teacher' is listed twice"),
        (["eval.split=train"], "eval.split: 'train' is also data.train_split"),
        (["eval=3"], "eval: expected a mapping"),
        (["run.name"], "expected key.sub=value"),
        (["distill.train.lr=fast"], "distill.train.lr: expected float, got str"),
    ],
)
def test_bad_config_is_one_clear_error(overrides, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        load_config(None, overrides)


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  name: [unclosed\n")
    with pytest.raises(InputError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(InputError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_demo_config_file_shows_every_default_field_with_what_it_accepts():
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert load_config(path) == PipelineConfig()
    assert yaml.safe_load(path.read_text()) == to_dict(PipelineConfig())
    text = path.read_text()
    header = "\n".join(line[2:] for line in text.splitlines() if line.startswith("# "))
    assert text == config_yaml(header=header), "regenerate configs/demo.yaml with pipeline.config.config_yaml"
    assert re.search(r"\n  batch_size: 16 +# >= 1; groups; at most the judged training queries\n", text)


def test_help_and_the_readme_list_every_field_as_declared():
    from pathlib import Path

    import run_pipeline

    rows = field_rows()
    assert len(rows) == len(to_dict_leaves(to_dict(PipelineConfig())))
    assert ("distill.train.lr", "float", "> 0", "0.0005") in rows
    assert ("run.mixed_precision", "str", "one of no, fp16, bf16", "'no'") in rows
    help_text = run_pipeline.build_parser().format_help()
    assert all(key in help_text for key, *_ in rows)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert fields_markdown() in readme, "regenerate the README's table with pipeline.config.fields_markdown"


def to_dict_leaves(tree, prefix=""):
    return [leaf for key, value in tree.items()
            for leaf in (to_dict_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key])]


def test_exponent_without_a_dot_is_a_float(tmp_path):
    """PyYAML reads ``5e-5`` as a string (YAML 1.1); a float field takes it as the number it means."""
    assert load_config(None, ["teacher.train.lr=5e-5"]).teacher.train.lr == 5e-5
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  train:\n    lr: 3E-5\n")
    assert load_config(path).distill.train.lr == 3e-5


def test_the_recommended_recipe_plans_warmup_dense_negatives_a_cached_lexical_teacher_then_distill():
    from pathlib import Path

    from pipeline.plan import stage_plan

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "recommended.yaml")
    plan = dict(stage_plan(config))
    # The warmup's dual-encoder mines the negatives; the teacher is BM25 on those lists;
    # distill continues the warmup's dual-encoder on the same lists.
    assert plan["refresh"] == {"dual_encoder": "warmup"}
    assert plan["scores"] == {"negatives": "refresh"}
    assert plan["distill"] == {"dual_encoder": "warmup", "negatives": "refresh", "teacher_scores": "scores"}
    assert {k for k, v in vars(config.warmup.weights).items() if v} == {"de"}
    assert config.scores.bm25 and not (config.scores.trained_dual_encoder or config.scores.dual_encoder)
    active = {k for k, v in vars(config.distill.weights).items() if v}
    assert active == {"de", "kl_ce_de"} and config.scores.label_correction


def test_no_text_file_holds_a_merge_conflict_marker():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.yaml", "*.txt", "*.toml", "Makefile"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.split()
    assert tracked
    marked = [name for name in tracked if re.search(r"^(<{7} |>{7} |={7}$)", (root / name).read_text(), re.M)]
    assert not marked, f"merge conflict markers in {marked}"
