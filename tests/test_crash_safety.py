"""kill -9 at random moments: reopening gives exactly the last acknowledged commit, row by row,
and the next run resumes from it; readers only ever see committed versions."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import crash_writer, forkserver
from tests.conftest import make_table
from tiered_store import TieredStore
from tiered_store.delta.compaction import compact_table
from tiered_store.delta.row_delta import RowDelta, delta_path


def _context():
    """A forkserver that has imported the store once: each writer starts in milliseconds."""
    return forkserver.context()


def _check_reopened(config, base, log_dir, seen: int = 0) -> tuple[int, int]:
    """Reopen; the state must be the last acknowledged step's (or the step whose commit returned
    just before the kill, before its acknowledgement was logged). ``seen``: the step an earlier
    reopen found committed, acknowledged since (the next writer resumed after it, and may be
    killed before its own first ack). Returns (step, last acked)."""
    acked = crash_writer.acked_steps(log_dir)
    last_acked = max(int(acked[-1]) if acked.size else 0, seen)
    with TieredStore.open(config) as store:
        step = store.committed_step
        assert last_acked <= step <= last_acked + 1, (step, last_acked)
        rows = store.lookup(torch.arange(store.rows)).numpy()
    expected = crash_writer.expected_table(base, log_dir, step)
    bad = np.flatnonzero((rows != expected).any(axis=1))
    assert bad.size == 0, f"rows {bad[:5]} differ from step {step}'s state"
    return step, last_acked


def _kill_loop(tmp_path, kills, max_delay, compact_every=0):
    """Kill writers ``kills`` times, each a random delay after it starts (every other one: after
    its first commit, so that they make progress on a slow machine) and check each reopen."""
    path, table = make_table(tmp_path, rows=200, dim=8)
    base = table.numpy()
    config = {
        "table": {"path": str(path)},
        "tiers": {"hot": {"capacity": 6}, "warm": {"capacity": 12}},
    }
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    ctx = _context()
    rng = np.random.default_rng(7)
    steps_seen, between = [], 0
    for kill in range(kills):
        acked = crash_writer.acked_steps(str(log_dir)).size
        writer = ctx.Process(
            target=crash_writer.run_writer, args=(config, str(log_dir), 10**6, compact_every)
        )
        writer.start()
        if kill % 2:  # past its first commit: on a slow machine the delay can end in the open
            _wait_for_a_commit(writer, str(log_dir), acked)
        time.sleep(rng.uniform(0.15, max_delay))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        assert writer.exitcode == -signal.SIGKILL
        seen = steps_seen[-1] if steps_seen else 0
        step, last_acked = _check_reopened(config, base, str(log_dir), seen)
        between += step == last_acked + 1
        steps_seen.append(step)
    # the runs made progress (every other one committed) and each resumed from the last commit:
    # steps never go back, and no step was acknowledged twice
    acked = crash_writer.acked_steps(str(log_dir))
    assert acked.size >= kills // 2 and bool(np.all(np.diff(acked) > 0)), acked
    assert steps_seen[-1] >= acked[-1] and bool(np.all(np.diff(steps_seen) >= 0))
    return steps_seen, between


def _wait_for_a_commit(writer, log_dir: str, acked: int, timeout: float = 120.0) -> None:
    """Wait until ``writer`` acknowledged a commit: the log holds more than ``acked`` steps."""
    deadline = time.monotonic() + timeout
    while crash_writer.acked_steps(log_dir).size <= acked:
        assert writer.is_alive(), f"the writer exited ({writer.exitcode}) before it committed"
        if time.monotonic() > deadline:
            writer.kill()  # not left running past the test
            writer.join()
            raise AssertionError(f"the writer committed nothing in {timeout:g} s")
        time.sleep(0.005)


def test_kill_9_at_random_moments_loses_no_acknowledged_commit(tmp_path):
    """Kills land in writes, write-back (tiny tiers spill on eviction), commits and compactions
    (every 4th step closes the store and compacts the table)."""
    _kill_loop(tmp_path, kills=50, max_delay=0.35, compact_every=4)
    versions = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".npy"))
    assert len(versions) >= 1 and any(".g" in v for v in versions)  # compactions happened


def test_writers_killed_between_commit_and_ack_twice_in_a_row(tmp_path):
    """A writer killed after commit(9) returned but before it logged the ack, then the writer that
    resumed from step 9 killed the same way after commit(10): the store holds step 10, and the
    checker refused it, as more than one step past the last ack (8). It failed the random-kill
    test now and then, when two kills in a row landed between a commit and its ack."""
    path, table = make_table(tmp_path, rows=200, dim=8)
    config = {
        "table": {"path": str(path)},
        "tiers": {"hot": {"capacity": 6}, "warm": {"capacity": 12}},
    }
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    ctx, seen = _context(), 0
    for killed_at in (9, 10):
        writer = ctx.Process(
            target=crash_writer.run_writer, args=(config, str(log_dir), 10**6, 4, killed_at)
        )
        writer.start()
        writer.join(120)
        assert writer.exitcode == -signal.SIGKILL
        seen, _ = _check_reopened(config, table.numpy(), str(log_dir), seen)
        assert seen == killed_at
    assert crash_writer.acked_steps(str(log_dir))[-1] == 8


@pytest.mark.slow
def test_kill_9_many_times(tmp_path):
    _kill_loop(tmp_path, kills=300, max_delay=1.0, compact_every=25)


def _check_versions(read, rows, stop_at, errors, reads):
    """Read every row repeatedly until ``stop_at``: all must carry the version's step."""
    try:
        while time.monotonic() < stop_at:
            step, values = read(np.arange(rows))
            if step == 0:
                continue
            reads.append(step)
            if not (np.asarray(values) == step).all():
                errors.append(f"step {step}: rows hold {np.unique(np.asarray(values))[:5]}")
                return
    except Exception as exc:  # reported, not lost in the thread
        errors.append(repr(exc))


def _process_reader(delta_dir, row_bytes, rows, seconds, queue):
    """Another process: reads the delta's committed versions through its own environment."""
    delta = RowDelta(delta_dir, row_bytes)
    errors, reads = [], []

    def read(ids):
        step, found, raw = delta.snapshot(ids)
        return step, raw.view(np.float32) if found.all() else np.full(1, np.nan)

    _check_versions(read, rows, time.monotonic() + seconds, errors, reads)
    delta.close()
    queue.put((errors, len(set(reads))))


def test_readers_see_only_committed_versions(tmp_path):
    """A writer commits every row = step; reader threads and a reader process snapshot all rows
    meanwhile and must never see two steps at once."""
    path, _ = make_table(tmp_path, rows=64, dim=4)
    store = TieredStore.open({"table": {"path": str(path)}, "tiers": {"hot": {"capacity": 8}}})
    store.commit(0)  # creates the delta
    ctx = _context()
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_process_reader, args=(str(delta_path(path)), store.row_bytes, 64, 2.0, queue)
    )
    proc.start()
    errors: list[str] = []
    reads: list[int] = []
    stop_at = time.monotonic() + 2.0

    def read(ids):
        step, rows = store.read_committed(ids)
        return step, rows.numpy()

    threads = [
        threading.Thread(target=_check_versions, args=(read, 64, stop_at, errors, reads))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    step = 0
    while time.monotonic() < stop_at:
        step += 1
        ids = torch.randperm(64)
        store.write(ids[:32], torch.full((32, 4), float(step)))  # half, then the other half:
        store.lookup(ids)  # a reader between the two writes would see a mix
        store.write(ids[32:], torch.full((32, 4), float(step)))
        store.commit(step)
    for t in threads:
        t.join()
    proc_errors, proc_versions = queue.get(timeout=30)
    proc.join()
    store.close()
    assert errors == [] and proc_errors == []
    assert step > 5 and len(set(reads)) > 3 and proc_versions > 3  # readers saw many versions


def _reopening_reader(config, rows, stop_at, errors, reads):
    """A read-only store's lookups (caches and all) until ``stop_at``, reopened whenever the table
    moved on: every lookup must show one committed step in every row."""
    try:
        store = TieredStore.open(config)
        while time.monotonic() < stop_at:
            if store.is_stale():
                store.close()
                store = TieredStore.open(config)
            step, values = store.committed_step, store.lookup(torch.arange(rows)).numpy()
            if step:
                reads.append((store.generation, step))
                if not (values == step).all():
                    errors.append(f"gen {store.generation} step {step}: {np.unique(values)[:5]}")
                    return
        store.close()
    except Exception as exc:
        errors.append(repr(exc))


def _reopening_process(config, rows, seconds, queue):
    errors, reads = [], []
    _reopening_reader(config, rows, time.monotonic() + seconds, errors, reads)
    queue.put((errors, len(set(reads)), len({g for g, _ in reads})))


def test_a_version_is_held_before_its_files_are_opened(tmp_path, monkeypatch):
    """A compaction that removes old versions while a store is opening the current one (here:
    between reading its manifest and its page checksums, where CI once caught it) leaves that
    version alone: the store took its shared lock before opening any of its files."""
    from tiered_store import cold_table

    path, _ = make_table(tmp_path, rows=64, dim=4)
    with TieredStore.open({"table": {"path": str(path)}}) as writer:
        writer.write(torch.arange(64), torch.ones(64, 4))
        writer.commit(1)
    compact_table(path, progress=False)  # generation 1: every row 1.0
    real_load = cold_table.load_page_checksums
    removed: list[list[int]] = []

    def load_while_compacting(npy, entry):
        if not removed:  # once: the next version published, the old ones removed if unused
            removed.append([])
            with TieredStore.open({"table": {"path": str(path)}}) as writer:
                writer.write(torch.arange(64), torch.full((64, 4), 2.0))
                writer.commit(2)
            removed[0] = compact_table(path, progress=False).removed_generations
        return real_load(npy, entry)

    monkeypatch.setattr(cold_table, "load_page_checksums", load_while_compacting)
    with TieredStore.open({"table": {"path": str(path)}}) as store:
        assert store.generation == 1 and store.is_stale()  # generation 2 is current
        # generation 1 with its delta's last commit, which generation 2 folded in
        assert store.committed_step == 2
        assert torch.equal(store.lookup(torch.arange(64)), torch.full((64, 4), 2.0))
    assert removed == [[]]  # generation 0 went at the first compaction; 1 was held


def test_a_version_loaded_in_memory_is_held_while_it_is_read(tmp_path, monkeypatch):
    """load_table_in_memory holds the version it reads, as a store does: a compaction between
    reading its file and its delta (where the delta's rows are) removes neither."""
    from tiered_store.engram import checkpoint

    path, _ = make_table(tmp_path, rows=64, dim=4)
    with TieredStore.open({"table": {"path": str(path)}}) as writer:
        writer.write(torch.arange(64), torch.ones(64, 4))
        writer.commit(1)
    real_open_delta = checkpoint.open_delta
    removed: list[list[int]] = []

    def open_while_compacting(version, row_bytes):
        if not removed:
            removed.append(compact_table(path, progress=False).removed_generations)
        return real_open_delta(version, row_bytes)

    monkeypatch.setattr(checkpoint, "open_delta", open_while_compacting)
    table = checkpoint.load_table_in_memory(path)
    assert torch.equal(table.weight, torch.ones(64, 4))  # the base with its delta's rows
    assert removed == [[]]  # generation 0 was held while it was read


def test_readers_during_writes_and_compactions_see_committed_versions(tmp_path):
    """A writer commits every row = step and compacts every 4th step; reader stores in threads
    and in another process (small caches, reopened when stale) never see a mix of steps, and
    versions they still read are not removed under them."""
    path, _ = make_table(tmp_path, rows=64, dim=4)
    config = {
        "table": {"path": str(path)},
        "tiers": {"hot": {"capacity": 8}, "warm": {"capacity": 8}},
    }
    seconds = 3.0
    ctx = _context()
    queue = ctx.Queue()
    proc = ctx.Process(target=_reopening_process, args=(config, 64, seconds, queue))
    proc.start()
    errors: list[str] = []
    reads: list[tuple[int, int]] = []
    stop_at = time.monotonic() + seconds
    threads = [
        threading.Thread(target=_reopening_reader, args=(config, 64, stop_at, errors, reads))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    store, step = TieredStore.open(config), 0
    while time.monotonic() < stop_at:
        step += 1
        store.write(torch.arange(64), torch.full((64, 4), float(step)))
        store.commit(step)
        if step % 4 == 0:
            store.close()
            compact_table(path, progress=False)
            store = TieredStore.open(config)
    store.close()
    for t in threads:
        t.join()
    proc_errors, proc_versions, proc_generations = queue.get(timeout=30)
    proc.join()
    assert errors == [] and proc_errors == []
    assert len(set(reads)) > 3 and proc_versions > 3
    assert len({g for g, _ in reads}) > 1 and proc_generations > 1  # read across compactions


def test_a_reader_opened_while_a_commit_lands_serves_the_commit_it_reports(tmp_path, monkeypatch):
    # the race the test above caught now and then: a commit landing while a reader opens (after
    # it listed the delta's rows, before it pinned its view) showed the new step over the rows
    # of the old one. Here the commit lands exactly there.
    path, data = make_table(tmp_path, rows=64, dim=4)
    config = {"table": {"path": str(path)}, "tiers": {"hot": {"capacity": 8}}}
    writer = TieredStore.open(config)
    writer.write(torch.arange(64), torch.full((64, 4), 1.0))  # the delta exists, no commit yet
    listed = RowDelta.ids

    def list_then_commit(delta):
        rows = listed(delta)
        if not writer.committed_step:
            writer.commit(1)
        return rows

    monkeypatch.setattr(RowDelta, "ids", list_then_commit)
    with TieredStore.open(config) as reader:
        assert writer.committed_step == 1  # it landed while the reader opened
        want = data if reader.committed_step == 0 else torch.full((64, 4), 1.0)
        assert torch.equal(reader.lookup(torch.arange(64)), want)
    writer.close()


def test_a_writer_killed_after_forking_leaves_no_lock_to_its_child(tmp_path):
    """A writer forks a child (a DataLoader worker would), then dies by kill -9: the table's writer
    lock and version hold go with it, though the child lives on (it closed its copies at fork)."""
    import textwrap

    path, _ = make_table(tmp_path, rows=50, dim=4)
    child_pid = tmp_path / "child.pid"
    script = textwrap.dedent(
        f"""
        import os, signal, time, torch
        from tiered_store import TieredStore
        store = TieredStore.open({{"table": {{"path": {str(path)!r}}}}})
        store.write([3], torch.ones(1, 4))
        store.commit()  # the writer lock and the version hold are taken
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        open({str(child_pid)!r}, "w").write(str(pid))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    (tmp_path / "writer.py").write_text(script)
    writer = forkserver.run_python([tmp_path / "writer.py"], timeout=60)
    assert writer.returncode == -signal.SIGKILL
    child = int(child_pid.read_text())
    try:
        os.kill(child, 0)  # the child is still alive
        with TieredStore.open({"table": {"path": str(path)}}) as store:
            store.write([4], torch.ones(1, 4))  # the writer lock is free
            assert store.commit() == 2
        assert compact_table(path, progress=False).removed_generations == [0]  # not held
    finally:
        os.kill(child, signal.SIGKILL)


def _table_with_a_commit(tmp_path, rows: int):
    """``tmp_path/t.npy``: ``rows`` x 4 zeros, and row 5 written as ones and committed."""
    from tiered_store import create_table

    path = tmp_path / "t.npy"
    create_table(path, np.zeros((rows, 4), np.float32), progress=False)
    with TieredStore.open({"table": {"path": str(path)}}) as store:
        store.write([5], torch.ones(1, 4))
        store.commit()
    return path


def _run_until_killed(script: str, *args) -> None:
    """Run ``script`` with ``args`` (in a process of the forkserver): it kills itself (SIGKILL)
    part way."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "killed.py").write_text(script)
        killed = forkserver.run_python([Path(d) / "killed.py", *args])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]


_OVERWRITE_KILLED_AFTER_THE_DELTA = r"""
import os, shutil, signal, sys
import numpy as np
from tiered_store import create_table
_rmtree = shutil.rmtree
def rmtree(*args, **kwargs):  # the old delta is gone: killed before the new table is published
    _rmtree(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
shutil.rmtree = rmtree
create_table(sys.argv[1], np.full((100, 4), 7, np.float32), progress=False, overwrite=True)
"""


def test_an_overwrite_killed_part_way_leaves_no_old_rows_without_their_writes(tmp_path):
    """Killed after the old delta went and before the new table: nothing opens, and a rerun
    makes the new table (the old base opened without the writes committed over it)."""

    from tiered_store import create_table
    from tiered_store.errors import TieredStoreError

    path = _table_with_a_commit(tmp_path, 100)
    _run_until_killed(_OVERWRITE_KILLED_AFTER_THE_DELTA, path)
    with pytest.raises((TieredStoreError, OSError)):
        TieredStore.open({"table": {"path": str(path)}}).close()
    create_table(path, np.full((100, 4), 7, np.float32), progress=False, overwrite=True)
    with TieredStore.open({"table": {"path": str(path)}}) as store:
        assert store.lookup([5, 0]).tolist() == [[7.0] * 4] * 2


_COMPACTION_KILLED_AT = r"""
import os, signal, sys
from tiered_store import atomic_file
from tiered_store.delta import compaction
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[2] == "temporaries":  # the new version written under hidden names, none renamed
    atomic_file.AtomicFile.publish = die
else:  # the new version complete, the pointer not switched to it
    compaction.publish_version = die
compaction.compact_table(sys.argv[1], progress=False)
"""


@pytest.mark.parametrize("killed_at", ["temporaries", "unpublished"])
def test_the_next_compaction_removes_what_a_killed_one_left(tmp_path, killed_at):
    """A compaction killed before its pointer switched leaves a whole table's worth of files;
    the next one removes them (before writing its own copy) and reports them."""

    path = _table_with_a_commit(tmp_path, 300)
    before = {p.name for p in tmp_path.iterdir()}
    _run_until_killed(_COMPACTION_KILLED_AT, path, killed_at)
    left = sorted({p.name for p in tmp_path.iterdir()} - before)
    assert left and all(("t.g1.npy" in name) for name in left), left

    report = compact_table(path, progress=False)
    assert sorted(report.removed_leftovers) == left
    assert report.new_generation == 1 and report.removed_generations == [0]
    after = sorted(p.name for p in tmp_path.iterdir())
    assert not [name for name in after if name.endswith(".tmp")], after
    with TieredStore.open({"table": {"path": str(path)}}) as store:
        assert store.lookup([5, 6]).tolist() == [[1.0] * 4, [0.0] * 4]
    assert compact_table(path, progress=False).removed_leftovers == []


def test_a_killed_compaction_past_another_tables_file_is_cleaned_up_once_that_file_goes(tmp_path):
    """With another table named ``t.g1.npy`` there, a compaction of t writes ``t.g2.npy``; killed
    before its pointer switched, then that other table removed (as the warning asks, were it an
    old version), the next compaction took ``t.g2.npy`` for a later version than a killed one
    leaves ("past the next"), refused, and told to point at it, which would drop a commit made
    since. The version records the generation it was compacted from, so it is a leftover."""
    from tiered_store import create_table
    from tiered_store.delta.table_versions import version_path

    path = _table_with_a_commit(tmp_path, 300)
    other = tmp_path / "t.g1.npy"
    create_table(other, np.full((3, 4), 7.0, np.float32), progress=False)
    _run_until_killed(_COMPACTION_KILLED_AT, path, "unpublished")
    assert (tmp_path / "t.g2.npy.manifest.json").exists()  # whole, never published
    with TieredStore.open({"table": {"path": str(path)}}) as store:  # a commit after the kill
        store.write([6], torch.full((1, 4), 2.0))
        store.commit()
    for name in ("t.g1.npy", "t.g1.npy.manifest.json", "t.g1.npy.pages.crc32c"):
        (tmp_path / name).unlink()
    report = compact_table(path, progress=False)
    assert "t.g2.npy" in report.removed_leftovers and not version_path(path, 2).exists()
    assert report.new_generation == 1 and report.delta_rows == 2
    with TieredStore.open({"table": {"path": str(path)}}) as store:
        assert store.lookup([5, 6, 7]).tolist() == [[1.0] * 4, [2.0] * 4, [0.0] * 4]


_COMPACT_KILLED_AT_STEP = r"""
import os, signal, sys
from tiered_store.cli import main
calls, last = [0], int(sys.argv[2])
def counted(call):
    def step(*args, **kwargs):  # the file system's steps: each one the last, in turn
        calls[0] += 1
        if calls[0] == last:
            os.kill(os.getpid(), signal.SIGKILL)
        return call(*args, **kwargs)
    return step
for name in ("replace", "rename", "unlink", "rmdir", "fsync", "ftruncate"):
    setattr(os, name, counted(getattr(os, name)))
main(["compact", sys.argv[1], "--quiet"])
"""


def _assert_rows(path: Path, want: dict[int, float], step: int) -> None:
    """The table's rows ``want`` holds read back as their values (``step``: named on failure)."""
    ids = sorted(want)
    with TieredStore.open({"table": {"path": str(path)}}) as store:
        assert store.lookup(ids)[:, 0].tolist() == [want[i] for i in ids], step


def _commit_then_compact_killed_at(path: Path, step: int, want: dict[int, float]) -> int:
    """Commit row ``10 + step`` as ``step`` (noted in ``want``), run `compact` killed before its
    ``step``-th file-system step, and check every committed row reopens; the run's exit code
    (0: it ran to the end)."""
    want[10 + step] = float(step)
    with TieredStore.open({"table": {"path": str(path)}}) as store:
        store.write([10 + step], torch.full((1, 4), float(step)))
        store.commit()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "killed.py").write_text(_COMPACT_KILLED_AT_STEP)
        run = forkserver.run_python([Path(d) / "killed.py", path, str(step)])
    assert run.returncode in (0, -signal.SIGKILL), run.stderr[-2000:]
    _assert_rows(path, want, step)
    return run.returncode


def test_a_compaction_killed_at_each_step_in_turn_loses_no_commit_and_the_next_proceeds(tmp_path):
    """``tiered-store compact`` killed (SIGKILL) before each file-system step it takes in turn
    (renames, unlinks, fsyncs), a row committed before each run and another table named like one
    of the table's versions beside it: every committed row reopens, the next compaction cleans
    up what the killed one left and goes on (never refusing it as a later version), and the
    other table is never touched."""
    from tiered_store import create_table

    path = _table_with_a_commit(tmp_path, 300)
    other = np.full((3, 4), 7.0, np.float32)
    create_table(tmp_path / "t.g2.npy", other, progress=False)
    want = {5: 1.0}
    for last in range(1, 200):
        if _commit_then_compact_killed_at(path, last, want) == 0:  # every step was killed once
            break
    assert last > 10 and np.array_equal(np.load(tmp_path / "t.g2.npy"), other)


def test_a_compaction_from_a_whole_table_killed_at_each_step_skipping_another_table(tmp_path):
    """As above, but each run from a whole table (the kill before cleaned up by a compaction), so
    that the cleanup's own steps never take the numbers of the run's: above, the kills fell on a
    compaction's first steps and on its removals of old versions, never on its pointer switch,
    nor on writing a version past another table's file (its other table, ``t.g2.npy``, is
    skipped only once its kills have moved past the writing steps). Here another table is named
    like the version each run would write (it skips that generation): every committed row
    reopens, the next compaction cleans up and goes on (never refusing a leftover), and no other
    table is touched."""
    from tiered_store import create_table
    from tiered_store.delta.table_versions import current_version

    path = _table_with_a_commit(tmp_path, 300)
    want, others = {5: 1.0}, {}
    for last in range(1, 200):
        skipped = tmp_path / f"t.g{current_version(path)[1] + 1}.npy"
        others[skipped] = np.full((3, 4), -float(last), np.float32)
        create_table(skipped, others[skipped], progress=False)
        returncode = _commit_then_compact_killed_at(path, last, want)
        with pytest.warns(UserWarning, match=rf"left .*{skipped.name}"):
            compact_table(path, progress=False)  # what the killed one left: cleaned up, no refusal
        _assert_rows(path, want, last)
        if returncode == 0:  # it ran to the end: every step was a kill point once
            break
    assert last > 10
    for other, rows in others.items():
        assert np.array_equal(np.load(other), rows), other


def test_a_compaction_leaves_the_temporaries_of_a_live_page_checksum_addition(tmp_path):
    """A compaction removed every hidden ``.TABLE.gN.npy*.tmp`` as a killed compaction's, also
    those of a `verify --add-page-checksums` running on the current version in another process,
    which then failed at its rename; it now removes only those whose writer's lock it can take."""
    from tests.conftest import paused_page_checksum_addition
    from tiered_store.delta.table_versions import present_version

    path = _table_with_a_commit(tmp_path, 300)
    assert compact_table(path, progress=False).new_generation == 1
    with paused_page_checksum_addition(present_version(path)[0], tmp_path / "add") as live:
        assert compact_table(path, progress=False).removed_leftovers == []
        assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == live
    assert not list(tmp_path.glob(".*.tmp"))


_READER_THAT_WAITS = r"""
import sys, time
from tiered_store import TieredStore
store = TieredStore.open({"table": {"path": sys.argv[1]}})
store.lookup([1, 2, 3])  # a reader store: one commit pinned, an LMDB reader slot taken
print("ready", flush=True)
time.sleep(120)
"""


def test_a_reader_killed_with_kill_9_keeps_no_old_pages_from_reuse(tmp_path):
    """A reader process killed (kill -9) while it holds a commit leaves its LMDB reader slot
    behind, pinning that commit's pages. The writer frees such slots before each commit: commits
    rewriting the same rows reuse the old pages, and the delta stays its size."""
    from tiered_store import create_table

    path = tmp_path / "t.npy"
    create_table(path, np.zeros((2000, 64), np.float32), progress=False)
    config = {"table": {"path": str(path)}, "tiers": {"hot": {"capacity": 16}}}

    def commit_every_row(store, times):
        for step in range(times):
            store.write(torch.arange(2000), torch.full((2000, 64), float(step)))
            store.commit()

    with TieredStore.open(config) as writer:
        commit_every_row(writer, 3)
    (tmp_path / "reader.py").write_text(_READER_THAT_WAITS)
    reader = forkserver.PythonProcess([tmp_path / "reader.py", path], stderr=False)
    try:
        assert reader.stdout.readline().strip() == "ready"
        writer = TieredStore.open(config)  # opened while the reader lives: its slot is live
        commit_every_row(writer, 1)
    finally:
        reader.kill()
        reader.wait()
    data = delta_path(path) / "data.mdb"
    size = data.stat().st_size
    commit_every_row(writer, 12)  # ~0.5 MB of rows each: 6 MB more if no page were reused
    writer.close()
    assert data.stat().st_size <= size * 1.5, (size, data.stat().st_size)


_REMOVAL_KILLED_AT_THE_DELTA = r"""
import os, signal, sys
from tiered_store.delta import compaction, table_versions
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
table_versions.shutil.rmtree = die  # killed removing the old version's delta
compaction.compact_table(sys.argv[1], progress=False)
"""


def test_a_removal_killed_at_the_delta_leaves_the_version_for_the_next_compaction(tmp_path):
    """The old version's delta goes before its .npy: a compaction killed while removing it leaves
    the .npy, by which the next compaction finds the version and removes the rest."""

    path = _table_with_a_commit(tmp_path, 300)
    _run_until_killed(_REMOVAL_KILLED_AT_THE_DELTA, path)
    assert path.exists() and delta_path(path).is_dir()  # generation 0, half removed
    with TieredStore.open({"table": {"path": str(path)}}) as store:
        assert store.generation == 1
        store.write([6], torch.ones(1, 4))
        store.commit()
    report = compact_table(path, progress=False)
    assert report.new_generation == 2 and report.removed_generations == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir() if "g2" not in p.name) == [
        "t.npy.current",
        "t.npy.writer.lock",
    ]


def test_a_delta_left_without_its_version_is_removed_never_a_held_or_current_one(tmp_path):
    """A delta whose version's .npy is gone (a removal killed part way by code that unlinked the
    .npy first) is removed by the next compaction's cleanup; the delta of a version a store holds
    and the current version's delta stay."""
    from tiered_store.delta.table_versions import (
        remove_abandoned_versions,
        version_path,
        writer_lock,
    )

    path = _table_with_a_commit(tmp_path, 300)
    old_reader = TieredStore.open({"table": {"path": str(path)}})  # holds generation 0
    assert compact_table(path, progress=False).removed_generations == []
    with TieredStore.open({"table": {"path": str(path)}}) as store:  # generation 1's own delta
        store.write([6], torch.ones(1, 4))
        store.commit()
    with writer_lock(path):
        assert remove_abandoned_versions(path) == []  # generation 0 is held, 1 is current
    old_reader.close()
    for name in ("t.npy.manifest.json", "t.npy.pages.crc32c", "t.npy"):  # what such code left
        (tmp_path / name).unlink()
    with writer_lock(path):
        assert remove_abandoned_versions(path) == ["t.npy.delta"]
    assert not delta_path(path).exists() and delta_path(version_path(path, 1)).is_dir()
    with TieredStore.open({"table": {"path": str(path)}}) as store:
        assert store.committed_step == 2 and store.lookup([5, 6]).tolist() == [[1.0] * 4] * 2


_FORK_A_WORKER_AND_DIE = r"""
pid = os.fork()  # a worker started meanwhile (a DataLoader's): it outlives its parent's kill
if pid == 0:  # past its at-fork hooks (the slow one too), as a worker that runs
    open(sys.argv[2] + ".tmp", "w").write(str(os.getpid()))
    os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    time.sleep(120)
    os._exit(0)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_with_a_worker(tmp_path, staging: str, target: Path) -> int:
    """Run ``staging`` (a script that stops a writer of ``target`` at the moment to test, in a
    thread) in a fresh interpreter, which then forks a worker and dies by kill -9; returns the
    worker's pid (alive: the caller kills it)."""
    import subprocess
    import sys

    from tiered_store.serve.client import subprocess_env

    script, child, log = tmp_path / "killed.py", tmp_path / "child.pid", tmp_path / "log"
    script.write_text(staging + _FORK_A_WORKER_AND_DIE)
    with log.open("w") as out:  # not a pipe: waiting for it would wait for the worker too
        killed = subprocess.run(
            [sys.executable, str(script), str(target), str(child)],
            stdout=out, stderr=out, env=subprocess_env(), timeout=300,
        )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    return int(child.read_text())


_COMPACTION_KILLED_WITH_A_WORKER = r"""
import os, signal, sys, threading, time
os.register_at_fork(after_in_child=lambda: time.sleep(0.5))  # a child slow to run (a loaded host)
import tiered_store.table_format as tf
from tiered_store.delta import compaction
made, forked = threading.Event(), threading.Event()
_atomic_files = tf.atomic_files
def atomic_files(*args, **kwargs):  # the new version's temporaries made: wait for the fork
    files = _atomic_files(*args, **kwargs)
    made.set()
    forked.wait()
    return files
tf.atomic_files = atomic_files
threading.Thread(target=compaction.compact_table, args=(sys.argv[1],), kwargs={"progress": False},
                 daemon=True).start()
made.wait()
"""


def test_a_compaction_killed_after_forking_a_worker_leaves_nothing_locked(tmp_path):
    """A compaction killed while a child it forked (a DataLoader worker) lived on left its
    temporaries locked through the child's copies of their descriptors: the next compaction took
    them for a live writer's and left them (hundreds of MB) for as long as the child lived."""
    path = _table_with_a_commit(tmp_path, 300)
    worker = _killed_with_a_worker(tmp_path, _COMPACTION_KILLED_WITH_A_WORKER, path)
    try:
        left = sorted(p.name for p in tmp_path.glob(".t.g1.npy*.tmp"))
        assert len(left) == 3, left  # the new version's data, page checksums and manifest
        assert sorted(compact_table(path, progress=False).removed_leftovers) == left
        assert not list(tmp_path.glob(".*.tmp"))
    finally:
        os.kill(worker, signal.SIGKILL)


_PUBLISH_KILLED_WITH_A_WORKER = r"""
import os, signal, sys, threading, time
os.register_at_fork(after_in_child=lambda: time.sleep(0.5))  # a child slow to run (a loaded host)
import numpy as np
import tiered_store.table_format as tf
locked, forked = threading.Event(), threading.Event()
_refuse_existing, calls = tf.refuse_existing, []
def refuse_existing(*args, **kwargs):  # its second call is under the folder's lock: wait there
    calls.append(args)
    if len(calls) == 2:
        locked.set()
        forked.wait()
    return _refuse_existing(*args, **kwargs)
tf.refuse_existing = refuse_existing
threading.Thread(target=tf.create_table, args=(sys.argv[1], np.zeros((8, 4), np.float32)),
                 kwargs={"progress": False}, daemon=True).start()
locked.wait()
"""


def test_a_table_publish_killed_after_forking_a_worker_leaves_the_folder_unlocked(tmp_path):
    """A table writer killed inside its publish (under the folder's lock) while a child it forked
    lived on left the folder locked through the child's copy of its descriptor: every later
    create_table or compaction in that folder waited for the child."""
    import fcntl

    from tiered_store import create_table

    worker = _killed_with_a_worker(tmp_path, _PUBLISH_KILLED_WITH_A_WORKER, tmp_path / "a.npy")
    try:
        os.kill(worker, 0)  # the child is still alive
        folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: the child's
        finally:
            os.close(folder)
        create_table(tmp_path / "b.npy", np.ones((8, 4), np.float32), progress=False)
    finally:
        os.kill(worker, signal.SIGKILL)


_CHILD_RELEASES_A_COPIED_LOCK = r"""
import fcntl, os, sys
from tiered_store.process_locks import open_held, release
copied = open_held(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(copied, fcntl.LOCK_EX)
pid = os.fork()  # a worker (a DataLoader's) with a copy of its parent's store
if pid == 0:
    while (f := os.open(os.devnull, os.O_RDONLY)) < copied:  # fill every lower free number:
        pass  # the next open gets the copied lock's number if the fork freed it
    os.close(f)
    own = open_held(sys.argv[2], os.O_RDWR | os.O_CREAT, 0o644)  # the worker opens its own
    fcntl.flock(own, fcntl.LOCK_EX)
    release(copied)  # and closes the copy it got from its parent
    probe = os.open(sys.argv[2], os.O_RDONLY)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os._exit(0)  # its own lock is still held
    os._exit(3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_child_releasing_a_copied_lock_keeps_the_locks_it_opened(tmp_path):
    """A forked child's copy of its parent's lock descriptor was closed at fork, so the next lock
    the child opened could get its number; the copied store's close then released that number:
    the child's own lock (its version hold, writer lock, folder lock) was gone while in use."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD_RELEASES_A_COPIED_LOCK)
    out = forkserver.run_python([script, tmp_path / "parent.lock", tmp_path / "own.lock"])
    assert out.returncode == 0, f"the child's own lock was let go: {out.returncode} {out.stderr}"


_RELEASED_RIGHT_AFTER_A_FORK = r"""
import fcntl, os, sys, threading
r, w = os.pipe()
os.register_at_fork(after_in_child=lambda: os.read(r, 1))  # before process_locks': a slow child
import tiered_store.process_locks as pl
if sys.argv[2] == "forget":  # a fork by another thread between forgetting and closing
    forgotten, forked = threading.Event(), threading.Event()
    class Staged(set):
        def discard(self, item):
            super().discard(item)
            forgotten.set()
            forked.wait(5)
    pl._HELD = Staged(pl._HELD)
fd = pl.open_held(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
releasing = threading.Thread(target=pl.release, args=(fd,))
if sys.argv[2] == "forget":
    releasing.start()
    forgotten.wait()
pid = os.fork()  # a DataLoader worker, not yet scheduled: it holds copies of every descriptor
if pid == 0:
    os._exit(0)
if sys.argv[2] == "forget":
    forked.set()
else:
    releasing.start()  # the store closes just after the fork
releasing.join()
again = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the next writer (a compaction)
    code = 0
except BlockingIOError:
    code = 3  # the child's copy kept the released lock
os.write(w, b"x")
os.waitpid(pid, 0)
sys.exit(code)
"""


@pytest.mark.parametrize("when", ["after", "forget"])
def test_a_lock_released_as_a_child_is_forked_is_free_at_once(tmp_path, when):
    """A lock released just after a fork (or by one thread while another forked) stayed held
    through the child's copy until the child ran its at-fork hook (or for the child's life):
    with DataLoader workers started each epoch, the next compaction or store write failed now
    and then with 'table t.npy is being written (or compacted) by another store'."""
    import subprocess
    import sys

    from tiered_store.serve.client import subprocess_env

    script = tmp_path / "release.py"
    script.write_text(_RELEASED_RIGHT_AFTER_A_FORK)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "t.npy.writer.lock"), when],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, f"the released lock stayed held: {out.returncode} {out.stderr}"


_SIGNAL_HANDLER_TAKES_A_LOCK = r"""
import os, signal, sys
from tiered_store.process_locks import open_held, release
folder = sys.argv[1]
def on_term(signum, frame):  # a trainer's preemption handler: a checkpoint takes locks, or forks
    if sys.argv[2] == "lock":
        release(open_held(os.path.join(folder, "b.lock"), os.O_RDWR | os.O_CREAT, 0o644))
    else:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
signal.signal(signal.SIGTERM, on_term)
class Staged:  # the signal comes while open_held opens this lock
    def __fspath__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return os.path.join(folder, "a.lock")
release(open_held(Staged(), os.O_RDWR | os.O_CREAT, 0o644))
print("done")
"""


@pytest.mark.parametrize("then", ["lock", "fork"])
def test_a_signal_handler_taking_a_lock_inside_open_held_does_not_deadlock(tmp_path, then):
    """A signal handler (a trainer's SIGTERM checkpoint) that took a lock, or forked, while its
    thread was inside open_held waited forever for the lock open_held held."""
    script = tmp_path / "handler.py"
    script.write_text(_SIGNAL_HANDLER_TAKES_A_LOCK)
    out = forkserver.run_python([script, tmp_path, then], timeout=30)
    assert out.returncode == 0 and out.stdout == "done\n", (out.returncode, out.stderr)


_FORK_WHILE_A_FIFO_OPENS = r"""
import os, sys, threading, time
from tiered_store.process_locks import open_held
threading.Thread(target=open_held, args=(sys.argv[1], os.O_RDONLY), daemon=True).start()
time.sleep(0.2)  # the thread is in os.open, waiting for a writer that never comes
pid = os.fork()  # a DataLoader worker
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print("forked")
"""


def test_an_open_held_that_blocks_holds_up_no_fork(tmp_path):
    """open_held held the module's lock across os.open, which every fork takes first: a version
    file that is a FIFO (its open waits for a writer) stopped every fork in the process."""
    fifo = tmp_path / "t.g1.npy"
    os.mkfifo(fifo)
    script = tmp_path / "fifo.py"
    script.write_text(_FORK_WHILE_A_FIFO_OPENS)
    try:
        out = forkserver.run_python([script, fifo], timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("os.fork waited for an open_held blocked on a FIFO")
    assert out.returncode == 0 and out.stdout == "forked\n", (out.returncode, out.stderr)


_FORK_BETWEEN_OPEN_AND_TRACKING = r"""
import fcntl, os, sys, threading, time
import tiered_store.process_locks as pl
path = sys.argv[1]

def opened() -> bool:
    return any(os.readlink(f"/proc/self/fd/{fd}") == path for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}"))

got = []
with pl._OPENING:  # the tracking waits: a fork comes after the open, before the tracking
    opening = threading.Thread(target=lambda: got.append(pl.open_held(path, os.O_RDWR)))
    opening.start()
    for _ in range(5000):
        if opened():
            break
        time.sleep(0.001)
    else:  # open_held opening under the lock (before: the open waited for it)
        print("the open waited for the lock")
        os._exit(0)
    pid = os.fork()  # the child has a copy of the descriptor, untracked
    if pid == 0:
        time.sleep(30)
        os._exit(0)
opening.join()
fcntl.flock(got[0], fcntl.LOCK_EX)
os.close(got[0])  # the parent lets go, as it would by dying
probe = os.open(path, os.O_RDWR)
try:
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("held by the child")
os.kill(pid, 9)
os.waitpid(pid, 0)
"""


def test_a_fork_between_open_and_tracking_leaves_the_child_no_lock(tmp_path):
    """open_held opens without the module's lock: a fork between the open and the tracking copies
    the descriptor untracked, so open_held opens the file again and the lock taken on it is not
    shared with the child."""
    lock = tmp_path / "t.npy.writer.lock"
    lock.touch()
    script = tmp_path / "window.py"
    script.write_text(_FORK_BETWEEN_OPEN_AND_TRACKING)
    out = forkserver.run_python([script, lock], timeout=60)
    assert out.returncode == 0 and out.stdout == "free\n", (out.returncode, out.stdout, out.stderr)


_FORKS_RACING_EVERY_OPEN = r"""
import os, subprocess, sys, threading, time
from tiered_store.process_locks import open_held, release
folder = sys.argv[1]
WRITER = '''
import itertools, os, sys, time
folder = sys.argv[1]
for k in itertools.count(1):
    time.sleep(0.5)
    os.mkfifo(f"{folder}/fifo{k + 1}")
    os.symlink(f"fifo{k + 1}", f"{folder}/next")
    os.rename(f"{folder}/next", f"{folder}/t.g1.npy")  # the next open waits for the next round
    os.close(os.open(f"{folder}/fifo{k}", os.O_RDWR))  # wakes an open waiting on fifo{k}
'''
os.mkfifo(f"{folder}/fifo1")
os.symlink("fifo1", f"{folder}/t.g1.npy")
writer = subprocess.Popen([sys.executable, "-c", WRITER, folder])
stop = threading.Event()

def forker():  # a server forking workers all the time
    while not stop.is_set():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.01)

threading.Thread(target=forker, daemon=True).start()
done = threading.Event()
opening = lambda: (release(open_held(f"{folder}/t.g1.npy", os.O_RDONLY)), done.set())
threading.Thread(target=opening, daemon=True).start()
opened = done.wait(20)
stop.set()
writer.kill()
writer.wait()
print("opened" if opened else "still opening")
"""


def test_an_open_held_raced_by_forks_at_every_open_still_returns(tmp_path):
    """open_held opened again after each fork that came during its open, with no bound: opens
    that each take a while (a FIFO another process wakes every 500 ms, as a slow file system
    answers) while a thread forks every 10 ms kept it opening for good."""
    import sys

    from tiered_store.serve.client import subprocess_env

    script = tmp_path / "forks.py"
    script.write_text(_FORKS_RACING_EVERY_OPEN)
    out = subprocess.run(  # a fresh interpreter: a small process forks in milliseconds
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout == "opened\n", (out.returncode, out.stderr)


_HANDLER_FORKS_IN_THE_LAST_OPEN = r"""
import fcntl, os, sys
import tiered_store.process_locks as pl
path = sys.argv[1]
pl.OPEN_TRIES = 1  # straight to the last try, which holds the module's lock across its open
r, w = os.pipe()
done_r, done_w = os.pipe()  # the handler's worker runs until this script ends it
opener = os.fork()
if opener == 0:  # opens the lock, takes it and dies without releasing it (kill -9)
    def handler(frame, event, arg):  # a signal handler running just as the open returns
        if event == "c_return" and arg is os.open:
            sys.setprofile(None)
            if os.fork() == 0:  # its worker runs and exits, never returning to open_held
                os.close(done_w)
                os.read(done_r, 1)
                os._exit(0)
    sys.setprofile(handler)
    fd = pl.open_held(path, os.O_RDWR | os.O_CREAT, 0o644)
    sys.setprofile(None)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(w, b"x")
    os._exit(0)
os.waitpid(opener, 0)
assert os.read(r, 1) == b"x"
fd = os.open(path, os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("held by the handler's worker")
os.close(done_w)
"""


def test_a_fork_from_a_handler_in_the_last_open_leaves_the_child_no_lock(tmp_path):
    """open_held's last try (under the module's lock) did not count a fork that a signal handler
    in its own thread made between its open and its tracking: the forked worker kept an untracked
    copy, and the lock taken on it stayed held after its owner died."""
    script = tmp_path / "handler_forks.py"
    script.write_text(_HANDLER_FORKS_IN_THE_LAST_OPEN)
    out = forkserver.run_python([script, tmp_path / "t.npy.writer.lock"], timeout=60)
    assert out.returncode == 0 and out.stdout == "free\n", (out.returncode, out.stdout, out.stderr)


_INTERRUPTED_WHILE_A_FORK_HOLDS_THE_LOCK = r"""
import os, signal, sys, threading, time
import tiered_store.process_locks as pl
signal.signal(signal.SIGINT, signal.default_int_handler)
path = sys.argv[1]

def opened() -> bool:
    return any(os.readlink(f"/proc/self/fd/{fd}") == path for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}"))

held, done = threading.Event(), threading.Event()

def forking():  # holds the module's lock, as a fork in another thread does, past the open
    with pl._OPENING:
        held.set()
        while not opened():
            time.sleep(0.001)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # Ctrl-C, as open_held waits
        done.wait(30)

threading.Thread(target=forking, daemon=True).start()
held.wait()
try:
    pl.open_held(path, os.O_RDWR)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted")
done.set()
print("left open" if opened() else "closed", len(pl._HELD))
"""


def test_an_open_held_interrupted_after_its_open_closes_the_descriptor(tmp_path):
    """A Ctrl-C that came while open_held waited for the module's lock after its open (a fork in
    another thread holds it) left the descriptor open, and untracked, for the process's life."""
    lock = tmp_path / "t.npy.writer.lock"
    lock.touch()
    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED_WHILE_A_FORK_HOLDS_THE_LOCK)
    out = forkserver.run_python([script, lock], timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "interrupted\nclosed 0\n", out.stdout


_FLOCK_REFUSED = r"""
import ctypes, os, struct, sys
import numpy as np
from tiered_store.table_format import create_table
from tiered_store.delta import table_versions as tv
from tiered_store.distributed.shard_files import write_shards
from tiered_store.errors import TierIOError
from tiered_store.process_locks import _HELD
t = os.path.join(sys.argv[1], "t.npy")
for name in ("t.npy", "t.g1.npy"):
    create_table(os.path.join(sys.argv[1], name), np.ones((8, 4), np.float32), progress=False)
tv.publish_version(t, 1)
# a BPF filter: flock (73) -> ENOLCK (37), as NFS without a lock manager answers; all else allowed
insn = lambda code, k, jt=0, jf=0: struct.pack("HBBI", code, jt, jf, k)
prog = ctypes.create_string_buffer(
    insn(0x20, 0) + insn(0x15, 73, 0, 1) + insn(0x06, 0x50000 | 37) + insn(0x06, 0x7FFF0000)
)
fprog = struct.pack("HxxxxxxQ", 4, ctypes.addressof(prog))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, fprog, 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
calls = (
    lambda: tv.take_writer_lock(t, wait_s=0.1),
    lambda: tv.remove_unused_versions(t),
    lambda: write_shards(t, 2, "rows", progress=False),  # its one-run lock (exclusive_run)
)
for call in calls:
    fds = set(os.listdir("/proc/self/fd"))
    try:
        call()
    except TierIOError as exc:
        print(exc.errno, exc.strerror)
    print("left open:", len(set(os.listdir("/proc/self/fd")) - fds), len(_HELD))
"""


def test_a_flock_refused_otherwise_than_taken_closes_its_descriptor(tmp_path):
    """flock failing with ENOLCK (a real seccomp filter in a child) in take_writer_lock or
    remove_unused_versions left the descriptor open and tracked, and came out as a bare OSError
    (and still did in write_shards' one-run lock, exclusive_run); now a TierIOError naming the
    file, the descriptor closed."""
    script = tmp_path / "enolck.py"
    script.write_text(_FLOCK_REFUSED)
    out = forkserver.run_python([script, tmp_path], timeout=60)
    assert out.returncode == 0, out.stderr
    lock, version = str(tmp_path / "t.npy.writer.lock"), str(tmp_path / "t.npy")
    shards = str(tmp_path / "t.shard-0-of-2.npy.shard-run.lock")
    assert out.stdout.splitlines() == [
        f"37 {lock}: cannot lock it (No locks available); expected a file system with flock",
        "left open: 0 0",
        f"37 {version}: cannot lock it (No locks available); expected a file system with flock",
        "left open: 0 0",
        f"37 {shards}: cannot lock it (No locks available); expected a file system with flock",
        "left open: 0 0",
    ], out.stdout


def test_a_publish_whose_temporary_went_says_why_not_that_something_is_in_the_way(tmp_path):
    """A finished file whose temporary a cleanup removed before its rename (one that does not
    check a writer's lock) failed with "cannot write P: No such file or directory is in the
    way; ... move it aside": nothing was in the way of P."""
    from tiered_store.atomic_file import AtomicFile
    from tiered_store.errors import TierIOError

    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    atomic = AtomicFile(target, "wb")
    atomic.file.write(b"new")
    atomic.finish()
    atomic.tmp.unlink()  # a cleanup's doing
    with pytest.raises(TierIOError) as err:
        atomic.publish()
    message = str(err.value)
    assert "in the way" not in message and err.value.errno == errno.ENOENT
    assert f"cannot write {target}: renaming its finished temporary {atomic.tmp.name}" in message
    assert "No such file or directory" in message and f"{target} is left as it was" in message
    atomic.abort()
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]


def test_a_fifo_socket_or_device_at_a_written_path_is_refused_and_left_as_it_was(tmp_path):
    """AtomicFile refused only a folder in the way: write_json or a TraceWriter given a FIFO, a
    socket or a device wrote the file and renamed it over that (as root, over /dev/null). Each is
    refused before anything is written, naming the path and what is there; a link there is
    still replaced (its target left as it was)."""
    import socket
    import stat

    from tiered_store.atomic_file import AtomicFile, write_json
    from tiered_store.errors import TierIOError
    from tiered_store.trace import TraceWriter

    fifo, sock = tmp_path / "pipe", tmp_path / "sock"
    os.mkfifo(fifo)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    try:
        for path, kind in ((fifo, "a FIFO (named pipe)"), (sock, "a socket")):
            for write in (
                lambda p: write_json(p, {"a": 1}),
                lambda p: TraceWriter(p).close(),
                lambda p: AtomicFile(p, "wb").commit(),
            ):
                with pytest.raises(TierIOError) as err:
                    write(path)
                assert err.value.errno == errno.EEXIST
                assert f"cannot write {path}: {kind} is in the way; expected a file" in str(
                    err.value
                )
        with pytest.raises(TierIOError, match="cannot write /dev/null: a character device is in"):
            AtomicFile("/dev/null", "w")
    finally:
        server.close()
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and stat.S_ISSOCK(sock.lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "sock"]
    link = tmp_path / "link"
    link.symlink_to(fifo)
    write_json(link, {"a": 1})
    assert link.is_file() and not link.is_symlink() and stat.S_ISFIFO(fifo.lstat().st_mode)
