"""Engram and backbone configuration: frozen dataclasses, defaults in one place, checked on load.

The fields and defaults are those of the reference ``engram_demo_v1.py`` (``EngramConfig`` and
``BackBoneConfig``). Example ``engram.yaml``::

    engram:
      engram_vocab_size: [646400, 646400]   # table rows per head before prime rounding, n = 2..N
      max_ngram_size: 3
      n_embed_per_ngram: 512
      n_head_per_ngram: 8
      layer_ids: [1, 15]
    backbone:
      hidden_size: 1024
      hc_mult: 4
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = ["BackboneConfig", "EngramConfig", "load_engram_config"]

# Every default, as in the reference implementation.
ENGRAM_DEFAULTS: dict[str, Any] = {
    "engram_vocab_size": (129280 * 5, 129280 * 5),  # rows per head, per n-gram order 2..N
    "max_ngram_size": 3,  # longest n-gram hashed (orders 2..max_ngram_size)
    "n_embed_per_ngram": 512,  # embedding width per order, split over its heads
    "n_head_per_ngram": 8,  # hash heads (tables) per order
    "layer_ids": (1, 15),  # backbone layers that carry an Engram module
    "pad_id": 2,  # original token id shifted in before the sequence start
    "seed": 0,  # seeds the per-layer hash multipliers
    "kernel_size": 4,  # ShortConv kernel (taps)
}
BACKBONE_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024,  # model width per hyper-connection branch
    "hc_mult": 4,  # hyper-connection branches
    "vocab_size": 129280,  # tokenizer ids, added tokens included
    "num_layers": 30,  # backbone layers
}


def _int(path: str, value: Any, *, minimum: int) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise ConfigError naming ``path``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{path}: expected an integer >= {minimum}, got {value}")
    return int(value)


def _int_tuple(path: str, value: Any, *, minimum: int) -> tuple[int, ...]:
    """Return ``value`` as a tuple of ints >= ``minimum``, else raise ConfigError naming ``path``."""
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{path}: expected a list of integers, got {value!r}")
    return tuple(_int(f"{path}[{i}]", v, minimum=minimum) for i, v in enumerate(value))


def _check_keys(path: str, data: Any, known: Mapping[str, Any], ignore_unknown: bool) -> None:
    """Raise ConfigError if ``data`` is not a mapping or (unless ignored) has unknown keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    if not ignore_unknown:
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(
                f"{path}.{unknown[0]}: unknown key; expected one of {', '.join(sorted(known))}"
            )


@dataclass(frozen=True)
class EngramConfig:
    """Configuration of the Engram N-gram memory (the reference ``EngramConfig``).

    Parameters
    ----------
    engram_vocab_size
        Rows per head for each n-gram order 2..``max_ngram_size`` before rounding up to a prime;
        one entry per order.
    max_ngram_size
        Longest n-gram hashed; orders 2..``max_ngram_size`` are used.
    n_embed_per_ngram
        Embedding width per order, split evenly over that order's heads.
    n_head_per_ngram
        Hash heads per order; each head has its own prime-sized table.
    layer_ids
        Backbone layers that carry an Engram module (distinct, non-negative).
    pad_id
        Original token id shifted in before the sequence start (compressed before use).
    seed
        Seed of the per-layer hash multipliers.
    kernel_size
        Taps of the ShortConv depthwise convolution.

    Examples
    --------
    >>> cfg = EngramConfig.from_dict({"engram_vocab_size": [2003, 3001], "layer_ids": [1, 4]})
    >>> cfg.num_heads, cfg.head_dim, cfg.engram_hidden_size
    (16, 64, 1024)
    >>> EngramConfig.from_dict({"max_ngram_size": 1})
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: engram.max_ngram_size: expected an integer >= 2, got 1
    """

    engram_vocab_size: tuple[int, ...] = ENGRAM_DEFAULTS["engram_vocab_size"]
    max_ngram_size: int = ENGRAM_DEFAULTS["max_ngram_size"]
    n_embed_per_ngram: int = ENGRAM_DEFAULTS["n_embed_per_ngram"]
    n_head_per_ngram: int = ENGRAM_DEFAULTS["n_head_per_ngram"]
    layer_ids: tuple[int, ...] = ENGRAM_DEFAULTS["layer_ids"]
    pad_id: int = ENGRAM_DEFAULTS["pad_id"]
    seed: int = ENGRAM_DEFAULTS["seed"]
    kernel_size: int = ENGRAM_DEFAULTS["kernel_size"]

    def __post_init__(self) -> None:
        p = "engram"
        n = _int(f"{p}.max_ngram_size", self.max_ngram_size, minimum=2)
        sizes = _int_tuple(f"{p}.engram_vocab_size", self.engram_vocab_size, minimum=2)
        if len(sizes) != n - 1:
            raise ConfigError(
                f"{p}.engram_vocab_size: expected {n - 1} entries (one per n-gram order 2..{n}, "
                f"max_ngram_size={n}), got {len(sizes)}"
            )
        heads = _int(f"{p}.n_head_per_ngram", self.n_head_per_ngram, minimum=1)
        embed = _int(f"{p}.n_embed_per_ngram", self.n_embed_per_ngram, minimum=1)
        if embed % heads:
            raise ConfigError(
                f"{p}.n_embed_per_ngram: expected a multiple of n_head_per_ngram={heads}, "
                f"got {embed}"
            )
        layers = _int_tuple(f"{p}.layer_ids", self.layer_ids, minimum=0)
        if not layers:
            raise ConfigError(f"{p}.layer_ids: expected at least one layer id, got []")
        if len(set(layers)) != len(layers):
            dup = next(v for v in layers if layers.count(v) > 1)
            raise ConfigError(f"{p}.layer_ids: expected distinct layer ids, got {dup} twice")
        object.__setattr__(self, "engram_vocab_size", sizes)
        object.__setattr__(self, "layer_ids", layers)
        _int(f"{p}.pad_id", self.pad_id, minimum=0)
        _int(f"{p}.seed", self.seed, minimum=0)
        _int(f"{p}.kernel_size", self.kernel_size, minimum=1)

    @property
    def num_orders(self) -> int:
        """Number of n-gram orders hashed (``max_ngram_size - 1``)."""
        return self.max_ngram_size - 1

    @property
    def num_heads(self) -> int:
        """Heads per layer, all orders together (H)."""
        return self.num_orders * self.n_head_per_ngram

    @property
    def head_dim(self) -> int:
        """Width of one head's table row."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def engram_hidden_size(self) -> int:
        """Width of the concatenated embedding of all heads."""
        return self.num_orders * self.n_embed_per_ngram

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, ignore_unknown: bool = False) -> EngramConfig:
        """Build from a mapping; unknown keys are an error unless ``ignore_unknown``."""
        _check_keys("engram", data, ENGRAM_DEFAULTS, ignore_unknown)
        return cls(**{k: data[k] for k in ENGRAM_DEFAULTS if k in data})

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (lists, not tuples) that ``from_dict`` reads back."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }


@dataclass(frozen=True)
class BackboneConfig:
    """The backbone facts an Engram module needs (the reference ``BackBoneConfig``).

    Examples
    --------
    >>> BackboneConfig(hidden_size=48, hc_mult=4).hidden_size
    48
    """

    hidden_size: int = BACKBONE_DEFAULTS["hidden_size"]
    hc_mult: int = BACKBONE_DEFAULTS["hc_mult"]
    vocab_size: int = BACKBONE_DEFAULTS["vocab_size"]
    num_layers: int = BACKBONE_DEFAULTS["num_layers"]

    def __post_init__(self) -> None:
        for name in BACKBONE_DEFAULTS:
            _int(f"backbone.{name}", getattr(self, name), minimum=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, ignore_unknown: bool = False) -> BackboneConfig:
        """Build from a mapping; unknown keys are an error unless ``ignore_unknown``."""
        _check_keys("backbone", data, BACKBONE_DEFAULTS, ignore_unknown)
        return cls(**{k: data[k] for k in BACKBONE_DEFAULTS if k in data})


def load_engram_config(
    source: str | Path | Mapping[str, Any], *, ignore_unknown: bool = False
) -> tuple[EngramConfig, BackboneConfig]:
    """Load ``engram`` and ``backbone`` sections from a YAML/JSON file or a mapping.

    A mapping without an ``engram`` section is read as the engram section itself (backbone
    defaults apply). Layer ids must be below ``backbone.num_layers``.

    Parameters
    ----------
    source
        Path of a YAML (or JSON) file, or an already parsed mapping.
    ignore_unknown
        Skip keys this library does not know instead of raising (useful for files that carry
        extra data, such as the golden-vector json files).

    Returns
    -------
    (EngramConfig, BackboneConfig)

    Raises
    ------
    ConfigError
        The file is not a mapping, a key is unknown, or a value is out of range; the message names
        the key path (``engram.layer_ids[1]``) and what was expected.

    Examples
    --------
    >>> eng, bb = load_engram_config({"engram": {"layer_ids": [1, 4]}, "backbone": {"hidden_size": 48}})
    >>> eng.layer_ids, bb.hidden_size, bb.hc_mult
    ((1, 4), 48, 4)
    """
    if isinstance(source, (str, Path)):
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read the Engram config file: {exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    else:
        data = source
    if not isinstance(data, Mapping):
        raise ConfigError(f"<root>: expected a mapping with 'engram' and 'backbone', got {data!r}")
    if "engram" in data or "backbone" in data:
        if not ignore_unknown:
            unknown = sorted(str(k) for k in data if k not in ("engram", "backbone"))
            if unknown:
                raise ConfigError(f"{unknown[0]}: unknown key; expected 'engram' and 'backbone'")
        engram = EngramConfig.from_dict(data.get("engram", {}), ignore_unknown=ignore_unknown)
        backbone = BackboneConfig.from_dict(data.get("backbone", {}), ignore_unknown=ignore_unknown)
    else:
        engram = EngramConfig.from_dict(data, ignore_unknown=ignore_unknown)
        backbone = BackboneConfig()
    for i, layer in enumerate(engram.layer_ids):
        if layer >= backbone.num_layers:
            raise ConfigError(
                f"engram.layer_ids[{i}]: expected a layer id below backbone.num_layers="
                f"{backbone.num_layers}, got {layer}"
            )
    return engram, backbone
