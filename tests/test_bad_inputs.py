"""Table of malformed inputs through the command line: each is one line naming what is wrong and
where, exit status 2, no traceback, and nothing marked done."""

import json
import shutil

import pytest

import run_pipeline
from tests.test_beir import CORPUS, QUERIES, write_beir

QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n"
FAST = ["posttrain.train.epochs=1", "eval.passage_max_len=32"]


def data(**kwargs):
    def make(tmp):
        root = write_beir(tmp / "beir", qrels=kwargs.pop("qrels", QRELS), **kwargs)
        (root / "qrels" / "train.tsv").write_text(QRELS)
        return [f"data.path={root}"]

    return make


def mutate(fn, **kwargs):
    def make(tmp):
        args = data(**kwargs)(tmp)
        fn(tmp / "beir")
        return args

    return make


def plain(*args):
    return lambda tmp: list(args)


def model_with(edit):
    def make(tmp, model_dir):
        copy = tmp / "model"
        shutil.copytree(model_dir, copy)
        edit(copy)
        return [f"model.name_or_path={copy}"]

    return make


def shrink_vocab(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 10}))


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
    # configuration
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
    # models and lengths
    "model path missing": (plain("model.name_or_path=/nonexistent/model"), "/nonexistent/model: model not found"),
    "hub model offline": (plain("model.name_or_path=someone/some-model"), "someone/some-model: not a local folder"),
    "folder is not a model": (lambda tmp: [f"model.name_or_path={tmp}"], "model not found (expected a folder with config.json)"),
    "tokenizer does not match model": (model_with(shrink_vocab), "the tokenizer has"),
    "lengths above model maximum": (plain("eval.passage_max_len=1000"), "exceeds the model's max_position_embeddings (128)"),
    # output
    "output directory not writable": (lambda tmp: [f"run.output_dir={tmp / 'file' / 'runs'}"], "cannot write the run directory"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_with_status_2_and_nothing_done(case, tmp_path, tiny_bert_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make, expected = CASES[case]
    (tmp_path / "file").write_text("a file where a folder is expected")
    args = make(tmp_path, tiny_bert_path) if case == "tokenizer does not match model" else make(tmp_path)
    defaults = [f"run.output_dir={tmp_path / 'runs'}", f"model.name_or_path={tiny_bert_path}", *FAST]
    flags = [a for a in args if a.startswith("--")] + [a for i, a in enumerate(args) if i and args[i - 1].startswith("--")]
    overrides = [a for a in args if a not in flags]
    code = run_pipeline.main([*flags, *defaults, *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: ") and expected in err, err
    assert not list(tmp_path.rglob("DONE.json"))


def test_the_table_covers_at_least_25_cases():
    assert len(CASES) >= 25
