"""Metric tables for the console and ``report.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.io import read_jsonl, write_text_atomic
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


def stage_table(results: dict[str, dict[str, dict[str, float]]], keys: Sequence[str] = ("ndcg@10", "mrr@10", "recall@100")) -> str:
    """One row per (stage, model): the run's whole story in one table."""
    rows = [(f"{stage} / {model}", metrics) for stage, models in results.items() for model, metrics in models.items()]
    return metrics_table(rows, keys).replace("| model |", "| stage / model |", 1)


def write_report(run_dir: Path, results: dict, stage_dirs: dict[str, Path], variant: str = "") -> None:
    """``report.md`` (metrics table, loss curves) and PNG plots in the run directory."""
    suffix = f"-{variant}" if variant else ""
    plots = []
    for stage, stage_dir in stage_dirs.items():
        log_path = stage_dir / "train_log.jsonl"
        if log_path.exists():
            png = run_dir / f"loss-{stage}{suffix}.png"
            _plot_losses(read_jsonl(log_path), f"{stage} ({stage_dir.name})", png)
            plots.append(png.name)
    png = run_dir / f"metrics{suffix}.png"
    _plot_metrics(results, png)
    text = [f"# Run {run_dir.name}{' variant ' + variant if variant else ''}", "", stage_table(results), ""]
    text += [f"![{name}]({name})" for name in [png.name, *plots]]
    write_text_atomic(run_dir / f"report{suffix}.md", "\n".join(text) + "\n")


def _plot_losses(records: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = [k for k in records[0] if k not in ("step", "epoch", "lr", "skipped_steps")] if records else []
    fig, ax = plt.subplots(figsize=(7, 4))
    for term in terms:
        ax.plot([r["step"] for r in records], [r[term] for r in records], label=term)
    ax.set(title=title, xlabel="optimizer step", ylabel="loss (unweighted)", yscale="log")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_metrics(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{stage}\n{model}" for stage, models in results.items() for model in models]
    values = [m["ndcg@10"] for models in results.values() for m in models.values()]
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.1), 4))
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), labels, fontsize=6)
    ax.set(ylabel="nDCG@10", title="nDCG@10 per stage and model")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
