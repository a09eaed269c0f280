"""The corpus encoding (``pipeline.evaluate.encode_texts``) under however many processes launched it.

Run by ``tests/test_distributed.py`` with 1 process (plain ``python``) and with 2 (``accelerate
launch --multi_gpu --num_processes 2``, gloo on CPU). Every process encodes the first ``--count``
passages in chunks of ``--chunk`` and in one chunk, and saves both to ``<out>/rank-<r>.npz``, with
whether it received the vectors when only the main process keeps them; then it runs a dense search
of the train queries with the vectors in memory and with them in shards on disk, and saves both
rankings and what was left in the shard folder to ``<out>/rank-<r>.json``.

    python tests/distributed_encode.py --data D --model M --out DIR [--count N] [--chunk C] [--batch-size B]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=17, help="passages encoded (the first ones)")
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()

    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from data.beir import load_beir
    from models.dual_encoder import DualEncoder
    from pipeline.evaluate import EvalConfig, dense_search, encode_texts

    accelerator = Accelerator(cpu=True)
    data = load_beir(Path(args.data), ("train",))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = DualEncoder.from_pretrained(args.model).eval()
    vectors = {f"chunk_{chunk}": encode_texts(model.encode_passages, tokenizer, data.passage_texts, args.count, 32,
                                              args.batch_size, chunk)
               for chunk in (args.chunk, args.count)}
    main_only = encode_texts(model.encode_passages, tokenizer, data.passage_texts, args.count, 32, args.batch_size,
                             args.chunk, main_only=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"rank-{accelerator.process_index}.npz", **vectors, processes=accelerator.num_processes,
             received_main_only=main_only is not None,
             main_only=main_only if main_only is not None else np.zeros((0, 0), np.float32))
    config = EvalConfig(top_k=10, passage_max_len=32, batch_size=args.batch_size, encode_chunk=args.chunk)
    folder = out / "shards"
    rankings = {where or "memory": dense_search(model.encode_queries, model.encode_passages, tokenizer, data,
                                                 data.judged_queries("train"), replace(config, vectors_dir=where))
                for where in ("", str(folder))}
    left = sorted(p.name for p in folder.rglob("*"))
    (out / f"rank-{accelerator.process_index}.json").write_text(json.dumps({"rankings": rankings, "left": left}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
