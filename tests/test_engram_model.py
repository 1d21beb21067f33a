"""The Engram LM: both table backends bit-identical, golden Engram layer inside the LM, training,
checkpoint conversion and the errors raised before any compute."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import golden_dir
from tiered_store.engram import EMBEDDING_KEY, InMemoryTable, NgramHasher, TableBackend
from tiered_store.engram.checkpoint import (
    check_table_file,
    convert_checkpoint,
    expected_checkpoint_shapes,
    from_reference_layout,
    load_table_in_memory,
    load_tiered_model,
    open_tables,
    save_tiered,
    table_file,
)
from tiered_store.engram.layout import table_metadata
from tiered_store.engram.model import EngramLM, HyperConnection, ModelConfig
from tiered_store.errors import ConfigError, RowIdError, StoreClosedError
from tiered_store.store import TieredStore
from tiered_store.table_format import create_table

TINY = {
    "engram": {
        "engram_vocab_size": [2003, 3001],
        "n_embed_per_ngram": 64,
        "n_head_per_ngram": 4,
        "layer_ids": [1, 3],
    },
    "backbone": {"hidden_size": 64, "hc_mult": 4, "num_layers": 4},
    "transformer": {"num_attention_heads": 4},
}
STORE = {"tiers": {"hot": {"capacity": 300}, "warm": {"capacity": "10%"}}}
TEXT = (
    "def lookup(table, ids):\n    return table[ids]  # the hot rows repeat\n"
    "The cold tier holds the long tail; the hot tier holds what repeats.\n"
)


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig.from_dict(TINY)


@pytest.fixture(scope="module")
def hasher(config) -> NgramHasher:
    return NgramHasher(config.engram)


@pytest.fixture(scope="module")
def batches(hasher) -> list[torch.Tensor]:
    ids = np.tile(hasher.tokenizer.encode(TEXT), 20)
    return [torch.from_numpy(ids[i * 96 : (i + 1) * 96].reshape(3, 32).copy()) for i in range(4)]


@pytest.fixture
def model(config, hasher) -> EngramLM:
    torch.manual_seed(0)
    return EngramLM(config, hasher=hasher).eval()


@pytest.fixture
def converted(model, tmp_path):
    return save_tiered(model, tmp_path / "ckpt")


def test_tiered_store_is_a_table_backend(converted, hasher):
    stores = open_tables(converted.table_paths, hasher, STORE)
    try:
        for store in stores.values():
            assert isinstance(store, TieredStore) and isinstance(store, TableBackend)
    finally:
        for store in stores.values():
            store.close()


def test_forward_bit_identical_in_memory_and_tiered(model, converted, batches):
    with torch.no_grad():
        want = [model(ids) for ids in batches]
        # logits="last" projects [B, D] instead of [B, T, D]: a GEMM of another shape, whose float
        # sums need not equal a slice of the full one; compare it with the same path in memory
        want_last = [model(ids, logits="last") for ids in batches]
    tiered = load_tiered_model(converted.directory, store=STORE, hasher=model.hasher)
    try:
        assert all(isinstance(t, TieredStore) for t in tiered.tables.values())
        with torch.no_grad():
            for ids, expected, last in zip(batches, want, want_last, strict=True):
                assert torch.equal(tiered(ids), expected)  # hashed and prefetched at batch start
                batch = tiered.prefetch(ids)
                assert torch.equal(tiered(ids, prefetched=batch, logits="last"), last)
                assert torch.equal(
                    tiered(ids, prefetched=tiered.hash(ids)), expected
                )  # no prefetch
        stats = tiered.tables[1].stats()
        assert stats["prefetch"]["handles"] == 2 * len(batches)
        assert stats["hot"]["hits"] > 0 and stats["cold"]["rows_read"] > 0
    finally:
        tiered.close()


def test_swapping_tables_on_one_model_and_half_precision_tables(model, batches, tmp_path):
    converted = save_tiered(model, tmp_path / "bf16", dtype="bfloat16")
    memory = {i: load_table_in_memory(p) for i, p in converted.table_paths.items()}
    assert memory[1].weight.dtype == torch.bfloat16
    stores = open_tables(converted.table_paths, model.hasher, STORE)
    try:
        model.set_tables(memory)
        with torch.no_grad():
            want = model(batches[0])
        model.set_tables(stores)
        assert model.tables == stores
        with torch.no_grad():
            assert torch.equal(model(batches[0]), want)  # bf16 rows feed the fp32 model alike
    finally:
        model.close()
    assert all(s._closed for s in stores.values())


def test_engram_layer_in_the_lm_matches_golden(tmp_path):
    root = golden_dir("engram_forward.safetensors")
    meta = json.loads((root / "engram_forward.json").read_text())
    config = ModelConfig.from_dict(meta, ignore_unknown=True)
    golden = load_file(root / "engram_forward.safetensors")
    state = from_reference_layout(root / "engram_forward.safetensors", config.engram.layer_ids)
    hasher = NgramHasher(config.engram)
    memory = EngramLM(config, hasher=hasher)
    memory.load_state_dict(state, strict=False)  # Engram modules only; the rest stays random
    convert_checkpoint(state, config, tmp_path, strict=False, hasher=hasher)
    tiered = load_tiered_model(tmp_path, store=STORE, hasher=hasher, strict=False)
    try:
        for lm in (memory, tiered):
            batch = lm.prefetch(golden["input_ids"])
            for layer, engram in lm.engram_layers.items():
                with torch.no_grad():
                    out = engram(
                        golden[f"layer{layer}.hidden_states"],
                        row_ids=batch.row_ids[layer],
                        handle=batch.handles[layer],
                    )
                torch.testing.assert_close(out, golden[f"layer{layer}.output"], atol=1e-5, rtol=0)
        # the whole LM, with the same (random) backbone weights: both backends agree bit for bit
        tiered.load_state_dict(
            {k: v for k, v in memory.state_dict().items() if not k.endswith(EMBEDDING_KEY)}
        )
        with torch.no_grad():
            assert torch.equal(memory(golden["input_ids"]), tiered(golden["input_ids"]))
    finally:
        tiered.close()


def test_training_steps_reduce_loss_and_reach_dense_params(model, converted, batches):
    tiered = load_tiered_model(converted.directory, store=STORE, hasher=model.hasher).train()
    before = [np.load(p).copy() for p in converted.table_paths.values()]
    try:
        params = [p for p in tiered.parameters() if p.requires_grad]
        assert sum(p.numel() for p in params) == tiered.dense_parameters()  # tables: no params
        optimizer = torch.optim.AdamW(params, lr=3e-3)
        losses = []
        for _ in range(6):
            optimizer.zero_grad()
            loss = tiered.loss(batches[0])
            loss.backward()
            if not losses:
                for name, param in tiered.named_parameters():
                    assert param.grad is not None and param.grad.abs().sum() > 0, name
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.5, losses
    finally:
        tiered.close()
    for path, data in zip(converted.table_paths.values(), before, strict=True):
        assert np.array_equal(np.load(path), data)  # read-only: the table file is untouched


def test_in_memory_table_trains_too(model, batches):
    model.train()
    model.loss(batches[0]).backward()
    for layer, table in model.tables.items():
        grad = table.weight.grad
        # rows read before the last position (whose logits the loss does not use)
        touched = torch.unique(model.hash(batches[0]).row_ids[layer][:, :-1])
        assert grad is not None and grad[touched].abs().sum(dim=1).gt(0).all()


def test_hyper_connection_is_a_residual_at_init():
    hc = HyperConnection(hc_mult=4, branch=6)  # reads branch 6 % 4 = 2
    h = torch.randn(2, 3, 4, 8)
    out = hc(h, torch.tanh)
    torch.testing.assert_close(out, h + torch.tanh(h[:, :, 2]).unsqueeze(2))


def test_bad_token_ids_fail_before_any_lookup(converted, hasher, batches):
    tiered = load_tiered_model(converted.directory, store=STORE, hasher=hasher)
    try:
        bad = batches[0].clone()
        bad[1, 5] = 129280
        with pytest.raises(RowIdError, match=r"token id 129280 at index \(1, 5\)"):
            tiered(bad)
        with pytest.raises(RowIdError, match="integer token ids"):
            tiered(batches[0].float())
        with pytest.raises(ConfigError, match=r"input_ids: expected shape \[B, T\]"):
            tiered(batches[0][0])
        assert all(s.stats()["prefetch"]["handles"] == 0 for s in tiered.tables.values())
        batch = tiered.prefetch(batches[0])
        with pytest.raises(ConfigError, match="made for other input_ids"):
            tiered(batches[1], prefetched=batch)
        buffer = batches[0].clone()  # one buffer, refilled in place after its prefetch
        batch = tiered.prefetch(buffer)
        buffer.copy_(batches[1])
        with pytest.raises(ConfigError, match="made for other input_ids"):
            tiered(buffer, prefetched=batch)  # it passed, with the rows of the old ids
        buffer.copy_(batches[0])  # refilled back: the ids it hashed
        torch.testing.assert_close(tiered(buffer, prefetched=batch), tiered(batches[0]))
        array = batches[0].numpy().copy()  # a NumPy int64 buffer, refilled the same way
        batch = tiered.prefetch(array)
        array[:] = batches[1].numpy()
        with pytest.raises(ConfigError, match="made for other input_ids"):
            tiered(array, prefetched=batch)  # it passed: it compared the buffer with itself
        array[:] = batches[0].numpy()
        torch.testing.assert_close(tiered(array, prefetched=batch), tiered(batches[0]))
        reversed_ids = batches[0].numpy()[:, ::-1]  # a view with negative strides
        torch.testing.assert_close(tiered(reversed_ids), tiered(batches[0].flip(1)))
    finally:
        tiered.close()


def test_empty_batch_and_ragged_ids_are_named(model, batches):
    with pytest.raises(ConfigError, match=r"input_ids: expected shape \[B, T\] .*got \[0, 32\]"):
        model(batches[0][:0])
    with pytest.raises(ConfigError, match=r"input_ids: expected a rectangular .*\[B, T\]"):
        model([[1, 2, 3], [1, 2]])


def test_a_prefetched_or_cache_of_another_type_is_named(model, batches):
    """A prefetched that is no EngramBatch (the row ids alone, say) and a cache that is no KVCache
    raised AttributeError ('dict' object has no attribute 'position'), naming neither."""
    ids = batches[0]
    rows = model.hash(ids).row_ids
    with pytest.raises(ConfigError, match=r"prefetched: got a dict; expected an EngramBatch"):
        model(ids, prefetched=rows)
    with pytest.raises(ConfigError, match=r"cache: got a dict; expected a KVCache"):
        model(ids, cache={})


def test_loss_of_one_token_sequences_is_refused(model, batches):
    one = batches[0][:, :1]  # no next token to predict: the mean over nothing was NaN
    with pytest.raises(ConfigError, match=r"input_ids: .*T >= 2 .*got \[3, 1\]"):
        model.loss(one)
    with pytest.raises(ConfigError, match=r"input_ids: .*T >= 2 .*got \[3, 1\]"):
        model.loss(one, prefetched=model.prefetch(one))
    assert torch.isfinite(model.loss(batches[0][:, :2]))


@pytest.mark.parametrize("kind", ["tensor", "array", "list"])
def test_the_loss_of_ids_given_alone_checks_them_once(model, batches, kind):
    """loss checked its ids (for their length), then the forward it ran hashed them, checking
    them again: the whole batch read twice. They are checked once; the loss is the one of the
    batch prefetched first."""
    from tests.test_engram_pipeline import _CountedChecks

    ids = batches[0]
    given = {"tensor": ids, "array": ids.numpy(), "list": ids.tolist()}[kind]
    with torch.no_grad():
        want = model.loss(ids, prefetched=model.prefetch(ids))
        with _CountedChecks(model) as checks:
            got = model.loss(given)
    assert checks.calls == 1
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_a_forward_uses_its_rotary_tables_though_another_replaced_them(model, batches):
    """Forwards on the server's worker threads share the rotary table cache: one that grew it
    must not read back the shorter table another forward stored just after (it failed in the
    rotation: size 32 against 8)."""

    class Racing(dict):
        """The cache, with another forward's shorter table stored right after each store."""

        def __setitem__(self, key, tables):
            super().__setitem__(key, tables)
            super().__setitem__(key, tuple(t[:8] for t in tables))

    with torch.no_grad():
        want = model(batches[0])
        model._rope = Racing()
        torch.testing.assert_close(model(batches[0]), want, atol=0, rtol=0)


def test_set_tables_swaps_all_or_nothing(model, batches):
    memory = model.tables
    with pytest.raises(ConfigError, match=r"^tables: layer '1' has no Engram"):
        model.set_tables({"1": memory[1]})
    wrong = InMemoryTable(torch.zeros(memory[3].rows, memory[3].dim))  # layer 3's shape
    with pytest.raises(ConfigError, match=r"^tables\[1\]: expected a table of 20112 rows x 16"):
        model.set_tables({3: InMemoryTable(torch.zeros(memory[3].rows, 16)), 1: wrong})
    assert all(model.tables[i] is memory[i] for i in memory)  # layer 3 kept its table


class _Plain(TableBackend):
    """A table that is no module (as a tiered store) over an in-memory table's rows."""

    def __init__(self, table: InMemoryTable) -> None:
        self.inner, self.rows, self.dim = table, table.rows, table.dim

    def lookup(self, row_ids, handle=None):
        return self.inner.lookup(row_ids, handle)

    def prefetch(self, row_ids):
        return None


# a Ctrl-C raised in a generator being closed is reported, not raised
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("geometry", ["demo", "v41"])
def test_set_tables_interrupted_anywhere_swaps_every_table_or_none(config, hasher, geometry):
    """set_tables deleted each layer's table, then set the new one: a Ctrl-C between the two
    left a layer with no table, and one between two layers left some layers swapped. Interrupted
    at each point in turn, every layer now serves its old table, or every one its new table."""
    from tests.test_engram_module import _interrupted_at

    if geometry == "v41":
        v41 = {
            "engram": {
                "geometry": "deepseek-v4.1",
                "engram_vocab_size": 101,
                "max_ngram_size": 3,
                "n_embed_per_ngram": 64,
                "n_head_per_ngram": 2,
                "layer_ids": [1, 3],
            },
            "backbone": {"hidden_size": 32, "hc_mult": 2, "num_layers": 4},
        }
        cfg = ModelConfig.from_dict(v41)
        model = EngramLM(cfg)
        old = model.tables
        new = {
            i: InMemoryTable(t.lookup(torch.arange(int(t.rows))).float()) for i, t in old.items()
        }
    else:
        model = EngramLM(config, hasher=hasher)
        old = model.tables
        new = {i: _Plain(t) for i, t in old.items()}
    k = 0
    while True:
        k += 1
        points = _interrupted_at(k, model.set_tables, new)
        layers = [layer.engram for layer in model.layers if layer.engram is not None]
        held = [e.multi_head_embedding if geometry == "demo" else e for e in layers]
        name = "embedding" if geometry == "demo" else "table"
        tables = {
            i: h._modules.get(name, h.__dict__.get(name))
            for i, h in zip(model.engram_layers, held, strict=True)
        }
        assert tables in (old, new), f"interrupt {k}: {tables}"
        assert tables == model.tables
        if points < k:  # every point has been interrupted once
            assert tables == new
            break
        model.set_tables(old)
    assert k > 10


def _hooked(model: EngramLM, hook) -> None:
    """Give each demo Engram layer's embedding a ``set_backend`` that runs ``hook(embedding,
    backend)`` first (a subclass overriding it)."""
    from tiered_store.engram.module import MultiHeadEmbedding

    class Hooked(MultiHeadEmbedding):
        def set_backend(self, backend):
            hook(self, backend)
            super().set_backend(backend)

    for engram in model.engram_layers.values():
        engram.multi_head_embedding.__class__ = Hooked


def test_set_tables_refused_by_a_set_backend_puts_back_tables_it_would_refuse(model):
    """An embedding whose set_backend refuses a table (a subclass's check: here a table that is
    no module), the tables the model was made with among them: set_tables swapped layer 1, was
    refused at layer 3, then gave layer 3 its old table again through set_backend, which refused
    it too; layer 1 was left on its new table and the undo's error raised. A layer on its old
    table is left alone, and one the check refuses its old table is given it all the same."""
    model.set_tables({i: _Plain(t) for i, t in model.tables.items()})  # before the check
    old = model.tables

    def modules_only(embedding, backend):
        if not isinstance(backend, nn.Module):
            raise ConfigError(f"backend: a {type(backend).__name__}; expected a module")

    _hooked(model, modules_only)
    new = {1: InMemoryTable(old[1].inner.weight.detach().clone()), 3: _Plain(old[3].inner)}
    with pytest.raises(ConfigError, match=r"^backend: a _Plain; expected") as raised:
        model.set_tables(new)
    assert raised.value.__context__ is None  # the refusal of layer 3's new table, none after
    assert model.tables == old


def test_set_tables_interrupted_again_as_it_undoes_puts_back_the_other_layers(config, hasher):
    """A Ctrl-C inside set_tables (at layer 3, layers 1 and 2 swapped), then another as it put
    layer 2's old table back: layer 1 was left on its new table, as the undo stopped there.
    Every other layer gets its old table; the interrupt goes on."""
    three = ModelConfig.from_dict({**TINY, "engram": {**TINY["engram"], "layer_ids": [1, 2, 3]}})
    model = EngramLM(three, hasher=NgramHasher(three.engram))
    old = model.tables
    new = {i: _Plain(t) for i, t in old.items()}
    calls = []

    def interrupted(embedding, backend):  # swaps 1, 2, 3 (interrupted), then undoes 2, 1
        calls.append(backend)
        if backend is new[3] or (backend is old[2] and len(calls) > 3):
            raise KeyboardInterrupt

    _hooked(model, interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.set_tables(new)
    assert model.tables == {1: old[1], 2: new[2], 3: old[3]}  # layer 2's undo interrupted
    assert calls == [new[1], new[2], new[3], old[2], old[1]]


def test_set_tables_checks_each_table_s_layout_once(model):
    """set_tables checked every table, then each layer's set_table checked it again (the layout
    compared twice); the tables checked are swapped in as they are."""
    memory = model.tables
    layout = table_metadata(model.hasher, 1)["engram"]

    class Counted(TableBackend):
        rows, dim, reads = memory[1].rows, memory[1].dim, 0

        @property
        def engram_layout(self):
            self.reads += 1
            return layout

        def lookup(self, row_ids, handle=None):
            return memory[1].lookup(row_ids)

        def prefetch(self, row_ids):
            return None

    table = Counted()
    try:
        model.set_tables({1: table})
        assert model.tables[1] is table and table.reads == 1
    finally:
        model.set_tables(memory)


def test_table_file_for_another_configuration_is_refused(model, converted, tmp_path):
    paths = converted.table_paths
    with pytest.raises(ConfigError, match=r"layer_id=3, .* expects layer_id=1"):
        open_tables({1: paths[3]}, model.hasher, STORE)
    other = ModelConfig.from_dict({**TINY, "engram": {**TINY["engram"], "seed": 7}})
    with pytest.raises(
        ConfigError, match=r"seed=0, but this model's Engram layer 1 expects seed=7"
    ):
        check_table_file(paths[1], NgramHasher(other.engram), 1)
    plain = tmp_path / "plain.npy"
    create_table(plain, np.zeros((model.tables[1].rows, 16), np.float32), progress=False)
    with pytest.raises(ConfigError, match="no Engram layout metadata"):
        open_tables({1: plain}, model.hasher, STORE)
    with pytest.raises(ConfigError, match="store.table: set by the checkpoint"):
        open_tables(paths, model.hasher, {"table": {"path": "x.npy"}})


def test_another_layer_s_table_is_said_to_be_that_layer_s_not_another_configuration(
    model, converted
):
    """Layer 3's table given for layer 1 (paths swapped) was said to be 'made with another
    configuration' and the message printed the model's own config, the same in every field; it
    says whose layer's table it is."""
    paths = converted.table_paths
    with pytest.raises(ConfigError) as refused:
        open_tables({1: paths[3], 3: paths[1]}, model.hasher, STORE)
    said = str(refused.value)
    assert "table built for layer_id=3, but this model's Engram layer 1 expects layer_id=1" in said
    assert "(the table holds Engram layer 3's rows; expected layer 1's own table)" in said
    assert "another configuration" not in said


def test_a_table_built_for_another_seed_or_pad_id_is_refused_as_a_backend(
    model, converted, tmp_path
):
    """EngramLM(tables=...), set_tables and Engram(backend=...) compared rows and dim alone: a
    TieredStore opened directly over a table made for another Engram config of the same shape
    (another seed or pad id) was taken, and its rows served in silence for the wrong N-grams.
    Every backend that tells its table's layout (engram_layout) is refused as open_tables refuses
    the file, naming the layer, the field and both values; one that tells none is taken."""
    from tiered_store.delta.row_optimizers import make_row_optimizer
    from tiered_store.delta.trainable import TableSlice, TrainableTable
    from tiered_store.engram.module import Engram
    from tiered_store.metrics import TableHealth
    from tiered_store.serve.guarded_table import GuardedTable

    config, memory = model.config, model.tables
    for field, value in (("seed", 7), ("pad_id", 5)):
        other = config.model_copy(
            update={"engram": config.engram.model_copy(update={field: value})}
        )
        torch.manual_seed(0)
        made = save_tiered(EngramLM(other), tmp_path / field).table_paths[1]
        store = TieredStore.open({"table": {"path": str(made)}, **STORE})
        try:
            assert (store.rows, store.dim) == (memory[1].rows, memory[1].dim)  # the same shape
            assert store.engram_layout[field] == value
            said = rf"layer 1 expects {field}={getattr(config.engram, field)}"
            refused = rf"{field}={value}, but this model's Engram {said}"
            with pytest.raises(
                ConfigError, match=r"^tables\[1\]: TieredStore's table built for " + refused
            ):
                EngramLM(config, hasher=model.hasher, tables={1: store})
            sgd = make_row_optimizer("sgd", lr=1.0)
            trainable = TrainableTable(store, sgd)
            guarded = GuardedTable(store, "layer1", TableHealth())
            for backend in (store, trainable, TableSlice(trainable, 0, store.rows), guarded):
                assert backend.engram_layout[field] == value
                with pytest.raises(ConfigError, match=refused):
                    model.set_tables({3: memory[3], 1: backend})
                with pytest.raises(ConfigError, match=r"^backend: .*" + refused):
                    Engram(config.engram, config.backbone, 1, hasher=model.hasher, backend=backend)
            assert all(model.tables[i] is memory[i] for i in memory)  # neither swapped
            assert TableSlice(trainable, 1, store.rows - 1).engram_layout is None  # part of it
        finally:
            store.close()
    own = TieredStore.open({"table": {"path": str(converted.table_paths[1])}, **STORE})
    try:
        model.set_tables({1: own})  # built for this model's layout: taken
        assert model.tables[1] is own
    finally:
        model.set_tables(memory)
        own.close()
    assert getattr(memory[1], "engram_layout", None) is None  # a plain tensor's: not known


def test_a_float_table_read_into_memory_tells_the_layout_its_file_records(
    model, converted, tmp_path
):
    """load_table_in_memory read a table file into an InMemoryTable that told no layout, so one
    built for another seed (same shape) was taken by set_tables and its rows served for the
    wrong N-grams in silence, where the same file opened as a TieredStore, or a packed one read
    by PackedInMemoryTable.from_table, was refused; it tells its file's, and is refused alike."""
    config, memory = model.config, model.tables
    other = config.model_copy(update={"engram": config.engram.model_copy(update={"seed": 7})})
    made = save_tiered(EngramLM(other), tmp_path / "seed7").table_paths[1]
    table = load_table_in_memory(made)
    assert (table.rows, table.dim) == (memory[1].rows, memory[1].dim)  # the same shape
    assert table.engram_layout["seed"] == 7
    refused = r"^tables\[1\]: InMemoryTable's table built for seed=7, but .* layer 1 expects seed=0"
    with pytest.raises(ConfigError, match=refused):
        model.set_tables({1: table})
    assert model.tables[1] is memory[1]
    own = load_table_in_memory(converted.table_paths[1])
    assert own.engram_layout["seed"] == 0
    model.set_tables({1: own})  # built for this model's layout: taken
    assert model.tables[1] is own
    assert InMemoryTable(own.weight).engram_layout is None  # a plain tensor's: not known


def test_a_hasher_of_another_config_is_named_not_the_checkpoint_s_tables(model, converted):
    """load_tiered_model with a hasher of another Engram config (another seed) blamed the
    checkpoint's first table ("table built for seed=0 ... the table was made with another
    configuration"), though the tables and the dense file agree; it names the hasher and the
    field it differs in, before any store opens."""
    other = NgramHasher(model.config.engram.model_copy(update={"seed": 5}))
    with pytest.raises(
        ConfigError,
        match=r"hasher: its Engram config has seed=5 but the checkpoint .*dense\.safetensors "
        r"was made with seed=0; expected",
    ):
        load_tiered_model(converted.directory, store=STORE, hasher=other)


def test_a_hasher_of_another_config_or_of_another_type_is_named(model, converted, tmp_path):
    """EngramLM, Engram and convert_checkpoint said only 'hasher: its EngramConfig differs' for a
    hasher of another Engram config (not the field nor the values), and all of them, with
    load_tiered_model, raised AttributeError for a hasher that is no NgramHasher (an
    EngramConfig passed in its place); both are a ConfigError naming what was given."""
    from tiered_store.engram.module import Engram

    config = model.config
    other = NgramHasher(config.engram.model_copy(update={"seed": 5}))
    differs = r"hasher: its Engram config has seed=5 but {} seed=0; expected a hasher of"
    with pytest.raises(ConfigError, match=differs.format("config.engram has")):
        EngramLM(config, hasher=other)
    with pytest.raises(ConfigError, match=differs.format("config.engram has")):
        convert_checkpoint(model.state_dict(), config, tmp_path / "out", hasher=other)
    with pytest.raises(ConfigError, match=differs.format("the module's config has")):
        Engram(config.engram, config.backbone, 1, hasher=other)
    golden = golden_dir("engram_forward.safetensors") / "engram_forward.safetensors"
    with pytest.raises(ConfigError, match=differs.format("the module's config has")):
        Engram.from_checkpoint(golden, config.engram, config.backbone, 1, hasher=other)
    wrong = r"hasher: got a EngramConfig; expected an NgramHasher \(NgramHasher\(config\.engram\)\)"
    with pytest.raises(ConfigError, match=wrong):
        EngramLM(config, hasher=config.engram)
    with pytest.raises(ConfigError, match=wrong):
        Engram(config.engram, config.backbone, 1, hasher=config.engram)
    with pytest.raises(ConfigError, match=wrong):
        convert_checkpoint(model.state_dict(), config, tmp_path / "out", hasher=config.engram)
    with pytest.raises(ConfigError, match=wrong):
        load_tiered_model(converted.directory, store=STORE, hasher=config.engram)


def test_the_table_functions_name_a_hasher_of_another_type(model, converted, tmp_path):
    """open_tables, check_table_file, random_tables and table_metadata raised AttributeError
    ('EngramConfig' object has no attribute 'config') for a hasher that is no NgramHasher (an
    EngramConfig in its place, or None), as EngramLM did; each is a ConfigError naming the type
    given, before any file is read or made."""
    from tiered_store.engram.checkpoint import random_tables, table_metadata

    paths, engram = converted.table_paths, model.config.engram
    wrong = r"hasher: got {}; expected an NgramHasher \(NgramHasher\(config\.engram\)\)$"
    for given, said in ((engram, "a EngramConfig"), (None, "None")):
        with pytest.raises(ConfigError, match=wrong.format(said)):
            open_tables(paths, given, STORE)
        with pytest.raises(ConfigError, match=wrong.format(said)):
            check_table_file(paths[1], given, 1)
        with pytest.raises(ConfigError, match=wrong.format(said)):
            random_tables(tmp_path / "random", given)
        with pytest.raises(ConfigError, match=wrong.format(said)):
            table_metadata(given, 1)
    assert not (tmp_path / "random").exists()  # refused before the folder was made


def test_checkpoint_shape_mismatch_errors_before_anything(model, converted, tmp_path):
    state = model.state_dict()
    wide = ModelConfig.from_dict({**TINY, "backbone": {**TINY["backbone"], "hidden_size": 128}})
    with pytest.raises(
        ConfigError, match=r"embed\.weight: checkpoint shape \[129280, 64\] .*hidden_size=128"
    ):
        convert_checkpoint(state, wide, tmp_path / "wide")
    assert not (tmp_path / "wide").exists()
    with pytest.raises(ConfigError, match=r"layers\.0\.attn\.qkv\.weight: missing"):
        convert_checkpoint(
            {k: v for k, v in state.items() if "qkv" not in k}, model.config, tmp_path / "x"
        )
    with pytest.raises(
        ConfigError, match=r"layer1\.value_proj\.weight: not a key .* from_reference_layout"
    ):
        convert_checkpoint(
            {**state, "layer1.value_proj.weight": torch.zeros(1)}, model.config, tmp_path / "y"
        )
    before = model.layers[0].attn.qkv.weight.detach().clone()
    bad = {k: v.clone() for k, v in state.items()}
    bad["layers.2.mlp.down.weight"] = torch.zeros(64, 7)
    with pytest.raises(
        ConfigError, match=r"layers\.2\.mlp\.down\.weight: checkpoint shape \[64, 7\]"
    ):
        model.load_state_dict(bad)
    bad = {k: v.clone() for k, v in state.items()}
    bad["layers.3.engram.multi_head_embedding.offsets"] = state[
        "layers.1.engram.multi_head_embedding.offsets"
    ]
    with pytest.raises(ConfigError, match="offsets"):
        model.load_state_dict(bad)
    assert torch.equal(model.layers[0].attn.qkv.weight, before)  # nothing was half-loaded


def test_a_checkpoint_of_other_engram_layers_is_refused_before_anything_loads(model):
    """A checkpoint of another config whose shapes all agree (other Engram layers, a key the
    model lacks): torch copied every tensor it matched, then raised a RuntimeError, leaving the
    model half-loaded though the docstring says nothing is copied. A ConfigError names the
    first key missing or unknown before any copy; strict=False loads the keys it has."""
    other = EngramLM(
        ModelConfig.from_dict({**TINY, "engram": {**TINY["engram"], "layer_ids": [1]}})
    )
    state = other.state_dict()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ConfigError,
        match=r"layers\.3\.engram\.key_projs\.0\.bias: missing from the checkpoint \(\d+ keys "
        r"missing; .*strict=False",
    ):
        model.load_state_dict(state)
    with pytest.raises(ConfigError, match=r"layers\.0\.extra: not a key of this EngramLM"):
        model.load_state_dict({**model.state_dict(), "layers.0.extra": torch.zeros(1)})
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing was half-loaded
    twin = EngramLM(model.config)
    missing = twin.load_state_dict(state, strict=False).missing_keys  # as torch does
    assert "layers.3.engram.value_proj.weight" in missing
    assert torch.equal(twin.embed.weight, other.embed.weight)


def test_a_checkpoint_value_that_is_no_tensor_is_named_before_anything_loads(model):
    """A checkpoint value without a shape (a list, an int) under an Engram layer's key raised
    AttributeError ('list' object has no attribute 'shape'), an unknown one too with
    strict=False, which ignores unknown keys; a NumPy array for a dense key raised torch's
    RuntimeError after the keys before it were copied. A ConfigError names the key, what it
    holds and the tensor expected, before any copy; strict=False ignores an unknown one."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    bias = "layers.1.engram.value_proj.bias"
    for key, value, holds in (
        (bias, state[bias].tolist(), "list"),
        ("final_norm.weight", state["final_norm.weight"].numpy(), "ndarray"),
    ):
        with pytest.raises(
            ConfigError,
            match=rf"^{re.escape(key)}: the checkpoint holds a {holds}; expected a torch\.Tensor "
            rf"of shape \[{len(value)}\]",
        ):
            model.load_state_dict({**changed, key: value})
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in state.items())  # nothing was copied
    model.load_state_dict({**state, "layers.1.engram.note": 3}, strict=False)


def test_a_checkpoint_that_is_no_mapping_is_named(model):
    """load_state_dict of a checkpoint that is no mapping (a file's path, a list of pairs, None)
    raised AttributeError ('str' object has no attribute 'items') from the shape checks run
    before torch's, which says 'Expected state_dict to be dict-like'; a ConfigError names what
    was given and the mapping expected."""
    for given, holds in (("model.safetensors", "str"), (list(model.state_dict().items()), "list")):
        with pytest.raises(
            ConfigError, match=rf"^state_dict: got a {holds}; expected a mapping \{{key: tensor\}}"
        ):
            model.load_state_dict(given)


def test_convert_checkpoint_names_a_value_that_is_no_tensor_before_any_file(model, tmp_path):
    """convert_checkpoint of a state_dict holding a list raised AttributeError reading its
    .shape, and a NumPy array for a dense key AttributeError ('detach') after the table files
    were written (a folder of tables and no dense file). A ConfigError names the key, what it
    holds and the tensor expected, before any file; a table key may hold a NumPy array, which
    create_table writes as a tensor."""
    state = model.state_dict()
    table = f"layers.1.engram.{EMBEDDING_KEY}"
    for key, value, holds in (
        ("final_norm.weight", state["final_norm.weight"].numpy(), "ndarray"),
        ("final_norm.weight", state["final_norm.weight"].tolist(), "list"),
        (table, state[table].tolist(), "list"),
    ):
        out = tmp_path / holds
        with pytest.raises(
            ConfigError,
            match=rf"^{re.escape(key)}: the checkpoint holds a {holds}; expected a torch\.Tensor "
            rf"of shape \[{len(value)}",
        ):
            convert_checkpoint({**state, key: value}, model.config, out)
        assert not out.exists()
    converted = convert_checkpoint({**state, table: state[table].numpy()}, model.config, out)
    assert torch.equal(load_table_in_memory(converted.table_paths[1]).weight, state[table])


def test_config_errors(config, hasher, converted):
    with pytest.raises(ConfigError, match="num_attention_heads: expected a divisor"):
        ModelConfig.from_dict({**TINY, "transformer": {"num_attention_heads": 5}})
    with pytest.raises(ConfigError, match=r"engram.layer_ids\[1\]: expected a layer id below"):
        ModelConfig.from_dict({**TINY, "backbone": {**TINY["backbone"], "num_layers": 3}})
    with pytest.raises(ConfigError, match="transformer.dropout: unknown key"):
        ModelConfig.from_dict({**TINY, "transformer": {"dropout": 0.1}})
    for bad in (float("nan"), float("inf")):  # was taken: NaN outputs, or torch's raw error
        with pytest.raises(ConfigError, match=r"transformer.rope_theta: expected a finite number"):
            ModelConfig.from_dict({**TINY, "transformer": {"rope_theta": bad}})
    small = ModelConfig.from_dict({**TINY, "backbone": {**TINY["backbone"], "vocab_size": 1000}})
    with pytest.raises(ConfigError, match="vocab_size: expected at least the tokenizer's 129280"):
        EngramLM(small, hasher=hasher)
    stores = open_tables(converted.table_paths, hasher, STORE)
    try:
        with pytest.raises(ConfigError, match="tables: layer 2 has no Engram"):
            EngramLM(config, hasher=hasher, tables={2: stores[1]})
        # a key read from text ('1'), said as layer 1 "has no Engram (layer_ids = [1, 3])", and
        # beside an int key one that raised TypeError (sorting '1' with 2)
        for tables in ({"1": stores[1]}, {"1": stores[1], 2: stores[3]}):
            said = r"^tables: layer '1' has no Engram \(engram.layer_ids = \[1, 3\]\)"
            with pytest.raises(ConfigError, match=said):
                EngramLM(config, hasher=hasher, tables=tables)
        # a tensor key equals 1 (== layer_ids' 1) but is no key 1: its table was dropped, the
        # layer built with a new table of its own; refused, as set_tables refuses it
        said = r"^tables: layer tensor\(1\) has no Engram \(engram.layer_ids = \[1, 3\]\)"
        with pytest.raises(ConfigError, match=said):
            EngramLM(config, hasher=hasher, tables={torch.tensor(1): stores[1]})
        with pytest.raises(ConfigError, match=said):
            EngramLM(config, hasher=hasher).set_tables({torch.tensor(1): stores[1]})
        # a list of tables: TypeError from dict(), and set_tables named a table as a layer id
        said = r"^tables: got a list; expected a mapping \{layer_id: TableBackend\}"
        with pytest.raises(ConfigError, match=said):
            EngramLM(config, hasher=hasher, tables=list(stores.values()))
        with pytest.raises(ConfigError, match=said):
            EngramLM(config, hasher=hasher).set_tables(list(stores.values()))
        with pytest.raises(ConfigError, match=r"^tables\[1\]: expected a table of \d+ rows x 16"):
            EngramLM(config, hasher=hasher, tables={1: stores[3]})
        with pytest.raises(ConfigError, match=r"^tables\[3\]: str is not a TableBackend"):
            EngramLM(config, hasher=hasher, tables={3: "layer3.table"})
        with pytest.raises(ConfigError, match=r"^tables\[3\]: str is not a TableBackend"):
            EngramLM(config, hasher=hasher).set_tables({3: "layer3.table"})
    finally:
        for store in stores.values():
            store.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiered_on_cuda_is_bit_identical(model, converted, batches):
    model = model.cuda()
    memory = {i: load_table_in_memory(p).cuda() for i, p in converted.table_paths.items()}
    model.set_tables(memory)
    with torch.no_grad():
        want = [model(ids.cuda()) for ids in batches]
    cuda_store = {
        "tiers": {"hot": {"capacity": 300, "device": "cuda"}, "warm": {"capacity": "10%"}}
    }
    stores = open_tables(converted.table_paths, model.hasher, cuda_store)
    model.set_tables(stores)
    try:
        assert all(s._pin for s in stores.values())  # rows staged for the GPU: pinned
        with torch.no_grad():
            batch = model.prefetch(batches[0])
            for i, ids in enumerate(batches):
                nxt = model.prefetch(batches[i + 1]) if i + 1 < len(batches) else None
                out = model(ids, prefetched=batch)
                assert out.is_cuda and torch.equal(out, want[i])
                batch = nxt
    finally:
        model.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ids_on_the_gpu_for_a_model_on_the_cpu_are_read_once_copied(config, hasher, batches):
    """A model on the CPU given ids hashed on the GPU copied them (and a V4.1 layer its token
    mask) to the CPU with non_blocking=True, which torch returns before the GPU has written
    them: the embedding read whatever the buffer held while the GPU was busy. The copy to the
    host is waited for; the outputs are those of the ids on the CPU."""
    torch.manual_seed(0)
    model = EngramLM(config, hasher=hasher).eval()
    with torch.no_grad():
        for ids in batches[:2]:
            batch = model.hash(ids.cuda())
            torch.cuda._sleep(1 << 30)  # the GPU busy: an asynchronous copy is not done yet
            torch.testing.assert_close(model(batch.input_ids, prefetched=batch), model(ids))


def test_checkpoint_loading_follows_a_compacted_table(model, converted, hasher, batches):
    from tiered_store.delta.compaction import compact_table

    path = converted.table_paths[1]
    row = torch.arange(model.tables[1].dim, dtype=torch.float32) / 7
    with TieredStore.open({"table": {"path": str(path)}}) as store:
        store.write([11], row[None])
        store.commit()
    compact_table(path, progress=False)
    assert not path.exists()  # only TABLE.npy.current leads to the rows now
    check_table_file(path, hasher, 1)
    assert torch.equal(load_table_in_memory(path).weight[11], row)
    with TieredStore.open({"table": {"path": str(path)}}) as store:  # committed after compaction
        store.write([12], 2 * row[None])
        store.commit()
    in_memory = load_table_in_memory(path).weight
    assert torch.equal(in_memory[11], row) and torch.equal(in_memory[12], 2 * row)
    tiered = load_tiered_model(converted.directory, store=STORE, hasher=hasher)
    try:
        assert torch.equal(tiered.tables[1].lookup(torch.tensor([11]))[0], row)
        with torch.no_grad():
            assert torch.isfinite(tiered(batches[0])).all()
    finally:
        tiered.close()


@pytest.mark.parametrize("kernel_size", [None, 1])
def test_decode_with_a_cache_equals_one_pass_in_the_demo_geometry(model, kernel_size):
    """A prompt, then one token per step, with a KV cache and hash state: each step's logits
    equal one forward's at that position. The Engram ShortConv reaches back (kernel_size - 1) x
    max_ngram_size positions, so the cache keeps that many inputs too (before, the first decoded
    position was off by a quarter of the logits' scale; with kernel_size 1 it kept them all)."""
    if kernel_size is not None:
        torch.manual_seed(0)
        geometry = {**TINY, "engram": {**TINY["engram"], "kernel_size": kernel_size}}
        model = EngramLM(ModelConfig.from_dict(geometry)).eval()
    ids = torch.from_numpy(
        model.hasher.tokenizer.encode("def lookup(table, ids): return [table[i] for i in ids]")[
            None
        ]
    )
    with torch.no_grad():
        full = model(ids)
        state, cache = model.hasher.new_state(1), model.new_cache()
        for start, stop in [(0, 4)] + [(t, t + 1) for t in range(4, ids.shape[1])]:
            chunk = ids[:, start:stop]
            out = model(chunk, prefetched=model.prefetch(chunk, state=state), cache=cache, logits="last")  # fmt: skip
            torch.testing.assert_close(out, full[:, stop - 1], atol=1e-5, rtol=0)
    engram = model.config.engram
    reach = (engram.kernel_size - 1) * engram.max_ngram_size
    assert {c["inputs"].shape[-1] for c in cache.conv.values()} == {reach}


@contextmanager
def _on_stores(model: EngramLM, converted) -> Iterator[dict[int, TieredStore]]:
    """``model`` reads its tables from tiered stores opened on ``converted``'s inside the block
    (the stores yielded); its own tables are back and every store is closed after."""
    memory, stores = model.tables, open_tables(converted.table_paths, model.hasher, STORE)
    try:
        model.set_tables(stores)
        yield stores
    finally:
        model.set_tables(memory)
        for store in stores.values():
            store.close()


def test_save_tiered_of_a_model_on_tiered_stores_names_the_table_not_a_checkpoint(
    model, converted, tmp_path
):
    """save_tiered of a model whose tables are tiered stores (outside its state_dict) said
    "layers.1.engram...weight: missing from the checkpoint", though no checkpoint was given;
    it names the layer's table, its type and what save_tiered writes, before any file."""
    out = tmp_path / "again"
    with (
        _on_stores(model, converted),
        pytest.raises(
            ConfigError,
            match=r"^model\.tables\[1\]: a TieredStore, whose rows the model's state_dict "
            r"holds under no layers\.1\.engram\.multi_head_embedding\.embedding\.weight; "
            r"expected an InMemoryTable",
        ),
    ):
        save_tiered(model, out)
    assert not out.exists()


def test_save_tiered_of_a_module_table_of_another_key_does_not_say_it_is_outside(model, tmp_path):
    """A table that is a module whose rows are a parameter of another name is in the model's
    state_dict (under that name), yet save_tiered said it was "outside the model's state_dict";
    the message names the key it looks for, which such a table lacks, before any file."""
    memory = model.tables

    class Renamed(nn.Module, TableBackend):
        def __init__(self, weight: torch.Tensor) -> None:
            super().__init__()
            self.rows_, self.rows, self.dim = nn.Parameter(weight), *weight.shape

        def lookup(self, row_ids, handle=None):
            return self.rows_[row_ids]

        def prefetch(self, row_ids):
            return None

    out = tmp_path / "again"
    model.set_tables({3: Renamed(memory[3].weight.detach().clone())})
    try:
        assert "layers.3.engram.multi_head_embedding.embedding.rows_" in model.state_dict()
        with pytest.raises(
            ConfigError,
            match=r"^model\.tables\[3\]: a Renamed, whose rows the model's state_dict holds "
            r"under no layers\.3\.engram\.multi_head_embedding\.embedding\.weight; expected",
        ):
            save_tiered(model, out)
    finally:
        model.set_tables(memory)
    assert not out.exists()


def test_a_step_that_failed_midway_leaves_the_cache_as_before(model, converted, batches):
    """A decode step whose layer-3 lookup fails (its store closed) had already extended layers 0
    to 2's keys/values and layer 1's ShortConv inputs, the position not advanced: retried on a
    reopened store, it attended to the step's own position twice."""
    prompt, step = batches[0][:, :24], batches[0][:, 24:25]
    with torch.no_grad():
        want = model(batches[0][:, :25], logits="last")
        with _on_stores(model, converted) as stores:
            for first in (prompt, None):  # a failing prefill leaves the new cache empty
                state, cache = model.hasher.new_state(3), model.new_cache()
                if first is not None:
                    model(first, prefetched=model.prefetch(first, state=state), cache=cache)
                before = {i: (kv[0].clone(), kv[1].clone()) for i, kv in cache.layers.items()}
                ids = step if first is not None else batches[0][:, :25]
                batch = model.hash(ids, state=state)
                stores[3].close()
                with pytest.raises(StoreClosedError):
                    model(ids, prefetched=batch, cache=cache, logits="last")
                assert cache.position == (24 if first is not None else 0)
                assert cache.layers.keys() == before.keys()
                for i, (k, v) in cache.layers.items():
                    assert torch.equal(k, before[i][0]) and torch.equal(v, before[i][1])
                stores[3] = open_tables({3: converted.table_paths[3]}, model.hasher, STORE)[3]
                model.set_tables({3: stores[3]})
                got = model(ids, prefetched=batch, cache=cache, logits="last")  # the retry
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _fails_after_its_layers(model, step, batch, cache) -> None:
    """One forward of ``batch`` that raises after every layer ran (out of memory in the final
    norm, a forward hook)."""

    def out_of_memory(*_):
        raise RuntimeError("out of memory (a forward hook of the final norm)")

    hook = model.final_norm.register_forward_hook(out_of_memory)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            model(step, prefetched=batch, cache=cache, logits="last")
    finally:
        hook.remove()


def test_a_step_that_failed_after_its_layers_leaves_the_cache_as_before(model, batches):
    """The final norm and the vocabulary projection (the step's largest allocation: where an
    out-of-memory error is likeliest) run after every layer extended the cache: a failure there
    left it extended and its position advanced, so the retry was refused."""
    prompt, step = batches[0][:, :24], batches[0][:, 24:25]
    with torch.no_grad():
        want = model(batches[0][:, :25], logits="last")
        state, cache = model.hasher.new_state(3), model.new_cache()
        model(prompt, prefetched=model.prefetch(prompt, state=state), cache=cache)
        batch = model.hash(step, state=state)
        _fails_after_its_layers(model, step, batch, cache)
        assert cache.position == 24
        assert all(k.shape[2] == v.shape[2] == 24 for k, v in cache.layers.values())
        got = model(step, prefetched=batch, cache=cache, logits="last")  # the retry
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_prefetched_batch_runs_again_after_a_failure_and_twice(model, converted, batches):
    """KVCache's promise, that a step which raised may be run again, failed for a batch prefetched
    from tiered stores: its layers had consumed their handles, so the retry raised "already
    consumed; prefetch again" (and prefetching again would hash past the HashState's position).
    A forward now drops each handle it consumes; a rerun looks those rows up."""
    prompt, step = batches[0][:, :24], batches[0][:, 24:25]
    stores = open_tables(converted.table_paths, model.hasher, STORE)
    try:
        with torch.no_grad():
            want = model(batches[0][:, :25], logits="last")
            model.set_tables(stores)
            state, cache = model.hasher.new_state(3), model.new_cache()
            model(prompt, prefetched=model.prefetch(prompt, state=state), cache=cache)
            batch = model.prefetch(step, state=state)
            _fails_after_its_layers(model, step, batch, cache)
            assert batch.handles == {1: None, 3: None}
            got = model(step, prefetched=batch, cache=cache, logits="last")  # the retry
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            whole = model.prefetch(batches[1])
            first = model(batches[1], prefetched=whole)
            assert torch.equal(model(batches[1], prefetched=whole), first)  # run twice
    finally:
        for store in stores.values():
            store.close()


def test_a_prefetch_that_failed_leaves_the_hash_state_as_before(model, converted, batches):
    """A decode step whose prefetch failed (layer 3's store closed) had hashed the step and moved
    the HashState past it, but gave no batch: the retry on a reopened store hashed the step one
    step too far, refused by a cache ("hashed at position 25 but the cache holds 24") and wrong
    row ids in silence without one. The state is now as before the failed prefetch."""
    prompt, step = batches[0][:, :24], batches[0][:, 24:25]
    with torch.no_grad():
        want = model(batches[0][:, :25], logits="last")
        with _on_stores(model, converted) as stores:
            state, cache = model.hasher.new_state(3), model.new_cache()
            model(prompt, prefetched=model.prefetch(prompt, state=state), cache=cache)
            tail = state.tail.clone()
            stores[3].close()
            with pytest.raises(StoreClosedError):
                model.prefetch(step, state=state)
            assert state.position == 24 and torch.equal(state.tail, tail)
            stores[3] = open_tables({3: converted.table_paths[3]}, model.hasher, STORE)[3]
            model.set_tables({3: stores[3]})
            batch = model.prefetch(step, state=state)  # the retry
            got = model(step, prefetched=batch, cache=cache, logits="last")
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_hashing_interrupted_midway_leaves_the_hash_state_as_before(model, batches, monkeypatch):
    """The hasher moved the HashState past the ids before it hashed them for each layer: a
    Ctrl-C (or running out of memory) while a later layer's rows were hashed left the state a
    chunk ahead though no rows came out of hash(), so the same ids hashed again were hashed as
    the chunk after themselves. The state is now as before the call."""
    from tiered_store.engram.hashing import NgramHasher as Hasher

    prompt, step = batches[0][:, :24], batches[0][:, 24:25]
    want = model.hash(batches[0][:, :25]).row_ids
    state = model.hasher.new_state(3)
    model.hash(prompt, state=state)
    tail = state.tail.clone()
    real = Hasher._hash_shifts

    def interrupted_at_layer3(self, shifts, layer, offset):
        if layer == 3:
            raise KeyboardInterrupt
        return real(self, shifts, layer, offset=offset)

    monkeypatch.setattr(Hasher, "_hash_shifts", interrupted_at_layer3)
    with pytest.raises(KeyboardInterrupt):
        model.hash(step, state=state)
    monkeypatch.undo()
    assert state.position == 24 and torch.equal(state.tail, tail)
    again = model.hash(step, state=state)  # the retry: the step's own rows
    for layer, rows in again.row_ids.items():
        assert torch.equal(torch.as_tensor(rows), torch.as_tensor(want[layer])[:, 24:]), layer


def test_a_long_chunk_leaves_only_the_look_back_in_the_hash_state(model, batches):
    """HashState.tail was a view of the whole chunk the hasher had just shifted ([B, N - 1 + T]
    int64, a prefill's every position) for its last N - 1 ids, so the state kept the chunk alive
    until the next one; it holds a tensor of those ids alone, and chunks still hash as one."""
    ids = torch.cat(batches, dim=1)  # [3, 128]
    want = model.hash(ids).row_ids
    state = model.hasher.new_state(3)
    first = model.hash(ids[:, :100], state=state).row_ids
    tail = state.tail
    assert tuple(tail.shape) == (3, model.config.engram.max_ngram_size - 1)
    assert tail.untyped_storage().nbytes() == tail.numel() * tail.element_size()
    rest = model.hash(ids[:, 100:], state=state).row_ids
    for layer, rows in want.items():
        assert torch.equal(torch.cat([first[layer], rest[layer]], dim=1), rows), layer


def test_a_step_without_its_batch_on_a_filled_cache_is_refused_before_any_fetch(
    model, converted, batches
):
    """A decode step given no prefetched batch was hashed from position 0 and each table's fetch
    started, then refused with "prefetched: hashed at position 0", an argument the caller never
    gave. It is refused first, naming the missing batch; no store starts a fetch."""
    prompt, step = batches[0][:, :24], batches[0][:, 24:25]
    with torch.no_grad(), _on_stores(model, converted) as stores:
        state, cache = model.hasher.new_state(3), model.new_cache()
        model(prompt, prefetched=model.prefetch(prompt, state=state), cache=cache)
        started = {layer: store.prefetches_started for layer, store in stores.items()}
        with pytest.raises(
            ConfigError,
            match=r"prefetched: none given, so input_ids would be hashed at position 0 but "
            r"the cache holds 24 positions; expected .*model\.prefetch\(input_ids, "
            r"state=state\)",
        ):
            model(step, cache=cache)
        assert {layer: s.prefetches_started for layer, s in stores.items()} == started
        assert cache.position == 24


def test_a_step_of_another_batch_size_than_the_cache_s_is_named(model, batches):
    """A step of fewer (or more) sequences than the cache holds raised torch's "Sizes of tensors
    must match" from the first attention's concatenation; it is a ConfigError naming the cache's
    sequences and the batch's, and the cache is left as it was."""
    prompt = batches[0][:, :24]
    with torch.no_grad():
        state, cache = model.hasher.new_state(3), model.new_cache()
        model(prompt, prefetched=model.prefetch(prompt, state=state), cache=cache)
        one = model.hasher.new_state(1)
        model.hash(prompt[:1], state=one)
        step = prompt[:1, -1:]
        with pytest.raises(
            ConfigError,
            match=r"^prefetched: a batch of 1 sequences but the cache holds 3; expected",
        ):
            model(step, prefetched=model.hash(step, state=one), cache=cache)
        assert cache.position == 24


def test_a_batch_hashed_past_position_0_without_a_cache_names_the_missing_cache(model, batches):
    """A batch hashed after earlier chunks (its HashState at 24) given with no cache was refused
    as "the cache holds 0 positions", a cache the caller never gave; the message says none was
    given and what to pass."""
    prompt = batches[0][:, :24]
    with torch.no_grad():
        state = model.hasher.new_state(3)
        model.hash(prompt, state=state)
        step = model.hash(batches[0][:, 24:25], state=state)
        with pytest.raises(
            ConfigError,
            match=r"^prefetched: hashed at position 24 but no cache was given \(positions from "
            r"0\); expected the KVCache of the 24 positions hashed before it",
        ):
            model(step.input_ids, prefetched=step)


def test_an_overwrite_stopped_midway_leaves_no_checkpoint_that_looks_complete(
    model, config, tmp_path, monkeypatch
):
    """dense.safetensors marks a complete checkpoint: an overwrite drops it first, so a stop
    after the first table never leaves the new table beside the old dense weights."""
    import tiered_store.engram.checkpoint as checkpoint

    save_tiered(model, tmp_path)
    real, calls = checkpoint.create_table, []

    def stopped_at_the_second_table(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "create_table", stopped_at_the_second_table)
    with pytest.raises(KeyboardInterrupt):
        save_tiered(EngramLM(config), tmp_path, overwrite=True)
    assert not (tmp_path / checkpoint.DENSE_FILE).exists()
    with pytest.raises(ConfigError):
        load_tiered_model(tmp_path, store=STORE)


def test_converting_into_a_checkpoint_without_overwrite_leaves_its_dense_file(config, tmp_path):
    """Another model converted into a directory holding a checkpoint (overwrite=False): only the
    table files were refused, so one of other Engram layers replaced the dense weights and the
    model config there."""
    from tiered_store.engram.checkpoint import DENSE_FILE
    from tiered_store.table_format import TableExistsError

    save_tiered(EngramLM(config), tmp_path)
    before = (tmp_path / DENSE_FILE).read_bytes()
    other = ModelConfig.from_dict({**TINY, "engram": {**TINY["engram"], "layer_ids": [2]}})
    with pytest.raises(
        TableExistsError, match=r"dense\.safetensors already exists: .*overwrite=True"
    ):
        convert_checkpoint(EngramLM(other).state_dict(), other, tmp_path)
    assert (tmp_path / DENSE_FILE).read_bytes() == before
    assert not table_file(tmp_path, 2).exists()  # nothing written
    load_tiered_model(tmp_path, store=STORE).close()


def test_the_dense_file_gets_the_mode_of_the_table_files(config, tmp_path):
    """safetensors writes its file owner-only (0600) whatever the umask: a server running as
    another user read every table but not the dense weights."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        converted = save_tiered(EngramLM(config), tmp_path)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes[converted.dense_path.name] == modes[converted.table_paths[1].name] == 0o644
    assert sorted(modes) == sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))


def test_a_dense_file_with_a_key_the_model_lacks_is_a_config_error_naming_it(config, tmp_path):
    """torch's load_state_dict raised a RuntimeError naming neither the file nor the checkpoint
    (``tiered-store serve`` printed its traceback)."""
    from safetensors.torch import load_file, save_file

    from tiered_store.engram.checkpoint import CONFIG_METADATA_KEY, DENSE_FILE

    converted = save_tiered(EngramLM(config), tmp_path)
    dense = load_file(converted.dense_path)
    dense["layers.0.extra.weight"] = torch.zeros(2)
    metadata = {CONFIG_METADATA_KEY: json.dumps(config.to_dict())}
    save_file(dense, str(converted.dense_path), metadata=metadata)
    with pytest.raises(
        ConfigError, match=rf"{DENSE_FILE}: layers\.0\.extra\.weight: not a key of this EngramLM"
    ):
        load_tiered_model(tmp_path, store=STORE)
    load_tiered_model(tmp_path, store=STORE, strict=False).close()  # ignored, as torch does


def test_a_model_too_large_for_the_memory_is_refused_only_where_it_would_be_allocated():
    """On the meta device (a checkpoint's expected shapes, read before a save) nothing is
    allocated: it was refused as the CPU build is. The refusal names the setting that is large."""
    huge = {**TINY["engram"], "engram_vocab_size": [50_000_000_000, 3001]}
    config = ModelConfig.from_dict({**TINY, "engram": huge})
    with torch.device("meta"):
        assert EngramLM(config).embed.weight.is_meta
    hasher = NgramHasher(config.engram)
    assert expected_checkpoint_shapes(config, hasher)["embed.weight"] == (129280, 64)
    with pytest.raises(ConfigError, match=r"^engram.engram_vocab_size \[50000000000, 3001\]: "):
        EngramLM(config, hasher=hasher)
    for key, value in (("vocab_size", 10_000_000_000), ("num_layers", 10_000_000)):
        wide = ModelConfig.from_dict({**TINY, "backbone": {**TINY["backbone"], key: value}})
        with pytest.raises(ConfigError, match=rf"^backbone.{key} {value}: the model needs "):
            EngramLM(wide)


def test_a_checkpoint_missing_a_table_names_what_makes_a_checkpoints_tables(converted):
    """A checkpoint whose layer table is gone was refused with `tiered-store init` as the way to
    make it: that command makes a plain table, which the layout check then refuses. The error
    names the layer and the commands that write a checkpoint's tables."""
    from tiered_store.table_format import TableNotFoundError

    directory = converted.table_paths[3].parent
    for file in directory.glob("engram_layer3.npy*"):
        file.unlink()
    with pytest.raises(TableNotFoundError) as missing:
        load_tiered_model(directory, store=STORE)
    message = str(missing.value)
    assert "tiered-store init`" not in message
    assert f"Engram layer 3: table {directory / 'engram_layer3.npy'} does not exist" in message
    assert "convert_checkpoint" in message and "`tiered-store init-model CONFIG`" in message


def test_a_batch_hashed_by_a_model_with_other_engram_layers_is_refused(model, converted, batches):
    """An EngramBatch made by a model with other Engram layers failed with an unrelated error
    (forward: "input_ids: required when row_ids is not given"; fetch: KeyError 3). Both name the
    layers the batch holds and the ones this model expects, before any lookup."""
    torch.manual_seed(0)
    other = EngramLM(
        ModelConfig.from_dict({**TINY, "engram": {**TINY["engram"], "layer_ids": [1]}})
    )
    stores = open_tables(converted.table_paths, model.hasher, STORE)
    model.set_tables(stores)
    try:
        said = r"holds rows of Engram layers \[1\]; expected this model's Engram layers \[1, 3\]"
        with pytest.raises(ConfigError, match=said):
            model(batches[0], prefetched=other.prefetch(batches[0]))
        with pytest.raises(ConfigError, match=said):
            model.fetch(other.hash(batches[0]))
        assert all(s.stats()["lookup"]["calls"] == 0 for s in stores.values())
        assert all(s.prefetches_started == 0 for s in stores.values())
    finally:
        model.close()


def test_a_batch_hashed_by_a_model_with_another_engram_config_is_refused(model, batches):
    """A batch hashed by a model with the same Engram layers but another hash seed passed, and
    the forward ran on that model's row ids: wrong logits, no error. It is refused, naming the
    field; a model of an equal config (its own hasher) still takes it."""
    torch.manual_seed(0)
    reseeded = EngramLM(ModelConfig.from_dict({**TINY, "engram": {**TINY["engram"], "seed": 7}}))
    said = r"hashed with engram\.seed=7; this model's is \d+ \(the batch was made by another model"
    with pytest.raises(ConfigError, match=said):
        model(batches[0], prefetched=reseeded.prefetch(batches[0]))
    with pytest.raises(ConfigError, match=said):
        model.fetch(reseeded.hash(batches[0]))
    twin = EngramLM(model.config)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(
            model(batches[0], prefetched=twin.prefetch(batches[0])), model(batches[0])
        )


def test_reading_a_corpus_with_a_tokenizer_without_eos_says_so_and_batches_take_integers(
    tmp_path,
):
    """read_tokens left out the document separator without a word when the tokenizer has no
    end-of-sentence token; token_batches took batch_size=True for 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tiered_store.corpus import resolve_corpus
    from tiered_store.engram import CompressedTokenizer
    from tiered_store.engram.corpus import read_tokens, token_batches

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "<pad>": 1, "hello": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tmp_path / "tokenizer.json"))
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text("hello hello\n")
    tokenizer = CompressedTokenizer(tmp_path / "tokenizer.json", pad_id=1, cache=False)
    corpus = resolve_corpus([str(tmp_path / "*.txt")])
    with pytest.warns(UserWarning, match=r"tokenizer\.json' has no end-of-sentence token"):
        assert read_tokens(corpus, tokenizer, max_tokens=100).tolist() == [2] * 6
    tokens = np.arange(32)
    for bad in ((True, 4), (2, False), (2.0, 4), (2, 0)):
        with pytest.raises(ConfigError, match=r"batch: expected integers batch_size >= 1"):
            token_batches(tokens, *bad)
    assert [tuple(b.shape) for b in token_batches(tokens, 2, 4)] == [(2, 4)] * 4


def test_token_batches_take_numpy_and_torch_integers():
    """06cae7f's check refused np.int64(2) as batch_size ('expected integers ... got np.int64(2)'),
    which token_batches took before: sizes computed with NumPy stopped the run."""
    from tiered_store.engram.corpus import token_batches

    tokens = np.arange(32)
    assert [tuple(b.shape) for b in token_batches(tokens, np.int64(2), torch.tensor(4))] == [
        (2, 4)
    ] * 4
    with pytest.raises(ConfigError, match=r"got np\.True_ x 4"):
        token_batches(tokens, np.True_, 4)


def test_iter_batches_names_a_round_count_below_one_or_not_an_integer():
    """iter_batches gave nothing at all for rounds=0, NumPy's 'Number of samples, -1, must be
    non-negative' for -1 and its TypeError for 2.5; each is a ConfigError naming rounds now, and
    a NumPy integer is taken as the int it holds."""
    from tiered_store.engram.corpus import iter_batches

    batches = [torch.zeros(1, 2)] * 5
    assert [len(g) for g in iter_batches(batches, np.int64(2))] == [2, 3]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match=rf"rounds: expected an integer >= 1, got {bad!r}"):
            list(iter_batches(batches, bad))


def test_token_batches_of_a_read_only_memmap_are_copies(tmp_path):
    """A read-only int64 memmap of tokens went to torch.from_numpy as it was: torch warned that
    the array is not writable (writing a batch would write the read-only map)."""
    from tiered_store.engram.corpus import token_batches

    path = tmp_path / "tokens.bin"
    np.arange(64, dtype=np.int64).tofile(path)
    tokens = np.memmap(path, dtype=np.int64, mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns once a process: the pointer is checked too
        batches = token_batches(tokens, 2, 16)
    assert [b.tolist() for b in batches] == np.arange(64).reshape(2, 2, 16).tolist()
    assert batches[0].data_ptr() != tokens.ctypes.data
    writable = np.arange(64)
    assert token_batches(writable, 2, 16)[0].data_ptr() == writable.ctypes.data  # no copy


def test_read_tokens_takes_a_numpy_count_and_names_a_bool_or_float(tmp_path):
    """max_tokens=np.int64(5) (a sum of NumPy sizes) was refused as "expected an integer >= 1,
    got np.int64(5)"; any integer is taken, a bool or a float is named."""
    from tiered_store.corpus import resolve_corpus
    from tiered_store.engram import CompressedTokenizer
    from tiered_store.engram.corpus import read_tokens

    (tmp_path / "doc.txt").write_text("def lookup(table, ids):\n    return table[ids]\n" * 20)
    corpus, tokenizer = resolve_corpus([tmp_path]), CompressedTokenizer()
    assert read_tokens(corpus, tokenizer, max_tokens=np.int64(5)).shape == (5,)
    for bad in (True, 5.0, 0):
        with pytest.raises(ConfigError, match=rf"^max_tokens: got {bad!r}; expected an integer >= 1$"):  # fmt: skip
            read_tokens(corpus, tokenizer, max_tokens=bad)


def test_read_tokens_stops_reading_files_once_it_has_enough_text(tmp_path):
    """ "Reading stops once enough are read" was not so: 64 files were read (whole) before the
    first was tokenised, so a cap of 50 tokens over big files read all 64. Files past enough
    text are not read now: an empty one there is not even found empty."""
    from tiered_store.corpus import SkippedFilesWarning, resolve_corpus
    from tiered_store.engram import CompressedTokenizer
    from tiered_store.engram.corpus import read_tokens

    (tmp_path / "a.txt").write_text("def lookup(table, ids):\n    return table[ids]\n" * 40)
    (tmp_path / "b.txt").write_text("   \n")  # empty: a SkippedFilesWarning names it if read
    corpus = resolve_corpus([tmp_path / "a.txt", tmp_path / "b.txt"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_tokens(corpus, CompressedTokenizer(), max_tokens=50).shape == (50,)
    with pytest.warns(SkippedFilesWarning, match=r"b\.txt \(empty\)"):  # read when needed
        read_tokens(corpus, CompressedTokenizer(), max_tokens=10_000)


@pytest.mark.parametrize("piece_chars", [None, 24])
def test_a_capped_token_stream_is_the_uncapped_streams_prefix(tmp_path, monkeypatch, piece_chars):
    """read_tokens tokenises as soon as the text read can hold the tokens still wanted (47d4260),
    not in groups of 64 files: a cap, wherever it ends (mid-file, at a file's end, past a file of
    no tokens), gives the first tokens of the uncapped stream, also where a document is encoded
    in pieces whose ids differ from the whole text's by merges across a cut."""
    import tiered_store.engram.tokenizer as tokenizer_module
    from tiered_store.corpus import resolve_corpus
    from tiered_store.engram import CompressedTokenizer
    from tiered_store.engram.corpus import read_tokens

    if piece_chars is not None:
        monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", piece_chars)
    texts = ["def lookup(table, ids):\n    return table[ids]\n" * 9, "0123 4567\n" * 3]
    texts += ["x = [i * i for i in range(10)]\n" * (k % 4 + 1) for k in range(12)]
    for i, text in enumerate(texts):
        (tmp_path / f"d{i:02}.py").write_text(text)
    corpus, tokenizer = resolve_corpus([tmp_path]), CompressedTokenizer()
    whole = read_tokens(corpus, tokenizer, max_tokens=10**9)
    for cap in (*range(1, 60, 7), *range(150, len(whole) + 2, 31), len(whole)):
        assert read_tokens(corpus, tokenizer, max_tokens=cap).tolist() == whole[:cap].tolist(), cap
    # a tokenizer that makes no token of some documents (digits normalised away), with no EOS
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "<pad>": 1, "x": 2}, unk_token="[UNK]"))
    words.normalizer = normalizers.Replace(Regex("[0-9]"), "")
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tmp_path / "tokenizer.json"))
    words = CompressedTokenizer(tmp_path / "tokenizer.json", pad_id=1, cache=False)
    with pytest.warns(UserWarning, match="no end-of-sentence token"):
        whole = read_tokens(corpus, words, max_tokens=10**9)
        for cap in range(1, len(whole) + 2, 5):
            assert read_tokens(corpus, words, max_tokens=cap).tolist() == whole[:cap].tolist()


def test_a_model_on_the_cpu_never_asks_whether_its_ids_are_pinned(model, batches):
    """Each hash asked whether the ids were pinned (for the token mask, and for the batch's copy
    of a caller's tensor): on a machine with a GPU, Tensor.is_pinned() of a CPU tensor may
    start a CUDA context (torch asks the driver), so a model on the CPU took GPU memory for
    nothing. Only a model on the GPU asks now; the batch is as before."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Asked(TorchDispatchMode):
        """Counts Tensor.is_pinned() calls."""

        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func is torch.ops.aten.is_pinned.default
            return func(*args, **(kwargs or {}))

    ids = batches[0]
    with Asked() as asked:
        batch = model.hash(ids)
        mask = model.hash(ids, torch.ones(ids.shape, dtype=torch.bool)).token_mask
        with torch.no_grad():
            model(ids, prefetched=batch, logits="last")
    assert asked.calls == 0
    assert torch.equal(batch.input_ids, ids) and batch.input_ids.data_ptr() != ids.data_ptr()
    assert batch.token_mask.all() and mask.all() and not batch.token_mask.is_pinned()


def test_a_state_that_is_no_hash_state_is_named_by_hash_and_prefetch(model, batches):
    """model.hash(ids, state="x") raised AttributeError ('str' object has no attribute
    'position') before the hasher's check of the state: it is the hasher's ConfigError now."""
    for call in (model.hash, model.prefetch):
        with pytest.raises(ConfigError, match=r"^state: got a str; expected a HashState"):
            call(batches[0], state="x")


def test_fetch_of_no_engram_batch_is_named(model, batches):
    """model.fetch("x") raised AttributeError ('str' object has no attribute 'row_ids'); it is
    a ConfigError naming what fetch takes, as the forward's prefetched is refused."""
    for bad in ("x", None, {1: torch.zeros(1)}):
        with pytest.raises(ConfigError, match=r"^batch: got a \w+; expected an EngramBatch from"):
            model.fetch(bad)
