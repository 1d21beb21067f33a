"""Table files: sources, dtypes, the .npy layout, the manifest, verification, atomic creation."""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import re
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tiered_store.cold_table import ColdTable
from tiered_store.disk_probe import cached_pages, drop_page_cache
from tiered_store.errors import TableFormatError, TieredStoreError
from tiered_store.manifest_checksum import sealed
from tiered_store.serve.client import subprocess_env
from tiered_store.table_format import (
    DATA_OFFSET,
    RandomSource,
    SafetensorsSource,
    TableExistsError,
    TableManifest,
    TableNotFoundError,
    add_page_checksums,
    check_table,
    create_table,
    read_manifest,
    table_paths,
    verify_table,
)

REPO = Path(__file__).resolve().parents[1]


def bits(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Raw bytes of an array/tensor (bfloat16 included) for bit-exact comparison."""
    if isinstance(x, torch.Tensor):
        x = x.contiguous().view(torch.uint8).numpy()
    return np.ascontiguousarray(x).view(np.uint8)


def make(tmp_path: Path, source, name: str = "t.npy", **kw) -> tuple[Path, TableManifest]:
    path = tmp_path / name
    return path, create_table(path, source, progress=False, **kw)


def listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# ---- layout and round trips --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_ndarray_round_trip_and_npy_layout(tmp_path, dtype):
    a = np.random.default_rng(0).standard_normal((301, 37)).astype(dtype)
    path, m = make(tmp_path, a)
    assert m.shape == (301, 37) and m.dtype == np.dtype(dtype).name
    assert m.row_bytes == 37 * a.itemsize and m.data_offset == DATA_OFFSET == 4096
    assert path.stat().st_size == m.file_bytes == 4096 + a.nbytes
    assert np.array_equal(np.load(path), a)
    mm = np.load(path, mmap_mode="r")
    assert mm.offset == 4096 and np.array_equal(mm, a)
    assert path.read_bytes()[4096:] == a.tobytes()


def test_torch_sources_all_dtypes_bit_exact(tmp_path):
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.randn(123, 11).to(dt)
        path, m = make(tmp_path, t, name=f"{dt}.npy".replace("torch.", ""))
        assert m.torch_dtype == dt
        assert bits(np.load(path)).tobytes() == bits(t).tobytes()


def test_bfloat16_stored_as_u2_bits(tmp_path):
    t = torch.randn(50, 8, dtype=torch.bfloat16)
    path, m = make(tmp_path, t)
    loaded = np.load(path)
    assert loaded.dtype == np.dtype("<u2") and m.dtype == "bfloat16"
    back = torch.from_numpy(loaded.view(np.int16)).view(torch.bfloat16)
    assert torch.equal(back, t)
    # raw bits re-imported from a uint16 array or .npy need dtype="bfloat16"
    p2, _ = make(tmp_path, loaded, name="again.npy", dtype="bf16")
    p3, _ = make(tmp_path, str(path), name="again2.npy", dtype=torch.bfloat16)
    assert p2.read_bytes()[4096:] == p3.read_bytes()[4096:] == path.read_bytes()[4096:]


def test_dtype_conversion_matches_torch_cast(tmp_path):
    a = np.random.default_rng(1).standard_normal((64, 10))  # float64 needs an explicit dtype
    with pytest.raises(TableFormatError, match="float64"):
        make(tmp_path, a)
    for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        path, m = make(tmp_path, a, name=f"{name}.npy", dtype=name)
        want = torch.from_numpy(a).to(dt)
        assert m.dtype == name and bits(np.load(path)).tobytes() == bits(want).tobytes()


def test_npy_path_source_streams_via_mmap(tmp_path):
    a = np.arange(5000 * 7, dtype=np.float32).reshape(5000, 7)
    src = tmp_path / "src.npy"
    np.save(src, a)
    path, m = make(tmp_path, str(src), chunk_bytes=1000)  # many small chunks
    assert np.array_equal(np.load(path), a) and m.source.startswith("npy:")
    path2, _ = make(tmp_path, src, name="big_endian.npy")  # PathLike source
    np.save(src, a.astype(">f4"))
    path3, _ = make(tmp_path, src, name="be.npy", dtype="float32")
    assert path2.read_bytes()[4096:] == path3.read_bytes()[4096:]


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32, torch.float16])
def test_safetensors_source(tmp_path, dt):
    w = torch.randn(777, 24).to(dt)
    st = tmp_path / "model.safetensors"
    save_file({"multi_head_embedding.embedding.weight": w, "other.bias": torch.zeros(3)}, st)
    src = SafetensorsSource(st, "multi_head_embedding.embedding.weight")
    path, m = make(tmp_path, src, chunk_bytes=24 * 4 * 100)
    assert m.torch_dtype == dt and m.shape == (777, 24)
    assert bits(np.load(path)).tobytes() == bits(w).tobytes()
    assert "multi_head_embedding.embedding.weight" in m.source


def test_random_source_is_deterministic_regardless_of_chunk_size(tmp_path):
    src = RandomSource(rows=3001, dim=700, dtype="float32", seed=7, std=0.02)
    _, m1 = make(tmp_path, src, name="a.npy")  # default 64 MiB chunks: one chunk
    _, m2 = make(tmp_path, src, name="b.npy", chunk_bytes=4096 * 3 + 5)  # rows split oddly
    _, m3 = make(tmp_path, src, name="c.npy", chunk_bytes=1)  # one row per chunk
    a = np.load(tmp_path / "a.npy")
    assert np.array_equal(a, np.load(tmp_path / "b.npy"))
    assert np.array_equal(a, np.load(tmp_path / "c.npy"))
    assert m1.block_checksums == m2.block_checksums == m3.block_checksums
    assert abs(float(a.std()) - 0.02) < 0.001 and abs(float(a.mean())) < 0.001
    _, m4 = make(tmp_path, RandomSource(3001, 700, seed=8, std=0.02), name="d.npy")
    assert m4.block_checksums != m1.block_checksums
    # other dtypes are the float32 draw cast: same values, rounded
    p5, m5 = make(tmp_path, RandomSource(3001, 700, dtype="bfloat16", seed=7, std=0.02), "e.npy")
    assert m5.dtype == "bfloat16"
    assert bits(np.load(p5)).tobytes() == bits(torch.from_numpy(a).bfloat16()).tobytes()


def test_manifest_contents_and_checksums(tmp_path):
    a = np.random.default_rng(2).standard_normal((1000, 33)).astype(np.float32)
    path, m = make(tmp_path, a, block_bytes=8192, chunk_bytes=3000)
    doc = json.loads((tmp_path / "t.npy.manifest.json").read_text())
    assert doc["format_version"] == 1 and doc["shape"] == [1000, 33]
    assert doc["dtype"] == "float32" and doc["npy_descr"] == "<f4" and doc["row_bytes"] == 132
    assert doc["data_offset"] == 4096 and doc["block_bytes"] == 8192 and doc["checksum"] == "crc32"
    assert set(doc["created"]) == {"source", "time", "library_version"}
    data = a.tobytes()
    want = [zlib.crc32(data[i : i + 8192]) for i in range(0, len(data), 8192)]
    assert doc["block_checksums"] == want == list(m.block_checksums)
    assert read_manifest(path) == m == read_manifest(tmp_path / "t.npy.manifest.json")
    assert read_manifest(tmp_path / "t") == m  # name without .npy
    with pytest.raises(AttributeError):
        m.rows = 5  # frozen
    assert m.block_range(m.num_blocks - 1) == (4096 + 8192 * 16, m.file_bytes)


def test_path_without_npy_suffix_gets_one(tmp_path):
    create_table(tmp_path / "emb", np.ones((2, 2), np.float32), progress=False)
    assert table_paths(tmp_path / "emb") == (
        tmp_path / "emb.npy",
        tmp_path / "emb.npy.manifest.json",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "emb.npy",
        "emb.npy.manifest.json",
        "emb.npy.pages.crc32c",
    ]


@pytest.mark.parametrize("path", [".", "", "/", "..", "sub/.."])
def test_a_path_that_names_a_directory_is_refused(tmp_path, monkeypatch, path):
    """No table file has such a name (pathlib refused '.', and '..' made a hidden '...npy')."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(TableFormatError, match=rf"table path '{path}' names a directory; expected"):
        create_table(path, np.ones((2, 2), np.float32), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_progress_bar_can_be_shown(tmp_path, capsys):
    create_table(tmp_path / "p.npy", np.ones((10, 4), np.float32), progress=True)
    verify_table(tmp_path / "p.npy", progress=True)
    assert "create p.npy" in capsys.readouterr().err


# ---- bad input: clear errors, nothing written --------------------------------------------------


@pytest.mark.parametrize(
    ("source", "kw", "match"),
    [
        (np.zeros(10, np.float32), {}, r"shape \(10,\).*expected 2-D"),
        (np.zeros((2, 3, 4), np.float32), {}, r"ndim 3.*expected 2-D"),
        (np.zeros((0, 4), np.float32), {}, r"rows >= 1"),
        (np.zeros((4, 3), np.int32), {}, r"int32.*expected float32, float16 or bfloat16"),
        (np.zeros((4, 3), np.int32), {"dtype": "float32"}, r"int32.*floating"),
        (np.zeros((4, 3), np.uint16), {}, r"uint16.*dtype='bfloat16'"),
        (np.zeros((4, 3), np.uint16), {"dtype": "float16"}, r"raw bfloat16 bits"),
        (np.zeros((4, 3), np.float32), {"dtype": "int8"}, r"dtype is 'int8'; expected one of"),
        (torch.zeros(4, 3, dtype=torch.complex64), {}, r"complex64"),
        ([[1.0, 2.0]], {}, r"source is a list; expected"),
        (np.zeros((4, 3), np.float32), {"block_bytes": 1000}, r"block_bytes=1000"),
        (np.zeros((4, 3), np.float32), {"chunk_bytes": 0}, r"chunk_bytes=0"),
        (RandomSource(4, 3, seed=-1), {}, r"seed=-1"),
        # a count not an integer was cut to one (10.7 rows made 10) or parsed from a str
        (RandomSource(10.7, 4), {}, r"RandomSource rows=10.7; expected an integer >= 1"),
        (RandomSource(10, 4.9), {}, r"RandomSource dim=4.9; expected an integer >= 1"),
        (RandomSource("12", 4), {}, r"RandomSource rows='12'; expected an integer >= 1"),
        (RandomSource(True, 4), {}, r"RandomSource rows=True; expected an integer >= 1"),
        (RandomSource(4, 3, seed=2.5), {}, r"seed=2.5; expected an integer >= 0"),
        (RandomSource(4, 3, std=True), {}, r"std=True; expected a finite number >= 0"),
        # an int past a float's range failed with a bare OverflowError
        (RandomSource(4, 3, std=10**400), {}, r"std=10000.*\(401 characters\); expected a finite"),
        (RandomSource(4, 3, std=-(10**400)), {}, r"expected a finite number >= 0"),
        (RandomSource(4, 3, dtype="float64"), {}, r"dtype is 'float64'"),
        (
            np.array([[1.0, 2.0], [3.0, 70000.0]], np.float32),
            {"dtype": "float16"},
            r"source row 1 column 1 is inf as float16: .* past float16's range \(\|x\| <= 65504\)",
        ),
        (np.array([[1.0, np.nan]], np.float32), {}, r"source row 0 column 1 is nan as float32"),
        (
            np.array([[1e39, 0.0]], np.float64),
            {"dtype": "bfloat16"},
            r"source row 0 column 0 is inf as bfloat16",
        ),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(tmp_path, source, kw, match):
    with pytest.raises(TableFormatError, match=match):
        create_table(tmp_path / "t.npy", source, progress=False, **kw)
    assert list(tmp_path.iterdir()) == []


def test_random_source_counts_may_be_numpy_integers(tmp_path):
    """A NumPy seed was refused ("expected an int") where NumPy rows and dim were taken; so was
    a NumPy std but np.float64 (np.float32(0.5): "expected a finite float"), and True was taken
    for std 1."""
    path, m = make(
        tmp_path, RandomSource(np.int64(5), np.int32(3), seed=np.int64(7), std=np.float32(0.5))
    )
    assert m.shape == (5, 3) and {type(m.rows), type(m.dim)} == {int}
    _, same = make(tmp_path, RandomSource(5, 3, seed=7, std=0.5), name="u.npy")
    assert same.block_checksums == m.block_checksums


def test_missing_tensor_name_lists_available(tmp_path):
    st = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2, 2)}, st)
    before = listing(tmp_path)
    with pytest.raises(TableFormatError, match=r"no tensor 'nope'.*'a.weight', 'b.weight'"):
        create_table(tmp_path / "t.npy", SafetensorsSource(st, "nope"), progress=False)
    with pytest.raises(TableFormatError, match=r"shape \(3,\)"):
        save_file({"v": torch.zeros(3)}, tmp_path / "v.safetensors")
        before = listing(tmp_path)
        create_table(tmp_path / "t.npy", SafetensorsSource(tmp_path / "v.safetensors", "v"))
    assert listing(tmp_path) == before


def test_missing_source_files(tmp_path):
    with pytest.raises(TableNotFoundError, match="source .npy file .*nope.npy does not exist"):
        create_table(tmp_path / "t.npy", str(tmp_path / "nope.npy"), progress=False)
    with pytest.raises(FileNotFoundError, match="safetensors source file"):
        create_table(tmp_path / "t.npy", SafetensorsSource(tmp_path / "x.st", "w"), progress=False)
    with pytest.raises(TableNotFoundError, match="target directory"):
        create_table(tmp_path / "no" / "t.npy", np.ones((2, 2), np.float32), progress=False)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(TableFormatError, match="not a readable .npy"):
        create_table(tmp_path / "t.npy", tmp_path / "junk.npy", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["junk.npy"]


@pytest.mark.parametrize("name", ["a\0b.npy", "a\ud800b.npy"])
def test_a_source_path_with_a_nul_or_lone_surrogate_is_said_not_to_exist(name):
    """``os.stat`` raises a bare ValueError for such a path (not OSError): it escaped the FIFO check
    in place of the "does not exist" said of any other path no file can have."""
    from tiered_store.table_sources import open_source

    with pytest.raises(TableNotFoundError, match="source .npy file .* does not exist"):
        open_source(name, "float32")


def test_a_garbled_npy_header_and_an_npz_source_are_named(tmp_path):
    """A header whose brackets do not balance (numpy raises tokenize.TokenError) is "not a
    readable .npy file", as a table and as a source; an .npz given as a source names its members
    (both were raw tracebacks, from `verify` and `init --from-npy` too)."""
    path, _ = make(tmp_path, np.ones((16, 4), np.float32))
    source = tmp_path / "src.npy"
    np.save(source, np.ones((4, 8), np.float32))
    for npy in (path, source):
        with open(npy, "r+b") as f:
            f.seek(10)
            f.write(b"{'descr': '<f4', 'shape': ((((")
    garbled = r"not a readable .npy file: its header does not parse \(TokenError"
    with pytest.raises(TableFormatError, match=garbled):
        check_table(path)
    with pytest.raises(TableFormatError, match=garbled):
        ColdTable(path)
    with pytest.raises(TableFormatError, match=garbled):
        create_table(tmp_path / "new.npy", source, progress=False)
    np.savez(tmp_path / "w.npz", table=np.ones((4, 8), np.float32))
    with pytest.raises(TableFormatError, match=r"w.npz is an .npz archive \(members: table\)"):
        create_table(tmp_path / "new.npy", tmp_path / "w.npz", progress=False)
    assert not (tmp_path / "new.npy").exists()


def test_no_overwrite_without_flag(tmp_path):
    path, m1 = make(tmp_path, np.ones((4, 4), np.float32))
    before = listing(tmp_path)
    with pytest.raises(TableExistsError, match="overwrite=True") as info:
        make(tmp_path, np.zeros((4, 4), np.float32))
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, TieredStoreError)
    assert listing(tmp_path) == before
    # a lone .npy (no manifest) is protected too
    np.save(tmp_path / "plain.npy", np.ones((2, 2)))
    with pytest.raises(TableExistsError):
        make(tmp_path, np.zeros((4, 4), np.float32), name="plain.npy")
    _, m2 = make(tmp_path, np.zeros((8, 4), np.float32), overwrite=True)
    assert m2.shape == (8, 4) and np.array_equal(np.load(path), np.zeros((8, 4)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "plain.npy",
        "t.npy",
        "t.npy.manifest.json",
        "t.npy.pages.crc32c",
    ]


# ---- verification and structural checks --------------------------------------------------------


def test_verify_clean_table(tmp_path):
    path, m = make(tmp_path, RandomSource(1000, 50, seed=1), block_bytes=4096 * 3)
    report = verify_table(path, progress=False)
    assert report.blocks_checked == m.num_blocks == 17
    assert report.bytes_checked == m.data_bytes and report.bytes_per_second > 0


def test_verify_names_the_corrupted_block(tmp_path):
    path, m = make(tmp_path, RandomSource(1000, 50, seed=1), block_bytes=8192)
    offset = 4096 + 8192 * 5 + 123  # inside block 5
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    check_table(path)  # structure is fine: opening does not re-verify
    start, end = 4096 + 8192 * 5, 4096 + 8192 * 6
    expected = f"0x{m.block_checksums[5]:08x}"
    with pytest.raises(
        TableFormatError,
        match=rf"block 5 \(file bytes \[{start}, {end}\)\).*expected crc32 {expected}",
    ):
        verify_table(path, progress=False)


@pytest.mark.parametrize("when", ["page checksums", "data"])
def test_a_table_made_anew_as_its_verification_starts_is_not_called_corrupt(
    tmp_path, monkeypatch, when
):
    """A table made anew over the path (a conversion rerun, `init --overwrite`) between the
    manifest's read and the reads of its sidecar or data: the old manifest was checked against
    the new files, and verify_table said "fails its own checksum" or "block 0 fails its
    checksum" of a sound table (serve's scrubber counted a checksum failure and turned /healthz
    503). It verifies the table as it is once the replacement is done."""
    import tiered_store.table_format as table_format

    path, _ = make(tmp_path, RandomSource(1000, 50, seed=1), block_bytes=8192)
    replaced: list[bool] = []

    def make_anew() -> None:
        if not replaced:
            replaced.append(True)
            source = RandomSource(1000, 50, seed=2)
            create_table(path, source, progress=False, overwrite=True, block_bytes=4096)

    if when == "page checksums":
        real = table_format.load_page_checksums

        def load_page_checksums(*args, **kwargs):
            make_anew()
            return real(*args, **kwargs)

        monkeypatch.setattr(table_format, "load_page_checksums", load_page_checksums)
    else:
        real_scan = table_format._scan_table

        def scan(*args, **kwargs):
            make_anew()  # the file the scan reads was opened before: the old one, and sound
            return real_scan(*args, **kwargs)

        monkeypatch.setattr(table_format, "_scan_table", scan)
    report = verify_table(path, progress=False)
    # the table as it is now, or the one whose data file was open first (whole, and sound)
    assert replaced and report.blocks_checked == {"page checksums": 49, "data": 25}[when]
    assert verify_table(path, progress=False).blocks_checked == 49


def test_a_table_made_anew_of_another_shape_as_its_check_starts_is_not_called_corrupt(
    tmp_path, monkeypatch
):
    """A table made anew with other rows between the structure check's read of the manifest
    and its open of the data file: the old manifest was checked against the new data file, and
    verify_table said ".npy header shape (2000, 50) != manifest shape (1000, 50)" of a sound
    table (serve's scrubber counted a checksum failure). It verifies the table as it is then."""
    import tiered_store.table_format as table_format

    path, _ = make(tmp_path, RandomSource(1000, 50, seed=1), block_bytes=8192)
    real, replaced = table_format.read_manifest, []

    def read_then_made_anew(*args, **kwargs):
        manifest = real(*args, **kwargs)
        if not replaced:  # once the first read is done
            replaced.append(True)
            source = RandomSource(2000, 50, seed=2)
            create_table(path, source, progress=False, overwrite=True, block_bytes=8192)
        return manifest

    monkeypatch.setattr(table_format, "read_manifest", read_then_made_anew)
    assert verify_table(path, progress=False).bytes_checked == 2000 * 50 * 4
    assert replaced


def test_a_table_being_made_anew_at_every_try_has_no_verdict(tmp_path, monkeypatch):
    """A verification that started while a table was being made anew over the path (its
    manifest unlinked, under the folder's lock, until the new one is moved in) said "table
    manifest ... does not exist", and one that saw it made anew at each of VERIFY_ATTEMPTS tries
    raised a plain TableFormatError: serve's scrubber counted either as a checksum failure (and
    its critical alert fired) of a sound table. Both raise TableChangingError now (no verdict);
    a manifest missing while no writer holds the folder is still TableNotFoundError."""
    import tiered_store.table_format as table_format
    from tiered_store.process_locks import locked_folder
    from tiered_store.table_format import TableChangingError

    path, _ = make(tmp_path, RandomSource(1000, 50, seed=1), block_bytes=8192)
    manifest = table_paths(path)[1]
    aside = tmp_path / "manifest.aside"
    with locked_folder(path.parent):  # as _publish: the old manifest unlinked, the new not in
        os.replace(manifest, aside)
        with pytest.raises(TableChangingError, match=r"being made anew.*run the check again"):
            verify_table(path, progress=False)
    with pytest.raises(TableNotFoundError, match="does not exist"):  # no writer: a verdict
        verify_table(path, progress=False)
    os.replace(aside, manifest)
    assert verify_table(path, progress=False).blocks_checked == 25

    real, seeds = table_format.load_page_checksums, iter(range(2, 100))

    def made_anew_at_every_try(*args, **kwargs):
        create_table(path, RandomSource(1000, 50, seed=next(seeds)), progress=False, overwrite=True)
        return real(*args, **kwargs)

    monkeypatch.setattr(table_format, "load_page_checksums", made_anew_at_every_try)
    with pytest.raises(TableChangingError, match=r"made anew at each of 3 tries"):
        verify_table(path, progress=False)


@pytest.mark.parametrize("when", ["before the scan", "after the scan"])
def test_page_checksums_of_a_table_made_anew_meanwhile_are_no_verdict(tmp_path, monkeypatch, when):
    """add_page_checksums over a table made anew meanwhile (a conversion rerun, init
    --overwrite) called it corrupt or failed: made anew before its scan opened the data file, the
    new rows were checked against the old manifest ('block 0 fails its checksum'); after, it said
    'changed ... run the command again' as a TableFormatError: `verify --add-page-checksums`
    printed FAILED and exited 1 over a sound table. Both raise TableChangingError (no verdict,
    nothing written), which verify reports as such (exit 75)."""
    import tiered_store.table_format as table_format
    from tiered_store.cli import main
    from tiered_store.table_format import TableChangingError, add_page_checksums

    path, _ = make(tmp_path, RandomSource(1000, 50, seed=1), block_bytes=8192)
    real, seeds, made = table_format._scan_table, iter(range(2, 100)), []

    def made_anew(*args, **kwargs):
        sums = real(*args, **kwargs) if when == "after the scan" else None
        source = RandomSource(1000, 50, seed=next(seeds))
        create_table(path, source, progress=False, overwrite=True, block_bytes=8192)
        made.append(listing(tmp_path))  # the new table's files, as its writer left them
        return sums if when == "after the scan" else real(*args, **kwargs)

    monkeypatch.setattr(table_format, "_scan_table", made_anew)
    with pytest.raises(TableChangingError, match=r"run the command again"):
        add_page_checksums(path, progress=False)
    assert listing(tmp_path) == made[-1]  # nothing written over the new table
    assert main(["verify", "--add-page-checksums", str(path), "--quiet"]) == 75
    assert listing(tmp_path) == made[-1]
    monkeypatch.undo()
    assert verify_table(path, progress=False).blocks_checked == 25


def test_page_checksums_of_a_table_whose_manifest_goes_once_checked_are_no_verdict(
    tmp_path, monkeypatch
):
    """add_page_checksums over a table whose manifest went between its structure check and its
    read of the manifest's bytes (a writer making it anew unlinks it until the new one is in; a
    compaction removes an old version manifest first) failed with a bare FileNotFoundError
    (`verify --add-page-checksums` a traceback). It is TableChangingError (no verdict, nothing
    written), which verify reports as such (exit 75)."""
    import tiered_store.table_format as table_format
    from tiered_store.cli import main
    from tiered_store.table_format import TableChangingError, add_page_checksums

    path, _ = make(tmp_path, RandomSource(1000, 50, seed=1), block_bytes=8192)
    manifest, aside = table_paths(path)[1], tmp_path / "manifest.aside"
    real, files = table_format.check_table, listing(tmp_path)

    def checked_then_gone(*args, **kwargs):
        checked = real(*args, **kwargs)
        os.replace(manifest, aside)
        return checked

    monkeypatch.setattr(table_format, "check_table", checked_then_gone)
    with pytest.raises(
        TableChangingError, match=r"made anew \(or removed\).*run the command again"
    ):
        add_page_checksums(path, progress=False)
    os.replace(aside, manifest)
    assert main(["verify", "--add-page-checksums", str(path), "--quiet"]) == 75
    os.replace(aside, manifest)
    monkeypatch.undo()
    assert listing(tmp_path) == files  # nothing written
    assert add_page_checksums(path, progress=False).blocks_checked == 25


@pytest.mark.parametrize(
    ("add", "when", "after"),
    [
        (False, "_manifest_unless_published", False),
        (False, "_check_data_file", False),
        (True, "_scan_table", True),
    ],
)
def test_a_verification_of_a_table_compacted_meanwhile_has_no_verdict(
    tmp_path, monkeypatch, capsys, add, when, after
):
    """`verify` of a table compacted while it ran: the compaction removed the version verify
    was reading (no store held it), so verify said the table 'does not exist' (exit 2), or with
    --add-page-checksums FAILED 'was removed' (exit 1), of a sound table there in its next
    version. It is no verdict (exit 75) naming the current version; run again, it checks it."""
    import tiered_store.table_format as table_format
    from tiered_store import TieredStore
    from tiered_store.cli import main
    from tiered_store.delta.compaction import compact_table

    path, _ = make(tmp_path, RandomSource(1000, 50, seed=1), block_bytes=8192)
    with TieredStore.open({"table": {"path": str(path)}}) as store:
        store.write([4], torch.ones(1, 50))
        store.commit()
    real, compacted = getattr(table_format, when), []

    def compacting(*args, **kwargs):
        result = real(*args, **kwargs) if after else None
        if not compacted:  # once: the compaction calls it too
            compacted.append(True)
            compact_table(path, progress=False)
        return result if after else real(*args, **kwargs)

    monkeypatch.setattr(table_format, when, compacting)
    asked = ["verify", str(path), "--quiet", *(["--add-page-checksums"] if add else [])]
    capsys.readouterr()
    assert main(asked) == 75 and compacted
    err = capsys.readouterr().err
    assert "NO VERDICT" in err and "compacted while verify ran" in err and "t.g1.npy" in err, err
    assert not path.exists()  # the version read is gone: compaction removed it
    assert main(asked) == 0


def test_a_verification_stops_between_reads_once_asked(tmp_path, monkeypatch):
    """serve's scrubber could not end a pass under way: a stop waited up to 30 s for it (a
    101 GB table takes about a minute), then closed the tables with the pass still reading. A
    pass given ``stop`` ends at the next read once it is set, raising VerifyStopped (no verdict:
    a corrupt block after that read is not reached)."""
    import threading

    import tiered_store.table_format as table_format
    from tiered_store.table_format import VerifyStopped

    path, m = make(tmp_path, RandomSource(1000, 50, seed=1), block_bytes=4096)
    with open(path, "r+b") as f:  # the last block is corrupt: a whole pass would say so
        f.seek(m.file_bytes - 10)
        byte = f.read(1)
        f.seek(m.file_bytes - 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(table_format, "VERIFY_READ_BYTES", 2 * 4096)  # 25 reads of 2 blocks
    stop = threading.Event()
    real, reads = table_format._read_full, []

    def read_then_stop(f, view, want, offset):
        reads.append(want)
        stop.set()  # as a server's stop comes while the pass reads
        return real(f, view, want, offset)

    monkeypatch.setattr(table_format, "_read_full", read_then_stop)
    with pytest.raises(VerifyStopped, match=r"t\.npy: verification stopped after 8,192 of 200,000"):
        verify_table(path, progress=False, stop=stop)
    assert reads == [8192]
    with pytest.raises(TableFormatError, match="block 48"):  # not stopped: the whole pass
        verify_table(path, progress=False, stop=threading.Event())


def test_a_verification_keeps_to_its_byte_rate(tmp_path):
    """serve's scrubber read a table as fast as the disk went (a 101 GB table in about a
    minute), taking the cold path's reads from lookups for the whole pass. Given
    ``bytes_per_s``, a pass reads no faster than that, and a stop set while it waits ends it
    within the wait's first moments."""
    import threading
    import time

    from tiered_store.table_format import VerifyStopped

    path, m = make(tmp_path, RandomSource(1000, 50, seed=1), block_bytes=4096)  # 200,000 B
    start = time.monotonic()
    report = verify_table(path, progress=False, bytes_per_s=100_000)
    assert time.monotonic() - start >= (m.data_bytes - 12_288) / 100_000  # the last read unpaced
    assert report.blocks_checked == m.num_blocks
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    start = time.monotonic()
    with pytest.raises(VerifyStopped):
        verify_table(path, progress=False, bytes_per_s=1_000, stop=stop)  # 200 s unstopped
    assert time.monotonic() - start < 60
    with pytest.raises(ValueError, match=r"bytes_per_s=0: expected a positive number .* or None"):
        verify_table(path, progress=False, bytes_per_s=0)


def test_a_verification_takes_a_numpy_byte_rate(tmp_path):
    """A rate computed with NumPy (np.int64, np.float32) was refused as not a number; NumPy
    numbers are numbers (a bool, NumPy's too, is still refused)."""
    path, m = make(tmp_path, RandomSource(1000, 50, seed=1), block_bytes=4096)
    for rate in (np.int64(10**9), np.float32(1e9)):
        assert verify_table(path, progress=False, bytes_per_s=rate).blocks_checked == m.num_blocks
    for flag in (True, np.True_):
        with pytest.raises(ValueError, match=r"bytes_per_s=(np\.)?True_?: expected a positive"):
            verify_table(path, progress=False, bytes_per_s=flag)


def test_a_table_whose_blocks_exceed_memory_verifies(tmp_path, monkeypatch):
    """create_table takes any multiple of 4096 for block_bytes, and a pass read a whole block
    at a time: a table made with 1 TiB blocks failed every verify (and the serve scrubber's
    passes) with MemoryError. A pass reads at most VERIFY_READ_BYTES at a time, a block's
    CRC-32 carried over its reads, and still names a bad block."""
    import tiered_store.table_format as table_format
    from tiered_store.page_checksums import ChecksumError
    from tiered_store.table_format import add_page_checksums

    path, m = make(tmp_path, RandomSource(1000, 50, seed=1), block_bytes=1 << 40)
    assert verify_table(path, progress=False).blocks_checked == m.num_blocks == 1
    assert add_page_checksums(path, progress=False).blocks_checked == 1
    monkeypatch.setattr(table_format, "VERIFY_READ_BYTES", 8192)  # blocks of 4 reads
    path, m = make(tmp_path, RandomSource(1000, 50, seed=1), "b.npy", block_bytes=4 * 8192)
    reads = []
    real = table_format._read_full

    def counted(f, view, want, offset):
        reads.append(want)
        return real(f, view, want, offset)

    monkeypatch.setattr(table_format, "_read_full", counted)
    report = verify_table(path, progress=False, bytes_per_s=10**6)
    assert report.blocks_checked == m.num_blocks == 7 and max(reads) == 8192
    with open(path, "r+b") as f:  # a byte of block 2's first read (pages unchecked below)
        f.seek(m.data_offset + 2 * 4 * 8192 + 10)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(TableFormatError, match=r"block 2 \(file bytes \[69632, 102400\)\) fails"):
        add_page_checksums(path, progress=False)
    # verify_table's ChecksumError said the blocks were right: block 2 ends in a later read
    with pytest.raises(ChecksumError, match=r"page 16 \(file bytes \[69632, 73728\)"):
        verify_table(path, progress=False)


def test_a_verification_at_a_huge_or_tiny_byte_rate_runs(tmp_path):
    """A rate past a float's range (an int, 10**400) failed with OverflowError (its tenth taken
    as a float), and one so low that the wait for the second read passed the longest a thread
    waits (1e-300 bytes a second) failed with OverflowError too; the first is as good as no
    limit, the second waits (until stopped, or interrupted)."""
    import signal
    import threading

    from tiered_store.table_format import VerifyStopped

    path, m = make(tmp_path, RandomSource(1000, 50, seed=1), block_bytes=4096)
    report = verify_table(path, progress=False, bytes_per_s=10**400)
    assert report.blocks_checked == m.num_blocks
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(VerifyStopped, match="stopped after 4,096 of"):
        verify_table(path, progress=False, bytes_per_s=1e-300, stop=stop)

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    main = threading.main_thread().ident  # with no stop: it waits until interrupted
    default = signal.signal(signal.SIGINT, ctrl_c)  # as Python's, whatever the runner set
    try:
        threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            verify_table(path, progress=False, bytes_per_s=1e-300)
    finally:
        signal.signal(signal.SIGINT, default)


@pytest.mark.parametrize("command", ["verify", "add_page_checksums"])
def test_a_read_error_while_verifying_names_the_table_and_offset(
    tmp_path, monkeypatch, capsys, command
):
    """A disk read error (EIO) in a whole-table pass came out as a bare ``OSError: [Errno 5]
    Input/output error`` naming neither table nor offset: a traceback from ``tiered-store
    verify``, and an anonymous ``last_error`` in serve's /healthz. It is a TierIOError naming
    both, and the command prints one line."""
    import errno

    import tiered_store.table_format as table_format
    from tiered_store.cli import main
    from tiered_store.errors import TierIOError
    from tiered_store.table_format import add_page_checksums

    path, _ = make(tmp_path, RandomSource(1000, 50, seed=1), block_bytes=4096)
    monkeypatch.setattr(table_format, "VERIFY_READ_BYTES", 2 * 4096)  # 25 reads of 2 blocks
    real = table_format._read_full
    reads = []

    def fails_at_the_third_read(f, view, want, offset):
        reads.append(want)
        if len(reads) == 3:
            raise OSError(errno.EIO, "Input/output error")
        return real(f, view, want, offset)

    monkeypatch.setattr(table_format, "_read_full", fails_at_the_third_read)
    run = verify_table if command == "verify" else add_page_checksums
    offset = 4096 + 2 * 8192
    message = rf"reading 8,192 bytes of table .*t\.npy at byte {offset:,} failed \(Input/output"
    with pytest.raises(TierIOError, match=message):
        run(path, progress=False)
    reads.clear()
    option = ["--add-page-checksums"] if command == "add_page_checksums" else []
    assert main(["verify", str(path), "--quiet", *option]) == 2  # as any other error
    err = capsys.readouterr().err
    assert err.startswith(f"tiered-store verify: error: reading 8,192 bytes of table {path}")
    assert "Traceback" not in err and err.count("\n") == 1


def test_truncated_table_is_refused(tmp_path):
    path, m = make(tmp_path, RandomSource(100, 10))
    with open(path, "r+b") as f:
        f.truncate(m.file_bytes - 7)
    msg = rf"t.npy: file is truncated: size {m.file_bytes - 7} bytes, expected {m.file_bytes}"
    with pytest.raises(TableFormatError, match=msg):
        check_table(path)
    with pytest.raises(TableFormatError, match="truncated"):
        verify_table(path, progress=False)


def test_header_dtype_vs_manifest_mismatch(tmp_path):
    path, _ = make(tmp_path, np.ones((16, 4), np.float32))
    mpath = tmp_path / "t.npy.manifest.json"
    doc = json.loads(mpath.read_text())
    doc.update(dtype="float16", npy_descr="<f2", row_bytes=8, data_bytes=128, file_bytes=4096 + 128)
    mpath.write_text(json.dumps(sealed(doc)))  # consistent, but not with the .npy
    with pytest.raises(TableFormatError, match=r"header dtype '<f4' != '<f2'.*float16"):
        check_table(path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"format_version": 99}, "newer"),
        ({"row_bytes": 5}, "'row_bytes' is 5"),
        ({"block_checksums": [1, 2]}, "block_checksums"),
        ({"shape": [16]}, "shape"),
        ({"format": "x"}, "format"),
    ],
)
def test_bad_manifest_fields(tmp_path, edit, match):
    path, _ = make(tmp_path, np.ones((16, 4), np.float32))
    mpath = tmp_path / "t.npy.manifest.json"
    mpath.write_text(json.dumps(sealed({**json.loads(mpath.read_text()), **edit})))
    with pytest.raises(TableFormatError, match=match):
        read_manifest(path)
    mpath.write_text("{not json")
    with pytest.raises(TableFormatError, match="not valid JSON"):
        read_manifest(path)


def test_missing_manifest_or_data(tmp_path):
    path, _ = make(tmp_path, np.ones((16, 4), np.float32))
    (tmp_path / "t.npy.manifest.json").unlink()
    with pytest.raises(TableNotFoundError, match="manifest .* does not exist"):
        check_table(path)
    path, _ = make(tmp_path, np.ones((16, 4), np.float32), name="u.npy")
    path.unlink()
    with pytest.raises(TableNotFoundError, match="data file .*u.npy does not exist"):
        check_table(path)


def test_a_manifest_nested_past_the_recursion_limit_is_refused_naming_it(tmp_path):
    """A manifest of deeply nested JSON (a file overwritten by another tool) raised a bare
    RecursionError from json.loads, or, nested just below the limit, from its checksum's
    json.dumps: a traceback from `tiered-store info`, not an error naming the file."""
    path, _ = make(tmp_path, np.ones((16, 4), np.float32))
    mpath = tmp_path / "t.npy.manifest.json"
    doc = json.loads(mpath.read_text())
    mpath.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TableFormatError, match=r"t\.npy\.manifest\.json .*nested"):
        read_manifest(path)
    depth = sys.getrecursionlimit()
    for nest in range(depth - 60, depth):  # json.loads takes it, the checksum's dumps may not
        metadata: dict = {}
        for _ in range(nest):
            metadata = {"a": metadata}
        try:
            text = json.dumps({**doc, "metadata": metadata})
        except RecursionError:
            continue
        mpath.write_text(text)
        try:
            read_manifest(path)
        except TableFormatError as exc:
            assert "t.npy.manifest.json" in str(exc)


# ---- the manifest's own checksum ----------------------------------------------------------------


META = {"engram": {"layer_id": 2, "heads": [3, 5, 7], "std": 0.02, "name": "caf\u00e9"}}


def _flip(mpath: Path, offset: int, bit: int) -> None:
    """Flip one bit of the manifest file in place (flipping it again restores it)."""
    with open(mpath, "r+b") as f:
        byte = os.pread(f.fileno(), 1, offset)[0] ^ (1 << bit)
        os.pwrite(f.fileno(), bytes([byte]), offset)


def test_every_bit_flip_of_a_manifest_is_refused_naming_it_or_changes_nothing(tmp_path):
    """A one-bit flip in the "page_checksums" key opened the table unverified (a warning only),
    one in "metadata" silently dropped its Engram layout: the manifest had no checksum."""
    path, _ = make(tmp_path, RandomSource(1000, 8, seed=1), metadata=META, block_bytes=8192)
    mpath = table_paths(path)[1]
    original, good = mpath.read_bytes(), read_manifest(path)
    assert good.manifest_crc32c is not None and good.page_checksums is not None
    refused = same = 0
    for offset in range(len(original)):
        for bit in range(8):
            _flip(mpath, offset, bit)
            try:
                got = read_manifest(path)
            except TableFormatError as exc:
                assert str(mpath) in str(exc), exc
                refused += 1
                continue
            finally:
                _flip(mpath, offset, bit)
            where = f"byte {offset} bit {bit}: {original[offset - 20 : offset + 20]!r}"
            assert got.to_json() == good.to_json(), where  # metadata, page checksums, ...
            assert got.manifest_crc32c == good.manifest_crc32c, where
            same += 1
    assert refused + same == 8 * len(original) and refused > 0.99 * (refused + same)
    assert mpath.read_bytes() == original
    # the review's two flips, where a store opens its table: refused, saying what is wrong
    for key in ('"page_checksums"', '"metadata"'):
        _flip(mpath, original.index(key.encode()) + 3, 0)
        with pytest.raises(TableFormatError, match=rf"manifest {mpath} is corrupt: it fails"):
            ColdTable(path)
        _flip(mpath, original.index(key.encode()) + 3, 0)


def test_a_manifest_without_its_checksum_still_opens_but_not_with_an_unknown_field(tmp_path):
    """Manifests written before the checksum open as before (only a field name no version wrote,
    such as a damaged "metadata", is refused); verify notes the missing checksum."""
    from tiered_store.cli import main  # noqa: PLC0415

    path, made = make(tmp_path, RandomSource(1000, 8, seed=1), metadata=META)
    mpath = table_paths(path)[1]
    doc = json.loads(mpath.read_text())
    del doc["manifest_crc32c"]
    mpath.write_text(json.dumps(doc, indent=1))  # as an older version wrote it
    old = read_manifest(path)
    assert old.manifest_crc32c is None and old.to_json() == made.to_json()
    with ColdTable(path) as cold:
        assert torch.equal(cold.read_rows(np.arange(3)), cold.read_rows(np.arange(3)))
    assert verify_table(path, progress=False).manifest_checksum is False
    for field, damaged in (("metadata", "metadatq"), ("page_checksums", "page_checjsums")):
        mpath.write_text(json.dumps({damaged if k == field else k: v for k, v in doc.items()}))
        with pytest.raises(TableFormatError, match=rf"{mpath} is corrupt: .*field '{damaged}'"):
            read_manifest(path)
    created = {**doc, "created": {"sourcf": "x", "time": "", "library_version": ""}}
    mpath.write_text(json.dumps(created))
    with pytest.raises(TableFormatError, match=r"field 'created.sourcf'"):
        read_manifest(path)
    mpath.write_text(json.dumps(doc))
    assert main(["verify", str(path), "--quiet"]) == 0  # a note, not a failure


@pytest.mark.parametrize("value", [-1, 2**32, "0x1", True, None])
def test_a_manifest_checksum_that_is_no_uint32_is_refused(tmp_path, value):
    path, _ = make(tmp_path, np.ones((16, 4), np.float32))
    mpath = table_paths(path)[1]
    mpath.write_text(json.dumps({**json.loads(mpath.read_text()), "manifest_crc32c": value}))
    with pytest.raises(TableFormatError, match=rf"{mpath} is corrupt: field 'manifest_crc32c' is"):
        read_manifest(path)


def test_the_manifest_checksum_covers_metadata_as_a_reader_parses_it(tmp_path):
    """Tuples and non-ASCII text change form on the way to JSON: the checksum is of the parsed
    form, so such metadata opens (int keys, which also did, are refused since 03a1c7e)."""
    meta = {"t": (1, 2), "n": {"10": "a", "9": "b"}, "s": "\u00e9\u2603", "f": 0.1}
    path, made = make(tmp_path, np.ones((16, 4), np.float32), metadata=meta)
    got = read_manifest(path)
    assert got.manifest_crc32c == made.manifest_crc32c
    assert got.metadata == {"t": [1, 2], "n": {"10": "a", "9": "b"}, "s": "\u00e9\u2603", "f": 0.1}


# ---- atomic creation ---------------------------------------------------------------------------


def test_failure_mid_stream_leaves_no_trace_and_old_table_untouched(tmp_path, monkeypatch):
    path, _ = make(tmp_path, np.full((64, 8), 3.0, np.float32))
    before = listing(tmp_path)
    import tiered_store.table_sources as tf

    calls = {"n": 0}
    real = tf._RandomReader.read

    def failing_read(self, start, stop):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk on fire")
        return real(self, start, stop)

    monkeypatch.setattr(tf._RandomReader, "read", failing_read)
    with pytest.raises(OSError, match="disk on fire"):
        create_table(path, RandomSource(5000, 8), chunk_bytes=4096, overwrite=True, progress=False)
    assert listing(tmp_path) == before  # temp files removed, old table byte-identical
    verify_table(path, progress=False)


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import tiered_store.table_format as tf
    from tiered_store.table_format import RandomSource, create_table

    path, where = sys.argv[1], sys.argv[2]
    if where == "stream":  # hard crash (no cleanup, no finally) after a few chunks
        real, n = tf._BlockCrc.update, [0]
        def update(self, data):
            n[0] += 1
            if n[0] == 3:
                os._exit(17)
            real(self, data)
        tf._BlockCrc.update = update
    elif where == "commit":  # crash between renaming the .npy and the manifest
        real_replace = os.replace
        def replace(src, dst):
            real_replace(src, dst)
            os._exit(17)
        tf.os.replace = replace
    create_table(path, RandomSource(20000, 16, seed=5), chunk_bytes=65536, overwrite=True,
                 progress=False)
    """
)


def crash_create(path: Path, where: str) -> None:
    env = subprocess_env()
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(path), where], env=env, capture_output=True
    )
    assert proc.returncode == 17, proc.stderr.decode()


def test_killed_mid_stream_keeps_old_table(tmp_path):
    path, old = make(tmp_path, np.full((64, 8), 3.0, np.float32))
    old_bytes = path.read_bytes()
    crash_create(path, "stream")
    assert check_table(path) == old and path.read_bytes() == old_bytes
    verify_table(path, progress=False)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers and all(n.startswith(".t.npy.") for n in leftovers)  # hidden, never opened


def test_killed_mid_stream_on_fresh_path_leaves_no_table(tmp_path):
    path = tmp_path / "fresh.npy"
    crash_create(path, "stream")
    assert not path.exists()
    with pytest.raises(TableNotFoundError):
        check_table(path)


def test_killed_during_commit_leaves_no_openable_table(tmp_path):
    path, _ = make(tmp_path, np.full((64, 8), 3.0, np.float32))
    crash_create(path, "commit")
    assert path.exists()  # the new .npy is in place, but its manifest never appeared...
    with pytest.raises(TableNotFoundError, match="manifest"):
        check_table(path)  # ...and the old manifest was removed first: nothing opens


def test_manifest_keeps_caller_metadata(tmp_path):
    from tiered_store.table_format import create_table as create
    from tiered_store.table_format import read_manifest as read

    layout = {"engram": {"layer_id": 2, "head_sizes": [5, 7]}, "ünï": [True, None, 2**70, -0.0]}
    create(tmp_path / "m.npy", np.zeros((12, 4), np.float32), progress=False, metadata=layout)
    assert read(tmp_path / "m.npy").metadata == layout


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"heads": np.int64(2)}, "Object of type int64 is not JSON serializable"),
        ({"made_from": Path("/x")}, "Object of type PosixPath is not JSON serializable"),
        ({"scale": float("nan")}, "Out of range float values are not JSON compliant"),
        ([("heads", 2)], "metadata is a list; expected a dict"),
        # JSON keeps keys as strings: {0: 5} was read back as {"0": 5}, {1: "x", "1": "y"} lost x
        ({"sizes": {0: 5}}, r"metadata\['sizes'\] has the key 0 \(int\); expected str keys"),
        ({"a": [{"1": "y", 1: "x"}]}, r"metadata\['a'\]\[0\] has the key 1 \(int\)"),
        ({True: 1}, r"metadata has the key True \(bool\); .* read back as 'true'"),
        # nested past the recursion limit: json.dumps's bare RecursionError
        ({"x": functools.reduce(lambda inner, _: [inner], range(5000), [])}, "nested deeper"),
    ],
    ids=["numpy-int", "path", "nan", "list", "int-key", "colliding-keys", "bool-key", "deep"],
)
def test_metadata_the_manifest_cannot_hold_is_refused_before_writing(tmp_path, metadata, message):
    """Such metadata failed with a bare TypeError only after every row was written (NaN went
    into the manifest as 'NaN', which is not JSON)."""
    with pytest.raises(TableFormatError, match=message):
        create_table(
            tmp_path / "t.npy", np.zeros((12, 4), np.float32), progress=False, metadata=metadata
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("make_source", "message"),
    [
        (lambda: torch.empty(4, 8, device="meta"), "is on the meta device"),
        (lambda: torch.eye(8).to_sparse(), r"has layout torch.sparse_coo; expected a dense"),
        (lambda: torch.eye(8).to_sparse_csr(), r"has layout torch.sparse_csr; expected a dense"),
        (  # a strided nested tensor's .shape raises: the message says how many entries
            lambda: torch.nested.nested_tensor([torch.ones(8), torch.ones(7)]),
            r"nested \(2 tensors\) is a nested tensor .*to_padded_tensor",
        ),
    ],
    ids=["meta", "sparse", "csr", "nested"],
)
def test_a_tensor_without_readable_rows_is_named(tmp_path, make_source, message):
    """A meta or sparse tensor failed mid-creation with torch's NotImplementedError, naming
    neither the source nor what was expected."""
    with pytest.raises(TableFormatError, match=rf"source torch.Tensor float32 .*{message}"):
        create_table(tmp_path / "t.npy", make_source(), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_replace_metadata_rewrites_the_manifest_alone_and_only_the_one_read(tmp_path):
    """replace_metadata (convert-hf records a reused table's tokenizer digest with it): the
    manifest gains the metadata, the rows and their checksums stay; a manifest changed since
    the caller read it is left as it is."""
    from tests.conftest import assert_sealed_manifest, make_table
    from tiered_store.table_format import replace_metadata

    path, _ = make_table(tmp_path, rows=300, dim=8)
    read = read_manifest(path)
    rows = (path.stat().st_ino, path.stat().st_mtime_ns)
    new = replace_metadata(path, {**read.metadata, "note": "x"}, expected=read)
    assert read_manifest(path) == new and new.metadata["note"] == "x"
    assert new.block_checksums == read.block_checksums
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == rows
    assert_sealed_manifest(path)
    verify_table(path, progress=False)
    with pytest.raises(TableFormatError, match="changed while its metadata was recorded"):
        replace_metadata(path, {"note": "y"}, expected=read)  # read before the first
    assert read_manifest(path) == new
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_replace_metadata_keeps_the_fields_a_newer_version_wrote(tmp_path):
    """A manifest sealed with fields this version does not know (a newer release's, which
    readers ignore): replace_metadata changes its metadata alone and keeps those fields."""
    from tests.conftest import assert_sealed_manifest, make_table
    from tiered_store.manifest_checksum import sealed
    from tiered_store.table_format import replace_metadata

    path, _ = make_table(tmp_path, rows=300, dim=8)
    manifest_path = table_paths(path)[1]
    doc = json.loads(manifest_path.read_text())
    doc["row_index"] = {"kind": "newer"}
    doc["created"]["host"] = "newer"
    manifest_path.write_text(json.dumps(sealed(doc)))
    read = read_manifest(path)
    new = replace_metadata(path, {**read.metadata, "note": "x"}, expected=read)
    kept = json.loads(manifest_path.read_text())
    assert kept["row_index"] == {"kind": "newer"} and kept["created"]["host"] == "newer"
    assert kept["metadata"]["note"] == "x" and read_manifest(path) == new
    assert new.manifest_crc32c == kept["manifest_crc32c"]
    assert_sealed_manifest(path)
    verify_table(path, progress=False)


def test_add_page_checksums_keeps_the_fields_a_newer_version_wrote(tmp_path):
    """A manifest sealed with fields this version does not know (a newer release's, which
    readers ignore): add_page_checksums rewrote it from the fields it parses, dropping them; it
    adds its page checksums and keeps every other field as written."""
    from tests.conftest import assert_sealed_manifest, make_table
    from tiered_store.table_format import add_page_checksums

    path, _ = make_table(tmp_path, rows=300, dim=8)
    manifest_path = table_paths(path)[1]
    doc = json.loads(manifest_path.read_text())
    doc.pop("page_checksums", None)
    doc["row_index"] = {"kind": "newer"}
    doc["created"]["host"] = "newer"
    manifest_path.write_text(json.dumps(sealed(doc)))
    add_page_checksums(path, progress=False)
    kept = json.loads(manifest_path.read_text())
    assert kept["row_index"] == {"kind": "newer"} and kept["created"]["host"] == "newer"
    assert read_manifest(path).page_checksums is not None
    assert_sealed_manifest(path)
    assert verify_table(path, progress=False).pages_checked > 0


def _direct_supported(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("whole_pass", [verify_table, add_page_checksums])
def test_a_verification_leaves_the_table_out_of_the_page_cache(tmp_path, whole_pass):
    """A whole-table pass (``tiered-store verify``, serve's scrubber, and ``verify
    --add-page-checksums``, which a served table's repair runs too) read through the page
    cache: it filled the cache with the table, evicting the pages the cold tier's mmap and
    pread reads keep hot, and checked the cached copy rather than the disk. It reads with
    ``O_DIRECT`` where the file system takes it: the pass adds none of the data's pages."""
    path, m = make(tmp_path, RandomSource(20_000, 64, seed=1))  # 5 MiB
    if not _direct_supported(path):
        pytest.skip("the test file system refuses O_DIRECT")
    drop_page_cache([path])
    before = cached_pages(path)
    assert before < m.file_bytes // 4096 // 10  # evicted (the file system dropped them)
    assert whole_pass(path, progress=False).bytes_checked == m.data_bytes
    added = cached_pages(path) - before  # (reading the header caches a few pages)
    assert added < m.file_bytes // 4096 // 10, f"the pass cached {added} pages of the table"


@pytest.mark.parametrize("refused_at", ["open", "read"])
def test_a_verification_where_o_direct_is_refused_reads_through_the_cache(
    tmp_path, monkeypatch, refused_at
):
    """A file system that refuses ``O_DIRECT`` (EINVAL at open, as tmpfs before Linux 6.6 and
    some FUSE ones do, or at the first read): the pass reads the table plainly, and still finds
    a corrupted page. No file system here refuses it (tmpfs takes it on this kernel), so the
    refusal is the kernel's EINVAL raised in its place."""
    path, m = make(tmp_path, RandomSource(1000, 50, seed=1), block_bytes=4096)
    real_open, real_preadv, refused = os.open, os.preadv, []

    def open_refusing(file, flags, *args, **kwargs):
        if refused_at == "open" and flags & os.O_DIRECT:
            refused.append(file)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(file, flags, *args, **kwargs)

    def preadv_refusing(fd, buffers, offset, *args):
        if refused_at == "read" and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "open", open_refusing)
    monkeypatch.setattr(os, "preadv", preadv_refusing)
    assert verify_table(path, progress=False).blocks_checked == m.num_blocks
    assert refused, "the pass never asked for O_DIRECT"
    with open(path, "r+b") as f:
        f.seek(m.data_offset + 3 * 4096 + 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(TableFormatError, match="block 3"):
        verify_table(path, progress=False)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("t.npy.manifest.json", r"table manifest .*t\.npy\.manifest\.json is a FIFO"),
        ("t.npy", r"table data file .*t\.npy is a FIFO"),
        ("t.npy.pages.crc32c", r"page checksum file .*t\.npy\.pages\.crc32c is a FIFO"),
    ],
)
def test_a_fifo_in_place_of_a_table_file_is_refused_naming_it_not_waited_on(tmp_path, name, match):
    """A FIFO at the manifest's, the data file's or the page checksums' path made every open and
    verify wait for a writer forever (reading it), where the library refuses a FIFO elsewhere."""
    import threading

    path, _ = make(tmp_path, np.ones((16, 4), np.float32))
    (tmp_path / name).unlink()
    os.mkfifo(tmp_path / name)
    errors: list[BaseException] = []

    def check() -> None:
        try:
            verify_table(path, progress=False)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(
        target=check, daemon=True
    )  # a blocked open fails the test, not the run
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), f"verify waited on the FIFO at {name}"
    assert len(errors) == 1 and isinstance(errors[0], TableFormatError), errors
    assert re.search(match, str(errors[0]))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"format_version": True}, "format_version"),
        ({"block_checksums": [True]}, "block_checksums"),
        ({"row_bytes": 4.0}, "row_bytes"),
        ({"file_bytes": 4160.0}, "file_bytes"),
    ],
)
def test_a_manifest_number_written_as_a_json_boolean_or_float_is_refused(tmp_path, edit, field):
    """JSON ``true`` is a Python bool, an int equal to 1: it was read as format_version 1 and as a
    block checksum of 1; a size written as a float (4.0) was taken as the int, where a writer
    writes ints."""
    path, _ = make(tmp_path, np.zeros((16, 1), np.float32))
    mpath = table_paths(path)[1]
    doc = {**json.loads(mpath.read_text()), **edit}
    mpath.write_text(json.dumps(sealed(doc)))
    with pytest.raises(
        TableFormatError, match=rf"field '{field}' is (True|\[True\]|4\.0|4160\.0); expected"
    ):
        read_manifest(path)
