"""Load test of ``tiered-store serve`` on loopback: 1, 8 and 64 concurrent clients, a 60 s soak,
and the HTTP overhead against the in-process forward on the same batches.

Starts the server as a subprocess over a small random checkpoint (``checkpoint.create`` in a
temporary directory, shapes from ``--config``, default ``examples/serve.yaml``), warms it up,
then for each client count sends ``--requests`` inference requests (Zipf-distributed token ids,
so the tiers see a realistic mix of hits and misses) over keep-alive connections and reports
requests/s, p50/p99 latency, errors and connection resets. A soak at ``--soak-clients`` clients
for ``--soak-seconds`` samples the server's resident memory every second (flat = no leak). Last,
the same checkpoint is opened in this process (``ServedModel``) and the same bodies go, one at a
time and alternating, to the server and to it: the ratio of the HTTP latency to the in-process
answer is the serving overhead (JSON, HTTP, the worker hand-off). ``--announce-rounds N`` then
alternates N rounds between the server and a second one that announces each waiting request to
its tables (``server.announce_requests``): the ratio of their requests/s is what announcing costs
or gains. Exits 1 if any request failed, was lost or was reset.

Example::

    python bench/bench_serve.py --requests 400 --soak-seconds 60 --out bench/results/serve.json

Everything is bounded: a fixed number of requests per run, a fixed soak time, each request with a
timeout, a startup timeout, and the server only binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import yaml

from tiered_store.atomic_file import write_json
from tiered_store.cli_args import at_least, doc_parser, given_path, output_file, run_script, wrote
from tiered_store.serve import ServeConfig, ServedModel, parse_request
from tiered_store.serve.client import ServeProcess, get_json, post_json, run_load, zipf_requests

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "examples" / "serve.yaml"
RESETS = ("ConnectionResetError", "RemoteDisconnected", "BrokenPipeError", "ConnectionRefusedError")


def prepare_config(
    workdir: Path, base: Path, torch_threads: int, *, announce: bool | None = None
) -> Path:
    """A copy of ``base`` in ``workdir`` whose checkpoint is created there (``announce``:
    ``server.announce_requests``, when given)."""
    data = yaml.safe_load(base.read_text())
    data["checkpoint"] = {**(data.get("checkpoint") or {}), "path": "checkpoint", "create": True}
    data["server"] = {**(data.get("server") or {}), "torch_threads": torch_threads}
    if announce is not None:
        data["server"]["announce_requests"] = announce
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "serve.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = doc_parser(__doc__)
    p.add_argument("--config", type=given_path, default=DEFAULT_CONFIG, help="serve config to copy")
    p.add_argument("--clients", default="1,8,64", help="client counts, comma-separated")
    p.add_argument(
        "--requests",
        type=at_least(1, "at least 1 request"),
        default=400,
        help="measured requests per client count",
    )
    p.add_argument(
        "--warmup",
        type=at_least(0, "0 or more requests"),
        default=200,
        help="requests before measuring",
    )
    p.add_argument(
        "--batch", type=at_least(1, "at least 1 sequence"), default=1, help="sequences per request"
    )
    p.add_argument(
        "--tokens", type=at_least(1, "at least 1 token"), default=128, help="tokens per sequence"
    )
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the token ids")
    p.add_argument("--soak-seconds", type=float, default=60.0, help="RSS soak duration (0: skip)")
    p.add_argument(
        "--soak-clients",
        type=at_least(1, "at least 1 client"),
        default=8,
        help="clients during the soak",
    )
    p.add_argument(
        "--torch-threads",
        type=at_least(0, "0 (torch's default) or more threads"),
        default=1,
        help="server.torch_threads (both sides)",
    )
    p.add_argument(
        "--announce-rounds",
        type=at_least(0, "0 (skip) or more rounds"),
        default=0,
        help="rounds of --requests at --soak-clients clients alternating between the server "
        "and a second one that announces each waiting request (server.announce_requests): "
        "its cost or gain in requests/s",
    )
    p.add_argument("--out", type=output_file, help="write the results as JSON here")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse an option value the load test cannot use (the counts are refused by their types),
    naming it, before starting a server: exit 2 with the usage."""
    try:
        counts = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        p.error(f"--clients {args.clients!r}: expected client counts >= 1, e.g. 1,8,64")
    if not 0.0 <= args.soak_seconds < math.inf:  # NaN too
        p.error(f"--soak-seconds {args.soak_seconds}: expected 0 (skip) or more seconds")
    if not 1.0 < args.zipf < math.inf:
        p.error(f"--zipf {args.zipf}: expected a finite Zipf exponent > 1")
    if not args.config.is_file():
        p.error(f"--config {args.config}: no such file; expected a serve config (YAML)")
    limits = ServeConfig.from_yaml(args.config).server  # a request the server refuses: no load
    for flag, value, key, limit in (
        ("--tokens", args.tokens, "max_seq_len", limits.max_seq_len),
        ("--batch", args.batch, "max_batch", limits.max_batch),
        ("--batch x --tokens", args.batch * args.tokens, "max_tokens", limits.max_tokens),
    ):
        if value > limit:
            p.error(
                f"{flag} {value:,}: the server takes at most {limit:,} (server.{key} in "
                f"{args.config}); expected at most that, or a config that allows more"
            )


def _shown(path: Path) -> str:
    """A path as the report records it: relative to the repository when inside it (the default
    config), so a result does not name the machine it was measured on."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def resets(errors: dict[str, int]) -> int:
    """Requests lost to a reset or refused connection."""
    return sum(n for k, n in errors.items() if k in RESETS)


def soak(server: ServeProcess, args: argparse.Namespace) -> dict[str, Any]:
    """Load for ``--soak-seconds`` while sampling the server's RSS once a second."""
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter() - start, server.rss_bytes()))
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    answered, errors, seed = 0, {}, 100
    while time.perf_counter() - start < args.soak_seconds:
        bodies = zipf_requests(
            4 * args.soak_clients,
            batch=args.batch,
            tokens=args.tokens,
            exponent=args.zipf,
            seed=seed,
        )
        result = run_load(server.url + "/v1/engram", bodies, clients=args.soak_clients)
        answered += result.answered
        for k, n in result.errors.items():
            errors[k] = errors.get(k, 0) + n
        seed += 1
    stop.set()
    sampler.join()
    rss = [r for _, r in samples]
    half = len(rss) // 2
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "clients": args.soak_clients,
        "answered": answered,
        "errors": errors,
        "rss_first_mib": round(rss[0] / 2**20, 1),
        "rss_last_mib": round(rss[-1] / 2**20, 1),
        "rss_max_mib": round(max(rss) / 2**20, 1),
        # second half vs first half of the soak: growth after the caches filled
        "rss_second_half_growth_mib": round(
            (max(rss[half:]) - max(rss[: max(half, 1)])) / 2**20, 1
        ),
        "rss_samples_mib": [round(r / 2**20, 1) for r in rss],
    }


def overhead(
    server: ServeProcess, config_path: Path, bodies: list[dict], warm: list[dict], threads: int
) -> dict[str, Any]:
    """Each body over HTTP (one keep-alive connection) and to a ``ServedModel`` in this process,
    alternating body by body; both warmed with the same bodies first (each has its own caches)."""
    if threads:  # 0: torch's default, as the server leaves it
        torch.set_num_threads(threads)
    served = ServedModel(ServeConfig.from_yaml(config_path))
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    url = server.url + "/v1/engram"
    limits = served.config.server
    try:
        for body in warm:
            post_json(url, body, connection=conn)
            served.answer(parse_request(json.dumps(body).encode(), limits, served))
        http_ms, local_ms = [], []
        for body in bodies:
            start = time.perf_counter()
            status, answer = post_json(url, body, connection=conn)
            http_ms.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            local = served.answer(parse_request(json.dumps(body).encode(), limits, served))
            local_ms.append((time.perf_counter() - start) * 1e3)
            if status != 200 or answer["hidden_checksum"] != local["hidden_checksum"]:
                raise RuntimeError(f"HTTP and in-process answers differ: {status} {answer}")
    finally:
        conn.close()
        served.close()
    return {
        "requests": len(bodies),
        "http_median_ms": round(statistics.median(http_ms), 2),
        "in_process_median_ms": round(statistics.median(local_ms), 2),
        "http_mean_ms": round(statistics.fmean(http_ms), 2),
        "in_process_mean_ms": round(statistics.fmean(local_ms), 2),
        "ratio_median": round(statistics.median(http_ms) / statistics.median(local_ms), 3),
        "ratio_mean": round(statistics.fmean(http_ms) / statistics.fmean(local_ms), 3),
    }


def announce_cost(
    server: ServeProcess, workdir: Path, args: argparse.Namespace, warm: list[dict]
) -> dict[str, Any]:
    """Requests/s of ``server`` and of a second server over the same checkpoint settings that
    announces each waiting request, rounds alternating (one server loaded at a time), and the
    tables' hit rates of both after them."""
    config = prepare_config(workdir, args.config, args.torch_threads, announce=True)
    make = dict(batch=args.batch, tokens=args.tokens, exponent=args.zipf)
    rates: dict[str, list[float]] = {"plain": [], "announcing": []}
    with ServeProcess(config, metrics=False) as announcing:
        run_load(announcing.url + "/v1/engram", warm, clients=8)
        for round_ in range(args.announce_rounds):
            bodies = zipf_requests(args.requests, seed=50 + round_, **make)
            for name, target in (("plain", server), ("announcing", announcing)):
                result = run_load(target.url + "/v1/engram", bodies, clients=args.soak_clients)
                if result.errors or result.lost:
                    raise RuntimeError(
                        f"{name} server: errors {result.errors} ({result.error_texts}), lost {result.lost}"
                    )
                rates[name].append(result.requests_per_second)
        hit_rates = {
            name: {
                f"{table}/{tier}": round(s[tier]["hit_rate"], 4)
                for table, s in get_json(target.url + "/stats")[1]["tables"].items()
                for tier in ("hot", "warm")
            }
            for name, target in (("plain", server), ("announcing", announcing))
        }
    plain, announced = statistics.median(rates["plain"]), statistics.median(rates["announcing"])
    return {
        "clients": args.soak_clients,
        "rounds": args.announce_rounds,
        "requests_per_second": rates,
        "ratio_median": round(announced / plain, 3),
        "hit_rate": hit_rates,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the load test; print and optionally save the figures."""
    args = parse_args(argv)
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    make = dict(batch=args.batch, tokens=args.tokens, exponent=args.zipf)
    warm = zipf_requests(args.warmup, seed=1, **make)
    report: dict[str, Any] = {
        "options": {
            k: _shown(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"
        },
        "tokens_per_request": args.batch * args.tokens,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        config = prepare_config(Path(tmp), args.config, args.torch_threads)
        with ServeProcess(config, metrics=False) as server:
            url = server.url + "/v1/engram"
            run_load(url, warm, clients=8)
            for clients in counts:
                bodies = zipf_requests(args.requests, seed=2 + clients, **make)
                result = run_load(
                    url, bodies, clients=clients, check=lambda a: "hidden_checksum" in a
                )
                run = result.to_dict()
                run["resets"] = resets(result.errors)
                report["runs"].append(run)
                print(
                    f"{clients:3d} clients: {result.requests_per_second:7.1f} req/s, p50 "
                    f"{result.percentile_ms(50):7.1f} ms, p99 {result.percentile_ms(99):7.1f} ms, "
                    f"errors {sum(result.errors.values())}, resets {run['resets']}, lost {result.lost}",
                    flush=True,
                )
            if args.soak_seconds > 0:
                report["soak"] = soak(server, args)
                s = report["soak"]
                print(
                    f"soak {s['seconds']} s at {s['clients']} clients: {s['answered']} answered, errors "
                    f"{s['errors'] or 0}; server RSS {s['rss_first_mib']} -> {s['rss_last_mib']} MiB "
                    f"(max {s['rss_max_mib']}, second-half growth {s['rss_second_half_growth_mib']} MiB)",
                    flush=True,
                )
            report["overhead"] = overhead(
                server,
                config,
                zipf_requests(args.requests, seed=7, **make),
                warm,
                args.torch_threads,
            )
            o = report["overhead"]
            print(
                f"overhead, 1 client, same bodies alternating: HTTP {o['http_median_ms']} ms vs "
                f"in-process {o['in_process_median_ms']} ms per request (median), ratio "
                f"{o['ratio_median']} (of the means {o['ratio_mean']})"
            )
            if args.announce_rounds:
                report["announce"] = announce_cost(server, Path(tmp) / "announce", args, warm)
                a = report["announce"]
                print(
                    f"announcing waiting requests, {a['clients']} clients, {a['rounds']} rounds "
                    f"alternating: {a['ratio_median']}x the requests/s of the plain server "
                    "(median of the rounds)",
                    flush=True,
                )
            _, stats = get_json(server.url + "/stats")
            report["server_exit_status"] = server.stop()
    report["hit_rate"] = {
        f"{table}/{tier}": round(s[tier]["hit_rate"], 4)
        for table, s in stats["tables"].items()
        for tier in ("hot", "warm")
    }
    if args.out:
        wrote(write_json(args.out, report))
    bad = any(r["errors"] or r["lost"] for r in report["runs"]) or report["server_exit_status"] != 0
    bad = bad or bool(report.get("soak", {}).get("errors"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
