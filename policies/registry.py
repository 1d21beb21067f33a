"""One registry of policy names, shared by YAML, the CLI and Python.

A policy spec is ``+``-joined parts: at most one eviction policy, at most one admission filter, and
the ``static`` modifier (pin the tier's ``static_rows``). Examples: ``lru``, ``static+lru``,
``sieve+tinylfu``, ``static`` (pinned rows only, nothing else admitted). Eviction: ``lru``,
``lfu`` (with aging), ``sieve``, ``fifo``; admission: ``all`` (default), ``tinylfu``. An
admission factory that sets ``sized_by_capacity = True`` also receives ``capacity=`` (the tier's
slots).

Offline bounds (``belady``, ``static-topk``) are registry names too, of their own kind: they see
the whole trace, so replay and the miss-ratio curves run them, and a live tier's spec refuses them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tiered_store.errors import ConfigError

from .base import AdmissionPolicy, EvictionPolicy, NoEviction
from .lfu import LFU
from .lru import LRU
from .offline import Belady, OfflineBound, StaticTopK
from .sieve import FIFO, SIEVE
from .tinylfu import TinyLFU

EVICTION: dict[str, Callable[..., EvictionPolicy]] = {
    "lru": LRU,
    "lfu": LFU,
    "sieve": SIEVE,
    "fifo": FIFO,
}
ADMISSION: dict[str, Callable[..., AdmissionPolicy]] = {"all": AdmissionPolicy, "tinylfu": TinyLFU}
MODIFIERS = ("static", "zipf-tuned")


def register_eviction(name: str, factory: Callable[..., EvictionPolicy]) -> None:
    """Make an eviction policy available by name everywhere."""
    EVICTION[name] = factory


def register_admission(name: str, factory: Callable[..., AdmissionPolicy]) -> None:
    """Make an admission filter available by name everywhere."""
    ADMISSION[name] = factory


def known_names() -> list[str]:
    """Every name a spec part may use."""
    return sorted([*EVICTION, *ADMISSION, *MODIFIERS])


@dataclass(frozen=True)
class PolicySpec:
    """A parsed policy spec: what evicts, what admits, whether static rows are pinned."""

    eviction: str | None
    admission: str
    static: bool
    tuned: bool = False  # zipf-tuned: pinned rows and segment sizes come from a frequency profile

    @property
    def text(self) -> str:
        """The canonical name, e.g. ``'static+lru+tinylfu'``."""
        if self.tuned:
            parts = ["zipf-tuned"] + ([self.eviction] if self.eviction != "lru" else [])
        else:
            parts = (["static"] if self.static else []) + ([self.eviction] if self.eviction else [])
        parts += [self.admission] if self.admission != "all" else []
        return "+".join(parts)

    @classmethod
    def parse(cls, text: str, *, key: str = "policy") -> PolicySpec:
        """``'static+lru'`` -> PolicySpec(eviction='lru', admission='all', static=True)."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(
                f"{key}: got {text!r}; expected a policy name like 'lru' or 'static+lru'"
            )
        eviction, admission, static, tuned = None, "all", False, False
        for part in (p.strip().lower() for p in text.split("+")):
            if part in EVICTION:
                if eviction is not None:
                    raise ConfigError(f"{key}: {text!r} names two eviction policies; expected one")
                eviction = part
            elif part in ADMISSION:
                admission = part
            elif part == "static":
                static = True
            elif part == "zipf-tuned":
                static = tuned = True
            elif part in OFFLINE:
                raise ConfigError(
                    f"{key}: {part!r} is an offline bound, usable in replay only; "
                    f"expected one of {', '.join(known_names())}"
                )
            else:
                raise ConfigError(
                    f"{key}: unknown policy {part!r} in {text!r}; known: {', '.join(known_names())}"
                )
        if eviction is None and not static:
            raise ConfigError(
                f"{key}: {text!r} has no eviction policy; expected one of {sorted(EVICTION)}"
            )
        if tuned and eviction is None:
            eviction = "lru"  # the recency segment's default
        return cls(eviction, admission, static, tuned)

    def build(self, capacity: int, num_rows: int, device) -> tuple[EvictionPolicy, AdmissionPolicy]:
        """Instantiate the eviction policy and admission filter for a tier."""
        eviction = (
            EVICTION[self.eviction](capacity, device)
            if self.eviction
            else NoEviction(capacity, device)
        )
        admission = ADMISSION[self.admission]
        if getattr(admission, "sized_by_capacity", False):  # per-tier state, e.g. a sketch
            return eviction, admission(num_rows, device, capacity=capacity)
        return eviction, admission(num_rows, device)


# Offline bounds: they see the whole trace (replay and curves only, never a live tier).
OFFLINE: dict[str, Callable[..., OfflineBound]] = {"static-topk": StaticTopK, "belady": Belady}


def register_offline(name: str, factory: Callable[..., OfflineBound]) -> None:
    """Make an offline bound available by name to replay and the curves."""
    OFFLINE[name] = factory


def offline_names() -> list[str]:
    """Every offline bound's name, in registration order."""
    return list(OFFLINE)


def is_offline(text: str) -> bool:
    """Whether ``text`` names an offline bound rather than an online policy spec."""
    return isinstance(text, str) and text.strip().lower() in OFFLINE


def offline_bound(text: str, *, key: str = "policy") -> OfflineBound:
    """The offline bound named ``text``, with its default settings."""
    if not is_offline(text):
        raise ConfigError(
            f"{key}: {text!r} is not an offline bound; expected one of {', '.join(OFFLINE)}"
        )
    return OFFLINE[text.strip().lower()]()
