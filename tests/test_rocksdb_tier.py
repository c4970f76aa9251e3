"""The RocksDB persistent tier against a dict reference, plus reopen, read-only and secondary modes."""

from __future__ import annotations

import numpy as np
import pytest
from rocksdict import Options, Rdict

from hps_core.errors import HPSError, StorageError
from hps_core.pdb.promote import Promoter
from hps_core.pdb.rocksdb import RocksDBPDB

I64 = np.iinfo(np.int64)
T = "hps_et.m.t"


def rows(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    keys = np.concatenate(
        [[I64.min, I64.max, 0, -1], rng.integers(I64.min, I64.max, n, dtype=np.int64)]
    )
    return keys, rng.standard_normal((len(keys), dim)).astype(np.float32)


def test_rows_match_a_dict_and_survive_reopen(tmp_path):
    keys, vecs = rows(3000, 16)
    db = RocksDBPDB(tmp_path / "db", max_batch_size=500)  # several write/read batches
    db.create_table(T, 16)
    db.upsert(T, keys, vecs)
    dup = np.array([keys[5], keys[5]])
    db.upsert(T, dup, np.stack([vecs[6], vecs[7]]))  # the later duplicate wins
    ref = dict(zip(keys.tolist(), vecs, strict=True))
    ref[int(keys[5])] = vecs[7]
    absent = np.array([12345, -98765], np.int64)
    query = np.concatenate([keys[::-1], absent])
    got, found = db.fetch(T, query)
    np.testing.assert_array_equal(found, [True] * len(keys) + [False, False])
    np.testing.assert_array_equal(got[: len(keys)], np.stack([ref[k] for k in keys[::-1].tolist()]))
    np.testing.assert_array_equal(got[len(keys) :], 0)
    assert db.evict(T, np.concatenate([keys[:10], absent])) == 10
    assert not db.contains(T, keys[:10]).any() and db.contains(T, keys[10:]).all()
    dk, dv = db.dump(T)
    assert sorted(dk.tolist()) == sorted(keys[10:].tolist())
    for k, v in zip(dk.tolist(), dv, strict=True):
        np.testing.assert_array_equal(v, ref[k])
    db.set_meta("loaded:x", "fingerprint")
    db.close()

    again = RocksDBPDB(tmp_path / "db")
    assert again.tables() == [T] and again.dim(T) == 16 and again.size(T) == len(keys) - 10
    assert again.get_meta("loaded:x") == "fingerprint" and again.get_meta("other") is None
    np.testing.assert_array_equal(again.fetch(T, keys[10:20])[0], vecs[10:20])
    again.close()


def test_read_only_reads_and_refuses_writes(tmp_path):
    keys, vecs = rows(100, 4)
    db = RocksDBPDB(tmp_path / "db")
    db.create_table(T, 4)
    db.upsert(T, keys, vecs)
    db.close()
    ro = RocksDBPDB(tmp_path / "db", read_only=True)
    np.testing.assert_array_equal(ro.fetch(T, keys)[0], vecs)
    with pytest.raises(StorageError, match="read-only"):
        ro.upsert(T, keys[:1], vecs[:1])
    with pytest.raises(StorageError, match="read-only"):
        ro.evict(T, keys[:1])
    ro.close()


def test_secondary_sees_primary_writes_after_catch_up(tmp_path):
    keys, vecs = rows(200, 4)
    primary = RocksDBPDB(tmp_path / "db")
    primary.create_table(T, 4)
    primary.upsert(T, keys[:100], vecs[:100])
    primary._db.flush()
    sec = RocksDBPDB(tmp_path / "db", secondary_path=str(tmp_path / "sec"))
    assert sec.fetch(T, keys[:100])[1].all()
    primary.upsert(T, keys[100:], vecs[100:])
    sec.catch_up()
    got, found = sec.fetch(T, keys[100:])
    assert found.all()
    np.testing.assert_array_equal(got, vecs[100:])
    sec.close()
    primary.close()


def test_errors_name_table_and_key(tmp_path):
    db = RocksDBPDB(tmp_path / "db")
    db.create_table(T, 4)
    with pytest.raises(HPSError, match="no table 'nope'"):
        db.fetch("nope", np.array([1]))
    with pytest.raises(StorageError, match="dim 4"):
        db.create_table(T, 8)
    db.close()
    # A row of the wrong length (written by something else) is an error, never a wrong vector.
    names = Rdict.list_cf(str(tmp_path / "db"), Options(raw_mode=True))
    raw = Rdict(
        str(tmp_path / "db"),
        Options(raw_mode=True),
        column_families={n: Options(raw_mode=True) for n in names if n != "default"},
    )
    raw.get_column_family(T).put(np.array([7], "<i8").tobytes(), b"\x00" * 12)
    raw.close()
    db = RocksDBPDB(tmp_path / "db")
    with pytest.raises(StorageError, match="key 7 holds 12 bytes, expected 16"):
        db.fetch(T, np.array([7]))
    db.close()


class DictVDB:
    def __init__(self):
        self.rows = {}

    def upsert(self, table, keys, vectors):
        for k, v in zip(keys.tolist(), vectors, strict=True):
            self.rows[(table, k)] = v


def test_promoter_delivers_rows_and_drops_when_full():
    vdb = DictVDB()
    p = Promoter(vdb, max_pending=4)
    keys = np.arange(10, dtype=np.int64)
    vecs = np.arange(40, dtype=np.float32).reshape(10, 4)
    assert p.submit("t", keys, vecs)
    p.flush(timeout=10)
    assert len(vdb.rows) == 10 and p.promoted == 10
    np.testing.assert_array_equal(vdb.rows[("t", 3)], vecs[3])
    # Block the worker so the queue fills: submissions beyond it are dropped, not waited for.
    import threading

    gate = threading.Event()
    slow = DictVDB()
    slow.upsert = lambda *a: gate.wait(10)
    q = Promoter(slow, max_pending=2)
    results = [q.submit("t", keys, vecs) for _ in range(6)]
    assert results.count(False) == q.dropped >= 3
    gate.set()
    q.close()
    p.close()
