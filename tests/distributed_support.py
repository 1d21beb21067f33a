"""Shared by the distributed tests: tables with head layouts, and the workers the ranks run.

Workers run in processes started with the ``spawn`` method (real processes, gloo over loopback);
each writes what it saw to ``OUT/rank{R}.json`` so the test can check every rank.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests import forkserver
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


def _host_store(port: int, up: Any) -> None:
    """Host a TCPStore on ``port`` (as rank 0 hosts the group's) until killed."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # noqa: F841
    up.set()
    time.sleep(120)


def store_host(port: int) -> Any:
    """A process (of the tests' forkserver) hosting a TCPStore on ``port``, once it is up."""
    ctx = forkserver.context()
    up = ctx.Event()
    host = ctx.Process(target=_host_store, args=(port, up), daemon=True)
    host.start()
    assert up.wait(60), "the store host never came up"
    return host


def _as_rank(target, env: dict[str, str], *args: Any) -> None:
    """In the forked process: the test's environment (not the forkserver's), then the worker."""
    os.environ.clear()
    os.environ.update(env)
    target(*args)


def run_ranks(target, world: int, args: tuple, deadline_s: float) -> list[int | None]:
    """Start ``world`` processes ``target(rank, world, port, *args)``, forked by the tests'
    forkserver (torch and the store imported once, not by each rank); exit codes (None: still
    running at the deadline, then killed)."""
    ctx = forkserver.context()
    port = free_port()
    env = dict(os.environ)
    procs = [
        ctx.Process(target=_as_rank, args=(target, env, r, world, port, *args))
        for r in range(world)
    ]
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


def _join_group(rank: int, world: int, port: int) -> None:
    """Make the gloo group ourselves (ShardedStore then uses the existing one)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )


def _report(out: Path, rank: int, result: dict) -> None:
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def _report_once_rank_0_has(out: Path, rank: int, result: dict) -> None:
    """``_report``, then wait for rank 0's report before leaving the group (rank 0 hosts the
    group's store: the other ranks stay until it is done with it)."""
    _report(out, rank, result)
    while not (out / "rank0.json").exists():
        time.sleep(0.05)
    dist_destroy()


def _open_outcome(cfg: dict, group: Any = None) -> str:
    """What opening a ``ShardedStore`` on ``cfg`` did: "ok" (then closed), or its error."""
    from tiered_store.distributed import sharded_store

    try:
        sharded_store.ShardedStore.open(cfg, group).close()
        return "ok"
    except Exception as exc:  # noqa: BLE001 (recorded for the test)
        return f"{type(exc).__name__}: {exc}"


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
    import torch.distributed as dist

    from tiered_store.distributed import ShardedStore
    from tiered_store.errors import ShardMismatchError

    _join_group(rank, world, port)  # an existing group, which the stores use and leave open
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
        # refusals: one rank opens a shard of another table version, another sharding mode, or
        # a shard never made
        other = Path(tables["plain_other"])
        for case in ("version", "mode", "missing"):
            cfg = _store_config(Path(tables["plain"]), world, "heads")
            if rank == 1 and case == "version":
                cfg["sharding"]["shards"] = shards_template(other, "heads")
            if rank == 1 and case == "mode":
                cfg = _store_config(Path(tables["plain"]), world, "rows")
            if rank == 1 and case == "missing":
                cfg["sharding"]["shards"] = str(other.with_name("none.{rank}-of-{ranks}.npy"))
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


# 6 s failed 3 runs in 8 of the 3-rank exact-lookups test (its first lookup after the refused
# opens had no answer within it; 9816634 too, not explained); 12 s passed 6 of 6
KILL_TIMEOUT_S = 12.0


def kill_or_stall(store: Any, rank: int, victim: int, how: str, result: dict) -> None:
    """Two good lookups; then the victim dies (SIGKILL with its exchange in flight) or stalls,
    and the others' third lookup must fail naming it, within the timeout; or the victim's shard
    cannot serve the third (``truncate``), which fails on every rank, and the fourth is served."""
    from tiered_store.errors import RankFailureError, ShardReadError, TierIOError, error_text

    ids = torch.arange(40).reshape(8, 5) * 11 % store.rows
    for _ in range(2):
        rows = store.lookup(ids)
    if how == "truncate":  # the victim's shard file shrinks: its next cold read fails
        if rank == victim:
            os.truncate(store.path, 4096)
        start = time.monotonic()
        try:
            store.lookup((ids + 1) % store.rows)  # rows no tier holds yet
        except ShardReadError as exc:
            result["error"] = f"ShardReadError: {error_text(exc)}"
        except TierIOError as exc:
            result["error"] = f"{type(exc).__name__}: {error_text(exc)}"
        result["seconds"] = time.monotonic() - start
        result["served_after"] = bool(torch.equal(store.lookup(ids), rows))  # tiers hold them
        store.close()
        return
    if rank == victim:
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


def interrupted_failed_round_worker(
    rank: int, world: int, port: int, table: str, out: Path
) -> None:
    """Two ranks; rank 1 dies (SIGKILL) after a first lookup; rank 0 prefetches, its round held
    until rank 0's lookup of the handle is interrupted (Ctrl-C) in its wait, then failing on the
    dead rank: once that round is over, the failure rank 0's store records and what its next
    lookup raises."""
    from tiered_store.distributed import ShardedStore
    from tiered_store.errors import RankFailureError

    _init(rank, world, port)
    result: dict[str, Any] = {}
    try:
        cfg = _store_config(Path(table), world, "rows")
        cfg["sharding"]["timeout_s"] = KILL_TIMEOUT_S
        store = ShardedStore.open(cfg)
        ids = torch.arange(40).reshape(8, 5) * 11 % store.rows
        store.lookup(ids)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupted, real = threading.Event(), store._exchange

        def exchange(*args: Any) -> Any:
            interrupted.wait(30)  # the caller is interrupted first
            return real(*args)

        store._exchange = exchange
        handle = store.prefetch(ids)

        def interrupt() -> None:
            while not handle.future._condition._waiters:
                time.sleep(0.001)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # a Ctrl-C

        threading.Thread(target=interrupt, daemon=True).start()
        try:
            result["lookup"] = store.lookup(ids, handle).shape[0]
        except KeyboardInterrupt:
            result["lookup"] = "KeyboardInterrupt"
        interrupted.set()
        with contextlib.suppress(Exception):
            handle.future.exception(timeout=60)  # the round is over
        result["failed"] = None if store.failed is None else str(store.failed)
        try:
            store.lookup(ids)
            result["after"] = None
        except RankFailureError as exc:
            result["after"] = str(exc)
        store.close()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def cancelled_prefetch_worker(rank: int, world: int, port: int, table: str, out: Path) -> None:
    """Two ranks prefetch the same batch; rank 0 cancels its handle's future while the round is
    queued (its collective thread held). Then both look up another batch, rank 1 collects its
    handle, and both look up a third: what each lookup gave, and each rank's rows for checking."""
    from tiered_store.distributed import ShardedStore
    from tiered_store.prefetch import PrefetchHandleError

    _init(rank, world, port)
    result: dict[str, Any] = {}
    try:
        cfg = _store_config(Path(table), world, "rows")
        cfg["sharding"]["timeout_s"] = 5  # a rank out of step fails within it, not for good
        store = ShardedStore.open(cfg)
        ids = [torch.arange(40).reshape(8, 5) * k % store.rows for k in (11, 13, 17)]
        release = threading.Event()
        if rank == 0:
            store._thread.submit(release.wait, 30)  # the collective thread held: the round queued
        handle = store.prefetch(ids[0])
        result["cancelled"] = handle.future.cancel() if rank == 0 else None
        release.set()
        result["rows"] = [_bits(store.lookup(ids[1])).tolist()]
        try:
            result["rows"].append(_bits(store.lookup(ids[0], handle)).tolist())
        except PrefetchHandleError as exc:
            result["rows"].append(str(exc))
        result["rows"].append(_bits(store.lookup(ids[2])).tolist())
        result["failed"] = None if store.failed is None else str(store.failed)
        store.close()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def hung_read_worker(rank: int, world: int, port: int, table: str, out: Path) -> None:
    """Two ranks; rank 1's shard read hangs in the second lookup (alive, in the round, its beat
    moving, as on a disk or file system that stopped answering): what each rank's lookup
    raises."""
    from tiered_store.distributed import ShardedStore
    from tiered_store.errors import RankFailureError

    _init(rank, world, port)
    result: dict[str, Any] = {}
    try:
        cfg = _store_config(Path(table), world, "rows")
        cfg["sharding"]["timeout_s"] = KILL_TIMEOUT_S
        store = ShardedStore.open(cfg)
        ids = torch.arange(0, 463, 9)
        store.lookup(ids)
        if rank == 1:
            real = store.local.lookup

            def hanging(*args: Any, **kwargs: Any) -> torch.Tensor:
                time.sleep(KILL_TIMEOUT_S + 4)
                return real(*args, **kwargs)

            store.local.lookup = hanging
        try:
            store.lookup(ids)
            result["error"] = None
        except RankFailureError as exc:
            result["error"] = str(exc)
        store.close()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


# -- writes and training through a sharded table ------------------------------------------------
WRITE_ROUNDS = 3
TRAIN_STEPS = 3
TRAIN_ROWS, TRAIN_DIM = 97, 4


def write_round(
    round_no: int, rank: int, rows: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``rank`` writes in round ``round_no``: repeated ids, id 5 on every rank (the highest
    rank's row wins), and one rank writing nothing each round."""
    if (round_no + rank) % 3 == 2:
        return torch.empty(0, dtype=torch.int64), torch.empty((0, width))
    gen = torch.Generator().manual_seed(1000 * round_no + rank)
    ids = torch.randint(0, rows, (12 + 5 * rank,), generator=gen)
    ids = torch.cat([ids, ids[:3], torch.tensor([5])])
    return ids, torch.randn(ids.numel(), width, generator=gen)


def train_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s ids at ``step`` and integer loss weights (so summed gradients are exact)."""
    if step == 2 and rank == 1:  # a rank with no gradients still joins the step
        return torch.empty((0, 6), dtype=torch.int64), torch.empty((0, 6, TRAIN_DIM))
    gen = torch.Generator().manual_seed(50 * step + rank)
    ids = torch.randint(0, TRAIN_ROWS, (3, 6), generator=gen)
    return ids, torch.randint(-3, 4, (3, 6, TRAIN_DIM), generator=gen).float()


def make_trainable(path: Path) -> Path:
    """A small Adam-trainable table (rows ``[weights | moments]``)."""
    from tiered_store.delta.row_optimizers import make_row_optimizer
    from tiered_store.delta.trainable import create_trainable_table

    rng = np.random.default_rng(7)
    weights = rng.standard_normal((TRAIN_ROWS, TRAIN_DIM)).astype(np.float32)
    create_trainable_table(path, weights, make_row_optimizer("adam", lr=0.05))
    return path


def sharded_writes_worker(
    rank: int, world: int, port: int, plain: str, trainable: str, out: Path
) -> None:
    """Every rank: write rounds and commits through a ShardedStore (both modes), a bad id on one
    rank, disagreeing commit steps, a reopen; then Adam steps through a sharded TrainableTable.
    Rows seen go to ``OUT/*_rank{R}.npy`` for the test to compare with one TieredStore."""
    import torch.distributed as dist

    from tiered_store.delta.row_optimizers import make_row_optimizer
    from tiered_store.delta.table_versions import release, take_writer_lock
    from tiered_store.delta.trainable import TrainableTable
    from tiered_store.distributed import ShardedStore
    from tiered_store.errors import CommitError, RowIdError, StepMismatchError

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        for by in ("heads", "rows"):
            cfg = _store_config(Path(plain), world, by)
            with ShardedStore.open(cfg) as store:
                for round_no in range(WRITE_ROUNDS):
                    store.write(*write_round(round_no, rank, store.rows, store.row_width))
                    if round_no == 1:
                        result[f"{by}_first_step"] = store.commit()
                try:  # rank 0 writes outside the table: refused there, the others go on
                    bad = [store.rows] if rank == 0 else torch.empty(0, dtype=torch.int64)
                    store.write(bad, torch.zeros((len(bad), store.row_width)))
                except RowIdError as exc:
                    result["bad_id"] = str(exc)
                try:
                    store.commit(step=9 if rank == world - 1 else None)
                except StepMismatchError as exc:
                    result[f"{by}_mismatch"] = str(exc)
                result[f"{by}_step"] = store.commit()
                everything = torch.arange(store.rows)
                np.save(out / f"{by}_rank{rank}.npy", _bits(store.lookup(everything)).numpy())
            with ShardedStore.open(cfg) as store:
                result[f"{by}_reopened_step"] = store.committed_step
                np.save(
                    out / f"{by}_reopened_rank{rank}.npy", _bits(store.lookup(everything)).numpy()
                )
                if by == "rows":  # another process holds the last shard's writer lock
                    lock = take_writer_lock(store.path) if rank == world - 1 else None
                    try:
                        store.commit()
                    except CommitError as exc:
                        result["commit_failed"] = str(exc)
                    if lock is not None:
                        release(lock)
                    result["step_after_failure"] = store.commit()
        adam = make_row_optimizer("adam", lr=0.05)
        cfg = _store_config(Path(trainable), world, "rows")
        table = TrainableTable(ShardedStore.open(cfg), adam)
        for step in range(1, TRAIN_STEPS + 1):
            ids, weights = train_batch(step, rank)
            (table.lookup(ids) * weights).sum().backward()
            result.setdefault("updated", []).append(table.step(step))
        table.commit()
        np.save(
            out / f"trained_rank{rank}.npy", table.store.lookup(torch.arange(TRAIN_ROWS)).numpy()
        )
        table.close()
        dist.destroy_process_group()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def misuse_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Every rank: one rank misuses a collective (float ids, a step that is not a number,
    gradients of another width or step, a handle prefetched before a write); every outcome is
    recorded, and a plain lookup after each shows the ranks are still in step."""
    from tiered_store.distributed import ShardedStore

    _join_group(rank, world, port)
    result: dict[str, Any] = {"steps": []}

    def attempt(name: str, call) -> None:
        try:
            call()
            result["steps"].append([name, "ok"])
        except Exception as exc:  # noqa: BLE001 (recorded for the test)
            result["steps"].append([name, f"{type(exc).__name__}: {exc}"])
        rows = store.lookup(torch.tensor([0, 461]))  # in step: the same round on every rank
        result["steps"].append(["in step", [float(v) for v in rows[:, 0]]])

    try:
        store = ShardedStore.open(_store_config(Path(plain), world, "rows"))
        ids = torch.tensor([3, 461])
        attempt("float ids", lambda: store.lookup(ids.float() if rank == 1 else ids))
        attempt("commit step", lambda: store.commit(step="two" if rank == 1 else None))
        width = 2 if rank == 0 else 3
        keep = lambda rows, grads: rows  # noqa: E731 (an update that changes nothing)
        attempt("grad widths", lambda: store.update_rows(ids, torch.ones(2, width), keep))
        step = 1 if rank == 0 else 5
        attempt("steps", lambda: store.update_rows(ids, torch.ones(2, 2), keep, step=step))

        def stale_handle() -> None:  # rank 0 prefetches; rank 1 looks up at once
            handle = store.prefetch(ids) if rank == 0 else None
            if rank == 1:
                store.lookup(ids)
            store.write(ids[:1] + rank, torch.full((1, store.row_width), 7.0))
            if handle is not None:
                store.lookup(ids, handle)

        attempt("stale handle", stale_handle)
        seen: list = []
        record = lambda rows, grads: seen.append(grads.tolist()) or rows  # noqa: E731
        owned = torch.tensor([400, 401, 402]) if rank == 0 else torch.tensor([450])  # rank 1's
        grads = torch.empty((3, 0)) if rank == 0 else torch.arange(1.0, 9.0).view(1, 8)
        attempt("zero width", lambda: store.update_rows(owned, grads, record))
        result["zero width seen"] = seen
        store.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def failed_open_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Rank 1's shard store fails to open with an error of torch's (its hot tier's memory out,
    as a GPU shared with the model may be): what every rank's open raises; then every rank
    opens again and looks up (the group is still in step)."""
    from tiered_store.distributed import sharded_store

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    real = sharded_store.TieredStore

    class OutOfMemory(real):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory (the test's)")

    try:
        cfg = _store_config(Path(plain), world, "rows")
        cfg["sharding"]["timeout_s"] = 5
        sharded_store.TieredStore = OutOfMemory if rank == 1 else real
        result["open"] = _open_outcome(cfg)
        sharded_store.TieredStore = real
        with sharded_store.ShardedStore.open(cfg) as store:
            result["rows"] = store.lookup(torch.tensor([0, 462])).float()[:, 0].tolist()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def hung_open_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Rank 1's shard store hangs opening (alive, its beat moving, as on a file system that
    stopped answering): what rank 0's open raises (rank 1 waits for rank 0's answer, then
    records its own)."""
    from tiered_store.distributed import sharded_store

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    real = sharded_store.TieredStore

    class Hanging(real):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(9.0)  # past the 5 s timeout and the diagnosis
            super().__init__(*args, **kwargs)

    try:
        cfg = _store_config(Path(plain), world, "rows")
        cfg["sharding"]["timeout_s"] = 5
        sharded_store.TieredStore = Hanging if rank == 1 else real
        result["open"] = _open_outcome(cfg)
        if rank == 0:  # the group's store stays up for rank 1's own diagnosis
            time.sleep(12.0)
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def absent_rank_open_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """The ranks but 0 join the group but never open the store (alive, elsewhere): what rank 0's
    open raises, how long it took, and the warnings it logged."""
    import logging

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        cfg = _store_config(Path(plain), world, "rows")
        cfg["sharding"]["timeout_s"] = 4
        if rank == 0:
            logged: list[str] = []
            handler = logging.Handler(logging.WARNING)
            handler.emit = lambda record: logged.append(record.getMessage())
            logging.getLogger("tiered_store.distributed").addHandler(handler)
            start = time.monotonic()
            result["open"] = _open_outcome(cfg)
            result["seconds"] = time.monotonic() - start
            result["logged"] = logged
        _report_once_rank_0_has(out, rank, result)
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def late_rank_open_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Rank 1 comes to the open once rank 0 has waited past a round's wait (17.9 s under
    ``timeout_s`` 24), within ``timeout_s`` (4.5 s to spare on a loaded machine): what each
    rank's open did."""
    import torch.distributed as dist

    from tiered_store.distributed.sharded_store import _ranks_digest

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        cfg = _store_config(Path(plain), world, "rows")
        cfg["sharding"]["timeout_s"] = 24
        if rank == 1:  # rank 0's open is under way once its opening heartbeat is there
            prefix = f"tiered_store/sharded/opening/{_ranks_digest(dist.group.WORLD)}/"
            opening = dist.PrefixStore(prefix, dist.distributed_c10d._get_default_store())
            while not opening.check(["hb/0"]):
                time.sleep(0.05)
            time.sleep(19.5)  # a slow rank (loading a model first): late, not gone
        result["open"] = _open_outcome(cfg)
        _report_once_rank_0_has(out, rank, result)
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def absent_after_failed_open_worker(
    rank: int, world: int, port: int, plain: str, out: Path
) -> None:
    """Every rank's first open fails (its shards missing: ShardMismatchError on every rank), then
    rank 1 never opens the store again: what rank 0's second open raises."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        missing = _store_config(Path(plain), world, "rows")
        missing["sharding"]["shards"] = str(out / "missing.{rank}-of-{ranks}.npy")
        result["first"] = _open_outcome(missing)
        cfg = _store_config(Path(plain), world, "rows")
        cfg["sharding"]["timeout_s"] = 4
        if rank == 0:
            result["open"] = _open_outcome(cfg)
        _report_once_rank_0_has(out, rank, result)
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def failed_heartbeat_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Every rank's open fails as its heartbeat starts (the group's store not answering its
    first beat), after the store made its collective thread: what the open raises,
    the process groups and the store's threads left behind; then an open that works."""
    import threading

    import torch.distributed as dist

    from tiered_store.distributed import sharded_store

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    real = sharded_store.Heartbeat

    class NotAnswering(real):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise dist.DistStoreError("Timeout waiting for the store (the test's)")

    try:
        cfg = _store_config(Path(plain), world, "rows")
        cfg["sharding"]["timeout_s"] = 5
        groups = len(dist.distributed_c10d._world.pg_map)
        sharded_store.Heartbeat = NotAnswering
        result["open"] = _open_outcome(cfg)
        sharded_store.Heartbeat = real
        result["groups left"] = len(dist.distributed_c10d._world.pg_map) - groups
        result["threads left"] = [
            t.name for t in threading.enumerate() if t.name.startswith("sharded-store-rank")
        ]
        with sharded_store.ShardedStore.open(cfg) as store:
            result["rows"] = store.lookup(torch.tensor([0, 462])).float()[:, 0].tolist()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def open_error_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Every rank opens the row shards of ``plain``: what the open raises ("ok" if it opens)."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        cfg = _store_config(Path(plain), world, "rows")
        cfg["sharding"]["timeout_s"] = 5
        result["open"] = _open_outcome(cfg)
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def foreign_group_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Two ranks make a group of rank 0 alone; rank 1 opens a store on it (``new_group`` gave it
    ``GroupMember.NON_GROUP_MEMBER``), then on a list of ranks: what each open raises."""
    import torch.distributed as dist

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        alone = dist.new_group([0])
        if rank == 1:
            cfg = _store_config(Path(plain), 1, "rows")
            for name, group in (("not a member", alone), ("a list", [0, 1])):
                result[name] = _open_outcome(cfg, group)
        dist.barrier()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def _adam_over_row_shards(trainable: str, world: int) -> Any:
    """A ``TrainableTable`` (Adam, lr 0.05) over the row shards of ``trainable``, whose ranks wait
    5 s for one another (a rank left waiting fails the test in seconds)."""
    from tiered_store.delta.row_optimizers import make_row_optimizer
    from tiered_store.delta.trainable import TrainableTable
    from tiered_store.distributed import ShardedStore

    cfg = _store_config(Path(trainable), world, "rows")
    cfg["sharding"]["timeout_s"] = 5
    return TrainableTable(ShardedStore.open(cfg), make_row_optimizer("adam", lr=0.05))


def training_misuse_worker(rank: int, world: int, port: int, trainable: str, out: Path) -> None:
    """Every rank: a training step rank 1 refuses (it repeats the last step), then steps the
    ranks disagree on; after each, the step every rank agrees on applies the gradients kept."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        table = _adam_over_row_shards(trainable, world)
        ids = torch.tensor([1, TRAIN_ROWS - 2])  # one row on each rank's shard
        for name, step, agreed in (("repeated", 1 if rank == 1 else 2, 2), ("differ", 3 + rank, 5)):
            table.lookup(ids).sum().backward()
            if name == "repeated":
                result["first"] = table.step(1)
                table.lookup(ids).sum().backward()
            try:
                table.step(step)
            except Exception as exc:  # noqa: BLE001 (recorded for the test)
                result[name] = f"{type(exc).__name__}: {exc}"
            result[f"{name} retried"] = table.step(agreed)  # the gradients kept
        table.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def optimizer_step_mismatch_worker(
    rank: int, world: int, port: int, trainable: str, out: Path
) -> None:
    """Every rank: step(3) with an optimizer_step the ranks disagree on (rank 1's a step behind),
    then the same step with one they agree on (the gradients kept apply), each outcome recorded,
    with the rows moved by the step every rank agreed on."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        table = _adam_over_row_shards(trainable, world)
        ids = torch.tensor([1, TRAIN_ROWS - 2])  # one row on each rank's shard
        before = table.lookup(ids).detach().clone()
        table.lookup(ids).sum().backward()
        try:
            table.step(3, optimizer_step=2 - rank)
        except Exception as exc:  # noqa: BLE001 (recorded for the test)
            result["differ"] = f"{type(exc).__name__}: {exc}"
        result["unchanged"] = bool(torch.equal(table.lookup(ids), before))
        result["retried"] = table.step(3, optimizer_step=1)  # the gradients kept
        result["moved"] = (table.lookup(ids) - before).tolist()
        table.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def decided_commit_worker(rank: int, world: int, port: int, trainable: str, out: Path) -> None:
    """Every rank: step(1), then commit(3) whose second phase fails on rank 1's shard (the step
    decided all the same), then step(2), step(4) and commit(), each outcome recorded."""
    from tiered_store.errors import CommitError

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        table = _adam_over_row_shards(trainable, world)
        ids = torch.tensor([1, TRAIN_ROWS - 2])  # one row on each rank's shard
        table.lookup(ids).sum().backward()
        table.step(1)
        if rank == 1:  # its shard fails to finish what it staged, once, as a full disk would
            shard = table.store.local
            real = shard.finish_commit

            def failing(*args: Any, **kwargs: Any) -> None:
                shard.finish_commit = real
                raise CommitError("finish_commit: no space left on device (the test's)")

            shard.finish_commit = failing
        for name, call in (
            ("commit", lambda: table.commit(3)),
            ("step 2", lambda: table.step(2)),
            ("step 4", lambda: table.step(4)),
            ("commit again", table.commit),
        ):
            if name.startswith("step"):
                table.lookup(ids).sum().backward()
            try:
                result[name] = call()
            except Exception as exc:  # noqa: BLE001 (recorded for the test)
                result[name] = f"{type(exc).__name__}: {exc}"
            result[f"{name} committed_step"] = table.store.committed_step
        table.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def failed_update_write_worker(rank: int, world: int, port: int, trainable: str, out: Path) -> None:
    """Every rank: training steps whose shard writes fail (the test's OSError, raised before the
    write or after it applied): on both shards (step 1, then again), on rank 1's after its write
    applied (step 2), on rank 1's before (step 3, the shards a step apart); after each, what a
    lookup and a commit do; then the store reopened."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        table = _adam_over_row_shards(trainable, world)
        ids = torch.tensor([1, TRAIN_ROWS - 2])  # one row on each rank's shard
        shard = table.store.local
        real = shard.write

        def failing(applied: bool) -> Any:
            def write(*args: Any, **kwargs: Any) -> None:
                shard.write = real
                if applied:
                    real(*args, **kwargs)
                raise OSError(28, "no space left on device (the test's)")

            return write

        for name, fails, applied in (
            ("both", True, False),
            ("retried", False, False),
            ("applied", rank == 1, True),
            ("lost", rank == 1, False),
        ):
            if name != "retried":  # a retry goes on with the gradients kept
                table.lookup(ids).sum().backward()
            if fails:
                shard.write = failing(applied)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result[name] = table.step(table.last_step + 1)
                result[f"{name} warned"] = [str(w.message) for w in caught]
            except Exception as exc:  # noqa: BLE001 (recorded for the test)
                result[name] = f"{type(exc).__name__}: {exc}"
            try:
                with torch.no_grad():
                    result[f"{name} lookup"] = table.lookup(ids).tolist()
                result[f"{name} commit"] = table.commit()
            except Exception as exc:  # noqa: BLE001 (recorded for the test)
                result[f"{name} lookup"] = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(Exception):
                    table.commit()
                    result[f"{name} commit"] = "committed"
        table.close()
        reopened = _adam_over_row_shards(trainable, world)
        with torch.no_grad():
            result["reopened"] = reopened.lookup(ids).tolist()
        result["reopened step"] = reopened.store.committed_step
        reopened.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def unknown_update_write_worker(
    rank: int, world: int, port: int, trainable: str, out: Path
) -> None:
    """Every rank: a training step whose shard write fails (the test's OSError) and whose lookup
    of its rows after it fails too (the test's OSError): what the step and a lookup after it
    raised."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        table = _adam_over_row_shards(trainable, world)
        ids = torch.tensor([1, TRAIN_ROWS - 2])  # one row on each rank's shard
        shard = table.store.local
        real_write, real_lookup = shard.write, shard.lookup

        def lookup(*args: Any, **kwargs: Any) -> None:
            shard.lookup = real_lookup
            raise OSError(5, "read failed (the test's)")

        def write(*args: Any, **kwargs: Any) -> None:
            shard.write, shard.lookup = real_write, lookup
            raise OSError(28, "no space left on device (the test's)")

        table.lookup(ids).sum().backward()
        shard.write = write
        try:
            result["step"] = table.step(1)
        except Exception as exc:  # noqa: BLE001 (recorded for the test)
            result["step"] = f"{type(exc).__name__}: {exc}"
        try:
            with torch.no_grad():
                result["lookup"] = table.lookup(ids).tolist()
        except Exception as exc:  # noqa: BLE001 (recorded for the test)
            result["lookup"] = f"{type(exc).__name__}: {exc}"
        table.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def interrupted_update_worker(rank: int, world: int, port: int, trainable: str, out: Path) -> None:
    """Every rank: a training step whose write goes through on rank 0's shard and fails on rank
    1's (the test's OSError), rank 0 interrupted (Ctrl-C) while it waits for the round; once
    the round is over, what the step and a lookup did on each rank."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        table = _adam_over_row_shards(trainable, world)
        ids = torch.tensor([1, TRAIN_ROWS - 2])  # one row on each rank's shard
        shard = table.store.local
        real = shard.write

        def write(*args: Any, **kwargs: Any) -> None:
            shard.write = real
            if rank == 1:
                raise OSError(28, "no space left on device (the test's)")
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # a Ctrl-C
            real(*args, **kwargs)

        shard.write = write
        table.lookup(ids).sum().backward()
        try:
            result["step"] = table.step(1)
        except BaseException as exc:  # noqa: BLE001 (recorded for the test: KeyboardInterrupt)
            result["step"] = f"{type(exc).__name__}: {exc}"
        table.store._thread.submit(lambda: None).result(timeout=30)  # the round is over
        try:
            with torch.no_grad():
                result["lookup"] = table.lookup(ids).tolist()
        except Exception as exc:  # noqa: BLE001 (recorded for the test)
            result["lookup"] = f"{type(exc).__name__}: {exc}"
        table.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def interrupted_update_then_lookup_worker(
    rank: int, world: int, port: int, trainable: str, out: Path
) -> None:
    """Every rank: a training step whose write goes through on rank 0's shard and fails on rank
    1's (the test's OSError), rank 0 interrupted (Ctrl-C) while it waits for the round and
    calling a lookup at once, queued before the round ends (its write waits for that): what
    the step and the lookup did on each rank."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        table = _adam_over_row_shards(trainable, world)
        ids = torch.tensor([1, TRAIN_ROWS - 2])  # one row on each rank's shard
        shard = table.store.local
        real = shard.write
        queue = table.store._thread._queue

        def write(*args: Any, **kwargs: Any) -> None:
            shard.write = real
            if rank == 1:
                raise OSError(28, "no space left on device (the test's)")
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # a Ctrl-C
            deadline = time.monotonic() + 30
            while queue.empty() and time.monotonic() < deadline:  # the lookup is queued
                time.sleep(0.01)
            real(*args, **kwargs)

        shard.write = write
        table.lookup(ids).sum().backward()
        try:
            result["step"] = table.step(1)
        except BaseException as exc:  # noqa: BLE001 (recorded for the test: KeyboardInterrupt)
            result["step"] = f"{type(exc).__name__}: {exc}"
        try:
            with torch.no_grad():
                result["lookup"] = table.lookup(ids).tolist()
        except Exception as exc:  # noqa: BLE001 (recorded for the test)
            result["lookup"] = f"{type(exc).__name__}: {exc}"
        table.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def unchanged_shard_update_worker(
    rank: int, world: int, port: int, trainable: str, out: Path
) -> None:
    """Every rank: training steps in which the row on rank 0's shard gets a zero gradient (fresh
    Adam state: the step leaves it as it was) and rank 1's shard write fails before it applies
    (the test's OSError): rank 0's write going through (step 1), then failing too (step 1
    again); then the step with no failure; then step 2, rank 0's write failing, rank 1's going
    through (and its warnings); after each, what a lookup does."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        table = _adam_over_row_shards(trainable, world)
        ids = torch.tensor([1, TRAIN_ROWS - 2])  # one row on each rank's shard
        unchanged = torch.tensor([[0.0], [1.0]])  # no gradient for rank 0's row
        shard = table.store.local
        real = shard.write

        def failing(*args: Any, **kwargs: Any) -> None:
            shard.write = real
            raise OSError(28, "no space left on device (the test's)")

        table.lookup(ids).mul(unchanged).sum().backward()
        for name, fails in (("rank 1 failed", rank == 1), ("both failed", True), ("none", False)):
            if fails:
                shard.write = failing
            try:
                result[name] = table.step(1)
            except Exception as exc:  # noqa: BLE001 (recorded for the test)
                result[name] = f"{type(exc).__name__}: {exc}"
            try:
                with torch.no_grad():
                    result[f"{name} lookup"] = table.lookup(ids).tolist()
            except Exception as exc:  # noqa: BLE001 (recorded for the test)
                result[f"{name} lookup"] = f"{type(exc).__name__}: {exc}"
        table.lookup(ids).mul(unchanged).sum().backward()
        if rank == 0:  # its row the step leaves as it was; rank 1's is written
            shard.write = failing
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result["rank 0 failed"] = table.step(2)
        result["rank 0 failed warned"] = [str(w.message) for w in caught]
        with torch.no_grad():
            result["rank 0 failed lookup"] = table.lookup(ids).tolist()
        table.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def nonfinite_gradient_worker(
    rank: int, world: int, port: int, trainable: str, out: Path, bad: float = float("nan")
) -> None:
    """Every rank: a training step in which rank 0's gradient of rank 1's row is ``bad`` (NaN, or
    finite but too large for Adam's state), then the same step again once rank 0 dropped its
    gradients."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        table = _adam_over_row_shards(trainable, world)
        ids = torch.tensor([1, TRAIN_ROWS - 2])  # one row on each rank's shard
        with torch.no_grad():
            before = table.lookup(ids)
        grads = torch.ones(2, TRAIN_DIM)
        if rank == 0:
            grads[1, 0] = bad
        (table.lookup(ids) * grads).sum().backward()
        try:
            table.step(1)
        except Exception as exc:  # noqa: BLE001 (recorded for the test)
            result["nan"] = f"{type(exc).__name__}: {exc}"
        with torch.no_grad():
            result["unchanged"] = torch.equal(table.lookup(ids), before)
        if rank == 0:
            table.zero_grad()
        result["retried"] = table.step(1)  # rank 1's gradients kept
        table.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def stored_nan_step_worker(  # noqa: PLR0913 (the test's choices)
    rank: int,
    world: int,
    port: int,
    trainable: str,
    out: Path,
    squared: bool = False,
    scaled: bool = False,
    skipping: tuple[int, ...] = (),
) -> None:
    """Every rank: a training step over one row of each shard, whose row on rank 1's shard holds
    a NaN as stored (the test put it there), the gradients finite (of a sum) or, ``squared``,
    each one NaN (of the sum squared, as a model's loss makes them), ``scaled`` by a GradScaler
    (its step taken for an overflow), the ranks in ``skipping`` skipping it (``skip``, as for
    an overflow of dense gradients); the error, the rows and the table's steps after."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        table = _adam_over_row_shards(trainable, world)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
        ids = torch.tensor([1, TRAIN_ROWS - 2])  # one row on each rank's shard
        with torch.no_grad():
            before = table.lookup(ids)
        loss = table.lookup(ids).sum() ** (2 if squared else 1)
        (loss if scaler is None else scaler.scale(loss)).backward()
        try:
            if rank in skipping:
                result["updated"] = table.skip(2)
            else:
                result["updated"] = table.step(2, scaler)  # the shards' commit is step 1
        except Exception as exc:  # noqa: BLE001 (recorded for the test)
            result["nan"] = f"{type(exc).__name__}: {exc}"
        with torch.no_grad():
            result["unchanged"] = torch.equal(table.lookup(ids).nan_to_num(), before.nan_to_num())
        result["steps"] = (table.skipped_steps, table.last_step)
        table.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def overflowed_step_worker(rank: int, world: int, port: int, trainable: str, out: Path) -> None:
    """Every rank: a step under a GradScaler whose gradients overflowed on rank 0 only, then one
    finite on both; rows, steps and scales after each."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        table = _adam_over_row_shards(trainable, world)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        ids = torch.tensor([1, TRAIN_ROWS - 2])  # one row on each rank's shard
        with torch.no_grad():
            before = table.lookup(ids)
        loss = table.lookup(ids).sum()
        scaler.scale(loss * (float("inf") if rank == 0 else 1.0)).backward()
        result["skipped"] = table.step(table.last_step + 1, scaler)
        with torch.no_grad():
            result["unchanged"] = torch.equal(table.lookup(ids), before)
        result["after skip"] = (table.skipped_steps, table.last_step)
        scaler.update()
        result["scale after skip"] = scaler.get_scale()
        scaler.scale(table.lookup(ids).sum()).backward()
        result["applied"] = table.step(table.last_step + 1, scaler)
        scaler.update()
        with torch.no_grad():
            result["moved"] = (table.lookup(ids) - before).tolist()
        result["after step"] = (table.skipped_steps, table.last_step, scaler.get_scale())
        table.commit()
        table.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def skipping_rank_worker(rank: int, world: int, port: int, trainable: str, out: Path) -> None:
    """Every rank: step 1, which rank 0 skips (``skip``, as for its dense gradients' overflow)
    while rank 1 steps; then step 1 on both. Returns, rows and steps after each."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        table = _adam_over_row_shards(trainable, world)
        ids = torch.tensor([1, TRAIN_ROWS - 2])  # one row on each rank's shard
        with torch.no_grad():
            before = table.lookup(ids)
        table.lookup(ids).sum().backward()
        result["first"] = table.skip(1) if rank == 0 else table.step(1)
        with torch.no_grad():
            result["unchanged"] = torch.equal(table.lookup(ids), before)
        result["after skip"] = (table.skipped_steps, table.last_step)
        table.lookup(ids).sum().backward()
        result["applied"] = table.step(1)
        result["after step"] = (table.skipped_steps, table.last_step)
        table.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def abandoned_overflowed_step_worker(
    rank: int, world: int, port: int, trainable: str, out: Path
) -> None:
    """Every rank: a dense SGD and the table under one GradScaler; rank 0's row gradients
    overflowed while rank 1 refuses its step number, and both abandon the iteration (update());
    then a finite step on both. Scales after each."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        table = _adam_over_row_shards(trainable, world)
        weight = torch.nn.Parameter(torch.ones(1))
        dense = torch.optim.SGD([weight], lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        ids = torch.tensor([1, TRAIN_ROWS - 2])  # one row on each rank's shard
        rows = table.lookup(ids).sum() * (float("inf") if rank == 0 else 1.0)
        scaler.scale(rows + weight.sum()).backward()  # the dense gradient finite on both
        scaler.step(dense)
        try:
            table.step(1 if rank == 0 else 0, scaler)
        except Exception as exc:  # noqa: BLE001 (recorded for the test)
            result["refused"] = type(exc).__name__
        scaler.update()
        result["scale after abandoning"] = scaler.get_scale()
        table.zero_grad()
        dense.zero_grad()
        scaler.scale(table.lookup(ids).sum() + weight.sum()).backward()
        scaler.step(dense)
        result["applied"] = table.step(1, scaler)
        scaler.update()
        result["scale after step"] = scaler.get_scale()
        table.commit()
        table.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def unreadable_shard_step_worker(
    rank: int, world: int, port: int, trainable: str, out: Path
) -> None:
    """Every rank: a training step whose rows rank 1's shard cannot read (its file cut short:
    no shard writes), then the same step again once the file is whole."""
    import torch.distributed as dist

    from tiered_store.delta.row_optimizers import make_row_optimizer
    from tiered_store.delta.trainable import TrainableTable
    from tiered_store.distributed import ShardedStore
    from tiered_store.errors import TierIOError

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    cfg = _store_config(Path(trainable), world, "rows")
    cfg["sharding"]["timeout_s"] = 5  # a rank left waiting fails the test in seconds
    try:
        store = ShardedStore.open(cfg)
        table = TrainableTable(store, make_row_optimizer("adam", lr=0.05))
        ids = torch.tensor([1, TRAIN_ROWS - 2])  # one row on each rank's shard
        table.lookup(ids).sum().backward()
        with torch.no_grad():  # the tiers evict those rows: the step reads them from the shards
            for row in range(2, 42):
                table.lookup(torch.tensor([row, TRAIN_ROWS - 1 - row]))
        path = Path(store.local.cold.path)
        whole = path.read_bytes()
        if rank == 1:
            os.truncate(path, 128)
        dist.barrier()
        try:
            table.step(1)
        except Exception as exc:  # noqa: BLE001 (recorded for the test)
            result["failed"] = f"{type(exc).__name__}: {exc}"
            result["failed is TierIOError"] = isinstance(exc, TierIOError)
        dist.barrier()
        if rank == 1:
            path.write_bytes(whole)  # the same file (inode), whole again
        dist.barrier()
        result["retried"] = table.step(1)  # the gradients kept
        table.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def _opened_and_recorded(
    cfg: dict, result: dict, name: str, ids: torch.Tensor | None = None
) -> Any:
    """``ShardedStore.open(cfg)``, recording under ``name`` its warnings, committed step (and
    as ``stats()`` says it), this shard's staged step and the rows of ``ids`` (each row's first
    value; every row, whole, when None)."""
    import warnings

    from tiered_store.distributed import ShardedStore

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = ShardedStore.open(cfg)
    result[f"{name} warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    result[f"{name} step"] = store.committed_step
    result[f"{name} stats step"] = store.stats().get("writes", {}).get("committed_step")
    result[f"{name} staged"] = store.local.staged_step
    if ids is None:
        result[f"{name} rows"] = store.lookup(torch.arange(store.rows)).float().tolist()
    else:
        result[f"{name} rows"] = [float(v) for v in store.lookup(ids)[:, 0]]
    return store


def torn_commit_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Every rank, over shards committed at different steps (a torn commit): reopened, every
    rank warns and reports the oldest step, and the step redone on every rank commits, on the
    shard already at it too; reopened again, the table is whole."""

    from tiered_store.distributed import ShardedStore

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    cfg = _store_config(Path(plain), world, "rows")

    def reopened(name: str) -> ShardedStore:
        return _opened_and_recorded(cfg, result, name, torch.tensor([3, 460]))

    try:
        with reopened("torn") as store:
            mine = torch.tensor([3 if rank == 0 else 460])  # a row of this rank's shard
            store.write(mine, torch.full((1, store.row_width), 9.0))  # at the oldest step: refused
            try:
                store.commit(result["torn step"])
            except Exception as exc:  # noqa: BLE001
                result["older"] = type(exc).__name__
        with reopened("refused") as store:  # the oldest shard's step 1 kept its rows
            store.write(mine, torch.full((1, store.row_width), 3.0))  # the step redone
            result["redone"] = store.commit(result["torn step"] + 1)
            result["redone step"] = store.committed_step
        with reopened("after"):
            pass
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def interrupted_commit_over_torn_shards_worker(
    rank: int, world: int, port: int, plain: str, out: Path
) -> None:
    """Every rank, over shards committed at different steps (a torn commit): the step redone,
    rank 0 interrupted (Ctrl-C) as its shard commits it, after every shard staged it; once the
    round is over, what the commit did and the committed step on each rank."""
    from tiered_store.distributed import ShardedStore

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the torn commit's warning (tested elsewhere)
            store = ShardedStore.open(_store_config(Path(plain), world, "rows"))
        result["torn step"] = store.committed_step
        shard = store.local
        real = shard.finish_commit

        def finish_commit(*args: Any, **kwargs: Any) -> None:
            shard.finish_commit = real
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # a Ctrl-C
            real(*args, **kwargs)

        mine = torch.tensor([3 if rank == 0 else 460])  # a row of this rank's shard
        store.write(mine, torch.full((1, store.row_width), 3.0))  # the step redone
        if rank == 0:
            shard.finish_commit = finish_commit
        try:
            result["commit"] = store.commit(result["torn step"] + 1)
        except BaseException as exc:  # noqa: BLE001 (recorded for the test: KeyboardInterrupt)
            result["commit"] = f"{type(exc).__name__}: {exc}"
        store._thread.submit(lambda: None).result(timeout=30)  # the round is over
        result["step"] = store.committed_step
        store.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def killed_in_commit_worker(
    rank: int, world: int, port: int, plain: str, out: Path, phase: str
) -> None:
    """On a group of the caller's (its store's timeout 6 s): one commit, then rank 0 is killed
    (SIGKILL) inside the next, after the step was agreed, as its shard enters ``phase``
    (``prepare_commit``: before it staged; ``finish_commit``: after every shard staged, before
    it committed); the other ranks go on with that commit and must name rank 0 within
    ``sharding.timeout_s``."""
    from tiered_store.distributed import ShardedStore

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        cfg = _store_config(Path(plain), world, "rows")
        cfg["sharding"]["timeout_s"] = 6
        store = ShardedStore.open(cfg)
        ids = torch.tensor([3, 460])  # one row of each rank's shard
        for value in (1.0, 2.0):
            store.write(ids, torch.full((2, store.row_width), value))
            if value == 2.0 and rank == 0:
                setattr(store.local, phase, lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
            start = time.monotonic()
            try:
                result[f"step {value:g}"] = store.commit()
            except Exception as exc:  # noqa: BLE001 (recorded for the test)
                result["error"] = f"{type(exc).__name__}: {exc}"
            result["seconds"] = time.monotonic() - start
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)
    os._exit(0)  # the group is broken: no teardown


def killed_redo_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Every rank, over shards a torn commit left at steps 1 and 2: the step redone (row 3 or 460
    at 3.0), every rank killed (SIGKILL) as its shard enters ``finish_commit``, once every shard
    staged it."""
    from tiered_store.distributed import ShardedStore

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the torn commit's warning (tested elsewhere)
            store = ShardedStore.open(_store_config(Path(plain), world, "rows"))
        mine = torch.tensor([3 if rank == 0 else 460])  # a row of this rank's shard
        store.write(mine, torch.full((1, store.row_width), 3.0))  # the step redone
        store.local.finish_commit = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        result["commit"] = store.commit(store.committed_step + 1)
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)
    os._exit(0)


def torn_two_steps_worker(
    rank: int, world: int, port: int, plain: str, out: Path, pass_step: bool = True
) -> None:
    """Every rank, over shards a torn commit left at steps 1 and 3: steps 2 and 3 redone (row 3
    or 460 at 2.0, then 3.0; ``pass_step``: committed with that step, else with none), each
    commit's step or error and the committed step after it recorded; reopened after."""
    from tiered_store.distributed import ShardedStore

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    cfg = _store_config(Path(plain), world, "rows")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the torn commit's warning (tested elsewhere)
            store = ShardedStore.open(cfg)
        mine = torch.tensor([3 if rank == 0 else 460])  # a row of this rank's shard
        for step in (2, 3):
            store.write(mine, torch.full((1, store.row_width), float(step)))
            try:
                result[f"redo {step}"] = store.commit(step if pass_step else None)
            except Exception as exc:  # noqa: BLE001 (recorded for the test)
                result[f"redo {step}"] = f"{type(exc).__name__}: {exc}"
            result[f"step after {step}"] = store.committed_step
        store.close()
        _opened_and_recorded(cfg, result, "after", torch.tensor([3, 460])).close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def killed_in_two_redos_worker(
    rank: int,
    world: int,
    port: int,
    plain: str,
    out: Path,
    kill_step: int,
    phase: str,
    killed: tuple[int, ...],
) -> None:
    """Every rank (its store's timeout 6 s), over shards a torn commit left at steps 1 and 3:
    steps 2 and 3 redone (row 3 or 460 at 2.0, then 3.0), the ranks ``killed`` killed
    (SIGKILL) in the redo of ``kill_step`` as their shard enters ``phase``."""
    from tiered_store.distributed import ShardedStore

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    cfg = _store_config(Path(plain), world, "rows")
    cfg["sharding"]["timeout_s"] = 6
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the torn commit's warning (tested elsewhere)
            store = ShardedStore.open(cfg)
        mine = torch.tensor([3 if rank == 0 else 460])  # a row of this rank's shard
        for step in (2, 3):
            store.write(mine, torch.full((1, store.row_width), float(step)))
            if step == kill_step and rank in killed:
                setattr(store.local, phase, lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
            result[f"redo {step}"] = store.commit(step)
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)
    os._exit(0)  # the group may be broken: no teardown


def resumed_redos_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Every rank, over shards ``killed_in_two_redos_worker`` left: reopened (warnings, step,
    rows 3 and 460), the steps after the committed one redone up to 3, reopened again."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    cfg = _store_config(Path(plain), world, "rows")
    try:
        store = _opened_and_recorded(cfg, result, "reopened", torch.tensor([3, 460]))
        mine = torch.tensor([3 if rank == 0 else 460])
        for step in range(store.committed_step + 1, 4):
            store.write(mine, torch.full((1, store.row_width), float(step)))
            result[f"redo {step}"] = store.commit(step)
        store.close()
        _opened_and_recorded(cfg, result, "after", torch.tensor([3, 460])).close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def step_read_failing_worker(
    rank: int, world: int, port: int, plain: str, out: Path, always: bool
) -> None:
    """Every rank (its store's timeout 5 s) commits rows 3 and 460 at 2.0, rank 1's shard
    failing to read its committed step while a step is staged (a read error between the
    phases), or at every read (``always``: then the commit is tried again once reads work);
    each rank's commit and committed step, then reopened: its step and rows."""
    from tiered_store.distributed import ShardedStore
    from tiered_store.errors import TierIOError

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    cfg = _store_config(Path(plain), world, "rows")
    cfg["sharding"]["timeout_s"] = 5
    try:
        store = ShardedStore.open(cfg)
        shard, plain_class = store.local, type(store.local)

        class StepReadFails(plain_class):
            @property
            def committed_step(self) -> int:
                if always or self.staged_step is not None:
                    raise TierIOError(f"delta: reading the step of {self.cold.path} failed")
                return super().committed_step

        if rank == 1:
            shard.__class__ = StepReadFails
        store.write(torch.tensor([3, 460]), torch.full((2, store.row_width), 2.0))
        try:
            result["commit"] = store.commit()
        except Exception as exc:  # noqa: BLE001 (recorded for the test)
            result["commit"] = f"{type(exc).__name__}: {exc}"
        shard.__class__ = plain_class
        if always:
            result["retried"] = store.commit()
        result["step"] = store.committed_step
        store.close()
        _opened_and_recorded(cfg, result, "reopened", torch.tensor([3, 460])).close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def resumed_commit_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Every rank, over shards a killed sharded commit of rows 3 and 460 (2.0, step 2) left
    behind: reopened (warnings, step, every row, this shard's staged step), the step redone
    where the shards are at step 1, and reopened again."""

    from tiered_store.distributed import ShardedStore

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    cfg = _store_config(Path(plain), world, "rows")

    def reopened(name: str) -> ShardedStore:
        return _opened_and_recorded(cfg, result, name)

    try:
        with reopened("reopened") as store:
            if result["reopened step"] == 1:  # the step redone, with the killed step's writes
                store.write(torch.tensor([3, 460]), torch.full((2, store.row_width), 2.0))
                result["redone"] = store.commit()
        with reopened("after"):
            pass
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def step_unreadable_once_resolved_worker(
    rank: int, world: int, port: int, plain: str, out: Path
) -> None:
    """Every rank (its store's timeout 5 s) opens shards holding step 2 staged, rank 1's shard
    failing to read its committed step once nothing is staged (read again after the open
    committed it): the open's error; then reopened with reads working (step, rows 3 and 460)."""
    from tiered_store import TieredStore
    from tiered_store.distributed import ShardedStore
    from tiered_store.errors import TierIOError

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    cfg = _store_config(Path(plain), world, "rows")
    cfg["sharding"]["timeout_s"] = 5
    try:
        readable = TieredStore.committed_step

        def unreadable(self: TieredStore) -> int:
            if self.staged_step is None:
                raise TierIOError(f"delta: reading the step of {self.cold.path} failed")
            return readable.fget(self)

        if rank == 1:
            TieredStore.committed_step = property(unreadable)
        try:
            ShardedStore.open(cfg).close()
            result["open"] = "opened"
        except Exception as exc:  # noqa: BLE001 (recorded for the test)
            result["open"] = f"{type(exc).__name__}: {exc}"
        TieredStore.committed_step = readable
        _opened_and_recorded(cfg, result, "reopened", torch.tensor([3, 460])).close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def locked_staged_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Every rank, over shards with step 2 staged on each and rank 0's writer lock held by
    another process: opened (warnings, step, this shard's staged step, rows 3 and 460), then a
    commit of nothing tried."""
    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        cfg = _store_config(Path(plain), world, "rows")
        store = _opened_and_recorded(cfg, result, "opened", torch.tensor([3, 460]))
        try:  # nothing written (a write takes the writer lock held elsewhere: refused as ever)
            store.commit()
        except Exception as exc:  # noqa: BLE001 (recorded for the test)
            result["commit"] = f"{type(exc).__name__}: {exc}"
        result["staged after"] = store.local.staged_step
        store.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def briefly_locked_staged_worker(
    rank: int, world: int, port: int, plain: str, out: Path, tried: str, before: bool
) -> None:
    """As ``locked_staged_worker``, but another process lets go of rank 0's writer lock once
    rank 0 found it taken (the hook touches ``tried`` at its first refused ``flock``; with
    ``before``, as it first tries, and waits for ``tried.go`` before it does): opened (warnings,
    step, staged step, rows 3 and 460), then rows 3 and 460 written 3.0 and committed (or the
    error)."""
    from tiered_store import process_locks

    _join_group(rank, world, port)
    result: dict[str, Any] = {}

    class _Flock:  # process_locks' fcntl (the writer lock's), telling the test when it was tried
        def __getattr__(self, name: str) -> Any:
            return getattr(fcntl, name)

        @staticmethod
        def flock(fd: int, how: int) -> None:
            if before and how & fcntl.LOCK_NB and not Path(tried).exists():  # a writer lock
                Path(tried).touch()
                end = time.monotonic() + 60
                while not Path(f"{tried}.go").exists() and time.monotonic() < end:
                    time.sleep(0.01)
            try:
                fcntl.flock(fd, how)
            except BlockingIOError:
                Path(tried).touch()
                raise

    try:
        if rank == 0:
            process_locks.fcntl = _Flock()
        cfg = _store_config(Path(plain), world, "rows")
        ids = torch.tensor([3, 460])
        with _opened_and_recorded(cfg, result, "opened", ids) as store:
            try:  # a write takes the lock the holder let go of
                store.write(ids[rank : rank + 1], torch.full((1, store.row_width), 3.0))
                result["committed"] = store.commit()
            except Exception as exc:  # noqa: BLE001 (recorded for the test)
                result["commit"] = f"{type(exc).__name__}: {exc}"
            result["committed rows"] = [float(v) for v in store.lookup(ids)[:, 0]]
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def failed_phase_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Every rank, rows 3 and 460 (one per shard) written v and committed for v = 1, 2, ...:
    rank 1's shard fails to stage step 2 (once, and rank 0's to drop what it staged then), then
    to commit what it staged at steps 3, 5 and 6 (6: at close too, whose warnings are kept);
    after each, what every rank sees, the commit or open that follows."""
    import warnings

    from tiered_store.distributed import ShardedStore
    from tiered_store.errors import CommitError

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    cfg = _store_config(Path(plain), world, "rows")
    ids = torch.tensor([3, 460])
    mine = ids[rank : rank + 1]  # this rank's shard's row

    def fail_once(name: str, times: int = 1, on: int = 1, delta: bool = False) -> None:
        """Rank ``on``'s shard (its delta: ``delta``): the next ``times`` calls of ``name``
        raise, as a full disk's would."""
        if rank != on:
            return
        owner = store.local._writes.delta if delta else store.local
        real, left = getattr(owner, name), [times]

        def failing(*args: Any, **kwargs: Any) -> None:
            left[0] -= 1
            if not left[0]:
                setattr(owner, name, real)
            raise CommitError(f"{name}: no space left on device (the test's)")

        setattr(owner, name, failing)

    def commit(name: str, value: float) -> None:
        store.write(ids, torch.full((2, store.row_width), value))
        try:
            result[name] = store.commit()
        except CommitError as exc:
            result[name] = f"CommitError: {exc}"
        result[f"{name} step"] = store.committed_step
        result[f"{name} stats step"] = store.stats()["writes"]["committed_step"]
        result[f"{name} staged"] = store.local.staged_step
        step, rows = store.local.read_committed(mine - store.shard_map.shard_range(rank)[0])
        result[f"{name} committed here"] = [step, float(rows[0, 0])]
        result[f"{name} rows"] = [float(v) for v in store.lookup(ids)[:, 0]]

    try:
        store = ShardedStore.open(cfg)
        commit("first", 1.0)
        fail_once("prepare_commit")
        fail_once("drop_staged", on=0, delta=True)  # step 2 stays staged there
        commit("unstaged", 2.0)
        commit("after unstaged", 2.0)
        fail_once("finish_commit")
        commit("unfinished", 3.0)
        commit("after unfinished", 4.0)
        fail_once("finish_commit")
        commit("unfinished at close", 5.0)
        store.close()  # commits it
        store = ShardedStore.open(cfg)
        result["closed step"] = store.committed_step
        result["closed staged"] = store.local.staged_step
        fail_once("finish_commit", times=2)  # in the commit, and at close
        commit("unfinished again", 6.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # its writes, staged: the next open commits them
            store.close()
        result["closed again warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
        _opened_and_recorded(cfg, result, "reopened", ids).close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def compacted_shard_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Every rank, over shards of which one was compacted: open, read rows of both shards, write
    and commit one more step, reopen and read them again."""
    from tiered_store.distributed import ShardedStore

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    cfg = _store_config(Path(plain), world, "rows")
    ids = torch.tensor([3, 460])  # one row of each rank's shard
    try:
        with ShardedStore.open(cfg) as store:
            result["step"] = store.committed_step
            result["rows"] = [float(v) for v in store.lookup(ids)[:, 0]]
            store.write(ids[rank : rank + 1], torch.full((1, store.row_width), 4.0))
            result["committed"] = store.commit()
        with ShardedStore.open(cfg) as store:
            result["reopened step"] = store.committed_step
            result["reopened rows"] = [float(v) for v in store.lookup(ids)[:, 0]]
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def crossed_rounds_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Rank 0 looks up while rank 1 takes a training step: both name the other's kind of round.
    The group is broken after it: the process leaves without its teardown, once both reported."""
    from tiered_store.distributed import ShardedStore
    from tiered_store.errors import RankFailureError

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        config = _store_config(Path(plain), world, "rows")
        config["sharding"]["timeout_s"] = 4
        store = ShardedStore.open(config)
        ids = torch.tensor([3, 461])
        store.lookup(ids)  # in step
        try:
            if rank == 0:
                store.lookup(ids)
            else:
                store.update_rows(ids, torch.ones(2, 2), lambda rows, grads: rows)
        except RankFailureError as exc:
            result["error"] = str(exc)
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)
    deadline = time.monotonic() + 60  # rank 0 hosts the group's store: the other's diagnosis
    while not (out / f"rank{1 - rank}.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # reads it, so neither leaves before both have reported
    os._exit(0)


def failed_round_counts_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Two lookups; rank 1's shard file shrinks before the second, which fails on every rank;
    each rank reports its exchange counters and the rounds its heartbeat entered."""
    from tiered_store.distributed import ShardedStore

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        store = ShardedStore.open(_store_config(Path(plain), world, "rows"))
        store.lookup(torch.tensor([0, 1, 300, 301]))
        if rank == 1:  # its next cold read fails
            os.truncate(store.path, 4096)
        try:
            store.lookup(torch.tensor([2, 3, 302, 303]))  # rows no tier holds yet
        except Exception as exc:  # noqa: BLE001 (recorded for the test)
            result["error"] = type(exc).__name__
        result["exchange"] = store.stats()["exchange"]
        result["entered"] = store._heartbeat.entered
        store.close()
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def lookup_seconds_worker(rank: int, world: int, port: int, plain: str, out: Path) -> None:
    """Rank 1 joins the second of two lookups a second late; each rank reports its stats()'s
    lookup section and its lookups' own times."""
    from tiered_store.distributed import ShardedStore

    _join_group(rank, world, port)
    result: dict[str, Any] = {"seconds": []}
    try:
        with ShardedStore.open(_store_config(Path(plain), world, "rows")) as store:
            for late in (0.0, 1.0 if rank == 1 else 0.0):
                time.sleep(late)
                start = time.perf_counter()
                store.lookup(torch.tensor([0, 1, 300, 301]))
                result["seconds"].append(time.perf_counter() - start)
            result["lookup"] = store.stats()["lookup"]
        dist_destroy()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def subgroup_heartbeats_worker(rank: int, world: int, port: int, table: str, out: Path) -> None:
    """4 ranks. Ranks 2 and 3 open one store more (on their subgroup), then every rank opens
    one over all: rank 0 must hear every rank beat. Then a store on each of the subgroups
    [0, 1] and [2, 3] (ranks 0 and 1 having opened one more: each rank has opened as many);
    rank 1 dies and rank 0's lookup must name it stopped, while rank 3 beats on its own."""
    import torch.distributed as dist

    from tiered_store.distributed import ShardedStore
    from tiered_store.errors import RankFailureError

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        timeout = timedelta(seconds=3)
        pair = [dist.new_group(ranks, timeout=timeout) for ranks in ([0, 1], [2, 3])][rank // 2]
        ids = torch.arange(0, 463, 7)
        cfg = _store_config(Path(table), 2, "rows")
        cfg["sharding"]["timeout_s"] = 3
        if rank >= 2:  # 2 and 3 open one store more than 0 and 1
            ShardedStore.open(cfg, pair).close()
        whole = _store_config(Path(table), world, "rows")
        whole["sharding"]["timeout_s"] = 3
        with ShardedStore.open(whole) as store:
            store.lookup(ids)
            if rank == 0:
                store.stopped_ranks()
                time.sleep(4 * store.heartbeat_s)
                result["stopped"] = store.stopped_ranks()
            store.lookup(ids)  # every rank still beats while rank 0 reads
        if rank < 2:  # now every rank has opened as many stores
            ShardedStore.open(cfg, pair).close()
        store = ShardedStore.open(cfg, pair)
        store.lookup(ids)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 0:
            try:
                store.lookup(ids)
            except RankFailureError as exc:
                result["error"] = str(exc)
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)
    deadline = time.monotonic() + 30  # rank 0 hosts the key-value store; 2 and 3 beat until
    waits_for = [2, 3] if rank == 0 else [0]  # rank 0 has reported
    while not all((out / f"rank{r}.json").exists() for r in waits_for):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    os._exit(0)


def dist_destroy() -> None:
    """Destroy the group ``_join_group`` made."""
    import torch.distributed as dist

    dist.destroy_process_group()


# what torch's connect to a store costs when the resolver loses the reverse-DNS query it makes for
# the peer's address (glibc's timeout), on either end of the connection
LOST_DNS_QUERY_S = 5.0


def slow_connect_reopen_worker(rank: int, world: int, port: int, table: str, out: Path) -> None:
    """Every rank: open a store, look up, close; then, with each new connection to the group's
    store waiting ``LOST_DNS_QUERY_S`` on rank 1, open one with a 6 s timeout and look up twice."""
    import torch.distributed as dist

    from tiered_store.distributed import ShardedStore

    _join_group(rank, world, port)
    result: dict[str, Any] = {}
    try:
        cfg = _store_config(Path(table), world, "rows")
        single = TieredStore.open({"table": cfg["table"]})
        ids = torch.arange(rank, single.rows, 7)
        with ShardedStore.open(cfg) as store:
            store.lookup(ids)
        if rank == 1:
            clone = dist.Store.clone

            def slow_clone(store: Any) -> Any:
                time.sleep(LOST_DNS_QUERY_S)
                return clone(store)

            dist.Store.clone = slow_clone
        cfg["sharding"]["timeout_s"] = 6
        with ShardedStore.open(cfg) as store:
            for _ in range(2):
                assert torch.equal(_bits(store.lookup(ids)), _bits(single.lookup(ids)))
        result["served"] = True
        single.close()
        dist.destroy_process_group()
    except BaseException:
        result["crash"] = traceback.format_exc()
    _report(out, rank, result)


def reopen_worker(rank: int, world: int, port: int, table: str, out: Path) -> None:
    """Every rank: open a store from torchrun's environment, look up, close; four times in a
    row. The group the first open made stays for the next (destroyed at close, a rank reopening
    at once joined the old rendezvous, still up on a rank not through its close)."""
    import torch.distributed as dist

    from tiered_store.distributed import ShardedStore

    _init(rank, world, port)
    cfg = _store_config(Path(table), world, "rows")
    single = TieredStore.open({"table": cfg["table"]})
    opened = []
    for round_ in range(4):
        with ShardedStore.open(cfg) as store:
            ids = torch.arange(round_, single.rows, 37)
            assert torch.equal(_bits(store.lookup(ids)), _bits(single.lookup(ids)))
        opened.append(dist.is_initialized())
    single.close()
    _report(out, rank, {"opened": opened})
