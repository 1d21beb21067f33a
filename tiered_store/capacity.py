"""Capacity specs: a row count, a byte size like ``512MiB`` or a percentage like ``10%`` of the table."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

from .errors import ConfigError, shown

_BYTE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
# a number of at most 100 digits before and after the point (Fraction raised int()'s bare
# ValueError past 4,300)
_NUMBER = r"(\d{1,100}(?:\.\d{1,100})?)"
_BYTES_RE = re.compile(rf"^\s*{_NUMBER}\s*([KMGT]i?B|B)\s*$", re.IGNORECASE)
_PERCENT_RE = re.compile(rf"^\s*{_NUMBER}\s*%\s*$")
#: the most rows a capacity can name (a table's rows are int64 row ids)
MAX_ROWS = 2**63 - 1

CAPACITY_HELP = "a row count (int), a byte size like '512MiB' or '2GiB', or a percentage like '10%'"


def check_capacity_spec(spec: int | str) -> int | str:
    """Validate the syntax of a capacity spec without knowing the table; returns it unchanged."""
    if isinstance(spec, bool) or not isinstance(spec, int | str):
        raise ValueError(f"got {shown(spec)}; expected {CAPACITY_HELP}")
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"got {shown(spec)}; expected a non-negative row count")
        if spec > MAX_ROWS:  # written with its digits below, past 4,300 a bare ValueError
            raise ValueError(f"got {shown(spec)}; expected a row count of at most {MAX_ROWS:,}")
        return spec
    if not (_BYTES_RE.match(spec) or _PERCENT_RE.match(spec)):
        raise ValueError(f"got {shown(spec)}; expected {CAPACITY_HELP}")
    check_share(spec)
    return spec


def check_share(spec: int | str) -> None:
    """Refuse a percentage over 100, which no table can give (a ValueError saying so)."""
    m = _PERCENT_RE.match(spec) if isinstance(spec, str) else None
    if m and Fraction(m.group(1)) > 100:
        raise ValueError(f"{shown(spec)} is more than 100% of the table; expected 0%..100%")


def is_off(spec: int | str) -> bool:
    """Whether a capacity spec asks for no rows (``0``, ``'0%'``, ``'0MiB'``): the tier is off.

    >>> is_off(0), is_off("0.0%"), is_off("0GiB"), is_off("1%")
    (True, True, True, False)
    """
    if isinstance(spec, int):
        return spec == 0
    m = _PERCENT_RE.match(spec) or _BYTES_RE.match(spec)
    return m is not None and Fraction(m.group(1)) == 0


def parse_bytes(text: str) -> int:
    """``'512MiB'`` -> 536870912."""
    m = _BYTES_RE.match(text)
    if not m:
        raise ConfigError(
            f"byte size {shown(text)}: expected a number and a unit like '512MiB' or '2GB'"
        )
    size = Fraction(m.group(1)) * _BYTE_UNITS[m.group(2).upper()]  # exact: '4.35MB'
    if 0 < size < 1:  # would read as 0, which turns a tier off
        raise ConfigError(
            f"byte size {shown(text)}: less than one byte; expected at least 1 B, or 0"
        )
    return int(size)


def resolve_capacity(spec: int | str, *, table_rows: int, row_bytes: int, key: str) -> int:
    """Turn a capacity spec into a number of rows for a table; errors name ``key``."""
    try:
        check_capacity_spec(spec)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if isinstance(spec, int):
        rows = asked = spec
    elif m := _PERCENT_RE.match(spec):
        pct = asked = Fraction(m.group(1))  # exact, as written: 32.3% of 1,000 rows is 323
        rows = int(table_rows * pct / 100)
    else:
        try:
            asked = parse_bytes(spec)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        rows = asked // row_bytes
    if asked and not rows:  # a tier of 0 rows is off: only when asked for
        share = f"{100 / table_rows:.3g}% of {table_rows:,} rows" if table_rows else None
        raise ConfigError(
            f"{key}: {shown(spec)} is less than one row of this table "
            + (
                f"({row_bytes:,} bytes, {share}); expected at least one row, or 0 to turn the "
                "tier off"
                if share
                else "(the table has no rows); expected 0 to turn the tier off"
            )
        )
    if rows > table_rows:
        raise ConfigError(
            f"{key}: {shown(spec)} is {rows:,} rows, more than the table's {table_rows:,} rows; "
            f"expected at most {table_rows:,} rows ({table_rows * row_bytes:,} bytes or 100%)"
        )
    return rows


def parse_shares(text: str, *, key: str) -> list[float]:
    """Shares of a table's rows, comma-separated, as percentages or fractions; errors name ``key``.

    >>> parse_shares("5%,10%, 0.5%", key="--shares")
    [0.05, 0.1, 0.005]
    >>> parse_shares("0.05", key="--shares")
    [0.05]
    """
    parts = [t.strip() for t in text.split(",") if t.strip()]
    try:
        shares = [float(t.rstrip("%")) / (100 if t.endswith("%") else 1) for t in parts]
    except ValueError:
        shares = []
    if not shares or any(not 0 < s <= 1 for s in shares):
        raise ConfigError(
            f"{key} {shown(text)}: expected shares of the rows in (0, 1], e.g. 5%,10% or 0.05,0.1"
        )
    return shares


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def available_host_memory() -> int | None:
    """Bytes of RAM available now (``MemAvailable`` of /proc/meminfo), or None where it is not known."""
    try:
        meminfo = Path("/proc/meminfo").read_text().split("\n")
        return next(
            int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return None
