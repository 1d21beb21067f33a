"""Joining shards: every shard's current rows, in global row order, streamed into one whole
table (to serve the trained shards unsharded, or to cut them again for another number of ranks),
after checking that the shards are one table's, whole, compacted and at one committed step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..cold_table import ColdTable
from ..delta.row_delta import delta_path
from ..delta.table_versions import (
    VERSION_OF,
    current_version,
    has_history,
    present_version,
    release,
    take_writer_lock,
)
from ..errors import ConfigError, ShardMismatchError, TableFormatError
from ..table_format import TableManifest, create_table, read_manifest, table_paths
from ..table_sources import SourceReader, TableNotFoundError
from .shard_files import (
    ShardInfo,
    ShardRows,
    mixed_runs,
    read_shard,
    run_name,
    shard_file_paths,
    shard_path,
    written_rows_and_step,
)
from .shard_map import ShardMap, table_version

__all__ = ["join_shards"]


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
    shards' common committed step; the shard metadata is dropped, and ``metadata["joined_from"]``
    records the shards' table version and ``write_shards`` run. Refused before anything is
    written: a missing shard, shards of different shard maps, table versions or ``write_shards``
    runs (a run killed between its renames: a mixed set, not a torn commit), two shards of one
    rank, a shard with written rows not yet compacted (``tiered-store compact`` it), shards at
    different committed steps (a torn commit), a shard being written, ``out`` naming a shard, an
    existing table at ``out`` without ``overwrite``, and with it one that is neither the table
    the shards were cut from (its version theirs) nor an earlier join of them (its
    ``joined_from`` theirs). The shards' writer locks are held until the table is published
    (``create_table``: a failure or kill midway leaves no table at ``out``, and an old one there
    as it was). Cutting the table again (``write_shards``) re-shards it for another number of
    ranks.

    Examples
    --------
    >>> import tempfile, os
    >>> from tiered_store import create_table
    >>> from tiered_store.distributed import write_shards
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
        source = {"table_version": shard_map.table_version, "run": found[0][0].run}
        if overwrite:
            _refuse_another_table(out_npy, source, found[0][0])
        colds = [stack.enter_context(ColdTable(current)) for _, current, _, _ in found]
        first = found[0][0].manifest
        metadata = {k: v for k, v in first.metadata.items() if k not in _PER_SHARD_KEYS}
        if step or "committed_step" in first.metadata:  # stores and training resume from it
            metadata["committed_step"] = step
        metadata[JOINED_FROM] = source  # an unshard again (more training) may overwrite it
        return create_table(
            out_npy,
            _JoinedRows(colds, shard_map, found[0][0].path),
            block_bytes=first.block_bytes,  # the shards' (the table's, which cut them)
            quantization=first.quantization,
            metadata=metadata,
            progress=progress,
            overwrite=overwrite,
        )


# the joined table's record of the shards it was joined from (their table version and run)
JOINED_FROM = "joined_from"
# metadata a shard holds for itself (its map and rank, whose version it is, its last sharded
# commit round) or that the joined table sets anew
_PER_SHARD_KEYS = ("shard", "committed_step", "committed_round", VERSION_OF, JOINED_FROM)


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
        _refuse_another_rank_count(shards, ranks, template)  # before a path per rank
        return shard_file_paths(shards, ranks, template), ranks
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


def _refuse_another_rank_count(
    table: str | os.PathLike[str], ranks: int, template: str | None
) -> None:
    """Refuse ``ranks`` unless rank 0's shard was cut for that many ranks: read first, before a
    path per rank is made (``--ranks 99999999999`` made that many, for minutes and gigabytes)."""
    first = table_paths(shard_path(table, 0, ranks, template))[0]
    _refuse_missing(first, 0, ranks)
    _refuse_another_rank(0, _current_shard(first)[0], ranks)


def _refuse_another_rank(rank: int, info: ShardInfo, ranks: int) -> None:
    """``ShardMismatchError`` unless ``info`` is rank ``rank``'s shard of ``ranks``."""
    if (info.rank, info.shard_map.ranks) != (rank, ranks):
        raise ShardMismatchError(
            f"rank {rank}'s shard {info.path} is rank {info.rank}'s shard of "
            f"{info.shard_map.ranks}; expected rank {rank}'s of {ranks}"
        )


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
    return info, current, *written_rows_and_step(current, info.manifest)


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
            _refuse_another_rank(rank, info, ranks)
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
        if info.run != ref.run:  # checked before the steps: not a torn commit
            raise ShardMismatchError(f"{info.path} {mixed_runs(info.run, ref.run, ref.path)}")
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


def _refuse_another_table(out: Path, source: dict[str, str | None], first: ShardInfo) -> None:
    """With ``overwrite``: a table at ``out`` that is neither the shards' source table (its
    version the shards' table version) nor an earlier join of them (its ``joined_from``)."""
    if out.is_dir() or not (out.exists() or table_paths(out)[1].exists() or has_history(out)):
        return  # nothing there to replace (a folder: create_table says it is in the way)
    current = present_version(out)[0]  # a version file's name, a lost version: named as such
    try:
        manifest = read_manifest(current)
    except (OSError, ValueError) as exc:
        found = f"not a table that can be read ({exc})"
    else:
        version, joined = table_version(manifest), manifest.metadata.get(JOINED_FROM)
        if version == source["table_version"] or joined == source:
            return
        how = (
            f"an unshard of the shards of table version {joined.get('table_version')} cut by "
            f"{run_name(joined.get('run'))}"
            if isinstance(joined, dict)
            else "not an unshard of shards"
        )
        shape = f"{manifest.rows:,} x {manifest.dim} {manifest.dtype}"
        found = f"a {shape} table of version {version}, {how}"
    shard_map = first.shard_map
    raise ShardMismatchError(
        f"out {out} is {found}, but the shards (rank {first.rank}'s {first.path}, of "
        f"{shard_map.ranks}) were cut from table version {shard_map.table_version} "
        f"({shard_map.rows:,} x {first.manifest.dim}) by {run_name(first.run)}; expected, to "
        "overwrite it, the table they were cut from or an earlier unshard of them: remove it "
        "first if it is to be replaced"
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
        self.shards = [ShardRows(cold, 0, cold.manifest.rows) for cold in colds]
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
