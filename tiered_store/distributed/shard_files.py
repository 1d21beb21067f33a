"""Shard table files: one ordinary table (``.npy`` + manifest + page checksums) per rank.

``write_shards`` streams each rank's row range out of the whole table with ``create_table``
(atomic publish, block and page checksums), and records the shard map, the shard's rank, the
whole table's version and the run's id in each shard's manifest (``metadata["shard"]``), next to
the table's own metadata (the Engram layout). ``shard_join.join_shards`` does the reverse.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cold_table import ColdTable
from ..delta.row_delta import delta_path, open_delta, refuse_staged
from ..delta.table_versions import (
    VERSION_OF,
    has_history,
    present_version,
    release,
    remove_table_files,
    take_writer_lock,
)
from ..errors import ConfigError, TableFormatError, TierIOError
from ..process_locks import exclusive_run
from ..table_format import (
    TableManifest,
    create_table,
    read_manifest,
    refuse_existing,
    replace_table,
    table_paths,
)
from ..table_sources import TABLE_DTYPES, SourceReader
from .shard_map import ShardMap, ShardMode, plan_shards

__all__ = ["ShardInfo", "read_shard", "shard_path", "write_shards"]


def shard_path(
    table: str | os.PathLike[str], rank: int, ranks: int, template: str | None = None
) -> Path:
    """Where rank ``rank``'s shard of ``table`` lives: ``template`` (``{rank}``, ``{ranks}``)
    or, by default, ``NAME.shard-RANK-of-RANKS.npy`` next to the table.

    Examples
    --------
    >>> shard_path("/data/layer1.npy", 2, 4).name
    'layer1.shard-2-of-4.npy'
    >>> str(shard_path("/data/layer1.npy", 2, 4, "/nvme/s{rank}.npy"))
    '/nvme/s2.npy'
    """
    if template is not None:
        return Path(template.replace("{rank}", str(rank)).replace("{ranks}", str(ranks)))
    npy, _ = table_paths(table)
    return npy.with_name(f"{npy.stem}.shard-{rank}-of-{ranks}.npy")


@dataclass(frozen=True)
class ShardInfo:
    """What a shard's manifest says about it: its rank, the shard map, the manifest itself, the
    ``write_shards`` run that wrote it (None for a shard of a version before run ids)."""

    path: Path
    rank: int
    shard_map: ShardMap
    manifest: TableManifest
    run: str | None = None


def read_shard(path: str | os.PathLike[str]) -> ShardInfo:
    """Read a shard's manifest and its ``metadata["shard"]``; a plain table is an error."""
    manifest = read_manifest(path)
    doc = manifest.metadata.get("shard") if isinstance(manifest.metadata, dict) else None
    if not isinstance(doc, dict):
        raise TableFormatError(
            f"{path}: the manifest has no shard metadata; expected a shard made by "
            "`tiered-store shard TABLE --ranks N`"
        )
    shard_map = ShardMap.from_json(doc, str(path))
    rank = doc.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < shard_map.ranks:
        raise TableFormatError(
            f"{path}: metadata.shard.rank is {rank!r}; expected 0..{shard_map.ranks - 1}"
        )
    run = doc.get("run")
    if run is not None and not isinstance(run, str):
        raise TableFormatError(f"{path}: metadata.shard.run is {run!r}; expected a string")
    start, stop = shard_map.shard_range(rank)
    if manifest.rows != stop - start:
        raise TableFormatError(
            f"{path}: shard {rank} holds {manifest.rows:,} rows but its map gives it rows "
            f"[{start:,}, {stop:,}); expected {stop - start:,}"
        )
    return ShardInfo(Path(path), rank, shard_map, manifest, run)


def write_shards(
    table: str | os.PathLike[str],
    ranks: int,
    by: ShardMode = "heads",
    *,
    template: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> list[ShardInfo]:
    """Split ``table`` into ``ranks`` shard tables, one per rank, and return what was written.

    A compacted table is split in its current version; its rows are read through its page
    checksums, so a corrupt table is refused (``ChecksumError``), not given shards with fresh
    checksums. Refused before anything is written: a table with written rows not yet compacted
    (``tiered-store compact`` first), an existing shard file without ``overwrite``, a shard path
    that is the table itself. Every shard is written under a hidden name first and moved into
    place once all are: a failure midway removes them and leaves the old shards as they were.
    With ``overwrite``, an old shard's writes and compacted versions go with it (else they would
    be served over the new shard's rows).

    Examples
    --------
    >>> import tempfile, os
    >>> from tiered_store import create_table
    >>> d = tempfile.mkdtemp()
    >>> _ = create_table(os.path.join(d, "t.npy"), np.arange(40, dtype=np.float32).reshape(10, 4),
    ...                  progress=False)
    >>> [s.manifest.rows for s in write_shards(os.path.join(d, "t.npy"), 3, "rows", progress=False)]
    [3, 3, 4]
    >>> np.load(shard_path(os.path.join(d, "t.npy"), 1, 3))[0].tolist()
    [12.0, 13.0, 14.0, 15.0]
    """
    npy, _ = table_paths(table)
    # before a path per rank (--ranks 99999999999 made that many): at most one rank per row
    plan_shards(read_manifest(present_version(npy)[0]), ranks, by, str(npy))
    paths = shard_file_paths(npy, ranks, template)
    # one run at a time over these shard paths: another would remove this one's hidden shards
    lock = Path(f"{_target(paths[0])}.shard-run.lock")

    def busy(holder: str) -> TierIOError:
        """The refusal while ``holder`` holds the lock."""
        return TierIOError(
            errno.EBUSY,
            f"{paths[0]}: another shard run is writing these shards ({lock.name} is held by "
            f"{holder}); expected one run at a time",
        )

    with (  # no folder for the lock: create_table names it missing
        exclusive_run(lock, busy, remove=True) if lock.parent.is_dir() else contextlib.nullcontext()
    ):
        return _write_shards(npy, ranks, by, paths, progress, overwrite)


def _target(path: Path) -> Path:
    """The file a shard path names: a symlink's target, as ``create_table`` writes it."""
    return path.resolve() if path.is_symlink() else path


def _write_shards(
    npy: Path, ranks: int, by: ShardMode, paths: list[Path], progress: bool, overwrite: bool
) -> list[ShardInfo]:
    """``write_shards`` of ``npy`` to ``paths``, its run lock held."""
    current = present_version(npy)[0]
    with ColdTable(current) as cold:
        manifest = cold.manifest
        step = _refuse_uncompacted_rows(npy, current, manifest)
        shard_map = plan_shards(manifest, ranks, by, str(npy))
        for rank, path in enumerate(paths):
            # (a compacted table's own path has no file: its version, named by a pointer, has)
            if (path.exists() and path.samefile(current)) or path.resolve() == npy.resolve():
                raise TableFormatError(
                    f"rank {rank}'s shard {path} is the table itself; expected another path"
                )
            refuse_existing(path, table_paths(path)[1], overwrite)
        written: list[ShardInfo] = []
        for path in paths:  # what a run killed before its renames left (a whole hidden table)
            _remove_unrenamed(_target(path))
        # every new shard under a hidden name first: a failure midway leaves the old set whole
        finished: list[tuple[Path, Path]] = []
        replaced = 0
        run = uuid.uuid4().hex[:12]  # in every shard: a set of two runs' shards is found mixed
        try:
            for rank, path in enumerate(paths):
                start, stop = shard_map.shard_range(rank)
                metadata = {
                    **{k: v for k, v in manifest.metadata.items() if k != VERSION_OF},  # its own
                    **({"committed_step": step} if step else {}),  # a commit of no rows too
                    "shard": {**shard_map.to_json(), "rank": rank, "table": npy.name, "run": run},
                }
                target = _target(path)
                new = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.new.npy")
                finished.append((new, target))
                shard_manifest = create_table(
                    new,
                    ShardRows(cold, start, stop),
                    block_bytes=manifest.block_bytes,  # as the table's maker chose
                    quantization=manifest.quantization,
                    metadata=metadata,
                    progress=progress,
                )
                written.append(ShardInfo(path, rank, shard_map, shard_manifest, run))
            # every existing shard's writer lock, held across the renames: a shard a store writes
            # is refused before any rename, and no writer starts on one until all are renamed
            locks: list[int] = []
            try:
                for _, target in finished:
                    if target.exists() or has_history(target):  # a compacted one's file is gone
                        locks.append(take_writer_lock(target))  # one by one: each is let go
                for new, target in finished:
                    replace_table(new, target, overwrite, writer_locked=True)
                    replaced += 1
            finally:
                for fd in locks:
                    release(fd)
        except BaseException:
            for new, _ in finished[replaced:]:  # (one that failed left nothing: create_table's)
                remove_table_files(new)
            raise
    return written


def run_name(run: object) -> str:
    """A ``write_shards`` run as errors name it (None: one of a release before run ids)."""
    if run is None:
        return "a `tiered-store shard` run of a release before run ids"
    return f"`tiered-store shard` run {run}"


def mixed_runs(run: str | None, first_run: str | None, first: str | os.PathLike[str]) -> str:
    """What a shard written by ``run`` is, beside the shard ``first`` of ``first_run``."""
    return (
        f"was written by {run_name(run)}, but {first} by {run_name(first_run)}: a mixed "
        "set (as a `shard --overwrite` killed between its renames leaves: some shards new, the "
        "others old), not a torn commit; expected the shards of one run: run that `tiered-store "
        "shard --overwrite` again"
    )


def shard_file_paths(table: str | os.PathLike[str], ranks: int, template: str | None) -> list[Path]:
    """Every rank's shard ``.npy`` of ``table``; a template naming one file for two is refused."""
    paths = [table_paths(shard_path(table, r, ranks, template))[0] for r in range(ranks)]
    if len({p.resolve() for p in paths}) < len(paths):  # a template without {rank}
        raise ConfigError(
            f"shard paths: {template!r} names one file for several ranks; expected a path "
            "template containing {rank}"
        )
    return paths


def _remove_unrenamed(target: Path) -> None:
    """Remove the hidden new shards (and their temporaries) a run killed before its renames left
    beside ``target``."""
    if not target.parent.is_dir():  # create_table names the missing folder
        return
    pattern = re.compile(rf"\.{{1,2}}{re.escape(target.name)}\.[0-9a-f]{{12}}\.new\.npy.*")
    for path in target.parent.iterdir():
        if pattern.fullmatch(path.name):
            path.unlink(missing_ok=True)


def written_rows_and_step(current: Path, manifest: TableManifest) -> tuple[int, int]:
    """(the written rows the delta of the version ``current`` holds; its committed step, as a
    store opening it reports it: the delta's last commit, else the version's)."""
    delta = open_delta(current, manifest.row_bytes)
    if delta is None:
        return 0, int((manifest.metadata or {}).get("committed_step", 0))
    try:
        refuse_staged(delta, f"table version {current}")
        return int(delta.ids().size), delta.latest_step()
    finally:
        delta.close()


def _refuse_uncompacted_rows(table: Path, current: Path, manifest: TableManifest) -> int:
    """A table with committed writes in its delta: shards of its file alone would lose them.
    Returns the table's committed step (a delta's commit of no rows is later than its file's)."""
    rows, step = written_rows_and_step(current, manifest)
    if rows:
        raise TableFormatError(
            f"table {table} has {rows:,} written row(s) in its delta ({delta_path(current).name}) "
            f"that shards of its file would not hold; expected none: run `tiered-store compact "
            f"{table}` first"
        )
    return step


class ShardRows(SourceReader):
    """Rows ``[start, stop)`` of a table, read through its page checksums, for ``create_table``."""

    def __init__(self, cold: ColdTable, start: int, stop: int) -> None:
        self.cold, self.start = cold, start
        self.rows, self.dim = stop - start, cold.dim
        self.dtype = "uint8" if cold.manifest.quantization else cold.manifest.dtype
        self.description = f"rows [{start}, {stop}) of {cold.path.name}"
        self.quantization = cold.manifest.quantization

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the shard in the on-disk dtype."""
        ids = np.arange(self.start + start, self.start + stop, dtype=np.int64)
        rows = self.cold.read_rows(ids)
        return rows.view(torch.uint8).numpy().view(TABLE_DTYPES[self.dtype][0])
