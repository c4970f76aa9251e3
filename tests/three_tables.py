"""The three-table model (dims 8, 4, 16) both fused-lookup tests serve, over the hash-map VDB
(``test_fused.py``) and over Redis (``redis/test_redis_fused.py``): its files and its config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from hps_core.model_io import write_table

DIMS = [8, 4, 16]
DEFAULTS = [0.5, -1.0, 2.0]


def write_tables(
    root: Path, rng: np.random.Generator, make_keys: Callable[[np.random.Generator], np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Write each table's sparse files (keys from ``make_keys``, shuffled; normal vectors);
    returns [(keys, vectors)] per table."""
    tables = []
    for t, dim in enumerate(DIMS):
        keys = make_keys(rng)
        rng.shuffle(keys)
        vecs = rng.standard_normal((len(keys), dim)).astype(np.float32)
        write_table(root / f"t{t}_sparse_0.model", keys, vecs)
        tables.append((keys, vecs))
    return tables


def config(root: Path, model: str, volatile_db: dict, rocksdb: str, **model_options) -> dict:
    """The model's config: this VDB, RocksDB at root/rocksdb, an L1 of 5% per table (not
    pre-filled) and the given model options."""
    return {
        "supportlonglong": True,
        "volatile_db": volatile_db,
        "persistent_db": {"type": "rocks_db", "path": str(root / rocksdb)},
        "models": [
            {
                "model": model,
                "sparse_files": [str(root / f"t{t}_sparse_0.model") for t in range(len(DIMS))],
                "embedding_table_names": ["a", "b", "c"],
                "embedding_vecsize_per_table": DIMS,
                "maxnum_catfeature_query_per_table_per_sample": [1] * len(DIMS),
                "default_value_for_each_table": DEFAULTS,
                "gpucacheper": 0.05,
                "cache_prefill": False,
                **model_options,
            }
        ],
    }
