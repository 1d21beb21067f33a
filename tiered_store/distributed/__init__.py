"""More than one process and machine: tables sharded over the ranks of a torch.distributed group.

``tiered-store shard TABLE --ranks N`` cuts a table into one shard table per rank
(:mod:`.shard_files`, by hash head or by row range: :mod:`.shard_map`), and ``tiered-store
unshard`` folds trained shards back into one table (:mod:`.shard_join`); ``ShardedStore`` opens
rank ``r``'s shard as its own ``TieredStore`` on every rank and answers lookups of any row by
exchanging ids and rows with ``all_to_all_single`` (:mod:`.sharded_store`).
"""

from .shard_files import ShardInfo, read_shard, shard_path, write_shards
from .shard_join import join_shards
from .shard_map import SHARD_MODES, ShardMap, plan_shards, table_version
from .sharded_store import ShardedStore, init_process_group_from_env

__all__ = [
    "SHARD_MODES",
    "ShardInfo",
    "ShardMap",
    "ShardedStore",
    "init_process_group_from_env",
    "join_shards",
    "plan_shards",
    "read_shard",
    "shard_path",
    "table_version",
    "write_shards",
]
