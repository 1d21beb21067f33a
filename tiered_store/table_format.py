"""Cold-tier table files: a plain ``.npy`` plus a JSON manifest with per-block checksums.

Layout of a table called ``NAME``:

- ``NAME.npy``: a standard NumPy ``.npy`` file (format 1.0), C order, shape ``(rows, dim)``. The
  header is space-padded so that the data region starts at byte ``DATA_OFFSET`` (4096), i.e. on a
  page boundary, which is what ``O_DIRECT`` reads need. ``np.load`` opens it, also with
  ``mmap_mode="r"``. bfloat16 has no NumPy dtype and is stored as ``'<u2'`` (the raw bits).
- ``NAME.npy.manifest.json``: format version, shape, dtype (``bfloat16`` spelled out), row_bytes,
  data_offset, block_bytes, one CRC-32 (zlib) per ``block_bytes`` block of the data region, and
  how/when/by which library version the table was made; ``page_checksums`` describes the next file;
  ``manifest_crc32c`` is the CRC32C of the rest of the manifest, checked on every read
  (:mod:`tiered_store.manifest_checksum`; manifests written before it open without it).
- ``NAME.npy.pages.crc32c``: one CRC32C per 4 KiB page of the data region, which every cold read
  checks (:mod:`tiered_store.page_checksums`). Tables made before it have no such file and no
  ``page_checksums`` entry (readers that predate the entry ignore it): they open with a warning and
  read unverified until ``tiered-store verify --add-page-checksums`` adds it.

CRC-32 rather than xxhash: it is in the standard library (no extra dependency), any tool can
recompute it (``zlib.crc32``, gzip, zip), it runs at about 2 GB/s per core here, faster than the
disk reads it checks, and it catches every burst error of up to 32 bits and random damage with
probability 1 - 2**-32 per block. The block CRCs serve whole-table passes (``verify_table``, the
serve scrubber); the page CRC32Cs serve reads, at the granularity reads happen.

A table is "openable" only when the manifest exists and agrees with the ``.npy`` header and the
file size. Creation writes the files under temporary names in the target directory, fsyncs them,
then commits: remove the old manifest (if overwriting), rename the ``.npy``, then the page
checksums, and the manifest last, fsyncing the directory after each step. A crash at any point therefore leaves either the old
table (crash before commit), no openable table (crash during commit), or the new table.
Stale temporary files (``.NAME.npy.*.tmp``) may remain after a crash; they are never opened, and
the next creation of that table removes them. Every writer holds a ``flock`` on its temporaries
until they are renamed (the kernel drops it when the process dies), so a creation still running,
in this process or another, keeps its own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import numbers
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from .atomic_file import (
    AtomicFile,
    atomic_files,
    fsync_dir,
    remove_abandoned_temporaries,
    special_file,
    write_step,
)
from .errors import TableFormatError, TieredStoreError, TierIOError, shown, warn_at_caller
from .manifest_checksum import FIELD, check_manifest_checksum, sealed
from .npy_files import read_npy_header
from .page_checksums import (
    ChecksumError,
    PageChecksums,
    PageCrcAccumulator,
    crc32c_pages,
    file_checksum,
    load_page_checksums,
    sidecar_bytes,
    sidecar_path,
)
from .process_locks import exclusive_now, locked_folder, open_held, release
from .quantization import FP8_E4M3_MAX, SCALE_BIAS, RowQuantization, dequantize_rows
from .table_sources import (  # the sources are create_table's arguments: importable from here too
    TABLE_DTYPES,
    PackedSafetensorsSource,
    RandomSource,
    SafetensorsSource,
    SourceReader,
    TableNotFoundError,
    TableSource,
    open_source,
)
from .versions import package_version

__all__ = [
    "TABLE_DTYPES",
    "ChecksumError",
    "PackedSafetensorsSource",
    "RandomSource",
    "SafetensorsSource",
    "TableExistsError",
    "TableChangingError",
    "TableManifest",
    "TableNotFoundError",
    "TableSource",
    "VerifyReport",
    "VerifyStopped",
    "add_page_checksums",
    "check_table",
    "create_table",
    "read_manifest",
    "replace_metadata",
    "table_paths",
    "verify_table",
]

FORMAT_NAME = "tiered-store-table"
FORMAT_VERSION = 2  # 2: optional "quantization" (packed fp8 rows); version-1 files still open
PAGE_BYTES = 4096  # 4 KiB: file-system page and O_DIRECT alignment unit
DATA_OFFSET = 4096  # data region starts on the first page boundary after the magic + header
MANIFEST_SUFFIX = ".manifest.json"
DEFAULT_BLOCK_BYTES = 1 << 20  # 1 MiB per checksummed block
DEFAULT_CHUNK_BYTES = 64 << 20  # 64 MiB of rows in RAM at a time while creating
VERIFY_READ_BYTES = 8 << 20  # 8 MiB sequential reads while verifying
VERIFY_ATTEMPTS = 3  # verify_table's reads of a table made anew meanwhile, before it gives up
_TOO_DEEP = (  # a manifest json cannot parse or write back: a RecursionError, said of the file
    "nested deeper than Python's recursion limit lets it be read; expected the table's JSON "
    "manifest (a few levels of objects and lists)"
)


class TableExistsError(TierIOError, FileExistsError):
    """A table (or one of its two files) already exists where a new one would be written."""


class VerifyStopped(TieredStoreError):
    """``verify_table``'s ``stop`` was set before the pass ended: no verdict on the table."""


class TableChangingError(TableFormatError):
    """``verify_table`` found the table being made anew over its path at each of
    ``VERIFY_ATTEMPTS`` tries, or ``add_page_checksums`` found it changed while it ran: no
    verdict on the table (check it again once that is done)."""


@dataclass(frozen=True)
class TableManifest:
    """What a table's ``.manifest.json`` says: shape, dtype, layout, block checksums, provenance."""

    rows: int
    dim: int
    dtype: str  # "float32" | "float16" | "bfloat16"
    row_bytes: int
    data_offset: int
    block_bytes: int
    block_checksums: tuple[int, ...] = field(repr=False)
    checksum: str = "crc32"
    source: str = ""
    created_at: str = ""
    library_version: str = ""
    format_version: int = FORMAT_VERSION
    metadata: dict[str, Any] = field(
        default_factory=dict, compare=False
    )  # caller's, e.g. Engram layout
    quantization: RowQuantization | None = None  # rows are packed quantised values (dtype uint8)
    page_checksums: PageChecksums | None = None  # the CRC32C-per-page sidecar (None: unverified)
    manifest_crc32c: int | None = field(  # the manifest's own (None: written before them)
        default=None, compare=False
    )

    @property
    def engram_layout(self) -> dict[str, Any] | None:
        """A copy of the Engram layout the table records (``metadata["engram"]``: layer, head
        primes, seed, ...); None for a table that records none."""
        layout = (self.metadata or {}).get("engram")
        return dict(layout) if isinstance(layout, dict) else None

    @property
    def values_per_row(self) -> int:
        """Values a lookup returns per row: ``dim``, or the quantised row's value count."""
        return self.quantization.values if self.quantization else self.dim

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, dim)``."""
        return (self.rows, self.dim)

    @property
    def npy_descr(self) -> str:
        """The dtype string in the ``.npy`` header (``'<u2'`` for bfloat16)."""
        return TABLE_DTYPES[self.dtype][0]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The table's element type as a torch dtype."""
        return TABLE_DTYPES[self.dtype][2]

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return TABLE_DTYPES[self.dtype][1]

    @property
    def data_bytes(self) -> int:
        """Size of the data region: ``rows * row_bytes``."""
        return self.rows * self.row_bytes

    @property
    def file_bytes(self) -> int:
        """Exact size of the ``.npy`` file: ``data_offset + data_bytes``."""
        return self.data_offset + self.data_bytes

    @property
    def num_blocks(self) -> int:
        """Number of checksummed blocks (the last one may be short)."""
        return len(self.block_checksums)

    def block_range(self, index: int) -> tuple[int, int]:
        """File byte range ``[start, end)`` of checksummed block ``index``."""
        start = self.data_offset + index * self.block_bytes
        return start, min(start + self.block_bytes, self.file_bytes)

    def to_json(self) -> dict[str, Any]:
        """The manifest as the JSON-ready dict written to disk."""
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "shape": [self.rows, self.dim],
            "dtype": self.dtype,
            "npy_descr": self.npy_descr,
            "row_bytes": self.row_bytes,
            "data_offset": self.data_offset,
            "data_bytes": self.data_bytes,
            "file_bytes": self.file_bytes,
            "block_bytes": self.block_bytes,
            "checksum": self.checksum,
            "block_checksums": list(self.block_checksums),
            "created": {
                "source": self.source,
                "time": self.created_at,
                "library_version": self.library_version,
            },
            "metadata": self.metadata,
            **({"quantization": self.quantization.to_json()} if self.quantization else {}),
            **({"page_checksums": self.page_checksums.to_json()} if self.page_checksums else {}),
        }

    @classmethod
    def from_json(cls, doc: Any, where: str = "manifest") -> TableManifest:
        """Parse and validate a manifest dict; raise TableFormatError naming the bad field."""

        def bad(key: str, expected: str) -> TableFormatError:
            value = doc.get(key, "<missing>") if isinstance(doc, dict) else doc
            return TableFormatError(f"{where}: field {key!r} is {value!r}; expected {expected}")

        try:  # its canonical form is written back with json.dumps, which recurses
            manifest_crc32c = check_manifest_checksum(doc, where) if isinstance(doc, dict) else None
        except RecursionError:
            raise TableFormatError(f"{where} is {_TOO_DEEP}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise bad("format", repr(FORMAT_NAME))
        version = doc.get("format_version")
        if not _is_pos_int(version):  # JSON true is a bool, an int equal to 1
            raise bad("format_version", "a positive integer")
        if version > FORMAT_VERSION:
            raise bad("format_version", f"<= {FORMAT_VERSION} (written by a newer tiered-store)")
        shape = doc.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_pos_int(s) for s in shape)):
            raise bad("shape", "[rows, dim] with both positive integers")
        rows, dim = shape
        dtype = doc.get("dtype")
        if dtype not in TABLE_DTYPES:
            raise bad("dtype", f"one of {sorted(TABLE_DTYPES)}")
        descr, itemsize, _ = TABLE_DTYPES[dtype]
        if doc.get("npy_descr") != descr:
            raise bad("npy_descr", repr(descr) + f" for dtype {dtype}")
        if not _is_int(doc.get("row_bytes"), dim * itemsize):
            raise bad("row_bytes", f"{dim * itemsize} (dim {dim} x {itemsize} bytes)")
        data_offset = doc.get("data_offset")
        if not _is_pos_int(data_offset) or data_offset % PAGE_BYTES:
            raise bad("data_offset", f"a positive multiple of {PAGE_BYTES}")
        data_bytes = rows * dim * itemsize
        if not _is_int(doc.get("data_bytes"), data_bytes):
            raise bad("data_bytes", f"{data_bytes} (rows x row_bytes)")
        if not _is_int(doc.get("file_bytes"), data_offset + data_bytes):
            raise bad("file_bytes", f"{data_offset + data_bytes} (data_offset + data_bytes)")
        block_bytes = doc.get("block_bytes")
        if not _is_pos_int(block_bytes) or block_bytes % PAGE_BYTES:
            raise bad("block_bytes", f"a positive multiple of {PAGE_BYTES}")
        if doc.get("checksum") != "crc32":
            raise bad("checksum", "'crc32'")
        sums = doc.get("block_checksums")
        n_blocks = math.ceil(data_bytes / block_bytes)
        if not (
            isinstance(sums, list)
            and len(sums) == n_blocks
            and all(_is_int(s) and 0 <= s < 2**32 for s in sums)
        ):
            raise bad("block_checksums", f"a list of {n_blocks} uint32 values")
        created = doc.get("created")
        if not isinstance(created, dict):
            raise bad("created", "an object with source, time, library_version")
        metadata = doc.get("metadata", {})
        if not isinstance(metadata, dict):
            raise bad("metadata", "a JSON object")
        quantization = None
        if "quantization" in doc:
            try:
                quantization = RowQuantization.from_json(doc["quantization"])
            except ValueError as exc:
                raise TableFormatError(f"{where}: {exc}") from None
            if dtype != "uint8" or dim != quantization.packed_bytes:
                raise bad(
                    "shape", f"[rows, {quantization.packed_bytes}] uint8 for packed quantised rows"
                )
        elif dtype == "uint8":  # packed rows without their layout: lookups would be raw bytes
            raise bad("quantization", "the layout of its packed uint8 rows")
        page_checksums = None
        if "page_checksums" in doc:
            page_checksums = PageChecksums.from_json(
                doc["page_checksums"], where, data_bytes, PAGE_BYTES
            )
        return cls(
            rows=rows,
            dim=dim,
            dtype=dtype,
            row_bytes=dim * itemsize,
            data_offset=data_offset,
            block_bytes=block_bytes,
            block_checksums=tuple(sums),
            checksum="crc32",
            source=str(created.get("source", "")),
            created_at=str(created.get("time", "")),
            library_version=str(created.get("library_version", "")),
            format_version=version,
            metadata=metadata,
            quantization=quantization,
            page_checksums=page_checksums,
            manifest_crc32c=manifest_crc32c,
        )


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of a successful ``verify_table``: what was checked and how fast."""

    path: Path
    blocks_checked: int
    bytes_checked: int
    seconds: float
    pages_checked: int = 0  # page CRC32Cs checked (0: the table has no page checksums)
    manifest_checksum: bool = True  # False: its manifest was written before manifest checksums

    @property
    def bytes_per_second(self) -> float:
        """Verification throughput."""
        return self.bytes_checked / self.seconds if self.seconds > 0 else float("inf")


def page_aligned(nbytes: int) -> np.ndarray:
    """``nbytes`` of uint8 starting on a page boundary (for ``O_DIRECT`` and io_uring reads);
    the slice of a larger array, which its ``base`` keeps alive."""
    raw = np.empty(nbytes + PAGE_BYTES, dtype=np.uint8)
    skip = -raw.ctypes.data % PAGE_BYTES
    return raw[skip : skip + nbytes]


def table_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(npy_path, manifest_path)`` for a table given as ``NAME.npy``, its manifest, or ``NAME``."""
    p = Path(path)
    if p.name in ("", ".."):  # '.', '/', '..': a directory, which no table file can be named
        raise TableFormatError(
            f"table path {os.fspath(path)!r} names a directory; expected a table file (NAME.npy)"
        )
    if p.name.endswith(MANIFEST_SUFFIX):
        p = p.with_name(p.name[: -len(MANIFEST_SUFFIX)])
    if p.suffix != ".npy":
        p = p.with_name(p.name + ".npy")
    return p, p.with_name(p.name + MANIFEST_SUFFIX)


def not_a_table(path: str | os.PathLike[str]) -> TableFormatError | None:
    """The error for ``path`` when it names another kind of file (a store YAML, a profile) and
    no table goes by that name; else None."""
    given = Path(path)
    if given.is_dir():
        tables = sorted(p.name for p in given.glob("*.npy") if table_paths(p)[1].exists())
        hint = f", such as {', '.join(tables[:3])}" if tables else ""
        return TableFormatError(f"{given} is a directory; expected a table file (NAME.npy){hint}")
    npy_path = table_paths(given)[0]
    if given == npy_path or not given.is_file() or npy_path.exists():
        return None
    table = _table_of_store_config(given)
    if table is not None:
        return TableFormatError(f"{given} is a store config, not a table; its table is {table}")
    return TableFormatError(
        f"{given} is not a table (a table is NAME.npy with its manifest, and {npy_path.name} does "
        "not exist); expected a table made by `tiered-store init`"
    )


def _table_of_store_config(path: Path) -> Path | None:
    """The table a store YAML at ``path`` names (relative to it), or None for any other file."""
    if path.suffix not in (".yaml", ".yml"):
        return None
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        table = Path(doc["table"]["path"])
    except (OSError, ValueError, yaml.YAMLError, TypeError, KeyError, RecursionError):
        return None
    return table if table.is_absolute() else path.parent / table


def read_manifest(path: str | os.PathLike[str]) -> TableManifest:
    """Read and validate a table's manifest.

    Parameters
    ----------
    path
        The table's ``.npy`` path (or its manifest path, or the name without ``.npy``).

    Returns
    -------
    TableManifest
        Frozen; ``block_checksums`` holds one CRC-32 per ``block_bytes`` of the data region.

    Raises
    ------
    TableNotFoundError
        The table does not exist, or its manifest does not (the table was never completed).
    TableFormatError
        The manifest is not valid JSON, fails its own checksum (``manifest_crc32c``: "is
        corrupt"), or a field is missing or inconsistent.

    Examples
    --------
    >>> m = read_manifest("/data/engram_layer2.npy")  # doctest: +SKIP
    >>> m.shape, m.dtype, m.num_blocks  # doctest: +SKIP
    ((10300000, 1024), 'bfloat16', 20118)
    """
    doc, manifest_path = _read_manifest_doc(path)
    return TableManifest.from_json(doc, where=f"table manifest {manifest_path}")


def _read_manifest_doc(path: str | os.PathLike[str]) -> tuple[Any, Path]:
    """The parsed JSON of the table ``path``'s manifest (unchecked) and the manifest's path."""
    npy_path, manifest_path = table_paths(path)
    if (kind := special_file(manifest_path)) is not None:  # its read would wait or never end
        raise TableFormatError(
            f"table manifest {manifest_path} is {kind}; expected the table's JSON manifest file"
        )
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if not npy_path.exists():  # no table at all (a mistyped name), not an incomplete one
            if (error := not_a_table(path)) is not None:
                raise error from None
            raise TableNotFoundError(
                errno.ENOENT,
                f"table {npy_path} does not exist; expected a table made by `tiered-store init`",
                str(npy_path),
            ) from None
        raise TableNotFoundError(
            errno.ENOENT,
            f"table manifest {manifest_path} does not exist; expected it next to the .npy "
            "(an incomplete or foreign table: create it with create_table)",
            str(manifest_path),
        ) from None
    except IsADirectoryError:
        raise TableFormatError(
            f"table manifest {manifest_path} is a directory; expected the table's JSON manifest "
            "file"
        ) from None
    except UnicodeDecodeError as exc:
        raise TableFormatError(
            f"table manifest {manifest_path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
            f"at offset {exc.start}); expected the table's JSON manifest"
        ) from None
    except OSError as exc:
        raise TierIOError(
            exc.errno or errno.EIO,
            f"table manifest {manifest_path}: cannot read it ({exc.strerror or exc})",
        ) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TableFormatError(f"table manifest {manifest_path} is not valid JSON: {exc}") from None
    except RecursionError:  # json.loads parses nested arrays and objects recursively
        raise TableFormatError(f"table manifest {manifest_path} is {_TOO_DEEP}") from None
    return doc, manifest_path


def check_table(path: str | os.PathLike[str]) -> TableManifest:
    """Cheap structural check of a table (no checksums): manifest vs ``.npy`` header vs size.

    Parameters
    ----------
    path
        The table's ``.npy`` path.

    Returns
    -------
    TableManifest
        The manifest, known to agree with the ``.npy`` header (shape, dtype, C order, data
        offset) and with the file size (exactly ``data_offset + rows * row_bytes``).

    Raises
    ------
    TableNotFoundError
        Either file is missing.
    TableFormatError
        The header or the file size disagrees with the manifest; the message names the file and
        the expected and actual values.

    Examples
    --------
    >>> check_table("/data/engram_layer2.npy").file_bytes  # doctest: +SKIP
    21094404096
    """
    npy_path, _ = table_paths(path)
    manifest = read_manifest(npy_path)
    _check_data_file(npy_path, manifest)
    return manifest


def _check_data_file(npy_path: Path, manifest: TableManifest) -> None:
    """``check_table``'s check of the data file (its ``.npy`` header and size) against
    manifest``."""
    if (kind := special_file(npy_path)) is not None:  # its open or read would wait or never end
        raise TableFormatError(
            f"table data file {npy_path} is {kind}; expected the table's .npy file"
        )
    try:
        with open(npy_path, "rb") as f:
            shape, fortran, descr, data_offset = _read_npy_header(f, npy_path)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise TableNotFoundError(
            errno.ENOENT, f"table data file {npy_path} does not exist", str(npy_path)
        ) from None
    except IsADirectoryError:
        raise TableFormatError(
            f"table data file {npy_path} is a directory; expected the table's .npy file"
        ) from None
    where = f"table {npy_path}"
    if shape != manifest.shape:
        raise TableFormatError(
            f"{where}: .npy header shape {shape} != manifest shape {manifest.shape}"
        )
    if descr != manifest.npy_descr:
        raise TableFormatError(
            f"{where}: .npy header dtype {descr!r} != {manifest.npy_descr!r} expected for "
            f"manifest dtype {manifest.dtype}"
        )
    if fortran:
        raise TableFormatError(f"{where}: .npy header says fortran_order=True; expected C order")
    if data_offset != manifest.data_offset:
        raise TableFormatError(
            f"{where}: data starts at byte {data_offset}; manifest expects {manifest.data_offset}"
        )
    if size != manifest.file_bytes:
        kind = "truncated" if size < manifest.file_bytes else "too long"
        raise TableFormatError(
            f"{where}: file is {kind}: size {size} bytes, expected {manifest.file_bytes} "
            f"(data_offset {manifest.data_offset} + {manifest.rows} rows x {manifest.row_bytes} B)"
        )


def create_table(
    path: str | os.PathLike[str],
    source: TableSource,
    *,
    dtype: str | torch.dtype | np.dtype | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    quantization: RowQuantization | None = None,
) -> TableManifest:
    """Write a table (``.npy`` + manifest) atomically, streaming the source in chunks.

    Parameters
    ----------
    path
        Target ``NAME.npy`` (``.npy`` is appended if missing). The manifest goes to
        ``NAME.npy.manifest.json``. A symbolic link is followed: the table is written where
        it points (where stores opened through the link read it), the link kept.
    source
        One of: a 2-D ``np.ndarray`` or ``torch.Tensor``; a path to a 2-D ``.npy`` file (read
        through mmap); ``SafetensorsSource(path, tensor_name)`` (read in slices); or
        ``RandomSource(rows, dim, dtype, seed, std)`` (normal init, deterministic).
        A ``uint16`` array / ``.npy`` is accepted as raw bfloat16 bits when ``dtype="bfloat16"``.
    dtype
        Table dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (torch/NumPy dtypes and
        ``fp32``/``fp16``/``bf16`` also accepted). Default: the source's dtype.
    block_bytes
        Size of each checksummed block of the data region (a multiple of 4096).
    chunk_bytes
        Bytes of rows held in memory at a time while writing.
    progress
        Show a tqdm progress bar.
    overwrite
        Replace an existing table at ``path``; without it, an existing ``.npy`` or manifest at
        the target is an error.
    metadata
        JSON-serialisable facts stored in the manifest (e.g. the Engram layout the table was built
        for), so a reader can refuse a table made for another configuration.
    quantization
        For a ``uint8`` source of packed quantised rows (fp8 codes, then scale bytes; see
        :mod:`tiered_store.quantization`): their layout, recorded in the manifest so lookups
        dequantise. ``PackedSafetensorsSource`` and a quantised ``RandomSource`` carry their own.

    Returns
    -------
    TableManifest
        The manifest that was written.

    Raises
    ------
    TableFormatError
        Unsupported dtype or shape, unknown tensor name, bad argument.
    TableNotFoundError
        The source file does not exist.
    TableExistsError
        The target exists and ``overwrite`` is False.
    TierIOError
        The file system has no room for the table, or a write failed (disk full, read-only file
        system, file-size limit): the message names the table and the step.

    A failed call leaves nothing behind (its temporary files are removed) and never touches an
    existing table; a crashed process may leave hidden ``.NAME.npy.*.tmp`` files, never a table,
    and the next call for that table removes them (with a warning saying how many bytes), leaving
    those of a creation still running elsewhere.

    Examples
    --------
    >>> m = create_table("/data/t.npy", RandomSource(rows=1000, dim=64, dtype="bfloat16"),
    ...                  progress=False)  # doctest: +SKIP
    >>> m.shape, m.dtype, m.data_offset  # doctest: +SKIP
    ((1000, 64), 'bfloat16', 4096)
    >>> np.load("/data/t.npy", mmap_mode="r").dtype  # raw bf16 bits  # doctest: +SKIP
    dtype('uint16')
    """
    npy_path, manifest_path = table_paths(path)
    if npy_path.is_symlink():  # a link to the table's file: write there, as stores read there
        npy_path, manifest_path = table_paths(npy_path.resolve())
    if not _is_pos_int(block_bytes) or block_bytes % PAGE_BYTES:
        raise TableFormatError(f"block_bytes={block_bytes!r}; expected a positive multiple of 4096")
    if not _is_pos_int(chunk_bytes):
        raise TableFormatError(f"chunk_bytes={chunk_bytes!r}; expected a positive integer")
    _check_metadata(metadata)
    reader = open_source(source, dtype)
    try:
        reader.quantization = _row_quantization(reader, quantization)
        return _write_table(
            npy_path,
            manifest_path,
            reader,
            block_bytes,
            chunk_bytes,
            progress,
            overwrite,
            metadata or {},
        )
    finally:
        reader.close()


def _check_metadata(metadata: object) -> None:
    """Refuse, before a byte is written, caller metadata that the JSON manifest cannot hold."""
    if metadata is not None and not isinstance(metadata, dict):
        raise TableFormatError(
            f"metadata is a {type(metadata).__name__}; expected a dict of JSON values or None"
        )
    try:
        json.dumps(metadata, allow_nan=False)
        found = _non_string_key(metadata)
    except RecursionError:  # both walk the nesting recursively
        raise TableFormatError(
            "metadata is nested deeper than Python's recursion limit lets its JSON manifest be "
            "written or read; expected a few levels of dicts and lists"
        ) from None
    except (TypeError, ValueError) as exc:
        raise TableFormatError(
            f"metadata cannot be stored in the table's JSON manifest ({exc}); expected str, int, "
            "float, bool and None values, lists, and dicts with str keys (no NaN or inf)"
        ) from None
    if found is not None:
        where, key = found
        raise TableFormatError(
            f"{where} has the key {key!r} ({type(key).__name__}); expected str keys (JSON keeps "
            f"keys as strings: it would be read back as {json.dumps(key)!r})"
        )


def _non_string_key(value: object, where: str = "metadata") -> tuple[str, object] | None:
    """The first dict key in ``value`` that is not a str, and where that dict is; or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return where, key
            found = _non_string_key(item, f"{where}[{key!r}]")
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _non_string_key(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def _row_quantization(
    reader: SourceReader, given: RowQuantization | None
) -> RowQuantization | None:
    """The quantisation of the rows a source yields: its own or ``given``, never two that differ."""
    quant = reader.quantization or given
    if given is not None and reader.quantization not in (None, given):
        raise TableFormatError(
            f"quantization={given.to_json()} but the source's rows are "
            f"{reader.quantization.to_json()}; expected no quantization argument or the same one"
        )
    if quant is not None and (reader.dtype != "uint8" or reader.dim != quant.packed_bytes):
        raise TableFormatError(
            f"quantization {quant.to_json()} needs uint8 rows of {quant.packed_bytes} bytes; "
            f"the source has {reader.dtype} rows of {reader.dim} values"
        )
    if quant is None and reader.dtype == "uint8":  # served as values, they would be raw bytes
        raise TableFormatError(
            f"{reader.description}: uint8 rows without their quantization; uint8 tables hold "
            "packed quantised rows (fp8 codes, then scale bytes), made with quantization= (see "
            "tiered_store.quantization.quantize_rows) or by `tiered-store convert-hf`; expected "
            "float rows otherwise"
        )
    return quant


def verify_table(
    path: str | os.PathLike[str],
    progress: bool = True,
    *,
    stop: threading.Event | None = None,
    bytes_per_s: float | None = None,
) -> VerifyReport:
    """Re-read every block of a table and compare it with the manifest's and the page checksums.

    Parameters
    ----------
    path
        The table's ``.npy`` path.
    progress
        Show a tqdm progress bar.
    stop
        End the pass at its next read once this is set (``VerifyStopped``): a server stopping.
    bytes_per_s
        Read no faster than this (a background pass that leaves the disk to lookups); None:
        as fast as the disk goes.

    Returns
    -------
    VerifyReport
        Blocks, pages and bytes checked, elapsed seconds (``pages_checked`` is 0 for a table
        without page checksums).

    Raises
    ------
    TableFormatError
        The structure is wrong (see ``check_table``), the page checksum file is missing or damaged,
        or a block fails its checksum; the message names the first bad block: index, file byte
        range, expected and actual CRC-32.
    TableChangingError
        The table was being made anew over the path at each of ``VERIFY_ATTEMPTS`` tries (its
        manifest replaced between reads, or missing while a writer holds the folder's lock): no
        verdict (one made anew once is verified as it is then).
    ChecksumError
        A page fails its CRC32C, no block having failed before it (a block is checked once
        its last byte is read, pages as each read of at most ``VERIFY_READ_BYTES`` ends, so a
        bad byte in a block that ends in a later read is named as a bad page): the message
        names the page, its file byte range and rows.
    TierIOError
        A read of the data failed (EIO): the message names the table and the offset.
    VerifyStopped
        ``stop`` was set before the pass ended.

    Examples
    --------
    >>> r = verify_table("/data/t.npy", progress=False)  # doctest: +SKIP
    >>> r.blocks_checked, r.pages_checked, r.bytes_checked  # doctest: +SKIP
    (1, 32, 128000)
    """
    npy_path, _ = table_paths(path)
    if bytes_per_s is not None and (
        isinstance(bytes_per_s, bool)  # (NumPy's bool is no numbers.Real)
        or not isinstance(bytes_per_s, numbers.Real)
        or not 0 < bytes_per_s < math.inf
    ):
        raise ValueError(
            f"bytes_per_s={shown(bytes_per_s)}: expected a positive number of bytes a second, "
            "or None (no limit)"
        )
    for _ in range(VERIFY_ATTEMPTS):
        manifest = _manifest_unless_published(npy_path)
        if manifest is None:  # a writer makes the table anew now: its manifest comes last
            continue
        try:
            _check_data_file(npy_path, manifest)  # check_table's, against the manifest read
            entry = manifest.page_checksums
            sums = load_page_checksums(npy_path, entry) if entry is not None else None
            f = _open_uncached(npy_path)
        except (TableFormatError, OSError):
            if _manifest_unchanged(npy_path, manifest):
                raise
            continue  # made anew meanwhile: its new data file, or sidecar, was read
        with f:
            if not _manifest_unchanged(npy_path, manifest):  # the file open may be the new one
                continue
            t0 = time.perf_counter()  # the file open is the manifest's, replaced or not
            _scan_table(
                npy_path,
                manifest,
                progress,
                "verify",
                expected_pages=sums,
                file=f,
                stop=stop,
                bytes_per_s=bytes_per_s,
            )
            break
    else:
        raise TableChangingError(
            f"table {npy_path} was being made anew at each of {VERIFY_ATTEMPTS} tries while "
            "verify read its manifest, page checksums and data; no verdict: run the check again "
            "once it is done"
        )
    return VerifyReport(
        path=npy_path,
        blocks_checked=manifest.num_blocks,
        bytes_checked=manifest.data_bytes,
        seconds=time.perf_counter() - t0,
        pages_checked=0 if sums is None else len(sums),
        manifest_checksum=manifest.manifest_crc32c is not None,
    )


def add_page_checksums(path: str | os.PathLike[str], progress: bool = True) -> VerifyReport:
    """Give a table (one made before page checksums, or with a damaged sidecar) its page checksums.

    Streams the table once: checks every block against the manifest's CRC-32s, computes a CRC32C
    per 4 KiB page, then writes ``NAME.npy.pages.crc32c`` and the manifest with its
    ``page_checksums`` entry atomically (the sidecar first, the manifest last). Nothing is written
    when a block fails its checksum (the page checksums would certify corrupt data), nor when the
    manifest changed meanwhile (run it again) or the table was removed.

    Parameters
    ----------
    path
        The table's ``.npy`` path.
    progress
        Show a tqdm progress bar.

    Returns
    -------
    VerifyReport
        As ``verify_table``'s: blocks checked, pages written, bytes read, seconds.

    Raises
    ------
    TableFormatError
        The structure is wrong, a block fails its checksum, or the table was removed while it
        ran.
    TableChangingError
        The table changed (made anew, its manifest rewritten) while it ran: no verdict, nothing
        written.
    TierIOError
        A read of the data failed (EIO: the message names the table and the offset), or a write
        failed (disk full, read-only file system, file-size limit); the table is unchanged.

    Examples
    --------
    >>> add_page_checksums("/data/old.npy", progress=False).pages_checked  # doctest: +SKIP
    32
    >>> read_manifest("/data/old.npy").page_checksums.pages  # doctest: +SKIP
    32
    """
    npy_path, manifest_path = table_paths(path)
    manifest = check_table(npy_path)
    try:
        before = manifest_path.read_bytes()
    except FileNotFoundError:  # made anew (its manifest comes last), or removed, since checked
        raise TableChangingError(
            f"table {npy_path} was made anew (or removed) as its page checksums were to be "
            "computed; no verdict, nothing was written: run the command again once it is done"
        ) from None
    t0 = time.perf_counter()
    try:
        sums = _scan_table(npy_path, manifest, progress, "page checksums", expected_pages=None)
    except TableFormatError as exc:  # a block failed: of this table, or of one made anew since
        if _manifest_unchanged(npy_path, manifest):
            raise
        raise TableChangingError(
            f"table {npy_path} was made anew (or removed) while its page checksums were "
            "computed; no verdict, nothing was written: run the command again once it is done"
        ) from exc
    try:  # the manifest scanned, unless made anew in between (then no verdict)
        doc = json.loads(before)
        same = _same_manifest(TableManifest.from_json(doc), manifest)
    except (ValueError, TableFormatError):
        same = False
    if not same:
        raise TableChangingError(
            f"table {npy_path} changed while its page checksums were computed; expected it "
            "unchanged: run the command again"
        )
    content = sidecar_bytes(sums)
    entry = PageChecksums(
        pages=len(sums), file_crc32c=file_checksum(content), page_bytes=PAGE_BYTES
    )
    what = f"cannot add page checksums to table {npy_path}"
    unchanged = "the table was left as it was"
    with write_step(what, "creating its temporary files", unchanged):
        sidecar, manifest_file = atomic_files(
            (sidecar_path(npy_path), "wb"), (manifest_path, "w"), lock=True
        )
    try:
        with write_step(what, "writing its page checksum file", unchanged):
            sidecar.file.write(content)
            sidecar.finish()
        with write_step(what, "writing its manifest", unchanged):
            # the manifest as written, fields this version does not know (a newer one's)
            # included: only its page checksums change
            manifest_file.file.write(_doc_text({**doc, "page_checksums": entry.to_json()})[1])
            manifest_file.finish()
        with locked_folder(npy_path.parent):  # as _commit: no table commit in between
            if not (npy_path.exists() and manifest_path.exists()):
                raise TableFormatError(
                    f"table {npy_path} was removed while its page checksums were computed; "
                    "expected it to stay: nothing was written"
                )
            if manifest_path.read_bytes() != before:
                raise TableChangingError(
                    f"table {npy_path} changed while its page checksums were computed; "
                    "expected it unchanged: run the command again"
                )
            sidecar.publish()
            manifest_file.publish()
    except BaseException:
        sidecar.abort()
        manifest_file.abort()
        raise
    return VerifyReport(
        path=npy_path,
        blocks_checked=manifest.num_blocks,
        bytes_checked=manifest.data_bytes,
        seconds=time.perf_counter() - t0,
        pages_checked=len(sums),
    )


def replace_metadata(
    path: str | os.PathLike[str], metadata: dict[str, Any], *, expected: TableManifest
) -> TableManifest:
    """Give a table's manifest ``metadata`` in place of its own, its rows, checksums and every
    other field as they are (those this version does not know, a newer one's, included): the
    manifest is written atomically (a crash leaves the old one or the new), and only
    while it is still ``expected`` (the manifest the caller read); returns the new manifest.

    Raises
    ------
    TableFormatError
        ``metadata`` cannot be stored (not JSON), or the manifest changed since ``expected``.
    TierIOError
        A write failed; the table is unchanged.
    """
    _check_metadata(metadata)
    npy_path, _ = table_paths(path)
    # the manifest as written, fields this version does not know (a newer one's) included: only
    # its metadata changes
    doc, manifest_path = _read_manifest_doc(npy_path)
    where = f"table manifest {manifest_path}"
    if not _same_manifest(TableManifest.from_json(doc, where=where), expected):
        raise TableFormatError(
            f"table {npy_path} changed while its metadata was recorded; expected it unchanged: "
            "run the command again"
        )
    crc, text = _doc_text({**doc, "metadata": metadata})
    manifest = replace(expected, metadata=metadata, manifest_crc32c=crc)
    what = f"cannot record metadata in table {npy_path}"
    unchanged = "the table was left as it was"
    with write_step(what, "creating its temporary manifest", unchanged):
        (manifest_file,) = atomic_files((manifest_path, "w"), lock=True)
    try:
        with write_step(what, "writing its manifest", unchanged):
            manifest_file.file.write(text)
            manifest_file.finish()
        with locked_folder(npy_path.parent):  # as _commit: no table commit in between
            if not _same_manifest(read_manifest(npy_path), expected):
                raise TableFormatError(
                    f"table {npy_path} changed while its metadata was recorded; expected it "
                    "unchanged: run the command again"
                )
            manifest_file.publish()
    except BaseException:
        manifest_file.abort()
        raise
    return manifest


def _manifest_unless_published(npy_path: Path) -> TableManifest | None:
    """``npy_path``'s manifest; None while a writer holds the folder's lock with none there (a
    table being made anew: ``_publish`` unlinks the old manifest first, moves the new one in
    last). A manifest missing while no writer holds it is ``TableNotFoundError``."""
    try:
        return read_manifest(npy_path)
    except TableNotFoundError as exc:
        missing = exc
    try:
        fd = open_held(npy_path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        raise missing from None
    try:
        try:
            free = exclusive_now(fd, npy_path.parent)
        except TierIOError:  # no flock on this file system: the manifest is missing, as read
            raise missing from None
        return read_manifest(npy_path) if free else None  # under the lock: none published now
    finally:
        release(fd)


def _manifest_unchanged(npy_path: Path, manifest: TableManifest) -> bool:
    """Whether ``npy_path``'s manifest is still ``manifest`` (a table made anew unlinks it first,
    then moves its data and sidecar in, its new manifest last)."""
    try:
        return _same_manifest(read_manifest(npy_path), manifest)
    except (TableFormatError, OSError):
        return False


def _same_manifest(a: TableManifest, b: TableManifest) -> bool:
    """Whether two manifests read are the same (their equality leaves the metadata out)."""
    return (a, a.metadata, a.manifest_crc32c) == (b, b.metadata, b.manifest_crc32c)


def _scan_table(
    npy_path: Path,
    manifest: TableManifest,
    progress: bool,
    desc: str,
    expected_pages: np.ndarray | None,
    file: Any = None,
    stop: threading.Event | None = None,
    bytes_per_s: float | None = None,
) -> np.ndarray:
    """Stream the data once (``file``: the table's data file, open; else opened here, with
    ``O_DIRECT`` where the file system takes it: ``_open_uncached``): check its
    block CRC-32s (and page CRC32Cs against ``expected_pages``); ``VerifyStopped`` before a read
    once ``stop`` is set; each read waits until the pass is back under ``bytes_per_s`` (reads of
    a tenth of a second's bytes, whole pages; a block's CRC-32 is carried over reads, so a block
    of any size needs no buffer of its size)."""
    read_bytes = (  # (int() first: a rate past a float's range, 10**400, has a tenth too)
        VERIFY_READ_BYTES if bytes_per_s is None else min(VERIFY_READ_BYTES, int(bytes_per_s) // 10)
    )
    chunk = max(read_bytes // PAGE_BYTES, 1) * PAGE_BYTES
    block_crc = _BlockCrc(manifest.block_bytes)
    started = time.monotonic()
    buf = page_aligned(chunk)  # for an O_DIRECT file
    view = memoryview(buf)
    page_sums = []
    checked = 0
    with (
        _open_uncached(npy_path) if file is None else contextlib.nullcontext(file) as f,
        tqdm(
            total=manifest.data_bytes,
            unit="B",
            unit_scale=True,
            disable=not progress,
            desc=f"{desc} {npy_path.name}",
        ) as bar,
    ):
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        block = 0
        while checked < manifest.data_bytes:
            if bytes_per_s is not None:
                _wait(checked / bytes_per_s - (time.monotonic() - started), stop)
            if stop is not None and stop.is_set():
                raise VerifyStopped(
                    f"table {npy_path}: verification stopped after {checked:,} of "
                    f"{manifest.data_bytes:,} data bytes"
                )
            want = min(chunk, manifest.data_bytes - checked)
            try:
                got = _read_full(f, view, want, manifest.data_offset + checked)
            except OSError as exc:  # EIO from a failing disk: name the table and where
                raise TierIOError(
                    exc.errno or errno.EIO,
                    f"reading {want:,} bytes of table {npy_path} at byte "
                    f"{manifest.data_offset + checked:,} failed ({exc.strerror or exc}); expected "
                    "the whole file readable (check the disk)",
                    str(npy_path),
                ) from exc
            if got != want:
                raise TableFormatError(
                    f"table {npy_path}: short read at byte {manifest.data_offset + checked}: "
                    f"got {got} of {want} bytes (file changed while verifying?)"
                )
            block_crc.update(view[:want])
            if checked + want == manifest.data_bytes:
                block_crc.finish()  # the last block may be short
            for index in range(block, len(block_crc.sums)):  # the blocks this read completed
                actual, expected = block_crc.sums[index], manifest.block_checksums[index]
                if actual != expected:
                    start, end = manifest.block_range(index)
                    raise TableFormatError(
                        f"table {npy_path}: block {index} (file bytes [{start}, {end})) fails "
                        f"its checksum: expected crc32 0x{expected:08x}, actual 0x{actual:08x}"
                    )
            block = len(block_crc.sums)
            starts = np.arange(0, want, PAGE_BYTES, dtype=np.int64)
            sums = crc32c_pages(buf, starts, np.minimum(want - starts, PAGE_BYTES))
            if expected_pages is not None:
                first = checked // PAGE_BYTES
                bad = np.flatnonzero(sums != expected_pages[first : first + len(sums)])
                if len(bad):
                    raise page_checksum_error(
                        npy_path,
                        manifest,
                        first + int(bad[0]),
                        int(expected_pages[first + bad[0]]),
                        int(sums[bad[0]]),
                    )
            else:
                page_sums.append(sums)  # computing them: kept (verifying: only compared)
            checked += want
            bar.update(want)
    return np.concatenate(page_sums) if page_sums else np.empty(0, dtype=np.uint32)


def _wait(seconds: float, stop: threading.Event | None) -> None:
    """Sleep ``seconds`` (none when not positive; at most the longest a thread waits), or until
    ``stop`` is set."""
    if seconds > 0:  # (time.sleep refuses some a thread takes: EINVAL, OverflowError)
        (threading.Event() if stop is None else stop).wait(min(seconds, threading.TIMEOUT_MAX))


def page_checksum_error(
    npy_path: Path,
    manifest: TableManifest,
    page: int,
    expected: int,
    actual: int,
    row: int | None = None,
) -> ChecksumError:
    """The ChecksumError for data page ``page`` of a table, naming the requested ``row`` if any."""
    start = manifest.data_offset + page * PAGE_BYTES
    end = min(start + PAGE_BYTES, manifest.file_bytes)
    first_row = (start - manifest.data_offset) // manifest.row_bytes
    last_row = (end - 1 - manifest.data_offset) // manifest.row_bytes
    where = f"page {page} (file bytes [{start}, {end}), rows {first_row} to {last_row})"
    sums = f"expected crc32c 0x{expected:08x}, actual 0x{actual:08x}"
    message = (
        f"table {npy_path}: row {row} failed its page checksum: {where}: {sums}"
        if row is not None
        else f"table {npy_path}: {where} fails its page checksum: {sums}"
    )
    return ChecksumError(
        message, table=npy_path, page=page, row=row, expected=expected, actual=actual
    )


# ---- internals ---------------------------------------------------------------------------------


def _is_pos_int(x: object) -> bool:
    """True for an int (not bool) > 0."""
    return _is_int(x) and x > 0


def _is_int(x: object, equal_to: int | None = None) -> bool:
    """True for an int (not bool, which JSON's ``true`` is; not a float such as 4.0), equal to
    ``equal_to`` when given."""
    return isinstance(x, int) and not isinstance(x, bool) and equal_to in (None, x)


def _read_npy_header(f: Any, npy_path: Path) -> tuple[tuple[int, ...], bool, str, int]:
    """``(shape, fortran_order, descr, data_offset)`` of an open ``.npy`` file."""
    try:
        shape, fortran, dt = read_npy_header(f)
    except (ValueError, OSError, SyntaxError) as exc:
        raise TableFormatError(f"{npy_path}: not a readable .npy file: {exc}") from None
    return tuple(shape), bool(fortran), dt.str, f.tell()


def _npy_header(descr: str, rows: int, dim: int) -> bytes:
    """A .npy 1.0 header (magic + length + dict) space-padded to exactly DATA_OFFSET bytes."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    magic = b"\x93NUMPY\x01\x00"
    header_len = DATA_OFFSET - len(magic) - 2
    if len(text) + 1 > header_len:
        raise TableFormatError(f"shape ({rows}, {dim}) does not fit a {DATA_OFFSET}-byte header")
    text += " " * (header_len - len(text) - 1) + "\n"
    return magic + struct.pack("<H", header_len) + text.encode("latin1")


def _open_uncached(npy_path: Path) -> Any:
    """The table's data file open for a scrub: with ``O_DIRECT`` where the file system takes it
    (a pass over the whole table through the page cache would evict the pages the cold tier's
    mmap and pread reads keep hot, and check the cached copy, not the disk); else plainly."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(npy_path, flags | getattr(os, "O_DIRECT", 0))
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # (tmpfs refuses O_DIRECT so)
            raise
        fd = os.open(npy_path, flags)
    return open(fd, "rb", buffering=0)  # noqa: SIM115 (closed by the caller)


def _read_full(f: Any, view: memoryview, want: int, offset: int) -> int:
    """Read ``want`` bytes at ``offset`` into ``view`` (page-aligned, whole pages long enough);
    bytes read (fewer at EOF). An ``O_DIRECT`` file reads whole pages; one whose reads the file
    system refuses (EINVAL) goes on through the page cache."""
    fd = f.fileno()
    direct = getattr(os, "O_DIRECT", 0) & fcntl.fcntl(fd, fcntl.F_GETFL)
    end = -(-want // PAGE_BYTES) * PAGE_BYTES if direct else want
    got = 0
    while got < want:
        try:
            n = os.preadv(fd, [view[got:end]], offset + got)
        except OSError as exc:
            if not direct or exc.errno != errno.EINVAL or got % PAGE_BYTES:
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            direct, end = 0, want
            continue
        if not n:
            break
        got += n
    return min(got, want)


class _BlockCrc:
    """Running CRC-32 per fixed-size block over a byte stream fed in arbitrary pieces."""

    def __init__(self, block_bytes: int):
        self.block_bytes = block_bytes
        self.sums: list[int] = []
        self._crc = 0
        self._filled = 0

    def update(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            take = min(self.block_bytes - self._filled, len(data) - pos)
            self._crc = zlib.crc32(data[pos : pos + take], self._crc)
            self._filled += take
            pos += take
            if self._filled == self.block_bytes:
                self.sums.append(self._crc)
                self._crc, self._filled = 0, 0

    def finish(self) -> list[int]:
        if self._filled:
            self.sums.append(self._crc)
            self._crc, self._filled = 0, 0
        return self.sums


def _chunks(reader: SourceReader, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Row ranges of about ``chunk_bytes`` each, rounded to the reader's unit when possible."""
    row_bytes = reader.dim * TABLE_DTYPES[reader.dtype][1]
    step = max(1, chunk_bytes // row_bytes)
    if step >= reader.unit_rows:
        step -= step % reader.unit_rows
    for start in range(0, reader.rows, step):
        yield start, min(start + step, reader.rows)


def _write_table(
    npy_path: Path,
    manifest_path: Path,
    reader: SourceReader,
    block_bytes: int,
    chunk_bytes: int,
    progress: bool,
    overwrite: bool,
    metadata: dict[str, Any],
) -> TableManifest:
    """Write temp files, fsync, then commit by renames (see the module docstring)."""
    directory = npy_path.parent
    if not directory.is_dir():
        raise TableNotFoundError(
            errno.ENOENT,
            f"target directory {directory} does not exist; expected an existing folder (create it "
            "first)",
            str(directory),
        )
    refuse_existing(npy_path, manifest_path, overwrite)  # (a directory in the way: AtomicFile)
    remove_abandoned_creations(npy_path)  # before the free space is counted: they take it
    _, itemsize, _ = TABLE_DTYPES[reader.dtype]
    descr = TABLE_DTYPES[reader.dtype][0]
    row_bytes = reader.dim * itemsize
    _check_free_space(
        directory, DATA_OFFSET + reader.rows * row_bytes, block_bytes, metadata, npy_path
    )
    header = _npy_header(descr, reader.rows, reader.dim)
    what, unpublished = f"cannot write table {npy_path}", "nothing was published"
    crc = _BlockCrc(block_bytes)
    page_crc = PageCrcAccumulator(PAGE_BYTES)
    with write_step(what, "creating its temporary files", unpublished):
        data_file, sidecar, manifest_file = atomic_files(
            (npy_path, "wb"), (sidecar_path(npy_path), "wb"), (manifest_path, "w"), lock=True
        )
    try:
        f = data_file.file
        with tqdm(
            total=reader.rows * row_bytes,
            unit="B",
            unit_scale=True,
            disable=not progress,
            desc=f"create {npy_path.name}",
        ) as bar:
            with write_step(what, "writing its data", unpublished):
                f.write(header)
            for start, stop in _chunks(reader, chunk_bytes):
                block = reader.read(start, stop)
                if block.shape != (stop - start, reader.dim) or block.dtype.str != descr:
                    raise TableFormatError(  # a source changed under us (e.g. file rewritten)
                        f"source rows [{start}, {stop}) came back as {block.shape} "
                        f"{block.dtype.str}; expected {(stop - start, reader.dim)} {descr}"
                    )
                try:
                    _check_finite(block, reader.dtype, start, reader.quantization)
                except TableFormatError as exc:  # which table, from what (convert-hf makes many)
                    raise TableFormatError(f"{what} from {reader.description}: {exc}") from None
                data = block.reshape(-1).view(np.uint8)
                with write_step(what, "writing its data", unpublished):
                    f.write(data)
                crc.update(memoryview(data))
                page_crc.update(data)
                bar.update(len(data))
        with write_step(what, "writing its data", unpublished):
            data_file.finish()
        page_sums = sidecar_bytes(page_crc.finish())
        with write_step(what, "writing its page checksum file", unpublished):
            sidecar.file.write(page_sums)
            sidecar.finish()
        manifest = TableManifest(
            rows=reader.rows,
            dim=reader.dim,
            dtype=reader.dtype,
            row_bytes=row_bytes,
            data_offset=DATA_OFFSET,
            block_bytes=block_bytes,
            block_checksums=tuple(crc.finish()),
            source=reader.description,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (3.10)
            library_version=package_version("tiered-store") or "unknown",
            format_version=FORMAT_VERSION if reader.quantization else 1,  # plain: readable by v1
            metadata=metadata,
            quantization=reader.quantization,
            page_checksums=PageChecksums(
                pages=len(page_sums) // 4,
                file_crc32c=file_checksum(page_sums),
                page_bytes=PAGE_BYTES,
            ),
        )
        manifest, text = _manifest_text(manifest)
        with write_step(what, "writing its manifest", unpublished):
            manifest_file.file.write(text)
            manifest_file.finish()
        _commit(data_file, sidecar, manifest_file, overwrite)
    except BaseException:
        data_file.abort()
        sidecar.abort()
        manifest_file.abort()
        raise
    return manifest


def remove_abandoned_creations(npy_path: Path) -> list[tuple[str, int]]:
    """Delete the hidden temporaries (``.NAME.npy*.HEX.tmp``) that creations of the table
    ``npy_path`` (or additions of its page checksums) killed part way left, with a warning
    saying how many bytes that freed; ``(name, bytes)`` of each. Every writer holds a ``flock``
    on its temporaries until they are renamed, so a live one's, in any process, are left."""
    names = "|".join(re.escape(p.name) for p in (npy_path, sidecar_path(npy_path)))
    removed = remove_abandoned_temporaries(
        npy_path.parent, f"{names}|{re.escape(table_paths(npy_path)[1].name)}"
    )
    if removed:
        freed = sum(size for _, size in removed)
        warn_at_caller(
            f"table {npy_path}: removed {len(removed)} temporary file"
            f"{'s' if len(removed) > 1 else ''} ({freed:,} bytes) that a creation killed part way "
            "left",
            UserWarning,
        )
    return removed


def _check_free_space(
    directory: Path, data_bytes: int, block_bytes: int, metadata: dict[str, Any], npy_path: Path
) -> None:
    """Refuse (before writing a byte) a table that the file system has no room for.

    Each of its three files takes whole file-system blocks: the data; the page checksums, 4 bytes
    per 4 KiB page; the manifest, a page for its fixed fields, the user's ``metadata`` (as JSON,
    a space more per line for its indent there) and up to 12 bytes of JSON per ``block_bytes``
    block (a CRC-32 of 10 digits and ", ")."""
    stat = os.statvfs(directory)
    user = json.dumps(metadata, indent=1, default=str)
    sizes = (
        data_bytes,
        4 * -(-data_bytes // PAGE_BYTES),
        PAGE_BYTES + len(user.encode()) + user.count("\n") + 12 * -(-data_bytes // block_bytes),
    )
    needed = sum(-(-size // stat.f_frsize) * stat.f_frsize for size in sizes)
    free = stat.f_bavail * stat.f_frsize
    if needed > free:
        raise TierIOError(
            errno.ENOSPC,
            f"table {npy_path} needs {needed:,} bytes ({needed / 2**30:,.1f} GiB) but {directory} "
            f"has {free:,} bytes ({free / 2**30:,.1f} GiB) free; expected at most the free space",
        )


def _manifest_text(manifest: TableManifest) -> tuple[TableManifest, str]:
    """The manifest with its own checksum, and its file's text: indented JSON, the checksum
    after the fields it covers, the (possibly long) block checksum list on one line at the end."""
    crc, text = _doc_text(manifest.to_json())
    return replace(manifest, manifest_crc32c=crc), text


def _doc_text(doc: dict[str, Any]) -> tuple[int, str]:
    """The checksum of the manifest ``doc`` and its file's text (see ``_manifest_text``)."""
    doc = sealed(doc)
    sums = doc.pop("block_checksums")
    doc[FIELD] = doc.pop(FIELD)  # after the fields it covers, wherever the doc read held it
    text = json.dumps(doc, indent=1)
    text = f'{text[:-2]},\n "block_checksums": {json.dumps(sums)}\n}}\n'
    return doc[FIELD], text


def _check_finite(
    block: np.ndarray, dtype: str, first_row: int, quant: RowQuantization | None = None
) -> None:
    """Refuse a chunk of float rows holding inf or NaN (in the table's dtype: a finite source
    value past its range becomes inf), or of packed rows that dequantise to NaN or inf, naming
    the row; a table is never written with them."""
    if quant is not None:
        _check_packed(block, quant, first_row)
        return
    values = block
    if dtype == "bfloat16":  # stored as raw bits: the high half of a float32's (no copy made
        # through torch, which warns about a read-only memory map)
        values = (block.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    finite = np.isfinite(values)
    if finite.all():
        return
    row, col = (int(i) for i in np.argwhere(~finite)[0])
    limit = float(torch.finfo(TABLE_DTYPES[dtype][2]).max)
    raise TableFormatError(
        f"source row {first_row + row:,} column {col} is {values[row, col]} as {dtype}: the "
        f"source holds a non-finite value there, or one past {dtype}'s range (|x| <= {limit:g}); "
        "expected finite rows"
    )


#: the smallest scale byte whose blocks may dequantise past bfloat16's range (lookups' dtype):
#: 448 (e4m3's largest) x 2**(byte - 127); the blocks of such a scale are checked value by value
_OVERFLOW_SCALE = SCALE_BIAS + int(math.log2(float(torch.finfo(torch.bfloat16).max) / FP8_E4M3_MAX))


def _check_packed(block: np.ndarray, quant: RowQuantization, first_row: int) -> None:
    """Refuse packed rows holding a NaN fp8 code or scale byte, or finite codes and scales that
    dequantise past bfloat16's range (code 0x7E, 448, with scale byte 0xFE, 2**127): lookups
    would serve NaN or inf rows. The error names the row, column and bytes."""
    codes, scales = block[:, : quant.values], block[:, quant.values :]
    if (codes & 0x7F).max(initial=0) < 0x7F and scales.max(initial=0) < _OVERFLOW_SCALE:
        return  # every chunk of a sound table: two reductions, no array of flags
    nan = np.concatenate([(codes & 0x7F) == 0x7F, scales == 0xFF], axis=1)
    if nan.any():
        row, col = (int(i) for i in np.argwhere(nan)[0])
        what = "fp8 code" if col < quant.values else "scale byte"
        raise TableFormatError(
            f"source row {first_row + row:,} column {col} is {what} 0x{block[row, col]:02x}, "
            "which is NaN (fp8 e4m3 codes 0x7F and 0xFF, ue8m0 scale byte 0xFF); expected "
            "finite packed rows"
        )
    suspect = np.flatnonzero((scales >= _OVERFLOW_SCALE).any(axis=1))
    finite = torch.isfinite(dequantize_rows(torch.from_numpy(block[suspect]), quant))
    if bool(finite.all()):
        return
    at, col = (int(i) for i in torch.nonzero(~finite)[0])
    row, scale_col = int(suspect[at]), quant.values + col // quant.block
    raise TableFormatError(
        f"source row {first_row + row:,} column {col} is fp8 code 0x{block[row, col]:02x} with "
        f"scale byte 0x{block[row, scale_col]:02x} (column {scale_col}), which dequantise past "
        f"bfloat16's range (|x| <= {float(torch.finfo(torch.bfloat16).max):g}) to inf; expected "
        "finite packed rows"
    )


def refuse_existing(npy_path: Path, manifest_path: Path, overwrite: bool) -> None:
    """Raise TableExistsError if either table file exists, or the history of a table there (its
    writes, compacted versions), and overwriting was not asked for."""
    from .delta.table_versions import has_history  # noqa: PLC0415 (delta builds on this module)

    if overwrite:
        return
    for p in (npy_path, manifest_path):
        if p.exists():
            raise TableExistsError(
                errno.EEXIST,
                f"table file {p} already exists; pass overwrite=True to replace the table",
                str(p),
            )
    if has_history(npy_path):
        raise TableExistsError(
            errno.EEXIST,
            f"table {npy_path} has committed writes or compacted versions beside it (a table is "
            "there); pass overwrite=True to replace the table and its history",
            str(npy_path),
        )


def replace_table(
    finished: str | os.PathLike[str],
    target: str | os.PathLike[str],
    overwrite: bool,
    *,
    writer_locked: bool = False,
) -> None:
    """Move the table at ``finished`` (made by ``create_table`` in ``target``'s folder) to
    ``target`` by renames, published as ``create_table`` publishes its own (``_publish``);
    ``writer_locked``: the caller holds ``target``'s writer lock."""
    new_npy, new_manifest = table_paths(finished)
    npy, manifest = table_paths(target)

    def move() -> None:
        os.replace(new_npy, npy)
        os.replace(sidecar_path(new_npy), sidecar_path(npy))
        fsync_dir(npy.parent)
        os.replace(new_manifest, manifest)
        fsync_dir(npy.parent)

    _publish(npy, manifest, overwrite, move, writer_locked=writer_locked)


def _commit(data: AtomicFile, sidecar: AtomicFile, manifest: AtomicFile, overwrite: bool) -> None:
    """Publish the finished files (``_publish``)."""

    def move() -> None:
        for finished in (data, sidecar, manifest):
            finished.publish()

    _publish(data.path, manifest.path, overwrite, move)


def _publish(
    npy: Path,
    manifest: Path,
    overwrite: bool,
    move: Callable[[], None],
    *,
    writer_locked: bool = False,
) -> None:
    """Under the folder's lock (cooperating writers serialise), and with ``overwrite`` over a
    table there: drop its writes and versions (they would be served over the new rows; under
    its writer lock unless ``writer_locked``) and unlink its manifest (the old table stops being
    openable before its ``.npy`` changes); then ``move`` the new files into place, the manifest
    last, so a half-done publish never opens."""
    with locked_folder(npy.parent):
        refuse_existing(npy, manifest, overwrite)  # re-checked under the lock
        if overwrite:
            from .delta.table_versions import forget_history, has_history  # noqa: PLC0415

            if has_history(npy):
                forget_history(npy, writer_locked=writer_locked)
        if manifest.exists():
            manifest.unlink()
            fsync_dir(npy.parent)
        move()
