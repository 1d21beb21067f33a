"""Shard table files: one ordinary table (``.npy`` + manifest + page checksums) per rank.

``write_shards`` streams each rank's row range out of the whole table with ``create_table``
(atomic publish, block and page checksums), and records the shard map, the shard's rank and the
whole table's version in each shard's manifest (``metadata["shard"]``), next to the table's own
metadata (the Engram layout). ``join_shards`` does the reverse: it streams every shard's current
rows, in global row order, into one whole table (to serve unsharded, or to cut again for another
number of ranks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cold_table import ColdTable
from ..delta.row_delta import delta_path, open_delta
from ..delta.table_versions import (
    current_version,
    has_history,
    release,
    remove_table_files,
    take_writer_lock,
)
from ..errors import ConfigError, ShardMismatchError, TableFormatError
from ..table_format import (
    TableManifest,
    create_table,
    read_manifest,
    refuse_existing,
    replace_table,
    table_paths,
)
from ..table_sources import TABLE_DTYPES, SourceReader, TableNotFoundError
from .shard_map import ShardMap, ShardMode, plan_shards

__all__ = ["ShardInfo", "join_shards", "read_shard", "shard_path", "write_shards"]


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
    """What a shard's manifest says about it: its rank, the shard map, the manifest itself."""

    path: Path
    rank: int
    shard_map: ShardMap
    manifest: TableManifest


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
    start, stop = shard_map.shard_range(rank)
    if manifest.rows != stop - start:
        raise TableFormatError(
            f"{path}: shard {rank} holds {manifest.rows:,} rows but its map gives it rows "
            f"[{start:,}, {stop:,}); expected {stop - start:,}"
        )
    return ShardInfo(Path(path), rank, shard_map, manifest)


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
    current = current_version(npy)[0]
    with ColdTable(current) as cold:
        manifest = cold.manifest
        step = _refuse_uncompacted_rows(npy, current, manifest)
        shard_map = plan_shards(manifest, ranks, by, str(npy))
        paths = _shard_files(npy, ranks, template)
        for rank, path in enumerate(paths):
            # (a compacted table's own path has no file: its version, named by a pointer, has)
            if (path.exists() and path.samefile(current)) or path.resolve() == npy.resolve():
                raise TableFormatError(
                    f"rank {rank}'s shard {path} is the table itself; expected another path"
                )
            refuse_existing(path, table_paths(path)[1], overwrite)
        written: list[ShardInfo] = []
        for path in paths:  # what a run killed before its renames left (a whole hidden table)
            _remove_unrenamed(path.resolve() if path.is_symlink() else path)
        # every new shard under a hidden name first: a failure midway leaves the old set whole
        finished: list[tuple[Path, Path]] = []
        replaced = 0
        try:
            for rank, path in enumerate(paths):
                start, stop = shard_map.shard_range(rank)
                metadata = {
                    **manifest.metadata,
                    **({"committed_step": step} if step else {}),  # a commit of no rows too
                    "shard": {**shard_map.to_json(), "rank": rank, "table": npy.name},
                }
                target = path.resolve() if path.is_symlink() else path  # as create_table writes
                new = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.new.npy")
                finished.append((new, target))
                shard_manifest = create_table(
                    new,
                    _ShardRows(cold, start, stop),
                    quantization=manifest.quantization,
                    metadata=metadata,
                    progress=progress,
                )
                written.append(ShardInfo(path, rank, shard_map, shard_manifest))
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


def _shard_files(table: str | os.PathLike[str], ranks: int, template: str | None) -> list[Path]:
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


def _written(current: Path, manifest: TableManifest) -> tuple[int, int]:
    """(the written rows the delta of the version ``current`` holds; its committed step, as a
    store opening it reports it: the delta's last commit, else the version's)."""
    delta = open_delta(current, manifest.row_bytes)
    if delta is None:
        return 0, int((manifest.metadata or {}).get("committed_step", 0))
    try:
        return int(delta.ids().size), delta.latest_step()
    finally:
        delta.close()


def _refuse_uncompacted_rows(table: Path, current: Path, manifest: TableManifest) -> int:
    """A table with committed writes in its delta: shards of its file alone would lose them.
    Returns the table's committed step (a delta's commit of no rows is later than its file's)."""
    rows, step = _written(current, manifest)
    if rows:
        raise TableFormatError(
            f"table {table} has {rows:,} written row(s) in its delta ({delta_path(current).name}) "
            f"that shards of its file would not hold; expected none: run `tiered-store compact "
            f"{table}` first"
        )
    return step


def join_shards(
    shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    *,
    ranks: int | None = None,
    template: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> TableManifest:
    """Fold a table's shards back into one whole table at ``out`` and return its manifest.

    ``shards`` is the list of shard files (one per rank, in any order), or the table they were
    cut from with ``ranks`` (and ``template``, as given to ``write_shards``): its shards are then
    ``shard_path(table, r, ranks, template)`` and ``out`` defaults to the table itself (which
    exists, so ``overwrite`` is needed). The table holds every shard's current version (a
    compacted shard's ``.gN.npy``) in global row order, read through the shards' page checksums
    (a corrupt shard raises ``ChecksumError``, it is never given fresh checksums), with the
    table's metadata (the Engram layout; a trainable table's optimizer and run id) and the
    shards' common committed step; the shard metadata is dropped. Refused before anything is
    written: a missing shard, shards of different shard maps or table versions, two shards of one
    rank, a shard with written rows not yet compacted (``tiered-store compact`` it), shards at
    different committed steps (a torn commit), a shard being written, ``out`` naming a shard, and
    an existing table at ``out`` without ``overwrite``. The shards' writer locks are held until
    the table is published (``create_table``: a failure or kill midway leaves no table at ``out``,
    and an old one there as it was). Cutting the table again (``write_shards``) re-shards it for
    another number of ranks.

    Examples
    --------
    >>> import tempfile, os
    >>> from tiered_store import create_table
    >>> d = tempfile.mkdtemp()
    >>> t, whole = os.path.join(d, "t.npy"), os.path.join(d, "whole.npy")
    >>> _ = create_table(t, np.arange(40, dtype=np.float32).reshape(10, 4), progress=False)
    >>> shards = write_shards(t, 3, "rows", progress=False)
    >>> join_shards([s.path for s in shards[::-1]], whole, progress=False).shape
    (10, 4)
    >>> bool((np.load(whole) == np.load(t)).all())
    True
    """
    paths, expected = _shard_paths(shards, ranks, template)
    if out is None and expected is None:
        raise ConfigError(
            "out: None with a list of shard files; expected the whole table's path (it "
            "defaults to the table only when the table and ranks name the shards)"
        )
    out_npy = table_paths(shards if out is None else out)[0]  # type: ignore[arg-type]
    for rank, path in enumerate(paths):  # before the writer locks, which make a file beside it
        _refuse_missing(path, rank if expected is not None else None, expected)
    with contextlib.ExitStack() as stack:
        for path in paths:  # held until the table is published: no writer, no compaction meanwhile
            stack.callback(release, take_writer_lock(path))
        found = [_current_shard(path) for path in paths]
        _refuse_a_shard_left_out_as_out(out_npy, [f[0] for f in found])
        shard_map = _check_shard_set([f[0] for f in found], expected)
        found.sort(key=lambda f: f[0].rank)
        _refuse_out(out_npy, found)
        _refuse_uncompacted_shards(found)
        step = _common_step(found)
        colds = [stack.enter_context(ColdTable(current)) for _, current, _, _ in found]
        first = found[0][0].manifest
        metadata = {k: v for k, v in first.metadata.items() if k not in _PER_SHARD_KEYS}
        if step or "committed_step" in first.metadata:  # stores and training resume from it
            metadata["committed_step"] = step
        return create_table(
            out_npy,
            _JoinedRows(colds, shard_map, found[0][0].path),
            quantization=first.quantization,
            metadata=metadata,
            progress=progress,
            overwrite=overwrite,
        )


# metadata a shard holds for itself (its map and rank) or that the joined table sets anew
_PER_SHARD_KEYS = ("shard", "committed_step")


def _shard_paths(
    shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    ranks: int | None,
    template: str | None,
) -> tuple[list[Path], int | None]:
    """The shard files ``join_shards`` reads, and the rank count the table's form names (None for
    a list of files, which the shard maps number)."""
    if isinstance(shards, str | os.PathLike):
        if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
            raise ConfigError(
                f"ranks: got {ranks!r} with the table {os.fspath(shards)}; expected the number of "
                "shards it was cut into, an integer >= 1 (or a list of the shard files)"
            )
        return _shard_files(shards, ranks, template), ranks
    if ranks is not None or template is not None:
        raise ConfigError(
            f"ranks: got {ranks!r} and template {template!r} with a list of shard files; expected "
            "them only with the table's path (the shard files' manifests give their ranks)"
        )
    paths = [table_paths(p)[0] for p in shards]
    if not paths:
        raise ConfigError("shards: an empty list; expected the shard files, one per rank")
    seen: dict[Path, Path] = {}
    for path in paths:
        if path.resolve() in seen:
            raise ConfigError(
                f"shards: {path} is given twice (as {seen[path.resolve()]}); expected each "
                "shard file once"
            )
        seen[path.resolve()] = path
    return paths, None


def _refuse_missing(path: Path, rank: int | None, ranks: int | None) -> None:
    """A shard file that is not there (neither its first file nor a compacted version)."""
    if current_version(path)[0].exists():
        return
    which = f"shard {path}" if rank is None else f"rank {rank}'s shard {path} (of {ranks})"
    raise TableNotFoundError(
        errno.ENOENT,
        f"{which} does not exist; expected every rank's shard, as `tiered-store shard` wrote them",
        str(path),
    )


def _current_shard(path: Path) -> tuple[ShardInfo, Path, int, int]:
    """(the shard's info, named by ``path``; its current version's file; the written rows its
    delta holds; its committed step, as a store opening it reports it)."""
    current = current_version(path)[0]
    info = dataclasses.replace(read_shard(current), path=path)
    return info, current, *_written(current, info.manifest)


def _describe(shard_map: ShardMap) -> str:
    """A shard map in a few words, for errors."""
    bounds = list(shard_map.bounds)
    shown = bounds if len(bounds) <= 6 else [*bounds[:5], "...", bounds[-1]]
    return f"by {shard_map.by} over {shard_map.ranks} ranks, bounds {shown}"


def _check_shard_set(infos: list[ShardInfo], ranks: int | None) -> ShardMap:
    """The one shard map of ``infos``: one table version, one map, every rank's shard once (in
    rank order when ``ranks`` is given), one layout; else ``ShardMismatchError`` naming them."""
    ref = infos[0]
    for info in infos[1:]:
        if info.shard_map.table_version != ref.shard_map.table_version:
            raise ShardMismatchError(
                f"{info.path} is a shard of table version {info.shard_map.table_version} and "
                f"{ref.path} of version {ref.shard_map.table_version}; expected shards cut from "
                "one table by one `tiered-store shard` run"
            )
        if info.shard_map != ref.shard_map:
            raise ShardMismatchError(
                f"{info.path}'s shard map ({_describe(info.shard_map)}) differs from {ref.path}'s "
                f"({_describe(ref.shard_map)}); expected the shards of one shard map"
            )
    if ranks is not None:
        for rank, info in enumerate(infos):
            if (info.rank, info.shard_map.ranks) != (rank, ranks):
                raise ShardMismatchError(
                    f"rank {rank}'s shard {info.path} is rank {info.rank}'s shard of "
                    f"{info.shard_map.ranks}; expected rank {rank}'s of {ranks}"
                )
    owners: dict[int, Path] = {}
    for info in infos:
        if info.rank in owners:
            raise ShardMismatchError(
                f"{owners[info.rank]} and {info.path} are both rank {info.rank}'s shard; expected "
                "one shard per rank"
            )
        owners[info.rank] = info.path
    missing = sorted(set(range(ref.shard_map.ranks)) - set(owners))
    if missing:
        raise ShardMismatchError(
            f"no shard of rank(s) {', '.join(map(str, missing))} among {len(infos)} shard(s) "
            f"({', '.join(str(i.path) for i in infos)}) of a map over {ref.shard_map.ranks} "
            "ranks; expected every rank's shard"
        )
    facts = _layout(ref.manifest)
    for info in infos[1:]:
        other = _layout(info.manifest)
        differ = sorted(k for k in facts.keys() | other.keys() if facts.get(k) != other.get(k))
        if differ:
            raise ShardMismatchError(
                f"{info.path} differs from {ref.path} in {', '.join(differ)}; expected shards of "
                "one table (the same layout and metadata)"
            )
    return ref.shard_map


def _layout(manifest: TableManifest) -> dict[str, object]:
    """What every shard of one table shares: row width, dtype, quantisation, table metadata."""
    meta = {k: v for k, v in manifest.metadata.items() if k not in _PER_SHARD_KEYS}
    quantization = manifest.quantization.to_json() if manifest.quantization else None
    return {"dim": manifest.dim, "dtype": manifest.dtype, "quantization": quantization, **meta}


def _refuse_out(out: Path, found: list[tuple[ShardInfo, Path, int, int]]) -> None:
    """``out`` naming a shard (its first file or its current version): it is read meanwhile."""
    target = out.resolve()
    for info, current, _, _ in found:
        if target in (info.path.resolve(), current.resolve()):
            raise TableFormatError(
                f"out {out} is rank {info.rank}'s shard {info.path}; expected another path (the "
                "shards are read while the whole table is written)"
            )


def _refuse_a_shard_left_out_as_out(out: Path, infos: list[ShardInfo]) -> None:
    """``out`` a shard of the shards' map that they lack: the whole table's path was left out
    (``tiered-store unshard S0 S1 S2`` takes S0 as the table to write)."""
    try:
        info = read_shard(current_version(out)[0])
    except (OSError, ValueError):  # no table (the usual), a plain one, a version file's name
        return
    if info.shard_map != infos[0].shard_map or info.rank in {i.rank for i in infos}:
        return
    raise ConfigError(
        f"out {out} is rank {info.rank}'s shard of {info.shard_map.ranks}, the rank the shards "
        "given lack; expected the whole table to write as out, then every rank's shard (on the "
        "command line the table comes first: `tiered-store unshard TABLE SHARD...`)"
    )


def _refuse_uncompacted_shards(found: list[tuple[ShardInfo, Path, int, int]]) -> None:
    """Shards with committed writes in their delta: their files alone would lose them."""
    pending = [(info, current, rows) for info, current, rows, _ in found if rows]
    if pending:
        listed = "; ".join(
            f"rank {info.rank}'s shard {info.path} has {rows:,} in its delta "
            f"({delta_path(current).name})"
            for info, current, rows in pending
        )
        raise TableFormatError(
            f"written rows not yet compacted: {listed}; expected none: run `tiered-store compact "
            f"SHARD` on {'each of them' if len(pending) > 1 else 'it'} first"
        )


def _common_step(found: list[tuple[ShardInfo, Path, int, int]]) -> int:
    """The committed step every shard is at; shards at two steps are a torn commit."""
    steps = [step for _, _, _, step in found]
    if len(set(steps)) > 1:
        listed = "; ".join(f"rank {i.rank} ({i.path}): {s}" for i, _, _, s in found)
        raise ShardMismatchError(
            f"the shards were committed at different steps ({listed}): a commit was interrupted "
            "after some shards had committed (a torn commit); expected one step: reopen them with "
            f"ShardedStore (TornCommitWarning), resume from step {min(steps)} and commit up to "
            f"step {max(steps)} again on every rank, compact, then join them"
        )
    return steps[0]


class _JoinedRows(SourceReader):
    """Rows of the whole table from its shards (in rank order), read through their page
    checksums, for ``create_table``."""

    def __init__(self, colds: list[ColdTable], shard_map: ShardMap, first: Path) -> None:
        self.shards = [_ShardRows(cold, 0, cold.manifest.rows) for cold in colds]
        self.bounds = np.asarray(shard_map.bounds, dtype=np.int64)
        self.rows, self.dim, self.dtype = shard_map.rows, colds[0].dim, self.shards[0].dtype
        self.description = f"{shard_map.ranks} shards like {first.name}"
        self.quantization = colds[0].manifest.quantization

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` in the on-disk dtype, from the shards that hold them."""
        first, last = np.searchsorted(self.bounds, [start, stop - 1], side="right") - 1
        parts = []
        for rank in range(int(first), int(last) + 1):  # one read per shard, never per row
            base, end = int(self.bounds[rank]), int(self.bounds[rank + 1])
            parts.append(self.shards[rank].read(max(start, base) - base, min(stop, end) - base))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class _ShardRows(SourceReader):
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
