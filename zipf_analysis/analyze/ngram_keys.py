"""Distinct N-gram keys over token sequences, and the hash-collision rates they give per head."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from policies.hash_mix import splitmix64
from tiered_store.integers import as_integer
from tiered_store.profile import FrequencyProfile

__all__ = ["MIX_NOTE", "NgramKeyCounter", "collision_figures", "sum_collisions"]

MIX_NOTE = "64-bit mix of the compressed ids (splitmix64 chain; collisions below 2^-32 per pair)"


class NgramKeyCounter:
    """Counts distinct N-gram keys (orders 2..N) over sequences of compressed token ids.

    A key is the tuple of the last n compressed ids at a position, the compressed pad id standing
    in before the sequence start (as the hasher does). When ``n x bits`` fits in 63 bits (bits =
    width of the largest compressed id: 17 for DeepSeek's 99,092, so n <= 3) the ids are packed
    into one int64 and the count is exact; otherwise the key is a 64-bit mix of the ids (see
    :attr:`key_method`). Distinct keys are kept as sorted arrays merged as they grow, so memory is
    8 bytes per distinct key.

    Parameters
    ----------
    max_ngram_size : int
        Longest order counted (orders 2..max_ngram_size).
    num_compressed : int
        Compressed vocabulary size.
    pad_id : int
        Compressed pad id, in [0, num_compressed) as every id added.

    Examples
    --------
    >>> kc = NgramKeyCounter(3, num_compressed=10, pad_id=0)
    >>> kc.add([np.array([1, 2, 1, 2]), np.array([1, 2])])
    >>> kc.distinct()      # 2-grams (0,1) (1,2) (2,1); 3-grams (0,0,1) (0,1,2) (1,2,1) (2,1,2)
    {2: 3, 3: 4}
    """

    def __init__(self, max_ngram_size: int, num_compressed: int, pad_id: int) -> None:
        for name, value, least in (
            ("max_ngram_size", max_ngram_size, 2),
            ("num_compressed", num_compressed, 1),
        ):
            if (number := as_integer(value)) is None or number < least:
                raise ValueError(f"{name}: got {value!r}; expected an integer >= {least}")
        pad = as_integer(pad_id)  # one past the vocabulary spills into the next id's bits
        if pad is None or not 0 <= pad < num_compressed:
            raise ValueError(
                f"pad_id: got {pad_id!r}; expected a compressed id in [0, {num_compressed})"
            )
        self.num_compressed = int(num_compressed)
        self.orders = tuple(range(2, max_ngram_size + 1))
        self.bits = max(1, int(num_compressed - 1).bit_length())
        self.pad_id = int(pad_id)
        self._merged: dict[int, np.ndarray] = {n: np.empty(0, np.int64) for n in self.orders}
        self._pending: dict[int, list[np.ndarray]] = {n: [] for n in self.orders}
        self._pending_size = dict.fromkeys(self.orders, 0)

    def exact(self, n: int) -> bool:
        """Whether order ``n``'s keys are packed exactly (else mixed)."""
        return n * self.bits <= 63

    @property
    def key_method(self) -> dict[int, str]:
        """How each order's keys are formed."""
        return {
            n: f"exact: {n} ids x {self.bits} bits packed into one int64"
            if self.exact(n)
            else MIX_NOTE
            for n in self.orders
        }

    def add(self, sequences: Sequence[np.ndarray]) -> None:
        """Count the keys of a batch of sequences (1-D compressed ids each, any lengths)."""
        seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
        seqs = [s for s in seqs if s.size]
        if not seqs:
            return
        x = np.concatenate(seqs)
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= self.num_compressed:  # packed, it would read as another key
            raise ValueError(
                f"compressed ids span [{lo}, {hi}]; expected ids in [0, {self.num_compressed})"
            )
        lens = np.array([s.size for s in seqs], dtype=np.int64)
        starts = np.repeat(np.cumsum(lens) - lens, lens)
        pos = np.arange(x.size, dtype=np.int64) - starts  # position within its sequence
        key = x.copy()  # order 1 part; extended one id per order
        mixed = None if self.exact(self.orders[-1]) else splitmix64(x.astype(np.uint64))
        for k in range(1, self.orders[-1]):
            prev = np.empty_like(x)
            prev[k:] = x[:-k]
            prev[:k] = self.pad_id
            prev[pos < k] = self.pad_id
            n = k + 1
            if mixed is not None:  # chained over every id, so order n mixes all n of them
                mixed = splitmix64(mixed ^ (prev.astype(np.uint64) + np.uint64(k)))
            if self.exact(n):
                key = key | (prev << np.int64(self.bits * k))
                keys = key
            else:
                keys = mixed.view(np.int64)
            u = np.unique(keys)
            self._pending[n].append(u)
            self._pending_size[n] += u.size
            if self._pending_size[n] > max(self._merged[n].size, 1 << 20):
                self._merge(n)

    def _merge(self, n: int) -> None:
        """Fold the pending unique arrays of order ``n`` into the merged one."""
        if self._pending[n]:
            self._merged[n] = np.unique(np.concatenate([self._merged[n], *self._pending[n]]))
            self._pending[n] = []
            self._pending_size[n] = 0

    def distinct(self) -> dict[int, int]:
        """Distinct keys per order so far."""
        for n in self.orders:
            self._merge(n)
        return {n: int(self._merged[n].size) for n in self.orders}


def collision_figures(
    profile: FrequencyProfile,
    layout: Mapping[str, Any],
    keys: Mapping[int, int],
    key_method: Mapping[int, str],
) -> dict[str, Any]:
    """Distinct N-gram keys vs distinct rows per order and head, beside uniform hashing."""
    offsets = np.asarray(layout["offsets"], dtype=np.int64)
    primes = [int(p) for p in layout["primes"]]
    orders = [int(o) for o in layout["orders"]]
    head = np.searchsorted(offsets, profile.row_ids, side="right") - 1
    distinct = np.bincount(head, minlength=len(primes))
    out: dict[str, Any] = {"orders": {}}
    total_keys = total_rows = 0
    total_expected = 0.0
    for n in sorted(set(orders)):
        k = int(keys.get(n, 0))
        heads = []
        for j in (j for j, o in enumerate(orders) if o == n):
            p, d = primes[j], int(distinct[j])
            expected_rows = p * -math.expm1(-k / p)  # E[distinct rows]: k keys into p rows
            expected = 1.0 - expected_rows / k if k else None
            total_expected += expected_rows
            heads.append(
                {
                    "head": j,
                    "prime": p,
                    "distinct_rows": d,
                    "collision_rate": 1.0 - d / k if k else None,
                    "expected_uniform": expected,
                }
            )
            total_keys += k
            total_rows += d
        rates = [h["collision_rate"] for h in heads if h["collision_rate"] is not None]
        expected = [h["expected_uniform"] for h in heads if h["expected_uniform"] is not None]
        out["orders"][str(n)] = {
            "ngram_keys": k,
            "key_method": key_method.get(n),
            "collision_rate_mean": float(np.mean(rates)) if rates else None,
            "collision_rate_min": min(rates) if rates else None,
            "collision_rate_max": max(rates) if rates else None,
            "expected_uniform_mean": float(np.mean(expected)) if expected else None,
            "heads": heads,
        }
    out.update(
        sum_collisions(
            [
                {
                    "keys_over_heads": total_keys,
                    "distinct_rows": total_rows,
                    "expected_distinct_rows": total_expected,
                }
            ]
        )
    )
    return out


def sum_collisions(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collision rate over several tables' heads together."""
    keys = sum(p["keys_over_heads"] for p in parts)
    rows = sum(p["distinct_rows"] for p in parts)
    expected = sum(p["expected_distinct_rows"] for p in parts)
    return {
        "keys_over_heads": keys,
        "distinct_rows": rows,
        "expected_distinct_rows": expected,
        "collision_rate": 1.0 - rows / keys if keys else None,
        "expected_uniform": 1.0 - expected / keys if keys else None,
    }
