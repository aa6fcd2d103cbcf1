"""Progress bars for long work, and the detail only ``--verbose`` wants.

Every long loop (fusion's folds, the cell heads' and the gallery's epochs, a
benchmark, a multi-photo query) shows one tqdm bar on stderr: count, rate,
ETA and the loop's key metric as a postfix. Whether bars show is one setting
for the process, set by the command (``--quiet``) through :func:`showing`, so
the stages need no flag threaded through their signatures; per-epoch metric
lines, which used to flood the terminal, go through :func:`detail` and appear
only with ``--verbose``.

On a terminal a bar redraws itself in place. Elsewhere (a log file, CI, a pipe) the redraws would be
thousands of ``\r`` frames in one line, so a bar prints plain lines instead: one when it starts, one whenever
its label (postfix) changes, at most one every :data:`LINE_EVERY_S` seconds for the count, and one at the end.
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


LINE_EVERY_S = 10.0
_LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}"


def verbose() -> bool:
    """Whether the command asked for detail (``--verbose``): also whether a library's own logs (Ray's) show."""
    return bool(_STATE["verbose"])


def bar(total: int, desc: str, unit: str = "it", initial: int = 0, show: bool = True) -> tqdm:
    """A bar on stderr (off when bars are off, or ``show`` is False): count, rate and ETA;
    ``set_postfix_str`` for the metric. Lines rather than a redrawn bar when stderr is not a terminal."""
    disable = not (show and _STATE["bars"])
    if not sys.stderr.isatty():
        return LineBar(total=total, initial=initial, desc=desc, unit=unit, disable=disable)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=sys.stderr, smoothing=0.1,
                dynamic_ncols=True)


class _Sink:
    """Where tqdm's own ``\r`` frames and newlines go in line mode: nowhere (:class:`LineBar` writes its lines)."""

    def write(self, _: str) -> None:
        pass

    def flush(self) -> None:
        pass


class LineBar(tqdm):
    """A tqdm bar that prints whole lines on stderr, for logs and pipes (see the module docstring)."""

    def __init__(self, **kwargs) -> None:
        self._last = ""
        super().__init__(file=_Sink(), bar_format=_LINE_FORMAT, mininterval=LINE_EVERY_S, ascii=True, smoothing=0.1,
                         **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        text = self.__str__() if msg is None else msg
        if text.strip() and text != self._last:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            self._last = text
        return True


def detail(log: Callable[[str], None], message: str) -> None:
    """A line only ``--verbose`` wants (per-epoch metrics)."""
    if verbose():
        log(message)
