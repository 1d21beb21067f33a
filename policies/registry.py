"""One registry of policy names, shared by YAML, the CLI and Python.

A policy spec is ``+``-joined parts: at most one eviction policy, at most one admission filter, and
the ``static`` modifier (pin the tier's ``static_rows``). Examples: ``lru``, ``static+lru``,
``sieve+tinylfu``, ``static`` (pinned rows, misses into free slots, no eviction). Eviction: ``lru``,
``lfu`` (with aging), ``sieve`` (batched SIEVE: a batch's hits count before its victims are
chosen, so it differs from per-request SIEVE by sparing rows the batch reads, e.g. 54.41% against
71.35% rows from cold on an Engram prose trace at 1% of the rows; see ``policies.sieve.SIEVE``),
``fifo``; admission: ``all`` (default), ``tinylfu``. An admission class that declares
``sized_by_capacity = True`` also receives ``capacity=`` (the tier's slots); one whose bytes are
known only once built (``bytes_per_tier`` a property) overrides ``AdmissionPolicy.bytes_for`` so
memory budgets can price its tier. A bad spec raises :class:`~policies.errors.PolicyError`.

Offline bounds (``belady``, ``static-topk``) are registry names too, of their own kind: they see
the whole trace, so replay and the miss-ratio curves run them, and a live tier's spec refuses them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from .base import AdmissionPolicy, EvictionPolicy, NoEviction
from .errors import PolicyError
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
ADMISSION: dict[str, type[AdmissionPolicy]] = {"all": AdmissionPolicy, "tinylfu": TinyLFU}
MODIFIERS = ("static", "zipf-tuned")


def register_eviction(name: str, factory: Callable[..., EvictionPolicy]) -> None:
    """Make an eviction policy available by name everywhere (see :func:`check_name`)."""
    check_name("eviction", name)
    EVICTION[name] = factory


def register_admission(name: str, factory: type[AdmissionPolicy]) -> None:
    """Make an admission filter (a subclass of ``AdmissionPolicy``) available by name everywhere
    (see :func:`check_name`)."""
    check_name("admission", name)
    ADMISSION[name] = factory


def check_name(kind: str, name: object) -> None:
    """PolicyError unless ``name`` can name a policy of ``kind`` (``eviction``, ``admission`` or
    ``offline``): a spec reads its parts in lower case and split at '+', replay's --policies
    splits at ','; a name another kind or a modifier has would change what a spec means.

    >>> check_name("eviction", "tinylfu")
    Traceback (most recent call last):
    ...
    policies.errors.PolicyError: eviction name 'tinylfu': an admission filter already; expected a name no other kind of policy has
    """
    if (
        not isinstance(name, str)
        or not name
        or name != name.strip().lower()
        or "+" in name
        or "," in name
    ):
        raise PolicyError(
            f"{kind} name {name!r}: expected a non-empty name in lower case, with no '+' and no "
            "',' (a spec is read in lower case and split at '+', replay's --policies at ',')"
        )
    taken = {
        "eviction": ("an eviction policy", EVICTION),
        "admission": ("an admission filter", ADMISSION),
        "offline": ("an offline bound", OFFLINE),
        "modifier": (f"a modifier ({', '.join(MODIFIERS)})", MODIFIERS),
    }
    for other, (what, names) in taken.items():
        if other != kind and name in names:
            raise PolicyError(
                f"{kind} name {name!r}: {what} already; expected a name no other kind of policy has"
            )


def known_names() -> list[str]:
    """Every name a spec part may use."""
    return sorted([*EVICTION, *ADMISSION, *MODIFIERS])


def spec_grammar() -> str:
    """What a policy spec may be, for error messages.

    >>> print(spec_grammar())
    an eviction policy (fifo, lfu, lru, sieve), optionally with 'static+' before it and an admission filter (+tinylfu) after it, or zipf-tuned, optionally with an eviction policy (lru by default) and an admission filter (+tinylfu) after it
    """
    filters = ", ".join(f"+{name}" for name in sorted(ADMISSION) if name != "all")
    return (
        f"an eviction policy ({', '.join(sorted(EVICTION))}), optionally with 'static+' before it "
        f"and an admission filter ({filters}) after it, or zipf-tuned, optionally with an "
        f"eviction policy (lru by default) and an admission filter ({filters}) after it"
    )


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
    def parse(cls, text: str) -> PolicySpec:
        """``'static+lru'`` -> PolicySpec(eviction='lru', admission='all', static=True).

        Raises :class:`~policies.errors.PolicyError` naming the spec and what was expected.

        Examples
        --------
        >>> PolicySpec.parse("static+lru").text
        'static+lru'
        >>> PolicySpec.parse("lru+lru")
        Traceback (most recent call last):
        ...
        policies.errors.PolicyError: policy 'lru+lru' names two eviction policies; expected one
        """
        if not isinstance(text, str) or not text.strip():
            raise PolicyError(f"policy {text!r}: expected a policy name like 'lru' or 'static+lru'")
        eviction, admission, static, tuned = None, "all", False, False
        admission_named, modifier = False, None
        for part in (p.strip().lower() for p in text.split("+")):
            if part in EVICTION:
                if eviction is not None:
                    raise PolicyError(f"policy {text!r} names two eviction policies; expected one")
                eviction = part
            elif part in ADMISSION:
                if admission_named:
                    raise PolicyError(f"policy {text!r} names two admission filters; expected one")
                admission, admission_named = part, True
            elif part in MODIFIERS:
                if modifier is not None:
                    raise PolicyError(
                        f"policy {text!r} names two modifiers ({modifier!r} and {part!r}); "
                        "expected at most one"
                    )
                modifier, static, tuned = part, True, part == "zipf-tuned"
            elif part in OFFLINE:
                raise PolicyError(
                    f"{part!r} is an offline bound, usable in replay only; "
                    f"expected one of {', '.join(known_names())}"
                )
            else:
                close = difflib.get_close_matches(part, known_names(), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise PolicyError(
                    f"unknown policy {part!r} in {text!r}; {hint}expected {spec_grammar()}"
                )
        if eviction is None and not static:
            raise PolicyError(
                f"policy {text!r} has no eviction policy; expected one of {sorted(EVICTION)}"
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
        if admission.sized_by_capacity:  # per-tier state, e.g. a sketch
            return eviction, admission(num_rows, device, capacity=capacity)
        return eviction, admission(num_rows, device)


# Offline bounds: they see the whole trace (replay and curves only, never a live tier).
OFFLINE: dict[str, Callable[..., OfflineBound]] = {"static-topk": StaticTopK, "belady": Belady}


def register_offline(name: str, factory: Callable[..., OfflineBound]) -> None:
    """Make an offline bound available by name to replay and the curves (see
    :func:`check_name`)."""
    check_name("offline", name)
    OFFLINE[name] = factory


def offline_names() -> list[str]:
    """Every offline bound's name, in registration order."""
    return list(OFFLINE)


def is_offline(text: str) -> bool:
    """Whether ``text`` names an offline bound rather than an online policy spec."""
    return isinstance(text, str) and text.strip().lower() in OFFLINE


def offline_bound(text: str) -> OfflineBound:
    """The offline bound named ``text``, with its default settings."""
    if not is_offline(text):
        raise PolicyError(f"{text!r} is not an offline bound; expected one of {', '.join(OFFLINE)}")
    return OFFLINE[text.strip().lower()]()
