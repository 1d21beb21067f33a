"""Issue 15: the re-pinning model, compressed corpus files, and trace export from the CLI."""

from __future__ import annotations

import gzip
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch

from policies.errors import PolicyError
from policies.pinned_lru import LOOKAHEAD_PASSES, pinned_lru_misses
from policies.repin import repinned_lru_misses
from tiered_store.cli import main
from tiered_store.corpus import read_text, resolve_corpus
from tiered_store.trace import TraceReader, TraceWriter


@pytest.fixture(scope="module")
def zipf_ids():
    """A Zipfian stream whose hot set drifts halfway through (ids 0..1999)."""
    rng = np.random.default_rng(0)
    ranks = np.minimum(rng.zipf(1.2, 200_000), 1000) - 1
    drifted = np.concatenate([ranks[:100_000], (ranks[100_000:] + 1000) % 2000])
    return drifted.astype(np.int64)


def test_repin_without_moves_equals_static_pinned_lru(zipf_ids):
    prior = np.zeros(2000)
    prior[:100] = np.arange(100, 0, -1)  # the first 100 rows, hottest first
    pinned = np.zeros(2000, np.bool_)
    pinned[:100] = True
    static = pinned_lru_misses(zipf_ids, pinned, lru_rows=50)
    frozen = repinned_lru_misses(zipf_ids, prior, 100, 50, interval=10_000, budget=0)
    assert frozen.misses == static
    assert frozen.repin_reads == 0


def test_repin_follows_a_drifting_hot_set_within_its_budget(zipf_ids):
    prior = np.zeros(2000)
    prior[:100] = np.arange(100, 0, -1)
    late = (150_000,)  # the last quarter: after the drift, once re-pins had time to follow
    static = repinned_lru_misses(
        zipf_ids, prior, 100, 50, interval=10_000, budget=0, report_from=late
    )
    kw = {"interval": 10_000, "decay": 0.5, "episode_window": 500, "report_from": late}
    learning = repinned_lru_misses(zipf_ids, prior, 100, 50, budget=20, prior_weight=0.1, **kw)
    assert learning.misses_after[0] < 0.6 * static.misses_after[0]
    assert 0 < learning.repin_reads <= 20 * learning.repins
    online_only = repinned_lru_misses(zipf_ids, np.zeros(2000), 100, 50, prior_weight=0.0, **kw)
    assert online_only.misses < 0.8 * static.misses


def test_repin_refuses_ids_outside_the_prior():
    with pytest.raises(PolicyError, match=r"ids in \[0, 12\]; expected row ids in \[0, 10\)"):
        repinned_lru_misses(np.array([0, 12]), np.zeros(10), 1, 1)
    with pytest.raises(PolicyError, match=r"budget=-1; expected rows and budget >= 0"):
        repinned_lru_misses(np.array([0, 1]), np.zeros(10), 1, 1, budget=-1)


@pytest.mark.parametrize("initial", [[-1], [3, 10]])
def test_repin_refuses_initial_pins_outside_the_prior(initial):
    # a negative id pinned the table's last row (numpy wraps it), one past the end raised numpy's
    # IndexError, naming neither the argument nor the rows expected
    with pytest.raises(
        PolicyError, match=r"initial ids: got ids in \[.*\]; expected row ids in \[0, 10\)"
    ):
        repinned_lru_misses(np.array([0, 1]), np.ones(10), 2, 1, initial=np.array(initial))


@pytest.mark.parametrize(
    "kw",
    [
        {"decay": float("nan")},
        {"decay": 0.0},
        {"decay": 1.5},
        {"prior_weight": float("nan")},
        {"prior_weight": -1.0},
        {"episode_window": -5},
    ],
)
def test_repin_refuses_a_decay_prior_weight_or_window_out_of_range(kw):
    # a NaN decay made every score NaN, so re-pins silently pinned nothing
    ids = np.random.default_rng(0).integers(0, 100, 5000)
    name, value = next(iter(kw.items()))
    with pytest.raises(PolicyError, match=rf"{name}={value}\b.*; expected decay in \(0, 1\]"):
        repinned_lru_misses(ids, np.ones(100), 10, 10, interval=500, budget=5, **kw)


@pytest.mark.parametrize("score", [np.nan, -1.0, np.inf])
def test_repin_refuses_a_prior_score_that_is_not_a_count(score):
    # a NaN in the prior made that row's score NaN: it ranked nowhere and was never pinned
    ids = np.random.default_rng(0).integers(0, 100, 5000)
    prior = np.ones(100)
    prior[42] = score
    with pytest.raises(PolicyError, match=rf"prior\[42\] = {score} \(1 such rows\); expected"):
        repinned_lru_misses(ids, prior, 10, 10, interval=500, budget=5)


@pytest.mark.parametrize("ids", [np.array([1.5, 1.7, 2.2]), np.array([True, False, True])])
def test_per_request_simulators_refuse_row_ids_that_are_not_integers(ids):
    # float ids were cast to int64: 1.5 and 1.7 both read row 1, the second a hit no lookup made
    dtype = ids.dtype
    with pytest.raises(PolicyError, match=rf"^pinned_lru_misses ids: got dtype {dtype}; expected"):
        pinned_lru_misses(ids, np.zeros(10, np.bool_), 2)
    with pytest.raises(
        PolicyError, match=rf"^repinned_lru_misses ids: got dtype {dtype}; expected"
    ):
        repinned_lru_misses(ids, np.zeros(10), 1, 1)
    with pytest.raises(PolicyError, match=rf"initial ids: got dtype {dtype}; expected"):
        repinned_lru_misses(np.array([0, 1]), np.ones(10), 1, 1, initial=ids)


@pytest.mark.parametrize("value", [1.5, True, "2"])
def test_per_request_simulators_refuse_row_counts_that_are_not_integers(value):
    # int() took 1.5 rows (or True) as one row, and 2.5 pinned rows was a bare TypeError
    ids = np.array([1, 2, 1, 3, 1, 2] * 5)
    shown = re.escape(repr(value))
    for option in ("lru_rows", "readmit_window", "lookahead"):
        kw = {"lru_rows": 1, option: value}
        with pytest.raises(
            PolicyError, match=rf"^pinned_lru_misses {option}: got {shown}; expected"
        ):
            pinned_lru_misses(ids, np.zeros(10, np.bool_), **kw)
    for option in ("pinned_rows", "lru_rows", "interval", "budget"):
        kw = {"pinned_rows": 1, "lru_rows": 1, option: value}
        with pytest.raises(
            PolicyError, match=rf"^repinned_lru_misses {option}: got {shown}; expected"
        ):
            repinned_lru_misses(ids, np.ones(10), **kw)


@pytest.mark.parametrize(
    "make",
    [np.int8, np.uint64, np.array, torch.tensor, lambda v: torch.tensor(v, dtype=torch.int32)],
)
def test_per_request_simulators_take_counts_as_numpy_or_torch_integers(make):
    # the integer check took NumPy scalars only: a 0-d array or a torch integer, which int()
    # had taken, was refused as "not an integer" (and a tensor lookahead reached numba untyped)
    ids = np.array([1, 2, 1, 3, 1, 2, 4, 1] * 3)
    pinned = np.zeros(10, np.bool_)
    for option in ("lru_rows", "readmit_window", "lookahead"):
        kw = {"lru_rows": 2, option: make(2)}
        plain = {"lru_rows": 2, option: 2}
        assert pinned_lru_misses(ids, pinned, **kw) == pinned_lru_misses(ids, pinned, **plain)
    for option in ("pinned_rows", "lru_rows", "interval", "budget"):
        kw = {"pinned_rows": 1, "lru_rows": 1, "interval": 5, option: make(2)}
        plain = {"pinned_rows": 1, "lru_rows": 1, "interval": 5, option: 2}
        assert repinned_lru_misses(ids, np.ones(10), **kw) == repinned_lru_misses(
            ids, np.ones(10), **plain
        )
    with pytest.raises(PolicyError, match=r"^pinned_lru_misses lru_rows: got tensor\(True\)"):
        pinned_lru_misses(ids, pinned, torch.tensor(True))


def test_per_request_simulators_take_a_trace_records_ids_in_request_order():
    """A record's [batch, seq, heads] ids reached the numba kernels as they were: a TypingError
    (Cannot unify array(int64, 1d, C) and int64) naming none of the arguments."""
    ids = np.array([1, 2, 1, 3, 1, 2, 4, 1, 3, 2, 4, 1]).reshape(2, 3, 2)
    pinned = np.zeros(10, np.bool_)
    assert pinned_lru_misses(ids, pinned, 2) == pinned_lru_misses(ids.reshape(-1), pinned, 2)
    grouped = repinned_lru_misses(ids, np.ones(10), 1, 1, interval=5)
    assert grouped == repinned_lru_misses(ids.reshape(-1), np.ones(10), 1, 1, interval=5)


def test_a_uint64_row_id_past_int64_is_named_as_given():
    # it was cast to int64 first, and named as the id -1, which no one gave
    ids = np.array([3, 2**64 - 1], dtype=np.uint64)
    with pytest.raises(
        PolicyError, match=rf"ids in \[3, {2**64 - 1}\]; expected row ids in \[0, 10\)"
    ):
        pinned_lru_misses(ids, np.zeros(10, np.bool_), 2)


def lookahead_lru_misses_reference(ids, pinned, lru_rows, lookahead):
    """Pinned rows + LRU whose eviction passes over rows looked up within ``lookahead``, in Python."""
    lru, misses = OrderedDict(), 0  # least recent first
    for t, r in enumerate(ids.tolist()):
        if pinned[r]:
            continue
        if r in lru:
            lru.move_to_end(r)
            continue
        misses += 1
        if len(lru) >= lru_rows:
            upcoming = set(ids[t + 1 : t + 1 + lookahead].tolist())
            for _ in range(min(len(lru), LOOKAHEAD_PASSES)):
                v = next(iter(lru))
                if v not in upcoming:
                    break
                lru.move_to_end(v)
            lru.popitem(last=False)
        lru[r] = True
    return misses


@pytest.mark.parametrize("lru_rows", [1, 40])
@pytest.mark.parametrize("lookahead", [1, 50, 400, 1_000_000])
def test_lookahead_eviction_equals_a_python_reference(zipf_ids, lookahead, lru_rows):
    ids = zipf_ids[:6_000]
    pinned = np.zeros(2000, np.bool_)
    pinned[:20] = True
    want = lookahead_lru_misses_reference(ids, pinned, lru_rows, lookahead)
    assert pinned_lru_misses(ids, pinned, lru_rows=lru_rows, lookahead=lookahead) == want
    if lru_rows > 1:
        assert want < pinned_lru_misses(ids, pinned, lru_rows=lru_rows)  # knowing ahead helps


def test_lookahead_eviction_passes_over_at_most_its_limit():
    ids = np.concatenate([np.arange(600), np.arange(600)])  # all 599 residents looked up again
    pinned = np.zeros(600, np.bool_)
    want = lookahead_lru_misses_reference(ids, pinned, 599, 10_000)
    assert pinned_lru_misses(ids, pinned, lru_rows=599, lookahead=10_000) == want
    assert want < 1_200  # the passes over look-ahead rows kept some of them


def test_lookahead_must_not_be_negative():
    with pytest.raises(PolicyError, match="lookahead=-1; expected all >= 0"):
        pinned_lru_misses(np.array([0]), np.zeros(2, np.bool_), 1, lookahead=-1)


def test_gzip_corpus_files_are_read_and_bad_ones_skipped(tmp_path):
    (tmp_path / "ls.1.gz").write_bytes(gzip.compress(b"Liste den Inhalt auf"))
    (tmp_path / "broken.1.gz").write_bytes(b"\x1f\x8b not gzip")
    assert read_text(tmp_path / "ls.1.gz")[0] == "Liste den Inhalt auf"
    assert read_text(tmp_path / "broken.1.gz")[1] == "unreadable"
    assert len(resolve_corpus([tmp_path]).files) == 2


def test_export_trace_writes_one_tables_ids(tmp_path, capsys):
    layout = {"tables": [{"name": "a", "rows": 100}, {"name": "b", "rows": 100}]}
    with TraceWriter(tmp_path / "t.trace", layout) as writer:
        for batch in range(3):
            writer.write(np.arange(5) + batch, "a")
            writer.write(np.arange(4) * 7, "b")
            writer.end_batch()
    assert (
        main(["export-trace", str(tmp_path / "t.trace"), str(tmp_path / "b.npy"), "--table", "b"])
        == 0
    )
    assert "12 row ids" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), np.tile(np.arange(4) * 7, 3))
    with TraceReader(tmp_path / "t.trace") as reader:
        assert reader.lookups("a") == 15
    assert (
        main(["export-trace", str(tmp_path / "t.trace"), str(tmp_path / "x.npy"), "--table", "c"])
        != 0
    )
    assert "no table 'c'" in capsys.readouterr().err


def test_online_profile_finds_the_heavy_rows_in_bounded_memory():
    import torch

    from tiered_store.errors import ConfigError
    from tiered_store.online_profile import OnlineProfile
    from tiered_store.profile import FrequencyProfile

    rng = np.random.default_rng(1)
    windows = [np.minimum(rng.zipf(1.3, 4096), 100_000) - 1 for _ in range(50)]
    counter = OnlineProfile(candidates=64, width_factor=256)  # ~1,500 rows a window: a wide sketch
    for w in windows:
        counter.update(torch.from_numpy(w))
    exact = np.zeros(100_000, np.int64)
    for w in windows:
        exact[np.unique(w)] += 1  # episodes at window granularity
    true_top = np.argsort(-exact, kind="stable")
    assert set(true_top[:16].tolist()) <= set(counter.top_rows(32).tolist())
    assert len(set(true_top[:32].tolist()) & set(counter.top_rows(32).tolist())) >= 28
    assert counter.nbytes < 100_000 * 4  # less than one int32 counter per table row
    assert counter.mean_distinct_per_window == np.mean([np.unique(w).size for w in windows])
    seeded = OnlineProfile(candidates=4)
    prior = FrequencyProfile(np.array([9, 4, 2]), np.array([3, 2, 9]), episodes=np.array([3, 2, 1]))
    seeded.seed(prior, prior_weight=2.0)  # ranked by episodes, not lookups
    assert seeded.top_rows(3).tolist() == [9, 4, 2]
    with pytest.raises(ConfigError, match="candidates=0"):
        OnlineProfile(candidates=0)


@pytest.mark.parametrize("heavy_hitters", [True, False])
@pytest.mark.parametrize("weight", [0.5, 2**31, -1, float("nan"), float("inf")])
def test_an_online_profile_refuses_a_window_weight_its_counters_cannot_hold(weight, heavy_hitters):
    # int32 counters took a weight of 0.5 as 0 (the window counted nothing, without a word) and
    # one past their largest was a bare RuntimeError naming no weight
    import torch

    from tiered_store.online_profile import OnlineProfile

    counter = OnlineProfile(candidates=4, heavy_hitters=heavy_hitters)
    with pytest.raises(ValueError, match=r"^online profile weight: got .*; expected .*int32"):
        counter.update(torch.tensor([1, 2, 2]), weight=weight)
    assert counter.windows == 0 and int(counter.sketch.abs().sum()) == 0  # nothing counted
    counter.update(torch.tensor([1, 2, 2]), weight=3)  # a whole weight is counted
    assert counter.estimates(torch.tensor([1, 2])).tolist() == [3, 3]
    weighted = OnlineProfile(4, heavy_hitters=heavy_hitters, dtype=torch.float32)
    weighted.update(torch.tensor([1, 2, 2]), weight=0.5)
    assert weighted.estimates(torch.tensor([1, 2])).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), 1e12])
def test_an_online_profile_refuses_a_prior_weight_its_counters_cannot_hold(weight):
    # a NaN or infinite prior_weight, or episodes scaled past the int32 counters, were cast to
    # -2**31: every seeded row ranked last, without a word
    import torch

    from tiered_store.errors import ConfigError
    from tiered_store.online_profile import OnlineProfile
    from tiered_store.profile import FrequencyProfile

    prior = FrequencyProfile(np.array([9, 4, 2]), np.array([3, 2, 9]), episodes=np.array([3, 2, 1]))
    with pytest.raises(ConfigError, match=rf"prior_weight: got {weight}\b.*; expected"):
        OnlineProfile(candidates=4).seed(prior, prior_weight=weight)
    if weight == 1e12:  # float32 counters hold it
        wide = OnlineProfile(candidates=4, dtype=torch.float32)
        wide.seed(prior, prior_weight=weight)
        assert wide.estimates(torch.tensor([9, 4, 2])).tolist() == pytest.approx([3e12, 2e12, 1e12])


@pytest.mark.parametrize("dtype", ["int32", "float32"])
def test_an_online_profile_refuses_seeded_rows_that_share_a_counter_past_its_largest(dtype):
    # each row's scaled episodes fit the counters, but two rows sharing a counter summed past
    # them: int32 wrapped to a negative estimate (the row ranked last), float32 became infinite
    # (the row outranked every count for good: no decay brings infinity down)
    import torch

    from tiered_store.errors import ConfigError
    from tiered_store.online_profile import OnlineProfile
    from tiered_store.profile import FrequencyProfile

    profile = OnlineProfile(candidates=4, dtype=getattr(torch, dtype))
    info = torch.iinfo if dtype == "int32" else torch.finfo
    weight = float(info(profile.sketch.dtype).max) * 0.75
    first_row = profile._buckets(torch.arange(64))[0].tolist()
    a = next(i for i, b in enumerate(first_row) if first_row.index(b) != i)  # shares with one
    shared = np.array([first_row.index(first_row[a]), a])
    prior = FrequencyProfile(shared, np.ones(2, np.int64), episodes=np.ones(2, np.int64))
    with pytest.raises(
        ConfigError,
        match=rf"prior_weight: got {re.escape(str(weight))}, .*rows sharing.*; expected a",
    ):
        profile.seed(prior, prior_weight=weight)
    alone = FrequencyProfile(shared[:1], np.ones(1, np.int64), episodes=np.ones(1, np.int64))
    profile.seed(alone, prior_weight=weight)
    assert profile.estimates(torch.from_numpy(shared[:1])).item() == pytest.approx(weight)


def test_a_float32_online_profile_refuses_a_prior_weight_that_makes_its_counts_infinite():
    # 1e300 is a finite number (the config takes it), but float32 counters hold at most 3.4e38:
    # every seeded row started at infinity
    import torch

    from tiered_store.errors import ConfigError
    from tiered_store.online_profile import OnlineProfile
    from tiered_store.profile import FrequencyProfile

    prior = FrequencyProfile(np.array([9, 4, 2]), np.array([3, 2, 9]), episodes=np.array([3, 2, 1]))
    profile = OnlineProfile(candidates=4, dtype=torch.float32)
    with pytest.raises(
        ConfigError, match=r"got 1e\+300, .* to 3e\+300 .*float32 counters' 3\.403e\+38"
    ):
        profile.seed(prior, prior_weight=1e300)
    assert not profile.sketch.any()  # nothing seeded


@pytest.mark.parametrize("path", ["numba", "torch"])
def test_a_re_pinning_sketch_counts_its_windows_conservatively(path):
    # without the heavy-hitter list (the store's re-pinning) a window raises each distinct row's
    # counters to their minimum plus the weight: every estimate stays at least the windows the row
    # was in, and collisions inflate estimates less than adding the weight to every counter (as
    # the heavy-hitter profile does); "torch" is the CUDA path's ops, run on the CPU here
    import torch

    from tiered_store.online_profile import OnlineProfile

    rng = np.random.default_rng(2)
    windows = [np.minimum(rng.zipf(1.2, 600), 3000) - 1 for _ in range(40)]
    sketch = OnlineProfile(64, width_factor=2, heavy_hitters=False, dtype=torch.float32)
    if path == "torch":
        sketch._kernel = False  # the window counted by unique + gather + scatter_reduce
    for w in windows:
        sketch.update(torch.from_numpy(w.astype(np.int64)))
    ids = torch.arange(3000)
    episodes = np.zeros(3000)
    plain = torch.zeros_like(sketch.sketch)  # count-min adding to every counter, same hashes
    for w in windows:
        distinct = torch.from_numpy(np.unique(w).astype(np.int64))
        episodes[distinct.numpy()] += 1
        for row, idx in zip(plain, sketch._buckets(distinct), strict=True):
            row.index_add_(0, idx, torch.ones(distinct.numel()))
    estimate = sketch.estimates(ids).numpy()
    added = torch.gather(plain, 1, sketch._buckets(ids)).amin(dim=0).numpy()
    assert sketch.width * 4 < 3000 and (estimate >= episodes).all()  # collisions, an upper bound
    assert (estimate <= added).all()
    assert (estimate - episodes).sum() < 0.6 * (added - episodes).sum()  # about half here
    assert sketch.mean_distinct_per_window == np.mean([np.unique(w).size for w in windows])


def test_the_cpu_kernel_and_the_cuda_ops_count_a_window_the_same():
    # a CPU store and a GPU store fed the same traffic must learn the same pins: both raise a
    # window's rows from the counters' minima before the window, whatever the order of its ids
    import torch

    from tiered_store.online_profile import OnlineProfile

    rng = np.random.default_rng(0)
    kernel, ops, shuffled = (OnlineProfile(16, heavy_hitters=False) for _ in range(3))
    ops._kernel = False  # the torch ops CUDA runs, on CPU tensors here
    for _ in range(30):
        window = (rng.zipf(1.3, 50) - 1) % 200  # 200 rows on a 64-counter sketch: collisions
        kernel.update(torch.from_numpy(window))
        ops.update(torch.from_numpy(window))
        shuffled.update(torch.from_numpy(rng.permutation(window)))
    assert kernel.width < 200 and int(kernel.sketch.sum()) > 0
    assert torch.equal(kernel.sketch, ops.sketch)
    assert torch.equal(kernel.sketch, shuffled.sketch)
