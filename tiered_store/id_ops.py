"""Per-batch operations on ids and masks that the lookup path runs on every batch.

On the CPU they go through numpy where that is faster than torch's CPU ops: numpy's sort (SIMD)
and ``nonzero`` at batch sizes (4,096 ids of a real trace: a ``unique`` with inverse and counts
in 50 against 171 us; a ``nonzero`` of 15k flags in 7 against 13 us;
``bench/test_promotion_speed.py`` measures what it buys). Below ``NUMPY_UNIQUE_MIN`` ids, and on
CUDA, they are the torch ops. Both give the same result: sorted unique ids, positions in
ascending order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["array_for_torch", "ids_on_gpu", "nonzero", "snapshot_of", "unique_inverse_counts"]

# below this many ids torch's CPU unique is the faster in use: replaying a real trace (the Vim
# help's, one LRU tier at 5%, four runs each way) took 5.4-5.7 s with torch's at 1,024 ids a
# batch against 5.7-6.0 s with numpy's, and 3.1-3.6 s against 2.6 s at 4,096; at 2,048, 3.9-4.1
# against 3.6-3.8 s (uniform random ids, in isolation, favour torch up to about 5,000)
NUMPY_UNIQUE_MIN = 1536


def nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Positions where a 1-D bool ``mask`` is set, ascending (int64, on the mask's device).

    >>> nonzero(torch.tensor([False, True, True, False])).tolist()
    [1, 2]
    """
    if mask.device.type == "cpu":
        return torch.from_numpy(mask.numpy().nonzero()[0])
    return torch.nonzero(mask).squeeze(1)


def unique_inverse_counts(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.unique(ids, return_inverse=True, return_counts=True)`` for 1-D ``ids``: the
    sorted unique ids, each id's position among them, and how often each occurs.

    For ``NUMPY_UNIQUE_MIN`` or more int64 ids on the CPU, one numpy sort of ``id x n +
    position`` (ids in ``[0, 2**63 / n)``; otherwise a stable argsort) gives the order, and the
    rest is a pass over it; otherwise torch's ``unique``.

    >>> u, inv, cnt = unique_inverse_counts(torch.tensor([7, 3, 7, 9]))
    >>> u.tolist(), inv.tolist(), cnt.tolist()
    ([3, 7, 9], [1, 0, 1, 2], [1, 2, 1])
    """
    n = ids.numel()
    if ids.device.type != "cpu" or ids.dtype != torch.int64 or n < NUMPY_UNIQUE_MIN:
        return torch.unique(ids, return_inverse=True, return_counts=True)
    a = ids.numpy()
    if a.min() >= 0 and int(a.max()) < np.iinfo(np.int64).max // n:
        packed = a * n + np.arange(n, dtype=np.int64)
        packed.sort()
        sorted_ids = packed // n
        order = packed - sorted_ids * n
    else:
        order = np.argsort(a, kind="stable")
        sorted_ids = a[order]
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(sorted_ids[1:], sorted_ids[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    group = torch.from_numpy(np.cumsum(first) - 1)
    inverse = torch.empty(n, dtype=torch.int64).index_copy_(0, torch.from_numpy(order), group)
    counts = np.diff(starts, append=n)
    return torch.from_numpy(sorted_ids[starts]), inverse, torch.from_numpy(counts)


def array_for_torch(value: Any) -> np.ndarray:
    """``value`` as an ndarray of its own shape (0-d stays 0-d) that torch.from_numpy takes
    without a copy or a warning (copied only where torch cannot share it).

    >>> ids = np.arange(3)
    >>> ids.flags.writeable = False
    >>> array_for_torch(ids).flags.writeable, array_for_torch(np.arange(3)[::-1]).strides
    (True, (8,))
    """
    array = np.asarray(value)
    # torch takes other strides (ids[:, ::2] is shared), but no negative ones (which NumPy calls
    # contiguous in an array of one element) nor ones not a multiple of the item size, and has no
    # read-only tensors (it warns that writing one is undefined)
    if not array.flags.writeable or any(
        stride < 0 or (array.itemsize and stride % array.itemsize) for stride in array.strides
    ):
        array = array.copy()
    return array


def ids_on_gpu(ids: object) -> bool:
    """Whether ``ids`` is a CUDA tensor (comparing it with ids kept earlier would wait for it)."""
    return isinstance(ids, torch.Tensor) and ids.is_cuda


def snapshot_of(ids: torch.Tensor, given: torch.Tensor, *, pinnable: bool = True) -> torch.Tensor:
    """``ids`` (checked or converted from the caller's ``given``), copied if they share memory
    with it: a caller may refill its buffer before the ids are used. The copy of pinned ids is
    pinned unless ``pinnable`` is False (ids no GPU reads: not asked, as ``is_pinned()`` of a
    CPU tensor may start a CUDA context).

    >>> buffer = torch.arange(3)
    >>> snapshot_of(buffer.view(-1), buffer) is not buffer, snapshot_of(buffer + 1, buffer).tolist()
    (True, [1, 2, 3])
    """
    if ids.device == given.device and (
        ids.untyped_storage().data_ptr() == given.untyped_storage().data_ptr()
    ):
        if pinnable and ids.is_pinned():  # a copy pinned too, or the copy to the GPU stops
            # being asynchronous
            return torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True).copy_(ids)
        return ids.clone()
    return ids
