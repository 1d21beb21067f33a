"""Capacity specs and tier shares: parsed as written (sub-percent too), bad ones refused by name."""

from __future__ import annotations

import pytest

from tiered_store.capacity import parse_shares, resolve_capacity
from tiered_store.errors import ConfigError


def test_a_sub_percent_share_is_its_rows_not_zero():
    assert parse_shares("0.1%,0.5%", key="--shares") == [0.001, 0.005]
    rows = resolve_capacity("0.1%", table_rows=10_344_164, row_bytes=128, key="tiers.warm")
    assert rows == 10_344


@pytest.mark.parametrize("spec", ["32B", "0.06KB", "0.05%"])
def test_a_capacity_under_one_row_is_refused_not_a_tier_turned_off(spec):
    with pytest.raises(ConfigError, match=rf"tiers.warm.capacity: '{spec}' is less than one row"):
        resolve_capacity(spec, table_rows=1000, row_bytes=64, key="tiers.warm.capacity")
    for off in (0, "0%", "0B"):  # asked for: off
        assert resolve_capacity(off, table_rows=1000, row_bytes=64, key="k") == 0


@pytest.mark.parametrize("spec", ["0.5B", "0.0001KiB"])
def test_a_byte_size_under_one_byte_is_refused_not_a_tier_turned_off(spec):
    """It read as 0 bytes, which is 0 rows asked for: the tier was off, with no error."""
    with pytest.raises(
        ConfigError, match=rf"tiers.hot.capacity: byte size '{spec}': less than one"
    ):
        resolve_capacity(spec, table_rows=1000, row_bytes=64, key="tiers.hot.capacity")


@pytest.mark.parametrize(
    ("spec", "table_rows", "rows"),
    [
        ("32.3%", 1000, 323),
        ("57.7%", 1000, 577),
        ("4.35MB", 10**7, 4_350_000),
        ("0.3KB", 10**7, 300),
    ],
)
def test_decimal_specs_are_exact_not_a_row_short_to_float_rounding(spec, table_rows, rows):
    assert resolve_capacity(spec, table_rows=table_rows, row_bytes=1, key="k") == rows


@pytest.mark.parametrize("text", ["", ",", "0", "150%", "1.5", "-5%", "five", "5%,x"])
def test_bad_shares_are_refused_naming_the_option_and_the_value(text):
    with pytest.raises(ConfigError) as err:
        parse_shares(text, key="--shares")
    assert f"--shares {text!r}: expected shares of the rows in (0, 1]" in str(err.value)


@pytest.mark.parametrize(
    "spec",
    [
        10**5000,
        -(10**5000),
        2**63,
        "1" + "0" * 5000 + "B",
        "1" + "0" * 5000 + "%",
        "0." + "5" * 5000 + "%",
    ],
    ids=["int", "negative", "int64", "bytes", "percent", "decimals"],
)
def test_a_capacity_of_thousands_of_digits_is_refused_by_name(spec):
    """A capacity of more than 4,300 digits (an int from a dict, or the digits of '...B' or
    '...%') raised int()'s bare ValueError (or gave its text as the message): it is refused
    naming the key, shown cut short, with what was expected."""
    from tiered_store import StoreConfig

    with pytest.raises(ConfigError, match=r"tiers.hot.capacity: got .*; expected a") as caught:
        StoreConfig.from_dict({"table": {"path": "t.npy"}, "tiers": {"hot": {"capacity": spec}}})
    assert len(str(caught.value)) < 600 and "Exceeds the limit" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"^k: got .*; expected a"):
        resolve_capacity(spec, table_rows=100, row_bytes=8, key="k")


def test_a_share_of_a_table_of_no_rows_is_refused_by_name_not_divided_by_zero():
    """resolve_capacity of '5%' with table_rows=0 (a rank's empty shard) raised a bare
    ZeroDivisionError writing what one row is as a share of the table; it names the key, the
    value and what is expected. 0 (off) is still taken."""
    with pytest.raises(ConfigError) as err:
        resolve_capacity("5%", table_rows=0, row_bytes=16, key="tiers.hot.capacity")
    assert str(err.value).startswith("tiers.hot.capacity: '5%' is less than one row"), err.value
    assert "the table has no rows" in str(err.value) and "expected 0" in str(err.value)
    assert resolve_capacity("0%", table_rows=0, row_bytes=16, key="k") == 0
