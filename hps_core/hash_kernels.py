"""The shared key hash as a numba function, for the host kernels of every level."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .hashing import GOLDEN_GAMMA, MIX_MUL_1, MIX_MUL_2

LINE = 64  # bytes per cache line


@njit(inline="always", cache=True)
def mix(key):
    """splitmix64, bit for bit ``hps_core.hashing.splitmix64``."""
    z = np.uint64(key) + GOLDEN_GAMMA
    z = (z ^ (z >> np.uint64(30))) * MIX_MUL_1
    z = (z ^ (z >> np.uint64(27))) * MIX_MUL_2
    return z ^ (z >> np.uint64(31))


@njit(nogil=True, cache=True)
def order_by_part(parts, P):
    """Counting sort of positions by part (``parts`` int64 in [0, P)): (order, starts[P+1]),
    positions of part p at order[starts[p]:starts[p+1]], in their original order."""
    starts = np.zeros(P + 1, np.int64)
    for i in range(len(parts)):
        starts[parts[i] + 1] += 1
    for p in range(P):
        starts[p + 1] += starts[p]
    fill = starts[:-1].copy()
    order = np.empty(len(parts), np.int64)
    for i in range(len(parts)):
        p = parts[i]
        order[fill[p]] = i
        fill[p] += 1
    return order, starts


def dedupe_slots(n: int) -> int:
    """Hash slots ``dedupe_into`` needs for n keys: a power of two, at least 2n and 16."""
    cap = 16
    while cap < 2 * n:
        cap <<= 1
    return cap


dedupe_slots_jit = njit(inline="always", cache=True)(dedupe_slots)


@njit(inline="always", cache=True)
def dedupe_into(keys, uniq, first, inverse, slots):
    """Unique keys in order of first appearance into uniq[:m] (m returned), the position of
    each one's first appearance into first[:m], and inverse[:n] with keys == uniq[inverse]:
    a hash table of ``slots`` (``dedupe_slots(n)`` entries or more, a power of two), so O(n)
    where np.unique sorts."""
    cap = dedupe_slots_jit(len(keys))
    mask = np.uint64(cap - 1)
    slots[:cap] = -1  # position in uniq of the key hashed there
    m = 0
    for i in range(len(keys)):
        k = keys[i]
        s = np.int64(mix(k) & mask)
        while slots[s] >= 0 and uniq[slots[s]] != k:
            s = (s + 1) & (cap - 1)
        if slots[s] < 0:
            slots[s] = m
            uniq[m] = k
            first[m] = i
            m += 1
        inverse[i] = slots[s]
    return m


@njit(nogil=True, cache=True)
def dedupe(keys):
    """(unique keys in order of first appearance, inverse) with keys == unique[inverse]."""
    n = len(keys)
    uniq = np.empty(n, np.int64)
    first = np.empty(n, np.int64)
    inverse = np.empty(n, np.int64)
    m = dedupe_into(keys, uniq, first, inverse, np.empty(dedupe_slots_jit(n), np.int64))
    return uniq[:m].copy(), inverse


def _item_pointer(context, builder, aryty, idxty, ary, idx):
    """Codegen: the address of ary[idx] for an array and an index tuple (no bounds check)."""
    a = context.make_array(aryty)(context, builder, ary)
    ix = [
        context.cast(builder, v, t, types.intp)
        for v, t in zip(cgutils.unpack_tuple(builder, idx, len(idxty)), idxty, strict=True)
    ]
    return cgutils.get_item_pointer(context, builder, aryty, a, ix)


@intrinsic
def prefetch(typingctx, arr, index):
    """Ask the CPU to start loading the cache line of arr[index] (a tuple); no other effect.

    A kernel that prefetches the lines of a block of lookups before it reads any of them keeps
    many misses in flight; a load whose result a branch needs stalls on each miss in turn.
    """

    def codegen(context, builder, signature, args):
        ptr = _item_pointer(context, builder, *signature.args, *args)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # read, high temporal locality, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, index), codegen


@intrinsic
def copy_bytes(typingctx, dst, dst_index, src, src_index, nbytes):
    """memcpy of ``nbytes`` bytes from &src[src_index] to &dst[dst_index] (index tuples; the
    caller keeps both ranges in bounds and apart). A slice assignment of numba's copies through
    a temporary when it cannot rule out overlap: ~8x slower for a few hundred bytes."""

    def codegen(context, builder, signature, args):
        dty, dity, sty, sity, _ = signature.args
        d = _item_pointer(context, builder, dty, dity, args[0], args[1])
        s = _item_pointer(context, builder, sty, sity, args[2], args[3])
        n = context.cast(builder, args[4], signature.args[4], types.intp)
        cgutils.raw_memcpy(builder, d, s, n, 1)
        return context.get_dummy_value()

    return types.void(dst, dst_index, src, src_index, nbytes), codegen


@njit(inline="always", cache=True)
def prefetch_row(values, r):
    """Prefetch every cache line of row r of a 2-D array (its last element too: a row need
    not start on a line)."""
    dim = values.shape[1]
    for d in range(0, dim, max(1, LINE // values.itemsize)):
        prefetch(values, (r, d))
    prefetch(values, (r, dim - 1))
