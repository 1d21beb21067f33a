"""Shared fixtures: small real table files on disk."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from tiered_store.config import StoreConfig
from tiered_store.io_uring import IoUring
from tiered_store.manifest_checksum import manifest_crc32c
from tiered_store.table_format import create_table, read_manifest, table_paths


def make_table(tmp_path, rows: int = 5000, dim: int = 16, dtype: str = "float32", seed: int = 0):
    """Create a table file from a seeded array; returns (path, the array as a torch tensor)."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((rows, dim)).astype(np.float32)
    tensor = torch.from_numpy(data).to(getattr(torch, dtype))
    path = tmp_path / f"table_{rows}x{dim}_{dtype}.npy"
    create_table(path, tensor, progress=False)
    return path, tensor


def assert_sealed_manifest(npy: str | os.PathLike[str]) -> int:
    """Check that table ``npy``'s manifest file holds its own checksum, and that it is right."""
    doc = json.loads(table_paths(npy)[1].read_text())
    assert doc.get("manifest_crc32c") == manifest_crc32c(doc), (
        f"{npy}: {doc.get('manifest_crc32c')}"
    )
    assert read_manifest(npy).manifest_crc32c == doc["manifest_crc32c"]
    return doc["manifest_crc32c"]


def resealed_restart(body: bytes) -> bytes:
    """A warm-restart file's ``body`` followed by its CRC32C, as every restart format ends."""
    import crc32c

    return body + crc32c.crc32c(body).to_bytes(4, "little")


_PAUSED_ADDING_PAGE_CHECKSUMS = r"""
import sys, time
from pathlib import Path
import tiered_store.table_format as tf
_atomic_files = tf.atomic_files
def atomic_files(*args, **kwargs):  # its temporaries made (and locked): wait for the test
    files = _atomic_files(*args, **kwargs)
    Path(sys.argv[2]).touch()
    while not Path(sys.argv[3]).exists():
        time.sleep(0.01)
    return files
tf.atomic_files = atomic_files
tf.add_page_checksums(sys.argv[1], progress=False)
"""


@contextmanager
def paused_page_checksum_addition(table: Path, scratch: Path) -> Iterator[list[str]]:
    """``add_page_checksums(table)`` in another process, paused with its (locked) temporaries
    made: yields their names; on leaving, lets it go on and checks that it completed."""
    from tiered_store.serve.client import subprocess_env

    scratch.mkdir()
    script, paused, go = scratch / "add.py", scratch / "paused", scratch / "go"
    script.write_text(_PAUSED_ADDING_PAGE_CHECKSUMS)
    adding = subprocess.Popen(
        [sys.executable, str(script), str(table), str(paused), str(go)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert adding.poll() is None and time.monotonic() < deadline, adding.stderr.read()
            time.sleep(0.02)
        live = sorted(p.name for p in table.parent.glob(f".{table.name}*.tmp"))
        assert len(live) == 2, live  # its page checksum file's and its manifest's
        yield live
    finally:
        go.touch()
        _, err = adding.communicate(timeout=120)
    assert adding.returncode == 0, err[-2000:]
    assert not list(table.parent.glob(f".{table.name}*.tmp"))


def store_config(
    path, *, table: dict | None = None, prefetch: dict | None = None, **tiers
) -> StoreConfig:
    """A StoreConfig for ``path`` with per-tier overrides, e.g. hot={"capacity": 10}; ``table``
    and ``prefetch``: more of those sections, e.g. table={"out_of_range": "zero"}."""
    config = {"table": {"path": str(path), **(table or {})}, "tiers": tiers}
    if prefetch is not None:
        config["prefetch"] = prefetch
    return StoreConfig.from_dict(config)


@pytest.fixture
def table(tmp_path):
    return make_table(tmp_path)


@pytest.fixture(scope="session")
def email_analysis(tmp_path_factory) -> Path:
    """``tiered-store analyze --holdout 0.5 --shuffle`` of the email package, 60k tokens (about
    350k held-out lookups of layer 1, the rest in trace.trace), made once for the bench tests
    that only read an analysis (an analysis takes seconds at any of these sizes)."""
    from tests.bench_support import analyze

    return analyze(
        tmp_path_factory.mktemp("email") / "A", max_tokens=60000, holdout=0.5, shuffle=True
    )


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes of a file fail with EFBIG (RLIMIT_FSIZE, SIGXFSZ ignored)
    inside the block, as on a file system with a file-size limit; no root needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@contextmanager
def interrupted_once_waiting(future, release: threading.Event) -> Iterator[None]:
    """A real Ctrl-C (SIGINT to the main thread) once the main thread waits on ``future`` inside
    the block, which must raise KeyboardInterrupt; ``release`` is set on the way out (the hold
    the test put on the fetch ends)."""

    def interrupt() -> None:
        while not future._condition._waiters:
            release.wait(0.001)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    default = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        release.set()
        signal.signal(signal.SIGINT, default)


@contextmanager
def interrupted_reaps(
    in_batch: BaseException | type[BaseException] = KeyboardInterrupt,
    in_drain: BaseException | type[BaseException] | None = None,
    cut_short: bool = False,
) -> Iterator[list[int]]:
    """Inside the block an io_uring's second reap raises ``in_batch`` (an interrupt in the batch)
    and its third ``in_drain`` where given (one in its drain); with ``cut_short`` its drain raises
    KeyboardInterrupt as it is entered (a second Ctrl-C). Yields the count of reaps."""
    reap, calls = IoUring._reap, [0]

    def interrupted(self, results):
        calls[0] += 1
        if calls[0] == 2:  # in the batch
            raise in_batch
        if calls[0] == 3 and in_drain is not None:  # in its drain
            raise in_drain
        return reap(self, results)

    def drain_cut_short(self, *args):  # a second Ctrl-C, handled as the drain is entered
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(IoUring, "_reap", interrupted)
        if cut_short:
            patch.setattr(IoUring, "_drain", drain_cut_short)
        yield calls


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "golden"


def golden_dir(required_file: str = "engram_default.npz") -> Path:
    """The golden vectors: ``$TIERED_STORE_GOLDEN`` if set, else the repository's test data."""
    root = Path(os.environ.get("TIERED_STORE_GOLDEN") or GOLDEN_DIR)
    if not (root / required_file).exists():
        pytest.fail(
            f"golden vector file {root / required_file} is missing; expected the copy in {GOLDEN_DIR}"
        )
    return root


def assert_lookups_go_on_during(
    store, data: torch.Tensor, call, reached: threading.Event, go_on: threading.Event
) -> None:
    """Run ``call`` in a thread: once a hook in it set ``reached`` (and waits for ``go_on``), a
    lookup from another thread must finish, exact, before ``go_on`` lets ``call`` go on."""
    worker = threading.Thread(target=call)
    worker.start()
    ids, got = torch.tensor([1, 2, 3]), []
    looker = threading.Thread(target=lambda: got.append(store.lookup(ids)))
    try:
        assert reached.wait(30)
        looker.start()
        looker.join(10)
        assert got and torch.equal(got[0], data[ids])  # while ``call`` is held
    finally:
        go_on.set()
        worker.join()
        if looker.ident is not None:
            looker.join()


def assert_concurrent_lookups_exact(
    store, data: torch.Tensor, *, batch: int, rounds: int, threads: int = 4
) -> None:
    """``threads`` threads look up random ids at once; every result equals the table's rows."""
    errors = []

    def worker(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        try:
            for _ in range(rounds):
                ids = torch.randint(0, data.shape[0], (batch,), generator=gen)
                if not torch.equal(store.lookup(ids).cpu(), data[ids]):
                    errors.append(seed)
        except BaseException as exc:  # noqa: BLE001 (a lookup that raises fails the test too)
            errors.append(f"thread {seed}: {type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=worker, args=(s,)) for s in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []


def run_batch(cache, batch) -> torch.Tensor:
    """One batch through a RowCache as the store runs it (probe, record hits, admit the unique
    misses); returns the unique ids it missed."""
    ids = torch.as_tensor(batch, dtype=torch.int64).to(cache.device)
    cache.begin_batch()
    cache.observe(ids)
    slots = cache.probe(ids)
    cache.record(
        slots[slots >= 0], ids[slots < 0], lookups=ids.numel(), hits=int((slots >= 0).sum())
    )
    uniq, counts = torch.unique(ids[slots < 0], return_counts=True)
    cache.admit(uniq, counts)
    return uniq


def check_cache_invariants(cache) -> None:
    """A RowCache's index and slot owners agree; occupancy within capacity."""
    owners = cache.row_of_slot
    held = owners[owners >= 0]
    assert held.unique().numel() == held.numel(), "a row sits in two slots"
    if cache.index is not None:
        slot_of = cache.probe(torch.arange(cache.num_rows))
        resident = torch.nonzero(slot_of >= 0).squeeze(1)
        assert torch.equal(torch.sort(resident).values, torch.sort(held).values)
        assert torch.equal(owners[slot_of[resident]], resident)
    assert 0 <= cache.occupancy <= cache.capacity
    assert cache.occupancy == held.numel()
