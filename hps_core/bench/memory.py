"""``hps bench memory``: ``hps estimate``'s predicted bytes against the memory a load really takes.

For each config a fresh subprocess imports hps_core and loads a tiny model of the same settings
(so numba's compiled kernels and RocksDB's libraries are already in memory), then measures RSS
and USS, loads the config and measures again. The difference is the load's host memory; it is
compared with the estimate's host bytes (VDB in process memory + L1 when it is in host memory +
RocksDB's column families: the server flushes its memtables after the load). When CuPy sees a GPU, the L1 caches' device bytes
(``GPUCache.memory_bytes``) are compared with the estimate's L1 bytes too.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .common import RESULTS, csv_of, machine, positive_int, save

console = Console(width=None if sys.stdout.isatty() else 170)
WARM_ROWS = 50_000
TARGET = 0.10  # the estimate should be within 10% of the measured bytes


def configs(rows_scale: float = 1.0) -> list[dict]:
    """The measured configs: VDB + RocksDB, fp16 VDB, host/GPU L1 of 10%, int8 VDB."""
    r = int(2_000_000 * rows_scale)
    return [
        {"name": f"criteo26 {r // 10**3}K d16 hash map + RocksDB", "rows": r, "tables": 26,
         "dim": 16, "volatile_db": {"type": "parallel_hash_map", "num_partitions": 8},
         "rocksdb": True, "gpucacheper": 0.0},
        {"name": f"{r // 2 // 10**3}K d64 fp16 VDB", "rows": r // 2, "tables": 1, "dim": 64,
         "volatile_db": {"type": "parallel_hash_map", "num_partitions": 8,
                         "storage_dtype": "float16"},
         "rocksdb": False, "gpucacheper": 0.0},
        {"name": f"{r // 10**3}K d32 L1 10%", "rows": r, "tables": 1, "dim": 32,
         "volatile_db": {"type": "parallel_hash_map", "num_partitions": 8},
         "rocksdb": False, "gpucacheper": 0.1},
        {"name": f"{r // 2 // 10**3}K d64 int8 VDB", "rows": r // 2, "tables": 1, "dim": 64,
         "volatile_db": {"type": "parallel_hash_map", "num_partitions": 8,
                         "storage_dtype": "int8"},
         "rocksdb": False, "gpucacheper": 0.0},
    ]  # fmt: skip


def write_config(spec: dict, root: Path, rows: int | None = None, tag: str = "") -> Path:
    """A synthetic model for ``spec`` (or ``rows`` rows of it) and its hps.json; returns the path."""
    from ..synth import criteo_vocab_sizes, make_model

    rows = spec["rows"] if rows is None else rows
    sizes = criteo_vocab_sizes(rows)[: spec["tables"]] if spec["tables"] > 1 else [rows]
    out = root / (f"cfg{spec['index']}{tag}")
    model = make_model(out, sizes, [spec["dim"]] * len(sizes), name="mem")
    cfg = json.loads(Path(model.config_path).read_text())
    cfg["volatile_db"] = spec["volatile_db"]
    cfg["persistent_db"] = (
        {"type": "rocks_db", "path": str(out / "rocksdb")}
        if spec["rocksdb"]
        else {"type": "disabled"}
    )
    m = cfg["models"][0]
    m["gpucache"] = spec["gpucacheper"] > 0
    m["gpucacheper"] = spec["gpucacheper"]
    Path(model.config_path).write_text(json.dumps(cfg, indent=2))
    return Path(model.config_path)


def _memory() -> dict:
    """This process's RSS (and its anonymous / file / shared parts) and USS, in bytes."""
    import psutil

    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            status[key] = int(value.split()[0]) * 1024
    status["USS"] = psutil.Process().memory_full_info().uss
    return status


def _trim() -> None:
    """Give freed heap pages back to the kernel (glibc keeps freed load buffers otherwise)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(config: str, warm_config: str) -> dict:
    """In this (fresh) process: memory after loading ``warm_config``, then after ``config``."""
    from ..server import ParameterServer

    with ParameterServer(warm_config):  # compiles the kernels, maps RocksDB's code
        pass
    gc.collect()
    _trim()
    before = _memory()
    ps = ParameterServer(config)
    gc.collect()
    untrimmed = _memory()
    _trim()
    after = _memory()
    gpu = sum(
        t.cache.memory_bytes()
        for s in ps.sessions.values()
        for t in s.tables
        if t.cache is not None and type(t.cache).__name__ == "GPUCache"
    )
    info = ps.inspect()
    result = {
        "before": before,
        "after_untrimmed": untrimmed,
        "after": after,
        "vdb_bytes": sum(i.vdb_bytes for i in info),
        "l1_bytes": sum(i.l1_bytes for i in info),
        "gpu_l1_bytes": gpu,
    }
    ps.close()
    return result


def predicted(config: Path) -> dict:
    """``hps estimate``'s host and GPU bytes of a config."""
    from ..config import load_config
    from ..estimate import estimate_config

    cfg = load_config(config)
    rows = estimate_config(cfg)
    shared = cfg.volatile_db.type == "multi_process_hash_map"
    host = sum(r.pdb_host_bytes + r.admission_bytes + (0 if shared else r.vdb_bytes) for r in rows)
    host += sum(r.l1_bytes for r in rows if r.l1_device == "host")
    return {
        "host": host,
        "vdb": sum(r.vdb_bytes for r in rows),
        "l1": sum(r.l1_bytes for r in rows),
        "pdb_host": sum(r.pdb_host_bytes for r in rows),
        "gpu": sum(r.l1_bytes for r in rows if r.l1_device == "gpu"),
        "rows": sum(r.rows for r in rows),
    }


def run_one(spec: dict, root: Path) -> dict:
    """Write the config, estimate it, and measure its load in a fresh subprocess."""
    config = write_config(spec, root)
    # one table big enough for the parallel load kernels, so none compiles during the load
    warm = write_config({**spec, "tables": 1}, root, rows=WARM_ROWS, tag="warm")
    est = predicted(config)
    cmd = [sys.executable, "-m", "hps_core.bench.memory", "--measure", str(config), str(warm)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"measuring {spec['name']} failed:\n{r.stderr[-3000:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    rss = got["after"]["VmRSS"] - got["before"]["VmRSS"]
    uss = got["after"]["USS"] - got["before"]["USS"]
    raw = got["after_untrimmed"]["VmRSS"] - got["before"]["VmRSS"]
    row = {
        "config": spec["name"],
        "rows": est["rows"],
        "dim": spec["dim"],
        "predicted_host_bytes": est["host"],
        "measured_rss_bytes": rss,
        "measured_uss_bytes": uss,
        "measured_rss_untrimmed_bytes": raw,
        "rss_error": est["host"] / rss - 1,
        "uss_error": est["host"] / uss - 1,
        "rss_untrimmed_error": est["host"] / raw - 1,
        "predicted": est,
        "measured": got,
    }
    if got["gpu_l1_bytes"]:
        row["predicted_gpu_bytes"] = est["gpu"]
        row["measured_gpu_bytes"] = got["gpu_l1_bytes"]
        row["gpu_error"] = est["gpu"] / got["gpu_l1_bytes"] - 1
    return row


def plot(payload: dict, path: Path) -> None:
    """Grouped bars: predicted host bytes, measured RSS and USS growth per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = payload["results"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    series = [("predicted_host_bytes", "hps estimate"), ("measured_rss_bytes", "RSS after load"),
              ("measured_uss_bytes", "USS after load")]  # fmt: skip
    for i, (key, label) in enumerate(series):
        ax.bar(x + (i - 1) * 0.27, [r[key] / 2**20 for r in rows], 0.27, label=label)
    for xi, r in zip(x, rows, strict=True):
        top = max(r["predicted_host_bytes"], r["measured_rss_bytes"]) / 2**20
        ax.annotate(f"{r['rss_error']:+.1%}", (xi, top), ha="center", va="bottom")
    ax.set_xticks(x, [r["config"] for r in rows], fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title(f"host memory: estimate vs measured ({payload['machine']['cpu'][:40]})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _config_number(text: str) -> int:
    n = positive_int(text)
    if n > 4:
        raise argparse.ArgumentTypeError(f"{n}: expected a config number 1-4")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a tenth of the rows: a smoke run")
    ap.add_argument("--dir", help="where the synthetic models go (default: a temporary dir)")
    ap.add_argument("--name", default="memory", help="results/<name>.json and .png")
    ap.add_argument("--only", type=csv_of(_config_number),
                    help="comma-separated config numbers (1-4) to run, e.g. 3")  # fmt: skip
    ap.add_argument("--measure", nargs=2, metavar=("CONFIG", "WARM"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    root = Path(args.dir or tempfile.mkdtemp(prefix="hps-mem-"))
    payload = {"machine": machine(), "target": TARGET, "results": []}
    try:
        import cupy

        payload["machine"]["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:  # no CuPy or no device: L1 in host memory
        pass
    try:
        specs = configs(0.1 if args.quick else 1.0)
        only = set(args.only) if args.only else set(range(1, len(specs) + 1))
        for i, spec in enumerate(specs):
            if i + 1 not in only:
                continue
            console.print(f"measuring {spec['name']} ...")
            payload["results"].append(run_one({**spec, "index": i}, root))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    t = Table(title="host memory after load: hps estimate vs measured (error = est/meas - 1)")
    cols = ("config", "rows", "estimate", "RSS", "USS", "RSS untrimmed", "err vs RSS",
            "err vs USS", "err vs untrimmed", "GPU est/meas")  # fmt: skip
    for c in cols:
        t.add_column(c, justify="left" if c == "config" else "right")
    for r in payload["results"]:
        gpu = (
            f"{r['predicted_gpu_bytes'] / 2**20:.1f}/{r['measured_gpu_bytes'] / 2**20:.1f} MiB"
            if "measured_gpu_bytes" in r
            else "-"
        )
        t.add_row(r["config"], f"{r['rows']:,}", *(f"{r[k] / 2**20:,.1f} MiB" for k in (
            "predicted_host_bytes", "measured_rss_bytes", "measured_uss_bytes",
            "measured_rss_untrimmed_bytes")), f"{r['rss_error']:+.1%}", f"{r['uss_error']:+.1%}",
            f"{r['rss_untrimmed_error']:+.1%}", gpu)  # fmt: skip
    console.print(t, soft_wrap=True)
    path = save(args.name, payload)
    plot(payload, RESULTS / f"{args.name}.png")
    console.print(f"wrote {path} and {RESULTS / (args.name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
