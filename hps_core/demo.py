"""``hps demo``: a generated Criteo-like model served in process on the embedded default tiers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .hps import HPS
from .model_io import SparseTable
from .session import LEVELS, LookupStats

console = Console()


def demo_config(model_dir: Path, model: dict, redis: str | None = None) -> dict:
    """Our config for the demo: a VDB holding half of each table, RocksDB with all of it.

    The VDB is the in-process hash map, or Redis at ``redis`` (then updates come from a Redis
    Stream on the same server).
    """
    cfg = {
        "supportlonglong": True,
        "volatile_db": {
            "type": "parallel_hash_map",
            "num_partitions": 8,
            "initial_cache_rate": 0.5,
            "cache_missed_embeddings": True,
        },
        "persistent_db": {"type": "rocks_db", "path": str(model_dir / "rocksdb")},
        "models": [{**model, "gpucacheper": 0.05, "hit_rate_threshold": 0.8}],
    }
    if redis:
        cfg["volatile_db"].update(type="redis_cluster", address=redis)
        cfg["update_source"] = {"type": "redis_stream", "brokers": redis, "poll_timeout_ms": 50}
    return cfg


def run_demo(
    directory: str,
    *,
    rows: int,
    dim: int,
    batches: int,
    batch_size: int,
    alpha: float = 1.05,
    redis: str | None = None,
) -> int:
    """Generate (once), load, verify against the source files, then serve a Zipf request stream."""
    from .synth import criteo_vocab_sizes, make_model, model_spec

    out = Path(directory).resolve()
    sizes = criteo_vocab_sizes(rows)
    stamp = out / "demo.json"
    params = {"rows": rows, "dim": dim, "sizes": sizes}
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        model = model_spec(out, sizes, [dim] * len(sizes), seed=0, name="demo")
    else:
        console.rule("generating a Criteo-like model")
        model = make_model(out, sizes, [dim] * len(sizes), seed=0, name="demo")
        stamp.write_text(json.dumps(params))
    hps_json = json.loads(Path(model.config_path).read_text())
    cfg = demo_config(out, hps_json["models"][0], redis)
    (out / "hps.yaml").write_text(_yaml(cfg))
    console.print(f"{len(sizes)} tables, {sum(sizes):,} rows, dim {dim}; config {out / 'hps.yaml'}")

    console.rule("loading (VDB: 50% of each table, RocksDB: all)")
    t0 = time.perf_counter()
    with HPS(out / "hps.yaml", progress=True) as hps:
        console.print(f"loaded in {time.perf_counter() - t0:.1f} s")
        ok = _verify(hps, cfg["models"][0])
        if not ok:
            return 1
        _serve_stream(hps, model, alpha, batches, batch_size)
        if redis:
            return _online_update(hps, cfg["models"][0], redis)
    return 0


def _online_update(hps: HPS, m: dict, redis: str) -> int:
    """Publish new rows for keys of the biggest table and time until lookups return them."""
    from .config import store_table_name
    from .metrics import REGISTRY
    from .updates import Publisher, connect

    console.rule("online update through the Redis Stream")
    session = hps.server.session(m["model"])
    dims = m["embedding_vecsize_per_table"]
    sizes = []
    for path, d in zip(m["sparse_files"], dims, strict=True):
        with SparseTable.open(path, d) as f:
            sizes.append(f.rows)
    i = int(np.argmax(sizes))
    t = session.tables[i]
    with SparseTable.open(m["sparse_files"][i], t.dim) as f:
        keys, original = (a[:1000] for a in f.read_all())
    hps.lookup(keys, m["model"], i)  # hot: now in L1
    rows = np.random.default_rng(3).standard_normal((len(keys), t.dim)).astype(np.float32)
    pub = Publisher(connect(redis))
    t0 = time.perf_counter()
    if not _publish_and_wait(
        hps, pub, m["model"], i, store_table_name(m["model"], t.name), keys, rows
    ):
        return 1
    elapsed = time.perf_counter() - t0
    # Put the source rows back, so the persistent store matches the files on the next run.
    if not _publish_and_wait(
        hps, pub, m["model"], i, store_table_name(m["model"], t.name), keys, original
    ):
        return 1
    fresh = REGISTRY.histogram("hps_update_freshness_seconds", "", ("group",))
    console.print(
        f"[green]{len(keys):,} updated rows visible (L1, VDB, PDB) after "
        f"{elapsed * 1e3:.0f} ms; ingestor publish->visible p50 "
        f"{fresh.quantile(0.5, group='hps:all') * 1e3:.0f} ms[/green]"
    )
    return 0


def _publish_and_wait(hps, pub, model, t, table, keys, rows, timeout=10.0) -> bool:
    start = time.perf_counter()
    pub.publish(table, keys, rows)
    while not np.array_equal(hps.lookup(keys, model, t), rows):
        if time.perf_counter() - start > timeout:
            console.print(f"[red]updates not visible after {timeout:.0f} s[/red]")
            return False
        time.sleep(0.005)
    return True


def _verify(hps: HPS, m: dict, per_table: int = 200) -> bool:
    """Compare lookups with vectors read straight from the sparse files."""
    console.rule("checking lookups against the source files")
    rng = np.random.default_rng(1)
    checked = bad = 0
    for t, path in enumerate(m["sparse_files"]):
        with SparseTable.open(path, m["embedding_vecsize_per_table"][t]) as f:
            keys, vecs = f.read_all()
        pick = rng.choice(len(keys), size=min(per_table, len(keys)), replace=False)
        absent = np.setdiff1d(rng.integers(-(2**63), 2**63 - 1, size=20, dtype=np.int64), keys)
        query = np.concatenate([keys[pick], absent, keys[pick[:5]]])  # duplicates too
        expect = np.concatenate(
            [
                vecs[pick],
                np.full(
                    (len(absent), vecs.shape[1]), m["default_value_for_each_table"][t], np.float32
                ),
                vecs[pick[:5]],
            ]
        )
        got = hps.lookup(query, m["model"], t)
        checked += len(query)
        bad += int((~np.all(got == expect, axis=1)).sum())
    if bad:
        console.print(f"[red]{bad} of {checked} lookups differ from the source files[/red]")
        return False
    console.print(
        f"[green]{checked:,} lookups (present, absent, duplicate keys) match the source files[/green]"
    )
    return True


def _serve_stream(hps: HPS, model: object, alpha: float, batches: int, batch_size: int) -> None:
    from .synth import RequestStream

    console.rule(
        f"serving a Zipf({alpha}) stream: {batches} batches x {batch_size} samples x 26 tables"
    )
    session = hps.server.session(model.name)
    stream = RequestStream(model, alpha, batch_size, seed=2)
    total = LookupStats()
    lat = []
    for _ in range(batches):
        batch = stream.next_batch()
        ts = time.perf_counter()
        for t in range(batch.shape[1]):
            _, st = session.lookup_with_stats(batch[:, t], t)
            total.add(st)
        lat.append(time.perf_counter() - ts)
    hps.server.flush()
    lat_ms = np.array(lat) * 1e3
    tab = Table(title="lookups (in process, CPU)")
    tab.add_column("metric")
    tab.add_column("value", justify="right")
    tab.add_row("samples/s", f"{batches * batch_size / sum(lat):,.0f}")
    tab.add_row("keys/s", f"{total.keys / sum(lat):,.0f}")
    tab.add_row(
        "batch latency p50 / p99",
        f"{np.percentile(lat_ms, 50):.1f} / {np.percentile(lat_ms, 99):.1f} ms",
    )
    for level in LEVELS:
        tab.add_row(f"served by {level} (unique keys)", f"{total.hit_rate(level):.1%}")
    for stage, sec in total.seconds.items():
        if stage != "total":
            tab.add_row(f"time in {stage}", f"{sec / max(total.seconds['total'], 1e-12):.1%}")
    console.print(tab)


def _yaml(cfg: dict) -> str:
    import yaml

    return (
        "# Generated by `hps demo`: our config format (the HPS schema, as YAML).\n"
        + yaml.safe_dump(cfg, sort_keys=False)
    )
