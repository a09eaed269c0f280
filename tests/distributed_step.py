"""One distill step on a fixed global batch, under however many processes launched it.

Run by ``tests/test_distributed.py`` with 1 process (plain ``python``) and with 2 (``accelerate
launch --multi_gpu --num_processes 2``, gloo on CPU). Groups hold BM25 hard negatives. Dropout is
off (eval mode) so both runs compute the same function. The main process saves the loss (averaged over
processes, as the training loop logs it), each term, and every parameter's gradient after DDP's
averaging.

    python tests/distributed_step.py --data D --model M --out FILE [--no-cross-device] [--mini-batch N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=4, help="global batch, in groups")
    parser.add_argument("--no-cross-device", action="store_true")
    parser.add_argument("--mini-batch", type=int, default=0, help="distill.memory.mini_batch (0: the plain step)")
    args = parser.parse_args()

    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from data.beir import load_beir
    from data.bm25 import BM25Index
    from data.groups import TrainGroups
    from data.negatives import mine_negatives
    from models.colbert import ColBERT
    from models.cross_encoder import CrossEncoder
    from models.dual_encoder import DualEncoder
    from pipeline.batches import GroupBatches, TokenizedText
    from pipeline.distributed import mean_over_processes
    from pipeline.evaluate import bm25_search
    from pipeline.stages.configs import DistillConfig, MemoryConfig
    from pipeline.stages.distill import Cascade, distill_terms

    accelerator = Accelerator(cpu=True)
    data = load_beir(Path(args.data), ("train",))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    qids = data.judged_queries("train")
    bm25 = BM25Index(data.passage_texts())
    negatives = mine_negatives(data.qrels["train"], qids, lambda q, k: bm25_search(bm25, data, q, k), 10)
    groups = TrainGroups(data.qrels["train"], negatives, data.corpus["_id"], group_size=3, seed=5)
    text = TokenizedText(tokenizer, data, qids, 16, 32)
    batches = GroupBatches(groups, text, args.batch_size, with_pairs=True,
                           rank=accelerator.process_index, num_processes=accelerator.num_processes)

    torch.manual_seed(0)  # the same initial weights in every process and every run
    de = DualEncoder.from_pretrained(args.model)
    ce = CrossEncoder.from_pretrained(args.model, attention_layer=-1)
    col = ColBERT(de.hidden_size, 16)
    stage = DistillConfig(cross_device=not args.no_cross_device, memory=MemoryConfig(mini_batch=args.mini_batch))
    weights = {name: 1.0 for name in vars(stage.weights)}
    model = accelerator.prepare(Cascade(de, col, ce, stage, weights))
    model.eval()  # no dropout: both runs compute the same function (gradients flow all the same)

    batch = batches.batch_at(0, 0)
    terms = distill_terms(model(batch), batch.group_size, stage, weights)
    loss = sum(terms.values())
    accelerator.backward(loss)
    logged = mean_over_processes({"loss": float(loss), **{k: float(v) for k, v in terms.items()}})
    if accelerator.is_main_process:
        grads = {n: p.grad.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()
                 if p.grad is not None}
        torch.save({"logged": logged, "grads": grads, "processes": accelerator.num_processes}, args.out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
