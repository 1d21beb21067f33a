"""DeepSeek-V4.1's Engram forward against the reference's golden case (layer 1, case 2's ids)."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from tests.conftest import golden_dir
from tiered_store import StoreConfig, TieredStore
from tiered_store.engram.backend import InMemoryTable, PackedInMemoryTable
from tiered_store.engram.v41_module import V41Engram
from tiered_store.errors import ConfigError, RowIdError
from tiered_store.quantization import RowQuantization, dequantize_rows, pack_rows, quantize_rows
from tiered_store.table_format import PackedSafetensorsSource, SafetensorsSource, create_table

Q = RowQuantization(values=256, block=32)


@pytest.fixture(scope="module")
def golden():
    root = golden_dir("v41/golden_v41.npz") / "v41"
    return np.load(root / "golden_v41.npz")


def _bf16(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.astype(np.int16)).view(torch.bfloat16)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 units in the last place (same-sign values)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    return int((ia - ib).abs().max())


@pytest.fixture(scope="module")
def layer(golden):
    packed = pack_rows(golden["layer1_embed_weight_u8"], golden["layer1_embed_scale_u8"])
    table = InMemoryTable(dequantize_rows(torch.from_numpy(packed), Q))
    engram = V41Engram(table, num_heads=24, dim=16, hc_mult=4, norm_eps=1e-20)
    with torch.no_grad():
        engram.wkv.copy_(_bf16(golden["fwd_wkv_weight_bf16bits"]))
        engram.q_weight.copy_(_bf16(golden["fwd_q_weight_bf16bits"]))
        engram.k_weight.copy_(_bf16(golden["fwd_k_weight_bf16bits"]))
    return engram


def test_forward_matches_the_reference_to_one_bf16_ulp(golden, layer):
    x = _bf16(golden["fwd_x_bf16bits"])
    ids = torch.from_numpy(golden["fwd_row_ids"])
    mask = torch.from_numpy(golden["fwd_token_mask"])
    with torch.no_grad():
        kv = layer.project(layer.table.lookup(ids))
        out = layer(x, ids, mask)
    assert _ulps(kv, _bf16(golden["fwd_kv_bf16bits"])) <= 1
    assert _ulps(out, _bf16(golden["fwd_out_bf16bits"])) <= 1
    assert torch.equal(out[~mask], x[~mask])  # dead tokens pass through unchanged


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_a_cpu_token_mask_and_cpu_row_ids_are_taken(golden, layer):
    # the mask a tokenizer gives is on the CPU, as the row ids the hasher makes
    x = _bf16(golden["fwd_x_bf16bits"])
    ids = torch.from_numpy(golden["fwd_row_ids"])
    mask = torch.from_numpy(golden["fwd_token_mask"])
    on_gpu = copy.deepcopy(layer).cuda()
    with torch.no_grad():
        want, got = layer(x, ids, mask), on_gpu(x.cuda(), ids, mask)
    assert got.is_cuda
    torch.testing.assert_close(
        got.cpu(), want
    )  # bf16's tolerance: the GPU's matmul may round apart
    assert torch.equal(got.cpu()[~mask], x[~mask])


def test_row_ids_or_token_mask_of_another_batch_or_length_are_refused(golden, layer):
    x = _bf16(golden["fwd_x_bf16bits"])  # [B=2, T=24, hc, dim]
    ids = torch.from_numpy(golden["fwd_row_ids"])
    mask = torch.from_numpy(golden["fwd_token_mask"])
    with torch.no_grad():  # each broadcast against x without an error
        for bad in (ids[:1], ids[:, :1], ids[:1, :1]):
            with pytest.raises(ConfigError, match=re.escape(f"row_ids: shape {tuple(bad.shape)}")):
                layer(x, bad, mask)
        for bad in (mask[:1], mask[:, :1]):
            with pytest.raises(
                ConfigError, match=re.escape(f"token_mask: shape {tuple(bad.shape)}")
            ):
                layer(x, ids, bad)


def test_a_token_mask_not_bool_is_refused(golden, layer):
    x = _bf16(golden["fwd_x_bf16bits"])
    ids = torch.from_numpy(golden["fwd_row_ids"])
    mask = torch.from_numpy(golden["fwd_token_mask"])
    for bad in (mask.long(), mask.float()):  # torch.where's raw RuntimeError before
        with pytest.raises(ConfigError, match=rf"token_mask: got {bad.dtype}; expected bool"):
            layer(x, ids, bad)
    for bad in (mask.numpy(), mask.tolist()):  # "got bool; expected bool" for an array before
        name = type(bad).__name__
        with pytest.raises(ConfigError, match=rf"token_mask: got a {name}; expected a bool torch"):
            layer(x, ids, bad)
    for bad, what in (  # torch's bare error from .to, .shape or torch.where before
        (mask.to("meta"), "is on the meta device"),
        (torch.nested.nested_tensor(list(mask)), "is a nested tensor"),
        (mask.to_sparse(), "has layout torch.sparse_coo"),
    ):
        with pytest.raises(ConfigError, match=rf"token_mask: tensor bool .* {what}"):
            layer(x, ids, bad)


def test_from_the_reference_kv_the_output_is_bit_exact(golden, layer):
    x = _bf16(golden["fwd_x_bf16bits"])
    mask = torch.from_numpy(golden["fwd_token_mask"])
    kv = _bf16(golden["fwd_kv_bf16bits"])
    keys = kv[..., :64].unflatten(-1, (4, 16))
    with torch.no_grad():
        gate = layer.gate(x, keys, mask)
        out = (x.float() + gate.unsqueeze(-1) * kv[..., 64:].float().unsqueeze(-2)).to(x.dtype)
        out = torch.where(mask[..., None, None], out, x)
    # the gate differs from the reference's float32 gate by at most one unit in the last place
    # (summation order), which never changes the bf16 output
    assert float((gate - torch.from_numpy(golden["fwd_gate_f32"])).abs().max()) <= 2**-24
    assert torch.equal(out.view(torch.int16), _bf16(golden["fwd_out_bf16bits"]).view(torch.int16))


def test_a_float64_stream_is_not_rounded_through_float32(golden, layer):
    """V41Engram summed x + gate * value in float32 whatever the stream's dtype, so a float64
    stream came back rounded to float32 even where the value was 0. It keeps float64 now (the
    bf16 and float32 paths, the reference's, stay float32: the golden tests above)."""
    x = _bf16(golden["fwd_x_bf16bits"]).double() * (1 + 2**-40)  # no float32 holds these
    ids = torch.from_numpy(golden["fwd_row_ids"])
    mask = torch.from_numpy(golden["fwd_token_mask"])
    silent = copy.deepcopy(layer)
    with torch.no_grad():
        silent.wkv[64:] = 0  # the value rows: x + gate * 0
        assert torch.equal(silent(x, ids, mask), x)
        out = layer(x, ids, mask)
    assert out.dtype == torch.float64
    reference = _bf16(golden["fwd_out_bf16bits"]).double()
    assert torch.allclose(out, reference, rtol=2**-7, atol=0)  # the bf16 output, to its ulp


def test_both_table_backends_give_the_same_output(golden, layer, tmp_path):
    tables = (
        golden_dir("v41/golden_v41_tables.safetensors") / "v41" / "golden_v41_tables.safetensors"
    )
    path = tmp_path / "layer1.npy"
    create_table(
        path,
        PackedSafetensorsSource(
            SafetensorsSource(tables, "layers.1.engram.embed.weight"),
            SafetensorsSource(tables, "layers.1.engram.embed.scale"),
        ),
        progress=False,
    )
    x = _bf16(golden["fwd_x_bf16bits"])
    ids = torch.from_numpy(golden["fwd_row_ids"])
    mask = torch.from_numpy(golden["fwd_token_mask"])
    config = StoreConfig.from_dict(
        {
            "table": {"path": str(path), "out_of_range": "zero"},
            "tiers": {"hot": {"capacity": "2%"}, "warm": {"capacity": "10%"}},
        }
    )
    outputs = []
    with TieredStore(config) as store:
        for backend in (PackedInMemoryTable.from_table(str(path)), store):
            engram = V41Engram(backend, num_heads=24, dim=16, hc_mult=4)
            engram.load_state_dict(layer.state_dict(), strict=False)
            with torch.no_grad():
                outputs.append(engram(x, ids, mask, backend.prefetch(ids)))
    assert torch.equal(outputs[0], outputs[1])
    assert _ulps(outputs[0], _bf16(golden["fwd_out_bf16bits"])) <= 1


def test_the_packed_table_refuses_row_ids_not_integers_and_reads_uint8_ids_as_ids():
    # before: bool ids silently read rows 0 and 1, float ids failed with torch's bare IndexError
    # and uint8 ids were taken as a boolean mask (wrong rows, or an IndexError on the shape)
    quant = RowQuantization(values=8, block=4)
    table = PackedInMemoryTable(quantize_rows(torch.randn(4, 8), quant), quant)
    engram = V41Engram(table, num_heads=2, dim=4, hc_mult=2)
    x = torch.randn(1, 2, 2, 4, dtype=torch.bfloat16)
    for bad in (torch.tensor([[True, False]]), torch.tensor([[1.0, 2.0]])):
        with pytest.raises(RowIdError, match=rf"ids: dtype {bad.dtype}; expected an integer"):
            table.lookup(bad)
        with pytest.raises(RowIdError, match=rf"ids: dtype {bad.dtype}"):
            engram(x, bad.reshape(1, 1, 2).expand(1, 2, 2))
    nested = torch.nested.nested_tensor([torch.tensor([[0, 1], [2, 3]])])
    with pytest.raises(RowIdError, match=r"row_ids: tensor int64 nested \(1 tensors\) is a nested"):
        engram(x, nested)  # torch's 'NestedTensorImpl doesn't support sizes' before
    ids = torch.tensor([3, 0, 1, 3])  # as many ids as rows: a mask of that shape indexes
    want = table.lookup(ids)
    for dtype in (torch.uint8, torch.int32, torch.int16):
        assert torch.equal(table.lookup(ids.to(dtype)), want)


def test_the_packed_table_names_a_numpy_array_given_for_its_rows():
    # before: 'packed: got uint8 (4, 10); expected uint8 [rows, 10]', then not a tensor
    quant = RowQuantization(values=8, block=4)
    packed = quantize_rows(torch.randn(4, 8), quant)
    with pytest.raises(ConfigError, match=r"packed: got a numpy.ndarray; expected a torch.Tensor"):
        PackedInMemoryTable(packed.numpy(), quant)
    with pytest.raises(ConfigError, match=r"packed: got torch.uint8 \(4, 9\); expected a torch"):
        PackedInMemoryTable(packed[:, :9], quant)


def test_a_packed_table_of_no_rows_is_refused_naming_its_shape():
    # before: taken, and every lookup died in torch's bare 'index is out of bounds for dimension
    # with size 0' where the docs promise all-zero rows for ids outside the table
    quant = RowQuantization(values=8, block=4)
    with pytest.raises(
        ConfigError, match=r"packed: got torch.uint8 \(0, 10\); expected at least one"
    ):
        PackedInMemoryTable(torch.zeros(0, 10, dtype=torch.uint8), quant)


def test_a_dead_tokens_gate_is_zero_even_when_its_row_is_nan():
    # before: the gate was multiplied by the mask, so a NaN row (scale byte 255) gave NaN * 0
    quant = RowQuantization(values=8, block=4)
    packed = quantize_rows(torch.randn(4, 8), quant)
    packed[3, 8] = 255  # NaN, as the reference reads the edge byte
    layer = V41Engram(PackedInMemoryTable(packed, quant), num_heads=2, dim=4, hc_mult=2)
    x = torch.randn(1, 2, 2, 4, dtype=torch.bfloat16)
    ids, mask = torch.tensor([[[3, 2], [3, 1]]]), torch.tensor([[False, True]])
    with torch.no_grad():
        kv = layer.project(layer.table.lookup(ids))
        gate = layer.gate(x, kv[..., :8].unflatten(-1, (2, 4)), mask)
        out = layer(x, ids, mask)
    assert torch.equal(gate[0, 0], torch.zeros(2)) and gate[0, 1].isnan().all()  # live: as given
    assert torch.equal(out[0, 0], x[0, 0])


def test_row_ids_as_a_list_are_read_as_the_table_reads_them_and_x_must_be_a_tensor():
    # before: a list of row ids (which the table's lookup takes) ended in a raw AttributeError
    # ('list' object has no attribute 'shape'), and so did x given as a list; a NumPy x failed
    # in torch.promote_types after the table was read
    quant = RowQuantization(values=8, block=4)
    layer = V41Engram(
        PackedInMemoryTable(quantize_rows(torch.randn(4, 8), quant), quant),
        num_heads=2,
        dim=4,
        hc_mult=2,
    )
    x = torch.randn(1, 2, 2, 4, dtype=torch.bfloat16)
    ids = torch.tensor([[[3, 2], [0, 1]]])
    with torch.no_grad():
        want = layer(x, ids)
        assert torch.equal(layer(x, ids.tolist()), want)
        assert torch.equal(layer(x, ids.numpy()), want)  # the hasher's output for NumPy ids
        for bad in (x.tolist(), x.float().numpy()):
            name = type(bad).__name__
            with pytest.raises(ConfigError, match=rf"x: got a {name}; expected a torch.Tensor"):
                layer(bad, ids)


def test_a_zero_dot_gates_as_copysign_does_not_as_sign():
    # the reference's gate is sigmoid(copysign(sqrt(max(|dot|, 1e-6)), dot)): a dot of exactly 0
    # (an all-zero stream) gives sigmoid(+1e-3), where sign(dot) * sqrt(...) gives sigmoid(0)
    quant = RowQuantization(values=8, block=4)
    layer = V41Engram(
        PackedInMemoryTable(quantize_rows(torch.randn(4, 8), quant), quant),
        num_heads=2,
        dim=4,
        hc_mult=2,
    )
    x = torch.zeros(1, 2, 2, 4)
    with torch.no_grad():
        gate = layer.gate(x, torch.randn(1, 2, 2, 4), torch.ones(1, 2, dtype=torch.bool))
    assert torch.equal(gate, torch.sigmoid(torch.tensor(1e-6).sqrt()).expand(1, 2, 2))
    assert float(gate[0, 0, 0]) > 0.5  # sign(0) * sqrt(...) = 0 would give exactly 0.5


@pytest.mark.parametrize("eps", [0, 0.0, -1e-6, float("nan"), float("inf"), "1e-6", True])
def test_a_norm_eps_that_is_not_a_positive_number_is_refused(eps):
    # before: taken as given; 0 made an all-zero stream's gate NaN (0 * rsqrt(0)), a negative
    # eps made NaN gates wherever mean(h^2) < |eps|, a string failed inside the forward
    quant = RowQuantization(values=8, block=4)
    table = PackedInMemoryTable(quantize_rows(torch.randn(4, 8), quant), quant)
    with pytest.raises(ConfigError, match=rf"norm_eps: expected a finite number > 0, got {eps!r}"):
        V41Engram(table, num_heads=2, dim=4, hc_mult=2, norm_eps=eps)


@pytest.mark.parametrize("eps", [1e-46, 1e-50, 2.0**-150])
def test_a_norm_eps_that_float32_rounds_to_zero_is_refused(eps):
    # before: taken (a finite number > 0), but the gate adds it in float32, where it is 0: an
    # all-zero live stream's gate was NaN (0 * rsqrt(0)), as with norm_eps 0
    quant = RowQuantization(values=8, block=4)
    table = PackedInMemoryTable(quantize_rows(torch.randn(4, 8), quant), quant)
    with pytest.raises(ConfigError, match=rf"^norm_eps: got {eps!r}, which float32 .* rounds to 0"):
        V41Engram(table, num_heads=2, dim=4, hc_mult=2, norm_eps=eps)
    layer = V41Engram(table, num_heads=2, dim=4, hc_mult=2, norm_eps=2.0**-149)  # the smallest
    with torch.no_grad():
        out = layer(torch.zeros(1, 2, 2, 4, dtype=torch.bfloat16), torch.tensor([[[0, 1], [2, 3]]]))
    assert not out.isnan().any()


def test_a_single_row_id_is_refused_naming_the_shapes_expected():
    """One row id (a 0-d tensor, or an int, which the table's lookup takes) ended in a bare
    IndexError (tuple index out of range) where the shapes are compared; it is refused as any
    other row ids of the wrong shape."""
    layer = V41Engram(InMemoryTable(torch.randn(50, 8)), num_heads=3, dim=16, hc_mult=2)
    x = torch.randn(1, 5, 2, 16)
    for one in (torch.tensor(3), 3):
        with pytest.raises(ConfigError, match=r"row ids \(\); expected \[\.\.\., 2, 16\] and"):
            layer(x, one)
