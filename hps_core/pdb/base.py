"""The persistent database (L3) interface the lookup session talks to."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class PersistentDB(ABC):
    """The full embedding tables on local disk; never evicts. Same verbs as the VDB."""

    @abstractmethod
    def create_table(self, table: str, dim: int) -> None:
        """Create an empty table (no-op if it exists)."""

    @abstractmethod
    def drop_table(self, table: str) -> None:
        """Remove a table and its rows."""

    @abstractmethod
    def tables(self) -> list[str]:
        """Names of the tables present."""

    @abstractmethod
    def dim(self, table: str) -> int:
        """Vector width of a table."""

    @abstractmethod
    def size(self, table: str) -> int:
        """Number of rows (estimate allowed for very large tables)."""

    @abstractmethod
    def fetch(
        self, table: str, keys: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Look up keys: returns (vectors float32 [n, dim], found bool [n])."""

    @abstractmethod
    def contains(self, table: str, keys: np.ndarray) -> np.ndarray:
        """bool [n]: whether each key is stored."""

    @abstractmethod
    def upsert(self, table: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or overwrite rows in write batches. Later duplicates win."""

    @abstractmethod
    def evict(self, table: str, keys: np.ndarray) -> int:
        """Delete the given keys; returns how many were present."""

    @abstractmethod
    def dump(self, table: str) -> tuple[np.ndarray, np.ndarray]:
        """All rows as (keys int64 [n], vectors float32 [n, dim])."""

    def close(self) -> None:
        """Flush and release resources."""
