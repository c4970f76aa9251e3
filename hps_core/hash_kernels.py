"""The shared key hash as a numba function, for the host kernels of every level."""

from __future__ import annotations

import numpy as np
from numba import njit

from .hashing import GOLDEN_GAMMA, MIX_MUL_1, MIX_MUL_2


@njit(inline="always", cache=True)
def mix(key):
    """splitmix64, bit for bit ``hps_core.hashing.splitmix64``."""
    z = np.uint64(key) + GOLDEN_GAMMA
    z = (z ^ (z >> np.uint64(30))) * MIX_MUL_1
    z = (z ^ (z >> np.uint64(27))) * MIX_MUL_2
    return z ^ (z >> np.uint64(31))
