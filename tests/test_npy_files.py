"""Tables and profiles opened from many threads at once: numpy's header parser never races."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from tiered_store.npy_files import read_npy_header
from tiered_store.profile import FrequencyProfile
from tiered_store.table_format import check_table

from .conftest import make_table


class _CycleWithFinalizer:
    """Cyclic garbage whose finalizer runs Python code: the collector can switch threads in it."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        sum(range(50))


def _in_threads(work, threads: int = 4, seconds: float = 1.5) -> list[BaseException]:
    """Run ``work`` in a loop in ``threads`` threads, making cyclic garbage; the errors raised."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for _ in range(5):
                _CycleWithFinalizer()
            try:
                work()
            except BaseException as exc:  # noqa: BLE001  (what the test reports)
                errors.append(exc)
                return

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        pool = [threading.Thread(target=loop) for _ in range(threads)]
        for t in pool:
            t.start()
        stop.wait(seconds)
        stop.set()
        for t in pool:
            t.join()
    finally:
        sys.setswitchinterval(old)
    return errors


def test_tables_checked_from_many_threads_at_once(tmp_path):
    """check_table in four threads (serve's reload, scrub and request threads do this) never fails
    with CPython 3.11's "AST constructor recursion depth mismatch"."""
    path, _ = make_table(tmp_path, rows=64, dim=4)
    assert _in_threads(lambda: check_table(path)) == []


def test_profiles_loaded_from_many_threads_at_once(tmp_path):
    """FrequencyProfile.load (an .npz: a header per member) in four threads never fails."""
    profile = FrequencyProfile(np.arange(10), np.arange(10, 0, -1), rows=100)
    path = tmp_path / "p.profile.npz"
    profile.save(path)
    assert _in_threads(lambda: FrequencyProfile.load(path)) == []


def test_an_npy_of_another_format_version_is_refused_naming_the_versions_read(tmp_path):
    """A version 3.0 header said only "unsupported .npy format version (3, 0)", not which it reads."""
    path = tmp_path / "v3.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.zeros((2, 3), np.float32), version=(3, 0))
    with open(path, "rb") as f, pytest.raises(ValueError) as err:
        read_npy_header(f)
    assert str(err.value) == "unsupported .npy format version 3.0; expected 1.0 or 2.0"


def test_a_fifo_named_as_an_npy_is_refused_not_waited_on(tmp_path):
    """np.load opened a FIFO at an .npy's path and waited for a writer forever: trace_from_npy
    (and every other reader of row-id or profile files) hung; it is the ValueError they report."""
    import os

    from tiered_store.errors import TraceFormatError
    from tiered_store.npy_files import load_npy
    from tiered_store.trace import trace_from_npy

    fifo = tmp_path / "ids.npy"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def read() -> None:
        for call in (lambda: load_npy(fifo), lambda: trace_from_npy(fifo, tmp_path / "t.trace")):
            try:
                call()
            except BaseException as exc:  # noqa: BLE001  (what the test reports)
                errors.append(exc)

    worker = threading.Thread(target=read, daemon=True)  # blocked: fails the test, not the run
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "a read of the FIFO waited for a writer"
    assert [type(e) for e in errors] == [ValueError, TraceFormatError]
    assert str(errors[0]) == "it is a FIFO (named pipe); expected an .npy or .npz file"
    assert f"{fifo}: not a readable .npy (it is a FIFO" in str(errors[1])
