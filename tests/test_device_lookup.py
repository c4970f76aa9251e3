"""The device-resident lookup (``hps_core/device.py``) against per-table lookups and the files.

On a GPU the path runs over CuPy with ``GPUCache`` L1s (``tests/cache/test_gpu_session.py``).
Its steps are written against an array module, and host caches write hits into ``out`` in
place as GPU caches do, so here the same code runs over NumPy with ``HostCache`` L1s: the same
vectors, the same cache slots and counters as per-table lookups, request after request."""

from __future__ import annotations

import numpy as np
import pytest
from test_fused import assert_same_state, make_files, reference, request
from test_fused import config as fused_config
from three_tables import DEFAULTS

from hps_core import ParameterServer
from hps_core.cache.host import HostCache
from hps_core.device import DeviceLookup, is_gpu_cache
from hps_core.session import LookupSession, TableRuntime
from hps_core.vdb.hashmap import HashMapVDB


def config(*args):
    """test_fused's config with host caches, on a machine with a GPU too (CPU mode)."""
    cfg = fused_config(*args)
    cfg["models"][0]["deployed_device_list"] = []
    return cfg


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    return root, make_files(root)


def per_table_only(ps):
    s = ps.session("m")
    s.fused.run = lambda *a: None
    assert not s.device.eligible  # host caches: not served by the device path by default
    return s


@pytest.mark.parametrize(
    "policy,dtype,admit,threshold",
    [
        ("lru", "float32", 1, 1.0),  # synchronous fills
        ("lfu", "float32", 1, 1.0),
        ("lru", "float16", 1, 1.0),  # fp16 L1 rows
        ("lfu", "float32", 2, 1.0),  # admission filter
        ("lru", "float32", 1, 0.6),  # above the threshold: background fills
    ],
)
def test_device_path_matches_per_table_lookups(files, policy, dtype, admit, threshold):
    root, tables = files
    name = f"dev{policy}{dtype}{admit}{threshold}"
    dev, plain = (
        ParameterServer(config(root, name + s, policy, dtype, admit, threshold)) for s in "dp"
    )
    try:
        s = dev.session("m")
        s.device = DeviceLookup(s, xp=np)
        assert s.device.eligible
        s.fused.run = lambda *a: pytest.fail("the fused CPU path ran")
        p = per_table_only(plain)
        rng = np.random.default_rng(1)
        for ps in (dev, plain):  # a share of each table only in RocksDB, some keys in neither
            for t, (keys, _) in enumerate(tables):
                store = ps.session("m").tables[t].store_name
                ps.vdb.evict(store, keys[np.random.default_rng(t).random(len(keys)) < 0.1])
        for batch in [1, 1, 3, 17, 64, 250, 1, 2000, 5, 40]:
            cat = request(rng, tables, batch)
            got, want = s.lookup_columns(cat), p.lookup_columns(cat)
            np.testing.assert_array_equal(got, want)
            ref = np.concatenate([reference(tables, t, cat[:, t]) for t in range(3)], axis=1)
            if dtype == "float32":
                np.testing.assert_array_equal(got, ref)
            else:
                np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
            s.flush()
            p.flush()
            assert_same_state(dev, plain)
        # HPS I/O: concatenated keys with a count per table, a zero count included
        for counts in ([5, 0, 9], [1, 1, 1], [300, 20, 0]):
            keys = np.concatenate(
                [request(rng, tables, c)[:, t] for t, c in enumerate(counts)]
            ).astype(np.int64)
            got, st_got = s.lookup_concatenated(keys, np.array(counts))
            want, st_want = p.lookup_concatenated(keys, np.array(counts))
            np.testing.assert_array_equal(got, want)
            assert [(x.keys, x.unique_keys, x.hits) for x in st_got] == [
                (x.keys, x.unique_keys, x.hits) for x in st_want
            ]
            s.flush()
            p.flush()
            assert_same_state(dev, plain)
    finally:
        dev.close()
        plain.close()


def test_one_dim_tables_take_one_gather_and_a_table_without_l1_reads_below(files):
    """Tables of one dim are expanded by one gather over all of them (the ensemble's layout by
    a transpose); a table without L1 gets every key from the VDB, a key in no tier the table's
    default; counters as per-table lookups count them."""
    _, tables = files
    dim = 8
    vdb = HashMapVDB(num_partitions=2)
    data = []
    for t in range(3):
        keys = tables[t][0]
        vecs = np.random.default_rng(t).standard_normal((len(keys), dim)).astype(np.float32)
        vdb.create_table(f"t{t}", dim, capacity_hint=len(keys))
        vdb.upsert(f"t{t}", keys, vecs)
        data.append((keys, vecs))

    def session(device: bool) -> LookupSession:
        rts = [TableRuntime(f"t{t}", f"t{t}", dim, DEFAULTS[t], cache=HostCache(128, dim))
               for t in range(2)]  # fmt: skip
        rts.append(TableRuntime("t2", "t2", dim, DEFAULTS[2], cache=None))
        s = LookupSession("m", rts, vdb, None, hit_rate_threshold=1.0)
        if device:
            s.device = DeviceLookup(s, xp=np)
        else:
            s.fused.run = lambda *a: None
        return s

    dev, plain = session(True), session(False)
    try:
        rng = np.random.default_rng(9)
        for batch in (1, 7, 300, 5000):  # 5000 x 3 keys: the parallel dedupe
            cat = request(rng, data, batch)
            got = dev.lookup_columns(cat)
            ref = np.concatenate([reference(data, t, cat[:, t]) for t in range(3)], axis=1)
            np.testing.assert_array_equal(got, ref)
            np.testing.assert_array_equal(got, plain.lookup_columns(cat))
            flat = np.ascontiguousarray(cat.T).reshape(-1)
            counts = np.full(3, batch)
            got_c, _ = dev.lookup_concatenated(flat, counts)
            want_c = np.concatenate([reference(data, t, cat[:, t]).ravel() for t in range(3)])
            np.testing.assert_array_equal(got_c, want_c)
            plain.lookup_concatenated(flat, counts)
        sd, sp = [t.stats for t in dev.tables], [t.stats for t in plain.tables]
        assert [(a.requests, a.keys, a.unique_keys, a.hits) for a in sd] == [
            (b.requests, b.keys, b.unique_keys, b.hits) for b in sp
        ]
        assert sd[0].hits["l1"] > 0 and sd[2].hits["l1"] == 0 and sd[2].hits["default"] > 0
    finally:
        dev.close()
        plain.close()
        vdb.close()


def test_only_gpu_caches_pick_the_device_path_by_default(files):
    """Without an array module given, host caches keep the fused CPU path."""
    root, _ = files
    ps = ParameterServer(config(root, "pick", "lru", "float32", 1, 1.0))
    try:
        s = ps.session("m")
        assert not any(is_gpu_cache(t.cache) for t in s.tables)
        assert s.device.module() is None and s.fused.layout() is not None
    finally:
        ps.close()


def test_service_parameter_output_on_device(files, tmp_path):
    """``output_on_device`` of the hps backend: honoured only where the L1s are on a GPU (host
    caches here: host arrays, the same values); a value that is no flag names the parameter."""
    import json

    from hps_core.errors import ConfigError
    from hps_core.serving import EmbeddingService

    root, tables = files
    path = tmp_path / "hps.json"
    path.write_text(json.dumps(config(root, "svc", "lru", "float32", 1, 1.0)))
    params = {"config": str(path), "io": "slots", "output_on_device": "true"}
    svc = EmbeddingService.from_parameters(params)
    try:
        assert not svc.on_device
        cat = request(np.random.default_rng(6), tables, 40)
        (got,) = svc.run_slots([cat])
        assert isinstance(got, np.ndarray)
        ref = np.concatenate([reference(tables, t, cat[:, t]) for t in range(3)], axis=1)
        np.testing.assert_array_equal(got, ref)
    finally:
        svc.close()
    with pytest.raises(ConfigError, match="parameters.output_on_device"):
        EmbeddingService.from_parameters({**params, "output_on_device": "maybe"})


def test_a_failing_vdb_falls_through_to_the_pdb(files):
    """A VDB read that fails (a Redis node down, say) never fails a device-resident lookup:
    the keys come from RocksDB, the failure is counted once per table read."""
    from hps_core.errors import StorageError

    root, tables = files
    ps = ParameterServer(config(root, "vdbdown", "lru", "float32", 1, 1.0))
    try:
        s = ps.session("m")
        s.device = DeviceLookup(s, xp=np)

        def down(table, keys):
            raise StorageError(f"vdb fetch of {table}: connection refused")

        ps.vdb.fetch = down
        cat = request(np.random.default_rng(8), tables, 120)
        got = s.lookup_columns(cat)
        ref = np.concatenate([reference(tables, t, cat[:, t]) for t in range(3)], axis=1)
        np.testing.assert_array_equal(got, ref)
        stats = [t.stats for t in s.tables]
        assert all(x.errors["vdb"] == 1 and x.hits["vdb"] == 0 for x in stats)
        assert all(x.hits["pdb"] > 0 and x.seconds["pdb"] > 0 for x in stats)
    finally:
        ps.close()


def test_static_table_without_a_gpu_is_the_host_cache_at_gpucacheper(files, caplog):
    """``use_static_table`` asks for HPS's static table, a GPU structure: in CPU mode L1 stays
    the set-associative host cache at ``gpucacheper``, with a warning; lookups as ever."""
    import logging

    from hps_core.estimate import estimate_config
    from hps_core.server import l1_capacity

    root, tables = files
    cfg = config(root, "static_cpu", "lru", "float32", 1, 1.0)
    cfg["models"][0]["use_static_table"] = True
    with caplog.at_level(logging.WARNING):
        ps = ParameterServer(cfg)
    try:
        # one warning for the model, not one per table
        assert caplog.text.count("a static embedding table needs a GPU") == 1
        s = ps.session("m")
        m = ps.config.models[0]
        for t, (keys, _) in zip(s.tables, tables, strict=True):
            assert isinstance(t.cache, HostCache)
            assert l1_capacity(m, len(keys)) == int(np.ceil(0.05 * len(keys)))
        est = estimate_config(ps.config)
        assert [e.l1_device for e in est] == ["host"] * 3
        cat = request(np.random.default_rng(2), tables, 50)
        ref = np.concatenate([reference(tables, t, cat[:, t]) for t in range(3)], axis=1)
        np.testing.assert_array_equal(s.lookup_columns(cat), ref)
    finally:
        ps.close()


@pytest.mark.parametrize("dims", [(8, 8, 8), (8, 4, 16)])
def test_without_dedupe_every_key_is_looked_up_as_it_comes(files, dims):
    """The mode of static GPU tables: no host dedupe, no expansion gather; the same vectors,
    and counters that count every key occurrence (hits per level add up to the keys)."""
    _, tables = files
    vdb = HashMapVDB(num_partitions=2)
    data = []
    for t, dim in enumerate(dims):
        keys = tables[t][0]
        vecs = np.random.default_rng(t).standard_normal((len(keys), dim)).astype(np.float32)
        vdb.create_table(f"t{t}", dim, capacity_hint=len(keys))
        vdb.upsert(f"t{t}", keys, vecs)
        data.append((keys, vecs))
    rts = [TableRuntime(f"t{t}", f"t{t}", d, DEFAULTS[t], cache=HostCache(4096, d))
           for t, d in enumerate(dims)]  # fmt: skip
    s = LookupSession("m", rts, vdb, None, hit_rate_threshold=1.0)
    s.device = DeviceLookup(s, xp=np, dedupe=False)
    try:
        rng = np.random.default_rng(11)
        total = 0
        for batch in (1, 9, 300, 5000, 300):
            cat = request(rng, data, batch)
            total += 2 * batch
            ref = [reference(data, t, cat[:, t]) for t in range(3)]
            np.testing.assert_array_equal(s.lookup_columns(cat), np.concatenate(ref, axis=1))
            flat = np.ascontiguousarray(cat.T).reshape(-1)
            got, st = s.lookup_concatenated(flat, np.full(3, batch))
            np.testing.assert_array_equal(got, np.concatenate([r.ravel() for r in ref]))
            assert [x.keys for x in st] == [x.unique_keys for x in st] == [batch] * 3
            s.flush()
        for t in s.tables:
            st = t.stats
            assert st.keys == st.unique_keys == sum(st.hits.values()) == total
            assert st.hits["l1"] > 0 and st.hits["vdb"] > 0 and st.hits["default"] > 0
        # keys of a request laid out neither row by row nor table after table
        keys = np.concatenate([request(rng, data, 20)[:, t] for t in range(3)])
        spread = np.zeros(3 * len(keys), np.int64)
        spread[::3] = keys
        got, _ = s.device.run(spread, np.array([0, 60, 120]), np.full(3, 3), np.full(3, 20), False)
        want = np.concatenate(
            [reference(data, t, keys[20 * t : 20 * t + 20]).ravel() for t in range(3)]
        )
        np.testing.assert_array_equal(got, want)
    finally:
        s.close()
        vdb.close()
