"""The fused CPU lookup against per-table lookups: the same vectors, the same cache slots and
clocks, the same counters, request after request; and both against the files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import three_tables
from file_reference import file_rows
from three_tables import DEFAULTS, DIMS, write_tables

from hps_core import ParameterServer

I64 = np.iinfo(np.int64)
ROWS = 2000


def make_files(root):
    def keys(rng):
        k = np.unique(rng.integers(I64.min, I64.max, size=ROWS, dtype=np.int64))
        return np.unique(np.concatenate([k, [I64.min, I64.max, 0, -1]]))

    return write_tables(root, np.random.default_rng(7), keys)


def config(root, name, policy, dtype, admit, threshold, vdb_dtype="float32"):
    vdb = {"type": "parallel_hash_map", "num_partitions": 4, "storage_dtype": vdb_dtype}
    return three_tables.config(
        root, "m", vdb, f"rocksdb_{name}",
        cache_policy=policy, cache_storage_dtype=dtype, cache_admission_min_count=admit,
        hit_rate_threshold=threshold,
    )  # fmt: skip


def reference(tables, t, keys):
    """Numpy reference: the file's row for known keys, the table default otherwise."""
    return file_rows(*tables[t], keys, DEFAULTS[t])


def request(rng, tables, batch):
    """[batch, 3] keys: Zipf-hot file keys, keys in no file, repeats within the batch."""
    cols = []
    for keys, _ in tables:
        rank = np.minimum(rng.zipf(1.2, batch) - 1, len(keys) - 1)
        col = keys[rank]
        absent = rng.random(batch) < 0.05
        col[absent] = rng.integers(I64.min, I64.max, absent.sum(), dtype=np.int64)
        cols.append(col)
    return np.stack(cols, axis=1)


def snapshot(ps):
    return [t.cache.snapshot() for t in ps.session("m").tables]


def assert_same_state(fused, plain):
    for a, b in zip(snapshot(fused), snapshot(plain), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for ta, tb in zip(fused.session("m").tables, plain.session("m").tables, strict=True):
        sa, sb = ta.stats, tb.stats
        assert (sa.requests, sa.keys, sa.unique_keys, sa.hits) == (
            sb.requests,
            sb.keys,
            sb.unique_keys,
            sb.hits,
        )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    return root, make_files(root)


@pytest.mark.parametrize(
    "policy,dtype,admit,threshold,vdb_dtype",
    [
        ("lru", "float32", 1, 1.0, "float32"),  # every fill inside the kernel
        ("lfu", "float32", 1, 1.0, "float32"),
        ("lru", "float16", 1, 1.0, "float32"),  # fills through the session (fp16 encoding)
        ("lfu", "float32", 2, 1.0, "float32"),  # admission filter: fills through the session
        ("lru", "float32", 1, 0.6, "float32"),  # above the threshold: background fills
        ("lru", "float32", 1, 1.0, "float16"),  # fp16 VDB rows decoded in the kernel
        ("lru", "float32", 1, 1.0, "float16-lut"),  # ... through the table, as without F16C
        ("lfu", "float32", 1, 1.0, "bfloat16"),  # bf16 VDB rows (widened by a shift)
        ("lru", "float32", 1, 1.0, "int8"),  # int8 VDB rows and their scales
    ],
)
def test_fused_matches_per_table_lookups(
    files, monkeypatch, policy, dtype, admit, threshold, vdb_dtype
):
    root, tables = files
    if vdb_dtype == "float16-lut":
        from hps_core.vdb import shm

        monkeypatch.setattr(shm, "NATIVE_HALF", False)
        vdb_dtype = "float16"
    name = f"{policy}{dtype}{admit}{threshold}{vdb_dtype}"
    fused, plain = (
        ParameterServer(config(root, name + s, policy, dtype, admit, threshold, vdb_dtype))
        for s in "fp"
    )
    try:
        assert fused.session("m").fused.layout() is not None  # served fused, not per table
        plain.session("m").fused.run = lambda *a: None  # per-table lookups only
        # a share of each table lives only in RocksDB: the kernel leaves those to the session
        rng = np.random.default_rng(1)
        for ps in (fused, plain):
            for t, (keys, _) in enumerate(tables):
                store = ps.session("m").tables[t].store_name
                ps.vdb.evict(store, keys[np.random.default_rng(t).random(len(keys)) < 0.1])
        rounded = False
        for batch in [1, 1, 3, 17, 64, 250, 1, 2000, 5, 40]:
            cat = request(rng, tables, batch)
            got = fused.session("m").lookup_columns(cat)
            want = plain.session("m").lookup_columns(cat)
            np.testing.assert_array_equal(got, want)
            ref = np.concatenate([reference(tables, t, cat[:, t]) for t in range(3)], axis=1)
            if dtype == vdb_dtype == "float32":
                np.testing.assert_array_equal(got, ref)
            elif vdb_dtype == "int8":  # within half a step (a row's max |x| / 127, at most)
                step = np.abs(ref).max() / 127
                np.testing.assert_allclose(got, ref, rtol=0, atol=step / 2 * (1 + 1e-5))
                rounded |= not np.array_equal(got, ref)
            else:  # L1 or VDB rows are rounded to fp16 (11 significant bits) or bf16 (8)
                tol = 2**-8 if vdb_dtype == "bfloat16" else 1e-3
                np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
                rounded |= not np.array_equal(got, ref)
            fused.session("m").flush()
            plain.session("m").flush()
            assert_same_state(fused, plain)
        # 16-bit or int8 rows were served
        assert rounded == (dtype != "float32" or vdb_dtype != "float32")
        # HPS I/O: concatenated keys with a count per table, a zero count included
        for counts in ([5, 0, 9], [1, 1, 1], [300, 20, 0]):
            keys = np.concatenate(
                [request(rng, tables, c)[:, t] for t, c in enumerate(counts)]
            ).astype(np.int64)
            got, st_got = fused.session("m").lookup_concatenated(keys, np.array(counts))
            want, st_want = plain.session("m").lookup_concatenated(keys, np.array(counts))
            np.testing.assert_array_equal(got, want)
            assert [(s.keys, s.unique_keys, s.hits) for s in st_got] == [
                (s.keys, s.unique_keys, s.hits) for s in st_want
            ]
            fused.session("m").flush()
            plain.session("m").flush()
            assert_same_state(fused, plain)
    finally:
        fused.close()
        plain.close()


def test_a_write_in_progress_sends_the_table_back_to_the_seqlocked_read(files):
    """An odd VDB sequence number (a writer mid-batch) makes the kernel's read of that table
    dirty: its rows are read again through HashMapVDB.fetch, and the answer is still right."""
    root, tables = files
    ps = ParameterServer(config(root, "dirty", "lru", "float32", 1, 1.0))
    try:
        vt = ps.vdb._table(ps.session("m").tables[1].store_name)
        cat = request(np.random.default_rng(3), tables, 50)
        reads = []
        fetch = ps.vdb.fetch
        ps.vdb.fetch = lambda table, keys: reads.append(table) or fetch(table, keys)
        vt.seq[:] += np.uint64(1)  # every partition "being written"
        got = ps.session("m").lookup_columns(cat)
        vt.seq[:] += np.uint64(1)
        assert reads == [ps.session("m").tables[1].store_name]
        ref = np.concatenate([reference(tables, t, cat[:, t]) for t in range(3)], axis=1)
        np.testing.assert_array_equal(got, ref)
    finally:
        ps.close()


def test_a_loaded_model_has_its_fused_layout_before_the_first_request(files):
    """add_model builds the kernel's view of the tables at load; the first lookup uses it."""
    root, tables = files
    ps = ParameterServer(config(root, "eager", "lru", "float32", 1, 1.0))
    try:
        s = ps.session("m")
        lay = s.fused._layout
        assert lay is not None and lay.eligible
        cat = request(np.random.default_rng(4), tables, 20)
        got = s.lookup_columns(cat)
        assert s.fused._layout is lay  # not rebuilt
        ref = np.concatenate([reference(tables, t, cat[:, t]) for t in range(3)], axis=1)
        np.testing.assert_array_equal(got, ref)
    finally:
        ps.close()


def test_a_reader_of_shared_memory_serves_fused_lookups(files):
    """Read-only mappings of a writer's tables (a Triton instance's view) through the kernel;
    one table without an L1 cache."""
    from hps_core.cache.host import HostCache
    from hps_core.session import LookupSession, TableRuntime
    from hps_core.vdb import shm
    from hps_core.vdb.hashmap import HashMapVDB

    _, tables = files
    name = f"hps_test_fused_{os.getpid()}"
    writer = HashMapVDB(num_partitions=4, overflow_policy="evict_least_used",
                        shared_memory_name=name)  # fmt: skip
    reader = HashMapVDB(shared_memory_name=name, shared_memory_readonly=True)
    try:
        for t in range(3):
            writer.create_table(f"t{t}", DIMS[t], capacity_hint=len(tables[t][0]))
            writer.upsert(f"t{t}", *tables[t])
        runtimes = [
            TableRuntime(f"t{t}", f"t{t}", DIMS[t], DEFAULTS[t], cache=HostCache(64, DIMS[t]))
            for t in range(2)
        ]
        runtimes.append(TableRuntime("t2", "t2", DIMS[2], DEFAULTS[2], cache=None))
        session = LookupSession("m", runtimes, reader, None, hit_rate_threshold=1.0)
        rng = np.random.default_rng(5)
        for batch in (1, 30, 400):
            cat = request(rng, tables, batch)
            got = session.lookup_columns(cat)
            ref = np.concatenate([reference(tables, t, cat[:, t]) for t in range(3)], axis=1)
            np.testing.assert_array_equal(got, ref)
        assert session.fused.layout() is not None  # read-only arrays, served fused
        stats = [t.stats for t in runtimes]
        assert stats[0].hits["vdb"] > 0 and stats[0].hits["l1"] > 0
        assert stats[2].hits["l1"] == 0 and stats[2].hits["default"] > 0
        session.close()
    finally:
        reader.close()
        writer.unlink()
        for p in shm.shm_dir().glob(f"{name}.*"):
            p.unlink()


def test_no_torn_or_foreign_row_under_concurrent_vdb_writes(tmp_path):
    """Fused lookups in two threads while a writer rewrites the VDB rows: every row a lookup
    returns is whole (one version of one key's row), never a mix of two writes or another
    key's row, and the writer's growth of the tables (new keys) is followed."""
    import threading

    from hps_core.cache.host import HostCache
    from hps_core.session import LookupSession, TableRuntime
    from hps_core.vdb.hashmap import HashMapVDB

    dim, rows = 32, 4000
    vdb = HashMapVDB(num_partitions=4)
    keys = np.arange(1, rows + 1, dtype=np.int64) * 7919

    def row(k: np.ndarray, version: int) -> np.ndarray:
        r = np.full((len(k), dim), float(version), np.float32)
        r[:, 0] = (k % 100_003).astype(np.float32)  # which key the row belongs to
        return r

    for t in range(3):
        vdb.create_table(f"t{t}", dim, capacity_hint=rows)
        vdb.upsert(f"t{t}", keys, row(keys, 0))
    runtimes = [
        TableRuntime(f"t{t}", f"t{t}", dim, -1.0, cache=HostCache(256, dim)) for t in range(3)
    ]
    session = LookupSession("m", runtimes, vdb, None, hit_rate_threshold=1.0)
    stop = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        rng = np.random.default_rng(0)
        version, extra = 1, rows
        while not stop.is_set():
            for t in range(3):
                k = keys[rng.integers(0, rows, 500)]
                vdb.upsert(f"t{t}", k, row(k, version))
            extra += 50  # new keys make the tables grow: readers must follow the new arrays
            new = np.arange(extra - 49, extra + 1, dtype=np.int64) * 7919
            vdb.upsert("t0", new, row(new, version))
            version += 1

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(150):
                cat = keys[rng.integers(0, rows, (int(rng.integers(1, 300)), 3))]
                out = session.lookup_columns(cat).reshape(len(cat), 3, dim)
                ids = (cat % 100_003).astype(np.float32)
                if not np.array_equal(out[:, :, 0], ids):
                    errors.append("a row of another key")
                if not (out[:, :, 1:] == out[:, :, 1:2]).all():
                    errors.append("a torn row")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    w = threading.Thread(target=writer)
    readers = [threading.Thread(target=reader, args=(s,)) for s in (1, 2)]
    w.start()
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    stop.set()
    w.join()
    session.close()
    assert not errors, errors[:3]
    assert runtimes[0].stats.requests == 300 and runtimes[0].stats.hits["vdb"] > 0
