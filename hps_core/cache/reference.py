"""The numpy oracle of the L1 embedding cache: the executable specification every cache matches.

Layout
    ``num_sets = max(1, ceil(capacity / ways))`` sets of ``ways`` slots each, so the real slot
    count (``self.capacity``) is ``num_sets * ways`` >= the requested capacity. Key ``k`` lives
    in set ``splitmix64(k) % num_sets`` (``hps_core.hashing``), in any way of it, at most once.
    A slot holds a key (int64), an occupancy bit (no sentinel: every int64 is a legal key),
    a row in the storage dtype and a ``stamp`` (uint64): LRU the clock tick of its last touch,
    LFU its access count.

Clock
    A logical clock starts at 0 and advances by 1 at the start of every ``find`` and ``insert``
    call, empty batches included; all keys of one call share that tick. ``assign``, ``erase``,
    ``contains``, ``export``, ``clear`` leave it alone (``clear`` does not reset it).

Touch
    LRU: ``stamp = tick``. LFU: ``stamp += 1``.

find(keys)
    A hit returns the stored row converted to fp32 and touches the slot once per occurrence of
    the key in the batch (LFU: a key found 3 times in a batch gains 3). A miss returns zeros, or
    leaves that row of ``out`` as it was.

insert(keys, vectors)
    1. Duplicates collapse to their LAST occurrence (its vector wins); the surviving entries keep
       their batch order.
    2. Keys already cached are overwritten and touched once (all of them, before step 3).
    3. The other keys are placed one after another in that batch order: into the lowest free way
       of their set, else over the victim, the way with the smallest stamp (ties: the lowest way).
       The new slot's stamp is the tick (LRU) or 1 (LFU). A key placed earlier in this call, or
       updated in step 2, can be the victim of a later one.
    Sets never interact, so a parallel kernel may run sets concurrently, keys of a set in order.

assign(keys, vectors)
    Overwrites cached keys only (last duplicate wins), touches nothing, returns which were cached.

Storage
    fp32; fp16 by numpy's cast (round to nearest even); bf16 as the upper 16 bits of the fp32
    pattern after round-to-nearest-even (NaN stays NaN). Reads return the rounded value.

``snapshot()`` exposes the full slot state (free slots read as key 0, stamp 0, zero row) so the
host and GPU caches can be compared with this one slot by slot.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError, InvalidInputError
from ..hashing import set_index
from .base import EmbeddingCache

POLICIES = ("lru", "lfu")
DTYPES = ("float32", "float16", "bfloat16")
_INT64_MAX = np.iinfo(np.int64).max


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16) with round-to-nearest-even; NaN stays a (quiet) NaN."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (b + np.uint64(0x7FFF) + ((b >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    nan = (b & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000)
    # rounding could carry a NaN's payload into the exponent (-> inf); keep sign, set quiet bit
    quiet = (b >> np.uint64(16)) | np.uint64(0x0040)
    return np.where(nan, quiet, rounded).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> fp32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def check_keys(keys: object, field: str = "keys") -> np.ndarray:
    """1-D integer keys as int64 (narrower ints widened); anything else is an InvalidInputError."""
    k = np.asarray(keys)
    if k.size == 0 and k.dtype == np.float64 and not isinstance(keys, np.ndarray):
        k = k.astype(np.int64)  # [] from Python has no integer dtype to give
    if k.dtype.kind not in "iu":
        raise InvalidInputError(
            field, f"dtype {k.dtype}", "an integer array (int64, int32, uint32)"
        )
    if k.ndim != 1:
        raise InvalidInputError(field, f"shape {k.shape}", "a 1-D array")
    if k.dtype == np.uint64 and k.size and k.max() > _INT64_MAX:
        raise InvalidInputError(field, f"uint64 key {k.max()}", "keys that fit in int64")
    return k.astype(np.int64, copy=False)


def check_vectors(vectors: object, n: int, dim: int, field: str = "vectors") -> np.ndarray:
    """Floating-point vectors [n, dim] as float32; anything else is an InvalidInputError."""
    v = np.asarray(vectors)
    if v.dtype.kind != "f" and not (v.size == 0 and not isinstance(vectors, np.ndarray)):
        raise InvalidInputError(field, f"dtype {v.dtype}", "a floating-point array")
    if v.size == 0 and n == 0 and v.ndim != 2:
        v = v.reshape(0, dim)
    if v.shape != (n, dim):
        raise InvalidInputError(field, f"shape {v.shape}", f"shape ({n}, {dim}): one row per key")
    return v.astype(np.float32, copy=False)


def last_occurrences(keys: np.ndarray) -> np.ndarray:
    """Positions of each distinct key's last occurrence, in increasing order."""
    _, first_in_reversed = np.unique(keys[::-1], return_index=True)
    return np.sort(len(keys) - 1 - first_in_reversed)


class SlotArrays(EmbeddingCache):
    """The slot layout of the host-memory caches: keys, occupied, stamp [num_sets, ways] and
    stored rows [num_sets, ways, dim], plus the clock. ReferenceCache defines the semantics on
    it; HostCache runs numba kernels over the same arrays."""

    def _allocate(
        self, capacity: int, dim: int, ways: int, policy: str, dtype: str, zeros=np.zeros
    ) -> None:
        """Validate the options and allocate zeroed slot arrays with ``zeros(shape, dtype)``."""
        for field, value in (("capacity", capacity), ("dim", dim), ("ways", ways)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(field, value, "an integer >= 1")
        if policy not in POLICIES:
            raise ConfigError("policy", policy, f"one of {POLICIES}")
        if dtype not in DTYPES:
            raise ConfigError("dtype", dtype, f"one of {DTYPES}")
        self.dim, self.ways, self.policy, self.dtype = int(dim), int(ways), policy, dtype
        self.num_sets = max(1, math.ceil(capacity / ways))
        self.capacity = self.num_sets * self.ways
        storage = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
        shape = (self.num_sets, self.ways)
        self.keys = zeros(shape, np.int64)
        self.occupied = zeros(shape, np.bool_)
        self.stamp = zeros(shape, np.uint64)
        self.values = zeros((*shape, self.dim), storage)
        self.clock = 0

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored rows -> fp32 (a copy)."""
        if self.dtype == "bfloat16":
            return from_bf16_bits(stored)
        return stored.astype(np.float32)

    def clear(self) -> None:
        """Empty every slot (the clock keeps running)."""
        for a in (self.keys, self.occupied, self.stamp, self.values):
            a.fill(0)

    def size(self) -> int:
        """Number of cached rows."""
        return int(np.count_nonzero(self.occupied))

    def memory_bytes(self) -> int:
        """Bytes of the slot arrays."""
        return sum(a.nbytes for a in (self.keys, self.occupied, self.stamp, self.values))

    def snapshot(self) -> dict[str, np.ndarray | int]:
        """Copies of the slot state: keys, occupied, stamp [sets, ways], fp32 values, clock."""
        return {
            "keys": self.keys.copy(),
            "occupied": self.occupied.copy(),
            "stamp": self.stamp.copy(),
            "values": self.decode(self.values),
            "clock": self.clock,
        }


class ReferenceCache(SlotArrays):
    """Set-associative LRU/LFU cache in plain numpy: obviously correct first, `find` vectorised."""

    def __init__(
        self,
        capacity: int,
        dim: int,
        ways: int = 8,
        policy: str = "lru",
        dtype: str = "float32",
        seed: int = 0,
    ):
        self._allocate(capacity, dim, ways, policy, dtype)
        self.seed = seed  # no effect: both policies are deterministic; kept for future ones

    # -- storage and lookup -------------------------------------------------------------------
    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """fp32 rows -> the storage dtype."""
        if self.dtype == "bfloat16":
            return to_bf16_bits(vectors)
        with np.errstate(over="ignore"):  # fp16 overflow is inf, as on the device
            return vectors.astype(self.values.dtype)

    def _locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(set, way, hit) per key; way is meaningful only where hit."""
        sets = set_index(keys, self.num_sets)
        match = self.occupied[sets] & (self.keys[sets] == keys[:, None])
        return sets, match.argmax(axis=1), match.any(axis=1)

    def _touch(self, sets: np.ndarray, ways: np.ndarray) -> None:
        """Touch each (set, way) once per occurrence."""
        if self.policy == "lru":
            self.stamp[sets, ways] = self.clock
        else:
            np.add.at(self.stamp, (sets, ways), np.uint64(1))

    # -- verbs ----------------------------------------------------------------------------------
    def find(
        self, keys: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Look up keys -> (fp32 rows [n, dim], hit [n]); hits are touched (see module doc)."""
        k = check_keys(keys)
        if out is None:
            out = np.zeros((len(k), self.dim), np.float32)
        elif not (isinstance(out, np.ndarray) and out.dtype == np.float32):
            raise InvalidInputError("out", type(out).__name__, "a float32 numpy array")
        elif out.shape != (len(k), self.dim):
            raise InvalidInputError("out", f"shape {out.shape}", f"({len(k)}, {self.dim})")
        self.clock += 1
        sets, ways, hit = self._locate(k)
        s, w = sets[hit], ways[hit]
        out[hit] = self.decode(self.values[s, w])
        self._touch(s, w)
        return out, hit

    def insert(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or overwrite rows, evicting by the policy in full sets (see module doc)."""
        k = check_keys(keys)
        v = check_vectors(vectors, len(k), self.dim)
        self.clock += 1
        pos = last_occurrences(k)
        k, rows = k[pos], self.encode(v[pos])
        sets, ways, hit = self._locate(k)
        # step 2: cached keys, all at once (keys are distinct, so each slot is touched once)
        self.values[sets[hit], ways[hit]] = rows[hit]
        self._touch(sets[hit], ways[hit])
        # step 3: new keys, one after another in batch order
        for i in np.flatnonzero(~hit):
            s = sets[i]
            free = np.flatnonzero(~self.occupied[s])
            w = free[0] if len(free) else np.argmin(self.stamp[s])  # argmin: first (lowest) way
            self.keys[s, w] = k[i]
            self.occupied[s, w] = True
            self.stamp[s, w] = self.clock if self.policy == "lru" else 1
            self.values[s, w] = rows[i]

    def assign(self, keys: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Overwrite cached keys only (no touch, last duplicate wins); bool [n] of which were."""
        k = check_keys(keys)
        v = check_vectors(vectors, len(k), self.dim)
        cached = self._locate(k)[2]
        pos = last_occurrences(k)
        sets, ways, hit = self._locate(k[pos])
        self.values[sets[hit], ways[hit]] = self.encode(v[pos][hit])
        return cached

    def erase(self, keys: np.ndarray) -> int:
        """Remove keys; returns how many distinct keys were cached."""
        sets, ways, hit = self._locate(np.unique(check_keys(keys)))
        s, w = sets[hit], ways[hit]
        self.occupied[s, w] = False
        self.keys[s, w] = 0
        self.stamp[s, w] = 0
        self.values[s, w] = 0
        return int(hit.sum())

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """bool [n]: whether each key is cached (no touch, clock unchanged)."""
        return self._locate(check_keys(keys))[2]

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """All cached rows as (keys int64 [n], fp32 vectors [n, dim]), in slot order."""
        return self.keys[self.occupied].copy(), self.decode(self.values[self.occupied])
