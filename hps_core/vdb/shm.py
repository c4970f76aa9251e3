"""Storage of a hash-map table: its arrays, their 16-bit row formats, and where they live.

Arrays live in process memory, or in POSIX shared memory for many processes. fp16 and bf16
rows are kept as their uint16 bits (numba has no 16-bit float type). fp16 is decoded by
``widen`` (an instruction) or, where this CPU lacks one, through the ``HALF_TO_FLOAT`` table;
bf16 by ``widen`` too (a shift). ``lut_for`` picks.

In shared memory each array is a file ``/dev/shm/<name>.<table>.<array>`` mapped with numpy,
and a JSON header ``/dev/shm/<name>.tables.json`` describes the tables (dim, dtype, partitions,
capacities, policy), so another process can attach to them without copying. Plain files rather
than ``multiprocessing.shared_memory`` on purpose: Python's resource tracker unlinks every
``SharedMemory`` segment a process touched when that process exits, readers included, which
would destroy a table the writer still serves. These files live until ``remove_table``.

Each file's pages are reserved when it is created (``posix_fallocate``). A tmpfs hands out a
sparse file's pages as they are first written, so a table larger than the room left (Docker's
default ``/dev/shm`` is 64 MiB) used to be created without complaint and then killed the process
that filled it with SIGBUS; now ``create_table`` raises ``SharedMemoryFullError`` instead and
leaves no file of that table behind.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from llvmlite import binding, ir
from numba import types
from numba.extending import intrinsic, overload

from .. import buffers
from ..cache.reference import from_bf16_bits, to_bf16_bits
from ..errors import InvalidInputError, StorageError

log = logging.getLogger(__name__)


def shm_dir() -> Path:
    """Where shared tables keep their files: ``HPS_SHM_DIR`` (read at each call, so a process
    may point itself and the servers it starts elsewhere), else /dev/shm."""
    return Path(os.environ.get("HPS_SHM_DIR") or "/dev/shm")


# Element type of the values array per storage dtype: fp16 and bf16 rows are kept as their
# bits; an int8 row is its dim int8 values then its fp32 scale (4 little-endian bytes), padded
# to a whole number of uint16s (``value_columns``), so kernels that only move rows can take
# any table's values viewed as uint16.
DTYPES = {"float32": np.float32, "float16": np.uint16, "bfloat16": np.uint16, "int8": np.uint8}
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


def value_columns(dim: int, dtype: str) -> int:
    """Columns of the values array for rows of ``dim`` elements."""
    return dim + 4 + (dim & 1) if dtype == "int8" else dim


def row_bytes(dim: int, dtype: str) -> int:
    """Bytes one row takes in the values array (and in Redis)."""
    return value_columns(dim, dtype) * np.dtype(DTYPES[dtype]).itemsize


def estimate_table_bytes(
    rows: int, dim: int, dtype: str, partitions: int, policy: str, max_pcap: int = MAX_ROWS
) -> int:
    """Bytes a hash-map table of ``rows`` rows takes (for ``hps estimate``); a partition holds
    at most ``max_pcap`` rows (the overflow margin, and MAX_ROWS)."""
    pcap = max(1, min(partition_rows(rows, partitions), max_pcap))
    meta = 4 if policy != "evict_random" else 0
    row = 8 + row_bytes(dim, dtype) + meta
    return partitions * (index_slots(pcap) * 4 + pcap * row + 16) + 16


def encode(v: np.ndarray, dtype: str) -> np.ndarray:
    """float vectors -> the table's storage array (fp16 / bf16 as their bits; bf16 rounded to
    nearest even, as the L1 cache rounds it; int8 as ``encode_int8``)."""
    if dtype == "int8":
        return encode_int8(v)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(v, dtype=np.float16).view(np.uint16)
    if dtype == "bfloat16":
        return to_bf16_bits(v)
    return np.ascontiguousarray(v, dtype=np.float32)


def decode(v: np.ndarray, dtype: str, dim: int) -> np.ndarray:
    """Storage rows -> float32 [n, dim]."""
    if dtype == "int8":
        q = v[:, :dim].view(np.int8).astype(np.float32)
        scale = np.ascontiguousarray(v[:, dim : dim + 4]).view("<f4").astype(np.float32)
        return q * scale
    if dtype == "float16":
        return v.view(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return from_bf16_bits(v)
    return v.astype(np.float32)


def encode_int8(v: np.ndarray) -> np.ndarray:
    """float rows -> uint8 [n, value_columns]: symmetric per-row quantisation, q = rint(x / s)
    with s = max |x| / 127 (0 for a zero row), so each element is off by at most s / 2;
    decoded as float32(q) * s. Non-finite values cannot be scaled: an error naming them."""
    v = np.asarray(v, np.float32)
    n, dim = v.shape
    if not np.isfinite(v).all():
        bad = int((~np.isfinite(v).all(axis=1)).sum())
        raise InvalidInputError(
            "vectors", f"{bad} rows with NaN or infinite values", "finite values (int8 storage)"
        )
    peak = np.abs(v).max(axis=1)
    scale = (peak / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(v / safe[:, None]), -127, 127).astype(np.int8)
    out = np.zeros((n, value_columns(dim, "int8")), np.uint8)
    out[:, :dim] = q.view(np.uint8)
    out[:, dim : dim + 4] = scale.astype("<f4").view(np.uint8).reshape(n, 4)
    return out


HALF_TO_FLOAT = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
"""fp16 bits -> float32 (256 KiB, stays in L2 while a batch is decoded)."""


def _native_half() -> bool:
    """Whether LLVM turns fp16 -> fp32 into an instruction here rather than a libcall."""
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        return False  # compiling for another CPU than this one
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        return bool(binding.get_host_cpu_features().get("f16c"))
    except RuntimeError:
        return False


NATIVE_HALF = _native_half()
"""Decode fp16 rows with ``widen`` (else through ``HALF_TO_FLOAT``); read per fetch."""

BF16 = np.zeros(0, np.uint32)
"""A fetch's ``lut`` for bf16 rows: not a table but a marker (its type) that has ``widen``
shift the bits into place, which is exact and as cheap as a copy."""

INT8 = np.zeros(0, np.int8)
"""A fetch's ``lut`` for int8 rows (a marker as ``BF16``): ``widen`` and ``row_scale``."""


def lut_for(dtype: str) -> np.ndarray | None:
    """What a fetch decodes rows of ``dtype`` with: None where it copies them (fp32) or
    converts them with an instruction (fp16 with NATIVE_HALF), the ``BF16`` marker, or
    ``HALF_TO_FLOAT``."""
    if dtype == "bfloat16":
        return BF16
    if dtype == "int8":
        return INT8
    if dtype == "float16" and not NATIVE_HALF:
        return HALF_TO_FLOAT
    return None


def _is_bf16_marker(lut) -> bool:
    return isinstance(lut, types.Array) and lut.dtype == types.uint32


def _is_int8_marker(lut) -> bool:
    return isinstance(lut, types.Array) and lut.dtype == types.int8


@intrinsic
def _u32_as_float32(typingctx, x):
    """The low 32 bits of an integer as the float32 they encode."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, i32)
        elif v.type.width < 32:
            v = builder.zext(v, i32)
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def _fp16_to_float32(typingctx, x):
    """uint16 fp16 bits -> float32, exactly (an instruction where NATIVE_HALF)."""
    if x != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(x), codegen


def widen(x, lut):
    """A stored element as float32: float32 as is; uint16 bits with ``lut`` None as fp16
    (needs NATIVE_HALF), with the ``BF16`` marker as bf16, else through the table ``lut``; a
    uint8 with the ``INT8`` marker as an int8 (times ``row_scale``). Compiled code only (numba
    picks the case from the types)."""
    raise NotImplementedError("widen runs in numba-compiled code only")


def row_scale(values, row, dim, lut):
    """The factor of a row's widened elements: its fp32 scale for int8 rows, else 1."""
    raise NotImplementedError("row_scale runs in numba-compiled code only")


@overload(row_scale, inline="always")
def _row_scale(values, row, dim, lut):
    if not _is_int8_marker(lut):
        return lambda values, row, dim, lut: np.float32(1.0)

    def scale(values, row, dim, lut):
        b = np.uint32(values[row, dim]) | (np.uint32(values[row, dim + 1]) << np.uint32(8))
        b |= np.uint32(values[row, dim + 2]) << np.uint32(16)
        b |= np.uint32(values[row, dim + 3]) << np.uint32(24)
        return _u32_as_float32(b)

    return scale


@overload(widen, inline="always")
def _widen(x, lut):
    if x == types.float32:
        return lambda x, lut: x
    if x == types.uint8 and _is_int8_marker(lut):
        return lambda x, lut: np.float32(np.int8(x))
    if x != types.uint16:
        return None
    if isinstance(lut, types.NoneType):
        return lambda x, lut: _fp16_to_float32(x)
    if _is_bf16_marker(lut):  # the bits in the high half of a float32: exact
        return lambda x, lut: _u32_as_float32(np.uint32(x) << np.uint32(16))
    return lambda x, lut: lut[x]


def widens(lut) -> bool:
    """Whether a fetch with this ``lut`` decodes rows with ``widen`` (None, a marker) rather
    than through the table; a constant in compiled code."""
    return lut is None or lut is BF16 or lut is INT8


@overload(widens, inline="always")
def _widens(lut):
    flag = isinstance(lut, types.NoneType) or _is_bf16_marker(lut) or _is_int8_marker(lut)
    return lambda lut: flag


@dataclass(frozen=True)
class TableArrays:
    """The arrays growth replaces, swapped as one object so a reader sees one consistent set."""

    index: np.ndarray  # uint32 [P*icap]: tag << rbits | (row + 1), 0 = empty
    keys: np.ndarray  # int64 [P*pcap]
    values: np.ndarray  # float32, or fp16 / bf16 bits, [P*pcap, dim]; int8 rows: see DTYPES
    meta: np.ndarray  # uint32 [P*pcap], or empty for evict_random
    icap: int
    pcap: int

    @functools.cached_property
    def rbits(self) -> int:
        """Low bits of an index entry that hold the row (+ 1); the rest hold a hash tag."""
        return int(self.pcap).bit_length()

    def nbytes(self) -> int:
        arrays = (self.index, self.keys, self.values, self.meta)
        return sum(a.nbytes for a in arrays)


def array_shapes(P: int, dim: int, dtype: str, pcap: int, meta: bool) -> dict[str, tuple]:
    """{array: (shape, element type)} of a table's replaceable arrays."""
    icap = index_slots(pcap)
    return {
        "index": ((P * icap,), np.uint32),
        "keys": ((P * pcap,), np.int64),
        "values": ((P * pcap, value_columns(dim, dtype)), DTYPES[dtype]),
        "meta": ((P * pcap if meta else 0,), np.uint32),
    }


def table_bytes(P: int, dim: int, dtype: str, pcap: int, meta: bool) -> int:
    """Bytes of a table's replaceable arrays."""
    return sum(nbytes(*sd) for sd in array_shapes(P, dim, dtype, pcap, meta).values())


def nbytes(shape: tuple, dtype) -> int:
    """Bytes of an array of this shape and element type."""
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def new_arrays(
    name: str | None, table: str, P: int, dim: int, dtype: str, pcap: int, meta: bool
) -> TableArrays:
    """Zeroed arrays for P partitions of ``pcap`` rows, in /dev/shm when ``name`` is given."""
    shapes = array_shapes(P, dim, dtype, pcap, meta)
    out = {a: _new(name, table, a, *sd) for a, sd in shapes.items()}
    return TableArrays(**out, icap=index_slots(pcap), pcap=pcap)


def copy_pools(old: TableArrays, count: np.ndarray, dim: int, dtype: str, pcap: int) -> TableArrays:
    """New in-process arrays of ``pcap`` rows per partition holding the old pools (index empty)."""
    P = len(count)
    new = new_arrays(None, "", P, dim, dtype, pcap, len(old.meta) > 0)
    for p in range(P):
        c, src, dst = int(count[p]), p * old.pcap, p * pcap
        new.keys[dst : dst + c] = old.keys[src : src + c]
        new.values[dst : dst + c] = old.values[src : src + c]
        if len(old.meta):
            new.meta[dst : dst + c] = old.meta[src : src + c]
    return new


@dataclass
class Table:
    """One table: its replaceable arrays and its fixed per-partition state."""

    dim: int
    dtype: str
    P: int
    policy: str
    arr: TableArrays
    count: np.ndarray  # int64 [P]: rows per partition
    seq: np.ndarray  # uint64 [P]: seqlock counters (see hashmap)
    clock: np.ndarray  # uint64 [2]: batches seen (the evict_oldest tick), dropped flag
    lock: threading.Lock = field(default_factory=threading.Lock)  # the writer lock
    evicted: int = 0  # rows this process evicted by the overflow policy

    def nbytes(self) -> int:
        return self.arr.nbytes() + self.count.nbytes + self.seq.nbytes + self.clock.nbytes


def create_table(
    name: str | None, table: str, P: int, dim: int, dtype: str, pcap: int, policy: str
) -> Table:
    """A new empty table (in /dev/shm and published to other processes when ``name`` is given)."""
    meta = policy != "evict_random"  # only least-used and oldest keep a number per row
    shapes = {"count": ((P,), np.int64), "seq": ((P,), np.uint64), "clock": ((2,), np.uint64)}
    try:
        arr = new_arrays(name, table, P, dim, dtype, pcap, meta)
        state = {a: _new(name, table, a, *sd) for a, sd in shapes.items()}
        if name:
            layout = {"dim": dim, "dtype": dtype, "P": P, "pcap": pcap, "icap": arr.icap}
            publish(
                name, table, {**layout, "meta": meta, "policy": policy, "created": time.time_ns()}
            )
    except OSError as e:
        if name is None:
            raise
        remove_table(name, table)  # what was made of it, so the room it took is free again
        if e.errno == errno.ENAMETOOLONG:
            longest = max(len(array_path(name, table, a).name.encode()) for a in ARRAY_NAMES)
            raise InvalidInputError(
                "table", repr(table), f"a shorter name: its files' names ({name}.{table}.*, "
                f"up to {longest} bytes) exceed what {shm_dir()} allows",
            ) from None  # fmt: skip
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        need = table_bytes(P, dim, dtype, pcap, meta) + sum(nbytes(*sd) for sd in shapes.values())
        st = os.statvfs(shm_dir())
        raise SharedMemoryFullError(shm_dir(), table, need, st.f_bavail * st.f_frsize) from e
    return Table(dim, dtype, P, policy, arr, **state)


def _new(name: str | None, table: str, array: str, shape: tuple, dtype) -> np.ndarray:
    if name is None or int(np.prod(shape)) == 0:
        # np.empty, not np.zeros: numpy asks for transparent huge pages only on this path (a
        # random lookup then costs no page walk); calloc'd zeros get 4 KiB pages. Rows start on
        # a cache line, so a row of 512 bytes is read as 8 lines, not 9.
        a = buffers.line_aligned(shape, dtype)
        if array not in ("keys", "values"):  # pool rows past count are never read
            a.fill(0)
        return a
    path = array_path(name, table, array)
    path.unlink(missing_ok=True)
    _reserve(path, nbytes(shape, dtype))
    return np.memmap(path, dtype=dtype, mode="r+", shape=shape).view(np.ndarray)


def _reserve(path: Path, nbytes: int) -> None:
    """Create ``path`` with ``nbytes`` whose pages are allocated now (OSError ENOSPC where the
    filesystem lacks the room), not on first write, where the lack of room is a SIGBUS."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)  # less the umask, as before
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, nbytes)  # a filesystem without allocation: sparse, as before
    finally:
        os.close(fd)


class SharedMemoryFullError(StorageError):
    """The shared-memory filesystem has no room for a table's arrays."""

    def __init__(self, directory: Path, table: str, need: int, free: int):
        self.directory, self.table, self.need, self.free = str(directory), table, need, free
        mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
        super().__init__(
            f"VDB table '{table}': {directory} has room for {mib(free)}, the table's arrays need "
            f"{mib(need)}; give it more (docker run --shm-size, a Kubernetes emptyDir with "
            f"medium: Memory, or mount -o remount,size=... {directory}) or put the VDB in "
            f"process memory (volatile_db.type: parallel_hash_map)"
        )


ATTACH_TRIES = 20


def attach(name: str, table: str, readonly: bool) -> Table | None:
    """Map a table another process (or an earlier writer) published; None if there is none.

    A read-only attachment maps everything read-only except the per-row access counts / ticks
    and the clock, which readers update (approximately) for the overflow policy. A writer that
    finds a partition's seqlock odd (its predecessor died inside a batch) empties it: a row
    half written, a key half deleted (stored twice), a row half moved are all possible there.

    The writer may drop the table and create it again while this maps its arrays one by one.
    The clock is mapped first: a drop sets its flag before the files go, so a flag still clear
    after the last map, with the header unchanged, means every array is of one table. Else
    (or when a file vanished or shrank meanwhile) it maps them again.
    """
    error = None
    for _ in range(ATTACH_TRIES):
        h = read_header(name).get(table)
        if h is None:
            return None
        try:
            t = _map(name, table, readonly, h)
        except (StorageError, OSError) as e:  # damaged, or dropped while it was mapped
            replaced = read_header(name).get(table) != h
            error = None if replaced else e if isinstance(e, StorageError) else StorageError(
                f"shared VDB table '{table}': {e}")  # fmt: skip
            time.sleep(0.001)
            continue
        if not t.clock[1] and read_header(name).get(table) == h:
            if not readonly:
                _recover(table, t)
            return t
    raise error or StorageError(
        f"shared VDB table '{table}' was dropped and created again {ATTACH_TRIES} times while "
        f"this process mapped it ({shm_dir()}/{name}.*): is more than one writer using it?"
    )


def _map(name: str, table: str, readonly: bool, h: dict) -> Table:
    P, pcap, icap, dim = h["P"], h["pcap"], h["icap"], h["dim"]

    def m(array, shape, dtype, writable=not readonly):
        mode = "r+" if writable else "r"
        path = array_path(name, table, array)
        need = nbytes(shape, dtype)
        try:
            have = path.stat().st_size
        except FileNotFoundError:
            have = None
        if have is None or have < need:  # a map past a file's end faults (SIGBUS) when read
            found = "is missing" if have is None else f"holds {have} bytes"
            raise StorageError(
                f"shared VDB table '{table}': {path} {found}, its header "
                f"({header_path(name)}) says {need}; the table is damaged or was written by "
                f"another version: remove the files {shm_dir()}/{name}.* and load it again"
            )
        return np.memmap(path, dtype=dtype, mode=mode, shape=shape).view(np.ndarray)

    clock = m("clock", (2,), np.uint64, True)  # first: see attach
    arrays = TableArrays(
        m("index", (P * icap,), np.uint32),
        m("keys", (P * pcap,), np.int64),
        m("values", (P * pcap, value_columns(dim, h["dtype"])), DTYPES[h["dtype"]]),
        m("meta", (P * pcap,), np.uint32, True) if h["meta"] else np.zeros(0, np.uint32),
        icap,
        pcap,
    )
    count, seq = m("count", (P,), np.int64), m("seq", (P,), np.uint64)
    return Table(dim, h["dtype"], P, h["policy"], arrays, count, seq, clock)


def _recover(table: str, t: Table) -> None:
    """Empty the partitions whose seqlock a writer left odd (it died inside a batch). Each
    counter stays odd, so readers do not trust the partition, until it is empty."""
    dirty = np.flatnonzero(t.seq & np.uint64(1))
    if not len(dirty):
        return
    lost = int(t.count[dirty].sum())
    icap = t.arr.icap
    for p in dirty:
        t.count[p] = 0
        t.arr.index[p * icap : (p + 1) * icap] = 0
        t.seq[p] += np.uint64(1)
    log.warning(
        "VDB table %s: a writer died inside a batch; the %d rows of the %d partitions it was "
        "writing are dropped, as any of them may be half written (lookups read them from "
        "RocksDB, and a load fills them again)", table, lost, len(dirty),
    )  # fmt: skip


def array_path(name: str, table: str, array: str) -> Path:
    return shm_dir() / f"{name}.{table}.{array}"


def header_path(name: str) -> Path:
    return shm_dir() / f"{name}.tables.json"


def read_header(name: str) -> dict:
    """Table layouts published by the writer: {table: {dim, dtype, P, pcap, icap, meta, policy}}."""
    try:
        return json.loads(header_path(name).read_text())
    except FileNotFoundError:
        return {}


def write_header(name: str, tables: dict) -> None:
    """Publish the table layouts atomically: readers see the old or the new header, never half."""
    tmp = header_path(name).with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(tables))
        os.replace(tmp, header_path(name))
    finally:
        tmp.unlink(missing_ok=True)  # written and renamed, or failed (a full tmpfs)


def set_layout_field(name: str, table: str, field: str, value: object) -> None:
    """Set (value None: remove) one field of a published table's layout."""
    header = read_header(name)
    if table in header:
        if value is None:
            header[table].pop(field, None)
        else:
            header[table][field] = value
        write_header(name, header)


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
        try:
            array_path(name, table, a).unlink(missing_ok=True)
        except OSError as e:  # a name too long for the filesystem was never made
            if e.errno != errno.ENAMETOOLONG:
                raise


def remove_all(name: str) -> None:
    """Unlink every table of a shared map and its header."""
    for table in read_header(name):
        for a in ARRAY_NAMES:
            array_path(name, table, a).unlink(missing_ok=True)
    header_path(name).unlink(missing_ok=True)
