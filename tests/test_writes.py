"""Writes through the store: visibility, write-back on eviction, commit durability, the delta's CRC,
bad input, and a table without a delta left alone."""

from __future__ import annotations

import contextlib
import re
import signal
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from tests import forkserver
from tests.conftest import check_cache_invariants, make_table, store_config
from tiered_store import TieredStore, create_table
from tiered_store.delta.compaction import compact_table
from tiered_store.delta.row_delta import RowDelta, delta_path
from tiered_store.errors import (
    CommitError,
    DeltaCorruptError,
    RowDataError,
    RowIdError,
    TableFormatError,
)


def _random_rounds(store, reference, rng, rounds, commit_every):
    """Interleave writes, lookups and commits; returns the reference as of the last commit."""
    committed = reference.clone()
    for r in range(rounds):
        ids = torch.from_numpy(rng.choice(store.rows, 24, replace=False))
        rows = torch.from_numpy(rng.standard_normal((24, store.dim)).astype(np.float32))
        store.write(ids, rows)
        reference[ids] = rows
        probe = torch.from_numpy(rng.integers(0, store.rows, 40))
        assert torch.equal(store.lookup(probe), reference[probe]), f"round {r}"
        if r % commit_every == commit_every - 1:
            store.commit()
            committed = reference.clone()
    return committed


def test_writes_are_seen_evicted_written_back_and_committed(tmp_path):
    path, table = make_table(tmp_path, rows=300, dim=8)
    cfg = store_config(path, hot={"capacity": 8}, warm={"capacity": 16})
    reference = table.clone()
    rng = np.random.default_rng(1)
    with TieredStore(cfg) as store:
        committed = _random_rounds(store, reference, rng, rounds=60, commit_every=7)
        stats = store.stats()["writes"]
        assert stats["spilled_rows"] > 0  # dirty rows left the small tiers through write-back
        assert stats["commits"] == 60 // 7
        assert torch.equal(store.lookup(torch.arange(300)), reference)  # uncommitted still seen
    assert store.committed_step == 60 // 7 == store.stats()["writes"]["committed_step"]  # closed
    with TieredStore(cfg) as store:  # reopened: exactly the last commit, uncommitted rows gone
        assert store.committed_step == 60 // 7
        assert torch.equal(store.lookup(torch.arange(300)), committed)
        assert not torch.equal(committed, reference)


def test_the_last_of_repeated_ids_wins(tmp_path):
    path, _ = make_table(tmp_path, rows=10, dim=2)
    with TieredStore(store_config(path, hot={"capacity": 2})) as store:
        store.write(torch.tensor([[3, 5], [3, 3]]), torch.arange(8.0).reshape(2, 2, 2))
        assert store.lookup([3, 5]).tolist() == [[6.0, 7.0], [2.0, 3.0]]


def test_a_table_without_writes_keeps_the_read_path(tmp_path):
    path, table = make_table(tmp_path, rows=100, dim=4)
    with TieredStore(store_config(path, hot={"capacity": 4})) as store:
        assert torch.equal(store.lookup(torch.arange(100)), table)
        assert store._writes is None and "writes" not in store.stats()
        assert store.hot.before_evict is None and store.warm.before_evict is None
        assert store.committed_step == 0
    assert not delta_path(path).exists()


@contextlib.contextmanager
def _delta_records(tmp_path, rows: list[int]):
    """A 50 x 4 table whose ``rows`` are committed as ones, with no cache tier: yields (its path,
    its store config, a write transaction on its delta's records, keyed by the row id as 8
    big-endian bytes) to damage them in."""
    path, _ = make_table(tmp_path, rows=50, dim=4)
    cfg = store_config(path, hot={"capacity": 0}, warm={"capacity": 0})
    with TieredStore(cfg) as store:
        store.write(rows, torch.ones(len(rows), 4))
        store.commit()
    env = lmdb.open(str(delta_path(path)), max_dbs=3)
    try:
        with env.begin(write=True, db=env.open_db(b"rows")) as txn:
            yield path, cfg, txn
    finally:
        env.close()


def test_a_row_failing_its_crc_is_a_typed_error(tmp_path):
    with _delta_records(tmp_path, [7]) as (_, cfg, txn):  # flip one byte of row 7's payload
        key = (7).to_bytes(8, "big")
        value = bytearray(txn.get(key))
        value[-1] ^= 0x40
        txn.put(key, bytes(value))
    with TieredStore(cfg) as store:
        assert store.lookup([6]).shape == (1, 4)  # rows outside the delta still read
        with pytest.raises(DeltaCorruptError, match="row 7 .* fails its CRC32C"):
            store.lookup([7])


def test_a_record_under_another_rows_key_is_named_as_such_not_as_a_crc_failure(tmp_path):
    """A whole record put under another row's key (a damaged key: the key is outside the CRC)
    passes its CRC32C; the error said it failed it, with equal stored and computed values."""
    with _delta_records(tmp_path, [8]) as (path, cfg, txn):  # row 8's record under row 9's key
        txn.put((9).to_bytes(8, "big"), txn.get((8).to_bytes(8, "big")))
    with TieredStore(cfg) as store, pytest.raises(DeltaCorruptError) as caught:
        store.lookup([9])
    message = str(caught.value)
    assert "row 9 in" in message and "holds the record of row 8" in message, message
    assert "fails its CRC32C" not in message, message
    with pytest.raises(DeltaCorruptError, match="holds the record of row 8"):
        compact_table(path, progress=False)


@pytest.mark.parametrize("extra", [b"\0" * 4, None])
def test_a_record_of_another_size_names_its_row_and_size(tmp_path, extra):
    """A row's record 4 bytes long or short (another table's, a damaged value) was reported as
    'values of 37.3 bytes on average' of the whole lookup, naming no row."""
    with _delta_records(tmp_path, [3, 8, 9]) as (path, cfg, txn):
        key = (8).to_bytes(8, "big")
        value = txn.get(key)
        txn.put(key, value + extra if extra else value[:-4])
    size = 24 + 16 + (4 if extra else -4)
    with TieredStore(cfg) as store, pytest.raises(DeltaCorruptError) as caught:
        store.lookup([3, 8, 9])
    assert f"row 8 in {delta_path(path)} holds a {size}-byte record; expected 40" in str(
        caught.value
    )
    with pytest.raises(DeltaCorruptError, match=f"row 8 in .* holds a {size}-byte record"):
        compact_table(path, progress=False)


def test_bad_writes_are_typed_errors_and_change_nothing(tmp_path):
    path, table = make_table(tmp_path, rows=20, dim=4)
    with TieredStore(store_config(path)) as store:
        with pytest.raises(RowDataError, match=r"shape \(2, 3\); expected \(2, 4\)"):
            store.write([1, 2], torch.zeros(2, 3))
        with pytest.raises(RowDataError, match="non-finite"):
            store.write([1, 2], torch.tensor([[0.0] * 4, [float("nan")] * 4]))
        with pytest.raises(RowIdError, match="out of range"):
            store.write([1, 20], torch.zeros(2, 4))
        inexact = r"row 1 holds the integer 16777217, which float32 .* cannot hold exactly"
        with pytest.raises(RowDataError, match=inexact):  # it was stored as 16777216
            store.write([1, 2], [[0, 1, 2, 3], [4, 5, 6, 16777217]])
        store.commit()
        assert torch.equal(store.lookup(torch.arange(20)), table)
        store.write([3], [[1, 2, 3, 16777216]])  # integers float32 holds: written as given
        assert store.lookup([3]).tolist() == [[1.0, 2.0, 3.0, 16777216.0]]
        store.commit()


def test_meta_and_sparse_tensors_as_rows_or_ids_are_named_and_change_nothing(tmp_path):
    """A meta or sparse tensor given to write or lookup failed with torch's own error ('Cannot
    copy out of meta tensor', 'reshape is not implemented for sparse tensors', 'Tensor.item()
    cannot be called on meta tensors'), naming neither the argument nor what was expected."""
    path, table = make_table(tmp_path, rows=20, dim=4)
    meta = r"tensor {} is on the meta device \(a shape without data\); expected a tensor holding"
    sparse = r"tensor {} has layout torch.sparse_coo; expected a dense \(strided\) tensor"
    with TieredStore(store_config(path)) as store:
        with pytest.raises(RowDataError, match="^rows: " + meta.format(r"float32 \(2, 4\)")):
            store.write([1, 2], torch.empty(2, 4, device="meta"))
        with pytest.raises(RowDataError, match="^rows: " + sparse.format(r"float32 \(2, 4\)")):
            store.write([1, 2], torch.ones(2, 4).to_sparse())
        for ids, message in (
            (torch.empty(2, dtype=torch.int64, device="meta"), meta),
            (torch.tensor([1, 0, 2]).to_sparse(), sparse),
        ):
            shape = rf"int64 \({ids.shape[0]},\)"
            with pytest.raises(RowIdError, match="^ids: " + message.format(shape)):
                store.lookup(ids)
            with pytest.raises(RowIdError, match="^ids: " + message.format(shape)):
                store.write(ids, torch.ones(ids.shape[0], 4))
        # nested tensors (strided: .shape raises; jagged): torch's 'NestedTensorImpl doesn't
        # support sizes' or a reshape error, and for jagged a to_dense() hint that fails too
        nested = r"is a nested tensor \(its entries may differ in shape\); expected a dense tensor"
        strided = torch.nested.nested_tensor([torch.tensor([1, 2]), torch.tensor([3])])
        jagged = torch.nested.nested_tensor(
            [torch.tensor([1, 2]), torch.tensor([3])], layout=torch.jagged
        )
        for ids, shape in ((strided, r"nested \(2 tensors\)"), (jagged, r"\(2, j\d+\)")):
            with pytest.raises(RowIdError, match=rf"^ids: tensor int64 {shape} {nested}"):
                store.lookup(ids)
            with pytest.raises(RowIdError, match=rf"^ids: tensor int64 {shape} {nested}"):
                store.write(ids, torch.ones(2, 4))
        rows = torch.nested.nested_tensor([torch.ones(4), torch.ones(4)])
        with pytest.raises(
            RowDataError, match=rf"^rows: tensor float32 nested \(2 tensors\) {nested}"
        ):
            store.write([1, 2], rows)
        store.commit()
        assert torch.equal(store.lookup(torch.arange(20)), table)


@pytest.mark.parametrize(
    "tiers", [{}, {"hot": {"capacity": 4}}, {"hot": {"capacity": 4, "index": "hashed"}}]
)
def test_ids_outside_the_table_read_as_zeros_but_are_never_written(tmp_path, tiers):
    """``out_of_range: zero`` is for lookups: a write or a committed read outside the table is a
    RowIdError, and nothing reaches the delta (an id -1 there sorted last in it, and compaction
    then put committed rows back to their base or wrote rows no one wrote)."""
    path, table = make_table(tmp_path, rows=20, dim=4)
    config = {"table": {"path": str(path), "out_of_range": "zero"}, "tiers": tiers}
    with TieredStore.open(config) as store:
        assert store.lookup([-1, 20]).abs().sum() == 0
        for ids in ([5, -1], [5, 10, 20]):
            with pytest.raises(RowIdError, match=r"out of range; expected 0 <= id < 20"):
                store.write(ids, torch.full((len(ids), 4), 7.0))
            with pytest.raises(RowIdError, match="out of range"):
                store.read_committed(ids)
        store.write([5], torch.full((1, 4), 7.0))
        store.commit()
    compact_table(path, progress=False)
    with TieredStore.open(config) as store:
        expected = table.clone()
        expected[5] = 7.0
        assert torch.equal(store.lookup(torch.arange(20)), expected)


def test_a_full_map_grows_and_the_commit_goes_through(tmp_path):
    delta = RowDelta(tmp_path / "t.delta", row_bytes=4096, create=True, map_bytes=1 << 16)
    rows = np.random.default_rng(0).integers(0, 255, (64, 4096), dtype=np.uint8)
    delta.commit(np.arange(64), rows, step=3)
    assert delta.map_grows > 0 and delta.step == 3
    found, back = delta.read(np.arange(64))
    assert found.all() and np.array_equal(back, rows)
    delta.close()


def _fill(path, steps):
    """Commit 64 rows of 4 KiB ``steps`` times to the delta at ``path`` (a map of 64 KiB)."""
    writer = RowDelta(path, row_bytes=4096, create=True, map_bytes=1 << 16)
    rows = np.zeros((64, 4096), dtype=np.uint8)
    for step in range(1, steps + 1):
        writer.commit(np.arange(64), rows + step, step=step)
    grows = writer.map_grows
    writer.close()
    return grows


def test_a_map_that_grows_never_ends_a_pinned_readers_view(tmp_path):
    """In this process, a commit that must grow the map while another handle holds a pinned
    commit is refused (growing would end that view), and goes through once it closes. A reader
    pinned while another process grew the map sees that as a newer commit (stale), and opening
    the delta again here names the store to close first."""
    from tests import forkserver
    from tiered_store.delta.row_delta import GREW_STEP
    from tiered_store.errors import CommitError, TierIOError

    path = tmp_path / "t.delta"
    writer = RowDelta(path, row_bytes=4096, create=True, map_bytes=1 << 16)
    writer.commit(np.arange(4), np.ones((4, 4096), dtype=np.uint8), step=1)
    reader = RowDelta(path, row_bytes=4096)
    reader.pin()
    rows = np.full((64, 4096), 2, dtype=np.uint8)
    with pytest.raises(CommitError, match="another store of this table in this process holds"):
        writer.commit(np.arange(64), rows, step=2)
    assert reader.step == 1 and reader.read(np.array([0]))[1][0, 0] == 1  # its view, whole
    reader.close()
    writer.commit(np.arange(64), rows, step=2)
    assert writer.map_grows > 0
    writer.close()

    other = tmp_path / "o.delta"
    RowDelta(other, row_bytes=4096, create=True, map_bytes=1 << 16).close()
    reader = RowDelta(other, row_bytes=4096, map_bytes=1 << 16)
    reader.pin()
    with forkserver.context().Pool(1) as pool:
        assert pool.apply(_fill, (other, 4)) > 0  # another process grew the map
    assert reader.latest_step() == GREW_STEP and reader.step == 0  # stale, its view whole
    with pytest.raises(TierIOError, match="grew in another process .* close it, then open"):
        RowDelta(other, row_bytes=4096)
    reader.close()
    again = RowDelta(other, row_bytes=4096)  # the last handle closed: the new map is read
    assert again.latest_step() == again.step == 4
    again.close()


def test_reads_in_other_threads_never_fail_while_a_commit_grows_the_map(tmp_path):
    """LMDB forbids resizing the map while a transaction of the process is open: reads in other
    threads (``read_committed``, ``stats``, ``committed_step`` run without the store lock) and
    the commit's resize wait for each other; no read fails, none sees two commits at once."""
    import threading

    errors: list[str] = []
    stop = threading.Event()

    def read(delta):
        while not stop.is_set():
            try:
                step, found, rows = delta.snapshot(np.arange(256))
                if (rows[found] != step % 251).any():
                    errors.append(f"step {step} read rows {np.unique(rows[found])[:4]}")
                if delta.step < step:  # the property reads a transaction of its own
                    errors.append(f"step {delta.step} after step {step}")
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(f"{type(exc).__name__}: {exc}")

    grows = 0
    for attempt in range(6):  # a fresh small map each time: several resizes per delta
        delta = RowDelta(
            tmp_path / f"t{attempt}.delta", row_bytes=1024, create=True, map_bytes=1 << 16
        )
        readers = [threading.Thread(target=read, args=(delta,)) for _ in range(2)]
        for thread in readers:
            thread.start()
        for step in range(1, 9):
            rows = np.full((32 * step, 1024), step % 251, dtype=np.uint8)
            delta.commit(np.arange(32 * step), rows, step=step)
        stop.set()
        for thread in readers:
            thread.join()
        stop.clear()
        grows += delta.map_grows
        delta.close()
    assert grows >= 12 and not errors, (grows, errors[:3])


def test_a_read_left_open_fails_a_growing_commit_in_time_and_reads_go_on(tmp_path, monkeypatch):
    """A row iterator left part way in one thread holds its read open: a commit in another
    thread that must grow the map gives up with a CommitError (writes kept) after GROW_WAIT_S,
    and reads in a third thread go on (the commit, and every read after it, waited for good)."""
    import threading
    import time

    from tiered_store.delta import row_delta
    from tiered_store.errors import CommitError

    monkeypatch.setattr(row_delta, "GROW_WAIT_S", 0.5)
    delta = RowDelta(tmp_path / "t.delta", row_bytes=64, create=True, map_bytes=1 << 20)
    delta.commit(np.arange(10), np.zeros((10, 64), np.uint8), step=1)
    rows = delta.iter_rows(chunk_rows=2)
    next(rows)  # a consumer that paused
    outcome: dict[str, object] = {}

    def commit() -> None:
        try:
            delta.commit(np.arange(100_000), np.ones((100_000, 64), np.uint8), step=2)
        except CommitError as exc:
            outcome["commit"] = str(exc)

    writer = threading.Thread(target=commit)
    start = time.monotonic()
    writer.start()
    writer.join(20)
    assert "stayed open for 0.5 s" in str(outcome.get("commit")) and time.monotonic() - start < 10
    reader = threading.Thread(target=lambda: outcome.update(read=delta.read(np.array([1]))))
    reader.start()
    reader.join(20)
    assert "read" in outcome and delta.step == 1
    rows.close()  # the read ends: the commit goes through, growing the map
    delta.commit(np.arange(100_000), np.ones((100_000, 64), np.uint8), step=2)
    assert delta.step == 2 and delta.map_grows >= 1
    delta.close()


def test_commit_steps_stay_below_the_grown_map_marker(tmp_path):
    """2**63 - 1 is ``GREW_STEP`` (a map grown elsewhere, later than any step): a commit may not
    have it, given or as the step after 2**63 - 2; the refusals name the step and the limit."""
    from tiered_store import UncommittedWritesWarning
    from tiered_store.delta.row_delta import GREW_STEP
    from tiered_store.errors import ConfigError

    limit = rf"step {GREW_STEP} is outside .* from -2\*\*63 to {GREW_STEP - 1}"
    path, _ = make_table(tmp_path, rows=20, dim=4)
    store = TieredStore(store_config(path))
    store.write([1], torch.ones(1, 4))
    with pytest.raises(ConfigError, match=limit):
        store.commit(GREW_STEP)
    assert store.commit(GREW_STEP - 1) == GREW_STEP - 1
    store.write([2], torch.ones(1, 4))
    with pytest.raises(ConfigError, match=limit):
        store.commit()  # the step after the last: 2**63 - 1
    assert store.committed_step == GREW_STEP - 1 and not store.is_stale()
    with pytest.warns(UncommittedWritesWarning):
        store.close()
    delta = RowDelta(tmp_path / "d", row_bytes=4, create=True)
    for step in (GREW_STEP, 2**63, -(2**63) - 1):
        with pytest.raises(ConfigError, match=rf"step {step} is outside"):
            delta.commit(np.array([0]), np.zeros((1, 4), np.uint8), step=step)
    assert delta.step == 0
    delta.close()


def test_a_commit_whose_delta_grew_in_another_process_is_a_commit_error(tmp_path):
    """A handle whose map another process outgrew can neither write nor read the step; its commit
    says so as a ``CommitError`` (it raised the lmdb error of reading the step for its message)."""
    from tests import forkserver
    from tiered_store.errors import CommitError

    path = tmp_path / "t.delta"
    delta = RowDelta(path, row_bytes=4096, create=True, map_bytes=1 << 16)
    delta.commit(np.arange(4), np.ones((4, 4096), dtype=np.uint8), step=1)
    with forkserver.context().Pool(1) as pool:
        assert pool.apply(_fill, (path, 4)) > 0  # another process grew the map
    with pytest.raises(CommitError, match="commit of step 5 to .* previous commit is intact"):
        delta.commit(np.arange(4), np.zeros((4, 4096), dtype=np.uint8), step=5)
    delta.close()
    again = RowDelta(path, row_bytes=4096)  # the last handle closed: the grown map is read
    assert again.step == 4
    again.close()


def test_a_delta_of_another_row_size_is_refused(tmp_path):
    RowDelta(tmp_path / "d", row_bytes=16, create=True).close()
    with pytest.raises(DeltaCorruptError, match="holds 16-byte rows"):
        RowDelta(tmp_path / "d", row_bytes=32)


def test_a_refused_delta_is_let_go_and_a_write_after_its_removal_makes_a_new_one(tmp_path):
    """A store refusing a delta of another row size releases its environment (it stayed open for
    the life of the process, and every later open of the table, its delta removed, was refused
    the same way)."""
    import shutil

    from tiered_store import create_table
    from tiered_store.delta import row_delta

    t, u = tmp_path / "t.npy", tmp_path / "u.npy"
    create_table(t, np.zeros((10, 2), np.float32), progress=False)
    create_table(u, np.zeros((10, 3), np.float32), progress=False)
    with TieredStore.open({"table": {"path": str(t)}}) as store:
        store.write([1], torch.ones(1, 2))
        store.commit()
    shutil.copytree(delta_path(t), delta_path(u))  # another table's delta beside u.npy
    with pytest.raises(DeltaCorruptError, match="holds 8-byte rows; the table's rows are 12"):
        TieredStore.open({"table": {"path": str(u)}})
    assert not any(key[1] == str(delta_path(u)) for key in row_delta._ENVS)
    shutil.rmtree(delta_path(u))
    with TieredStore.open({"table": {"path": str(u)}}) as store:
        store.write([1], torch.full((1, 3), 5.0))
        store.commit()
    with TieredStore.open({"table": {"path": str(u)}}) as store:
        assert store.lookup([1]).tolist() == [[5.0] * 3]


def test_compaction_makes_a_new_version_old_readers_finish_undisturbed(tmp_path):
    from tiered_store.delta.compaction import compact_table
    from tiered_store.delta.table_versions import remove_unused_versions, version_path
    from tiered_store.errors import TierIOError

    path, table = make_table(tmp_path, rows=400, dim=4)
    cfg = store_config(path, hot={"capacity": 4}, warm={"capacity": 8})
    expected = table.clone()
    with TieredStore(cfg) as writer:
        writer.write(torch.arange(0, 400, 7), torch.full((58, 4), 3.0))
        expected[0:400:7] = 3.0
        writer.commit(5)
        with pytest.raises(TierIOError, match="being written"):
            compact_table(path, progress=False)  # one writer at a time
    old_reader = TieredStore(cfg)
    report = compact_table(path, progress=False)
    assert (report.new_generation, report.delta_rows, report.removed_generations) == (1, 58, [])
    assert path.exists()  # generation 0 stays while old_reader has it open
    assert torch.equal(old_reader.lookup(torch.arange(400)), expected)  # cold reads: old version
    with TieredStore(cfg) as new_reader:
        assert new_reader.generation == 1 and new_reader.committed_step == 5
        assert torch.equal(new_reader.lookup(torch.arange(400)), expected)
        assert not delta_path(version_path(path, 1)).exists()  # the delta retired with its version
    old_reader.close()
    assert remove_unused_versions(path) == [0] and not path.exists()
    assert not delta_path(path).exists()
    with TieredStore(cfg) as store:  # writes go on in the new version, steps continue
        store.write([1], torch.zeros(1, 4))
        assert store.commit() == 6


def test_compaction_keeps_the_tables_checksum_block_size(tmp_path):
    """The new version was written with the default 1 MiB checksum blocks whatever the table
    was made with: ``verify`` then checked it in coarser blocks than its maker chose."""
    from tiered_store.delta.table_versions import version_path
    from tiered_store.table_format import read_manifest

    path = tmp_path / "t.npy"
    create_table(path, np.zeros((3000, 16), np.float32), progress=False, block_bytes=8192)
    with TieredStore(store_config(path, hot={"capacity": 4})) as store:
        store.write([1], torch.ones(1, 16))
        store.commit()
    assert compact_table(path, progress=False).new_generation == 1
    manifest = read_manifest(version_path(path, 1))
    assert manifest.block_bytes == 8192
    assert len(manifest.block_checksums) == -(-3000 * 16 * 4 // 8192)
    with TieredStore(store_config(path, hot={"capacity": 4})) as store:
        assert store.lookup([1, 2]).tolist() == [[1.0] * 16, [0.0] * 16]


def test_a_reader_keeps_its_version_and_serving_swaps_to_the_new_one(tmp_path):
    """A read-only store sees one commit until reopened; ServedModel reopens stale tables (a
    trainer's commit, then a compaction) and answers exactly as a freshly opened server does."""
    import json

    from tests.serve_support import make_checkpoint
    from tiered_store.delta.compaction import compact_table
    from tiered_store.serve import ServeConfig
    from tiered_store.serve.inference_request import parse_request
    from tiered_store.serve.served_model import ServedModel

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    served.reload_check_seconds = 3600.0  # checks only when the test asks
    body = json.dumps({"input_ids": [[5, 17, 900, 17, 5, 12, 77, 5, 17]]}).encode()

    def ask(model):
        return model.answer(parse_request(body, model.config.server, model))["layer_checksums"]

    before = ask(served)
    store = served.stores["engram_layer1"]
    writer = TieredStore(store.config)
    writer.write(
        torch.arange(0, writer.rows, 2), torch.ones(writer.rows // 2 + writer.rows % 2, writer.dim)
    )
    writer.commit()
    assert store.is_stale() and ask(served) == before  # no check yet: the old version, whole
    assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
    after_commit = ask(served)
    assert after_commit != before
    writer.close()
    compact_table(store.config.table.path, progress=False)
    assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
    assert ask(served) == after_commit  # the compacted version holds the same rows
    fresh = ServedModel(config)
    assert ask(fresh) == after_commit and served.reloads == 2
    fresh.close()
    served.close()


def test_serving_reopens_a_table_whose_delta_map_a_writer_elsewhere_grew(tmp_path, monkeypatch):
    """A trainer in another process outgrows the delta's map: the server's open environment
    refuses a second store of the table in its process, so the reload closes the old store first
    (every reload was refused, and the server served the old commit until restarted). The map's
    floor is lowered in both processes, so that a few commits outgrow it."""
    import json
    import textwrap

    from tests.forkserver import run_python
    from tests.serve_support import make_checkpoint
    from tiered_store.delta import row_delta
    from tiered_store.delta.table_versions import current_version
    from tiered_store.serve import ServeConfig
    from tiered_store.serve.inference_request import parse_request
    from tiered_store.serve.served_model import ServedModel
    from tiered_store.table_format import table_paths

    monkeypatch.setattr(row_delta, "MIN_MAP_BYTES", 4 << 20)
    config_path = make_checkpoint(tmp_path)
    config = ServeConfig.from_yaml(config_path)
    body = json.dumps({"input_ids": [[5, 17, 900, 17, 5, 12, 77, 5, 17]]}).encode()

    def ask(model):
        return model.answer(parse_request(body, model.config.server, model))["layer_checksums"]

    def trainer(value: float, commits: int) -> int:
        """Whole-table commits from another process; the map grows it made."""
        code = textwrap.dedent(f"""
            import torch, tiered_store.delta.row_delta as row_delta
            row_delta.MIN_MAP_BYTES = 4 << 20
            from tiered_store import TieredStore
            from tiered_store.serve import ServeConfig
            s = TieredStore(ServeConfig.from_yaml({str(config_path)!r}).store_config(1))
            for k in range({commits}):
                rows = torch.full((s.rows, s.row_width), {value} + k * 1e-4, dtype=s.row_dtype)
                s.write(torch.arange(s.rows), rows)
                s.commit()
            print(s._writes.delta.map_grows)
            s.close()
        """)
        script = tmp_path / "trainer.py"
        script.write_text(code)
        done = run_python([script])  # in a process of the tests' forkserver
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    served = ServedModel(config)
    served.reload_check_seconds = 3600.0
    trainer(0.01, 1)  # a delta exists
    assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
    assert trainer(0.02, 12) > 0  # the server holds its commit while the map grows
    assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
    now = ask(served)
    fresh = ServedModel(config)
    assert ask(fresh) == now
    fresh.close()
    # again, with the other table's new version unopenable in the same check: the grown table's
    # old store stays open and served (before, it was closed first and stayed closed: every
    # request failed); neither table moves (a reload is all or nothing: the other's failure,
    # found as the new stores open ahead, comes before any old store is closed)
    assert trainer(0.03, 12) > 0
    other = served.stores["engram_layer3"].config.table.path
    with TieredStore(served.stores["engram_layer3"].config) as writer:
        writer.write([0], torch.ones(1, writer.dim))
        writer.commit()
    compact_table(other, progress=False)
    table_paths(current_version(other)[0])[1].write_text("{")  # its manifest, damaged
    assert served.reload_if_stale(force_check=True) == []
    assert not served.stores["engram_layer1"].closed and served.reloads == 2
    assert ask(served) == now  # answered, both layers on the versions they had
    served.close()


def test_a_reload_that_cannot_open_every_table_keeps_serving_the_old_ones(tmp_path):
    """Two tables moved on and one of them cannot be opened (its new version's manifest is
    damaged): the server swaps neither, answers on the versions it has (before, it had closed
    the first table's old store with the model still on it: every request failed), and says so."""
    import json

    from tests.serve_support import make_checkpoint
    from tiered_store.delta.compaction import compact_table
    from tiered_store.delta.table_versions import current_version
    from tiered_store.serve import ServeConfig
    from tiered_store.serve.inference_request import parse_request
    from tiered_store.serve.served_model import ServedModel
    from tiered_store.table_format import table_paths

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    served.reload_check_seconds = 3600.0
    body = json.dumps({"input_ids": [[5, 17, 900, 17, 5, 12, 77, 5, 17]]}).encode()
    before = served.answer(parse_request(body, config.server, served))["layer_checksums"]
    first, *others = sorted(served.stores)
    with TieredStore(served.stores[first].config) as writer:  # the first table: a new commit
        writer.write([0, 1], torch.ones(2, writer.dim))
        writer.commit()
    last = served.stores[others[-1]].config.table.path
    with TieredStore(served.stores[others[-1]].config) as writer:  # the last: a new version
        writer.write([0], torch.ones(1, writer.dim))
        writer.commit()
    compact_table(last, progress=False)
    table_paths(current_version(last)[0])[1].write_text("{")  # its manifest, damaged
    stores = dict(served.stores)
    assert served.reload_if_stale(force_check=True) == []
    assert served.stores == stores and served.reloads == 0
    after = served.answer(parse_request(body, config.server, served))["layer_checksums"]
    assert after == before  # the versions open before, whole
    served.close()


def test_commit_steps_only_move_forward(tmp_path):
    from tiered_store.errors import ConfigError

    path, _ = make_table(tmp_path, rows=20, dim=4)
    with TieredStore(store_config(path)) as store:
        store.write([1], torch.ones(1, 4))
        assert store.commit(5) == 5
        for bad, why in [
            (4, "lower than the last committed step 5"),
            (-1, "lower than the last committed step 5"),
            (6.5, "expected an integer step"),
            ("7", "expected an integer step"),
            (2**63, "expected an integer step"),
        ]:
            with pytest.raises(ConfigError, match=rf"commit: step .*{why}"):
                store.commit(bad)
        assert store.commit() == 6  # the refused commits changed nothing
        reader = TieredStore(store_config(path))  # opened at step 6
        assert store.commit(6) == 6  # nothing written since: the same step again is a no-op
        store.write([2], torch.ones(1, 4))
        with pytest.raises(ConfigError, match="step 6 is the last committed step, and 1 written"):
            store.commit(6)  # readers elsewhere would never see it (they compare steps)
        assert not reader.is_stale()
        assert store.commit(7) == 7 and reader.is_stale()
        reader.close()
    with TieredStore(store_config(path)) as store:
        assert store.committed_step == 7 and store.lookup([1, 2]).tolist() == [[1.0] * 4] * 2


def test_empty_id_lists_write_and_read_nothing(tmp_path):
    path, _ = make_table(tmp_path, rows=20, dim=4)
    with TieredStore(store_config(path)) as store:
        store.write([], torch.zeros(0, 4))
        assert store.lookup([]).shape == (0, 4)
        step, rows = store.read_committed([])
        assert step == 0 and rows.shape == (0, 4)


def test_rows_out_of_the_tables_range_name_the_value_and_dtype(tmp_path):
    path, _ = make_table(tmp_path, rows=20, dim=4, dtype="float16")
    with TieredStore(store_config(path)) as store:
        with pytest.raises(RowDataError, match=r"row 1 holds 70000.* float16"):
            store.write([1, 2], np.array([[1, 2, 3, 4], [5, 6, 70000, 8]], np.int64))
        with pytest.raises(RowDataError, match=r"row 0 holds a non-finite value \(nan\)"):
            store.write([1], torch.full((1, 4), float("nan")))


def test_rows_given_as_python_numbers_past_float32_name_the_value_given(tmp_path):
    """Rows given as Python lists were read as float32 first, so a finite 1e39 or 1e300 was
    refused as 'a non-finite value (inf)', a value the caller never gave; it is named as given,
    overflowing the table's dtype. A list's real NaN is still named so."""
    path, _ = make_table(tmp_path, rows=20, dim=2)
    with TieredStore(store_config(path)) as store:
        for given in (1e39, 1e300):
            held = re.escape(f"row 1 holds {given:g}, which overflows float32")
            with pytest.raises(RowDataError, match=held):
                store.write([1, 2], [[0.0, 1.0], [given, 2.0]])
        with pytest.raises(RowDataError, match=r"row 0 holds a non-finite value \(nan\)"):
            store.write([1], [[float("nan"), 0.0]])
        store.write([1], [[0.5, 3]])
        assert store.lookup([1]).tolist() == [[0.5, 3.0]]
        store.commit()


def test_close_says_when_it_drops_writes_not_committed(tmp_path):
    """close() drops writes not committed, as a crash would, and says so; after a commit, and
    for a store that never wrote, it closes quietly. commit(True) is not a step."""
    import warnings

    from tiered_store import UncommittedWritesWarning
    from tiered_store.errors import ConfigError

    path, data = make_table(tmp_path, rows=100, dim=4)
    cfg = store_config(path, hot={"capacity": 10})
    store = TieredStore(cfg)
    store.write([3, 4], torch.ones(2, 4))
    with pytest.raises(ConfigError, match="commit: step True; expected an integer step"):
        store.commit(True)
    store.commit()
    store.write([10], torch.full((1, 4), 7.0))
    dropped = r"close: 1 rows written to .* since its last commit \(step 1\) are dropped"
    with pytest.warns(UncommittedWritesWarning, match=dropped) as got, store:
        pass  # closed by the with: the warning still points here, not at __exit__
    assert got[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncommittedWritesWarning)
        with TieredStore(cfg) as reopened:  # the committed rows, not the dropped one
            assert torch.equal(reopened.lookup([3, 10]), torch.stack([torch.ones(4), data[10]]))
            reopened.write([5], torch.zeros(1, 4))
            reopened.commit()


def test_dirty_rows_count_each_written_row_once(tmp_path):
    """A row written while cached in both tiers, or cached after an older write waits in
    pending, is one dirty row (the gauge and close()'s warning counted each copy)."""
    path, _ = make_table(tmp_path, rows=100, dim=4)
    with TieredStore(store_config(path, hot={"capacity": 8}, warm={"capacity": 16})) as store:
        store.lookup([7])  # cached
        store.write([7], torch.ones(1, 4))
        assert store.stats()["writes"]["dirty_rows"] == 1
        store.write([5], torch.ones(1, 4))  # not cached: pending
        store.lookup([5])  # now cached too
        store.write([5], torch.full((1, 4), 2.0))
        assert store.stats()["writes"]["dirty_rows"] == 2
        store.commit()
        assert store.stats()["writes"]["dirty_rows"] == 0


def test_a_lookup_whose_cold_read_a_write_overtakes_caches_the_written_row(tmp_path):
    """Thread T1's cold read of row 5 runs outside the lock; meanwhile the caller caches row 5
    (warm), moves it out of hot and writes it. T1's admission must not put its base read into
    hot over the written copy: every later lookup, and a read-modify-write, sees the write.
    (The read is held on an event only to fix the interleaving; the window is every miss's.)"""
    import threading

    path, _ = make_table(tmp_path, rows=100, dim=4)
    cfg = store_config(path, hot={"capacity": 1}, warm={"capacity": 20})
    store = TieredStore(cfg)
    store.write([50], torch.ones(1, 4))  # a writer from the start
    reading, go = threading.Event(), threading.Event()
    read_rows = store.cold.read_rows

    def held_read(ids, *args, **kwargs):
        rows = read_rows(ids, *args, **kwargs)
        if threading.current_thread().name == "T1":
            reading.set()
            go.wait(10)
        return rows

    store.cold.read_rows = held_read
    t1 = threading.Thread(target=store.lookup, args=([5],), name="T1")
    t1.start()
    assert reading.wait(10)  # T1 missed both tiers and reads row 5 from cold
    store.lookup([5])  # row 5 into warm and hot
    store.lookup([6])  # hot holds one row: 5 leaves hot, stays in warm
    written = torch.full((1, 4), 7.0)
    store.write([5], written)
    go.set()
    t1.join(10)
    assert torch.equal(store.lookup([5]), written)  # not T1's base read, admitted into hot
    store.write([5], store.lookup([5]) + 1)
    store.commit()
    store.close()
    with TieredStore(cfg) as again:
        assert torch.equal(again.lookup([5]), written + 1)


def test_prefetches_racing_writes_never_leave_an_old_row_behind(tmp_path):
    """No hooks: background prefetches of rows the caller looks up and writes meanwhile. A handle
    collected after a write returns the written rows, and no tier keeps an overtaken copy."""
    path, table = make_table(tmp_path, rows=64, dim=4)
    cfg = store_config(path, hot={"capacity": 2}, warm={"capacity": 48})
    reference = table.clone()
    rng = np.random.default_rng(0)
    with TieredStore(cfg) as store:
        for r in range(1500):
            ids = torch.from_numpy(rng.choice(64, 8, replace=False))
            handle = store.prefetch(ids)
            store.lookup(ids[:4])
            store.lookup(torch.from_numpy(rng.integers(0, 64, 3)))
            rows = torch.full((4, 4), float(r + 1))
            store.write(ids[:4], rows)
            reference[ids[:4]] = rows
            assert torch.equal(store.lookup(ids, handle), reference[ids]), f"round {r}"
            assert torch.equal(store.lookup(torch.arange(64)), reference), f"round {r}"
        store.commit()


def test_a_store_opened_before_the_first_commit_elsewhere_is_stale_and_may_not_write(tmp_path):
    """Store A opens a table with no delta and caches a row; B writes it and commits. A is stale,
    and writing through it is refused: its cached rows predate B's commit, so a read-modify-write
    would put B's row back to the old one."""
    import errno

    from tiered_store.errors import TierIOError

    path, _ = make_table(tmp_path, rows=100, dim=4)
    cfg = store_config(path, hot={"capacity": 10})
    with TieredStore(cfg) as a:
        a.lookup([5])
        with TieredStore(cfg) as b:
            b.write([5], torch.full((1, 4), 7.0))
            b.commit()
        assert a.is_stale()
        with pytest.raises(TierIOError, match="written by another process since") as got:
            a.write([9], torch.ones(1, 4))
        assert got.value.errno == errno.ESTALE
    with TieredStore(cfg) as again:  # reopened: B's row, and A may write now
        assert torch.equal(again.lookup([5]), torch.full((1, 4), 7.0))
        again.write([9], torch.ones(1, 4))
        again.commit()


@pytest.mark.parametrize("compacted", [False, True])
def test_a_reader_is_stale_after_a_shard_redoes_its_step_at_that_step(tmp_path, compacted):
    """A shard ahead after a torn commit redoes the step it is at (``prepare_commit(its step,
    redo=True)`` then ``finish_commit``): its rows change, its step does not. A reader that had
    it open (through its delta, or a compacted version with none) compared steps alone and was
    never stale, serving the rows from before the redo until reopened for another reason. It
    compares the step and the commit's round: stale, its own view whole."""
    path, _ = make_table(tmp_path, rows=100, dim=4)
    cfg = store_config(path)
    with TieredStore(cfg) as store:
        store.write([5], torch.full((1, 4), 3.0))
        store.prepare_commit(3, round_id="first")
        store.finish_commit(3)
    if compacted:
        compact_table(path, progress=False)
    with TieredStore(cfg) as reader:
        assert not reader.is_stale()
        with TieredStore(cfg) as writer:
            writer.write([5], torch.full((1, 4), 4.0))
            assert writer.prepare_commit(3, redo=True, round_id="redo") == 3
            writer.finish_commit(3)
            assert not writer.is_stale()
        assert reader.is_stale() and reader.committed_step == 3
        assert reader.lookup([5])[0, 0] == 3.0  # its view, whole, until reopened
    with TieredStore(cfg) as again:
        assert not again.is_stale() and again.lookup([5])[0, 0] == 4.0


def test_a_reader_is_stale_after_a_single_process_redo_of_its_step(tmp_path):
    """``commit(its step, redo=True)`` rewrites rows at the last step (a shard's single-process
    redo after a torn commit) without a new step or round: a reader compared (step, round) and
    was never stale, serving the rows from before the redo. Each such commit leaves a mark of
    its own: the reader is stale; a commit of nothing at the same step changes no row, and no
    reader is stale for it."""
    path, _ = make_table(tmp_path, rows=100, dim=4)
    cfg = store_config(path)
    with TieredStore(cfg) as store:
        store.write([5], torch.full((1, 4), 3.0))
        store.commit(3)
    for value in (None, 4.0, 5.0):
        with TieredStore(cfg) as reader, TieredStore(cfg) as writer:
            if value is None:  # nothing written: no row changed
                assert writer.commit(3) == 3 and not reader.is_stale()
                continue
            writer.write([5], torch.full((1, 4), value))
            assert writer.commit(3, redo=True) == 3
            assert reader.is_stale() and reader.lookup([5])[0, 0] != value
        with TieredStore(cfg) as again:
            assert not again.is_stale() and again.lookup([5])[0, 0] == value


def test_a_reader_whose_delta_has_no_reader_slot_left_says_so_when_asked_if_stale(tmp_path):
    """``is_stale()`` reads the delta's last commit in a transaction of its own: with every
    reader slot of the delta taken (a busy server's threads and other processes) LMDB's bare
    ReadersFullError came out, which serve's version check does not take for an unreadable
    table (the check of every other table ended there). It raises TierIOError naming the
    delta and LMDB's error; the store serves on, and once a slot is free it answers."""
    from tiered_store.errors import TierIOError

    path, _ = make_table(tmp_path, rows=100, dim=4)
    cfg = store_config(path)
    with TieredStore(cfg) as store:
        store.write([5], torch.full((1, 4), 3.0))
        store.commit()
    with TieredStore(cfg) as reader:
        env, held = reader._writes.delta.env, []
        with contextlib.suppress(lmdb.ReadersFullError):
            while True:  # every slot left, taken in this process (LMDB's MDB_NOTLS)
                held.append(env.begin())
        try:
            with pytest.raises(TierIOError, match=re.escape(f"{delta_path(path)} failed (")):
                reader.is_stale()
            assert reader.lookup([5])[0, 0] == 3.0
        finally:
            for txn in held:
                txn.abort()
            held.clear()
        assert not reader.is_stale()


@pytest.mark.parametrize("round_id", [None, "reused"])
def test_a_reader_is_stale_after_a_staged_redo_of_its_step_under_no_new_round(tmp_path, round_id):
    """``prepare_commit(its step, redo=True)`` then ``finish_commit`` with no round id (a
    building block's caller; a release before round ids) or the round of the commit before
    rewrote rows with the mark unchanged: a reader was never stale and served the rows from
    before. Such a commit leaves a redo id of its own: the reader is stale; a staged commit
    of nothing at the step changes no row, and no reader is stale for it."""
    path, _ = make_table(tmp_path, rows=100, dim=4)
    cfg = store_config(path)
    with TieredStore(cfg) as store:
        store.write([5], torch.full((1, 4), 3.0))
        store.prepare_commit(3, round_id=round_id)
        store.finish_commit(3)
    for value in (None, 4.0, 5.0):
        with TieredStore(cfg) as reader, TieredStore(cfg) as writer:
            if value is not None:
                writer.write([5], torch.full((1, 4), value))
            assert writer.prepare_commit(3, redo=True, round_id=round_id) == 3
            writer.finish_commit(3)
            if value is None:  # nothing written: no row changed
                assert not reader.is_stale()
                continue
            assert reader.is_stale() and reader.lookup([5])[0, 0] != value
        with TieredStore(cfg) as again:
            assert not again.is_stale() and again.lookup([5])[0, 0] == value


def test_a_delta_a_writer_died_creating_reads_as_none(tmp_path):
    """A writer killed inside its first write() can leave TABLE.npy.delta/ as an LMDB environment
    with no databases (made here as LMDB makes it). It holds no commit: a store is not stale over
    it, compaction and the in-memory loader read the base, and the next writer initialises it."""
    from tiered_store.delta.compaction import compact_table
    from tiered_store.engram.checkpoint import load_table_in_memory

    path, table = make_table(tmp_path, rows=100, dim=4)
    lmdb.open(str(delta_path(path)), subdir=True, max_dbs=2).close()
    cfg = store_config(path, hot={"capacity": 10})
    with TieredStore(cfg) as store:
        assert not store.is_stale()
        assert torch.equal(store.lookup([3, 4]), table[[3, 4]])
    assert torch.equal(load_table_in_memory(path).weight, table)
    assert compact_table(path, progress=False).delta_rows == 0
    with TieredStore(cfg) as store:
        store.write([3], torch.ones(1, 4))
        assert store.commit() == 1
    with TieredStore(cfg) as store:
        assert torch.equal(store.lookup([3, 4]), torch.cat([torch.ones(1, 4), table[[4]]]))


def test_a_prefetch_racing_a_tables_first_write_caches_no_old_row(tmp_path):
    """The first write of a table creates its write path while a background fetch may be
    between its cold read and its admission: the fetch must see it as any later write (fresh
    tables, three rounds each; this failed a few trials in three hundred before)."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        (tmp_path / str(trial)).mkdir()
        path, table = make_table(tmp_path / str(trial), rows=64, dim=4)
        reference = table.clone()
        with TieredStore(store_config(path, hot={"capacity": 2}, warm={"capacity": 48})) as store:
            for r in range(3):
                ids = torch.from_numpy(rng.choice(64, 8, replace=False))
                handle = store.prefetch(ids)
                store.lookup(ids[:4])
                rows = torch.full((4, 4), float(r + 1))
                store.write(ids[:4], rows)
                reference[ids[:4]] = rows
                assert torch.equal(store.lookup(ids, handle), reference[ids]), (trial, r)
                assert torch.equal(store.lookup(torch.arange(64)), reference), (trial, r)
            store.commit()


def test_a_store_of_a_table_made_anew_since_it_opened_may_not_write(tmp_path):
    """create_table(overwrite=True) while stores are open: their writes are refused (one with a
    delta committed into the removed delta, commit() returning and the row lost; one without
    committed into the new table's delta)."""
    import numpy as np

    from tiered_store import create_table
    from tiered_store.errors import TierIOError

    for name, written in (("a.npy", True), ("b.npy", False)):
        path = tmp_path / name
        create_table(path, np.zeros((100, 4), np.float32), progress=False)
        if written:
            with TieredStore.open({"table": {"path": str(path)}}) as writer:
                writer.write([1], torch.ones(1, 4))
                writer.commit()
        stale = TieredStore.open({"table": {"path": str(path)}})
        create_table(path, np.full((100, 4), 7, np.float32), progress=False, overwrite=True)
        with pytest.raises(TierIOError, match="was made anew .* reopen the store to write"):
            stale.write([2], torch.full((1, 4), 5.0))
        stale.close()
        with TieredStore.open({"table": {"path": str(path)}}) as reopened:
            assert reopened.lookup([1, 2]).tolist() == [[7.0] * 4] * 2
            assert reopened.committed_step == 0


def test_a_current_version_gone_from_beside_its_pointer_is_named_as_such(tmp_path):
    from tiered_store.delta.table_versions import version_path
    from tiered_store.errors import ConfigError

    path, _ = make_table(tmp_path, rows=100, dim=4)
    cfg = store_config(path)
    with TieredStore(cfg) as store:
        store.write([1], torch.ones(1, 4))
        store.commit()
    compact_table(path, progress=False)
    version_path(path, 1).unlink()  # a copy that took NAME.npy* only, say
    expected = r"pointer table_100x4_float32.npy.current names generation 1, .*g1.npy, which does not exist"
    with pytest.raises(ConfigError, match=expected) as opened:
        TieredStore(cfg)
    assert "tiered-store init" not in str(opened.value)
    with pytest.raises(FileNotFoundError, match=expected):
        compact_table(path, progress=False)


@pytest.mark.parametrize(
    "generation", ["-1", "1.5", "true", '"2"', '" 2"', "02", "+2", "2e0", "NaN", "1" + "0" * 300]
)
def test_a_version_pointer_naming_no_generation_number_is_refused_as_unreadable(
    tmp_path, generation
):
    """A pointer whose generation was not a whole number >= 0 was read as int() made it: 1.5 or
    true opened generation 1 (an old version kept for a reader) instead of the current one, and
    the compaction after it removed the current one as never published; -1 was called missing;
    a 301-digit one, a file name too long to open, raised a bare OSError."""
    import json

    from tiered_store.delta.table_versions import pointer_path, version_path

    path, table = make_table(tmp_path, rows=20, dim=4)
    cfg = store_config(path, hot={"capacity": 4})
    holders = []  # keep generations 0 and 1 from removal
    for step in (1, 2):
        with TieredStore(cfg) as store:
            store.write([step], torch.full((1, 4), float(step)))
            store.commit()
        holders.append(TieredStore(cfg))
        compact_table(path, progress=False)
    file = json.dumps(version_path(path, 2).name)  # the pointer as compaction writes it, but N
    pointer_path(path).write_text(f'{{"generation": {generation}, "file": {file}}}')
    with pytest.raises(TableFormatError, match=r"npy\.current is unreadable \(.*\); expected"):
        TieredStore(cfg)
    with pytest.raises(TableFormatError, match="is unreadable"):
        compact_table(path, progress=False)
    assert version_path(path, 2).exists()
    for holder in holders:
        holder.close()


def _commit_row(cfg, row, value):
    """Write ``value`` to ``row`` of the table of ``cfg`` and commit it."""
    with TieredStore(cfg) as store:
        store.write([row], torch.full((1, 4), float(value)))
        store.commit()


def test_another_table_named_like_a_version_is_never_removed_or_written_over(tmp_path):
    """Any ``emb.gN.npy`` beside ``emb.npy`` was taken for one of its versions: emb's first
    compaction removed another table named ``emb.g1.npy`` as an unpublished version and wrote
    its own over it, and ``create_table(emb.npy)`` refused (or, with overwrite, removed it)."""
    from tiered_store.delta.table_versions import version_path
    from tiered_store.table_format import verify_table

    path, table = make_table(tmp_path, rows=20, dim=4)
    other = tmp_path / "table_20x4_float32.g1.npy"
    create_table(other, np.full((5, 3), 7.0, np.float32), progress=False)
    cfg = store_config(path, hot={"capacity": 4})
    for generation, row in ((2, 3), (3, 4)):
        _commit_row(cfg, row, row)
        with pytest.warns(UserWarning, match=r"left table_20x4_float32\.g1\.npy \("):
            assert compact_table(path, progress=False).new_generation == generation
        assert np.array_equal(np.load(other), np.full((5, 3), 7.0, np.float32))
        assert verify_table(other, progress=False).blocks_checked == 1
    assert not path.exists() and not version_path(path, 2).exists()  # emb's own went
    with TieredStore(cfg) as store:
        assert store.lookup([3, 4, 5]).tolist() == [[3.0] * 4, [4.0] * 4, table[5].tolist()]
    with TieredStore(store_config(other)) as store:  # a table of its own, as it was
        assert store.lookup([0]).tolist() == [[7.0] * 3]
    with pytest.warns(UserWarning, match=r"left table_20x4_float32\.g1\.npy \(the table's hi"):
        create_table(path, np.zeros((20, 4), np.float32), progress=False, overwrite=True)
    assert not version_path(path, 3).exists() and other.exists()
    path.unlink()
    path.with_name(path.name + ".manifest.json").unlink()
    create_table(path, np.zeros((20, 4), np.float32), progress=False)  # no history there


def test_a_lost_version_pointer_is_refused_not_its_newer_versions_removed(tmp_path):
    """With ``TABLE.npy.current`` lost and ``TABLE.npy`` kept (a reader held it), the next
    compaction removed every newer version, the current one and its commits included, as never
    published; it now refuses, naming the version, and removes only what a killed compaction
    leaves (the next version without commits, or its bare ``.npy``)."""
    import json

    from tiered_store.delta.table_versions import pointer_path, version_path
    from tiered_store.manifest_checksum import sealed
    from tiered_store.table_format import table_paths

    path, table = make_table(tmp_path, rows=20, dim=4)
    cfg = store_config(path, hot={"capacity": 4})
    _commit_row(cfg, 1, 1)
    holder = TieredStore(cfg)  # keeps generation 0
    assert compact_table(path, progress=False).new_generation == 1
    _commit_row(cfg, 2, 2)  # generation 1's own delta
    saved = pointer_path(path).read_text()
    pointer_path(path).unlink()
    with pytest.raises(TableFormatError, match=r"g1\.npy is a later version of it \(with a delta"):
        compact_table(path, progress=False)
    assert delta_path(version_path(path, 1)).is_dir()
    pointer_path(path).write_text(saved)
    holder.close()
    holder = TieredStore(cfg)  # keeps generation 1
    for generation in (2, 3):
        _commit_row(cfg, generation, generation)
        assert compact_table(path, progress=False).new_generation == generation
    pointer_path(path).write_text(json.dumps({"generation": 1, "file": "x"}))  # an older copy
    with pytest.raises(TableFormatError, match=r"g3\.npy is a later version of it \(compacted fr"):
        compact_table(path, progress=False)
    manifest = table_paths(version_path(path, 3))[1]
    written = manifest.read_text()
    doc = json.loads(written)
    del doc["metadata"]["version_of"]["compacted_from"]  # as versions recorded it at first
    manifest.write_text(json.dumps(sealed(doc)))
    with pytest.raises(TableFormatError, match=r"g3\.npy is a later version of it \(past the n"):
        compact_table(path, progress=False)
    manifest.write_text(written)
    pointer_path(path).write_text(json.dumps({"generation": 3, "file": "x"}))
    holder.close()
    with TieredStore(cfg) as store:
        assert store.lookup([1, 2, 3]).tolist() == [[1.0] * 4, [2.0] * 4, [3.0] * 4]
    version_path(path, 4).write_bytes(b"\x93NUMPY")  # a bare .npy a killed compaction left
    _commit_row(cfg, 4, 4)
    assert compact_table(path, progress=False).removed_leftovers == ["table_20x4_float32.g4.npy"]
    with TieredStore(cfg) as store:
        assert store.generation == 4 and store.lookup([4, 5]).tolist() == [
            [4.0] * 4,
            table[5].tolist(),
        ]


def test_a_lost_version_pointer_refuses_writes_and_compaction_removes_nothing_first(tmp_path):
    """With ``TABLE.npy.current`` lost, a store opened generation 0 and committed to it while
    the table's newest rows were in generation 2 (only compaction refused), and compaction
    removed the leftover generation 1 before refusing: a write is refused now, naming the
    version, and compaction refuses before removing anything."""
    from tiered_store.delta.table_versions import pointer_path, version_path

    path, _ = make_table(tmp_path, rows=20, dim=4)
    cfg = store_config(path, hot={"capacity": 4})
    _commit_row(cfg, 1, 1)
    holder = TieredStore(cfg)  # keeps generation 0
    for generation in (1, 2):
        assert compact_table(path, progress=False).new_generation == generation
        _commit_row(cfg, generation + 1, generation + 1)  # generation 2's: row 3
    saved = pointer_path(path).read_text()
    pointer_path(path).unlink()
    version_path(path, 1).write_bytes(b"\x93NUMPY")  # what a killed compaction of 0 leaves
    lost = r"g2\.npy is a later version of it \(with a delta"
    with pytest.raises(TableFormatError, match=lost):
        compact_table(path, progress=False)
    assert version_path(path, 1).exists()
    with TieredStore(cfg) as store:
        assert store.generation == 0
        with pytest.raises(TableFormatError, match=lost):
            store.write([4], torch.full((1, 4), 4.0))
    pointer_path(path).write_text(saved)
    holder.close()
    _commit_row(cfg, 4, 4)
    with TieredStore(cfg) as store:
        assert store.generation == 2
        assert store.lookup([1, 2, 3, 4]).tolist() == [[float(r)] * 4 for r in (1, 2, 3, 4)]


def test_a_lost_pointer_past_a_version_with_a_delta_but_no_commit_names_what_it_found(tmp_path):
    """A version a store opened as current (its delta made) but never committed to, its pointer
    then lost: compaction refused it as a later version "with commits of its own", which it has
    none of; it says what it found, a delta of its own (so it was published)."""
    from tiered_store.delta.table_versions import pointer_path, version_path

    path, table = make_table(tmp_path, rows=20, dim=4)
    cfg = store_config(path, hot={"capacity": 4})
    _commit_row(cfg, 1, 1)
    holder = TieredStore(cfg)  # keeps generation 0
    assert compact_table(path, progress=False).new_generation == 1
    with pytest.warns(UserWarning, match="dropped"), TieredStore(cfg) as store:
        store.write([2], torch.full((1, 4), 2.0))  # never committed
    assert delta_path(version_path(path, 1)).is_dir()
    pointer_path(path).unlink()
    with pytest.raises(TableFormatError, match=r"g1\.npy is a later version of it \(with a delta"):
        compact_table(path, progress=False)
    assert version_path(path, 1).exists()
    holder.close()


def test_a_version_compacted_before_versions_recorded_their_table_is_still_replaced(tmp_path):
    """A version whose manifest has no record of its table (compacted by an older release, made
    here by hand) is the table's when its pointer names it: the compaction after it removes it."""
    from tiered_store.delta.table_versions import publish_version, version_path

    path, _ = make_table(tmp_path, rows=20, dim=4)
    create_table(version_path(path, 1), np.ones((20, 4), np.float32), progress=False)
    publish_version(path, 1)
    cfg = store_config(path, hot={"capacity": 4})
    _commit_row(cfg, 2, 2)
    report = compact_table(path, progress=False)
    assert report.new_generation == 2 and report.removed_generations == [0, 1]
    assert not version_path(path, 1).exists()
    with TieredStore(cfg) as store:
        assert store.lookup([1, 2]).tolist() == [[1.0] * 4, [2.0] * 4]


def test_compaction_through_a_symlink_uses_the_tables_own_pointer_lock_and_delta(tmp_path):
    """A table opened and compacted through a link to its file: the store resolves the link, so
    compaction must too (it found no delta beside the link and did nothing, and ran while the
    table's writer held its lock)."""
    import os

    import numpy as np

    from tiered_store import create_table
    from tiered_store.delta.compaction import compact_table
    from tiered_store.errors import TierIOError

    real, links = tmp_path / "real", tmp_path / "links"
    real.mkdir()
    links.mkdir()
    create_table(real / "t.npy", np.zeros((100, 4), np.float32), progress=False)
    os.symlink(real / "t.npy", links / "t.npy")
    config = {"table": {"path": str(links / "t.npy")}}
    with TieredStore.open(config) as store:
        store.write([3], torch.ones(1, 4))
        store.commit()
        with pytest.raises(TierIOError, match="being written"):
            compact_table(links / "t.npy", progress=False)  # the writer holds the table's lock
    report = compact_table(links / "t.npy", progress=False)
    assert (report.new_generation, report.delta_rows) == (1, 1)
    with TieredStore.open(config) as store:
        assert store.generation == 1 and store.lookup([3]).tolist() == [[1.0] * 4]


def test_a_compaction_that_another_finished_meanwhile_compacts_the_new_version(
    tmp_path, monkeypatch
):
    """Another compaction published a version and removed the one this one read, before its
    lock: it reads the pointer again (it said the table does not exist)."""
    import numpy as np

    from tiered_store import create_table
    from tiered_store.delta import compaction, table_versions

    path = tmp_path / "t.npy"
    create_table(path, np.zeros((100, 4), np.float32), progress=False)
    with TieredStore.open({"table": {"path": str(path)}}) as store:
        store.write([3], torch.ones(1, 4))
        store.commit()
    check, raced = table_versions.check_table, []

    def check_after_another_compaction(npy):
        if not raced:
            raced.append(None)
            raced[0] = compaction.compact_table(path, progress=False)  # g1 out, g0 removed
        return check(npy)

    monkeypatch.setattr(table_versions, "check_table", check_after_another_compaction)
    report = compaction.compact_table(path, progress=False)
    assert raced[0].new_generation == 1 and report.old_generation == report.new_generation == 1


def test_a_table_made_anew_through_a_symlink_is_written_where_it_points(tmp_path):
    """The link stays a link: stores opened through it read the new rows (the link was replaced
    by a file beside it, the old table left where stores resolving the link still found it)."""
    import os

    import numpy as np

    from tiered_store import create_table

    real, links = tmp_path / "real", tmp_path / "links"
    real.mkdir()
    links.mkdir()
    create_table(real / "t.npy", np.zeros((10, 4), np.float32), progress=False)
    os.symlink(real / "t.npy", links / "t.npy")
    create_table(links / "t.npy", np.ones((10, 4), np.float32), progress=False, overwrite=True)
    assert (links / "t.npy").is_symlink() and sorted(os.listdir(links)) == ["t.npy"]
    for path in (links / "t.npy", real / "t.npy"):
        with TieredStore.open({"table": {"path": str(path)}}) as store:
            assert store.lookup([0, 9]).tolist() == [[1.0] * 4] * 2


def _a_table_with_a_commit(tmp_path: Path) -> tuple[Path, dict]:
    """A 10 x 2 table of zeros whose delta holds row 1 = 7 at step 1; its path and store config."""
    from tiered_store import create_table

    path = tmp_path / "t.npy"
    config = {"table": {"path": str(path)}}
    create_table(path, np.zeros((10, 2), np.float32), progress=False)
    with TieredStore.open(config) as store:
        store.write([1], torch.full((1, 2), 7.0))
        store.commit()
    return path, config


def test_a_commit_to_a_table_made_anew_while_a_store_of_it_is_open_is_kept(tmp_path):
    """A reader store of the old table stays open in this process while the table is made anew
    and a new store commits: the commit went into the old, removed delta (shared by path), so
    commit() returned and the row was lost."""
    from tiered_store import create_table

    path, config = _a_table_with_a_commit(tmp_path)
    reader = TieredStore.open(config)
    create_table(path, np.ones((10, 2), np.float32), progress=False, overwrite=True)
    with TieredStore.open(config) as writer:
        writer.write([2], torch.full((1, 2), 9.0))
        assert writer.commit() == 1  # the new table's first commit
    assert delta_path(path).is_dir()
    reader.close()
    with TieredStore.open(config) as store:
        assert store.lookup([1, 2]).tolist() == [[1.0, 1.0], [9.0, 9.0]]
        assert store.committed_step == 1


def test_a_store_opened_beside_one_of_a_table_made_anew_elsewhere_reads_the_new_delta(tmp_path):
    """A server reloads a table (the new store opened before the old one closes) that another
    process made anew and wrote: the new store read the old store's environment, of the removed
    delta (the old table's rows over the new base, the new commit missing)."""
    import textwrap

    from tests.forkserver import run_python

    path, config = _a_table_with_a_commit(tmp_path)
    old = TieredStore.open(config)
    code = textwrap.dedent(f"""
        import numpy as np, torch
        from tiered_store import TieredStore, create_table
        create_table({str(path)!r}, np.ones((10, 2), np.float32), progress=False, overwrite=True)
        with TieredStore.open({{"table": {{"path": {str(path)!r}}}}}) as s:
            s.write([2], torch.full((1, 2), 9.0))
            s.commit()
    """)
    script = tmp_path / "make_anew.py"
    script.write_text(code)
    done = run_python([script])  # in a process of the tests' forkserver
    assert done.returncode == 0, done.stderr[-2000:]
    assert old.is_stale()
    with TieredStore.open(config) as new:
        assert new.lookup([1, 2]).tolist() == [[1.0, 1.0], [9.0, 9.0]]
        assert new.committed_step == 1
    old.close()


_STAGE_THEN_KILLED = r"""
import os, signal, sys
import numpy as np
from tiered_store.delta.row_delta import RowDelta
delta = RowDelta(sys.argv[1], row_bytes=4096, create=True, map_bytes=1 << 16)
delta.stage(np.array([2, 70]), np.full((2, 4096), 9, np.uint8), step=2)
os.kill(os.getpid(), signal.SIGKILL)  # no close: the staging must be on disk already
"""


def test_staged_records_survive_a_kill_unseen_by_readers_and_are_committed_whole(tmp_path):
    """A sharded commit's first phase (``stage``) in a process then killed: reopened, the step
    is staged, and every read (ids, rows, snapshot, iteration, a store's lookups and committed
    reads) sees step 1's rows only; ``commit_staged`` makes the staged rows the step-2 commit."""
    path, table = make_table(tmp_path, rows=100, dim=1024)
    with TieredStore(store_config(path)) as store:
        store.write([2, 5], torch.full((2, 1024), 1.0))
        store.commit()
    committed = table[[2, 5, 70]].clone()
    committed[:2] = 1.0
    script = tmp_path / "stage.py"
    script.write_text(_STAGE_THEN_KILLED)
    killed = forkserver.run_python([script, delta_path(path)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with TieredStore(store_config(path)) as store:
        delta = store._writes.delta
        assert (delta.step, delta.staged_step, delta.ids().tolist()) == (1, 2, [2, 5])
        step, rows = store.read_committed([2, 5, 70])
        assert step == 1 and torch.equal(rows, committed)
        assert torch.equal(store.lookup([2, 5, 70]), committed)
        assert [ids.tolist() for ids, _ in delta.iter_rows()] == [[2, 5]]
        assert len(delta) == 2 and delta.snapshot(np.array([70]))[1].tolist() == [False]
    writer = RowDelta(delta_path(path), row_bytes=4096, map_bytes=1 << 16)
    with pytest.raises(CommitError, match="staged step 3 .* step 2 is staged; expected step 3"):
        writer.commit_staged(3)
    writer.commit_staged(2)
    assert (writer.step, writer.staged_step, writer.ids().tolist()) == (2, None, [2, 5, 70])
    writer.close()
    nines = torch.full((4096,), 9, dtype=torch.uint8).view(torch.float32)  # the staged bytes
    with TieredStore(store_config(path)) as store:
        assert store.committed_step == 2
        assert torch.equal(store.lookup([2, 5, 70]), torch.stack([nines, committed[1], nines]))


def test_staged_records_that_grow_the_map_then_dropped_leave_the_commit_as_it_was(tmp_path):
    """Staging more than the map holds grows it; ``drop_staged`` discards the staged records
    durably, and a compaction refuses a delta holding staged records, naming the fix."""
    path, _ = make_table(tmp_path, rows=100, dim=1024)
    with TieredStore(store_config(path)) as store:
        store.write([5], torch.full((1, 1024), 1.0))
        store.commit(4)
    delta = RowDelta(delta_path(path), row_bytes=4096, map_bytes=1 << 16)
    rows = np.random.default_rng(0).integers(0, 255, (64, 4096), dtype=np.uint8)
    delta.stage(np.arange(64), rows, step=5)
    assert delta.map_grows > 0 and (delta.step, delta.staged_step) == (4, 5)
    with pytest.raises(TableFormatError, match=r"compaction of .*: .*\.npy\.delta holds step 5 staged by a sharded commit that was interrupted between its two phases; expected none staged: open the shards with ShardedStore"):  # fmt: skip
        compact_table(path, progress=False)
    delta.drop_staged()
    delta.drop_staged()  # nothing staged: nothing to do
    delta.close()
    again = RowDelta(delta_path(path), row_bytes=4096)
    assert (again.step, again.staged_step, again.ids().tolist()) == (4, None, [5])
    with pytest.raises(CommitError, match="nothing is staged"):
        again.commit_staged(5)
    again.close()
    assert compact_table(path, progress=False).delta_rows == 1


def test_a_commit_over_staged_records_is_refused_and_keeps_the_writes(tmp_path):
    """A shard holding a sharded commit's staged step (its rank killed in phase 2, the other
    shards at that step): a plain store's commit there made the same step of its own writes,
    and the shards' next open then dropped the staged rows as older, losing the decided step on
    this shard. The commit is refused, naming the staged step and the fix; nothing committed,
    the writes kept, and once the staged step is resolved the commit goes through."""
    path, table = make_table(tmp_path, rows=100, dim=1024)
    with (
        pytest.warns(UserWarning, match="rows written"),
        TieredStore(store_config(path)) as store,
    ):
        store.write([2], torch.full((1, 1024), 1.0))
        store.commit(1)
        store.write([2], torch.full((1, 1024), 2.0))
        assert store.prepare_commit(2) == 2
    with TieredStore(store_config(path)) as store:
        store.write([5], torch.full((1, 1024), 7.0))
        with pytest.raises(CommitError, match=r"commit of step 2 to .*\.npy\.delta refused: it holds step 2 staged by a sharded commit that was interrupted between its two phases \(the other shards may hold that step\); expected none staged: open the shards with ShardedStore"):  # fmt: skip
            store.commit()
        assert (store.committed_step, store.staged_step, store.commit_errors) == (1, 2, 1)
        assert store.read_committed([2, 5])[1][:, 0].tolist() == [1.0, float(table[5, 0])]
        assert store.lookup([5])[0, 0] == 7.0  # kept
        store.finish_commit(2)  # as the shards' open does for a decided step
        assert store.commit() == 3
    with TieredStore(store_config(path)) as store:
        assert store.committed_step == 3 and store.staged_step is None
        assert store.lookup([2, 5])[:, 0].tolist() == [2.0, 7.0]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (b"staged_round", b"\xff\xfe@2", "ASCII text"),
        (b"staged_round", b"round", r"ROUND@STEP \(a round id, an integer step\)"),
        (b"staged_round", b"@2", r"ROUND@STEP \(a round id, an integer step\)"),
        (b"staged_round", b"round@two", r"ROUND@STEP \(a round id, an integer step\)"),
        (b"committed_round", b"\xff\xfe", "ASCII text"),
    ],
)
def test_a_damaged_commit_round_is_named_with_its_delta_and_key(tmp_path, key, value, expected):
    """A round key in a delta's ``meta`` damaged (not text, or a staged round not ROUND@STEP):
    reading the commit rounds (a sharded open's) or committing the staged step raised
    UnicodeDecodeError naming nothing, or read a damaged staged round as none (decided by the
    steps). ``DeltaCorruptError`` names the delta, the key, the value and the form expected;
    the staged step stays staged. A step of 0 reads back as any other."""
    path, _ = make_table(tmp_path, rows=100, dim=4)
    delta = RowDelta(delta_path(path), row_bytes=16, create=True, table_rows=100)
    delta.stage(np.zeros(0, np.int64), np.zeros((0, 16), np.uint8), step=0, round_id="r0")
    assert delta.commit_rounds == ("r0", None)
    delta.commit_staged(0)
    assert (delta.step, delta.commit_rounds) == (0, (None, "r0"))
    delta.stage(np.array([5]), np.ones((1, 16), np.uint8), step=2, round_id="r2")
    delta._write("a damaged round", lambda txn: txn.put(key, value, db=delta.meta_db))
    named = rf"delta: .*\.npy\.delta holds {re.escape(repr(value))} under the meta key '{key.decode()}'; expected {expected}, as a sharded commit writes it: the delta is damaged"  # fmt: skip
    with pytest.raises(DeltaCorruptError, match=named):
        _ = delta.commit_rounds
    if key == b"staged_round":
        with pytest.raises(DeltaCorruptError, match=named):
            delta.commit_staged(2)
    assert (delta.step, delta.staged_step) == (0, 2)
    delta.close()


@pytest.mark.parametrize("written", [True, False])
def test_a_hot_admission_that_raises_leaves_no_warm_slot_without_its_row(tmp_path, written):
    """The hot tier's admission raised (its spill of dirty victims, or its admission filter, out
    of memory) after the warm tier had admitted the batch's rows from cold but before their rows
    were written there: warm then served the evicted rows' payload for them, wrong rows for
    good. Each tier's rows are now written as soon as it has admitted them."""
    path, table = make_table(tmp_path, rows=300, dim=8)
    hot = {"capacity": 8} if written else {"capacity": 8, "policy": "lru+tinylfu"}
    cfg = store_config(path, hot=hot, warm={"capacity": 16})
    reference = table.clone()
    with TieredStore(cfg) as store:
        if written:
            store.write(torch.tensor([0]), torch.ones(1, 8))
            reference[0] = 1
        assert torch.equal(store.lookup(torch.arange(40)), reference[:40])  # both tiers full

        def out_of_memory(*args):
            raise MemoryError("out of memory in the hot tier's admission")

        if written:
            store.hot.before_evict, kept = out_of_memory, store.hot.before_evict
        else:
            store.hot.admission.admit, kept = out_of_memory, store.hot.admission.admit
        with pytest.raises(MemoryError):
            store.lookup(torch.arange(100, 110))
        if written:
            store.hot.before_evict = kept
        else:
            store.hot.admission.admit = kept
        check_cache_invariants(store.hot)
        check_cache_invariants(store.warm)
        assert torch.equal(store.lookup(torch.arange(100, 110)), reference[100:110])
        assert torch.equal(store.lookup(torch.arange(300)), reference)
        if written:
            store.commit()


@pytest.mark.parametrize("tier", ["warm", "hot"])
def test_a_tier_whose_rows_could_not_be_written_keeps_none_of_them(tmp_path, tier):
    """Writing the rows a tier had just admitted raised (out of memory copying them to the
    device): the tier kept the new row ids in slots that still held the evicted rows, and
    served those for them. The slots it admitted into are now emptied."""
    path, table = make_table(tmp_path, rows=300, dim=8)
    cfg = store_config(path, hot={"capacity": 8}, warm={"capacity": 16})
    with TieredStore(cfg) as store:
        assert torch.equal(store.lookup(torch.arange(40)), table[:40])  # both tiers full
        pool = store.warm_pool if tier == "warm" else store.hot_pool

        def out_of_memory(slots, rows):
            raise MemoryError(f"out of memory writing the {tier} tier's rows")

        pool.write = out_of_memory
        with pytest.raises(MemoryError):
            store.lookup(torch.arange(100, 110))
        del pool.write
        check_cache_invariants(store.hot)
        check_cache_invariants(store.warm)
        assert torch.equal(store.lookup(torch.arange(100, 110)), table[100:110])
        assert torch.equal(store.lookup(torch.arange(300)), table)


def test_a_write_that_raises_in_one_tier_leaves_no_older_copy_in_another(tmp_path):
    """A write updates warm's copy of a row, then hot's: when hot's raised (out of memory
    copying the rows to its device), warm held the new version (dirty) and hot the old one,
    served until hot evicted it, then warm's: the row's version flipped back to the write that
    had failed, and a commit kept it. Such a write now empties the copies of the tiers it did
    not write (pending takes the rows none written holds): every later read, and the commit,
    see the new rows."""
    path, table = make_table(tmp_path, rows=300, dim=8)
    cfg = store_config(path, hot={"capacity": 4}, warm={"capacity": 16})
    ids, new = torch.arange(4), torch.full((4, 8), 5.0)
    with TieredStore(cfg) as store:
        assert torch.equal(store.lookup(ids), table[:4])  # held by both tiers
        assert (store.hot.probe(ids) >= 0).all() and (store.warm.probe(ids) >= 0).all()

        def out_of_memory(slots, rows):
            raise MemoryError("out of memory copying the rows to the hot tier")

        store.hot_pool.write = out_of_memory
        with pytest.raises(MemoryError):
            store.write(ids, new)
        del store.hot_pool.write
        check_cache_invariants(store.hot)
        check_cache_invariants(store.warm)
        first = store.lookup(ids)
        store.lookup(torch.arange(100, 140))  # hot's copies evicted
        assert torch.equal(store.lookup(ids), first)
        assert torch.equal(first, new)
        store.commit()
    with TieredStore(cfg) as store:
        assert torch.equal(store.lookup(ids), new)


def test_a_write_that_raised_is_seen_by_a_lookup_that_staged_its_rows_before(tmp_path):
    """A write that raises part way applies whole (its rows in pending, the tiers' copies
    emptied), but it did not count as a write: a lookup that had staged a row from warm before
    it (reading its cold misses off the lock meanwhile) took that copy as the newest and hot
    cached the old row for good. A write that raises is counted as well."""
    path, table = make_table(tmp_path, rows=300, dim=8)
    cfg = store_config(path, hot={"capacity": 4}, warm={"capacity": 16})
    new = torch.full((1, 8), 5.0)
    with TieredStore(cfg) as store:
        store.write(torch.tensor([299]), table[299:])  # the write-back exists
        store.lookup(torch.arange(10, 20))  # in warm; hot holds 4 of them
        store.lookup(torch.arange(200, 204))  # hot holds these now, warm still 10..19
        assert store.hot.probe(torch.tensor([10])) < 0 <= store.warm.probe(torch.tensor([10]))
        read_rows = store.cold.read_rows

        def write_meanwhile(ids):
            """The write that fails (warm's copy out of memory) while the lookup reads cold."""
            store.warm_pool.write = out_of_memory
            with pytest.raises(MemoryError):
                store.write(torch.tensor([10]), new)
            del store.warm_pool.write
            return read_rows(ids)

        def out_of_memory(slots, rows):
            raise MemoryError("out of memory writing warm's copy")

        store.cold.read_rows = write_meanwhile
        out = store.lookup(torch.tensor([10, 100]))  # 10 staged from warm, 100 read from cold
        del store.cold.read_rows
        assert torch.equal(out[1], table[100])
        assert torch.equal(store.lookup(torch.tensor([10])), new)
        store.lookup(torch.arange(100, 140))
        assert torch.equal(store.lookup(torch.tensor([10])), new)
        store.commit()
    with TieredStore(cfg) as store:
        assert torch.equal(store.lookup(torch.tensor([10])), new)


@pytest.mark.parametrize("cached", ["both tiers", "and pending"])
def test_a_write_whose_recovery_runs_out_of_memory_leaves_no_older_copy_beside_a_newer(
    cached, tmp_path
):
    """A write whose hot copy raised (out of memory) put its rows in pending, then emptied the
    tiers' copies: when that merge raised as well, warm kept the new rows (dirty) and hot the
    old, or the tiers the old and pending the new, each served until evicted, then the other,
    and a commit kept either. The copies of a row whose new version is held somewhere are
    emptied first: each row is old or new, the same in every later read and the commit."""
    path, table = make_table(tmp_path, rows=300, dim=8)
    cfg = store_config(path, hot={"capacity": 4}, warm={"capacity": 16})
    ids, older, new = torch.arange(4), torch.full((4, 8), 3.0), torch.full((4, 8), 5.0)
    with TieredStore(cfg) as store:
        store.write(ids, older)  # dirty in both tiers
        if cached == "and pending":  # spilled to pending, then cached again (clean, equal)
            store.lookup(torch.arange(100, 140))
            assert (store.warm.probe(ids) < 0).all() and len(store._writes.pending) == 4
        assert torch.equal(store.lookup(ids), older)
        assert (store.hot.probe(ids) >= 0).all() and (store.warm.probe(ids) >= 0).all()
        writes, failing = store._writes, []

        def out_of_memory(*args):
            failing.append(1)
            raise MemoryError("out of memory")

        merge = writes.pending.merge
        writes.pending.merge = lambda *args: out_of_memory() if failing else merge(*args)
        store.hot_pool.write = out_of_memory
        if cached == "and pending":  # the warm copy fails first
            store.warm_pool.write = out_of_memory
        with pytest.raises(MemoryError):
            store.write(ids, new)
        for owner, name in ((store.hot_pool, "write"), (writes.pending, "merge")):
            delattr(owner, name)
        if cached == "and pending":
            del store.warm_pool.write
        check_cache_invariants(store.hot)
        check_cache_invariants(store.warm)
        first = store.lookup(ids)
        assert ((first == older).all(1) | (first == new).all(1)).all()
        store.lookup(torch.arange(100, 140))  # the tiers' copies evicted
        assert torch.equal(store.lookup(ids), first)
        store.commit()
    with TieredStore(cfg) as store:
        assert torch.equal(store.lookup(ids), first)


def test_a_commit_whose_bookkeeping_runs_out_of_memory_still_reads_its_rows(tmp_path, monkeypatch):
    """Once the delta held a commit's rows, the write-back cleared pending and the dirty flags,
    then added the rows to the delta's index of ids: out of memory there (a copy of that index,
    a row id per committed row), cold reads of those rows skipped the delta and returned the
    base rows until the store was reopened. The index is made first: every read sees them."""
    path, table = make_table(tmp_path, rows=300, dim=8)
    cfg = store_config(path, hot={"capacity": 4}, warm={"capacity": 16})
    ids, new = torch.arange(200, 210), torch.full((10, 8), 5.0)
    with TieredStore(cfg) as store:
        store.write(ids, new)  # cached nowhere: pending
        writes, concatenate = store._writes, np.concatenate

        def out_of_memory(arrays, *args, **kwargs):
            if arrays[0] is writes.delta_ids:
                raise MemoryError("out of memory copying the delta's ids")
            return concatenate(arrays, *args, **kwargs)

        monkeypatch.setattr(np, "concatenate", out_of_memory)
        with pytest.raises(MemoryError):
            store.commit()
        monkeypatch.undo()
        assert store.committed_step == 1
        assert torch.equal(store.lookup(ids), new)
        store.lookup(torch.arange(100, 140))  # evicted again
        assert torch.equal(store.lookup(ids), new)
        store.commit()
    with TieredStore(cfg) as store:
        assert torch.equal(store.lookup(ids), new)


def test_a_second_writer_is_refused_naming_the_process_that_holds_the_table(tmp_path):
    """A second writer was refused with 'another store, in this process or another': which
    process holds the table (one to wait for, or a stuck one to stop) was left to guess. The
    refusal names the holder's process id (and this process when it is the holder)."""
    import subprocess
    import sys

    from tiered_store.errors import TierIOError

    path, _ = make_table(tmp_path, rows=20, dim=2)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, torch; from tiered_store import TieredStore\n"
            f"s = TieredStore.open({{'table': {{'path': {str(path)!r}}}}})\n"
            "s.write([1], torch.ones(1, 2)); print('holding', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        held = f"held by process {holder.pid} "
        with TieredStore(store_config(path)) as store, pytest.raises(TierIOError, match=held):
            store.write([2], torch.ones(1, 2))
        with pytest.raises(TierIOError, match=f"held by process {holder.pid} "):
            compact_table(path, progress=False)
    finally:
        holder.stdin.close()
        holder.wait()
    with TieredStore(store_config(path)) as writer, TieredStore(store_config(path)) as other:
        writer.write([1], torch.ones(1, 2))
        writer.commit()
        with pytest.raises(TierIOError, match="held by this process"):
            other.write([2], torch.ones(1, 2))


@pytest.mark.parametrize(
    ("what", "call"), [("step", "get"), ("staged_step", "get"), ("ids", "cursor")]
)
def test_a_close_inside_a_pinned_read_of_the_delta_says_it_closed_for_every_read(
    tmp_path, what, call
):
    """A signal handler's close run inside a read of a reader's pinned delta ends the
    transaction under it: only ``snapshot`` said the delta was closed during the read; ``step``
    and ``staged_step`` reported a failed read (counted in read_errors) and ``ids()`` raised
    LMDB's own error. The close is made here where a handler's lands, as the read's transaction
    is used: each says the delta was closed during it, not counted as a read failure."""
    import errno
    import sys

    from tiered_store.errors import TierIOError

    path = tmp_path / "t.delta"
    writer = RowDelta(path, row_bytes=16, create=True, map_bytes=1 << 20)
    writer.commit(np.arange(4), np.ones((4, 16), dtype=np.uint8), step=1)
    reader = RowDelta(path, row_bytes=16)
    reader.pin()

    def close_inside(frame, event, arg):
        if event == "c_call" and frame.f_code.co_name == what and arg.__name__ == call:
            sys.setprofile(None)
            reader.close()

    sys.setprofile(close_inside)
    try:
        with pytest.raises(TierIOError) as closed:
            reader.ids() if what == "ids" else getattr(reader, what)
    finally:
        sys.setprofile(None)
        writer.close()
    assert closed.value.errno == errno.EBADF
    assert closed.value.strerror == (
        f"delta: {path} was closed during a read of it; expected it open until the read ended"
    )
    assert reader.read_errors == 0


def test_a_read_of_a_closed_delta_says_it_is_closed_not_closed_during_it(tmp_path):
    """A read of a delta closed before it began was said closed during the read (2dda3de's
    message, for a close landing inside one), and ``len()``, ``latest_step()`` and ``pin()``
    raised LMDB's own error, naming no file. Each read of a closed delta says it is closed
    (EBADF), naming it, uncounted as a read failure."""
    import errno

    from tiered_store.errors import TierIOError

    path = tmp_path / "t.delta"
    delta = RowDelta(path, row_bytes=16, create=True, map_bytes=1 << 20)
    delta.commit(np.arange(4), np.ones((4, 16), dtype=np.uint8), step=1)
    delta.close()
    reads = {
        "step": lambda: delta.step,
        "staged_step": lambda: delta.staged_step,
        "latest_step": delta.latest_step,
        "ids": delta.ids,
        "len": lambda: len(delta),
        "read": lambda: delta.read(np.arange(2)),
        "pin": delta.pin,
    }
    for what, read in reads.items():
        with pytest.raises(TierIOError) as closed:
            read()
        assert (closed.value.errno, closed.value.strerror) == (
            errno.EBADF,
            f"delta: {path} is closed; expected it open (open it again)",
        ), what
    assert delta.read_errors == 0
