#!/usr/bin/env python
"""How far each cached teacher of a run folder is from the student that mined its negatives.

For every finished ``scores`` stage that scored the negatives of a ``refresh`` stage (its
``DONE.json`` names that stage's hash), the Spearman correlation, per training query with more
than 3 scored negatives, between the order in which the student ranked its mined negatives (the
``refresh`` list is in the student's order, best first) and the teacher's scores of the same
negatives; the mean and median over queries. Stages that scored BM25's negatives are skipped.
1 means the teacher only repeats the student's order of its hard negatives; near 0, the teacher
ranks them its own way. Reads files only (no model, no data).

    python benchmarks/teacher_agreement.py runs/quality_scifact_cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.run import NEGATIVES_FILE, TEACHER_SCORES_FILE, read_negatives  # noqa: E402
from pipeline.stages.common import read_teacher_scores  # noqa: E402


def agreement(negatives: dict[str, list[str]], teacher: dict[str, dict[str, float]]) -> list[float]:
    """Per query: Spearman(student's rank of its negatives, teacher's scores of them), queries with > 3 scored.

    >>> agreement({"q": ["a", "b", "c", "d"]}, {"q": {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}})
    [1.0]
    """
    out = []
    for query, docs in negatives.items():
        scores = [teacher[query][d] for d in docs if d in teacher.get(query, {})]
        if len(scores) > 3 and np.ptp(scores) > 0:  # a teacher that scores them all alike has no order
            out.append(float(spearmanr(np.arange(len(scores)), -np.asarray(scores)).correlation))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder holding refresh-*/ and scores-*/ stages")
    args = parser.parse_args(argv)
    reported = 0
    for path in sorted(args.run_dir.glob(f"scores-*/final/{TEACHER_SCORES_FILE}")):
        stage = path.parents[1]
        refresh_hash = json.loads((stage / "DONE.json").read_text()).get("inputs", {}).get("negatives")
        if not refresh_hash:
            continue  # the teacher scored BM25's negatives: no student order to compare with
        mined = args.run_dir / f"refresh-{refresh_hash[:8]}" / "final" / NEGATIVES_FILE
        negatives, teacher = read_negatives(mined), read_teacher_scores(path)
        metrics = json.loads((stage / "eval" / "metrics.json").read_text())
        values = agreement(negatives, teacher)
        print(f"{stage.name} (negatives of {mined.parents[1].name}): {next(iter(metrics))}: Spearman with the "
              f"student's order over {len(values)} queries: mean {np.mean(values):.3f}, median {np.median(values):.3f}")
        reported += 1
    if not reported:
        parser.error(f"{args.run_dir}: no finished scores stage that scored a refresh stage's negatives")
    return 0


if __name__ == "__main__":
    sys.exit(main())
