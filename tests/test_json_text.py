"""json_text and write_json (tiered_store/atomic_file.py): strict JSON from what reports hold."""

from __future__ import annotations

import json

import numpy as np

from tiered_store.atomic_file import json_text, write_json


def _strict(text: str) -> object:
    """Parse JSON refusing NaN and Infinity (what strict readers do)."""

    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_numpy_scalars_and_arrays_nan_among_them_are_written_as_json(tmp_path):
    """json_text (and write_json) raised "Object of type float32 is not JSON serializable" for a
    NumPy scalar or array, so a report holding one, or a NaN in one, could not be written."""
    doc = {
        "p50_ms": np.float32("nan"),
        "rates": np.array([[1.5, np.inf], [2.0, -np.inf]]),
        "rows": np.int64(3),
        "nested": [(np.float64("nan"), np.bool_(True))],
    }
    expected = {
        "p50_ms": None,
        "rates": [[1.5, None], [2.0, None]],
        "rows": 3,
        "nested": [[None, True]],
    }
    assert _strict(json_text(doc)) == expected
    assert _strict(write_json(tmp_path / "r.json", doc).read_text()) == expected


def test_numpy_dict_keys_are_written_as_json_keys():
    """A dict keyed by NumPy integers or bools (np.unique's values, counted) raised "keys must be
    str, int, float, bool or None, not numpy.int64" in json_text and write_json."""
    values, counts = np.unique(np.array([3, 3, 7]), return_counts=True)
    doc = {"counts": dict(zip(values, counts, strict=True)), "seen": {np.bool_(True): 1}}
    assert _strict(json_text(doc)) == {"counts": {"3": 2, "7": 1}, "seen": {"true": 1}}
