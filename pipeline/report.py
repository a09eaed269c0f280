"""What people look at after a run: metric tables for the console, ``report.md`` and ``report.html``
(the plots embedded, one file to send), the metrics and loss plots, and the ablation comparison."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence

from pipeline.io import read_jsonl, write_text_atomic
from pipeline.metrics import METRIC_KEYS

TABLE_KEYS = ("ndcg@10", "mrr@10", "recall@100")
LABELS = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "recall@10": "Recall@10", "recall@100": "Recall@100",
          "recall@1000": "Recall@1000"}
# One colour per kind of model, the same in every plot.
COLOURS = {"bm25": "#8c8c8c", "dual-encoder": "#1f77b4", "colbert": "#2ca02c", "cross-encoder": "#ff7f0e",
           "teacher": "#9467bd"}


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


def stage_rows(results: dict[str, dict[str, dict[str, float]]]) -> list[tuple[str, dict[str, float]]]:
    """One row per (stage, model), in pipeline order: ``("distill / dual-encoder", metrics)``."""
    return [(f"{stage} / {model}", metrics) for stage, models in results.items() for model, metrics in models.items()]


def stage_table(results: dict[str, dict[str, dict[str, float]]], keys: Sequence[str] = TABLE_KEYS) -> str:
    """One row per (stage, model): the run's whole story in one table."""
    return metrics_table(stage_rows(results), keys).replace("| model |", "| stage / model |", 1)


def write_report(run_dir: Path, results: dict, stage_dirs: dict[str, Path], variant: str = "") -> None:
    """``report.md`` and ``report.html`` (metrics table, plots) and the PNG plots in the run directory."""
    suffix = f"-{variant}" if variant else ""
    title = f"Run {run_dir.name}" + (f", variant {variant}" if variant else "")
    plots = [run_dir / f"metrics{suffix}.png"]
    plot_metrics(results, plots[0], title)
    for stage, stage_dir in stage_dirs.items():
        log_path = stage_dir / "train_log.jsonl"
        if log_path.exists():
            plots.append(run_dir / f"loss-{stage}{suffix}.png")
            _plot_losses(read_jsonl(log_path), f"{stage} ({stage_dir.name})", plots[-1])
    folders = ", ".join(f"`{d.name}`" for d in stage_dirs.values())
    text = [f"# {title}", "", f"Stages: {folders}", "", stage_table(results), ""] + [f"![{p.name}]({p.name})" for p in plots]
    write_text_atomic(run_dir / f"report{suffix}.md", "\n".join(text) + "\n")
    body = [f"<p>Stages: {html.escape(folders.replace('`', ''))}</p>",
            html_table(stage_rows(results), TABLE_KEYS, "stage / model")] + [_html_image(p) for p in plots]
    write_text_atomic(run_dir / f"report{suffix}.html", html_page(title, body))


def write_ablation_report(run_dir: Path, results: dict[str, dict], switched_off: dict[str, list[str]], stage: str) -> str:
    """``ablation.md``, ``ablation.html`` and ``ablation.png``: every variant's ``stage`` models against the full run.

    ``results`` maps variant (``full`` first) to its ``{stage: {model: metrics}}``. Returns the markdown table.
    """
    full = results["full"][stage]
    lines = ["| variant / model | nDCG@10 | vs full | MRR@10 | Recall@100 |", "| --- | ---: | ---: | ---: | ---: |"]
    rows = []
    for variant, stages in results.items():
        for model, metrics in stages[stage].items():
            delta = metrics["ndcg@10"] - full[model]["ndcg@10"] if model in full else None
            shown = "-" if delta is None or variant == "full" else f"{delta:+.4f}"
            lines.append(f"| {variant} / {model} | {metrics['ndcg@10']:.4f} | {shown} | {metrics['mrr@10']:.4f} | "
                         f"{metrics['recall@100']:.4f} |")
            rows.append((f"{variant} / {model}", {**metrics, "vs full": delta if variant != "full" else None}))
    table = "\n".join(lines)
    off = "; ".join(f"{name}: {', '.join(terms)} off" for name, terms in switched_off.items())
    png = run_dir / "ablation.png"
    plot_ablation({variant: stages[stage] for variant, stages in results.items()}, png, f"Ablation, stage {stage}")
    write_text_atomic(run_dir / "ablation.md", f"# Ablation (stage {stage})\n\n{off}\n\n{table}\n\n![{png.name}]({png.name})\n")
    body = [f"<p>{html.escape(off)}</p>", html_table(rows, ("ndcg@10", "vs full", "mrr@10", "recall@100"), "variant / model"),
            _html_image(png)]
    write_text_atomic(run_dir / "ablation.html", html_page(f"Ablation (stage {stage})", body))
    return table


def html_table(rows: Sequence[tuple[str, dict]], keys: Sequence[str], first: str = "model") -> str:
    """An HTML table, numbers right-aligned; a missing value is ``-``, a difference carries its sign.

    >>> html_table([("bm25", {"ndcg@10": 0.5})], ["ndcg@10"])
    '<table><tr><th>model</th><th>nDCG@10</th></tr>\\n<tr><td>bm25</td><td class="n">0.5000</td></tr></table>'
    """
    def cell(key, value):
        if value is None:
            return '<td class="n">-</td>'
        return f'<td class="n">{value:+.4f}</td>' if key == "vs full" else f'<td class="n">{value:.4f}</td>'

    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in [first, *(LABELS.get(k, k) for k in keys)]) + "</tr>"
    body = ["<tr>" + f"<td>{html.escape(name)}</td>" + "".join(cell(k, metrics.get(k)) for k in keys) + "</tr>"
            for name, metrics in rows]
    return "<table>" + "\n".join([head, *body]) + "</table>"


def html_page(title: str, body: Sequence[str]) -> str:
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
             "th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;"
             "display:block;margin:1em 0}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head>\n<body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def _html_image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def model_kind(name: str) -> str:
    """The colour key of a model row: ``colbert (re-rank DE top 100)`` -> ``colbert``.

    >>> model_kind("cross-encoder (re-rank BM25 top 100)"), model_kind("dual-encoder (mining)")
    ('cross-encoder', 'dual-encoder')
    """
    return next((kind for kind in COLOURS if name.startswith(kind)), "dual-encoder")


def plot_metrics(results: dict[str, dict[str, dict[str, float]]], path: Path, title: str) -> None:
    """Horizontal bars, one row per (stage, model) grouped under bold stage names, one panel per
    metric, each value printed at the end of its bar; colours by kind of model."""
    plt = _pyplot()
    labels, kinds, rows, header = [], [], [], []  # rows: metrics, or None for a stage's header line
    for stage, models in results.items():
        if list(models) != [stage]:  # a stage of one model of its own name (bm25) needs no header
            labels.append(stage)
            header.append(True)
            rows.append(None)
            kinds.append(None)
        for model, metrics in models.items():
            labels.append(model if model == stage else "  " + model)
            header.append(False)
            rows.append(metrics)
            kinds.append(model_kind(model))
    keys = [k for k in TABLE_KEYS if any(m is not None and k in m for m in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 + 3.0 * len(keys), 0.9 + 0.3 * len(labels)), sharey=True,
                             squeeze=False)
    positions = list(range(len(labels)))
    for ax, key in zip(axes[0], keys):
        for y, metrics, kind in zip(positions, rows, kinds):
            if metrics is None:
                ax.axhspan(y - 0.5, y + 0.5, color="#f0f0f0", zorder=0)
            elif key in metrics:
                ax.barh(y, metrics[key], color=COLOURS[kind], height=0.7)
                ax.text(metrics[key] + 0.015, y, f"{metrics[key]:.3f}", va="center", fontsize=8)
            else:
                ax.text(0.015, y, "-", va="center", fontsize=8)
        ax.set(xlim=(0, 1.18), title=LABELS[key])
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.grid(axis="x", color="#dddddd", zorder=0)
        ax.set_axisbelow(True)
    axes[0][0].set_yticks(positions, labels, fontsize=8)
    axes[0][0].invert_yaxis()
    for tick, is_header in zip(axes[0][0].get_yticklabels(), header):
        tick.set_fontweight("bold" if is_header else "normal")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ablation(results: dict[str, dict[str, dict[str, float]]], path: Path, title: str,
                  key: str = "ndcg@10") -> None:
    """One panel per model of the compared stage, one bar per variant (the full run first, darker),
    each labelled with its value and its difference to the full run."""
    plt = _pyplot()
    variants = list(results)
    models = list(results[variants[0]])
    fig, axes = plt.subplots(len(models), 1, figsize=(8, 0.6 + (0.35 * len(variants) + 0.5) * len(models)),
                             squeeze=False)
    right = min(1.0, max(m[key] for per_model in results.values() for m in per_model.values())) + 0.25  # room for the notes
    for ax, model in zip(axes[:, 0], models):
        full = results[variants[0]][model][key]
        for y, variant in enumerate(variants):
            if model not in results[variant]:
                ax.text(full + 0.02, y, "not trained in this variant", va="center", fontsize=8, color="#666666")
                continue
            value = results[variant][model][key]
            ax.barh(y, value, color=COLOURS[model_kind(model)], alpha=1.0 if y == 0 else 0.55, height=0.7)
            note = f"{value:.3f}" if y == 0 else f"{value:.3f} ({value - full:+.3f})"
            ax.text(value + 0.01, y, note, va="center", fontsize=8)
        ax.axvline(full, color="#333333", linestyle="--", linewidth=0.8)
        ax.set_yticks(range(len(variants)), variants, fontsize=8)
        ax.invert_yaxis()
        ax.set(xlim=(0, right), title=f"{model}: {LABELS[key]}, difference to {variants[0]}")
        ax.title.set_fontsize(9)
        ax.grid(axis="x", color="#dddddd")
        ax.set_axisbelow(True)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_losses(records: list[dict], title: str, path: Path) -> None:
    plt = _pyplot()
    terms = [k for k in records[0] if k not in ("step", "epoch", "lr", "skipped_steps")] if records else []
    fig, ax = plt.subplots(figsize=(7, 4))
    for term in terms:
        ax.plot([r["step"] for r in records], [r[term] for r in records], label=term)
    ax.set(title=title, xlabel="optimizer step", ylabel="loss (unweighted)", yscale="log")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
