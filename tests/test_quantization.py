"""fp8 (e4m3) rows with ue8m0 block scales: the dequantising gather against DeepSeek-V4.1's reference,
and tables of packed quantised rows."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tests.conftest import golden_dir
from tiered_store.errors import TableFormatError
from tiered_store.manifest_checksum import sealed
from tiered_store.quantization import (
    RowQuantization,
    dequantize_rows,
    pack_rows,
    quantize_rows,
)
from tiered_store.table_format import (
    PackedSafetensorsSource,
    RandomSource,
    SafetensorsSource,
    create_table,
    read_manifest,
    verify_table,
)

Q = RowQuantization(values=256, block=32)


@pytest.fixture(scope="module")
def golden():
    return np.load(golden_dir("v41/golden_v41.npz") / "v41" / "golden_v41.npz")


def _bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


def _same_bf16(got: np.ndarray, want: np.ndarray) -> bool:
    """Bit-equal, except that any NaN equals any NaN (NaN payloads carry no meaning)."""
    nan_got = (got & 0x7FFF) > 0x7F80
    nan_want = (want & 0x7FFF) > 0x7F80
    return bool(
        np.array_equal(nan_got, nan_want) and np.array_equal(got[~nan_got], want[~nan_want])
    )


@pytest.mark.parametrize("layer", [1, 14])
def test_gather_of_packed_rows_equals_the_reference_bit_for_bit(golden, layer):
    table = pack_rows(
        golden[f"layer{layer}_embed_weight_u8"], golden[f"layer{layer}_embed_scale_u8"]
    )
    ids = golden[f"lookup_layer{layer}_ids"]
    inside = (ids >= 0) & (ids < table.shape[0])
    packed = np.zeros((ids.size, Q.packed_bytes), np.uint8)
    packed[inside] = table[ids[inside]]
    assert np.array_equal(packed, golden[f"lookup_layer{layer}_packed_u8"])
    rows = dequantize_rows(torch.from_numpy(packed), Q)
    rows[torch.from_numpy(~inside)] = 0  # out-of-range ids gather an all-zero row
    assert rows.dtype == torch.bfloat16
    assert np.array_equal(_bf16_bits(rows), golden[f"lookup_layer{layer}_rows_bf16bits"])
    f32 = dequantize_rows(torch.from_numpy(packed), Q, torch.float32)
    f32[torch.from_numpy(~inside)] = 0
    assert torch.equal(f32, torch.from_numpy(golden[f"lookup_layer{layer}_rows_f32"]))


def test_edge_codes_and_scale_bytes_follow_the_reference_not_vllm(golden):
    packed = torch.from_numpy(pack_rows(golden["edge_weight_u8"], golden["edge_scale_u8"]))
    got = _bf16_bits(dequantize_rows(packed, Q))
    assert _same_bf16(got, golden["edge_ref_rows_bf16bits"])
    f32 = dequantize_rows(packed, Q, torch.float32).numpy()
    want = golden["edge_ref_rows_f32"]
    assert np.array_equal(np.isnan(f32), np.isnan(want))
    assert np.array_equal(f32[~np.isnan(f32)], want[~np.isnan(want)])
    # vLLM reads scale byte 0 as 0.0 and 255 as +inf: our rows differ from its exactly there
    scale_of_column = np.repeat(golden["edge_scale_u8"], Q.block, axis=1)
    differs = ~np.vectorize(lambda a, b: _same_bf16(np.array([a]), np.array([b])))(
        got, golden["edge_vllm_rows_bf16bits"]
    )
    assert differs.any() and np.isin(scale_of_column[differs], [0, 255]).all()


def test_quantize_round_trips_within_fp8_precision():
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64).unsqueeze(1)
    packed = quantize_rows(x, Q)
    assert packed.dtype == torch.uint8 and packed.shape == (64, 264)
    back = dequantize_rows(packed, Q, torch.float32)
    blocks = x.reshape(64, 8, 32).abs().amax(-1, keepdim=True)
    err = (back - x).reshape(64, 8, 32).abs() / blocks
    assert float(err.max()) <= 2**-3  # e4m3 keeps 3 mantissa bits of the block's range


def test_float64_rows_round_once_to_the_nearest_fp8_code():
    """float64 rows went to float32 (rounded) then to e4m3 (rounded again): 1.0625 + 2**-30,
    just past the midpoint of e4m3's 1 and 1.125, became the midpoint in float32 and then 1.0
    (the tie to even), where the nearest code is 1.125. Every value rounds once, to its
    nearest code, as float32 and bfloat16 rows do."""
    q = RowQuantization(values=2, block=2)
    for value, nearest in ((1.0625 + 2**-30, 1.125), (1.0625 - 2**-30, 1.0), (1.0625, 1.0)):
        for sign in (1, -1):
            x = torch.tensor([[sign * value, 256.0]], dtype=torch.float64)
            got = dequantize_rows(quantize_rows(x, q), q, torch.float64)[0, 0].item()
            assert got == sign * nearest, (sign * value, got)
    rows = torch.randn(64, 32, dtype=torch.float64)  # exact float32s: as float32 rows give
    q = RowQuantization(values=32, block=8)
    wide = quantize_rows(rows.float().double(), q)
    assert torch.equal(wide, quantize_rows(rows.float(), q))


def test_bad_layouts_are_refused_with_the_key():
    with pytest.raises(ValueError, match="quantization.values: 250 is not a multiple"):
        RowQuantization(values=250, block=32)
    with pytest.raises(ValueError, match="quantization.scheme"):
        RowQuantization(values=256, scheme="int8")
    with pytest.raises(ValueError, match=r"expected uint8 \[\.\.\., 264\]"):
        dequantize_rows(torch.zeros(2, 256, dtype=torch.uint8), Q)
    with pytest.raises(ValueError, match=r"got torch.uint8 \[\.\.\., \?\]"):  # not an IndexError
        dequantize_rows(torch.tensor(7, dtype=torch.uint8), Q)
    with pytest.raises(ValueError, match=r"quantize_rows: rows of \? values; expected 256"):
        quantize_rows(torch.tensor(1.0), Q)
    with pytest.raises(ValueError, match="unknown keys"):
        RowQuantization.from_json({"values": 256, "blocks": 32})


@pytest.mark.parametrize(
    ("codes", "scales", "error"),
    [
        (
            np.zeros((2, 4), np.int64),
            np.zeros((2, 2), np.uint8),
            "codes dtype int64; expected one byte",
        ),
        (
            np.zeros((2, 4), np.uint8),
            np.zeros((2, 2), np.uint16),
            "scales dtype uint16; expected one",
        ),
        (torch.zeros(2, 4), np.zeros((2, 2), np.uint8), "codes dtype torch.float32; expected one"),
        (np.zeros((2, 4), bool), np.zeros((2, 2), np.uint8), "codes dtype bool; expected one byte"),
        (
            np.zeros((2, 4), np.uint8),
            np.zeros((2, 3), np.uint8),
            r"codes \(2, 4\) and scales \(2, 3\); expected",
        ),
        (
            np.zeros((2, 4), np.uint8),
            np.zeros((2, 0), np.uint8),
            r"codes \(2, 4\) and scales \(2, 0\); expected",
        ),
        (
            np.zeros((2, 4), np.uint8),
            np.zeros((3, 2), np.uint8),
            r"codes \(2, 4\) and scales \(3, 2\); expected",
        ),
    ],
)
def test_pack_rows_refuses_wide_dtypes_and_widths_that_do_not_fit(codes, scales, error):
    """Codes of int64 or float32 were viewed as bytes (8 or 4 columns each) and scales of any width
    packed beside any number of codes: garbage rows, no error."""
    with pytest.raises(ValueError, match=f"pack_rows: {error}"):
        pack_rows(codes, scales)


def test_quantize_and_dequantize_refuse_arrays_complex_rows_and_integer_outputs():
    """dequantize_rows(dtype=torch.int32) truncated values to integers without a word; NumPy rows
    gave a bare AttributeError; complex rows lost their imaginary part with only a warning."""
    q = RowQuantization(values=64, block=32)
    packed = quantize_rows(torch.randn(2, 64), q)
    with pytest.raises(ValueError, match="dequantize_rows: dtype torch.int32; expected one of"):
        dequantize_rows(packed, q, torch.int32)
    with pytest.raises(ValueError, match=r"dequantize_rows: got a numpy.ndarray; expected a torch"):
        dequantize_rows(packed.numpy(), q)
    with pytest.raises(ValueError, match=r"quantize_rows: got a numpy.ndarray; expected a torch"):
        quantize_rows(np.zeros((2, 64), np.float32), q)
    with pytest.raises(ValueError, match="rows of torch.complex64; expected real values"):
        quantize_rows(torch.zeros(2, 64, dtype=torch.complex64), q)
    assert dequantize_rows(packed, q, torch.float16).dtype == torch.float16


def test_pack_rows_takes_one_byte_dtypes_of_numpy_and_torch():
    codes = torch.tensor([[0x38, 0xB8]], dtype=torch.uint8)
    scales = torch.tensor([[128]], dtype=torch.uint8)
    want = [[0x38, 0xB8, 128]]
    assert (
        pack_rows(codes.view(torch.float8_e4m3fn), scales.view(torch.float8_e8m0fnu)).tolist()
        == want
    )
    assert pack_rows(codes.numpy().view(np.int8), scales.numpy()).tolist() == want


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e300])
def test_quantize_refuses_nan_inf_and_values_past_float32_naming_the_element(value):
    """A NaN made its whole block NaN codes with a scale byte cast from NaN; an inf became code
    0x7E with scale byte 0xFE (inf again at the gather) and zeroed the rest of its block."""
    q = RowQuantization(values=64, block=32)
    x = torch.randn(3, 64, dtype=torch.float64)
    x[2, 40] = value
    with pytest.raises(ValueError, match=re.escape(f"quantize_rows: row 2 column 40 is {value!r}")):
        quantize_rows(x, q)
    with pytest.raises(ValueError, match=r"row \(2, 0\) column 40 is .*expected finite values"):
        quantize_rows(x.reshape(3, 1, 64), q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_quantize_finds_a_nan_or_inf_anywhere_in_a_big_batch_beside_larger_values(dtype):
    """The check reads the blocks' maxima, not every value (a full scan took a third of the time
    of 100k x 256 rows): a NaN or inf in any column of any row, even in a block whose other
    values are larger, is still refused by its place."""
    q = RowQuantization(values=256, block=32)
    x = torch.randn(1_000, 256).to(dtype)
    x[:, 1::32] = 1e30
    for row, col in ((0, 0), (517, 31), (517, 32), (999, 255), (3, 129)):
        for value in (float("nan"), float("inf"), -float("inf")):
            bad = x.clone()
            bad[row, col] = value
            with pytest.raises(ValueError, match=rf"row {row} column {col} is {value!r}; expected"):
                quantize_rows(bad, q)


def test_quantize_refuses_float32s_that_fp8_rounds_to_2_to_the_128():
    """A finite float32 of 248 * 2**120 (3.3e38) or more took scale 2**120 and e4m3's 256, bytes
    that dequantised to inf (and that a table refuses): it is refused like an inf; the float32
    just below is kept and comes back finite."""
    q = RowQuantization(values=32, block=32)
    limit = np.float32(248.0 * 2.0**120)
    below = float(np.nextafter(limit, np.float32(0)))
    x = torch.zeros(3, 32)
    x[0, 5], x[1, 9], x[2, 0] = below, -below, float(np.finfo(np.float32).max)
    with pytest.raises(ValueError, match=r"row 2 column 0 is 3.40282.*e\+38; expected finite"):
        quantize_rows(x, q)
    for value in (float(limit), -float(limit)):
        x[2, 0] = value
        want = f"row 2 column 0 is {value!r}; expected finite values with |x| < 3.29649e+38"
        with pytest.raises(ValueError, match=re.escape(want)):
            quantize_rows(x, q)
    back = dequantize_rows(quantize_rows(x[:2], q), q, torch.float32)
    assert back[0, 5] == 240 * 2.0**120 and back[1, 9] == -240 * 2.0**120
    assert bool(torch.isfinite(dequantize_rows(quantize_rows(x[:2], q), q)).all())  # bfloat16


# ---- quantised tables ----------------------------------------------------------------------------


def _golden_tables():
    return golden_dir("v41/golden_v41_tables.safetensors") / "v41" / "golden_v41_tables.safetensors"


def test_table_from_checkpoint_tensors_stores_packed_rows(tmp_path, golden):
    src = PackedSafetensorsSource(
        SafetensorsSource(_golden_tables(), "layers.1.engram.embed.weight"),
        SafetensorsSource(_golden_tables(), "layers.1.engram.embed.scale"),
    )
    manifest = create_table(tmp_path / "l1.npy", src, chunk_bytes=100_000, progress=False)
    assert manifest.dtype == "uint8" and manifest.shape == (1998, 264)
    assert manifest.quantization == Q and manifest.values_per_row == 256
    assert read_manifest(tmp_path / "l1.npy") == manifest  # the quantization survives the file
    want = pack_rows(golden["layer1_embed_weight_u8"], golden["layer1_embed_scale_u8"])
    assert np.array_equal(np.load(tmp_path / "l1.npy"), want)
    verify_table(tmp_path / "l1.npy", progress=False)


def test_quantised_random_rows_are_finite_and_deterministic(tmp_path):
    q = RowQuantization(values=32, block=32)
    src = RandomSource(5000, q.packed_bytes, dtype="uint8", seed=3, quantization=q)
    create_table(tmp_path / "a.npy", src, chunk_bytes=4096, progress=False)
    create_table(tmp_path / "b.npy", src, progress=False)
    a = np.load(tmp_path / "a.npy")
    assert np.array_equal(a, np.load(tmp_path / "b.npy"))  # chunking never changes the rows
    values = dequantize_rows(torch.from_numpy(a), q, torch.float32)
    assert torch.isfinite(values).all() and values.abs().max() <= 448 * 2**8
    assert read_manifest(tmp_path / "a.npy").quantization == q


def test_bad_quantised_sources_name_the_tensor_and_leave_nothing(tmp_path):
    weight = SafetensorsSource(_golden_tables(), "layers.1.engram.embed.weight")
    scale = SafetensorsSource(_golden_tables(), "layers.1.engram.embed.scale")
    other = SafetensorsSource(_golden_tables(), "layers.14.engram.embed.scale")
    with pytest.raises(
        TableFormatError, match=r"'layers.1.engram.embed.scale'.*dtype F8_E8M0; expected F8_E4M3"
    ):
        create_table(tmp_path / "x.npy", PackedSafetensorsSource(scale, scale), progress=False)
    with pytest.raises(
        TableFormatError, match=r"scales 'layers.14.engram.embed.scale' \[5014, 8\] do not fit"
    ):
        create_table(tmp_path / "x.npy", PackedSafetensorsSource(weight, other), progress=False)
    with pytest.raises(TableFormatError, match="needs uint8 rows of 264 bytes"):
        create_table(
            tmp_path / "x.npy", np.zeros((4, 256), np.uint8), quantization=Q, progress=False
        )
    with pytest.raises(TableFormatError, match="uint8 tables hold packed quantised rows"):
        create_table(
            tmp_path / "x.npy", np.zeros((4, 264), np.float32), dtype="uint8", progress=False
        )
    # uint8 rows without their layout: the table served its raw code and scale bytes as rows
    with pytest.raises(TableFormatError, match="uint8 rows without their quantization"):
        create_table(tmp_path / "x.npy", np.zeros((4, 264), np.uint8), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_manifest_of_uint8_rows_without_their_layout_is_refused(tmp_path):
    import json

    path = tmp_path / "t.npy"
    create_table(path, np.zeros((4, 264), np.uint8), quantization=Q, progress=False)
    manifest = tmp_path / "t.npy.manifest.json"
    doc = json.loads(manifest.read_text())
    del doc["quantization"]
    manifest.write_text(json.dumps(sealed(doc)))
    with pytest.raises(
        TableFormatError, match="field 'quantization' is '<missing>'; expected the layout"
    ):
        read_manifest(path)


@pytest.mark.parametrize(("column", "byte"), [(3, 0x7F), (40, 0xFF), (64, 0xFF)])
def test_packed_rows_with_a_nan_code_or_scale_are_refused_and_leave_nothing(tmp_path, column, byte):
    """A NaN fp8 code or scale byte was written and served as NaN rows, where float rows with a
    NaN are refused."""
    q = RowQuantization(values=64, block=32)
    rows = quantize_rows(torch.randn(6, 64), q).numpy()
    rows[4, column] = byte
    what = "scale byte" if column >= 64 else "fp8 code"
    with pytest.raises(TableFormatError, match=rf"source row 4 column {column} is {what} "):
        create_table(tmp_path / "t.npy", rows, quantization=q, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_packed_rows_that_dequantise_to_inf_are_refused_and_extremes_are_kept(tmp_path):
    """Code 0x7E (448) with scale byte 0xFE (2**127), finite bytes that lookups dequantised to
    inf (quantize_rows once made them of an inf): such a table was written and served inf rows."""
    q = RowQuantization(values=64, block=32)
    rows = quantize_rows(torch.randn(6, 64), q).numpy()
    rows[4, 40], rows[4, 65] = 0x7E, 0xFE
    with pytest.raises(
        TableFormatError,
        match=r"source row 4 column \d+ is fp8 code 0x.. with scale byte 0xfe \(column 65\), "
        r"which dequantise past bfloat16's range .* to inf",
    ):
        create_table(tmp_path / "t.npy", rows, quantization=q, progress=False)
    assert list(tmp_path.iterdir()) == []
    # the extremes that stay finite: -0.0 and 448 codes, scale bytes 0 and 246 (448 * 2**119),
    # and scale byte 254 (2**127) over codes below 2
    rows = quantize_rows(torch.randn(6, 64), q).numpy()
    rows[0, :4], rows[0, 64:] = [0x80, 0x7E, 0xFE, 0x00], [0x00, 246]
    rows[1, 32:64], rows[1, 65] = 0x38, 0xFE  # 1.0 x 2**127
    create_table(tmp_path / "t.npy", rows, quantization=q, progress=False)
    read = dequantize_rows(torch.from_numpy(rows), q)
    assert bool(torch.isfinite(read).all()) and read[0, 1] == 448 * 2.0**-127


def test_the_scale_is_the_smallest_power_of_two_that_holds_the_block():
    """A block whose largest magnitude was one float32 step past 448 * 2**k got scale 2**k (the
    division by 448 and the log2 rounded): its largest value saturated to 448 * 2**k instead of
    taking the next scale. Every scale byte is now the smallest with amax <= 448 * 2**e."""
    quant = RowQuantization(values=32, block=32)
    for k in range(-120, 118):
        top = np.float32(448.0 * 2.0**k)
        past, half_past = np.nextafter(top, np.float32(np.inf)), np.nextafter(top / 2, top)
        for amax, want in ((past, k + 1), (top, k), (half_past, k), (top / 2, k - 1)):
            row = torch.zeros(1, 32)
            row[0, 3] = -float(amax)
            assert int(quantize_rows(row, quant)[0, -1]) - 127 == want, (k, float(amax))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_quantize_refuses_integer_rows_it_rounded_twice(dtype):
    """Integer rows went through float32's nearest rounding, then e4m3's: 2**30 + 2**26 + 1
    became the midpoint 2**30 + 2**26, then the even code 2**30, not the nearest, 1.125 * 2**30
    (float64 rows of that value round once, to it); bool rows were quantised as 0 and 1."""
    q = RowQuantization(values=2, block=2)
    x = torch.tensor([[2**30 + 2**26 + 1, 0]]).to(dtype)
    with pytest.raises(ValueError, match=rf"quantize_rows: rows of {dtype}; expected floating"):
        quantize_rows(x, q)
    exact = torch.tensor([[2**30 + 2**26 + 1, 0]], dtype=torch.float64)
    assert dequantize_rows(quantize_rows(exact, q), q, torch.float64).tolist() == [
        [1.125 * 2**30, 0]
    ]
