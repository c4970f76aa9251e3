"""The numba kernel of the fused CPU lookup (``fused.py``): every table of a request in one call.

Per table, on one thread (tables run in parallel): dedupe the keys (first appearance order,
as the session does), ``find`` the unique keys in the host L1 cache (``find_serial`` of the
host cache, so stamps and the clock move exactly as in a per-table lookup), fetch the L1
misses from the hash-map VDB (its ``_fetch_chunk``, under the VDB's seqlock check), then copy
each key's row to every place the key occurs in the output. Keys neither level holds are left
to the caller (status MISSING), as is a table whose VDB partitions a writer changed during the
read (``dirty``: its VDB rows are re-read through ``HashMapVDB.fetch``). Where the caller
allows it (``fill_ok``: fp32 L1, no admission filter, no recent online update) and the
table's hit rate is below the threshold, the rows the VDB returned are inserted into L1 here
(``filled``), as the session's synchronous fill would; every other fill is the caller's.

Arrays of all tables travel in two numba typed lists of tuples (the L1's, the VDB's), built
once per layout; a table without a cache or a VDB table gets a stand-in and a False flag.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .cache._host_kernels import find_serial, insert_serial
from .hash_kernels import dedupe_into
from .vdb._kernels import _fetch_chunk, seq_clean

L1, VDB, MISSING = 0, 1, 2  # status of a unique key: where its row came from


@njit(nogil=True, cache=True)
def _one_table(
    t, kflat, kbase, kstride, n, out, obase, ostride, dims,
    caches, has_cache, lfu, kind, clocks, fill_ok, threshold,
    vdb_tables, has_vdb, icap, pcap, rbits, P, touch, vtick,
    koff, uniq, first, inverse, status, ucount, counts, dirty, filled,
):  # fmt: skip
    nt = n[t]
    base = koff[t]
    dim = dims[t]
    keys = kflat[kbase[t] : kbase[t] + nt * kstride[t] : kstride[t]]
    u_keys = uniq[base : base + nt]
    u_first = first[base : base + nt]
    inv = inverse[base : base + nt]
    m = dedupe_into(keys, u_keys, u_first, inv)
    ucount[t] = m
    u_keys = u_keys[:m]
    st = status[base : base + m]
    rows = np.empty((m, dim), np.float32)
    hit = np.zeros(m, np.bool_)
    c_keys, c_occ, c_stamp, c_vals = caches[t]
    if has_cache[t] and m:  # a find advances the cache's clock, as HostCache.find does
        clocks[t] += 1
        find_serial(u_keys, c_keys, c_occ, c_stamp, c_vals, rows.view(np.uint16),
                    rows.view(np.uint32), hit, clocks[t], lfu[t], kind[t], False)  # fmt: skip
    sel = np.flatnonzero(~hit)
    found = np.zeros(m, np.bool_)
    if has_vdb[t] and len(sel):
        index, v_keys, values, meta, seq = vdb_tables[t]
        before = seq.copy()
        _fetch_chunk(0, len(sel), u_keys, sel, index, v_keys, values, meta, touch[t], vtick[t],
                     icap[t], pcap[t], rbits[t], P[t], rows, found, None)  # fmt: skip
        if not seq_clean(before, seq):
            dirty[t] = True
            found[:] = False
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
    counts[t, 0] = l1
    counts[t, 1] = vdb
    if fill_ok[t] and vdb and l1 + vdb == m and l1 < threshold * m:
        # below the hit-rate threshold the session fills L1 before it answers: same keys, same
        # order (ascending unique index) as LookupSession.fill, one clock tick as an insert
        got = np.empty(vdb, np.int64)
        j = 0
        for u in range(m):
            if st[u] == VDB:
                got[j] = u
                j += 1
        clocks[t] += 1
        insert_serial(u_keys[got], rows[got].view(np.uint16), c_keys, c_occ, c_stamp, c_vals,
                      clocks[t], lfu[t])  # fmt: skip
        filled[t] = True
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
    vdb_tables, has_vdb, icap, pcap, rbits, P, touch, vtick,
    koff, uniq, first, inverse, status, ucount, counts, dirty, filled,
):  # fmt: skip
    """Table t's keys are kflat[kbase[t] + i * kstride[t]] for i < n[t]; row i of its output
    starts at out[obase[t] + i * ostride[t]]. Per unique key (table t's at koff[t]): the key,
    its first position, its status; inverse maps each key to its unique index."""
    for t in prange(len(n)):
        _one_table(
            np.int64(t), kflat, kbase, kstride, n, out, obase, ostride, dims,
            caches, has_cache, lfu, kind, clocks, fill_ok, threshold,
            vdb_tables, has_vdb, icap, pcap, rbits, P, touch, vtick,
            koff, uniq, first, inverse, status, ucount, counts, dirty, filled,
        )  # fmt: skip


# Small requests run on the calling thread: waking the thread pool costs more than it saves.
@njit(nogil=True, cache=True)
def lookup_tables_serial(
    kflat, kbase, kstride, n, out, obase, ostride, dims,
    caches, has_cache, lfu, kind, clocks, fill_ok, threshold,
    vdb_tables, has_vdb, icap, pcap, rbits, P, touch, vtick,
    koff, uniq, first, inverse, status, ucount, counts, dirty, filled,
):  # fmt: skip
    """lookup_tables on the calling thread."""
    for t in range(len(n)):
        _one_table(
            t, kflat, kbase, kstride, n, out, obase, ostride, dims,
            caches, has_cache, lfu, kind, clocks, fill_ok, threshold,
            vdb_tables, has_vdb, icap, pcap, rbits, P, touch, vtick,
            koff, uniq, first, inverse, status, ucount, counts, dirty, filled,
        )  # fmt: skip
