"""Recovering a trace from what a killed writer left: its hidden temporary's whole chunks.

A :class:`~tiered_store.trace.TraceWriter` writes to a temporary beside the trace and renames it
at close, so a writer killed before that leaves only the temporary, without its footer.
:func:`recover_trace` (``tiered-store recover-trace``) reads its chunks from the start with the
reader's own chunk checks, keeps every whole one up to the first torn or corrupt chunk, rebuilds
the footer and publishes a complete trace.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from .atomic_file import AtomicFile, write_step
from .errors import ConfigError, TierIOError, TraceFormatError
from .trace import _CHUNK_HEAD_SIZE, TraceChunk, TraceReader, _footer, _writer_alive

__all__ = ["TraceRecovery", "recover_trace"]


@dataclass(frozen=True)
class TraceRecovery:
    """What :func:`recover_trace` kept of a killed writer's leftover, and what it could not."""

    leftover: Path
    trace: Path
    chunks: int  # whole chunks kept: 0 .. chunks - 1
    records: int
    lookups: int
    batches: int  # 0 .. batches - 1; the last may lack the tables the writer had yet to write
    kept_bytes: int  # the leftover's bytes up to the end of the last chunk kept
    size: int  # the leftover's bytes
    stopped: str  # why chunk ``chunks`` was not kept ('' when the leftover was whole)
    lost_lookups: int  # the ids the readable chunk headers from there on count
    lost_chunks: int  # chunks from there on whose headers could be read
    lost_to_batch: int | None  # the last batch of the whole chunks from the stop on, if one decodes


@dataclass
class _Scan:
    """What :func:`_scan_leftover` found: the kept chunks' index and totals, where it stopped."""

    index: list[list[int]]
    per_table: np.ndarray  # ids per table, int64
    kept_bytes: int
    records: int = 0
    batches: int = 0
    stopped: str = ""
    lost_lookups: int = 0
    lost_chunks: int = 0
    lost_to_batch: int | None = None


def recover_trace(
    leftover: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> TraceRecovery:
    """Make a complete trace of what a writer killed before it closed left (``.NAME.HEX.tmp``
    beside NAME): every chunk from the start whose header and payload pass the reader's checks,
    up to the first one cut off or corrupt, under a rebuilt footer (``progress``: bars on stderr).

    ``out`` defaults to NAME beside the leftover; an existing file there is replaced only with
    ``overwrite`` (``ConfigError``), and a file a live writer is recording into is refused. The trace is published atomically and the leftover left as
    it was. A leftover without one whole chunk is a ``TraceFormatError`` saying where chunk 0
    stops, and nothing is written. Without a ``"tables"`` layout in its header, the tables (named
    only in the footer) are named by their index.
    """
    leftover = Path(leftover)
    if _writer_alive(Path(os.path.realpath(leftover))):  # a link's target (a loop: itself)
        raise ConfigError(
            f"{leftover}: a writer is recording into it now (it holds the file's lock); expected "
            "what a writer killed before it closed left: its trace appears once it closes "
            "(`tiered-store serve --record-trace` closes it on SIGTERM)"
        )
    out = _recovery_target(leftover, out, overwrite)
    try:  # a writer killed between its footer and the rename left a whole trace
        with TraceReader(leftover) as whole:
            whole_end: int | None = whole._data_end
    except TraceFormatError:
        whole_end = None
    writing = (f"cannot write {out}", "writing the recovered trace", "nothing was written there")
    with TraceReader._leftover(leftover) as reader:
        scan = _scan_leftover(reader, whole_end, progress)
        if not scan.index:
            raise reader._fail(
                f"no whole chunk to recover (chunk 0, at byte {scan.kept_bytes:,}: "
                f"{scan.stopped}); nothing was written"
            )
        with write_step(*writing):
            atomic = AtomicFile(out, "wb")
        try:
            with write_step(*writing):
                _copy_start(reader, atomic.file, scan.kept_bytes, out, progress)
                atomic.file.write(
                    _footer(
                        reader.tables,
                        scan.index,
                        scan.records,
                        scan.batches - 1,
                        scan.per_table.tolist(),
                    )
                )
                atomic.finish()
            TraceReader(atomic.tmp).close()  # its footer checks, as replay will check it
            atomic.publish()
        except BaseException:
            atomic.abort()
            raise
        size = reader._size
    return TraceRecovery(
        leftover=leftover,
        trace=out,
        chunks=len(scan.index),
        records=scan.records,
        lookups=int(scan.per_table.sum()),
        batches=scan.batches,
        kept_bytes=scan.kept_bytes,
        size=size,
        stopped=scan.stopped,
        lost_lookups=scan.lost_lookups,
        lost_chunks=scan.lost_chunks,
        lost_to_batch=scan.lost_to_batch,
    )


def _recovery_target(leftover: Path, out: str | os.PathLike[str] | None, overwrite: bool) -> Path:
    """The trace :func:`recover_trace` writes (NAME for ``.NAME.HEX.tmp`` unless ``out``),
    refused when it is the leftover, a directory, or exists without ``overwrite``."""
    if out is None:
        match = re.fullmatch(r"\.(.+)\.[0-9a-f]{12}\.tmp", leftover.name)
        if match is None:
            raise ConfigError(
                f"{leftover}: not named as a killed writer's leftover (.NAME.HEX.tmp), so the "
                "trace it was to become is unknown; expected --out TRACE"
            )
        out = leftover.with_name(match.group(1))
    out = Path(out)
    if out.exists() and leftover.exists() and out.samefile(leftover):
        raise ConfigError(f"output {out} is the leftover itself; expected another file")
    if out.is_dir():
        raise TierIOError(errno.EISDIR, f"output {out} is a directory; expected a file path")
    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} already exists; pass --overwrite to replace it")
    return out


def _scan_leftover(reader: TraceReader, whole_end: int | None, progress: bool) -> _Scan:
    """Decode a footerless trace's chunks from the start, with the reader's checks, up to the
    first that fails them (or ``whole_end``, where a whole trace's footer starts); then count
    what the readable chunk headers after it hold."""
    scan = _Scan([], np.zeros(len(reader.tables), np.int64), reader._data_start)
    named = "tables" in reader.header  # else the names were in the footer: name them by index
    # a header naming another index is refused below, not by the walk: the chunks past one
    # out of order are whole, and counted as lost
    heads = reader._chunk_heads(check_index=False)

    def decode(index: int, offset: int, fields: tuple[Any, ...]) -> TraceChunk:
        if not named:  # a chunk registers at most one new table per record
            reader.tables = [str(i) for i in range(scan.per_table.size + fields[3])]
            reader._last_ids = reader._declared_last_ids()
        return reader._decode_chunk(index, offset, fields, None)

    def lost(index: int, offset: int, fields: tuple[Any, ...]) -> None:
        """Count a chunk from the stop on: its header's ids, and its batches if it decodes."""
        scan.lost_lookups += fields[2]
        scan.lost_chunks += 1
        with suppress(TraceFormatError):
            batches = decode(index, offset, fields).records[:, 0]
            if batches.size:  # chunks out of order: the last one in the file is not the last
                scan.lost_to_batch = max(int(batches.max()), scan.lost_to_batch or 0)

    def reason(exc: TraceFormatError) -> str:
        where = f"trace {reader.path}, chunk {len(scan.index)}: "
        return str(exc).removeprefix(where)

    bar = tqdm(
        total=reader._size,
        unit="B",
        unit_scale=True,
        disable=not progress,
        desc=f"scan {reader.path.name}",
        leave=False,
    )
    with bar:
        bar.update(scan.kept_bytes)
        try:
            for index, offset, fields in heads:
                try:
                    reader._check_index(fields, index)
                    chunk = decode(index, offset, fields)
                    batch, table, n = (chunk.records[:, c] for c in range(3))
                    if scan.index and batch.size and batch[0] < scan.index[-1][4]:
                        raise reader._fail(
                            f"starts at batch {batch[0]}, after chunk {index - 1} ended at batch "
                            f"{scan.index[-1][4]}; expected batches that only go forward",
                            index,
                        )
                except TraceFormatError as exc:
                    scan.stopped = reason(exc)
                    lost(index, offset, fields)  # whole, if only out of order
                    break
                previous = scan.index[-1][4] if scan.index else 0
                first, last = (int(batch[0]), int(batch[-1])) if batch.size else (previous,) * 2
                scan.index.append([offset, int(n.sum()), int(batch.size), first, last])
                grow = int(table.max(initial=-1)) + 1 - scan.per_table.size
                scan.per_table = np.pad(scan.per_table, (0, max(grow, 0)))
                np.add.at(scan.per_table, table, n)
                scan.records += int(batch.size)
                scan.batches = last + 1 if batch.size else scan.batches
                end = offset + _CHUNK_HEAD_SIZE + fields[8]
                bar.update(end - scan.kept_bytes)
                scan.kept_bytes = end
        except TraceFormatError as exc:  # a chunk header missing, cut off or corrupt
            if scan.kept_bytes != whole_end:
                scan.stopped = reason(exc)
            heads.close()
        try:  # what the readable headers past a chunk that failed its checks count
            for index, offset, fields in heads:
                lost(index, offset, fields)
        except TraceFormatError:
            pass
    if not named:
        reader.tables = [str(i) for i in range(scan.per_table.size)]
    return scan


def _copy_start(reader: TraceReader, file: BinaryIO, end: int, out: Path, progress: bool) -> None:
    """Copy the first ``end`` bytes of the reader's file to ``file`` (a bar on stderr)."""
    bar = tqdm(
        total=end,
        unit="B",
        unit_scale=True,
        disable=not progress,
        desc=f"write {out.name}",
        leave=False,
    )
    with bar:
        pos = 0
        while pos < end:
            block = reader._pread(pos, min(8 << 20, end - pos))
            if not block:
                raise reader._fail(f"shrank to {pos:,} bytes while it was being recovered")
            file.write(block)
            pos += len(block)
            bar.update(len(block))
