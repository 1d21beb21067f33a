"""Table versions: which file holds a table's current version, who writes it, who still reads it.

A table is named by its first file, ``TABLE.npy`` (generation 0). Compaction writes generation
``N`` to ``TABLE.gN.npy`` (with its manifest and page checksums) and then switches the pointer
``TABLE.npy.current`` (``{"generation": N, "file": "TABLE.gN.npy"}``) with one atomic rename:
an opener sees the old version or the new one, whole. Each version has its own delta
(``TABLE.gN.npy.delta/``), so the new version starts with none. Its manifest records whose
version it is (``metadata["version_of"]``: ``{"table": "TABLE.npy", "generation": N,
"compacted_from": M}``): cleanups remove a ``TABLE.gN.npy`` only when it says so (or has no
manifest: a version written or removed part way), never another table that happens to be named
so, which they leave with a warning.

Who uses what is told by ``flock``s, which the kernel drops when a process dies (kill -9
included): an open store holds a shared lock on its version's ``.npy``; one writer per table holds
an exclusive lock on ``TABLE.npy.writer.lock``. An old version is removed once its shared lock can
be taken exclusively (no store has it open). A forked child closes its copies of these fds at
once (:mod:`tiered_store.process_locks`): a lock shared with a child (a DataLoader worker) would
outlive a killed parent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..atomic_file import atomic_write, fsync_dir, remove_abandoned_temporaries
from ..errors import ConfigError, TableFormatError, TierIOError, warn_at_caller
from ..page_checksums import sidecar_path
from ..process_locks import exclusive_now, flock_holder, open_held, release
from ..table_format import check_table, not_a_table, table_paths
from ..table_sources import TableNotFoundError
from .row_delta import delta_path, remove_delta_temporaries

T = TypeVar("T")

_LOCK_RETRY_S = 0.02  # between tries of a writer lock waited for
# in a compacted version's manifest metadata:
# {"table": "TABLE.npy", "generation": N, "compacted_from": the generation it was compacted from}
VERSION_OF = "version_of"


__all__ = [
    "current_version",
    "forget_history",
    "hold_version",
    "publish_version",
    "release",
    "remove_table_files",
    "remove_unused_versions",
    "version_path",
    "version_record",
    "writer_lock",
]


def _npy(table: str | os.PathLike[str]) -> Path:
    """The table's ``.npy``, symlinks resolved: every entry point (a store, compaction, an
    overwrite) finds one pointer, one writer lock and one delta, whichever link it was given."""
    return Path(os.path.realpath(table_paths(table)[0]))  # a loop: as written (resolve raises)


def pointer_path(table: str | os.PathLike[str]) -> Path:
    """``TABLE.npy.current``: names the current version (absent: generation 0)."""
    return Path(f"{_npy(table)}.current")


def version_path(table: str | os.PathLike[str], generation: int) -> Path:
    """The ``.npy`` of ``generation`` (0: the table's own path).

    Examples
    --------
    >>> version_path("/d/t.npy", 0).name, version_path("/d/t.npy", 3).name
    ('t.npy', 't.g3.npy')
    """
    npy = _npy(table)
    return npy if generation == 0 else npy.with_name(f"{npy.stem}.g{generation}.npy")


def current_version(table: str | os.PathLike[str]) -> tuple[Path, int]:
    """(the ``.npy`` of the current version, its generation) of the table named ``table``.
    Refuses a version's own file (``TABLE.gN.npy``), which names a generation, not a table."""
    if Path(table).is_dir():  # a folder, not a table: say so (and name the tables in it)
        raise not_a_table(table)
    _refuse_a_version_file(table)
    pointer = pointer_path(table)
    try:
        doc = json.loads(pointer.read_text())
        generation = doc["generation"]
        if type(generation) is not int or not 0 <= generation < 2**63:  # not 1.5, true or "2"
            raise ValueError(f"generation {generation!r}, not a whole number in [0, 2**63)")
    except FileNotFoundError:
        if (error := not_a_table(table)) is not None:
            raise error from None
        return _npy(table), 0
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise TableFormatError(
            f"table version pointer {pointer} is unreadable ({exc}); expected "
            '{"generation": N, "file": ...} as compaction writes it'
        ) from None
    return version_path(table, generation), generation


def present_version(table: str | os.PathLike[str]) -> tuple[Path, int]:
    """``current_version``, refused (naming the pointer) when the version it names is gone."""
    path, generation = current_version(table)
    _refuse_a_missing_version(table, path, generation)
    return path, generation


def check_current_version(table: str | os.PathLike[str]) -> None:
    """``check_table`` on the table's current version, read again when a compaction elsewhere
    moved the pointer and removed the version read (else that race reads "does not exist")."""
    while True:
        current, generation = current_version(table)
        try:
            check_table(current)
            return
        except FileNotFoundError:
            if current_version(table)[0] == current:
                _refuse_a_missing_version(table, current, generation)
                raise


def _refuse_a_missing_version(table: str | os.PathLike[str], path: Path, generation: int) -> None:
    """Say that the version the pointer names is gone, not that the table was never made."""
    if generation and not path.exists():
        raise TableNotFoundError(
            errno.ENOENT,
            f"table {table}: its version pointer {pointer_path(table).name} names generation "
            f"{generation}, {path.name}, which does not exist; expected it beside the pointer "
            "(a table's files are NAME.npy*, NAME.gN.npy*: copy or restore them together)",
            str(path),
        ) from None


def _refuse_a_version_file(table: str | os.PathLike[str]) -> None:
    """A ``TABLE.gN.npy`` beside ``TABLE.npy.current`` is one of TABLE's versions (unless its
    manifest says it is not and the pointer does not name it: another table named so): opened,
    written or compacted as a table of its own, its writes would miss TABLE, and compacting it
    would remove the file TABLE's pointer names."""
    npy = _npy(table)
    match = re.fullmatch(r"(.+)\.g([1-9][0-9]*)\.npy", npy.name)
    if match is None:
        return
    base = npy.with_name(f"{match[1]}.npy")
    if pointer_path(base).exists() and _owned(base, int(match[2]), _pointed(base)) is not False:
        raise ConfigError(
            f"{table}: generation {int(match[2])} of table {base.name} (compaction's version file, "
            f"which {pointer_path(base).name} names while it is current); expected the table's "
            f"own name, {base}"
        )


def version_record(table: str | os.PathLike[str], generation: int, compacted_from: int) -> dict:
    """What generation ``generation``'s manifest records under ``VERSION_OF``: whose it is, and
    the generation it was compacted from."""
    return {"table": _npy(table).name, "generation": generation, "compacted_from": compacted_from}


def _record(npy: Path, generation: int) -> dict | bool | None:
    """What ``TABLE.gN.npy``'s manifest records under ``VERSION_OF`` when it names it generation
    N of the table ``npy``; None when it has no manifest, False when it records another or none
    (or is unreadable)."""
    try:
        doc = json.loads(table_paths(version_path(npy, generation))[1].read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # unreadable: never assumed to be the table's
        return False
    metadata = doc.get("metadata") if isinstance(doc, dict) else None
    record = metadata.get(VERSION_OF) if isinstance(metadata, dict) else None
    if not isinstance(record, dict):
        return False
    whose = {"table": record.get("table"), "generation": record.get("generation")}
    return record if whose == {"table": npy.name, "generation": generation} else False


def _owned(npy: Path, generation: int, known: int | None = None) -> bool | None:
    """Whether ``TABLE.gN.npy`` is generation N of the table ``npy``: True when its manifest
    records so (or N is ``known``, a generation its pointer names), None when it has no manifest
    (a version written or removed part way: no table), False when its manifest records another
    or none (another table named so, or a version compacted before versions recorded it)."""
    if generation == known:
        return True
    record = _record(npy, generation)
    return record if record is None else record is not False


def _pointed(npy: Path) -> int | None:
    """The generation the table's pointer names; None when it has none or it is unreadable."""
    try:
        return current_version(npy)[1] if pointer_path(npy).exists() else None
    except TableFormatError:
        return None


def _warn_not_owned(npy: Path, generations: list[int], what: str) -> None:
    """Warn that the files of ``generations`` beside the table ``npy`` were left (``what``)."""
    if generations:
        names = ", ".join(version_path(npy, g).name for g in sorted(generations))
        warn_at_caller(
            f"table {npy}: left {names} ({what}): its manifest does not record it as a version "
            f"of {npy.name} (another table named so, or a version compacted before versions "
            "recorded their table); remove it yourself if it is an old version of this table",
            UserWarning,
        )


def publish_version(table: str | os.PathLike[str], generation: int) -> None:
    """Make ``generation`` current (one atomic rename of the pointer)."""
    doc = {"generation": generation, "file": version_path(table, generation).name}
    with atomic_write(pointer_path(table), "w") as f:
        json.dump(doc, f)


def hold_version(npy: Path) -> int:
    """A shared lock on a version's file for as long as the returned fd stays open."""
    fd = open_held(npy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        release(fd)
        raise
    return fd


def open_current_version(
    table: str | os.PathLike[str], open_version: Callable[[Path], T]
) -> tuple[T, int, int]:
    """``open_version(path)`` of the table's current version, under a shared hold on it taken
    first: (its result, the generation, the hold's fd; closing it lets a compaction remove the
    version). A version removed between reading the pointer and opening it is read again; on the
    third miss, or when the pointer did not move, ``FileNotFoundError`` propagates."""
    for attempt in range(3):
        path, generation = current_version(table)
        hold = None
        try:
            hold = hold_version(path)
            return open_version(path), generation, hold
        except BaseException as exc:
            if hold is not None:
                release(hold)
            if not isinstance(exc, FileNotFoundError):
                raise
            if attempt == 2 or path == current_version(table)[0]:
                _refuse_a_missing_version(table, path, generation)
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def writer_lock(table: str | os.PathLike[str]):
    """The table's single-writer lock (exclusive, not waited for); yields its fd."""
    fd = take_writer_lock(table)
    try:
        yield fd
    finally:
        release(fd)


def take_writer_lock(
    table: str | os.PathLike[str],
    wait_s: float = 0.0,
    refused: Callable[[str], TierIOError] | None = None,
) -> int:
    """Take the single-writer lock, trying again for up to ``wait_s`` seconds while another
    store holds it; the caller releases it with ``process_locks.release``. ``refused``: the
    error raised while it is held, given who holds it (default: one naming the table)."""
    path = Path(f"{_npy(table)}.writer.lock")
    try:
        fd = open_held(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise TierIOError(
            exc.errno or errno.EIO,
            f"writer lock {path}: cannot create it ({exc.strerror}); expected a writable directory",
        ) from None
    try:
        _lock_waiting(fd, path, wait_s, refused)
    except BaseException:  # held by another, no flock here, Ctrl-C while waiting
        release(fd)
        raise
    return fd


def _lock_waiting(
    fd: int, path: Path, wait_s: float, refused: Callable[[str], TierIOError] | None
) -> None:
    """Take the writer lock ``path`` on ``fd``, trying again for up to ``wait_s`` seconds; then
    ``refused(holder)`` if given."""
    end = time.monotonic() + wait_s
    while not exclusive_now(fd, path):
        if time.monotonic() < end:
            time.sleep(min(_LOCK_RETRY_S, max(end - time.monotonic(), 0.0)))
            continue
        holder = flock_holder(path) or "another store, in this process or another"
        if refused is not None:
            raise refused(holder)
        waited = f", still after {wait_s:g} s" if wait_s > 0 else ""
        table = path.name.removesuffix(".writer.lock")
        raise TierIOError(
            errno.EBUSY,
            f"table {table} is being written (or compacted) by another store: its writer lock "
            f"{path.name} is held by {holder}{waited}; expected one writer at a time",
        )


def forget_history(table: str | os.PathLike[str], *, writer_locked: bool = False) -> None:
    """Remove what a table's writes left: the version pointer, every compacted version and every
    delta, keeping generation 0's own files but its manifest, which goes first (the caller is
    about to replace them): a crash part way leaves no table to open, never generation 0's old
    rows without the writes made over them. Under the writer lock (taken here unless the caller
    holds it, ``writer_locked``): refused while a writer runs."""
    npy = _npy(table)
    manifest = table_paths(npy)[1]
    with contextlib.nullcontext() if writer_locked else writer_lock(npy):
        pointed = _pointed(npy)
        generations = _compacted_generations(npy)
        foreign = [g for g in generations if _owned(npy, g, pointed) is False]
        if manifest.exists():
            manifest.unlink()
            fsync_dir(npy.parent)
        pointer_path(npy).unlink(missing_ok=True)
        shutil.rmtree(delta_path(npy), ignore_errors=True)
        remove_delta_temporaries(delta_path(npy))
        for generation in generations:
            if generation not in foreign:
                remove_table_files(version_path(npy, generation))
        fsync_dir(npy.parent)
        _warn_not_owned(npy, foreign, "the table's history was removed")


def has_history(table: str | os.PathLike[str]) -> bool:
    """Whether a table's writes left anything beside its file: a version pointer, a delta or a
    compacted version (what :func:`forget_history` removes)."""
    npy = _npy(table)
    if pointer_path(npy).exists() or delta_path(npy).exists():
        return True
    return npy.parent.is_dir() and any(
        _owned(npy, g) is not False for g in _compacted_generations(npy)
    )


def _compacted_generations(npy: Path) -> list[int]:
    """The generations N >= 1 whose ``TABLE.gN.npy`` is beside the table's ``npy``, whoever's
    (``_owned`` tells)."""
    pattern = re.compile(rf"^{re.escape(npy.stem)}\.g([1-9][0-9]*)\.npy$")
    return [int(m.group(1)) for p in npy.parent.iterdir() if (m := pattern.match(p.name))]


def _version_files(path: Path) -> tuple[Path, ...]:
    """One version's files in the order they are removed: its manifest first, its ``.npy``
    last (cleanups find versions by it)."""
    return table_paths(path)[1], sidecar_path(path), delta_path(path), path


def remove_table_files(path: Path) -> None:
    """Delete a table's files (one version's), its manifest first (never half a table), its
    delta before its ``.npy``: a removal killed part way leaves the ``.npy``, which the next
    cleanup finds."""
    manifest, sidecar, delta, npy = _version_files(path)
    manifest.unlink(missing_ok=True)
    sidecar.unlink(missing_ok=True)
    shutil.rmtree(delta, ignore_errors=True)
    remove_delta_temporaries(delta)  # what creations of it killed part way left
    npy.unlink(missing_ok=True)


def _orphaned_deltas(npy: Path, current: int) -> list[Path]:
    """Delta folders of generations older than ``current`` whose ``.npy`` is gone (a removal
    killed part way by code that unlinked the ``.npy`` first). No store reads them: a store
    holds its version's ``.npy`` before opening any of its files, and removal takes it first."""
    pattern = re.compile(rf"^{re.escape(npy.stem)}(?:\.g(\d+))?\.npy\.delta$")
    orphans = []
    for path in sorted(npy.parent.iterdir()):
        match = pattern.match(path.name)
        if match is None or not path.is_dir():
            continue
        generation = int(match[1] or 0)
        if generation < current and not version_path(npy, generation).exists():
            orphans.append(path)
    return orphans


def next_generation(table: str | os.PathLike[str], current: int) -> int:
    """The generation a compaction of version ``current`` writes: the first after it whose file
    is not another table's (``_owned``), which it never writes over."""
    npy = _npy(table)
    generation = current + 1
    while _owned(npy, generation) is False:
        generation += 1
    return generation


def remove_abandoned_versions(table: str | os.PathLike[str]) -> list[str]:
    """Delete what a compaction killed part way left: the version it was writing (never
    published), the hidden temporaries of version files (``.TABLE.gN.npy*.HEX.tmp``) that no live
    writer holds, and the deltas of older versions whose ``.npy`` is gone (a removal killed part
    way); returns the names removed. Call under the writer lock, which every compaction holds
    while it writes them. A ``TABLE.gN.npy`` that is not the table's is left, with a warning.
    Refused, before removing anything, where the pointer was lost (``refuse_a_lost_pointer``)."""
    npy = _npy(table)
    current = refuse_a_lost_pointer(table)  # before removing anything
    removed, foreign = [], []
    for generation in sorted(g for g in _compacted_generations(npy) if g > current):
        path = version_path(npy, generation)
        if _record(npy, generation) is False:
            foreign.append(generation)
            continue
        removed += [part.name for part in _version_files(path) if part.exists()]
        remove_table_files(path)
    _warn_not_owned(npy, foreign, "newer than the current version")
    # a live writer of a version's files (`verify --add-page-checksums`) holds its temporaries' lock
    versions = rf"{re.escape(npy.stem)}\.g\d+\.npy.*"
    removed += [name for name, _ in remove_abandoned_temporaries(npy.parent, versions)]
    for path in _orphaned_deltas(npy, current):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    if removed:
        fsync_dir(npy.parent)
    return removed


def refuse_a_lost_pointer(table: str | os.PathLike[str]) -> int:
    """The current generation; refused (``TableFormatError``) where a later version of the table
    is there than a killed compaction leaves (one compacted from another generation than the
    current one, or with a delta of its own): the pointer was lost or restored from an older
    copy, and the versions it lost hold the table's newest rows. Call under the writer lock."""
    npy = _npy(table)
    _, current = current_version(table)
    following = next_generation(npy, current)
    for generation in sorted(g for g in _compacted_generations(npy) if g > current):
        path = version_path(npy, generation)
        record = _record(npy, generation)
        if record is False:  # another table's
            continue
        later = _later_version(record, generation, current, following, delta_path(path))
        if later is not None:
            raise TableFormatError(
                f"table {npy}: its version pointer {pointer_path(npy).name} names generation "
                f"{current}, but {path.name} is a later version of it ({later}), which a killed "
                "compaction never leaves: the pointer was lost or restored from an older copy; "
                "expected it to name the newest version: restore it "
                f'({{"generation": {generation}, "file": "{path.name}"}} if that one is)'
            )
    return current


def _later_version(
    record: dict | None, generation: int, current: int, following: int, delta: Path
) -> str | None:
    """Why the table's version ``generation`` (``record``: its ``VERSION_OF``; None: no manifest)
    is not what a killed compaction of ``current`` leaves, or None when it is: that one has no
    delta (no store wrote it as current) and was compacted from ``current`` (a version recording
    no source: the generation such a compaction writes now, ``following``)."""
    if record is None:
        return None
    if delta.exists():
        return "with a delta of its own, which only a store writing it as current makes"
    source = record.get("compacted_from")
    if type(source) is int:
        return None if source == current else f"compacted from generation {source}"
    return None if generation == following else "past the next"


def remove_unused_versions(
    table: str | os.PathLike[str], superseded: int | None = None
) -> list[int]:
    """Delete every version older than the current one that no store has open; returns the
    generations removed (others are left for a later call). ``superseded``: a generation known to
    be the table's (the one a compaction just replaced) whatever its manifest records."""
    _, current = current_version(table)
    npy = _npy(table)
    compacted = [g for g in _compacted_generations(npy) if g < current]
    foreign = [g for g in compacted if _owned(npy, g, superseded) is False]
    _warn_not_owned(npy, foreign, "older than the current version")
    removed = []
    for generation in sorted(g for g in [0, *compacted] if g < current and g not in foreign):
        path = version_path(table, generation)
        try:
            fd = open_held(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            free = exclusive_now(fd, path)
        except BaseException:
            release(fd)
            raise
        if not free:
            release(fd)
            continue  # a store still reads it
        try:
            remove_table_files(path)
            fsync_dir(path.parent)
        finally:
            release(fd)
        removed.append(generation)
    return removed
