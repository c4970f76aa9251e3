"""L1 cache benchmark: find/insert throughput, hit rate vs the oracle top-C, latency percentiles.

Find throughput is reported two ways. ``find_keys_s`` (the main figure): ``reps`` back-to-back
calls on one stream, timed with CUDA events and one synchronisation at the end, i.e. steady-state
serving throughput. ``find_keys_s_sync``: the median of single calls with a device
synchronisation around each, so it includes the per-call Python and launch overhead. On the CPU
(host cache) the two are the same figure. Latency percentiles are per synchronised call.

CPU mode measures the numba host cache against the vectorised numpy reference in the same run.
With a GPU (CuPy and a device present) it measures the GPU cache and a plain device-to-device
copy in the same run, and reports each figure as a fraction of that copy bandwidth.
Prints tables, writes benchmarks/results/cache[_quick][_gpu].json and .png (or into --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ..cache.admission import Admission
from ..cache.reference import ReferenceCache
from ..hash_kernels import dedupe
from ..synth import oracle_top_c_hit_rate, zipf_ranks
from .common import RESULTS, csv_of, machine, positive_int, save

console = Console()


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


class Device:
    """Array module, cache class and a timer for one device kind."""

    def __init__(self, gpu: bool):
        self.gpu = gpu
        if gpu:
            import cupy

            from ..cache.gpu import GPUCache

            self.xp, self.cache_cls = cupy, GPUCache
        else:
            from ..cache.host import HostCache

            self.xp, self.cache_cls = np, HostCache

    def sync(self) -> None:
        if self.gpu:
            self.xp.cuda.Device().synchronize()

    def timed(self, fn, reps: int) -> np.ndarray:
        """Seconds of each of reps calls (device-synchronised)."""
        out = np.empty(reps)
        for i in range(reps):
            self.sync()
            t0 = time.perf_counter()
            fn(i)
            self.sync()
            out[i] = time.perf_counter() - t0
        return out

    def pipelined(self, fn, reps: int) -> float:
        """Seconds per call of reps back-to-back calls: CUDA events, one sync at the end.

        On the CPU there is nothing to overlap: the median of synchronised calls.
        """
        if not self.gpu:
            return float(np.median(self.timed(fn, reps)))
        cuda = self.xp.cuda
        fn(0)  # warm: kernels compiled, pool blocks cached
        self.sync()
        start, end = cuda.Event(), cuda.Event()
        start.record()
        for i in range(reps):
            fn(i)
        end.record()
        end.synchronize()
        return cuda.get_elapsed_time(start, end) / 1e3 / reps

    def copy_bandwidth(self, nbytes: int = 1 << 30) -> float:
        """Bytes/s of a plain device-to-device copy (read + write counted once, as a row copy)."""
        xp = self.xp
        src = xp.ones(nbytes // 4, xp.float32)
        dst = xp.empty_like(src)
        t = self.timed(lambda i: dst.__setitem__(slice(None), src), 10)
        return nbytes / np.median(t[2:])


def throughput(dev: Device, dims, dtypes, batches, dists, capacity: int, reps: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for dim in dims:
        for dtype in dtypes:
            cache = dev.cache_cls(capacity, dim, ways=32 if dev.gpu else 8, dtype=dtype)
            keys = np.arange(capacity, dtype=np.int64) * 2654435761 - 10**12
            item = 4 if dtype == "float32" else 2
            for s in range(0, capacity, 1 << 20):
                chunk = keys[s : s + (1 << 20)]
                cache.insert(dev.xp.asarray(chunk), dev.xp.ones((len(chunk), dim), dev.xp.float32))
            resident = cache.export()[0]
            for dist in dists:
                for b in batches:
                    if dist == "uniform":
                        qs = [resident[rng.integers(0, len(resident), b)] for _ in range(reps)]
                    else:
                        alpha = float(dist.split("_")[1])
                        qs = [
                            resident[zipf_ranks(len(resident), alpha, b, rng)] for _ in range(reps)
                        ]
                    qs = [dev.xp.asarray(q) for q in qs]
                    out = dev.xp.empty((b, dim), dev.xp.float32)

                    def find(i, c=cache, qs=qs, out=out):
                        return c.find(qs[i], out=out)

                    t = dev.timed(find, reps)
                    t_pipe = dev.pipelined(find, reps) if dev.gpu else float(np.median(t))
                    vecs = dev.xp.ones((b, dim), dev.xp.float32)
                    ti = dev.timed(
                        lambda i, c=cache, qs=qs, v=vecs: c.insert(qs[i], v), max(2, reps // 4)
                    )
                    hit = float(
                        np.mean(
                            np.asarray(
                                cache.contains(qs[0]).get() if dev.gpu else cache.contains(qs[0])
                            )
                        )
                    )
                    kps = b / t_pipe
                    rows.append(
                        {
                            "dim": dim,
                            "dtype": dtype,
                            "batch": b,
                            "keys": dist,
                            "hit_fraction": hit,
                            "find_keys_s": kps,
                            "find_bytes_s": kps * dim * item,
                            "find_keys_s_sync": b / np.median(t),
                            "insert_keys_s": b / np.median(ti),
                        }
                    )
    return rows


def host_vs_numpy(capacity: int, dim: int, batch: int, reps: int) -> dict:
    """Host cache vs the vectorised numpy reference, same keys, all hits."""
    from ..cache.host import HostCache

    keys = np.arange(capacity, dtype=np.int64) * 2654435761 - 10**12
    rng = np.random.default_rng(1)
    res = {}
    for name, cls in (("host", HostCache), ("numpy", ReferenceCache)):
        c = cls(capacity, dim, ways=8)
        for s in range(0, capacity, 1 << 18):
            c.insert(
                keys[s : s + (1 << 18)], np.ones((len(keys[s : s + (1 << 18)]), dim), np.float32)
            )
        resident = c.export()[0]
        qs = [resident[rng.integers(0, len(resident), batch)] for _ in range(reps)]
        out = np.empty((batch, dim), np.float32)
        c.find(qs[0], out=out)
        t = []
        for q in qs:
            t0 = time.perf_counter()
            c.find(q, out=out)
            t.append(time.perf_counter() - t0)
        res[name] = batch / np.median(t)
    return {
        "dim": dim,
        "batch": batch,
        "capacity": capacity,
        "host_keys_s": res["host"],
        "numpy_keys_s": res["numpy"],
        "ratio": res["host"] / res["numpy"],
    }


def request_stream(table_rows: int, alpha: float, batch: int, batches: int) -> list[np.ndarray]:
    """The Zipf request batches every hit-rate run of one alpha serves (the same for all)."""
    rng = np.random.default_rng(7)
    return [zipf_ranks(table_rows, alpha, batch, rng) for _ in range(batches)]


def ideal_online_lfu(table_rows: int, cap: int, stream: list[np.ndarray], warm: int) -> float:
    """Hit rate of the best an online cache can do on the same stream: a fully associative cache
    that holds, before each batch, the ``cap`` keys requested most so far (exact counts of the
    whole history). The oracle also knows the keys no request has shown yet."""
    counts = np.zeros(table_rows, np.int64)
    cached = np.zeros(table_rows, bool)
    hits = total = 0
    for i, q in enumerate(stream):
        if i >= warm:
            hits += int(cached[q].sum())
            total += len(q)
        np.add.at(counts, q, 1)
        cached[:] = False
        if np.count_nonzero(counts) <= cap:
            cached[counts > 0] = True
        else:
            cached[np.argpartition(-counts, cap)[:cap]] = True
    return hits / total


def hot_keys_from_log(table_rows: int, alpha: float, cap: int, draws: int) -> np.ndarray:
    """The ``cap`` most requested keys of an independent sample of ``draws`` requests (as a
    user's key-frequency list from past traffic), hottest first."""
    counts = np.bincount(
        zipf_ranks(table_rows, alpha, draws, np.random.default_rng(99)), minlength=table_rows
    )
    hot = np.argsort(-counts, kind="stable")[:cap]
    return hot[counts[hot] > 0].astype(np.int64)


def hit_rates(
    dev: Device,
    table_rows: int,
    fractions,
    alphas,
    policies,
    batch: int,
    warm_batches: int,
    measure_batches: int,
) -> list[dict]:
    """Hit rate after warm-up, serving like the lookup session: find, then insert the misses.

    Two ways to start: ``cold`` (empty cache, every miss admitted, as HPS) and ``prefill``
    (filled at load with the hottest keys of an independent sample of 2x table-rows requests,
    then misses admitted once the sketch has seen them twice: ``cache_admission_min_count: 2``).
    Each is set against the oracle top-C and the ideal online LFU of the same stream.
    """
    out = []
    for alpha in alphas:
        stream = request_stream(table_rows, alpha, batch, warm_batches + measure_batches)
        for frac in fractions:
            cap = int(table_rows * frac)
            oracle = oracle_top_c_hit_rate(table_rows, alpha, cap)
            ideal = ideal_online_lfu(table_rows, cap, stream, warm_batches)
            hot = hot_keys_from_log(table_rows, alpha, cap, 2 * table_rows)
            # the host cache's default 8 ways, and the GPU cache's 32 (on the host the same
            # semantics: both pass the conformance suite against the reference)
            runs = [
                (start, min_count, ways, policy)
                for start, min_count in (("cold", 1), ("prefill", 2))
                for ways in ((32,) if dev.gpu else (8, 32))
                for policy in policies
            ]
            for start, min_count, ways, policy in runs:
                cache = dev.cache_cls(cap, 1, ways=ways, policy=policy)
                if start == "prefill":
                    cache.insert(dev.xp.asarray(hot), dev.xp.zeros((len(hot), 1), dev.xp.float32))
                admission = Admission(cap, min_count)
                hits = total = 0
                for i, q in enumerate(stream):
                    uq, inverse = dedupe(q)  # first-appearance order, as the session's
                    admission.record(q)
                    _, hit = cache.find(dev.xp.asarray(uq))
                    hit = np.asarray(hit.get() if dev.gpu else hit)
                    miss = uq[~hit]
                    miss = miss[admission.admit(miss)]
                    if len(miss):
                        cache.insert(
                            dev.xp.asarray(miss), dev.xp.zeros((len(miss), 1), dev.xp.float32)
                        )
                    if i >= warm_batches:  # per key occurrence, as the oracle counts
                        hits += int(hit[inverse].sum())
                        total += len(q)
                rate = hits / total
                out.append(
                    {
                        "alpha": alpha,
                        "cache_fraction": frac,
                        "policy": policy,
                        "ways": ways,
                        "start": start,
                        "admission_min_count": min_count,
                        "capacity": cap,
                        "hit_rate": rate,
                        "oracle_top_c": oracle,
                        "of_oracle": rate / oracle,
                        "ideal_online_lfu": ideal,
                        "of_ideal_online": rate / ideal,
                    }
                )
    return out


def latency(dev: Device, dim: int, capacity: int, batches, reps: int) -> list[dict]:
    cache = dev.cache_cls(capacity, dim, ways=32 if dev.gpu else 8)
    keys = np.arange(capacity, dtype=np.int64) * 7 - 3
    cache.insert(dev.xp.asarray(keys), dev.xp.ones((capacity, dim), dev.xp.float32))
    rng = np.random.default_rng(3)
    rows = []
    for b in batches:
        qs = [dev.xp.asarray(keys[rng.integers(0, capacity, b)]) for _ in range(reps)]
        out = dev.xp.empty((b, dim), dev.xp.float32)
        t = dev.timed(lambda i, qs=qs, out=out: cache.find(qs[i], out=out), reps)[5:] * 1e6
        rows.append(
            {
                "dim": dim,
                "batch": b,
                "p50_us": float(np.percentile(t, 50)),
                "p99_us": float(np.percentile(t, 99)),
            }
        )
    return rows


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hr = payload.get("hit_rate", [])
    fig, axes = plt.subplots(1, 2 if hr else 1, figsize=(12 if hr else 7, 4), squeeze=False)
    ax = axes[0][0]
    for key in sorted({(r["dim"], r["dtype"], r["keys"]) for r in payload["throughput"]}):
        rs = [r for r in payload["throughput"] if (r["dim"], r["dtype"], r["keys"]) == key]
        (line,) = ax.plot(
            [r["batch"] for r in rs],
            [r["find_keys_s"] / 1e6 for r in rs],
            "o-",
            ms=3,
            label=f"d{key[0]} {key[1]} {key[2]}",
        )
        if payload["device"] == "gpu":  # the per-call synchronised figure, same colour, dotted
            ax.plot(
                [r["batch"] for r in rs],
                [r["find_keys_s_sync"] / 1e6 for r in rs],
                ":",
                color=line.get_color(),
                lw=1,
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("keys per batch")
    ax.set_ylabel("find, M keys/s")
    sync = " (dotted: one call, synchronised)" if payload["device"] == "gpu" else ""
    ax.set_title(f"L1 find throughput ({payload['device']}){sync}", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    if hr:
        ax = axes[0][1]
        labels = [
            f"a={r['alpha']} {r['cache_fraction']:.0%} {r.get('ways', '')}w {r['policy']} "
            f"{r.get('start', 'cold')}"
            for r in hr
        ]
        x = np.arange(len(hr))
        ax.bar(x - 0.27, [r["hit_rate"] for r in hr], 0.27, label="cache")
        ax.bar(x, [r.get("ideal_online_lfu", np.nan) for r in hr], 0.27, label="ideal online LFU")
        ax.bar(x + 0.27, [r["oracle_top_c"] for r in hr], 0.27, label="oracle top-C")
        ax.set_ylim(min(r["hit_rate"] for r in hr) - 0.05, 1.0)
        ax.set_xticks(x, labels, rotation=60, fontsize=7, ha="right")
        ax.set_ylabel("hit rate")
        ax.set_title("hit rate after warm-up vs oracle")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _dist(text: str) -> str:
    """A key distribution: "uniform" or "zipf_<alpha>" (alpha > 0)."""
    if text == "uniform":
        return text
    kind, _, alpha = text.partition("_")
    try:
        ok = kind == "zipf" and float(alpha) > 0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected uniform or zipf_<alpha>, e.g. zipf_1.05"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument(
        "--cpu", action="store_true", help="measure the host cache even if a GPU is present"
    )
    ap.add_argument("--dims", type=csv_of(positive_int), help="throughput dims, e.g. 16,64,128")
    ap.add_argument("--dtypes", type=csv_of(str), help="storage dtypes, e.g. float32,float16")
    ap.add_argument("--dists", type=csv_of(_dist), help="key distributions, e.g. uniform,zipf_1.05")
    ap.add_argument(
        "--batches", type=csv_of(positive_int), help="throughput batch sizes, e.g. 65536,1048576"
    )
    ap.add_argument("--reps", type=positive_int, help="calls timed per throughput point")
    ap.add_argument("--no-hit-rate", action="store_true", help="skip the hit-rate section")
    ap.add_argument("--out", type=Path, help=f"folder for the .json and .png (default {RESULTS})")
    args = ap.parse_args(argv)
    dev = Device(gpu=gpu_available() and not args.cpu)
    q = args.quick
    if dev.gpu:
        batches = [1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20]
        cap, table_rows, reps = 1 << 22, 10_000_000, 20
    else:
        batches = [1 << 10, 1 << 12, 1 << 14, 1 << 16] if not q else [1 << 10, 1 << 14]
        cap, table_rows, reps = (1 << 20, 10_000_000, 10) if not q else (1 << 16, 200_000, 3)
    payload = {"machine": machine(), "device": "gpu" if dev.gpu else "cpu (host cache)"}
    if dev.gpu:
        import cupy

        payload["machine"]["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        payload["copy_bytes_s"] = dev.copy_bandwidth()
    console.print(f"device: {payload['device']}")
    payload["throughput"] = throughput(
        dev,
        args.dims or ([16, 64, 128] if not q else [16, 64]),
        args.dtypes or ["float32", "float16"],
        args.batches or batches,
        args.dists or (["uniform", "zipf_1.05", "zipf_1.2"] if not q else ["uniform", "zipf_1.05"]),
        cap,
        args.reps or reps,
    )
    if not dev.gpu:
        payload["host_vs_numpy"] = host_vs_numpy(cap, 64, 1 << 16 if not q else 1 << 12, reps)
    if not args.no_hit_rate:
        payload["hit_rate"] = hit_rates(
            dev,
            table_rows,
            [0.01, 0.1],
            [1.05, 1.2],
            ["lru", "lfu"],
            batch=1 << 16 if not q else 1 << 12,
            warm_batches=60 if not q else 10,
            measure_batches=30 if not q else 5,
        )
    payload["latency"] = latency(dev, 128, cap, [1 << 10, 1 << 16], 105 if not q else 25)

    t = Table(title=f"L1 find/insert ({payload['device']}), all keys cached")
    cols = ["dim", "dtype", "keys", "batch", "find M keys/s", "find GB/s", "insert M keys/s"]
    if dev.gpu:  # find M keys/s: back-to-back calls; sync: one call, synchronised
        cols.insert(5, "sync M keys/s")
    for c in cols:
        t.add_column(c, justify="right")
    if dev.gpu:
        t.add_column("find / copy BW", justify="right")
    for r in payload["throughput"]:
        cells = [
            str(r["dim"]),
            r["dtype"],
            r["keys"],
            f"{r['batch']:,}",
            f"{r['find_keys_s'] / 1e6:,.1f}",
            f"{r['find_bytes_s'] / 1e9:.2f}",
            f"{r['insert_keys_s'] / 1e6:,.2f}",
        ]
        if dev.gpu:
            cells.insert(5, f"{r['find_keys_s_sync'] / 1e6:,.1f}")
        if dev.gpu:
            r["fraction_of_copy"] = r["find_bytes_s"] / payload["copy_bytes_s"]
            cells.append(f"{r['fraction_of_copy']:.0%}")
        t.add_row(*cells)
    console.print(t)
    if "host_vs_numpy" in payload:
        h = payload["host_vs_numpy"]
        console.print(
            f"host cache find d{h['dim']} batch {h['batch']:,}: {h['host_keys_s'] / 1e6:.1f} M keys/s, "
            f"numpy reference {h['numpy_keys_s'] / 1e6:.2f} M keys/s: {h['ratio']:.1f}x"
        )
    t = Table(title=f"hit rate after warm-up, {table_rows:,}-row table")
    cols = ("alpha", "cache", "ways", "policy", "start", "admit at", "hit rate", "oracle top-C",
            "of oracle", "ideal online LFU", "of ideal")  # fmt: skip
    for c in cols:
        t.add_column(c, justify="right")
    for r in payload.get("hit_rate", []):
        t.add_row(
            str(r["alpha"]),
            f"{r['cache_fraction']:.0%}",
            str(r["ways"]),
            r["policy"],
            r["start"],
            str(r["admission_min_count"]),
            f"{r['hit_rate']:.3f}",
            f"{r['oracle_top_c']:.3f}",
            f"{r['of_oracle']:.1%}",
            f"{r['ideal_online_lfu']:.3f}",
            f"{r['of_ideal_online']:.1%}",
        )
    if "hit_rate" in payload:
        console.print(t)
    t = Table(title="find latency, d128, all hits (one call, synchronised)")
    for c in ("batch", "p50 us", "p99 us"):
        t.add_column(c, justify="right")
    for r in payload["latency"]:
        t.add_row(f"{r['batch']:,}", f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}")
    console.print(t)
    name = "cache" + ("_quick" if q else "") + ("_gpu" if dev.gpu else "")
    if args.out is None:
        path, png = save(name, payload), RESULTS / f"{name}.png"
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        path, png = args.out / f"{name}.json", args.out / f"{name}.png"
        path.write_text(json.dumps(payload, indent=2))
    plot(payload, png)
    console.print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
