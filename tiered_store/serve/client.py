"""A small client for the serving API: a ``tiered-store serve`` subprocess, JSON calls, a load generator.

``ServeProcess`` starts the server on free loopback ports and waits for its "listening" line;
``get_json``/``post_json`` make one bounded HTTP call; ``raw_exchange`` sends raw bytes and reads
the raw answer (for protocol-level tests); ``run_load`` sends a fixed list of request bodies from
a few client threads (keep-alive connections) and counts answers, errors and lost requests;
``zipf_requests`` makes such bodies. The tests and ``bench/bench_serve.py`` share this one implementation.

Examples
--------
>>> bodies = zipf_requests(2, batch=1, tokens=3, seed=0)
>>> len(bodies), len(bodies[0]["input_ids"][0])
(2, 3)
>>> with ServeProcess("examples/serve.yaml", "--create-tables") as server:  # doctest: +SKIP
...     result = run_load(server.url + "/v1/engram", bodies, clients=2)
>>> result.answered, result.lost  # doctest: +SKIP
(2, 0)
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import numpy as np

from ..errors import cut_text, error_text

__all__ = [
    "LoadResult",
    "ServeProcess",
    "get_json",
    "post_json",
    "raw_exchange",
    "rss_bytes",
    "run_load",
    "zipf_requests",
]

DEEPSEEK_VOCAB_SIZE = 129280  # token ids of the DeepSeek tokenizer the server hashes
_PIPE_END_WAIT_S = 1.0  # for a killed server's stdout to end, before closing it
_EXIT_WAIT_S = 10.0  # for a server whose stdout ended before its 'listening' line to exit
_STOP_WAIT_S = 30.0  # for a server whose 'listening' line says not how long its stop takes

# The directory holding the `tiered_store` package: the subprocess imports the same code.
_PACKAGE_PARENT = Path(__file__).resolve().parents[2]


class ServeProcess:
    """``tiered-store serve`` in a subprocess on free loopback ports; a context manager.

    ``url``/``metrics_url`` come from the JSON line the server prints once it listens.
    ``stop()`` sends SIGTERM and returns the exit status (it kills the server only once the
    longest stop that line names, ``stop_within_s``, is over). A relative config path is passed on
    as given: the subprocess runs in this process's working directory.

    Parameters
    ----------
    config
        The serve config (YAML); a relative path is relative to the current directory.
    *extra
        More ``tiered-store serve`` options (``"--create-tables"``, ``"--record-trace", path``).
    metrics
        Open the separate ``/metrics`` listener (on a free port); else ``/metrics`` is on ``url``.
    startup_timeout
        Seconds to wait for the "listening" line before killing the process.
    env
        Extra environment variables of the subprocess.

    Examples
    --------
    >>> with ServeProcess("examples/serve.yaml", "--create-tables", metrics=False) as server:  # doctest: +SKIP
    ...     status, health = get_json(server.url + "/healthz")
    ...     exit_status = server.stop()
    >>> status, health, exit_status  # doctest: +SKIP
    (200, {'status': 'ok'}, 0)
    """

    def __init__(
        self,
        config: str | Path,
        *extra: str,
        metrics: bool = True,
        startup_timeout: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> None:
        cmd = [
            sys.executable,
            "-m",
            "tiered_store.cli",
            "serve",
            str(config),
            "--address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0" if metrics else "",
            *extra,
        ]
        fd, log_path = tempfile.mkstemp(prefix="serve-", suffix=".log")
        self.log_path = Path(log_path)
        self._log = os.fdopen(fd, "wb")  # closed in stop()
        self._kept_log: str | None = None  # the log's text once the with block removed it
        self._reader: threading.Thread | None = None  # reads the 'listening' line
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=subprocess_env(env),
            )
        except BaseException:  # no process (an environment value Popen refuses): no log either
            self._log.close()
            self.log_path.unlink(missing_ok=True)
            raise
        try:
            self.ready = self._wait_ready(startup_timeout)
        except BaseException:  # a KeyboardInterrupt while waiting too: leave no server running
            self._discard()
            raise
        self.url: str = self.ready["url"]
        self.metrics_url: str = self.ready["metrics_url"]
        self.pid: int = self.proc.pid

    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        """The server's 'listening' line (or, the process killed, an error with its log)."""
        box: list[bytes] = []
        self._reader = threading.Thread(
            target=lambda: box.append(self.proc.stdout.readline()), daemon=True
        )
        self._reader.start()
        self._reader.join(timeout)
        if not box or not box[0]:
            self._fail(self._why_no_line(ended=bool(box), timeout=timeout))
        try:
            ready = json.loads(box[0])
            ready["url"], ready["metrics_url"]  # noqa: B018 (both named, or not the line)
        except (ValueError, TypeError, KeyError):
            line = box[0][:200].decode(errors="replace").rstrip()
            self._fail(
                f"printed {line!r} where its JSON 'listening' line (url, metrics_url) was expected"
            )
        return ready

    def _why_no_line(self, *, ended: bool, timeout: float) -> str:
        """Why no 'listening' line came: the exit status, once the process ends (its stdout
        ``ended`` first: its exit is waited for), else a stdout closed, or ``timeout`` passed."""
        if ended:
            try:
                self.proc.wait(_EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                return "closed its stdout without printing its 'listening' line"
        status = self.proc.poll()
        if status is not None:
            return _how_it_ended(status)
        return f"printed no 'listening' line within {timeout}s"

    def _fail(self, what: str) -> NoReturn:
        """Kill the server, remove its log file and its pipe, and raise naming ``what`` happened
        with the log."""
        raise RuntimeError(f"tiered-store serve {what}; its log:\n{self._discard()}")

    def _discard(self) -> str:
        """Kill the server, close its pipe, remove its log file; what the log held (a second
        call only returns that)."""
        if self._kept_log is not None:
            return self._kept_log
        self.proc.kill()
        self.proc.wait()
        reader = self._reader
        if reader is not None:
            reader.join(_PIPE_END_WAIT_S)  # the pipe ends with the server's death...
        if reader is None or not reader.is_alive():  # ...unless a process it started holds it:
            self.proc.stdout.close()  # closing would wait for the reader's readline, so for
            # that process's end
        self._kept_log = self.log()
        self._log.close()
        self.log_path.unlink(missing_ok=True)
        return self._kept_log

    def log(self) -> str:
        """What the server wrote to stderr so far (all of it, after ``stop``; after the ``with``
        block, which removes the file, what it held then)."""
        if self._kept_log is not None:
            return self._kept_log
        if not self._log.closed:  # closed by stop(): the file holds all there is
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """The server's resident set size now."""
        return rss_bytes(self.pid)

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM, wait for the drain, return the exit status (kills after ``timeout``; default:
        the longest the server said its stop takes, its 'listening' line's ``stop_within_s``,
        and ``_EXIT_WAIT_S`` more for the process's exit)."""
        if timeout is None:
            said = self.ready.get("stop_within_s")
            timeout = _STOP_WAIT_S if said is None else said + _EXIT_WAIT_S
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._kept_log = self.log()  # the file goes: a failing test still reads what it said
        self.log_path.unlink(missing_ok=True)


def _how_it_ended(status: int) -> str:
    """A process's exit ``status`` in words (a negative one: the signal that killed it)."""
    if status >= 0:
        return f"exited with status {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:  # a signal Python has no name for (a real-time one)
        name = str(-status)
    return f"was killed by signal {name}"


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment plus ``extra``, with this ``tiered_store`` first on ``PYTHONPATH`` (the
    paths already there kept after it: a child Python imports what this one does)."""
    env = {**os.environ, **(extra or {})}
    paths = [str(_PACKAGE_PARENT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def post_json(
    url: str,
    doc: Any,
    timeout: float = 60.0,
    *,
    connection: http.client.HTTPConnection | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST ``doc`` as JSON to ``url``; returns (status, decoded JSON answer) (an answer that is
    not JSON: ``ValueError`` naming the URL, the status and the body's start).

    Parameters
    ----------
    url
        The endpoint, e.g. ``server.url + "/v1/engram"``.
    doc
        The request body, encoded as JSON.
    timeout
        Seconds for connecting and for each socket read.
    connection
        A keep-alive connection to reuse (left open; one the server closed while it was idle,
        after ``server.keep_alive_s``, is opened anew); default: a new one, closed after.

    Examples
    --------
    >>> status, answer = post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})  # doctest: +SKIP
    >>> status, answer["next_token_ids"]  # doctest: +SKIP
    (200, [[48195]])
    """
    parts = urlsplit(url)
    conn = connection or http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    _close_if_closed_by_server(conn)
    try:
        body = json.dumps(doc).encode()
        with _refusal_named(url):
            conn.request("POST", parts.path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, _json_answer(url, response)
    except BaseException:
        conn.close()  # a broken keep-alive connection reconnects on its next request
        raise
    finally:
        if connection is None:
            conn.close()


@contextmanager
def _refusal_named(url: str) -> Iterator[None]:
    """A refused connection re-raised as a ``ConnectionRefusedError`` that names ``url``."""
    try:
        yield
    except ConnectionRefusedError as exc:
        where = urlsplit(url).netloc
        raise ConnectionRefusedError(
            exc.errno, f"{url}: connection refused (nothing listens on {where}); is the server up?"
        ) from exc


class _AnswerNotJSON(ValueError):
    """An HTTP answer whose body is not JSON (``status``: its status code)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _json_answer(url: str, response: http.client.HTTPResponse) -> Any:
    """The decoded JSON body of ``response`` (``None`` when empty); a ``ValueError`` naming the
    URL, the status, the Content-Type and the body's start when it is not JSON."""
    raw = response.read()
    try:
        return json.loads(raw or b"null")
    except ValueError:
        kind = response.getheader("Content-Type", "no Content-Type")
        raise _AnswerNotJSON(
            f"{url}: answered {response.status} {response.reason} with a body that is not JSON "
            f"({kind}): {raw[:200]!r}",
            response.status,
        ) from None


def _close_if_closed_by_server(conn: http.client.HTTPConnection) -> None:
    """Close an idle keep-alive ``conn`` that the server closed (its next request reconnects):
    between answers the server sends nothing, so a readable socket holds its end or an error.
    ``poll``: ``select.select`` refuses descriptors past 1023 (``FD_SETSIZE``), and an epoll
    selector needs a descriptor of its own, which a process at its open-files limit cannot get."""
    if conn.sock is None:
        return
    poll = select.poll()
    poll.register(conn.sock, select.POLLIN)
    if poll.poll(0):
        conn.close()


def get_json(url: str, timeout: float = 30.0) -> tuple[int, Any]:
    """GET ``url``; returns (status, decoded JSON answer) (one that is not JSON: ``ValueError``).

    Parameters
    ----------
    url
        The endpoint, e.g. ``server.url + "/stats"`` (a query string is kept).
    timeout
        Seconds for connecting and for each socket read.

    Examples
    --------
    >>> get_json(server.url + "/healthz")  # doctest: +SKIP
    (200, {'status': 'ok'})
    """
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        with _refusal_named(url):
            conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        return response.status, _json_answer(url, response)
    finally:
        conn.close()


def raw_exchange(url: str, data: bytes, *, timeout: float = 30.0) -> tuple[int, bytes, bytes]:
    """Send ``data`` as is to the server of ``url``; read one answer: (status, head, body).

    The body is read to its Content-Length, or until the server closes the connection (none
    for a 1xx, 204 or 304, nor for the answer to a HEAD, which have no body); status 0 means
    the answer had no HTTP status line.

    Examples
    --------
    >>> raw_exchange(server.url, b"NONSENSE\\r\\n\\r\\n")[0]  # doctest: +SKIP
    400
    """
    import socket

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        first = lines[0].split()
        status = int(first[1]) if len(first) > 1 and first[0].startswith(b"HTTP/") else 0
        length = next(
            (
                int(v)
                for k, _, v in (x.partition(b":") for x in lines[1:])
                if k.strip().lower() == b"content-length"
            ),
            None,
        )
        if data.startswith(b"HEAD ") or 100 <= status < 200 or status in (204, 304):
            length = 0  # RFC 9110 6.4.1: no body, whatever Content-Length says (HEAD's: the GET's)
        while (length is None or len(body) < length) and (chunk := sock.recv(65536)):
            body += chunk
    return status, head, body


def zipf_requests(
    n: int,
    *,
    batch: int,
    tokens: int,
    exponent: float = 1.1,
    seed: int = 0,
    vocab_size: int = DEEPSEEK_VOCAB_SIZE,
) -> list[dict[str, Any]]:
    """``n`` request bodies of Zipf-distributed token ids ([batch, tokens] each).

    Parameters
    ----------
    n
        Number of bodies.
    batch, tokens
        Sequences per body, tokens per sequence.
    exponent
        Zipf exponent of the token ids (> 1; larger: more skewed).
    seed
        Seed of the random generator: the same arguments give the same bodies.
    vocab_size
        Ids are taken modulo this (the tokenizer's vocabulary).

    Examples
    --------
    >>> bodies = zipf_requests(3, batch=2, tokens=4, seed=1)
    >>> len(bodies), [len(row) for row in bodies[0]["input_ids"]]
    (3, [4, 4])
    >>> bodies == zipf_requests(3, batch=2, tokens=4, seed=1)
    True
    """
    rng = np.random.default_rng(seed)
    ids = rng.zipf(exponent, size=(n, batch, tokens)) % vocab_size
    return [{"input_ids": block.tolist()} for block in ids]


@dataclass
class LoadResult:
    """What one load run measured."""

    clients: int
    requests: int
    answered: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # status or exception name -> count
    # each key of ``errors`` -> what its first one said (the answer's "error", the exception's
    # message): a 503 says whether it was busy, a table fault or a drain
    error_texts: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def lost(self) -> int:
        """Requests that got no HTTP answer at all (exceptions, or never accounted for)."""
        answered_badly = sum(n for k, n in self.errors.items() if k.isdigit() or k == "bad-answer")
        return self.requests - self.answered - answered_badly

    @property
    def requests_per_second(self) -> float:
        """Answered requests per second of wall time."""
        return self.answered / self.wall_seconds if self.wall_seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        """Latency percentile ``q`` (0-100) in milliseconds."""
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-request latencies); the percentiles are ``None`` (JSON
        null, not NaN, which strict JSON refuses) when no request was answered."""
        out = {k: v for k, v in asdict(self).items() if k != "latencies_ms"}
        out.update(lost=self.lost, requests_per_second=round(self.requests_per_second, 1))
        for q in (50, 95, 99):
            out[f"p{q}_ms"] = round(self.percentile_ms(q), 2) if self.latencies_ms else None
        return out


def _answer_text(answer: Any) -> str:
    """What an answer that is not counted answered said: its "error", else its start."""
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return cut_text(answer["error"], 500)
    return cut_text(json.dumps(answer), 200)


def run_load(
    url: str,
    bodies: list[dict[str, Any]],
    *,
    clients: int,
    timeout: float = 60.0,
    check: Callable[[dict[str, Any]], bool] | None = None,
    keep_alive: bool = True,
) -> LoadResult:
    """Send every body in ``bodies`` to ``url`` from ``clients`` threads; count answers and errors.

    A request counts as answered when it gets 200 (and ``check(answer)`` holds, when given);
    any other status (its body JSON or not: a proxy's 502 page) or exception is an error, by
    name, and the first of each name's text is kept (``error_texts``). The run is bounded: a
    fixed number of requests, each with ``timeout``.

    Parameters
    ----------
    url
        The inference endpoint, e.g. ``server.url + "/v1/engram"``.
    bodies
        Request bodies, each sent once (``zipf_requests`` makes some).
    clients
        Client threads sending concurrently, one request at a time each.
    timeout
        Seconds for each request's connect and reads.
    check
        A test of each 200 answer; an answer failing it, or one that is not a JSON object (an
        empty body, ``null``), counts as ``"bad-answer"``.
    keep_alive
        Each client reuses one HTTP/1.1 connection (``False``: a new connection per request).

    Examples
    --------
    >>> bodies = zipf_requests(48, batch=2, tokens=32)
    >>> result = run_load(server.url + "/v1/engram", bodies, clients=4)  # doctest: +SKIP
    >>> result.answered, result.errors, result.lost  # doctest: +SKIP
    (48, {}, 0)
    """
    result = LoadResult(clients=clients, requests=len(bodies))
    lock = threading.Lock()
    next_index = iter(range(len(bodies)))

    parts = urlsplit(url)

    def client() -> None:
        """Take the next body until none is left; count its outcome."""
        conn = None
        if keep_alive:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                if conn is not None:
                    conn.close()
                return
            start = time.perf_counter()
            try:
                status, answer = post_json(url, bodies[i], timeout=timeout, connection=conn)
                # a 200 whose JSON is no object (an empty body, null) fails a check of a dict
                ok = status == 200 and (
                    check is None or (isinstance(answer, dict) and check(answer))
                )
                key = "200" if ok else (str(status) if status != 200 else "bad-answer")
                text = "" if ok else _answer_text(answer)
            except _AnswerNotJSON as exc:  # answered all the same (a proxy's 502 page): not lost
                key, ok = (str(exc.status) if exc.status != 200 else "bad-answer"), False
                text = str(exc)
            except Exception as exc:  # a lost request: name it, keep going
                key, ok, text = type(exc).__name__, False, error_text(exc)
            elapsed = (time.perf_counter() - start) * 1e3
            with lock:
                if ok:
                    result.answered += 1
                    result.latencies_ms.append(elapsed)
                else:
                    result.errors[key] = result.errors.get(key, 0) + 1
                    result.error_texts.setdefault(key, text)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall_seconds = time.perf_counter() - start
    return result
