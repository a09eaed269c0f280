import json

from data.demo import DemoSpec, ensure_demo, generate_beir


def test_generation_is_deterministic_and_seed_dependent():
    spec = DemoSpec(n_entities=10, n_train_queries=20, n_test_queries=5)
    assert generate_beir(spec) == generate_beir(spec)
    assert generate_beir(spec)[0] != generate_beir(DemoSpec(seed=14, n_entities=10))[0]


def test_every_query_is_judged_against_an_existing_document():
    spec = DemoSpec(n_entities=10, n_train_queries=20, n_test_queries=5)
    corpus, queries, qrels = generate_beir(spec)
    doc_ids = {row["_id"] for row in corpus}
    judged = [q for rows in qrels.values() for q, _, _ in rows]
    assert sorted(judged) == sorted(row["_id"] for row in queries)
    assert all(d in doc_ids for rows in qrels.values() for _, d, _ in rows)
    assert len(doc_ids) == len(corpus) == spec.n_entities * spec.n_topics


def test_demo_is_reused_when_unchanged(demo_dirs):
    data_dir, model_dir = demo_dirs
    marker = data_dir.parent / "demo.json"
    before = marker.stat().st_mtime_ns
    spec = DemoSpec(**{k: v for k, v in json.loads(marker.read_text()).items() if k != "version"})
    assert ensure_demo(data_dir.parent, spec) == (data_dir, model_dir)
    assert marker.stat().st_mtime_ns == before


def test_tokenizer_is_identical_across_processes():
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = (
        "from data.demo import DemoSpec, generate_beir, train_tokenizer\n"
        "corpus, queries, _ = generate_beir(DemoSpec(n_entities=20))\n"
        "texts = [r['title'] + ' ' + r['text'] for r in corpus] + [r['text'] for r in queries]\n"
        "print(train_tokenizer(texts, 2000).backend_tokenizer.to_str())\n"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        for _ in range(3)
    }
    assert len(outputs) == 1
