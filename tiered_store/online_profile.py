"""A frequency profile learnt while serving, in memory sized by the tier, not by the table.

``zipf-tuned`` ranks rows by *episodes* (see :mod:`tiered_store.profile`). Serving, the store sees
its lookups a window at a time (a batch, or one sequence's worth); :class:`OnlineProfile` counts
each distinct row of a window once, which is an episode count at the window's granularity, in

- a **count-min sketch** (``depth`` rows of int32 counters, ``width_factor`` counters per
  candidate slot, rounded up to a power of two; hashes shared with ``policies.tinylfu``), and
- a **heavy-hitter list** of ``candidates`` rows with the highest estimates, merged per window
  with ``torch.topk`` (no loop per row);

plus the mean number of distinct rows per window, which is what zipf-tuned's recency segment must
hold (the offline rule estimates it from the whole frequency curve, which a bounded counter does
not keep). Memory: ``4 * depth * width + 8 * candidates`` bytes, whatever the table's rows
(without the heavy-hitter list, as the store's re-pinning uses it, the sketch alone, and each
window's rows are counted conservatively: see :meth:`OnlineProfile.update`).

An offline profile, when given, is the starting point (:meth:`OnlineProfile.seed`): its rows
enter the heavy-hitter list and the sketch with their episodes scaled by ``prior_weight``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from policies.tinylfu import as_signed64, mix64, row_seeds, sketch_width

from .errors import ConfigError
from .profile import FrequencyProfile

__all__ = ["OnlineProfile"]


class OnlineProfile:
    """Episodes per row, counted online in bounded memory (count-min sketch + heavy hitters).

    Parameters
    ----------
    candidates : int
        Rows the heavy-hitter list keeps: at least the rows a tier would pin.
    depth, width_factor : int
        Sketch rows, and counters per row per candidate (rounded up to a power of two).
    device : torch.device or str
        Where the counters live.
    seed : int
        Hash seed.
    heavy_hitters : bool
        Keep the heavy-hitter list (a ``topk`` per window). The store's re-pinning
        (:mod:`tiered_store.online_repin`) ranks the rows a tier holds instead and turns it off.
    dtype : torch.dtype
        Counter type: ``int32``, or ``float32`` for weighted (decayed) counts.

    Examples
    --------
    >>> p = OnlineProfile(candidates=2)
    >>> for window in ([5, 5, 9], [5, 1], [5, 9, 9]):
    ...     p.update(torch.tensor(window))
    >>> p.top_rows(2).tolist(), p.estimates(torch.tensor([5, 9, 1])).tolist()
    ([5, 9], [3, 2, 1])
    >>> p.windows, round(p.mean_distinct_per_window, 2)
    (3, 2.0)
    """

    def __init__(
        self,
        candidates: int,
        *,
        depth: int = 4,
        width_factor: int = 4,
        device: torch.device | str = "cpu",
        seed: int = 0,
        heavy_hitters: bool = True,
        dtype: torch.dtype = torch.int32,
    ) -> None:
        if candidates < 1 or depth < 1 or width_factor < 1:
            raise ConfigError(
                f"online profile: got candidates={candidates}, depth={depth}, "
                f"width_factor={width_factor}; expected each >= 1"
            )
        self.device = torch.device(device)
        self.capacity = int(candidates)
        self.width = sketch_width(self.capacity, width_factor)
        self._seed_col = torch.tensor(
            [as_signed64(s) for s in row_seeds(seed, depth)], dtype=torch.int64, device=self.device
        ).unsqueeze(1)
        self.sketch = torch.zeros(depth, self.width, dtype=dtype, device=self.device)
        self.heavy_hitters = heavy_hitters
        # without heavy hitters on the CPU a window is counted in one numba pass
        # (tiered_store.sketch_kernel), conservatively: the store's re-pinning
        self._kernel = not heavy_hitters and self.device.type == "cpu"
        self.rows = torch.full(
            (self.capacity if heavy_hitters else 0,), -1, dtype=torch.int64, device=self.device
        )
        self.windows = 0
        self.lookups = 0
        self._distinct_sum = 0

    @property
    def nbytes(self) -> int:
        """Bytes held: the sketch and the heavy-hitter ids (estimates are recomputed)."""
        return self.sketch.nbytes + self.rows.nbytes

    @staticmethod
    def bytes_for(
        candidates: int,
        *,
        depth: int = 4,
        width_factor: int = 4,
        heavy_hitters: bool = True,
        dtype: torch.dtype = torch.int32,
    ) -> int:
        """:attr:`nbytes` of the profile these arguments build, without building it.

        Examples
        --------
        >>> OnlineProfile.bytes_for(1000) == OnlineProfile(1000).nbytes == 4 * 4 * 4096 + 8 * 1000
        True
        """
        width = sketch_width(int(candidates), width_factor)
        return depth * width * dtype.itemsize + (8 * int(candidates) if heavy_hitters else 0)

    @property
    def mean_distinct_per_window(self) -> float:
        """Distinct rows per window so far (what a recency segment covering one must hold)."""
        return self._distinct_sum / self.windows if self.windows else 0.0

    def _buckets(self, ids: torch.Tensor) -> torch.Tensor:
        """``[depth, len(ids)]``: each id's counter in each sketch row."""
        return mix64(ids.reshape(1, -1), self._seed_col) & (self.width - 1)

    def estimates(self, ids: torch.Tensor) -> torch.Tensor:
        """Estimated episodes of each id (never below the count the sketch was given)."""
        ids = ids.to(self.device)
        if self._kernel:  # the numba pass (same hash, same minimum)
            from .sketch_kernel import sketch_estimates  # noqa: PLC0415 (imports numba)

            ids = ids.to(torch.int64).contiguous()
            return torch.from_numpy(
                sketch_estimates(self.sketch.numpy(), self._seeds_u64(), ids.numpy())
            )
        return torch.gather(self.sketch, 1, self._buckets(ids)).amin(dim=0)

    def update(
        self, window: torch.Tensor, weight: float = 1, *, distinct_elsewhere: int = 0
    ) -> None:
        """Count one window of lookups: each distinct row once (``weight`` times); without the
        heavy-hitter list (the store's re-pinning), conservatively: a row's counters are raised to
        their minimum plus ``weight`` rather than each increased by it, so collisions inflate
        estimates less. ``distinct_elsewhere``: distinct rows of the window counted by someone
        else (a tier's hits, counted per slot), added to the window's distinct rows. A ``weight`` the counters cannot add as given (a
        fraction for integer counters, past their largest, negative, not finite) is a ValueError."""
        self._check_weight(weight)
        self._distinct_sum += distinct_elsewhere
        if self._kernel:  # CPU, no heavy hitters: one numba pass, no unique
            from .sketch_kernel import sketch_add_window  # noqa: PLC0415 (imports numba)

            ids = window.reshape(-1).to(torch.int64).contiguous().numpy()
            self._distinct_sum += sketch_add_window(
                self.sketch.numpy(), self._seeds_u64(), ids, float(weight)
            )
            self.windows += 1
            self.lookups += window.numel()
            return
        ids = torch.unique(window.reshape(-1).to(self.device))
        if self.heavy_hitters:
            weights = torch.full((ids.numel(),), weight, dtype=self.sketch.dtype, device=ids.device)
            self._add(ids, weights)
        else:  # conservatively, from the minima before the window, as the CPU kernel does
            buckets = self._buckets(ids)
            raised = torch.gather(self.sketch, 1, buckets).amin(dim=0) + weight
            self._raise_torch(self.sketch, buckets, raised)
        self.windows += 1
        self.lookups += window.numel()
        self._distinct_sum += ids.numel()

    def _check_weight(self, weight: float) -> None:
        """A ValueError naming ``weight`` where the counters cannot add it as given: not a finite
        number >= 0, or, for integer counters, a fraction (cast to 0) or past their largest."""
        dtype = self.sketch.dtype
        if self.sketch.is_floating_point():
            if not 0 <= weight <= torch.finfo(dtype).max:  # NaN too
                raise ValueError(
                    f"online profile weight: got {weight!r}; expected a finite number >= 0 "
                    f"(the {dtype} counters)"
                )
        elif not (0 <= weight <= torch.iinfo(dtype).max and weight == int(weight)):
            raise ValueError(
                f"online profile weight: got {weight!r}; expected a whole number from 0 to "
                f"{torch.iinfo(dtype).max:,} (the {dtype} counters; float32 ones take fractions)"
            )

    def raise_to(
        self, ids: torch.Tensor, values: torch.Tensor, sketch: torch.Tensor | None = None
    ) -> None:
        """Raise each id's counters to at least its value (``sketch``: into this copy instead),
        so its estimate is at least that; a counter already higher stays (idempotent)."""
        sketch = self.sketch if sketch is None else sketch
        if ids.numel() == 0:
            return
        ids = ids.to(self.device, torch.int64)
        values = values.to(self.device, sketch.dtype)
        if self.device.type == "cpu":  # one numba pass
            from .sketch_kernel import sketch_add  # noqa: PLC0415 (imports numba)

            ids, values = ids.contiguous(), values.contiguous()
            sketch_add(sketch.numpy(), self._seeds_u64(), ids.numpy(), values.numpy(), True)
        else:
            self._raise_torch(sketch, self._buckets(ids), values)

    @staticmethod
    def _raise_torch(sketch: torch.Tensor, buckets: torch.Tensor, values: torch.Tensor) -> None:
        """:meth:`raise_to` with torch ops (CUDA), given each id's counter per row (``buckets``)."""
        for row, idx in zip(sketch, buckets, strict=True):
            row.scatter_reduce_(0, idx, values, reduce="amax")

    def seed(
        self,
        profile: FrequencyProfile,
        prior_weight: float = 1.0,
        *,
        key: str = "online profile prior_weight",
        add: bool = True,
    ) -> None:
        """Start from an offline profile: its top rows by episodes (the rows a tier pins), with
        episodes x ``prior_weight``; by lookups for a profile without episodes. A ``prior_weight``
        that is not finite, or that takes a counter (the rows sharing it summed) past the
        counters' largest, is refused (``key``: the setting the error names). ``add`` False:
        only check it, as onto empty counters (counts a warm restart brought back)."""
        if not 0 <= prior_weight < math.inf:  # NaN too
            raise ConfigError(f"{key}: got {prior_weight}; expected a finite number >= 0")
        top = profile.top_positions(self.capacity, by="episodes")
        source = profile.episodes if profile.episodes is not None else profile.counts
        ids = torch.from_numpy(np.ascontiguousarray(profile.row_ids[top])).to(self.device)
        weights = np.asarray(source[top], dtype=np.float64) * prior_weight
        floating = self.sketch.is_floating_point()
        if not floating:
            weights = np.rint(weights)
        most = float((torch.finfo if floating else torch.iinfo)(self.sketch.dtype).max)
        reached = self._largest_after(ids, weights, most, self.sketch if add else None)
        if reached > most:  # int32 would wrap to negative, float32 become infinite
            raise ConfigError(
                f"{key}: got {prior_weight}, which scales the profile's most episodes "
                f"({source[top].max():,}) to {weights.max():.4g} and a sketch counter (the rows "
                f"sharing it summed) to {reached:.4g}, past the {self.sketch.dtype} counters' "
                f"{most:.4g}; expected a smaller prior_weight"
                + ("" if floating else " or float32 counters")
            )
        if add:
            self._add(ids, torch.from_numpy(weights).to(self.device, self.sketch.dtype))

    def _largest_after(
        self, ids: torch.Tensor, weights: np.ndarray, most: float, onto: torch.Tensor | None
    ) -> float:
        """The largest counter adding ``weights`` at ``ids`` to ``onto`` (None: empty counters)
        would leave, in float64: a bound (the largest now plus every weight) where that is at
        most ``most``, else counter by counter."""
        if not weights.size:
            return 0.0
        bound = (0.0 if onto is None else float(onto.max())) + float(weights.sum())
        if bound <= most:
            return bound
        added = torch.from_numpy(weights).to(self.device)
        largest = 0.0
        for row, idx in enumerate(self._buckets(ids)):
            sums = torch.bincount(idx, added, minlength=self.width)
            largest = max(largest, float((sums if onto is None else sums + onto[row]).max()))
        return largest

    def _add(self, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Add ``weights`` to distinct ``ids`` and merge them into the heavy-hitter list."""
        if ids.numel() == 0:
            return
        if self.device.type == "cpu":  # one numba pass, without the GIL (same hash and sums)
            from .sketch_kernel import sketch_add  # noqa: PLC0415 (imports numba on first use)

            sketch_add(self.sketch.numpy(), self._seeds_u64(), ids.numpy(), weights.numpy(), False)
        else:
            for row, idx in zip(self.sketch, self._buckets(ids), strict=True):
                row.index_add_(0, idx, weights)
        if not self.heavy_hitters:
            return
        held = self.rows[self.rows >= 0]
        pool = torch.cat([held, ids[~torch.isin(ids, held)]])
        keep = torch.topk(self.estimates(pool), min(self.capacity, pool.numel())).indices
        self.rows.fill_(-1)
        self.rows[: keep.numel()] = pool[keep]

    def numpy_sketch(self) -> tuple[np.ndarray, np.ndarray]:
        """The sketch and its rows' hash seeds (uint64) as numpy arrays sharing memory with it
        (CPU), for the kernels that update it in place (:mod:`tiered_store.sketch_kernel`)."""
        return self.sketch.numpy(), self._seeds_u64()

    def _seeds_u64(self) -> np.ndarray:
        """The sketch rows' hash seeds as uint64 (for the numba kernels)."""
        return self._seed_col.reshape(-1).numpy().view(np.uint64)

    def top_rows(self, k: int) -> torch.Tensor:
        """Up to ``k`` rows with the most estimated episodes, most first (ties: lower id)."""
        held = self.rows[self.rows >= 0]
        est = self.estimates(held)
        order = np.lexsort((held.cpu().numpy(), -est.cpu().numpy()))
        return held[torch.from_numpy(order[:k]).to(self.device)]

    def state(self) -> dict[str, Any]:
        """What a warm restart saves: the counters and the window totals (plain numbers)."""
        return {
            "windows": self.windows,
            "lookups": self.lookups,
            "distinct_sum": self._distinct_sum,
            "depth": int(self.sketch.shape[0]),
            "width": self.width,
        }

    def load_state(self, state: dict[str, Any], sketch: np.ndarray) -> None:
        """Restore what :meth:`state` and ``sketch`` saved (shapes checked by the caller)."""
        self.sketch.copy_(torch.from_numpy(sketch.reshape(self.sketch.shape)))
        self.windows = int(state["windows"])
        self.lookups = int(state["lookups"])
        self._distinct_sum = int(state["distinct_sum"])
