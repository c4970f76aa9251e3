"""A Redis node killed, restarted or stalled mid-stream never fails a lookup."""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import numpy as np
import pytest
from served_model import make_model, reference, server_config

from hps_core import ParameterServer, StorageError
from hps_core.metrics import REGISTRY

pytestmark = pytest.mark.redis


def lookups(ps, keys, vecs, rng, seconds: float) -> int:
    """Look up random batches for ``seconds``; every result must equal the reference."""
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        q = np.concatenate([rng.choice(keys, 200), [3, 4]])
        np.testing.assert_array_equal(ps.lookup(q, "m", "t0"), reference(keys, vecs, q))
        n += 1
    return n


def test_node_killed_restarted_and_stalled(redis_cluster_own, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="hps_core.vdb.redis")
    keys, vecs = make_model(tmp_path, rows=4000)
    cfg = server_config(
        tmp_path,
        redis_cluster_own.address,
        socket_timeout_ms=300,
        connect_timeout_ms=200,
        reconnect_backoff_ms=50,
        reconnect_backoff_max_ms=400,
    )
    cfg["models"][0]["gpucache"] = False  # every lookup goes to the VDB
    (tmp_path / "hps.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    victim, stalled = redis_cluster_own.ports[1], redis_cluster_own.ports[2]
    name = f"127.0.0.1:{victim}"
    outages = REGISTRY.counter("hps_vdb_redis_outages_total", "", ("node",))
    before = outages.value(node=name)
    unavailable = REGISTRY.counter("hps_vdb_redis_unavailable_keys_total", "", ("table",))
    missed = unavailable.value(table="hps_et.m.t0")
    with ParameterServer(tmp_path / "hps.json") as ps:
        stats = ps.session("m").tables[0].stats
        lookups(ps, keys, vecs, rng, 0.3)
        assert stats.hits["pdb"] == 0  # everything is in the VDB

        redis_cluster_own.kill(victim)  # mid-stream: lookups go on
        n = lookups(ps, keys, vecs, rng, 1.5)
        assert n > 5 and ps.vdb.node_down(name)
        assert stats.hits["pdb"] > 0  # the dead node's keys came from RocksDB
        assert outages.value(node=name) == before + 1
        assert unavailable.value(table="hps_et.m.t0") > missed  # counted, not raised
        down_logs = [r for r in caplog.records if name in r.message and "is down" in r.message]
        assert len(down_logs) == 1  # once per outage, not per request

        redis_cluster_own.start(victim)  # back, empty (no persistence)
        deadline = time.monotonic() + 10
        while ps.vdb.node_down(name) and time.monotonic() < deadline:
            lookups(ps, keys, vecs, rng, 0.1)
        assert not ps.vdb.node_down(name)
        while True:  # refill once the cluster has seen the node back (writers retry)
            try:
                ps.vdb.upsert("hps_et.m.t0", keys, vecs)
                break
            except StorageError:
                assert time.monotonic() < deadline + 10
                lookups(ps, keys, vecs, rng, 0.1)
        got, found = ps.vdb.fetch("hps_et.m.t0", keys)
        assert found.all()
        np.testing.assert_array_equal(got, vecs)
        pdb_before = stats.hits["pdb"]
        lookups(ps, keys, vecs, rng, 0.3)
        assert stats.hits["pdb"] == pdb_before  # served by the VDB again

        pid = int((redis_cluster_own.root / str(stalled) / "redis.pid").read_text())
        os.kill(pid, signal.SIGSTOP)  # a node that accepts connections but never answers
        try:
            lookups(ps, keys, vecs, rng, 1.2)
            assert ps.vdb.node_down(f"127.0.0.1:{stalled}")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert stats.errors["vdb"] == 0  # the VDB itself never raised into the lookup


def test_standalone_server_killed_and_restarted(redis_standalone_own, tmp_path):
    keys, vecs = make_model(tmp_path, rows=2000)
    cfg = server_config(
        tmp_path,
        redis_standalone_own.address,
        socket_timeout_ms=300,
        connect_timeout_ms=200,
        reconnect_backoff_ms=50,
        reconnect_backoff_max_ms=200,
    )
    cfg["models"][0]["gpucache"] = False
    rng = np.random.default_rng(1)
    (port,) = redis_standalone_own.ports
    with ParameterServer(cfg) as ps:
        stats = ps.session("m").tables[0].stats
        redis_standalone_own.kill(port)
        lookups(ps, keys, vecs, rng, 0.5)  # everything from RocksDB now
        assert ps.vdb.node_down(f"127.0.0.1:{port}") and stats.errors["vdb"] == 0
        served = stats.hits["pdb"]
        assert served > 0
        with pytest.raises(StorageError, match=f"127.0.0.1:{port}"):
            ps.vdb.upsert("hps_et.m.t0", keys[:5], vecs[:5])  # a write names the node
        redis_standalone_own.start(port)
        deadline = time.monotonic() + 10
        while ps.vdb.node_down(f"127.0.0.1:{port}"):
            assert time.monotonic() < deadline
            lookups(ps, keys, vecs, rng, 0.05)
        # The restarted server is empty and has no table metadata: a writer re-creates it.
        ps.vdb.create_table("hps_et.m.t0", 8)
        ps.vdb.upsert("hps_et.m.t0", keys, vecs)
        before = stats.hits["pdb"]
        lookups(ps, keys, vecs, rng, 0.3)
        assert stats.hits["pdb"] == before and stats.hits["vdb"] > 0
