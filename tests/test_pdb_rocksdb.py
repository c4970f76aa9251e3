"""The RocksDB persistent DB against a dict reference; reopen, read-only and secondary instances;
corrupted rows; and the background promoter into a VDB."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rocksdict import Options, Rdict
from small_tmpfs import in_small_tmpfs

from hps_core.errors import InvalidInputError, StorageError
from hps_core.pdb import rocksdb
from hps_core.pdb.promote import Promoter
from hps_core.pdb.rocksdb import RocksDBPDB
from hps_core.vdb.hashmap import HashMapVDB

I64 = np.iinfo(np.int64)
T = "hps_et.model.table0"


def rows(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    extremes = np.array([I64.min, I64.max, 0, -1, I64.min + 1, 1], np.int64)
    keys = np.unique(np.concatenate([extremes, rng.integers(I64.min, I64.max, n)]))
    rng.shuffle(keys)
    return keys, rng.standard_normal((len(keys), dim)).astype(np.float32)


def absent_keys(keys: np.ndarray, n: int, seed: int = 9) -> np.ndarray:
    cand = np.random.default_rng(seed).integers(I64.min, I64.max, 2 * n)
    return cand[~np.isin(cand, keys)][:n]


@pytest.fixture
def db(tmp_path):
    d = RocksDBPDB(tmp_path / "db", max_batch_size=257)  # many batches, ragged last one
    yield d
    d.close()


def test_fetch_matches_a_dict_reference(db):
    keys, vecs = rows(3000, 16)
    db.create_table(T, 16)
    db.create_table(T, 16)  # same dim: no-op
    db.upsert(T, keys, vecs)
    missing = absent_keys(keys, 50)
    query = np.random.default_rng(1).permutation(np.concatenate([keys, missing, keys[:100]]))
    ref = dict(zip(keys.tolist(), vecs, strict=True))
    got, found = db.fetch(T, query)
    assert got.dtype == np.float32 and got.shape == (len(query), 16)
    np.testing.assert_array_equal(found, [k in ref for k in query.tolist()])
    expect = np.stack([ref.get(k, np.zeros(16, np.float32)) for k in query.tolist()])
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_array_equal(db.contains(T, query), found)
    # A caller-provided out is filled in place; rows of missing keys are zeroed.
    out = np.full((len(query), 16), 7.0, np.float32)
    assert db.fetch(T, query, out)[0] is out
    np.testing.assert_array_equal(out, expect)
    # uint64 keys are the same 64 bits; 32-bit keys widen.
    np.testing.assert_array_equal(db.fetch(T, query.view(np.uint64))[0], expect)
    small = np.array([0, 1], np.uint32)
    np.testing.assert_array_equal(db.fetch(T, small)[0], np.stack([ref[0], ref[1]]))
    assert db.fetch(T, np.array([], np.int64))[0].shape == (0, 16)
    assert db.size(T) == len(keys) and db.tables() == [T] and db.dim(T) == 16


def test_parallel_lookup_equals_serial(tmp_path, monkeypatch):
    keys, vecs = rows(5000, 8, seed=2)
    query = np.concatenate([keys, absent_keys(keys, 1000)])
    with RocksDBPDB(tmp_path / "db", num_threads=1) as serial:
        serial.create_table(T, 8)
        serial.upsert(T, keys, vecs)
        want = serial.fetch(T, query)
    monkeypatch.setattr(rocksdb, "PARALLEL_MIN_KEYS", 100)
    with RocksDBPDB(tmp_path / "db", max_batch_size=300) as par:
        par._workers = 4  # split even on a machine with fewer cores
        got = par.fetch(T, query)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(par.contains(T, query), want[1])


def test_duplicates_later_wins_evict_and_dump(db):
    keys, vecs = rows(1000, 4, seed=3)
    db.create_table(T, 4)
    db.upsert(T, keys, vecs)
    k = keys[7]
    # Within one call (and across the batch boundary at 257 rows) the later row wins.
    dup_keys = np.concatenate([[k], keys[:300], [k]])
    dup_vecs = np.concatenate([[vecs[1]], vecs[:300], [vecs[2]]])
    db.upsert(T, dup_keys, dup_vecs)
    np.testing.assert_array_equal(db.fetch(T, [k])[0][0], vecs[2])
    db.upsert(T, [k], vecs[3:4])  # and across calls
    ref = dict(zip(keys.tolist(), vecs, strict=True))
    ref[int(k)] = vecs[3]

    gone = np.concatenate([keys[:10], keys[:10], absent_keys(keys, 5)])
    assert db.evict(T, gone) == 10  # distinct keys that were present
    assert db.evict(T, keys[:10]) == 0
    for x in keys[:10].tolist():
        ref.pop(x)
    assert not db.contains(T, keys[:10]).any() and db.contains(T, keys[10:]).all()
    assert not db.fetch(T, keys[:10])[1].any()

    dk, dv = db.dump(T)
    assert dk.dtype == np.int64 and dv.dtype == np.float32
    assert sorted(dk.tolist()) == sorted(ref) and db.size(T) == len(ref)
    for key, v in zip(dk.tolist(), dv, strict=True):
        np.testing.assert_array_equal(v, ref[key])


def test_tables_dims_rows_and_meta_survive_reopen(tmp_path):
    keys, vecs = rows(500, 32, seed=4)
    with RocksDBPDB(tmp_path / "db") as db:
        db.create_table(T, 32)
        db.create_table("hps_et.model.table1", 1)
        db.create_table("hps_et.model.gone", 2)
        db.upsert(T, keys, vecs)
        db.upsert("hps_et.model.table1", keys[:3], vecs[:3, :1])
        db.drop_table("hps_et.model.gone")
        db.set_meta("loaded:hps_et.model.table0", "files-v1")
        assert db.get_meta("nothing") is None
    with RocksDBPDB(tmp_path / "db") as again:
        assert again.tables() == [T, "hps_et.model.table1"]
        assert (again.dim(T), again.dim("hps_et.model.table1")) == (32, 1)
        assert again.get_meta("loaded:hps_et.model.table0") == "files-v1"
        got, found = again.fetch(T, keys)
        assert found.all()
        np.testing.assert_array_equal(got, vecs)
        np.testing.assert_array_equal(again.fetch("hps_et.model.table1", keys[:3])[0], vecs[:3, :1])
        with pytest.raises(StorageError, match="'hps_et.model.gone'"):
            again.dim("hps_et.model.gone")


def test_read_only_reads_and_refuses_writes(tmp_path):
    keys, vecs = rows(200, 4, seed=5)
    primary = RocksDBPDB(tmp_path / "db")
    primary.create_table(T, 4)
    primary.upsert(T, keys, vecs)
    primary.set_meta("m", "v")
    # Opened while the primary is still live (its WAL unflushed): reads see the rows.
    with RocksDBPDB(tmp_path / "db", read_only=True) as ro:
        assert ro.tables() == [T] and ro.get_meta("m") == "v"
        np.testing.assert_array_equal(ro.fetch(T, keys)[0], vecs)
        for write in (
            lambda: ro.upsert(T, keys[:1], vecs[:1]),
            lambda: ro.evict(T, keys[:1]),
            lambda: ro.create_table("hps_et.model.new", 4),
            lambda: ro.drop_table(T),
            lambda: ro.set_meta("m", "w"),
        ):
            with pytest.raises(StorageError, match="opened read-only"):
                write()
    primary.close()
    with pytest.raises(StorageError, match="no database"):
        RocksDBPDB(tmp_path / "elsewhere", read_only=True)


def test_a_database_that_cannot_be_opened_is_a_storage_error_naming_it(tmp_path):
    """A second writer of a live database (RocksDB's lock) and a damaged one (its CURRENT
    file names a manifest that is gone): rocksdict's plain exceptions become StorageErrors
    naming the database and what was being done, and the live database still answers."""
    keys, vecs = rows(50, 4, seed=9)
    live = RocksDBPDB(tmp_path / "db")
    live.create_table(T, 4)
    live.upsert(T, keys, vecs)
    with pytest.raises(
        StorageError, match=r"RocksDB at .*db: opening \(read-write\) failed:.*lock"
    ):
        RocksDBPDB(tmp_path / "db")
    np.testing.assert_array_equal(live.fetch(T, keys)[0], vecs)
    live.close()
    (tmp_path / "db" / "CURRENT").write_text("MANIFEST-999999\n")
    for mode in ({}, {"read_only": True}):
        with pytest.raises(StorageError, match=r"RocksDB at .*db: (opening|listing).* failed"):
            RocksDBPDB(tmp_path / "db", **mode)


def test_secondary_follows_the_primary_after_catch_up(tmp_path):
    keys, vecs = rows(300, 4, seed=6)
    primary = RocksDBPDB(tmp_path / "db")
    primary.create_table(T, 4)
    primary.upsert(T, keys[:100], vecs[:100])
    sec = RocksDBPDB(tmp_path / "db", secondary_path=tmp_path / "sec")
    assert sec.fetch(T, keys[:100])[1].all()
    primary.upsert(T, keys[100:], vecs[100:])
    primary.create_table("hps_et.model.later", 2)  # a table added after the secondary opened
    primary.upsert("hps_et.model.later", keys[:2], vecs[:2, :2])
    assert not sec.fetch(T, keys[100:])[1].any()
    sec.catch_up()
    got, found = sec.fetch(T, keys)
    assert found.all()
    np.testing.assert_array_equal(got, vecs)
    assert sec.tables() == sorted([T, "hps_et.model.later"])
    np.testing.assert_array_equal(sec.fetch("hps_et.model.later", keys[:2])[0], vecs[:2, :2])
    with pytest.raises(StorageError, match="read-only"):
        sec.upsert(T, keys[:1], vecs[:1])
    sec.close()
    primary.close()


def test_a_secondary_keeps_up_when_the_primary_adds_and_flushes_tables_under_reads(tmp_path):
    """The primary adds a table and flushes it (as every model load does): the secondary's
    catch-up then failed for good ("MANIFEST record referencing unknown column family"), and
    the reopen that catches up with new tables closed the database under concurrent reads,
    which failed (the server then served defaults)."""
    keys, vecs = rows(20_000, 8, seed=7)
    primary = RocksDBPDB(tmp_path / "db")
    primary.create_table(T, 8)
    primary.upsert(T, keys, vecs)
    sec = RocksDBPDB(tmp_path / "db", secondary_path=tmp_path / "sec")
    stop, errors, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                got, found = sec.fetch(T, keys[::7])
                assert found.all() and np.array_equal(got[10:], vecs[::7][10:])
                reads[0] += 1
            except Exception as e:  # noqa: BLE001 - every failure is counted
                errors.append(repr(e))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(8):
            name = f"hps_et.m{i}.t"
            primary.create_table(name, 2)
            primary.upsert(name, keys[:3], vecs[:3, :2] + i)
            primary.flush(name)
            primary.upsert(T, keys[:70], vecs[:70])  # rows the readers check stay the same
            sec.catch_up()
            assert name in sec.tables()
            np.testing.assert_array_equal(sec.fetch(name, keys[:3])[0], vecs[:3, :2] + i)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == [] and reads[0] > 0
    sec.close()
    primary.close()


def _secondary_reads(sec: RocksDBPDB, keys: np.ndarray, want: np.ndarray, tries: int = 20) -> bool:
    """Whether the secondary serves ``want`` for ``keys`` within a few catch-ups."""
    for _ in range(tries):
        sec.catch_up()
        got, found = sec.fetch(T, keys)
        if found.all() and np.array_equal(got, want):
            return True
        time.sleep(0.05)
    return False


def _secondary_that_replayed(tmp_path, keys, vecs) -> tuple[RocksDBPDB, RocksDBPDB]:
    """A primary that wrote ``vecs`` then ``vecs + 1``, and a secondary that replayed both."""
    primary = RocksDBPDB(tmp_path / "db")
    primary.create_table(T, vecs.shape[1])
    primary.upsert(T, keys, vecs)
    sec = RocksDBPDB(tmp_path / "db", secondary_path=tmp_path / "sec")
    primary.upsert(T, keys, vecs + 1)
    sec.catch_up()
    return primary, sec


@pytest.mark.parametrize("wait", [True, False])
def test_a_secondary_reads_the_rows_a_flush_wrote(tmp_path, wait):
    """A secondary that replayed v1 from the log before the primary wrote v2 and flushed kept
    serving v1: its memtable was never dropped (the rest of the flushed log is not replayed),
    for as long as the table got no further write."""
    keys, vecs = rows(50, 4, seed=11)
    primary, sec = _secondary_that_replayed(tmp_path, keys, vecs)
    np.testing.assert_array_equal(sec.fetch(T, keys)[0], vecs + 1)
    primary.upsert(T, keys[:10], vecs[:10] + 2)
    if wait:
        primary.flush(T)  # as after a load
    else:
        primary.flush(T, wait=False)  # as the online updates flush
    assert _secondary_reads(sec, keys[:10], vecs[:10] + 2)
    # the flushed rows stay as written: what the SEAL_KEY record adds is invisible
    dump_keys, _ = primary.dump(T)
    assert np.array_equal(np.sort(dump_keys), np.sort(keys)) and primary.size(T) == len(keys)
    got, _ = sec.fetch(T, keys)
    np.testing.assert_array_equal(got[10:], vecs[10:] + 1)
    sec.close()
    primary.close()


def test_a_secondary_reads_the_last_rows_of_a_primary_that_closed_or_was_killed(tmp_path):
    """A secondary that replayed part of a primary's log went on serving those rows, not the
    later ones, once another primary opened the database (an ingestor restarted, or killed and
    started again) and until that one flushed the table."""
    keys, vecs = rows(20, 4, seed=12)
    primary, sec = _secondary_that_replayed(tmp_path, keys, vecs)
    primary.upsert(T, keys, vecs + 2)
    primary.close()
    primary = RocksDBPDB(tmp_path / "db")
    assert _secondary_reads(sec, keys, vecs + 2)
    primary.close()

    writer = f"""
import os, sys, numpy as np
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from hps_core.pdb.rocksdb import RocksDBPDB
keys = np.array({keys.tolist()}, np.int64)
db = RocksDBPDB({str(tmp_path / "db")!r})
db.upsert({T!r}, keys, np.full((len(keys), 4), 3, np.float32))
print("written", flush=True)
sys.stdin.readline()
db.upsert({T!r}, keys, np.full((len(keys), 4), 4, np.float32))
os.kill(os.getpid(), 9)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", writer], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "written"
    assert _secondary_reads(sec, keys, np.full((len(keys), 4), 3, np.float32))
    proc.communicate("\n", timeout=60)
    assert proc.returncode == -9
    primary = RocksDBPDB(tmp_path / "db")  # the killed writer's successor
    assert _secondary_reads(sec, keys, np.full((len(keys), 4), 4, np.float32))
    sec.close()
    primary.close()


def _cache_under_updates(tmp_path, name: str) -> tuple[int, int, bool]:
    """A secondary reading a table while the primary updates and flushes it 60 times: its
    block cache's peak usage, the table's live SST bytes at the end, and whether the rows read
    at the end equal the reference."""
    keys, vecs = rows(3000, 32, seed=13)
    primary = RocksDBPDB(tmp_path / name)
    primary.create_table(T, 32)
    primary.upsert(T, keys, vecs)
    primary.flush(T)
    sec = RocksDBPDB(tmp_path / name, secondary_path=tmp_path / f"{name}_sec")
    rng = np.random.default_rng(1)
    peak = 0
    for _ in range(60):
        i = rng.integers(0, len(keys), 300)
        vecs[i] = rng.standard_normal((len(i), 32)).astype(np.float32)
        primary.upsert(T, keys[i], vecs[i])
        primary.flush(T)
        sec.catch_up()
        sec.fetch(T, keys)  # every block of the new files
        peak = max(peak, sec._cache.get_usage())
    live = int(sec._cfs[T].property_int_value("rocksdb.live-sst-files-size"))
    got, found = sec.fetch(T, keys)
    same = bool(found.all()) and np.array_equal(got, vecs)
    sec.close()
    primary.close()
    return peak, live, same


def test_the_block_cache_holds_little_more_than_the_live_data(tmp_path, monkeypatch):
    """Blocks of SST files compactions deleted stay in RocksDB's cache until the LRU needs room:
    under updates a serving process's cache grew towards its full capacity (256 MiB) while the
    live data was a few MiB. The capacity follows the live data now."""
    monkeypatch.setattr(rocksdb, "CACHE_MIN_BYTES", 1 << 20)
    peak, live, same = _cache_under_updates(tmp_path, "fitted")
    assert same
    monkeypatch.setattr(RocksDBPDB, "_fit_cache", lambda self: None)  # the cache as it was
    peak_before, live_before, same = _cache_under_updates(tmp_path, "unfitted")
    assert same
    assert peak_before > 4 * max(live_before, 1 << 20), (peak_before, live_before)
    assert peak <= rocksdb.CACHE_LIVE_FACTOR * max(live, 1 << 20) * 1.5, (peak, live)


def _log_bytes_under_flushes(path: Path) -> tuple[int, bool]:
    """One table written and flushed 120 times while two others (the metadata, a table written
    once) hold rows of the first log: the bytes of live log files then, and whether the rows
    read back equal the reference."""
    db = RocksDBPDB(path)
    db.create_table(T, 8)
    db.create_table("hps_et.model.once", 8)
    db.upsert("hps_et.model.once", np.arange(10), np.ones((10, 8), np.float32))
    db.set_meta("loaded", "x")
    rng = np.random.default_rng(2)
    want: dict[int, np.ndarray] = {}
    for _ in range(120):
        keys = rng.integers(0, 5000, 2000)
        vecs = rng.standard_normal((2000, 8)).astype(np.float32)
        db.upsert(T, keys, vecs)
        want.update(zip(keys.tolist(), vecs, strict=True))
        db.flush(T)
    got, found = db.fetch(T, np.array(list(want), np.int64))
    same = bool(found.all()) and np.array_equal(got, np.stack(list(want.values())))
    same &= db.get_meta("loaded") == "x"
    same &= np.array_equal(db.fetch("hps_et.model.once", np.arange(10))[0], np.ones((10, 8)))
    logs = sum(f.stat().st_size for f in path.glob("*.log"))
    db.close()
    return logs, same


def test_log_files_do_not_pile_up_behind_a_table_written_once(tmp_path, monkeypatch):
    monkeypatch.setattr(rocksdb, "MAX_TOTAL_WAL_BYTES", 0)  # RocksDB's own bound (GiBs here)
    unbounded, same = _log_bytes_under_flushes(tmp_path / "a")
    assert same
    monkeypatch.setattr(rocksdb, "MAX_TOTAL_WAL_BYTES", 2 << 20)
    bounded, same = _log_bytes_under_flushes(tmp_path / "b")
    assert same
    assert unbounded > 8 << 20, unbounded  # every row written, in logs kept alive
    assert bounded <= 4 << 20, bounded


def _online_updates(tmp_path, name: str, **flush) -> tuple[list[int], bool]:
    """Rows written through the ingestor's PDB sink in 4000-row batches, a secondary catching
    up after each: the secondary's memtable bytes after each batch, and whether its rows equal
    the reference (the last row written per key) at the end."""
    from hps_core.updates.ingestor import TierSink

    primary = RocksDBPDB(tmp_path / name)
    primary.create_table(T, 8)
    sec = RocksDBPDB(tmp_path / name, secondary_path=tmp_path / f"{name}_sec")
    sink = TierSink("pdb", primary, {T: (8, "float32")}, **flush)
    rng = np.random.default_rng(3)
    want: dict[int, np.ndarray] = {}
    held = []
    for _ in range(100):
        keys = rng.integers(-(2**62), 2**62, 4000)
        vecs = rng.standard_normal((4000, 8)).astype(np.float32)
        sink.apply(T, keys, vecs)
        want.update(zip(keys.tolist(), vecs, strict=True))
        sec.catch_up()
        held.append(sec.memtable_bytes(T))
    time.sleep(0.5)  # the last background flush
    sec.catch_up()
    keys = np.array(list(want), np.int64)
    got, found = sec.fetch(T, keys)
    same = bool(found.all()) and np.array_equal(got, np.stack(list(want.values())))
    sec.close()
    primary.close()
    return held, same


def test_online_updates_flush_so_a_secondary_holds_few_memtables(tmp_path):
    """A serving process following RocksDB replays the primary's log into memtables of its own
    and drops them only once the primary flushed them. Left to RocksDB's thresholds (32 MiB a
    table) a secondary's memory grew with every update; the sink flushes after ``flush_bytes``
    of rows or ``flush_seconds``."""
    unflushed, same = _online_updates(tmp_path, "none", flush_bytes=1 << 40, flush_seconds=1e9)
    assert same
    by_bytes, same = _online_updates(tmp_path, "bytes", flush_bytes=1 << 20, flush_seconds=1e9)
    assert same
    by_time, same = _online_updates(tmp_path, "time", flush_bytes=1 << 40, flush_seconds=0.0)
    assert same
    # 400K rows of dim 8: ~29 MB of memtables unflushed; the 1 MiB bound is ~22 batches (~6 MB)
    assert unflushed[-1] > 20 << 20, unflushed[-1]
    assert max(by_bytes[10:]) < 0.5 * unflushed[-1], (max(by_bytes), unflushed[-1])
    assert max(by_time[10:]) < 0.25 * unflushed[-1], (max(by_time), unflushed[-1])


def test_the_online_flush_skips_a_table_dropped_since(tmp_path, caplog):
    from hps_core.updates.ingestor import TierSink

    primary = RocksDBPDB(tmp_path / "db")
    for t in (T, "hps_et.model.other"):
        primary.create_table(t, 2)
    sink = TierSink("pdb", primary, flush_bytes=1 << 40, flush_seconds=1e9)
    keys, vecs = rows(10, 2, seed=4)
    sink.apply("hps_et.model.other", keys, vecs)
    primary.drop_table("hps_et.model.other")
    sink.flush_seconds = 0.0
    sink.apply(T, keys, vecs)  # flushes both: the dropped table's flush is only logged
    assert "cannot flush the PDB's table 'hps_et.model.other'" in caplog.text
    np.testing.assert_array_equal(primary.fetch(T, keys)[0], vecs)
    primary.close()


def test_delete_except_keeps_only_the_given_keys_and_secondaries_follow(tmp_path):
    keys, vecs = rows(3000, 4, seed=8)
    primary = RocksDBPDB(tmp_path / "db")
    primary.create_table(T, 4)
    primary.upsert(T, keys, vecs)
    sec = RocksDBPDB(tmp_path / "db", secondary_path=tmp_path / "sec")
    keep = np.sort(np.concatenate([keys[::3], absent_keys(keys, 5)]))  # absent ones: no-ops
    assert primary.delete_except(T, keep, chunk=500) == len(keys) - len(keys[::3])
    want = np.isin(keys, keep)
    for db in (primary, sec):
        if db is sec:
            sec.catch_up()
        got, found = db.fetch(T, keys)
        np.testing.assert_array_equal(found, want)
        np.testing.assert_array_equal(got[found], vecs[want])
    assert primary.delete_except(T, np.zeros(0, np.int64)) == len(keys[::3])
    assert primary.size(T) == 0
    sec.close()
    primary.close()


def test_bad_requests_and_unknown_tables(db):
    db.create_table(T, 4)
    with pytest.raises(StorageError, match="dim 4, not 8"):
        db.create_table(T, 8)
    with pytest.raises(StorageError, match="no table 'hps_et.model.nope'"):
        db.fetch("hps_et.model.nope", np.array([1]))
    with pytest.raises(InvalidInputError, match="keys"):
        db.fetch(T, np.array([1.5]))
    with pytest.raises(InvalidInputError, match="vectors"):
        db.upsert(T, np.array([1, 2]), np.zeros((2, 5), np.float32))
    with pytest.raises(InvalidInputError, match="out"):
        db.fetch(T, np.array([1]), np.zeros((1, 3), np.float32))
    with pytest.raises(InvalidInputError, match="dim"):
        db.create_table("hps_et.model.zero", 0)


def test_a_row_of_the_wrong_length_is_an_error_not_a_vector(tmp_path):
    with RocksDBPDB(tmp_path / "db") as db:
        db.create_table(T, 4)
        db.upsert(T, np.array([1, 2], np.int64), np.ones((2, 4), np.float32))
    names = Rdict.list_cf(str(tmp_path / "db"), Options(raw_mode=True))
    raw = Rdict(
        str(tmp_path / "db"),
        Options(raw_mode=True),
        column_families={n: Options(raw_mode=True) for n in names if n != "default"},
    )
    cf = raw.get_column_family(T)
    cf.put(np.array([-7], "<i8").tobytes(), b"\x00" * 12)  # 3 floats in a dim-4 table
    del cf  # rocksdict holds the DB lock while a column family object lives
    raw.close()
    with RocksDBPDB(tmp_path / "db") as db:
        np.testing.assert_array_equal(db.fetch(T, [1, 2])[0], 1.0)
        with pytest.raises(StorageError, match=f"'{T}': key -7 holds 12 bytes, expected 16"):
            db.fetch(T, np.array([1, -7, 2]))
        with pytest.raises(StorageError, match=f"'{T}': key -7 has a 12-byte value, expected 16"):
            db.dump(T)


def test_promoter_inserts_rows_the_vdb_lacks_and_keeps_those_it_holds():
    vdb = HashMapVDB(num_partitions=2)
    for t in ("a", "b"):
        vdb.create_table(t, 4)
    keys = np.array([I64.min, -1, 0, I64.max], np.int64)
    vecs = np.arange(16, dtype=np.float32).reshape(4, 4)
    want = vecs.copy()
    with Promoter(vdb, max_pending=8) as p:
        assert p.submit("a", keys, vecs)
        assert p.submit("a", keys[:1], vecs[3:4])  # held by then: an older read, not applied
        assert p.submit("b", keys[1:2], vecs[1:2])
        vecs[:] = -1  # submit copied the rows
        assert p.flush(timeout=10) and p.pending == 0
    assert p.promoted == 5 and p.dropped == 0
    got, found = vdb.fetch("a", keys)
    assert found.all()
    np.testing.assert_array_equal(got, want)
    got, found = vdb.fetch("b", keys)
    np.testing.assert_array_equal(found, [False, True, False, False])
    np.testing.assert_array_equal(got[1], want[1])
    assert not p.submit("a", keys, vecs) and p.dropped == 1  # closed


def test_promoter_drops_instead_of_blocking_and_survives_failures():
    gate = threading.Event()
    seen = []

    class Slow:
        def insert_missing(self, table, keys, vectors, source=None):
            gate.wait(10)
            if table == "broken":
                raise RuntimeError("VDB table dropped")
            seen.append(len(keys))
            return len(keys)

    p = Promoter(Slow(), max_pending=2)
    keys, vecs = np.arange(3, dtype=np.int64), np.zeros((3, 2), np.float32)
    assert p.submit("broken", keys, vecs)
    # The worker holds one submission; two more fill the queue; the rest are dropped at once.
    for _ in range(1000):
        if p._queue.qsize() == 0:
            break
        time.sleep(0.01)
    results = [p.submit("t", keys, vecs) for _ in range(6)]
    assert results == [True, True] + [False] * 4
    assert (p.dropped, p.dropped_rows) == (4, 12)
    assert not p.flush(timeout=0.05)  # still blocked
    gate.set()
    assert p.flush(timeout=10)
    assert p.failed == 1 and seen == [3, 3] and p.promoted == 6
    p.close()


def _memtable_bytes(pdb: RocksDBPDB) -> int:
    return sum(cf.property_int_value("rocksdb.cur-size-all-mem-tables") for cf in pdb._cfs.values())


def test_memtables_are_held_to_the_write_buffer_sizes(tmp_path):
    """Four tables of ~2.4 MiB each: with 1 MiB per table and 2 MiB in all the memtables are
    flushed on the way (RocksDB's defaults would hold all of it), and every row reads back."""
    rng = np.random.default_rng(3)
    held = {}
    for name, kw in (
        ("small", {"write_buffer_bytes": 1 << 20, "total_write_buffer_bytes": 2 << 20}),
        ("large", {"write_buffer_bytes": 64 << 20, "total_write_buffer_bytes": 1 << 30}),
    ):
        pdb = RocksDBPDB(tmp_path / name, **kw)
        ref = {}
        for t in range(4):
            keys = rng.integers(0, 2**62, 8000)
            vecs = rng.standard_normal((8000, 64)).astype(np.float32)
            pdb.create_table(f"t{t}", 64)
            for s in range(0, 8000, 1000):
                pdb.upsert(f"t{t}", keys[s : s + 1000], vecs[s : s + 1000])
            ref[t] = (keys, vecs)
        held[name] = _memtable_bytes(pdb)
        for t, (keys, vecs) in ref.items():
            got, found = pdb.fetch(f"t{t}", keys)
            assert found.all() and np.array_equal(got, vecs)
        pdb.close()
    assert held["large"] > 8 << 20  # all ~10 MiB of rows still in memtables
    assert held["small"] < 4 << 20, held


@pytest.mark.parametrize("field", ["write_buffer_bytes", "total_write_buffer_bytes"])
def test_a_too_small_write_buffer_is_an_error_naming_it(tmp_path, field):
    with pytest.raises(InvalidInputError, match=field):
        RocksDBPDB(tmp_path / "db", **{field: 1000})


def test_a_load_leaves_the_rows_on_disk_and_no_memtable_behind(tmp_path):
    """The server flushes each table after loading it: its memtables are (near) empty, the
    rows read back from the SST files, and hps estimate counts only the column families."""
    from hps_core import ParameterServer
    from hps_core.config import load_config
    from hps_core.estimate import COLUMN_FAMILY_BYTES, estimate_config
    from hps_core.model_io import SparseTable
    from hps_core.synth import make_model

    model = make_model(tmp_path / "m", [40_000, 3_000], [16, 8], name="flush")
    cfg = json.loads(open(model.config_path).read())
    cfg["volatile_db"] = {"type": "disabled"}
    cfg["persistent_db"] = {"type": "rocks_db", "path": str(tmp_path / "db")}
    with ParameterServer(cfg) as ps:
        for i, t in enumerate(ps.session("flush").tables):
            cf = ps.pdb._cfs[t.store_name]
            # one entry only: the delete of SEAL_KEY that lets secondaries drop their memtable
            assert cf.property_int_value("rocksdb.num-entries-active-mem-table") == 1
            assert cf.property_int_value("rocksdb.num-deletes-active-mem-table") == 1
            assert cf.property_int_value("rocksdb.total-sst-files-size") > 0
            with SparseTable.open(model.table_paths[i], t.dim) as f:
                keys, vecs = f.read_all()
            got, found = ps.pdb.fetch(t.store_name, keys)
            assert found.all() and np.array_equal(got, vecs)
    path = tmp_path / "hps.json"
    path.write_text(json.dumps(cfg))
    assert [e.pdb_host_bytes for e in estimate_config(load_config(path))] == [
        COLUMN_FAMILY_BYTES
    ] * 2


DISK_FULL = r"""
import faulthandler, json, os, sys
import numpy as np
from small_tmpfs import grow

faulthandler.dump_traceback_later(120, exit=True)  # a deadlock fails the test, with stacks
from hps_core.errors import StorageError
from hps_core.pdb import rocksdb
from hps_core.pdb.rocksdb import RocksDBPDB
from hps_core.vdb.hashmap import HashMapVDB

rocksdb.REOPEN_INTERVAL_S = 0.0
d = os.environ["HPS_SHM_DIR"]
T = "hps_et.model.table0"
rng = np.random.default_rng(4)
keys = rng.permutation(60_000).astype(np.int64) - 30_000
vecs = rng.standard_normal((len(keys), 64)).astype(np.float32)
db = RocksDBPDB(d + "/db", max_batch_size=5000)
db.create_table(T, 64)
out = {"errors": []}
s = 0
while s < len(keys):  # 15 MiB of rows into 8 MiB
    try:
        db.upsert(T, keys[s : s + 5000], vecs[s : s + 5000])
        s += 5000
    except StorageError as e:
        out["errors"].append(str(e))
        if len(out["errors"]) == 3:  # the failed write, then two retries while still full
            got, found = db.fetch(T, keys[:s])
            out["read_while_full"] = bool(found.all() and np.array_equal(got, vecs[:s]))
            out["written_before"] = s
            grow(d, 64)
            db.create_table("hps_et.model.table1", 8)  # the first write after: a reopen, locked
        assert len(out["errors"]) <= 3, out
got, found = db.fetch(T, keys)
out["all_equal"] = bool(found.all() and np.array_equal(got, vecs))
db.close()
again = RocksDBPDB(d + "/db", read_only=True)
got, found = again.fetch(T, keys)
out["reopened_equal"] = bool(found.all() and np.array_equal(got, vecs))
out["tables"] = again.tables()
print(json.dumps(out))
"""


def test_a_full_disk_fails_writes_clearly_keeps_reads_and_recovers_when_room_returns(tmp_path):
    """RocksDB refuses every write once one failed (until the process restarts); ours reopens
    the database at the next write, read-only while it still cannot, so a retrying writer
    (the update ingestor) gets through once there is room, and nothing written is lost."""
    script = tmp_path / "full.py"
    script.write_text(DISK_FULL)
    tests = str(Path(__file__).parent)
    r = in_small_tmpfs(f"PYTHONPATH={tests}:$PYTHONPATH {sys.executable} {script}")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    first, *retries = out["errors"]
    assert f"writing 5000 rows to '{T}' failed" in first and "No space left" in first
    assert len(retries) == 2 and all("No space left" in e for e in retries)
    assert 0 < out["written_before"] < 60_000 and out["read_while_full"]
    assert out["all_equal"] and out["reopened_equal"]
    assert out["tables"] == [T, "hps_et.model.table1"]


def test_damaged_metadata_is_named_and_leaves_the_database_unlocked(tmp_path):
    """A non-number dim in the metadata raised a bare ValueError, and the failed open kept the
    database and its LOCK while the error lived: a repair from the except block failed."""
    with RocksDBPDB(tmp_path / "db") as db:
        db.create_table(T, 4)
        db.set_meta("note", "kept")
    opts = lambda: Options(raw_mode=True)  # noqa: E731
    raw = Rdict(str(tmp_path / "db"), opts(), column_families={"hps_meta": opts(), T: opts()})
    meta = raw.get_column_family("hps_meta")
    meta.put(b"dim:" + T.encode(), b"abc")
    meta.put(b"meta:bytes", b"\xff\xfe")
    del meta
    raw.close()
    try:
        RocksDBPDB(tmp_path / "db")
        raise AssertionError("opened a database with damaged metadata")
    except StorageError as e:
        assert "hps_meta" in str(e) and f"dim:{T}" in str(e) and "b'abc'" in str(e)
        fix = Rdict(str(tmp_path / "db"), opts(), column_families={"hps_meta": opts(), T: opts()})
        cf = fix.get_column_family("hps_meta")
        cf.put(b"dim:" + T.encode(), b"4")
        del cf
        fix.close()
    with RocksDBPDB(tmp_path / "db") as db:
        assert db.dim(T) == 4 and db.get_meta("note") == "kept"
        with pytest.raises(StorageError, match="metadata 'bytes' holds .*not UTF-8"):
            db.get_meta("bytes")
