"""Shared by the distributed tests: tables with head layouts, and the workers the ranks run.

Workers run in processes started with the ``spawn`` method (real processes, gloo over loopback);
each writes what it saw to ``OUT/rank{R}.json`` so the test can check every rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from tiered_store import TieredStore
from tiered_store.table_format import PackedSafetensorsSource, SafetensorsSource, create_table

HEADS = [53, 59, 61, 67, 71, 73, 79]  # prime-sized hash heads, as an Engram layer's
V41_TABLES = (
    Path(__file__).resolve().parent / "data" / "golden" / "v41" / "golden_v41_tables.safetensors"
)


def head_metadata(sizes: list[int]) -> dict[str, Any]:
    """The Engram head layout a manifest records (offsets and sizes of the heads)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    return {"engram": {"head_sizes": list(sizes), "offsets": offsets}}


def make_plain_table(directory: Path, seed: int = 0) -> Path:
    """A bfloat16 table of 7 prime-sized heads (463 rows x 8)."""
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(rng.standard_normal((sum(HEADS), 8)).astype(np.float32))
    path = directory / "plain.npy"
    create_table(path, data.bfloat16(), metadata=head_metadata(HEADS), progress=False)
    return path


def make_v41_table(directory: Path, golden: dict) -> Path:
    """DeepSeek-V4.1's layer-1 golden table (1,998 packed fp8 rows) with its 24 head buckets."""
    primes = [p for order in golden["layers"]["1"]["primes"] for p in order]
    path = directory / "v41.npy"
    source = PackedSafetensorsSource(
        SafetensorsSource(V41_TABLES, "layers.1.engram.embed.weight"),
        SafetensorsSource(V41_TABLES, "layers.1.engram.embed.scale"),
    )
    create_table(path, source, metadata=head_metadata(primes), progress=False)
    return path


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, world: int, args: tuple, deadline_s: float) -> list[int | None]:
    """Start ``world`` spawned processes ``target(rank, world, port, *args)``; exit codes (None:
    still running at the deadline, then killed)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(end - time.monotonic(), 0))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


def _init(rank: int, world: int, port: int) -> None:
    """Join the group the way torchrun would set it up (ShardedStore initialises it)."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )


def _report(out: Path, rank: int, result: dict) -> None:
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def shards_template(table: Path, by: str) -> str:
    """Where the tests put ``table``'s shards cut ``by`` heads or rows."""
    return str(table.with_name(f"{table.stem}.{by}.shard-{{rank}}-of-{{ranks}}.npy"))


def _store_config(table: Path, world: int, by: str, out_of_range: str = "error") -> dict:
    """A small-tier sharded store config (tiers evict, so every tier serves some rows)."""
    return {
        "table": {"path": str(table), "out_of_range": out_of_range},
        "tiers": {"hot": {"capacity": 8}, "warm": {"capacity": 24}, "cold": {"threads": 2}},
        "sharding": {
            "ranks": world,
            "by": by,
            "shards": shards_template(table, by),
            "timeout_s": 20,
        },
    }


def _bits(rows: torch.Tensor) -> torch.Tensor:
    """Rows as raw integers, for bit-exact comparison."""
    return rows.view(torch.int16) if rows.element_size() == 2 else rows


def exact_lookups_worker(
    rank: int, world: int, port: int, tables: dict, out: Path, victim: int | None
) -> None:
    """Every rank: lookups (duplicates, prefetch, an empty batch, V4.1 out-of-range ids) against
    one TieredStore over the whole table; then the opens that must be refused; then, with a
    ``victim``, that rank is killed mid-lookup (one spawn for all: spawning costs seconds)."""
    from datetime import timedelta

    import torch.distributed as dist

    from tiered_store.distributed import ShardedStore
    from tiered_store.errors import ShardMismatchError

    torch.set_num_threads(1)  # an existing group, which the stores use and leave open
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    result: dict[str, Any] = {"checked": [], "refused": []}
    try:
        gen = torch.Generator().manual_seed(100 + rank)
        for name, by in (("plain", "heads"), ("plain", "rows"), ("v41", "heads"), ("v41", "rows")):
            table = Path(tables[name])
            cfg = _store_config(table, world, by, "zero" if name == "v41" else "error")
            single = TieredStore.open({"table": cfg["table"]})
            with ShardedStore.open(cfg) as store:
                rows = single.rows
                batches = [torch.randint(0, rows, (5, 6), generator=gen) for _ in range(4)]
                batches[1][0] = batches[1][1]  # duplicates inside a batch
                if rank == world - 1:
                    batches[2] = batches[2][:0]  # this rank asks for nothing this round
                if name == "v41":  # ids outside the table give zero rows, as the single store
                    batches[3][0, :3] = torch.tensor([-1, rows, rows + 7])
                for ids in batches:  # plain lookups
                    assert torch.equal(_bits(store.lookup(ids)), _bits(single.lookup(ids)))
                handles = [store.prefetch(ids) for ids in batches[:2]]  # prefetch two ahead
                for ids, handle in zip(batches[:2], handles, strict=True):
                    assert torch.equal(_bits(store.lookup(ids, handle)), _bits(single.lookup(ids)))
                if name == "v41":
                    packed = store.lookup(batches[3], packed=True)
                    assert torch.equal(packed, single.lookup(batches[3], packed=True))
                stats = store.stats()
                assert stats["exchange"]["lookups"] == (7 if name == "v41" else 6)
                result["checked"].append([name, by, stats["exchange"]["bytes_sent"]])
            single.close()
        # refusals: one rank opens a shard of another table version, or another sharding mode
        other = Path(tables["plain_other"])
        for case in ("version", "mode"):
            cfg = _store_config(Path(tables["plain"]), world, "heads")
            if rank == 1 and case == "version":
                cfg["sharding"]["shards"] = shards_template(other, "heads")
            if rank == 1 and case == "mode":
                cfg = _store_config(Path(tables["plain"]), world, "rows")
            try:
                ShardedStore.open(cfg).close()
                result["refused"].append([case, None])
            except ShardMismatchError as exc:
                result["refused"].append([case, str(exc)])
        if victim is not None:
            cfg = _store_config(Path(tables["plain"]), world, "rows")
            cfg["sharding"]["timeout_s"] = KILL_TIMEOUT_S
            _report(out, rank, result)  # what the victim saw so far
            kill_or_stall(ShardedStore.open(cfg), rank, victim, "kill", result)
        dist.destroy_process_group()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def killed_rank_worker(
    rank: int, world: int, port: int, table: str, out: Path, victim: int, how: str
) -> None:
    """A group ShardedStore makes from the environment; the victim dies or stalls (see
    ``kill_or_stall``)."""
    from tiered_store.distributed import ShardedStore

    _init(rank, world, port)
    result: dict[str, Any] = {}
    try:
        cfg = _store_config(Path(table), world, "rows")
        cfg["sharding"]["timeout_s"] = KILL_TIMEOUT_S
        kill_or_stall(ShardedStore.open(cfg), rank, victim, how, result)
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


KILL_TIMEOUT_S = 6.0


def kill_or_stall(store: Any, rank: int, victim: int, how: str, result: dict) -> None:
    """Two good lookups; then the victim dies (SIGKILL with its exchange in flight) or stalls,
    and the others' third lookup must fail naming it, within the timeout."""
    from tiered_store.errors import RankFailureError, TierIOError

    ids = torch.arange(40).reshape(8, 5) * 11 % store.rows
    for _ in range(2):
        store.lookup(ids)
    if how == "truncate":  # the victim's shard file shrinks: its next cold read fails
        ids = (ids + 1) % store.rows  # rows no tier holds yet
        if rank == victim:
            os.truncate(store.path, 4096)
            try:
                store.lookup(ids)
            except TierIOError as exc:
                result["own_error"] = f"{type(exc).__name__}: {exc}"
            store.close()
            return
    elif rank == victim:
        if how == "kill":
            store.prefetch(ids)  # the exchange is in flight on the store's thread ...
            os.kill(os.getpid(), signal.SIGKILL)  # ... when the process dies
        time.sleep(KILL_TIMEOUT_S + 4)  # stalls: alive, but never calls lookup again
        return
    start = time.monotonic()
    try:
        store.lookup(ids)
        result["error"] = None
    except RankFailureError as exc:
        result["error"] = str(exc)
    result["seconds"] = time.monotonic() - start
    try:
        store.lookup(ids)
    except RankFailureError as exc:  # the store stays failed
        result["after"] = str(exc)
    store.close()
