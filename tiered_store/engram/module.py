"""The Engram module, faithful to the reference ``engram_demo_v1.py``, over a pluggable table.

Per hyper-connection branch ``i`` (``e`` = the concatenated embeddings of all heads)::

    key_i = RMSNorm1_i(key_proj_i(e));  q_i = RMSNorm2_i(h[:, :, i])
    g = (key_i . q_i) / sqrt(hidden);  g = sign(g) * sqrt(max(|g|, 1e-6));  gate_i = sigmoid(g)
    v_i = gate_i * value_proj(e)
    output = v + ShortConv(v)

ShortConv = per-branch RMSNorm (eps 1e-5), causal depthwise Conv1d (kernel_size, dilation =
max_ngram_size, no bias) over all branches' channels, SiLU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..store import as_id_tensor
from ..table_sources import tensor_without_values
from .backend import InMemoryTable, TableBackend, check_row_id_values, swap_table
from .config import BackboneConfig, EngramConfig
from .hashing import HashState, NgramHasher, hasher_for, head_offsets, rewound_on_failure
from .layout import check_backend_layout
from .tokenizer import check_token_ids

__all__ = [
    "EMBEDDING_KEY",
    "Engram",
    "MultiHeadEmbedding",
    "ShortConv",
    "is_engram_module_key",
    "split_checkpoint",
]

EMBEDDING_KEY = "multi_head_embedding.embedding.weight"  # the big table, reference layout
# Dense parameters and buffers of one Engram module in the reference state_dict layout.
_DENSE_KEY = re.compile(
    r"^(multi_head_embedding\.offsets|value_proj\.(weight|bias)|key_projs\.\d+\.(weight|bias)"
    r"|norm[12]\.\d+\.weight|short_conv\.conv\.weight|short_conv\.norms\.\d+\.weight)$"
)
REFERENCE_KEY = re.compile(r"^layer(\d+)\.(.+)$")  # a per-layer reference checkpoint's key
_GATE_EPS = 1e-6  # floor of |gate| before the signed square root


class ShortConv(nn.Module):
    """Per-branch RMSNorm, causal depthwise Conv1d over all branches' channels, SiLU.

    Input and output are [B, T, hc_mult, hidden_size]; the convolution sees channels
    ``branch * hidden_size + c`` and is causal (left padding ``(kernel_size - 1) * dilation``).

    Examples
    --------
    >>> conv = ShortConv(hidden_size=8, kernel_size=4, dilation=3, hc_mult=2)
    >>> conv(torch.randn(2, 5, 2, 8)).shape
    torch.Size([2, 5, 2, 8])
    """

    def __init__(
        self,
        hidden_size: int,
        kernel_size: int = 4,
        dilation: int = 1,
        norm_eps: float = 1e-5,
        hc_mult: int = 4,
        activation: bool = True,
    ) -> None:
        super().__init__()
        self.hc_mult = hc_mult
        self.activation = activation
        channels = hidden_size * hc_mult
        self.conv = nn.Conv1d(
            channels,
            channels,
            kernel_size=kernel_size,
            groups=channels,
            bias=False,
            padding=(kernel_size - 1) * dilation,
            dilation=dilation,
        )
        self.norms = nn.ModuleList([nn.RMSNorm(hidden_size, eps=norm_eps) for _ in range(hc_mult)])
        self.act_fn = nn.SiLU() if activation else nn.Identity()

    def forward(
        self, x: torch.Tensor, state: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """[B, T, hc_mult, C] -> [B, T, hc_mult, C]. With ``state`` (decoding in chunks), the
        normalised inputs of earlier chunks that the convolution still reaches come first, as
        in one forward over every position, and the newest of them are kept in it."""
        batch, seq, branches, width = x.shape
        if seq == 0:  # no positions: Conv1d refuses an empty input; the state is left as it was
            return torch.zeros_like(x)
        normed = torch.cat([self.norms[i](x[:, :, i, :]) for i in range(branches)], dim=-1)
        inputs = normed.transpose(1, 2)  # [B, channels, T]
        past = 0
        if state is not None and "inputs" in state:
            inputs = torch.cat([state["inputs"], inputs], dim=2)
            past = state["inputs"].shape[2]
        y = self.act_fn(self.conv(inputs)[..., past : past + seq])
        out = y.transpose(1, 2).reshape(batch, seq, branches, width)
        if state is not None:  # once the chunk's output is made: a chunk that fails keeps none
            reach = self.conv.padding[0]  # positions back the convolution sees (0: none)
            start = max(0, inputs.shape[2] - reach)
            kept = inputs[..., start:].detach()
            # a copy of a part: a view would keep every position of the chunk alive
            state["inputs"] = kept.clone() if start else kept
        return out


class MultiHeadEmbedding(nn.Module):
    """Per-head tables concatenated into one row space, served by a ``TableBackend``.

    Holds the ``offsets`` buffer (first row of each head) and the backend as ``embedding``; with an
    ``InMemoryTable`` the state_dict keys are the reference ones (``offsets``,
    ``embedding.weight``). A backend that is not an ``nn.Module`` (the tiered store) is kept as a
    plain attribute and is not part of the state_dict.
    """

    offsets: torch.Tensor

    def __init__(self, head_sizes: Sequence[int], backend: TableBackend) -> None:
        super().__init__()
        self.num_heads = len(head_sizes)
        self.register_buffer("offsets", torch.from_numpy(head_offsets(head_sizes)))
        self.embedding = backend
        self.embedding_dim = backend.dim

    def forward(self, hashes: torch.Tensor, handle: object | None = None) -> torch.Tensor:
        """Per-head hashes [..., H] -> rows [..., H, dim] (the reference forward)."""
        return self.embedding.lookup(hashes + self.offsets.to(hashes.device), handle)

    def lookup_rows(self, row_ids: torch.Tensor, handle: object | None = None) -> torch.Tensor:
        """Rows already offset into the concatenated table [..., H] -> [..., H, dim]."""
        return self.embedding.lookup(row_ids, handle)

    def set_backend(self, backend: TableBackend) -> None:
        """Serve the rows from ``backend`` instead (a module or a plain object; interrupted, the
        old one)."""
        swap_table(self, "embedding", backend)


class Engram(nn.Module):
    """One Engram layer: hashed N-gram memory gated into the hyper-connection residual stream.

    The table is a ``TableBackend``: an ``InMemoryTable`` (default; trainable, the reference
    behaviour) or the tiered store. A pipeline may hash all layers at batch start, prefetch each
    layer's rows (``prefetch``) and pass ``row_ids``/``handle`` to ``forward``.

    Parameters
    ----------
    config
        Engram configuration (table sizes, orders, heads, kernel size).
    backbone
        Backbone facts: ``hidden_size`` and ``hc_mult``.
    layer_id
        Which of ``config.layer_ids`` this module is.
    hasher
        Shared ``NgramHasher`` (build one and pass it to every layer); default: a new one.
    backend
        The table; default: a trainable ``InMemoryTable`` of ``hasher.table_rows(layer_id)`` rows
        initialised like ``nn.Embedding`` (allocates the whole table).
    backend_name
        How errors about ``backend`` name it: the argument its caller was given (``EngramLM``:
        ``tables[L]``).

    Raises
    ------
    ConfigError
        ``layer_id`` is not configured, or the backend's rows/dim do not match the config, or the
        Engram layout it tells (``engram_layout``: a table file's) is another layer's or config's.

    Examples
    --------
    >>> from safetensors.torch import load_file
    >>> cfg = EngramConfig(engram_vocab_size=(2003, 3001), n_embed_per_ngram=64,
    ...                    n_head_per_ngram=4, layer_ids=(1, 4))
    >>> backbone = BackboneConfig(hidden_size=48, hc_mult=4)
    >>> golden = "tests/data/golden/engram_forward.safetensors"
    >>> engram = Engram.from_checkpoint(golden, cfg, backbone, layer_id=1)
    >>> data = load_file(golden)
    >>> out = engram(data["layer1.hidden_states"], data["input_ids"])
    >>> out.shape
    torch.Size([3, 32, 4, 48])
    >>> bool(torch.allclose(out, data["layer1.output"], atol=1e-5))
    True
    >>> rows, handle = engram.prefetch(data["input_ids"])     # e.g. at batch start
    >>> out2 = engram(data["layer1.hidden_states"], row_ids=rows, handle=handle)

    Decoding in chunks: ``conv_state`` carries the ShortConv's inputs, a ``HashState`` the
    N-gram look-back, from one chunk to the next (made on the device the ids are hashed on,
    the hidden states' for tensor ids, so that no chunk copies it there and back):

    >>> ids, hidden = data["input_ids"], data["layer1.hidden_states"]
    >>> conv, state = {}, engram.hasher.new_state(3, device=hidden.device)
    >>> parts = [engram(hidden[:, :20], ids[:, :20], conv_state=conv, state=state),
    ...          engram(hidden[:, 20:], ids[:, 20:], conv_state=conv, state=state)]
    >>> bool(torch.allclose(torch.cat(parts, dim=1), out, atol=1e-5))
    True
    """

    def __init__(
        self,
        config: EngramConfig,
        backbone: BackboneConfig,
        layer_id: int,
        *,
        hasher: NgramHasher | None = None,
        backend: TableBackend | None = None,
        backend_name: str = "backend",
    ) -> None:
        super().__init__()
        if layer_id not in config.layer_ids:
            raise ConfigError(
                f"layer_id: expected one of engram.layer_ids {list(config.layer_ids)}, "
                f"got {layer_id!r}"
            )
        self.config = config
        self.backbone = backbone
        self.layer_id = layer_id
        self.hasher = hasher_for(config, hasher, "the module's config has")
        if backend is None:
            backend = InMemoryTable.empty(self.hasher.table_rows(layer_id), config.head_dim)
        self._check_backend(backend, backend_name)
        hidden, hc = backbone.hidden_size, backbone.hc_mult
        self.multi_head_embedding = MultiHeadEmbedding(self.hasher.head_sizes(layer_id), backend)
        self.short_conv = ShortConv(
            hidden_size=hidden,
            kernel_size=config.kernel_size,
            dilation=config.max_ngram_size,
            hc_mult=hc,
        )
        self.value_proj = nn.Linear(config.engram_hidden_size, hidden)
        self.key_projs = nn.ModuleList(
            [nn.Linear(config.engram_hidden_size, hidden) for _ in range(hc)]
        )
        # eps=None: torch.finfo(dtype).eps, as the reference's nn.RMSNorm(hidden_size).
        self.norm1 = nn.ModuleList([nn.RMSNorm(hidden) for _ in range(hc)])
        self.norm2 = nn.ModuleList([nn.RMSNorm(hidden) for _ in range(hc)])

    @property
    def table(self) -> TableBackend:
        """The table backend."""
        return self.multi_head_embedding.embedding

    def set_table(self, backend: TableBackend) -> None:
        """Swap the table backend (same rows and dim, and layout when it tells one), e.g. an
        in-memory table for a tiered store."""
        self._check_backend(backend)
        self.multi_head_embedding.set_backend(backend)

    def _check_backend(self, backend: TableBackend, name: str = "backend") -> None:
        """Raise ConfigError unless ``backend`` (``name`` in the message) is a TableBackend with
        this layer's rows and dim, made for this layer's Engram layout when it tells one
        (``engram_layout``)."""
        if not isinstance(backend, TableBackend):
            raise ConfigError(
                f"{name}: {type(backend).__name__} is not a TableBackend; expected rows, dim, "
                "keeps_stats, lookup, prefetch, stats and close (subclass "
                "tiered_store.engram.TableBackend for the defaults)"
            )
        rows, dim = self.hasher.table_rows(self.layer_id), self.config.head_dim
        if int(backend.rows) != rows or int(backend.dim) != dim:
            raise ConfigError(
                f"{name}: expected a table of {rows} rows x {dim} (layer {self.layer_id}: head "
                f"primes {self.hasher.head_sizes(self.layer_id)}, n_embed_per_ngram/"
                f"n_head_per_ngram = {dim}), got {backend.rows} x {backend.dim}"
            )
        check_backend_layout(backend, self.hasher, self.layer_id, name)

    # -- addressing -----------------------------------------------------------------------------

    def row_ids(self, input_ids: Any, *, state: HashState | None = None) -> torch.Tensor:
        """Row ids of this layer's concatenated table for ``input_ids`` [B, T]: int64 [B, T, H]
        (with ``state``, the ids continue its sequences and it is advanced past them)."""
        ids = self._checked_ids(input_ids)
        rows = self.hasher.row_ids_layer(ids, self.layer_id, state=state)
        return torch.as_tensor(rows)  # the hasher's own array: shared, not copied

    def _checked_ids(self, input_ids: Any) -> Any:
        """A tensor as given; arrays and lists checked (ragged lists raise ConfigError), as an
        int64 ndarray that the hasher reads without making a tensor of it (it may be read-only)."""
        if isinstance(input_ids, torch.Tensor):
            return input_ids
        return check_token_ids(input_ids, self.hasher.tokenizer.vocab_size)

    def prefetch(
        self, input_ids: Any, *, state: HashState | None = None
    ) -> tuple[torch.Tensor, object]:
        """Hash ``input_ids`` (continuing ``state``, as in ``row_ids``) and start fetching the
        rows: ``(row_ids, handle)`` for ``forward``. A fetch that fails leaves ``state`` where it
        was."""
        with rewound_on_failure(state):  # a fetch that fails leaves it where it was
            row_ids = self.row_ids(input_ids, state=state)
            return row_ids, self.table.prefetch(row_ids)

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: Any = None,
        *,
        row_ids: torch.Tensor | None = None,
        handle: object | None = None,
        conv_state: dict[str, torch.Tensor] | None = None,
        state: HashState | None = None,
    ) -> torch.Tensor:
        """Engram output [B, T, hc_mult, hidden] for ``hidden_states`` [B, T, hc_mult, hidden].

        Parameters
        ----------
        hidden_states
            The hyper-connection branches' hidden states, [B, T, hc_mult, hidden_size].
        input_ids
            Original token ids [B, T]; hashed here unless ``row_ids`` is given.
        row_ids
            Precomputed row ids [B, T, H] in the concatenated table (``prefetch``/``row_ids``): a
            tensor, a NumPy array or a list of integers (read as the table's ``lookup`` reads
            them).
        handle
            The backend's prefetch handle for ``row_ids``.
        conv_state
            Decoding in chunks: the ShortConv's inputs of earlier chunks (a dict this call reads
            and updates; empty at the first chunk), so that each chunk's output equals one
            forward's over every position. Chunks given as ``input_ids`` need ``state`` too (or
            ``row_ids`` hashed with one).
        state
            The sequences' ``HashState`` (``hasher.new_state(B, device=...)`` at the first
            chunk, on the device the ids are hashed on: ``hidden_states``' for tensor ids, the
            CPU for arrays and lists) when ``input_ids`` continue earlier chunks: they are hashed
            with its N-gram look-back and it is advanced past them (unused with ``row_ids``). One
            per layer that hashes its own ids (``EngramLM`` hashes every layer at once, with
            one). With ``input_ids``, it and ``conv_state`` must have seen the same chunks: both
            none, or both the earlier ones. A chunk that raises (its lookup failed, or it ran out
            of memory or was interrupted later) leaves both as they were, so it may be run again.

        Raises
        ------
        ConfigError
            A shape disagrees, or ``input_ids`` come with a ``state`` and a ``conv_state`` that
            disagree on earlier chunks (one of them is missing, fresh or empty while the other
            holds them).
        """
        hc, hidden = self.backbone.hc_mult, self.backbone.hidden_size
        if not isinstance(hidden_states, torch.Tensor):
            raise ConfigError(
                f"hidden_states: got a {type(hidden_states).__name__}; expected a torch.Tensor "
                f"[B, T, {hc}, {hidden}] (torch.from_numpy for an array)"
            )
        if hidden_states.ndim != 4 or tuple(hidden_states.shape[2:]) != (hc, hidden):
            raise ConfigError(
                f"hidden_states: expected shape [B, T, {hc}, {hidden}] (hc_mult, hidden_size), "
                f"got {tuple(hidden_states.shape)}"
            )
        if row_ids is None:
            if input_ids is None:
                raise ConfigError("input_ids: required when row_ids is not given")
            self._check_chunk_states(conv_state, state)
            if isinstance(input_ids, torch.Tensor) and tensor_without_values(input_ids) is None:
                input_ids = input_ids.to(hidden_states.device)  # a meta one: named just below
            input_ids = self._checked_ids(input_ids)
            if tuple(input_ids.shape) != tuple(hidden_states.shape[:2]):
                raise ConfigError(
                    f"input_ids: expected shape {list(hidden_states.shape[:2])} ([B, T] of "
                    f"hidden_states), got {list(input_ids.shape)}"
                )
            with rewound_on_failure(state):  # a chunk that fails is hashed again from here
                row_ids = self.row_ids(input_ids, state=state)
                return self._output(hidden_states, row_ids, handle, conv_state)
        return self._output(hidden_states, row_ids, handle, conv_state)

    def _output(
        self,
        hidden_states: torch.Tensor,
        row_ids: Any,
        handle: object | None,
        conv_state: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """``forward`` of checked ``hidden_states`` over hashed ``row_ids``."""
        hc, hidden = self.backbone.hc_mult, self.backbone.hidden_size
        check_row_id_values(row_ids)
        if not isinstance(row_ids, torch.Tensor):  # a list or NumPy array, as lookup takes them
            row_ids = as_id_tensor(row_ids)
        expected = (*hidden_states.shape[:2], self.config.num_heads)
        if tuple(row_ids.shape) != expected:
            raise ConfigError(
                f"row_ids: expected shape {list(expected)} ([B, T] of hidden_states, H heads), "
                f"got {list(row_ids.shape)}"
            )
        held = conv_state.get("inputs") if conv_state is not None else None
        if held is not None and held.shape[0] != hidden_states.shape[0]:
            raise ConfigError(
                f"conv_state: holds the inputs of {held.shape[0]} sequences; expected "
                f"{hidden_states.shape[0]}, the batch of hidden_states (one conv_state per "
                "batch of sequences, from their first chunk)"
            )
        rows = self.multi_head_embedding.lookup_rows(row_ids, handle)
        # [B, T, H * dim] in the compute dtype (a bfloat16/float16 table feeds a float32 model)
        embeddings = rows.to(hidden_states.device, hidden_states.dtype).flatten(start_dim=-2)
        gates = []
        for i in range(hc):
            key = self.norm1[i](self.key_projs[i](embeddings))
            query = self.norm2[i](hidden_states[:, :, i, :])
            gate = (key * query).sum(dim=-1) / math.sqrt(hidden)
            gate = gate.abs().clamp_min(_GATE_EPS).sqrt() * gate.sign()
            gates.append(gate.sigmoid().unsqueeze(-1))
        value = torch.stack(gates, dim=2) * self.value_proj(embeddings).unsqueeze(2)
        kept = dict(conv_state) if conv_state is not None else None
        try:
            return value + self.short_conv(value, conv_state)
        except BaseException:  # after the ShortConv kept this chunk's inputs: as before it
            if conv_state is not None:
                conv_state.clear()
                conv_state.update(kept)
            raise

    @staticmethod
    def _check_chunk_states(conv_state: dict[str, torch.Tensor] | None, state: Any) -> None:
        """ConfigError unless both ``conv_state`` and ``state`` carry earlier chunks, or neither."""
        held = conv_state is not None and "inputs" in conv_state  # ShortConv's, once a chunk ran
        if state is None:
            if held:
                raise ConfigError(
                    "state: got None with input_ids while conv_state holds earlier chunks; "
                    "expected the HashState that hashed them (hasher.new_state(B) at the first "
                    "chunk), or row_ids hashed with it: without one the ids are hashed as if the "
                    "sequence started here"
                )
        elif not isinstance(state, HashState):
            return  # refused by the hasher, naming its type
        elif held and state.position == 0:
            raise ConfigError(
                "state: at position 0 while conv_state holds earlier chunks; expected the "
                "HashState that hashed them, advanced past them (a fresh hasher.new_state(B) "
                "only at the first chunk): with this one the ids are hashed as if the sequence "
                "started here"
            )
        elif not held and state.position > 0:
            raise ConfigError(
                f"conv_state: {'got None' if conv_state is None else 'holds no earlier chunks'} "
                f"while state is at position {state.position}; expected the dict the forward of "
                "the earlier chunks filled (empty only at the first chunk, with a fresh state; "
                "one state per layer): without it the ShortConv restarts here"
            )

    # -- checkpoints ----------------------------------------------------------------------------

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Check every shape (and the offsets) against the config before torch copies anything."""
        own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        self.check_checkpoint(own, strict=strict, prefix=prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def check_checkpoint(
        self, state_dict: Mapping[str, Any], *, strict: bool = True, prefix: str = ""
    ) -> None:
        """Raise ConfigError if a tensor's shape, or the offsets, disagree with the config, or a
        key of this module holds no tensor."""
        expected = {k: tuple(v.shape) for k, v in self.state_dict(keep_vars=True).items()}
        for key, value in state_dict.items():
            if key == EMBEDDING_KEY and key not in expected:
                if strict:
                    raise ConfigError(
                        f"{prefix}{key}: this module's table is an external backend "
                        f"({type(self.table).__name__}); load the table there and the rest here "
                        f"(split_checkpoint separates them)"
                    )
                want = (self.table.rows, self.table.dim)
            elif key not in expected:
                continue  # torch reports unexpected keys
            else:
                want = expected[key]
            check_checkpoint_tensor(f"{prefix}{key}", value, want)
            shape = tuple(value.shape)
            if shape != want:
                raise ConfigError(
                    f"{prefix}{key}: checkpoint shape {list(shape)} does not match {list(want)} "
                    f"expected from the config (layer {self.layer_id}, hidden_size="
                    f"{self.backbone.hidden_size}, hc_mult={self.backbone.hc_mult}, "
                    f"engram_hidden_size={self.config.engram_hidden_size}, "
                    f"table {self.hasher.table_rows(self.layer_id)} x {self.config.head_dim})"
                )
        offsets = state_dict.get("multi_head_embedding.offsets")
        if offsets is not None and not torch.equal(
            torch.as_tensor(offsets).cpu(), self.multi_head_embedding.offsets.cpu()
        ):
            raise ConfigError(
                f"{prefix}multi_head_embedding.offsets: checkpoint offsets "
                f"{torch.as_tensor(offsets).tolist()} differ from those of the configured head "
                f"primes {self.multi_head_embedding.offsets.tolist()} (engram_vocab_size, "
                f"n_head_per_ngram or layer_ids differ from the checkpoint's)"
            )

    @classmethod
    def from_checkpoint(
        cls,
        source: str | Path | Mapping[str, torch.Tensor],
        config: EngramConfig,
        backbone: BackboneConfig,
        layer_id: int,
        *,
        hasher: NgramHasher | None = None,
        backend: TableBackend | None = None,
    ) -> Engram:
        """Build a layer from a reference-layout checkpoint (safetensors path or state_dict).

        Keys may carry a ``layer{layer_id}.`` prefix (as in the golden file) or none. Without a
        ``backend`` the table becomes a trainable ``InMemoryTable`` of the checkpoint's weight;
        with one, only the dense parameters are loaded (the table is assumed to be in the backend,
        and its shape is checked). Every shape is checked before anything is loaded.
        """
        weight, rest = split_checkpoint(source, layer_id)
        hasher = hasher_for(config, hasher, "the module's config has")
        want = (
            [hasher.table_rows(layer_id), config.head_dim] if layer_id in config.layer_ids else []
        )
        if want and list(weight.shape) != want:
            raise ConfigError(
                f"{EMBEDDING_KEY}: checkpoint table shape {list(weight.shape)} does not match "
                f"{want} expected from the config (layer {layer_id}: head primes "
                f"{hasher.head_sizes(layer_id)}, head_dim {config.head_dim})"
            )
        if backend is None:
            backend = InMemoryTable(nn.Parameter(weight))
        module = cls(config, backbone, layer_id, hasher=hasher, backend=backend)
        module.load_state_dict(rest, strict=not isinstance(backend, nn.Module))
        if isinstance(backend, nn.Module):
            missing = set(module.state_dict()) - set(rest) - {EMBEDDING_KEY}
            if missing:
                raise ConfigError(f"{sorted(missing)[0]}: missing from the checkpoint")
        return module


def split_checkpoint(
    source: str | Path | Mapping[str, torch.Tensor], layer_id: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Separate one Engram layer's big table from its dense parameters.

    Parameters
    ----------
    source
        A safetensors file (only the layer's tensors are read) or a state_dict. Keys may carry a
        ``layer{layer_id}.`` prefix; without any such key the whole mapping is taken as one
        module's state_dict.
    layer_id
        The Engram layer to extract.

    Returns
    -------
    (embedding_weight, dense_state_dict)
        ``multi_head_embedding.embedding.weight`` [rows, dim] and the remaining reference-layout
        keys (``multi_head_embedding.offsets``, ``value_proj.*``, ``key_projs.*``, ``norm1.*``,
        ``norm2.*``, ``short_conv.*``) without the prefix. Other keys (such as the golden file's
        ``hidden_states``/``output``) are left out.

    Raises
    ------
    ConfigError
        The file cannot be read, or the table key is missing (naming the Engram layers the
        checkpoint holds when it holds others).

    Examples
    --------
    >>> weight, rest = split_checkpoint("tests/data/golden/engram_forward.safetensors", 1)
    >>> tuple(weight.shape), "value_proj.weight" in rest, EMBEDDING_KEY in rest
    ((20112, 16), True, False)
    """
    prefix = f"layer{layer_id}."
    if isinstance(source, Mapping):
        keys = list(source)
        has_prefix = any(k.startswith(prefix) for k in keys)
        items = {
            (k[len(prefix) :] if has_prefix else k): v
            for k, v in source.items()
            if not has_prefix or k.startswith(prefix)
        }
        tensors = {k: torch.as_tensor(v) for k, v in items.items() if is_engram_module_key(k)}
    else:
        tensors, keys = _read_safetensors(Path(source), prefix)
    if EMBEDDING_KEY not in tensors:
        held = _held_layers(keys)
        if held and layer_id not in held:  # a checkpoint of another config: say what it holds
            where = "" if isinstance(source, Mapping) else f" {source}"
            raise ConfigError(
                f"{prefix}{EMBEDDING_KEY}: missing from the checkpoint{where}, it holds Engram "
                f"layers {held} (keys {', '.join(f'layer{n}.' for n in held)}); expected "
                f"layer {layer_id}'s"
            )
        raise ConfigError(
            f"{prefix if tensors or isinstance(source, Mapping) else ''}{EMBEDDING_KEY}: missing "
            f"from the checkpoint {str(source) if not isinstance(source, Mapping) else ''}".rstrip()
        )
    weight = tensors.pop(EMBEDDING_KEY)
    return weight, tensors


def check_checkpoint_tensor(key: str, value: Any, shape: tuple[int, ...]) -> None:
    """Raise ConfigError unless a checkpoint's ``value`` of ``key`` is a tensor (torch copies no
    other: it raised after copying the keys before it)."""
    if not torch.overrides.is_tensor_like(value):
        raise ConfigError(
            f"{key}: the checkpoint holds a {type(value).__name__}; expected a torch.Tensor of "
            f"shape {list(shape)} (torch.as_tensor for an array or a list)"
        )


def is_engram_module_key(key: str) -> bool:
    """Whether ``key`` belongs to one Engram module's reference-layout state_dict."""
    return key == EMBEDDING_KEY or _DENSE_KEY.match(key) is not None


def _held_layers(keys: list[str]) -> list[int]:
    """The Engram layers whose ``layer{L}.`` module keys are among ``keys``."""
    found = (REFERENCE_KEY.match(key) for key in keys)
    return sorted({int(m[1]) for m in found if m and is_engram_module_key(m[2])})


def _read_safetensors(path: Path, prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The layer's wanted tensors of a safetensors file, prefix stripped (others not read), and
    every key of the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            has_prefix = any(k.startswith(prefix) for k in keys)
            out = {}
            for key in keys:
                name = key[len(prefix) :] if has_prefix and key.startswith(prefix) else None
                if not has_prefix:
                    name = key
                if name is not None and is_engram_module_key(name):
                    out[name] = f.get_tensor(key)
            return out, keys
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{path}: cannot read the checkpoint: {exc}") from exc
