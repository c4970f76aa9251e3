"""The parameter server: builds the storage tiers from a config and serves many models' tables."""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from .cache.admission import Admission
from .cache.base import EmbeddingCache
from .config import HPSConfig, ModelConfig, load_config, store_table_name
from .errors import (
    ConfigError,
    InvalidInputError,
    ModelFileError,
    StorageError,
    UnknownModelError,
)
from .model_io import SparseTable, read_key_text
from .pdb.base import PersistentDB
from .session import LookupSession, TableRuntime
from .vdb.base import VolatileDB

log = logging.getLogger(__name__)


@dataclass
class TableInfo:
    """What ``inspect`` reports for one table."""

    model: str
    table: str
    dim: int
    rows: int
    vdb_rows: int
    pdb_rows: int
    l1_rows: int
    l1_capacity: int
    vdb_bytes: int
    l1_bytes: int
    file_bytes: int


def build_vdb(cfg: HPSConfig) -> VolatileDB | None:
    """The volatile tier the config asks for (None when disabled)."""
    v = cfg.volatile_db
    if v.type == "disabled":
        return None
    if v.type == "redis_cluster":
        from .vdb.redis import RedisVDB

        return RedisVDB(
            v.addresses(),
            user_name=v.user_name,
            password=v.password,
            num_partitions=v.num_partitions,
            max_batch_size=v.max_batch_size,
            overflow_margin=v.overflow_margin,
            overflow_policy=v.overflow_policy,
            overflow_resolution_target=v.overflow_resolution_target,
            refresh_time_after_fetch=v.refresh_time_after_fetch,
            num_node_connections=v.num_node_connections,
            enable_tls=v.enable_tls,
            tls_ca_certificate=v.tls_ca_certificate,
            tls_client_certificate=v.tls_client_certificate,
            tls_client_key=v.tls_client_key,
            tls_server_name_identification=v.tls_server_name_identification,
            socket_timeout_ms=v.socket_timeout_ms,
            connect_timeout_ms=v.connect_timeout_ms,
            reconnect_backoff_ms=v.reconnect_backoff_ms,
            reconnect_backoff_max_ms=v.reconnect_backoff_max_ms,
        )
    from .vdb.hashmap import HashMapVDB

    return HashMapVDB(
        num_partitions=1 if v.type == "hash_map" else v.num_partitions,
        overflow_margin=v.overflow_margin,
        overflow_policy=v.overflow_policy,
        overflow_resolution_target=v.overflow_resolution_target,
        refresh_time_after_fetch=v.refresh_time_after_fetch,
        shared_memory_name=v.shared_memory_name if v.type == "multi_process_hash_map" else None,
    )


def build_pdb(cfg: HPSConfig) -> PersistentDB | None:
    """The persistent tier the config asks for (None when disabled)."""
    p = cfg.persistent_db
    if p.type == "disabled":
        return None
    from .pdb.rocksdb import RocksDBPDB

    return RocksDBPDB(
        p.path,
        num_threads=p.num_threads,
        read_only=p.read_only,
        max_batch_size=p.max_batch_size,
        secondary_path=p.secondary_path or None,
    )


def l1_capacity(m: ModelConfig, rows: int) -> int:
    """L1 rows of a table of ``rows`` rows: ``gpucacheper`` of it, 0 when the cache is off;
    the whole table for a static table on a GPU."""
    if not m.gpucache or rows == 0:
        return 0
    if static_l1(m):
        return rows
    if m.gpucacheper <= 0:
        return 0
    return max(1, math.ceil(m.gpucacheper * rows))


def static_l1(m: ModelConfig) -> bool:
    """Whether the model's L1 caches are static tables: asked for, and a GPU present (in CPU
    mode the VDB already holds the table in host memory; L1 is the set-associative cache)."""
    return m.static_table and gpu_device(m) is not None


def gpu_device(m: ModelConfig) -> int | None:
    """The CUDA device for a model's L1 caches: its first deployed device, if CuPy sees it."""
    if not m.deployed_device_list:
        return None
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, no driver, no device: CPU mode
        return None
    device = m.deployed_device_list[0]
    return device if device < count else None


def build_cache(m: ModelConfig, t: int, rows: int) -> EmbeddingCache | None:
    """The L1 cache of table ``t``: on the GPU when one is deployed and present, else host memory."""
    capacity = l1_capacity(m, rows)
    if capacity == 0:
        return None
    dim = m.embedding_vecsize_per_table[t]
    options = {"ways": m.cache_ways, "policy": m.cache_policy, "dtype": m.cache_storage_dtype}
    device = gpu_device(m)
    if device is not None:
        from .cache.gpu import GPUCache

        return GPUCache(capacity, dim, device=device, static=m.static_table, **options)
    from .cache.host import HostCache

    return HostCache(capacity, dim, **options)


def hot_keys(m: ModelConfig, t: int, f: SparseTable) -> np.ndarray | None:
    """Table t's hottest keys, hottest first: from hot_key_files if given, else the file's meta."""
    path = m.hot_key_files[t] if m.hot_key_files else ""
    if path:
        try:
            keys = np.load(path) if path.endswith(".npy") else read_key_text(path)
        except ModelFileError:
            raise
        except (OSError, ValueError) as e:
            raise ModelFileError(path, f"cannot read hot keys ({e})") from None
        if keys.dtype.kind not in "iu":
            raise ModelFileError(path, f"hot keys of dtype {keys.dtype}: expected integer keys")
        if keys.ndim > 1 and sum(n > 1 for n in keys.shape) > 1:  # e.g. (key, count) pairs
            raise ModelFileError(
                path, f"hot keys of shape {keys.shape}: expected one key per element, [n]"
            )
        return np.asarray(keys, dtype=np.int64).ravel()
    return f.hot_keys


class ParameterServer:
    """Owns one VDB and one PDB shared by all models, and one lookup session per model."""

    def __init__(self, config: HPSConfig | str | os.PathLike | dict, *, progress: bool = False):
        self.config = config if isinstance(config, HPSConfig) else load_config(config)
        self.progress = progress
        self.vdb = build_vdb(self.config)
        self.pdb = build_pdb(self.config)
        if self.vdb is None and self.pdb is None:
            raise ConfigError(
                "volatile_db.type / persistent_db.type",
                "disabled / disabled",
                "at least one storage tier enabled",
                self.config.source,
            )
        self.promoter = None
        if (
            self.config.volatile_db.cache_missed_embeddings
            and self.vdb is not None
            and self.pdb is not None
        ):
            from .pdb.promote import Promoter

            self.promoter = Promoter(self.vdb, self.pdb)
        self.sessions: dict[str, LookupSession] = {}
        self._files: dict[str, list[SparseTable]] = {}
        self._nonfinite_reported: set[str] = set()  # files whose NaN/inf rows were reported
        self._lock = threading.Lock()
        self.ingestors: list = []  # online updates (update_source: redis_stream)
        self.ingestor = None  # the one applying updates to the stores, if any
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        try:
            for m in self.config.models:
                self.add_model(m)
            if self.pdb is not None and getattr(self.pdb, "secondary_path", None):
                self._follower = threading.Thread(
                    target=self._follow_primary, name="hps-pdb-catch-up", daemon=True
                )
                self._follower.start()
            if self.config.update_source.type == "redis_stream":
                from .updates.ingestor import server_ingestors

                self.ingestors = [i.start() for i in server_ingestors(self)]
                self.ingestor = self.ingestors[0] if self.ingestors else None
        except BaseException:
            try:
                self.close()
            except Exception as e:  # the first error is the one to report (a full disk fails both)
                log.warning("closing after a failed start also failed: %s", e)
            raise

    # -- models -------------------------------------------------------------------------------
    def add_model(self, m: ModelConfig) -> LookupSession:
        """Load a model's tables into the tiers and start serving it (replaces a same-named one)."""
        with self._lock:
            taken = {
                rt.store_name: name
                for name, s in self.sessions.items()
                if name != m.model
                for rt in s.tables
            }
        for t in m.embedding_table_names:
            other = taken.get(store_table_name(m.model, t))
            if other is not None:
                raise ConfigError(
                    f"{m.model}.embedding_table_names", t,
                    f"a name whose stored name {store_table_name(m.model, t)!r} is not also a "
                    f"table of model {other!r} ('.' in model and table names)",
                )  # fmt: skip
        if m.static_table and gpu_device(m) is None:  # once for the model, not per table
            log.warning(
                "%s: a static embedding table needs a GPU; in CPU mode L1 is the set-associative "
                "host cache at gpucacheper %.3g", m.model, m.gpucacheper,
            )  # fmt: skip
        tables, files = [], []
        try:
            for t, path in enumerate(m.sparse_files):
                dim = m.embedding_vecsize_per_table[t]
                f = SparseTable.open(path, dim)
                files.append(f)
                name = m.embedding_table_names[t]
                rt = TableRuntime(
                    name=name,
                    store_name=store_table_name(m.model, name),
                    dim=dim,
                    default_value=m.default_value_for_each_table[t],
                    cache=build_cache(m, t, f.rows),
                )
                if rt.cache is not None and m.cache_admission_min_count > 1:
                    rt.admission = Admission(rt.cache.capacity, m.cache_admission_min_count)
                self._load_table(m, rt, f)
                tables.append(rt)
        except BaseException:
            for f in files:
                f.close()
            raise
        session = LookupSession(
            m.model,
            tables,
            self.vdb,
            self.pdb,
            hit_rate_threshold=m.hit_rate_threshold,
            promoter=self.promoter,
        )
        if static_l1(m):  # HPS's static table: the whole table, from the tiers (their newest)
            for t, f in enumerate(files):
                if tables[t].cache is not None:
                    n = sum(session.prefill(t, keys) for keys, _ in f.iter_chunks())
                    log.info("%s/%s: static L1 table filled: %d rows", m.model, tables[t].name, n)
        elif m.cache_prefill:
            for t, f in enumerate(files):
                hot = hot_keys(m, t, f)
                if hot is not None:
                    n = session.prefill(t, hot)
                    log.info("%s/%s: L1 pre-filled with %d hot rows", m.model, tables[t].name, n)
        # the fused kernel's view of the tables (~1 ms for 26) now, not in the first request
        session.fused.layout()
        with self._lock:
            old = self.sessions.pop(m.model, None)
            self.sessions[m.model] = session
            for f in self._files.pop(m.model, []):
                f.close()
            self._files[m.model] = files
            if all(x.model != m.model for x in self.config.models):
                self.config.models.append(m)
        if old is not None:
            old.close()
        return session

    def remove_model(self, name: str) -> None:
        """Stop serving a model and free its VDB rows (the PDB keeps them for a later reload)."""
        with self._lock:
            session = self.sessions.pop(name, None)
            if session is None:
                raise UnknownModelError(name, list(self.sessions))
            for f in self._files.pop(name, []):
                f.close()
            self.config.models = [x for x in self.config.models if x.model != name]
        session.close()
        if self.vdb is not None:
            for t in session.tables:
                if t.store_name in self.vdb.tables():
                    self.vdb.drop_table(t.store_name)

    def session(self, name: str) -> LookupSession:
        """The lookup session of a deployed model."""
        try:
            return self.sessions[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name (a list, an array)
            if self._stop.is_set():
                raise StorageError("the parameter server is closed: no model is served") from None
            raise UnknownModelError(name, list(self.sessions)) from None

    def lookup(self, keys: object, model: str, table: int | str = 0) -> np.ndarray:
        """Vectors float32 [n, dim] for ``keys`` of one table of one model."""
        return self.session(model).lookup(keys, table)

    # -- loading ------------------------------------------------------------------------------
    def _load_table(self, m: ModelConfig, t: TableRuntime, f: SparseTable) -> None:
        v = self.config.volatile_db
        fingerprint = _fingerprint(f)
        if self.pdb is not None:
            if self.pdb.read_only:  # read_only, or a secondary of another process's RocksDB
                if t.store_name not in self.pdb.tables():
                    log.warning("read-only PDB has no table %s; lookups fall through", t.store_name)
            else:
                self.pdb.create_table(t.store_name, t.dim)
                key = f"loaded:{t.store_name}"
                before = self.pdb.get_meta(key)
                if before != fingerprint:
                    if before:  # until the rows of that file are gone, whatever happens
                        self.pdb.set_meta(key, STALE)
                    self._copy_rows(
                        f, f.rows, f"{m.model}/{t.name} -> RocksDB", self.pdb, t.store_name
                    )
                    if before:  # another file's rows: a key it had and this one lacks goes
                        # (after the copy: other processes reading meanwhile get the old row
                        # or the new one, never a default)
                        keys = np.unique(np.concatenate([k for _, k in f.iter_keys()]))
                        gone = self.pdb.delete_except(t.store_name, keys)
                        log.info("%s: %d rows of keys not in %s removed", t.store_name, gone,
                                 f.path)  # fmt: skip
                    self.pdb.flush(t.store_name)  # on disk: no memtable memory left behind
                    self.pdb.set_meta(key, fingerprint)
                    self.pdb.set_meta(updated_meta(t.store_name), "")  # the file's rows again
        if self.vdb is not None:
            rows = int(f.rows * v.initial_cache_rate) if v.initialize_after_startup else 0
            mark = self.vdb.load_mark(t.store_name)  # None: no such table, or not loaded whole
            if mark and not mark.startswith(f"{fingerprint}|"):  # loaded from another file
                log.info("VDB table %s was loaded from another file: made anew", t.store_name)
                self.vdb.drop_table(t.store_name)  # whose keys this one may lack (meanwhile
                # lookups read RocksDB, which holds the new file's rows by now)
                mark = None
            self.vdb.create_table(
                t.store_name, t.dim, dtype=v.storage_dtype, capacity_hint=max(rows, 1)
            )
            if rows and self._vdb_holds(t.store_name, mark, fingerprint, rows):
                return
            # Online updates since the file was loaded live in RocksDB: the VDB takes those
            # rows, not the file's, or it would answer with rows the updates replaced.
            newer = self.pdb if self.pdb is not None and self.pdb.get_meta(
                updated_meta(t.store_name)) else None  # fmt: skip
            if rows:
                self.vdb.set_load_mark(t.store_name, None)  # a load cut short leaves no mark
                self._copy_rows(f, rows, f"{m.model}/{t.name} -> VDB", self.vdb, t.store_name,
                                newer)  # fmt: skip
            if 0 < rows < f.rows:
                self._later_rows_of_loaded_keys(f, rows, t.store_name, newer)
            if rows:
                size = self.vdb.size(t.store_name)
                self.vdb.set_load_mark(t.store_name, f"{fingerprint}|{rows}|{size}")

    def _vdb_holds(self, table: str, mark: str | None, fingerprint: str, rows: int) -> bool:
        """Whether a VDB that outlives this process (Redis) holds ``table`` loaded in full from
        this very file before (its load ``mark``), with every row it had then: it keeps it as
        it is, with the rows online updates wrote since, which a second load of the file would
        roll back when no RocksDB holds them. A table with fewer rows than then (a Redis node
        restarted empty, evictions) is loaded again."""
        if mark is None:
            return False
        head, _, size = mark.rpartition("|")
        if head != f"{fingerprint}|{rows}" or not size.isdigit():
            return False
        have = self.vdb.size(table)
        if have < int(size):
            log.warning("VDB table %s holds %d rows, %s when it was loaded: loading it again",
                        table, have, size)  # fmt: skip
            return False
        log.info("VDB table %s holds the rows of its model file already (with any online "
                 "updates since): not loaded again", table)  # fmt: skip
        return True

    def _later_rows_of_loaded_keys(
        self, f: SparseTable, start: int, table: str, newer: object = None
    ) -> None:
        """The VDB took the file's first ``start`` rows (``initial_cache_rate``). A key that
        appears again later in the file gets its last row there too, as in RocksDB and in a
        whole-file load (a later duplicate wins everywhere): without this the VDB answered
        with the first row and RocksDB held the last. Reads the rest's keys only, then the
        rows of the keys found."""
        again = 0
        for first, keys in f.iter_keys(start):
            found = self.vdb.contains(table, keys)
            if found.any():
                k = keys[found]
                self.vdb.upsert(
                    table, k, _newest(newer, table, k, f.read_rows(first + np.flatnonzero(found)))
                )
                again += int(found.sum())
        if again:
            log.warning(
                "%s: %d keys of the first %d rows (the VDB's share) appear again later in the "
                "file; the VDB holds their last rows, as RocksDB", f.path, again, start,
            )  # fmt: skip

    def _copy_rows(
        self, f: SparseTable, rows: int, what: str, tier: object, table: str, newer: object = None
    ) -> None:
        """The file's first ``rows`` rows into ``tier``; where ``newer`` (the PDB, which took
        online updates) holds a key, its row instead of the file's."""
        done = bad = 0
        first_bad = None
        with _progress(self.progress, what, rows) as advance:
            for keys, vecs in f.iter_chunks():
                take = min(len(keys), rows - done)
                if take <= 0:
                    break
                nonfinite = ~np.isfinite(vecs[:take]).all(axis=1)
                if nonfinite.any():
                    bad += int(nonfinite.sum())
                    first_bad = keys[:take][nonfinite][0] if first_bad is None else first_bad
                try:
                    tier.upsert(table, keys[:take], _newest(newer, table, keys[:take], vecs[:take]))
                except InvalidInputError as e:  # e.g. NaN rows an int8 table cannot scale
                    raise ModelFileError(f.path, f"rows {done}..{done + take - 1}: {e}") from None
                done += take
                advance(take)
        log.info("%s: %d rows", what, done)
        v = self.config.volatile_db
        whole = v.initialize_after_startup and v.initial_cache_rate >= 1
        if self.vdb is not None and v.storage_dtype == "int8" and whole:
            return  # the int8 VDB takes every row next and refuses these, naming the file
        if bad and str(f.path) not in self._nonfinite_reported:  # once, not once per tier
            self._nonfinite_reported.add(str(f.path))
            log.warning(
                "%s: %d of %d rows hold NaN or infinite values (first key %d); they are served "
                "as they are, and every prediction that uses them will be NaN",
                f.path, bad, done, first_bad,
            )  # fmt: skip

    # -- inspection ---------------------------------------------------------------------------
    def inspect(self) -> list[TableInfo]:
        """Rows, dims and bytes of every table on every level."""
        out = []
        for name, s in self.sessions.items():
            for t, f in zip(s.tables, self._files[name], strict=True):
                has_vdb = self.vdb is not None and t.store_name in self.vdb.tables()
                has_pdb = self.pdb is not None and t.store_name in self.pdb.tables()
                out.append(
                    TableInfo(
                        model=name,
                        table=t.name,
                        dim=t.dim,
                        rows=f.rows,
                        vdb_rows=self.vdb.size(t.store_name) if has_vdb else 0,
                        pdb_rows=self.pdb.size(t.store_name) if has_pdb else 0,
                        l1_rows=t.cache.size() if t.cache is not None else 0,
                        l1_capacity=t.cache.capacity if t.cache is not None else 0,
                        vdb_bytes=self.vdb.memory_bytes(t.store_name) if has_vdb else 0,
                        l1_bytes=t.cache.memory_bytes() if t.cache is not None else 0,
                        file_bytes=f.nbytes,
                    )
                )
        return out

    def flush(self) -> None:
        """Wait for background work (cache fills, VDB promotion)."""
        for s in self.sessions.values():
            s.flush()
        if self.promoter is not None:
            self.promoter.flush(timeout=60)

    def _follow_primary(self) -> None:
        """A secondary PDB catches up with the process that writes updates into RocksDB."""
        interval = self.config.persistent_db.catch_up_interval_ms / 1000
        failing = False
        while not self._stop.wait(interval):
            try:
                self.pdb.catch_up()
                failing = False
            except Exception as e:
                if not failing:  # once per failure spell, not every interval
                    log.warning("PDB catch-up with its primary failed: %s", e)
                failing = True

    def close(self) -> None:
        """Stop background work and close the tiers."""
        self._stop.set()
        if self._follower is not None:
            self._follower.join(10)
            self._follower = None
        for ingestor in self.ingestors:
            ingestor.stop()
        self.ingestors, self.ingestor = [], None
        for s in list(self.sessions.values()):
            s.close()
        self.sessions.clear()
        for files in self._files.values():
            for f in files:
                f.close()
        self._files.clear()
        if self.promoter is not None:
            self.promoter.close()
        if self.vdb is not None:
            self.vdb.close()
        if self.pdb is not None:
            self.pdb.close()

    def __enter__(self) -> ParameterServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


STALE = "stale: another file's rows to remove"
"""The PDB's loaded-mark while a new file replaces another's rows (a load cut short by a
crash then still removes the old file's keys the next time)."""


def updated_meta(table: str) -> str:
    """The PDB metadata key set (non-empty) once online updates wrote to ``table``."""
    return f"updated:{table}"


def _newest(pdb: object, table: str, keys: np.ndarray, vecs: np.ndarray) -> np.ndarray:
    """``vecs`` with the rows ``pdb`` holds for ``keys`` in their place (``pdb`` None: as is)."""
    if pdb is None or not len(keys):
        return vecs
    got, found = pdb.fetch(table, keys)
    if found.any():
        vecs = vecs.copy()
        vecs[found] = got[found]
    return vecs


def _fingerprint(f: SparseTable) -> str:
    """Which file a table was loaded from: path, shape, and per file size, mtime, ctime and
    inode (a copy that keeps the mtime, cp -p or rsync -a, still changes the other two)."""
    st = [os.stat(os.path.join(f.path, n)) for n in ("key", "emb_vector")]
    return ":".join(
        [str(f.path), str(f.rows), str(f.dim)]
        + [f"{s.st_size}.{s.st_mtime_ns}.{s.st_ctime_ns}.{s.st_ino}" for s in st]
    ).replace("|", "/")  # the VDB's mark puts '|' after it


def _progress(enabled: bool, what: str, total: int):
    """A context manager yielding advance(n); when enabled, a rich progress bar on a terminal,
    else (a log, a pipe) one line per copy once it is done: a bar redrawn into a log leaves a
    blank line where it stood and says nothing."""
    if not enabled:
        return nullcontext(lambda n: None)
    from contextlib import contextmanager

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)  # stdout stays the command's output (tables, JSON)

    @contextmanager
    def line():
        done = [0]
        start = time.perf_counter()
        yield lambda n: done.__setitem__(0, done[0] + n)
        took = time.perf_counter() - start
        print(f"{what}: {done[0]:,} rows in {took:.1f} s", file=sys.stderr, flush=True)

    if not console.is_terminal:
        return line()

    @contextmanager
    def bar():
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
            console=console,
        ) as p:
            task = p.add_task(what, total=total)
            yield lambda n: p.advance(task, n)

    return bar()
