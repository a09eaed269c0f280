"""Pair two evaluations of the same queries: the nDCG@10 difference and its paired tests.

Each argument is a stage's ``eval/metrics.json`` (or a ``metrics.json`` written by
``run_pipeline.py evaluate``), which keeps every query's nDCG@10 for each model it evaluated. The
two files must hold the same queries. Prints one line per model the two files share (or only
``--model``): the means, the difference, the two-sided paired t-test and the randomization test,
as ``benchmarks/quality_scifact.py`` reports them. For example, the same stage trained in float32
and in bf16 (``run.mixed_precision``)::

    python benchmarks/compare_metrics.py runs/x/warmup-aaaa/eval/metrics.json runs/x/warmup-bbbb/eval/metrics.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.evaluate import PER_QUERY  # noqa: E402
from pipeline.significance import paired_t_test, randomization_test  # noqa: E402


def per_query(path: Path) -> dict[str, dict[str, float]]:
    """{model: {query id: nDCG@10}} of one metrics file; a clear error when it keeps none."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"error: {path}: not a readable metrics JSON ({error})")
    found = {model: values[PER_QUERY] for model, values in metrics.items()
             if isinstance(values, dict) and isinstance(values.get(PER_QUERY), dict)}
    if not found:
        raise SystemExit(f"error: {path}: no model with '{PER_QUERY}' (expected a stage's eval/metrics.json)")
    return found


def compare(a: dict[str, float], b: dict[str, float], trials: int = 20000) -> dict:
    """Means, difference (a - b) and both paired tests over the queries ``a`` and ``b`` share, which must be all."""
    if set(a) != set(b):
        raise ValueError(f"the two evaluations hold different queries ({len(set(a) ^ set(b))} not in both)")
    queries = sorted(a)
    x, y = [a[q] for q in queries], [b[q] for q in queries]
    difference, t, p = paired_t_test(x, y)
    return {"queries": len(queries), "a": sum(x) / len(x), "b": sum(y) / len(y), "difference": difference,
            "t": t, "p": p, "p_randomization": randomization_test(x, y, trials=trials, seed=0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="first eval/metrics.json")
    parser.add_argument("b", type=Path, help="second eval/metrics.json (the difference is a - b)")
    parser.add_argument("--model", default=None, help="only this model (e.g. dual-encoder; default: every shared one)")
    args = parser.parse_args(argv)
    a, b = per_query(args.a), per_query(args.b)
    models = [args.model] if args.model else [m for m in a if m in b]
    if not models or models[0] not in a or models[0] not in b:
        raise SystemExit(f"error: model {args.model or '(any)'} is not in both files ({sorted(a)} and {sorted(b)})")
    for model in models:
        try:
            r = compare(a[model], b[model])
        except ValueError as error:
            raise SystemExit(f"error: {model}: {error}")
        print(f"{model}: nDCG@10 {r['a']:.4f} - {r['b']:.4f} = {r['difference']:+.4f} over {r['queries']} queries; "
              f"paired t-test t = {r['t']:.2f}, p = {r['p']:.3g}; randomization p = {r['p_randomization']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
