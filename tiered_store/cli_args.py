"""argparse types shared by the command line and the bench scripts: bad values refused by name."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def at_least(minimum: int, what: str | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``; anything else is refused with the value,
    as ``expected WHAT, got 'TEXT'`` (``what``: by default ``an integer >= MINIMUM``).

    >>> parser = argparse.ArgumentParser(prog="bench")
    >>> _ = parser.add_argument("--rounds", type=at_least(1))
    >>> parser.parse_args(["--rounds", "3"]).rounds
    3
    >>> at_least(1)("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected an integer >= 1, got '0'
    >>> at_least(0, "0 (skip) or a positive number of rows")("1.5")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected 0 (skip) or a positive number of rows, got '1.5'
    """
    expected = f"an integer >= {minimum}" if what is None else what

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def fraction(what: str | None = None) -> Callable[[str], float]:
    """An argparse ``type``: a number F with 0 < F <= 1 (a share, a sampling rate); anything else,
    NaN included, is refused with the value, as ``expected WHAT, got 'TEXT'``.

    >>> fraction()("0.25")
    0.25
    >>> fraction()("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a number in (0, 1], got '0'
    >>> fraction("a share of the rows in (0, 1]")("nan")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a share of the rows in (0, 1], got 'nan'
    """
    expected = "a number in (0, 1]" if what is None else what

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0.0 < value <= 1.0:  # NaN too
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse
