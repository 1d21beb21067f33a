"""One forkserver for the tests that start many processes: it imports the library (and the crash
tests' writer) once, so each process it forks starts in milliseconds rather than the second and
more a fresh interpreter takes to import torch and the store.

``run_python`` runs ``python SCRIPT ARGS`` (or ``python -m MODULE ARGS``) in such a process: its
own working directory, environment, ``sys.argv``, ``sys.path[0]`` and standard streams, the
script or module executed afresh as ``__main__``, its exit status that of ``sys.exit`` (1 and the
traceback on stderr for an uncaught exception, as Python gives).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import threading
from multiprocessing import reduction
from pathlib import Path

from tiered_store.cli_args import COMMANDS

# one list for every user: the server starts once per test session, with the first user's list
PRELOAD = [
    "tests.crash_writer",
    "tests.crash_warmup",
    "tiered_store.store",
    # every subcommand's module (the command line imports only the one a run names)
    *dict.fromkeys(target.split(":")[0] for target, _ in COMMANDS.values()),
    "zipf_analysis.analyze.pipeline",
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
    fds = [os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) for path in (out, err)]
    _become_python(argv, env, cwd, fds, "", False)


def _become_python(
    argv: list[str], env: dict, cwd: str, fds: list, prelude: str, exit_funcs: bool
) -> None:
    """``python ARGV`` with ``fds`` (None: /dev/null) as its stdout and stderr; ``prelude`` (a
    file, or "") run first, as a ``sitecustomize`` is; ``exit_funcs``: the atexit functions run
    at the end, as at an interpreter's exit."""
    for fd, target in zip((1, 2), fds, strict=True):
        target = os.open(os.devnull, os.O_WRONLY) if target is None else target
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 (flushed at exit)
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # read TMPDIR again
    try:
        if prelude:
            runpy.run_path(prelude, run_name="sitecustomize")
        if argv[0] == "-m":  # as python -m: the working directory first on the path
            sys.argv = [argv[1], *argv[2:]]
            sys.path.insert(0, cwd)
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, str(Path(argv[0]).parent))
            runpy.run_path(argv[0], run_name="__main__")  # SystemExit's code is the exit status
    finally:
        if exit_funcs:
            atexit._run_exitfuncs()


class _ChildFd:
    """One of this process's file descriptors, sent to the process the forkserver forks."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return (_detach, (reduction.DupFd(self.fd),))


def _detach(duplicate) -> int:
    """The forked process's copy of a ``_ChildFd``."""
    return duplicate.detach()


class PythonProcess:
    """``python ARGV`` (as ``run_python``) in a process of the forkserver, as ``subprocess.Popen(...,
    stdout=PIPE, stderr=PIPE, text=True)`` gives it: ``pid``, ``stdout``, ``stderr``,
    ``returncode``, ``poll``, ``wait``, ``terminate``, ``kill``, ``send_signal``,
    ``communicate``."""

    def __init__(
        self,
        argv: list[str | os.PathLike[str]],
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] = ".",
        prelude: str | os.PathLike[str] | None = None,
        stderr: bool = True,
    ) -> None:
        """``stderr=False``: the process's stderr to /dev/null (``self.stderr`` reads nothing)."""
        self.args = [sys.executable, *map(str, argv)]
        env = dict(os.environ if env is None else env)
        pipes = [os.pipe() for _ in range(2)]
        sent = (_ChildFd(pipes[0][1]), _ChildFd(pipes[1][1]) if stderr else None)
        self._process = context().Process(
            target=_become_python,
            args=(
                self.args[1:],
                env,
                os.path.abspath(cwd),
                list(sent),
                str(prelude or ""),
                True,
            ),
        )
        try:
            self._process.start()
        finally:
            for _, w in pipes:
                os.close(w)
        self.stdout, self.stderr = (open(r, encoding="utf-8", errors="replace") for r, _ in pipes)  # noqa: SIM115
        self.pid = self._process.pid
        self._read: dict[str, str] = {}
        self._readers: list[threading.Thread] = []

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """The rest of stdout and stderr, once the process exited."""
        if not self._readers:  # one reader a stream, for every call
            self._readers = [
                threading.Thread(target=self._read_all, args=(name,), daemon=True)
                for name in ("stdout", "stderr")
            ]
            for reader in self._readers:
                reader.start()
        for reader in self._readers:
            reader.join(timeout)
        if any(r.is_alive() for r in self._readers):
            raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(timeout)
        return self._read["stdout"], self._read["stderr"]

    def _read_all(self, name: str) -> None:
        """Read one stream to its end."""
        stream = getattr(self, name)
        self._read[name] = stream.read()
        stream.close()


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
