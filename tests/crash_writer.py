"""A writer process for the crash tests: writes, commits, and logs what it did outside the store.

Each step writes ``K`` rows (drawn from a generator seeded by the step) through a store with tiny
tiers (so writes also spill on eviction), commits the step, and appends to two fsynced logs kept
outside the store: ``intent.bin`` (the step's ids and rows, BEFORE the commit) and ``acked.bin``
(the step number, AFTER ``commit()`` returned). The checker rebuilds the expected table from these
logs alone and compares it row by row with what the reopened store holds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

K = 12  # rows written per step


def step_update(step: int, rows: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids and rows the writer writes at ``step``."""
    rng = np.random.default_rng(step)
    return rng.choice(rows, K, replace=False), rng.standard_normal((K, dim)).astype(np.float32)


def intent_dtype(dim: int) -> np.dtype:
    """One record of ``intent.bin``."""
    return np.dtype([("step", "<i8"), ("ids", "<i8", (K,)), ("rows", "<f4", (K, dim))])


def _append(path: Path, data: bytes) -> None:
    """Append and fsync (the record survives a kill once this returns)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def run_writer(
    config: dict, log_dir: str, steps: int, compact_every: int = 0, killed_at: int = 0
) -> None:
    """Resume from the store's last commit and run ``steps`` more steps (until killed); every
    ``compact_every`` steps, close the store, compact the table and reopen it. ``killed_at``: the
    step after whose commit the writer kills itself, before it logs the ack (0: never)."""
    import signal

    import torch

    from tiered_store import TieredStore
    from tiered_store.delta.compaction import compact_table

    torch.set_num_threads(1)
    logs = Path(log_dir)
    store = TieredStore.open(config)
    intent = logs / "intent.bin"  # a record torn by the last kill is dropped
    if intent.exists():
        size = intent_dtype(store.dim).itemsize
        os.truncate(intent, intent.stat().st_size // size * size)
    start = store.committed_step + 1
    for step in range(start, start + steps):
        ids, rows = step_update(step, store.rows, store.dim)
        record = np.zeros(1, dtype=intent_dtype(store.dim))
        record["step"], record["ids"], record["rows"] = step, ids, rows
        _append(intent, record.tobytes())
        store.write(torch.from_numpy(ids), torch.from_numpy(rows))
        store.lookup(torch.from_numpy(np.random.default_rng([step, 1]).integers(0, store.rows, 40)))
        store.commit(step)
        if step == killed_at:
            os.kill(os.getpid(), signal.SIGKILL)
        _append(logs / "acked.bin", np.int64(step).tobytes())
        if compact_every and step % compact_every == 0:
            store.close()
            compact_table(config["table"]["path"], progress=False)
            store = TieredStore.open(config)
    store.close()


def expected_table(base: np.ndarray, log_dir: str, upto: int) -> np.ndarray:
    """The table after every step up to ``upto``, from the intent log alone (the last intent
    record of each step: a resumed writer re-logs a step whose commit never happened)."""
    logs = Path(log_dir)
    table = base.copy()
    path = logs / "intent.bin"
    if not path.exists():
        return table
    records = np.fromfile(path, dtype=intent_dtype(base.shape[1]))
    latest = {int(s): k for k, s in enumerate(records["step"])}
    for step in range(1, upto + 1):
        rec = records[latest[step]]
        table[rec["ids"]] = rec["rows"]
    return table


def acked_steps(log_dir: str) -> np.ndarray:
    """Steps whose commit returned, in order."""
    path = Path(log_dir) / "acked.bin"
    return np.fromfile(path, dtype="<i8") if path.exists() else np.zeros(0, np.int64)
