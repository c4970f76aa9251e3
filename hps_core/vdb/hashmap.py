"""The in-process volatile DB (L2): a partitioned open-addressing hash map run by numba kernels.

Each table is split into ``num_partitions`` partitions by key hash. A partition owns a slice of
a 32-bit index (row id + 1 and a hash tag per slot; linear probing at load <= 0.8,
backward-shift deletion) and a dense pool of rows: keys int64, vectors fp32 or fp16, and a
uint32 per-row access count or last-touched tick for the ``evict_least_used`` /
``evict_oldest`` policies. The map takes 1.04-1.25x the raw key + vector bytes (see
``estimate_table_bytes``); layout details in ``_kernels``.

Bounds (HPS semantics): ``overflow_margin`` is the most rows a partition may hold. An upsert
that would exceed it first evicts rows of that partition (not rows of the batch itself) by the
policy until ``overflow_resolution_target * overflow_margin`` rows remain with the new ones.
In process, a full partition grows every partition of the table 1.5x; in shared memory the
capacity is fixed at ``create_table`` and a full partition evicts instead.

Concurrency: a seqlock per partition. Readers may live in other processes.

- Writers (upsert, evict) are serialised by a per-table ``threading.Lock``; a shared table has
  exactly one writer process.
- Each partition has a uint64 counter ``seq``. Before its kernel runs, a writer increments the
  counters of the partitions the batch touches (odd: write in progress); after the kernel it
  increments them again (even).
- A reader copies ``seq`` before and after its kernel and re-reads the keys of every partition
  whose counter was odd or changed (``time.sleep(0)`` then a growing back-off between tries;
  after ``READ_RETRIES`` the writer's own process takes the writer lock, another process keeps
  backing off up to ``READ_TIMEOUT_S``). So a reader never returns a torn row.
- The counters are read and written from Python, outside the numba functions, on purpose: the
  call boundary keeps the compiler from merging or reordering the counter loads and stores
  with the row loads and stores, and x86-64's TSO memory model keeps load->load and
  store->store order in hardware. Other architectures (ARM, POWER) would need explicit
  acquire/release fences around the kernels.
- Growth leaves the old arrays untouched and swaps in the new ones with a single attribute
  store, so it needs no odd counter: a reader on the old arrays reads a consistent copy.
- Readers' access-count / tick updates are not locked: counts are approximate under races.
- Dropping a shared table sets a flag in its state; readers then drop their old mapping. A new
  writer that finds a counter odd (its predecessor died mid-batch) rebuilds the index.
- The kernels use numba's thread pool from several Python threads at once, which needs the
  ``omp`` or ``tbb`` threading layer (numba picks one when present), not ``workqueue``.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

import numpy as np

from .. import buffers
from ..errors import ConfigError, HPSError, InvalidInputError, StorageError
from . import _kernels as K
from . import shm
from .base import VolatileDB
from .shm import DTYPES, MAX_ROWS, MIN_ROWS, Table, TableArrays, decode, encode, partition_rows
from .shm import estimate_table_bytes as estimate_table_bytes  # re-exported for hps estimate

log = logging.getLogger(__name__)

POLICIES = {
    "evict_random": K.EVICT_RANDOM,
    "evict_least_used": K.EVICT_LEAST_USED,
    "evict_oldest": K.EVICT_OLDEST,
}
MIN_SHARED_ROWS = 1024  # pool rows per partition when the capacity is fixed
GROWTH = 1.5
READ_RETRIES = 64
READ_TIMEOUT_S = 10.0
# A fetch runs in parallel (tasks of K.chunk_size keys) from PARALLEL_MIN_KEYS keys, or from
# two tasks' worth when rows are wide: on the 2-core VM, 512 keys took 34-40 us against 49 us
# serially at dim 64, 50-69 against 75-79 at dim 128; at dim 16 the serial loop wins below 1K.
PARALLEL_MIN_KEYS = 1024
PARALLEL_MIN_ELEMENTS = 32768  # keys x dim, with at least 2 * K.MIN_CHUNK keys


class UnknownVDBTableError(HPSError, KeyError):
    """A VDB table name does not exist."""

    def __init__(self, table: str, known: list[str]):
        self.table = table
        super().__init__(f"VDB has no table '{table}'; tables: {known}")

    def __str__(self) -> str:
        return self.args[0]


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
            raise ConfigError("overflow_policy", overflow_policy, f"one of {list(POLICIES)}")
        if int(num_partitions) < 1:
            raise ConfigError("num_partitions", num_partitions, "an integer >= 1")
        if int(overflow_margin) < 1:
            raise ConfigError("overflow_margin", overflow_margin, "an integer >= 1")
        if not 0.0 <= overflow_resolution_target <= 1.0:
            raise ConfigError("overflow_resolution_target", overflow_resolution_target, "0..1")
        self.num_partitions = int(num_partitions)
        self.overflow_margin = int(overflow_margin)
        self.policy = overflow_policy
        self.target = float(overflow_resolution_target)
        self.refresh_time_after_fetch = bool(refresh_time_after_fetch)
        self.shm_name = shared_memory_name
        self.readonly = bool(shared_memory_readonly)
        self.seed = int(seed)
        self._tables: dict[str, Table] = {}
        self._lock = threading.RLock()  # guards the table dict; attaching re-enters it
        self._marks: dict[str, str] = {}  # in process: what each table was loaded from
        # Counts changes to which arrays serve a table (created, attached, dropped, grown):
        # the fused lookup keeps views of them while this number stays the same.
        self.generation = 0

    # -- tables -------------------------------------------------------------------------------
    def create_table(self, table, dim, dtype="float32", capacity_hint=0):
        if dtype not in DTYPES:
            raise InvalidInputError("dtype", dtype, f"one of {list(DTYPES)}")
        dim = _whole("dim", dim, 1)
        capacity_hint = _whole("capacity_hint", capacity_hint, 0)
        if not isinstance(table, str) or not table or "/" in table or "\0" in table:
            raise InvalidInputError("table", repr(table), "a non-empty name without '/'")
        with self._lock:
            try:
                t = self._tables.get(table) or self._attach(table)
            except StorageError as e:  # damaged files: the writer makes the table anew
                if self.readonly:
                    raise
                log.warning("%s; creating it anew", e)
                shm.remove_table(self.shm_name, table)
                t = None
            if t is not None:
                if (t.dim, t.dtype) != (dim, dtype):
                    raise StorageError(
                        f"VDB table '{table}' exists with dim {t.dim} {t.dtype}, not {dim} {dtype}"
                    )
                return
            self._writable("create a table")
            P = self.num_partitions
            if capacity_hint > P * MAX_ROWS:  # the 32-bit index entries' limit, not a choice
                log.warning(
                    "VDB table '%s': %d rows to hold, but %d partition(s) of at most %d rows "
                    "each hold %d: the rest is evicted (overflow_policy) and served from below; "
                    "use parallel_hash_map with num_partitions >= %d",
                    table, capacity_hint, P, MAX_ROWS, P * MAX_ROWS, -(-capacity_hint // MAX_ROWS),
                )  # fmt: skip
            least = MIN_SHARED_ROWS if self.shm_name else MIN_ROWS
            pcap = max(partition_rows(int(capacity_hint), P), least)
            pcap = max(1, min(pcap, self.overflow_margin, MAX_ROWS))
            self._tables[table] = shm.create_table(
                self.shm_name, table, P, int(dim), dtype, pcap, self.policy
            )
            self.generation += 1

    def _attach(self, table: str) -> Table | None:
        t = shm.attach(self.shm_name, table, self.readonly) if self.shm_name else None
        if t is not None:
            self._tables[table] = t
            self.generation += 1
        return t

    def _table(self, table: str) -> Table:
        t = self._tables.get(table)
        if t is not None and t.clock[1]:  # the writer dropped it: forget the old mapping
            with self._lock:
                if self._tables.get(table) is t:
                    del self._tables[table]
                    self.generation += 1
            t = None
        if t is None:
            with self._lock:
                t = self._tables.get(table) or self._attach(table)
        if t is None:
            raise UnknownVDBTableError(table, self.tables())
        return t

    def _writable(self, op: str) -> None:
        if self.readonly:
            raise StorageError(f"VDB '{self.shm_name}' is attached read-only: cannot {op}")

    def drop_table(self, table):
        self._writable("drop a table")
        with self._lock:
            t = self._table(table)
            del self._tables[table]
            self._marks.pop(table, None)
            self.generation += 1
            if self.shm_name:
                t.clock[1] = 1  # readers in other processes let go of their mappings
                shm.remove_table(self.shm_name, table)

    def load_mark(self, table):
        """A shared table outlives its writer: the mark is in its header; an in-process table
        keeps it for a reload at run time."""
        if self.shm_name:
            return shm.read_header(self.shm_name).get(table, {}).get("loaded")
        return self._marks.get(table)

    def set_load_mark(self, table, mark):
        self._writable("mark a table")
        if self.shm_name:
            with self._lock:
                shm.set_layout_field(self.shm_name, table, "loaded", mark)
        elif mark is None:
            self._marks.pop(table, None)
        else:
            self._marks[table] = mark

    def tables(self):
        names = set(self._tables)
        if self.shm_name:
            names |= set(shm.read_header(self.shm_name))
        return sorted(names)

    def dim(self, table):
        return self._table(table).dim

    def dtype(self, table: str) -> str:
        """How a table stores its rows: float32, float16, bfloat16 or int8."""
        return self._table(table).dtype

    def size(self, table):
        return int(self._table(table).count.sum())

    def partition_sizes(self, table: str) -> np.ndarray:
        """Rows held by each partition of a table (int64 [num_partitions])."""
        return self._table(table).count.copy()

    def evictions(self, table: str) -> int:
        """Rows this instance evicted from a table by the overflow policy."""
        return self._table(table).evicted

    def memory_bytes(self, table=None):
        if table is not None:
            return self._table(table).nbytes()
        return sum(t.nbytes() for t in self._tables.values())

    # -- reads --------------------------------------------------------------------------------
    def fetch_touch(self, t: Table) -> int:
        """What a fetch records on the rows it returns: a use count (evict_least_used), the
        batch tick (evict_oldest with refresh_time_after_fetch), or nothing (0)."""
        if t.policy == "evict_least_used":
            return K.TOUCH_COUNT
        if t.policy == "evict_oldest" and self.refresh_time_after_fetch:
            return K.TOUCH_TICK
        return 0

    @staticmethod
    def next_tick(t: Table) -> int:
        """Advance a table's batch clock (the evict_oldest age) and return the new tick."""
        t.clock[0] += np.uint64(1)
        return int(t.clock[0])

    def fetch(self, table, keys, out=None):
        """Rows of keys as float32. Into a given ``out``, a row whose key a concurrent evict
        removes mid-read may be written although ``found[i]`` ends up False."""
        t = self._table(table)
        k = _keys(keys)
        n = len(k)
        fresh = out is None
        if fresh:  # not zeroed: the kernel zeroes the rows of misses
            out = buffers.empty((n, t.dim), np.float32)
        elif (
            not isinstance(out, np.ndarray)
            or out.shape != (n, t.dim)
            or out.dtype != np.float32
            or not out.flags.writeable
        ):
            got = (f"{'read-only ' if not out.flags.writeable else ''}{out.dtype} {out.shape}"
                   if isinstance(out, np.ndarray) else type(out).__name__)  # fmt: skip
            raise InvalidInputError("out", got, f"a writable float32 array [{n}, {t.dim}]")
        found = np.zeros(n, bool)
        if n == 0:
            return out, found
        touch = self.fetch_touch(t)
        tick = self.next_tick(t) if touch == K.TOUCH_TICK else 0
        wide = n >= 2 * K.MIN_CHUNK and n * t.dim >= PARALLEL_MIN_ELEMENTS
        kernel, chunk = (
            (K.fetch, K.chunk_size(n)) if n >= PARALLEL_MIN_KEYS or wide else (K.fetch_serial, 0)
        )
        lut = shm.lut_for(t.dtype)

        def run(a: TableArrays, sel: np.ndarray) -> None:
            kernel(k, sel, a.index, a.keys, a.values, a.meta, touch, tick,
                   a.icap, a.pcap, a.rbits, t.P, out, found, lut, fresh, chunk)  # fmt: skip

        self._read(t, k, run)
        return out, found

    def contains(self, table, keys):
        t = self._table(table)
        k = _keys(keys)
        found = np.zeros(len(k), bool)
        if len(k):

            def run(a: TableArrays, sel: np.ndarray) -> None:
                K.contains(k, sel, a.index, a.keys, a.icap, a.pcap, a.rbits, t.P, found)

            self._read(t, k, run)
        return found

    def _read(self, t: Table, k: np.ndarray, run) -> None:
        """Run ``run(arrays, positions)`` under the seqlock until no writer overlapped it."""
        sel = _positions(len(k))
        parts = None
        start = 0.0
        attempt = 0
        while True:
            before = t.seq.copy()
            run(t.arr, sel)
            if K.seq_clean(before, t.seq):
                return
            if not start:
                start = time.monotonic()
            after = t.seq.copy()
            dirty = (before != after) | ((before & np.uint64(1)) != 0)
            if parts is None:
                parts = K.partitions(k, t.P)
            sel = sel[dirty[parts[sel]]]
            if len(sel) == 0:
                return
            attempt += 1
            if attempt >= READ_RETRIES and not self.readonly:
                with t.lock:  # the writer lives in this process: wait for it
                    run(t.arr, sel)
                return
            self._back_off(attempt, start, f"read of {len(sel)} keys")

    def _back_off(self, attempt: int, start: float, what: str) -> None:
        """Yield, then sleep a growing time; give up after READ_TIMEOUT_S (a writer died?)."""
        if time.monotonic() - start > READ_TIMEOUT_S:
            raise StorageError(
                f"VDB '{self.shm_name}': {what} found a write in progress for "
                f"{READ_TIMEOUT_S} s; did the writer process die?"
            )
        time.sleep(0 if attempt < 4 else min(1e-3, 1e-6 * 2 ** min(attempt, 10)))

    def dump(self, table):
        t = self._table(table)
        if not self.readonly:
            with t.lock:
                return self._dump_rows(t, t.arr, range(t.P))
        parts_k, parts_v = [], []
        start = time.monotonic()
        for p in range(t.P):  # a reader: partition by partition under the seqlock
            attempt = 0
            while True:
                before = int(t.seq[p])
                if before % 2 == 0:
                    k, v = self._dump_rows(t, t.arr, [p])
                    if int(t.seq[p]) == before:
                        break
                attempt += 1
                self._back_off(attempt, start, f"dump of partition {p}")
            parts_k.append(k)
            parts_v.append(v)
        return np.concatenate(parts_k), np.concatenate(parts_v)

    @staticmethod
    def _dump_rows(t: Table, a: TableArrays, parts) -> tuple[np.ndarray, np.ndarray]:
        rows = [p * a.pcap + np.arange(int(t.count[p])) for p in parts]
        idx = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        return a.keys[idx].copy(), decode(a.values[idx], t.dtype, t.dim)

    # -- writes -------------------------------------------------------------------------------
    def upsert(self, table, keys, vectors):
        self._write(table, keys, vectors, sized=False)

    def insert_missing(self, table, keys, vectors, source=None):
        """Under the writer lock, ``source`` read too: an update that wrote the source after
        that read writes this table after the insert (it waits for the lock)."""
        return self._write(table, keys, vectors, sized=False, missing_only=True, source=source)

    def load(self, table, keys, vectors):
        """Bulk upsert; a table that must grow is sized for exactly the rows it will hold."""
        self._write(table, keys, vectors, sized=True)

    def _write(
        self, table: str, keys, vectors, sized: bool, missing_only: bool = False, source=None
    ) -> int:
        """Upsert (or with ``missing_only`` insert only the keys not held and, with ``source``,
        still held there as given); rows written."""
        self._writable("upsert")
        t = self._table(table)
        k = _keys(keys)
        v = _vectors(vectors, len(k), t.dim, table)
        if len(k) == 0:
            return 0
        P, margin = t.P, self.overflow_margin
        with t.lock:
            a = t.arr
            if missing_only:  # the writer: no seqlock needed to read its own table
                held = np.zeros(len(k), np.bool_)
                K.contains(k, _positions(len(k)), a.index, a.keys, a.icap, a.pcap, a.rbits, P,
                           held)  # fmt: skip
                keep = ~held & still_held(source, k, v)
                if not keep.any():
                    return 0
                k, v = k[keep], v[keep]
            v = encode(v, t.dtype)
            order, starts = K.group_by_partition(k, P)
            keep = np.empty(len(k), np.bool_)
            rows = np.empty(len(k), np.int64)
            news, olds = np.zeros(P, np.int64), np.zeros(P, np.int64)
            plan_limit = min(margin, a.pcap if self.shm_name else MAX_ROWS)
            K.plan_upsert(k, order, starts, a.index, a.keys, a.icap, a.pcap, a.rbits, P,
                          plan_limit, keep, rows, news, olds)  # fmt: skip
            need = int((t.count + news).max())
            if not self.shm_name and need > a.pcap and a.pcap < min(margin, MAX_ROWS):
                total = int(t.count.sum() + news.sum())
                pcap = max(need, partition_rows(total, P))
                if not sized:
                    pcap = max(pcap, int(a.pcap * GROWTH))
                self._grow(table, t, min(pcap, margin, MAX_ROWS))
                a = t.arr
            limit = min(margin, a.pcap)
            evicted = np.zeros(P, np.int64)
            t.clock[0] += np.uint64(1)
            with _writing(t, starts):
                K.apply_upsert(
                    k, v.view(np.uint16), order, starts, keep, rows, news, olds,
                    a.index, a.keys, a.values.view(np.uint16), a.meta, t.count, a.icap, a.pcap, a.rbits, P,
                    limit, int(self.target * limit), POLICIES[t.policy], int(t.clock[0]), self.seed, evicted,
                )  # fmt: skip
            if evicted.any():
                t.evicted += int(evicted.sum())
                log.debug("VDB table %s: evicted %d rows (%s)", table, evicted.sum(), t.policy)
        return len(k)

    def _grow(self, table: str, t: Table, pcap: int) -> None:
        """Re-allocate every partition with ``pcap`` pool rows and rebuild the index.

        The old arrays are not modified and the new set replaces them in one attribute store,
        so readers need no seqlock signal: either set is a consistent copy of the table.
        """
        g = shm.copy_pools(t.arr, t.count, t.dim, t.dtype, pcap)
        K.rehash(g.index, g.keys, t.count, g.icap, g.pcap, g.rbits, t.P)
        t.arr = g
        self.generation += 1
        log.debug("VDB table %s: grew to %d rows per partition", table, pcap)

    def evict(self, table, keys):
        self._writable("evict")
        t = self._table(table)
        k = _keys(keys)
        if len(k) == 0:
            return 0
        with t.lock:
            a = t.arr
            order, starts = K.group_by_partition(k, t.P)
            removed = np.zeros(t.P, np.int64)
            with _writing(t, starts):
                K.erase(k, order, starts, a.index, a.keys, a.values.view(np.uint16),
                        a.meta, t.count, a.icap, a.pcap, a.rbits, t.P, removed)  # fmt: skip
        return int(removed.sum())

    def close(self):
        """Detach (shared tables stay in /dev/shm for other processes until ``unlink``)."""
        with self._lock:
            self._tables.clear()
            self.generation += 1

    def unlink(self) -> None:
        """Remove every shared table of this map from /dev/shm (the writer, at shutdown)."""
        self._writable("unlink")
        if self.shm_name:
            for table in self.tables():
                try:
                    self._table(table).clock[1] = 1
                except (HPSError, OSError):  # half-created or half-removed: nothing to signal
                    pass
            shm.remove_all(self.shm_name)
        self.close()


@contextmanager
def _writing(t: Table, starts: np.ndarray):
    """Seqlock write section over the partitions a batch grouped by ``starts`` touches."""
    touched = np.flatnonzero(np.diff(starts))
    t.seq[touched] += np.uint64(1)  # odd: readers of these partitions retry
    try:
        yield
    finally:
        t.seq[touched] += np.uint64(1)


_IOTA_MAX = 1 << 16
_iota = np.arange(_IOTA_MAX, dtype=np.int64)  # never written: kernels only read positions


def still_held(source, keys: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """bool [n]: whether ``source(keys)`` holds each row bit for bit as ``vectors`` has it
    (all True without a source)."""
    if source is None:
        return np.ones(len(keys), bool)
    now, found = source(keys)
    bits = [np.ascontiguousarray(x, np.float32).view(np.uint32) for x in (now, vectors)]
    same = bits[0] == bits[1]
    return found & same.all(axis=1)


def _whole(field: str, value: object, least: int) -> int:
    """``value`` as an int when it is a whole number >= least (not a float, bool or string:
    a dim of 2.5 made a table of dim 2)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise InvalidInputError(field, repr(value), f"an integer >= {least}")
    return int(value)


def _positions(n: int) -> np.ndarray:
    """0..n-1: a view of one shared array for small batches (saves an allocation per call)."""
    return _iota[:n] if n <= _IOTA_MAX else np.arange(n, dtype=np.int64)


def _keys(keys: object) -> np.ndarray:
    k = np.asarray(keys)
    if k.dtype.kind not in "iu" and not (k.size == 0 and k.dtype.kind == "f"):
        raise InvalidInputError("keys", f"dtype {k.dtype}", "integer keys (int64)")
    if k.ndim != 1:
        raise InvalidInputError("keys", f"shape {k.shape}", "a 1-D array")
    if k.dtype == np.uint64:
        return np.ascontiguousarray(k).view(np.int64)  # the same 64 bits
    return np.ascontiguousarray(k, dtype=np.int64)


def _vectors(vectors: object, n: int, dim: int, table: str) -> np.ndarray:
    v = np.asarray(vectors)
    if v.dtype.kind not in "fiu":
        raise InvalidInputError("vectors", f"dtype {v.dtype}", "float vectors")
    if v.shape != (n, dim):
        raise InvalidInputError("vectors", f"shape {v.shape}", f"[{n}, {dim}] for table '{table}'")
    return v
