"""Table backends: where an Engram layer's concatenated embedding table lives.

The Engram module never owns an ``nn.Embedding``; it asks a backend for rows. ``InMemoryTable``
keeps the whole table in one tensor (the reference behaviour, trainable); the tiered store
(``tiered_store.store.TieredStore``) implements the same interface over hot/warm/cold tiers.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, RowIdError
from ..integers import as_integer
from ..quantization import RowQuantization, dequantize_rows
from ..store import as_id_tensor
from ..table_sources import describe_tensor, tensor_without_values

__all__ = ["InMemoryTable", "PackedInMemoryTable", "TableBackend"]


def check_row_id_values(row_ids: object) -> None:
    """Refuse a row id tensor without values (nested, meta, sparse) before its shape is read."""
    if isinstance(row_ids, torch.Tensor) and (problem := tensor_without_values(row_ids)):
        raise RowIdError(f"row_ids: tensor {describe_tensor(row_ids)} {problem}")


def swap_table(owner: nn.Module, name: str, table: object) -> None:
    """``owner.<name> = table``, a child module or a plain attribute replacing either (a Ctrl-C
    or any error during the swap leaves the old one, never neither: not even a second Ctrl-C
    as the old one is put back)."""
    old = getattr(owner, name)
    try:
        _set_table(owner, name, table)
    except BaseException:
        while True:
            try:
                _set_table(owner, name, old)
                break
            except BaseException:  # noqa: BLE001 (a further Ctrl-C: put back again, the first raised)
                continue
        raise


def _set_table(owner: nn.Module, name: str, table: object) -> None:
    """``owner.<name> = table`` in steps that each leave one of the two readable there (set in
    one dict, then dropped from the other, with no call between them: no signal is handled
    there, which would leave one table served and the other's weight in the state_dict)."""
    if isinstance(table, nn.Module):  # a plain attribute shadows a child module until dropped
        held, other = owner._modules, owner.__dict__
    else:
        held, other = owner.__dict__, owner._modules
    held[name] = table
    if name in other:
        del other[name]


@runtime_checkable
class TableBackend(Protocol):
    """What the Engram module needs from a table: a row count, a width, lookup and prefetch.

    ``lookup(row_ids, handle)`` returns ``[..., dim]`` rows for int64 ``row_ids`` of any shape, on
    the compute device; ``prefetch(row_ids)`` starts fetching those rows and returns a handle that a
    later ``lookup`` of the same ids consumes (``None`` when there is nothing to wait for).

    Capabilities are declared, not probed: ``keeps_stats`` says whether ``stats()`` returns
    counters (``TieredStore.stats()``'s layout), and a table whose counters are another's, shared
    with other tables (``TableSlice``), names that one as ``stats_owner`` (sums over Engram layers
    count it once); a table that knows the Engram layout its rows were made for (a table file's
    manifest ``metadata["engram"]``: layer, head primes, seed, pad id, ...) tells it as
    ``engram_layout`` (None, or no such attribute: not known), and an Engram model refuses a
    table made for another layout (``layout.check_backend_layout``); ``close()`` releases files
    and threads. A backend
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
    engram_layout
        The Engram layout the rows were made for (a table file's ``metadata["engram"]``, which
        ``load_table_in_memory`` takes), checked by the model that reads them; None: not known.

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

    def __init__(
        self, weight: torch.Tensor, *, engram_layout: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight)
            raise ConfigError(f"weight: expected a 2-D tensor [rows, dim], got {shape}")
        if not weight.dtype.is_floating_point:
            raise ConfigError(
                f"weight: expected a floating-point table, got {weight.dtype} (packed quantised "
                "rows go in a PackedInMemoryTable)"
            )
        if isinstance(weight, nn.Parameter):
            self.weight = weight
        else:
            self.register_buffer("weight", weight)
        self.engram_layout = engram_layout

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
        for key, value in (("rows", rows), ("dim", dim)):
            if (count := as_integer(value)) is None or count < 1:
                raise ConfigError(f"{key}: got {value!r}; expected a positive integer")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigError(
                f"dtype: got {dtype!r}; expected a floating-point torch.dtype (e.g. torch.float32)"
            )
        weight = torch.empty(int(rows), int(dim), dtype=dtype, device=device)
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
        """Rows for ``row_ids`` (any shape; a tensor, NumPy array or list, as the store takes
        them) as [..., dim] on the table's device.

        Raises RowIdError for non-integer ids, ids without values (meta, sparse, nested), uint64
        ids that do not fit int64, and (on a CPU table) ids outside the table.
        """
        if isinstance(row_ids, torch.Tensor) and (  # lists and arrays: as_id_tensor names them
            row_ids.dtype.is_floating_point
            or row_ids.dtype.is_complex
            or row_ids.dtype == torch.bool
        ):
            raise RowIdError(f"row_ids: expected integer row ids, got {row_ids.dtype}")
        # as the store reads them (a uint64 past int64 would wrap to a negative id); F.embedding
        # takes int32/int64 only
        ids = as_id_tensor(row_ids).to(self.weight.device, torch.int64)
        try:
            return F.embedding(ids, self.weight)
        except IndexError:  # torch's bounds check failed: name the id (no cost when none is bad)
            bad = ids.lt(0).logical_or(ids.ge(self.rows)).nonzero()
            if not len(bad):
                raise
            index = tuple(bad[0].tolist())
            raise RowIdError(
                f"row_ids: value {int(ids[index])} at index {index} is out of range; expected "
                f"0 <= id < {self.rows} (the table's rows)"
            ) from None

    def prefetch(self, row_ids: torch.Tensor) -> None:
        """Nothing to fetch: the whole table is resident."""
        return None

    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Same as ``lookup``."""
        return self.lookup(row_ids)

    def extra_repr(self) -> str:
        """Shape and dtype for ``repr``."""
        return f"rows={self.rows}, dim={self.dim}, dtype={self.weight.dtype}"


class PackedInMemoryTable(TableBackend):
    """A whole table of packed quantised rows (DeepSeek-V4.1's fp8 codes + ue8m0 scales) in RAM:
    the in-memory twin of a ``TieredStore`` over the same table, with the same semantics (rows
    dequantised at the gather, all-zero rows for ids outside the table). Read-only.

    Parameters
    ----------
    packed
        The table as stored, ``uint8 [rows, packed_bytes]``.
    quantization
        The rows' layout.
    device
        Where rows are dequantised and returned (the packed table stays where it is).
    engram_layout
        The Engram layout the rows were made for (a table file's ``metadata["engram"]``, which
        ``from_table`` takes), checked by the model that reads them; None: not known.

    Examples
    --------
    >>> from tiered_store.quantization import RowQuantization
    >>> q = RowQuantization(values=4, block=2)
    >>> table = PackedInMemoryTable(torch.tensor([[0x38, 0x40, 0xB8, 0x00, 127, 128]], dtype=torch.uint8), q)
    >>> table.rows, table.dim, table.lookup(torch.tensor([0, 7])).tolist()
    (1, 4, [[1.0, 2.0, -2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    """

    def __init__(
        self,
        packed: torch.Tensor,
        quantization: RowQuantization,
        device: torch.device | str = "cpu",
        *,
        engram_layout: dict[str, Any] | None = None,
    ) -> None:
        if (
            not isinstance(packed, torch.Tensor)
            or packed.dtype != torch.uint8
            or packed.ndim != 2
            or packed.shape[1] != quantization.packed_bytes
        ):
            got = (
                f"{packed.dtype} {tuple(packed.shape)}"
                if isinstance(packed, torch.Tensor)
                else f"a {type(packed).__module__}.{type(packed).__qualname__}"
            )
            raise ConfigError(
                f"packed: got {got}; expected a torch.Tensor uint8 "
                f"[rows, {quantization.packed_bytes}] for {quantization.to_json()}"
            )
        if not packed.shape[0]:  # no row to gather from, not even for ids outside the table
            raise ConfigError(
                f"packed: got {packed.dtype} {tuple(packed.shape)}; expected at least one row, "
                "as a table file holds"
            )
        self.packed, self.quantization = packed, quantization
        self.rows, self.dim = int(packed.shape[0]), quantization.values
        self.device = torch.device(device)
        self.engram_layout = engram_layout

    @classmethod
    def from_table(cls, path: str, device: torch.device | str = "cpu") -> PackedInMemoryTable:
        """Read a whole table file of packed rows into RAM (with the Engram layout it records)."""
        from ..cold_table import ColdTable

        with ColdTable(path) as cold:
            if cold.manifest.quantization is None:
                raise ConfigError(f"{path}: not a table of packed quantised rows (no quantization)")
            rows = cold.read_rows(np.arange(cold.rows, dtype=np.int64))
            layout = cold.manifest.engram_layout
            return cls(rows, cold.manifest.quantization, device, engram_layout=layout)

    def lookup(self, row_ids: torch.Tensor, handle: object | None = None) -> torch.Tensor:
        """Dequantised rows ``[..., dim]`` bfloat16; all-zero where an id is outside the table.

        Raises RowIdError for ids that are not integers (bool, float), as the ``TieredStore`` does;
        ConfigError for a table whose rows are on the meta device.
        """
        if self.packed.is_meta:  # to_empty does not reach it: the table is no module tensor
            raise ConfigError(
                f"PackedInMemoryTable: its packed rows, {describe_tensor(self.packed)}, are on the "
                "meta device (a shape without data); expected a table holding its rows (a model "
                "built on the meta device has such tables, which to_empty leaves as they are: "
                "give it tables, EngramLM(..., tables=...) or model.set_tables)"
            )
        ids = as_id_tensor(row_ids).to(
            self.packed.device, torch.int64
        )  # uint8 would index as a mask
        inside = (ids >= 0) & (ids < self.rows)
        rows = self.packed[torch.where(inside, ids, 0)]
        rows = torch.where(inside.unsqueeze(-1), rows, 0)
        return dequantize_rows(rows.to(self.device), self.quantization)

    def prefetch(self, row_ids: torch.Tensor) -> None:
        """Nothing to fetch: the whole table is resident."""
        return None
