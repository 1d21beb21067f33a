"""A real Prometheus scrapes a real ``tiered-store serve``: its hit ratios equal the store's own.

Needs the ``prometheus`` binary (Debian: ``apt-get install -y --no-install-recommends
prometheus``; the package starts no daemon by itself). Everything binds 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.serve_support import make_checkpoint
from tiered_store.serve.client import ServeProcess, get_json, run_load, zipf_requests

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="the prometheus binary is not installed (apt-get install -y prometheus)",
    ),
]

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus-rules.yml"


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """The prometheus binary on loopback with a temporary config and data directory."""

    def __init__(self, workdir: Path, target: str) -> None:
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"  # the shipped rules, evaluated every second here
        (workdir / "rules.yml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(workdir / "rules.yml")],
            "scrape_configs": [
                {"job_name": "tiered-store", "static_configs": [{"targets": [target]}]}
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        self.log_path = workdir / "prometheus.log"
        self.wait(lambda: self._get("/-/ready") is not None, 30, "Prometheus to be ready")

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.read()
        except OSError:
            return None

    def query(self, promql: str) -> list[dict]:
        """The result vector of an instant query."""
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert body is not None, "query failed"
        doc = json.loads(body)
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def by_table_tier(self, promql: str) -> dict[tuple[str, str], float]:
        """(table, tier) -> value of an instant query."""
        return {
            (r["metric"]["table"], r["metric"]["tier"]): float(r["value"][1])
            for r in self.query(promql)
        }

    def wait(self, predicate, timeout: float, what: str) -> None:
        """Poll ``predicate`` until true, failing with the log after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.flush()
                pytest.fail(f"waited for {what}:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def test_prometheus_computes_the_store_hit_ratios(tmp_path):
    config = make_checkpoint(tmp_path)
    with ServeProcess(config) as server:
        target = urllib.parse.urlsplit(server.metrics_url).netloc
        prom = Prometheus(tmp_path, target)
        try:
            prom.wait(
                lambda: [r["value"][1] for r in prom.query('up{job="tiered-store"}')] == ["1"],
                30,
                "the first scrape",
            )
            bodies = zipf_requests(40, batch=2, tokens=32, exponent=1.2, seed=5)
            result = run_load(server.url + "/v1/engram", bodies, clients=4)
            assert result.answered == 40 and result.errors == {}

            stats = get_json(server.url + "/stats")[1]["tables"]
            total = sum(s["hot"]["lookups"] for s in stats.values())
            prom.wait(
                lambda: [float(r["value"][1]) for r in prom.query('sum(tiered_store_lookups_total{tier="hot"})')]
                == [total],
                30,
                f"a scrape with all {total} lookups",
            )  # fmt: skip
            expected = {
                (table, tier): s[tier]["hit_rate"] for table, s in stats.items() for tier in ("hot", "warm")
            }  # fmt: skip
            assert all(0 < v < 1 for v in expected.values()), (
                expected
            )  # hits and misses in each tier

            # The per-tier hit ratio, computed by Prometheus from the counters it scraped.
            lifetime = prom.by_table_tier(
                'tiered_store_lookups_total{result="hit"}'
                " / ignoring(result) sum without(result) (tiered_store_lookups_total)"
            )
            assert lifetime.keys() == expected.keys()
            for key, value in expected.items():
                assert lifetime[key] == pytest.approx(value, rel=1e-12), key

            # The shipped recording rule (rate over 5m: the whole run, which began at zero).
            def rule_matches() -> bool:
                got = prom.by_table_tier("table_tier:tiered_store_hit_ratio:rate5m")
                return got.keys() == expected.keys() and all(
                    got[k] == pytest.approx(v, rel=1e-9) for k, v in expected.items()
                )

            prom.wait(rule_matches, 20, "the recording rule to match /stats")

            # A request is counted once its response is sent, so the client can see the last
            # answer before it is counted: wait for a scrape with all 40 (exactly 40).
            def served() -> list[float]:
                query = 'sum(tiered_store_http_requests_total{handler="/v1/engram",code="200"})'
                return [float(r["value"][1]) for r in prom.query(query)]

            prom.wait(lambda: served() == [40.0], 20, "a scrape with all 40 requests counted")
            assert prom.query("process_resident_memory_bytes")
        finally:
            prom.stop()
        assert server.stop() == 0
