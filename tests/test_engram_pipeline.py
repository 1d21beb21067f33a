"""The prefetch pipeline: same outputs as a plain forward, fetches started ahead in the right
order, handles consumed once, stall and lookup time accounted, warm start from a profile."""

from __future__ import annotations

import gc
import time
import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.test_engram_model import STORE, TEXT, TINY
from tiered_store.engram import NgramHasher, TableBackend
from tiered_store.engram.checkpoint import open_tables, save_tiered
from tiered_store.engram.model import EngramLM, ModelConfig
from tiered_store.engram.pipeline import (
    DecodeStats,
    PrefetchPipeline,
    _pinned_host_ids,
    profile_rows,
    table_stats_delta,
)
from tiered_store.errors import ConfigError, RowIdError


@pytest.fixture(scope="module")
def model() -> EngramLM:
    config = ModelConfig.from_dict(TINY)
    torch.manual_seed(0)
    return EngramLM(config, hasher=NgramHasher(config.engram)).eval()


@pytest.fixture(scope="module")
def batches(model) -> list[torch.Tensor]:
    ids = np.tile(model.hasher.tokenizer.encode(TEXT), 40)
    return [torch.from_numpy(ids[i * 64 : (i + 1) * 64].reshape(2, 32).copy()) for i in range(6)]


@pytest.fixture(scope="module")
def random_batches() -> list[torch.Tensor]:
    """Random token ids: every batch starts differently and misses the caches."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 100_000, (2, 32), generator=gen) for _ in range(6)]


@pytest.fixture(scope="module")
def want(model, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(ids, logits="last") for ids in batches]


@pytest.fixture
def stores(model, tmp_path):
    memory = model.tables
    converted = save_tiered(model, tmp_path)
    opened = open_tables(converted.table_paths, model.hasher, STORE)
    model.set_tables(opened)
    yield opened
    model.set_tables(memory)
    for store in opened.values():
        store.close()


class RecordingTable(TableBackend):
    """A table (not a module, like the tiered store) that logs prefetch and lookup calls."""

    def __init__(self, weight: torch.Tensor, log: list, name: int) -> None:
        self.weight, self.rows, self.dim = weight, weight.shape[0], weight.shape[1]
        self.log, self.name = log, name

    def prefetch(self, row_ids: torch.Tensor) -> object:
        self.log.append(("prefetch", self.name, int(row_ids[0, 0, 0])))
        return ("handle", int(row_ids[0, 0, 0]))

    def lookup(self, row_ids: torch.Tensor, handle: object | None = None) -> torch.Tensor:
        assert handle == ("handle", int(row_ids[0, 0, 0]))  # its own batch's prefetch
        self.log.append(("lookup", self.name, int(row_ids[0, 0, 0])))
        return self.weight[row_ids]


@pytest.mark.parametrize(("lookahead", "prefetch"), [(0, True), (1, True), (2, True), (1, False)])
def test_pipeline_outputs_match_plain_forward(model, batches, want, stores, lookahead, prefetch):
    pipeline = PrefetchPipeline(model, lookahead=lookahead, prefetch=prefetch)
    outs = [out for _, out in pipeline.run(batches)]
    assert all(torch.equal(a, b) for a, b in zip(outs, want, strict=True))
    stats = pipeline.stats
    assert stats.batches == len(batches) and stats.tokens == sum(b.numel() for b in batches)
    assert stats.seconds == pytest.approx(
        stats.source_seconds + stats.prepare_seconds + stats.forward_seconds
    )
    for layer, store in stores.items():
        s = stats.tables[layer]
        assert s["lookup"]["calls"] == len(batches)  # one lookup per layer per batch
        assert s["prefetch"]["handles"] == (len(batches) if prefetch else 0)
        assert (
            s["hot"]["lookups"] == sum(b.numel() for b in batches) * model.config.engram.num_heads
        )
        assert 0 <= s["hot"]["hit_rate"] <= 1 and store.stats()["prefetch"]["handles"] >= 0
    assert stats.stall_seconds <= stats.lookup_seconds


def test_a_forward_of_the_ids_a_batch_hashed_does_not_compare_them_again(
    model, batches, monkeypatch
):
    """The pipeline calls the model with the batch's own ids (the copy it hashed), which were
    checked and compared with themselves once more per batch: for ids on a GPU, two copies to
    the host that wait for it. They are trusted; other ids, a refilled buffer, still refused."""
    checked = []
    check = model._check_input
    monkeypatch.setattr(
        model, "_check_input", lambda ids, *name: checked.append(ids) or check(ids, *name)
    )
    for lookahead in (0, 1):
        checked.clear()
        outs = [out for _, out in PrefetchPipeline(model, lookahead=lookahead).run(batches[:3])]
        assert len(outs) == 3 and len(checked) == 3  # once per batch, by hash
    checked.clear()
    PrefetchPipeline(model).decode(batches[0], prompt=28)
    assert len(checked) == 1  # the tokens, once: not each step's again (nor the prompt's)
    batch = model.hash(batches[0])
    with pytest.raises(ConfigError, match="made for other input_ids"):
        model(batches[1], prefetched=batch)
    buffer = batches[0].clone()
    batch = model.hash(buffer)
    buffer[0, 0] += 1  # refilled since it was hashed
    with pytest.raises(ConfigError, match="made for other input_ids"):
        model(buffer, prefetched=batch)


def test_a_batch_read_ahead_is_copied_once(model, batches):
    """With lookahead the pipeline cloned each batch, then hash copied the clone again (they
    share memory); hash's copy alone keeps a refilled buffer from changing the batch."""
    buffer = batches[0].clone()
    (batch, _), *_ = PrefetchPipeline(model, lookahead=1).run([buffer, batches[1]])
    assert batch.given is buffer  # no copy of the pipeline's: hash made the batch's own
    assert batch.input_ids.data_ptr() != buffer.data_ptr()
    assert torch.equal(batch.input_ids, batches[0])


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda_model() -> EngramLM:
    """The ``model`` fixture's model on the GPU."""
    config = ModelConfig.from_dict(TINY)
    torch.manual_seed(0)
    return EngramLM(config, hasher=NgramHasher(config.engram)).eval().cuda()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_batch_for_the_gpu_is_pinned_once(batches):
    """On CUDA the pipeline pins each batch of CPU ids (the copy to the GPU is then
    asynchronous), then hash made a second pinned copy of that one; it is kept. A source's
    pinned buffer (pin_memory gives it back as it is) is still copied: it may be refilled."""
    config = ModelConfig.from_dict(TINY)
    torch.manual_seed(0)
    model = EngramLM(config, hasher=NgramHasher(config.engram)).eval().cuda()
    with torch.no_grad():
        want = [model(ids.cuda(), logits="last") for ids in batches]
    pipeline = PrefetchPipeline(model, lookahead=1)
    for batch, _ in pipeline.run(batches):
        assert batch.input_ids is batch.given and batch.input_ids.is_pinned()
    buffer = torch.empty_like(batches[0]).pin_memory()

    def refilled():
        for ids in batches:
            buffer[:] = ids
            yield buffer

    outs = []
    for batch, out in pipeline.run(refilled()):
        assert batch.input_ids.is_pinned() and batch.input_ids.data_ptr() != buffer.data_ptr()
        outs.append(out)
    assert all(torch.equal(a, b) for a, b in zip(outs, want, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_batch_of_int32_ids_for_the_gpu_is_pinned_as_int64(batches):
    """On CUDA the pipeline pinned a batch of int32 CPU ids, then hash converted the pinned copy
    to an int64 copy that was not pinned, so the model's copy to the GPU was synchronous; the
    ids are converted into the pinned copy, and the int64 ids the batch keeps are the pinned ones."""
    model = cuda_model()
    with torch.no_grad():
        want = [model(ids.cuda(), logits="last") for ids in batches]
    pipeline = PrefetchPipeline(model, lookahead=1)
    outs = []
    for batch, out in pipeline.run(ids.int() for ids in batches):
        assert batch.input_ids.dtype == torch.int64 and batch.input_ids.is_pinned()
        outs.append(out)
    assert all(torch.equal(a, b) for a, b in zip(outs, want, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_int32_ids_hashed_outside_the_pipeline_are_kept_pinned_as_int64(batches):
    """On CUDA, model.hash or prefetch of pinned int32 ids (outside the pipeline) kept an int64
    copy that was not pinned, so the forward's copy to the GPU was synchronous; they are
    converted into one pinned copy, the batch's own, and the logits are those of int64 ids."""
    model = cuda_model()
    with torch.no_grad():
        want = model(batches[0].cuda(), logits="last")
    for make in (model.hash, model.prefetch):
        buffer = batches[0].int().pin_memory()
        batch = make(buffer)
        assert batch.input_ids.dtype == torch.int64 and batch.input_ids.is_pinned()
        assert batch.input_ids.data_ptr() != buffer.data_ptr()
        assert batch.token_mask.is_pinned()
        with torch.no_grad():
            got = model(buffer, prefetched=batch, logits="last")
        buffer.fill_(0)  # refilled once the forward ran: the batch keeps its own
        assert torch.equal(got, want) and torch.equal(batch.input_ids, batches[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_callers_unpinned_mask_with_pinned_ids_is_pinned_once(batches):
    """On CUDA a caller's own unpinned CPU token_mask (a tensor, an array or a list) given with
    pinned ids stayed unpinned, so V4.1 layers copied it to the GPU synchronously on every
    forward; the batch keeps one pinned copy of it, its own."""
    model = cuda_model()
    ids = batches[0].pin_memory()
    given = torch.ones(ids.shape, dtype=torch.bool)
    given[0, -1] = False
    for mask in (given, given.numpy(), given.tolist()):
        batch = model.hash(ids, token_mask=mask)
        assert batch.token_mask.is_pinned() and torch.equal(batch.token_mask, given)
        if isinstance(mask, torch.Tensor):
            assert batch.token_mask.data_ptr() != mask.data_ptr()
    pinned = given.pin_memory()  # pinned already: copied, pinned, as before
    batch = model.hash(ids, token_mask=pinned)
    assert batch.token_mask.is_pinned() and batch.token_mask.data_ptr() != pinned.data_ptr()


@pytest.mark.parametrize("kind", ["int32 array", "int64 array", "list", "tensor"])
def test_host_ids_of_every_kind_are_chosen_for_pinning(model, batches, kind):
    """On CUDA the pipeline pinned only torch CPU tensors: a source of NumPy arrays or lists
    went unpinned, so the model's copy of their ids to the GPU was synchronous; the ids are
    checked first (an int64 tensor, whatever was given) and host ids not pinned are pinned."""
    ids = batches[0]
    given = {
        "int32 array": ids.numpy().astype(np.int32),
        "int64 array": ids.numpy(),
        "list": ids.tolist(),
        "tensor": ids,
    }[kind]
    chosen, own = _pinned_host_ids(model, given, pin_memory=False)  # no CUDA here
    assert own and chosen.dtype == torch.int64 and torch.equal(chosen, ids)
    if kind != "list":  # the pipeline's own copy: the source may refill its buffer
        assert not np.may_share_memory(chosen.numpy(), np.asarray(given))
    on_a_device = torch.empty(2, 3, dtype=torch.int64, device="meta")  # as CUDA ids: not read
    assert _pinned_host_ids(model, on_a_device) == (None, False)


class _Copies(TorchDispatchMode):
    """Counts the copies torch makes of tensors (a conversion, a clone, a pinning)."""

    COPIES = ("_to_copy", "copy_", "clone", "_pin_memory")

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket.__name__ in self.COPIES
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_host_ids_for_the_gpu_are_converted_in_their_pinned_copy(model, batches, dtype):
    """For a model on the GPU the pipeline converted int32 host ids to int64 (a copy), then
    pinned that (a second copy); they are converted as they are copied into the pinned buffer:
    one copy. (Here, without CUDA, an unpinned one.)"""
    ids = batches[0] % 200  # in uint8's range
    given = ids.to(dtype)
    with _Copies() as copies:
        chosen, own = _pinned_host_ids(model, given, pin_memory=False)
    assert copies.calls == 1 and own
    assert chosen.dtype == torch.int64 and torch.equal(chosen, ids)
    with _Copies() as copies:  # an array: no copy of its own either
        chosen, own = _pinned_host_ids(model, given.numpy(), pin_memory=False)
    assert copies.calls == 1 and own and torch.equal(chosen, ids)
    with pytest.raises(RowIdError, match=r"^batches\[2\]: token id -1 at index \(0, 1\)"):
        bad = torch.tensor([[0, -1]], dtype=torch.int8)
        _pinned_host_ids(model, bad, "batches[2]", pin_memory=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int32_host_ids_for_the_gpu_are_pinned_in_one_copy(batches):
    """On CUDA int32 host ids (pinned or not) were converted to int64, then pinned: two copies
    of every batch; they are converted into the pinned copy, and the pipeline's output is the
    one of int64 ids on the GPU."""
    model = cuda_model()
    for given in (batches[0].int(), batches[0].int().pin_memory(), batches[0].int().numpy()):
        with _Copies() as copies:
            chosen, own = _pinned_host_ids(model, given)
        assert copies.calls == 1 and own and chosen.is_pinned() and chosen.dtype == torch.int64
        assert torch.equal(chosen, batches[0])
    with torch.no_grad():
        want = [model(ids.cuda(), logits="last") for ids in batches]
    pipeline = PrefetchPipeline(model, lookahead=1)
    outs = [out for _, out in pipeline.run(ids.int() for ids in batches)]
    assert all(torch.equal(a, b) for a, b in zip(outs, want, strict=True))


class _CountedChecks:
    """Counts a model's checks of token ids (``_check_input``) while it is entered."""

    def __init__(self, model: EngramLM) -> None:
        self.model, self.calls = model, 0

    def __enter__(self) -> _CountedChecks:
        check = self.model._check_input

        def counted(*args, **kwargs):
            self.calls += 1
            return check(*args, **kwargs)

        self.model._check_input = counted
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model._check_input


def test_host_ids_chosen_for_pinning_are_checked_once(model, batches):
    """For a model on the GPU the pipeline checked a batch's host ids to choose them for
    pinning, then hash checked them again (the whole batch read twice). The checked ids are
    hashed as they are: one check a batch."""
    ids = batches[0]
    with _CountedChecks(model) as checks:
        checked, own = _pinned_host_ids(model, ids.numpy().astype(np.int32), pin_memory=False)
        batch = model._hash(checked, owned=True, checked=checked)
    assert checks.calls == 1 and batch.input_ids is checked and torch.equal(checked, ids)
    with _CountedChecks(model) as checks:
        assert model.hash(ids).input_ids.equal(ids)
    assert checks.calls == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_batch_of_host_ids_for_the_gpu_is_checked_once(batches):
    """On CUDA each batch of host ids, pinned or not, is checked once on its way through the
    pipeline (to choose it for pinning), not again when it is hashed."""
    model = cuda_model()
    pipeline = PrefetchPipeline(model, lookahead=1)
    pinned = [ids.pin_memory() for ids in batches]
    for source in (batches, [ids.numpy() for ids in batches], pinned):
        with _CountedChecks(model) as checks:
            assert len(list(pipeline.run(source))) == len(batches)
        assert checks.calls == len(batches)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_batch_of_numpy_or_list_ids_for_the_gpu_is_pinned(batches):
    """The pinning of host ids of any kind, on the GPU: each batch keeps pinned int64 ids (and
    a pinned token mask, which V4.1 layers copy there), and the outputs are a plain run's."""
    model = cuda_model()
    with torch.no_grad():
        want = [model(ids.cuda(), logits="last") for ids in batches]
    pipeline = PrefetchPipeline(model, lookahead=1)
    for source in ([ids.numpy() for ids in batches], [ids.tolist() for ids in batches]):
        outs = []
        for batch, out in pipeline.run(source):
            assert batch.input_ids.dtype == torch.int64 and batch.input_ids.is_pinned()
            assert batch.token_mask.is_pinned()
            outs.append(out)
        assert all(torch.equal(a, b) for a, b in zip(outs, want, strict=True))


@pytest.mark.parametrize("lookahead", [0, 1])
def test_the_wait_for_the_source_is_not_counted_as_preparing(model, batches, lookahead):
    """prepare_seconds, documented as hashing and prefetch submission, counted the wait for the
    source's next batch too (a slow reader looked like slow hashing); it is source_seconds."""
    pause = 0.2

    def slow():
        for ids in batches[:3]:
            time.sleep(pause)  # a reader, a tokeniser
            yield ids

    pipeline = PrefetchPipeline(model, lookahead=lookahead)
    assert len(list(pipeline.run(slow()))) == 3
    stats = pipeline.stats
    assert stats.source_seconds >= 3 * pause > stats.prepare_seconds
    assert stats.seconds == pytest.approx(
        stats.source_seconds + stats.prepare_seconds + stats.forward_seconds
    )


@pytest.mark.parametrize("lookahead", [0, 1])
def test_the_wait_for_a_source_that_fails_is_counted_as_the_source(model, batches, lookahead):
    """A source that raised after a wait (a reader timing out) had that wait counted as
    preparing (with lookahead) or not at all (without): it is source_seconds."""
    pause = 0.2

    def failing():
        yield batches[0]
        time.sleep(pause)  # a read that times out
        raise OSError("the reader went away")

    pipeline = PrefetchPipeline(model, lookahead=lookahead)
    with pytest.raises(OSError, match="went away"):
        list(pipeline.run(failing()))
    stats = pipeline.stats
    assert stats.batches == 1 and stats.source_seconds >= pause > stats.prepare_seconds


@pytest.mark.parametrize("lookahead", [1, 2])
def test_a_source_refilling_one_buffer_gives_each_batch_its_own_tokens(
    model, batches, want, stores, lookahead
):
    def refilled(kind):
        buffer = torch.empty_like(batches[0]) if kind == "torch" else np.empty((2, 32), np.int64)
        for ids in batches:
            buffer[:] = ids if kind == "torch" else ids.numpy()
            yield buffer

    for kind in ("torch", "numpy"):
        pipeline = PrefetchPipeline(model, lookahead=lookahead)
        outs = [out for _, out in pipeline.run(refilled(kind))]
        assert all(torch.equal(a, b) for a, b in zip(outs, want, strict=True)), kind


class Wrapped:
    """Token ids behind ``__array__`` (a reader's batch object): NumPy reads its buffer as is."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.array


def refilled_buffer(kind: str) -> tuple[object, object]:
    """A source's one buffer of ``kind`` [2, 32] and the function that refills it in place."""
    if kind == "list":  # nested lists, each row refilled in place
        rows = [[0] * 32, [0] * 32]

        def refill(ids: torch.Tensor) -> None:
            for row, values in zip(rows, ids.tolist(), strict=True):
                row[:] = values

        return rows, refill
    if kind in ("numpy", "fortran", "memoryview", "wrapped"):
        array = np.empty((2, 32), np.int64, order="F" if kind == "fortran" else "C")
        given = {"memoryview": memoryview, "wrapped": Wrapped}.get(kind, lambda a: a)(array)
        return given, lambda ids: array.__setitem__(slice(None), ids.numpy())
    if kind == "from_numpy":  # a tensor over a NumPy buffer, refilled through NumPy
        array = np.empty((2, 32), np.int64)
        return torch.from_numpy(array), lambda ids: array.__setitem__(slice(None), ids.numpy())
    if kind == "shared":  # one batch of a ring's storage, refilled through the whole ring
        ring = torch.zeros(3, 2, 32, dtype=torch.int64)
        return ring[1], lambda ids: ring.view(-1)[64:128].copy_(ids.view(-1))
    shape = (32, 2) if "transposed" in kind else (2, 32)
    dtype = torch.int32 if kind == "int32" else torch.int64
    buffer = torch.zeros(shape, dtype=dtype, device="cuda" if kind == "cuda" else "cpu")
    if "pinned" in kind:
        buffer = buffer.pin_memory()
    if "transposed" in kind:
        buffer = buffer.t()  # a non-contiguous view
    return buffer, lambda ids: buffer.copy_(ids)


@pytest.mark.parametrize(
    "kind",
    [
        *("torch", "numpy", "list", "transposed", "shared", "int32", "from_numpy"),
        *("memoryview", "wrapped", "fortran"),
        *(
            pytest.param(kind, marks=[pytest.mark.gpu, NEEDS_CUDA])
            for kind in ("torch on cuda", "pinned", "pinned transposed", "cuda")
        ),
    ],
)
def test_a_refilled_buffer_of_any_kind_gives_the_outputs_of_a_run_without_lookahead(
    model, batches, kind
):
    """A source refilling one buffer (of each kind a source may yield) while its batches are
    read ahead, hashed and looked up later: the outputs of a run with lookahead 0 (each batch
    runs before the buffer is refilled), and each batch keeps the ids it was read with."""
    if kind in ("torch on cuda", "pinned", "pinned transposed", "cuda"):
        model = cuda_model()
    runs = []
    for lookahead in (0, 1, 2):
        buffer, refill = refilled_buffer(kind)

        def source(buffer=buffer, refill=refill):
            for ids in batches:
                refill(ids.to(buffer.device) if isinstance(buffer, torch.Tensor) else ids)
                yield buffer

        runs.append(list(PrefetchPipeline(model, lookahead=lookahead).run(source())))
    for run in runs:
        assert all(
            torch.equal(b.input_ids.cpu(), ids) for (b, _), ids in zip(run, batches, strict=True)
        )
        assert all(torch.equal(out, want) for (_, out), (_, want) in zip(run, runs[0], strict=True))


@pytest.mark.parametrize("lookahead", [0, 1, 2])
def test_a_batch_that_fails_ahead_comes_after_the_batches_before_it(
    model, batches, want, lookahead
):
    """A batch prepared ahead (lookahead) that fails (bad ids, a source that raises) raised
    before the batches queued before it were computed: their outputs were lost, as they are
    not without lookahead. Each comes out first, then the failure."""
    bad = torch.full((2, 32), 10**7)

    def source(fail):
        yield from batches[:2]
        if fail == "source":
            raise OSError("the corpus went away")
        yield bad
        yield batches[2]  # never read: the run ends at the failure

    for fail, error in (("ids", "outside the tokenizer vocabulary"), ("source", "went away")):
        outs = []
        with pytest.raises(Exception, match=error):
            for _, out in PrefetchPipeline(model, lookahead=lookahead).run(source(fail)):
                outs.append(out)
        assert len(outs) == 2 and all(torch.equal(a, b) for a, b in zip(outs, want, strict=False))


class Staged:
    """A prefetch handle: rows staged for one lookup (on CUDA, device memory)."""


class FailingTable(TableBackend):
    """A table whose prefetch handles are watched (weak references) and whose lookup of one
    batch fails."""

    def __init__(
        self, weight: torch.Tensor, staged: list, fail_at: int, pause: float = 0.0
    ) -> None:
        self.weight, self.rows, self.dim = weight, weight.shape[0], weight.shape[1]
        self.staged, self.fail_at, self.lookups, self.pause = staged, fail_at, 0, pause

    def prefetch(self, row_ids: torch.Tensor) -> object:
        handle = Staged()
        self.staged.append(weakref.ref(handle))
        return handle

    def lookup(self, row_ids: torch.Tensor, handle: object | None = None) -> torch.Tensor:
        self.lookups += 1
        if self.lookups == self.fail_at:
            time.sleep(self.pause)  # a read that times out
            raise OSError("the disk went away")
        return self.weight[row_ids]


@pytest.mark.parametrize("lookahead", [0, 1])
def test_a_failed_forward_is_counted_in_the_run_s_seconds(model, batches, lookahead):
    """The forward that failed was left out of forward_seconds, so of seconds (the run's wall
    time): a read that timed out before failing looked like no time at all."""
    pause = 0.2
    memory = model.tables
    model.set_tables({i: FailingTable(t.weight, [], 2, pause) for i, t in memory.items()})
    pipeline = PrefetchPipeline(model, lookahead=lookahead)
    try:
        with pytest.raises(OSError, match="went away"):
            list(pipeline.run(batches))
    finally:
        model.set_tables(memory)
    stats = pipeline.stats
    assert stats.batches == 1 and stats.forward_seconds >= pause


def test_a_run_ended_by_a_failed_forward_keeps_no_batch_read_ahead(model, batches):
    """The batches read ahead of one whose forward failed stayed in the run's frame, which the
    error's traceback keeps: a caller keeping the error (a log, a REPL's last error) kept every
    table's staged rows of ``lookahead`` batches, on CUDA device memory, for nothing."""
    memory = model.tables
    staged: dict[int, list] = {layer: [] for layer in memory}
    model.set_tables({i: FailingTable(t.weight, staged[i], 2) for i, t in memory.items()})
    try:
        with pytest.raises(OSError, match="went away") as failed:
            for _ in PrefetchPipeline(model, lookahead=2).run(batches):
                pass
    finally:
        model.set_tables(memory)
    gc.collect()
    assert failed.value is not None and all(len(refs) == 4 for refs in staged.values())
    assert all(ref() is None for refs in staged.values() for ref in refs[2:])  # read ahead


@pytest.mark.parametrize("lookahead", [0, 1])
def test_a_none_among_the_batches_is_refused_not_the_end_of_the_run(model, batches, lookahead):
    """A source that yielded None (a reader's failure, say) ended the run there, silently: the
    batches after it were never computed and nothing said so."""
    outs = []
    with pytest.raises(RowIdError, match=r"^batches\[1\]: None"):
        for _, out in PrefetchPipeline(model, lookahead=lookahead).run(
            [batches[0], None, *batches[1:3]]
        ):
            outs.append(out)
    assert len(outs) == 1


@pytest.mark.parametrize("lookahead", [0, 1])
def test_a_bad_batch_is_named_by_its_index_among_the_batches(model, batches, lookahead):
    """A batch of ids that are no [B, T] of token ids was refused as "input_ids: ...", an
    argument run does not have, naming no batch of the stream; the errors name batches[i]."""
    pipeline = PrefetchPipeline(model, lookahead=lookahead)
    for bad, error, said in (
        (batches[2][:, :0], ConfigError, r"expected shape \[B, T\] .* got \[2, 0\]"),
        (batches[2].float(), RowIdError, "expected integer token ids, got dtype"),
        (batches[2].tolist()[0], ConfigError, r"expected shape \[B, T\] .* got \[32\]"),
    ):
        outs = []
        with pytest.raises(error, match=r"^batches\[2\]: " + said):
            for _, out in pipeline.run([batches[0], batches[1], bad, batches[3]]):
                outs.append(out)
        assert len(outs) == 2


def test_profile_rows_names_a_bad_batch_by_its_index_among_the_batches(model, batches):
    """profile_rows refused a batch of ids that are no [B, T] of token ids as "input_ids: ...",
    an argument it does not have, naming no batch of the stream; as run's, the errors name
    batches[i]."""
    for bad, error, said in (
        (batches[2][:, :0], ConfigError, r"expected shape \[B, T\] .* got \[2, 0\]"),
        (batches[2].float(), RowIdError, "expected integer token ids, got dtype"),
        (None, RowIdError, "None"),
    ):
        with pytest.raises(error, match=r"^batches\[2\]: " + said):
            profile_rows(model, iter([batches[0], batches[1], bad, batches[3]]))


@pytest.mark.parametrize("lookahead", [0, 1, 2])
def test_fetches_start_ahead_in_order(model, random_batches, lookahead):
    batches = random_batches
    memory = model.tables
    log: list = []
    model.set_tables({i: RecordingTable(t.weight, log, i) for i, t in memory.items()})
    try:
        pipeline = PrefetchPipeline(model, lookahead=lookahead)
        for batch, _ in pipeline.run(batches[:4]):
            assert all(h is None for h in batch.handles.values())  # each consumed by its layer
    finally:
        model.set_tables(memory)
    first = {int(model.hash(b).row_ids[1][0, 0, 0]): i for i, b in enumerate(batches[:4])}
    events = [(kind, layer, first[key]) for kind, layer, key in log if layer == 1]
    for i in range(4):
        looked_up = events.index(("lookup", 1, i))
        fetched = {b for kind, _, b in events[:looked_up] if kind == "prefetch"}
        # before batch i computes, batches i .. i + lookahead have been prefetched, no more
        assert fetched == set(range(min(4, i + lookahead + 1)))
    # within a batch, every layer's fetch is started before the first layer computes
    assert log[:2] == [("prefetch", 1, log[0][2]), ("prefetch", 3, log[1][2])]


def test_stall_is_hidden_by_prefetch_and_exposed_without(
    model, random_batches, stores, monkeypatch
):
    delay = 0.05
    for store in stores.values():
        read = store.cold.read_rows

        def slow_read(ids, out=None, _read=read):
            time.sleep(delay)
            return _read(ids, out)

        monkeypatch.setattr(store.cold, "read_rows", slow_read)
    layer0 = model.layers[0].attn
    monkeypatch.setattr(layer0, "forward", _slowed(layer0.forward, 3 * delay))
    fresh = random_batches  # ids the caches have not seen: cold reads happen

    sync = PrefetchPipeline(model, prefetch=False)
    list(sync.run(fresh[:3]))
    assert sync.stats.stall_seconds == 0  # no handles: nothing to wait for ...
    assert sync.stats.lookup_seconds >= 2 * delay  # ... the lookups do the slow reads themselves

    ahead = PrefetchPipeline(model, lookahead=1)
    list(ahead.run(fresh[3:]))
    read_rows = sum(s["cold"]["read_requests"] for s in ahead.stats.tables.values())
    assert read_rows > 0
    assert ahead.stats.stall_seconds <= ahead.stats.lookup_seconds
    assert ahead.stats.lookup_seconds < sync.stats.lookup_seconds / 2  # reads overlapped compute
    waited = sum(s["prefetch"]["wait_seconds_total"] for s in ahead.stats.tables.values())
    assert ahead.stats.stall_seconds == pytest.approx(waited)


def _slowed(fn, seconds):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return slow


def test_warm_start_from_a_profile(model, batches, tmp_path):
    memory = model.tables
    converted = save_tiered(model, tmp_path)
    hottest = profile_rows(model, batches)
    for layer, rows in hottest.items():
        assert (
            rows.ndim == 1 and len(np.unique(rows)) == len(rows) and rows.max() < memory[layer].rows
        )
    stores = open_tables(converted.table_paths, model.hasher, STORE, warm_start=hottest)
    try:
        for layer, store in stores.items():
            stats = store.stats()
            assert stats["hot"]["preloaded"] == min(300, len(hottest[layer]))
            assert stats["warm"]["preloaded"] == min(store.warm.capacity, len(hottest[layer]))
        model.set_tables(stores)
        pipeline = PrefetchPipeline(model)
        list(pipeline.run(batches[:2]))
        for s in pipeline.stats.tables.values():  # the profiled text itself: every row is cached
            assert s["cold"]["rows_read"] == 0
    finally:
        model.set_tables(memory)
        for store in stores.values():
            store.close()


def test_a_table_first_written_during_the_run_reports_its_writes(model, batches, stores):
    store = stores[1]
    assert "writes" not in store.stats()  # the section appears with the first write
    pipeline = PrefetchPipeline(model, lookahead=1)
    for i, _ in enumerate(pipeline.run(batches[:3])):
        if i == 0:  # e.g. a trainer writing updated rows back between batches
            store.write([5], torch.zeros(1, store.dim))
            store.commit()
    assert pipeline.stats.tables[1]["writes"]["rows_written"] == 1
    assert "writes" not in pipeline.stats.tables[3]


def test_stats_delta_and_bad_arguments(model):
    before = {
        "hot": {"lookups": 10, "hits": 5, "capacity": 9, "occupancy": 3},
        "prefetch": {"handles": 1},
    }
    after = {
        "hot": {"lookups": 30, "hits": 20, "capacity": 9, "occupancy": 7},
        "prefetch": {"handles": 4},
    }
    delta = table_stats_delta(before, after)
    assert delta["hot"] == {
        "lookups": 20,
        "hits": 15,
        "capacity": 9,
        "occupancy": 7,
        "hit_rate": 0.75,
    }
    assert delta["prefetch"]["handles"] == 3
    # levels are reported as they are after, not as differences (which could go negative)
    before["writes"] = {"commits": 1, "dirty_rows": 50, "committed_step": 3}
    after["writes"] = {"commits": 2, "dirty_rows": 20, "committed_step": 4}
    before["queue"], after["queue"] = {"requests": 4, "rows": 900}, {"requests": 1, "rows": 30}
    delta = table_stats_delta(before, after)
    assert delta["writes"] == {"commits": 1, "dirty_rows": 20, "committed_step": 4}
    assert delta["queue"] == {"requests": 1, "rows": 30}
    assert table_stats_delta(None, None) == {}
    with pytest.raises(ConfigError, match="lookahead: expected an integer >= 0"):
        PrefetchPipeline(model, lookahead=-1)
    with pytest.raises(ConfigError, match="logits"):
        PrefetchPipeline(model, logits="first")


def test_layers_sharing_one_store_count_its_seconds_once(model, batches, tmp_path):
    """Engram layers over slices of one shared table (``TableSlice``, as training makes them) all
    report its store's statistics: a run summed them once per layer, so its lookup and stall
    seconds were the store's times the layers (here two), above the steps' own time in decode."""
    from tiered_store import TieredStore
    from tiered_store.delta.row_optimizers import make_row_optimizer
    from tiered_store.delta.trainable import TableSlice, TrainableTable, create_trainable_table

    memory = model.tables
    weights = [memory[layer].weight.detach().float().numpy() for layer in memory]
    sgd = make_row_optimizer("sgd", lr=1.0)
    create_trainable_table(tmp_path / "t.npy", np.concatenate(weights), sgd)
    shared = TrainableTable(TieredStore.open({"table": {"path": str(tmp_path / "t.npy")}}), sgd)
    offsets = np.cumsum([0, *[w.shape[0] for w in weights[:-1]]])
    slices = {
        layer: TableSlice(shared, int(offset), w.shape[0])
        for layer, offset, w in zip(memory, offsets, weights, strict=True)
    }
    model.set_tables(slices)
    try:
        before = shared.stats()
        pipeline = PrefetchPipeline(model, lookahead=1)
        for _ in pipeline.run(batches):
            pass
        after = shared.stats()
        _, steps = pipeline.decode(batches[0], prompt=24)
    finally:
        model.set_tables(memory)
        shared.close()
    run = pipeline.stats
    assert len(run.tables) == 2 and after["lookup"]["calls"] - before["lookup"]["calls"] == 12
    for section, key, summed in (
        ("lookup", "seconds_total", run.lookup_seconds),
        ("prefetch", "wait_seconds_total", run.stall_seconds),
    ):
        assert summed == pytest.approx(after[section][key] - before[section][key], abs=1e-9)
    decoded = next(iter(steps.tables.values()))  # the store's counters over the decode steps
    assert steps.lookup_seconds.sum() == pytest.approx(decoded["lookup"]["seconds_total"])
    assert steps.stall_seconds.sum() == pytest.approx(decoded["prefetch"]["wait_seconds_total"])


def test_decode_of_one_token_sequences_names_the_tokens_not_an_empty_range(model, batches):
    """Tokens of one per sequence leave no step to decode: the error said the prompt was
    expected "in [1, 0]", a range nothing is in."""
    pipeline = PrefetchPipeline(model)
    with pytest.raises(
        ConfigError, match=r"tokens: expected at least 2 per sequence .* got shape \[2, 1\]"
    ):
        pipeline.decode(batches[0][:, :1], prompt=1)
    with pytest.raises(ConfigError, match=r"prompt: expected an integer in \[1, 31\]"):
        pipeline.decode(batches[0], prompt=32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_of_tokens_on_the_gpu_keeps_its_hash_state_there(batches, monkeypatch):
    """decode made its HashState on the CPU for tokens on the GPU, where they are hashed: each
    step copied the look-back to the GPU and back (a wait for the device); it is made on the
    tokens' device, and the outputs are those of tokens on the CPU."""
    model = cuda_model()
    made, new_state = [], model.hasher.new_state
    monkeypatch.setattr(
        model.hasher, "new_state", lambda *a, **kw: made.append(new_state(*a, **kw)) or made[-1]
    )
    pipeline = PrefetchPipeline(model)
    outs, _ = pipeline.decode(batches[0].cuda(), prompt=24)
    assert [state.tail.device.type for state in made] == ["cuda"]
    want, _ = pipeline.decode(batches[0], prompt=24)
    for got, expected in zip(outs, want, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["tensor", "int32 array", "list"])
def test_decode_pins_host_tokens_for_a_model_on_the_gpu(batches, monkeypatch, kind):
    """decode gave a model on the GPU its host tokens unpinned (run pins each batch): every
    step's copy of its tokens there was synchronous. They are pinned once: every step's batch
    holds pinned ids and a pinned mask, and the outputs are those of tokens on the GPU."""
    model = cuda_model()
    tokens = batches[0]
    given = {
        "tensor": tokens,
        "int32 array": tokens.numpy().astype(np.int32),
        "list": tokens.tolist(),
    }[kind]
    seen, fetch = [], model.fetch
    monkeypatch.setattr(model, "fetch", lambda batch: seen.append(fetch(batch)) or seen[-1])
    pipeline = PrefetchPipeline(model)
    outs, _ = pipeline.decode(given, prompt=24)
    assert len(seen) == 1 + 8
    assert all(b.input_ids.is_pinned() and b.token_mask.is_pinned() for b in seen)
    assert all(b.input_ids.is_contiguous() for b in seen)  # copied there asynchronously
    monkeypatch.undo()
    want, _ = pipeline.decode(tokens.cuda(), prompt=24)
    for got, expected in zip(outs, want, strict=True):
        torch.testing.assert_close(got, expected)


def test_decode_steps_hold_their_own_copy_of_the_callers_tokens(model, batches, monkeypatch):
    """Every batch decode hashes holds its own copy of the caller's tokens (not their memory,
    which the caller may refill), though the steps' tokens are checked once, by decode."""
    tokens = batches[0]
    want, _ = PrefetchPipeline(model).decode(tokens, prompt=24)
    seen, fetch = [], model.fetch
    monkeypatch.setattr(model, "fetch", lambda batch: seen.append(fetch(batch)) or seen[-1])
    got, _ = PrefetchPipeline(model).decode(tokens, prompt=24)
    assert len(seen) == 1 + 8
    shared = tokens.untyped_storage().data_ptr()
    assert all(b.input_ids.untyped_storage().data_ptr() != shared for b in seen)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_decode_names_its_tokens_argument_in_errors_about_them(model, batches):
    """decode refused tokens that are no [B, T] of token ids as "input_ids: ...", an argument it
    does not have; the errors name tokens."""
    pipeline = PrefetchPipeline(model)
    with pytest.raises(ConfigError, match=r"^tokens: expected shape \[B, T\] .* got \[2, 0\]"):
        pipeline.decode(batches[0][:, :0], prompt=1)
    with pytest.raises(RowIdError, match=r"^tokens: expected integer token ids, got dtype"):
        pipeline.decode(batches[0].float(), prompt=1)
    with pytest.raises(RowIdError, match=r"^tokens: "):
        pipeline.decode(batches[0] + 10**7, prompt=1)


def test_a_numpy_or_torch_integer_prompt_and_lookahead_are_integers(model, batches):
    """decode(prompt=np.int64(16)) was refused as "expected an integer in [1, 31] ..., got
    np.int64(16)", an integer in that range, and so was a NumPy lookahead; they are taken as the
    int they hold (new_state takes them so too), a bool still refused."""
    tokens = batches[0][:, :20]
    want, _ = PrefetchPipeline(model).decode(tokens, prompt=16)
    for prompt in (np.int64(16), torch.tensor(16)):
        got, steps = PrefetchPipeline(model, lookahead=np.int64(1)).decode(tokens, prompt=prompt)
        assert steps.prompt_tokens == 16 and type(steps.prompt_tokens) is int
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ConfigError, match=r"prompt: expected an integer in \[1, 19\]"):
        PrefetchPipeline(model).decode(tokens, prompt=True)
    with pytest.raises(ConfigError, match="lookahead: expected an integer >= 0, got True"):
        PrefetchPipeline(model, lookahead=True)


def test_decode_stats_summary_of_no_steps_is_a_clear_error():
    empty = np.zeros(0)
    with pytest.raises(ConfigError, match=r"step_seconds is empty \(0 decode steps"):
        DecodeStats(2, 8, 0.1, empty, empty, empty, empty).summary()
    one = np.array([0.002])
    summary = DecodeStats(2, 8, 0.1, one, one / 4, one / 8, one / 16).summary()
    assert summary["steps"] == 1 and summary["stall_ms_p99"] == pytest.approx(0.125)
