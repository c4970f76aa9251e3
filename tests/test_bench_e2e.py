"""The end-to-end benchmark's quick path on a tiny model, checked against direct computations."""

import dataclasses
import json
import math
import sys
import types

import numpy as np
import pytest
from rich.console import Console
from rich.progress import Progress

from hps_core.bench import e2e_report as report
from hps_core.bench.e2e import Bench, make_batches, reps_for
from hps_core.cache.reference import ReferenceCache
from hps_core.cli import main as cli_main
from hps_core.config import load_config
from hps_core.dense import dense_forward, load_dense_weights
from hps_core.hash_kernels import dedupe
from hps_core.repo import DATA_DIR
from hps_core.server import l1_capacity
from hps_core.synth import HOT_KEYS_IN_META, criteo_vocab_sizes, model_spec

ROWS, DIM = 3000, 16
ALPHAS, BATCHES, FRACTIONS, WARMUP = (1.05, 0.0), (1, 64), (0.1,), 512


def reference_hit_rates(model, m, alpha: float, batch: int, fraction: float) -> tuple:
    """(cold, warm) L1 hit rates of the benchmark's request sequence, replayed on the oracle."""
    n = reps_for(batch, quick=True)
    cold = make_batches(model, alpha, batch, min(n, 8), seed=1)
    warm = make_batches(model, alpha, batch, n, seed=2)
    chunk = max(batch, 4096)
    warmup = make_batches(model, alpha, chunk, math.ceil(WARMUP / chunk), seed=3)
    caches = []
    for t, rows in enumerate(model.vocab_sizes):
        cap = l1_capacity(dataclasses.replace(m, gpucacheper=fraction), rows)
        c = ReferenceCache(cap, DIM, ways=m.cache_ways, policy=m.cache_policy)
        hot = model.popularity_rank_to_key(t, np.arange(min(rows, HOT_KEYS_IN_META)))
        k = np.unique(hot[: c.capacity])
        c.insert(k, np.zeros((len(k), DIM), np.float32))
        caches.append(c)

    def run(batches) -> float:
        hits = unique = 0
        for b in batches:
            for t, c in enumerate(caches):
                u = dedupe(b.cat[:, t])[0]  # the session's dedupe: first-appearance order
                _, hit = c.find(u)
                c.insert(u[~hit], np.zeros((int((~hit).sum()), DIM), np.float32))
                hits, unique = hits + int(hit.sum()), unique + len(u)
        return hits / unique

    return run(cold), (run(warmup), run(warm))[1]


def test_quick_path_hit_rates_speedups_and_predictions(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--quick", "--cpu", "--no-triton", "--rows", str(ROWS), "--work", str(work)]
    argv += ["--out", str(out), "--warmup", str(WARMUP), "--hit-rate-threshold", "1"]
    argv += ["--batches", *map(str, BATCHES), "--alphas", *map(str, ALPHAS)]
    argv += ["--fractions", *map(str, FRACTIONS)]
    assert cli_main(["bench", "e2e", *argv]) == 0  # through `hps bench e2e`
    payload = json.loads((out / "e2e_quick.json").read_text())
    assert (out / "e2e_quick.png").stat().st_size > 0
    assert payload["device"] == "cpu" and payload["triton"] == {"skipped": "--no-triton"}

    sizes = criteo_vocab_sizes(ROWS)
    model = model_spec(work / DATA_DIR, sizes, [DIM] * len(sizes), seed=0, name="dlrm")
    cfg = load_config(work / "e2e_hps.json")
    m = cfg.models[0]
    rows = payload["results"]
    for alpha in ALPHAS:
        for batch in BATCHES:
            for f in FRACTIONS:
                cold, warm = reference_hit_rates(model, m, alpha, batch, f)
                cell = {"alpha": alpha, "batch": batch, "cache_fraction": f}
                for phase, hit_rate in (("cold", cold), ("warm", warm)):
                    [ours] = [r for r in rows if r["mode"] == "ours_cpu" and r["phase"] == phase
                              and r.items() >= cell.items()]  # fmt: skip
                    [base] = [r for r in rows if r["mode"] == "baseline_a" and r["phase"] == phase
                              and r.items() >= cell.items()]  # fmt: skip
                    assert ours["l1_hit_rate"] == hit_rate
                    calls = (
                        reps_for(batch, True) if phase == "warm" else min(reps_for(batch, True), 8)
                    )
                    assert ours["samples"] == base["samples"] == batch * calls
                    assert ours["calls"] == base["calls"] == calls
                    assert ours["speedup_vs_a"] == ours["samples_s"] / base["samples_s"]
                    assert ours["emb_speedup_vs_a"] == ours["emb_samples_s"] / base["emb_samples_s"]

    # ours and baseline A return the table's rows, and the same predictions as the numpy model
    onnx = work / "dlrm_dense" / "1" / "model.onnx"
    bench = Bench(work / "e2e_hps.json", model, onnx, 4096)
    try:
        b = make_batches(model, 1.05, 50, 1, seed=9)[0]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        tables = [model.table(t)[1] for t in range(len(sizes))]
        want = np.concatenate(
            [tables[t][b.rows[:, t] - offsets[t]] for t in range(len(sizes))], axis=1
        )
        ours, base = bench.ours(b), bench.baseline_a(b)
        assert np.array_equal(ours, want) and np.array_equal(base, want)
        prob = dense_forward(load_dense_weights(onnx), b.dense, want)
        np.testing.assert_allclose(bench.dense(b.dense, ours), prob, atol=1e-5)
        np.testing.assert_allclose(bench.dense(b.dense, base), prob, atol=1e-5)
    finally:
        bench.close()


def test_gpu_ceiling_path_with_numpy_standing_in_for_cupy(tmp_path, monkeypatch):
    """The GPU section's logic on any machine: CuPy replaced by NumPy arrays that have .get()."""

    class DeviceArray(np.ndarray):
        def get(self) -> np.ndarray:
            return np.asarray(self)

    fake = types.ModuleType("cupy")
    fake.asarray = lambda a: np.asarray(a).view(DeviceArray)
    fake.asnumpy = np.asarray
    fake.cuda = types.SimpleNamespace(
        Device=lambda: types.SimpleNamespace(synchronize=lambda: None)
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    from hps_core.bench.e2e import build_model
    from hps_core.bench.e2e_gpu import measure_gpu_ceiling

    cfg, model, onnx = build_model(tmp_path, ROWS, DIM, "cpu", 4096)
    bench = Bench(cfg, model, onnx, 4096)
    args = types.SimpleNamespace(batches=[1, 64], alphas=[1.2], quick=True)
    try:
        with Progress(transient=True) as progress:
            rows = measure_gpu_ceiling(bench, args, progress, None, [])
        assert [(r["mode"], r["batch"]) for r in rows] == [
            (m, b) for b in (1, 64) for m in ("ours_gpu", "baseline_b", "device_resident")
        ]
        ours, base, dev = rows[3:]
        assert ours["vs_b"] == ours["emb_samples_s"] / base["emb_samples_s"]
        assert dev["vs_b"] == dev["ours_samples_s"] / dev["gather_samples_s"]
        assert ours["samples"] == base["samples"] == 64 * reps_for(64, quick=True)
        # the L1 hit rate of the device-resident call (over unique keys, as the counters
        # count): about what the caches hold of the replayed keys afterwards (a key that does
        # not fit its set may have been swapped in by the call's own fill)
        first = make_batches(model, 1.2, 64, reps_for(64, quick=True), seed=4)[0]
        caches = [t.cache for t in bench.session.tables]
        uniq = [np.unique(first.cat[:, t]) for t in range(len(caches))]
        held = sum(int(c.contains(u).sum()) for c, u in zip(caches, uniq, strict=True))
        assert dev["l1_hit_rate"] == pytest.approx(held / sum(map(len, uniq)), abs=0.02)
        assert dev["l1_hit_rate"] > 0.9  # L1 holds 100% of each table
        # the GPU table and plot of the report: the ratios as computed above
        payload = {"results": [], "device": "gpu", "rows": ROWS, "gpu_ceiling": rows}
        payload["settings"] = {"batches": [1, 64], "alphas": [1.2], "fractions": [0.1]}
        console = Console(record=True, width=200)
        report.print_tables(console, payload)
        text = console.export_text()
        assert f"{ours['vs_b']:.2f}" in text and f"{dev['vs_b']:.2f}" in text
        report.plot(payload, tmp_path / "gpu.png")
        assert (tmp_path / "gpu.png").stat().st_size > 0
    finally:
        bench.close()


def test_gpu_mode_with_numpy_standing_in_for_cupy(tmp_path):
    """Ours as a GPU run times it, on any machine: the session's device-resident path and the
    float32 dense network over an array module that is NumPy here (CuPy there); baseline A on
    the CPU. Predictions of both paths agree; the cells are paired as on the CPU."""
    from hps_core.bench.e2e import build_model, measure
    from hps_core.dense import DeviceDense
    from hps_core.device import DeviceLookup

    fake = types.ModuleType("cupy")
    fake.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("_")})
    fake.asnumpy = np.asarray
    fake.cuda = types.SimpleNamespace(
        Device=lambda: types.SimpleNamespace(synchronize=lambda: None)
    )
    cfg, model, onnx = build_model(tmp_path, ROWS, DIM, "cpu", 4096)
    bench = Bench(cfg, model, onnx, 4096, gpu=True)
    assert not bench.gpu  # host caches: the CPU path unless a device path is there
    bench.session.device = DeviceLookup(bench.session, xp=fake)
    bench.gpu = True
    bench.gpu_dense = DeviceDense(load_dense_weights(onnx), fake)
    args = types.SimpleNamespace(
        batches=[64], alphas=[1.2], fractions=[0.1], quick=True, warmup=4096
    )
    try:
        b = make_batches(model, 1.2, 64, 1, seed=0)[0]
        want = bench.dense(b.dense, bench.baseline_a(b))
        np.testing.assert_allclose(bench.dense_gpu(b.dense, bench.ours_path(b)), want, atol=1e-5)
        with Progress(transient=True) as progress:
            rows = measure(bench, args, "gpu", progress, None, [])
        assert [(r["mode"], r["phase"]) for r in rows] == [
            ("baseline_a", "cold"), ("ours_gpu", "cold"), ("baseline_a", "warm"), ("ours_gpu", "warm")
        ]  # fmt: skip
        for base, ours in (rows[:2], rows[2:]):
            assert ours["samples"] == base["samples"]
            assert ours["speedup_vs_a"] == ours["samples_s"] / base["samples_s"]
            assert 0 < ours["dense_share"] < 1 and 0 < ours["l1_hit_rate"] <= 1
    finally:
        bench.close()
