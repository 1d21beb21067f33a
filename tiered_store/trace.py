"""Access traces: the stream of Engram row ids a model requests, chunked and zstd-compressed.

A trace records, batch by batch, the row ids each Engram table (or layer) is asked for, in request
order. It is written once, streamed many times (profiles, miss-ratio curves, replay), and never
needs to fit in RAM.

On-disk layout (all integers little-endian)
-------------------------------------------
::

    preamble   8s magic b"ENGTRACE" | u16 format version (1) | u16 reserved | u32 header length
    header     header length bytes of UTF-8 JSON | u32 CRC-32 of those bytes
    chunk 0    chunk header (48 bytes, below) | compressed payload
    chunk 1    ...
    footer     UTF-8 JSON: chunk index and totals
    trailer    u64 footer length | u32 CRC-32 of the footer | u32 reserved | 8s b"ENGTREND"

The **header** JSON is the caller's dict plus ``"magic": "engram-trace"`` and
``"format_version": 1``. By convention it holds ``"tables"``: a list of table names or of dicts
with at least ``"name"`` (and, as the caller sees fit, ``"rows"``, ``"dim"``, ``"heads"``,
``"primes"``, ``"offsets"``, ``"layer"``; ``"rows"``, ``"dim"`` and ``"heads"`` integers >= 1 where given), ``"config"`` and ``"tokenizer"``. When ``"tables"`` is given, writes
must name one of those tables, and ids are checked against a table's ``"rows"`` when present
(by the writer, and by the reader as it decodes each chunk);
without it, tables are registered by name as they are first written.

A **chunk header** is ``4s b"TRCK" | u32 chunk index | u64 ids | u32 records | u8 id width (4 or
8) | u8 flags (bit 0: byte-shuffled) | u16 reserved | u64 raw payload bytes | u64 compressed bytes
| u32 CRC-32 of the compressed payload | u32 CRC-32 of the 44 header bytes before it``.
The **payload** (one zstd frame) is the record table, ``records x 8`` int64 rows of
``(batch, table index, ids, ndim, dim0, dim1, dim2, dim3)``, followed by the chunk's ids, record
after record, as unsigned integers of the chunk's width, byte-shuffled (all first bytes, then all
second bytes, ...) because row ids are random in their low bytes and constant in their high ones:
shuffled 4-byte ids of a 10M-row table compress to about 2.9 bytes per id at 0.7 GB/s.

A **record** is one :meth:`TraceWriter.write` call: one table's ids for one batch, in the shape
written (``[batch, seq, heads]`` keeps sequence boundaries). Records are never split across
chunks; a record larger than the chunk size gets a chunk of its own.

The **footer** JSON holds ``"tables"`` (names, in table-index order), ``"chunks"`` (one
``[offset, ids, records, first batch, last batch]`` per chunk) and ``"totals"`` (``lookups``,
``records``, ``batches``, ``per_table``). A trace is written to a temporary name beside the
target, fsynced and renamed, so a file with this name is complete; a truncated or corrupt one
raises :class:`~tiered_store.errors.TraceFormatError` naming the file and the chunk. Of the
temporary a writer killed before it closed leaves, :func:`recover_trace` makes a complete trace:
its chunks from the start that check, up to the first one cut off or corrupt, under a new footer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import reprlib
import stat
import struct
import time
import weakref
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import zstandard
from tqdm.auto import tqdm

from .atomic_file import (
    AtomicFile,
    hidden_temporaries,
    open_lock,
    special_kind,
    what_is,
    write_step,
)
from .errors import ConfigError, RowIdError, TierIOError, TraceFormatError
from .integers import as_integer
from .npy_files import load_npy
from .process_locks import open_held, release

__all__ = [
    "FORMAT_VERSION",
    "TraceBatch",
    "TraceChunk",
    "TraceReader",
    "TraceWriter",
    "trace_from_npy",
    "trace_to_npy",
]

FORMAT_VERSION = 1
MAGIC = b"ENGTRACE"
HEADER_MAGIC = "engram-trace"
END_MAGIC = b"ENGTREND"
CHUNK_MAGIC = b"TRCK"

_PREAMBLE = struct.Struct("<8sHHI")  # magic, version, reserved, header length
_CHUNK_HEAD = struct.Struct("<4sIQIBBHQQI")  # 44 bytes; followed by u32 CRC of these bytes
_CHUNK_HEAD_SIZE = _CHUNK_HEAD.size + 4
_TRAILER = struct.Struct("<QII8s")  # footer length, footer CRC, reserved, end magic
_META_COLS = 8  # batch, table, ids, ndim, dim0..dim3
_MAX_NDIM = 4
_SHUFFLED = 1

_CHUNK_ENTRY = "[offset, ids, records, first batch, last batch]"  # a footer chunk: 5 integers
_TOO_DEEP = (  # a header or footer json cannot parse or write (RecursionError)
    "nested deeper than Python's recursion limit lets JSON read or write it; expected a JSON "
    "object of a few levels"
)

DEFAULT_CHUNK_IDS = 1 << 22  # ids per chunk before it is flushed (32 MiB of int64)
DEFAULT_LEVEL = 3  # zstd level: ~0.7 GB/s on shuffled ids, within 5% of level 9's ratio


@dataclass(frozen=True)
class TraceBatch:
    """One record: the ids one table was asked for in one batch, in the shape they were written."""

    batch: int
    table: str
    table_index: int
    ids: np.ndarray  # int64


@dataclass(frozen=True)
class TraceChunk:
    """One decoded chunk: its record table and its ids, flat, in request order."""

    index: int
    records: np.ndarray  # [records, 8] int64: batch, table, ids, ndim, dim0..dim3
    ids: np.ndarray  # [ids] int64

    def table_ids(self, table_index: int) -> np.ndarray:
        """The chunk's ids of one table, in request order."""
        tables = self.records[:, 1]
        if (tables == table_index).all():
            return self.ids
        counts = self.records[:, 2]
        mask = np.repeat(tables == table_index, counts)
        return self.ids[mask]


def _no_folder(folder: Path) -> str:
    """Why ``folder``, not a directory, cannot hold a file: it is not a folder, or not there."""
    return "is not a folder" if folder.exists() else "does not exist"


def _shuffle(ids: np.ndarray, width: int) -> bytes:
    """Byte-shuffle ``ids`` as unsigned ``width``-byte integers."""
    raw = ids.astype(f"<u{width}", copy=False)
    return raw.view(np.uint8).reshape(-1, width).T.tobytes()


def _is_chunk_entry(entry: Any) -> bool:
    """Whether a footer chunk entry is a list of five ints (not bools)."""
    return type(entry) is list and len(entry) == 5 and all(type(v) is int for v in entry)


def _unshuffle(buf: bytes | memoryview, n: int, width: int) -> np.ndarray:
    """Invert :func:`_shuffle`, giving int64."""
    planes = np.frombuffer(buf, dtype=np.uint8, count=n * width).reshape(width, n)
    return np.ascontiguousarray(planes.T).view(f"<u{width}").reshape(n).astype(np.int64)


def _footer(
    tables: list[str], chunks: list[list[int]], records: int, last_batch: int, per_table: list[int]
) -> bytes:
    """The footer and trailer that close a trace: its tables, chunk index and totals."""
    footer = json.dumps(
        {
            "tables": tables,
            "chunks": chunks,
            "totals": {
                "lookups": sum(per_table),
                "records": records,
                "batches": last_batch + 1,
                "per_table": dict(zip(tables, per_table, strict=True)),
            },
        }
    ).encode()
    return footer + _TRAILER.pack(len(footer), zlib.crc32(footer), 0, END_MAGIC)


class TraceWriter:
    """Write an access trace, chunk by chunk, atomically.

    Parameters
    ----------
    path : str or Path
        Destination, in a folder that is there (a missing one is a ``TierIOError`` naming it,
        not made). Nothing appears under this name until :meth:`close` succeeds.
    header : dict, optional
        JSON-serialisable description of where the trace came from: ``"tables"`` (layout:
        names or dicts with ``"name"``, ``"rows"``, ``"heads"``, ``"primes"``, ``"offsets"``),
        ``"config"``, ``"tokenizer"``, anything else. The keys ``"magic"`` and
        ``"format_version"`` are reserved.
    chunk_ids : int
        Ids buffered before a chunk is compressed and written (default 4Mi = 32 MiB of int64).
    level : int
        zstd compression level, -131072 to 22 (negative: faster).

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "t.trace")
    >>> layout = {"tables": [{"name": "layer2", "rows": 1000}, {"name": "layer15", "rows": 1000}]}
    >>> with TraceWriter(path, layout) as w:
    ...     w.write(np.array([[1, 2], [3, 4]]), "layer2")
    ...     w.write(np.array([[5, 6], [7, 8]]), "layer15")
    ...     _ = w.end_batch()
    ...     w.write(np.array([[1, 9], [9, 9]]), "layer2")
    >>> r = TraceReader(path)
    >>> r.n_lookups, r.n_batches, r.tables
    (12, 2, ['layer2', 'layer15'])
    >>> [(b.batch, b.table, b.ids.shape) for b in r.batches()]
    [(0, 'layer2', (2, 2)), (0, 'layer15', (2, 2)), (1, 'layer2', (2, 2))]
    >>> np.concatenate(list(r.ids("layer2"))).tolist()
    [1, 2, 3, 4, 1, 9, 9, 9]
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        header: Mapping[str, Any] | None = None,
        *,
        chunk_ids: int = DEFAULT_CHUNK_IDS,
        level: int = DEFAULT_LEVEL,
    ) -> None:
        self.path = Path(path)
        header = dict(header or {})
        for key in ("magic", "format_version"):
            if key in header:
                raise TraceFormatError(f"trace header key {key!r} is reserved; remove it")
        if (chunk := as_integer(chunk_ids)) is None or chunk < 1:  # int() took 2.5 as 2, True as 1
            raise ValueError(f"chunk_ids: got {chunk_ids!r}; expected a positive integer")
        zstd_level = as_integer(level)  # zstandard's errors named nothing; it took True as 1
        fastest = -zstandard.TARGETLENGTH_MAX  # zstd's ZSTD_minCLevel(); below, it is clamped
        if zstd_level is None or not fastest <= zstd_level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(
                f"level: got {level!r}; expected a zstd compression level, an integer in "
                f"[{fastest}, {zstandard.MAX_COMPRESSION_LEVEL}] (negative: faster)"
            )
        self._layout = self._parse_layout(header.get("tables"))
        self._tables: list[str] = [t["name"] for t in self._layout] if self._layout else []
        self._table_rows: list[int | None] = [t.get("rows") for t in self._layout or []]
        full = {"magic": HEADER_MAGIC, "format_version": FORMAT_VERSION, **header}
        try:
            head = json.dumps(full, sort_keys=False).encode()
        except (TypeError, ValueError) as exc:
            raise TraceFormatError(
                f"trace header for {self.path} is not JSON-serialisable: {exc}"
            ) from None
        except RecursionError:
            raise TraceFormatError(f"trace header for {self.path} is {_TOO_DEEP}") from None
        self._chunk_ids = chunk
        self._compressor = zstandard.ZstdCompressor(level=zstd_level)
        self._buf_ids: list[np.ndarray] = []
        self._buf_meta: list[list[int]] = []
        self._buf_n = 0
        self._chunks: list[list[int]] = []
        self._per_table: list[int] = [0] * len(self._tables)
        self._batch = 0
        self._last_batch = -1
        self._records = 0
        self._closed = False
        self.chunk_written_at = time.monotonic()  # the last chunk written (or the writer opened)
        if not self.path.parent.is_dir():  # not made: a typo's whole chain of folders
            raise TierIOError(
                errno.ENOENT,
                f"cannot write trace {self.path}: its folder {self.path.parent} "
                f"{_no_folder(self.path.parent)}; "
                "expected an existing folder",
                str(self.path),
            )
        self._out = AtomicFile(self.path, "wb")
        self._file: BinaryIO = self._out.file
        # held up to the rename (past the file's close): a reader tells this live writer's
        # temporary from one a killed writer left (the kernel drops the lock when it dies; a
        # writer dropped unclosed drops it when collected; a forked child never holds it)
        lock = open_lock(self._out.tmp, self._file)
        if lock is None:  # removed as it was made: no cleanup takes a trace's, so never
            self._out.abort()
            raise TierIOError(errno.ENOENT, f"cannot write trace {self.path}: its temporary "
                              "vanished as it was made", str(self.path))  # fmt: skip
        self._unlock = weakref.finalize(self, release, lock)  # once: close, abort, collection
        self._end = 0  # the bytes written whole: a failed write's are cut off (``_append``)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(head))
            self._append("writing its header", preamble, head, struct.pack("<I", zlib.crc32(head)))
        except BaseException:  # a full disk: no temporary left behind
            self.abort()
            raise

    @staticmethod
    def _parse_layout(tables: Any) -> list[dict[str, Any]] | None:
        """Normalise the header's ``tables`` to a list of dicts with a unique ``name``."""
        if tables is None:
            return None
        if not isinstance(tables, list | tuple) or not tables:
            raise TraceFormatError(
                f"trace header 'tables': got {tables!r}; expected a non-empty list"
            )
        out = []
        for i, t in enumerate(tables):
            entry = (
                {"name": t} if isinstance(t, str) else dict(t) if isinstance(t, Mapping) else None
            )
            if entry is None or not isinstance(entry.get("name"), str):
                raise TraceFormatError(
                    f"trace header 'tables[{i}]': got {t!r}; expected a name or a dict with 'name'"
                )
            rows = entry.get("rows")
            if rows is not None and (
                not isinstance(rows, int) or isinstance(rows, bool) or rows < 1
            ):
                raise TraceFormatError(
                    f"trace header 'tables[{i}].rows': got {rows!r}; expected an integer >= 1 "
                    "(or null: ids not checked against a table size)"
                )
            for key, what in (
                ("dim", "values per row"),  # the row width replay and tier sizing check against
                ("heads", "lookups per token, which replay's --batch-tokens counts in"),
            ):
                value = entry.get(key)
                if value is not None and (
                    not isinstance(value, int) or isinstance(value, bool) or value < 1
                ):
                    raise TraceFormatError(
                        f"trace header 'tables[{i}].{key}': got {value!r}; expected an integer "
                        f">= 1 ({what}, or null: not given)"
                    )
            out.append(entry)
        names = [t["name"] for t in out]
        if len(set(names)) != len(names):
            raise TraceFormatError(f"trace header 'tables': duplicate names in {names}")
        return out

    @property
    def batch(self) -> int:
        """Index of the batch the next :meth:`write` belongs to."""
        return self._batch

    def _table_index(self, table: str | int) -> int:
        """Resolve a table name or index (a position in the table list, as readers take it),
        registering it when there is no layout: the next index registers as its own name."""
        if isinstance(table, int | np.integer) and not isinstance(table, bool):
            if 0 <= table < len(self._tables):
                return int(table)
            if self._layout is not None:
                raise TraceFormatError(
                    f"{self.path}: table index {table} out of range; the header lists "
                    f"{len(self._tables)} tables"
                )
            if table != len(self._tables):
                raise TraceFormatError(
                    f"{self.path}: table index {table} with {len(self._tables)} tables written so "
                    f"far; expected an index up to {len(self._tables)} (tables are numbered in the "
                    "order they are first written; readers take an index as that position) or "
                    "a table name"
                )
            table = str(int(table))
        if not isinstance(table, str):
            raise TraceFormatError(f"{self.path}: table {table!r}; expected a name or an index")
        try:
            return self._tables.index(table)
        except ValueError:
            if self._layout is not None:
                raise TraceFormatError(
                    f"{self.path}: table {table!r} is not in the header's tables {self._tables}"
                ) from None
        self._tables.append(table)
        self._per_table.append(0)
        self._table_rows.append(None)
        return len(self._tables) - 1

    def write(self, ids: np.ndarray, table: str | int = 0, *, batch: int | None = None) -> None:
        """Append one record: ``table``'s ids for the current batch (or batch ``batch``, which may
        not go back), any integer shape up to 4-D. A write refused, or whose chunk could not be
        written (a full disk: a ``TierIOError``), leaves the trace as it was (its batch, its
        tables, its records): write it again once there is room."""
        if self._closed:
            raise TraceFormatError(f"{self.path}: write after close")
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise RowIdError(f"{self.path}: row ids of dtype {ids.dtype}; expected integers")
        if ids.ndim > _MAX_NDIM:
            raise TraceFormatError(
                f"{self.path}: ids of {ids.ndim} dims; expected at most {_MAX_NDIM}"
            )
        if batch is not None:
            given, batch = batch, as_integer(batch)
            if batch is None or not 0 <= batch < 2**63:  # 2.5 was written as batch 2, True as 1
                raise TraceFormatError(
                    f"{self.path}: batch {given!r}; expected a batch index, an integer in "
                    "[0, 2**63)"
                )
            if batch < self._batch:
                raise TraceFormatError(
                    f"{self.path}: batch {batch} after batch {self._batch}; batches only go forward"
                )
        flat = ids.reshape(-1)
        lo, hi = (int(flat.min()), int(flat.max())) if flat.size else (0, 0)
        state = self._state()  # all_or_nothing, without a generator per record
        try:
            t = self._table_index(table)  # registers a new name (no layout: its rows not given)
            rows = self._table_rows[t]
            if lo < 0 or hi >= 2**63 or (rows is not None and hi >= rows):
                bound = f"[0, {rows})" if rows is not None else "in [0, 2**63) (int64)"
                raise RowIdError(
                    f"{self.path}: table {self._tables[t]!r} ids span [{lo}, {hi}]; "
                    f"expected {bound}"
                )
            shape = list(ids.shape) + [0] * (_MAX_NDIM - ids.ndim)
            if self._buf_n and self._buf_n + flat.size > self._chunk_ids:
                self._flush()  # the records before this one
            if batch is not None:
                self._batch = batch
            self._buf_ids.append(np.array(flat, dtype=np.int64))  # a copy: callers reuse buffers
            self._buf_meta.append([self._batch, t, flat.size, ids.ndim, *shape])
            self._buf_n += flat.size
            self._per_table[t] += flat.size
            self._records += 1
            self._last_batch = self._batch
            if self._buf_n >= self._chunk_ids:
                self._flush()
        except BaseException:
            self._restore(state)
            raise

    @contextlib.contextmanager
    def all_or_nothing(self) -> Iterator[TraceWriter]:
        """Keep the writes and batch ends made in the block together: one that fails (a full
        disk's ``TierIOError``, a refused write, a Ctrl-C) takes the trace back to where it was
        before the block (its file, chunks, records, batch and tables), then raises."""
        state = self._state()
        try:
            yield self
        except BaseException:
            self._restore(state)
            raise

    def _state(self) -> tuple[Any, ...]:
        """Where the writer is, for ``_restore`` to take it back there."""
        return (  # the buffer's lists themselves: a chunk written leaves them, takes new ones
            self._end,
            len(self._chunks),
            self._buf_ids,
            self._buf_meta,
            len(self._buf_meta),
            self._buf_n,
            list(self._per_table),
            self._records,
            self._batch,
            self._last_batch,
            len(self._tables),
            self.chunk_written_at,
        )

    def _restore(self, state: tuple[Any, ...]) -> None:
        """Take the writer back to ``state`` (``_state``'s), its chunks written since
        cut off the file."""
        end, chunks, ids, meta, n, buf_n, per_table, records, batch, last, tables, at = state
        if self._end != end and not self._closed:
            with contextlib.suppress(OSError):  # shrinking needs no room
                os.ftruncate(self._file.fileno(), end)
        del self._chunks[chunks:], ids[n:], meta[n:]
        del self._tables[tables:], self._table_rows[tables:]
        self._end, self._buf_ids, self._buf_meta, self._buf_n = end, ids, meta, buf_n
        self._per_table, self._records = per_table, records
        self._batch, self._last_batch, self.chunk_written_at = batch, last, at

    def end_batch(self) -> int:
        """Close the current batch; returns the index of the next one."""
        self._batch += 1
        return self._batch

    def end_chunk(self) -> None:
        """Write the records buffered so far as a chunk now, however few (none: nothing), so a
        writer killed later loses none of them (:func:`recover_trace`); records stay whole."""
        if self._closed:
            raise TraceFormatError(f"{self.path}: end_chunk after close")
        with self.all_or_nothing():  # a Ctrl-C after its bytes: cut off, its records kept
            self._flush()

    def _flush(self) -> None:
        """Compress and write the buffered records as one chunk, handed to the OS (no fsync):
        :func:`recover_trace` finds it in what a writer killed after it left."""
        if not self._buf_meta:
            return
        ids = np.concatenate(self._buf_ids) if len(self._buf_ids) > 1 else self._buf_ids[0]
        meta = np.asarray(self._buf_meta, dtype="<i8")
        width = 4 if ids.size == 0 or int(ids.max()) < (1 << 32) else 8
        raw = meta.tobytes() + _shuffle(ids, width)
        payload = self._compressor.compress(raw)
        index = len(self._chunks)
        head = _CHUNK_HEAD.pack(
            CHUNK_MAGIC,
            index,
            ids.size,
            len(meta),
            width,
            _SHUFFLED,
            0,
            len(raw),
            len(payload),
            zlib.crc32(payload),
        )
        offset = self._end  # to the OS, not a buffer: a writer killed loses no whole chunk
        self._append(f"writing chunk {index}", head + struct.pack("<I", zlib.crc32(head)), payload)
        self._chunks.append([offset, int(ids.size), len(meta), int(meta[0, 0]), int(meta[-1, 0])])
        self._buf_ids, self._buf_meta, self._buf_n = [], [], 0
        self.chunk_written_at = time.monotonic()

    def _append(self, step: str, *parts: bytes) -> None:
        """Write ``parts`` at the end of what is written whole, straight to the OS; a write that
        fails (a full disk, a Ctrl-C) is cut off, so the next one (``step`` again) goes there."""
        fd = self._file.fileno()
        at = self._end
        try:
            with write_step(*self._writing(step)):
                for part in parts:
                    view = memoryview(part).cast("B")
                    while view:  # a write near a full disk may write part of it
                        written = os.pwrite(fd, view, at)
                        view, at = view[written:], at + written
        except BaseException:
            with contextlib.suppress(OSError):  # shrinking needs no room
                os.ftruncate(fd, self._end)
            raise
        self._end = at

    def _writing(self, step: str) -> tuple[str, str, str]:
        """``write_step``'s arguments for ``step`` of this trace."""
        return f"cannot write trace {self.path}", step, "nothing was published under its name"

    def close(self) -> None:
        """Flush, write the footer, fsync and rename into place."""
        if self._closed:
            return
        try:
            self._flush()
            footer = _footer(
                self._tables, self._chunks, self._records, self._last_batch, self._per_table
            )
            self._append("writing its footer", footer)
            with write_step(*self._writing("writing its footer")):
                self._out.commit()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._unlock()

    def abort(self) -> None:
        """Discard the partial trace; the destination is left untouched."""
        self._closed = True
        self._out.abort()
        self._unlock()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TraceReader:
    """Stream an access trace written by :class:`TraceWriter` without loading it whole.

    Opening checks the preamble, header and footer; each chunk's checksums are checked when it is
    read (:meth:`verify` reads them all). Problems raise
    :class:`~tiered_store.errors.TraceFormatError` naming the file and, where one is at fault, the
    chunk index.

    Parameters
    ----------
    path : str or Path
        A trace file.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "t.trace")
    >>> with TraceWriter(path, {"tables": ["a", "b"], "tokenizer": "deepseek-v3"}) as w:
    ...     for step in range(3):
    ...         w.write(np.full((2, 4), step), "a")
    ...         w.write(np.full((2, 4), 10 + step), "b")
    ...         _ = w.end_batch()
    >>> with TraceReader(path) as r:
    ...     print(r.header["tokenizer"], r.n_lookups, r.lookups("b"))
    ...     print(sum(chunk.size for chunk in r.ids("a")))
    ...     print([(b.batch, b.table, int(b.ids[0, 0])) for b in r.batches("b")])
    deepseek-v3 48 24
    24
    [(0, 'b', 10), (1, 'b', 11), (2, 'b', 12)]
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._open(path)
        try:
            self.header = self._read_header()
            footer = self._read_footer()
            self.tables: list[str] = list(footer["tables"])
            self._last_ids = self._declared_last_ids()
            self.chunk_index: list[list[int]] = self._check_chunk_index(footer["chunks"])
            totals = footer["totals"]
            self.n_lookups: int = int(totals["lookups"])
            self.n_records: int = int(totals["records"])
            self.n_batches: int = int(totals["batches"])
            self._per_table: dict[str, int] = self._check_per_table(totals["per_table"])
            self._check_extent()
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            self._file.close()
            if isinstance(exc, TraceFormatError):
                raise
            raise TraceFormatError(f"trace {self.path}: malformed footer ({exc!r})") from None
        except BaseException:
            self._file.close()
            raise
        self._decompressor = zstandard.ZstdDecompressor()

    @classmethod
    def _leftover(cls, path: str | os.PathLike[str]) -> TraceReader:
        """A reader of a trace without a footer (what a killed writer left): its header checked,
        its tables the header's (none when it lists none), no chunks yet; see :func:`recover_trace`."""
        self = cls.__new__(cls)
        self._open(path)
        try:
            self.header = self._read_header()
            layout = TraceWriter._parse_layout(self.header.get("tables"))
            self.tables = [t["name"] for t in layout] if layout is not None else []
            self._last_ids = self._declared_last_ids()
        except BaseException:
            self._file.close()
            raise
        self.chunk_index = []
        self._data_end = self._size
        self._decompressor = zstandard.ZstdDecompressor()
        return self

    # -- opening ---------------------------------------------------------------------------------

    def _open(self, path: str | os.PathLike[str]) -> None:
        """Open the file and take its size; a missing one names what a killed writer left, one
        that is not a regular file (a FIFO's open would wait for a writer forever) is refused.
        A regular file under another's lease (a file server's) is opened once the lease is let
        go, as any open waits for it."""
        self.path = Path(path)
        try:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except BlockingIOError:  # only a lease refuses a non-blocking read-only open
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise TraceFormatError(
                f"trace {self.path}: cannot open ({exc.strerror}){_left_behind(self.path)}"
            ) from None
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise TraceFormatError(  # as open() said it
                    f"trace {self.path}: cannot open ({os.strerror(errno.EISDIR)})"
                    f"{_left_behind(self.path)}"
                )
            if not stat.S_ISREG(info.st_mode):
                raise TraceFormatError(
                    f"trace {self.path}: cannot open (it is "
                    f"{special_kind(info.st_mode) or 'not a regular file'}); expected a trace file"
                )
            os.set_blocking(fd, True)
            self._file: BinaryIO = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        self._size = info.st_size

    def _fail(self, what: str, chunk: int | None = None) -> TraceFormatError:
        """An error naming the file (and chunk)."""
        where = f"trace {self.path}" + (f", chunk {chunk}" if chunk is not None else "")
        return TraceFormatError(f"{where}: {what}")

    def _pread(self, offset: int, size: int) -> bytes:
        """Read exactly what is there of ``size`` bytes at ``offset``; a failed read (a disk
        error) is a TierIOError naming the trace, not an error of what the ids are written to."""
        try:
            return os.pread(self._file.fileno(), size, offset)
        except OSError as exc:
            raise TierIOError(
                exc.errno or errno.EIO,
                f"trace {self.path}: cannot read {size:,} bytes at byte {offset:,} "
                f"({exc.strerror or exc}); expected a readable file",
            ) from exc

    def _read_header(self) -> dict[str, Any]:
        """Check the preamble and return the header dict."""
        pre = self._pread(0, _PREAMBLE.size)
        if len(pre) < _PREAMBLE.size:
            raise self._fail(f"truncated: {self._size} bytes is shorter than the preamble")
        magic, version, _, head_len = _PREAMBLE.unpack(pre)
        if magic != MAGIC:
            raise self._fail(f"not a trace file (magic {magic!r}; expected {MAGIC!r})")
        if version != FORMAT_VERSION:
            raise self._fail(
                f"format version {version}; this reader reads version {FORMAT_VERSION}"
            )
        raw = self._pread(_PREAMBLE.size, head_len + 4)
        if len(raw) < head_len + 4:
            raise self._fail("truncated inside the header")
        head, (crc,) = raw[:head_len], struct.unpack("<I", raw[head_len:])
        if zlib.crc32(head) != crc:
            raise self._fail("header checksum mismatch (corrupt header)")
        try:
            header = json.loads(head)
        except ValueError:
            raise self._fail("header is not valid JSON") from None
        except RecursionError:  # json.loads parses nested arrays and objects recursively
            raise self._fail(f"header is {_TOO_DEEP}") from None
        if not isinstance(header, dict):
            raise self._fail(f"header is {json.dumps(header)[:40]}; expected a JSON object")
        if header.get("magic") != HEADER_MAGIC:
            raise self._fail(f"header magic {header.get('magic')!r}; expected {HEADER_MAGIC!r}")
        try:  # the table layout the writer checks (a foreign writer's may not hold)
            TraceWriter._parse_layout(header.get("tables"))
        except TraceFormatError as exc:
            raise self._fail(str(exc)) from None
        self._data_start = _PREAMBLE.size + head_len + 4
        return header

    def _read_footer(self) -> dict[str, Any]:
        """Read the footer, or find which chunk is broken when it is missing."""
        tail = (
            self._pread(self._size - _TRAILER.size, _TRAILER.size)
            if self._size >= _TRAILER.size
            else b""
        )
        if len(tail) == _TRAILER.size:
            foot_len, crc, _, end = _TRAILER.unpack(tail)
            start = self._size - _TRAILER.size - foot_len
            if end == END_MAGIC and start >= self._data_start:
                raw = self._pread(start, foot_len)
                if zlib.crc32(raw) == crc:
                    try:
                        footer = json.loads(raw)
                    except RecursionError:
                        raise self._malformed(_TOO_DEEP) from None
                    self._data_end = start
                    return footer
                raise self._fail("footer checksum mismatch (corrupt footer)")
        raise self._scan_for_damage()

    def _check_chunk_index(self, chunks: Any) -> list[list[int]]:
        """The footer's chunk list, checked whole before any chunk is read (and any offset used)."""
        if not isinstance(chunks, list):
            raise self._malformed(f"chunks is {type(chunks).__name__}; expected a list")
        if not chunks:
            return chunks
        table = np.array(chunks, dtype=object)  # [chunks, 5] when every entry has five fields
        shaped = table.ndim == 2 and table.shape[1] == 5
        if not shaped or set(map(type, table.ravel().tolist())) != {int}:  # bool is not int here
            i = next(i for i, c in enumerate(chunks) if not _is_chunk_entry(c))
            raise self._malformed(
                f"chunk {i} is {reprlib.repr(chunks[i])}; expected {_CHUNK_ENTRY}, integers"
            )
        try:
            values = table.astype(np.int64)
        except OverflowError:
            i = next(i for i, c in enumerate(chunks) if not all(-(2**63) <= v < 2**63 for v in c))
            raise self._malformed(
                f"chunk {i} is {reprlib.repr(chunks[i])}; expected {_CHUNK_ENTRY}, integers "
                "that fit int64"
            ) from None
        offsets = values[:, 0]
        outside = (offsets < self._data_start) | (offsets >= self._data_end)
        if outside.any():
            i = int(outside.argmax())
            raise self._malformed(
                f"chunk {i} at offset {offsets[i]}; expected an offset inside the data, bytes "
                f"[{self._data_start:,}, {self._data_end:,})"
            )
        back = np.diff(offsets) <= 0
        if back.any():
            i = int(back.argmax()) + 1
            raise self._malformed(
                f"chunk {i} at offset {offsets[i]}, chunk {i - 1} at {offsets[i - 1]}; expected "
                "offsets that increase chunk by chunk"
            )
        negative = (values[:, 1:3] < 0).any(axis=1)
        if negative.any():
            i = int(negative.argmax())
            raise self._malformed(
                f"chunk {i} holds {values[i, 1]} ids in {values[i, 2]} records; expected counts "
                ">= 0"
            )
        back = values[1:, 3] < values[:-1, 4]  # each chunk's records are checked against these
        if back.any():
            i = int(back.argmax()) + 1
            raise self._malformed(
                f"chunk {i} starts at batch {values[i, 3]}, chunk {i - 1} ends at batch "
                f"{values[i - 1, 4]}; expected batches that only go forward"
            )
        return chunks

    def _declared_last_ids(self) -> np.ndarray:
        """Each footer table's last valid id: its rows - 1 as the header's layout gives them, and
        2**63 - 1 (int64's, which the writer takes) where it gives none or more; a layout that is
        not the footer's tables, in order, is refused."""
        declared = self.header.get("tables")
        if declared is None:
            return np.full(len(self.tables), 2**63 - 1, dtype=np.int64)
        layout = TraceWriter._parse_layout(declared)  # checked when the header was read
        names = [t["name"] for t in layout]
        if names != self.tables:
            raise self._malformed(f"tables {self.tables}; expected the header's tables {names}")
        return np.array([min(t.get("rows") or 2**63, 2**63) - 1 for t in layout], dtype=np.int64)

    def _check_per_table(self, per_table: Any) -> dict[str, int]:
        """The footer's ids per table, checked: a count for each table, adding up to the lookups."""
        if not isinstance(per_table, dict):
            raise self._malformed(
                f"totals.per_table is {type(per_table).__name__}; expected an object of "
                "table name: ids"
            )
        if set(per_table) != set(self.tables):
            raise self._malformed(
                f"totals.per_table counts the ids of tables {list(per_table)}; expected the "
                f"footer's tables {self.tables}"
            )
        for name, n in per_table.items():
            if type(n) is not int or not 0 <= n < 2**63:  # bool is not int here
                raise self._malformed(
                    f"totals.per_table[{name!r}] is {reprlib.repr(n)}; expected a count of ids, "
                    "an integer in [0, 2**63)"
                )
        if sum(per_table.values()) != self.n_lookups:
            raise self._malformed(
                f"totals.per_table adds up to {sum(per_table.values())} ids; expected "
                f"totals.lookups, {self.n_lookups}"
            )
        return per_table

    def _malformed(self, what: str) -> TraceFormatError:
        """A malformed-footer error naming the file."""
        return self._fail(f"malformed footer ({what})")

    def _scan_for_damage(self) -> TraceFormatError:
        """Walk chunk headers from the start; name the first chunk that is cut off or corrupt."""
        try:
            for index, offset, fields in self._chunk_heads():
                end = offset + _CHUNK_HEAD_SIZE + fields[8]
                if end > self._size:
                    return self._fail(
                        f"truncated: chunk needs bytes {offset}..{end}, file has {self._size}",
                        index,
                    )
        except TraceFormatError as exc:
            return exc
        raise AssertionError("unreachable: the walk ends by raising")  # pragma: no cover

    def _chunk_heads(
        self, *, check_index: bool = True
    ) -> Iterator[tuple[int, int, tuple[Any, ...]]]:
        """Walk a trace's chunk headers from the start, as if it had no footer: each chunk's index,
        offset and checked header (its payload may run past the file's end), until a header that
        is missing, cut off or corrupt, which is raised naming the chunk and its byte.
        ``check_index=False``: a header naming another index is yielded (the caller checks it)."""
        offset, index = self._data_start, 0
        while True:
            head = self._pread(offset, _CHUNK_HEAD_SIZE)
            if len(head) < _CHUNK_HEAD_SIZE or head[:4] != CHUNK_MAGIC:
                raise self._fail(
                    f"truncated or incomplete: no valid footer; {index} complete chunks, chunk "
                    f"{index} missing or cut off at byte {offset} of {self._size}",
                    index,
                )
            fields = self._parse_chunk_head(head, index, check_index=check_index)
            yield index, offset, fields
            offset, index = offset + _CHUNK_HEAD_SIZE + fields[8], index + 1

    def _chunk_end(self, index: int) -> int:
        """Where chunk ``index`` ends in the file (from its header)."""
        offset = self.chunk_index[index][0]
        head = self._pread(offset, _CHUNK_HEAD_SIZE)
        if len(head) < _CHUNK_HEAD_SIZE:
            raise self._fail("truncated chunk header", index)
        comp_len = self._parse_chunk_head(head, index)[8]
        return offset + _CHUNK_HEAD_SIZE + comp_len

    def _check_extent(self) -> None:
        """The chunks start where the data starts and the last ends where the footer starts:
        a footer that covers only part of the file (two traces concatenated, one appended to
        another) is refused, not read as half the data."""
        first = self.chunk_index[0][0] if self.chunk_index else self._data_end
        last = self._chunk_end(len(self.chunk_index) - 1) if self.chunk_index else first
        if first != self._data_start or last != self._data_end:
            raise self._fail(
                f"its chunks cover bytes [{first:,}, {last:,}) of the data, which is "
                f"[{self._data_start:,}, {self._data_end:,}); expected one trace file whole "
                "(two traces concatenated?)"
            )

    def _parse_chunk_head(
        self, head: bytes, index: int, *, check_index: bool = True
    ) -> tuple[Any, ...]:
        """Unpack and check one chunk header (that it is chunk ``index``'s unless not
        ``check_index``)."""
        fields = _CHUNK_HEAD.unpack(head[: _CHUNK_HEAD.size])
        (crc,) = struct.unpack("<I", head[_CHUNK_HEAD.size : _CHUNK_HEAD_SIZE])
        if fields[0] != CHUNK_MAGIC:
            raise self._fail(f"bad chunk magic {fields[0]!r}", index)
        if zlib.crc32(head[: _CHUNK_HEAD.size]) != crc:
            raise self._fail("chunk header checksum mismatch (corrupt chunk header)", index)
        if check_index:
            self._check_index(fields, index)
        return fields

    def _check_index(self, fields: tuple[Any, ...], index: int) -> None:
        """Chunk ``index``'s header ``fields`` name that index."""
        if fields[1] != index:
            raise self._fail(
                f"chunk header says index {fields[1]}; expected {index} (chunks out of order, "
                "or one missing)",
                index,
            )

    # -- reading ---------------------------------------------------------------------------------

    @property
    def n_chunks(self) -> int:
        """Number of chunks."""
        return len(self.chunk_index)

    @property
    def format_version(self) -> int:
        """On-disk format version."""
        return int(self.header["format_version"])

    @property
    def layout(self) -> list[dict[str, Any]]:
        """The header's table layout as dicts (``[{"name": ...}, ...]`` when it gave only names)."""
        tables = self.header.get("tables") or self.tables
        return [{"name": t} if isinstance(t, str) else dict(t) for t in tables]

    def table_index(self, table: str | int) -> int:
        """Index of a table given by name or index."""
        if isinstance(table, int | np.integer) and not isinstance(table, bool):
            if 0 <= table < len(self.tables):
                return int(table)
            raise self._fail(f"table index {table} out of range; the trace has {len(self.tables)}")
        if table in self.tables:
            return self.tables.index(table)
        if str(table) in self.tables:
            return self.tables.index(str(table))
        raise self._fail(f"no table {table!r}; the trace has {self.tables}")

    def lookups(self, table: str | int | None = None) -> int:
        """Number of ids in the trace, or in one table."""
        if table is None:
            return self.n_lookups
        return self._per_table[self.tables[self.table_index(table)]]

    def read_chunk(self, index: int) -> TraceChunk:
        """Read, check and decode chunk ``index``."""
        if not 0 <= index < self.n_chunks:
            raise IndexError(f"chunk {index} out of range; the trace has {self.n_chunks}")
        offset = self.chunk_index[index][0]
        head = self._pread(offset, _CHUNK_HEAD_SIZE)
        if len(head) < _CHUNK_HEAD_SIZE:
            raise self._fail("truncated chunk header", index)
        fields = self._parse_chunk_head(head, index)
        n_ids, n_rec, comp_len = fields[2], fields[3], fields[8]
        if (n_ids, n_rec) != tuple(self.chunk_index[index][1:3]):
            raise self._fail("chunk header disagrees with the footer's index", index)
        last = index + 1 == self.n_chunks
        if offset + _CHUNK_HEAD_SIZE + comp_len != (
            self._data_end if last else self.chunk_index[index + 1][0]
        ):  # the chunks fill the data back to back: verify() reading all of them sees any gap
            raise self._fail("does not end where the next chunk (or the footer) starts", index)
        return self._decode_chunk(index, offset, fields, self.chunk_index[index][3:5])

    def _decode_chunk(
        self, index: int, offset: int, fields: tuple[Any, ...], span: list[int] | None
    ) -> TraceChunk:
        """Read, check and decode the payload of chunk ``index`` at ``offset``, whose checked
        header is ``fields``; its records must span the batches ``span`` (first, last) if given."""
        _, _, n_ids, n_rec, width, flags, _, raw_len, comp_len, crc = fields
        payload = self._pread(offset + _CHUNK_HEAD_SIZE, comp_len)
        if len(payload) < comp_len:
            raise self._fail(f"truncated payload ({len(payload)} of {comp_len} bytes)", index)
        if zlib.crc32(payload) != crc:
            raise self._fail("payload checksum mismatch (corrupt chunk)", index)
        try:
            raw = self._decompressor.decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise self._fail(f"cannot decompress: {exc}", index) from None
        meta_bytes = n_rec * _META_COLS * 8
        if len(raw) != raw_len or raw_len != meta_bytes + n_ids * width or width not in (4, 8):
            raise self._fail("payload size does not match the chunk header", index)
        records = np.frombuffer(raw, dtype="<i8", count=n_rec * _META_COLS).reshape(
            n_rec, _META_COLS
        )
        body = memoryview(raw)[meta_bytes:]
        if flags & _SHUFFLED:
            ids = _unshuffle(body, n_ids, width)
        else:
            ids = np.frombuffer(body, dtype=f"<u{width}", count=n_ids).astype(np.int64)
        if int(records[:, 2].sum()) != n_ids:
            raise self._fail("record table does not add up to the chunk's ids", index)
        self._check_records(records, index, span)
        self._check_ids(records, ids, index)
        return TraceChunk(index, records.astype(np.int64), ids)

    def _check_ids(self, records: np.ndarray, ids: np.ndarray, index: int) -> None:
        """Each record's ids of chunk ``index`` lie below its table's rows (the header's), as the
        writer checks: replay trusts a table that declares its rows, and met a foreign writer's
        ids past them as a bare IndexError. An 8-byte id past int64 (which no writer writes)
        decodes negative, and is refused too."""
        if not ids.size:
            return
        last = self._last_ids[records[:, 1]]
        if (last == last[0]).all() and int(ids.min()) >= 0 and int(ids.max()) <= last[0]:
            return
        bad = (ids < 0) | (ids > np.repeat(last, records[:, 2]))
        if bad.any():
            i = int(bad.argmax())
            rec = int(np.searchsorted(np.cumsum(records[:, 2]), i, side="right"))
            name = self.tables[int(records[rec, 1])]
            limit = int(last[rec]) + 1
            below = "2**63 (int64)" if limit == 2**63 else f"the {limit:,} rows the header gives it"
            raise self._fail(
                f"record {rec} holds row id {int(ids[i]) % 2**64:,} of table {name!r}; "
                f"expected ids below {below}",
                index,
            )

    def _check_records(self, records: np.ndarray, index: int, span: list[int] | None) -> None:
        """Each record of chunk ``index`` names a table of the footer, holds as many ids as its
        shape, and comes in batch order from the first batch of ``span`` (the footer's, when
        there is one) to its last."""
        batch, table, n, ndim, dims = (
            records[:, 0],
            records[:, 1],
            records[:, 2],
            records[:, 3],
            records[:, 4:],
        )
        used = np.arange(_MAX_NDIM) < ndim[:, None]
        size = np.where(used, dims, 1).astype(np.float64).prod(axis=1)  # no int64 wrap
        problems = [
            (
                (table < 0) | (table >= len(self.tables)),
                "table index {t}",
                f"a table index below {len(self.tables)} (the footer's tables)",
            ),
            ((ndim < 0) | (ndim > _MAX_NDIM), "{d} dims", f"0 to {_MAX_NDIM} dims"),
            (
                (n < 0)
                | (dims < 0).any(axis=1)
                | (size != n)
                | (np.where(used, 0, dims) != 0).any(axis=1),
                "{n} ids in shape {shape}",
                "a shape of that many ids",
            ),
            (
                np.concatenate([[False], np.diff(batch) < 0]),
                "batch {b} after an earlier record's later batch",
                "batches that only go forward",
            ),
        ]
        for bad, what, expected in problems:
            if bad.any():
                i = int(bad.argmax())
                rec = [int(v) for v in records[i]]
                shape = tuple(rec[4 : 4 + min(max(rec[3], 0), _MAX_NDIM)])
                got = what.format(t=rec[1], d=rec[3], n=rec[2], shape=shape, b=rec[0])
                raise self._fail(f"record {i} has {got}; expected {expected}", index)
        if span is None:
            return
        first, last = span
        if records.shape[0] and (int(batch[0]), int(batch[-1])) != (first, last):
            raise self._fail(
                f"records span batches {int(batch[0])}..{int(batch[-1])}; expected the footer's "
                f"{first}..{last}",
                index,
            )

    def chunks(self) -> Iterator[TraceChunk]:
        """Every chunk, decoded, in order."""
        for i in range(self.n_chunks):
            yield self.read_chunk(i)

    def ids(self, table: str | int | None = None) -> Iterator[np.ndarray]:
        """The trace's ids (or one table's), one flat int64 array per chunk, in request order."""
        t = None if table is None else self.table_index(table)
        for chunk in self.chunks():
            out = chunk.ids if t is None else chunk.table_ids(t)
            if out.size:
                yield out

    def batches(self, table: str | int | None = None) -> Iterator[TraceBatch]:
        """Every record (one table's ids for one batch), in order, shaped as written."""
        t = None if table is None else self.table_index(table)
        for chunk in self.chunks():
            start = 0
            for rec in chunk.records:
                batch, tab, n, ndim = (int(v) for v in rec[:4])
                if t is None or tab == t:
                    shape = tuple(int(d) for d in rec[4 : 4 + ndim])
                    yield TraceBatch(
                        batch, self.tables[tab], tab, chunk.ids[start : start + n].reshape(shape)
                    )
                start += n

    def read_all(self, table: str | int | None = None) -> np.ndarray:
        """All ids (or one table's) as one flat int64 array: only for traces that fit in RAM."""
        out = np.empty(self.lookups(table), dtype=np.int64)
        self._read_into(out, table)
        return out

    def _read_into(self, out: np.ndarray, table: str | int | None) -> None:
        """Fill ``out``, sized by the footer, with the ids (or one table's); raise when the
        chunks hold another count."""
        pos = 0
        for part in self.ids(table):
            if pos + part.size <= out.size:
                out[pos : pos + part.size] = part
            pos += part.size
        if pos != out.size:
            raise self._fail(f"chunks hold {pos} ids; the footer says {out.size}")

    def verify(self) -> None:
        """Read and check every chunk and the totals; raise on the first problem."""
        n = 0
        for chunk in self.chunks():
            n += chunk.ids.size
        if n != self.n_lookups:
            raise self._fail(f"chunks hold {n} ids; the footer says {self.n_lookups}")

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TraceReader({str(self.path)!r}, tables={self.tables}, lookups={self.n_lookups}, "
            f"batches={self.n_batches}, chunks={self.n_chunks})"
        )


def _writer_alive(tmp: Path) -> bool | None:
    """Whether a live :class:`TraceWriter` holds ``tmp`` (its lock); None when ``tmp`` is not a
    regular file there (gone, renamed, a link or a FIFO named like one)."""
    try:
        fd = open_held(tmp, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        release(fd)


def _left_behind(path: Path) -> str:
    """For a trace that cannot be opened: the partial file beside it of a writer recording it now
    or of one killed before it closed, and where that stops ('' when there is none)."""
    try:
        found = hidden_temporaries(path.parent, re.escape(path.name))
        alive = {tmp: _writer_alive(tmp) for tmp in found}
        left = sorted((t for t in found if alive[t] is not None), key=lambda p: p.stat().st_mtime)
        newest = next((t for t in left if alive[t]), left[-1]) if left else None
        size = newest.stat().st_size if newest else 0
    except OSError:  # no folder there, or the partial file just went
        return ""
    if newest is None:
        return ""
    more = f" (and {len(left) - 1} older partial file(s))" if len(left) > 1 else ""
    if alive[newest]:
        return (
            f"; a writer is recording it now, into {newest.name} ({size:,} bytes so far){more}: "
            "the trace appears under its name once its writer closes it (`tiered-store serve "
            "--record-trace` closes it on SIGTERM)"
        )
    try:
        TraceReader(newest).close()
        stopped = ": whole, but never renamed into place"
    except TraceFormatError as exc:
        stopped = str(exc).removeprefix(f"trace {newest}")
    return (
        f"; a writer killed before it closed the trace left {newest.name} ({size:,} bytes"
        f"{stopped}){more}; a trace is whole only once its writer closes it (`tiered-store serve "
        "--record-trace` closes it on SIGTERM); `tiered-store recover-trace "
        f"{newest}` makes a trace of its whole chunks"
    )


def trace_from_npy(
    npy_path: str | os.PathLike[str],
    trace_path: str | os.PathLike[str],
    header: Mapping[str, Any] | None = None,
    *,
    table: str | int = 0,
    batch_size: int | None = None,
    chunk_ids: int = DEFAULT_CHUNK_IDS,
) -> TraceReader:
    """Convert a ``.npy`` of row ids into a trace of one table, streaming (memory-mapped).

    Parameters
    ----------
    npy_path : str or Path
        Integer array. 1-D: one stream of ids; N-D (up to 5-D): the leading axis is the batch
        axis.
    trace_path : str or Path
        Trace to write (not ``npy_path`` itself: a ``ConfigError``).
    header : dict, optional
        Trace header (see :class:`TraceWriter`).
    table : str or int
        Table the ids belong to.
    batch_size : int, optional
        For a 1-D array, ids per batch (an N-D one's batches are its leading axis: given one,
        a ``ValueError``). Without it a 1-D array is one batch, written as
        records of at most ``chunk_ids`` ids.
    chunk_ids : int
        Ids per chunk.

    Returns
    -------
    TraceReader
        The new trace, open.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> np.save(os.path.join(d, "ids.npy"), np.arange(10) % 4)
    >>> r = trace_from_npy(os.path.join(d, "ids.npy"), os.path.join(d, "t.trace"), batch_size=4)
    >>> r.n_batches, r.read_all().tolist()
    (3, [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    >>> trace_to_npy(r, os.path.join(d, "back.npy")).shape
    (10,)
    """
    try:
        arr = load_npy(npy_path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise TraceFormatError(f"{npy_path}: not a readable .npy ({exc})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        arr.close()
        raise TraceFormatError(f"{npy_path}: an .npz archive; expected an .npy of row ids")
    if arr.ndim == 0:
        raise TraceFormatError(
            f"{npy_path}: a 0-d array (one value); expected row ids: 1-D, or N-D with a batch axis"
        )
    if arr.dtype.kind not in "iu":  # else named as the trace's ids, at the first write
        raise RowIdError(f"{npy_path}: row ids of dtype {arr.dtype}; expected integers")
    if arr.ndim > _MAX_NDIM + 1:
        raise TraceFormatError(
            f"{npy_path}: a {arr.ndim}-D array; expected 1-D row ids, or up to "
            f"{_MAX_NDIM + 1}-D (a batch axis, then records of at most {_MAX_NDIM} dims)"
        )
    step = as_integer(batch_size)
    if batch_size is not None and (step is None or step < 1):  # 2.5: range()'s bare TypeError
        raise ValueError(f"batch_size: got {batch_size!r}; expected a positive integer")
    if step is not None and arr.ndim > 1:
        raise ValueError(
            f"batch_size={step}: {npy_path} is {arr.ndim}-D, its leading axis ({arr.shape[0]}) "
            "is the batches; expected no batch_size, or a 1-D array of ids"
        )
    if os.path.exists(trace_path) and os.path.samefile(trace_path, npy_path):  # renamed over it
        raise ConfigError(
            f"trace {trace_path} is the .npy itself ({npy_path}); expected another file"
        )
    with TraceWriter(trace_path, header, chunk_ids=chunk_ids) as w:
        if arr.ndim > 1:
            for b in range(arr.shape[0]):
                w.write(np.asarray(arr[b]), table, batch=b)
        else:
            per = step or chunk_ids
            for b, start in enumerate(range(0, arr.shape[0], per)):
                w.write(np.asarray(arr[start : start + per]), table, batch=b if step else 0)
    return TraceReader(trace_path)


def trace_to_npy(
    trace: TraceReader | str | os.PathLike[str],
    npy_path: str | os.PathLike[str],
    *,
    table: str | int | None = None,
    overwrite: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """Write a trace's ids (or one table's) as one flat int64 ``.npy``, streaming (``progress``:
    a bar of the ids written, on stderr).

    Returns the written array, memory-mapped read-only. Batch and table boundaries are dropped;
    see :func:`trace_from_npy` for an example. An existing ``npy_path`` is replaced only with
    ``overwrite`` (the trace itself never: ``ConfigError``); a directory, device, FIFO or socket
    there, or a missing folder, is a ``TierIOError``.
    """
    reader = trace if isinstance(trace, TraceReader) else TraceReader(trace)
    npy_path = Path(npy_path)
    try:
        _check_npy_target(reader.path, npy_path, overwrite)
    except BaseException:
        if reader is not trace:
            reader.close()
        raise
    # streamed with plain writes, not into a memory map of a sparse file: on a full disk a write
    # is an error to report, where a store into a map kills the process (SIGBUS)
    writing = (f"cannot write {npy_path}", "writing the row ids", "nothing was written there")
    try:
        n = reader.lookups(table)
        with write_step(*writing):
            out = AtomicFile(npy_path, "wb")
        try:
            with write_step(*writing):
                header = {"descr": "<i8", "fortran_order": False, "shape": (n,)}
                np.lib.format.write_array_header_1_0(out.file, header)
                pos = 0
                bar = tqdm(
                    total=n,
                    unit="id",
                    unit_scale=True,
                    disable=not progress,
                    desc=f"export {reader.path.name}",
                    leave=False,
                )
                with bar:
                    for part in reader.ids(table):
                        if pos + part.size <= n:
                            out.file.write(part.astype("<i8", copy=False).tobytes())
                        pos += part.size
                        bar.update(part.size)
                if pos != n:
                    raise reader._fail(f"chunks hold {pos} ids; the footer says {n}")
                out.commit()
        except BaseException:
            out.abort()
            raise
    finally:
        if reader is not trace:
            reader.close()
    return load_npy(npy_path, mmap_mode="r") if n else load_npy(npy_path)  # no map of 0 bytes


def _check_npy_target(trace: Path, npy_path: Path, overwrite: bool) -> None:
    """Refuse an output path :func:`trace_to_npy` must not or cannot write, naming it."""
    if npy_path.exists() and npy_path.samefile(trace):
        raise ConfigError(f"output {npy_path} is the trace itself; expected another file")
    if npy_path.is_dir():
        raise TierIOError(errno.EISDIR, f"output {npy_path} is a directory; expected a file path")
    if npy_path.exists() and not npy_path.is_file():  # the rename would replace it (/dev/null)
        raise TierIOError(
            errno.EEXIST,
            f"output {npy_path} is {what_is(npy_path)}; expected a file path",
        )
    if not npy_path.parent.is_dir():
        raise TierIOError(
            errno.ENOENT,
            f"output {npy_path}: its folder {npy_path.parent} {_no_folder(npy_path.parent)}",
        )
    if npy_path.exists() and not overwrite:
        raise ConfigError(f"output {npy_path} already exists; pass --overwrite to replace it")
