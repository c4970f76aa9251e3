"""Compile, when a model loads, the numba kernels its requests and updates will run.

numba compiles a kernel for each signature of argument types the first time it is called, or
loads it from its disk cache (``cache=True``). Left to the traffic, that happens in the middle
of serving. ``hps bench warmup`` (a 26-table model, 2-core VM): from an empty disk cache (a
fresh install) the first request took 10.7 s, the first large one 6.9 s and the first online
update 1.1 s, and the instance grew 87 MiB after load; with the cache the first request still
took 22 ms (18x a steady one), the first large one 29 ms and the first update 19 ms. Warmed
up at load, each took 1-12 ms; the warm-up took 27 s at load from an empty cache, 0.13 s with
it.

``warm_up`` runs every host path once, at a small batch and at the largest a request can
carry, on scratch copies of the session's parts, so the model's own state is left as it was:

- L1: per table, a small cache of the same class and options (fills and updates at both
  sizes; finds through the lookups) with the same admission filter (ageing included);
- the lookup pipeline: a scratch session over those caches and the model's own VDB, through
  the instance's I/O layout. Its keys are random 64-bit values, so in practice absent from
  the model's tables (a VDB read of an absent key changes nothing); the scratch session has
  no PDB and no promotion;
- an in-process hash-map VDB's write kernels (updates, promotion, eviction) on a scratch map
  of the same policy and row types.

A model with an L1 cache on a GPU is skipped: its requests take the device path, whose host
kernels (the dedupe) and CUDA kernels compile when a request first needs them.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from .cache.admission import Admission
from .cache.host import HostCache
from .session import LookupSession, TableRuntime
from .vdb.hashmap import HashMapVDB

log = logging.getLogger(__name__)

SMALL = 4  # keys per table: the serial kernels
LARGE = 4096  # keys per table: at least every component's parallel threshold
SCRATCH_ROWS = 1024  # rows of each scratch L1 cache


def _scratch_cache(cache: HostCache | None) -> HostCache | None:
    if cache is None:
        return None
    return HostCache(
        SCRATCH_ROWS,
        cache.dim,
        ways=cache.ways,
        policy=cache.policy,
        dtype=cache.dtype,
        parallel_min_keys=cache.parallel_min_keys,
    )


def _exercise_cache(t: TableRuntime, keys: np.ndarray, n: int) -> None:
    """L1 fills of the first n keys (no request reaches more), an update of all (update
    batches come from the stream: any size)."""
    rows = np.ones((len(keys), t.dim), np.float32)
    a = t.admission
    if a is not None and a.sketch is not None:
        a.record(keys[:n])
        a.admit(keys[:n])
        a.record(np.resize(keys[:n], a.sketch.sample))  # enough to age the counts once
    if t.cache is not None:
        t.cache.insert(keys[:n], rows[:n])  # (finds: the lookups below, by their own path)
        t.cache.assign(keys, rows)


def _exercise_vdb_writes(vdb: HashMapVDB, tables: list[TableRuntime]) -> None:
    """The write kernels (the table grows on the way; the eviction kernels compile with the
    upsert's) on a private map configured as ``vdb``, one table per row type."""
    scratch = HashMapVDB(
        num_partitions=vdb.num_partitions,
        overflow_policy=vdb.policy,
        refresh_time_after_fetch=vdb.refresh_time_after_fetch,
    )
    try:
        held = set(vdb.tables())
        dtypes = {vdb.dtype(t.store_name) for t in tables if t.store_name in held}
        rng = np.random.default_rng(1)
        for i, dtype in enumerate(sorted(dtypes)):
            name = f"warm-up.{i}"
            scratch.create_table(name, 8, dtype=dtype)
            for n in (SMALL, LARGE, LARGE):
                keys = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n)
                scratch.upsert(name, keys, np.ones((n, 8), np.float32))
    finally:
        scratch.close()


def warm_up(
    session: LookupSession, io: str | None = None, max_keys: int | None = None
) -> float | None:
    """Run the session's host kernels once at each batch size (see the module); returns the
    seconds it took, or None for a model with a GPU L1 (not covered).

    ``io``: the request path to run, ``"hps"`` (``lookup_concatenated``) or ``"slots"``
    (``lookup_columns``); None runs both and per-table lookups (the Python API's path).
    ``max_keys``: the most keys a request may carry; batches stay within what one can reach,
    so no kernel is compiled that no request could run.
    """
    if any(t.cache is not None and type(t.cache) is not HostCache for t in session.tables):
        log.info("%s: an L1 cache is on a GPU: kernels compile on first use", session.model)
        return None
    t0 = time.perf_counter()
    tables = []
    for t in session.tables:
        cache = _scratch_cache(t.cache)
        admission = None
        if cache is not None and t.admission is not None:
            admission = Admission(cache.capacity, t.admission.min_count)
        tables.append(TableRuntime(t.name, t.store_name, t.dim, t.default_value, cache, admission))
    T = len(tables)
    # keys of one table in a request: all of them in the hps layout, one per sample in slots
    reach = LARGE if max_keys is None else max_keys if io == "hps" else max_keys // T
    scratch = LookupSession(
        session.model, tables, session.vdb, None, hit_rate_threshold=session.hit_rate_threshold
    )
    try:
        rng = np.random.default_rng(0)
        for n, updates in ((SMALL, SMALL), (max(SMALL, min(LARGE, reach)), LARGE)):
            keys = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (T, updates))
            for i, t in enumerate(tables):
                _exercise_cache(t, keys[i], n)
            # the keys the caches now hold come back as L1 hits, the rest miss in the VDB
            if io in (None, "hps"):
                scratch.lookup_concatenated(keys[:, :n].ravel(), np.full(T, n), stats=False)
            if io in (None, "slots"):
                scratch.lookup_columns(np.ascontiguousarray(keys[:, :n].T))
            if io is None:
                for i in range(T):
                    scratch.lookup(keys[i, :n], i)
        scratch.flush()
    finally:
        scratch.close()
    vdb = session.vdb
    if isinstance(vdb, HashMapVDB) and not vdb.shm_name:
        _exercise_vdb_writes(vdb, session.tables)
    return time.perf_counter() - t0
