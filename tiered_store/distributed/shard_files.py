"""Shard table files: one ordinary table (``.npy`` + manifest + page checksums) per rank.

``write_shards`` streams each rank's row range out of the whole table with ``create_table``
(atomic publish, block and page checksums), and records the shard map, the shard's rank and the
whole table's version in each shard's manifest (``metadata["shard"]``), next to the table's own
metadata (the Engram layout).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import TableFormatError
from ..table_format import TableManifest, check_table, create_table, read_manifest, table_paths
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
    manifest = check_table(npy)
    shard_map = plan_shards(manifest, ranks, by, str(npy))
    data = np.load(npy, mmap_mode="r", allow_pickle=False)
    written = []
    for rank in range(ranks):
        start, stop = shard_map.shard_range(rank)
        path = shard_path(npy, rank, ranks, template)
        metadata = {
            **manifest.metadata,
            "shard": {**shard_map.to_json(), "rank": rank, "table": npy.name},
        }
        shard_manifest = create_table(
            path,
            data[start:stop],
            dtype=manifest.dtype,
            quantization=manifest.quantization,
            metadata=metadata,
            progress=progress,
            overwrite=overwrite,
        )
        written.append(ShardInfo(path, rank, shard_map, shard_manifest))
    return written
