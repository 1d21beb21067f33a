"""The ``tiered-store serve`` configuration: the checkpoint, the model to create, store tiers, limits."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from threading import TIMEOUT_MAX  # the longest wait a thread takes (seconds)
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StrictBool, StrictInt

from ..cache_plan import IgnoredSettingWarning, parse_policy
from ..capacity import parse_bytes
from ..config import (
    METRICS_ADDRESS,
    ConfigModel,
    Number,
    PathText,
    StoreConfig,
    check_address,
    config_folder,
    expand_home,
    load_yaml,
    path_text_problem,
    resolved_under,
)
from ..engram.checkpoint import DENSE_FILE, table_file
from ..engram.config import ModelConfig
from ..errors import ConfigError, shown, warn_at_caller

__all__ = [
    "SERVE_DEFAULTS",
    "CheckpointSection",
    "ServeConfig",
    "ServerSection",
    "check_address",
]

# Every default, with its unit.
MAX_TORCH_THREADS = 4096  # server.torch_threads: more is a typo, not a machine
MAX_BACKLOG = 2**31 - 1  # server.backlog: listen(2) takes a C int (the kernel caps it at somaxconn)
SERVE_DEFAULTS: dict[str, Any] = {
    "server.address": "127.0.0.1:8080",  # host:port of the inference endpoint (port 0: any free)
    "server.max_batch": 64,  # sequences per request
    "server.max_seq_len": 4096,  # tokens per sequence
    "server.max_tokens": 16384,  # tokens per request (batch x longest sequence)
    "server.max_text_chars": 65536,  # characters per text, checked before tokenising
    "server.max_body_bytes": 4 << 20,  # bytes, 4 MiB (Content-Length, or counted while streaming)
    "server.max_concurrent": 4,  # requests parsed, tokenised and computed at once (worker threads)
    "server.max_connections": 1024,  # the endpoint's open connections (and requests); past it 503
    "server.backlog": 2048,  # listen backlog: connections the kernel queues before accept
    "server.keep_alive_s": 5.0,  # seconds an idle keep-alive connection stays open
    "server.request_timeout_s": 30.0,  # seconds: longest wait for a head, a body, and a turn
    "server.announce_requests": False,  # tell the tables each waiting request's rows (evicted last)
    "server.max_announced": 64,  # requests announced at once; later ones wait unannounced
    "server.drop_abandoned": True,  # a request whose client left while it waited: not computed
    "server.health_hold_s": 60.0,  # seconds /healthz stays 503 after a table's lookup failed
    "server.torch_threads": 0,  # intra-op threads for torch (0: leave torch's default)
    "server.record_flush_s": 10.0,  # --record-trace: the chunk reaches the file once this old
    "checkpoint.path": "checkpoint",  # directory written by convert_checkpoint
    "checkpoint.create": False,  # build a small seeded random checkpoint there when missing
    "checkpoint.seed": 0,  # torch seed of a created checkpoint's weights
    "checkpoint.dtype": "float32",  # table dtype of a created checkpoint
    "checkpoint.verify_on_start": False,  # re-check every served table version before serving
    "checkpoint.scrub_interval_s": 0.0,  # seconds between checksum passes of served tables, 0: none
    "checkpoint.scrub_bytes_per_s": 256 << 20,  # a pass reads at most this a second (0: no limit)
}
_SERVE_KEYS = ("checkpoint", "model", "store", "server")


class ServerSection(ConfigModel):
    """The HTTP endpoint and its limits."""

    address: str = SERVE_DEFAULTS["server.address"]
    max_batch: StrictInt = Field(default=SERVE_DEFAULTS["server.max_batch"], ge=1)
    max_seq_len: StrictInt = Field(default=SERVE_DEFAULTS["server.max_seq_len"], ge=1)
    max_tokens: StrictInt = Field(default=SERVE_DEFAULTS["server.max_tokens"], ge=1)
    max_text_chars: StrictInt = Field(default=SERVE_DEFAULTS["server.max_text_chars"], ge=1)
    max_body_bytes: StrictInt = Field(default=SERVE_DEFAULTS["server.max_body_bytes"], ge=64)
    max_concurrent: StrictInt = Field(default=SERVE_DEFAULTS["server.max_concurrent"], ge=1)
    max_connections: StrictInt = Field(default=SERVE_DEFAULTS["server.max_connections"], ge=1)
    backlog: StrictInt = Field(default=SERVE_DEFAULTS["server.backlog"], ge=1, le=MAX_BACKLOG)
    keep_alive_s: Number = Field(
        default=SERVE_DEFAULTS["server.keep_alive_s"], gt=0, le=TIMEOUT_MAX
    )
    request_timeout_s: Number = Field(
        default=SERVE_DEFAULTS["server.request_timeout_s"], gt=0, le=TIMEOUT_MAX
    )
    announce_requests: StrictBool = SERVE_DEFAULTS["server.announce_requests"]
    max_announced: StrictInt = Field(default=SERVE_DEFAULTS["server.max_announced"], ge=1)
    drop_abandoned: StrictBool = SERVE_DEFAULTS["server.drop_abandoned"]
    health_hold_s: Number = Field(
        default=SERVE_DEFAULTS["server.health_hold_s"], ge=0, le=TIMEOUT_MAX
    )
    torch_threads: StrictInt = Field(
        default=SERVE_DEFAULTS["server.torch_threads"], ge=0, le=MAX_TORCH_THREADS
    )
    record_flush_s: Number = Field(
        default=SERVE_DEFAULTS["server.record_flush_s"], ge=0, le=TIMEOUT_MAX
    )


def _byte_size(value: Any) -> Any:
    """A byte size written with a unit (``"256MiB"``) as its bytes; an int as it is (its bound
    checked after); anything else refused saying how to write one."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return parse_bytes(value)
        except ConfigError:
            pass
    raise ValueError(
        f"got {shown(value)}; expected bytes a second: an integer, or a size like '256MiB' "
        "(no '/s'), 0: no limit"
    )


class CheckpointSection(ConfigModel):
    """Where the converted checkpoint is, how to create one, and how often to re-check it."""

    path: PathText = SERVE_DEFAULTS["checkpoint.path"]
    create: StrictBool = SERVE_DEFAULTS["checkpoint.create"]
    seed: StrictInt = Field(default=SERVE_DEFAULTS["checkpoint.seed"], ge=0, le=2**64 - 1)
    dtype: Literal["float32", "float16", "bfloat16"] = SERVE_DEFAULTS["checkpoint.dtype"]
    verify_on_start: StrictBool = SERVE_DEFAULTS["checkpoint.verify_on_start"]
    scrub_interval_s: Number = Field(
        default=SERVE_DEFAULTS["checkpoint.scrub_interval_s"], ge=0, le=TIMEOUT_MAX
    )
    scrub_bytes_per_s: Annotated[StrictInt, BeforeValidator(_byte_size)] = Field(
        default=SERVE_DEFAULTS["checkpoint.scrub_bytes_per_s"], ge=0
    )

    @property
    def scrub_rate(self) -> int | None:
        """Bytes a second a checksum pass reads at most; None: no limit."""
        return self.scrub_bytes_per_s or None


class _Sections(ConfigModel):
    """The pydantic-validated sections, parsed together so errors name their key path."""

    checkpoint: CheckpointSection = CheckpointSection()
    server: ServerSection = ServerSection()


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``tiered-store serve`` needs: the checkpoint, store tiers and server limits.

    Parameters
    ----------
    checkpoint, server
        The sections of the same names (defaults in ``SERVE_DEFAULTS``).
    model
        The ``EngramLM`` shapes (engram, backbone, transformer) of a checkpoint to create with
        ``checkpoint.create`` / ``--create-tables``; ``None`` when the section is absent. A
        checkpoint that exists carries its own configuration (in ``dense.safetensors``).
    store
        The ``store`` section as written: a ``StoreConfig`` without ``table``, applied to every
        Engram layer's table (``{layer}`` in strings becomes the layer id).
    base_dir
        Directory relative paths are resolved against (the YAML file's).
    source
        Where the config came from, for error messages.

    Examples
    --------
    >>> cfg = ServeConfig.from_dict({"checkpoint": {"path": "ckpt"},
    ...     "store": {"tiers": {"hot": {"capacity": "5%"}}}}, base_dir=Path("/srv"))
    >>> cfg.checkpoint_dir, cfg.server.address
    (PosixPath('/srv/ckpt'), '127.0.0.1:8080')
    >>> cfg.store_config(3).table.path, cfg.table_name(3)
    ('/srv/ckpt/engram_layer3.npy', 'engram_layer3')
    """

    checkpoint: CheckpointSection
    server: ServerSection
    model: ModelConfig | None
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
        sections = _Sections.from_dict(
            {k: data[k] for k in ("checkpoint", "server") if data.get(k) is not None}, source=source
        )
        model = None
        if data.get("model") is not None:
            if not isinstance(data["model"], Mapping):
                raise ConfigError(
                    f"{source}: model: got {type(data['model']).__name__}; expected a mapping "
                    "with engram, backbone and transformer sections"
                )
            model = ModelConfig.from_dict(dict(data["model"]), source=f"{source}: model")
        store = data.get("store")
        store = {} if store is None else store
        if not isinstance(store, Mapping):
            raise ConfigError(f"{source}: store: got {type(store).__name__}; expected a mapping")
        if "table" in store:
            raise ConfigError(
                f"{source}: store.table: each Engram layer's table comes from the checkpoint "
                "(checkpoint.path); remove it"
            )
        check_address(sections.server.address, f"{source}: server.address")
        checkpoint = sections.checkpoint
        if "scrub_bytes_per_s" in checkpoint.model_fields_set and not checkpoint.scrub_interval_s:
            warn_at_caller(
                f"{source}: checkpoint.scrub_bytes_per_s: ignored; checkpoint.scrub_interval_s is "
                "0, so no checksum pass runs while serving (verify_on_start reads unpaced); give "
                "scrub_interval_s or remove it",
                IgnoredSettingWarning,
            )
        cfg = cls(
            checkpoint=sections.checkpoint,
            server=sections.server,
            model=model,
            store=copy.deepcopy(dict(store)),
            base_dir=(base_dir or Path.cwd()).resolve(),
            source=source,
        )
        # validates the store section once, for every layer: an error names no layer of its own
        layer = model.engram.layer_ids[0] if model is not None else 0
        probe = cfg._store_config(layer, f"{source} (store section)")
        for tier in ("hot", "warm"):  # a policy typo named here, with the file, not at open
            parse_policy(
                getattr(probe.tiers, tier).policy, key=f"{source}: store.tiers.{tier}.policy"
            )
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServeConfig:
        """Load and validate a YAML file; relative paths are relative to it."""
        path = Path(expand_home(path))  # its paths are under its folder, ~ read
        data = load_yaml(path)
        return cls.from_dict(data, base_dir=config_folder(path), source=str(path))

    @property
    def checkpoint_dir(self) -> Path:
        """The converted checkpoint's directory."""
        where = f"{self.source}: checkpoint.path"
        return Path(resolved_under(self.base_dir, self.checkpoint.path, where))

    @property
    def dense_path(self) -> Path:
        """The checkpoint's ``dense.safetensors`` (its presence marks a complete checkpoint)."""
        return self.checkpoint_dir / DENSE_FILE

    def table_path(self, layer: int) -> Path:
        """Engram layer ``layer``'s table file in the checkpoint."""
        return table_file(self.checkpoint_dir, layer)

    @staticmethod
    def table_name(layer: int) -> str:
        """The ``table`` label of layer ``layer``'s store: its file's stem, ``engram_layer{L}``."""
        return f"engram_layer{layer}"

    def store_spec(self, layer: int) -> dict[str, Any]:
        """The store section for layer ``layer`` (``{layer}`` replaced, tier files absolute)."""
        spec = _replace_layer(copy.deepcopy(dict(self.store)), layer)
        for name, tier in (spec.get("tiers") or {}).items():
            if isinstance(tier, dict):
                for key in ("static_rows", "preload_rows", "profile"):
                    if isinstance(tier.get(key), str):
                        where = f"{self.source}: store.tiers.{name}.{key}"
                        tier[key] = _under(self.base_dir, tier[key], where)
        sharding = spec.get("sharding")
        if isinstance(sharding, dict) and isinstance(sharding.get("shards"), str):
            where = f"{self.source}: store.sharding.shards"
            sharding["shards"] = _under(self.base_dir, sharding["shards"], where)
        return spec

    @property
    def sharded(self) -> bool:
        """True when the store section shards every table over the ranks of a process group."""
        return bool(self.store.get("sharding"))

    def store_config(self, layer: int) -> StoreConfig:
        """The ``StoreConfig`` of layer ``layer``: the store section plus its table path."""
        return self._store_config(layer, f"{self.source} (store section, layer {layer})")

    def _store_config(self, layer: int, source: str) -> StoreConfig:
        """``store_config(layer)``, its errors named after ``source``."""
        data = self.store_spec(layer)
        data["table"] = {"path": str(self.table_path(layer))}
        return StoreConfig.from_dict(data, base_dir=self.base_dir, source=source)

    @property
    def metrics_address(self) -> str:
        """Where the separate ``/metrics`` listener binds (``""``: none)."""
        return self.store_config(0).metrics.address

    def with_overrides(self, **server: Any) -> ServeConfig:
        """A copy with some ``server`` fields replaced (``address=...``); ``metrics_address``
        replaces ``store.metrics.address``."""
        store = copy.deepcopy(dict(self.store))
        if "metrics_address" in server:
            address = server.pop("metrics_address")
            check_address(address, "--metrics-address", allow_empty=True, like=METRICS_ADDRESS)
            store["metrics"] = {**(store.get("metrics") or {}), "address": address}  # None: empty
        if "address" in server:
            check_address(server["address"], "--address")
        return ServeConfig(
            checkpoint=self.checkpoint,
            server=self.server.model_copy(update=server),
            model=self.model,
            store=store,
            base_dir=self.base_dir,
            source=self.source,
        )


def _under(base_dir: Path, text: str, where: str) -> str:
    """The path ``text`` resolved against ``base_dir``; an empty one, or one with a NUL character
    or a lone surrogate (which pathlib refuses with a bare ValueError), as it is, for the store
    section's check to name (``where``: its file and key, for an error of its own)."""
    if not text or path_text_problem(text) is not None:
        return text
    return resolved_under(base_dir, text, where)


def _replace_layer(value: Any, layer: int) -> Any:
    """``{layer}`` -> the layer id in every string of a nested config."""
    if isinstance(value, str):
        return value.replace("{layer}", str(layer))
    if isinstance(value, dict):
        return {k: _replace_layer(v, layer) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_layer(v, layer) for v in value]
    return value
