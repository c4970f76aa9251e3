"""Fused CPU lookup: every table of a request in one kernel call, for host L1 caches over the
in-process hash-map VDB or over Redis.

A per-table lookup costs tens of microseconds of Python per table (dedupe, find, fetch,
fill, expand, statistics), so a 26-table request of one sample took about 1 ms although its
26 rows are a few hundred bytes. Here one numba call (``_fused_kernels.lookup_tables``)
dedupes, finds in L1, fetches the L1 misses from the hash-map VDB and writes every row to the
output, for all tables, tables in parallel. Python is left with what is rare once warm, or
cannot run in the kernel: keys the kernel did not find (from Redis, all tables in one
``fetch_many``; then the PDB and the default vector, through ``LookupSession.from_tiers``),
the L1 fill of rows found below L1 (``LookupSession.fill``: admission, recent updates, the
hit-rate threshold, all as in a per-table lookup), and the counters.

The cache sees exactly what a per-table lookup shows it (unique keys in first-appearance
order, one clock tick per table and call, the same fills); ``tests/test_fused.py`` and
``tests/redis/test_redis_fused.py`` check outputs, cache slots and counters against per-table
lookups. Eligible: every table's L1 is a ``HostCache`` or none, and the VDB is none, a
``HashMapVDB`` (fp32, fp16 or bf16 rows, one dtype for all tables), or one with ``fetch_many``;
otherwise ``run`` returns None and the session looks tables up one by one.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numba
import numpy as np
from numba import typed

from . import _fused_kernels as FK
from .cache._host_kernels import KIND_F32
from .cache.host import PARALLEL_MIN_KEYS, HostCache
from .device import table_keys
from .errors import StorageError
from .lookup_stats import LEVELS, LookupStats
from .vdb import _kernels as VK
from .vdb import shm
from .vdb.hashmap import HashMapVDB

if TYPE_CHECKING:
    from .session import LookupSession, TableRuntime

# Columns of the counters: requests, keys, unique keys, then hits per level (as the kernel's).
_REQ, _KEYS, _UNIQ = FK.REQ, FK.KEYS, FK.UNIQ
_HIT = {level: FK.HIT_L1 + i for i, level in enumerate(LEVELS)}
_FIELDS = 3 + len(LEVELS)


class _Layout:
    """The arrays of every table as the kernel takes them, for one set of caches/VDB arrays;
    ``eligible`` False where some table cannot be served fused."""

    def __init__(self, session: LookupSession, ident: tuple):
        self.ident = ident
        tables, vdb = session.tables, session.vdb
        T = len(tables)
        self.held = [t.cache for t in tables]  # alive, so the ids in ident stay theirs
        held = vdb._tables if type(vdb) is HashMapVDB else {}
        vts = [held.get(t.store_name) for t in tables]
        # a VDB other than the hash map (Redis) is read after the kernel, all tables at once
        # one storage dtype for every VDB table: their arrays share one typed list
        dtypes = {vt.dtype for vt in vts if vt is not None}
        self.eligible = (
            (vdb is None or type(vdb) is HashMapVDB or hasattr(vdb, "fetch_many"))
            and len(dtypes) <= 1
            and all(c is None or type(c) is HostCache for c in self.held)
        )
        if not self.eligible:
            return
        self.vdb_dtype = dtypes.pop() if dtypes else "float32"  # 16-bit rows decoded in fetch
        self.dims = session.dims
        self.has_cache = np.array([c is not None for c in self.held], np.bool_)
        self.has_vdb = np.array([vt is not None for vt in vts], np.bool_)
        self.lfu = np.zeros(T, np.bool_)
        self.kind = np.zeros(T, np.int64)
        self.icap, self.pcap, self.rbits, self.P, self.touch = (
            np.zeros(T, np.int64) for _ in range(5)
        )
        self.tick_tables: list[tuple[int, object]] = []  # (table, VDB table) stamping fetches
        self.caches, self.vdb_tables = typed.List(), typed.List()
        stand_in = HostCache(1, 1)
        vdb_stand_in = _vdb_stand_in(vts)
        for i, (cache, vt) in enumerate(zip(self.held, vts, strict=True)):
            c = cache if cache is not None else stand_in
            self.lfu[i], self.kind[i] = c._lfu, c._kind
            self.caches.append((c.keys, c.occupied, c.stamp, c._vals))
            if vt is None:
                self.vdb_tables.append(vdb_stand_in)
                self.P[i] = 1
                continue
            arr = vt.arr
            self.icap[i], self.pcap[i], self.rbits[i] = arr.icap, arr.pcap, arr.rbits
            self.P[i] = vt.P
            self.touch[i] = vdb.fetch_touch(vt)
            if self.touch[i] == VK.TOUCH_TICK:
                self.tick_tables.append((i, vt))
            self.vdb_tables.append((arr.index, arr.keys, arr.values, arr.meta, vt.seq, vt.clock))
        self.cached = np.flatnonzero(self.has_cache)
        self.cached_objs = [c for c in self.held if c is not None]
        self.locks = [tables[i].cache_lock for i in self.cached]
        self.admitting = [(i, t.admission) for i, t in enumerate(tables) if t.admission]
        # L1 fills the kernel may do itself: fp32 rows and no admission filter (and, checked
        # per call, no recent online update of the table)
        self.fill_ok = np.array(
            [bool(h) and k == KIND_F32 and t.admission is None
             for h, k, t in zip(self.has_cache, self.kind, tables, strict=True)], np.bool_
        )  # fmt: skip
        self.fill_ok_tables = [(i, tables[i].recent) for i in np.flatnonzero(self.fill_ok)]


def _vdb_stand_in(vts: list) -> tuple:
    """Arrays for a table the VDB lacks, typed as the real ones (read-only where they are, as
    in a reader's mapping of shared memory), so that one typed list holds them all."""
    real = next(((vt.arr.index, vt.arr.keys, vt.arr.values, vt.arr.meta, vt.seq, vt.clock)
                 for vt in vts if vt is not None), None)  # fmt: skip
    shapes = ((1,), (1,), (1, 1), (1,), (1,), (2,))
    dtypes = (np.uint32, np.int64, np.float32, np.uint32, np.uint64, np.uint64)
    out = []
    for j, (shape, dt) in enumerate(zip(shapes, dtypes, strict=True)):
        a = np.zeros(shape, real[j].dtype if real is not None else dt)  # fp16 rows: uint16
        if real is not None and not real[j].flags.writeable:
            a.setflags(write=False)
        out.append(a)
    return tuple(out)


class FusedLookup:
    """The fused path of one session (CPU host caches over a HashMapVDB)."""

    def __init__(self, session: LookupSession):
        self.session = session
        self._layout: _Layout | None = None
        self.pending = np.zeros((len(session.tables), _FIELDS), np.int64)
        self.pending_seconds = np.zeros(len(session.tables))
        self._lock = threading.Lock()  # guards pending against a concurrent fold
        for t in session.tables:
            t.fold = self.fold

    def worth(self, n: np.ndarray) -> bool:
        """Whether a request of n[t] keys per table is faster fused: many tables, or too few
        keys per table for the per-table kernels to use several threads."""
        return len(n) >= 2 * numba.get_num_threads() or int(n.max()) < PARALLEL_MIN_KEYS

    # -- layout ---------------------------------------------------------------------------------
    def layout(self) -> _Layout | None:
        """The kernel's view of the tables now, None where they cannot be served fused. Rebuilt
        when a table's cache object or the VDB's tables (``generation``) changed."""
        s = self.session
        vdb = s.vdb
        ident = (getattr(vdb, "generation", None), *[id(t.cache) for t in s.tables])
        lay = self._layout
        if lay is None or lay.ident != ident:
            lay = self._layout = _Layout(s, ident)
        return lay if lay.eligible else None

    # -- lookup ---------------------------------------------------------------------------------
    def run(
        self,
        kflat: np.ndarray,
        kbase: np.ndarray,
        kstride: np.ndarray,
        n: np.ndarray,
        out: np.ndarray,
        obase: np.ndarray,
        ostride: np.ndarray,
    ) -> np.ndarray | None:
        """Table t's keys kflat[kbase[t] + i * kstride[t]], i < n[t], into out (float32, flat)
        from obase[t] with ostride[t] per key. Returns the call's counters per table (see
        ``stats``); None (nothing done) where not eligible."""
        lay = self.layout()
        if lay is None:
            return None
        s = self.session
        tables = s.tables
        T = len(tables)
        t0 = time.perf_counter()
        now = time.monotonic()
        epochs = [t.recent.epoch for t in tables]  # updates after these: no fill from this call
        koff = np.zeros(T + 1, np.int64)
        np.cumsum(n, out=koff[1:])
        N = int(koff[-1])
        uniq, first, inverse = (np.empty(N, np.int64) for _ in range(3))
        status = np.empty(N, np.int8)
        delta = np.zeros((T, _FIELDS), np.int64)
        flags = np.zeros(T, np.int8)
        for i, admission in lay.admitting:
            admission.record(table_keys(kflat, kbase, kstride, n, i))
        vtick = np.zeros(T, np.int64)
        for i, vt in lay.tick_tables:
            vtick[i] = HashMapVDB.next_tick(vt)
        lut = shm.lut_for(lay.vdb_dtype)
        with _caches_held(lay, epochs, now) as (clocks, fill_ok):
            kernel = FK.lookup_tables if N >= PARALLEL_MIN_KEYS else FK.lookup_tables_serial
            kernel(
                kflat, kbase, kstride, n, out, obase, ostride, lay.dims,
                lay.caches, lay.has_cache, lay.lfu, lay.kind, clocks, fill_ok, s.hit_rate_threshold,
                lay.vdb_tables, lay.has_vdb, lay.icap, lay.pcap, lay.rbits, lay.P, lay.touch, vtick,
                lut, koff, uniq, first, inverse, status, delta, flags,
            )  # fmt: skip
        todo = np.flatnonzero(flags & FK.FINISH).tolist()
        reread = [i for i in todo if flags[i] & FK.DIRTY or not lay.has_vdb[i]]
        fetched = self._fetch_many(reread, koff, delta, uniq, status) if reread else {}
        done = self._finish_fetched(lay, fetched, koff, n, out, obase, ostride, uniq, inverse,
                                    status, delta, flags, epochs, now)  # fmt: skip
        for i in todo:
            if i in done:
                continue
            lo, m = int(koff[i]), int(delta[i, _UNIQ])
            view = np.ndarray(  # table i's output rows, strided
                (int(n[i]), int(lay.dims[i])), np.float32, out, int(obase[i]) * 4,
                (int(ostride[i]) * 4, 4),
            )  # fmt: skip
            self._finish_table(
                tables[i], uniq[lo : lo + m], first[lo : lo + m], inverse[lo : lo + n[i]],
                status[lo : lo + m], view, i in reread,
                fetched[i][1:3] if i in fetched else None, (epochs[i], now), delta[i],
            )  # fmt: skip
        self.add_pending(delta, time.perf_counter() - t0)
        return delta

    def add_pending(self, delta: np.ndarray, seconds: float) -> None:
        """A call's counters (``run``'s, or the device-resident path's) and its seconds, shared
        by the tables, until ``fold`` moves them into the tables' LookupStats."""
        with self._lock:
            self.pending += delta
            self.pending_seconds += seconds / max(len(delta), 1)

    def add_tier_stats(self, t: TableRuntime, st: LookupStats) -> None:
        """Failed tier reads and the seconds per level below L1 of one table's lookup."""
        if st.errors["vdb"] or st.errors["pdb"] or any(st.seconds.values()):
            with self._lock:
                t._stats.add(LookupStats(errors=st.errors, seconds=st.seconds))

    @staticmethod
    def stats(delta: np.ndarray) -> list[LookupStats]:
        """One LookupStats per table from the counters ``run`` returned."""
        out = []
        for row in delta.tolist():
            st = LookupStats(requests=row[_REQ], keys=row[_KEYS], unique_keys=row[_UNIQ])
            st.hits = {level: row[col] for level, col in _HIT.items()}
            out.append(st)
        return out

    def _fetch_many(self, reread: list[int], koff, delta, uniq, status) -> dict[int, tuple]:
        """The VDB rows of the MISSING keys of tables ``reread``, in one ``fetch_many`` where
        the VDB has it (Redis: one round trip for all tables): {table: (keys, rows, found,
        flat, start)}, the rows of all tables in one buffer ``flat``, table's from ``start``;
        {} otherwise or on a failure, and then each table reads its own through
        ``LookupSession.from_tiers``."""
        s = self.session
        if s.vdb is None or not hasattr(s.vdb, "fetch_many"):
            return {}
        keys = []
        for i in reread:
            lo, m = int(koff[i]), int(delta[i, _UNIQ])
            keys.append(uniq[lo : lo + m][status[lo : lo + m] == FK.MISSING])
        sizes = [len(k) * s.tables[i].dim for i, k in zip(reread, keys, strict=True)]
        flat = np.empty(sum(sizes), np.float32)
        outs, at = [], 0
        for i, k, size in zip(reread, keys, sizes, strict=True):
            outs.append(flat[at : at + size].reshape(len(k), s.tables[i].dim))
            at += size
        try:
            got = s.vdb.fetch_many(
                [(s.tables[i].store_name, k, o) for i, k, o in zip(reread, keys, outs, strict=True)]
            )
        except StorageError:  # e.g. a table's metadata unreadable: per table, counted there
            return {}
        starts = np.cumsum([0, *sizes[:-1]])
        return {
            i: (k, rows, found, flat, int(start))
            for i, k, (rows, found), start in zip(reread, keys, got, starts, strict=True)
        }

    def _finish_fetched(
        self, lay, fetched, koff, n, out, obase, ostride, uniq, inverse, status, delta, flags,
        epochs, now,
    ) -> set[int]:  # fmt: skip
        """Finish in one kernel call the tables whose missing keys the VDB read found all of
        (``FK.finish_fetched``), then hand the fills the kernel did not do (admission,
        background, fp16 L1) to the session. Returns those tables."""
        quick = [i for i, f in fetched.items() if f[2].all()]
        if not quick:
            return set()
        s = self.session
        tables = s.tables
        frows = fetched[quick[0]][3]
        roff = np.zeros(len(tables), np.int64)
        for i in quick:
            roff[i] = fetched[i][4]
        # the fills change the caches: under their locks, as any insert
        with _caches_held(lay, epochs, now) as (clocks, fill_ok):
            FK.finish_fetched(
                np.array(quick, np.int64), koff, n, out, obase, ostride, lay.dims, uniq, inverse,
                status, delta, flags, lay.caches, lay.lfu, clocks, fill_ok, s.hit_rate_threshold,
                frows, roff,
            )  # fmt: skip
        for i in quick:
            t = tables[i]
            if t.cache is not None and not flags[i] & FK.FILLED and len(fetched[i][0]):
                st = LookupStats(unique_keys=int(delta[i, _UNIQ]))
                st.hits["l1"] = int(delta[i, _HIT["l1"]])
                s.fill(t, fetched[i][0], fetched[i][1], st, (epochs[i], now))
        return set(quick)

    def _finish_table(
        self,
        t: TableRuntime,
        uniq: np.ndarray,
        first: np.ndarray,
        inverse: np.ndarray,
        status: np.ndarray,
        out: np.ndarray,
        reread_vdb: bool,
        fetched: tuple[np.ndarray, np.ndarray] | None,
        since: tuple[int, float],
        delta: np.ndarray,
    ) -> None:
        """Keys the kernel left MISSING (the VDB again where ``reread_vdb``, its rows already
        ``fetched`` for some VDBs; the PDB; the default) and the L1 fill."""
        s = self.session
        st = LookupStats(unique_keys=len(uniq))
        st.hits["l1"] = int(delta[_HIT["l1"]])
        vec = out[first]  # each unique key's row (a copy; MISSING ones are set below)
        miss = np.flatnonzero(status == FK.MISSING)
        if len(miss):
            left = miss
            if fetched is not None:  # the VDB's rows of uniq[miss], read with other tables'
                rows, found = fetched
                vec[miss[found]] = rows[found]
                st.hits["vdb"] = int(found.sum())
                left = miss[~found]
            vdb_tier = (("vdb", s.vdb),) if reread_vdb and fetched is None else ()
            left = s.from_tiers(t, uniq, vec, left, st, (*vdb_tier, ("pdb", s.pdb)))
            vec[left] = t.default_value
            st.hits["default"] = len(left)
            occ = np.flatnonzero(status[inverse] == FK.MISSING)
            out[occ] = vec[inverse[occ]]
            for level in ("vdb", "pdb", "default"):
                delta[_HIT[level]] += st.hits[level]
            status = status.copy()
            status[miss] = FK.VDB  # found below the kernel: filled like the VDB's rows
            status[left] = FK.MISSING  # default vectors are not cached
        fill = np.flatnonzero(status == FK.VDB)  # ascending, as a per-table lookup fills
        s.fill(t, uniq[fill], vec[fill], st, since)
        self.add_tier_stats(t, st)

    def fold(self) -> None:
        """Move the pending counters into each table's LookupStats."""
        with self._lock:
            if not self.pending[:, _REQ].any():
                return
            pend, secs = self.pending.copy(), self.pending_seconds.copy()
            self.pending[:] = 0
            self.pending_seconds[:] = 0
        for t, row, sec in zip(self.session.tables, pend.tolist(), secs.tolist(), strict=True):
            st = t._stats
            st.requests += row[_REQ]
            st.keys += row[_KEYS]
            st.unique_keys += row[_UNIQ]
            for level, col in _HIT.items():
                st.hits[level] += row[col]
            st.seconds["fused"] = st.seconds.get("fused", 0.0) + sec
            st.seconds["total"] += sec


@contextmanager
def _caches_held(lay: _Layout, epochs: list[int], now: float):
    """Hold every cache's lock (in table order; every other holder takes one at a time) and
    yield (clocks, fill_ok) for a kernel: the caches' clocks, written back afterwards, and
    where the kernel may fill L1 itself (not where an online update is recent: checked under
    the locks, which updates take to record themselves)."""
    fill_ok = lay.fill_ok.copy()
    clocks = np.zeros(len(lay.dims), np.int64)
    for lk in lay.locks:
        lk.acquire()
    try:
        clocks[lay.cached] = [c.clock for c in lay.cached_objs]
        for i, recent in lay.fill_ok_tables:
            if recent._log and not recent.quiet(epochs[i], now):
                fill_ok[i] = False
        yield clocks, fill_ok
        for c, clock in zip(lay.cached_objs, clocks[lay.cached].tolist(), strict=True):
            c.clock = clock
    finally:
        for lk in reversed(lay.locks):
            lk.release()
