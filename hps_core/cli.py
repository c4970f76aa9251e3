"""The ``hps`` command: load, lookup, inspect, estimate, doctor, synth, dense, repo, serve, watch,
publish, ingest, bench, demo."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .cli_input import (
    MAX_DIM,
    check_dense_onnx,
    check_limits,
    limits,
    model_name,
    os_error,
    read_keys_file,
    read_npz_rows,
    run_reporting_errors,
    writable_dir,
)
from .errors import HPSError
from .model_io import KEY_EXPECTED, parse_key

console = Console()
log = logging.getLogger(__name__)


def _server(args: argparse.Namespace, progress: bool = True):
    from .server import ParameterServer

    return ParameterServer(args.config, progress=progress)


def cmd_load(args: argparse.Namespace) -> int:
    """Build the VDB/PDB from the sparse files named by the config, with progress bars."""
    with _server(args) as ps:
        _print_tables(ps.inspect())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Load the config and show each table's rows, dim and bytes per level."""
    with _server(args, progress=not args.quiet) as ps:
        infos = ps.inspect()
        if args.json:
            print(json.dumps([i.__dict__ for i in infos], indent=2))
        else:
            _print_tables(infos)
    return 0


def cmd_lookup(args: argparse.Namespace) -> int:
    """Look up keys of one table and print the vectors."""
    keys = []
    for text in args.keys:
        k = parse_key(text)
        if k is None:
            raise HPSError(f"--keys {text!r}: expected {KEY_EXPECTED}")
        keys.append(k)
    if args.keys_file:
        keys += read_keys_file(args.keys_file)
    if not keys:
        raise HPSError("lookup: give --keys K [K ...] or --keys-file FILE")
    table: int | str = int(args.table) if re.fullmatch(r"-?[0-9]{1,20}", args.table) else args.table
    with _server(args, progress=False) as ps:
        vec, st = ps.session(args.model).lookup_with_stats(np.asarray(keys, dtype=np.int64), table)
    if args.json:
        print(json.dumps({"keys": keys, "vectors": vec.tolist(), "hits": st.hits}))
        return 0
    np.set_printoptions(precision=5, suppress=True, linewidth=120)
    for k, v in zip(keys, vec, strict=True):
        print(k, v)
    console.print(f"[dim]levels: {st.hits}[/dim]")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    """Host and GPU bytes the config will need, from file sizes only (nothing is loaded)."""
    from .config import load_config
    from .estimate import estimate_config

    rows = estimate_config(load_config(args.config))
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    t = Table(title="memory estimate (nothing loaded)")
    cols = ("model", "table", "rows", "dim", "VDB host", "L1 (GPU or host)", "PDB disk",
            "PDB host (first load)")  # fmt: skip
    for c in cols:
        t.add_column(c, justify="right" if c not in ("model", "table") else "left")
    for r in rows:
        t.add_row(
            r.model,
            r.table,
            f"{r.rows:,}",
            str(r.dim),
            _mb(r.vdb_bytes),
            _mb(r.l1_bytes),
            _mb(r.pdb_bytes),
            _mb(r.pdb_host_bytes),
        )
    attrs = ("vdb_bytes", "l1_bytes", "pdb_bytes", "pdb_host_bytes")
    tot = [sum(getattr(r, a) for r in rows) for a in attrs]
    t.add_row("total", "", f"{sum(r.rows for r in rows):,}", "", *map(_mb, tot))
    console.print(t)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Write a synthetic Criteo-like model (HugeCTR sparse files + hps.json)."""
    from .synth import criteo_vocab_sizes, make_model

    writable_dir(args.out, "the model directory")
    sizes = criteo_vocab_sizes(args.rows)[: args.tables]
    try:
        m = make_model(args.out, sizes, [args.dim] * len(sizes), seed=args.seed, name=args.name)
    except OSError as e:
        raise HPSError(f"synth: cannot write the model: {os_error(e)}") from None
    console.print(
        f"wrote {len(sizes)} tables, {sum(sizes):,} rows, dim {args.dim}; config: {m.config_path}"
    )
    return 0


def cmd_dense(args: argparse.Namespace) -> int:
    """Write the DLRM dense network as an ONNX file, with weights from a seed."""
    from .dense import describe_onnx, save_dense_model

    if Path(args.out).is_dir():
        raise HPSError(f"--out {args.out}: is a directory, expected the path of an .onnx file")
    try:
        save_dense_model(args.out, dim=args.dim, seed=args.seed, num_slots=args.slots)
    except OSError as e:
        raise HPSError(f"--out {args.out}: cannot write it: {os_error(e)}") from None
    io = describe_onnx(args.out)
    sig = ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in io.inputs + io.outputs)
    console.print(f"wrote {args.out}: {sig}", highlight=False)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate a model, serve it in process on the embedded default tiers, and show lookups."""
    from .demo import run_demo

    return run_demo(
        args.dir,
        rows=args.rows,
        dim=args.dim,
        batches=args.batches,
        batch_size=args.batch_size,
        redis=args.redis,
    )


def cmd_repo(args: argparse.Namespace) -> int:
    """Write a Triton model repository (embedding models, dense ONNX model, ensemble)."""
    from .repo import write_repository

    writable_dir(args.out, "the repository directory")
    slots, dim = 26, args.dim  # the synthetic model's tables
    if args.config:  # read it before anything is written (write_repository reads it again)
        from .config import load_config_dict

        models = load_config_dict(args.config).get("models")
        first = models[0] if isinstance(models, list) and models else {}
        files = first.get("sparse_files") if isinstance(first, dict) else None
        dims = first.get("embedding_vecsize_per_table") if isinstance(first, dict) else None
        slots = len(files) if isinstance(files, list) else None
        dim = dims[0] if isinstance(dims, list) and dims and len(set(map(str, dims))) == 1 else None
        dim = int(dim) if isinstance(dim, (int, str)) and str(dim).isdigit() else None
    if args.onnx:
        check_dense_onnx(args.onnx, slots, dim)
    spec = write_repository(
        args.out, config=args.config, onnx=args.onnx, name=args.name, rows=args.rows,
        dim=args.dim, instances=args.instances, max_batch_size=args.max_batch_size,
    )  # fmt: skip
    console.print(
        f"wrote {spec.root}: ensemble {spec.ensemble} (DENSE [B, {spec.num_dense}] + CAT "
        f"[B, {spec.slots}] -> PROB), {spec.embedding}, {spec.dense}, hps_embedding; "
        f"config {spec.config}",
        highlight=False,
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Fill the shared tiers, start Triton on the repository and keep it running until Ctrl-C."""
    from .launcher import stopped_by_signals, supervise
    from .repo import serving

    try:
        with (
            stopped_by_signals(),
            serving(
                args.repo, rows=args.rows, dim=args.dim, instances=args.instances, progress=True
            ) as (spec, server),
        ):
            console.print(
                f"serving {spec.root}: HTTP {server.http_url}, gRPC {server.grpc_url}, "
                f"metrics {server.metrics_url}; log {server.log_path}. Ctrl-C (or SIGTERM) "
                "stops it.", highlight=False, soft_wrap=True,
            )  # fmt: skip
            try:
                supervise(server, args.restarts, say=lambda m: console.print(
                    m, highlight=False, markup=False, soft_wrap=True))  # fmt: skip
            except KeyboardInterrupt:
                console.print("stopping")
    except KeyboardInterrupt:  # before the server was up: what was started is cleaned up
        console.print("stopped")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """Watch a tritonserver started elsewhere and reload a model whose stub process died."""
    from .config import split_address
    from .watchdog import watch_server

    if split_address(args.url) is None:
        raise HPSError(f"--url {args.url}: expected the server's HTTP address as host:port")
    watch_server(args.pid, args.url, args.interval, say=lambda m: console.print(m, highlight=False))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Publish row updates of one table to the update stream (HCTR messages)."""
    from .updates import Publisher, connect
    from .updates.stream import DEFAULT_STREAM

    address, stream = args.redis, args.stream
    if args.config:
        from .config import load_config

        u = load_config(args.config).update_source
        if not address and u.type != "redis_stream":
            raise HPSError(
                f"--config {args.config}: update_source.type is {u.type!r}, so it names no update "
                "stream; give --redis host:port or a config with update_source.type 'redis_stream'"
            )
        address, stream = address or u.brokers, stream or u.stream
    if not address:
        raise HPSError("publish: give --redis host:port or a config with update_source.brokers")
    if args.npz and args.random is not None:
        raise HPSError("publish: give either --npz FILE or --random N, not both")
    if args.npz:
        keys, vectors = read_npz_rows(args.npz)
    elif args.random is not None:
        rng = np.random.default_rng(args.seed)
        keys = rng.integers(0, args.key_range, args.random, dtype=np.int64)
        vectors = rng.standard_normal((args.random, args.dim)).astype(np.float32)
    else:
        raise HPSError("publish: give --npz FILE or --random N --dim D")
    pub = Publisher(
        connect(address, args.user, args.password), stream or DEFAULT_STREAM, maxlen=args.maxlen
    )
    ids = pub.publish(args.table, keys, vectors, dtype=args.dtype)
    console.print(
        f"published {len(keys):,} rows of {args.table} in {len(ids)} entries to {pub.stream}",
        highlight=False,
    )
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Apply the update stream to the config's VDB/PDB until interrupted (or --seconds)."""
    import time

    from .config import load_config
    from .updates.ingestor import StoreIngestor

    cfg = load_config(args.config)
    if cfg.update_source.type != "redis_stream":
        raise HPSError(
            f"{args.config}: update_source.type is {cfg.update_source.type!r}, so there is no "
            "update stream to ingest; set update_source.type to 'redis_stream' (and "
            "update_source.brokers to its Redis host:port)"
        )
    store = StoreIngestor(
        cfg,
        scope=args.scope,
        group=args.group,
        consumer=args.consumer,
        start_id="$" if args.new_only else "0",
    )
    ing = store.ingestor
    end = time.monotonic() + args.seconds if args.seconds else None
    console.print(f"ingesting {cfg.update_source.stream} as group {ing.group}")
    try:
        ing.run(until=(lambda: time.monotonic() > end) if end else None)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check the environment (and a config) and say what to fix; exit 1 if anything failed."""
    from .doctor import as_json, report, run_checks

    checks = run_checks(args.config)
    result = as_json(checks)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(checks, lambda line: console.print(line, highlight=False, soft_wrap=True))
    return 0 if result["ok"] else 1


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark module with the remaining arguments."""
    if args.which == "cache":
        from .bench.cache import main as bench
    elif args.which == "redis":
        from .bench.redis import main as bench
    elif args.which == "memory":
        from .bench.memory import main as bench
    elif args.which == "e2e":
        from .bench.e2e import main as bench
    elif args.which == "warmup":
        from .bench.warmup import main as bench
    else:
        from .bench.host_tier import main as bench
    return bench(args.rest)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _print_tables(infos: list) -> None:
    t = Table(title="tables")
    for c in (
        "model",
        "table",
        "dim",
        "rows",
        "VDB rows",
        "PDB rows",
        "L1 rows/cap",
        "VDB bytes",
        "L1 bytes",
        "file bytes",
    ):
        t.add_column(c)
    for i in infos:
        t.add_row(
            i.model,
            i.table,
            str(i.dim),
            f"{i.rows:,}",
            f"{i.vdb_rows:,}",
            f"{i.pdb_rows:,}",
            f"{i.l1_rows:,}/{i.l1_capacity:,}",
            _mb(i.vdb_bytes),
            _mb(i.l1_bytes),
            _mb(i.file_bytes),
        )
    console.print(t)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hps``."""
    p = argparse.ArgumentParser(prog="hps", description="Hierarchical embedding parameter server")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("load", help="load sparse files into the VDB/PDB (progress bars)")
    s.add_argument("config")
    s.set_defaults(func=cmd_load)

    s = sub.add_parser("inspect", help="tables, rows, dims and bytes per level")
    s.add_argument("config")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("lookup", help="look up keys of one table")
    s.add_argument("config")
    s.add_argument("--model", required=True)
    s.add_argument("--table", default="0", help="table index or name")
    s.add_argument("--keys-file", help="text file with one base-10 int64 key per line")
    s.add_argument("--json", action="store_true")
    s.add_argument("--keys", nargs="+", default=[], help="int64 keys (negative ones too)")
    s.set_defaults(func=cmd_lookup)

    s = sub.add_parser("estimate", help="host and GPU bytes a config will need, before loading")
    s.add_argument("config")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_estimate)

    s = sub.add_parser("doctor", help="check the environment (and a config); says what to fix")
    s.add_argument("--config", help="also check this config: files, Redis, /dev/shm and memory")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("synth", help="write a synthetic Criteo-like model")
    s.add_argument("out")
    s.add_argument("--rows", type=int, default=1_000_000, help="total rows of the 26 Criteo tables")
    s.add_argument("--tables", type=int, default=26, help="write only the first N of them")
    s.add_argument("--dim", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--name", type=model_name, default="synthetic")
    s.set_defaults(func=cmd_synth, limits=limits(rows=1, tables=(1, 26), dim=(1, MAX_DIM), seed=0))

    s = sub.add_parser("dense", help="write the DLRM dense network as an ONNX file")
    s.add_argument("--out", required=True, help="the .onnx file to write")
    s.add_argument("--dim", type=int, default=16, help="embedding dim of every slot")
    s.add_argument("--seed", type=int, default=0, help="seed of the weights")
    s.add_argument("--slots", type=int, default=26, help="categorical slots (tables)")
    # --dim is checked by dense_arch (its error names 'dim')
    s.set_defaults(func=cmd_dense, limits=limits(seed=0, slots=(1, 4096)))

    s = sub.add_parser("repo", help="write a Triton model repository for our backends")
    s.add_argument("out", help="the repository directory")
    s.add_argument("--config", help="an hps.json with sparse files (default: a synthetic model)")
    s.add_argument("--onnx", help="the dense model (default: DLRM with seeded weights)")
    s.add_argument("--name", type=model_name, default="dlrm", help="name of the ensemble")
    s.add_argument("--rows", type=int, default=1_000_000, help="rows of a synthetic model")
    s.add_argument("--dim", type=int, default=16, help="dim of a synthetic model")
    s.add_argument("--instances", type=int, default=1, help="instances per model")
    s.add_argument("--max-batch-size", type=int, default=4096)
    s.set_defaults(
        func=cmd_repo, limits=limits(rows=1, dim=(1, MAX_DIM), instances=1, max_batch_size=1)
    )

    s = sub.add_parser("serve", help="run Triton on a repository (written if missing) until Ctrl-C")
    s.add_argument("repo", nargs="?", default="model_repository")
    s.add_argument("--rows", type=int, default=1_000_000)
    s.add_argument("--dim", type=int, default=16)
    s.add_argument("--instances", type=int, default=1)
    s.add_argument(
        "--restarts", type=int, default=3,
        help="start tritonserver again when it dies, at most this often in 10 minutes (then "
        "exit 2); 0: exit at its first death",
    )  # fmt: skip
    s.set_defaults(func=cmd_serve, limits=limits(rows=1, dim=(1, MAX_DIM), instances=1, restarts=0))

    s = sub.add_parser(
        "watch",
        help="reload the models of a running tritonserver whose stub processes die (Triton 2.51 "
        "does not restart them); for servers not started by hps serve",
    )
    s.add_argument(
        "--pid", type=int, required=True,
        help="the tritonserver's pid, or one that will exec it or start it (an entrypoint's $$)",
    )  # fmt: skip
    s.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP host:port")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between scans")
    s.set_defaults(func=cmd_watch, limits=limits(pid=1, interval=(0.05, 3600)))

    s = sub.add_parser(
        "bench",
        help="benchmarks: cache (L1), host-tier (VDB/PDB), redis, memory (estimate vs "
        "measured), e2e (lookup + dense model), warmup (first requests of a served "
        "instance); writes benchmarks/results/",
    )
    s.add_argument("which", choices=["cache", "host-tier", "redis", "memory", "e2e", "warmup"])
    s.add_argument(
        "rest", nargs=argparse.REMAINDER, help="options of that benchmark (e.g. --quick)"
    )
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("publish", help="publish row updates of a table to the update stream")
    s.add_argument("--config", help="take the stream's Redis and name from update_source")
    s.add_argument("--redis", default="", help="the stream's Redis, host:port[,host:port...]")
    s.add_argument("--stream", default="", help="stream name (default hps_updates)")
    s.add_argument("--table", required=True, help="table name, e.g. hps_et.<model>.<table>")
    s.add_argument("--npz", help=".npz file with arrays 'keys' (int64) and 'vectors' [n, dim]")
    s.add_argument("--random", type=int, help="publish N random rows instead")
    s.add_argument("--dim", type=int, default=16, help="dim of the --random rows")
    s.add_argument("--key-range", type=int, default=1_000_000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    s.add_argument(
        "--maxlen",
        type=int,
        help="trim the stream to about this many entries, >= 1 (default: keep all)",
    )
    s.add_argument("--user", default="")
    s.add_argument("--password", default="")
    s.set_defaults(
        func=cmd_publish,
        limits=limits(random=1, dim=(1, MAX_DIM), key_range=(1, 2**63 - 1), seed=0, maxlen=1),
    )

    s = sub.add_parser("ingest", help="apply the update stream to the config's VDB/PDB")
    s.add_argument("config")
    s.add_argument("--scope", choices=["all", "shared", "local"], default="all")
    s.add_argument("--group", help="consumer group (default update_source.group or hps:<scope>)")
    s.add_argument("--consumer", help="consumer name (default host + object id)")
    s.add_argument(
        "--seconds", type=float, default=0, help="stop after this many seconds (0: never)"
    )
    s.add_argument("--new-only", action="store_true", help="a new group skips older entries")
    s.set_defaults(func=cmd_ingest, limits=limits(seconds=0))

    s = sub.add_parser("demo", help="generate a model, serve it in process, show lookups")
    s.add_argument("--dir", default="demo_data")
    s.add_argument("--rows", type=int, default=1_000_000)
    s.add_argument("--dim", type=int, default=16)
    s.add_argument("--batches", type=int, default=50)
    s.add_argument("--batch-size", type=int, default=1024)
    s.add_argument(
        "--redis", help="host:port[,...]: Redis (Cluster) as the VDB, with online updates"
    )
    s.set_defaults(func=cmd_demo, limits=limits(rows=1, dim=(1, MAX_DIM), batches=1, batch_size=1))
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hps`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )

    def run() -> int:
        check_limits(args)
        return args.func(args)

    return run_reporting_errors(run)


if __name__ == "__main__":
    sys.exit(main())
