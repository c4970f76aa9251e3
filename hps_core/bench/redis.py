"""Redis VDB: fetch keys/s beside ``redis-benchmark``, and update freshness under sustained load.

Starts a local standalone Redis and a local 3-node Redis Cluster (deploy/redis/redis-local.sh,
run from the repository root), so every number comes from one run on one machine:

- fetch: ``RedisVDB.fetch`` keys/s (dim 64 fp32, random keys of a loaded table) per batch size,
  standalone and cluster, each measurement paired with a ``redis-benchmark -P 16 -t get`` run
  on the same server(s) just before it (one shard; target: ours >= 1x that), over a few rounds:
  the ratio of the median round and the spread. One caller (a fetch at a time, the harder
  case), and ``CALLERS`` concurrent callers as model instances sharing a Redis issue them
  (redis-benchmark itself runs 50 clients);
- multi-table lookups: 26 tables through a lookup session, fused (one Redis pipeline for every
  table's L1 misses) against one table at a time, p50 latency per batch;
- freshness: a publisher process sends row updates at ``--rate`` rows/s for ``--seconds``; an
  ingestor applies them to the standalone VDB; publish-to-visible p50/p99 and the rows/s
  actually sustained.

Prints tables, writes benchmarks/results/redis.json and redis.png.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ..launcher import free_ports
from ..metrics import Registry
from ..updates import connect
from ..updates.ingestor import Ingestor, TierSink
from ..updates.versions import VersionStore
from ..vdb.redis import RedisVDB
from .common import RESULTS, machine, paired, positive_float, positive_int, rate, save

console = Console()
SCRIPT = Path("deploy") / "redis" / "redis-local.sh"

PUBLISHER = r"""
import sys, time
import numpy as np
from hps_core.updates import Publisher, connect
addr, table, dim, rate, seconds, rows = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:7])
dim, rows = int(dim), int(rows)
pub = Publisher(connect(addr))
rng = np.random.default_rng(0)
tick = 0.05
per = max(1, int(rate * tick))
pool = [rng.standard_normal((per, dim)).astype(np.float32) for _ in range(4)]
sent, start = 0, time.monotonic()
while time.monotonic() - start < seconds:
    pub.publish(table, rng.integers(0, rows, per), pool[sent // per % 4])
    sent += per
    ahead = sent / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
print(sent, time.monotonic() - start)
"""


def redis_local(*args: str) -> None:
    if not SCRIPT.exists():
        raise SystemExit(f"{SCRIPT} not found: run the benchmark from the repository root")
    subprocess.run([str(SCRIPT), *args], check=True, capture_output=True, timeout=120)


def redis_benchmark(port: int, requests: int, cluster: bool = False, test: str = "get") -> float:
    """Requests/s of redis-benchmark ``-t test`` with 16 pipelined requests and 256-byte values
    over 100K keys (``--cluster``: against every shard of the cluster ``port`` belongs to).
    GETs read the values an earlier ``test="set"`` run wrote."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return float("nan")
    cmd = [exe, "-p", str(port), "-P", "16", "-t", test, "-d", "256", "-r", "100000"]
    cmd += ["--cluster"] if cluster else []
    out = subprocess.run(
        [*cmd, "-n", str(requests), "--csv"], check=True, capture_output=True, text=True
    ).stdout
    for row in csv.reader(io.StringIO(out)):
        if row and row[0] == test.upper():
            return float(row[1])
    return float("nan")


CALLERS = 2  # concurrent fetch callers in the second measurement (redis-benchmark runs 50)


def callers_rate(fetch, make_input, items: int, callers: int, calls: int) -> float:
    """Items per second of ``callers`` threads each making ``calls`` calls of fetch (fresh
    inputs), as several model instances share one Redis."""
    inputs = [[make_input() for _ in range(calls)] for _ in range(callers)]
    failed: list[BaseException] = []

    def work(xs):
        try:
            for x in xs:
                fetch(x)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            failed.append(e)

    threads = [threading.Thread(target=work, args=(xs,)) for xs in inputs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]
    return callers * calls * items / (time.perf_counter() - t0)


def bench_fetch(
    vdb: RedisVDB, mode: str, rows: int, dim: int, batches: list[int], rb_port: int,
    rounds: int = 3, rb_requests: int = 400_000,
) -> list[dict]:  # fmt: skip
    """Fetch keys/s per batch size, each measurement paired with a redis-benchmark run on the
    same server(s) just before it: ``rounds`` rounds of (redis-benchmark, one caller,
    ``CALLERS`` callers), the ratio taken within each round, reported as the median round
    with the spread. Pairing keeps a shared machine's swings out of the ratio."""
    rng = np.random.default_rng(1)
    keys = np.arange(rows, dtype=np.int64) * 7919 - rows
    vecs = rng.standard_normal((rows, dim)).astype(np.float32)
    vdb.create_table("bench", dim)
    for s in range(0, rows, 65536):
        vdb.upsert("bench", keys[s : s + 65536], vecs[s : s + 65536])
    held = vdb.memory_bytes("bench") / (keys.nbytes + vecs.nbytes)  # Redis bytes / raw bytes
    cluster = mode == "cluster"
    redis_benchmark(rb_port, 400_000, cluster, test="set")  # the values its GETs read
    fetch = lambda q: vdb.fetch("bench", q)  # noqa: E731
    out = []
    for b in batches:
        idx = rng.integers(0, rows, b)
        got, found = vdb.fetch("bench", keys[idx])
        assert found.all() and np.array_equal(got, vecs[idx]), "Redis VDB rows differ"
        batch = lambda b=b: keys[rng.integers(0, rows, b)]  # noqa: E731

        def measure(b=b, batch=batch) -> dict[str, float]:
            return {
                "rb": redis_benchmark(rb_port, rb_requests * (3 if cluster else 1), cluster),
                "one": rate(fetch, batch, b, min_seconds=0.5, max_reps=40),
                "many": callers_rate(fetch, batch, b, CALLERS, max(4, 40_000 // b)),
            }

        mid, runs, (lo, hi) = paired(measure, rounds, "one", "rb")
        many = sorted(x["many"] / x["rb"] for x in runs)
        out.append(
            {
                "mode": mode,
                "dim": dim,
                "batch": b,
                "keys_s": mid["one"],
                "redis_benchmark_rps": mid["rb"],
                "vs_redis_benchmark_same_shards": mid["one"] / mid["rb"],
                "vs_redis_benchmark_same_shards_range": [lo, hi],
                "callers": CALLERS,
                "callers_keys_s": float(np.median([x["many"] for x in runs])),
                "callers_vs_redis_benchmark_same_shards": float(np.median(many)),
                "callers_vs_redis_benchmark_same_shards_range": [many[0], many[-1]],
                "rounds": [
                    {
                        "redis_benchmark_rps": x["rb"],
                        "keys_s": x["one"],
                        "callers_keys_s": x["many"],
                    }
                    for x in runs
                ],
                "memory_over_raw": held,
            }
        )
    vdb.drop_table("bench")
    return out


def bench_tables(addr: str, tables: int, rows: int, dim: int, batches: list[int]) -> list[dict]:
    """p50 latency of a lookup of ``tables`` tables through a session over this Redis (host L1
    of 10% per table, Zipf 1.05 keys, warm): fused (L1 for all tables in one call, then one
    pipeline for every table's misses) against one table at a time. Same keys, calls paired."""
    from ..cache.host import HostCache
    from ..session import LookupSession, TableRuntime

    vdb = RedisVDB(addr, num_partitions=8)
    rng = np.random.default_rng(5)
    names = [f"hps_et.bench.t{t}" for t in range(tables)]
    for name in names:
        vdb.create_table(name, dim)
        keys = np.arange(rows, dtype=np.int64)
        vdb.upsert(name, keys, rng.standard_normal((rows, dim)).astype(np.float32))

    def session(label: str) -> LookupSession:
        runtimes = [
            TableRuntime(n, n, dim, 0.0, cache=HostCache(max(8, rows // 10), dim)) for n in names
        ]
        return LookupSession(label, runtimes, vdb, None)

    fused, per_table = session("fused"), session("per_table")
    per_table.fused.run = lambda *a: None  # one table at a time
    out = []
    for b in batches:
        cats = [np.minimum(rng.zipf(1.05, (b, tables)) - 1, rows - 1) for _ in range(300)]
        times: dict[str, list[float]] = {"fused": [], "per_table": []}
        for i, cat in enumerate(cats):
            for label, s in (("fused", fused), ("per_table", per_table)):
                t0 = time.perf_counter()
                s.lookup_columns(cat)
                if i >= 100:  # the first 100 calls warm the caches
                    times[label].append(time.perf_counter() - t0)
        p50 = {k: float(np.median(v)) for k, v in times.items()}
        out.append(
            {
                "tables": tables,
                "dim": dim,
                "batch": b,
                "fused_p50_ms": p50["fused"] * 1e3,
                "per_table_p50_ms": p50["per_table"] * 1e3,
                "speedup": p50["per_table"] / p50["fused"],
            }
        )
    for s in (fused, per_table):
        s.close()
    for name in names:
        vdb.drop_table(name)
    vdb.close()
    return out


def bench_freshness(addr: str, dim: int, rows_s: float, seconds: float, rows: int) -> dict:
    client = connect(addr)
    client.delete("hps_updates", "hps_updates:dead")
    vdb = RedisVDB(addr, num_partitions=8)
    vdb.create_table("hps_et.bench.t", dim)
    reg = Registry()
    ing = Ingestor(
        client,
        [TierSink("vdb", vdb)],
        VersionStore(vdb, "bench"),
        group="bench",
        batch_entries=8,
        block_ms=20,
        registry=reg,
    )
    pub = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, addr, "hps_et.bench.t", str(dim), str(rows_s)]
        + [str(seconds), str(rows)],
        stdout=subprocess.PIPE,
        text=True,
    )
    start = time.monotonic()
    while pub.poll() is None or ing.lag() > 0:
        ing.step(20)
        if time.monotonic() - start > seconds + 60:
            break
    elapsed = time.monotonic() - start
    sent, pub_s = pub.communicate()[0].split()
    applied = reg.counter("hps_update_rows_total", "", ("group",)).value(group="bench")
    h = reg.histogram("hps_update_freshness_seconds", "", ("group",))
    samples = sorted(h._series[("bench",)].samples)
    vdb.drop_table("hps_et.bench.t")
    vdb.close()
    return {
        "target_rows_s": rows_s,
        "seconds": seconds,
        "published_rows": int(sent),
        "published_rows_s": int(sent) / float(pub_s),
        "applied_rows_distinct_per_batch": int(applied),
        "ingest_wall_s": elapsed,
        "entries": h.count(group="bench"),
        "p50_s": h.quantile(0.5, group="bench"),
        "p99_s": h.quantile(0.99, group="bench"),
        "max_s": samples[-1] if samples else None,
        "samples_s": samples[:: max(1, len(samples) // 500)],
    }


def plot(fetch: list[dict], rb: float, fresh: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in ("standalone", "cluster"):
        rs = [r for r in fetch if r["mode"] == mode]
        a.plot([r["batch"] for r in rs], [r["keys_s"] / 1e6 for r in rs], "o-", label=mode)
    a.axhline(rb / 1e6, color="gray", ls="--", label="redis-benchmark -P 16 GET (1 shard)")
    a.set_xscale("log", base=2)
    a.set_xlabel("keys per fetch")
    a.set_ylabel("M keys/s")
    a.set_title("Redis VDB fetch, dim 64 fp32")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    xs = np.array(fresh["samples_s"]) * 1e3
    if len(xs):
        b.plot(np.sort(xs), np.linspace(0, 1, len(xs)))
    b.axvline(fresh["p50_s"] * 1e3, color="g", ls="--", label=f"p50 {fresh['p50_s'] * 1e3:.0f} ms")
    b.axvline(fresh["p99_s"] * 1e3, color="r", ls="--", label=f"p99 {fresh['p99_s'] * 1e3:.0f} ms")
    b.set_xlabel("publish -> visible (ms)")
    b.set_ylabel("fraction of update entries")
    b.set_title(f"freshness at {fresh['published_rows_s'] / 1e3:.0f}K rows/s")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=positive_int, default=500_000, help="rows of the fetch table")
    ap.add_argument("--batches", type=positive_int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--rate", type=positive_float, default=100_000, help="update rows/s to publish")
    ap.add_argument(
        "--seconds", type=positive_float, default=60, help="how long to publish updates"
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, 5 s of updates")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.seconds = 100_000, min(args.seconds, 5)
    dim = 64
    with tempfile.TemporaryDirectory(prefix="hps-redis-bench-") as tmp:
        ports = free_ports(4, redis_cluster=True)
        try:
            redis_local("standalone", f"{tmp}/s", str(ports[0]))
            redis_local("cluster", f"{tmp}/c", *map(str, ports[1:]))
            single = f"127.0.0.1:{ports[0]}"
            cluster = ",".join(f"127.0.0.1:{p}" for p in ports[1:])
            # runs of under a second gave erratic rates (--cluster most of all)
            rounds, rb_n = (2, 200_000) if args.quick else (3, 400_000)
            # paired with redis-benchmark on the same server(s): one shard, then the same tool
            # on the same three shards (what a Redis client gets from them here)
            fetch = bench_fetch(
                RedisVDB(single, num_partitions=8), "standalone", args.rows, dim, args.batches,
                ports[0], rounds, rb_n,
            )  # fmt: skip
            fetch += bench_fetch(
                RedisVDB(cluster, num_partitions=24), "cluster", args.rows, dim, args.batches,
                ports[1], rounds, rb_n,
            )  # fmt: skip
            multi = bench_tables(single, 26, 20_000 if not args.quick else 2_000, 16, [1, 32, 256])
            fresh = bench_freshness(single, dim, args.rate, args.seconds, args.rows)
        finally:
            for d in ("s", "c"):
                subprocess.run([str(SCRIPT), "stop", f"{tmp}/{d}"], capture_output=True)
    rb = float(np.median([r["redis_benchmark_rps"] for r in fetch if r["mode"] == "standalone"]))
    rb_cluster = float(
        np.median([r["redis_benchmark_rps"] for r in fetch if r["mode"] == "cluster"])
    )
    t = Table(
        title=f"Redis VDB fetch, dim {dim}, {args.rows:,} rows (redis-benchmark GET, median: "
        f"{rb / 1e6:.2f} M req/s standalone, {rb_cluster / 1e6:.2f} M on the 3-node cluster; "
        "ratios paired with the run just before, median round [min-max])"
    )
    cols = ("mode", "batch", "M keys/s", "vs redis-benchmark per shard")
    cols += ("vs redis-benchmark, same shards", f"{CALLERS} callers, same shards")
    for c in (*cols, "Redis bytes / raw"):
        t.add_column(c, justify="right")
    for r in fetch:
        shards = 3 if r["mode"] == "cluster" else 1
        # a cluster shard's rate is the standalone server's (the same binary, machine, tool)
        r["vs_redis_benchmark_per_shard"] = (
            r["keys_s"] / shards / rb if shards > 1 else r["vs_redis_benchmark_same_shards"]
        )
        lo, hi = r["vs_redis_benchmark_same_shards_range"]
        clo, chi = r["callers_vs_redis_benchmark_same_shards_range"]
        t.add_row(
            r["mode"],
            f"{r['batch']:,}",
            f"{r['keys_s'] / 1e6:.2f}",
            f"{r['vs_redis_benchmark_per_shard']:.2f}x",
            f"{r['vs_redis_benchmark_same_shards']:.2f}x [{lo:.2f}-{hi:.2f}]",
            f"{r['callers_vs_redis_benchmark_same_shards']:.2f}x [{clo:.2f}-{chi:.2f}]",
            f"{r['memory_over_raw']:.2f}x",
        )
    console.print(t)
    t = Table(title="26-table lookups over standalone Redis, p50 latency (host L1 10%, warm)")
    for c in ("batch", "fused ms", "one table at a time ms", "speedup"):
        t.add_column(c, justify="right")
    for r in multi:
        t.add_row(
            f"{r['batch']:,}",
            f"{r['fused_p50_ms']:.2f}",
            f"{r['per_table_p50_ms']:.2f}",
            f"{r['speedup']:.1f}x",
        )
    console.print(t)
    t = Table(title="update freshness (publish -> visible in the VDB)")
    for c in ("target rows/s", "published rows/s", "seconds", "entries", "p50 ms", "p99 ms"):
        t.add_column(c, justify="right")
    t.add_row(
        f"{args.rate:,.0f}",
        f"{fresh['published_rows_s']:,.0f}",
        f"{fresh['seconds']:.0f}",
        f"{fresh['entries']:,}",
        f"{fresh['p50_s'] * 1e3:.1f}",
        f"{fresh['p99_s'] * 1e3:.1f}",
    )
    console.print(t)
    name = "redis_quick" if args.quick else "redis"
    path = save(
        name,
        {
            "machine": machine(),
            "redis_benchmark_get_rps": rb,
            "redis_benchmark_cluster_get_rps": rb_cluster,
            "redis_benchmark": "redis-benchmark -P 16 -t get -d 256 -r 100000 (values written "
            "by -t set first), run just before each fetch measurement on the same server(s) "
            "(400K requests, 1.2M on the cluster); the get_rps fields are medians",
            "fetch": fetch,
            "multi_table": multi,
            "freshness": fresh,
            "targets": {
                "fetch_vs_redis_benchmark_per_shard": ">= 1x",
                "freshness_at": ">= 100K rows/s",
            },
        },
    )
    plot(fetch, rb, fresh, RESULTS / f"{name}.png")
    console.print(f"wrote {path} and {name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
