"""Load test of ``tiered-store serve``: N concurrent clients, a fixed number of requests, loopback only.

Starts the server as a subprocess (tables built in a temporary directory from ``--config``,
default ``examples/serve.yaml``), warms it up, then has ``--clients`` threads send ``--requests``
inference requests in total (Zipf-distributed token ids, so the tiers see a realistic mix of hits
and misses) and reports requests/s, latency percentiles, errors, lost requests, and the server's
resident memory before and after the measured run. Exits 1 if any request failed or was lost.

Example::

    python bench/bench_serve.py --clients 8 --requests 2000 --tokens 128

Everything is bounded: a fixed number of requests, each with a timeout, a startup timeout, and the
server only binds 127.0.0.1. The server process, the requests and the load generator come from
``tiered_store.serve.client`` (the tests use the same client).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tiered_store.serve.client import ServeProcess, get_json, run_load, zipf_requests

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "examples" / "serve.yaml"


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
