"""Multi-table lookups over the Redis VDB: the fused path (L1 for all tables in one kernel
call, then one Redis pipeline for every table's misses) against per-table lookups."""

from __future__ import annotations

import numpy as np
import pytest
from file_reference import file_rows

from hps_core import ParameterServer
from hps_core.model_io import write_table

pytestmark = pytest.mark.redis

DIMS = [8, 4, 16]
DEFAULTS = [0.5, -1.0, 2.0]


def make_files(root):
    rng = np.random.default_rng(3)
    tables = []
    for t, dim in enumerate(DIMS):
        keys = np.unique(rng.integers(-(10**15), 10**15, 3000))
        rng.shuffle(keys)
        vecs = rng.standard_normal((len(keys), dim)).astype(np.float32)
        write_table(root / f"t{t}_sparse.model", keys, vecs)
        tables.append((keys, vecs))
    return tables


def config(root, address, name, threshold=1.0, admit=1):
    return {
        "supportlonglong": True,
        "volatile_db": {"type": "redis_cluster", "address": address, "num_partitions": 4},
        "persistent_db": {"type": "rocks_db", "path": str(root / f"rocks_{name}")},
        "models": [
            {
                "model": name,
                "sparse_files": [str(root / f"t{t}_sparse.model") for t in range(3)],
                "embedding_table_names": ["a", "b", "c"],
                "embedding_vecsize_per_table": DIMS,
                "maxnum_catfeature_query_per_table_per_sample": [1, 1, 1],
                "default_value_for_each_table": DEFAULTS,
                "gpucacheper": 0.05,
                "cache_prefill": False,
                "hit_rate_threshold": threshold,
                "cache_admission_min_count": admit,
                "deployed_device_list": [],
            }
        ],
    }


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
        run = fused.vdb.nodes.run
        fused.vdb.nodes.run = lambda cmds, read=None: runs.append(read) or run(cmds, read)
        rng = np.random.default_rng(4)
        for batch in (1, 5, 64, 300, 7):
            cols = []
            for keys, _ in tables:
                col = keys[np.minimum(rng.zipf(1.2, batch) - 1, len(keys) - 1)]
                col[rng.random(batch) < absent] = rng.integers(10**16, 10**17)  # in no tier
                cols.append(col)
            cat = np.stack(cols, axis=1)
            runs.clear()
            got = fused.session("f").lookup_columns(cat)
            want = plain.session("p").lookup_columns(cat)
            fused.session("f").flush()
            plain.session("p").flush()
            np.testing.assert_array_equal(got, want)
            # all tables' misses travel in one pipelined read (touches and metadata aside)
            assert sum(r is not None for r in runs) <= 1
            for t, ((keys, vecs), col) in enumerate(zip(tables, cols, strict=True)):
                ref = file_rows(keys, vecs, col, DEFAULTS[t])
                lo = sum(DIMS[:t])
                np.testing.assert_array_equal(got[:, lo : lo + DIMS[t]], ref)
            for a, b in zip(fused.session("f").tables, plain.session("p").tables, strict=True):
                sa, sb = a.cache.snapshot(), b.cache.snapshot()
                for k in sa:
                    np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
                assert a.stats.hits == b.stats.hits
    finally:
        fused.close()
        plain.close()
