"""``hps bench warmup``: what a served instance's first requests and first update cost, with the
kernel warm-up at load (``hps_core.warmup``) and without it, from an empty numba disk cache (a
fresh install) and from a full one.

Each case is a fresh process serving a Criteo-like model (26 tables, the in-process hash-map
VDB, RocksDB, host L1 of 5%) through ``EmbeddingService`` with the ensemble's I/O (``slots``),
as a Triton instance does. It times the load, then in turn: the first request (64 samples),
the first large one (4,096 samples of keys drawn uniformly, so each table's L1 sees thousands
of keys), the first online update (64 rows a table, to L1 and the VDB as the update stream's
sinks apply them), and the median of 30 further requests of 64 samples (steady state). The
update is checked: the updated rows are what a request then gets. The disk-cache cases use the
cache the first warm-up case wrote (``NUMBA_CACHE_DIR``). Prints a table, writes
benchmarks/results/warmup.json and warmup.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .common import RESULTS, machine, positive_int, save

console = Console(width=None if sys.stdout.isatty() else 170)
SMALL, LARGE, UPDATE, STEADY = 64, 4096, 64, 30


def write_model(root: Path, rows: int) -> Path:
    from ..synth import criteo_vocab_sizes, make_model

    model = make_model(root / "model", criteo_vocab_sizes(rows), [16] * 26, name="warm")
    cfg = json.loads(Path(model.config_path).read_text())
    m = cfg["models"][0]
    m.update(deployed_device_list=[], gpucacheper=0.05, max_batch_size=LARGE)
    cfg["volatile_db"] = {"type": "parallel_hash_map", "num_partitions": 8}
    Path(model.config_path).write_text(json.dumps(cfg, indent=2))
    return Path(model.config_path)


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def child(config: str, warm_up: bool) -> dict:
    """In this fresh process: load, then the first requests and update (see the module)."""
    from ..model_io import SparseTable
    from ..serving import EmbeddingService
    from ..updates.ingestor import CacheSink, TierSink

    t0 = time.perf_counter()
    svc = EmbeddingService.from_parameters(
        {"config": config, "io": "slots", "warm_up": str(warm_up).lower()}
    )
    out = {"load_s": time.perf_counter() - t0, "warm_up_s": svc.warm_up_seconds}
    out["rss_load_mib"] = _rss_mib()
    tables = svc.session.tables
    m = svc.server.config.models[0]
    keys = []
    for t, path in enumerate(m.sparse_files):
        with SparseTable.open(path, tables[t].dim) as f:
            keys.append(f.read_all()[0])
    rng = np.random.default_rng(0)

    def request(batch: int, zipf: bool) -> float:
        cols = []
        for k in keys:
            if zipf:
                idx = np.minimum(rng.zipf(1.2, batch) - 1, len(k) - 1)
            else:
                idx = rng.integers(0, len(k), batch)
            cols.append(k[idx])
        cat = np.stack(cols, axis=1)
        t = time.perf_counter()
        (got,) = svc.run_slots([cat])
        if not isinstance(got, np.ndarray):
            raise RuntimeError(f"request failed: {got}")
        return time.perf_counter() - t

    out["first_request_s"] = request(SMALL, True)
    out["first_large_request_s"] = request(LARGE, False)
    sinks = [CacheSink(svc.server), TierSink("vdb", svc.server.vdb)]
    upd = [(k[rng.integers(0, len(k), UPDATE)], t) for k, t in zip(keys, tables, strict=True)]
    rows = [rng.standard_normal((UPDATE, t.dim)).astype(np.float32) for t in tables]
    t = time.perf_counter()
    for (k, tab), r in zip(upd, rows, strict=True):
        for s in sinks:
            s.apply(tab.store_name, k, r)
    out["first_update_s"] = time.perf_counter() - t
    (got,) = svc.run_slots([np.stack([k for k, _ in upd], axis=1)])
    col = 0
    for (k, tab), r in zip(upd, rows, strict=True):  # the last write of a repeated key wins
        last = {int(x): i for i, x in enumerate(k.tolist())}
        want = r[[last[int(x)] for x in k.tolist()]]
        if not np.array_equal(got[:, col : col + tab.dim], want):
            raise RuntimeError(f"table {tab.name}: the update is not what is served")
        col += tab.dim
    out["steady_request_s"] = float(np.median([request(SMALL, True) for _ in range(STEADY)]))
    out["rss_end_mib"] = _rss_mib()
    svc.close()
    return out


def run_case(config: Path, warm_up: bool, cache_dir: Path) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    cmd = [sys.executable, "-m", "hps_core.bench.warmup", "--child", str(config)]
    proc = subprocess.run(
        [*cmd, "--warm-up" if warm_up else "--no-warm-up"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"case failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    """Stacked seconds of the load and the first events, one panel per disk-cache state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [("load_s", "load"), ("first_request_s", "first request"),
             ("first_large_request_s", "first large request"),
             ("first_update_s", "first update")]  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, cache in zip(axes, ("empty cache", "disk cache"), strict=True):
        group = [r for r in rows if r["case"].startswith(cache)]
        x = np.arange(len(group))
        bottom = np.zeros(len(group))
        for key, label in parts:
            v = np.array([r[key] for r in group])
            ax.bar(x, v, bottom=bottom, label=label)
            bottom += v
        ax.set_xticks(x, ["warm-up" if r["warm_up"] else "no warm-up" for r in group])
        ax.set_title(f"numba {cache}", fontsize=10)
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3, axis="y")
    axes[1].legend(fontsize=8)
    fig.suptitle("a served instance (26 tables): load and first events", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--rows", type=positive_int, default=500_000, help="rows of the model, all tables"
    )
    ap.add_argument("--quick", action="store_true", help="a smaller model (the cold cases stay)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                    help=argparse.SUPPRESS)  # fmt: skip
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.warm_up)))
        return 0
    rows = 50_000 if args.quick else args.rows
    results = []
    with tempfile.TemporaryDirectory(prefix="hps-warmup-") as tmp:
        root = Path(tmp)
        config = write_model(root, rows)
        full = root / "numba-full"
        cases = [
            ("empty cache, no warm-up", False, root / "numba-empty-1"),
            ("empty cache, warm-up", True, full),  # fills the cache the next cases use
            ("disk cache, no warm-up", False, full),
            ("disk cache, warm-up", True, full),
        ]
        for name, warm, cache in cases:
            console.print(f"[dim]{name} ...[/dim]")
            results.append({"case": name, "warm_up": warm, **run_case(config, warm, cache)})
    for r in results:
        r["ready_s"] = r["load_s"] + r["first_request_s"] + r["first_large_request_s"]
        r["ready_s"] += r["first_update_s"]
    t = Table(title=f"served instance, 26 tables, {rows:,} rows: load and first events (s)")
    cols = ("case", "load (warm-up)", "first request", "first large", "first update",
            "steady request", "load + first three", "RSS at load / end MiB")  # fmt: skip
    for c in cols:
        t.add_column(c, justify="right")
    for r in results:
        wu = f" ({r['warm_up_s']:.2f})" if r["warm_up_s"] is not None else ""
        t.add_row(r["case"], f"{r['load_s']:.2f}{wu}", f"{r['first_request_s']:.3f}",
                  f"{r['first_large_request_s']:.3f}", f"{r['first_update_s']:.3f}",
                  f"{r['steady_request_s']:.4f}", f"{r['ready_s']:.1f}",
                  f"{r['rss_load_mib']:.0f} / {r['rss_end_mib']:.0f}")  # fmt: skip
    console.print(t)
    by = {r["case"]: r for r in results}
    ratios = {}
    for cache in ("empty cache", "disk cache"):
        on, off = by[f"{cache}, warm-up"], by[f"{cache}, no warm-up"]
        ratios[cache] = {
            "first_request_over_steady": [
                off["first_request_s"] / off["steady_request_s"],
                on["first_request_s"] / on["steady_request_s"],
            ],
            "ready_with_over_without": on["ready_s"] / off["ready_s"],
        }
        console.print(
            f"{cache}: first request / steady request {ratios[cache]['first_request_over_steady'][0]:.0f}x "  # noqa: E501
            f"without the warm-up, {ratios[cache]['first_request_over_steady'][1]:.1f}x with it; "
            f"load + first three events {ratios[cache]['ready_with_over_without']:.2f}x"
        )
    name = "warmup_quick" if args.quick else "warmup"
    path = save(name, {"machine": machine(), "rows": rows, "cases": results, "ratios": ratios})
    plot(results, RESULTS / f"{name}.png")
    console.print(f"wrote {path} and {name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
