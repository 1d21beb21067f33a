"""NgramHasher speed in token positions per second, against a plain gather of the same ids.

The config is the reference default (``EngramConfig()``, as the golden ``engram_default.json``:
orders 2..3, 8 heads per order, layers 1 and 15); the ids are random tokens, 16 x 4096 of them.

Baseline: ``CompressedTokenizer.compress`` (the id check and one table gather per position), the
first step of every hash and the least any hasher must do; the ratio says what fraction of that
speed the whole hash keeps. Measured: ``hash`` (every layer) with NumPy and with torch input, and
``hash_layer`` of each layer; ``extra_info`` also has positions per second per layer, the figure
the docs quote.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tiered_store.engram import CompressedTokenizer, EngramConfig, NgramHasher

GROUP = "hasher"
CONFIG = EngramConfig()


@dataclass
class HashInput:
    """The hasher and one batch of random token ids, as NumPy and as a torch tensor."""

    hasher: NgramHasher
    ids_numpy: np.ndarray
    ids_torch: torch.Tensor

    @property
    def positions(self) -> int:
        """Token positions per batch."""
        return self.ids_numpy.size


@pytest.fixture(scope="module")
def hash_input(sizes) -> HashInput:
    """The default-config hasher and ``hasher_batch x hasher_seq`` random ids."""
    hasher = NgramHasher(CONFIG, CompressedTokenizer())
    rng = np.random.default_rng(0)
    shape = (sizes.hasher_batch, sizes.hasher_seq)
    ids = rng.integers(0, hasher.tokenizer.vocab_size, size=shape, dtype=np.int64)
    return HashInput(hasher, ids, torch.from_numpy(ids))


def test_compress_gather(benchmark, speed, hash_input: HashInput) -> None:
    speed.measure(
        benchmark,
        lambda: hash_input.hasher.tokenizer.compress(hash_input.ids_numpy),
        group=GROUP,
        per_call=hash_input.positions,
        unit="positions",
        baseline=True,
    )


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_hash_all_layers(benchmark, speed, hash_input: HashInput, backend: str) -> None:
    ids = hash_input.ids_numpy if backend == "numpy" else hash_input.ids_torch
    rate = speed.measure(
        benchmark,
        lambda: hash_input.hasher.hash(ids),
        group=GROUP,
        per_call=hash_input.positions,
        unit="positions",
    )
    if rate is not None:
        layers = len(CONFIG.layer_ids)
        benchmark.extra_info["positions_per_second_per_layer"] = rate * layers


@pytest.mark.parametrize("layer", CONFIG.layer_ids)
def test_hash_layer(benchmark, speed, hash_input: HashInput, layer: int) -> None:
    speed.measure(
        benchmark,
        lambda: hash_input.hasher.hash_layer(hash_input.ids_numpy, layer),
        group=GROUP,
        per_call=hash_input.positions,
        unit="positions",
    )
