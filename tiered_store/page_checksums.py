"""Page checksums: a CRC32C per 4 KiB page of a table's data region, checked on every cold read.

The cold tier reads whole pages (``pread``, ``direct``, ``uring``), so a page is the unit those
reads verify, exactly the bytes they read; ``mmap`` gathers rows from mapped pages and has to
read the whole page around each row to check it.
A table ``NAME.npy`` keeps them in ``NAME.npy.pages.crc32c``: one little-endian uint32 per page of
the data region, in order (the last page may be short: its checksum covers the bytes that exist).
The manifest's ``page_checksums`` entry records the page size, the page count, the algorithm and
the CRC32C of the sidecar file itself, so a damaged sidecar is refused at open. Creation writes
the sidecar with the table (atomically, published before the manifest); ``tiered-store verify
--add-page-checksums`` adds one to an older table.

CRC32C (Castagnoli) rather than the manifest's per-block CRC-32: the CPU computes it in hardware
(SSE4.2 ``crc32``), so checking every page read costs ~0.2-0.3 us per page. The ``crc32c`` package
(hardware-accelerated, with a software fallback) computes the sidecar's own checksum and the
partial pages at chunk edges while creating; page batches go through one compiled call
(:mod:`tiered_store.crc32c_kernel`) where SSE4.2 is available, and through the package page by
page elsewhere. Both give the same values (a test checks them).

Memory: 4 bytes per 4 KiB page, read into RAM at open (never mapped, so a file shrinking under
the server cannot fault): 0.1% of the table, 99 MB for a 101 GB DeepSeek-V4.1 table.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import crc32c as _crc32c
import numpy as np

from .atomic_file import special_file
from .errors import TableFormatError

__all__ = [
    "ALGORITHM",
    "SIDECAR_SUFFIX",
    "ChecksumError",
    "PageChecksums",
    "PageCrcAccumulator",
    "UnverifiedTableWarning",
    "crc32c_backend",
    "crc32c_pages",
    "load_page_checksums",
    "sidecar_path",
]

log = logging.getLogger("tiered_store.page_checksums")

ALGORITHM = "crc32c"
SIDECAR_SUFFIX = ".pages.crc32c"
_SIDECAR_DTYPE = np.dtype("<u4")


class ChecksumError(TableFormatError):
    """Bytes read from a table do not match their page checksum.

    ``table`` (the ``.npy`` path), ``row`` (a requested row in the page, or ``None`` for a whole-
    table pass), ``page`` (index in the data region), ``expected`` and ``actual`` (CRC32C).
    """

    def __init__(
        self, message: str, *, table: Path, page: int, row: int | None, expected: int, actual: int
    ) -> None:
        super().__init__(message)
        self.table, self.page, self.row = table, page, row
        self.expected, self.actual = expected, actual


class UnverifiedTableWarning(UserWarning):
    """A table without page checksums was opened: its cold reads are not verified."""


@dataclass(frozen=True)
class PageChecksums:
    """The manifest's ``page_checksums`` entry: how the sidecar file was made, and its own CRC."""

    pages: int  # one checksum per page of the data region
    file_crc32c: int  # CRC32C of the sidecar file's bytes
    page_bytes: int = 4096
    algorithm: str = ALGORITHM

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready entry (the sidecar is always ``NAME.npy.pages.crc32c``)."""
        return {
            "algorithm": self.algorithm,
            "page_bytes": self.page_bytes,
            "pages": self.pages,
            "file_crc32c": self.file_crc32c,
        }

    @classmethod
    def from_json(cls, doc: Any, where: str, data_bytes: int, page_bytes: int) -> PageChecksums:
        """Parse and check an entry against the table's geometry; TableFormatError naming the field."""

        def bad(key: str, expected: str) -> TableFormatError:
            value = doc.get(key, "<missing>") if isinstance(doc, dict) else doc
            return TableFormatError(
                f"{where}: field 'page_checksums.{key}' is {value!r}; expected {expected}"
            )

        if not isinstance(doc, dict):
            raise bad("algorithm", "an object with algorithm, page_bytes, pages, file_crc32c")
        if doc.get("algorithm") != ALGORITHM:
            raise bad("algorithm", repr(ALGORITHM))
        if doc.get("page_bytes") != page_bytes:
            raise bad("page_bytes", str(page_bytes))
        pages = math.ceil(data_bytes / page_bytes)
        if doc.get("pages") != pages or isinstance(doc.get("pages"), bool):
            raise bad("pages", f"{pages} (data bytes / page_bytes, rounded up)")
        crc = doc.get("file_crc32c")
        if not isinstance(crc, int) or isinstance(crc, bool) or not 0 <= crc < 2**32:
            raise bad("file_crc32c", "a uint32")
        return cls(pages=pages, file_crc32c=crc, page_bytes=page_bytes)


def sidecar_path(npy_path: str | os.PathLike[str]) -> Path:
    """The page-checksum file of the table ``NAME.npy``: ``NAME.npy.pages.crc32c``."""
    p = Path(npy_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def sidecar_bytes(sums: np.ndarray) -> bytes:
    """The sidecar file's content for page checksums ``sums``."""
    return np.ascontiguousarray(sums, dtype=_SIDECAR_DTYPE).tobytes()


def file_checksum(content: bytes) -> int:
    """CRC32C of a sidecar file's bytes (what the manifest records)."""
    return _crc32c.crc32c(content)


def load_page_checksums(npy_path: Path, entry: PageChecksums) -> np.ndarray:
    """Read a table's sidecar into memory and check it against its manifest entry.

    Parameters
    ----------
    npy_path
        The table's ``.npy`` path.
    entry
        The manifest's ``page_checksums``.

    Returns
    -------
    np.ndarray
        ``uint32[pages]``, one CRC32C per page of the data region.

    Raises
    ------
    TableFormatError
        The sidecar is missing, has the wrong size or fails its own checksum; the message names
        the file and the command that rebuilds it.

    Examples
    --------
    >>> m = read_manifest("/data/t.npy")  # doctest: +SKIP
    >>> load_page_checksums(Path("/data/t.npy"), m.page_checksums).shape  # doctest: +SKIP
    (313,)
    """
    path = sidecar_path(npy_path)
    fix = f"rebuild it with `tiered-store verify --add-page-checksums {npy_path}`"
    if (kind := special_file(path)) is not None:  # its open would wait for a writer forever
        raise TableFormatError(f"page checksum file {path} is {kind}; expected a file; {fix}")
    try:
        with open(path, "rb") as f:
            content = f.read(entry.pages * _SIDECAR_DTYPE.itemsize + 1)
    except FileNotFoundError:
        raise TableFormatError(
            f"page checksum file {path} does not exist, but the table's manifest lists it; {fix}"
        ) from None
    except OSError as exc:
        raise TableFormatError(
            f"page checksum file {path}: cannot read it ({exc.strerror or exc}); {fix}"
        ) from None
    want = entry.pages * _SIDECAR_DTYPE.itemsize
    if len(content) != want:
        raise TableFormatError(
            f"page checksum file {path} has {len(content):,}{'+' if len(content) > want else ''} "
            f"bytes; expected {want:,} ({entry.pages:,} pages x 4 B); {fix}"
        )
    actual = file_checksum(content)
    if actual != entry.file_crc32c:
        raise TableFormatError(
            f"page checksum file {path} fails its own checksum: expected crc32c "
            f"0x{entry.file_crc32c:08x} (manifest), actual 0x{actual:08x}; {fix}"
        )
    return np.frombuffer(content, dtype=_SIDECAR_DTYPE).astype(np.uint32)


# ---- computing CRC32C over many pages -----------------------------------------------------------


def crc32c_pages(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """CRC32C of ``data[starts[k] : starts[k] + lengths[k]]`` for every ``k``, as ``uint32``.

    Parameters
    ----------
    data
        1-D C-contiguous ``uint8`` array (a read buffer, a mapped table, a chunk being written).
    starts, lengths
        ``int64`` arrays of one range each; the ranges must lie inside ``data``.

    Returns
    -------
    np.ndarray
        ``uint32[len(starts)]``: the standard CRC32C (as ``crc32c.crc32c`` computes it).

    Examples
    --------
    >>> data = np.frombuffer(b"123456789" * 2, dtype=np.uint8)
    >>> [hex(c) for c in crc32c_pages(data, np.array([0, 9]), np.array([9, 9]))]
    ['0xe3069283', '0xe3069283']
    """
    out = np.empty(len(starts), dtype=np.uint32)
    if len(starts):
        _backend().ranges(data, data.ctypes.data & 7, starts, lengths, out)
    return out


def crc32c_backend() -> str:
    """Which implementation :func:`crc32c_pages` uses here, in words (for reports and logs)."""
    return _backend().description


def _portable_ranges(
    data: np.ndarray, skew: int, starts: np.ndarray, lengths: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """The ``crc32c`` package, one call per range (where the compiled kernel cannot run)."""
    view, crc = memoryview(data), _crc32c.crc32c
    out[:] = [crc(view[s : s + n]) for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]
    return out


def _portable_first_bad(
    data: np.ndarray,
    first_start: int,
    packed: bool,
    pages: np.ndarray,
    sums: np.ndarray,
    page_bytes: int,
    last_page: int,
    tail: int,
) -> int:
    """``crc32c_kernel.first_bad_page`` on the ``crc32c`` package."""
    starts = first_start + (np.arange(len(pages)) if packed else pages) * page_bytes
    lengths = np.where(pages == last_page, tail, page_bytes)
    actual = _portable_ranges(data, 0, starts, lengths, np.empty(len(pages), dtype=np.uint32))
    bad = np.flatnonzero(actual != sums[pages])
    return int(bad[0]) if len(bad) else -1


class _Backend(NamedTuple):
    """The CRC32C implementation in use: ranges, the fused page check, and a description."""

    ranges: Callable[..., np.ndarray]
    first_bad: Callable[..., int]
    description: str


_BACKEND: _Backend | None = None
_BACKEND_LOCK = threading.Lock()


def _backend() -> _Backend:
    """The implementation, chosen (and compiled) on first use."""
    global _BACKEND
    if _BACKEND is None:
        with _BACKEND_LOCK:
            if _BACKEND is None:
                _BACKEND = _choose_backend()
    return _BACKEND


def _choose_backend() -> _Backend:
    """The SSE4.2 kernel when it runs here and agrees with the package, else the package."""
    package = f"crc32c package per page ({'hardware' if _crc32c.hardware_based else 'software'})"
    from . import crc32c_kernel  # noqa: PLC0415 (imports numba: only when checksums are needed)

    reason = crc32c_kernel.unavailable_reason()
    if reason is None:
        probe = np.frombuffer(np.random.default_rng(0).bytes(3 * 4096 + 13), dtype=np.uint8)
        starts = np.array([0, 1, 4096, 8192, 5, 3 * 4096], dtype=np.int64)
        lengths = np.array([4096, 4096, 4096, 4096, 11, 13], dtype=np.int64)
        got = crc32c_kernel.crc32c_ranges(
            probe, probe.ctypes.data & 7, starts, lengths, np.empty(6, np.uint32)
        )
        want = _portable_ranges(probe, 0, starts, lengths, np.empty(6, np.uint32))
        if np.array_equal(got, want):
            return _Backend(
                crc32c_kernel.crc32c_ranges,
                crc32c_kernel.first_bad_page,
                "SSE4.2 crc32 kernel (numba), 4 pages interleaved",
            )
        reason = "it disagreed with the crc32c package on a probe"
    log.info(
        "page checksums computed by the %s: the compiled kernel is unusable (%s)", package, reason
    )
    return _Backend(_portable_ranges, _portable_first_bad, package)


class PageCrcAccumulator:
    """CRC32C per ``page_bytes`` page of a byte stream fed in pieces of any size (table creation).

    Examples
    --------
    >>> acc = PageCrcAccumulator(4)
    >>> acc.update(np.frombuffer(b"12345", dtype=np.uint8))
    >>> acc.update(np.frombuffer(b"6789", dtype=np.uint8))
    >>> [hex(c) for c in acc.finish()] == [hex(_crc32c.crc32c(b)) for b in (b"1234", b"5678", b"9")]
    True
    """

    def __init__(self, page_bytes: int) -> None:
        self.page_bytes = page_bytes
        self._done: list[np.ndarray] = []
        self._crc = 0  # running CRC32C of the current partial page
        self._filled = 0

    def update(self, data: np.ndarray) -> None:
        """Add the next bytes (a 1-D contiguous uint8 array)."""
        pos, size, page = 0, len(data), self.page_bytes
        if self._filled:
            pos = min(page - self._filled, size)
            self._crc = _crc32c.crc32c(data[:pos], self._crc)
            self._filled += pos
            if self._filled == page:
                self._done.append(np.array([self._crc], dtype=np.uint32))
                self._crc, self._filled = 0, 0
        full = (size - pos) // page
        if full:
            starts = pos + np.arange(full, dtype=np.int64) * page
            self._done.append(crc32c_pages(data, starts, np.full(full, page, dtype=np.int64)))
            pos += full * page
        if pos < size:
            self._crc, self._filled = _crc32c.crc32c(data[pos:]), size - pos

    def finish(self) -> np.ndarray:
        """The checksums of every page (the last one partial if the stream ended mid-page)."""
        if self._filled:
            self._done.append(np.array([self._crc], dtype=np.uint32))
            self._crc, self._filled = 0, 0
        return np.concatenate(self._done) if self._done else np.empty(0, dtype=np.uint32)


class PageVerifier:
    """One table's page checksums, held in memory, and the check of pages read from it."""

    def __init__(self, sums: np.ndarray, data_bytes: int, page_bytes: int) -> None:
        self.sums = sums
        self.page_bytes = page_bytes
        self.last_page = len(sums) - 1
        self.tail = data_bytes - self.last_page * page_bytes  # bytes of the last page

    def first_bad(
        self, data: np.ndarray, first_start: int, packed: bool, pages: np.ndarray
    ) -> tuple[int, int, int] | None:
        """``(k, expected, actual)`` of the first of ``pages`` failing its checksum, or ``None``.

        ``pages`` (data-region page indices) lie back to back in ``data`` from ``first_start``
        when ``packed`` (a read buffer; a page may repeat where two extents split its rows), else
        at ``first_start + page * page_bytes`` (a mapped file). One compiled call.
        """
        k = _backend().first_bad(
            data, first_start, packed, pages, self.sums, self.page_bytes, self.last_page, self.tail
        )
        if k < 0:
            return None
        page = int(pages[k])
        start = first_start + (k if packed else page) * self.page_bytes
        length = self.tail if page == self.last_page else self.page_bytes
        return k, int(self.sums[page]), _crc32c.crc32c(data[start : start + length])
