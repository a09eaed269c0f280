"""One run at a time per run folder: an advisory lock on ``<run dir>/.lock``, held for the whole run.

The lock is ``flock`` on an open file, so the kernel drops it when its process ends, however it
ends: the lock of a killed run is stale at once and the next run takes it over. The file keeps the
holder's pid, host and start time, for the message the second run prints. Re-entrant within a
process (an ablation runs every variant in the same folder).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from data.errors import InputError

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # run folder -> times taken in this process


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock inside the block; :class:`InputError` if another run holds it."""
    folder = Path(run_dir).resolve()
    if folder in _held:
        _held[folder] += 1
        try:
            yield
        finally:
            _held[folder] -= 1
        return
    path = folder / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = (handle.read().strip().splitlines() or ["another process"])[0]
        handle.close()
        raise InputError(f"another run is using this folder ({holder}); wait for it to finish, or use another "
                         "run.name", run_dir) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _held[folder] = 1
    try:
        yield
    finally:
        del _held[folder]
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
