"""disk_probe: the raw-disk random-read baseline the cold-tier benchmarks compare against."""

from __future__ import annotations

import errno
import os

import pytest

from tiered_store import disk_probe
from tiered_store.disk_probe import RandomReadRate, probe_random_reads
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
        ({"threads": True}, r"threads: got True; expected an integer >= 1"),
        ({"block_bytes": 1000}, r"block_bytes: got 1000; expected a positive multiple of 4096"),
        ({"start": 4096, "stop": 8191}, r"hold no whole 4096-byte block"),
        ({"start": -1}, r"bytes \[-1, "),
    ],
)
def test_bad_arguments_name_the_value(data_file, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        probe_random_reads(data_file, **kwargs)


def test_missing_file_is_a_tier_io_error(tmp_path):
    with pytest.raises(TierIOError, match=r"cannot open .*nothing.bin for O_DIRECT reads"):
        probe_random_reads(tmp_path / "nothing.bin")


def test_o_direct_refusal_says_so(data_file, monkeypatch):
    def no_direct(path, flags, *args):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(disk_probe.os, "open", no_direct)
    with pytest.raises(TierIOError, match=r"probe.bin.*refuses O_DIRECT"):
        probe_random_reads(data_file)
