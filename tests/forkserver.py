"""One forkserver for the tests that start many processes: it imports the library (and the crash
tests' writer) once, so each process it forks starts in milliseconds rather than the second and
more a fresh interpreter takes to import torch and the store.

``run_script`` runs a script as ``python SCRIPT ARGS`` would, in such a process: its own working
directory, environment, ``sys.argv``, ``sys.path[0]`` (the script's folder) and standard streams,
the script executed afresh as ``__main__``, its exit status that of ``sys.exit`` (1 and the
traceback on stderr for an uncaught exception, as Python gives).
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

# one list for every user: the server starts once per test session, with the first user's list
PRELOAD = [
    "tests.crash_writer",
    "tests.crash_warmup",
    "tiered_store.store",
    "tiered_store.cli",
    "zipf_analysis.analyze",
    "policies.pinned_lru",
]


def context() -> multiprocessing.context.ForkServerContext:
    """The forkserver context, its preload set."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _as_python_runs(script: str, args: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """In the forked process: become ``python SCRIPT ARGS`` run in ``cwd`` with ``env``, its
    output into the files ``out`` and ``err``."""
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 (flushed at exit)
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # read TMPDIR again
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(script, run_name="__main__")  # SystemExit's code is the process's status


def run_script(
    script: str | os.PathLike[str],
    args: list[str],
    *,
    env: dict[str, str],
    cwd: str | os.PathLike[str],
    timeout: float,
) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` in a forked process; what ``subprocess.run(..., text=True,
    capture_output=True)`` returns, and ``TimeoutExpired`` (the process killed) after ``timeout``
    seconds."""
    cmd = [sys.executable, str(script), *args]
    with tempfile.TemporaryDirectory(prefix="script-output-") as d:
        out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        process = context().Process(
            target=_as_python_runs, args=(str(script), list(args), dict(env), str(cwd), out, err)
        )
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(cmd, timeout)
        read = (Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace"))
        return subprocess.CompletedProcess(cmd, process.exitcode, *read)
