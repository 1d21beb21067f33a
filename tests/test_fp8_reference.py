"""fp8 rows against a scalar reference written from the formats' definitions (OCP 8-bit floats:
e4m3fn, no infinities, S.1111.111 the only NaN; e8m0, 2 ** (byte - 127), 0xFF NaN), element by
element in plain Python floats, never through the code under test or torch's fp8 casts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tiered_store import StoreConfig, TieredStore, create_table
from tiered_store.quantization import RowQuantization, dequantize_rows, pack_rows, quantize_rows

Q = RowQuantization(values=256, block=32)
NAN = float("nan")


def e4m3_value(code: int) -> float:
    """The value of one e4m3fn code: sign, 4 exponent bits (bias 7), 3 mantissa bits."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return NAN
    if exponent == 0:  # subnormal: 0.mmm x 2**-6
        return math.copysign(mantissa / 8 * 2.0**-6, sign)
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def e8m0_value(byte: int) -> float:
    """The value of one e8m0 scale byte: 2 ** (byte - 127); 0xFF is NaN, byte 0 is 2**-127."""
    return NAN if byte == 0xFF else 2.0 ** (byte - 127)


def float_bits(x: float, mantissa_bits: int) -> int:
    """``x`` (exact in a Python float) rounded once, to nearest even, to an IEEE binary format of
    8 exponent bits (bfloat16: 7 mantissa bits, float32: 23), as its bit pattern."""
    width = 1 + 8 + mantissa_bits
    sign = (1 << (width - 1)) if math.copysign(1.0, x) < 0 else 0
    if math.isnan(x):
        return ((1 << (width - 1)) - 1) | sign  # any NaN; compared as "a NaN"
    a = abs(x)
    if a == 0:
        return sign
    exponent = max(math.frexp(a)[1] - 1, -126)  # subnormals share the quantum of 2**-126
    quantum = 2.0 ** (exponent - mantissa_bits)
    rounded = round(a / quantum) * quantum  # round() rounds halves to even
    if rounded >= 2.0**128:
        return sign | (0xFF << mantissa_bits)  # inf
    if rounded < 2.0**-126:
        return sign | int(rounded / 2.0 ** (-126 - mantissa_bits))
    frac, e = math.frexp(rounded)
    return sign | ((e - 1 + 127) << mantissa_bits) | int((frac * 2 - 1) * 2**mantissa_bits)


def same_bits(got: np.ndarray, want: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """Element-wise: the same bits, or both NaN (NaN payloads carry no meaning)."""
    exp_mask = 0xFF << mantissa_bits
    man_mask = (1 << mantissa_bits) - 1

    def nan(b):
        return ((b & exp_mask) == exp_mask) & ((b & man_mask) != 0)

    return (got == want) | (nan(got) & nan(want))


def every_code_with_every_scale() -> np.ndarray:
    """256 packed rows: row r holds codes 0..255 in order, block j scaled by byte (r + 37j) % 256,
    so each (code, scale byte) pair occurs exactly once and each block has its own scale."""
    codes = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    scales = (np.arange(256)[:, None] + 37 * np.arange(Q.scales)[None, :]) % 256
    return pack_rows(codes, scales.astype(np.uint8))


def reference_rows(packed: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """Dequantised bit patterns, one element at a time: the exact product, rounded once."""
    dtype = np.uint16 if mantissa_bits == 7 else np.uint32
    out = np.zeros((packed.shape[0], Q.values), dtype)
    for r, row in enumerate(packed.tolist()):
        for c in range(Q.values):
            exact = e4m3_value(row[c]) * e8m0_value(row[Q.values + c // Q.block])
            out[r, c] = float_bits(exact, mantissa_bits)
    return out


def test_the_reference_decodes_the_formats_landmarks():
    assert [e4m3_value(c) for c in (0x00, 0x01, 0x07, 0x08, 0x38, 0x7E)] == [
        0.0,
        2.0**-9,
        7 * 2.0**-9,
        2.0**-6,
        1.0,
        448.0,
    ]
    assert math.copysign(1, e4m3_value(0x80)) == -1 and e4m3_value(0xFE) == -448.0
    assert math.isnan(e4m3_value(0x7F)) and math.isnan(e4m3_value(0xFF))
    assert sum(math.isnan(e4m3_value(c)) for c in range(256)) == 2
    assert (e8m0_value(0), e8m0_value(127), e8m0_value(254)) == (2.0**-127, 1.0, 2.0**127)
    assert math.isnan(e8m0_value(255))
    assert float_bits(1.0, 7) == 0x3F80 and float_bits(-0.0, 7) == 0x8000
    assert float_bits(1 + 2**-8, 7) == 0x3F80 and float_bits(1 + 3 * 2**-8, 7) == 0x3F82  # ties
    assert float_bits(2.0**-133, 7) == 0x0001 and float_bits(2.0**-134, 7) == 0  # tie to even 0
    assert float_bits(1.75 * 2.0**135, 7) == 0x7F80 and float_bits(2.0**127, 23) == 0x7F000000


@pytest.mark.parametrize(("dtype", "mantissa_bits"), [(torch.bfloat16, 7), (torch.float32, 23)])
def test_dequantize_matches_the_reference_for_every_code_and_scale_byte(dtype, mantissa_bits):
    packed = every_code_with_every_scale()
    got = dequantize_rows(torch.from_numpy(packed), Q, dtype)
    assert got.dtype == dtype and got.shape == (256, 256)
    bits = got.view(torch.int16 if mantissa_bits == 7 else torch.int32).numpy()
    bits = bits.view(np.uint16 if mantissa_bits == 7 else np.uint32)
    want = reference_rows(packed, mantissa_bits)
    ok = same_bits(bits, want, mantissa_bits)
    if not ok.all():
        r, c = (int(i) for i in np.argwhere(~ok)[0])
        pytest.fail(
            f"code 0x{packed[r, c]:02x} x scale byte 0x{packed[r, Q.values + c // 32]:02x}: "
            f"got bits 0x{int(bits[r, c]):x}, expected 0x{int(want[r, c]):x}"
        )


# ---- quantize_rows ------------------------------------------------------------------------------

FINITE_E4M3 = sorted({e4m3_value(c) for c in range(0x7F)})  # 0 .. 448, the non-negative values


def e4m3_code(x: float) -> int:
    """``x`` (|x| <= 448) rounded to the nearest e4m3 value, ties to the even code."""
    a = abs(x)
    i = min(range(len(FINITE_E4M3)), key=lambda k: (abs(FINITE_E4M3[k] - a), k % 2))
    return (0x80 if math.copysign(1.0, x) < 0 else 0) | i  # codes 0..126 in value order


def reference_quantize(row: list[float]) -> list[int]:
    """Per block: the smallest scale 2**e (-127 <= e <= 127) with max |x| <= 448 * 2**e, then each
    value divided by it, rounded to e4m3."""
    codes, scales = [], []
    for b in range(0, len(row), Q.block):
        block = row[b : b + Q.block]
        amax = max(abs(v) for v in block)
        e = -127
        while amax > 448.0 * 2.0**e:
            e += 1
        codes += [e4m3_code(v / 2.0**e) for v in block]
        scales.append(e + 127)
    return codes + scales


def boundary_rows() -> torch.Tensor:
    """Rows whose blocks hold every e4m3 rounding boundary (midpoints between neighbours, and the
    float32s on either side), both signs, each block pinned to scale 2**k by one value of
    448 * 2**k: k from -127 (the smallest scale, float32 subnormals) to 118."""
    mids = [(lo + hi) / 2 for lo, hi in zip(FINITE_E4M3, FINITE_E4M3[1:], strict=False)]
    points = [v for m in mids for v in (m, *np.nextafter(np.float32(m), [0, 1000]).tolist())]
    points = [*FINITE_E4M3, *points, *(-p for p in points)]
    per_block = Q.block - 1
    blocks = []
    for k in (-127, -126, -120, -20, -1, 0, 1, 7, 60, 118):
        for s in range(0, len(points), per_block):
            chunk = points[s : s + per_block]
            chunk += [0.0] * (per_block - len(chunk))
            blocks.append([448.0 * 2.0**k, *(p * 2.0**k for p in chunk)])
    blocks += [[0.0] * Q.block] * (-len(blocks) % Q.scales)  # whole rows; all-zero blocks
    return torch.tensor(blocks, dtype=torch.float64).float().reshape(-1, Q.values)


def test_quantize_matches_the_reference_at_every_rounding_boundary():
    x = boundary_rows()
    assert torch.equal(x.double(), boundary_rows().double())  # exact in float32
    got = quantize_rows(x, Q).tolist()
    for r, row in enumerate(x.double().tolist()):
        want = reference_quantize(row)
        if got[r] != want:
            c = next(i for i, (g, w) in enumerate(zip(got[r], want, strict=True)) if g != w)
            v = row[c] if c < Q.values else None
            pytest.fail(f"row {r} column {c} (value {v}): got {got[r][c]}, expected {want[c]}")


@pytest.mark.parametrize("seed", [0, 1])
def test_quantize_matches_the_reference_on_random_rows(seed):
    """Random magnitudes from 2**-149 to 2**127, zeros and powers of two as block maxima."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((24, Q.values)) * 2.0 ** rng.integers(-150, 120, (24, Q.values))
    x[3] = 0.0
    x[4, :32] = -0.0
    x[5::2, ::32] = 2.0 ** rng.integers(-140, 127, (10, Q.scales))  # power-of-two maxima
    x = torch.from_numpy(x).float()
    got = quantize_rows(x, Q).tolist()
    for r, row in enumerate(x.double().tolist()):
        assert got[r] == reference_quantize(row), f"row {r}"


def test_quantize_round_trip_error_is_within_half_an_e4m3_step():
    """Back from fp8, every value is within half a step of e4m3 at its scale: 2**-4 of its own
    magnitude for normals, 2**-10 of the scale below e4m3's smallest normal."""
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((32, 256)) * 2.0 ** rng.integers(-60, 60, (32, 1)))
    x = x.float()
    packed = quantize_rows(x, Q)
    back = dequantize_rows(packed, Q, torch.float32).double()
    scale = torch.exp2(packed[:, Q.values :].double() - 127).repeat_interleave(Q.block, dim=1)
    bound = torch.maximum(x.double().abs() * 2.0**-4, scale * 2.0**-10)
    assert bool(((back - x.double()).abs() <= bound).all())


def test_every_tier_gathers_the_same_bits_as_the_reference(tmp_path):
    """A table of every (code, scale byte) pair with NaNs replaced (tables refuse them), served
    cold, then from the warm and hot tiers: each lookup is the reference, bit for bit."""
    packed = every_code_with_every_scale()
    packed[:, : Q.values][(packed[:, : Q.values] & 0x7F) == 0x7F] = 0x01
    packed[:, Q.values :][packed[:, Q.values :] >= 0xF6] = 0x7F  # none past bfloat16's range
    create_table(tmp_path / "t.npy", packed, quantization=Q, progress=False)
    want = reference_rows(packed, 7)
    cfg = {
        "table": {"path": "t.npy"},
        "tiers": {"hot": {"capacity": 64}, "warm": {"capacity": 128}},
    }
    ids = torch.from_numpy(np.random.default_rng(0).permutation(256))
    with TieredStore(StoreConfig.from_dict(cfg, base_dir=tmp_path)) as store:
        for _ in range(3):  # cold; then hits in the hot and warm tiers, misses of evicted rows
            got = store.lookup(ids)
            bits = got.view(torch.int16).numpy().view(np.uint16)
            assert np.array_equal(bits, want[ids.numpy()])
            assert np.array_equal(store.lookup(ids, packed=True).numpy(), packed[ids.numpy()])
        stats = store.stats()
    assert stats["hot"]["hits"] and stats["warm"]["hits"] and stats["cold"]["rows_read"]
