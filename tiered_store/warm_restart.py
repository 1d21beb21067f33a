"""Warm restart: the rows each cache tier held, saved beside the table and read back on open.

The file ``TABLE.npy.restart`` holds, per tier (hot, warm), the row ids it held, most valuable
first (by the eviction policy's priority), tagged with the table version it was saved against
and checksummed (CRC32C). Layout: ``MAGIC``, a 4-byte little-endian header length, a JSON header
(``identity``, ``tiers``: rows per tier), the ids as little-endian int64 tier after tier, then
the CRC32C of everything before it (4 bytes, little-endian).
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from .atomic_file import AtomicFile
from .cold_table import ColdTable
from .table_format import table_paths

__all__ = ["RestartWarning", "load_restart", "restart_path", "save_restart", "table_identity"]

MAGIC = b"TSRESTART1\n"
_LEN = struct.Struct("<I")


class RestartWarning(UserWarning):
    """A warm-restart file was stale or unreadable: the store starts cold (and keeps serving)."""


def restart_path(table: str | os.PathLike[str]) -> Path:
    """``TABLE.npy.restart``, beside the table the config names.

    Examples
    --------
    >>> restart_path("/d/t.npy").name
    't.npy.restart'
    """
    return Path(f"{table_paths(table)[0]}.restart")


def table_identity(cold: ColdTable, generation: int) -> dict[str, Any]:
    """What a restart file must match: the version's generation, shape, dtype and block checksums."""
    m = cold.manifest
    sums = np.asarray(m.block_checksums, dtype=np.uint32).tobytes()
    return {
        "generation": int(generation),
        "rows": int(m.rows),
        "dim": int(m.dim),
        "dtype": str(m.dtype),
        "row_bytes": int(m.row_bytes),
        "block_checksums_crc32c": crc32c.crc32c(sums),
    }


def save_restart(path: Path, identity: dict[str, Any], tiers: dict[str, np.ndarray]) -> None:
    """Write ``tiers`` (name -> row ids, most valuable first) for ``identity``, atomically."""
    header = json.dumps(
        {"identity": identity, "tiers": {k: int(v.size) for k, v in tiers.items()}}
    ).encode()
    body = b"".join(
        [MAGIC, _LEN.pack(len(header)), header]
        + [np.ascontiguousarray(v, dtype="<i8").tobytes() for v in tiers.values()]
    )
    out = AtomicFile(path, "wb")
    try:
        out.file.write(body)
        out.file.write(_LEN.pack(crc32c.crc32c(body)))
        out.commit()
    except BaseException:
        out.abort()
        raise


def load_restart(path: Path, identity: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The saved tiers if ``path`` exists, is intact and matches ``identity``; else None (with a
    ``RestartWarning`` naming the file and the mismatch, unless the file is simply absent)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return _cold_start(path, f"it is unreadable ({exc})")
    if len(data) < len(MAGIC) + 2 * _LEN.size or not data.startswith(MAGIC):
        return _cold_start(
            path, f"it is not a warm-restart file ({len(data)} bytes, no {MAGIC!r} header)"
        )
    body, (want_crc,) = data[:-4], _LEN.unpack(data[-4:])
    have_crc = crc32c.crc32c(body)
    if have_crc != want_crc:
        return _cold_start(
            path,
            f"checksum mismatch (CRC32C {have_crc:#010x}, saved {want_crc:#010x}): corrupt or truncated",
        )
    (n,) = _LEN.unpack_from(body, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    try:
        header = json.loads(body[start : start + n])
        saved, counts = header["identity"], {k: int(v) for k, v in header["tiers"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return _cold_start(path, f"its header is unreadable ({exc})")
    if saved != identity:
        diff = ", ".join(
            f"{k} {saved.get(k)!r} (table now {identity[k]!r})"
            for k in identity
            if saved.get(k) != identity[k]
        )
        return _cold_start(path, f"it was saved for another table version: {diff}")
    if (len(body) - start - n) % 8:
        return _cold_start(
            path, f"its id section is {len(body) - start - n} bytes, not whole int64s"
        )
    ids = np.frombuffer(body, dtype="<i8", offset=start + n)
    if ids.size != sum(counts.values()):
        return _cold_start(path, f"it holds {ids.size} ids; its header says {sum(counts.values())}")
    if ids.size and (ids.min() < 0 or ids.max() >= identity["rows"]):
        return _cold_start(path, f"it holds ids outside [0, {identity['rows']})")
    bounds = np.cumsum([0, *counts.values()])
    return {k: ids[bounds[i] : bounds[i + 1]].astype(np.int64) for i, k in enumerate(counts)}


def _cold_start(path: Path, why: str) -> None:
    """Warn that ``path`` is not used, and why; the caller starts cold."""
    warnings.warn(
        f"warm restart: {path} not used, {why}; starting cold (serving is unaffected)",
        RestartWarning,
        stacklevel=3,
    )
    return None
