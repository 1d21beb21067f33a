"""Page checksums: the CRC32C sidecar written with every table and checked on every cold read.

Issue 12: a flipped byte was served silently under pread, direct and mmap, and an ``io: mmap``
table truncated while open killed the process with SIGBUS. Every read is now verified against a
CRC32C per 4 KiB page (every io mode), and every batch first checks that the file is still the
whole table it opened.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch

import tiered_store.cold_table as ct
import tiered_store.page_checksums as pc
from tests.conftest import file_size_limit, store_config
from tiered_store import ChecksumError, UnverifiedTableWarning, crc32c_kernel
from tiered_store.cli import main
from tiered_store.cold_table import IO_MODES, ColdTable
from tiered_store.errors import TableFormatError, TierIOError
from tiered_store.io_uring import uring_unavailable_reason
from tiered_store.manifest_checksum import sealed
from tiered_store.metrics import TableHealth, build_registry
from tiered_store.page_checksums import (
    PageCrcAccumulator,
    _portable_ranges,
    crc32c_backend,
    crc32c_pages,
    sidecar_path,
)
from tiered_store.quantization import RowQuantization
from tiered_store.serve.guarded_table import GuardedTable, TableUnavailableError
from tiered_store.store import TieredStore
from tiered_store.table_format import (
    RandomSource,
    add_page_checksums,
    create_table,
    read_manifest,
    table_paths,
    verify_table,
)

ROWS, DIM = 3001, 37  # 148-byte rows straddle pages; 109 pages, the last one short (1,780 B)
PAGE = 4096


def page_crcs_of(path: Path) -> np.ndarray:
    """CRC32C of every 4 KiB page of a table's data region, by the crc32c package."""
    data = path.read_bytes()[read_manifest(path).data_offset :]
    return np.array([crc32c.crc32c(data[i : i + PAGE]) for i in range(0, len(data), PAGE)])


def flip(path: Path, offset: int) -> None:
    """Invert one byte of a file in place (no rename: open readers see it)."""
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def row_offset(path: Path, row: int, within: int = 5) -> int:
    """File offset of byte ``within`` of ``row``."""
    m = read_manifest(path)
    return m.data_offset + row * m.row_bytes + within


def strip_page_checksums(path: Path) -> None:
    """Make ``path`` a table as written before page checksums: no sidecar, no manifest entry."""
    _, manifest_path = table_paths(path)
    doc = json.loads(manifest_path.read_text())
    del doc["page_checksums"], doc["manifest_crc32c"]  # neither was written then
    manifest_path.write_text(json.dumps(doc))
    sidecar_path(path).unlink()


def make(tmp_path: Path, name: str = "t.npy", rows: int = ROWS, dim: int = DIM) -> Path:
    path = tmp_path / name
    create_table(path, RandomSource(rows, dim, seed=dim), progress=False)
    return path


@pytest.fixture(params=IO_MODES)
def io(request, tmp_path):
    """Each io mode, skipped where this machine refuses it."""
    if request.param == "uring" and (reason := uring_unavailable_reason()):
        pytest.skip(f"io_uring is unavailable: {reason}")
    if request.param in ("direct", "uring"):
        probe = make(tmp_path, "probe.npy", rows=10, dim=4)
        try:
            ColdTable(probe, io="direct", threads=1).close()
        except TierIOError:
            pytest.skip("the test file system refuses O_DIRECT")
    return request.param


# ---- computing CRC32C ---------------------------------------------------------------------------


def test_crc32c_pages_agrees_with_the_package_at_every_alignment_and_length():
    rng = np.random.default_rng(7)
    base = np.frombuffer(rng.bytes(9 * PAGE + 64), dtype=np.uint8)
    kernels = [_portable_ranges, crc32c_pages]
    if crc32c_kernel.unavailable_reason() is None:
        kernels.append(crc32c_kernel.crc32c_ranges)
    for skew in range(8):
        data = base[skew:]
        starts = np.concatenate((np.arange(8) * PAGE + skew % 3, rng.integers(0, 4 * PAGE, 200)))
        lengths = np.concatenate((np.full(8, PAGE), rng.integers(0, 4 * PAGE, 200)))
        lengths[8:20] = np.arange(12)  # 0-11 bytes: heads and tails only
        want = [
            crc32c.crc32c(data[s : s + n].tobytes()) for s, n in zip(starts, lengths, strict=True)
        ]
        for kernel in kernels:
            out = np.empty(len(starts), dtype=np.uint32)
            if kernel is crc32c_pages:
                out = kernel(data, starts, lengths)
            else:
                kernel(data, data.ctypes.data & 7, starts, lengths, out)
            assert out.tolist() == want, (kernel, skew)
    check = np.frombuffer(b"123456789", dtype=np.uint8)
    assert crc32c_pages(check, np.array([0]), np.array([9]))[0] == 0xE3069283  # the check value


def test_the_hardware_kernel_is_used_where_sse42_is_available():
    if crc32c_kernel.unavailable_reason() is not None:
        pytest.skip(crc32c_kernel.unavailable_reason())
    assert crc32c.hardware_based  # the package: SSE4.2 too
    assert crc32c_backend().startswith("SSE4.2 crc32 kernel")


def test_the_fused_page_check_and_its_portable_fallback_agree():
    rng = np.random.default_rng(3)
    data = np.frombuffer(rng.bytes(12 * PAGE), dtype=np.uint8)
    pages = np.array([0, 1, 1, 2, 5, 6, 7, 8, 9, 11], dtype=np.int64)  # a repeat; 11 is short
    tail = 100
    sums = np.array(
        [crc32c.crc32c(data[p * PAGE : p * PAGE + (tail if p == 11 else PAGE)]) for p in range(12)],
        dtype=np.uint32,
    )
    checks = [pc._portable_first_bad]
    if crc32c_kernel.unavailable_reason() is None:
        checks.append(crc32c_kernel.first_bad_page)
    packed = np.concatenate([data[p * PAGE : (p + 1) * PAGE] for p in pages])
    for check in checks:
        assert check(data, 0, False, pages, sums, PAGE, 11, tail) == -1
        assert check(packed, 0, True, pages, sums, PAGE, 11, tail) == -1
        for bad in (0, 2, 9):
            wrong = sums.copy()
            wrong[pages[bad]] ^= 4
            assert check(data, 0, False, pages, wrong, PAGE, 11, tail) == pages.tolist().index(
                pages[bad]
            )
            assert check(packed, 0, True, pages, wrong, PAGE, 11, tail) == pages.tolist().index(
                pages[bad]
            )


def test_reads_are_checked_where_only_the_crc32c_package_runs(tmp_path, monkeypatch):
    """Off x86-64 (or without SSE4.2) the package checks page by page: same errors."""
    portable = pc._Backend(pc._portable_ranges, pc._portable_first_bad, "package")
    monkeypatch.setattr(pc, "_BACKEND", portable)
    path = make(tmp_path)
    flip(path, row_offset(path, 2222))
    for io in ("pread", "mmap"):
        with ColdTable(path, io=io) as table:
            assert table.read_rows(np.array([1, 2, 3000])).shape == (3, DIM)
            with pytest.raises(ChecksumError, match="row 2222 failed its page checksum"):
                table.read_rows(np.array([1, 2222, 3000]))


_UNDER_NUMBA_DISABLE_JIT = r"""
import sys
import numpy as np
from tiered_store import create_table
from tiered_store.cold_table import ColdTable
from tiered_store.page_checksums import ChecksumError, crc32c_backend
data = np.arange(3000 * 8, dtype=np.float32).reshape(3000, 8)
create_table(sys.argv[1], data, progress=False)
with ColdTable(sys.argv[1], io="pread") as table:
    assert np.array_equal(table.read_rows(np.array([0, 2999])).numpy(), data[[0, 2999]])
with open(sys.argv[1], "r+b") as f:  # the last row's last byte, in the short last page
    f.seek(-1, 2)
    last = f.read(1)
    f.seek(-1, 2)
    f.write(bytes([last[0] ^ 1]))
with ColdTable(sys.argv[1], io="pread") as table:
    try:
        table.read_rows(np.array([2999]))
    except ChecksumError as exc:
        print(crc32c_backend(), "|", exc)
"""


def test_page_checksums_work_with_numba_jit_disabled(tmp_path):
    """NUMBA_DISABLE_JIT=1 (a debugging setting) ran the SSE4.2 kernel as Python, whose crc32
    intrinsics cannot run so: creating a table and every checked read raised NotImplementedError.
    The package computes them instead."""
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_DISABLE_JIT": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", _UNDER_NUMBA_DISABLE_JIT, str(tmp_path / "t.npy")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    backend, error = done.stdout.strip().split(" | ")
    assert backend.startswith("crc32c package per page"), backend
    assert "row 2999 failed its page checksum" in error, error


@pytest.mark.parametrize("pieces", [[1], [4095, 1, 4096, 3], [10_000, 7, 50_000], [PAGE] * 5])
def test_the_accumulator_gives_per_page_crcs_for_any_chunking(pieces):
    data = np.frombuffer(np.random.default_rng(1).bytes(sum(pieces)), dtype=np.uint8)
    acc, pos = PageCrcAccumulator(PAGE), 0
    for n in pieces:
        acc.update(data[pos : pos + n])
        pos += n
    want = [crc32c.crc32c(data[i : i + PAGE].tobytes()) for i in range(0, len(data), PAGE)]
    assert acc.finish().tolist() == want


# ---- written with every table ------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        RandomSource(ROWS, DIM, seed=3),
        RandomSource(777, 9, dtype="bfloat16", seed=4),
        RandomSource(500, 264, "uint8", seed=5, quantization=RowQuantization(256, 32)),
        np.ones((1, 1), dtype=np.float16),  # one short page of 2 bytes
    ],
    ids=["float32", "bfloat16", "fp8-packed", "tiny"],
)
def test_create_table_writes_the_sidecar_and_records_it(tmp_path, source):
    path = tmp_path / "t.npy"
    manifest = create_table(path, source, progress=False, chunk_bytes=5000)  # chunks split pages
    sums = page_crcs_of(path)
    content = sidecar_path(path).read_bytes()
    assert np.frombuffer(content, "<u4").tolist() == sums.tolist()
    entry = manifest.page_checksums
    assert entry is not None and entry.pages == len(sums) and entry.page_bytes == PAGE
    assert entry.file_crc32c == crc32c.crc32c(content)
    doc = json.loads(table_paths(path)[1].read_text())
    assert doc["page_checksums"] == {
        "algorithm": "crc32c",
        "page_bytes": PAGE,
        "pages": len(sums),
        "file_crc32c": crc32c.crc32c(content),
    }
    assert read_manifest(path) == manifest
    assert verify_table(path, progress=False).pages_checked == len(sums)


def test_cli_init_writes_the_sidecar(tmp_path, capsys):
    path = tmp_path / "c.npy"
    assert main(["init", str(path), "--random", "2000x16", "--quiet"]) == 0
    assert sidecar_path(path).stat().st_size == 4 * read_manifest(path).page_checksums.pages
    assert main(["info", str(path)]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["page_checksums"]["pages"] == 32


# ---- checked on every read ---------------------------------------------------------------------


def test_a_flipped_byte_is_a_checksum_error_naming_table_row_and_page(tmp_path, io):
    path = make(tmp_path)
    clean = np.load(path)
    row = 1234
    flip(path, row_offset(path, row))
    page = (row * DIM * 4 + 5) // PAGE
    with ColdTable(path, io=io, threads=3) as table:
        for ids in ([5, row, 2000], [row], list(range(ROWS))):
            with pytest.raises(ChecksumError) as info:
                table.read_rows(np.array(ids))
            err = info.value
            assert isinstance(err, TableFormatError)
            assert (err.table, err.page) == (path, page)
            assert err.row in range(ids[0], row + 1) and err.row * DIM * 4 // PAGE <= page
            assert str(path) in str(err) and f"row {err.row}" in str(err)
            assert f"page {page} (file bytes [{4096 + page * PAGE}, " in str(err)
        assert err.row == row or ids == list(range(ROWS))
        assert table.checksum_failures == 3
        ok = np.array([5, 2000, ROWS - 1])  # rows in other pages are still served
        assert np.array_equal(table.read_rows(ok).numpy(), clean[ok])
    with ColdTable(path, io=io, verify_pages=False) as table:  # the corruption is real
        assert not np.array_equal(table.read_rows(np.array([row])).numpy(), clean[[row]])


def test_a_flipped_byte_in_the_short_last_page(tmp_path, io):
    path = make(tmp_path)
    flip(path, path.stat().st_size - 1)
    with ColdTable(path, io=io, threads=2) as table:
        assert table.read_rows(np.array([0, 100])).shape == (2, DIM)
        with pytest.raises(ChecksumError, match=f"row {ROWS - 1} failed its page checksum"):
            table.read_rows(np.array([0, ROWS - 1]))


@pytest.mark.parametrize("slice_pages", [1, 3])
def test_pages_checked_in_slices_as_they_are_read(tmp_path, io, monkeypatch, slice_pages):
    """pread/direct check every VERIFY_SLICE_BYTES read (while the pages are in cache), then the
    rest at extraction; tiny slices, extents and buffers put a bad page in every position."""
    monkeypatch.setattr(ct, "VERIFY_SLICE_BYTES", slice_pages * PAGE)
    monkeypatch.setattr(ct, "MAX_EXTENT_PAGES", 2)
    monkeypatch.setattr(ct, "WORKER_BUFFER_BYTES", 5 * PAGE)
    monkeypatch.setattr(ct, "URING_BUFFER_BYTES", 5 * PAGE)
    path = make(tmp_path)
    clean = np.load(path)
    with ColdTable(path, io=io, threads=2) as table:
        for ids in (np.arange(ROWS), np.arange(0, ROWS, 5)):
            assert np.array_equal(table.read_rows(ids).numpy(), clean[ids])
    for row in (0, 140, 1234, ROWS - 1):
        flip(path, row_offset(path, row, within=100))
        page = (row * DIM * 4 + 100) // PAGE
        with ColdTable(path, io=io, threads=2) as table:
            with pytest.raises(ChecksumError, match=f"page {page} ") as info:
                table.read_rows(np.arange(0, ROWS, 5) if row % 5 == 0 else np.arange(ROWS))
            assert (
                info.value.row * DIM * 4 // PAGE <= page <= (info.value.row + 1) * DIM * 4 // PAGE
            )
        flip(path, row_offset(path, row, within=100))  # undo


def test_extents_that_share_the_short_last_page_verify(tmp_path, io):
    """1,998 rows x 264 B: the extent split at page 64 puts the short last page in two extents
    (a row straddles the split), so the packed buffer holds it twice; both copies are checked as
    short pages (found by the V4.1 module test: every full-table read failed)."""
    path = tmp_path / "packed.npy"
    create_table(
        path,
        RandomSource(1998, 264, "uint8", seed=2, quantization=RowQuantization(256, 32)),
        progress=False,
    )
    with ColdTable(path, io=io, threads=2) as table:
        ids = np.arange(1998)
        assert np.array_equal(table.read_rows(ids).numpy(), np.load(path))


def test_a_table_that_shrinks_or_disappears_is_a_tier_io_error_not_a_crash(tmp_path, io):
    """mmap: without the per-batch check the gather below dies of SIGBUS (the whole pytest run)."""
    path = make(tmp_path)
    with ColdTable(path, io=io, threads=2) as table:
        assert table.read_rows(np.array([1, ROWS - 1])).shape == (2, DIM)
        os.truncate(path, 4096 + 2 * PAGE)
        with pytest.raises(TierIOError, match=r"t.npy shrank to 12,288 bytes while open"):
            table.read_rows(np.array([1, ROWS - 1]))
        assert table.read_errors == 1
    path = make(tmp_path, "gone.npy")
    with ColdTable(path, io=io) as table:
        path.unlink()
        with pytest.raises(TierIOError, match=r"gone.npy was removed while open"):
            table.read_rows(np.array([3]))
    path = make(tmp_path, "swapped.npy")
    with ColdTable(path, io=io) as table:
        create_table(path, RandomSource(ROWS, DIM, seed=9), progress=False, overwrite=True)
        with pytest.raises(TierIOError, match=r"swapped.npy was replaced by another file"):
            table.read_rows(np.array([3]))


# ---- tables without page checksums --------------------------------------------------------------


def test_a_table_without_page_checksums_warns_naming_the_command_and_reads_unverified(tmp_path):
    path = make(tmp_path)
    strip_page_checksums(path)
    flip(path, row_offset(path, 10))
    with pytest.warns(UnverifiedTableWarning, match=r"no page checksums.*not verified") as rec:
        table = ColdTable(path)
    assert f"tiered-store verify --add-page-checksums {path}" in str(rec[0].message)
    with table:
        assert not table.verified
        table.read_rows(np.array([10]))  # unverified: the flipped byte goes through
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ColdTable(path, verify_pages=False).close()  # asked for: no warning


def test_verify_add_page_checksums_restores_the_same_sidecar(tmp_path, capsys):
    path = make(tmp_path)
    original, manifest = sidecar_path(path).read_bytes(), read_manifest(path)
    strip_page_checksums(path)
    assert main(["verify", str(path), "--quiet"]) == 0
    assert f"no page checksums, so reads of it are not verified: add them with `tiered-store " \
        f"verify --add-page-checksums {path}`" in capsys.readouterr().out  # fmt: skip
    assert main(["verify", str(path), "--add-page-checksums", "--quiet"]) == 0
    assert "page checksums added" in capsys.readouterr().out
    assert sidecar_path(path).read_bytes() == original and read_manifest(path) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "t.npy",
        "t.npy.manifest.json",
        "t.npy.pages.crc32c",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ColdTable(path).close()


def test_add_page_checksums_with_a_directory_in_the_way_names_it_and_changes_nothing(
    tmp_path, capsys
):
    path = make(tmp_path)
    strip_page_checksums(path)
    manifest = read_manifest(path)
    sidecar_path(path).mkdir()
    assert main(["verify", str(path), "--add-page-checksums", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {sidecar_path(path)}: a directory is in the way" in err
    assert "Traceback" not in err
    assert read_manifest(path) == manifest  # still without page checksums, as before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "t.npy",
        "t.npy.manifest.json",
        "t.npy.pages.crc32c",
    ]


def test_add_page_checksums_that_cannot_write_names_the_table_and_changes_nothing(tmp_path, capsys):
    """A write failing (a file-size limit: EFBIG, at the flush of the buffered page checksum file)
    is an error naming the table (exit 2; it was a bare OSError, exit 1, read as "checksum
    failed"), and no temporary file is left (closing the file flushed again, failed, and skipped
    removing it)."""
    path = make(tmp_path)
    strip_page_checksums(path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with file_size_limit(100):
        code = main(["verify", str(path), "--add-page-checksums", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert (
        f"cannot add page checksums to table {path}: writing its page checksum file failed: File "
        "too large; the table was left as it was" in err
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_add_page_checksums_refuses_a_corrupt_table_and_writes_nothing(tmp_path):
    path = make(tmp_path)
    strip_page_checksums(path)
    flip(path, row_offset(path, 2500))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(TableFormatError, match=r"block 0 .* fails its checksum"):
        add_page_checksums(path, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("flip", r"t.npy.pages.crc32c fails its own checksum: expected crc32c 0x"),
        ("truncate", r"t.npy.pages.crc32c has 100 bytes; expected 436 \(109 pages x 4 B\)"),
        ("remove", r"t.npy.pages.crc32c does not exist, but the table's manifest lists it"),
    ],
)
def test_a_damaged_sidecar_is_refused_at_open_naming_the_fix(tmp_path, damage, match):
    path = make(tmp_path)
    side = sidecar_path(path)
    if damage == "flip":
        flip(side, 17)
    elif damage == "truncate":
        os.truncate(side, 100)
    else:
        side.unlink()
    for io in ("pread", "mmap"):
        with pytest.raises(TableFormatError, match=match + r".*--add-page-checksums"):
            ColdTable(path, io=io)
    with pytest.raises(TableFormatError, match=match):
        verify_table(path, progress=False)
    add_page_checksums(path, progress=False)  # the fix it names
    ColdTable(path).close()


def test_verify_checks_every_page_against_the_sidecar(tmp_path, capsys):
    """A sidecar consistent with its manifest entry but not with the data: verify names the page."""
    path = make(tmp_path)
    side = sidecar_path(path)
    sums = np.frombuffer(side.read_bytes(), "<u4").copy()
    sums[40] ^= 1
    side.write_bytes(sums.tobytes())
    _, manifest_path = table_paths(path)
    doc = json.loads(manifest_path.read_text())
    doc["page_checksums"]["file_crc32c"] = crc32c.crc32c(sums.tobytes())
    manifest_path.write_text(json.dumps(sealed(doc)))
    with pytest.raises(
        ChecksumError, match=r"page 40 \(file bytes \[167936, 172032\), rows 1107 to"
    ):
        verify_table(path, progress=False)
    assert main(["verify", str(path), "--quiet"]) == 1
    assert "FAILED" in capsys.readouterr().err


# ---- the store, the metric and the serve wrapper -------------------------------------------------


def test_rows_enter_the_caches_only_after_verification_and_failures_are_counted(tmp_path):
    path = make(tmp_path)
    flip(path, row_offset(path, 700))
    config = store_config(path, hot={"capacity": 100}, warm={"capacity": 500})
    with TieredStore(config) as store:
        neighbours = torch.tensor([700, 701, 10])  # 701 shares 700's page; 10 does not
        with pytest.raises(ChecksumError, match="row 700"):
            store.lookup(neighbours)
        assert store.hot.occupancy == 0 and store.warm.occupancy == 0
        ids = torch.tensor([700])
        handle = store.prefetch(ids)
        with pytest.raises(ChecksumError):
            store.lookup(ids, handle)
        assert store.hot.occupancy == 0 and store.warm.occupancy == 0
        assert store.lookup(torch.tensor([10, 2000])).shape == (2, DIM)
        assert store.warm.occupancy == 2

        registry = build_registry({"t": store}, {"t": TableHealth()}, process=False)
        failures = registry.get_sample_value("tiered_store_checksum_failures_total", {"table": "t"})
        assert (
            failures
            == 2
            == store.cold.checksum_failures
            == store.stats()["cold"]["checksum_failures"]
        )

        health = TableHealth()
        guarded = GuardedTable(store, "t", health)
        with pytest.raises(TableUnavailableError) as info:
            guarded.lookup(torch.tensor([700]))
        assert str(info.value) == "table data unavailable (table t: rows failed their checksum)"
        assert health.lookup_failures == 1 and str(path) not in str(info.value)
