"""Soak: the ensemble under load through Triton while updates stream in and parts fail.

Real processes throughout: a 3-node Redis Cluster (the VDB), a standalone Redis (the update
stream), ``hps ingest`` (applies updates to the VDB and RocksDB), tritonserver with our
backends (instances follow RocksDB as secondaries and keep their L1 fresh). During the run a
VDB node is killed and restarted, the ingestor is SIGKILLed and restarted, and a model is
unloaded and loaded again: once in a warm-up of up to 45 s, then again in the measured run.
Asserted: no failed request (except to the unloaded model), no lost update (every key's last
published row is what Triton serves at the end), predictions equal the numpy forward pass,
host memory of the serving processes grows <= 5% over the measured run.

``HPS_SOAK_SECONDS`` sets the measured run's length: 45 s in the suite, e.g. 1800 for a manual
long run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hps_client import HPSClient
from hps_client.metrics import samples, scrape
from hps_client.perf import serving_memory

from hps_core.config import load_config
from hps_core.dense import dense_forward, load_dense_weights
from hps_core.launcher import free_ports
from hps_core.model_io import SparseTable
from hps_core.repo import HPS_MODEL, serving, write_repository
from hps_core.synth import criteo_vocab_sizes, make_model
from hps_core.updates import Publisher, connect

SECONDS = float(os.environ.get("HPS_SOAK_SECONDS", "45"))
WARMUP = min(SECONDS, 45.0)  # the rehearsal of the events before memory is measured

pytestmark = [
    pytest.mark.slow,
    pytest.mark.triton,
    pytest.mark.redis,
    pytest.mark.timeout(int(SECONDS + WARMUP) + 420),  # set-up, convergence and teardown on top
]
EVENTS = os.environ.get("HPS_SOAK_EVENTS", "node,ingestor,reload").split(",")
DIM = 8

_spec = importlib.util.spec_from_file_location(
    "redis_local", Path(__file__).resolve().parent.parent / "redis" / "conftest.py"
)
_redis = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_redis)


class Tables:
    """The model's rows: the files, then every published update on top (the reference)."""

    def __init__(self, config: Path):
        m = load_config(config).models[0]
        self.store = [f"hps_et.{m.model}.{name}" for name in m.embedding_table_names]
        self.rows: list[dict[int, np.ndarray]] = []
        self.keys: list[np.ndarray] = []
        for _t, path in enumerate(m.sparse_files):
            with SparseTable.open(path, DIM) as f:
                k, v = f.read_all()
            self.keys.append(k)
            self.rows.append(dict(zip(k.tolist(), np.array(v), strict=True)))
        self.lock = threading.Lock()
        self.updated: list[set[int]] = [set() for _ in self.keys]
        self.history: dict[tuple[int, int], list[np.ndarray]] = {}

    def update(self, t: int, keys: np.ndarray, vectors: np.ndarray) -> None:
        with self.lock:
            for k, v in zip(keys.tolist(), vectors, strict=True):
                self.history.setdefault((t, k), [self.rows[t][k]]).append(v)
                self.rows[t][k] = v
                self.updated[t].add(k)

    def embed(self, cat: np.ndarray) -> np.ndarray:
        with self.lock:
            cols = [np.stack([self.rows[t][k] for k in cat[:, t].tolist()]) for t in range(26)]
        return np.concatenate(cols, axis=1)

    def sample(self, rng, batch: int) -> np.ndarray:
        return np.stack([k[rng.integers(0, len(k), batch)] for k in self.keys], axis=1)


def served_rows(client, per_table: list, slots: int, model: str, chunk: int = 4096) -> list:
    """Each table's rows for its keys through the HugeCTR-style model, in requests it accepts."""
    out = []
    for t, keys in enumerate(per_table):
        parts = []
        for s in range(0, len(keys), chunk):
            counts = np.zeros(slots, np.int32)
            counts[t] = len(keys[s : s + chunk])
            parts.append(client.lookup(keys[s : s + chunk], counts, model=model).reshape(-1, DIM))
        out.append(np.concatenate(parts) if parts else np.empty((0, DIM), np.float32))
    return out


def stale_by_tier(config: Path, tables: Tables, per_table: list, got: np.ndarray) -> str:
    """Where the stale rows are: the served answer, the VDB and RocksDB, per table."""
    from hps_core.server import build_pdb, build_vdb

    cfg = load_config(config)
    cfg.persistent_db = dataclasses.replace(cfg.persistent_db, read_only=True)
    vdb, pdb = build_vdb(cfg), build_pdb(cfg)
    out = []
    try:
        for t, keys in enumerate(per_table):
            if not len(keys):
                continue
            want = np.stack([tables.rows[t][k] for k in keys.tolist()])
            served = got[t]
            v, vf = vdb.fetch(tables.store[t], keys)
            p, pf = pdb.fetch(tables.store[t], keys)
            n = int((served != want).any(axis=1).sum())
            ages = []
            for i in np.flatnonzero((v != want).any(axis=1) & vf)[:20]:
                h = tables.history[(t, int(keys[i]))]
                same = [j for j, x in enumerate(h) if np.array_equal(x, v[i])]
                ages.append(f"{same[-1] if same else '?'}/{len(h) - 1}")
            if n:
                out.append(f"table {t} stale vdb rows are versions {ages}")
                out.append(
                    f"table {t}: {n} served stale; vdb holds {int(vf.sum())} of {len(keys)}, "
                    f"{int(((v != want).any(axis=1) & vf).sum())} stale; pdb holds "
                    f"{int(pf.sum())}, {int(((p != want).any(axis=1) & pf).sum())} stale"
                )
    finally:
        vdb.close()
        pdb.close()
    return "; ".join(out[:6])


def start_ingest(config: Path, log: Path) -> subprocess.Popen:
    hps = Path(sys.executable).parent / "hps"
    return subprocess.Popen(
        [str(hps), "ingest", str(config), "--scope", "all", "--consumer", "soak"],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def test_soak_with_updates_node_and_ingestor_failures_and_model_reload(tmp_path):
    vdb = _redis.LocalRedis(tmp_path / "vdb", free_ports(3, redis_cluster=True))
    stream = None
    ingest = None
    try:
        stream = _redis.LocalRedis(tmp_path / "stream", free_ports(1))
        model = make_model(tmp_path / "model", criteo_vocab_sizes(30_000), [DIM] * 26, name="soak")
        raw = json.loads(Path(model.config_path).read_text())
        raw["volatile_db"] = {"type": "redis_cluster", "address": vdb.address, "num_partitions": 4}
        raw["update_source"] = {"type": "redis_stream", "brokers": stream.address}
        raw["models"][0].update(max_batch_size=256, gpucacheper=0.2)
        (tmp_path / "hps.json").write_text(json.dumps(raw))
        spec = write_repository(tmp_path / "repo", config=tmp_path / "hps.json", max_batch_size=256)
        tables = Tables(spec.config)
        weights = load_dense_weights(spec.root / spec.dense / "1" / "model.onnx")

        with serving(spec.root, ingest=False) as (spec, server):
            ingest = start_ingest(spec.config, tmp_path / "ingest.log")
            stop = threading.Event()
            errors: list[str] = []
            served = [0]

            def client_loop(i: int) -> None:
                rng = np.random.default_rng(i)
                protocol = ("http", "grpc")[i % 2]
                url = server.http_url if protocol == "http" else server.grpc_url
                with HPSClient(url, protocol) as c:
                    while not stop.is_set():
                        batch = int(rng.integers(1, 48))
                        cat = tables.sample(rng, batch)
                        dense = rng.random((batch, spec.num_dense), dtype=np.float32)
                        try:
                            prob = c.predict(dense, cat, model=spec.ensemble)
                            if prob.shape != (batch, 1) or not np.isfinite(prob).all():
                                errors.append(f"client {i}: bad answer shape {prob.shape}")
                            served[0] += 1
                        except Exception as e:
                            errors.append(f"client {i} ({protocol}): {e}")

            pub = Publisher(
                connect(stream.address), raw["update_source"].get("stream", "hps_updates")
            )
            published = [0]

            def publish_loop() -> None:
                rng = np.random.default_rng(99)
                t = 0
                while not stop.is_set():
                    keys = np.unique(tables.keys[t][rng.integers(0, len(tables.keys[t]), 16)])
                    vecs = rng.standard_normal((len(keys), DIM)).astype(np.float32)
                    try:
                        pub.publish(tables.store[t], keys, vecs)
                        tables.update(t, keys, vecs)  # only what the stream accepted
                        published[0] += len(keys)
                    except Exception as e:
                        errors.append(f"publisher: {e}")
                    t = (t + 1) % 26
                    time.sleep(0.02)

            threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
            threads.append(threading.Thread(target=publish_loop))

            def events(span: float) -> None:
                """Every event once, spread over ``span`` seconds of load."""
                nonlocal ingest
                t0 = time.monotonic()

                def at(fraction: float) -> None:
                    time.sleep(max(0.0, t0 + fraction * span - time.monotonic()))

                at(0.2)
                if "node" in EVENTS:
                    vdb.kill(vdb.ports[1])
                at(0.35)
                if "node" in EVENTS:
                    vdb.start(vdb.ports[1])
                at(0.5)
                if "ingestor" in EVENTS:
                    ingest.send_signal(signal.SIGKILL)
                    ingest.wait(10)
                at(0.6)
                if "ingestor" in EVENTS:
                    ingest = start_ingest(spec.config, tmp_path / "ingest.log")
                at(0.7)
                with HPSClient(server.http_url) as c:
                    c.unload_model(HPS_MODEL)
                    deadline = time.monotonic() + 60
                    while c.is_model_ready(HPS_MODEL) and time.monotonic() < deadline:
                        time.sleep(0.2)
                    assert not c.is_model_ready(HPS_MODEL)
                    c.load_model(HPS_MODEL)
                    assert c.is_model_ready(HPS_MODEL)
                at(1.0)

            def settled_memory() -> dict:
                """serving_memory once the serving processes are the ones of the start: an
                unloaded instance's stub may still be exiting (slowly on a busy machine)."""
                deadline = time.monotonic() + 30
                m = serving_memory(server)
                while m["processes"] > start["processes"] and time.monotonic() < deadline:
                    time.sleep(0.2)
                    m = serving_memory(server)
                return m

            start = serving_memory(server)
            for th in threads:
                th.start()
            try:
                # Warm-up: a rehearsal of every event under load. A path a process first takes
                # during an event (a node's failover, the stream resuming, the L1 updates that
                # follow) compiles its numba kernels then, tens of MiB of one-time growth when
                # the kernel cache is cold (a fresh clone); a leak grows again in the second.
                events(WARMUP)
                warm = settled_memory()
                rss_warm = warm["rss_mib"]
                events(SECONDS)
                end = settled_memory()
                rss_end = end["rss_mib"]
            finally:
                stop.set()
                for th in threads:
                    th.join(60)

            print(f"serving memory after the warm-up {warm}, at the end {end}")
            assert not errors, errors[:5]
            assert served[0] > 0 and published[0] > 0

            # every update arrives (none lost, none rolled back): Triton serves the last rows
            deadline, bad = time.monotonic() + 60, None
            with HPSClient(server.grpc_url, "grpc") as c:
                while time.monotonic() < deadline:
                    per_table = [np.array(sorted(u), np.int64) for u in tables.updated]
                    counts = np.array([len(k) for k in per_table], np.int32)
                    got, bad = served_rows(c, per_table, spec.slots, HPS_MODEL), 0
                    for t, keys in enumerate(per_table):
                        want = (
                            np.stack([tables.rows[t][k] for k in keys.tolist()])
                            if len(keys)
                            else np.empty((0, DIM), np.float32)
                        )
                        bad += int((got[t] != want).any(axis=1).sum())
                    if bad == 0:
                        break
                    time.sleep(1)
                assert bad == 0, (
                    f"{bad} of {int(counts.sum())} updated keys not served fresh; "
                    + stale_by_tier(spec.config, tables, per_table, got)
                )
                rng = np.random.default_rng(5)
                cat = tables.sample(rng, 200)
                dense = rng.random((200, spec.num_dense), dtype=np.float32)
                prob = c.predict(dense, cat, model=spec.ensemble)
                want = dense_forward(weights, dense, tables.embed(cat))
                assert np.max(np.abs(prob - want)) <= 1e-5
            assert rss_end <= 1.05 * rss_warm, (warm, end)
            # publish -> L1 of the served instances, as Triton's /metrics reports it
            p50 = [
                v
                for _, v in samples(
                    scrape(server.metrics_url),
                    "hps_update_freshness_seconds_q",
                    model=spec.embedding,
                    quantile="0.5",
                )
            ]
            assert len(p50) == 1 and 0 < p50[0] <= 1.0, p50
    finally:
        if os.environ.get("HPS_SOAK_KEEP"):  # the ingestor's log, for a failed long run
            shutil.copy(tmp_path / "ingest.log", os.environ["HPS_SOAK_KEEP"])
        if ingest is not None and ingest.poll() is None:
            ingest.terminate()
            ingest.wait(30)
        if stream is not None:
            stream.stop()
        vdb.stop()
