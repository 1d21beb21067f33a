"""Atomic file creation: write under a temporary name, fsync, rename into place, fsync the directory.

Every file the library writes (tables and manifests, traces, profiles, caches) goes through
:class:`AtomicFile`, so a crash at any point leaves either the old file or the complete new one,
never a torn file under the final name.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import ConfigError, TieredStoreError, TierIOError
from .process_locks import open_held, release

__all__ = [
    "AtomicFile",
    "atomic_write",
    "fsync_dir",
    "hidden_temporaries",
    "json_text",
    "make_named_dir",
    "remove_abandoned_temporaries",
    "scratch_directory",
    "write_json",
]


def in_the_way(path: Path, what: str = "a directory", code: int = errno.EISDIR) -> TierIOError:
    """The error for a file that cannot be written at ``path``: ``what`` is there instead."""
    return TierIOError(
        code,
        f"cannot write {path}: {what} is in the way; expected a file there (or nothing): move it "
        "aside and run again",
    )


# what a path that is not a regular file is, for the errors that refuse it
NOT_FILES = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_kind(mode: int) -> str | None:
    """What ``NOT_FILES`` names a file of ``mode`` (``a FIFO (named pipe)``); None for another."""
    return next((what for test, what in NOT_FILES if test(mode)), None)


def special_file(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is, in words, when it is a FIFO, device or socket (an open of a FIFO waits
    for a writer forever, a read of ``/dev/zero`` never ends); None for anything else, a missing
    path included."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # the open says why (ValueError: a NUL, a lone surrogate)
        return None
    return special_kind(mode)


def what_is(path: Path) -> str:
    """What is at ``path``, which is there and no folder: ``a file``, or a device, FIFO or socket
    named as ``NOT_FILES`` names it (``a character device``); ``a file`` when it is gone meanwhile."""
    return special_file(path) or "a file"


def make_named_dir(path: Path, name: str, expected: str) -> None:
    """Make the folder ``path`` (and its parents) when missing; when it cannot be (a file there
    or on its way, no permission), a ``ConfigError`` naming it as ``name`` (the argument, or the
    option that gave it) and what is ``expected`` there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{name} {path}: cannot make it ({exc.strerror or exc}); expected {expected}"
        ) from None


@contextmanager
def write_step(what: str, step: str, outcome: str, *, outer: bool = False) -> Iterator[None]:
    """An ``OSError`` in the block (disk full, read-only FS, ...) as a TierIOError naming
    ``what`` and ``step``; ``outer``: one a write step inside it already named (a trace in an
    analysis's staging folder, which the user never named) is named by this one instead."""
    try:
        yield
    except TieredStoreError as exc:
        cause = exc.__cause__
        if not outer or not isinstance(exc, TierIOError) or not isinstance(cause, OSError):
            raise
        if isinstance(cause, TieredStoreError):
            raise
        raise TierIOError(
            cause.errno or errno.EIO,
            f"{what}: {step} failed: {cause.strerror or cause}; {outcome} (expected a writable "
            "file system with room for it)",
        ) from cause
    except OSError as exc:
        raise TierIOError(
            exc.errno or errno.EIO,
            f"{what}: {step} failed: {exc.strerror or exc}; {outcome} (expected a writable file "
            "system with room for it)",
        ) from exc


def atomic_files(*targets: tuple[Path, str], lock: bool = False) -> list[AtomicFile]:
    """An :class:`AtomicFile` for each ``(path, mode)`` (text modes in UTF-8; ``lock`` as there),
    or none: when one cannot be opened, those already opened are aborted (no temporary file or
    descriptor left)."""
    opened: list[AtomicFile] = []
    names: list[Path] = []  # each chosen before its file exists: a signal's KeyboardInterrupt
    try:  # right after a file was made, before the list holds it, leaves nothing either
        for path, mode in targets:
            names.append(temporary_name(Path(path)))
            text = {} if "b" in mode else {"encoding": "utf-8"}
            opened.append(AtomicFile(path, mode, tmp=names[-1], lock=lock, **text))
    except BaseException:
        for f in opened:
            f.abort()
        for name in names[len(opened) :]:
            name.unlink(missing_ok=True)
        raise
    return opened


@contextmanager
def scratch_directory(
    prefix: str, parent: str | os.PathLike[str] | None = None, *, keep: bool = False
) -> Iterator[Path]:
    """A new directory under ``parent`` (default: the system's temporary folder), removed with
    everything in it when the block ends, unless ``keep``. Named before it is made, so an
    interrupt at any point (SIGINT, or SIGTERM as the CLI unwinds it) leaves none behind, where
    ``tempfile.mkdtemp`` could be interrupted after making it and before returning its name.

    >>> with scratch_directory("example-") as d:
    ...     (d / "f").write_text("x") and d.is_dir()
    True
    >>> d.exists()
    False
    """
    path = Path(parent or tempfile.gettempdir()) / f"{prefix}{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def temporary_name(path: Path) -> Path:
    """A hidden name beside ``path`` for the file that will replace it (``.NAME.HEX.tmp``)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


# what fsync of a directory fails with where a file system cannot do it (nothing to make durable)
_NO_DIRECTORY_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames inside it are durable (a no-op where the file system
    cannot, or the directory cannot be opened for reading). An I/O error (EIO) raises
    ``TierIOError`` naming the directory: the renames may not survive a power loss."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno == errno.EIO:
            raise _dir_fsync_failed(directory, exc) from exc
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIRECTORY_FSYNC:
            raise _dir_fsync_failed(directory, exc) from exc
    finally:
        os.close(fd)


def _dir_fsync_failed(directory: str | os.PathLike[str], exc: OSError) -> TierIOError:
    """The error of a directory's fsync that failed."""
    return TierIOError(
        exc.errno,
        f"fsync of directory {directory} failed ({exc.strerror}); expected it to make the renames "
        "in it durable: they may not survive a power loss (check the disk)",
        str(directory),
    )


def hidden_temporaries(directory: Path, names: str) -> list[Path]:
    r"""The temporaries that killed ``AtomicFile`` writers left in ``directory``, of the files
    whose names match the regular expression ``names``.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / ".dense-4.pt.0123456789ab.tmp").write_bytes(b"")
    >>> [p.name for p in hidden_temporaries(d, r"dense-\d+\.pt")]
    ['.dense-4.pt.0123456789ab.tmp']
    """
    pattern = re.compile(rf"\.(?:{names})\.[0-9a-f]{{12}}\.tmp")
    return sorted(p for p in directory.iterdir() if pattern.fullmatch(p.name))


def remove_abandoned_temporaries(directory: Path, names: str) -> list[tuple[str, int]]:
    """Delete the temporaries in ``directory`` of files whose names match ``names`` (as
    :func:`hidden_temporaries`) that no writer holds: ``(name, bytes)`` of each removed. A
    writer made with ``AtomicFile(lock=True)``, in this process or another, holds a ``flock`` on
    its temporary until its rename (the kernel drops it when the process dies): that one is left
    to it, as is anything not a regular file."""
    try:
        leftovers = hidden_temporaries(directory, names)
    except OSError:  # an unreadable folder: nothing to remove that a writer could see
        return []
    removed = []
    for tmp in leftovers:
        try:  # never blocking on a FIFO named like one
            fd = open_held(tmp, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:  # renamed into place (or removed) meanwhile, or a link
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # no writer made it: not ours to remove
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live writer's
            tmp.unlink()
            removed.append((tmp.name, info.st_size))
        except OSError:  # a live writer's, renamed meanwhile, or a read-only folder: left
            pass
        finally:
            release(fd)
    if removed:
        fsync_dir(directory)
    return removed


def open_lock(tmp: Path, file: IO[Any]) -> int | None:
    """A descriptor of ``tmp`` (which ``file`` writes) with its own open file description, for
    its writer's ``flock``: a forked child's copy of it is closed, and the child's copy of
    ``file`` holds no lock. None when a cleanup removed ``tmp`` first."""
    try:
        fd = open_held(tmp, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    mine, theirs = os.fstat(fd), os.fstat(file.fileno())
    if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):  # pragma: no cover
        release(fd)  # no writer makes a file under another's random name: treat it as gone
        return None
    return fd


def _lock_temporary(fd: int) -> None:
    """Take the exclusive ``flock`` a writer holds on its temporary (blocks while a cleanup
    holds it; a test hook can stage a cleanup before it)."""
    fcntl.flock(fd, fcntl.LOCK_EX)


class AtomicFile:
    """A file written under a hidden temporary name beside ``path`` and published by rename.

    ``finish()`` flushes, fsyncs and closes it; ``publish()`` renames it over ``path`` and fsyncs
    the directory (``commit()`` does both); ``abort()`` removes it. Two-step use lets a caller
    publish several files in an order of its choosing (a table's data before its manifest).
    With ``lock``, an exclusive ``flock`` is held on the temporary from its creation until it is
    renamed or removed, so :func:`remove_abandoned_temporaries` leaves it alone; one that a
    cleanup removed before it was locked is made again. A folder, device, FIFO or socket at
    ``path`` is refused when made (a ``TierIOError`` naming it and what is there: the rename
    would replace it, ``/dev/null`` too as root); a symbolic link there is replaced, its target
    left as it was.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "out.txt"
    >>> with AtomicFile(target, "w") as f:
    ...     _ = f.file.write("done")
    >>> target.read_text()
    'done'
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        mode: str = "wb",
        *,
        tmp: Path | None = None,
        lock: bool = False,
        **open_kwargs: Any,
    ) -> None:
        """``tmp``: the temporary's name (default: a new ``temporary_name``); ``lock``: hold a
        ``flock`` on it (class docstring)."""
        if "w" not in mode:
            raise ValueError(f"AtomicFile mode: got {mode!r}; expected a write mode ('w' or 'wb')")
        self.path = Path(path)
        if self.path.is_dir():  # refused now, not at publish() after all the writing
            raise in_the_way(self.path)
        try:  # a device, FIFO or socket: the rename would replace it (/dev/null, as root)
            there = self.path.lstat().st_mode  # (a link is replaced, its target left as it was)
        except OSError:  # nothing there (or no way to tell): the open or the rename says why
            there = stat.S_IFREG
        kind = special_kind(there)
        if kind is not None:
            raise in_the_way(self.path, kind, errno.EEXIST)
        self.tmp = temporary_name(self.path) if tmp is None else tmp
        exclusive = mode.replace("w", "x")
        self._lock = -1  # the descriptor holding the temporary's flock (-1: none)
        while True:
            try:
                self.file: IO[Any] = open(self.tmp, exclusive, **open_kwargs)  # noqa: SIM115
            except OSError as exc:  # named by the file it writes, not by the hidden temporary
                raise OSError(exc.errno, exc.strerror, str(self.path)) from None
            if not lock:
                return
            try:
                fd = open_lock(self.tmp, self.file)  # None: a cleanup removed it
                if fd is not None:
                    self._lock = fd
                    _lock_temporary(fd)
                    if os.fstat(self._lock).st_nlink:  # else a cleanup removed it before the lock
                        return
            except BaseException:
                self.abort()
                raise
            self.file.close()  # the name is free again: made anew under it
            self._unlock()

    def _unlock(self) -> None:
        """Close the descriptor holding the temporary's flock, if any."""
        if self._lock >= 0:
            release(self._lock)
            self._lock = -1

    def finish(self) -> None:
        """Flush, fsync and close the temporary file."""
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def publish(self) -> None:
        """Rename the finished file over ``path`` and make the rename durable. Fails with a
        ``TierIOError`` naming ``path``: that a directory is in the way, or why the rename
        failed (its temporary removed meanwhile, a read-only file system)."""
        try:
            os.replace(self.tmp, self.path)
        except OSError as exc:
            if self.path.is_dir():
                raise in_the_way(self.path, "a directory", exc.errno) from None
            raise TierIOError(
                exc.errno or errno.EIO,
                f"cannot write {self.path}: renaming its finished temporary {self.tmp.name} over "
                f"it failed ({exc.strerror or exc}); {self.path} is left as it was (expected the "
                "temporary still there and its folder writable)",
            ) from None
        self._unlock()  # renamed: no cleanup can find it under its temporary name
        fsync_dir(self.path.parent)

    def commit(self) -> None:
        """:meth:`finish`, then :meth:`publish`."""
        self.finish()
        self.publish()

    def abort(self) -> None:
        """Close and remove the temporary file; ``path`` is left as it was."""
        if not self.file.closed:
            with suppress(OSError):  # flushing what a failed write left buffered fails again
                self.file.close()
        self.tmp.unlink(missing_ok=True)
        self._unlock()

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


@contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "wb", **open_kwargs: Any
) -> Iterator[IO[Any]]:
    """Yield a file object whose content replaces ``path`` atomically when the block succeeds.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "data.bin"
    >>> with atomic_write(target) as f:
    ...     _ = f.write(b"abc")
    >>> target.read_bytes()
    b'abc'
    """
    with AtomicFile(path, mode, **open_kwargs) as atomic:
        yield atomic.file


def write_json(path: str | os.PathLike[str], doc: Any, *, indent: int = 2) -> Path:
    """Write ``doc`` as indented JSON with a final newline to ``path``, atomically, creating the
    folder it goes in; returns the path.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "results" / "run.json"
    >>> write_json(target, {"hit_ratio": 0.5}).read_text().splitlines()
    ['{', '  "hit_ratio": 0.5', '}']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(json_text(doc, indent=indent) + "\n")
    return path


def json_text(doc: Any, *, indent: int | None = 2) -> str:
    """``doc`` as strict JSON text: a NaN or infinite number is written ``null`` (JSON has no
    such numbers; Python's ``NaN`` is refused by other readers); a NumPy scalar or array is
    written as its Python value or list.

    Examples
    --------
    >>> json_text({"p50_ms": float("nan"), "hits": [1.5, float("inf")]}, indent=None)
    '{"p50_ms": null, "hits": [1.5, null]}'
    >>> json_text({"rates": np.array([0.5, np.nan]), "rows": np.int64(3)}, indent=None)
    '{"rates": [0.5, null], "rows": 3}'
    """
    return json.dumps(_finite_or_null(doc), indent=indent, allow_nan=False)


def _finite_or_null(doc: Any) -> Any:
    """``doc`` with each non-finite float (in dicts, lists and tuples) replaced by ``None``, and
    NumPy scalars and arrays (dict keys too) by their Python values."""
    if isinstance(doc, np.generic | np.ndarray):
        doc = doc.tolist()
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {  # a NumPy key (np.unique's values) as its Python value: json refuses it
            (k.item() if isinstance(k, np.generic) else k): _finite_or_null(v)
            for k, v in doc.items()
        }
    if isinstance(doc, (list, tuple)):
        return [_finite_or_null(v) for v in doc]
    return doc
