"""ZipfWorkload: its arguments, reproducibility and the law it draws from."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from tiered_store.workload import ZipfWorkload


@pytest.mark.parametrize(
    ("rows", "exponent", "named"),
    [
        (2.5, 1.0, "rows: got 2.5"),  # gave numpy's AxisError
        ("10", 1.0, "rows: got '10'"),  # gave TypeError: '<=' not supported
        (True, 1.0, "rows: got True"),  # was taken as one row
        (0, 1.0, "rows: got 0"),
        (10, "1", "exponent: got '1'"),  # gave TypeError: '>=' not supported
        (10, None, "exponent: got None"),
        (10, True, "exponent: got True"),
        (10, float("nan"), "exponent: got nan"),
        (10, -0.5, "exponent: got -0.5"),
    ],
)
def test_a_bad_row_count_or_exponent_is_named(rows, exponent, named):
    with pytest.raises(ValueError, match=named):
        ZipfWorkload(rows, exponent)


def test_numpy_integers_and_floats_are_taken():
    a = ZipfWorkload(np.int64(50), np.float32(1.0), seed=np.int64(3)).sample(100)
    b = ZipfWorkload(50, 1, seed=3).sample(100)
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"size": 5, "chunk": -1}, "chunk: got -1"),  # returned np.empty's bytes as ids
        ({"size": 5, "chunk": 0}, "chunk: got 0"),  # range() arg 3 must not be zero
        ({"size": -1}, "size: got -1"),  # negative dimensions are not allowed
        ({"size": (2, -3)}, r"size: got \(2, -3\)"),
        ({"size": 2.5}, "size: got 2.5"),
    ],
)
def test_a_bad_sample_size_or_chunk_is_named(kwargs, named):
    with pytest.raises(ValueError, match=named):
        ZipfWorkload(10, 1.0, seed=0).sample(**kwargs)


def test_sample_shapes_and_chunks():
    """Any shape of counts, empty ones too; the chunk size only splits the same draw."""
    workload = ZipfWorkload(100, 1.0, seed=0)
    for size in (0, (2, 0), (), 7, [2, 3], np.int64(4)):
        out = workload.sample(size)
        assert out.shape == np.empty(size).shape and out.dtype == np.int64
    one = ZipfWorkload(100, 1.0, seed=4).sample(1000, chunk=1)
    assert one.min() >= 0 and one.max() < 100


def test_hottest_refuses_a_negative_count():
    """hottest(-1) returned every row but the coldest: a negative slice end."""
    workload = ZipfWorkload(10, 1.0, seed=0)
    with pytest.raises(ValueError, match="k: got -1"):
        workload.hottest(-1)
    assert workload.hottest(0).size == 0 and sorted(workload.hottest(99)) == list(range(10))


@pytest.mark.parametrize("permute", [True, False])
def test_a_workload_allocates_its_cdf_and_permutation_and_no_more(permute):
    """The CDF's powers and running sum, an unused arange and the permutation's astype copy each
    made another array of rows x 8 bytes: 384M rows (a V4.1 table) peaked at 12 GB for the 6 GB
    kept. The draws are the same as before."""
    rows = 1_000_000
    tracemalloc.start()
    try:
        workload = ZipfWorkload(rows, 0.9, seed=5, permute=permute)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * rows * 8
    want = np.cumsum(np.arange(1, rows + 1, dtype=np.float64) ** -0.9)
    assert np.array_equal(workload._cdf, want / want[-1])  # bit for bit: the same draws


def _chi_square(workload: ZipfWorkload, ids: np.ndarray, exponent: float) -> tuple[float, int]:
    """Pearson's statistic of ``ids``' counts per rank against ``P(rank k) ~ k^-exponent``, and
    its degrees of freedom."""
    counts = np.bincount(ids, minlength=workload.rows)[workload.rank_to_row]
    law = np.arange(1, workload.rows + 1, dtype=np.float64) ** -exponent
    expected = ids.size * law / law.sum()
    return float(((counts - expected) ** 2 / expected).sum()), workload.rows - 1


@pytest.mark.parametrize(("rows", "exponent"), [(50, 0.0), (50, 1.2), (200, 0.9), (7, 3.0)])
def test_draws_follow_the_exponent_and_the_rank_to_row_map(rows, exponent):
    """Pearson's chi-square against the law (a fixed seed: the statistic is always the same) sits
    below dof + 5 sd (p ~ 1e-5), and against a law 0.1 off it does not: the check can fail."""
    workload = ZipfWorkload(rows, exponent, seed=11)
    ids = workload.sample(200_000)
    statistic, dof = _chi_square(workload, ids, exponent)
    bound = dof + 5 * np.sqrt(2 * dof)
    assert statistic < bound
    assert _chi_square(workload, ids, exponent + 0.1)[0] > bound
    if exponent > 0:  # (a uniform law has no hottest row)
        assert np.array_equal(workload.hottest(1), [np.bincount(ids).argmax()])


def test_a_seed_reproduces_the_draws():
    """The same seed gives the same rows and draws; a Generator is drawn from, not copied."""
    a, b = ZipfWorkload(1000, 0.9, seed=7), ZipfWorkload(1000, 0.9, seed=7)
    assert np.array_equal(a.rank_to_row, b.rank_to_row)
    assert np.array_equal(a.sample((4, 250)).ravel(), b.sample(1000))
    assert not np.array_equal(ZipfWorkload(1000, 0.9, seed=8).sample(1000), a.sample(1000))
    rng = np.random.default_rng(7)
    c = ZipfWorkload(1000, 0.9, seed=rng)
    assert np.array_equal(c.rank_to_row, a.rank_to_row)
    assert not np.array_equal(c.sample(1000), ZipfWorkload(1000, 0.9, seed=rng).sample(1000))


@pytest.mark.parametrize("seed", [1.5, -1, "a", True])
def test_a_bad_seed_is_named(seed):
    """NumPy's errors named no argument ('expected non-negative integer'), and True was seed 1."""
    with pytest.raises(ValueError, match=f"seed: got {seed!r}; expected an integer >= 0"):
        ZipfWorkload(10, 1.0, seed=seed)
