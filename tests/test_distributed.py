"""A table sharded over ranks: shard maps, shard files, and ShardedStore across real processes
(spawned, gloo over loopback) against one TieredStore over the whole table."""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import golden_dir, interrupted_once_waiting
from tests.distributed_support import (
    HEADS,
    KILL_TIMEOUT_S,
    exact_lookups_worker,
    free_port,
    head_metadata,
    killed_rank_worker,
    make_plain_table,
    make_v41_table,
    reopen_worker,
    run_ranks,
    shards_template,
    slow_connect_reopen_worker,
    store_host,
)
from tests.forkserver import PythonProcess
from tiered_store.cli import main as cli_main
from tiered_store.config import StoreConfig
from tiered_store.distributed import ShardedStore, plan_shards, read_shard, write_shards
from tiered_store.distributed.sharded_store import local_gpu
from tiered_store.engram.pipeline import table_stats_delta
from tiered_store.errors import (
    ConfigError,
    RowIdError,
    ShardMismatchError,
    StoreClosedError,
    TableFormatError,
    TierIOError,
)
from tiered_store.manifest_checksum import sealed
from tiered_store.metrics import METRICS, SERVER_METRICS, SHARDED_METRICS, build_sharded_registry
from tiered_store.page_checksums import ChecksumError
from tiered_store.prefetch import PrefetchHandleError
from tiered_store.store import TieredStore, UncommittedWritesWarning
from tiered_store.table_format import create_table, read_manifest


def _one_rank_group_env(monkeypatch) -> None:
    """torchrun's environment for a group of this process alone, on a free port."""
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def _one_rank_sharded_config(tmp_path, monkeypatch, **sharding: object) -> dict:
    """A store config over a one-shard cut of a plain table, in a group of this process alone
    (``sharding``: more of its settings, e.g. timeout_s)."""
    table = make_plain_table(tmp_path)
    template = shards_template(table, "rows")
    write_shards(table, 1, "rows", template=template, progress=False)
    _one_rank_group_env(monkeypatch)
    settings = {"ranks": 1, "by": "rows", "shards": template, **sharding}
    return {"table": {"path": str(table)}, "sharding": settings}


@pytest.fixture(autouse=True)
def _no_group_left_behind():
    """A group a store made from the environment (monkeypatched here) outlives the store, as
    it does a process's stores: gone after each test, as at a process's exit."""
    yield
    from tiered_store.distributed.sharded_store import _destroy_env_group

    _destroy_env_group()


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """The plain and V4.1 tables, another version of the plain one, and their files' paths."""
    d = tmp_path_factory.mktemp("dist")
    golden = json.loads((golden_dir("v41/golden_v41.json") / "v41" / "golden_v41.json").read_text())
    other = d / "other"
    other.mkdir()
    return {
        "plain": make_plain_table(d),
        "v41": make_v41_table(d, golden),
        "plain_other": make_plain_table(other, seed=1),
    }


def _shard_all(tables: dict, world: int) -> None:
    for path in tables.values():
        for by in ("heads", "rows"):
            write_shards(
                path, world, by, template=shards_template(path, by), progress=False, overwrite=True
            )


# -- shard maps and files (one process) --------------------------------------------------------------
def test_heads_mode_keeps_whole_heads_and_splits_heads_only_when_ranks_outnumber_them(tables):
    manifest = read_manifest(tables["plain"])
    offsets = set(head_metadata(HEADS)["engram"]["offsets"]) | {sum(HEADS)}
    for ranks in range(1, 8):  # 7 heads: cuts only at head boundaries, head counts within one
        bounds = plan_shards(manifest, ranks, "heads").bounds
        assert set(bounds) <= offsets
        heads_per_rank = [
            sum(a <= o < b for o in offsets) for a, b in zip(bounds, bounds[1:], strict=False)
        ]
        assert max(heads_per_rank) - min(heads_per_rank) <= 1
    bounds = plan_shards(manifest, 10, "heads").bounds  # 3 spare ranks split the 3 largest heads
    assert offsets <= set(bounds) and len(bounds) == 11
    split = sorted(o for o in bounds if o not in offsets)
    assert split == [sum(HEADS[:4]) + 71 // 2, sum(HEADS[:5]) + 73 // 2, sum(HEADS[:6]) + 79 // 2]
    assert plan_shards(manifest, 4, "rows").bounds == tuple(sum(HEADS) * r // 4 for r in range(5))


def test_shards_hold_their_rows_and_record_the_map_the_rank_and_the_version(tables, tmp_path):
    table = tables["v41"]
    shards = write_shards(table, 5, "heads", template=str(tmp_path / "s{rank}.npy"), progress=False)
    whole = np.load(table, mmap_mode="r")
    for shard in shards:
        info = read_shard(shard.path)
        start, stop = info.shard_map.shard_range(info.rank)
        assert info.manifest.quantization == read_manifest(table).quantization
        assert np.array_equal(np.load(shard.path), whole[start:stop])
        assert info.shard_map == shards[0].shard_map
    assert [s.rank for s in shards] == list(range(5))


def test_the_shard_command_cuts_by_rows_and_refuses_heads_without_a_head_layout(tmp_path, capsys):
    path = tmp_path / "t.npy"
    create_table(path, np.ones((30, 4), dtype=np.float32), progress=False)
    assert cli_main(["shard", str(path), "--ranks", "3", "--by", "rows", "--quiet"]) == 0
    assert "rank 2:" in capsys.readouterr().out
    assert read_shard(tmp_path / "t.shard-2-of-3.npy").manifest.rows == 10
    assert cli_main(["shard", str(path), "--ranks", "3", "--quiet"]) == 2
    err = capsys.readouterr().err  # named by the option, which the user left at its default
    assert "--by: 'heads' (the default) but" in err and "records no hash-head layout" in err
    with pytest.raises(TableFormatError, match="no shard metadata"):
        read_shard(path)


def test_the_shard_command_refuses_malformed_head_metadata_naming_the_table(tmp_path, capsys):
    for name, engram in (
        ("len", {"offsets": [0, 3, 7], "head_sizes": [3, 4]}),  # lengths differ
        ("type", {"offsets": [0, 3], "head_sizes": 10}),  # not a list
        ("text", {"offsets": [0, "three"], "head_sizes": [3, 7]}),
        ("digits", {"offsets": [0, "3"], "head_sizes": [3, 7]}),  # int() would take these
        ("float", {"offsets": [0, 3], "head_sizes": [3.9, 7.5]}),  # and truncate these
        ("inf", {"offsets": [0, 3], "head_sizes": [3, 7]}),  # made inf below
    ):
        path = tmp_path / f"{name}.npy"
        create_table(
            path, np.ones((10, 4), dtype=np.float32), progress=False, metadata={"engram": engram}
        )
        if name == "inf":  # create_table refuses inf now; an older or foreign manifest may hold it
            manifest = path.with_name(path.name + ".manifest.json")
            doc = json.loads(manifest.read_text())
            doc["metadata"]["engram"]["head_sizes"][1] = float("inf")  # int(): OverflowError
            manifest.write_text(json.dumps(sealed(doc)))
        assert cli_main(["shard", str(path), "--ranks", "2", "--by", "heads", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"{path}: metadata.engram offsets {engram['offsets']!r}" in err
        assert "expected two integer lists of one length" in err


def test_a_shard_map_of_bounds_that_are_not_integers_is_refused_naming_the_shard(tmp_path, capsys):
    path = tmp_path / "t.npy"
    create_table(path, np.ones((10, 4), dtype=np.float32), progress=False)
    shards = write_shards(path, 2, "rows", progress=False)
    manifest = shards[0].path.with_name(shards[0].path.name + ".manifest.json")
    good = json.loads(manifest.read_text())
    for bound in ("5", 5.5, 5.0, True, float("inf")):  # int() takes, truncates or overflows these
        doc = json.loads(json.dumps(good))
        doc["metadata"]["shard"]["bounds"][1] = bound
        manifest.write_text(json.dumps(sealed(doc)))
        with pytest.raises(TableFormatError, match="expected integer bounds") as caught:
            read_shard(shards[0].path)
        assert str(shards[0].path) in str(caught.value) and repr(bound) in str(caught.value)
        whole = str(tmp_path / "whole.npy")
        shard_files = [str(s.path) for s in shards]
        assert cli_main(["unshard", whole, *shard_files, "--quiet"]) == 2
        assert "expected integer bounds" in capsys.readouterr().err


def test_a_shard_map_routes_ids_of_any_integer_dtype():
    """ShardMap.owner made its bounds in the ids' dtype: int16 ids of a 80,000-row map, or int32
    ids of one past 2**31 rows, raised torch's "value cannot be converted to type int32 without
    overflow"."""
    from tiered_store.distributed import ShardMap

    small = ShardMap(by="rows", bounds=(0, 40_000, 80_000), table_version="v")
    large = ShardMap(by="rows", bounds=(0, 3_000_000_000, 6_000_000_000), table_version="v")
    for dtype in (torch.int16, torch.int32, torch.uint8, torch.int64):
        assert small.owner(torch.tensor([0, 3, 127], dtype=dtype)).tolist() == [0, 0, 0]
    assert small.owner(torch.tensor([39_999, 40_000], dtype=torch.int32)).tolist() == [0, 1]
    assert large.owner(torch.tensor([5, 2**31 - 1], dtype=torch.int32)).tolist() == [0, 0]
    assert large.owner(torch.tensor([2_999_999_999, 3_000_000_000])).tolist() == [0, 1]


def test_a_corrupt_table_is_not_sharded_into_shards_with_fresh_checksums(tmp_path, capsys):
    path = tmp_path / "t.npy"
    create_table(path, np.ones((3000, 4), dtype=np.float32), progress=False)
    with open(path, "r+b") as f:  # one flipped byte in rank 1's rows
        f.seek(4096 + 2000 * 16)
        f.write(b"\x7f")
    assert cli_main(["shard", str(path), "--ranks", "2", "--by", "rows", "--quiet"]) == 2
    assert "its page checksum" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "t.npy",
        "t.npy.manifest.json",
        "t.npy.pages.crc32c",
    ]  # fmt: skip  (rank 0's shard, written before, removed)


def test_shards_hold_the_written_rows_of_a_compacted_table_and_refuse_uncompacted_ones(
    tmp_path, capsys
):
    from tiered_store.delta.compaction import compact_table

    path = tmp_path / "t.npy"
    create_table(path, np.zeros((30, 4), dtype=np.float32), progress=False)
    with TieredStore.open({"table": {"path": str(path)}}) as store:
        store.write([25], torch.ones(1, 4))
        store.commit()
    with pytest.raises(TableFormatError, match=r"1 written row.* run `tiered-store compact "):
        write_shards(path, 2, "rows", progress=False)
    assert not (tmp_path / "t.shard-0-of-2.npy").exists()
    compact_table(path, progress=False)
    assert cli_main(["shard", str(path), "--ranks", "2", "--by", "rows", "--quiet"]) == 0
    assert f"rank 1: {tmp_path / 't.shard-1-of-2.npy'} rows [15, 30)" in capsys.readouterr().out
    assert np.load(tmp_path / "t.shard-1-of-2.npy")[10].tolist() == [1.0] * 4


def test_shards_of_a_table_whose_last_commit_wrote_no_rows_open_at_its_step(tmp_path):
    """A commit that writes no rows (after a compaction, or on a table never compacted) moves the
    table's step in its delta alone; its shards held the file's step (5, or none: 0), so a
    store on them, a ShardedStore or a resumed run went on from an older step than the
    table's."""
    from tiered_store.delta.compaction import compact_table

    compacted, fresh = tmp_path / "c.npy", tmp_path / "f.npy"
    for path in (compacted, fresh):
        create_table(path, np.zeros((30, 4), dtype=np.float32), progress=False)
    with TieredStore.open({"table": {"path": str(compacted)}}) as store:
        store.write([25], torch.ones(1, 4))
        assert store.commit(5) == 5
    compact_table(compacted, progress=False)
    for path in (compacted, fresh):
        with TieredStore.open({"table": {"path": str(path)}}) as store:
            assert store.commit(6) == 6  # no row written
        for shard in write_shards(path, 2, "rows", progress=False):
            assert read_shard(shard.path).manifest.metadata["committed_step"] == 6
            with TieredStore.open({"table": {"path": str(shard.path)}}) as store:
                assert store.committed_step == 6
    assert np.load(tmp_path / "c.shard-1-of-2.npy")[10].tolist() == [1.0] * 4


def test_shard_refuses_an_existing_shard_or_the_table_itself_before_writing_any(tmp_path, capsys):
    path = tmp_path / "t0.npy"
    create_table(path, np.ones((30, 4), dtype=np.float32), progress=False)
    (tmp_path / "s2.npy").write_bytes(b"keep")
    argv = ["shard", str(path), "--by", "rows", "--quiet", "--out"]
    assert cli_main([*argv, str(tmp_path / "s{rank}"), "--ranks", "3"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 's2.npy'} already exists; pass --overwrite" in err
    assert "overwrite=True" not in err
    assert not (tmp_path / "s0.npy").exists() and (tmp_path / "s2.npy").read_bytes() == b"keep"
    assert cli_main([*argv, str(tmp_path / "t{rank}.npy"), "--ranks", "1", "--overwrite"]) == 2
    assert f"rank 0's shard {path} is the table itself" in capsys.readouterr().err
    assert read_manifest(path).metadata == {}  # still the table, not a shard of it
    assert cli_main([*argv, str(tmp_path / "s{rank}"), "--ranks", "2"]) == 0  # .npy appended
    assert f"rank 1: {tmp_path / 's1.npy'} rows [15, 30)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"names one file for several ranks"):  # one file
        write_shards(path, 2, "rows", template=str(tmp_path / "one.npy"), progress=False)
    assert not (tmp_path / "one.npy").exists()  # (it held the last rank's shard alone)


def test_a_second_shard_run_of_the_same_shards_is_refused_and_the_first_finishes(tmp_path):
    """Two `tiered-store shard` runs at once: the second removed the hidden shards the first had
    written as a killed run's leftovers, published its own, and the first then failed on them.
    Runs over the same shard paths now take turns: the second is refused by name at once."""
    import re
    import signal
    import subprocess
    import sys

    from tiered_store.serve.client import subprocess_env

    path = tmp_path / "t.npy"
    rows = np.random.default_rng(0).standard_normal((200_000, 64), dtype=np.float32)
    create_table(path, rows, progress=False)
    argv = [sys.executable, "-m", "tiered_store.cli", "shard", str(path), "--ranks", "4"]
    argv += ["--by", "rows", "--quiet"]
    first = subprocess.Popen(argv, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    hidden = re.compile(r"\.{1,2}t\.shard-\d-of-4\.npy\.[0-9a-f]{12}\.new\.npy.*")
    try:
        deadline = time.monotonic() + 60
        while not any(hidden.fullmatch(p.name) for p in tmp_path.iterdir()):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.002)
        os.kill(first.pid, signal.SIGSTOP)  # midway through its shards
        second = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2
    assert "another shard run is writing these shards (t.shard-0-of-4.npy.shard-run.lock is " in (
        second.stderr
    )
    assert first.wait(120) == 0, first.stderr.read()
    for rank in range(4):
        shard = tmp_path / f"t.shard-{rank}-of-4.npy"
        np.testing.assert_array_equal(np.load(shard), rows[rank * 50_000 : (rank + 1) * 50_000])


def test_a_refused_shard_run_names_the_process_that_holds_its_lock(tmp_path):
    """A shard run refused while another held the shards' run lock said 'another shard run ...
    (it holds LOCK)', not which; it names the holder's process id and command, as a refused
    writer lock does, and writes nothing."""
    import subprocess
    import sys

    path = tmp_path / "t.npy"
    create_table(path, np.ones((8, 4), np.float32), progress=False)
    lock = tmp_path / "t.shard-0-of-2.npy.shard-run.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); print('holding', flush=True); sys.stdin.read()",
            str(lock),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = sorted(tmp_path.iterdir())
        with pytest.raises(TierIOError) as refused:
            write_shards(path, 2, "rows", progress=False)
        assert refused.value.errno == errno.EBUSY
        assert f"{lock.name} is held by process {holder.pid} (python" in str(refused.value)
        assert sorted(tmp_path.iterdir()) == before  # no shard written
    finally:
        holder.stdin.close()
        holder.wait()
    assert [s.manifest.rows for s in write_shards(path, 2, "rows", progress=False)] == [4, 4]


def test_shard_refuses_the_path_of_a_compacted_table_itself(tmp_path, capsys):
    """A compacted table (its generation 0 removed) was not recognised as the table itself by its
    path: `shard --overwrite` replaced it with its shard 0, half its rows, and removed the
    version holding them all and its writes."""
    from tiered_store.delta.compaction import compact_table

    path = tmp_path / "t0.npy"
    create_table(path, np.ones((30, 4), dtype=np.float32), progress=False)
    with TieredStore.open({"table": {"path": str(path)}}) as store:
        store.write([3], torch.full((1, 4), 9.0))
        store.commit()
    assert compact_table(path, progress=False).removed_generations == [0]
    argv = ["shard", str(path), "--by", "rows", "--quiet", "--ranks", "2", "--overwrite"]
    assert cli_main([*argv, "--out", str(tmp_path / "t{rank}.npy")]) == 2
    assert f"rank 0's shard {path} is the table itself" in capsys.readouterr().err
    assert not (tmp_path / "t1.npy").exists()
    with TieredStore.open({"table": {"path": str(path)}}) as store:
        assert store.rows == 30 and store.committed_step == 1
        assert store.lookup([3])[0].tolist() == [9.0] * 4


def test_a_shard_takes_the_rows_it_holds_from_lists_and_profiles_of_its_table(tmp_path):
    """Row lists and profiles (what `analyze` writes) name the table's rows: each shard preloads
    or pins those it holds, as its own rows. They were read as the shard's ids: a whole-table
    list failed the open, or preloaded other rows where the ids fitted."""
    from tiered_store.profile import profile_ids

    table = make_plain_table(tmp_path)
    template = shards_template(table, "rows")
    write_shards(table, 2, "rows", template=template, progress=False, overwrite=True)
    shard = Path(template.format(rank=1, ranks=2))
    start = read_shard(shard).shard_map.shard_range(1)[0]
    hot_rows = np.array([400, 300, 5, start, start + 1, start - 1])  # table rows, hottest first
    np.save(tmp_path / "hot.npy", hot_rows)
    held = [r - start for r in hot_rows if r >= start]
    tiers = {
        "hot": {"capacity": 0},
        "warm": {"capacity": 16, "preload_rows": str(tmp_path / "hot.npy")},
    }
    with TieredStore.open({"table": {"path": str(shard)}, "tiers": tiers}) as store:
        preloaded = store.warm.row_of_slot[store.warm.row_of_slot >= 0]
        assert sorted(preloaded.tolist()) == sorted(held)
        full = np.load(table)
        assert np.array_equal(
            store.lookup(held).view(torch.int16).numpy(),
            full[hot_rows[hot_rows >= start]].view(np.int16),
        )
    counts = np.repeat(hot_rows, [60, 50, 40, 30, 20, 10])
    profile_ids(counts, rows=463).save(tmp_path / "profile.npz")
    tuned = {"capacity": 4, "policy": "zipf-tuned", "profile": str(tmp_path / "profile.npz")}
    with TieredStore.open(
        {"table": {"path": str(shard)}, "tiers": {"hot": {"capacity": 0}, "warm": tuned}}
    ) as store:
        pinned = store.warm.row_of_slot[store.warm.pinned_mask()].tolist()
        assert pinned and set(pinned) <= set(held)


def test_the_sharding_section_is_validated_and_its_paths_resolved(tmp_path):
    cfg = StoreConfig.from_dict(
        {"table": {"path": "t.npy"}, "sharding": {"ranks": 4, "shards": "s/{rank}.npy"}},
        base_dir=tmp_path,
    )
    assert (cfg.sharding.by, cfg.sharding.backend) == ("heads", "auto")
    assert cfg.sharding.shards == str(tmp_path.resolve() / "s" / "{rank}.npy")
    with pytest.raises(ConfigError, match="sharding.by"):
        StoreConfig.from_dict({"table": {"path": "t.npy"}, "sharding": {"ranks": 2, "by": "cols"}})
    with pytest.raises(ConfigError, match=r"sharding.shards: got 's.npy'; expected .*\{rank\}"):
        StoreConfig.from_dict(
            {"table": {"path": "t.npy"}, "sharding": {"ranks": 2, "shards": "s.npy"}}
        )
    example = StoreConfig.from_yaml(Path(__file__).parents[1] / "examples" / "tiers-sharded.yaml")
    assert (example.sharding.ranks, example.sharding.by) == (4, "heads")


# -- one rank, in this process -----------------------------------------------------------------------
def test_a_single_rank_group_serves_every_row_and_checks_ids_and_handles(tables, monkeypatch):
    table = tables["plain"]
    write_shards(
        table, 1, "rows", template=shards_template(table, "rows"), progress=False, overwrite=True
    )
    _one_rank_group_env(monkeypatch)
    cfg = {
        "table": {"path": str(table)},
        "sharding": {"ranks": 1, "by": "rows", "shards": shards_template(table, "rows")},
    }
    with ShardedStore.open(cfg) as store:
        ids = torch.tensor([[5, 5, 400], [0, 462, 7]])
        want = torch.from_numpy(np.load(table)[ids.numpy()].astype(np.uint16).view(np.int16))
        assert torch.equal(store.lookup(ids).view(torch.int16), want)
        with pytest.raises(RowIdError, match="463"):
            store.lookup(torch.tensor([1, 463]))
        handle = store.prefetch(ids)
        with pytest.raises(PrefetchHandleError, match="differ"):
            store.lookup(ids[:1], handle)
        with (
            TieredStore.open({"table": {"path": str(table)}}) as local,  # not the group's
            pytest.raises(PrefetchHandleError, match="another store's prefetch"),
        ):
            store.lookup(ids, local.prefetch(ids))
        assert torch.equal(store.lookup(ids, store.prefetch(ids)).view(torch.int16), want)
        buffer = ids.clone()
        handle = store.prefetch(buffer)
        buffer[0, 0] = 6  # refilled after prefetch(): other ids than the handle's
        with pytest.raises(PrefetchHandleError, match="differ"):
            store.lookup(buffer, handle)
        store.lookup(ids)  # after the refused handles' rounds: one thread runs them in order
        assert store.stats()["shard"] == {"rank": 0, "ranks": 1, "rows": 463}
        text = generate_latest(build_sharded_registry({"layer1": store}, process=False)).decode()
    families = list(text_string_to_metric_families(text))
    names = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    assert names == (set(METRICS) - set(SERVER_METRICS)) | set(SHARDED_METRICS)
    samples = [s for f in families for s in f.samples]
    assert samples and all(s.labels["rank"] == "0" for s in samples)
    value = {(s.name, s.labels.get("direction")): s.value for s in samples}
    # 3 lookups, 3 prefetches (2 of them refused at collection); the lookup refused for its
    # ids joined its round with no ids
    assert value[("tiered_store_exchange_rounds_total", None)] == 6
    # every lookup call is timed, the 4 refused ones too
    assert value[("tiered_store_sharded_lookup_duration_seconds_count", None)] == 7
    assert value[("tiered_store_exchange_ids_total", None)] == 6 + 0 + 6 + 6 + 6 + 6
    assert value[("tiered_store_shard_rows", None)] == 463
    assert torch.distributed.is_initialized()  # it made the group: kept for the next store


def test_a_sharded_store_tells_the_engram_layout_its_shards_record(tmp_path, monkeypatch):
    """An Engram model checks a table backend's layout (engram_layout) against its own: a
    ShardedStore tells the whole table's, which every shard records."""
    with ShardedStore.open(_one_rank_sharded_config(tmp_path, monkeypatch)) as store:
        assert store.engram_layout == head_metadata(HEADS)["engram"]


ONE_RANK_STORE = {"tiers": {"hot": {"capacity": 0}}, "sharding": {"ranks": 1, "timeout_s": 10}}


def _one_rank_sharded_open_error(checkpoint: Path, monkeypatch) -> str:
    """The ShardMismatchError of loading ``checkpoint`` sharded over a one-rank group."""
    from tiered_store.engram.checkpoint import load_tiered_model

    _one_rank_group_env(monkeypatch)
    with pytest.raises(ShardMismatchError) as refused:
        load_tiered_model(checkpoint, store=ONE_RANK_STORE)
    return str(refused.value)


def test_a_sharded_checkpoint_missing_a_table_names_what_makes_it_and_its_shards(
    tmp_path, monkeypatch
):
    """A sharded open of a checkpoint whose layer's table and shards are gone said only
    `tiered-store shard TABLE` makes the shard; that command, over the missing table, then says
    'expected a table made by `tiered-store init`', a plain table the layout check refuses. The
    shard's error now says the table is missing too, naming what writes a checkpoint's."""
    from tests.serve_support import make_checkpoint
    from tiered_store.serve import ServeConfig

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    for layer in config.model.engram.layer_ids:
        write_shards(config.table_path(layer), 1, "heads", progress=False)
    table = config.table_path(3)
    for path in table.parent.glob("engram_layer3*"):
        path.unlink()
    message = _one_rank_sharded_open_error(config.checkpoint_dir, monkeypatch)
    assert "engram_layer3.shard-0-of-1.npy does not exist" in message
    assert f"`tiered-store shard {table} --ranks 1 --by heads` makes" in message
    assert f"Engram layer 3: table {table} does not exist" in message
    assert "convert_checkpoint" in message and "`tiered-store init-model CONFIG`" in message


def test_a_missing_shards_table_that_cannot_be_read_is_not_said_to_be_missing(
    tmp_path, monkeypatch
):
    """A missing shard's table whose version pointer is unreadable was said to be 'missing too'
    (it is there: compacted); and a missing_table hint that failed otherwise raised on its rank
    alone, the others' open then failing on a closed connection. Both are said with the shard's
    error, in the ShardMismatchError every rank raises."""
    from tests.serve_support import make_checkpoint
    from tiered_store.delta.compaction import compact_table
    from tiered_store.delta.table_versions import pointer_path
    from tiered_store.serve import ServeConfig

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    table = config.table_path(3)
    with TieredStore.open({"table": {"path": str(table)}}) as writer:
        writer.write([0], torch.ones(1, writer.dim))
        writer.commit()
    compact_table(table, progress=False)
    for layer in config.model.engram.layer_ids:
        write_shards(config.table_path(layer), 1, "heads", progress=False)
    for path in table.parent.glob("engram_layer3.shard-*"):
        path.unlink()
    pointer_path(table).write_text("not json")
    message = _one_rank_sharded_open_error(config.checkpoint_dir, monkeypatch)
    assert "engram_layer3.shard-0-of-1.npy does not exist" in message
    assert "missing too" not in message, message
    assert f"its table {table} cannot be read either (TableFormatError: " in message
    assert "engram_layer3.npy.current is unreadable" in message

    def failing_hint() -> None:
        raise ValueError("the hint's own bug")

    spec = {**ONE_RANK_STORE, "table": {"path": str(table)}}
    with pytest.raises(ShardMismatchError, match=r"\(ValueError: the hint's own bug\)"):
        ShardedStore(StoreConfig.from_dict(spec, base_dir=tmp_path), missing_table=failing_hint)


def test_a_sharded_prefetch_collected_after_a_write_is_refused(tmp_path, monkeypatch):
    """A handle prefetched before a write round may hold older rows; fetching again would be a
    round of this rank's alone (another rank may have looked up without a handle), so it is
    refused, locally, and the store goes on."""
    cfg = _one_rank_sharded_config(tmp_path, monkeypatch)
    with ShardedStore.open(cfg) as store:
        ids = torch.tensor([[5, 5, 400], [0, 462, 7]])
        handle = store.prefetch(ids)
        store.write([400], torch.ones(1, store.row_width))
        with pytest.raises(PrefetchHandleError, match="prefetched before a write or update round"):
            store.lookup(ids, handle)
        assert store.lookup(ids)[0, 2].float().eq(1).all()  # a lookup after the write sees it
        store.commit()


def test_a_failed_sharded_write_says_what_a_commit_does_and_a_close_drops_the_round(
    tmp_path, monkeypatch
):
    """A write round that failed on one shard (out of memory copying its rows to the hot tier)
    raised on every rank naming it, and no more: the other shards had taken their rows and the
    failed one's write had applied whole, but the error read as if nothing was written; then it
    said what each shard holds, not what the caller can do: a commit made that mix durable (for
    update_rows, the shards a training step apart, with no gradients left to redo it). It says
    what became of the rows (a lookup shows it), that the next commit keeps what the shards
    hold, and that closing every rank's store without committing drops the round: reopened,
    the shards are at their last commit."""
    cfg = {**_one_rank_sharded_config(tmp_path, monkeypatch), "tiers": {"hot": {"capacity": 8}}}
    with ShardedStore.open(cfg) as store:
        store.write([400], torch.ones(1, store.row_width))
        store.commit()
        store.lookup(torch.tensor([400]))  # cached in the hot tier

        def out_of_memory(slots, rows):
            raise MemoryError("out of memory copying the rows to the hot tier")

        monkeypatch.setattr(store.local.hot_pool, "write", out_of_memory)
        with pytest.raises(
            TierIOError,
            match=r"sharded write failed on 1 of 1 rank\(s\): rank 0: MemoryError: out of memory "
            r"copying .*; the other ranks' shards took their rows, and a failed shard's write "
            r"applied whole or not at all: look its rows up to tell which\. The next commit\(\) "
            r"makes what the shards "
            r"hold durable, as it is; to drop this round instead, close every rank's store "
            r"without committing",
        ):
            store.write([400], torch.full((1, store.row_width), 2))
        monkeypatch.undo()
        assert store.lookup(torch.tensor([400])).float().eq(2).all()  # applied here
        with pytest.warns(UncommittedWritesWarning):
            store.close()
    with ShardedStore.open(cfg) as store:
        assert store.lookup(torch.tensor([400])).float().eq(1).all()  # the round dropped


def test_a_sharded_lookup_interrupted_while_waiting_for_its_handle_can_collect_it_again(
    tmp_path, monkeypatch
):
    """ShardedStore marked a handle consumed before lookup waited for its round: Ctrl-C during
    the wait left it refused as "already consumed" though no rows had come out (as TieredStore
    did before). The shard's lookup is held here; the interrupt comes once lookup waits."""
    cfg = _one_rank_sharded_config(tmp_path, monkeypatch)
    with ShardedStore.open(cfg) as store:
        ids = torch.tensor([[5, 5, 400], [0, 462, 7]])
        want = store.lookup(ids)
        entered, release = threading.Event(), threading.Event()
        local_lookup = store.local.lookup

        def held_lookup(*args, **kwargs):
            entered.set()
            assert release.wait(30)
            return local_lookup(*args, **kwargs)

        monkeypatch.setattr(store.local, "lookup", held_lookup)
        handle = store.prefetch(ids)
        assert entered.wait(10)

        with interrupted_once_waiting(handle.future, release):
            store.lookup(ids, handle)
        assert torch.equal(store.lookup(ids, handle).view(torch.int16), want.view(torch.int16))
        with pytest.raises(PrefetchHandleError, match="already consumed"):  # collected now
            store.lookup(ids, handle)


def test_a_cancelled_sharded_prefetch_is_refused_as_a_tiered_stores_not_as_a_failed_rank(
    tmp_path, monkeypatch
):
    """A ShardedStore handle whose future was cancelled while its round was queued raised the
    future's CancelledError through the wait's backend-error branch: a RankFailureError naming
    this rank, recorded, so every later call was refused as after a dead peer. It is refused as
    TieredStore's is (PrefetchHandleError, saying it was cancelled) and the store goes on."""
    from tiered_store.prefetch import CANCELLED

    cfg = _one_rank_sharded_config(tmp_path, monkeypatch)
    with ShardedStore.open(cfg) as store:
        ids = torch.tensor([[5, 5, 400], [0, 462, 7]])
        want = store.lookup(ids).view(torch.int16)
        release = threading.Event()
        store._thread.submit(release.wait, 30)  # the collective thread held: the round queued
        handle = store.prefetch(ids)
        assert handle.future.cancel()
        release.set()
        with pytest.raises(PrefetchHandleError) as refused:
            store.lookup(ids, handle)
        assert str(refused.value) == CANCELLED
        assert torch.equal(store.lookup(ids).view(torch.int16), want)


def test_an_interrupt_inside_a_sharded_prefetch_leaves_its_depth_slot_free(tmp_path, monkeypatch):
    """ShardedStore.prefetch queued its round, then attached the callback that frees its
    prefetch.depth slot: Ctrl-C between kept the slot for good (as TieredStore did before), and
    with the default depth 2, two such interrupts made the next prefetch wait out the timeout and
    fail the store as if a rank had. The interrupt is raised here just after the round is
    queued."""
    cfg = {**_one_rank_sharded_config(tmp_path, monkeypatch, timeout_s=5), "prefetch": {"depth": 2}}
    with ShardedStore.open(cfg) as store:
        ids = torch.tensor([[5, 5, 400], [0, 462, 7]])
        want = store.lookup(ids).view(torch.int16)
        submit, queued = store._thread.submit, []

        def interrupted_after_queueing(*args):
            queued.append(submit(*args))
            raise KeyboardInterrupt

        monkeypatch.setattr(store._thread, "submit", interrupted_after_queueing)
        for _ in range(2):
            with pytest.raises(KeyboardInterrupt):
                store.prefetch(ids)
        monkeypatch.setattr(store._thread, "submit", submit)
        for future in queued:  # the rounds queued ran (every rank joins them)
            future.result(30)
        handles = [store.prefetch(ids) for _ in range(3)]  # (before: the first one timed out)
        assert all(torch.equal(store.lookup(ids, h).view(torch.int16), want) for h in handles)


def test_an_interrupt_before_a_sharded_prefetch_queued_its_round_leaves_its_slot_free(
    tmp_path, monkeypatch
):
    """A Ctrl-C in ShardedStore.prefetch after it took its prefetch.depth slot but before its
    round was queued kept the slot for good (the round, which frees it, never ran): with depth
    2, two of them made the next prefetch wait out sharding.timeout_s and fail the store as if
    a rank were silent. The interrupt is raised here as the round would be queued."""
    cfg = {**_one_rank_sharded_config(tmp_path, monkeypatch, timeout_s=5), "prefetch": {"depth": 2}}
    with ShardedStore.open(cfg) as store:
        ids = torch.tensor([[5, 5, 400], [0, 462, 7]])
        want = store.lookup(ids).view(torch.int16)
        submit = store._thread.submit

        def interrupted_before_queueing(*args):
            raise KeyboardInterrupt

        monkeypatch.setattr(store._thread, "submit", interrupted_before_queueing)
        for _ in range(2):
            with pytest.raises(KeyboardInterrupt):
                store.prefetch(ids)
        monkeypatch.setattr(store._thread, "submit", submit)
        handles = [store.prefetch(ids) for _ in range(2)]  # (before: the first one timed out)
        assert all(torch.equal(store.lookup(ids, h).view(torch.int16), want) for h in handles)
        assert store.failed is None


def test_a_sharded_stores_prefetches_and_their_stalls_are_in_its_stats_and_metrics(
    tmp_path, monkeypatch
):
    """A rank's prefetches, and its lookups' waits for their handles, went uncounted: stats()'s
    prefetch section and tiered_store_prefetches_total / _prefetch_stall_seconds came from its
    shard's store, which never prefetches (the rounds fetch its rows), so they said 0."""
    with ShardedStore.open(_one_rank_sharded_config(tmp_path, monkeypatch)) as store:
        ids = torch.tensor([[5, 5, 400], [0, 462, 7]])
        for _ in range(3):
            store.lookup(ids, store.prefetch(ids))
        store.lookup(ids)  # no handle: no stall
        stats = store.stats()["prefetch"]
        text = generate_latest(build_sharded_registry({"layer1": store}, process=False)).decode()
    value = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert stats["handles"] == value["tiered_store_prefetches_total"] == 3
    assert value["tiered_store_prefetch_stall_seconds_count"] == 3
    assert stats["wait_seconds_total"] > 0
    assert stats["wait_seconds_total"] == pytest.approx(
        value["tiered_store_prefetch_stall_seconds_sum"]
    )


def test_a_sharded_store_exchanging_on_the_cpu_never_asks_whether_ids_are_pinned(
    tmp_path, monkeypatch
):
    """prefetch's snapshot of the caller's ids asked Tensor.is_pinned() of them, though a store
    exchanging on the CPU (gloo) copies them to no GPU: on a machine with a GPU that may start
    a CUDA context for nothing. Only a store exchanging on a GPU asks; the snapshot is still
    taken (the caller's refill is not what the handle fetched)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Asked(TorchDispatchMode):
        """Counts Tensor.is_pinned() calls (on this thread)."""

        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func is torch.ops.aten.is_pinned.default
            return func(*args, **(kwargs or {}))

    with ShardedStore.open(_one_rank_sharded_config(tmp_path, monkeypatch)) as store:
        assert store.exchange_device.type == "cpu"
        ids = torch.tensor([[5, 5, 400], [0, 462, 7]])
        want = store.lookup(ids)
        with Asked() as asked:
            handle = store.prefetch(ids)
        assert asked.calls == 0
        refilled = ids.clone()
        ids[:] = 1  # refilled: the handle's ids are those prefetched
        assert torch.equal(store.lookup(refilled, handle), want)


def test_the_pipelines_stats_delta_of_a_sharded_table_keeps_its_shard_as_it_is(
    tmp_path, monkeypatch
):
    """The Engram pipeline's per-table statistics over a sharded table subtracted the shard
    section (its rank, ranks and rows: levels, not counts) like a counter: rank 0, ranks 0 and
    rows 0 in every run's report."""
    with ShardedStore.open(_one_rank_sharded_config(tmp_path, monkeypatch)) as store:
        before = store.stats()
        store.lookup(torch.tensor([5, 400]))
        after = store.stats()
    delta = table_stats_delta(before, after)
    assert delta["shard"] == after["shard"] == {"rank": 0, "ranks": 1, "rows": 463}
    assert delta["exchange"]["lookups"] == delta["lookup"]["calls"] == 1  # counters: deltas


def test_a_lookup_queued_behind_a_concurrent_close_fails_at_once_as_closed(tmp_path, monkeypatch):
    """A lookup that passed the closed check, then queued its exchange after close() had
    stopped the store's thread, was never run: it waited out the timeout and raised
    RankFailureError (and marked the store failed) for a store that was only closed."""
    store = ShardedStore.open(_one_rank_sharded_config(tmp_path, monkeypatch, timeout_s=2))
    validate = store._validate

    def closed_meanwhile(ids):  # close() of another thread, between the check and the queueing
        checked = validate(ids)
        store.close()
        return checked

    monkeypatch.setattr(store, "_validate", closed_meanwhile)
    start = time.monotonic()
    with pytest.raises(StoreClosedError, match="sharded store is closed"):
        store.lookup(torch.tensor([1, 2]))
    assert time.monotonic() - start < 1.0 and store.failed is None
    with pytest.raises(StoreClosedError, match="sharded store is closed"):
        store.lookup(torch.tensor([1, 2]))


def test_a_sharded_close_that_leaves_its_shards_calls_under_way_says_so(tmp_path, monkeypatch):
    """A read hung for good in the shard (a dead disk): the shard's close gave up after
    sharding.timeout_s, but ShardedStore.close returned None, so a sharded serve never knew to
    exit past it (the interpreter's exit waits for the read). It returns False, at a later
    close too; True once closed with no call left."""
    store = ShardedStore.open(_one_rank_sharded_config(tmp_path, monkeypatch, timeout_s=0.5))
    entered, release = threading.Event(), threading.Event()

    def stuck() -> None:  # a call under way in the shard, as a lookup blocked in a read is
        with store.local._file_calls.entered():
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=stuck)
    thread.start()
    try:
        assert entered.wait(10)
        with pytest.warns(RuntimeWarning, match="still under way after"):
            assert store.close() is False
        assert store.close() is False
    finally:
        release.set()
        thread.join()
    (tmp_path / "b").mkdir()
    with ShardedStore.open(_one_rank_sharded_config(tmp_path / "b", monkeypatch)) as other:
        pass
    assert other.close() is True


def test_a_sharded_close_waits_no_longer_than_its_wait_s(tmp_path, monkeypatch):
    """A server's stop passes what is left of its deadline to each store's close; a sharded
    store's took no ``wait_s`` and waited its whole ``sharding.timeout_s`` for a call hung in
    its shard, per table, past ``stop_within_s``. ``close(wait_s=)`` bounds it."""
    store = ShardedStore.open(_one_rank_sharded_config(tmp_path, monkeypatch, timeout_s=300))
    entered, release = threading.Event(), threading.Event()

    def stuck() -> None:  # a call under way in the shard, as a lookup blocked in a read is
        with store.local._file_calls.entered():
            entered.set()
            release.wait(300)

    thread = threading.Thread(target=stuck)
    thread.start()
    closed: list[bool] = []
    try:
        assert entered.wait(10)
        closing = threading.Thread(target=lambda: closed.append(store.close(wait_s=0.5)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "still under way after 0.5 s"
            closing.start()
            closing.join(60)  # far less than sharding.timeout_s
        assert not closing.is_alive(), "close(wait_s=0.5) waited past it"
    finally:
        release.set()
        thread.join()
        closing.join()
    assert closed == [False]  # it left the hung call under way


@pytest.mark.parametrize("wait_s", [float("nan"), "5", True])
def test_a_sharded_close_refuses_a_wait_that_is_no_number_of_seconds_before_closing(
    tmp_path, monkeypatch, wait_s
):
    """close(wait_s=nan) raised torch's or Python's error (ValueError, TypeError) after marking
    the store closed: its shard, threads, heartbeat and group stayed open, and the next close()
    returned True doing nothing. Refused first, naming the value; the store is left as it was."""
    store = ShardedStore.open(_one_rank_sharded_config(tmp_path, monkeypatch, timeout_s=5))
    with pytest.raises(ConfigError, match=re.escape(f"close: wait_s {wait_s!r}; expected")):
        store.close(wait_s=wait_s)
    assert store.lookup([1]).shape == (1, store.dim)  # still open
    assert store.close(wait_s=-1.0) is True  # below 0: no wait
    assert store.local.closed


def test_without_a_process_group_or_torchrun_environment_opening_says_so(tables, monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    cfg = {"table": {"path": str(tables["plain"])}, "sharding": {"ranks": 2}}
    with pytest.raises(ConfigError, match="torchrun"):
        ShardedStore.open(cfg)
    with pytest.raises(ConfigError, match="sharding: missing"):
        ShardedStore.open({"table": {"path": str(tables["plain"])}})


def test_opening_from_yaml_names_the_file_only_for_errors_of_the_file(
    tables, tmp_path, monkeypatch
):
    """A missing torchrun environment and a bad ``group=`` came named by the YAML file
    ("s.yaml: no torch.distributed process group ..."), as if a key of it were wrong."""
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    config = tmp_path / "s.yaml"
    config.write_text(f"table: {{path: {tables['plain']}}}\nsharding: {{ranks: 1, by: rows}}\n")
    with pytest.raises(ConfigError, match=r"^no torch.distributed process group and MASTER_ADDR"):
        ShardedStore.open(config)
    _one_rank_group_env(monkeypatch)
    with pytest.raises(ConfigError, match=r"^group: got list \[0\]; expected a torch.distributed"):
        ShardedStore.open(config, group=[0])
    config.write_text(f"table: {{path: {tables['plain']}}}\n")  # the file's own: still named
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: sharding: missing"):
        ShardedStore.open(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    ("device", "backend", "key"),
    [
        ("cuda", "auto", "tiers.hot.device"),
        ("cuda", "gloo", "tiers.hot.device"),
        ("cuda:1", "nccl", "tiers.hot.device"),
        ("cpu", "nccl", "sharding.backend"),
    ],
)
def test_cuda_or_nccl_without_cuda_is_refused_naming_the_setting(
    tables, monkeypatch, device, backend, key
):
    # refused before the group is made (torch's own error was an AttributeError about
    # torch._C._cuda_setDevice), as a single store refuses a CUDA hot tier here
    _one_rank_group_env(monkeypatch)
    cfg = {
        "table": {"path": str(tables["plain"])},
        "tiers": {"hot": {"capacity": 8, "device": device}},
        "sharding": {"ranks": 1, "by": "rows", "backend": backend},
    }
    with pytest.raises(ConfigError, match=rf"^{key}: .* but CUDA is not available here"):
        ShardedStore.open(cfg)
    assert not torch.distributed.is_initialized()


# -- several ranks, spawned processes ----------------------------------------------------------------
def _results(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _two_ranks_over_plain_shards(tmp_path, worker, timeout: float) -> tuple[list[int], list[dict]]:
    """A plain table sharded over 2 ranks; ``worker(rank, world, table, out)`` run on each: the
    ranks' exit codes and the results they wrote."""
    from tests.distributed_support import make_plain_table

    plain = make_plain_table(tmp_path)
    _shard_all({"plain": plain}, 2)
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(worker, 2, (str(plain), out), timeout)
    return codes, _results(out, 2)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_lookups_are_bit_exact_and_mismatched_shards_are_refused_on_every_rank(
    tables, tmp_path, world
):
    _shard_all(tables, world)
    victim = 2 if world == 3 else None  # and at 3 ranks, rank 2 is killed mid-lookup at the end
    paths = {k: str(v) for k, v in tables.items()}
    codes = run_ranks(exact_lookups_worker, world, (paths, tmp_path, victim), 120)
    reports = [tmp_path / f"rank{r}.json" for r in range(world)]
    crashes = {  # what a rank that ended otherwise than expected said
        r: json.loads(p.read_text()).get("crash") for r, p in enumerate(reports) if p.exists()
    }
    assert codes == [0 if r != victim else -9 for r in range(world)], (codes, crashes)
    results = _results(tmp_path, world)
    if victim is not None:
        for rank in range(world):
            if rank != victim:
                check_named(results[rank], rank, victim, "kill")
    for rank, result in enumerate(results):
        assert "crash" not in result, f"rank {rank}:\n{result['crash']}"
        assert [c[:2] for c in result["checked"]] == [
            ["plain", "heads"],
            ["plain", "rows"],
            ["v41", "heads"],
            ["v41", "rows"],
        ]
        assert all(c[2] > 0 for c in result["checked"])  # rows really crossed between ranks
        assert [case for case, _ in result["refused"]] == ["version", "mode", "missing"]
        (_, version_msg), (_, mode_msg), (_, missing_msg) = result["refused"]
        assert missing_msg is not None and "none.1-of-" in missing_msg
        assert "does not exist; expected the shards `tiered-store shard " in missing_msg
        assert version_msg is not None and "rank 1: shard" in version_msg
        assert "other/plain.heads.shard-1-of" in version_msg and "table version" in version_msg
        assert mode_msg is not None and "rank 1: config" in mode_msg


def check_named(result: dict, rank: int, victim: int, how: str) -> None:
    """A surviving rank's report: the failed rank named, in time, and the store failed for good."""
    assert "crash" not in result, result["crash"]
    error = result["error"]
    assert error is not None and error.startswith(
        f"rank {rank}: lookup in collective round 3 (lookups, writes, updates and commits counted) failed"
    )
    if victim == 0:
        assert "rank 0 died" in error
    elif how == "kill":
        assert f"rank {victim} stopped" in error
    else:
        assert f"rank {victim} is alive but has entered only 2" in error
    assert result["seconds"] <= KILL_TIMEOUT_S + 1.0  # sharding.timeout_s, plus scheduling slack
    assert "failed earlier" in result["after"]


@pytest.mark.slow
def test_a_rank_whose_shard_read_hangs_mid_lookup_is_named_by_every_rank(tables, tmp_path):
    from tests.distributed_support import hung_read_worker

    table = tables["plain"]
    write_shards(
        table, 2, "rows", template=shards_template(table, "rows"), progress=False, overwrite=True
    )
    codes = run_ranks(hung_read_worker, 2, (str(table), tmp_path), 60)
    results = _results(tmp_path, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for rank, result in enumerate(results):  # alive and in the round: neither silent nor behind
        assert result["error"].startswith(
            f"rank {rank}: lookup in collective round 2 (lookups, writes, updates and commits counted) failed: "
        ), result
        assert "rank 1 has not finished its own shard's part of the lookup" in result["error"]


@pytest.mark.slow
@pytest.mark.parametrize("victim, how", [(0, "kill"), (1, "stall"), (1, "truncate")])
def test_rank_0_killed_a_rank_stalling_or_failing_is_named_by_every_other_rank_in_time(
    tables, tmp_path, victim, how
):
    world, table = 3, tables["plain"]
    write_shards(
        table,
        world,
        "rows",
        template=shards_template(table, "rows"),
        progress=False,
        overwrite=True,
    )
    codes = run_ranks(killed_rank_worker, world, (str(table), tmp_path, victim, how), 60)
    survivors = [r for r in range(world) if r != victim]
    assert [codes[r] for r in survivors] == [0] * len(survivors)
    if how != "truncate":
        for rank in survivors:
            check_named(json.loads((tmp_path / f"rank{rank}.json").read_text()), rank, victim, how)
        return
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    # a shard that cannot serve a lookup fails that lookup on every rank, at once, naming it (the
    # others waited for it until the timeout, and the group failed for good); the next is served
    assert codes[victim] == 0
    for rank, result in enumerate(results):
        assert "crash" not in result, result["crash"]
        error = result["error"]
        if rank == victim:  # the shard's own error
            assert error.startswith("TierIOError") and "shard-1-of-3" in error, error
        else:
            assert error.startswith(
                f"ShardReadError: rank {rank}: lookup in collective round 3 (lookups, writes, updates and commits counted): 1 of 3"
            ), error
            assert f"rank {victim}: a cold read failed" in error, error
        assert result["seconds"] < KILL_TIMEOUT_S / 2
        assert result["served_after"] is True


def test_a_rank_interrupted_in_a_round_failing_on_a_dead_rank_records_the_failure(tables, tmp_path):
    """Rank 0, interrupted (Ctrl-C) while it waited for a lookup round that then failed on rank
    1 (killed), never recorded the failure (its wait did): its next lookup ran on the broken
    group and failed again as a new failure. The round records it, so the store refuses the
    next call at once, as after a failure its caller saw."""
    from tests.distributed_support import interrupted_failed_round_worker

    table = tables["plain"]
    write_shards(
        table, 2, "rows", template=shards_template(table, "rows"), progress=False, overwrite=True
    )
    codes = run_ranks(interrupted_failed_round_worker, 2, (str(table), tmp_path), 60)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert codes[0] == 0 and "crash" not in result, (codes, result)
    assert result["lookup"] == "KeyboardInterrupt", result
    assert str(result["failed"]).startswith(
        "rank 0: lookup in collective round 2 (lookups, writes, updates and commits counted) failed: rank 1 "
    ), result
    assert result["after"].startswith("rank 0: this sharded store failed earlier (rank 0: lookup in collective round 2 (lookups, writes, updates and commits counted) failed: "), result  # fmt: skip


def test_a_sharded_prefetch_cancelled_on_one_rank_keeps_every_rank_in_step(tmp_path):
    """A handle's future cancelled while its round was queued skipped the round on that rank
    alone: the other ranks' rounds paired with the wrong ones (each rank got rows of its own
    ids, a round late) until one waited for a round never run, and failed on the timeout. The
    round still runs on the rank that cancelled it, its rows dropped: the lookup of the handle
    says it was cancelled there, and every other round gives every rank its rows."""
    from tests.distributed_support import cancelled_prefetch_worker
    from tiered_store.prefetch import CANCELLED

    codes, results = _two_ranks_over_plain_shards(tmp_path, cancelled_prefetch_worker, 90)
    with TieredStore.open({"table": {"path": str(tmp_path / "plain.npy")}}) as whole:
        want = [
            whole.lookup(torch.arange(40).reshape(8, 5) * k % whole.rows).view(torch.int16).tolist()
            for k in (11, 13, 17)
        ]
    assert codes == [0, 0], (codes, results)
    assert [r.get("crash") for r in results] == [None, None], results
    assert [r["cancelled"] for r in results] == [True, None]
    assert results[0]["rows"] == [want[1], CANCELLED, want[2]]
    assert results[1]["rows"] == [want[1], want[0], want[2]]
    assert [r["failed"] for r in results] == [None, None]


@pytest.mark.gpu
def test_on_cuda_the_exchange_runs_on_nccl_and_rows_stay_packed_until_the_gather(
    tables, monkeypatch
):
    table = tables["v41"]
    write_shards(
        table, 1, "heads", template=shards_template(table, "heads"), progress=False, overwrite=True
    )
    _one_rank_group_env(monkeypatch)
    table_cfg = {"path": str(table), "out_of_range": "zero"}
    tiers = {"hot": {"capacity": 64, "device": "cuda"}, "warm": {"capacity": 256}}
    cfg = {
        "table": table_cfg,
        "tiers": tiers,
        "sharding": {"ranks": 1, "shards": shards_template(table, "heads")},
    }
    ids = torch.tensor([[3, 3, -1], [1997, 1998, 40]], device="cuda")
    with TieredStore.open({"table": table_cfg, "tiers": tiers}) as single:
        want, want_packed = single.lookup(ids), single.lookup(ids, packed=True)
    with ShardedStore.open(cfg) as store:
        assert torch.distributed.get_backend(store.group) == "nccl"
        got = store.lookup(ids, store.prefetch(ids))
        assert got.device.type == "cuda" and torch.equal(
            got.view(torch.int16), want.view(torch.int16)
        )
        assert torch.equal(store.lookup(ids, packed=True), want_packed)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs CUDA: two devices")
def test_a_cuda_hot_tier_over_gloo_is_on_the_local_ranks_gpu(tables, monkeypatch):
    # under torchrun each rank of a node sees every GPU: a hot tier on `cuda` goes to the
    # LOCAL_RANK's, whichever backend exchanges the rows (gloo here: on the CPU)
    table, template = tables["plain"], shards_template(tables["plain"], "rows")
    write_shards(table, 1, "rows", template=template, progress=False, overwrite=True)
    _one_rank_group_env(monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = {
        "table": {"path": str(table)},
        "tiers": {"hot": {"capacity": 64, "device": "cuda"}, "warm": {"capacity": 256}},
        "sharding": {"ranks": 1, "by": "rows", "shards": template, "backend": "gloo"},
    }
    try:
        with ShardedStore.open(cfg) as store:
            assert torch.distributed.get_backend(store.group) == "gloo"
            assert store.device == torch.device("cuda", 1)
            assert store.lookup(torch.tensor([3, 7])).device == torch.device("cuda", 1)
    finally:
        torch.cuda.set_device(0)


def test_a_rank_finds_its_gpu_whether_it_sees_the_nodes_or_only_its_own():
    # torchrun's usual set-up (every rank sees the node's GPUs) and a per-rank
    # CUDA_VISIBLE_DEVICES (each sees one, at ordinal 0); anything else is named, not torch's
    # bare "invalid device ordinal"
    assert local_gpu("3", 8) == 3 and local_gpu("0", 8) == 0
    assert local_gpu("3", 1) == 0
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=3 but this process sees 2 GPU\(s\)"):
        local_gpu("3", 2)
    with pytest.raises(ConfigError, match="LOCAL_RANK='x' is not an integer"):
        local_gpu("x", 2)


# -- serving across ranks: real `tiered-store serve` processes -----------------------------------------
def test_serve_over_two_ranks_answers_as_one_process_and_rank_0_stops_the_other(tmp_path):
    from tests.serve_support import make_checkpoint
    from tiered_store.serve import ServeConfig, ServedModel, parse_request
    from tiered_store.serve.client import ServeProcess, post_json

    plain = ServeConfig.from_yaml(make_checkpoint(tmp_path / "one"))
    sharding = {"ranks": 2, "by": "heads", "timeout_s": 30}
    config_path = tmp_path / "one" / "sharded.yaml"
    doc = yaml.safe_load((tmp_path / "one" / "serve.yaml").read_text())
    doc["store"]["sharding"] = sharding
    config_path.write_text(yaml.safe_dump(doc))
    for layer in plain.model.engram.layer_ids:
        write_shards(plain.table_path(layer), 2, "heads", progress=False)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    follower = PythonProcess(  # a process of the tests' forkserver
        ["-m", "tiered_store.cli", "serve", str(config_path), "--metrics-address", "127.0.0.1:0"],
        env={**os.environ, **env, "RANK": "1", "LOCAL_RANK": "1"},
        stderr=False,
    )
    try:
        with ServeProcess(config_path, env={**env, "RANK": "0", "LOCAL_RANK": "0"}) as server:
            ready = json.loads(follower.stdout.readline())
            ids = [[5, 17, 99, 1000, 3, 3], [42, 42, 42, 7, 8, 9]]
            status, answer = post_json(server.url + "/v1/engram", {"input_ids": ids})
            assert status == 200, answer
            time.sleep(1.2)  # past the 1 s between version checks: sharded tables are not reopened
            _, again = post_json(server.url + "/v1/engram", {"input_ids": ids})
            text = urllib.request.urlopen(ready["metrics_url"], timeout=10).read().decode()
            assert server.stop() == 0
        assert follower.wait(30) == 0  # rank 0 told it to stop
    finally:
        if follower.poll() is None:
            follower.kill()
    assert (ready["event"], ready["rank"]) == ("following", 1)
    assert 'tiered_store_exchange_rounds_total{rank="1",table="engram_layer1"} 2.0' in text
    single = ServedModel(plain)
    try:
        request = parse_request(json.dumps({"input_ids": ids}).encode(), plain.server, single)
        expected = single.answer(request)
    finally:
        single.close()
    for key in ("next_token_ids", "logits", "hidden_checksum", "layer_checksums"):
        assert answer[key] == expected[key] == again[key], key


def _sharded_serve_config(tmp_path: Path, ranks: int = 2, **checkpoint) -> Path:
    """The tiny serve checkpoint sharded over ``ranks`` ranks by heads (timeout_s 10)."""
    from tests.serve_support import make_checkpoint
    from tiered_store.serve import ServeConfig

    plain = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    doc = yaml.safe_load((tmp_path / "serve.yaml").read_text())
    doc["store"]["sharding"] = {"ranks": ranks, "by": "heads", "timeout_s": 10}
    doc["checkpoint"].update(checkpoint)
    config_path = tmp_path / "sharded.yaml"
    config_path.write_text(yaml.safe_dump(doc))
    for layer in plain.model.engram.layer_ids:
        write_shards(plain.table_path(layer), ranks, "heads", progress=False)
    return config_path


def _serve_ranks(
    config_path: Path,
    metrics: str = "127.0.0.1:0",
    env: dict[str, str] | None = None,
    prelude: Path | None = None,
) -> list[PythonProcess]:
    """Rank 0 (HTTP on a free port) and rank 1 of `tiered-store serve`, as torchrun starts them
    (rank 1's metrics on ``metrics``: its port + 1, or a free one; ``env`` added to both), in
    processes of the tests' forkserver (``prelude``: a file each runs first, as a
    ``sitecustomize``)."""
    env = {
        **os.environ,
        **(env or {}),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
    }
    cmd = ["-m", "tiered_store.cli", "serve", str(config_path)]
    extra = (
        ["--address", "127.0.0.1:0", "--metrics-address", ""],
        ["--metrics-address", metrics],
    )
    return [
        PythonProcess(
            [*cmd, *extra[rank]],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            prelude=prelude,
        )
        for rank in (0, 1)
    ]


def _started(ranks: list[PythonProcess]) -> tuple[str, str]:
    """Rank 0's URL and rank 1's metrics URL, once both ranks said they are up."""
    url = json.loads(ranks[0].stdout.readline())["url"]
    follower = json.loads(ranks[1].stdout.readline())
    assert follower["event"] == "following"
    return url, follower["metrics_url"]


def _ended(ranks: list[PythonProcess]) -> list[str]:
    """Kill what is left; each rank's stderr."""
    for proc in ranks:
        if proc.poll() is None:
            proc.kill()
    return [proc.communicate()[1] for proc in ranks]


def test_sharded_serving_names_a_failed_rank_and_never_waits_for_it_for_good(tmp_path):
    """A follower gone: 503s naming it and /healthz 503 (were 500s and "ok"); a follower that
    fails its start: rank 0 stops too (it waited for it for good); --record-trace: refused (its
    replay config named rank 0's shard); a follower scrubs its own shards (none did)."""
    from tiered_store.serve import ServeConfig, ServedModel
    from tiered_store.serve.client import get_json, post_json

    config_path = _sharded_serve_config(tmp_path / "one", scrub_interval_s=0.2)
    with pytest.raises(ConfigError, match="--record-trace t.trace: the tables are sharded"):
        ServedModel(ServeConfig.from_yaml(config_path), trace="t.trace")
    request = {"input_ids": [[5, 17, 99, 1000, 3, 3]]}
    ranks = _serve_ranks(config_path)
    try:
        url, follower_metrics = _started(ranks)
        assert post_json(url + "/v1/engram", request)[0] == 200
        scrubbed = 'tiered_store_verifications_total{rank="1",table="engram_layer1"} 0.0'
        deadline = time.monotonic() + 30
        while scrubbed in urllib.request.urlopen(follower_metrics, timeout=10).read().decode():
            assert time.monotonic() < deadline, "rank 1 never scrubbed its shards"
            time.sleep(0.1)
        ranks[1].kill()
        ranks[1].wait(30)
        status, answer = post_json(url + "/v1/engram", request)
        assert status == 503 and "a rank holding part of the table failed" in answer["error"]
        status, health = get_json(url + "/healthz")
        assert status == 503 and "rank 1 stopped" in health["problems"][0], health
        assert post_json(url + "/v1/engram", request)[0] == 503  # at once, from now on
        ranks[0].terminate()
        assert ranks[0].wait(30) == 0
    finally:
        _ended(ranks)

    checked = _sharded_serve_config(tmp_path / "two", verify_on_start=True)
    shard = tmp_path / "two" / "checkpoint" / "engram_layer1.shard-1-of-2.npy"
    with open(shard, "r+b") as f:  # rank 1's own shard fails its check
        f.seek(4096 + 10)
        byte = f.read(1)
        f.seek(4096 + 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    ranks = _serve_ranks(checked)
    try:
        assert ranks[1].wait(60) == 2 and ranks[0].wait(60) == 2
    finally:
        errors = _ended(ranks)
    assert "verify_on_start" in errors[1]
    assert "start (before the first collective round)" in errors[0], errors[0]
    assert "rank 1" in errors[0], errors[0]


def test_serving_compacted_shards_checks_and_scrubs_the_versions_they_serve(tmp_path):
    """A follower's shard compacted (generation 0 removed): the store opened its current version,
    but verify_on_start and the scrubber checked the shard's first file, so the follower failed
    its start ("does not exist") and every rank with it. Both check the version served."""
    from tiered_store.delta.compaction import compact_table
    from tiered_store.serve.client import get_json, post_json

    config_path = _sharded_serve_config(tmp_path, verify_on_start=True, scrub_interval_s=0.2)
    shards = sorted((tmp_path / "checkpoint").glob("*.shard-1-of-2.npy"))
    assert shards
    for shard in shards:
        with TieredStore.open({"table": {"path": str(shard)}}) as store:
            store.write([0], store.lookup([0], packed=True))
            store.commit()
        assert compact_table(shard, progress=False).removed_generations == [0]
    ranks = _serve_ranks(config_path)
    try:
        url, follower_metrics = _started(ranks)
        assert post_json(url + "/v1/engram", {"input_ids": [[5, 17, 99, 1000, 3, 3]]})[0] == 200
        passed = 'tiered_store_verifications_total{rank="1",table="engram_layer1"} 2.0'
        deadline = time.monotonic() + 30
        while passed not in (
            text := urllib.request.urlopen(follower_metrics, timeout=10).read().decode()
        ):
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        assert 'tiered_store_checksum_failures_total{rank="1",table="engram_layer1"} 0.0' in text
        assert get_json(url + "/healthz")[0] == 200
        ranks[0].terminate()
        assert ranks[0].wait(30) == 0 and ranks[1].wait(30) == 0
    finally:
        errors = _ended(ranks)
    assert "does not exist" not in errors[1], errors[1]


def _healthz_says(url: str, text: str, present: bool = True, within_s: float = 30) -> bool:
    """Whether rank 0's /healthz comes to name (or, ``present=False``, stop naming) ``text``."""
    from tiered_store.serve.client import get_json

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        problems = get_json(url + "/healthz")[1].get("problems", [])
        if any(text in p for p in problems) == present:
            return True
        time.sleep(0.1)
    return False


def test_healthz_names_a_rank_that_died_between_requests_and_stays_503_after_the_hold(tmp_path):
    """A follower killed while the server is idle: rank 0's /healthz names it within seconds,
    before any request (it said "ok" until a request failed); after a failed request, /healthz
    stays 503 past ``server.health_hold_s`` while every request is refused (it turned "ok")."""
    from tiered_store.serve.client import get_json, post_json

    config_path = _sharded_serve_config(tmp_path)
    doc = yaml.safe_load(config_path.read_text())
    doc.setdefault("server", {})["health_hold_s"] = 0.5
    config_path.write_text(yaml.safe_dump(doc))
    request = {"input_ids": [[5, 17, 99, 1000, 3, 3]]}
    ranks = _serve_ranks(config_path)
    try:
        url, _ = _started(ranks)
        assert post_json(url + "/v1/engram", request)[0] == 200
        assert get_json(url + "/healthz") == (200, {"status": "ok"})
        ranks[1].kill()
        ranks[1].wait(30)
        assert _healthz_says(url, "rank 1 stopped: no heartbeat"), get_json(url + "/healthz")
        assert post_json(url + "/v1/engram", request)[0] == 503
        time.sleep(1.0)  # past the hold
        status, health = get_json(url + "/healthz")
        assert status == 503, health
        assert any(p.startswith("ranks failed: ") for p in health["problems"]), health
        assert post_json(url + "/v1/engram", request)[0] == 503
        ranks[0].terminate()
        assert ranks[0].wait(30) == 0
    finally:
        _ended(ranks)


def test_a_follower_that_cannot_bind_its_metrics_stops_every_rank_with_a_clear_error(tmp_path):
    """Rank 1's metrics port (the address's port + 1) taken: both ranks exit at start, rank 1
    naming the key and the address (it bound after the start barrier: a raw traceback, and rank
    0 served "ok" with every request a 503)."""
    import socket

    config_path = _sharded_serve_config(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1] - 1
        ranks = _serve_ranks(config_path, metrics=f"127.0.0.1:{port}")
        try:
            assert ranks[1].wait(60) == 2 and ranks[0].wait(60) != 0
        finally:
            errors = _ended(ranks)
    want = f"store.metrics.address: rank 1 cannot listen on 127.0.0.1:{port + 1}"
    assert want in errors[1] and "Traceback" not in errors[1], errors[1]
    assert "start (before the first collective round)" in errors[0], errors[0]
    assert "rank 1" in errors[0], errors[0]


def test_a_bad_page_in_a_followers_shard_fails_that_request_only(tmp_path):
    """A page of rank 1's shard fails its checksum: that request is a 503 naming the cause on
    rank 0, counted once (by rank 0; the bad page in rank 1's checksum failures), and once the page is good again the next request is served
    (rank 1 exited, and every request after was a 503, until both ranks were restarted). Rank 1's
    scrubber finds the bad pages, and rank 0's /healthz says so until a pass finds them good (it
    showed rank 0's own tables only)."""
    from tiered_store.serve.client import get_json, post_json

    config_path = _sharded_serve_config(tmp_path, verify_on_start=False, scrub_interval_s=0.2)
    shard = tmp_path / "checkpoint" / "engram_layer1.shard-1-of-2.npy"
    pages = range(read_manifest(shard).data_offset, shard.stat().st_size, 4096)
    original = shard.read_bytes()
    request = {"input_ids": [[5, 17, 99, 1000, 3, 3]]}
    ranks = _serve_ranks(config_path)
    try:
        url, follower_metrics = _started(ranks)
        with open(shard, "r+b") as f:  # a flipped byte in every page of rank 1's rows
            for offset in pages:
                f.seek(offset)
                f.write(bytes([original[offset] ^ 0xFF]))
        status, answer = post_json(url + "/v1/engram", request)
        assert status == 503, answer
        assert answer == {
            "error": "table data unavailable (table engram_layer1: a rank holding part of the "
            "table could not serve its rows)"
        }
        status, health = get_json(url + "/healthz")
        assert status == 503 and "rank 1: rows failed their checksum" in health["problems"][0]
        scrubbed = "table engram_layer1: rank 1's checksum pass failed: "
        assert _healthz_says(url, scrubbed), "rank 1's checksum pass never reached /healthz"
        assert str(tmp_path) not in json.dumps(get_json(url + "/healthz")[1])
        text = urllib.request.urlopen(follower_metrics, timeout=10).read().decode()
        once = 'tiered_store_lookup_failures_total{rank="1",table="engram_layer1"} 0.0'
        assert once in text  # rank 0 counts the lookup: a sum over ranks counts it once
        checksum = 'tiered_store_checksum_failures_total{rank="1",table="engram_layer1"} '
        assert float(text.split(checksum)[1].split()[0]) >= 2  # the lookup's and the scrubber's
        with open(shard, "r+b") as f:  # repaired in place: the rows were never cached
            for offset in pages:
                f.seek(offset)
                f.write(original[offset : offset + 1])
        status, answer = post_json(url + "/v1/engram", request)
        assert status == 200, answer
        assert ranks[1].poll() is None
        assert _healthz_says(url, scrubbed, present=False), "rank 1's later pass never cleared it"
        ranks[0].terminate()
        codes = [ranks[0].wait(30), ranks[1].wait(30)]
    finally:
        errors = _ended(ranks)
    assert codes == [0, 0], (codes, [e[-3000:] for e in errors])  # what a crashed rank said
    assert "table engram_layer1: a lookup failed: " in errors[1], errors[1]
    assert "failed its page checksum" in errors[1]


def test_sigterm_to_every_rank_at_once_drains_the_requests_in_flight(tmp_path):
    """torchrun sends SIGTERM to every rank: the follower serves rank 0's drain until its stop
    (it died at once, and the requests in flight failed)."""
    import threading

    from tiered_store.serve.client import post_json

    ranks = _serve_ranks(_sharded_serve_config(tmp_path, verify_on_start=False))
    answers: list[int | None] = []
    try:
        url, _ = _started(ranks)

        def client() -> None:
            for _ in range(40):
                try:
                    status, _ = post_json(url + "/v1/engram", {"input_ids": [[5, 17, 99, 3]]})
                except OSError:  # refused: the listener closed
                    status = None
                answers.append(status)

        clients = [threading.Thread(target=client) for _ in range(3)]
        for thread in clients:
            thread.start()
        while len(answers) < 6:
            time.sleep(0.01)
        for proc in ranks:
            proc.terminate()
        for thread in clients:
            thread.join(60)
        codes = [ranks[0].wait(60), ranks[1].wait(60)]
    finally:
        errors = _ended(ranks)
    assert codes == [0, 0], (codes, [e[-3000:] for e in errors])  # what a crashed rank said
    assert set(answers) <= {200, None} and answers.count(200) >= 6, (answers, errors)


_SLOW_HOOK = """
import os, time
if os.environ["RANK"] == os.environ["SLOW_RANK"]:  # one rank's first checksum pass, or its close,
    from tiered_store.serve.served_model import ServedModel  # is slow

    def _slow(method):
        def slow(self, *args, **kwargs):  # a pass over a big shard, a warm-restart save
            if not os.path.exists(os.environ["SLOW_MARK"]):
                open(os.environ["SLOW_MARK"], "w").close()
                time.sleep(float(os.environ["SLOW_S"]))
            return method(self, *args, **kwargs)  # verify_tables(names, stop), close()

        return slow

    name = os.environ["SLOW_STEP"]
    setattr(ServedModel, name, _slow(getattr(ServedModel, name)))
"""


def _sigterm_with_a_slow_step(
    tmp_path: Path, rank: int, seconds: float, step: str = "verify_tables"
) -> tuple[list[int], list[str], float]:
    """Both ranks (request_timeout_s 0.5, sharding.timeout_s 1) sent SIGTERM, ``rank``'s
    ``ServedModel.<step>`` taking ``seconds`` the first time: its first checksum pass (every
    0.2 s; the signal once it has begun), or its ``close`` (no checksum passes: the follower
    waits 12.5 s for rank 0's stop). Each rank's exit status and stderr, and the seconds both
    took to exit."""
    scrub = 0.2 if step == "verify_tables" else 0
    config_path = _sharded_serve_config(tmp_path, verify_on_start=False, scrub_interval_s=scrub)
    doc = yaml.safe_load(config_path.read_text())
    doc["server"]["request_timeout_s"] = 0.5
    doc["store"]["sharding"]["timeout_s"] = 1
    config_path.write_text(yaml.safe_dump(doc))
    hook, mark = tmp_path / "hook.py", tmp_path / "slow"
    hook.write_text(_SLOW_HOOK)  # run by the ranks at start
    env = {"SLOW_RANK": str(rank), "SLOW_MARK": str(mark), "SLOW_S": str(seconds)}
    ranks = _serve_ranks(config_path, env={**env, "SLOW_STEP": step}, prelude=hook)
    try:
        _started(ranks)
        deadline = time.monotonic() + 30
        while step == "verify_tables" and not mark.exists():
            assert time.monotonic() < deadline, "the slow pass never began"
            time.sleep(0.05)
        started = time.monotonic()
        for proc in ranks:
            proc.terminate()
        with ThreadPoolExecutor(2) as pool:  # their logs read meanwhile: a full pipe blocks
            errors = list(pool.map(lambda proc: proc.communicate(timeout=90)[1], ranks))
        took = time.monotonic() - started
    finally:
        _ended(ranks)
    assert mark.exists(), "the slow step never ran"
    return [proc.returncode for proc in ranks], errors, took


def test_a_follower_stopped_by_rank_0_finishes_its_close_past_the_stop_grace(tmp_path):
    """The follower's watchdog (for a stop from rank 0 that never comes) stayed armed after the
    stop came: a follower still closing (a warm-restart save, or joining its checksum pass) when
    the grace ran out was ended mid-close with exit status 1, saying no stop came. It now waits
    for a stop only."""
    codes, errors, took = _sigterm_with_a_slow_step(tmp_path, rank=1, seconds=14, step="close")
    assert codes == [0, 0], (codes, took, [e[-3000:] for e in errors])
    assert "no stop from rank 0" not in errors[1], errors[1]
    assert "rank 0 stopped the server" in errors[1], errors[1]
    assert took > 14, took  # the close was slow indeed, past the grace of 12.5 s


_SIGNAL_AS_THE_OPEN_ENDS_HOOK = """
import os, signal
if os.environ["RANK"] == "1":  # torchrun's SIGTERM as the follower's model is open (its stores
    from tiered_store.serve.served_model import ServedModel  # opened, the start barrier passed)

    _open = ServedModel.__init__

    def _open_then_signal(self, *args, **kwargs):
        _open(self, *args, **kwargs)
        signal.raise_signal(signal.SIGTERM)  # before the follower's handlers are installed

    ServedModel.__init__ = _open_then_signal
"""


def test_a_follower_signalled_as_its_model_opened_closes_it(tmp_path):
    """A follower signalled (torchrun's SIGTERM, a Ctrl-C) once its model opened but before its
    stop handlers were installed exited on the KeyboardInterrupt with its model never closed:
    its stores' warm-restart saves were skipped (the next start cold), and their close's waits
    for calls under way too. The model is closed before the follower exits."""
    from tiered_store.distributed.shard_files import shard_path
    from tiered_store.serve import ServeConfig
    from tiered_store.warm_restart import restart_path

    config_path = _sharded_serve_config(tmp_path, verify_on_start=False)
    doc = yaml.safe_load(config_path.read_text())
    doc["store"].setdefault("tiers", {})["restart"] = {"enabled": True}
    config_path.write_text(yaml.safe_dump(doc))
    hook = tmp_path / "hook.py"
    hook.write_text(_SIGNAL_AS_THE_OPEN_ENDS_HOOK)  # run by the ranks at start
    ranks = _serve_ranks(config_path, prelude=hook)
    try:
        follower = ranks[1].communicate(timeout=120)
        ranks[0].terminate()
        ranks[0].communicate(timeout=60)
    finally:
        _ended(ranks)
    assert ranks[1].returncode == 130, (ranks[1].returncode, follower[1][-3000:])
    config = ServeConfig.from_yaml(config_path)
    saved = {
        layer: restart_path(shard_path(config.table_path(layer), 1, 2)).exists()
        for layer in config.model.engram.layer_ids
    }
    assert all(saved.values()), (saved, follower[1][-3000:])


_DEAD_DISK_HOOK = """
import os, threading
if os.environ["RANK"] == "1":  # the follower's shard: a read hung for good as its close begins
    from tiered_store.serve.served_model import ServedModel

    _close_stores = ServedModel._close_stores

    def _hung(self, deadline):
        entered = threading.Event()

        def read():  # a read on a dead disk, in a thread the exit joins (as a pool's worker)
            with next(iter(self.stores.values())).local._file_calls.entered():
                entered.set()
                threading.Event().wait()

        threading.Thread(target=read, name="dead-disk-read").start()
        entered.wait(10)
        return _close_stores(self, deadline)

    ServedModel._close_stores = _hung
"""


def test_a_follower_whose_shard_read_hangs_for_good_exits_past_it(tmp_path):
    """A read hung for good in a follower's shard (a dead disk) as it closes: its sharded
    store's close gave up on it after sharding.timeout_s but said nothing, and the follower's
    exit waited for the read without end (killed by torchrun). It exits past it, as rank 0's
    serve does, saying so."""
    import subprocess

    config_path = _sharded_serve_config(tmp_path, verify_on_start=False)
    doc = yaml.safe_load(config_path.read_text())
    doc["server"]["request_timeout_s"] = 0.5
    doc["store"]["sharding"]["timeout_s"] = 1
    config_path.write_text(yaml.safe_dump(doc))
    hook = tmp_path / "hook.py"
    hook.write_text(_DEAD_DISK_HOOK)  # run by the ranks at start
    ranks = _serve_ranks(config_path, prelude=hook)

    def ended(proc: PythonProcess) -> str:
        try:
            return proc.communicate(timeout=45)[1]
        except subprocess.TimeoutExpired:
            return "still running 45 s after SIGTERM"

    try:
        _started(ranks)
        for proc in ranks:
            proc.terminate()
        with ThreadPoolExecutor(2) as pool:  # their logs read meanwhile: a full pipe blocks
            errors = list(pool.map(ended, ranks))
        codes = [proc.poll() for proc in ranks]
    finally:
        _ended(ranks)
    assert codes == [0, 0], (codes, [e[-3000:] for e in errors])
    assert "exiting with calls to engram_layer" in errors[1], errors[1][-3000:]
    assert "Traceback" not in errors[1], errors[1][-3000:]


_DEAD_DISKS_HOOK = """
import os, sys, threading, time
if os.environ["RANK"] == "1":  # every shard of the follower: a read hung for good as it closes
    from tiered_store.serve.served_model import ServedModel

    _close_stores = ServedModel._close_stores

    def _hung(self, deadline):
        for store in self.stores.values():
            entered = threading.Event()

            def read(store=store, entered=entered):  # a read on a dead disk (a pool's worker)
                with store.local._file_calls.entered():
                    entered.set()
                    threading.Event().wait()

            threading.Thread(target=read, name="dead-disk-read", daemon=True).start()
            entered.wait(10)
        started = time.monotonic()
        try:
            return _close_stores(self, deadline)
        finally:
            print(f"stores closed in {time.monotonic() - started:.1f} s", file=sys.stderr)

    ServedModel._close_stores = _hung
"""


def test_a_follower_s_close_waits_for_its_hung_shards_within_one_timeout(tmp_path):
    """A follower's close passed its sharded stores no wait: each waited its own
    sharding.timeout_s for a read hung in its shard, one table after another, so a follower
    with N tables took N x timeout_s to stop (past torchrun's shutdown timeout, killed). Its
    close waits sharding.timeout_s in all, as rank 0's stop passes its tables one deadline (each
    store 1 s at least)."""
    import re
    import subprocess

    config_path = _sharded_serve_config(tmp_path, verify_on_start=False)
    doc = yaml.safe_load(config_path.read_text())
    doc["server"]["request_timeout_s"] = 0.5
    doc["store"]["sharding"]["timeout_s"] = 8  # far more than CLOSE_GRACE_S: see the bound
    config_path.write_text(yaml.safe_dump(doc))
    hook = tmp_path / "hook.py"
    hook.write_text(_DEAD_DISKS_HOOK)  # run by the ranks at start
    ranks = _serve_ranks(config_path, prelude=hook)

    def ended(proc: PythonProcess) -> str:
        try:
            return proc.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            return "still running 60 s after SIGTERM"

    try:
        _started(ranks)
        for proc in ranks:
            proc.terminate()
        with ThreadPoolExecutor(2) as pool:  # their logs read meanwhile: a full pipe blocks
            errors = list(pool.map(ended, ranks))
        codes = [proc.poll() for proc in ranks]
    finally:
        _ended(ranks)
    assert codes == [0, 0], (codes, [e[-3000:] for e in errors])
    took = re.search(r"stores closed in ([0-9.]+) s", errors[1])
    assert took is not None, errors[1][-3000:]
    # two tables: 8 s for the first, 1 s (CLOSE_GRACE_S) for the second, about 9 s; each its
    # own 8 s before, 16 s at least (timed waits for reads that never end): 13 s leaves a loaded
    # machine 4 s of delays, and a close that waits its timeout twice fails still
    assert float(took.group(1)) < 13.0, errors[1][-3000:]


def test_a_follower_serves_until_rank_0s_stop_while_rank_0_waits_for_its_checksum_pass(tmp_path):
    """Rank 0's stop waits up to 30 s for a checksum pass under way before its STOP, which the
    follower's watchdog did not count (3 x request_timeout_s + sharding.timeout_s + 10 s): a
    pass over a big shard on rank 0 at SIGTERM, and the follower exited 1 before the stop came
    (rank 0's answers still computing then, which need its shards, could not be served). The
    watchdog now waits as long as rank 0's own stop may take, derived from the same settings."""
    codes, errors, took = _sigterm_with_a_slow_step(tmp_path, rank=0, seconds=14)
    assert codes == [0, 0], (codes, took, [e[-3000:] for e in errors])
    assert "no stop from rank 0" not in errors[1], errors[1]
    assert "rank 0 stopped the server" in errors[1], errors[1]
    assert "could not tell the other ranks to stop" not in errors[0], errors[0]


def test_one_rank_misusing_a_collective_is_refused_and_the_ranks_stay_in_step(tmp_path):
    """Float ids, a step that is not a number, gradients of two widths or two steps, a handle
    prefetched before a write: refused, named, on the ranks the round concerns; a lookup after
    each meets the same round on both ranks (before, the ranks fell out of step, and a later
    round aborted a rank, or rows were updated with spliced gradients)."""
    from tests.distributed_support import misuse_worker

    codes, results = _two_ranks_over_plain_shards(tmp_path, misuse_worker, 120)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    steps = [dict(r["steps"][0::2]) for r in results]  # name -> outcome, per rank
    assert all(step == ["in step", results[0]["steps"][1][1]] for step in results[1]["steps"][1::2])
    assert steps[0]["float ids"] == "ok"
    assert steps[1]["float ids"].startswith("RowIdError: ids: dtype torch.float32; expected an")
    assert steps[1]["commit step"] == "ConfigError: commit: step 'two'; expected an integer step (or None)"  # fmt: skip
    assert steps[0]["commit step"] == (
        "StepMismatchError: rank 0: commit: ranks passed different steps (rank 0: None; rank 1: "
        "'two' (refused)); expected the same step on every rank (or None on all); nothing was "
        "committed on any shard"
    )
    for rank in (0, 1):  # every rank refuses the whole round, naming rank 1
        assert "rank 1: gradients of width 3 and step None; rank 0 sent width 2, rank 0 step None" in steps[rank]["grad widths"]  # fmt: skip
        assert "rank 1: gradients of width 2 and step 5; rank 0 sent width 2, rank 0 step 1" in steps[rank]["steps"]  # fmt: skip
    assert steps[0]["stale handle"].startswith("PrefetchHandleError: lookup: this handle was prefetched before a write")  # fmt: skip
    assert steps[1]["stale handle"] == "ok"
    # [3, 0] gradients: refused on rank 0, never spliced onto rows (the owner got 8 values of 1);
    # an update refused on one rank is refused on every rank (applied on the others, the ranks'
    # optimizer steps came apart)
    assert steps[0]["zero width"] == "RowDataError: grads: torch.float32 of shape (3, 0); expected floating-point [3, width], one row per id, width >= 1"  # fmt: skip
    assert steps[1]["zero width"] == "StepMismatchError: rank 1: update_rows: rank 0: its gradients or step were refused there (see its own error); nothing was updated on any shard"  # fmt: skip
    assert results[0]["zero width seen"] == results[1]["zero width seen"] == []


def test_a_shard_failing_to_open_with_an_error_of_torchs_is_named_by_every_rank(tmp_path):
    from tests.distributed_support import failed_open_worker

    codes, results = _two_ranks_over_plain_shards(tmp_path, failed_open_worker, 120)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for result in results:  # not a silent rank 1 found by the timeout: its own error, everywhere
        assert result["open"].startswith("ShardMismatchError: rank 1: cannot open its shard"), (
            result
        )
        assert "OutOfMemoryError: CUDA out of memory (the test's)" in result["open"]
    assert results[0]["rows"] == results[1]["rows"] and len(results[0]["rows"]) == 2


@pytest.mark.slow
def test_a_rank_whose_shard_open_hangs_is_named_by_the_others(tmp_path):
    from tests.distributed_support import hung_open_worker

    codes, results = _two_ranks_over_plain_shards(tmp_path, hung_open_worker, 90)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    # alive and beating, in no round yet: neither silent nor behind ("no rank was found")
    assert results[0]["open"].startswith(
        "RankFailureError: rank 0: open (before the first collective round) failed: "
    ), results
    assert "rank 1 has not finished its own shard's part of the open" in results[0]["open"]
    assert results[1]["open"].startswith(
        "RankFailureError: rank 1: open (before the first collective round) failed: "
    ), results


@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_that_never_opens_the_store_is_named_by_the_others(tmp_path, world):
    """Over the default group, a rank that never opened the store (died or busy before its open)
    left the others torch's "DistStoreError: wait timeout after 4000ms, keys: /default_pg/0//1//
    cpu//0/1" from making the store's subgroup, naming no rank. Two such ranks were named as
    one ("rank 1, 2 has not come ... no heartbeat from it")."""
    from tests.distributed_support import absent_rank_open_worker, make_plain_table

    plain = make_plain_table(tmp_path)
    _shard_all({"plain": plain}, world)
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(absent_rank_open_worker, world, (str(plain), out), 90)
    results = _results(out, world)
    assert codes == [0] * world and not any("crash" in r for r in results), results
    # named once the open's heartbeats show it never came, not as a rank that "stopped" (it
    # never beat) after torch's own wait and three more beats
    said = (
        ("rank 1 has", "it", "it has", "it")
        if world == 2
        else ("ranks 1, 2 have", "them", "they have", "them")
    )
    assert results[0]["open"] == (
        f"RankFailureError: rank 0: open (before the first collective round) failed: {said[0]} not come to this store's open: no "
        f"heartbeat from {said[1]} under the open's keys within sharding.timeout_s=4 ({said[2]} "
        "not called ShardedStore.open: busy elsewhere, or died before)"
    ), results
    assert [m for m in results[0]["logged"] if "not yet at" in m] == [
        f"rank 0: {said[0].rsplit(' ', 1)[0]} not yet at this store's open after 2.9 s; waiting "
        f"for {said[3]} up to sharding.timeout_s=4"
    ], results


def test_a_rank_behind_in_a_round_other_than_a_lookup_is_not_said_to_skip_lookups():
    """A rank that did not call commit() (or a write, a training step) while the others did was
    said to have "entered only 4 collective lookup(s): it is not calling lookup/prefetch as
    often as the others", sending its user to look for a missing lookup. Every kind of round
    counts, and the round this rank is in is named. That was said as "only 4 collective
    round(s), this rank more (it is in a commit): it is not calling ...", where the first "it"
    was this rank and the second rank 1: read as rank 1 in a commit."""
    from tiered_store.distributed.liveness import Diagnosis

    assert Diagnosis(behind=((1, 4),), kind="commit").describe(0.6) == (
        "rank 1 is alive but has entered only 4 collective round(s), fewer than this rank, which "
        "is in a commit: rank 1 is not calling lookup/prefetch, write, commit and training steps "
        "as often as the others"
    )
    assert Diagnosis(behind=((2, 0),)).describe(0.6) == (
        "rank 2 is alive but has entered only 0 collective round(s), fewer than this rank: rank 2 "
        "is not calling lookup/prefetch, write, commit and training steps as often as the others"
    )


def test_ranks_that_stopped_or_closed_their_stores_are_named_in_the_plural():
    """A diagnosis named two silent ranks "rank 1, 2 stopped" and two that closed their stores
    "rank 3, 4 closed its store"."""
    from tiered_store.distributed.liveness import Diagnosis

    assert Diagnosis(silent=(1, 2), closed=(3, 4)).describe(0.6) == (
        "ranks 1, 2 stopped: no heartbeat for 0.6 s (died or hung); ranks 3, 4 closed their stores"
    )
    assert Diagnosis(silent=(1,), closed=(3,)).describe(0.6) == (
        "rank 1 stopped: no heartbeat for 0.6 s (died or hung); rank 3 closed its store"
    )


def test_a_rank_that_comes_late_to_the_open_but_within_the_timeout_is_not_refused(tmp_path):
    """Rank 1 came to the store's open 19.5 s after rank 0 (busy loading a model, say), within
    sharding.timeout_s=24, as torch's new_group allowed: rank 0's open refused it as a rank
    that "has not come" once a round's wait (17.9 s) had passed, and so did rank 1's, waiting
    for rank 0 in new_group. Each rank waits sharding.timeout_s for the others' opening
    heartbeats (a log line names those not come after a round's wait), so both open."""
    from tests.distributed_support import late_rank_open_worker

    codes, results = _two_ranks_over_plain_shards(tmp_path, late_rank_open_worker, 90)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    assert [r["open"] for r in results] == ["ok", "ok"], results


def test_a_failed_open_leaves_no_closed_mark_that_a_later_open_reads(tmp_path):
    """A failed open marked its opening heartbeat closed under keys of the group's ranks, which a
    later open over them read: a rank that never came to it was named as one that "closed its
    store", not as one that stopped."""
    from tests.distributed_support import absent_after_failed_open_worker

    codes, results = _two_ranks_over_plain_shards(tmp_path, absent_after_failed_open_worker, 90)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    assert all(r["first"].startswith("ShardMismatchError: rank 0: ") for r in results), results
    assert results[0]["open"].startswith(
        "RankFailureError: rank 0: open (before the first collective round) failed: "
    ), results
    assert "rank 1 stopped: no heartbeat for" in results[0]["open"], results
    assert "closed its store" not in results[0]["open"], results


def test_an_open_failing_as_its_heartbeat_starts_leaves_no_subgroup_or_thread(tmp_path):
    from tests.distributed_support import failed_heartbeat_worker

    codes, results = _two_ranks_over_plain_shards(tmp_path, failed_heartbeat_worker, 120)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for result in results:  # the store's own subgroup and collective thread went with it
        assert result["open"] == ("DistStoreError: Timeout waiting for the store (the test's)"), (
            result
        )
        assert result["groups left"] == 0 and result["threads left"] == [], result
    assert results[0]["rows"] == results[1]["rows"] and len(results[0]["rows"]) == 2


def test_a_group_without_this_rank_or_not_a_group_is_refused_naming_it(tmp_path):
    """``group=`` that this process is not a member of (``new_group`` returns a marker to the
    ranks outside it) or that is not a process group failed in torch: "ValueError: Invalid
    process group specified"."""
    from tests.distributed_support import foreign_group_worker

    codes, results = _two_ranks_over_plain_shards(tmp_path, foreign_group_worker, 60)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    assert results[1]["not a member"].startswith(
        "ConfigError: group: this process (rank 1 of the default group) is not one of its ranks"
    ), results[1]
    assert results[1]["a list"].startswith(
        "ConfigError: group: got list [0, 1]; expected a torch.distributed ProcessGroup"
    ), results[1]


def test_a_lookup_a_shard_failed_is_counted_as_a_round_whose_ids_crossed_and_rows_did_not(
    tmp_path,
):
    """A round ended by a shard that could not serve its rows was left out of the exchange
    counters on every rank (tiered_store_exchange_rounds_total one short of the rounds the ranks
    joined, its ids never counted though they crossed); it counts now, without rows."""
    from tests.distributed_support import failed_round_counts_worker

    codes, results = _two_ranks_over_plain_shards(tmp_path, failed_round_counts_worker, 60)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    assert [r["error"] for r in results] == ["ShardReadError", "TierIOError"]
    for result in results:  # 2 of the 4 ids of each round are the other rank's
        ex, row_bytes = result["exchange"], 8 * 2
        assert ex["lookups"] == result["entered"] == 2
        assert (ex["ids"], ex["unique_ids"], ex["ids_sent"]) == (8, 8, 4)
        assert ex["rows_served"] == 2  # the first round's only
        assert ex["bytes_sent"] == ex["bytes_received"] == 2 * 8 + 4 * 8 + 2 * row_bytes


def test_a_sharded_stores_lookup_stats_time_its_lookups_not_its_shards_share_of_them(tmp_path):
    """stats()["lookup"] was the shard's own TieredStore's: the time it spent serving each round's
    rows, without the exchange or the wait for the other ranks, so a rank whose lookup waited a
    second for another said it spent milliseconds (and the Engram pipeline's lookup seconds over
    sharded tables, which it sums, came out below its prefetch stall)."""
    from tests.distributed_support import lookup_seconds_worker

    codes, results = _two_ranks_over_plain_shards(tmp_path, lookup_seconds_worker, 60)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    waited = results[0]
    assert waited["seconds"][1] > 0.5  # rank 0 waited for rank 1 (a second, less its lead)
    assert waited["lookup"]["calls"] == 2
    assert waited["lookup"]["seconds_total"] == pytest.approx(sum(waited["seconds"]), abs=0.05)


def _on_two_trainable_row_shards(tmp_path, worker, *args) -> list[dict]:
    """``worker(rank, world, port, trainable, out, *args)`` on 2 ranks over a trainable table cut
    into row shards; every rank's result (each rank exited 0 and none crashed)."""
    from tests.distributed_support import make_trainable

    trainable = make_trainable(tmp_path / "trainable.npy")
    write_shards(trainable, 2, "rows", template=shards_template(trainable, "rows"), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(worker, 2, (str(trainable), out, *args), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    return results


def test_a_training_step_refused_on_one_rank_is_refused_on_all_and_keeps_the_gradients(tmp_path):
    """Rank 1 repeats the last step: it raises its ConfigError, the others StepMismatchError
    naming it, at once (before, rank 1 raised before joining the round: the others waited out
    the timeout and the group failed). A step the ranks disagree on keeps every rank's gradients
    (they were dropped: the agreeing retry updated no row)."""
    from tests.distributed_support import training_misuse_worker

    results = _on_two_trainable_row_shards(tmp_path, training_misuse_worker)
    assert results[1]["repeated"] == "ConfigError: step: 1; expected more than the last step, 1 (each optimizer step is applied once)"  # fmt: skip
    assert results[0]["repeated"].startswith("StepMismatchError: rank 0: update_rows: rank 1: its gradients or step were refused there (see its own error)")  # fmt: skip
    for rank, result in enumerate(results):
        assert result["differ"].startswith(f"StepMismatchError: rank {rank}: update_rows: rank 1: gradients of width 4 and step 4; rank 0 sent width 4, rank 0 step 3")  # fmt: skip
        assert result["differ"].endswith("nothing was updated on any shard")
        assert result["first"] == result["repeated retried"] == result["differ retried"] == 1


def test_ranks_passing_different_optimizer_steps_are_refused_and_keep_their_gradients(tmp_path):
    """step(3, optimizer_step=2) on rank 0 and optimizer_step=1 on rank 1: each owner applied
    its own rank's count to the rows it holds, so the two shards' rows took different Adam bias
    corrections, silently (the round checked step alone); every rank raises StepMismatchError
    naming both counts, no row changes, and the agreed retry applies the gradients kept (Adam's
    first step: each weight moves by lr, the summed gradient 2 on every row)."""
    from tests.distributed_support import optimizer_step_mismatch_worker

    results = _on_two_trainable_row_shards(tmp_path, optimizer_step_mismatch_worker)
    for rank, result in enumerate(results):
        assert result["differ"].startswith(f"StepMismatchError: rank {rank}: update_rows: rank 1: gradients of width 4 and step 3 (optimizer_step 1); rank 0 sent width 4, rank 0 step 3 (optimizer_step 2)")  # fmt: skip
        assert result["unchanged"] and result["retried"] == 1
        assert np.allclose(result["moved"], -0.05, atol=1e-6)


def test_a_commit_decided_though_a_shard_failed_is_where_the_next_step_goes_on(tmp_path):
    """commit(3) after step(1) whose second phase failed on rank 1's shard is decided (step 3 on
    every rank, the shard finishes it later), yet the TrainableTable took step(2) next: Adam's
    bias correction of step 2 over state that a reopened table goes on from at step 3. The
    decided step is where the next step goes on, on every rank, as after a commit that passed."""
    from tests.distributed_support import decided_commit_worker

    results = _on_two_trainable_row_shards(tmp_path, decided_commit_worker)
    for result in results:
        assert "(its second phase) failed" in result["commit"], result
        assert "so step 3 is committed" in result["commit"], result
        assert result["commit committed_step"] == 3
        assert str(result["step 2"]).startswith("ConfigError: step: 2; expected more than the last step, 3"), result  # fmt: skip
        assert result["step 4"] == 1 and result["commit again"] == 4, result
        assert result["commit again committed_step"] == 4


def test_a_training_step_whose_write_failed_on_a_shard_says_where_it_applied(tmp_path):
    """update_rows failing as a shard wrote (after every rank accepted the rows) raised what a
    write round does, "the next commit() makes what the shards hold durable": a step applied on
    rank 0's shard and lost on rank 1's, the gradients dropped, and lookups, steps and a commit
    went on over shards a step apart, in silence. Now the error names the ranks whose shards hold
    the step and those whose shards do not (a failed shard's write looked up); when the shards
    are a step apart the store refuses every further call, naming them, until it is reopened
    (every shard at its last commit); when no shard wrote, the step is refused and the gradients
    kept; when every shard holds it, the store goes on."""
    from tests.distributed_support import failed_update_write_worker

    results = _on_two_trainable_row_shards(tmp_path, failed_update_write_worker)
    for rank, result in enumerate(results):
        assert result["both"].startswith(f"UpdateRefusedError: [Errno 5] rank {rank}: sharded update_rows failed on 2 of 2 rank(s): rank 0: OSError: no space left on device (the test's); rank 1: OSError"), result  # fmt: skip
        assert result["both"].endswith("no shard holds the step (a failed shard's write applies whole or not at all, and none applied): nothing was updated on any shard; step again with the gradients kept"), result  # fmt: skip
        assert result["retried"] == 1 and result["retried commit"] == 1, result
        assert result["applied"] == 1, result  # the step is made on every shard
        assert [w for w in result["applied warned"] if "update_rows" in w] == ([f"rank {rank}: sharded update_rows: a shard's write raised after it applied (rank 1: OSError: no space left on device (the test's)); every shard holds the step: the next commit makes it durable"]), result  # fmt: skip
        assert result["applied commit"] == 2, result
        assert result["lost"].startswith(f"TierIOError: [Errno 5] rank {rank}: sharded update_rows failed on 1 of 2 rank(s): rank 1: OSError"), result  # fmt: skip
        assert "the step applied on the shards of rank 0 and not on those of rank 1" in result["lost"], result  # fmt: skip
        assert result["lost lookup"].startswith(f"TierIOError: [Errno 5] rank {rank}: this sharded store refuses further calls: an update_rows round: the step applied on the shards of rank 0 and not on those of rank 1, so the shards are a step apart"), result  # fmt: skip
        assert "close every rank's store without committing and reopen it" in result["lost lookup"]
        assert "lost commit" not in result, result  # refused too
        assert result["reopened"] == result["applied lookup"], result  # step 2's rows
        assert result["reopened step"] == 2, result


def test_shards_whose_failed_update_writes_cannot_be_looked_up_are_named_in_the_plural(tmp_path):
    """Both shards' writes of a training step failed and so did the lookups of their rows after
    them: the store refused further calls saying "(ranks 0, 1: partly, or its lookup failed)",
    and "so the shards are a step apart", though no shard was known to hold the step: they may
    be."""
    from tests.distributed_support import unknown_update_write_worker

    results = _on_two_trainable_row_shards(tmp_path, unknown_update_write_worker)
    for rank, result in enumerate(results):
        assert result["step"].startswith(f"TierIOError: [Errno 5] rank {rank}: sharded update_rows failed on 2 of 2 rank(s): rank 0: OSError: no space left on device (the test's); rank 1: OSError"), result  # fmt: skip
        assert "the step applied on the shards of no rank and not on those of ranks 0, 1 (ranks 0, 1: partly, or their lookups failed): no retry" in result["step"], result  # fmt: skip
        # no shard is known to hold the step and none known not to: maybe apart, not "are"
        assert "(ranks 0, 1: partly, or their lookups failed), so the shards may be a step apart; expected every shard at one step" in result["lookup"], result  # fmt: skip


def test_a_rank_interrupted_during_a_torn_update_round_refuses_further_calls_too(tmp_path):
    """Rank 0, interrupted (Ctrl-C) while it waited for an update round that applied on its
    shard and not on rank 1's, never recorded the shards a step apart: rank 1 refused every
    further call, rank 0 went on (its next lookup waited for rank 1 and failed naming it). The
    round itself records it, so rank 0 refuses further calls as rank 1 does."""
    from tests.distributed_support import interrupted_update_worker

    results = _on_two_trainable_row_shards(tmp_path, interrupted_update_worker)
    assert results[0]["step"] == "KeyboardInterrupt: ", results
    assert results[1]["step"].startswith("TierIOError: [Errno 5] rank 1: sharded update_rows failed on 1 of 2 rank(s): rank 1: OSError"), results  # fmt: skip
    for rank, result in enumerate(results):
        assert result["lookup"].startswith(f"TierIOError: [Errno 5] rank {rank}: this sharded store refuses further calls: an update_rows round: the step applied on the shards of rank 0 and not on those of rank 1"), results  # fmt: skip


def test_a_call_an_interrupted_rank_makes_before_its_torn_update_round_ends_is_refused(tmp_path):
    """Rank 0, interrupted (Ctrl-C) while it waited for an update round that applied on its
    shard and not on rank 1's, looked up at once: its lookup, queued before the round ended
    (and recorded the shards a step apart), ran as a collective that rank 1 (refusing every
    call) never joined, and failed after the timeout as a RankFailureError naming rank 1 as
    one that "has entered only" fewer rounds. It is refused as on rank 1."""
    from tests.distributed_support import interrupted_update_then_lookup_worker

    results = _on_two_trainable_row_shards(tmp_path, interrupted_update_then_lookup_worker)
    assert results[0]["step"] == "KeyboardInterrupt: ", results
    for rank, result in enumerate(results):
        assert result["lookup"].startswith(f"TierIOError: [Errno 5] rank {rank}: this sharded store refuses further calls: an update_rows round: the step applied on the shards of rank 0 and not on those of rank 1"), results  # fmt: skip


def test_a_shard_the_step_leaves_as_it_was_is_not_read_as_one_that_took_it(tmp_path):
    """A row with a zero gradient under fresh Adam state is the same after the step: a shard
    holding only such rows holds the step and the row before alike. It was read as one that
    took the step (written, or its failed write looked up), so rank 1's lost write left the
    store refusing every call, "the shards a step apart", the gradients dropped, when no shard
    differed from before. Such a shard counts for neither: the step is refused on every rank
    with the gradients kept, and the retry applies it. Its failed write beside a shard that
    wrote was warned of as one that "raised after it applied"; it says the step left it as it
    was."""
    from tests.distributed_support import unchanged_shard_update_worker

    results = _on_two_trainable_row_shards(tmp_path, unchanged_shard_update_worker)
    for rank, result in enumerate(results):
        for name, failed in (("rank 1 failed", "1 of 2"), ("both failed", "2 of 2")):
            assert result[name].startswith(f"UpdateRefusedError: [Errno 5] rank {rank}: sharded update_rows failed on {failed} rank(s)"), result  # fmt: skip
            assert result[name].endswith("step again with the gradients kept"), result
            assert isinstance(result[f"{name} lookup"], list), result  # the store goes on
        assert result["none"] == 1, result  # the gradients kept: rank 1's row steps
        assert result["none lookup"][0] == result["both failed lookup"][0], result
        assert result["none lookup"][1] != result["both failed lookup"][1], result
        # rank 0's write failed where its rows stay as they were: no "raised after it applied"
        assert result["rank 0 failed"] == 1, result  # the step is made on every shard
        assert [w for w in result["rank 0 failed warned"] if "update_rows" in w] == [f"rank {rank}: sharded update_rows: a shard's write raised where the step left it as it was (rank 0: OSError: no space left on device (the test's)); every shard holds the step: the next commit makes it durable"], result  # fmt: skip
        assert result["rank 0 failed lookup"][0] == result["none lookup"][0], result
        assert result["rank 0 failed lookup"][1] != result["none lookup"][1], result


def test_a_non_finite_gradient_on_one_rank_is_refused_on_all_before_any_shard_steps(tmp_path):
    """Rank 0's NaN gradient of a row on rank 1's shard: rank 1's write failed, rank 0's shard
    applied the optimizer step to its rows, and every rank dropped its gradients: the shards came
    apart by one step. It is refused before the round now (RowDataError naming the row there,
    StepMismatchError elsewhere): no shard changes, the other ranks keep their gradients."""
    from tests.distributed_support import nonfinite_gradient_worker

    results = _on_two_trainable_row_shards(tmp_path, nonfinite_gradient_worker)
    assert results[0]["nan"].startswith("RowDataError: grads: the gradient of row 95 holds a non-finite value (nan)")  # fmt: skip
    assert results[1]["nan"].startswith("StepMismatchError: rank 1: update_rows: rank 0: its gradients or step were refused there")  # fmt: skip
    assert [r["unchanged"] for r in results] == [True, True]
    assert [r["retried"] for r in results] == [1, 1]  # rank 1's row, on rank 1's gradient


def test_a_step_whose_gradients_overflowed_on_one_rank_is_skipped_on_every_rank(tmp_path):
    """Under a GradScaler, rank 0's gradients overflowed: every rank skips the step (no shard
    changes, last_step stays) and every rank's scaler records the overflow, so their scales stay
    equal; the next step applies on both. Both ranks look up both rows, so each row's summed
    gradient is 2 and Adam's first step moves every weight by lr."""
    from tests.distributed_support import overflowed_step_worker

    results = _on_two_trainable_row_shards(tmp_path, overflowed_step_worker)
    for result in results:
        assert result["skipped"] == 0 and result["unchanged"]
        assert result["after skip"] == [1, 0]
        assert result["scale after skip"] == 2.0**9
        assert result["after step"] == [1, 1, 2.0**9]
        assert np.allclose(result["moved"], -0.05, atol=1e-6)
    assert [r["applied"] for r in results] == [1, 1]


def test_a_refused_step_whose_gradients_overflowed_on_one_rank_leaves_the_scales_equal(tmp_path):
    """Rank 0's row gradients overflowed and rank 1 refused its step number: rank 0's scaler had
    recorded the overflow before the ranks agreed, so abandoning the iteration halved its scale
    alone and the ranks' scales came apart. An overflow is recorded once the step is skipped on
    every rank: both keep their scale, and the next step applies on both."""
    from tests.distributed_support import abandoned_overflowed_step_worker

    results = _on_two_trainable_row_shards(tmp_path, abandoned_overflowed_step_worker)
    assert [r["refused"] for r in results] == ["StepMismatchError", "ConfigError"], results
    assert [r["scale after abandoning"] for r in results] == [2.0**10, 2.0**10]
    assert [r["applied"] for r in results] == [1, 1]
    assert [r["scale after step"] for r in results] == [2.0**10, 2.0**10]


def test_an_optimizer_update_overflowing_on_one_shard_is_refused_on_all_before_any_writes(
    tmp_path,
):
    """Rank 0's finite but huge gradient (1e30) of a row on rank 1's shard overflows Adam's state
    there: rank 1's write failed ("rows: row 0 holds a non-finite value"), rank 0's shard applied
    its rows, every rank dropped its gradients, and the shards came a step apart. Every shard's
    update is checked before any is written now: no shard changes, the error names the row id,
    and the ranks keep their gradients (as for a refused step)."""
    from tests.distributed_support import nonfinite_gradient_worker

    results = _on_two_trainable_row_shards(tmp_path, nonfinite_gradient_worker, 1e30)
    for rank, result in enumerate(results):
        assert result["nan"].startswith(f"RowDataError: rank {rank}: update_rows: rank 1: RowDataError: the update of row 95 is not finite")  # fmt: skip
        assert result["nan"].endswith("nothing was updated on any shard")
    assert [r["unchanged"] for r in results] == [True, True]
    assert [r["retried"] for r in results] == [1, 1]  # rank 1's row, on rank 1's gradient


@pytest.mark.parametrize(
    ("squared", "scaled"),
    [(False, False), (True, False), (True, True)],
    ids=["sum", "squared", "fp16"],
)
def test_a_step_over_a_stored_row_that_is_not_finite_on_a_shard_names_the_row(
    tmp_path, squared, scaled
):
    """A row on rank 1's shard holding a NaN as stored (a delta an older, unchecked writer left):
    a step with finite gradients blamed them ("its weights or optimizer state overflow float32:
    a gradient too large"); and where its NaN, looked up, made every gradient NaN (squared: as
    a model's loss does), each rank blamed its own NaN gradients ("grads: the gradient of row 1
    holds a non-finite value"), and under a GradScaler (scaled) every rank skipped the step as
    an overflow, as it would every step after, no shard reading its rows. It names the row as
    stored, where its NaN is, on every rank, and no shard changes (as the unsharded step does)."""
    from tests.distributed_support import make_trainable, stored_nan_step_worker
    from tiered_store.delta.row_delta import RowDelta, delta_path

    trainable = make_trainable(tmp_path / "trainable.npy")
    template = shards_template(trainable, "rows")
    shards = write_shards(trainable, 2, "rows", template=template, progress=False)
    width = shards[1].manifest.row_bytes // 4
    stored = np.ones((1, width), np.float32)
    for shard in shards:  # both at step 1 (as a sharded commit leaves them), rank 1's row a NaN
        stored[0, 2] = np.nan if shard.rank == 1 else 1.0  # a weight
        delta = RowDelta(delta_path(shard.path), 4 * width, create=True)
        local = 95 - shard.shard_map.bounds[1] if shard.rank == 1 else 1
        delta.commit(np.array([local]), stored.view(np.uint8), 1)  # as an unchecked writer left
        delta.close()
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(stored_nan_step_worker, 2, (str(trainable), out, squared, scaled), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for rank, result in enumerate(results):
        assert result.get("nan", "").startswith(f"RowDataError: rank {rank}: update_rows: rank 1: RowDataError: row 95 as stored holds a non-finite value (nan) in its weights; expected finite stored rows"), result  # fmt: skip
        assert result["unchanged"] and result["steps"] == [0, 1], result


def test_a_step_one_rank_skips_for_its_dense_overflow_is_skipped_on_every_rank(tmp_path):
    """Rank 0 skips step 1 (skip(), its dense gradients overflowed) while rank 1 steps: rank 1
    waited in the update round until the timeout failed the store on every rank. skip() joins
    the round: rank 1's step is skipped too (no row changes, last_step stays), and the next
    step applies on both."""
    from tests.distributed_support import skipping_rank_worker

    results = _on_two_trainable_row_shards(tmp_path, skipping_rank_worker)
    assert [r["first"] for r in results] == [None, 0], results
    assert [r["unchanged"] for r in results] == [True, True]
    assert [r["after skip"] for r in results] == [[0, 0], [1, 0]]
    assert [r["applied"] for r in results] == [1, 1]
    assert [r["after step"] for r in results] == [[0, 1], [1, 1]]


@pytest.mark.parametrize("skipping", [(0, 1), (0,)], ids=["every-rank", "rank-0"])
def test_a_skip_over_a_stored_row_that_is_not_finite_names_it_and_a_rank_stepping_is_not_kept_waiting(
    tmp_path, skipping
):
    """A row on rank 1's shard holds a NaN as stored. Over a ShardedStore, skip() only dropped
    the gradients: a loop skipping for its dense overflow never had the row named (its NaN
    overflows every step), and a rank stepping while rank 0 skipped waited in the update round
    until the timeout failed the store. skip() joins the round as a skipped step: the row is
    named on every rank, none changes, and every rank keeps its gradients."""
    from tests.distributed_support import make_trainable, stored_nan_step_worker
    from tiered_store.delta.row_delta import RowDelta, delta_path

    trainable = make_trainable(tmp_path / "trainable.npy")
    template = shards_template(trainable, "rows")
    shards = write_shards(trainable, 2, "rows", template=template, progress=False)
    width = shards[1].manifest.row_bytes // 4
    stored = np.ones((1, width), np.float32)
    for shard in shards:  # both at step 1, rank 1's row a NaN
        stored[0, 2] = np.nan if shard.rank == 1 else 1.0
        delta = RowDelta(delta_path(shard.path), 4 * width, create=True)
        local = 95 - shard.shard_map.bounds[1] if shard.rank == 1 else 1
        delta.commit(np.array([local]), stored.view(np.uint8), 1)
        delta.close()
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(stored_nan_step_worker, 2, (str(trainable), out, False, False, skipping), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for rank, result in enumerate(results):
        assert result.get("nan", "").startswith(f"RowDataError: rank {rank}: update_rows: rank 1: RowDataError: row 95 as stored holds a non-finite value (nan) in its weights; expected finite stored rows"), result  # fmt: skip
        assert result["unchanged"] and result["steps"] == [0, 1], result


def test_a_shard_that_cannot_read_its_rows_for_a_step_leaves_every_rank_its_gradients(
    tmp_path,
):
    """Rank 1's shard could not read its rows for the step (its file cut short): the round
    stopped before any shard wrote, 'nothing was updated on any shard', yet every rank dropped
    its gradients (as when a shard failed its write after the others wrote theirs), so the step
    retried once the shard read again updated nothing. They are kept now."""
    from tests.distributed_support import unreadable_shard_step_worker

    results = _on_two_trainable_row_shards(tmp_path, unreadable_shard_step_worker)
    assert [r["retried"] for r in results] == [1, 1]  # each shard's row, on the kept gradients
    for result in results:
        assert result["failed is TierIOError"] is True  # as before
        assert result["failed"].startswith("UpdateRefusedError: [Errno 5] rank "), result["failed"]
        assert "rank 1: TierIOError: table " in result["failed"], result["failed"]
        assert result["failed"].endswith("nothing was updated on any shard"), result["failed"]


def test_shards_opened_at_different_steps_warn_report_the_oldest_and_take_the_redone_step(
    tmp_path,
):
    """A commit that reached rank 1's shard only (rank 0 killed inside its commit): reopening
    warned of nothing, each rank reported its own step and lookups mixed two steps. Now
    every rank warns, naming each shard's step, reports the oldest; the step redone on every
    rank commits (on the shard already at it too), and the table opens whole again."""

    plain = make_plain_table(tmp_path)
    shards = write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    start = shards[1].shard_map.shard_range(1)[0]
    for shard, row, steps in ((shards[0], 3, 1), (shards[1], 460 - start, 2)):  # 2: rank 1 only
        with TieredStore.open({"table": {"path": str(shard.path)}}) as store:
            for value in range(1, steps + 1):
                store.write([row], torch.full((1, store.row_width), float(value)))
                store.commit()
    out = tmp_path / "out"
    out.mkdir()
    _check_torn_commit_is_found_and_redone(plain, out)


def test_a_rank_interrupted_in_a_commit_over_torn_shards_reports_the_committed_step(tmp_path):
    """Over shards a torn commit left at steps 1 and 2, rank 0 interrupted (Ctrl-C) in the
    commit of the redone step 2, after every shard staged it: the round committed it on every
    shard, yet rank 0 went on reporting committed_step 1 (the oldest torn step, forgotten only
    by a caller that returned) where rank 1 reported 2. The round forgets it."""
    from tests.distributed_support import interrupted_commit_over_torn_shards_worker

    plain = make_plain_table(tmp_path)
    shards = write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    start = shards[1].shard_map.shard_range(1)[0]
    for shard, row, steps in ((shards[0], 3, 1), (shards[1], 460 - start, 2)):  # 2: rank 1 only
        with TieredStore.open({"table": {"path": str(shard.path)}}) as store:
            for value in range(1, steps + 1):
                store.write([row], torch.full((1, store.row_width), float(value)))
                store.commit()
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(interrupted_commit_over_torn_shards_worker, 2, (str(plain), out), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    assert [r["torn step"] for r in results] == [1, 1], results
    assert [r["commit"] for r in results] == ["KeyboardInterrupt: ", 2], results
    assert [r["step"] for r in results] == [2, 2], results


def _mixed_shard_set(table: Path, template: str) -> list[Path]:
    """The shards a `shard --overwrite` of ``table`` killed after its first rename leaves over
    shards of the same table cut by an earlier run and trained to step 2 on rank 1: rank 0's new
    (step 0), rank 1's old (step 2)."""
    from tiered_store.table_format import replace_table

    old = write_shards(table, 2, "rows", template=template, progress=False)
    with TieredStore.open({"table": {"path": str(old[1].path)}}) as store:
        for value in (1.0, 2.0):
            store.write([0], torch.full((1, store.row_width), value))
            store.commit()
    hidden = template.replace("{rank}", "new-{rank}")
    new = write_shards(table, 2, "rows", template=hidden, progress=False)
    replace_table(new[0].path, old[0].path, True)  # the run's first rename, then it was killed
    return [s.path for s in old]


def test_a_shard_set_two_shard_runs_left_mixed_is_named_so_not_a_torn_commit(tmp_path):
    """Shards of one table and map but two `shard` runs (a `shard --overwrite` killed between
    its renames) opened as a torn commit: every rank warned "resume from step 0 and redo the
    later steps", which trains the old shards' rows again. The open now names the mixed set."""
    from tests.distributed_support import open_error_worker

    plain = make_plain_table(tmp_path)
    s0, s1 = _mixed_shard_set(plain, shards_template(plain, "rows"))
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(open_error_worker, 2, (str(plain), out), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for result in results:
        assert result["open"].startswith(
            f"ShardMismatchError: rank 1: shard {s1} was written by `tiered-store shard` run "
        ), result
        assert f"but rank 0's shard {s0} by `tiered-store shard` run " in result["open"]
        assert "a mixed set" in result["open"] and "not a torn commit" in result["open"]


def test_committed_step_read_as_the_commit_round_forgets_the_torn_steps_is_a_step():
    """The commit round forgets the torn steps on the store's thread (ef17ee9), while a caller
    (interrupted in that commit, or a stats reader) may read committed_step: it checked
    ``_torn_steps`` and read it again for min(), so the round clearing it between the two
    raised TypeError ('NoneType' object is not iterable); a decided step cleared likewise
    returned None. Each is read once. The round's clearing is played by the reads here."""

    class Cleared(ShardedStore):
        """``_torn_steps`` and ``_unfinished`` as the thread leaves them: set at the first read,
        cleared at the next."""

        reads: dict[str, list] = {"_torn_steps": [[1, 2]], "_unfinished": [3]}
        _torn_steps = property(lambda self: (self.reads["_torn_steps"] or [None]).pop())
        _unfinished = property(lambda self: (self.reads["_unfinished"] or [None]).pop())

    class Local:
        committed_step = 2

    store = ShardedStore.__new__(Cleared)
    store.local = Local()
    assert store.committed_step == 1  # the torn steps as first read: the oldest
    assert store.committed_step == 3  # the decided step as first read
    assert store.committed_step == 2  # both cleared: the shard's own


def test_a_redone_step_killed_once_every_shard_staged_it_is_committed_at_the_reopen(tmp_path):
    """Over shards a torn commit left at steps 1 (rank 0) and 2 (rank 1), the step 2 redone and
    every rank killed once every shard had staged it: the reopen committed rank 0's staged step
    but dropped rank 1's (a staged step at its shard's committed step read as stale), so both
    opened untorn at step 2 with rank 1's redone row lost. Each shard stages the round's id
    with the step, so the reopen tells the redo from a stale one and commits both."""
    from tests.distributed_support import killed_redo_worker, resumed_commit_worker

    plain = make_plain_table(tmp_path)
    shards = write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    start = shards[1].shard_map.shard_range(1)[0]
    for shard, row, steps in ((shards[0], 3, 1), (shards[1], 460 - start, 2)):  # 2: rank 1 only
        with TieredStore.open({"table": {"path": str(shard.path)}}) as store:
            for value in range(1, steps + 1):
                store.write([row], torch.full((1, store.row_width), float(value)))
                store.commit()
    out = tmp_path / "out"
    out.mkdir()
    assert run_ranks(killed_redo_worker, 2, (str(plain), out), 60) == [-9, -9]
    codes = run_ranks(resumed_commit_worker, 2, (str(plain), out), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for result in results:
        assert result["reopened warnings"] == [] and result["reopened step"] == 2
        assert result["reopened staged"] is None and "redone" not in result
        assert [result["reopened rows"][i][0] for i in (3, 460)] == [3.0, 3.0]


def test_a_decided_step_staged_on_one_shard_is_committed_after_the_other_shard_is_compacted(
    tmp_path,
):
    """Step 2 staged on both shards in one round, committed on rank 1's (rank 0 killed before
    its phase 2), then rank 1's shard compacted (as README says, each shard's writes first):
    the compacted version had no delta, so no record of having committed the round, and the
    open dropped rank 0's decided step (its row lost, the shards torn at 1 and 2). Compaction
    keeps the last committed round in the version's metadata, and the open commits it."""
    from tests.distributed_support import resumed_commit_worker
    from tiered_store.delta.compaction import compact_table

    plain = make_plain_table(tmp_path)
    shards = write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    start = shards[1].shard_map.shard_range(1)[0]
    for shard, row in ((shards[0], 3), (shards[1], 460 - start)):
        store = TieredStore.open({"table": {"path": str(shard.path)}})
        store.write([row], torch.full((1, store.row_width), 1.0))
        store.commit(1)
        store.write([row], torch.full((1, store.row_width), 2.0))
        store.prepare_commit(2, round_id="round")
        if shard.rank == 1:
            store.finish_commit(2)
            store.close()
        else:  # killed before its phase 2
            with pytest.warns(UncommittedWritesWarning):
                store.close()
    compact_table(shards[1].path, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(resumed_commit_worker, 2, (str(plain), out), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for result in results:
        assert result["reopened warnings"] == [] and result["reopened step"] == 2, result
        assert result["reopened staged"] is None and "redone" not in result
        assert [result["reopened rows"][i][0] for i in (3, 460)] == [2.0, 2.0]


def _as_a_release_before_round_ids(store: TieredStore, stage: int | None = None) -> None:
    """What a release before round ids did on ``store``'s shard: commit its staged step, then
    (``stage``) stage that step of its writes; neither touched the staged round's key."""
    from tiered_store.delta.row_delta import STAGED_STEP_KEY, _step_bytes

    delta = store._writes.delta

    def commit(txn) -> None:
        staged = delta._staged_db(txn)
        step = txn.get(STAGED_STEP_KEY, db=delta.meta_db)
        txn.cursor(db=delta.rows_db).putmulti(txn.cursor(db=staged).iternext())
        txn.drop(staged, delete=False)
        txn.delete(STAGED_STEP_KEY, db=delta.meta_db)
        txn.put(b"step", bytes(step), db=delta.meta_db)

    delta._write("an old release's commit of the staged step", commit)
    if stage is not None:
        delta._write(
            "an old release's staging",
            lambda txn: txn.put(STAGED_STEP_KEY, _step_bytes(stage), db=delta.meta_db),
        )


def test_a_round_id_left_by_a_release_before_round_ids_never_decides_a_later_staged_step(
    tmp_path,
):
    """Round R's step 2 staged on both shards, committed on rank 1's (rank 0 killed before its
    phase 2); a release before round ids then committed rank 0's and staged step 3 there (rank
    1 killed before staging it), leaving R as rank 0's staged round: the open read step 3 as
    staged in R, which rank 1 committed, and committed it (the shards torn at 3 and 2). The
    staged round is bound to its step: one staged at another step is none (decided by steps)."""
    from tests.distributed_support import resumed_commit_worker

    plain = make_plain_table(tmp_path)
    shards = write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    start = shards[1].shard_map.shard_range(1)[0]
    for shard, row in ((shards[0], 3), (shards[1], 460 - start)):
        store = TieredStore.open({"table": {"path": str(shard.path)}})
        store.write([row], torch.full((1, store.row_width), 1.0))
        store.commit(1)
        store.write([row], torch.full((1, store.row_width), 2.0))
        store.prepare_commit(2, round_id="round")
        if shard.rank == 1:
            store.finish_commit(2)
        else:  # killed before its phase 2; then an old release's open and commit round
            _as_a_release_before_round_ids(store, stage=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncommittedWritesWarning)
            store.close()
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(resumed_commit_worker, 2, (str(plain), out), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for result in results:
        assert result["reopened warnings"] == [] and result["reopened step"] == 2, result
        assert result["reopened staged"] is None and "redone" not in result
        assert [result["reopened rows"][i][0] for i in (3, 460)] == [2.0, 2.0]


def test_a_shard_whose_staged_round_is_damaged_fails_the_open_on_every_rank_naming_it(tmp_path):
    """Rank 1's shard holding a staged step whose round key is damaged: reading it for the
    open's fingerprint raised on rank 1 alone, outside the error every rank is told, so rank 0
    waited in the exchange until the timeout and named rank 1 as gone. Every rank's open
    raises at once, naming rank 1's shard, the delta's key and its value."""
    from tests.distributed_support import open_error_worker
    from tiered_store.delta.row_delta import STAGED_ROUND_KEY, RowDelta, delta_path

    plain = make_plain_table(tmp_path)
    shards = write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    store = TieredStore.open({"table": {"path": str(shards[1].path)}})
    store.write([0], torch.full((1, store.row_width), 1.0))
    store.prepare_commit(1, round_id="round")
    with pytest.warns(UncommittedWritesWarning):
        store.close()
    delta = RowDelta(delta_path(shards[1].path), store.row_bytes)
    delta._write(
        "a damaged round", lambda txn: txn.put(STAGED_ROUND_KEY, b"\xff@1", db=delta.meta_db)
    )
    delta.close()
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(open_error_worker, 2, (str(plain), out), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for result in results:
        assert result["open"].startswith(
            f"ShardMismatchError: rank 1: cannot open its shard {shards[1].path}: "
            f"DeltaCorruptError: delta: {delta_path(shards[1].path)} holds b'\\xff@1' under the "
            "meta key 'staged_round'"
        ), result


def test_a_step_read_failing_between_the_phases_leaves_no_rank_out_of_phase_2(tmp_path):
    """Between a commit's phases each rank read its shard's committed step again (for the step
    to commit at) outside the error every rank is told: rank 1's read failing there left it
    out of phase 2, rank 0 waiting out the timeout with step 1 undecided on its side. Phase 2
    commits the step phase 1 staged at, read no more: the commit ends on every rank."""
    from tests.distributed_support import step_read_failing_worker

    plain = make_plain_table(tmp_path)
    write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(step_read_failing_worker, 2, (str(plain), out, False), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for result in results:
        assert (result["commit"], result["step"], result["reopened step"]) == (1, 1, 1), result
        assert result["reopened warnings"] == [] and result["reopened rows"] == [2.0, 2.0]


def test_a_step_read_failing_as_a_commit_starts_fails_it_on_every_rank_naming_the_shard(
    tmp_path,
):
    """A commit's first exchange carries each rank's committed step, read outside the error
    every rank is told: rank 1's read failing raised there alone, and rank 0 waited out the
    timeout in the exchange and named rank 1 as stopped (the store unusable). Every rank
    raises CommitError naming rank 1's error, nothing committed, and the commit tried again
    once the read works goes through."""
    from tests.distributed_support import step_read_failing_worker

    plain = make_plain_table(tmp_path)
    shards = write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(step_read_failing_worker, 2, (str(plain), out, True), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for rank, result in enumerate(results):
        assert result["commit"] == (
            f"CommitError: rank {rank}: commit: reading the committed step of a shard failed "
            f"(rank 1: TierIOError: delta: reading the step of {shards[1].path} failed); expected "
            "every shard's step readable: nothing was committed on any shard, and the writes are "
            "kept: commit again"
        ), result
        assert (result["retried"], result["step"], result["reopened step"]) == (1, 1, 1), result
        assert result["reopened warnings"] == [] and result["reopened rows"] == [2.0, 2.0]


def _check_torn_commit_is_found_and_redone(plain: Path, out: Path) -> None:
    """Over shards of ``plain`` that a torn commit left at steps 1 (rank 0) and 2 (rank 1), one
    row of each written 1.0 and 2.0 at those steps: reopened on two new ranks, every rank warns,
    naming both steps, and reports the oldest; a commit at it is refused; the step redone on
    every rank commits, and the table reopens whole."""
    from tests.distributed_support import torn_commit_worker

    codes = run_ranks(torn_commit_worker, 2, (str(plain), out), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for rank, result in enumerate(results):
        (warning,) = result["torn warnings"]
        assert warning.startswith(f"TornCommitWarning: rank {rank}: the shards were committed at different steps (rank 0: 1; rank 1: 2): a commit was interrupted")  # fmt: skip
        assert result["torn step"] == result["torn stats step"] == 1
        assert result["torn rows"] == [1.0, 2.0]
        # a commit at the oldest step is refused, its rows kept (it rewrote rank 0's step 1)
        assert result["older"] == "CommitError" and result["refused rows"] == [1.0, 2.0]
        assert result["redone"] == result["redone step"] == result["after step"] == 2
        assert result["after warnings"] == [] and result["after rows"] == [3.0, 3.0]


@pytest.mark.parametrize("pass_step", [True, False], ids=["commit(step)", "commit()"])
def test_a_shard_two_steps_ahead_after_a_torn_commit_takes_the_lower_redone_step(
    tmp_path, pass_step
):
    """Over shards a torn commit left at steps 1 (rank 0) and 3 (rank 1), steps 2 and 3 redone:
    rank 1's shard refused step 2 (lower than its step 3), so the redo failed on every rank and
    the job could never resume from committed_step. The shard ahead stages the redone step's
    writes at its own step; committed_step is the oldest shard's until every shard is at one.
    A commit() with no step (a loop resumed from committed_step 1) committed at the highest
    shard's step + 1 (4, then 5), past the steps redone; it commits committed_step + 1."""
    from tests.distributed_support import torn_two_steps_worker

    plain = make_plain_table(tmp_path)
    shards = write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    start = shards[1].shard_map.shard_range(1)[0]
    for shard, row, steps in ((shards[0], 3, 1), (shards[1], 460 - start, 3)):
        with TieredStore.open({"table": {"path": str(shard.path)}}) as store:
            for value in range(1, steps + 1):
                store.write([row], torch.full((1, store.row_width), float(value)))
                store.commit()
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(torn_two_steps_worker, 2, (str(plain), out, pass_step), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for result in results:
        assert result["redo 2"] == result["step after 2"] == 2, result
        assert result["redo 3"] == result["step after 3"] == 3, result
        assert result["after warnings"] == [] and result["after step"] == 3
        assert result["after rows"] == [3.0, 3.0]


@pytest.mark.parametrize(
    ("kill_step", "phase", "killed", "reopened"),
    [
        (2, "prepare_commit", (1,), (1, [10.0, 30.0])),  # rank 1 before staging: dropped
        (2, "finish_commit", (0, 1), (2, [2.0, 2.0])),  # every shard staged: committed
        (2, "finish_commit", (0,), (2, [2.0, 2.0])),  # rank 1's shard committed it
        (3, "finish_commit", (1,), (3, [3.0, 3.0])),  # rank 0's shard committed it
    ],
)
def test_a_kill_in_two_redos_after_a_torn_commit_reopens_at_a_step_that_redoes_to_the_end(
    tmp_path, kill_step, phase, killed, reopened
):
    """Over shards a torn commit left at steps 1 (rank 0) and 3 (rank 1), steps 2 and 3 redone
    and ranks killed in one redo: the reopen commits or drops the redo whole (the shard ahead
    at its own step 3, showing the redone rows), says the oldest step, and the steps redone
    from it leave both shards at step 3 with the last redo's rows."""
    from tests.distributed_support import killed_in_two_redos_worker, resumed_redos_worker

    plain = make_plain_table(tmp_path)
    shards = write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    start = shards[1].shard_map.shard_range(1)[0]
    for shard, row, steps in ((shards[0], 3, 1), (shards[1], 460 - start, 3)):
        with TieredStore.open({"table": {"path": str(shard.path)}}) as store:
            for value in range(1, steps + 1):
                store.write([row], torch.full((1, store.row_width), 10.0 * value))
                store.commit()
    out = tmp_path / "out"
    out.mkdir()
    args = (str(plain), out, kill_step, phase, killed)
    assert run_ranks(killed_in_two_redos_worker, 2, args, 60)[killed[0]] == -9
    codes = run_ranks(resumed_redos_worker, 2, (str(plain), out), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for result in results:
        assert (result["reopened step"], result["reopened rows"]) == reopened, result
        assert bool(result["reopened warnings"]) == (reopened[0] < 3), result  # torn till 3
        assert result["after warnings"] == [] and result["after step"] == 3
        assert result["after rows"] == [3.0, 3.0]


@pytest.mark.parametrize(
    ("phase", "resumed_at"),
    [("prepare_commit", 1), ("finish_commit", 2)],
    ids=["before-staging", "after-every-shard-staged"],
)
def test_a_rank_0_killed_inside_a_commit_is_named_in_time_and_the_shards_reopen_at_one_step(
    tmp_path, phase, resumed_at
):
    """Rank 0 (the group store's host) SIGKILLed inside a commit, on a group the caller made
    (its store's timeout 60 s, torch's default 30 min): rank 1's commit waited that long to
    connect to the gone store before naming it, past sharding.timeout_s (6 s). It names rank 0
    within the timeout. Then each shard committed in its own transaction, so rank 1's shard
    was at step 2 and rank 0's at step 1 (a torn commit: the redone step applied twice there).
    Now the commit has two phases: killed before its shard staged, rank 1's staged step is
    dropped and both shards reopen at step 1 (the step redone gives the uninterrupted rows);
    killed after every shard staged, rank 0's staged step is committed at the reopen and both
    are at step 2 with the rows written; no TornCommitWarning either way."""
    from tests.distributed_support import killed_in_commit_worker, resumed_commit_worker

    plain = make_plain_table(tmp_path)
    write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(killed_in_commit_worker, 2, (str(plain), out, phase), 45)
    assert codes == [-9, 0], codes
    result = json.loads((out / "rank1.json").read_text())
    assert "crash" not in result and result["step 1"] == 1 and "step 2" not in result, result
    assert result["error"].startswith("RankFailureError: rank 1: commit in collective round 4 (lookups, writes, updates and commits counted) failed: the process group's store (hosted by rank 0, or by torchrun's agent) is unreachable")  # fmt: skip
    assert "rank 0 died" in result["error"], result
    assert result["seconds"] <= 2 * 6, result  # the timeout, plus slack on a loaded machine
    codes = run_ranks(resumed_commit_worker, 2, (str(plain), out), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    uninterrupted = {}
    for value in (1.0, 2.0):  # every row as an uninterrupted run leaves it after each step
        with TieredStore.open({"table": {"path": str(plain)}}) as store:
            rows = store.lookup(torch.arange(store.rows)).float()
        rows[[3, 460]] = value
        uninterrupted[value] = rows.tolist()
    for result in results:
        assert result["reopened warnings"] == [] and result["after warnings"] == []
        assert result["reopened step"] == resumed_at and result["reopened staged"] is None
        assert result["reopened rows"] == uninterrupted[float(resumed_at)]
        assert result.get("redone") == (2 if resumed_at == 1 else None)
        assert result["after step"] == 2 and result["after staged"] is None
        assert result["after rows"] == uninterrupted[2.0]


def _shards_with_step_2_staged(tmp_path) -> tuple[Path, TieredStore]:
    """A plain table's two row shards, each holding step 1 committed and step 2 staged (row 3 or
    460 at 1.0 then 2.0: a sharded commit killed once every shard had staged); rank 1's writer
    closed, rank 0's open (its writer lock held). The plain table and rank 0's writer."""
    plain = make_plain_table(tmp_path)
    shards = write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    start = shards[1].shard_map.shard_range(1)[0]
    writers = []
    for shard, row in ((shards[0], 3), (shards[1], 460 - start)):
        store = TieredStore.open({"table": {"path": str(shard.path)}})
        for value in (1.0, 2.0):
            store.write([row], torch.full((1, store.row_width), value))
            (store.commit if value == 1.0 else store.prepare_commit)(int(value))
        writers.append(store)
    with pytest.warns(UncommittedWritesWarning):
        writers.pop().close()  # rank 1's: its writer gone
    return plain, writers.pop()


def test_a_staged_step_whose_shard_another_process_writes_is_left_to_it_until_reopened(
    tmp_path,
):
    """Both shards hold step 2 staged (a sharded commit killed once every shard had staged),
    and another process holds rank 0's writer lock (its writer may be finishing that commit):
    the open leaves that shard as it is, every rank warns and reports step 2, and a commit is
    refused on every rank with nothing staged or committed; once that process let go, the
    shards reopen at step 2 with the staged rows."""
    from tests.distributed_support import locked_staged_worker, resumed_commit_worker

    plain, holder = _shards_with_step_2_staged(tmp_path)  # rank 0's holder keeps its lock
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(locked_staged_worker, 2, (str(plain), out), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for rank, result in enumerate(results):
        (warning,) = result["opened warnings"]
        assert warning.startswith(f"TornCommitWarning: rank {rank}: a sharded commit left staged rows (interrupted between its phases, or under way in the writer holding a shard's lock) that this open could not resolve on 1 shard(s) (rank 0: TierIOError: table plain.rows.shard-0-of-2.npy is being written (or compacted) by another store")  # fmt: skip
        assert result["opened step"] == 2 and result["opened rows"] == [1.0, 2.0]
        assert result["opened staged"] == (2 if rank == 0 else None)
        assert result["commit"].startswith(f"CommitError: [Errno 5] rank {rank}: sharded commit of step 3 (its first phase, staging) failed on 1 of 2 rank(s): rank 0: CommitError: rank 0: its shard ")  # fmt: skip
        assert "holds step 2 staged by an interrupted sharded commit, which this store's open could not commit" in result["commit"]  # fmt: skip
        assert result["staged after"] == result["opened staged"]
    with pytest.warns(UncommittedWritesWarning):
        holder.close()
    codes = run_ranks(resumed_commit_worker, 2, (str(plain), out), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for result in results:
        assert result["reopened warnings"] == [] and result["reopened step"] == 2
        assert result["reopened staged"] is None and "redone" not in result
        assert [result["reopened rows"][i][0] for i in (3, 460)] == [2.0, 2.0]


def test_a_step_read_failing_after_an_open_resolved_a_staged_step_fails_it_on_every_rank(
    tmp_path,
):
    """Both shards hold step 2 staged; the open commits it on each and reads the shard's
    committed step again after reopening it, outside the error every rank is told: rank 1's
    read failing there raised on its rank alone, and rank 0 waited out the timeout in the
    exchange and named rank 1 as stopped. Every rank's open raises ShardMismatchError naming
    rank 1's error; reopened, the shards are at step 2 with the staged rows."""
    from tests.distributed_support import step_unreadable_once_resolved_worker

    plain, holder = _shards_with_step_2_staged(tmp_path)
    with pytest.warns(UncommittedWritesWarning):
        holder.close()
    shard_1 = shards_template(plain, "rows").format(rank=1, ranks=2)
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(step_unreadable_once_resolved_worker, 2, (str(plain), out), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for rank, result in enumerate(results):
        assert result["open"] == (
            f"ShardMismatchError: rank {rank}: resolving a sharded commit interrupted between "
            "its phases: rank 1: the commit was made, but reading its shard's committed step "
            f"failed: TierIOError: delta: reading the step of {shard_1} failed"
        ), result
        assert result["reopened warnings"] == [] and result["reopened step"] == 2
        assert result["reopened staged"] is None and result["reopened rows"] == [2.0, 2.0]


def _opened_while_held(tmp_path, plain, holder, resolve, before: bool) -> list[dict]:
    """Two ranks open ``plain``'s shards (``briefly_locked_staged_worker``) while ``holder``
    holds rank 0's shard's writer lock: 0.3 s after rank 0 found it taken, ``resolve(holder)``
    and close it (with ``before``, rank 0 tries the lock only then); the ranks' results."""
    from tests.distributed_support import briefly_locked_staged_worker

    tried = tmp_path / "tried"

    def let_go() -> None:  # once rank 0 found the lock taken (else at the deadline)
        end = time.monotonic() + 60
        while not tried.exists() and time.monotonic() < end:
            time.sleep(0.01)
        time.sleep(0.3)
        resolve(holder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncommittedWritesWarning)
            holder.close()
        Path(f"{tried}.go").touch()  # with ``before``: now rank 0 tries the lock

    releaser = threading.Thread(target=let_go)
    releaser.start()
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(briefly_locked_staged_worker, 2, (str(plain), out, str(tried), before), 60)
    releaser.join()
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    assert tried.exists()  # rank 0 did find the lock taken
    return results


@pytest.mark.parametrize(
    ("resolved_there", "before"),
    [(False, False), (True, False), (True, True)],
    ids=["left-staged", "committed-there", "committed-before-the-lock-was-tried"],
)
def test_a_staged_step_whose_shards_lock_is_let_go_soon_is_resolved_at_open(
    tmp_path, resolved_there, before
):
    """Both shards hold step 2 staged, and another process holds rank 0's writer lock for a
    moment (another store's open, committing that shard's step meanwhile: ``committed-there``;
    or a store let go of without: ``left-staged``). The open gave up at once: it warned, left
    rank 0's step staged and every commit was refused until every store was closed; and when
    that store had committed it before rank 0 tried the lock, rank 0 refused its own older view
    of the shard ("written by another process"), with the same result. It waits for the lock
    (a few seconds) and reads the shard again: every rank opens at step 2 with the staged rows,
    without a warning, and the next commit succeeds."""
    plain, holder = _shards_with_step_2_staged(tmp_path)  # rank 0's holder keeps its lock

    def resolve(holder: TieredStore) -> None:  # as another store's open does, under the lock
        if resolved_there:
            holder.finish_commit(2)

    for result in _opened_while_held(tmp_path, plain, holder, resolve, before):
        assert result["opened warnings"] == [], result
        assert result["opened step"] == 2 and result["opened staged"] is None
        assert result["opened rows"] == [2.0, 2.0]
        assert result["committed"] == 3 and result["committed rows"] == [3.0, 3.0]


@pytest.mark.parametrize(
    ("decided", "before"),
    [(2, False), (1, False), (2, True), (1, True)],
    ids=[
        "holder-dropped-a-roll-forward",
        "holder-committed-a-drop",
        "dropped-before-the-lock-was-tried",
        "committed-before-the-lock-was-tried",
    ],
)
def test_a_shard_whose_lock_holder_resolved_it_otherwise_opens_torn_on_every_rank(
    tmp_path, decided, before
):
    """Rank 0's shard holds step 2 staged by a store holding its writer lock (rank 1's shard
    staged it too: the open rolls it forward; or stayed at step 1: the open drops it), and that
    store, as the open waits for its lock (or, ``before``, just before the open tries it), does
    the other thing (drops it; commits it). The open took the shard as resolved: rank 0 opened
    at one step and rank 1 at another, without a warning (committed_step differed between the
    ranks; a roll-forward's rows were gone on one shard); and with a drop made before it tried
    the lock (unseen by its view), it failed to commit nothing staged, warned so, and said step 2
    on every rank. Every rank now opens torn: a warning naming both steps, committed_step 1 on
    each."""
    plain = make_plain_table(tmp_path)
    shards = write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    start = shards[1].shard_map.shard_range(1)[0]
    for shard, row in ((shards[1], 460 - start), (shards[0], 3)):
        holder = TieredStore.open({"table": {"path": str(shard.path)}})
        for value in range(1, decided + 1 if shard is shards[1] else 3):
            holder.write([row], torch.full((1, holder.row_width), float(value)))
            (holder.commit if value == 1 else holder.prepare_commit)(value)
        if shard is shards[1]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UncommittedWritesWarning)
                holder.close()

    def otherwise(holder: TieredStore) -> None:  # the other thing than the open decided
        holder.abort_commit() if decided == 2 else holder.finish_commit(2)

    results = _opened_while_held(tmp_path, plain, holder, otherwise, before)
    shard_steps = {2: "rank 0: 1; rank 1: 2", 1: "rank 0: 2; rank 1: 1"}[decided]
    for rank, result in enumerate(results):
        (warning,) = result["opened warnings"]
        assert warning.startswith(f"TornCommitWarning: rank {rank}: the shards were committed at different steps ({shard_steps})"), result  # fmt: skip
        assert result["opened step"] == result["opened stats step"] == 1, result
        assert result["opened staged"] is None
        assert result["opened rows"] == ([1.0, 2.0] if decided == 2 else [2.0, 1.0])
        # commit(): committed_step + 1, the step to redo (the shard at 2 takes it at 2 again)
        assert result["committed"] == 2 and result["committed rows"] == [3.0, 3.0]


def test_a_drop_decided_before_waiting_for_a_shards_lock_is_left_to_the_next_open(tmp_path):
    """Only rank 0's shard holds step 2 staged (rank 1's never staged it), and another process
    holds rank 0's writer lock for a moment: the open decided to drop it, but the holder may
    have been that commit's writer, which went on with it once every shard staged (the
    decision was made before). Past the wait, rank 0 leaves it staged and every rank warns;
    the next open drops it."""
    from tests.distributed_support import briefly_locked_staged_worker, resumed_commit_worker

    plain = make_plain_table(tmp_path)
    shards = write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    start = shards[1].shard_map.shard_range(1)[0]
    for shard, row in ((shards[1], 460 - start), (shards[0], 3)):
        holder = TieredStore.open({"table": {"path": str(shard.path)}})
        holder.write([row], torch.full((1, holder.row_width), 1.0))
        holder.commit(1)
        if shard is shards[1]:
            holder.close()
    holder.write([3], torch.full((1, holder.row_width), 2.0))
    holder.prepare_commit(2)  # rank 0's shard only; the other store let go of, at step 1
    tried = tmp_path / "tried"

    def let_go() -> None:  # once rank 0 found the lock taken (else at the deadline)
        end = time.monotonic() + 60
        while not tried.exists() and time.monotonic() < end:
            time.sleep(0.01)
        time.sleep(0.3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncommittedWritesWarning)
            holder.close()

    releaser = threading.Thread(target=let_go)
    releaser.start()
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(briefly_locked_staged_worker, 2, (str(plain), out, str(tried), False), 60)
    releaser.join()
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for rank, result in enumerate(results):
        (warning,) = result["opened warnings"]
        assert warning.startswith(f"TornCommitWarning: rank {rank}: a sharded commit left staged rows")  # fmt: skip
        assert "rank 0: its writer lock was held by another store as this open decided to drop step 2, which that store may have been committing" in warning  # fmt: skip
        assert result["opened step"] == 1 and result["opened rows"] == [1.0, 1.0]
        assert result["opened staged"] == (2 if rank == 0 else None)
        assert result["commit"].startswith("CommitError")
    codes = run_ranks(resumed_commit_worker, 2, (str(plain), out), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for result in results:
        assert result["reopened warnings"] == [] and result["reopened step"] == 1
        assert result["reopened staged"] is None


def test_a_shard_failing_either_phase_of_a_commit_leaves_every_shard_at_one_step(tmp_path):
    """A shard's commit that failed (a full disk) while the others succeeded left the shards at
    two steps with every rank alive. Now a shard failing to stage fails the commit on every
    rank with nothing committed anywhere and the writes kept (the next commit makes them; a
    shard that fails to drop what it staged says so, and that commit stages over it);
    a shard failing to commit what it staged (every shard had staged it) leaves the step
    decided: every rank reports it, and the next commit, its close or the next open commits it
    there (a close that cannot says so: it said the rows were dropped)."""
    from tests.distributed_support import failed_phase_worker

    plain = make_plain_table(tmp_path)
    write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(failed_phase_worker, 2, (str(plain), out), 90)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for rank, r in enumerate(results):
        assert r["first"] == r["first step"] == 1 and r["first committed here"] == [1, 1.0]
        # rank 0 failed to drop what it staged: its error says so (it said it was dropped)
        undropped = ", but not this rank's: CommitError: drop_staged: no space left on device (the test's); it stays staged, unseen by readers, until the next commit stages over it or the shards' next open drops it" if rank == 0 else ""  # fmt: skip
        assert r["unstaged"] == f"CommitError: [Errno 5] rank {rank}: sharded commit of step 2 (its first phase, staging) failed on 1 of 2 rank(s): rank 1: CommitError: prepare_commit: no space left on device (the test's); nothing was committed on any shard (what the others staged was dropped{undropped}) and the writes are kept: commit again"  # fmt: skip
        assert (r["unstaged step"], r["unstaged staged"]) == (1, 2 if rank == 0 else None)
        assert r["unstaged committed here"] == [1, 1.0] and r["unstaged rows"] == [2.0, 2.0]
        assert r["after unstaged"] == 2 and r["after unstaged committed here"] == [2, 2.0]
        assert r["after unstaged staged"] is None  # staged over, then committed
        assert r["unfinished"] == f"CommitError: [Errno 5] rank {rank}: sharded commit of step 3 (its second phase) failed on 1 of 2 rank(s): rank 1: CommitError: finish_commit: no space left on device (the test's); every shard had staged it, so step 3 is committed: the failed shards keep it staged and finish it at the next commit() or when the shards are next opened"  # fmt: skip
        assert r["unfinished step"] == 3 and r["unfinished rows"] == [3.0, 3.0]
        assert r["unfinished staged"] == (3 if rank == 1 else None)
        assert r["unfinished committed here"] == ([2, 2.0] if rank == 1 else [3, 3.0])
        assert r["after unfinished"] == r["after unfinished step"] == 4
        assert r["after unfinished staged"] is None
        assert r["after unfinished committed here"] == [4, 4.0]
        assert r["unfinished at close step"] == 5
        assert r["unfinished at close staged"] == (5 if rank == 1 else None)
        assert (r["closed step"], r["closed staged"]) == (5, None)  # committed by close()
        assert r["unfinished again step"] == 6 and r["unfinished again"].startswith("CommitError")
        assert r["unfinished again staged"] == (6 if rank == 1 else None)
        # closed with step 6 still staged on rank 1: its rows are not dropped (the open commits
        # them), whatever the warning of writes left uncommitted said
        assert r["closed again warnings"] == (["UncommittedWritesWarning: close: 1 rows written to plain.rows.shard-1-of-2.npy since its last commit (step 5) are not committed here, but staged at step 6 by a sharded commit whose second phase did not finish: the shards' next open (ShardedStore, on every rank) commits them if every shard staged that step, else drops them"] if rank == 1 else [])  # fmt: skip
        assert r["reopened warnings"] == [] and r["reopened step"] == 6
        assert r["reopened staged"] is None and r["reopened rows"] == [6.0, 6.0]
        for name in ("first", "unstaged", "after unstaged", "unfinished", "after unfinished"):
            # stats() said the shard's own older step where its second phase failed
            assert r[f"{name} stats step"] == r[f"{name} step"], (name, r)
        for name in ("unfinished at close", "unfinished again"):
            assert r[f"{name} stats step"] == r[f"{name} step"], (name, r)


def test_a_compacted_shard_opens_with_its_committed_rows_on_every_rank(tmp_path):
    """`tiered-store compact` on a shard (its delta folded into generation 1, generation 0
    removed) made every rank's open fail, "shard-1-of-2.npy does not exist": the store looked
    for the shard's first file. It opens the current version, with its rows and step."""
    from tests.distributed_support import compacted_shard_worker
    from tiered_store.delta.compaction import compact_table

    plain = make_plain_table(tmp_path)
    shards = write_shards(plain, 2, "rows", template=shards_template(plain, "rows"), progress=False)
    start = shards[1].shard_map.shard_range(1)[0]
    for shard, row in ((shards[0], 3), (shards[1], 460 - start)):
        with TieredStore.open({"table": {"path": str(shard.path)}}) as store:
            store.write([row], torch.full((1, store.row_width), 2.0))
            store.commit()
    assert compact_table(shards[1].path, progress=False).removed_generations == [0]
    assert not shards[1].path.exists()
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(compacted_shard_worker, 2, (str(plain), out), 60)
    results = _results(out, 2)
    assert codes == [0, 0] and not any("crash" in r for r in results), results
    for result in results:
        assert result["step"] == 1 and result["rows"] == [2.0, 2.0]
        assert result["committed"] == result["reopened step"] == 2
        assert result["reopened rows"] == [4.0, 4.0]


def test_a_failed_overwrite_of_shards_leaves_the_old_shards_and_their_writes(tmp_path, monkeypatch):
    """`shard --overwrite` failing at rank 1's shard (a page of the table fails its checksum):
    it had replaced rank 0's shard and dropped its writes, then removed it: no shard set left."""
    path = tmp_path / "t.npy"
    create_table(path, np.ones((3000, 4), dtype=np.float32), progress=False)
    old = write_shards(path, 2, "rows", progress=False)
    with TieredStore.open({"table": {"path": str(old[0].path)}}) as store:
        store.write([3], torch.full((1, 4), 7.0))
        store.commit()
    before = sorted(p.name for p in tmp_path.iterdir())
    with open(path, "r+b") as f:  # one flipped byte in rank 1's rows
        f.seek(4096 + 2000 * 16)
        f.write(b"\x7f")
    with pytest.raises(ChecksumError, match="its page checksum"):
        write_shards(path, 2, "rows", progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no new shard, no temporary
    assert [read_shard(s.path).manifest for s in old] == [s.manifest for s in old]
    with TieredStore.open({"table": {"path": str(old[0].path)}}) as store:
        assert store.committed_step == 1 and store.lookup([3])[0].tolist() == [7.0] * 4
    create_table(path, np.ones((3000, 4), dtype=np.float32), progress=False, overwrite=True)
    # a run killed before its renames left a whole hidden shard: the next run removes it
    hidden = old[1].path.with_name(f".{old[1].path.name}.0123456789ab.new.npy")
    create_table(hidden, np.ones((4, 4), dtype=np.float32), progress=False)
    # a shard being written meanwhile: refused before any shard is replaced (shard 0 was, and
    # lost its writes; shard 1's new copy stayed hidden)
    with TieredStore.open({"table": {"path": str(old[1].path)}}) as writer:
        writer.write([0], torch.full((1, 4), 5.0))
        with pytest.raises(TierIOError, match="being written"):
            write_shards(path, 2, "rows", progress=False, overwrite=True)
        writer.commit()
    assert not [p.name for p in tmp_path.iterdir() if ".new.npy" in p.name]
    with TieredStore.open({"table": {"path": str(old[0].path)}}) as store:
        assert store.committed_step == 1 and store.lookup([3])[0].tolist() == [7.0] * 4
    # a writer starting between the renames is refused (the shards' writer locks are held until
    # all are renamed; checked and let go before, shard 1 was refused after shard 0 was replaced)
    from tiered_store.distributed import shard_files

    real, refused = shard_files.replace_table, []

    def replace_then_a_writer_starts(*args, **kwargs):
        real(*args, **kwargs)
        try:
            TieredStore.open({"table": {"path": str(old[1].path)}}).write([0], torch.ones(1, 4))
        except TierIOError as exc:
            refused.append(str(exc))

    monkeypatch.setattr(shard_files, "replace_table", replace_then_a_writer_starts)
    write_shards(path, 2, "rows", progress=False, overwrite=True)
    assert len(refused) == 2 and all("being written" in r for r in refused), refused
    # a missing output folder is named (it was a raw FileNotFoundError)
    from tiered_store.table_sources import TableNotFoundError

    with pytest.raises(TableNotFoundError, match="target directory .* does not exist"):
        write_shards(path, 2, "rows", template=str(tmp_path / "no" / "s{rank}.npy"), progress=False)


def test_ranks_in_different_collectives_are_named_with_the_kinds_of_round(tmp_path):
    """Rank 0 looks up while rank 1 takes a training step: each names the other and both kinds
    (it said "no rank was found silent or behind")."""
    from tests.distributed_support import crossed_rounds_worker

    _, results = _two_ranks_over_plain_shards(tmp_path, crossed_rounds_worker, 60)
    assert not any("crash" in r for r in results), results
    assert "rank 1 is in an update round where this rank is in a lookup one" in results[0]["error"]
    assert "rank 0 is in a lookup round where this rank is in an update one" in results[1]["error"]


def test_stores_on_other_groups_or_opened_after_other_stores_never_share_heartbeats(tmp_path):
    """Heartbeat keys came from a count of the stores each process opened and named a rank by
    its rank in the group: stores on the subgroups [0, 1] and [2, 3] shared them (rank 1 dead
    read as alive, from rank 3's beats), and ranks that had opened more stores beat elsewhere
    (a healthy rank read as stopped)."""
    from tests.distributed_support import subgroup_heartbeats_worker

    table = make_plain_table(tmp_path)
    for world in (2, 4):
        write_shards(table, world, "rows", template=shards_template(table, "rows"), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(subgroup_heartbeats_worker, 4, (str(table), out), 60)
    assert codes[0] == 0 and codes[1] != 0, codes
    rank0 = _results(out, 1)[0]
    assert "crash" not in rank0, rank0["crash"]
    assert rank0["stopped"] is None
    assert "rank 1 stopped: no heartbeat for" in rank0["error"], rank0["error"]


def _fingerprint(rank: int, bounds: list[int]) -> dict:
    """The open's fingerprint of rank ``rank``'s shard (two ranks, cut by rows at ``bounds``)."""
    from tiered_store.distributed.sharded_store import PROTOCOL_VERSION

    return {
        "protocol": PROTOCOL_VERSION,
        "shard": f"s{rank}.npy",
        "error": None,
        "heartbeat": "h",
        "committed_step": 0,
        "staged_step": None,
        "commit_rounds": None,
        "world": 2,
        "config": {"ranks": 2, "by": "rows", "out_of_range": "error"},
        "shard_rank": rank,
        "run": "r",
        "map": {"by": "rows", "bounds": bounds, "table_version": "v"},
        "rows": {},
    }


def test_shards_cut_for_another_rank_count_are_refused_at_open():
    """A shard set cut for 3 ranks opened by 2 (a template without {ranks} finds its files)."""
    from tiered_store.distributed.sharded_store import check_fingerprints
    from tiered_store.errors import ShardMismatchError

    prints = [_fingerprint(r, [0, 10, 20, 30]) for r in range(2)]
    with pytest.raises(ShardMismatchError, match=r"rank 0: shard s0.npy is one of 3 shards, but the process group has 2 ranks"):  # fmt: skip
        check_fingerprints(prints, 2)


def test_a_rank_of_another_release_is_named_at_open():
    """A rank of a release before run ids (its fingerprint without "run") failed the open with a
    bare KeyError: 'run' on the others; a fingerprint this release does not know is refused too,
    naming the rank and the keys."""
    from tiered_store.distributed.sharded_store import check_fingerprints
    from tiered_store.errors import ShardMismatchError

    def doc(rank: int) -> dict:
        return _fingerprint(rank, [0, 10, 20])

    assert check_fingerprints([doc(0), doc(1)], 2).bounds == (0, 10, 20)
    old = doc(1)
    del old["run"]
    with pytest.raises(ShardMismatchError, match=r"^rank 1: its open's fingerprint lacks run, has no key more; expected the keys of this release's: rank 1 runs another release of tiered-store"):  # fmt: skip
        check_fingerprints([doc(0), old], 2)
    newer = {**doc(0), "release": 9}
    with pytest.raises(ShardMismatchError, match=r"^rank 0: its open's fingerprint lacks no key, has release more"):  # fmt: skip
        check_fingerprints([newer, doc(1)], 2)
    failed = {k: v for k, v in doc(1).items() if k not in ("shard_rank", "run", "map", "rows")}
    failed["error"] = "OSError: gone"  # a shard that failed to open sends no shard facts
    with pytest.raises(ShardMismatchError, match=r"rank 1: cannot open its shard s1.npy: OSError"):
        check_fingerprints([doc(0), failed], 2)


def test_a_rank_of_another_protocol_version_is_refused_at_open_naming_both():
    """The ranks compared no protocol version, so two releases whose messages differ in format
    but not in the fingerprint's keys would misread each other's rounds; the open refuses a rank
    of another version (or of one before versions), naming it and both versions."""
    from tiered_store.distributed.sharded_store import PROTOCOL_VERSION, check_fingerprints
    from tiered_store.errors import ShardMismatchError

    other = {**_fingerprint(1, [0, 10, 20]), "protocol": PROTOCOL_VERSION + 1}
    with pytest.raises(ShardMismatchError, match=rf"^rank 1: its open's fingerprint has protocol version {PROTOCOL_VERSION + 1}, this rank's is {PROTOCOL_VERSION}; expected one protocol version on every rank: rank 1 runs another release"):  # fmt: skip
        check_fingerprints([_fingerprint(0, [0, 10, 20]), other], 2)
    before = _fingerprint(0, [0, 10, 20])
    del before["protocol"]  # and any of its other keys: the version is read first
    del before["run"]
    with pytest.raises(ShardMismatchError, match=rf"^rank 0: its open's fingerprint has protocol version none \(a release before protocol versions\), this rank's is {PROTOCOL_VERSION};"):  # fmt: skip
        check_fingerprints([before, _fingerprint(1, [0, 10, 20])], 2)


def test_reshard_with_overwrite_serves_the_tables_rows_not_the_old_shards_writes(tmp_path):
    """An old shard's committed writes and compacted versions go with it when it is cut again."""
    from tiered_store.delta.compaction import compact_table

    table = make_plain_table(tmp_path)
    want = np.load(table)
    (shard,) = write_shards(table, 1, "rows", progress=False)
    with TieredStore.open({"table": {"path": str(shard.path)}}) as store:
        store.write([3, 461], torch.ones(2, store.row_width))
        store.commit()
    compact_table(shard.path, progress=False)  # a version g1, and the pointer names it
    with TieredStore.open({"table": {"path": str(shard.path)}}) as store:
        store.write([5], torch.ones(1, store.row_width))
        store.commit()
    write_shards(table, 1, "rows", progress=False, overwrite=True)
    with TieredStore.open({"table": {"path": str(shard.path)}}) as store:
        assert store.committed_step == 0 and store.generation == 0
        got = store.lookup(torch.tensor([3, 5, 461])).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(got, want[[3, 5, 461]].astype(np.uint16))
    assert (
        sorted(p.name for p in tmp_path.iterdir() if ".g1." in p.name or p.suffix == ".current")
        == []
    )


def test_reshard_with_overwrite_refuses_a_compacted_shard_being_written(tmp_path):
    """`shard --overwrite` took the writer lock only of shards whose first file exists, so over
    a compacted one (generation 0 removed) a store writing it was not refused: its versions were
    removed under it, and its next commit returned a step that no reopen found."""
    from tiered_store.delta.compaction import compact_table

    table = make_plain_table(tmp_path)
    (shard,) = write_shards(table, 1, "rows", progress=False)
    with TieredStore.open({"table": {"path": str(shard.path)}}) as store:
        store.write([3], torch.full((1, store.row_width), 2.0))
        store.commit()
    assert compact_table(shard.path, progress=False).removed_generations == [0]
    with TieredStore.open({"table": {"path": str(shard.path)}}) as writer:
        writer.write([5], torch.full((1, writer.row_width), 7.0))
        with pytest.raises(TierIOError, match="being written"):
            write_shards(table, 1, "rows", progress=False, overwrite=True)
        assert writer.commit() == 2
    assert not [p.name for p in tmp_path.iterdir() if ".new.npy" in p.name]
    with TieredStore.open({"table": {"path": str(shard.path)}}) as store:
        assert store.committed_step == 2
        assert store.lookup([3, 5])[:, 0].tolist() == [2.0, 7.0]


def test_a_table_trained_through_a_sharded_store_unshards_with_its_run_id_and_step(
    tmp_path, monkeypatch
):
    """`tiered-store unshard` after sharded training: the whole table holds the trained rows,
    optimizer state included, keeps the run id and optimizer a resumed run checks, and opens at
    the step the shards were committed at, from which training goes on unsharded."""
    from tiered_store.delta.compaction import compact_table
    from tiered_store.delta.row_optimizers import make_row_optimizer
    from tiered_store.delta.trainable import TrainableTable, create_trainable_table
    from tiered_store.distributed import join_shards

    table = tmp_path / "trainable.npy"
    adam = make_row_optimizer("adam", lr=0.05)
    weights = np.random.default_rng(3).standard_normal((40, 4)).astype(np.float32)
    create_trainable_table(table, weights, adam, run_id="run-a")
    (shard,) = write_shards(
        table, 1, "rows", template=shards_template(table, "rows"), progress=False
    )
    _one_rank_group_env(monkeypatch)
    cfg = {
        "table": {"path": str(table)},
        "sharding": {"ranks": 1, "by": "rows", "shards": shards_template(table, "rows")},
    }
    trained = TrainableTable(ShardedStore.open(cfg), adam)
    for step in (1, 2):
        trained.lookup(torch.tensor([[3, 17, 39]])).sum().backward()
        assert trained.step(step) == 3
        assert trained.commit() == step
    want = trained.store.lookup(torch.arange(40)).numpy()  # weights and Adam's moments
    trained.close()
    compact_table(shards_template(table, "rows").format(rank=0, ranks=1), progress=False)
    join_shards(table, ranks=1, template=shards_template(table, "rows"), overwrite=True)
    assert read_manifest(table).metadata == {
        "trainable": {"dim": 4, "optimizer": "adam", "run_id": "run-a"},
        "committed_step": 2,
        "joined_from": {"table_version": shard.shard_map.table_version, "run": shard.run},
    }
    assert np.array_equal(np.load(table), want) and not np.array_equal(want[:, :4], weights)
    resumed = TrainableTable(TieredStore.open({"table": {"path": str(table)}}), adam)
    assert resumed.store.committed_step == 2
    resumed.lookup(torch.tensor([3])).sum().backward()
    resumed.step(3)
    assert resumed.commit() == 3
    resumed.close()


def test_ranks_reopen_a_store_from_the_environment_again_and_again(tables, tmp_path):
    """Closing destroyed the group it made from torchrun's environment, and the next open on
    the same port could join the old rendezvous of a rank still closing: raw gloo errors or a
    hang past timeout_s, by the second to fifth reopen."""
    write_shards(tables["plain"], 2, "rows", template=shards_template(tables["plain"], "rows"),
                 progress=False, overwrite=True)  # fmt: skip
    codes = run_ranks(reopen_worker, 2, (str(tables["plain"]), tmp_path), 120)
    assert codes == [0, 0], codes
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text())["opened"] == [True] * 4


def test_a_store_reopened_with_a_short_timeout_never_waits_for_a_new_store_connection(
    tables, tmp_path
):
    """Each open made two new connections to the group's store (its heartbeats'), one between
    the open's exchange and the first lookup; one that took 5 s (torch's reverse-DNS look-up of
    the peer losing its query) failed that lookup, or the open, on the other ranks at a 6 s
    timeout. The heartbeats of a process now share one connection, made at its first open."""
    write_shards(tables["plain"], 2, "rows", template=shards_template(tables["plain"], "rows"),
                 progress=False, overwrite=True)  # fmt: skip
    codes = run_ranks(slow_connect_reopen_worker, 2, (str(tables["plain"]), tmp_path), 90)
    reports = [tmp_path / f"rank{r}.json" for r in range(2)]
    results = [json.loads(p.read_text()) if p.exists() else None for p in reports]
    assert codes == [0, 0], (
        codes,
        results,
    )  # before: rank 0 'open (before the first collective round) failed', rank 1 hung
    assert [r.get("served") for r in results] == [True, True], results


def test_closing_one_of_two_stores_leaves_the_group_to_the_other(tables, monkeypatch):
    """Two stores open from torchrun's environment (one per Engram layer): the first made the
    group; closing it first must not destroy the group the second still uses."""
    import torch.distributed as dist

    table = tables["plain"]
    template = shards_template(table, "rows")
    write_shards(table, 1, "rows", template=template, progress=False, overwrite=True)
    _one_rank_group_env(monkeypatch)
    cfg = {
        "table": {"path": str(table)},
        "sharding": {"ranks": 1, "by": "rows", "shards": template},
    }
    first, second = ShardedStore.open(cfg), ShardedStore.open(cfg)
    first.close()
    assert second.lookup(torch.tensor([1, 2])).shape[0] == 2  # the group is still there
    second.close()
    assert dist.is_initialized()  # and stays for the next store of this process


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_writes_commits_and_training_equal_one_store_given_the_same(tmp_path, world):
    """Writes route to the owning ranks and commit with one step (reopened: the same rows);
    Adam steps through a sharded TrainableTable equal one store's, bit for bit."""
    from tests.distributed_support import (
        TRAIN_ROWS,
        TRAIN_STEPS,
        WRITE_ROUNDS,
        make_trainable,
        sharded_writes_worker,
        train_batch,
        write_round,
    )
    from tiered_store.delta.row_optimizers import make_row_optimizer
    from tiered_store.delta.trainable import TrainableTable

    (tmp_path / "ref").mkdir()
    plain, ref = make_plain_table(tmp_path), make_plain_table(tmp_path / "ref")
    trainable = make_trainable(tmp_path / "trainable.npy")
    ref_trainable = make_trainable(tmp_path / "ref" / "trainable.npy")
    for by in ("heads", "rows"):
        write_shards(plain, world, by, template=shards_template(plain, by), progress=False)
    write_shards(
        trainable, world, "rows", template=shards_template(trainable, "rows"), progress=False
    )
    out = tmp_path / "out"
    out.mkdir()
    codes = run_ranks(sharded_writes_worker, world, (str(plain), str(trainable), out), 120)
    results = _results(out, world)
    assert codes == [0] * world and not any("crash" in r for r in results), [
        r.get("crash") for r in results
    ]

    with TieredStore.open({"table": {"path": str(ref)}}) as single:
        for round_no in range(WRITE_ROUNDS):
            for rank in range(world):  # in one round, the highest rank's row of an id wins
                single.write(*write_round(round_no, rank, single.rows, single.row_width))
        want = single.lookup(torch.arange(single.rows)).view(torch.int16).numpy()
    assert "value 463 at flat position 0 is out of range" in results[0]["bad_id"]
    for rank, result in enumerate(results):
        assert "bad_id" not in result or rank == 0
        for by in ("heads", "rows"):
            assert result[f"{by}_first_step"] == 1
            others = "rank 0" if world == 2 else "ranks 0, 1"
            assert f"({others}: None; rank {world - 1}: 9)" in result[f"{by}_mismatch"]
            assert result[f"{by}_mismatch"].endswith("nothing was committed on any shard")
            assert result[f"{by}_step"] == result[f"{by}_reopened_step"] == 2
            assert np.array_equal(np.load(out / f"{by}_rank{rank}.npy"), want)
            assert np.array_equal(np.load(out / f"{by}_reopened_rank{rank}.npy"), want)
        # a shard whose commit fails is named on every rank, and no shard committed (the others
        # had, at step 3, leaving the shards at two steps): the next commit takes step 3
        assert f"rank {world - 1}: TierIOError" in result["commit_failed"]
        assert "being written (or compacted) by another store" in result["commit_failed"]
        assert "nothing was committed on any shard" in result["commit_failed"]
        assert result["step_after_failure"] == 3

    adam = make_row_optimizer("adam", lr=0.05)
    table = TrainableTable(TieredStore.open({"table": {"path": str(ref_trainable)}}), adam)
    for step in range(1, TRAIN_STEPS + 1):
        loss = sum(
            (table.lookup(ids) * weights).sum()
            for ids, weights in (train_batch(step, r) for r in range(world))
        )
        loss.backward()
        table.step(step)
    trained = table.store.lookup(torch.arange(TRAIN_ROWS)).numpy()
    table.close()
    assert not np.array_equal(trained, np.load(ref_trainable)), "training changed nothing"
    for rank, result in enumerate(results):
        assert np.array_equal(np.load(out / f"trained_rank{rank}.npy"), trained)
        assert sum(result["updated"]) > 0
    assert sum(sum(r["updated"]) for r in results) == sum(
        torch.unique(torch.cat([train_batch(s, r)[0].reshape(-1) for r in range(world)])).numel()
        for s in range(1, TRAIN_STEPS + 1)
    )


def test_rank_0_reads_the_others_health_in_a_thread_and_never_waits_on_a_hung_store(tmp_path):
    """The key-value store's host (torchrun's agent) stopped: rank 0's health answers at once,
    from its last read, and says when that read grows old (its /healthz waited on the store, and
    froze the server's event loop with it); once the host runs again, the line goes."""
    import os
    import signal
    from datetime import timedelta

    import torch.distributed as dist

    from tiered_store.serve.ranks import HEALTH_READ_S, RankHealth

    port = free_port()
    host = store_host(port)
    try:

        def client() -> dist.Store:
            store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
            store.set_timeout(timedelta(seconds=HEALTH_READ_S))
            return store

        RankHealth(client(), 1, 2).publish({"engram_layer1": "page 3 failed its checksum"})
        rank0, stop = RankHealth(client(), 0, 2), threading.Event()
        rank0.watch(0.1, stop)
        failed = "table engram_layer1: rank 1's checksum pass failed: page 3 failed its checksum"
        deadline = time.monotonic() + 10
        while rank0.problems() != [failed]:
            assert time.monotonic() < deadline, rank0.problems()
            time.sleep(0.05)
        os.kill(host.pid, signal.SIGSTOP)
        time.sleep(0.5)  # the watcher is waiting on the store now
        start = time.monotonic()
        assert rank0.problems() == [failed]
        assert time.monotonic() - start < 1.0  # a read of the stopped store never returns
        deadline = time.monotonic() + 2 * 0.1 + HEALTH_READ_S + 10
        while len(problems := rank0.problems()) == 1:
            assert time.monotonic() < deadline, problems
            time.sleep(0.1)
        assert problems[0] == failed
        assert problems[1].startswith("the other ranks' checksum passes were last read")
        os.kill(host.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while rank0.problems() != [failed]:  # read again
            assert time.monotonic() < deadline, rank0.problems()
            time.sleep(0.1)
        stop.set()
    finally:
        os.kill(host.pid, signal.SIGCONT)
        host.kill()
        host.join()


def test_a_heartbeat_write_that_fails_is_tried_again_and_the_rank_counts_as_alive():
    """The key-value store's host goes and another takes its address (writes fail meanwhile):
    each rank beats on, on a new connection (its heartbeat thread ended at the first failed
    write, and rank 0's /healthz watch said the rank had stopped for good, while it served)."""
    from datetime import timedelta

    import torch.distributed as dist

    from tiered_store.distributed.liveness import Heartbeat

    port = free_port()
    host = store_host(port)
    try:

        def client() -> dist.Store:
            return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))

        rank0, rank1 = Heartbeat(client(), 0, 2, 0.2), Heartbeat(client(), 1, 2, 0.2)
        assert (said := rank0.stopped()) is None
        host.kill()
        host.join()
        time.sleep(1.0)  # rank 1's writes fail meanwhile
        host = store_host(port)
        deadline, calm_since = time.monotonic() + 30, None
        while calm_since is None or time.monotonic() - calm_since < 1.5:  # 7 beats in a row
            assert time.monotonic() < deadline, said
            said = rank0.stopped()
            if said is None and rank1._thread.is_alive():
                calm_since = calm_since or time.monotonic()
            else:  # a reconnect takes up to the client's timeout meanwhile
                calm_since = None
            time.sleep(0.1)
        rank1.close()
        assert rank0.stopped() == "rank 1 closed its store"
        rank0.close()
    finally:
        host.kill()
        host.join()


def test_a_rank_whose_own_part_began_during_a_diagnosis_is_not_named_as_hanging():
    """A diagnosis (rank 0's round failed: another rank died, say) named a rank "serving" from
    its second reading alone: a healthy rank whose own part of the round began between the two
    readings (a large lookup) was said to hang. It is named when serving at both readings, as a
    silent rank is named when its beat did not move between them."""
    import contextlib
    from datetime import timedelta

    import torch.distributed as dist

    from tiered_store.distributed.liveness import Heartbeat

    port = free_port()
    host = store_host(port)
    try:

        def client() -> dist.Store:
            return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))

        rank0, rank1 = Heartbeat(client(), 0, 2, 1.0), Heartbeat(client(), 1, 2, 1.0)
        for beat in (rank0, rank1):
            beat.enter("lookup")
        with contextlib.ExitStack() as part:  # begins a beat into the diagnosis's 3 beats
            threading.Timer(1.0, part.enter_context, (rank1.own_part(),)).start()
            found = rank0.diagnose()
            assert rank1.serving, "rank 1's part never began"
        assert found.serving == () and found.describe(3.0) == "no rank was found silent or behind"
        with rank1.own_part():  # in its part through both readings: named
            time.sleep(1.5)  # a beat says so
            found = rank0.diagnose()
        assert found.serving == (1,), found
        rank0.close()
        rank1.close()
    finally:
        host.kill()
        host.join()


def test_a_beat_taken_as_a_rank_enters_a_round_never_pairs_its_new_count_with_the_old_kind():
    """The store's thread set a round's count and its kind as two fields: a beat between the
    two wrote the new count with the old kind, which a diagnosis then read as a rank in another
    kind of round ("elsewhere", every rank told to call the same rounds in the same order) when
    it had just entered this one. A beat at every line of ``enter`` and ``own_part`` writes
    an entry of one moment."""
    import sys
    from datetime import timedelta

    import torch.distributed as dist

    from tiered_store.distributed.liveness import Heartbeat

    port = free_port()
    host = store_host(port)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        beat = Heartbeat(store, 1, 2, 60.0, connection=store, kind="write")
        entries = set()

        def beat_at_each_line(frame, event, arg):  # as the beat thread may, between two lines
            if event == "line":
                beat._publish()
                entries.add(tuple(store.get("hb/1").decode().split()[1:]))
            return beat_at_each_line

        def trace(frame, event, arg):
            own = frame.f_code in (
                Heartbeat.enter.__code__,
                Heartbeat.own_part.__wrapped__.__code__,
            )
            return beat_at_each_line if own else None

        sys.settrace(trace)
        try:
            beat.enter("lookup")
            with beat.own_part():
                pass
        finally:
            sys.settrace(None)
        beat._publish()
        entries.add(tuple(store.get("hb/1").decode().split()[1:]))
        assert entries == {
            ("0", "open", "write"),
            ("1", "open", "lookup"),
            ("1", "serving", "lookup"),
        }, entries
        beat.close()
    finally:
        host.kill()
        host.join()


def test_closing_a_heartbeat_whose_store_host_is_gone_ends_its_thread():
    """The store's host gone (rank 0 exited first): close ends the heartbeat thread (it stayed
    in a reconnect for the group store's whole timeout, past close's wait, and a rank that exited
    meanwhile aborted with SIGABRT when that call returned into the finalising interpreter)."""
    from datetime import timedelta

    import torch.distributed as dist

    from tiered_store.distributed.liveness import Heartbeat

    port = free_port()
    host = store_host(port)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=20))
        beat = Heartbeat(store, 1, 2, 0.2)
        host.kill()
        host.join()
        time.sleep(1.0)  # beats fail: the thread reconnects
        start = time.monotonic()
        beat.close()
        assert not beat._thread.is_alive(), "the heartbeat thread outlived close"
        assert time.monotonic() - start < 10  # not the group store's 20 s timeout
    finally:
        host.kill()
        host.join()


def test_a_heartbeat_reads_every_ranks_entry_in_one_round_trip_when_all_are_there():
    """Heartbeat.absent (an open's wait for every rank) checked each rank's entry with a round
    trip of its own to the group's store, and a diagnosis or rank 0's health watch read each
    entry with two (a check, a get): 2 x (world - 1) per reading. One check of every key says
    whether all are there, one multi_get reads them; per-rank checks only name the absent."""
    from datetime import timedelta

    import torch.distributed as dist

    from tiered_store.distributed.liveness import Heartbeat

    class Counted:
        """A real store, its calls counted by name."""

        def __init__(self, store: dist.Store) -> None:
            self.store, self.calls = store, []

        def __getattr__(self, name: str):
            self.calls.append(name)
            return getattr(self.store, name)

    port = free_port()
    host = store_host(port)
    beats = []
    try:
        group = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=20))
        store = dist.PrefixStore("hb-test/", group)
        counted = Counted(store)
        beats = [Heartbeat(counted, 0, 6, 60.0, store.clone())]
        beats += [Heartbeat(store.clone(), r, 6, 60.0) for r in (2, 4)]
        assert beats[0].absent(0.0) == (1, 3, 5)
        assert set(beats[0]._read(counted)) == {2, 4}
        beats += [Heartbeat(store.clone(), r, 6, 60.0) for r in (1, 3, 5)]
        counted.calls.clear()
        assert beats[0].absent(0.0) == ()
        assert counted.calls == ["check"]
        counted.calls.clear()
        read = beats[0]._read(counted)
        assert sorted(read) == [1, 2, 3, 4, 5] and read[3][2:] == ("open", "none"), read
        assert counted.calls == ["check", "multi_get"]
    finally:
        for beat in beats:
            beat.close()
        host.kill()
        host.join()


def test_diagnose_waits_for_a_store_host_slow_to_answer_before_calling_it_unreachable():
    """diagnose's connection to the group's store was cloned from the heartbeat's short-timeout
    one, so it had 1 s to connect: a host slow to accept (a loaded machine; here, one that comes
    back after 2 s) was reported unreachable, "rank 0 died", where the rank that stopped should
    have been named. It connects with the group store's timeout again; only the beat's own
    reconnects are short."""
    from datetime import timedelta

    import torch.distributed as dist

    from tiered_store.distributed.liveness import Heartbeat

    port = free_port()
    hosts = [store_host(port)]
    try:
        group = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=20))
        store = dist.PrefixStore("hb-test/", group)  # as ShardedStore gives its heartbeats
        rank0, rank1 = Heartbeat(store, 0, 2, 0.2), Heartbeat(store.clone(), 1, 2, 0.2)
        rank1.stop()  # rank 1 stops beating: diagnose must name it
        hosts[0].kill()
        hosts[0].join()
        threading.Timer(2.0, lambda: hosts.append(store_host(port))).start()
        diagnosis = rank0.diagnose()
        assert diagnosis.store_error is None, diagnosis
        assert diagnosis.silent == (1,), diagnosis
        rank0.close()
    finally:
        time.sleep(0.5)  # the timer's host, if it was late
        for host in hosts:
            host.kill()
            host.join()


def test_a_sharded_stores_diagnosis_waits_for_a_slow_host_yet_names_a_gone_one_in_time():
    """A ShardedStore's diagnosis connects through the process's diagnosis template within
    diagnosis_connect_s(timeout_s): with timeout_s / 2 alone, a store host back after 2 s was
    called unreachable ("rank 0 died") at timeout_s = 2; a host that never comes back is named
    within 2-3 x the 3 s floor (at a timeout_s of 12 and more, within the timeout: the killed
    rank 0 tests; with the group's own timeout it took 25-32 s at 12)."""
    timeout_s, named_within_s = 2.0, 10.0
    from datetime import timedelta

    import torch.distributed as dist

    from tiered_store.distributed.liveness import Heartbeat, shared_connection
    from tiered_store.distributed.sharded_store import diagnosis_connect_s

    port = free_port()
    hosts = [store_host(port)]
    try:
        group = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
        template = dist.PrefixStore("hb-test/", shared_connection(group, "diagnosis"))
        store = dist.PrefixStore("hb-test/", group)
        rank0 = Heartbeat(store, 0, 2, 0.2, None, template, diagnosis_connect_s(timeout_s))
        rank1 = Heartbeat(store.clone(), 1, 2, 0.2)
        rank1.stop()  # rank 1 stops beating: diagnose must name it
        hosts[0].kill()
        hosts[0].join()
        threading.Timer(2.0, lambda: hosts.append(store_host(port))).start()
        diagnosis = rank0.diagnose()
        assert diagnosis.store_error is None and diagnosis.silent == (1,), diagnosis
        time.sleep(0.5)  # the timer's host is up
        for host in hosts:  # now the host is gone for good
            host.kill()
            host.join()
        start = time.monotonic()
        diagnosis = rank0.diagnose()
        assert diagnosis.store_error is not None, diagnosis
        assert time.monotonic() - start <= named_within_s
        rank0.stop()
    finally:
        for host in hosts:
            host.kill()
            host.join()


def test_rank_0s_watch_of_the_other_ranks_ends_with_its_server(tmp_path, monkeypatch):
    """Rank 0's thread reading the other ranks' health was never joined: stop() returned, and
    the process exited, with it possibly inside a TCPStore call, which aborts the process if
    the call returns while the interpreter exits. stop() now ends it."""
    from tiered_store.serve import ServeConfig
    from tiered_store.serve.ranks import RankHealth
    from tiered_store.serve.server import InferenceServer

    _one_rank_group_env(monkeypatch)
    config_path = _sharded_serve_config(tmp_path, ranks=1)
    read = RankHealth._read
    reading = threading.Event()

    def slow_read(self):  # a read of a slow store: under way when stop() comes
        reading.set()
        time.sleep(3.0)
        return read(self)

    monkeypatch.setattr(RankHealth, "_read", slow_read)
    config = ServeConfig.from_yaml(config_path)
    server = InferenceServer(config.with_overrides(address="127.0.0.1:0", metrics_address=""))
    server.start()
    watching = [t for t in threading.enumerate() if t.name == "tiered-store-rank-health"]
    assert reading.wait(10)
    server.stop()
    assert len(watching) == 1 and not watching[0].is_alive()


def test_rank_0s_watch_ends_with_its_server_when_torchruns_store_host_is_gone(
    tmp_path, monkeypatch
):
    """The group's store hosted by torchrun's agent, which died while rank 0 served: each read of
    the watch connected to it anew, which torch tries twice (5 s at a 10 s timeout_s, 30-45 s at
    the default), and stop() left the thread inside that connect after its 4 s wait (it aborts
    the process if the call returns while the interpreter exits). It connects once a plain
    socket reaches the host now."""
    from tiered_store.distributed.liveness import Heartbeat
    from tiered_store.serve import ServeConfig
    from tiered_store.serve.served_model import ServedModel
    from tiered_store.serve.server import InferenceServer

    port = free_port()
    host = store_host(port)
    _one_rank_group_env(monkeypatch)
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # rank 0 a client, as torchrun's
    config_path = _sharded_serve_config(tmp_path, ranks=1)
    watch, stopped, reading = ServedModel.watch_ranks, Heartbeat.stopped, threading.Event()

    def host_gone_first(self, stop):  # the stores are open: the agent dies before the first read
        host.kill()
        host.join()
        return watch(self, stop)

    def noted(self):
        reading.set()
        return stopped(self)

    monkeypatch.setattr(ServedModel, "watch_ranks", host_gone_first)
    monkeypatch.setattr(Heartbeat, "stopped", noted)
    config = ServeConfig.from_yaml(config_path)
    server = InferenceServer(config.with_overrides(address="127.0.0.1:0", metrics_address=""))
    try:
        server.start()
        watching = [t for t in threading.enumerate() if t.name == "tiered-store-rank-health"]
        assert reading.wait(10)
        server.stop()
        assert len(watching) == 1 and not watching[0].is_alive()
    finally:
        server.stop()
        host.kill()
        host.join()


_GONE_HOST_FOLLOWER = """
import sys, time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from tiered_store.distributed.liveness import Heartbeat

port, gone = int(sys.argv[1]), Path(sys.argv[2])
store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=20))
beat = Heartbeat(dist.PrefixStore("hb-test", store), 1, 2, 0.2)
print("beating", flush=True)
while not gone.exists():  # the test's stop file
    time.sleep(0.05)
beat.close()
print(beat._thread.is_alive(), flush=True)
"""


def test_a_heartbeat_whose_store_host_is_gone_logs_two_lines_not_a_stack_per_beat(tmp_path):
    """A follower outliving its store's host (rank 0 exited or crashed first) wrote torch's C++
    warnings, each with its whole stack, to stderr at every beat (17 KB in 3 s at a 0.2 s beat;
    kilobytes a beat at the default one) for as long as it lived. Now: the first failed write's
    warning (torch's, before any Python sees the error), one line when the beats start failing,
    one when a host is back, whose store then holds the rank's beat promptly."""
    from datetime import timedelta

    import torch.distributed as dist

    script, stop = tmp_path / "follower.py", tmp_path / "stop"
    script.write_text(_GONE_HOST_FOLLOWER)
    port = free_port()
    host = store_host(port)
    follower = PythonProcess([script, port, stop])
    try:
        assert follower.stdout.readline() == "beating\n"
        host.kill()
        host.join()
        time.sleep(4.0)  # 20 beats with the host gone
        host = store_host(port)
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=20))
        store = dist.PrefixStore("hb-test", client)  # the follower's keys
        start = time.monotonic()
        while not store.check(["hb/1"]):
            assert time.monotonic() - start < 5.0, "the rank's beat never reached the new host"
            time.sleep(0.05)
        stop.touch()
        out, err = follower.communicate(timeout=60)
        assert store.get("hb/1").decode().split()[2] == "closed"
    finally:
        stop.touch()
        if follower.poll() is None:
            follower.kill()
        host.kill()
        host.join()
    assert follower.returncode == 0, err
    assert out == "False\n"  # the heartbeat thread ended at close
    assert err.count("[c10d]") <= 1, err  # torch's warning of the first failed write alone
    assert len(err) < 4000, f"{len(err)} bytes on stderr:\n{err}"
    assert err.count("cannot reach the process group's store") == 1, err
    assert err.count("reaches the process group's store again") == 1, err


def test_a_heartbeat_closes_at_once_when_its_store_host_accepts_but_never_answers(tmp_path):
    """A beat's write failed (the host gone), then something took the host's address that accepts
    connections and never answers (a hung host: the kernel accepts for it). close() made a new
    connection to write 'closed' on, and torch's connect waits for its handshake's answer with no
    timeout: the rank's close, and its exit, hung for good. close() now writes on a sound
    connection only."""
    import socket

    script, stop = tmp_path / "follower.py", tmp_path / "stop"
    script.write_text(_GONE_HOST_FOLLOWER)
    port = free_port()
    host = store_host(port)
    follower, mute = PythonProcess([script, port, stop]), None
    try:
        assert follower.stdout.readline() == "beating\n"
        host.kill()
        host.join()
        time.sleep(1.0)  # the beats fail meanwhile
        mute = socket.create_server(("127.0.0.1", port), backlog=16)  # never accepts
        time.sleep(1.0)  # a beat's reconnect is waiting on it now
        stop.touch()
        start = time.monotonic()
        out, err = follower.communicate(timeout=60)
        took = time.monotonic() - start
    finally:
        stop.touch()
        if follower.poll() is None:
            follower.kill()
        if mute is not None:
            mute.close()
    assert follower.returncode == 0, err
    assert took < 20, f"close took {took:.1f} s"  # stop()'s bound on the stuck beat: 5.2 s
    assert err.count("cannot reach the process group's store") == 1, err


def test_a_script_exiting_without_close_with_rounds_queued_fails_them_and_ends_the_running_one(
    tmp_path, monkeypatch
):
    """The collective thread is a daemon: a script that exited without ``close()`` with rounds
    under way left it inside a torch op as the interpreter ended (and its group destroyed under
    it), and the process aborted now and then ('terminate called without an active exception',
    exit status 134); the rounds queued stayed pending for good. At the exit the round under way
    ends first and those queued fail naming the exit, as does a lookup made after it: a hook the
    script registers first (so it runs last) finds every handle done."""
    import subprocess
    import sys
    import textwrap

    cfg = _one_rank_sharded_config(tmp_path, monkeypatch, timeout_s=20)
    script = textwrap.dedent(
        f"""
        import atexit
        state = {{}}

        def late():  # registered first: runs after the store's exit hooks
            store, ids, handles = state["store"], state["ids"], state["handles"]
            print(*("done" if h.done() else "left" for h in handles))
            for call in (lambda: store.lookup(ids, handles[1]), lambda: store.lookup(ids)):
                try:
                    call()
                except Exception as exc:
                    print(type(exc).__name__, "|", exc)

        atexit.register(late)
        import time, torch
        from tiered_store.distributed import ShardedStore

        store = ShardedStore.open({cfg!r})
        thread = store._thread

        def round_under_way():  # ends once the exit began (the others still queued then)
            while not getattr(thread, "_exited", False):
                time.sleep(0.01)

        ids = torch.arange(0, store.rows, 3)
        state.update(store=store, ids=ids, handles=[thread.submit(round_under_way)])
        state["handles"] += [store.prefetch(ids), store.prefetch(ids)]
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert (proc.returncode, proc.stderr) == (0, ""), proc
    done, queued, late = proc.stdout.splitlines()
    assert done == "done done done"
    at_exit = "StoreClosedError | sharded store: this call was queued as the interpreter exited"
    assert queued.startswith(at_exit), queued
    assert late.startswith(at_exit), late


def test_a_forked_child_refuses_the_parents_sharded_store_at_once_naming_both_processes(
    tmp_path, monkeypatch
):
    """A child forked from a rank has no collective thread (nor a place of its own in the
    group): its lookup through the parent's store waited out ``sharding.timeout_s`` and failed
    as 'no rank was found silent or behind', and its copy of a prefetch queued at the fork
    stayed pending. In the child both fail at once naming the two processes; the parent's
    store goes on."""
    import subprocess
    import sys
    import textwrap

    cfg = _one_rank_sharded_config(tmp_path, monkeypatch, timeout_s=60)
    script = textwrap.dedent(
        f"""
        import os, threading, torch
        from tiered_store.distributed import ShardedStore

        store = ShardedStore.open({cfg!r})
        ids = torch.arange(0, store.rows, 3)
        want = store.lookup(ids)
        release = threading.Event()
        store._thread.submit(release.wait, 60)  # the thread held: the prefetch queued
        handle = store.prefetch(ids)
        pid = os.fork()
        if pid == 0:
            try:
                error = handle.future.exception(timeout=10)
                print(type(error).__name__, "|", error)
            except TimeoutError:
                print("pending")
            try:
                store.lookup(ids)
            except Exception as exc:
                print(type(exc).__name__, "|", exc)
            os._exit(0)
        os.waitpid(pid, 0)
        release.set()
        print(torch.equal(store.lookup(ids, handle), want), pid, os.getpid())
        store.close()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert (proc.returncode, proc.stderr) == (0, ""), proc
    queued, lookup, parent = proc.stdout.splitlines()
    same, child, pid = parent.split()
    assert same == "True"
    forked = (
        f"StoreClosedError | sharded store: opened in process {pid}, which forked this one "
        f"({child}): its rounds run only there"
    )
    assert queued.startswith(forked), queued
    assert lookup.startswith(forked), lookup


def test_a_forked_childs_close_of_the_parents_sharded_store_leaves_the_parents_rank_open(
    tmp_path, monkeypatch
):
    """A child forked from a rank that closed its copy of the store (a worker's cleanup) marked
    the parent's rank closed in the group's heartbeats, over the parent's own connection to the
    group's store (the other ranks' diagnosis would read the parent as gone). The child's close
    closes its copy of the shard only; the parent's entry says it is open, and it looks up."""
    import subprocess
    import sys
    import textwrap

    cfg = _one_rank_sharded_config(tmp_path, monkeypatch, timeout_s=60)
    script = textwrap.dedent(
        f"""
        import os, torch
        from tiered_store.distributed import ShardedStore

        store = ShardedStore.open({cfg!r})
        ids = torch.arange(0, store.rows, 3)
        want = store.lookup(ids)
        pid = os.fork()
        if pid == 0:
            print(store.close(), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print(store._heartbeat._store.get("hb/0").decode().split()[2])
        print(torch.equal(store.lookup(ids), want))
        store.close()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert (proc.returncode, proc.stderr) == (0, ""), proc
    assert proc.stdout.split() == ["True", "open", "True"], proc


def test_a_grandchild_of_a_rank_refusing_its_sharded_store_names_how_it_was_forked(
    tmp_path, monkeypatch
):
    """A child of a child forked from a rank was told the rank's store was 'opened in process
    P, which forked this one', and P did not: its parent did. The refusal names the process
    that forked this one and the one the store was opened in."""
    import subprocess
    import sys
    import textwrap

    cfg = _one_rank_sharded_config(tmp_path, monkeypatch, timeout_s=60)
    script = textwrap.dedent(
        f"""
        import os, torch
        from tiered_store.distributed import ShardedStore

        store = ShardedStore.open({cfg!r})
        ids = torch.arange(0, store.rows, 3)
        store.lookup(ids)
        pid = os.fork()
        if pid == 0:
            grandchild = os.fork()
            if grandchild == 0:
                try:
                    store.lookup(ids)
                except Exception as exc:
                    print(type(exc).__name__, "|", exc, flush=True)
                os._exit(0)
            os.waitpid(grandchild, 0)
            print(os.getpid(), grandchild, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.getpid())
        store.close()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert (proc.returncode, proc.stderr) == (0, ""), proc
    lookup, pids, rank = proc.stdout.splitlines()
    child, grandchild = pids.split()
    assert lookup.startswith(
        f"StoreClosedError | sharded store: opened in process {rank}, from which this one "
        f"({grandchild}) was forked (by process {child}): its rounds run only there"
    ), lookup


def test_the_exits_waits_for_rounds_and_fetches_under_way_end_by_one_deadline(
    tmp_path, monkeypatch
):
    """The exit waited ``prefetch.EXIT_WAIT_S`` for a sharded store's round under way and as
    long again for the fetches under way: each exit hook took its own deadline from its start.
    Both end by one deadline, ``EXIT_WAIT_S`` from the first hook's start ("in all")."""
    import subprocess
    import sys
    import textwrap

    cfg = _one_rank_sharded_config(tmp_path, monkeypatch, timeout_s=60)
    script = textwrap.dedent(
        f"""
        import torch
        from tiered_store import prefetch
        from tiered_store.distributed import ShardedStore, collective_thread
        from tiered_store.store import TieredStore

        prefetch.EXIT_WAIT_S = 3600.0
        for cls in (collective_thread.CollectiveThread, prefetch.RunnerPool):
            def noted(self, deadline, original=cls.end_at_exit, name=cls.__name__):
                print(name, repr(deadline), flush=True)
                return original(self, deadline)
            cls.end_at_exit = noted
        store = ShardedStore.open({cfg!r})
        store.lookup(torch.arange(0, store.rows, 3))
        plain = TieredStore.open({{"table": {cfg["table"]!r}}})
        plain.lookup(torch.arange(4), plain.prefetch(torch.arange(4)))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert (proc.returncode, proc.stderr) == (0, ""), proc
    seen = [line.split() for line in proc.stdout.splitlines()]
    assert [name for name, _ in seen][:1] == ["CollectiveThread"], proc.stdout
    assert "RunnerPool" in [name for name, _ in seen], proc.stdout
    assert len({deadline for _, deadline in seen}) == 1, proc.stdout
