"""What ``tiered-store analyze`` may be told: every default with its unit, and :class:`AnalyzeOptions`."""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from tiered_store.errors import ConfigError
from tiered_store.profile import DEFAULT_EPISODE_WINDOW

__all__ = [
    "DEFAULT_BATCH_SEQS",
    "DEFAULT_BELADY_LOOKUPS",
    "DEFAULT_BELADY_POINTS",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_SHARDS_RATE",
    "DEFAULT_TARGETS",
    "GROUP_BYTES",
    "HOLDOUT_NAME",
    "QUEUE_GROUPS",
    "READER_WAIT_SECONDS",
    "TRACE_NAME",
    "AnalyzeOptions",
    "check_targets",
    "parse_targets",
]

# Every default, with its unit.
DEFAULT_SEQ_LEN = 4096  # tokens per sequence (the reference's context)
DEFAULT_BATCH_SEQS = 8  # sequences per batch
DEFAULT_TARGETS = {"hot": 0.3, "warm": 0.6}  # cumulative hit rates the tier sizes must reach
DEFAULT_SHARDS_RATE = 0.01  # SHARDS fixed sampling rate
DEFAULT_BELADY_LOOKUPS = 4_000_000  # lookups per table Belady's MIN runs on (sampled to this)
DEFAULT_BELADY_POINTS = 10  # capacities Belady is evaluated at (plus the recommended ones)
GROUP_BYTES = 4 << 20  # text handed to one encode_batch call (bytes)
QUEUE_GROUPS = 2  # tokenised groups buffered between the tokeniser thread and the hasher
READER_WAIT_SECONDS = 5.0  # on an error or interrupt, wait this long for the reader thread

# Output file names (in the output folder).
TRACE_NAME = "trace.trace"
HOLDOUT_NAME = "holdout.trace"


@dataclass(frozen=True)
class AnalyzeOptions:
    """How :func:`~zipf_analysis.analyze.analyze` cuts, batches and analyses the corpus.

    Defaults are the ``DEFAULT_*`` constants of this module (with units).

    Attributes
    ----------
    seq_len : int
        Tokens per sequence; each sequence starts with fresh (pad) N-gram context.
    batch_seqs : int
        Sequences per batch (a batch is the unit the store sees in one ``lookup``).
    max_tokens : int or None
        Stop after this many tokens (with a holdout: over both traces, split by the fraction).
    workers : int or None
        Threads for tokenising, hashing and the per-table curves (default: CPU count). The
        tokenizer's Rust pool reads ``RAYON_NUM_THREADS`` (set from this when unset) once per
        process, at its first batch encode.
    targets : mapping of tier -> hit rate
        Cumulative target hit rates for the recommended tier sizes (``hot``, then ``warm``).
    holdout : float
        Fraction of the documents written to a second, disjoint trace (0 = none).
    seed : int
        Seed of the holdout split, the shuffle and the samplers, in [0, 2**64).
    shuffle : bool
        Process documents in a seeded random order instead of path order.
    curves : bool
        Compute exact LRU, SHARDS and Belady curves (static top-K is always computed).
    belady : bool
        Compute Belady's MIN (only with ``curves``).
    shards_rate : float
        SHARDS sampling rate.
    belady_lookups : int
        Belady runs on a spatial sample of rows holding about this many lookups per table
        (capacities scaled by the rate: a miniature simulation); exact below it.
    episode_window : int
        Lookups of a table after which a row's next lookup starts a new episode in its profile
        (``zipf-tuned`` pins rows by episodes; 0: do not count them).
    progress : bool
        Show a progress bar and stage messages.
    gpu_budget, host_budget : str or None
        Memory for the hot and warm tiers (e.g. ``'8GiB'``; both or neither): each table's store
        config then takes the hot/warm split with the least modelled stall
        (:func:`zipf_analysis.tier_split.recommend_split`) instead of the ``targets`` sizes.

    Examples
    --------
    >>> opts = AnalyzeOptions(seq_len=256, targets={"warm": 0.7, "hot": 0.4}, workers=2)
    >>> opts.targets, opts.threads, opts.batch_seqs
    ({'hot': 0.4, 'warm': 0.7}, 2, 8)
    >>> AnalyzeOptions(holdout=1.0)
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: holdout: got 1.0; expected a fraction in [0, 1)
    """

    seq_len: int = DEFAULT_SEQ_LEN
    batch_seqs: int = DEFAULT_BATCH_SEQS
    max_tokens: int | None = None
    workers: int | None = None
    targets: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TARGETS))
    holdout: float = 0.0
    seed: int = 0
    shuffle: bool = False
    curves: bool = True
    belady: bool = True
    shards_rate: float = DEFAULT_SHARDS_RATE
    belady_lookups: int = DEFAULT_BELADY_LOOKUPS
    episode_window: int = DEFAULT_EPISODE_WINDOW
    progress: bool = True
    gpu_budget: str | None = None
    host_budget: str | None = None

    def __post_init__(self) -> None:
        for name, minimum in (
            ("seq_len", 1),
            ("batch_seqs", 1),
            ("belady_lookups", 1),
            ("episode_window", 0),
            ("max_tokens", 1),
            ("workers", 1),
        ):
            value = getattr(self, name)
            if value is None and name in ("max_tokens", "workers"):
                continue
            if not _is_integer(value) or value < minimum:
                raise ConfigError(f"{name}: got {value!r}; expected an integer >= {minimum}")
            object.__setattr__(self, name, int(value))  # a NumPy integer as int
        if not _is_integer(self.seed) or not 0 <= self.seed < 2**64:
            raise ConfigError(f"seed: got {self.seed!r}; expected an integer in [0, 2**64)")
        object.__setattr__(self, "seed", int(self.seed))
        for name, low_open, expected in (
            ("holdout", False, "a fraction in [0, 1)"),
            ("shards_rate", True, "0 < rate <= 1"),
        ):
            value = getattr(self, name)
            real = isinstance(value, numbers.Real) and not isinstance(
                value, bool
            )  # np.bool_ is not
            inside = real and (0.0 < value <= 1.0 if low_open else 0.0 <= value < 1.0)
            if not inside:  # a str compared with a float died later (the holdout split)
                raise ConfigError(f"{name}: got {value!r}; expected {expected}")
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "targets", check_targets(self.targets))
        from ..tier_split import parse_budgets

        parse_budgets(self.gpu_budget, self.host_budget)  # both or neither, each a byte size

    @property
    def threads(self) -> int:
        """Worker threads actually used."""
        return self.workers or os.cpu_count() or 1


def _is_integer(value: object) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), not a bool (NumPy's is not Integral)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_targets(targets: Mapping[str, float]) -> dict[str, float]:
    """Targets as an ordered dict of store tier names (hot before warm) -> hit rates in (0, 1]."""
    if not isinstance(targets, Mapping) or not targets:
        raise ConfigError(f"targets: got {targets!r}; expected e.g. hot=0.3,warm=0.6")
    out: dict[str, float] = {}
    for tier, rate in targets.items():
        if tier not in ("hot", "warm"):
            raise ConfigError(f"targets.{tier}: unknown tier; expected 'hot' and/or 'warm'")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1:
            raise ConfigError(f"targets.{tier}: got {rate!r}; expected a hit rate in (0, 1]")
        out[tier] = float(rate)
    if list(out) == ["warm", "hot"]:
        out = {"hot": out["hot"], "warm": out["warm"]}
    if "hot" in out and "warm" in out and out["warm"] < out["hot"]:
        raise ConfigError(
            f"targets.warm: got {out['warm']}; expected >= targets.hot={out['hot']} "
            "(targets are cumulative: warm's includes the hot tier's hits)"
        )
    return out


def parse_targets(text: str) -> dict[str, float]:
    """Parse ``"hot=0.3,warm=0.6"`` into ``{"hot": 0.3, "warm": 0.6}``.

    Parameters
    ----------
    text : str
        Comma-separated ``TIER=RATE`` pairs; tiers ``hot`` and/or ``warm``, rates in (0, 1].

    Returns
    -------
    dict of str -> float
        Cumulative target hit rates, hot before warm.

    Raises
    ------
    ConfigError
        A part that is not ``TIER=RATE``, a tier named twice, an unknown tier, a rate outside (0, 1], or warm < hot.

    Examples
    --------
    >>> parse_targets("hot=0.3, warm=0.6")
    {'hot': 0.3, 'warm': 0.6}
    >>> parse_targets("hot=1.5")
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: targets.hot: got 1.5; expected a hit rate in (0, 1]
    """
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = None
        if not sep or rate is None:
            raise ConfigError(f"--targets: got {part!r}; expected TIER=RATE like hot=0.3")
        if name.strip() in out:
            raise ConfigError(
                f"--targets: got {text!r}, which names {name.strip()} twice; expected each tier "
                "once, like hot=0.3,warm=0.6"
            )
        out[name.strip()] = rate
    if not out:
        raise ConfigError(f"--targets: got {text!r}; expected e.g. hot=0.3,warm=0.6")
    return check_targets(out)
