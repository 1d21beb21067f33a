"""The Engram module: golden forward pass, pluggable table backends, checkpoint checks, gradients."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import golden_dir
from tiered_store.engram import (
    EMBEDDING_KEY,
    BackboneConfig,
    Engram,
    EngramConfig,
    InMemoryTable,
    NgramHasher,
    TableBackend,
    load_engram_config,
    split_checkpoint,
)
from tiered_store.errors import ConfigError, RowIdError, StoreClosedError
from tiered_store.store import TieredStore
from tiered_store.table_format import create_table


def _golden_dir() -> Path:
    return golden_dir("engram_forward.safetensors")


LAYERS = [1, 4]


@pytest.fixture(scope="module")
def setup():
    """(engram config, backbone config, shared hasher, golden tensors, checkpoint path)."""
    root = _golden_dir()
    meta = json.loads((root / "engram_forward.json").read_text())
    config, backbone = load_engram_config(meta, ignore_unknown=True)
    assert list(config.layer_ids) == LAYERS
    path = root / "engram_forward.safetensors"
    return config, backbone, NgramHasher(config), load_file(path), path


class CountingTable(TableBackend):
    """A non-Module backend (like the tiered store) that records prefetch/lookup calls."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, self.rows, self.dim = weight, weight.shape[0], weight.shape[1]
        self.prefetched: list[torch.Tensor] = []
        self.handles: list[object] = []

    def prefetch(self, row_ids: torch.Tensor) -> object:
        self.prefetched.append(row_ids)
        return ("handle", len(self.prefetched))

    def lookup(self, row_ids: torch.Tensor, handle: object | None = None) -> torch.Tensor:
        self.handles.append(handle)
        return self.weight[row_ids]


@pytest.mark.parametrize("layer", LAYERS)
def test_forward_matches_golden(setup, layer):
    config, backbone, hasher, data, path = setup
    engram = Engram.from_checkpoint(path, config, backbone, layer, hasher=hasher)
    hidden = data[f"layer{layer}.hidden_states"]
    with torch.no_grad():
        out = engram(hidden, data["input_ids"])
        out_np = engram(hidden, data["input_ids"].numpy())  # NumPy ids are hashed the same
    assert out.shape == hidden.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, data[f"layer{layer}.output"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out_np, out, atol=0, rtol=0)


def test_state_dict_is_reference_layout(setup):
    config, backbone, hasher, data, path = setup
    engram = Engram.from_checkpoint(path, config, backbone, 1, hasher=hasher)
    reference = {k[len("layer1.") :] for k in data if k.startswith("layer1.")}
    assert set(engram.state_dict()) == reference - {"hidden_states", "output"}
    fresh = Engram(config, backbone, 1, hasher=hasher)  # default table, then the reference dict
    fresh.load_state_dict({k: data[f"layer1.{k}"] for k in engram.state_dict()})
    for key, value in engram.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, atol=0, rtol=0)


def test_external_backend_with_prefetched_row_ids(setup):
    config, backbone, hasher, data, path = setup
    weight, dense = split_checkpoint(path, 4)
    table = CountingTable(weight)
    assert isinstance(table, TableBackend) and isinstance(InMemoryTable(weight), TableBackend)
    engram = Engram(config, backbone, 4, hasher=hasher, backend=table)
    engram.load_state_dict(dense)  # strict: the table is not part of the module's state_dict
    assert EMBEDDING_KEY not in engram.state_dict()
    rows, handle = engram.prefetch(data["input_ids"])
    torch.testing.assert_close(rows, torch.from_numpy(hasher.row_ids(data["input_ids"].numpy())[4]))
    with torch.no_grad():
        out = engram(data["layer4.hidden_states"], row_ids=rows, handle=handle)
    assert table.handles == [handle] and table.prefetched[0] is rows
    torch.testing.assert_close(out, data["layer4.output"], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="external backend"):
        engram.load_state_dict({**dense, EMBEDDING_KEY: weight})


def test_split_checkpoint_sources(setup):
    *_, data, path = setup
    weight, dense = split_checkpoint(path, 1)
    torch.testing.assert_close(weight, data[f"layer1.{EMBEDDING_KEY}"])
    assert "hidden_states" not in dense and "output" not in dense and EMBEDDING_KEY not in dense
    assert "short_conv.conv.weight" in dense and "multi_head_embedding.offsets" in dense
    w2, d2 = split_checkpoint(dict(data), 1)  # a prefixed state_dict
    torch.testing.assert_close(w2, weight)
    assert set(d2) == set(dense)
    unprefixed = {k[len("layer1.") :]: v for k, v in data.items() if k.startswith("layer1.")}
    w3, d3 = split_checkpoint(unprefixed, 1)
    torch.testing.assert_close(w3, weight)
    assert set(d3) == set(dense)
    with pytest.raises(ConfigError, match="missing"):
        split_checkpoint(dense, 1)
    with pytest.raises(ConfigError, match="cannot read"):
        split_checkpoint(path.parent / "no_such_file.safetensors", 1)


def test_a_checkpoint_without_the_layer_names_the_layers_it_holds(setup, tmp_path):
    """A checkpoint of another config (Engram at other layers) said only
    "multi_head_embedding.embedding.weight: missing from the checkpoint": not the key looked
    for (layer2.), nor that the file holds layers 1 and 4."""
    from safetensors.torch import save_file

    *_, data, path = setup
    want = rf"layer2\.{re.escape(EMBEDDING_KEY)}: missing from the checkpoint"
    held = r"it holds Engram layers \[1, 4\] \(keys layer1\., layer4\.\); expected layer 2's"
    with pytest.raises(ConfigError, match=rf"{want} {re.escape(str(path))}, {held}"):
        split_checkpoint(path, 2)
    with pytest.raises(ConfigError, match=rf"{want}, {held}"):
        split_checkpoint(dict(data), 2)
    only4 = tmp_path / "layer4.safetensors"
    save_file({k: v for k, v in data.items() if k.startswith("layer4.")}, str(only4))
    with pytest.raises(ConfigError, match=r"layer1\..* it holds Engram layers \[4\] "):
        split_checkpoint(only4, 1)


def test_checkpoint_shape_mismatch_errors_before_compute(setup):
    config, backbone, hasher, data, path = setup
    wide = BackboneConfig(hidden_size=64, hc_mult=4)
    with pytest.raises(ConfigError, match=r"checkpoint shape \[48.*hidden_size=64"):
        Engram.from_checkpoint(path, config, wide, 1, hasher=hasher)
    other = EngramConfig(
        engram_vocab_size=(2003, 4001), n_embed_per_ngram=64, n_head_per_ngram=4, layer_ids=(1, 4)
    )
    with pytest.raises(
        ConfigError, match=rf"{EMBEDDING_KEY}: checkpoint table shape \[20112, 16\]"
    ):
        Engram.from_checkpoint(path, other, backbone, 1)
    engram = Engram.from_checkpoint(path, config, backbone, 1, hasher=hasher)
    before = engram.value_proj.weight.detach().clone()
    bad = {k: data[f"layer1.{k}"] for k in engram.state_dict()}
    bad["key_projs.2.weight"] = torch.zeros(48, 96)
    with pytest.raises(ConfigError, match=r"key_projs\.2\.weight: .*\[48, 96\].*\[48, 128\]"):
        engram.load_state_dict(bad)
    bad = {k: data[f"layer1.{k}"] for k in engram.state_dict()}
    bad["multi_head_embedding.offsets"] = data["layer4.multi_head_embedding.offsets"]
    with pytest.raises(ConfigError, match="offsets"):
        engram.load_state_dict(bad)
    torch.testing.assert_close(engram.value_proj.weight, before)  # nothing half-loaded
    parent = nn.ModuleDict({"layer1": Engram(config, backbone, 1, hasher=hasher)})
    nested = {f"layer1.{k}": v for k, v in engram.state_dict().items()}
    nested["layer1.norm1.0.weight"] = torch.ones(7)
    with pytest.raises(ConfigError, match=r"layer1\.norm1\.0\.weight"):  # checked when nested too
        parent.load_state_dict(nested)


def test_input_and_backend_errors(setup):
    config, backbone, hasher, data, path = setup
    with pytest.raises(ConfigError, match=r"backend: expected a table of 20112 rows x 16"):
        Engram(config, backbone, 1, hasher=hasher, backend=InMemoryTable(torch.zeros(10, 16)))
    with pytest.raises(ConfigError, match="layer_id"):
        Engram(config, backbone, 2, hasher=hasher)
    engram = Engram.from_checkpoint(path, config, backbone, 1, hasher=hasher)
    with pytest.raises(ConfigError, match=r"hidden_states: expected shape \[B, T, 4, 48\]"):
        engram(torch.zeros(3, 32, 2, 48), data["input_ids"])
    with pytest.raises(ConfigError, match="row_ids: expected shape"):
        engram(data["layer1.hidden_states"], row_ids=torch.zeros(3, 32, 5, dtype=torch.long))
    with pytest.raises(IndexError, match="outside the tokenizer vocabulary"):  # RowIdError
        engram(data["layer1.hidden_states"], torch.full((3, 32), 129280))
    hidden = data["layer1.hidden_states"]  # [3, 32, ...]: ids of another length named as such
    for ids in (data["input_ids"][:, :31], data["input_ids"][:, :31].numpy()):
        with pytest.raises(ConfigError, match=r"input_ids: expected shape \[3, 32\] .*\[3, 31\]"):
            engram(hidden, ids)  # reported as a row_ids shape, an argument not given
    with pytest.raises(ConfigError, match=r"input_ids: expected a rectangular array"):
        engram(hidden, [[1, 2], [3]])  # NumPy's raw ValueError
    with pytest.raises(ConfigError, match=r"input_ids: expected a rectangular array"):
        engram.prefetch([[1, 2], [3]])


def test_hidden_states_of_no_tensor_are_named_and_row_ids_are_read_as_lookup_reads_them(setup):
    """An array of hidden states raised torch's TypeError from .to() and a list of row ids an
    AttributeError ('list' object has no attribute 'shape'), where V41Engram names the first and
    reads the second as the table's lookup does; Engram does the same now."""
    config, backbone, hasher, data, path = setup
    engram = Engram.from_checkpoint(path, config, backbone, 1, hasher=hasher)
    hidden, ids = data["layer1.hidden_states"], data["input_ids"]
    with pytest.raises(
        ConfigError, match=r"hidden_states: got a ndarray; expected a torch.Tensor \[B, T, 4, 48\]"
    ):
        engram(hidden.numpy(), ids)
    rows = engram.row_ids(ids)
    with torch.no_grad():
        out = engram(hidden, row_ids=rows.tolist())
    torch.testing.assert_close(out, data["layer1.output"], atol=1e-5, rtol=0)


def test_chunked_decode_hashes_with_the_sequences_state(setup):
    """input_ids decoded in chunks with conv_state and a HashState give one forward's output at
    every position; without the state, a chunk after the first is refused (it would be hashed as
    if the sequence started there)."""
    config, backbone, hasher, data, path = setup
    engram = Engram.from_checkpoint(path, config, backbone, 1, hasher=hasher)
    hidden, ids = data["layer1.hidden_states"], data["input_ids"]
    conv, state = {}, hasher.new_state(ids.shape[0])
    with torch.no_grad():
        outs = [engram(hidden[:, :5], ids[:, :5], conv_state=conv, state=state)]
        rows, handle = engram.prefetch(ids[:, 5:6].numpy(), state=state)
        outs.append(engram(hidden[:, 5:6], row_ids=rows, handle=handle, conv_state=conv))
        for t in range(6, ids.shape[1]):
            step = ids[:, t : t + 1]
            outs.append(engram(hidden[:, t : t + 1], step, conv_state=conv, state=state))
        torch.testing.assert_close(torch.cat(outs, dim=1), data["layer1.output"], atol=1e-5, rtol=0)
        assert state.position == ids.shape[1]
        with pytest.raises(ConfigError, match=r"state: got None .*conv_state holds earlier"):
            engram(hidden[:, :1], ids[:, :1], conv_state=conv)


def test_a_state_and_conv_state_of_other_chunks_are_refused(setup):
    """input_ids with a HashState and a conv_state that disagree on the earlier chunks (a fresh
    state at chunk 2, or conv_state left out or fresh) are refused, each naming the side that is
    missing; they gave outputs up to 2.1 off one forward's in silence before."""
    config, backbone, hasher, data, path = setup
    engram = Engram.from_checkpoint(path, config, backbone, 1, hasher=hasher)
    hidden, ids = data["layer1.hidden_states"], data["input_ids"]
    conv, state = {}, hasher.new_state(ids.shape[0])
    with torch.no_grad():
        engram(hidden[:, :10], ids[:, :10], conv_state=conv, state=state)
        held = conv["inputs"]
        rest = hidden[:, 10:], ids[:, 10:]
        fresh = hasher.new_state(ids.shape[0])
        with pytest.raises(ConfigError, match=r"state: at position 0 while conv_state holds"):
            engram(*rest, conv_state=conv, state=fresh)
        for other, said in ((None, "got None"), ({}, "holds no earlier chunks")):
            with pytest.raises(
                ConfigError, match=rf"conv_state: {said} while state is at position 10"
            ):
                engram(*rest, conv_state=other, state=state)
        assert fresh.position == 0 and state.position == 10 and conv["inputs"] is held
        out = engram(*rest, conv_state=conv, state=state)  # the two that go together
        torch.testing.assert_close(out, data["layer1.output"][:, 10:], atol=1e-5, rtol=0)


def test_a_conv_state_of_another_batch_is_named(setup):
    """A chunk of fewer sequences than its conv_state holds (row ids hashed apart) raised
    torch's "Sizes of tensors must match" from the ShortConv's concatenation, after the lookup;
    it is a ConfigError naming both counts, before any lookup, the conv_state as it was."""
    config, backbone, hasher, data, path = setup
    table = CountingTable(torch.randn(hasher.table_rows(1), config.head_dim))
    engram = Engram(config, backbone, 1, hasher=hasher, backend=table)
    hidden, ids = data["layer1.hidden_states"], data["input_ids"]
    conv, state = {}, hasher.new_state(ids.shape[0])
    with torch.no_grad():
        engram(hidden[:, :10], ids[:, :10], conv_state=conv, state=state)
        held, looked_up = conv["inputs"], len(table.handles)
        rows = engram.row_ids(ids[:1, 10:11])
        with pytest.raises(
            ConfigError,
            match=r"^conv_state: holds the inputs of 3 sequences; expected 1, the batch of "
            r"hidden_states",
        ):
            engram(hidden[:1, 10:11], row_ids=rows, conv_state=conv)
        assert conv["inputs"] is held and len(table.handles) == looked_up


def test_a_chunk_whose_lookup_or_prefetch_failed_leaves_both_states_as_before(setup, tmp_path):
    """A chunk whose table failed (its store closed) had moved the HashState past the chunk: run
    again on a reopened store, it was hashed one chunk too far and gave another output in
    silence. Forward and prefetch now leave the state (and conv_state) as they were."""
    config, backbone, hasher, data, path = setup
    weight, dense = split_checkpoint(path, 1)
    create_table(tmp_path / "layer1.npy", weight.numpy(), progress=False)
    spec = {"table": {"path": str(tmp_path / "layer1.npy")}, "tiers": {"hot": {"capacity": 64}}}
    store = TieredStore.open(spec)
    engram = Engram(config, backbone, 1, hasher=hasher, backend=store)
    engram.load_state_dict(dense)
    hidden, ids = data["layer1.hidden_states"], data["input_ids"]
    conv, state = {}, hasher.new_state(ids.shape[0])
    try:
        with torch.no_grad():
            outs = [engram(hidden[:, :10], ids[:, :10], conv_state=conv, state=state)]
            tail, inputs = state.tail.clone(), conv["inputs"]
            store.close()
            with pytest.raises(StoreClosedError):
                engram(hidden[:, 10:20], ids[:, 10:20], conv_state=conv, state=state)
            with pytest.raises(StoreClosedError):
                engram.prefetch(ids[:, 10:20], state=state)
            assert state.position == 10 and torch.equal(state.tail, tail)
            assert conv["inputs"] is inputs
            store = TieredStore.open(spec)
            engram.set_table(store)
            outs.append(engram(hidden[:, 10:], ids[:, 10:], conv_state=conv, state=state))
        torch.testing.assert_close(torch.cat(outs, dim=1), data["layer1.output"], atol=1e-5, rtol=0)
    finally:
        store.close()


def test_a_chunk_that_failed_after_its_short_conv_leaves_both_states_as_before(setup):
    """A chunk that raised once its ShortConv had run (the final add out of memory, a Ctrl-C)
    rewound the HashState but kept the ShortConv's inputs of the failed chunk in conv_state:
    run again, the convolution saw that chunk twice and gave another output in silence. Both
    states are now as before the chunk, with input_ids or with row_ids."""
    config, backbone, hasher, data, path = setup
    engram = Engram.from_checkpoint(path, config, backbone, layer_id=1, hasher=hasher)
    hidden, ids = data["layer1.hidden_states"], data["input_ids"]

    def interrupted(module, args, output):
        raise KeyboardInterrupt

    conv, state = {}, hasher.new_state(ids.shape[0])
    with torch.no_grad():
        outs = [engram(hidden[:, :10], ids[:, :10], conv_state=conv, state=state)]
        inputs, tail = conv["inputs"], state.tail.clone()
        hook = engram.short_conv.register_forward_hook(interrupted)  # once the conv returned
        try:
            with pytest.raises(KeyboardInterrupt):
                engram(hidden[:, 10:20], ids[:, 10:20], conv_state=conv, state=state)
            assert state.position == 10 and torch.equal(state.tail, tail)
            assert conv["inputs"] is inputs
            rows = hasher.new_state(ids.shape[0])
            hasher.row_ids_layer(ids[:, :10], 1, state=rows)
            row_ids = engram.row_ids(ids[:, 10:20], state=rows)
            with pytest.raises(KeyboardInterrupt):
                engram(hidden[:, 10:20], row_ids=row_ids, conv_state=conv)
            assert conv["inputs"] is inputs
            first = {}
            with pytest.raises(KeyboardInterrupt):  # the first chunk: no inputs kept either
                engram(hidden[:, :10], row_ids=engram.row_ids(ids[:, :10]), conv_state=first)
            assert first == {}
        finally:
            hook.remove()
        outs.append(engram(hidden[:, 10:], ids[:, 10:], conv_state=conv, state=state))
    torch.testing.assert_close(torch.cat(outs, dim=1), data["layer1.output"], atol=1e-5, rtol=0)


def test_a_long_chunk_leaves_only_what_the_convolution_reaches_in_conv_state():
    """conv_state kept a view of the chunk's whole normalised inputs, so a prefill of 2,000
    positions held all of them (2 MB here, [B, hc * hidden, T] floats per Engram layer, as much
    as two layers of attention keys and values) until the next chunk, for the 9 positions the
    convolution reaches back; it holds those alone."""
    from tiered_store.engram.module import ShortConv

    conv, state = ShortConv(hidden_size=64, kernel_size=4, dilation=3, hc_mult=4), {}
    with torch.no_grad():
        x = torch.randn(1, 2000, 4, 64)
        whole = conv(x)
        first = conv(x[:, :1990], state)
        kept = state["inputs"]
        assert tuple(kept.shape) == (1, 256, 9)
        held = kept.untyped_storage().nbytes()  # the memory the view keeps alive
        assert held == kept.numel() * kept.element_size()
        rest = conv(x[:, 1990:], state)  # and the chunks still make the whole
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole, atol=1e-6, rtol=0)


def test_a_chunk_of_no_tokens_changes_nothing(setup):
    """A 0-token forward (torch's raw Conv1d RuntimeError before), first or not, with or without
    conv_state, gives an empty output and leaves both states as they were."""
    config, backbone, hasher, data, path = setup
    engram = Engram.from_checkpoint(path, config, backbone, 1, hasher=hasher)
    hidden, ids = data["layer1.hidden_states"], data["input_ids"]
    conv, state = {}, hasher.new_state(ids.shape[0])
    with torch.no_grad():
        assert engram(hidden[:, :0], ids[:, :0]).shape == (3, 0, 4, 48)
        outs = []
        for a, b in ((0, 0), (0, 7), (7, 7), (7, 32), (32, 32)):
            tail, inputs = state.tail.clone(), conv.get("inputs")
            outs.append(engram(hidden[:, a:b], ids[:, a:b], conv_state=conv, state=state))
            if a == b:
                assert outs[-1].shape == (3, 0, 4, 48) and torch.equal(state.tail, tail)
                assert conv.get("inputs") is inputs
        torch.testing.assert_close(torch.cat(outs, dim=1), data["layer1.output"], atol=1e-5, rtol=0)
        assert state.position == ids.shape[1]


def test_a_state_that_is_no_hash_state_is_named(setup):
    """Engram.row_ids, prefetch and forward refuse a state that is no HashState by its type (a
    raw AttributeError about ``tail`` from the hasher before), leaving conv_state as it was."""
    config, backbone, hasher, data, path = setup
    engram = Engram.from_checkpoint(path, config, backbone, 1, hasher=hasher)
    hidden, ids = data["layer1.hidden_states"][:, :2], data["input_ids"][:, :2]
    conv: dict[str, torch.Tensor] = {}
    calls = (
        lambda bad: engram.row_ids(ids, state=bad),
        lambda bad: engram.prefetch(ids.numpy(), state=bad),
        lambda bad: engram(hidden, ids, conv_state=conv, state=bad),
    )
    with torch.no_grad():
        for bad in ({}, torch.full((3, 2), -1), 3):
            for call in calls:
                with pytest.raises(ConfigError, match=rf"state: got a {type(bad).__name__}; "):
                    call(bad)
    assert not conv


def test_bad_row_ids_and_integer_tables_are_named(setup):
    """Row ids given to forward are checked by the in-memory table (not an IndexError from torch);
    an integer table (e.g. packed fp8 bytes or rounded rows) is refused, not silently cast."""
    config, backbone, hasher, data, path = setup
    engram = Engram.from_checkpoint(path, config, backbone, 1, hasher=hasher)
    hidden, rows = data["layer1.hidden_states"], hasher.table_rows(1)
    bad = torch.zeros(3, 32, 8, dtype=torch.long)
    bad[2, 7, 5] = rows
    with pytest.raises(RowIdError, match=rf"row_ids: value {rows} at index \(2, 7, 5\) .*< {rows}"):
        engram(hidden, row_ids=bad)
    with pytest.raises(RowIdError, match=r"row_ids: value -1 at index \(0, 0, 0\)"):
        engram(hidden, row_ids=torch.full((3, 32, 8), -1))
    with pytest.raises(RowIdError, match=r"row_ids: expected integer row ids, got torch.float32"):
        engram(hidden, row_ids=torch.zeros(3, 32, 8))
    nested = torch.nested.nested_tensor(list(torch.zeros(3, 32, 8, dtype=torch.long)))
    with pytest.raises(RowIdError, match=r"row_ids: tensor int64 nested \(3 tensors\) is a nested"):
        engram(hidden, row_ids=nested)  # torch's 'NestedTensorImpl doesn't support sizes' before
    with pytest.raises(RowIdError, match=r"input_ids: tensor int64 \(3, 32\) is on the meta"):
        engram(hidden, data["input_ids"].to("meta"))  # 'Cannot copy out of meta tensor' before
    table = InMemoryTable(torch.eye(4))
    for dtype in (torch.uint8, torch.int16, torch.int32):  # torch's bare RuntimeError but int32
        assert torch.equal(table.lookup(torch.tensor([3, 1], dtype=dtype)), torch.eye(4)[[3, 1]])
    for ids in ([3, 1], np.array([3, 1])):  # as the store and the packed table take them
        assert torch.equal(table.lookup(ids), torch.eye(4)[[3, 1]])  # AttributeError before
    # before: a uint64 id past int64 was named by its wrapped negative value, a meta or sparse
    # tensor failed with torch's bare error
    with pytest.raises(RowIdError, match=r"ids: value 9223372036854775813 does not fit int64"):
        table.lookup(torch.tensor([1, 2**63 + 5], dtype=torch.uint64))
    for ids, what in (
        (torch.zeros(2, dtype=torch.long, device="meta"), "is on the meta device"),
        (torch.tensor([[0, 1]]).to_sparse(), "has layout torch.sparse_coo"),
    ):
        with pytest.raises(RowIdError, match=rf"ids: tensor int64 .* {what}"):
            table.lookup(ids)
    with pytest.raises(
        ConfigError, match=r"weight: expected a floating-point table, got torch.int64"
    ):
        InMemoryTable(torch.zeros(rows, 16, dtype=torch.long))


def test_in_memory_table_gradients_reach_table_and_dense_params(setup):
    config, backbone, hasher, data, path = setup
    engram = Engram.from_checkpoint(path, config, backbone, 1, hasher=hasher)
    engram(data["layer1.hidden_states"], data["input_ids"]).square().sum().backward()
    table = engram.table
    assert isinstance(table, InMemoryTable) and isinstance(table.weight, nn.Parameter)
    touched = torch.unique(engram.row_ids(data["input_ids"]))
    grad = table.weight.grad
    assert grad is not None and grad[touched].abs().sum(dim=1).gt(0).all()
    untouched = torch.ones(table.rows, dtype=torch.bool)
    untouched[touched] = False
    assert grad[untouched].eq(0).all()  # only looked-up rows get gradient (nn.Embedding)
    for name, param in engram.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    frozen = InMemoryTable(torch.randn(5, 3))  # plain tensor: buffer, saved, not trained
    assert list(frozen.parameters()) == [] and "weight" in frozen.state_dict()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layer", LAYERS)
def test_forward_matches_golden_on_cuda(setup, layer, monkeypatch):
    config, backbone, hasher, data, path = setup
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    engram = Engram.from_checkpoint(path, config, backbone, layer, hasher=hasher).cuda()
    with torch.no_grad():
        out = engram(data[f"layer{layer}.hidden_states"].cuda(), data["input_ids"].cuda())
    torch.testing.assert_close(out.cpu(), data[f"layer{layer}.output"], atol=1e-5, rtol=0)


def _interrupted_at(k: int, call, *args) -> int:
    """Run ``call(*args)`` with a Ctrl-C raised at the k-th point where a signal may be handled (a
    call's entry, a return): the points it met (fewer than k: none was interrupted)."""
    return _interrupted_twice_at(k, 0, call, *args)[0]  # (no line is the 0th: no second one)


# a Ctrl-C raised in a generator being closed is reported, not raised
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("to_module", [True, False], ids=["plain-to-module", "module-to-plain"])
def test_a_table_swap_interrupted_anywhere_leaves_the_old_table_or_the_new(setup, to_module):
    """set_table deleted the old table, then set the new one: a Ctrl-C between the two left a
    layer with no table at all (AttributeError on its next forward). Interrupted at each point
    in turn, the layer now serves the old table or the new one, and its state_dict holds the
    weight of that one (a module) or none (a plain backend)."""
    config, backbone, hasher, data, path = setup
    weight, _ = split_checkpoint(path, 1)
    k = 0
    while True:
        k += 1
        module, plain = InMemoryTable(weight.clone()), CountingTable(weight)
        old, new = (plain, module) if to_module else (module, plain)
        engram = Engram(config, backbone, 1, hasher=hasher, backend=old)
        points = _interrupted_at(k, engram.set_table, new)
        held = engram.multi_head_embedding
        table = held._modules.get("embedding", held.__dict__.get("embedding"))
        assert table is old or table is new, f"interrupt {k}: no table"
        assert engram.table is table, f"interrupt {k}"
        assert (EMBEDDING_KEY in engram.state_dict()) == isinstance(table, nn.Module)
        if points < k:  # every point has been interrupted once
            assert table is new
            break
    assert k > 10


def _interrupted_twice_at(k: int, j: int, call, *args) -> tuple[int, int]:
    """Run ``call(*args)`` with a Ctrl-C raised at the k-th point where a signal may be handled
    (as ``_interrupted_at``) and a second one at the j-th line run after it (of tiered_store or
    torch): the points and the lines after the first it met (fewer than k or j: not
    interrupted there)."""
    import sys
    import threading

    hits, lines = [0], [0]

    def trace(frame, event, arg):
        file = frame.f_code.co_filename
        if event == "line" and hits[0] >= k and ("tiered_store" in file or "torch" in file):
            lines[0] += 1
            if lines[0] == j:
                raise KeyboardInterrupt
        return trace

    def profile(frame, event, arg):
        if arg is sys.setprofile:  # the profiler's own end
            return
        hits[0] += 1
        if hits[0] == k:
            raise KeyboardInterrupt

    def interrupted() -> None:  # on a thread of its own: what the hooks leave ends with it
        sys.settrace(trace)
        sys.setprofile(profile)
        try:
            call(*args)
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
            sys.settrace(None)

    runner = threading.Thread(target=interrupted)
    runner.start()
    runner.join()
    return hits[0], lines[0]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("to_module", [True, False], ids=["plain-to-module", "module-to-plain"])
def test_a_second_ctrl_c_in_a_table_swaps_restore_still_leaves_a_table(setup, to_module):
    """A Ctrl-C in set_table's swap put the old table back; a second one inside that restore
    (between its removal of the new one and its setting of the old) left a layer with no table.
    Interrupted at each point, then again at each line after it, the layer now serves the old
    table or the new one, and its state_dict holds the weight of that one (a module) or none (a
    plain backend): a first Ctrl-C at the call between the swap's two steps, then a second as
    the except clause was entered, left it serving the plain one with the module's weight."""
    config, backbone, hasher, data, path = setup
    weight, _ = split_checkpoint(path, 1)
    runs, k = 0, 0
    while True:
        k += 1
        j = 0
        while True:
            j += 1
            module, plain = InMemoryTable(weight.clone()), CountingTable(weight)
            old, new = (plain, module) if to_module else (module, plain)
            engram = Engram(config, backbone, 1, hasher=hasher, backend=old)
            points, lines = _interrupted_twice_at(k, j, engram.set_table, new)
            runs += 1
            table = getattr(engram.multi_head_embedding, "embedding", None)
            assert table is old or table is new, f"interrupts {k}, {j}: no table"
            in_state = EMBEDDING_KEY in engram.state_dict()
            assert in_state == isinstance(table, nn.Module), f"interrupts {k}, {j}"
            if points < k or lines < j:  # the second interrupt met no line: the next point
                break
        if points < k:
            break
    assert runs > 20


def test_an_empty_in_memory_table_of_a_bad_size_is_named():
    """InMemoryTable.empty(-1, 2) raised torch's bare RuntimeError ("negative dimension") and
    empty(3.5, 2) a TypeError about empty()'s arguments: each names its argument now."""
    for rows, dim, name in ((-1, 2, "rows"), (3.5, 2, "rows"), (4, 0, "dim"), (True, 2, "rows")):
        with pytest.raises(ConfigError, match=rf"^{name}: got {dim if name == 'dim' else rows!r}"):
            InMemoryTable.empty(rows, dim)
    assert InMemoryTable.empty(np.int64(3), 2).weight.shape == (3, 2)


def test_an_empty_in_memory_table_of_a_dtype_not_floating_point_is_named():
    """InMemoryTable.empty(3, 2, dtype=torch.int32) raised torch's bare NotImplementedError
    ("normal_kernel_cpu" not implemented for 'Int') and dtype="float32" a TypeError about
    empty()'s arguments, where InMemoryTable(weight) names a table that is not floating point."""
    for dtype in (torch.int32, torch.bool, "float32"):
        with pytest.raises(ConfigError, match=rf"^dtype: got {re.escape(repr(dtype))}; expected a"):
            InMemoryTable.empty(3, 2, dtype=dtype)
    assert InMemoryTable.empty(3, 2, dtype=torch.bfloat16).weight.dtype == torch.bfloat16
