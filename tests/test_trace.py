"""Trace files: round trips, layout checks, atomic writes, corruption and truncation, .npy."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from tiered_store.errors import ConfigError, RowIdError, TierIOError, TraceFormatError
from tiered_store.trace import (
    TraceReader,
    TraceWriter,
    trace_from_npy,
    trace_to_npy,
)
from tiered_store.trace_recovery import recover_trace

LAYOUT = {
    "tables": [
        {"name": "layer2", "rows": 1000, "heads": 2, "primes": [499, 491], "offsets": [0, 499]},
        {"name": "layer15", "rows": 1000, "heads": 2, "primes": [487, 479], "offsets": [0, 487]},
    ],
    "config": {"max_ngram": 3, "heads": 2},
    "tokenizer": {"name": "deepseek-v3", "vocab": 129280},
}


def _write_sample(path, *, chunk_ids=64, batches=6, seed=0):
    """A two-table trace with [batch, seq, heads] records; returns what was written."""
    rng = np.random.default_rng(seed)
    written = []
    with TraceWriter(path, LAYOUT, chunk_ids=chunk_ids) as w:
        for b in range(batches):
            for table in ("layer2", "layer15"):
                ids = rng.integers(0, 1000, size=(2, 5 + b, 2))
                w.write(ids, table)
                written.append((b, table, ids))
            w.end_batch()
    return written


def test_round_trip_tables_batches_and_shapes(tmp_path):
    path = tmp_path / "t.trace"
    written = _write_sample(path)
    with TraceReader(path) as r:
        assert r.tables == ["layer2", "layer15"]
        assert r.header["config"] == LAYOUT["config"]
        assert r.header["tokenizer"]["name"] == "deepseek-v3"
        assert r.header["magic"] == "engram-trace" and r.format_version == 1
        assert r.layout[0]["primes"] == [499, 491]
        assert r.n_batches == 6 and r.n_records == 12
        assert r.n_lookups == sum(ids.size for _, _, ids in written)
        assert r.n_chunks > 1
        got = list(r.batches())
        assert [(g.batch, g.table) for g in got] == [(b, t) for b, t, _ in written]
        for g, (_, _, ids) in zip(got, written, strict=True):
            assert g.ids.dtype == np.int64 and g.ids.shape == ids.shape
            np.testing.assert_array_equal(g.ids, ids)
        for table in r.tables:
            expect = np.concatenate([ids.ravel() for _, t, ids in written if t == table])
            parts = list(r.ids(table))
            assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
            np.testing.assert_array_equal(np.concatenate(parts), expect)
            assert r.lookups(table) == expect.size
            assert [b.batch for b in r.batches(table)] == list(range(6))
        everything = np.concatenate([ids.ravel() for _, _, ids in written])
        np.testing.assert_array_equal(r.read_all(), everything)
        np.testing.assert_array_equal(r.read_all(1), r.read_all("layer15"))
        r.verify()


def test_large_record_gets_its_own_chunk_and_wide_ids(tmp_path):
    path = tmp_path / "big.trace"
    big = np.arange(1000, dtype=np.int64) + (1 << 40)  # needs 8-byte ids
    with TraceWriter(path, chunk_ids=100) as w:
        w.write(np.array([1, 2, 3]), "a")
        w.write(big, "b")
        w.write(np.array([4]), "a", batch=3)
    with TraceReader(path) as r:
        assert r.tables == ["a", "b"]  # registered as first written
        assert r.n_chunks == 3 and r.n_batches == 4
        assert [c[1] for c in r.chunk_index] == [3, 1000, 1]
        np.testing.assert_array_equal(r.read_all("b"), big)
        assert [b.batch for b in r.batches()] == [0, 0, 3]


def test_a_chunk_ended_early_keeps_records_whole_and_batches_in_order(tmp_path):
    """end_chunk (serve's bound in time) writes what is buffered as a chunk through the one chunk
    path: records whole, batches in order, and a writer killed then loses none of it."""
    path = tmp_path / "early.trace"
    w = TraceWriter(path, {"tables": ["a", "b"]}, chunk_ids=100)
    w.end_chunk()  # nothing buffered: no chunk
    w.write(np.array([[1, 2], [3, 4]]), "a")
    w.write(np.array([5]), "b")
    w.end_chunk()
    w.end_chunk()  # again: nothing new, no empty chunk
    w.write(np.array([6, 7]), "a", batch=2)
    w.end_chunk()
    w.write(np.array([8]), "b")  # buffered, never ended: the one record a kill loses
    left = tmp_path / ".kept.trace.0123456789ab.tmp"  # its bytes now, as a kill would leave them
    left.write_bytes(next(tmp_path.glob(".early.trace.*.tmp")).read_bytes())
    got = recover_trace(left)
    w.close()
    assert got.chunks == 2 and got.lookups == 7
    with TraceReader(tmp_path / "kept.trace") as r:
        r.verify()
        assert [(b.batch, b.table, b.ids.tolist()) for b in r.batches()] == [
            (0, "a", [[1, 2], [3, 4]]),
            (0, "b", [5]),
            (2, "a", [6, 7]),
        ]
    with TraceReader(path) as r:
        r.verify()
        assert r.n_chunks == 3 and [c[1] for c in r.chunk_index] == [5, 2, 1]
        assert [(c[3], c[4]) for c in r.chunk_index] == [(0, 0), (2, 2), (2, 2)]
    with pytest.raises(TraceFormatError, match="end_chunk after close"):
        w.end_chunk()


def test_layout_is_enforced(tmp_path):
    with TraceWriter(tmp_path / "x.trace", LAYOUT) as w:
        with pytest.raises(TraceFormatError, match="not in the header's tables"):
            w.write(np.array([1]), "layer99")
        with pytest.raises(TraceFormatError, match="out of range"):
            w.write(np.array([1]), 2)
        with pytest.raises(RowIdError, match=r"layer2.*\[0, 1000\)"):
            w.write(np.array([5, 1000]), "layer2")
        with pytest.raises(RowIdError):
            w.write(np.array([-1]), "layer2")
        with pytest.raises(RowIdError, match="integers"):
            w.write(np.array([1.5]), "layer2")
        w.write(np.array([1]), 1, batch=4)
        with pytest.raises(TraceFormatError, match="only go forward"):
            w.write(np.array([1]), 1, batch=2)
    with pytest.raises(TraceFormatError, match="reserved"):
        TraceWriter(tmp_path / "y.trace", {"magic": "x"})
    with pytest.raises(TraceFormatError, match="duplicate"):
        TraceWriter(tmp_path / "z.trace", {"tables": ["a", "a"]})


def test_write_is_atomic(tmp_path):
    path = tmp_path / "t.trace"
    w = TraceWriter(path, chunk_ids=4)
    w.write(np.arange(10), 0)
    assert not path.exists()  # nothing under the final name until close
    w.close()
    assert path.exists()
    with pytest.raises(RuntimeError), TraceWriter(tmp_path / "failed.trace") as w2:
        w2.write(np.arange(10), 0)
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.trace"]  # no temp left behind


def kill_a_recording(folder, *, pause=False):
    """The leftover of a TraceWriter in a real process SIGKILLed mid-recording: table 'a' (1,000
    rows), batch b one record of ``recorded_batches``' ids, chunks of at most 100 ids (3 batches);
    killed once it has written batch 2,000 (``pause``: waiting there, chunks through batch 1,997
    finished, not writing on until the signal lands)."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import numpy as np\n"
        "from tiered_store.trace import TraceWriter\n"
        f"w = TraceWriter({str(folder / 't.trace')!r}, {{'tables': [{{'name': 'a', 'rows': 1000}}]}}, "
        "chunk_ids=100)\n"
        "for b in range(10**9):\n"
        "    w.write((np.arange(30) + b) % 1000, 'a'); w.end_batch()\n"
        "    if b == 2000: print('ready', flush=True)\n"  # chunks past its write buffer
        + ("    if b == 2000: import time; time.sleep(600)\n" if pause else "")
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env) as proc:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    [left] = list(folder.iterdir())
    return left


def recorded_batches(n):
    """The ids :func:`kill_a_recording`'s writer wrote in its first ``n`` batches, flat."""
    return ((np.arange(30)[None, :] + np.arange(n)[:, None]) % 1000).ravel()


def test_a_trace_whose_writer_was_killed_names_what_it_left_and_where_that_stops(tmp_path):
    """A recording killed (SIGKILL) before it closed leaves no trace under its name, only its
    partial temporary beside it: opening the trace said "No such file or directory", not that a
    partial one is there, nor where it stops, nor how to recover it."""
    left = kill_a_recording(tmp_path)
    with pytest.raises(TraceFormatError) as err:
        TraceReader(tmp_path / "t.trace")
    assert re.search(
        rf"t\.trace: cannot open \(No such file or directory\); a writer killed before it "
        rf"closed the trace left {re.escape(left.name)} \([\d,]+ bytes, chunk \d+: truncated",
        str(err.value),
    ), err.value
    assert f"`tiered-store recover-trace {left}` makes a trace of its whole chunks" in str(
        err.value
    )


def test_a_killed_recording_is_recovered_up_to_its_last_whole_chunk(tmp_path):
    """Its chunks could not be used: hours of recorded traffic lost with the footer."""
    left = kill_a_recording(tmp_path)
    got = recover_trace(left)
    assert got.trace == tmp_path / "t.trace" and left.exists()  # the leftover is kept
    with TraceReader(got.trace) as r:
        r.verify()
        assert (r.tables, r.n_chunks, r.n_batches) == (["a"], got.chunks, got.batches)
        assert r.n_lookups == got.lookups == 30 * got.batches
        assert np.array_equal(r.read_all(), recorded_batches(got.batches))
        assert [b.batch for b in r.batches()] == list(range(got.batches))
    assert got.chunks > 0 and got.stopped and got.kept_bytes <= got.size  # no footer: stopped
    assert np.array_equal(
        trace_to_npy(got.trace, tmp_path / "a.npy"), recorded_batches(got.batches)
    )


def test_a_killed_writer_loses_only_the_chunk_it_was_filling(tmp_path):
    """Finished chunks waited in the file object's buffer (8 KiB of small chunks) for later ones:
    a writer killed then lost them too, not only the chunk it was filling."""
    got = recover_trace(kill_a_recording(tmp_path, pause=True))
    assert (got.chunks, got.batches, got.lost_lookups) == (666, 1998, 0), got
    assert got.kept_bytes == got.size  # no chunk cut off: nothing past the finished ones
    with TraceReader(got.trace) as r:
        assert np.array_equal(r.read_all(), recorded_batches(1998))


def _leftover(tmp_path, **sample):
    """A two-table trace's bytes without its footer (as a killed writer leaves them), its chunk
    offsets, and what was written."""
    whole = tmp_path / "whole.trace"
    written = _write_sample(whole, **sample)
    with TraceReader(whole) as r:
        offsets, end = [c[0] for c in r.chunk_index], r._data_end
    left = tmp_path / ".t.trace.0123456789ab.tmp"
    left.write_bytes(whole.read_bytes()[:end])
    whole.unlink()
    return left, offsets + [end], written


def _kept(written, trace):
    """``written``'s records that the trace holds (its first ones), checked equal."""
    with TraceReader(trace) as r:
        r.verify()
        got = [(b.batch, b.table, b.ids) for b in r.batches()]
    assert 0 < len(got) < len(written)
    for (batch, table, ids), want in zip(got, written, strict=False):
        assert (batch, table) == want[:2] and np.array_equal(ids, want[2])
    return got


@pytest.mark.parametrize(
    ("damage", "kept", "reason"),
    [
        ("torn in chunk 3's payload", 3, "truncated payload"),
        ("a byte flipped in chunk 2's payload", 2, "payload checksum mismatch (corrupt chunk)"),
        ("a byte flipped in chunk 2's header", 2, "chunk header checksum mismatch"),
        ("torn in chunk 3's header", 3, "chunk 3 missing or cut off at byte"),
    ],
)
def test_a_leftover_keeps_its_chunks_up_to_the_first_torn_or_corrupt_one(
    tmp_path, damage, kept, reason
):
    left, offsets, written = _leftover(tmp_path)
    data = bytearray(left.read_bytes())
    at = offsets[kept]
    if damage.startswith("torn"):
        data = data[: at + (60 if "payload" in damage else 20)]
    else:
        data[at + (70 if "payload" in damage else 9)] ^= 0x01
    left.write_bytes(bytes(data))
    got = recover_trace(left, overwrite=False)
    assert (got.chunks, got.kept_bytes, got.size) == (kept, at, len(data))
    assert reason in got.stopped, got.stopped
    records = _kept(written, got.trace)
    assert got.records == len(records) and got.lookups == sum(ids.size for *_, ids in records)
    assert got.batches == records[-1][0] + 1
    if "flipped" in damage and "payload" in damage:  # the headers past it are read: what is lost
        assert got.lost_chunks == len(offsets) - 1 - kept
        assert got.lookups + got.lost_lookups == sum(ids.size for *_, ids in written)
        assert got.lost_to_batch == written[-1][0]
    elif "payload" in damage:  # the torn chunk's header counts its ids
        assert got.lost_chunks == 1 and got.lost_lookups > 0
    else:
        assert (got.lost_chunks, got.lost_lookups, got.lost_to_batch) == (0, 0, None)


def test_a_leftover_whose_whole_chunks_are_out_of_order_keeps_those_before_and_says_why(
    tmp_path,
):
    """Chunks 2 and 3 swapped, each whole and checksummed: recovery stopped at chunk 2 saying
    only "chunk header says index 3", not which index it expected there; and counted nothing of
    the whole chunks past it as lost (`recover-trace` said "no readable chunk header")."""
    left, offsets, written = _leftover(tmp_path)
    data = left.read_bytes()
    chunks = [data[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]
    chunks[2], chunks[3] = chunks[3], chunks[2]
    left.write_bytes(data[: offsets[0]] + b"".join(chunks))
    got = recover_trace(left)
    assert (got.chunks, got.kept_bytes) == (2, offsets[2])
    assert (
        got.stopped == "chunk header says index 3; expected 2 (chunks out of order, or one missing)"
    )
    assert len(_kept(written, got.trace)) == got.records
    # the chunks from there on are whole: counted as lost, not "no readable chunk header"
    assert got.lost_chunks == len(offsets) - 1 - 2
    assert got.lookups + got.lost_lookups == sum(ids.size for *_, ids in written)
    assert got.lost_to_batch == written[-1][0]


@pytest.mark.parametrize("torn", [False, True])
def test_the_batches_lost_past_an_out_of_order_chunk_are_counted_up_to_the_last(tmp_path, torn):
    """Chunk 3 and the last swapped: the lost batches went "up to" the last chunk's in the file
    (chunk 3's), not the last written; and with the chunk after the stop torn, the stopped chunk,
    whole, was not decoded: no batch was named."""
    left, offsets, written = _leftover(tmp_path)
    data = left.read_bytes()
    chunks = [data[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]
    stop = len(chunks) - 2 if torn else 3
    chunks[stop], chunks[-1] = chunks[-1], chunks[stop]
    left.write_bytes(data[: offsets[0]] + b"".join(chunks)[: -10 if torn else None])
    got = recover_trace(left)
    assert got.chunks == stop and "expected" in got.stopped
    assert got.lost_chunks == len(chunks) - stop
    assert got.lost_to_batch == written[-1][0]


def test_what_is_lost_past_an_out_of_order_chunk_is_counted_wherever_the_leftover_ends(
    tmp_path,
):
    """Chunks 3 and 5 swapped, the leftover cut at each edge of every chunk's header and
    payload from there on: the chunks lost are those whose header is whole, their ids the
    headers' counts, the batches up to the highest of those whole."""
    from tiered_store.trace import _CHUNK_HEAD_SIZE

    _write_sample(tmp_path / "ref.trace")
    with TraceReader(tmp_path / "ref.trace") as r:
        index = r.chunk_index  # [offset, ids, records, first batch, last batch] per chunk
    left, offsets, _ = _leftover(tmp_path)
    data = left.read_bytes()
    chunks = [data[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]
    order = [0, 1, 2, 5, 4, 3, *range(6, len(chunks))]
    whole = data[: offsets[0]] + b"".join(chunks[i] for i in order)
    starts = np.cumsum([offsets[0]] + [len(chunks[i]) for i in order]).tolist()
    for k in (3, 4, 5, len(order) - 1):  # the stop, past it, the one moved, the last
        for cut in {
            starts[k] + _CHUNK_HEAD_SIZE - 1,
            starts[k] + _CHUNK_HEAD_SIZE,
            starts[k + 1] - 1,
            starts[k + 1],
        }:
            left.write_bytes(whole[:cut])
            got = recover_trace(left, tmp_path / "t.trace", overwrite=True)
            headed = [order[j] for j in range(3, len(order)) if starts[j] + _CHUNK_HEAD_SIZE <= cut]
            done = [order[j] for j in range(3, len(order)) if starts[j + 1] <= cut]
            assert (got.chunks, got.kept_bytes) == (3, starts[3]), cut
            assert (got.lost_chunks, got.lost_lookups) == (
                len(headed),
                sum(index[i][1] for i in headed),
            ), cut
            assert got.lost_to_batch == max((index[i][4] for i in done), default=None), cut


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        ("inside chunk 0", "no whole chunk to recover (chunk 0, at byte"),
        ("the file empty", "truncated: 0 bytes is shorter than the preamble"),
        ("inside the header", "truncated inside the header"),
    ],
)
def test_a_leftover_without_a_whole_chunk_is_refused_and_nothing_written(tmp_path, cut, message):
    left, offsets, _ = _leftover(tmp_path)
    size = {"inside chunk 0": offsets[0] + 60, "the file empty": 0, "inside the header": 30}[cut]
    left.write_bytes(left.read_bytes()[:size])
    with pytest.raises(TraceFormatError, match=re.escape(message)) as err:
        recover_trace(left)
    assert str(left) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [left.name]


def test_a_whole_leftover_keeps_everything(tmp_path):
    """A writer killed between writing its footer and the rename left a whole trace."""
    whole = tmp_path / "whole.trace"
    written = _write_sample(whole)
    left = tmp_path / ".t.trace.0123456789ab.tmp"
    whole.rename(left)
    got = recover_trace(left)
    assert (got.stopped, got.lost_chunks, got.kept_bytes < got.size) == ("", 0, True)
    with TraceReader(got.trace) as r:
        assert len(list(r.batches())) == len(written) == got.records


def test_a_leftover_without_a_table_layout_names_its_tables_by_index(tmp_path):
    """Tables registered as first written are named only in the footer the writer never wrote."""
    path = tmp_path / "t.trace"
    with TraceWriter(path, chunk_ids=10) as w:
        for b in range(8):
            w.write(np.arange(6) + b, "x")
            w.write(np.arange(4) + b, "y")
            w.end_batch()
    with TraceReader(path) as r:
        end, last = r._data_end, r.chunk_index[-1][0]
    (tmp_path / "t.partial").write_bytes(path.read_bytes()[: last + 50])
    got = recover_trace(tmp_path / "t.partial", tmp_path / "r.trace")
    with TraceReader(got.trace) as r:
        assert r.tables == ["0", "1"] and r.lookups("0") + r.lookups("1") == r.n_lookups
        assert r.lookups("1") > 0 and np.array_equal(r.read_all("1")[:4], np.arange(4))
    assert got.kept_bytes == last < end


def test_a_fifo_named_as_a_trace_or_a_leftover_is_refused_without_blocking(tmp_path):
    """Opening a FIFO waits for a writer: `recover-trace` (and replay) of a pipe named like a
    killed writer's leftover hung forever, where a warm-restart file of that kind is refused."""
    import threading

    fifo = tmp_path / ".t.trace.0123456789ab.tmp"
    os.mkfifo(fifo)
    errors = []

    def recover_and_read():
        for call in (lambda: recover_trace(fifo), lambda: TraceReader(fifo)):
            with pytest.raises(TraceFormatError) as err:
                call()
            errors.append(str(err.value))

    thread = threading.Thread(target=recover_and_read, daemon=True)  # a hang fails, not stalls
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "opening the FIFO blocked"
    assert (
        errors
        == [f"trace {fifo}: cannot open (it is a FIFO (named pipe)); expected a trace file"] * 2
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [fifo.name]  # nothing written


_LEASE_HOLDER = r"""
import fcntl, os, signal, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
signal.signal(signal.SIGIO, lambda *_: fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK))
try:
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
except OSError as exc:
    print("no lease:", exc, flush=True)
    sys.exit()
print("held", flush=True)
time.sleep(120)
"""


def test_a_trace_under_a_lease_is_read_once_its_holder_lets_go(tmp_path):
    """A file server (Samba's oplocks) holds a lease on a file a client has open: an open waits
    for the holder to let go, but the readers' non-blocking open (which keeps a FIFO from
    blocking it) failed at once: "cannot open (Resource temporarily unavailable)"."""
    import fcntl
    import subprocess
    import sys

    if not hasattr(fcntl, "F_SETLEASE"):
        pytest.skip("no file leases on this system")
    path = tmp_path / "t.trace"
    written = _write_sample(path)
    holder = subprocess.Popen(
        [sys.executable, "-c", _LEASE_HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        said = holder.stdout.readline().strip()
        if said != "held":
            pytest.skip(f"the file system gives no lease ({said})")
        with TraceReader(path) as r:
            assert os.get_blocking(r._file.fileno())  # reads wait for data, as on any file
            assert r.n_lookups == sum(ids.size for *_, ids in written)
    finally:
        holder.kill()
        holder.wait()


def test_recovery_refuses_the_file_of_a_writer_recording_now(tmp_path):
    with TraceWriter(tmp_path / "t.trace", chunk_ids=5) as w:
        w.write(np.arange(10), "a")
        [live] = list(tmp_path.iterdir())
        with pytest.raises(ConfigError, match="a writer is recording into it now"):
            recover_trace(live)
        assert list(tmp_path.iterdir()) == [live]
    assert list(tmp_path.iterdir()) == [tmp_path / "t.trace"]


def test_recovery_refuses_a_link_to_the_file_of_a_writer_recording_now(tmp_path):
    """The live writer's lock was looked for on the link itself (not followed): recovery went
    on and made a trace of a file still being written."""
    with TraceWriter(tmp_path / "t.trace", chunk_ids=5) as w:
        w.write(np.arange(10), "a")
        [live] = list(tmp_path.iterdir())
        link = tmp_path / "link.tmp"
        link.symlink_to(live)
        with pytest.raises(ConfigError, match="a writer is recording into it now"):
            recover_trace(link, tmp_path / "out.trace")
        assert sorted(tmp_path.iterdir()) == sorted([live, link])
    loop = tmp_path / "loop.tmp"
    loop.symlink_to(loop)
    with pytest.raises(TraceFormatError, match="cannot open .Too many levels of symbolic links"):
        recover_trace(loop, tmp_path / "out.trace")


def test_recovery_refuses_to_replace_a_file_or_guess_a_name(tmp_path):
    left, _, _ = _leftover(tmp_path)
    (tmp_path / "t.trace").write_bytes(b"keep")
    with pytest.raises(ConfigError, match=r"t\.trace already exists; pass --overwrite"):
        recover_trace(left)
    assert (tmp_path / "t.trace").read_bytes() == b"keep"
    with pytest.raises(ConfigError, match="is the leftover itself"):
        recover_trace(left, left, overwrite=True)
    renamed = left.rename(tmp_path / "partial")
    with pytest.raises(ConfigError, match="expected --out TRACE"):
        recover_trace(renamed)
    recover_trace(renamed, tmp_path / "t.trace", overwrite=True)
    TraceReader(tmp_path / "t.trace").verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial", "t.trace"]


def test_a_trace_being_recorded_by_a_live_writer_is_not_called_killed(tmp_path):
    """Opening a trace another process is recording now (replay run beside a serve
    --record-trace) said a writer killed before it closed the trace left its temporary; the
    writer now holds a lock on its temporary, and the reader says it is being recorded. Once the
    writer is killed, the same file is named as a killed writer's, beside an older one."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    old = tmp_path / ".t.trace.0123456789ab.tmp"  # an earlier killed recording's
    old.write_bytes(b"")
    os.utime(old, (1, 1))
    code = (
        "import sys, numpy as np\n"
        "from tiered_store.trace import TraceWriter\n"
        f"w = TraceWriter({str(tmp_path / 't.trace')!r}, {{'tables': ['a']}}, chunk_ids=4)\n"
        "w.write(np.arange(8), 'a')\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    popen = [sys.executable, "-c", code]
    with subprocess.Popen(popen, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) as proc:
        assert proc.stdout.readline() == b"ready\n"
        [live] = [p.name for p in tmp_path.iterdir() if p != old]
        with pytest.raises(TraceFormatError) as err:
            TraceReader(tmp_path / "t.trace")
        proc.send_signal(signal.SIGKILL)
    assert re.search(
        rf"; a writer is recording it now, into {re.escape(live)} \([\d,]+ bytes so far\) "
        r"\(and 1 older partial file\(s\)\): the trace appears under its name once its writer "
        "closes it",
        str(err.value),
    ), err.value
    assert "killed" not in str(err.value)
    with pytest.raises(TraceFormatError, match=f"killed before it closed the trace left {live} "):
        TraceReader(tmp_path / "t.trace")


def test_a_writer_dropped_unclosed_lets_go_of_its_lock_and_descriptor(tmp_path):
    """A TraceWriter dropped without close() or abort() (its caller failed) kept the descriptor
    holding its lock: each such writer leaked one, and readers in the same process said the trace
    was being recorded now, by no writer at all."""
    import gc

    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        writer = TraceWriter(tmp_path / "t.trace", {"tables": ["a"]})
        writer.write(np.arange(3), "a")
        del writer
        gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds
    with pytest.raises(TraceFormatError, match="killed before it closed the trace") as err:
        TraceReader(tmp_path / "t.trace")
    assert "recording it now" not in str(err.value)


def test_a_path_that_cannot_be_written_is_refused_when_the_writer_opens(tmp_path):
    """Before any lookup is recorded (a server records for hours before it closes the trace)."""
    (tmp_path / "a_dir.trace").mkdir()
    with pytest.raises(TierIOError, match=r"a_dir.trace: a directory is in the way"):
        TraceWriter(tmp_path / "a_dir.trace")
    (tmp_path / "notes").write_text("")
    with pytest.raises(TierIOError, match=r"cannot write trace .*notes/t.trace: "):
        TraceWriter(tmp_path / "notes" / "t.trace")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir.trace", "notes"]


def test_a_writer_in_a_missing_folder_is_refused_naming_it(tmp_path):
    """TraceWriter made every missing folder on its way (a typo's whole chain), where the
    command line makes an output folder only in one that is there and trace_to_npy refuses."""
    path = tmp_path / "typo" / "runs" / "t.trace"
    with pytest.raises(TierIOError, match=f"its folder {path.parent} does not exist; expected"):
        TraceWriter(path)
    assert list(tmp_path.iterdir()) == []
    notes = tmp_path / "notes"  # a file where the folder would be
    notes.write_text("")
    with pytest.raises(TierIOError, match=f"its folder {notes} is not a folder; expected an"):
        TraceWriter(notes / "t.trace")
    trace = tmp_path / "t.trace"
    with TraceWriter(trace, {"tables": ["a"]}) as w:
        w.write(np.arange(3), "a")
    for folder, what in ((path.parent, "does not exist"), (notes, "is not a folder")):
        with pytest.raises(
            TierIOError, match=f"output {folder / 'a.npy'}: its folder {folder} {what}$"
        ):
            trace_to_npy(trace, folder / "a.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "t.trace"]


def _chunk_offsets(path):
    with TraceReader(path) as r:
        return [c[0] for c in r.chunk_index], r.n_chunks


@pytest.mark.parametrize("cut_chunk", [0, 2])
def test_truncated_file_names_file_and_chunk(tmp_path, cut_chunk):
    path = tmp_path / "t.trace"
    _write_sample(path)
    offsets, _ = _chunk_offsets(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.trace"
    cut.write_bytes(data[: offsets[cut_chunk] + 60])  # inside chunk `cut_chunk`'s payload
    with pytest.raises(TraceFormatError) as err:
        TraceReader(cut)
    msg = str(err.value)
    assert str(cut) in msg and f"chunk {cut_chunk}" in msg and "truncated" in msg


def test_truncated_footer_is_detected(tmp_path):
    path = tmp_path / "t.trace"
    _write_sample(path)
    _, n = _chunk_offsets(path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(TraceFormatError, match=rf"{re.escape(str(path))}.*chunk {n}"):
        TraceReader(path)


def test_flipped_byte_in_a_chunk_names_the_chunk(tmp_path):
    path = tmp_path / "t.trace"
    _write_sample(path)
    offsets, n = _chunk_offsets(path)
    data = bytearray(path.read_bytes())
    data[offsets[2] + 70] ^= 0x01  # payload of chunk 2
    path.write_bytes(bytes(data))
    with TraceReader(path) as r:  # opening reads only header and footer
        r.read_chunk(1)
        with pytest.raises(TraceFormatError, match=rf"{re.escape(str(path))}, chunk 2: payload"):
            list(r.ids())
        with pytest.raises(TraceFormatError, match="chunk 2"):
            r.verify()


def test_flipped_byte_in_a_chunk_header(tmp_path):
    path = tmp_path / "t.trace"
    _write_sample(path)
    offsets, _ = _chunk_offsets(path)
    data = bytearray(path.read_bytes())
    data[offsets[1] + 9] ^= 0x40  # the chunk's id count
    path.write_bytes(bytes(data))
    with TraceReader(path) as r, pytest.raises(TraceFormatError, match="chunk 1: chunk header"):
        r.read_chunk(1)


@pytest.mark.parametrize(
    ("where", "message"),
    [("header", "header checksum"), ("footer", "footer checksum"), ("magic", "not a trace file")],
)
def test_flipped_byte_outside_chunks(tmp_path, where, message):
    path = tmp_path / "t.trace"
    _write_sample(path)
    data = bytearray(path.read_bytes())
    pos = {"header": 30, "footer": len(data) - 40, "magic": 1}[where]
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match=re.escape(str(path))) as err:
        TraceReader(path)
    assert message in str(err.value)


def test_not_a_trace(tmp_path):
    p = tmp_path / "junk.trace"
    p.write_bytes(b"hello world, this is not a trace at all")
    with pytest.raises(TraceFormatError, match="not a trace file"):
        TraceReader(p)
    with pytest.raises(TraceFormatError, match="cannot open"):
        TraceReader(tmp_path / "missing.trace")


@pytest.mark.parametrize("head", [b"[1, 2]", b'"engram-trace"', b"null"])
def test_header_that_is_not_a_json_object(tmp_path, head):
    import struct
    import zlib

    p = tmp_path / "odd.trace"
    p.write_bytes(
        struct.pack("<8sHHI", b"ENGTRACE", 1, 0, len(head))
        + head
        + struct.pack("<I", zlib.crc32(head))
    )
    with pytest.raises(
        TraceFormatError,
        match=f"odd.trace: header is {re.escape(head.decode())}; expected a JSON object",
    ):
        TraceReader(p)


@pytest.mark.parametrize("key", ["rows", "dim", "heads"])
@pytest.mark.parametrize("value", [b'"lots"', b"1.5   ", b"0     ", b"true  "])
def test_a_header_whose_table_rows_or_dim_are_not_counts_is_refused(tmp_path, key, value):
    # a foreign writer's "rows": "lots" (or "dim") was read without a check and gave replay and
    # tier sizing a bare int() ValueError; 1.5 and true were taken as 1 row (rows of 1 value);
    # "heads" 0 was replay's --batch-tokens ZeroDivisionError, 1.5 one lookup per token
    import struct
    import zlib

    from tiered_store.trace import _PREAMBLE

    p = tmp_path / "odd.trace"
    layout = {"name": "a", "rows": 100, "dim": 8, key: 100000}
    with TraceWriter(p, {"tables": [layout]}) as w:
        w.write(np.arange(5), "a")
    data = bytearray(p.read_bytes())
    n = _PREAMBLE.unpack(data[: _PREAMBLE.size])[3]
    head = bytes(data[_PREAMBLE.size : _PREAMBLE.size + n]).replace(b"100000", value, 1)
    data[_PREAMBLE.size : _PREAMBLE.size + n + 4] = head + struct.pack("<I", zlib.crc32(head))
    p.write_bytes(data)
    expected = rf"trace header 'tables\[0\].{key}': got .*; expected an integer >= 1"
    with pytest.raises(TraceFormatError, match=rf"odd.trace: {expected}"):
        TraceReader(p)
    if key != "rows":  # nor is it written
        with pytest.raises(TraceFormatError, match=expected):
            TraceWriter(tmp_path / "new.trace", {"tables": [{"name": "a", key: json.loads(value)}]})


def test_ids_past_the_rows_the_header_gives_are_refused_when_read(tmp_path):
    """The writer checks ids against a table's rows, and replay trusts a table that gives them;
    a foreign writer's ids past them were read without a word, and replay's caches met them as a
    bare IndexError."""
    import struct
    import zlib

    from tiered_store.trace import _PREAMBLE

    p = tmp_path / "odd.trace"
    with TraceWriter(p, {"tables": [{"name": "a", "rows": 9000}, {"name": "b"}]}) as w:
        w.write(np.arange(5), "b")
        w.write(np.array([[1, 2], [8000, 3]]), "a")
    data = bytearray(p.read_bytes())
    n = _PREAMBLE.unpack(data[: _PREAMBLE.size])[3]
    head = bytes(data[_PREAMBLE.size : _PREAMBLE.size + n]).replace(b"9000", b"3000", 1)
    data[_PREAMBLE.size : _PREAMBLE.size + n + 4] = head + struct.pack("<I", zlib.crc32(head))
    p.write_bytes(data)
    expected = "record 1 holds row id 8,000 of table 'a'; expected ids below the 3,000 rows"
    with TraceReader(p) as r:
        for read in (r.read_all, r.verify, lambda: list(r.batches("b"))):
            with pytest.raises(TraceFormatError, match=re.escape(f"{p}, chunk 0: {expected}")):
                read()


def _rewrite_footer(path, edit):
    """Apply ``edit`` to the trace's footer dict and write it back with a matching checksum, as a
    buggy or foreign writer would."""
    import json
    import zlib

    from tiered_store.trace import _TRAILER, END_MAGIC

    data = path.read_bytes()
    start = len(data) - _TRAILER.size - _TRAILER.unpack(data[-_TRAILER.size :])[0]
    footer = json.loads(data[start : -_TRAILER.size])
    edit(footer)
    raw = json.dumps(footer).encode()
    path.write_bytes(data[:start] + raw + _TRAILER.pack(len(raw), zlib.crc32(raw), 0, END_MAGIC))


@pytest.mark.parametrize(
    ("field", "edit"),
    [
        ("chunks: [[]]", lambda f: f.update(chunks=[[]])),
        ("per_table: a list", lambda f: f["totals"].update(per_table=[50])),
        ("tables: not the header's", lambda f: f.update(tables=f["tables"][::-1])),
    ],
)
def test_a_footer_of_the_wrong_shape_is_refused_by_name(tmp_path, field, edit):
    """A footer whose checksum matches but whose fields have the wrong shape escaped as a bare
    IndexError or AttributeError that named no file."""
    path = tmp_path / "t.trace"
    _write_sample(path)
    _rewrite_footer(path, edit)
    with pytest.raises(TraceFormatError, match=f"{re.escape(str(path))}: malformed footer"):
        TraceReader(path)


def _rewrite_records(path, edit, edit_ids=None):
    """Apply ``edit`` to the record table of a one-chunk trace (and ``edit_ids`` to its id bytes,
    byte-shuffled) and write the chunk back with matching sizes and checksums, as a buggy or
    foreign writer would."""
    import struct
    import zlib

    import zstandard

    from tiered_store.trace import _CHUNK_HEAD, _CHUNK_HEAD_SIZE, _META_COLS

    data = path.read_bytes()
    with TraceReader(path) as r:
        assert r.n_chunks == 1
        offset, _, n_rec = r.chunk_index[0][:3]
    fields = list(_CHUNK_HEAD.unpack(data[offset : offset + _CHUNK_HEAD.size]))
    start = offset + _CHUNK_HEAD_SIZE
    raw = bytearray(zstandard.ZstdDecompressor().decompress(data[start : start + fields[8]]))
    records = np.frombuffer(raw, "<i8", n_rec * _META_COLS).reshape(n_rec, _META_COLS).copy()
    edit(records)
    raw[: records.nbytes] = records.astype("<i8").tobytes()
    if edit_ids is not None:
        raw[records.nbytes :] = edit_ids(bytearray(raw[records.nbytes :]))
    payload = zstandard.ZstdCompressor().compress(bytes(raw))
    fields[8], fields[9] = len(payload), zlib.crc32(payload)
    head = _CHUNK_HEAD.pack(*fields)
    rest = data[start + _CHUNK_HEAD.unpack(data[offset : offset + _CHUNK_HEAD.size])[8] :]
    path.write_bytes(data[:offset] + head + struct.pack("<I", zlib.crc32(head)) + payload + rest)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.__setitem__((1, 1), 5), "record 1 has table index 5; expected a table index"),
        (lambda r: r.__setitem__((1, 4), 7), r"record 1 has 20 ids in shape \(7, 5, 2\)"),
        (lambda r: r.__setitem__((0, 3), 9), "record 0 has 9 dims; expected 0 to 4 dims"),
        (lambda r: r.__setitem__((3, 0), 0), "record 3 has batch 0 after an earlier record's"),
    ],
)
def test_a_record_table_that_cannot_be_right_is_refused_by_name(tmp_path, edit, message):
    """Records whose checksums match but that name a table the footer does not list, give a
    shape that does not hold their ids, or go back a batch: replay dropped the first record's ids
    without a word, raised a bare ValueError reshaping the second and third, and joined batches
    out of order for the fourth."""
    path = tmp_path / "t.trace"
    _write_sample(path, chunk_ids=1 << 20)
    _rewrite_records(path, edit)
    where = re.escape(f"trace {path}, chunk 0: ")
    with TraceReader(path) as r, pytest.raises(TraceFormatError, match=where + message):
        list(r.batches())


def test_an_id_past_int64_in_a_chunk_is_refused_not_read_negative(tmp_path):
    """8-byte ids are stored unsigned: one past 2**63 (no writer writes it) was read as a
    negative row id, exported so and handed to replay."""

    def set_top_bit(body: bytearray) -> bytearray:
        body[-3 + 1] |= 0x80  # the top byte plane comes last: id 1 of 3 gains 2**63
        return body

    path = tmp_path / "t.trace"
    with TraceWriter(path, {"tables": ["a"]}) as w:
        w.write(np.array([1, 2, 2**40]), "a")
    _rewrite_records(path, lambda r: None, set_top_bit)
    expected = f"record 0 holds row id {2**63 + 2:,} of table 'a'; expected ids below 2**63"
    with TraceReader(path) as r, pytest.raises(TraceFormatError, match=re.escape(expected)):
        trace_to_npy(r, tmp_path / "ids.npy")
    assert not (tmp_path / "ids.npy").exists()


@pytest.mark.parametrize(
    "tables, ids",
    [
        (["a"], [0, 2**63 - 1]),  # no rows given: any int64 id, as the writer takes
        (None, [2**63 - 1]),
        ([{"name": "a", "rows": 2**64}], [5, 2**63 - 1]),  # rows past int64
        ([{"name": "a", "rows": 2**63}], [2**63 - 1]),
        ([{"name": "a", "rows": 2**40}], [0, 2**40 - 1]),  # 8-byte ids up to rows - 1
        ([{"name": "a", "rows": 2**32}], [2**32 - 1]),  # 4-byte ids up to rows - 1
    ],
)
def test_every_id_the_writer_takes_reads_back(tmp_path, tables, ids):
    """The reader's check of each chunk's ids refused id 2**63 - 1 of a table without rows
    ('expected ids below 2**63' of an id that is), and a header's rows past int64 (which the writer
    takes) failed the open with a bare OverflowError."""
    path = tmp_path / "t.trace"
    with TraceWriter(path, None if tables is None else {"tables": tables}) as w:
        w.write(np.array(ids, dtype=np.uint64), 0 if tables is None else "a")
    with TraceReader(path) as r:
        assert r.read_all().tolist() == ids


def test_chunks_going_back_a_batch_are_refused_at_open(tmp_path):
    """Each chunk's records were checked to go forward, but not one chunk against the next: a
    writer that went back a batch in a new chunk wrote a trace that read as if it were sound,
    its batches joined out of order."""
    path = tmp_path / "t.trace"
    with TraceWriter(path, {"tables": ["a"]}, chunk_ids=4) as w:
        for batch in range(3):
            w.write(np.arange(4) + batch, "a", batch=batch)
        w._batch = 0  # a buggy writer: back to batch 0, in a chunk of its own
        w.write(np.arange(4), "a")
    with pytest.raises(
        TraceFormatError,
        match=f"^trace {re.escape(str(path))}: malformed footer \\(chunk 3 starts at batch 0, "
        "chunk 2 ends at batch 2; expected batches that only go forward",
    ):
        TraceReader(path)


def _set_chunk(index, field, value):
    """A footer edit that sets one field of one chunk entry."""

    def edit(footer):
        footer["chunks"][index][field] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set_chunk(-1, 0, -1), r"chunk 4 at offset -1; expected an offset inside the data, bytes \[\d+, [\d,]+\)"),
        (_set_chunk(-1, 0, 10**30), r"chunk 4 is \[10+, .*\]; expected \[offset, ids, records, first batch, last batch\], integers that fit int64"),
        (_set_chunk(1, 0, -1), "chunk 1 at offset -1; expected an offset inside the data"),
        (_set_chunk(2, 0, 2**40), "chunk 2 at offset 1099511627776; expected an offset inside the data"),
        (lambda f: f["chunks"].insert(1, f["chunks"][2]), r"chunk 2 at offset \d+, chunk 1 at \d+; expected offsets that increase"),
        (_set_chunk(1, 1, -3), "chunk 1 holds -3 ids in 1 records; expected counts >= 0"),
        (_set_chunk(1, 0, True), r"chunk 1 is \[True, 10, 1, 1, 1\]; expected \[offset, ids, records, first batch, last batch\], integers\)"),
        (lambda f: f["chunks"][1].pop(), r"chunk 1 is \[\d+, 10, 1, 1\]; expected \[offset, ids, records, first batch, last batch\], integers\)"),
    ],
)  # fmt: skip
def test_a_footer_chunk_entry_that_cannot_be_read_is_refused_at_open(tmp_path, edit, message):
    """A chunk offset that is negative or past the file escaped as a bare OSError (EINVAL) or
    OverflowError from os.pread naming no file: at open for the last chunk, at read_chunk for a
    middle one (which tiered-store export-trace printed as a traceback)."""
    path = tmp_path / "t.trace"
    with TraceWriter(path, {"tables": ["a"]}, chunk_ids=10) as w:
        for batch in range(5):
            w.write(np.arange(10) + batch, "a", batch=batch)
    _rewrite_footer(path, edit)
    with pytest.raises(
        TraceFormatError, match=f"^trace {re.escape(str(path))}: malformed footer \\({message}"
    ):
        TraceReader(path)
    with pytest.raises(TraceFormatError, match="malformed footer"):
        trace_to_npy(path, tmp_path / "out.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.trace"]


def _set_count(table, value):
    """A footer edit that sets (or, with None, drops) one table's count in totals.per_table."""

    def edit(footer):
        footer["totals"]["per_table"].pop(table, None)
        if value is not None:
            footer["totals"]["per_table"][table] = value

    return edit


def _count_both(footer):
    """Over-count table a by 10**30 in totals.per_table and totals.lookups alike."""
    footer["totals"]["per_table"]["a"] += 10**30
    footer["totals"]["lookups"] += 10**30


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set_count("a", -5), r"totals.per_table\['a'\] is -5; expected a count of ids, an integer in \[0, 2\*\*63\)"),
        (_set_count("a", 10**30), r"totals.per_table\['a'\] is 10+; expected a count of ids"),
        (_count_both, r"totals.per_table\['a'\] is 10+50; expected a count of ids"),
        (_set_count("a", True), r"totals.per_table\['a'\] is True; expected a count of ids"),
        (_set_count("a", None), r"totals.per_table counts the ids of tables \['b'\]; expected the footer's tables \['a', 'b'\]"),
        (_set_count("c", 0), r"totals.per_table counts the ids of tables \['a', 'b', 'c'\]; expected the footer's tables \['a', 'b'\]"),
        (_set_count("b", 3), r"totals.per_table adds up to 53 ids; expected totals.lookups, 50"),
    ],
)  # fmt: skip
def test_a_footer_count_per_table_that_cannot_be_right_is_refused_at_open(tmp_path, edit, message):
    """A table's count in totals.per_table that was negative, past int64 or missing escaped
    read_all and tiered-store export-trace as a bare ValueError (negative dimensions),
    OverflowError or KeyError naming no file."""
    path = tmp_path / "t.trace"
    with TraceWriter(path, {"tables": ["a", "b"]}) as w:
        w.write(np.arange(50), "a")
    _rewrite_footer(path, edit)
    with pytest.raises(TraceFormatError, match=f"^trace {re.escape(str(path))}: malformed footer \\({message}"):  # fmt: skip
        TraceReader(path)
    with pytest.raises(TraceFormatError, match="malformed footer"):
        trace_to_npy(path, tmp_path / "out.npy", table="a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.trace"]


@pytest.mark.parametrize("extra", [5, -5, -50])
def test_an_export_whose_footer_miscounts_the_ids_is_refused_and_writes_nothing(tmp_path, extra):
    """A footer that over-counted a table's ids was exported padded with row id 0 (under-counted:
    a bare numpy broadcast error); it is now the TraceFormatError read_all raises."""
    path = tmp_path / "t.trace"
    with TraceWriter(path, {"tables": ["a"]}) as w:
        w.write(np.arange(1, 51), "a")

    def miscount(footer):
        footer["totals"]["lookups"] += extra
        footer["totals"]["per_table"]["a"] += extra

    _rewrite_footer(path, miscount)
    message = f"{re.escape(str(path))}: chunks hold 50 ids; the footer says {50 + extra}$"
    with TraceReader(path) as r, pytest.raises(TraceFormatError, match=message):
        r.read_all("a")
    with pytest.raises(TraceFormatError, match=message):
        trace_to_npy(path, tmp_path / "out.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.trace"]


def test_npy_import_export(tmp_path):
    ids = np.random.default_rng(3).integers(0, 5000, size=1234)
    np.save(tmp_path / "ids.npy", ids.astype(np.int32))
    r = trace_from_npy(
        tmp_path / "ids.npy",
        tmp_path / "a.trace",
        {"tables": ["l2"]},
        table="l2",
        batch_size=100,
        chunk_ids=256,
    )
    assert r.n_batches == 13 and r.tables == ["l2"] and r.n_chunks > 1
    np.testing.assert_array_equal(r.read_all(), ids)
    back = trace_to_npy(r, tmp_path / "back.npy")
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, ids)
    r.close()
    umask = os.umask(0)
    os.umask(umask)  # the export's mode is the umask's, as any new file's (mkstemp's was 0600)
    assert (tmp_path / "back.npy").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    batched = ids[:1200].reshape(12, 10, 10)  # N-D: leading axis is the batch
    np.save(tmp_path / "b.npy", batched)
    with trace_from_npy(tmp_path / "b.npy", tmp_path / "b.trace") as r2:
        got = list(r2.batches())
        assert [g.batch for g in got] == list(range(12)) and got[0].ids.shape == (10, 10)
    out = trace_to_npy(tmp_path / "b.trace", tmp_path / "b_back.npy", table=0)
    np.testing.assert_array_equal(out, batched.ravel())

    (tmp_path / "bad.npy").write_bytes(b"nope")
    with pytest.raises(TraceFormatError, match="bad.npy"):
        trace_from_npy(tmp_path / "bad.npy", tmp_path / "c.trace")
    assert not os.path.exists(tmp_path / "c.trace")


def test_two_traces_concatenated_are_refused_by_name(tmp_path):
    """`cat a.trace b.trace > both.trace`: the last footer covers only b's half, which read
    alone would be half the data under b's totals."""
    parts = []
    for name, seed in (("a", 0), ("b", 1)):
        path = tmp_path / f"{name}.trace"
        with TraceWriter(path, {"tables": ["t"]}) as w:
            for batch in range(5):
                w.write(np.random.default_rng(seed + batch).integers(0, 1000, 64), batch=batch)
        parts.append(path.read_bytes())
    both = tmp_path / "both.trace"
    both.write_bytes(parts[0] + parts[1])
    with pytest.raises(TraceFormatError, match=r"both.trace: its chunks cover bytes .* \(two traces concatenated\?\)"):  # fmt: skip
        TraceReader(both)
    both.write_bytes(parts[0] + parts[0])  # one appended to itself
    with pytest.raises(TraceFormatError, match=r"two traces concatenated\?"):
        TraceReader(both)


def test_ids_past_int64_are_refused_not_wrapped(tmp_path):
    wide = r"ids span \[7, 9223372036854775813\]; expected in \[0, 2\*\*63\)"
    with TraceWriter(tmp_path / "t.trace", {"tables": ["t"]}) as w, pytest.raises(RowIdError, match=wide):  # fmt: skip
        w.write(np.array([2**63 + 5, 7], dtype=np.uint64))


def test_a_table_index_means_the_same_position_to_writer_and_reader(tmp_path):
    """Without a header's table list, an index is a position: the next one registers as its
    own name, a gap is refused (an index the reader would take for another table)."""
    path = tmp_path / "t.trace"
    with TraceWriter(path) as w:
        w.write(np.array([1, 2]), 0)
        w.write(np.array([3]), "layer5")
        w.write(np.array([4]), 1)  # the position of "layer5"
        w.write(np.array([5]), 2)  # registers "2"
        with pytest.raises(TraceFormatError, match=r"table index 4 with 3 tables .* up to 3"):
            w.write(np.array([6]), 4)
    with TraceReader(path) as r:
        assert r.tables == ["0", "layer5", "2"]
        assert [r.read_all(t).tolist() for t in (0, 1, 2)] == [[1, 2], [3, 4], [5]]
        assert r.read_all("layer5").tolist() == [3, 4]


def test_a_reused_buffer_does_not_change_records_already_written(tmp_path):
    """A caller refilling one staging buffer each batch: the writer keeps its own copy of the
    ids until the chunk is flushed, not a view of the caller's array."""
    path = tmp_path / "t.trace"
    buf = np.empty((2, 4), dtype=np.int64)
    written = []
    with TraceWriter(path, {"tables": [{"name": "t", "rows": 1000}]}) as w:
        for step in range(3):
            buf[:] = np.arange(8).reshape(2, 4) + 100 * step
            written.append(buf.copy())
            w.write(buf, "t")
            w.end_batch()
        buf[:] = 999  # changed after the last write, before the chunk is flushed at close
    with TraceReader(path) as r:
        got = [b.ids for b in r.batches()]
    assert [g.tolist() for g in got] == [a.tolist() for a in written]


def test_an_npy_that_holds_no_row_ids_is_refused_by_name(tmp_path):
    """An empty file, a 0-d array and an .npz: a TraceFormatError naming the file, no trace."""
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "scalar.npy", np.int64(3))
    np.savez(tmp_path / "ids.npz", ids=np.arange(3))
    for name, message in (
        ("empty.npy", r"not a readable .npy \(empty or cut off"),
        ("scalar.npy", "a 0-d array"),
        ("ids.npz", "an .npz archive; expected an .npy of row ids"),
    ):
        with pytest.raises(TraceFormatError, match=rf"{name}: {message}"):
            trace_from_npy(tmp_path / name, tmp_path / "t.trace")
    assert not (tmp_path / "t.trace").exists()


def test_an_npy_of_other_values_or_too_many_dims_is_refused_naming_the_npy(tmp_path):
    """A float, bool or 6-D .npy was named as the trace's fault ('t.trace: row ids of dtype
    float64', 't.trace: ids of 5 dims'), not the .npy's, nor with the .npy's own dims."""
    np.save(tmp_path / "floats.npy", np.arange(4.0))
    np.save(tmp_path / "flags.npy", np.ones(4, dtype=bool))
    np.save(tmp_path / "six.npy", np.zeros((2, 1, 1, 1, 1, 1), dtype=np.int64))
    for name, error, message in (
        ("floats.npy", RowIdError, "row ids of dtype float64; expected integers"),
        ("flags.npy", RowIdError, "row ids of dtype bool; expected integers"),
        ("six.npy", TraceFormatError, r"a 6-D array; expected 1-D row ids, or up to 5-D"),
    ):
        with pytest.raises(error, match=rf"^{re.escape(str(tmp_path / name))}: {message}"):
            trace_from_npy(tmp_path / name, tmp_path / "t.trace")
    assert not (tmp_path / "t.trace").exists()


@pytest.mark.parametrize("rows", ["1000", -1, 0, 1000.0])
def test_layout_rows_that_are_not_a_positive_integer_are_refused(tmp_path, rows):
    """Refused when the writer opens, not as a TypeError (or every id rejected) on a write."""
    layout = {"tables": ["a", {"name": "b", "rows": rows}]}
    with pytest.raises(TraceFormatError, match=r"'tables\[1\]\.rows': got .*; expected an integer"):
        TraceWriter(tmp_path / "t.trace", layout)
    with TraceWriter(tmp_path / "t.trace", {"tables": [{"name": "b", "rows": None}]}) as w:
        w.write(np.array([0, 10**12]), "b")  # null rows: ids not checked against a size


def test_a_trace_written_over_its_own_npy_is_refused_and_the_npy_kept(tmp_path):
    """trace_from_npy(ids.npy, ids.npy) (or read through a link to it) renamed the trace over
    the row ids it was reading: the user's array was gone; now a ConfigError naming it, as
    trace_to_npy's for the other way."""
    ids = np.arange(10) % 4
    np.save(tmp_path / "ids.npy", ids)
    (tmp_path / "link.npy").symlink_to("ids.npy")
    for source in ("ids.npy", "link.npy"):
        with pytest.raises(ConfigError, match=rf"trace {tmp_path / 'ids.npy'} is the \.npy"):
            trace_from_npy(tmp_path / source, tmp_path / "ids.npy", batch_size=4)
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.npy", "link.npy"]


@pytest.mark.parametrize("make", ["array", "tensor", "int32 tensor"])
def test_a_batch_chunk_size_or_npy_batch_size_may_be_a_0d_array_or_a_torch_integer(tmp_path, make):
    """The integer checks took Python and NumPy scalars only: a 0-d array or a torch integer,
    which int() had taken (a batch index read off a tensor), was refused as no integer."""
    import torch

    def number(value):
        if make == "array":
            return np.array(value)
        return torch.tensor(value, dtype=torch.int32 if make == "int32 tensor" else None)

    with TraceWriter(tmp_path / "t.trace", chunk_ids=number(2)) as w:
        w.write(np.array([1, 2, 3]), "a", batch=number(1))
        w.write(np.array([4]), "a", batch=number(3))
    with TraceReader(tmp_path / "t.trace") as r:
        assert [(b.batch, b.ids.tolist()) for b in r.batches()] == [(1, [1, 2, 3]), (3, [4])]
        assert len(r.chunk_index) == 2
    np.save(tmp_path / "ids.npy", np.arange(6))
    with trace_from_npy(tmp_path / "ids.npy", tmp_path / "n.trace", batch_size=number(4)) as r:
        assert r.n_batches == 2
    with TraceWriter(tmp_path / "b.trace") as w:
        with pytest.raises(TraceFormatError, match=r"batch tensor\(True\); expected a batch"):
            w.write(np.array([1]), "a", batch=torch.tensor(True))
        w.write(np.array([1]), "a")


@pytest.mark.parametrize("chunk_ids", [2.5, True, "5", 0])
def test_a_chunk_size_that_is_not_a_positive_integer_is_named(tmp_path, chunk_ids):
    """2.5 was taken as chunks of 2 ids and True as chunks of 1; "5" was a bare TypeError."""
    with pytest.raises(ValueError, match=rf"chunk_ids: got {re.escape(repr(chunk_ids))}; expected"):
        TraceWriter(tmp_path / "t.trace", chunk_ids=chunk_ids)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("level", [2.5, True, "3", None, 23, -(2**17) - 1, -(2**40)])
def test_a_compression_level_that_is_not_a_zstd_level_is_named(tmp_path, level):
    """zstandard's own errors named nothing ('level must be less than 23', "'float' object cannot
    be interpreted as an integer", 'signed integer is less than minimum' below -2**31) and True
    was taken as level 1; zstd clamps levels below its fastest, -2**17."""
    with pytest.raises(ValueError, match=rf"level: got {re.escape(repr(level))}; expected a zstd"):
        TraceWriter(tmp_path / "t.trace", level=level)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("batch", [2.5, True, "3", float("nan"), 2**70])
def test_a_record_batch_that_is_not_an_integer_index_is_refused_by_name(tmp_path, batch):
    """2.5 was written as batch 2 and True as batch 1; "3" and NaN were bare TypeError and
    ValueError, and 2**70 an OverflowError only when the chunk was flushed, losing the trace."""
    with TraceWriter(tmp_path / "t.trace") as w:
        with pytest.raises(
            TraceFormatError, match=rf"batch {re.escape(repr(batch))}; expected a batch index"
        ):
            w.write(np.array([1, 2]), "a", batch=batch)
        w.write(np.array([3]), "a", batch=np.int64(2))
    with TraceReader(tmp_path / "t.trace") as r:
        assert [(b.batch, b.ids.tolist()) for b in r.batches()] == [(2, [3])]


@pytest.mark.parametrize("batch_size", [2.5, True, "4", 0])
def test_a_batch_size_that_is_not_a_positive_integer_is_named(tmp_path, batch_size):
    """2.5 was a bare TypeError from range() and True was taken as batches of 1."""
    np.save(tmp_path / "ids.npy", np.arange(10))
    with pytest.raises(
        ValueError, match=rf"batch_size: got {re.escape(repr(batch_size))}; expected"
    ):
        trace_from_npy(tmp_path / "ids.npy", tmp_path / "t.trace", batch_size=batch_size)
    assert not (tmp_path / "t.trace").exists()


def test_a_batch_size_for_an_array_with_a_batch_axis_is_refused(tmp_path):
    """An N-D array's batches are its leading axis; a ``batch_size`` given with one was
    silently ignored (a user asking for 4 ids a batch got rows of 5)."""
    np.save(tmp_path / "ids.npy", np.arange(10).reshape(2, 5))
    with pytest.raises(
        ValueError, match=r"batch_size=4: .* is 2-D, its leading axis \(2\) is the batches"
    ):
        trace_from_npy(tmp_path / "ids.npy", tmp_path / "t.trace", batch_size=4)
    assert not (tmp_path / "t.trace").exists()
    with trace_from_npy(tmp_path / "ids.npy", tmp_path / "t.trace") as r:
        assert r.n_batches == 2


def test_a_header_or_footer_nested_past_the_recursion_limit_is_refused_naming_the_file(tmp_path):
    """A foreign writer's header or footer of deeply nested JSON (its checksum matching) raised a
    bare RecursionError from json.loads that named no file."""
    import struct
    import zlib

    from tiered_store.trace import _TRAILER, END_MAGIC

    deep = b"[" * 100_000 + b"]" * 100_000
    p = tmp_path / "odd.trace"
    p.write_bytes(
        struct.pack("<8sHHI", b"ENGTRACE", 1, 0, len(deep))
        + deep
        + struct.pack("<I", zlib.crc32(deep))
    )
    with pytest.raises(TraceFormatError, match=r"odd\.trace: header .*nested"):
        TraceReader(p)
    path = tmp_path / "t.trace"
    _write_sample(path)
    data = path.read_bytes()
    start = len(data) - _TRAILER.size - _TRAILER.unpack(data[-_TRAILER.size :])[0]
    path.write_bytes(data[:start] + deep + _TRAILER.pack(len(deep), zlib.crc32(deep), 0, END_MAGIC))
    with pytest.raises(
        TraceFormatError, match=rf"{re.escape(str(path))}: malformed footer .*nested"
    ):
        TraceReader(path)


def test_a_refused_write_leaves_the_trace_as_it_was(tmp_path):
    """A write refused for its ids had already moved the trace to its ``batch`` and registered
    its new table: the next write landed in that batch, and the footer counted the batches up to
    it and listed a table no id was written to."""
    path = tmp_path / "t.trace"
    with TraceWriter(path) as w:
        w.write(np.arange(3), "a")
        with pytest.raises(RowIdError, match="table 'b' ids span"):
            w.write(np.array([-1, 2]), "b", batch=7)
        with pytest.raises(TraceFormatError, match="table index 5"):
            w.write(np.arange(2), 5, batch=9)
        w.write(np.arange(3), "a")
    with TraceReader(path) as r:
        assert r.tables == ["a"]
        assert r.n_batches == 1
        assert [(b.batch, b.table) for b in r.batches()] == [(0, "a"), (0, "a")]
    layout = tmp_path / "layout.trace"
    with TraceWriter(layout, {"tables": [{"name": "a", "rows": 10}]}) as w:
        with pytest.raises(RowIdError, match=r"expected \[0, 10\)"):
            w.write(np.array([20]), "a", batch=4)
        with pytest.raises(TraceFormatError, match="not in the header's tables"):
            w.write(np.array([1]), "z", batch=6)
        w.write(np.array([1]), "a")
    with TraceReader(layout) as r:
        assert r.n_batches == 1 and [b.batch for b in r.batches()] == [0]


def test_a_header_nested_past_the_recursion_limit_is_refused_before_writing(tmp_path):
    """json.dumps of such a header raised a bare RecursionError, where one it cannot serialise
    otherwise is a TraceFormatError naming the trace."""
    import functools

    deep = functools.reduce(lambda inner, _: [inner], range(5000), [])
    with pytest.raises(TraceFormatError, match=r"t\.trace is nested deeper"):
        TraceWriter(tmp_path / "t.trace", {"config": deep})
    assert list(tmp_path.iterdir()) == []


_WRITE_PAST_THE_FILE_SIZE_LIMIT = r"""
import resource, sys
import numpy as np
from tiered_store.trace import TraceWriter
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
ids = np.random.default_rng(0).integers(0, 2**40, 1 << 14)
try:
    with TraceWriter(sys.argv[1], chunk_ids=1 << 14) as w:
        for _ in range(50):
            w.write(ids, "a")
            w.end_batch()
except OSError as exc:
    print(type(exc).__name__, exc)
"""


def test_a_trace_cut_short_by_the_file_size_limit_names_the_trace_and_the_step(tmp_path):
    """A chunk write that failed (past RLIMIT_FSIZE here; a full disk alike) raised a bare
    "[Errno 27] File too large" naming no file, where every other writer names its file."""
    import subprocess
    import sys

    path = tmp_path / "t.trace"
    done = subprocess.run(
        [sys.executable, "-c", _WRITE_PAST_THE_FILE_SIZE_LIMIT, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = f"cannot write trace {path}: writing chunk "
    assert done.stdout.startswith("TierIOError") and said in done.stdout, done.stdout + done.stderr
    assert "File too large" in done.stdout and "nothing was published" in done.stdout
    assert list(tmp_path.iterdir()) == []


_A_CHUNK_THAT_FAILS_THEN_ROOM = r"""
import resource, sys
import numpy as np
from tiered_store.trace import TraceReader, TraceWriter
path, limit = sys.argv[1], resource.RLIMIT_FSIZE
ids = np.random.default_rng(0).integers(0, 2**40, 1 << 13)
with TraceWriter(path, chunk_ids=1 << 14) as w:
    w.write(ids, "a")  # buffered
    resource.setrlimit(limit, (1024, resource.RLIM_INFINITY))  # a full disk, for a while
    for call in (
        lambda: w.write(np.arange((1 << 13) + 1), "b", batch=5),  # its chunk ahead of it fails
        lambda: w.write(np.arange(1 << 13), "c", batch=6),  # its own chunk fails
        w.end_chunk,
    ):
        try:
            call()
        except OSError as exc:
            print(type(exc).__name__)
    resource.setrlimit(limit, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    w.write(np.arange(3), "a")
with TraceReader(path) as r:
    got = [(b.batch, b.table, b.ids.size) for b in r.batches()]
    print(r.tables, got, np.array_equal(next(r.batches()).ids, ids))
resource.setrlimit(limit, (8, resource.RLIM_INFINITY))
try:
    TraceWriter(path + ".2")
except OSError as exc:
    print(type(exc).__name__, "header" in str(exc))
"""


def test_a_chunk_that_could_not_be_written_leaves_a_trace_that_closes_whole(tmp_path):
    """A chunk write that failed (a full disk; the file-size limit here) left its partial bytes
    in the file, so the trace closed once there was room again was published unreadable ("its
    chunks cover bytes [1,024, ...) of the data"); the write that failed had also moved the trace
    to its batch and registered its table, or (its own chunk failing) kept the record it raised
    for. A failed write takes nothing and leaves no bytes; a header write that fails leaves no
    temporary."""
    import subprocess
    import sys

    path = tmp_path / "t.trace"
    done = subprocess.run(
        [sys.executable, "-c", _A_CHUNK_THAT_FAILS_THEN_ROOM, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.splitlines() == [
        "TierIOError",
        "TierIOError",
        "TierIOError",
        f"['a'] [(0, 'a', {1 << 13}), (0, 'a', 3)] True",
        "TierIOError True",
    ], done.stdout + done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["t.trace"]


_A_BLOCK_THAT_FAILS_THEN_ROOM = r"""
import os, resource, sys
from pathlib import Path
import numpy as np
from tiered_store.trace import TraceWriter

def record(path, fail):
    with TraceWriter(path, chunk_ids=8) as w:
        (tmp,) = Path(path).parent.glob("*.tmp")
        w.write(np.arange(4), "a")
        for attempt in range(2 if fail else 1):
            before = tmp.stat().st_size
            try:
                with w.all_or_nothing():
                    w.write(np.arange(4), "b")  # its chunk is written
                    w.end_batch()
                    if attempt == 0 and fail:  # a full disk from here
                        size = tmp.stat().st_size
                        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
                    w.write(np.arange(8), "c")  # its own chunk fails
                    w.end_batch()
            except OSError as exc:
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
                print(type(exc).__name__, w.batch, tmp.stat().st_size == before > 0)
        w.write(np.arange(2), "a")

record(sys.argv[1] + "/failed/t.trace", True)
record(sys.argv[1] + "/whole/t.trace", False)
failed, whole = (Path(sys.argv[1], folder, "t.trace").read_bytes() for folder in ("failed", "whole"))
print(failed == whole)
"""


def test_a_block_of_writes_that_fails_takes_back_its_chunk_written_and_its_batches(tmp_path):
    """all_or_nothing: a block of writes whose later chunk fails (the file-size limit here, a
    full disk) takes back its writes before it, the chunk they wrote cut off the file, its batch
    ends and its tables; the block written again once there is room gives the trace, byte for
    byte, that a writer meeting no failure writes."""
    import subprocess
    import sys

    (tmp_path / "failed").mkdir()
    (tmp_path / "whole").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", _A_BLOCK_THAT_FAILS_THEN_ROOM, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.splitlines() == ["TierIOError 0 True", "True"], done.stdout + done.stderr


def _interrupt_at(function, text):
    """A tracer raising KeyboardInterrupt (a Ctrl-C) once, as ``function`` reaches its line
    holding ``text``."""
    import inspect
    import sys

    lines, first = inspect.getsourcelines(function)
    (at,) = [first + i for i, line in enumerate(lines) if text in line]

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == at:
            sys.settrace(None)
            raise KeyboardInterrupt
        return local

    return lambda frame, event, arg: local if frame.f_code is function.__code__ else None


@pytest.mark.parametrize("how", ["write", "end_chunk"])
def test_a_ctrl_c_after_a_chunk_is_written_before_it_is_listed_leaves_a_whole_trace(tmp_path, how):
    """A Ctrl-C after a chunk's bytes were written but before the chunk list took it left them in
    the file, past where the writer thought the data ended: the chunk written next went after
    them, and the trace closed was unreadable ("its chunks cover bytes [...]"). The interrupted
    write or end_chunk is cut off the file and takes nothing (end_chunk's records stay)."""
    import sys

    path = tmp_path / "t.trace"
    w = TraceWriter(path, chunk_ids=4)
    w.write(np.arange(2), "a")
    sys.settrace(_interrupt_at(TraceWriter._flush, "self._chunks.append("))
    try:
        with pytest.raises(KeyboardInterrupt):
            w.write(np.arange(2), "a") if how == "write" else w.end_chunk()
    finally:
        sys.settrace(None)
    w.write(np.arange(2, 4), "a")
    w.close()
    with TraceReader(path) as r:
        r.verify()
        got = [b.ids.tolist() for b in r.batches()]
    assert got == [[0, 1], [2, 3]]
