"""Online updates: HCTR codec, publish -> ingest into VDB/PDB/L1, dead letters, crash recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from served_model import make_model, reference, server_config
from small_tmpfs import in_small_tmpfs

from hps_core import ParameterServer, StorageError
from hps_core.metrics import REGISTRY, Registry
from hps_core.model_io import write_table
from hps_core.pdb.rocksdb import RocksDBPDB
from hps_core.updates import MalformedMessage, Publisher, connect, decode, encode
from hps_core.updates.ingestor import Ingestor, TierSink, _Batch
from hps_core.updates.versions import VersionStore, version_of
from hps_core.vdb.redis import RedisVDB

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[2]


def test_codec_is_hps_kafka_layout():
    (p,) = encode([5, -1], np.array([[1.0, 2.0], [3.0, -4.0]], np.float32))
    expect = (
        b"HCTR"
        + (8).to_bytes(4, "little")
        + (5).to_bytes(8, "little", signed=True)
        + np.array([1, 2], "<f4").tobytes()
        + (-1).to_bytes(8, "little", signed=True)
        + np.array([3, -4], "<f4").tobytes()
    )
    assert p == expect
    rows = decode(p, 2)
    np.testing.assert_array_equal(rows.keys, [5, -1])
    np.testing.assert_array_equal(rows.vectors, [[1, 2], [3, -4]])
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    parts = encode(np.arange(300), x, "float16", max_bytes=1000)
    assert len(parts) > 1 and all(len(q) <= 1000 for q in parts)
    got = np.concatenate([decode(q, 8, "float16").vectors for q in parts])
    with pytest.raises(MalformedMessage, match="need the entry field dtype=float16"):
        decode(parts[0], 8)  # fp16 rows of width 8 or fp32 rows of width 4: the entry says
    np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
    assert decode(encode([], np.zeros((0, 8)))[0], 8).keys.size == 0  # a beacon
    # encode's input: float keys were truncated (3.7 -> 3), fp16 overflow became inf (then
    # dead-lettered), and a max_bytes under one row was exceeded
    from hps_core.errors import InvalidInputError

    for args, kw, field in [
        ((np.array([3.7]), np.ones((1, 2))), {}, "'keys'"),
        (([1], np.full((1, 2), 1e6)), {"dtype": "float16"}, "65504"),
        (([1, 2], np.ones((1, 2))), {}, "'vectors'"),
        (([1], np.ones((1, 300))), {"max_bytes": 100}, "'max_bytes' = 100"),
    ]:
        with pytest.raises(InvalidInputError, match=field):
            encode(*args, **kw)
    for bad, why in [
        (b"HCT", "shorter than"),
        (b"XXXX" + p[4:], "bad magic"),
        (p[:-1], "whole number"),
        (b"HCTR" + (12).to_bytes(4, "little"), "value size 12"),
    ]:
        with pytest.raises(MalformedMessage, match=why):
            decode(bad, 2)


def wait_for(cond, seconds=10.0):
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_server_applies_updates_to_vdb_pdb_and_l1(redis_standalone, tmp_path):
    redis_standalone.flush()
    keys, vecs = make_model(tmp_path, rows=2000)
    cfg = server_config(tmp_path, redis_standalone.address)
    cfg["models"][0]["gpucacheper"] = 0.5
    cfg["update_source"] = {
        "type": "redis_stream",
        "brokers": redis_standalone.address,
        "poll_timeout_ms": 50,
    }
    rng = np.random.default_rng(2)
    fresh = REGISTRY.histogram("hps_update_freshness_seconds", "", ("group",))
    seen = fresh.count(group="hps:all")
    with ParameterServer(cfg) as ps:
        t = ps.session("m").tables[0]
        hot = keys[:50]
        ps.lookup(hot, "m", "t0")  # now in L1
        assert t.cache.contains(hot).all()
        upd_keys = np.concatenate([hot, keys[1000:1100], [123456789]])  # cached, not, new
        upd = rng.standard_normal((len(upd_keys), 8)).astype(np.float32)
        pub = Publisher(connect(redis_standalone.address))
        pub.publish("hps_et.m.t0", upd_keys, upd)
        assert len(ps.ingestors) == 2  # the stores' group and this process's own (L1)
        wait_for(lambda: all(i.lag() == 0 for i in ps.ingestors))
        index = {k: i for i, k in enumerate(keys.tolist())}
        new = vecs.copy()
        new[[index[k] for k in upd_keys[:-1].tolist()]] = upd[:-1]
        q = np.concatenate([upd_keys, keys[:300]])
        expect = reference(keys, new, q)
        expect[len(upd_keys) - 1] = upd[-1]
        np.testing.assert_array_equal(ps.lookup(q, "m", "t0"), expect)
        got, hit = t.cache.find(hot)  # the cached rows themselves were overwritten
        assert hit.all()
        np.testing.assert_array_equal(got, upd[:50])
        for tier in (ps.vdb, ps.pdb):
            got, found = tier.fetch("hps_et.m.t0", upd_keys)
            assert found.all()
            np.testing.assert_array_equal(got, upd)
        assert fresh.count(group="hps:all") > seen
        assert 0 < fresh.quantile(0.99, group="hps:all") < 5
        own = ps.ingestors[1].group
    text = REGISTRY.export_prometheus()
    assert 'hps_update_freshness_seconds_bucket{group="hps:all",le="+Inf"}' in text
    assert 'hps_update_freshness_seconds_count{group="hps:proc"}' in text
    groups = connect(redis_standalone.address).xinfo_groups("hps_updates")
    assert own not in [g["name"].decode() for g in groups]  # deleted at close


class FlakySink(TierSink):
    """A real VDB sink that fails its first ``fail`` writes (a store that is briefly down, or
    with ``error`` another exception: a bug in a sink must not end the updates either)."""

    def __init__(self, tier, fail, error=None):
        super().__init__("vdb", tier)
        self.fail = fail
        self.error = error or StorageError("store briefly unavailable")

    def apply(self, table, keys, vectors):
        if self.fail:
            self.fail -= 1
            raise self.error
        super().apply(table, keys, vectors)


def test_an_unexpected_error_in_a_round_is_retried_not_the_end_of_updates(redis_standalone):
    redis_standalone.flush()
    client = connect(redis_standalone.address)
    vdb = RedisVDB(redis_standalone.address, num_partitions=2)
    vdb.create_table("hps_et.m.u", 4)
    sink = FlakySink(vdb, fail=2, error=ZeroDivisionError("a bug"))
    ing = Ingestor(client, [sink], None, stream="upd_bug", group="g", block_ms=20,
                   registry=Registry())  # fmt: skip
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    Publisher(client, "upd_bug").publish("hps_et.m.u", [7, -7, 2**62], rows)
    ing.start()
    try:
        wait_for(lambda: ing.lag() == 0)
    finally:
        ing.stop()
    assert sink.fail == 0 and ing.failures.value(group="g") == 2
    got, found = vdb.fetch("hps_et.m.u", [7, -7, 2**62])
    assert found.all()
    np.testing.assert_array_equal(got, rows)
    vdb.close()


def test_dead_letters_retries_and_no_rollback(redis_any):
    addr = redis_any.address
    client = connect(addr)
    vdb = RedisVDB(addr, num_partitions=4)
    vdb.create_table("hps_et.m.t", 4)
    pub = Publisher(client, "upd")
    sink = FlakySink(vdb, fail=2)
    ing = Ingestor(client, [sink], VersionStore(vdb, "g"), stream="upd", group="g", block_ms=20)
    good = np.arange(8, dtype=np.float32).reshape(2, 4)
    nan = good.copy()
    nan[1, 2] = np.nan
    ok1 = pub.publish("hps_et.m.t", [1, 2], good)
    pub.publish_raw("hps_et.m.t", b"KFKA" + encode([1], good[:1])[0][4:])
    pub.publish_raw("hps_et.m.t", encode([1], good[:1])[0][:-3])
    pub.publish("hps_et.m.t", [1, 2], nan)
    pub.publish("hps_et.other", [1], good[:1])
    pub.publish_raw("hps_et.m.t", b"HCTR" + (12).to_bytes(4, "little"))  # wrong value size
    client.xadd("upd", {"table": "hps_et.m.t"})  # no payload
    # each of these used to fail every round and hold up all later entries, or drop its rows
    row = encode([9], good[:1])[0]
    client.xadd("upd", {"table": "hps_et.m.t", "payload": row, "ts_ns": "abc"})
    client.xadd("upd", {"table": b"\xff\xfe", "payload": row})
    half = encode([9], good[:1, :2])[0]  # fp32 rows of width 2: fp16's value size for width 4
    client.xadd("upd", {"table": "hps_et.m.t", "payload": half})
    pub.publish("hps_et.m.t", [4], good[:1] + 20, dtype="float16")  # marked: applied
    ok2 = pub.publish("hps_et.m.t", [2, 3], good + 10)
    # an ID from 2039 on was dead-lettered (versions were ms << 22), and from 2248 on (or set by
    # hand) an ID has no int64 version: it used to wrap negative and its rows were dropped in
    # silence (as every later entry's: XADD IDs only grow)
    client.xadd("upd", {"table": "hps_et.m.t", "payload": row}, id="2199023255552-0")
    late = encode([10], good[1:])[0]
    client.xadd("upd", {"table": "hps_et.m.t", "payload": late}, id=f"{1 << 43}-0")
    for _ in range(20):
        ing.step(20)
        if ing.lag() == 0:
            break
    assert ing.lag() == 0 and sink.fail == 0  # two failed rounds were retried from pending
    got, found = vdb.fetch("hps_et.m.t", [1, 2, 3, 4, 9, 10])
    assert found[:5].all() and not found[5]
    np.testing.assert_array_equal(
        got[:5], [good[0], good[0] + 10, good[1] + 10, good[0] + 20, good[0]]
    )
    dead = client.xrange("upd:dead")
    reasons = [e[1][b"reason"].decode() for e in dead]
    assert len(reasons) == 10
    for why in [
        "bad magic",
        "whole number",
        "NaN",
        "unknown table 'hps_et.other'",
        "value size 12",
        "ts_ns 'abc' is not an integer",
        "not UTF-8",
        "dtype=float16",
        f"entry ID '{1 << 43}-0': milliseconds past {(1 << 43) - 1}",
    ]:
        assert any(why in r for r in reasons), (why, reasons)
    assert any("no 'payload'" in r for r in reasons)
    assert all(e[1][b"group"] == b"g" for e in dead)
    # A re-delivered older entry (version of ok1) must not roll key 2 back from ok2's row.
    old = _Batch([np.array([2])], [good[1:2]], [np.array([version_of(ok1[0])])])
    ing._apply("hps_et.m.t", old)
    np.testing.assert_array_equal(vdb.fetch("hps_et.m.t", [2])[0], good[:1] + 10)
    assert version_of(ok2[0]) > version_of(ok1[0])
    # versions keep the IDs' order up to the last millisecond that has one
    ids = [ok1[0], ok2[0], "2199023255552-0", "4102444800000-4", "4102444800000-5"]
    ids += [f"{(1 << 43) - 1}-0", f"{(1 << 43) - 1}-{(1 << 20) - 1}"]
    vers = [version_of(i) for i in ids]
    assert vers == sorted(set(vers)) and 0 < vers[0] and vers[-1] == (1 << 63) - 1
    vdb.close()


def test_versions_of_the_earlier_encoding_are_dropped(redis_any):
    """Hashes of the earlier encoding (ms << 22) outrank every version of today's: a store
    upgraded in place must delete them, or hold them for good."""
    addr = redis_any.address
    client = connect(addr)
    vdb = RedisVDB(addr, num_partitions=4)
    vdb.create_table("hps_et.m.v", 4)
    old = [f"hps_ver{{g/hps_et.m.v/p{p}}}" for p in range(16)]
    later = (int(time.time() * 1000) + 60_000) << 22  # a row written "later" than now
    for hk in old:
        client.hset(hk, np.int64(3).tobytes(), np.int64(later).tobytes())
    ing = Ingestor(
        client,
        [TierSink("vdb", vdb, {"hps_et.m.v": (4, "float32")})],
        VersionStore(vdb, "g"),
        stream="vupd",
        group="g",
        block_ms=20,
    )
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    Publisher(client, "vupd").publish("hps_et.m.v", [3, 4], rows)
    for _ in range(20):
        ing.step(20)
        if ing.lag() == 0:
            break
    assert ing.lag() == 0
    got, found = vdb.fetch("hps_et.m.v", [3, 4])
    assert found.all()
    np.testing.assert_array_equal(got, rows)
    assert client.exists(*old) == 0
    assert len(VersionStore(vdb, "g").epochs("hps_et.m.v")) == 1  # the new versions
    vdb.close()


def test_the_pdb_is_flushed_when_updates_stop(redis_any, tmp_path):
    """The PDB's timed flush ran only as rows arrived: after the last update each serving
    process (a RocksDB secondary) held its replay of up to ``flush_bytes`` of rows for good."""
    addr = redis_any.address
    client = connect(addr)
    table, dim = "hps_et.m.f", 8
    pdb = RocksDBPDB(str(tmp_path / "rocks"))
    pdb.create_table(table, dim)
    sec = RocksDBPDB(str(tmp_path / "rocks"), secondary_path=str(tmp_path / "sec"))
    sink = TierSink("pdb", pdb, {table: (dim, "float32")}, flush_bytes=1 << 40, flush_seconds=0.5)
    ing = Ingestor(client, [sink], None, stream="fupd", group="g", block_ms=20)
    rng = np.random.default_rng(5)
    keys = rng.integers(-(2**62), 2**62, 100_000)
    vecs = rng.standard_normal((len(keys), dim)).astype(np.float32)
    pub = Publisher(client, "fupd")
    for s in range(0, len(keys), 10_000):
        pub.publish(table, keys[s : s + 10_000], vecs[s : s + 10_000])
    while ing.step(20):
        pass
    assert ing.lag() == 0
    sec.catch_up()
    held = sec.memtable_bytes(table)
    assert held > 4 << 20, held  # the rows, replayed
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert ing.step(20) == 0  # no entries: the sink's timer still runs
        sec.catch_up()
        if sec.memtable_bytes(table) < held / 4:
            break
    assert sec.memtable_bytes(table) < held / 4, (sec.memtable_bytes(table), held)
    got, found = sec.fetch(table, keys)
    assert found.all()
    np.testing.assert_array_equal(got, vecs)
    sec.close()
    pdb.close()


def test_row_versions_by_epoch_and_pruned_through_a_version(redis_any):
    """Versions are kept per epoch of entry time; ``prune`` removes whole epochs whose versions
    are all at most the given one, and reads see the newest version over the epochs left."""
    vdb = RedisVDB(redis_any.address, num_partitions=4)
    vs = VersionStore(vdb, "g", epoch_ms=1000)
    table, keys = "hps_et.m.e", np.arange(-500, 500, dtype=np.int64)
    v1, v2, v3 = version_of("10000-0"), version_of("12500-3"), version_of("12600-0")
    vs.put(table, keys[:500], np.full(500, v1))
    vs.put(table, keys[500:], np.full(500, v2))
    vs.put(table, keys[:1], np.array([v3]))  # key -500 in epochs 10 and 12
    assert vs.epochs(table) == [10, 12]
    want = np.r_[v3, np.full(499, v1), np.full(500, v2)]
    np.testing.assert_array_equal(vs.get(table, keys), want)
    np.testing.assert_array_equal(vs.get(table, keys, since=v2), np.where(want == v1, 0, want))
    assert vs.prune(version_of("10999-0")) == 0  # epoch 10 may still get 10999-1
    assert vs.prune((11_000 << 20) - 1) == 1
    assert vs.epochs(table) == [12]
    np.testing.assert_array_equal(vs.get(table, keys), np.where(want == v1, 0, want))
    client = connect(redis_any.address)
    assert client.exists(*[vs._hkey(table, p, 10) for p in range(16)]) == 0
    assert client.exists(*[vs._hkey(table, p, 12) for p in range(16)]) > 0
    assert vs.prune(version_of("99999-0")) == 1 and vs.epochs(table) == []
    np.testing.assert_array_equal(vs.get(table, keys), np.zeros(len(keys), np.int64))
    vdb.close()


def test_the_ingestor_prunes_versions_no_entry_can_undercut(redis_standalone):
    """Versions were kept for every key ever updated (72 B each in Redis). The ingestor prunes
    those older than its group's progress of ``2 * stale_batch_s`` ago; the rows stay equal
    to the last ones published, and the latest epoch is kept."""
    redis_standalone.flush()
    client = connect(redis_standalone.address)
    vdb = RedisVDB(redis_standalone.address, num_partitions=2)
    table = "hps_et.m.p"
    vdb.create_table(table, 4)
    vs = VersionStore(vdb, "g", epoch_ms=200)
    ing = Ingestor(client, [TierSink("vdb", vdb)], vs, stream="pupd", group="g", block_ms=20,
                   stale_batch_s=0.1, prune_every_s=0.05, registry=Registry())  # fmt: skip
    pub, keys = Publisher(client, "pupd"), np.arange(100)
    ids = []
    for r in range(6):
        ids += pub.publish(table, keys, np.full((100, 4), r, np.float32))
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            ing.step(20)
    deadline = time.monotonic() + 10
    while len(vs.epochs(table)) > 1 and time.monotonic() < deadline:
        ing.step(20)
    assert vs.epochs(table) == [vs.epoch(version_of(ids[-1]))]
    first = vs.epoch(version_of(ids[0]))
    assert client.exists(*[vs._hkey(table, p, first) for p in range(16)]) == 0
    got, found = vdb.fetch(table, keys)
    assert found.all()
    np.testing.assert_array_equal(got, np.full((100, 4), 5, np.float32))
    np.testing.assert_array_equal(vs.get(table, keys), np.full(100, version_of(ids[-1])))
    vdb.close()


class SlowSink(TierSink):
    """A real VDB sink that stalls ``pause`` seconds after its first write of table ``table``
    (a slow store, or a process paused between the tables of a batch)."""

    def __init__(self, tier, table, pause):
        super().__init__("vdb", tier)
        self.table, self.pause = table, pause

    def apply(self, table, keys, vectors):
        super().apply(table, keys, vectors)
        if table == self.table:
            time.sleep(self.pause)
            self.pause = 0


def _two_tables(redis_standalone, stream):
    redis_standalone.flush()
    client = connect(redis_standalone.address)
    vdb = RedisVDB(redis_standalone.address, num_partitions=2)
    for t in ("hps_et.m.a", "hps_et.m.b"):
        vdb.create_table(t, 4)
    return client, vdb, Publisher(client, stream), np.arange(8, dtype=np.float32).reshape(2, 4)


def test_a_slow_batch_whose_entries_are_still_pending_goes_on(redis_standalone, caplog):
    """A batch held past ``stale_batch_s`` whose entries no other consumer took is claimed
    again and applied in the same round: a slow store never makes it start over for good."""
    client, vdb, pub, rows = _two_tables(redis_standalone, "supd")
    ing = Ingestor(client, [SlowSink(vdb, "hps_et.m.a", 0.5)], VersionStore(vdb, "g"),
                   stream="supd", group="g", block_ms=20, stale_batch_s=0.3,
                   registry=Registry())  # fmt: skip
    pub.publish("hps_et.m.a", [1, 2], rows)
    pub.publish("hps_et.m.b", [1, 2], rows + 1)
    assert ing.step(20) == 2 and ing.lag() == 0
    assert "dropped" not in caplog.text
    for t, want in (("hps_et.m.a", rows), ("hps_et.m.b", rows + 1)):
        got, found = vdb.fetch(t, [1, 2])
        assert found.all()
        np.testing.assert_array_equal(got, want)
    vdb.close()


def test_a_paused_consumer_whose_batch_another_applied_does_not_roll_rows_back(
    redis_standalone, caplog
):
    """Consumer A reads two entries and stalls in the middle of them. B claims both, applies
    them and a newer row for table b, acknowledges, and prunes the versions (epochs of 1 ms,
    pruned through where the group stood 0.4 s before). A, resumed, must not write its older
    rows of table b: the version that refused them is gone, so it drops the batch."""
    client, vdb, pub, rows = _two_tables(redis_standalone, "cupd")

    def ingestor(sinks, name, **kw):
        return Ingestor(client, sinks, VersionStore(vdb, "g", epoch_ms=1), stream="cupd",
                        group="g", consumer=name, block_ms=20, stale_batch_s=0.2,
                        registry=Registry(), **kw)  # fmt: skip

    a = ingestor([SlowSink(vdb, "hps_et.m.a", 2.0)], "a")
    b = ingestor([TierSink("vdb", vdb)], "b", claim_idle_ms=100, prune_every_s=0.05)
    pub.publish("hps_et.m.a", [1, 2], rows)
    pub.publish("hps_et.m.b", [1, 2], rows + 1)
    stalled = threading.Thread(target=a.step, args=(20,))
    stalled.start()  # A writes table a, then stalls 2 s before table b's version check
    time.sleep(0.3)
    assert b.step(20) == 2  # claimed from A
    pub.publish("hps_et.m.b", [1, 2], rows + 10)
    time.sleep(0.01)
    pub.publish("hps_et.m.a", [1, 2], rows + 20)  # the group's progress moves past table b's
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:
        b.step(20)
    assert b.versions.epochs("hps_et.m.b") == []  # pruned
    stalled.join()
    for t, want in (("hps_et.m.a", rows + 20), ("hps_et.m.b", rows + 10)):
        got, found = vdb.fetch(t, [1, 2])
        assert found.all()
        np.testing.assert_array_equal(got, want)
    assert "applied by another consumer meanwhile: dropped" in caplog.text
    assert a.lag() == 0
    vdb.close()


INGEST = r"""
import sys
from hps_core.cli import main
sys.exit(main(["ingest", sys.argv[1], "--consumer", sys.argv[2], "--seconds", "60"]))
"""


def test_ingestor_killed_and_restarted_loses_and_rolls_back_nothing(redis_cluster, tmp_path):
    redis_cluster.flush()
    addr = redis_cluster.address
    cfg = server_config(tmp_path, addr)
    cfg["update_source"] = {
        "type": "redis_stream",
        "brokers": addr,
        "poll_timeout_ms": 50,
        "claim_idle_ms": 300,
        "max_batch_size": 4,
    }
    (tmp_path / "hps.json").write_text(json.dumps(cfg))
    table, dim = "hps_et.m.t0", 8
    vdb = RedisVDB(addr, num_partitions=6)
    vdb.create_table(table, dim)
    pdb = RocksDBPDB(str(tmp_path / "rocks"))
    pdb.create_table(table, dim)
    pdb.close()
    client = connect(addr)
    pub = Publisher(client)
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def ingestor(consumer: str) -> subprocess.Popen:
        cmd = [sys.executable, "-c", INGEST, str(tmp_path / "hps.json"), consumer]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    rng = np.random.default_rng(5)
    latest: dict[int, np.ndarray] = {}
    batches = 60
    killed = threading.Event()

    def publish_all():
        for i in range(batches):
            if i == 20:
                killed.wait(60)  # the rest is published while no ingestor runs, then after
            k = rng.integers(0, 3000, 500)  # keys recur across batches: the last one must win
            x = rng.standard_normal((500, dim)).astype(np.float32) + i
            pub.publish(table, k, x)
            latest.update(zip(k.tolist(), x, strict=True))
            time.sleep(0.01)

    def acked() -> int:
        """Entries of the group delivered and acknowledged (exact, unlike XINFO entries-read)."""
        if not client.exists("hps_updates"):
            return 0
        groups = client.xinfo_groups("hps_updates")
        if not groups:
            return 0
        last = groups[0]["last-delivered-id"]
        delivered = len(client.xrange("hps_updates", "-", last)) if last != b"0-0" else 0
        return delivered - int(groups[0]["pending"])

    first = ingestor("c1")
    producer = threading.Thread(target=publish_all)
    producer.start()
    try:
        wait_for(lambda: acked() >= 4, 30)
        first.send_signal(signal.SIGKILL)  # mid-stream, possibly mid-batch
        first.wait(10)
        killed.set()
        done_by_first = acked()
        assert 4 <= done_by_first <= 20 < batches  # 40 more entries come after the kill
        second = ingestor("c2")  # another consumer: takes over c1's pending entries
        producer.join(30)
        try:
            wait_for(lambda: acked() == batches, 30)
        finally:
            second.send_signal(signal.SIGINT)
            assert second.wait(20) == 0, second.stderr.read().decode()[-2000:]
    finally:
        killed.set()
        if first.poll() is None:
            first.kill()
        producer.join(30)
    consumers = {c["name"].decode(): c for c in client.xinfo_consumers("hps_updates", "hps:all")}
    assert set(consumers) == {"c1", "c2"} and consumers["c1"]["pending"] == 0
    assert acked() == client.xlen("hps_updates") == batches > done_by_first
    keys = np.array(sorted(latest))
    expect = np.array([latest[k] for k in keys.tolist()])
    got, found = vdb.fetch(table, keys)
    assert found.all()
    np.testing.assert_array_equal(got, expect)
    pdb = RocksDBPDB(str(tmp_path / "rocks"))
    got, found = pdb.fetch(table, keys)
    pdb.close()
    assert found.all()
    np.testing.assert_array_equal(got, expect)
    vdb.close()


def test_publish_command_writes_hctr_entries(redis_standalone, tmp_path):
    from hps_core.cli import main

    redis_standalone.flush()
    rng = np.random.default_rng(4)
    keys = rng.integers(-(2**62), 2**62, 700)
    vecs = rng.standard_normal((700, 16)).astype(np.float32)
    np.savez(tmp_path / "rows.npz", keys=keys, vectors=vecs)
    args = ["--redis", redis_standalone.address, "--table", "hps_et.m.t", "--stream", "s"]
    assert main(["publish", *args, "--npz", str(tmp_path / "rows.npz")]) == 0
    entries = connect(redis_standalone.address).xrange("s")
    assert {e[1][b"table"] for e in entries} == {b"hps_et.m.t"}
    rows = [decode(e[1][b"payload"], 16) for e in entries]
    np.testing.assert_array_equal(np.concatenate([r.keys for r in rows]), keys)
    np.testing.assert_array_equal(np.concatenate([r.vectors for r in rows]), vecs)
    assert main(["publish", *args]) == 2  # neither --npz nor --random: an error, not a crash


def test_process_local_hash_map_vdb_gets_every_update(redis_standalone, tmp_path):
    """An in-process VDB is this process's own: its group sees every entry (as L1 does)."""
    redis_standalone.flush()
    keys, vecs = make_model(tmp_path, rows=1000)
    cfg = server_config(tmp_path, redis_standalone.address)
    cfg["volatile_db"] = {"type": "parallel_hash_map", "num_partitions": 2}
    cfg["models"][0]["gpucache"] = False
    cfg["update_source"] = {
        "type": "redis_stream",
        "brokers": redis_standalone.address,
        "poll_timeout_ms": 50,
    }
    upd = np.random.default_rng(6).standard_normal((100, 8)).astype(np.float32)
    with ParameterServer(cfg) as ps:
        groups = [i.group for i in ps.ingestors]
        assert groups[0] == "hps:all" and groups[1].startswith("hps:proc:")
        assert [s.name for s in ps.ingestors[0].sinks] == ["pdb"]
        assert [s.name for s in ps.ingestors[1].sinks] == ["vdb"]
        Publisher(connect(redis_standalone.address)).publish("hps_et.m.t0", keys[:100], upd)
        wait_for(lambda: all(i.lag() == 0 for i in ps.ingestors))
        np.testing.assert_array_equal(ps.lookup(keys[:100], "m", "t0"), upd)
        np.testing.assert_array_equal(ps.vdb.fetch("hps_et.m.t0", keys[:100])[0], upd)
        np.testing.assert_array_equal(ps.pdb.fetch("hps_et.m.t0", keys[:100])[0], upd)
        np.testing.assert_array_equal(ps.lookup(keys[100:], "m", "t0"), vecs[100:])


INGEST_DISK_FULL = r"""
import json, os, sys
import numpy as np
import redis
from small_tmpfs import grow
from hps_core.metrics import Registry
from hps_core.pdb import rocksdb
from hps_core.pdb.rocksdb import RocksDBPDB
from hps_core.updates import Publisher, connect
from hps_core.updates.ingestor import Ingestor, TierSink

rocksdb.REOPEN_INTERVAL_S = 0.0
d, addr, stream = os.environ["HPS_SHM_DIR"], sys.argv[1], sys.argv[2]
T = "hps_et.m.t"
pdb = RocksDBPDB(d + "/db")
pdb.create_table(T, 64)
rng = np.random.default_rng(5)
keys = np.arange(40_000, dtype=np.int64) * 7919 - 10**12
vecs = rng.standard_normal((len(keys), 64)).astype(np.float32)
client = connect(addr)
pub = Publisher(client, stream)
for s in range(0, len(keys), 2000):  # 10 MiB of rows for an 8 MiB disk
    pub.publish(T, keys[s : s + 2000], vecs[s : s + 2000])
registry = Registry()
ing = Ingestor(client, [TierSink("pdb", pdb, {T: (64, "float32")})], None, stream=stream,
               group="g", block_ms=20, registry=registry)
out = {}
for _ in range(400):
    ing.step(20)
    if ing.failures.value(group="g") >= 3:
        break
out["failures_while_full"] = ing.failures.value(group="g")
out["lag_while_full"] = ing.lag()
grow(d, 64)
for _ in range(400):
    ing.step(20)
    if ing.lag() == 0:
        break
out["lag_after"] = ing.lag()
got, found = pdb.fetch(T, keys)
out["all_equal"] = bool(found.all() and np.array_equal(got, vecs))
print(json.dumps(out))
"""


def test_the_ingestor_keeps_updates_pending_while_the_disk_is_full_and_applies_them_after(
    redis_standalone, tmp_path
):
    """A RocksDB write failure used to escape the ingestor's round as a plain Exception and end
    its thread: updates stopped for good. Now the round is retried, the entries stay pending,
    and once there is room every update lands."""
    redis_standalone.flush()
    script = tmp_path / "ingest_full.py"
    script.write_text(INGEST_DISK_FULL)
    tests = str(ROOT / "tests")
    r = in_small_tmpfs(
        f"PYTHONPATH={tests}:$PYTHONPATH {sys.executable} {script} "
        f"{redis_standalone.address} upd_full"
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["failures_while_full"] >= 3 and out["lag_while_full"] > 0, out
    assert out["lag_after"] == 0 and out["all_equal"], out


def test_updates_wait_while_the_redis_vdb_is_out_of_memory_and_land_after(
    redis_standalone, redis_standalone_own
):
    """A Redis VDB at its maxmemory (noeviction) refuses writes ('OOM command not allowed'):
    the ingestor keeps the entries pending, and once the node has room every row lands."""
    redis_standalone.flush()
    stream_client = connect(redis_standalone.address)
    node = redis.Redis(port=redis_standalone_own.ports[0])
    vdb = RedisVDB(redis_standalone_own.address, num_partitions=2)
    vdb.create_table("hps_et.m.oom", 64)
    node.config_set("maxmemory-policy", "noeviction")
    node.config_set("maxmemory", int(node.info("memory")["used_memory"]) + (1 << 20))
    rng = np.random.default_rng(11)
    keys = rng.permutation(20_000).astype(np.int64) * 31 - 99_999  # 5 MiB of rows for 1 MiB
    vecs = rng.standard_normal((len(keys), 64)).astype(np.float32)
    pub = Publisher(stream_client, "upd_oom")
    for s in range(0, len(keys), 1000):
        pub.publish("hps_et.m.oom", keys[s : s + 1000], vecs[s : s + 1000])
    ing = Ingestor(stream_client, [TierSink("vdb", vdb, {"hps_et.m.oom": (64, "float32")})],
                   None, stream="upd_oom", group="g", block_ms=20, registry=Registry())  # fmt: skip
    for _ in range(400):  # bounded: until three rounds failed
        ing.step(20)
        if ing.failures.value(group="g") >= 3:
            break
    assert ing.failures.value(group="g") >= 3 and ing.lag() > 0
    node.config_set("maxmemory", 0)  # room again
    for _ in range(400):
        ing.step(20)
        if ing.lag() == 0:
            break
    assert ing.lag() == 0
    got, found = vdb.fetch("hps_et.m.oom", keys)
    assert found.all()
    np.testing.assert_array_equal(got, vecs)
    vdb.close()


def test_a_restart_keeps_the_redis_vdb_and_its_updates_without_rocksdb(redis_standalone, tmp_path):
    """Redis outlives a restart of the server. Every start loaded the model file into it again,
    and without RocksDB (which hands a reload its updated rows) that rolled back every online
    update. Now the VDB is loaded again only from another file, or when it lost rows."""
    from hps_core.vdb._redis_reads import _part_key

    redis_standalone.flush()
    keys, vecs = make_model(tmp_path, rows=2000)
    cfg = server_config(tmp_path, redis_standalone.address)
    cfg["persistent_db"] = {"type": "disabled"}
    upd_keys = np.concatenate([keys[[0, 7, 1999]], [123456789]])  # in the file, and new
    upd = np.full((4, 8), 42.0, np.float32) + np.arange(4)[:, None]
    want = reference(keys, vecs, keys)
    with ParameterServer(cfg) as ps:
        store = ps.session("m").tables[0].store_name
        TierSink("vdb", ps.vdb, {store: (8, "float32")}).apply(store, upd_keys, upd)
    with ParameterServer(cfg) as ps:  # a restart: same file
        np.testing.assert_array_equal(ps.lookup(upd_keys, "m", 0), upd)
        np.testing.assert_array_equal(ps.lookup(keys[1:7], "m", 0), want[1:7])
    client = connect(redis_standalone.address)
    assert client.delete(_part_key(store, 0, "v")) == 1  # a partition's rows lost
    with ParameterServer(cfg) as ps:  # loaded again: every row of the file is back
        assert ps.vdb.size(store) == len(keys) + 1
        np.testing.assert_array_equal(ps.lookup(keys, "m", 0), want)
    time.sleep(0.01)
    with ParameterServer(cfg) as ps:
        TierSink("vdb", ps.vdb, {store: (8, "float32")}).apply(store, upd_keys, upd)
    write_table(tmp_path / "t0_sparse.model", keys, vecs)  # a new model file (same rows)
    with ParameterServer(cfg) as ps:
        np.testing.assert_array_equal(ps.lookup(upd_keys[:3], "m", 0), want[[0, 7, 1999]])


def test_l1_caches_no_old_row_while_the_stores_lag_past_the_grace(redis_standalone, tmp_path):
    """This process's L1 takes updates in a group of its own; the shared stores (here a Redis
    VDB and RocksDB) in another, which can stall far longer than the 30 s grace (Redis full, a
    disk full). A lookup after the grace read the stores' old row and cached it; the update
    then reached the stores, but L1 had taken it already, so the old row was served for good.
    Now a fill waits until the stores' group has applied the update."""
    from hps_core.updates.ingestor import ingestor_for

    redis_standalone.flush()
    keys, vecs = make_model(tmp_path, rows=1000)
    cfg = server_config(tmp_path, redis_standalone.address)
    cfg["models"][0].update(gpucacheper=0.5, hit_rate_threshold=0.0, cache_prefill=False)
    cfg["update_source"] = {
        "type": "redis_stream",
        "brokers": redis_standalone.address,
        "poll_timeout_ms": 50,
        "scope": "cache",  # the stores are another process's (hps ingest)
    }
    k = keys[:5]
    upd = np.full((5, 8), 42.0, np.float32)
    with ParameterServer(cfg) as ps:
        t = ps.session("m").tables[0]
        t.recent.grace = 0.2
        stores = ingestor_for(ps.config, vdb=ps.vdb, pdb=ps.pdb, scope="all")  # not running
        try:
            assert [i.group.split(":")[1] for i in ps.ingestors] == ["proc"]
            Publisher(connect(redis_standalone.address)).publish("hps_et.m.t0", k, upd)
            wait_for(lambda: ps.ingestors[0].lag() == 0)  # L1 has it; the stores do not
            time.sleep(0.5)  # past the grace
            np.testing.assert_array_equal(ps.lookup(k, "m", 0), vecs[:5])  # the stores' row
            ps.flush()
            assert not t.cache.contains(k).any()  # not cached: it is older than the update
            while stores.lag():
                stores.step(50)
            np.testing.assert_array_equal(ps.lookup(k, "m", 0), upd)

            def cached():
                ps.lookup(k, "m", 0)
                ps.flush()
                return t.cache.contains(k).all()

            wait_for(cached)  # once the stores have it, L1 takes it again
            np.testing.assert_array_equal(t.cache.find(k)[0], upd)
        finally:
            stores.stop()


def test_store_progress_is_the_slowest_groups_oldest_unapplied_entry(redis_standalone):
    from hps_core.updates.ingestor import StoreProgress

    redis_standalone.flush()
    client = connect(redis_standalone.address)
    ids = [client.xadd("s", {"n": i}) for i in range(4)]
    progress = StoreProgress(client, "s", ["a", "b"])
    assert progress.refresh() is None  # no store group yet: not known
    client.xgroup_create("s", "a", id="0")
    client.xgroup_create("s", "b", id="0")
    client.xgroup_create("s", "other", id="$")  # not a store group: not counted
    assert progress.refresh() == 0  # nothing delivered
    client.xreadgroup("a", "c", {"s": ">"}, count=4)
    client.xack("s", "a", ids[0], ids[1])  # a: 2 and 3 delivered, not applied
    client.xreadgroup("b", "c", {"s": ">"}, count=4)
    client.xack("s", "b", *ids)
    assert progress.refresh() == version_of(ids[2]) - 1
    client.xack("s", "a", ids[2], ids[3])
    assert progress.refresh() == version_of(ids[3])
    assert progress.through() == version_of(ids[3])  # the last value read, at once
    last = client.xadd("s", {"n": 4})
    for g in ("a", "b"):
        client.xreadgroup(g, "c", {"s": ">"}, count=1)
        client.xack("s", g, last)
    wait_for(lambda: progress.through() == version_of(last))  # read again by its own thread
    progress.close()
    assert not progress._thread.is_alive()


def test_store_progress_survives_entries_acknowledged_while_it_reads(redis_standalone, caplog):
    """XINFO counted pending entries that the ingestor acknowledged before XPENDING ran (its
    "min" is then None): the progress thread died on it, the value stopped moving, and every
    later update's keys were held for an hour (the soak's serving process grew with them)."""
    from hps_core.updates.ingestor import StoreProgress

    redis_standalone.flush()
    client = connect(redis_standalone.address)
    client.xgroup_create("s", "a", id="0", mkstream=True)

    class AcksInBetween:
        """The stream's client, with the ingestor acknowledging right after XINFO GROUPS."""

        def __init__(self):
            self.fail_once = False

        def xinfo_groups(self, stream):
            info = client.xinfo_groups(stream)
            pending = client.xpending_range(stream, "a", "-", "+", 100)
            if pending:
                client.xack(stream, "a", *[p["message_id"] for p in pending])
            if self.fail_once:
                self.fail_once = False
                raise ValueError("an answer it cannot read")
            return info

        def __getattr__(self, name):
            return getattr(client, name)

    racing = AcksInBetween()
    progress = StoreProgress(racing, "s", ["a"], interval=0.05)
    first = client.xadd("s", {"n": 1})
    client.xreadgroup("a", "c", {"s": ">"}, count=1)  # delivered, pending
    assert progress.refresh() == version_of(first)  # acknowledged meanwhile: applied
    racing.fail_once = True
    assert progress.through() == version_of(first)  # starts the thread, which fails once
    wait_for(lambda: "reading the stores' progress on s failed" in caplog.text)
    for i in range(3):  # the thread goes on reading
        last = client.xadd("s", {"n": 2 + i})
        client.xreadgroup("a", "c", {"s": ">"}, count=1)
        wait_for(lambda last=last: progress.through() == version_of(last))
    assert progress._thread.is_alive()
    progress.close()
