"""Multi-table lookups over the Redis VDB: the fused path (L1 for all tables in one kernel
call, then one Redis pipeline for every table's misses) against per-table lookups."""

from __future__ import annotations

import numpy as np
import pytest
import three_tables
from file_reference import file_rows
from three_tables import DEFAULTS, DIMS, write_tables

from hps_core import ParameterServer

pytestmark = pytest.mark.redis


def make_files(root):
    return write_tables(
        root, np.random.default_rng(3), lambda rng: np.unique(rng.integers(-(10**15), 10**15, 3000))
    )


def config(root, address, name, threshold=1.0, admit=1):
    vdb = {"type": "redis_cluster", "address": address, "num_partitions": 4}
    return three_tables.config(
        root, name, vdb, f"rocks_{name}",
        hit_rate_threshold=threshold, cache_admission_min_count=admit, deployed_device_list=[],
    )  # fmt: skip


def request(rng, tables, batch, absent):
    """Columns of Zipf-hot file keys, a share ``absent`` of them replaced by keys in no tier."""
    cols = []
    for keys, _ in tables:
        col = keys[np.minimum(rng.zipf(1.2, batch) - 1, len(keys) - 1)]
        col[rng.random(batch) < absent] = rng.integers(10**16, 10**17)  # in no tier
        cols.append(col)
    return cols


def assert_same_as_per_table(tables, cols, got, want, ours, theirs):
    """Vectors equal the per-table lookup's and the files'; cache slots and counters equal."""
    np.testing.assert_array_equal(got, want)
    for t, ((keys, vecs), col) in enumerate(zip(tables, cols, strict=True)):
        ref = file_rows(keys, vecs, col, DEFAULTS[t])
        lo = sum(DIMS[:t])
        np.testing.assert_array_equal(got[:, lo : lo + DIMS[t]], ref)
    for a, b in zip(ours, theirs, strict=True):
        sa, sb = a.cache.snapshot(), b.cache.snapshot()
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
        assert a.stats.hits == b.stats.hits


@pytest.mark.parametrize(
    "absent,threshold,admit",
    [
        (0.1, 1.0, 1),  # keys in no tier: those tables finish in Python (RocksDB, default)
        (0.0, 1.0, 1),  # every miss in Redis: finished and filled in the second kernel call
        (0.0, 0.6, 1),  # above the threshold: background fills
        (0.0, 1.0, 2),  # admission filter: fills through the session
    ],
)
def test_fused_lookups_over_redis_match_per_table_ones(
    redis_any, tmp_path, absent, threshold, admit
):
    tables = make_files(tmp_path)
    address = redis_any.address
    fused = ParameterServer(config(tmp_path, address, "f", threshold, admit))
    plain = ParameterServer(config(tmp_path, address, "p", threshold, admit))
    try:
        plain.session("p").fused.run = lambda *a: None  # per-table lookups only
        assert fused.session("f").fused.layout() is not None  # Redis: served fused
        runs = []
        read_nodes = fused.vdb.nodes.read_nodes
        fused.vdb.nodes.read_nodes = lambda jobs, read: runs.append(jobs) or read_nodes(jobs, read)
        rng = np.random.default_rng(4)
        for batch in (1, 5, 64, 300, 7):
            cols = request(rng, tables, batch, absent)
            cat = np.stack(cols, axis=1)
            runs.clear()
            got = fused.session("f").lookup_columns(cat)
            want = plain.session("p").lookup_columns(cat)
            fused.session("f").flush()
            plain.session("p").flush()
            # all tables' misses travel in one pipelined read (touches and metadata aside)
            assert len(runs) <= 1
            assert_same_as_per_table(
                tables, cols, got, want, fused.session("f").tables, plain.session("p").tables
            )
    finally:
        fused.close()
        plain.close()


def test_device_path_over_redis_reads_all_tables_misses_in_one_round_trip(redis_any, tmp_path):
    """The device-resident lookup (NumPy with host caches here, CuPy with GPU caches on a GPU)
    over Redis: every table's L1 misses in one pipelined ``fetch_many``; vectors, cache slots
    and counters as per-table lookups."""
    from hps_core.device import DeviceLookup

    tables = make_files(tmp_path)
    address = redis_any.address
    dev = ParameterServer(config(tmp_path, address, "d"))
    plain = ParameterServer(config(tmp_path, address, "p"))
    try:
        s = dev.session("d")
        s.device = DeviceLookup(s, xp=np)
        plain.session("p").fused.run = lambda *a: None
        runs = []
        read_nodes = dev.vdb.nodes.read_nodes
        dev.vdb.nodes.read_nodes = lambda jobs, read: runs.append(jobs) or read_nodes(jobs, read)
        rng = np.random.default_rng(5)
        for batch in (1, 5, 64, 300, 7):
            cols = request(rng, tables, batch, 0.1)
            cat = np.stack(cols, axis=1)
            runs.clear()
            got = s.lookup_columns(cat)
            want = plain.session("p").lookup_columns(cat)
            s.flush()
            plain.session("p").flush()
            assert len(runs) <= 1  # one pipelined read of rows
            assert_same_as_per_table(tables, cols, got, want, s.tables, plain.session("p").tables)
    finally:
        dev.close()
        plain.close()
