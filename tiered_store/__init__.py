"""tiered-store: a tiered (GPU / host RAM / NVMe) memory store for Engram N-gram embedding tables.

Examples
--------
>>> from tiered_store import TieredStore
>>> store = TieredStore.open("tiers.yaml")            # doctest: +SKIP
>>> rows = store.lookup(ids)                           # doctest: +SKIP
"""

from .cache_plan import IgnoredSettingWarning, PinnedRowsWarning
from .cold_table import ColdTable
from .config import StoreConfig
from .errors import (
    ConfigError,
    RowIdError,
    StoreClosedError,
    TableFormatError,
    TieredStoreError,
    TierIOError,
    TornCommitWarning,
    TraceFormatError,
)
from .page_checksums import ChecksumError, UnverifiedTableWarning
from .prefetch import PrefetchHandle, PrefetchHandleError
from .request_queue import QueuedRequest, QueuedRequestError
from .store import TieredStore, UncommittedWritesWarning
from .table_format import RandomSource, SafetensorsSource, create_table, read_manifest, verify_table
from .warm_restart import RestartWarning

__version__ = "0.1.0"

__all__ = [
    "ChecksumError",
    "ColdTable",
    "ConfigError",
    "IgnoredSettingWarning",
    "PinnedRowsWarning",
    "PrefetchHandle",
    "PrefetchHandleError",
    "QueuedRequest",
    "QueuedRequestError",
    "RandomSource",
    "RestartWarning",
    "RowIdError",
    "SafetensorsSource",
    "StoreClosedError",
    "StoreConfig",
    "TableFormatError",
    "TierIOError",
    "TieredStore",
    "TieredStoreError",
    "TornCommitWarning",
    "TraceFormatError",
    "UncommittedWritesWarning",
    "UnverifiedTableWarning",
    "create_table",
    "read_manifest",
    "verify_table",
]
