"""Metric tables for the console and ``report.md``."""

from __future__ import annotations

from typing import Sequence

from pipeline.metrics import METRIC_KEYS


def metrics_table(rows: Sequence[tuple[str, dict[str, float]]], keys: Sequence[str] = METRIC_KEYS) -> str:
    """A markdown table, one row per (name, metrics).

    >>> print(metrics_table([("bm25", {"ndcg@10": 0.5})], keys=["ndcg@10"]))
    | model | ndcg@10 |
    | --- | ---: |
    | bm25 | 0.5000 |
    """
    lines = ["| model | " + " | ".join(keys) + " |", "| --- | " + " | ".join("---:" for _ in keys) + " |"]
    for name, metrics in rows:
        cells = [f"{metrics[k]:.4f}" if k in metrics else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
