"""Store configuration: frozen pydantic models, every default in one place, YAML parsed here only.

Example ``tiers.yaml``::

    table:
      path: table.npy            # relative to this file
    tiers:
      hot:  {capacity: 5%, device: cpu, policy: lru}
      warm: {capacity: 256MiB, policy: lru}
      cold: {io: direct, threads: 8}
    prefetch: {depth: 2}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt
from pydantic import ValidationError as _PydanticValidationError

from .capacity import check_capacity_spec
from .errors import ConfigError

# Every default, with its unit.
DEFAULTS: dict[str, Any] = {
    "hot.capacity": 0,  # rows (or bytes like "1GiB", or "5%")
    "hot.device": "cpu",  # compute device: "cpu", "cuda", "cuda:N"
    "hot.policy": "lru",
    "warm.capacity": 0,  # rows
    "warm.policy": "lru",
    "warm.pin_memory": "auto",  # pinned host RAM when the compute device is CUDA
    "evict_headroom": 0.0,  # fraction of capacity freed each time eviction runs (0 = exact)
    "recency_window": 65_536,  # lookups a zipf-tuned recency segment covers (4096 tokens x 16 heads)
    "cold.io": "pread",  # "mmap" (page cache) | "pread" (threads) | "direct" (threads, O_DIRECT)
    "cold.threads": 8,  # parallel readers
    "prefetch.depth": 2,  # prefetches in flight before prefetch() blocks
    "metrics.address": "127.0.0.1:9400",  # host:port for /metrics
}

Capacity = Annotated[StrictInt | str, AfterValidator(check_capacity_spec)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_device(value: str) -> str:
    if value == "cpu" or value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError(f"got {value!r}; expected 'cpu', 'cuda' or 'cuda:N'")


class TableConfig(_Model):
    """Where the cold table lives; ``dim``/``dtype``, when given, are checked against its manifest."""

    path: str
    dim: StrictInt | None = Field(default=None, gt=0)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None


class CacheTierConfig(_Model):
    """One cache tier: how many rows it holds and which policy decides what stays."""

    capacity: Capacity = 0
    policy: str = "lru"
    static_rows: str | None = None  # .npy of row ids (hottest first) pinned by a 'static' policy
    preload_rows: str | None = None  # .npy of row ids loaded at open (warm start, not pinned)
    profile: str | None = None  # frequency profile (.npz from `tiered-store analyze`), zipf-tuned
    recency_window: StrictInt = Field(default=DEFAULTS["recency_window"], gt=0)  # lookups
    evict_headroom: float = Field(default=DEFAULTS["evict_headroom"], ge=0.0, le=0.5)


class HotTierConfig(CacheTierConfig):
    """The hot tier lives on the compute device."""

    device: Annotated[str, AfterValidator(_check_device)] = DEFAULTS["hot.device"]


class WarmTierConfig(CacheTierConfig):
    """The warm tier lives in host RAM, pinned when the compute device is CUDA."""

    pin_memory: StrictBool | Literal["auto"] = DEFAULTS["warm.pin_memory"]


class ColdTierConfig(_Model):
    """How rows are read from the table file."""

    io: Literal["mmap", "pread", "direct"] = DEFAULTS["cold.io"]
    threads: StrictInt = Field(default=DEFAULTS["cold.threads"], ge=1, le=256)


class TiersConfig(_Model):
    hot: HotTierConfig = HotTierConfig()
    warm: WarmTierConfig = WarmTierConfig()
    cold: ColdTierConfig = ColdTierConfig()


class PrefetchConfig(_Model):
    depth: StrictInt = Field(default=DEFAULTS["prefetch.depth"], ge=1, le=64)
    # Never evict rows that queued prefetches will use. Off by default: decisions then depend on
    # the queue at run time, so a recorded trace no longer replays to exactly equal counters.
    lookahead: StrictBool = False


class CostModelConfig(_Model):
    """Bandwidths and latencies replay uses to model fetch and stall time (defaults: an H200-class
    GPU on PCIe 5 with a datacentre NVMe)."""

    hbm_gbps: float = Field(default=4800.0, gt=0)  # GB/s, hot-tier gathers on the device
    pcie_gbps: float = Field(default=50.0, gt=0)  # GB/s, host -> device copies
    dram_gbps: float = Field(default=100.0, gt=0)  # GB/s, warm-tier gathers in host RAM
    nvme_read_iops: float = Field(default=1_000_000.0, gt=0)  # random 4 KiB reads per second
    nvme_latency_us: float = Field(default=80.0, ge=0)  # one random read's latency
    compute_seconds_per_batch: float = Field(default=0.0, ge=0)  # work prefetch can hide behind


class MetricsConfig(_Model):
    address: str = DEFAULTS["metrics.address"]


class StoreConfig(_Model):
    """The whole store configuration.

    Examples
    --------
    >>> cfg = StoreConfig.model_validate({"table": {"path": "t.npy"}, "tiers": {"hot": {"capacity": "5%"}}})
    >>> cfg.tiers.hot.capacity
    '5%'
    """

    table: TableConfig
    tiers: TiersConfig = TiersConfig()
    prefetch: PrefetchConfig = PrefetchConfig()
    metrics: MetricsConfig = MetricsConfig()
    cost_model: CostModelConfig = CostModelConfig()

    @classmethod
    def from_dict(
        cls, data: Any, *, base_dir: Path | None = None, source: str = "config"
    ) -> StoreConfig:
        """Validate a plain dict; relative paths are resolved against ``base_dir``."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: got {type(data).__name__}; expected a mapping at the top")
        try:
            cfg = cls.model_validate(data)
        except _PydanticValidationError as exc:
            raise ConfigError(_format_validation_error(exc, source)) from None
        return cfg._resolve_paths(base_dir) if base_dir is not None else cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> StoreConfig:
        """Load and validate a YAML file; errors name the file and the key path."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot read ({exc.strerror})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
        return cls.from_dict(data, base_dir=path.parent, source=str(path))

    def _resolve_paths(self, base_dir: Path) -> StoreConfig:
        def resolve(p: str | None) -> str | None:
            return None if p is None else str((base_dir / p).resolve())

        hot, warm = self.tiers.hot, self.tiers.warm
        tiers = self.tiers.model_copy(
            update={
                name: tier.model_copy(
                    update={
                        key: resolve(getattr(tier, key))
                        for key in ("static_rows", "preload_rows", "profile")
                    }
                )
                for name, tier in (("hot", hot), ("warm", warm))
            }
        )
        table = self.table.model_copy(update={"path": resolve(self.table.path)})
        return self.model_copy(update={"table": table, "tiers": tiers})


def _format_validation_error(exc: _PydanticValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        key = ".".join(
            str(p) for p in err["loc"] if not str(p).startswith(("function-", "constrained"))
        )
        key = key.replace(".str", "").replace(".int", "")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; expected one of the documented keys (see examples/*.yaml)"
        value = err.get("input")
        shown = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {value!r})"
        if msg.startswith("got "):
            shown = ""
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(dict.fromkeys(lines))
