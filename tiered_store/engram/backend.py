"""Table backends: where an Engram layer's concatenated embedding table lives.

The Engram module never owns an ``nn.Embedding``; it asks a backend for rows. ``InMemoryTable``
keeps the whole table in one tensor (the reference behaviour, trainable); the tiered store
(``tiered_store.store.TieredStore``) implements the same interface over hot/warm/cold tiers.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["InMemoryTable", "TableBackend"]


@runtime_checkable
class TableBackend(Protocol):
    """What the Engram module needs from a table: a row count, a width, lookup and prefetch.

    ``lookup(row_ids, handle)`` returns ``[..., dim]`` rows for int64 ``row_ids`` of any shape, on
    the compute device; ``prefetch(row_ids)`` starts fetching those rows and returns a handle that a
    later ``lookup`` of the same ids consumes (``None`` when there is nothing to wait for).

    Capabilities are declared, not probed: ``keeps_stats`` says whether ``stats()`` returns
    counters (``TieredStore.stats()``'s layout); ``close()`` releases files and threads. A backend
    that subclasses this class inherits the defaults (no statistics, nothing to close); the
    ``TieredStore`` declares all of it itself.

    Examples
    --------
    >>> class Zeros(TableBackend):
    ...     rows, dim = 10, 4
    ...     def lookup(self, row_ids, handle=None):
    ...         return torch.zeros(*row_ids.shape, self.dim)
    ...     def prefetch(self, row_ids):
    ...         return None
    >>> table = Zeros()
    >>> isinstance(table, TableBackend), table.keeps_stats, table.stats(), table.close()
    (True, False, {}, None)
    """

    rows: int
    dim: int
    keeps_stats: ClassVar[bool] = False

    def lookup(self, row_ids: torch.Tensor, handle: object | None = None) -> torch.Tensor:
        """Rows for ``row_ids`` (int64 [...]) as [..., dim]."""
        ...

    def prefetch(self, row_ids: torch.Tensor) -> object:
        """Start fetching ``row_ids``; return a handle for ``lookup``."""
        ...

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters per section (``{}`` unless ``keeps_stats``)."""
        return {}

    def close(self) -> None:
        """Release files and threads (nothing to release by default)."""
        return None


class InMemoryTable(nn.Module, TableBackend):
    """A whole table in one tensor: ``lookup`` is ``F.embedding``, ``prefetch`` does nothing.

    With an ``nn.Parameter`` the table is trainable (the reference ``nn.Embedding`` semantics:
    gradients flow into the looked-up rows) and appears in ``state_dict`` as ``weight``, so a
    module holding it as ``embedding`` loads the reference key ``...embedding.weight``. A plain
    tensor is registered as a buffer (frozen, still saved in ``state_dict``).

    Parameters
    ----------
    weight
        The table, [rows, dim].

    Examples
    --------
    >>> table = InMemoryTable(nn.Parameter(torch.randn(10, 4)))
    >>> table.rows, table.dim
    (10, 4)
    >>> table.lookup(torch.tensor([[1, 2], [3, 9]])).shape
    torch.Size([2, 2, 4])
    >>> table.prefetch(torch.tensor([1, 2])) is None
    True
    """

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight)
            raise ConfigError(f"weight: expected a 2-D tensor [rows, dim], got {shape}")
        if isinstance(weight, nn.Parameter):
            self.weight = weight
        else:
            self.register_buffer("weight", weight)

    @classmethod
    def empty(
        cls,
        rows: int,
        dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> InMemoryTable:
        """A trainable table initialised like ``nn.Embedding`` (standard normal)."""
        weight = torch.empty(rows, dim, dtype=dtype, device=device)
        nn.init.normal_(weight)
        return cls(nn.Parameter(weight))

    @property
    def rows(self) -> int:
        """Number of rows."""
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        """Width of a row."""
        return int(self.weight.shape[1])

    def lookup(self, row_ids: torch.Tensor, handle: object | None = None) -> torch.Tensor:
        """Rows for ``row_ids`` (any shape) as [..., dim] on the table's device."""
        return F.embedding(row_ids.to(self.weight.device), self.weight)

    def prefetch(self, row_ids: torch.Tensor) -> None:
        """Nothing to fetch: the whole table is resident."""
        return None

    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Same as ``lookup``."""
        return self.lookup(row_ids)

    def extra_repr(self) -> str:
        """Shape and dtype for ``repr``."""
        return f"rows={self.rows}, dim={self.dim}, dtype={self.weight.dtype}"
