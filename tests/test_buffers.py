"""Recycled result buffers: right arrays, reused only once every view of the last one died."""

import gc

import numpy as np
import pytest

from hps_core import buffers

BIG = (buffers.RECYCLE_MIN_BYTES // (64 * 4) + 1, 64)  # just over the recycling threshold


@pytest.fixture(autouse=True)
def empty_pool():
    buffers.release()
    yield
    buffers.release()


def test_small_and_large_arrays_are_plain_writeable_arrays():
    for shape, dtype in (((3, 5), np.float32), (BIG, np.float32), ((BIG[0] * 4,), np.int64)):
        a = buffers.empty(shape, dtype)
        ref = np.arange(np.prod(a.shape), dtype=dtype).reshape(a.shape)
        a[...] = ref
        assert a.shape == tuple(shape) and a.dtype == dtype and a.flags.c_contiguous
        np.testing.assert_array_equal(a, ref)
    assert buffers.empty(BIG).ctypes.data % 64 == 0


def test_a_buffer_is_reused_only_after_every_view_died():
    a = buffers.empty(BIG)
    a[...] = 1.0
    ptr = a.ctypes.data
    view = a[10:20]  # a view outlives the array it came from
    del a
    gc.collect()
    assert buffers.pooled_bytes() == 0
    b = buffers.empty(BIG)
    assert b.ctypes.data != ptr
    b[...] = 2.0
    np.testing.assert_array_equal(view, np.ones((10, BIG[1]), np.float32))
    del view
    assert buffers.pooled_bytes() >= np.prod(BIG) * 4
    c = buffers.empty(BIG)
    assert c.ctypes.data == ptr and buffers.pooled_bytes() == 0


def test_pool_keeps_at_most_its_limit(monkeypatch):
    monkeypatch.setattr(buffers._pool, "limit", 3 * buffers.RECYCLE_MIN_BYTES)
    arrays = [buffers.empty(BIG) for _ in range(6)]
    del arrays
    assert 0 < buffers.pooled_bytes() <= 3 * buffers.RECYCLE_MIN_BYTES
    held = buffers.pooled_bytes()
    big = buffers.empty((4 * BIG[0], BIG[1]))  # more than twice any free buffer: a new one
    assert buffers.pooled_bytes() == held
    del big  # over the limit with it: the oldest free buffers go
    assert buffers.pooled_bytes() <= 3 * buffers.RECYCLE_MIN_BYTES


def test_a_bad_pool_size_names_the_variable():
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", "import hps_core.buffers"],
        env={"HPS_BUFFER_POOL_MB": "lots", "PATH": ""},
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert "HPS_BUFFER_POOL_MB" in r.stderr and "'lots'" in r.stderr


@pytest.mark.parametrize("shape", [0, 1, (7, 3), (1000, 129), (BIG[0], 16)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.int64])
def test_line_aligned_arrays_start_on_a_cache_line(shape, dtype):
    a = buffers.line_aligned(shape, dtype)
    want = (shape,) if isinstance(shape, int) else shape
    assert a.shape == want and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    if a.size:
        assert a.ctypes.data % buffers.LINE == 0
    ref = np.arange(a.size).astype(dtype).reshape(want)
    a[...] = ref
    np.testing.assert_array_equal(a, ref)
