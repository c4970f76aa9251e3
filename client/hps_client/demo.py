"""``make demo``: Triton with the example ensemble on the embedded default tiers, real requests.

Writes ``model_repository/`` (a generated Criteo-like model, the dense ONNX model, configs),
fills the shared-memory VDB and RocksDB, starts the pip-installed tritonserver with our
backends, checks answers over HTTP and gRPC against the in-process reference, serves a Zipf
stream, prints predictions, latency and per-level hit rates from ``/metrics``, and stops.
"""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console
from rich.table import Table

from hps_core.launcher import stopped_by_signals
from hps_core.repo import HPS_MODEL, serving
from hps_core.session import LEVELS
from hps_core.workload import zipf_batches

from .client import HPSClient
from .metrics import samples, scrape
from .reference import Reference

console = Console()


def run_demo(repo: str, *, rows: int, dim: int, batches: int, batch_size: int) -> int:
    console.rule(f"model repository {repo}: generate (once), fill the tiers, start Triton")
    t0 = time.perf_counter()
    spill = lambda note: console.print(f"[yellow]note:[/] {note}")  # noqa: E731
    with (
        stopped_by_signals(),  # SIGTERM stops the demo as Ctrl-C does: nothing left running
        serving(repo, rows=rows, dim=dim, progress=True, spill=spill) as (spec, server),
    ):
        console.print(
            f"Triton ready in {time.perf_counter() - t0:.1f} s: HTTP {server.http_url}, "
            f"gRPC {server.grpc_url}; models {spec.ensemble} = {spec.embedding} -> {spec.dense}, "
            f"and {HPS_MODEL} (HugeCTR KEYS/NUMKEYS I/O)",
            highlight=False,
        )
        ref = Reference(spec.root)
        try:
            if not _check(spec, server, ref):
                return 1
        finally:
            ref.close()
        _load(spec, server, batches, batch_size)
        _hit_rates(server, spec.embedding)
    console.print("server stopped, shared memory released")
    return 0


def _check(spec, server, ref: Reference) -> bool:
    console.rule("answers over HTTP and gRPC vs the in-process reference")
    stream = zipf_batches(spec, 256, seed=7)
    worst = 0.0
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        with HPSClient(url, protocol) as c:
            dense, cat = next(stream)
            cat[::17, 3] = -(2**62) + np.arange(len(cat[::17]))  # keys no table holds
            prob = c.predict(dense, cat, model=spec.ensemble)
            want = ref.predict(dense, cat)
            worst = max(worst, float(np.max(np.abs(prob - want))))
            keys = np.ascontiguousarray(cat[:32].T).ravel()
            counts = np.full(spec.slots, 32, np.int32)
            same = np.array_equal(c.lookup(keys, counts), ref.lookup(keys, counts))
            console.print(
                f"{protocol}: {len(cat)} predictions, max |diff| {np.max(np.abs(prob - want)):.2e}; "
                f"{len(keys)} KEYS/NUMKEYS lookups {'equal' if same else 'DIFFER from'} the reference",
                highlight=False,
            )
            if not same:
                return False
    table = Table(title="first predictions (PROB)")
    table.add_column("sample")
    table.add_column("CAT[0:3]")
    table.add_column("Triton", justify="right")
    table.add_column("reference", justify="right")
    for i in range(5):
        table.add_row(str(i), str(cat[i, :3].tolist()), f"{prob[i, 0]:.6f}", f"{want[i, 0]:.6f}")
    console.print(table)
    if worst > 1e-5:
        console.print(f"[red]predictions differ from the reference by {worst:.2e}[/red]")
        return False
    return True


def _load(spec, server, batches: int, batch_size: int) -> None:
    console.rule(f"serving a Zipf(1.05) stream: {batches} requests of {batch_size} samples")
    stream = zipf_batches(spec, batch_size, seed=11)
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        lat = []
        with HPSClient(url, protocol) as c:
            for _ in range(batches):
                dense, cat = next(stream)
                t = time.perf_counter()
                c.predict(dense, cat, model=spec.ensemble)
                lat.append(time.perf_counter() - t)
        ms = np.array(lat) * 1e3
        console.print(
            f"{protocol}: {batches * batch_size / sum(lat):,.0f} samples/s "
            f"({batches * batch_size * spec.slots / sum(lat):,.0f} keys/s), latency p50 "
            f"{np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms (one client)",
            highlight=False,
        )


def _hit_rates(server, model: str) -> None:
    keys = dict.fromkeys(LEVELS, 0.0)
    for labels, value in samples(scrape(server.metrics_url), "hps_keys_total", model=model):
        keys[labels["level"]] += value
    total = sum(keys.values()) or 1.0
    table = Table(title=f"unique keys served per level ({model}, from Triton's /metrics)")
    for level in LEVELS:
        table.add_column(level, justify="right")
    table.add_row(*(f"{keys[lv] / total:.1%}" for lv in LEVELS))
    console.print(table)
