"""The ``hps-client`` command: demo, predict (Criteo TSV), perf-data."""

from __future__ import annotations

import argparse
import sys

import numpy as np
from rich.console import Console

from hps_core.cli_input import MAX_DIM, limits

console = Console()


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(
        args.repo, rows=args.rows, dim=args.dim, batches=args.batches, batch_size=args.batch_size
    )


def cmd_predict(args: argparse.Namespace) -> int:
    """Predictions for Criteo TSV lines; with --check, compared with the in-process reference."""
    from tritonclient.utils import InferenceServerException

    from hps_core.errors import HPSError

    from .client import HPSClient
    from .criteo import parse_criteo_lines

    with open(args.tsv) as f:
        labels, dense, cat = parse_criteo_lines(f)
    try:
        with HPSClient(args.url, args.protocol) as c:
            prob = c.predict(dense, cat, model=args.model)
    except (InferenceServerException, OSError) as e:  # their text does not say which server
        raise HPSError(f"Triton at {args.url} ({args.protocol}), model {args.model}: {e}") from None
    for i in range(len(prob)):
        console.print(f"{i}\tlabel {labels[i]}\tPROB {prob[i, 0]:.6f}", highlight=False)
    if args.check:
        from .reference import Reference

        ref = Reference(args.check)
        try:
            diff = float(np.max(np.abs(prob - ref.predict(dense, cat)))) if len(prob) else 0.0
        finally:
            ref.close()
        console.print(f"max |Triton - reference| = {diff:.2e}", highlight=False)
        return 0 if diff <= 1e-5 else 1
    return 0


def cmd_perf_data(args: argparse.Namespace) -> int:
    from hps_core.repo import read_spec
    from hps_core.workload import write_perf_data

    path = write_perf_data(read_spec(args.repo), args.out, args.entries, args.model)
    console.print(f"wrote {path}", highlight=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hps-client", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="start Triton on the example repository and send requests")
    s.add_argument("--repo", default="model_repository")
    s.add_argument("--rows", type=int, default=1_000_000)
    s.add_argument("--dim", type=int, default=16)
    s.add_argument("--batches", type=int, default=100)
    s.add_argument("--batch-size", type=int, default=256)
    s.set_defaults(func=cmd_demo, limits=limits(rows=1, dim=(1, MAX_DIM), batches=1,
                                                batch_size=(1, 1 << 20)))  # fmt: skip

    s = sub.add_parser("predict", help="predictions for Criteo TSV lines")
    s.add_argument("tsv", help="label, 13 integers, 26 hex categoricals per line")
    s.add_argument("--url", default="127.0.0.1:8000")
    s.add_argument("--protocol", choices=["http", "grpc"], default="http")
    s.add_argument("--model", default="dlrm")
    s.add_argument("--check", metavar="REPO", help="compare with the in-process reference")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("perf-data", help="write perf_analyzer --input-data JSON")
    s.add_argument("--repo", default="model_repository")
    s.add_argument("--out", required=True)
    s.add_argument("--entries", type=int, default=1024, help="requests in the file (1..65536)")
    s.add_argument("--model", choices=["ensemble", "embedding", "hps"], default="ensemble")
    s.set_defaults(func=cmd_perf_data, limits=limits(entries=(1, 65536)))
    return p


def main(argv: list[str] | None = None) -> int:
    from tritonclient.utils import InferenceServerException

    from hps_core.cli_input import check_limits, run_reporting_errors

    from .criteo import CriteoFormatError

    args = build_parser().parse_args(argv)

    # a server that is not there, a model it does not serve, a line of the TSV: one line each
    def run() -> int:
        check_limits(args)
        return args.func(args)

    return run_reporting_errors(run, also=(InferenceServerException, CriteoFormatError))


if __name__ == "__main__":
    sys.exit(main())
