"""The in-process hash-map VDB against a dict reference: verbs, overflow policies, memory, threads."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from file_reference import stored

from hps_core.cache.reference import from_bf16_bits
from hps_core.errors import HPSError, InvalidInputError, StorageError
from hps_core.vdb import shm
from hps_core.vdb.hashmap import HashMapVDB, estimate_table_bytes

I64 = np.iinfo(np.int64)
EXTREMES = np.array([I64.min, I64.max, 0, -1, 1, I64.min + 1, I64.max - 1], np.int64)


def check_against(vdb: HashMapVDB, table: str, ref: dict, dim: int, probe: np.ndarray) -> None:
    got, found = vdb.fetch(table, probe)
    expect_found = np.array([k in ref for k in probe.tolist()], bool)
    np.testing.assert_array_equal(found, expect_found)
    expect = np.array([ref.get(k, np.zeros(dim, np.float32)) for k in probe.tolist()])
    np.testing.assert_array_equal(got, expect.reshape(len(probe), dim))
    np.testing.assert_array_equal(vdb.contains(table, probe), expect_found)
    assert vdb.size(table) == len(ref)


@pytest.mark.parametrize(
    "dim,dtype,parts",
    [
        (1, "float32", 1),
        (16, "float16", 4),
        (64, "float32", 7),
        (16, "float32", 16),
        (8, "bfloat16", 5),
        (7, "int8", 3),  # an odd dim: the row is padded after its scale
        (32, "int8", 6),
    ],
)
def test_random_operations_match_a_dict(dim, dtype, parts):
    rng = np.random.default_rng(dim * 100 + parts)
    vdb = HashMapVDB(num_partitions=parts)
    vdb.create_table("t", dim, dtype=dtype)  # starts at 64 rows per partition, grows past it
    ref: dict[int, np.ndarray] = {}
    small = np.arange(-50, 50, dtype=np.int64)
    universe = np.concatenate([EXTREMES, small, rng.integers(I64.min, I64.max, 4000)])
    for _ in range(60):
        op = rng.integers(0, 4)
        keys = rng.choice(universe, rng.integers(0, 600))  # duplicates included
        if op <= 1:  # upsert or load: a later duplicate wins
            vecs = rng.standard_normal((len(keys), dim)).astype(np.float32)
            if dtype != "int8":  # int8 rows must be finite (a test below)
                vecs[rng.random(len(keys)) < 0.01] = np.nan  # NaN is stored, not checked
            (vdb.upsert if op == 0 else vdb.load)("t", keys, vecs)
            ref.update(zip(keys.tolist(), stored(vecs, dtype), strict=True))
        elif op == 2:
            removed = vdb.evict("t", keys)
            assert removed == len({k for k in keys.tolist() if k in ref})
            for k in keys.tolist():
                ref.pop(k, None)
        else:
            check_against(vdb, "t", ref, dim, rng.choice(universe, 700))
    check_against(vdb, "t", ref, dim, universe)
    check_against(vdb, "t", ref, dim, EXTREMES)
    dk, dv = vdb.dump("t")
    assert dk.dtype == np.int64 and dv.dtype == np.float32 and dv.shape == (len(ref), dim)
    assert sorted(dk.tolist()) == sorted(ref)
    np.testing.assert_array_equal(dv, np.array([ref[k] for k in dk.tolist()]).reshape(-1, dim))
    assert vdb.partition_sizes("t").sum() == len(ref)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_rows_start_on_a_cache_line_before_and_after_growth(dtype):
    """An unaligned row of 64 bytes spans two lines (512 bytes: nine), one more miss per read."""
    vdb = HashMapVDB(num_partitions=4)
    vdb.create_table("t", 16, dtype=dtype)  # 64 rows per partition at first
    arrays = []
    for n in (10, 5000):  # the second grows every pool
        keys = np.arange(n, dtype=np.int64) * 13 - 3  # values keys / 8: exact in fp32
        vdb.upsert("t", keys, np.tile(keys[:, None] / 8, (1, 16)).astype(np.float32))
        a = vdb._table("t").arr
        arrays.append(a)
        for name in ("index", "keys", "values"):
            assert getattr(a, name).ctypes.data % 64 == 0, (n, name)
        got, found = vdb.fetch("t", keys)
        assert found.all()
        np.testing.assert_allclose(got, np.tile(keys[:, None] / 8, (1, 16)),
                                   rtol=0 if dtype == "float32" else 1e-2)  # fmt: skip
    assert arrays[0].pcap < arrays[1].pcap


def test_fetch_leaves_missing_rows_of_out_untouched_and_widens_unsigned_keys():
    vdb = HashMapVDB(num_partitions=2)
    vdb.create_table("t", 3)
    vdb.upsert("t", np.array([7, -1], np.int64), np.array([[1, 2, 3], [4, 5, 6]], np.float32))
    out = np.full((3, 3), -9.0, np.float32)
    got, found = vdb.fetch("t", np.array([-1, 8, 7]), out=out)
    assert got is out
    np.testing.assert_array_equal(found, [True, False, True])
    np.testing.assert_array_equal(out, [[4, 5, 6], [-9, -9, -9], [1, 2, 3]])
    # uint64 keys are the same 64 bits as int64: 2**64 - 1 is key -1
    got, found = vdb.fetch("t", np.array([2**64 - 1, 7], np.uint64))
    np.testing.assert_array_equal(got, [[4, 5, 6], [1, 2, 3]])
    got, found = vdb.fetch("t", np.array([7], np.uint32))
    assert found[0] and (got[0] == [1, 2, 3]).all()


@pytest.mark.parametrize("dim", [16, 128], ids=["narrow-rows", "wide-rows"])
def test_fetch_of_every_batch_size_around_the_pipeline_depth(dim):
    """Fetch runs as a pipeline a few dozen keys deep (``_kernels._fetch_chunk``): batches
    shorter than it, as long as it, and ending on either side of a parallel task's boundary
    get every row (and the zeros of every miss) right, in the serial and the parallel kernel."""
    rng = np.random.default_rng(dim)
    keys = rng.integers(I64.min, I64.max, 5000, dtype=np.int64)
    vecs = rng.standard_normal((len(keys), dim)).astype(np.float32)
    vdb = HashMapVDB(num_partitions=4)
    vdb.create_table("t", dim)
    vdb.upsert("t", keys, vecs)
    ref = dict(zip(keys.tolist(), vecs, strict=True))
    absent = rng.integers(I64.min, I64.max, 200, dtype=np.int64)
    sizes = [*range(41), 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 2049, 4100]
    for n in sizes:
        probe = np.where(rng.random(n) < 0.2, rng.choice(absent, n), rng.choice(keys, n))
        check_against(vdb, "t", ref, dim, probe)


def every_value_back(dtype: str, values: np.ndarray) -> HashMapVDB:
    """Store every 16-bit pattern's exact fp32 value (``values``) in a table of ``dtype`` and
    fetch them bit for bit, signed zeros, subnormals and infinities included (NaNs as NaN),
    through the serial and the parallel kernel. Returns the VDB (table "t")."""
    vdb = HashMapVDB(num_partitions=3)
    vdb.create_table("t", 64, dtype=dtype)
    vecs = values.reshape(-1, 64)
    keys = np.arange(len(vecs)) - 512
    vdb.upsert("t", keys, vecs)
    for probe in (keys[::-7], np.tile(keys, 5)):
        got, found = vdb.fetch("t", probe)
        expect = vecs[probe + 512]
        nan = np.isnan(expect)
        assert found.all() and (np.isnan(got) == nan).all()
        np.testing.assert_array_equal(got.view(np.uint32)[~nan], expect.view(np.uint32)[~nan])
    return vdb


@pytest.mark.parametrize("native", [True, False], ids=["cpu-fp16", "table"])
def test_every_fp16_value_comes_back_exactly(native, monkeypatch):
    if native and not shm.NATIVE_HALF:
        pytest.skip("this CPU has no fp16 conversion instruction: the table path serves fp16")
    monkeypatch.setattr(shm, "NATIVE_HALF", native)
    every_value_back(
        "float16", np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    )


def test_every_bf16_value_comes_back_exactly():
    """Each of the 65,536 bf16 bit patterns comes back exactly; fp32 values in between round
    to nearest even."""
    vdb = every_value_back("bfloat16", from_bf16_bits(np.arange(65536, dtype=np.uint16)))
    # 1 + 2**-8 is halfway between two bf16 values: it rounds to the even one (1.0);
    # 1 + 3 * 2**-8 rounds up to 1 + 2**-6, and a value just above halfway rounds up
    x = np.array([[1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -3.0]], np.float32)
    vdb.upsert("t", [7], np.repeat(x, 16, axis=0).reshape(1, 64))
    got, _ = vdb.fetch("t", [7])
    np.testing.assert_array_equal(got[0, :4], [1.0, 1 + 2**-6, 1 + 2**-7, -3.0])
    dk, dv = vdb.dump("t")
    np.testing.assert_array_equal(dv[dk == 7], got)


@pytest.mark.parametrize("dim", [1, 5, 64])
def test_int8_rows_are_within_half_a_step_of_their_values(dim):
    """Each element comes back within half of its row's step (max |x| / 127), the largest
    one to float32 rounding, a zero row as zeros; rows that cannot be scaled are refused,
    nothing written."""
    rng = np.random.default_rng(dim)
    vdb = HashMapVDB(num_partitions=2)
    vdb.create_table("t", dim, dtype="int8")
    vecs = rng.standard_normal((3000, dim)).astype(np.float32) * rng.uniform(1e-3, 1e3, (3000, 1))
    vecs[0] = 0.0
    vecs[1] = -2.5  # every element at the row's peak: exact
    keys = np.arange(len(vecs)) * 3 - 77
    vdb.upsert("t", keys, vecs)
    for probe in (keys[::-3], np.tile(keys, 2)):  # the serial and the parallel kernel
        got, found = vdb.fetch("t", probe)
        want = vecs[(probe + 77) // 3]
        step = np.abs(want).max(axis=1, keepdims=True) / 127
        assert found.all() and (np.abs(got - want) <= step / 2 * (1 + 1e-5) + 1e-30).all()
        peak = np.argmax(np.abs(want), axis=1)
        rows = np.arange(len(want))
        np.testing.assert_allclose(got[rows, peak], want[rows, peak], rtol=1e-6)
    got, _ = vdb.fetch("t", keys[:2])
    np.testing.assert_array_equal(got, vecs[:2])
    bad = np.ones((2, dim), np.float32)
    bad[1, 0] = np.inf
    with pytest.raises(InvalidInputError, match="vectors.*finite"):
        vdb.upsert("t", [10**9, 10**9 + 1], bad)
    assert not vdb.fetch("t", [10**9, 10**9 + 1])[1].any()  # neither row was written


def fill(vdb: HashMapVDB, keys, value) -> None:
    keys = np.asarray(keys, np.int64)
    vdb.upsert("t", keys, np.full((len(keys), 4), value, np.float32))


@pytest.mark.parametrize("policy", ["evict_random", "evict_least_used", "evict_oldest"])
def test_overflow_keeps_every_partition_bounded_and_counts_evictions(policy):
    margin, parts, target = 300, 4, 0.6
    vdb = HashMapVDB(num_partitions=parts, overflow_margin=margin, overflow_policy=policy,
                     overflow_resolution_target=target)  # fmt: skip
    vdb.create_table("t", 4)
    rng = np.random.default_rng(5)
    written: dict[int, np.ndarray] = {}
    inserted = 0
    for _ in range(25):
        k = rng.integers(I64.min, I64.max, 500, dtype=np.int64)
        k[:50] = rng.choice(np.array(list(written) or [0], np.int64), 50)  # some updates
        v = rng.standard_normal((500, 4)).astype(np.float32)
        before = set(vdb.dump("t")[0].tolist())
        evicted_before = vdb.evictions("t")
        vdb.upsert("t", k, v)
        inserted += len(set(k.tolist()) - before)
        written.update(zip(k.tolist(), v, strict=True))
        sizes = vdb.partition_sizes("t")
        assert (sizes <= margin).all(), sizes
        # every key of the batch is present afterwards (a batch never evicts its own rows)
        assert vdb.contains("t", k).all()
        assert vdb.size("t") == len(before) + len(set(k.tolist()) - before) - (
            vdb.evictions("t") - evicted_before
        )
    assert vdb.evictions("t") == inserted - vdb.size("t") > 0
    assert vdb.size("t") <= margin * parts
    keys, vecs = vdb.dump("t")
    np.testing.assert_array_equal(vecs, np.array([written[k] for k in keys.tolist()]))


def test_overflow_resolves_to_the_target_fraction():
    vdb = HashMapVDB(num_partitions=1, overflow_margin=100, overflow_resolution_target=0.5)
    vdb.create_table("t", 4)
    fill(vdb, np.arange(100), 1.0)
    assert vdb.size("t") == 100 and vdb.evictions("t") == 0
    fill(vdb, [1000], 2.0)  # 101 > 100: evict down to 50 - 1 old rows, then insert the new one
    assert vdb.size("t") == 50 and vdb.evictions("t") == 51
    assert vdb.contains("t", [1000])[0]


def test_overflow_least_used_evicts_the_rows_read_least():
    vdb = HashMapVDB(num_partitions=1, overflow_margin=100, overflow_policy="evict_least_used",
                     overflow_resolution_target=0.5)  # fmt: skip
    vdb.create_table("t", 4)
    keys = np.arange(100)
    fill(vdb, keys, 1.0)
    hot = keys[50:]
    for _ in range(2):
        vdb.fetch("t", hot)
    vdb.fetch("t", keys[60:])  # 60.. read 3 times, 50..59 twice, 0..49 never
    fill(vdb, [500, 501], 2.0)  # 102 > 100: keep 50 - 2 = 48 old rows, i.e. the 48 hottest
    assert vdb.size("t") == 50 and vdb.evictions("t") == 52
    assert not vdb.contains("t", keys[:52]).any()
    assert vdb.contains("t", keys[52:]).all() and vdb.contains("t", [500, 501]).all()


@pytest.mark.parametrize("refresh", [False, True])
def test_overflow_oldest_evicts_the_rows_touched_longest_ago(refresh):
    vdb = HashMapVDB(num_partitions=1, overflow_margin=60, overflow_policy="evict_oldest",
                     overflow_resolution_target=0.5, refresh_time_after_fetch=refresh)  # fmt: skip
    vdb.create_table("t", 4)
    for batch in range(6):  # batch 0 is the oldest
        fill(vdb, np.arange(batch * 10, batch * 10 + 10), batch)
    fill(vdb, np.arange(10, 20), 9)  # an update touches batch 1 again
    vdb.fetch("t", np.arange(0, 10))  # refreshes batch 0 only if refresh_time_after_fetch
    fill(vdb, np.arange(100, 110), 7)  # 70 > 60: keep 30 - 10 = 20 old rows
    assert vdb.size("t") == 30 and vdb.evictions("t") == 40
    survivors = [0, 10] if refresh else [10, 50]
    for first in range(0, 60, 10):
        assert vdb.contains("t", np.arange(first, first + 10)).all() == (first in survivors)
    assert vdb.contains("t", np.arange(100, 110)).all()


def test_overflow_oldest_keeps_the_newest_rows_when_the_batch_clock_wraps():
    """A row keeps the low 32 bits of the batch clock, which wrap after 2^32 batches (days of
    fetches with refresh_time_after_fetch); rows written after the wrap looked oldest and were
    the ones evicted."""
    vdb = HashMapVDB(num_partitions=1, overflow_margin=10, overflow_policy="evict_oldest",
                     overflow_resolution_target=0.5)  # fmt: skip
    vdb.create_table("t", 1)
    vdb._tables["t"].clock[0] = np.uint64(2**32 - 12)  # a long-running server
    for k in range(17):  # one row a batch: ticks 2^32 - 11 .. 2^32 - 1, then 0, 1, ...
        vdb.upsert("t", [k], [[k]])
    keys, rows = vdb.dump("t")
    assert sorted(keys.tolist()) == [12, 13, 14, 15, 16]
    np.testing.assert_array_equal(rows[:, 0], keys)


def test_evict_random_is_seeded():
    def survivors(seed):
        vdb = HashMapVDB(num_partitions=2, overflow_margin=50, seed=seed)
        vdb.create_table("t", 4)
        fill(vdb, np.arange(80), 1.0)
        fill(vdb, np.arange(80, 160), 1.0)
        return sorted(vdb.dump("t")[0].tolist())

    assert survivors(1) == survivors(1)
    assert survivors(1) != survivors(2)


def test_a_batch_larger_than_the_margin_keeps_its_newest_keys():
    vdb = HashMapVDB(num_partitions=1, overflow_margin=40, overflow_policy="evict_oldest")
    vdb.create_table("t", 4)
    fill(vdb, np.arange(1000, 1030), 1.0)
    keys = np.concatenate([np.arange(100), [5, 1005]])  # 5 and 1005 are written last
    vals = np.repeat(np.arange(102, dtype=np.float32)[:, None], 4, axis=1)
    vdb.upsert("t", keys, vals)
    assert vdb.size("t") == 40
    expect = set(range(62, 100)) | {5, 1005}
    assert set(vdb.dump("t")[0].tolist()) == expect
    got, _ = vdb.fetch("t", np.array([5, 1005, 99]))
    np.testing.assert_array_equal(got[:, 0], [100, 101, 99])


def test_a_table_past_the_partitions_row_limit_is_named_not_evicted_in_silence(monkeypatch, caplog):
    """A partition holds at most shm.MAX_ROWS rows (2^31 - 2: 32-bit index entries), and
    ``hash_map`` has one partition: a bigger table lost its other rows to eviction with only a
    debug line. Now a warning names the rows, the limit and the partitions it would take; the
    rows held are exact. (MAX_ROWS made 1000 here; the logic is the same.)"""
    from hps_core.vdb import hashmap

    monkeypatch.setattr(hashmap, "MAX_ROWS", 1000)
    vdb = HashMapVDB(num_partitions=1, overflow_policy="evict_random")
    vdb.create_table("t", 4, capacity_hint=5000)
    assert "5000 rows to hold, but 1 partition(s) of at most 1000 rows" in caplog.text
    assert "num_partitions >= 5" in caplog.text
    keys = np.arange(5000, dtype=np.int64)
    vecs = np.repeat(keys[:, None].astype(np.float32), 4, axis=1)
    vdb.upsert("t", keys, vecs)
    held, rows = vdb.dump("t")
    assert 0 < len(held) <= 1000
    np.testing.assert_array_equal(rows, vecs[held])
    caplog.clear()
    HashMapVDB(num_partitions=5).create_table("t", 4, capacity_hint=5000)
    assert "rows to hold" not in caplog.text


@pytest.mark.parametrize(
    "dim,dtype,policy,sized_by",
    [
        (16, "float32", "evict_random", "load"),
        (16, "float16", "evict_random", "hint"),
        (64, "float32", "evict_random", "hint"),
        (64, "float16", "evict_random", "load"),
        (16, "float16", "evict_least_used", "load"),
        (64, "int8", "evict_random", "hint"),
    ],
)
def test_memory_stays_near_the_raw_bytes(dim, dtype, policy, sized_by):
    n = 1_000_000
    vdb = HashMapVDB(num_partitions=16, overflow_policy=policy)
    vdb.create_table("t", dim, dtype=dtype, capacity_hint=n if sized_by == "hint" else 0)
    rng = np.random.default_rng(1)
    keys = rng.integers(I64.min, I64.max, n, dtype=np.int64)
    vecs = np.ones((n, dim), np.float32)
    if sized_by == "load":
        vdb.load("t", keys, vecs)
    else:
        for s in range(0, n, 250_000):
            vdb.upsert("t", keys[s : s + 250_000], vecs[s : s + 250_000])
    assert vdb.size("t") == n
    raw = n * (8 + shm.row_bytes(dim, dtype))  # an int8 row: its values and its scale
    ratio = vdb.memory_bytes("t") / raw
    assert ratio <= 1.3, f"VDB holds {ratio:.3f}x the raw key+vector bytes"
    est = estimate_table_bytes(n, dim, dtype, 16, policy)
    assert abs(est - vdb.memory_bytes("t")) / vdb.memory_bytes("t") < 0.02, (est, ratio)
    got, found = vdb.fetch("t", keys[::997])
    assert found.all() and (got == 1).all()


def test_bad_inputs_name_the_field_and_the_map_keeps_working():
    vdb = HashMapVDB(num_partitions=2)
    vdb.create_table("t", 4)
    vdb.upsert("t", np.array([1, 2]), np.ones((2, 4), np.float32))
    bad = [
        (lambda: vdb.upsert("t", np.array([1.5]), np.ones((1, 4))), "keys"),
        (lambda: vdb.fetch("t", np.array([1.0, 2.0])), "keys"),
        (lambda: vdb.fetch("t", np.zeros((2, 2), np.int64)), "keys"),
        (lambda: vdb.contains("t", np.array(["a"])), "keys"),
        (lambda: vdb.evict("t", np.zeros((1, 1), np.int64)), "keys"),
        (lambda: vdb.upsert("t", np.array([3]), np.ones((1, 5))), "vectors"),
        (lambda: vdb.upsert("t", np.array([3, 4]), np.ones((1, 4))), "vectors"),
        (lambda: vdb.upsert("t", np.array([3]), np.ones(4)), "vectors"),
        (lambda: vdb.fetch("t", np.array([1]), out=np.zeros((1, 3), np.float32)), "out"),
        (lambda: vdb.create_table("u", 4, dtype="int4"), "dtype"),
        (lambda: vdb.create_table("u", 2.5), "dim"),  # was a table of dim 2
        (lambda: vdb.create_table("u", "3"), "dim"),
        (lambda: vdb.create_table("u", 4, capacity_hint=-1), "capacity_hint"),
        (lambda: vdb.create_table(5, 4), "table"),
        (lambda: vdb.fetch("t", np.array([1]), out=[[0.0] * 4]), "out"),
    ]
    for call, field in bad:
        with pytest.raises(InvalidInputError, match=f"'{field}'") as e:
            call()
        assert e.value.field == field
    ro = np.zeros((1, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(InvalidInputError, match="read-only float32 .*: expected a writable"):
        vdb.fetch("t", np.array([1]), out=ro)
    assert vdb.tables() == ["t"]
    for call in (
        lambda: vdb.fetch("nope", np.array([1])),
        lambda: vdb.upsert("nope", np.array([1]), np.ones((1, 4))),
        lambda: vdb.size("nope"),
        lambda: vdb.drop_table("nope"),
    ):
        with pytest.raises(HPSError, match="no table 'nope'") as e:
            call()
        assert isinstance(e.value, KeyError)
    with pytest.raises(StorageError, match="dim 4"):
        vdb.create_table("t", 8)
    with pytest.raises(ValueError, match="overflow_policy"):
        HashMapVDB(overflow_policy="evict_everything")
    vdb.create_table("t", 4)  # same dim and dtype: a no-op
    got, found = vdb.fetch("t", np.array([2, 1, 3]))
    np.testing.assert_array_equal(found, [True, True, False])
    np.testing.assert_array_equal(got[:2], np.ones((2, 4)))
    vdb.upsert("t", np.array([], np.int64), np.zeros((0, 4)))
    assert vdb.fetch("t", [])[0].shape == (0, 4) and vdb.evict("t", []) == 0
    assert vdb.tables() == ["t"]
    vdb.drop_table("t")
    assert vdb.tables() == [] and vdb.memory_bytes() == 0


def assert_untorn(rows: np.ndarray, found: np.ndarray, last_seen: np.ndarray) -> None:
    """Every found row has all elements equal (one version), never older than seen before."""
    rows = rows[found]
    assert (rows == rows[:, :1]).all(), "torn row"
    version = rows[:, 0]
    assert (version >= last_seen[found]).all(), "a row went back in time"
    last_seen[found] = version


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_readers_never_see_torn_rows_while_a_thread_writes(dtype):
    dim, n = 64, 20_000
    vdb = HashMapVDB(num_partitions=4, overflow_policy="evict_least_used")
    vdb.create_table("t", dim, dtype=dtype, capacity_hint=n // 4)  # grows while read
    keys = np.arange(n, dtype=np.int64) * 7919 - 10**6
    vdb.upsert("t", keys[: n // 8], np.zeros((n // 8, dim), np.float32))
    stop = threading.Event()
    rng = np.random.default_rng(0)

    def writer():
        v = 1
        # fp16 holds integers exactly up to 2048; bf16 up to 256, then neighbouring versions
        # share a value (rounding keeps them in order, so "never older" still holds)
        while not stop.is_set() and v < 2000:
            part = keys[: min(n, n // 8 + v * 500)]
            vdb.upsert("t", part, np.full((len(part), dim), v, np.float32))
            gone = rng.choice(keys, 50)
            vdb.evict("t", gone)  # swap-removes move rows under the reader
            vdb.upsert("t", gone, np.full((50, dim), v, np.float32))
            v += 1

    th = threading.Thread(target=writer)
    th.start()
    last = np.zeros(n, np.float32)
    reads = 0
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline or reads < 5:
            sel = rng.integers(0, n, 8192) if reads % 2 else np.arange(n)
            rows, found = vdb.fetch("t", keys[sel])
            sub = last[sel]
            assert_untorn(rows, found, sub)
            np.maximum.at(last, sel, sub)
            reads += 1
    finally:
        stop.set()
        th.join()
    assert last.max() > 0
