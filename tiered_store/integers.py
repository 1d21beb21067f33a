"""Integers as callers pass them: Python, NumPy or torch, never a bool."""

from __future__ import annotations

import operator

import numpy as np


def as_integer(value: object) -> int | None:
    """``value`` as an int (a Python, NumPy or torch integer); None for a bool (``True`` is not 1
    here: a flag passed for a count or a step) or anything that is not an integer.

    >>> as_integer(np.int64(3)), as_integer(True), as_integer(2.0)
    (3, None, None)
    """
    if isinstance(value, bool | np.bool_):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
