"""benchmarks/scale.py's arithmetic: the log-log slope, the targets, recall against flat."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.scale import OUT_OF_MEMORY, loglog_slope, recall_at_k, recorded_command, slopes, targets


def test_slope_is_the_power_of_n():
    sizes = [1e4, 1e5, 1e6]
    assert loglog_slope(sizes, [3e-4 * n**1.5 for n in sizes]) == pytest.approx(1.5)
    assert loglog_slope(sizes, [7.0, 7.0, 7.0]) == pytest.approx(0.0)
    assert loglog_slope(sizes, [None, 2.0, None]) is None  # a failed step leaves too few points


def step(name: str, **per_n) -> dict:
    return {"name": name, "per_n": {n.removeprefix("n"): {"status": "ok"} | v for n, v in per_n.items()}}


def test_targets_count_a_step_out_of_memory_at_1m_as_the_limit():
    entries = [
        step("bm25_index", n10000={"seconds": 1.0, "peak_rss_gb": 0.2},
             n1000000={"seconds": 200.0, "peak_rss_gb": 3.0}),
        step("tokenize_corpus", n10000={"seconds": 2.0, "peak_rss_gb": 0.5},
             n1000000={"seconds": None, "peak_rss_gb": None, "status": f"{OUT_OF_MEMORY}: stopped"}),
        step("mine_negatives_1_thread", n10000={"seconds": 4.0, "negatives_sha256": "a"}),
        step("mine_negatives_2_threads", n10000={"seconds": 2.5, "negatives_sha256": "a"}),
    ]
    checks, speedups = targets(entries, slopes(entries)[0], memory_limit_gb=16.0)
    by_name = {c["name"]: c for c in checks}
    assert by_name["slope of bm25_index"]["met"] is False
    assert by_name["slope of bm25_index"]["missed_by"] == pytest.approx(np.log(200) / np.log(100) - 1.1, abs=1e-5)
    tokenize = by_name["slope of tokenize_corpus"]  # one point left: no slope, and the N it failed at is named
    assert (tokenize["met"], tokenize["not_measured_at"]) == (None, [1000000])
    rss = by_name["peak RSS at N=1000000 with the tiny model (GiB)"]
    assert (rss["measured"], rss["met"], rss["step"]) == (16.0, False, "tokenize_corpus")
    mining = by_name["mining speedup, 2 threads over 1 (at the largest N)"]
    assert (mining["measured"], mining["met"], mining["missed_by"]) == (1.6, True, 0.0)
    assert speedups["10000"]["same_negatives"]


def test_recall_ignores_missing_results():
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    found = np.array([[3, 2, 9, -1], [7, 6, 5, 4]])
    assert recall_at_k(found, exact) == pytest.approx((2 / 4 + 1) / 2)


def test_recorded_command_holds_no_machine_path():
    command = recorded_command(["--work-dir", "/home/someone/scratch", "--out=/tmp/a/scale.json", "--sizes", "10"])
    assert "/home" not in command and "/tmp" not in command
