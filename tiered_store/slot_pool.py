"""Row payload for a cache tier: a fixed ``[capacity, dim]`` tensor on one device."""

from __future__ import annotations

import torch


class SlotPool:
    """Fixed slots of rows on one device (pageable host RAM, or the compute device).

    Host slots are never pinned: rows bound for the GPU are gathered into a pinned staging
    buffer first, and torch's pinned allocator rounds each block up to a power of two (a 20 GiB
    warm tier would lock 32 GiB)."""

    def __init__(self, capacity: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.device = torch.device(device)
        self.rows = torch.empty((capacity, dim), dtype=dtype, device=self.device)

    @property
    def nbytes(self) -> int:
        """Bytes of payload."""
        return self.rows.numel() * self.rows.element_size()

    def gather(self, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows in ``slots`` (int64 on this device)."""
        return torch.index_select(self.rows, 0, slots, out=out)

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Store ``rows`` into ``slots``."""
        if slots.numel():
            self.rows.index_copy_(0, slots, rows.to(self.device, non_blocking=True))
