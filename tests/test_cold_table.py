"""ColdTable: one contract suite run against every I/O mode (mmap, pread, direct, uring)."""

from __future__ import annotations

import errno
import gc
import inspect
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiered_store.cold_table as ct
from tests.conftest import interrupted_reaps
from tiered_store.cold_table import ColdTable
from tiered_store.errors import ConfigError, RowIdError, TableFormatError, TierIOError
from tiered_store.io_uring import IoUring, uring_unavailable_reason
from tiered_store.table_format import RandomSource, TableNotFoundError, create_table

# (dtype, dim): row_bytes 148 (rows straddle pages), 128 (divides 4096: fast path),
# 18 (bf16, odd), 4096 (one page per row), 6000 (rows span 2-3 pages), 2 (tiny rows)
LAYOUTS = [
    ("float32", 37),
    ("float32", 32),
    ("bfloat16", 9),
    ("float16", 2048),
    ("float32", 1500),
    ("float16", 1),
]
ROWS = 3001


def raw(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Bytes of each row, for bit-exact comparison (bfloat16 included)."""
    if isinstance(x, torch.Tensor):
        x = x.contiguous().view(torch.uint8).numpy()
    return np.ascontiguousarray(x).view(np.uint8)


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[tuple[str, int], tuple[Path, np.ndarray]]:
    d = tmp_path_factory.mktemp("cold")
    out = {}
    for dtype, dim in LAYOUTS:
        path = d / f"{dtype}_{dim}.npy"
        create_table(path, RandomSource(ROWS, dim, dtype=dtype, seed=dim), progress=False)
        out[(dtype, dim)] = (path, np.load(path))
    return out


def direct_supported(path: Path) -> bool:
    try:
        ColdTable(path, io="direct", threads=1).close()
    except TierIOError:
        return False
    return True


class ColdTableContract:
    """Behaviour every io mode must have; subclasses set ``io``."""

    io: str

    def open(self, path: Path, threads: int = 4) -> ColdTable:
        return ColdTable(path, io=self.io, threads=threads)

    @pytest.mark.parametrize(("dtype", "dim"), LAYOUTS)
    def test_bit_exact_random_ids(self, tables, dtype, dim):
        path, ref = tables[(dtype, dim)]
        rng = np.random.default_rng(dim)
        with self.open(path) as table:
            assert (table.rows, table.dim) == (ROWS, dim) and table.dtype == getattr(torch, dtype)
            for k in (1, 7, 200, ROWS // 2, ROWS):
                ids = np.sort(rng.choice(ROWS, size=k, replace=False))
                got = table.read_rows(ids)
                assert got.dtype == table.dtype and got.shape == (k, dim)
                assert np.array_equal(raw(got), raw(ref[ids]))

    @pytest.mark.parametrize("verify_pages", [True, False])
    @pytest.mark.parametrize(("dtype", "dim"), LAYOUTS[:2])
    def test_ids_in_any_order_read_the_rows_asked_for(self, tables, dtype, dim, verify_pages):
        # unsorted ids planned negative page counts: uring then read past its buffer (a
        # segfault without page checks), pread and direct raised a numpy ValueError
        path, ref = tables[(dtype, dim)]
        ids = np.random.default_rng(5).integers(0, ROWS, 300)  # unsorted, with repeats
        ids[:2] = [ROWS - 1, 0]
        with ColdTable(path, io=self.io, threads=2, verify_pages=verify_pages) as table:
            assert np.array_equal(raw(table.read_rows(ids)), raw(ref[ids]))
            out = torch.empty((len(ids), dim), dtype=table.dtype)
            assert table.read_rows(ids[::-1].copy(), out) is out
            assert np.array_equal(raw(out), raw(ref[ids[::-1]]))
            with pytest.raises(RowIdError, match=f"row id {ROWS} is out of range"):
                table.read_rows(np.array([5, ROWS, 1]))

    @pytest.mark.parametrize(("dtype", "dim"), LAYOUTS)
    def test_table_ends_and_edges(self, tables, dtype, dim):
        path, ref = tables[(dtype, dim)]
        with self.open(path, threads=2) as table:
            for ids in ([ROWS - 1], [0], [0, ROWS - 1], [ROWS - 3, ROWS - 2, ROWS - 1]):
                ids = np.array(ids, dtype=np.int64)
                assert np.array_equal(raw(table.read_rows(ids)), raw(ref[ids]))
            empty = table.read_rows(np.array([], dtype=np.int64))
            assert empty.shape == (0, dim) and empty.dtype == table.dtype
            dup = np.array([5, 5, 6, 6, 6, ROWS - 1, ROWS - 1])  # sorted with repeats: allowed
            assert np.array_equal(raw(table.read_rows(dup)), raw(ref[dup]))

    def test_threads_one_and_int32_ids(self, tables):
        path, ref = tables[("float32", 37)]
        ids = np.arange(0, ROWS, 3, dtype=np.int32)
        with self.open(path, threads=1) as table:
            assert np.array_equal(raw(table.read_rows(ids)), raw(ref[ids]))
            assert np.array_equal(raw(table.read_rows(torch.from_numpy(ids))), raw(ref[ids]))

    def test_out_tensor(self, tables):
        path, ref = tables[("bfloat16", 9)]
        ids = np.array([1, 2, 500, ROWS - 1])
        with self.open(path) as table:
            out = torch.full((4, 9), 7.0, dtype=torch.bfloat16)
            assert table.read_rows(ids, out=out) is out
            assert np.array_equal(raw(out), raw(ref[ids]))
            for bad in (
                torch.empty(3, 9, dtype=torch.bfloat16),
                torch.empty(4, 9, dtype=torch.float32),
                torch.empty(9, 4, dtype=torch.bfloat16).t(),
            ):
                with pytest.raises(ValueError, match="expected a contiguous cpu"):
                    table.read_rows(ids, out=bad)

    def test_bad_ids(self, tables):
        path, _ = tables[("float32", 32)]
        with self.open(path) as table:
            with pytest.raises(RowIdError, match=f"row id {ROWS} is out of range.*< {ROWS}"):
                table.read_rows(np.array([0, ROWS]))
            with pytest.raises(RowIdError, match="row id -1"):
                table.read_rows(np.array([-1, 3]))
            with pytest.raises(RowIdError, match="1-D integer"):
                table.read_rows(np.array([1.0, 2.0]))
            with pytest.raises(RowIdError, match="1-D integer"):
                table.read_rows(np.array([[1, 2]]))
            # the ends in range, one in the middle not (unsorted): it crashed the CRC kernel
            with pytest.raises(RowIdError, match="row id 100000000 is out of range"):
                table.read_rows(np.array([0, 100_000_000, 3]))
            with pytest.raises(RowIdError, match="row id 18446744073709551615 is out of range"):
                table.read_rows(np.array([0, 2**64 - 1], dtype=np.uint64))  # not -1 after a cast
            assert table.read_errors == 0

    def test_a_relative_path_survives_a_chdir(self, tables, monkeypatch):
        path, ref = tables[("float32", 32)]
        monkeypatch.chdir(path.parent)
        with self.open(Path(path.name)) as table:
            monkeypatch.chdir("/")  # the table is still open, and still there
            assert np.array_equal(table.read_rows(np.arange(10)).numpy(), ref[:10])

    def test_counters(self, tables):
        path, _ = tables[("float32", 32)]
        with self.open(path) as table:
            table.read_rows(np.array([0, 1, 2000]))
            table.read_rows(np.array([5]))
            assert table.rows_read == 4
            assert table.read_requests >= 2 and table.read_errors == 0
            assert table.bytes_read >= 4 * table.row_bytes

    def test_concurrent_readers(self, tables):
        path, ref = tables[("float32", 37)]
        failures: list[str] = []
        with self.open(path, threads=3) as table:

            def reader(seed: int) -> None:
                rng = np.random.default_rng(seed)
                for _ in range(15):
                    ids = np.sort(rng.choice(ROWS, size=int(rng.integers(1, 900)), replace=False))
                    if not np.array_equal(raw(table.read_rows(ids)), raw(ref[ids])):
                        failures.append(f"seed {seed}")

            workers = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            assert table.rows_read > 0
        assert failures == []

    def test_close(self, tables):
        path, _ = tables[("float16", 1)]
        table = self.open(path)
        table.close()
        table.close()  # idempotent
        with pytest.raises(TierIOError, match="closed"):
            table.read_rows(np.array([1]))

    def test_close_while_other_threads_read(self, tables):
        """close() waits for the reads under way; a read begun after it is refused as closed
        (not a pool's RuntimeError, nor a read of a closed descriptor)."""
        path, ref = tables[("float32", 1500)]
        ids = np.arange(ROWS)[::-1]  # unsorted: the read sorts, then reads
        for _ in range(5):
            table = self.open(path)
            started = threading.Barrier(4)
            wrong: list[BaseException] = []
            args = (table, ids, raw(ref[ids]), started, wrong)
            workers = [threading.Thread(target=read_until_closed, args=args) for _ in range(3)]
            for w in workers:
                w.start()
            started.wait()
            table.read_rows(ids[:100])
            table.close()
            for w in workers:
                w.join()
            assert wrong == []


def read_until_closed(table, ids, expected, started, wrong) -> None:
    """Read ``ids`` until the table is closed; note anything else that goes wrong."""
    started.wait()
    while True:
        try:
            rows = table.read_rows(ids)
        except TierIOError as exc:
            if "is closed" not in str(exc):
                wrong.append(exc)
            return
        except BaseException as exc:
            wrong.append(exc)
            return
        if not np.array_equal(raw(rows), expected):
            wrong.append(AssertionError("rows differ"))


class TestMmap(ColdTableContract):
    io = "mmap"

    def test_large_batch_is_split_over_threads(self, tables, monkeypatch):
        monkeypatch.setattr(ct, "MMAP_MIN_ROWS_PER_TASK", 100)
        path, ref = tables[("float32", 37)]
        with self.open(path, threads=4) as table:
            ids = np.arange(ROWS)
            assert np.array_equal(raw(table.read_rows(ids)), raw(ref))
            assert table.read_requests == 4

    def test_a_table_that_cannot_be_mapped_is_a_tier_io_error_naming_it(self, tmp_path):
        """No address space for the map (a real RLIMIT_AS, in a child process: ``ulimit -v``
        under a large table) failed the open with a bare ``OSError: [Errno 12] Cannot allocate
        memory``, naming neither the table nor another io mode; the descriptor is closed."""
        path = tmp_path / "big.npy"
        create_table(path, RandomSource(1 << 16, 256), progress=False)  # 64 MiB
        script = textwrap.dedent(
            f"""
            import os, resource
            from tiered_store.cold_table import ColdTable
            from tiered_store.errors import TierIOError
            ColdTable({str(path)!r}, io="mmap", threads=1).close()  # everything loaded
            fds = len(os.listdir("/proc/self/fd"))
            with open("/proc/self/status") as f:
                vm = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmSize"))
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (vm + (32 << 20), hard))  # half the table
            try:
                ColdTable({str(path)!r}, io="mmap", threads=1)
            except TierIOError as exc:
                print("TierIOError", exc.errno, exc)
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
            print("fds", len(os.listdir("/proc/self/fd")) == fds)
            """
        )
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        first, fds = proc.stdout.splitlines()
        assert re.match(
            rf"TierIOError {errno.ENOMEM} .*cannot map table .*big.npy \(67,112,960 bytes\) for "
            r"io='mmap' \(Cannot allocate memory\); expected .*io='pread'",
            first,
        ), first
        assert fds == "fds True"


class ExtentReaderContract(ColdTableContract):
    """What the modes that plan page extents (pread, direct, uring) share."""

    @pytest.mark.parametrize(("dtype", "dim"), LAYOUTS)
    def test_small_buffers_and_extents(self, tables, monkeypatch, dtype, dim):
        """Dense and sparse batches with tiny extents/buffers: splits and flushes everywhere."""
        monkeypatch.setattr(ct, "MAX_EXTENT_PAGES", 2)
        monkeypatch.setattr(ct, "WORKER_BUFFER_BYTES", 3 * 4096)
        monkeypatch.setattr(ct, "URING_BUFFER_BYTES", 3 * 4096)
        path, ref = tables[(dtype, dim)]
        with self.open(path, threads=3) as table:
            for ids in (np.arange(ROWS), np.arange(0, ROWS, 7), np.arange(100, 140)):
                assert np.array_equal(raw(table.read_rows(ids)), raw(ref[ids]))

    def test_extents_are_coalesced(self, tables):
        path, _ = tables[("float32", 32)]  # 32 rows per page
        with self.open(path) as table:
            table.read_rows(np.arange(0, 32 * 10))  # 10 adjacent pages
            assert table.read_requests == 1 and table.bytes_read == 10 * 4096
            table.read_rows(np.array([0, 64, 64 * 3]))  # pages 1, 3, 7 (+ header page): gaps
            assert table.read_requests == 1 + 3

    def test_short_read_is_an_error(self, tmp_path, monkeypatch):
        """A file shrinking between the per-batch size check and the read: the reads come back
        short and raise (the check itself is tested for every mode in test_page_checksums)."""
        path = tmp_path / "short.npy"
        create_table(path, RandomSource(1000, 64), progress=False)
        with self.open(path) as table:
            os.truncate(path, 4096 + 500 * 256)  # file shrinks under an open table
            monkeypatch.setattr(table, "_check_file", lambda: None)  # as if it shrank just after
            with pytest.raises(TierIOError, match=r"short read from .*short.npy at offset"):
                table.read_rows(np.array([10, 999]))
            assert table.read_errors == 1


class TestPread(ExtentReaderContract):
    io = "pread"

    def test_eio_is_reported_and_counted(self, tables, monkeypatch):
        path, _ = tables[("float32", 32)]
        with self.open(path, threads=2) as table:

            def broken(fd, buffers, offset):
                raise OSError(errno.EIO, "Input/output error")

            monkeypatch.setattr(ct.os, "preadv", broken)
            with pytest.raises(TierIOError, match=r"of .*float32_32.npy at offset \d+ failed"):
                table.read_rows(np.array([0, 1000]))
            assert table.read_errors >= 1
            monkeypatch.undo()
            assert table.read_rows(np.array([3])).shape == (1, 32)  # still usable


class TestDirect(TestPread):
    io = "direct"

    @pytest.fixture(autouse=True)
    def _needs_o_direct(self, tables):
        path, _ = tables[("float32", 32)]
        if not direct_supported(path):
            pytest.skip("the test file system refuses O_DIRECT")

    def test_refusal_suggests_pread(self, tables, monkeypatch):
        path, _ = tables[("float32", 32)]
        real_open = os.open

        def no_direct(p, flags, *args):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(p, flags, *args)

        monkeypatch.setattr(ct.os, "open", no_direct)
        with pytest.raises(TierIOError, match=r"float32_32.npy.*refuses O_DIRECT.*io='pread'"):
            ColdTable(path, io="direct")


class TestUring(ExtentReaderContract):
    io = "uring"

    @pytest.fixture(autouse=True)
    def _needs_io_uring(self, tables):
        reason = uring_unavailable_reason()
        if reason is not None:
            pytest.skip(f"io_uring is unavailable: {reason}")
        path, _ = tables[("float32", 32)]
        if not direct_supported(path):
            pytest.skip("the test file system refuses O_DIRECT")

    def open(self, path: Path, threads: int = 4, queue_depth: int = 3) -> ColdTable:
        """A small queue depth, so the rings wrap and refill many times per batch."""
        return ColdTable(path, io=self.io, threads=threads, queue_depth=queue_depth)

    def test_a_read_interrupted_in_flight_leaves_the_ring_clean(self, tables):
        """Ctrl-C (here: raised at the second reap) with requests queued and in flight: the ring
        waits for them before the error goes on, and the next reads are exact."""
        path, ref = tables[("float32", 32)]
        with self.open(path, threads=1, queue_depth=2) as table:
            with interrupted_reaps(), pytest.raises(KeyboardInterrupt):
                table.read_rows(np.arange(0, ROWS, 64))  # every other page: ~47 requests
            for start in range(3):
                ids = np.arange(start, ROWS, 5)
                assert np.array_equal(table.read_rows(ids).numpy(), ref[ids])

    def test_a_ring_whose_drain_was_cut_short_reads_exactly_next_time(self, tables):
        """A second Ctrl-C as the drain is entered escapes it with reads in flight; the ring
        went back to the idle pool and the next read reaped the old completions as its own
        (an IndexError). The next read waits for them first, and its rows are exact."""
        path, ref = tables[("float32", 32)]
        with self.open(path, threads=1, queue_depth=8) as table:
            with interrupted_reaps(cut_short=True), pytest.raises(KeyboardInterrupt):
                table.read_rows(np.arange(0, ROWS, 64))  # every other page: ~47 requests
            for ids in (np.arange(3), np.arange(1, ROWS, 5)):
                assert np.array_equal(table.read_rows(ids).numpy(), ref[ids])

    def test_a_table_closed_with_reads_in_flight_keeps_their_buffer(self, tables, monkeypatch):
        """A drain cut short leaves reads in flight in an idle ring; the table closed then
        closed the ring and dropped the buffer they land in (freed, reused by anything). The
        ring keeps that buffer alive for good while they are in flight as it closes (reads of
        a file done by then keep nothing: one buffer more per close would never be freed)."""
        path, _ = tables[("float32", 32)]
        buffers, in_flight = [], []
        give, close = ColdTable._give_reader, IoUring.close

        def watched_close(self):  # the real close, noting the reads in flight as it begins
            if self._unfinished and self._sq_head is not None:
                in_flight.append(self._in_flight(*self._batch_start))
            close(self)

        def noted(self, reader):
            buffers.append(weakref.ref(reader._raw))
            give(self, reader)

        table = self.open(path, threads=1, queue_depth=8)
        monkeypatch.setattr(ColdTable, "_give_reader", noted)
        with interrupted_reaps(cut_short=True), pytest.raises(KeyboardInterrupt) as info:
            table.read_rows(np.arange(0, ROWS, 64))  # every other page: ~47 requests
        del info  # (its traceback holds the reader)
        monkeypatch.undo()
        monkeypatch.setattr(IoUring, "close", watched_close)
        table.close()
        gc.collect()
        assert len(buffers) == 1 and len(in_flight) == 1
        assert (buffers[0]() is not None) == (in_flight[0] > 0), in_flight

    @pytest.mark.parametrize(("dtype", "dim"), LAYOUTS)
    @pytest.mark.parametrize(("threads", "queue_depth"), [(1, 1), (1, 128), (3, 5)])
    def test_duplicates_and_straddling_rows(self, tables, dtype, dim, threads, queue_depth):
        """Random sorted ids with repeats, at any depth: bit-exact with np.load indexing."""
        path, ref = tables[(dtype, dim)]
        rng = np.random.default_rng(dim + queue_depth)
        with self.open(path, threads=threads, queue_depth=queue_depth) as table:
            for k in (1, 5, 300, 2 * ROWS):
                ids = np.sort(rng.integers(0, ROWS, k))
                assert np.array_equal(raw(table.read_rows(ids)), raw(ref[ids]))

    def test_failed_ring_reads_are_retried(self, tables, monkeypatch):
        """A ring read that fails or comes back short is read again by the careful path."""
        path, ref = tables[("float32", 37)]
        real = IoUring.read_batch

        def flaky(ring, fd, offsets, lengths, addresses, keep=None):
            got = real(ring, fd, offsets, lengths, addresses, keep)
            got[::3] = -errno.EAGAIN
            got[1::3] = np.minimum(got[1::3], 512)
            return got

        ids = np.arange(0, ROWS, 5)
        with self.open(path, threads=2) as table:
            monkeypatch.setattr(IoUring, "read_batch", flaky)
            assert np.array_equal(raw(table.read_rows(ids)), raw(ref[ids]))
            assert table.read_errors == 0

    def test_eio_names_the_table(self, tables, monkeypatch):
        path, _ = tables[("float32", 32)]
        with self.open(path, threads=2) as table:
            monkeypatch.setattr(
                IoUring, "read_batch", lambda ring, fd, o, n, a, keep: np.full(len(o), -errno.EIO)
            )

            def broken(fd, buffers, offset):
                raise OSError(errno.EIO, "Input/output error")

            monkeypatch.setattr(ct.os, "preadv", broken)
            with pytest.raises(TierIOError, match=r"of .*float32_32.npy at offset \d+ failed"):
                table.read_rows(np.array([0, 1000]))
            assert table.read_errors >= 1
            monkeypatch.undo()
            assert table.read_rows(np.array([3])).shape == (1, 32)  # still usable

    def test_a_reader_idle_past_a_minute_is_closed_with_its_buffer(self, tables):
        """A reader's buffer grown for a big batch was kept for good (threads x 64 MiB idle
        after one big batch at the defaults). A reader idle for more than ``URING_IDLE_S`` is
        closed, ring and buffer, as readers are next taken (the table's clock here: the
        monotonic one, moved on by the test)."""
        path, ref = tables[("float32", 32)]
        shift = [0.0]
        with self.open(path, threads=1) as table:
            table._clock = lambda: time.monotonic() + shift[0]
            table.read_rows(np.arange(ROWS))  # the whole table: one big buffer
            [big] = table._readers
            assert len(big.view) > 16 * 4096
            ids = np.array([7])
            shift[0] += ct.URING_IDLE_S / 2  # idle, not for long: kept
            assert np.array_equal(table.read_rows(ids).numpy(), ref[ids])
            assert table._readers == [big] and not big.ring.closed
            shift[0] += ct.URING_IDLE_S + 1
            assert np.array_equal(table.read_rows(ids).numpy(), ref[ids])
            assert big.ring.closed
            assert [len(r.view) for r in table._readers] == [4096]  # a new ring, one page

    def test_idle_readers_are_at_most_threads_and_none_past_a_minute(self, tables):
        """Reads at once in several threads each take up to ``threads`` readers; all of them
        were kept idle after, for good. The oldest past ``threads`` are closed as they are given
        back, and those idle past ``URING_IDLE_S`` as readers are next given back or taken."""
        path, ref = tables[("float32", 32)]
        now = [0.0]
        with self.open(path, threads=2) as table:
            table._clock = lambda: time.monotonic() + now[0]
            taken = [table._take_reader(8192) for _ in range(4)]  # two reads' worth at once
            for reader in taken:
                table._give_reader(reader)
            assert table._readers == taken[2:]
            assert [r.ring.closed for r in taken] == [True, True, False, False]
            older = table._take_reader(8192)  # taken[3]
            now[0] += ct.URING_IDLE_S / 2
            table._give_reader(older)  # idle since now, taken[2] since half a minute ago
            now[0] += ct.URING_IDLE_S * 0.75
            assert table._take_reader(8192) is older and taken[2].ring.closed
            assert table._readers == []
            table._give_reader(older)
            ids = np.arange(0, ROWS, 3)
            assert np.array_equal(table.read_rows(ids).numpy(), ref[ids])

    def test_a_ring_whose_drain_was_cut_short_is_not_waited_for_by_the_next_read(
        self, tables, monkeypatch
    ):
        """A ring whose drain a second Ctrl-C cut short went back to the idle list: the next
        read took it and waited for the old batch's reads (up to ``DRAIN_WAIT_S``), and one
        that never completes (a hung device; here a read of an empty pipe) was given up on,
        failing that read with 'io_uring is closed'. A reader taken with reads still pending is
        closed (its buffer kept while they may land) and another one reads."""
        from tiered_store import io_uring

        monkeypatch.setattr(io_uring, "DRAIN_WAIT_S", 0.3)
        path, ref = tables[("float32", 32)]
        read_end, write_end = os.pipe()
        try:
            with self.open(path, threads=1) as table:
                [hung] = table._readers  # the probe's, idle
                ring = hung.ring
                ring._batch_start = (ring._tail, ring._cq_head_value())
                ring._unfinished[:] = [hung._raw]  # a batch interrupted, its drain cut short
                read = (io_uring._IORING_OP_READ, 0, 0, read_end, 0, hung.address, 4096, 0, 0)
                ring._push(np.array([read], dtype=io_uring.SQE_DTYPE))
                assert ring.pending == 1
                ids = np.arange(0, ROWS, 7)
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    assert np.array_equal(table.read_rows(ids).numpy(), ref[ids])
                assert ring.closed and hung not in table._readers
                assert [r.ring.pending for r in table._readers] == [0]
        finally:
            os.write(write_end, b"x" * 4096)
            os.close(read_end)
            os.close(write_end)

    def test_close_closes_every_ring(self, tables):
        path, _ = tables[("float32", 37)]
        table = self.open(path, threads=3)
        table.read_rows(np.arange(0, ROWS, 2))
        taken = table._take_reader(4096)  # a reader busy while the table closes
        rings = [reader.ring for reader in table._readers] + [taken.ring]
        table.close()
        assert table._readers == [] and [ring._fd == -1 for ring in rings[:-1]] == [True] * (
            len(rings) - 1
        )
        assert taken.ring._fd >= 0
        table._give_reader(taken)
        assert taken.ring._fd == -1 and table._readers == []
        with pytest.raises(TierIOError, match="closed"):
            table.read_rows(np.array([1]))

    def test_unavailable_io_uring_suggests_direct(self, tables, monkeypatch):
        path, _ = tables[("float32", 32)]

        def refused(queue_depth, owner=""):
            raise OSError(errno.EPERM, "io_uring_setup(128) failed: io_uring is forbidden here")

        monkeypatch.setattr(ct, "IoUring", refused)
        with pytest.raises(
            TierIOError, match=r"io='uring' on table .*float32_32.npy is unavailable.*io='direct'"
        ):
            ColdTable(path, io="uring")

    def test_a_failed_first_page_check_closes_its_ring(self, tables, monkeypatch):
        """The ring of a first-page check that comes back failed is closed with the error, not
        left open for the garbage collector."""
        path, _ = tables[("float32", 32)]
        rings = []

        def failing(ring, fd, offsets, lengths, addresses, keep):
            rings.append(ring)
            return np.full(len(offsets), -errno.EIO, dtype=np.int32)

        monkeypatch.setattr(IoUring, "read_batch", failing)
        with pytest.raises(TierIOError, match=r"io='uring' read of .*float32_32.npy refused"):
            ColdTable(path, io="uring")
        assert len(rings) == 1 and rings[0].closed

    def test_a_ring_that_cannot_be_set_up_at_read_time_is_a_tier_io_error(self, tables):
        """Rings past the first are made by the first batch that needs them: one the kernel
        refuses then (here a real RLIMIT_NOFILE, in a child process) fails the read as a
        counted TierIOError naming the table, and the table reads on once there is room."""
        path, _ = tables[("float32", 37)]
        script = textwrap.dedent(
            f"""
            import os, resource, sys
            import numpy as np
            from tiered_store.cold_table import ColdTable
            from tiered_store.errors import TierIOError
            table = ColdTable({str(path)!r}, io="uring", threads=4, queue_depth=3)
            ids = np.arange(0, {ROWS}, 7)
            table.read_rows(ids[:3])  # everything compiled and loaded
            busy = table._take_reader(4096)  # the one idle ring (the probe's) busy: a batch makes its own
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
            held = []  # every descriptor number left below the limit: no room for a ring
            try:
                while True:
                    held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            try:
                table.read_rows(ids)
            except TierIOError as exc:
                print("TierIOError", exc.errno, table.read_errors, exc)
            finally:
                for fd in held:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            table._give_reader(busy)
            print("then", table.read_rows(ids).shape[0] == len(ids))
            """
        )
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) == 2, proc.stdout
        first, then = lines
        assert re.match(
            rf"TierIOError {errno.EMFILE} [1-9]\d* .*io='uring' on table .*float32_37.npy: cannot "
            r"set up another ring .*Too many open files.*io='direct'",
            first,
        ), first
        assert then == "then True"

    def test_a_ring_the_kernel_refuses_at_read_time_is_a_tier_io_error(self, tables):
        """A table opened with a working ring, then a seccomp filter (real, in a child process)
        answering io_uring_enter with EPERM: the read fails as a counted TierIOError naming the
        table, not a bare PermissionError. The ring it closes has no read in flight, so its
        buffer is freed (not kept for good, as for a ring closed with reads in flight)."""
        path, _ = tables[("float32", 37)]
        script = textwrap.dedent(
            f"""
            import ctypes, struct
            import numpy as np
            from tiered_store.cold_table import ColdTable
            from tiered_store.errors import TierIOError
            table = ColdTable({str(path)!r}, io="uring", threads=1, queue_depth=3)
            table.read_rows(np.arange(3))
            # a BPF filter: io_uring_enter (426) -> EPERM, everything else allowed
            insn = lambda code, k, jt=0, jf=0: struct.pack("HBBI", code, jt, jf, k)
            prog = ctypes.create_string_buffer(
                insn(0x20, 0) + insn(0x15, 426, 0, 1) + insn(0x06, 0x50000 | 1)
                + insn(0x06, 0x7FFF0000)
            )
            fprog = struct.pack("HxxxxxxQ", 4, ctypes.addressof(prog))
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
            assert libc.prctl(22, 2, fprog, 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
            try:
                table.read_rows(np.arange(0, {ROWS}, 3))
            except TierIOError as exc:
                print("TierIOError", exc.errno, table.read_errors, exc)
            from tiered_store import io_uring
            print("kept", len(io_uring._STRANDED))
            """
        )
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert re.fullmatch(
            rf"TierIOError {errno.EPERM} 1 .*io='uring' on table .*float32_37.npy: the ring's read "
            r"failed \(io_uring_enter failed: Operation not permitted\); use io='direct' .*\n"
            r"kept 0\n",
            proc.stdout,
        ), proc.stdout

    @pytest.mark.parametrize("depth", [0, 4097, True, 2.0])
    def test_bad_queue_depth(self, tables, depth):
        path, _ = tables[("float32", 32)]
        with pytest.raises(
            ConfigError, match=rf"queue_depth={depth!r}; expected an integer from 1"
        ):
            ColdTable(path, io="uring", queue_depth=depth)


# ---- opening checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("io", ct.IO_MODES)
def test_truncated_file_refused_on_open(tmp_path, io):
    path = tmp_path / "t.npy"
    m = create_table(path, RandomSource(100, 10), progress=False)
    os.truncate(path, m.file_bytes - 40)
    with pytest.raises(
        TableFormatError, match=rf"t.npy: file is truncated.*expected {m.file_bytes}"
    ):
        ColdTable(path, io=io)


def test_header_vs_manifest_dtype_refused_on_open(tmp_path):
    path = tmp_path / "t.npy"
    create_table(path, np.zeros((64, 4), np.float16), progress=False)
    create_table(tmp_path / "u.npy", np.zeros((64, 4), np.float32), progress=False)
    other = (tmp_path / "u.npy").read_bytes()[:4096]  # float32 header, same shape
    with open(path, "r+b") as f:
        f.write(other)
    with pytest.raises(TableFormatError, match=r"header dtype '<f4' != '<f2'"):
        ColdTable(path)


def test_missing_files_and_bad_arguments(tmp_path):
    with pytest.raises(TableNotFoundError):
        ColdTable(tmp_path / "nope.npy")
    path = tmp_path / "t.npy"
    create_table(path, np.zeros((4, 4), np.float32), progress=False)
    with pytest.raises(ConfigError, match="io='aio'; expected one of mmap, pread, direct, uring"):
        ColdTable(path, io="aio")
    with pytest.raises(ConfigError, match="threads=0"):
        ColdTable(path, threads=0)
    with pytest.raises(ConfigError, match=r"threads=np.True_; expected an integer from 1 to 256"):
        ColdTable(path, threads=np.True_)
    # no cap: a million readers meant a million threads' pool (cold.threads stops at 256)
    with pytest.raises(ConfigError, match=r"threads=1000000; expected an integer from 1 to 256"):
        ColdTable(path, threads=1_000_000)
    with ColdTable(path, threads=np.int64(2), queue_depth=np.int32(8)) as numpy_counts:
        assert (numpy_counts.threads, numpy_counts.queue_depth) == (2, 8)  # as plain ints
        assert {type(numpy_counts.threads), type(numpy_counts.queue_depth)} == {int}
    table = ColdTable(tmp_path / "t")  # name without .npy
    assert repr(table).startswith("ColdTable(") and table.path == path
    del table  # the finalizer closes the descriptor and pool


@pytest.mark.parametrize("io", ["pread", "mmap"])
def test_a_table_never_closed_is_closed_at_exit_after_its_read_under_way_and_says_so(tables, io):
    """A table never closed: at the exit its finalizer closed the descriptor under a read still
    under way in another thread (the number, freed, could name the next file opened), and a read
    in an atexit hook run after it failed as EBADF 'cannot check the file'. The read under way
    keeps the descriptor to its end, and a later read is refused naming the exit."""
    path, _ = tables[("float32", 37)]
    script = textwrap.dedent(
        f"""
        import atexit, os, threading
        import numpy as np
        def late():  # registered before the finalizers' exit hook: it runs after it
            try:
                os.fstat(fd)
                print("open under the read")
            except OSError as exc:
                print("closed under the read", exc.errno)
            leave.set()
            reader.join()
            try:
                os.fstat(fd)
                print("open after the read")
            except OSError:
                print("closed after the read")
            try:
                table.read_rows(np.arange(3))
            except Exception as exc:
                print(type(exc).__name__, exc)
        atexit.register(late)
        from tiered_store.cold_table import ColdTable
        table = ColdTable({str(path)!r}, io={io!r}, threads=2)
        table.read_rows(np.arange(3))
        fd, inside, leave = table._fd, threading.Event(), threading.Event()
        def read_under_way():
            with table._calls.entered():  # as a read between its entry and its end
                inside.set()
                leave.wait()
        reader = threading.Thread(target=read_under_way, daemon=True)
        reader.start()
        inside.wait()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(
        r"open under the read\nclosed after the read\nTierIOError \[Errno 9\] ColdTable "
        r".*float32_37.npy was closed by the interpreter's exit .*; expected its reads made "
        r"before the exit began: .*\n",
        proc.stdout,
    ), proc.stdout


@pytest.mark.parametrize("io", ["direct", "uring"])
def test_an_os_without_o_direct_is_refused_naming_the_io_asked_and_the_table(
    tmp_path, monkeypatch, io
):
    """Where os has no O_DIRECT the open said "io='direct' needs O_DIRECT" also for io='uring',
    and named no table; it names the io asked, the table and io='pread'."""
    path = tmp_path / "t.npy"
    create_table(path, np.zeros((4, 4), np.float32), progress=False)
    monkeypatch.delattr(os, "O_DIRECT")  # as on macOS
    with pytest.raises(TierIOError) as caught:
        ColdTable(path, io=io)
    message = str(caught.value)
    assert f"io={io!r} needs O_DIRECT" in message and str(path) in message
    assert "io='pread'" in message and caught.value.filename == str(path)


def test_a_table_path_that_cannot_be_checked_names_the_path_and_what_was_expected(tmp_path):
    """A batch's check of the path failing with another error than ENOENT (here ENOTDIR: its
    folder replaced by a file) said only "cannot check the file (Not a directory)"; it says
    what was expected and names the table in the error's filename."""
    folder = tmp_path / "d"
    folder.mkdir()
    path = folder / "t.npy"
    create_table(path, np.zeros((4, 4), np.float32), progress=False)
    with ColdTable(path) as table:
        folder.rename(tmp_path / "moved")
        folder.write_bytes(b"")  # d is now a file: d/t.npy fails with ENOTDIR
        with pytest.raises(TierIOError) as caught:
            table.read_rows(np.array([1]))
        assert caught.value.errno == errno.ENOTDIR and caught.value.filename == str(path)
        assert re.search(
            r"cannot check the file \(.*\); expected its path to name", str(caught.value)
        )
        assert table.read_errors == 1


# ---- property: every mode equals np.load indexing ----------------------------------------------


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.integers(1, 400),
    dim=st.integers(1, 70),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    data=st.data(),
)
def test_read_rows_matches_np_load(tmp_path_factory, rows, dim, dtype, data):
    d = tmp_path_factory.getbasetemp() / "prop"
    d.mkdir(exist_ok=True)
    path = d / f"{uuid.uuid4().hex}.npy"
    create_table(path, RandomSource(rows, dim, dtype=dtype), progress=False)
    ref = np.load(path)
    ids = np.array(
        sorted(data.draw(st.sets(st.integers(0, rows - 1), max_size=rows))), dtype=np.int64
    )
    threads = data.draw(st.integers(1, 4))
    for io in ct.IO_MODES:
        try:
            table = ColdTable(path, io=io, threads=threads)
        except TierIOError:
            assert io in ("direct", "uring")
            continue
        with table:
            assert np.array_equal(raw(table.read_rows(ids)), raw(ref[ids]))
    os.unlink(path)
    os.unlink(f"{path}.manifest.json")


def test_store_config_selects_uring(tables):
    """``tiers.cold: {io: uring, queue_depth: N}`` reaches the ColdTable; lookups stay exact."""
    from tiered_store import StoreConfig, TieredStore

    if uring_unavailable_reason() is not None:
        pytest.skip(f"io_uring is unavailable: {uring_unavailable_reason()}")
    path, ref = tables[("float32", 37)]
    cold = {"io": "uring", "threads": 2, "queue_depth": 5}
    config = StoreConfig.from_dict({"table": {"path": str(path)}, "tiers": {"cold": cold}})
    ids = np.random.default_rng(7).integers(0, ROWS, (4, 300))
    with TieredStore(config) as store:
        assert (store.cold.io, store.cold.threads, store.cold.queue_depth) == ("uring", 2, 5)
        assert np.array_equal(raw(store.lookup(torch.from_numpy(ids))), raw(ref[ids]))
    with pytest.raises(ConfigError, match="queue_depth"):
        StoreConfig.from_dict(
            {"table": {"path": str(path)}, "tiers": {"cold": {"io": "uring", "queue_depth": 0}}}
        )


def test_a_read_whose_runner_thread_cannot_start_is_read_by_the_runners_that_did(tmp_path):
    """A runner thread that could not start (a process limit, no memory for its stack) failed
    the read with "can't start new thread", while the runner already started went on reading
    into the rows the caller was given back an error for."""
    path = tmp_path / "t.npy"
    data = torch.arange(5000 * 16, dtype=torch.float32).reshape(5000, 16)
    create_table(path, data, progress=False)
    with ColdTable(path, io="pread", threads=3) as table:
        table.read_rows(np.array([0, 4000]))  # two extents: one runner thread starts
        ids = np.arange(0, 5000, 200)  # 25 extents: it and two runners more
        threading.stack_size(2**62)  # no further thread's stack can be mapped
        try:
            rows = table.read_rows(ids)
        finally:
            threading.stack_size(0)
    assert torch.equal(rows, data[ids])


def test_a_ctrl_c_while_a_read_waits_for_its_runners_returns_after_they_stopped(
    tmp_path, monkeypatch
):
    """A Ctrl-C while the caller waited for a runner thread raised out of read_rows at once,
    while that runner went on writing rows into ``out`` (a buffer the caller may already be
    filling again): the read stops its runners and returns once they have."""
    path = tmp_path / "t.npy"
    data = torch.arange(5000 * 16, dtype=torch.float32).reshape(5000, 16)
    create_table(path, data, progress=False)
    ids = np.arange(0, 5000, 200)  # 25 extents, 8 groups
    out = torch.full((len(ids), 16), -1.0)
    held, release, interrupted = threading.Event(), threading.Event(), threading.Event()
    main = threading.main_thread()

    def main_waits_for_a_runner() -> bool:
        frame = sys._current_frames().get(main.ident)
        names = []
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        return bool(names) and names[0] == "wait" and "_run_parallel" in names

    def interrupt() -> None:
        """SIGINT once the caller waits for the held runner; release it once the caller, the
        signal handled, waits for it again (a caller that returned releases it itself)."""
        while not (held.is_set() and main_waits_for_a_runner()):
            release.wait(0.001)
        signal.pthread_kill(main.ident, signal.SIGINT)
        interrupted.wait()
        while not release.wait(0.001):
            if main_waits_for_a_runner():
                release.set()

    def ctrl_c(signum, frame):
        interrupted.set()
        raise KeyboardInterrupt

    with ColdTable(path, io="pread", threads=2) as table:
        extract = table._extract

        def held_extract(*args, **kwargs):
            """The runner thread's first group waits for ``release``; the caller's, for that."""
            if threading.current_thread() is not main and not held.is_set():
                held.set()
                release.wait()
            elif threading.current_thread() is main:
                held.wait(30)
            return extract(*args, **kwargs)

        monkeypatch.setattr(table, "_extract", held_extract)
        default = signal.signal(signal.SIGINT, ctrl_c)
        try:
            threading.Thread(target=interrupt, daemon=True).start()
            with pytest.raises(KeyboardInterrupt):
                table.read_rows(ids, out=out)
            returned = out.clone()
        finally:
            release.set()
            signal.signal(signal.SIGINT, default)
    assert held.is_set() and interrupted.is_set()
    assert torch.equal(out, returned)  # nothing written after read_rows returned


def test_a_ctrl_c_between_two_runner_waits_still_waits_for_the_runners_left(tmp_path):
    """A Ctrl-C that arrived after the caller's wait for one runner returned, before it waited
    for the next (the loop's jump back), raised out of the read while that runner went on
    writing into ``out``: the caller waits for every runner whenever the Ctrl-C comes."""
    path = tmp_path / "t.npy"
    create_table(path, torch.zeros(100, 4), progress=False)
    caller = threading.current_thread()
    gates: dict[int, threading.Event] = {}
    both_in, injected, stop = threading.Event(), threading.Event(), threading.Event()
    finished: list[int] = []

    def fn(k: int) -> None:
        """The caller's task waits for both runners to hold one; each runner's waits for its gate."""
        if threading.current_thread() is caller:
            both_in.wait()
        else:
            gates[threading.get_ident()] = gate = threading.Event()
            if len(gates) == 2:
                both_in.set()
            gate.wait()
        finished.append(k)

    def release_the_awaited_runner() -> None:
        """Open the gate of the runner whose Event the caller waits on (found by its frame)."""
        while not stop.wait(0.001):
            frame, awaited = sys._current_frames().get(caller.ident), None
            while frame is not None and frame.f_code.co_name != "_run_parallel":
                awaited, frame = frame.f_locals.get("self"), frame.f_back  # Event.wait's last
            for ident, top in sys._current_frames().items():
                while frame is not None and awaited is not None and top is not None:
                    if top.f_code.co_name == "runner" and top.f_locals.get("ended") is awaited:
                        gates[ident].set()  # in its task: the caller waits once both are
                    top = top.f_back

    source, first = inspect.getsourcelines(ColdTable._run_parallel)
    loop_line = first + next(i for i, s in enumerate(source) if "for ended in joined" in s)
    visits = [0]

    def trace(frame, event, arg):
        """Raise a Ctrl-C as the caller comes back to its wait loop after one wait returned."""
        if event == "call":
            return trace if frame.f_code.co_name == "_run_parallel" else None
        if event == "line" and frame.f_lineno == loop_line and not injected.is_set():
            visits[0] += 1
            if visits[0] == 2:
                injected.set()
                raise KeyboardInterrupt
        return trace

    helper = threading.Thread(target=release_the_awaited_runner, daemon=True)
    with ColdTable(path, io="pread", threads=3) as table:
        helper.start()
        previous = sys.gettrace()
        sys.settrace(trace)
        try:
            with pytest.raises(KeyboardInterrupt):
                table._run_parallel(fn, 3)
            done_when_raised = sorted(finished)
        finally:
            sys.settrace(previous)
            stop.set()
            for gate in list(gates.values()):
                gate.set()
            helper.join()
    assert injected.is_set()
    assert done_when_raised == [0, 1, 2]  # every runner's task had ended


def test_a_ctrl_c_in_the_callers_task_is_raised_over_a_runners_earlier_error(tmp_path):
    """A Ctrl-C during the caller's own task came after a runner's error in the list the
    caller raises the first of: the read raised the runner's error and the Ctrl-C was lost."""
    path = tmp_path / "t.npy"
    create_table(path, torch.zeros(100, 4), progress=False)
    caller = threading.current_thread()
    busy, failing = threading.Event(), threading.Event()

    def fn(k: int) -> None:
        """A runner's task fails while the caller's runs; the caller's, once that runner has
        ended, is interrupted."""
        if threading.current_thread() is not caller:
            busy.wait()
            failing.set()
            raise OSError(errno.EIO, "runner failed")
        busy.set()
        failing.wait()
        frame = sys._getframe()
        while frame.f_code.co_name != "_run_parallel":
            frame = frame.f_back
        frame.f_locals["joined"][0].wait()  # the runner ended: its error is recorded
        raise KeyboardInterrupt

    with ColdTable(path, io="pread", threads=2) as table, pytest.raises(KeyboardInterrupt):
        table._run_parallel(fn, 2)


def test_a_close_interrupted_while_it_waits_for_a_read_is_finished_by_the_next(
    tmp_path, monkeypatch
):
    """A Ctrl-C while close() waited for a read in another thread left the table marked closed
    with its descriptor and pool open: every later close() returned at once, and they stayed
    open as long as the table object lived. The next close() finishes the job."""
    path = tmp_path / "t.npy"
    create_table(path, torch.zeros(100, 4), progress=False)
    table = ColdTable(path, io="pread", threads=2)
    fd, pool = table._fd, table._pool
    held, release = threading.Event(), threading.Event()
    extract = table._extract

    def held_extract(*args, **kwargs):
        held.set()
        release.wait()
        return extract(*args, **kwargs)

    monkeypatch.setattr(table, "_extract", held_extract)
    main = threading.main_thread()

    def interrupt_the_close() -> None:
        """SIGINT once the main thread waits in close() for the read held."""
        while True:
            frame, names = sys._current_frames().get(main.ident), []
            while frame is not None:
                names.append(frame.f_code.co_name)
                frame = frame.f_back
            if names[:2] == ["close", "close"]:  # the count's, waiting (called by the table's)
                break
            release.wait(0.001)
        signal.pthread_kill(main.ident, signal.SIGINT)

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    reader = threading.Thread(target=table.read_rows, args=(np.arange(10),))
    reader.start()
    held.wait()
    default = signal.signal(signal.SIGINT, ctrl_c)
    try:
        threading.Thread(target=interrupt_the_close, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            table.close()
    finally:
        signal.signal(signal.SIGINT, default)
        release.set()
        reader.join()
    table.close()
    assert (table._fd, table._pool) == (-1, None) and pool._shutdown
    opened = Path(f"/proc/self/fd/{fd}")
    assert not opened.exists() or opened.resolve() != path.resolve()
    with pytest.raises(TierIOError, match="is closed"):
        table.read_rows(np.array([1]))


def test_a_ctrl_c_as_a_read_enters_or_leaves_its_count_never_hangs_close(tmp_path):
    """A Ctrl-C handled in the count of reads under way (as the read's ``with`` left it: the
    count never went down; or inside the lock's release: the lock stayed held) made close()
    wait for ever for a read that had ended. Every point of the count's enter and exit is
    interrupted in turn, in a child process (the old code hung it): close() returns, and a
    read after it is refused."""
    path = tmp_path / "t.npy"
    create_table(path, torch.zeros(100, 4), progress=False)
    script = textwrap.dedent(
        f"""
        import sys, threading
        import numpy as np
        from tiered_store.cold_table import ColdTable
        from tiered_store.errors import TierIOError

        def counted(k, hits):
            '''A profiler raising KeyboardInterrupt at the k-th point where CPython handles a
            signal (a Python function's entry, the return of a call) in the count's code
            (store_lock.py) and in the functions it calls (a Condition's).'''
            def profile(frame, event, arg):
                if event not in ("call", "return", "c_return"):
                    return
                if event != "c_return" and not frame.f_code.co_filename.endswith("store_lock.py"):
                    frame = frame.f_back  # a Python function: counted where called from there
                if frame is None or not frame.f_code.co_filename.endswith("store_lock.py"):
                    return
                hits[0] += 1
                if hits[0] == k:
                    raise KeyboardInterrupt
            return profile

        k = 0
        while True:
            k += 1
            table, hits = ColdTable({str(path)!r}, io="pread", threads=1), [0]
            sys.setprofile(counted(k, hits))
            try:
                table.read_rows(np.arange(10))
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
            table.close()
            refused = []
            def read():
                try:
                    table.read_rows(np.arange(3))
                except TierIOError as exc:
                    refused.append(exc)
            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            reader.join(30)
            assert refused, f"interrupt {{k}}: a read after close was not refused"
            if hits[0] < k:  # every event has been interrupted once
                break
        print("points", k - 1)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[1]) >= 6, proc.stdout


_COUNTED_PROFILER = """
import sys, threading, time

def counted(k, hits):
    '''A profiler raising KeyboardInterrupt at the k-th point where CPython handles a signal (a
    Python function's entry, the return of a call) in the files FILES name.'''
    def profile(frame, event, arg):
        if event not in ("call", "return", "c_return"):
            return
        code = (frame.f_back if event == "call" else frame).f_code.co_filename
        if not code.endswith(FILES):
            return
        hits[0] += 1
        if hits[0] == k:
            raise KeyboardInterrupt
    return profile
"""


def _interrupted_at_each_point(script: str, files: tuple[str, ...]) -> list[str]:
    """Run ``script`` in a child process after the profiler ``counted(k, hits)`` of the points
    in ``files`` (sys, threading and time imported): the words it printed, once it exited 0."""
    profiler = _COUNTED_PROFILER.replace("FILES", repr(files))
    proc = subprocess.run(
        [sys.executable, "-c", profiler + script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_a_ctrl_c_as_close_waits_for_a_read_never_leaves_the_count_locked():
    """``close()`` waited through a ``Condition``, whose enter, exit and wait are Python code
    around the count's lock: a Ctrl-C handled there left the lock held (the read under way then
    hung as it ended, and every later read and close with it) or raised ``RuntimeError:
    release unlocked lock`` instead. Every point of a close that waits for a read in another
    thread, and gives up, is interrupted in turn, in a child process: a ``KeyboardInterrupt``
    comes out, the read ends, and the next close returns."""
    script = textwrap.dedent(
        """
        from tiered_store.store_lock import InFlight

        k = 0
        while True:
            k += 1
            calls, hits, inside, leave = InFlight(), [0], threading.Event(), threading.Event()

            def read():
                with calls.entered():
                    inside.set()
                    leave.wait()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            inside.wait()
            sys.setprofile(counted(k, hits))
            try:
                calls.close(0.01)  # the read stays: it gives up
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
            leave.set()
            reader.join(30)
            assert not reader.is_alive(), f"interrupt {k}: the read hung as it ended"
            assert calls.close(30), f"interrupt {k}: the next close waited for nothing"
            if hits[0] < k:  # every point has been interrupted once
                break
        print("points", k - 1)
        """
    )
    said = _interrupted_at_each_point(script, ("store_lock.py", "threading.py"))
    assert int(said[1]) >= 4, said


def in_close(thread: threading.Thread) -> bool:
    """Whether ``thread`` runs ``InFlight.close()`` (waiting for calls to end)."""
    from tiered_store.store_lock import InFlight

    frame = sys._current_frames().get(thread.ident)
    while frame is not None and frame.f_code is not InFlight.close.__code__:
        frame = frame.f_back
    return frame is not None


def test_two_closes_at_once_each_wait_for_the_calls_of_the_other_threads_alone():
    """``close()`` noted one closing thread, the last to call it, whose own calls it does not
    wait for: a close from inside a call (a signal handler's, in the main thread) with a second
    close on another thread then waited for its own call, which cannot end before it returns
    (without end, or until its timeout), and the other close returned while that call was
    still under way. Each close waits for the calls of the other threads than its own."""
    from tiered_store.store_lock import InFlight

    calls, inside, leave = InFlight(), threading.Event(), threading.Event()
    closed: dict[str, bool] = {}
    order: list[str] = []

    def read() -> None:
        with calls.entered():
            inside.set()
            leave.wait()

    def close_inside_a_call() -> None:
        with calls.entered():
            closed["inside"] = calls.close(30)
            order.append("inside returned")
            leave.wait(0.2)  # its call goes on a while after its close returned
            order.append("inside's call ends")

    def close_outside() -> None:
        closed["outside"] = calls.close(30)
        order.append("outside returned")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    inside.wait()
    threads = [threading.Thread(target=close_inside_a_call, daemon=True)]
    threads[0].start()
    while not in_close(threads[0]):  # waiting for the read
        time.sleep(0.001)
    threads.append(threading.Thread(target=close_outside, daemon=True))
    threads[1].start()
    while not in_close(threads[1]):
        time.sleep(0.001)
    leave.set()
    for thread in [reader, *threads]:
        thread.join(60)
    assert closed == {"inside": True, "outside": True}
    assert order == ["inside returned", "inside's call ends", "outside returned"]


def test_a_ctrl_c_as_the_last_call_ends_never_loses_the_close_waiting_for_it():
    """The last call to end woke the ``close()`` waiting in another thread; a Ctrl-C handled
    in that call's exit once its count was down but before the wake-up (at the entry of the
    check whether calls of other threads run) left the close waiting for a call that had ended:
    without end, or to its timeout. Every point of the
    exit is interrupted in turn, in a child process: the close returns True (where the count
    was not yet down, the thread stays counted: the known leak, which a close waits for)."""
    script = textwrap.dedent(
        """
        from tiered_store.store_lock import InFlight

        k = leaked = 0
        while True:
            k += 1
            calls, hits, closed = InFlight(), [0], []
            calls.__enter__()
            closer = threading.Thread(target=lambda: closed.append(calls.close()), daemon=True)
            closer.start()
            while not calls._closing:
                time.sleep(0.001)
            sys.setprofile(counted(k, hits))
            try:
                calls.__exit__(None, None, None)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
            if threading.get_ident() in calls._calls:  # interrupted before its count went down
                leaked += 1
            else:
                closer.join(30)
                assert closed == [True], f"interrupt {k}: the close waits for a call that ended"
            if hits[0] < k:  # every point has been interrupted once
                break
        print("points", k - 1, leaked)
        """
    )
    said = _interrupted_at_each_point(script, ("store_lock.py",))
    points, leaked = map(int, said[1:])
    assert points >= 4 and leaked < points, said


def test_a_close_from_a_signal_handler_inside_a_calls_count_returns():
    """A signal handler runs where its thread happens to be: one that closes, run on the main
    thread inside a call's enter or exit while it held the count's lock, waited for that lock
    for good (the lock was a plain ``Lock``). Every point where CPython handles a signal in an
    enter and an exit is given such a close in turn, in a child process: it returns True (it
    waits for other threads' calls only), the call is refused or goes on, and no count stays."""
    script = textwrap.dedent(
        """
        import faulthandler, sys
        from tiered_store.errors import StoreClosedError
        from tiered_store.store_lock import InFlight

        faulthandler.dump_traceback_later(30, exit=True)  # a hang: the stack, and a failure

        def counted(k, hits, calls, closed):
            '''A profiler closing ``calls`` at the k-th point where CPython handles a signal
            (a Python function's entry, the return of a call) in store_lock.py.'''
            def profile(frame, event, arg):
                if event not in ("call", "return", "c_return"):
                    return
                code = (frame.f_back if event == "call" else frame).f_code.co_filename
                if not code.endswith("store_lock.py"):
                    return
                hits[0] += 1
                if hits[0] == k:
                    sys.setprofile(None)
                    closed.append(calls.close())
            return profile

        k = refused = 0
        while True:
            k += 1
            calls, hits, closed = InFlight(), [0], []
            sys.setprofile(counted(k, hits, calls, closed))
            try:
                with calls.entered():
                    pass
            except StoreClosedError:
                refused += 1
            finally:
                sys.setprofile(None)
            assert closed in ([], [True]), f"point {k}: the close returned {closed}"
            assert not calls._calls, f"point {k}: a count stayed: {calls._calls}"
            if hits[0] < k:  # every point has been given a close once
                break
        print("points", k - 1, refused)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    points, refused = map(int, proc.stdout.split()[1:])
    assert points >= 4 and 0 < refused < points, proc.stdout


@pytest.mark.parametrize(
    ("io", "point"), [("pread", "_extract"), ("direct", "_extract"), ("uring", "_stale_readers")]
)
def test_a_close_from_a_signal_handler_inside_a_read_keeps_the_file_open_until_it_ends(
    tmp_path, io, point
):
    """``close()`` waits for other threads' reads only: one from a signal handler run inside a
    read of its own thread closed the descriptor under that read, which went on reading the
    number it held; a file the handler (or any thread) opened next got that number, and the
    read returned its bytes as the table's rows (a checksum failure, or without page checks
    wrong rows, silently). In a child process, a real signal is handled as the read extracts
    its first buffer: the handler closes the table and opens another file, and the read
    returns the table's rows; the descriptor is closed once it ended. (io="uring": as the read
    takes a ring, under the table's lock, which the close's release then waited for good.)"""
    if io == "uring" and (reason := uring_unavailable_reason()) is not None:
        pytest.skip(reason)
    path, other = tmp_path / "t.npy", tmp_path / "other.npy"
    data = np.ones((16384, 256), np.float32)  # the ids span several buffers
    create_table(path, data, progress=False)
    create_table(other, 2 * data, progress=False)
    script = textwrap.dedent(
        f"""
        import faulthandler, os, signal, sys
        import numpy as np
        from tiered_store.cold_table import ColdTable

        faulthandler.dump_traceback_later(30, exit=True)  # a hang: the stack, and a failure

        table = ColdTable({str(path)!r}, io={io!r}, threads=1, verify_pages=False)
        opened = []

        def close_and_open(signum, frame):
            table.close()
            opened.append(os.open({str(other)!r}, os.O_RDONLY))  # the lowest number free

        signal.signal(signal.SIGUSR1, close_and_open)

        def signal_at(frame, event, arg):  # handled at the point's first instruction
            if event == "call" and frame.f_code.co_name == {point!r}:
                sys.setprofile(None)
                signal.raise_signal(signal.SIGUSR1)

        sys.setprofile(signal_at)
        rows = table.read_rows(np.arange(0, 16384, 3))
        sys.setprofile(None)
        np.save(sys.stdout.buffer, rows.numpy())
        print(len(opened), table._fd, file=sys.stderr)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    import io as io_module

    rows = np.load(io_module.BytesIO(proc.stdout))
    assert np.array_equal(rows, data[::3]), "the read returned another file's bytes"
    assert proc.stderr.decode().split() == ["1", "-1"], proc.stderr.decode()


def test_a_close_without_timeout_waits_through_its_rechecks_for_a_long_call():
    """``close()`` checks every ``CLOSE_POLL_S`` whether calls still run: without a timeout it
    returns only once a call longer than several of those has ended."""
    from tiered_store import store_lock

    calls, inside, ended = store_lock.InFlight(), threading.Event(), []

    def read() -> None:
        with calls.entered():
            inside.set()
            time.sleep(4 * store_lock.CLOSE_POLL_S)
            ended.append(True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    inside.wait()
    assert calls.close() and ended == [True]
    reader.join()


def test_a_close_from_a_signal_handler_inside_a_reads_count_waits_for_another_threads_read(
    tmp_path,
):
    """A signal handler's close, run on the main thread as its read entered the count (the
    count's lock held there), waited for another thread's read, which could not end: its exit
    waited for that lock, for good. In a child process, a real signal is handled inside the
    main thread's enter while a second thread reads: the close returns once that read ended,
    the main thread's read is refused (it was not counted yet: its file is closed), and the
    second thread's read returns the table's rows."""
    path = tmp_path / "t.npy"
    data = np.arange(4096 * 16, dtype=np.float32).reshape(4096, 16)
    create_table(path, data, progress=False)
    script = textwrap.dedent(
        f"""
        import faulthandler, signal, sys, threading
        import numpy as np
        from tiered_store.cold_table import ColdTable
        from tiered_store.errors import TierIOError
        from tiered_store.store_lock import InFlight

        faulthandler.dump_traceback_later(30, exit=True)  # a hang: the stack, and a failure

        table = ColdTable({str(path)!r}, io="pread", threads=1, verify_pages=False)
        inside, go, got = threading.Event(), threading.Event(), []

        def other():
            def hold(frame, event, arg):  # counted: it waits inside its read for the close
                if event == "call" and frame.f_code.co_name == "_read_sorted":
                    sys.setprofile(None)
                    inside.set()
                    go.wait()
            sys.setprofile(hold)
            got.append(table.read_rows(np.arange(0, 4096, 7)).numpy())

        reader = threading.Thread(target=other)
        reader.start()
        inside.wait()

        def close(signum, frame):
            go.set()
            print("closed", table.close() is None)

        signal.signal(signal.SIGUSR1, close)

        def signal_in_enter(frame, event, arg):  # inside the enter's count, in its lock
            if (
                event == "c_call"
                and frame.f_code is InFlight.__enter__.__code__
                and getattr(arg, "__name__", "") == "get"
            ):
                sys.setprofile(None)
                signal.raise_signal(signal.SIGUSR1)

        sys.setprofile(signal_in_enter)
        try:
            table.read_rows(np.arange(3))
            print("read")
        except TierIOError as exc:
            print("refused", exc.errno)
        finally:
            sys.setprofile(None)
        reader.join()
        print("rows", np.array_equal(got[0], np.load({str(path)!r})[::7]), table._fd)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "closed",
        "True",
        "refused",
        str(errno.EBADF),
        "rows",
        "True",
        "-1",
    ], proc.stdout


def test_a_table_read_by_its_runner_threads_and_dropped_unclosed_is_collected(tmp_path):
    """A runner thread waiting for its next call still held its last one, a read's closure
    over the table: a table read with ``threads`` > 1 and dropped without ``close()`` was never
    collected, its descriptor and runner threads kept for good. Dropped, it is collected and
    its descriptor closed."""
    path = tmp_path / "t.npy"
    create_table(path, np.ones((4096, 256), np.float32), progress=False)
    table = ColdTable(path, threads=4)
    assert torch.equal(table.read_rows(np.arange(0, 4096, 3)), torch.ones(1366, 256))
    fd, dropped = table._fd, weakref.ref(table)
    del table
    deadline = time.monotonic() + 10  # a runner thread lets go of its call a moment after the
    while dropped() is not None and time.monotonic() < deadline:  # read returned (it set the
        gc.collect()  # result first): kept for good before the fix, now for that moment at most
        time.sleep(0.01)
    assert dropped() is None, "the dropped table was kept"
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_read_refused_as_the_table_closes_does_not_leave_the_close_to_it(tmp_path):
    """A read entered after close() began counted itself before it found the table closing, so
    the close, checking the count just then, left closing the file to that refused read:
    close() returned with the file still open. A read on another thread enters just as the
    close has waited for the reads under way (held as it is refused): the close returns with
    the file closed, and the read is refused."""
    from tiered_store.store_lock import InFlight

    path = tmp_path / "t.npy"
    create_table(path, np.zeros((64, 4), np.float32), progress=False)
    table = ColdTable(path, io="pread", threads=1, verify_pages=False)
    enter, refused, go, errors = threading.Event(), threading.Event(), threading.Event(), []

    def read() -> None:
        def hold(frame, event, arg):  # refused, not yet uncounted
            if event == "call" and frame.f_code is InFlight.__exit__.__code__:
                sys.setprofile(None)
                refused.set()
                go.wait(30)

        enter.wait(30)
        sys.setprofile(hold)
        try:
            table.read_rows(np.arange(3))
        except TierIOError as exc:
            errors.append(exc.errno)
        finally:
            sys.setprofile(None)
            refused.set()

    def read_as_then_starts(frame, event, arg):  # the close has waited for the reads
        if event == "call" and frame.f_code is InFlight.then.__code__:
            sys.setprofile(None)
            enter.set()
            refused.wait(30)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sys.setprofile(read_as_then_starts)
    try:
        table.close()
        fd = table._fd
    finally:
        sys.setprofile(None)
        enter.set()
        go.set()
        reader.join(30)
    assert fd == -1
    assert errors == [errno.EBADF]


def test_a_read_counted_as_the_table_closes_does_not_leave_it_open_after_close(tmp_path):
    """A read past its first check as close() began, counted just after the close found no
    reads under way, had close()'s then() see it counted and leave the release to it (refused,
    it ran it on its way out): close() returned with the file open. The read is held counted,
    refused, until the closing thread waits (or close() returned): close() returns with the
    file closed, and the read is refused."""
    from tiered_store.store_lock import InFlight

    path = tmp_path / "t.npy"
    create_table(path, np.zeros((64, 4), np.float32), progress=False)
    table = ColdTable(path, io="pread", threads=1, verify_pages=False)
    past_check, count, refused, go = (threading.Event() for _ in range(4))
    errors: list[int] = []

    def read() -> None:
        def hold(frame, event, arg):
            if (  # past the check for a close, not yet counted: the close begins now
                event == "c_call"
                and frame.f_code is InFlight.__enter__.__code__
                and arg is threading.get_ident
            ):
                past_check.set()
                count.wait(30)
            elif event == "call" and frame.f_code is InFlight.__exit__.__code__:
                sys.setprofile(None)  # counted and refused: the release is its to run
                refused.set()
                go.wait(30)

        sys.setprofile(hold)
        try:
            table.read_rows(np.arange(3))
        except TierIOError as exc:
            errors.append(exc.errno)
        finally:
            sys.setprofile(None)
            past_check.set()
            refused.set()

    def closing(frame, event, arg):
        if event == "call" and frame.f_code is InFlight.then.__code__:
            count.set()  # the close found no read: the read counts itself now
            refused.wait(30)
        elif event == "call" and frame.f_code is ColdTable._release_once.__code__:
            go.set()  # the close waits for the release: the refused read goes on

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    past_check.wait(30)
    sys.setprofile(closing)
    try:
        table.close()
        fd = table._fd
    finally:
        sys.setprofile(None)
        count.set()
        go.set()
        reader.join(30)
    assert fd == -1, "close() returned with the file open"
    assert errors == [errno.EBADF]


def test_a_second_close_returns_once_the_first_closed_the_file(tmp_path):
    """Two close() calls at once: the second found the release taken by the first (its
    finalizer detached) and returned while the first still released, the file open. The first
    is held inside its release until the second waits (or returned): the second returns with
    the file closed."""
    path = tmp_path / "t.npy"
    create_table(path, np.zeros((64, 4), np.float32), progress=False)
    table = ColdTable(path, io="pread", threads=2, verify_pages=False)
    releasing, go = threading.Event(), threading.Event()

    def first() -> None:
        def hold(frame, event, arg):
            if event == "call" and frame.f_code is ColdTable._release.__code__:
                sys.setprofile(None)
                releasing.set()
                go.wait(30)

        sys.setprofile(hold)
        try:
            table.close()
        finally:
            sys.setprofile(None)
            releasing.set()

    def second_waits(frame, event, arg):
        if event == "call" and frame.f_code is ColdTable._release_once.__code__:
            go.set()  # the second close waits for the first's release: it goes on

    closer = threading.Thread(target=first, daemon=True)
    closer.start()
    releasing.wait(30)
    sys.setprofile(second_waits)
    try:
        table.close()
        fd = table._fd
    finally:
        sys.setprofile(None)
        go.set()
        closer.join(30)
    assert fd == -1, "the second close() returned with the file open"


def test_a_close_in_a_forked_child_does_not_wait_for_the_parents_other_threads_reads(tmp_path):
    """A fork while another thread read the table copied that thread's count of reads under
    way into the child, where no thread is left to end it: a close of the copied table in the
    child waited for it for good. In a child process, a second thread is held inside a read as
    the main thread forks: the grandchild's close returns (its copy of the file closed), and
    the parent's read still returns the table's rows."""
    path = tmp_path / "t.npy"
    data = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
    create_table(path, data, progress=False)
    script = textwrap.dedent(
        f"""
        import faulthandler, os, sys, threading
        import numpy as np
        from tiered_store.cold_table import ColdTable

        table = ColdTable({str(path)!r}, io="pread", threads=1, verify_pages=False)
        inside, go, got = threading.Event(), threading.Event(), []

        def other():
            def hold(frame, event, arg):  # counted: it waits inside its read for the fork
                if event == "call" and frame.f_code.co_name == "_read_sorted":
                    sys.setprofile(None)
                    inside.set()
                    go.wait()
            sys.setprofile(hold)
            got.append(table.read_rows(np.arange(0, 64, 7)).numpy())

        reader = threading.Thread(target=other)
        reader.start()
        inside.wait()
        child = os.fork()
        if child == 0:
            faulthandler.dump_traceback_later(20, exit=True)  # a hang: the stack, a failure
            table.close()
            print("child closed", table._fd, flush=True)
            os._exit(0)
        _, status = os.waitpid(child, 0)
        go.set()
        reader.join()
        print("child", os.waitstatus_to_exitcode(status))
        print("rows", np.array_equal(got[0], np.load({str(path)!r})[::7]))
        table.close()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["child", "closed", "-1", "child", "0", "rows", "True"], (
        proc.stdout + proc.stderr
    )


def test_a_ctrl_c_as_close_releases_the_table_is_finished_by_the_next_close(tmp_path):
    """A Ctrl-C in close()'s release (its finalizer's detach, the pool's join, before the file's
    close) left the release half done: the finalizer detached, so no later close released again
    (the file and the pool's threads open for good), and one landing before the release had
    marked itself run hung every later close for good. Every point of a close is interrupted in
    turn, in a child process: the next close returns with the file and the threads closed."""
    path = tmp_path / "t.npy"
    create_table(path, np.zeros((64, 4), np.float32), progress=False)
    script = textwrap.dedent(
        f"""
        import faulthandler, os
        import numpy as np
        from tiered_store.cold_table import ColdTable

        faulthandler.dump_traceback_later(20, exit=True)  # a hang: the stack, a failure
        path = {str(path)!r}

        def open_here():
            return [f for f in os.listdir("/proc/self/fd") if os.path.realpath(
                "/proc/self/fd/" + f) == path]

        k = 0
        while True:
            k += 1
            table, hits = ColdTable(path, io="pread", threads=3, verify_pages=False), [0]
            table.read_rows(np.arange(0, 64, 3))  # the pool's threads started
            sys.setprofile(counted(k, hits))
            try:
                table.close()
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
            table.close()
            assert not open_here(), f"interrupt {{k}}: the file is still open"
            runners = [t for t in threading.enumerate() if t.name.startswith("cold-read")]
            assert not runners, f"interrupt {{k}}: {{runners}} still run"
            if hits[0] < k:  # every point has been interrupted once
                break
        print("points", k - 1)
        """
    )
    said = _interrupted_at_each_point(script, ("cold_table.py", "weakref.py", "prefetch.py"))
    assert int(said[1]) >= 10, said


def test_a_ctrl_c_as_a_runner_pool_starts_its_thread_neither_leaks_nor_hangs_it():
    """``RunnerPool.submit`` recorded its thread after ``Thread.start()``, which waits for the
    thread to run: a Ctrl-C handled in that wait left a thread running the pool's calls but
    not counted, so the next submit started another (two prefetch workers: batches out of
    order) and ``shutdown`` stopped one of them (the other waited on the queue for good).
    Every point of a submit that starts the thread is interrupted in turn, in a child process:
    the next call runs, on one thread, and ``shutdown(wait=True)`` leaves no thread of it."""
    script = textwrap.dedent(
        """
        from tiered_store.prefetch import RunnerPool

        def in_loop(frame):
            # (a thread whose start an interrupt cut short may stay in its start, not in it)
            while frame is not None and frame.f_code is not RunnerPool._work.__code__:
                frame = frame.f_back
            return frame is not None

        k = 0
        while True:
            k += 1
            pool, hits, ran = RunnerPool(1, f"pool{k}"), [0], []
            sys.setprofile(counted(k, hits))
            try:
                pool.submit(lambda: ran.append(threading.current_thread()))
            except (KeyboardInterrupt, RuntimeError):  # (threading's Condition, interrupted in
                pass  # its wait, may raise 'release unlocked lock' instead)
            finally:
                sys.setprofile(None)
            pool.submit(lambda: ran.append(threading.current_thread())).result(timeout=30)
            pool.shutdown(wait=True)
            assert len(set(ran)) == 1, f"interrupt {k}: calls ran on {len(set(ran))} threads"
            left = [n for n, f in sys._current_frames().items() if in_loop(f)]
            assert not left, f"interrupt {k}: {len(left)} threads still run its loop"
            if hits[0] < k:  # every point has been interrupted once
                break
        print("points", k - 1)
        """
    )
    said = _interrupted_at_each_point(script, ("prefetch.py", "threading.py"))
    assert int(said[1]) >= 4, said


def test_a_close_after_the_exits_finalizer_closes_the_file_its_read_under_way_left_open(tables):
    """The finalizer at the exit leaves the release to a read under way; a close() (a later exit
    hook's) waited for that read and replaced the release with its own, which, the finalizer
    run, releases nothing: a read ending between its count and its look at the release took the
    close's, and the file stayed open. Exactly one of them closes it, whichever comes last."""
    from tiered_store.store_lock import InFlight

    path, _ = tables[("float32", 37)]
    table = ColdTable(path, io="pread", threads=2)
    table.read_rows(np.arange(3))
    fd, inside, leave, closed = table._fd, threading.Event(), threading.Event(), threading.Event()
    exit_code = InFlight.__exit__.__code__
    source, first = inspect.getsourcelines(InFlight.__exit__)
    look = first + next(i for i, s in enumerate(source) if "then = self._then" in s)

    def trace(frame, event, arg):
        """Hold the read's end between its count and its look at the release until close()."""
        if event == "call":
            return trace if frame.f_code is exit_code else None
        if event == "line" and frame.f_lineno == look:
            closed.wait(30)
        return trace

    def read_under_way() -> None:
        sys.settrace(trace)
        try:
            with table._calls.entered():  # as a read between its entry and its end
                inside.set()
                leave.wait()
        finally:
            sys.settrace(None)

    reader = threading.Thread(target=read_under_way, daemon=True)
    reader.start()
    inside.wait()
    table._finalizer()  # as the exit runs it: the release is left to the read
    os.fstat(fd)  # still open under the read
    leave.set()
    table.close()
    closed.set()
    reader.join()
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF
