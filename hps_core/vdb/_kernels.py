"""numba kernels of the partitioned hash map (host VDB). Plain arrays in, no Python objects.

Layout per table (P partitions, each with ``pcap`` pool rows and ``icap`` index slots):
``index`` int32 [P*icap]: local row + 1, 0 = empty (linear probing, backward-shift deletion);
``tags`` uint8 [P*icap]: low hash byte of the slot's key, checked before touching the pool;
``keys`` int64 [P*pcap], ``values`` [P*pcap, dim] (float32, or fp16 bits as uint16: numba has no
float16 on the CPU), ``meta`` uint32 [P*pcap] or [0];
``count`` int64 [P]: rows used in each partition's pool (rows are dense: deletion swap-removes).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
C1 = np.uint64(0xBF58476D1CE4E5B9)
C2 = np.uint64(0x94D049BB133111EB)
M32 = np.uint64(0xFFFFFFFF)

TOUCH_NONE, TOUCH_COUNT, TOUCH_TICK = 0, 1, 2
EVICT_RANDOM, EVICT_LEAST_USED, EVICT_OLDEST = 0, 1, 2


@njit(inline="always", cache=True)
def mix(key):
    """splitmix64 finaliser; the same function as hps_core.hashing.splitmix64."""
    z = np.uint64(key) + GOLDEN
    z = (z ^ (z >> np.uint64(30))) * C1
    z = (z ^ (z >> np.uint64(27))) * C2
    return z ^ (z >> np.uint64(31))


@njit(inline="always", cache=True)
def partition_of(h, P):
    return np.int64(((h & M32) * np.uint64(P)) >> np.uint64(32))


@njit(inline="always", cache=True)
def home_slot(h, icap):
    return np.int64(((h >> np.uint64(32)) * np.uint64(icap)) >> np.uint64(32))


@njit(inline="always", cache=True)
def tag_of(h):
    return np.uint8(h & np.uint64(0xFF))


@njit(inline="always", cache=True)
def probe(key, h, p, index, tags, keys, icap, pcap):
    """(slot, local row) of key in partition p; row -1 (and the empty slot) when absent."""
    base = p * icap
    s = home_slot(h, icap)
    t = tag_of(h)
    while True:
        r = index[base + s]
        if r == 0:
            return s, -1
        if tags[base + s] == t and keys[p * pcap + r - 1] == key:
            return s, r - 1
        s += 1
        if s == icap:
            s = 0


@njit(parallel=True, nogil=True, cache=True)
def partitions(keys, P):
    out = np.empty(len(keys), np.int64)
    for i in prange(len(keys)):
        out[i] = partition_of(mix(keys[i]), P)
    return out


def _fetch(keys, sel, index, tags, tkeys, values, meta, icap, pcap, P, out, found, touch, tick):
    """Copy rows of keys[sel] into out[sel] (same dtype as values); set found[sel]; touch meta."""
    dim = values.shape[1]
    for j in prange(len(sel)):
        i = sel[j]
        key = keys[i]
        h = mix(key)
        p = partition_of(h, P)
        _, r = probe(key, h, p, index, tags, tkeys, icap, pcap)
        found[i] = r >= 0
        if r >= 0:
            row = p * pcap + r
            for d in range(dim):
                out[i, d] = values[row, d]
            if touch == TOUCH_COUNT:
                if meta[row] < np.uint32(0xFFFFFFFF):
                    meta[row] += np.uint32(1)
            elif touch == TOUCH_TICK:
                meta[row] = np.uint32(tick)


# Small batches run serially: waking the thread pool costs more than it saves below ~4K keys.
fetch = njit(parallel=True, nogil=True, cache=True)(_fetch)
fetch_serial = njit(nogil=True, cache=True)(_fetch)


@njit(nogil=True, cache=True)
def _delete_row(p, r, index, tags, tkeys, values, meta, count, icap, pcap):
    """Remove local row r of partition p: backward-shift its index slot, swap-remove the row."""
    base = p * icap
    key = tkeys[p * pcap + r]
    h = mix(key)
    i, _ = probe(key, h, p, index, tags, tkeys, icap, pcap)
    j = i
    while True:
        j += 1
        if j == icap:
            j = 0
        rj = index[base + j]
        if rj == 0:
            break
        k = home_slot(mix(tkeys[p * pcap + rj - 1]), icap)
        if (i <= j and i < k <= j) or (i > j and (k > i or k <= j)):
            continue  # entry j is reachable from its home without crossing i
        index[base + i] = rj
        tags[base + i] = tags[base + j]
        i = j
    index[base + i] = 0
    last = count[p] - 1
    if r != last:
        src, dst = p * pcap + last, p * pcap + r
        moved = tkeys[src]
        tkeys[dst] = moved
        values[dst, :] = values[src, :]
        if meta.shape[0]:
            meta[dst] = meta[src]
        s, _ = probe(moved, mix(moved), p, index, tags, tkeys, icap, pcap)
        # probe compared against tkeys[dst] == moved and found the slot still naming 'last'
        index[base + s] = np.int32(r + 1)
    count[p] = last


@njit(nogil=True, cache=True)
def _evict(p, n, policy, tick, index, tags, tkeys, values, meta, count, icap, pcap):
    """Evict n rows of partition p chosen by the policy."""
    c = count[p]
    if n <= 0 or c == 0:
        return 0
    n = min(n, c)
    score = np.empty(c, np.uint64)
    for r in range(c):
        if policy == EVICT_RANDOM:
            score[r] = mix(np.int64(r) ^ np.int64(tick * 7919 + p))
        else:
            score[r] = np.uint64(meta[p * pcap + r])
    victims = np.sort(np.argsort(score, kind="mergesort")[:n])[::-1]  # descending: swap-remove safe
    for v in victims:
        _delete_row(p, v, index, tags, tkeys, values, meta, count, icap, pcap)
    return n


@njit(parallel=True, nogil=True, cache=True)
def upsert(
    keys,
    vals,
    present,
    order,
    starts,
    index,
    tags,
    tkeys,
    values,
    meta,
    count,
    icap,
    pcap,
    P,
    limit,
    target,
    policy,
    tick,
    evicted,
):
    """Insert or overwrite unique keys, grouped by partition (order/starts), evicting by policy.

    Per partition: if the new keys would exceed ``limit`` rows, existing rows are evicted so at
    most max(0, target - new) remain; if there are more new keys than ``limit``, only the last
    ``limit`` of them are inserted.
    """
    for p in prange(P):
        lo, hi = starts[p], starts[p + 1]
        new = 0
        for j in range(lo, hi):
            if not present[order[j]]:
                new += 1
        skip = 0
        if count[p] + new > limit:
            keep = max(0, target - new)
            evicted[p] = _evict(
                p,
                count[p] - keep,
                policy,
                tick,
                index,
                tags,
                tkeys,
                values,
                meta,
                count,
                icap,
                pcap,
            )
            skip = max(0, new - limit)
        for j in range(lo, hi):
            i = order[j]
            key = keys[i]
            h = mix(key)
            s, r = probe(key, h, p, index, tags, tkeys, icap, pcap)
            if r < 0:
                if skip > 0:
                    skip -= 1
                    continue
                if count[p] >= limit:  # a batch key evicted above comes back: make room
                    evicted[p] += _evict(
                        p, 1, policy, tick, index, tags, tkeys, values, meta, count, icap, pcap
                    )
                    s, _ = probe(key, h, p, index, tags, tkeys, icap, pcap)
                r = count[p]
                count[p] = r + 1
                index[p * icap + s] = np.int32(r + 1)
                tags[p * icap + s] = tag_of(h)
                tkeys[p * pcap + r] = key
                if meta.shape[0]:
                    meta[p * pcap + r] = np.uint32(tick) if policy == EVICT_OLDEST else np.uint32(0)
            elif meta.shape[0] and policy == EVICT_OLDEST:
                meta[p * pcap + r] = np.uint32(tick)
            row = p * pcap + r
            for d in range(vals.shape[1]):
                values[row, d] = vals[i, d]


@njit(parallel=True, nogil=True, cache=True)
def erase(keys, order, starts, index, tags, tkeys, values, meta, count, icap, pcap, P, removed):
    for p in prange(P):
        for j in range(starts[p], starts[p + 1]):
            key = keys[order[j]]
            _, r = probe(key, mix(key), p, index, tags, tkeys, icap, pcap)
            if r >= 0:
                _delete_row(p, r, index, tags, tkeys, values, meta, count, icap, pcap)
                removed[p] += 1


@njit(nogil=True, cache=True)
def rehash(index, tags, tkeys, count, icap, pcap, P):
    """Rebuild every partition's index from its pool rows (after a resize)."""
    for p in range(P):
        for r in range(count[p]):
            key = tkeys[p * pcap + r]
            h = mix(key)
            s = home_slot(h, icap)
            while index[p * icap + s] != 0:
                s += 1
                if s == icap:
                    s = 0
            index[p * icap + s] = np.int32(r + 1)
            tags[p * icap + s] = tag_of(h)
