"""A TieredStore over DeepSeek-V4.1's packed fp8 rows: packed in every tier, dequantised at the
gather exactly as the reference, all-zero rows for ids outside the table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import golden_dir
from tiered_store import StoreConfig, TieredStore
from tiered_store.errors import RowIdError
from tiered_store.prefetch import PrefetchHandleError
from tiered_store.table_format import PackedSafetensorsSource, SafetensorsSource, create_table


@pytest.fixture(scope="module")
def golden():
    return np.load(golden_dir("v41/golden_v41.npz") / "v41" / "golden_v41.npz")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    tables = (
        golden_dir("v41/golden_v41_tables.safetensors") / "v41" / "golden_v41_tables.safetensors"
    )
    path = tmp_path_factory.mktemp("v41") / "layer1.npy"
    source = PackedSafetensorsSource(
        SafetensorsSource(tables, "layers.1.engram.embed.weight"),
        SafetensorsSource(tables, "layers.1.engram.embed.scale"),
    )
    create_table(path, source, progress=False)
    return path


def open_store(path, io="pread", out_of_range="zero", hot=50, warm=300) -> TieredStore:
    return TieredStore(
        StoreConfig.from_dict(
            {
                "table": {"path": str(path), "out_of_range": out_of_range},
                "tiers": {"hot": {"capacity": hot}, "warm": {"capacity": warm}, "cold": {"io": io}},
            }
        )
    )


def _bits(rows: torch.Tensor) -> np.ndarray:
    return rows.view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("io", ["mmap", "pread", "direct"])
def test_lookups_equal_the_reference_gather_in_every_io_mode(golden, table, io):
    ids = torch.from_numpy(golden["lookup_layer1_ids"])
    want = golden["lookup_layer1_rows_bf16bits"]
    with open_store(table, io=io) as store:
        assert (store.rows, store.dim, store.row_width, store.dtype) == (
            1998,
            256,
            264,
            torch.bfloat16,
        )
        for _ in range(3):  # cold, then from warm and hot
            assert np.array_equal(_bits(store.lookup(ids)), want)
        handle = store.prefetch(ids)
        assert np.array_equal(_bits(store.lookup(ids, handle)), want)
        packed = store.lookup(ids, packed=True)
        assert packed.dtype == torch.uint8
        assert np.array_equal(packed.numpy(), golden["lookup_layer1_packed_u8"])
        stats = store.stats()
        assert stats["hot"]["hits"] > 0 and stats["warm"]["hits"] > 0


def test_tiers_hold_packed_rows(table):
    with open_store(table, hot=100, warm=400) as store:
        report = store.memory_report()
        assert report["hot_payload_bytes"] == 100 * 264
        assert report["warm_payload_bytes"] == 400 * 264


def test_the_whole_case_gather_as_the_module_sees_it(golden, table):
    with open_store(table) as store:
        rows = store.lookup(torch.from_numpy(golden["case0_layer1_row_ids"]))
    assert rows.shape == (*golden["case0_layer1_row_ids"].shape, 256)
    assert np.array_equal(_bits(rows), golden["case0_layer1_rows_bf16bits"])


def test_out_of_range_ids_are_an_error_unless_asked_for_zero_rows(table):
    with (
        open_store(table, out_of_range="error") as store,
        pytest.raises(
            RowIdError,
            match=r"value 1998 at flat position 1 is out of range; expected 0 <= id < 1,998",
        ),
    ):
        store.lookup(torch.tensor([0, 1998]))
    with open_store(table) as store:
        rows = store.lookup(torch.tensor([[-5, 3], [1998, 10**9]]))
        assert torch.equal(rows[0, 0], torch.zeros(256, dtype=torch.bfloat16))
        assert not rows[0, 1].eq(0).all() and rows[1].eq(0).all()


def test_a_handle_returns_the_form_it_was_prefetched_in(table):
    ids = torch.tensor([1, 2, 3])
    with open_store(table) as store:
        handle = store.prefetch(ids, packed=True)
        with pytest.raises(PrefetchHandleError, match="prefetched with packed=True"):
            store.lookup(ids, handle)
        assert store.lookup(ids, store.prefetch(ids, packed=True), packed=True).shape == (3, 264)
