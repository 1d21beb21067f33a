"""The HTTP transport (``http.server``): routes requests to an ``InferenceServer`` and answers JSON.

Self-contained on purpose: everything that knows about HTTP requests, sockets and status lines is
here, so another transport (an ASGI app) can replace this module without touching the server.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from ..errors import RowIdError, TierIOError
from .inference_request import RequestError

if TYPE_CHECKING:
    from .server import InferenceServer

__all__ = ["GET_PATHS", "INFERENCE_PATH", "DrainingHTTPServer", "bind_http_server", "http_url"]

log = logging.getLogger("tiered_store.serve")

INFERENCE_PATH = "/v1/engram"
GET_PATHS = ("/", "/healthz", "/stats", "/metrics")
# Content-Types read as JSON: JSON itself, none, and what `curl -d` and plain clients send.
_BODY_TYPES = ("application/json", "", "text/plain", "application/x-www-form-urlencoded")


class DrainingHTTPServer(ThreadingHTTPServer):
    """Threads per request, joined on close (so in-flight requests finish before exit)."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], app: InferenceServer
    ) -> None:
        self.app = app  # what every request is routed to
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log an error that escaped a handler thread, without dumping it to stderr raw."""
        log.exception("unhandled error serving %s", client_address)


class _DrainingHTTPServer6(DrainingHTTPServer):
    """The same over IPv6."""

    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the ``InferenceServer``; every answer is JSON (or metrics text)."""

    server: DrainingHTTPServer
    server_version = "tiered-store"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection: shutdown never waits on idle ones

    def setup(self) -> None:
        """Apply ``server.request_timeout_s`` to the connection's socket."""
        self.timeout = self.server.app.config.server.request_timeout_s
        super().setup()

    # Every method goes through _dispatch, which answers 404/405 for the wrong path or method.

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        """Route, answer, count; client mistakes get 4xx, anything else a generic 5xx."""
        app = self.server.app
        path = self.path.split("?", 1)[0]
        handler = path if path in (*GET_PATHS, INFERENCE_PATH) else "other"
        start = time.perf_counter()
        app.requests.begin()
        self._responded = False
        code, tokens = 500, 0
        try:
            code, tokens = self._route(app, method, path)
        except RequestError as exc:
            code = exc.status
            extra = {"Allow": exc.allow} if exc.allow else {}
            self._send_json(code, {"error": exc.message}, extra)
        except RowIdError as exc:  # ids the request checks let through but the hasher refused
            code = 400
            self._send_json(code, {"error": str(exc)})
        except (BrokenPipeError, ConnectionResetError):
            code = 499  # the client went away; nothing to answer
        except TierIOError as exc:
            log.error("cold tier read failed: %s", exc)
            code = 503
            self._send_json(code, {"error": f"cold tier read failed: {exc}"})
        except Exception:
            log.exception("error handling %s %s", method, path)
            code = 500
            self._send_json(
                code, {"error": "internal server error (details are in the server log)"}
            )
        finally:
            app.requests.end(handler, code, time.perf_counter() - start, tokens)

    def _route(self, app: InferenceServer, method: str, path: str) -> tuple[int, int]:
        """Answer one request; returns (status, tokens served)."""
        if path == INFERENCE_PATH:
            if method != "POST":
                raise _method_not_allowed(method, path, "POST")
            received_at = time.perf_counter()
            body = self._read_body(app.config.server.max_body_bytes)
            doc, tokens = app.infer(body, received_at=received_at)
            self._send_json(200, doc)
            return 200, tokens
        if path not in GET_PATHS:
            raise RequestError(
                404,
                f"no endpoint {path!r}; expected one of {', '.join((*GET_PATHS, INFERENCE_PATH))}",
            )
        if method not in ("GET", "HEAD"):
            raise _method_not_allowed(method, path, "GET")
        if path == "/metrics":
            body, content_type = app.metrics_text()
            self._send(200, body, content_type)
            return 200, 0
        status, doc = app.get(path)
        self._send_json(status, doc)
        return status, 0

    def _read_body(self, limit: int) -> bytes:
        """The request body, checked for Content-Type and Content-Length first (411/413/415)."""
        content_type = self.headers.get("Content-Type", "application/json")
        if content_type.split(";", 1)[0].strip().lower() not in _BODY_TYPES:
            raise RequestError(
                415, f"Content-Type: got {content_type!r}; expected application/json"
            )
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError(411, "Transfer-Encoding: not supported; send a Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(411, "Content-Length: missing; expected the body's length in bytes")
        if not length.strip().isdigit():
            self.close_connection = True
            raise RequestError(400, f"Content-Length: got {length!r}; expected a byte count")
        n = int(length)
        if n > limit:
            self.close_connection = True
            raise RequestError(
                413,
                f"body: {n:,} bytes; this server takes at most {limit:,} (server.max_body_bytes)",
            )
        body = self.rfile.read(n)
        if len(body) != n:
            self.close_connection = True
            raise RequestError(
                400, f"body: got {len(body)} of the {n} bytes Content-Length announced"
            )
        return body

    def _send_json(self, status: int, doc: Any, headers: Mapping[str, str] | None = None) -> None:
        """Answer with ``doc`` as JSON (nothing if an answer was already started)."""
        self._send(status, json.dumps(doc).encode() + b"\n", "application/json", headers)

    def _send(
        self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        """Status line, headers and body (no body for HEAD)."""
        if self._responded:
            return
        self._responded = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found by http.server itself (bad request line, oversize headers): JSON too."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        body = json.dumps({"error": message or self.responses.get(code, ("error",))[0]}).encode()
        self.send_response(code, message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body) + 1))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body + b"\n")

    def log_message(self, format: str, *args: Any) -> None:
        """Access log lines go to the module logger (DEBUG unless --access-log)."""
        log.log(self.server.app.access_log_level, "%s %s", self.address_string(), format % args)

    def log_error(self, format: str, *args: Any) -> None:
        """Protocol errors go to the module logger as warnings."""
        log.warning("%s %s", self.address_string(), format % args)


def _method_not_allowed(method: str, path: str, allowed: str) -> RequestError:
    """A 405 naming the allowed method."""
    return RequestError(
        405, f"{method} {path}: method not allowed; expected {allowed}", allow=allowed
    )


def bind_http_server(host: str, port: int, app: InferenceServer) -> DrainingHTTPServer:
    """A listening server on (host, port) that routes to ``app``, IPv6 when the host is."""
    cls = _DrainingHTTPServer6 if ":" in host else DrainingHTTPServer
    return cls((host, port), _Handler, app)


def http_url(address: tuple) -> str:
    """``http://host:port`` of a bound socket address."""
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
