"""DeepSeek-V4.1 addressing: config.json, the release's prime search, dead tokens and chunked
decode, bit-exact with the reference's golden row ids (small tables and the release's sizes)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tests.conftest import golden_dir
from tiered_store.engram import HashState, NgramHasher, load_engram_config
from tiered_store.errors import ConfigError

CASES = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def golden():
    root = golden_dir("v41/golden_v41.npz") / "v41"
    return json.loads((root / "golden_v41.json").read_text()), np.load(root / "golden_v41.npz")


def hf_config(meta: dict, *, real: bool = False, **override) -> dict:
    """A V4.1 ``config.json`` in the release's layout, for the golden or the released tables."""
    cfg = meta["real_v41_config"]["config"] if real else meta["config"]
    text = {
        "engram_layer_ids": cfg["engram_layer_ids"],
        "engram_num_embeddings": cfg.get("engram_num_embeddings", meta["engram_num_embeddings"]),
        "engram_max_ngram_size": cfg["engram_max_ngram_size"],
        "engram_vocab_size": cfg["engram_vocab_size"],
        "engram_n_heads": cfg["engram_n_heads"],
        "engram_head_dim": cfg["engram_head_dim"],
        "engram_pad_token_id": cfg.get("engram_pad_token_id", cfg.get("engram_pad_id")),
        "engram_compressed_vocab_size": meta["tokenizer"]["compressed_vocab_size"],
        "hidden_size": 16,
        "hc_mult": 4,
        "num_hidden_layers": 43,
        **override,
    }
    return {"architectures": ["DeepseekV41ForCausalLM"], "text_config": text}


@pytest.fixture(scope="module")
def hasher(golden):
    meta, _ = golden
    engram, _ = load_engram_config(hf_config(meta))
    return NgramHasher(engram)


def _inputs(data, case):
    mask = data[f"case{case}_token_mask"] if f"case{case}_token_mask" in data.files else None
    return data[f"case{case}_input_ids"], mask


def test_config_json_gives_the_v41_geometry(golden, hasher, tmp_path):
    meta, data = golden
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf_config(meta)))
    engram, backbone = load_engram_config(path)
    assert engram.is_v41 and engram.layer_ids == (1, 14) and engram.head_dim == 256
    assert engram.engram_vocab_size == (31, 31, 31) and backbone.num_layers == 43
    for layer in (1, 14):
        assert hasher.primes[layer] == meta["layers"][str(layer)]["primes"]
        assert hasher.offsets(layer).tolist() == meta["layers"][str(layer)]["offsets"]
        assert hasher.multipliers[layer].tolist() == meta["layers"][str(layer)]["multipliers"]
    assert np.array_equal(hasher.tokenizer.lookup, data["compressed_lookup"])


@pytest.mark.parametrize("case", CASES[:3])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_row_ids_and_hashes_equal_the_reference(golden, hasher, case, backend):
    _, data = golden
    ids, mask = _inputs(data, case)
    if backend == "torch":
        ids = torch.from_numpy(ids)
        mask = None if mask is None else torch.from_numpy(mask)
    rows = hasher.row_ids(ids, token_mask=mask)
    hashes = hasher.hash(ids, token_mask=mask)
    for layer in (1, 14):
        got_rows, got_hashes = np.asarray(rows[layer]), np.asarray(hashes[layer])
        assert np.array_equal(got_rows, data[f"case{case}_layer{layer}_row_ids"])
        assert np.array_equal(got_hashes, data[f"case{case}_layer{layer}_hashes"])


def test_dead_tokens_hash_as_all_pad_ngrams(golden, hasher):
    _, data = golden
    ids, mask = _inputs(data, 2)
    rows = hasher.row_ids(ids, token_mask=mask)[1]
    pad_rows = hasher.row_ids(np.full((1, 1), 2))[1][0, 0]
    assert (rows[~mask] == pad_rows).all()  # every dead position reads the all-pad rows
    flipped = hasher.row_ids(ids, token_mask=mask[:, ::-1])[1]  # negative strides, as ids take
    assert np.array_equal(flipped, hasher.row_ids(ids, token_mask=mask[:, ::-1].copy())[1])
    one = np.array([[True, False]])[:, :1][:, ::-1]  # one element, a negative stride
    assert np.array_equal(
        hasher.row_ids(ids[:1, :1], token_mask=one)[1], hasher.row_ids(ids[:1, :1])[1]
    )
    one_id = np.asarray(ids)[:1, :1][:, ::-1]  # the ids too: one element, a negative stride
    assert np.array_equal(hasher.row_ids(one_id)[1], hasher.row_ids(ids[:1, :1])[1])
    for scalar in (False, np.bool_(False), np.array(False)):  # not a mask of one token
        with pytest.raises(
            ConfigError, match=r"token_mask: got torch.bool \(\); expected bool \(1,\)"
        ):
            hasher.row_ids(ids[0, :1], token_mask=scalar)


def test_chunked_prefill_then_decode_equals_one_pass(golden, hasher):
    meta, data = golden
    ids, mask = _inputs(data, 3)
    state = hasher.new_state(ids.shape[0])
    parts = {1: [], 14: []}
    for start, stop in meta["cases"][3]["chunks"]:
        assert state.position == start
        rows = hasher.row_ids(ids[:, start:stop], token_mask=mask[:, start:stop], state=state)
        for layer in parts:
            parts[layer].append(rows[layer])
    for layer, chunks in parts.items():
        assert np.array_equal(np.concatenate(chunks, axis=1), data[f"case3_layer{layer}_row_ids"])


def test_one_sequence_of_1d_ids_is_hashed_in_chunks_as_a_batch_of_one(golden, hasher):
    """1-D input_ids with a HashState were refused ('state: carries (1,) sequences; expected
    ()'), though new_state makes only batches: such ids now hash as a batch of 1."""
    meta, data = golden
    ids, mask = _inputs(data, 3)
    for row, convert in ((0, np.asarray), (1, torch.from_numpy)):
        state = hasher.new_state(1)
        chunks = []
        for start, stop in meta["cases"][3]["chunks"]:
            piece = convert(ids[row, start:stop].copy())
            rows = hasher.row_ids_layer(piece, 1, convert(mask[row, start:stop].copy()), state)
            assert tuple(rows.shape) == (stop - start, hasher.num_heads)
            chunks.append(np.asarray(rows))
        assert state.position == ids.shape[1]
        assert np.array_equal(np.concatenate(chunks), data["case3_layer1_row_ids"][row])
    with pytest.raises(
        ConfigError,
        match=r"state: carries 2 sequences; expected 1 for 1-D input_ids of shape \(24,\)",
    ):
        hasher.row_ids(ids[0], state=hasher.new_state(2))


def test_release_sizes_give_the_release_row_ids(golden):
    meta, data = golden
    engram, _ = load_engram_config(hf_config(meta, real=True))
    hasher = NgramHasher(engram)
    assert [hasher.table_rows(layer) for layer in (1, 14)] == [384_006_168, 384_016_682]
    for layer in (1, 14):
        real = meta["real_v41_config"]["layers"][str(layer)]
        assert hasher.primes[layer] == real["primes"]
    for case in CASES[:3]:
        ids, mask = _inputs(data, case)
        rows = hasher.row_ids(
            torch.from_numpy(ids), None if mask is None else torch.from_numpy(mask)
        )
        for layer in (1, 14):
            assert np.array_equal(
                rows[layer].numpy(), data[f"real_case{case}_layer{layer}_row_ids"]
            )


def test_mismatched_checkpoint_facts_are_refused_naming_both(golden):
    meta, _ = golden
    engram, _ = load_engram_config(hf_config(meta, engram_num_embeddings=[1998, 5000]))
    with pytest.raises(
        ConfigError, match=r"layer 14 states 5,000 rows but its primes sum to 5,014"
    ):
        NgramHasher(engram)
    engram, _ = load_engram_config(hf_config(meta, engram_compressed_vocab_size=99000))
    with pytest.raises(ConfigError, match=r"says 99,000 but the tokenizer .* compresses to 99,092"):
        NgramHasher(engram)
    with pytest.raises(ConfigError, match="text_config has no engram_layer_ids"):
        load_engram_config({"text_config": {"hidden_size": 16}})
    with pytest.raises(
        ConfigError, match="text_config.engram_num_embeddings: expected one row count per layer"
    ):
        load_engram_config(hf_config(meta, engram_num_embeddings=[1998]))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("engram_head_dim", 0, "an integer >= 1, got 0"),
        ("engram_head_dim", True, "an integer >= 1, got True"),  # was read as head_dim 1
        ("engram_pad_token_id", -1, "an integer >= 0, got -1"),
        ("engram_n_heads", 0, "an integer >= 1, got 0"),
        ("engram_max_ngram_size", 1, "an integer from 2 to 64, got 1"),
        ("num_hidden_layers", 0, "an integer >= 1, got 0"),
    ],
)
def test_a_bad_config_json_value_is_named_by_the_files_own_key(
    golden, tmp_path, key, value, expected
):
    # it was named by this library's field (engram.n_embed_per_ngram, engram.pad_id, ...)
    meta, _ = golden
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf_config(meta, **{key: value})))
    with pytest.raises(ConfigError, match=rf"config.json: text_config.{key}: expected {expected}"):
        load_engram_config(path)


def test_bad_mask_and_state_are_refused(golden, hasher):
    _, data = golden
    ids, _ = _inputs(data, 2)
    with pytest.raises(
        ConfigError, match=r"token_mask: got torch.int64 \(2, 3\); expected bool \(2, 24\)"
    ):
        hasher.row_ids(ids, token_mask=np.ones((2, 3), dtype=np.int64))
    with pytest.raises(ConfigError, match=r"state: carries \(3,\) sequences; expected \(2,\)"):
        hasher.row_ids(ids, state=hasher.new_state(3))
    bad_sizes = (-1, 2.5, (2, 3), True, torch.tensor(True), torch.tensor(2.0), torch.tensor(-1))
    for batch_size in bad_sizes:  # torch's raw RuntimeError/TypeError before
        got = re.escape(repr(batch_size))
        with pytest.raises(ConfigError, match=rf"batch_size: expected an integer >= 0, got {got}"):
            hasher.new_state(batch_size)
    for batch_size in (np.int64(2), np.array(2), torch.tensor(2)):  # integers, as torch took
        assert hasher.new_state(batch_size).tail.shape == (2, 3)


def test_a_state_not_from_new_state_is_refused_naming_what_is_wrong(golden, hasher):
    """A state that is no HashState is named by its type (a raw AttributeError about ``tail``
    before); one of another max_ngram_size is named by its tail's width, not as another batch."""
    _, data = golden
    ids, _ = _inputs(data, 2)  # [2, 24]
    for bad in ({}, torch.full((2, 3), -1), 3):
        for call in (hasher.row_ids, lambda i, state: hasher.row_ids_layer(i, 1, state=state)):
            with pytest.raises(
                ConfigError,
                match=rf"state: got a {type(bad).__name__}; expected "
                r"a HashState from hasher.new_state\(B\)",
            ):
                call(ids, state=bad)
    narrow = HashState(torch.full((2, 1), -1))  # a hasher of max_ngram_size 2's
    with pytest.raises(
        ConfigError, match=r"state: a look-back tail of shape \(2, 1\); expected \(2, 3\), 3 ids"
    ):
        hasher.row_ids(ids, state=narrow)
    assert narrow.position == 0


def test_the_gates_eps_is_text_config_rms_norm_eps_as_vllm_and_sglang_read_it(golden):
    """V4.1's Engram gate takes its RMS epsilon from text_config.rms_norm_eps: vLLM's and SGLang's
    Engram modules read config.rms_norm_eps for it (not hc_eps); without it, the release's 1e-20."""
    meta, _ = golden
    for text, eps in (({}, 1e-20), ({"rms_norm_eps": 1e-6, "hc_eps": 1e-3}, 1e-6)):
        engram, _ = load_engram_config(hf_config(meta, **text))
        assert engram.norm_eps == eps
    with pytest.raises(
        ConfigError, match=r"^text_config\.rms_norm_eps: expected a finite number > 0, got 0"
    ):
        load_engram_config(hf_config(meta, rms_norm_eps=0))


@pytest.mark.parametrize("eps", [1e-50, 2.0**-150])
def test_a_gate_eps_that_float32_rounds_to_zero_is_refused_by_the_config(golden, eps):
    """A norm_eps that float32 rounds to 0 was taken by EngramConfig (and a config.json's
    rms_norm_eps), to be refused only when the model was built, by V41Engram as a bare
    'norm_eps', naming neither key. The config refuses it by its key; float32's smallest is
    taken."""
    from tiered_store.engram.config import EngramConfig

    meta, _ = golden
    floor = rf"got {re.escape(repr(eps))}, which float32 \(the gate's arithmetic\) rounds to 0"
    with pytest.raises(ConfigError, match=rf"engram\.norm_eps: {floor}"):
        EngramConfig.from_dict({"norm_eps": eps})
    with pytest.raises(ConfigError, match=rf"^text_config\.rms_norm_eps: {floor}"):
        load_engram_config(hf_config(meta, rms_norm_eps=eps))
    assert EngramConfig.from_dict({"norm_eps": 2.0**-149}).norm_eps == 2.0**-149
