"""User-facing input errors: one line that names the file, the line and what was expected."""

from __future__ import annotations

import os


class InputError(Exception):
    """Bad user input (data, config, paths). The CLI prints ``str(error)`` and exits with status 2.

    >>> str(InputError("what was expected", path="corpus.jsonl", line=3))
    'corpus.jsonl:3: what was expected'
    >>> str(InputError("no records", path="queries.jsonl"))
    'queries.jsonl: no records'
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        self.message, self.path, self.line = message, path, line
        where = "" if path is None else f"{os.fspath(path)}:{line}: " if line is not None else f"{os.fspath(path)}: "
        super().__init__(where + message)
