"""End-to-end benchmark: embedding lookup + the dense DLRM model, ours against baselines.

One machine, one model, one set of requests. The model is the example repository's
(``hps_core.repo.write_repository``): Criteo-like, 26 tables (``criteo_vocab_sizes``), dim 16,
and its dense ONNX network. Requests are Zipf (alpha 1.05, 1.2) or uniform, one key per table
per sample, plus 13 dense features. Each timed call is one request: look up the 26 tables,
then run the dense model: with onnxruntime (CPU provider) for baseline A and for ours on a CPU;
with a GPU, ours keeps the rows on the device and runs the same weights there (``DeviceDense``
on CuPy; the GPU machines' onnxruntime has no CUDA provider), the predictions copied back to
the host. The lookup and the dense model are timed separately inside every call, so the
embedding-only figures stand beside the end-to-end ones.

- **baseline A**: each table's keys fetched from the in-process hash map, no cache: our numba
  ``HashMapVDB`` (the same instance ours falls back to), the faster of the two obvious CPU
  baselines (``baseline_choice`` in the JSON measures it against sorted keys + searchsorted).
- **ours**: the serving path of the Triton ``hps`` backend (``EmbeddingService.run_slots``):
  dedupe, L1 cache, VDB, PDB, L1 fill, with L1 holding 1% and 10% of each table
  (``gpucacheper``). On the CPU L1 is the host cache and the lookup fused; with a GPU (CuPy
  sees a device) it is the GPU cache (``deployed_device_list: [0]``) and the lookup the
  session's device-resident path (``hps_core/device.py``).
- **baseline B** (GPU only): the whole model as one dense CuPy array gathered by row index, no
  hashing: the ceiling of any cache. Compared with ours when every key hits (L1 = 100% of each
  table as HPS's static table, batches replayed after one pass), host arrays in and out on
  both sides, and also with the rows left on the device on both sides.

Cold: the first calls after L1 was built and pre-filled with the hot keys, as at load (code
already compiled). Warm: after a warm-up of ``--warmup`` samples from the same stream. Ours and
its baseline are timed in pairs on the same batches (order alternating), so a busy machine
slows both; samples/s is samples over the summed call times, p50/p99 come from single calls.
Fewer, larger calls for large batches (``reps_for``); ``--max-seconds`` bounds a run.
The Triton variant runs perf_analyzer on the ``dlrm`` ensemble (batch 256/1024/4096, alpha
1.05) via ``hps_core.repo.serving`` and ``hps_core.bench.perf_analyzer.run_perf``.

Writes benchmarks/results/e2e[_quick][_gpu].json and .png (or into --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from ..config import ModelConfig, load_config
from ..model_io import SparseTable
from ..repo import DATA_DIR, write_repository
from ..server import build_cache, hot_keys
from ..serving import EmbeddingService
from ..synth import (
    SyntheticModel,
    criteo_vocab_sizes,
    model_spec,
    popularity_rank_to_row,
    zipf_ranks,
)
from . import e2e_report as report
from .common import RESULTS, machine, positive_int, save

log = logging.getLogger(__name__)
console = Console()

BATCHES = (1, 32, 256, 1024, 4096, 16384, 65536)
ALPHAS = (1.05, 1.2, 0.0)  # 0: uniform
FRACTIONS = (0.01, 0.1)
TRITON_BATCHES = (256, 1024, 4096)


@dataclass
class Batch:
    """One request: keys [B, tables], global row indices [B, tables], dense features [B, 13]."""

    cat: np.ndarray
    rows: np.ndarray
    dense: np.ndarray

    def __len__(self) -> int:
        return len(self.cat)


def make_batches(model: SyntheticModel, alpha: float, batch: int, n: int, seed: int) -> list:
    """n requests of ``batch`` samples; the same arguments give the same requests."""
    rng = np.random.default_rng([seed, batch, n, round(alpha * 1000)])
    total, T = batch * n, model.num_tables
    offsets = np.concatenate([[0], np.cumsum(model.vocab_sizes)[:-1]])
    cat = np.empty((total, T), np.int64)
    rows = np.empty((total, T), np.int64)
    for t in range(T):
        ranks = zipf_ranks(model.vocab_sizes[t], alpha, total, rng)
        cat[:, t] = model.popularity_rank_to_key(t, ranks)
        rows[:, t] = popularity_rank_to_row(model.vocab_sizes[t], model.table_seed(t), ranks)
        rows[:, t] += offsets[t]
    dense = np.log1p(rng.exponential(20.0, (total, 13))).astype(np.float32)
    s = [slice(i * batch, (i + 1) * batch) for i in range(n)]
    return [Batch(cat[i], rows[i], dense[i]) for i in s]


def reps_for(batch: int, quick: bool) -> int:
    """Timed calls per phase: many small requests, few large ones (~128K samples at most)."""
    return int(np.clip((2**15 if quick else 2**17) // batch, 3, 12 if quick else 30))


# -- timing ---------------------------------------------------------------------------------------


def timed(paths: dict[str, Callable], dense: Callable | dict | None, batches: list[Batch]) -> dict:
    """Each call timed on its own: lookup, then the dense model (one for all paths, or one
    per path's name); a summary per path.

    With several paths the calls are paired: every batch goes through each path in turn (the
    order alternating), so all of them see the same requests under the same machine load.
    """
    names = list(paths)
    dense_of = dense if isinstance(dense, dict) else dict.fromkeys(names, dense)
    emb_s = {k: np.zeros(len(batches)) for k in names}
    dense_s = {k: np.zeros(len(batches)) for k in names}
    for i, b in enumerate(batches):
        for k in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            emb = paths[k](b)
            t1 = time.perf_counter()
            if dense_of[k] is not None:
                dense_of[k](b.dense, emb)
            emb_s[k][i], dense_s[k][i] = t1 - t0, time.perf_counter() - t1
    samples = sum(len(b) for b in batches)
    return {k: summarize(emb_s[k], dense_s[k], samples) for k in names}


def summarize(emb_s: np.ndarray, dense_s: np.ndarray, samples: int) -> dict:
    total = emb_s + dense_s
    return {
        "calls": len(total),
        "samples": samples,
        "samples_s": samples / total.sum(),
        "emb_samples_s": samples / emb_s.sum(),
        "p50_ms": float(np.percentile(total, 50) * 1e3),
        "p99_ms": float(np.percentile(total, 99) * 1e3),
        "emb_p50_ms": float(np.percentile(emb_s, 50) * 1e3),
        "emb_p99_ms": float(np.percentile(emb_s, 99) * 1e3),
        "dense_share": float(dense_s.sum() / total.sum()),
    }


class Bench:
    """The model's lookup paths (ours and baseline A) and the dense model, on one server."""

    def __init__(
        self,
        config: Path,
        model: SyntheticModel,
        onnx_path: Path | None,
        max_batch: int,
        gpu: bool = False,
    ):
        cfg = load_config(config)
        self.m: ModelConfig = cfg.models[0]
        self.model = model
        self.svc = EmbeddingService(cfg, self.m.model, io="slots", max_keys=max_batch * 26)
        self.session = self.svc.session
        self.vdb = self.svc.server.vdb
        self.ort = None
        if onnx_path is not None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            # as the Triton onnx backend: idle threads sleep, so the lookup's threads get the cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
            self.ort = ort.InferenceSession(
                str(onnx_path), options, providers=["CPUExecutionProvider"]
            )
        # With a GPU, ours keeps the rows on the device and runs the dense model there
        # (``DeviceDense`` on CuPy: the GPU machines' onnxruntime has no CUDA provider);
        # baseline A stays on the CPU (hash map + onnxruntime CPU).
        self.gpu = gpu and self.session.device.eligible
        self.gpu_dense = None
        if self.gpu and onnx_path is not None:
            import cupy

            from ..dense import DeviceDense, load_dense_weights

            self.gpu_dense = DeviceDense(load_dense_weights(onnx_path), cupy)
        self.hot = []
        for t, path in enumerate(self.m.sparse_files):
            f = SparseTable.open(path, self.m.embedding_vecsize_per_table[t])
            self.hot.append(hot_keys(self.m, t, f) if self.m.cache_prefill else None)
            f.close()

    def ours(self, b: Batch) -> np.ndarray:
        return self.svc.run_slots([b.cat])[0]

    def ours_path(self, b: Batch):
        """Ours as timed: with a GPU the rows stay on the device (the call returns once they
        are there: the stream is synchronised, so the lookup's time is all in the lookup)."""
        if not self.gpu:
            return self.ours(b)
        emb = self.svc.run_slots([b.cat], on_device=True)[0]
        self.session.device.module().cuda.Device().synchronize()
        return emb

    def dense_gpu(self, dense: np.ndarray, emb) -> np.ndarray:
        """Ours' dense model with a GPU: DENSE copied in, PROB copied back to the host."""
        xp = self.gpu_dense.xp
        return xp.asnumpy(self.gpu_dense(xp.asarray(dense), emb))

    def baseline_a(self, b: Batch) -> np.ndarray:
        out = np.empty((len(b), sum(self.svc.dims)), np.float32)
        col = 0
        for j, (t, dim) in enumerate(zip(self.session.tables, self.svc.dims, strict=True)):
            rows, found = self.vdb.fetch(t.store_name, np.ascontiguousarray(b.cat[:, j]))
            rows[~found] = t.default_value
            out[:, col : col + dim] = rows
            col += dim
        return out

    def dense(self, dense: np.ndarray, emb: np.ndarray) -> np.ndarray:
        return self.ort.run(["PROB"], {"DENSE": dense, "EMB": emb})[0]

    @property
    def dense_fn(self) -> Callable | None:
        """The dense model's call, or None where onnx/onnxruntime are missing (embeddings only)."""
        return self.dense if self.ort is not None else None

    def set_l1(self, fraction: float, static: bool = False) -> None:
        """Rebuild every table's L1 at ``gpucacheper = fraction`` and pre-fill it, as at load;
        ``static``: HPS's static table on a GPU (the whole table, no eviction)."""
        m = dataclasses.replace(self.m, gpucacheper=fraction, use_static_table=static)
        self.session.flush()
        for t, rt in enumerate(self.session.tables):
            with rt.cache_lock:
                rt.cache = build_cache(m, t, self.model.vocab_sizes[t])
            if self.hot[t] is not None:
                self.session.prefill(t, self.hot[t])
        self.session.fused.layout()  # as the server's add_model does once the caches exist

    def l1_counts(self) -> tuple[int, int]:
        """(L1 hits, unique keys) summed over tables since the server started."""
        tables = self.session.tables
        return sum(t.stats.hits["l1"] for t in tables), sum(t.stats.unique_keys for t in tables)

    def ours_timed(self, batches: list[Batch], other: tuple[str, Callable], dense: bool = True):
        """(ours, other) summaries of paired calls; ours with its L1 hit rate over the calls."""
        h0, u0 = self.l1_counts()
        ours_dense = self.dense_gpu if self.gpu_dense is not None else self.dense_fn
        if not dense:
            ours_dense = None
        r = timed(
            {"ours": self.ours_path, other[0]: other[1]},
            {"ours": ours_dense, other[0]: self.dense_fn if dense else None},
            batches,
        )
        h1, u1 = self.l1_counts()
        r["ours"]["l1_hit_rate"] = (h1 - h0) / max(u1 - u0, 1)
        return r["ours"], r[other[0]]

    def close(self) -> None:
        self.svc.close()


def baseline_choice(bench: Bench, batch: int, reps: int) -> dict:
    """Keys/s of HashMapVDB.fetch vs sorted keys + searchsorted + take on the largest table."""
    t = int(np.argmax(bench.model.vocab_sizes))
    keys, vecs = bench.model.table(t)
    order = np.argsort(keys)
    skeys, svecs = keys[order], vecs[order]
    name = bench.session.tables[t].store_name
    qs = [b.cat[:, t].copy() for b in make_batches(bench.model, 1.05, batch, reps, seed=7)]

    def sorted_fetch(q: np.ndarray) -> np.ndarray:
        i = np.minimum(np.searchsorted(skeys, q), len(skeys) - 1)
        out = svecs[i]
        out[skeys[i] != q] = 0.0
        return out

    assert np.array_equal(sorted_fetch(qs[0]), bench.vdb.fetch(name, qs[0])[0])
    out = {"table_rows": len(keys), "keys_per_call": batch}
    for label, fn in (
        ("hashmap_vdb", lambda q: bench.vdb.fetch(name, q)),
        ("sorted", sorted_fetch),
    ):
        times = []
        for q in qs:
            t0 = time.perf_counter()
            fn(q)
            times.append(time.perf_counter() - t0)
        out[f"{label}_keys_s"] = batch / float(np.median(times))
    # the VDB fetches serially below PARALLEL_MIN_KEYS keys and with numba threads from there
    from ..vdb.hashmap import PARALLEL_MIN_KEYS as p

    for n in (p - 1, p):
        times = []
        for q in qs:
            t0 = time.perf_counter()
            bench.vdb.fetch(name, q[:n])
            times.append(time.perf_counter() - t0)
        out[f"hashmap_vdb_{n}_keys_s"] = n / float(np.median(times))
    return out


# -- the in-process measurement ------------------------------------------------------------------


def out_of_time(deadline: float | None, skipped: list, **cell) -> bool:
    """True (and the cell noted in ``skipped``) once ``--max-seconds`` has run out."""
    if deadline is None or time.perf_counter() < deadline:
        return False
    skipped.append(cell)
    return True


def measure(
    bench: Bench, args, device: str, progress: Progress, deadline: float | None, skipped: list
) -> list[dict]:
    """Baseline A and ours (cold and warm, each L1 size) for every alpha and batch size."""
    rows: list[dict] = []
    task = progress.add_task("e2e cells", total=len(args.alphas) * len(args.batches))
    for alpha in args.alphas:
        for batch in args.batches:
            if out_of_time(deadline, skipped, section="e2e", alpha=alpha, batch=batch):
                progress.advance(task)
                continue
            n = reps_for(batch, args.quick)
            n_cold = min(n, 8)
            cold = make_batches(bench.model, alpha, batch, n_cold, seed=1)
            warm = make_batches(bench.model, alpha, batch, n, seed=2)
            chunk = max(batch, 4096)
            warmup = make_batches(bench.model, alpha, chunk, -(-args.warmup // chunk), seed=3)
            cell = {"alpha": alpha, "batch": batch}
            same = np.array_equal(bench.ours(warm[0]), bench.baseline_a(warm[0]))
            assert same, f"ours and baseline A differ (alpha {alpha}, batch {batch})"
            for fraction in args.fractions:
                bench.set_l1(fraction)
                common = {**cell, "cache_fraction": fraction}
                for phase, batches in (("cold", cold), ("warm", warm)):
                    if phase == "warm":
                        for b in warmup:
                            bench.ours(b)
                        bench.session.flush()
                    r, base = bench.ours_timed(batches, ("a", bench.baseline_a))
                    rows.append({**common, "mode": "baseline_a", "phase": phase, **base})
                    rows.append(
                        {**common, "mode": f"ours_{device}", "phase": phase, **r} | speedup(r, base)
                    )
            progress.advance(task)
    return rows


def speedup(r: dict, base: dict) -> dict:
    return {
        "speedup_vs_a": r["samples_s"] / base["samples_s"],
        "emb_speedup_vs_a": r["emb_samples_s"] / base["emb_samples_s"],
    }


# -- Triton ---------------------------------------------------------------------------------------


def measure_triton(root: Path, args, in_process: list[dict]) -> dict:
    """perf_analyzer on the ensemble for a few batch sizes, beside the in-process figures."""
    try:
        # The client package is optional here (hps_core never needs it); the benchmark reuses
        # its perf_analyzer driver rather than copying it.
        from ..workload import write_perf_data
        from .perf_analyzer import perf_analyzer, run_perf

        perf_analyzer()
    except (ImportError, FileNotFoundError) as e:
        return {"skipped": f"perf_analyzer is not available: {e}"}
    from ..repo import serving

    out: dict = {"alpha": 1.05, "cache_fraction": 0.1, "concurrency": 2, "rows": []}
    with serving(root, rows=args.rows, dim=args.dim) as (spec, server):
        data = write_perf_data(spec, root / "perf_data.json", 2048, "ensemble")
        for b in args.triton_batches:
            # a window holds a few dozen requests, or perf_analyzer finds no stable measurement
            seconds = args.triton_seconds * max(1, b // 1024)
            try:
                r = run_perf(spec.ensemble, server.grpc_url, data, b, 2, seconds)
            except RuntimeError as e:  # perf_analyzer did not settle on a loaded machine
                log.warning("perf_analyzer at batch %d: %s", b, e)
                out["rows"].append({"batch": b, "error": str(e)[-400:]})
                continue
            r["window_s"] = seconds
            ref = [
                x["samples_s"]
                for x in in_process
                if x["mode"].startswith("ours") and x.get("cache_fraction") == 0.1
                and x["alpha"] == 1.05 and x["batch"] == b and x["phase"] == "warm"
            ]  # fmt: skip
            r["in_process_samples_s"] = ref[0] if ref else None
            r["triton_over_in_process"] = r["samples_s"] / ref[0] if ref else None
            out["rows"].append(r)
    return out


# -- main -----------------------------------------------------------------------------------------


def build_model(
    root: Path, rows: int, dim: int, device: str, max_batch: int, threshold: float | None = None
) -> tuple:
    """The example repository's model and dense network, and our in-process config for it."""
    sizes = criteo_vocab_sizes(rows)
    onnx_path: Path | None = root / "dlrm_dense" / "1" / "model.onnx"
    try:
        write_repository(root, rows=rows, dim=dim, seed=0, max_batch_size=4096)
        import onnxruntime  # noqa: F401
    except ImportError as e:  # the sparse files are written before the dense graph needs onnx
        log.warning("no dense model (%s): embedding figures only", e)
        onnx_path = None
    model = model_spec(root / DATA_DIR, sizes, [dim] * len(sizes), seed=0, name="dlrm")
    raw = json.loads(Path(model.config_path).read_text())
    m = raw["models"][0]
    m["max_batch_size"] = max_batch
    m["deployed_device_list"] = [0] if device == "gpu" else []
    if threshold is not None:
        m["hit_rate_threshold"] = threshold
    # In process: the same tiers as serving, minus the shared memory one process does not need.
    raw["volatile_db"] = {"type": "parallel_hash_map", "num_partitions": 8}
    cfg = root / "e2e_hps.json"
    cfg.write_text(json.dumps(raw, indent=2))
    return cfg, model, onnx_path


def gpu_present() -> str | None:
    """The name of CUDA device 0 when CuPy sees one; None on a machine without a GPU."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:  # no CuPy, no driver, no device: the CPU benchmark
        return None


def load_average() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"time": time.strftime("%H:%M:%S"), "1m": one, "5m": five, "15m": fifteen}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=positive_int, default=10_000_000, help="rows of all 26 tables")
    ap.add_argument("--dim", type=positive_int, default=16)
    ap.add_argument(
        "--batches", type=positive_int, nargs="+", default=list(BATCHES), help="samples per request"
    )
    ap.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="0: uniform")
    ap.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=list(FRACTIONS),
        help="L1 sizes as shares of each table (gpucacheper)",
    )
    ap.add_argument("--warmup", type=positive_int, default=131072, help="warm-up samples per cell")
    ap.add_argument("--triton-batches", type=positive_int, nargs="*", default=list(TRITON_BATCHES))
    ap.add_argument(
        "--triton-seconds",
        type=float,
        default=2.0,
        help="perf_analyzer window (x batch/1024 above 1024)",
    )
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton variant")
    ap.add_argument(
        "--hit-rate-threshold",
        type=float,
        help="HPS's hit_rate_threshold (default: the config's 0.9); 1 fills L1 synchronously "
        "on every miss, which makes hit rates reproducible",
    )
    ap.add_argument(
        "--max-seconds",
        type=float,
        help="time budget from the start: cells not begun by then are skipped (and listed)",
    )
    ap.add_argument("--cpu", action="store_true", help="CPU mode even when a GPU is present")
    ap.add_argument("--work", help="keep the model here (reused when rows/dim match)")
    ap.add_argument("--out", help="write JSON/PNG here instead of benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="200K rows, smaller runs (~1 minute)")
    args = ap.parse_args(argv)
    # How numba's OpenMP pools wait is set when hps_core is imported (``quiet_openmp``): the
    # session's background L1 fill runs in a second thread with its own pool, and with
    # libgomp's default spin the two pools spin against each other on a small machine (a
    # 4096-key VDB fetch right after ours took 17x longer on 2 cores);
    # OMP_WAIT_POLICY=ACTIVE in the environment shows the effect.
    quick = {"rows": 200_000, "warmup": 16384, "triton_seconds": 1.0, "triton_batches": [256]}
    quick["batches"] = [b for b in args.batches if b <= 4096]
    for k, v in quick.items():  # --quick changes the sizes not given on the command line
        if args.quick and getattr(args, k) == ap.get_default(k):
            setattr(args, k, v)
    gpu = None if args.cpu else gpu_present()
    device = "gpu" if gpu else "cpu"
    work = Path(args.work or tempfile.mkdtemp(prefix="hps-e2e-")).resolve()
    payload: dict = {"machine": machine(), "device": device, "rows": args.rows, "dim": args.dim}
    payload["machine"]["gpu"] = gpu
    payload["omp_wait_policy"] = os.environ["OMP_WAIT_POLICY"]
    payload["gomp_spincount"] = os.environ.get("GOMP_SPINCOUNT")
    payload["load_average"] = [load_average()]
    t_start = time.perf_counter()
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"model: {args.rows:,} rows, repository + tiers", total=None)
            top = max([*args.batches, 4096])
            cfg, model, onnx_path = build_model(
                work, args.rows, args.dim, device, top, args.hit_rate_threshold
            )
            bench = Bench(cfg, model, onnx_path, top, gpu=bool(gpu))
            payload["dense"] = "onnxruntime CPU" if onnx_path else "none: onnx/onnxruntime missing"
            if bench.gpu_dense is not None:
                payload["dense"] += " (baseline A); ours: the same weights on the GPU (CuPy)"
            payload["ours_path"] = "device-resident" if bench.gpu else "fused CPU"
            progress.remove_task(task)
            payload["setup_s"] = time.perf_counter() - t_start
            try:
                first = make_batches(model, 1.05, 64, 1, seed=0)[0]  # compile the numba/CUDA code
                emb = bench.ours(first)
                if bench.ort is not None:
                    want = bench.dense(first.dense, emb)
                    if bench.gpu_dense is not None:  # same predictions from the GPU network
                        got = bench.dense_gpu(first.dense, bench.ours_path(first))
                        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
                payload["baseline_choice"] = baseline_choice(bench, 65536, 3 if args.quick else 7)
                deadline = t_start + args.max_seconds if args.max_seconds else None
                skipped = payload["skipped_cells"] = []
                if gpu:  # first: the figure a GPU run is for
                    from .e2e_gpu import measure_gpu_ceiling

                    payload["gpu_ceiling"] = measure_gpu_ceiling(
                        bench, args, progress, deadline, skipped
                    )
                payload["results"] = measure(bench, args, device, progress, deadline, skipped)
                payload["load_average"].append(load_average())
            finally:
                bench.close()
        payload["settings"] = {
            k: getattr(args, k)
            for k in ("batches", "alphas", "fractions", "warmup", "quick", "hit_rate_threshold")
        }
        name = "e2e" + ("_quick" if args.quick else "") + ("_gpu" if gpu else "")
        write(payload, name, args.out, t_start)  # the in-process figures, whatever Triton does
        if args.no_triton or gpu:
            why = "--no-triton" if args.no_triton else "GPU run: in process only"
            payload["triton"] = {"skipped": why}
        else:
            console.print("Triton variant: starting the server (perf_analyzer on the ensemble)")
            payload["triton"] = measure_triton(work, args, payload["results"])
        payload["load_average"].append(load_average())
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report.print_tables(console, payload)
    path, png = write(payload, name, args.out, t_start)
    console.print(f"wrote {path} and {png.name} ({payload['wall_s']:.0f} s)")
    return 0


def write(payload: dict, name: str, out: str | None, t_start: float) -> tuple[Path, Path]:
    """The JSON and the plot, into benchmarks/results or ``out``."""
    payload["wall_s"] = time.perf_counter() - t_start
    if out is None:
        path, png = save(name, payload), RESULTS / f"{name}.png"
    else:
        path, png = Path(out) / f"{name}.json", Path(out) / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
    report.plot(payload, png)
    return path, png


if __name__ == "__main__":
    main()
