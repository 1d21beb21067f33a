"""``tiered-store serve``: answers, malformed requests, load, trace replay, scrubbing, SIGTERM drain."""

from __future__ import annotations

import http.client
import json
import socket
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TINY_SERVE_MODEL
from tiered_store.engram import Engram, InMemoryTable
from tiered_store.errors import ConfigError, TierIOError
from tiered_store.serve import EMBED_BUCKETS, EngramStack, InferenceServer, ServeConfig
from tiered_store.serve.client import ServeProcess, get_json, post_json, run_load, zipf_requests
from tiered_store.trace import TraceReader
from zipf_analysis.replay import replay

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "serve.yaml"
CONFIG = {
    **TINY_SERVE_MODEL,
    "store": {
        "tiers": {"hot": {"capacity": "3%"}, "warm": {"capacity": "15%"}, "cold": {"threads": 2}},
    },
    "server": {
        "max_batch": 8,
        "max_seq_len": 256,
        "max_tokens": 1024,
        "max_body_bytes": 65536,
        "max_output_values": 20000,
        "torch_threads": 1,
    },
}


def write_config(directory: Path, **sections) -> Path:
    """CONFIG with ``sections`` merged in, as ``directory/serve.yaml``."""
    data = {k: dict(v) for k, v in CONFIG.items()}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_server(path: Path, **kwargs) -> InferenceServer:
    """An in-process server on a free loopback port, tables built if missing."""
    config = ServeConfig.from_yaml(path).with_overrides(address="127.0.0.1:0", metrics_address="")
    server = InferenceServer(config, create_tables=True, **kwargs)
    server.start()
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(write_config(tmp_path_factory.mktemp("serve")))
    yield srv
    srv.stop()


def request(server, method: str, path: str, body: bytes | None = None, headers=None):
    """(status, headers, decoded JSON or raw bytes) of one request."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, response.headers, json.loads(raw)
        except ValueError:
            return response.status, response.headers, raw
    finally:
        conn.close()


def raw_exchange(server, data: bytes, *, half_close: bool = True) -> tuple[int, dict | None]:
    """Send raw bytes, read the raw answer: (status, JSON body or None)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head.startswith(b"HTTP/") else 0
    return status, (json.loads(body) if body else None)


# -- config -----------------------------------------------------------------------------------------


def test_example_config_is_valid():
    cfg = ServeConfig.from_yaml(EXAMPLE)
    assert cfg.table_names == ["layer1", "layer4"]
    assert cfg.metrics_address == "127.0.0.1:9400" and cfg.server.address == "127.0.0.1:8080"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bogus": {}}, "bogus: unknown key"),
        ({"tables": {"path": "t.npy"}}, "'{layer}' placeholder"),
        ({"server": {"max_batch": 0}}, "server.max_batch"),
        (
            {"server": {"address": "localhost"}},
            "server.address: got 'localhost'; expected 'host:port'",
        ),
        ({"store": {"table": {"path": "x.npy"}}}, "store.table"),
        ({"store": {"tiers": {"hot": {"capacity": "lots"}}}}, "tiers.hot.capacity"),
        ({"store": {"metrics": {"address": "9400"}}}, "store.metrics.address"),
        ({"engram": {"layer_ids": [1, 1]}}, "engram.layer_ids"),
    ],
)
def test_config_errors_name_the_key(change, message):
    data = {k: dict(v) for k, v in CONFIG.items()}
    for key, value in change.items():
        data[key] = value
    with pytest.raises(ConfigError, match=None) as info:
        ServeConfig.from_dict(data)
    assert message in str(info.value)


def test_missing_tables_are_an_error_without_create(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*--create-tables"):
        EngramStack(ServeConfig.from_yaml(write_config(tmp_path)))


# -- answers ----------------------------------------------------------------------------------------


def test_answer_matches_an_in_memory_reference(server):
    ids = [[5, 17, 900, 17, 5, 12], [1, 2, 3, 4, 5, 6]]
    status, answer = post_json(server.url + "/v1/engram", {"input_ids": ids, "return_output": True})
    assert status == 200, answer
    assert answer["shape"] == [2, 6, 2, 16] and answer["layers"] == [1, 3]
    output = np.asarray(answer["output"], dtype=np.float32)
    assert answer["checksum"] == f"crc32:{zlib.crc32(output.tobytes()):08x}"
    assert answer["rows_looked_up"] == {"layer1": 2 * 6 * 4, "layer3": 2 * 6 * 4}

    # The same model with each table in RAM (the reference nn.Embedding behaviour).
    cfg, stack = server.config, server.stack
    hidden = (
        torch.randn(
            EMBED_BUCKETS, cfg.backbone.hidden_size, generator=torch.Generator().manual_seed(0)
        )[torch.tensor(ids)]
        .unsqueeze(2)
        .expand(-1, -1, 2, -1)
    )
    for layer in cfg.engram.layer_ids:
        weight = torch.from_numpy(np.load(cfg.table_path(layer)))
        torch.manual_seed(cfg.dense.seed * 1_000_003 + layer)
        ref = Engram(
            cfg.engram, cfg.backbone, layer, hasher=stack.hasher, backend=InMemoryTable(weight)
        )
        with torch.no_grad():
            hidden = hidden + ref(hidden, torch.tensor(ids))
    np.testing.assert_allclose(output, hidden.numpy(), rtol=1e-5, atol=1e-6)

    # Same input again (now partly from the cache tiers): bit-identical answer.
    _, again = post_json(server.url + "/v1/engram", {"input_ids": ids})
    assert again["checksum"] == answer["checksum"]
    assert again["layer_checksums"] == answer["layer_checksums"]


def test_checkpoint_layers_over_tiered_stores_reproduce_the_golden_forward(tmp_path):
    """Tables from the golden checkpoint's weights, dense weights via dense.checkpoint."""
    from safetensors.torch import load_file

    from tests.conftest import golden_dir

    golden_path = golden_dir("engram_forward.safetensors") / "engram_forward.safetensors"

    from tiered_store.engram import split_checkpoint
    from tiered_store.table_format import create_table

    golden = load_file(golden_path)
    meta = json.loads(golden_path.with_suffix(".json").read_text())
    for layer in (1, 4):
        weight, _ = split_checkpoint(golden_path, layer)
        create_table(tmp_path / f"layer{layer}.npy", weight, progress=False)
    path = tmp_path / "golden.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "engram": meta["engram"],
                "backbone": meta["backbone"],
                "tables": {"path": "layer{layer}.npy"},
                "store": {"tiers": {"hot": {"capacity": 64}, "warm": {"capacity": "10%"}}},
                "dense": {"checkpoint": str(golden_path)},
            }
        )
    )
    stack = EngramStack(ServeConfig.from_yaml(path))
    try:
        for layer in (1, 4):
            out = stack.layers[layer](golden[f"layer{layer}.hidden_states"], golden["input_ids"])
            torch.testing.assert_close(out, golden[f"layer{layer}.output"], atol=1e-5, rtol=1e-5)
        assert stack.stats()["layer1"]["cold"]["rows_read"] > 0
    finally:
        stack.close()


def test_text_is_tokenised_and_padded(server):
    status, answer = post_json(server.url + "/v1/engram", {"text": ["Hello, Engram!", "Hi"]})
    assert status == 200, answer
    tokenizer = server.stack.hasher.tokenizer
    first, second = tokenizer.encode("Hello, Engram!").tolist(), tokenizer.encode("Hi").tolist()
    assert answer["lengths"] == [len(first), len(second)]
    pad = server.config.engram.pad_id
    assert answer["input_ids"] == [first, second + [pad] * (len(first) - len(second))]
    _, single = post_json(server.url + "/v1/engram", {"text": "Hi"})
    assert single["shape"][:2] == [1, len(second)]


def test_get_endpoints(server):
    status, _, health = request(server, "GET", "/healthz")
    assert (status, health) == (200, {"status": "ok"})
    status, _, index = request(server, "GET", "/")
    assert status == 200 and "POST /v1/engram" in index["endpoints"]
    status, _, stats = request(server, "GET", "/stats")
    assert status == 200 and set(stats["tables"]) == {"layer1", "layer3"}
    assert set(stats["tables"]["layer1"]) >= {"hot", "warm", "cold", "prefetch", "lookup"}
    status, headers, body = request(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {
        "tiered_store_lookups",
        "tiered_store_http_requests",
        "process_resident_memory_bytes",
    } <= names
    status, _, body = request(server, "HEAD", "/healthz")
    assert status == 200 and body == b""


# -- malformed requests -----------------------------------------------------------------------------

BAD_REQUESTS = [
    # (method, path, body, headers, status, words in the message)
    ("POST", "/v1/engram", b"{not json", {}, 400, "not valid JSON"),
    ("POST", "/v1/engram", b"\xff\xfe", {}, 400, "not valid JSON"),
    ("POST", "/v1/engram", b"[1, 2]", {}, 400, "got a JSON array; expected an object"),
    ("POST", "/v1/engram", b"{}", {}, 400, "exactly one of 'input_ids' and 'text'"),
    ("POST", "/v1/engram", b'{"input_ids": [1], "text": "a"}', {}, 400, "exactly one of"),
    ("POST", "/v1/engram", b'{"input_ids": [1], "ids": 1}', {}, 400, "ids: unknown key"),
    ("POST", "/v1/engram", b'{"input_ids": []}', {}, 400, "non-empty list"),
    ("POST", "/v1/engram", b'{"input_ids": "1 2 3"}', {}, 400, "got string"),
    ("POST", "/v1/engram", b'{"input_ids": [1, 2.5]}', {}, 400, "input_ids[1]: got float 2.5"),
    ("POST", "/v1/engram", b'{"input_ids": [true]}', {}, 400, "got boolean true"),
    ("POST", "/v1/engram", b'{"input_ids": [null]}', {}, 400, "got null"),
    ("POST", "/v1/engram", b'{"input_ids": [[1, 2], 3]}', {}, 400, "input_ids[1]: got integer"),
    ("POST", "/v1/engram", b'{"input_ids": [[1, [2]]]}', {}, 400, "input_ids[0][1]: got array"),
    ("POST", "/v1/engram", b'{"input_ids": [[1, 2], [3]]}', {}, 400, "different lengths"),
    ("POST", "/v1/engram", b'{"input_ids": [[]]}', {}, 400, "empty sequence"),
    ("POST", "/v1/engram", b'{"input_ids": [-1]}', {}, 400, "token id -1 is outside"),
    ("POST", "/v1/engram", b'{"input_ids": [[0, 129280]]}', {}, 400, "input_ids[0][1]: token id 129280"),
    ("POST", "/v1/engram", b'{"input_ids": [99999999999999999999999]}', {}, 400, "out of range"),
    ("POST", "/v1/engram", b'{"input_ids": [1], "return_output": 1}', {}, 400, "return_output"),
    ("POST", "/v1/engram", b'{"text": 5}', {}, 400, "text: got integer; expected a string"),
    ("POST", "/v1/engram", b'{"text": ["ok", ""]}', {}, 400, "text[1]: tokenises to no tokens"),
    ("POST", "/v1/engram", b'{"text": []}', {}, 400, "empty list"),
    ("POST", "/v1/engram", json.dumps({"input_ids": [[1]] * 9}).encode(), {}, 413, "server.max_batch"),
    ("POST", "/v1/engram", json.dumps({"input_ids": [1] * 257}).encode(), {}, 413, "server.max_seq_len"),
    ("POST", "/v1/engram", json.dumps({"input_ids": [[1] * 200] * 8}).encode(), {}, 413, "server.max_tokens"),
    ("POST", "/v1/engram", json.dumps({"input_ids": [[1] * 200] * 4, "return_output": True}).encode(), {}, 413, "max_output_values"),
    ("POST", "/v1/engram", b" " * 70000, {}, 413, "server.max_body_bytes"),
    ("POST", "/v1/engram", b"[" * 60000, {}, 400, "body"),
    ("POST", "/v1/engram", b'{"text": "a"}', {"Content-Type": "multipart/form-data"}, 415, "Content-Type"),
    ("GET", "/v1/engram", None, {}, 405, "expected POST"),
    ("PUT", "/stats", b"{}", {}, 405, "expected GET"),
    ("GET", "/v2/engram", None, {}, 404, "no endpoint '/v2/engram'"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "words"), BAD_REQUESTS)
def test_malformed_requests_get_4xx_with_a_clear_message(
    server, method, path, body, headers, status, words
):
    got, reply_headers, answer = request(server, method, path, body, headers)
    assert got == status, answer
    assert words in answer["error"], answer
    assert "Traceback" not in json.dumps(answer)
    if status == 405:
        assert reply_headers["Allow"] in ("GET", "POST")


def test_protocol_level_errors_and_the_server_survives(server):
    port = server.url.rsplit(":", 1)[1]
    cases = [
        (b"POST /v1/engram HTTP/1.1\r\nHost: x\r\n\r\n", 411, "Content-Length"),
        (b"POST /v1/engram HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400, "Content-Length"),
        (b"POST /v1/engram HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, "Transfer-Encoding"),
        (b"POST /v1/engram HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"input_ids\"", 400, "got 12 of the 100 bytes"),
        (b"BREW /pot HTTP/1.1\r\n\r\n", 501, "Unsupported method"),
        (b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431, "Too many headers"),
        (b"NONSENSE\r\n\r\n", 0, None),  # HTTP/0.9 style: answered without a status line
    ]  # fmt: skip
    for data, status, words in cases:
        got, answer = raw_exchange(server, data)
        assert got == status, (data[:40], got, answer)
        if words:
            assert words in answer["error"], answer
    with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
        pass  # a client that connects and leaves without a word
    assert request(server, "GET", "/healthz")[0] == 200
    status, _, answer = request(server, "POST", "/v1/engram", b'{"input_ids": [1, 2, 3]}')
    assert status == 200, answer


def test_server_errors_never_leak_a_traceback(server, monkeypatch):
    def boom(input_ids):
        raise RuntimeError("secret internal detail /etc/shadow")

    monkeypatch.setattr(server.stack, "forward", boom)
    status, _, answer = request(server, "POST", "/v1/engram", b'{"input_ids": [1]}')
    assert status == 500
    assert answer == {"error": "internal server error (details are in the server log)"}

    def disk_failure(input_ids):
        raise TierIOError("table layer1.npy: read of 4096 bytes at 8192 failed twice: EIO")

    monkeypatch.setattr(server.stack, "forward", disk_failure)
    status, _, answer = request(server, "POST", "/v1/engram", b'{"input_ids": [1]}')
    assert status == 503 and "cold tier read failed" in answer["error"]
    monkeypatch.undo()
    assert request(server, "POST", "/v1/engram", b'{"input_ids": [1]}')[0] == 200
    _, _, stats = request(server, "GET", "/stats")
    assert stats["server"]["requests"]["/v1/engram"]["500"] >= 1


# -- load -------------------------------------------------------------------------------------------


def test_small_load_no_errors_no_lost_requests(server):
    before = get_json(server.url + "/stats")[1]["server"]["requests"]["/v1/engram"].get("200", 0)
    bodies = zipf_requests(48, batch=2, tokens=32, seed=3)
    result = run_load(server.url + "/v1/engram", bodies, clients=4, check=lambda a: "checksum" in a)
    assert result.errors == {} and result.lost == 0 and result.answered == 48
    assert result.requests_per_second > 0 and result.percentile_ms(99) >= result.percentile_ms(50)
    deadline = time.monotonic() + 10  # a request is counted just after its answer is written
    while True:
        stats = get_json(server.url + "/stats")[1]["server"]
        if stats["requests"]["/v1/engram"]["200"] == before + 48 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert stats["requests"]["/v1/engram"]["200"] == before + 48
    assert stats["in_flight"] == 1  # this /stats request itself


# -- trace, scrubbing --------------------------------------------------------------------------------


def test_recorded_trace_replays_to_the_store_statistics(tmp_path, capsys):
    """Concurrent clients, then replay: the same cache code on the same batches, equal counters."""
    server = start_server(write_config(tmp_path), trace=tmp_path / "served.trace")
    bodies = zipf_requests(30, batch=2, tokens=24, seed=4)
    result = run_load(server.url + "/v1/engram", bodies, clients=3)
    assert result.answered == 30
    server.stop()
    stats = server.stack.stats()
    reader = TraceReader(tmp_path / "served.trace")
    assert reader.tables == ["layer1", "layer3"] and reader.n_batches == 60
    for layer, name in zip(server.config.engram.layer_ids, server.config.table_names, strict=True):
        replayed = replay(server.config.store_config(layer), reader, table=name)
        for tier in ("hot", "warm"):
            for key in ("lookups", "hits", "admissions", "evictions"):
                assert replayed.tiers[tier][key] == stats[name][tier][key], (name, tier, key)

    # `tiered-store replay` reads it too, with the layer's store config as YAML.
    from tiered_store.cli import main

    store_yaml = tmp_path / "layer1-store.yaml"
    store_yaml.write_text(
        yaml.safe_dump({**CONFIG["store"], "table": {"path": str(server.config.table_path(1))}})
    )
    out = tmp_path / "replay-out"
    args = ["replay", str(store_yaml), str(tmp_path / "served.trace"), "--table", "layer1"]
    assert main([*args, "--no-bounds", "--sweep", "", "--out", str(out)]) == 0
    doc = json.loads((out / "replay.json").read_text())
    assert doc["results"][0]["tiers"]["hot"]["hits"] == stats["layer1"]["hot"]["hits"]
    capsys.readouterr()


def test_background_scrub_finds_a_corrupt_table(tmp_path):
    config = write_config(tmp_path, tables={"scrub_interval_s": 0.2})
    server = start_server(config)
    server.stop()  # tables built; now serve them with a separate metrics listener
    cfg = ServeConfig.from_yaml(config).with_overrides(
        address="127.0.0.1:0", metrics_address="127.0.0.1:0"
    )
    server = InferenceServer(cfg)
    server.start()
    try:
        path = cfg.table_path(3)
        with open(path, "r+b") as f:  # flip one byte of layer 3's data
            f.seek(4096 + 1000)
            byte = f.read(1)
            f.seek(4096 + 1000)
            f.write(bytes([byte[0] ^ 0xFF]))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status, _, health = request(server, "GET", "/healthz")
            if status == 503:
                break
            time.sleep(0.1)
        assert status == 503 and "table layer3: checksum pass failed" in health["problems"][0]
        assert "block 0" in health["problems"][0]
        parts = urlsplit(server.metrics_url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("GET", parts.path)
        text = conn.getresponse().read().decode()
        conn.close()
        failures = {
            s.labels["table"]: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "tiered_store_checksum_failures_total"
        }
        assert failures["layer3"] >= 1 and failures["layer1"] == 0
    finally:
        server.stop()


# -- the process: SIGTERM drains ----------------------------------------------------------------------


def test_sigterm_finishes_the_request_in_flight_then_exits_0(tmp_path):
    config = write_config(tmp_path)
    trace = tmp_path / "sigterm.trace"
    with ServeProcess(
        config, "--create-tables", "--record-trace", str(trace), metrics=False
    ) as proc:
        host, port = proc.url.removeprefix("http://").split(":")
        body = json.dumps({"input_ids": [[7, 8, 9, 10]]}).encode()
        sock = socket.create_connection((host, int(port)), timeout=30)
        head = f"POST /v1/engram HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        sock.sendall(head + body[:10])  # the request is in flight: the server waits for the rest
        deadline = time.monotonic() + 20
        while get_json(proc.url + "/stats")[1]["server"]["in_flight"] < 2:  # it, and this /stats
            assert time.monotonic() < deadline, "the in-flight request never started"
            time.sleep(0.05)
        proc.proc.terminate()  # SIGTERM
        deadline = time.monotonic() + 20
        while True:  # it stops accepting new connections
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
            except OSError:
                break
            assert time.monotonic() < deadline, "still accepting after SIGTERM"
            time.sleep(0.05)
        assert proc.proc.poll() is None  # still draining
        sock.sendall(body[10:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.0 200"), answer[:200]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["shape"] == [1, 4, 2, 16]
        assert proc.proc.wait(30) == 0, proc.log()
        assert "SIGTERM: draining" in proc.log()
    with TraceReader(trace) as reader:  # closed properly: the in-flight request is in it
        assert reader.n_batches == 2 and reader.tables == ["layer1", "layer3"]


def test_cli_help_lists_serve():
    from tiered_store.cli import build_parser

    help_text = build_parser().format_help()
    assert "serve" in help_text
