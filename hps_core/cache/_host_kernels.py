"""numba kernels of the host L1 cache (``host.py``): plain arrays in, no Python objects.

Views the kernels get (S sets, W ways, a batch of n keys):
``keys`` int64 [S, W], ``occ`` bool [S, W], ``stamp`` uint64 [S, W]; ``vals`` uint16 [S, W, width]
holds the rows as bit patterns (numba has no float16 on the CPU): fp16 / bf16 rows are one
uint16 per element, fp32 rows two (width = 2 * dim), so every dtype compiles to one variant;
``rows`` are the batch's vectors already encoded to the storage dtype, viewed like ``vals``.
``find`` writes the caller's float32 [n, dim] ``out`` bit for bit through two views of it:
``out16`` uint16 [n, 2 * dim] (fp32 rows are copied) and ``out32`` uint32 [n, dim] (widened).

Every verb has a parallel kernel and a serial one for small batches (waking the thread pool
costs more than it saves there); both call the same helpers, so they agree by construction.
Where order matters (LFU counts, insert, assign, erase) the parallel kernels give each of
``parts`` threads a contiguous range of sets; a thread walks the whole batch in order and
handles only the keys of its own sets, so each set sees its keys in batch order, as in
``reference.py``. Semantics are those of ``reference.py``; its docstring is the contract.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..hash_kernels import mix, prefetch
from ..hashing import GOLDEN_GAMMA as GOLDEN

KIND_F32, KIND_F16, KIND_BF16 = 0, 1, 2
BLOCK = 16  # keys whose cache lines find requests together before it reads any of them


@njit(inline="always", cache=True)
def set_of(key, num_sets):
    return np.int64(mix(key) % np.uint64(num_sets))


@njit(inline="always", cache=True)
def way_of(keys, occ, s, key):
    """The way of set s holding key, or -1."""
    for w in range(keys.shape[1]):
        if keys[s, w] == key and occ[s, w]:
            return w
    return -1


@njit(inline="always", cache=True)
def f16_to_f32_bits(h):
    """IEEE half bits -> float bits, exact (subnormals normalised, inf/NaN kept)."""
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    exp = (h >> np.uint32(10)) & np.uint32(0x1F)
    mant = h & np.uint32(0x3FF)
    if exp == np.uint32(0x1F):
        return sign | np.uint32(0x7F800000) | (mant << np.uint32(13))
    if exp == np.uint32(0):
        if mant == np.uint32(0):
            return sign
        e = np.uint32(113)  # a subnormal is 0.mant * 2**-14: normalise the mantissa
        while (mant & np.uint32(0x400)) == np.uint32(0):
            mant <<= np.uint32(1)
            e -= np.uint32(1)
        return sign | (e << np.uint32(23)) | ((mant & np.uint32(0x3FF)) << np.uint32(13))
    return sign | ((exp + np.uint32(112)) << np.uint32(23)) | (mant << np.uint32(13))


@njit(inline="always", cache=True)
def read_row(vals, s, w, out16, out32, i, kind):
    """Decode stored row (s, w) into row i of out (fp32 bits)."""
    if kind == KIND_F32:
        for j in range(vals.shape[2]):
            out16[i, j] = vals[s, w, j]
    elif kind == KIND_BF16:
        for j in range(vals.shape[2]):
            out32[i, j] = np.uint32(vals[s, w, j]) << np.uint32(16)
    else:
        for j in range(vals.shape[2]):
            out32[i, j] = f16_to_f32_bits(vals[s, w, j])


@njit(inline="always", cache=True)
def find_block(lo, hi, qkeys, keys, occ, stamp, vals, out16, out32, hit, kind, zero_miss, where):
    """Look up keys lo..hi-1 (at most BLOCK) -> where[i - lo] = slot (s * ways + w), -1 on miss.

    Three passes so the cache misses of the block overlap instead of queueing one by one:
    request the sets, then (sets loaded) find the ways and request rows and stamps, then copy.
    """
    num_sets, ways = keys.shape
    for i in range(lo, hi):
        s = set_of(qkeys[i], num_sets)
        where[i - lo] = s
        prefetch(keys, (s, 0))
        prefetch(occ, (s, 0))
    for i in range(lo, hi):
        s = where[i - lo]
        w = way_of(keys, occ, s, qkeys[i])
        if w >= 0:
            prefetch(stamp, (s, w))
            for j in range(0, vals.shape[2], 32):  # 32 uint16 = one 64-byte line
                prefetch(vals, (s, w, j))
            where[i - lo] = s * ways + w
        else:
            where[i - lo] = -1
    for i in range(lo, hi):
        slot = where[i - lo]
        hit[i] = slot >= 0
        if slot >= 0:
            read_row(vals, slot // ways, slot % ways, out16, out32, i, kind)
        elif zero_miss:
            out32[i, :] = 0


@njit(inline="always", cache=True)
def set_range(p, parts, num_sets):
    """The sets [lo, hi) owned by part p of parts."""
    return p * num_sets // parts, (p + 1) * num_sets // parts


# -- find --------------------------------------------------------------------------------------
@njit(parallel=True, nogil=True, cache=True)
def find(qkeys, keys, occ, stamp, vals, out16, out32, hit, tick, lfu, kind, zero_miss, parts):
    n, num_sets, ways = len(qkeys), keys.shape[0], keys.shape[1]
    flat = stamp.reshape(num_sets * ways)
    blocks = (n + BLOCK - 1) // BLOCK
    if not lfu:  # every toucher of a slot writes the same tick: a benign race
        for b in prange(blocks):
            lo, hi = b * BLOCK, min(n, (b + 1) * BLOCK)
            where = np.empty(BLOCK, np.int64)
            find_block(
                lo, hi, qkeys, keys, occ, stamp, vals, out16, out32, hit, kind, zero_miss, where
            )
            for t in range(hi - lo):
                if where[t] >= 0:
                    flat[where[t]] = tick
        return
    slots = np.empty(n, np.int64)  # LFU counts per occurrence: each set's counts in one thread
    for b in prange(blocks):
        lo, hi = b * BLOCK, min(n, (b + 1) * BLOCK)
        find_block(
            lo, hi, qkeys, keys, occ, stamp, vals, out16, out32, hit, kind, zero_miss, slots[lo:hi]
        )
    for p in prange(parts):
        lo, hi = set_range(p, parts, num_sets)
        lo, hi = lo * ways, hi * ways
        for i in range(n):
            if lo <= slots[i] < hi:
                flat[slots[i]] += np.uint64(1)


@njit(nogil=True, cache=True)
def find_serial(qkeys, keys, occ, stamp, vals, out16, out32, hit, tick, lfu, kind, zero_miss):
    n = len(qkeys)
    flat = stamp.reshape(stamp.size)
    where = np.empty(BLOCK, np.int64)
    for lo in range(0, n, BLOCK):
        hi = min(n, lo + BLOCK)
        find_block(lo, hi, qkeys, keys, occ, stamp, vals, out16, out32, hit, kind, zero_miss, where)
        for t in range(hi - lo):
            if where[t] >= 0:
                if lfu:
                    flat[where[t]] += np.uint64(1)
                else:
                    flat[where[t]] = tick


# -- contains ----------------------------------------------------------------------------------
@njit(parallel=True, nogil=True, cache=True)
def contains(qkeys, keys, occ, hit):
    for i in prange(len(qkeys)):
        hit[i] = way_of(keys, occ, set_of(qkeys[i], keys.shape[0]), qkeys[i]) >= 0


@njit(nogil=True, cache=True)
def contains_serial(qkeys, keys, occ, hit):
    for i in range(len(qkeys)):
        hit[i] = way_of(keys, occ, set_of(qkeys[i], keys.shape[0]), qkeys[i]) >= 0


@njit(parallel=True, nogil=True, cache=True)
def set_indices(qkeys, num_sets):
    sets = np.empty(len(qkeys), np.int64)
    for i in prange(len(qkeys)):
        sets[i] = set_of(qkeys[i], num_sets)
    return sets


@njit(nogil=True, cache=True)
def set_indices_serial(qkeys, num_sets):
    sets = np.empty(len(qkeys), np.int64)
    for i in range(len(qkeys)):
        sets[i] = set_of(qkeys[i], num_sets)
    return sets


# -- insert ------------------------------------------------------------------------------------
@njit(nogil=True, cache=True)
def last_occurrences(idx, qkeys):
    """Entries of idx whose key does not occur again later in idx, in idx order."""
    m = len(idx)
    bits = 4
    while (1 << bits) < 2 * m:
        bits += 1
    mask = (1 << bits) - 1
    table = np.full(1 << bits, -1, np.int64)  # open addressing over positions in idx
    keep = np.zeros(m, np.bool_)
    kept = 0
    for j in range(m - 1, -1, -1):
        key = qkeys[idx[j]]
        h = np.int64((np.uint64(key) * GOLDEN) >> np.uint64(64 - bits))
        while table[h] >= 0 and qkeys[idx[table[h]]] != key:
            h = (h + 1) & mask
        if table[h] < 0:
            table[h] = j
            keep[j] = True
            kept += 1
    res = np.empty(kept, np.int64)
    t = 0
    for j in range(m):
        if keep[j]:
            res[t] = idx[j]
            t += 1
    return res


@njit(nogil=True, cache=True)
def insert_group(idx, qkeys, sets, rows, keys, occ, stamp, vals, tick, lfu):
    """Insert batch entries idx (a union of whole sets, in batch order): reference steps 1-3."""
    ways = keys.shape[1]
    idx = last_occurrences(idx, qkeys)
    new = np.empty(len(idx), np.int64)
    n_new = 0
    for i in idx:  # step 2: cached keys are overwritten and touched, before any placement
        s = sets[i]
        w = way_of(keys, occ, s, qkeys[i])
        if w < 0:
            new[n_new] = i
            n_new += 1
            continue
        vals[s, w, :] = rows[i, :]
        if lfu:
            stamp[s, w] += np.uint64(1)
        else:
            stamp[s, w] = tick
    for t in range(n_new):  # step 3: lowest free way, else the smallest stamp (lowest way)
        i = new[t]
        s = sets[i]
        w = -1
        for v in range(ways):
            if not occ[s, v]:
                w = v
                break
        if w < 0:
            w = 0
            for v in range(1, ways):
                if stamp[s, v] < stamp[s, w]:
                    w = v
        keys[s, w] = qkeys[i]
        occ[s, w] = True
        stamp[s, w] = np.uint64(1) if lfu else np.uint64(tick)
        vals[s, w, :] = rows[i, :]


@njit(parallel=True, nogil=True, cache=True)
def insert(qkeys, rows, keys, occ, stamp, vals, tick, lfu, parts):
    n, num_sets = len(qkeys), keys.shape[0]
    sets = np.empty(n, np.int64)
    for i in prange(n):
        sets[i] = set_of(qkeys[i], num_sets)
    for p in prange(parts):
        lo, hi = set_range(p, parts, num_sets)
        m = 0
        for i in range(n):
            if lo <= sets[i] < hi:
                m += 1
        idx = np.empty(m, np.int64)
        m = 0
        for i in range(n):
            if lo <= sets[i] < hi:
                idx[m] = i
                m += 1
        insert_group(idx, qkeys, sets, rows, keys, occ, stamp, vals, tick, lfu)


@njit(nogil=True, cache=True)
def insert_serial(qkeys, rows, keys, occ, stamp, vals, tick, lfu):
    sets = set_indices_serial(qkeys, keys.shape[0])
    insert_group(np.arange(len(qkeys)), qkeys, sets, rows, keys, occ, stamp, vals, tick, lfu)


# -- assign and erase --------------------------------------------------------------------------
@njit(nogil=True, cache=True)
def assign_range(qkeys, sets, rows, keys, occ, vals, hit, lo, hi):
    """Overwrite the cached keys of sets [lo, hi) in batch order (the last duplicate wins)."""
    for i in range(len(qkeys)):
        s = sets[i]
        if lo <= s < hi:
            w = way_of(keys, occ, s, qkeys[i])
            hit[i] = w >= 0
            if w >= 0:
                vals[s, w, :] = rows[i, :]


@njit(parallel=True, nogil=True, cache=True)
def assign(qkeys, sets, rows, keys, occ, vals, hit, parts):
    for p in prange(parts):
        lo, hi = set_range(p, parts, keys.shape[0])
        assign_range(qkeys, sets, rows, keys, occ, vals, hit, lo, hi)


@njit(nogil=True, cache=True)
def assign_serial(qkeys, sets, rows, keys, occ, vals, hit):
    assign_range(qkeys, sets, rows, keys, occ, vals, hit, 0, keys.shape[0])


@njit(nogil=True, cache=True)
def erase_range(qkeys, sets, keys, occ, stamp, vals, lo, hi):
    """Free the slots of the keys of sets [lo, hi); returns how many distinct keys were cached."""
    erased = 0
    for i in range(len(qkeys)):
        s = sets[i]
        if lo <= s < hi:
            w = way_of(keys, occ, s, qkeys[i])
            if w >= 0:  # a later duplicate finds the slot already free
                keys[s, w] = 0
                occ[s, w] = False
                stamp[s, w] = 0
                vals[s, w, :] = 0
                erased += 1
    return erased


@njit(parallel=True, nogil=True, cache=True)
def erase(qkeys, sets, keys, occ, stamp, vals, parts):
    erased = np.zeros(parts, np.int64)
    for p in prange(parts):
        lo, hi = set_range(p, parts, keys.shape[0])
        erased[p] = erase_range(qkeys, sets, keys, occ, stamp, vals, lo, hi)
    return erased.sum()


@njit(nogil=True, cache=True)
def erase_serial(qkeys, sets, keys, occ, stamp, vals):
    return erase_range(qkeys, sets, keys, occ, stamp, vals, 0, keys.shape[0])


# -- encoding ----------------------------------------------------------------------------------
@njit(parallel=True, nogil=True, cache=True)
def encode_bf16(src, dst):
    """fp32 bits [n, dim] -> bf16 bits, as ``reference.to_bf16_bits`` (RNE; NaN stays quiet NaN)."""
    for i in prange(src.shape[0]):
        for j in range(src.shape[1]):
            b = np.uint64(src[i, j])
            if (b & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000):
                dst[i, j] = np.uint16((b >> np.uint64(16)) | np.uint64(0x0040))
            else:
                r = b + np.uint64(0x7FFF) + ((b >> np.uint64(16)) & np.uint64(1))
                dst[i, j] = np.uint16(r >> np.uint64(16))
