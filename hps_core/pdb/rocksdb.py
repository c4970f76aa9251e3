"""RocksDB persistent DB through rocksdict: one column family per table, batched reads and writes.

Keys are stored as 8-byte little-endian int64, values as raw float32 rows. The column family
``hps_meta`` records each table's dim (``dim:<table>``) and free-form strings (``meta:<key>``,
e.g. which sparse files were loaded), so a DB reopened read-only or as a secondary knows its
tables. One process writes (the primary); readers open it read-only or as secondaries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import compress

import numpy as np
from rocksdict import AccessType, BlockBasedOptions, Cache, Options, Rdict, WriteBatch

from ..errors import HPSError, InvalidInputError, StorageError
from .base import PersistentDB

log = logging.getLogger(__name__)

META_CF = "hps_meta"
_DIM = b"dim:"
_META = b"meta:"
# Tables up to this many rows (by RocksDB's estimate) are counted exactly by iteration.
EXACT_SIZE_LIMIT = 1_000_000
# After a failed write, reopening the database is tried at most this often (seconds).
REOPEN_INTERVAL_S = 5.0
# Lookups are split over threads only in parts of at least this many keys.
PARALLEL_MIN_KEYS = 4096
# Memtables: a table's is flushed to disk at WRITE_BUFFER_BYTES (RocksDB's default, 64 MiB,
# made a bulk load hold ~45 MiB more at its peak and was no faster), and all tables' together
# are held to about TOTAL_WRITE_BUFFER_BYTES (past 90% of it RocksDB flushes the table with the
# oldest memtable), so a model of many tables does not keep two full memtables per table.
WRITE_BUFFER_BYTES = 32 << 20
TOTAL_WRITE_BUFFER_BYTES = 256 << 20
# A log file is deleted once every table with rows in it has flushed them; a table written once
# (the metadata, a SEAL_KEY record) kept every later log alive, and a primary under online
# updates kept all it ever wrote twice on disk. Past MAX_TOTAL_WAL_BYTES of logs RocksDB
# flushes the tables that hold the oldest one.
MAX_TOTAL_WAL_BYTES = 64 << 20
# A secondary replays the primary's log into a memtable of its own, and RocksDB drops that
# memtable only once it has been sealed, which happens when a record of a newer log arrives for
# its column family, and once the primary's flush of those rows is installed. Until then reads
# find the memtable first, and with it the rows it replayed before the flush, not the newer
# ones the flush wrote (the rest of the old log is never replayed): a row updated shortly
# before a flush was served old for good if its table got no later write. So every flush here
# is followed by a record that seals: a delete of SEAL_KEY, which no table key can equal
# (those are 8 bytes), so no read or iteration sees it. A primary that opens an existing
# database also writes one, flushes and writes another: its predecessor's last rows (it may
# have been killed) are replayed by secondaries into memtables that only a flush by the new
# primary lets them drop.
SEAL_KEY = b"\xffhps-seal"
# The block cache holds at most CACHE_LIVE_FACTOR times the tables' live SST bytes, at least
# CACHE_MIN_BYTES, at most block_cache_bytes (refitted at open, flush and catch-up). RocksDB
# does not drop a deleted file's blocks from the cache; they go only when the LRU needs room.
# Under online updates (a flush every few seconds, compactions after) each serving process's
# cache thus filled with dead blocks up to its full capacity, though the live data was a
# fraction of it: the process grew for as long as it ran.
CACHE_LIVE_FACTOR = 2
CACHE_MIN_BYTES = 4 << 20


def _flush_and_seal(cf: Rdict, wait: bool) -> None:
    """Flush a column family, then write the record that lets secondaries drop what they
    replayed before the flush (``SEAL_KEY``)."""
    cf.flush(wait)  # switches to a new memtable and log before it returns
    cf.delete(SEAL_KEY)


def _as_keys(keys: object) -> np.ndarray:
    """Request keys as contiguous little-endian int64 (uint64 reinterpreted, 32-bit widened)."""
    k = np.asarray(keys)
    if k.size == 0 and k.dtype.kind == "f":
        k = k.astype(np.int64)  # np.asarray([]) is float64
    if k.dtype.kind not in "iu" or k.ndim != 1:
        raise InvalidInputError("keys", f"dtype {k.dtype}, shape {k.shape}", "a 1-D int64 array")
    if k.dtype == np.uint64:
        k = k.view(np.int64)
    return np.ascontiguousarray(k, dtype="<i8")


def _key_bytes(keys: np.ndarray) -> list[bytes]:
    """8-byte keys without a Python-level loop (3-4x faster than slicing one bytes object)."""
    return keys.view("V8").tolist()


def _row_bytes(vectors: np.ndarray) -> list[bytes]:
    """One bytes object per row of a contiguous float32 matrix."""
    return vectors.view(np.dtype((np.void, vectors.shape[1] * 4))).ravel().tolist()


class _Gate:
    """Many readers at once, or one thread that opens the database again (readers wait for it
    to finish; it waits for the readers inside): a read never meets a closed database."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._reopening = False

    @contextlib.contextmanager
    def read(self):
        with self._cond:
            while self._reopening:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            while self._reopening:
                self._cond.wait()
            self._reopening = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._reopening = False
                self._cond.notify_all()


class RocksDBPDB(PersistentDB):
    """The full tables on local disk; never evicts on its own.

    ``num_threads``: RocksDB background threads (flush, compaction) and lookup threads (at most
    one per core; a lookup of 2 x PARALLEL_MIN_KEYS keys or more is split over them). ``max_batch_size``: keys
    per multi-get and per write batch. ``read_only``: open without writing (several processes
    may). ``secondary_path``: open as a secondary instance that follows a live primary through
    ``catch_up()``; implies read-only. ``block_cache_bytes``: LRU block cache shared by tables.
    ``write_buffer_bytes``: a table's memtable size before it is flushed;
    ``total_write_buffer_bytes``: the memtables of all tables together.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        num_threads: int = 16,
        read_only: bool = False,
        max_batch_size: int = 65536,
        secondary_path: str | os.PathLike | None = None,
        block_cache_bytes: int = 256 << 20,
        write_buffer_bytes: int = WRITE_BUFFER_BYTES,
        total_write_buffer_bytes: int = TOTAL_WRITE_BUFFER_BYTES,
    ):
        if max_batch_size < 1:
            raise InvalidInputError("max_batch_size", max_batch_size, "a positive integer")
        for name, v in (
            ("write_buffer_bytes", write_buffer_bytes),
            ("total_write_buffer_bytes", total_write_buffer_bytes),
        ):
            if v < 1 << 20:
                raise InvalidInputError(name, v, "at least 1 MiB")
        self._write_buffer = int(write_buffer_bytes)
        self._total_write_buffer = int(total_write_buffer_bytes)
        self.path = str(path)
        self.secondary_path = str(secondary_path) if secondary_path is not None else None
        self.read_only = read_only or secondary_path is not None
        self.max_batch_size = int(max_batch_size)
        self._num_threads = max(1, int(num_threads))
        # More lookup threads than cores only adds switching: the work is CPU-bound.
        self._workers = max(1, min(self._num_threads, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None
        self._cache_bytes = int(block_cache_bytes)
        self._cache = Cache(self._cache_bytes)
        self._cache_capacity = self._cache_bytes
        # table creation and drop, and reopening; rows need no lock. Reentrant: a write under it
        # (create_table) may have to reopen the database first.
        self._lock = threading.RLock()
        self._gate = _Gate()  # reads vs reopening (catch_up, a reopen after a failed write)
        self._db: Rdict | None = None
        self._failed: str | None = None  # the write that failed, until a reopen succeeds
        self._reopened_at = -REOPEN_INTERVAL_S
        self._open()

    # -- opening --------------------------------------------------------------------------------
    def _options(self) -> Options:
        opts = Options(raw_mode=True)
        table = BlockBasedOptions()
        table.set_block_cache(self._cache)
        table.set_bloom_filter(10, False)  # a miss (unknown key) rarely touches a data block
        opts.set_block_based_table_factory(table)
        opts.set_write_buffer_size(self._write_buffer)
        return opts

    def _open(self, read_only: bool = False) -> None:
        """Open the database as configured, or read-only (``read_only``) whatever the mode."""
        read_only = read_only or self.read_only
        exists = os.path.exists(os.path.join(self.path, "CURRENT"))
        if read_only and not exists:
            raise StorageError(f"RocksDB at {self.path}: no database to open read-only")
        with self._io("listing column families", write=False):
            names = Rdict.list_cf(self.path, Options(raw_mode=True)) if exists else ["default"]
        opts = self._options()
        opts.create_if_missing(True)
        opts.increase_parallelism(self._num_threads)
        opts.set_db_write_buffer_size(self._total_write_buffer)
        opts.set_max_total_wal_size(MAX_TOTAL_WAL_BYTES)
        if self.secondary_path is not None:
            opts.set_max_open_files(-1)  # required by secondary instances
            access = AccessType.secondary(self.secondary_path)
        elif read_only:
            access = AccessType.read_only(False)  # a live primary's WAL is not an error
        else:
            access = AccessType.read_write()
        families = {n: self._options() for n in names if n != "default"}
        mode = "secondary" if self.secondary_path else "read-only" if read_only else "read-write"
        with self._io(f"opening ({mode})", write=False):
            self._db = Rdict(self.path, opts, column_families=families, access_type=access)
        try:
            with self._io(f"opening ({mode})", write=False):
                self._cfs = {n: self._db.get_column_family(n) for n in families}
                self._handles = {n: self._db.get_column_family_handle(n) for n in families}
                if META_CF not in self._cfs and not read_only:
                    self._create_cf(META_CF)
                self._dims = self._read_dims()
        except BaseException:  # e.g. damaged metadata: the database (and its lock) goes too
            self._cfs, self._handles = {}, {}
            self._release_quietly()
            raise
        if exists and not read_only:
            self._seal_after_open()
        self._fit_cache()

    def _fit_cache(self) -> None:
        """Set the block cache's capacity from the live SST bytes (``CACHE_LIVE_FACTOR``)."""
        with self._io("reading the tables' sizes", write=False):
            live = sum(
                int(cf.property_int_value("rocksdb.live-sst-files-size") or 0)
                for cf in list(self._cfs.values())  # a reopen may replace them meanwhile
            )
        cap = min(self._cache_bytes, max(CACHE_MIN_BYTES, CACHE_LIVE_FACTOR * live))
        if cap != self._cache_capacity:
            self._cache.set_capacity(cap)
            self._cache_capacity = cap

    def _read_dims(self) -> dict[str, int]:
        meta = self._cfs.get(META_CF)
        if meta is None:
            return {}
        raw = []
        for k, v in meta.items(from_key=_DIM):
            if not k.startswith(_DIM):
                break
            raw.append((k, v))
        # No column family object may outlive a failed open in this frame (a traceback keeps
        # it): rocksdict keeps the database, and its lock, open while one lives.
        del meta
        dims = {}
        for k, v in raw:
            try:
                table, dim = k[len(_DIM) :].decode(), int(v)
            except ValueError:  # UnicodeDecodeError included
                dim = 0
            if not 1 <= dim <= 1 << 20:
                raise StorageError(
                    f"RocksDB at {self.path}: metadata '{META_CF}' key {k!r} holds {v[:40]!r}, "
                    "expected a table's dim (1 to 1048576): the database is damaged or not "
                    "written by hps"
                )
            dims[table] = dim
        return dims

    def _create_cf(self, name: str) -> None:
        self._cfs[name] = self._db.create_column_family(name, self._options())
        self._handles[name] = self._db.get_column_family_handle(name)

    def _writable(self, op: str, table: str | None = None) -> None:
        if self._db is None:
            raise StorageError(f"RocksDB at {self.path} is closed: cannot {op}")
        if self.read_only:
            what = f" table '{table}'" if table else ""
            raise StorageError(f"RocksDB at {self.path} is opened read-only: cannot {op}{what}")
        if self._failed is not None:
            self._reopen()

    def _reopen(self) -> None:
        """Open the database again after a failed write. RocksDB refuses every write after one
        failed (a full disk: until the process restarts), so a writer that retries, such as the
        update ingestor, would never get through once there is room again; a fresh instance
        recovers from its log what was written before the failure. Where it cannot open yet
        (opening writes too), the database is opened read-only, so lookups go on, and the next
        write tries again, at most every REOPEN_INTERVAL_S."""
        with self._lock:
            if self._failed is None:
                return
            if time.monotonic() - self._reopened_at < REOPEN_INTERVAL_S:
                raise StorageError(f"{self._failed} (writes stopped; reopening soon)")
            self._reopened_at = time.monotonic()
            with self._gate.exclusive():
                self._release_quietly()
                try:
                    self._open()
                except StorageError as e:
                    self._release_quietly()
                    self._open(read_only=True)
                    raise StorageError(f"{e} (writes stopped after: {self._failed})") from e
            log.warning("RocksDB at %s reopened after a failed write: %s", self.path, self._failed)
            self._failed = None

    def _release_quietly(self) -> None:
        try:
            self._release()
        except StorageError as e:  # a failed instance may fail to close: it is gone anyway
            log.info("%s", e)

    def _cf(self, table: str) -> Rdict:
        if self._db is None:
            raise StorageError(f"RocksDB at {self.path} is closed (table '{table}')")
        cf = self._cfs.get(table)
        if cf is None or table not in self._dims:
            raise StorageError(
                f"RocksDB at {self.path} has no table '{table}'; tables: {self.tables()}"
            )
        return cf

    @contextlib.contextmanager
    def _io(self, what: str, write: bool = True):
        """rocksdict's plain Exception (an I/O error: a full disk, a failing device) as a
        StorageError naming the database and the operation; after a failed write the next
        write reopens the database first."""
        try:
            yield
        except HPSError:
            raise
        except Exception as e:
            message = f"RocksDB at {self.path}: {what} failed: {e}"
            if write:
                self._failed = message
            raise StorageError(message) from e

    # -- tables ---------------------------------------------------------------------------------
    def create_table(self, table: str, dim: int) -> None:
        """Create an empty table (no-op if it exists with this dim)."""
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise InvalidInputError("dim", dim, "a positive integer")
        if table == META_CF or table == "default":
            raise InvalidInputError("table", table, f"a name other than '{META_CF}' / 'default'")
        with self._lock:
            if self._dims.get(table) == dim and table in self._cfs:
                return
            self._writable("create", table)
            if table in self._dims:
                raise StorageError(
                    f"RocksDB table '{table}' exists with dim {self._dims[table]}, not {dim}"
                )
            with self._io(f"creating table '{table}'"):
                if table not in self._cfs:
                    self._create_cf(table)
                self._cfs[META_CF].put(_DIM + table.encode(), str(int(dim)).encode())
            self._dims[table] = int(dim)

    def drop_table(self, table: str) -> None:
        """Remove a table and its rows."""
        self._writable("drop", table)
        self._cf(table)
        with self._lock, self._io(f"dropping table '{table}'"):
            self._cfs[META_CF].delete(_DIM + table.encode())
            self._dims.pop(table, None)
            del self._cfs[table], self._handles[table]
            self._db.drop_column_family(table)

    def delete_except(self, table: str, keep: np.ndarray, chunk: int = 1 << 16) -> int:
        """Delete every row whose key is not in ``keep`` (sorted unique int64 keys); returns how
        many went. Reads the table's keys in chunks (the iterator's snapshot: the deletes do
        not disturb it), so a table of any size needs only ``keep`` in memory."""
        self._writable("delete from", table)
        gone = 0

        def drop(batch: list[bytes]) -> int:
            short = [k for k in batch if len(k) != 8]  # not a key of ours: it goes too
            ks = np.frombuffer(b"".join(k for k in batch if len(k) == 8), "<i8")
            pos = np.minimum(np.searchsorted(keep, ks), max(len(keep) - 1, 0))
            absent = ks[keep[pos] != ks] if len(keep) else ks
            if not len(absent) and not short:
                return 0
            wb = WriteBatch(raw_mode=True)
            wb.set_default_column_family(handle)
            for k in [*_key_bytes(absent), *short]:
                wb.delete(k)
            with self._io(f"deleting rows of '{table}'"):
                self._db.write(wb)
            return len(absent) + len(short)

        with self._gate.read():  # the handles of this opening of the database
            cf, handle = self._cf(table), self._handles[table]
            batch: list[bytes] = []
            with self._io(f"reading table '{table}'", write=False):
                for k in cf.keys():
                    batch.append(k)
                    if len(batch) == chunk:
                        gone += drop(batch)
                        batch = []
            gone += drop(batch) if batch else 0
        return gone

    def tables(self) -> list[str]:
        """Names of the tables present."""
        return sorted(t for t in self._dims if t in self._cfs)

    def dim(self, table: str) -> int:
        """Vector width of a table."""
        self._cf(table)
        return self._dims[table]

    def size(self, table: str) -> int:
        """Rows: exact (by iteration) up to EXACT_SIZE_LIMIT, RocksDB's key estimate beyond."""
        cf = self._cf(table)
        est = cf.property_int_value("rocksdb.estimate-num-keys") or 0
        if est > EXACT_SIZE_LIMIT:
            return int(est)
        return sum(1 for _ in cf.keys())

    # -- rows -----------------------------------------------------------------------------------
    def fetch(
        self, table: str, keys: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Look up keys: (vectors float32 [n, dim], found bool [n]); missing rows are zeros."""
        keys = _as_keys(keys)
        n = len(keys)
        with self._gate.read():
            self._cf(table)
            dim = self._dims[table]
            if out is None:
                out = np.zeros((n, dim), np.float32)
            elif out.shape != (n, dim) or out.dtype != np.float32:
                raise InvalidInputError("out", f"{out.dtype} {out.shape}", f"float32 [{n}, {dim}]")
            else:
                out[:] = 0
            found = np.zeros(n, bool)
            self._parallel(table, keys, out, found)
        return out, found

    def contains(self, table: str, keys: np.ndarray) -> np.ndarray:
        """bool [n]: whether each key is stored."""
        keys = _as_keys(keys)
        found = np.zeros(len(keys), bool)
        with self._gate.read():
            self._cf(table)
            self._parallel(table, keys, None, found)
        return found

    def _parallel(self, table: str, keys: np.ndarray, out: np.ndarray | None, found) -> None:
        """Split a large lookup over the worker threads (rocksdict's multi-get releases the GIL)."""
        n = len(keys)
        parts = min(self._workers, n // PARALLEL_MIN_KEYS)
        if parts <= 1:
            self._lookup(table, keys, out, found, 0, n)
            return
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="hps-rocksdb")
        bounds = np.linspace(0, n, parts + 1).astype(int)
        try:
            futures = [
                pool.submit(self._lookup, table, keys, out, found, a, b)
                for a, b in zip(bounds[1:-1], bounds[2:], strict=True)
            ]
        except RuntimeError:  # the pool was shut down: close() ran meanwhile
            raise StorageError(f"RocksDB at {self.path} was closed during a read") from None
        self._lookup(table, keys, out, found, bounds[0], bounds[1])
        for f in futures:
            f.result()

    def _lookup(self, table: str, keys, out, found, start: int, end: int) -> None:
        """Multi-get keys[start:end] in max_batch_size chunks into found (and out, if given)."""
        cf, dim = self._cfs.get(table), self._dims.get(table)
        if cf is None or dim is None:  # dropped, or the database is being opened again
            raise StorageError(f"RocksDB at {self.path}: table '{table}' is not open now")
        row_bytes = 4 * dim
        for s in range(start, end, self.max_batch_size):
            e = min(s + self.max_batch_size, end)
            with self._io(f"reading table '{table}'", write=False):
                vals = cf.get(_key_bytes(keys[s:e]))
            hit = np.array([v is not None for v in vals], bool)
            found[s:e] = hit
            if out is None:
                continue
            got = list(compress(vals, hit))
            if not got:
                continue
            if set(map(len, got)) != {row_bytes}:
                bad = next(i for i, v in enumerate(vals) if v is not None and len(v) != row_bytes)
                raise StorageError(
                    f"RocksDB table '{table}': key {int(keys[s + bad])} holds {len(vals[bad])} "
                    f"bytes, expected {row_bytes} (dim {dim} float32)"
                )
            out[s + np.flatnonzero(hit)] = np.frombuffer(b"".join(got), "<f4").reshape(-1, dim)

    def upsert(self, table: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or overwrite rows, one write batch per max_batch_size keys; later duplicates win."""
        self._writable("write", table)
        self._cf(table)
        dim, handle = self._dims[table], self._handles[table]
        keys = _as_keys(keys)
        vecs = np.asarray(vectors)
        if vecs.shape != (len(keys), dim) or vecs.dtype.kind not in "fiu":
            raise InvalidInputError(
                "vectors", f"{vecs.dtype} {vecs.shape}", f"float32 [{len(keys)}, {dim}]"
            )
        vecs = np.ascontiguousarray(vecs, dtype="<f4")
        for s in range(0, len(keys), self.max_batch_size):
            e = s + self.max_batch_size
            wb = WriteBatch(raw_mode=True)
            wb.set_default_column_family(handle)
            # Puts apply in order, so a later duplicate wins.
            for k, v in zip(_key_bytes(keys[s:e]), _row_bytes(vecs[s:e]), strict=True):
                wb.put(k, v)
            with self._io(f"writing {len(keys)} rows to '{table}'"):
                self._db.write(wb)

    def evict(self, table: str, keys: np.ndarray) -> int:
        """Delete the given keys; returns how many distinct keys were present."""
        self._writable("delete from", table)
        self._cf(table)
        handle = self._handles[table]
        uniq = np.unique(_as_keys(keys))
        present = uniq[self.contains(table, uniq)]
        for s in range(0, len(present), self.max_batch_size):
            wb = WriteBatch(raw_mode=True)
            wb.set_default_column_family(handle)
            for k in _key_bytes(present[s : s + self.max_batch_size]):
                wb.delete(k)
            with self._io(f"deleting rows of '{table}'"):
                self._db.write(wb)
        return len(present)

    def dump(self, table: str) -> tuple[np.ndarray, np.ndarray]:
        """All rows as (keys int64 [n], vectors float32 [n, dim]), in RocksDB key order."""
        ks, vs = [], []
        with self._gate.read(), self._io(f"reading table '{table}'", write=False):
            cf, dim = self._cf(table), self._dims[table]
            for k, v in cf.items():
                ks.append(k)
                vs.append(v)
        if set(map(len, ks)) - {8} or set(map(len, vs)) - {4 * dim}:
            bad = next(i for i in range(len(ks)) if len(ks[i]) != 8 or len(vs[i]) != 4 * dim)
            k = int.from_bytes(ks[bad], "little", signed=True) if len(ks[bad]) == 8 else ks[bad]
            raise StorageError(
                f"RocksDB table '{table}': key {k!r} has a {len(vs[bad])}-byte value, "
                f"expected {4 * dim} (dim {dim} float32)"
                + ("" if len(ks[bad]) == 8 else f"; and a {len(ks[bad])}-byte key, expected 8")
            )
        keys = np.frombuffer(b"".join(ks), dtype="<i8").astype(np.int64)
        vecs = np.frombuffer(b"".join(vs), dtype="<f4").reshape(len(vs), dim).copy()
        return keys, vecs

    # -- metadata and lifecycle -----------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        """A string stored beside the tables (e.g. which sparse files were loaded), or None."""
        meta = self._cfs.get(META_CF)
        if meta is None:
            return None
        v = meta.get(_META + key.encode())
        try:
            return v.decode() if v is not None else None
        except UnicodeDecodeError:
            raise StorageError(
                f"RocksDB at {self.path}: metadata '{key}' holds {v[:40]!r}, not UTF-8 text"
            ) from None

    def flush(self, table: str, wait: bool = True) -> None:
        """Write a table's memtables to disk: after a bulk load the rows are in SST files and
        the table holds no memtable memory (``ParameterServer`` calls it per table). ``wait``
        False: start the flush in the background and return (the online updates' flushes).
        Secondaries read the flushed rows from their next catch-up after it (``SEAL_KEY``)."""
        self._writable("flush")
        cf = self._cf(table)
        with self._io(f"flush of '{table}'"):
            _flush_and_seal(cf, wait)
        self._fit_cache()

    def _seal_after_open(self) -> None:
        """A primary that opened an existing database: secondaries drop what they replayed of
        the previous primary's log (``SEAL_KEY``). Not fatal: a full disk fails it, and reads
        and writes go on; secondaries may then serve a row written last by the previous
        primary old until that table is flushed again."""
        try:
            with self._io("flushing after opening"):
                for cf in self._cfs.values():
                    cf.delete(SEAL_KEY)  # a flush of an empty memtable would not count
                    _flush_and_seal(cf, True)
        except StorageError as e:
            log.warning("%s; secondaries may serve rows from before this opening", e)

    def memtable_bytes(self, table: str) -> int:
        """Memory the table's memtables hold (arena blocks, so at least one block once written);
        a secondary's are the rows it replayed from the primary's log and has not seen flushed."""
        with self._gate.read(), self._io(f"memtable size of '{table}'", write=False):
            cf = self._cf(table)
            return int(cf.property_int_value("rocksdb.cur-size-all-mem-tables") or 0)

    def set_meta(self, key: str, value: str) -> None:
        """Store a string beside the tables."""
        self._writable("write metadata")
        with self._io("writing metadata"):
            self._cfs[META_CF].put(_META + key.encode(), value.encode())

    def catch_up(self) -> None:
        """Secondary instance: replay what the primary wrote since; reopen if it added tables."""
        if self.secondary_path is None:
            raise StorageError(f"RocksDB at {self.path}: catch_up needs a secondary instance")
        try:
            with self._io("catching up with the primary", write=False):
                self._db.try_catch_up_with_primary()
                dims = self._read_dims()
            self._fit_cache()
        except StorageError as e:
            # A table the primary created (or dropped) since this instance opened: its log
            # names a column family this instance does not know, and every later catch-up
            # fails alike. A fresh instance reads them all.
            log.info("%s; opening the secondary again", e)
            dims = None
        if dims is None or META_CF not in self._cfs or set(dims) - set(self._cfs):
            # new column families are only visible to a fresh secondary
            with self._lock, self._gate.exclusive():
                self._release()
                self._open()
        else:
            self._dims = dims

    def _release(self) -> None:
        # rocksdict keeps the DB (and its lock) alive while any column family object lives.
        self._cfs.clear()
        self._handles.clear()
        db, self._db = self._db, None
        if db is not None:
            with self._io("closing", write=False):
                db.close()

    def close(self) -> None:
        """Flush memtables (primary) and release the database."""
        if self._db is None:
            return
        try:
            if not self.read_only and self._failed is None:  # a failed instance cannot flush
                with self._io("flushing on close"):
                    self._db.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._failed is None:
                self._release()
            else:  # its failure was reported when it happened
                self._release_quietly()

    def __enter__(self) -> RocksDBPDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
