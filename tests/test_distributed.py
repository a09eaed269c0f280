"""Two CPU processes (gloo) against one: the same step, the same pipeline, the same metrics.

Processes are started with ``accelerate launch --multi_gpu --num_processes 2``: on a machine
without GPUs Accelerate then runs torchrun with the gloo backend. (``--cpu --num_processes 2``
needs ``mpirun``; without it Accelerate starts one process.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluate import EvalConfig, evaluate_dense

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
TINY = [  # as tests/test_pipeline.py, with global batches that split over 2 processes
    "demo.n_entities=20", "demo.n_train_queries=24", "demo.n_test_queries=8", "demo.vocab_size=2000",
    "demo.hidden_size=32", "eval.top_k=100", "eval.passage_max_len=48",
    "posttrain.train.epochs=1", "posttrain.batch_size=16",
    "teacher.train.epochs=1", "teacher.batch_size=4", "teacher.group_size=3",
    "distill.train.epochs=2", "distill.batch_size=4", "distill.group_size=3", "distill.train.log_every=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, *args: str, processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    if processes == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(script), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def one_step(tmp_path, demo_dirs, processes: int, *extra: str) -> dict:
    out = tmp_path / f"step-{processes}{'-'.join(extra)}.pt"
    launch(ROOT / "tests" / "distributed_step.py", "--data", str(demo_dirs[0]), "--model", str(demo_dirs[1]),
           "--out", str(out), *extra, processes=processes)
    return torch.load(out)


def test_two_processes_take_the_same_step_as_one(tmp_path, demo_dirs):
    """Global batch of 4 groups (positive + 2 BM25 hard negatives): every term and every gradient."""
    single, double = one_step(tmp_path, demo_dirs, 1), one_step(tmp_path, demo_dirs, 2)
    assert double["processes"] == 2 and single["processes"] == 1
    assert set(single["logged"]) == {"loss", "ce", "col", "de", "kl_ce_col", "kl_col_de", "kl_ce_de", "attn", "dualreg"}
    for name, value in single["logged"].items():
        assert double["logged"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name  # fp32, 1/tau = 20
    assert single["grads"].keys() == double["grads"].keys() and len(single["grads"]) > 20
    # fp32 sums in another order: compare norms (the teacher's gradients are ~1e-6 and cancel).
    for name, grad in single["grads"].items():
        assert (double["grads"][name] - grad).norm() <= 1e-3 * grad.norm() + 1e-7, name
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    assert (flat(double["grads"]) - flat(single["grads"])).norm() <= 1e-4 * flat(single["grads"]).norm()

    # Without cross-device negatives each query sees only its own process's passages: a different loss.
    local = one_step(tmp_path, demo_dirs, 2, "--no-cross-device")
    assert local["logged"]["de"] < single["logged"]["de"] - 1e-3


def test_the_chunked_step_under_one_and_two_processes_equals_the_plain_step(tmp_path, demo_dirs):
    """Global batch of 6 groups of 3; ``mini_batch`` 4 divides none of 6 or 3 queries, 18 or 9 passages, or the
    doubled rows: cross-device negatives through the cached vectors, DDP averaging the replayed gradients."""
    plain = one_step(tmp_path, demo_dirs, 1, "--batch-size", "6")
    for processes in (1, 2):
        chunked = one_step(tmp_path, demo_dirs, processes, "--batch-size", "6", "--mini-batch", "4")
        assert chunked["processes"] == processes
        for name, value in plain["logged"].items():
            assert chunked["logged"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
        assert chunked["grads"].keys() == plain["grads"].keys() and len(plain["grads"]) > 20
        for name, grad in plain["grads"].items():
            assert (chunked["grads"][name] - grad).norm() <= 1e-3 * grad.norm() + 1e-7, name


def test_the_demo_pipeline_under_two_processes_evaluates_as_one_process_does(tmp_path):
    out = tmp_path / "runs"
    launch(ROOT / "run_pipeline.py", f"run.output_dir={out}", "run.name=ddp", *TINY)
    run_dir = out / "ddp"
    (distill,) = run_dir.glob("distill-*")
    assert (distill / "DONE.json").exists()
    steps = [json.loads(line)["step"] for line in (distill / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # 24 training queries / global batch 4 = 6 steps an epoch, 2 epochs

    # The 2-process evaluation of the distilled dual-encoder equals a 1-process evaluation of it.
    from transformers import AutoTokenizer

    from data.beir import load_beir
    from models.dual_encoder import DualEncoder

    metrics = json.loads((distill / "eval" / "metrics.json").read_text())
    data = load_beir(out / "demo_assets" / "data", ("train", "test"))
    model_dir = distill / "final" / "dual_encoder"
    model = DualEncoder.from_pretrained(model_dir).eval()
    alone = evaluate_dense(model, AutoTokenizer.from_pretrained(model_dir), data,
                           EvalConfig(top_k=100, passage_max_len=48))
    per_query = metrics["dual-encoder"].pop("ndcg@10 per query")
    assert alone == pytest.approx(metrics["dual-encoder"], abs=1e-9)
    assert np.mean(list(per_query.values())) == pytest.approx(alone["ndcg@10"], abs=1e-5)


def test_bm25_is_built_and_mined_once_under_two_processes_as_under_one(tmp_path, demo_dirs):
    """The main process indexes and mines; the other builds nothing and reads what the main process wrote."""
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"bm25-{processes}"
        launch(ROOT / "tests" / "distributed_bm25.py", "--data", str(demo_dirs[0]), "--output-dir", str(out / "runs"),
               "--out", str(out), processes=processes)
        runs[processes] = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(processes)]
    (single,), (main, other) = runs[1], runs[2]
    assert [single["processes"], main["processes"], other["processes"]] == [1, 2, 2]
    assert [single["builds"], main["builds"], other["builds"]] == [1, 1, 0]
    assert Path(main["index_dir"]).is_dir() and other["index_dir"] == main["index_dir"]
    assert len(single["negatives"]) > 20 and all(len(n) == 30 for n in single["negatives"].values())
    for record in (main, other):
        assert record["negatives"] == single["negatives"]
        assert record["ranking"] == single["ranking"] and len(single["ranking"]) > 5
        assert record["pair_scores"] == single["pair_scores"] and max(single["pair_scores"]) > 0


@pytest.fixture(scope="module")
def encode_runs(tmp_path_factory, demo_dirs) -> dict[int, list[tuple[dict, dict]]]:
    """tests/distributed_encode.py under 1 and 2 processes: per process count, each rank's (npz, json)."""
    runs = {}
    for processes in (1, 2):
        out = tmp_path_factory.mktemp(f"encode-{processes}")
        launch(ROOT / "tests" / "distributed_encode.py", "--data", str(demo_dirs[0]), "--model", str(demo_dirs[1]),
               "--out", str(out), "--count", "17", "--chunk", "4", "--batch-size", "2", processes=processes)
        runs[processes] = [(dict(np.load(out / f"rank-{r}.npz")), json.loads((out / f"rank-{r}.json").read_text()))
                           for r in range(processes)]
    return runs


def test_the_streamed_corpus_encoding_under_two_processes_equals_one_chunk_and_one_process(encode_runs):
    """17 passages in chunks of 4 over 2 processes: rank 0 encodes 9 (4, 4, 1), rank 1 8 (4, 4, then nothing)."""
    (single, _), (main, _), (other, _) = encode_runs[1][0], *encode_runs[2]
    assert [int(single["processes"]), int(main["processes"]), int(other["processes"])] == [1, 2, 2]
    for record in (single, main, other):
        assert record["chunk_4"].shape == (17, 32)
        np.testing.assert_array_equal(record["chunk_4"], record["chunk_17"])  # the chunk never changes a vector
    np.testing.assert_array_equal(main["chunk_4"], other["chunk_4"])  # every process receives every vector
    np.testing.assert_allclose(main["chunk_4"], single["chunk_4"], atol=1e-6)  # other batches, same vectors
    # main_only: the main process assembles the same vectors, the other keeps none
    assert bool(single["received_main_only"]) and bool(main["received_main_only"])
    assert not bool(other["received_main_only"])
    np.testing.assert_array_equal(main["main_only"], main["chunk_4"])


def test_a_dense_search_from_shards_on_disk_under_two_processes_ranks_as_in_memory_and_as_one_process(encode_runs):
    """Each process writes its own shard; the main process indexes both and ranks as the gathered vectors do."""
    (_, single), (_, main), (_, other) = encode_runs[1][0], *encode_runs[2]
    memory = single["rankings"]["memory"]
    assert len(memory) >= 20 and all(len(ranked) == 10 for ranked in memory.values())
    for record in (single, main, other):
        assert list(record["rankings"].values()) == [memory, memory]  # on disk as in memory, 2 processes as 1
        assert record["left"] == []  # the shard folder is emptied after the search


def test_shards_of_a_global_batch_are_its_rows_in_group_layout(demo_dirs, tiny_tokenizer):
    from data.beir import load_beir
    from data.groups import TrainGroups
    from pipeline.batches import GroupBatches, TokenizedText

    data = load_beir(demo_dirs[0], ("train",))
    qids = data.judged_queries("train")
    negatives = {q: data.corpus["_id"][:5] for q in qids}
    groups = TrainGroups(data.qrels["train"], negatives, data.corpus["_id"], group_size=3, seed=1)
    text = TokenizedText(tiny_tokenizer, data, qids, 16, 32)
    whole = GroupBatches(groups, text, 4, with_pairs=True).batch_at(1, 2)
    shards = [GroupBatches(groups, text, 4, with_pairs=True, rank=r, num_processes=2).batch_at(1, 2) for r in (0, 1)]
    for field in ("queries", "passages", "pairs"):
        for key, value in getattr(whole, field).items():
            torch.testing.assert_close(torch.cat([getattr(s, field)[key] for s in shards]), value, rtol=0, atol=0)
    assert [len(s.queries["input_ids"]) for s in shards] == [2, 2]
    assert [len(s.passages["input_ids"]) for s in shards] == [6, 6]  # each query's 3 passages stay with it


def test_a_launch_the_stages_cannot_honour_is_refused_before_anything_runs():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from data.errors import InputError
    from pipeline.config import load_config
    from pipeline.run import check_launch

    launch = lambda kind, n: SimpleNamespace(distributed_type=kind, num_processes=n,  # noqa: E731
                                             state=SimpleNamespace(deepspeed_plugin=None))
    config = load_config(None, ["teacher.batch_size=12", "distill.batch_size=8", "posttrain.batch_size=24"])
    check_launch(config, launch(DistributedType.MULTI_GPU, 4))
    with pytest.raises(InputError, match=r"distill.batch_size: the global batch \(8\) must split evenly over 6"):
        check_launch(config, launch(DistributedType.MULTI_GPU, 6))
    with pytest.raises(InputError, match="FSDP and DeepSpeed ZeRO-3"):
        check_launch(config, launch(DistributedType.FSDP, 2))
