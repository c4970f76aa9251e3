"""The numba hash-map VDB against a dict reference: verbs, overflow policies, memory, concurrency."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import numpy as np
import pytest

from hps_core.errors import HPSError, InvalidInputError, StorageError
from hps_core.vdb import shm
from hps_core.vdb.hashmap import HashMapVDB, estimate_table_bytes

I64 = np.iinfo(np.int64)
EXTREMES = np.array([I64.min, I64.max, 0, -1, 1, I64.min + 1], np.int64)


def check_against(vdb, table, ref: dict, dim, dtype, probe_keys):
    got, found = vdb.fetch(table, probe_keys)
    for k, row, f in zip(probe_keys.tolist(), got, found, strict=True):
        assert f == (k in ref), k
        expect = ref[k].astype(dtype).astype(np.float32) if k in ref else np.zeros(dim, np.float32)
        np.testing.assert_array_equal(row, expect)
    np.testing.assert_array_equal(vdb.contains(table, probe_keys), found)
    assert vdb.size(table) == len(ref)


@pytest.mark.parametrize(
    "dim,dtype,parts", [(1, "float32", 1), (16, "float16", 4), (64, "float32", 7)]
)
def test_random_operations_match_a_dict(dim, dtype, parts):
    rng = np.random.default_rng(dim)
    vdb = HashMapVDB(num_partitions=parts)
    vdb.create_table("t", dim, dtype=dtype, capacity_hint=100)  # grows well past this
    ref: dict[int, np.ndarray] = {}
    universe = np.concatenate([EXTREMES, rng.integers(I64.min, I64.max, 3000, dtype=np.int64)])
    for step in range(40):
        op = rng.integers(0, 3)
        keys = rng.choice(universe, rng.integers(0, 400))
        if op < 2:  # upsert, duplicates included: the last one wins
            vecs = rng.standard_normal((len(keys), dim)).astype(np.float32)
            vdb.upsert("t", keys, vecs)
            for k, v in zip(keys.tolist(), vecs, strict=True):
                ref[k] = v
        else:
            removed = vdb.evict("t", keys)
            assert removed == len({k for k in keys.tolist() if k in ref})
            for k in keys.tolist():
                ref.pop(k, None)
        if step % 5 == 4:
            check_against(vdb, "t", ref, dim, dtype, rng.choice(universe, 500))
    check_against(vdb, "t", ref, dim, dtype, universe)
    dk, dv = vdb.dump("t")
    assert sorted(dk.tolist()) == sorted(ref)
    for k, v in zip(dk.tolist(), dv, strict=True):
        np.testing.assert_array_equal(v, ref[k].astype(dtype).astype(np.float32))


def fill(vdb, table, keys, tick_values):
    vdb.upsert(table, keys, np.repeat(np.asarray(tick_values, np.float32)[:, None], 4, axis=1))


def test_overflow_least_used_evicts_the_coldest_rows():
    vdb = HashMapVDB(
        num_partitions=1,
        overflow_margin=100,
        overflow_policy="evict_least_used",
        overflow_resolution_target=0.5,
    )
    vdb.create_table("t", 4)
    keys = np.arange(100, dtype=np.int64)
    fill(vdb, "t", keys, keys)
    hot = keys[50:]  # read the upper half, so the lower half is least used
    for _ in range(3):
        vdb.fetch("t", hot)
    fill(vdb, "t", np.array([1000], np.int64), [1000])  # 101 rows > margin: evict to 50 - 1 + 1
    assert vdb.size("t") == 50
    assert vdb.contains("t", hot[1:]).sum() >= 48  # only hot rows (and the new one) survive
    assert not vdb.contains("t", keys[:50]).any()
    assert vdb.contains("t", np.array([1000]))[0]


def test_overflow_oldest_evicts_the_earliest_written():
    vdb = HashMapVDB(
        num_partitions=1,
        overflow_margin=60,
        overflow_policy="evict_oldest",
        overflow_resolution_target=0.5,
    )
    vdb.create_table("t", 4)
    for batch in range(6):  # 6 batches of 10: batch 0 is oldest
        k = np.arange(batch * 10, batch * 10 + 10, dtype=np.int64)
        fill(vdb, "t", k, k)
    fill(vdb, "t", np.arange(100, 110, dtype=np.int64), np.arange(10))
    # 70 rows > 60: keep target 30 - 10 new = 20 existing, i.e. the two newest batches
    assert vdb.size("t") == 30
    assert (
        vdb.contains("t", np.arange(40, 60)).all() and vdb.contains("t", np.arange(100, 110)).all()
    )
    assert not vdb.contains("t", np.arange(0, 40)).any()


@pytest.mark.parametrize("policy", ["evict_random", "evict_least_used", "evict_oldest"])
def test_overflow_keeps_every_partition_bounded(policy):
    margin, parts = 500, 4
    vdb = HashMapVDB(num_partitions=parts, overflow_margin=margin, overflow_policy=policy)
    vdb.create_table("t", 8)
    rng = np.random.default_rng(0)
    written = {}
    for _ in range(20):
        k = rng.integers(I64.min, I64.max, 700, dtype=np.int64)
        v = rng.standard_normal((700, 8)).astype(np.float32)
        vdb.upsert("t", k, v)
        written.update(zip(k.tolist(), v, strict=True))
        assert vdb.size("t") <= margin * parts
    t = vdb._tables["t"]
    assert (t.count <= margin).all()
    keys, vecs = vdb.dump("t")
    for k, v in zip(keys.tolist(), vecs, strict=True):  # survivors hold their latest values
        np.testing.assert_array_equal(v, written[k])


@pytest.mark.parametrize(
    "dim,dtype,policy",
    [
        (16, "float32", "evict_least_used"),
        (16, "float16", "evict_random"),
        (64, "float32", "evict_random"),
        (64, "float16", "evict_oldest"),
    ],
)
def test_memory_stays_near_the_raw_bytes(dim, dtype, policy):
    n = 1_000_000
    vdb = HashMapVDB(num_partitions=8, overflow_policy=policy)
    vdb.create_table("t", dim, dtype=dtype, capacity_hint=n)
    rng = np.random.default_rng(1)
    keys = rng.integers(I64.min, I64.max, n, dtype=np.int64)
    for s in range(0, n, 250_000):
        vdb.upsert(
            "t", keys[s : s + 250_000], np.ones((len(keys[s : s + 250_000]), dim), np.float32)
        )
    raw = vdb.size("t") * (8 + dim * np.dtype(dtype).itemsize)
    ratio = vdb.memory_bytes("t") / raw
    assert ratio <= 1.3, f"VDB holds {ratio:.3f}x the raw key+vector bytes"
    est = estimate_table_bytes(n, dim, dtype, 8, policy)
    assert abs(est - vdb.memory_bytes("t")) / vdb.memory_bytes("t") < 0.05


def test_bad_inputs_name_the_field_and_the_map_keeps_working():
    vdb = HashMapVDB(num_partitions=2)
    vdb.create_table("t", 4)
    vdb.upsert("t", np.array([1, 2]), np.ones((2, 4), np.float32))
    with pytest.raises(InvalidInputError, match="'keys'"):
        vdb.upsert("t", np.array([1.5]), np.ones((1, 4)))
    with pytest.raises(InvalidInputError, match="'keys'"):
        vdb.fetch("t", np.zeros((2, 2), np.int64))
    with pytest.raises(InvalidInputError, match="'vectors'"):
        vdb.upsert("t", np.array([3]), np.ones((1, 5)))
    with pytest.raises(InvalidInputError, match="'vectors'"):
        vdb.upsert("t", np.array([3, 4]), np.ones((1, 4)))
    with pytest.raises(HPSError, match="no table 'u'"):
        vdb.fetch("u", np.array([1]))
    with pytest.raises(StorageError, match="dim 4"):
        vdb.create_table("t", 8)
    got, found = vdb.fetch("t", np.array([2, 1, 3]))
    np.testing.assert_array_equal(found, [True, True, False])
    np.testing.assert_array_equal(got[:2], np.ones((2, 4)))


def versioned_rows(v, n, dim):
    return np.full((n, dim), v, np.float32)


def assert_untorn(rows, found, last_seen):
    for i in np.flatnonzero(found):
        row = rows[i]
        assert (row == row[0]).all(), f"torn row: {row}"
        assert row[0] >= last_seen[i], "a row went back in time"
        last_seen[i] = row[0]


def test_readers_never_see_torn_rows_while_a_thread_writes():
    dim, n = 64, 2000
    vdb = HashMapVDB(num_partitions=4)
    vdb.create_table("t", dim, capacity_hint=n)
    keys = np.arange(n, dtype=np.int64) * 7919 - 10**6
    vdb.upsert("t", keys, versioned_rows(0, n, dim))
    stop = threading.Event()

    def writer():
        v = 1
        while not stop.is_set():
            vdb.upsert("t", keys, versioned_rows(v, n, dim))
            v += 1

    th = threading.Thread(target=writer)
    th.start()
    last = np.zeros(n, np.float32)
    try:
        deadline = time.time() + 2.0
        reads = 0
        while time.time() < deadline:
            rows, found = vdb.fetch("t", keys)
            assert found.all()
            assert_untorn(rows, found, last)
            reads += 1
    finally:
        stop.set()
        th.join()
    assert reads > 5 and last.max() > 0


WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from hps_core.vdb.hashmap import HashMapVDB
    name, seconds = sys.argv[1], float(sys.argv[2])
    dim, n = 32, 3000
    vdb = HashMapVDB(num_partitions=4, shared_memory_name=name)
    vdb.create_table("hps_et.m.t", dim, capacity_hint=n)
    keys = np.arange(n, dtype=np.int64) * 104729 - 5 * 10**8
    vdb.upsert("hps_et.m.t", keys, np.zeros((n, dim), np.float32))
    print("ready", flush=True)
    sys.stdin.readline()  # the reader has compiled its kernels: start writing
    v, end = 1, time.time() + seconds
    while time.time() < end:
        vdb.upsert("hps_et.m.t", keys, np.full((n, dim), v, np.float32))
        v += 1
    print(v - 1, flush=True)
    """
)


def test_shared_memory_readers_in_another_process_see_whole_rows():
    name = f"hps_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, name, "3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        reader = HashMapVDB(shared_memory_name=name, shared_memory_readonly=True)
        assert reader.tables() == ["hps_et.m.t"]
        keys = np.arange(3000, dtype=np.int64) * 104729 - 5 * 10**8
        last = np.zeros(3000, np.float32)
        assert_untorn(*reader.fetch("hps_et.m.t", keys), last)  # compiles before the race starts
        proc.stdin.write("go\n")
        proc.stdin.flush()
        reads = 0
        while proc.poll() is None:
            rows, found = reader.fetch("hps_et.m.t", keys)
            assert found.all()
            assert_untorn(rows, found, last)
            reads += 1
        final = int(proc.stdout.readline())
        rows, found = reader.fetch("hps_et.m.t", keys)
        assert found.all() and (rows == final).all()  # the reader sees the writer's last write
        assert reads > 5
        with pytest.raises(StorageError, match="read-only"):
            reader.upsert("hps_et.m.t", keys[:1], rows[:1])
        reader.close()
    finally:
        proc.kill()
        proc.wait()
        HashMapVDB(shared_memory_name=name).unlink()
    assert not list(shm.SHM_DIR.glob(f"{name}.*"))
