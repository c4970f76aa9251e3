"""Host-cache specifics: serial and parallel kernels agree, out= handling, storage layout.

The semantics themselves are checked against the reference in test_conformance.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hps_core.cache.host import PARALLEL_MIN_KEYS, HostCache
from hps_core.cache.reference import ReferenceCache, to_bf16_bits
from hps_core.errors import InvalidInputError

I64 = np.iinfo(np.int64)


def assert_same_state(a: HostCache, b: HostCache) -> None:
    sa, sb = a.snapshot(), b.snapshot()
    assert sa["clock"] == sb["clock"]
    for field in ("keys", "occupied", "stamp"):
        np.testing.assert_array_equal(sa[field], sb[field], err_msg=field)
    np.testing.assert_array_equal(sa["values"].view(np.uint32), sb["values"].view(np.uint32))


@pytest.mark.parametrize(
    "policy, dtype, capacity, ways",
    [("lru", "float32", 3000, 8), ("lfu", "bfloat16", 3000, 4), ("lfu", "float16", 8, 8)],
)
def test_serial_and_parallel_kernels_agree(policy, dtype, capacity, ways):
    """Same batches through the serial kernels (never parallel) and the parallel ones (always)."""
    cfg = dict(capacity=capacity, dim=5, ways=ways, policy=policy, dtype=dtype)
    serial = HostCache(**cfg, parallel_min_keys=I64.max)
    parallel = HostCache(**cfg, parallel_min_keys=1)
    rng = np.random.default_rng(3)
    pool = rng.integers(I64.min, I64.max, 3 * capacity, dtype=np.int64)
    for step in range(30):
        n = int(rng.integers(1, 3 * capacity))
        keys = rng.choice(pool, n)  # duplicates: LFU counts and last-wins must agree too
        vectors = rng.standard_normal((n, 5)).astype(np.float32)
        verb = ("insert", "find", "assign", "erase", "contains", "find")[step % 6]
        if verb == "insert":
            serial.insert(keys, vectors)
            parallel.insert(keys, vectors)
        elif verb == "find":
            (vs, hs), (vp, hp) = serial.find(keys), parallel.find(keys)
            np.testing.assert_array_equal(hs, hp)
            np.testing.assert_array_equal(vs.view(np.uint32), vp.view(np.uint32))
        elif verb == "assign":
            np.testing.assert_array_equal(
                serial.assign(keys, vectors), parallel.assign(keys, vectors)
            )
        elif verb == "erase":
            assert serial.erase(keys[: n // 4]) == parallel.erase(keys[: n // 4])
        else:
            np.testing.assert_array_equal(serial.contains(keys), parallel.contains(keys))
        assert_same_state(serial, parallel)


def test_default_threshold_picks_the_kernel():
    c = HostCache(1024, 2)
    assert c.parallel_min_keys == PARALLEL_MIN_KEYS
    assert c._parts(PARALLEL_MIN_KEYS - 1) == 1


@pytest.mark.parametrize("layout", ["c", "fortran", "strided"])
def test_out_is_written_in_place_and_misses_are_left_alone(layout):
    c = HostCache(64, 3, ways=4, dtype="float16")
    c.insert([1, 2], np.array([[1, 2, 3], [4, 5, 6]], np.float32))
    base = np.full((4, 6), 9.0, np.float32)
    out = {
        "c": base[:, :3].copy(),
        "fortran": np.asfortranarray(base[:, :3]),
        "strided": base[:, ::2],
    }[layout]
    got, hit = c.find(np.array([2, 7, 1, 8]), out=out)
    assert got is out
    assert hit.tolist() == [True, False, True, False]
    np.testing.assert_array_equal(out, [[4, 5, 6], [9, 9, 9], [1, 2, 3], [9, 9, 9]])
    if layout == "strided":
        np.testing.assert_array_equal(base[:, 1::2], 9.0)  # the columns between are untouched


def test_out_none_gives_zero_rows_for_misses():
    c = HostCache(64, 8)
    c.insert([5], np.ones((1, 8), np.float32))
    for _ in range(3):  # np.empty may hand back dirty memory: the kernel must zero misses
        junk = np.full((1000, 8), np.nan, np.float32)
        del junk
        v, hit = c.find(np.arange(1000))
        assert hit.sum() == 1 and (v[5] == 1).all()
        assert not v[~hit].any()


def test_read_only_out_is_rejected_before_the_clock_moves():
    c = HostCache(64, 2)
    out = np.zeros((1, 2), np.float32)
    out.flags.writeable = False
    with pytest.raises(InvalidInputError) as err:
        c.find([1], out=out)
    assert err.value.field == "out" and c.clock == 0


def test_every_float16_pattern_widens_like_numpy():
    """The kernel's fp16 -> fp32 bit conversion, all 65536 patterns (subnormals, inf, NaN)."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    c = HostCache(1, len(patterns), ways=1, dtype="float16")
    c.insert([42], np.zeros((1, len(patterns)), np.float32))
    c.values[0, 0] = patterns.view(np.float16)
    got, hit = c.find([42])
    assert hit[0]
    want = patterns.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got[0].view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("dtype, row_bytes", [("float32", 4 * 16), ("float16", 2 * 16)])
def test_memory_bytes_and_alignment(dtype, row_bytes):
    c = HostCache(1000, 16, ways=8, dtype=dtype)
    slots = c.num_sets * 8
    assert c.capacity == slots == ReferenceCache(1000, 16, ways=8).capacity
    assert c.memory_bytes() == slots * (8 + 1 + 8 + row_bytes)
    assert c.memory_bytes() == ReferenceCache(1000, 16, ways=8, dtype=dtype).memory_bytes()
    for a in (c.keys, c.occupied, c.stamp, c.values):
        assert a.ctypes.data % 64 == 0 and a.flags.c_contiguous


def test_separate_instances_run_concurrently_from_threads():
    """Kernels release the GIL; one instance per thread (each is single-writer)."""
    rng = np.random.default_rng(5)
    keys = rng.integers(I64.min, I64.max, 20_000, dtype=np.int64)
    vectors = rng.standard_normal((len(keys), 4)).astype(np.float32)
    caches = [HostCache(8192, 4, policy=p) for p in ("lru", "lfu", "lru", "lfu")]
    references = [ReferenceCache(8192, 4, policy=p) for p in ("lru", "lfu", "lru", "lfu")]

    def work(c):
        for _ in range(3):
            c.insert(keys, vectors)
            c.find(keys)

    threads = [threading.Thread(target=work, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c, r in zip(caches, references, strict=True):
        work(r)
        np.testing.assert_array_equal(c.snapshot()["keys"], r.snapshot()["keys"])
        np.testing.assert_array_equal(c.snapshot()["stamp"], r.snapshot()["stamp"])


def test_parallel_bf16_encoder_rounds_like_the_reference():
    rng = np.random.default_rng(9)
    bits = rng.integers(0, 1 << 32, (5000, 3), dtype=np.uint64).astype(np.uint32)
    bits[:16, 0] = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF,
                    0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001,
                    0x7FC00000, 0x00008000, 0x00018000]  # fmt: skip
    vectors = bits.view(np.float32)
    c = HostCache(64, 3, dtype="bfloat16", parallel_min_keys=1)
    np.testing.assert_array_equal(c._encode(vectors), to_bf16_bits(vectors))
