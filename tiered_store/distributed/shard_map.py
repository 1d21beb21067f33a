"""Which rank owns which rows: one contiguous row range per rank, cut by hash head or by rows.

An Engram table holds every hash head's rows one after the other (the manifest's
``metadata["engram"]``: ``offsets`` and ``head_sizes``). Sharding ``by: heads`` cuts only at head
boundaries when there are at least as many heads as ranks (each rank holds whole heads, so every
token sends the same number of ids to every rank: exact balance, static shapes), and cuts each
head into row ranges over several ranks when there are fewer heads than ranks. Sharding
``by: rows`` cuts the table into equal row ranges (TorchRec's row-wise sharding) and needs no head
layout. Either way rank ``r`` owns rows ``[bounds[r], bounds[r+1])``, so routing an id is one
``searchsorted``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import ConfigError, TableFormatError
from ..table_format import TableManifest

__all__ = ["SHARD_MODES", "ShardMap", "head_ranges", "plan_shards", "table_version"]

SHARD_MODES = ("heads", "rows")
ShardMode = Literal["heads", "rows"]


@dataclass(frozen=True)
class ShardMap:
    """Row ranges of a table over ``ranks`` ranks: rank ``r`` owns ``[bounds[r], bounds[r+1])``.

    Examples
    --------
    >>> m = ShardMap(by="rows", bounds=(0, 4, 7, 10), table_version="v")
    >>> m.ranks, m.rows, m.shard_range(1)
    (3, 10, (4, 7))
    >>> m.owner(torch.tensor([0, 3, 4, 9])).tolist()
    [0, 0, 1, 2]
    """

    by: ShardMode
    bounds: tuple[int, ...]
    table_version: str

    @property
    def ranks(self) -> int:
        """Number of shards (ranks)."""
        return len(self.bounds) - 1

    @property
    def rows(self) -> int:
        """Rows of the whole table."""
        return self.bounds[-1]

    def shard_range(self, rank: int) -> tuple[int, int]:
        """``(start, stop)`` global rows of ``rank``'s shard."""
        return self.bounds[rank], self.bounds[rank + 1]

    def owner(self, ids: torch.Tensor) -> torch.Tensor:
        """Rank owning each id (ids in ``[0, rows)``, of any integer dtype), vectorised."""
        # in int64: bounds past the ids' dtype (int16 ids of 80,000 rows) did not convert
        inner = torch.tensor(self.bounds[1:-1], dtype=torch.int64, device=ids.device)
        return torch.searchsorted(inner, ids.to(torch.int64), right=True)

    def starts(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """First global row of every shard, int64."""
        return torch.tensor(self.bounds[:-1], dtype=torch.int64, device=device)

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``metadata["shard"]`` entry (without the shard's own rank)."""
        return {"by": self.by, "bounds": list(self.bounds), "table_version": self.table_version}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> ShardMap:
        """Parse a shard manifest's ``metadata["shard"]`` (errors name ``where``)."""
        try:
            by, bounds, version = doc["by"], doc["bounds"], doc["table_version"]
        except (KeyError, TypeError):
            raise TableFormatError(
                f"{where}: metadata.shard is {doc!r}; expected by, bounds and table_version "
                "(a shard made by `tiered-store shard`)"
            ) from None
        # JSON integers only: int() would take "3" and True, truncate 3.9 (Infinity: OverflowError)
        if not isinstance(bounds, list) or any(type(b) is not int for b in bounds):
            raise TableFormatError(
                f"{where}: metadata.shard bounds {bounds!r}; expected integer bounds, a list "
                "(a shard made by `tiered-store shard`)"
            )
        bounds = tuple(bounds)
        if by not in SHARD_MODES or len(bounds) < 2 or bounds[0] != 0:
            raise TableFormatError(f"{where}: metadata.shard {doc!r} is not a valid shard map")
        if any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
            raise TableFormatError(f"{where}: metadata.shard bounds {list(bounds)} not increasing")
        return cls(by=by, bounds=bounds, table_version=str(version))


def table_version(manifest: TableManifest) -> str:
    """A digest of what makes a table's content: shape, dtype, quantisation, block checksums.

    Two shard sets cut from different tables (or versions of one) have different versions."""
    doc = {
        "shape": [manifest.rows, manifest.dim],
        "dtype": manifest.dtype,
        "quantization": manifest.quantization.to_json() if manifest.quantization else None,
        "block_checksums": list(manifest.block_checksums),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def head_ranges(manifest: TableManifest, where: str = "table") -> list[tuple[int, int]] | None:
    """``(offset, size)`` of every hash head from the manifest's Engram metadata, or None."""
    engram = manifest.engram_layout
    if engram is None or "offsets" not in engram or "head_sizes" not in engram:
        return None
    offsets, sizes = engram["offsets"], engram["head_sizes"]
    if (  # JSON integers only: int() would take "3" and truncate 3.9 (Infinity: OverflowError)
        not isinstance(offsets, list)
        or not isinstance(sizes, list)
        or len(offsets) != len(sizes)
        or any(type(v) is not int for v in (*offsets, *sizes))
    ):
        raise TableFormatError(
            f"{where}: metadata.engram offsets {offsets!r} / head_sizes {sizes!r}: expected two "
            "integer lists of one length"
        )
    heads = list(zip(offsets, sizes, strict=True))
    expected = 0
    for offset, size in heads:
        if offset != expected or size < 1:
            raise TableFormatError(
                f"{where}: metadata.engram heads {heads[:4]}... do not tile the table at row "
                f"{expected}; expected consecutive heads from row 0"
            )
        expected += size
    if expected != manifest.rows:
        raise TableFormatError(
            f"{where}: metadata.engram heads cover {expected:,} rows but the table has "
            f"{manifest.rows:,}; expected the heads to cover every row"
        )
    return heads


def plan_shards(
    manifest: TableManifest, ranks: int, by: ShardMode, where: str = "table"
) -> ShardMap:
    """The shard map of a table over ``ranks`` ranks.

    Examples
    --------
    >>> from tiered_store.table_format import TableManifest
    >>> t = TableManifest(rows=10, dim=4, dtype="float32", row_bytes=16, data_offset=4096,
    ...                   block_bytes=4096, block_checksums=(1,),
    ...                   metadata={"engram": {"offsets": [0, 3, 7], "head_sizes": [3, 4, 3]}})
    >>> plan_shards(t, 2, "heads").bounds   # whole heads
    (0, 3, 10)
    >>> plan_shards(t, 4, "heads").bounds   # the largest head split in two
    (0, 3, 5, 7, 10)
    >>> plan_shards(t, 3, "rows").bounds
    (0, 3, 6, 10)
    """
    check_ranks(ranks)
    if ranks > manifest.rows:
        raise ConfigError(
            f"ranks: got {ranks} for a table of {manifest.rows} rows; expected at most one rank per row"
        )
    if by == "rows":
        bounds = [manifest.rows * r // ranks for r in range(ranks + 1)]
    elif by == "heads":
        heads = head_ranges(manifest, where)
        if heads is None:
            raise ConfigError(
                f"by: 'heads' but {where} records no hash-head layout (metadata.engram offsets and "
                "head_sizes); expected an Engram table, or to cut by 'rows'"
            )
        bounds = _head_bounds(heads, ranks, where)
    else:
        raise ConfigError(f"by: got {by!r}; expected one of {', '.join(SHARD_MODES)}")
    return ShardMap(by=by, bounds=tuple(bounds), table_version=table_version(manifest))


def _head_bounds(heads: list[tuple[int, int]], ranks: int, where: str) -> list[int]:
    """Cut points at head boundaries (whole heads per rank), or inside heads when ranks > heads."""
    n = len(heads)
    if n >= ranks:  # contiguous blocks of whole heads, head counts differing by at most one
        return [heads[r * n // ranks][0] for r in range(ranks)] + [heads[-1][0] + heads[-1][1]]
    split = [ranks // n] * n  # ranks per head; the spare ranks go to the largest heads
    for h in sorted(range(n), key=lambda h: (-heads[h][1], h))[: ranks % n]:
        split[h] += 1
    bounds = []
    for (offset, size), parts in zip(heads, split, strict=True):
        if parts > size:
            raise ConfigError(
                f"ranks: {ranks} ranks put {parts} shards on a head of {size} rows in {where}; "
                "expected at most one rank per row"
            )
        bounds.extend(offset + size * j // parts for j in range(parts))
    return [*bounds, heads[-1][0] + heads[-1][1]]


def check_ranks(ranks: object) -> None:
    """Refuse a number of ranks (shards) that is not an integer >= 1."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ConfigError(f"ranks: got {ranks!r}; expected an integer >= 1")
