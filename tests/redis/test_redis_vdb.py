"""The Redis VDB against a dict reference, standalone and on a 3-node cluster."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time

import numpy as np
import pytest
from file_reference import stored
from served_model import make_model, reference, server_config

from hps_core import ConfigError, ParameterServer, StorageError
from hps_core.vdb.redis import RedisVDB

pytestmark = pytest.mark.redis

I64 = np.iinfo(np.int64)
EXTREMES = np.array([I64.min, I64.max, 0, -1, 1, I64.min + 1, 256, -256], np.int64)


def check(vdb: RedisVDB, table: str, ref: dict, dim: int, probe: np.ndarray) -> None:
    got, found = vdb.fetch(table, probe)
    expect_found = np.array([k in ref for k in probe.tolist()], bool)
    np.testing.assert_array_equal(found, expect_found)
    zero = np.zeros(dim, np.float32)
    expect = np.array([ref.get(k, zero) for k in probe.tolist()]).reshape(len(probe), dim)
    np.testing.assert_array_equal(got, expect)
    assert vdb.size(table) == len(ref)


@pytest.mark.parametrize(
    "dim,dtype,parts",
    [(16, "float16", 3), (64, "float32", 8), (8, "bfloat16", 5), (7, "int8", 4)],
)
def test_random_operations_match_a_dict(redis_any, dim, dtype, parts):
    rng = np.random.default_rng(dim + parts)
    vdb = RedisVDB(redis_any.address, num_partitions=parts, max_batch_size=97)
    assert vdb.cluster == redis_any.cluster
    vdb.create_table("hps_et.m.t", dim, dtype=dtype)
    ref: dict[int, np.ndarray] = {}
    universe = np.concatenate([EXTREMES, rng.integers(I64.min, I64.max, 2000)])
    for _ in range(30):
        op = rng.integers(0, 4)
        keys = rng.choice(universe, rng.integers(0, 400))  # duplicates: the later row wins
        if op == 3:  # insert where absent, checked against a source (a PDB) for some rows
            vecs = rng.standard_normal((len(keys), dim)).astype(np.float32)
            moved = rng.random(len(keys)) < 0.2  # rows the source holds no longer as read

            def source(k, keys=keys, vecs=vecs, moved=moved):
                assert np.array_equal(k, keys)
                return np.where(moved[:, None], vecs + 1, vecs), np.ones(len(k), bool)

            want = {}
            for k, v, m in zip(keys.tolist(), stored(vecs, dtype), moved, strict=True):
                if k not in ref and not m:  # of the rows kept, a key's last wins
                    want[k] = v
            n = vdb.insert_missing("hps_et.m.t", keys, vecs, source)
            assert n == len(want)
            ref.update(want)
        elif op == 0:
            vecs = rng.standard_normal((len(keys), dim)).astype(np.float32)
            vdb.upsert("hps_et.m.t", keys, vecs)
            ref.update(zip(keys.tolist(), stored(vecs, dtype), strict=True))
        elif op == 1:
            removed = vdb.evict("hps_et.m.t", keys)
            assert removed == len({k for k in keys.tolist() if k in ref})
            for k in keys.tolist():
                ref.pop(k, None)
        else:
            check(vdb, "hps_et.m.t", ref, dim, rng.choice(universe, 500))
    check(vdb, "hps_et.m.t", ref, dim, universe)
    np.testing.assert_array_equal(
        vdb.contains("hps_et.m.t", universe), [k in ref for k in universe.tolist()]
    )
    keys, vecs = vdb.dump("hps_et.m.t")
    assert sorted(keys.tolist()) == sorted(ref)
    np.testing.assert_array_equal(vecs, np.array([ref[k] for k in keys.tolist()]).reshape(-1, dim))
    assert vdb.partition_sizes("hps_et.m.t").sum() == len(ref)
    assert vdb.tables() == ["hps_et.m.t"]
    assert vdb.memory_bytes("hps_et.m.t") > 0
    # A second client (another process, say) sees the same table and rows.
    other = RedisVDB(redis_any.address, num_partitions=1)
    assert other.dim("hps_et.m.t") == dim
    check(other, "hps_et.m.t", ref, dim, universe[:200])
    # into a given out, contiguous or not: found rows written, the others left as they were
    probe = universe[:300]
    expect = np.array([ref.get(k, np.full(dim, 7.0, np.float32)) for k in probe.tolist()])
    for out in (np.full((300, dim), 7.0, np.float32), np.full((300, 2 * dim), 7.0, np.float32)):
        view = out[:, :dim]
        got, found = vdb.fetch("hps_et.m.t", probe, out=view)
        assert got is view
        np.testing.assert_array_equal(found, [k in ref for k in probe.tolist()])
        np.testing.assert_array_equal(view, expect.reshape(300, dim))
    with pytest.raises(Exception, match="exists with dim"):
        other.create_table("hps_et.m.t", dim + 1)
    vdb.drop_table("hps_et.m.t")
    assert vdb.tables() == []
    vdb.close()
    other.close()


@pytest.mark.parametrize("policy", ["evict_random", "evict_oldest", "evict_least_used"])
def test_overflow_policies_bound_each_partition(redis_standalone, policy):
    redis_standalone.flush()
    rng = np.random.default_rng(3)
    vdb = RedisVDB(
        redis_standalone.address,
        num_partitions=2,
        overflow_margin=100,
        overflow_policy=policy,
        overflow_resolution_target=0.5,
    )
    vdb.create_table("t", 4)
    ref = {}
    hot = np.arange(10_000, 10_010)
    vdb.upsert("t", hot, np.ones((10, 4), np.float32))
    ref.update((k, np.ones(4, np.float32)) for k in hot.tolist())
    for b in range(8):
        time.sleep(0.003)  # evict_oldest scores are milliseconds
        keys = np.arange(b * 50, b * 50 + 50)
        vecs = rng.standard_normal((50, 4)).astype(np.float32)
        vdb.upsert("t", keys, vecs)
        ref.update(zip(keys.tolist(), vecs, strict=True))
        if policy == "evict_least_used":
            vdb.fetch("t", hot)  # the hot rows gain use counts every round
    sizes = vdb.partition_sizes("t")
    assert (sizes <= 100).all() and sizes.sum() < 410
    keys, vecs = vdb.dump("t")
    np.testing.assert_array_equal(vecs, np.array([ref[k] for k in keys.tolist()]))  # no torn rows
    kept = set(keys.tolist())
    if policy == "evict_oldest":  # the newest batch survives whole
        assert set(range(350, 400)) <= kept
        assert not set(hot.tolist()) & kept
    if policy == "evict_least_used":
        assert set(hot.tolist()) <= kept
    vdb.close()


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="volatile_db.address"):
        RedisVDB("localhost")
    with pytest.raises(ConfigError, match="volatile_db.overflow_policy"):
        RedisVDB("127.0.0.1:1", overflow_policy="lru")


def test_server_lookups_equal_the_reference(redis_any, tmp_path):
    keys, vecs = make_model(tmp_path)
    cfg = server_config(tmp_path, redis_any.address, initial_cache_rate=0.5)
    (tmp_path / "hps.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(1)
    with ParameterServer(tmp_path / "hps.json") as ps:
        assert ps.vdb.cluster == redis_any.cluster
        assert ps.vdb.size("hps_et.m.t0") == 1500
        for _ in range(5):
            q = np.concatenate([rng.choice(keys, 300), [7, 8, 9]])
            vec, st = ps.session("m").lookup_with_stats(q, "t0")
            np.testing.assert_array_equal(vec, reference(keys, vecs, q))
        total = ps.session("m").tables[0].stats
        assert total.hits["vdb"] > 0 and total.hits["pdb"] > 0 and total.hits["default"] > 0


def test_tls_with_a_client_certificate(redis_tls, tmp_path):
    """A server that speaks only TLS and requires a client certificate: the config's TLS fields
    reach the connections (lookups equal the reference, rows read off the TLS socket by the
    fetch's own reader); without TLS, or without the client certificate, a clear error."""
    addr, ca = redis_tls.address, redis_tls.tls_file("ca.crt")
    with pytest.raises(StorageError, match=addr):
        RedisVDB(addr)
    with pytest.raises(StorageError, match=addr):
        RedisVDB(addr, enable_tls=True, tls_ca_certificate=ca)  # no client certificate
    keys, vecs = make_model(tmp_path)
    tls = dict(
        enable_tls=True,
        tls_ca_certificate=ca,
        tls_client_certificate=redis_tls.tls_file("client.crt"),
        tls_client_key=redis_tls.tls_file("client.key"),
    )
    (tmp_path / "hps.json").write_text(json.dumps(server_config(tmp_path, addr, **tls)))
    rng = np.random.default_rng(3)
    with ParameterServer(tmp_path / "hps.json") as ps:
        assert ps.vdb.size("hps_et.m.t0") == len(keys)  # loaded over TLS
        for batch in (1, 300, 5000):  # 5000 keys: replies over many TLS records
            q = np.concatenate([rng.choice(keys, batch), [7, -(2**63)]])
            np.testing.assert_array_equal(ps.session("m").lookup(q, "t0"), reference(keys, vecs, q))
        assert ps.session("m").tables[0].stats.hits["vdb"] > 0


class _NameRecorder:
    """A TLS listener (the test CA's server certificate) that records the server name (SNI)
    each client's handshake sends (None: none sent), then hangs up: not a Redis server."""

    def __init__(self, tls_file):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls_file("server.crt"), tls_file("server.key"))
        ctx.sni_callback = lambda _sock, name, _ctx: self.names.append(name)
        self.names: list[str | None] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.ctx, self.stop = ctx, threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                self.ctx.wrap_socket(conn, server_side=True).close()
            except (OSError, ssl.SSLError):
                conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def test_tls_server_name_is_sent_and_checked(redis_tls, tmp_path):
    """tls_server_name_identification is the name the TLS handshake sends (SNI) and the one
    the server's certificate must hold (it names 127.0.0.1 and localhost): from hps.json to
    the connections, lookups equal the reference under a name the certificate holds, and a
    name it lacks is a clear error that names the field; unset, no name is sent to an IP
    address and the certificate is checked against it."""
    tls = dict(
        enable_tls=True,
        tls_ca_certificate=redis_tls.tls_file("ca.crt"),
        tls_client_certificate=redis_tls.tls_file("client.crt"),
        tls_client_key=redis_tls.tls_file("client.key"),
    )
    listener = _NameRecorder(redis_tls.tls_file)
    try:
        for name, sent in (("", None), ("localhost", "localhost")):
            listener.names.clear()
            with pytest.raises(StorageError, match=listener.address):
                RedisVDB(listener.address, tls_server_name_identification=name, **tls)
            assert listener.names == [sent]
    finally:
        listener.close()

    with pytest.raises(StorageError, match=r"tls_server_name_identification = 'redis\.example'"):
        RedisVDB(redis_tls.address, tls_server_name_identification="redis.example", **tls)
    keys, vecs = make_model(tmp_path)
    cfg = server_config(tmp_path, redis_tls.address, **tls)
    cfg["volatile_db"]["tls_server_name_identification"] = "localhost"
    (tmp_path / "hps.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(4)
    with ParameterServer(tmp_path / "hps.json") as ps:
        assert ps.vdb.nodes._tls_name == "localhost"
        q = np.concatenate([rng.choice(keys, 300), [7, -(2**63)]])
        np.testing.assert_array_equal(ps.session("m").lookup(q, "t0"), reference(keys, vecs, q))
        assert ps.session("m").tables[0].stats.hits["vdb"] > 0
    cfg["volatile_db"]["tls_server_name_identification"] = "redis.example"
    (tmp_path / "hps.json").write_text(json.dumps(cfg))
    with pytest.raises(StorageError, match="tls_server_name_identification"):
        ParameterServer(tmp_path / "hps.json")


def test_tls_cluster_with_a_server_name(redis_cluster_tls):
    """A cluster that speaks only TLS: every node's connections (those to the nodes the slot
    map names included) check the certificate against tls_server_name_identification, and
    rows in partitions across all three nodes equal the reference."""
    tls = dict(
        enable_tls=True,
        tls_ca_certificate=redis_cluster_tls.tls_file("ca.crt"),
        tls_client_certificate=redis_cluster_tls.tls_file("client.crt"),
        tls_client_key=redis_cluster_tls.tls_file("client.key"),
    )
    addr = redis_cluster_tls.address
    with pytest.raises(StorageError, match=r"tls_server_name_identification = 'redis\.example'"):
        RedisVDB(addr, tls_server_name_identification="redis.example", **tls)
    vdb = RedisVDB(addr, num_partitions=12, tls_server_name_identification="localhost", **tls)
    assert vdb.cluster
    vdb.create_table("t", 5)
    rng = np.random.default_rng(6)
    keys = np.concatenate([EXTREMES, rng.integers(I64.min, I64.max, 3000)])
    vecs = rng.standard_normal((len(keys), 5)).astype(np.float32)
    vdb.upsert("t", keys, vecs)
    check(vdb, "t", dict(zip(keys.tolist(), vecs, strict=True)), 5, np.concatenate([keys, [3, 4]]))
    nodes = {vdb.nodes.route(f"hps_et{{t/p{p}}}v")[0] for p in range(12)}
    assert len(nodes) == 3, nodes  # the partitions span every node
    vdb.close()


def test_auth_is_required_and_used(redis_with_password):
    addr = redis_with_password.address
    with pytest.raises(StorageError, match=addr):
        RedisVDB(addr)
    with pytest.raises(StorageError, match=addr):
        RedisVDB(addr, user_name="default", password="wrong")
    vdb = RedisVDB(addr, user_name="default", password="s3cret")
    vdb.create_table("t", 3)
    vdb.upsert("t", [1, 2], [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(vdb.fetch("t", [2, 1])[0], [[4, 5, 6], [1, 2, 3]])
    vdb.close()


def test_moved_and_ask_redirects_are_followed(redis_cluster_own):
    """Move one partition's slot to another node under a client with the old slot map."""
    import redis as redis_py
    from redis.crc import key_slot

    vdb = RedisVDB(redis_cluster_own.address, num_partitions=4)
    vdb.create_table("t", 4)
    rng = np.random.default_rng(9)
    keys = np.arange(2000)
    vecs = rng.standard_normal((2000, 4)).astype(np.float32)
    vdb.upsert("t", keys, vecs)
    hkey = "hps_et{t/p0}v"
    slot = key_slot(hkey.encode())
    src_name, _ = vdb.nodes.route(hkey)
    nodes = {f"127.0.0.1:{p}": redis_py.Redis(port=p) for p in redis_cluster_own.ports}
    src = nodes[src_name]
    dst_name = next(n for n in nodes if n != src_name)
    dst = nodes[dst_name]
    src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
    dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
    src.execute_command("MIGRATE", "127.0.0.1", int(dst_name.split(":")[1]), hkey, 0, 5000)
    got, found = vdb.fetch("t", keys)  # the source answers ASK for the moved hash
    assert found.all()
    np.testing.assert_array_equal(got, vecs)
    for n in nodes.values():
        n.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
    got, found = vdb.fetch("t", keys)  # now MOVED: the client reloads its slot map
    assert found.all()
    np.testing.assert_array_equal(got, vecs)
    assert vdb.nodes.route(hkey)[0] == dst_name
    vdb.upsert("t", keys, vecs + 1)
    np.testing.assert_array_equal(vdb.fetch("t", keys)[0], vecs + 1)
    assert dst.hlen(hkey) > 0 and src.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
    vdb.close()


def test_concurrent_lookups_share_a_small_pool(redis_any):
    """More threads than connections per node: requests queue for a connection, none fails."""
    from concurrent.futures import ThreadPoolExecutor

    vdb = RedisVDB(redis_any.address, num_partitions=6, num_node_connections=2)
    vdb.create_table("t", 8)
    rng = np.random.default_rng(11)
    keys = np.arange(5000)
    vecs = rng.standard_normal((5000, 8)).astype(np.float32)
    vdb.upsert("t", keys, vecs)

    def one(seed: int) -> bool:
        q = np.random.default_rng(seed).integers(0, 6000, 800)
        got, found = vdb.fetch("t", q)
        np.testing.assert_array_equal(found, q < 5000)
        np.testing.assert_array_equal(got[found], vecs[q[found]])
        return True

    with ThreadPoolExecutor(12) as pool:
        assert all(pool.map(one, range(120)))
    assert vdb.unavailable_keys == 0
    vdb.close()


def test_a_row_of_the_wrong_width_is_an_error_and_the_client_stays_usable(redis_any):
    """A foreign write into a partition's hash: fetch names the table and partition; the
    connections and node slots the failed read held are given back (later fetches work)."""
    import redis as redis_py

    from hps_core.hashing import splitmix64
    from hps_core.vdb.redis import _part_key

    vdb = RedisVDB(redis_any.address, num_partitions=6, num_node_connections=1)
    vdb.create_table("w", 4)
    keys = np.arange(600)
    vecs = np.arange(2400, dtype=np.float32).reshape(600, 4)
    vdb.upsert("w", keys, vecs)
    client = (
        redis_py.RedisCluster.from_url(f"redis://{redis_any.address.split(',')[0]}")
        if redis_any.cluster
        else redis_py.Redis.from_url(f"redis://{redis_any.address}")
    )
    bad = np.int64(-123456789)
    part = int(splitmix64(np.array([bad]))[0] % np.uint64(6))
    client.hset(_part_key("w", part, "v"), int(bad).to_bytes(8, "little", signed=True), b"x" * 5)
    for _ in range(3):  # more than the one connection per node: nothing leaked
        with pytest.raises(StorageError, match=rf"'w' partition {part}: stored rows are not 16 b"):
            vdb.fetch("w", np.concatenate([keys, [bad]]))
        got, found = vdb.fetch("w", keys)
        assert found.all()
        np.testing.assert_array_equal(got, vecs)
    client.close()
    vdb.close()


def test_fetch_many_reads_several_tables_in_one_pipeline(redis_any):
    """Tables of other dims and dtypes fetched together give what each fetch alone gives,
    and one pipeline per node carries them all."""
    rng = np.random.default_rng(11)
    vdb = RedisVDB(redis_any.address, num_partitions=4, max_batch_size=50)
    specs = [
        ("hps_et.m.a", 8, "float32"),
        ("hps_et.m.b", 16, "float16"),
        ("hps_et.m.c", 4, "float32"),
        ("hps_et.m.d", 8, "bfloat16"),
        ("hps_et.m.e", 5, "int8"),
    ]
    refs = []
    for table, dim, dtype in specs:
        vdb.create_table(table, dim, dtype=dtype)
        keys = np.concatenate([EXTREMES, rng.integers(I64.min, I64.max, 500)])
        vecs = rng.standard_normal((len(keys), dim)).astype(np.float32)
        vdb.upsert(table, keys, vecs)
        refs.append(dict(zip(keys.tolist(), stored(vecs, dtype), strict=True)))
    probes = [rng.choice(np.array(list(ref)), 300) for ref in refs]
    probes[1] = np.concatenate([probes[1], rng.integers(I64.min, I64.max, 40)])  # absent keys
    probes[2] = probes[2][:0]  # an empty request among them
    sent = []
    read_nodes = vdb.nodes.read_nodes
    vdb.nodes.read_nodes = lambda jobs, read: sent.append(jobs) or read_nodes(jobs, read)
    got = vdb.fetch_many([(t, p, None) for (t, _, _), p in zip(specs, probes, strict=True)])
    # one pipeline per node for all tables
    assert len(sent) == 1 and len(sent[0]) == len({name for name, *_ in sent[0]})
    for (table, dim, _), probe, ref, (rows, found) in zip(specs, probes, refs, got, strict=True):
        want_rows, want_found = vdb.fetch(table, probe)
        np.testing.assert_array_equal(found, want_found)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_array_equal(found, [k in ref for k in probe.tolist()])
        zero = np.zeros(dim, np.float32)
        np.testing.assert_array_equal(
            rows, np.array([ref.get(k, zero) for k in probe.tolist()]).reshape(len(probe), dim)
        )
