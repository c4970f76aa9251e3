"""The lookup pipeline of one model: dedupe -> L1 cache -> VDB -> PDB -> default -> fill L1 -> expand."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import buffers
from .cache.admission import Admission
from .cache.base import EmbeddingCache
from .device import DeviceLookup, to_host
from .errors import InvalidInputError, StorageError, UnknownTableError
from .fused import FusedLookup
from .hash_kernels import dedupe
from .lookup_stats import LEVELS as LEVELS
from .lookup_stats import LookupStats as LookupStats
from .pdb.base import PersistentDB
from .vdb.base import VolatileDB

log = logging.getLogger(__name__)


MAX_HELD_KEYS = 1_000_000
"""Keys of updates the shared stores have not applied that RecentUpdates keeps past its grace,
per table (8 MiB of keys; beyond, the oldest go)."""


class RecentUpdates:
    """Keys an online update changed lately, so a lookup never caches a row older than them.

    A lookup reads a row from the VDB/PDB, then inserts it into L1; an update may land in
    between (its ``assign`` then finds nothing to overwrite), or the shared tiers may still
    hold the old row because the process that writes them lags (a RocksDB secondary, a
    restarted Redis node, an ingestor catching up). Cache fills therefore skip keys updated
    after the lookup began or within ``grace`` seconds before it: those keys are read from the
    tiers again next time. Guarded by the table's ``cache_lock``.

    ``progress``, when set, says through which update (entry version) the shared stores'
    consumer group has applied the stream (``updates.ingestor.StoreProgress``; None: not
    known). An update it has not reached still counts after ``grace``, up to ``hold``
    seconds: the stores may stall far longer than ``grace`` (Redis full, a disk full), and a
    fill then would cache the old row, which no later update of L1 replaces (L1 took this one
    already).
    """

    def __init__(self, grace: float = 30.0, hold: float = 3600.0):
        self.grace = grace
        self.hold = hold
        self.progress: Callable[[], int | None] | None = None
        self.epoch = 0
        self._log: list[tuple[float, int, np.ndarray, int | None]] = []  # time, epoch, keys, ver
        self._merged: tuple[int, float, np.ndarray] | None = None  # (epoch, built, sorted keys)
        self._over = False  # the warning that MAX_HELD_KEYS was passed, given

    def _unapplied(self, now: float) -> Callable[[float, int | None], bool]:
        """(time, version) -> whether the stores still lack that update (within ``hold``)."""
        through = self.progress() if self.progress is not None else None
        if through is None:
            return lambda tm, ver: False
        return lambda tm, ver: ver is not None and ver > through and tm > now - self.hold

    def add(self, keys: np.ndarray, version: int | None = None) -> None:
        now = time.monotonic()
        self.epoch += 1
        unapplied = self._unapplied(now)
        self._log = [e for e in self._log if e[0] > now - self.grace - 1.0 or unapplied(e[0], e[3])]
        self._log.append((now, self.epoch, np.unique(keys), version))
        held = sum(len(e[2]) for e in self._log)
        while held > MAX_HELD_KEYS and self._log[0][0] <= now - self.grace - 1.0:
            held -= len(self._log.pop(0)[2])  # the stores stalled this long: bound the memory
            if not self._over:
                self._over = True
                log.warning("the shared stores have not applied online updates of over %d "
                            "keys; L1 may cache rows older than the oldest of them", MAX_HELD_KEYS)  # fmt: skip

    def _counting(self, since_epoch: int, since_time: float) -> list:
        unapplied = self._unapplied(time.monotonic())
        return [
            e
            for e in self._log
            if e[1] > since_epoch or e[0] > since_time - self.grace or unapplied(e[0], e[3])
        ]

    def quiet(self, since_epoch: int, since_time: float) -> bool:
        """True when no update counts for a lookup that began at (since_epoch, since_time):
        ``fresh`` would pass every key."""
        return not self._counting(since_epoch, since_time)

    def fresh(self, keys: np.ndarray, since_epoch: int, since_time: float) -> np.ndarray:
        """bool [n]: keys no update that counts (after since_epoch, after since_time - grace,
        or not yet applied by the stores) touched."""
        if not len(keys) or not self._counting(since_epoch, since_time):
            return np.ones(len(keys), bool)
        now = time.monotonic()
        m = self._merged
        if m is None or m[1] < now - 1.0:
            # one sorted array of the window's keys, rebuilt at most once a second; a superset
            # is safe (it only skips more fills). Updates newer than it are checked one by one.
            merged = np.unique(np.concatenate([e[2] for e in self._log]))
            self._merged = m = (self.epoch, now, merged)
        pos = np.clip(np.searchsorted(m[2], keys), 0, len(m[2]) - 1)
        updated = m[2][pos] == keys
        newer = [e[2] for e in self._log if e[1] > m[0]]
        if newer:
            updated |= np.isin(keys, np.concatenate(newer))
        return ~updated


@dataclass
class TableRuntime:
    """One embedding table as the session serves it."""

    name: str
    store_name: str  # the table's name in the VDB/PDB: hps_et.<model>.<table>
    dim: int
    default_value: float
    cache: EmbeddingCache | None = None
    admission: Admission | None = None  # None: every miss enters the cache
    cache_lock: threading.Lock = field(default_factory=threading.Lock)
    recent: RecentUpdates = field(default_factory=RecentUpdates)
    _stats: LookupStats = field(default_factory=LookupStats, repr=False)
    # Folds the fused path's pending counts into _stats (set by the session that serves it).
    fold: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def stats(self) -> LookupStats:
        """What lookups of this table did since it was loaded (keys per level, seconds)."""
        if self.fold is not None:
            self.fold()
        return self._stats


def as_keys(keys: object, name: str = "keys") -> np.ndarray:
    """Validate request keys: a 1-D integer array; 32-bit keys widen to int64, uint64 reinterprets."""
    if isinstance(keys, np.ma.MaskedArray):  # np.asarray would drop the mask: masked keys served
        raise InvalidInputError(
            name, "a masked array", "plain keys (keys.compressed() for the unmasked ones)"
        )
    try:
        arr = np.asarray(keys)
    except (ValueError, TypeError, OverflowError) as e:  # ragged lists, ints past 64 bits
        raise InvalidInputError(
            name, type(keys).__name__, f"a 1-D array of integer keys ({e})"
        ) from None
    if arr.dtype == object or arr.dtype.kind not in "iu":
        if arr.size == 0 and arr.dtype.kind == "f":
            arr = arr.astype(np.int64)  # np.asarray([]) is float64; an empty list is fine
        else:
            raise InvalidInputError(
                name, f"dtype {arr.dtype}", "integer keys (int64; int32/uint32 are widened)"
            )
    if arr.ndim != 1:
        raise InvalidInputError(name, f"shape {arr.shape}", "a 1-D array of keys")
    if arr.dtype == np.uint64:
        return arr.view(np.int64)
    return np.ascontiguousarray(arr, dtype=np.int64)


def as_columns(cat: object, tables: int, name: str = "cat") -> np.ndarray:
    """Validate a [batch, tables] integer array of keys (one per table per sample) as int64,
    as ``as_keys`` does for a flat list (uint64 reinterprets)."""
    if not isinstance(cat, np.ndarray) or cat.dtype.kind not in "iu":
        what = f"dtype {cat.dtype}" if isinstance(cat, np.ndarray) else type(cat).__name__
        raise InvalidInputError(name, what, "an integer array of keys (int64)")
    if cat.ndim != 2 or cat.shape[1] != tables:
        raise InvalidInputError(name, f"shape {list(cat.shape)}", f"[batch, {tables}]")
    if cat.dtype == np.uint64:
        cat = np.ascontiguousarray(cat).view(np.int64)
    return cat.astype(np.int64, copy=False)


class LookupSession:
    """Serves lookups for the tables of one model across the three storage levels."""

    def __init__(
        self,
        model: str,
        tables: list[TableRuntime],
        vdb: VolatileDB | None,
        pdb: PersistentDB | None,
        *,
        hit_rate_threshold: float = 0.9,
        promoter: object | None = None,
    ):
        self.model = model
        self.tables = tables
        self.vdb = vdb
        self.pdb = pdb
        self.hit_rate_threshold = hit_rate_threshold
        self.promoter = promoter
        self._by_name = {t.name: i for i, t in enumerate(tables)}
        self.dims = np.array([t.dim for t in tables], np.int64)  # the tables are fixed
        self._cols = np.zeros(len(tables), np.int64)  # each table's first column in a row
        np.cumsum(self.dims[:-1], out=self._cols[1:])
        self._inserter = ThreadPoolExecutor(1, thread_name_prefix=f"hps-l1-fill-{model}")
        self._pending: list[Future] = []
        self.fused = FusedLookup(self)
        self.device = DeviceLookup(self)

    def table(self, table: int | str) -> TableRuntime:
        """A table by index or name."""
        if isinstance(table, (int, np.integer)) and not isinstance(table, bool):
            if 0 <= table < len(self.tables):
                return self.tables[int(table)]
        elif isinstance(table, str) and table in self._by_name:
            return self.tables[self._by_name[table]]
        raise UnknownTableError(self.model, table, [t.name for t in self.tables])

    def lookup(self, keys: object, table: int | str = 0) -> np.ndarray:
        """Vectors float32 [len(keys), dim] for the keys of one table, in request order."""
        return self.lookup_with_stats(keys, table)[0]

    def lookup_with_stats(
        self, keys: object, table: int | str = 0
    ) -> tuple[np.ndarray, LookupStats]:
        """Like lookup, and also what each level contributed and how long each stage took."""
        t = self.table(table)
        k = as_keys(keys)
        st = LookupStats(requests=1, keys=len(k))
        since = (t.recent.epoch, time.monotonic())
        t0 = time.perf_counter()
        uniq, inverse = dedupe(k)
        st.unique_keys = len(uniq)
        if t.admission is not None:
            t.admission.record(k)
        vec = buffers.empty((len(uniq), t.dim), np.float32)
        t1 = time.perf_counter()
        st.seconds["dedupe"] = t1 - t0

        missing = np.ones(len(uniq), dtype=bool)
        if t.cache is not None and len(uniq):
            with t.cache_lock:
                _, hit = t.cache.find(uniq, out=vec)
            missing = ~hit
            st.hits["l1"] = int(hit.sum())
        t2 = time.perf_counter()
        st.seconds["l1"] = t2 - t1

        fill_idx = np.flatnonzero(missing)  # rows to insert into L1 once found below
        idx = self.from_tiers(t, uniq, vec, fill_idx, st, (("vdb", self.vdb), ("pdb", self.pdb)))
        missing[fill_idx] = False
        missing[idx] = True

        ts = time.perf_counter()
        if len(idx):
            vec[idx] = t.default_value
        st.hits["default"] = len(idx)
        st.seconds["default"] = time.perf_counter() - ts

        ts = time.perf_counter()
        fill = fill_idx[~missing[fill_idx]]  # default vectors are not cached
        self.fill(t, uniq[fill], vec[fill], st, since)
        t3 = time.perf_counter()
        st.seconds["insert"] = t3 - ts

        out = buffers.empty((len(k), t.dim), np.float32)
        np.take(vec, inverse, axis=0, out=out, mode="clip")  # clip: no buffered copy of out
        t4 = time.perf_counter()
        st.seconds["expand"] = t4 - t3
        st.seconds["total"] = t4 - t0
        t._stats.add(st)
        return out, st

    def from_tiers(
        self,
        t: TableRuntime,
        keys: np.ndarray,
        vec: np.ndarray,
        idx: np.ndarray,
        st: LookupStats,
        tiers: tuple,
    ) -> np.ndarray:
        """Rows of keys[idx] from each (level, tier) in turn into vec[idx]; returns the idx
        that none holds. A failing tier is counted and skipped, never fails the lookup."""
        for level, tier in tiers:
            if tier is None or not len(idx):
                continue
            ts = time.perf_counter()
            try:
                rows, found = tier.fetch(t.store_name, keys[idx])
            except StorageError as e:
                st.errors[level] += 1
                _log_tier_failure(level, t.store_name, e)
                continue
            got = idx[found]
            vec[got] = rows[found]
            idx = idx[~found]
            st.hits[level] += len(got)
            if level == "pdb" and self.promoter is not None and self.vdb is not None and len(got):
                self.promoter.submit(t.store_name, keys[got], rows[found], copy=False)
            st.seconds[level] += time.perf_counter() - ts
        return idx

    def fill(
        self,
        t: TableRuntime,
        keys: np.ndarray,
        rows: np.ndarray,
        st: LookupStats,
        since: tuple[int, float],
    ) -> None:
        """Insert rows the lower levels returned into L1, through the admission filter."""
        if t.cache is None or not len(keys):
            return
        if t.admission is not None:
            ok = t.admission.admit(keys)
            keys, rows = keys[ok], rows[ok]
        if len(keys):
            self._fill_cache(t, keys, rows, st.hit_rate("l1"), since)

    def lookup_concatenated(
        self, keys: object, num_keys: object, stats: bool = True, on_device: bool = False
    ) -> tuple[np.ndarray, list[LookupStats]]:
        """HPS backend I/O: keys of all tables concatenated + a count per table -> flat vectors,
        and what each table's lookup did (an empty list with ``stats=False``). ``on_device``:
        where the tables' L1 caches are on a GPU (``DeviceLookup``), the vectors stay there
        (a CuPy array); NumPy otherwise."""
        k = as_keys(keys, "KEYS")
        n = np.asarray(num_keys)
        if n.dtype.kind not in "iu" or n.ndim != 1:
            raise InvalidInputError(
                "NUMKEYS", f"dtype {n.dtype}, shape {n.shape}", "a 1-D integer array"
            )
        if len(n) != len(self.tables):
            raise InvalidInputError(
                "NUMKEYS", f"{len(n)} counts", f"one count per table ({len(self.tables)})"
            )
        # as Python ints: a uint64 count of 2**64 - 1 is -1 as int64, and int64 sums wrap
        exact = n.tolist()
        if any(c < 0 for c in exact):
            raise InvalidInputError("NUMKEYS", exact, "non-negative counts")
        if sum(exact) != len(k):
            raise InvalidInputError(
                "NUMKEYS", f"sum {sum(exact)}", f"the number of KEYS ({len(k)})"
            )
        n = np.array(exact, np.int64)  # each count <= len(k) now
        device = bool(len(k)) and self.device.eligible
        fused = not device and bool(len(k)) and self.fused.worth(n)
        if device or fused:  # table t's keys are k[starts[t]:][:counts[t]]
            counts = n
            starts, ones = np.zeros(len(n), np.int64), np.ones(len(n), np.int64)
            np.cumsum(counts[:-1], out=starts[1:])
        if device:
            out, delta = self.device.run(k, starts, ones, counts, False)
            return (out if on_device else to_host(out)), (self.fused.stats(delta) if stats else [])
        if fused:
            dims = self.dims
            obase = np.zeros(len(n), np.int64)
            np.cumsum((counts * dims)[:-1], out=obase[1:])
            out = buffers.empty(int((counts * dims).sum()), np.float32)
            delta = self.fused.run(k, starts, ones, counts, out, obase, dims)
            if delta is not None:
                return out, self.fused.stats(delta) if stats else []
        parts, per_table, start = [], [], 0
        for i, c in enumerate(n.tolist()):
            vec, st = self.lookup_with_stats(k[start : start + c], i)
            parts.append(vec.ravel())
            per_table.append(st)
            start += c
        return np.concatenate(parts) if parts else np.empty(0, np.float32), per_table

    def lookup_columns(self, cat: np.ndarray, on_device: bool = False) -> np.ndarray:
        """int64 [B, tables] (one key per table per sample) -> float32 [B, sum(dims)].
        ``on_device``: as in ``lookup_concatenated``."""
        cat = as_columns(cat, len(self.tables))
        B, T = cat.shape
        if B and self.device.eligible:
            flat = np.ascontiguousarray(cat, np.int64).reshape(-1)
            ones = np.full(T, B, np.int64)
            out, _ = self.device.run(flat, np.arange(T), np.full(T, T, np.int64), ones, True)
            return out if on_device else to_host(out)
        out = buffers.empty((B, int(self.dims.sum())), np.float32)
        n = np.full(T, B, np.int64)
        if B and self.fused.worth(n):
            delta = self.fused.run(np.ascontiguousarray(cat, np.int64).reshape(-1), np.arange(T),
                                   np.full(T, T, np.int64), n, out.reshape(-1), self._cols,
                                   np.full(T, out.shape[1], np.int64))  # fmt: skip
            if delta is not None:
                return out
        for t, (col, dim) in enumerate(zip(self._cols.tolist(), self.dims.tolist(), strict=True)):
            out[:, col : col + dim] = self.lookup(np.ascontiguousarray(cat[:, t]), t)
        return out

    def prefill(self, table: int | str, keys: object) -> int:
        """Warm the L1 cache of a table with ``keys`` (hottest first): rows come from the VDB/PDB.

        Keys found in neither tier are skipped; at most the cache's capacity is inserted.
        Returns the number of rows inserted.
        """
        t = self.table(table)
        k = as_keys(keys)
        if t.cache is None:
            return 0
        k = np.unique(k[: t.cache.capacity])
        vec = np.zeros((len(k), t.dim), np.float32)
        missing = np.ones(len(k), bool)
        for tier in (self.vdb, self.pdb):
            idx = np.flatnonzero(missing)
            if tier is not None and len(idx):
                rows, found = tier.fetch(t.store_name, k[idx])
                vec[idx[found]] = rows[found]
                missing[idx[found]] = False
        have = ~missing
        with t.cache_lock:
            t.cache.insert(k[have], vec[have])
        return int(have.sum())

    def _fill_cache(
        self,
        t: TableRuntime,
        keys: np.ndarray,
        rows: np.ndarray,
        hit_rate: float,
        since: tuple[int, float],
    ) -> None:
        # As HPS: below the threshold the cache is cold, so fill it before returning; above it,
        # misses are rare and filling in the background keeps them off the request's latency.
        if hit_rate < self.hit_rate_threshold:
            self._insert_locked(t, keys, rows, since)
            return
        self._pending = [f for f in self._pending if not f.done()]
        try:
            fut = self._inserter.submit(self._insert_locked, t, keys.copy(), rows.copy(), since)
        except RuntimeError:  # closed (a reload replaced this session): the answer stands
            return
        fut.add_done_callback(_log_failure)
        self._pending.append(fut)

    @staticmethod
    def _insert_locked(
        t: TableRuntime, keys: np.ndarray, rows: np.ndarray, since: tuple[int, float]
    ) -> None:
        with t.cache_lock:
            if t.recent.epoch:  # online updates arrived: never cache a row older than them
                ok = t.recent.fresh(keys, *since)
                keys, rows = keys[ok], rows[ok]
            try:
                t.cache.insert(keys, rows)
            except StorageError as e:  # a full static table: the rows stay in the VDB/PDB
                if t.name not in _full_static:
                    _full_static.add(t.name)
                    log.warning("L1 of %s takes no new keys (%s); they are served below L1",
                                t.name, e)  # fmt: skip

    def flush(self) -> None:
        """Wait for background cache fills (tests and orderly shutdown)."""
        for f in list(self._pending):
            f.result()
        self._pending.clear()

    def close(self) -> None:
        """Stop the background filler."""
        self.flush()
        self._inserter.shutdown(wait=True)


_failing: set[str] = set()
_full_static: set[str] = set()  # tables whose full static L1 was logged


def _log_tier_failure(level: str, table: str, e: Exception) -> None:
    """Log a tier's read failure once per tier and table (the tier logs its own recovery)."""
    if level + table not in _failing:
        _failing.add(level + table)
        log.warning("%s read of %s failed, keys fall through: %s", level, table, e)


def _log_failure(fut: Future) -> None:
    if fut.exception() is not None:
        log.error("background L1 fill failed", exc_info=fut.exception())
