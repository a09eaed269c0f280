"""Table of bad inputs through the command line: each is one line naming what is wrong and where,
exit status 2, no traceback, and nothing marked done. Then the inputs a table cannot hold: two runs
on one folder, Ctrl-C, unexpected errors, silent reuse."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import run_pipeline
from tests.conftest import ROOT
from tests.test_beir import CORPUS, QUERIES, write_beir

QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n"
FAST = ["posttrain.train.epochs=1", "eval.passage_max_len=32"]

# Valid data for the cases where the data is not what is wrong: 10 passages, 6 training queries, 2
# test queries, in the demo tokenizer's letters.
WORDS = "bado kemi lupa nora sive tako fumi gelo rasu pine mavo dule zeka bire".split()
GOOD_CORPUS = [{"_id": f"d{i}", "title": WORDS[i], "text": f"{WORDS[i + 1]} {WORDS[i + 2]} {WORDS[i + 3]}"}
               for i in range(1, 11)]
GOOD_QUERIES = [{"_id": f"q{i}", "text": f"{WORDS[i]} {WORDS[i + 2]}"} for i in range(1, 9)]
GOOD_TRAIN = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(1, 7))
GOOD_TEST = "query-id\tcorpus-id\tscore\nq7\td7\t1\nq8\td8\t1\n"
SMALL = ["posttrain.batch_size=4", "teacher.batch_size=2", "teacher.group_size=2", "distill.batch_size=2",
         "distill.group_size=2", "eval.top_k=10", "eval.rerank_depth=5"]


def data(**kwargs):
    def make(tmp, model):
        root = write_beir(tmp / "beir", qrels=kwargs.pop("qrels", QRELS), **kwargs)
        (root / "qrels" / "train.tsv").write_text(QRELS)
        return [f"data.path={root}"]

    return make


def mutate(fn, **kwargs):
    def make(tmp, model):
        args = data(**kwargs)(tmp, model)
        fn(tmp / "beir")
        return args

    return make


def write_good(root, corpus=None, queries=None, train=GOOD_TRAIN, test=GOOD_TEST):
    write_beir(root, corpus=corpus or GOOD_CORPUS, queries=queries or GOOD_QUERIES, qrels=test)
    (root / "qrels" / "train.tsv").write_text(train)
    return root


def good(*overrides, edit=None, **files):
    """Valid data and sizes, with ``overrides`` (and ``edit`` of the data folder) making the case."""
    def make(tmp, model):
        root = write_good(tmp / "beir", **files)
        if edit:
            edit(root)
        return [f"data.path={root}", *SMALL, *overrides]

    return make


def plain(*args):
    return lambda tmp, model: list(args)


def config_file(text: str, *overrides):
    def make(tmp, model):
        (tmp / "c.yaml").write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        return ["--config", str(tmp / "c.yaml"), *overrides]

    return make


def variants_file(text: str, *args):
    def make(tmp, model):
        (tmp / "v.yaml").write_text(text)
        return good("--variants", str(tmp / "v.yaml"), *args)(tmp, model)

    return make


def model_with(edit, *args):
    def make(tmp, model_dir):
        copy = tmp / "model"
        shutil.copytree(model_dir, copy)
        edit(copy)
        return [*good(*args)(tmp, model_dir), f"model.name_or_path={copy}"]

    return make


def edit_json(name, **changes):
    def edit(folder):
        values = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**values, **changes}))

    return edit


def remove(*names):
    return lambda folder: [(folder / name).unlink() for name in names]


def truncate(name):
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:1000])


def qrels_line(split, line):
    return lambda root: (root / "qrels" / f"{split}.tsv").write_text((root / "qrels" / f"{split}.tsv").read_text() + line)


def record(name, row):
    """A data folder whose first record of ``name`` (corpus or queries) is ``row``."""
    def edit(root):
        lines = (root / f"{name}.jsonl").read_text().splitlines()
        (root / f"{name}.jsonl").write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")

    return edit


ZERO_WIDTH, NUL = "\u200b\u200c\ufeff", "\x00\x00"
OFF_ALL = [f"distill.weights.{t}=0" for t in ("ce", "col", "de", "kl_ce_col", "kl_col_de", "kl_ce_de", "attn", "dualreg")]

CASES = {
    # data files
    "missing corpus": (mutate(lambda r: (r / "corpus.jsonl").unlink()), "corpus.jsonl: missing file"),
    "invalid json": (data(corpus_text='{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": \n'), "corpus.jsonl:2: invalid JSON"),
    "not an object": (data(queries_text='["q1"]\n'), "queries.jsonl:1: expected a JSON object"),
    "missing _id": (data(corpus=[{"text": "x"}]), "corpus.jsonl:1: missing field '_id'"),
    "missing text": (data(queries=[{"_id": "q1"}]), "queries.jsonl:1: missing field 'text'"),
    "duplicate id": (data(corpus=CORPUS + [{"_id": "d2", "text": "again"}]), "corpus.jsonl:4: duplicate id 'd2'"),
    "empty corpus": (data(corpus_text=""), "corpus.jsonl: no records"),
    "empty query text": (data(queries=[QUERIES[0], {"_id": "q2", "text": " "}]), "queries.jsonl:2: empty text"),
    "not utf-8": (mutate(lambda r: (r / "queries.jsonl").write_bytes(b'{"_id": "q1", "text": "\xff"}\n')), "queries.jsonl: not UTF-8"),
    "qrels header missing": (data(qrels="q1\td1\t1\n"), "test.tsv:1: expected the header"),
    "qrels column count": (data(qrels="query-id\tcorpus-id\tscore\nq1\td1\n"), "test.tsv:2: expected 3 tab-separated columns"),
    "qrels score": (data(qrels="query-id\tcorpus-id\tscore\nq1\td1\tx\n"), "test.tsv:2: score must be an integer"),
    "qrels unknown query": (data(qrels="query-id\tcorpus-id\tscore\nq9\td1\t1\n"), "test.tsv:2: query id 'q9' is not in queries"),
    "qrels unknown document": (data(qrels="query-id\tcorpus-id\tscore\nq1\td9\t1\n"), "test.tsv:2: corpus id 'd9' is not in the corpus"),
    "empty split after filtering": (mutate(lambda r: (r / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t0\n")), "train.tsv: no judged queries"),
    "missing data directory": (plain("data.path=/nonexistent/beir"), "/nonexistent/beir: data directory not found"),
    # data semantics
    "qrels pair judged twice with other scores": (good(edit=qrels_line("train", "q1\td1\t2\n")),
                                                   "train.tsv:8: query 'q1' and document 'd1' are judged again with another score (2; line 2 gave 1)"),
    "qrels pair unjudged by a later row": (good(edit=qrels_line("test", "q7\td7\t0\nq8\td8\t0\n")),
                                           "test.tsv:4: query 'q7' and document 'd7' are judged again"),
    "zero-width text": (good(edit=record("corpus", {"_id": "d1", "title": ZERO_WIDTH, "text": ZERO_WIDTH})),
                        "corpus.jsonl:1: empty text for id 'd1' (no character but whitespace, control or zero-width"),
    "NUL text": (good(edit=record("queries", {"_id": "q1", "text": NUL})), "queries.jsonl:1: empty text for id 'q1'"),
    "zero-width id": (good(edit=record("corpus", {"_id": ZERO_WIDTH, "text": "bado"})), "corpus.jsonl:1: empty '_id'"),
    "id equal to another once stripped": (good(edit=record("corpus", {"_id": " d2 ", "text": "bado"})),
                                          "corpus.jsonl:2: duplicate id 'd2'"),
    "evaluated on the training split": (good("eval.split=train"), "eval.split: 'train' is also data.train_split"),
    "queries trained and evaluated on": (good(test="query-id\tcorpus-id\tscore\nq1\td1\t1\n"),
                                         "eval.split: 1 of its queries are also judged in the training split 'train' (first: 'q1')"),
    "text the tokenizer cannot read": (good(corpus=[{**r, "title": "", "text": "дом"} for r in GOOD_CORPUS],
                                            queries=[{**r, "text": "кот"} for r in GOOD_QUERIES]),
                                       "the tokenizer maps every word of the first 18 passages and queries to [UNK]"),
    # configuration values
    "unknown key": (plain("eval.batchsize=3"), "unknown key 'eval.batchsize'"),
    "wrong type": (plain("eval.batch_size=many"), "eval.batch_size: expected int, got str"),
    "bool for int": (plain("eval.top_k=true"), "eval.top_k: expected int, got bool"),
    "unknown pooling": (plain("model.pooling=max"), "model.pooling: expected one of mean, cls"),
    "unknown stage": (plain("run.stages=posttrain,finetune"), "run.stages: unknown stage 'finetune'"),
    "zero batch size": (plain("eval.batch_size=0"), "eval.batch_size: must be >= 1"),
    "malformed override": (plain("run.name"), "expected key.sub=value"),
    "distill without teacher": (plain("run.stages=posttrain,distill"), "a 'teacher' stage must come before 'distill'"),
    "missing config file": (plain("--config", "/nonexistent.yaml"), "/nonexistent.yaml: cannot read config"),
    "unknown ablation term": (plain("--ablate", "attention"), "--ablate: unknown term 'attention'"),
    "stage not in the run": (plain("--stages", "warmup"), "--stages: 'warmup' is not in run.stages"),
    "zero training batch": (plain("posttrain.batch_size=0"), "posttrain.batch_size: must be >= 1, got 0"),
    "zero accumulation": (plain("teacher.train.grad_accum=0"), "teacher.train.grad_accum: must be >= 1, got 0"),
    "negative learning rate": (plain("distill.train.lr=-1"), "distill.train.lr: must be > 0, got -1.0"),
    "zero epochs": (plain("posttrain.train.epochs=0"), "posttrain.train.epochs: must be >= 1, got 0"),
    "group of one": (plain("teacher.group_size=1"), "teacher.group_size: must be >= 2, got 1"),
    "probability above 1": (plain("posttrain.mlm_probability=1.5"), "posttrain.mlm_probability: must be > 0 and <= 1, got 1.5"),
    "demo probability above 1": (plain("demo.synonym_rate=1.5"), "demo.synonym_rate: must be >= 0 and <= 1, got 1.5"),
    "warmup ratio of 1": (plain("distill.train.warmup_ratio=1"), "distill.train.warmup_ratio: must be >= 0 and < 1"),
    "not a number": (plain("distill.tau_de=.nan"), "distill.tau_de: must be a finite number, got nan"),
    "infinite temperature": (plain("teacher.tau=.inf"), "teacher.tau: must be a finite number, got inf"),
    "negative weight": (plain("distill.weights.attn=-0.5"), "distill.weights.attn: must be >= 0, got -0.5"),
    "negative seed": (plain("run.seed=-1"), "run.seed: must be >= 0 and <= 2147483647, got -1"),
    "unknown stemmer": (plain("negatives.bm25.stemmer=klingon"), "negatives.bm25.stemmer: expected one of arabic,"),
    "unknown stopword list": (plain("negatives.bm25.stopwords=klingon"), "negatives.bm25.stopwords: expected one of en,"),
    "unknown precision": (plain("run.mixed_precision=fp8"), "run.mixed_precision: expected one of no, fp16, bf16, got 'fp8'"),
    "yes where a word is expected": (plain("run.mixed_precision=yes"), "run.mixed_precision: expected str, got bool True"),
    "run name with a slash": (plain("run.name=a/b"), "run.name: expected a name: letters, digits"),
    "split name with dots": (plain("data.train_split=../x"), "data.train_split: expected a name"),
    "empty data path": (plain("data.path="), "data.path: must not be empty"),
    "override below a value": (plain("run.name.x=1"), "override 'run.name.x': 'run.name' is not a section"),
    "unparsable override value": (plain("run.name=["), "override 'run.name=[': invalid YAML value"),
    "no stage": (plain("run.stages="), "run.stages: no stage given"),
    "re-ranking deeper than retrieved": (plain("eval.top_k=50"), "eval.rerank_depth: 100 is more than eval.top_k (50)"),
    "stage twice": (plain("run.stages=posttrain,posttrain"), "run.stages: stage 'posttrain' is listed twice"),
    "every distill term off": (plain(*OFF_ALL), "distill.weights: every term is 0, so the stage would not train"),
    "every posttrain term off": (plain("posttrain.mlm=0", "posttrain.mirror=0"), "posttrain: every loss weight (mlm, simcse, mirror) is 0"),
    "distill group of one": (plain("distill.group_size=1"), "distill.group_size: 1 leaves no negative in a group"),
    "demo heads do not divide": (plain("demo.num_heads=3"), "demo.hidden_size: 64 must be a multiple of demo.num_heads (3)"),
    "cached teacher without scores": (plain("distill.teacher=scores", "distill.weights.ce=0", "distill.weights.attn=0"),
                                      "a 'scores' stage must come before 'distill'"),
    "config file is a list": (config_file("- run\n- data\n"), "c.yaml: expected a mapping of sections"),
    "config file is a list, with overrides": (config_file("- run\n", "run.name=x"), "c.yaml: expected a mapping of sections"),
    "config section is a list, with overrides": (config_file("run: [1]\n", "run.name=x"), "c.yaml: run: expected a mapping"),
    "config file not utf-8": (config_file(b"run:\n  name: \xff\n"), "c.yaml: not UTF-8 text"),
    "config file with yes": (config_file("run:\n  mixed_precision: yes\n"), "c.yaml: run.mixed_precision: expected str"),
    "unknown flag": (plain("--no-such-flag"), "unrecognized arguments: --no-such-flag (see run_pipeline.py --help)"),
    # sizes against the data (6 training queries, 10 passages)
    "batch above the training queries": (good("teacher.batch_size=7"), "teacher.batch_size: 7 is more than the 6 judged queries"),
    "batch above the passages": (good("posttrain.batch_size=11"), "posttrain.batch_size: 11 is more than the 10 passages"),
    "accumulation above the batches": (good("distill.train.epochs=1", "distill.train.grad_accum=4"),
                                       "distill.train.grad_accum: 4 batches per optimizer step, but 1 epoch(s) of 3 batches"),
    "group above the corpus": (good("distill.group_size=11"), "distill.group_size: 11 needs 10 negatives per query"),
    "attention layer beyond the teacher": (good("distill.attn_layer=2"), "distill.attn_layer: 2 is not a layer of the cross-encoder, which has 2"),
    "more index lists than passages": (good("eval.index.kind=ivf", "eval.index.ivf_nlist=50"), "eval.index.ivf_nlist: 50 lists"),
    "teacher passages above the model maximum": (good("run.stages=scores,distill", "distill.teacher=scores", "distill.weights.ce=0",
                                                      "distill.weights.attn=0", "scores.passage_max_len=200"),
                                                 "eval.query_max_len + scores.passage_max_len + 3 = 235 exceeds"),
    "--stages before its inputs finished": (good("--stages", "teacher"), "--stages: 'posttrain' has not finished with this config"),
    # models
    "model path missing": (plain("model.name_or_path=/nonexistent/model"), "/nonexistent/model: model not found"),
    "hub model offline": (plain("model.name_or_path=someone/some-model"), "someone/some-model: not a local folder"),
    "folder is not a model": (lambda tmp, model: [f"model.name_or_path={tmp}"], "model not found (expected a folder with config.json)"),
    "tokenizer does not match model": (model_with(edit_json("config.json", vocab_size=10)), "the tokenizer has"),
    "lengths above model maximum": (plain("eval.passage_max_len=1000"), "exceeds the model's max_position_embeddings (128)"),
    "weights without tokenizer files": (model_with(remove("tokenizer.json", "tokenizer_config.json")),
                                        "the tokenizer has no vocabulary, only its 5 special tokens"),
    "missing weights file": (model_with(remove("model.safetensors")), "cannot load the weights (Error no file named model.safetensors"),
    "truncated weights file": (model_with(truncate("model.safetensors")), "cannot load the weights (Error while deserializing header"),
    "config wider than the weights": (model_with(edit_json("config.json", hidden_size=64, intermediate_size=256)),
                                      "tensors have other shapes (first: embeddings.LayerNorm.bias, [32] in the weights, [64] by config.json)"),
    "config deeper than the weights": (model_with(edit_json("config.json", num_hidden_layers=3)),
                                       "the weights do not match config.json: 16 of the encoder's tensors are missing (first: encoder.layer.2."),
    # ablation variants
    "variant named as the baseline": (variants_file("full: [attn]\n"), "v.yaml: variant 'full': expected a name"),
    "variant name with a slash": (variants_file("a/b: [attn]\n"), "variant 'a/b': expected a name"),
    "variant name read as a boolean": (variants_file("no: [attn]\n"), "variant False: a variant name must be a string"),
    "variant switching nothing off": (variants_file("none: []\n"), "variant 'none': no term to switch off"),
    "ablated term no stage uses": (good("run.stages=posttrain,teacher", "--ablate", "attn"),
                                   "--ablate: variant 'no-attn': no stage of run.stages (posttrain,teacher) trains with the term 'attn'"),
    "ablated term already off": (good("distill.weights.attn=0", "--ablate", "attn"), "trains with the term 'attn'"),
    "every term ablated": (good("--ablate", "ce,col,de,kl_ce_col,kl_col_de,kl_ce_de,attn,dualreg"),
                           "distill.weights: every term is 0"),
    "ablation named as a variant": (variants_file("no-attn: [attn]\n", "--ablate", "attn"),
                                    "--ablate: its variant 'no-attn' is also in the variants file"),
    # output
    "output directory not writable": (lambda tmp, model: [f"run.output_dir={tmp / 'file' / 'runs'}"], "cannot write the run directory"),
}


def command(case, tmp_path, model_dir) -> list[str]:
    make, _ = CASES[case]
    args = make(tmp_path, model_dir)
    defaults = [f"run.output_dir={tmp_path / 'runs'}", f"model.name_or_path={model_dir}", *FAST]
    flags = [a for i, a in enumerate(args) if a.startswith("--") or (i and args[i - 1].startswith("--"))]
    return [*flags, *defaults, *[a for a in args if a not in flags]]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_with_status_2_and_nothing_done(case, tmp_path, tiny_bert_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "file").write_text("a file where a folder is expected")
    argv = command(case, tmp_path, tiny_bert_path)
    try:
        code = run_pipeline.main(argv)
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: ") and CASES[case][1] in err, err
    assert not list(tmp_path.rglob("DONE.json"))
    assert not any((tmp_path / "runs").glob("*/*-*/checkpoints")), "a stage started"


def test_the_table_covers_the_classes_of_bad_input_and_the_readme_counts_them():
    assert len(CASES) >= 33 + 40
    readme = (ROOT / "README.md").read_text()
    assert f"runs {len(CASES)} cases through the command line" in readme
    counts = re.findall(r"^  \| [a-z ,]+ \| (\d+) \| ", readme, flags=re.M)
    assert sum(map(int, counts)) == len(CASES)


def test_the_cases_with_good_data_differ_from_a_valid_command_only_by_their_mistake(tmp_path, tiny_bert_path, capsys):
    args = good()(tmp_path, tiny_bert_path)
    assert run_pipeline.main(["--check", f"model.name_or_path={tiny_bert_path}", *FAST, *args]) == 0
    assert capsys.readouterr().out.startswith("ok: 10 passages, 6 training queries ('train'), 2 evaluation queries")


def test_ids_are_stripped_in_every_file_alike(tmp_path, tiny_bert_path, capsys):
    spaced = [{**r, "_id": f" {r['_id']}\t"} for r in GOOD_CORPUS]
    args = good(corpus=spaced, queries=[{**r, "_id": f"{r['_id']} "} for r in GOOD_QUERIES])(tmp_path, tiny_bert_path)
    assert run_pipeline.main(["--check", f"model.name_or_path={tiny_bert_path}", *FAST, *args]) == 0, capsys.readouterr().err


def test_the_yaml_word_no_is_the_documented_value(tmp_path):
    from pipeline.config import load_config

    (tmp_path / "c.yaml").write_text("run:\n  mixed_precision: no\nnegatives:\n  bm25:\n    stopwords: no\n")
    config = load_config(tmp_path / "c.yaml", ["run.mixed_precision=no"])
    assert config.run.mixed_precision == "no" and config.negatives.bm25.stopwords == "no"


def test_an_unexpected_error_is_one_line_and_its_traceback_goes_to_the_run_log(tmp_path, demo_dirs, capsys, monkeypatch):
    import pipeline.run

    def broken(*args, **kwargs):
        raise RuntimeError("bm25 exploded\nsecond line")

    monkeypatch.setattr(pipeline.run, "BM25Index", broken)
    data, model = demo_dirs
    code = run_pipeline.main([f"run.output_dir={tmp_path}", f"data.path={data}", f"model.name_or_path={model}"])
    err = capsys.readouterr().err.strip().splitlines()
    log = tmp_path / "demo" / "run.log"
    assert code == 2 and err[-1] == f"error: RuntimeError: bm25 exploded (the traceback is in {log})"
    assert not any(line.startswith("Traceback") for line in err)
    assert "Traceback (most recent call last)" in log.read_text() and "bm25 exploded" in log.read_text()


# Concurrency and interrupts: a real run in a subprocess, stopped mid-stage.

TEACHER_ONLY = ["run.stages=teacher", "eval.top_k=20", "eval.rerank_depth=10", "eval.passage_max_len=48",
                "teacher.batch_size=4", "teacher.group_size=3", "teacher.train.max_steps=16",
                "teacher.train.checkpoint_every=4", "teacher.train.log_every=1"]
SLOW_STEPS = ("import sys, time, pipeline.stages.teacher as t; loss = t.contrastive_loss; "
              "t.contrastive_loss = lambda *a, **k: (time.sleep(0.3), loss(*a, **k))[1]; "
              "import run_pipeline; sys.exit(run_pipeline.main(sys.argv[1:]))")


def test_a_second_run_on_the_folder_is_refused_and_ctrl_c_stops_with_one_line_and_resumes_identically(
        tmp_path, demo_dirs, capsys):
    from safetensors.torch import load_file

    from pipeline.train import latest_checkpoint

    data, model = demo_dirs
    args = [f"run.output_dir={tmp_path}", f"data.path={data}", f"model.name_or_path={model}", *TEACHER_ONLY]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-c", SLOW_STEPS, *args], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = []
    try:
        for line in first.stderr:  # steps are logged as plain lines: stderr is not a terminal
            seen.append(line)
            step = re.search(r"teacher-[0-9a-f]{8} step (\d+)/16", line)
            if step and int(step.group(1)) >= 5:  # after the step-4 checkpoint
                break
        assert first.poll() is None, "".join(seen)

        assert run_pipeline.main(args) == 2  # the same command, while the first runs
        refusal = capsys.readouterr().err.strip()
        assert re.fullmatch(rf"error: {tmp_path / 'demo'}: another run is using this folder \(pid {first.pid} on .+\); "
                            "wait for it to finish, or use another run.name", refusal), refusal

        first.send_signal(signal.SIGINT)
        rest = first.communicate(timeout=120)[1]
    finally:
        first.kill()
    (stage,) = (tmp_path / "demo").glob("teacher-*")
    last = rest.strip().splitlines()[-1]
    assert first.returncode == 130, rest
    assert re.fullmatch(r"interrupted during teacher at step (\d+); rerun the same command to resume", last), rest
    assert "Traceback" not in rest and not (stage / "DONE.json").exists()
    checkpoint = latest_checkpoint(stage / "checkpoints")  # complete, where the rerun resumes
    assert 4 <= json.loads((checkpoint / "train_state.json").read_text())["step"] <= int(re.search(r"step (\d+);", last)[1])

    assert run_pipeline.main(args) == 0  # resumes and finishes
    assert run_pipeline.main([*args, "run.name=straight"]) == 0
    (straight,) = (tmp_path / "straight").glob("teacher-*")
    assert straight.name == stage.name
    assert (stage / "eval" / "metrics.json").read_text() == (straight / "eval" / "metrics.json").read_text()
    resumed, reference = load_file(stage / "final" / "model.safetensors"), load_file(straight / "final" / "model.safetensors")
    assert all(resumed[k].equal(reference[k]) for k in reference)


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    holder = ("import os, signal, sys; from pathlib import Path; from pipeline.lock import run_lock\n"
              "with run_lock(Path(sys.argv[1])): os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", holder, str(tmp_path)], cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / ".lock").read_text().startswith("pid ")  # what the dead run left

    from pipeline.lock import run_lock

    with run_lock(tmp_path):
        assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()} ")


def test_a_swallowed_ctrl_c_still_stops_training_at_the_next_step(tmp_path):
    import torch
    from accelerate import Accelerator

    from pipeline.interrupt import Interrupted, handle_ctrl_c
    from pipeline.train import TrainConfig, train

    model = torch.nn.Linear(2, 1)
    calls = []

    def step(module, batch):
        calls.append(1)
        if len(calls) == 3:
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                pass  # what a library's finaliser or callback may do
        return {"fit": module(batch).pow(2).mean()}

    with handle_ctrl_c(), pytest.raises(Interrupted) as stopped:
        train(Accelerator(cpu=True), model, step, lambda e, i: torch.ones(4, 2), 10, {"fit": 1.0},
              TrainConfig(epochs=1, checkpoint_every=100), tmp_path)
    assert len(calls) == 3 and str(stopped.value) == "interrupted at step 3; rerun the same command to resume"


def test_a_second_ctrl_c_exits_at_once(monkeypatch):
    from pipeline import interrupt

    exits, before = [], signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(interrupt.os, "_exit", exits.append)
    with interrupt.handle_ctrl_c():
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # while the first unwinds: no exception, the process ends
    assert exits == [130]
    assert signal.getsignal(signal.SIGINT) is before


# Silent reuse: what changes a stage's result is in its hash, and the plan says what changed.

def test_a_stage_finished_in_another_precision_or_by_other_code_is_not_reused(tmp_path, demo_dirs, capsys):
    from pipeline.config import load_config
    from pipeline.io import write_json_atomic
    from pipeline.plan import base_key, plan_stages

    data, model = demo_dirs
    args = [f"run.output_dir={tmp_path}", f"data.path={data}", f"model.name_or_path={model}", "run.stages=teacher"]
    config = load_config(None, args)
    (finished,) = plan_stages(config, base_key(config, data, str(model)))
    other_code = {**finished.key, "code": "0" * 64}
    write_json_atomic(finished.done_file, {"stage": "teacher", "hash": finished.hash, "key": finished.key,
                                           "code_version": "2b4d4fa, source 1a2b3c4d"})
    assert run_pipeline.main(["--plan", *args]) == 0
    assert re.search(r"teacher +[0-9a-f]{8} +done", capsys.readouterr().out)

    assert run_pipeline.main(["--plan", *args, "run.mixed_precision=bf16"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"teacher +[0-9a-f]{8} +will run", text)
    assert f"not reusing the finished {finished.folder.name}:\n      run.mixed_precision: no -> bf16\n" in text

    write_json_atomic(finished.done_file, {"stage": "teacher", "hash": finished.hash, "key": other_code,
                                           "code_version": "2b4d4fa, source 1a2b3c4d"})
    other = finished.folder.with_name("teacher-00000000")
    finished.folder.rename(other)
    assert run_pipeline.main(["--plan", *args]) == 0
    assert "code: the pipeline's source changed (data/, models/, losses/, pipeline/): finished by 2b4d4fa, source " \
           "1a2b3c4d; this is " in capsys.readouterr().out


# Property-based: generated configs and corrupt BEIR folders through the real validation (--check).
# The invariant: the inputs are valid, or exit status 2 with one line naming the field or the file,
# no traceback, and nothing written.

from contextlib import redirect_stderr, redirect_stdout  # noqa: E402
from io import StringIO  # noqa: E402
from tempfile import TemporaryDirectory  # noqa: E402

import yaml  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from data.fields import choices, walk  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402

GENERATED = settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
PATHS = ("data.path", "model.name_or_path", "run.output_dir")  # the BEIR test below generates data
FIELDS = {key: (f, value) for key, f, value in walk(PipelineConfig()) if key not in PATHS}
WRONG_TYPES = ["many", "[1, 2]", "{a: 1}", "true", "no", "1.5", "null", "~", "''", "'", "1e999", ".nan", "-.inf"]


@st.composite
def override(draw):
    """``key=raw`` as a user types it: a value of the field's type (in range or not), of another type, or any text."""
    key = draw(st.sampled_from(sorted(FIELDS)))
    f, default = FIELDS[key]
    typed = {
        bool: st.sampled_from(["true", "false"]),
        int: st.one_of(st.integers(-3, 12), st.integers(-2**40, 2**40)).map(str),
        float: st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(lambda x: yaml.safe_dump(x).split("\n")[0]),
                         st.sampled_from(["0", "0.5", "1", "1.5", "-1"])),
        str: st.sampled_from([*choices(f), "", " ", "posttrain,distill", "teacher", "dev", "none", default]),
    }[type(default)]
    raw = draw(st.one_of(typed, typed, typed, st.sampled_from(WRONG_TYPES), st.text(max_size=10)))
    return key, raw


def check(argv) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = run_pipeline.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def assert_valid_or_one_line(code: int, out: str, err: str, names) -> None:
    if code == 0:
        assert out.startswith("ok: "), out + err
        return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert any(name in lines[0] for name in names), f"{lines[0]!r} names none of {names}"


@GENERATED
@given(overrides=st.lists(override(), min_size=1, max_size=3, unique_by=lambda o: o[0]))
def test_generated_configs_are_valid_or_one_line_naming_the_field(overrides, tiny_bert_path):
    with TemporaryDirectory() as tmp:
        root = write_good(Path(tmp) / "beir")
        argv = ["--check", f"data.path={root}", f"model.name_or_path={tiny_bert_path}", f"run.output_dir={tmp}/runs",
                *FAST, *SMALL, *(f"{key}={raw}" for key, raw in overrides)]
        code, out, err = check(argv)
        keys = [key for key, _ in overrides]
        # A setting that contradicts another may be named by its section (posttrain: every loss weight is 0),
        # one that names a file by the file (qrels/<split>.tsv), a length by the model it exceeds.
        names = [*keys, *(key.split(".")[0] + s for key in keys for s in (":", ".")), str(root), str(tiny_bert_path)]
        assert_valid_or_one_line(code, out, err, names)
        assert not (Path(tmp) / "runs").exists()


@GENERATED
@given(document=st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["run", "data", "eval", "name", "seed", "stages", "index",
                                                             "batch_size", "kind", "x"]) | st.text(max_size=4),
                                            inner, max_size=3)),
    max_leaves=8))
def test_generated_config_files_are_valid_or_one_line_naming_the_file(document):
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(document))
        for overrides in ([], ["run.name=x"]):  # the same error with and without overrides
            code, out, err = check(["--plan", "--config", str(path), f"run.output_dir={tmp}/runs", *overrides])
            if code == 0:
                continue
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
            assert str(path) in lines[0] or re.match(r"error: [a-z_]+(\.[a-z_]+)*: ", lines[0]), lines[0]
        assert not (Path(tmp) / "runs").exists()


FILES = ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv")
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=6), st.lists(st.integers(), max_size=2),
                        st.sampled_from(["", " ", ZERO_WIDTH, NUL, "d1", "q1", " d2 ", "q7", "d9", "bado kemi"]))
CELLS = st.one_of(st.text(max_size=5), st.sampled_from(["q1", "d1", "q7", "d9", "", "1", "0", "-1", "2.5", " q2 ", "x"]))


@st.composite
def corruption(draw):
    """One edit of one file of a valid BEIR folder, as a function of the folder."""
    name, kind = draw(st.sampled_from(FILES)), draw(st.sampled_from(  # mostly edits that keep the file readable
        ["edit cell"] * 4 + ["drop line", "repeat line"] * 2 + ["replace line", "truncate", "insert bytes", "delete", "crlf"]))
    at, text = draw(st.integers(0, 50)), draw(st.text(max_size=12))
    raw, value, field = draw(st.binary(max_size=6)), draw(JSON_VALUES), draw(st.sampled_from(["_id", "title", "text", "x"]))
    column, cell, drop = draw(st.integers(0, 3)), draw(CELLS), draw(st.booleans())

    def apply(root):
        path = root / name
        if not path.exists():  # deleted by an earlier edit
            return None
        if kind == "delete":
            return path.unlink()
        content = path.read_bytes()
        lines = content.decode("utf-8", "replace").split("\n")
        i = at % len(lines)
        if kind == "drop line":
            del lines[i]
        elif kind == "repeat line":
            lines.insert(i, lines[i])
        elif kind == "replace line":
            lines[i] = text
        elif kind == "edit cell" and name.endswith(".jsonl"):
            try:
                row = json.loads(lines[i])
                row.pop(field, None) if drop else row.__setitem__(field, value)
                lines[i] = json.dumps(row)
            except (json.JSONDecodeError, AttributeError):
                lines[i] = json.dumps({field: value})
        elif kind == "edit cell":
            cells = lines[i].split("\t")
            cells[column % (len(cells) + 1):column % (len(cells) + 1) + 1] = [cell]
            lines[i] = "\t".join(cells)
        elif kind == "crlf":
            lines = [line + "\r" for line in lines]
        if kind == "truncate":
            return path.write_bytes(content[: at * len(content) // 50])
        if kind == "insert bytes":
            cut = at * len(content) // 50
            return path.write_bytes(content[:cut] + raw + content[cut:])
        path.write_text("\n".join(lines), encoding="utf-8")

    return f"{kind} {name}", apply


@GENERATED
@given(edits=st.lists(corruption(), min_size=1, max_size=3))
def test_generated_corrupt_beir_folders_are_valid_or_one_line_naming_the_file(edits, tiny_bert_path):
    with TemporaryDirectory() as tmp:
        root = write_good(Path(tmp) / "beir")
        for _, apply in edits:
            apply(root)
        argv = ["--check", f"data.path={root}", f"model.name_or_path={tiny_bert_path}", f"run.output_dir={tmp}/runs",
                *FAST, *SMALL]
        code, out, err = check(argv)
        # Data that loads but no longer fits the sizes is named by the setting (teacher.batch_size: 7 is more ...).
        names = [str(root), *(f"error: {key}: " for key, _ in FIELDS.items()), "error: eval.split: "]
        assert_valid_or_one_line(code, out, err, names)
        assert not (Path(tmp) / "runs").exists()
