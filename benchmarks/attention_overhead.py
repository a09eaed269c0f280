#!/usr/bin/env python
"""Cost of the cross-encoder's attention probabilities: forward + backward, three ways, one run.

(a) fused SDPA everywhere, scores only (a CE step without the ``attn`` loss);
(b) this project: SDPA everywhere except the chosen layer, whose probabilities ``AttentionProbe``
    records (a CE step with the ``attn`` loss);
(c) what a user would pick instead: ``attn_implementation="eager"`` + ``output_attentions=True``,
    which materialises every layer's probabilities.

Same random BERT-base weights (``BertConfig()``: 12 layers, hidden 768) and inputs for all three;
(b) and (c) back-propagate through the probed layer's probabilities (default: the last), as the
attention loss does. Reports the median time of each and the ratios b/a (target <= 1.10 on GPU) and c/b; writes
``benchmarks/results/attention_overhead_<cpu|gpu>.json``. CPU timings are noisy when other jobs
share the cores; there, SDPA with attention dropout > 0 runs its math kernel, no faster than eager
attention, so (c) costs about what (a) does (``--attention-dropout 0`` shows the fused CPU kernel).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.collate import SpecialTokens, cross_inputs  # noqa: E402
from models.cross_encoder import CrossEncoder  # noqa: E402


def make_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Pairs with a quarter of the tokens on the query side, lengths varied so rows are padded."""
    gen = torch.Generator().manual_seed(seed)
    content = seq_len - 3
    queries, passages = [], []
    for b in range(batch_size):
        total = content - (b * content) // (4 * batch_size)  # the longest row fills seq_len
        n_q = max(1, total // 4)
        queries.append(torch.randint(1000, vocab_size, (n_q,), generator=gen).tolist())
        passages.append(torch.randint(1000, vocab_size, (total - n_q,), generator=gen).tolist())
    return cross_inputs(queries, passages, SpecialTokens(cls=101, sep=102, pad=0))


def step(model: CrossEncoder, batch: dict, mode: str) -> None:
    """One forward + backward in the given mode; gradients are discarded."""
    if mode == "sdpa":
        loss = model(batch).scores.float().sum()
    elif mode == "probe":
        out = model(batch, return_attention=True)
        loss = out.scores.float().sum() + out.attention.float().mean()
    else:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        out = model.model(**inputs, output_attentions=True)
        loss = out.logits.float().sum() + out.attentions[model.attention_layer].float().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def time_modes(model: CrossEncoder, batch: dict, repeats: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per step of each mode; the modes are interleaved so drifting load hits all alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    modes = {"sdpa": "sdpa", "probe": "sdpa", "eager_all": "eager"}
    times = {mode: [] for mode in modes}
    for i in range(warmup + repeats):
        for mode, implementation in modes.items():
            model.model.set_attn_implementation(implementation)
            sync()
            start = time.perf_counter()
            step(model, batch, mode)
            sync()
            if i >= warmup:
                times[mode].append(time.perf_counter() - start)
    model.model.set_attn_implementation("sdpa")
    return {mode: statistics.median(values) for mode, values in times.items()} | {"all": times}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layer", type=int, default=-1, help="the probed layer")
    parser.add_argument("--attention-dropout", type=float, default=0.1,
                        help="BERT's default 0.1; on CPU, SDPA with dropout > 0 falls back to its math kernel")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/attention_overhead_<cpu|gpu>.json")
    args = parser.parse_args()

    from transformers import BertConfig, BertForSequenceClassification

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    config = BertConfig(num_labels=1, attention_probs_dropout_prob=args.attention_dropout)
    model = CrossEncoder(BertForSequenceClassification._from_config(config, attn_implementation="sdpa"), args.layer)
    model.to(device=device, dtype=dtype).train()
    batch = {k: v.to(device) for k, v in make_batch(args.batch_size, args.seq_len, config.vocab_size, 0).items()}
    timed = time_modes(model, batch, args.repeats, args.warmup, device)

    result = {
        "benchmark": "cross-encoder forward+backward: attention probabilities of one layer",
        "model": "random BERT-base (BertConfig(): 12 layers, hidden 768, 12 heads), training mode",
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "probed_layer": model.attention_layer,
        "dtype": str(dtype).removeprefix("torch."),
        "attention_dropout": args.attention_dropout,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "median_s": {"a_sdpa_no_probs": timed["sdpa"], "b_probe_one_layer": timed["probe"],
                     "c_eager_all_layers": timed["eager_all"]},
        "ratio_b_over_a": timed["probe"] / timed["sdpa"],
        "ratio_c_over_b": timed["eager_all"] / timed["probe"],
        "all_s": timed["all"],
        "device": device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
    }
    rows = [("(a) SDPA, no probabilities", timed["sdpa"]), ("(b) SDPA + one probed layer", timed["probe"]),
            ("(c) eager, all layers' probabilities", timed["eager_all"])]
    print(f"{args.batch_size} x {args.seq_len} tokens, {result['dtype']}, {result['device']}, median of {args.repeats}")
    for name, seconds in rows:
        print(f"  {name:<40} {seconds * 1000:10.1f} ms")
    print(f"  b / a = {result['ratio_b_over_a']:.3f}    c / b = {result['ratio_c_over_b']:.3f}")

    kind = "gpu" if device.type == "cuda" else "cpu"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"attention_overhead_{kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
