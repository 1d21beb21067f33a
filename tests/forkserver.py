"""One forkserver for the tests that start many processes: it imports the library (and the crash
tests' writer) once, so each process it forks starts in milliseconds rather than the second and
more a fresh interpreter takes to import torch and the store.

``run_python`` runs ``python SCRIPT ARGS`` (or ``python -m MODULE ARGS``) in such a process: its
own working directory, environment, ``sys.argv``, ``sys.path[0]`` and standard streams, the
script or module executed afresh as ``__main__``, its exit status that of ``sys.exit`` (1 and the
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
    "zipf_analysis.plots",  # matplotlib: 0.4-0.7 s of every forked analyze that plots
    "policies.pinned_lru",
]


def context() -> multiprocessing.context.ForkServerContext:
    """The forkserver context, its preload set."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _as_python_runs(argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """In the forked process: become ``python ARGV`` (a script and its arguments, or ``-m
    MODULE`` and its) run in ``cwd`` with ``env``, its output into the files ``out`` and ``err``."""
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
    if argv[0] == "-m":  # as python -m: the working directory first on the path
        sys.argv = [argv[1], *argv[2:]]
        sys.path.insert(0, cwd)
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).parent))
        runpy.run_path(argv[0], run_name="__main__")  # SystemExit's code is the exit status


def run_python(
    argv: list[str | os.PathLike[str]],
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] = ".",
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """``python ARGV`` (``[SCRIPT, ARG...]`` or ``["-m", MODULE, ARG...]``) in a forked process,
    ``env`` (default: this process's) its whole environment; what ``subprocess.run(...,
    text=True, capture_output=True)`` returns, and ``TimeoutExpired`` (the process killed) after
    ``timeout`` seconds."""
    argv = [str(a) for a in argv]
    env = dict(os.environ if env is None else env)
    cmd = [sys.executable, *argv]
    with tempfile.TemporaryDirectory(prefix="python-output-") as d:
        out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        process = context().Process(
            target=_as_python_runs, args=(argv, env, os.path.abspath(cwd), out, err)
        )
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(cmd, timeout)
        read = (Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace"))
        return subprocess.CompletedProcess(cmd, process.exitcode, *read)
