"""What every stage of one ``analyze`` run shares: the run context and the per-stage timer."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiered_store.engram import EngramConfig, NgramHasher

from .options import TRACE_NAME, AnalyzeOptions

__all__ = ["STAGES", "RunContext", "StageTimes", "stage_timings"]

STAGES = ("read", "tokenise", "hash", "ngram_keys", "write_trace", "profile", "curves", "report")


class StageTimes:
    """Seconds spent per stage (thread-safe: each stage is timed where it runs)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time spent in the ``with`` block to ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to stage ``name``."""
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds


@dataclass
class RunContext:
    """What every stage of one run shares."""

    engram: EngramConfig
    hasher: NgramHasher
    tok_info: dict[str, Any]
    layouts: list[dict[str, Any]]
    options: AnalyzeOptions
    staging: Path
    times: StageTimes
    say: Callable[[str], None]

    @property
    def names(self) -> list[str]:
        """Table names, in layer order."""
        return [t["name"] for t in self.layouts]

    @property
    def rows(self) -> dict[str, int]:
        """Rows per table."""
        return {t["name"]: int(t["rows"]) for t in self.layouts}

    @property
    def trace(self) -> Path:
        """The main trace (in the staging folder)."""
        return self.staging / TRACE_NAME


def stage_timings(
    report: Mapping[str, Any],
    times: StageTimes,
    wall: float,
    cpu: float,
    options: AnalyzeOptions,
) -> dict[str, Any]:
    """End-to-end tokens/s and per-stage seconds (the report's ``timings``)."""
    tokens = int(report["corpus"]["tokens"]) + int((report.get("holdout") or {}).get("tokens", 0))
    stages = {k: round(v, 4) for k, v in times.seconds.items()}
    return {
        "tokens": tokens,
        "wall_seconds": round(wall, 4),
        "cpu_seconds": round(cpu, 4),  # every thread of the process
        "tokens_per_second": tokens / wall if wall > 0 else None,
        "threads": options.threads,
        "stages": stages,
        "stage_tokens_per_second": {k: tokens / v for k, v in stages.items() if v > 0},
        "note": "read and tokenise run in a background thread, overlapping hash, ngram_keys and "
        "write_trace; curves is the wall time of the per-table curve threads; report includes plots",
    }
