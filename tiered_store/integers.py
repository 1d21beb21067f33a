"""Integers as callers pass them: Python, NumPy or torch, never a bool. torch is not imported
here (a tensor exists only once it is): the analysis commands that check counts load without
it."""

from __future__ import annotations

import operator
import sys
from itertools import chain

import numpy as np


def as_integer(value: object) -> int | None:
    """``value`` as an int (a Python, NumPy or torch integer); None for a bool, a bool array or
    tensor included (``True`` is not 1 here: a flag passed for a count or a step) or anything
    that is not an integer.

    >>> as_integer(np.int64(3)), as_integer(True), as_integer(2.0)
    (3, None, None)
    >>> import torch
    >>> as_integer(torch.tensor(2**63, dtype=torch.uint64))  # exactly, past int64
    9223372036854775808
    """
    if _is_bool(value):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
    except RuntimeError:  # torch's for a one-value uint64 tensor past int64: item() is exact
        torch = sys.modules.get("torch")
        if (
            torch is not None
            and isinstance(value, torch.Tensor)
            and value.numel() == 1
            and value.dtype == torch.uint64
        ):
            return int(value.item())
        raise


def bool_among(values: object) -> tuple[tuple[int, ...], object] | None:
    """Index and value of the first bool (Python or NumPy, or a bool array or tensor kept whole,
    e.g. ``torch.tensor(True)``) among the leaves of ``values`` (nested lists, as given: NumPy
    reads ``True`` beside an integer as 1), or None if there is none.

    >>> bool_among([[7, 8], [True, 9]]), bool_among([7, 8])
    (((1, 0), True), None)
    """
    if _plain_integers(values):
        return None
    given = np.asarray(values, dtype=object)
    leaves = given.ravel().tolist()
    kinds = set(map(type, leaves))
    if kinds.isdisjoint((bool, np.bool_)) and not any(
        issubclass(kind, _arrays()) for kind in kinds
    ):
        return None
    flat = next((i for i, value in enumerate(leaves) if _is_bool(value)), None)
    if flat is None:
        return None
    return tuple(int(i) for i in np.unravel_index(flat, given.shape)), leaves[flat]


def _is_bool(value: object) -> bool:
    """Whether ``value`` is a bool, or an array or tensor of bools (NumPy keeps 0-d ones whole)."""
    if isinstance(value, np.ndarray):
        return value.dtype == np.bool_
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    return isinstance(value, bool | np.bool_)


def _arrays() -> tuple[type, ...]:
    """The array types: NumPy's, and torch's once it is imported."""
    torch = sys.modules.get("torch")
    return (np.ndarray,) if torch is None else (np.ndarray, torch.Tensor)


_NESTED = frozenset((list, tuple))
_PYTHON_INT = frozenset((int,))


def _plain_integers(values: object) -> bool:
    """Whether ``values`` are nested lists or tuples of Python or NumPy integers, or of integer
    arrays or tensors (rows of ids), with no bool: by the types alone, never one object per id."""
    level = values if isinstance(values, list | tuple) else [values]
    types = set(map(type, level))
    while types and types <= _NESTED:
        level = list(chain.from_iterable(level))
        types = set(map(type, level))
    if types <= _PYTHON_INT:  # most lists of ids: what follows cost a 16-id lookup 5-10%
        return True
    if any(issubclass(kind, _arrays()) for kind in types):  # one look a row
        return all(_integer_block(value) for value in level)
    return all(issubclass(kind, int | np.integer) and kind is not bool for kind in types)


def _integer_block(value: object) -> bool:
    """Whether ``value`` is an integer (not bool) array or tensor, or a plain integer."""
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "iu"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return not (value.dtype.is_floating_point or value.dtype.is_complex) and (
            value.dtype != torch.bool
        )
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
