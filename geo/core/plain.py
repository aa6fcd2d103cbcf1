"""Plain JSON data: what every JSON output of geo (answers, reports, the server's bodies) is made into."""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def json_safe(o: Any) -> Any:
    """Copy with NaN as null and numpy scalars as Python ones (strict JSON has no NaN); dicts, lists and tuples
    are copied (tuples as lists, keys as strings), other leaves shared.

    The exact built-in types are tested first: an answer holds about a thousand values, most of them plain
    floats, strings and dicts, and this walk runs once per answer a server sends."""
    t = type(o)
    if t is str or t is int or t is bool or o is None:
        return o
    if t is float:
        return None if o != o else o
    if t is dict:
        return {k if type(k) is str else str(k): json_safe(v) for k, v in o.items()}
    if t is list or t is tuple:
        return [json_safe(v) for v in o]
    if isinstance(o, float):
        return None if math.isnan(o) else o
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, np.generic):
        return json_safe(o.item())
    return o
