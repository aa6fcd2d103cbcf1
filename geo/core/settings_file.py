"""A settings file a user hands to ``--config``: JSON, or TOML when its name ends in ``.toml``.

``geo build-index``, ``geo finetune`` and ``geo serve`` each take one. They read it the same way here, so the
formats, the size cap and the error that names the file behave alike everywhere; each command then checks the
keys against its own settings. TOML comes from the standard library from Python 3.11 on, from ``tomli`` before.
"""
from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path
from typing import Any

from geo.core.files import read_capped

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the CI interpreter is 3.11
    import tomli as tomllib

MAX_BYTES = 1 << 20  # a settings file is a few lines; a bigger one is a mistake


def read_settings_file(path: str | Path, error: type[ValueError] = ValueError) -> dict[str, Any]:
    """The table of settings in ``path``. A file that is missing, unreadable, malformed or not a table raises
    ``error`` (the calling command's own ValueError) with a message that starts with the file's name."""
    path = Path(path)
    toml = path.suffix.lower() == ".toml"
    try:
        text = read_capped(path, MAX_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:  # FileRefused (missing, not a regular file, too big) among them
        raise error(f"{path}: cannot read it ({getattr(e, 'reason', e)})") from None
    try:
        data = tomllib.loads(text) if toml else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"{path}: not valid {'TOML' if toml else 'JSON'} ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: must hold a table of settings (key = value), not {type(data).__name__}")
    return data


def unknown_setting(path: str | Path, key: str, known: list[str]) -> str:
    """The message for a key the command does not take: the nearest real one when a spelling is close (``-`` read
    as ``_``), and every key it takes."""
    near = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
    return (f"{path}: unknown setting {key!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
            + f"; known keys: {', '.join(known)}")
