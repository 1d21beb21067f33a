"""Miss-ratio curves: how many lookups miss a cache of each capacity (in rows).

Curves computed here, all as :class:`MissRatioCurve`:

- :func:`lru_mrc` - exact LRU, every capacity at once, from stack distances in one streaming pass
  (Mattson): for each access, the number of distinct rows touched since the previous access to
  the same row, counted on a bitmap of "latest access" times with a Fenwick tree over its 64-bit
  words, O(N log D). The time axis is compacted whenever it fills, so memory is O(distinct rows),
  not O(lookups). Access times are int32: up to ``MAX_TIME_CAPACITY // 2`` (about 1.07 billion)
  distinct rows, more is refused (:class:`~tiered_store.errors.LimitError`).
- :func:`shards_mrc` - SHARDS (Waldspurger et al., FAST'15): the same on a spatially hashed
  sample of rows (rate R), distances scaled by 1/R; ``fixed_size`` bounds the tracked rows
  instead (SHARDS-max) for traces whose distinct rows do not fit.
- :func:`static_topk_mrc` - an oracle that pins the K most frequent rows (by true frequency).
- :func:`belady_mrc` - Belady's MIN, the fewest misses any cache of that capacity can have.
- :func:`offline_mrc` - any offline bound of the policy registry by name (the two above are
  ``static-topk`` and ``belady``; their simulations live in :mod:`policies.offline`).

The numba kernels behind the LRU and SHARDS curves are in :mod:`zipf_analysis.mrc_kernels`.

Counting convention: every curve counts compulsory (first-access) misses, except
:func:`static_topk_mrc` by default, which models a cache preloaded from a profile (the store's
warm start). A capacity is a number of rows; a curve's capacity 0 always has miss ratio 1.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from policies.offline import Belady, OfflineBound, StaticTopK, static_topk_misses
from policies.offline import whole_capacities as _whole_capacities
from policies.registry import offline_bound
from tiered_store.errors import LimitError, RowIdError
from tiered_store.profile import FrequencyProfile
from tiered_store.trace import TraceReader

from . import mrc_kernels as kernels
from .replay import _whole

__all__ = [
    "MissRatioCurve",
    "StackDistanceCounter",
    "belady_misses",
    "belady_mrc",
    "jsonable",
    "lru_mrc",
    "mean_absolute_error",
    "offline_mrc",
    "shards_mrc",
    "static_topk_mrc",
]

DENSE_ID_LIMIT = 1 << 27  # ids below this index arrays directly (4 bytes each); above: a hash map
MIN_TIME_CAPACITY = (
    1 << 20
)  # access times the exact-LRU time axis holds before its first compaction
TIME_AXIS_GROWTH = 4  # on compaction, grow the time axis to this many times the distinct rows
MAX_TIME_CAPACITY = (1 << 31) - 64  # the most access times a time axis holds (int32 time + 1)
MAX_ROW_INDEX = (1 << 31) - 1  # the largest dense row index the kernels keep (int32)
SHARDS_MODULUS = 1 << 24  # fixed-rate sampling granularity: rates are multiples of 2**-24
DEFAULT_SHARDS_RATE = 0.01


# ---------------------------------------------------------------------------------------------
# The curve
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MissRatioCurve:
    """Miss ratio at a set of cache capacities (rows), with what it was computed from.

    Attributes
    ----------
    name : str
        Which curve: ``"lru"``, ``"shards"``, ``"static-topk"``, ``"belady"``, ...
    capacities : ndarray of int64
        Ascending capacities in rows; the first is 0.
    miss_ratio : ndarray of float64
        Misses / lookups at each capacity.
    lookups : int
        Lookups in the trace the curve describes.
    misses : ndarray of int64 or None
        Exact miss counts, where the method gives them (not for sampled curves).
    table_rows : int or None
        Rows of the table, to express capacities as a share of it.
    metadata : dict
        JSON-serialisable details: method, sampling rate, distinct rows, timings; and
        ``min_capacity`` where the curve resolves no capacity between 0 and it (a miniature
        simulation on a sample: see :attr:`min_capacity`).

    Examples
    --------
    >>> c = lru_mrc(np.array([1, 2, 1, 3, 1, 2]))
    >>> c.capacities.tolist(), c.misses.tolist()
    ([0, 1, 2, 3], [6, 6, 4, 3])
    >>> round(c.at(2), 3), c.capacity_for(0.5)
    (0.667, 3)
    >>> MissRatioCurve.from_dict(c.to_dict()).misses.tolist()
    [6, 6, 4, 3]
    """

    name: str
    capacities: np.ndarray
    miss_ratio: np.ndarray
    lookups: int
    misses: np.ndarray | None = None
    table_rows: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        caps = _whole_capacities(self.capacities, f"curve {self.name!r}: capacities")
        ratio = np.asarray(self.miss_ratio, dtype=np.float64)
        if caps.ndim != 1 or caps.shape != ratio.shape or caps.size == 0:
            raise ValueError(
                f"curve {self.name!r}: capacities {caps.shape} and miss_ratio {ratio.shape}; "
                "expected equal non-empty 1-D arrays"
            )
        if (np.diff(caps) <= 0).any():
            raise ValueError(f"curve {self.name!r}: capacities must be strictly ascending")
        if caps[0] < 0:
            raise ValueError(f"curve {self.name!r}: capacities must be >= 0; got {int(caps[0])}")
        object.__setattr__(self, "capacities", caps)
        object.__setattr__(self, "miss_ratio", ratio)
        if self.misses is not None:
            object.__setattr__(self, "misses", np.asarray(self.misses, dtype=np.int64))

    @property
    def hit_ratio(self) -> np.ndarray:
        """1 - miss ratio at each capacity."""
        return 1.0 - self.miss_ratio

    @property
    def max_capacity(self) -> int:
        """Largest capacity on the curve; beyond it the miss ratio stays flat."""
        return int(self.capacities[-1])

    @property
    def min_capacity(self) -> int:
        """Smallest capacity above 0 the curve resolves (``metadata["min_capacity"]``, else 0)."""
        return int(self.metadata.get("min_capacity", 0))

    def resolved_at(self, capacity: float) -> float | None:
        """Miss ratio at ``capacity`` as :meth:`at`, or None between 0 and :attr:`min_capacity`
        (where :meth:`at` could only interpolate from the point (0, 1.0))."""
        return None if 0 < capacity < self.min_capacity else float(self.at(capacity))

    def at(self, capacity: float | np.ndarray) -> float | np.ndarray:
        """Miss ratio at ``capacity`` rows: exact on grid points, linear in between, flat past the
        end."""
        out = np.interp(capacity, self.capacities, self.miss_ratio)
        return float(out) if np.ndim(out) == 0 else out

    def capacity_for(self, hit_ratio: float) -> int | None:
        """Smallest capacity on the curve whose hit ratio reaches ``hit_ratio`` (None if none)."""
        reach = np.nonzero(self.hit_ratio >= hit_ratio - 1e-12)[0]
        return int(self.capacities[reach[0]]) if reach.size else None

    def resample(self, capacities: Sequence[int] | np.ndarray) -> MissRatioCurve:
        """This curve at other capacities (interpolated as in :meth:`at`)."""
        caps = _capacity_grid(capacities)
        misses = None
        if self.misses is not None and np.isin(caps, self.capacities).all():
            misses = self.misses[np.searchsorted(self.capacities, caps)]
        return MissRatioCurve(
            self.name,
            caps,
            np.asarray(self.at(caps)),
            self.lookups,
            misses,
            self.table_rows,
            dict(self.metadata),
        )

    def to_dict(self, max_points: int | None = 2000) -> dict[str, Any]:
        """Plain-JSON form; curves longer than ``max_points`` (at least 2; None: no limit) are
        thinned to at most that many points, log- and evenly spaced (ends kept)."""
        if max_points is not None and (
            isinstance(max_points, bool)
            or not isinstance(max_points, int | np.integer)
            or max_points < 2
        ):
            raise ValueError(
                f"max_points: got {max_points!r}; expected an integer >= 2 (the ends are kept) "
                "or None"
            )
        idx = np.arange(self.capacities.size)
        if max_points is not None and idx.size > max_points:
            half = max_points // 2 if max_points >= 4 else 0  # 2 or 3: the ends alone
            log = np.geomspace(1, idx.size - 1, half).astype(np.int64)
            lin = np.linspace(0, idx.size - 1, half).astype(np.int64)
            idx = np.unique(np.concatenate([[0, idx.size - 1], log, lin]))
        return {
            "name": self.name,
            "lookups": int(self.lookups),
            "table_rows": self.table_rows,
            "capacities": self.capacities[idx].tolist(),
            "miss_ratio": [round(float(v), 9) for v in self.miss_ratio[idx]],
            "misses": None if self.misses is None else self.misses[idx].tolist(),
            "metadata": jsonable(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MissRatioCurve:
        """Inverse of :meth:`to_dict`."""
        return cls(
            data["name"],
            np.asarray(data["capacities"]),
            np.asarray(data["miss_ratio"]),
            int(data["lookups"]),
            None if data.get("misses") is None else np.asarray(data["misses"]),
            data.get("table_rows"),
            dict(data.get("metadata") or {}),
        )

    def save(self, path: str | os.PathLike[str], max_points: int | None = None) -> None:
        """Write as JSON (every point unless ``max_points``)."""
        Path(path).write_text(json.dumps(self.to_dict(max_points)))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MissRatioCurve:
        """Read a curve written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        return (
            f"MissRatioCurve({self.name!r}, points={self.capacities.size}, "
            f"max_capacity={self.max_capacity}, lookups={self.lookups}, "
            f"min_miss_ratio={float(self.miss_ratio.min()):.4f})"
        )


def jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars/arrays to Python, NaN/inf to None, paths to str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

_BLOCK = 1 << 24  # ids handed to a kernel at once when the source is one big array


def _iter_chunks(source: Any) -> Iterator[np.ndarray]:
    """Flat int64 arrays from an array (a tensor, a list of ids), a TraceReader (all tables) or an
    iterable of arrays."""
    if _one_array(source):  # not one chunk per id, each through Python
        source = np.asarray(source)
    if isinstance(source, np.ndarray):
        flat = source.reshape(-1)
        for start in range(0, flat.size, _BLOCK):
            yield _as_int64(flat[start : start + _BLOCK])
        return
    if isinstance(source, TraceReader):
        source = source.ids()
    for part in source:
        yield _as_int64(np.asarray(part).reshape(-1))


def _one_array(source: Any) -> bool:
    """Whether ``source`` is ids as one array (a tensor; a list or tuple of integers, no bool)
    rather than an iterable of chunks."""
    if isinstance(source, np.ndarray | TraceReader):
        return False
    if hasattr(source, "__array__"):  # a tensor
        return True
    if not isinstance(source, list | tuple) or not source:
        return False
    kinds = set(map(type, source))  # by the types alone, not one look per id
    return all(issubclass(k, numbers.Integral) and not issubclass(k, bool) for k in kinds)


def _as_int64(ids: np.ndarray) -> np.ndarray:
    """Contiguous int64 view or copy; rejects floats, negatives and ids past int64 (a uint64
    named as given, not wrapped negative)."""
    if ids.dtype.kind not in "iu":
        raise RowIdError(f"row ids of dtype {ids.dtype}; expected integers")
    if ids.size and ids.min() < 0:
        raise RowIdError(f"negative row id {int(ids.min())}; expected ids >= 0")
    if ids.size and int(ids.max()) >= 2**63:
        raise RowIdError(f"row id {int(ids.max())}; expected ids below 2**63 (int64)")
    return np.ascontiguousarray(ids, dtype=np.int64)


def _as_array(source: Any) -> np.ndarray:
    """The whole source as one flat int64 array."""
    if isinstance(source, np.ndarray):
        return _as_int64(source.reshape(-1))
    parts = list(_iter_chunks(source))
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Exact LRU
# ---------------------------------------------------------------------------------------------


class StackDistanceCounter:
    """Streaming exact LRU stack-distance histogram (feed chunks, then ask for the curve).

    Memory: 4 bytes per possible row id for the latest-access array (ids below
    ``DENSE_ID_LIMIT`` index it directly; larger ids go through a hash map, ~50 bytes per distinct
    id), 8 bytes per possible row id for the histogram, and 8-16 bytes per distinct row for the
    time axis (compacted to the distinct rows whenever it fills, then grown to 4x them), whatever
    the trace length. :meth:`curve` adds 24 bytes per distinct row. Access times and row indices
    are int32: a trace of more than ``MAX_TIME_CAPACITY // 2`` distinct rows is refused
    (:class:`~tiered_store.errors.LimitError`).

    Examples
    --------
    >>> sd = StackDistanceCounter()
    >>> sd.update(np.array([1, 2, 1])); sd.update(np.array([3, 1, 2]))
    >>> distances, cold = sd.histogram()
    >>> distances.tolist(), cold   # distance 1: never, 2: twice, 3: once; 3 first accesses
    ([0, 2, 1], 3)
    >>> sd.curve().misses.tolist()
    [6, 6, 4, 3]
    """

    def __init__(self) -> None:
        self._last = np.zeros(0, dtype=np.int32)  # per row: latest access time + 1, 0 = never
        self._owner, self._bits, self._tree = time_axis(MIN_TIME_CAPACITY)
        self._hist = np.zeros(2, dtype=np.int64)  # [0]: cold misses, [d]: stack distance d
        self._state = np.zeros(2, dtype=np.int64)  # time, distinct
        self._map: Any = None  # id -> dense index once an id reaches DENSE_ID_LIMIT
        self._next_index = 0
        self.lookups = 0

    @property
    def distinct(self) -> int:
        """Distinct rows seen."""
        return int(self._state[1])

    def _grow_index(self, size: int) -> None:
        """Make room for dense indices below ``size``."""
        if size - 1 > MAX_ROW_INDEX:  # the time axis keeps each time's row as int32
            raise LimitError(
                f"{size:,} row indices (ids below {DENSE_ID_LIMIT:,} index directly, larger "
                f"ones are numbered after them); expected at most {MAX_ROW_INDEX + 1:,}: the "
                "time axis keeps row indices as int32"
            )
        if size > self._last.size:
            new = max(size, int(self._last.size * 1.5))
            last = np.zeros(new, dtype=np.int32)
            last[: self._last.size] = self._last
            self._last = last
        if self._hist.size < self._last.size + 2:
            hist = np.zeros(self._last.size + 2, dtype=np.int64)
            hist[: self._hist.size] = self._hist
            self._hist = hist

    def update(self, ids: np.ndarray) -> None:
        """Process the next ids of the stream (any shape, request order)."""
        ids = _as_int64(np.asarray(ids).reshape(-1))
        if ids.size == 0:
            return
        if self._map is None:
            hi = int(ids.max())
            if hi >= DENSE_ID_LIMIT:
                self._map = kernels.int_dict()
                touched = np.nonzero(self._last)[0].astype(np.int64)
                kernels.dict_put_identity(self._map, touched)
                self._next_index = self._last.size
            else:
                self._grow_index(hi + 1)
        if self._map is not None:
            dense = np.empty_like(ids)
            self._next_index = kernels.remap_from(ids, self._map, self._next_index, dense)
            self._grow_index(self._next_index)
            ids = dense
        pos = 0
        while pos < ids.size:
            pos = kernels.lru_pass(
                ids, pos, self._last, self._owner, self._bits, self._tree, self._hist, self._state
            )
            if pos < ids.size:
                self._compact()
        self.lookups += ids.size

    def _compact(self) -> None:
        """Renumber live times 0..distinct-1; grow the time axis to 4x distinct when it is over
        half full."""
        axis = (self._owner, self._bits, self._tree)
        (self._owner, self._bits, self._tree), distinct = compact_time_axis(
            self._last, axis, int(self._state[0])
        )
        self._state[0] = distinct

    def histogram(self) -> tuple[np.ndarray, int]:
        """``(counts, cold)``: ``counts[d - 1]`` accesses at stack distance d (1..distinct), and
        the number of first accesses."""
        d = self.distinct
        return self._hist[1 : d + 1].copy(), int(self._hist[0])

    def curve(
        self,
        capacities: Sequence[int] | np.ndarray | None = None,
        *,
        name: str = "lru",
        table_rows: int | None = None,
    ) -> MissRatioCurve:
        """The exact LRU curve at every capacity 0..distinct, or at ``capacities``."""
        counts, cold = self.histogram()
        misses = self.lookups - np.concatenate([[0], np.cumsum(counts)])
        caps = np.arange(misses.size, dtype=np.int64)
        meta = {"method": "exact LRU stack distances", "distinct": self.distinct, "cold": cold}
        curve = MissRatioCurve(
            name, caps, _ratio(misses, self.lookups), self.lookups, misses, table_rows, meta
        )
        return curve if capacities is None else _exact_at(curve, capacities)


def time_axis(times: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The LRU kernels' time axis for ``times`` access times (whole 64-bit words): the row owning
    each time, the bitmap of latest uses, and the Fenwick tree over the bitmap's words."""
    words = max(1, -(-times // 64))
    return (
        np.zeros(words * 64, dtype=np.int32),
        np.zeros(words, dtype=np.uint64),
        np.zeros(words + 1, dtype=np.int32),
    )


def time_capacity(live: int) -> int:
    """Access times a time axis takes to hold ``live`` of them at most half full:
    ``TIME_AXIS_GROWTH`` x ``live``, at most ``MAX_TIME_CAPACITY``; more than half of that is
    refused with a :class:`~tiered_store.errors.LimitError` (access times are int32).

    Examples
    --------
    >>> time_capacity(1000), time_capacity(MAX_TIME_CAPACITY // 2) == MAX_TIME_CAPACITY
    (4000, True)
    """
    if 2 * live > MAX_TIME_CAPACITY:
        raise LimitError(
            f"stack distances over {live:,} distinct rows; expected at most "
            f"{MAX_TIME_CAPACITY // 2:,}: the time axis keeps access times as int32, up to "
            f"{MAX_TIME_CAPACITY:,} of them"
        )
    return min(TIME_AXIS_GROWTH * live, MAX_TIME_CAPACITY)


def compact_time_axis(
    last: np.ndarray, axis: tuple[np.ndarray, np.ndarray, np.ndarray], used: int, room: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int]:
    """Renumber the ``used`` times of ``axis`` so the live ones are 0..distinct-1 and rebuild its
    bitmap; first grow it to ``TIME_AXIS_GROWTH`` x (distinct + ``room``) times (at most
    ``MAX_TIME_CAPACITY``: :func:`time_capacity`) when those would fill more than half of it.
    Returns the axis and the distinct rows."""
    owner, bits, tree = axis
    distinct = kernels.compact_bitmap_times(last, owner, used)
    need = distinct + room
    if 2 * need > owner.size:
        grown = time_axis(time_capacity(need))
        grown[0][:distinct] = owner[:distinct]
        owner, bits, tree = grown
    kernels.bitmap_ones(bits, tree, distinct)
    return (owner, bits, tree), distinct


def _ratio(misses: np.ndarray, lookups: int) -> np.ndarray:
    """misses / lookups; all ones for an empty trace (nothing can hit)."""
    return misses / lookups if lookups else np.ones(misses.size)


def _capacity_grid(capacities: Sequence[int] | np.ndarray) -> np.ndarray:
    """0 and ``capacities``, ascending and unique, as int64 (whole numbers of rows)."""
    return np.unique(np.concatenate([[0], _whole_capacities(capacities)]))


def _exact_at(curve: MissRatioCurve, capacities: Sequence[int] | np.ndarray) -> MissRatioCurve:
    """An exact full curve restricted to ``capacities`` (flat past its last point)."""
    caps = _capacity_grid(capacities)
    if caps[0] < 0:
        raise ValueError(f"capacities must be >= 0; got {int(caps[0])}")
    idx = np.minimum(caps, curve.max_capacity)
    misses = curve.misses[idx] if curve.misses is not None else None
    return MissRatioCurve(
        curve.name,
        caps,
        curve.miss_ratio[idx],
        curve.lookups,
        misses,
        curve.table_rows,
        curve.metadata,
    )


def lru_mrc(
    source: Any,
    *,
    capacities: Sequence[int] | np.ndarray | None = None,
    table_rows: int | None = None,
    name: str = "lru",
) -> MissRatioCurve:
    """Exact LRU miss-ratio curve, in one streaming pass.

    Parameters
    ----------
    source : ndarray, tensor, list of ints, TraceReader or iterable of ndarrays
        Row ids in request order (a reader's ids of all its tables; pass ``reader.ids(table)``
        for one table).
    capacities : sequence of int, optional
        Report only these capacities (rows). Default: every capacity 0..distinct rows.
    table_rows : int, optional
        Rows in the table, kept on the curve for plots in % of the table.
    name : str
        Curve name.

    Returns
    -------
    MissRatioCurve
        With exact integer ``misses``.

    Examples
    --------
    >>> c = lru_mrc(np.array([0, 1, 2, 0, 1, 2, 3]))
    >>> c.misses.tolist()    # capacity 0, 1, 2 miss everything; 3 keeps the cycle
    [7, 7, 7, 4, 4]
    >>> lru_mrc(np.array([0, 1, 2, 0, 1, 2, 3]), capacities=[3]).miss_ratio.round(3).tolist()
    [1.0, 0.571]
    """
    start = time.perf_counter()
    counter = StackDistanceCounter()
    for chunk in _iter_chunks(source):
        counter.update(chunk)
    curve = counter.curve(capacities, name=name, table_rows=table_rows)
    seconds = time.perf_counter() - start
    curve.metadata.update(seconds=round(seconds, 4))
    return curve


# ---------------------------------------------------------------------------------------------
# SHARDS
# ---------------------------------------------------------------------------------------------


def shards_mrc(
    source: Any,
    *,
    rate: float = DEFAULT_SHARDS_RATE,
    fixed_size: int | None = None,
    seed: int = 0,
    capacities: Sequence[int] | np.ndarray | None = None,
    table_rows: int | None = None,
    adjust: bool = True,
    name: str = "shards",
) -> MissRatioCurve:
    """Approximate LRU miss-ratio curve from a spatially hashed sample of rows (SHARDS).

    A row is sampled when a 64-bit hash of its id (seeded) falls below a threshold, so every
    access to a sampled row is seen and stack distances among sampled rows, scaled by 1/R,
    estimate the true ones. ``adjust`` applies SHARDS-adj: the gap between the expected (N R) and
    the actual number of sampled accesses is added to the smallest distance, which removes most
    of the bias from a hot row that happens to be (or not be) sampled.

    Parameters
    ----------
    source : ndarray, tensor, list of ints, TraceReader or iterable of ndarrays
        Row ids in request order.
    rate : float
        Fixed sampling rate R in (0, 1], in steps of 2**-24 (ignored with ``fixed_size``).
    fixed_size : int, optional
        SHARDS-max: track at most this many distinct sampled rows, lowering the rate as needed;
        memory is then bounded whatever the trace. At most ``MAX_TIME_CAPACITY // 4 - 1``
        (536,870,895: access times are int32).
    seed : int
        Hash seed in [0, 2**64); different seeds give independent samples.
    capacities : sequence of int, optional
        Resample the curve at these capacities (rows).
    table_rows : int, optional
        Rows in the table.
    adjust : bool
        Apply the SHARDS-adj correction.
    name : str
        Curve name.

    Returns
    -------
    MissRatioCurve
        Without exact ``misses``; capacities are the scaled sampled distances.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> ids = (rng.pareto(1.0, 400_000) * 100).astype(np.int64) % 100_000
    >>> exact = lru_mrc(ids)
    >>> approx = shards_mrc(ids, rate=0.1)
    >>> mean_absolute_error(approx, exact) < 0.01
    True
    """
    start = time.perf_counter()
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: got {seed!r}; expected an integer in [0, 2**64)")
    if fixed_size is not None:
        caps, ratio, lookups, meta = _shards_fixed_size(source, fixed_size, seed, adjust)
    else:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"rate: got {rate}; expected 0 < rate <= 1")
        threshold = max(1, round(rate * SHARDS_MODULUS))
        real_rate = threshold / SHARDS_MODULUS
        counter = StackDistanceCounter()
        lookups = 0
        for chunk in _iter_chunks(source):
            lookups += chunk.size
            counter.update(chunk[kernels.sample_mask(chunk, np.uint64(seed), np.uint64(threshold))])
        counts, cold = counter.histogram()
        counts = counts.astype(np.float64)
        expected = lookups * real_rate
        if adjust and counts.size:
            counts[0] += expected - counter.lookups
        total = expected if adjust else max(counter.lookups, 1)
        hits = np.concatenate([[0.0], np.cumsum(counts)])
        caps = np.rint(np.arange(hits.size) / real_rate).astype(np.int64)
        ratio = np.clip((total - hits) / max(total, 1e-300), 0.0, 1.0)
        meta = {
            "method": "SHARDS fixed-rate" + ("-adj" if adjust else ""),
            "rate": real_rate,
            "sampled_lookups": counter.lookups,
            "sampled_distinct": counter.distinct,
            "seed": seed,
        }
    if lookups == 0:
        ratio = np.ones(caps.size)
    curve = MissRatioCurve(name, caps, ratio, lookups, None, table_rows, meta)
    if capacities is not None:
        curve = curve.resample(capacities)
    curve.metadata.update(seconds=round(time.perf_counter() - start, 4))
    return curve


def _shards_fixed_size(
    source: Any, smax: int, seed: int, adjust: bool
) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any]]:
    """SHARDS-max: capacities, miss ratios, lookups, metadata."""
    most = MAX_TIME_CAPACITY // 4 - 1  # its time axis: 4 x (smax + 1) int32 access times
    if isinstance(smax, bool) or not isinstance(smax, int | np.integer):  # int() truncated 2.5
        raise ValueError(f"fixed_size: got {smax!r}; expected an integer number of rows")
    smax = int(smax)
    if not 1 <= smax <= most:
        raise ValueError(
            f"fixed_size: got {smax:,}; expected a positive number of rows up to {most:,} (its "
            "time axis of 4 x fixed_size access times keeps them as int32)"
        )
    cap = 4 * (smax + 1)
    slots = kernels.int_dict()
    slot_id = np.zeros(smax + 1, dtype=np.int64)
    slot_hash = np.zeros(smax + 1, dtype=np.uint64)
    last = np.zeros(smax + 1, dtype=np.int32)
    owner = np.zeros(cap + 1, dtype=np.int32)
    tree = np.zeros(cap + 1, dtype=np.int32)
    heap = np.zeros(smax + 1, dtype=np.int64)
    free = np.arange(smax, -1, -1, dtype=np.int64)
    hist = np.zeros(1 << 16, dtype=np.float64)
    state = np.array([0, 0, 0, smax + 1], dtype=np.int64)  # time, distinct, heap size, free
    fstate = np.zeros(2, dtype=np.float64)  # cold weight, total weight
    thresh = np.array([np.iinfo(np.uint64).max], dtype=np.uint64)
    lookups = 0
    for chunk in _iter_chunks(source):
        lookups += chunk.size
        pos = 0
        while pos < chunk.size:
            pos = kernels.shards_fixed_size_pass(
                chunk,
                pos,
                np.uint64(seed),
                smax,
                slots,
                slot_id,
                slot_hash,
                last,
                owner,
                tree,
                heap,
                free,
                hist,
                state,
                fstate,
                thresh,
            )
            if pos >= chunk.size:
                break
            if state[0] >= cap:
                state[0] = kernels.compact_times(last, owner, int(state[0]))
                kernels.fenwick_ones(tree, int(state[0]))
            else:
                grown = np.zeros(hist.size * 2, dtype=np.float64)
                grown[: hist.size] = hist
                hist = grown
    total = float(fstate[1])
    buckets = np.nonzero(hist)[0]
    counts = hist[buckets]
    if adjust and counts.size:
        counts[0] += lookups - total
    norm = float(lookups) if adjust else max(total, 1e-300)
    hits = np.concatenate([[0.0], np.cumsum(counts)])
    caps = np.concatenate([[0], buckets]).astype(np.int64)
    if caps.size > 1 and caps[1] == 0:  # a distance can round to bucket 0 only at rate > 2
        caps, hits = caps[1:], hits[1:]
    ratio = np.clip((norm - hits) / max(norm, 1e-300), 0.0, 1.0)
    rate = float(thresh[0]) / 2.0**64
    meta = {
        "method": "SHARDS fixed-size" + ("-adj" if adjust else ""),
        "fixed_size": smax,
        "final_rate": rate,
        "seed": seed,
    }
    return caps, ratio, lookups, meta


# ---------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------


def static_topk_mrc(
    counts: Any,
    *,
    capacities: Sequence[int] | np.ndarray | None = None,
    preloaded: bool = True,
    table_rows: int | None = None,
    name: str = "static-topk",
) -> MissRatioCurve:
    """Oracle: pin the K most frequent rows (by their true counts in the trace) for every K.

    Hits at K = sum of the K largest counts. ``preloaded=True`` (default) models the store's warm
    start, where pinned rows are loaded before the first lookup, so there are no compulsory misses
    and the curve can sit below Belady's at small K on short traces; ``preloaded=False`` makes each
    pinned row miss once (its first access), as the demand-filled curves do.

    Parameters
    ----------
    counts : ndarray or FrequencyProfile
        Lookups per row (any order; zeros ignored): 1-D integers >= 0, ``table_rows`` of them
        when that is given (row ids are not counts: ``np.bincount`` them first); or a profile
        (its ``counts``).
    capacities, table_rows, name
        As for :func:`lru_mrc`.
    preloaded : bool
        Whether the pinned rows are in place before the trace starts.

    Examples
    --------
    >>> static_topk_mrc(np.array([5, 1, 3, 1])).misses.tolist()
    [10, 5, 2, 1, 0]
    >>> static_topk_mrc(np.array([5, 1, 3, 1]), preloaded=False).misses.tolist()
    [10, 6, 4, 4, 4]
    """
    if isinstance(counts, FrequencyProfile):
        table_rows = table_rows if table_rows is not None else counts.rows
        counts = counts.counts
    else:
        counts = _per_row_counts(counts, table_rows)
    misses = static_topk_misses(counts, preloaded=preloaded)
    lookups = int(misses[0])
    caps = np.arange(misses.size, dtype=np.int64)
    meta = {"method": StaticTopK.method, "preloaded": preloaded}
    curve = MissRatioCurve(name, caps, _ratio(misses, lookups), lookups, misses, table_rows, meta)
    return curve if capacities is None else _exact_at(curve, capacities)


def _per_row_counts(counts: Any, table_rows: int | None) -> np.ndarray:
    """``counts`` checked as lookups per row (row ids in their place gave a curve of nonsense):
    1-D integers >= 0, ``table_rows`` of them when it is given."""
    counts = np.asarray(counts)
    hint = "; row ids? count them first: np.bincount(ids.reshape(-1), minlength=rows)"
    if counts.ndim != 1:
        raise ValueError(
            f"static_topk_mrc: counts of shape {counts.shape}; expected one count per row (1-D)"
            + hint
        )
    if counts.dtype.kind not in "iu" and counts.size:
        raise ValueError(f"static_topk_mrc: counts of dtype {counts.dtype}; expected integers")
    if table_rows is not None and counts.size != table_rows:
        raise ValueError(
            f"static_topk_mrc: counts for {counts.size:,} rows; expected table_rows="
            f"{table_rows:,}, one per row" + hint
        )
    if counts.size and counts.min() < 0:
        row = int(np.argmin(counts))
        raise ValueError(
            f"static_topk_mrc: counts[{row}] = {int(counts[row])}; expected lookups per row >= 0"
        )
    return counts


def belady_misses(
    source: Any,
    capacities: Sequence[int] | np.ndarray,
    *,
    bypass: bool = True,
    workers: int | None = None,
) -> np.ndarray:
    """Misses of Belady's MIN (clairvoyant) cache at each capacity, from any id source.

    The simulation is the offline bound :class:`policies.offline.Belady` (registry name
    ``belady``); this reads the source into one array first.

    Parameters
    ----------
    source : ndarray, tensor, list of ints, TraceReader or iterable of ndarrays
        Row ids in request order.
    capacities : sequence of int
        Cache sizes in rows.
    bypass : bool
        True (default): a missed row whose next use is farther than every cached row's is not
        cached (the optimum for caches with an admission filter). False: classic demand paging.
    workers : int, optional
        Threads, one capacity each (default: CPU count, at most the number of capacities).

    Examples
    --------
    >>> belady_misses(np.array([1, 2, 3, 1, 2, 3]), [1, 2, 3]).tolist()
    [5, 4, 3]
    """
    return Belady(bypass=bypass, workers=workers).misses(
        _as_array(source), _whole_capacities(capacities)
    )


def _check_points(points: object) -> None:
    """A number of capacities to evaluate: a positive integer (not a bool)."""
    if not _whole(points, 1):
        raise ValueError(f"points: got {points!r}; expected a positive number of capacities")


def belady_mrc(
    source: Any,
    capacities: Sequence[int] | np.ndarray | None = None,
    *,
    bypass: bool = True,
    points: int = 24,
    table_rows: int | None = None,
    name: str = "belady",
) -> MissRatioCurve:
    """Belady's MIN miss-ratio curve at ``capacities`` (default: ``points`` log-spaced capacities
    up to the distinct rows). See :func:`belady_misses`.

    Examples
    --------
    >>> belady_mrc(np.array([1, 2, 3, 1, 2, 3]), [1, 2, 3]).misses.tolist()
    [6, 5, 4, 3]
    """
    if capacities is None:
        _check_points(points)
    ids = _as_array(source)
    if capacities is None:
        distinct = int(np.unique(ids).size)
        capacities = np.unique(np.geomspace(1, max(distinct, 1), points).astype(np.int64))
    return _bound_curve(Belady(bypass=bypass), ids, capacities, table_rows, name)


def offline_mrc(
    bound: str,
    source: Any,
    capacities: Sequence[int] | np.ndarray,
    *,
    table_rows: int | None = None,
) -> MissRatioCurve:
    """Miss-ratio curve of an offline bound named in the policy registry, with its defaults.

    Parameters
    ----------
    bound : str
        A name from ``policies.registry.offline_names()``: ``"belady"`` or ``"static-topk"``.
    source : ndarray, tensor, list of ints, TraceReader or iterable of ndarrays
        Row ids in request order.
    capacities : sequence of int
        Cache sizes in rows (capacity 0 is always added).
    table_rows : int, optional
        Rows in the table.

    Examples
    --------
    >>> ids = np.array([1, 2, 3, 1, 2, 3])
    >>> offline_mrc("belady", ids, [1, 2, 3]).misses.tolist()
    [6, 5, 4, 3]
    >>> offline_mrc("static-topk", ids, [1, 2, 3]).misses.tolist()   # preloaded: no cold misses
    [6, 4, 2, 0]
    """
    return _bound_curve(offline_bound(bound), _as_array(source), capacities, table_rows, None)


def _bound_curve(
    bound: OfflineBound,
    ids: np.ndarray,
    capacities: Sequence[int] | np.ndarray,
    table_rows: int | None,
    name: str | None,
) -> MissRatioCurve:
    """An offline bound's curve at capacity 0 and ``capacities``, named ``name`` or the bound's."""
    start = time.perf_counter()
    caps = _capacity_grid(capacities)
    misses = bound.misses(ids, caps)
    meta = {"method": bound.method, "seconds": round(time.perf_counter() - start, 4)}
    lookups = int(ids.size)
    return MissRatioCurve(
        name or bound.name, caps, _ratio(misses, lookups), lookups, misses, table_rows, meta
    )


# ---------------------------------------------------------------------------------------------
# Comparing curves
# ---------------------------------------------------------------------------------------------


def mean_absolute_error(
    curve: MissRatioCurve,
    reference: MissRatioCurve,
    *,
    points: int = 1000,
    spacing: str = "linear",
) -> float:
    """Mean |miss ratio difference| over ``points`` capacities in (0, reference's largest],
    less those below either curve's :attr:`~MissRatioCurve.min_capacity` (not resolved); NaN
    where that leaves none (the curve resolves nothing up to the reference's largest capacity).

    ``spacing="linear"`` (as in the SHARDS paper: evenly spaced cache sizes) or ``"log"``
    (weights small caches, where sampling is weakest, as much as large ones).

    Examples
    --------
    >>> a = lru_mrc(np.arange(10) % 5)
    >>> mean_absolute_error(a, a)
    0.0
    """
    _check_points(points)
    top = max(reference.max_capacity, 1)
    if spacing == "linear":
        grid = np.linspace(top / points, top, points)
    elif spacing == "log":
        grid = np.geomspace(1, top, points)
    else:
        raise ValueError(f"spacing: got {spacing!r}; expected 'linear' or 'log'")
    grid = np.unique(np.maximum(np.rint(grid), 1))
    grid = grid[grid >= max(curve.min_capacity, reference.min_capacity)]
    if grid.size == 0:
        return math.nan  # not numpy's mean of nothing, which warns from here
    return float(np.mean(np.abs(np.asarray(curve.at(grid)) - np.asarray(reference.at(grid)))))
