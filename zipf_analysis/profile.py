"""Profiles as analysis: a trace's profile, and the Zipf fits of a profile.

The container (:class:`~tiered_store.profile.FrequencyProfile`) and the counter are file formats
the store reads, so they live in ``tiered_store.profile``; this module adds what analysis computes
from them.
"""

from __future__ import annotations

from typing import Any

from tiered_store.profile import FrequencyCounter, FrequencyProfile

from .zipf_fit import DEFAULT_MIN_COUNT, ZipfFit, fit_zipf

__all__ = ["profile_fits", "profile_summary", "profile_trace"]


def profile_fits(
    profile: FrequencyProfile, *, min_count: int = DEFAULT_MIN_COUNT, **ranks: int
) -> dict[str, ZipfFit]:
    """Zipf exponent of a profile, least squares and MLE, over the same rank range (see
    :func:`~zipf_analysis.zipf_fit.fit_zipf`; pass ``rank_min``/``rank_max`` to choose it)."""
    return fit_zipf(profile.counts, min_count=min_count, **ranks)


def profile_summary(profile: FrequencyProfile, *, fits: bool = True) -> dict[str, Any]:
    """:meth:`FrequencyProfile.summary` plus the Zipf fits under ``"zipf"`` (an ``"error"`` entry
    when the profile is too small to fit).

    Examples
    --------
    >>> import numpy as np
    >>> from tiered_store.profile import profile_ids
    >>> profile_summary(profile_ids(np.array([1, 1, 2]), rows=4), fits=False)["lookups"]
    3
    """
    out = profile.summary()
    if fits:
        try:
            out["zipf"] = {k: v.to_dict() for k, v in profile_fits(profile).items()}
        except ValueError as exc:
            out["zipf"] = {"error": str(exc)}
    return out


def profile_trace(
    reader: Any,
    table: str | int | None = None,
    *,
    rows: int | None = None,
    ngram_keys: int | None = None,
) -> FrequencyProfile:
    """Profile one table of a trace (or, with ``table=None``, every id in it as one stream).

    ``rows`` defaults to the table's ``"rows"`` in the trace header's layout. The profile's
    metadata records the trace path and the header's ``config`` and ``tokenizer``.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from tiered_store.trace import TraceWriter, TraceReader
    >>> path = os.path.join(tempfile.mkdtemp(), "t.trace")
    >>> with TraceWriter(path, {"tables": [{"name": "l2", "rows": 50}]}) as w:
    ...     w.write(np.array([4, 4, 8]), "l2")
    >>> profile_trace(TraceReader(path), "l2").summary()["top_shares"]["of_table"]["10%"]
    1.0
    """
    entry = reader.layout[reader.table_index(table)] if table is not None else {}
    if rows is None:
        rows = entry.get("rows")
    header = reader.header
    meta = {"trace": str(reader.path), "table": table}
    for key in ("config", "tokenizer"):
        if key in header:
            meta[key] = header[key]
    if "layer" in entry:  # the Engram layer whose rows these are (checked against a table's)
        meta["layer"] = entry["layer"]
    counter = FrequencyCounter(rows)
    for chunk in reader.ids(table):
        counter.update(chunk)
    label = "" if table is None else reader.tables[reader.table_index(table)]
    return counter.profile(name=label, ngram_keys=ngram_keys, metadata=meta)
