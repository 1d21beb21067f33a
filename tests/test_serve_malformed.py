"""Malformed requests, table-driven, against a running ``tiered-store serve``: each gets its 4xx
and a message naming the field or the limit, never a traceback, always valid JSON.

The limits of the server under test (tests/serve_support.py): max_batch 8, max_seq_len 256,
max_tokens 1024, max_text_chars 4096, max_body_bytes 65536; the tokenizer has 129,280 ids.
"""

from __future__ import annotations

import gzip
import http.client
import json
from urllib.parse import urlsplit

import pytest

from tests.serve_support import make_checkpoint
from tiered_store.serve.client import ServeProcess, get_json

E = "/v1/engram"
J = {"Content-Type": "application/json"}


def ids(n: int, rows: int | None = None) -> bytes:
    """A body of ``n`` token ids (in ``rows`` rows, when given)."""
    doc = {"input_ids": [1] * n if rows is None else [[1] * n] * rows}
    return json.dumps(doc).encode()


# (method, path, body, headers, status, words in the message)
MALFORMED = [
    # not JSON, or not an object
    ("POST", E, b"{not json", {}, 400, "not valid JSON"),
    ("POST", E, b"", {}, 400, "body: empty; expected a JSON object"),
    ("POST", E, b"   ", {}, 400, "body: empty; expected a JSON object"),
    ("POST", E, b"\xff\xfe", {}, 400, "not valid JSON"),
    ("POST", E, b'{"text": "caf\xe9"}', {}, 400, "body: not UTF-8 (invalid continuation byte at byte 13)"),  # Latin-1
    ("POST", E, b'{"input_ids": [1, 2,]}', {}, 400, "not valid JSON"),
    ("POST", E, b'{"input_ids": [1]} trailing', {}, 400, "not valid JSON"),
    ("POST", E, b"{'input_ids': [1]}", {}, 400, "not valid JSON"),
    ("POST", E, b'{"input_ids": [1e999999999999999999]}', {}, 400, "input_ids[0]: got float"),
    ("POST", E, b'{"input_ids": [' + b"9" * 5000 + b"]}", {}, 400, "not valid JSON"),
    ("POST", E, b"[" * 60000, {}, 400, "body"),
    ("POST", E, b'{"a":' * 3000 + b"1" + b"}" * 3000, {}, 400, "nested too deeply"),
    ("POST", E, b"[1, 2]", {}, 400, "got a JSON array; expected an object"),
    ("POST", E, b'"input_ids"', {}, 400, "got a JSON string; expected an object"),
    ("POST", E, b"42", {}, 400, "got a JSON integer; expected an object"),
    ("POST", E, b"null", {}, 400, "got a JSON null; expected an object"),
    ("POST", E, b"true", {}, 400, "got a JSON boolean; expected an object"),
    # keys
    ("POST", E, b"{}", {}, 400, "exactly one of 'input_ids' and 'text'"),
    ("POST", E, b'{"input_ids": [1], "text": "a"}', {}, 400, "exactly one of"),
    ("POST", E, b'{"input_ids": [1], "ids": 1}', {}, 400, "ids: unknown key"),
    ("POST", E, b'{"prompt": "hi"}', {}, 400, "prompt: unknown key; expected one of input_ids, text, top_k"),
    ("POST", E, b'{"Input_ids": [1]}', {}, 400, "Input_ids: unknown key"),
    ("POST", E, b'{"input_ids": [1], "return_output": true}', {}, 400, "return_output: unknown key"),
    ("POST", E, json.dumps({"k" * 60000: 1}).encode(), {}, 400, "k... (60,000 characters): unknown key; expected one of"),
    ("POST", E, b'{"input_ids": [1, 2], "input_ids": [3]}', {}, 400, 'body: key "input_ids" appears twice; expected each key once'),
    ("POST", E, b'{"text": "a", "top_k": 2, "top_k": 3}', {}, 400, 'body: key "top_k" appears twice'),
    # input_ids: types and shapes
    ("POST", E, b'{"input_ids": []}', {}, 400, "input_ids: got an empty list; expected a non-empty"),
    ("POST", E, b'{"input_ids": null}', {}, 400, "input_ids: got null"),
    ("POST", E, b'{"input_ids": "1 2 3"}', {}, 400, "input_ids: got string"),
    ("POST", E, b'{"input_ids": 7}', {}, 400, "input_ids: got integer"),
    ("POST", E, b'{"input_ids": {"0": 1}}', {}, 400, "input_ids: got object"),
    ("POST", E, b'{"input_ids": [1, 2.5]}', {}, 400, "input_ids[1]: got float 2.5"),
    ("POST", E, b'{"input_ids": [1.0]}', {}, 400, "input_ids[0]: got float 1.0"),
    ("POST", E, b'{"input_ids": [NaN]}', {}, 400, "input_ids[0]: got float NaN"),
    ("POST", E, b'{"input_ids": [Infinity]}', {}, 400, "input_ids[0]: got float Infinity"),
    ("POST", E, b'{"input_ids": [true]}', {}, 400, "got boolean true"),
    ("POST", E, b'{"input_ids": [false, 1]}', {}, 400, "input_ids[0]: got boolean false"),
    ("POST", E, b'{"input_ids": [null]}', {}, 400, "input_ids[0]: got null; expected an integer"),
    ("POST", E, b'{"input_ids": ["1"]}', {}, 400, 'input_ids[0]: got string "1"'),
    ("POST", E, b'{"input_ids": [{"id": 1}]}', {}, 400, "input_ids[0]: got object"),
    ("POST", E, b'{"input_ids": [[1, 2], 3]}', {}, 400, "input_ids[1]: got integer"),
    ("POST", E, b'{"input_ids": [[1, [2]]]}', {}, 400, "input_ids[0][1]: got array"),
    ("POST", E, b'{"input_ids": [[[1]]]}', {}, 400, "input_ids[0][0]: got array"),
    ("POST", E, b'{"input_ids": [[1, 2], [3]]}', {}, 400, "different lengths"),
    ("POST", E, b'{"input_ids": [[1], [2, 3], [4]]}', {}, 400, "rows have different lengths [1, 2]"),
    ("POST", E, b'{"input_ids": [[]]}', {}, 400, "input_ids[0]: empty sequence"),
    ("POST", E, b'{"input_ids": [[1], []]}', {}, 400, "input_ids[1]: empty sequence"),
    # input_ids: values
    ("POST", E, b'{"input_ids": [-1]}', {}, 400, "token id -1 is outside the vocabulary"),
    ("POST", E, b'{"input_ids": [[0, 129280]]}', {}, 400, "input_ids[0][1]: token id 129280"),
    ("POST", E, b'{"input_ids": [129279, 129281]}', {}, 400, "input_ids[1]: token id 129281"),
    ("POST", E, b'{"input_ids": [4611686018427387904]}', {}, 400, "out of range"),
    ("POST", E, b'{"input_ids": [-4611686018427387904]}', {}, 400, "out of range"),
    ("POST", E, b'{"input_ids": [99999999999999999999999]}', {}, 400, "out of range"),
    ("POST", E, b'{"input_ids": [-99999999999999999999999]}', {}, 400, "out of range"),
    ("POST", E, b'{"input_ids": [1' + b"0" * 400 + b"]}", {}, 400, "input_ids[0]: token id 10000000000000000000... (401 digits) is out of range"),
    ("POST", E, b'{"input_ids": [[1, -1' + b"0" * 400 + b"]]}", {}, 400, "input_ids[0][1]: token id -1000000000000000000... (401 digits)"),
    # top_k
    ("POST", E, b'{"input_ids": [1], "top_k": 0}', {}, 400, "top_k: got integer 0; expected an integer from 1 to 20"),
    ("POST", E, b'{"input_ids": [1], "top_k": 21}', {}, 400, "top_k: got integer 21"),
    ("POST", E, b'{"input_ids": [1], "top_k": 2.0}', {}, 400, "top_k: got float 2.0"),
    ("POST", E, b'{"input_ids": [1], "top_k": "3"}', {}, 400, 'top_k: got string "3"'),
    ("POST", E, b'{"input_ids": [1], "top_k": true}', {}, 400, "top_k: got boolean true"),
    ("POST", E, b'{"input_ids": [1], "top_k": null}', {}, 400, "top_k: got null; expected an"),
    # text
    ("POST", E, b'{"text": 5}', {}, 400, "text: got integer; expected a string"),
    ("POST", E, b'{"text": null}', {}, 400, "text: got null; expected a string"),
    ("POST", E, b'{"text": {"a": "b"}}', {}, 400, "text: got object"),
    ("POST", E, b'{"text": ["ok", 7]}', {}, 400, "text[1]: got integer"),
    ("POST", E, b'{"text": ["ok", ["nested"]]}', {}, 400, "text[1]: got array"),
    ("POST", E, b'{"text": ""}', {}, 400, "text: tokenises to no tokens"),
    ("POST", E, b'{"text": ["ok", ""]}', {}, 400, "text[1]: tokenises to no tokens"),
    ("POST", E, b'{"text": []}', {}, 400, "text: got an empty list"),
    ("POST", E, b'{"text": "a\\ud800b"}', {}, 400, "text: a lone surrogate '\\ud800' at character 1"),
    ("POST", E, b'{"text": ["fine", "\\udfff"]}', {}, 400, "text[1]: a lone surrogate"),
    # limits (413), checked before any tokenising
    ("POST", E, ids(1, rows=9), {}, 413, "9 sequences; this server takes at most 8 (server.max_batch)"),
    ("POST", E, json.dumps({"text": ["a"] * 9}).encode(), {}, 413, "text: 9 sequences"),
    ("POST", E, ids(257), {}, 413, "a sequence of 257 tokens; this server takes at most 256"),
    ("POST", E, ids(200, rows=8), {}, 413, "1,600 tokens (batch x longest sequence)"),
    ("POST", E, json.dumps({"text": "x" * 4097}).encode(), {}, 413, "text: 4,097 characters"),
    ("POST", E, json.dumps({"text": ["ok", "y" * 5000]}).encode(), {}, 413, "text[1]: 5,000 characters; this server tokenises at most 4,096"),
    ("POST", E, json.dumps({"text": "z" * 60000}).encode(), {}, 413, "server.max_text_chars"),
    ("POST", E, b" " * 70000, {}, 413, "body: 70,000 bytes; this server takes at most 65,536 (server.max_body_bytes)"),
    ("POST", E, ids(30000), {}, 413, "server.max_body_bytes"),
    # content types
    ("POST", E, b'{"text": "a"}', {"Content-Type": "multipart/form-data"}, 415, "Content-Type: got 'multipart/form-data'"),
    ("POST", E, b'{"text": "a"}', {"Content-Type": "application/xml"}, 415, "expected application/json"),
    ("POST", E, b'{"text": "a"}', {"Content-Type": "image/png"}, 415, "Content-Type"),
    ("POST", E, b'{"text": "a"}', {"Content-Type": "application/msgpack"}, 415, "Content-Type"),
    # a coded body was parsed as is: 400 "not valid JSON" for a gzip body (RFC 9110 15.5.16: 415)
    ("POST", E, gzip.compress(b'{"text": "a"}', mtime=0), {"Content-Encoding": "gzip"}, 415, "Content-Encoding: got 'gzip'; expected none (identity)"),
    ("POST", E, b'{"text": "a"}', {"Content-Encoding": "br, identity"}, 415, "Content-Encoding: got 'br, identity'"),
    # methods and paths
    ("GET", E, None, {}, 405, "GET /v1/engram: method not allowed; expected POST"),
    ("PUT", E, b"{}", {}, 405, "expected POST"),
    ("DELETE", E, None, {}, 405, "expected POST"),
    ("PATCH", E, b"{}", {}, 405, "expected POST"),
    ("PUT", "/stats", b"{}", {}, 405, "PUT /stats: method not allowed; expected GET"),
    ("POST", "/healthz", b"{}", {}, 405, "expected GET"),
    ("DELETE", "/metrics", None, {}, 405, "expected GET"),
    ("POST", "/", b"{}", {}, 405, "expected GET"),
    ("GET", "/v2/engram", None, {}, 404, "no endpoint '/v2/engram'"),
    ("POST", "/v1/engram/", b"{}", {}, 404, "no endpoint '/v1/engram/'"),
    ("GET", "/healthz/extra", None, {}, 404, "no endpoint"),
    ("GET", "/../etc/passwd", None, {}, 404, "no endpoint"),
    ("GET", "/admin", None, {}, 404, "expected one of /, /healthz, /stats, /metrics, /v1/engram"),
    ("BREW", "/pot", None, {}, 404, "no endpoint '/pot'"),
    ("B" * 3000, "/healthz", None, {}, 405, "B... (3,000 characters) /healthz: method not allowed; expected GET"),  # was echoed whole
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = make_checkpoint(tmp_path_factory.mktemp("malformed"))
    with ServeProcess(config, metrics=False) as proc:
        yield proc
        log = proc.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def _strict_json(raw: bytes) -> object:
    """Parse JSON refusing NaN and Infinity (what strict clients do)."""

    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(raw, parse_constant=refuse)


def test_the_table_is_large_and_distinct():
    assert len(MALFORMED) >= 76
    keys = [(m, p, b, tuple(sorted(h.items()))) for m, p, b, h, _, _ in MALFORMED]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "words"), MALFORMED)
def test_a_malformed_request_gets_its_4xx_naming_the_problem(
    server, method, path, body, headers, status, words
):
    response, raw = _send(server, method, path, body, headers)
    answer = _strict_json(raw)
    assert response.status == status, answer
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    assert words in answer["error"], answer
    assert "Traceback" not in answer["error"] and "/tmp" not in answer["error"]
    assert len(raw) < 500, raw[:200]  # a long key or value in the body is cut short
    if status == 405:
        assert response.headers["Allow"] in ("GET, HEAD", "POST")


def test_the_server_still_answers_after_them(server):
    """Every malformed request, sent here (the test relied on those of the test above, run
    before it in the same process, and failed when run alone or on another worker), then the
    server still answers and counted each."""

    def engram_requests() -> int:
        return sum(get_json(server.url + "/stats")[1]["server"]["requests"].get(E, {}).values())

    before = engram_requests()
    for method, path, body, headers, status, _ in MALFORMED:
        assert _send(server, method, path, body, headers)[0].status == status, (method, path)
    assert get_json(server.url + "/healthz") == (200, {"status": "ok"})
    sent = sum(path == E for _, path, *_ in MALFORMED)
    assert engram_requests() - before == sent


def _send(server, method: str, path: str, body: bytes | None, headers: dict[str, str]):
    """One request on a new connection; the response and its body."""
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, body, {**J, **headers})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()
