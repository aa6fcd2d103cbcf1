"""The shape of a stage's JSON file, checked when the stage loads it.

A stage file is hashed in the manifest, but a hash only says the file is the one recorded: an edited file with
its sha256 updated, or a bundle written by hand, must still be refused with the file and the field, never
read as whatever it happens to hold (a ``fusion.json`` of ``{"weights": "x"}`` answered as before).

A spec is plain data:

* a type, or a tuple of types: the value is an instance (``bool`` is never an ``int``; ``float`` is any finite
  number, an ``int`` included; ``object`` is anything);
* a dict: the value is a JSON object with those keys; ``"key?"`` may be absent, ``"*"`` gives the spec of every
  other key (without it, other keys are allowed and not looked at);
* a one-item list: a JSON array whose every item has that spec.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from geo.store.bundle import BundleError, read_json

Spec = Any


def checked(value: Any, spec: Spec, path: str | os.PathLike, field: str = "") -> Any:
    """``value`` when it has the shape ``spec``, else a :class:`BundleError` naming ``path`` and the field."""
    problem = _problem(value, spec, field)
    if problem is not None:
        where, what = problem
        raise BundleError(f"{path}: field {where or '(top level)'!r} {what}")
    return value


def read_checked(path: str | os.PathLike, spec: Spec) -> Any:
    """A stage's JSON file, read (size-capped, regular files only) and checked against ``spec``."""
    return checked(read_json(path), spec, Path(path))


def _problem(value: Any, spec: Spec, field: str) -> tuple[str, str] | None:
    """(the first field that does not fit, why), or None."""
    if isinstance(spec, dict):
        return _object_problem(value, spec, field)
    if isinstance(spec, list):
        if not isinstance(value, list):
            return field, f"is {_kind(value)}, not a list"
        return next((p for i, v in enumerate(value) if (p := _problem(v, spec[0], f"{field}[{i}]"))), None)
    kinds = spec if isinstance(spec, tuple) else (spec,)
    if object in kinds or any(_is(value, k) for k in kinds):
        return None
    return field, f"is {_kind(value)}, not {' or '.join(_name(k) for k in kinds)}"


def _object_problem(value: Any, spec: dict, field: str) -> tuple[str, str] | None:
    if not isinstance(value, dict):
        return field, f"is {_kind(value)}, not a JSON object"
    named = {k.rstrip("?"): s for k, s in spec.items() if k != "*"}
    for key, sub in named.items():
        inner = f"{field}.{key}" if field else key
        if key not in value:
            if f"{key}?" not in spec:
                return inner, "is missing"
            continue
        if (p := _problem(value[key], sub, inner)) is not None:
            return p
    if "*" in spec:
        for key, v in value.items():
            if key not in named and (p := _problem(v, spec["*"], f"{field}.{key}" if field else key)) is not None:
                return p
    return None


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def _name(kind: type) -> str:
    return {float: "a finite number", int: "an integer", str: "text", bool: "true or false", dict: "a JSON object",
            list: "a list", type(None): "null"}.get(kind, kind.__name__)


def _kind(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown[:40]}{'...' if len(shown) > 40 else ''}"
