"""More than one process and machine: tables sharded over the ranks of a torch.distributed group.

``tiered-store shard TABLE --ranks N`` cuts a table into one shard table per rank
(:mod:`.shard_files`, by hash head or by row range: :mod:`.shard_map`), and ``tiered-store
unshard`` folds trained shards back into one table (:mod:`.shard_join`); ``ShardedStore`` opens
rank ``r``'s shard as its own ``TieredStore`` on every rank and answers lookups of any row by
exchanging ids and rows with ``all_to_all_single`` (:mod:`.sharded_store`).
"""

import lazy_loader

# Exports load on first use (the stub beside this file lists them), so that the command
# line's --help and light tools need not import torch.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
