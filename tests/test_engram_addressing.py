"""Engram addressing: tokenizer compression and N-gram hashing, bit-exact with the golden vectors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import golden_dir
from tiered_store.engram import (
    CompressedTokenizer,
    EngramConfig,
    InMemoryTable,
    MultiHeadEmbedding,
    NgramHasher,
    load_engram_config,
    to_row_ids,
)
from tiered_store.engram import tokenizer as tokenizer_module
from tiered_store.errors import ConfigError, RowIdError


def _golden_dir() -> Path:
    return golden_dir("engram_default.npz")


GOLDEN_NAMES = ["engram_default", "engram_alt"]
NUM_CASES = 6


@pytest.fixture(scope="module")
def tok() -> CompressedTokenizer:
    return CompressedTokenizer()


@pytest.fixture(scope="module", params=GOLDEN_NAMES)
def golden(request, tok):
    """(json, npz, hasher) of one golden file."""
    root = _golden_dir()
    meta = json.loads((root / f"{request.param}.json").read_text())
    data = np.load(root / f"{request.param}.npz")
    config, _ = load_engram_config(meta, ignore_unknown=True)
    return meta, data, NgramHasher(config, tok)


# -- tokenizer compression --------------------------------------------------------------------


def test_compressed_lookup_matches_golden_exactly(tok):
    for name in GOLDEN_NAMES:
        expected = np.load(_golden_dir() / f"{name}.npz")["compressed_lookup"]
        assert tok.lookup.dtype == np.int64
        np.testing.assert_array_equal(tok.lookup, expected)


def test_compressed_vocabulary_figures(tok, golden):
    meta, _, hasher = golden
    assert tok.vocab_size == meta["tokenizer_vocab_size"] == 129280
    assert tok.num_compressed == len(tok) == meta["compressed_vocab_size"] == 99092
    assert tok.reduction == pytest.approx(1 - 99092 / 129280)
    assert round(tok.reduction, 4) == 0.2335
    assert tok.pad_id == hasher.pad_id == meta["compressed_pad_id"]


def test_text_cases_tokenize_to_golden_ids(tok, golden):
    meta, data, _ = golden
    for i, case in enumerate(meta["cases"]):
        if case["text"] is not None:
            np.testing.assert_array_equal(
                tok.encode(case["text"])[None], data[f"case{i}_input_ids"]
            )


@pytest.mark.parametrize(
    "text",
    [
        "Diana, Princess of Wales, was born in 1961.",
        "张仲景是东汉末年的医学家。東漢",
        "def lookup(self, ids):\n\treturn self.table[ids]  # O(1)\n",
        "Café naïve ÄPPLE résumé Ångström",
        "emoji 😀🚀👩‍💻 and ﬁ ligature",
    ],
)
def test_multilingual_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.tokenizer.decode(ids.tolist(), skip_special_tokens=False) == text
    compressed = tok.compress(ids)
    np.testing.assert_array_equal(compressed, tok.lookup[ids])
    np.testing.assert_array_equal(tok.compress(torch.from_numpy(ids)).numpy(), compressed)
    # any shape: a reversed view (negative strides), a 0-d id
    np.testing.assert_array_equal(tok.compress(ids[::-1]), compressed[::-1])
    assert tok.compress(np.array(ids[0])).shape == () == tok.compress(torch.tensor(ids[0])).shape
    assert ((compressed >= 0) & (compressed < tok.num_compressed)).all()
    # Two tokens share a compressed id exactly when their normalised keys agree.
    keys = [tok.key(int(i)) for i in ids]
    for a in range(len(ids)):
        for b in range(len(ids)):
            assert (compressed[a] == compressed[b]) == (keys[a] == keys[b])


def test_case_accents_and_whitespace_merge(tok):
    ids = tok.encode("ÄPPLE apple Apple  APPLE\t\tapple\n\n")
    by_token = {
        tok.tokenizer.id_to_token(int(i)): int(c)
        for i, c in zip(ids, tok.compress(ids), strict=True)
    }
    assert by_token["Ġapple"] == by_token["ĠApple"] == by_token["apple"]  # case, leading space
    assert by_token["Ġ"] == by_token["ĉ"] == by_token["ĊĊ"]  # whitespace runs -> " "
    assert tok.key(tok.tokenizer.token_to_id("Ġ")) == " "  # a lone space stays " "
    assert by_token["ÃĦ"] == int(tok.lookup[tok.tokenizer.token_to_id("a")])  # Ä -> a
    # A partial UTF-8 byte token keeps its raw token string as key.
    emoji = tok.encode("😀")
    assert any("\ufffd" in tok.tokenizer.decode([int(i)]) for i in emoji)
    assert tok.key(int(emoji[0])) == tok.tokenizer.id_to_token(int(emoji[0]))


def test_long_texts_are_encoded_in_pieces_of_bounded_size(tok, monkeypatch):
    """A text longer than PIECE_CHARS is cut before a line break (else a space) and encoded in
    calls of at most CALL_CHARS characters; shorter texts encode exactly as a whole."""
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 300)
    monkeypatch.setattr(tokenizer_module, "CALL_CHARS", 1000)
    rust = tok.tokenizer
    calls = []

    class Counting:  # the real tokenizer; records how much text each call is handed
        def encode_batch_fast(self, texts, add_special_tokens):
            calls.append(sum(map(len, texts)))
            return rust.encode_batch_fast(texts, add_special_tokens=add_special_tokens)

    source = Path(json.__file__).read_text()[:5000]  # code, with line breaks
    one_line = source.replace("\n", " ")
    short = "def f(x):\n    return x + 1\n"
    out = tokenizer_module.encode_texts(Counting(), [source, short, one_line])
    assert out[1].tolist() == rust.encode(short, add_special_tokens=False).ids
    assert max(calls) <= 1000 and sum(calls) == len(source) + len(short) + len(one_line)
    for text, ids in ((source, out[0]), (one_line, out[2])):
        pieces = tokenizer_module._cut(text, 300)
        assert "".join(pieces) == text and max(map(len, pieces)) <= 300
        assert all(p[0] in "\n " for p in pieces[1:])  # each cut just before a break or space
        by_piece = [rust.encode(p, add_special_tokens=False).ids for p in pieces]
        assert ids.tolist() == [i for piece in by_piece for i in piece]
        whole = rust.encode(text, add_special_tokens=False).ids
        assert abs(len(ids) - len(whole)) <= len(pieces)  # a merge or so differs at a cut
    calls.clear()  # with limits: a prefix of the same ids, more than the limit, less text read
    limited = tokenizer_module.encode_texts(Counting(), [source, short, one_line], [5, 0, None])
    assert sum(calls) < len(source) + len(short) + len(one_line)
    for ids, whole, limit in zip(limited, out, [5, 0, None], strict=True):
        assert ids.tolist() == whole[: len(ids)].tolist()
        assert len(ids) == len(whole) if limit is None else len(ids) > limit


def test_compress_rejects_out_of_vocab_and_non_integer_ids(tok):
    with pytest.raises(RowIdError, match=r"token id 129280 at index \(0, 1\).*\[0, 129280\)"):
        tok.compress(np.array([[5, 129280]]))
    with pytest.raises(RowIdError, match="token id -1"):
        tok.compress(torch.tensor([3, -1]))
    with pytest.raises(RowIdError, match="integer token ids"):
        tok.compress(np.array([1.0, 2.0]))
    with pytest.raises(RowIdError, match="integer token ids"):
        tok.compress(torch.tensor([1.5]))
    assert isinstance(RowIdError("x"), IndexError)


def test_lookup_disk_cache_round_trip_and_corruption(tmp_path, monkeypatch, tok):
    monkeypatch.setattr(tokenizer_module, "_LOOKUP_MEMO", {})
    built = CompressedTokenizer(cache_dir=tmp_path)
    (cached,) = tmp_path.glob("compressed_lookup-v*.npy")
    np.testing.assert_array_equal(np.load(cached), tok.lookup)
    np.testing.assert_array_equal(built.lookup, tok.lookup)
    cached.write_bytes(b"not an npy file")  # corrupt: rebuilt, not trusted
    monkeypatch.setattr(tokenizer_module, "_LOOKUP_MEMO", {})
    np.testing.assert_array_equal(CompressedTokenizer(cache_dir=tmp_path).lookup, tok.lookup)
    np.testing.assert_array_equal(np.load(cached), tok.lookup)


def test_with_home_set_empty_the_lookup_is_not_cached_under_the_root(tmp_path, monkeypatch, tok):
    """With HOME set but empty (and neither TIERED_STORE_CACHE_DIR nor XDG_CACHE_HOME) the disk
    cache was /.cache/tiered-store: Python reads ``~`` as ``/`` (as root, the folder was made
    there). As expand_home refuses such a ``~``, no disk cache is used: the lookup is built."""
    monkeypatch.setenv("HOME", "")
    monkeypatch.delenv("TIERED_STORE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert tokenizer_module._default_cache_dir() is None  # (first: nothing written in / before)
    monkeypatch.setattr(tokenizer_module, "_LOOKUP_MEMO", {})
    np.testing.assert_array_equal(CompressedTokenizer().lookup, tok.lookup)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a cache named otherwise is used
    assert tokenizer_module._default_cache_dir() == tmp_path / "tiered-store"


def test_a_relative_xdg_cache_home_is_ignored_as_the_xdg_spec_says(tmp_path, monkeypatch):
    """A relative XDG_CACHE_HOME was used, the cache made under whatever folder was current;
    the XDG base directory spec says such a path is invalid and ignored: ~/.cache is used."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TIERED_STORE_CACHE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", "cache")
    expected = tmp_path / "home" / ".cache" / "tiered-store"
    assert tokenizer_module._default_cache_dir() == expected
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # an absolute one is used
    assert tokenizer_module._default_cache_dir() == tmp_path / "xdg" / "tiered-store"


def test_a_tokenizer_path_that_is_a_directory_is_refused_by_name(tmp_path):
    """With the disk cache too (it read the bytes first: a raw IsADirectoryError before)."""
    for cache in (True, False):
        with pytest.raises(
            ConfigError, match=rf"'{tmp_path}' is a directory; expected a tokenizer"
        ):
            CompressedTokenizer(tmp_path, cache=cache, cache_dir=tmp_path)


# -- hashing ----------------------------------------------------------------------------------


def test_primes_and_multipliers_match_golden(golden):
    meta, _, hasher = golden
    for layer in hasher.layer_ids:
        assert hasher.primes[layer] == meta["primes"][str(layer)]
        assert hasher.multipliers[layer].tolist() == meta["multipliers"][str(layer)]
        assert all(m % 2 == 1 for m in meta["multipliers"][str(layer)])


@pytest.mark.parametrize("case", range(NUM_CASES))
def test_hashes_match_golden_numpy_and_torch(golden, case):
    _, data, hasher = golden
    ids = data[f"case{case}_input_ids"]
    from_numpy = hasher.hash(ids)
    from_torch = hasher.hash(torch.from_numpy(ids))
    assert set(from_numpy) == set(from_torch) == set(hasher.layer_ids)
    for layer in hasher.layer_ids:
        expected = data[f"case{case}_layer{layer}_hashes"]
        assert isinstance(from_numpy[layer], np.ndarray) and from_numpy[layer].dtype == np.int64
        assert isinstance(from_torch[layer], torch.Tensor)
        assert from_torch[layer].dtype == torch.int64
        np.testing.assert_array_equal(from_numpy[layer], expected)
        np.testing.assert_array_equal(from_torch[layer].numpy(), expected)
        np.testing.assert_array_equal(hasher.hash_layer(ids, layer), expected)


def test_geometry_offsets_and_row_ids(golden):
    _, data, hasher = golden
    ids = data["case5_input_ids"]
    rows_np, rows_t = hasher.row_ids(ids), hasher.row_ids(torch.from_numpy(ids))
    for layer in hasher.layer_ids:
        sizes = hasher.head_sizes(layer)
        assert len(sizes) == hasher.num_heads == hasher.config.num_heads
        offsets = hasher.offsets(layer)
        assert offsets.dtype == np.int64 and offsets[0] == 0
        np.testing.assert_array_equal(np.diff(offsets), sizes[:-1])
        assert hasher.table_rows(layer) == sum(sizes) == offsets[-1] + sizes[-1]
        hashes = data[f"case5_layer{layer}_hashes"]
        expected = to_row_ids(hashes, offsets)
        np.testing.assert_array_equal(rows_np[layer], expected)
        np.testing.assert_array_equal(rows_t[layer].numpy(), expected)
        np.testing.assert_array_equal(hasher.row_ids_layer(ids, layer), expected)
        assert (expected < hasher.table_rows(layer)).all()
        # Each head's rows stay inside that head's slice of the concatenated table.
        assert ((expected >= offsets) & (expected < offsets + np.array(sizes))).all()


def test_forward_file_offsets_match(tok):
    from safetensors.numpy import load_file

    root = _golden_dir()
    config, _ = load_engram_config(
        json.loads((root / "engram_forward.json").read_text()), ignore_unknown=True
    )
    hasher = NgramHasher(config, tok)
    tensors = load_file(root / "engram_forward.safetensors")
    for layer in config.layer_ids:
        golden_offsets = tensors[f"layer{layer}.multi_head_embedding.offsets"]
        np.testing.assert_array_equal(golden_offsets, hasher.offsets(layer))
        embedding = MultiHeadEmbedding(hasher.head_sizes(layer), InMemoryTable(torch.zeros(1, 1)))
        assert embedding.offsets.dtype == torch.int64  # the module's buffer: the same helper's
        np.testing.assert_array_equal(embedding.offsets.numpy(), golden_offsets)
        rows = tensors[f"layer{layer}.multi_head_embedding.embedding.weight"].shape[0]
        assert hasher.table_rows(layer) == rows


def test_hash_shapes_batches_and_short_sequences(golden):
    _, data, hasher = golden
    ids = data["case5_input_ids"]
    layer = hasher.layer_ids[0]
    full = hasher.hash_layer(ids, layer)
    for b in range(ids.shape[0]):  # rows hash independently; 1-D input works
        np.testing.assert_array_equal(hasher.hash_layer(ids[b], layer), full[b])
    short = hasher.hash_layer(ids[:, :1], layer)  # T shorter than the n-gram
    np.testing.assert_array_equal(short, full[:, :1])
    assert hasher.hash_layer(np.zeros((2, 0), dtype=np.int64), layer).shape == (
        2,
        0,
        hasher.num_heads,
    )


def test_hash_rejects_bad_ids_before_compute(golden):
    _, _, hasher = golden
    with pytest.raises(RowIdError, match="outside the tokenizer vocabulary"):
        hasher.hash(np.array([[1, 2, 200000]]))
    with pytest.raises(RowIdError, match="token id -3"):
        hasher.hash(torch.tensor([[-3, 2]]))
    big = 2**64 - 1  # named as given, not as its int64 cast (-1)
    with pytest.raises(RowIdError, match=rf"token id {big} at index \(0, 1\)"):
        hasher.hash(torch.tensor([[5, big]], dtype=torch.uint64))
    with pytest.raises(ConfigError, match="layer_id"):
        hasher.hash_layer(np.array([[1, 2]]), 99)
    for scalar in (5, np.int64(5), np.array(5), torch.tensor(5)):  # not a one-token sequence
        with pytest.raises(ConfigError, match=r"expected shape \[\.\.\., T\], got a scalar"):
            hasher.hash(scalar)
    ragged = torch.nested.nested_tensor([torch.tensor([1, 2, 3]), torch.tensor([4, 5])])
    meta = torch.zeros(2, 3, dtype=torch.long, device="meta")
    for ids, what in ((ragged, "is a nested tensor"), (meta, "is on the meta device")):
        with pytest.raises(RowIdError, match=rf"input_ids: tensor .* {what}"):  # torch's before
            hasher.hash(ids)


def test_a_bool_in_a_list_of_token_ids_is_refused_by_value(golden):
    """[[5, True, 7]] was hashed as [[5, 1, 7]] (NumPy reads a bool beside an int as 1), though
    bool tensors and arrays are refused as token ids."""
    _, _, hasher = golden
    for ids, value, index in (
        ([[5, True, 7]], "True", r"\(0, 1\)"),
        ([[5, 6, 7], [np.False_, 8, 9]], "np.False_", r"\(1, 0\)"),
        ([5, True], "True", r"\(1,\)"),
    ):
        message = rf"^input_ids: {value} at index {index} is a bool; expected integer token ids$"
        with pytest.raises(RowIdError, match=message):
            hasher.row_ids(ids)
        with pytest.raises(RowIdError, match=message):
            hasher.tokenizer.compress(ids)
    layer = hasher.layer_ids[0]
    as_list, as_array = (
        hasher.row_ids_layer([[5, 1, 7]], layer),
        hasher.row_ids_layer(np.array([[5, 1, 7]]), layer),
    )
    np.testing.assert_array_equal(as_list, as_array)


def test_a_list_of_tensors_numpy_cannot_read_is_named(golden):
    """A list of meta or sparse tensors, of tensors that require grad, or a uint64 past int64 gave
    np.asarray's bare TypeError or RuntimeError ("can't convert meta device type tensor")."""
    _, _, hasher = golden
    for ids, why in (
        ([torch.zeros(2, dtype=torch.long, device="meta")] * 2, "meta device"),
        ([torch.tensor([1, 2]).to_sparse()] * 2, "Sparse layout"),
        ([torch.ones(2, requires_grad=True), 3], "requires grad"),
        ([[torch.tensor(2**63, dtype=torch.uint64)]], "overflow"),
    ):
        message = rf"^input_ids: list cannot be read as integer token ids \(.*{why}"
        with pytest.raises(RowIdError, match=message):
            hasher.row_ids(ids)
        with pytest.raises(RowIdError, match=message):
            hasher.tokenizer.compress(ids)


def test_timedelta_token_ids_are_refused(golden):
    """NumPy files timedelta64 under np.integer: a list of them hashed as their counts, an array
    of them gave int()'s bare TypeError ('not datetime.timedelta')."""
    _, _, hasher = golden
    for ids in ([[np.timedelta64(3), np.timedelta64(4)]], np.array([[3, 4]], dtype="m8[s]")):
        with pytest.raises(RowIdError, match=r"^input_ids: expected integer token ids, got dtype timedelta64"):  # fmt: skip
            hasher.row_ids(ids)
        with pytest.raises(RowIdError, match="got dtype timedelta64"):
            hasher.tokenizer.compress(ids)
    with pytest.raises(RowIdError, match="got dtype bool"):
        hasher.row_ids(np.array([[True, False]]))


READ_ONLY_IDS = """
import sys
import numpy as np
import torch
from tiered_store.engram import InMemoryTable, NgramHasher
from tiered_store.engram.config import BackboneConfig, EngramConfig
from tiered_store.engram.model import EngramLM, ModelConfig
from tiered_store.engram.module import Engram

def frozen(array):
    array.flags.writeable = False
    return array

cfg = EngramConfig(engram_vocab_size=(2003, 3001), n_embed_per_ngram=64, n_head_per_ngram=4,
                   layer_ids=(1, 3))
ids, mask = frozen(np.array([[5, 6, 7, 8]])), frozen(np.array([[True, False, True, True]]))
hasher = NgramHasher(cfg, None)
if sys.argv[1] == "hasher":
    hasher.row_ids(ids)
elif sys.argv[1] == "mask":
    hasher.row_ids(ids.copy(), token_mask=mask)
elif sys.argv[1] == "engram":
    Engram(cfg, BackboneConfig(hidden_size=8, hc_mult=2), 1, hasher=hasher)(torch.zeros(1, 4, 2, 8), ids)
elif sys.argv[1] == "model":
    backbone = {"hidden_size": 64, "hc_mult": 4, "num_layers": 4}
    config = ModelConfig.from_dict({"engram": cfg.to_dict(), "backbone": backbone,
                                    "transformer": {"num_attention_heads": 4}})
    EngramLM(config, hasher=hasher).hash(ids, token_mask=mask)
elif sys.argv[1] == "table":
    InMemoryTable(torch.zeros(10, 4)).lookup(frozen(np.array([1, 2])))
"""


@pytest.mark.parametrize("path", ["hasher", "mask", "engram", "model", "table"])
def test_read_only_id_arrays_make_no_torch_warning(path):
    """A read-only NumPy ids array (or mask) went to torch.from_numpy as it was: torch printed
    'The given NumPy array is not writable ... undefined behavior'. Each path runs in its own
    process: torch gives that warning once a process."""
    run = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", READ_ONLY_IDS, path],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]


def test_read_only_and_reversed_id_arrays_hash_as_copies_do(golden):
    """The hasher reads a read-only or reversed array where it is (NumPy compresses it)."""
    _, data, hasher = golden
    ids = data["case5_input_ids"].copy()
    ids.flags.writeable = False
    expected = hasher.row_ids(ids.copy())
    for layer, rows in hasher.row_ids(ids).items():
        np.testing.assert_array_equal(rows, expected[layer])
    reversed_ids = ids[:, ::-1]  # a negative stride: NumPy indexes it as it is
    np.testing.assert_array_equal(
        hasher.hash(reversed_ids)[hasher.layer_ids[0]],
        hasher.hash(reversed_ids.copy())[hasher.layer_ids[0]],
    )


def test_an_empty_list_mask_goes_with_empty_list_ids(golden):
    """ids [] and [[]] hash to no rows, but their masks [] and [[]] were refused as float64
    (NumPy's reading of an empty list): an empty chunk of lists could not carry its mask."""
    _, _, hasher = golden
    for ids, shape in (([], (0,)), ([[]], (1, 0))):
        state = hasher.new_state(1)
        for layer, rows in hasher.row_ids(ids, token_mask=ids, state=state).items():
            assert rows.shape == (*shape, hasher.num_heads), layer
        assert state.position == 0
    with pytest.raises(ConfigError, match=r"token_mask: got torch.float64 \(1, 2\); expected bool"):
        hasher.row_ids([[1, 2]], token_mask=[[1.0, 0.0]])


def test_a_ragged_or_non_numeric_token_mask_is_named(golden):
    """A ragged list mask raised NumPy's bare ValueError ("inhomogeneous shape"), and a mask of
    strings or objects torch's bare TypeError ("can't convert np.ndarray"): both are named."""
    _, _, hasher = golden
    ids = [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ConfigError, match=r"^token_mask: expected a rectangular bool array"):
        hasher.row_ids(ids, token_mask=[[True, True, True], [True]])
    for bad, dtype in (("abc", "<U3"), (np.array([[None] * 3] * 2), "object")):
        with pytest.raises(ConfigError, match=rf"^token_mask: got {dtype} .*; expected bool"):
            hasher.row_ids(ids, token_mask=bad)


def test_a_list_token_mask_of_tensors_numpy_cannot_read_is_named(golden):
    """A list mask holding tensors NumPy cannot read (meta, sparse; CUDA alike) raised NumPy's
    bare TypeError ("can't convert meta device type tensor to numpy"), where ids of that kind
    are named: the mask is named too."""
    _, _, hasher = golden
    ids = [[1, 2, 3]]
    row = torch.ones(3, dtype=torch.bool)
    for bad in ([row.to("meta")], [row.to_sparse()]):
        with pytest.raises(ConfigError, match=r"^token_mask: list cannot be read as a bool array"):
            hasher.row_ids(ids, token_mask=bad)


def test_a_token_mask_without_values_is_named(golden):
    """A meta, nested or sparse token_mask: named, not torch's bare NotImplementedError (.to,
    torch.where) or 'NestedTensorImpl doesn't support sizes'."""
    _, _, hasher = golden
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    masks = (
        (torch.ones(2, 3, dtype=torch.bool, device="meta"), "is on the meta device"),
        (torch.nested.nested_tensor([torch.ones(3).bool(), torch.ones(2).bool()]), "is a nested"),
        (torch.ones(2, 3, dtype=torch.bool).to_sparse(), "has layout torch.sparse_coo"),
    )
    for mask, what in masks:
        for call in (hasher.hash, hasher.row_ids):
            with pytest.raises(ConfigError, match=rf"token_mask: tensor bool .* {what}"):
                call(ids, token_mask=mask)


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_ngram_size": 1}, r"engram\.max_ngram_size: expected an integer from 2 to 64"),
        (  # one size for every order: refused before it is repeated (an OverflowError before)
            {"engram_vocab_size": 31, "max_ngram_size": 10**30},
            rf"engram\.max_ngram_size: expected an integer from 2 to 64, got {10**30}",
        ),
        ({"engram_vocab_size": [100]}, r"engram\.engram_vocab_size: expected 2 entries"),
        ({"engram_vocab_size": [100, "x"]}, r"engram\.engram_vocab_size\[1\]"),
        ({"layer_ids": [1, 1]}, r"engram\.layer_ids: expected distinct layer ids, got 1 twice"),
        ({"layer_ids": [1, -2]}, r"engram\.layer_ids\[1\]: .*got -2"),
        ({"n_embed_per_ngram": 100, "n_head_per_ngram": 8}, r"engram\.n_embed_per_ngram"),
        ({"pad_id": True}, r"engram\.pad_id"),
        ({"head_count": 3}, r"engram\.head_count: unknown key"),
    ],
)
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        EngramConfig.from_dict(data)


def test_config_yaml_round_trip_and_backbone_checks(tmp_path):
    path = tmp_path / "engram.yaml"
    path.write_text(
        "engram:\n  engram_vocab_size: [2003, 3001]\n  layer_ids: [1, 4]\n"
        "  n_embed_per_ngram: 64\n  n_head_per_ngram: 4\nbackbone:\n  hidden_size: 48\n"
    )
    engram, backbone = load_engram_config(path)
    assert engram.layer_ids == (1, 4) and engram.head_dim == 16 and backbone.hidden_size == 48
    assert EngramConfig.from_dict(engram.to_dict()) == engram
    with pytest.raises(ConfigError, match=r"engram\.layer_ids\[1\].*num_layers=3, got 4"):
        load_engram_config({"engram": {"layer_ids": [1, 4]}, "backbone": {"num_layers": 3}})
    with pytest.raises(ConfigError, match=r"backbone\.hidden_size"):
        load_engram_config({"backbone": {"hidden_size": 0}})
    with pytest.raises(ConfigError, match="extra: unknown key"):
        load_engram_config({"engram": {}, "extra": 1})
    with pytest.raises(ConfigError, match="pad_id"):
        NgramHasher(EngramConfig(pad_id=10**6))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hashes_match_golden_on_cuda(golden):
    _, data, hasher = golden
    for case in range(NUM_CASES):
        ids = torch.from_numpy(data[f"case{case}_input_ids"]).cuda()
        for layer, hashes in hasher.hash(ids).items():
            assert hashes.device == ids.device
            expected = data[f"case{case}_layer{layer}_hashes"]
            np.testing.assert_array_equal(hashes.cpu().numpy(), expected)


def test_numpy_uint64_beside_python_ints_are_token_ids_as_the_store_takes_them(tok, tmp_path):
    """[np.uint64(7), 8] (NumPy reads a uint64 beside an int as float64) was refused as "dtype
    float64" by check_token_ids while the store looked the same list up as ids 7 and 8."""
    from tests.conftest import make_table, store_config
    from tiered_store import TieredStore
    from tiered_store.engram.tokenizer import check_token_ids

    ids = check_token_ids([np.uint64(7), 8], tok.vocab_size)
    assert ids.dtype == np.int64 and ids.tolist() == [7, 8]
    np.testing.assert_array_equal(tok.compress([[np.uint64(7), 8]]), tok.compress([[7, 8]]))
    with TieredStore(store_config(make_table(tmp_path)[0])) as store:  # the store takes them too
        assert torch.equal(store.lookup([np.uint64(7), 8]), store.lookup([7, 8]))
    big = 2**64 - 1  # named exactly, not as float64 rounds it
    for given, value, index in (([np.uint64(7), -1], -1, 1), ([8, np.uint64(big)], big, 1)):
        with pytest.raises(RowIdError, match=rf"token id {value} at index \({index},\)"):
            check_token_ids(given, tok.vocab_size)
    with pytest.raises(RowIdError, match=r"^input_ids: 8\.5 at index \(1,\) is not an integer"):
        check_token_ids([np.uint64(7), 8.5], tok.vocab_size)
    # a uint64 tensor past int64 in the list: torch's bare RuntimeError (the store names it)
    wide = torch.tensor(2**63, dtype=torch.uint64)
    with pytest.raises(RowIdError, match=rf"token id {2**63} at index \(0,\)"):
        check_token_ids([wide, 1], tok.vocab_size)
    with pytest.raises(RowIdError, match="got dtype float64"):  # floats in an array stay refused
        check_token_ids(np.array([7.0, 8.0]), tok.vocab_size)
