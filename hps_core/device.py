"""Device-resident lookup: every table of a request against GPU L1 caches, rows left on the GPU.

A per-table lookup with a GPU L1 pays, for each of a model's tables, a dedupe, a host-to-device
copy, a kernel, a copy back and a synchronisation (26 of each for a Criteo-like model), so the
GPU path ran slower than a CPU hash map (README, End-to-end benchmark). Here one request costs:

1. one numba call that dedupes each table's keys on the host, tables in parallel (first
   appearance order, as a per-table lookup does, so each L1 sees the same unique keys);
2. one host-to-device copy: every table's unique keys and the expansion index together;
3. one ``find`` per table into one device buffer of unique rows and one of hit flags,
   launched back to back on the current stream (``find_into``: no checks, no allocation, no
   synchronisation between tables);
4. one device-to-host copy of all hit flags: the request's only synchronisation when every
   key hits;
5. for the L1 misses of all tables (found with a few array operations, so a table whose keys
   all hit costs no Python): the VDB (one ``fetch_many`` for all tables where the VDB has it,
   e.g. one pipelined round trip to Redis), then the PDB, then the default vector on the host
   (``LookupSession.from_tiers``), one host-to-device copy of their rows, scattered into the
   unique rows, and the L1 fill exactly as a per-table lookup fills (admission filter,
   hit-rate threshold, recent online updates: ``LookupSession.fill``);
6. one gather that expands the unique rows to every key's place (tables of one dim; one per
   table otherwise), and for the ensemble's [batch, tables * dim] layout one transpose.

The result stays on the device (a CuPy array) for the dense model; callers that want host
memory copy it once. The steps are written against an array module ``xp`` (CuPy with GPU
caches), and host caches have the GPU caches' ``find_into(keys, out, hit)``, so the same code
runs over NumPy with host caches: ``tests/test_device_lookup.py``
checks it that way against per-table lookups on machines without a GPU, and
``tests/cache/test_gpu_session.py`` with CuPy on a GPU.

Counters go where the fused CPU path puts them (``FusedLookup.pending``): requests, keys, unique
keys and hits per level, per table, as a per-table lookup counts them.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import numpy as np
from numba import njit, prange

from . import _fused_kernels as FK
from .errors import StorageError
from .hash_kernels import dedupe_into, dedupe_slots_jit
from .lookup_stats import LEVELS, LookupStats

if TYPE_CHECKING:
    from .session import LookupSession

PARALLEL_MIN_KEYS = 4096  # below this a request's dedupe runs on one thread (no pool wake-up)
_HIT = {level: FK.HIT_L1 + i for i, level in enumerate(LEVELS)}
_FIELDS = 3 + len(LEVELS)


def _dedupe_tables(kflat, kbase, kstride, n, koff, uniq, inverse, m):
    """Table t's keys kflat[kbase[t] + i * kstride[t]], i < n[t]: its unique keys (first
    appearance order) into uniq[koff[t]:][:m[t]], and inverse[koff[t] + i] = koff[t] + the
    index of key i among them (an index into uniq of all tables)."""
    for t in prange(len(n)):
        nt = n[t]
        base = koff[t]
        keys = kflat[kbase[t] : kbase[t] + nt * kstride[t] : kstride[t]]
        first = np.empty(nt, np.int64)
        slots = np.empty(dedupe_slots_jit(nt), np.int64)
        inv = inverse[base : base + nt]
        m[t] = dedupe_into(keys, uniq[base : base + nt], first, inv, slots)
        for i in range(nt):
            inv[i] += base


dedupe_tables = njit(parallel=True, nogil=True, cache=True)(_dedupe_tables)
dedupe_tables_serial = njit(nogil=True, cache=True)(_dedupe_tables)


def table_keys(kflat: np.ndarray, kbase, kstride, n, t: int) -> np.ndarray:
    """Table t's keys of a request laid out as kflat[kbase[t] + i * kstride[t]], i < n[t]."""
    return kflat[kbase[t] : kbase[t] + n[t] * kstride[t] : kstride[t]]


def is_gpu_cache(cache) -> bool:
    """Whether an L1 is a ``GPUCache`` (without importing CuPy where none is)."""
    return type(cache).__name__ == "GPUCache" and type(cache).__module__.endswith("cache.gpu")


def to_host(a) -> np.ndarray:
    """A NumPy array of a CuPy or NumPy array (one device-to-host copy for CuPy)."""
    return a if isinstance(a, np.ndarray) else a.get()


class DeviceLookup:
    """The device-resident path of one session.

    Args:
        session: the session whose tables it serves.
        xp: the array module. None: CuPy, and only where every table's L1 is a ``GPUCache``
            or none (at least one), all on one device, and ``HPS_DEVICE_LOOKUP`` is not 0;
            otherwise ``eligible`` is False and the session looks tables up one by one.
            Given (NumPy with host caches, in tests), the path serves any caches with it.
        dedupe: look each table's unique keys up once (True). False, and with CuPy where every
            L1 is a static table: every key as it comes (a static table has no eviction order
            that repeats would change), which saves the host dedupe and the expansion
            gather; the counters then count key occurrences as unique keys.
    """

    def __init__(self, session: LookupSession, xp=None, dedupe: bool = True):
        self.session = session
        self._xp = xp
        self._dedupe_given = dedupe
        self._dedupe = dedupe
        self._ident: tuple | None = None
        self._module = None
        self._device: int | None = None  # the caches' CUDA device (CuPy only)
        self._host_empty = np.empty  # host staging arrays

    def module(self):
        """The array module the path runs with now, or None where it cannot serve the tables
        (checked again when a table's cache object changes)."""
        caches = [t.cache for t in self.session.tables]
        ident = tuple(map(id, caches))
        if ident != self._ident:
            self._ident, self._module = ident, self._pick(caches)
        return self._module

    def _pick(self, caches: list):
        self._device = None
        self._host_empty = np.empty
        self._dedupe = self._dedupe_given
        if self._xp is not None:
            return self._xp
        if os.environ.get("HPS_DEVICE_LOOKUP", "1") == "0":  # per-table lookups instead
            return None
        gpu = [c for c in caches if c is not None]
        if not gpu or not all(is_gpu_cache(c) and c.output_dtype == "float32" for c in gpu):
            return None
        if len({c.device for c in gpu}) != 1:
            return None
        self._device = gpu[0].device
        # Static tables (no eviction, nothing to learn from repeats) take every key as it
        # comes: no host dedupe, no expansion gather.
        self._dedupe = self._dedupe_given and not all(c.static for c in gpu)
        import cupyx  # ships with CuPy

        # Page-locked staging for the keys: the copy runs at the bus's speed (pageable memory
        # goes through a driver bounce buffer). The pinned pool recycles the buffers: CuPy
        # records an event after each asynchronous copy from one and hands it out again only
        # once that event passed (each request also synchronises at the hit flags' copy back).
        self._host_empty = cupyx.empty_pinned
        return gpu[0]._cp

    @property
    def eligible(self) -> bool:
        return self.module() is not None

    def run(
        self, kflat: np.ndarray, kbase: np.ndarray, kstride: np.ndarray, n: np.ndarray,
        columns: bool,
    ):  # fmt: skip
        """Table t's keys kflat[kbase[t] + i * kstride[t]], i < n[t] -> rows on the device:
        ``columns`` False: float32 [sum(n * dims)], the tables' rows one after another (the
        HPS backend's OUTPUT0); True (every n[t] the batch B): float32 [B, sum(dims)], sample
        b's row of table t at columns t's offset (the ensemble's layout). Returns (rows,
        counters [tables, fields] as ``FusedLookup.stats`` reads them)."""
        xp = self.module()
        if self._device is None:
            return self._run(xp, kflat, kbase, kstride, n, columns)
        with xp.cuda.Device(self._device):  # the caches' device current: arrays go there
            return self._run(xp, kflat, kbase, kstride, n, columns)

    def _run(self, xp, kflat, kbase, kstride, n, columns: bool):
        s = self.session
        tables = s.tables
        T = len(tables)
        t0 = time.perf_counter()
        now = time.monotonic()
        since = [(t.recent.epoch, now) for t in tables]  # no fill older than a later update
        n = np.asarray(n, np.int64)
        koff = np.zeros(T + 1, np.int64)
        np.cumsum(n, out=koff[1:])
        N = int(koff[-1])
        for i, t in enumerate(tables):
            if t.admission is not None:
                t.admission.record(table_keys(kflat, kbase, kstride, n, i))
        B = int(n[0]) if T else 0
        if self._dedupe:
            # unique keys, then the expansion index: one copy (from page-locked memory on a GPU)
            packed = self._host_empty(2 * N, np.int64)
            uniq = packed[:N]
            m = np.zeros(T, np.int64)
            dedupe = dedupe_tables if N >= PARALLEL_MIN_KEYS else dedupe_tables_serial
            dedupe(kflat, kbase, kstride, n, koff, uniq, packed[N:], m)
            d_packed = xp.asarray(packed)
            d_uniq, d_inv = d_packed[:N], d_packed[N:]
        else:  # every key as it comes, table after table: [B, T] keys transposed on the device
            m, d_inv = n, None
            if (kstride == T).all() and (kbase == np.arange(T)).all():  # [B, T] row by row
                d_uniq = xp.ascontiguousarray(xp.asarray(kflat).reshape(B, T).T).reshape(-1)
            elif (kstride == 1).all() and (kbase == koff[:-1]).all():  # already table-major
                d_uniq = xp.asarray(kflat)
            else:
                d_uniq = xp.asarray(
                    np.concatenate([table_keys(kflat, kbase, kstride, n, i) for i in range(T)])
                )

        dims = s.dims
        one_dim = bool((dims == dims[0]).all()) if T else True
        voff = np.zeros(T + 1, np.int64)  # table t's unique rows from voff[t] (room for n[t])
        np.cumsum(n * dims, out=voff[1:])
        d_vec = xp.empty(int(voff[-1]), np.float32)
        # Python ints from here: a request of one sample should cost little Python per table
        koff_l, m_l, voff_l, dims_l = koff.tolist(), m.tolist(), voff.tolist(), dims.tolist()
        views = [
            d_vec[v : v + mi * d].reshape(mi, d)
            for v, mi, d in zip(voff_l[:-1], m_l, dims_l, strict=True)
        ]
        d_hit = xp.zeros(N, np.bool_)  # a table without L1 hits nothing
        for t, lo, mi, view in zip(tables, koff_l[:-1], m_l, views, strict=True):
            if mi and t.cache is not None:
                with t.cache_lock:
                    t.cache.find_into(d_uniq[lo : lo + mi], view, d_hit[lo : lo + mi])
        hit = to_host(d_hit)

        delta = np.zeros((T, _FIELDS), np.int64)
        delta[:, FK.REQ], delta[:, FK.KEYS], delta[:, FK.UNIQ] = 1, n, m
        # the misses of all tables at once: unique positions that missed, by table
        pos = np.flatnonzero(~hit)
        tab = np.searchsorted(koff, pos, side="right") - 1
        keep = pos - koff[tab] < m[tab]  # not the unused room after a table's unique keys
        pos, tab = pos[keep], tab[keep]
        if len(pos):
            bounds = np.searchsorted(tab, np.arange(T + 1))
            delta[:, _HIT["l1"]] = m - np.diff(bounds)
            todo = np.flatnonzero(np.diff(bounds)).tolist()
        else:  # every key hit
            delta[:, _HIT["l1"]] = m
            todo = []
        work = {}  # table -> (its misses' unique index, keys, rows, stats)
        for i in todo:
            miss = pos[bounds[i] : bounds[i + 1]] - koff[i]
            st = LookupStats(unique_keys=int(m[i]))
            st.hits["l1"] = int(delta[i, _HIT["l1"]])
            vec = np.empty((len(miss), tables[i].dim), np.float32)
            keys = (
                uniq[koff[i] : koff[i] + m[i]]
                if self._dedupe
                else table_keys(kflat, kbase, kstride, n, i)
            )[miss]
            work[i] = (miss, keys, vec, st)
        fetched = self._fetch_many(work)
        dst, rows = [], []  # device positions (elements of d_vec) and rows of the misses
        for i, (miss, keys, vec, st) in work.items():
            t = tables[i]
            tiers = (("pdb", s.pdb),) if i in fetched else (("vdb", s.vdb), ("pdb", s.pdb))
            todo_i = fetched.get(i, np.arange(len(miss)))
            left = s.from_tiers(t, keys, vec, todo_i, st, tiers)
            vec[left] = t.default_value
            st.hits["default"] = len(left)
            for level in ("vdb", "pdb", "default"):
                delta[i, _HIT[level]] = st.hits[level]
            found = np.ones(len(miss), np.bool_)
            found[left] = False  # default vectors are not cached
            s.fill(t, keys[found], vec[found], st, since[i])
            d = int(dims[i])
            dst.append((voff[i] + miss * d)[:, None] + np.arange(d))
            rows.append(vec)
            s.fused.add_tier_stats(t, st)
        if dst:
            d_vec[xp.asarray(np.concatenate([x.ravel() for x in dst]))] = xp.asarray(
                np.concatenate([r.ravel() for r in rows])
            )

        width = int(dims.sum())
        if one_dim and T:  # one gather for all tables: unique row j of table t is row j there
            d = int(dims[0])
            out = d_vec.reshape(-1, d)  # [N, d], table after table
            if d_inv is not None:
                out = xp.take(out, d_inv, axis=0)
            if columns:
                out = xp.ascontiguousarray(out.reshape(T, B, d).transpose(1, 0, 2))
                out = out.reshape(B, width)
            else:
                out = out.reshape(-1)
        elif d_inv is None:  # every key's row is in place already
            out = d_vec
            if columns:
                out = xp.empty((B, width), np.float32)
                for i, col in enumerate(s._cols.tolist()):
                    out[:, col : col + int(dims[i])] = views[i]
        elif columns:
            out = xp.empty((B, width), np.float32)
            for i, col in enumerate(s._cols.tolist()):
                inv = d_inv[koff[i] : koff[i + 1]] - int(koff[i])
                out[:, col : col + int(dims[i])] = xp.take(views[i], inv, axis=0)
        else:
            out = xp.empty(int(voff[-1]), np.float32)
            for i in range(T):
                inv = d_inv[koff[i] : koff[i + 1]] - int(koff[i])
                part = out[voff[i] : voff[i + 1]].reshape(int(n[i]), int(dims[i]))
                part[...] = xp.take(views[i], inv, axis=0)
        s.fused.add_pending(delta, time.perf_counter() - t0)
        return out, delta

    def _fetch_many(self, work: dict) -> dict[int, np.ndarray]:
        """The VDB rows of every table's misses in one ``fetch_many`` where the VDB has it
        (Redis: one pipelined round trip for all tables instead of one per table), into each
        table's rows; {table: the indices of its misses the VDB lacks}. {} where the VDB has
        no ``fetch_many``, for a single table, or on a failure: each table then reads the VDB
        through ``LookupSession.from_tiers`` (which counts a failure)."""
        s = self.session
        if len(work) < 2 or s.vdb is None or not hasattr(s.vdb, "fetch_many"):
            return {}
        t0 = time.perf_counter()
        reqs = [(s.tables[i].store_name, keys, vec) for i, (_, keys, vec, _) in work.items()]
        try:
            got = s.vdb.fetch_many(reqs)
        except StorageError:
            return {}
        share = (time.perf_counter() - t0) / len(work)
        out = {}
        for (i, (_, _, vec, st)), (rows, found) in zip(work.items(), got, strict=True):
            if rows is not vec:
                vec[found] = rows[found]
            st.hits["vdb"] += int(found.sum())
            st.seconds["vdb"] += share
            out[i] = np.flatnonzero(~found)
        return out
