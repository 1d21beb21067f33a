"""IoUring: batched reads through a real io_uring, checked against the file's bytes."""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import re
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from tests.conftest import interrupted_reaps
from tiered_store import io_uring
from tiered_store.io_uring import IoUring, uring_unavailable_reason


@pytest.fixture(autouse=True)
def _needs_io_uring():
    reason = uring_unavailable_reason()
    if reason is not None:
        pytest.skip(f"io_uring is unavailable: {reason}")


@pytest.fixture
def data(tmp_path):
    """A 1 MiB + 100 B file of random bytes (its last page is short), and its contents."""
    payload = np.random.default_rng(0).integers(0, 256, (1 << 20) + 100, dtype=np.uint8)
    path = tmp_path / "data.bin"
    payload.tofile(path)
    fd = os.open(path, os.O_RDONLY)
    yield fd, payload
    os.close(fd)


def _pages(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads of the file's first ``n`` 4 KiB pages: their offsets, lengths and a buffer for them."""
    offsets = np.arange(n, dtype=np.int64) * 4096
    return offsets, np.full(n, 4096, dtype=np.int64), np.zeros(n * 4096, dtype=np.uint8)


@contextmanager
def _hung_read_interrupted(ring: IoUring) -> Iterator[tuple[int, np.ndarray]]:
    """A pipe and a page for ``ring`` to read it into, in flight inside the block until it ends
    (a hung device), and a Ctrl-C to the main thread once the kernel took the read; the pipe is
    written to as the block ends (or at 20 s), then the ring and the pipe are closed."""
    read_end, write_end = os.pipe()
    main, done = threading.main_thread(), threading.Event()

    def interrupt() -> None:
        """SIGINT once the kernel took the read; the pipe written to when done (or at 20 s)."""
        words, index = ring._sq_head
        while int(words[index]) == 0:
            done.wait(0.001)
        signal.pthread_kill(main.ident, signal.SIGINT)
        done.wait(20)
        os.write(write_end, b"x" * 4096)

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    default = signal.signal(signal.SIGINT, ctrl_c)
    helper = threading.Thread(target=interrupt, daemon=True)
    try:
        helper.start()
        yield read_end, np.zeros(4096, dtype=np.uint8)
    finally:
        signal.signal(signal.SIGINT, default)
        done.set()
        helper.join()
        ring.close()
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize("depth", [1, 3, 64, 1000])
def test_reads_land_where_asked(data, depth):
    """Many more requests than the ring holds: it wraps and refills; every byte checked."""
    fd, payload = data
    rng = np.random.default_rng(depth)
    n = 2000
    offsets = rng.integers(0, len(payload) - 700, n)
    lengths = rng.integers(1, 700, n)
    slots = np.cumsum(np.concatenate(([0], lengths[:-1])))
    buf = np.zeros(int(lengths.sum()), dtype=np.uint8)
    with IoUring(depth) as ring:
        got = ring.read_batch(fd, offsets, lengths, buf.ctypes.data + slots)
    assert np.array_equal(got, lengths)
    want = np.concatenate([payload[o : o + k] for o, k in zip(offsets, lengths, strict=True)])
    assert np.array_equal(buf, want)


def test_end_of_file_and_errors_per_request(data):
    fd, payload = data
    buf = np.zeros(3 * 4096, dtype=np.uint8)
    with IoUring(4) as ring:
        got = ring.read_batch(
            fd,
            np.array([len(payload) - 100, len(payload) + 4096, 0]),
            np.array([4096, 4096, 4096]),
            buf.ctypes.data + np.array([0, 4096, 8192]),
        )
        assert got.tolist() == [100, 0, 4096]
        assert np.array_equal(buf[:100], payload[-100:])
        bad = ring.read_batch(-1, np.array([0]), np.array([16]), np.array([buf.ctypes.data]))
        assert bad.tolist() == [-errno.EBADF]
        assert ring.read_batch(fd, np.array([], np.int64), np.array([]), np.array([])).size == 0
        with pytest.raises(ValueError, match="a length of -4096"):  # as u32: 4 GB past buf
            ring.read_batch(fd, np.array([0]), np.array([-4096]), np.array([buf.ctypes.data]))


def test_a_length_past_32_bits_is_refused(data):
    """An SQE holds a 32-bit length: 2**32 + 16 would read 16 bytes and claim success."""
    fd, _ = data
    buf = np.zeros(4096, dtype=np.uint8)
    with IoUring(2) as ring:
        with pytest.raises(ValueError, match=r"a length of 4,294,967,312 bytes; expected at most"):
            ring.read_batch(fd, np.array([0]), np.array([2**32 + 16]), np.array([buf.ctypes.data]))
        address = np.array([buf.ctypes.data])
        assert ring.read_batch(fd, np.array([0]), np.array([16]), address).tolist() == [16]


def test_close_is_idempotent_and_final(data):
    fd, _ = data
    ring = IoUring(2)
    ring.close()
    ring.close()
    with pytest.raises(OSError, match="closed"):
        ring.read_batch(fd, np.array([0]), np.array([1]), np.array([0]))


@pytest.mark.parametrize(
    ("depth", "message"),
    [(0, "queue_depth=0; expected 1 to 4096"), (5000, "5000"), (True, "an integer"), (2.5, "2.5")],
)
def test_bad_queue_depth(depth, message):
    with pytest.raises(ValueError, match=message):
        IoUring(depth)


def test_refused_setup_says_why(monkeypatch):
    def no_uring(*args):
        return -1

    monkeypatch.setattr(io_uring, "_syscall", lambda: no_uring)
    monkeypatch.setattr(io_uring.ctypes, "get_errno", lambda: errno.EPERM)
    with pytest.raises(OSError, match=r"io_uring_setup\(8\) failed: io_uring is forbidden here"):
        IoUring(8)
    assert "forbidden" in uring_unavailable_reason()


def test_other_architectures_are_refused(monkeypatch):
    monkeypatch.setattr(io_uring.platform, "machine", lambda: "aarch64")
    with pytest.raises(OSError, match="x86-64; this is Linux aarch64"):
        IoUring(8)
    assert "aarch64" in uring_unavailable_reason()


@pytest.mark.parametrize("second", [KeyboardInterrupt, SystemExit])
def test_a_second_ctrl_c_while_draining_still_waits_for_the_reads_in_flight(data, second):
    """A Ctrl-C mid-batch drains the ring, as the reads in flight land in the caller's memory; a
    second Ctrl-C during that drain closed the ring with reads still in flight, which could then
    land in memory the caller had freed (the cold tier drops a closed ring and its buffer). The
    drain waits through further interrupts: the batch ends with nothing in flight, the ring
    open and usable. So it does for a SystemExit (a SIGTERM handler's sys.exit), which it
    took for a ring that cannot be drained, closing it with the reads in flight."""
    fd, payload = data
    offsets, lengths, buf = _pages(200)
    with IoUring(4) as ring:
        # (the second raised once the reads are in)
        with interrupted_reaps(in_drain=second) as calls, pytest.raises(second):
            ring.read_batch(fd, offsets, lengths, buf.ctypes.data + offsets)
        assert calls[0] > 3 and not ring.closed
        tail0, head0 = ring._batch_start
        submitted = (ring._tail - tail0) & 0xFFFFFFFF
        assert submitted > 0 and (ring._cq_head_value() - head0) & 0xFFFFFFFF == submitted
        buf[:] = 0
        assert np.array_equal(
            ring.read_batch(fd, offsets, lengths, buf.ctypes.data + offsets), lengths
        )
        assert np.array_equal(buf, payload[: buf.size])


def test_a_drain_waits_in_the_kernel_for_the_reads_in_flight_without_spinning(monkeypatch):
    """The drain asked the kernel to submit every request of the batch, most of them submitted
    already; the kernel waits for completions only once it submitted all it was asked to, so
    every io_uring_enter returned at once and the drain spun (100% of a core, forever on a
    device that never completes). It asks for those not yet submitted, and waits: here for
    reads of a pipe, in flight until the test writes to it."""
    enter_calls = {"run": 0, "drain": 0}
    phase = ["run"]
    syscall, drain = io_uring._syscall, IoUring._drain

    def counted_syscall():
        real = syscall()

        def enter(number, *args):
            enter_calls[phase[0]] += number == io_uring._SYS_IO_URING_ENTER  # (not the setup)
            return real(number, *args)

        return enter

    def marked_drain(self):
        phase[0] = "drain"
        return drain(self)

    monkeypatch.setattr(io_uring, "_syscall", counted_syscall)
    monkeypatch.setattr(IoUring, "_drain", marked_drain)
    r, w = os.pipe()
    n, main = 8, threading.main_thread().ident
    buf = np.zeros(n, dtype=np.uint8)

    def interrupt_then_write() -> None:
        while enter_calls["run"] == 0:  # the batch is in the kernel (or about to be)
            time.sleep(0.001)
        while phase[0] != "drain":  # until it is interrupted (one sent early interrupts nothing)
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.05)
        while enter_calls["drain"] == 0:
            time.sleep(0.001)
        time.sleep(0.2)  # a drain that spins calls the kernel thousands of times meanwhile
        os.write(w, bytes(range(1, n + 1)))

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    helper = threading.Thread(target=interrupt_then_write)
    default = signal.signal(signal.SIGINT, ctrl_c)  # as Python's, whatever the runner set
    try:
        with IoUring(4) as ring:
            helper.start()
            with pytest.raises(KeyboardInterrupt):
                ring.read_batch(
                    r, np.zeros(n, np.int64), np.ones(n, np.int64), buf.ctypes.data + np.arange(n)
                )
            helper.join()
            assert not ring.closed and sorted(buf[:4].tolist()) == [1, 2, 3, 4]
            assert enter_calls["drain"] <= 5, enter_calls
    finally:
        helper.join()
        signal.signal(signal.SIGINT, default)
        os.close(r)
        os.close(w)


def test_a_ctrl_c_between_queueing_requests_and_publishing_them_is_drained(data, monkeypatch):
    """A Ctrl-C lands between two bytecodes: in the ring's push, it may come after the requests
    were queued (counted) but before the ring's tail told the kernel of them. The drain then
    waited for requests the kernel never saw, asking it to submit them: it submitted fewer than
    asked and so returned without waiting, and the drain spun on a core for good. The drain
    publishes what is queued, so every request queued is read and the ring stays usable."""
    fd, payload = data
    offsets, lengths, buf = _pages(200)
    reap, drain, drain_reaps = IoUring._reap, IoUring._drain, [0]

    def bounded(self, results):  # a drain that spins reaps nothing, for good: fail it instead
        drain_reaps[0] += 1
        if drain_reaps[0] > 1000:
            raise RuntimeError("the drain spins")
        return reap(self, results)

    def marked_drain(self):
        monkeypatch.setattr(IoUring, "_reap", bounded)
        return drain(self)

    with IoUring(64) as ring:
        tail = ring._sq_tail

        class InterruptedOnce:  # the tail's first use: after the requests were counted
            used = 0

            def __iter__(self):
                InterruptedOnce.used += 1
                if InterruptedOnce.used == 1:
                    raise KeyboardInterrupt
                return iter(tail)

        ring._sq_tail = InterruptedOnce()
        monkeypatch.setattr(IoUring, "_drain", marked_drain)
        with pytest.raises(KeyboardInterrupt):
            ring.read_batch(fd, offsets, lengths, buf.ctypes.data + offsets)
        monkeypatch.undo()
        ring._sq_tail = tail
        assert not ring.closed
        assert np.array_equal(buf[: 64 * 4096], payload[: 64 * 4096])  # those queued were read
        buf[:] = 0
        assert np.array_equal(
            ring.read_batch(fd, offsets, lengths, buf.ctypes.data + offsets), lengths
        )
        assert np.array_equal(buf, payload[: buf.size])


def test_an_exit_asked_while_draining_is_raised_once_the_reads_are_in(data):
    """A further interrupt during a drain is waited through, but was then dropped: the
    interruption being drained was raised. Where that one is caught (a signal handler's
    TimeoutError a caller handles), a SIGTERM handler's sys.exit that came meanwhile was lost
    and the process went on. The reads in flight are still waited for; then the further
    interrupt is raised (its context the one drained)."""
    fd, payload = data
    offsets, lengths, buf = _pages(200)
    with IoUring(4) as ring:
        with (
            interrupted_reaps(  # a signal handler's timeout, then a SIGTERM handler's sys.exit
                TimeoutError("the batch took too long"), SystemExit(143)
            ) as calls,
            pytest.raises(SystemExit) as exit_info,
        ):
            ring.read_batch(fd, offsets, lengths, buf.ctypes.data + offsets)
        assert exit_info.value.code == 143
        assert isinstance(exit_info.value.__context__, TimeoutError)
        assert calls[0] > 3 and not ring.closed
        tail0, head0 = ring._batch_start
        submitted = (ring._tail - tail0) & 0xFFFFFFFF
        assert submitted > 0 and (ring._cq_head_value() - head0) & 0xFFFFFFFF == submitted


def test_an_interrupt_as_the_drain_begins_leaves_reads_the_next_batch_waits_for(data):
    """Signals are handled on function entry: a second Ctrl-C pending as the first unwinds
    interrupts the drain before its loop, and escapes with reads in flight; the ring stayed
    open, so the cold tier gave it back to its idle pool. The next batch then reaped the old
    completions as its own (an IndexError for their ids, or a result and an end too early).
    The ring keeps the unfinished batch: the next batch waits for its reads first."""
    fd, payload = data
    offsets, lengths, buf = _pages(200)
    with IoUring(64) as ring:
        with interrupted_reaps(cut_short=True), pytest.raises(KeyboardInterrupt):
            ring.read_batch(fd, offsets, lengths, buf.ctypes.data + offsets)
        tail0, _ = ring._batch_start
        queued = (ring._tail - tail0) & 0xFFFFFFFF
        assert queued > 0 and not ring.closed
        small = np.zeros(8 * 4096, dtype=np.uint8)
        later = offsets[-8:]
        got = ring.read_batch(fd, later, lengths[:8], small.ctypes.data + offsets[:8])
        assert np.array_equal(got, lengths[:8])
        assert np.array_equal(small, payload[later[0] : later[0] + 8 * 4096])
        assert np.array_equal(buf[: queued * 4096], payload[: queued * 4096])  # the old ones in


def test_a_ring_closed_with_reads_in_flight_keeps_their_memory(monkeypatch):
    """A drain the kernel refuses closes the ring with reads that may still land: the memory
    given as ``keep`` stays alive for good (here reads of a pipe, in flight until closed)."""
    syscall, drain = io_uring._syscall, IoUring._drain
    entered, in_flight, stop = [0], [], [False]

    def counted_syscall():
        real = syscall()

        def enter(number, *args):
            entered[0] += 1
            return real(number, *args)

        return enter

    def refusing_syscall():
        def enter(number, *args):
            ctypes.set_errno(errno.ENOMEM)
            return -1

        return enter

    def refused_drain(self):
        in_flight.append(self._in_flight(*self._batch_start))
        monkeypatch.setattr(io_uring, "_syscall", refusing_syscall)
        return drain(self)

    def interrupt() -> None:
        while entered[0] == 0 and not stop[0]:  # the batch is in the kernel (or about to be)
            time.sleep(0.001)
        while (
            not in_flight and not stop[0]
        ):  # until it is interrupted (one sent early interrupts nothing)
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.05)

    r, w = os.pipe()
    n, main = 8, threading.main_thread().ident
    buf = np.zeros(n, dtype=np.uint8)
    kept = weakref.ref(buf)
    helper = threading.Thread(target=interrupt)
    default = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ring = IoUring(4, "table /data/t.npy")
        monkeypatch.setattr(io_uring, "_syscall", counted_syscall)
        monkeypatch.setattr(IoUring, "_drain", refused_drain)
        helper.start()
        with pytest.raises(KeyboardInterrupt) as info:
            addresses = buf.ctypes.data + np.arange(n)
            ring.read_batch(r, np.zeros(n, np.int64), np.ones(n, np.int64), addresses, keep=buf)
        helper.join()
        del info, buf
        assert ring.closed and in_flight == [4]
        del ring
        gc.collect()
        assert kept() is not None
    finally:
        stop[0] = True
        helper.join()
        signal.signal(signal.SIGINT, default)
        os.close(r)
        os.close(w)


def test_a_ring_closed_once_its_unfinished_reads_are_in_keeps_nothing(data):
    """A drain cut short leaves the batch unfinished; a ring closed after its reads completed
    (a table closed after a second Ctrl-C) kept their memory for good all the same, one buffer
    more for each such close. Only reads still in flight keep it."""
    fd, payload = data
    offsets, lengths, buf = _pages(200)
    kept, stranded = weakref.ref(buf), len(io_uring._STRANDED)
    ring = IoUring(64)
    with interrupted_reaps(cut_short=True), pytest.raises(KeyboardInterrupt) as info:
        ring.read_batch(fd, offsets, lengths, buf.ctypes.data + offsets, keep=buf)
    del info
    assert ring._unfinished and not ring.closed
    while ring._in_flight(*ring._batch_start):  # the reads of a regular file complete
        time.sleep(0.001)
    ring.close()
    del buf
    gc.collect()
    assert kept() is None and len(io_uring._STRANDED) == stranded


def test_a_drain_of_reads_that_never_complete_gives_up_and_strands_their_memory(monkeypatch):
    """A Ctrl-C with a read in flight that never completes (a hung device; here, a read of an
    empty pipe) drained without end: every further Ctrl-C, or a SIGTERM handler's exit, was
    waited through too. After ``DRAIN_WAIT_S`` the drain gives up: the ring is closed, the
    memory the read lands in kept for good, a warning names the ring's owner, and the Ctrl-C
    goes on. (The pipe is written to once the test is done, or after 20 s should the drain
    wait still: the read then completes and the old drain returned.)"""
    monkeypatch.setattr(io_uring, "DRAIN_WAIT_S", 0.5)
    stranded = len(io_uring._STRANDED)
    ring = IoUring(4, "table /data/t.npy")
    with _hung_read_interrupted(ring) as (read_end, buf):
        with (
            pytest.raises(KeyboardInterrupt),
            pytest.warns(RuntimeWarning, match=r"io_uring of table /data/t\.npy: 1 reads .*0\.5 s"),
        ):
            ring.read_batch(
                read_end, np.zeros(1), np.full(1, 4096), np.full(1, buf.ctypes.data), buf
            )
        assert ring.closed and any(kept is buf for kept in io_uring._STRANDED[stranded:])


def test_reads_complete_but_not_reaped_at_the_drain_deadline_strand_nothing(data, monkeypatch):
    """At ``DRAIN_WAIT_S`` the drain counted only the completions it had reaped: reads the
    kernel had completed since its last round were taken for reads still in flight, a warning
    said so and the ring was closed for nothing. It reaps before it counts: here every read of
    the interrupted batch has completed before the drain, whose wait is 0 s."""
    fd, payload = data
    monkeypatch.setattr(io_uring, "DRAIN_WAIT_S", 0.0)
    reap, calls = IoUring._reap, [0]

    def interrupted(self, results):
        calls[0] += 1
        if calls[0] == 2:  # in the batch, once every read the kernel took has completed
            while self._in_flight(*self._batch_start):
                time.sleep(0.001)  # (a system call: the kernel posts completions on its return)
            raise KeyboardInterrupt
        return reap(self, results)

    offsets, lengths, buf = _pages(200)
    with IoUring(4) as ring:
        monkeypatch.setattr(IoUring, "_reap", interrupted)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(KeyboardInterrupt):
                ring.read_batch(fd, offsets, lengths, buf.ctypes.data + offsets)
        monkeypatch.setattr(IoUring, "_reap", reap)
        assert [str(w.message) for w in caught] == [] and not ring.closed
        buf[:] = 0
        assert np.array_equal(
            ring.read_batch(fd, offsets, lengths, buf.ctypes.data + offsets), lengths
        )
        assert np.array_equal(buf, payload[: buf.size])


def test_with_warnings_as_errors_the_strand_warning_is_raised_not_swallowed(monkeypatch):
    """Under ``-W error`` the drain's warning that it gave up on reads (a ``RuntimeWarning``
    made an error) was caught by the drain's ``except Exception`` for the kernel's refusals:
    nothing was said of the memory kept for good. The interrupt goes on with that error as its
    context; a batch whose drain (at its start) gives up raises it."""
    monkeypatch.setattr(io_uring, "DRAIN_WAIT_S", 0.3)
    ring = IoUring(4, "table /data/t.npy")
    with _hung_read_interrupted(ring) as (read_end, buf):
        with warnings.catch_warnings(), pytest.raises(KeyboardInterrupt) as info:
            warnings.simplefilter("error", RuntimeWarning)
            ring.read_batch(
                read_end, np.zeros(1), np.full(1, 4096), np.full(1, buf.ctypes.data), buf
            )
        context = info.value.__context__
        assert isinstance(context, RuntimeWarning), repr(context)
        assert re.search(r"io_uring of table /data/t\.npy: 1 reads .*0\.3 s", str(context))
        assert ring.closed
    read_end, write_end = os.pipe()
    other = IoUring(4, "table /data/t.npy")  # a read queued by a batch whose drain was cut short
    try:
        other._batch_start = (other._tail, other._cq_head_value())
        other._unfinished[:] = [buf]
        read = (io_uring._IORING_OP_READ, 0, 0, read_end, 0, buf.ctypes.data, 4096, 0, 0)
        other._push(np.array([read], dtype=io_uring.SQE_DTYPE))
        with warnings.catch_warnings(), pytest.raises(RuntimeWarning, match=r"1 reads .*0\.3 s"):
            warnings.simplefilter("error", RuntimeWarning)
            other.read_batch(read_end, np.zeros(0), np.zeros(0), np.zeros(0))
        assert other.closed
    finally:
        os.write(write_end, b"x" * 4096)
        other.close()
        os.close(read_end)
        os.close(write_end)
