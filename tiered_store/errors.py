"""The error hierarchy: every error is a ``TieredStoreError`` and also the matching builtin; and
how warnings reach the user's line; how messages repeat a value."""

import errno
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

# the library's packages: a warning points past their frames, at the line that called into them
_LIBRARY_DIRS = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name) + os.sep
    for name in ("tiered_store", "policies", "zipf_analysis")
)


class TieredStoreError(Exception):
    """Base of every error this library raises on purpose."""


class ConfigError(TieredStoreError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class TableFormatError(TieredStoreError, ValueError):
    """A table file or its manifest is malformed, truncated, or fails a checksum."""


class TierIOError(TieredStoreError, OSError):
    """Reading or writing a tier's backing storage failed."""


class LimitError(TieredStoreError, ValueError):
    """An input past a fixed limit of the library (e.g. the int32 access times of the miss-ratio
    kernels); the message names the limit."""


class StoreClosedError(TieredStoreError):
    """A call to a store that is closed (or closing)."""


class RowIdError(TieredStoreError, IndexError):
    """Row ids are out of range, negative, or not integers."""


class TraceFormatError(TieredStoreError, ValueError):
    """A trace file is corrupt, truncated, or does not match the expected layout."""


class ShardMismatchError(ConfigError):
    """Ranks opened shards of different shard maps, table versions or configurations."""


class StepMismatchError(ConfigError):
    """Ranks of a sharded store passed different steps (or gradient widths) to one commit or
    training round: nothing was done on any shard, and the ranks stay in step."""


class TornCommitWarning(UserWarning):
    """The shards of a sharded table were opened at different committed steps (a commit made
    shard by shard was interrupted after some shards had committed, or another store resolved a
    staged step otherwise than this open decided), or a shard's staged step was left unresolved
    (its writer lock held by another process, a drop decided before waiting for it, or a
    read-only delta): the message says which, and what to do."""


class RankFailureError(TieredStoreError, RuntimeError):
    """A rank of a sharded store died, hung or stopped calling lookups; the message names it."""


class ShardReadError(TierIOError):
    """Another rank's shard could not serve its rows of a sharded lookup (a failed read or
    checksum there): the lookup fails on every rank, and the group stays in step. ``ranks`` maps
    each such rank to what failed there."""

    def __init__(self, message: str, ranks: dict[int, str]) -> None:
        super().__init__(errno.EIO, message)
        self.ranks = ranks

    def __reduce__(self) -> tuple:
        return type(self), (self.strerror, self.ranks)


class UpdateRefusedError(TierIOError):
    """A sharded update round failed on some rank before any shard wrote (a shard could not read
    or update its rows): no row changed on any shard, and ``TrainableTable.step`` keeps its
    gradients."""


class DeltaCorruptError(TableFormatError):
    """A row of a table's write delta (LMDB) fails its CRC32C or does not match the table."""


class CommitError(TierIOError):
    """A commit could not be made durable; the previous commit is intact and the writes stay pending."""


class RowDataError(TieredStoreError, ValueError):
    """Rows given to a write have the wrong shape, type or non-finite values."""


def error_text(exc: BaseException) -> str:
    """An error as a user reads it: an ``OSError``'s message without ``[Errno N]`` and without its
    file name repeated at the end (kept where the message does not already name it).

    >>> error_text(FileNotFoundError(2, "table t.npy does not exist", "t.npy"))
    'table t.npy does not exist'
    >>> error_text(PermissionError(13, "Permission denied", "/x/t.npy"))
    'Permission denied: /x/t.npy'
    """
    if isinstance(exc, OSError) and exc.strerror:
        name = exc.filename
        if name is None or str(name) in exc.strerror:
            return exc.strerror
        return f"{exc.strerror}: {name}"
    return str(exc)


def cut_text(text: str, limit: int, show: Callable[[str], str] = str) -> str:
    """``text`` as a message repeats what it was given: ``show(text)`` up to ``limit``
    characters, else ``show`` of its first ``limit`` and its length.

    >>> cut_text("prompt", 40), cut_text("k" * 50, 40), cut_text("/x" * 3, 4, repr)
    ('prompt', 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk... (50 characters)', "'/x/x'... (6 characters)")
    """
    if len(text) <= limit:
        return show(text)
    return f"{show(text[:limit])}... ({len(text):,} characters)"


def shown(value: Any, limit: int = 60) -> str:
    """A bad value as an error message repeats it: its ``repr``, cut short past ``limit``
    characters (a 100,000-element list made a 690 KB message).

    >>> shown("lru"), shown(list(range(1000)), 20), shown(10**5000)
    ("'lru'", '[0, 1, 2, 3, 4, 5, 6... (4,890 characters)', 'an int too long to write out')
    >>> shown([10**5000])
    'a list holding an integer too long to write out'
    """
    if isinstance(value, str):
        return cut_text(value, limit, repr)
    try:
        text = repr(value)
    except ValueError:  # an integer of more digits than Python writes out (4,300), or holding one
        if isinstance(value, int):
            return f"an {type(value).__name__} too long to write out"
        return f"a {type(value).__name__} holding an integer too long to write out"
    return cut_text(text, limit)


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the first line outside this library that led here (the
    user's ``open`` or ``close``), whatever the depth of the calls in between (what Python 3.12's
    ``skip_file_prefixes`` does); the outermost frame when the whole stack is the library's."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
