"""The numba kernel of the fused CPU lookup (``fused.py``): every table of a request in one call.

Per table, on one thread (tables run in parallel): dedupe the keys (first appearance order,
as the session does), ``find`` the unique keys in the host L1 cache (``find_serial`` of the
host cache, so stamps and the clock move exactly as in a per-table lookup), fetch the L1
misses from the hash-map VDB (its ``_fetch_chunk``, under the VDB's seqlock check), then copy
each key's row to every place the key occurs in the output. Keys neither level holds are left
to the caller (status MISSING), as is a table whose VDB partitions a writer changed during the
read or dropped (flag DIRTY: its rows are re-read through ``HashMapVDB.fetch``). Where the caller
allows it (``fill_ok``: fp32 L1, no admission filter, no recent online update) and the
table's hit rate is below the threshold, the rows the VDB returned are inserted into L1 here
(flag FILLED), as the session's synchronous fill would; every other fill is the caller's
(flag FINISH).

Arrays of all tables travel in two numba typed lists of tuples (the L1's, the VDB's), built
once per layout; a table without a cache or a VDB table gets a stand-in and a False flag.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .cache._host_kernels import find_serial, insert_serial
from .hash_kernels import dedupe_into, dedupe_slots_jit
from .vdb._kernels import _fetch_chunk, seq_clean

L1, VDB, MISSING = 0, 1, 2  # status of a unique key: where its row came from
# Columns of the per-table counters (fused.py): requests, keys, unique keys, hits per level
REQ, KEYS, UNIQ, HIT_L1, HIT_VDB = 0, 1, 2, 3, 4
# flags per table: the VDB read overlapped a write; the kernel filled L1; the caller has work
DIRTY, FILLED, FINISH = 1, 2, 4


@njit(inline="always", cache=True)
def _scratch(n, dim):
    """Per-table work arrays for up to n keys of dim floats."""
    return (np.empty(n * dim, np.float32), np.empty(n, np.bool_), np.empty(n, np.bool_),
            np.empty(n, np.int64), np.empty(dedupe_slots_jit(n), np.int64))  # fmt: skip


@njit(inline="always", cache=True)
def _fills_now(ok, l1, found, m, threshold):
    """Whether the kernel fills L1 with the ``found`` rows read below it: allowed (``ok``)
    and below the hit-rate threshold, where the session fills before it answers."""
    return ok and found > 0 and l1 < threshold * m


@njit(inline="always", cache=True)
def _fill(t, keys, rows, caches, lfu, clocks, flags):
    """Insert fp32 rows into table t's L1 as the session's synchronous fill does: the keys in
    ascending unique index, one clock tick as HostCache.insert."""
    c_keys, c_occ, c_stamp, c_vals = caches[t]
    clocks[t] += 1
    insert_serial(keys, rows.view(np.uint16), c_keys, c_occ, c_stamp, c_vals, clocks[t], lfu[t])
    flags[t] |= FILLED


@njit(nogil=True, cache=True)
def _one_table(
    t, kflat, kbase, kstride, n, out, obase, ostride, dims,
    caches, has_cache, lfu, kind, clocks, fill_ok, threshold,
    vdb_tables, has_vdb, icap, pcap, rbits, P, touch, vtick, lut,
    koff, uniq, first, inverse, status, delta, flags, scratch,
):  # fmt: skip
    nt = n[t]
    base = koff[t]
    dim = dims[t]
    rows_buf, hit, found, sel, slots = scratch
    keys = kflat[kbase[t] : kbase[t] + nt * kstride[t] : kstride[t]]
    u_keys = uniq[base : base + nt]
    inv = inverse[base : base + nt]
    m = dedupe_into(keys, u_keys, first[base : base + nt], inv, slots)
    u_keys = u_keys[:m]
    st = status[base : base + m]
    rows = rows_buf[: m * dim].reshape((m, dim))
    hit[:m] = False
    found[:m] = False
    c_keys, c_occ, c_stamp, c_vals = caches[t]
    if has_cache[t] and m:  # a find advances the cache's clock, as HostCache.find does
        clocks[t] += 1
        find_serial(u_keys, c_keys, c_occ, c_stamp, c_vals, rows.view(np.uint16),
                    rows.view(np.uint32), hit[:m], clocks[t], lfu[t], kind[t], False)  # fmt: skip
    ms = 0
    for u in range(m):
        if not hit[u]:
            sel[ms] = u
            ms += 1
    if has_vdb[t] and ms:
        index, v_keys, values, meta, seq, clock = vdb_tables[t]
        before = seq.copy()
        _fetch_chunk(0, ms, u_keys, sel[:ms], index, v_keys, values, meta, touch[t], vtick[t],
                     icap[t], pcap[t], rbits[t], P[t], rows, found[:m], lut, False)  # fmt: skip
        if clock[1] != 0 or not seq_clean(before, seq):  # dropped, or a write overlapped
            flags[t] |= DIRTY
            found[:m] = False
    l1 = 0
    vdb = 0
    for u in range(m):
        if hit[u]:
            st[u] = L1
            l1 += 1
        elif found[u]:
            st[u] = VDB
            vdb += 1
        else:
            st[u] = MISSING
    delta[t, REQ] = 1
    delta[t, KEYS] = nt
    delta[t, UNIQ] = m
    delta[t, HIT_L1] = l1
    delta[t, HIT_VDB] = vdb
    if l1 + vdb == m and _fills_now(fill_ok[t], l1, vdb, m, threshold):
        j = 0
        for u in range(m):
            if st[u] == VDB:
                sel[j] = u
                j += 1
        _fill(t, u_keys[sel[:j]], rows[sel[:j]], caches, lfu, clocks, flags)
    elif l1 < m and (has_cache[t] or l1 + vdb < m):
        flags[t] |= FINISH
    o0 = obase[t]
    stride = ostride[t]
    for i in range(nt):
        u = inv[i]
        if st[u] != MISSING:
            o = o0 + i * stride
            for d in range(dim):
                out[o + d] = rows[u, d]


@njit(parallel=True, nogil=True, cache=True)
def lookup_tables(
    kflat, kbase, kstride, n, out, obase, ostride, dims,
    caches, has_cache, lfu, kind, clocks, fill_ok, threshold,
    vdb_tables, has_vdb, icap, pcap, rbits, P, touch, vtick, lut,
    koff, uniq, first, inverse, status, delta, flags,
):  # fmt: skip
    """Table t's keys are kflat[kbase[t] + i * kstride[t]] for i < n[t]; row i of its output
    starts at out[obase[t] + i * ostride[t]]. Per unique key (table t's at koff[t]): the key,
    its first position, its status; inverse maps each key to its unique index. Per table:
    counters (``delta``) and ``flags``. ``lut``: fp16 VDB rows are decoded through it (None:
    fp32 rows, or fp16 ones the CPU converts natively)."""
    for t in prange(len(n)):
        _one_table(
            np.int64(t), kflat, kbase, kstride, n, out, obase, ostride, dims,
            caches, has_cache, lfu, kind, clocks, fill_ok, threshold,
            vdb_tables, has_vdb, icap, pcap, rbits, P, touch, vtick, lut,
            koff, uniq, first, inverse, status, delta, flags, _scratch(n[t], dims[t]),
        )  # fmt: skip


# Small requests run on the calling thread (waking the thread pool costs more than it saves),
# with one set of work arrays for all tables.
@njit(nogil=True, cache=True)
def lookup_tables_serial(
    kflat, kbase, kstride, n, out, obase, ostride, dims,
    caches, has_cache, lfu, kind, clocks, fill_ok, threshold,
    vdb_tables, has_vdb, icap, pcap, rbits, P, touch, vtick, lut,
    koff, uniq, first, inverse, status, delta, flags,
):  # fmt: skip
    """lookup_tables on the calling thread."""
    scratch = _scratch(n.max(), dims.max())
    for t in range(len(n)):
        _one_table(
            t, kflat, kbase, kstride, n, out, obase, ostride, dims,
            caches, has_cache, lfu, kind, clocks, fill_ok, threshold,
            vdb_tables, has_vdb, icap, pcap, rbits, P, touch, vtick, lut,
            koff, uniq, first, inverse, status, delta, flags, scratch,
        )  # fmt: skip


@njit(nogil=True, cache=True)
def finish_fetched(
    tables, koff, n, out, obase, ostride, dims, uniq, inverse, status, delta, flags,
    caches, lfu, clocks, fill_ok, threshold, frows, roff,
):  # fmt: skip
    """For each table of ``tables``, whose MISSING keys a VDB read after the kernel found all
    of (rows in frows from roff[t], ascending unique index): mark them VDB, count them, write
    their rows to every place they occur, and fill L1 below the hit-rate threshold where
    ``fill_ok`` (the same keys, order and clock tick as the session's synchronous fill)."""
    for t in tables:
        base = koff[t]
        m = delta[t, UNIQ]
        dim = dims[t]
        st = status[base : base + m]
        pos = np.full(m, -1, np.int64)
        k = 0
        for u in range(m):
            if st[u] == MISSING:
                pos[u] = k
                st[u] = VDB
                k += 1
        delta[t, HIT_VDB] += k
        rows = frows[roff[t] : roff[t] + k * dim].reshape((k, dim))
        o0 = obase[t]
        inv = inverse[base : base + n[t]]
        for i in range(n[t]):
            j = pos[inv[i]]
            if j >= 0:
                o = o0 + i * ostride[t]
                for d in range(dim):
                    out[o + d] = rows[j, d]
        if _fills_now(fill_ok[t], delta[t, HIT_L1], k, m, threshold):
            got = np.empty(k, np.int64)
            for u in range(m):
                if pos[u] >= 0:
                    got[pos[u]] = uniq[base + u]
            _fill(t, got, rows, caches, lfu, clocks, flags)
