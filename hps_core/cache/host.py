"""The L1 embedding cache in host memory (CPU mode): numpy slot arrays, numba kernels.

Semantics
    Exactly ``reference.py`` (its module docstring is the contract): the same sets, ways,
    clock, LRU/LFU stamps, insert order, fp16/bf16 rounding, input errors and ``snapshot()``
    layout; ``tests/cache/test_conformance.py`` checks it slot by slot against the reference.

Kernels (``_host_kernels.py``)
    Batches of at least ``parallel_min_keys`` keys run on numba's thread pool (``prange``),
    smaller ones serially on the calling thread. fp16/bf16 rows are stored as 16-bit patterns
    and widened to fp32 inside ``find``; ``insert``/``assign`` encode with numpy first.

Thread safety
    A cache instance is NOT safe for concurrent mutation: ``find`` mutates too (stamps, clock).
    Callers serialise all verbs on one instance (the lookup session holds a lock per table
    around find/insert). The kernels release the GIL, so different instances (tables) can
    run at the same time from different threads.
"""

from __future__ import annotations

import numba
import numpy as np

from .. import buffers
from ..errors import InvalidInputError
from . import _host_kernels as kern
from .reference import SlotArrays, check_keys, check_vectors, to_bf16_bits

PARALLEL_MIN_KEYS = 4096
"""Batches below this run serially: waking the thread pool costs more than it saves."""
_KIND = {"float32": kern.KIND_F32, "float16": kern.KIND_F16, "bfloat16": kern.KIND_BF16}


def _aligned_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeroed C-contiguous array whose data starts on a cache line (an 8-way set's keys and a
    row's start share no line with a neighbour).

    np.empty + fill rather than np.zeros: numpy asks for transparent huge pages only on its
    malloc path, not on calloc's, and 4 KiB pages cost a TLB miss on nearly every random row.
    """
    a = buffers.line_aligned(shape, dtype)
    a.fill(0)
    return a


class HostCache(SlotArrays):
    """Set-associative LRU/LFU cache of one table's rows in host memory (numba kernels)."""

    def __init__(
        self,
        capacity: int,
        dim: int,
        ways: int = 8,
        policy: str = "lru",
        dtype: str = "float32",
        seed: int = 0,
        parallel_min_keys: int = PARALLEL_MIN_KEYS,
    ):
        self._allocate(capacity, dim, ways, policy, dtype, zeros=_aligned_zeros)
        self.seed = seed  # no effect: both policies are deterministic (as in the reference)
        self.parallel_min_keys = int(parallel_min_keys)
        self._lfu = policy == "lfu"
        self._kind = _KIND[dtype]
        self._vals = self.values.view(np.uint16)  # what the kernels see

    # -- plumbing -------------------------------------------------------------------------------
    def _parts(self, n: int) -> int:
        """Threads for a batch of n keys; 1 means the serial kernel."""
        return numba.get_num_threads() if n >= self.parallel_min_keys else 1

    def _encode(self, vectors: np.ndarray) -> np.ndarray:
        """fp32 rows -> C-contiguous storage bit patterns (the reference's rounding)."""
        if self.dtype == "bfloat16":
            if len(vectors) < self.parallel_min_keys:
                return to_bf16_bits(vectors)
            bits = np.empty(vectors.shape, np.uint16)
            kern.encode_bf16(np.ascontiguousarray(vectors).view(np.uint32), bits)
            return bits
        if self.dtype == "float16":
            with np.errstate(over="ignore"):  # overflow is inf, as in the reference
                return np.ascontiguousarray(vectors.astype(np.float16).view(np.uint16))
        return np.ascontiguousarray(vectors).view(np.uint16)

    @staticmethod
    def _keys(keys: object) -> np.ndarray:
        return np.ascontiguousarray(check_keys(keys))

    def _sets(self, k: np.ndarray, parts: int) -> np.ndarray:
        fn = kern.set_indices if parts > 1 else kern.set_indices_serial
        return fn(k, self.num_sets)

    # -- verbs ----------------------------------------------------------------------------------
    def find(
        self, keys: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Look up keys -> (fp32 rows [n, dim], hit [n]); hits are touched (see reference.py)."""
        k = self._keys(keys)
        n = len(k)
        if out is None:
            target = np.empty((n, self.dim), np.float32)  # the kernel zeroes the misses
        elif not (isinstance(out, np.ndarray) and out.dtype == np.float32):
            raise InvalidInputError("out", type(out).__name__, "a float32 numpy array")
        elif out.shape != (n, self.dim):
            raise InvalidInputError("out", f"shape {out.shape}", f"({n}, {self.dim})")
        elif not out.flags.writeable:
            raise InvalidInputError("out", "a read-only array", "a writeable float32 array")
        else:  # misses keep the caller's rows, so a strided out is round-tripped through a copy
            target = out if out.flags.c_contiguous else np.ascontiguousarray(out)
        self.clock += 1
        hit = np.empty(n, np.bool_)
        if n:
            args = (k, self.keys, self.occupied, self.stamp, self._vals)
            args += (target.view(np.uint16), target.view(np.uint32), hit, self.clock, self._lfu)
            args += (self._kind, out is None)
            parts = self._parts(n)
            if parts > 1:
                kern.find(*args, parts)
            else:
                kern.find_serial(*args)
        if out is None:
            return target, hit
        if target is not out:
            out[...] = target
        return out, hit

    def find_into(self, keys: np.ndarray, out: np.ndarray, hit: np.ndarray) -> None:
        """``find`` writing the hit flags into ``hit`` too (``GPUCache.find_into``'s twin, for
        the device-resident path over NumPy)."""
        hit[...] = self.find(keys, out=out)[1]

    def insert(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or overwrite rows, evicting by the policy in full sets (see reference.py)."""
        k = self._keys(keys)
        v = check_vectors(vectors, len(k), self.dim)
        self.clock += 1
        if not len(k):
            return
        args = (k, self._encode(v), self.keys, self.occupied, self.stamp, self._vals)
        args += (self.clock, self._lfu)
        parts = self._parts(len(k))
        if parts > 1:
            kern.insert(*args, parts)
        else:
            kern.insert_serial(*args)

    def assign(self, keys: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Overwrite cached keys only (no touch, last duplicate wins); bool [n] of which were."""
        k = self._keys(keys)
        v = check_vectors(vectors, len(k), self.dim)
        hit = np.zeros(len(k), np.bool_)
        if not len(k):
            return hit
        parts = self._parts(len(k))
        args = (k, self._sets(k, parts), self._encode(v), self.keys, self.occupied, self._vals)
        if parts > 1:
            kern.assign(*args, hit, parts)
        else:
            kern.assign_serial(*args, hit)
        return hit

    def erase(self, keys: np.ndarray) -> int:
        """Remove keys; returns how many distinct keys were cached."""
        k = self._keys(keys)
        if not len(k):
            return 0
        parts = self._parts(len(k))
        args = (k, self._sets(k, parts), self.keys, self.occupied, self.stamp, self._vals)
        if parts > 1:
            return int(kern.erase(*args, parts))
        return int(kern.erase_serial(*args))

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """bool [n]: whether each key is cached (no touch, clock unchanged)."""
        k = self._keys(keys)
        hit = np.zeros(len(k), np.bool_)
        if len(k):
            fn = kern.contains if self._parts(len(k)) > 1 else kern.contains_serial
            fn(k, self.keys, self.occupied, hit)
        return hit

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """All cached rows as (keys int64 [n], fp32 vectors [n, dim]), in slot order."""
        return self.keys[self.occupied], self.decode(self.values[self.occupied])

    def __repr__(self) -> str:
        return (
            f"HostCache({self.ways}-way {self.policy}, capacity={self.capacity}, "
            f"dim={self.dim}, dtype={self.dtype})"
        )
