"""Frequency profiles (counting, shares, files) and Zipf fits on synthetic data with known s."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tiered_store.errors import RowIdError, TraceFormatError
from tiered_store.profile import FrequencyCounter, FrequencyProfile, profile_ids
from tiered_store.trace import TraceReader, TraceWriter
from zipf_analysis.plots import plot_rank_frequency
from zipf_analysis.profile import profile_summary, profile_trace
from zipf_analysis.zipf_fit import (
    default_rank_range,
    fit_least_squares,
    fit_mle,
    fit_zipf,
    fitted_counts,
    sample_zipf,
)

# Tolerance on a recovered exponent: 2M lookups over 200k rows fitted over ranks with >= 10
# lookups sit within 0.01 of the truth (bias ~ -0.005, stderr ~ 0.001); 0.03 leaves headroom.
EXPONENT_TOL = 0.03


def _reference_counts(ids):
    u, c = np.unique(ids, return_counts=True)
    return dict(zip(u.tolist(), c.tolist(), strict=True))


@pytest.mark.parametrize("dense_limit", [1 << 26, 64])
def test_counter_matches_unique(dense_limit):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5000, size=20_000)
    counter = FrequencyCounter(dense_limit=dense_limit)  # 64: forces the sparse path midway
    for part in np.array_split(ids, 9):
        counter.update(part.reshape(-1, 1))  # any shape
    prof = counter.profile(name="t")
    assert dict(zip(prof.row_ids.tolist(), prof.counts.tolist(), strict=True)) == _reference_counts(
        ids
    )
    assert prof.lookups == ids.size == counter.lookups
    assert (np.diff(prof.counts) <= 0).all()
    ties = prof.counts[:-1] == prof.counts[1:]
    assert (prof.row_ids[:-1][ties] < prof.row_ids[1:][ties]).all()  # ties by ascending id


def test_counter_rejects_bad_ids():
    counter = FrequencyCounter(rows=10)
    with pytest.raises(RowIdError, match=r"\[0, 10\)"):
        counter.update(np.array([3, 10]))
    with pytest.raises(RowIdError):
        counter.update(np.array([-1]))
    with pytest.raises(RowIdError, match="integers"):
        counter.update(np.array([0.5]))


def test_shares_top_rows_and_collisions():
    # Row 10*k + 1 looked up k times for k = 1..100: 5050 lookups over 100 rows of 10_000.
    ids = np.repeat(np.arange(1, 101) * 10 + 1, np.arange(1, 101))
    prof = profile_ids(ids, rows=10_000, name="l", ngram_keys=120)
    assert prof.distinct == 100 and prof.lookups == 5050
    assert prof.top_rows(3).tolist() == [1001, 991, 981]
    assert prof.touched_fraction == pytest.approx(0.01)
    # of the table: top 0.1% = 10 rows, 1% = 100 rows (all touched ones)
    assert prof.top_share(0.001, of="table") == pytest.approx(sum(range(91, 101)) / 5050)
    assert prof.top_share(0.01, of="table") == 1.0
    # of touched rows: top 1% of 100 = 1 row, 10% = 10 rows
    assert prof.top_share(0.01, of="touched") == pytest.approx(100 / 5050)
    assert prof.top_share(0.1, of="touched") == pytest.approx(sum(range(91, 101)) / 5050)
    shares = prof.top_shares()
    assert set(shares) == {"of_table", "of_touched"} and set(shares["of_table"]) == {
        "0.1%",
        "1%",
        "10%",
    }
    assert prof.hash_collision_rate == pytest.approx(1 - 100 / 120)
    assert 0 < prof.expected_collision_rate < 0.01
    assert profile_ids(ids).top_share(0.01, of="table") is None  # table size unknown
    dense = prof.dense_counts()
    assert dense.size == 10_000 and dense[1001] == 100 and dense.sum() == 5050


def test_save_load_round_trip(tmp_path):
    ids = sample_zipf(50_000, 3_000, 0.9, seed=2)
    prof = profile_ids(ids, rows=3_000, name="layer2", ngram_keys=4_000)
    prof.metadata["tokenizer"] = "deepseek-v3"
    prof.save(tmp_path / "p.npz")
    back = FrequencyProfile.load(tmp_path / "p.npz")
    np.testing.assert_array_equal(back.row_ids, prof.row_ids)
    np.testing.assert_array_equal(back.counts, prof.counts)
    assert (back.rows, back.name, back.ngram_keys) == (3_000, "layer2", 4_000)
    assert back.metadata == {"tokenizer": "deepseek-v3"}
    assert back.summary() == prof.summary()
    top = np.load(prof.save_top_rows(tmp_path / "top.npy", 100))
    np.testing.assert_array_equal(top, prof.top_rows(100))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(TraceFormatError, match="bad.npz"):
        FrequencyProfile.load(tmp_path / "bad.npz")


def _reference_episodes(ids, window):
    """Scalar definition: a lookup starts an episode when the row's previous lookup is more than
    ``window`` positions back (or there is none)."""
    last, episodes = {}, {}
    for pos, row in enumerate(ids.tolist()):
        if pos - last.get(row, -(10**9)) > window:
            episodes[row] = episodes.get(row, 0) + 1
        last[row] = pos
    return episodes


@pytest.mark.parametrize("window", [1, 7, 300])
def test_episodes_match_the_scalar_definition_across_chunkings(window):
    rng = np.random.default_rng(window)
    # bursty: each "document" draws from its own few rows, plus a shared Zipfian background
    docs = [rng.integers(d * 40, d * 40 + 40, size=rng.integers(5, 200)) for d in range(60)]
    ids = np.concatenate(
        [np.concatenate([d, sample_zipf(d.size, 500, 1.0, seed=i)]) for i, d in enumerate(docs)]
    )
    ref = _reference_episodes(ids, window)
    for parts in (1, 3, 50):
        counter = FrequencyCounter(rows=3000, episode_window=window)
        for part in np.array_split(ids, parts):
            counter.update(part)
        prof = counter.profile()
        got = dict(zip(prof.row_ids.tolist(), prof.episodes.tolist(), strict=True))
        assert got == ref, parts
        assert prof.episode_window == window
        assert (prof.episodes <= prof.counts).all() and (prof.episodes >= 1).all()


def test_top_rows_by_episodes_prefers_rows_spread_over_time(tmp_path):
    # row 1: 50 lookups in one burst; row 2: 10 lookups 100 positions apart; filler in between
    filler = np.arange(10, 1010)
    ids = np.concatenate(
        [np.full(50, 1), *[np.concatenate([[2], filler[i * 99 : i * 99 + 99]]) for i in range(10)]]
    )
    counter = FrequencyCounter(rows=2000, episode_window=64)
    counter.update(ids)
    prof = counter.profile()
    assert prof.top_rows(1).tolist() == [1]  # most lookups
    assert prof.top_rows(1, by="episodes").tolist() == [2]  # 10 episodes vs 1
    prof.save(tmp_path / "p.npz")
    back = FrequencyProfile.load(tmp_path / "p.npz")
    np.testing.assert_array_equal(back.episodes, prof.episodes)
    assert back.episode_window == 64
    assert back.top_rows(1, by="episodes").tolist() == [2]
    assert profile_ids(ids, rows=2000).episode_window == 65_536  # the default window
    legacy = FrequencyProfile(prof.row_ids, prof.counts, 2000)  # e.g. an older file: by lookups
    assert legacy.episodes is None and legacy.top_rows(1, by="episodes").tolist() == [1]
    with pytest.raises(ValueError, match="by: got 'hits'"):
        prof.top_rows(1, by="hits")
    with pytest.raises(ValueError, match="episodes .* differ in length"):
        FrequencyProfile(prof.row_ids, prof.counts, 2000, episodes=prof.episodes[:-1])


def test_profile_trace_uses_layout_rows(tmp_path):
    path = tmp_path / "t.trace"
    with TraceWriter(path, {"tables": [{"name": "a", "rows": 100}, "b"], "tokenizer": "tk"}) as w:
        w.write(np.array([[1, 2], [2, 2]]), "a")
        w.write(np.array([7, 7, 7]), "b")
    with TraceReader(path) as r:
        a = profile_trace(r, "a")
        assert (a.name, a.rows, a.lookups, a.top_rows(1).tolist()) == ("a", 100, 4, [2])
        assert a.metadata["tokenizer"] == "tk"
        both = profile_trace(r)
        assert both.lookups == 7 and both.rows is None


@pytest.mark.parametrize("exponent", [0.7, 1.0])
def test_fits_recover_known_exponent(exponent):
    ids = sample_zipf(2_000_000, 200_000, exponent, seed=11)
    fits = fit_zipf(np.bincount(ids))
    for fit in fits.values():
        assert fit.exponent == pytest.approx(exponent, abs=EXPONENT_TOL), fit
        assert fit.rank_min == 1 and fit.rank_max > 1000  # the range is reported
    assert fits["least_squares"].rank_max == fits["mle"].rank_max
    assert fits["least_squares"].r_squared > 0.99
    assert fits["mle"].stderr < 0.01


def test_fits_on_exact_power_law_and_ranges():
    ranks = np.arange(1, 50_001)
    counts = 1e7 * ranks**-0.85  # noiseless, float counts
    ls = fit_least_squares(counts, rank_max=50_000)
    assert ls.exponent == pytest.approx(0.85, abs=1e-6)
    assert fitted_counts(ls, [1])[0] == pytest.approx(1e7, rel=1e-6)
    mle = fit_mle(np.round(counts), rank_min=10, rank_max=20_000)
    assert mle.exponent == pytest.approx(0.85, abs=2e-3)
    assert (mle.rank_min, mle.rank_max, mle.points) == (10, 20_000, 19_991)
    assert default_rank_range([50, 20, 10, 10, 9, 1]) == (1, 4)
    with pytest.raises(ValueError, match="rank range"):
        fit_mle([5, 3], rank_min=2, rank_max=2)
    # one row, or none, with min_count lookups: no fit, said so (it fitted ranks 1..2 of one
    # lookup each: s = 0, R^2 = 1); a profile's summary reports it as not possible
    for counts in ([1] * 40, [12] + [1] * 39):
        with pytest.raises(ValueError, match="a Zipf fit needs two or more"):
            fit_least_squares(counts)
        with pytest.raises(ValueError, match="a Zipf fit needs two or more"):
            fit_mle(counts)
    summary = profile_summary(profile_ids(np.arange(40), rows=40))
    assert "a Zipf fit needs two or more" in summary["zipf"]["error"]


def test_an_mle_fit_at_the_end_of_its_search_says_so():
    """The MLE searched s in (0.001, 8) and reported the end it stopped at as a fit: equal counts
    (no skew, s = 0) gave "s = 0.001 ± 0.002", and counts falling as rank**-10 "s = 8.000"
    with a standard error, where least squares gave 10. Equal counts now fit s = 0; a fit
    that ends at the upper bound says the exponent is at least that, with no standard error."""
    flat = fit_mle(np.full(5_000, 40))
    assert flat.exponent < 1e-5 and not flat.at_bound
    steep = fit_mle(np.round(1e12 * np.arange(1, 4.0) ** -10), min_count=1)
    assert steep.at_bound and steep.exponent == pytest.approx(8.0, abs=1e-4)
    assert math.isnan(steep.stderr)
    assert steep.to_dict()["at_bound"] is True
    assert not fit_mle(np.round(1e7 * np.arange(1, 5_001.0) ** -0.85)).at_bound


def test_fit_options_that_are_not_integers_are_refused_by_name():
    # rank_max 2.5 fitted ranks 1..2 and True ranks 1..1 (int()), bins_per_decade 0 or -3 fitted
    # two points: each is refused naming the option, the value and what was expected
    counts = [100, 50, 30, 20, 10, 5]
    for option, value in (
        ("rank_max", 2.5),
        ("rank_max", True),
        ("rank_min", 1.5),
        ("rank_min", 0),
        ("min_count", 2.5),
    ):
        for fit in (fit_least_squares, fit_mle, fit_zipf):
            with pytest.raises(ValueError, match=rf"^{option}: got {value!r}; expected an integer"):
                fit(counts, **{option: value})
    for bins in (0, -3, 2.5):
        with pytest.raises(
            ValueError, match=rf"^bins_per_decade: got {bins!r}; expected an integer"
        ):
            fit_least_squares(counts, bins_per_decade=bins)
    fit = fit_mle(counts, rank_max=np.int64(3), min_count=np.int32(1))  # NumPy integers are kept
    assert (fit.rank_min, fit.rank_max) == (1, 3)


def test_top_rows_refuses_a_count_that_is_not_an_integer():
    # top_rows(2.5) indexed the rows with floats (a bare IndexError naming nothing) and
    # top_rows(True) returned one row; both are refused naming k, as a negative k was
    prof = profile_ids(np.array([7, 3, 7, 7, 1, 3]), rows=10, name="l2")
    for k in (2.5, True, -1):
        for by in ("lookups", "episodes"):
            with pytest.raises(ValueError, match=rf"^k: got {k!r}; expected an integer >= 0"):
                prof.top_rows(k, by=by)
    assert prof.top_rows(np.int64(2)).tolist() == [7, 3]


def test_the_counter_refuses_a_window_or_row_count_that_is_not_an_integer():
    # episode_window 2.5 counted episodes as a window of 2 and the profile recorded 2.5 (True: 1
    # and True); rows 2.5 or True were numpy's bare TypeError, -3 'negative dimensions'
    for kw, name in (
        ({"episode_window": 2.5}, "episode_window"),
        ({"episode_window": True}, "episode_window"),
        ({"episode_window": -1}, "episode_window"),
        ({"rows": 2.5}, "rows"),
        ({"rows": True}, "rows"),
        ({"rows": -3}, "rows"),
    ):
        with pytest.raises(
            ValueError, match=rf"^{name}: got {next(iter(kw.values()))!r}; expected"
        ):
            FrequencyCounter(**{"rows": 10, **kw})
    counter = FrequencyCounter(np.int64(10), episode_window=np.int32(2))
    counter.update(np.array([1, 1, 0, 0, 1]))
    prof = counter.profile()
    assert (prof.rows, prof.episode_window, type(prof.rows)) == (10, 2, int)


def test_rank_frequency_plot_is_a_png(tmp_path):
    prof = profile_ids(sample_zipf(100_000, 20_000, 0.8, seed=0), rows=20_000, name="l2")
    png = plot_rank_frequency(prof, tmp_path / "rf.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
