"""Where a hash-map table's arrays live: process memory, or POSIX shared memory for many processes.

In shared memory each array is a file ``/dev/shm/<name>.<table>.<array>`` mapped with numpy,
and a JSON header ``/dev/shm/<name>.tables.json`` describes the tables (dim, dtype, partitions,
capacities, policy), so another process can attach to them without copying. Plain files rather
than ``multiprocessing.shared_memory`` on purpose: Python's resource tracker unlinks every
``SharedMemory`` segment a process touched when that process exits, readers included, which
would destroy a table the writer still serves. These files live until ``remove_table``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SHM_DIR = Path(os.environ.get("HPS_SHM_DIR", "/dev/shm"))
DTYPES = {"float32": np.float32, "float16": np.uint16}  # fp16 rows are kept as their bits
LOAD_FACTOR = 0.8
MIN_ROWS = 64  # pool rows per partition, at least
MAX_ROWS = 2**31 - 2  # pool rows per partition: 32-bit index entries hold row + 1
ARRAY_NAMES = ("index", "keys", "values", "meta", "count", "seq", "clock")


def partition_rows(rows: int, partitions: int) -> int:
    """Pool rows per partition for ``rows`` keys: the mean plus 4 sigma of hash imbalance."""
    mean = rows / partitions
    return int(mean + 4 * math.sqrt(mean) + MIN_ROWS)


def index_slots(pcap: int) -> int:
    """Index slots per partition for ``pcap`` pool rows (load factor <= 0.8)."""
    return int(pcap / LOAD_FACTOR) + 1


def estimate_table_bytes(rows: int, dim: int, dtype: str, partitions: int, policy: str) -> int:
    """Bytes a hash-map table of ``rows`` rows takes (for ``hps estimate``)."""
    pcap = partition_rows(rows, partitions)
    meta = 4 if policy != "evict_random" else 0
    row = 8 + dim * np.dtype(DTYPES[dtype]).itemsize + meta
    return partitions * (index_slots(pcap) * 4 + pcap * row + 16) + 16


def encode(v: np.ndarray, dtype: str) -> np.ndarray:
    """float vectors -> the table's storage array (fp16 as its bits)."""
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(v, dtype=np.float16).view(np.uint16)
    return np.ascontiguousarray(v, dtype=np.float32)


def decode(v: np.ndarray, dtype: str) -> np.ndarray:
    """Storage rows -> float32."""
    return v.view(np.float16).astype(np.float32) if dtype == "float16" else v.astype(np.float32)


@dataclass(frozen=True)
class TableArrays:
    """The arrays growth replaces, swapped as one object so a reader sees one consistent set."""

    index: np.ndarray  # uint32 [P*icap]: tag << rbits | (row + 1), 0 = empty
    keys: np.ndarray  # int64 [P*pcap]
    values: np.ndarray  # float32 or fp16 bits [P*pcap, dim]
    meta: np.ndarray  # uint32 [P*pcap], or empty for evict_random
    icap: int
    pcap: int

    @property
    def rbits(self) -> int:
        """Low bits of an index entry that hold the row (+ 1); the rest hold a hash tag."""
        return int(self.pcap).bit_length()

    def nbytes(self) -> int:
        arrays = (self.index, self.keys, self.values, self.meta)
        return sum(a.nbytes for a in arrays)


def new_arrays(
    name: str | None, table: str, P: int, dim: int, dtype: str, pcap: int, meta: bool
) -> TableArrays:
    """Zeroed arrays for P partitions of ``pcap`` rows, in /dev/shm when ``name`` is given."""
    icap = index_slots(pcap)
    shapes = {
        "index": ((P * icap,), np.uint32),
        "keys": ((P * pcap,), np.int64),
        "values": ((P * pcap, dim), DTYPES[dtype]),
        "meta": ((P * pcap if meta else 0,), np.uint32),
    }
    out = {a: _new(name, table, a, *sd) for a, sd in shapes.items()}
    return TableArrays(**out, icap=icap, pcap=pcap)


def copy_pools(old: TableArrays, count: np.ndarray, dtype: str, pcap: int) -> TableArrays:
    """New in-process arrays of ``pcap`` rows per partition holding the old pools (index empty)."""
    P, dim = len(count), old.values.shape[1]
    new = new_arrays(None, "", P, dim, dtype, pcap, len(old.meta) > 0)
    for p in range(P):
        c, src, dst = int(count[p]), p * old.pcap, p * pcap
        new.keys[dst : dst + c] = old.keys[src : src + c]
        new.values[dst : dst + c] = old.values[src : src + c]
        if len(old.meta):
            new.meta[dst : dst + c] = old.meta[src : src + c]
    return new


def new_state(name: str | None, table: str, P: int) -> dict[str, np.ndarray]:
    """Per-partition row counts and seqlock counters; clock = (batches seen, dropped flag)."""
    shapes = {"count": ((P,), np.int64), "seq": ((P,), np.uint64), "clock": ((2,), np.uint64)}
    return {a: _new(name, table, a, *sd) for a, sd in shapes.items()}


def _new(name: str | None, table: str, array: str, shape: tuple, dtype) -> np.ndarray:
    if name is None or int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    path = array_path(name, table, array)
    path.unlink(missing_ok=True)
    return np.memmap(path, dtype=dtype, mode="w+", shape=shape).view(np.ndarray)


def attach(name: str, table: str, readonly: bool, rehash):
    """Map a published table: (header entry, TableArrays, state), or None if not published.

    A read-only attachment maps everything read-only except the per-row access counts / ticks
    and the clock, which readers update (approximately) for the overflow policy. A writer that
    finds a partition's seqlock odd (its predecessor died inside a batch) rebuilds the index
    with ``rehash`` so that readers are not locked out; that batch's rows may be half written.
    """
    h = read_header(name).get(table)
    if h is None:
        return None
    P, pcap, icap, dim = h["P"], h["pcap"], h["icap"], h["dim"]

    def m(array, shape, dtype, writable=not readonly):
        mode = "r+" if writable else "r"
        path = array_path(name, table, array)
        return np.memmap(path, dtype=dtype, mode=mode, shape=shape).view(np.ndarray)

    arrays = TableArrays(
        m("index", (P * icap,), np.uint32),
        m("keys", (P * pcap,), np.int64),
        m("values", (P * pcap, dim), DTYPES[h["dtype"]]),
        m("meta", (P * pcap,), np.uint32, True) if h["meta"] else np.zeros(0, np.uint32),
        icap,
        pcap,
    )
    state = {
        "count": m("count", (P,), np.int64),
        "seq": m("seq", (P,), np.uint64),
        "clock": m("clock", (2,), np.uint64, True),
    }
    seq = state["seq"]
    if not readonly and (seq & np.uint64(1)).any():
        log.warning("VDB table %s: recovering from an interrupted write", table)
        arrays.index[:] = 0
        rehash(arrays.index, arrays.keys, state["count"], icap, pcap, arrays.rbits, P)
        seq += seq & np.uint64(1)
    return h, arrays, state


def array_path(name: str, table: str, array: str) -> Path:
    return SHM_DIR / f"{name}.{table}.{array}"


def header_path(name: str) -> Path:
    return SHM_DIR / f"{name}.tables.json"


def read_header(name: str) -> dict:
    """Table layouts published by the writer: {table: {dim, dtype, P, pcap, icap, meta, policy}}."""
    try:
        return json.loads(header_path(name).read_text())
    except FileNotFoundError:
        return {}


def write_header(name: str, tables: dict) -> None:
    """Publish the table layouts atomically: readers see the old or the new header, never half."""
    tmp = header_path(name).with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(tables))
    os.replace(tmp, header_path(name))


def publish(name: str, table: str, layout: dict) -> None:
    """Announce a table created in shared memory to other processes."""
    header = read_header(name)
    header[table] = layout
    write_header(name, header)


def remove_table(name: str, table: str) -> None:
    """Unpublish a table and unlink its files (processes that mapped them keep their mapping)."""
    header = read_header(name)
    if header.pop(table, None) is not None:
        write_header(name, header)
    for a in ARRAY_NAMES:
        array_path(name, table, a).unlink(missing_ok=True)


def remove_all(name: str) -> None:
    """Unlink every table of a shared map and its header."""
    for table in read_header(name):
        for a in ARRAY_NAMES:
            array_path(name, table, a).unlink(missing_ok=True)
    header_path(name).unlink(missing_ok=True)
