"""A fixed-bucket latency histogram: observing is one bisect and two integer adds."""

from __future__ import annotations

import bisect
import math
import threading

# Upper bounds in seconds (Prometheus-style, +Inf implied). The top ones cover the slowest HTTP
# requests: a request may wait server.request_timeout_s (30 s) for its body and as long again for
# a compute slot, so buckets go up to 60 s and only stuck requests land in +Inf (a longer
# request_timeout_s adds bounds above: ``buckets_covering``).
DEFAULT_BUCKETS = (
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


def buckets_covering(
    seconds: float, buckets: tuple[float, ...] = DEFAULT_BUCKETS
) -> tuple[float, ...]:
    """``buckets`` with bounds added above their top (it x 2, 5, 10, 20, 50, ...) until one is at
    least ``seconds``; ``buckets`` themselves when their top covers it. ValueError for NaN or
    a ``seconds`` only an infinite bound would cover (a second +Inf bucket).

    >>> buckets_covering(60.0)[-3:]
    (10.0, 30.0, 60.0)
    >>> buckets_covering(600.0)[-3:]
    (120.0, 300.0, 600.0)
    """
    refused = f"seconds: {seconds!r}; expected a number a finite bucket bound covers"
    if math.isnan(seconds):  # compares as covered by any bound
        raise ValueError(refused)
    top, extra, step = buckets[-1], [], 0
    while (extra[-1] if extra else top) < seconds:
        bound = top * (2, 5, 10)[step % 3] * 10 ** (step // 3)
        if not math.isfinite(bound):  # an infinite bound would be a second +Inf bucket
            raise ValueError(refused)
        extra.append(bound)
        step += 1
    return (*buckets, *extra)


class LatencyHistogram:
    """Counts of observations per bucket, plus their sum; read at scrape time."""

    def __init__(self, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        """Add one observation."""
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self.sum += seconds

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with (+inf, total).

        Reads one copy of the counts, so the buckets are consistent with each other."""
        counts = list(self.counts)
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
            running += n
            out.append((bound, running))
        return out
