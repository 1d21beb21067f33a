"""Type stub of the package's lazy exports: what ``__init__.py`` imports on first use."""

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
