"""Host tiers: VDB fetch vs a Python dict, our RocksDB layer vs raw rocksdict gets, RAM at load.

Beside the dict baseline, VDB fetch is also set against its memory ceiling: the same rows
copied by known position (no hashing, no probing) in parallel into a fresh array.

All ratios are taken in one run on one machine; VDB fetch, the dict and the ceiling are timed
back to back in each of five rounds (two with --quick), and the table gives the median round's
ratio [min-max]: one round on this shared 2-core VM swings by up to 1.5x. Prints a table,
writes benchmarks/results/host_tier.json and host_tier.png.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from numba import njit, prange
from rich.console import Console
from rich.progress import track
from rich.table import Table

from .. import buffers
from ..hash_kernels import prefetch_row
from ..pdb.rocksdb import RocksDBPDB
from ..vdb.hashmap import HashMapVDB
from .common import RESULTS, machine, paired, positive_int, rate, save

console = Console()


def make_rows(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = np.unique(
        rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, int(n * 1.01), dtype=np.int64)
    )[:n]
    rng.shuffle(keys)
    vecs = buffers.line_aligned((len(keys), dim), np.float32)  # as the VDB's rows (the ceiling)
    vecs[:] = rng.standard_normal((len(keys), dim))
    return keys, vecs


@njit(parallel=True, nogil=True, cache=True)
def _gather(vecs, rows, out):
    """Blocks of 32 rows: prefetch every line of each row, then copy them (as VDB fetch does)."""
    dim = vecs.shape[1]
    for b in prange((len(rows) + 31) // 32):
        lo, hi = b * 32, min(len(rows), b * 32 + 32)
        for i in range(lo, hi):
            prefetch_row(vecs, rows[i])
        for i in range(lo, hi):
            r = rows[i]
            for d in range(dim):
                out[i, d] = vecs[r, d]


def gather_rows(vecs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The memory ceiling of a fetch: rows copied by known position (no hashing), in parallel,
    into a fresh array as a fetch returns."""
    out = buffers.empty((len(rows), vecs.shape[1]), vecs.dtype)
    _gather(vecs, rows, out)
    return out


def bench_vdb(keys, vecs, batches, rng, rounds: int = 3) -> list[dict]:
    """VDB fetch, the dict baseline and the gather ceiling, back to back in each of ``rounds``
    rounds; the ratios of the median round (``common.paired``) with their spread."""
    dim = vecs.shape[1]
    vdb = HashMapVDB(num_partitions=8)
    vdb.create_table("t", dim, capacity_hint=len(keys))
    vdb.load("t", keys, vecs)
    index = {int(k): i for i, k in enumerate(keys.tolist())}

    def dict_fetch(q):
        idx = np.fromiter((index.get(k, -1) for k in q.tolist()), dtype=np.int64, count=len(q))
        out = vecs[idx]
        out[idx < 0] = 0
        return out

    def vdb_fetch(q):
        return vdb.fetch("t", q)

    def gather(rows):
        return gather_rows(vecs, rows)

    rows = []
    for b in batches:
        q = keys[rng.integers(0, len(keys), b)]
        got, found = vdb.fetch("t", q)
        assert found.all() and np.array_equal(got, dict_fetch(q)), (
            "VDB result differs from the dict"
        )
        batch = lambda b=b: keys[rng.integers(0, len(keys), b)]  # noqa: E731

        def measure(b=b, batch=batch) -> dict[str, float]:
            return {
                "ours": rate(vdb_fetch, batch, b, max_reps=100),
                "base": rate(dict_fetch, batch, b, max_reps=100),
                "ceiling": rate(gather, lambda b=b: rng.integers(0, len(keys), b), b, 0.3, 100),
            }

        mid, runs, (lo, hi) = paired(measure, rounds, "ours", "base")
        of_ceiling = sorted(x["ours"] / x["ceiling"] for x in runs)
        rows.append(
            {
                "tier": "vdb",
                "dim": dim,
                "batch": b,
                "ours_keys_s": mid["ours"],
                "baseline_keys_s": mid["base"],
                "baseline": "python dict + numpy take",
                "ratio": mid["ours"] / mid["base"],
                "ratio_range": [lo, hi],
                "gather_ceiling_keys_s": mid["ceiling"],
                "of_ceiling": float(np.median(of_ceiling)),
                "of_ceiling_range": [of_ceiling[0], of_ceiling[-1]],
                "rounds": runs,
            }
        )
    vdb.close()
    return rows


def bench_pdb(keys, vecs, batches, rng, root: Path) -> list[dict]:
    from rocksdict import Options, Rdict

    dim = vecs.shape[1]
    pdb = RocksDBPDB(str(root / f"ours{dim}"))
    pdb.create_table("t", dim)
    pdb.upsert("t", keys, vecs)
    raw = Rdict(str(root / f"raw{dim}"), Options(raw_mode=True))
    kb = keys.astype("<i8").tobytes()
    vb = vecs.tobytes()
    rb = dim * 4
    from rocksdict import WriteBatch

    for s in range(0, len(keys), 65536):
        wb = WriteBatch(raw_mode=True)
        for i in range(s, min(s + 65536, len(keys))):
            wb.put(kb[i * 8 : i * 8 + 8], vb[i * rb : (i + 1) * rb])
        raw.write(wb)

    def raw_fetch(q):
        b = q.astype("<i8").tobytes()
        vals = [raw.get(b[i : i + 8]) for i in range(0, len(b), 8)]
        return np.frombuffer(b"".join(vals), dtype=np.float32).reshape(len(q), dim)

    rows = []
    for b in batches:
        q = keys[rng.integers(0, len(keys), b)]
        got, found = pdb.fetch("t", q)
        assert found.all() and np.array_equal(got, raw_fetch(q)), (
            "PDB result differs from raw rocksdict"
        )
        batch = lambda b=b: keys[rng.integers(0, len(keys), b)]  # noqa: E731
        ours = rate(lambda x: pdb.fetch("t", x), batch, b, min_seconds=0.5, max_reps=20)
        base = rate(raw_fetch, batch, b, min_seconds=0.5, max_reps=20)
        rows.append(
            {
                "tier": "pdb",
                "dim": dim,
                "batch": b,
                "ours_keys_s": ours,
                "baseline_keys_s": base,
                "baseline": "raw rocksdict get per key",
                "ratio": ours / base,
            }
        )
    pdb.close()
    raw.close()
    return rows


LOAD_CHILD = r"""
import json, sys
from hps_core.model_io import SparseTable


def vm(field):  # this process's own counters (ru_maxrss would include the parent's peak)
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024


tier, path, dim, db = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
f = SparseTable.open(path, dim)
if tier == "vdb":
    from hps_core.vdb.hashmap import HashMapVDB
    store = HashMapVDB(num_partitions=8)
    store.create_table("t", dim, capacity_hint=f.rows)
    store.upsert("t", [1], [[0.0] * dim]); store.evict("t", [1])  # compile before measuring
else:
    from hps_core.pdb.rocksdb import RocksDBPDB
    store = RocksDBPDB(db)
    store.create_table("t", dim)
before = vm("VmRSS")
for k, v in f.iter_chunks():
    store.upsert("t", k, v)
peak = vm("VmHWM")
n = store.size("t")
held = store.memory_bytes("t") if tier == "vdb" else 0
print(json.dumps({"rss_before": before, "peak": peak, "rows": n, "held": held}))
"""


def bench_load(rows: int, dim: int, root: Path) -> list[dict]:
    from ..model_io import write_table

    keys, vecs = make_rows(rows, dim, seed=dim)
    path = root / f"load{dim}_sparse.model"
    write_table(path, keys, vecs)
    table_bytes = keys.nbytes + vecs.nbytes
    del keys, vecs
    out = []
    for tier in ("pdb", "vdb"):
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                LOAD_CHILD,
                tier,
                str(path),
                str(dim),
                str(root / f"load{dim}{tier}"),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        m = __import__("json").loads(r.stdout.strip().splitlines()[-1])
        assert m["rows"] == rows
        grow = m["peak"] - m["rss_before"]
        out.append(
            {
                "tier": tier,
                "dim": dim,
                "rows": rows,
                "table_bytes": table_bytes,
                "peak_ram_bytes": grow,
                "peak_ram_over_table": grow / table_bytes,
                "vdb_bytes": m["held"],
                "vdb_over_table": m["held"] / table_bytes if m["held"] else None,
            }
        )
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, tier in zip(axes, ("vdb", "pdb"), strict=True):
        for dim in sorted({r["dim"] for r in rows}):
            rs = [r for r in rows if r["tier"] == tier and r["dim"] == dim]
            ax.plot(
                [r["batch"] for r in rs],
                [r["ours_keys_s"] / 1e6 for r in rs],
                "o-",
                label=f"ours d{dim}",
            )
            ax.plot(
                [r["batch"] for r in rs],
                [r["baseline_keys_s"] / 1e6 for r in rs],
                "x--",
                label=f"baseline d{dim}",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("keys per batch")
        ax.set_ylabel("M keys/s")
        ax.set_title(
            {"vdb": "VDB fetch vs Python dict", "pdb": "RocksDB layer vs raw rocksdict get"}[tier]
        )
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bench_shm_pages(rows: int, dim: int, batches, rng, rounds: int = 3) -> dict:
    """VDB fetch from a table in shared memory (``multi_process_hash_map``, as the Triton
    instances share it) against the same table in process memory, paired in each round. The
    process's arrays get transparent huge pages; files in a tmpfs get them only when it is
    mounted with ``huge=within_size`` or ``always``, which the result records."""
    import os

    from ..doctor_config import check_shm_pages
    from ..vdb.shm import shm_dir

    keys, vecs = make_rows(rows, dim, seed=dim)
    pages = check_shm_pages(shm_dir()).data  # the tmpfs huge= option, or the filesystem type
    huge = pages.get("huge", pages.get("fstype", "unknown"))
    local = HashMapVDB(num_partitions=8)
    shared = HashMapVDB(num_partitions=8, shared_memory_name=f"hps_bench_{os.getpid()}")
    out = []
    try:
        for v in (local, shared):
            v.create_table("t", dim, capacity_hint=len(keys))
            v.load("t", keys, vecs)
        for b in batches:
            batch = lambda b=b: keys[rng.integers(0, len(keys), b)]  # noqa: E731

            def measure(b=b, batch=batch) -> dict[str, float]:
                return {
                    "shared": rate(lambda q: shared.fetch("t", q), batch, b, max_reps=100),
                    "local": rate(lambda q: local.fetch("t", q), batch, b, max_reps=100),
                }

            mid, runs, (lo, hi) = paired(measure, rounds, "shared", "local")
            out.append({"dim": dim, "batch": b, "shared_keys_s": mid["shared"],
                        "local_keys_s": mid["local"], "ratio": mid["shared"] / mid["local"],
                        "ratio_range": [lo, hi], "rounds": runs})  # fmt: skip
    finally:
        shared.unlink()  # (and closes it)
        local.close()
    return {"shm_dir": str(shm_dir()), "tmpfs_huge": huge, "rows": rows, "fetch": out}


def main_shm_pages(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = bench_shm_pages(args.rows, 128, args.batches, np.random.default_rng(0))
    t = Table(title=f"VDB fetch, dim 128: /dev/shm (tmpfs huge={res['tmpfs_huge']}) vs process")
    for c in ("batch", "shared M keys/s", "process M keys/s", "shared / process"):
        t.add_column(c, justify="right")
    for r in res["fetch"]:
        t.add_row(f"{r['batch']:,}", f"{r['shared_keys_s'] / 1e6:.2f}",
                  f"{r['local_keys_s'] / 1e6:.2f}",
                  "{:.2f}x [{:.2f}-{:.2f}]".format(r["ratio"], *r["ratio_range"]))  # fmt: skip
    console.print(t)
    name = f"host_tier_shm_huge_{res['tmpfs_huge']}" + ("_quick" if args.quick else "")
    path = save(name, {"machine": machine(), **res})
    fig, ax = plt.subplots(figsize=(6, 4))
    bs = [r["batch"] for r in res["fetch"]]
    ax.plot(bs, [r["shared_keys_s"] / 1e6 for r in res["fetch"]], "o-", label="/dev/shm table")
    ax.plot(bs, [r["local_keys_s"] / 1e6 for r in res["fetch"]], "x--", label="process memory")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("keys per batch")
    ax.set_ylabel("M keys/s")
    ax.set_title(f"VDB fetch d128, tmpfs huge={res['tmpfs_huge']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    console.print(f"wrote {path} and {name}.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=positive_int, default=1_000_000, help="rows per table")
    ap.add_argument("--dims", type=positive_int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--batches", type=positive_int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--load-rows", type=positive_int, default=2_000_000)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--shm-pages", action="store_true",
                    help="only: fetch from a /dev/shm table vs a process one (dim 128)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.shm_pages:
        if args.quick:
            args.rows, args.batches = 50_000, [1024, 4096]
        return main_shm_pages(args)
    if args.quick:
        args.rows, args.load_rows, args.dims, args.batches = 50_000, 100_000, [16], [1024, 4096]
    rng = np.random.default_rng(0)
    fetch_rows, load_rows = [], []
    with tempfile.TemporaryDirectory(prefix="hps-bench-") as tmp:
        root = Path(tmp)
        for dim in track(args.dims, description="fetch benchmarks"):
            keys, vecs = make_rows(args.rows, dim, seed=dim)
            fetch_rows += bench_vdb(keys, vecs, args.batches, rng, 2 if args.quick else 5)
            fetch_rows += bench_pdb(keys, vecs, args.batches, rng, root)
        for dim in track(args.dims, description="load memory"):
            load_rows += bench_load(args.load_rows, dim, root)

    t = Table(title=f"host tiers, {args.rows:,} rows per table")
    cols = ("tier", "dim", "batch", "ours M keys/s", "baseline M keys/s", "ours / baseline",
            "of gather ceiling")  # fmt: skip
    for c in cols:
        t.add_column(c, justify="right")
    for r in fetch_rows:
        t.add_row(
            r["tier"],
            str(r["dim"]),
            f"{r['batch']:,}",
            f"{r['ours_keys_s'] / 1e6:.2f}",
            f"{r['baseline_keys_s'] / 1e6:.2f}",
            f"{r['ratio']:.1f}x"
            + (" [{:.1f}-{:.1f}]".format(*r["ratio_range"]) if "ratio_range" in r else ""),
            f"{r['of_ceiling']:.2f}" if "of_ceiling" in r else "-",
        )
    console.print(t)
    t = Table(title=f"peak RAM while loading {args.load_rows:,} rows from sparse files")
    for c in ("into", "dim", "table MiB", "peak RAM MiB", "peak / table", "VDB bytes / table"):
        t.add_column(c, justify="right")
    for r in load_rows:
        t.add_row(
            r["tier"],
            str(r["dim"]),
            f"{r['table_bytes'] / 2**20:.0f}",
            f"{r['peak_ram_bytes'] / 2**20:.0f}",
            f"{r['peak_ram_over_table']:.2f}x",
            f"{r['vdb_over_table']:.2f}x" if r["vdb_over_table"] else "-",
        )
    console.print(t)
    name = "host_tier_quick" if args.quick else "host_tier"
    path = save(
        name,
        {
            "machine": machine(),
            "rows": args.rows,
            "fetch": fetch_rows,
            "load": load_rows,
            "targets": {
                "vdb_vs_dict": ">= 10x",
                "pdb_vs_raw": ">= 0.8x",
                "peak_ram_at_load": "<= 1.1x table bytes",
            },
        },
    )
    plot(fetch_rows, RESULTS / f"{name}.png")
    console.print(f"wrote {path} and {name}.png")
    return 0


if __name__ == "__main__":
    main()
