"""Issue 12, "never serve a corrupted row", against a running ``tiered-store serve`` in every io mode.

Before page checksums a flipped byte was answered 200 with the corrupted row's values (under
pread, direct and mmap), and an ``io: mmap`` table truncated while serving killed the server with
SIGBUS (exit 135). Now: the flipped byte is a 503 naming the table (no server paths), counted in
``tiered_store_checksum_failures_total``; the truncated table is a 503 with the process alive;
/healthz turns 503 for each.
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.serve_support import make_checkpoint
from tiered_store.cold_table import IO_MODES, ColdTable
from tiered_store.engram.hashing import NgramHasher
from tiered_store.errors import TierIOError
from tiered_store.io_uring import uring_unavailable_reason
from tiered_store.serve import ServeConfig
from tiered_store.serve.client import ServeProcess, get_json, post_json
from tiered_store.table_format import read_manifest

LIMITS = {"request_timeout_s": 5.0, "health_hold_s": 600.0}
REQUEST = [[1, 2, 3]]


def _flip(path, offset: int) -> None:
    """Invert one byte of the file in place."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, offset)[0] ^ 0xFF]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _metric(url: str, name: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {
        s.labels["table"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


@pytest.mark.parametrize("io", IO_MODES)
def test_a_flipped_byte_and_a_truncated_table_are_503s_in_every_io_mode(tmp_path, io):
    if io == "uring" and (reason := uring_unavailable_reason()):
        pytest.skip(f"io_uring is unavailable: {reason}")
    config_path = make_checkpoint(
        tmp_path,
        server=LIMITS,
        store={"tiers": {"hot": {"capacity": 0}, "warm": {"capacity": 0}, "cold": {"io": io}}},
    )
    config = ServeConfig.from_yaml(config_path)
    layer3, layer1 = config.table_path(3), config.table_path(1)
    if io in ("direct", "uring"):
        try:
            ColdTable(layer3, io="direct", threads=1).close()
        except TierIOError:
            pytest.skip("the test file system refuses O_DIRECT")
    rows = NgramHasher(config.model.engram).row_ids_layer(torch.tensor(REQUEST), 3)
    row = int(rows.max())  # one row this request reads from layer 3
    manifest = read_manifest(layer3)
    _flip(layer3, manifest.data_offset + row * manifest.row_bytes + 3)
    with ServeProcess(config_path) as server:
        status, answer = post_json(server.url + "/v1/engram", {"input_ids": REQUEST})
        assert status == 503, answer
        assert answer == {
            "error": "table data unavailable (table engram_layer3: rows failed their checksum)"
        }
        status, health = get_json(server.url + "/healthz")
        assert status == 503
        assert health["problems"][0].startswith("table engram_layer3: lookups failing")
        assert f"row {row} failed its page checksum" in health["problems"][0]
        assert str(tmp_path) not in json.dumps(answer) + json.dumps(health)
        failures = _metric(server.metrics_url, "tiered_store_checksum_failures_total")
        assert failures == {"engram_layer1": 0, "engram_layer3": 1}
        assert _metric(server.metrics_url, "tiered_store_lookup_failures_total")["engram_layer3"]

        os.truncate(layer1, 4096 + 2 * 4096)  # the header and two pages are left
        status, answer = post_json(server.url + "/v1/engram", {"input_ids": [[9, 99, 999, 9999]]})
        assert status == 503, answer
        assert answer == {
            "error": "table data unavailable (table engram_layer1: cold tier read failed)"
        }
        status, health = get_json(server.url + "/healthz")
        assert status == 503
        problem = next(p for p in health["problems"] if p.startswith("table engram_layer1"))
        assert problem.startswith("table engram_layer1: lookups failing")
        assert "[Errno" not in problem and "shrank to 12,288 bytes" in problem, problem
        assert str(tmp_path) not in json.dumps(answer) + json.dumps(health)
        assert server.proc.poll() is None  # alive: no SIGBUS under mmap
        assert "shrank to 12,288 bytes while open" in server.log()
        assert server.stop() == 0
