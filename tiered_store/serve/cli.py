"""The ``tiered-store serve`` subcommand: parse the options, build the server, serve until a signal."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .config import ServeConfig
from .http_handler import INFERENCE_PATH
from .server import InferenceServer

__all__ = ["register", "run_serve"]


def register(sub: Any) -> None:
    """Add the ``serve`` subcommand."""
    p = sub.add_parser(
        "serve",
        help="serve Engram inference over tiered stores via HTTP, with Prometheus metrics",
        description="Holds one tiered store per Engram layer and the Engram layers over a stand-in "
        f"backbone; answers POST {INFERENCE_PATH} with token ids or text (JSON), GET /healthz, "
        "/stats and /metrics. Prints one JSON line with the bound URLs once listening. SIGTERM or "
        "SIGINT drains requests in flight and exits 0. See examples/serve.yaml for the config.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("config", type=Path, help="serve config (YAML)")
    p.add_argument(
        "--address", help="host:port of the inference endpoint (overrides server.address)"
    )
    p.add_argument(
        "--metrics-address",
        help="host:port of a separate /metrics listener, '' for none (overrides store.metrics.address)",
    )
    p.add_argument(
        "--create-tables", action="store_true", help="build seeded random tables that do not exist"
    )
    p.add_argument(
        "--record-trace",
        type=Path,
        metavar="PATH",
        help="record every lookup served as a trace (read it with `tiered-store replay`)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Run the server until a signal; returns the exit status."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    config = ServeConfig.from_yaml(args.config)
    overrides = {}
    if args.address is not None:
        overrides["address"] = args.address
    if args.metrics_address is not None:
        overrides["metrics_address"] = args.metrics_address
    if overrides:
        config = config.with_overrides(**overrides)
    server = InferenceServer(
        config,
        create_tables=args.create_tables,
        trace=args.record_trace,
        access_log=args.access_log,
    )
    return server.serve_until_signal()
