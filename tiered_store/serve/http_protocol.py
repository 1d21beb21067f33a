"""uvicorn's h11 protocol with a deadline for each request's head, a JSON 503 when busy, a JSON
400 for a request h11 cannot parse, and an answer for a client that half-closed after its request.

uvicorn times a connection out only after an answer (``timeout_keep_alive``); one that opens and
sends nothing, or half a request head, is held for good, and ``server.max_connections`` of them
leave every other client a 503. Here a connection waiting for a request head (opened, or part of
one received) is closed once ``server.request_timeout_s`` passes without a whole head.

An answer given before the request's body was all in (a GET with a body, a POST refused 404, 405
or 415 unread, a 413 or 408) is marked ``Connection: close``: uvicorn kept such a connection
alive, dropping the body's bytes as they came, and each byte cancelled its keep-alive wait, so a
client sending one now and then held the connection for good. Such a connection lingers as
nginx's does: the answer is followed by a half-close, and what comes is read and dropped for up
to ``server.request_timeout_s`` (or 64 MiB) before the close. Closing with the client's bytes
unread makes the kernel reset the connection, and a client still sending (``http.client`` sends
the whole body before it reads) got the reset, not its answer. The 400 for a request h11 refuses
(a head without Host before a large body) lingers the same way.

Over ``limit_concurrency`` (``server.max_connections``) uvicorn answers a plain-text "Service
Unavailable" that the server's request counters never see; here the same limit marks the request
busy, and the app answers it: JSON like every other error of the server, naming the limit, and
counted. The metrics listener's connections and requests are not counted towards the limit
(they shared it: a scraper's kept connection, or a scrape in flight, took an endpoint client's
place), and the connections past it are
the ones accepted last (uvicorn refused whichever asked first: a client kept alive for long lost
its connection to one just opened).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import cut_text

__all__ = ["with_head_deadline"]

_MALFORMED = (
    "malformed HTTP request ({}); expected HTTP/1.1 with Content-Length or chunked transfer "
    "encoding, and a Host header"
)
_MALFORMED_1_0 = (  # HTTP/1.0 needs no Host header
    "malformed HTTP request ({}); expected HTTP/1.0 or HTTP/1.1 with Content-Length or chunked "
    "transfer encoding"
)
_VERSION = re.compile(rb" HTTP/(\d\.\d)\r?$")  # a request line's end
_LINE_BYTES = 65536  # how far a request line is looked for (h11 refuses longer heads)
_MALFORMED_WHERE = "its request line, a header or the body's framing"  # h11 gave no reason
_REASON_CHARS = 100  # the most of h11's reason (it may quote the request) a 400 repeats
_ENDED_MID_BODY = (
    "body: the client ended its stream before the whole body (its Content-Length, or its chunked "
    "encoding's last chunk) was sent; expected the whole body, then the end of the stream"
)
_CLOSE = (b"connection", b"close")
_LINGER_BYTES = 64 << 20  # the most of an unread body a closing connection reads and drops


def with_head_deadline(
    seconds: float,
    on_malformed: Callable[[], None] = lambda: None,
    exempt: Callable[[tuple[str, int] | None], bool] = lambda local: False,
) -> type[H11Protocol]:
    """An ``H11Protocol`` class (uvicorn's ``Config(http=...)``) that closes a connection whose
    request head has not arrived ``seconds`` after it began waiting for one, and marks requests
    over the config's ``limit_concurrency`` busy (the app answers them 503) instead of answering.
    A connection whose local ``(host, port)`` is ``exempt`` (the metrics listener's) is neither
    counted towards that limit (nor its requests) nor marked. A request h11 cannot parse is answered a JSON 400
    (uvicorn's was plain text), and ``on_malformed`` called to count it (no app sees it). An
    answer begun before the body was all in closes the connection, lingering up to ``seconds``
    to drop the rest of the body."""

    accepted = itertools.count()  # numbers the connections in the order they were accepted
    running: set[asyncio.Task] = set()  # the requests of counted connections, until they end

    class HeadDeadlineProtocol(H11Protocol):
        _raw_transport: asyncio.Transport  # uvicorn sees it as a _LingeringTransport
        _head_deadline: asyncio.TimerHandle | None = None
        _linger: asyncio.TimerHandle | None = None  # set while closing: the close's deadline
        _dropped = 0  # bytes read and dropped while lingering
        _client_ended = False  # the client shut its sending side
        _ended_mid_body = False  # ... before its request's body was all in
        _eof_pending = False  # ... with pipelined requests after the one in flight, unread yet
        counted = True  # towards limit_concurrency: not on an ``exempt`` listener
        opened = 0  # the connection's place in the order they were accepted

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            size = self.config.h11_max_incomplete_event_size  # None: h11's default (public)
            self.conn = _ReasonKeepingConnection(  # uvicorn's, but it keeps its refusal's reason
                h11.SERVER, **({} if size is None else {"max_incomplete_event_size": size})
            )
            limit, self.limit_concurrency = self.limit_concurrency, None  # uvicorn's: plain text
            if limit is not None:
                self.app = _marking_busy(self.app, limit, self, running)
            self.app = _closing_on_unread_body(self.app, self.conn)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._raw_transport = transport
            super().connection_made(_LingeringTransport(transport, self._close, self._closing))
            self.counted = not exempt(self.server)
            self.opened = next(accepted)
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            if self._linger is not None:  # closing: the rest of a body no one reads, dropped
                self._dropped += len(data)
                if self._dropped > _LINGER_BYTES:
                    self._raw_transport.close()
                return
            super().data_received(data)  # cancels the keep-alive wait: part of a head came
            self._watch_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_watching()
            if self._linger is not None:
                self._linger.cancel()
            super().connection_lost(exc)

        def eof_received(self) -> bool:  # type: ignore[override]
            """The client shut its sending side: answer the request in flight, then close
            (HTTP/1.1 lets a client half-close and read its answer; uvicorn's returned None,
            which closes the connection at once, the answer unsent). The request is counted as
            one whose client left (499): one that closed for good ends its stream the same way.
            One that ended it before its body was all in is answered a counted 400 at once.
            Requests pipelined after the one in flight are each answered so in turn, once their
            turn comes (``on_response_complete``)."""
            self._client_ended = True
            self._eof_pending = False
            if self.cycle is not None and not self.cycle.response_complete:
                if self.conn.their_state is h11.DONE and self.conn.trailing_data[0]:
                    self._eof_pending = True  # the end comes after them: keep the connection
                    self._mark_client_ended(self.cycle)
                    return True
                if self.conn.their_state is h11.SEND_BODY:  # its body can never be whole now:
                    self._ended_mid_body = True  # h11 refuses it, send_400_response answers
                    self.conn.receive_data(b"")  # at once (not request_timeout_s's 408 later)
                    self.handle_events()
                    return True
                self.cycle.keep_alive = False  # closed once the answer is written
                # counted 499 as nginx does: a client that closed looks the same until written to
                self._mark_client_ended(self.cycle)
                return True
            return False

        @staticmethod
        def _mark_client_ended(cycle: Any) -> None:
            """Say in the request's state that its client ended its stream, and wake a task
            waiting in its ``receive()`` to see it (a request waiting for a compute turn is then
            dropped: ``server.drop_abandoned``)."""
            cycle.scope.setdefault("state", {})["client_ended"] = True
            cycle.message_event.set()

        def on_response_complete(self) -> None:
            """uvicorn's (the next pipelined request, if any, begins); then, when the client
            ended its stream after pipelined requests, that end applies to the request now
            begun: answered as ``eof_received`` says, or the connection closed if none began."""
            super().on_response_complete()
            if self._eof_pending and not self.transport.is_closing() and not self.eof_received():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            """A JSON 400 for a request that is not HTTP/1.1 as h11 reads it, then close (lingering
            as ``_close`` does: the client may still be sending what followed). A request
            the app has (its body's framing broke) is the app's to count, as 400, and its own
            answer goes nowhere (sent after this one, it raised h11's LocalProtocolError)."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete:  # no app has this request
                on_malformed()
            else:
                cycle.scope.setdefault("state", {})["malformed"] = True
                cycle.disconnected = True  # what it sends is dropped; its body read ends
                cycle.message_event.set()
                if cycle.response_started:  # no room for a 400 in its answer
                    self.transport.close()
                    return
            reason = self.conn.refusal or _MALFORMED_WHERE
            malformed = _MALFORMED_1_0 if self.conn.request_version == b"1.0" else _MALFORMED
            error = _ENDED_MID_BODY if self._ended_mid_body else malformed.format(reason)
            body = json.dumps({"error": error}).encode() + b"\n"
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (
                h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
            self._close(unread=True)  # what follows a broken head is unread too

        def _close(self, unread: bool = False) -> None:
            """Close the connection, lingering first while the client may still send a body no
            one reads (``unread``: whatever it sends, after a request h11 refused)."""
            lingering = (
                (unread or self.conn.their_state is h11.SEND_BODY)
                and self._linger is None
                and not self._client_ended
                and not self._raw_transport.is_closing()
                and self._raw_transport.can_write_eof()
            )
            if not lingering:
                self._raw_transport.close()
                return
            self._raw_transport.write_eof()  # after the answer: the client sees its end
            self.flow.resume_reading()  # paused if the unread body filled uvicorn's buffer
            self._linger = self.loop.call_later(seconds, self._raw_transport.close)

        def _closing(self) -> bool:
            """Whether the connection is closed or closing (lingering counts)."""
            return self._linger is not None or self._raw_transport.is_closing()

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


class _ReasonKeepingConnection(h11.Connection):
    """An ``h11.Connection`` that keeps why it refused the peer's data (``refusal``: h11's
    reason, e.g. "Missing mandatory Host: header", cut to ``_REASON_CHARS``, its length said
    when cut) and the HTTP version of the request line it read last (``request_version``, e.g.
    b"1.0", whether or not h11 took that request)."""

    refusal: str | None = None
    request_version: bytes | None = None

    def next_event(self) -> Any:
        if self.their_state is h11.IDLE:  # a request head is next: its line's version, if in
            data = self.trailing_data[0]
            end = data.find(b"\n", 0, _LINE_BYTES)
            match = _VERSION.search(data, 0, end) if end >= 0 else None
            self.request_version = match.group(1) if match else None
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal = cut_text(str(exc), _REASON_CHARS) or None  # it may quote the request
            raise


class _LingeringTransport:
    """A transport as uvicorn sees it: ``close`` and ``is_closing`` the protocol's, all else
    its own."""

    def __init__(
        self, transport: asyncio.Transport, close: Callable[[], None], closing: Callable[[], bool]
    ) -> None:
        self._transport = transport
        self.close = close
        self.is_closing = closing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _closing_on_unread_body(app: Any, conn: h11.Connection) -> Any:
    """``app``, its answer marked ``Connection: close`` when begun before the body was all in."""

    async def closing(scope: dict, receive: Any, send: Any) -> None:
        async def send_closing(message: dict) -> None:
            if message["type"] == "http.response.start" and conn.their_state is h11.SEND_BODY:
                headers = list(message.get("headers", []))
                if _CLOSE not in headers:
                    message = {**message, "headers": [*headers, _CLOSE]}
            await send(message)

        await app(scope, receive, send_closing)

    return closing


def _marking_busy(app: Any, limit: int, protocol: H11Protocol, running: set) -> Any:
    """``app`` of ``protocol``'s connection, told in ``scope["state"]["busy"]`` when the
    connection is past ``limit``: ``limit`` counted connections (the metrics listener's are not)
    opened before it are still open, or more than ``limit`` requests of counted connections run
    (``running``, this one's task added; a scrape in flight took an endpoint request's place).
    uvicorn's test, ``>= limit`` connections open, refused every request at a limit of
    1, and past the limit whichever connection asked first (one kept alive for long, for one
    just opened). The app answers the 503 (``app._CountingMiddleware``: JSON, counted like every
    other answer)."""
    connections = protocol.connections

    async def marked(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and protocol.counted:
            task = asyncio.current_task()  # uvicorn's for this request
            if task is not None and task not in running:
                running.add(task)
                task.add_done_callback(running.discard)
            if max(len(connections), len(running)) > limit:
                counted = [c.opened for c in connections if c.counted]  # only near the limit
                older = sum(1 for opened in counted if opened < protocol.opened)
                if older >= limit or len(running) > limit:
                    scope.setdefault("state", {})["busy"] = (len(counted), len(running), limit)
        await app(scope, receive, send)

    return marked
