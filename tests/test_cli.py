"""The tiered-store command line, run as a user would (real console script and in-process main)."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.forkserver import run_python
from tiered_store.cli import build_parser, main
from tiered_store.cli_args import COMMANDS


def test_every_command_has_help():
    out = run_python(["-m", "tiered_store.cli", "--help"])
    assert out.returncode == 0, out.stderr
    commands = ["init", "info", "verify", "demo"]
    for command in commands:
        assert command in out.stdout
        sub = run_python(["-m", "tiered_store.cli", command, "--help"])
        assert sub.returncode == 0, sub.stderr
        assert "usage: tiered-store " + command in sub.stdout


def test_every_argument_of_every_command_says_what_it_is():
    """``info``, ``verify`` and ``shard`` listed ``table`` and ``convert-hf`` its CHECKPOINT_DIR
    and OUT_DIR under "positional arguments" with nothing beside them."""
    everything = build_parser()
    for name, parser in everything._subparsers._group_actions[0].choices.items():
        for action in parser._actions:
            assert action.help, f"{name} --help: {action.dest} has no help text"


def test_no_argument_of_any_command_takes_an_empty_path_for_the_current_folder(capsys):
    """``Path("")`` is ``Path(".")``: ``info ''`` (an unset shell variable) said ". is a
    directory", ``serve ''`` read the current folder as its config, ``--out ''`` wrote into it.
    Every argument that names a path refuses an empty one, naming the argument."""
    everything = build_parser()
    for name, parser in everything._subparsers._group_actions[0].choices.items():
        for action in parser._actions:
            if action.type in (None, str, int, float):
                continue  # no path
            try:
                taken = action.type("")
            except (argparse.ArgumentTypeError, ValueError):
                continue
            assert not isinstance(taken, Path), f"{name} {action.dest}: '' taken as {taken!r}"
    with pytest.raises(SystemExit) as exit_:
        main(["info", ""])
    assert exit_.value.code == 2
    assert "argument table: got ''; expected a path" in capsys.readouterr().err


def test_top_level_help_and_a_mistyped_command_import_no_torch():
    """A fresh interpreter (not the forkserver, which holds torch): `--help` lists every command
    and a typo is named, with none of torch, numba or the store imported."""
    code = (
        "import sys\nfrom tiered_store.cli import main\n"
        "for argv in (['--help'], ['replya', 'x']):\n"
        "    try:\n        main(argv)\n    except SystemExit as exit:\n        print('exit', exit.code)\n"
        "print('heavy', sorted(m for m in ('torch', 'numba', 'tiered_store.store') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "heavy []", out.stdout
    assert "exit 0" in out.stdout and "exit 2" in out.stdout
    assert "invalid choice: 'replya'" in out.stderr
    listed = out.stdout.split("positional arguments:")[1]
    assert all(name in listed for name in COMMANDS)


def test_the_analysis_modules_that_check_counts_import_no_torch():
    """tiered_store.integers imported torch, so every module checking a count with it (profiles,
    Zipf fits, analyze's options) loaded torch: ``analyze --help`` took 1.2 s, not 0.2 s."""
    modules = (
        "tiered_store.integers, tiered_store.profile, tiered_store.trace, zipf_analysis.analyze.cli"
    )
    code = f"import sys, {modules}\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr


def test_each_command_builds_alone_with_its_listed_help():
    everything = build_parser()
    assert list(everything._subparsers._group_actions[0].choices) == list(COMMANDS)
    for name, (_, help_line) in COMMANDS.items():
        alone = build_parser([name])._subparsers._group_actions[0]
        built = [a.dest for a in alone._choices_actions if a.help == help_line]
        assert built == [name]
        assert alone.choices[name]._actions[1:], f"{name}: no arguments built"  # past -h
        with pytest.raises(SystemExit) as exit_:
            build_parser([name]).parse_args([name, "--help"])
        assert exit_.value.code == 0


@pytest.mark.parametrize(
    "package",
    [
        "policies",
        "tiered_store",
        "tiered_store.distributed",
        "tiered_store.engram",
        "tiered_store.serve",
        "zipf_analysis.analyze",
    ],
)
def test_every_lazy_export_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert not missing, f"{package}: {missing}"


def test_init_info_verify_round_trip(tmp_path, capsys):
    src = tmp_path / "src.npy"
    np.save(src, np.arange(600, dtype=np.float32).reshape(100, 6))
    table = tmp_path / "t.npy"
    assert main(["init", str(table), "--from-npy", str(src), "--quiet"]) == 0
    assert np.array_equal(np.load(table), np.load(src))
    capsys.readouterr()
    assert main(["info", str(table)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 100 and info["dim"] == 6
    assert main(["verify", str(table), "--quiet"]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_labels_a_table_given_by_a_relative_path_as_given(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "t.npy", "--random", "10x4", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["verify", "t.npy", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("t.npy: OK: ")  # no "(t.npy)": not compacted


def test_verify_names_the_bad_block(tmp_path, capsys):
    table = tmp_path / "t.npy"
    assert main(["init", str(table), "--random", "5000x64", "--quiet"]) == 0
    with open(table, "r+b") as f:  # flip one byte deep in the data
        f.seek(4096 + 700_000)
        byte = f.read(1)
        f.seek(4096 + 700_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    capsys.readouterr()
    assert main(["verify", str(table), "--quiet"]) == 1
    assert "block 0" in capsys.readouterr().err


def test_init_random_is_seeded_and_refuses_overwrite(tmp_path, capsys):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert main(["init", str(a), "--random", "300x8", "--seed", "5", "--quiet"]) == 0
    assert main(["init", str(b), "--random", "300x8", "--seed", "5", "--quiet"]) == 0
    assert np.array_equal(np.load(a), np.load(b))
    assert main(["init", str(a), "--random", "300x8", "--quiet"]) != 0
    assert "exists" in capsys.readouterr().err
    assert main(["init", str(a), "--random", "300x8", "--seed", "6", "--overwrite", "--quiet"]) == 0
    assert not np.array_equal(np.load(a), np.load(b))


def test_a_bfloat16_table_copied_with_init_warns_of_nothing(tmp_path, capsys):
    # its finite check read the memory-mapped source through torch, which warned of a read-only
    # array in the command's output
    src, dst = tmp_path / "src.npy", tmp_path / "dst.npy"
    assert main(["init", str(src), "--random", "10x4", "--dtype", "bfloat16", "--quiet"]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        argv = ["init", str(dst), "--from-npy", str(src), "--dtype", "bfloat16", "--quiet"]
        assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err
    assert np.array_equal(np.load(src), np.load(dst))


def test_init_refuses_a_std_that_would_overflow_the_dtype(tmp_path, capsys):
    table = tmp_path / "t.npy"
    argv = ["init", str(table), "--random", "100x8", "--dtype", "float16", "--quiet"]
    assert main([*argv, "--std", "1e10"]) != 0
    err = capsys.readouterr().err
    assert "init: error: --std 1e+10 with dtype float16" in err and "expected std <= 6550.4" in err
    assert not table.exists()
    assert main([*argv, "--std", "6000"]) == 0
    assert np.isfinite(np.load(table).astype(np.float32)).all()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["init", "x.npy", "--random", "12"], "expected ROWSxDIM"),
        (
            ["init", "x.npy", "--from-safetensors", "m.safetensors"],
            "error: --from-safetensors needs",
        ),
        (["init", "x.npy", "--random", "10x4", "--tensor", "w"], "--tensor 'w': only with"),
        (["info", "/nonexistent/t.npy"], "table /nonexistent/t.npy does not exist; expected a"),
        (["info", "s.yaml"], "s.yaml is a store config, not a table; its table is t.npy"),
        (
            ["info", "prof.npz"],
            "prof.npz is not a table (a table is NAME.npy with its manifest, and",
        ),
        (["info", "."], ". is a directory; expected a table file (NAME.npy), such as t.npy"),
        # a usage error (2), not a table that failed its checks (1)
        (["verify", "."], ". is a directory; expected a table file (NAME.npy), such as t.npy"),
        (["verify", "s.yaml"], "s.yaml is a store config, not a table; its table is t.npy"),
        # nested deeper than PyYAML's recursion reaches: it was a RecursionError traceback
        (["info", "deep.yaml"], "deep.yaml is not a table (a table is NAME.npy with its"),
        # init and shard said the same, not pathlib's "PosixPath('.') has an empty name"
        (["init", ".", "--random", "10x4"], ". is a directory; expected a table file (NAME.npy)"),
        (["init", "", "--random", "10x4"], "argument table: got ''; expected a path"),
        (["shard", ".", "--ranks", "2"], ". is a directory; expected a table file (NAME.npy)"),
        (["shard", "", "--ranks", "2"], "argument table: got ''; expected a path"),
        (["convert-hf", "nope", "out"], "checkpoint nope: does not exist; expected a checkpoint"),
        (
            ["init", "x.npy", "--random", "10x4", "--std", "-1"],
            "--std: expected a finite standard deviation >= 0, got '-1'",
        ),
        (["init", "x.npy", "--random", "10x4", "--seed", "-1"], "--seed: expected an integer >= 0"),
        # they shape random rows only: a copy of an array took them and ignored them
        (["init", "x.npy", "--from-npy", "t.npy", "--std", "0.5"], "--std 0.5: only with --random"),
        (["init", "x.npy", "--from-npy", "t.npy", "--seed", "3"], "--seed 3: only with --random"),
        # as typed: a seed read as a float said "--seed 1.23457e+07"
        (["init", "x.npy", "--from-npy", "t.npy", "--seed", "12345678"], "--seed 12345678: only"),
        (
            ["init", "x.npy", "--from-npy", "f64.npy"],
            "float64; expected float32, float16 or bfloat16 (pass --dtype to convert it)",
        ),
        (
            ["init", "x.npy", "--from-npy", "u16.npy"],
            "uint16; pass --dtype bfloat16 if it holds raw",
        ),
        (["init", "no/x.npy", "--random", "10x4"], "'no/x.npy': 'no' does not exist; expected a"),
        (["analyze", "a.txt", "--holdout", "1.5"], "--holdout: got 1.5; expected a fraction"),
        (["analyze", "a.txt", "--max-tokens", "-5"], "--max-tokens: got -5; expected an integer"),
        (["shard", "t.npy", "--ranks", "0"], "--ranks: got 0; expected an integer >= 1"),
        # a value that starts with '-' and a digit is the option's value, named by its check
        (["init", "x.npy", "--random", "-100x5"], "--random: got '-100x5'; expected positive"),
        (
            ["replay", "s.yaml", "t.trace", "--gpu-budget", "-1GiB", "--host-budget", "0"],
            "--gpu-budget: got '-1GiB'",
        ),
        # the option typed, not the key of the YAML it would have written
        (["convert-hf", "ck", "out", "--hot", "200%"], "--hot: '200%' is more than 100% of"),
        (["convert-hf", "ck", "out", "--device", "gpu"], "--device: got 'gpu'; expected 'cpu',"),
        (["demo", "--warm", "101%"], "--warm: '101%' is more than 100% of the table"),
        # refused before serving, not when the trace is closed after hours of recording
        (["serve", "s.yaml", "--record-trace", "."], "'.' is a directory; expected a file"),
        (["serve", "s.yaml", "--record-trace", "s.yaml/t.trace"], "'s.yaml' is a file; expected"),
        # a missing folder is not made (a typo's), as an output folder's missing parent
        (
            ["serve", "s.yaml", "--record-trace", "typo/t.trace"],
            "'typo/t.trace': 'typo' does not exist; expected a file in an existing folder",
        ),
        # a folder's name (a trailing '/') was a file's: a file named 'traces' was written
        (
            ["serve", "s.yaml", "--record-trace", "traces/"],
            "'traces/' ends in '/', a folder's name; expected a file to write",
        ),
        # so does '/.' (Path drops it too): a file named 'traces' was written
        (
            ["serve", "s.yaml", "--record-trace", "traces/."],
            "'traces/.' ends in '/.', a folder's name; expected a file to write",
        ),
    ],
)
def test_bad_arguments_give_clear_errors(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text("table: {path: t.npy}\n")  # a store config, not a table
    (tmp_path / "prof.npz").write_bytes(b"PK")  # some other file
    (tmp_path / "deep.yaml").write_text("x: " + "[" * 1000 + "]" * 1000 + "\n")
    np.save(tmp_path / "f64.npy", np.ones((4, 4)))
    np.save(tmp_path / "u16.npy", np.ones((4, 4), np.uint16))
    assert main(["init", "t.npy", "--random", "10x4", "--quiet"]) == 0
    try:  # a check of the command's, or argparse's (which exits): both 2
        code = main(argv)
    except SystemExit as exited:
        code = exited.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "[Errno" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["convert-hf", "ckpt", "{out}"],
        ["analyze", "a.txt", "--out", "{out}"],
        ["train", "--out", "{out}", "--corpus", "none.txt"],
        ["replay", "s.yaml", "t.trace", "--out", "{out}"],
    ],
)
def test_an_output_folder_in_a_missing_folder_is_refused_naming_it(tmp_path, capsys, argv):
    """convert-hf's OUT_DIR and analyze's, train's and replay's --out made every missing folder
    on their way without a word (a typo's whole chain); as --workdir and a script's --dir, a new
    folder is made only in one that is there (and said), a missing parent refused by name."""
    out = tmp_path / "typo" / "run"
    with pytest.raises(SystemExit) as exited:
        main([a.format(out=out) for a in argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"'{out}': '{tmp_path / 'typo'}' does not exist; expected an existing folder" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["export-trace", "t.trace", "-"], "a file to write"),
        (["serve", "s.yaml", "--record-trace", "-"], "a file to write"),
        (["analyze", "a.txt", "--out", "-"], "a folder to write in"),
        (["replay", "s.yaml", "t.trace", "--out", "-"], "a folder to write in"),
    ],
)
def test_an_output_named_dash_is_refused_not_written_as_a_file_named_dash(
    tmp_path, monkeypatch, capsys, argv, expected
):
    """An output given as '-' (standard output to most tools) wrote a file or folder named '-'
    without a word; it is refused, saying how to name one '-' on purpose."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"'-' here would be a path named '-', not standard output; expected {expected}" in err
    assert "'./-' for one named '-'" in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "default"),
    [(["analyze", "a.txt"], "analyze-out"), (["replay", "s.yaml", "t.trace"], "replay-out")],
)
def test_a_default_output_folder_is_checked_as_a_given_one(
    tmp_path, monkeypatch, capsys, argv, default
):
    """analyze's and replay's --out defaults were Paths, which argparse does not pass through
    the option's type: a file of that name here went unchecked to the work, refused (or not)
    somewhere in it. The default is checked as the same value typed would be."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / default).write_text("notes\n")
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --out: '{default}' is a file; expected a folder (or nothing there)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [default]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            "tabs/",
            "'tabs/' ends in '/', a folder's name; expected a table file to write (NAME.npy)",
        ),
        ("tabs/.", "'tabs/.' ends in '/.', a folder's name; expected a table file to write"),
        ("-", "'-' here would be a path named '-', not standard output; expected a table file"),
        ("f", "'f.npy' is a FIFO (named pipe); expected a file to write (or nothing there)"),
    ],
)
def test_init_refuses_a_folder_name_dash_or_fifo_before_writing(
    tmp_path, monkeypatch, capsys, target, message
):
    """``init tabs/`` (no folder tabs) made tabs.npy, ``init -`` a table '-.npy': TABLE was a plain
    path, without the checks of every other output file. Each is refused before any work."""
    import os

    monkeypatch.chdir(tmp_path)
    os.mkfifo("f.npy")
    with pytest.raises(SystemExit) as exited:
        main(["init", target, "--random", "10x4", "--quiet"])
    assert exited.value.code == 2
    assert f"init: error: argument table: {message}" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["f.npy"]


@pytest.mark.parametrize("target", ["d", "d/", "..", "d.npy"])
def test_init_refuses_a_directory_and_writes_nothing_beside_it(
    tmp_path, monkeypatch, capsys, target
):
    """``init d`` made d.npy next to the folder (which info and verify then refused as d), and
    ``init ..`` a hidden '...npy' (a d.npy folder was called an existing table)."""
    work = tmp_path / "work"
    (work / "d").mkdir(parents=True)
    (work / "d.npy").mkdir()
    monkeypatch.chdir(work)
    assert main(["init", target, "--random", "10x4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"init: error: {target.rstrip('/')} is a directory; expected a table file" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d", "d.npy", "work"]


@pytest.mark.parametrize(
    "command", [["demo"], ["convert-hf", "ckpt", "out"], ["train", "--out", "o"]]
)
def test_tier_capacities_are_rows_bytes_or_percentages(command, capsys):
    """``--hot 1000`` is 1,000 rows, as each --help says (it was the string '1000', which the
    config refused); junk is refused by argparse with the value."""
    parser = build_parser()
    for given, parsed in (("1000", 1000), ("64MiB", "64MiB"), ("5%", "5%")):
        args = parser.parse_args([*command, "--hot", given, "--warm", given])
        assert args.hot == args.warm == parsed
    with pytest.raises(SystemExit) as exited:
        parser.parse_args([*command, "--warm", "lots"])
    assert exited.value.code == 2
    assert "argument --warm: expected a row count (int), a byte size" in capsys.readouterr().err
    for given, said in (  # argparse's bare "invalid capacity value: '²'" (int() refused it)
        ("\u00b2", "expected a row count (int), a byte size like '512MiB' or '2GiB', or a percentage like '10%', got '\u00b2'"),
        ("9" * 5000, "got '999999999999999999999999999999999999999999999999999999999999'... (5,000 characters); expected a row count of at most 9,223,372,036,854,775,807"),
        (str(2**63), f"got {2**63}; expected a row count of at most 9,223,372,036,854,775,807"),  # not 'expected a row count'
    ):  # fmt: skip
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--warm", given])
        assert f"argument --warm: {said}\n" in capsys.readouterr().err


def test_demo_runs_end_to_end_as_a_console_script(tmp_path):
    out = subprocess.run(
        [
            "tiered-store",
            "demo",
            "--rows",
            "20000",
            "--batches",
            "12",
            "--batch-size",
            "512",  # 2 sequences of 256: the forward's logits are most of its time
            "--hidden-size",
            "64",
            "--warm-start-tokens",
            "8192",
            "--hot",
            "1000",  # rows
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "results checked on 2 batches" in out.stdout
    for tier in ("hot", "warm", "cold"):
        assert f"\n{tier}" in out.stdout


def test_info_and_verify_follow_a_compacted_table_to_its_current_version(tmp_path, capsys):
    import torch

    from tiered_store.delta.compaction import compact_table
    from tiered_store.errors import ConfigError
    from tiered_store.store import TieredStore

    table = tmp_path / "t.npy"
    assert main(["init", str(table), "--random", "300x8", "--seed", "3", "--quiet"]) == 0
    with TieredStore.open({"table": {"path": str(table)}}) as store:
        store.write([7, 250], torch.full((2, 8), 2.5))
        store.commit()
    compact_table(table, progress=False)
    assert not table.exists()  # generation 0 removed: only the pointer leads to the rows
    capsys.readouterr()
    assert main(["info", str(table)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["generation"] == 1 and info["file"].endswith("t.g1.npy")
    assert info["rows"] == 300 and info["dim"] == 8
    assert main(["verify", str(table), "--quiet"]) == 0
    assert "(t.g1.npy): OK" in capsys.readouterr().out
    # the file `ls` shows is a version, not a table: compacting it as one would remove the file
    # the pointer names; each command refuses it and names the table
    current = tmp_path / "t.g1.npy"
    for command in (["compact", str(current)], ["info", str(current)]):
        assert main(command) == 2
        assert "generation 1 of table t.npy" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"expected the table's own name, .*t\.npy"):
        TieredStore.open({"table": {"path": str(current)}})
    assert current.exists() and main(["verify", str(table), "--quiet"]) == 0
    capsys.readouterr()
    with open(current, "r+b") as f:  # corrupt the current version: verify must see it
        f.seek(current.stat().st_size - 16)
        f.write(b"\xff" * 8)
    assert main(["verify", str(table), "--quiet"]) == 1
    assert "FAILED" in capsys.readouterr().err


@pytest.fixture
def trace(tmp_path):
    from tiered_store.trace import TraceWriter

    path = tmp_path / "t.trace"
    with TraceWriter(path, {"tables": [{"name": "a", "rows": 100}]}) as writer:
        writer.write(np.arange(5), "a")
        writer.end_batch()
    return path


def test_export_trace_refuses_to_replace_its_trace_or_an_existing_file(trace, tmp_path, capsys):
    before = trace.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert main(["export-trace", str(trace), str(trace), *extra]) == 2
        assert f"output {trace} is the trace itself" in capsys.readouterr().err
    assert trace.read_bytes() == before
    out = tmp_path / "ids.npy"
    out.write_bytes(b"keep")
    assert main(["export-trace", str(trace), str(out)]) == 2
    assert f"{out} already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"keep"
    assert main(["export-trace", str(trace), str(out), "--overwrite"]) == 0
    assert np.load(out).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("where", ["a directory", "in a missing folder", "under a file"])
def test_export_trace_to_a_bad_output_path_is_a_clear_error(trace, tmp_path, where, capsys):
    out = {
        "a directory": tmp_path,
        "in a missing folder": tmp_path / "nope" / "ids.npy",
        "under a file": trace / "ids.npy",
    }[where]
    try:  # refused as its argument (usage, then the error), as every output file is
        code = main(["export-trace", str(trace), str(out)])
    except SystemExit as exited:
        code = exited.code
    err = capsys.readouterr().err
    assert code == 2 and "tiered-store export-trace: error: " in err and str(out) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.trace"]  # no temporary file left


def test_export_trace_to_a_folder_name_or_a_fifo_is_refused_before_reading(trace, tmp_path, capsys):
    """export-trace's OUT was not checked as every other output file is: 'ids/' (not there)
    wrote a file named 'ids' (Path drops the '/'), and a FIFO there with --overwrite was replaced
    by a regular file (as root, /dev/null too). Both are refused before the trace is read; so is
    a FIFO given to trace_to_npy."""
    import os
    import stat

    from tiered_store.errors import TierIOError
    from tiered_store.trace import trace_to_npy

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for out, message in (
        (f"{tmp_path}/ids/", "ends in '/', a folder's name; expected a file to write"),
        (str(fifo), "is a FIFO (named pipe); expected a file to write (or nothing there)"),
    ):
        try:
            code = main(["export-trace", str(trace), out, "--overwrite", "--quiet"])
        except SystemExit as exited:
            code = exited.code
        err = capsys.readouterr().err
        assert code == 2 and f"{out!r} {message}" in err, err
    with pytest.raises(
        TierIOError, match=rf"output {fifo} is a FIFO \(named pipe\); expected a file path"
    ):
        trace_to_npy(trace, fifo)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "t.trace"]


def test_export_trace_that_cannot_be_written_is_a_clear_error_and_leaves_nothing(tmp_path, capsys):
    """A write failing part way (a file-size limit: EFBIG; a full disk or a read-only file system
    alike) escaped export-trace as a bare OSError from numpy's open_memmap: a traceback."""
    from tests.conftest import file_size_limit
    from tiered_store.trace import TraceWriter

    path = tmp_path / "t.trace"
    with TraceWriter(path, {"tables": [{"name": "a", "rows": 100_000}]}) as writer:
        writer.write(np.arange(50_000), "a")
    out = tmp_path / "ids.npy"
    with file_size_limit(200_000):
        code = main(["export-trace", str(path), str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == (
        f"tiered-store export-trace: error: cannot write {out}: writing the row ids failed: File "
        "too large; nothing was written there (expected a writable file system with room for it)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.trace"]  # no temporary file left


def test_export_trace_shows_a_progress_bar_unless_quiet(tmp_path, capsys):
    """Exporting streams the whole trace (minutes for a corpus's): it showed nothing until done,
    and had no --quiet as the other long commands have."""
    from tiered_store.trace import TraceWriter

    path = tmp_path / "t.trace"
    with TraceWriter(path, {"tables": [{"name": "a", "rows": 100_000}]}, chunk_ids=10_000) as w:
        w.write(np.arange(50_000), "a")
    out = tmp_path / "ids.npy"
    assert main(["export-trace", str(path), str(out)]) == 0
    assert "export t.trace: " in capsys.readouterr().err
    assert main(["export-trace", str(path), str(out), "--overwrite", "--quiet"]) == 0
    assert capsys.readouterr().err == "" and np.load(out).tolist() == list(range(50_000))


def test_export_trace_of_several_tables_needs_one_named(tmp_path, capsys):
    """Each table numbers its rows from 0: without --table, a trace of several wrote them all into
    one id space, where row 5 of one table and of another read as one row."""
    from tiered_store.trace import TraceWriter

    path = tmp_path / "two.trace"
    tables = [{"name": "a", "rows": 100}, {"name": "b", "rows": 100}]
    with TraceWriter(path, {"tables": tables}) as writer:
        writer.write(np.arange(5), "a")
        writer.write(np.arange(3), "b")
        writer.end_batch()
    out = tmp_path / "ids.npy"
    assert main(["export-trace", str(path), str(out)]) == 2
    assert "--table: " in capsys.readouterr().err and not out.exists()
    assert main(["export-trace", str(path), str(out), "--table", "b"]) == 0
    assert np.load(out).tolist() == [0, 1, 2]


def test_recover_trace_makes_a_killed_recording_one_that_replay_and_export_trace_read(
    tmp_path, capsys
):
    """A recording SIGKILLed before it closed left only its hidden temporary, whose chunks no
    command could use: its recorded traffic was lost with the footer."""
    from tests.test_trace import kill_a_recording, recorded_batches

    rec = tmp_path / "rec"
    rec.mkdir()
    left = kill_a_recording(rec)
    assert main(["recover-trace", str(left)]) == 0
    out, err = capsys.readouterr()
    assert f"scan {left.name}: " in err and "write t.trace: " in err  # the bars
    kept = re.search(r"recovered (\S+): ([\d,]+) chunks, ([\d,]+) row ids in ([\d,]+) batches", out)
    assert kept and kept[1] == str(rec / "t.trace"), out
    batches = int(kept[4].replace(",", ""))
    assert int(kept[3].replace(",", "")) == 30 * batches > 0
    stop = rf"stopped at chunk {kept[2]}, byte [\d,]+: (truncated|the leftover's end)"
    assert re.search(stop, out), out
    assert f"{left} is kept" in out and left.exists()
    ids = tmp_path / "ids.npy"
    assert main(["export-trace", str(rec / "t.trace"), str(ids), "--quiet"]) == 0
    assert np.array_equal(np.load(ids), recorded_batches(batches))
    assert main(["init", str(tmp_path / "a.npy"), "--random", "1000x4", "--quiet"]) == 0
    (tmp_path / "a.yaml").write_text("table: {path: a.npy}\ntiers: {hot: {capacity: 60}}\n")
    argv = ["replay", str(tmp_path / "a.yaml"), str(rec / "t.trace"), "--policies", "lru"]
    argv += ["--sweep", "", "--no-bounds", "--quiet", "--out", str(tmp_path / "replay")]
    assert main(argv) == 0, capsys.readouterr().err
    [run] = json.loads((tmp_path / "replay" / "replay.json").read_text())["results"]
    assert (run["batches"], run["lookups"]) == (batches, 30 * batches)


def test_recover_trace_refuses_to_replace_a_file_without_overwrite(tmp_path, capsys):
    from tiered_store.trace import TraceReader, TraceWriter

    with TraceWriter(tmp_path / "whole.trace", chunk_ids=5) as writer:
        for b in range(4):
            writer.write(np.arange(5) + b, "a")
            writer.end_batch()
    with TraceReader(tmp_path / "whole.trace") as reader:
        end, at = reader._data_end, reader.chunk_index[3][0]
    left = tmp_path / ".t.trace.0123456789ab.tmp"
    left.write_bytes((tmp_path / "whole.trace").read_bytes()[: end - 3])  # chunk 3 cut off
    (tmp_path / "t.trace").write_bytes(b"keep")
    assert main(["recover-trace", str(left), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"tiered-store recover-trace: error: output {tmp_path / 't.trace'} already exists; pass "
        "--overwrite to replace it\n"
    )
    assert (tmp_path / "t.trace").read_bytes() == b"keep"
    assert main(["recover-trace", str(left), "--quiet", "--overwrite"]) == 0
    payload = end - at - 48  # after its 48-byte header
    assert capsys.readouterr().out.splitlines()[1] == (
        f"stopped at chunk 3, byte {at:,}: truncated payload ({payload - 3} of {payload} bytes)"
    )
    with TraceReader(tmp_path / "t.trace") as reader:
        assert reader.read_all().tolist() == [i + b for b in range(3) for i in range(5)]


def test_recover_trace_out_in_a_missing_folder_is_refused_before_the_scan(tmp_path, capsys):
    """recover-trace --out in a missing folder read the whole leftover, then failed with "No
    such file or directory", naming no folder; refused at once, naming it, as every output
    file's missing folder is."""
    from tiered_store.trace import TraceWriter

    with TraceWriter(tmp_path / "whole.trace", chunk_ids=5) as writer:
        writer.write(np.arange(10), "a")
    left = tmp_path / ".t.trace.0123456789ab.tmp"
    left.write_bytes((tmp_path / "whole.trace").read_bytes())
    out = tmp_path / "typo" / "t.trace"
    with pytest.raises(SystemExit) as exited:
        main(["recover-trace", str(left), "--out", str(out), "--quiet"])
    assert exited.value.code == 2
    expected = f"argument --out: '{out}': '{out.parent}' does not exist; expected a file in an"
    assert expected in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [left.name, "whole.trace"]


def test_recover_trace_help_says_what_it_keeps_and_writes():
    out = run_python(["-m", "tiered_store.cli", "recover-trace", "--help"])
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert text.startswith("usage: tiered-store recover-trace [-h] [--out TRACE] [--overwrite]")
    for part in (
        "keeps every whole one whose header and payload checksums and records check",
        "stops at the first one cut off or corrupt",
        "rebuilds the footer",
        "default: NAME, beside LEFTOVER",
        "replace an existing TRACE",
        "no progress bars",
    ):
        assert part in text, part
    listing = run_python(["-m", "tiered_store.cli", "--help"])
    assert "recover-trace" in listing.stdout


def test_a_tilde_in_any_path_argument_or_config_path_is_the_home_folder(
    tmp_path, monkeypatch, capsys
):
    """``~`` was read as the home folder only by the --workdir and --dir types: ``info '~/t.npy'``
    (quoted, or from a variable: the shell left it) looked for a folder named ``~``, a bench
    script's --table and --out took one, and a store config named as ``~/s.yaml`` was not found.
    Every path argument and config path reads it as the home folder, as the configs' own paths do."""
    from tiered_store.cli_args import existing_file, output_file
    from tiered_store.config import StoreConfig

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert main(["init", "~/t.npy", "--random", "10x4", "--quiet"]) == 0
    assert main(["info", "~/t.npy"]) == 0 and main(["verify", "~/t.npy", "--quiet"]) == 0
    capsys.readouterr()
    assert existing_file("~/t.npy") == home / "t.npy"
    assert output_file("~/r.json") == home / "r.json"
    (home / "s.yaml").write_text("table: {path: t.npy}\n")
    assert StoreConfig.from_yaml("~/s.yaml").table.path == str(home / "t.npy")
    assert list(cwd.iterdir()) == []


def test_a_tilde_with_home_set_empty_is_refused_not_read_as_the_root(tmp_path, monkeypatch, capsys):
    """With HOME set but empty (``HOME= cmd``, a service's bare environment) Python reads ``~``
    as ``/``: ``init '~/t.npy'`` wrote /t.npy, and a config's ``~/t.npy`` named it. A leading
    ``~`` is refused then, naming the path and HOME; ``./~`` is still the folder here."""
    from tiered_store.cli_args import given_path
    from tiered_store.config import StoreConfig
    from tiered_store.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "")
    with pytest.raises(SystemExit) as exited:  # (read only: init would write in / as it was)
        main(["info", "~/t.npy"])
    assert exited.value.code == 2
    expected = "'~/t.npy': HOME is set but empty, so '~' would be read as '/'; expected HOME"
    assert expected in capsys.readouterr().err
    (tmp_path / "s.yaml").write_text("table: {path: ~/t.npy}\n")
    with pytest.raises(ConfigError, match=expected):
        StoreConfig.from_yaml(tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match="'~/s.yaml': HOME is set but empty"):
        StoreConfig.from_yaml("~/s.yaml")
    assert given_path("./~/t.npy") == tmp_path / "~" / "t.npy"
    # a corpus (analyze '~' read every file on the disk)
    assert main(["analyze", "~/no-corpus", "--out", "out", "--quiet"]) == 2
    assert "'~/no-corpus': HOME is set but empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "s.yaml"]


def test_a_tilde_in_a_config_with_home_set_empty_names_the_file_and_the_key(tmp_path, monkeypatch):
    """A config's ``~/rows.npy`` with HOME set but empty was refused naming the path alone, not
    the file nor the key (StoreConfig.from_yaml's errors name both, so does a serve.yaml's)."""
    from tiered_store.config import StoreConfig
    from tiered_store.errors import ConfigError
    from tiered_store.serve.config import ServeConfig

    monkeypatch.setenv("HOME", "")
    store = tmp_path / "s.yaml"
    store.write_text("table: {path: t.npy}\ntiers: {hot: {capacity: 10, static_rows: ~/r.npy}}\n")
    refused = "'~/r.npy': HOME is set but empty"
    with pytest.raises(
        ConfigError, match=f"^{re.escape(str(store))}: tiers.hot.static_rows: {refused}"
    ):
        StoreConfig.from_yaml(store)
    serve = tmp_path / "serve.yaml"
    serve.write_text("checkpoint: {path: ~/ckpt}\n")
    with pytest.raises(
        ConfigError, match=f"^{re.escape(str(serve))}: checkpoint.path: '~/ckpt': HOME is set"
    ):
        ServeConfig.from_yaml(serve)
    serve.write_text("checkpoint: {path: ckpt}\nstore: {tiers: {warm: {profile: ~/r.npy}}}\n")
    with pytest.raises(
        ConfigError, match=f"^{re.escape(str(serve))}: store.tiers.warm.profile: {refused}"
    ):
        ServeConfig.from_yaml(serve)


def test_an_engram_config_named_from_the_home_folder_says_its_conversion_did_not_finish(
    tmp_path, monkeypatch
):
    """load_engram_config('~/out/config.json') read the file in the home folder (load_yaml reads
    ``~``) but looked for an unfinished convert-hf in a folder named ``~`` here: the hint to run
    it again was left out, the error a bare 'cannot read'."""
    from tiered_store.engram.config import CONVERT_HF_LOCK, load_engram_config
    from tiered_store.errors import ConfigError

    home = tmp_path / "home"
    (home / "out").mkdir(parents=True)
    (home / "out" / CONVERT_HF_LOCK).write_text("")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="conversion that did not finish"):
        load_engram_config("~/out/config.json")


def test_a_folder_named_tilde_given_as_dot_slash_is_that_folder_not_the_home_one(
    tmp_path, monkeypatch
):
    """given_path read './~/s.yaml' (in a folder named ``~`` here) as Path('~/s.yaml'), pathlib
    dropping the './', which the config loaders (StoreConfig.from_yaml, load_yaml) then read as
    the home folder's s.yaml; such a path is the folder here (absolute), '~/s.yaml' the home's."""
    from tiered_store.cli_args import existing_file, given_path, output_folder
    from tiered_store.config import StoreConfig, load_yaml

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    (cwd / "~").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    (cwd / "~" / "s.yaml").write_text("table: {path: t.npy}\n")
    (home / "s.yaml").write_text("table: {path: home.npy}\n")
    for kind in (given_path, existing_file):
        config = StoreConfig.from_yaml(kind("./~/s.yaml"))
        assert config.table.path == str(cwd / "~" / "t.npy")
        assert load_yaml(kind(".//~/s.yaml")) == {"table": {"path": "t.npy"}}
    assert output_folder("./~") == cwd / "~" and output_folder("~") == home
    assert StoreConfig.from_yaml(given_path("~/s.yaml")).table.path == str(home / "home.npy")


def test_a_config_that_is_a_device_or_socket_is_refused_not_read(tmp_path):
    """A store, serve or demo config given as a device (/dev/zero: a read without end) hung
    its command in load_yaml's read; it is refused by name, as a socket is."""
    for argv, who in (
        (["replay", "/dev/zero", str(tmp_path / "t.trace")], "config file"),
        (["init-model", "/dev/zero"], "config file"),
        (["demo", "--config", "/dev/zero"], "--config"),
    ):
        done = run_python(["-m", "tiered_store.cli", *argv], timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        expected = f"{who} /dev/zero: it is a character device; expected a YAML file"
        assert expected in done.stderr, done.stderr[-2000:]


def test_a_config_from_a_shells_pipe_is_read_its_relative_paths_refused_by_name(tmp_path):
    """A config given as a FIFO was refused, so a shell's process substitution (`replay
    <(gen-config) ...`, a pipe) failed: it is read as any file. Its relative paths would be
    resolved under /dev/fd, which holds no files of the user's: each is refused by name."""
    import os

    trace = tmp_path / "missing.trace"
    script = 'exec "$0" -m tiered_store.cli replay <(printf "$1") "$2"'
    for text, said in (
        (f"table: {{path: {tmp_path / 't.npy'}}}\n", f"trace {trace}"),  # read: on to the trace
        (
            "table: {path: t.npy}\n",
            "table.path: 't.npy' is a relative path in a config read from a pipe",
        ),
    ):
        done = subprocess.run(
            ["bash", "-c", script, sys.executable, text, str(trace)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert said in done.stderr and "FIFO" not in done.stderr, done.stderr[-2000:]


def test_a_fifo_or_device_where_a_folder_is_expected_is_named_as_what_it_is(tmp_path, monkeypatch):
    """folder(), output_folder() and existing_dir() called a FIFO or a device 'a file' ("'x' is
    a file; expected a folder"), as they did one on the way to a folder: each is named by kind."""
    import os

    from tiered_store.cli_args import existing_dir, folder, output_file, output_folder

    monkeypatch.chdir(tmp_path)
    os.mkfifo("pipe")
    for parse in (folder, output_folder, existing_dir):
        for text, kind in (("pipe", "a FIFO (named pipe)"), ("/dev/null", "a character device")):
            with pytest.raises(argparse.ArgumentTypeError) as err:
                parse(text)
            assert str(err.value).startswith(f"{text!r} is {kind}; expected a"), str(err.value)
    with pytest.raises(argparse.ArgumentTypeError) as err:
        output_file("pipe/x.json")
    assert "'pipe/x.json': 'pipe' is a FIFO (named pipe); expected a folder on the way" in str(
        err.value
    )
    with pytest.raises(argparse.ArgumentTypeError, match="'f' is a file; expected a folder"):
        Path("f").touch()
        folder("f")


def test_an_existing_file_that_is_a_fifo_or_device_is_named_not_said_missing(tmp_path):
    """existing_file (a bench script's --table to reuse) said a FIFO or a device "does not
    exist"; it is named by kind, as a folder there is."""
    import os

    from tiered_store.cli_args import existing_file

    fifo = tmp_path / "t.npy"
    os.mkfifo(fifo)
    for text, kind in ((str(fifo), "a FIFO (named pipe)"), ("/dev/null", "a character device")):
        with pytest.raises(argparse.ArgumentTypeError) as err:
            existing_file(text)
        assert str(err.value) == f"{text!r} is {kind}; expected an existing file"


def test_a_config_read_from_a_pipe_through_dev_stdin_refuses_its_relative_paths(tmp_path):
    """A config piped in as /dev/stdin (`gen-config | replay /dev/stdin ...`) resolved its
    relative paths under /dev (its link's folder: no file of the config's), and one read
    through /proc/thread-self/fd/N under that task's descriptors, unrefused: each is a config
    read from a pipe, its relative paths refused naming the key; its absolute ones kept."""
    import os

    from tiered_store.config import StoreConfig
    from tiered_store.errors import ConfigError

    said = "table.path: 't.npy' is a relative path in a config read from a pipe"
    code = "from tiered_store.config import StoreConfig; print(StoreConfig.from_yaml('/dev/stdin'))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for text, out in (
        ("table: {path: t.npy}\n", said),
        (f"table: {{path: {tmp_path}/a.npy}}\n", f"{tmp_path}/a.npy"),
    ):
        done = subprocess.run(
            [sys.executable, "-c", code],
            input=text,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert out in done.stdout + done.stderr, done.stderr[-2000:]
    read, write = os.pipe()
    os.write(write, b"table: {path: t.npy}\n")
    os.close(write)
    try:
        with pytest.raises(ConfigError, match=said):
            StoreConfig.from_yaml(f"/proc/thread-self/fd/{read}")
    finally:
        os.close(read)


def test_a_numeric_option_of_thousands_of_digits_is_echoed_cut_short(tmp_path, capsys):
    """at_least, positive_number, fraction, the number lists and init --random echoed a value of
    5,000 digits (one int() refuses) in full, a 5 KB line; each shows it cut short, with its
    length, as shown() does."""
    from tiered_store.cli_args import at_least, fraction, int_list, positive_number

    digits = "9" * 5000
    for parse in (at_least(1), positive_number, fraction(), int_list(0)):
        with pytest.raises(argparse.ArgumentTypeError) as err:
            parse(digits)
        assert str(err.value).endswith("... (5,000 characters)"), str(err.value)[:200]
        assert len(str(err.value)) < 200, str(err.value)[:200]
    assert main(["init", str(tmp_path / "t.npy"), "--random", f"{digits}x4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "... (5,002 characters); expected ROWSxDIM" in err and len(err) < 1000, err[:300]


def test_a_capacity_of_thousands_of_leading_zeros_is_its_row_count():
    """capacity() measured a row count's digits past its leading zeros (fa39ebf) but gave int()
    them all, which refuses over 4,300 digits: '000...05' raised a bare ValueError (argparse's
    'invalid capacity value', the 5,000 digits echoed); it is 5 rows, as '05' is."""
    from tiered_store.cli_args import capacity

    assert capacity("0" * 5000 + "5") == 5 and capacity("05") == 5 and capacity("0" * 5000) == 0


def test_a_config_file_read_through_a_descriptor_is_under_that_files_folder(tmp_path):
    """A regular config read through a process's descriptors (`replay /dev/fd/3 3<c.yaml`,
    /proc/self/fd/N) had its relative paths refused as 'a config read from a pipe', which it was
    not, and one given as /dev/stdin (`< c.yaml`) resolved them under /dev: each is under the
    folder of the file open there, as the same file given by its name; a pipe's still refused."""
    import os

    from tiered_store.config import StoreConfig
    from tiered_store.serve.config import ServeConfig

    (tmp_path / "c.yaml").write_text("table: {path: t.npy}\n")
    (tmp_path / "s.yaml").write_text("checkpoint: {path: ck}\n")
    wanted = os.path.realpath(tmp_path / "t.npy")
    fd = os.open(tmp_path / "c.yaml", os.O_RDONLY)
    served = os.open(tmp_path / "s.yaml", os.O_RDONLY)
    try:
        for name in (f"/dev/fd/{fd}", f"/proc/self/fd/{fd}", f"/proc/thread-self/fd/{fd}"):
            assert StoreConfig.from_yaml(name).table.path == wanted, name
        assert (
            ServeConfig.from_yaml(f"/dev/fd/{served}").checkpoint_dir == tmp_path.resolve() / "ck"
        )
    finally:
        os.close(fd)
        os.close(served)
    code = "from tiered_store.config import StoreConfig; print(StoreConfig.from_yaml('/dev/stdin'))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(tmp_path / "c.yaml") as stdin:
        done = subprocess.run(
            [sys.executable, "-c", code],
            stdin=stdin,
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            timeout=120,
        )
    assert done.returncode == 0 and wanted in done.stdout, done.stderr[-2000:]


def test_an_integer_option_past_int64_is_refused_as_too_large(tmp_path, capsys):
    """at_least took any integer int() reads: a --seed or --rows of 2**64 reached NumPy as a
    bare error (bench_tree_cpu's 'Maximum allowed size exceeded'), and one of 5,000 digits (past
    what int() reads) was told 'expected an integer >= 1', which it is. Past 2**63-1 each is
    refused as too large, naming the bound and the value; 2**63-1 itself is taken."""
    from tiered_store.cli_args import at_least

    bound = "at most 9,223,372,036,854,775,807 (2**63-1)"
    for text in (str(2**63), str(2**64), "9" * 5000, "+" + "0" * 4999 + "1" * 20):
        with pytest.raises(argparse.ArgumentTypeError) as err:
            at_least(1, "at least 1 step")(text)
        said = str(err.value)
        assert said.startswith(f"too large: expected at least 1 step, {bound}, got "), said
        assert len(said) < 200, said[:300]
    assert at_least(0)(str(2**63 - 1)) == 2**63 - 1
    assert at_least(1)("0" * 5000 + "7") == 7 and at_least(0)("0" * 5000) == 0
    with pytest.raises(argparse.ArgumentTypeError, match="^expected an integer >= 1, got 'x'$"):
        at_least(1)("x")
    table = str(tmp_path / "t.npy")
    with pytest.raises(SystemExit) as exited:
        main(["init", table, "--random", "10x4", "--seed", str(2**64), "--quiet"])
    assert exited.value.code == 2
    assert f"--seed: too large: expected an integer >= 0, {bound}" in capsys.readouterr().err


def test_a_number_option_too_large_for_a_float_is_named_too_large(capsys):
    """positive_number and float_list read '1e400' as inf and told it 'expected a number > 0'
    (or '>= 0'), which it is; a value past the largest float is refused as too large, naming
    the value, and an ordinary bad one as before."""
    from tiered_store.cli_args import float_list, positive_number

    most = "at most 1.7976931348623157e+308 (the largest float)"
    for parse, text, said in (
        (positive_number, "1e400", f"too large: expected a number > 0, {most}, got '1e400'"),
        (positive_number, "inf", f"too large: expected a number > 0, {most}, got 'inf'"),
        (positive_number, "0", "expected a number > 0, got '0'"),
        (float_list(0), "1,-1", "expected a comma-separated list of numbers >= 0, got '1,-1'"),
        (float_list(0), "1,1e400", "too large: expected a comma-separated list of numbers >= 0, "),
    ):
        with pytest.raises(argparse.ArgumentTypeError) as err:
            parse(text)
        assert str(err.value).startswith(said), str(err.value)
    assert "got '1,1e400'" in str(err.value) and most in str(err.value), str(err.value)
    assert positive_number("1e300") == 1e300


def test_init_std_names_the_value_as_given(tmp_path, capsys):
    """init --std 1e400 was told "--std: got inf" (the float it became, not what was typed),
    and --std abc argparse's "invalid float value" without what is expected; each is refused
    naming the value as given and a finite standard deviation >= 0 expected; 0 is taken."""
    table = str(tmp_path / "t.npy")
    for std in ("1e400", "abc", "-1", "nan"):
        try:
            code = main(["init", table, "--random", "10x4", "--std", std, "--quiet"])
        except SystemExit as exited:
            code = exited.code
        err = capsys.readouterr().err
        assert code == 2 and f"expected a finite standard deviation >= 0, got {std!r}" in err, err
    assert not (tmp_path / "t.npy").exists()
    assert main(["init", table, "--random", "10x4", "--std", "0", "--quiet"]) == 0
