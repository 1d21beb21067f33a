"""``tiered-store init`` / ``info`` / ``verify`` on bad input: clear errors, no tracebacks, no
temporary files left behind, and no table started that the disk has no room for."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import assert_sealed_manifest, file_size_limit
from tiered_store.cli import main
from tiered_store.serve.client import subprocess_env

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "tiered_store.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
        **kwargs,
    )


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "t.npy"
    assert main(["init", str(path), "--random", "3000x16", "--quiet"]) == 0
    return path


@pytest.mark.parametrize("command", ["info", "verify"])
def test_a_non_utf8_manifest_is_a_clear_error(table, command, capsys):
    Path(str(table) + ".manifest.json").write_bytes(b'{"format": "\xff\xfe"}')
    assert main([command, str(table)]) in (1, 2)  # verify: 1 (FAILED), info: 2 (error)
    assert "is not UTF-8 text (byte 0xff at offset 12)" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["info", "verify"])
def test_a_directory_manifest_is_a_clear_error(table, command, capsys):
    manifest = Path(str(table) + ".manifest.json")
    manifest.unlink()
    manifest.mkdir()
    assert main([command, str(table)]) in (1, 2)
    assert f"table manifest {manifest} is a directory" in capsys.readouterr().err


def test_info_on_a_bad_manifest_prints_no_traceback():
    """The console script itself, once: the error line only."""
    out = _cli("info", str(REPO / "README.md"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("tiered-store info: error:")


def test_a_directory_table_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "d.npy").mkdir()
    (tmp_path / "d.npy.manifest.json").write_text("{}")
    assert main(["verify", str(tmp_path / "d.npy"), "--quiet"]) in (1, 2)
    err = capsys.readouterr().err
    assert "d.npy.manifest.json" in err or "is a directory" in err


def test_verify_prints_a_readable_report(table, capsys):
    assert main(["verify", str(table), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{table}: OK: 1 blocks, 192,000 bytes, 47 pages checked in ")
    assert "VerifyReport" not in out and "MB/s" in out


def test_verify_documents_its_exit_status_for_a_read_error(capsys):
    """A read error (EIO) in `verify` exits 2 with one line naming the table and offset, but
    `verify --help` and the README listed only 1 (a bad block or page) and 75 (no verdict).
    Both say what 2 means."""
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "2 when the table cannot be read (an I/O error" in text
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "2 when it cannot be read (an I/O error" in readme


def test_verify_of_a_table_being_made_anew_is_no_verdict_with_its_own_exit_status(
    table, tmp_path, capsys
):
    """`verify` of a table being made anew over its path (its manifest unlinked while the
    writer holds the folder's lock) printed "FAILED" and exited 1, as for a corrupt table: a
    script alerting on it paged someone over a sound table. It says there is no verdict, and
    to run it again once the writer is done, and exits 75 (EX_TEMPFAIL)."""
    from tiered_store.process_locks import locked_folder
    from tiered_store.table_format import table_paths

    manifest, aside = table_paths(table)[1], tmp_path / "manifest.aside"
    with locked_folder(table.parent):  # as a writer's publish, between unlink and move
        os.replace(manifest, aside)
        assert main(["verify", str(table), "--quiet"]) == 75
    err = capsys.readouterr().err
    assert err.startswith(f"tiered-store verify: NO VERDICT: table {table} was being made anew")
    assert "FAILED" not in err and "run the check again once it is done" in err
    os.replace(aside, manifest)
    assert main(["verify", str(table), "--quiet"]) == 0


def test_every_command_that_writes_a_manifest_gives_it_its_own_checksum(table, capsys):
    """Each writer of a manifest (init, add-page-checksums, compact, shard, unshard; convert-hf:
    test_convert_hf) seals it, and `info` shows the checksum."""
    import json

    import torch

    from tiered_store import TieredStore
    from tiered_store.delta.table_versions import current_version
    from tiered_store.page_checksums import sidecar_path
    from tiered_store.table_format import table_paths

    assert_sealed_manifest(table)  # init
    manifest = table_paths(table)[1]
    doc = json.loads(manifest.read_text())
    del doc["manifest_crc32c"], doc["page_checksums"]  # a table an older version made
    manifest.write_text(json.dumps(doc))
    sidecar_path(table).unlink()
    capsys.readouterr()
    assert main(["verify", str(table), "--quiet"]) == 0
    assert "its manifest has no checksum of its own" in capsys.readouterr().err
    assert main(["verify", "--add-page-checksums", str(table), "--quiet"]) == 0
    assert_sealed_manifest(table)
    assert main(["verify", str(table), "--quiet"]) == 0
    assert "no checksum" not in capsys.readouterr().err
    with TieredStore.open({"table": {"path": str(table)}}) as store:
        store.write([4], torch.ones(1, 16))
        store.commit()
    assert main(["compact", str(table), "--quiet"]) == 0
    compacted = current_version(table)[0]
    assert compacted != table and assert_sealed_manifest(compacted)
    capsys.readouterr()
    assert main(["info", str(table)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["manifest_crc32c"] == assert_sealed_manifest(compacted)
    shards = str(table.parent / "s{rank}.npy")
    assert (
        main(["shard", str(table), "--ranks", "2", "--by", "rows", "--out", shards, "--quiet"]) == 0
    )
    for rank in range(2):
        assert_sealed_manifest(table.parent / f"s{rank}.npy")
    joined = table.parent / "joined.npy"
    assert main(["unshard", str(joined), "--ranks", "2", "--shards", shards, "--quiet"]) == 0
    assert_sealed_manifest(joined)


def test_the_refusal_to_overwrite_names_the_option(table, capsys):
    assert main(["init", str(table), "--random", "10x4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to replace the table" in err and "overwrite=True" not in err


def test_init_over_a_written_or_compacted_table_replaces_its_history_too(table, capsys):
    """The old table's delta and compacted versions were served over the new rows, and the
    next compact deleted the new file."""
    import numpy as np
    import torch

    from tiered_store import TieredStore
    from tiered_store.delta.compaction import compact_table

    with TieredStore.open({"table": {"path": str(table)}}) as store:  # a written row
        store.write([4], torch.ones(1, 16))
        store.commit()
    assert (
        main(["init", str(table), "--random", "3000x16", "--seed", "7", "--quiet", "--overwrite"])
        == 0
    )
    with TieredStore.open({"table": {"path": str(table)}}) as store:
        assert torch.equal(store.lookup([4])[0], torch.from_numpy(np.load(table)[4]))
    with TieredStore.open({"table": {"path": str(table)}}) as store:
        store.write([4], torch.ones(1, 16))
        store.commit()
    compact_table(table, progress=False)  # now served from t.g1.npy; t.npy is gone
    assert not table.exists()
    capsys.readouterr()
    assert main(["init", str(table), "--random", "10x4", "--quiet"]) == 2
    assert "has committed writes or compacted versions beside it" in capsys.readouterr().err
    assert main(["init", str(table), "--random", "10x4", "--quiet", "--overwrite"]) == 0
    assert sorted(p.name for p in table.parent.iterdir() if not p.name.endswith(".lock")) == [
        "t.npy",
        "t.npy.manifest.json",
        "t.npy.pages.crc32c",
    ]
    with TieredStore.open({"table": {"path": str(table)}}) as store:
        assert (store.rows, store.dim) == (10, 4)
    compact_table(table, progress=False)
    with TieredStore.open({"table": {"path": str(table)}}) as store:
        assert (store.rows, store.dim) == (10, 4)


@pytest.mark.parametrize("part", [".npy.manifest.json", ".npy.pages.crc32c"])
def test_a_directory_in_the_way_of_a_table_file_is_named_before_writing(table, capsys, part):
    in_the_way = table.with_name(table.stem + part)
    in_the_way.unlink()
    in_the_way.mkdir()
    before = table.read_bytes()
    assert main(["init", str(table), "--random", "10x4", "--quiet", "--overwrite"]) == 2
    assert f"cannot write {in_the_way}: a directory is in the way" in capsys.readouterr().err
    assert table.read_bytes() == before and not list(table.parent.glob(".*.tmp"))


def test_a_table_larger_than_the_free_space_is_refused_before_writing(tmp_path, capsys):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert main(["init", str(tmp_path / "huge.npy"), "--random", "10000000000000x64"]) == 2
    err = capsys.readouterr().err
    assert re.search(
        r"huge.npy needs [\d,]{20,} bytes \([\d,.]+ GiB\) but .* has [\d,]+ bytes", err
    )
    stated_free = int(err.split(" has ")[1].split(" bytes")[0].replace(",", ""))
    assert abs(stated_free - free) < 1 << 30
    assert list(tmp_path.iterdir()) == []  # not even a temporary file


def test_a_table_that_cannot_be_written_is_a_clear_error_and_leaves_nothing(tmp_path, capsys):
    """A write failing part way (here a file-size limit: EFBIG; a full disk or a read-only file
    system alike) names the table and the step (it was a bare OSError: a traceback, exit 1)."""
    path = tmp_path / "big.npy"
    with file_size_limit(200_000):
        code = main(["init", str(path), "--random", "2000x100", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == (
        f"tiered-store init: error: cannot write table {path}: writing its data failed: File too "
        "large; nothing was published (expected a writable file system with room for it)\n"
    )
    assert list(tmp_path.iterdir()) == []  # not even a temporary file


@pytest.mark.parametrize(
    "signum", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM]
)
def test_an_interrupted_init_leaves_no_temporary_files(tmp_path, signum):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiered_store.cli", "init", str(tmp_path / "big.npy"),
         "--random", "4000000x64", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".tmp") and p.stat().st_size > 4096 for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "no temporary file appeared"
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


STOPPED_CREATE = """
import os, signal, sys, time
from pathlib import Path
import tiered_store.table_format as tf
calls, real = [0], tf._BlockCrc.update
def update(self, data):
    calls[0] += 1
    if calls[0] == 3 and sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-table: no cleanup runs
    if calls[0] == 3:  # a live writer, paused mid-table with its temporaries open
        Path(sys.argv[3]).touch()
        while not Path(sys.argv[4]).exists():
            time.sleep(0.01)
    real(self, data)
tf._BlockCrc.update = update
source = tf.RandomSource(100_000, 64, seed=int(sys.argv[5]))
tf.create_table(sys.argv[1], source, chunk_bytes=1 << 20, progress=False, overwrite=True)
"""


def test_a_rerun_of_a_killed_init_removes_its_temporaries_but_not_a_live_writers(tmp_path, capsys):
    """A killed creation's hidden temporaries (770 MB for a 3M x 64 table) stayed for good, not
    even removed by a rerun; a rerun now removes them, saying how many bytes, and leaves those of
    a creation still running in another process (it holds a flock on each)."""
    import numpy as np

    from tests.forkserver import run_python
    from tiered_store.table_format import read_manifest, verify_table

    script, table = tmp_path / "create.py", tmp_path / "data" / "t.npy"
    script.write_text(STOPPED_CREATE)
    table.parent.mkdir()
    paused, go = tmp_path / "paused", tmp_path / "go"
    live = subprocess.Popen(
        [sys.executable, str(script), str(table), "pause", str(paused), str(go), "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert live.poll() is None and time.monotonic() < deadline, live.stderr.read()
            time.sleep(0.02)
        others = {p.name for p in table.parent.iterdir()}
        assert len(others) == 3  # the live writer's
        killed = run_python([script, table, "kill", "-", "-", "1"], env=subprocess_env())
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        left = {p.name: p.stat().st_size for p in table.parent.iterdir() if p.name not in others}
        assert len(left) == 3 and sum(left.values()) > 2e6  # what the kill left
        capsys.readouterr()
        assert main(["init", str(table), "--random", "1000x8", "--quiet"]) == 0
        assert capsys.readouterr().err == (
            f"tiered-store init: warning: table {table}: removed 3 temporary files "
            f"({sum(left.values()):,} bytes) that a creation killed part way left\n"
        )
        assert {p.name for p in table.parent.glob(".*.tmp")} == others  # the live one's, kept
        assert read_manifest(table).shape == (1000, 8)
    finally:
        go.touch()
        _, live_err = live.communicate(timeout=120)
    assert live.returncode == 0, live_err  # it published over the rerun's table
    assert verify_table(table, progress=False).bytes_checked == 100_000 * 64 * 4
    assert np.load(table).shape == (100_000, 64) and list(table.parent.glob(".*.tmp")) == []


def test_a_shard_set_stopped_by_sigterm_leaves_no_shard_and_no_temporary_file(tmp_path):
    """SIGTERM unwinds every command as Ctrl-C does (it left rank 0's shard and temp files)."""
    assert main(["init", str(tmp_path / "a.npy"), "--random", "1000000x64", "--quiet"]) == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiered_store.cli", "shard", str(tmp_path / "a.npy"),
         "--ranks", "4", "--by", "rows", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".*a.shard-1-of-4.npy*.tmp")):  # its hidden files
        assert proc.poll() is None and time.monotonic() < deadline, "rank 1's shard never began"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("kind", ["empty file", "directory", "fifo"])
def test_a_source_npy_that_is_empty_or_a_directory_is_a_clear_error(tmp_path, kind, capsys):
    """A FIFO was said not to exist."""
    source = tmp_path / "src.npy"
    if kind == "directory":
        source.mkdir()
    elif kind == "fifo":
        os.mkfifo(source)
    else:
        source.touch()
    assert main(["init", str(tmp_path / "t.npy"), "--from-npy", str(source), "--quiet"]) == 2
    err = capsys.readouterr().err
    if kind == "directory":
        assert f"source .npy file {source} is a directory; expected a 2-D .npy file" in err
    elif kind == "fifo":
        expected = "is a FIFO (named pipe); expected a 2-D .npy file"
        assert f"source .npy file {source} {expected}" in err
    else:
        assert f"source {source} is not a readable .npy file: empty or cut off (No data" in err
    assert [p.name for p in tmp_path.iterdir()] == ["src.npy"]


def test_init_names_the_file_it_created(tmp_path, capsys):
    """``.npy`` is appended to a name without it: the report names the file made."""
    assert main(["init", str(tmp_path / "t"), "--random", "10x4", "--quiet"]) == 0
    assert capsys.readouterr().out == f"created {tmp_path / 't.npy'}: 10 x 4 float32\n"


@pytest.mark.parametrize("command", ["info", "verify", "compact"])
def test_a_missing_table_is_named_as_missing(tmp_path, command, capsys):
    assert main([command, str(tmp_path / "nope.npy")]) == 2
    err = capsys.readouterr().err
    assert f"table {tmp_path / 'nope.npy'} does not exist" in err and "incomplete" not in err
    assert list(tmp_path.iterdir()) == []  # compact: not even a writer lock file


@pytest.mark.parametrize("command", ["info", "verify", "shard"])
def test_a_current_version_gone_is_named_by_every_command(table, command, capsys):
    """A compacted table whose current version file is gone: verify and shard said "table data
    file ... does not exist", info printed the gone version's manifest; each names the pointer."""
    import torch

    from tiered_store import TieredStore

    with TieredStore.open({"table": {"path": str(table)}}) as store:
        store.write([1], torch.ones(1, 16))
        store.commit()
    assert main(["compact", str(table), "--quiet"]) == 0
    Path(str(table).replace(".npy", ".g1.npy")).unlink()
    extra = ["--ranks", "2"] if command == "shard" else []
    assert main([command, str(table), *extra]) == 2
    err = capsys.readouterr().err
    assert "its version pointer t.npy.current names generation 1, t.g1.npy, which does not exist" in err  # fmt: skip


def test_info_into_a_closed_pipe_prints_no_traceback(table):
    """``tiered-store info T | head -1``: the reader leaving early is no error to report."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiered_store.cli", "info", str(table)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
    )
    proc.stdout.close()  # before the command prints
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "tiered_store.cli", "info", "/nonexistent/t.npy"],
        ["bench/bench_online_profile.py", "/nonexistent/analysis"],
    ],
)
def test_a_command_whose_stderr_reader_left_exits_quietly_as_into_a_closed_stdout(command):
    """``... 2>&1 | head -1``: a bench script's error line into the closed pipe escaped as a
    BrokenPipeError traceback (exit 1); each command, as on a closed stdout, stops without a
    word: 141, as a process SIGPIPE kills."""
    read, write = os.pipe()
    os.close(read)  # the reader left before the command wrote
    proc = subprocess.run(
        [sys.executable, *command],
        stdout=subprocess.PIPE,
        stderr=write,
        env=subprocess_env(),
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    os.close(write)
    assert proc.returncode == 141 and proc.stdout == b""


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "tiered_store.cli", "info", "{table}"],
        ["bench/bench_mrc.py", "--lookups", "2000", "--rows", "20000", "--belady-points", "2"],
    ],
)
def test_a_command_with_stdout_closed_ends_as_it_would_with_it_open(table, command):
    """With stdout closed (``>&-``), Python's sys.stdout is None: run_script's flush of it
    raised AttributeError once the work was done, a traceback and exit 1 (a bench script's
    --out written, its status a failure); what would go there is dropped, as print does."""
    out = table.parent / "mrc.json"
    argv = [a.format(table=table) for a in command]
    if "bench_mrc.py" in command[0]:
        argv += ["--out", str(out)]
    done = subprocess.run(
        ["bash", "-c", 'exec "$@" >&-', "bash", sys.executable, *argv],
        env=subprocess_env(),
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "bench_mrc.py" not in command[0] or json.loads(out.read_text())["benchmark"] == "mrc"


def test_a_broken_pipe_of_the_commands_own_is_an_error_not_a_closed_stdout(tmp_path):
    """run_script took every BrokenPipeError for its reader leaving: one of the command's own
    pipes (a worker's, a server's connection) gone ended it with 141 without a word, its stdout
    and stderr healthy; only a stdout or stderr whose reader left ends it so."""
    script = tmp_path / "worker_gone.py"
    script.write_text(
        "import os, sys\n"
        "from tiered_store.cli_args import run_script\n"
        "def main():\n"
        "    read, write = os.pipe()\n"
        "    os.close(read)  # the worker is gone\n"
        "    print('sending', flush=True)\n"
        "    os.write(write, b'job')\n"
        "sys.exit(run_script(main))\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stdout == "sending\n", proc.stderr
    assert "BrokenPipeError" in proc.stderr and "os.write(write, b'job')" in proc.stderr


def test_shard_out_checks_rank_zeros_shard_as_every_output_table(tmp_path, monkeypatch, capsys):
    """shard --out 's{rank}/' wrote s0.npy and s1.npy (the folder's '/' dropped), and a folder
    where no lock file could be made ('/proc/s{rank}') was a FileNotFoundError traceback. Rank
    0's shard is checked as init's and unshard's TABLE, before any work."""
    monkeypatch.chdir(tmp_path)
    assert main(["init", "t.npy", "--random", "100x4", "--quiet"]) == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    for out, said in (
        ("s{rank}/", "rank 0's shard 's0/' ends in '/', a folder's name; expected a table file"),
        ("/proc/s{rank}", "rank 0's shard '/proc/s0.npy': cannot write in '/proc' ("),
        ("no/s{rank}", "rank 0's shard 'no/s0.npy': 'no' does not exist; expected a file in"),
    ):
        argv = ["shard", "t.npy", "--ranks", "2", "--by", "rows", "--out", out, "--quiet"]
        assert main(argv) == 2, out
        err = capsys.readouterr().err
        assert f"shard: error: --out {out!r}: {said}" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_shard_out_and_unshard_shards_read_a_leading_tilde_as_the_home_folder(
    tmp_path, monkeypatch, capsys
):
    """shard --out '~/s{rank}' (quoted: the shell leaves it) was checked in the home folder but
    written under a folder named '~' here (refused when none; its shards there when one was),
    and unshard --shards '~/s{rank}' read them there: a leading '~' is the home folder, as in
    every other path given. './~/s{rank}' is the folder '~' here."""
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "~").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert main(["init", "t.npy", "--random", "100x4", "--quiet"]) == 0
    for template, folder in (("~/s{rank}", home), ("./~/s{rank}", tmp_path / "~")):
        shard = ["shard", "t.npy", "--ranks", "2", "--by", "rows", "--out", template, "--quiet"]
        assert main(shard) == 0, capsys.readouterr().err
        assert sorted(p.name for p in folder.glob("*.npy")) == ["s0.npy", "s1.npy"], template
        joined = f"j{len(template)}.npy"
        unshard = ["unshard", joined, "--ranks", "2", "--shards", template, "--quiet"]
        assert main(unshard) == 0, capsys.readouterr().err
    monkeypatch.setenv("HOME", "")
    with pytest.raises(SystemExit) as exited:
        main(["shard", "t.npy", "--ranks", "2", "--out", "~/x{rank}", "--quiet"])
    assert exited.value.code == 2
    assert "--out: '~/x{rank}': HOME is set but empty" in capsys.readouterr().err


def test_shard_out_dot_slash_tilde_is_named_as_the_folder_here_not_the_home_one(
    tmp_path, monkeypatch, capsys
):
    """shard --out './~/s{rank}' wrote the shards under the folder '~' here but printed them as
    '~/s0.npy' (the home folder's, as pathlib drops the './'): path_template reads it as
    given_path does, that folder made absolute; its text kept otherwise (a last '/')."""
    from tiered_store.cli_args import path_template

    (tmp_path / "~").mkdir()
    monkeypatch.chdir(tmp_path)
    assert path_template("./~/s{rank}") == str(tmp_path / "~" / "s{rank}")
    assert path_template("s{rank}/") == "s{rank}/"
    assert main(["init", "t.npy", "--random", "100x4", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["shard", "t.npy", "--ranks", "2", "--by", "rows", "--out", "./~/s{rank}"]) == 0
    out = capsys.readouterr().out
    assert f"rank 0: {tmp_path / '~' / 's0.npy'} rows" in out, out
