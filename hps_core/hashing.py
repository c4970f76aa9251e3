"""The key hash every level shares: splitmix64's finaliser (a bijection on 64-bit values)."""

from __future__ import annotations

import numpy as np

C1 = np.uint64(0xBF58476D1CE4E5B9)
C2 = np.uint64(0x94D049BB133111EB)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(keys: np.ndarray) -> np.ndarray:
    """uint64 hash of int64 keys (vectorised); every key value, negative included, is valid."""
    z = np.asarray(keys, dtype=np.int64).view(np.uint64) + GOLDEN
    z = (z ^ (z >> np.uint64(30))) * C1
    z = (z ^ (z >> np.uint64(27))) * C2
    return z ^ (z >> np.uint64(31))
