"""The HTTP layer: a Starlette app (routes + one middleware) over an ``InferenceServer``.

Everything that knows about HTTP is here; uvicorn (``server``) does the sockets, the protocol
(h11), keep-alive, the connection cap and graceful shutdown. The app adds what is specific to
this API: JSON errors naming the field and the limit, a body read bounded in size and time
(413/408 before any parsing), the compute turn with a timeout (503 when busy), the mapping of
table faults to 503 without server paths, and the request counters behind ``/metrics``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import RowIdError, TableFormatError, TierIOError, cut_text
from .guarded_table import TableUnavailableError
from .inference_request import ClientGone, RequestError
from .served_model import RELOAD_CHECK_SECONDS, NonFiniteOutputError

if TYPE_CHECKING:
    from .server import InferenceServer

__all__ = ["GET_PATHS", "INFERENCE_PATH", "build_app", "json_response"]

log = logging.getLogger("tiered_store.serve")

INFERENCE_PATH = "/v1/engram"
GET_PATHS = ("/", "/healthz", "/stats", "/metrics")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # a listener bound to these takes every address
# Content-Types read as JSON: JSON itself, none, and what `curl -d` and plain clients send.
_BODY_TYPES = ("application/json", "", "text/plain", "application/x-www-form-urlencoded")
_ABSOLUTE_FORM = re.compile(rb"https?://([^/?#]*)", re.IGNORECASE)  # scheme and authority
# RFC 3986's host (reg-name, IPv4, or IP-literal) and port; empty: a target with no authority
_HOST = re.compile(
    rb"(?:\[[0-9A-Za-z:._~%!$&'()*+,;=-]+\]|[0-9A-Za-z._~%!$&'()*+,;=-]*)(?::[0-9]*)?"
)
_ECHO_CHARS = 100  # the most of a client's path or header an error message repeats
_CLIENT_GONE = 499  # recorded (never sent) when the client left, or ended its stream, before
# its answer (nginx's code: a client that half-closed is sent its answer all the same)


def _echo(text: str) -> str:
    """``text`` quoted for an error message, cut to ``_ECHO_CHARS`` (its length said when cut)."""
    return cut_text(text, _ECHO_CHARS, repr)


def json_response(status: int, doc: Any, headers: dict[str, str] | None = None) -> Response:
    """``doc`` as strict JSON (``allow_nan=False``: NaN and infinity are never sent)."""
    body = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode() + b"\n"
    return Response(body, status, headers, media_type="application/json")


def build_app(server: InferenceServer) -> ASGIApp:
    """The ASGI app of ``server``: its routes behind the counting middleware.

    Examples
    --------
    >>> from starlette.testclient import TestClient
    >>> client = TestClient(build_app(server))  # doctest: +SKIP
    >>> client.get("/healthz").json()  # doctest: +SKIP
    {'status': 'ok'}
    """

    async def infer(request: Request) -> Response:
        """POST /v1/engram: read the body within limits, compute in a worker, answer JSON."""
        received = time.perf_counter()
        try:
            body = await _read_body(request, server.config.server)
            doc, tokens = await _answer_while_watching(request, server, body)
        except ClientDisconnect:
            request.scope["state"]["gone"] = True
            return Response(status_code=400)  # goes nowhere: the client is gone
        except ClientGone:  # counted 499; a client that only half-closed reads why, and the
            request.scope["state"]["gone"] = True  # answers of the requests it pipelined after
            return json_response(503, {"error": _ABANDONED})
        except anyio.get_cancelled_exc_class():  # uvicorn's drain ran out: its 500, a traceback
            return json_response(503, {"error": _DRAIN_OVER}, {"Connection": "close"})
        except Exception as exc:  # every failure becomes a JSON answer; none escapes to uvicorn
            return _error_response(exc, request)
        if await request.is_disconnected():  # left while it was computed: uvicorn would drop
            request.scope["state"]["gone"] = True  # the answer without a word, counted 200
            return Response(status_code=400)  # goes nowhere
        doc["elapsed_ms"] = round((time.perf_counter() - received) * 1e3, 3)
        try:
            response = json_response(200, doc)
        except ValueError:  # a non-finite value slipped through: never send invalid JSON
            log.exception("answer is not valid JSON")
            return json_response(500, {"error": _INTERNAL})
        request.scope["state"]["tokens"] = tokens
        return response

    async def get(request: Request) -> Response:
        """GET /, /healthz, /stats and /metrics (the stores' statistics read in a thread: a
        slow one holds no other connection back; /healthz never waits, so on the loop)."""
        path = request.url.path
        if path == "/metrics":
            body, content_type = await anyio.to_thread.run_sync(server.metrics_text)
            return Response(body, 200, media_type=content_type)
        if path == "/stats":
            status, doc = await anyio.to_thread.run_sync(server.get, path)
        else:
            status, doc = server.get(path)
        return json_response(status, doc)

    async def http_error(request: Request, exc: Exception) -> Response:
        """Starlette's own 404/405 as JSON naming the path and what was expected."""
        assert isinstance(exc, HTTPException)
        path, method = request.url.path, request.method
        if exc.status_code == 404:
            known = ", ".join((*GET_PATHS, INFERENCE_PATH))
            return json_response(
                404, {"error": f"no endpoint {_echo(path)}; expected one of {known}"}
            )
        if exc.status_code == 405:
            allowed = "POST" if path == INFERENCE_PATH else "GET"
            return json_response(
                405,
                {
                    "error": f"{cut_text(method, _ECHO_CHARS)} {path}: method not allowed; "
                    f"expected {allowed}"
                },
                {"Allow": "POST" if allowed == "POST" else "GET, HEAD"},
            )
        return json_response(exc.status_code, {"error": exc.detail})

    routes = [Route(INFERENCE_PATH, infer, methods=["POST"])]
    routes += [Route(path, get, methods=["GET"]) for path in GET_PATHS]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.router.redirect_slashes = False  # '/v1/engram/' is unknown (404), not a redirect
    return _CountingMiddleware(app, server)


async def _answer_while_watching(
    request: Request, server: InferenceServer, body: bytes
) -> tuple[dict[str, Any], int]:
    """``server.answer(body)``; with ``server.drop_abandoned``, told when the client closes its
    connection or ends its stream (a request waiting for a compute turn then raises
    ``ClientGone``, not computed)."""
    if not server.config.server.drop_abandoned:
        return await server.answer(body)
    gone = anyio.Event()

    async def watch() -> None:
        state = request.scope["state"]
        while not state.get("client_ended"):  # woken by the protocol's eof_received
            if (await request.receive())["type"] == "http.disconnect":
                break
        gone.set()

    failed: Exception | None = None
    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        try:
            answered = await server.answer(body, gone)
        except Exception as exc:  # raised after the group: inside, an ExceptionGroup
            failed = exc
        group.cancel_scope.cancel()
    if failed is not None:
        raise failed
    return answered


_INTERNAL = "internal server error (details are in the server log)"
_ABANDONED = (
    "not computed: the client ended its stream, or closed, while the request waited for a "
    "compute turn (server.drop_abandoned); keep the connection open until the answer"
)
_FRAMED_TWICE = (
    "body: framed by both Transfer-Encoding and Content-Length; expected one of them (RFC 9112 6.3)"
)
_CHUNKED_1_0 = (
    "body: Transfer-Encoding in an HTTP/1.0 request; expected Content-Length (RFC 9112 6.1)"
)
_DRAIN_OVER = (
    "server shutting down: the request was still running when the drain ended "
    "(2 x server.request_timeout_s); retry it"
)


def _error_response(exc: Exception, request: Request) -> Response:
    """The JSON answer for a failed inference request (details of server faults only logged)."""
    if isinstance(exc, RequestError):
        headers = {"Allow": exc.allow} if exc.allow else {}
        if exc.status in (408, 413):  # the body was not read to its end: close the connection
            headers["Connection"] = "close"
        if exc.status == 503:  # busy (no compute turn in time): as the connection limit's 503
            headers["Retry-After"] = "1"
        return json_response(exc.status, {"error": exc.message}, headers)
    if isinstance(exc, RowIdError):  # ids the request checks let through but the model refused
        return json_response(400, {"error": str(exc)})
    if isinstance(exc, TableUnavailableError):  # counted and logged by the GuardedTable
        # closed until a reload: the version watch tries it again every RELOAD_CHECK_SECONDS
        retry = (
            {"Retry-After": f"{math.ceil(RELOAD_CHECK_SECONDS)}"} if exc.reason == "closed" else {}
        )
        return json_response(503, {"error": str(exc)}, retry)
    if isinstance(exc, (TierIOError, TableFormatError)):
        log.error("table fault serving %s: %s", request.url.path, exc)
        return json_response(503, {"error": "table data unavailable (see the server log)"})
    if isinstance(exc, NonFiniteOutputError):
        log.error("refused to answer: %s", exc)
        return json_response(
            503, {"error": "model output unavailable: non-finite values (see the server log)"}
        )
    log.exception("error handling %s %s", request.method, request.url.path)
    return json_response(500, {"error": _INTERNAL})


async def _read_body(request: Request, limits: Any) -> bytes:
    """The request body: Content-Type and Content-Encoding (415), size (413, before and while
    reading), and a client that stalls mid-body (408 after ``request_timeout_s``)."""
    content_type = request.headers.get("content-type", "application/json")
    if content_type.split(";", 1)[0].strip().lower() not in _BODY_TYPES:
        sent = content_type.encode("latin-1")  # as sent: Starlette decodes headers as Latin-1
        try:
            shown = _echo(sent.decode("utf-8"))
        except UnicodeDecodeError:  # not UTF-8: its bytes (b'text/\xff'), each one named once
            shown = cut_text(sent, _ECHO_CHARS, repr)
        raise RequestError(415, f"Content-Type: got {shown}; expected application/json")
    coding = ", ".join(request.headers.getlist("content-encoding"))  # its lines: one list
    if any(c.strip().lower() not in ("", "identity") for c in coding.split(",")):  # not decoded
        raise RequestError(415, f"Content-Encoding: got {_echo(coding)}; expected none (identity)")
    limit = limits.max_body_bytes
    announced = request.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > limit:
        raise RequestError(
            413,
            f"body: {int(announced):,} bytes; this server takes at most {limit:,} (server.max_body_bytes)",
        )
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(limits.request_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(
                        413,
                        f"body: more than {limit:,} bytes; this server takes at most {limit:,} "
                        "(server.max_body_bytes)",
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(
            408,
            f"body: {size:,} bytes received in server.request_timeout_s "
            f"({limits.request_timeout_s:g} s), the time the whole body may take; send all of it "
            "sooner",
        ) from None
    return b"".join(chunks)


def _origin_form(scope: Scope) -> None:
    """Make an absolute-form request (``GET http://host:port/healthz``, which RFC 9112 3.2.2 says
    a server must accept) one for its path, its Host header the target's authority."""
    match = _ABSOLUTE_FORM.match(scope["raw_path"])
    if match is None:
        return
    authority = match.group(1)
    if not authority:  # RFC 9110 4.2.1 and 4.2.4: refused, not guessed
        why = "no host"
    elif b"@" in authority:
        why = "user information in its authority"
    elif not _HOST.fullmatch(authority):  # else named as a bad Host header the client never sent
        why = f"its authority {_echo(authority.decode('ascii', 'backslashreplace'))} is no host[:port]"
    else:
        raw_path = scope["raw_path"][match.end() :] or b"/"
        scope["raw_path"], scope["path"] = raw_path, unquote(raw_path.decode("ascii"))  # as uvicorn
        headers = [(name, value) for name, value in scope["headers"] if name != b"host"]
        scope["headers"] = [*headers, (b"host", authority)]
        return
    target = scope["raw_path"].decode("ascii", "backslashreplace")
    scope.setdefault("state", {})["bad_target"] = (
        f"request target {_echo(target)}: {why}; expected http://host[:port]/path, or /path"
    )
    raw_path = scope["raw_path"][match.end() :] or b"/"
    scope["raw_path"], scope["path"] = raw_path, unquote(raw_path.decode("ascii"))  # as uvicorn
    headers = [(name, value) for name, value in scope["headers"] if name != b"host"]
    scope["headers"] = [*headers, (b"host", match.group(1))]


def _not_a_path(scope: Scope) -> Response:
    """The answer to a request whose target is no path (nor absolute-form): ``OPTIONS *`` (the
    server in general, RFC 9110 9.3.7) 204 with the server's methods, ``CONNECT host:port`` 501
    (no proxy here), any other 400 naming the target."""
    target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
    shown = _echo(target.decode("ascii", "backslashreplace"))
    if scope["method"] == "OPTIONS" and target == b"*":
        return Response(status_code=204, headers={"Allow": "GET, HEAD, POST"})
    if scope["method"] == "CONNECT":
        known = ", ".join((*GET_PATHS, INFERENCE_PATH))
        return json_response(
            501,
            {
                "error": f"CONNECT {shown}: not supported (this server is no proxy); expected GET "
                f"or POST of a path, one of {known}"
            },
        )
    return json_response(
        400,
        {
            "error": f"request target {shown}: not a path; expected /path, or "
            "http://host[:port]/path (or * with OPTIONS)"
        },
    )


class _CountingMiddleware:
    """Counts every request (handler, code, duration, in flight), checks the HTTP version, and
    keeps the metrics listener to ``/metrics``."""

    def __init__(self, app: ASGIApp, server: InferenceServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, send)
            return
        _origin_form(scope)
        path = scope["path"]
        handler = path if path in (*GET_PATHS, INFERENCE_PATH) else "other"
        state = scope.setdefault("state", {})
        state.update(status=500, tokens=0, gone=False)
        counters = self.server.requests
        counters.begin()
        start = time.perf_counter()

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        try:
            problem = self._refuse(scope)
            if problem is not None:
                await problem(scope, receive, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        except OSError:  # the connection broke while answering: nothing to log but the count
            state["gone"] = True
        except Exception:
            log.exception("unhandled error serving %s %s", scope["method"], path)
            state["status"] = 500
        finally:
            code = _CLIENT_GONE if state["gone"] or state.get("client_ended") else state["status"]
            if state.get("malformed"):  # its body's framing broke: the protocol answered 400
                code = 400
            tokens = state["tokens"] if code == 200 else 0  # served: answered 200 (not 499)
            counters.end(handler, code, time.perf_counter() - start, tokens)

    def _refuse(self, scope: Scope) -> Response | None:
        """A 400 for HTTP versions other than 1.0/1.1 (first: nothing else of such a request is
        read), a 400 for an absolute-form target without a host or with user information, the
        answer to a target that is no path (``_not_a_path``), a 503 while the server is past
        ``server.max_connections`` (``http_protocol``; never on the metrics listener, whose
        connections it does not count: a scrape is answered while the endpoint's connections
        are all taken), a 400 for a Host header that is no host[:port], a 400 (closing) for a
        body framed by both Transfer-Encoding and Content-Length or by Transfer-Encoding in
        HTTP/1.0, a 404 for paths the metrics listener does not serve; ``None`` to go on."""
        version = scope.get("http_version", "1.1")
        if version not in ("1.0", "1.1"):
            return json_response(
                400,
                {"error": f"HTTP/{version}: not supported; expected HTTP/1.0 or HTTP/1.1"},
                {"Connection": "close"},
            )
        if (bad_target := scope["state"].get("bad_target")) is not None:
            return json_response(400, {"error": bad_target})
        if not scope["raw_path"].startswith(b"/"):
            return _not_a_path(scope)
        busy = scope["state"].get("busy")
        if busy is not None:
            connections, requests, limit = busy
            log.warning("busy: %d connections, %d requests open (server.max_connections %d)",
                        connections, requests, limit)  # fmt: skip
            over = (  # by the requests running (a client that left may have one), or connections
                f"{requests} requests running (those of clients gone included)"
                if requests > limit
                else f"{connections} connections open"
            )
            return json_response(
                503,
                {
                    "error": f"server busy: {over}, the limit (server.max_connections) is {limit}; "
                    "retry later"
                },
                {"Connection": "close", "Retry-After": "1"},
            )
        host = next((value for name, value in scope["headers"] if name == b"host"), b"")
        if not _HOST.fullmatch(host):  # RFC 9112 3.2: an invalid Host MUST get 400
            shown = _echo(host.decode("latin-1"))  # as Starlette decodes headers
            return json_response(
                400,
                {
                    "error": f"Host header: got {shown}; expected host[:port] (a name, an IPv4 "
                    "address or an [IPv6] one, RFC 9112 3.2)"
                },
            )
        names = {name for name, _ in scope["headers"]}
        if {b"transfer-encoding", b"content-length"} <= names:  # request smuggling: no guess
            return json_response(400, {"error": _FRAMED_TWICE}, {"Connection": "close"})
        if b"transfer-encoding" in names and version == "1.0":  # a 1.0 hop passed chunks on
            return json_response(400, {"error": _CHUNKED_1_0}, {"Connection": "close"})
        if self.server.on_metrics_listener(scope.get("server")) and scope["path"] != "/metrics":
            return json_response(
                404,
                {
                    "error": f"no endpoint {_echo(scope['path'])} on the metrics listener; expected /metrics"
                },
            )
        return None
