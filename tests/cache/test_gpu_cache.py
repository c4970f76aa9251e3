"""GPUCache against the numpy reference, slot by slot (needs CuPy and a CUDA device)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hps_core.cache.gpu import CacheFullError, GPUCache
from hps_core.cache.reference import ReferenceCache
from hps_core.errors import InvalidInputError

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install cupy-cuda12x)")


def _device_count() -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver, or one older than CuPy's CUDA
        return 0


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_device_count() == 0, reason="no CUDA device")]

I64 = np.iinfo(np.int64)
DTYPES = ["float32", "float16", "bfloat16"]


def pair(capacity, dim, ways, policy="lru", dtype="float32"):
    kw = {"ways": ways, "policy": policy, "dtype": dtype}
    return GPUCache(capacity, dim, **kw), ReferenceCache(capacity, dim, **kw)


def assert_same_slots(gpu: GPUCache, ref: ReferenceCache) -> None:
    a, b = gpu.snapshot(), ref.snapshot()
    assert a["clock"] == b["clock"]
    for name in ("keys", "occupied", "stamp", "values"):
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def host(a):
    return cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else a


def universe(rng, size: int) -> np.ndarray:
    special = np.array([0, -1, 1, I64.min, I64.max], np.int64)
    return np.concatenate([special, rng.integers(I64.min, I64.max, size, dtype=np.int64)])


def run_ops(gpu, ref, rng, keys_from, steps, max_batch):
    """Random verbs with duplicate keys, NumPy or CuPy; results and every slot compared."""
    for _ in range(steps):
        wrap = cupy.asarray if rng.random() < 0.5 else (lambda a: a)
        op = rng.choice(["find", "insert", "insert", "assign", "erase", "contains"])
        n = int(rng.choice([0, 1, rng.integers(2, max_batch + 1)]))
        keys = rng.choice(keys_from, n)
        vectors = (rng.standard_normal((n, ref.dim)) * 3).astype(np.float32)
        if op == "find":
            (rows, hit), (want_rows, want_hit) = gpu.find(wrap(keys)), ref.find(keys)
            assert type(rows) is type(wrap(vectors)) and type(hit) is type(rows)
            np.testing.assert_array_equal(host(hit), want_hit)
            np.testing.assert_array_equal(host(rows), want_rows)
        elif op == "insert":
            gpu.insert(wrap(keys), wrap(vectors))
            ref.insert(keys, vectors)
        elif op == "assign":
            got = gpu.assign(wrap(keys), wrap(vectors))
            np.testing.assert_array_equal(host(got), ref.assign(keys, vectors))
        elif op == "erase":
            assert gpu.erase(wrap(keys)) == ref.erase(keys)
        else:
            np.testing.assert_array_equal(host(gpu.contains(wrap(keys))), ref.contains(keys))
        assert_same_slots(gpu, ref)
        assert gpu.size() == ref.size()


# -- the set-associative cache against the reference ----------------------------------------------


@pytest.mark.parametrize("ways", [8, 32])
@pytest.mark.parametrize("dim", [1, 13, 16, 128, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_random_ops_match_the_reference(policy, dtype, dim, ways):
    rng = np.random.default_rng([ways, dim, DTYPES.index(dtype), policy == "lfu"])
    gpu, ref = pair(80, dim, ways, policy, dtype)
    keys_from = universe(rng, 3 * ref.capacity)
    run_ops(gpu, ref, rng, keys_from, steps=30, max_batch=120)
    k, v = gpu.export()
    want_k, want_v = ref.export()
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_one_set_receives_many_keys(policy):
    rng = np.random.default_rng(5)
    gpu, ref = pair(8, 4, 8, policy)  # a single set: every key of a batch competes
    assert gpu.num_sets == 1
    keys_from = universe(rng, 40)
    run_ops(gpu, ref, rng, keys_from, steps=40, max_batch=300)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_million_key_batches(policy):
    rng = np.random.default_rng(7)
    gpu, ref = pair(1 << 16, 16, 32, policy, "float16")
    keys = rng.integers(-150_000, 150_000, 1_000_000, dtype=np.int64)  # ~300k distinct
    vectors = rng.standard_normal((len(keys), 16)).astype(np.float32)
    gpu.insert(cupy.asarray(keys), cupy.asarray(vectors))
    ref.insert(keys, vectors)
    assert_same_slots(gpu, ref)
    query = rng.integers(-150_000, 150_000, 1_000_000, dtype=np.int64)
    rows, hit = gpu.find(query)
    want_rows, want_hit = ref.find(query)
    np.testing.assert_array_equal(hit, want_hit)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(gpu.assign(query, rows), ref.assign(query, rows))
    assert gpu.erase(query[::2]) == ref.erase(query[::2])
    assert_same_slots(gpu, ref)


def test_empty_and_single_key_batches():
    gpu, ref = pair(64, 3, 8)
    for keys in (np.array([], np.int64), cupy.array([], cupy.int64)):
        rows, hit = gpu.find(keys)
        assert rows.shape == (0, 3) and hit.shape == (0,) and type(rows) is type(keys)
        gpu.insert(keys, np.zeros((0, 3), np.float32))
        assert gpu.assign(keys, []).shape == (0,) and gpu.contains(keys).shape == (0,)
        assert gpu.erase(keys) == 0
    for _ in range(2):
        ref.find([])
        ref.insert([], np.zeros((0, 3), np.float32))
    gpu.insert(np.array([42], np.uint32), np.full((1, 3), 1.5, np.float32))
    ref.insert(np.array([42], np.uint32), np.full((1, 3), 1.5, np.float32))
    assert_same_slots(gpu, ref)
    rows, hit = gpu.find([42])
    assert hit.tolist() == [True] and (rows == 1.5).all()


# -- storage rounding and output dtypes ------------------------------------------------------------

SPECIAL = np.concatenate(
    [
        np.array(
            [0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00008000, 0x80018000, 0x80000000, 0x00000001],
            np.uint32,
        ).view(np.float32),
        np.array([1.0, -2.5, 1e-8, 6e-5, 65519.0, 65520.0, 7e4, -7e4, np.inf, -np.inf, np.nan]),
        np.array([1 + 2**-11, 1 + 3 * 2**-11, 2049.0, 2051.0], np.float64),  # fp16 ties
    ]
).astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [4, 8, 24])  # vectorised and element-wise copies
def test_rounding_matches_numpy(dtype, dim):
    values = np.resize(SPECIAL, (len(SPECIAL), dim)).astype(np.float32)
    keys = np.arange(len(values))
    gpu, ref = pair(256, dim, 8, dtype=dtype)
    gpu.insert(keys, values)
    ref.insert(keys, values)
    rows, hit = gpu.find(keys)
    assert hit.all()
    np.testing.assert_array_equal(rows, ref.find(keys)[0])  # NaN == NaN here


@pytest.mark.parametrize("dtype", DTYPES)
def test_float16_output(dtype):
    rng = np.random.default_rng(2)
    values = (rng.standard_normal((50, 16)) * 100).astype(np.float32)
    gpu = GPUCache(256, 16, ways=8, dtype=dtype, output_dtype="float16")
    ref = ReferenceCache(256, 16, ways=8, dtype=dtype)
    gpu.insert(np.arange(50), values)
    ref.insert(np.arange(50), values)
    for query in (np.arange(60), cupy.arange(60)):
        rows, hit = gpu.find(query)
        assert rows.dtype == np.float16
        want, want_hit = ref.find(np.arange(60))
        np.testing.assert_array_equal(host(hit), want_hit)
        np.testing.assert_array_equal(host(rows), want.astype(np.float16))


# -- arrays, streams, out ---------------------------------------------------------------------------


def test_cupy_in_cupy_out_without_synchronisation():
    import cupyx

    gpu = GPUCache(1024, 16, ways=8)
    keys = cupy.arange(200, dtype=cupy.int64)
    vectors = cupy.arange(200 * 16, dtype=cupy.float32).reshape(200, 16)
    query = cupy.arange(100, 300, dtype=cupy.int64)
    with cupyx.allow_synchronize(False):
        gpu.insert(keys, vectors)
        rows, hit = gpu.find(query)
        rows2, hit2, missing, count = gpu.find_missing(query)
        cached = gpu.assign(query, rows)
        found = gpu.contains(query)
    for a in (rows, hit, rows2, hit2, missing, count, cached, found):
        assert isinstance(a, cupy.ndarray)
    want_hit = np.arange(100, 300) < 200
    np.testing.assert_array_equal(host(hit), want_hit)
    np.testing.assert_array_equal(host(found), want_hit)
    np.testing.assert_array_equal(host(cached), want_hit)
    np.testing.assert_array_equal(host(rows)[:100], host(vectors)[100:])
    assert (host(rows)[100:] == 0).all()
    assert int(count) == 100 and count.shape == ()
    np.testing.assert_array_equal(host(missing), np.r_[np.arange(100, 200), np.full(100, -1)])


def test_find_missing_on_numpy():
    gpu = GPUCache(64, 2, ways=8)
    gpu.insert([5, 7], np.ones((2, 2), np.float32))
    rows, hit, missing, count = gpu.find_missing(np.array([1, 5, 2, 7, 3]))
    assert isinstance(missing, np.ndarray) and int(count) == 3
    assert missing.tolist() == [0, 2, 4, -1, -1] and hit.tolist() == [0, 1, 0, 1, 0]


def test_out_arguments_keep_miss_rows():
    gpu = GPUCache(64, 6, ways=8)
    gpu.insert([1], np.full((1, 6), 2.0, np.float32))
    out = np.full((2, 6), 7, np.float32)
    res, hit = gpu.find([1, 2], out=out)
    assert res is out and hit.tolist() == [True, False]
    assert (out[0] == 2).all() and (out[1] == 7).all()
    # a CuPy out 4 bytes off 16-byte alignment takes the element-wise copy
    buf = cupy.full(2 * 8 + 1, 7, cupy.float32)
    gpu8 = GPUCache(64, 8, ways=8)
    gpu8.insert(cupy.array([1]), cupy.full((1, 8), 2.0, cupy.float32))
    dev_out = buf[1:].reshape(2, 8)
    res, hit = gpu8.find(cupy.array([1, 2]), out=dev_out)
    assert res is dev_out and host(hit).tolist() == [True, False]
    assert (host(dev_out)[0] == 2).all() and (host(dev_out)[1] == 7).all()
    with pytest.raises(InvalidInputError, match="out"):
        gpu.find([1], out=np.zeros((1, 6), np.float64))
    with pytest.raises(InvalidInputError, match="out"):
        gpu.find(cupy.array([1]), out=np.zeros((1, 6), np.float32))
    with pytest.raises(InvalidInputError, match="keys"):
        gpu.find(cupy.array([1.0]))
    with pytest.raises(InvalidInputError, match="vectors"):
        gpu.insert(cupy.array([1]), cupy.zeros((1, 5), cupy.float32))
    assert gpu.clock == 2  # rejected calls change nothing


def test_every_verb_on_a_non_blocking_stream():
    rng = np.random.default_rng(11)
    gpu, ref = pair(128, 32, 8, "lfu", "bfloat16")
    stream = cupy.cuda.Stream(non_blocking=True)
    keys_from = universe(rng, 300)
    for _ in range(20):
        keys = rng.choice(keys_from, 64)
        vectors = rng.standard_normal((64, 32)).astype(np.float32)
        gpu.insert(keys, vectors, stream=stream)
        ref.insert(keys, vectors)
        query = rng.choice(keys_from, 64)
        rows, hit = gpu.find(query, stream=stream)
        want_rows, want_hit = ref.find(query)
        np.testing.assert_array_equal(hit, want_hit)
        np.testing.assert_array_equal(rows, want_rows)
        cached = gpu.assign(query, rows, stream=stream)
        np.testing.assert_array_equal(cached, ref.assign(query, rows))
        assert gpu.erase(query[:8], stream=stream) == ref.erase(query[:8])
        np.testing.assert_array_equal(gpu.contains(query, stream=stream), ref.contains(query))
    stream.synchronize()
    assert_same_slots(gpu, ref)
    gpu.clear(stream=stream)
    ref.clear()
    assert_same_slots(gpu, ref)


# -- concurrency ----------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["assign", "insert"])
def test_concurrent_find_never_returns_a_torn_row(writer):
    """Rows hold key * 1000 + version in every element; readers must see one whole row."""
    dim, rounds = 1024, 60
    gpu = GPUCache(4096, dim, ways=32)
    keys = np.arange(8192 if writer == "insert" else 4096, dtype=np.int64)
    dev_keys = cupy.asarray(keys)

    def rows_for(k, version):
        return cupy.broadcast_to((k * 1000 + version).astype(cupy.float32)[:, None], (len(k), dim))

    gpu.insert(dev_keys[:4096], cupy.ascontiguousarray(rows_for(dev_keys[:4096], 0)))
    bad, hits, errors = [], [], []

    def write():
        try:
            stream = cupy.cuda.Stream(non_blocking=True)
            rng = np.random.default_rng(1)
            with stream:
                for version in range(1, rounds + 1):
                    k = (
                        dev_keys
                        if writer == "assign"
                        else cupy.asarray(rng.permutation(keys)[:4096])
                    )
                    v = cupy.ascontiguousarray(rows_for(k, version))
                    getattr(gpu, writer)(k, v, stream=stream)
                stream.synchronize()
        except Exception as e:  # surfaced below
            errors.append(e)

    def read():
        try:
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream:
                n_bad = cupy.zeros((), cupy.int64)
                n_hit = cupy.zeros((), cupy.int64)
                for _ in range(rounds):
                    rows, hit = gpu.find(dev_keys, stream=stream)
                    whole = (rows == rows[:, :1]).all(axis=1)
                    owner = cupy.floor(rows[:, 0] / 1000).astype(cupy.int64) == dev_keys
                    n_bad += (hit & ~(whole & owner)).sum()
                    n_hit += hit.sum()
                bad.append(int(n_bad))
                hits.append(int(n_hit))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert bad == [0], f"{bad[0]} torn or foreign rows"
    assert hits[0] > 0


# -- the static table -------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 13, 16, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_static_table_against_a_dict(dtype, dim):
    rng = np.random.default_rng([dim, DTYPES.index(dtype)])
    capacity = 300
    gpu = GPUCache(capacity, dim, dtype=dtype, static=True)
    codec = ReferenceCache(1, dim, dtype=dtype)  # the storage rounding
    model: dict[int, np.ndarray] = {}
    keys_from = universe(rng, 2 * capacity)
    on_device = dim % 2 == 0
    wrap = cupy.asarray if on_device else (lambda a: a)
    for _ in range(60):
        op = rng.choice(["insert", "insert", "find", "assign", "erase", "contains"])
        n = int(rng.choice([0, 1, rng.integers(2, 150)]))
        keys = rng.choice(keys_from, n)
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        stored = codec.decode(codec.encode(vectors))
        if op == "insert":
            new = set(keys.tolist()) - set(model)
            if len(model) + len(new) > capacity:
                before = gpu.snapshot()
                with pytest.raises(CacheFullError, match="nothing was inserted"):
                    gpu.insert(wrap(keys), wrap(vectors))
                after = gpu.snapshot()
                for name in ("keys", "occupied", "values"):
                    np.testing.assert_array_equal(after[name], before[name])
            else:
                gpu.insert(wrap(keys), wrap(vectors))
                model.update(zip(keys.tolist(), stored, strict=True))
        elif op == "find":
            rows, hit = gpu.find(wrap(keys))
            want_hit = np.array([k in model for k in keys.tolist()], bool)
            np.testing.assert_array_equal(host(hit), want_hit)
            want = np.array([model.get(k, np.zeros(dim, np.float32)) for k in keys.tolist()])
            np.testing.assert_array_equal(host(rows), want.reshape(n, dim))
        elif op == "assign":
            got = gpu.assign(wrap(keys), wrap(vectors))
            np.testing.assert_array_equal(host(got), [k in model for k in keys.tolist()])
            for k, row in zip(keys.tolist(), stored, strict=True):
                if k in model:
                    model[k] = row
        elif op == "erase":
            distinct = set(keys.tolist())
            assert gpu.erase(wrap(keys)) == len(distinct & set(model))
            for k in distinct:
                model.pop(k, None)
        else:
            got = host(gpu.contains(wrap(keys)))
            np.testing.assert_array_equal(got, [k in model for k in keys.tolist()])
        assert gpu.size() == len(model)
    k, v = gpu.export()
    assert sorted(k.tolist()) == sorted(model)
    np.testing.assert_array_equal(v, np.array([model[x] for x in k.tolist()]).reshape(-1, dim))


def test_static_table_fills_exactly_and_reuses_erased_rows():
    gpu = GPUCache(100, 4, static=True)
    assert gpu.table_slots == 256
    keys = np.arange(100) * 7919
    gpu.insert(keys, np.ones((100, 4), np.float32))
    assert gpu.size() == 100
    with pytest.raises(CacheFullError):
        gpu.insert([1], np.ones((1, 4), np.float32))
    gpu.insert(keys[:10], np.full((10, 4), 3, np.float32))  # cached keys still update
    assert gpu.erase(keys[:50]) == 50
    fresh = np.arange(50) + 10**9
    gpu.insert(fresh, np.full((50, 4), 5, np.float32))
    assert gpu.size() == 100
    rows, hit = gpu.find(np.concatenate([fresh, keys]))
    assert hit.tolist() == [True] * 50 + [False] * 50 + [True] * 50
    assert (rows[:50] == 5).all() and (rows[100:] == 1).all()
    gpu.clear()
    assert gpu.size() == 0 and not gpu.contains(keys).any()
    assert gpu.memory_bytes() > 0
