"""integers: bool_among finds a bool among nested ids by value, at any depth, in any container."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiered_store.integers import as_integer, bool_among


@pytest.mark.parametrize(
    ("values", "found"),
    [
        ([7, 8, 9], None),
        ([[7, 8], (9, 10)], None),
        ([[[1, 2]], [[3, np.int64(4)]]], None),
        ([], None),
        ([[], []], None),
        (5, None),
        ([np.uint64(7), np.int32(2)], None),
        ([np.array([1, 2]), [3, 4]], None),
        (True, ((), True)),
        ([7, True], ((1,), True)),
        ([[7, 8], (9, False)], ((1, 1), False)),
        ([[[1, 2]], [[np.True_, 4]]], ((1, 0, 0), np.True_)),
        ([np.array([1, 2]), [3, True]], ((1, 1), True)),
        ([np.array([True, False]), [3, 4]], ((0, 0), np.True_)),
        ([torch.tensor(1), 2], None),
        ([np.arange(3), np.arange(3, dtype=np.uint8)], None),
        ([torch.arange(3), torch.arange(3, dtype=torch.int32)], None),
        ([np.arange(3), np.array([True, False, True])], ((1, 0), np.True_)),
        ([np.arange(2), np.array([1.0, 2.0])], None),
    ],
)
def test_bool_among_names_the_first_bool_by_index_or_none(values, found):
    """A fast look at the leaves' types passes nested lists of plain integers; anything else
    (arrays or tensors among the lists) takes NumPy's object reading: both give the same."""
    assert bool_among(values) == found


def test_bool_among_rows_of_ids_as_arrays_or_tensors():
    """A list of id arrays (tokenizer.encode's rows) or tensors: a bool-typed row is found as
    NumPy reads it (1 or 0), an integer row has none; the rows are looked at, not every id."""
    rows = [np.arange(4096) for _ in range(64)]
    assert bool_among(rows) is None and bool_among([torch.from_numpy(r) for r in rows]) is None
    rows[5] = np.zeros(4096, dtype=bool)
    assert bool_among(rows) == ((5, 0), np.False_)
    rows[5] = torch.zeros(4096, dtype=torch.bool)
    assert bool_among(rows) == ((5, 0), False)


def test_bool_among_finds_a_bool_array_or_tensor_kept_whole():
    """NumPy keeps a 0-d array or tensor whole in an object array: a 0-d bool one was not seen,
    so [torch.tensor(True), 2] passed as ids [1, 2]."""
    true, false = torch.tensor(True), np.array(False)
    for values, index, value in (
        ([true, 2], (0,), true),
        ([3, false], (1,), false),
        ([[4, 5], [true, 6]], (1, 0), true),
    ):
        found = bool_among(values)
        assert found is not None and found[0] == index and found[1] is value, values
    assert bool_among([torch.tensor(1), np.array(2), 3]) is None


def test_bool_among_a_million_ids_finds_the_last_one():
    ids = [[1] * 1000 for _ in range(1000)]
    assert bool_among(ids) is None
    ids[-1][-1] = False
    assert bool_among(ids) == ((999, 999), False)


@pytest.mark.parametrize("flag", [True, np.True_, np.array(True), torch.tensor(True)])
def test_as_integer_takes_no_bool_not_even_a_torch_one(flag):
    """A torch bool tensor passed for a count or a step (``torch.tensor(True)``) was read as 1,
    where a Python or NumPy bool is None, as bool_among finds it."""
    assert as_integer(flag) is None
    assert as_integer(torch.tensor(3)) == 3 and as_integer(np.int8(-2)) == -2
