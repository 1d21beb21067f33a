"""bench/bench_tree_cpu.py runs end to end at a tiny size (run, not imported)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.bench_support import ROOT, run_bench

TINY = ("--rows", "50000", "--tokens", "16384", "--rounds", "2")


def tree_state(tree) -> dict:
    """What the report says of a tree: its commit, and whether git sees changes in it."""
    git = ["git", "-C", str(tree)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
    return {"commit": head.stdout.strip(), "dirty": status.stdout.strip() != ""}


def test_one_tree_against_itself_gives_a_ratio_near_one_and_the_same_replay(tmp_path):
    """The same tree twice: the processes replay the same trace to the same fetch ratio, each
    round times one process per tree, and the ratio of the medians is about 1 (a shared machine
    swings a process's CPU time, not by 5x). The report names each tree's commit and whether it
    had changes (it named the base's alone, and with --trees not even that)."""
    out = tmp_path / "tree_cpu.json"
    args = ("--trees", str(ROOT), str(ROOT), *TINY, "--dir", str(tmp_path), "--out", str(out))
    done = run_bench("bench_tree_cpu.py", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report == json.loads(out.read_text())
    base, new = report["trees"]["base"], report["trees"]["new"]
    assert len(base["cpu_s"]) == len(new["cpu_s"]) == 2
    assert min(base["cpu_s"] + new["cpu_s"]) > 0
    assert base["fetch_ratio"] == new["fetch_ratio"] and 0 < base["fetch_ratio"] < 1
    assert report["lookups"] == 16384 * 16
    assert report["base"] == report["new"] == tree_state(ROOT)
    assert 0.2 < report["ratio_new_to_base"] < 5 and 0.2 < report["median_round_ratio"] < 5
    assert "median CPU time: base " in done.stderr and "round 2/2: base " in done.stderr
    assert str(tmp_path) not in out.read_text()  # no machine path in the report
    assert [p.name for p in tmp_path.iterdir()] == ["tree_cpu.json"]  # the trace was removed


def test_a_revision_git_does_not_know_is_refused_before_any_work():
    done = run_bench("bench_tree_cpu.py", "--rev", "no-such-rev", timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert "--rev 'no-such-rev': not a commit of" in done.stderr


@pytest.mark.slow  # ~25 s: a worktree checked out, and a process per tree importing torch
def test_a_worktree_base_under_a_linked_folder_is_its_own_library_and_is_removed(tmp_path):
    """The base worktree made under ``--dir`` (or a temporary directory) reached through a
    symbolic link (macOS's /var -> /private/var) failed the check that each process imports its
    own tree: the imported files, resolved, were not under the unresolved worktree path. The
    worktree of --rev replays as this tree does, and is removed at the end."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    args = ("--rev", "HEAD", *TINY[:4], "--rounds", "1", "--replays", "1")
    done = run_bench("bench_tree_cpu.py", *args, "--dir", str(tmp_path / "link"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["base"]["rev"] == "HEAD" and len(report["base"]["commit"]) == 40
    assert report["new"] == tree_state(ROOT)
    assert report["trees"]["base"]["fetch_ratio"] == report["trees"]["new"]["fetch_ratio"]
    assert list(real.iterdir()) == []
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True, check=True
    )
    assert str(real) not in listed.stdout


def test_a_rev_with_trees_is_refused_not_ignored(tmp_path):
    """--rev beside --trees was ignored, the first of --trees measured as the base while the
    command line said another revision; it is refused before any work, naming both."""
    args = ("--trees", str(ROOT), str(ROOT), "--rev", "HEAD~1", *TINY[:4], "--rounds", "1")
    done = run_bench("bench_tree_cpu.py", *args, "--dir", str(tmp_path))
    assert done.returncode == 2 and done.stdout == "", done.stderr[-3000:]
    expected = "--rev 'HEAD~1': the base is the first of --trees; expected one of them"
    assert expected in done.stderr


def test_a_worktree_whose_add_failed_is_not_left_registered(tmp_path):
    """``git worktree add`` failing once it had registered the worktree (its post-checkout hook
    failing: git-lfs's, without git-lfs) left the repository a worktree entry for a folder the
    run then removed. The worktree is removed whatever the add's outcome."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "post-checkout").write_text("#!/bin/sh\necho 'the hook refuses' >&2\nexit 1\n")
    (hooks / "post-checkout").chmod(0o755)
    git_env = {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "core.hooksPath",
        "GIT_CONFIG_VALUE_0": str(hooks),
    }
    done = run_bench("bench_tree_cpu.py", *TINY, "--dir", str(tmp_path), env=git_env)
    assert done.returncode != 0 and done.stdout == ""
    first = f"bench_tree_cpu.py: error: git worktree add {tmp_path.resolve()}/"
    assert done.stderr.startswith(first), done.stderr[-3000:]  # one line, not a traceback
    assert done.returncode == 2 and "the hook refuses" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["hooks"]
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True, check=True
    )
    assert str(tmp_path) not in listed.stdout


def test_a_replay_that_fails_ends_the_run_with_one_line_naming_its_tree(tmp_path):
    """A tree whose replay failed (an older tree that cannot run it, a broken checkout) ended the
    run in a traceback, exit 1, not the one-line error (exit 2) every other command gives. It
    names the tree and shows the end of the replay's stderr; the work folder is removed."""
    broken = tmp_path / "broken"
    for package in ("tiered_store", "zipf_analysis"):
        (broken / package).mkdir(parents=True)
    (broken / "tiered_store" / "__init__.py").write_text("raise ImportError('a broken tree')\n")
    args = ("--trees", str(broken), str(ROOT), *TINY[:4], "--rounds", "1", "--replays", "1")
    done = run_bench("bench_tree_cpu.py", *args, "--dir", str(tmp_path))
    assert done.returncode == 2 and done.stdout == "", done.stderr[-3000:]
    first = f"bench_tree_cpu.py: error: the replay under {broken} ended with exit status 1; "
    assert done.stderr.startswith(first), done.stderr[-3000:]
    assert "ImportError: a broken tree" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]
