"""A deadline on request headers: uvicorn's HTTP/1.1 protocol closes connections that never finish one.

uvicorn times out only idle keep-alive connections, and any byte resets that timer, so a client that
opens a socket and sends its headers one byte at a time (slow-loris) holds the socket forever. Here a
connection must complete each request's headers within ``read_timeout_s`` of opening (or of the previous
answer); the body has its own deadline in :class:`geo.serve.guard.Guard`.
"""
from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _HeaderDeadline(HttpToolsProtocol):
    """uvicorn's httptools protocol plus one timer, armed while the connection waits for a request's headers.

    httptools (llhttp, in C) rather than h11 (pure Python), with uvloop: the event loop's CPU a request under
    load went from 3.9 to 3.1-3.5 ms (benchmarks/RESULTS.md), CPU the model threads' cores get back."""

    header_timeout_s: float = 30.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:  # still no request: close, no answer owed
            self.transport.close()


def header_deadline_protocol(seconds: float) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn (``http=``) for a header deadline of ``seconds``."""
    return type("HeaderDeadlineHttpToolsProtocol", (_HeaderDeadline,), {"header_timeout_s": float(seconds)})
