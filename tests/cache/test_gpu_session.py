"""A model whose L1 caches are on a GPU is served by the device-resident path
(``hps_core/device.py``): the vectors equal the files', whether they come back to the host or
stay on the device, and the counters add up. Skipped without CuPy or a CUDA device."""

from __future__ import annotations

import numpy as np
import pytest
from test_fused import config, make_files, reference, request

from hps_core import ParameterServer
from hps_core.device import is_gpu_cache

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install cupy-cuda12x)")


def _device_count() -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_device_count() == 0, reason="no CUDA device")]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_gpu_l1_model_is_served_on_the_device(tmp_path, policy):
    tables = make_files(tmp_path)
    cfg = config(tmp_path, "gpu", policy, "float32", 1, 1.0)
    cfg["models"][0]["deployed_device_list"] = [0]
    ps = ParameterServer(cfg)
    try:
        s = ps.session("m")
        assert all(is_gpu_cache(t.cache) for t in s.tables)
        assert s.device.eligible
        rng = np.random.default_rng(2)
        keys_seen = 0
        for batch in (1, 17, 300, 5000, 300):
            cat = request(rng, tables, batch)
            ref = np.concatenate([reference(tables, t, cat[:, t]) for t in range(3)], axis=1)
            np.testing.assert_array_equal(s.lookup_columns(cat), ref)
            on_dev = s.lookup_columns(cat, on_device=True)
            assert isinstance(on_dev, cupy.ndarray)
            np.testing.assert_array_equal(cupy.asnumpy(on_dev), ref)
            keys_seen += 2 * batch
            c = min(3, batch)  # the third table gets up to 3 keys (a batch of 1 has one)
            counts = np.array([batch, 0, c])
            flat = np.concatenate([cat[:, 0], cat[:c, 2]]).astype(np.int64)
            got, _ = s.lookup_concatenated(flat, counts)
            want = np.concatenate(
                [reference(tables, 0, cat[:, 0]).ravel(), reference(tables, 2, cat[:c, 2]).ravel()]
            )
            np.testing.assert_array_equal(got, want)
            s.flush()
        st = s.tables[0].stats
        assert st.keys == keys_seen + sum((1, 17, 300, 5000, 300))
        assert st.hits["l1"] > 0
        assert sum(st.hits.values()) == st.unique_keys
    finally:
        ps.close()


def test_device_dense_on_cupy_equals_the_reference(tmp_path):
    """The dense network the GPU path runs after the device lookup: CuPy (cuBLAS) in float32
    against the float64 NumPy reference of the same weights."""
    from hps_core.dense import DeviceDense, dense_forward, load_dense_weights, save_dense_model

    weights = save_dense_model(tmp_path / "d.onnx", dim=16, seed=3)
    rng = np.random.default_rng(0)
    for batch in (1, 256, 4096):
        dense = np.log1p(rng.exponential(20.0, (batch, 13))).astype(np.float32)
        emb = (rng.standard_normal((batch, 26 * 16)) * 0.05).astype(np.float32)
        net = DeviceDense(load_dense_weights(tmp_path / "d.onnx"), cupy)
        got = cupy.asnumpy(net(cupy.asarray(dense), cupy.asarray(emb)))
        np.testing.assert_allclose(got, dense_forward(weights, dense, emb), rtol=0, atol=1e-5)


def test_static_table_holds_the_whole_table_and_serves_new_keys_below_it(tmp_path):
    """HPS's static table on the GPU: filled at load with every row of the tiers, every file
    key hits; a key the table was not built with (an online update, say) is served from the
    VDB and its fill into the full table is dropped, not raised."""
    tables = make_files(tmp_path)
    cfg = config(tmp_path, "static", "lru", "float32", 1, 1.0)
    cfg["models"][0].update(deployed_device_list=[0], use_static_table=True)
    ps = ParameterServer(cfg)
    try:
        s = ps.session("m")
        for t, (keys, _) in zip(s.tables, tables, strict=True):
            assert t.cache.static and t.cache.capacity == len(keys) == t.cache.size()
        rng = np.random.default_rng(3)
        cat = np.stack([keys[rng.integers(0, len(keys), 500)] for keys, _ in tables], axis=1)
        ref = np.concatenate([reference(tables, t, cat[:, t]) for t in range(3)], axis=1)
        np.testing.assert_array_equal(s.lookup_columns(cat), ref)
        for t in s.tables:
            st = t.stats
            assert st.hits["l1"] == st.unique_keys > 0
        new_key, row = 10**17 + 1, np.full((1, 8), 0.25, np.float32)
        ps.vdb.upsert(s.tables[0].store_name, np.array([new_key]), row)
        got = s.lookup_concatenated(np.array([new_key]), np.array([1, 0, 0]))[0]
        s.flush()
        np.testing.assert_array_equal(got, row.ravel())
        assert s.tables[0].stats.hits["vdb"] == 1
    finally:
        ps.close()
