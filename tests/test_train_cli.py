"""``tiered-store train``: a run killed with SIGKILL resumes from its last commit and ends exactly
where an uninterrupted run does; a bad seed is refused with the options."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tiered_store import TieredStore
from tiered_store.cli import main
from tiered_store.corpus import CorpusError
from tiered_store.engram.training import TrainSettings, train
from tiered_store.errors import ConfigError, RowDataError
from tiered_store.serve.client import subprocess_env

TINY = {
    "engram": {
        "engram_vocab_size": [2003, 3001],
        "n_embed_per_ngram": 32,
        "n_head_per_ngram": 2,
        "layer_ids": [1],
    },
    "backbone": {"hidden_size": 16, "hc_mult": 2, "num_layers": 2},
    "transformer": {"num_attention_heads": 2},
}
ROOT = Path(__file__).resolve().parents[1]


def _settings(corpus: Path) -> TrainSettings:
    return TrainSettings(
        steps=10,
        batch_size=2,
        seq_len=16,
        checkpoint_every=2,
        hot="2%",
        warm="5%",
        corpus=[str(corpus)],
        model=TINY,
    )


def _cli_args(tmp_path: Path) -> tuple[list[str], list[str], Path]:
    """The train command's options for a run in ``tmp_path/run`` of the tiny model over a few
    files of text, the options of small steps, and the run's folder."""
    model_file = tmp_path / "model.json"
    model_file.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    corpus = str(ROOT / "tiered_store" / "engram")
    common = ["train", "--out", str(out), "--quiet", "--corpus", corpus, "--model", str(model_file)]
    return common, ["--batch-size", "2", "--seq-len", "16", "--checkpoint-every", "1"], out


def _committed(out: Path) -> int:
    try:
        with TieredStore.open({"table": {"path": str(out / "tables.npy")}}) as store:
            return store.committed_step
    except Exception:
        return 0


@pytest.mark.slow  # ~35 s: a training process started, killed, resumed, and a whole run
def test_train_resumes_after_kill_9_and_ends_as_an_uninterrupted_run(tmp_path):
    corpus = ROOT / "tiered_store" / "engram"  # a few files of real text
    settings = _settings(corpus)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    model_file = tmp_path / "model.json"
    model_file.write_text(json.dumps(TINY))
    cmd = [
        sys.executable,
        "-m",
        "tiered_store.cli",
        "train",
        "--out",
        str(killed),
        "--quiet",
        "--corpus",
        str(corpus),
        "--steps",
        "10",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--checkpoint-every",
        "2",
        "--hot",
        "2%",
        "--warm",
        "5%",
        "--model",
        str(model_file),
    ]
    env = subprocess_env()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _committed(killed) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    stopped_at = _committed(killed)
    assert 4 <= stopped_at < 10
    summary = train(killed, settings, resume=True, progress=False)
    assert summary["resumed_from_step"] == stopped_at
    train(whole, settings, resume=False, progress=False)
    with (
        TieredStore.open({"table": {"path": str(killed / "tables.npy")}}) as a,
        TieredStore.open({"table": {"path": str(whole / "tables.npy")}}) as b,
    ):
        assert a.committed_step == b.committed_step == 10
        assert torch.equal(a.lookup(torch.arange(a.rows)), b.lookup(torch.arange(b.rows)))
    dense_a = torch.load(killed / "dense-10.pt", weights_only=True)["model"]
    dense_b = torch.load(whole / "dense-10.pt", weights_only=True)["model"]
    assert dense_a.keys() == dense_b.keys()
    assert all(torch.equal(dense_a[k], dense_b[k]) for k in dense_a)
    assert (killed / "loss.png").stat().st_size > 1000
    assert len((killed / "loss.csv").read_text().splitlines()) == 11


def test_an_interrupted_run_says_where_it_stands_as_the_command_line_reads_it(tmp_path):
    """SIGTERM (as Ctrl-C) after a checkpoint: exit 130, and what --resume starts from, not the
    library's advice to call commit() before close()."""
    common, small, out = _cli_args(tmp_path)
    cmd = [sys.executable, "-m", "tiered_store.cli", *common, *small, "--steps", "100000"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _committed(out) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err[-2000:]
    kept = int(re.search(r"holds step (\d+), its last checkpoint: run the same command", err)[1])
    assert kept == _committed(out) >= 2
    assert "commit()" not in err and "Traceback" not in err


def test_a_negative_seed_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        main(["train", "--out", str(out), "--seed", "-1", "--quiet"])
    assert exited.value.code == 2  # argparse's, with the usage (was numpy's traceback)
    assert "argument --seed: expected an integer >= 0, got '-1'" in capsys.readouterr().err
    assert not out.exists()  # refused before making the run directory


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--hot", "lots", "argument --hot: expected a row count (int), a byte size"),
        ("--warm", "150%", "--warm: '150%' is more than 100% of the table"),
        # 2 orders x 2 heads of 2003 / 3001 rows (primes >=), rows of 16 + 1 (Adagrad) floats
        ("--hot", "1GiB", "--hot: '1GiB' is 15,790,320 rows, more than the table's 10,026 rows"),
        ("--io", "bogus", "argument --io: invalid choice: 'bogus'"),
        ("--steps", "0", "argument --steps: expected at least 1 step, got '0'"),
        ("--corpus", "/nonexistent", "--corpus: corpus path '/nonexistent': no such file or"),
        (
            "--seq-len",
            "100000",
            "tokens do not fill one batch of --batch-size 2 x --seq-len 100000",
        ),  # fmt: skip
        # a next-token loss needs two tokens: refused at the first step, the run made and stuck
        ("--seq-len", "1", "--seq-len: expected an integer >= 2 (a next-token loss), got 1"),
        ("--dense-lr", "-1", "argument --dense-lr: expected a number > 0, got '-1'"),
        ("--table-lr", "nan", "argument --table-lr: expected a number > 0, got 'nan'"),
    ],
)
def test_bad_settings_leave_no_run_behind_and_the_corrected_command_runs(
    tmp_path, capsys, option, value, expected
):
    """A bad setting once left a run directory holding a table (and the bad setting, which a
    --resume read back), so the corrected command was refused: "already holds a training run"."""
    model_file = tmp_path / "model.json"
    model_file.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    corpus = str(ROOT / "tiered_store" / "engram")
    small = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--checkpoint-every", "1"]
    common = ["train", "--out", str(out), "--quiet", "--corpus", corpus, "--model", str(model_file)]
    try:  # argparse's refusals exit, the run's return: both 2
        code = main([*common, *small, option, value])
    except SystemExit as exited:
        code = exited.code
    assert code == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()
    assert main([*common, *small, "--hot", "100"]) == 0  # a row count, as --help says
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["resumed_from_step"] == 0
    assert json.loads((out / "train.json").read_text())["hot"] == 100


def test_learning_rates_given_in_python_are_checked_before_any_work(tmp_path):
    from tiered_store.errors import ConfigError

    for name, value in (("dense_lr", -1.0), ("table_lr", float("inf"))):
        settings = replace(_settings(ROOT / "tiered_store" / "engram"), **{name: value})
        with pytest.raises(ConfigError, match=rf"^{name}: got {value}; expected a positive"):
            train(tmp_path / "run", settings, resume=False, progress=False)
        assert not (tmp_path / "run").exists()


def test_a_model_of_fp8_tables_is_refused_before_any_work(tmp_path, capsys):
    common, small, out = _cli_args(tmp_path)
    v41 = {**TINY, "engram": {**TINY["engram"], "geometry": "deepseek-v4.1"}}
    v41["engram"].update(engram_vocab_size=211, n_head_per_ngram=8, n_embed_per_ngram=256)
    (tmp_path / "model.json").write_text(json.dumps(v41))
    assert main([*common, *small, "--steps", "1"]) == 2  # was an AttributeError traceback
    assert "engram.geometry 'deepseek-v4.1' has packed fp8 tables" in capsys.readouterr().err
    assert not out.exists()


def test_a_model_too_large_for_the_memory_is_refused_before_any_work(tmp_path, capsys):
    common, small, out = _cli_args(tmp_path)
    huge = {**TINY, "engram": {**TINY["engram"], "engram_vocab_size": [2003, 50_000_000_000]}}
    (tmp_path / "model.json").write_text(json.dumps(huge))
    assert main([*common, *small, "--steps", "1"]) == 2  # was the allocator's traceback
    err = capsys.readouterr().err
    assert "engram.engram_vocab_size [2003, 50000000000]: the model needs " in err
    assert "of host RAM (Engram tables " in err and "Traceback" not in err
    assert not out.exists()


def test_resume_says_which_options_it_ignores(tmp_path, capsys):
    """A resumed run keeps its saved settings: options asked for that differ are named, not
    silently dropped; --resume with nothing to resume says it starts afresh."""
    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "1", "--resume"]) == 0
    err = capsys.readouterr().err  # warnings on the command line: one line each
    assert re.search(r"tiered-store train: warning: --resume: no run in .* to resume; starting a new one", err)  # fmt: skip
    assert main([*common, "--steps", "2", "--resume", "--batch-size", "4", "--optimizer", "adam"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert re.search(r"tiered-store train: warning: .*ignored: --batch-size 4 \(it uses 2\), --optimizer adam", err)  # fmt: skip
    saved = json.loads((out / "train.json").read_text())
    assert (saved["batch_size"], saved["optimizer"], saved["steps"]) == (2, "rowwise_adagrad", 2)
    assert main([*common, "--resume", "--batch-size", "8"]) == 0  # given, though the default
    assert re.search(
        r"warning: .*ignored: --batch-size 8 \(it uses 2\)$", capsys.readouterr().err, re.M
    )
    assert main([*common, "--steps", "1", "--resume"]) == 0  # fewer steps than the run's
    err = capsys.readouterr().err
    assert re.search(r"warning: .*ignored: --steps 1 \(it runs 2; steps only grow\)", err)


def test_resume_keeps_the_runs_step_count_and_a_compacted_run_is_still_a_run(tmp_path, capsys):
    """A plain --resume ends at the run's own step count (it took the option's default, 200);
    after `compact`, only TABLE.g1.npy is left: a new run there is still refused, and a resume
    continues it without writing a fresh table beside it."""
    from tiered_store.delta.compaction import compact_table

    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "2"]) == 0
    assert f"--out: created '{out}'" in capsys.readouterr().err  # a new folder is said
    assert main([*common, "--resume"]) == 0
    assert "created" not in capsys.readouterr().err
    assert json.loads((out / "train.json").read_text())["steps"] == 2
    compact_table(out / "tables.npy", progress=False)
    assert not (out / "tables.npy").exists()
    assert main([*common, *small, "--steps", "3"]) == 2
    assert "already holds a training run; pass --resume" in capsys.readouterr().err
    assert main([*common, "--resume", "--steps", "3"]) == 0
    assert not (out / "tables.npy").exists() and _committed(out) == 3


def test_a_table_whose_creation_was_killed_is_made_again(tmp_path):
    """A kill between publishing tables.npy and its manifest leaves no run: the next run starts
    (before, it was refused as a run, and --resume failed on the missing manifest)."""
    common, small, out = _cli_args(tmp_path)
    out.mkdir()
    (out / "tables.npy").write_bytes(b"\x93NUMPY half a table")  # no manifest beside it
    assert main([*common, *small, "--steps", "1"]) == 0
    assert _committed(out) == 1


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_an_out_that_cannot_be_a_directory_is_named(tmp_path, capsys, where):
    common, small, out = _cli_args(tmp_path)
    (tmp_path / "taken").write_text("not a directory")
    bad = tmp_path / "taken" if where == "a file" else tmp_path / "taken" / "run"
    common[common.index(str(out))] = str(bad)
    with pytest.raises(SystemExit) as exited:  # refused with the options, before any work
        main([*common, *small, "--steps", "1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --out: '{bad}'" in err and "is a file; expected a folder" in err, err


def test_a_run_is_never_made_anew_when_its_table_cannot_be_read(tmp_path, capsys, monkeypatch):
    """A run's table that fails its check is refused with the reason, its committed steps kept
    (before, the run counted as absent and the next train overwrote it from step 0); and a
    compaction switching versions while the check reads them is not "no run" either."""
    from tiered_store.delta import table_versions
    from tiered_store.delta.compaction import compact_table

    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "2"]) == 0
    before = table_versions.current_version(out / "tables.npy")[0]
    compact_table(out / "tables.npy", progress=False)
    assert not before.exists()
    read = table_versions.current_version
    stale = iter([(before, 0)])  # the pointer as read just before the compaction switched it
    monkeypatch.setattr(table_versions, "current_version", lambda t: next(stale, None) or read(t))
    assert main([*common, "--resume", "--steps", "3"]) == 0
    assert _committed(out) == 3
    monkeypatch.undo()

    manifest = out / "tables.g1.npy.manifest.json"
    saved = manifest.read_bytes()
    manifest.write_text("{ damaged")
    for args in ([*common, "--resume", "--steps", "4"], [*common, *small, "--steps", "4"]):
        assert main(args) == 2
        assert "holds a training run whose table fails its check" in capsys.readouterr().err
    manifest.write_bytes(saved)
    assert _committed(out) == 3  # nothing was made anew over it


def test_a_killed_checkpoints_temporaries_go_when_the_run_resumes(tmp_path):
    """A kill while dense-S.pt, loss.csv or train.json was being written leaves its hidden
    temporary; the resumed run removes them (they stayed for good: a dense model and its Adam
    state each; train.json's, left by a kill as a resume saved its settings, too)."""
    from tiered_store.atomic_file import AtomicFile

    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "1"]) == 0
    killed = [AtomicFile(out / "dense-2.pt"), AtomicFile(out / "loss.csv", "w")]
    killed.append(AtomicFile(out / "train.json", "w"))
    for f in killed:  # written, never published: what a killed writer leaves
        f.file.write(b"partial" if "b" in f.file.mode else "partial")
        f.file.close()
    other = out / ".notes.0123456789ab.tmp"  # not the run's
    other.write_text("mine")
    assert all(f.tmp.exists() for f in killed)
    assert main([*common, "--resume", "--steps", "2"]) == 0
    assert not any(f.tmp.exists() for f in killed) and other.exists()
    assert _committed(out) == 2


def test_resume_from_another_directory_reads_the_same_corpus(tmp_path, monkeypatch):
    """A corpus given relative to the directory the run started in is saved absolute: a resume
    from elsewhere (a scheduler's restart) reads the same text (it was refused, or read another
    folder of that name)."""
    common, small, out = _cli_args(tmp_path)
    at = common.index("--corpus") + 1
    monkeypatch.chdir(ROOT)
    common[at] = "tiered_store/engram"
    assert main([*common, *small, "--steps", "1"]) == 0
    saved = json.loads((out / "train.json").read_text())["corpus"]
    assert saved == [str(ROOT / "tiered_store" / "engram")]
    with warnings.catch_warnings():  # the same command, resumed here: nothing is ignored
        warnings.simplefilter("error")
        assert main([*common, "--resume", "--steps", "1"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", str(out), "--quiet", "--resume", "--steps", "2"]) == 0
    assert _committed(out) == 2


def test_a_corpus_given_in_python_as_one_path_is_that_path(tmp_path):
    """train() given TrainSettings(corpus="texts") took each character of the name for a path:
    "/" first, and failed on whatever the machine's root held (PermissionError on /proc/1/cwd)."""
    texts = ROOT / "tiered_store" / "engram"
    for one in (str(texts), texts):
        out = tmp_path / f"run-{type(one).__name__}"
        settings = replace(_settings(texts), steps=1, checkpoint_every=1, corpus=one)
        train(out, settings, resume=False, progress=False)
        assert json.loads((out / "train.json").read_text())["corpus"] == [str(texts)]
        assert _committed(out) == 1


@pytest.mark.parametrize(
    "saved, why",
    [
        ("{ damaged", "Expecting property name"),
        ('{"steps": 1, "renamed_option": 3}', "unknown field 'renamed_option'"),
        ('{"steps": "5"}', "steps: got '5', expected an integer"),
        ('{"corpus": [3]}', "corpus: got \\[3\\], expected a list of paths"),
        ("[1]", "a JSON list, not an object"),
        ('{"precision": "fp64"}', "precision: got 'fp64', expected one of fp32, bf16, fp16"),
        ('{"optimizer": "lion"}', "optimizer: got 'lion', expected one of sgd, rowwise_adagrad"),
        ('{"io": "mmapx"}', "io: got 'mmapx', expected one of mmap, pread"),
        # saved by a version before --seq-len 1 was refused (its run stuck at its first step)
        ('{"seq_len": 1}', "seq_len: expected an integer >= 2 \\(a next-token loss\\), got 1"),
        ('{"batch_size": 0}', "batch_size: expected an integer >= 1, got 0"),
        ('{"seed": -1}', "seed: expected an integer in \\[0, 2\\*\\*64\\), got -1"),
        ('{"table_lr": -1.0}', "table_lr: got -1.0; expected a positive finite learning rate"),
    ],
)
def test_a_damaged_settings_file_is_named_and_the_run_kept(tmp_path, capsys, saved, why):
    """A train.json that is damaged or not one `train` saved: a clear error naming the file (it
    was a raw traceback; a value none of the choices, or out of its range, blamed the option,
    not given, or given with another value that the resume ignores); the run's table is left as
    it was."""
    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "1"]) == 0
    (out / "train.json").write_text(saved)
    assert main([*common, "--resume", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"--resume: .*train\.json: .*{why}.*expected the settings `train` saved", err)
    assert _committed(out) == 1


def test_a_resume_asked_for_a_step_count_that_is_no_count_names_it_not_the_settings_file(
    tmp_path,
):
    """train(resume=True) given steps that are no count: '5' raised a bare TypeError ('<' not
    supported between 'str' and 'int'), and 2.5, larger than the run's count, was blamed on
    train.json, which holds 1; both are named as the parameter, as a new run names them."""
    corpus = ROOT / "tiered_store" / "engram"
    settings = replace(_settings(corpus), steps=1, checkpoint_every=1)
    out = tmp_path / "run"
    train(out, settings, resume=False, progress=False)
    for steps in ("5", 2.5):
        with pytest.raises(ConfigError, match=rf"^steps: expected an integer >= 1, got {steps!r}$"):
            train(out, replace(settings, steps=steps), resume=True, progress=False)
    assert _committed(out) == 1


@pytest.mark.parametrize("steps", [0, -3])
def test_a_saved_step_count_out_of_range_is_named_on_a_resume_not_given_steps(
    tmp_path, capsys, steps
):
    """A train.json whose step count is below 1 (an edit): a --resume given no --steps took it
    for one not asked and trained the default 200 steps; it is named in its file."""
    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "1"]) == 0
    doc = json.loads((out / "train.json").read_text())
    (out / "train.json").write_text(json.dumps({**doc, "steps": steps}))
    assert main([*common, "--resume"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: --resume: .*train\.json: steps: expected an integer >= 1, got {steps}; expected the settings `train` saved there", err), err  # fmt: skip
    assert _committed(out) == 1


@pytest.mark.parametrize(
    ("saved", "why"),
    [
        ({"hot": -1}, "hot: got -1; expected a non-negative row count"),
        ({"warm": "150%"}, "warm: '150%' is more than 100% of the table; expected 0%..100%"),
        (
            {"model": {"backbone": {"hidden_size": -1}}},
            "model: backbone.hidden_size: expected an integer >= 1, got -1",
        ),
    ],
)
def test_a_saved_setting_checked_against_the_model_is_named_in_its_file(
    tmp_path, capsys, saved, why
):
    """A train.json whose tier capacity or model does not hold (an edit, or an older version's):
    --resume blamed the option ('--hot: got -1'), which the resume ignores (it warns so when it
    is given), or named the model's key alone, not the file it is in."""
    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "1"]) == 0
    doc = json.loads((out / "train.json").read_text())
    (out / "train.json").write_text(json.dumps({**doc, **saved}))
    assert main([*common, "--resume", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: --resume: .*train\.json: {re.escape(why)}; expected the settings `train` saved there \(restore them, or choose another --out\)", err), err  # fmt: skip
    assert _committed(out) == 1


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("missing", "No such file or directory"),
        ("garbage", "not a checkpoint torch.save wrote, or a damaged one"),
        ("empty", "not a checkpoint torch.save wrote, or a damaged one"),
        ("not train's", "not train's dense checkpoint"),
        ("weights not tensors", "not train's dense checkpoint"),
        ("weights not a dict", "not train's dense checkpoint"),
        # named as the model's keys, not with load_state_dict's hint ("strict=False loads the
        # keys it has": the silent resume refused here, and an option train does not have)
        (
            "a weight missing",
            "its weights do not fit the model \\(embed.weight: missing; 1 key missing, 0 unknown\\); expected",
        ),  # fmt: skip
        (
            "an unknown weight",
            "its weights do not fit the model \\(extra.weight: not the model's; 0 keys missing, 1 unknown\\); expected",
        ),  # fmt: skip
    ],
)
def test_a_missing_or_damaged_dense_checkpoint_is_named_on_resume(tmp_path, capsys, damage, why):
    """The committed step's dense-S.pt gone or damaged: --resume names the file and the step (it
    was a raw FileNotFoundError or UnpicklingError traceback; one missing a weight went on
    silently from the weight's initial value); the run's table is left as it was."""
    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "2"]) == 0
    dense = out / "dense-2.pt"
    if damage == "missing":
        dense.unlink()
    elif damage == "not train's":
        torch.save({"weights": torch.zeros(2)}, dense)
    elif damage in ("a weight missing", "an unknown weight"):  # missing: the run went on
        state = torch.load(dense, weights_only=True)  # from its init
        if damage == "a weight missing":
            del state["model"]["embed.weight"]
        else:
            state["model"]["extra.weight"] = torch.zeros(1)
        torch.save(state, dense)
    elif damage.startswith("weights not"):  # an AttributeError, a RuntimeError traceback before
        weights = [1] if damage.endswith("a dict") else {"embed.weight": 1}
        torch.save({"model": weights, "optimizer": {}}, dense)
    else:
        dense.write_bytes(b"" if damage == "empty" else b"not a checkpoint")
    assert main([*common, "--resume", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert re.search(
        rf"--resume: .*dense-2\.pt: {why}.*written with the table's commit of step 2", err
    ), err
    assert "Traceback" not in err and _committed(out) == 2


def test_resume_without_the_settings_file_is_refused(tmp_path, capsys):
    """train.json gone beside a run's table: --resume is refused (it said "starting a new one"
    and went on with the run under other settings, overwriting train.json)."""
    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "1"]) == 0
    (out / "train.json").unlink()
    assert main([*common, *small, "--resume", "--steps", "2", "--table-lr", "0.5"]) == 2
    assert "holds a training run without its settings (train.json is missing)" in (
        capsys.readouterr().err
    )
    assert _committed(out) == 1 and not (out / "train.json").exists()


def test_a_run_made_while_another_trainer_set_up_is_not_taken_over(tmp_path, monkeypatch):
    """Trainer B decides "new run" while --out is empty; trainer A makes (and ends) a run there
    before B takes the run's lock. B is refused then, and A's train.json stays A's: B used to
    overwrite it with its own settings and train on A's run as if it had been told --resume."""
    import tiered_store.engram.training as training

    out, base = tmp_path / "run", replace(_settings(ROOT / "tiered_store" / "engram"), steps=2)
    read_tokens, a_ran = training.read_tokens, []

    def a_runs_meanwhile(*args, **kwargs):  # B is past its checks, reading its corpus
        if not a_ran:
            a_ran.append("A")  # before: A reads its corpus here too
            train(out, replace(base, table_lr=0.05), resume=False, progress=False)
        return read_tokens(*args, **kwargs)

    monkeypatch.setattr(training, "read_tokens", a_runs_meanwhile)
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(out, replace(base, table_lr=0.5), resume=False, progress=False)
    assert a_ran and json.loads((out / "train.json").read_text())["table_lr"] == 0.05
    a_ran.clear()
    out = tmp_path / "other"  # a --resume that finds no run, while A makes one there: refused
    with pytest.warns(UserWarning, match="no run in"), pytest.raises(ConfigError, match="changed"):
        train(out, replace(base, table_lr=0.5), resume=True, progress=False)
    assert a_ran and json.loads((out / "train.json").read_text())["table_lr"] == 0.05


def test_a_run_being_trained_is_refused_before_anything_in_it_changes(tmp_path, capsys):
    """A second trainer of a run that is training (its table's writer lock held, as the running
    trainer holds it) is refused up front, naming the run: a --resume rewrote train.json, deleted
    the running trainer's checkpoint temporary and read its dense-S.pt, and was refused only at
    its first write; a new run into a folder whose trainer has not made its table yet too."""
    from tiered_store.delta.table_versions import release, take_writer_lock

    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "1"]) == 0
    capsys.readouterr()
    running = take_writer_lock(out / "tables.npy")  # the trainer running the run
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    starting = take_writer_lock(fresh / "tables.npy")  # a trainer yet to make its table
    try:
        (out / ".dense-2.pt.0123456789ab.tmp").write_bytes(b"its checkpoint being written")
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert main([*common, "--resume", "--steps", "3"]) == 2
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
        err = capsys.readouterr().err
        # held here (a store of this process writing the table): not "by another process"
        assert f"out: {out} is being trained (or compacted) by another trainer or store: tables.npy.writer.lock is held by this process (pid {os.getpid()})" in err  # fmt: skip
        common[common.index(str(out))] = str(fresh)
        assert main([*common, *small, "--steps", "1"]) == 2
        assert f"out: {fresh} is being trained" in capsys.readouterr().err
        assert [p.name for p in fresh.iterdir()] == ["tables.npy.writer.lock"]
    finally:
        release(running)
        release(starting)
    common[common.index(str(fresh))] = str(out)
    assert main([*common, "--resume", "--steps", "2"]) == 0  # the run, once its trainer ended
    assert _committed(out) == 2


def _run_files(out: Path) -> dict[str, bytes]:
    """Every file of the run, by its path in ``out`` (the delta's too)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_a_run_whose_table_lost_its_commits_is_refused_not_restarted(tmp_path, capsys):
    """A run copied without -r (cp RUN/* COPY: its table's delta folder left behind): --resume
    found a table at step 0, started over without a word, deleted dense-4.pt and rewrote
    loss.csv, the 4 committed steps gone. It is refused now, every file as it was; once the
    delta is back it goes on from step 4."""
    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "4"]) == 0
    capsys.readouterr()
    copy = tmp_path / "copy"
    copy.mkdir()
    cp = subprocess.run(f"cp {out}/* {copy}/", shell=True, capture_output=True, text=True)
    assert "omitting directory" in cp.stderr and not (copy / "tables.npy.delta").exists()
    common[common.index(str(out))] = str(copy)
    before = _run_files(copy)
    resume = [sys.executable, "-m", "tiered_store.cli", *common, "--resume", "--steps", "6"]
    proc = subprocess.run(resume, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        f"out: {copy} recorded committed step 4 (committed.json) but holds a table at step 0 "
        "(its delta, tables.npy.delta/, is missing or older)"
    ) in proc.stderr
    assert "restore the run's table files" in proc.stderr and "Traceback" not in proc.stderr
    assert _run_files(copy) == before  # dense-4.pt, loss.csv, train.json; no delta made
    assert json.loads((copy / "committed.json").read_text())["committed_step"] == 4
    subprocess.run(["cp", "-r", str(out / "tables.npy.delta"), str(copy)], check=True)
    assert main([*common, "--resume", "--steps", "6"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from_step"] == 4
    assert _committed(copy) == 6 and len((copy / "loss.csv").read_text().splitlines()) == 7

    shutil.rmtree(copy / "tables.npy.delta")  # the table gone whole: no new run over the rest
    for name in ("tables.npy", "tables.npy.manifest.json", "tables.npy.pages.crc32c"):
        (copy / name).unlink()
    before = _run_files(copy)
    for args in ([*common, "--resume"], [*common, *small, "--steps", "6"]):
        assert main(args) == 2
        assert "recorded committed step 6 (committed.json) but holds no table" in (
            capsys.readouterr().err
        )
    assert _run_files(copy) == before

    (out / "committed.json").write_text("{ damaged")
    common[common.index(str(copy))] = str(out)
    assert main([*common, "--resume"]) == 2
    assert f"out: {out / 'committed.json'}: Expecting property name" in capsys.readouterr().err
    (out / "committed.json").unlink()  # as a run made before the record: resumes as it did
    assert main([*common, "--resume", "--steps", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from_step"] == 4
    assert json.loads((out / "committed.json").read_text())["committed_step"] == 5


def _record(run: Path) -> dict:
    return json.loads((run / "committed.json").read_text())


def test_another_runs_committed_json_is_refused_naming_it(tmp_path, capsys):
    """committed.json copied in from another run: --resume trusted it as this run's (one behind
    the table went unnoticed and was overwritten; one ahead said this run's commits were lost).
    The record names the run, as the table's manifest does: another run's is refused naming the
    file, every file as it was; the run's own record back, it resumes."""
    from tiered_store.table_format import read_manifest

    common, small, out = _cli_args(tmp_path)
    other = tmp_path / "other"
    other_common = [str(other) if arg == str(out) else arg for arg in common]
    assert main([*common, *small, "--steps", "4"]) == 0
    assert main([*other_common, *small, "--steps", "2"]) == 0
    capsys.readouterr()
    records = {run: _record(run) for run in (out, other)}
    for run, source, args in ((out, other, common), (other, out, other_common)):
        own, foreign = (run / "committed.json").read_bytes(), _record(source)
        shutil.copy(source / "committed.json", run / "committed.json")  # behind, then ahead
        before = _run_files(run)
        assert main([*args, "--resume", "--steps", "5"]) == 2
        table_run = read_manifest(run / "tables.npy").metadata["trainable"]["run_id"]
        assert records[run]["run_id"] == table_run != foreign["run_id"]
        assert (
            f"out: {run / 'committed.json'}: records committed step "
            f"{foreign['committed_step']} of run '{foreign['run_id']}', but the "
            f"table there (tables.npy) belongs to run '{records[run]['run_id']}': the record is "
            "another run's"
        ) in capsys.readouterr().err
        assert _run_files(run) == before
        (run / "committed.json").write_bytes(own)
        assert main([*args, "--resume", "--steps", "5"]) == 0
        assert (
            json.loads(capsys.readouterr().out)["resumed_from_step"]
            == (records[run]["committed_step"])
        )


def test_a_record_without_a_run_id_is_refused_saying_so(tmp_path, capsys):
    """A run of this version resumed once by an older one (its committed.json without a run id)
    was refused as another run's record, "of run None". The refusal now says the record has no
    run id and how to go on; done as it says, the run resumes."""
    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "2"]) == 0
    run = _record(out)["run_id"]
    (out / "committed.json").write_text(json.dumps({"committed_step": 2}))  # an older version's
    capsys.readouterr()
    before = _run_files(out)
    assert main([*common, *small, "--resume", "--steps", "3"]) == 2
    assert capsys.readouterr().err == (
        f"tiered-store train: error: --out: {out / 'committed.json'}: records committed step 2 but "
        "no run id (written by an older version of tiered-store, or by hand), so it cannot be "
        "told from another run's record; the table there (tables.npy, at step 2) belongs to run "
        f"'{run}'; nothing was changed: if the record is this run's (an older version resumed "
        f'it), add "run_id": "{run}" to it; else remove it to go on from the table\'s step 2\n'
    )
    assert _run_files(out) == before
    (out / "committed.json").write_text(json.dumps({"committed_step": 2, "run_id": run}))
    assert main([*common, *small, "--resume", "--steps", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from_step"] == 2


def test_a_compacted_run_that_lost_its_delta_is_refused(tmp_path, capsys):
    """A compacted run resumes from the step in its version's manifest; the commits since, in
    the new version's delta, lost: refused as for a first version's."""
    from tiered_store.delta.compaction import compact_table

    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "2"]) == 0
    capsys.readouterr()
    compact_table(out / "tables.npy", progress=False)
    assert main([*common, "--resume", "--steps", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from_step"] == 2
    shutil.rmtree(out / "tables.g1.npy.delta")
    assert main([*common, "--resume", "--steps", "4"]) == 2
    assert (
        "recorded committed step 3 (committed.json) but holds a table at step 2 "
        "(its delta, tables.g1.npy.delta/, is missing or older)"
    ) in capsys.readouterr().err
    assert (out / "dense-3.pt").exists() and _committed(out) == 2


_WAIT_AFTER_COMMIT = """
import os, time
from tiered_store.store import TieredStore

_commit = TieredStore.commit


def _commit_then_wait(self, step=None, **kwargs):  # the commit of that step lands, then waits
    done = _commit(self, step, **kwargs)
    if step == int(os.environ["WAIT_AFTER_COMMIT"]):
        open(os.environ["WAIT_MARK"], "w").close()
        while True:
            time.sleep(1)
    return done


TieredStore.commit = _commit_then_wait
"""


def _run_killed_after_commit(tmp_path: Path, argv: list[str], step: int) -> str:
    """Run ``train`` with ``argv`` in a child process, SIGKILL it once it has committed
    ``step`` (the hook above waits there); returns its stderr."""
    hook, mark = tmp_path / "hook", tmp_path / "committed"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_WAIT_AFTER_COMMIT)  # imported by the run at start
    extra = {"PYTHONPATH": str(hook), "WAIT_AFTER_COMMIT": str(step), "WAIT_MARK": str(mark)}
    cmd = [sys.executable, "-m", "tiered_store.cli", *argv]
    proc = subprocess.Popen(cmd, env=subprocess_env(extra), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not mark.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == -signal.SIGKILL and mark.exists(), err[-2000:]
    return err


def test_a_kill_between_the_commit_and_its_record_resumes_from_the_table(tmp_path, capsys):
    """SIGKILL after the table's commit of step 4, before committed.json records it (it says 3):
    the table ahead of the record is a normal crash, and the run goes on from step 4."""
    common, small, out = _cli_args(tmp_path)
    _run_killed_after_commit(tmp_path, [*common, *small, "--steps", "6"], 4)
    assert _committed(out) == 4
    assert json.loads((out / "committed.json").read_text())["committed_step"] == 3
    assert main([*common, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from_step"] == 4
    assert json.loads((out / "committed.json").read_text())["committed_step"] == 6
    assert _committed(out) == 6 and len((out / "loss.csv").read_text().splitlines()) == 7


def test_a_new_run_folder_is_said_when_it_is_made_not_when_the_run_ends(tmp_path):
    """ "--out: created 'RUN'" came when train returned (hours in, for a long run), and never for
    a run stopped before its end (killed here after its first commit). It comes when the
    folder is made."""
    common, small, out = _cli_args(tmp_path)
    err = _run_killed_after_commit(tmp_path, [*common, *small, "--steps", "3"], 1)
    assert f"--out: created '{out}'" in err


_KILLED_RECORDING = r"""
import json, os, signal, sys
from tiered_store.cli import main
replace = os.replace
def killed(source, *args, **kwargs):  # step 2's commit made, its record not yet renamed
    if os.path.basename(source).startswith(".committed.json."):
        with open(source) as f:
            if json.load(f)["committed_step"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
    return replace(source, *args, **kwargs)
os.replace = killed
sys.exit(main(sys.argv[1:]))
"""


def test_a_resume_of_a_run_killed_in_its_last_checkpoint_finishes_that_checkpoint(tmp_path):
    """A kill in the run's last checkpoint after the table's commit (committed.json not yet
    renamed, the older dense-S.pt not yet removed): a --resume of the finished run trained no
    step, so no checkpoint ran, and left the record a step behind the table and the older dense
    checkpoint (a dense model and its Adam state) for good. The resume finishes it."""
    from tests import forkserver

    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "1"]) == 0
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_RECORDING)
    killed = forkserver.run_python([script, *common, "--resume", "--steps", "2"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _committed(out) == 2
    assert json.loads((out / "committed.json").read_text())["committed_step"] == 1
    assert sorted(p.name for p in out.glob("dense-*.pt")) == ["dense-1.pt", "dense-2.pt"]
    assert main([*common, "--resume"]) == 0
    assert json.loads((out / "committed.json").read_text())["committed_step"] == 2
    assert sorted(p.name for p in out.glob("dense-*.pt")) == ["dense-2.pt"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert main([*common, "--resume"]) == 0 and _committed(out) == 2


def test_a_resume_rewrites_the_record_only_when_it_changes(tmp_path):
    """Every resume rewrote committed.json (a new file renamed over it, synced) though it
    already held the table's step and run; it is left as it is, and is rewritten where it is a
    step behind (a kill between the commit and its record)."""
    settings = replace(_settings(ROOT / "tiered_store" / "engram"), steps=2)
    out = tmp_path / "run"
    train(out, settings, resume=False, progress=False)
    record = out / "committed.json"
    before = record.stat()
    train(out, settings, resume=True, progress=False)  # no step to train: only the record's check
    after = record.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    behind = json.loads(record.read_text())
    behind["committed_step"] = 1
    record.write_text(json.dumps(behind))
    train(out, settings, resume=True, progress=False)
    assert json.loads(record.read_text())["committed_step"] == 2


def test_train_called_from_python_names_its_out_argument_not_the_option(tmp_path):
    """train() named the command's --out in its errors (a folder it could not make, a folder
    whose recorded steps its table lacks, ...) when called from Python, where there is no such
    option; it names the argument now, as analyze() does, and the command its option."""
    settings = replace(_settings(ROOT / "tiered_store" / "engram"), steps=1)
    (tmp_path / "taken").write_text("not a directory")
    below_a_file = tmp_path / "taken" / "run"
    with pytest.raises(ConfigError, match=re.escape(f"out {below_a_file}: cannot make it")):
        train(below_a_file, settings, resume=False, progress=False)
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    (recorded / "committed.json").write_text(json.dumps({"committed_step": 4, "run_id": "r"}))
    with pytest.raises(ConfigError, match="or choose another out ") as raised:
        train(recorded, settings, resume=False, progress=False)
    assert "--out" not in str(raised.value)
    with pytest.raises(ConfigError, match="or choose another run ") as raised:
        train(recorded, settings, resume=False, progress=False, out_name="run")


def test_train_called_from_python_names_its_parameters_not_the_command_options(tmp_path, capsys):
    """train() named the command's options in errors raised to Python callers ("--optimizer:",
    "--resume:", "pass --resume", "--hot:") and began others with "out:" whatever out_name said;
    it names its parameters and TrainSettings' fields now, the command its options."""
    base = replace(_settings(ROOT / "tiered_store" / "engram"), steps=1)
    out = tmp_path / "run"
    for changed, start in (
        ({"optimizer": "bogus"}, "optimizer: 'bogus'; expected one of"),
        ({"io": "bogus"}, "io: 'bogus'; expected one of"),
        ({"batch_size": 0}, "batch_size: expected an integer >= 1, got 0"),
        ({"dense_lr": -1.0}, "dense_lr: got -1.0; expected a positive"),
        ({"hot": "1GiB"}, "hot: '1GiB' is "),
    ):
        with pytest.raises(ConfigError) as raised:
            train(out, replace(base, **changed), resume=False, progress=False)
        assert str(raised.value).startswith(start) and "--" not in str(raised.value), raised.value
    assert not out.exists()
    train(out, base, resume=False, progress=False)
    for name in ("out", "run"):
        with pytest.raises(ConfigError) as raised:
            train(out, base, resume=False, progress=False, out_name=name)
        message = str(raised.value)
        assert message.startswith(f"{name}: {out} already holds a training run; pass resume=True")
        assert "--" not in message, message
    with pytest.warns(UserWarning) as warned:
        train(out, replace(base, batch_size=4), resume=True, progress=False)
    text = " ".join(str(w.message) for w in warned)
    assert "resume: the run in" in text and "ignored: batch_size 4 (it uses 2)" in text, text
    assert "--" not in text, text
    common, _, cli_out = _cli_args(tmp_path)  # the command names its options
    common[common.index(str(cli_out))] = str(out)
    assert main([*common, "--steps", "1"]) == 2
    assert f"--out: {out} already holds a training run; pass --resume" in capsys.readouterr().err


def _final_state(out: Path, step: int) -> tuple[torch.Tensor, dict]:
    """A run's table rows and its dense checkpoint of ``step``."""
    with TieredStore.open({"table": {"path": str(out / "tables.npy")}}) as store:
        rows = store.lookup(torch.arange(store.rows))
    return rows, torch.load(out / f"dense-{step}.pt", weights_only=True)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_mixed_precision_run_resumes_as_an_uninterrupted_run(tmp_path, precision):
    """--precision runs the model under autocast (its loss differs from fp32's in the last
    digits, not more); fp16 scales the loss with a GradScaler whose state the checkpoints keep,
    so a run stopped after step 4 and resumed ends where a straight run does: rows, dense
    weights and the scaler's growth tracker (6 steps since the last skip, not 2)."""
    base = replace(_settings(ROOT / "tiered_store" / "engram"), steps=6, checkpoint_every=2)
    plain = train(tmp_path / "fp32", base, resume=False, progress=False)
    mixed = replace(base, precision=precision)
    straight = train(tmp_path / "straight", mixed, resume=False, progress=False)
    assert straight["final_loss"] != plain["final_loss"]
    assert abs(straight["final_loss"] - plain["final_loss"]) < 0.05
    assert straight["skipped_steps"] == 0
    train(tmp_path / "stopped", replace(mixed, steps=4), resume=False, progress=False)
    resumed = train(tmp_path / "stopped", mixed, resume=True, progress=False)
    assert resumed["final_loss"] == straight["final_loss"]
    (rows, dense), (rows2, dense2) = (
        _final_state(tmp_path / n, 6) for n in ("straight", "stopped")
    )
    assert torch.equal(rows, rows2)
    for key, value in dense["model"].items():
        assert torch.equal(value, dense2["model"][key]), key
    assert dense["scaler"] == dense2["scaler"]
    if precision == "fp16":
        assert dense2["scaler"]["_growth_tracker"] == 6 and dense2["scaler"]["scale"] == 2.0**16
    else:
        assert dense2["scaler"] == {}  # no scaler for bf16


def test_precision_and_device_are_checked_before_any_work(tmp_path, capsys):
    """A precision or a device this machine has not is refused, naming the option (the
    command's) or the setting (Python), before the run's folder exists."""
    base = replace(_settings(ROOT / "tiered_store" / "engram"), steps=1)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="^precision: 'fp64'; expected one of fp32, bf16, fp16"):
        train(out, replace(base, precision="fp64"), resume=False, progress=False)
    with pytest.raises(ConfigError, match="^device: got 'gpu'; expected 'cpu', 'cuda' or 'cuda:N'"):
        train(out, base, resume=False, progress=False, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="^device: 'cuda' but CUDA is not available here"):
            train(out, base, resume=False, progress=False, device="cuda")
    assert not out.exists()
    common, small, cli_out = _cli_args(tmp_path)
    for option, why in (
        ("--precision", "argument --precision: invalid choice: 'fp64'"),
        ("--device", "argument --device: got 'fp64'; expected 'cpu', 'cuda' or 'cuda:N'"),
    ):
        with pytest.raises(SystemExit) as exited:
            main([*common, *small, option, "fp64"])
        assert exited.value.code == 2 and why in capsys.readouterr().err
    assert not cli_out.exists()


@pytest.mark.gpu
def test_a_run_on_cuda_in_fp16_resumes_on_cuda(tmp_path):
    """The model and the hot tier on the GPU, fp16 autocast with a GradScaler: a run stopped and
    resumed ends where a straight one does, to the GPU's own run-to-run rounding (its atomic
    adds in index_add_ and attention's backward are not bit-reproducible)."""
    mixed = replace(
        _settings(ROOT / "tiered_store" / "engram"), steps=6, checkpoint_every=2, precision="fp16"
    )
    straight = train(tmp_path / "straight", mixed, resume=False, progress=False, device="cuda")
    assert math.isfinite(straight["final_loss"])
    train(
        tmp_path / "stopped", replace(mixed, steps=4), resume=False, progress=False, device="cuda"
    )
    resumed = train(tmp_path / "stopped", mixed, resume=True, progress=False, device="cuda")
    assert resumed["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-3)


def test_an_fp16_step_whose_dense_gradients_overflow_changes_no_row(tmp_path):
    """fp16: a step whose dense gradients overflow and the rows' do not (the tied LM head's
    gradient, the largest sum, at a scale of 2**20 here) is skipped whole: no row changes
    either, the summary counts it and the scale halves; a run stopped right after it ends
    where a straight one does."""
    mixed = replace(
        _settings(ROOT / "tiered_store" / "engram"), steps=2, checkpoint_every=1, precision="fp16"
    )
    train(tmp_path / "straight", mixed, resume=False, progress=False)
    dense_file = tmp_path / "straight" / "dense-2.pt"
    state = torch.load(dense_file, weights_only=True)
    state["scaler"]["scale"] = 2.0**20  # as if grown: step 3's dense gradients overflow
    torch.save(state, dense_file)
    shutil.copytree(tmp_path / "straight", tmp_path / "stopped")
    rows2, dense2 = _final_state(tmp_path / "straight", 2)
    summary = train(tmp_path / "stopped", replace(mixed, steps=3), resume=True, progress=False)
    rows3, dense3 = _final_state(tmp_path / "stopped", 3)
    for key, value in dense2["model"].items():
        assert torch.equal(value, dense3["model"][key]), key  # scaler.step skipped Adam
    assert torch.equal(rows2, rows3)
    assert summary["skipped_steps"] == 1 and dense3["scaler"]["scale"] == 2.0**19
    straight = train(tmp_path / "straight", replace(mixed, steps=6), resume=True, progress=False)
    resumed = train(tmp_path / "stopped", replace(mixed, steps=6), resume=True, progress=False)
    assert straight["skipped_steps"] == resumed["skipped_steps"] + 1
    assert resumed["final_loss"] == straight["final_loss"]
    (rows, dense), (rows_resumed, dense_resumed) = (
        _final_state(tmp_path / n, 6) for n in ("straight", "stopped")
    )
    assert torch.equal(rows, rows_resumed) and not torch.equal(rows, rows2)
    assert dense["scaler"] == dense_resumed["scaler"]


def test_an_fp16_run_over_a_stored_row_that_is_not_finite_names_it_rather_than_skipping(
    tmp_path,
):
    """fp16: rows stored NaN (a delta an older, unchecked writer left) make every gradient NaN,
    the dense ones too, which the run took for an overflow: it skipped every step to its end,
    silently (the summary's skipped_steps alone said it). The first step names a row as stored,
    as an fp32 run's does, and the last checkpoint stands."""
    from tiered_store.delta.row_delta import RowDelta, delta_path

    out = tmp_path / "run"
    mixed = replace(
        _settings(ROOT / "tiered_store" / "engram"), steps=1, checkpoint_every=1, precision="fp16"
    )
    train(out, mixed, resume=False, progress=False)
    rows, _ = _final_state(out, 1)
    nan = rows.numpy().copy()
    nan[:, 0] = np.nan  # every row's first weight
    delta = RowDelta(delta_path(out / "tables.npy"), nan.shape[1] * 4)
    delta.commit(np.arange(len(nan)), nan.view(np.uint8), 1)  # as an unchecked writer left it
    delta.close()
    with pytest.raises(RowDataError, match=r"^step 2: row \d+ as stored holds a non-finite value \(nan\) in its weights"):  # fmt: skip
        train(out, replace(mixed, steps=4), resume=True, progress=False)
    assert _committed(out) == 1 and sorted(p.name for p in out.glob("dense-*.pt")) == ["dense-1.pt"]


def _fp16_adam_run_with_step_3_skipped(tmp_path: Path) -> tuple[Path, TrainSettings]:
    """A run (fp16, --optimizer adam, a checkpoint a step) of 2 steps resumed to 3, its scale
    set so high first that step 3's gradients overflow and the step is skipped; (its folder,
    its settings)."""
    mixed = replace(
        _settings(ROOT / "tiered_store" / "engram"),
        steps=2,
        checkpoint_every=1,
        precision="fp16",
        optimizer="adam",
    )
    out = tmp_path / "run"
    train(out, mixed, resume=False, progress=False)
    state = torch.load(out / "dense-2.pt", weights_only=True)
    assert state["applied_steps"] == 2
    state["scaler"]["scale"] = 2.0**20  # as if grown: step 3's gradients overflow
    torch.save(state, out / "dense-2.pt")
    assert train(out, replace(mixed, steps=3), resume=True, progress=False)["skipped_steps"] == 1
    return out, mixed


def test_an_fp16_step_skipped_is_not_counted_in_the_rows_adam_steps(tmp_path):
    """fp16 with --optimizer adam: a step skipped for an overflow does not advance the rows'
    Adam step (as scaler.step leaves torch's Adam, the dense weights', at its count): the step
    after it corrects its bias as Adam's third step, not its fourth, and the count survives a
    resume (dense-S.pt records it)."""
    out, mixed = _fp16_adam_run_with_step_3_skipped(tmp_path)
    rows3, dense3 = _final_state(out, 3)
    assert dense3["applied_steps"] == 2
    dense3["scaler"]["scale"] = 2.0**10  # step 4's do not
    torch.save(dense3, out / "dense-3.pt")
    train(out, replace(mixed, steps=4), resume=True, progress=False)
    rows4, dense4 = _final_state(out, 4)
    assert dense4["applied_steps"] == 3
    dense_steps = {float(s["step"]) for s in dense4["optimizer"]["state"].values()}
    assert dense_steps == {3.0}
    # each touched row moved by lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps): t from it
    dim = rows4.shape[1] // 3
    touched = (rows4[:, dim:] != rows3[:, dim:]).any(1)
    moved = rows3[touched, :dim] - rows4[touched, :dim]
    m, v = rows4[touched, dim : 2 * dim], rows4[touched, 2 * dim :]
    direction = m / (v.sqrt() + 1e-8)
    large = direction.abs() > 0.1
    scale = (moved[large] / direction[large]).median().item() / mixed.table_lr
    assert touched.any() and scale == pytest.approx(
        math.sqrt(1 - 0.999**3) / (1 - 0.9**3), rel=1e-3
    )


def test_a_damaged_loss_log_is_refused_by_name_on_resume(tmp_path):
    """A loss.csv line that is not step,loss,tokens_per_second (a field lost, a number that is
    not one) made --resume fail with a bare ValueError traceback; it is refused naming the file,
    the line and what was expected, the table unchanged, and a run whose log was removed goes on."""
    base = replace(_settings(ROOT / "tiered_store" / "engram"), steps=2, checkpoint_every=1)
    out = tmp_path / "run"
    train(out, base, resume=False, progress=False)
    log = out / "loss.csv"
    header, first, _ = log.read_text().splitlines()
    for damaged in ("2,abc", "2,3.5,x", "2,1.0,2.0,3.0"):
        log.write_text(f"{header}\n{first}\n{damaged}\n")
        why = rf"^resume: {re.escape(str(log))}: line 3 is '{re.escape(damaged)}'; expected step,"
        with pytest.raises(ConfigError, match=why):
            train(out, replace(base, steps=3), resume=True, progress=False)
        assert _committed(out) == 2
    log.unlink()
    assert train(out, replace(base, steps=3), resume=True, progress=False)["steps"] == 3
    assert _committed(out) == 3 and len(log.read_text().splitlines()) == 2


def test_a_checkpoint_without_the_applied_count_resumes_at_adams_own_count(tmp_path):
    """A dense-S.pt written before it recorded applied_steps (an older version's fp16 run, a
    step skipped): the resume took S as the rows' Adam count, a step ahead of the dense Adam's,
    so the next step corrected the rows' bias as Adam's fifth step, not its fourth; the count is
    the dense Adam's own (every step it applied), which is S where no step was skipped."""
    out, mixed = _fp16_adam_run_with_step_3_skipped(tmp_path)
    older = torch.load(out / "dense-3.pt", weights_only=True)
    assert older.pop("applied_steps") == 2
    older["scaler"]["scale"] = 2.0**10  # step 4's do not overflow
    torch.save(older, out / "dense-3.pt")
    train(out, replace(mixed, steps=4), resume=True, progress=False)
    dense4 = torch.load(out / "dense-4.pt", weights_only=True)
    dense_steps = {float(s["step"]) for s in dense4["optimizer"]["state"].values()}
    assert dense_steps == {3.0} and dense4["applied_steps"] == 3


def test_a_loss_log_that_is_not_utf8_text_or_csv_is_refused_by_name_on_resume(tmp_path):
    """A loss.csv holding bytes that are not UTF-8, or a field past the csv module's limit (a
    line of 200,000 digits), made --resume fail with a bare UnicodeDecodeError or csv.Error; it
    is refused as any damaged line is, naming the file, the line and what train writes (a long
    line cut short), the table unchanged."""
    base = replace(_settings(ROOT / "tiered_store" / "engram"), steps=2, checkpoint_every=1)
    out = tmp_path / "run"
    train(out, base, resume=False, progress=False)
    log = out / "loss.csv"
    header, first, _ = log.read_bytes().splitlines()
    for damaged, shown in (
        (b"2,\xff\xfe,3.0", r"'2,\\\\xff\\\\xfe,3\.0'"),
        (b"2,1.0,3" + b"9" * 200_000, r"'2,1\.0,39999.*\(200,\d+ characters\)"),
    ):
        log.write_bytes(b"\n".join([header, first, damaged, b""]))
        why = rf"^resume: {re.escape(str(log))}: line 3 is {shown}; expected step,loss,"
        with pytest.raises(ConfigError, match=why):
            train(out, replace(base, steps=3), resume=True, progress=False)
        assert _committed(out) == 2


def test_a_loss_log_that_cannot_be_read_is_refused_by_name_on_resume(tmp_path):
    """A loss.csv that cannot be read (a folder of that name, say) made --resume fail with a bare
    IsADirectoryError, naming neither the option nor what was expected there, as committed.json
    and train.json do; it is refused (ConfigError naming the file and why), the table unchanged."""
    base = replace(_settings(ROOT / "tiered_store" / "engram"), steps=2, checkpoint_every=1)
    out = tmp_path / "run"
    train(out, base, resume=False, progress=False)
    log = out / "loss.csv"
    log.unlink()
    log.mkdir()
    why = rf"^resume: {re.escape(str(log))}: Is a directory; expected the loss log train writes"
    with pytest.raises(ConfigError, match=why):
        train(out, replace(base, steps=3), resume=True, progress=False)
    assert _committed(out) == 2
    log.rmdir()  # removed: the log goes on from the next step
    assert train(out, replace(base, steps=3), resume=True, progress=False)["steps"] == 3


def test_train_refuses_a_bool_or_fraction_for_a_count_and_keeps_numpy_integers(tmp_path):
    """train() took steps=True (1 step), a float step count (then refused as "max_tokens") and
    dense_lr=True (a learning rate of 1), saved as such in train.json, which every --resume then
    refused; a NumPy integer failed the save with a bare TypeError. A count that is not an
    integer, or a bool for a learning rate, is refused by name before the run's folder is made;
    NumPy integers are saved as integers and the run resumes."""
    base = replace(_settings(ROOT / "tiered_store" / "engram"), steps=1)
    out = tmp_path / "run"
    for changed, start in (
        ({"steps": True}, "steps: expected an integer >= 1, got True"),
        ({"steps": 2.5}, "steps: expected an integer >= 1, got 2.5"),
        ({"checkpoint_every": 1.5}, "checkpoint_every: expected an integer >= 1, got 1.5"),
        ({"dense_lr": True}, "dense_lr: got True; expected a positive finite learning rate"),
        ({"table_lr": False}, "table_lr: got False; expected a positive finite learning rate"),
    ):
        with pytest.raises(ConfigError) as raised:
            train(out, replace(base, **changed), resume=False, progress=False)
        assert str(raised.value).startswith(start), raised.value
    assert not out.exists()
    numpy_counts = replace(base, batch_size=np.int64(2), checkpoint_every=np.int32(1))
    train(out, numpy_counts, resume=False, progress=False)
    saved = json.loads((out / "train.json").read_text())
    assert (saved["batch_size"], saved["checkpoint_every"]) == (2, 1)
    assert train(out, replace(base, steps=2), resume=True, progress=False)["steps"] == 2


def test_a_checkpoint_removes_only_the_older_checkpoints_train_wrote(tmp_path):
    """Each checkpoint removed the older dense-*.pt by the text after 'dense-': a file of the
    user's beside them, dense-backup.pt, stopped the run after its commit with a bare ValueError
    (at every checkpoint, resumed or not), and dense-1-copy.pt was deleted as step 1's. Only
    dense-S.pt of an older step S goes."""
    base = replace(_settings(ROOT / "tiered_store" / "engram"), steps=2, checkpoint_every=1)
    out = tmp_path / "run"
    train(out, base, resume=False, progress=False)
    for name in ("dense-backup.pt", "dense-1-copy.pt"):
        shutil.copy(out / "dense-2.pt", out / name)
    assert train(out, replace(base, steps=3), resume=True, progress=False)["steps"] == 3
    kept = sorted(p.name for p in out.glob("dense-*.pt"))
    assert kept == ["dense-1-copy.pt", "dense-3.pt", "dense-backup.pt"]


def test_a_checkpoint_keeps_copies_named_like_a_step_train_never_writes(tmp_path):
    """Older checkpoints were told by the digits after 'dense-': a user's copy dense-002.pt (or
    dense-0.pt, or one of digits other than ASCII's, which int() reads) was deleted as step 2's,
    though train writes dense-S.pt with S >= 1 and no leading zero. Those are kept."""
    base = replace(_settings(ROOT / "tiered_store" / "engram"), steps=2, checkpoint_every=1)
    out = tmp_path / "run"
    train(out, base, resume=False, progress=False)
    copies = ["dense-002.pt", "dense-0.pt", "dense-\u0662.pt"]  # the last: Arabic-Indic 2
    for name in copies:
        shutil.copy(out / "dense-2.pt", out / name)
    assert train(out, replace(base, steps=3), resume=True, progress=False)["steps"] == 3
    kept = sorted(p.name for p in out.glob("dense-*.pt"))
    assert kept == sorted([*copies, "dense-3.pt"])


def test_train_refuses_a_seed_that_is_no_seed_and_keeps_numpy_numbers(tmp_path):
    """train()'s seed was never checked: seed=True or 1.5 trained (as seed 1) and was saved as
    such in train.json, which every --resume then refused; seed=-1 failed in NumPy's generator
    and 2**64 in torch's with a bare ValueError; a NumPy seed or hot row count
    failed train.json's save with a bare TypeError; and a NumPy float learning rate (np.float32)
    was refused as not a positive finite learning rate. A seed that is not an integer in [0,
    2**64) is refused by name before the run's folder is made; NumPy numbers are saved as JSON
    numbers and the run resumes."""
    base = replace(_settings(ROOT / "tiered_store" / "engram"), steps=1)
    out = tmp_path / "run"
    for seed in (True, 1.5, -1, 2**64, "3"):
        with pytest.raises(ConfigError) as raised:
            train(out, replace(base, seed=seed), resume=False, progress=False)
        assert str(raised.value).startswith(
            f"seed: expected an integer in [0, 2**64), got {seed!r}"
        ), raised.value
    assert not out.exists()
    numpy_numbers = replace(
        base, seed=np.int64(3), hot=np.int64(100), table_lr=np.float32(0.05), dense_lr=np.int64(1)
    )
    train(out, numpy_numbers, resume=False, progress=False)
    saved = json.loads((out / "train.json").read_text())
    assert (saved["seed"], saved["hot"], saved["dense_lr"]) == (3, 100, 1)
    assert saved["table_lr"] == float(np.float32(0.05))
    with warnings.catch_warnings():  # the same settings: none ignored
        warnings.simplefilter("error")
        resumed = train(out, replace(numpy_numbers, steps=2), resume=True, progress=False)
    assert resumed["steps"] == 2


def test_a_checkpoint_past_the_file_size_limit_is_refused_naming_the_file(tmp_path, capsys):
    """A checkpoint whose dense-S.pt could not be written (a full disk, here the file-size limit,
    RLIMIT_FSIZE) stopped the run with a bare OSError traceback ('File too large'), naming
    neither the file nor what became of the run, as did a resume's train.json. Each is a
    TierIOError naming the file and what stands: once there is room, --resume goes on."""
    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "1"]) == 0
    capsys.readouterr()
    limited = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))\n"
        "from tiered_store.cli import main\n"
        "sys.exit(main(sys.argv[2:]))\n"
    )
    resume = [sys.executable, "-c", limited, "0", *common, "--resume", "--steps", "2"]
    proc = subprocess.run(resume, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"settings {out / 'train.json'}: writing them failed: File too large" in proc.stderr
    assert json.loads((out / "train.json").read_text())["steps"] == 1  # as it was
    resume[3] = str(1 << 20)
    proc = subprocess.run(resume, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{out / 'dense-2.pt'}" in proc.stderr and "File too large" in proc.stderr
    assert "the last commit (step 1) stands" in proc.stderr
    # not the store's advice to a Python caller ("call commit() before close()"): the error
    # says what stands, as an interrupt's message does
    assert "call commit()" not in proc.stderr and "warning" not in proc.stderr, proc.stderr
    assert _committed(out) == 1 and not (out / "dense-2.pt").exists()
    assert [p.name for p in out.glob(".dense-*")] == []  # no temporary left
    assert main([*common, "--resume", "--steps", "2"]) == 0
    assert _committed(out) == 2


def test_a_moved_corpus_on_resume_names_the_settings_file_and_the_key_to_point_elsewhere(
    tmp_path, capsys
):
    """A resume whose corpus was moved named the old path alone: the path is the run's saved
    one, which no option given with --resume changes; the error names train.json and its
    "corpus" key, and the run goes on once that key names the corpus's new place."""
    texts = tmp_path / "texts"
    shutil.copytree(ROOT / "tiered_store" / "engram", texts)
    common, small, out = _cli_args(tmp_path)
    common[common.index("--corpus") + 1] = str(texts)
    assert main([*common, *small, "--steps", "1"]) == 0
    capsys.readouterr()
    texts.rename(tmp_path / "moved")
    assert main(["train", "--out", str(out), "--quiet", "--resume", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    saved = out / "train.json"
    assert f"error: --resume: {saved}: corpus: corpus path '{texts}': no such file" in err, err
    assert f'set the "corpus" key of {saved} to where it is now' in err, err
    assert _committed(out) == 1
    doc = json.loads(saved.read_text())
    saved.write_text(json.dumps({**doc, "corpus": [str(tmp_path / "moved")]}))
    assert main(["train", "--out", str(out), "--quiet", "--resume", "--steps", "2"]) == 0
    assert _committed(out) == 2


def test_a_model_error_names_the_file_it_is_in_and_the_key(tmp_path, capsys):
    """An error in the --model file named the key alone (``backbone.hidden_size: ...``), and the
    fp8 refusal of a resume blamed --model, which a resume does not read: each names the file
    that holds the model (the --model file, or the run's train.json) and the key."""
    common, small, out = _cli_args(tmp_path)
    model_file = tmp_path / "model.json"
    model_file.write_text(json.dumps({**TINY, "backbone": {**TINY["backbone"], "hidden_size": -1}}))
    assert main([*common, *small, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"error: --model {model_file}: backbone.hidden_size: expected an integer >= 1" in err
    v41 = {**TINY, "engram": {**TINY["engram"], "geometry": "deepseek-v4.1"}}
    v41["engram"].update(engram_vocab_size=211, n_head_per_ngram=8, n_embed_per_ngram=256)
    model_file.write_text(json.dumps(v41))
    assert main([*common, *small, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"error: --model {model_file}: engram.geometry 'deepseek-v4.1' has packed fp8" in err
    assert not out.exists()
    model_file.write_text(json.dumps(TINY))
    assert main([*common, *small, "--steps", "1"]) == 0
    doc = json.loads((out / "train.json").read_text())
    (out / "train.json").write_text(json.dumps({**doc, "model": v41}))
    assert main([*common, "--resume", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    saved = out / "train.json"
    assert f"error: --resume: {saved}: model: engram.geometry 'deepseek-v4.1' has packed fp8" in err
    assert "expected the settings `train` saved there" in err and "--model:" not in err, err
    with pytest.raises(ConfigError, match=r"^model: backbone.hidden_size: expected an integer"):
        bad = {**TINY, "backbone": {**TINY["backbone"], "hidden_size": -1}}
        train(tmp_path / "py", replace(_settings(ROOT), model=bad), resume=False, progress=False)
    assert _committed(out) == 1


def test_a_resume_given_another_model_names_it_without_printing_both_models(tmp_path, capsys):
    """A --resume given a --model other than the run's warned with both models printed whole
    (every section, twice, on one line); it says the model is not the run's, and where the run's
    is."""
    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "1"]) == 0
    capsys.readouterr()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY, "backbone": {**TINY["backbone"], "hidden_size": 32}}))
    at = common.index("--model") + 1
    assert main([*common[:at], str(other), *common[at + 1 :], "--resume", "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"ignored: --model \(not the run's model, which .*train\.json holds\)$", err, re.M), err  # fmt: skip
    assert "{'engram'" not in err
    assert _committed(out) == 2


def test_a_run_inside_its_corpus_resumes_on_the_same_text(tmp_path):
    """A run whose folder is inside its corpus read its own files (train.json, loss.csv,
    committed.json) as text on resume, so the resumed run trained on other batches than an
    uninterrupted one; the run's folder is never part of its corpus."""
    texts, copy = tmp_path / "texts", tmp_path / "copy"
    shutil.copytree(ROOT / "tiered_store" / "engram", texts, ignore=shutil.ignore_patterns("_*"))
    shutil.copytree(texts, copy)
    base = replace(_settings(texts), steps=4, checkpoint_every=2, seed=3)
    straight = train(tmp_path / "straight", replace(base, corpus=[str(copy)]), resume=False, progress=False)  # fmt: skip
    train(texts / "run", replace(base, steps=2), resume=False, progress=False)
    resumed = train(texts / "run", base, resume=True, progress=False)
    assert resumed["final_loss"] == straight["final_loss"]
    rows, dense = _final_state(tmp_path / "straight", 4)
    rows2, dense2 = _final_state(texts / "run", 4)
    assert torch.equal(rows, rows2)


def test_a_corpus_inside_the_run_folder_is_still_read(tmp_path):
    """The run's folder is left out of its corpus only where the corpus is not inside it."""
    out = tmp_path / "run"
    shutil.copytree(ROOT / "tiered_store" / "engram", out / "texts")
    settings = replace(_settings(out / "texts"), steps=1, checkpoint_every=1)
    assert train(out, settings, resume=False, progress=False)["steps"] == 1
    assert _committed(out) == 1


def test_a_corpus_inside_the_run_folder_named_through_a_link_is_still_read(tmp_path):
    """A run folder or a corpus named through a symbolic link was compared by its name: a
    corpus inside the run was taken for one outside it, the run's folder left out of it, and
    the run refused, its every file in "the excluded folder (analyze's --out)"; links are
    followed, so each trains on its corpus, and resumes."""
    for name, link in (("run", "run-link"), ("run2", "texts-link")):
        shutil.copytree(ROOT / "tiered_store" / "engram", tmp_path / name / "texts")
        (tmp_path / link).symlink_to(tmp_path / name / ("" if name == "run" else "texts"))
    by_run_link = replace(_settings(tmp_path / "run" / "texts"), steps=1, checkpoint_every=1)
    by_corpus_link = replace(_settings(tmp_path / "texts-link"), steps=1, checkpoint_every=1)
    for out, settings in ((tmp_path / "run-link", by_run_link), (tmp_path / "run2", by_corpus_link)):  # fmt: skip
        assert train(out, settings, resume=False, progress=False)["steps"] == 1
        assert train(out, replace(settings, steps=2), resume=True, progress=False)["steps"] == 2
        assert _committed(out) == 2


def test_a_corpus_path_in_the_home_folder_is_read_there(tmp_path, monkeypatch):
    """A corpus path with a leading ~ (a Python caller's, or a quoted --corpus) was made
    absolute first, as a folder named ~ under the current one, and refused as no such file; it
    is the home folder, as every corpus path's ~ is, and the run saves where it found it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(ROOT / "tiered_store" / "engram", tmp_path / "texts")
    settings = replace(_settings(ROOT), corpus=["~/texts"], steps=1, checkpoint_every=1)
    assert train(tmp_path / "run", settings, resume=False, progress=False)["steps"] == 1
    saved = json.loads((tmp_path / "run" / "train.json").read_text())
    assert saved["corpus"] == [str(tmp_path / "texts")]


def test_a_python_resume_without_a_step_count_goes_on_to_the_runs_own(tmp_path):
    """``TrainSettings().steps`` was 200, so a Python ``train(resume=True)`` given default
    settings grew a run of 2 steps to 200 (the command's --resume keeps the run's count unless
    --steps is given); None means not given, as on the command line: a resume keeps the run's
    count, a new run takes 200; a count of 0 is refused, as --steps 0 is."""
    out = tmp_path / "run"
    settings = replace(_settings(ROOT / "tiered_store" / "engram"), steps=2, checkpoint_every=1)
    assert train(out, settings, resume=False, progress=False)["steps"] == 2
    assert train(out, TrainSettings(), resume=True, progress=False)["steps"] == 2
    assert json.loads((out / "train.json").read_text())["steps"] == 2
    assert TrainSettings().steps is None
    with pytest.raises(ConfigError, match=r"^steps: expected an integer >= 1, got 0$"):
        train(tmp_path / "new", replace(settings, steps=0), resume=False, progress=False)
    assert not (tmp_path / "new").exists()


def test_a_corpus_too_small_names_the_option_or_on_a_resume_the_settings_file(tmp_path, capsys):
    """A corpus too small for one batch was refused as 'corpus: N tokens do not fill one batch
    of 2 x 16', naming neither --corpus nor the batch's options, and on a resume (its corpus
    emptied since) not the train.json that holds the corpus and the batch: each is named."""
    texts = tmp_path / "texts"
    shutil.copytree(ROOT / "tiered_store" / "engram", texts)
    common, small, out = _cli_args(tmp_path)
    common[common.index("--corpus") + 1] = str(texts)
    assert main([*common, *small, "--steps", "1", "--seq-len", "10000000"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: --corpus: [0-9,]+ tokens do not fill one batch of --batch-size 2 x --seq-len 10000000; expected a larger corpus or smaller batches$", err, re.M), err  # fmt: skip
    assert not out.exists()
    assert main([*common, *small, "--steps", "1"]) == 0
    capsys.readouterr()
    shutil.rmtree(texts)
    texts.mkdir()
    (texts / "a.txt").write_text("a few words")
    assert main(["train", "--out", str(out), "--quiet", "--resume", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    saved = out / "train.json"
    assert re.search(rf"error: --resume: {re.escape(str(saved))}: corpus: [0-9]+ tokens do not fill one batch of batch_size 2 x seq_len 16; expected the corpus the run was started on", err), err  # fmt: skip
    assert f'set the "corpus" key of {saved} to where it is now' in err, err
    assert _committed(out) == 1
    settings = replace(_settings(texts), steps=1)
    with pytest.raises(ConfigError, match=r"^corpus: [0-9]+ tokens do not fill one batch of batch_size 2 x seq_len 16; expected a larger corpus or smaller batches$"):  # fmt: skip
        train(tmp_path / "py", settings, resume=False, progress=False)
    assert not (tmp_path / "py").exists()


def test_a_run_stopped_by_an_error_in_a_step_says_which_step_stands(tmp_path, capsys):
    """A run stopped by an error in a step (a gradient gone NaN), its rows past the last commit
    dropped, was told so by the store's warning, which 54578dc hid; nothing then said which
    step stands: a line says it, as for an interrupt, the store's advice to call commit() not."""
    settings = replace(_settings(ROOT / "tiered_store" / "engram"), steps=2, checkpoint_every=2)
    out = tmp_path / "run"
    train(out, settings, resume=False, progress=False)
    state = torch.load(out / "dense-2.pt", weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["lr"] = 1e30  # step 3 steps the dense weights out of range: step 4's loss is NaN
    torch.save(state, out / "dense-2.pt")
    capsys.readouterr()
    with pytest.raises(RowDataError, match=r"^step 4: the gradient of row \d+ holds a non-finite"):
        train(out, replace(settings, steps=6), resume=True, progress=False)
    err = capsys.readouterr().err
    assert re.search(rf"^train: stopped by the error below; {re.escape(str(out))} holds step 2, its last checkpoint \(the [0-9,]+ rows written since are dropped\)$", err, re.M), err  # fmt: skip
    assert "call commit()" not in err
    assert _committed(out) == 2


def test_a_corpus_path_in_the_home_folder_with_home_empty_names_the_option(
    tmp_path, capsys, monkeypatch
):
    """--corpus '~/texts' with HOME set but empty was refused naming the path alone; the error
    names --corpus, and no run is made."""
    monkeypatch.setenv("HOME", "")
    common, small, out = _cli_args(tmp_path)
    common[common.index("--corpus") + 1] = "~/texts"
    assert main([*common, *small, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: --corpus: '~/texts': HOME is set but empty" in err, err
    assert not out.exists()


def test_a_corpus_found_only_in_the_run_folder_names_trains_out_not_analyzes(tmp_path, capsys):
    """A corpus whose every file lies in the run's folder (a pattern from above it) was refused
    as in "the excluded folder RUN (analyze's --out, ...)", an option train has not; the error
    names train's own: --out, or a Python caller's out."""
    common, small, out = _cli_args(tmp_path)
    out.mkdir()
    for name in ("a.txt", "b.txt"):
        (out / name).write_text("words of a document the user keeps beside the run\n")
    common[common.index("--corpus") + 1] = str(tmp_path / "*" / "*.txt")
    assert main([*common, *small, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: --corpus: corpus .*: every file found \(2\) is in the excluded folder {re.escape(str(out))} \(train's --out, never read as text\)", err), err  # fmt: skip
    assert "analyze" not in err
    settings = replace(_settings(tmp_path), corpus=[str(tmp_path / "*" / "*.txt")], steps=1)
    with pytest.raises(
        CorpusError, match=r"excluded folder .* \(train's out, never read as text\)"
    ):
        train(out, settings, resume=False, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"]


def test_a_run_inside_its_corpus_that_names_a_file_in_the_run_resumes_on_the_same_text(tmp_path):
    """A corpus of a folder holding the run and of a file in the run (the run's folder is then
    not left out: a corpus path lies in it) read the run's own train.json, loss.csv,
    committed.json and table manifest as text on resume, training on other batches than an
    uninterrupted run; the run's own files are left out by name, the user's file in it kept."""
    texts, copy = tmp_path / "texts", tmp_path / "copy"
    shutil.copytree(ROOT / "tiered_store" / "engram", texts, ignore=shutil.ignore_patterns("_*"))
    (texts / "run").mkdir()
    (texts / "run" / "notes.txt").write_text("notes the user keeps beside the run\n" * 40)
    shutil.copytree(texts, copy)
    base = replace(_settings(texts), steps=4, checkpoint_every=2, seed=3)
    alone = [str(copy), str(copy / "run" / "notes.txt")]
    straight = train(tmp_path / "straight", replace(base, corpus=alone), resume=False, progress=False)  # fmt: skip
    inside = replace(base, corpus=[str(texts), str(texts / "run" / "notes.txt")])
    train(texts / "run", replace(inside, steps=2), resume=False, progress=False)
    resumed = train(texts / "run", inside, resume=True, progress=False)
    assert resumed["final_loss"] == straight["final_loss"]
    rows, _ = _final_state(tmp_path / "straight", 4)
    rows2, _ = _final_state(texts / "run", 4)
    assert torch.equal(rows, rows2)
    solo = tmp_path / "solo"  # the corpus is the run's folder: its own files are no text either
    solo.mkdir()
    (solo / "notes.txt").write_text("notes the user keeps beside the run\n" * 40)
    alone = replace(base, corpus=[str(solo)], steps=1, checkpoint_every=1)
    train(solo, alone, resume=False, progress=False)
    (solo / "notes.txt").unlink()
    with pytest.raises(ConfigError, match=r"corpus: corpus .*: every file found \([0-9]+\) is the run's own in .*solo \(its settings, loss log, checkpoints or table\)"):  # fmt: skip
        train(solo, replace(alone, steps=2), resume=True, progress=False)
    assert _committed(solo) == 1


def test_a_settings_file_without_a_step_count_names_it_missing_on_a_resume(tmp_path, capsys):
    """A train.json without "steps" (an edit) read as TrainSettings' None, not given, and a
    --resume given no --steps refused it as "got None", a value the file does not hold; it is
    named missing, and a --resume given --steps goes on to that count."""
    common, small, out = _cli_args(tmp_path)
    assert main([*common, *small, "--steps", "1"]) == 0
    doc = json.loads((out / "train.json").read_text())
    del doc["steps"]
    (out / "train.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main([*common, "--resume"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: --resume: .*train\.json: steps: missing; expected an integer >= 1; expected the settings `train` saved there", err), err  # fmt: skip
    assert "None" not in err
    assert _committed(out) == 1
    assert main([*common, "--resume", "--steps", "2"]) == 0
    assert _committed(out) == 2
    assert json.loads((out / "train.json").read_text())["steps"] == 2


def test_a_corpus_path_no_file_can_have_is_named_not_a_bare_error(tmp_path):
    """A corpus path with a NUL character or a lone surrogate (a Python caller's, or an edit of
    train.json) failed in os.path.realpath, which a48efc2 put before the corpus is read, with a
    bare ValueError or UnicodeEncodeError; it is refused naming the path (on a resume, the run's
    train.json and its corpus key), no run made and the run kept."""
    base = replace(_settings(ROOT / "tiered_store" / "engram"), steps=1, checkpoint_every=1)
    for path, why in (("a\x00b", "a NUL character"), ("\ud800x", "a lone surrogate")):
        with pytest.raises(CorpusError, match=rf"^corpus path '\S*{re.escape(repr(path)[1:-1])}': expected a path without {why}"):  # fmt: skip
            train(tmp_path / "new", replace(base, corpus=[path]), resume=False, progress=False)
    assert not (tmp_path / "new").exists()
    out = tmp_path / "run"
    train(out, base, resume=False, progress=False)
    doc = json.loads((out / "train.json").read_text())
    (out / "train.json").write_text(json.dumps({**doc, "corpus": ["a\x00b"]}))
    with pytest.raises(ConfigError, match=r"^resume: .*train\.json: corpus: corpus path '\S*a\\x00b': expected a path without a NUL character; expected the corpus the run was started on"):  # fmt: skip
        train(out, replace(base, steps=2, corpus=None), resume=True, progress=False)
    assert _committed(out) == 1


def test_train_called_from_python_takes_out_as_a_str_and_names_one_no_folder_can_have(
    tmp_path, monkeypatch
):
    """train("run", ...) failed with a bare TypeError (a str has no '/'), and an out with a NUL
    character or a lone surrogate with a bare ValueError or UnicodeEncodeError; a str or Path
    is the folder (a leading ~ the home folder, as the command's --out and a corpus path), and
    one no folder can have is refused naming out."""
    monkeypatch.setenv("HOME", str(tmp_path))
    base = replace(_settings(ROOT / "tiered_store" / "engram"), steps=1, checkpoint_every=1)
    assert train("~/run", base, resume=False, progress=False)["out"] == str(tmp_path / "run")
    assert _committed(tmp_path / "run") == 1
    assert train(str(tmp_path / "run"), replace(base, steps=2), resume=True, progress=False)["steps"] == 2  # fmt: skip
    for name, why in (("r\x00", "a NUL character"), ("\ud800r", "a lone surrogate")):
        with pytest.raises(ConfigError, match=rf"^out: '\S*{re.escape(repr(name)[1:-1])}': expected a path without {why}"):  # fmt: skip
            train(tmp_path / name, base, resume=False, progress=False)
