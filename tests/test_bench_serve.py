"""bench/bench_serve.py against a real `tiered-store serve` over a tiny checkpoint: every request
sent is counted, the rates and ratios follow from its own figures, and bad options are refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.bench_support import run_bench
from tests.serve_support import TABLES, write_config


def bench(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The script, its temporary folder (``tempfile``'s) under ``tmp_path``."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return run_bench("bench_serve.py", *args, env={"TMPDIR": str(tmp_path / "tmp")})


def leftovers(temp: Path) -> list[str]:
    """What the script and its server left in the temporary folder ``temp``."""
    return sorted(p.name for p in temp.iterdir() if p.name.startswith(("bench-serve-", "serve-")))


def test_every_request_is_counted_and_the_figures_follow(tmp_path):
    config = write_config(tmp_path / "config")  # two tables of about 10,000 rows
    out = tmp_path / "serve.json"
    done = bench(
        *("--config", str(config), "--clients", "1,3", "--requests", "24", "--warmup", "8"),
        *("--tokens", "16", "--soak-seconds", "2", "--soak-clients", "2"),
        # 0 leaves torch's default, as server.torch_threads does; the in-process side once
        # called torch.set_num_threads(0) and crashed after the whole load test
        *("--torch-threads", "0", "--out", str(out), "--announce-rounds", "2"),
        tmp_path=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())

    options = report["options"]  # what it ran on
    assert options["config"] == str(config) and options["clients"] == "1,3"
    assert (options["requests"], options["warmup"], options["zipf"]) == (24, 8, 1.1)
    assert options["torch_threads"] == 0
    assert report["tokens_per_request"] == 16

    # each client count: all 24 requests answered, none lost; rates from count and time
    assert [run["clients"] for run in report["runs"]] == [1, 3]
    for run in report["runs"]:
        assert run["requests"] == run["answered"] == 24
        assert run["errors"] == {} and run["lost"] == 0 and run["resets"] == 0
        assert run["requests_per_second"] == round(run["answered"] / run["wall_seconds"], 1)
        assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
        assert run["p50_ms"] <= 1e3 * run["wall_seconds"]
        assert f"{run['clients']:3d} clients: {run['requests_per_second']:7.1f} req/s" in (
            done.stdout
        )

    # the soak sends rounds of 4 requests per client until its time is up, sampling the
    # server's memory once a second
    soak = report["soak"]
    assert soak["clients"] == 2 and soak["seconds"] >= 2 and soak["errors"] == {}
    assert soak["answered"] > 0 and soak["answered"] % (4 * 2) == 0
    samples = soak["rss_samples_mib"]
    assert 2 <= len(samples) <= soak["seconds"] + 2
    assert (soak["rss_first_mib"], soak["rss_last_mib"]) == (samples[0], samples[-1])
    assert soak["rss_max_mib"] == max(samples) > 0
    half = len(samples) // 2
    growth = max(samples[half:]) - max(samples[:half])
    assert soak["rss_second_half_growth_mib"] == pytest.approx(growth, abs=0.15)

    # overhead: the same 24 bodies over HTTP and in process (answers compared by the script)
    overhead = report["overhead"]
    assert overhead["requests"] == 24
    for kind in ("median", "mean"):
        http, local = overhead[f"http_{kind}_ms"], overhead[f"in_process_{kind}_ms"]
        assert http > 0 and local > 0
        assert overhead[f"ratio_{kind}"] == pytest.approx(http / local, rel=0.01, abs=2e-3)

    # announcing: 2 rounds of 24 requests on each server, the ratio from their medians
    announce = report["announce"]
    assert announce["clients"] == 2 and announce["rounds"] == 2
    rates = announce["requests_per_second"]
    assert len(rates["plain"]) == len(rates["announcing"]) == 2
    median = (sum(rates["announcing"]) / 2) / (sum(rates["plain"]) / 2)
    assert announce["ratio_median"] == pytest.approx(median, rel=0.01)
    assert set(announce["hit_rate"]["announcing"]) == set(report["hit_rate"])
    assert "x the requests/s of the plain server" in done.stdout

    assert report["server_exit_status"] == 0  # drained and stopped cleanly
    assert set(report["hit_rate"]) == {f"{t}/{tier}" for t in TABLES for tier in ("hot", "warm")}
    assert all(0 <= rate <= 1 for rate in report["hit_rate"].values())
    assert all(report["hit_rate"][f"{t}/hot"] > 0 for t in TABLES)  # Zipf ids repeat

    # the checkpoint went to a temporary folder, deleted with the server's log (torch may leave
    # its own cache there), and nothing was written beside the config it copied
    assert leftovers(tmp_path / "tmp") == []
    assert list(config.parent.iterdir()) == [config]


def test_help_and_refusals(tmp_path):
    done = bench("--help", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--soak-seconds SOAK_SECONDS" in done.stdout and "--torch-threads" in done.stdout
    out = tmp_path / "serve.json"
    for args, message in (
        (("--clients", "1,0"), "--clients '1,0': expected client counts >= 1, e.g. 1,8,64"),
        (("--requests", "-3"), "argument --requests: expected at least 1 request, got '-3'"),
        (("--zipf", "0.9"), "--zipf 0.9: expected a finite Zipf exponent > 1"),
        # both were taken: the soak never ended; a Zipf exponent of inf sends one token id
        (("--soak-seconds", "inf"), "--soak-seconds inf: expected 0 (skip) or more seconds"),
        (("--zipf", "inf"), "--zipf inf: expected a finite Zipf exponent > 1"),
        (
            ("--tokens", "5000"),
            "--tokens 5,000: the server takes at most 4,096 (server.max_seq_len",
        ),
        (("--batch", "65"), "--batch 65: the server takes at most 64 (server.max_batch in"),
    ):
        done = bench(*args, "--out", str(out), tmp_path=tmp_path)
        assert done.returncode == 2, (args, done.stderr[-3000:])  # argparse's, with the usage
        assert message in done.stderr and "Traceback" not in done.stderr
        assert done.stdout == "" and not out.exists()
    assert leftovers(tmp_path / "tmp") == []  # refused before making a checkpoint
