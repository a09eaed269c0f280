"""Crash-safe writes: everything lands under a temporary name first and is renamed into place."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a staging folder that replaces ``path`` only once the block has finished.

    A crash inside the block leaves ``path`` as it was (or absent), never half-written.
    """
    staging = path.with_name(f".{path.name}.tmp")
    remove_tree(staging)
    staging.mkdir(parents=True)
    yield staging
    remove_tree(path)
    os.replace(staging, path)


def remove_tree(path: Path) -> None:
    """Delete a folder by renaming it away first, so a crash never leaves it half-deleted in place."""
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed)
