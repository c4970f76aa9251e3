"""A one-table model served with a Redis VDB and a RocksDB PDB, and its numpy reference."""

from __future__ import annotations

import numpy as np

from hps_core.model_io import write_table


def make_model(tmp_path, rows=3000, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(-(10**12), 10**12, rows * 2))[:rows]
    rng.shuffle(keys)
    vecs = rng.standard_normal((rows, dim)).astype(np.float32)
    write_table(tmp_path / "t0_sparse.model", keys, vecs)
    return keys, vecs


def server_config(tmp_path, address: str, dim=8, **vdb) -> dict:
    return {
        "supportlonglong": True,
        "volatile_db": {"type": "redis_cluster", "address": address, "num_partitions": 6, **vdb},
        "persistent_db": {"type": "rocks_db", "path": str(tmp_path / "rocks")},
        "models": [
            {
                "model": "m",
                "sparse_files": [str(tmp_path / "t0_sparse.model")],
                "embedding_table_names": ["t0"],
                "embedding_vecsize_per_table": [dim],
                "maxnum_catfeature_query_per_table_per_sample": [4],
                "default_value_for_each_table": [0.5],
                "gpucacheper": 0.2,
                "deployed_device_list": [],
            }
        ],
    }


def reference(keys, vecs, q, default=0.5):
    index = {k: i for i, k in enumerate(keys.tolist())}
    return np.array(
        [
            vecs[index[k]] if k in index else np.full(vecs.shape[1], default, np.float32)
            for k in q.tolist()
        ]
    )
