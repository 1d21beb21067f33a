"""Shared by the tests that run a bench/ script as a user runs it: the root, a corpus, the runs."""

from __future__ import annotations

import email
import os
import re
import subprocess
from pathlib import Path

from tests.forkserver import run_python
from tiered_store.io_uring import uring_unavailable_reason
from tiered_store.serve.client import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(email.__file__).parent  # the standard library's email package: about 70k tokens


def run_bench(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """``python bench/SCRIPT ARGS`` from the repository root, ``env`` over this process's (in a
    process of the tests' forkserver, which has imported the library: see ``tests.forkserver``)."""
    env = subprocess_env(env)
    return run_python([ROOT / "bench" / script, *args], env=env, cwd=ROOT, timeout=timeout)


def analyze(
    out: Path,
    *,
    max_tokens: int,
    holdout: float | None = None,
    shuffle: bool = False,
    corpus: Path = CORPUS,
) -> Path:
    """``tiered-store analyze`` of ``corpus`` without curves into ``out``, which it returns."""
    cmd = ["-m", "tiered_store.cli", "analyze", str(corpus)]
    if holdout is not None:
        cmd += ["--holdout", str(holdout)]
    if shuffle:
        cmd += ["--shuffle"]
    cmd += ["--max-tokens", str(max_tokens), "--no-curves", "--quiet", "--out", str(out)]
    done = run_python(cmd, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def cold_io(directory: Path) -> str:
    """``uring``, the scripts' default (O_DIRECT), where ``directory`` takes it, else ``pread``."""
    if uring_unavailable_reason() is not None:
        return "pread"
    probe = directory / "o_direct_probe"
    probe.write_bytes(bytes(4096))
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return "pread"
    finally:
        probe.unlink()
    return "uring"


def options_in_help(text: str) -> tuple[set[str], set[str]]:
    """The options a ``--help`` ``text`` accepts (in its usage) and those it mentions anywhere."""
    usage = text.split("\n\n")[0]
    accepted = set(re.findall(r"\[(--[a-z][a-z-]*)", usage)) | {"--help"}
    return accepted, set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
