"""Frequency profiles: how often each row of a table is looked up, and what that implies.

A :class:`FrequencyProfile` keeps only touched rows, as ``(row_ids, counts)`` sorted by count
(descending, ties by row id), so the store can read the hottest rows off the front for warm start
and pinning (:meth:`FrequencyProfile.top_rows`, :meth:`FrequencyProfile.save_top_rows`). On disk
it is one uncompressed ``.npz``: ``row_ids`` and ``counts`` (uint32 where they fit, else int64;
8 bytes per touched row for Engram-sized tables) plus ``meta``, a JSON string.

Counting streams chunk by chunk (:class:`FrequencyCounter`): ids below ``dense_limit`` are
counted in a dense int64 array (``np.bincount`` for big chunks, ``np.add.at`` for small ones);
larger ids switch to sorted sparse counts merged as they come.

Besides lookups, the counter records **episodes** per row: runs of lookups of the row in which
consecutive lookups are at most ``episode_window`` lookups of the table apart. A row looked up
1,000 times inside one document is one episode; a row looked up once in each of 500 documents is
500. An LRU segment that covers one window serves every lookup of an episode but its first, so
episodes (not lookups) are what pinning a row saves; ``zipf-tuned`` pins by them
(``top_rows(k, by="episodes")``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic_file import atomic_write
from .errors import RowIdError, TraceFormatError
from .integers import as_integer
from .npy_files import load_npy, npy_header_lock

__all__ = [
    "TOP_FRACTIONS",
    "FrequencyCounter",
    "FrequencyProfile",
    "profile_ids",
]

TOP_FRACTIONS = (0.001, 0.01, 0.1)  # shares reported: top 0.1%, 1%, 10% of rows
DEFAULT_EPISODE_WINDOW = 65_536  # lookups: one 4096-token sequence x 16 heads
DENSE_LIMIT = 1 << 26  # ids below this are counted in a dense array (8 bytes per possible id)
_SPARSE_MERGE = 1 << 24  # pending sparse (id, count) pairs merged once they exceed this
PROFILE_FORMAT = 1


@dataclass(frozen=True, eq=False)
class FrequencyProfile:
    """Lookups per row of one table (or one stream of ids), hottest first.

    Attributes
    ----------
    row_ids : ndarray of int64
        Touched rows, by descending count (ties: ascending row id).
    counts : ndarray of int64
        Lookups of each of those rows.
    rows : int or None
        Rows in the table, when known (needed for shares "of the table").
    name : str
        Table (or stream) name.
    ngram_keys : int or None
        Distinct N-gram keys that were hashed into this table, when the caller knows them
        (enables :attr:`hash_collision_rate`).
    metadata : dict
        JSON-serialisable provenance (trace path, tokenizer, config, ...).
    episodes : ndarray of int64 or None
        Episodes of each row (same order as ``counts``; see the module docstring), when counted.
    episode_window : int or None
        The gap, in lookups of this table, that starts a new episode.

    Examples
    --------
    >>> prof = profile_ids(np.array([7, 3, 7, 7, 1, 3]), rows=10, name="layer2")
    >>> prof.top_rows(2).tolist(), prof.counts.tolist(), prof.lookups, prof.distinct
    ([7, 3], [3, 2, 1], 6, 3)
    >>> prof.top_share(0.1, of="table")   # top 1 row of 10 takes 3 of 6 lookups
    0.5
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "layer2.npz")
    >>> prof.save(path)
    >>> FrequencyProfile.load(path).top_rows(1).tolist()
    [7]
    """

    row_ids: np.ndarray
    counts: np.ndarray
    rows: int | None = None
    name: str = ""
    ngram_keys: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    episodes: np.ndarray | None = None
    episode_window: int | None = None

    def __post_init__(self) -> None:
        ids = np.asarray(self.row_ids, dtype=np.int64).reshape(-1)
        counts = np.asarray(self.counts, dtype=np.int64).reshape(-1)
        episodes = self.episodes
        if ids.shape != counts.shape:
            raise ValueError(f"row_ids {ids.shape} and counts {counts.shape} differ in length")
        if episodes is not None:
            episodes = np.asarray(episodes, dtype=np.int64).reshape(-1)
            if episodes.shape != counts.shape:
                raise ValueError(
                    f"episodes {episodes.shape} and counts {counts.shape} differ in length"
                )
        if counts.size and (counts.min() <= 0 or (np.diff(counts) > 0).any()):
            order = np.lexsort((ids, -counts))
            keep = counts[order] > 0
            ids, counts = ids[order][keep], counts[order][keep]
            episodes = None if episodes is None else episodes[order][keep]
        if self.rows is not None and ids.size and (ids.min() < 0 or ids.max() >= self.rows):
            raise RowIdError(
                f"profile {self.name!r}: row ids span [{ids.min()}, {ids.max()}]; "
                f"expected [0, {self.rows})"
            )
        object.__setattr__(self, "row_ids", ids)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "episodes", episodes)

    # -- basic figures ---------------------------------------------------------------------------

    @property
    def lookups(self) -> int:
        """Total lookups."""
        return int(self.counts.sum())

    @property
    def distinct(self) -> int:
        """Distinct rows touched."""
        return int(self.row_ids.size)

    @property
    def touched_fraction(self) -> float | None:
        """Share of the table's rows touched at least once (None when ``rows`` is unknown)."""
        return None if not self.rows else self.distinct / self.rows

    def top_rows(self, k: int, *, by: str = "lookups") -> np.ndarray:
        """The ``k`` top row ids, first the hottest (fewer if fewer were touched).

        ``by="lookups"``: most looked up. ``by="episodes"``: most episodes, ties by lookups (falls
        back to lookups for a profile without episodes).
        """
        return self.row_ids[self.top_positions(k, by=by)]

    def top_positions(self, k: int, *, by: str = "lookups") -> np.ndarray:
        """Where :meth:`top_rows`'s rows are in ``row_ids`` (and in ``counts`` / ``episodes``)."""
        count = as_integer(k)
        if count is None or count < 0:  # 2.5 indexed with floats (a bare IndexError), True was 1
            raise ValueError(f"k: got {k!r}; expected an integer >= 0 (rows to return)")
        if by not in ("lookups", "episodes"):
            raise ValueError(f"by: got {by!r}; expected 'lookups' or 'episodes'")
        if by == "episodes" and self.episodes is not None:
            return np.argsort(-self.episodes, kind="stable")[
                :count
            ]  # stable: ties keep count order
        return np.arange(min(count, self.row_ids.size))

    def save_top_rows(self, path: str | os.PathLike[str], k: int | None = None) -> Path:
        """Write :meth:`top_rows` as a ``.npy`` (the store's ``static_rows`` / ``preload_rows``)."""
        path = Path(path)
        np.save(path, self.top_rows(self.distinct if k is None else k))
        return path if path.suffix == ".npy" else path.with_name(path.name + ".npy")

    def dense_counts(self, rows: int | None = None) -> np.ndarray:
        """Counts indexed by row id, length ``rows`` (default: the table's, or max id + 1)."""
        n = rows or self.rows or (int(self.row_ids.max()) + 1 if self.distinct else 0)
        out = np.zeros(n, dtype=np.int64)
        out[self.row_ids] = self.counts
        return out

    def top_share(self, fraction: float, *, of: str = "table") -> float | None:
        """Share of lookups taken by the top ``fraction`` of rows.

        ``of="table"``: the top ceil(fraction x table rows) rows (None when ``rows`` is unknown);
        ``of="touched"``: the top ceil(fraction x distinct touched rows).
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction: got {fraction}; expected 0..1")
        if of == "table":
            if not self.rows:
                return None
            base = self.rows
        elif of == "touched":
            base = self.distinct
        else:
            raise ValueError(f"of: got {of!r}; expected 'table' or 'touched'")
        k = math.ceil(fraction * base)
        total = self.lookups
        return float(self.counts[:k].sum()) / total if total else 0.0

    def top_shares(self, fractions: Iterable[float] = TOP_FRACTIONS) -> dict[str, dict[str, Any]]:
        """``{"of_table": {"0.1%": share, ...}, "of_touched": {...}}``."""
        out: dict[str, dict[str, Any]] = {"of_table": {}, "of_touched": {}}
        for f in fractions:
            label = f"{f * 100:g}%"
            out["of_table"][label] = self.top_share(f, of="table")
            out["of_touched"][label] = self.top_share(f, of="touched")
        return out

    @property
    def hash_collision_rate(self) -> float | None:
        """1 - distinct rows / distinct N-gram keys: the share of keys that land on a row another
        key already uses (None without ``ngram_keys``)."""
        if not self.ngram_keys:
            return None
        return 1.0 - self.distinct / self.ngram_keys

    @property
    def expected_collision_rate(self) -> float | None:
        """The same rate if the keys were hashed uniformly into ``rows`` rows:
        1 - rows (1 - exp(-keys/rows)) / keys."""
        if not self.ngram_keys or not self.rows:
            return None
        k, m = float(self.ngram_keys), float(self.rows)
        return 1.0 - m * -math.expm1(-k / m) / k

    def summary(self) -> dict[str, Any]:
        """Every headline figure as plain JSON (``zipf_analysis.profile_summary`` adds the Zipf fits)."""
        out: dict[str, Any] = {
            "name": self.name,
            "rows": self.rows,
            "lookups": self.lookups,
            "distinct_rows": self.distinct,
            "touched_fraction": self.touched_fraction,
            "lookups_per_distinct_row": self.lookups / self.distinct if self.distinct else None,
            "top_shares": self.top_shares(),
            "ngram_keys": self.ngram_keys,
            "hash_collision_rate": self.hash_collision_rate,
            "expected_collision_rate": self.expected_collision_rate,
            "episode_window": self.episode_window,
            "episodes": None if self.episodes is None else int(self.episodes.sum()),
        }
        return out

    # -- files -----------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write one ``.npz`` (atomically: temporary name, then rename)."""
        path = Path(path)
        meta = {
            "format": PROFILE_FORMAT,
            "name": self.name,
            "rows": self.rows,
            "ngram_keys": self.ngram_keys,
            "metadata": self.metadata,
            "episode_window": self.episode_window,
        }
        extra = {} if self.episodes is None else {"episodes": _narrow(self.episodes)}
        with atomic_write(path) as f:
            np.savez(
                f,
                row_ids=_narrow(self.row_ids),
                counts=_narrow(self.counts),
                meta=np.array(json.dumps(meta)),
                **extra,
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FrequencyProfile:
        """Read a profile written by :meth:`save`; a TraceFormatError names the file, what it
        holds and what was expected (callers add their context, not another wrapping)."""
        meta, (ids, counts, episodes) = _read_profile(path, ("row_ids", "counts", "episodes"))
        if meta.get("format") != PROFILE_FORMAT:
            raise TraceFormatError(
                f"profile {path}: format {meta.get('format')!r}; expected {PROFILE_FORMAT}"
            )
        try:
            return cls(
                ids,
                counts,
                meta.get("rows"),
                meta.get("name", ""),
                meta.get("ngram_keys"),
                meta.get("metadata") or {},
                episodes,
                meta.get("episode_window"),
            )
        except (ValueError, TypeError, RowIdError) as exc:  # its arrays or meta disagree: damaged
            raise TraceFormatError(
                f"profile {path}: not a readable profile ({exc}); {_EXPECTED_PROFILE}"
            ) from None

    @staticmethod
    def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
        """The meta of a profile :meth:`save` wrote (its ``metadata``, ``name``, ...), read
        without its arrays; a TraceFormatError as :meth:`load` raises."""
        return _read_profile(path, ())[0]


_EXPECTED_PROFILE = "expected a profile .npz (analyze's layer{L}.profile.npz)"


def _read_profile(
    path: str | os.PathLike[str], members: tuple[str, ...]
) -> tuple[dict[str, Any], list[np.ndarray | None]]:
    """A profile .npz's meta (a dict) and its arrays ``members`` (``episodes``: None when it has
    none); a TraceFormatError names the file, what it holds and what was expected."""
    try:
        z = load_npy(path)
        if not isinstance(z, np.lib.npyio.NpzFile):  # analyze writes both: an easy mix-up
            raise TraceFormatError(
                f"profile {path}: a .npy array (row ids, such as analyze's "
                f"layer{{L}}.top_rows.npy); {_EXPECTED_PROFILE}"
            )
        with z, npy_header_lock:  # reading a member parses its header
            meta = json.loads(str(z["meta"]))
            arrays = [
                None if name == "episodes" and name not in z.files else z[name] for name in members
            ]
    except TraceFormatError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # a member's bad CRC
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise TraceFormatError(
            f"profile {path}: not a readable profile ({reason}); {_EXPECTED_PROFILE}"
        ) from None
    if not isinstance(meta, dict):  # damaged, or written by hand
        raise TraceFormatError(
            f"profile {path}: its meta is {json.dumps(meta)[:80]}; {_EXPECTED_PROFILE}"
        )
    return meta, arrays

    def __repr__(self) -> str:
        return (
            f"FrequencyProfile({self.name!r}, rows={self.rows}, lookups={self.lookups}, "
            f"distinct={self.distinct})"
        )


@functools.cache
def _episode_kernel() -> Any:
    """The compiled episode counter (numba is imported on first use: it costs ~0.5 s)."""
    import numba

    @numba.njit(cache=True, nogil=True)
    def count(ids, start, window, last_seen, episodes):  # pragma: no cover - compiled
        for i in range(ids.size):
            row = ids[i]
            if start + i - last_seen[row] > window:
                episodes[row] += 1
            last_seen[row] = start + i

    return count


def _narrow(values: np.ndarray) -> np.ndarray:
    """uint32 when every value fits (halves the file), else int64."""
    return values.astype(np.uint32) if values.size and values.max() < 2**32 else values


class FrequencyCounter:
    """Accumulate lookups per row over a stream of id chunks.

    Examples
    --------
    >>> fc = FrequencyCounter(rows=100)
    >>> fc.update(np.array([5, 5, 9])); fc.update(np.array([[5, 1]]))
    >>> prof = fc.profile(name="t")
    >>> prof.row_ids.tolist(), prof.counts.tolist()
    ([5, 1, 9], [3, 1, 1])

    Episodes (counted when ``rows`` is known and at most ``dense_limit``): with a window of 2
    lookups, row 5 at positions 0, 1, 3, 4, 5 is one episode; row 4 at 2 and 6 is two.

    >>> fc = FrequencyCounter(rows=10, episode_window=2)
    >>> fc.update(np.array([5, 5, 4])); fc.update(np.array([5, 5, 5, 4]))
    >>> prof = fc.profile()
    >>> dict(zip(prof.row_ids.tolist(), prof.episodes.tolist()))
    {5: 1, 4: 2}
    """

    def __init__(
        self,
        rows: int | None = None,
        *,
        dense_limit: int = DENSE_LIMIT,
        episode_window: int = DEFAULT_EPISODE_WINDOW,
    ) -> None:
        window = as_integer(episode_window)
        if window is None or window < 0:  # 2.5 was counted as 2 and recorded as 2.5, True as 1
            raise ValueError(
                f"episode_window: got {episode_window!r}; expected an integer >= 0 (0: off)"
            )
        if rows is not None and (as_integer(rows) is None or rows < 0):  # numpy's errors named none
            raise ValueError(f"rows: got {rows!r}; expected the table's row count (an integer)")
        rows = None if rows is None else int(rows)
        episode_window = window
        self.rows = rows
        self._dense_limit = dense_limit
        self._dense = np.zeros(rows if rows and rows <= dense_limit else 0, dtype=np.int64)
        self._sparse: list[tuple[np.ndarray, np.ndarray]] = []  # sorted (ids, counts) runs
        self._pending = 0
        self.lookups = 0
        self.episode_window = episode_window if self._dense.size else 0
        if self.episode_window:  # position of each row's last lookup, and its episodes
            self._last_seen = np.full(rows, -(1 << 62), dtype=np.int64)
            self._episodes = np.zeros(rows, dtype=np.int32)

    def update(self, ids: np.ndarray) -> None:
        """Count the next ids (any shape)."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size == 0:
            return
        if ids.dtype.kind not in "iu":
            raise RowIdError(f"row ids of dtype {ids.dtype}; expected integers")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (self.rows is not None and hi >= self.rows):
            bound = f"[0, {self.rows})" if self.rows is not None else ">= 0"
            raise RowIdError(f"row ids span [{lo}, {hi}]; expected {bound}")
        if self.episode_window:
            self._count_episodes(ids)
        self.lookups += ids.size
        if hi < self._dense_limit and not self._sparse:
            if hi >= self._dense.size:
                grown = np.zeros(max(hi + 1, int(self._dense.size * 1.5)), dtype=np.int64)
                grown[: self._dense.size] = self._dense
                self._dense = grown
            if 4 * ids.size >= self._dense.size:
                self._dense[: hi + 1] += np.bincount(ids, minlength=hi + 1)
            else:
                np.add.at(self._dense, ids, 1)
            return
        if self._dense.size:  # switch to sparse for good
            nz = np.nonzero(self._dense)[0]
            self._sparse.append((nz.astype(np.int64), self._dense[nz]))
            self._dense = np.zeros(0, dtype=np.int64)
        uniq, counts = np.unique(ids, return_counts=True)
        self._sparse.append((uniq.astype(np.int64), counts.astype(np.int64)))
        self._pending += uniq.size
        if self._pending > _SPARSE_MERGE:
            self._merge()

    def _count_episodes(self, ids: np.ndarray) -> None:
        """Start an episode at every lookup more than ``episode_window`` after the row's last."""
        _episode_kernel()(ids, self.lookups, self.episode_window, self._last_seen, self._episodes)

    def _merge(self) -> None:
        """Collapse the sparse runs into one."""
        if len(self._sparse) > 1:
            ids = np.concatenate([r[0] for r in self._sparse])
            counts = np.concatenate([r[1] for r in self._sparse])
            uniq, inverse = np.unique(ids, return_inverse=True)
            self._sparse = [(uniq, np.bincount(inverse, weights=counts).astype(np.int64))]
        self._pending = 0

    def profile(
        self,
        *,
        name: str = "",
        ngram_keys: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> FrequencyProfile:
        """The profile of everything counted so far."""
        if self._sparse:
            self._merge()
            ids, counts = self._sparse[0] if self._sparse else (np.empty(0, np.int64),) * 2
        else:
            ids = np.nonzero(self._dense)[0]
            counts = self._dense[ids]
        order = np.lexsort((ids, -counts))
        ids = ids[order]
        return FrequencyProfile(
            ids,
            counts[order],
            self.rows,
            name,
            ngram_keys,
            dict(metadata or {}),
            self._episodes[ids] if self.episode_window else None,
            self.episode_window or None,
        )


def profile_ids(
    ids: np.ndarray | Iterable[np.ndarray],
    *,
    rows: int | None = None,
    name: str = "",
    ngram_keys: int | None = None,
) -> FrequencyProfile:
    """Profile an array of ids, or an iterable of chunks (e.g. ``reader.ids("layer2")``).

    See :class:`FrequencyProfile` for an example.
    """
    counter = FrequencyCounter(rows)
    if isinstance(ids, np.ndarray):
        counter.update(ids)
    else:
        for chunk in ids:
            counter.update(chunk)
    return counter.profile(name=name, ngram_keys=ngram_keys)
