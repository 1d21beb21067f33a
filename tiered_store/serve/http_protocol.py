"""uvicorn's h11 protocol with a deadline for each request's head, a JSON 503 when busy, a JSON
400 for a request h11 cannot parse, and an answer for a client that half-closed after its request.

uvicorn times a connection out only after an answer (``timeout_keep_alive``); one that opens and
sends nothing, or half a request head, is held for good, and ``server.max_connections`` of them
leave every other client a 503. Here a connection waiting for a request head (opened, or part of
one received) is closed once ``server.request_timeout_s`` passes without a whole head.

Over ``limit_concurrency`` (``server.max_connections``) uvicorn answers a plain-text "Service
Unavailable" that the server's request counters never see; here the same limit marks the request
busy, and the app answers it: JSON like every other error of the server, naming the limit, and
counted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["with_head_deadline"]

_MALFORMED = (
    "malformed HTTP request (its request line, a header or the body's framing); expected "
    "HTTP/1.1 with Content-Length or chunked transfer encoding"
)


def with_head_deadline(
    seconds: float, on_malformed: Callable[[], None] = lambda: None
) -> type[H11Protocol]:
    """An ``H11Protocol`` class (uvicorn's ``Config(http=...)``) that closes a connection whose
    request head has not arrived ``seconds`` after it began waiting for one, and marks requests
    over the config's ``limit_concurrency`` busy (the app answers them 503) instead of answering.
    A request h11 cannot parse is answered a JSON 400 (uvicorn's was plain text), and
    ``on_malformed`` called to count it (no app sees it)."""

    class HeadDeadlineProtocol(H11Protocol):
        _head_deadline: asyncio.TimerHandle | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            limit, self.limit_concurrency = self.limit_concurrency, None  # uvicorn's: plain text
            if limit is not None:
                self.app = _marking_busy(self.app, limit, self.connections, self.tasks)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)  # cancels the keep-alive wait: part of a head came
            self._watch_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_watching()
            super().connection_lost(exc)

        def eof_received(self) -> bool:  # type: ignore[override]
            """The client shut its sending side: answer the request in flight, then close
            (HTTP/1.1 lets a client half-close and read its answer; uvicorn's returned None,
            which closes the connection at once, the answer unsent). The request is counted as
            one whose client left (499): one that closed for good ends its stream the same way."""
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False  # closed once the answer is written
                # counted 499 as nginx does: a client that closed looks the same until written to
                self.cycle.scope.setdefault("state", {})["client_ended"] = True
                return True
            return False

        def send_400_response(self, msg: str) -> None:
            """A JSON 400 for a request that is not HTTP/1.1 as h11 reads it, then close."""
            on_malformed()
            body = json.dumps({"error": _MALFORMED}).encode() + b"\n"
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (
                h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _watch_head(self) -> None:
            """Arm the deadline while a head is awaited with no keep-alive wait running (that
            one times out an idle connection after an answer); drop it once a head came."""
            waiting = self.conn.their_state is h11.IDLE and self.timeout_keep_alive_task is None
            if not waiting:
                self._stop_watching()
            elif self._head_deadline is None:
                self._head_deadline = self.loop.call_later(seconds, self._head_too_late)

        def _stop_watching(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_too_late(self) -> None:
            self._head_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadlineProtocol


def _marking_busy(app: Any, limit: int, connections: set, tasks: set) -> Any:
    """``app``, told in ``scope["state"]["busy"]`` when ``limit`` connections are open or more
    than ``limit`` requests run (this one's task counted): uvicorn's test. The app answers the 503
    (``app._CountingMiddleware``: JSON, counted like every other answer)."""

    async def marked(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (len(connections) >= limit or len(tasks) > limit):
            scope.setdefault("state", {})["busy"] = (len(connections), len(tasks), limit)
        await app(scope, receive, send)

    return marked
