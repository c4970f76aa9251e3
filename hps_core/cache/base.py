"""The L1 embedding cache interface (GPU, host and reference implementations share it)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class EmbeddingCache(ABC):
    """A fixed-capacity set-associative cache of one table's hottest rows.

    Keys are int64 and every value is legal (slots carry an occupancy bit, so there is no
    sentinel key). Verbs follow HierarchicalKV: find / insert / assign / erase / contains /
    export / clear.
    """

    dim: int
    capacity: int

    @abstractmethod
    def find(
        self, keys: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Look up keys: returns (vectors float32 [n, dim], hit bool [n]); a hit refreshes the row's recency/frequency."""

    @abstractmethod
    def insert(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or overwrite rows, evicting within the key's set by the policy when full."""

    @abstractmethod
    def assign(self, keys: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Overwrite rows only where the key is cached; returns bool [n] of which were."""

    @abstractmethod
    def erase(self, keys: np.ndarray) -> int:
        """Remove keys; returns how many were cached."""

    @abstractmethod
    def contains(self, keys: np.ndarray) -> np.ndarray:
        """bool [n]: whether each key is cached (does not touch recency)."""

    @abstractmethod
    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """All cached rows as (keys int64 [n], vectors float32 [n, dim])."""

    @abstractmethod
    def clear(self) -> None:
        """Empty the cache."""

    @abstractmethod
    def size(self) -> int:
        """Number of cached rows."""

    def memory_bytes(self) -> int:
        """Bytes held by the cache's arrays."""
        return 0
