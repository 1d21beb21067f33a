"""argparse types shared by the command line and the bench scripts: bad values refused by name."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``; anything else is refused with the value.

    >>> parser = argparse.ArgumentParser(prog="bench")
    >>> _ = parser.add_argument("--rounds", type=at_least(1))
    >>> parser.parse_args(["--rounds", "3"]).rounds
    3
    >>> at_least(1)("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected an integer >= 1, got '0'
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse
