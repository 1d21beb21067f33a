"""The Prometheus collector: names, labels and values read from the stores' own counters."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_table, store_config
from tiered_store import metrics
from tiered_store.metrics import (
    METRICS,
    SHARDED_METRICS,
    RequestCounters,
    TableHealth,
    TieredStoreCollector,
    build_registry,
    verify_counted,
)
from tiered_store.store import TieredStore

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
LABELS_ALLOWED = {"table", "tier", "result", "handler", "code", "le"}


def _samples(registry) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, parsed back from the exposition text."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def store(tmp_path):
    path, _ = make_table(tmp_path, rows=2000, dim=8)
    with TieredStore(
        store_config(path, hot={"capacity": 50}, warm={"capacity": 400}, cold={"io": "pread"})
    ) as s:
        gen = torch.Generator().manual_seed(0)
        for _ in range(6):  # a skewed workload: hits in both tiers, misses, evictions
            ids = (torch.rand(300, generator=gen) ** 3 * 2000).long()
            s.lookup(ids)
            handle = s.prefetch(ids[:50])
            s.lookup(ids[:50], handle)
        yield s


def test_every_documented_metric_is_emitted_and_nothing_else(store):
    registry = build_registry({"layer1": store}, {"layer1": TableHealth()}, RequestCounters())
    names = {
        f.name + ("_total" if f.type == "counter" else "")
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        if f.name.startswith("tiered_store_")
    }
    assert names == set(METRICS)
    for name in METRICS:  # the module docstring's table lists each one
        assert name in metrics.__doc__, name


def test_the_docstring_metrics_tables_give_each_metric_its_type_and_labels():
    """Their labels column named the exchange bytes' ``direction`` label ``dir.``, and ran into
    the meaning of the lookups' (one space apart)."""
    known = {**METRICS, **SHARDED_METRICS}
    rows = {}
    for line in metrics.__doc__.splitlines():
        if row := re.fullmatch(
            r"(tiered_store_\w+) +(\w+) +(\(none\)|[a-z_]+(?:, [a-z_]+)*)  +\S.*", line
        ):
            name, kind, labels = row.groups()
            rows[name] = (kind, () if labels == "(none)" else tuple(labels.split(", ")))
    assert rows == {name: (kind, labels) for name, (kind, labels, _) in known.items()}


def _readme_metrics() -> dict[str, str]:
    """Metric name -> type ("" where the row gives none) of README's metrics table; a row's
    ``_x`` after a name is that name with its tail replaced (``_bytes_total`` after
    ``tiered_store_cold_read_rows_total``), ``{a,b}_total`` one name per choice."""
    known = {**METRICS, **SHARDED_METRICS}
    section = (DEPLOY.parent / "README.md").read_text().split("\n## Metrics\n")[1]
    out: dict[str, str] = {}
    for line in section.split("\n## ")[0].splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.split("|")]
        base = ""
        for token in re.findall(r"`([^`]+)`", cells[1]):
            token = re.sub(r"\{[a-z,]+\}$", "", token)  # labels
            if choice := re.fullmatch(r"(\w+)\{([a-z_,]+)\}(\w+)", token):
                head, options, tail = choice.groups()
                names = [head + option + tail for option in options.split(",")]
            elif token.startswith("tiered_store_"):
                names = [token]
            else:  # the row's previous name, its tail replaced by this one
                cuts = [i for i, c in enumerate(base) if c == "_" and base[:i] + token in known]
                names = [base[: cuts[-1]] + token] if cuts else [token]
            base = names[0]
            out.update(dict.fromkeys(names, cells[2]))
    return out


def test_the_readme_metrics_table_lists_each_metric_with_its_type():
    documented = _readme_metrics()
    assert set(documented) == set(METRICS) | set(SHARDED_METRICS)
    for name, kind in documented.items():
        assert kind in ("", (METRICS.get(name) or SHARDED_METRICS[name])[0]), (name, kind)


def test_labels_are_few_and_bounded(store):
    samples = _samples(build_registry({"layer1": store}, process=False))
    for (name, labels), _ in samples.items():
        keys = {k for k, _ in labels}
        assert keys <= LABELS_ALLOWED, (name, keys)
        assert dict(labels).get("tier", "hot") in ("hot", "warm")
        assert dict(labels).get("result", "hit") in ("hit", "miss")


def test_values_equal_the_store_statistics(store):
    samples = _samples(build_registry({"layer1": store}, process=False))
    stats = store.stats()

    def value(name, **labels):
        return samples[(name, tuple(sorted({"table": "layer1", **labels}.items())))]

    for tier in ("hot", "warm"):
        s = stats[tier]
        hits = value("tiered_store_lookups_total", tier=tier, result="hit")
        misses = value("tiered_store_lookups_total", tier=tier, result="miss")
        assert (hits, misses) == (s["hits"], s["misses"])
        assert hits / (hits + misses) == pytest.approx(s["hit_rate"], abs=1e-12)
        assert value("tiered_store_admissions_total", tier=tier) == s["admissions"]
        assert value("tiered_store_evictions_total", tier=tier) == s["evictions"]
        assert value("tiered_store_moved_bytes_total", tier=tier) == s["bytes_in"]
        assert value("tiered_store_occupancy_rows", tier=tier) == s["occupancy"]
        assert value("tiered_store_capacity_rows", tier=tier) == s["capacity"]
    assert stats["hot"]["hits"] > 0 and stats["warm"]["hits"] > 0 and stats["hot"]["evictions"] > 0
    assert value("tiered_store_cold_read_rows_total") == stats["cold"]["rows_read"]
    assert value("tiered_store_cold_read_bytes_total") == stats["cold"]["bytes_read"]
    assert value("tiered_store_prefetches_total") == stats["prefetch"]["handles"] == 6
    count = value("tiered_store_lookup_duration_seconds_count")
    assert count == stats["lookup"]["calls"] == 12
    assert value("tiered_store_lookup_duration_seconds_bucket", le="+Inf") == count
    assert value("tiered_store_lookup_duration_seconds_sum") == pytest.approx(
        stats["lookup"]["seconds_total"]
    )
    assert value("tiered_store_prefetch_stall_seconds_count") == 6
    assert value("tiered_store_queued_requests") == value("tiered_store_queued_rows") == 0
    request = store.announce([[3, 5], [5, 9]])
    samples = _samples(build_registry({"layer1": store}, process=False))
    assert value("tiered_store_queued_requests") == store.stats()["queue"]["requests"] == 1
    assert value("tiered_store_queued_rows") == store.stats()["queue"]["rows"] == 3
    store.release(request)


def test_histogram_buckets_are_cumulative(store):
    samples = _samples(build_registry({"layer1": store}, process=False))
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in samples.items()
        if name == "tiered_store_lookup_duration_seconds_bucket"
    )
    values = [v for _, v in buckets]
    assert values == sorted(values) and buckets[-1][0] == float("inf")


def test_a_scrape_changes_no_counter(store):
    registry = build_registry({"layer1": store}, process=False)
    before = store.stats()
    first, second = generate_latest(registry), generate_latest(registry)
    assert store.stats() == before and first == second


@contextlib.contextmanager
def _a_lookup_paused_at_its_hits(store, monkeypatch):
    """A lookup of 50 rows in another thread, paused as it raises a tier's hit count (its
    lookups already counted) until the block ends; joined after."""
    from tiered_store.row_cache import TierCounters

    counting, release = threading.Event(), threading.Event()

    def hits_wait(self, name, value):  # a hit count's rise waits, its lookups already counted
        if name == "hits" and value > getattr(self, "hits", 0) and not counting.is_set():
            counting.set()
            release.wait(30)
        object.__setattr__(self, name, value)

    monkeypatch.setattr(TierCounters, "__setattr__", hits_wait)
    lookup = threading.Thread(target=store.lookup, args=(torch.arange(50),))
    lookup.start()
    try:
        assert counting.wait(30), "the lookup counted no hit"
        yield
    finally:
        release.set()
        lookup.join(30)


def test_a_scrape_during_a_lookup_never_counts_more_misses_than_the_next(store, monkeypatch):
    registry = build_registry({"layer1": store}, process=False)
    with _a_lookup_paused_at_its_hits(store, monkeypatch):
        during = _samples(registry)
    after = _samples(registry)
    for tier in ("hot", "warm"):
        key = (
            "tiered_store_lookups_total",
            (("result", "miss"), ("table", "layer1"), ("tier", tier)),
        )
        assert during[key] <= after[key] == store.stats()[tier]["misses"], tier  # never drops


def test_tables_can_be_a_callable_read_at_each_scrape(store):
    tables: dict = {}
    registry = CollectorRegistry()
    registry.register(TieredStoreCollector(lambda: tables))
    assert b'table="layer1"' not in generate_latest(registry)
    tables["layer1"] = store
    assert b'table="layer1"' in generate_latest(registry)


def test_registering_twice_is_a_name_clash(store):
    registry = build_registry({"layer1": store}, process=False)
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(TieredStoreCollector({}))


def test_request_counters_and_server_metrics():
    counters = RequestCounters()
    counters.begin()
    counters.end("/v1/engram", 200, 0.004, tokens=12)
    counters.begin()
    counters.end("/v1/engram", 400, 0.001)
    counters.begin()
    samples = _samples(build_registry({}, requests=counters, process=False))
    assert (
        samples[("tiered_store_http_requests_total", (("code", "200"), ("handler", "/v1/engram")))]
        == 1
    )
    assert (
        samples[("tiered_store_http_requests_total", (("code", "400"), ("handler", "/v1/engram")))]
        == 1
    )
    assert samples[("tiered_store_http_requests_in_flight", ())] == 1
    assert samples[("tiered_store_served_tokens_total", ())] == 12
    assert (
        samples[("tiered_store_http_request_duration_seconds_count", (("handler", "/v1/engram"),))]
        == 2
    )
    assert counters.snapshot()["requests"] == {"/v1/engram": {"200": 1, "400": 1}}


def test_checksum_failures_are_counted(tmp_path, store):
    path, _ = make_table(tmp_path, rows=3000, dim=64)
    health = TableHealth()
    assert verify_counted(path, health) is not None
    assert (health.verifications, health.checksum_failures, health.last_error) == (1, 0, None)
    with open(path, "r+b") as f:  # flip one byte of the data
        f.seek(4096 + 100_000)
        byte = f.read(1)
        f.seek(4096 + 100_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert verify_counted(path, health) is None
    assert health.checksum_failures == 1 and "checksum" in health.last_error
    samples = _samples(build_registry({"layer1": store}, {"layer1": health}, process=False))
    assert samples[("tiered_store_checksum_failures_total", (("table", "layer1"),))] == 1
    assert samples[("tiered_store_verifications_total", (("table", "layer1"),))] == 2


# -- deploy files ---------------------------------------------------------------------------------


def _rules() -> dict:
    return yaml.safe_load((DEPLOY / "prometheus-rules.yml").read_text())


def _metric_names(expr: str) -> set[str]:
    return set(
        re.findall(r"\b(tiered_store_[a-z_]+|[a-z_]+:tiered_store_[a-z_]+:[a-z0-9_]+)", expr)
    )


def test_rules_and_dashboard_use_only_real_metrics():
    recorded = {r["record"] for g in _rules()["groups"] for r in g["rules"] if "record" in r}
    known = set(METRICS) | set(SHARDED_METRICS) | recorded
    suffixes = ("_bucket", "_count", "_sum")
    exprs = [r["expr"] for g in _rules()["groups"] for r in g["rules"]]
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 10
    for expr in exprs:
        for name in _metric_names(expr):
            base = next((name[: -len(s)] for s in suffixes if name.endswith(s)), name)
            assert name in known or base in known, f"{name} in {expr!r}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("hit ratio", "lookups/s", "latency", "stall", "occupancy", "cold read"):
        assert topic in titles, topic
    # a table a reload left closed (every request 503) is on the dashboard, beside the failures
    panels = {
        p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in dashboard["panels"]
    }
    assert any("tiered_store_table_open" in expr for expr in panels.values()), sorted(panels)

    for panel in dashboard["panels"]:  # a panel in seconds plots seconds, or says otherwise
        config = panel.get("fieldConfig", {})
        if config.get("defaults", {}).get("unit") != "s":
            continue
        overridden = {
            o["matcher"]["options"]
            for o in config.get("overrides", [])
            if any(prop["id"] == "unit" for prop in o["properties"])
        }
        for target in panel["targets"]:
            if "_seconds" not in target["expr"]:  # a count shown as seconds (in flight: "3 s")
                assert target["legendFormat"] in overridden, (panel["title"], target["expr"])


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)
def test_promtool_checks_rules_and_config():
    out = subprocess.run(
        ["promtool", "check", "rules", str(DEPLOY / "prometheus-rules.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_scrape_config_shows_how_to_scrape_every_rank(tmp_path):
    """A sharded serve's rank R exports its metrics on the metrics port + R: a config scraping
    only 9400 missed every other rank's shard in every sum. deploy/prometheus.yml's example for
    them (its commented job), uncommented, scrapes consecutive ports from 9400 (and passes
    promtool where it is installed)."""
    text = (DEPLOY / "prometheus.yml").read_text()
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("#  - job_name")), None)
    assert start is not None, "deploy/prometheus.yml: no example job for sharded ranks"
    example = [line[1:] for line in lines[start:] if line.startswith("#  ")]
    config = yaml.safe_load("scrape_configs:\n" + "\n".join(example))
    (job,) = config["scrape_configs"]
    (targets,) = [c["targets"] for c in job["static_configs"]]
    assert [int(t.rsplit(":", 1)[1]) for t in targets] == [9400 + rank for rank in range(4)]
    if shutil.which("promtool") is not None:
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        out = subprocess.run(
            ["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stdout + out.stderr


def _promtool_passes(tmp_path, test: dict) -> None:
    """Run ``promtool test rules`` on the unit test ``test`` (its YAML written under
    ``tmp_path``) and assert it passes."""
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(test))
    out = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)
def test_promtool_unit_tests_the_hit_ratio_rules(tmp_path):
    """Synthetic counters through the recording rules: hot 3 of 4 lookups hit, warm 1 of 2.

    (Rates chosen exact in binary: promtool 2.42 compares samples exactly.)"""
    series = {
        ("hot", "hit"): "0+180x10",  # per minute: 3/s
        ("hot", "miss"): "0+60x10",  # 1/s
        ("warm", "hit"): "0+30x10",  # 0.5/s
        ("warm", "miss"): "0+30x10",  # 0.5/s
    }
    test = {
        "rule_files": [str(DEPLOY / "prometheus-rules.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'tiered_store_lookups_total{{table="layer1",tier="{tier}",result="{result}"}}',
                        "values": values,
                    }
                    for (tier, result), values in series.items()
                ],
                "promql_expr_test": [
                    {
                        "expr": "table_tier:tiered_store_hit_ratio:rate5m",
                        "eval_time": "10m",
                        "exp_samples": [
                            {"labels": 'table_tier:tiered_store_hit_ratio:rate5m{table="layer1",tier="hot"}', "value": 0.75},
                            {"labels": 'table_tier:tiered_store_hit_ratio:rate5m{table="layer1",tier="warm"}', "value": 0.5},
                        ],
                    },
                    {
                        "expr": "table_tier:tiered_store_served_ratio:rate5m",
                        "eval_time": "10m",
                        "exp_samples": [
                            {"labels": 'table_tier:tiered_store_served_ratio:rate5m{table="layer1",tier="hot"}', "value": 0.75},
                            {"labels": 'table_tier:tiered_store_served_ratio:rate5m{table="layer1",tier="warm"}', "value": 0.125},
                        ],
                    },
                    {
                        "expr": "table:tiered_store_cold_ratio:rate5m",
                        "eval_time": "10m",
                        "exp_samples": [
                            {"labels": 'table:tiered_store_cold_ratio:rate5m{table="layer1"}', "value": 0.125},
                        ],
                    },
                ],
            }
        ],
    }  # fmt: skip
    _promtool_passes(tmp_path, test)


def test_the_latency_buckets_cover_the_slowest_requests():
    """A request may wait request_timeout_s for its body and as long for a compute turn: the top
    finite bucket holds it, only a stuck one lands in +Inf."""
    from tiered_store.latency import DEFAULT_BUCKETS, LatencyHistogram, buckets_covering
    from tiered_store.serve import SERVE_DEFAULTS

    assert DEFAULT_BUCKETS[-1] >= 2 * SERVE_DEFAULTS["server.request_timeout_s"]
    assert buckets_covering(2 * SERVE_DEFAULTS["server.request_timeout_s"]) == DEFAULT_BUCKETS
    assert buckets_covering(2 * 1000.0) == (*DEFAULT_BUCKETS, 120.0, 300.0, 600.0, 1200.0, 3000.0)
    assert buckets_covering(0.0) == buckets_covering(-1.0) == DEFAULT_BUCKETS
    # an infinite bound was added (941 buckets for inf): a second le="+Inf" bucket in the export
    for seconds in (float("inf"), 1.5e308, float("nan")):
        with pytest.raises(ValueError, match=re.escape(f"seconds: {seconds!r}; expected a")):
            buckets_covering(seconds)
    hist = LatencyHistogram()
    for seconds in (0.003, 4.0, 24.5, 59.0):
        hist.observe(seconds)
    cumulative = dict(hist.cumulative())
    assert cumulative[DEFAULT_BUCKETS[-1]] == 4 == cumulative[float("inf")]
    assert cumulative[30.0] == 3 and cumulative[2.5] == 1


def test_lookup_failures_are_counted_per_table(store):
    health = TableHealth()
    health.record_lookup_failure("cold tier read failed: EIO", 12.5)
    samples = _samples(build_registry({"layer1": store}, {"layer1": health}))
    assert samples[("tiered_store_lookup_failures_total", (("table", "layer1"),))] == 1
    assert (health.last_lookup_error, health.last_lookup_failure_at) == (
        "cold tier read failed: EIO",
        12.5,
    )


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)
def test_the_lookup_failure_alert_fires(tmp_path):
    test = {
        "rule_files": [str(DEPLOY / "prometheus-rules.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'tiered_store_lookup_failures_total{table="engram_layer3"}', "values": "0 0 0 1 1 1"},
                    {"series": 'tiered_store_lookup_failures_total{table="engram_layer1"}', "values": "0 0 0 0 0 0"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "5m",
                        "alertname": "TieredStoreLookupFailures",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "table": "engram_layer3"},
                                "exp_annotations": {
                                    "summary": "lookups failing on table engram_layer3",
                                    "description": "Served lookups of engram_layer3 failed (cold read error, bad table file or non-finite rows); those requests got 503 and /healthz reports the table.",
                                },
                            }
                        ],
                    }
                ],
            }
        ],
    }  # fmt: skip
    _promtool_passes(tmp_path, test)


def test_a_prefetch_that_failed_counts_its_wait_in_the_stall_histogram(tmp_path, monkeypatch):
    """A lookup that waited on a prefetch whose fetch then failed (the table shrank under the
    store) recorded no stall: the histogram showed fewer waits, and less time, than lookups
    spent waiting. The read is made to take a while here (a slow disk) before it fails."""
    import os
    import time

    from tiered_store import TieredStoreError

    path, _ = make_table(tmp_path, rows=2000, dim=8)
    with TieredStore(store_config(path, hot={"capacity": 0}, warm={"capacity": 0})) as store:
        read_rows = store.cold.read_rows

        def slow_read(ids):
            time.sleep(0.3)
            return read_rows(ids)

        monkeypatch.setattr(store.cold, "read_rows", slow_read)
        os.truncate(path, 4096 + 4096)  # rows past the first page can no longer be read
        handle = store.prefetch([1500, 1501])
        with pytest.raises(TieredStoreError, match="shrank"):
            store.lookup([1500, 1501], handle)
        samples = _samples(build_registry({"layer1": store}, process=False))
        assert samples[("tiered_store_prefetch_stall_seconds_count", (("table", "layer1"),))] == 1
        assert store.stats()["prefetch"]["wait_seconds_total"] > 0.1


def test_lookups_that_raised_are_counted_in_the_lookup_duration_histogram(tmp_path):
    """A lookup that raised (bad ids, a failed cold read, a closed store) was not observed: the
    histogram's count, and stats()'s lookup calls, showed fewer calls than were made, and the
    time failing calls took (as the stall histogram counts a failed fetch's wait) was missing."""
    import os

    from tiered_store import TieredStoreError

    path, _ = make_table(tmp_path, rows=2000, dim=8)
    store = TieredStore(store_config(path, hot={"capacity": 0}, warm={"capacity": 0}))
    store.lookup([1, 2])
    with pytest.raises(TieredStoreError, match="5000"):
        store.lookup([1, 5000])  # an id past the table's rows
    os.truncate(path, 4096 + 4096)  # rows past the first page can no longer be read
    with pytest.raises(TieredStoreError, match="shrank"):
        store.lookup([1500])
    registry = build_registry({"layer1": store}, process=False)
    store.close()
    with pytest.raises(TieredStoreError, match="closed"):
        store.lookup([1])
    samples = _samples(registry)
    table = (("table", "layer1"),)
    assert samples[("tiered_store_lookup_duration_seconds_count", table)] == 4
    assert samples[("tiered_store_lookup_duration_seconds_bucket", (("le", "+Inf"), *table))] == 4
    assert store.stats()["lookup"]["calls"] == 4


def test_a_failed_checksum_pass_is_a_gauge_until_a_pass_finds_the_table_good(tmp_path, store):
    """A failed pass was only a counter's increase: with a scrub interval over an hour, the 1 h
    alert resolved while the table still failed, and fired again at the next pass. A gauge per
    table is 1 while the last pass over the table failed, 0 once one finds it good."""
    path, _ = make_table(tmp_path, rows=3000, dim=64)
    health = TableHealth()
    registry = build_registry({"layer1": store}, {"layer1": health}, process=False)
    key = ("tiered_store_checksum_pass_failed", (("table", "layer1"),))
    assert verify_counted(path, health) is not None
    assert _samples(registry)[key] == 0
    with open(path, "r+b") as f:  # flip one byte of the data
        f.seek(4096 + 100_000)
        byte = f.read(1)
        f.seek(4096 + 100_000)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        assert verify_counted(path, health) is None
        assert _samples(registry)[key] == 1
        f.seek(4096 + 100_000)
        f.write(byte)  # repaired
    assert verify_counted(path, health) is not None
    assert _samples(registry)[key] == 0


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)
def test_the_checksum_alert_names_a_lookup_as_what_may_have_found_the_corruption(tmp_path):
    """tiered_store_checksum_failures_total counts the pages served lookups found corrupt too,
    and the alert fires on them, while its text said a background checksum pass found the table
    corrupt and that /healthz reported the block: for a lookup's failure no pass had failed, and
    /healthz said the lookups were failing. The alert names both."""
    test = {
        "rule_files": [str(DEPLOY / "prometheus-rules.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "10m",
                "input_series": [  # a lookup's page failed its checksum; every pass was good
                    {"series": 'tiered_store_checksum_failures_total{table="engram_layer1"}', "values": "0 1 1"},
                    {"series": 'tiered_store_checksum_pass_failed{table="engram_layer1"}', "values": "0 0 0"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "20m",
                        "alertname": "TieredStoreChecksumFailure",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "table": "engram_layer1"},
                                "exp_annotations": {
                                    "summary": "table engram_layer1 is corrupt: a checksum failed",
                                    "description": "A checksum pass, or a served lookup's page checksum, found engram_layer1 corrupt; /healthz says which (the failed pass's block, or the lookups failing).",
                                },
                            }
                        ],
                    }
                ],
            }
        ],
    }  # fmt: skip
    _promtool_passes(tmp_path, test)


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)
def test_the_table_closed_alert_fires_after_five_minutes_closed(tmp_path):
    """tiered_store_table_open said a table was closed (a reload refused its new version) and
    no alert read it: the table's requests got 503 with nothing firing but the lookup failures
    of the requests that reached the disk. It fires after 5 minutes closed."""
    test = {
        "rule_files": [str(DEPLOY / "prometheus-rules.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [  # closed from minute 2 on
                    {"series": 'tiered_store_table_open{table="engram_layer1"}', "values": "1 1 0 0 0 0 0 0 0 0"},
                ],
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": "TieredStoreTableClosed", "exp_alerts": []},
                    {
                        "eval_time": "8m",
                        "alertname": "TieredStoreTableClosed",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "table": "engram_layer1"},
                                "exp_annotations": {
                                    "summary": "table engram_layer1 is closed",
                                    "description": "A reload refused engram_layer1's new version and closed its store; every request gets 503 (a closed store serves no row, those its tiers hold included) until a reload opens a good version (/healthz says why).",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }  # fmt: skip
    _promtool_passes(tmp_path, test)


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)
def test_the_checksum_alert_stays_firing_while_the_last_pass_failed(tmp_path):
    """One failed pass every 2 h (checkpoint.scrub_interval_s): increase(...[1h]) is 0 an hour
    after each, so the alert resolved while the table was still corrupt; it fires while the
    last pass failed, and resolves once a pass finds the table good."""
    failures = "0 1 1 1 1 2 2 2 2 2"  # every 30 min: failed passes at 30 min and 2.5 h
    failed = "0 1 1 1 1 1 1 1 0 0"  # the last pass failed, until one at 4 h found it good
    test = {
        "rule_files": [str(DEPLOY / "prometheus-rules.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "30m",
                "input_series": [
                    {"series": 'tiered_store_checksum_failures_total{table="engram_layer3"}', "values": failures},
                    {"series": 'tiered_store_checksum_pass_failed{table="engram_layer3"}', "values": failed},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": eval_time,
                        "alertname": "TieredStoreChecksumFailure",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "table": "engram_layer3"},
                                "exp_annotations": {
                                    "summary": "table engram_layer3 is corrupt: a checksum failed",
                                    "description": "A checksum pass, or a served lookup's page checksum, found engram_layer3 corrupt; /healthz says which (the failed pass's block, or the lookups failing).",
                                },
                            }
                        ]
                        if firing
                        else [],
                    }
                    for eval_time, firing in (("1h", True), ("2h", True), ("4h30m", False))
                ],
            }
        ],
    }  # fmt: skip
    _promtool_passes(tmp_path, test)


def test_stats_during_a_lookup_count_each_lookup_as_a_hit_or_a_miss(store, monkeypatch):
    with _a_lookup_paused_at_its_hits(store, monkeypatch):
        during = store.stats()
    for tier in ("hot", "warm"):
        s = during[tier]
        assert s["hits"] + s["misses"] == s["lookups"], (tier, s)
        assert s["hit_rate"] == pytest.approx(s["hits"] / s["lookups"]), (tier, s)


def test_a_tiers_lookups_attribute_is_its_hits_plus_misses_during_a_lookup(store, monkeypatch):
    """``TierCounters.lookups`` was counted on its own, before the hits and misses: read as an
    attribute (as the policies' tests and any caller of ``tier.counters`` do) during a lookup's
    count it differed from their sum. It is derived from them; ``as_dict`` (``/stats``) keeps
    its keys and their order."""
    from tiered_store.row_cache import TierCounters

    counting, release = threading.Event(), threading.Event()

    def hits_wait(self, name, value):  # a hit count's rise waits, the lookup's count begun
        if name == "hits" and value > getattr(self, "hits", 0) and not counting.is_set():
            counting.set()
            release.wait(30)
        object.__setattr__(self, name, value)

    monkeypatch.setattr(TierCounters, "__setattr__", hits_wait)
    lookup = threading.Thread(target=store.lookup, args=(torch.arange(50),))
    lookup.start()
    try:
        assert counting.wait(30), "the lookup counted no hit"
        during = [(c.lookups, c.hits + c.misses) for c in (store.hot.counters, store.warm.counters)]
    finally:
        release.set()
        lookup.join(30)
    assert all(lookups == total for lookups, total in during), during
    keys = ["lookups", "hits", "misses", "admissions", "evictions", "rejections", "preloaded"]
    assert list(store.hot.counters.as_dict()) == keys
