"""Which code produced a results file: the short commit, with ``+changes`` when tracked files differ."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_version() -> str:
    """``git rev-parse --short HEAD``, ``+changes`` if the work tree is dirty, ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line(script: str, argv: list[str] | None = None) -> str:
    """``python <script> <args>`` as run (``argv``: default this process's arguments), absolute paths shown
    relative to the repository (else by file name), so a results file names no machine's folders.

    >>> out = str(ROOT / "benchmarks" / "results" / "a.json")
    >>> command_line("benchmarks/x.py", ["--out", out, "--work-dir", "/scratch/runs"])
    'python benchmarks/x.py --out benchmarks/results/a.json --work-dir runs'
    """
    def shown(arg: str) -> str:
        if not arg.startswith("/"):
            return arg
        path = Path(arg)
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    return " ".join(["python", script, *map(shown, sys.argv[1:] if argv is None else argv)])
