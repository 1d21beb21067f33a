"""Quantised table rows: fp8 (e4m3) values with one ue8m0 exponent byte per block of columns.

DeepSeek-V4.1 stores each Engram row as 256 ``float8_e4m3fn`` codes and 8 ``float8_e8m0fnu``
scale bytes (one per 32 columns). The store keeps such rows **packed**, exactly as the cold table
holds them: the value bytes, then the scale bytes (264 B a row for the release, against 512 B of
bf16), in every tier, and dequantises only at the gather, on the device the rows end up on:

    value = float32(fp8 code) * 2 ** (scale byte - 127), then cast to bfloat16

This follows DeepSeek's reference (``torch.float8_e8m0fnu`` -> float): scale byte 0 is 2^-127 and
byte 255 is NaN; the fp8 codes 0x7F/0xFF are NaN. (vLLM's kernel reads byte 0 as 0.0 and 255 as
+inf; SGLang's as 2^-127 and inf. Real checkpoints use neither byte.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["FP8_E4M3_MAX", "RowQuantization", "dequantize_rows", "pack_rows", "quantize_rows"]

SCHEME = "fp8_e4m3+ue8m0"
FP8_E4M3_MAX = 448.0  # largest finite e4m3 value
SCALE_BIAS = 127  # ue8m0: value 2 ** (byte - 127)
# quantize_rows' bound on |x|: from 248 * 2**120 up, e4m3 at scale 2**120 rounds to 256 = 2**128
_QUANTIZE_LIMIT = 248.0 * 2.0**120
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # dequantize_rows'


@dataclass(frozen=True)
class RowQuantization:
    """The layout of one packed row: ``values`` fp8 codes, then ``values // block`` scale bytes.

    Examples
    --------
    >>> q = RowQuantization(values=256, block=32)
    >>> q.scales, q.packed_bytes
    (8, 264)
    >>> RowQuantization.from_json(q.to_json()) == q
    True
    """

    values: int
    block: int = 32
    scheme: str = SCHEME

    def __post_init__(self) -> None:
        if self.scheme != SCHEME:
            raise ValueError(f"quantization.scheme: got {self.scheme!r}; expected {SCHEME!r}")
        for key, value in (("values", self.values), ("block", self.block)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"quantization.{key}: got {value!r}; expected a positive integer")
        if self.values % self.block:
            raise ValueError(
                f"quantization.values: {self.values} is not a multiple of the block size "
                f"{self.block}; expected one scale byte per whole block"
            )

    @property
    def scales(self) -> int:
        """Scale bytes per row."""
        return self.values // self.block

    @property
    def packed_bytes(self) -> int:
        """Bytes per packed row: the codes, then the scales."""
        return self.values + self.scales

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``quantization`` entry."""
        return {"scheme": self.scheme, "values": self.values, "block": self.block}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RowQuantization:
        """Parse a manifest's ``quantization`` entry (errors name the key)."""
        if not isinstance(doc, Mapping):
            raise ValueError(f"quantization: got {doc!r}; expected a mapping")
        unknown = set(doc) - {"scheme", "values", "block"}
        if unknown:
            raise ValueError(
                f"quantization: unknown keys {sorted(unknown)}; expected scheme, values, block"
            )
        return cls(
            values=doc.get("values"), block=doc.get("block", 32), scheme=doc.get("scheme", SCHEME)
        )


def dequantize_rows(
    packed: torch.Tensor, quant: RowQuantization, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Packed rows ``uint8 [..., packed_bytes]`` -> values ``[..., values]`` in ``dtype``.

    Runs on the tensor's device, vectorised; the arithmetic is the reference's (fp32 product of
    the fp8 value and the power-of-two scale, one rounding to ``dtype``). ``float16`` holds at
    most 65504: a larger value (code 448 at scale 2^8, say) comes out infinite, where bfloat16
    and float32 hold it (they hold every value ``quantize_rows`` made from finite float32 rows).

    Examples
    --------
    >>> q = RowQuantization(values=4, block=2)
    >>> row = torch.tensor([[0x38, 0x40, 0xB8, 0x00, 127, 128]], dtype=torch.uint8)
    >>> dequantize_rows(row, q).tolist()  # codes 1.0, 2.0, -1.0, 0.0; scales 2^0, 2^1
    [[1.0, 2.0, -2.0, 0.0]]
    """
    _check_tensor(packed, "dequantize_rows")
    if dtype not in _OUT_DTYPES:
        raise ValueError(
            f"dequantize_rows: dtype {dtype}; expected one of "
            f"{', '.join(str(d) for d in _OUT_DTYPES)}"
        )
    if packed.dim() == 0 or packed.dtype != torch.uint8 or packed.shape[-1] != quant.packed_bytes:
        raise ValueError(
            f"packed rows: got {packed.dtype} [..., {packed.shape[-1] if packed.dim() else '?'}]; "
            f"expected uint8 [..., {quant.packed_bytes}]"
        )
    lead = packed.shape[:-1]
    codes = packed[..., : quant.values].contiguous().view(torch.float8_e4m3fn).float()
    scales = packed[..., quant.values :].contiguous().view(torch.float8_e8m0fnu).float()
    values = codes.view(*lead, quant.scales, quant.block) * scales.unsqueeze(-1)
    return values.view(*lead, quant.values).to(dtype)


def _check_tensor(rows: Any, caller: str) -> None:
    """Refuse anything but a torch tensor, naming its type."""
    if not isinstance(rows, torch.Tensor):
        raise ValueError(
            f"{caller}: got a {type(rows).__module__}.{type(rows).__qualname__}; expected a "
            "torch.Tensor (torch.from_numpy makes one of a NumPy array)"
        )


def pack_rows(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """fp8 code bytes ``[rows, values]`` and scale bytes ``[rows, scales]`` -> packed ``uint8``.

    Examples
    --------
    >>> pack_rows(np.zeros((2, 4), np.uint8), np.full((2, 2), 127, np.uint8)).tolist()
    [[0, 0, 0, 0, 127, 127], [0, 0, 0, 0, 127, 127]]
    """
    codes, scales = _bytes(codes, "codes"), _bytes(scales, "scales")
    if (
        codes.ndim != 2
        or scales.ndim != 2
        or codes.shape[0] != scales.shape[0]
        or not scales.shape[1]
        or not codes.shape[1]
        or codes.shape[1] % scales.shape[1]
    ):
        raise ValueError(
            f"pack_rows: codes {codes.shape} and scales {scales.shape}; expected [rows, values] "
            "and [rows, values / block] with the same rows, one scale per whole block"
        )
    return np.concatenate([codes, scales], axis=1)


def _bytes(array: Any, what: str) -> np.ndarray:
    """``array`` (NumPy or torch) as ``uint8``, refused unless its elements are single bytes."""
    if isinstance(array, torch.Tensor):
        dtype, one_byte = array.dtype, array.element_size() == 1 and array.dtype != torch.bool
        if one_byte:
            array = array.detach().cpu().view(torch.uint8).numpy()
    else:
        array = np.asarray(array)
        dtype, one_byte = array.dtype, array.dtype.itemsize == 1 and array.dtype.kind != "b"
    if not one_byte:
        raise ValueError(
            f"pack_rows: {what} dtype {dtype}; expected one byte each (uint8: fp8 e4m3 codes, "
            "ue8m0 scale bytes)"
        )
    return array.view(np.uint8)


def quantize_rows(values: torch.Tensor, quant: RowQuantization) -> torch.Tensor:
    """Float rows ``[..., values]`` -> packed ``uint8`` rows: per block, the smallest power-of-two
    scale that brings the block's largest magnitude within e4m3's range, then round to e4m3.

    Integer and bool rows are refused (a ValueError): through float32 they would round twice.
    An all-zero block gets the smallest scale, byte 0 (2**-127). NaN, inf and values of magnitude
    248 * 2**120 (about 3.3e38) or more are refused (a ValueError naming the element): e4m3fn has
    no inf, one NaN would make its whole block NaN, and those largest finite float32s round to
    2**128, which dequantises to inf. Each value rounds once, to its nearest code (float64 ones
    too, through float32 rounded to odd).

    Examples
    --------
    >>> q = RowQuantization(values=4, block=2)
    >>> x = torch.tensor([[1.0, 2.0, -600.0, 0.5]])
    >>> dequantize_rows(quantize_rows(x, q), q, torch.float32).tolist()
    [[1.0, 2.0, -576.0, 0.5]]
    """
    _check_tensor(values, "quantize_rows")
    if values.is_complex():
        raise ValueError(f"quantize_rows: rows of {values.dtype}; expected real values")
    if not values.is_floating_point():  # float32's rounding, then e4m3's: not the nearest code
        raise ValueError(
            f"quantize_rows: rows of {values.dtype}; expected floating-point values (float64, "
            "float32, bfloat16 or float16)"
        )
    if values.dim() == 0 or values.shape[-1] != quant.values:
        raise ValueError(
            f"quantize_rows: rows of {values.shape[-1] if values.dim() else '?'} values; "
            f"expected {quant.values}"
        )
    lead = values.shape[:-1]
    as_float = _float32_round_to_odd(values) if values.dtype == torch.float64 else values.float()
    blocks = as_float.reshape(*lead, quant.scales, quant.block)
    amax = blocks.abs().amax(dim=-1)  # NaN and inf carry through to their block's maximum
    _check_finite(values, as_float, amax)
    amax = amax.clamp_min(torch.finfo(torch.float32).tiny)
    exponent = torch.ceil(torch.log2(amax / FP8_E4M3_MAX))
    # the division and log2 round (amax one step past 448 * 2**k gave k): made exact in float64,
    # which holds 448 * 2**e for every e here
    limit = torch.ldexp(torch.full_like(amax, FP8_E4M3_MAX, dtype=torch.float64), exponent)
    wide = amax.double()
    exponent = (exponent + (wide > limit).float() - (wide <= limit / 2).float()).clamp(
        -SCALE_BIAS, SCALE_BIAS
    )
    codes = (blocks / torch.exp2(exponent).unsqueeze(-1)).to(torch.float8_e4m3fn)
    scale_bytes = (exponent + SCALE_BIAS).to(torch.uint8)
    return torch.cat([codes.view(torch.uint8).reshape(*lead, quant.values), scale_bytes], dim=-1)


def _float32_round_to_odd(values: torch.Tensor) -> torch.Tensor:
    """float64 ``values`` in float32, rounded to odd (truncated, the last bit set where any was
    lost), so that rounding them again, to e4m3's 3 bits, rounds as once from float64: a plain
    cast made a value just past a midpoint of two codes the midpoint, then the even code."""
    nearest = values.float()
    past = nearest.double().abs() > values.abs()  # rounded away from zero: one step back
    truncated = torch.where(past, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)
    inexact = truncated.double() != values
    return (truncated.view(torch.int32) | inexact.to(torch.int32)).view(torch.float32)


def _check_finite(values: torch.Tensor, as_float: torch.Tensor, amax: torch.Tensor) -> None:
    """Refuse rows holding a NaN, inf or |x| >= :data:`_QUANTIZE_LIMIT` in float32 (seen in the
    blocks' maxima ``amax``, a 32nd of the values); only then is every value scanned, to name the
    first one's place."""
    if bool((amax < _QUANTIZE_LIMIT).all()):  # False for NaN
        return
    within = as_float.abs() < _QUANTIZE_LIMIT
    at = [int(i) for i in torch.nonzero(~within)[0]]
    where = (
        f"column {at[-1]}"
        if len(at) == 1
        else f"row {at[0] if len(at) == 2 else tuple(at[:-1])} column {at[-1]}"
    )
    raise ValueError(
        f"quantize_rows: {where} is {values[tuple(at)].item()!r}; expected finite values with "
        f"|x| < {_QUANTIZE_LIMIT:g} (larger ones round to 2**128 in fp8, past float32's range): "
        "fp8 rows hold no NaN or inf"
    )
