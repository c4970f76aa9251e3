"""The shared key hash as a numba function, for the host kernels of every level."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .hashing import GOLDEN_GAMMA, MIX_MUL_1, MIX_MUL_2


@njit(inline="always", cache=True)
def mix(key):
    """splitmix64, bit for bit ``hps_core.hashing.splitmix64``."""
    z = np.uint64(key) + GOLDEN_GAMMA
    z = (z ^ (z >> np.uint64(30))) * MIX_MUL_1
    z = (z ^ (z >> np.uint64(27))) * MIX_MUL_2
    return z ^ (z >> np.uint64(31))


@intrinsic
def prefetch(typingctx, arr, i):
    """Ask for the cache line holding ``arr.flat[i]`` (a hint: no fault, no result).

    A kernel that prefetches the lines of a block of lookups before it reads any of them keeps
    many misses in flight; a load whose result a branch needs stalls on each miss in turn.
    """
    if not isinstance(arr, types.Array) or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        i8p = ir.IntType(8).as_pointer()
        ptr = builder.bitcast(builder.gep(data, [args[1]]), i8p)
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        )
        # read, high temporal locality, data cache
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, i), codegen
