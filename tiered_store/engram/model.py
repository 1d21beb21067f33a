"""A small but real Engram language model: Transformer blocks with hyper-connections and Engram.

Layout (``[B, T, hc_mult, hidden]`` is the hyper-connection hidden state, as in the reference)::

    h = expand(token_embedding(input_ids))              # every branch starts as the embedding
    for each layer l:
        if l carries Engram:  h = h + Engram_l(h)        # the demo's residual add, or
                              h = V41Engram_l(h)         # DeepSeek-V4.1: h + gate * value inside
        h = HC_attn_l(h, x -> Attention(RMSNorm(x)))
        h = HC_mlp_l(h,  x -> SwiGLU(RMSNorm(x)))
    logits = RMSNorm(sum over branches of h) @ token_embedding.T      # tied LM head

Hyper-connections are the *static* scheme of Zhu et al., "Hyper-Connections" (ICLR 2025): around
each sublayer ``f``, with learned ``read`` [hc], ``mix`` [hc, hc] and ``write`` [hc]::

    x = sum_i read[i] * h[:, :, i]                       # what the sublayer sees
    h'[:, :, j] = sum_i mix[i, j] * h[:, :, i] + write[j] * f(x)

initialised as ``read`` = one-hot on branch ``layer % hc_mult``, ``mix`` = identity, ``write`` =
ones, which makes the network a pre-norm residual Transformer at initialisation. (The dynamic,
input-dependent variant is left out: the point here is the memory system, not the backbone.)

Each Engram layer's table is a ``TableBackend``: an ``InMemoryTable`` (trainable) or a
``TieredStore`` (read-only: gradients reach the dense parameters only; updating a stored table is
a later capability). ``EngramLM.prefetch(input_ids)`` hashes the batch for every Engram layer in
one pass and starts each table's fetch before any layer computes.

With ``config.engram.is_v41`` (DeepSeek-V4.1's geometry) the Engram layers are
:class:`~tiered_store.engram.v41_module.V41Engram` modules over tables of packed fp8 rows
(``PackedInMemoryTable`` or a ``TieredStore`` over a packed table); a batch's ``token_mask``
marks dead tokens, which the hasher skips and the Engram layer passes through unchanged.

Decoding: ``KVCache`` keeps every attention layer's keys and values; the hasher's ``HashState``
carries the N-gram look-back between chunks, so a prompt and then one token per step give the
row ids and attention of one full pass::

    state, cache = model.hasher.new_state(batch_size), model.new_cache()
    batch = model.prefetch(prompt, state=state)          # [B, T]; fetches start here
    logits = model(prompt, prefetched=batch, cache=cache, logits="last")
    token = logits.argmax(-1, keepdim=True)              # [B, 1], then the same per step
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..capacity import available_host_memory, format_bytes
from ..errors import ConfigError
from ..id_ops import array_for_torch, ids_on_gpu, snapshot_of
from ..quantization import RowQuantization, quantize_rows
from .backend import PackedInMemoryTable, TableBackend, swap_table
from .config import ModelConfig, TransformerConfig
from .hashing import HashState, NgramHasher, hasher_for, rewound_on_failure
from .layout import check_backend_layout
from .module import Engram, check_checkpoint_tensor
from .tokenizer import check_token_ids
from .v41_module import V41Engram

__all__ = [
    "EngramBatch",
    "EngramLM",
    "HyperConnection",
    "KVCache",
    "ModelConfig",
    "TransformerConfig",
]

V41_SCALE_BLOCK = 32  # columns per ue8m0 scale byte in V4.1's packed rows
_RANDOM_CHUNK_VALUES = 1 << 22  # float32 values drawn at a time for a random packed table (16 MiB)

Logits = Literal["all", "last", "none"]


@dataclass
class EngramBatch:
    """A batch whose Engram row ids are hashed (every layer, one pass) and whose fetches started.

    ``handles[layer]`` is the table's prefetch handle (``None`` when nothing was prefetched or the
    table has nothing to wait for). The first forward to reach a layer consumes its handle (and
    sets it to ``None``): a later forward of the batch, a retry after a failure, looks the rows up
    (over a ``ShardedStore`` that lookup is a collective round: every rank must rerun the batch).
    """

    input_ids: torch.Tensor  # [B, T] original token ids
    row_ids: dict[int, torch.Tensor]  # layer -> [B, T, H] rows of that layer's table
    handles: dict[int, object | None]
    token_mask: torch.Tensor  # [B, T] bool: False marks dead tokens (all True for plain text)
    position: int = 0  # absolute position of the first token (its HashState's position)
    given: Any = field(default=None, repr=False)  # the ids as the caller gave them to hash()
    hasher: NgramHasher | None = field(default=None, repr=False)  # the hasher that hashed them

    @property
    def tokens(self) -> int:
        """Tokens in the batch (B * T)."""
        return self.input_ids.numel()


class HyperConnection(nn.Module):
    """Static hyper-connection around one sublayer (see the module docstring).

    Examples
    --------
    >>> hc = HyperConnection(hc_mult=4, branch=1)
    >>> h = torch.randn(2, 3, 4, 8)
    >>> out = hc(h, lambda x: 2 * x)          # x is branch 1 at initialisation
    >>> torch.allclose(out, h + 2 * h[:, :, 1:2])
    True
    """

    def __init__(self, hc_mult: int, branch: int) -> None:
        super().__init__()
        read = torch.zeros(hc_mult)
        read[branch % hc_mult] = 1.0
        self.read = nn.Parameter(read)
        self.mix = nn.Parameter(torch.eye(hc_mult))
        self.write = nn.Parameter(torch.ones(hc_mult))

    def forward(self, h: torch.Tensor, sublayer: Any) -> torch.Tensor:
        """``h`` [B, T, hc, D] -> mixed branches plus the written sublayer output."""
        x = torch.einsum("bthd,h->btd", h, self.read)
        y = sublayer(x)
        mixed = torch.einsum("bthd,hg->btgd", h, self.mix)
        return mixed + y.unsqueeze(2) * self.write.view(1, 1, -1, 1)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary position embeddings (no biases)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """[B, T, D] (after ``past`` keys/values [B, heads, P, head_dim]) -> [B, T, D] and the
        keys/values of all P + T positions."""
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        if past is None or past[0].shape[2] == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            seen = k.shape[2] - seq
            mask = None  # one new token sees every position
            if seq > 1:
                rows = torch.arange(seq, device=x.device).unsqueeze(1) + seen
                mask = rows >= torch.arange(seen + seq, device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, seq, width)), (k, v)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, T, D]."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class KVCache:
    """Every attention layer's keys and values, and every Engram ShortConv's last inputs, for the
    positions seen so far (decoding).

    Made by :meth:`EngramLM.new_cache`; each forward given the cache appends its positions (none
    when it raises: the cache is as before it, so the same batch may be run again).
    """

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.conv: dict[int, dict[str, torch.Tensor]] = {}  # an Engram ShortConv's past inputs
        self.position = 0  # positions held (the next token's absolute position)

    def _sequences(self) -> int | None:
        """Sequences (batch rows) the cache holds positions of; None while it holds none."""
        held = next(iter(self.layers.values()), None)
        return int(held[0].shape[0]) if held is not None and self.position else None

    def _restore(self, conv: dict[int, dict[str, torch.Tensor]]) -> None:
        """Back to ``position`` positions (views, no copy) and the ShortConv inputs ``conv``."""
        held = self.position
        kept = self.layers.items() if held else ()
        self.layers = {i: (k[:, :, :held], v[:, :, :held]) for i, (k, v) in kept}
        self.conv = conv


class DecoderLayer(nn.Module):
    """Optional Engram (the demo's residual add, or V4.1's module, which returns the new stream),
    then attention and MLP, each inside a hyper-connection."""

    def __init__(self, config: ModelConfig, index: int, engram: Engram | V41Engram | None) -> None:
        super().__init__()
        hidden, hc = config.backbone.hidden_size, config.backbone.hc_mult
        tc = config.transformer
        self.index = index
        self.engram = engram
        self.attn_norm = nn.RMSNorm(hidden, eps=tc.norm_eps)
        self.attn = Attention(hidden, tc.num_attention_heads)
        self.attn_hc = HyperConnection(hc, 2 * index)
        self.mlp_norm = nn.RMSNorm(hidden, eps=tc.norm_eps)
        self.mlp = SwiGLU(hidden, tc.mlp_size(hidden))
        self.mlp_hc = HyperConnection(hc, 2 * index + 1)

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: EngramBatch,
        cache: KVCache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """[B, T, hc, D] -> [B, T, hc, D] (appends this layer's keys/values to ``cache``);
        ``mask``: the batch's token mask on ``h``'s device (for V4.1 layers; None without)."""
        row_ids, handle = batch.row_ids.get(self.index), batch.handles.get(self.index)
        if handle is not None:  # this forward consumes it: a rerun of the batch looks rows up
            batch.handles[self.index] = None
        if isinstance(self.engram, V41Engram):
            h = self.engram(h, row_ids, mask, handle)
        elif self.engram is not None:
            conv = cache.conv.setdefault(self.index, {}) if cache is not None else None
            h = h + self.engram(h, row_ids=row_ids, handle=handle, conv_state=conv)
        past = cache.layers.get(self.index) if cache is not None else None

        def attend(x: torch.Tensor) -> torch.Tensor:
            y, kv = self.attn(self.attn_norm(x), rope, past)
            if cache is not None:
                cache.layers[self.index] = kv
            return y

        h = self.attn_hc(h, attend)
        return self.mlp_hc(h, lambda x: self.mlp(self.mlp_norm(x)))


class EngramLM(nn.Module):
    """A decoder-only language model with Engram memory at ``config.engram.layer_ids``.

    Parameters
    ----------
    config
        Model shapes (Engram, backbone, Transformer sections).
    hasher
        Shared ``NgramHasher`` (default: a new one with the DeepSeek tokenizer).
    tables
        ``{layer_id: TableBackend}`` for some or all Engram layers (e.g. ``TieredStore`` per layer,
        from ``tiered_store.engram.checkpoint.open_tables``). Layers left out get a trainable
        ``InMemoryTable`` (allocates the whole table); with the V4.1 geometry a
        ``PackedInMemoryTable`` of random fp8 rows instead.

    Raises
    ------
    ConfigError
        A table's rows/dim do not match its layer, or the Engram layout it tells
        (``engram_layout``: a table file's) is another's; ``tables`` is no mapping, or gives a
        table for a layer without Engram; or ``backbone.vocab_size`` is smaller than the
        tokenizer vocabulary.

    Examples
    --------
    >>> cfg = ModelConfig.from_dict({
    ...     "engram": {"engram_vocab_size": [2003, 3001], "n_embed_per_ngram": 64,
    ...                "n_head_per_ngram": 4, "layer_ids": [1, 3]},
    ...     "backbone": {"hidden_size": 64, "hc_mult": 4, "num_layers": 4}})
    >>> torch.manual_seed(0) and None
    >>> model = EngramLM(cfg)
    >>> ids = model.hasher.tokenizer.encode("def lookup(table, ids): return table[ids]")[None]
    >>> ids = torch.from_numpy(ids)                                  # [B=1, T]
    >>> model(ids).shape                                             # logits [B, T, vocab]
    torch.Size([1, 11, 129280])
    >>> batch = model.prefetch(ids)          # hash every Engram layer, start each table's fetch
    >>> model(ids, prefetched=batch, logits="last").shape            # [B, vocab]
    torch.Size([1, 129280])
    >>> loss = model.loss(ids); loss.backward()                      # trainable on CPU

    DeepSeek-V4.1's geometry (``V41Engram`` layers, packed fp8 tables, dead tokens) and decoding
    one token per step:

    >>> v41 = ModelConfig.from_dict({
    ...     "engram": {"geometry": "deepseek-v4.1", "engram_vocab_size": 101, "max_ngram_size": 3,
    ...                "n_embed_per_ngram": 128, "n_head_per_ngram": 4, "layer_ids": [1]},
    ...     "backbone": {"hidden_size": 64, "num_layers": 2}})
    >>> model = EngramLM(v41)
    >>> type(model.engram_layers[1]).__name__, type(model.tables[1]).__name__
    ('V41Engram', 'PackedInMemoryTable')
    >>> state, cache = model.hasher.new_state(1), model.new_cache()
    >>> batch = model.prefetch(ids, state=state)                     # the prompt
    >>> token = model(ids, prefetched=batch, cache=cache, logits="last").argmax(-1, keepdim=True)
    >>> step = model.prefetch(token, state=state)                    # one token, at position 11
    >>> model(token, prefetched=step, cache=cache, logits="last").shape, cache.position
    (torch.Size([1, 129280]), 12)
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        hasher: NgramHasher | None = None,
        tables: Mapping[int, TableBackend] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.hasher = hasher_for(config.engram, hasher, "config.engram has")
        backbone, tc = config.backbone, config.transformer
        if backbone.vocab_size < self.hasher.tokenizer.vocab_size:
            raise ConfigError(
                f"backbone.vocab_size: expected at least the tokenizer's "
                f"{self.hasher.tokenizer.vocab_size} ids, got {backbone.vocab_size}"
            )
        tables = _table_mapping(tables) if tables is not None else {}
        # a set: keys as tables.get(layer) finds them (a tensor 1 == 1 is no key 1); in the
        # order given (a key read from text, '1', sorts with no int)
        engram_ids = set(config.engram.layer_ids)
        extra = [layer for layer in tables if layer not in engram_ids]
        if extra:
            raise ConfigError(
                f"tables: layer {extra[0]!r} has no Engram (engram.layer_ids = "
                f"{list(config.engram.layer_ids)})"
            )
        if torch.empty(0).device.type == "cpu":  # not on meta (shapes only) nor on a GPU
            check_model_memory(config, given=tables)  # before the allocator fails on absurd sizes
        self.embed = nn.Embedding(backbone.vocab_size, backbone.hidden_size)
        layers = []
        for index in range(backbone.num_layers):
            engram = None
            if index in config.engram.layer_ids and config.engram.is_v41:
                engram = self._v41_engram(index, tables.get(index))
            elif index in config.engram.layer_ids:
                engram = Engram(
                    config.engram,
                    backbone,
                    index,
                    hasher=self.hasher,
                    backend=tables.get(index),
                    backend_name=f"tables[{index}]",
                )
            layers.append(DecoderLayer(config, index, engram))
        self.layers = nn.ModuleList(layers)
        self.final_norm = nn.RMSNorm(backbone.hidden_size, eps=tc.norm_eps)
        self._init_dense(tc.init_std)
        self._rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (device, dtype)

    # -- tables -----------------------------------------------------------------------------------

    @property
    def engram_layers(self) -> dict[int, Engram | V41Engram]:
        """``{layer_id: Engram module}`` (``V41Engram`` with the V4.1 geometry)."""
        return {i: layer.engram for i, layer in enumerate(self.layers) if layer.engram is not None}

    @property
    def tables(self) -> dict[int, TableBackend]:
        """``{layer_id: table backend}``."""
        return {i: engram.table for i, engram in self.engram_layers.items()}

    def set_tables(self, tables: Mapping[int, TableBackend]) -> None:
        """Serve the given Engram layers' rows from other backends (rows and dim are checked, and
        the Engram layout a backend tells, ``engram_layout``; none swapped when one fails or a
        Ctrl-C interrupts the swap)."""
        engrams, tables = self.engram_layers, _table_mapping(tables)
        for layer_id in tables:
            if layer_id not in engrams:
                raise ConfigError(
                    f"tables: layer {layer_id!r} has no Engram (engram.layer_ids = {list(engrams)})"
                )
        for layer_id, table in tables.items():  # check every table before swapping any
            engram = engrams[layer_id]
            if isinstance(engram, V41Engram):
                self._check_v41_table(layer_id, table)
            else:
                engram._check_backend(table, f"tables[{layer_id}]")
        swapped: list[tuple[Engram | V41Engram, TableBackend]] = []  # each layer's old table
        try:  # checked above: swapped as they are
            for layer_id, table in tables.items():
                engram = engrams[layer_id]
                swapped.append((engram, engram.table))
                _swap(engram, table)  # interrupted: the old one
        except BaseException:  # a Ctrl-C between two layers: every layer's old table again
            _put_back(swapped)
            raise

    def dense_parameters(self) -> int:
        """Parameters outside the Engram tables (token embedding included)."""
        table_ids = {
            id(p) for t in self.tables.values() if isinstance(t, nn.Module) for p in t.parameters()
        }
        return sum(p.numel() for p in self.parameters() if id(p) not in table_ids)

    def table_parameters(self) -> int:
        """Rows x dim summed over the Engram tables."""
        return sum(int(t.rows) * int(t.dim) for t in self.tables.values())

    # -- addressing and prefetch ------------------------------------------------------------------

    def hash(
        self, input_ids: Any, token_mask: Any = None, state: HashState | None = None
    ) -> EngramBatch:
        """Check ``input_ids`` [B, T] and hash them for every Engram layer (no fetch started).

        ``token_mask`` (bool [B, T], default all True) marks dead tokens; ``state`` (from
        ``hasher.new_state(B)``) continues sequences hashed before (chunked prefill, decode) and
        is advanced past these ids."""
        return self._hash(input_ids, token_mask, state)

    def _hash(
        self,
        input_ids: Any,
        token_mask: Any = None,
        state: HashState | None = None,
        *,
        owned: bool = False,
        name: str = "input_ids",
        checked: torch.Tensor | None = None,
    ) -> EngramBatch:
        """``hash``; ``owned``: ``input_ids`` is a copy made for this batch alone (no caller
        refills it: the pipeline's pinned copy), kept without a copy of its own; ``name``: the
        ids in errors about them; ``checked``: ``_check_input``'s ids of ``input_ids``, made
        already (not checked again)."""
        gpu = self.embed.weight.device.type == "cuda"  # pinned ids to keep pinned (else unasked)
        narrow = _narrow_host_ids(input_ids) if checked is None and gpu else None
        if narrow is not None and narrow.is_pinned():  # converted into a pinned copy, the
            # batch's own, as the pipeline does: not into an int64 one the GPU's copy waits for
            checked, owned = _pinned_host_ids(self, narrow, name)
        if checked is None:
            checked = self._check_input(input_ids, name)
        ids = checked if owned else _snapshot(checked, input_ids, gpu)
        mask = _snapshot(_token_mask(token_mask, ids, gpu), token_mask, gpu)
        position = state.position if isinstance(state, HashState) else 0  # others: refused below
        rows = self.hasher.row_ids(ids, token_mask=mask, state=state)
        layers = dict.fromkeys(self.engram_layers)
        return EngramBatch(ids, rows, layers, mask, position, given=input_ids, hasher=self.hasher)

    def prefetch(
        self, input_ids: Any, token_mask: Any = None, state: HashState | None = None
    ) -> EngramBatch:
        """Hash ``input_ids`` for every Engram layer (arguments as in ``hash``) and start each
        table's fetch (in layer order, so the first Engram layer's rows are ready first). When a
        fetch fails, ``state`` is left where it was, so the same ids may be prefetched again."""
        with rewound_on_failure(state):
            return self.fetch(self.hash(input_ids, token_mask, state))

    def fetch(self, batch: EngramBatch) -> EngramBatch:
        """Start each table's fetch of a batch ``hash`` made (``prefetch`` without the hashing:
        for rows hashed earlier, e.g. to announce a queued request)."""
        if not isinstance(batch, EngramBatch):
            raise ConfigError(
                f"batch: got a {type(batch).__name__}; expected an EngramBatch from "
                "model.hash(input_ids)"
            )
        self._check_batch_origin(batch)
        for layer_id, table in self.tables.items():
            batch.handles[layer_id] = table.prefetch(batch.row_ids[layer_id])
        return batch

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Any,
        *,
        prefetched: EngramBatch | None = None,
        logits: Logits = "all",
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Next-token logits for ``input_ids`` [B, T].

        Parameters
        ----------
        input_ids
            Original token ids [B, T] (tensor, array or nested lists).
        prefetched
            The ``EngramBatch`` from ``prefetch(input_ids)``; without it the batch is hashed and
            prefetched here, before the first layer runs (from position 0: refused with a
            ``cache`` that holds positions). Given with its own ``input_ids`` (the ids it
            hashed), they are not compared again.
        logits
            ``"all"``: [B, T, vocab]; ``"last"``: [B, vocab] for the last position only (prefill,
            as in serving); ``"none"``: the final normalised hidden state [B, T, hidden].
        cache
            A ``KVCache`` (``new_cache()``) of the positions before these ids: attention sees them
            and the cache is extended by these. ``prefetched`` must then come from the sequences'
            ``HashState`` at the same position.

        Raises
        ------
        RowIdError
            A token id is outside the tokenizer vocabulary (checked before any compute).
        ConfigError
            ``input_ids`` is not [B, T], ``prefetched`` belongs to other ids or was hashed by
            another model (other Engram layers, Engram config or tokenizer), or it was hashed at
            another position than the cache holds, or holds another number of sequences.
        """
        if prefetched is not None and not isinstance(prefetched, EngramBatch):
            raise ConfigError(
                f"prefetched: got a {type(prefetched).__name__}; expected an EngramBatch from "
                "model.prefetch(input_ids) or model.hash(input_ids), or None"
            )
        if cache is not None and not isinstance(cache, KVCache):
            raise ConfigError(
                f"cache: got a {type(cache).__name__}; expected a KVCache from model.new_cache(), "
                "or None"
            )
        if prefetched is None and cache is not None and cache.position:  # before any fetch
            raise ConfigError(
                f"prefetched: none given, so input_ids would be hashed at position 0 but the "
                f"cache holds {cache.position} positions; expected the batch of the sequences' "
                "next tokens, model.prefetch(input_ids, state=state) with the HashState that "
                "hashed the cached positions"
            )
        if prefetched is None:
            prefetched = self.prefetch(input_ids)
        elif input_ids is not prefetched.input_ids and not (
            input_ids is prefetched.given and ids_on_gpu(input_ids)
        ):
            # the batch's own ids (the copy it hashed, no caller's buffer) or, on the GPU, the
            # object given to prefetch(): trusted (comparing would wait for the GPU); on the
            # CPU a buffer refilled since prefetch() must not pass for the ids it hashed
            ids = self._check_input(input_ids)
            if ids.shape != prefetched.input_ids.shape or not torch.equal(
                ids.cpu(), prefetched.input_ids.cpu()
            ):
                raise ConfigError(
                    "prefetched: this EngramBatch was made for other input_ids; pass the ids "
                    "given to prefetch()"
                )
        self._check_batch_origin(prefetched)
        if logits not in ("all", "last", "none"):
            raise ConfigError(f"logits: expected 'all', 'last' or 'none', got {logits!r}")
        start = cache.position if cache is not None else 0
        if prefetched.position != start:
            if cache is None:
                raise ConfigError(
                    f"prefetched: hashed at position {prefetched.position} but no cache was "
                    "given (positions from 0); expected the KVCache of the "
                    f"{prefetched.position} positions hashed before it (model.new_cache(), given "
                    "to each forward), or a batch hashed without a HashState"
                )
            raise ConfigError(
                f"prefetched: hashed at position {prefetched.position} but the cache holds "
                f"{start} positions; expected the batch of the sequences' next tokens (hash "
                "with the HashState that hashed the cached positions)"
            )
        held, batch = cache._sequences() if cache is not None else None, len(prefetched.input_ids)
        if held is not None and held != batch:
            raise ConfigError(
                f"prefetched: a batch of {batch} sequences but the cache holds {held}; expected "
                "the next tokens of the cache's sequences, one row each"
            )
        ids = _to_device(prefetched.input_ids, self.embed.weight.device)
        hc = self.config.backbone.hc_mult
        h = self.embed(ids).unsqueeze(2).expand(-1, -1, hc, -1)
        rope = self._rope_tables(start, ids.shape[1], h.device, h.dtype)
        conv = {i: dict(inputs) for i, inputs in cache.conv.items()} if cache is not None else {}
        mask = None  # V4.1 layers': copied to the model's device once (pinned: asynchronously)
        if self.config.engram.is_v41:
            mask = _to_device(prefetched.token_mask, h.device)
        try:
            for layer in self.layers:
                h = layer(h, rope, prefetched, cache, mask)
            x = h.sum(dim=2)
            if logits == "last":
                x = x[:, -1]
            x = self.final_norm(x)
            out = x if logits == "none" else F.linear(x, self.embed.weight)  # (the largest)
        except BaseException:
            if cache is not None:  # layers before the failure extended it: a retry would
                cache._restore(conv)  # attend to their positions twice
            raise
        if cache is not None:
            cache.position += ids.shape[1]
        return out

    def loss(self, input_ids: Any, *, prefetched: EngramBatch | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over ``input_ids`` [B, T] (position t predicts t + 1)."""
        ids = prefetched.input_ids if prefetched is not None else self._check_input(input_ids)
        if ids.shape[1] < 2:
            raise ConfigError(
                f"input_ids: expected shape [B, T] with T >= 2 for a next-token loss (position t "
                f"predicts t + 1), got {list(ids.shape)}"
            )
        if prefetched is None:  # the ids checked here hashed as they are (not checked again)
            prefetched = self.fetch(self._hash(input_ids, checked=ids))
            input_ids = prefetched.input_ids  # the batch's own: the forward compares none
        logits = self(input_ids, prefetched=prefetched)
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(logits.device)
        )

    # -- checkpoints ------------------------------------------------------------------------------

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict`` after checking every shape (and each Engram layer's
        offsets) against the config, so a mismatched checkpoint raises ConfigError before any
        tensor is copied."""
        check_state_dict(self, state_dict, strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def new_cache(self) -> KVCache:
        """An empty ``KVCache`` for decoding (see ``forward``'s ``cache``)."""
        return KVCache()

    def close(self) -> None:
        """Close every table: tiered stores release files and threads, in-memory tables keep their
        rows (they have nothing to release)."""
        for table in self.tables.values():
            table.close()

    # -- internals --------------------------------------------------------------------------------

    def _check_input(self, input_ids: Any, name: str = "input_ids") -> torch.Tensor:
        """Token ids as int64 [B, T], every id inside the tokenizer vocabulary (``name``: the
        argument, in errors)."""
        ids = check_token_ids(input_ids, self.hasher.tokenizer.vocab_size, name=name)
        if not isinstance(ids, torch.Tensor):
            ids = torch.from_numpy(array_for_torch(ids))
        if ids.ndim != 2 or 0 in ids.shape:
            raise ConfigError(
                f"{name}: expected shape [B, T] with B >= 1 and T >= 1, got {list(ids.shape)}"
            )
        return ids

    def _check_batch_origin(self, batch: EngramBatch) -> None:
        """Refuse an ``EngramBatch`` hashed for other Engram layers, or with another Engram config
        or tokenizer (made by another model)."""
        found, expected = sorted(batch.row_ids), sorted(self.config.engram.layer_ids)
        if found != expected:
            raise ConfigError(
                f"prefetched: this EngramBatch holds rows of Engram layers {found}; expected "
                f"this model's Engram layers {expected} (the batch was made by another model: "
                "hash or prefetch with this one)"
            )
        made, own = batch.hasher, self.hasher
        if made is None or made is own:
            return
        got, want = made.config.to_dict(), own.config.to_dict()
        differ = [
            f"engram.{k}={got[k]!r}; this model's is {want[k]!r}" for k in want if got[k] != want[k]
        ]
        if not differ and not np.array_equal(made.tokenizer.lookup, own.tokenizer.lookup):
            path, expected = made.tokenizer.tokenizer_path, own.tokenizer.tokenizer_path
            differ = [f"the tokenizer {path}; this model's is {expected}"]
        if differ:
            raise ConfigError(
                f"prefetched: this EngramBatch was hashed with {differ[0]} (the batch was made by "
                "another model: hash or prefetch with this one)"
            )

    def _v41_engram(self, layer_id: int, table: TableBackend | None) -> V41Engram:
        """Layer ``layer_id``'s V4.1 Engram module over ``table`` (default: random fp8 rows)."""
        engram, backbone = self.config.engram, self.config.backbone
        if table is None:
            table = self._random_packed_table(layer_id)
        self._check_v41_table(layer_id, table)
        return V41Engram(
            table,
            num_heads=engram.num_heads,
            dim=backbone.hidden_size,
            hc_mult=backbone.hc_mult,
            norm_eps=engram.norm_eps,
        )

    def _random_packed_table(self, layer_id: int) -> PackedInMemoryTable:
        """A ``PackedInMemoryTable`` of standard-normal rows quantised to fp8 (e4m3 + ue8m0)."""
        dim = self.config.engram.head_dim
        if dim % V41_SCALE_BLOCK:
            raise ConfigError(
                f"engram.n_embed_per_ngram: rows of {dim} values per head; expected a multiple of "
                f"{V41_SCALE_BLOCK} (one ue8m0 scale per {V41_SCALE_BLOCK} fp8 values) for the "
                "V4.1 geometry"
            )
        quant = RowQuantization(values=dim, block=V41_SCALE_BLOCK)
        rows = self.hasher.table_rows(layer_id)
        packed = torch.empty(rows, quant.packed_bytes, dtype=torch.uint8)
        if packed.is_meta:  # built for its shapes alone (expected_checkpoint_shapes): no values
            return PackedInMemoryTable(packed, quant)
        step = max(1, _RANDOM_CHUNK_VALUES // dim)
        for start in range(0, rows, step):  # the whole table in float32 would be 4x the packed one
            stop = min(start + step, rows)
            packed[start:stop] = quantize_rows(torch.randn(stop - start, dim), quant)
        return PackedInMemoryTable(packed, quant)

    def _check_v41_table(self, layer_id: int, table: Any) -> None:
        """Raise ConfigError unless ``table`` is a TableBackend with the layer's rows and dim,
        made for the layer's Engram layout when it tells one (``engram_layout``)."""
        rows, dim = self.hasher.table_rows(layer_id), self.config.engram.head_dim
        if not isinstance(table, TableBackend):
            raise ConfigError(
                f"tables[{layer_id}]: {type(table).__name__} is not a TableBackend; expected "
                "PackedInMemoryTable, TieredStore or another backend with rows, dim, lookup, "
                "prefetch"
            )
        if (int(table.rows), int(table.dim)) != (rows, dim):
            raise ConfigError(
                f"tables[{layer_id}]: a table of {int(table.rows):,} rows x {int(table.dim)}; "
                f"expected {rows:,} x {dim} (layer {layer_id}'s head primes and head_dim)"
            )
        check_backend_layout(table, self.hasher, layer_id, f"tables[{layer_id}]")

    def _init_dense(self, std: float) -> None:
        """Normal(0, std) for the backbone's weights; output projections scaled by depth."""
        nn.init.normal_(self.embed.weight, std=std)
        out_std = std / math.sqrt(2 * len(self.layers))
        for layer in self.layers:
            nn.init.normal_(layer.attn.qkv.weight, std=std)
            nn.init.normal_(layer.mlp.gate_up.weight, std=std)
            nn.init.normal_(layer.attn.out.weight, std=out_std)
            nn.init.normal_(layer.mlp.down.weight, std=out_std)

    def _rope_tables(
        self, start: int, seq: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, head_dim / 2] of positions ``start .. start + seq`` for the rotary
        embedding (slices of tables kept per device/dtype, doubled in length when outgrown)."""
        key = (device, dtype)
        stop = start + seq
        tables = self._rope.get(key)
        if tables is None or tables[0].shape[0] < stop:
            length = max(stop, 2 * tables[0].shape[0] if tables is not None else 0)
            tc = self.config.transformer
            half = self.config.backbone.hidden_size // tc.num_attention_heads // 2
            inv = tc.rope_theta ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
            angles = torch.outer(torch.arange(length, dtype=torch.float64, device=device), inv)
            tables = (angles.cos().to(dtype), angles.sin().to(dtype))
            kept = self._rope.get(key)
            if kept is None or kept[0].shape[0] < length:  # never replaced by a shorter one
                self._rope[key] = tables
        cos, sin = tables  # not read back: a forward on another thread may have replaced it
        return cos[start:stop], sin[start:stop]


def check_model_memory(
    config: ModelConfig, given: Collection[int] = (), names: Mapping[str, str] | None = None
) -> None:
    """Refuse a model whose weights ``EngramLM(config)`` would allocate exceed the RAM available
    now: the Engram tables (but those of the layers in ``given``, given as backends; V4.1's packed,
    1 B a value + 1 per scale block) and the dense weights, estimated from the config. The error
    names the setting behind the largest part, as ``names`` says it
    (``{"backbone.hidden_size": "--hidden-size 4096"}``) or as its key."""
    available = available_host_memory()
    if available is None:
        return
    engram, backbone = config.engram, config.backbone
    hidden, hc = backbone.hidden_size, backbone.hc_mult
    rows = sum(engram.engram_vocab_size) * engram.n_head_per_ngram  # at least: primes round up
    made = [layer for layer in engram.layer_ids if layer not in given]
    tables = len(made) * rows * engram.head_dim
    width = torch.get_default_dtype().itemsize
    # V4.1's tables are packed fp8 rows (drawn in chunks: never a whole float table)
    table_bytes = tables + tables // V41_SCALE_BLOCK if engram.is_v41 else tables * width
    per_layer = 4 * hidden * hidden + 3 * hidden * config.transformer.mlp_size(hidden)
    projections = len(engram.layer_ids) * (hc + 1) * engram.engram_hidden_size * hidden
    # each part in dense elements, by the setting that makes it large: the transformer layers by
    # the layer count or the width, whichever is out of proportion
    layers_by = "backbone.num_layers" if backbone.num_layers > hidden else "backbone.hidden_size"
    parts: dict[str, int] = defaultdict(int)
    parts["engram.engram_vocab_size"] += -(-table_bytes // width)
    parts["backbone.vocab_size"] += backbone.vocab_size * hidden
    parts[layers_by] += backbone.num_layers * per_layer
    parts["backbone.hidden_size"] += projections
    dense = sum(parts.values()) - parts["engram.engram_vocab_size"]
    needed = table_bytes + dense * width
    if needed <= available:
        return
    key = max(parts, key=parts.__getitem__)
    value = {
        "engram.engram_vocab_size": list(engram.engram_vocab_size),
        "backbone.vocab_size": backbone.vocab_size,
        "backbone.num_layers": backbone.num_layers,
        "backbone.hidden_size": hidden,
    }[key]
    setting = (names or {}).get(key, f"{key} {value}")
    instead = ""
    if engram.is_v41 and key == "engram.engram_vocab_size":
        instead = (
            ", or the tables of a converted checkpoint (tiered-store convert-hf) as tiered stores"
        )
    raise ConfigError(
        f"{setting}: the model needs {format_bytes(needed)} of host RAM (Engram tables "
        f"{format_bytes(table_bytes)}, dense weights {format_bytes(dense * width)}) but only "
        f"{format_bytes(available)} is available; expected a smaller model{instead}"
    )


# host id dtypes converted to int64 straight into the pinned copy (int64 holds every value)
_NARROW = (torch.int8, torch.int16, torch.int32, torch.uint8)
_NARROW_ARRAYS = tuple(np.dtype(t) for t in (np.int8, np.int16, np.int32, np.uint8))


def _narrow_host_ids(input_ids: Any) -> torch.Tensor | None:
    """``input_ids`` as a tensor sharing their memory when they are a host tensor or array of a
    ``_NARROW`` dtype (checked once converted); None for any other ids."""
    if isinstance(input_ids, np.ndarray) and input_ids.dtype in _NARROW_ARRAYS:
        return torch.from_numpy(array_for_torch(input_ids))
    if (
        isinstance(input_ids, torch.Tensor)
        and input_ids.dtype in _NARROW
        and input_ids.layout == torch.strided
        and not input_ids.is_nested
    ):
        return input_ids
    return None


def _pinned_host_ids(
    model: EngramLM, input_ids: Any, name: str = "input_ids", *, pin_memory: bool = True
) -> tuple[torch.Tensor | None, bool]:
    """For a model on the GPU: the checked int64 ids [B, T] (``name`` in errors; None for ids
    on a device, which hash alone checks: a check here would wait for the device) and whether
    they are the batch's own pinned copy (so that their copy there is asynchronous), made of
    host ids not pinned yet, given as a tensor, an array or a list (ids pinned already are
    kept: hash's snapshot of them is pinned). Narrower integer ids (int32) are converted in that
    copy: one copy, not two. ``pin_memory`` False: the copy is not pinned (tests without CUDA)."""
    if isinstance(input_ids, torch.Tensor) and input_ids.device.type != "cpu":
        return None, False  # checked by hash alone: a check here would wait for the device too
    narrow = _narrow_host_ids(input_ids)
    if narrow is None:
        ids = model._check_input(input_ids, name)
        if ids.is_pinned():
            return ids, False
    source = ids if narrow is None else narrow
    own = torch.empty(source.shape, dtype=torch.int64, pin_memory=pin_memory).copy_(source)
    return (model._check_input(own, name) if narrow is not None else own), True


def _snapshot(checked: torch.Tensor, given: Any, gpu: bool) -> torch.Tensor:
    """``checked`` (made from the caller's ``given``), copied if it shares the caller's memory:
    the batch's own, as the caller may refill its buffer (ids or mask) before the forward
    (pinned ones pinned for a model on the GPU, ``gpu``)."""
    if isinstance(given, torch.Tensor):
        return snapshot_of(checked, given, pinnable=gpu)
    if given is None or isinstance(given, (list, tuple)) or checked.device.type != "cpu":
        return checked  # made here (from a list, or copied to the device)
    # an array (or other buffer) kept as given: copied, as a refilled tensor's
    return checked.clone() if np.may_share_memory(checked.numpy(), given) else checked


def _token_mask(token_mask: Any, ids: torch.Tensor, gpu: bool) -> torch.Tensor:
    """``token_mask`` as bool [B, T] on the ids' device (all True when ``None``; for a model on
    the GPU, ``gpu``, pinned with pinned ids: V4.1 layers copy it there with them). A model on
    the CPU does not ask whether ids are pinned: is_pinned() may start a CUDA context."""
    if token_mask is None:
        pin = gpu and ids.is_pinned()
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device, pin_memory=pin)
    mask = NgramHasher._mask(token_mask, ids)  # the hasher's checks (one set of messages)
    if gpu and mask.device.type == "cpu" and ids.is_pinned() and not mask.is_pinned():
        # a caller's unpinned mask: pinned in a copy of its own (V4.1 layers copy it to the GPU
        # with the ids, else synchronously on every forward), which hash's snapshot keeps
        return torch.empty(mask.shape, dtype=torch.bool, pin_memory=True).copy_(mask)
    return mask


def _table_mapping(tables: Any) -> dict[Any, Any]:
    """``tables`` as a dict ``{layer_id: table}``; ConfigError for anything else (a list)."""
    if not isinstance(tables, Mapping):
        raise ConfigError(
            f"tables: got a {type(tables).__name__}; expected a mapping {{layer_id: "
            "TableBackend}, e.g. {1: table} (open_tables returns one)"
        )
    return dict(tables)


def _swap(engram: Engram | V41Engram, table: TableBackend, *, direct: bool = False) -> None:
    """Give ``engram`` the checked ``table`` (a demo layer's through its embedding's
    ``set_backend``, unless ``direct``); interrupted, it keeps its old one."""
    if isinstance(engram, V41Engram):
        swap_table(engram, "table", table)
    elif direct:
        swap_table(engram.multi_head_embedding, "embedding", table)
    else:
        engram.multi_head_embedding.set_backend(table)


def _put_back(swapped: list[tuple[Engram | V41Engram, TableBackend]]) -> None:
    """Give each layer of ``swapped`` its old table again, the last swapped first (one holding
    it left alone): through ``_swap``, or directly where that refuses it (a ``set_backend``
    checking what the model was made with); every layer is tried, then a Ctrl-C raised."""
    interrupted: BaseException | None = None
    for engram, kept in reversed(swapped):
        if engram.table is kept:  # its swap failed before it took the new one
            continue
        try:
            try:
                _swap(engram, kept)
            except Exception:  # noqa: BLE001 (the old table was served: it goes back as it was)
                if engram.table is not kept:
                    _swap(engram, kept, direct=True)
        except BaseException as exc:  # a second Ctrl-C: the other layers put back all the same
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``: copied there asynchronously (from pinned host memory the copy
    overlaps), but to the host, where one read before the GPU wrote it is garbage."""
    return tensor.to(device, non_blocking=torch.device(device).type != "cpu")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [B, heads, T, head_dim] (rotate-half layout)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def expected_shapes(model: EngramLM) -> dict[str, tuple[int, ...]]:
    """Every state_dict key of ``model`` with its shape; Engram tables kept outside the module
    (a tiered store) are listed under their reference key too."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    for layer_id, table in model.tables.items():
        if isinstance(model.engram_layers[layer_id], V41Engram):
            continue  # V4.1 tables are never part of the dense checkpoint
        shapes.setdefault(
            f"layers.{layer_id}.engram.multi_head_embedding.embedding.weight",
            (int(table.rows), int(table.dim)),
        )
    return shapes


def check_state_dict(
    model: EngramLM, state_dict: Mapping[str, Any], *, strict: bool = True
) -> None:
    """Raise ConfigError naming the first key whose shape disagrees with ``model``'s config, or
    that holds no tensor (and run each Engram layer's own checks: offsets, a table key for an
    external table); ``strict``: the first key missing or unknown too (torch would copy the
    others before raising). A ``state_dict`` that is no mapping is named too."""
    if not isinstance(state_dict, Mapping):  # (torch's test of one: no .items() to read here)
        raise ConfigError(
            f"state_dict: got a {type(state_dict).__name__}; expected a mapping {{key: tensor}} "
            "(safetensors.torch.load_file reads one from a file)"
        )
    for layer_id, engram in model.engram_layers.items():
        if isinstance(engram, V41Engram):
            continue  # its parameters' shapes are checked with every other key below
        prefix = f"layers.{layer_id}.engram."
        own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        engram.check_checkpoint(own, strict=strict, prefix=prefix)
    expected = expected_shapes(model)
    cfg = model.config
    if strict:
        own = model.state_dict(keep_vars=True).keys()
        missing, unknown = sorted(own - state_dict.keys()), sorted(state_dict.keys() - own)
        if missing:
            raise ConfigError(
                f"{missing[0]}: missing from the checkpoint ({len(missing)} keys missing; "
                f"this model's Engram layers are {list(cfg.engram.layer_ids)}); expected a "
                "checkpoint of this config (strict=False loads the keys it has)"
            )
        if unknown:
            raise ConfigError(
                f"{unknown[0]}: not a key of this EngramLM's state_dict ({len(unknown)} unknown "
                f"keys; its Engram layers are {list(cfg.engram.layer_ids)}); expected a "
                "checkpoint of this config (strict=False ignores them)"
            )
    for key, value in state_dict.items():
        want = expected.get(key)
        if want is None:
            continue  # unknown keys are load_state_dict's (strict) business
        check_checkpoint_tensor(key, value, want)
        if tuple(value.shape) != want:
            raise ConfigError(
                f"{key}: checkpoint shape {list(value.shape)} does not match {list(want)} "
                f"expected from the config (hidden_size={cfg.backbone.hidden_size}, "
                f"hc_mult={cfg.backbone.hc_mult}, num_layers={cfg.backbone.num_layers}, "
                f"vocab_size={cfg.backbone.vocab_size}, num_attention_heads="
                f"{cfg.transformer.num_attention_heads}, intermediate_size="
                f"{cfg.transformer.mlp_size(cfg.backbone.hidden_size)}, engram layer_ids="
                f"{list(cfg.engram.layer_ids)})"
            )
