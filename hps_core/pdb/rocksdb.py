"""RocksDB persistent DB through rocksdict: one column family per table, batched reads and writes.

Keys are stored as 8-byte little-endian int64, values as raw float32 rows. A metadata column
family (``hps_meta``) records each table's dim and which sparse files were loaded, so a DB
reopened (read-only or as a secondary) knows its tables.
"""

from __future__ import annotations

import json
import logging
import os
import threading

import numpy as np
from rocksdict import AccessType, Options, Rdict, WriteBatch

from ..errors import HPSError, StorageError
from .base import PersistentDB

log = logging.getLogger(__name__)

META_CF = "hps_meta"


def _key_bytes(keys: np.ndarray) -> list[bytes]:
    b = np.ascontiguousarray(keys, dtype="<i8").tobytes()
    return [b[i : i + 8] for i in range(0, len(b), 8)]


class RocksDBPDB(PersistentDB):
    """The full tables on local disk; never evicts on its own."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        num_threads: int = 16,
        read_only: bool = False,
        max_batch_size: int = 65536,
        secondary_path: str | None = None,
    ):
        self.path = str(path)
        self.read_only = read_only or secondary_path is not None
        self.max_batch_size = max_batch_size
        self._lock = threading.Lock()
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.increase_parallelism(max(1, num_threads))
        names = (
            Rdict.list_cf(self.path, Options(raw_mode=True))
            if os.path.exists(self.path)
            else ["default"]
        )
        families = {n: Options(raw_mode=True) for n in names if n != "default"}
        if secondary_path is not None:
            access = AccessType.secondary(str(secondary_path))
        elif read_only:
            access = AccessType.read_only()
        else:
            access = AccessType.read_write()
        try:
            self._db = Rdict(self.path, opts, column_families=families, access_type=access)
        except Exception as e:  # rocksdict raises plain Exception
            raise StorageError(f"RocksDB at {self.path}: cannot open ({e})") from None
        self._cfs = {n: self._db.get_column_family(n) for n in families}
        self._handles = {n: self._db.get_column_family_handle(n) for n in families}
        self._dims: dict[str, int] = {}
        if META_CF not in self._cfs and not self.read_only:
            self._create_cf(META_CF)
        if META_CF in self._cfs:
            raw = self._cfs[META_CF].get(b"dims")
            self._dims = json.loads(raw) if raw else {}

    # -- helpers ------------------------------------------------------------------------------
    def _create_cf(self, name: str) -> None:
        self._cfs[name] = self._db.create_column_family(name, Options(raw_mode=True))
        self._handles[name] = self._db.get_column_family_handle(name)

    def _writable(self, op: str) -> None:
        if self.read_only:
            raise StorageError(f"RocksDB at {self.path} is opened read-only: cannot {op}")

    def _cf(self, table: str):
        try:
            return self._cfs[table]
        except KeyError:
            raise HPSError(f"RocksDB at {self.path} has no table '{table}'") from None

    # -- tables -------------------------------------------------------------------------------
    def create_table(self, table: str, dim: int) -> None:
        if table in self._cfs and self._dims.get(table) == dim:
            return
        self._writable("create a table")
        if table in self._cfs and table in self._dims:
            raise StorageError(
                f"RocksDB table '{table}' exists with dim {self._dims[table]}, not {dim}"
            )
        with self._lock:
            if table not in self._cfs:
                self._create_cf(table)
            self._dims[table] = int(dim)
            self._cfs[META_CF].put(b"dims", json.dumps(self._dims).encode())

    def drop_table(self, table: str) -> None:
        self._writable("drop a table")
        self._cf(table)
        with self._lock:
            self._db.drop_column_family(table)
            del self._cfs[table], self._handles[table]
            self._dims.pop(table, None)
            self._cfs[META_CF].put(b"dims", json.dumps(self._dims).encode())

    def tables(self) -> list[str]:
        return sorted(t for t in self._cfs if t != META_CF and t in self._dims)

    def dim(self, table: str) -> int:
        self._cf(table)
        return self._dims[table]

    def size(self, table: str) -> int:
        """Exact row count for tables up to 10M rows (iterates); RocksDB's estimate beyond."""
        cf = self._cf(table)
        est = cf.property_int_value("rocksdb.estimate-num-keys") or 0
        if est > 10_000_000:
            return int(est)
        return sum(1 for _ in cf.keys())

    # -- rows ---------------------------------------------------------------------------------
    def fetch(self, table, keys, out=None):
        cf, dim = self._cf(table), self._dims[table]
        keys = np.asarray(keys, dtype=np.int64)
        n = len(keys)
        if out is None:
            out = np.zeros((n, dim), np.float32)
        found = np.zeros(n, bool)
        row_bytes = 4 * dim
        for s in range(0, n, self.max_batch_size):
            vals = cf.get(_key_bytes(keys[s : s + self.max_batch_size]))
            hit = np.fromiter((v is not None for v in vals), bool, len(vals))
            if not hit.any():
                continue
            got = [v for v in vals if v is not None]
            blob = b"".join(got)
            if len(blob) != row_bytes * len(got):
                bad = next(i for i, v in enumerate(vals) if v is not None and len(v) != row_bytes)
                raise StorageError(
                    f"RocksDB table '{table}': key {int(keys[s + bad])} holds {len(vals[bad])} bytes, "
                    f"expected {row_bytes} (dim {dim} float32)"
                )
            idx = s + np.flatnonzero(hit)
            out[idx] = np.frombuffer(blob, dtype="<f4").reshape(len(got), dim)
            found[idx] = True
        return out, found

    def contains(self, table, keys):
        cf = self._cf(table)
        keys = np.asarray(keys, dtype=np.int64)
        res = np.zeros(len(keys), bool)
        for s in range(0, len(keys), self.max_batch_size):
            vals = cf.get(_key_bytes(keys[s : s + self.max_batch_size]))
            res[s : s + len(vals)] = [v is not None for v in vals]
        return res

    def upsert(self, table, keys, vectors):
        self._writable("write")
        self._cf(table)
        dim, handle = self._dims[table], self._handles[table]
        keys = np.asarray(keys, dtype=np.int64)
        vecs = np.ascontiguousarray(vectors, dtype="<f4")
        if vecs.shape != (len(keys), dim):
            from ..errors import InvalidInputError

            raise InvalidInputError("vectors", f"shape {vecs.shape}", f"[{len(keys)}, {dim}]")
        rb = 4 * dim
        for s in range(0, len(keys), self.max_batch_size):
            kb = _key_bytes(keys[s : s + self.max_batch_size])
            vb = vecs[s : s + self.max_batch_size].tobytes()
            wb = WriteBatch(raw_mode=True)
            for i, k in enumerate(kb):  # puts apply in order: a later duplicate wins
                wb.put(k, vb[i * rb : (i + 1) * rb], handle)
            self._db.write(wb)

    def evict(self, table, keys):
        self._writable("delete")
        present = self.contains(table, keys)
        handle = self._handles[table]
        wb = WriteBatch(raw_mode=True)
        for k in _key_bytes(np.unique(np.asarray(keys, dtype=np.int64)[present])):
            wb.delete(k, handle)
        self._db.write(wb)
        return int(len(np.unique(np.asarray(keys, dtype=np.int64)[present])))

    def dump(self, table):
        cf, dim = self._cf(table), self._dims[table]
        ks, vs = [], []
        for k, v in cf.items():
            ks.append(k)
            vs.append(v)
        keys = np.frombuffer(b"".join(ks), dtype="<i8").astype(np.int64)
        vecs = np.frombuffer(b"".join(vs), dtype="<f4").reshape(len(ks), dim).copy()
        return keys, vecs

    # -- metadata and lifecycle -----------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        """A string stored beside the tables (e.g. which sparse files were loaded)."""
        if META_CF not in self._cfs:
            return None
        v = self._cfs[META_CF].get(b"meta:" + key.encode())
        return v.decode() if v is not None else None

    def set_meta(self, key: str, value: str) -> None:
        """Store a string beside the tables."""
        self._writable("write metadata")
        self._cfs[META_CF].put(b"meta:" + key.encode(), value.encode())

    def catch_up(self) -> None:
        """Secondary instances: replay what the primary has written since."""
        self._db.try_catch_up_with_primary()

    def close(self) -> None:
        if self._db is not None:
            try:
                if not self.read_only:
                    self._db.flush()
            finally:
                self._cfs.clear()
                self._handles.clear()
                self._db.close()
                self._db = None
