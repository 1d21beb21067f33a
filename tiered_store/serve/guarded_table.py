"""``GuardedTable``: a table backend wrapper that turns a failing or non-finite lookup into one
typed error naming the table, and records it in the table's ``TableHealth``.

A cross-cutting concern kept out of the store (as zarr keeps logging and counting in wrapper
stores): the serve layer wraps each Engram layer's ``TieredStore`` in one of these, so every
lookup failure (a ``TierIOError`` or ``TableFormatError`` from the cold tier, a
``ChecksumError`` from a page that fails its checksum, or rows that are not finite numbers) is counted per table, marks ``/healthz`` unhealthy for that table, and reaches
the HTTP layer as ``TableUnavailableError``, whose message carries no server paths.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..engram.backend import TableBackend
from ..errors import (
    RankFailureError,
    ShardReadError,
    StoreClosedError,
    TableFormatError,
    TieredStoreError,
    TierIOError,
    error_text,
)
from ..metrics import TableHealth
from ..page_checksums import ChecksumError

__all__ = ["GuardedTable", "TableUnavailableError"]

log = logging.getLogger("tiered_store.serve")


class TableUnavailableError(TieredStoreError, RuntimeError):
    """A table's rows could not be served (read failure, bad table file, non-finite values).

    ``table`` names the table, ``reason`` is one of ``"read"``, ``"checksum"``, ``"format"``,
    ``"nonfinite"``, ``"closed"`` (a reload closed its store and could not open the new
    version yet), and over sharded tables ``"rank"`` (a rank failed: every lookup fails until a
    restart) or ``"shard"`` (a rank could not serve its rows of this lookup);
    ``str()`` is safe to show a client (no paths); the cause is chained and logged.
    """

    def __init__(self, table: str, reason: str) -> None:
        super().__init__(f"table data unavailable (table {table}: {_REASONS[reason]})")
        self.table = table
        self.reason = reason


_REASONS = {
    "read": "cold tier read failed",
    "checksum": "rows failed their checksum",
    "format": "table file failed a check",
    "nonfinite": "rows hold non-finite values",
    "rank": "a rank holding part of the table failed",
    "shard": "a rank holding part of the table could not serve its rows",
    "closed": "the table's store is closed until a reload opens its new version",
}


class GuardedTable(TableBackend):
    """Wrap a table backend: failures and non-finite rows raise ``TableUnavailableError``.

    Parameters
    ----------
    table
        The wrapped backend (a ``TieredStore``); every other attribute is read from it.
    name
        The table's name (the metrics' ``table`` label).
    health
        Where failures are counted (``lookup_failures``, ``last_lookup_error``).

    Examples
    --------
    >>> from tiered_store.engram import InMemoryTable
    >>> health = TableHealth()
    >>> table = GuardedTable(InMemoryTable(torch.tensor([[1.0], [float("nan")]])), "t", health)
    >>> table.lookup(torch.tensor([0])).tolist()
    [[1.0]]
    >>> table.lookup(torch.tensor([1]))
    Traceback (most recent call last):
    ...
    tiered_store.serve.guarded_table.TableUnavailableError: table data unavailable (table t: rows hold non-finite values)
    >>> health.lookup_failures
    1
    """

    def __init__(self, table: TableBackend, name: str, health: TableHealth) -> None:
        self.table = table
        self.name = name
        self.health = health
        self.rows, self.dim = table.rows, table.dim
        self.keeps_stats = table.keeps_stats

    @property
    def engram_layout(self) -> dict[str, Any] | None:
        """The wrapped table's Engram layout (None: it tells none)."""
        return getattr(self.table, "engram_layout", None)

    def lookup(self, row_ids: torch.Tensor, handle: object | None = None) -> torch.Tensor:
        """The wrapped lookup; raises ``TableUnavailableError`` on failure or non-finite rows."""
        try:
            rows = self.table.lookup(row_ids, handle)
        except RankFailureError as exc:
            raise self.failed("rank", exc) from exc
        except ShardReadError as exc:
            raise self.failed("shard", exc) from exc
        except TierIOError as exc:
            raise self.failed("read", exc) from exc
        except ChecksumError as exc:
            raise self.failed("checksum", exc) from exc
        except TableFormatError as exc:
            raise self.failed("format", exc) from exc
        except StoreClosedError as exc:  # a reload could not reopen it yet
            raise self.failed("closed", exc) from exc
        if rows.is_floating_point() and not bool(torch.isfinite(rows).all()):
            bad = int((~torch.isfinite(rows)).any(dim=-1).sum())
            raise self.failed("nonfinite", f"{bad} of {rows[..., 0].numel()} rows not finite")
        return rows

    def prefetch(self, row_ids: torch.Tensor) -> object:
        """The wrapped prefetch (read errors surface at the lookup that consumes the handle)."""
        try:
            return self.table.prefetch(row_ids)
        except RankFailureError as exc:
            raise self.failed("rank", exc) from exc
        except TierIOError as exc:
            raise self.failed("read", exc) from exc
        except ChecksumError as exc:
            raise self.failed("checksum", exc) from exc
        except TableFormatError as exc:
            raise self.failed("format", exc) from exc
        except StoreClosedError as exc:
            raise self.failed("closed", exc) from exc

    def stats(self) -> dict[str, dict[str, Any]]:
        """The wrapped table's statistics."""
        return self.table.stats()

    def close(self) -> None:
        """Close the wrapped table."""
        self.table.close()

    def __getattr__(self, name: str) -> Any:
        if name == "table":  # not set yet (during __init__): no recursion
            raise AttributeError(name)
        return getattr(self.table, name)  # device, dtype, cold, ... of the store

    def failed(self, reason: str, cause: object) -> TableUnavailableError:
        """Count the failure, log its cause (paths and all), return the error for the client."""
        text = error_text(cause) if isinstance(cause, BaseException) else cause
        self.health.record_lookup_failure(
            f"{_REASONS[reason]}: {text}", time.monotonic(), about_file=reason != "closed"
        )
        log.error("table %s: lookup failed (%s): %s", self.name, reason, text)
        return TableUnavailableError(self.name, reason)
