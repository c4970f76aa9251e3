"""``make perf``: perf_analyzer against the ensemble and the embedding model, in one run.

1. The ensemble ``dlrm`` at batch 1..4096 (one sample per perf_analyzer data entry, ``-b``
   batches them): inferences/s, samples/s, p50/p99 latency.
2. ``hps_embedding`` (HugeCTR KEYS/NUMKEYS I/O) with 1024 samples x 26 tables per request,
   beside the in-process ``HPS.lookup`` of the same keys on the same tiers: the ratio of keys/s.
3. Host memory of the serving processes with 1 and with 4 instances per model (RSS and PSS:
   the shared-memory VDB is counted once per process in RSS, once in all in PSS).

Writes benchmarks/results/perf.json and perf.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

from hps_core.bench.common import RESULTS, machine, save
from hps_core.bench.perf_analyzer import run_perf
from hps_core.launcher import TritonServer
from hps_core.repo import HPS_MODEL, preload, release_shared, write_repository
from hps_core.serving import serving_config
from hps_core.workload import write_perf_data, zipf_batches

from .client import HPSClient

console = Console()


def in_process_keys_s(spec, batch: int, requests: int = 40) -> float:
    """Keys/s of HPS.lookup, table by table, on the same tiers and the same kind of stream."""
    from hps_core.hps import HPS

    cfg, model = serving_config(spec.config, spec.model, preloaded=True)
    stream = zipf_batches(spec, batch, seed=batch)
    with HPS(cfg) as hps:
        for _ in range(10):  # warm the L1 cache as the server's is
            _, cat = next(stream)
            for t in range(spec.slots):
                hps.lookup(cat[:, t], model, t)
        t0 = time.perf_counter()
        for _ in range(requests):
            _, cat = next(stream)
            for t in range(spec.slots):
                hps.lookup(np.ascontiguousarray(cat[:, t]), model, t)
        return requests * batch * spec.slots / (time.perf_counter() - t0)


def serving_memory(server: TritonServer) -> dict:
    """RSS and PSS (MiB) of tritonserver and its backend stubs, in all and per process
    (``by_process``: "pid name model" -> RSS MiB; a stub's model is its model.py's folder)."""
    procs = [psutil.Process(server.proc.pid)]
    procs += procs[0].children(recursive=True)
    rss = pss = 0
    by_process = {}
    for p in procs:
        try:
            m = p.memory_full_info()
            args = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss, pss = rss + m.rss, pss + m.pss
        model = Path(args[1]).parent.parent.name if len(args) > 1 and "stub" in p.name() else ""
        by_process[f"{p.pid} {p.name()} {model}".strip()] = round(m.rss / 2**20, 1)
    return {
        "processes": len(procs),
        "rss_mib": rss / 2**20,
        "pss_mib": pss / 2**20,
        "by_process": by_process,
    }


def memory_by_instances(root: Path, rows: int, dim: int, counts=(1, 4)) -> list[dict]:
    """Serving memory with 1 and 4 instances per model of a table of rows x dim."""
    out = []
    for n in counts:
        spec = write_repository(root, rows=rows, dim=dim, instances=n)
        preload(spec.config)
        with TritonServer(root, models=[spec.ensemble, HPS_MODEL]) as server:
            with HPSClient(server.grpc_url, "grpc") as c:
                for dense, cat in _take(zipf_batches(spec, 512, seed=3), 20):
                    c.predict(dense, cat, model=spec.ensemble)
            out.append(
                {"instances": n, "table_mib": rows * dim * 4 / 2**20, **serving_memory(server)}
            )
        release_shared(spec.config)
    return out


def _take(it, n):
    for _ in range(n):
        yield next(it)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["ensemble"]
    b = [r["batch"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(b, [r["samples_s"] for r in rows], "o-")
    ax[0].set_xscale("log", base=2)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("batch (samples per request)")
    ax[0].set_ylabel("samples/s")
    ax[0].set_title("ensemble throughput (perf_analyzer, gRPC)")
    ax[1].plot(b, [r["p50_us"] / 1e3 for r in rows], "o-", label="p50")
    ax[1].plot(b, [r["p99_us"] / 1e3 for r in rows], "s-", label="p99")
    ax[1].set_xscale("log", base=2)
    ax[1].set_yscale("log")
    ax[1].set_xlabel("batch")
    ax[1].set_ylabel("latency, ms")
    ax[1].legend()
    ax[1].set_title("ensemble latency")
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batches", default="1,16,128,1024,4096")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0, help="perf_analyzer window")
    ap.add_argument("--mem-rows", type=int, default=4_000_000, help="rows of the memory test")
    ap.add_argument("--mem-dim", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="small model, two batch sizes")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.batches, args.seconds, args.mem_rows = 100_000, "1,256", 1.0, 400_000
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(tempfile.mkdtemp(prefix="hps-perf-"))
    payload: dict = {"machine": machine(), "rows": args.rows, "dim": args.dim}
    try:
        root = work / "repo"
        spec = write_repository(root, rows=args.rows, dim=args.dim, instances=1)
        preload(spec.config, progress=True)
        per = 1024
        # the in-process baseline before and after the server runs; the faster one counts
        inproc = [in_process_keys_s(spec, per)]
        with TritonServer(root, models=[spec.ensemble, HPS_MODEL]) as server:
            console.print(f"Triton on {server.grpc_url}; perf_analyzer windows of {args.seconds} s")
            data = write_perf_data(spec, work / "ensemble.json", 4096, "ensemble")
            payload["ensemble"] = []
            for b in batches:
                r = run_perf(
                    spec.ensemble, server.grpc_url, data, b, args.concurrency, args.seconds
                )
                payload["ensemble"].append(r)
                console.print(
                    f"ensemble batch {b}: {r['samples_s']:,.0f} samples/s, "
                    f"p50 {r['p50_us'] / 1e3:.2f} ms, p99 {r['p99_us'] / 1e3:.2f} ms",
                    highlight=False,
                )
            hdata = write_perf_data(spec, work / "hps.json", 32, "hps", keys_per_table=per)
            h = run_perf(HPS_MODEL, server.grpc_url, hdata, 1, 1, args.seconds)
            h["keys_s"] = h["requests_s"] * per * spec.slots
        inproc.append(in_process_keys_s(spec, per))
        payload["embedding_vs_in_process"] = {
            **h,
            "keys_per_request": per * spec.slots,
            "in_process_keys_s": max(inproc),
            "in_process_runs_keys_s": inproc,
            "ratio": h["keys_s"] / max(inproc),
        }
        payload["load_average"] = os.getloadavg()
        release_shared(spec.config)
        payload["memory"] = memory_by_instances(work / "mem", args.mem_rows, args.mem_dim)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    t = Table(title=f"ensemble via Triton (perf_analyzer, gRPC, concurrency {args.concurrency})")
    for c in ("batch", "requests/s", "samples/s", "p50 ms", "p99 ms"):
        t.add_column(c, justify="right")
    for r in payload["ensemble"]:
        t.add_row(
            f"{r['batch']:,}",
            f"{r['requests_s']:,.1f}",
            f"{r['samples_s']:,.0f}",
            f"{r['p50_us'] / 1e3:.2f}",
            f"{r['p99_us'] / 1e3:.2f}",
        )
    console.print(t)
    e = payload["embedding_vs_in_process"]
    console.print(
        f"hps_embedding, {e['keys_per_request']:,} keys per request: {e['keys_s']:,.0f} keys/s via "
        f"Triton vs {e['in_process_keys_s']:,.0f} in process (HPS.lookup): {e['ratio']:.0%}",
        highlight=False,
    )
    t = Table(title="host memory of tritonserver + backend stubs")
    for c in ("instances per model", "processes", "table MiB", "RSS MiB", "PSS MiB"):
        t.add_column(c, justify="right")
    for m in payload["memory"]:
        t.add_row(
            str(m["instances"]),
            str(m["processes"]),
            f"{m['table_mib']:,.0f}",
            f"{m['rss_mib']:,.0f}",
            f"{m['pss_mib']:,.0f}",
        )
    m1, m4 = payload["memory"][0], payload["memory"][-1]
    payload["memory_pss_ratio"] = m4["pss_mib"] / m1["pss_mib"]
    console.print(
        f"PSS with {m4['instances']} instances per model / with {m1['instances']}: "
        f"{payload['memory_pss_ratio']:.2f}x",
        highlight=False,
    )
    console.print(t)
    name = "perf_quick" if args.quick else "perf"
    save(name, payload)
    plot(payload, RESULTS / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
