"""Memory a config will need, computed from file sizes before anything is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cache.admission import sketch_bytes
from .config import HPSConfig
from .model_io import SparseTable
from .vdb.shm import MAX_ROWS

# RocksDB per-entry overhead beyond key + value: internal key (sequence/type, 8 B), varint
# lengths, and index/filter blocks. Measured ~20-30 B/row on tables of 1M rows.
PDB_ENTRY_OVERHEAD = 24

# Host memory of RocksDB after a load: the server flushes each table's memtable to disk once
# its rows are written, so a table holds its column family's ~80 KiB. (The block cache fills
# with lookups later, up to twice the live SST bytes or its size, whichever is smaller; online
# updates refill the memtables, up to 8 MiB of rows before the ingestor flushes them.)
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
    pdb_host_bytes: int = 0  # RocksDB's host RAM after a load (its column family)
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
                parts = 1 if v.type == "hash_map" else v.num_partitions  # as build_vdb makes it
                max_pcap = min(v.overflow_margin, MAX_ROWS)
                vdb_rows = min(vdb_rows, parts * max_pcap)
                vdb_bytes = estimate_table_bytes(
                    vdb_rows, dim, v.storage_dtype, parts, v.overflow_policy, max_pcap
                )
            item = 4 if m.cache_storage_dtype == "float32" else 2
            on_gpu = gpu_device(m) is not None
            if on_gpu and m.static_table and m.gpucache and rows:  # HPS's static table
                # open addressing: a power of two >= 2 rows of slots (key, state, row index
                # each), then the rows and a free list
                slots = rows
                table_slots = 1 << max(6, (2 * rows - 1).bit_length())
                l1_bytes = table_slots * (8 + 4 + 4) + rows * (4 + dim * item)
            else:
                # The cache rounds its capacity up to whole sets of cache_ways slots.
                slots = math.ceil(l1_capacity(m, rows) / m.cache_ways) * m.cache_ways
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
                    pdb_host = COLUMN_FAMILY_BYTES
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
    return out
