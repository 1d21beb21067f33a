"""Type stub of the package's lazy exports: what ``__init__.py`` imports on first use."""

from .base import AdmissionPolicy, EvictionPolicy, NoEviction
from .errors import PolicyError
from .lfu import LFU
from .lru import LRU
from .reference import (
    ScalarCache,
    ScalarFIFO,
    ScalarLFU,
    ScalarLRU,
    ScalarSieve,
    ScalarTinyLFU,
)
from .registry import PolicySpec, known_names, register_admission, register_eviction
from .sieve import FIFO, SIEVE
from .tinylfu import TinyLFU

__all__ = [
    "FIFO",
    "LFU",
    "LRU",
    "SIEVE",
    "AdmissionPolicy",
    "EvictionPolicy",
    "NoEviction",
    "PolicyError",
    "PolicySpec",
    "ScalarCache",
    "ScalarFIFO",
    "ScalarLFU",
    "ScalarLRU",
    "ScalarSieve",
    "ScalarTinyLFU",
    "TinyLFU",
    "known_names",
    "register_admission",
    "register_eviction",
]
