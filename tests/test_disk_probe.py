"""disk_probe: the raw-disk random-read baselines the cold-tier benchmarks compare against."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from tiered_store import disk_probe, io_uring
from tiered_store.disk_probe import RandomReadRate, probe_random_reads, probe_uring_reads
from tiered_store.errors import ConfigError, TierIOError


@pytest.fixture
def data_file(tmp_path):
    """A 256 KiB file (64 pages); skips where the file system refuses O_DIRECT."""
    path = tmp_path / "probe.bin"
    path.write_bytes(os.urandom(64 * 4096))
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("the test file system refuses O_DIRECT")
    return path


@pytest.mark.parametrize("threads", [1, 3])
def test_counts_every_read(data_file, threads):
    rate = probe_random_reads(data_file, reads=200, threads=threads, seed=1)
    assert (rate.reads, rate.threads, rate.block_bytes) == (200, threads, 4096)
    assert rate.seconds > 0
    assert rate.bytes_per_second == rate.reads_per_second * 4096 > 0


def test_range_and_larger_blocks(data_file):
    rate = probe_random_reads(data_file, reads=10, block_bytes=8192, start=4096, stop=5 * 8192)
    assert rate.reads == 10 and rate.block_bytes == 8192


def test_zero_seconds_means_zero_rate():
    assert RandomReadRate(reads=5, seconds=0.0, threads=1, block_bytes=4096).reads_per_second == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reads": 0}, r"reads: got 0; expected an integer >= 1"),
        ({"threads": True}, r"threads: got True; expected an integer from 1 to 4096"),
        ({"threads": 100_000}, r"threads: got 100000; expected an integer from 1 to 4096"),
        ({"block_bytes": 1000}, r"block_bytes: got 1000; expected a positive multiple of 4096"),
        ({"start": 4096, "stop": 8191}, r"hold no whole 4096-byte block"),
        ({"start": -1}, r"bytes \[-1, "),
        ({"start": 1.5}, r"start: got 1.5; expected a byte offset \(an integer\)"),
        ({"stop": True}, r"stop: got True; expected a byte offset \(an integer\)"),
        ({"seed": -1}, r"seed: got -1; expected an integer >= 0"),
        ({"seed": "x"}, r"seed: got 'x'; expected an integer >= 0"),
    ],
)
def test_bad_arguments_name_the_value(data_file, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        probe_random_reads(data_file, **kwargs)


@pytest.mark.parametrize("probe", [probe_random_reads, probe_uring_reads])
def test_numpy_integers_are_integers(data_file, probe):
    """start, stop and seed from NumPy arithmetic or a NumPy rng: taken as before 8cd2e87, which
    refused them as 'expected a byte offset (an integer)'; so are reads, threads, block_bytes
    and queue_depth (refused as 'expected an integer' before), held as ints in the result."""
    kwargs = {"start": np.int64(4096), "stop": np.uint32(5 * 4096), "seed": np.int64(7)}
    assert probe(data_file, reads=20, **kwargs).reads == 20
    with pytest.raises(ConfigError, match=r"start: got None; expected a byte offset"):
        probe(data_file, start=None)
    counts = {"reads": np.int64(20), "block_bytes": np.uint32(8192)}
    counts |= (
        {"threads": np.int32(2)} if probe is probe_random_reads else {"queue_depth": np.int8(4)}
    )
    rate = probe(data_file, **counts)
    held = [getattr(rate, name) for name in counts]
    assert held == list(counts.values()) and {type(value) for value in held} == {int}
    with pytest.raises(ConfigError, match=r"reads: got np.False_; expected an integer >= 1"):
        probe(data_file, reads=np.False_)
    with pytest.raises(ConfigError, match=r"seed: got np.True_; expected an integer >= 0"):
        probe(data_file, seed=np.True_)


@pytest.mark.parametrize("probe", [probe_random_reads, probe_uring_reads])
def test_a_block_larger_than_one_read_is_refused(tmp_path, probe):
    """Linux transfers at most 2 GiB - 4 KiB per read: a 2 GiB block would be read short."""
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(2 * disk_probe.MAX_BLOCK_BYTES)  # sparse: no disk space used
    with pytest.raises(ConfigError, match=r"block_bytes: got 2147483648; .* at most 2,147,479,552"):
        probe(path, reads=1, block_bytes=2**31)
    assert probe(path, reads=1, block_bytes=16 * 4096).reads == 1


def test_a_file_truncated_while_probed_fails(data_file):
    """Reads past the new end come back empty: an error, not reads counted as done."""

    def truncate_once_reading() -> None:  # its threads start once the file's size is read
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up and not any(
            thread.name.startswith("disk-probe-") for thread in threading.enumerate()
        ):
            time.sleep(0.001)
        os.truncate(data_file, 0)

    truncate = threading.Thread(target=truncate_once_reading)
    truncate.start()
    try:
        with pytest.raises(TierIOError, match=r"short read at offset \d+: got 0 of 4096 bytes"):
            probe_random_reads(data_file, reads=1_000_000, threads=1)
    finally:
        truncate.join()


def _probe_with_256_mib_to_spare(tmp_path, call: str) -> str:
    """What ``call`` (a probe of ``path``, a sparse 1 GiB file) raises as a TierIOError, run in
    a fresh interpreter whose address space is limited to 256 MiB above what it maps at start."""
    code = textwrap.dedent(
        f"""
        import resource
        from tiered_store.disk_probe import probe_random_reads, probe_uring_reads
        from tiered_store.errors import TierIOError
        path = {str(tmp_path / "sparse.bin")!r}
        with open(path, "wb") as f:
            f.truncate(1 << 30)
        status = open("/proc/self/status").read()
        vm = int(status.split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), vm + (256 << 20)))
        try:
            {call}
        except TierIOError as exc:
            print(exc)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_thread_without_a_buffer_fails_instead_of_hanging(tmp_path):
    """Under an address-space limit no thread can map its 512 MiB buffer: an error naming it,
    not a probe waiting forever for threads that never reach the starting line."""
    out = _probe_with_256_mib_to_spare(
        tmp_path, "probe_random_reads(path, reads=4, threads=2, block_bytes=512 << 20)"
    )
    assert "sparse.bin failed (no 536,870,912-byte buffer: Cannot allocate memory)" in out


def test_a_uring_buffer_that_cannot_be_had_is_named(tmp_path):
    """Under an address-space limit the uring probe's 576 MiB buffer cannot be had: a TierIOError
    naming it (numpy's bare MemoryError before), as probe_random_reads names its threads'."""
    out = _probe_with_256_mib_to_spare(
        tmp_path, "probe_uring_reads(path, reads=4, queue_depth=4, block_bytes=64 << 20)"
    )
    assert (
        "sparse.bin: no 603,979,776-byte buffer (2 x queue_depth 4 blocks of 67,108,864 bytes"
        in out
    ), out


def test_threads_the_system_cannot_start_are_a_config_error(data_file):
    """Under an address-space limit only a few 256 MiB thread stacks fit: a ConfigError naming
    threads (a bare RuntimeError "can't start new thread" before), and the threads that did
    start all end."""
    code = textwrap.dedent(
        f"""
        import resource, threading
        from tiered_store.disk_probe import probe_random_reads
        from tiered_store.errors import ConfigError
        path = {str(data_file)!r}
        probe_random_reads(path, reads=64, threads=2)  # everything loaded
        threading.stack_size(256 << 20)
        status = open("/proc/self/status").read()
        vm = int(status.split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
        try:
            probe_random_reads(path, reads=64, threads=64)
        except ConfigError as exc:
            print(exc)
        for thread in threading.enumerate():
            if thread.name.startswith("disk-probe-"):
                thread.join(30)
        print("alive:", sum(t.name.startswith("disk-probe-") for t in threading.enumerate()))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.match(
        r"threads: got 64, but the system started only \d+ \(can't start new thread\); expected "
        r"fewer threads\nalive: 0\n$",
        done.stdout,
    ), done.stdout


def test_ctrl_c_stops_every_reading_thread(data_file):
    """Ctrl-C while the threads read: before, they read on through the file's descriptor number,
    which the next open took (the caller's file), and kept the interpreter from exiting."""
    code = textwrap.dedent(
        f"""
        import os, signal, threading, time
        from tiered_store.disk_probe import probe_random_reads
        path = {str(data_file)!r}

        def interrupt():
            while not any(t.name.startswith("disk-probe-") for t in threading.enumerate()):
                time.sleep(0.001)
            time.sleep(0.05)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

        def bytes_read():
            return int(open("/proc/self/io").read().split("rchar:")[1].split()[0])

        threading.Thread(target=interrupt, daemon=True).start()
        try:
            probe_random_reads(path, reads=2_000_000, threads=3)
        except KeyboardInterrupt:
            fd = os.open(path, os.O_RDONLY)  # takes the number the probe's descriptor had
            before = bytes_read()
            time.sleep(0.3)
            print("interrupted; bytes read since:", bytes_read() - before)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "interrupted; bytes read since: " in done.stdout
    assert int(done.stdout.split("since: ")[1]) < 4096, done.stdout


def test_missing_file_is_a_tier_io_error(tmp_path):
    with pytest.raises(TierIOError, match=r"cannot open .*nothing.bin for O_DIRECT reads"):
        probe_random_reads(tmp_path / "nothing.bin")


@pytest.mark.parametrize("probe", [probe_random_reads, probe_uring_reads])
def test_a_folder_is_named_as_one(tmp_path, probe):
    """A folder, not a file system refusing O_DIRECT (Linux answers EINVAL for both)."""
    with pytest.raises(TierIOError, match=r"cannot probe .*: it is a folder; expected a file") as e:
        probe(tmp_path, reads=10)
    assert "refuses O_DIRECT" not in str(e.value)


@pytest.mark.parametrize("probe", [probe_random_reads, probe_uring_reads])
def test_a_fifo_or_a_device_is_named_as_one(tmp_path, probe):
    """A FIFO's open waited forever for a writer, and a character device was said to be on a file
    system refusing O_DIRECT (Linux answers EINVAL)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def unblock() -> None:  # a writer ends a probe stuck in the FIFO's open (then it fails)
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    watchdog = threading.Timer(10, unblock)
    watchdog.start()
    try:
        with pytest.raises(TierIOError, match=r"cannot probe .*pipe: it is a FIFO \(named pipe\)"):
            probe(fifo, reads=10)
    finally:
        watchdog.cancel()
    with pytest.raises(
        TierIOError, match=r"cannot probe /dev/zero: it is a character device;"
    ) as e:
        probe("/dev/zero", reads=10)
    assert "refuses O_DIRECT" not in str(e.value)


def test_o_direct_refusal_says_so(data_file, monkeypatch):
    def no_direct(path, flags, *args):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(disk_probe.os, "open", no_direct)
    with pytest.raises(TierIOError, match=r"probe.bin.*refuses O_DIRECT"):
        probe_random_reads(data_file)


@pytest.mark.parametrize("depth", [1, 16])
def test_uring_probe_counts_every_read(data_file, depth):
    rate = probe_uring_reads(data_file, reads=300, queue_depth=depth, seed=2)
    assert (rate.reads, rate.threads, rate.queue_depth, rate.block_bytes) == (300, 1, depth, 4096)
    assert rate.reads_per_second > 0


def test_uring_probe_bad_arguments(data_file):
    with pytest.raises(ConfigError, match=r"queue_depth: got 0; expected an integer from 1 to"):
        probe_uring_reads(data_file, queue_depth=0)
    with pytest.raises(ConfigError, match=r"reads: got -3; expected an integer >= 1"):
        probe_uring_reads(data_file, reads=-3)
    with pytest.raises(ConfigError, match=r"hold no whole 8192-byte block"):
        probe_uring_reads(data_file, block_bytes=8192, start=4096, stop=12288)


def test_uring_probe_read_failure_names_the_file(data_file, monkeypatch):
    monkeypatch.setattr(
        disk_probe.IoUring,
        "read_batch",
        lambda ring, fd, o, n, a, keep=None: np.full(len(o), -errno.EIO),
    )
    with pytest.raises(TierIOError, match=r"O_DIRECT read of .*probe.bin at offset \d+ failed"):
        probe_uring_reads(data_file, reads=10)


def test_a_uring_probe_gives_its_buffer_as_the_reads_keep(data_file, monkeypatch):
    """A second Ctrl-C as the drain of an interrupted probe begins leaves reads in flight; the
    probe's ``with`` then closes the ring, and the buffer they land in was freed with the probe's
    frame. The probe passes the buffer every read lands in as ``keep`` (which a ring closed with
    reads in flight keeps for good)."""
    if io_uring.uring_unavailable_reason() is not None:
        pytest.skip("io_uring is unavailable")
    read_batch, seen = io_uring.IoUring.read_batch, []

    def noted(self, fd, offsets, lengths, addresses, keep=None):  # the real read, noted
        seen.append((keep, int(np.min(addresses)), int(np.max(addresses + lengths))))
        return read_batch(self, fd, offsets, lengths, addresses, keep=keep)

    monkeypatch.setattr(io_uring.IoUring, "read_batch", noted)
    probe_uring_reads(data_file, reads=300, queue_depth=4)
    [(keep, low, high)] = seen
    assert isinstance(keep, np.ndarray)
    assert keep.ctypes.data <= low and high <= keep.ctypes.data + keep.nbytes
