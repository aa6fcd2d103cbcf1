"""Progress bars for long work, and the detail only ``--verbose`` wants.

Every long loop (fusion's folds, the cell heads' and the gallery's epochs, a
benchmark, a multi-photo query) shows one tqdm bar on stderr: count, rate,
ETA and the loop's key metric as a postfix. Whether bars show is one setting
for the process, set by the command (``--quiet``) through :func:`showing`, so
the stages need no flag threaded through their signatures; per-epoch metric
lines, which used to flood the terminal, go through :func:`detail` and appear
only with ``--verbose``.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from tqdm.auto import tqdm

_STATE = {"bars": True, "verbose": False}


@contextmanager
def showing(bars: bool, verbose: bool = False) -> Iterator[None]:
    """Within the block, bars show when ``bars`` and detail lines when ``verbose``."""
    before = dict(_STATE)
    _STATE.update(bars=bars, verbose=verbose)
    try:
        yield
    finally:
        _STATE.update(before)


def bar(total: int, desc: str, unit: str = "it", initial: int = 0, show: bool = True) -> tqdm:
    """A bar on stderr (off when bars are off, or ``show`` is False): count, rate and ETA;
    ``set_postfix_str`` for the metric."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not (show and _STATE["bars"]),
                file=sys.stderr, smoothing=0.1, dynamic_ncols=True)


def detail(log: Callable[[str], None], message: str) -> None:
    """A line only ``--verbose`` wants (per-epoch metrics)."""
    if _STATE["verbose"]:
        log(message)
