"""Engram, backbone and Transformer configuration: frozen sections, each default once, checked on load.

The Engram and backbone fields and defaults are those of the reference ``engram_demo_v1.py``
(``EngramConfig`` and ``BackBoneConfig``); ``transformer`` adds what ``EngramLM`` needs beyond
them. Sections are ``tiered_store.config.ConfigModel`` s, read like every other configuration of
the project. Example ``engram.yaml``::

    engram:
      engram_vocab_size: [646400, 646400]   # table rows per head before prime rounding, n = 2..N
      max_ngram_size: 3
      n_embed_per_ngram: 512
      n_head_per_ngram: 8
      layer_ids: [1, 15]
    backbone:
      hidden_size: 1024
      hc_mult: 4
    transformer:                            # EngramLM only
      num_attention_heads: 4
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, model_validator

from ..config import (
    ConfigModel,
    FieldError,
    checked_by,
    expand_home,
    int_at_least,
    load_yaml,
)
from ..errors import ConfigError, shown

__all__ = [
    "BackboneConfig",
    "EngramBackboneConfig",
    "EngramConfig",
    "ModelConfig",
    "TransformerConfig",
    "hf_engram_sections",
    "load_engram_config",
]

# Every default, as in the reference implementation.
ENGRAM_DEFAULTS: dict[str, Any] = {
    "engram_vocab_size": (129280 * 5, 129280 * 5),  # rows per head, per n-gram order 2..N
    "max_ngram_size": 3,  # longest n-gram hashed (orders 2..max_ngram_size)
    "n_embed_per_ngram": 512,  # embedding width per order, split over its heads
    "n_head_per_ngram": 8,  # hash heads (tables) per order
    "layer_ids": (1, 15),  # backbone layers that carry an Engram module
    "pad_id": 2,  # original token id shifted in before the sequence start
    "seed": 0,  # seeds the per-layer hash multipliers
    "kernel_size": 4,  # ShortConv kernel (taps; the demo module only)
    "geometry": "demo",  # "demo" (engram_demo_v1) or "deepseek-v4.1" (the release's layout)
    "num_embeddings": None,  # rows per layer's table, when the source states them (checked)
    "compressed_vocab_size": None,  # compressed token ids, when the source states it (checked)
    "norm_eps": 1e-20,  # RMS epsilon of the V4.1 gate
}
GEOMETRIES = ("demo", "deepseek-v4.1")
MAX_NGRAM_SIZE = 64  # far past any model's (3 in the reference, 4 in V4.1); bounds the orders
# A DeepSeek-V4.1 Hugging Face config.json's text_config keys -> EngramConfig fields.
HF_ENGRAM_KEYS = {
    "engram_layer_ids": "layer_ids",
    "engram_num_embeddings": "num_embeddings",
    "engram_max_ngram_size": "max_ngram_size",
    "engram_vocab_size": "engram_vocab_size",
    "engram_n_heads": "n_head_per_ngram",
    "engram_head_dim": "n_embed_per_ngram",  # x n_heads
    "engram_pad_token_id": "pad_id",
    "engram_compressed_vocab_size": "compressed_vocab_size",
}
HF_BACKBONE_KEYS = {
    "hidden_size": "hidden_size",
    "hc_mult": "hc_mult",
    "vocab_size": "vocab_size",
    "num_hidden_layers": "num_layers",
}
BACKBONE_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024,  # model width per hyper-connection branch
    "hc_mult": 4,  # hyper-connection branches
    "vocab_size": 129280,  # tokenizer ids, added tokens included
    "num_layers": 30,  # backbone layers
}
# What EngramLM needs beyond the reference's two sections.
TRANSFORMER_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 4,  # query/key/value heads per attention layer
    "intermediate_size": 0,  # SwiGLU width; 0 = 8/3 * hidden_size rounded up to a multiple of 64
    "rope_theta": 10000.0,  # rotary position embedding base
    "norm_eps": 1e-6,  # RMSNorm epsilon of the backbone norms
    "init_std": 0.02,  # normal init of the dense weights (Engram modules keep their own init)
}


def _as_tuple(value: Any) -> tuple:
    """A list (any iterable but a string or mapping) as a tuple."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise ValueError(f"expected a list of integers, got {shown(value)}")
    return tuple(value)


def _positive_number(value: Any) -> float:
    """A finite number > 0, as a float."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a finite number > 0, got {shown(value)}")
    return float(value)


def _gate_eps(value: Any) -> float:
    """The V4.1 gate's RMS epsilon: a finite number > 0 that float32 holds, as a float."""
    eps = _positive_number(value)  # 0 or less makes NaN gates (0 * rsqrt(0), all-zero stream)
    if eps <= 2.0**-150:  # float32 rounds it to 0, and the gate adds it in float32
        raise ValueError(
            f"got {eps!r}, which float32 (the gate's arithmetic) rounds to 0; expected at least "
            f"{2.0**-149:.3g}, float32's smallest (1e-20 in the release)"
        )
    return eps


def _int_list(minimum: int) -> Any:
    """The annotation of a list of integers ``>= minimum``, held as a tuple."""
    return Annotated[tuple[int_at_least(minimum), ...], BeforeValidator(_as_tuple)]


RowCounts = _int_list(2)
LayerIds = _int_list(0)
Count = int_at_least(1)
Index = int_at_least(0)
PositiveNumber = checked_by(_positive_number, float)
GateEps = checked_by(_gate_eps, float)


class EngramConfig(ConfigModel):
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
        Taps of the ShortConv depthwise convolution (the demo module only).
    geometry
        ``"demo"`` (the paper's ``engram_demo_v1``) or ``"deepseek-v4.1"`` (the release: fp8
        tables, dead tokens, the V4.1 module). Hashing and table layout are the same algorithm.
    num_embeddings
        Rows of each layer's table as the checkpoint states them (``engram_num_embeddings``); the
        hasher checks each against the sum of the layer's primes.
    compressed_vocab_size
        Compressed token ids as the checkpoint states them; checked against the tokenizer.
    norm_eps
        RMS epsilon of the V4.1 gate (a ``config.json``'s ``text_config.rms_norm_eps``), a
        finite number > 0 that float32 holds (the gate's arithmetic).

    ``engram_vocab_size`` may be one number for every order (as V4.1 configs give it).

    Examples
    --------
    >>> cfg = EngramConfig.from_dict({"engram_vocab_size": [2003, 3001], "layer_ids": [1, 4]})
    >>> cfg.num_heads, cfg.head_dim, cfg.engram_hidden_size
    (16, 64, 1024)
    >>> EngramConfig.from_dict({"max_ngram_size": 1})
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: engram.max_ngram_size: expected an integer from 2 to 64, got 1
    """

    section: ClassVar[tuple[str, ...]] = ("engram",)
    engram_vocab_size: RowCounts = ENGRAM_DEFAULTS["engram_vocab_size"]
    max_ngram_size: int_at_least(2, MAX_NGRAM_SIZE) = ENGRAM_DEFAULTS["max_ngram_size"]
    n_embed_per_ngram: Count = ENGRAM_DEFAULTS["n_embed_per_ngram"]
    n_head_per_ngram: Count = ENGRAM_DEFAULTS["n_head_per_ngram"]
    layer_ids: LayerIds = ENGRAM_DEFAULTS["layer_ids"]
    pad_id: Index = ENGRAM_DEFAULTS["pad_id"]
    seed: Index = ENGRAM_DEFAULTS["seed"]
    kernel_size: Count = ENGRAM_DEFAULTS["kernel_size"]
    geometry: Literal[GEOMETRIES] = ENGRAM_DEFAULTS["geometry"]
    num_embeddings: RowCounts | None = ENGRAM_DEFAULTS["num_embeddings"]
    compressed_vocab_size: Count | None = ENGRAM_DEFAULTS["compressed_vocab_size"]
    norm_eps: GateEps = ENGRAM_DEFAULTS["norm_eps"]

    @model_validator(mode="before")
    @classmethod
    def _one_vocab_size_for_every_order(cls, data: Any) -> Any:
        """A scalar ``engram_vocab_size`` stands for the same size at every order."""
        if isinstance(data, Mapping) and isinstance(data.get("engram_vocab_size"), int):
            n = data.get("max_ngram_size", ENGRAM_DEFAULTS["max_ngram_size"])
            valid = isinstance(n, int) and not isinstance(n, bool) and 2 <= n <= MAX_NGRAM_SIZE
            orders = n - 1 if valid else 1  # else max_ngram_size's own error is the one to read
            data = {**data, "engram_vocab_size": (data["engram_vocab_size"],) * orders}
        return data

    @model_validator(mode="after")
    def _check_layout(self) -> EngramConfig:
        """One table size per order, whole heads, distinct layers."""
        n, sizes = self.max_ngram_size, self.engram_vocab_size
        if len(sizes) != n - 1:
            raise FieldError(
                "engram_vocab_size",
                f"expected {n - 1} entries (one per n-gram order 2..{n}, max_ngram_size={n}), "
                f"got {len(sizes)}",
            )
        heads, embed = self.n_head_per_ngram, self.n_embed_per_ngram
        if embed % heads:
            raise FieldError(
                "n_embed_per_ngram",
                f"expected a multiple of n_head_per_ngram={heads}, got {embed}",
            )
        layers = self.layer_ids
        if not layers:
            raise FieldError("layer_ids", "expected at least one layer id, got []")
        if len(set(layers)) != len(layers):
            dup = next(v for v in layers if layers.count(v) > 1)
            raise FieldError("layer_ids", f"expected distinct layer ids, got {dup} twice")
        if self.num_embeddings is not None and len(self.num_embeddings) != len(layers):
            raise FieldError(
                "num_embeddings",
                f"expected one row count per layer ({len(layers)} layers), "
                f"got {len(self.num_embeddings)}",
            )
        return self

    @property
    def is_v41(self) -> bool:
        """True for DeepSeek-V4.1's geometry (fp8 tables, dead tokens, the V4.1 module)."""
        return self.geometry == "deepseek-v4.1"

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

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (lists, not tuples) that ``from_dict`` reads back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_dump().items()}


def v41_refusal(what: str) -> str:
    """Why ``what`` (``"training cannot update"``) refuses ``engram.geometry`` 'deepseek-v4.1'."""
    return (
        f"'deepseek-v4.1' has packed fp8 tables, which {what}; expected a model of float tables "
        "(geometry 'demo')"
    )


class BackboneConfig(ConfigModel):
    """The backbone facts an Engram module needs (the reference ``BackBoneConfig``).

    Examples
    --------
    >>> BackboneConfig(hidden_size=48, hc_mult=4).hidden_size
    48
    """

    section: ClassVar[tuple[str, ...]] = ("backbone",)
    hidden_size: Count = BACKBONE_DEFAULTS["hidden_size"]
    hc_mult: Count = BACKBONE_DEFAULTS["hc_mult"]
    vocab_size: Count = BACKBONE_DEFAULTS["vocab_size"]
    num_layers: Count = BACKBONE_DEFAULTS["num_layers"]


class TransformerConfig(ConfigModel):
    """The backbone facts ``BackboneConfig`` does not carry: attention heads, MLP width, RoPE.

    Examples
    --------
    >>> TransformerConfig(num_attention_heads=8).mlp_size(512)
    1408
    """

    section: ClassVar[tuple[str, ...]] = ("transformer",)
    num_attention_heads: Count = TRANSFORMER_DEFAULTS["num_attention_heads"]
    intermediate_size: Index = TRANSFORMER_DEFAULTS["intermediate_size"]
    rope_theta: PositiveNumber = TRANSFORMER_DEFAULTS["rope_theta"]
    norm_eps: PositiveNumber = TRANSFORMER_DEFAULTS["norm_eps"]
    init_std: PositiveNumber = TRANSFORMER_DEFAULTS["init_std"]

    def mlp_size(self, hidden_size: int) -> int:
        """SwiGLU width for ``hidden_size``."""
        if self.intermediate_size:
            return self.intermediate_size
        return -(-(8 * hidden_size // 3) // 64) * 64


class EngramBackboneConfig(ConfigModel):
    """The ``engram`` and ``backbone`` sections, checked together (Engram layers must exist).

    Examples
    --------
    >>> EngramBackboneConfig.from_dict({"engram": {"layer_ids": [1, 4]}, "backbone": {"num_layers": 3}})
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: engram.layer_ids[1]: expected a layer id below backbone.num_layers=3, got 4
    """

    engram: EngramConfig = EngramConfig()
    backbone: BackboneConfig = BackboneConfig()

    @model_validator(mode="after")
    def _check_layers_exist(self) -> EngramBackboneConfig:
        """Every Engram layer id is a backbone layer."""
        for i, layer in enumerate(self.engram.layer_ids):
            if layer >= self.backbone.num_layers:
                raise FieldError(
                    ("engram", "layer_ids", i),
                    f"expected a layer id below backbone.num_layers={self.backbone.num_layers}, "
                    f"got {layer}",
                )
        return self


class ModelConfig(EngramBackboneConfig):
    """Everything that fixes an ``EngramLM``'s shapes: Engram, backbone and Transformer sections.

    Examples
    --------
    >>> cfg = ModelConfig.from_dict({
    ...     "engram": {"engram_vocab_size": [2003, 3001], "n_embed_per_ngram": 64,
    ...                "n_head_per_ngram": 4, "layer_ids": [1, 3]},
    ...     "backbone": {"hidden_size": 64, "hc_mult": 4, "num_layers": 4},
    ...     "transformer": {"num_attention_heads": 4}})
    >>> cfg.backbone.num_layers, cfg.engram.layer_ids
    (4, (1, 3))
    >>> ModelConfig.from_dict({"backbone": {"hidden_size": 30}, "transformer": {"num_attention_heads": 4}})
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: transformer.num_attention_heads: expected a divisor of backbone.hidden_size=30 giving an even head size, got 4
    """

    transformer: TransformerConfig = TransformerConfig()

    @model_validator(mode="after")
    def _check_attention_heads(self) -> ModelConfig:
        """Attention heads split the width into even head sizes (for the rotary embedding)."""
        hidden, heads = self.backbone.hidden_size, self.transformer.num_attention_heads
        if hidden % heads or (hidden // heads) % 2:
            raise FieldError(
                ("transformer", "num_attention_heads"),
                f"expected a divisor of backbone.hidden_size={hidden} giving an even head size, "
                f"got {heads}",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping that ``from_dict`` reads back (stored in checkpoints and table files)."""
        return {
            "engram": self.engram.to_dict(),
            "backbone": self.backbone.model_dump(),
            "transformer": self.transformer.model_dump(),
        }


CONVERT_HF_LOCK = ".convert-hf.lock"  # in convert-hf's OUT_DIR from its first step on


def unfinished_conversion(folder: Path) -> str | None:
    """What to do about ``folder`` when a convert-hf into it has not finished (its lock is there,
    its config.json, written last, is not); else None."""
    if (folder / CONVERT_HF_LOCK).exists() and not (folder / "config.json").exists():
        return (
            f"{folder} holds a `tiered-store convert-hf` conversion that did not finish (it writes "
            "config.json last); expected a finished one: run the same convert-hf into it again"
        )
    return None


def load_engram_config(
    source: str | Path | Mapping[str, Any], *, ignore_unknown: bool = False
) -> tuple[EngramConfig, BackboneConfig]:
    """Load ``engram`` and ``backbone`` sections from a YAML/JSON file or a mapping.

    A mapping without an ``engram`` or ``backbone`` section is read as the engram section itself
    (backbone defaults apply). Layer ids must be below ``backbone.num_layers``.

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
    if isinstance(source, str | Path):
        try:
            data = load_yaml(source, what="Engram config")
        except ConfigError:
            hint = unfinished_conversion(Path(expand_home(source)).parent)  # as load_yaml's
            if Path(source).name == "config.json" and hint is not None:
                raise ConfigError(f"{source}: {hint}") from None
            raise
    elif isinstance(source, Mapping):
        data = source
    else:
        raise ConfigError(
            f"<root>: expected a mapping with 'engram' and 'backbone', got {shown(source)}"
        )
    hf_keys = ("text_config", "engram_layer_ids", "architectures", "model_type")
    if any(key in data for key in hf_keys):  # a Hugging Face config.json (maybe another model's)
        data = hf_engram_sections(
            data, source=str(source) if not isinstance(source, Mapping) else ""
        )
        try:
            sections = EngramBackboneConfig.from_dict(data)
        except ConfigError as exc:
            where = f"{source}: " if isinstance(source, str | Path) else ""
            raise ConfigError(f"{where}{_in_hf_names(exc)}") from None
        return sections.engram, sections.backbone
    elif "engram" not in data and "backbone" not in data:
        if not ignore_unknown and {"tiers", "table"} & set(data):  # a store config, not a model's
            where = f"{source}: " if isinstance(source, str | Path) else ""
            raise ConfigError(
                f"{where}has {', '.join(k for k in ('table', 'tiers') if k in data)}: a store "
                "config (TieredStore.open's); expected an Engram config, with engram: (and "
                "backbone:) sections, like examples/engram-default.yaml"
            )
        data = {"engram": data}
    sections = EngramBackboneConfig.from_dict(data, ignore_unknown=ignore_unknown)
    return sections.engram, sections.backbone


def hf_engram_sections(config: Mapping[str, Any], *, source: str = "") -> dict[str, Any]:
    """A DeepSeek-V4.1 Hugging Face ``config.json`` (its ``text_config``) -> ``engram`` and
    ``backbone`` sections in this library's names.

    Examples
    --------
    >>> hf = {"text_config": {"engram_layer_ids": [1, 14], "engram_num_embeddings": [1998, 5014],
    ...     "engram_max_ngram_size": 4, "engram_vocab_size": 31, "engram_n_heads": 8,
    ...     "engram_head_dim": 256, "engram_pad_token_id": 2, "engram_compressed_vocab_size": 99092,
    ...     "hidden_size": 16, "hc_mult": 4, "num_hidden_layers": 20}}
    >>> eng, bb = load_engram_config(hf)
    >>> eng.geometry, eng.engram_vocab_size, eng.head_dim, bb.num_layers
    ('deepseek-v4.1', (31, 31, 31), 256, 20)
    """
    where = f"{source}: " if source else ""
    text = config.get("text_config", config)
    if not isinstance(text, Mapping):
        raise ConfigError(f"{where}text_config: got {type(text).__name__}; expected a mapping")
    missing = [key for key in HF_ENGRAM_KEYS if key not in text]
    if missing:
        raise ConfigError(
            f"{where}text_config has no {', '.join(missing)}; expected a DeepSeek-V4.1 config "
            f"with the Engram keys {', '.join(HF_ENGRAM_KEYS)}"
        )
    engram = {field: text[key] for key, field in HF_ENGRAM_KEYS.items()}
    heads, head_dim = text["engram_n_heads"], text["engram_head_dim"]
    if isinstance(head_dim, bool) or (isinstance(head_dim, int) and head_dim < 1):
        raise ConfigError(
            f"{where}text_config.engram_head_dim: expected an integer >= 1, got {head_dim}"
        )
    if isinstance(heads, int) and isinstance(head_dim, int):  # (bad heads: their own error)
        engram["n_embed_per_ngram"] = heads * head_dim if heads >= 1 else head_dim
    engram["geometry"] = "deepseek-v4.1"
    if "rms_norm_eps" in text:  # the gate's eps, as vLLM's and SGLang's V4.1 Engram read it
        engram["norm_eps"] = text["rms_norm_eps"]
    backbone = {field: text[key] for key, field in HF_BACKBONE_KEYS.items() if key in text}
    return {"engram": engram, "backbone": backbone}


def _in_hf_names(exc: ConfigError) -> ConfigError:
    """``exc`` about sections ``hf_engram_sections`` made, naming the config.json's own keys."""
    names = {f"engram.{field}": key for key, field in HF_ENGRAM_KEYS.items()}
    names |= {f"backbone.{field}": key for key, field in HF_BACKBONE_KEYS.items()}
    names["engram.norm_eps"] = "rms_norm_eps"
    pattern = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, names)) + r")(?![\w])")
    return ConfigError(pattern.sub(lambda m: f"text_config.{names[m[1]]}", str(exc)))
