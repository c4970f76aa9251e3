"""The numpy oracle of the L1 embedding cache: the executable specification every cache matches.

Semantics (the host and GPU caches must reproduce them exactly):

- ``num_sets = ceil(capacity / ways)``; a key lives in set ``splitmix64(key) % num_sets``, in
  any of its ``ways`` slots. Slots carry an occupancy bit, so every int64 key is legal.
- A logical clock advances by one per ``find`` or ``insert`` call; all keys of one call share
  that tick (a parallel kernel can do the same deterministically).
- ``find``: a hit returns the stored row (converted to fp32) and touches the slot: LRU sets its
  stamp to the tick; LFU adds 1 per occurrence of the key in the batch.
- ``insert``: duplicates in the batch collapse to their LAST occurrence; the unique keys are
  then applied in order of first appearance. A present key is overwritten and touched (LRU:
  stamp = tick, LFU: +1). A new key takes the lowest free way of its set; in a full set it
  replaces the victim with the smallest stamp (ties: lowest way). A new row's stamp is the tick
  (LRU) or 1 (LFU).
- ``assign`` overwrites present keys only, without touching them; ``contains`` does not touch.
- Rows are stored in the cache's dtype: fp32, fp16 (numpy rounding), or bf16 (the upper 16
  bits of fp32 after round-to-nearest-even), so reads return the rounded value.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidInputError
from ..hashing import splitmix64
from .base import EmbeddingCache

POLICIES = ("lru", "lfu")
DTYPES = ("float32", "float16", "bfloat16")


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16) with round-to-nearest-even; NaN stays NaN."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(x)
    out = rounded.astype(np.uint16)
    out[nan] = ((b[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return out


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> fp32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def check_keys(keys: object, name: str = "keys") -> np.ndarray:
    """1-D integer keys as int64 (32-bit widened); anything else is an InvalidInputError."""
    k = np.asarray(keys)
    if k.dtype.kind not in "iu" and not (k.size == 0 and k.dtype.kind == "f"):
        raise InvalidInputError(name, f"dtype {k.dtype}", "integer keys")
    if k.ndim != 1:
        raise InvalidInputError(name, f"shape {k.shape}", "a 1-D array")
    return k.view(np.int64) if k.dtype == np.uint64 else k.astype(np.int64, copy=False)


def check_vectors(vectors: object, n: int, dim: int) -> np.ndarray:
    """Vectors as float32 [n, dim]."""
    v = np.asarray(vectors)
    if v.ndim != 2 or v.shape != (n, dim):
        raise InvalidInputError("vectors", f"shape {v.shape}", f"[{n}, {dim}]")
    return v.astype(np.float32, copy=False)


def last_occurrence(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique keys in order of first appearance, and the index of each one's last occurrence."""
    rev = keys[::-1]
    _, first_rev = np.unique(rev, return_index=True)
    last = len(keys) - 1 - first_rev
    _, first = np.unique(keys, return_index=True)
    order = np.argsort(first, kind="stable")
    return keys[first[order]], last[order]


class ReferenceCache(EmbeddingCache):
    """Set-associative LRU/LFU cache in numpy: clear, not fast (find is vectorised)."""

    def __init__(
        self,
        capacity: int,
        dim: int,
        ways: int = 8,
        policy: str = "lru",
        dtype: str = "float32",
        seed: int = 0,
    ):
        if capacity < 1:
            raise ValueError(f"capacity = {capacity}: expected >= 1")
        if dim < 1:
            raise ValueError(f"dim = {dim}: expected >= 1")
        if ways < 1:
            raise ValueError(f"ways = {ways}: expected >= 1")
        if policy not in POLICIES:
            raise ValueError(f"policy = {policy!r}: expected one of {POLICIES}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype = {dtype!r}: expected one of {DTYPES}")
        self.dim, self.ways, self.policy, self.dtype = dim, ways, policy, dtype
        self.num_sets = max(1, math.ceil(capacity / ways))
        self.capacity = self.num_sets * ways
        store = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
        self.keys = np.zeros((self.num_sets, ways), np.int64)
        self.occupied = np.zeros((self.num_sets, ways), bool)
        self.stamp = np.zeros((self.num_sets, ways), np.uint64)
        self.values = np.zeros((self.num_sets, ways, dim), store)
        self.clock = 0

    # -- storage conversions ----------------------------------------------------------------
    def _encode(self, v: np.ndarray) -> np.ndarray:
        return to_bf16_bits(v) if self.dtype == "bfloat16" else v.astype(self.values.dtype)

    def _decode(self, v: np.ndarray) -> np.ndarray:
        return from_bf16_bits(v) if self.dtype == "bfloat16" else v.astype(np.float32)

    def _locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(set, way, hit) per key; way is valid only where hit."""
        sets = (splitmix64(keys) % np.uint64(self.num_sets)).astype(np.int64)
        match = self.occupied[sets] & (self.keys[sets] == keys[:, None])
        return sets, match.argmax(axis=1), match.any(axis=1)

    # -- verbs ------------------------------------------------------------------------------
    def find(self, keys, out=None):
        k = check_keys(keys)
        self.clock += 1
        if out is None:
            out = np.zeros((len(k), self.dim), np.float32)
        sets, ways, hit = self._locate(k)
        s, w = sets[hit], ways[hit]
        out[hit] = self._decode(self.values[s, w])
        if self.policy == "lru":
            self.stamp[s, w] = self.clock
        else:
            np.add.at(self.stamp, (s, w), np.uint64(1))
        return out, hit

    def insert(self, keys, vectors):
        k = check_keys(keys)
        v = check_vectors(vectors, len(k), self.dim)
        self.clock += 1
        uniq, last = last_occurrence(k)
        rows = self._encode(v[last])
        sets = (splitmix64(uniq) % np.uint64(self.num_sets)).astype(np.int64)
        for key, s, row in zip(uniq.tolist(), sets.tolist(), rows, strict=True):
            occ = self.occupied[s]
            match = np.flatnonzero(occ & (self.keys[s] == key))
            if len(match):
                w = match[0]
                self.stamp[s, w] = (
                    self.clock if self.policy == "lru" else self.stamp[s, w] + np.uint64(1)
                )
            else:
                free = np.flatnonzero(~occ)
                w = free[0] if len(free) else int(np.argmin(self.stamp[s]))
                self.keys[s, w], self.occupied[s, w] = key, True
                self.stamp[s, w] = self.clock if self.policy == "lru" else 1
            self.values[s, w] = row

    def assign(self, keys, vectors):
        k = check_keys(keys)
        v = check_vectors(vectors, len(k), self.dim)
        sets, ways, hit = self._locate(k)
        idx = np.flatnonzero(hit)
        self.values[sets[idx], ways[idx]] = self._encode(v[idx])  # numpy: the last duplicate wins
        return hit

    def erase(self, keys):
        k = np.unique(check_keys(keys))
        sets, ways, hit = self._locate(k)
        self.occupied[sets[hit], ways[hit]] = False
        return int(hit.sum())

    def contains(self, keys):
        return self._locate(check_keys(keys))[2]

    def export(self):
        return self.keys[self.occupied].copy(), self._decode(self.values[self.occupied])

    def clear(self):
        self.occupied[:] = False
        self.stamp[:] = 0

    def size(self):
        return int(self.occupied.sum())

    def memory_bytes(self):
        return sum(a.nbytes for a in (self.keys, self.occupied, self.stamp, self.values))
