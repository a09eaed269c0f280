"""A run's BM25 (``pipeline.run.prepare_bm25``) under however many processes launched it.

Run by ``tests/test_distributed.py`` with 1 process (plain ``python``) and with 2 (``accelerate
launch --multi_gpu --num_processes 2``, gloo on CPU). Every process writes what it received, how
many BM25 indexes it built itself, and the BM25 scores it reads from the saved index (as the
``scores`` stage does on every process) to ``<out>/rank-<r>.json``.

    python tests/distributed_bm25.py --data D --output-dir RUNS --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--output-dir", required=True, help="run.output_dir")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import bm25s
    from accelerate import Accelerator

    from data.bm25 import BM25Index
    from pipeline.config import load_config
    from pipeline.run import load_data, prepare_bm25

    builds = 0
    build = bm25s.BM25.index

    def counted_build(self, *a, **kw):
        nonlocal builds
        builds += 1
        return build(self, *a, **kw)

    bm25s.BM25.index = counted_build
    accelerator = Accelerator(cpu=True)
    data_dir = Path(args.data)
    config = load_config(None, [f"data.path={data_dir}", f"run.output_dir={args.output_dir}", "run.name=bm25",
                                "eval.top_k=50", "eval.rerank_depth=50", "run.bm25_threads=2"])
    data = load_data(config, data_dir)
    bm25 = prepare_bm25(config, data, data_dir)
    query = sorted(bm25.negatives)[0]
    index = BM25Index.load(bm25.index_dir, config.negatives.bm25)
    pair_scores = index.score_pairs(data.query_texts([query])[0], list(range(10)))
    record = {"processes": accelerator.num_processes, "builds": builds, "index_dir": str(bm25.index_dir),
              "negatives": bm25.negatives, "ranking": bm25.ranking, "pair_scores": pair_scores.tolist()}
    out = Path(args.out) / f"rank-{accelerator.process_index}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
