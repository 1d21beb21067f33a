"""Eviction policies and admission filters for the store's cache tiers, composed by name."""

from .base import AdmissionPolicy, EvictionPolicy, NoEviction
from .lru import LRU, ScalarLRU
from .registry import PolicySpec, known_names, register_admission, register_eviction

__all__ = [
    "LRU",
    "AdmissionPolicy",
    "EvictionPolicy",
    "NoEviction",
    "PolicySpec",
    "ScalarLRU",
    "known_names",
    "register_admission",
    "register_eviction",
]
