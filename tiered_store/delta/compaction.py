"""Compaction: base + delta, streamed in row order, into the table's next version.

Under the table's writer lock (no commit can land meanwhile): the current version's rows are read
in chunks (page checksums verified), the delta's rows of each chunk (CRC-checked) replace them,
and ``create_table`` writes ``TABLE.gN.npy`` with its manifest (the table's checksum block size
kept) and page checksums (temporary names, fsync, rename; manifest last). Then the pointer
switches to generation N in one atomic rename: the delta is retired with its version (the new
version has none). A crash anywhere leaves the old version + its delta, or the new version, both
complete; the next compaction removes what the crashed one left (an unpublished version, hidden
temporaries). The new version's manifest records whose version it is (``table_versions``): a
``TABLE.gN.npy`` that does not say so, another table named so, is never removed or written over
(its generation is skipped). Stores that have the old version open keep reading it undisturbed;
``remove_unused_versions`` deletes it once none has.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..cli_args import command_help, given_path
from ..cold_table import ColdTable
from ..table_format import create_table
from ..table_sources import TABLE_DTYPES, SourceReader
from .row_delta import RowDelta, open_delta, refuse_staged
from .table_versions import (
    VERSION_OF,
    check_current_version,
    current_version,
    next_generation,
    publish_version,
    remove_abandoned_versions,
    remove_unused_versions,
    version_path,
    version_record,
    writer_lock,
)

__all__ = ["CompactionReport", "compact_table", "register"]


@dataclass
class CompactionReport:
    """What a compaction did."""

    table: str
    old_generation: int
    new_generation: int  # == old_generation when there was nothing to compact
    rows: int
    delta_rows: int
    seconds: float
    removed_generations: list[int]
    removed_leftovers: list[str]  # files an earlier compaction, killed part way, left

    def to_json(self) -> dict:
        """Plain dict for printing."""
        return asdict(self)


class _MergedRows(SourceReader):
    """Rows of a version with its delta applied, chunk by chunk, as ``create_table`` reads them."""

    def __init__(self, cold: ColdTable, delta: RowDelta | None, delta_ids: np.ndarray) -> None:
        self.cold, self.delta, self.delta_ids = cold, delta, delta_ids
        self.rows, self.dim = cold.rows, cold.dim
        self.dtype = "uint8" if cold.manifest.quantization else cold.manifest.dtype
        self.description = f"compaction of {cold.path.name} + {len(delta_ids):,} delta rows"
        self.quantization = cold.manifest.quantization

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` in the on-disk dtype: base, then the delta's versions."""
        rows = self.cold.read_rows(np.arange(start, stop, dtype=np.int64))
        lo, hi = np.searchsorted(self.delta_ids, [start, stop])
        if hi > lo:
            ids = self.delta_ids[lo:hi]
            _, delta_rows = self.delta.read(ids)
            rows[torch.from_numpy(ids - start)] = torch.from_numpy(delta_rows).view(rows.dtype)
        return rows.view(torch.uint8).numpy().view(TABLE_DTYPES[self.dtype][0])


def _committed_round(delta: RowDelta) -> dict[str, str]:
    """The metadata keeping ``delta``'s last committed round (none: the version's own stays)."""
    committed = delta.commit_rounds[1]
    return {} if committed is None else {"committed_round": committed}


def compact_table(table: str | Path, *, progress: bool = True) -> CompactionReport:
    """Write the table's next version (base + delta) and make it current; remove old versions
    no store has open.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> from tiered_store import TieredStore, create_table
    >>> path = os.path.join(tempfile.mkdtemp(), "t.npy")
    >>> _ = create_table(path, np.zeros((6, 2), np.float32), progress=False)
    >>> with TieredStore.open({"table": {"path": path}}) as store:
    ...     store.write([4], torch.ones(1, 2)); _ = store.commit()
    >>> report = compact_table(path, progress=False)
    >>> report.new_generation, report.delta_rows, report.removed_generations
    (1, 1, [0])
    >>> with TieredStore.open({"table": {"path": path}}) as store:
    ...     store.generation, store.committed_step, store.lookup([4, 5]).tolist()
    (1, 1, [[1.0, 1.0], [0.0, 0.0]])
    """
    start = time.perf_counter()
    check_current_version(table)  # no table: say so, before making its writer lock
    with writer_lock(table):
        leftovers = remove_abandoned_versions(table)  # before writing another copy of the table
        current, generation = current_version(table)
        with ColdTable(current) as cold:
            delta = open_delta(current, cold.row_bytes)
            try:
                if delta is not None:
                    refuse_staged(delta, f"compaction of {table}")
                delta_ids = delta.ids() if delta is not None else np.zeros(0, np.int64)
                if delta_ids.size == 0:
                    new_generation = generation
                else:
                    new_generation = next_generation(table, generation)
                    create_table(
                        version_path(table, new_generation),
                        _MergedRows(cold, delta, delta_ids),
                        block_bytes=cold.manifest.block_bytes,  # as its maker chose
                        progress=progress,
                        overwrite=True,  # a crashed compaction's complete but unpublished file
                        metadata={
                            **cold.manifest.metadata,
                            "committed_step": delta.step,
                            # the last sharded commit round: the other shards' open reads it
                            **_committed_round(delta),
                            # whose version it is, compacted from which: cleanups read it
                            VERSION_OF: version_record(table, new_generation, generation),
                        },
                        quantization=cold.manifest.quantization,
                    )
                    publish_version(table, new_generation)
            finally:
                if delta is not None:
                    delta.close()
        removed = remove_unused_versions(table, superseded=generation)
        return CompactionReport(
            str(table),
            generation,
            new_generation,
            cold.rows,
            int(delta_ids.size),
            time.perf_counter() - start,
            removed,
            leftovers,
        )


def register(sub) -> None:
    """Add ``tiered-store compact`` to the command line."""
    p = sub.add_parser(
        "compact",
        help=command_help("compact"),
        description="Stream the current version of TABLE and its delta in row order into "
        "TABLE.gN.npy (manifest and page checksums included), switch the table's version "
        "pointer to it atomically (stores opened afterwards read it; open ones finish on the "
        "old version), then remove old versions no store has open. First removes what a "
        "compaction killed part way left (an unpublished version, hidden .tmp files). Needs "
        "the table's writer lock: fails if a process is writing the table.",
    )
    p.add_argument("table", type=given_path, help="the table's .npy path (its first version)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_compact)


def _run_compact(args) -> int:
    """Run a compaction and print its report as JSON."""
    import json

    report = compact_table(args.table, progress=not args.quiet)
    print(json.dumps(report.to_json(), indent=1))
    return 0
