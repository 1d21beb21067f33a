"""The ``tiered-store serve`` configuration: Engram geometry, tables, store tiers, server limits."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, StrictBool, StrictInt
from pydantic import ValidationError as _PydanticValidationError

# format_validation_error once the "config" step makes it public
from ..config import ConfigModel, StoreConfig, format_validation_error, load_yaml
from ..engram import BackboneConfig, EngramConfig, load_engram_config
from ..errors import ConfigError

__all__ = [
    "SERVE_DEFAULTS",
    "DenseSection",
    "ServeConfig",
    "ServerSection",
    "TablesSection",
    "check_address",
]

# Every default, with its unit.
SERVE_DEFAULTS: dict[str, Any] = {
    "server.address": "127.0.0.1:8080",  # host:port of the inference endpoint (port 0: any free)
    "server.max_batch": 64,  # sequences per request
    "server.max_seq_len": 4096,  # tokens per sequence
    "server.max_tokens": 16384,  # tokens per request (batch x sequence length)
    "server.max_body_bytes": 4 << 20,  # bytes, 4 MiB
    "server.max_output_values": 1 << 20,  # floats returned with return_output
    "server.max_concurrent": 4,  # requests computed at once; others wait (up to request_timeout_s)
    "server.request_timeout_s": 30.0,  # seconds: socket timeout, and the longest wait for a turn
    "server.torch_threads": 0,  # intra-op threads for torch (0: leave torch's default)
    "tables.path": "tables/layer{layer}.npy",  # '{layer}' becomes the Engram layer id
    "tables.dtype": "float32",  # dtype of tables built with create
    "tables.create": False,  # build seeded random tables that do not exist yet
    "tables.seed": 0,  # seed of created tables (layer L uses seed + L)
    "tables.std": 1.0,  # standard deviation of created tables (nn.Embedding's init)
    "tables.verify_on_start": False,  # re-check every block checksum before serving
    "tables.scrub_interval_s": 0.0,  # seconds between background checksum passes (0: never)
    "dense.checkpoint": None,  # reference-layout safetensors with layer{L}.* dense weights
    "dense.seed": 0,  # seed of the dense Engram parameters when there is no checkpoint
}
_SERVE_KEYS = ("engram", "backbone", "tables", "store", "server", "dense")


def check_address(value: str, key: str, *, allow_empty: bool = False) -> tuple[str, int] | None:
    """``"host:port"`` -> (host, port); ``""`` -> None when allowed; else ConfigError naming ``key``."""
    if value == "" and allow_empty:
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        empty = " or '' (off)" if allow_empty else ""
        raise ConfigError(
            f"{key}: got {value!r}; expected 'host:port' like '127.0.0.1:8080'{empty}"
        )
    return host, int(port)


class ServerSection(ConfigModel):
    """The HTTP endpoint and its limits."""

    address: str = SERVE_DEFAULTS["server.address"]
    max_batch: StrictInt = Field(default=SERVE_DEFAULTS["server.max_batch"], ge=1)
    max_seq_len: StrictInt = Field(default=SERVE_DEFAULTS["server.max_seq_len"], ge=1)
    max_tokens: StrictInt = Field(default=SERVE_DEFAULTS["server.max_tokens"], ge=1)
    max_body_bytes: StrictInt = Field(default=SERVE_DEFAULTS["server.max_body_bytes"], ge=64)
    max_output_values: StrictInt = Field(default=SERVE_DEFAULTS["server.max_output_values"], ge=0)
    max_concurrent: StrictInt = Field(default=SERVE_DEFAULTS["server.max_concurrent"], ge=1)
    request_timeout_s: float = Field(default=SERVE_DEFAULTS["server.request_timeout_s"], gt=0)
    torch_threads: StrictInt = Field(default=SERVE_DEFAULTS["server.torch_threads"], ge=0)


class TablesSection(ConfigModel):
    """Where each Engram layer's table lives, and how to build missing ones."""

    path: str = SERVE_DEFAULTS["tables.path"]
    dtype: Literal["float32", "float16", "bfloat16"] = SERVE_DEFAULTS["tables.dtype"]
    create: StrictBool = SERVE_DEFAULTS["tables.create"]
    seed: StrictInt = Field(default=SERVE_DEFAULTS["tables.seed"], ge=0)
    std: float = Field(default=SERVE_DEFAULTS["tables.std"], gt=0)
    verify_on_start: StrictBool = SERVE_DEFAULTS["tables.verify_on_start"]
    scrub_interval_s: float = Field(default=SERVE_DEFAULTS["tables.scrub_interval_s"], ge=0)


class DenseSection(ConfigModel):
    """The Engram layers' dense parameters (projections, norms, convolution)."""

    checkpoint: str | None = SERVE_DEFAULTS["dense.checkpoint"]
    seed: StrictInt = Field(default=SERVE_DEFAULTS["dense.seed"], ge=0)


class _Sections(ConfigModel):
    """The pydantic-validated sections, parsed together so errors name their key path."""

    tables: TablesSection = TablesSection()
    server: ServerSection = ServerSection()
    dense: DenseSection = DenseSection()


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``tiered-store serve`` needs: Engram geometry, tables, store tiers, server limits.

    Parameters
    ----------
    engram, backbone
        The Engram configuration and backbone facts (``hidden_size``, ``hc_mult``).
    tables, server, dense
        The sections of the same names (defaults in ``SERVE_DEFAULTS``).
    store
        The ``store`` section as written: a ``StoreConfig`` without ``table``, applied to every
        layer (``{layer}`` in ``static_rows``/``preload_rows`` paths becomes the layer id).
    base_dir
        Directory relative paths are resolved against (the YAML file's).
    source
        Where the config came from, for error messages.

    Examples
    --------
    >>> cfg = ServeConfig.from_dict({"engram": {"engram_vocab_size": [2003, 3001],
    ...     "n_embed_per_ngram": 64, "n_head_per_ngram": 4, "layer_ids": [1, 4]},
    ...     "backbone": {"hidden_size": 32, "hc_mult": 2},
    ...     "store": {"tiers": {"hot": {"capacity": "5%"}}}})
    >>> cfg.table_names, cfg.server.address
    (['layer1', 'layer4'], '127.0.0.1:8080')
    >>> cfg.store_config(4).tiers.hot.capacity, cfg.table_path(4).name
    ('5%', 'layer4.npy')
    """

    engram: EngramConfig
    backbone: BackboneConfig
    tables: TablesSection
    server: ServerSection
    dense: DenseSection
    store: Mapping[str, Any]
    base_dir: Path
    source: str = "config"

    @classmethod
    def from_dict(
        cls, data: Any, *, base_dir: Path | None = None, source: str = "config"
    ) -> ServeConfig:
        """Validate a plain mapping; errors name the key path and what was expected."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: got {type(data).__name__}; expected a mapping at the top")
        unknown = sorted(str(k) for k in data if k not in _SERVE_KEYS)
        if unknown:
            raise ConfigError(
                f"{source}: {unknown[0]}: unknown key; expected one of {', '.join(_SERVE_KEYS)}"
            )
        engram, backbone = load_engram_config(
            {"engram": data.get("engram") or {}, "backbone": data.get("backbone") or {}}
        )
        try:
            sections = _Sections.model_validate(
                {k: data[k] for k in ("tables", "server", "dense") if data.get(k) is not None}
            )
        except _PydanticValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None
        store = data.get("store") or {}
        if not isinstance(store, Mapping):
            raise ConfigError(f"{source}: store: got {type(store).__name__}; expected a mapping")
        if "table" in store:
            raise ConfigError(
                f"{source}: store.table: each layer's table comes from tables.path; remove it"
            )
        if len(engram.layer_ids) > 1 and "{layer}" not in sections.tables.path:
            raise ConfigError(
                f"{source}: tables.path: got {sections.tables.path!r}; expected a '{{layer}}' "
                f"placeholder (there are {len(engram.layer_ids)} Engram layers, one table each)"
            )
        check_address(sections.server.address, "server.address")
        cfg = cls(
            engram=engram,
            backbone=backbone,
            tables=sections.tables,
            server=sections.server,
            dense=sections.dense,
            store=copy.deepcopy(dict(store)),
            base_dir=(base_dir or Path.cwd()).resolve(),
            source=source,
        )
        for layer in engram.layer_ids:  # validate every layer's store config now
            check_address(
                cfg.store_config(layer).metrics.address, "store.metrics.address", allow_empty=True
            )
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServeConfig:
        """Load and validate a YAML file; relative paths are relative to it."""
        data = load_yaml(path)
        return cls.from_dict(data, base_dir=Path(path).parent, source=str(path))

    @property
    def table_names(self) -> list[str]:
        """``layer{L}`` for every Engram layer, in layer order."""
        return [f"layer{layer}" for layer in self.engram.layer_ids]

    def table_path(self, layer: int) -> Path:
        """The table file of Engram layer ``layer``."""
        return (self.base_dir / self.tables.path.replace("{layer}", str(layer))).resolve()

    def store_config(self, layer: int) -> StoreConfig:
        """The ``StoreConfig`` of layer ``layer``: the store section plus its table path."""
        data = _replace_layer(copy.deepcopy(dict(self.store)), layer)
        data["table"] = {"path": str(self.table_path(layer))}
        return StoreConfig.from_dict(
            data, base_dir=self.base_dir, source=f"{self.source} (store section, layer {layer})"
        )

    @property
    def metrics_address(self) -> str:
        """Where the separate ``/metrics`` listener binds (``""``: none)."""
        return self.store_config(self.engram.layer_ids[0]).metrics.address

    def with_overrides(self, **server: Any) -> ServeConfig:
        """A copy with some ``server`` fields replaced (``address=...``); ``metrics_address``
        replaces ``store.metrics.address``."""
        store = copy.deepcopy(dict(self.store))
        if "metrics_address" in server:
            address = server.pop("metrics_address")
            check_address(address, "--metrics-address", allow_empty=True)
            store["metrics"] = {**store.get("metrics", {}), "address": address}
        if "address" in server:
            check_address(server["address"], "--address")
        return ServeConfig(
            engram=self.engram,
            backbone=self.backbone,
            tables=self.tables,
            server=self.server.model_copy(update=server),
            dense=self.dense,
            store=store,
            base_dir=self.base_dir,
            source=self.source,
        )


def _replace_layer(value: Any, layer: int) -> Any:
    """``{layer}`` -> the layer id in every string of a nested config."""
    if isinstance(value, str):
        return value.replace("{layer}", str(layer))
    if isinstance(value, dict):
        return {k: _replace_layer(v, layer) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_layer(v, layer) for v in value]
    return value
