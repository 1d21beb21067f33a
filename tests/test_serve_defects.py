"""Issue 12's serving defects, each against a real ``tiered-store serve`` subprocess on 127.0.0.1.

Every test here failed on the hand-written ``http.server`` transport: a held metrics port hung
the process, 100 simultaneous POSTs got connection resets, a 3.9 MB text was tokenised before the
limits and outside the concurrency limit, a stalled body got 500 with a traceback, conflicting
Content-Length headers were accepted, garbage request lines got no status line, a disconnecting
client logged a traceback, a non-finite table value was served as invalid JSON, and /healthz
stayed "ok" while a truncated table failed every request.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve_support import make_checkpoint
from tiered_store.manifest_checksum import sealed
from tiered_store.page_checksums import sidecar_path
from tiered_store.serve import ServeConfig
from tiered_store.serve.client import (
    ServeProcess,
    get_json,
    post_json,
    raw_exchange,
    run_load,
    subprocess_env,
)
from tiered_store.table_format import (
    add_page_checksums,
    read_manifest,
    table_paths,
)

LIMITS = {
    "max_body_bytes": 4 << 20,  # the default: a 3.9 MB body passes the size check
    "max_text_chars": 65536,
    "max_concurrent": 4,
    "max_connections": 1024,
    "request_timeout_s": 2.0,
}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("defects"), server=LIMITS)


@pytest.fixture(scope="module")
def proc(config_path):
    with ServeProcess(config_path, metrics=False) as server:
        yield server


def _no_trouble_in(log: str) -> None:
    """No traceback and no ERROR line in the server's log."""
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def _serve_cmd(config: Path, address: str, metrics: str) -> list[str]:
    return [sys.executable, "-m", "tiered_store.cli", "serve", str(config), "--address", address,
            "--metrics-address", metrics]  # fmt: skip


@pytest.mark.parametrize("which", ["metrics", pytest.param("server", marks=pytest.mark.slow)])
def test_an_address_in_use_exits_non_zero_at_once_naming_it(config_path, which):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = f"127.0.0.1:{holder.getsockname()[1]}"
        cmd = (
            _serve_cmd(config_path, "127.0.0.1:0", held)
            if which == "metrics"
            else _serve_cmd(config_path, held, "")
        )
        start = time.monotonic()
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60,
            env=subprocess_env(),
        )  # fmt: skip
    assert out.returncode != 0 and time.monotonic() - start < 30
    key = "store.metrics.address" if which == "metrics" else "server.address"
    assert f"{key}: cannot listen on {held} (Address already in use)" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_a_dense_file_missing_a_key_exits_2_naming_the_file_and_the_key(tmp_path):
    """A partial checkpoint (convert_checkpoint(strict=False)) made serve die with torch's
    RuntimeError traceback from load_state_dict (exit 1), naming neither the file nor the CLI."""
    from tiered_store.engram.checkpoint import convert_checkpoint
    from tiered_store.engram.model import EngramLM

    config = make_checkpoint(tmp_path)
    served = ServeConfig.from_yaml(config)
    state = EngramLM(served.model).state_dict()
    del state["final_norm.weight"]
    convert_checkpoint(state, served.model, served.checkpoint_dir, strict=False, overwrite=True)
    out = subprocess.run(
        _serve_cmd(config, "127.0.0.1:0", ""), capture_output=True, text=True, timeout=60,
        env=subprocess_env(),
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "dense.safetensors: final_norm.weight: missing from the dense checkpoint" in out.stderr


def test_a_host_name_that_does_not_resolve_is_named_as_such():
    """`socket.gaierror`'s code is not an errno: the message said "Unknown error -2"."""
    from tiered_store.errors import ConfigError
    from tiered_store.serve.server import _listen

    with pytest.raises(ConfigError, match=r"no-such-host.invalid:9 \((Name or service not known|.*not known|Temporary failure in name resolution)\); expected an address this host can listen on"):  # fmt: skip
        _listen("no-such-host.invalid", 9, 16, "server.address")


def test_200_concurrent_connections_and_100_simultaneous_posts_without_a_reset(proc):
    host, port = proc.url.removeprefix("http://").split(":")
    sockets = [socket.create_connection((host, int(port)), timeout=30) for _ in range(200)]
    try:  # 200 connections open at once, then a request on each
        for sock in sockets:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = []
        for sock in sockets:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            answers.append(data)
    finally:
        for sock in sockets:
            sock.close()
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers), {a[:30] for a in answers}

    barrier = threading.Barrier(100)
    outcomes: list[object] = []

    def post() -> None:
        barrier.wait()
        try:
            outcomes.append(post_json(proc.url + "/v1/engram", {"input_ids": [[1, 2, 3, 4]]})[0])
        except Exception as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=post) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outcomes == [200] * 100, {str(o) for o in outcomes}


def test_a_huge_text_does_not_delay_a_small_request(proc):
    huge = {"text": "lorem ipsum dolor sit amet " * 144_000}  # 3.9 MB of text
    assert 3_800_000 < len(json.dumps(huge)) < 4 << 20
    answers: list[tuple[int, dict]] = []
    threads = [
        threading.Thread(target=lambda: answers.append(post_json(proc.url + "/v1/engram", huge)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    start = time.perf_counter()
    status, _ = post_json(proc.url + "/v1/engram", {"input_ids": [[5, 6, 7]]})
    small = time.perf_counter() - start
    for t in threads:
        t.join(60)
    assert status == 200 and small < 2.0, small
    assert [s for s, _ in answers] == [413] * 4
    assert "3,888,000 characters" in answers[0][1]["error"]
    assert "server.max_text_chars" in answers[0][1]["error"]


def test_a_client_stalling_mid_body_gets_408_without_a_traceback(proc):
    start = time.monotonic()
    status, head, body = raw_exchange(
        proc.url, b'POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"input_ids"'
    )
    assert status == 408 and time.monotonic() - start < LIMITS["request_timeout_s"] + 5
    error = json.loads(body)["error"]
    assert error.startswith("body: 12 bytes received in server.request_timeout_s (2 s), the time")
    assert b"connection: close" in head.lower()
    _no_trouble_in(proc.log())


@pytest.mark.parametrize("framing", ["Content-Length: 100", "Transfer-Encoding: chunked"])
def test_a_client_ending_its_stream_mid_body_gets_its_400_at_once(proc, framing):
    """A client that shut its sending side with its body part sent was left waiting
    server.request_timeout_s (30 s by default) for bytes that could never come, its connection
    held, then told 408 "send all of it sooner". It is answered a counted 400 at once."""
    host, port = proc.url.removeprefix("http://").split(":")
    head = f"POST /v1/engram HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n".encode()
    part = b'{"input_ids"' if "Length" in framing else b'c\r\n{"input_ids"\r\n'
    before = _answers(proc.url, "400", "/v1/engram")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + part)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert time.monotonic() - start < LIMITS["request_timeout_s"] / 2
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    body = answer.partition(b"\r\n\r\n")[2]  # one chunk
    error = json.loads(body[body.index(b"{") : body.rindex(b"}") + 1])["error"]
    assert error.startswith("body: the client ended its stream before the whole body"), error
    assert _answers(proc.url, "400", "/v1/engram") == before + 1
    _no_trouble_in(proc.log())


@pytest.mark.parametrize(
    ("pipelined", "codes"),
    [("whole", [b"200", b"200", b"200"]), ("half a body", [b"200", b"200", b"400"])],
)
def test_requests_pipelined_before_the_end_of_the_stream_are_each_answered(proc, pipelined, codes):
    """A client that pipelined requests, then shut its sending side, was answered the first
    alone: the end of the stream closed the connection after it, the requests behind it neither
    answered nor counted (one whose body was cut short, not told its 400)."""
    host, port = proc.url.removeprefix("http://").split(":")
    body = json.dumps({"input_ids": [[3, 4, 5]]}).encode()
    request = f"POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    request = request.encode() + body
    last = request if pipelined == "whole" else request[:-5]

    def counted() -> dict[str, float]:
        """Whole requests counted (499: their client ended its stream; 200 if an answer was out
        before the end came), and those cut short (400)."""
        n = {code: _answers(proc.url, code, "/v1/engram") for code in ("200", "400", "499")}
        return {"whole": n["200"] + n["499"], "cut short": n["400"]}

    before = counted()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request * 2 + last)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == codes, answer[-500:]
    want = {"whole": codes.count(b"200"), "cut short": codes.count(b"400")}
    deadline = time.monotonic() + 10
    while (got := {code: n - before[code] for code, n in counted().items()}) != want:
        assert time.monotonic() < deadline, got
        time.sleep(0.1)
    _no_trouble_in(proc.log())


def test_an_oversized_body_gets_its_413_not_a_connection_reset(proc):
    """The 413 was written and the connection closed with the body unread: the kernel reset it,
    and a client still sending (post_json sends it all before reading) got ConnectionResetError."""
    doc = {"text": "x" * 6_000_000}  # over max_body_bytes (4 MiB), announced in Content-Length
    for _ in range(3):
        status, answer = post_json(proc.url + "/v1/engram", doc)
        assert status == 413 and "server.max_body_bytes" in answer["error"], answer
    body = json.dumps(doc).encode()
    head = f"POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    status, head, _ = raw_exchange(proc.url, head.encode() + body)
    assert status == 413 and b"connection: close" in head.lower()
    _no_trouble_in(proc.log())


def test_a_malformed_head_before_a_large_body_gets_its_400_not_a_connection_reset(proc):
    """The protocol's 400 (here: no Host header) closed the connection at once with the body
    unread, unlike the app's 413: the kernel reset it, and a client still sending the body got
    ConnectionResetError, not the 400 saying what was wrong."""
    body = b"x" * 6_000_000
    head = f"POST /v1/engram HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    status, _, answer = raw_exchange(proc.url, head + body)
    assert status == 400 and "Missing mandatory Host: header" in json.loads(answer)["error"]
    _no_trouble_in(proc.log())


def _answers(url: str, code: str, handler: str | None = None) -> float:
    """Requests (to ``handler``, or any) answered ``code`` so far, as /metrics counts them."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as scraped:
        text = scraped.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "tiered_store_http_requests_total"
        and s.labels["code"] == code
        and handler in (None, s.labels["handler"])
    )


@pytest.mark.parametrize(
    "data",
    [
        b"NONSENSE\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello
        b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # no Host
        b"POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n[1]\r\n",
        b"POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\n[1]\r\n",
        b"POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",
    ],
)
def test_protocol_errors_get_a_json_400_and_are_counted(proc, data):
    """Requests h11 could not parse got uvicorn's plain-text 400, which no counter saw."""
    before = _answers(proc.url, "400")
    status, head, body = raw_exchange(proc.url, data)
    assert status == 400 and head.startswith(b"HTTP/1.1 400 Bad Request"), head[:100]
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]
    assert get_json(proc.url + "/healthz")[0] == 200
    assert _answers(proc.url, "400") == before + 1


@pytest.mark.parametrize(
    "data",
    [  # answered unread (415, 404) by the app; the chunk size is not hex
        b"POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
        b"POST /nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    ],
)
def test_a_body_whose_framing_breaks_is_one_400_without_a_traceback(proc, data):
    """A request whose head the app took, its body's framing broken in the same packet: the
    protocol answered 400 (counted), then the app's own answer raised h11's LocalProtocolError
    (a traceback, and a 500 counted for the same request)."""
    before = {code: _answers(proc.url, code) for code in ("400", "500")}
    status, head, body = raw_exchange(proc.url, data)
    assert status == 400 and b"content-type: application/json" in head.lower(), head[:100]
    assert b'{"error": "malformed HTTP request' in body  # chunked: the request was HTTP/1.1
    deadline = time.monotonic() + 10
    while _answers(proc.url, "400") < before["400"] + 1:  # the app counts it once it ended
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)
    assert {code: _answers(proc.url, code) for code in ("400", "500")} == {
        "400": before["400"] + 1,
        "500": before["500"],
    }
    _no_trouble_in(proc.log())


def test_clients_that_disconnect_leave_no_traceback(proc):
    host, port = proc.url.removeprefix("http://").split(":")
    body = json.dumps({"input_ids": [[3] * 200] * 4}).encode()
    head = f"POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    for data in (b"", head, head + body[:50], head + body):  # silent, headers, half, whole
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(data)
        time.sleep(0.2)
    time.sleep(1.0)  # the last one's answer is computed and written to nobody
    assert get_json(proc.url + "/healthz")[0] == 200
    _no_trouble_in(proc.log())


def test_clients_that_end_their_stream_before_the_answer_are_counted_499(proc):
    """HTTP/1.1 lets a client shut its sending side and read: the server closed the connection
    at the end of the stream, the answer computed and counted 200 but never sent. It is sent
    now; that request and one whose client closed for good (the server cannot tell them apart
    before it writes) are counted 499, as nginx counts them (both were 200). Their tokens are not
    counted served (tiered_store_served_tokens_total: of requests answered 200; they were)."""
    host, port = proc.url.removeprefix("http://").split(":")
    body = json.dumps({"input_ids": [[3, 4, 5]]}).encode()
    request = f"POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    before = _answers(proc.url, "499", "/v1/engram")
    tokens = get_json(proc.url + "/stats")[1]["server"]["served_tokens"]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request.encode() + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["logits"]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request.encode() + body)  # and gone
    deadline = time.monotonic() + 30
    while _answers(proc.url, "499", "/v1/engram") < before + 2:
        assert time.monotonic() < deadline, _answers(proc.url, "499", "/v1/engram") - before
        time.sleep(0.1)
    assert get_json(proc.url + "/stats")[1]["server"]["served_tokens"] == tokens


def _nan_table(config: ServeConfig, layer: int) -> None:
    """Rewrite layer ``layer``'s table in place as a valid table (checksums match) whose rows
    are NaN: one made elsewhere (create_table refuses non-finite rows)."""
    path = config.table_path(layer)
    manifest = read_manifest(path)
    nan = np.full(manifest.rows * manifest.dim, np.nan, dtype=np.float32).tobytes()
    with open(path, "r+b") as f:
        f.seek(manifest.data_offset)
        f.write(nan)
    blocks = range(0, len(nan), manifest.block_bytes)
    doc = json.loads(table_paths(path)[1].read_text())
    doc["block_checksums"] = [zlib.crc32(nan[i : i + manifest.block_bytes]) for i in blocks]
    table_paths(path)[1].write_text(json.dumps(sealed(doc)))
    sidecar_path(path).unlink()
    add_page_checksums(path, progress=False)


def test_a_non_finite_table_value_is_a_counted_503_never_invalid_json(tmp_path):
    config_path = make_checkpoint(tmp_path, server=LIMITS)
    _nan_table(ServeConfig.from_yaml(config_path), 3)
    with ServeProcess(config_path) as server:
        status, answer = post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})
        assert status == 503, answer
        assert answer == {
            "error": "table data unavailable (table engram_layer3: rows hold non-finite values)"
        }
        status, health = get_json(server.url + "/healthz")
        assert status == 503 and health["problems"][0].startswith(
            "table engram_layer3: lookups failing"
        )
        import urllib.request

        with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
            text = response.read().decode()
        failures = {
            s.labels["table"]: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "tiered_store_lookup_failures_total"
        }
        assert failures == {"engram_layer1": 0, "engram_layer3": 1}
        assert server.stop() == 0


def test_a_table_truncated_while_serving_gives_503_and_healthz_503(tmp_path):
    config_path = make_checkpoint(
        tmp_path,
        server=LIMITS,
        store={"tiers": {"hot": {"capacity": 0}, "warm": {"capacity": 0}, "cold": {"io": "pread"}}},
    )
    with ServeProcess(config_path, metrics=False) as server:
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 200
        path = ServeConfig.from_yaml(config_path).table_path(3)
        os.truncate(path, 4096 + 8192)  # the header and two pages are left
        status, answer = post_json(server.url + "/v1/engram", {"input_ids": [[9, 99, 999, 9999]]})
        assert status == 503, answer
        assert (
            answer["error"] == "table data unavailable (table engram_layer3: cold tier read failed)"
        )
        assert str(tmp_path) not in json.dumps(answer)
        status, health = get_json(server.url + "/healthz")
        assert status == 503 and "table engram_layer3: lookups failing" in health["problems"][0]
        assert str(tmp_path) not in json.dumps(health)
        assert server.proc.poll() is None  # alive
        assert server.stop() == 0


def test_keep_alive_answers_are_not_held_back_by_nagle(proc):
    """Head and body leave as separate writes: without TCP_NODELAY each answer waited for the
    client's delayed ACK (40 ms on Linux) before its body was sent."""
    import http.client
    import statistics

    host, port = proc.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    times = []
    try:
        for _ in range(20):
            start = time.perf_counter()
            conn.request("GET", "/healthz")
            assert conn.getresponse().read() == b'{"status":"ok"}\n'
            times.append(time.perf_counter() - start)
    finally:
        conn.close()
    assert statistics.median(times) < 0.02, times


def test_post_json_on_a_keep_alive_connection_the_server_closed_idle_reconnects(tmp_path):
    """A connection left idle past server.keep_alive_s is closed by the server; post_json sent
    its next request on it all the same and raised BrokenPipeError (or RemoteDisconnected), the
    request lost though the server never saw it."""
    import http.client

    config_path = make_checkpoint(tmp_path, server={**LIMITS, "keep_alive_s": 0.2})
    with ServeProcess(config_path, metrics=False) as server:
        host, port = server.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            for _ in range(3):
                status, answer = post_json(
                    server.url + "/v1/engram", {"input_ids": [[3, 4, 5]]}, connection=conn
                )
                assert status == 200 and answer["shape"] == [1, 3], answer
                time.sleep(1.0)  # the server closes the idle connection meanwhile
        finally:
            conn.close()
        assert _answers(server.url, "200", "/v1/engram") == 3


@pytest.fixture
def bad_gateway():
    """The URL of a proxy answering every GET and POST with a 502 HTML page."""
    import http.server

    class Proxy(http.server.BaseHTTPRequestHandler):
        def _bad_gateway(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            page = b"<html><body>502 Bad Gateway</body></html>"
            self.send_response(502)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        do_GET = do_POST = _bad_gateway

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy) as proxy:
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{proxy.server_address[1]}"
        finally:
            proxy.shutdown()


def test_get_json_and_post_json_name_an_answer_that_is_not_json(bad_gateway):
    """An answer that is not JSON (a proxy's 502 page, a plain-text 500) raised json's bare
    "Expecting value: line 1 column 1 (char 0)": neither the URL, the status nor the body."""
    url = bad_gateway
    for call in (
        lambda: get_json(url + "/stats"),
        lambda: post_json(url + "/v1/engram", {"input_ids": [[1]]}),
    ):
        with pytest.raises(ValueError) as raised:
            call()
        message = str(raised.value)
        assert message.startswith(f"{url}/"), message
        assert "502 Bad Gateway" in message and "not JSON (text/html)" in message
        assert "<html><body>502 Bad Gateway" in message


def test_run_load_counts_an_answer_that_is_not_json_by_its_status_not_lost(bad_gateway):
    """A proxy's 502 page is an answer: run_load counted it "ValueError", a lost request (one
    that got no HTTP answer at all), hiding the status the proxy gave."""
    result = run_load(bad_gateway + "/v1/engram", [{"input_ids": [[1]]}] * 3, clients=2)
    assert result.errors == {"502": 3} and result.lost == 0 and result.answered == 0, result


@pytest.mark.parametrize("page", [b"", b"null"])
def test_run_load_counts_a_200_that_is_no_json_object_as_a_bad_answer_not_lost(page):
    """A 200 with an empty body (read as None) or null failed bench_serve's check
    ("hidden_checksum" in answer) with a TypeError, and run_load counted the answered request
    lost, under "TypeError"."""
    import http.server

    class Answering(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answering) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/v1/engram"
            bodies = [{"input_ids": [[1]]}] * 3
            result = run_load(url, bodies, clients=2, check=lambda a: "hidden_checksum" in a)
        finally:
            server.shutdown()
    assert result.errors == {"bad-answer": 3} and result.lost == 0, result


def _unused_port() -> int:
    """A local port that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_load_run_with_no_answer_writes_null_percentiles_not_nan():
    """With no latency recorded, to_dict() wrote NaN p50/p95/p99, which json.dumps writes as the
    bare token NaN: strict JSON parsers refuse the result."""
    url = f"http://127.0.0.1:{_unused_port()}/v1/engram"
    result = run_load(url, [{"input_ids": [[1, 2]]}] * 3, clients=2)
    assert result.answered == 0 and result.errors == {"ConnectionRefusedError": 3}
    doc = result.to_dict()
    assert doc["p50_ms"] is None and doc["p95_ms"] is None and doc["p99_ms"] is None
    json.dumps(doc, allow_nan=False)  # strict JSON


def test_a_refused_connection_names_the_url():
    """get_json and post_json with no server listening raised a bare
    "ConnectionRefusedError: [Errno 111] Connection refused", naming neither the URL nor the port."""
    url = f"http://127.0.0.1:{_unused_port()}"
    for path, call in (
        ("/stats", lambda: get_json(url + "/stats")),
        ("/v1/engram", lambda: post_json(url + "/v1/engram", {"input_ids": [[1]]})),
    ):
        with pytest.raises(ConnectionRefusedError) as raised:  # still an OSError, as before
            call()
        assert f"{url}{path}: connection refused (nothing listens on {url[7:]})" in str(
            raised.value
        )


def test_a_stopped_serve_process_still_shows_its_log(config_path):
    """ServeProcess.log() after stop() raised "I/O operation on closed file", and after the with
    block "No such file" (it removes the log file), so what the server logged while it drained
    and exited could not be read."""
    with ServeProcess(config_path, metrics=False) as server:
        assert server.stop() == 0
        log = server.log()
        assert "SIGTERM: draining" in log and log.rstrip().endswith("stopped"), log[-2000:]
    assert server.log() == log and not server.log_path.exists()


def test_a_server_whose_first_line_is_not_json_is_killed_and_named(config_path, tmp_path):
    """An interpreter that printed a banner before the server's JSON line (a sitecustomize, a
    wrapper) made ServeProcess raise json's bare "Expecting value" and left the server running,
    its log file and pipe open."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\nprint('hello from', os.getpid(), flush=True)\n"
    )
    before = set(Path(tempfile.gettempdir()).glob("serve-*.log"))
    with pytest.raises(RuntimeError, match=r"printed 'hello from (\d+)' where its JSON") as raised:
        ServeProcess(config_path, metrics=False, env={"PYTHONPATH": str(site)})
    pid = int(re.search(r"hello from (\d+)", str(raised.value))[1])
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)
    assert set(Path(tempfile.gettempdir()).glob("serve-*.log")) <= before


_SLOW_SERVER_WITH_A_HELPER = """
import os, time
helper = os.fork()
if helper == 0:  # a helper the interpreter starts (a monitoring agent), sharing its stdout
    time.sleep(300)
    os._exit(0)
with open(os.environ["HELPER_PID_FILE"], "w") as f:
    f.write(str(helper))
time.sleep(300)  # a server slow to start: its 'listening' line comes too late
"""


def test_a_server_timed_out_while_a_helper_holds_its_stdout_is_reported_in_time(
    config_path, tmp_path
):
    """A server that printed no 'listening' line in time, while a process it had started kept
    its stdout open, made ServeProcess hang after killing it (closing the pipe waited for the
    reader's readline, so for the helper's end) instead of raising at once."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SLOW_SERVER_WITH_A_HELPER)
    helper_pid = tmp_path / "helper.pid"
    env = {"PYTHONPATH": str(site), "HELPER_PID_FILE": str(helper_pid)}
    raised: list[BaseException] = []

    def start() -> None:
        try:
            ServeProcess(config_path, metrics=False, startup_timeout=5, env=env)
        except BaseException as exc:
            raised.append(exc)

    starting = threading.Thread(target=start, daemon=True)
    starting.start()
    try:
        starting.join(30)
        stuck = starting.is_alive()
    finally:  # the helper's end lets a stuck ServeProcess go on
        if helper_pid.exists() and helper_pid.read_text():
            os.kill(int(helper_pid.read_text()), signal.SIGKILL)
        starting.join(30)
    assert helper_pid.read_text(), "the server started no helper: nothing was tested"
    assert not stuck, "ServeProcess had not raised 30 s after the server's 5 s startup timeout"
    assert len(raised) == 1 and isinstance(raised[0], RuntimeError), raised
    assert "printed no 'listening' line within 5s" in str(raised[0]), raised[0]


def test_a_request_without_host_is_told_the_host_header_is_missing(proc):
    """An HTTP/1.1 request with no Host header got the generic 400 ("its request line, a header
    or the body's framing"); the 400 now gives h11's reason."""
    status, _, body = raw_exchange(proc.url, b"GET /healthz HTTP/1.1\r\n\r\n")
    error = json.loads(body)["error"]
    assert status == 400 and "(Missing mandatory Host: header)" in error, (status, error)
    status, _, body = raw_exchange(
        proc.url, b"GET /healthz HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n"
    )
    assert status == 400 and "Host" not in json.loads(body)["error"].split(";")[0], body


def test_a_long_h11_reason_is_cut_and_says_so(proc):
    """h11's reason for a 400 (which quotes the request) was cut at 100 characters with no sign
    of the cut: the message read as h11's whole reason, ending mid-quote."""
    header = b"x" * 300  # no colon: h11 quotes the line in its reason
    status, _, body = raw_exchange(
        proc.url, b"GET / HTTP/1.1\r\nHost: a\r\n" + header + b"\r\n\r\n"
    )
    error = json.loads(body)["error"]
    assert status == 400 and "xxx... (" in error and " characters)); expected" in error, error
    assert len(error) < 300, error


def test_404_and_415_echo_at_most_the_start_of_the_path_or_content_type(proc):
    """A 404 repeated the whole path and a 415 the whole Content-Type: a client's 8 KB of either
    came back as an 8 KB error message. Now the start is repeated, with the length."""
    path = "/x" * 4000
    content_type = "y" * 8000
    requests = [
        f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n",
        f"POST /v1/engram HTTP/1.1\r\nHost: a\r\nContent-Type: {content_type}\r\n"
        "Content-Length: 2\r\n\r\n{}",
    ]
    for request, status, echoed in zip(requests, (404, 415), (path, content_type), strict=True):
        got, _, body = raw_exchange(proc.url, request.encode())
        error = json.loads(body)["error"]
        assert got == status and len(error) < 300, (got, len(error))
        assert repr(echoed[:100]) in error and f"({len(echoed):,} characters)" in error, error


_SLOW_SERVER = """
import os, time
with open(os.environ["SERVER_PID_FILE"], "w") as f:
    f.write(str(os.getpid()))
time.sleep(300)  # a server slow to start: interrupted while ServeProcess waits for it
"""


def test_a_serve_process_interrupted_while_starting_kills_the_server(config_path, tmp_path):
    """A KeyboardInterrupt (or any exception) while ServeProcess waited for the server's
    'listening' line escaped with the server left running, its log file and pipe open."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SLOW_SERVER)
    pid_file = tmp_path / "server.pid"
    env = {"PYTHONPATH": str(site), "SERVER_PID_FILE": str(pid_file)}

    def interrupt_once_started(*_: object) -> None:
        if pid_file.exists() and pid_file.read_text():
            raise KeyboardInterrupt
        signal.setitimer(signal.ITIMER_REAL, 0.2)

    before = set(Path(tempfile.gettempdir()).glob("serve-*.log"))
    previous = signal.signal(signal.SIGALRM, interrupt_once_started)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            ServeProcess(config_path, metrics=False, startup_timeout=120, env=env)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        pid = int(pid_file.read_text()) if pid_file.exists() else None
        alive = pid is not None and Path(f"/proc/{pid}").exists()
        if alive:
            os.kill(pid, signal.SIGKILL)
    assert pid is not None, "the server never started: nothing was tested"
    assert not alive, "the server was left running"
    assert set(Path(tempfile.gettempdir()).glob("serve-*.log")) <= before


def test_post_json_reuses_a_keep_alive_connection_whose_descriptor_is_past_1023(proc):
    """post_json's check for a connection the server closed used select.select, which refuses a
    descriptor past 1023 (FD_SETSIZE): in a process with that many files open, every request
    on a reused connection raised "ValueError: filedescriptor out of range in select()"."""
    import http.client
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE's hard limit {hard} leaves no descriptor past 1023")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    host, port = proc.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        for _ in range(2):
            status, answer = post_json(
                proc.url + "/v1/engram", {"input_ids": [[3, 4, 5]]}, connection=conn
            )
            assert status == 200 and answer["shape"] == [1, 3], answer
            assert conn.sock is not None and conn.sock.fileno() > 1023
    finally:
        conn.close()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_post_json_reuses_a_keep_alive_connection_at_the_open_files_limit(proc):
    """post_json's check for a connection the server closed made an epoll selector, a descriptor
    of its own: in a process at its open-files limit, a request on a reused connection, which
    needs no new descriptor, raised "OSError: [Errno 24] Too many open files"."""
    import http.client
    import resource

    host, port = proc.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        post_json(proc.url + "/v1/engram", {"input_ids": [[3, 4, 5]]}, connection=conn)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, len(os.listdir("/proc/self/fd")) + 8), hard))  # fmt: skip
        with pytest.raises(OSError, match="Too many open files"):
            while True:  # every descriptor the limit leaves
                held.append(os.open(os.devnull, os.O_RDONLY))
        status, answer = post_json(
            proc.url + "/v1/engram", {"input_ids": [[3, 4, 5]]}, connection=conn
        )
        assert status == 200 and answer["shape"] == [1, 3], answer
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        conn.close()


def test_a_serve_process_that_fails_to_start_leaves_no_descriptor_open(monkeypatch, tmp_path):
    """ServeProcess opened its log file twice (mkstemp's descriptor, then open()) and closed only
    the second: every ServeProcess, started or not, leaked a file descriptor."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkstemp puts the log
    for _ in range(3):
        with pytest.raises(RuntimeError, match="/nonexistent/serve.yaml: cannot read"):
            ServeProcess("/nonexistent/serve.yaml", metrics=False)
    held = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # closed since listed (another thread's)
            held.append(os.readlink(fd))
    assert not [path for path in held if path.startswith(str(tmp_path))], held


def test_a_serve_process_whose_process_cannot_be_started_leaves_no_log_file(monkeypatch, tmp_path):
    """When starting the process itself failed (Popen refusing an environment value), the
    ServeProcess's temporary log file was left behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkstemp puts the log
    with pytest.raises(ValueError, match="null byte"):
        ServeProcess("/nonexistent/serve.yaml", metrics=False, env={"BAD": "a\0b"})
    assert not list(tmp_path.glob("serve-*.log"))


def test_a_server_that_exits_before_listening_is_said_to_have_exited():
    """A server that exited at once (a missing config) was often reported as having "printed no
    'listening' line within 120.0s": its stdout ended before its exit, and the status was read
    in between."""
    for _ in range(5):
        with pytest.raises(RuntimeError) as raised:
            ServeProcess("/nonexistent/serve.yaml", metrics=False)
        assert str(raised.value).startswith("tiered-store serve exited with status 2;"), raised


def test_a_server_killed_before_listening_is_said_to_have_been_killed(tmp_path):
    """A server killed by a signal before it listened (the OOM killer's SIGKILL, a SIGSEGV) was
    reported as having "exited with status -9", a status no process exits with."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    )
    with pytest.raises(RuntimeError) as raised:
        ServeProcess("/nonexistent/serve.yaml", metrics=False, env={"PYTHONPATH": str(site)})
    assert str(raised.value).startswith("tiered-store serve was killed by signal SIGKILL;"), raised


_H11_WITHOUT_PRIVATE_DEFAULT = """
import uvicorn.protocols.http.h11_impl  # uvicorn's own import of it done, as of today's h11
import h11._connection
del h11._connection.DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # an h11 without this private name
"""


def test_the_server_starts_on_an_h11_without_its_private_default_size(config_path, tmp_path):
    """The server's h11 connection imported h11._connection.DEFAULT_MAX_INCOMPLETE_EVENT_SIZE,
    a private name: on an h11 without it `tiered-store serve` failed at import. h11's own
    default is used now (uvicorn's config unset)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_H11_WITHOUT_PRIVATE_DEFAULT)
    with ServeProcess(config_path, metrics=False, env={"PYTHONPATH": str(site)}) as server:
        assert get_json(server.url + "/healthz") == (200, {"status": "ok"})
        status, _, body = raw_exchange(server.url, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert status == 400 and "Missing mandatory Host" in json.loads(body)["error"], body


def _leave(sock: socket.socket, how: str) -> None:
    """End a client's side of a connection: ``close`` (a FIN), ``reset`` (an RST) or
    ``half-close`` (a FIN; it still reads)."""
    import struct

    if how == "half-close":
        sock.shutdown(socket.SHUT_WR)
        return
    if how == "reset":  # SO_LINGER 0: the close resets the connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _one_turn_held(tmp_path, settings: dict) -> tuple:
    """An in-process server of one compute turn (``settings`` added to its server section) whose
    first request, [[1, 2, 3]], computes until ``go_on`` is set: (server, the input ids each
    computed request had, go_on, the first request's thread, started)."""
    from tests.test_serve import start_server
    from tiered_store.serve.client import post_json

    server = start_server(make_checkpoint(tmp_path, server={"max_concurrent": 1, **settings}))
    computing, go_on = threading.Event(), threading.Event()
    answer, computed = server.model.answer, []

    def held_answer(request, *args, **kwargs):
        computed.append(request.input_ids.tolist())
        computing.set()
        go_on.wait(30)  # the first request holds the only compute turn
        return answer(request, *args, **kwargs)

    server.model.answer = held_answer
    url = server.url + "/v1/engram"
    first = threading.Thread(target=lambda: post_json(url, {"input_ids": [[1, 2, 3]]}))
    first.start()
    if not computing.wait(30):
        go_on.set()
        server.stop()
        raise AssertionError("the first request never began computing")
    return server, computed, go_on, first


@pytest.mark.parametrize(
    "settings", [{}, {"announce_requests": True}, {"drop_abandoned": False}], ids=str
)
def test_a_request_whose_client_leaves_while_it_waits_for_a_turn_is_not_computed(
    tmp_path, settings
):
    """max_concurrent 1, one request computing: three more wait for the turn, and their clients
    leave (close, reset, half-close). They were computed when the turn came, each for nobody
    (or for a half-closed client that still read). Now they are counted 499 at once, never
    computed, their announcements released; the half-closed client reads why (503). With
    server.drop_abandoned: false they are computed and the half-closed one gets its answer."""
    from tests.test_serve_announce import queued_requests

    drop = settings.get("drop_abandoned", True)
    server, computed, go_on, first = _one_turn_held(tmp_path, settings)
    host, port = server.url.removeprefix("http://").split(":")
    socks = []
    try:
        before = _answers(server.url, "499", "/v1/engram")
        for n, how in enumerate(("close", "reset", "half-close")):
            body = json.dumps({"input_ids": [[4 + n, 5, 6]]}).encode()
            head = f"POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            sock = socket.create_connection((host, int(port)), timeout=30)
            sock.sendall(head.encode() + body)
            time.sleep(0.3)  # it waits for the turn
            _leave(sock, how)
            socks.append(sock)
        deadline = time.monotonic() + 20
        while drop and _answers(server.url, "499", "/v1/engram") < before + 3:
            assert time.monotonic() < deadline, _answers(server.url, "499", "/v1/engram") - before
            time.sleep(0.05)
        if drop:  # while the first still computes: dropped, not left waiting for the turn
            assert len(computed) == 1
            if settings.get("announce_requests"):
                assert queued_requests(server) == [1, 1]  # the first's only
            reply = socks[2].recv(65536)
            assert reply.startswith(b"HTTP/1.1 503"), reply[:200]
            error = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
            assert error.startswith("not computed: the client ended its stream, or closed")
        go_on.set()
        first.join(30)
        if not drop:
            reply = b""
            while chunk := socks[2].recv(65536):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
            deadline = time.monotonic() + 20
            while len(computed) < 4:
                assert time.monotonic() < deadline, computed
                time.sleep(0.05)
        assert [ids[0][0] for ids in computed] == ([1] if drop else [1, 4, 5, 6])
    finally:
        go_on.set()
        first.join(30)
        for sock in socks:
            sock.close()
        server.stop()


def test_a_malformed_http_1_0_request_is_not_told_to_send_a_host_header(proc):
    """HTTP/1.0 needs no Host header, but a malformed HTTP/1.0 request's 400 said "expected
    HTTP/1.1 ... and a Host header"; an HTTP/1.1 one is still told."""
    for version, hinted in ((b"1.0", False), (b"1.1", True)):
        status, _, body = raw_exchange(
            proc.url, b"GET /healthz HTTP/" + version + b"\r\nHost: a\r\nno colon\r\n\r\n"
        )
        error = json.loads(body)["error"]
        assert status == 400 and error.startswith("malformed HTTP request ("), error
        assert ("Host header" in error) is hinted, error
    status, _, body = raw_exchange(  # a well-formed HTTP/1.0 request without Host is answered
        proc.url, b"GET /healthz HTTP/1.0\r\n\r\n"
    )
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_a_415_shows_a_utf8_content_type_as_sent(proc):
    """Starlette decodes headers as Latin-1: a 415 for "application/jsön" sent as UTF-8 named
    'application/jsÃ¶n'."""
    content_type = "application/jsön"
    request = (
        b"POST /v1/engram HTTP/1.1\r\nHost: a\r\nContent-Type: "
        + content_type.encode()
        + b"\r\nContent-Length: 2\r\n\r\n{}"
    )
    status, _, body = raw_exchange(proc.url, request)
    error = json.loads(body)["error"]
    assert status == 415 and f"Content-Type: got {content_type!r};" in error, error


def test_a_415_names_a_content_type_that_is_not_utf8_by_its_bytes(proc):
    r"""A Content-Type whose bytes are not UTF-8 ("text/" then 0xFF 0xFE) was shown as
    'text/\\xff\\xfe': backslashreplace wrote each byte as four characters, and repr doubled
    their backslash, as if the client had sent backslashes. It is shown as its bytes."""
    sent = b"text/\xff\xfe"
    request = (
        b"POST /v1/engram HTTP/1.1\r\nHost: a\r\nContent-Type: "
        + sent
        + b"\r\nContent-Length: 2\r\n\r\n{}"
    )
    status, _, body = raw_exchange(proc.url, request)
    error = json.loads(body)["error"]
    assert status == 415 and f"Content-Type: got {sent!r};" in error, error


def test_a_content_encoding_on_a_second_header_line_is_refused_too(proc):
    """A coding on a second Content-Encoding line (the lines make one list, RFC 9110 5.3) was
    not seen: the first said identity, so a gzip body was parsed as is and refused 400 "not
    UTF-8" for a body the client had coded. It is now a 415 naming both; identity twice is no
    coding."""

    def post(codings: tuple[str, ...], body: bytes) -> tuple[int, bytes]:
        lines = "".join(f"Content-Encoding: {coding}\r\n" for coding in codings)
        head = f"POST /v1/engram HTTP/1.1\r\nHost: x\r\n{lines}Content-Length: {len(body)}\r\n"
        status, _, answer = raw_exchange(
            proc.url, f"{head}Connection: close\r\n\r\n".encode() + body
        )
        return status, answer

    status, answer = post(("identity", "gzip"), gzip.compress(b'{"input_ids": [1]}'))
    error = json.loads(answer)["error"]
    assert status == 415, answer[:200]
    assert error == "Content-Encoding: got 'identity, gzip'; expected none (identity)", error
    assert post(("identity", "identity"), b'{"input_ids": [1]}')[0] == 200


def test_an_absolute_form_request_target_is_served_as_its_path(proc):
    """`GET http://host:port/healthz HTTP/1.1` (absolute-form, RFC 9112 3.2.2, which a server
    must accept) got 404 "no endpoint 'http://...'"; it is now served as /healthz."""
    host_port = proc.url.removeprefix("http://")
    before = _answers(proc.url, "200", "/healthz")
    for target in (f"http://{host_port}/healthz", f"HTTP://{host_port}/healthz?x=1"):
        status, _, body = raw_exchange(
            proc.url, f"GET {target} HTTP/1.1\r\nHost: other\r\n\r\n".encode()
        )
        assert (status, json.loads(body)) == (200, {"status": "ok"}), (target, body)
    assert _answers(proc.url, "200", "/healthz") == before + 2
    body = json.dumps({"input_ids": [1, 2, 3]}).encode()
    status, _, answer = raw_exchange(
        proc.url,
        f"POST http://{host_port}/v1/engram HTTP/1.1\r\nHost: {host_port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body,
    )
    assert status == 200, answer[:200]
    status, _, answer = raw_exchange(
        proc.url, f"GET http://{host_port}/nowhere HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    )
    assert status == 404 and "no endpoint '/nowhere'" in json.loads(answer)["error"], answer
    # no host, or user information: RFC 9110 4.2.1 / 4.2.4 (both were served, Host "" or "u:p@h")
    for target, why in (
        ("http:///healthz", "no host"),
        (f"http://user:pw@{host_port}/healthz", "user information in its authority"),
        # was refused as a Host header "a<b" the client never sent (that one is fine)
        ("http://a<b/healthz", "its authority 'a<b' is no host[:port]"),
        ("http://h:8o/healthz", "its authority 'h:8o' is no host[:port]"),
    ):
        status, _, answer = raw_exchange(
            proc.url, f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
        )
        error = json.loads(answer)["error"]
        assert status == 400 and error == f"request target '{target}': {why}; expected http://host[:port]/path, or /path", error  # fmt: skip


def test_a_request_target_that_is_no_path_is_answered_for_what_it_is(proc):
    """`OPTIONS *` (the server in general, RFC 9110 9.3.7), `CONNECT host:port` (a proxy's
    method) and a target with no leading slash (`GET healthz`) were each answered 404 "no
    endpoint '/*'" (or '/healthz', an endpoint the message then listed): a path the client never
    sent. `OPTIONS *` now gets 204 with the server's methods in Allow, CONNECT 501, and any other
    target that is no path 400 naming it."""
    status, head, body = raw_exchange(
        proc.url, b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert (status, body) == (204, b""), (head, body)
    assert b"\r\nallow: GET, HEAD, POST\r\n" in head + b"\r\n", head
    status, _, body = raw_exchange(
        proc.url, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    )
    error = json.loads(body)["error"]
    assert status == 501 and error.startswith(
        "CONNECT 'example.com:443': not supported (this server is no proxy); expected GET or "
        "POST of a path, one of /, /healthz"
    ), error
    for request, target in (
        (b"GET healthz HTTP/1.1\r\nHost: a\r\n\r\n", "healthz"),
        (b"GET healthz?x=1 HTTP/1.0\r\n\r\n", "healthz?x=1"),
        (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", "*"),
        (b"POST * HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}", "*"),
    ):
        status, _, body = raw_exchange(proc.url, request)
        error = json.loads(body)["error"]
        assert status == 400 and error == (
            f"request target {target!r}: not a path; expected /path, or http://host[:port]/path "
            "(or * with OPTIONS)"
        ), (request, error)
    assert get_json(proc.url + "/healthz") == (200, {"status": "ok"})


def test_an_http_2_preface_is_told_the_version_before_anything_else(proc):
    """`PRI * HTTP/2.0` (a client speaking HTTP/2 with prior knowledge) got 400 "request target
    '*': not a path" on a kept connection, then a second 400 for the preface's "SM" line (and
    `OPTIONS * HTTP/2.0` a 204): the version is checked first again, and the connection closed."""
    host, port = proc.url.removeprefix("http://").split(":")
    for preface in (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"OPTIONS * HTTP/2.0\r\nHost: a\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(preface)
            reply = b""
            while chunk := sock.recv(65536):  # the server closes after its one answer
                reply += chunk
        assert re.findall(rb"HTTP/1\.1 (\d+)", reply) == [b"400"], reply
        assert b'{"error":"HTTP/2.0: not supported; expected HTTP/1.0 or HTTP/1.1"}' in reply, reply


def test_raw_exchange_reads_a_204_on_a_kept_connection_as_bodiless(proc):
    """A 204 has no body and no Content-Length (RFC 9110 8.6): raw_exchange read its body until
    the server closed, so on a kept connection (open server.keep_alive_s, 5 s, past the 2 s
    timeout here) it waited for its timeout and raised."""
    status, head, body = raw_exchange(proc.url, b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", timeout=2)
    assert (status, body) == (204, b""), head


def test_raw_exchange_reads_the_answer_to_head_on_a_kept_connection_as_bodiless(proc):
    """The answer to HEAD has the Content-Length of the GET's body, and no body (RFC 9110
    9.3.2): raw_exchange read that many bytes, so on a kept connection it waited for its
    timeout and raised."""
    status, head, body = raw_exchange(
        proc.url, b"HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n", timeout=2
    )
    assert (status, body) == (200, b""), head
    assert b"\r\ncontent-length: 16" in head.lower(), head


def test_a_request_with_both_transfer_encoding_and_content_length_is_refused_and_closed(proc):
    """A body framed both ways (request smuggling: a proxy in front may read Content-Length where
    this server read the chunks) was served by its chunks, and the connection kept: a request
    pipelined after it was answered too (RFC 9112 6.3: the server MUST close after it). It is
    now answered 400 naming both headers, and the connection closed."""
    host, port = proc.url.removeprefix("http://").split(":")
    body = b'{"input_ids": [1]}'
    smuggled = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    request = (
        b"POST /v1/engram HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
        + smuggled
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):  # the server closes after its one answer
            reply += chunk
    assert re.findall(rb"HTTP/1\.1 (\d+)", reply) == [b"400"], reply
    error = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
    assert error == (
        "body: framed by both Transfer-Encoding and Content-Length; expected one of them "
        "(RFC 9112 6.3)"
    ), error


def test_an_http_1_0_request_with_transfer_encoding_is_refused(proc):
    """RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding MUST be treated as faulty
    framing (an HTTP/1.0 hop before this server may have passed the chunks on unread); it was
    computed and answered 200."""
    body = b'{"input_ids": [1]}'
    status, _, answer = raw_exchange(
        proc.url,
        b"POST /v1/engram HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n",
    )
    error = json.loads(answer)["error"]
    assert status == 400 and error == (
        "body: Transfer-Encoding in an HTTP/1.0 request; expected Content-Length (RFC 9112 6.1)"
    ), error


def test_a_host_header_that_is_no_host_is_refused(proc):
    """RFC 9112 3.2: a Host header with an invalid value MUST get 400 (a missing or repeated one
    did already, from h11); `Host: a b` or `Host: x/y` was served. Names, IPv4, [IPv6], a port,
    and an empty value (a target with no authority) are taken."""
    for host in ("a b", "x/y", "a@b", "h:8o", "[::1", "h\u00e9"):
        request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("latin-1")
        status, _, body = raw_exchange(proc.url, request)
        error = json.loads(body)["error"]
        assert status == 400 and error == (
            f"Host header: got {host!r}; expected host[:port] (a name, an IPv4 address or an "
            "[IPv6] one, RFC 9112 3.2)"
        ), (host, error)
    for host in ("", "localhost", "Example.COM:8080", "127.0.0.1:1", "[::1]:80", "x_y.-~%20"):
        status, _, body = raw_exchange(
            proc.url, f"GET /healthz HTTP/1.0\r\nHost: {host}\r\n\r\n".encode()
        )
        assert (status, json.loads(body)) == (200, {"status": "ok"}), (host, body)


def test_requests_pipelined_before_a_half_close_are_each_answered_while_the_turn_is_taken(
    tmp_path,
):
    """max_concurrent 1, one request computing: a client pipelines three requests, then
    half-closes while they wait. The first was answered 503 (not computed) with Connection:
    close, so the two after it were never answered nor counted; each is now answered 503 and
    counted 499, as eof_received answers requests pipelined before the end of the stream."""
    server, computed, go_on, first = _one_turn_held(tmp_path, {})
    host, port = server.url.removeprefix("http://").split(":")
    try:
        before = _answers(server.url, "499", "/v1/engram")
        requests = b""
        for n in range(3):
            body = json.dumps({"input_ids": [[4 + n, 5, 6]]}).encode()
            head = f"POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            requests += head.encode() + body
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(requests)
            time.sleep(0.3)  # the first of them waits for the turn
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(65536):  # the server closes after the last answer
                reply += chunk
        assert re.findall(rb"HTTP/1\.1 (\d+)", reply) == [b"503"] * 3, reply[:300]
        assert reply.count(b"not computed: the client ended its stream") == 3, reply[:600]
        assert _answers(server.url, "499", "/v1/engram") == before + 3
        assert len(computed) == 1
    finally:
        go_on.set()
        first.join(30)
        server.stop()


def _serve_signalled_in(
    tmp_path: Path, config: Path, site_code: str, marker: str, signum: int
) -> tuple[int, str, str]:
    """``serve config`` with ``site_code`` as its sitecustomize, sent ``signum`` once that code
    made the file the environment variable ``marker`` names (the stretch of the start it stalls
    has begun); its exit status, stdout and stderr."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(site_code)
    started = tmp_path / f"{marker.lower()}.started"
    env = subprocess_env({"PYTHONPATH": str(site), marker: str(started)})
    proc = subprocess.Popen(
        _serve_cmd(config, "127.0.0.1:0", ""), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), f"{marker}: the stalled stretch never began: nothing was tested"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


_SLOW_VERIFY = """
import os, time
import tiered_store.table_format as table_format
_verify = table_format.verify_table
def verify_table(*args, **kwargs):  # a 100 GB table's start-up check: a minute or more
    open(os.environ["VERIFY_STARTED"], "w").close()
    time.sleep(300)
    return _verify(*args, **kwargs)
table_format.verify_table = verify_table
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_server_starts_stops_it_before_it_listens(tmp_path, signum):
    """SIGTERM or SIGINT while serve opened its checkpoint (checkpoint.verify_on_start over a
    big table) was only noted: the start went on to its end, then the server listened, printed
    its 'listening' line and drained, so a stop waited out the whole check (SIGKILL by then)."""
    config = make_checkpoint(tmp_path, checkpoint={"path": "checkpoint", "verify_on_start": True})
    code, out, err = _serve_signalled_in(tmp_path, config, _SLOW_VERIFY, "VERIFY_STARTED", signum)
    assert code == 0, err[-3000:]
    assert out == "", out  # no 'listening' line: it never listened
    name = signal.Signals(signum).name
    assert f"{name} while starting: stopped before listening" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_a_request_refused_for_the_requests_running_says_so(tmp_path):
    """Past server.max_connections by the requests still running (one whose client left while it
    waited for its turn, ``server.drop_abandoned: false``), not by the connections open, the 503
    said "server busy: 2 connections open, the limit (server.max_connections) is 2": within the
    limit it names. It names the requests running."""
    server, _, go_on, first = _one_turn_held(
        tmp_path, {"max_connections": 2, "drop_abandoned": False, "request_timeout_s": 30.0}
    )
    host, port = server.url.removeprefix("http://").split(":")
    state = server._uvicorn.server_state
    try:
        body = json.dumps({"input_ids": [[4, 5, 6]]}).encode()
        head = f"POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 20
        while not server._compute.statistics().tasks_waiting:  # it waits for the turn
            assert time.monotonic() < deadline, "the second request never waited for a turn"
            time.sleep(0.01)
        _leave(sock, "reset")  # gone at once (a half-close keeps the connection for the answer)
        deadline = time.monotonic() + 20
        while len(state.connections) > 1:  # the server saw its client leave
            assert time.monotonic() < deadline, "the server never saw the client leave"
            time.sleep(0.01)
        status, _, answer = raw_exchange(server.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503, answer
        assert json.loads(answer) == {
            "error": "server busy: 3 requests running (those of clients gone included), the "
            "limit (server.max_connections) is 2; retry later"
        }
    finally:
        go_on.set()
        first.join(30)
        server.stop()


_SLOW_HTTP_START = """
import os, time
import uvicorn
_startup = uvicorn.Server.startup
async def startup(self, sockets=None):  # a start the signal comes in the middle of
    open(os.environ["HTTP_STARTING"], "w").close()
    time.sleep(2)
    return await _startup(self, sockets=sockets)
uvicorn.Server.startup = startup
"""


def test_a_signal_while_the_http_listener_starts_stops_it_without_a_traceback(tmp_path):
    """SIGTERM while uvicorn started on the bound sockets (the main thread waiting for it):
    the start closed the sockets under it, and its thread died printing 'Exception in thread
    tiered-store-http: ... OSError: [Errno 9] Bad file descriptor' (a number the process
    might have reused meanwhile). uvicorn is stopped and joined before its sockets close."""
    config = make_checkpoint(tmp_path)
    code, out, err = _serve_signalled_in(
        tmp_path, config, _SLOW_HTTP_START, "HTTP_STARTING", signal.SIGTERM
    )
    assert code == 0, err[-3000:]
    assert out == "", out  # no 'listening' line
    assert "SIGTERM while starting: stopped before listening" in err, err[-3000:]
    assert "Traceback" not in err and "Bad file descriptor" not in err, err[-3000:]
