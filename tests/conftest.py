"""Shared fixtures: small real table files on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiered_store.config import StoreConfig
from tiered_store.table_format import create_table


def make_table(tmp_path, rows: int = 5000, dim: int = 16, dtype: str = "float32", seed: int = 0):
    """Create a table file from a seeded array; returns (path, the array as a torch tensor)."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((rows, dim)).astype(np.float32)
    tensor = torch.from_numpy(data).to(getattr(torch, dtype))
    path = tmp_path / f"table_{rows}x{dim}_{dtype}.npy"
    create_table(path, tensor, progress=False)
    return path, tensor


def store_config(path, **tiers) -> StoreConfig:
    """A StoreConfig for ``path`` with per-tier overrides, e.g. hot={"capacity": 10}."""
    return StoreConfig.from_dict({"table": {"path": str(path)}, "tiers": tiers})


@pytest.fixture
def table(tmp_path):
    return make_table(tmp_path)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
