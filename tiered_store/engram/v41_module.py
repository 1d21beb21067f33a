"""DeepSeek-V4.1's Engram module: one fused key/value projection and a per-branch scalar gate.

Per token, the ``H`` looked-up rows (``[H, head_dim]``, bf16) are flattened and projected by one
``wkv`` linear into ``hc_mult`` keys and one shared value (``dim`` each). For hyper-connection
branch ``i`` with stream ``h_i``::

    dot_i  = sum_d(h_i * q_i * k_i * key_i) * rsqrt(mean(h_i^2) + eps) * rsqrt(mean(key_i^2) + eps)
             / sqrt(dim)
    gate_i = sigmoid(copysign(sqrt(max(|dot_i|, 1e-6)), dot_i))     (0 where the token is dead)
    out_i  = h_i + gate_i * value

(a dot of exactly 0 gives sigmoid(+1e-3), not the 0.5 of ``sign(dot)``: the demo's rule) with
``q``/``k`` the ``[hc_mult, dim]`` weights ``q_weight``/``k_weight`` and ``eps`` the model's
``norm_eps``; the gate maths and the sum run in float32 (the reference's, which the golden bf16
output matches bit for bit), or in float64 for a float64 stream (it is not rounded through
float32), and the output is cast back to the stream's dtype.
There is no ShortConv (the demo module has one). The table is any
:class:`~tiered_store.engram.backend.TableBackend` whose rows come back dequantised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..store import as_id_tensor
from ..table_sources import describe_tensor, tensor_without_values
from .backend import TableBackend, check_row_id_values
from .config import _gate_eps

__all__ = ["GATE_CLAMP", "V41Engram"]

GATE_CLAMP = 1e-6  # |dot| is clamped below before the signed square root


class V41Engram(nn.Module):
    """The V4.1 Engram layer over a table backend.

    Parameters
    ----------
    table
        The layer's table backend (``rows``, ``dim`` = head_dim, ``lookup``, ``prefetch``).
    num_heads
        Row reads per token (``(max_ngram_size - 1) * n_heads``; 24 in the release).
    dim
        Hidden size of the hyper-connection stream.
    hc_mult
        Hyper-connection branches.
    norm_eps
        The RMS epsilon of the gate, a finite number > 0 that float32 holds (1e-20 in the
        release).
    dtype
        Parameter dtype (the reference runs ``wkv`` in bf16).

    Examples
    --------
    >>> from tiered_store.engram.backend import InMemoryTable
    >>> table = InMemoryTable(torch.randn(50, 8, dtype=torch.bfloat16))
    >>> layer = V41Engram(table, num_heads=3, dim=16, hc_mult=2)
    >>> x = torch.randn(1, 5, 2, 16, dtype=torch.bfloat16)
    >>> ids = torch.randint(0, 50, (1, 5, 3))
    >>> layer(x, ids, torch.ones(1, 5, dtype=torch.bool)).shape
    torch.Size([1, 5, 2, 16])
    """

    def __init__(
        self,
        table: TableBackend,
        *,
        num_heads: int,
        dim: int,
        hc_mult: int,
        norm_eps: float = 1e-20,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        for key, value in (("num_heads", num_heads), ("dim", dim), ("hc_mult", hc_mult)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}: got {value!r}; expected a positive integer")
        try:
            norm_eps = _gate_eps(norm_eps)
        except ValueError as exc:
            raise ConfigError(f"norm_eps: {exc}") from None
        self.table = table
        self.num_heads, self.dim, self.hc_mult, self.norm_eps = num_heads, dim, hc_mult, norm_eps
        in_features = num_heads * int(table.dim)
        self.wkv = nn.Parameter(torch.empty((hc_mult + 1) * dim, in_features, dtype=dtype))
        self.q_weight = nn.Parameter(torch.ones(hc_mult, dim, dtype=dtype))
        self.k_weight = nn.Parameter(torch.ones(hc_mult, dim, dtype=dtype))
        nn.init.normal_(self.wkv, std=in_features**-0.5)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """Looked-up rows ``[..., H, head_dim]`` -> keys and value ``[..., (hc_mult + 1) * dim]``."""
        return F.linear(rows.flatten(-2).to(self.wkv.dtype), self.wkv)

    def gate(self, x: torch.Tensor, keys: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """The gate ``[..., hc_mult]`` of stream ``x`` and ``keys`` (``[..., hc, dim]``), in
        float32 (float64 for a float64 stream)."""
        wide = _compute_dtype(x)
        h, key = x.to(wide), keys.to(wide)
        eps = self.norm_eps
        dot = (h * self.q_weight.to(wide) * self.k_weight.to(wide) * key).sum(-1)
        dot = (
            dot * torch.rsqrt(h.square().mean(-1) + eps) * torch.rsqrt(key.square().mean(-1) + eps)
        )
        dot = dot / math.sqrt(self.dim)
        gate = torch.sigmoid(torch.copysign(dot.abs().clamp_min(GATE_CLAMP).sqrt(), dot))
        return torch.where(token_mask.unsqueeze(-1).bool(), gate, 0.0)  # 0, even from a NaN row

    def forward(
        self,
        x: torch.Tensor,
        row_ids: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        handle: object | None = None,
    ) -> torch.Tensor:
        """``x`` [B, T, hc_mult, dim] and row ids [B, T, H] -> ``x + gate * value``, same shape.

        Row ids may be a tensor, a NumPy array or a list of integers (read as the table's
        ``lookup`` reads them). ``token_mask`` (bool [B, T], default all True) marks live tokens:
        a dead token's gate is zero and its stream passes through unchanged. ``handle`` is the
        table's prefetch handle.
        """
        check_row_id_values(row_ids)
        if not isinstance(x, torch.Tensor):
            raise ConfigError(
                f"x: got a {type(x).__name__}; expected a torch.Tensor [..., {self.hc_mult}, "
                f"{self.dim}], the hyper-connection stream (torch.from_numpy for an array)"
            )
        if not isinstance(row_ids, torch.Tensor):  # a list or NumPy array, as lookup takes them
            row_ids = as_id_tensor(row_ids)
        if x.shape[-2:] != (self.hc_mult, self.dim) or row_ids.shape[-1:] != (self.num_heads,):
            raise ConfigError(
                f"V41Engram input: x {tuple(x.shape)} and row ids {tuple(row_ids.shape)}; expected "
                f"[..., {self.hc_mult}, {self.dim}] and [..., {self.num_heads}]"
            )
        if row_ids.shape[:-1] != x.shape[:-2]:
            raise ConfigError(
                f"row_ids: shape {tuple(row_ids.shape)}; expected "
                f"{(*x.shape[:-2], self.num_heads)} (the [B, T] of x {tuple(x.shape)}, H heads)"
            )
        if token_mask is None:
            token_mask = torch.ones(x.shape[:-2], dtype=torch.bool, device=x.device)
        elif not isinstance(token_mask, torch.Tensor):
            raise ConfigError(
                f"token_mask: got a {type(token_mask).__name__}; expected a bool torch.Tensor of "
                f"shape {tuple(x.shape[:-2])}, the [B, T] of x (torch.from_numpy for an array)"
            )
        elif (problem := tensor_without_values(token_mask)) is not None:  # .shape's bare error
            raise ConfigError(f"token_mask: tensor {describe_tensor(token_mask)} {problem}")
        elif token_mask.shape != x.shape[:-2]:
            raise ConfigError(
                f"token_mask: shape {tuple(token_mask.shape)}; expected {tuple(x.shape[:-2])} "
                f"(the [B, T] of x {tuple(x.shape)})"
            )
        elif token_mask.dtype != torch.bool:
            raise ConfigError(
                f"token_mask: got {token_mask.dtype}; expected bool (True where a token is live: "
                "a 0/1 mask as mask.bool())"
            )
        token_mask = token_mask.to(x.device)  # a tokenizer's mask is on the CPU, x maybe not
        kv = self.project(self.table.lookup(row_ids, handle).to(x.device))
        keys = kv[..., : self.hc_mult * self.dim].unflatten(-1, (self.hc_mult, self.dim))
        wide = _compute_dtype(x)
        value = kv[..., self.hc_mult * self.dim :].to(wide)
        gate = self.gate(x, keys, token_mask)
        out = (x.to(wide) + gate.unsqueeze(-1) * value.unsqueeze(-2)).to(x.dtype)
        return torch.where(token_mask[..., None, None], out, x)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for a bf16, fp16 or fp32 stream (the reference's), float64 for a float64 one."""
    return torch.promote_types(x.dtype, torch.float32)
