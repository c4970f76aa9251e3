"""L1 admission: a missed key enters the cache only once it has been asked for often enough.

Under Zipf traffic most distinct keys are asked for once or twice in a long while; inserting
each of them evicts a row that is asked for far more often (recency and in-set counts cannot
tell the two apart on a first miss). The session therefore counts every requested key in a
count-min sketch (TinyLFU's frequency filter, Einziger et al. 2017): ``depth`` rows of
saturating 8-bit counters indexed by independent hashes of the key, the estimate being the
smallest of its counters (never below the true count, above it only on collisions). After
``sample`` recorded requests every counter is halved, so the sketch follows a popularity that
drifts. A missed key is inserted only when its estimate reaches ``min_count``.

``min_count`` 1 admits every miss (HPS's behaviour). Counting is racy across threads on
purpose: a lost increment only makes the filter slightly stricter.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..errors import ConfigError
from ..hash_kernels import mix

DEPTH = 4
SALTS = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93],
    dtype=np.uint64,
)


@njit(inline="always", cache=True)
def _slot(key, salt, mask):
    return np.int64(mix(np.uint64(key) ^ salt) & mask)


@njit(nogil=True, cache=True)
def _record(counters, keys, salts, mask):
    """Add one to each key's counters (saturating at 255)."""
    for i in range(len(keys)):
        for r in range(counters.shape[0]):
            j = _slot(keys[i], salts[r], mask)
            if counters[r, j] < 255:
                counters[r, j] += np.uint8(1)


@njit(nogil=True, cache=True)
def _estimate(counters, keys, salts, mask, out):
    for i in range(len(keys)):
        best = 255
        for r in range(counters.shape[0]):
            c = counters[r, _slot(keys[i], salts[r], mask)]
            if c < best:
                best = c
        out[i] = best


@njit(nogil=True, cache=True)
def _halve(counters):
    flat = counters.reshape(-1)
    for i in range(len(flat)):
        flat[i] >>= np.uint8(1)


def sketch_width(capacity: int) -> int:
    """Counters per sketch row for an L1 of ``capacity`` rows: about one per cached row (as
    TinyLFU), a power of two, at least 1024."""
    return 1 << max(10, (max(1, int(capacity)) - 1).bit_length())


def sketch_bytes(capacity: int) -> int:
    """Host bytes of the admission sketch of an L1 of ``capacity`` rows."""
    return DEPTH * sketch_width(capacity)


class FrequencySketch:
    """Count-min sketch of key request counts with periodic halving (see the module doc)."""

    def __init__(self, width: int, sample: int | None = None):
        width = sketch_width(width)
        self.counters = np.zeros((DEPTH, width), np.uint8)
        self.mask = np.uint64(width - 1)
        self.sample = int(sample) if sample is not None else 10 * width
        self.recorded = 0

    def record(self, keys: np.ndarray) -> None:
        """Count one request of each key (repeat a key to count it more than once)."""
        _record(self.counters, keys, SALTS, self.mask)
        self.recorded += len(keys)
        if self.recorded >= self.sample:
            _halve(self.counters)
            self.recorded //= 2

    def estimate(self, keys: np.ndarray) -> np.ndarray:
        """uint8 [n]: each key's count (an upper bound, saturating at 255)."""
        out = np.empty(len(keys), np.uint8)
        _estimate(self.counters, keys, SALTS, self.mask, out)
        return out

    def memory_bytes(self) -> int:
        return self.counters.nbytes


class Admission:
    """Which missed keys may enter a table's L1 cache of ``capacity`` rows."""

    def __init__(self, capacity: int, min_count: int):
        if not 1 <= int(min_count) <= 255:
            raise ConfigError("cache_admission_min_count", min_count, "an integer in 1..255")
        self.min_count = int(min_count)
        # TinyLFU's sizing: about one counter per cached row and a halving every 10x that
        # many requests, so a row must stay popular to stay admitted.
        width = sketch_width(capacity)
        self.sketch = FrequencySketch(width, 10 * width) if self.min_count > 1 else None

    def record(self, keys: np.ndarray) -> None:
        """Count the keys of a request (each occurrence)."""
        if self.sketch is not None:
            self.sketch.record(keys)

    def admit(self, keys: np.ndarray) -> np.ndarray:
        """bool [n]: which of these missed keys to insert."""
        if self.sketch is None:
            return np.ones(len(keys), bool)
        return self.sketch.estimate(keys) >= self.min_count

    def memory_bytes(self) -> int:
        return self.sketch.memory_bytes() if self.sketch is not None else 0
