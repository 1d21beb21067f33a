"""Row payload for a cache tier: a fixed ``[capacity, dim]`` tensor on one device."""

from __future__ import annotations

import torch


class SlotPool:
    """Fixed slots of rows on one device (host RAM, pinned when asked, or the compute device)."""

    def __init__(
        self,
        capacity: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        pin_memory: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.rows = torch.empty(
            (capacity, dim),
            dtype=dtype,
            device=self.device,
            pin_memory=pin_memory and self.device.type == "cpu",
        )
        self.pinned = pin_memory

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
