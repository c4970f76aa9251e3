"""One conformance suite for every L1 cache: each verb is checked against the numpy reference.

Each implementation in ``IMPLEMENTATIONS`` runs the same operation sequences side by side with a
``ReferenceCache``; after every operation the results (find rows and hit masks, assign masks,
erase counts, contains masks, export) and the full slot state (``snapshot()``) must match the
reference exactly. ``ReferenceCache`` itself is in the list to check the harness.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from hps_core.cache.reference import ReferenceCache
from hps_core.errors import InvalidInputError

I64 = np.iinfo(np.int64)
SPECIAL_KEYS = np.array([0, -1, I64.min, I64.max], np.int64)
SPECIAL_VALUES = np.array(
    [
        0.0,
        -0.0,
        np.inf,
        -np.inf,
        np.nan,
        7e4,  # fp16 overflow -> inf
        65520.0,  # rounds up to fp16 inf
        1e-7,  # fp16 subnormal
        -3e-8,  # fp16: rounds to a subnormal / -0
        1.00390625,  # bf16 tie (1 + 2**-8): even -> 1.0
        1.01171875,  # bf16 tie (1 + 3 * 2**-8): even -> up
        3.4e38,  # bf16 rounds to inf
        1e-40,  # fp32 subnormal
    ],
    np.float32,
)


def _gpu_factory():
    """GPUCache, or a skip naming what is missing."""
    if importlib.util.find_spec("hps_core.cache.gpu") is None:
        pytest.skip("hps_core.cache.gpu does not exist yet")
    try:
        import cupy
    except ImportError:
        pytest.skip("cupy is not installed")
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or one older than CuPy's CUDA
        pytest.skip(f"no usable CUDA device ({e})")
    if devices < 1:
        pytest.skip("no CUDA device present")
    from hps_core.cache.gpu import GPUCache

    return GPUCache


def _host_factory():
    from hps_core.cache.host import HostCache

    return HostCache


IMPLEMENTATIONS = [
    pytest.param(lambda: ReferenceCache, id="reference"),
    pytest.param(_host_factory, id="host"),
    pytest.param(_gpu_factory, id="gpu", marks=pytest.mark.gpu),
]


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request):
    """The cache class under test."""
    return request.param()


def assert_same_floats(actual, expected, what: str) -> None:
    """Bit-for-bit equal float32 arrays (-0.0 differs from 0.0); any NaN equals any NaN."""
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.dtype == np.float32, f"{what}: dtype {a.dtype}"
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    np.testing.assert_array_equal(nan_a, nan_e, err_msg=f"{what}: NaN positions")
    np.testing.assert_array_equal(
        a.view(np.uint32)[~nan_a], e.view(np.uint32)[~nan_e], err_msg=f"{what}: bits"
    )


class Pair:
    """An implementation and the reference, driven by the same calls and compared after each."""

    def __init__(self, cls, capacity, dim, ways, policy="lru", dtype="float32"):
        cfg = dict(capacity=capacity, dim=dim, ways=ways, policy=policy, dtype=dtype)
        self.ref, self.impl, self.dim = ReferenceCache(**cfg), cls(**cfg), dim
        assert (self.impl.capacity, self.impl.dim) == (self.ref.capacity, dim)

    def check_state(self, op: str) -> None:
        got, want = self.impl.snapshot(), self.ref.snapshot()
        assert got["clock"] == want["clock"], f"after {op}: clock"
        for field in ("keys", "occupied", "stamp"):
            np.testing.assert_array_equal(got[field], want[field], err_msg=f"after {op}: {field}")
        assert_same_floats(got["values"], want["values"], f"after {op}: values")
        assert self.impl.size() == self.ref.size()

    def find(self, keys, prefill: float | None = None):
        outs = [None, None]
        if prefill is not None:  # misses must leave the caller's rows alone
            outs = [np.full((len(keys), self.dim), prefill, np.float32) for _ in range(2)]
        got, got_hit = self.impl.find(keys, out=outs[0])
        want, want_hit = self.ref.find(keys, out=outs[1])
        if prefill is not None:
            assert got is outs[0]
        np.testing.assert_array_equal(got_hit, want_hit, err_msg="find: hit mask")
        assert_same_floats(got, want, "find: rows")
        self.check_state("find")
        return want_hit

    def insert(self, keys, vectors):
        self.impl.insert(keys, vectors)
        self.ref.insert(keys, vectors)
        self.check_state("insert")

    def assign(self, keys, vectors):
        got, want = self.impl.assign(keys, vectors), self.ref.assign(keys, vectors)
        np.testing.assert_array_equal(got, want, err_msg="assign: mask")
        self.check_state("assign")

    def erase(self, keys):
        assert self.impl.erase(keys) == self.ref.erase(keys), "erase: count"
        self.check_state("erase")

    def contains(self, keys):
        got, want = self.impl.contains(keys), self.ref.contains(keys)
        np.testing.assert_array_equal(got, want, err_msg="contains")
        self.check_state("contains")

    def export(self):
        (gk, gv), (wk, wv) = self.impl.export(), self.ref.export()
        assert sorted(gk.tolist()) == sorted(wk.tolist()), "export: keys"
        order_g, order_w = np.argsort(gk, kind="stable"), np.argsort(wk, kind="stable")
        assert_same_floats(gv[order_g], wv[order_w], "export: vectors")

    def clear(self):
        self.impl.clear()
        self.ref.clear()
        self.check_state("clear")


def random_vectors(rng, n: int, dim: int) -> np.ndarray:
    scale = rng.choice(np.array([1e-3, 1.0, 300.0], np.float32), (n, 1))
    v = (rng.standard_normal((n, dim)) * scale).astype(np.float32)
    special = rng.random((n, dim)) < 0.05
    v[special] = rng.choice(SPECIAL_VALUES, int(special.sum()))
    return v


def key_pool(rng, size: int) -> np.ndarray:
    pool = rng.integers(I64.min, I64.max, size, dtype=np.int64, endpoint=True)
    pool[: len(SPECIAL_KEYS)] = SPECIAL_KEYS
    return pool


def run_sequence(pair: Pair, rng, steps: int, pool: np.ndarray, max_batch: int) -> None:
    """Random verbs on keys drawn (with duplicates) from a pool larger than the cache."""
    verbs = ["find", "insert", "assign", "erase", "contains", "export", "clear"]
    weights = np.array([36, 36, 9, 7, 6, 4, 2], float)
    for _ in range(steps):
        verb = rng.choice(verbs, p=weights / weights.sum())
        n = int(rng.choice([0, 1, int(rng.integers(2, max_batch + 1))], p=[0.05, 0.1, 0.85]))
        keys = rng.choice(pool, n)
        if verb == "find":
            pair.find(keys, prefill=None if rng.random() < 0.7 else -7.5)
        elif verb in ("insert", "assign"):
            getattr(pair, verb)(keys, random_vectors(rng, n, pair.dim))
        elif verb == "clear":
            pair.clear()
        elif verb == "export":
            pair.export()
        else:
            getattr(pair, verb)(keys)


CASES = [  # policy, dtype, dim, ways, capacity, steps
    *[(p, d, 3, 4, 64, 120) for p in ("lru", "lfu") for d in ("float32", "float16", "bfloat16")],
    ("lru", "float32", 1, 1, 32, 120),
    ("lfu", "bfloat16", 1, 32, 96, 120),
    ("lfu", "float16", 16, 8, 256, 100),
    ("lru", "bfloat16", 16, 32, 512, 100),
    ("lru", "float16", 128, 8, 128, 60),
    ("lfu", "float32", 128, 1, 64, 60),
    ("lru", "bfloat16", 1024, 4, 16, 40),
    ("lfu", "float16", 1024, 8, 16, 40),
]


@pytest.mark.parametrize(
    "policy, dtype, dim, ways, capacity, steps",
    CASES,
    ids=[f"{p}-{d}-d{dim}-w{w}" for p, d, dim, w, _, _ in CASES],
)
def test_random_operations(impl, policy, dtype, dim, ways, capacity, steps):
    rng = np.random.default_rng([dim, ways, capacity, len(policy), len(dtype)])
    pair = Pair(impl, capacity, dim, ways, policy, dtype)
    pool = key_pool(rng, 3 * pair.ref.capacity)  # sets run full: eviction order matters
    run_sequence(pair, rng, steps, pool, max_batch=2 * pair.ref.capacity)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_special_keys_are_ordinary_keys(impl, policy):
    pair = Pair(impl, 64, 3, 4, policy)
    assert not pair.find(SPECIAL_KEYS).any()  # a free slot reads as key 0 but is no hit
    pair.insert(SPECIAL_KEYS, np.arange(12, dtype=np.float32).reshape(4, 3))
    assert pair.find(np.concatenate([SPECIAL_KEYS, SPECIAL_KEYS[::-1]])).all()
    pair.erase(SPECIAL_KEYS[:1])
    pair.contains(SPECIAL_KEYS)
    pair.export()


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_empty_and_single_key_batches(impl, policy):
    pair = Pair(impl, 16, 2, 4, policy)
    empty, none = np.zeros(0, np.int64), np.zeros((0, 2), np.float32)
    for _ in range(2):  # the clock advances on empty finds and inserts, too
        pair.find(empty)
        pair.insert(empty, none)
        pair.assign(empty, none)
        pair.erase(empty)
        pair.contains(empty)
        pair.export()
    pair.insert(np.array([5]), np.ones((1, 2), np.float32))
    pair.find(np.array([5]), prefill=3.0)
    pair.find(np.array([6]), prefill=3.0)
    pair.assign(np.array([5]), np.full((1, 2), 2.0, np.float32))
    pair.erase(np.array([5]))


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_large_batches(impl, policy):
    """50K-key batches with duplicates over a cache a third that size (parallel kernels)."""
    rng = np.random.default_rng(7)
    pair = Pair(impl, 16384, 4, 8, policy, "float16")
    pool = key_pool(rng, 40_000)
    for _ in range(2):
        keys = rng.choice(pool, 50_000)
        pair.insert(keys, random_vectors(rng, len(keys), 4))
        pair.find(rng.choice(pool, 50_000))
        pair.find(rng.choice(pool, 50_000), prefill=1.5)
    pair.assign(keys, random_vectors(rng, len(keys), 4))
    pair.contains(keys)
    pair.export()
    pair.erase(rng.choice(pool, 50_000))


def test_narrow_key_dtypes_are_widened(impl):
    pair = Pair(impl, 32, 2, 4)
    pair.insert(np.array([1, 2, 3], np.int32), np.ones((3, 2), np.float32))
    pair.find(np.array([3, 4], np.uint32))
    pair.find([1, 2])
    pair.erase(np.array([2], np.uint32))


BAD_INPUTS = [  # verb, args, the field the error must name
    ("find", (np.array([1.0, 2.0]),), "keys"),
    ("find", (np.array([[1, 2]]),), "keys"),
    ("contains", (np.array([2**63], np.uint64),), "keys"),
    ("find", (np.array([1, 2]), np.zeros((2, 3), np.float64)), "out"),
    ("find", (np.array([1, 2]), np.zeros((3, 2), np.float32)), "out"),
    ("insert", (np.array([1, 2]), np.zeros((2, 3), np.float32)), "vectors"),
    ("insert", (np.array([1, 2]), np.zeros((2, 2), np.int32)), "vectors"),
    ("assign", (np.array([1]), np.zeros((2, 2), np.float32)), "vectors"),
    ("erase", (np.array(["a"]),), "keys"),
]


@pytest.mark.parametrize(
    "verb, args, field", BAD_INPUTS, ids=[f"{v}-{f}" for v, _, f in BAD_INPUTS]
)
def test_bad_input_names_the_field_and_changes_nothing(impl, verb, args, field):
    pair = Pair(impl, 16, 2, 4)
    pair.insert(np.array([1, 2]), np.ones((2, 2), np.float32))
    for cache in (pair.ref, pair.impl):
        with pytest.raises(InvalidInputError) as err:
            getattr(cache, verb)(*args)
        assert err.value.field == field
    pair.check_state(f"a rejected {verb}")


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param(_host_factory, id="host"),
        pytest.param(_gpu_factory, id="gpu", marks=pytest.mark.gpu),
    ],
)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_find_into_is_find_on_preallocated_arrays(factory, policy):
    """``find_into`` (the device-resident lookup's call): the rows and hits of ``find``, written
    into the caller's arrays (misses keep their rows), the same touches and clock."""
    cls = factory()
    gpu = cls.__name__ == "GPUCache"
    xp = __import__("cupy") if gpu else np
    a, b = (cls(256, 8, ways=8, policy=policy) for _ in range(2))
    rng = np.random.default_rng(4)
    keys = rng.integers(I64.min, I64.max, 300, dtype=np.int64)
    vecs = rng.standard_normal((300, 8)).astype(np.float32)
    for c in (a, b):
        c.insert(keys, vecs)
    q = np.concatenate([keys[rng.integers(0, 300, 200)], rng.integers(-50, 50, 40)])
    want_rows, want_hit = a.find(q)
    out, hit = xp.full((len(q), 8), 7.0, np.float32), xp.zeros(len(q), np.bool_)
    b.find_into(xp.asarray(q), out, hit)
    host = (lambda x: x.get()) if gpu else (lambda x: x)
    got_rows, got_hit = host(out), host(hit)
    np.testing.assert_array_equal(got_hit, want_hit)
    assert 0 < want_hit.sum() < len(q)
    np.testing.assert_array_equal(got_rows[want_hit], want_rows[want_hit])
    assert (got_rows[~want_hit] == 7.0).all()
    sa, sb = a.snapshot(), b.snapshot()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
