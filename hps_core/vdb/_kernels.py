"""numba kernels of the partitioned hash map (host VDB). Plain arrays in, no Python objects.

Layout of a table with P partitions, each owning ``icap`` index slots and ``pcap`` pool rows:

- ``index`` uint32 [P*icap]: ``tag << rbits | (local pool row + 1)``, 0 = empty (linear
  probing, backward-shift deletion, no tombstones, so every key value is legal: there is no
  sentinel key). ``rbits`` = pcap.bit_length() bits hold the row; the other ``32 - rbits``
  bits hold a tag from the key's hash, checked before touching the pool, so a probe costs one
  pool access (the match) instead of one per slot it passes;
- ``keys`` int64 [P*pcap], ``values`` [P*pcap, dim] (float32, or fp16 / bf16 *bits* as
  uint16: numba has no 16-bit float type). Fetch converts fp16 with the CPU's instruction (x86
  F16C, AArch64) through an LLVM ``fpext``, or, where LLVM would need a runtime helper numba
  cannot link, through a 65536-entry table (``lut``); bf16 by a 16-bit shift (``lut`` is then
  the ``shm.BF16`` marker). Kernels that only move rows take ``values`` viewed as uint16
  whatever the dtype, so they compile once;
- ``meta`` uint32 [P*pcap] (access count or last-touched tick), empty for ``evict_random``;
- ``count`` int64 [P]: rows used in each pool (pools are dense: deletion swap-removes).

Hash bits: the partition comes from the low 32 bits of splitmix64(key), the home slot from the
high 32 bits (multiply-shift, so capacities need not be powers of two), the tag from the
lowest bits. Fetch's ``lut`` is None for fp32 and natively converted fp16; numba prunes the
other branches at compile time (``shm.widens`` is a constant).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ..hash_kernels import mix, order_by_part, prefetch, prefetch_row
from .shm import row_scale, widen, widens

M32 = np.uint64(0xFFFFFFFF)
U32_MAX = np.uint32(0xFFFFFFFF)

TOUCH_COUNT, TOUCH_TICK = 1, 2
EVICT_RANDOM, EVICT_LEAST_USED, EVICT_OLDEST = 0, 1, 2


@njit(inline="always", cache=True)
def partition_of(h, P):
    return np.int64(((h & M32) * np.uint64(P)) >> np.uint64(32))


@njit(inline="always", cache=True)
def home_slot(h, icap):
    return np.int64(((h >> np.uint64(32)) * np.uint64(icap)) >> np.uint64(32))


@njit(inline="always", cache=True)
def tag_of(h, rbits):
    """The hash bits an index entry keeps above its row bits."""
    return np.int64(h & ((np.uint64(1) << np.uint64(32 - rbits)) - np.uint64(1)))


@njit(inline="always", cache=True)
def entry(tag, row, rbits):
    """Index entry naming local pool row ``row``."""
    return np.uint32((tag << rbits) | (row + 1))


@njit(inline="always", cache=True)
def entry_row(e, rbits):
    """Local pool row an index entry names (-1 for an empty slot)."""
    return (np.int64(e) & ((np.int64(1) << rbits) - 1)) - 1


@njit(inline="always", cache=True)
def probe(key, h, p, index, tkeys, icap, pcap, rbits):
    """(slot, local row) of key in partition p; row -1 (and the first empty slot) when absent."""
    base = p * icap
    s = home_slot(h, icap)
    t = tag_of(h, rbits)
    # At most count + 1 < icap slots are ever occupied, even mid-write, so an empty slot ends
    # the probe; the step bound only guards a reader against a torn index it will retry anyway.
    for _ in range(icap):
        e = np.int64(index[base + s])
        if e == 0:
            return s, -1
        if (e >> rbits) == t:
            r = entry_row(e, rbits)
            if tkeys[p * pcap + r] == key:
                return s, r
        s += 1
        if s == icap:
            s = 0
    return -1, -1


@njit(nogil=True, cache=True)
def seq_clean(before, seq):
    """Whether no partition's write sequence moved since ``before`` or was odd (mid-write)."""
    for p in range(len(seq)):
        if before[p] != seq[p] or before[p] & np.uint64(1):
            return False
    return True


# Kernels off the hot read path run serially: a parallel kernel costs seconds more to compile.


@njit(nogil=True, cache=True)
def partitions(keys, P):
    """Partition of each key."""
    out = np.empty(len(keys), np.int64)
    for i in range(len(keys)):
        out[i] = partition_of(mix(keys[i]), P)
    return out


@njit(nogil=True, cache=True)
def group_by_partition(keys, P):
    """Counting sort of key positions by partition: (order, starts[P+1]); batch order is kept."""
    return order_by_part(partitions(keys, P), P)


# How many keys ahead fetch's pipeline requests the lines a key needs (see _fetch_chunk): a key's
# index slot AHEAD_INDEX keys before its row is requested, the row AHEAD_ROW keys before it is
# copied. Rows of WIDE_ROW bytes and more go at half these distances: a few of their rows are
# already many lines in flight (on the 2-core VM, halving them gave 1.02-1.05x the keys/s at
# dim 128 and 0.96-0.98x at dim 16).
AHEAD_INDEX, AHEAD_ROW = 16, 8
WIDE_ROW = 256
RING = 32  # per-key state kept in flight: a power of two > AHEAD_INDEX + AHEAD_ROW
CHUNK = 1024  # keys per parallel task, at most
MIN_CHUNK = 256  # and at least
_TASKS = 2 * numba.config.NUMBA_NUM_THREADS  # parallel tasks of a fetch (read once, at import)


def chunk_size(n: int) -> int:
    """Keys per task of a parallel fetch: two tasks per thread, so a thread that finishes early
    takes over part of a slow one's share. (The pool's size from numba's config, not
    ``get_num_threads()``, which costs more than a small fetch's arithmetic; only the split of
    the work depends on it.)"""
    return max(MIN_CHUNK, min(CHUNK, -(-n // _TASKS)))


@njit(inline="always", cache=True)
def _first_match(h, index, icap, rbits, P, pcap):
    """Pool row of the first index entry whose tag matches h's (-1: an empty slot first); the
    caller confirms the key. Bounded: a torn index under a writer is retried anyway."""
    p = partition_of(h, P)
    s = home_slot(h, icap)
    t = tag_of(h, rbits)
    for _ in range(icap):
        e = np.int64(index[p * icap + s])
        if e == 0:
            return -1
        if (e >> rbits) == t:
            return p * pcap + entry_row(e, rbits)
        s += 1
        if s == icap:
            s = 0
    return -1


@njit(inline="always", cache=True)
def _fetch_chunk(lo, hi, keys, sel, index, tkeys, values, meta, touch, tick,
                 icap, pcap, rbits, P, out, found, lut, zero_missing):  # fmt: skip
    """fetch for sel[lo:hi] as a software pipeline; a key not found gets a row of zeros in
    ``out`` if ``zero_missing``, else its row is left as it was.

    A lookup is a chain of three misses (index slot -> pool key -> row), and a branch on a
    missed load stalls the core until it arrives, so a loop that finishes one key before the
    next waits for each miss in turn. Instead step j works on three keys: it hashes key j and
    requests its home index slot; it scans the slots of key j - A, requested A steps ago and
    cached by now, to the first tag match and requests that pool key and every line of the
    row; it confirms key j - A - R (a false tag match or a concurrent write falls back to
    ``probe``) and copies its row, which has arrived by then. The memory works on a steady
    stream of misses while rows are copied. Against blocks of 32 keys in three passes (the
    kernel before), paired on the 2-core VM: 1.03-1.05x their keys/s at dim 128 and 4K-16K
    keys, 1.2-1.26x at 64K keys, within noise at 1K, 0.91-0.96x at dim 16 (still 11-39x the
    dict baseline there). One loop, each stage once: the kernel is inlined in several callers
    and compiled for every row type, and a copy of the steady state without the stages'
    bounds checks doubled the compile time for 1-3% more keys/s.
    """
    dim = out.shape[1]  # the row's elements (an int8 row's scale follows them in values)
    hs = np.empty(RING, np.uint64)
    rows = np.empty(RING, np.int64)
    wide = dim * values.itemsize >= WIDE_ROW
    A = AHEAD_INDEX // 2 if wide else AHEAD_INDEX
    B = A + (AHEAD_ROW // 2 if wide else AHEAD_ROW)
    for j in range(lo, hi + B):
        if j < hi:
            h = mix(keys[sel[j]])
            hs[j & (RING - 1)] = h
            prefetch(index, (partition_of(h, P) * icap + home_slot(h, icap),))
        if lo <= j - A < hi:
            g = _first_match(hs[(j - A) & (RING - 1)], index, icap, rbits, P, pcap)
            if g >= 0:
                prefetch(tkeys, (g,))
                prefetch_row(values, g)
                if touch != 0:
                    prefetch(meta, (g,))
            rows[(j - A) & (RING - 1)] = g
        if j - B < lo:
            continue
        c = (j - B) & (RING - 1)
        i = sel[j - B]
        key = keys[i]
        row = rows[c]
        if row >= 0 and tkeys[row] != key:  # a false tag match: probe past it
            h = hs[c]
            p = partition_of(h, P)
            _, r = probe(key, h, p, index, tkeys, icap, pcap, rbits)
            row = p * pcap + r if r >= 0 else -1
        found[i] = row >= 0
        if row < 0:
            if zero_missing:
                for d in range(dim):
                    out[i, d] = 0.0
            continue
        if widens(lut):  # fp32, fp16 by instruction, bf16, int8 (the scale is 1 but int8's)
            scale = row_scale(values, row, dim, lut)
            for d in range(dim):
                out[i, d] = widen(values[row, d], lut) * scale
        elif lut is not None:  # fp16 through the table: the row is cached by now (and the table)
            for d in range(dim):
                out[i, d] = lut[values[row, d]]
        if touch == TOUCH_COUNT:  # racy across readers on purpose: counts are approximate
            if meta[row] < U32_MAX:
                meta[row] += np.uint32(1)
        elif touch == TOUCH_TICK:
            meta[row] = np.uint32(tick)


@njit(parallel=True, nogil=True, cache=True)
def fetch(
    keys, sel, index, tkeys, values, meta, touch, tick, icap, pcap, rbits, P, out, found, lut,
    zero_missing, chunk,
):  # fmt: skip
    """Rows of keys[sel] into out[sel] (16-bit rows decoded as ``lut`` says, see ``shm.lut_for``);
    found[sel]; touch 0: no meta. ``chunk`` keys per parallel task (``chunk_size``)."""
    n = len(sel)
    for c in prange((n + chunk - 1) // chunk):
        _fetch_chunk(c * chunk, min(n, (c + 1) * chunk), keys, sel, index, tkeys, values,
                     meta, touch, tick, icap, pcap, rbits, P, out, found, lut, zero_missing)  # fmt: skip


# Small batches run serially: below a few hundred keys waking the thread pool costs more than
# it saves.
# (A second function, not njit(...) of the same one twice: numba's cache would mix them up.)
@njit(nogil=True, cache=True)
def fetch_serial(keys, sel, index, tkeys, values, meta, touch, tick, icap, pcap, rbits, P, out, found, lut, zero_missing, chunk):  # fmt: skip
    """fetch on the calling thread (``chunk`` is unused: one signature for both)."""
    _fetch_chunk(0, len(sel), keys, sel, index, tkeys, values, meta, touch, tick,
                 icap, pcap, rbits, P, out, found, lut, zero_missing)  # fmt: skip


@njit(nogil=True, cache=True)
def contains(keys, sel, index, tkeys, icap, pcap, rbits, P, found):
    for j in range(len(sel)):
        i = sel[j]
        key = keys[i]
        h = mix(key)
        _, r = probe(key, h, partition_of(h, P), index, tkeys, icap, pcap, rbits)
        found[i] = r >= 0


@njit(nogil=True, cache=True)
def _delete_row(p, r, index, tkeys, values, meta, count, icap, pcap, rbits):
    """Remove local row r of partition p: backward-shift its index slot, swap-remove the row."""
    base = p * icap
    key = tkeys[p * pcap + r]
    i, _ = probe(key, mix(key), p, index, tkeys, icap, pcap, rbits)
    j = i
    while True:
        j += 1
        if j == icap:
            j = 0
        e = index[base + j]
        if e == 0:
            break
        k = home_slot(mix(tkeys[p * pcap + entry_row(e, rbits)]), icap)
        if (i <= j and i < k <= j) or (i > j and (k > i or k <= j)):
            continue  # entry j's home lies cyclically in (i, j]: it must stay after i
        index[base + i] = e
        i = j
    index[base + i] = 0
    last = count[p] - 1
    if r != last:
        src, dst = p * pcap + last, p * pcap + r
        moved = tkeys[src]
        tkeys[dst] = moved
        for d in range(values.shape[1]):  # (a slice assignment costs seconds of compile)
            values[dst, d] = values[src, d]
        if len(meta):
            meta[dst] = meta[src]
        # No slot names row r any more, and tkeys[src] still holds 'moved': the probe finds the
        # slot that names 'last'.
        h = mix(moved)
        s, _ = probe(moved, h, p, index, tkeys, icap, pcap, rbits)
        index[base + s] = entry(tag_of(h, rbits), r, rbits)
    count[p] = last


@njit(nogil=True, cache=True)
def _kth_smallest(a, k):
    """The k-th smallest (0-based) value of a, by quickselect; reorders a.

    (Not np.sort / np.argsort: numba takes ~10 s to compile those, on every cold start.)
    """
    lo, hi = 0, len(a) - 1
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return a[k]  # between j and i every value equals the pivot
    return a[k]


@njit(nogil=True, cache=True)
def _evict(p, n, protect, policy, salt, tick, index, tkeys, values, meta, count, icap, pcap,
           rbits):  # fmt: skip
    """Evict the n unprotected rows of partition p with the lowest policy scores (ties: lowest
    rows first); returns how many went.

    A row's tick is the batch clock's low 32 bits, which wrap (after 2^32 batches, or fetches
    with refresh_time_after_fetch: days at 10K a second), so evict_oldest scores a row by its
    age modulo 2^32 counted back from ``tick``, not by the stored tick itself (a row untouched
    for 2^32 batches would look new again)."""
    c = count[p]
    score = np.empty(c, np.uint64)
    now = np.uint32(tick)
    nc = 0
    for r in range(c):
        if not protect[r]:
            row = p * pcap + r
            if policy == EVICT_RANDOM or len(meta) == 0:
                score[nc] = mix(tkeys[row] ^ salt)
            elif policy == EVICT_OLDEST:  # the oldest (largest age) scores lowest
                score[nc] = np.uint64(U32_MAX - np.uint32(now - meta[row]))
            else:
                score[nc] = np.uint64(meta[row])
            nc += 1
    n = min(n, nc)
    if n <= 0:
        return 0
    cut = _kth_smallest(score[:nc].copy(), n - 1)
    below = 0
    for j in range(nc):
        below += score[j] < cut
    ties = n - below
    victim = np.zeros(c, np.bool_)
    j = 0
    for r in range(c):
        if not protect[r]:
            if score[j] < cut or (score[j] == cut and ties > 0):
                ties -= score[j] == cut
                victim[r] = True
            j += 1
    # Descending: every row above a victim is then a survivor, so swap-remove never moves a
    # victim that is still to be deleted.
    for r in range(c - 1, -1, -1):
        if victim[r]:
            _delete_row(p, r, index, tkeys, values, meta, count, icap, pcap, rbits)
    return n


@njit(parallel=True, nogil=True, cache=True)
def plan_upsert(keys, order, starts, index, tkeys, icap, pcap, rbits, P, limit,
                keep, rows, news, olds):  # fmt: skip
    """Per partition: mark the keys to apply and count new and present ones (reads the table).

    keep[i]: key i is the last occurrence of its value in the batch and among the ``limit``
    newest distinct keys of its partition. rows[i]: its local row if present, else -1.
    news[p] / olds[p]: kept keys absent from / present in partition p.
    """
    for p in prange(P):
        lo, hi = starts[p], starts[p + 1]
        if lo == hi:
            continue
        mask = np.int64(1)
        while mask < 2 * (hi - lo):
            mask *= 2
        mask -= 1
        seen = np.zeros(mask + 1, np.int64)  # batch position + 1 of each distinct key
        n_new = 0
        n_old = 0
        for jj in range(hi - 1, lo - 1, -1):  # newest first: the first sighting wins
            i = order[jj]
            key = keys[i]
            h = mix(key)
            s = np.int64(h >> np.uint64(40)) & mask
            dup = False
            while seen[s] != 0:
                if keys[seen[s] - 1] == key:
                    dup = True
                    break
                s = (s + 1) & mask
            rows[i] = -1
            keep[i] = False
            if dup:
                continue
            seen[s] = i + 1
            if n_new + n_old >= limit:
                continue
            keep[i] = True
            _, r = probe(key, h, p, index, tkeys, icap, pcap, rbits)
            rows[i] = r
            if r < 0:
                n_new += 1
            else:
                n_old += 1
        news[p] = n_new
        olds[p] = n_old


@njit(parallel=True, nogil=True, cache=True)
def apply_upsert(
    keys, vals, order, starts, keep, rows, news, olds,
    index, tkeys, values, meta, count, icap, pcap, rbits, P,
    limit, target, policy, tick, seed, evicted,
):  # fmt: skip
    """Write the kept keys partition by partition, first evicting by policy if over ``limit``.

    A partition that would exceed ``limit`` rows first evicts rows not in the batch until
    ``count + new <= target`` (or until only batch rows are left).
    """
    for p in prange(P):
        lo, hi = starts[p], starts[p + 1]
        if lo == hi:
            continue
        c, n, m = count[p], news[p], olds[p]
        if c + n > limit:
            protect = np.zeros(c, np.bool_)
            for jj in range(lo, hi):
                i = order[jj]
                if keep[i] and rows[i] >= 0:
                    protect[rows[i]] = True
            salt = mix(np.int64(seed) ^ np.int64(mix(np.int64(tick) * P + p)))
            evicted[p] = _evict(p, min(c - m, c + n - target), protect, policy, salt, tick,
                                index, tkeys, values, meta, count, icap, pcap, rbits)  # fmt: skip
        for jj in range(lo, hi):
            i = order[jj]
            if not keep[i]:
                continue
            key = keys[i]
            h = mix(key)
            s, r = probe(key, h, p, index, tkeys, icap, pcap, rbits)
            if r < 0:
                r = count[p]
                count[p] = r + 1
                tkeys[p * pcap + r] = key
                if len(meta):
                    meta[p * pcap + r] = np.uint32(tick) if policy == EVICT_OLDEST else 0
                index[p * icap + s] = entry(tag_of(h, rbits), r, rbits)
            elif len(meta) and policy == EVICT_OLDEST:
                meta[p * pcap + r] = np.uint32(tick)
            row = p * pcap + r
            for d in range(vals.shape[1]):
                values[row, d] = vals[i, d]


@njit(nogil=True, cache=True)
def erase(keys, order, starts, index, tkeys, values, meta, count, icap, pcap, rbits, P, removed):
    """Delete keys grouped by partition; removed[p] counts the ones that were present."""
    for p in range(P):
        for j in range(starts[p], starts[p + 1]):
            key = keys[order[j]]
            _, r = probe(key, mix(key), p, index, tkeys, icap, pcap, rbits)
            if r >= 0:
                _delete_row(p, r, index, tkeys, values, meta, count, icap, pcap, rbits)
                removed[p] += 1


@njit(nogil=True, cache=True)
def rehash(index, tkeys, count, icap, pcap, rbits, P):
    """Build every partition's (empty) index from its pool rows, after a resize."""
    for p in range(P):
        for r in range(count[p]):
            h = mix(tkeys[p * pcap + r])
            s = home_slot(h, icap)
            while index[p * icap + s] != 0:
                s += 1
                if s == icap:
                    s = 0
            index[p * icap + s] = entry(tag_of(h, rbits), r, rbits)
