"""An Engram table's layout: the facts that decide which row an N-gram lands on, as a table's
manifest records them (``metadata["engram"]``), as a profile or a trace records the config it was
hashed with, and where two of them differ."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from .hashing import NgramHasher

__all__ = [
    "ADDRESSING_FIELDS",
    "LAYOUT_FIELDS",
    "addressing_mismatch",
    "check_backend_layout",
    "layout_error",
    "layout_mismatch",
    "recorded_layout",
    "short",
    "table_metadata",
]

LAYOUT_VERSION = 1
# Facts a table file must share with the model to be read by it (the rest follows from them).
LAYOUT_FIELDS = (
    "layer_id",
    "rows",
    "dim",
    "head_sizes",
    "max_ngram_size",
    "n_head_per_ngram",
    "seed",
    "pad_id",
    "compressed_vocab_size",
    "compressed_lookup_digest",
)
# Facts recorded only since a later release: a file made before, without them, is not refused.
RECORDED_LATER = frozenset({"compressed_lookup_digest"})
# Those that decide which row an N-gram lands on (a profile or a trace counts rows, not widths).
ADDRESSING_FIELDS = tuple(key for key in LAYOUT_FIELDS if key != "dim")
_LAYER_NAME = re.compile(r"layer(\d+)")  # analyze's table names: layer{L}


def table_metadata(hasher: NgramHasher, layer_id: int) -> dict[str, Any]:
    """The manifest metadata that describes layer ``layer_id``'s table layout.

    Examples
    --------
    >>> from tiered_store.engram import EngramConfig, NgramHasher
    >>> cfg = EngramConfig(engram_vocab_size=(2003, 3001), n_embed_per_ngram=64,
    ...                    n_head_per_ngram=4, layer_ids=(1, 4))
    >>> meta = table_metadata(NgramHasher(cfg), 4)["engram"]
    >>> meta["rows"], meta["dim"], meta["head_sizes"][:2], meta["offsets"][:2]
    (20372, 16, [2029, 2039], [0, 2029])
    """
    from .hashing import hasher_for

    config = hasher_for(None, hasher).config
    return {
        "engram": {
            "layout_version": LAYOUT_VERSION,
            "layer_id": int(layer_id),
            "rows": hasher.table_rows(layer_id),
            "dim": config.head_dim,
            "head_sizes": [int(p) for p in hasher.head_sizes(layer_id)],
            "offsets": [int(o) for o in hasher.offsets(layer_id)],
            "max_ngram_size": config.max_ngram_size,
            "n_head_per_ngram": config.n_head_per_ngram,
            "seed": config.seed,
            "pad_id": config.pad_id,
            "compressed_vocab_size": hasher.tokenizer.num_compressed,
            "compressed_lookup_digest": hasher.tokenizer.lookup_digest,
            "tokenizer_vocab_size": hasher.tokenizer.vocab_size,
            "config": config.to_dict(),
        }
    }


def layout_mismatch(
    have: Mapping[str, Any], want: Mapping[str, Any], fields: tuple[str, ...] = LAYOUT_FIELDS
) -> tuple[str, Any, Any] | None:
    """The first of ``fields`` where two layouts differ, with both values (None: they agree); a
    :data:`RECORDED_LATER` fact that either does not record is not compared."""
    for key in fields:
        if key in RECORDED_LATER and (key not in have or key not in want):
            continue
        if have.get(key) != want.get(key):
            return key, have.get(key), want.get(key)
    return None


def layout_error(
    have: Mapping[str, Any],
    hasher: NgramHasher,
    layer_id: int,
    what: str,
    fields: tuple[str, ...] = LAYOUT_FIELDS,
) -> ConfigError | None:
    """The error for a table of layout ``have`` (its manifest's ``metadata["engram"]``) read as
    layer ``layer_id``'s of ``hasher``: ``what`` (the table, as the message's start) was "built
    for" the first of ``fields`` that differs, both values named; None when they agree."""
    want = table_metadata(hasher, layer_id)["engram"]
    if (diff := layout_mismatch(have, want, fields)) is None:
        return None
    key, built, expected = diff
    if key == "layer_id":  # another layer's table (paths swapped), whatever its config
        why = (
            f"the table holds Engram layer {short(built)}'s rows; expected layer {layer_id}'s "
            "own table"
        )
    elif key == "compressed_lookup_digest":
        why = (
            f"the table was made with another tokenizer.json than "
            f"{hasher.tokenizer.tokenizer_path}, one that compresses token ids to other rows"
        )
    else:
        why = f"the table was made with another configuration: engram config {have.get('config')}"
    return ConfigError(
        f"{what} built for {key}={short(built)}, but this model's Engram layer "
        f"{layer_id} expects {key}={short(expected)} ({why})"
    )


def check_backend_layout(backend: Any, hasher: NgramHasher, layer_id: int, name: str) -> None:
    """Raise ConfigError when table backend ``backend`` (``name`` in the message) tells, by its
    ``engram_layout``, that its table was built for another layout than layer ``layer_id``'s of
    ``hasher``; the facts it records are compared (a backend that tells none is taken)."""
    have = getattr(backend, "engram_layout", None)
    if not isinstance(have, Mapping):
        return
    fields = tuple(key for key in LAYOUT_FIELDS if key in have)
    what = f"{name}: {type(backend).__name__}'s table"
    if (error := layout_error(have, hasher, layer_id, what, fields)) is not None:
        raise error


def recorded_layout(
    metadata: Mapping[str, Any], layer: int | None, name: str = ""
) -> dict[str, Any] | None:
    """The addressing facts (:data:`ADDRESSING_FIELDS`) that a profile's metadata or a trace
    header records for one table: its ``config`` (``EngramConfig.to_dict()``, or that under
    ``engram``), its ``tokenizer`` (``compressed_size``, ``lookup_digest``) and the table's
    Engram ``layer`` (else read off a ``name`` such as ``layer2``). None when it records no
    Engram config; facts it cannot tell are left out."""
    from .config import EngramConfig
    from .hashing import table_primes

    config = metadata.get("config")
    if isinstance(config, Mapping) and isinstance(config.get("engram"), Mapping):
        config = config["engram"]  # `tiered-store serve`'s traces: {"engram": ..., "source": ...}
    try:
        config = EngramConfig.from_dict(config)
    except ConfigError:  # none, or not an Engram config: nothing to compare
        return None
    if layer is None and (match := _LAYER_NAME.fullmatch(name)):
        layer = int(match[1])
    out: dict[str, Any] = {
        "max_ngram_size": config.max_ngram_size,
        "n_head_per_ngram": config.n_head_per_ngram,
        "seed": config.seed,
        "pad_id": config.pad_id,
    }
    tokenizer = metadata.get("tokenizer")
    tokenizer = tokenizer if isinstance(tokenizer, Mapping) else {}
    compressed = tokenizer.get("compressed_size")
    if compressed is None:
        compressed = config.compressed_vocab_size
    if compressed is not None:
        out["compressed_vocab_size"] = compressed
    if tokenizer.get("lookup_digest") is not None:
        out["compressed_lookup_digest"] = tokenizer["lookup_digest"]
    if isinstance(layer, int):
        out["layer_id"] = layer
        if layer in config.layer_ids:
            heads = [p for order in table_primes(config)[layer] for p in order]
            out.update(rows=sum(heads), head_sizes=heads)
    return out


def addressing_mismatch(
    recorded: Mapping[str, Any], layout: Mapping[str, Any]
) -> tuple[str, Any, Any] | None:
    """The first addressing fact that both say and disagree on, with both values (None: none)."""
    fields = tuple(key for key in ADDRESSING_FIELDS if key in recorded and key in layout)
    return layout_mismatch(recorded, layout, fields)


def short(value: Any) -> str:
    """A value for an error message, long lists abbreviated."""
    if isinstance(value, list) and len(value) > 6:
        return f"[{', '.join(map(str, value[:4]))}, ... ({len(value)} values)]"
    return repr(value)
