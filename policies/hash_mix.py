"""SplitMix64 finaliser: the one 64-bit hash mix the project uses (sketches, sampling, n-gram keys)."""

import numpy as np

MIX_GOLDEN = 0x9E3779B97F4A7C15
MIX_M1 = 0xBF58476D1CE4E5B9
MIX_M2 = 0x94D049BB133111EB


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser on uint64 values (wrapping arithmetic); numba-compilable."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(MIX_M1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(MIX_M2)
    return x ^ (x >> np.uint64(31))
