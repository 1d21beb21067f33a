"""Warm restart: the rows each cache tier held, saved beside the table and read back on open.

The file ``TABLE.npy.restart`` holds, per tier (hot, warm), the row ids it held, most valuable
first (by the eviction policy's priority), and, for a ``zipf-tuned`` tier that re-pins online
(:mod:`tiered_store.online_repin`), the rows it pinned and its online profile (the count-min
sketch's counters, with the held rows' per-slot counts folded in, and its window totals); tagged
with the table version it was saved against and checksummed (CRC32C). Layout (format 2):
``MAGIC``, a 4-byte little-endian header length, a JSON header (``identity``; ``tiers``: rows held
per tier; ``pinned``: pinned rows per tier; ``profiles``: per tier, the sketch's shape and
totals), the held ids as little-endian int64 tier after tier, the pinned ids likewise, the
sketches as little-endian float32 tier after tier, then the CRC32C of everything before it (4
bytes, little-endian). A format-1 file (no profiles), or one of a newer format (a later release
wrote it), is refused with a warning naming its format: the store starts cold. Every format ends
with that CRC32C: a file whose magic names another format but whose CRC32C does not hold (a bit
flipped in the format's digit) is refused as corrupt.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from .atomic_file import AtomicFile, remove_abandoned_temporaries, special_kind, write_step
from .cold_table import ColdTable
from .errors import warn_at_caller
from .table_format import table_paths

__all__ = [
    "RestartState",
    "RestartWarning",
    "load_restart",
    "remove_abandoned_saves",
    "restart_path",
    "save_restart",
    "table_identity",
]

FORMAT = 2
MAGIC = b"TSRESTART%d\n" % FORMAT
# any format's magic: an older or newer one is refused with a warning naming its version
_ANY_MAGIC = re.compile(rb"TSRESTART([0-9]{1,9})\n")
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


@dataclass
class RestartState:
    """What a restart file holds: per tier, the rows held (most valuable first), the rows pinned
    by online re-pinning, and its online profile (a state dict and the sketch's counters)."""

    held: dict[str, np.ndarray]
    pinned: dict[str, np.ndarray] = field(default_factory=dict)
    profiles: dict[str, tuple[dict[str, Any], np.ndarray]] = field(default_factory=dict)


def save_restart(
    path: Path,
    identity: dict[str, Any],
    state: RestartState,
    still_current: Callable[[], None] | None = None,
) -> None:
    """Write ``state`` for ``identity``, atomically. ``still_current`` is called once the file
    is written, before its rename: what it raises leaves the file at ``path`` as it was.

    Examples
    --------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "t.npy.restart"
    >>> ident = {"generation": 0, "rows": 10}
    >>> sketch = np.arange(8, dtype=np.float32).reshape(2, 4)
    >>> save_restart(p, ident, RestartState({"hot": np.array([3, 1])}, {"hot": np.array([3])},
    ...              {"hot": ({"windows": 2}, sketch)}))
    >>> back = load_restart(p, ident)
    >>> back.held["hot"].tolist(), back.pinned["hot"].tolist(), back.profiles["hot"][1][1].tolist()
    ([3, 1], [3], [4.0, 5.0, 6.0, 7.0])
    """
    profiles = {
        name: {**meta, "shape": list(sketch.shape)}
        for name, (meta, sketch) in state.profiles.items()
    }
    header = json.dumps(
        {
            "identity": identity,
            "tiers": {k: int(v.size) for k, v in state.held.items()},
            "pinned": {k: int(v.size) for k, v in state.pinned.items()},
            "profiles": profiles,
        }
    ).encode()
    parts = (
        [MAGIC, _LEN.pack(len(header)), header]
        + [np.ascontiguousarray(v, dtype="<i8").ravel() for v in state.held.values()]
        + [np.ascontiguousarray(v, dtype="<i8").ravel() for v in state.pinned.values()]
        + [np.ascontiguousarray(s, dtype="<f4").ravel() for _, s in state.profiles.values()]
    )  # flat views: memoryview's cast refuses a shape with a 0 in it (a (2, 0) sketch)
    # lock: remove_abandoned_saves leaves it alone; a FIFO at the path is refused (the close warns)
    out = AtomicFile(path, "wb", lock=True)
    try:
        # written and checksummed part by part from the arrays' own memory: joining them into
        # one bytes object (hundreds of MB with a sketch) held the GIL, so lookups, for its copies
        crc = 0
        with write_step(f"cannot save warm-restart file {path}", "writing it", "it is as it was"):
            for part in parts:
                view = memoryview(part).cast("B")
                out.file.write(view)
                crc = crc32c.crc32c(view, crc)
            out.file.write(_LEN.pack(crc))
            out.finish()
        if still_current is not None:
            still_current()
        out.publish()
    except BaseException:
        out.abort()
        raise


def remove_abandoned_saves(path: Path) -> list[str]:
    """Delete the temporaries (``.TABLE.npy.restart.<hex>.tmp``, a whole copy each) of saves to
    ``path`` killed before their rename; returns the names removed. A save under way, in this
    process or another, holds a ``flock`` on its temporary: that one is left to it."""
    return [name for name, _ in remove_abandoned_temporaries(path.parent, re.escape(path.name))]


def load_restart(path: Path, identity: dict[str, Any]) -> RestartState | None:
    """The saved state if ``path`` exists, is intact, of this format and matches ``identity``;
    else None (with a ``RestartWarning`` naming the file and the mismatch, unless the file is
    simply absent)."""
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
            kind = "a folder" if stat.S_ISDIR(mode) else special_kind(mode)
            return _cold_start(path, f"it is {kind}; expected the warm-restart file")
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return _cold_start(path, f"it is unreadable ({exc})")
    other = _ANY_MAGIC.match(data)
    if other is not None and other.group() != MAGIC:
        named = other.group().strip().decode()
        have_crc, want_crc = _crc32cs(data)
        if have_crc != want_crc:  # a bit flipped in a format digit is no file of another format
            return _cold_start(
                path,
                f"checksum mismatch (its magic reads {named}, and the CRC32C ending every "
                "format's file does not hold): corrupt or truncated",
            )
        age = "an older" if int(other[1]) < FORMAT else "a newer"
        return _cold_start(
            path, f"it is in {age} format ({named}; expected {MAGIC.strip().decode()})"
        )
    if len(data) < len(MAGIC) + 2 * _LEN.size or not data.startswith(MAGIC):
        return _cold_start(
            path, f"it is not a warm-restart file ({len(data)} bytes, no {MAGIC!r} header)"
        )
    body = memoryview(data)[:-4]  # a view: no copy
    have_crc, want_crc = _crc32cs(data)
    if have_crc != want_crc:
        return _cold_start(
            path,
            f"checksum mismatch (CRC32C {have_crc:#010x}, saved {want_crc:#010x}): corrupt or truncated",
        )
    (n,) = _LEN.unpack_from(body, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    try:
        header = json.loads(bytes(body[start : start + n]))
        saved = header["identity"]
        counts = {k: int(v) for k, v in header["tiers"].items()}
        pinned = {k: int(v) for k, v in header["pinned"].items()}
        profiles = {k: dict(v) for k, v in header["profiles"].items()}
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in profiles.items()}
        if not isinstance(saved, dict):
            raise TypeError(f"identity is a {type(saved).__name__}, not an object")
        for name, shape in shapes.items():
            if len(shape) != 2:
                raise ValueError(f"the {name} tier's sketch shape is {shape}; expected 2-D")
        sizes = [*counts.values(), *pinned.values(), *(d for s in shapes.values() for d in s)]
        if any(v < 0 for v in sizes):
            raise ValueError(f"a negative row count or sketch size ({min(sizes)})")
        if any(v > len(data) for v in sizes):  # more than the file holds (numpy would overflow)
            raise ValueError(
                f"a row count or sketch size of {max(sizes)} in a {len(data)}-byte file"
            )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError) as exc:
        return _cold_start(path, f"its header is unreadable ({type(exc).__name__}: {exc})")
    if saved != identity:
        diff = ", ".join(
            f"{k} {saved.get(k)!r} (table now {identity.get(k)!r})"
            for k in sorted({*identity, *saved}, key=[*identity, *saved].index)
            if saved.get(k) != identity.get(k)
        )
        return _cold_start(path, f"it was saved for another table version: {diff}")
    n_ids = sum(counts.values()) + sum(pinned.values())
    n_counters = sum(math.prod(s) for s in shapes.values())  # Python ints: no wrap-around
    if len(body) - start - n != 8 * n_ids + 4 * n_counters:
        return _cold_start(
            path,
            f"its data section is {len(body) - start - n} bytes; its header says {n_ids} ids "
            f"and {n_counters} counters",
        )
    ids = np.frombuffer(body, dtype="<i8", offset=start + n, count=n_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= identity["rows"]):
        return _cold_start(path, f"it holds ids outside [0, {identity['rows']})")
    sketches = np.frombuffer(body, dtype="<f4", offset=start + n + 8 * n_ids)
    bounds = np.cumsum([0, *counts.values(), *pinned.values()])
    names = [*counts, *pinned]
    parts = [ids[bounds[i] : bounds[i + 1]].astype(np.int64) for i in range(len(names))]
    state = RestartState(
        dict(zip(counts, parts[: len(counts)], strict=True)),
        dict(zip(pinned, parts[len(counts) :], strict=True)),
    )
    at = 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        sketch = sketches[at : at + size].astype(np.float32).reshape(shape)
        state.profiles[name] = (profiles[name], sketch)
        at += size
    return state


def _crc32cs(data: bytes) -> tuple[int, int]:
    """The CRC32C of ``data`` but its last 4 bytes, and the one they hold (every format ends with
    it); ``data`` holds at least its magic."""
    return crc32c.crc32c(memoryview(data)[:-4]), _LEN.unpack(data[-4:])[0]


def restart_warning(path: Path, why: str) -> None:
    """Warn that part of ``path`` is not used, and why (the rest is)."""
    warn_at_caller(f"warm restart: {path}: {why}", RestartWarning)


def _cold_start(path: Path, why: str) -> None:
    """Warn that ``path`` is not used, and why; the caller starts cold."""
    warn_at_caller(
        f"warm restart: {path} not used, {why}; starting cold (serving is unaffected)",
        RestartWarning,
    )
    return None
