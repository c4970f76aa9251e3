"""Large result arrays from a small pool of recycled buffers.

A lookup returns a fresh array, and a fresh array of tens of MiB costs more than the lookup
that fills it: the allocator maps new pages for it (glibc serves blocks of 32 MiB and more
with mmap, and returns them with munmap), and the kernel zeroes every page on first touch.
On the 2-core VM of the benchmarks, a fresh 32 MiB array took 6 ms to fault in against
1.7 ms to fill one already mapped, which is most of a 65,536-key dim-128 VDB fetch.

``empty`` gives arrays of at least ``RECYCLE_MIN_BYTES`` from buffers whose last array died:
each array's memory belongs to an owner object that numpy keeps alive through every view of
the array, and the owner hands the buffer back when it is collected. A buffer is therefore
never reused while any view of the array it backed exists. At most ``POOL_MAX_BYTES`` of free
buffers are kept; more are released to the allocator.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np

from .errors import ConfigError

RECYCLE_MIN_BYTES = 8 << 20
"""Smaller arrays come from np.empty: the allocator already reuses blocks of that size."""


def _pool_mb() -> int:
    raw = os.environ.get("HPS_BUFFER_POOL_MB", "256")
    try:
        mb = int(raw)
    except ValueError:
        mb = -1
    if mb < 0:
        raise ConfigError("HPS_BUFFER_POOL_MB", raw, "a whole number of MiB >= 0")
    return mb


POOL_MAX_BYTES = _pool_mb() << 20
"""Free buffers kept for reuse per process (``HPS_BUFFER_POOL_MB``); 0 turns recycling off."""
_GRAIN = 2 << 20  # sizes round up to a huge page, so similar requests share buffers


class _Pool:
    def __init__(self, limit: int):
        self.limit = limit
        self.free: list[np.ndarray] = []  # uint8 buffers, oldest first
        self.bytes = 0
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray | None:
        """The smallest free buffer of nbytes or more, but not over twice that; else None."""
        with self.lock:
            best = -1
            for i, b in enumerate(self.free):
                if nbytes <= len(b) <= 2 * nbytes and (best < 0 or len(b) < len(self.free[best])):
                    best = i
            if best < 0:
                return None
            buf = self.free.pop(best)
            self.bytes -= len(buf)
            return buf

    def give(self, buf: np.ndarray) -> None:
        with self.lock:
            if len(buf) > self.limit:
                return
            self.free.append(buf)
            self.bytes += len(buf)
            while self.bytes > self.limit:  # release the oldest
                self.bytes -= len(self.free.pop(0))

    def clear(self) -> None:
        with self.lock:
            self.free.clear()
            self.bytes = 0


_pool = _Pool(POOL_MAX_BYTES)


class _Owner:
    """Owns one buffer while arrays over it live; numpy views keep it alive as their base."""

    __slots__ = ("__array_interface__", "buf")

    def __init__(self, buf: np.ndarray, shape: tuple[int, ...], dtype: np.dtype):
        self.buf = buf
        self.__array_interface__ = {
            "data": (buf.ctypes.data, False),
            "shape": shape,
            "typestr": dtype.str,
            "version": 3,
        }

    def __del__(self) -> None:
        if _pool is not None:  # None only while the interpreter shuts down
            _pool.give(self.buf)


LINE = 64  # bytes per cache line


def line_aligned(shape: tuple[int, ...] | int, dtype: object = np.float32) -> np.ndarray:
    """np.empty whose first element starts on a cache line. np.empty's data starts 16 bytes
    past one (the allocator's header), so a row of 64 bytes spans two lines, one of 512 nine:
    a random row read then costs an extra line from memory."""
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    raw = np.empty(nbytes + LINE, np.uint8)
    start = -raw.ctypes.data % LINE
    return raw[start : start + nbytes].view(dt).reshape(shape)


def empty(shape: tuple[int, ...] | int, dtype: object = np.float32) -> np.ndarray:
    """Like np.empty (C order, writeable); large arrays reuse buffers of collected ones."""
    dt = np.dtype(dtype)
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    nbytes = math.prod(shape) * dt.itemsize
    if nbytes < RECYCLE_MIN_BYTES or _pool.limit == 0:  # (the common case: kept cheap)
        return np.empty(shape, dt)
    shape = tuple(int(s) for s in shape)
    buf = _pool.take(nbytes)
    if buf is None:
        size = -(-nbytes // _GRAIN) * _GRAIN
        buf = line_aligned(size, np.uint8)
    return np.asarray(_Owner(buf, shape, dt))


def pooled_bytes() -> int:
    """Bytes of free buffers held for reuse now."""
    return _pool.bytes


def release() -> None:
    """Drop every free buffer (their memory goes back to the allocator)."""
    _pool.clear()
