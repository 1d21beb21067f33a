"""The ``tiered-store serve`` and ``tiered-store init-model`` subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from ..cli_args import DefaultsHelpFormatter, command_help, given_path, output_file
from ..errors import TieredStoreError, error_text
from .app import INFERENCE_PATH
from .config import ServeConfig
from .served_model import create_checkpoint
from .server import InferenceServer

__all__ = ["register_init_model", "register_serve", "run_init_model", "run_serve"]

log = logging.getLogger("tiered_store.serve")


def register_serve(sub: Any) -> None:
    """Add the ``serve`` subcommand."""
    p = sub.add_parser(
        "serve",
        help=command_help("serve"),
        description="Opens the checkpoint (checkpoint.path: a directory written by "
        "convert_checkpoint) with one tiered store per Engram layer and runs its EngramLM; "
        f"answers POST {INFERENCE_PATH} with token ids or text (JSON), GET /healthz, /stats and "
        "/metrics. Prints one JSON line with the bound URLs once listening. SIGTERM or SIGINT "
        "drains requests in flight and exits 0 (while starting: stops before listening). See examples/serve.yaml for the config.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("config", type=given_path, help="serve config (YAML)")
    p.add_argument(
        "--address", help="host:port of the inference endpoint (overrides server.address)"
    )
    p.add_argument(
        "--metrics-address",
        help="host:port of a separate /metrics listener, '' for none (overrides store.metrics.address)",
    )
    p.add_argument(
        "--create-tables",
        action="store_true",
        help="create a small seeded random checkpoint from the config's model section when "
        "checkpoint.path holds none",
    )
    p.add_argument(
        "--record-trace",
        type=output_file,
        metavar="PATH",
        help="record every lookup served as a trace (in place on exit; `tiered-store "
        "recover-trace` for a server killed); beside it, when recording starts, each table's "
        "store config as PATH.TABLE.store.yaml, for `tiered-store replay PATH.TABLE.store.yaml "
        "PATH --table TABLE`",
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(run=run_serve)


def register_init_model(sub: Any) -> None:
    """Add the ``init-model`` subcommand."""
    p = sub.add_parser(
        "init-model",
        help=command_help("init-model"),
        description="Build an EngramLM with the config's model section (seed checkpoint.seed) "
        "and convert it into checkpoint.path: one table file per Engram layer and "
        "dense.safetensors, exactly as convert_checkpoint writes a real model.",
    )
    p.add_argument("config", type=given_path, help="serve config (YAML) with a model section")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    p.set_defaults(run=run_init_model)


def _log_to_stderr() -> None:
    """INFO lines with time and logger name on stderr."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def run_serve(args: argparse.Namespace) -> int:
    """Run the server until a signal; returns the exit status."""
    _log_to_stderr()
    config = ServeConfig.from_yaml(args.config)
    overrides = {}
    if args.address is not None:
        overrides["address"] = args.address
    if args.metrics_address is not None:
        overrides["metrics_address"] = args.metrics_address
    if overrides:
        config = config.with_overrides(**overrides)
    if config.sharded:  # one process per rank (torchrun): rank 0 serves HTTP, the others follow
        import torch.distributed as dist

        from ..distributed import init_process_group_from_env
        from .ranks import run_follower

        store = config.store_config(0)
        init_process_group_from_env(store.sharding, store.tiers.hot.device)
        if dist.get_rank() != 0:
            return run_follower(config)
    server = InferenceServer(
        config,
        create_tables=args.create_tables,
        trace=args.record_trace,
        access_log=args.access_log,
    )
    try:
        status = server.serve_until_signal()
    except BaseException as exc:  # the stop raised (the trace's close failed, a Ctrl-C): exited
        if server.model is None or not (tables := server.model.left_closing):  # past too, with
            raise  # the status run_script gives it
        if isinstance(exc, KeyboardInterrupt):
            log.error("stopping interrupted")
            status = 130
        else:
            log.error("stopping failed: %s", error_text(exc))
            status = 2 if isinstance(exc, TieredStoreError) else 1
        _exit_past_hung_calls(status, tables)
    if server.model is not None and (tables := server.model.left_closing):
        _exit_past_hung_calls(status, tables)
    return status


def _exit_past_hung_calls(status: int, tables: list[str]) -> None:
    """Exit at once with ``status`` (``os._exit``, the logs flushed): the stop left ``tables``'
    stores to close under calls hung in them (a read on a dead disk), which the interpreter's
    exit may wait for without end (it joins the threads that are not daemons: a request's
    hung in one, say; the stores' prefetch workers and cold readers are daemons)."""
    log.warning(
        "exiting with calls to %s still under way after the stop (hung: a read on a dead "
        "disk, say); not waiting for them",
        ", ".join(tables),
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_init_model(args: argparse.Namespace) -> int:
    """Create the random checkpoint; returns the exit status."""
    from ..errors import ConfigError

    _log_to_stderr()
    config = ServeConfig.from_yaml(args.config)
    if config.dense_path.exists() and not args.overwrite:
        raise ConfigError(
            f"checkpoint.path: {config.checkpoint_dir} already holds a checkpoint; pass "
            "--overwrite to replace it"
        )
    converted = create_checkpoint(config, progress=True)
    for layer, path in converted.table_paths.items():
        print(f"layer {layer}: {path}")
    print(f"dense weights and model config: {converted.dense_path}")
    return 0
