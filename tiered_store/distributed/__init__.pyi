"""Type stub of the package's lazy exports: what ``__init__.py`` imports on first use."""

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
