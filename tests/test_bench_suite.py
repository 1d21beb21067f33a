"""The pytest-benchmark suite in bench/ still runs: tiny sizes, one round, in a subprocess.

``./dev test`` does not collect bench/ (``testpaths``); this guard runs it the way ``./dev bench``
does, at ``TIERED_STORE_BENCH_SIZE=tiny``, and checks the saved JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.forkserver import run_python

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    "lookup-all-hit",
    "lookup-cold-miss",
    "lookup-promote-cpu",
    "cold-read-1-threads",
    "cold-read-8-threads",
    "cold-read-16-threads",
    "hasher",
    "replay-lru",
    "repin-plan",
    "repin-buffer-merge",
    "victim-refill",
    "sharded-commit-phases-128B",
    "sharded-commit-phases-1KiB",
}


def test_benchmark_suite_runs_at_tiny_size(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TIERED_STORE_BENCH_SIZE="tiny", TIERED_STORE_BENCH_DIR=str(tmp_path))
    # not an xdist worker's: pytest-benchmark disables itself in a process that has them
    env = {k: v for k, v in env.items() if not k.startswith("PYTEST_XDIST_")}
    env["TIERED_STORE_BENCH_TORCH_THREADS"] = "1"
    cmd = [sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider"]
    cmd += ["--benchmark-enable", f"--benchmark-json={out}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "speed vs same-run baseline (sizes: tiny, torch threads: 1)" in done.stdout
    text = out.read_text()
    assert str(ROOT) not in text, "the benchmark JSON records the repository's absolute path"
    doc = json.loads(text)
    assert doc["tiered_store_bench"]["sizes"]["name"] == "tiny"
    assert doc["tiered_store_bench"]["torch_threads"] == 1
    benchmarks = doc["benchmarks"]
    skipped = set() if importlib.util.find_spec("libcachesim") else {"replay-lru"}
    assert {b["group"] for b in benchmarks} >= GROUPS - skipped
    for b in benchmarks:
        info = b["extra_info"]
        assert info["role"] in ("baseline", "ours"), b["name"]
        if info["role"] == "ours":
            assert info["ratio_to_baseline"] > 0, b["name"]


HELP_CHECK = """
import argparse, runpy, sys
from pathlib import Path

class Parsed(Exception):
    pass

def capture(self, args=None, namespace=None):
    raise Parsed(self)

argparse.ArgumentParser.parse_known_args = capture
for script in sorted(Path("bench").glob("bench_*.py")):
    sys.argv = [str(script)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except Parsed as parsed:
        parser = parsed.args[0]
    else:
        print(f"{script.name}: parsed no arguments")
        continue
    for action in parser._actions:
        if not action.help and not isinstance(action, argparse._HelpAction):
            print(f"{script.name}: {'/'.join(action.option_strings) or action.dest} has no help")
    if "Example" not in (parser.epilog or "") + (parser.description or ""):
        print(f"{script.name}: --help shows no example")
"""


def test_every_bench_option_says_what_it_does():
    """Each bench script's --help explains every option and shows an example command."""
    done = subprocess.run(
        [sys.executable, "-c", HELP_CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "", done.stdout


def test_every_bench_script_checks_its_out_before_the_work(tmp_path):
    """A directory as --out is refused at once, naming it (every script did all its work first,
    then failed to write); the results are written atomically, through write_json."""
    scripts = sorted((ROOT / "bench").glob("bench_*.py"))
    for script in scripts:
        source = script.read_text()
        assert re.search(r'"--out",\s*type=output_file', source), script.name
        assert ".write_text(" not in source or script.name == "bench_serve.py", script.name
        # and say where: a report or plot written without a word was left to be found
        assert "write_json(args.out" in source, script.name
        assert not re.search(r"(?<!wrote\()write_json\(args\.out", source), script.name
    done = run_python([ROOT / "bench" / "bench_mrc.py", "--out", tmp_path], timeout=60)
    assert done.returncode == 2
    assert f"argument --out: '{tmp_path}' is a directory; expected a file to write" in done.stderr


def test_an_out_where_nothing_can_be_written_is_refused_before_the_work():
    """--out in a folder where nothing can be written (here /proc, where even root makes
    nothing) passed the check: the script did its work, then ended in a traceback."""
    out = "/proc/r.json"
    args = ["--lookups", "2000", "--rows", "1000", "--fixed-size", "0", "--out", out]
    done = run_python([ROOT / "bench" / "bench_mrc.py", *args], timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    expected = f"argument --out: '{out}': cannot write in '/proc' ("
    assert expected in done.stderr and "expected a writable folder" in done.stderr
    assert done.stdout == ""  # refused before the work


def test_an_out_in_a_missing_folder_is_refused_naming_it(tmp_path):
    """--out made every missing folder on its way to the file (a typo's whole chain) while every
    output folder is made only in a folder that is there; a file's missing folder is refused by
    name, before the work, and nothing is made."""
    out = tmp_path / "typo" / "results" / "r.json"
    done = run_python([ROOT / "bench" / "bench_mrc.py", "--out", out], timeout=60)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-3000:]
    expected = f"argument --out: '{out}': '{out.parent}' does not exist; expected a file in an"
    assert expected in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_is_a_fifo_or_a_device_is_refused_not_replaced(tmp_path):
    """--out naming a FIFO, a socket or a device (``--out /dev/null`` to keep nothing) passed the
    check, and the report's rename replaced it with a regular file: run as root, /dev/null was
    a JSON file after. It is refused before the work, and left as it was."""
    import stat

    from tiered_store.cli_args import output_file

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    done = run_python([ROOT / "bench" / "bench_mrc.py", "--out", fifo], timeout=60)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-3000:]
    expected = f"argument --out: '{fifo}' is a FIFO (named pipe)"
    assert expected in done.stderr and "expected a file to write" in done.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and [p.name for p in tmp_path.iterdir()] == ["pipe"]
    with pytest.raises(
        argparse.ArgumentTypeError,
        match="'/dev/null' is a character device; expected a file to write",
    ):
        output_file("/dev/null")


def test_an_out_that_is_a_link_to_a_file_is_replaced_by_the_file_its_target_kept(tmp_path):
    """An existing file named by --out is replaced whole (renamed over); a symbolic link there
    is replaced too, its target left as it was (the docs said neither)."""
    from tiered_store.atomic_file import write_json
    from tiered_store.cli_args import output_file

    target, link = tmp_path / "run-1.json", tmp_path / "latest.json"
    target.write_text("{}")
    link.symlink_to(target.name)
    write_json(output_file(str(link)), {"run": 2})
    assert not link.is_symlink() and json.loads(link.read_text()) == {"run": 2}
    assert target.read_text() == "{}"
    write_json(output_file(str(target)), {"run": 3})
    assert json.loads(target.read_text()) == {"run": 3}


def test_an_output_folder_another_run_makes_meanwhile_is_accepted_and_left_alone(
    tmp_path, monkeypatch
):
    """The probe of a new output folder made and removed that folder itself: a run started
    beside another with the same new folder was refused ("cannot make ... (File exists)") when
    the other made it first, and could remove the folder the other was about to write in."""
    from tiered_store import cli_args

    check = cli_args._check_can_make

    def another_run_writes_first(text, first):
        first.mkdir()  # the other run, between the walk and the probe
        (first / "other.json").write_text("{}")
        check(text, first)

    monkeypatch.setattr(cli_args, "_check_can_make", another_run_writes_first)
    out = tmp_path / "results"
    assert cli_args.output_folder(str(out)) == out
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["other.json", "results"]
    # a broken link on the way was refused by the probe's mkdir of it: the probe beside it
    # would pass, and the write's mkdir(exist_ok=True) fail once the work is done
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(
        argparse.ArgumentTypeError, match="/link' is a broken symbolic link; expected a folder"
    ):
        cli_args.output_file(str(tmp_path / "link" / "r.json"))


def test_a_bench_script_names_what_the_library_refused_without_a_traceback(tmp_path):
    """A missing analysis: one line naming it and exit 2, as the tiered-store commands answer
    (every script printed a traceback)."""
    for script in sorted((ROOT / "bench").glob("bench_*.py")):
        assert "sys.exit(run_script(main))" in script.read_text(), script.name
    missing = tmp_path / "no-analysis"
    done = run_python([ROOT / "bench" / "bench_online_profile.py", missing], timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"bench_online_profile.py: error: profile {missing}/layer1")
    assert "Traceback" not in done.stderr


def test_bench_scripts_refuse_bad_settings_before_any_work(tmp_path):
    """Each refused at once, naming the option (they were taken, then failed after building
    tables or an analysis, made a table where --table named none, or ran with nothing to do)."""
    cases = {
        ("bench_engram.py", "--policy", "bogus"): "argument --policy: unknown policy 'bogus'",
        ("bench_v41.py", "--hot", "200%"): "argument --hot: '200%' is more than 100% of the table",
        ("bench_online_repin.py", "--shares", "5"): "--shares '5': expected percentages",
        ("bench_online_repin.py", "--skip-replay", "--skip-all-hit"): "nothing left to measure",
        ("bench_cold_path.py", "--seconds", "-1"): "argument --seconds: expected a number > 0",
        ("bench_writes.py", "--only", "readpath"): "--only readpath: needs --baseline-root",
        ("bench_v41_scale.py", "--table", str(tmp_path / "none.npy")): "does not exist",
    }
    for case, expected in cases.items():  # each as `python bench/SCRIPT ARGS`, forked
        done = run_python([ROOT / "bench" / case[0], *case[1:]], timeout=120)
        assert done.returncode == 2 and expected in done.stderr, (case, done.stderr[-500:])
    assert not (tmp_path / "none.npy").exists()


def test_dev_help_names_every_end_to_end_script(tmp_path):
    """``./dev help`` listed 6 of the scripts in bench/ by hand (engram, policies, serve, ...);
    it lists those that are there. Run with a venv of its own already marked as set up."""
    inputs = (ROOT / "setup.cfg").read_bytes() + (ROOT / "pyproject.toml").read_bytes()
    (tmp_path / f".installed-{hashlib.sha1(inputs).hexdigest()[:12]}").touch()
    done = subprocess.run(
        [ROOT / "dev", "help"],
        env={**os.environ, "VENV": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    listed = done.stdout.partition("python bench/bench_X.py")[2].partition("./dev tiered-store")[0]
    names = {p.stem.removeprefix("bench_") for p in (ROOT / "bench").glob("bench_*.py")}
    assert len(names) > 6 and set(listed.replace("#", " ").split()) >= names, done.stdout
    assert "./dev help          this text" in done.stdout  # the rest as it was


def test_say_kept_counts_the_folders_own_files_while_others_come_and_go(tmp_path, capsys):
    """say_kept walked its folders with rglob, then stat: a file another run removed between
    the two (its temporary files) was a FileNotFoundError at the end of the run, and a link to a
    file elsewhere counted that file's size, which deleting the folder does not free."""
    from tiered_store import cli_args

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "table.npy").write_bytes(b"x" * 3000)
    (kept / "sub").mkdir()
    (kept / "sub" / "side.pages").write_bytes(b"x" * 1000)
    (tmp_path / "elsewhere.npy").write_bytes(b"x" * 2**20)
    (kept / "linked.npy").symlink_to(tmp_path / "elsewhere.npy")
    cli_args.say_kept([kept / "table.npy", kept / "linked.npy"])
    assert f"tables kept in {kept} (3.9 KiB; reused" in capsys.readouterr().err
    churn = subprocess.Popen(  # another run's files, made and removed without end
        [sys.executable, "-c", CHURN, str(kept / "sub")], stdout=subprocess.PIPE
    )
    try:
        assert churn.stdout.readline() == b"churning\n"
        for _ in range(300):
            cli_args.say_kept([kept / "table.npy"])
    finally:
        churn.kill()
        churn.wait()
        churn.stdout.close()
    assert capsys.readouterr().err.count(f"tables kept in {kept} (") == 300


CHURN = """
import os, sys
names = [os.path.join(sys.argv[1], f"tmp{i}") for i in range(50)]
print("churning", flush=True)
while True:
    for name in names:
        open(name, "wb").close()
    for name in names:
        os.unlink(name)
"""


@pytest.mark.parametrize("script", ["bench_writes", "bench_distributed"])
def test_a_scripts_corpus_is_resolved_once_and_read_as_checked(script, tmp_path):
    """--corpus was resolved twice, once to check it and again for the run: walked twice, and a
    glob's files read as they were then, not as checked. The check's corpus is the one read."""
    module = importlib.import_module(f"bench.{script}")
    (tmp_path / "a.txt").write_text("some text\n")
    args = module.parse_args(["--corpus", str(tmp_path / "*.txt")])
    (tmp_path / "b.txt").write_text("more text\n")  # after the check
    assert [Path(f).name for f in args.texts.files] == ["a.txt"]
