"""The in-process volatile DB: a partitioned open-addressing hash map in numba.

Each table is split into partitions by key hash. A partition owns a slice of an int32 index
(linear probing, backward-shift deletion, no tombstones, 1-byte hash tags) and a dense pool of
rows (keys int64, values fp32 or fp16, an optional uint32 per-row counter/tick for the overflow
policy). About 1.1-1.25x the raw key+vector bytes for dims >= 8.

Concurrency (documented because readers may live in other processes):
- Writers (upsert, evict, growth) are serialised by a per-table lock; there is one writer
  process per shared table.
- Each partition has a sequence counter (``seq``). A writer makes the counters of the
  partitions it touches odd before its kernel runs and even after. A reader copies ``seq``
  before and after its fetch kernel and re-reads the keys of any partition whose counter was
  odd or changed, so it never returns a torn row.
- The counters are read and written from Python, outside the numba functions, on purpose:
  the call boundary keeps the compiler from merging or reordering the counter loads with the
  row loads, and x86-64's TSO memory order keeps load->load and store->store order in hardware.
  Other architectures (ARM) would need explicit fences around the kernels.

With ``shared_memory_name`` the arrays live in /dev/shm: the writer creates them with a fixed
capacity (full partitions evict by the policy instead of growing); readers attach read-only.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..errors import HPSError, InvalidInputError, StorageError
from . import _kernels as K
from . import shm
from .base import VolatileDB

log = logging.getLogger(__name__)

POLICIES = {
    "evict_random": K.EVICT_RANDOM,
    "evict_least_used": K.EVICT_LEAST_USED,
    "evict_oldest": K.EVICT_OLDEST,
}
DTYPES = {"float32": np.float32, "float16": np.uint16}  # fp16 rows are kept as their bits
LOAD_FACTOR = 0.8
MIN_ROWS = 64
READ_RETRIES = 100
PARALLEL_MIN_KEYS = 4096


def partition_rows(rows: int, partitions: int) -> int:
    """Pool rows per partition for ``rows`` keys: the mean plus 4 sigma of hash imbalance."""
    mean = rows / partitions
    return int(mean + 4 * math.sqrt(mean) + MIN_ROWS)


def estimate_table_bytes(rows: int, dim: int, dtype: str, partitions: int, policy: str) -> int:
    """Bytes a table of ``rows`` rows takes in this hash map (for ``hps estimate``)."""
    pcap = partition_rows(rows, partitions)
    icap = int(pcap / LOAD_FACTOR) + 1
    meta = 4 if policy != "evict_random" else 0
    return partitions * (icap * 5 + pcap * (8 + dim * np.dtype(DTYPES[dtype]).itemsize + meta) + 16)


@dataclass
class _Table:
    dim: int
    dtype: str
    P: int
    pcap: int
    icap: int
    index: np.ndarray
    tags: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    meta: np.ndarray
    count: np.ndarray
    seq: np.ndarray
    lock: threading.Lock
    tick: int = 0

    def arrays(self) -> tuple:
        return (self.index, self.tags, self.keys, self.values, self.meta, self.count)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.arrays(), self.seq))


class HashMapVDB(VolatileDB):
    """Partitioned numba hash map; ``shared_memory_name`` puts it in /dev/shm for many processes."""

    def __init__(
        self,
        num_partitions: int = 16,
        overflow_margin: int = 2**63 - 1,
        overflow_policy: str = "evict_random",
        overflow_resolution_target: float = 0.8,
        refresh_time_after_fetch: bool = False,
        shared_memory_name: str | None = None,
        shared_memory_readonly: bool = False,
        seed: int = 0,
    ):
        if overflow_policy not in POLICIES:
            raise ValueError(
                f"overflow_policy = {overflow_policy!r}: expected one of {list(POLICIES)}"
            )
        self.num_partitions = max(1, int(num_partitions))
        self.overflow_margin = int(overflow_margin)
        self.policy = POLICIES[overflow_policy]
        self.policy_name = overflow_policy
        self.target = float(overflow_resolution_target)
        self.refresh_time_after_fetch = refresh_time_after_fetch
        self.shm_name = shared_memory_name
        self.readonly = shared_memory_readonly
        self.seed = seed
        self._tables: dict[str, _Table] = {}
        self._lock = threading.Lock()

    # -- tables -------------------------------------------------------------------------------
    def create_table(self, table, dim, dtype="float32", capacity_hint=0):
        if dtype not in DTYPES:
            raise InvalidInputError("dtype", dtype, f"one of {list(DTYPES)}")
        with self._lock:
            t = self._tables.get(table) or self._attach(table)
            if t is not None:
                if (t.dim, t.dtype) != (dim, dtype):
                    raise StorageError(
                        f"VDB table '{table}' exists with dim {t.dim} {t.dtype}, not {dim} {dtype}"
                    )
                return
            self._writable("create a table")
            P = self.num_partitions
            pcap = min(
                partition_rows(max(capacity_hint, 1), P), max(self.overflow_margin, MIN_ROWS)
            )
            self._tables[table] = self._allocate(table, dim, dtype, pcap, threading.Lock(), None)

    def _allocate(self, table: str, dim: int, dtype: str, pcap: int, lock, seq) -> _Table:
        P = self.num_partitions
        icap = int(pcap / LOAD_FACTOR) + 1
        meta_rows = P * pcap if self.policy != K.EVICT_RANDOM else 0
        shapes = {
            "index": ((P * icap,), np.int32),
            "tags": ((P * icap,), np.uint8),
            "keys": ((P * pcap,), np.int64),
            "values": ((P * pcap, dim), DTYPES[dtype]),
            "meta": ((meta_rows,), np.uint32),
            "count": ((P,), np.int64),
            "seq": ((P,), np.uint64),
        }
        if self.shm_name:
            arrays = {
                a: shm.create_array(self.shm_name, table, a, s, d) for a, (s, d) in shapes.items()
            }
        else:
            arrays = {a: np.zeros(s, d) for a, (s, d) in shapes.items()}
        if seq is not None:
            arrays["seq"] = seq
        t = _Table(dim, dtype, P, pcap, icap, lock=lock, **arrays)
        if self.shm_name:
            header = shm.read_header(self.shm_name)
            header[table] = {
                "dim": dim,
                "dtype": dtype,
                "P": P,
                "pcap": pcap,
                "icap": icap,
                "meta": meta_rows,
            }
            shm.write_header(self.shm_name, header)
        return t

    def _attach(self, table: str) -> _Table | None:
        """Map a table another process created in shared memory."""
        if not self.shm_name:
            return None
        h = shm.read_header(self.shm_name).get(table)
        if h is None:
            return None
        P, pcap, icap, dim = h["P"], h["pcap"], h["icap"], h["dim"]
        w = not self.readonly
        arr = {
            "index": shm.attach_array(self.shm_name, table, "index", (P * icap,), np.int32, w),
            "tags": shm.attach_array(self.shm_name, table, "tags", (P * icap,), np.uint8, w),
            "keys": shm.attach_array(self.shm_name, table, "keys", (P * pcap,), np.int64, w),
            "values": shm.attach_array(
                self.shm_name, table, "values", (P * pcap, dim), DTYPES[h["dtype"]], w
            ),
            "meta": shm.attach_array(self.shm_name, table, "meta", (h["meta"],), np.uint32, w),
            "count": shm.attach_array(self.shm_name, table, "count", (P,), np.int64, w),
            "seq": shm.attach_array(self.shm_name, table, "seq", (P,), np.uint64, w),
        }
        t = _Table(dim, h["dtype"], P, pcap, icap, lock=threading.Lock(), **arr)
        self._tables[table] = t
        return t

    def _table(self, table: str) -> _Table:
        t = self._tables.get(table)
        if t is None:
            with self._lock:
                t = self._tables.get(table) or self._attach(table)
        if t is None:
            raise HPSError(f"VDB has no table '{table}'; tables: {self.tables()}")
        return t

    def _writable(self, op: str) -> None:
        if self.readonly:
            raise StorageError(f"VDB '{self.shm_name}' is attached read-only: cannot {op}")

    def drop_table(self, table):
        self._writable("drop a table")
        with self._lock:
            self._table(table)
            del self._tables[table]
            if self.shm_name:
                header = shm.read_header(self.shm_name)
                header.pop(table, None)
                shm.write_header(self.shm_name, header)
                shm.remove_arrays(self.shm_name, table)

    def tables(self):
        names = set(self._tables)
        if self.shm_name:
            names |= set(shm.read_header(self.shm_name))
        return sorted(names)

    def dim(self, table):
        return self._table(table).dim

    def size(self, table):
        return int(self._table(table).count.sum())

    def memory_bytes(self, table=None):
        if table is not None:
            return self._table(table).nbytes()
        return sum(t.nbytes() for t in self._tables.values())

    # -- reads --------------------------------------------------------------------------------
    def fetch(self, table, keys, out=None):
        touch = K.TOUCH_NONE
        if not self.readonly:
            if self.policy == K.EVICT_LEAST_USED:
                touch = K.TOUCH_COUNT
            elif self.policy == K.EVICT_OLDEST and self.refresh_time_after_fetch:
                touch = K.TOUCH_TICK
        return self._fetch(self._table(table), _keys(keys), out, touch)

    def contains(self, table, keys):
        t = self._table(table)
        k = _keys(keys)
        return self._fetch(t, k, np.empty((len(k), t.dim), np.float32), K.TOUCH_NONE)[1]

    @staticmethod
    def _fetch(t: _Table, k: np.ndarray, out: np.ndarray | None, touch: int):
        fresh = out is None
        if fresh:
            out = np.empty((len(k), t.dim), np.float32)
        elif out.shape != (len(k), t.dim) or out.dtype != np.float32:
            raise InvalidInputError(
                "out", f"{out.dtype} {out.shape}", f"float32 [{len(k)}, {t.dim}]"
            )
        found = np.zeros(len(k), bool)
        if len(k) == 0:
            return out, found
        half = t.dtype == "float16"
        dest = np.empty((len(k), t.dim), np.uint16) if half else out
        kernel = K.fetch if len(k) >= PARALLEL_MIN_KEYS else K.fetch_serial
        sel = np.arange(len(k), dtype=np.int64)
        for attempt in range(READ_RETRIES + 1):
            if attempt == READ_RETRIES:  # a writer kept these partitions busy: wait for it
                with t.lock:
                    a = t.arrays()
                    kernel(k, sel, *a[:5], t.icap, t.pcap, t.P, dest, found, touch, t.tick)
                break
            a = t.arrays()  # growth swaps the arrays: use one consistent set
            before = t.seq.copy()
            kernel(k, sel, *a[:5], t.icap, t.pcap, t.P, dest, found, touch, t.tick)
            after = t.seq.copy()
            dirty = (before != after) | (before & np.uint64(1)).astype(bool)
            if not dirty.any():
                break
            sel = sel[dirty[K.partitions(k[sel], t.P)]]
            if len(sel) == 0:
                break
            time.sleep(0.0001 * attempt)
        if half:
            np.copyto(out, dest.view(np.float16), where=found[:, None])
        if fresh:
            out[~found] = 0.0
        return out, found

    def dump(self, table):
        t = self._table(table)
        with t.lock:
            idx = np.concatenate([p * t.pcap + np.arange(t.count[p]) for p in range(t.P)])
            return t.keys[idx].copy(), _decode(t.values[idx], t.dtype)

    # -- writes -------------------------------------------------------------------------------
    def upsert(self, table, keys, vectors):
        self._writable("write")
        t = self._table(table)
        k = _keys(keys)
        v = np.asarray(vectors)
        if v.ndim != 2 or v.shape != (len(k), t.dim):
            raise InvalidInputError(
                "vectors", f"shape {v.shape}", f"[{len(k)}, {t.dim}] for table '{table}'"
            )
        if len(k) == 0:
            return
        # Later duplicates win: keep each key's last occurrence.
        _, last = np.unique(k[::-1], return_index=True)
        last = len(k) - 1 - last
        k, v = k[last], _encode(v[last], t.dtype)
        with t.lock:
            present = self._fetch(t, k, np.empty((len(k), t.dim), np.float32), K.TOUCH_NONE)[1]
            parts = K.partitions(k, t.P)
            new = np.bincount(parts[~present], minlength=t.P)
            need = int((t.count + new).max())
            if not self.shm_name and need > t.pcap and t.pcap < self.overflow_margin:
                self._grow(
                    table,
                    t,
                    min(max(need, int(t.pcap * 1.25)), max(self.overflow_margin, MIN_ROWS)),
                )
                t = self._tables[table]
            order = np.argsort(parts, kind="stable")
            starts = np.searchsorted(parts[order], np.arange(t.P + 1))
            limit = min(self.overflow_margin, t.pcap)
            evicted = np.zeros(t.P, np.int64)
            t.tick += 1
            touched = np.flatnonzero(np.bincount(parts, minlength=t.P))
            t.seq[touched] += np.uint64(1)
            try:
                K.upsert(
                    k,
                    v,
                    present,
                    order,
                    starts,
                    *t.arrays(),
                    t.icap,
                    t.pcap,
                    t.P,
                    limit,
                    int(self.target * limit),
                    self.policy,
                    t.tick,
                    evicted,
                )
            finally:
                t.seq[touched] += np.uint64(1)
            if evicted.any():
                log.debug(
                    "VDB table %s: evicted %d rows (%s)",
                    table,
                    int(evicted.sum()),
                    self.policy_name,
                )

    def _grow(self, table: str, t: _Table, pcap: int) -> None:
        """Re-allocate every partition with ``pcap`` pool rows and rebuild the index."""
        t.seq[:] += np.uint64(1)
        try:
            g = self._allocate(table, t.dim, t.dtype, pcap, t.lock, t.seq)
            for p in range(t.P):
                c = int(t.count[p])
                g.keys[p * pcap : p * pcap + c] = t.keys[p * t.pcap : p * t.pcap + c]
                g.values[p * pcap : p * pcap + c] = t.values[p * t.pcap : p * t.pcap + c]
                if t.meta.shape[0]:
                    g.meta[p * pcap : p * pcap + c] = t.meta[p * t.pcap : p * t.pcap + c]
            g.count[:] = t.count
            g.tick = t.tick
            K.rehash(g.index, g.tags, g.keys, g.count, g.icap, g.pcap, g.P)
            self._tables[table] = g
        finally:
            t.seq[:] += np.uint64(1)

    def evict(self, table, keys):
        self._writable("evict")
        t = self._table(table)
        k = np.unique(_keys(keys))
        with t.lock:
            parts = K.partitions(k, t.P)
            order = np.argsort(parts, kind="stable")
            starts = np.searchsorted(parts[order], np.arange(t.P + 1))
            removed = np.zeros(t.P, np.int64)
            touched = np.flatnonzero(np.bincount(parts, minlength=t.P))
            t.seq[touched] += np.uint64(1)
            try:
                K.erase(k, order, starts, *t.arrays(), t.icap, t.pcap, t.P, removed)
            finally:
                t.seq[touched] += np.uint64(1)
        return int(removed.sum())

    def load(self, table, keys, vectors):
        self.upsert(table, keys, vectors)

    def close(self):
        """Detach (shared tables stay in /dev/shm for other processes until ``unlink``)."""
        self._tables.clear()

    def unlink(self) -> None:
        """Remove every shared table of this map from /dev/shm."""
        if self.shm_name:
            for table in shm.read_header(self.shm_name):
                shm.remove_arrays(self.shm_name, table)
            shm.header_path(self.shm_name).unlink(missing_ok=True)
        self._tables.clear()


def _keys(keys: object) -> np.ndarray:
    k = np.asarray(keys)
    if k.dtype.kind not in "iu" and not (k.size == 0 and k.dtype.kind == "f"):
        raise InvalidInputError("keys", f"dtype {k.dtype}", "integer keys (int64)")
    if k.ndim != 1:
        raise InvalidInputError("keys", f"shape {k.shape}", "a 1-D array")
    return k.view(np.int64) if k.dtype == np.uint64 else np.ascontiguousarray(k, dtype=np.int64)


def _encode(v: np.ndarray, dtype: str) -> np.ndarray:
    """float vectors -> the table's storage array."""
    if dtype == "float16":
        return np.ascontiguousarray(v, dtype=np.float16).view(np.uint16)
    return np.ascontiguousarray(v, dtype=np.float32)


def _decode(v: np.ndarray, dtype: str) -> np.ndarray:
    """Storage rows -> float32."""
    return v.view(np.float16).astype(np.float32) if dtype == "float16" else v.astype(np.float32)
