"""The kernel warm-up at model load: a served instance compiles nothing once loaded, and the
warm-up leaves the model's caches, VDB rows and counters as they were."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_fused import config as fused_config
from test_fused import make_files, reference, request
from three_tables import DIMS

from hps_core.config import load_config
from hps_core.errors import ConfigError
from hps_core.serving import EmbeddingService


def write_config(root: Path, name: str, **vdb) -> Path:
    cfg = fused_config(root, name, "lfu", "float32", 2, 1.0)  # with an admission filter
    cfg["volatile_db"].update(vdb)
    path = root / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("warmup")
    return root, make_files(root)


def state(svc: EmbeddingService) -> dict[str, np.ndarray]:
    """What lookups can change: L1 slots and clocks, admission counters, VDB rows and their
    use counts (evict_least_used), the per-table counters."""
    out = {}
    vdb = svc.server.vdb
    for t in svc.session.tables:
        for k, v in t.cache.snapshot().items():
            out[f"{t.name}.l1.{k}"] = np.asarray(v)
        out[f"{t.name}.admission"] = t.admission.sketch.counters.copy()
        keys, rows = vdb.dump(t.store_name)
        order = np.argsort(keys)
        out[f"{t.name}.vdb.keys"], out[f"{t.name}.vdb.rows"] = keys[order], rows[order]
        out[f"{t.name}.vdb.meta"] = vdb._table(t.store_name).arr.meta.copy()
        st = t.stats
        out[f"{t.name}.stats"] = np.array(
            [st.requests, st.keys, st.unique_keys, *[st.hits[x] for x in sorted(st.hits)]]
        )
    return out


def test_warm_up_leaves_the_model_as_it_was(files):
    root, tables = files
    path = write_config(root, "same", overflow_policy="evict_least_used")
    svc = EmbeddingService(load_config(path), "m", io="slots", max_keys=10_000, warm_up=False)
    try:
        rng = np.random.default_rng(3)
        for batch in (50, 400):  # fill L1, count uses, then look at everything
            assert isinstance(svc.run_slots([request(rng, tables, batch)])[0], np.ndarray)
        svc.server.flush()
        before = state(svc)
        assert svc.warm_up_seconds is None
        svc.warm_up()
        assert svc.warm_up_seconds is not None
        after = state(svc)
        assert before.keys() == after.keys()
        for k in before:
            np.testing.assert_array_equal(before[k], after[k], err_msg=k)
        assert any(before[f"{t}.vdb.meta"].any() for t in "abc")  # the check could see a touch
        cat = request(rng, tables, 300)
        (got,) = svc.run_slots([cat])
        want = np.concatenate([reference(tables, t, cat[:, t]) for t in range(3)], axis=1)
        np.testing.assert_array_equal(got, want)
    finally:
        svc.close()


CHILD = r"""
import json, sys
import numpy as np
from numba.core.dispatcher import Dispatcher

from hps_core.serving import EmbeddingService
from hps_core.updates.ingestor import CacheSink, TierSink


def signatures():
    out = {}
    for name, mod in list(sys.modules.items()):
        if name.startswith("hps_core"):
            for attr, obj in list(vars(mod).items()):
                if isinstance(obj, Dispatcher):
                    out[f"{name}.{attr}"] = len(obj.signatures)
    return out


path, io, warm = sys.argv[1], sys.argv[2], sys.argv[3]
svc = EmbeddingService.from_parameters(
    {"config": path, "io": io, "warm_up": warm, "max_keys": "100000"}
)
before = signatures()
tables = svc.session.tables
rng = np.random.default_rng(5)
for n in (3, 5000):  # serial, then parallel kernels; keys in no table: their defaults
    cat = np.stack([rng.integers(-(2**63), 2**63 - 1, n) for _ in tables], axis=1)
    cols = [np.full((n, t.dim), t.default_value, np.float32) for t in tables]
    if io == "slots":
        got, want = svc.run_slots([cat])[0], np.concatenate(cols, axis=1)
    else:
        flat = np.concatenate([cat[:, t] for t in range(len(tables))])
        got = svc.run_hps(flat, np.full(len(tables), n, np.int32))
        want = np.concatenate([c.ravel() for c in cols])
    assert np.array_equal(got, want), "a request served wrong rows"
    svc.server.flush()
sinks = [CacheSink(svc.server), TierSink("vdb", svc.server.vdb)]
updated = []
for n in (3, 5000):  # online updates of rows L1 holds and rows it does not, as the stream does
    for t in tables:
        snap = t.cache.snapshot()
        keys = np.concatenate([snap["keys"][snap["occupied"]][:n],
                               rng.integers(-(2**63), 2**63 - 1, n)])
        rows = rng.standard_normal((len(keys), t.dim)).astype(np.float32)
        for s in sinks:
            s.apply(t.store_name, keys, rows)
        updated.append((t.store_name, keys, rows))
        if io == "hps":
            counts = np.array([len(keys) if x is t else 0 for x in tables], np.int32)
            got = svc.run_hps(keys, counts).reshape(-1, t.dim)
        else:  # the other columns ask for this table's updated keys too
            got = svc.run_slots([np.stack([keys] * len(tables), axis=1)])[0]
            col = sum(x.dim for x in tables[: tables.index(t)])
            got = got[:, col : col + t.dim]
        assert np.array_equal(got, rows), "an update is not what is served"
after = signatures()
new = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
print(json.dumps({"new": new, "warm_up_s": svc.warm_up_seconds, "updates": len(updated)}))
svc.close()
"""


def run_child(path: Path, io: str, warm: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), io, warm],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("io", ["hps", "slots"])
def test_a_served_instance_compiles_nothing_after_load(files, io):
    """In a fresh process (nothing compiled yet): after load, requests of 3 and 5,000 keys per
    table and online updates of 3 and 5,000 rows add no kernel signature. Without the warm-up
    the same run compiles several (the check can fail)."""
    root, _ = files
    path = write_config(root, f"fresh_{io}")
    warm = run_child(path, io, "true")
    assert warm["new"] == {}, f"compiled after load: {warm['new']}"
    assert warm["warm_up_s"] is not None and warm["updates"] == 2 * len(DIMS)
    cold = run_child(path, io, "false")
    assert cold["warm_up_s"] is None
    assert any("assign" in k for k in cold["new"]), cold["new"]  # the update path
    assert any("fetch" in k or "lookup_tables" in k for k in cold["new"]), cold["new"]


def test_warm_up_parameter_and_a_failing_warm_up(files, monkeypatch, caplog):
    """``warm_up: false`` skips it, a value that is no flag names the parameter, and a warm-up
    that fails is logged while the model serves its rows."""
    import hps_core.warmup

    root, tables = files
    path = write_config(root, "param")
    params = {"config": str(path), "io": "slots", "warm_up": "false"}
    svc = EmbeddingService.from_parameters(params)
    svc.close()
    assert svc.warm_up_seconds is None
    with pytest.raises(ConfigError, match="parameters.warm_up"):
        EmbeddingService.from_parameters({**params, "warm_up": "maybe"})
    for bad in ("-5", "0", "many"):  # -5 refused every request, 0 meant the default
        with pytest.raises(ConfigError, match="parameters.max_keys"):
            EmbeddingService.from_parameters({**params, "max_keys": bad})

    def broken(session, io, max_keys):
        raise RuntimeError("scratch cache allocation failed")

    monkeypatch.setattr(hps_core.warmup, "warm_up", broken)
    with caplog.at_level(logging.WARNING, logger="hps_core.serving"):
        svc = EmbeddingService.from_parameters({**params, "warm_up": "true"})
    try:
        assert svc.warm_up_seconds is None
        assert "kernel warm-up failed (scratch cache allocation failed)" in caplog.text
        cat = request(np.random.default_rng(9), tables, 60)
        (got,) = svc.run_slots([cat])
        want = np.concatenate([reference(tables, t, cat[:, t]) for t in range(3)], axis=1)
        np.testing.assert_array_equal(got, want)
    finally:
        svc.close()


def test_a_model_with_an_l1_off_the_host_kernels_is_skipped(caplog):
    """A cache that is not the host kernels' (a GPU L1 in practice; the numpy reference here)
    sends requests down another path: the warm-up does nothing and says so."""
    from hps_core.cache.reference import ReferenceCache
    from hps_core.session import LookupSession, TableRuntime
    from hps_core.vdb.hashmap import HashMapVDB
    from hps_core.warmup import warm_up

    vdb = HashMapVDB(num_partitions=2)
    vdb.create_table("s", 4)
    keys = np.arange(10, dtype=np.int64)
    vdb.upsert("s", keys, np.tile(keys[:, None], 4).astype(np.float32))
    cache = ReferenceCache(64, 4)
    cache.insert(keys[:3], np.full((3, 4), 7.0, np.float32))
    before = cache.snapshot()
    session = LookupSession("g", [TableRuntime("s", "s", 4, 0.0, cache)], vdb, None)
    try:
        with caplog.at_level(logging.INFO, logger="hps_core.warmup"):
            assert warm_up(session, "hps", 1000) is None
        assert "an L1 cache is on a GPU" in caplog.text
        after = cache.snapshot()
        for k in before:
            np.testing.assert_array_equal(before[k], after[k], err_msg=k)
        want = np.concatenate([np.full((3, 4), 7.0), np.tile(keys[3:, None], 4)])
        np.testing.assert_array_equal(session.lookup(keys), want)
    finally:
        session.close()
        vdb.close()


def test_the_warmup_benchmark_child_serves_and_checks_an_update(tmp_path):
    """One case of ``hps bench warmup`` in this process: its timings are there, and its check
    that the updated rows are served ran (it raises otherwise)."""
    from hps_core.bench.warmup import child, write_model

    out = child(str(write_model(tmp_path, 20_000)), True)
    assert out["warm_up_s"] is not None
    for key in ("load_s", "first_request_s", "first_large_request_s", "first_update_s"):
        assert 0 < out[key] < 600, (key, out)
    assert out["steady_request_s"] > 0 and out["rss_end_mib"] > 0
