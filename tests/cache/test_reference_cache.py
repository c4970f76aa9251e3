"""The numpy reference L1 cache: hand-built eviction cases and a cross-check against a pure-Python model."""

from __future__ import annotations

import struct
from fractions import Fraction

import numpy as np
import pytest

from hps_core.cache.reference import ReferenceCache, from_bf16_bits, to_bf16_bits
from hps_core.errors import InvalidInputError
from hps_core.hashing import splitmix64

I64 = np.iinfo(np.int64)
M64 = (1 << 64) - 1


def py_splitmix64(x: int) -> int:
    """SplitMix64 in plain Python integers (independent of the numpy version)."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def py_set(key: int, num_sets: int) -> int:
    return py_splitmix64(key & M64) % num_sets


def vec(*rows: float, dim: int = 2) -> np.ndarray:
    """One row per value, every component equal to it."""
    return np.repeat(np.asarray(rows, np.float32)[:, None], dim, axis=1)


def keys_in_set(s: int, num_sets: int, count: int) -> list[int]:
    found = [k for k in range(1000) if py_set(k, num_sets) == s]
    return found[:count]


def cached(c: ReferenceCache) -> set[int]:
    return set(c.export()[0].tolist())


# -- hashing ----------------------------------------------------------------------------------


def test_splitmix64_matches_python_and_known_value():
    assert py_splitmix64(0) == 0xE220A8397B1DCDAF  # first output of splitmix64.c, seed 0
    ks = np.array([0, 1, -1, I64.min, I64.max, 12345678901234], np.int64)
    assert splitmix64(ks).tolist() == [py_splitmix64(int(k) & M64) for k in ks]
    assert int(splitmix64(np.uint64(7))) == py_splitmix64(7)


# -- hand-built eviction ---------------------------------------------------------------------


def test_lru_eviction_order_one_set():
    c = ReferenceCache(4, 2, ways=4, policy="lru")
    assert c.num_sets == 1 and c.capacity == 4
    c.insert([1, 2, 3, 4], vec(1, 2, 3, 4))  # tick 1, ways 0..3
    c.find([1])  # tick 2: key 1 is now the most recent
    c.insert([5], vec(5))  # tick 3: keys 2, 3, 4 tie at stamp 1 -> lowest way (key 2)
    assert cached(c) == {1, 3, 4, 5}
    assert c.keys[0].tolist() == [1, 5, 3, 4]
    c.find([3])  # tick 4
    c.insert([6], vec(6))  # tick 5: stamps 1:2, 5:3, 3:4, 4:1 -> evict 4
    assert cached(c) == {1, 3, 5, 6}
    assert c.stamp[0].tolist() == [2, 3, 4, 5]
    np.testing.assert_array_equal(c.find([6, 4])[0], vec(6, 0))


def test_lfu_eviction_order_one_set():
    c = ReferenceCache(4, 2, ways=4, policy="lfu")
    c.insert([1, 2, 3, 4], vec(1, 2, 3, 4))
    c.find([1, 1, 1, 2, 3])  # counts per occurrence: 1->4, 2->2, 3->2, 4->1
    assert c.stamp[0].tolist() == [4, 2, 2, 1]
    c.insert([5], vec(5))  # evicts 4 (count 1); a new row counts 1
    assert c.keys[0].tolist() == [1, 2, 3, 5] and c.stamp[0].tolist() == [4, 2, 2, 1]
    c.insert([2], vec(20))  # present: overwrite and count + 1
    assert c.stamp[0].tolist() == [4, 3, 2, 1]
    c.find([5, 5, 5])  # 5 -> 4; now 3 (count 2) is the least used
    c.insert([6], vec(6))
    assert cached(c) == {1, 2, 5, 6}
    np.testing.assert_array_equal(c.find([2])[0], vec(20))


def test_lfu_ties_take_lowest_way():
    c = ReferenceCache(4, 1, ways=4, policy="lfu")
    c.insert([1, 2, 3, 4], vec(1, 2, 3, 4, dim=1))
    c.insert([9], vec(9, dim=1))
    assert c.keys[0].tolist() == [9, 2, 3, 4]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_two_sets_evict_independently(policy):
    c = ReferenceCache(4, 2, ways=2, policy=policy)
    assert c.num_sets == 2
    a = keys_in_set(0, 2, 3)
    b = keys_in_set(1, 2, 2)
    c.insert(b, vec(*b))
    c.insert(a, vec(*a))  # third key of set 0 evicts the first (same tick/count: lowest way)
    assert cached(c) == {a[1], a[2], *b}
    assert c.keys[0].tolist() == [a[2], a[1]]


def test_insert_updates_present_keys_before_placing_new_ones():
    c = ReferenceCache(3, 1, ways=3, policy="lru")
    c.insert([1, 2, 3], vec(1, 2, 3, dim=1))  # tick 1
    c.find([2, 3])  # tick 2
    c.insert([4, 1], vec(4, 10, dim=1))  # tick 3: key 1 touched first, so 4 evicts 2 (way 1)
    assert c.keys[0].tolist() == [1, 4, 3]
    assert c.stamp[0].tolist() == [3, 3, 2]


def test_new_keys_placed_in_order_of_their_last_occurrence():
    c = ReferenceCache(2, 1, ways=2)
    c.insert([7, 8, 7], vec(1, 2, 3, dim=1))
    assert c.keys[0].tolist() == [8, 7]
    np.testing.assert_array_equal(c.find([7, 8])[0], vec(3, 2, dim=1))


def test_keys_of_one_batch_can_evict_each_other():
    c = ReferenceCache(2, 1, ways=2)
    c.insert([1, 2, 3], vec(1, 2, 3, dim=1))  # 3 evicts way 0 (1): all share the tick
    assert c.keys[0].tolist() == [3, 2]


# -- keys, duplicates, verbs -----------------------------------------------------------------


def test_every_int64_is_a_key_no_sentinel():
    c = ReferenceCache(64, 3)
    special = np.array([0, -1, I64.min, I64.max], np.int64)
    assert not c.find(special)[1].any()  # an empty slot (key 0) is not a hit for key 0
    c.insert(special, vec(1, 2, 3, 4, dim=3))
    out, hit = c.find(special)
    assert hit.all()
    np.testing.assert_array_equal(out, vec(1, 2, 3, 4, dim=3))
    assert c.erase([0]) == 1
    assert c.contains(special).tolist() == [False, True, True, True]
    assert not c.find([0])[1][0]


def test_duplicates_in_a_batch():
    c = ReferenceCache(8, 2, ways=4, policy="lfu")
    c.insert([5, 5, 5], vec(1, 2, 3))
    assert c.size() == 1
    s, w = np.argwhere(c.occupied)[0]
    assert c.stamp[s, w] == 1  # counted once: the batch is deduplicated
    out, hit = c.find([5, 5, 5])
    assert hit.all() and (out == 3).all()
    assert c.stamp[s, w] == 4


def test_assign_only_present_keys_without_touch():
    c = ReferenceCache(8, 2, ways=8)
    c.insert([1, 2], vec(1, 2))
    before = c.snapshot()
    mask = c.assign([2, 3, 2], vec(20, 30, 21))
    assert mask.tolist() == [True, False, True]
    after = c.snapshot()
    assert after["clock"] == before["clock"]
    np.testing.assert_array_equal(after["stamp"], before["stamp"])
    assert cached(c) == {1, 2}
    np.testing.assert_array_equal(c.find([1, 2, 3])[0], vec(1, 21, 0))


def test_erase_counts_and_frees_the_lowest_way():
    c = ReferenceCache(4, 1, ways=4)
    c.insert([1, 2, 3, 4], vec(1, 2, 3, 4, dim=1))
    assert c.erase([2, 2, 9]) == 1
    assert c.size() == 3 and not c.contains([2])[0]
    c.insert([5], vec(5, dim=1))
    assert c.keys[0].tolist() == [1, 5, 3, 4]
    c.clear()
    assert c.size() == 0 and c.export()[0].size == 0 and c.clock == 2


def test_contains_does_not_touch():
    c = ReferenceCache(4, 1, ways=4, policy="lfu")
    c.insert([1], vec(1, dim=1))
    before = c.snapshot()
    assert c.contains([1, 2]).tolist() == [True, False]
    assert c.snapshot()["clock"] == before["clock"]
    np.testing.assert_array_equal(c.snapshot()["stamp"], before["stamp"])


def test_export_round_trip():
    rng = np.random.default_rng(0)
    keys = rng.integers(I64.min, I64.max, 50, dtype=np.int64)
    vectors = rng.standard_normal((50, 4)).astype(np.float32)
    c = ReferenceCache(4096, 4)
    c.insert(keys, vectors)
    k, v = c.export()
    assert sorted(k.tolist()) == sorted(keys.tolist())
    np.testing.assert_array_equal(v, vectors[[keys.tolist().index(x) for x in k]])
    d = ReferenceCache(4096, 4)
    d.insert(k, v)
    k2, v2 = d.export()
    np.testing.assert_array_equal(k2, k)
    np.testing.assert_array_equal(v2, v)


def test_batch_sizes_zero_and_one():
    c = ReferenceCache(8, 3)
    out, hit = c.find(np.array([], np.int64))
    assert out.shape == (0, 3) and hit.shape == (0,)
    c.insert([], np.zeros((0, 3), np.float32))
    c.insert(np.array([], np.int32), [])
    assert c.clock == 3 and c.size() == 0
    assert c.contains([]).shape == (0,) and c.erase([]) == 0
    c.insert(np.array([42], np.uint32), vec(1.5, dim=3))
    out, hit = c.find(np.array([42], np.int64))
    assert hit.tolist() == [True] and (out == 1.5).all()


def test_find_out_keeps_miss_rows():
    c = ReferenceCache(8, 2)
    c.insert([1], vec(1))
    out = np.full((2, 2), 7, np.float32)
    res, hit = c.find([1, 2], out=out)
    assert res is out and hit.tolist() == [True, False]
    np.testing.assert_array_equal(out, vec(1, 7))


# -- storage dtypes ---------------------------------------------------------------------------


def bf16_nearest(x: np.float32) -> int:
    """bf16 bits nearest to x by exact rational distance (ties to even; beyond max -> inf)."""
    bits = struct.unpack("<I", struct.pack("<f", float(x)))[0]
    lo = bits >> 16

    def value(b16: int) -> Fraction:
        e, m = (b16 >> 7) & 0xFF, b16 & 0x7F
        mag = (
            Fraction(m, 128) * Fraction(2) ** -126
            if e == 0
            else (1 + Fraction(m, 128)) * Fraction(2) ** (e - 127)
        )
        return -mag if b16 & 0x8000 else mag

    exact = Fraction(float(x))
    d_lo, d_hi = abs(exact - value(lo)), abs(exact - value(lo + 1))
    if d_lo != d_hi:
        return lo if d_lo < d_hi else lo + 1
    return lo if lo % 2 == 0 else lo + 1


def test_bf16_rounding_matches_an_independent_formula():
    rng = np.random.default_rng(3)
    xs = np.concatenate(
        [
            rng.standard_normal(2000).astype(np.float32)
            * np.float32(10.0) ** rng.integers(-30, 30, 2000).astype(np.float32),
            np.array(
                [0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00008000, 0x80018000, 0x80000000], np.uint32
            ).view(np.float32),
            np.array([1.0, -2.5, 1e-40, np.inf, -np.inf], np.float32),
        ]
    ).astype(np.float32)
    xs = xs[np.isfinite(xs) | np.isinf(xs)]
    got = to_bf16_bits(xs)
    for x, g in zip(xs, got.tolist(), strict=True):
        if np.isinf(x):
            assert g == (0xFF80 if x < 0 else 0x7F80)
        else:
            assert g == bf16_nearest(x), hex(np.float32(x).view(np.uint32))
    nan = to_bf16_bits(np.array([np.nan, np.uint32(0x7F800001).view(np.float32)], np.float32))
    assert np.isnan(from_bf16_bits(nan)).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reads_return_the_stored_rounding(dtype):
    rng = np.random.default_rng(1)
    v = (rng.standard_normal((20, 8)) * 3).astype(np.float32)
    keys = np.arange(20)
    c = ReferenceCache(256, 8, dtype=dtype)
    c.insert(keys, v)
    out, hit = c.find(keys)
    assert hit.all()
    expect = (
        v.astype(np.float16).astype(np.float32)
        if dtype == "float16"
        else from_bf16_bits(to_bf16_bits(v))
    )
    np.testing.assert_array_equal(out, expect)
    if dtype == "bfloat16":
        assert c.values.dtype == np.uint16 and np.array_equal(
            out.view(np.uint32) & 0xFFFF, np.zeros_like(out, np.uint32)
        )
    c.assign(keys[:1], v[1:2])
    np.testing.assert_array_equal(c.find(keys[:1])[0], expect[1:2])


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"capacity": 0}, "capacity"),
        ({"dim": 0}, "dim"),
        ({"ways": 0}, "ways"),
        ({"policy": "fifo"}, "policy"),
        ({"dtype": "int8"}, "dtype"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ReferenceCache(**{"capacity": 8, "dim": 2, **kwargs})


def test_bad_inputs():
    c = ReferenceCache(8, 2)
    with pytest.raises(InvalidInputError, match="keys"):
        c.find(np.array([1.0, 2.0]))
    with pytest.raises(InvalidInputError, match="keys"):
        c.contains(np.array([[1, 2]]))
    with pytest.raises(InvalidInputError, match="keys"):
        c.find(np.array([2**63], np.uint64))
    with pytest.raises(InvalidInputError, match="vectors"):
        c.insert([1, 2], np.zeros((2, 3), np.float32))
    with pytest.raises(InvalidInputError, match="vectors"):
        c.insert([1, 2], np.zeros((1, 2), np.float32))
    with pytest.raises(InvalidInputError, match="vectors"):
        c.assign([1], np.zeros((1, 2), np.int64))
    with pytest.raises(InvalidInputError, match="out"):
        c.find([1], out=np.zeros((2, 2), np.float32))
    assert c.clock == 0 and c.size() == 0  # rejected calls change nothing


# -- random sequences against an independent model -------------------------------------------


class DictModel:
    """Set-associative cache as a dict: set -> list of ways, each None or [key, stamp, vector]."""

    def __init__(self, num_sets: int, ways: int, policy: str):
        self.num_sets, self.ways, self.policy = num_sets, ways, policy
        self.sets = {s: [None] * ways for s in range(num_sets)}
        self.clock = 0

    def _slot(self, key):
        for row in self.sets[py_set(key, self.num_sets)]:
            if row is not None and row[0] == key:
                return row
        return None

    def _touch(self, row):
        row[1] = self.clock if self.policy == "lru" else row[1] + 1

    def find(self, keys):
        self.clock += 1
        out = []
        for k in keys:
            row = self._slot(k)
            out.append(None if row is None else row[2])
            if row is not None:
                self._touch(row)
        return out

    def insert(self, keys, vectors):
        self.clock += 1
        last = {k: i for i, k in enumerate(keys)}
        batch = [(k, vectors[i]) for i, k in enumerate(keys) if last[k] == i]
        new = []
        for k, v in batch:
            row = self._slot(k)
            if row is None:
                new.append((k, v))
            else:
                row[2] = v
                self._touch(row)
        for k, v in new:
            ways = self.sets[py_set(k, self.num_sets)]
            free = [w for w in range(self.ways) if ways[w] is None]
            w = free[0] if free else min(range(self.ways), key=lambda w: (ways[w][1], w))
            ways[w] = [k, self.clock if self.policy == "lru" else 1, v]

    def assign(self, keys, vectors):
        mask = [self._slot(k) is not None for k in keys]
        for i, k in enumerate(keys):
            row = self._slot(k)
            if row is not None:
                row[2] = vectors[i]
        return mask

    def erase(self, keys):
        n = 0
        for k in set(keys):
            ways = self.sets[py_set(k, self.num_sets)]
            for w, row in enumerate(ways):
                if row is not None and row[0] == k:
                    ways[w] = None
                    n += 1
        return n


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("capacity, ways", [(4, 2), (8, 4), (5, 8), (6, 1), (24, 4)])
def test_random_ops_match_dict_model(policy, capacity, ways):
    rng = np.random.default_rng(capacity * 10 + ways)
    universe = np.array([0, -1, I64.min, I64.max, *range(1, 28)], np.int64)
    c = ReferenceCache(capacity, 2, ways=ways, policy=policy)
    m = DictModel(c.num_sets, ways, policy)
    for _ in range(300):
        op = rng.choice(["find", "insert", "insert", "assign", "erase", "contains"])
        keys = rng.choice(universe, rng.integers(0, 9))
        vectors = rng.standard_normal((len(keys), 2)).astype(np.float32)
        kl = keys.tolist()
        if op == "find":
            out, hit = c.find(keys)
            want = m.find(kl)
            assert hit.tolist() == [w is not None for w in want]
            for row, w in zip(out, want, strict=True):
                np.testing.assert_array_equal(row, np.zeros(2) if w is None else w)
        elif op == "insert":
            c.insert(keys, vectors)
            m.insert(kl, list(vectors))
        elif op == "assign":
            assert c.assign(keys, vectors).tolist() == m.assign(kl, list(vectors))
        elif op == "erase":
            assert c.erase(keys) == m.erase(kl)
        else:
            assert c.contains(keys).tolist() == [m._slot(k) is not None for k in kl]
        snap = c.snapshot()
        assert snap["clock"] == m.clock
        for s in range(c.num_sets):
            for w in range(ways):
                row = m.sets[s][w]
                assert snap["occupied"][s, w] == (row is not None)
                if row is not None:
                    assert (snap["keys"][s, w], snap["stamp"][s, w]) == (row[0], row[1])
                    np.testing.assert_array_equal(snap["values"][s, w], row[2])
    assert c.size() == sum(r is not None for ways_ in m.sets.values() for r in ways_)
