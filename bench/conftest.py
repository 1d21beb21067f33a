"""pytest-benchmark micro-benchmarks: sizes, shared tables, and each figure's ratio to its baseline.

Every benchmark group holds one baseline (``baseline=True``) and the project's code measured in
the same run; :class:`SpeedBook` turns the medians into rates (units per second) and puts the
ratio ours / baseline into the saved JSON (``extra_info``) and a table at the end of the run.

Environment:

- ``TIERED_STORE_BENCH_SIZE``: ``default`` (the figures the docs cite) or ``tiny`` (seconds; what
  ``tests/test_bench_suite.py`` runs).
- ``TIERED_STORE_BENCH_DIR``: where the temporary tables go (default: the system's temp folder;
  it must allow ``O_DIRECT``).
- ``TIERED_STORE_BENCH_TORCH_THREADS``: torch intra-op threads (default: torch's own choice). On a
  machine that other work keeps busy, 1 is steadier: torch's parallel ops wait for their slowest
  thread, which a busy machine deschedules (replay measured 5x slower with 2 threads than with 1
  on 2 loaded cores).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tiered_store.table_format import RandomSource, create_table

collect_ignore_glob = ["bench_*.py"]  # the end-to-end scripts: run as `python bench/bench_X.py`

SIZE_ENV = "TIERED_STORE_BENCH_SIZE"
DIR_ENV = "TIERED_STORE_BENCH_DIR"
THREADS_ENV = "TIERED_STORE_BENCH_TORCH_THREADS"


@dataclass(frozen=True)
class BenchSizes:
    """Problem sizes of one suite run (``TIERED_STORE_BENCH_SIZE``)."""

    name: str
    row_dim: int  # float32 values per row of the store tables (32: 128-byte rows)
    hit_rows: int  # rows of the all-hit table (all resident in the hot tier)
    hit_batch: int  # Zipf ids per all-hit lookup
    cold_table_bytes: int  # the cold-miss / cold-read table (1 GiB: more than a disk cache)
    cold_batch: int  # ids per cold lookup or read_rows call, and reads per disk-probe call
    replay_rows: int  # rows of the replayed synthetic Zipf table
    replay_tokens: int  # tokens of the replayed trace (16 lookups each)
    index_rows: int  # table rows of the row-index probe benchmark (its tier holds 1%)
    hasher_batch: int  # sequences per hashed batch
    hasher_seq: int  # tokens per hashed sequence
    rounds: int  # timed rounds per benchmark (the median is the figure)
    warmup_rounds: int


SIZES = {
    "default": BenchSizes(
        name="default",
        row_dim=32,
        hit_rows=1_000_000,
        hit_batch=1 << 20,
        cold_table_bytes=1 << 30,
        cold_batch=16384,
        replay_rows=4_000_000,
        replay_tokens=250_000,
        index_rows=384_006_168,  # DeepSeek-V4.1's rows per layer
        hasher_batch=16,
        hasher_seq=4096,
        rounds=5,
        warmup_rounds=1,
    ),
    "tiny": BenchSizes(
        name="tiny",
        row_dim=32,
        hit_rows=20_000,
        hit_batch=16384,
        cold_table_bytes=8 << 20,
        cold_batch=512,
        replay_rows=50_000,
        replay_tokens=16384,
        index_rows=1_000_000,
        hasher_batch=2,
        hasher_seq=256,
        rounds=1,
        warmup_rounds=0,
    ),
}


@dataclass
class SpeedEntry:
    """One benchmark's rate, and where its ratio to the group's baseline goes."""

    name: str
    unit: str
    per_second: float
    extra_info: dict[str, Any]  # the benchmark's own dict, saved with the JSON at session end


@dataclass
class SpeedGroup:
    """A group's baseline and the benchmarks measured against it."""

    baseline: SpeedEntry | None = None
    ours: list[SpeedEntry] = field(default_factory=list)

    def fill_ratios(self) -> None:
        """Write ours / baseline (rates from medians) into each of ours' ``extra_info``."""
        if self.baseline is None:
            return
        for entry in self.ours:
            entry.extra_info["baseline"] = self.baseline.name
            entry.extra_info["ratio_to_baseline"] = entry.per_second / self.baseline.per_second


class SpeedBook:
    """Runs benchmarks through ``benchmark.pedantic`` and keeps each group's rates and ratios."""

    def __init__(self, sizes: BenchSizes) -> None:
        self.sizes = sizes
        self.groups: dict[str, SpeedGroup] = {}

    def measure(
        self,
        benchmark: Any,
        target: Callable[..., Any],
        *,
        group: str,
        per_call: int,
        unit: str,
        baseline: bool = False,
        setup: Callable[[], tuple[tuple, dict]] | None = None,
        device: torch.device | None = None,
    ) -> float | None:
        """Time ``target`` (fresh arguments from ``setup`` each round); its rate in ``unit``/s.
        On a CUDA ``device`` each call waits for the device before the clock stops.

        Returns None when benchmarks are disabled (``--benchmark-disable``: one untimed call).
        """
        if device is not None and device.type == "cuda":
            target = _synchronized(target, device)
        benchmark.group = group
        benchmark.pedantic(
            target,
            setup=setup,
            rounds=self.sizes.rounds,
            warmup_rounds=self.sizes.warmup_rounds,
        )
        if benchmark.stats is None:
            return None
        rate = per_call / benchmark.stats["median"]
        benchmark.extra_info.update(
            {"role": "baseline" if baseline else "ours", "unit": unit, "per_call": per_call}
        )
        benchmark.extra_info[f"{unit}_per_second"] = rate
        entry = SpeedEntry(benchmark.name, unit, rate, benchmark.extra_info)
        speed_group = self.groups.setdefault(group, SpeedGroup())
        if baseline:
            speed_group.baseline = entry
        else:
            speed_group.ours.append(entry)
        speed_group.fill_ratios()
        return rate

    def summary_lines(self) -> list[str]:
        """The table printed at the end of the run: each benchmark's rate and ratio."""
        lines = [f"{'group':<24} {'benchmark':<46} {'rate':>18} {'ratio':>7}"]
        for name, group in self.groups.items():
            rows = ([group.baseline] if group.baseline else []) + group.ours
            for entry in rows:
                ratio = entry.extra_info.get("ratio_to_baseline")
                shown = (
                    "base" if entry is group.baseline else "-" if ratio is None else f"{ratio:.3g}x"
                )
                rate = f"{_si(entry.per_second)} {entry.unit}/s"
                lines.append(f"{name:<24} {entry.name:<46} {rate:>18} {shown:>7}")
        return lines


def _synchronized(target: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    """``target``, then a wait for ``device``'s queued work."""

    def call(*args: Any, **kwargs: Any) -> None:
        target(*args, **kwargs)
        torch.cuda.synchronize(device)

    return call


def _si(x: float) -> str:
    """1.93e7 -> '19.3M'."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.1f}{suffix}"
    return f"{x:.1f}"


def _strip_root(value: Any, root: str) -> Any:
    """``value`` with ``root`` (an absolute path) cut out of every string in it."""
    if isinstance(value, str):
        return value.replace(root + os.sep, "").replace(root, ".")
    if isinstance(value, dict):
        return {k: _strip_root(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_root(v, root) for v in value]
    return value


BOOK_KEY = pytest.StashKey[SpeedBook]()


def pytest_configure(config: pytest.Config) -> None:
    """One SpeedBook per run at the size ``TIERED_STORE_BENCH_SIZE`` names; torch's threads."""
    name = os.environ.get(SIZE_ENV, "default")
    if name not in SIZES:
        raise pytest.UsageError(f"{SIZE_ENV}={name!r}; expected one of {', '.join(SIZES)}")
    threads = os.environ.get(THREADS_ENV)
    if threads is not None:
        if not threads.isdigit() or int(threads) < 1:
            raise pytest.UsageError(f"{THREADS_ENV}={threads!r}; expected an integer >= 1")
        torch.set_num_threads(int(threads))
    config.stash[BOOK_KEY] = SpeedBook(SIZES[name])


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list, output_json: dict[str, Any]
) -> None:
    """Record the suite's sizes and torch threads; keep machine-specific absolute paths out."""
    output_json["tiered_store_bench"] = {
        "sizes": asdict(config.stash[BOOK_KEY].sizes),
        "torch_threads": torch.get_num_threads(),
    }
    for key in list(output_json):
        output_json[key] = _strip_root(output_json[key], str(config.rootpath))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Each benchmark's rate and its ratio to the same run's baseline."""
    book = config.stash.get(BOOK_KEY, None)
    if book is None or not book.groups:
        return
    terminalreporter.section(
        f"speed vs same-run baseline (sizes: {book.sizes.name}, "
        f"torch threads: {torch.get_num_threads()})"
    )
    for line in book.summary_lines():
        terminalreporter.write_line(line)


@pytest.fixture(
    scope="module",
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
            ],
        ),
    ],
)
def bench_device(request: pytest.FixtureRequest) -> torch.device:
    """The device a benchmark runs on: the CPU, and CUDA where there is one (marker ``gpu``)."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def speed(pytestconfig: pytest.Config) -> SpeedBook:
    """The run's SpeedBook: ``speed.measure(benchmark, fn, group=..., per_call=..., unit=...)``."""
    return pytestconfig.stash[BOOK_KEY]


@pytest.fixture(scope="session")
def sizes(speed: SpeedBook) -> BenchSizes:
    """This run's problem sizes."""
    return speed.sizes


@pytest.fixture(scope="session")
def bench_dir() -> Iterator[Path]:
    """A temporary folder for tables and traces, removed at the end of the run."""
    with tempfile.TemporaryDirectory(
        prefix="tiered-store-bench-", dir=os.environ.get(DIR_ENV)
    ) as tmp:
        yield Path(tmp)


@pytest.fixture(scope="session")
def hit_table(sizes: BenchSizes, bench_dir: Path) -> Path:
    """The table lookups that hit a cache tier read: ``hit_rows`` random 128-byte rows."""
    path = bench_dir / "hit.npy"
    create_table(path, RandomSource(sizes.hit_rows, sizes.row_dim, seed=1), progress=False)
    return path


@pytest.fixture(scope="session")
def cold_table(sizes: BenchSizes, bench_dir: Path) -> Path:
    """The cold-read table: ``cold_table_bytes`` of random 128-byte rows (1 GiB by default)."""
    path = bench_dir / "cold.npy"
    rows = sizes.cold_table_bytes // (sizes.row_dim * 4)
    create_table(path, RandomSource(rows, sizes.row_dim, seed=3), progress=False)
    return path
