"""The key hash every cache implementation shares (set selection, synthetic key scrambling).

SplitMix64's output function (Steele, Lea & Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014; the constants are those of Java's ``SplittableRandom`` and of
Vigna's ``splitmix64.c``). Each step is a bijection on 64-bit words, so the whole function is
a permutation of uint64: distinct keys give distinct hashes. The CUDA and numba caches must
reproduce it bit for bit; the reference value ``splitmix64(0) == 0xE220A8397B1DCDAF`` (the
first output of ``splitmix64.c`` seeded with 0) pins it down.
"""

from __future__ import annotations

import numpy as np

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
"""Added first: 2**64 / golden ratio, odd, so the state walk visits every word."""
MIX_MUL_1 = np.uint64(0xBF58476D1CE4E5B9)
"""Multiplier after the first xor-shift (by 30)."""
MIX_MUL_2 = np.uint64(0x94D049BB133111EB)
"""Multiplier after the second xor-shift (by 27); a final xor-shift by 31 follows."""

_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def splitmix64(x: np.ndarray | int) -> np.ndarray:
    """SplitMix64 hash of int64/uint64 values (int64 taken as its two's-complement bits) -> uint64.

    Arithmetic wraps modulo 2**64. Returns an array of the input's shape (0-d for a scalar).
    """
    a = np.asarray(x)
    if a.dtype.kind == "i":
        z = a.astype(np.int64).view(np.uint64)
    elif a.dtype.kind == "u":
        z = a.astype(np.uint64)
    else:
        raise TypeError(f"splitmix64 takes integer values, got dtype {a.dtype}")
    shape = z.shape
    z = z.reshape(-1)  # 1-d arrays wrap silently; numpy scalars would warn on overflow
    with np.errstate(over="ignore"):
        z = z + GOLDEN_GAMMA
        z = (z ^ (z >> _S30)) * MIX_MUL_1
        z = (z ^ (z >> _S27)) * MIX_MUL_2
        z = z ^ (z >> _S31)
    return z.reshape(shape)


def set_index(keys: np.ndarray, num_sets: int) -> np.ndarray:
    """The cache set of each int64 key: ``splitmix64(key) % num_sets``, as int64."""
    if num_sets < 1:
        raise ValueError(f"num_sets = {num_sets}: expected >= 1")
    return (splitmix64(keys) % np.uint64(num_sets)).astype(np.int64)
