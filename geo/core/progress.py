"""Progress bars for long work, and the detail only ``--verbose`` wants.

Every long loop (fusion's folds, the cell heads' and the gallery's epochs, a
benchmark, a multi-photo query) shows one tqdm bar on stderr: count, rate,
ETA and the loop's key metric as a postfix. Whether bars show is one setting
for the process, set by the command (``--quiet``) through :func:`showing`, so
the stages need no flag threaded through their signatures; per-epoch metric
lines, which used to flood the terminal, go through :func:`detail` and appear
only with ``--verbose``.

On a terminal a bar redraws itself in place. Elsewhere (a log file, CI, a pipe) the redraws would be
thousands of ``\r`` frames in one line, so a bar prints plain lines instead: one when it starts, then at most
one every :data:`LINE_EVERY_S` seconds (the count and the latest label), and one at the end.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from tqdm.auto import tqdm

_STATE: dict = {"bars": True, "verbose": False, "inside": None}


@contextmanager
def showing(bars: bool, verbose: bool = False) -> Iterator[None]:
    """Within the block, bars show when ``bars`` and detail lines when ``verbose``."""
    before = dict(_STATE)
    _STATE.update(bars=bars, verbose=verbose)
    try:
        yield
    finally:
        _STATE.update(before)


@contextmanager
def inside(outer: tqdm, label: Callable[[], str]) -> Iterator[None]:
    """Within the block, a bar asked for counts in ``outer``'s label instead of drawing its own: "fold 2/3: GPS
    gallery, gallery rounds 3/40". A long step of a long loop (fusion's folds fit every stage again) then shows
    it moves, where a bar of its own would bury the outer one and none would sit on one label for minutes."""
    before = _STATE["inside"]
    _STATE["inside"] = (outer, label)
    try:
        yield
    finally:
        _STATE["inside"] = before


class _Off:
    """A bar that shows nothing: what loops call on a bar, doing nothing. A disabled tqdm still costs 40 us to
    make (0.2 ms of a warm one-photo query, measured right after its forward pass)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Off":
        return self

    def __exit__(self, *_) -> None:
        pass


class _Inner(_Off):
    """A bar drawn as part of an outer bar's label (see :func:`inside`); what loops call on a bar."""

    def __init__(self, outer: tqdm, label: Callable[[], str], desc: str, total: int, initial: int):
        self.outer, self.label, self.desc, self.total, self.n, self.post = outer, label, desc, total, initial, ""

    def update(self, n: int = 1) -> None:
        self.n += n
        self._show()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.post = s
        self._show()

    def _show(self) -> None:
        name = self.desc.split(" (")[0]  # "gallery rounds (early stopping ends sooner)" -> "gallery rounds"
        text = f"{self.label()}, {name} {self.n}/{self.total}" + (f" ({self.post})" if self.post else "")
        self.outer.set_postfix_str(text)  # a LineBar prints it with its next due line


LINE_EVERY_S = 10.0
_LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}"


def verbose() -> bool:
    """Whether the command asked for detail (``--verbose``): also whether a library's own logs (Ray's) show."""
    return bool(_STATE["verbose"])


def bar(total: int, desc: str, unit: str = "it", initial: int = 0, show: bool = True) -> tqdm:
    """A bar on stderr (off when bars are off, or ``show`` is False): count, rate and ETA;
    ``set_postfix_str`` for the metric. Lines rather than a redrawn bar when stderr is not a terminal."""
    if not (show and _STATE["bars"]):
        return _Off()  # type: ignore[return-value]
    if _STATE["inside"] is not None:
        return _Inner(*_STATE["inside"], desc, total, initial)  # type: ignore[return-value]
    if not sys.stderr.isatty():
        return LineBar(total=total, initial=initial, desc=desc, unit=unit)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, smoothing=0.1, dynamic_ncols=True)


class _Sink:
    """Where tqdm's own ``\r`` frames and newlines go in line mode: nowhere (:class:`LineBar` writes its lines)."""

    def write(self, _: str) -> None:
        pass

    def flush(self) -> None:
        pass


class LineBar(tqdm):
    """A tqdm bar that prints whole lines on stderr, for logs and pipes (see the module docstring)."""

    def __init__(self, **kwargs) -> None:
        self._last, self._at = "", 0.0
        super().__init__(file=_Sink(), bar_format=_LINE_FORMAT, mininterval=LINE_EVERY_S, ascii=True, smoothing=0.1,
                         **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        text = self.__str__() if msg is None else msg
        if text.strip() and text != self._last:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            self._last, self._at = text, time.monotonic()
            self.last_print_t = self._time()  # tqdm's own clock for its next count line, whoever printed this one
        return True

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """A new label shows with the next line (at most one every :data:`LINE_EVERY_S`): a metric that changes
        every epoch would otherwise be a line per epoch."""
        super().set_postfix_str(s, refresh=False)
        if refresh:
            self.refresh_if_due()

    def refresh_if_due(self) -> None:
        """A line for the latest label at most every :data:`LINE_EVERY_S`."""
        if time.monotonic() - self._at >= LINE_EVERY_S:
            self.refresh()


def detail(log: Callable[[str], None], message: str) -> None:
    """A line only ``--verbose`` wants (per-epoch metrics)."""
    if verbose():
        log(message)
