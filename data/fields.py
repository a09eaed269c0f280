"""Config fields that declare what they accept, next to their default.

``batch_size: int = bounded(32, ge=1)`` or ``pooling: str = one_of("mean", ("mean", "cls"))`` puts
the range or the choices in the field's metadata. :func:`check_fields` enforces them, and
:func:`describe` writes them for ``configs/demo.yaml``, ``--help`` and the README's table of
fields, so the checks and their documentation come from one place and cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import field
from typing import Any, Callable, Iterator, Sequence

from data.errors import InputError

Choices = Sequence[str] | Callable[[], Sequence[str]]  # a callable: read from a library when checked
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def bounded(default, *, ge=None, gt=None, le=None, lt=None, note: str = ""):
    """A number field and its range (bounds included with ``ge``/``le``, excluded with ``gt``/``lt``).

    ``note`` documents a limit that depends on other settings or on the data, checked elsewhere.
    """
    bounds = {k: v for k, v in {"gt": gt, "ge": ge, "lt": lt, "le": le}.items() if v is not None}
    return field(default=default, metadata={"bounds": bounds, "note": note})


def noted(default, note: str):
    """A field whose limit depends on other settings or on the data (checked elsewhere), documented."""
    return field(default=default, metadata={"note": note})


def one_of(default: str, choices: Choices, label: str = ""):
    """A string field that takes one of ``choices``; ``label`` stands for a long list in the documentation."""
    return field(default=default, metadata={"choices": choices, "label": label})


def listed(default: str, choices: Choices, item: str):
    """A comma-separated list of distinct ``item``s from ``choices``, at least one."""
    return field(default=default, metadata={"choices": choices, "listed": item})


def file_name(default: str, note: str = ""):
    """A non-empty name that is also a file or folder name: letters, digits, ``.``, ``_``, ``-``."""
    return field(default=default, metadata={"name": True, "note": note})


def nonempty(default: str):
    """A non-empty string (a path or a hub id)."""
    return field(default=default, metadata={"nonempty": True})


def _choices(metadata) -> tuple[str, ...]:
    choices = metadata["choices"]
    return tuple(choices() if callable(choices) else choices)


def choices(f: dataclasses.Field) -> tuple[str, ...]:
    """The values a choice field takes; empty for other fields."""
    return _choices(f.metadata) if "choices" in f.metadata else ()


def describe(f: dataclasses.Field) -> str:
    """What a field accepts, in words.

    >>> @dataclasses.dataclass
    ... class Example:
    ...     rate: float = bounded(0.1, gt=0, le=1)
    ...     kind: str = one_of("a", ("a", "b"))
    ...     size: int = bounded(8, ge=1, note="at most the corpus size")
    >>> [describe(f) for f in dataclasses.fields(Example)]
    ['> 0 and <= 1', 'one of a, b', '>= 1; at most the corpus size']
    """
    rule, note = _rule(f), f.metadata.get("note")
    return "; ".join(part for part in (rule, note) if part)


def _rule(f: dataclasses.Field) -> str:
    meta = f.metadata
    if "bounds" in meta:
        return " and ".join(f"{sign} {meta['bounds'][key]}" for key, sign in _BOUNDS if key in meta["bounds"])
    if meta.get("listed"):
        return "comma-separated, from " + ", ".join(_choices(meta))
    if "choices" in meta:
        return meta["label"] or "one of " + ", ".join(_choices(meta))
    if meta.get("name"):
        return "a name: letters, digits, . _ -"
    if meta.get("nonempty"):
        return "not empty"
    return ""


def _problem(f: dataclasses.Field, value: Any) -> str | None:
    """Why ``value`` is not accepted by ``f``, or None."""
    meta = f.metadata
    if "bounds" in meta:
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        within = {"gt": value > meta["bounds"].get("gt", -math.inf), "ge": value >= meta["bounds"].get("ge", -math.inf),
                  "lt": value < meta["bounds"].get("lt", math.inf), "le": value <= meta["bounds"].get("le", math.inf)}
        return None if all(within.values()) else f"must be {_rule(f)}, got {value}"
    if meta.get("listed"):
        items = [item.strip() for item in value.split(",") if item.strip()]
        allowed, kind = _choices(meta), meta["listed"]
        if not items:
            return f"no {kind} given (expected a comma-separated list from {', '.join(allowed)})"
        for item in items:
            if item not in allowed:
                return f"unknown {kind} {item!r} (known: {', '.join(allowed)})"
        repeated = sorted({item for item in items if items.count(item) > 1})
        return f"{kind} {repeated[0]!r} is listed twice" if repeated else None
    if "choices" in meta:
        allowed = _choices(meta)
        return None if value in allowed else f"expected one of {', '.join(allowed)}, got {value!r}"
    if meta.get("name") and not _NAME.fullmatch(value):
        return f"expected {_rule(f)} (not starting with . or -), got {value!r}"
    if meta.get("nonempty") and not value.strip():
        return "must not be empty"
    return None


def walk(config, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """``(dotted key, field, value)`` of every leaf field of a (nested) config dataclass, in order."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from walk(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


def check_fields(config, prefix: str = "") -> None:
    """Raise an :class:`InputError` naming the first field whose value its declaration does not accept.

    >>> @dataclasses.dataclass
    ... class Example:
    ...     batch_size: int = bounded(32, ge=1)
    >>> check_fields(Example(batch_size=0), "eval.")
    Traceback (most recent call last):
    ...
    data.errors.InputError: eval.batch_size: must be >= 1, got 0
    """
    for key, f, value in walk(config, prefix):
        problem = _problem(f, value)
        if problem:
            raise InputError(f"{key}: {problem}")
