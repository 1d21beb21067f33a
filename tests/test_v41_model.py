"""An EngramLM of DeepSeek-V4.1's geometry: V41Engram layers over packed fp8 tables, identical on
both table backends (prefill and decode), dead tokens passed through, decode equal to one pass."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tiered_store.engram import NgramHasher
from tiered_store.engram.backend import PackedInMemoryTable
from tiered_store.engram.checkpoint import open_tables, table_file, table_metadata
from tiered_store.engram.model import EngramLM, ModelConfig
from tiered_store.engram.pipeline import PrefetchPipeline
from tiered_store.engram.v41_module import V41Engram
from tiered_store.errors import ConfigError
from tiered_store.quantization import RowQuantization
from tiered_store.store import TieredStore
from tiered_store.table_format import RandomSource, create_table

# The release's layers, orders and heads (Engram at 1 and 14; 3 orders x 8 heads), small tables
# and 32-wide rows (32 fp8 values + 1 scale byte).
V41 = {
    "engram": {
        "geometry": "deepseek-v4.1",
        "engram_vocab_size": 211,
        "max_ngram_size": 4,
        "n_head_per_ngram": 8,
        "n_embed_per_ngram": 8 * 32,
        "layer_ids": [1, 14],
    },
    "backbone": {"hidden_size": 32, "hc_mult": 4, "num_layers": 15},
    "transformer": {"num_attention_heads": 4},
}
QUANT = RowQuantization(values=32, block=32)
STORE = {
    "tiers": {"hot": {"capacity": "2%"}, "warm": {"capacity": "8%"}, "cold": {"io": "pread"}},
    "prefetch": {"depth": 2},
}
TEXT = (
    "def lookup(table, ids):\n    return table[ids]  # the hot rows repeat\n"
    "The cold tier holds the long tail; the hot tier holds what repeats.\n"
)


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig.from_dict(V41)


@pytest.fixture(scope="module")
def hasher(config) -> NgramHasher:
    return NgramHasher(config.engram)


@pytest.fixture(scope="module")
def table_paths(hasher, tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("v41-tables")
    paths = {}
    for layer in hasher.layer_ids:
        paths[layer] = table_file(directory, layer)
        source = RandomSource(
            hasher.table_rows(layer), QUANT.packed_bytes, "uint8", seed=layer, quantization=QUANT
        )
        create_table(paths[layer], source, metadata=table_metadata(hasher, layer), progress=False)
    return paths


@pytest.fixture(scope="module")
def tokens(hasher) -> torch.Tensor:
    return torch.from_numpy(np.tile(hasher.tokenizer.encode(TEXT), 8)[: 3 * 40].reshape(3, 40))


@pytest.fixture
def model(config, hasher, table_paths) -> EngramLM:
    torch.manual_seed(0)
    memory = {layer: PackedInMemoryTable.from_table(str(p)) for layer, p in table_paths.items()}
    return EngramLM(config, hasher=hasher, tables=memory).eval()


@pytest.fixture
def stores(hasher, table_paths):
    opened = open_tables(table_paths, hasher, STORE)
    yield opened
    for store in opened.values():
        store.close()


def _decode(model: EngramLM, tokens: torch.Tensor, prompt: int) -> list[torch.Tensor]:
    """Logits of the prompt's last position, then of each later token fed one per step."""
    state, cache = model.hasher.new_state(tokens.shape[0]), model.new_cache()
    outputs = []
    with torch.no_grad():
        for start, stop in [(0, prompt)] + [(t, t + 1) for t in range(prompt, tokens.shape[1])]:
            ids = tokens[:, start:stop]
            batch = model.prefetch(ids, state=state)
            outputs.append(model(ids, prefetched=batch, cache=cache, logits="last"))
    return outputs


def test_v41_geometry_builds_v41_engram_layers(model, hasher):
    layers = model.engram_layers
    assert sorted(layers) == [1, 14]
    for layer_id, engram in layers.items():
        assert isinstance(engram, V41Engram) and engram.num_heads == 24
        assert engram.table.rows == hasher.table_rows(layer_id) and engram.table.dim == 32
    assert "layers.1.engram.wkv" in model.state_dict()


def test_prefill_logits_are_bit_identical_on_both_backends(model, stores, tokens):
    with torch.no_grad():
        memory = model(tokens)
        model.set_tables(stores)
        for _ in range(2):  # cold, then from the cache tiers
            assert torch.equal(model(tokens, prefetched=model.prefetch(tokens)), memory)
    stats = stores[1].stats()
    assert stats["cold"]["rows_read"] > 0 and stats["hot"]["hits"] > 0


def test_decode_logits_are_bit_identical_on_both_backends(model, stores, tokens):
    memory = _decode(model, tokens, prompt=24)
    model.set_tables(stores)
    tiered = _decode(model, tokens, prompt=24)
    assert len(tiered) == 17
    for a, b in zip(memory, tiered, strict=True):
        assert torch.equal(a, b)
    assert all(isinstance(t, TieredStore) for t in model.tables.values())


def test_pipeline_decode_prefetches_each_step_and_counts_its_stall(model, stores, tokens):
    want = _decode(model, tokens, prompt=24)
    model.set_tables(stores)
    outputs, stats = PrefetchPipeline(model).decode(tokens, prompt=24)
    assert all(torch.equal(a, b) for a, b in zip(want, outputs, strict=True))
    assert stats.step_seconds.shape == stats.stall_seconds.shape == (16,)
    assert (stats.stall_seconds <= stats.lookup_seconds + 1e-9).all()
    assert (stats.store_seconds < stats.step_seconds).all()
    for layer in (1, 14):  # one prefetch per decode step, 3 sequences x 24 heads each
        assert stats.tables[layer]["prefetch"]["handles"] == 16
        assert stats.tables[layer]["hot"]["lookups"] == 16 * 3 * 24
    summary = stats.summary()
    assert summary["steps"] == 16 and 0 <= summary["stall_share_of_step"] < 1
    with pytest.raises(ConfigError, match=r"prompt: expected an integer in \[1, 39\]"):
        PrefetchPipeline(model).decode(tokens, prompt=40)


def test_decode_with_hash_state_and_cache_equals_one_pass(model, tokens):
    steps = _decode(model, tokens, prompt=24)
    with torch.no_grad():
        full = model(tokens)
    want = torch.stack([full[:, 23]] + [full[:, t] for t in range(24, 40)])
    # other GEMM shapes, so not bit-exact; the row ids are (tested in test_v41_addressing)
    torch.testing.assert_close(torch.stack(steps), want, rtol=1e-4, atol=1e-4)


def test_dead_tokens_pass_through_the_engram_layer_unchanged(model, tokens):
    mask = torch.ones(tokens.shape, dtype=torch.bool)
    mask[:, 5:9] = False
    mask[1, 20:] = False
    seen = {}

    def hook(module, args, output):
        seen[module] = (args[0], output)

    handles = [e.register_forward_hook(hook) for e in model.engram_layers.values()]
    try:
        with torch.no_grad():
            model(tokens, prefetched=model.prefetch(tokens, token_mask=mask))
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == 2
    for before, after in seen.values():
        assert torch.equal(after[~mask], before[~mask])
        assert not torch.equal(after[mask], before[mask])


def test_a_numpy_mask_with_negative_strides_is_taken(model, tokens):
    mask = np.ones(tokens.shape, dtype=bool)
    mask[:, 30:] = False
    batch = model.hash(tokens, token_mask=mask[:, ::-1])  # as ids with negative strides are
    assert torch.equal(batch.token_mask, torch.from_numpy(mask[:, ::-1].copy()))
    one = mask[:1, :1][:, ::-1]  # one element: NumPy calls it contiguous
    assert model.hash(tokens[:1, :1], token_mask=one).token_mask.tolist() == [[True]]
    with pytest.raises(
        ConfigError, match=r"token_mask: got torch.bool \(\); expected bool \(1, 1\)"
    ):
        model.hash(tokens[:1, :1], token_mask=np.array(True))  # a scalar, named as one


def test_a_mask_buffer_refilled_after_prefetch_leaves_the_batch_as_hashed(model, tokens):
    """The batch keeps the mask its rows were hashed with, as it keeps its ids: a caller that
    refills its mask buffer (NumPy or torch) before the forward gets the logits of that mask."""
    mask = np.ones(tokens.shape, dtype=bool)
    mask[:, 5:9] = False
    with torch.no_grad():
        want = model(tokens, prefetched=model.prefetch(tokens, token_mask=mask.copy()))
        for buffer in (mask.copy(), torch.from_numpy(mask.copy())):
            batch = model.prefetch(tokens, token_mask=buffer)
            buffer[:] = True  # the next request's mask
            torch.testing.assert_close(model(tokens, prefetched=batch), want, atol=0, rtol=0)


def test_bad_tables_masks_and_positions_are_refused(model, config, hasher, tokens):
    wrong = PackedInMemoryTable(torch.zeros(10, QUANT.packed_bytes, dtype=torch.uint8), QUANT)
    with pytest.raises(ConfigError, match=r"tables\[14\]: a table of 10 rows x 32; expected"):
        EngramLM(config, hasher=hasher, tables={14: wrong})
    with pytest.raises(ConfigError, match=r"tables\[1\]: a table of 10 rows x 32"):
        model.set_tables({1: wrong})
    with pytest.raises(ConfigError, match=r"token_mask: got torch.int64 \(3, 2\); expected bool"):
        model.prefetch(tokens, token_mask=torch.ones(3, 2, dtype=torch.int64))
    nested = torch.nested.nested_tensor(list(torch.ones(tokens.shape, dtype=torch.bool)))
    with pytest.raises(ConfigError, match=r"token_mask: tensor bool nested .* is a nested tensor"):
        model.prefetch(tokens, token_mask=nested)  # torch's bare error from .shape before
    state, cache = hasher.new_state(3), model.new_cache()
    with torch.no_grad():
        model(tokens[:, :8], prefetched=model.prefetch(tokens[:, :8], state=state), cache=cache)
        with pytest.raises(ConfigError, match="hashed at position 0 but the cache holds 8"):
            model(tokens[:, 8:9], cache=cache)
    bad = {**V41, "engram": {**V41["engram"], "n_embed_per_ngram": 8 * 16}}
    with pytest.raises(ConfigError, match="rows of 16 values per head; expected a multiple of 32"):
        EngramLM(ModelConfig.from_dict(bad))


def test_a_v41_table_built_for_another_seed_is_refused_in_memory_and_tiered(
    model, config, hasher, tmp_path
):
    """A V4.1 runtime opening each layer's store as its table backend (README) was given rows
    hashed for another config in silence when the table had the same shape (another seed):
    PackedInMemoryTable.from_table and the TieredStore tell the layout their file records, and
    EngramLM refuses it naming the layer, the field and both values."""
    seeded = NgramHasher(config.engram.model_copy(update={"seed": 3}))
    path = table_file(tmp_path, 14)
    source = RandomSource(seeded.table_rows(14), QUANT.packed_bytes, "uint8", quantization=QUANT)
    create_table(path, source, metadata=table_metadata(seeded, 14), progress=False)
    refused = r"tables\[14\]: {}'s table built for seed=3, but this model's Engram layer 14 expects seed=0"
    memory = PackedInMemoryTable.from_table(str(path))
    assert memory.engram_layout == table_metadata(seeded, 14)["engram"]
    with pytest.raises(ConfigError, match=refused.format("PackedInMemoryTable")):
        EngramLM(config, hasher=hasher, tables={14: memory})
    with TieredStore.open({"table": {"path": str(path)}, **STORE}) as store:
        kept = model.tables[14]
        with pytest.raises(ConfigError, match=refused.format("TieredStore")):
            model.set_tables({14: store})
        assert model.tables[14] is kept
    unknown = PackedInMemoryTable(memory.packed, QUANT)  # the same rows, no layout told: taken
    assert EngramLM(config, hasher=hasher, tables={14: unknown}).tables[14] is unknown


def test_a_v41_model_is_refused_by_its_geometry_where_float_tables_are_written(
    model, tmp_path, capsys
):
    """save_tiered (convert_checkpoint), the demo and serve's checkpoint.create wrote a V4.1
    model's tables from its state_dict, which holds none (they are packed, in its tables): each
    failed on "...embedding.weight: missing from the checkpoint", the demo after building the
    model and reading its corpus. Each now names the geometry and convert-hf, before any work."""
    from tiered_store.cli import main
    from tiered_store.engram.checkpoint import save_tiered
    from tiered_store.serve.config import ServeConfig
    from tiered_store.serve.served_model import create_checkpoint

    refused = r"engram\.geometry 'deepseek-v4\.1' has packed fp8 tables, .*tiered-store convert-hf"
    with pytest.raises(ConfigError, match=refused):
        save_tiered(model, tmp_path / "saved")
    served = {"checkpoint": {"path": str(tmp_path / "served"), "create": True}, "model": V41}
    with pytest.raises(ConfigError, match=refused):
        create_checkpoint(ServeConfig.from_dict(served))
    (tmp_path / "demo.yaml").write_text(json.dumps(V41))
    work = tmp_path / "work"
    assert main(["demo", "--config", str(tmp_path / "demo.yaml"), "--workdir", str(work)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"engram\.geometry: 'deepseek-v4\.1' has packed fp8 tables", err), err
    assert "convert-hf" in err and "missing from the checkpoint" not in err
    assert not any((tmp_path / name).exists() for name in ("saved", "served", "work"))


def test_a_missing_v41_table_names_convert_hf(hasher, tmp_path):
    """A V4.1 layer's table that does not exist is made by `tiered-store convert-hf` (the error
    named `tiered-store init`, whose plain tables the layout check refuses)."""
    from tiered_store.table_format import TableNotFoundError

    with pytest.raises(TableNotFoundError, match=r"Engram layer 1: .*`tiered-store convert-hf`"):
        open_tables({1: table_file(tmp_path, 1)}, hasher, STORE)


_BUILD_PEAK = """
import json, resource, sys
from tiered_store.engram import NgramHasher
from tiered_store.engram.model import EngramLM, ModelConfig
config = ModelConfig.from_dict(json.loads(sys.argv[1]))
hasher = NgramHasher(config.engram)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = EngramLM(config, hasher=hasher)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"grown": grown, "rows": [int(model.tables[k].rows) for k in (1, 14)]}))
"""


def test_random_v41_tables_are_built_without_a_whole_float32_table(tmp_path):
    """A V4.1 model without tables drew each table's rows whole in float32 (4 B a value, 3 copies
    while quantising: 590 GB at the release's 384M rows x 128) to keep 33/32 B a value, past
    what check_model_memory allows for; the rows are now drawn in bounded chunks."""
    import subprocess
    import sys

    from tiered_store.serve.client import subprocess_env

    geometry = {**V41, "engram": {**V41["engram"], "engram_vocab_size": 100_003}}
    out = subprocess.run(
        [sys.executable, "-c", _BUILD_PEAK, json.dumps(geometry)],
        capture_output=True, text=True, timeout=300, env=subprocess_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    built = json.loads(out.stdout)
    rows = sum(built["rows"])
    assert rows > 4_800_000  # float32: 4 x 32 B a row, 310 MB a table
    assert built["grown"] < rows * QUANT.packed_bytes + (128 << 20), built


def test_the_memory_check_counts_v41_tables_packed_and_names_convert_hf():
    """check_model_memory counted V4.1's tables at 4 B a value (float32), 4x what the packed
    tables take: it refused models that fit, its message gave the wrong size and said only
    "expected a smaller model"."""
    from tiered_store.capacity import format_bytes
    from tiered_store.engram.model import check_model_memory

    engram = {**V41["engram"], "engram_vocab_size": 10**10, "n_embed_per_ngram": 8 * 128}
    with pytest.raises(ConfigError) as refused:
        check_model_memory(ModelConfig.from_dict({**V41, "engram": engram}))
    packed = 2 * 3 * 10**10 * 8 * (128 + 4)  # 2 layers x 3 orders x 8 heads, 128 B + 4 scales
    assert f"(Engram tables {format_bytes(packed)}, dense weights " in str(refused.value)
    assert str(refused.value).endswith(
        "expected a smaller model, or the tables of a converted checkpoint (tiered-store "
        "convert-hf) as tiered stores"
    )


def test_the_checkpoint_shapes_of_a_v41_model_are_its_dense_weights(config, hasher):
    """expected_checkpoint_shapes builds the model on the meta device; a V4.1 model's random
    tables were quantised there and failed with torch's 'Tensor.item() cannot be called on meta
    tensors'. Its tables stay outside the state_dict, so the shapes are the dense weights'."""
    from tiered_store.engram.checkpoint import expected_checkpoint_shapes

    shapes = expected_checkpoint_shapes(config, hasher)
    engram = {key: shape for key, shape in shapes.items() if ".engram." in key}
    heads, width = config.engram.num_heads, config.engram.head_dim
    hidden, hc = config.backbone.hidden_size, config.backbone.hc_mult
    assert engram == {
        f"layers.{layer}.engram.{name}": shape
        for layer in (1, 14)
        for name, shape in (
            ("wkv", ((hc + 1) * hidden, heads * width)),
            ("q_weight", (hc, hidden)),
            ("k_weight", (hc, hidden)),
        )
    }


def test_a_model_built_on_the_meta_device_names_its_tables_without_rows(
    config, hasher, table_paths, tokens
):
    """Built on the meta device (as expected_checkpoint_shapes builds it), a V4.1 model's tables
    hold no rows, and to_empty does not give them any (they are outside the model's tensors): its
    forward ended in torch's 'Cannot copy out of meta tensor; no data!'. The lookup now names the
    table and how to give the model one; set_tables makes it run."""
    with torch.device("meta"):
        model = EngramLM(config, hasher=hasher)
    model = model.to_empty(device="cpu")
    with pytest.raises(
        ConfigError,
        match=r"^PackedInMemoryTable: its packed rows, uint8 \(6660, 33\), are on the meta device "
        r".*EngramLM\(\.\.\., tables=\.\.\.\) or model\.set_tables",
    ):
        model(tokens[:1, :8])
    model.set_tables(
        {layer: PackedInMemoryTable.from_table(str(p)) for layer, p in table_paths.items()}
    )
    assert model(tokens[:1, :8]).shape[:2] == (1, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_token_mask_on_another_device_is_copied_once_a_forward(model, tokens):
    """Each V4.1 layer copied the batch's token mask to the model's device: a CPU model given
    ids (and so a mask) on the GPU waited for the device once per Engram layer. The mask is
    copied once a forward, and the logits are those of the ids on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaskCopies(TorchDispatchMode):
        """Counts copies of bool tensors off the GPU."""

        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            source = args[0] if args else None
            if (
                func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
                and isinstance(source, torch.Tensor)
                and source.dtype == torch.bool
            ):
                given = source if func is torch.ops.aten._to_copy.default else args[1]
                self.copies += given.device.type == "cuda"
            return func(*args, **(kwargs or {}))

    mask = torch.ones(tokens.shape, dtype=torch.bool)
    mask[:, 5] = False
    batch = model.hash(tokens.cuda(), mask.cuda())
    assert batch.token_mask.device.type == "cuda" and len(model.engram_layers) == 2
    with torch.no_grad(), MaskCopies() as counted:
        got = model(batch.input_ids, prefetched=batch, logits="last")
    assert counted.copies == 1
    with torch.no_grad():
        want = model(tokens, prefetched=model.hash(tokens, mask), logits="last")
    torch.testing.assert_close(got, want)
