"""The GPU part of the end-to-end benchmark: ours with every key in L1 vs a dense gather.

Baseline B holds the whole model as one CuPy array [rows, dim] (the tables stacked) and gathers
rows by index: no hashing, no sets, the ceiling of any cache. Ours runs with L1 as HPS's static
table (the whole of each table, open addressing, no eviction), on batches replayed after one
pass (so every key is cached). Both sides take host arrays and return host arrays, as the
serving path does (``ours_gpu``, ``baseline_b``); the same comparison with the rows left on the
device on both sides (``device_resident``: the session's device-resident path against the
gather) shows what the copy of the rows back to the host costs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.progress import Progress

from .e2e import Batch, Bench, make_batches, out_of_time, reps_for, summarize


def measure_gpu_ceiling(
    bench: Bench, args, progress: Progress, deadline: float | None, skipped: list
) -> list[dict]:
    """Ours with every key in L1 vs one dense CuPy table gathered by row index, embeddings only."""
    import cupy as cp

    dims = set(bench.model.dims)
    assert len(dims) == 1, "baseline B stacks the tables: one dim for all"
    dim = dims.pop()
    table = cp.asarray(
        np.concatenate(
            [
                np.fromfile(Path(p) / "emb_vector", "<f4").reshape(-1, dim)
                for p in bench.model.table_paths
            ]
        )
    )

    def gather_host(b: Batch) -> np.ndarray:
        return gather_rows(table, b)

    bench.set_l1(1.0, static=True)  # HPS's static table: every key of the model fits
    rows: list[dict] = []
    alpha = args.alphas[0]
    task = progress.add_task("GPU all-hit vs dense gather", total=len(args.batches))
    for batch in args.batches:
        if out_of_time(deadline, skipped, section="gpu_ceiling", alpha=alpha, batch=batch):
            progress.advance(task)
            continue
        n = reps_for(batch, args.quick)
        replay = make_batches(bench.model, alpha, batch, n, seed=4)
        for b in replay:  # the first pass puts every key in L1; the timed pass replays
            bench.ours(b)
        bench.session.flush()
        assert np.array_equal(bench.ours(replay[0]), gather_host(replay[0])), "ours != gather"
        cell = {"alpha": alpha, "batch": batch, "phase": "all_hits", "cache_fraction": 1.0}
        ours, base = bench.ours_timed(replay, ("b", gather_host), dense=False)
        dev = device_resident(bench, table, replay)
        rows.append(
            {
                **cell,
                "mode": "ours_gpu",
                **ours,
                "vs_b": ours["emb_samples_s"] / base["emb_samples_s"],
            }
        )
        rows.append({**cell, "mode": "baseline_b", **base})
        rows.append(
            {
                **cell,
                "mode": "device_resident",
                "ours_samples_s": dev["ours"]["emb_samples_s"],
                "gather_samples_s": dev["gather"]["emb_samples_s"],
                "ours_p50_ms": dev["ours"]["emb_p50_ms"],
                "gather_p50_ms": dev["gather"]["emb_p50_ms"],
                "l1_hit_rate": dev["hit_rate"],
                "vs_b": dev["ours"]["emb_samples_s"] / dev["gather"]["emb_samples_s"],
            }
        )
        progress.advance(task)
    return rows


def device_resident(bench: Bench, table, replay: list[Batch]) -> dict:
    """Rows left on the GPU on both sides, host arrays in: ours (the session's device-resident
    path: host dedupe, one copy in, a find per table, the gather) vs baseline B's copy of the
    row indices and its gather. Each call ends with the device synchronised."""
    import cupy as cp

    h0, u0 = bench.l1_counts()
    assert np.array_equal(cp.asnumpy(bench.ours_path(replay[0])), gather_rows(table, replay[0]))
    h1, u1 = bench.l1_counts()

    def gather(b: Batch) -> None:
        table[cp.asarray(b.rows)].reshape(len(b), -1)
        cp.cuda.Device().synchronize()

    out = {"hit_rate": (h1 - h0) / max(u1 - u0, 1)}
    n, samples = len(replay), sum(len(b) for b in replay)
    for label, fn in (("ours", bench.ours_path), ("gather", gather)):
        fn(replay[0])
        times = np.zeros(n)
        for i, b in enumerate(replay):
            t0 = time.perf_counter()
            fn(b)
            times[i] = time.perf_counter() - t0
        out[label] = summarize(times, np.zeros(n), samples)
    return out


def gather_rows(table, b: Batch) -> np.ndarray:
    """Baseline B's rows of a batch, on the host."""
    import cupy as cp

    return table[cp.asarray(b.rows)].reshape(len(b), -1).get()
