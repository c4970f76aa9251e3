"""Memory a config will need, computed from file sizes before anything is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cache.admission import sketch_bytes
from .config import HPSConfig
from .model_io import SparseTable
from .pdb.rocksdb import TOTAL_WRITE_BUFFER_BYTES, WRITE_BUFFER_BYTES

# RocksDB per-entry overhead beyond key + value: internal key (sequence/type, 8 B), varint
# lengths, and index/filter blocks. Measured ~20-30 B/row on tables of 1M rows.
PDB_ENTRY_OVERHEAD = 24

# Host memory of RocksDB after a first load: the rows written since the last flush sit in the
# table's memtable (skiplist node, internal key, arena) at ~40 B per row beyond key + value
# (36-46 B measured for dims 16/64, 10K-2M rows), plus ~80 KiB per column family. A memtable
# is flushed to disk once it reaches the PDB's write buffer size, and all of them together
# once they reach its total, so one table holds up to the first and all tables up to the
# second; a restart on an already loaded RocksDB holds none.
MEMTABLE_ROW_OVERHEAD = 40
COLUMN_FAMILY_BYTES = 80 << 10


@dataclass
class TableEstimate:
    """Bytes one table will take on each level."""

    model: str
    table: str
    rows: int
    dim: int
    vdb_rows: int
    vdb_bytes: int
    l1_rows: int
    l1_bytes: int
    l1_device: str
    pdb_bytes: int
    pdb_host_bytes: int = 0  # RocksDB memtables right after a first load (host RAM)
    admission_bytes: int = 0  # the L1 admission sketch (host RAM)


def estimate_config(cfg: HPSConfig) -> list[TableEstimate]:
    """Per-table bytes: VDB (host RAM), L1 (GPU, or host in CPU mode), PDB (disk, and host RAM)."""
    from .server import gpu_device, l1_capacity
    from .vdb.hashmap import estimate_table_bytes

    v = cfg.volatile_db
    out = []
    for m in cfg.models:
        for t, path in enumerate(m.sparse_files):
            dim = m.embedding_vecsize_per_table[t]
            with SparseTable.open(path, dim) as f:
                rows = f.rows
            vdb_rows = int(rows * v.initial_cache_rate) if v.initialize_after_startup else 0
            vdb_rows = min(vdb_rows, v.overflow_margin * v.num_partitions)
            vdb_bytes = 0
            if v.type in ("hash_map", "parallel_hash_map", "multi_process_hash_map"):
                parts = 1 if v.type == "hash_map" else v.num_partitions
                vdb_bytes = estimate_table_bytes(
                    vdb_rows, dim, v.storage_dtype, parts, v.overflow_policy
                )
            # The cache rounds its capacity up to whole sets of cache_ways slots.
            slots = math.ceil(l1_capacity(m, rows) / m.cache_ways) * m.cache_ways
            item = 4 if m.cache_storage_dtype == "float32" else 2
            on_gpu = gpu_device(m) is not None
            # per slot, host: key, stamp, occupancy byte; GPU: key, stamp, uint32 state
            slot_bytes = 8 + 8 + (4 if on_gpu else 1)
            l1_bytes = slots * (slot_bytes + dim * item)
            admission = 0
            if slots and m.cache_admission_min_count > 1:
                admission = sketch_bytes(slots)  # the set-associative cache's slot count
            pdb = pdb_host = 0
            if cfg.persistent_db.type != "disabled":
                pdb = rows * (8 + 4 * dim + PDB_ENTRY_OVERHEAD)
                if not cfg.persistent_db.read_only:
                    memtable = rows * (8 + 4 * dim + MEMTABLE_ROW_OVERHEAD)
                    pdb_host = min(memtable, WRITE_BUFFER_BYTES)
            out.append(
                TableEstimate(
                    model=m.model,
                    table=m.embedding_table_names[t],
                    rows=rows,
                    dim=dim,
                    vdb_rows=vdb_rows,
                    vdb_bytes=vdb_bytes,
                    l1_rows=slots,
                    l1_bytes=l1_bytes,
                    l1_device="gpu" if on_gpu else "host",
                    pdb_bytes=pdb,
                    pdb_host_bytes=pdb_host,
                    admission_bytes=admission,
                )
            )
    memtables = sum(e.pdb_host_bytes for e in out)
    scale = min(1.0, TOTAL_WRITE_BUFFER_BYTES / memtables) if memtables else 1.0
    for e in out:  # all memtables together are held to about the total
        if e.pdb_host_bytes:
            e.pdb_host_bytes = int(e.pdb_host_bytes * scale) + COLUMN_FAMILY_BYTES
    return out
