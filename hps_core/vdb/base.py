"""The volatile database (L2) interface the lookup session talks to."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class VolatileDB(ABC):
    """A bounded key -> vector store in host memory (or a shared server), one namespace per table.

    Tables are addressed by name (HPS naming: ``hps_et.<model>.<table>``). Keys are int64;
    every value is a legal key. Vectors go in and come out as float32 ``[n, dim]``; a table
    may store them as fp16 internally.
    """

    @abstractmethod
    def create_table(
        self, table: str, dim: int, dtype: str = "float32", capacity_hint: int = 0
    ) -> None:
        """Create an empty table (no-op if it exists with the same dim and dtype)."""

    @abstractmethod
    def drop_table(self, table: str) -> None:
        """Remove a table and free its memory."""

    @abstractmethod
    def tables(self) -> list[str]:
        """Names of the tables present."""

    @abstractmethod
    def dim(self, table: str) -> int:
        """Vector width of a table."""

    @abstractmethod
    def size(self, table: str) -> int:
        """Number of rows stored in a table."""

    @abstractmethod
    def fetch(
        self, table: str, keys: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Look up keys: returns (vectors float32 [n, dim], found bool [n]); missing rows are left untouched in out (zeros if out is None)."""

    @abstractmethod
    def contains(self, table: str, keys: np.ndarray) -> np.ndarray:
        """bool [n]: whether each key is stored."""

    @abstractmethod
    def upsert(self, table: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or overwrite rows; may trigger overflow eviction. Later duplicates win."""

    @abstractmethod
    def insert_missing(
        self, table: str, keys: np.ndarray, vectors: np.ndarray, source: object = None
    ) -> int:
        """Insert the rows of keys the table does not hold, leaving held rows as they are, in
        one step no other writer of the table interleaves with; returns the rows inserted.
        ``source(keys) -> (vectors, found)``, if given, is where the rows were read (the PDB):
        a row it no longer holds as given is not inserted. This is how rows read from the PDB
        are promoted: an online update writes the PDB, then the VDB, and its row is newer than
        the one the lookup read."""

    @abstractmethod
    def evict(self, table: str, keys: np.ndarray) -> int:
        """Remove the given keys; returns how many were present."""

    @abstractmethod
    def dump(self, table: str) -> tuple[np.ndarray, np.ndarray]:
        """All rows as (keys int64 [n], vectors float32 [n, dim])."""

    def load(self, table: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Bulk insert (same as upsert; implementations may specialise)."""
        self.upsert(table, keys, vectors)

    @abstractmethod
    def memory_bytes(self, table: str | None = None) -> int:
        """Bytes of host memory held (for one table, or all)."""

    def load_mark(self, table: str) -> str | None:
        """What a store that outlives this process (Redis) was last loaded from in full, as
        ``set_load_mark`` recorded it; None here: an in-process table starts empty."""
        return None

    def set_load_mark(self, table: str, mark: str | None) -> None:
        """Record (or with None clear) what ``table`` was loaded from; a no-op here."""

    def close(self) -> None:
        """Release resources."""
