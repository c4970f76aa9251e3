"""The lookup pipeline end to end on real files, VDB and RocksDB, against a numpy reference."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time

import numpy as np
import pytest
from file_reference import file_rows

from hps_core import (
    HPS,
    ConfigError,
    InvalidInputError,
    ModelFileError,
    ParameterServer,
    StorageError,
    UnknownModelError,
    UnknownTableError,
)
from hps_core.model_io import write_table

I64 = np.iinfo(np.int64)
DIMS = [8, 4]
DEFAULTS = [0.5, -1.0]


def make_files(root, seed=0):
    """Two tables whose keys include negative, zero and extreme int64 values."""
    rng = np.random.default_rng(seed)
    tables = []
    for t, dim in enumerate(DIMS):
        keys = np.unique(rng.integers(I64.min, I64.max, size=3000, dtype=np.int64))
        keys = np.unique(np.concatenate([keys, [I64.min, I64.max, 0, -1, 1]]))
        rng.shuffle(keys)
        vecs = rng.standard_normal((len(keys), dim)).astype(np.float32)
        write_table(root / f"t{t}_sparse_0.model", keys, vecs)
        tables.append((keys, vecs))
    return tables


def config(root, **vdb):
    return {
        "supportlonglong": True,
        "volatile_db": {"type": "parallel_hash_map", "num_partitions": 4, **vdb},
        "persistent_db": {"type": "rocks_db", "path": str(root / "rocksdb")},
        "models": [
            {
                "model": "m",
                "sparse_files": [str(root / f"t{t}_sparse_0.model") for t in range(len(DIMS))],
                "embedding_table_names": ["user", "item"],
                "embedding_vecsize_per_table": DIMS,
                "maxnum_catfeature_query_per_table_per_sample": [1, 1],
                "default_value_for_each_table": DEFAULTS,
                "gpucacheper": 0.2,
                "hit_rate_threshold": 0.5,
            }
        ],
    }


def reference(tables, t, keys):
    """Numpy reference: the file's row for known keys, the table default otherwise."""
    return file_rows(*tables[t], keys, DEFAULTS[t])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    tables = make_files(root)
    with HPS(config(root)) as hps:
        yield hps, tables, root


def test_present_absent_negative_extreme_duplicate_keys(served):
    hps, tables, _ = served
    rng = np.random.default_rng(1)
    for t in range(len(DIMS)):
        keys = tables[t][0]
        query = np.concatenate(
            [
                rng.choice(keys, 500),  # present, with repeats
                [I64.min, I64.max, 0, -1, 1],  # extremes (present in the files)
                [I64.min + 1, I64.max - 1, -2, 2],  # extremes that are (almost surely) absent
                rng.integers(I64.min, I64.max, 50, dtype=np.int64),  # absent
            ]
        ).astype(np.int64)
        for _ in range(3):  # cold, then L1/VDB warm: results must never change
            got = hps.lookup(query, "m", t)
            assert got.dtype == np.float32 and got.shape == (len(query), DIMS[t])
            np.testing.assert_array_equal(got, reference(tables, t, query))
        hps.server.flush()


def test_empty_request_and_narrow_key_dtypes(served):
    hps, tables, _ = served
    assert hps.lookup(np.empty(0, np.int64), "m", 0).shape == (0, DIMS[0])
    assert hps.lookup([], "m", 1).shape == (0, DIMS[1])
    small = np.array([1, 0, 7, 123456], dtype=np.uint32)
    np.testing.assert_array_equal(
        hps.lookup(small, "m", 0), reference(tables, 0, small.astype(np.int64))
    )
    np.testing.assert_array_equal(
        hps.lookup(small.astype(np.int32), "m", 1), reference(tables, 1, small.astype(np.int64))
    )
    # Python ints, HugeCTR-style list input
    np.testing.assert_array_equal(
        hps.lookup([-1, 0, 1], "m", 0), reference(tables, 0, np.array([-1, 0, 1]))
    )


def test_tables_by_name_and_concatenated_hps_io(served):
    hps, tables, _ = served
    s = hps.server.session("m")
    q0 = tables[0][0][:7]
    q1 = np.concatenate([tables[1][0][:3], [12345]])
    np.testing.assert_array_equal(s.lookup(q1, "item"), reference(tables, 1, q1))
    flat, stats = s.lookup_concatenated(np.concatenate([q0, q1]), np.array([7, 4], np.int32))
    expect = np.concatenate([reference(tables, 0, q0).ravel(), reference(tables, 1, q1).ravel()])
    np.testing.assert_array_equal(flat, expect)
    assert [st.keys for st in stats] == [7, 4]


@pytest.mark.parametrize(
    "keys,numkeys,field",
    [
        (np.arange(5), np.array([2, 2]), "NUMKEYS"),  # counts do not add up
        (np.arange(4), np.array([5, -1]), "NUMKEYS"),  # negative count
        (np.arange(4), np.array([4]), "NUMKEYS"),  # one count for two tables
        (np.arange(4).astype(np.float32), np.array([2, 2]), "KEYS"),  # float keys
        (np.arange(4), np.array([2.0, 2.0]), "NUMKEYS"),
        (np.arange(4), np.array([2**64 - 1, 5], np.uint64), "NUMKEYS"),  # a sum that wraps
    ],
)
def test_bad_concatenated_requests(served, keys, numkeys, field):
    hps, tables, _ = served
    s = hps.server.session("m")
    with pytest.raises(InvalidInputError) as e:
        s.lookup_concatenated(keys, numkeys)
    assert e.value.field == field and field in str(e.value)
    np.testing.assert_array_equal(
        s.lookup(tables[0][0][:3], 0), reference(tables, 0, tables[0][0][:3])
    )


def test_bad_inputs_are_clear_errors_and_the_server_keeps_serving(served):
    hps, tables, _ = served
    with pytest.raises(InvalidInputError, match="'keys'.*float64"):
        hps.lookup(np.array([1.5, 2.0]), "m", 0)
    with pytest.raises(InvalidInputError, match="'keys'.*shape"):
        hps.lookup(np.zeros((2, 2), np.int64), "m", 0)
    with pytest.raises(InvalidInputError, match="'keys'"):
        hps.lookup(["a", "b"], "m", 0)
    with pytest.raises(InvalidInputError, match="'keys'"):
        hps.lookup([[1], [2, 3]], "m", 0)  # ragged
    with pytest.raises(InvalidInputError, match="'keys'"):
        hps.lookup([2**64], "m", 0)  # past 64 bits
    with pytest.raises(InvalidInputError, match="'keys'.*masked.*compressed"):
        hps.lookup(np.ma.masked_array(tables[0][0][:3], [0, 1, 0]), "m", 0)
    with pytest.raises(UnknownModelError, match="'nope'.*\\['m'\\]"):
        hps.lookup([1], "nope", 0)
    with pytest.raises(UnknownModelError, match="model '\\['m'\\]' is not deployed"):
        hps.lookup([1], ["m"], 0)  # an unhashable name
    with pytest.raises(UnknownTableError, match="table 2.*0=user, 1=item"):
        hps.lookup([1], "m", 2)
    with pytest.raises(UnknownTableError):
        hps.lookup([1], "m", -1)
    q = tables[1][0][:10]
    np.testing.assert_array_equal(hps.lookup(q, "m", 1), reference(tables, 1, q))


def test_columns_of_keys_are_checked(served):
    """lookup_columns (one key per table per sample) takes integer [batch, tables] arrays
    only: a float array would lose the low bits of large keys and serve defaults silently."""
    hps, tables, _ = served
    s = hps.server.session("m")
    cat = np.stack([tables[0][0][:6], tables[1][0][:6]], axis=1)
    want = np.concatenate([reference(tables, t, cat[:, t]) for t in range(2)], axis=1)
    np.testing.assert_array_equal(s.lookup_columns(cat), want)
    np.testing.assert_array_equal(s.lookup_columns(cat.view(np.uint64)), want)
    for bad, what in ((cat.astype(np.float64), "dtype float64"), (cat[:, 0], "shape [6]"),
                      (cat[:, :1], "shape [6, 1]"), (cat.tolist(), "list")):  # fmt: skip
        with pytest.raises(InvalidInputError, match=f"'cat'.*{re.escape(what)}"):
            s.lookup_columns(bad)
    np.testing.assert_array_equal(s.lookup_columns(cat), want)


def test_three_levels_and_vdb_newer_than_pdb(tmp_path):
    tables = make_files(tmp_path, seed=3)
    keys0, vecs0 = tables[0]
    # VDB starts empty (initial_cache_rate 0): every row is only in the PDB.
    with ParameterServer(config(tmp_path, initial_cache_rate=0.0)) as ps:
        s = ps.session("m")
        store = s.tables[0].store_name
        assert ps.vdb.size(store) == 0
        q = keys0[:100]
        got, st = s.lookup_with_stats(q, 0)
        np.testing.assert_array_equal(got, vecs0[:100])
        assert st.hits == {"l1": 0, "vdb": 0, "pdb": 100, "default": 0}
        # A row only in the VDB (e.g. a fresh update not yet persisted) is served from there.
        new_key = np.array([424242424242], np.int64)
        assert not ps.pdb.contains(store, new_key)[0]
        new_row = np.full((1, DIMS[0]), 7.0, np.float32)
        ps.vdb.upsert(store, new_key, new_row)
        # The VDB holds a newer version of keys that the PDB also holds: the VDB wins.
        newer = keys0[200:210]
        ps.vdb.upsert(store, newer, vecs0[200:210] + 1.0)
        got, st = s.lookup_with_stats(np.concatenate([new_key, newer, keys0[300:305]]), 0)
        np.testing.assert_array_equal(got[0], new_row[0])
        np.testing.assert_array_equal(got[1:11], vecs0[200:210] + 1.0)
        np.testing.assert_array_equal(got[11:], vecs0[300:305])
        assert st.hits == {"l1": 0, "vdb": 11, "pdb": 5, "default": 0}
        # Second time round the L1 cache answers, with the same values.
        again, st = s.lookup_with_stats(newer, 0)
        np.testing.assert_array_equal(again, vecs0[200:210] + 1.0)
        assert st.hits["l1"] == 10


def test_cache_missed_embeddings_promotes_pdb_rows_into_the_vdb(tmp_path):
    tables = make_files(tmp_path, seed=4)
    keys1, vecs1 = tables[1]
    cfg = config(tmp_path, initial_cache_rate=0.0, cache_missed_embeddings=True)
    with ParameterServer(cfg) as ps:
        store = ps.session("m").tables[1].store_name
        ps.lookup(keys1[:50], "m", 1)
        ps.flush()
        rows, found = ps.vdb.fetch(store, keys1[:50])
        assert found.all()
        np.testing.assert_array_equal(rows, vecs1[:50])


class Gated:
    """The VDB as the promoter sees it, holding promotions until ``gate`` is set."""

    def __init__(self, vdb):
        self.vdb, self.gate = vdb, threading.Event()

    def insert_missing(self, *args):
        self.gate.wait(10)
        return self.vdb.insert_missing(*args)


def test_a_promotion_queued_before_an_update_never_brings_the_old_row_back(tmp_path):
    """A lookup read rows from RocksDB and queued them for the VDB; online updates of two of
    the keys landed before the promotion (one then evicted from the VDB). The promotion used to
    overwrite the VDB's new row, or put the old row back, served from the VDB for good."""
    from hps_core.updates.ingestor import CacheSink, TierSink

    tables = make_files(tmp_path, seed=6)
    keys1, vecs1 = tables[1]
    cfg = config(tmp_path, initial_cache_rate=0.0, cache_missed_embeddings=True)
    cfg["models"][0]["gpucache"] = False
    with ParameterServer(cfg) as ps:
        store = ps.session("m").tables[1].store_name
        ps.promoter.vdb = gated = Gated(ps.vdb)
        q = keys1[:6]
        np.testing.assert_array_equal(ps.lookup(q, "m", 1), vecs1[:6])  # read from RocksDB
        new = np.full((2, vecs1.shape[1]), 42.0, np.float32)
        for sink in (TierSink("pdb", ps.pdb), TierSink("vdb", ps.vdb), CacheSink(ps)):
            sink.apply(store, q[:2], new)  # as the ingestor applies an update
        assert ps.vdb.evict(store, q[1:2]) == 1  # an overflow evicts one of them again
        gated.gate.set()
        ps.flush()
        got, found = ps.vdb.fetch(store, q)
        np.testing.assert_array_equal(found, [True, False, True, True, True, True])
        np.testing.assert_array_equal(got[0], new[0])
        np.testing.assert_array_equal(got[2:], vecs1[2:6])  # the rest promoted as before
        want = vecs1[:6].copy()
        want[:2] = new
        np.testing.assert_array_equal(ps.lookup(q, "m", 1), want)
        assert ps.promoter.promoted == 4


def test_a_request_in_flight_across_a_reload_of_its_model_gets_its_answer(tmp_path):
    """The request holds the old session when the model is added again (a hot reload); its
    background L1 fill then met a closed filler: a bare RuntimeError instead of the answer."""
    tables = make_files(tmp_path, seed=8)
    keys0 = tables[0][0]
    cfg = config(tmp_path)
    cfg["models"][0]["hit_rate_threshold"] = 0.0  # every fill in the background
    with ParameterServer(cfg) as ps:
        old = ps.session("m")
        ps.add_model(ps.config.models[0])
        np.testing.assert_array_equal(old.lookup(keys0[:10], 0), reference(tables, 0, keys0[:10]))
        np.testing.assert_array_equal(
            ps.lookup(keys0[:10], "m", 0), reference(tables, 0, keys0[:10])
        )


def test_pdb_survives_restart_and_is_not_reloaded(tmp_path):
    tables = make_files(tmp_path, seed=5)
    cfg = config(tmp_path)
    with ParameterServer(cfg) as ps:
        store = ps.session("m").tables[0].store_name
        assert ps.pdb.size(store) == len(tables[0][0])
        # Change a row directly in the PDB: a restart with the same files must not overwrite it.
        ps.pdb.upsert(store, tables[0][0][:1], np.full((1, DIMS[0]), 3.0, np.float32))
    cfg["volatile_db"]["initial_cache_rate"] = 0.0
    with ParameterServer(cfg) as ps:
        np.testing.assert_array_equal(
            ps.lookup(tables[0][0][:1], "m", 0), np.full((1, DIMS[0]), 3.0)
        )


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_a_new_model_file_replaces_the_old_ones_rows_on_every_level(tmp_path, rate):
    """A new file without some of the old file's keys: RocksDB and the VDB kept those keys' old
    rows (the load only wrote the new file over them), so they were served instead of the
    default. Also a copy that keeps the old file's size and mtime (cp -p, rsync -a): it was
    taken for the old file and not loaded at all."""
    from hps_core.config import load_config
    from hps_core.updates.ingestor import TierSink

    tables = make_files(tmp_path, seed=9)
    keys, vecs = tables[0]
    path = tmp_path / "t0_sparse_0.model"
    cfg = config(tmp_path, initial_cache_rate=rate)
    with ParameterServer(cfg) as ps:
        store = ps.session("m").tables[0].store_name
        np.testing.assert_array_equal(ps.lookup(keys, "m", 0), vecs)
    half = len(keys) // 2
    write_table(path, keys[:half], vecs[:half] + 1)  # a retrained, smaller table
    want = reference(tables, 0, keys)
    want[:half] = vecs[:half] + 1
    want[half:] = DEFAULTS[0]
    upd = np.full((1, vecs.shape[1]), 9.0, np.float32)
    with ParameterServer(cfg) as ps:
        np.testing.assert_array_equal(ps.lookup(keys, "m", 0), want)
        assert ps.pdb.size(store) == half
        sinks = [TierSink(n, t, {store: (vecs.shape[1], "float32")})
                 for n, t in (("pdb", ps.pdb), ("vdb", ps.vdb))]  # fmt: skip
        for sink in sinks:  # an update before the reload: the new file's row replaces it
            sink.apply(store, keys[1:2], upd)
        # a run-time reload of yet another file: the in-process VDB is cleared too
        stat = [os.stat(path / n) for n in ("key", "emb_vector")]
        write_table(path, keys[:half], vecs[:half] + 2)  # same size; mtime kept as cp -p does
        for n, st in zip(("key", "emb_vector"), stat, strict=True):
            os.utime(path / n, ns=(st.st_atime_ns, st.st_mtime_ns))
        ps.add_model(load_config(cfg).models[0])
        want[:half] = vecs[:half] + 2
        np.testing.assert_array_equal(ps.lookup(keys, "m", 0), want)
        # an update after that reload, by the same sinks, reaches the VDB of the next start
        for sink in sinks:
            sink.apply(store, keys[:1], upd)
    with ParameterServer(cfg) as ps:
        want[:1] = upd
        np.testing.assert_array_equal(ps.lookup(keys, "m", 0), want)
        got, found = ps.vdb.fetch(store, keys[:1])
        assert found.all() and (got == 9.0).all()


def test_a_secondary_pdb_without_read_only_serves_a_copy_of_the_primarys_file(tmp_path):
    """secondary_path implies read-only: a server given a copy of the model file at another
    path (a fingerprint the primary did not record) tried to write RocksDB and failed."""
    import shutil

    tables = make_files(tmp_path, seed=10)
    with ParameterServer(config(tmp_path)) as primary:
        for t in range(len(DIMS)):
            src = tmp_path / f"t{t}_sparse_0.model"
            shutil.copytree(src, tmp_path / f"copy{t}")
        cfg = config(tmp_path, initial_cache_rate=0.0)
        cfg["persistent_db"]["secondary_path"] = str(tmp_path / "secondary")
        cfg["models"][0]["sparse_files"] = [str(tmp_path / f"copy{t}") for t in range(len(DIMS))]
        with ParameterServer(cfg) as ps:
            assert ps.pdb.read_only
            for t in range(len(DIMS)):
                q = tables[t][0][:50]
                np.testing.assert_array_equal(ps.lookup(q, "m", t), reference(tables, t, q))
        assert primary.pdb.size(primary.session("m").tables[0].store_name) == len(tables[0][0])


def test_add_and_remove_models_at_run_time(tmp_path):
    tables = make_files(tmp_path, seed=6)
    cfg = config(tmp_path)
    with ParameterServer(cfg) as ps:
        from hps_core.config import load_config

        other = load_config(config(tmp_path)).models[0]
        other.model = "m2"
        ps.add_model(other)
        q = tables[0][0][:20]
        np.testing.assert_array_equal(ps.lookup(q, "m2", 0), reference(tables, 0, q))
        ps.remove_model("m")
        with pytest.raises(UnknownModelError):
            ps.lookup(q, "m", 0)
        assert "hps_et.m.user" not in ps.vdb.tables()
        np.testing.assert_array_equal(ps.lookup(q, "m2", 0), reference(tables, 0, q))
        # model "m2.user" would store its table "x" as hps_et.m2.user.x: free. But model
        # "m2" + table "user.x" and model "m2.user" + table "x" would share one stored table.
        clash = load_config(config(tmp_path)).models[0]
        clash.model, clash.embedding_table_names = "m2", ["user.x", "item"]
        ps.add_model(clash)  # replaces m2
        clash2 = load_config(config(tmp_path)).models[0]
        clash2.model, clash2.embedding_table_names = "m2.user", ["y", "x"]
        with pytest.raises(ConfigError, match=r"m2\.user\.embedding_table_names.*'m2'"):
            ps.add_model(clash2)
        assert "m2.user" not in ps.sessions
        np.testing.assert_array_equal(ps.lookup(q, "m2", 0), reference(tables, 0, q))


def test_a_closed_server_says_so(tmp_path):
    tables = make_files(tmp_path, seed=4)
    hps = HPS(config(tmp_path))
    q = tables[0][0][:5]
    np.testing.assert_array_equal(hps.lookup(q, "m", 0), reference(tables, 0, q))
    hps.close()
    with pytest.raises(StorageError, match="closed"):
        hps.lookup(q, "m", 0)


def test_rows_a_table_cannot_store_name_the_file(tmp_path, caplog):
    """int8 rows are scaled by their largest value: a NaN row cannot be stored."""
    keys, vecs = make_files(tmp_path, seed=8)[1]
    vecs[7, 1] = np.nan
    write_table(tmp_path / "t1_sparse_0.model", keys, vecs)
    cfg = config(tmp_path, storage_dtype="int8")
    cfg["persistent_db"] = {"type": "disabled"}
    with pytest.raises(ModelFileError, match=r"t1_sparse_0\.model: rows 0\.\..*NaN"):
        ParameterServer(cfg)
    cfg["persistent_db"] = config(tmp_path)["persistent_db"]  # RocksDB is loaded first
    with caplog.at_level("WARNING", logger="hps_core.server"):
        with pytest.raises(ModelFileError, match=r"t1_sparse_0\.model: rows 0\.\..*NaN"):
            ParameterServer(cfg)
    assert "served as they are" not in caplog.text  # not for an int8 VDB: they are refused


def test_nan_and_infinite_rows_are_reported_once_and_served_as_stored(tmp_path, caplog):
    """A float32 table stores them (HugeCTR served them too), but a user must hear of rows
    that turn every prediction using them into NaN: one warning per file, naming it."""
    tables = make_files(tmp_path, seed=9)
    keys, vecs = tables[1]
    vecs[[7, 30], 1] = np.nan
    vecs[12, 0] = -np.inf
    write_table(tmp_path / "t1_sparse_0.model", keys, vecs)
    with caplog.at_level("WARNING", logger="hps_core.server"):
        hps = HPS(config(tmp_path))  # the rows go into the VDB and RocksDB
    warned = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert warned == [f"{tmp_path / 't1_sparse_0.model'}: 3 of {len(keys)} rows hold NaN or "
                      f"infinite values (first key {keys[7]}); they are served as they are, and "
                      "every prediction that uses them will be NaN"]  # fmt: skip
    got = hps.lookup(keys[[7, 12, 30, 0]], "m", 1)
    np.testing.assert_array_equal(got, vecs[[7, 12, 30, 0]])  # NaN == NaN here
    hps.close()


def test_model_file_errors_name_the_file(tmp_path):
    make_files(tmp_path, seed=7)
    cfg = config(tmp_path)
    cfg["models"][0]["embedding_vecsize_per_table"] = [8, 5]  # table 1 has dim 4
    with pytest.raises(ModelFileError) as e:
        ParameterServer(cfg)
    assert "t1_sparse_0.model" in str(e.value) and "emb_vector" in str(e.value)
    # Truncated vectors
    cfg = config(tmp_path)
    vec = tmp_path / "t0_sparse_0.model" / "emb_vector"
    vec.write_bytes(vec.read_bytes()[:-3])
    with pytest.raises(ModelFileError, match="t0_sparse_0.model"):
        ParameterServer(cfg)
    # Missing directory
    cfg["models"][0]["sparse_files"][0] = str(tmp_path / "missing.model")
    with pytest.raises(ModelFileError, match="missing.model"):
        ParameterServer(cfg)


def test_malformed_hps_json_is_a_config_error(tmp_path):
    p = tmp_path / "hps.json"
    p.write_text(json.dumps(config(tmp_path))[:-5])
    with pytest.raises(ConfigError, match="valid JSON"):
        HPS(p)


def test_unsupported_and_empty_tiers(tmp_path):
    make_files(tmp_path, seed=8)
    cfg = config(tmp_path)
    cfg["volatile_db"]["type"] = "redis_cluster"
    cfg["volatile_db"]["address"] = "127.0.0.1:1"  # nothing listens there
    with pytest.raises(StorageError, match="127.0.0.1:1"):
        ParameterServer(cfg)
    cfg["volatile_db"]["type"] = "disabled"
    cfg["persistent_db"]["type"] = "disabled"
    with pytest.raises(ConfigError, match="at least one storage tier"):
        ParameterServer(cfg)


@pytest.mark.parametrize("vdb,pdb", [("hash_map", "disabled"), ("disabled", "rocks_db")])
def test_single_tier_configs(tmp_path, vdb, pdb):
    tables = make_files(tmp_path, seed=9)
    cfg = config(tmp_path)
    cfg["volatile_db"]["type"] = vdb
    cfg["persistent_db"]["type"] = pdb
    with HPS(cfg) as hps:
        q = np.concatenate([tables[1][0][:100], [5, 6]])
        np.testing.assert_array_equal(hps.lookup(q, "m", 1), reference(tables, 1, q))


@pytest.mark.parametrize("max_rows", [None, 500])
def test_estimate_matches_what_loading_takes(tmp_path, monkeypatch, max_rows):
    """``max_rows``: the partitions' row limit (shm.MAX_ROWS, 2^31 - 2) made smaller than the
    tables (3000 rows over 4 partitions): the estimate counted rows the VDB cannot hold."""
    from hps_core import estimate
    from hps_core.config import load_config
    from hps_core.estimate import estimate_config
    from hps_core.vdb import hashmap

    if max_rows:
        monkeypatch.setattr(hashmap, "MAX_ROWS", max_rows)
        monkeypatch.setattr(estimate, "MAX_ROWS", max_rows)
    make_files(tmp_path, seed=10)
    cfg = config(tmp_path)
    est = estimate_config(load_config(cfg))
    with ParameterServer(cfg) as ps:
        infos = ps.inspect()
    for e, i in zip(est, infos, strict=True):
        assert (e.rows, e.dim, e.vdb_rows, e.l1_rows) == (i.rows, i.dim, i.vdb_rows, i.l1_capacity)
        assert abs(e.vdb_bytes - i.vdb_bytes) <= 0.1 * i.vdb_bytes, (e.vdb_bytes, i.vdb_bytes)
        assert abs(e.l1_bytes - i.l1_bytes) <= 0.1 * i.l1_bytes, (e.l1_bytes, i.l1_bytes)


def test_l1_is_prefilled_with_hot_keys_from_meta_or_a_file(tmp_path):
    tables = make_files(tmp_path, seed=11)
    keys0, vecs0 = tables[0]
    write_table(tmp_path / "t0_sparse_0.model", keys0, vecs0, hot_keys=keys0[:40])
    hot1 = tables[1][0][100:130]
    np.savetxt(tmp_path / "hot1.txt", hot1, fmt="%d")
    cfg = config(tmp_path)
    cfg["models"][0]["hot_key_files"] = ["", str(tmp_path / "hot1.txt")]
    with ParameterServer(cfg) as ps:
        s = ps.session("m")
        got, st = s.lookup_with_stats(keys0[:40], 0)
        np.testing.assert_array_equal(got, vecs0[:40])
        assert st.hits["l1"] == 40  # the first request is already served from L1
        got, st = s.lookup_with_stats(hot1, 1)
        np.testing.assert_array_equal(got, reference(tables, 1, hot1))
        assert st.hits["l1"] == 30
    cfg["models"][0]["cache_prefill"] = False
    with ParameterServer(cfg) as ps:
        assert ps.session("m").lookup_with_stats(keys0[:40], 0)[1].hits["l1"] == 0
    np.save(tmp_path / "hot1.npy", hot1.astype(np.float64))  # not keys: no silent truncation
    cfg["models"][0].update(cache_prefill=True, hot_key_files=["", str(tmp_path / "hot1.npy")])
    with pytest.raises(ModelFileError, match="hot1.npy.*float64"):
        ParameterServer(cfg)
    np.save(tmp_path / "hot1.npy", np.stack([hot1, np.arange(30)], axis=1))  # (key, count)
    with pytest.raises(ModelFileError, match=r"hot1.npy.*shape \(30, 2\)"):
        ParameterServer(cfg)  # not read as keys 0..29 among the hot ones
    np.save(tmp_path / "hot1.npy", hot1[:, None])  # one column: the keys as they are
    with ParameterServer(cfg) as ps:
        assert ps.session("m").lookup_with_stats(hot1, 1)[1].hits["l1"] == 30
    (tmp_path / "hot1.txt").write_text(f"# hottest first\n{hot1[0]}\n\n{hot1[1]}\n1.7\n")
    cfg["models"][0]["hot_key_files"] = ["", str(tmp_path / "hot1.txt")]
    with pytest.raises(ModelFileError, match=r"hot1.txt, line 5: '1.7': expected a base-10"):
        ParameterServer(cfg)  # not read as key 1
    (tmp_path / "hot1.txt").write_text("9223372036854775808\n")
    with pytest.raises(ModelFileError, match=r"hot1.txt, line 1: .*int64 range"):
        ParameterServer(cfg)


def test_a_fill_racing_an_update_never_caches_the_old_row(tmp_path):
    """The lookup read the old row; the update landed before the fill: L1 must not keep it."""
    tables = make_files(tmp_path, seed=5)
    keys0, vecs0 = tables[0]
    with ParameterServer(config(tmp_path)) as ps:
        s = ps.session("m")
        t = s.tables[0]
        before = (t.recent.epoch, time.monotonic() - 10)  # a lookup that began 10 s ago
        updated, kept = keys0[:5], keys0[5:20]
        with t.cache_lock:  # what the update ingestor's L1 sink does
            t.cache.assign(updated, vecs0[:5] + 1)
            t.recent.add(updated)
        s._insert_locked(t, keys0[:20], vecs0[:20], before)  # rows read before the update
        np.testing.assert_array_equal(t.cache.contains(updated), np.zeros(5, bool))
        np.testing.assert_array_equal(t.cache.contains(kept), np.ones(15, bool))
        # a lookup that began just after the update, while a lagging tier still had the old
        # row, is inside the grace period: not cached either
        s._insert_locked(t, updated, vecs0[:5], (t.recent.epoch, time.monotonic()))
        assert not t.cache.contains(updated).any()
        # long after the update, rows are cached again
        t.recent.grace = 0.0
        s._insert_locked(t, updated, vecs0[:5] + 1, (t.recent.epoch, time.monotonic() + 1))
        assert t.cache.contains(updated).all()
        rows, hit = t.cache.find(updated)
        np.testing.assert_array_equal(rows, vecs0[:5] + 1)


@pytest.mark.parametrize("rate", [0.5, 1.0])
def test_a_key_twice_in_a_file_is_served_its_last_row_from_every_level(tmp_path, rate, caplog):
    """Later duplicates win, in the VDB as in RocksDB, also when the VDB takes only the
    file's first half (initial_cache_rate 0.5): it used to keep the first row of a key whose
    second copy lay past its share while RocksDB held the last."""
    tables = make_files(tmp_path, seed=11)
    keys, vecs = tables[0]
    n = len(keys)
    dup_keys = keys[[3, 10, n // 2 - 1]]  # in the first half; again at the end, other rows
    dup_vecs = np.full((3, vecs.shape[1]), 7.5, np.float32) + np.arange(3)[:, None]
    write_table(tmp_path / "t0_sparse_0.model", np.concatenate([keys, dup_keys]),
                np.concatenate([vecs, dup_vecs]))  # fmt: skip
    last = {int(k): v for k, v in zip(keys, vecs, strict=True)}
    last.update({int(k): v for k, v in zip(dup_keys, dup_vecs, strict=True)})
    want_keys = np.concatenate([dup_keys, keys[:50]])
    want = np.stack([last[int(k)] for k in want_keys])
    with caplog.at_level(logging.WARNING), ParameterServer(
        config(tmp_path, initial_cache_rate=rate)
    ) as ps:  # fmt: skip
        store = ps.session("m").tables[0].store_name
        got_vdb, found_vdb = ps.vdb.fetch(store, want_keys)
        got_pdb, found_pdb = ps.pdb.fetch(store, want_keys)
        assert found_pdb.all()
        np.testing.assert_array_equal(got_pdb, want)
        np.testing.assert_array_equal(got_vdb[found_vdb], want[found_vdb])
        assert found_vdb[:3].all()  # the duplicated keys are in the VDB's share
        np.testing.assert_array_equal(ps.lookup(want_keys, "m", 0), want)
    assert ("appear again later in the file" in caplog.text) == (rate < 1), caplog.text


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_online_updates_survive_a_restart(tmp_path, rate):
    """Updates reach the VDB and RocksDB; a restart loads the VDB again, and it used to take
    the model file's rows, answering with rows the updates had replaced (RocksDB, which is not
    reloaded while the file is unchanged, still held the new ones). A new model file brings
    the file's rows back everywhere."""
    from hps_core.updates.ingestor import TierSink

    tables = make_files(tmp_path, seed=13)
    keys, vecs = tables[0]
    cfg = config(tmp_path, initial_cache_rate=rate)
    upd_keys = keys[[0, 5, len(keys) - 1]]  # in the VDB's share and (rate 0.5) past it
    upd = np.full((3, vecs.shape[1]), 42.0, np.float32) + np.arange(3)[:, None]
    with ParameterServer(cfg) as ps:
        store = ps.session("m").tables[0].store_name
        for name, tier in (("pdb", ps.pdb), ("vdb", ps.vdb)):  # as the ingestor's sinks do
            TierSink(name, tier, {store: (vecs.shape[1], "float32")}).apply(store, upd_keys, upd)
    with ParameterServer(cfg) as ps:  # a restart: same files
        got, found = ps.vdb.fetch(store, upd_keys)
        np.testing.assert_array_equal(got[found], upd[found])
        assert found[:2].all()
        np.testing.assert_array_equal(ps.lookup(upd_keys, "m", 0), upd)
        np.testing.assert_array_equal(ps.lookup(keys[1:5], "m", 0), vecs[1:5])
    time.sleep(0.01)
    write_table(tmp_path / "t0_sparse_0.model", keys, vecs)  # a new model file (same rows)
    with ParameterServer(cfg) as ps:
        np.testing.assert_array_equal(ps.lookup(upd_keys, "m", 0), vecs[[0, 5, len(keys) - 1]])


def test_recent_updates_count_until_the_stores_apply_them_within_bounds(monkeypatch):
    """Past the grace an update counts while the stores' progress is below its version, up to
    ``hold`` seconds and MAX_HELD_KEYS keys (the oldest go first)."""
    from hps_core import session

    through = [0]
    r = session.RecentUpdates(grace=0.0, hold=60.0)
    r.progress = lambda: through[0]
    keys = np.arange(10, dtype=np.int64)
    r.add(keys[:5], version=7)
    time.sleep(0.01)
    since = (r.epoch, time.monotonic())  # a lookup that began after the update
    np.testing.assert_array_equal(r.fresh(keys, *since), np.arange(10) >= 5)
    assert not r.quiet(*since)
    through[0] = 7  # the stores applied it
    np.testing.assert_array_equal(r.fresh(keys, *since), np.ones(10, bool))
    assert r.quiet(*since)
    through[0] = 0
    r.hold = 0.0  # held too long: counts no more
    assert r.quiet(*since)
    r.hold = 60.0
    monkeypatch.setattr(session, "MAX_HELD_KEYS", 8)
    time.sleep(1.05)  # the first entry is past grace + 1 s, so it may go
    r.add(keys[5:10], version=8)  # 10 keys held > 8: the oldest update goes
    since = (r.epoch, time.monotonic() + 0.01)
    np.testing.assert_array_equal(r.fresh(keys, *since), np.arange(10) < 5)
