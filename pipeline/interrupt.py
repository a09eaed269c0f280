"""Ctrl-C: stop at once, say where, and leave the run resumable.

The first SIGINT raises ``KeyboardInterrupt`` as usual and also sets a flag: a library that
catches the exception (in a finaliser, a callback, a worker) cannot make the run go on, because
the training loop and the stage loop check the flag. The second SIGINT exits the process at once,
whatever it is doing. Nothing is marked done on the way out: ``DONE.json`` is written only after a
stage has finished, and checkpoints are renamed into place only when complete.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

EXIT_STATUS = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C
_requested = threading.Event()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the stage and training step where it arrived (None where unknown)."""

    def __init__(self, stage: str | None = None, step: int | None = None):
        super().__init__(stage, step)
        self.stage, self.step = stage, step

    def __str__(self) -> str:
        """The line the command prints.

        >>> str(Interrupted("distill", 12))
        'interrupted during distill at step 12; rerun the same command to resume'
        >>> str(Interrupted())
        'interrupted before the first stage; rerun the same command to resume'
        """
        where = f" during {self.stage}" if self.stage else "" if self.step is not None else " before the first stage"
        at = "" if self.step is None else f" at step {self.step}"
        return f"interrupted{where}{at}; rerun the same command to resume"


def _first(signum, frame) -> None:
    _requested.set()
    signal.signal(signal.SIGINT, _second)
    raise KeyboardInterrupt


def _second(signum, frame) -> None:
    os.write(2, b"\ninterrupted again: exiting at once\n")
    os._exit(EXIT_STATUS)


@contextmanager
def handle_ctrl_c() -> Iterator[None]:
    """Inside the block, SIGINT behaves as this module describes; the previous handler is restored after it."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, _first)
    _requested.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested.clear()


def check() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C came and was swallowed on its way up."""
    if _requested.is_set():
        raise KeyboardInterrupt


@contextmanager
def located(stage: str | None = None, step: Callable[[], int] | None = None) -> Iterator[None]:
    """A Ctrl-C inside the block leaves as :class:`Interrupted`, knowing the stage and the current step."""
    try:
        yield
    except KeyboardInterrupt as e:
        inner = e if isinstance(e, Interrupted) else Interrupted()
        raise Interrupted(inner.stage or stage, inner.step if inner.step is not None else step and step()) from e
