"""Load test of ``tiered-store serve``: N concurrent clients, a fixed number of requests, loopback only.

Starts the server as a subprocess (tables built in a temporary directory from ``--config``,
default ``examples/serve.yaml``), warms it up, then has ``--clients`` threads send ``--requests``
inference requests in total (Zipf-distributed token ids, so the tiers see a realistic mix of hits
and misses) and reports requests/s, latency percentiles, errors, lost requests, and the server's
resident memory before and after the measured run. Exits 1 if any request failed or was lost.

Example::

    python bench/bench_serve.py --clients 8 --requests 2000 --tokens 128

Everything is bounded: every request has a timeout, the run has a deadline, and the server only
binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "examples" / "serve.yaml"
VOCAB = 129280  # DeepSeek tokenizer ids


class ServeProcess:
    """``tiered-store serve`` in a subprocess on free loopback ports; a context manager.

    ``url``/``metrics_url`` come from the JSON line the server prints once it listens.
    ``stop()`` sends SIGTERM and returns the exit status.
    """

    def __init__(
        self,
        config: Path,
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
        self.log_path = Path(tempfile.mkstemp(prefix="serve-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        self.ready = self._wait_ready(startup_timeout)
        self.url: str = self.ready["url"]
        self.metrics_url: str = self.ready["metrics_url"]
        self.pid: int = self.proc.pid

    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        """The server's 'listening' line (or an error with its log)."""
        box: list[bytes] = []
        reader = threading.Thread(
            target=lambda: box.append(self.proc.stdout.readline()), daemon=True
        )
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"serve did not start within {timeout}s:\n{self.log()}")
        return json.loads(box[0])

    def log(self) -> str:
        """What the server wrote to stderr so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """The server's resident set size now."""
        return rss_bytes(self.pid)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the drain, return the exit status (kills after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cached_bytes(url: str) -> int:
    """Payload bytes resident in the server's cache tiers (occupancy x row size, every table)."""
    _, stats = get_json(url + "/stats")
    return sum(
        (s["hot"]["occupancy"] + s["warm"]["occupancy"]) * stats["geometry"][name]["row_bytes"]
        for name, s in stats["tables"].items()
    )


def prepare_config(
    workdir: Path, base: Path = DEFAULT_CONFIG, overrides: dict[str, Any] | None = None
) -> Path:
    """A copy of ``base`` in ``workdir`` (so its tables are built there), with ``overrides``
    merged section by section."""
    data = yaml.safe_load(base.read_text())
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            data[section] = {**(data.get(section) or {}), **values}
        else:
            data[section] = values
    path = workdir / "serve.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def post_json(url: str, doc: Any, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    """POST ``doc`` as JSON to ``url``; returns (status, decoded JSON answer)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        body = json.dumps(doc).encode()
        conn.request("POST", parts.path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def get_json(url: str, timeout: float = 30.0) -> tuple[int, Any]:
    """GET ``url``; returns (status, decoded JSON answer)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def zipf_requests(
    n: int, *, batch: int, tokens: int, exponent: float = 1.1, seed: int = 0
) -> list[dict[str, Any]]:
    """``n`` request bodies of Zipf-distributed token ids ([batch, tokens] each)."""
    rng = np.random.default_rng(seed)
    ids = rng.zipf(exponent, size=(n, batch, tokens)) % VOCAB
    return [{"input_ids": block.tolist()} for block in ids]


@dataclass
class LoadResult:
    """What one load run measured."""

    clients: int
    requests: int
    answered: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # status or exception name -> count
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
        """JSON-ready summary (no per-request latencies)."""
        out = {k: v for k, v in asdict(self).items() if k != "latencies_ms"}
        out.update(
            lost=self.lost,
            requests_per_second=round(self.requests_per_second, 1),
            p50_ms=round(self.percentile_ms(50), 2),
            p95_ms=round(self.percentile_ms(95), 2),
            p99_ms=round(self.percentile_ms(99), 2),
        )
        return out


def run_load(
    url: str,
    bodies: list[dict[str, Any]],
    *,
    clients: int,
    timeout: float = 60.0,
    check: Callable[[dict[str, Any]], bool] | None = None,
) -> LoadResult:
    """Send every body in ``bodies`` to ``url`` from ``clients`` threads; count answers and errors.

    A request counts as answered when it gets 200 (and ``check(answer)`` holds, when given);
    any other status or exception is an error, by name.
    """
    result = LoadResult(clients=clients, requests=len(bodies))
    lock = threading.Lock()
    next_index = iter(range(len(bodies)))

    def client() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                status, answer = post_json(url, bodies[i], timeout=timeout)
                ok = status == 200 and (check is None or check(answer))
                key = "200" if ok else (str(status) if status != 200 else "bad-answer")
            except Exception as exc:  # a lost request: name it, keep going
                key, ok = type(exc).__name__, False
            elapsed = (time.perf_counter() - start) * 1e3
            with lock:
                if ok:
                    result.answered += 1
                    result.latencies_ms.append(elapsed)
                else:
                    result.errors[key] = result.errors.get(key, 0) + 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall_seconds = time.perf_counter() - start
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="serve config to copy")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests", type=int, default=2000, help="measured requests in total")
    p.add_argument(
        "--warmup", type=int, default=400, help="requests before measuring (fills the caches)"
    )
    p.add_argument("--batch", type=int, default=1, help="sequences per request")
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the token ids")
    p.add_argument("--torch-threads", type=int, default=1, help="server.torch_threads")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the load test; print and optionally save the figures."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        config = prepare_config(
            Path(tmp),
            args.config,
            {"tables": {"create": True}, "server": {"torch_threads": args.torch_threads}},
        )
        with ServeProcess(config, metrics=False) as server:
            url = server.url + "/v1/engram"
            warm = zipf_requests(
                args.warmup, batch=args.batch, tokens=args.tokens, exponent=args.zipf, seed=1
            )
            run_load(url, warm, clients=args.clients)
            rss_before, cached_before = server.rss_bytes(), cached_bytes(server.url)
            bodies = zipf_requests(
                args.requests, batch=args.batch, tokens=args.tokens, exponent=args.zipf, seed=2
            )
            result = run_load(url, bodies, clients=args.clients, check=lambda a: "checksum" in a)
            rss_after, cached_after = server.rss_bytes(), cached_bytes(server.url)
            _, stats = get_json(server.url + "/stats")
            status = server.stop()
    report = result.to_dict()
    report.update(
        tokens_per_request=args.batch * args.tokens,
        server_rss_before_mib=round(rss_before / 2**20, 1),
        server_rss_after_mib=round(rss_after / 2**20, 1),
        rss_growth_mib=round((rss_after - rss_before) / 2**20, 1),
        # payload of rows that entered the cache tiers during the run (slots reserved at start,
        # touched on first write): growth up to about this much is the caches filling, not a leak
        cache_fill_mib=round((cached_after - cached_before) / 2**20, 1),
        server_exit_status=status,
        hit_rate={
            f"{table}/{tier}": round(s[tier]["hit_rate"], 4)
            for table, s in stats["tables"].items()
            for tier in ("hot", "warm")
        },
    )
    print(json.dumps(report, indent=2))
    print(
        f"\n{args.clients} clients, {result.requests} requests of {args.batch}x{args.tokens} tokens: "
        f"{result.requests_per_second:.1f} req/s, p50 {result.percentile_ms(50):.1f} ms, "
        f"p95 {result.percentile_ms(95):.1f} ms, p99 {result.percentile_ms(99):.1f} ms; "
        f"errors {sum(result.errors.values())}, lost {result.lost}; server RSS "
        f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB, of which "
        f"{(cached_after - cached_before) / 2**20:.1f} MiB newly cached rows"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if not result.errors and result.lost == 0 and status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
