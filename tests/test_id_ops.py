"""The lookup path's per-batch id operations equal the torch ops they replace on the CPU."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiered_store import id_ops
from tiered_store.id_ops import array_for_torch, nonzero, unique_inverse_counts

IDS = st.lists(st.integers(0, 2**40), max_size=300) | st.lists(st.integers(0, 50), max_size=300)


def _check_unique(ids: torch.Tensor) -> None:
    """Both paths, numpy's (forced below its size threshold) and torch's, equal torch.unique."""
    with mock.patch.object(id_ops, "NUMPY_UNIQUE_MIN", 1):
        _check_same(ids)
    _check_same(ids)


def _check_same(ids: torch.Tensor) -> None:
    got = unique_inverse_counts(ids)
    want = torch.unique(ids, return_inverse=True, return_counts=True)
    for g, w, what in zip(got, want, ("unique", "inverse", "counts"), strict=True):
        assert g.dtype == w.dtype, what
        assert torch.equal(g, w), what


@settings(max_examples=200, deadline=None)
@given(IDS)
def test_unique_inverse_counts_equals_torch_unique(values):
    _check_unique(torch.tensor(values, dtype=torch.int64))


@pytest.mark.parametrize(
    "ids",
    [
        [2**62, 5, 2**62, 0],  # too large to pack with the position: the argsort path
        [-3, 7, -3, 2],  # negative
        [9],
        list(range(100_000, 0, -1)),
    ],
)
def test_unique_inverse_counts_edge_cases(ids):
    _check_unique(torch.tensor(ids, dtype=torch.int64))


def test_unique_inverse_counts_of_int32_ids():
    """Other integer types go to torch's unique (and keep their type)."""
    _check_unique(torch.tensor([2**30, 5, 2**30, 0] * 3000, dtype=torch.int32))


def test_unique_inverse_counts_of_a_batch():
    """A Zipf batch as the lookup path sees it (many repeats), and an empty one."""
    ids = np.random.default_rng(0).zipf(1.2, 40_000) % 1_000_000
    _check_unique(torch.from_numpy(ids.astype(np.int64)))
    _check_unique(torch.empty(0, dtype=torch.int64))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), max_size=200))
def test_nonzero_equals_torch_nonzero(flags):
    mask = torch.tensor(flags, dtype=torch.bool)
    assert torch.equal(nonzero(mask), torch.nonzero(mask).squeeze(1))


def test_array_for_torch_shares_a_strided_array_and_copies_only_what_torch_cannot_take():
    """A strided array (ids[:, ::2]) was copied though torch shares it: a strided int32 batch
    was copied twice on its way to the pipeline's int64 pinned copy. It is shared now; arrays
    torch cannot take (negative strides, strides not a multiple of the item, read-only) are
    copied, and torch takes each without a warning."""
    import warnings

    ids = np.arange(24, dtype=np.int32).reshape(4, 6)
    strided = ids[:, ::2]
    shared = array_for_torch(strided)
    assert np.shares_memory(shared, ids)
    assert torch.from_numpy(shared).tolist() == strided.tolist()
    read_only = np.arange(3)
    read_only.flags.writeable = False
    packed = np.zeros(4, dtype=[("a", "i1"), ("b", "i4")])["b"]
    for array in (ids[::-1], ids[:, ::-2], packed, read_only):
        copied = array_for_torch(array)
        assert not np.shares_memory(copied, array)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.from_numpy(copied).tolist() == array.tolist()
