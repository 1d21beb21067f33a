"""tiered-store: a tiered (GPU / host RAM / NVMe) memory store for Engram N-gram embedding tables.

Examples
--------
>>> from tiered_store import TieredStore
>>> store = TieredStore.open("tiers.yaml")            # doctest: +SKIP
>>> rows = store.lookup(ids)                           # doctest: +SKIP
"""

from importlib import import_module

from .errors import (
    ConfigError,
    RowIdError,
    TableFormatError,
    TieredStoreError,
    TierIOError,
    TraceFormatError,
)

__version__ = "0.1.0"

# Public names -> the module that defines them, imported on first use (keeps `policies`, which
# imports `tiered_store.errors`, free of an import cycle with the store).
_LAZY = {
    "TieredStore": "store",
    "StoreConfig": "config",
    "PrefetchHandle": "prefetch",
    "PrefetchHandleError": "prefetch",
    "ColdTable": "cold_table",
    "create_table": "table_format",
    "verify_table": "table_format",
    "read_manifest": "table_format",
    "RandomSource": "table_format",
    "SafetensorsSource": "table_format",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'tiered_store' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "RowIdError",
    "TableFormatError",
    "TierIOError",
    "TieredStoreError",
    "TraceFormatError",
    *_LAZY,
]
