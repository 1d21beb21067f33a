"""Shared by the serving tests: a tiny model config, a checkpoint made once, serve configs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tiered_store.errors import TierIOError
from tiered_store.serve import ServeConfig, create_checkpoint

# Small enough to create in about a second: 2 Engram layers of 5,000-6,000 rows x 16.
TINY_MODEL: dict[str, Any] = {
    "engram": {
        "engram_vocab_size": [2003, 3001],
        "n_embed_per_ngram": 32,
        "n_head_per_ngram": 2,
        "layer_ids": [1, 3],
    },
    "backbone": {"hidden_size": 16, "hc_mult": 2, "num_layers": 4},
    "transformer": {"num_attention_heads": 2},
}
CONFIG: dict[str, Any] = {
    "checkpoint": {"path": "checkpoint"},
    "model": TINY_MODEL,
    "store": {
        "tiers": {"hot": {"capacity": "3%"}, "warm": {"capacity": "15%"}, "cold": {"threads": 2}},
    },
    "server": {
        "max_batch": 8,
        "max_seq_len": 256,
        "max_tokens": 1024,
        "max_text_chars": 4096,
        "max_body_bytes": 65536,
        "request_timeout_s": 2.0,
        "torch_threads": 1,
    },
}
TABLES = ["engram_layer1", "engram_layer3"]


def write_config(directory: Path, **sections: Any) -> Path:
    """CONFIG with ``sections`` merged in (section by section), as ``directory/serve.yaml``."""
    data = copy.deepcopy(CONFIG)
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def make_checkpoint(directory: Path, **sections: Any) -> Path:
    """A config in ``directory`` and its checkpoint (created now); returns the config path."""
    path = write_config(directory, **sections)
    create_checkpoint(ServeConfig.from_yaml(path))
    return path


def break_lookups(store: Any, table: str = "table") -> None:
    """Make ``store``'s lookups (this store's only) raise what ColdTable raises when the disk
    fails, naming the table as ``table``."""

    def broken(*args: Any, **kwargs: Any) -> None:
        raise TierIOError(f"{table}: read of 4096 bytes at 8192 failed twice: EIO")

    store.lookup = broken
