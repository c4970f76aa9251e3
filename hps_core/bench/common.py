"""Shared pieces of the benchmarks: machine description, timing, JSON + table output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

RESULTS = Path("benchmarks") / "results"  # relative to where the benchmark is run


_LOAD_AT_START = [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    """What ran the benchmark: CPU, cores, memory, GPU (if any) and package versions."""
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in (
        "numpy", "numba", "rocksdict", "hps-core", "cupy-cuda12x", "cupy-cuda13x", "onnxruntime",
    ):  # fmt: skip
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        # the 1/5/15-minute run queue when the benchmark's process started: other work on a
        # small shared machine takes a core from a parallel contender (not from a serial one)
        "load_average_at_start": _LOAD_AT_START,
    }


def rate(
    fn: Callable[[object], object],
    make_input: Callable[[], object],
    items: int,
    min_seconds: float = 0.3,
    max_reps: int = 200,
) -> float:
    """Items per second of fn(x): the median call, each call on a fresh input (no warm reuse)."""
    fn(make_input())
    inputs = [make_input() for _ in range(max_reps)]
    times: list[float] = []
    while (sum(times) < min_seconds or len(times) < 5) and len(times) < max_reps:
        x = inputs[len(times)]
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return items / float(np.median(times))


def paired(
    measure: Callable[[], dict[str, float]], rounds: int, num: str, den: str
) -> tuple[dict[str, float], list[dict[str, float]], tuple[float, float]]:
    """``rounds`` rounds of ``measure``, which measures every contender once, back to back, and
    returns their rates by name. A ratio taken within a round keeps a shared machine's swings
    (which last seconds) out of it. Returns the round whose ``num / den`` is the median, all
    rounds, and that ratio's (min, max) over the rounds."""
    runs = [measure() for _ in range(rounds)]
    r = np.array([x[num] / x[den] for x in runs])
    mid = runs[int(np.argsort(r)[len(r) // 2])]
    return mid, runs, (float(r.min()), float(r.max()))


def save(name: str, payload: dict) -> Path:
    """Write results/<name>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def positive_int(text: str) -> int:
    """argparse type of a count or size option: an integer >= 1 (argparse's error names the
    option; a 0 or a negative size used to end in a traceback or an empty result)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v}: expected an integer >= 1")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"{v}: expected a number > 0")
    return v


def csv_of(kind: Callable[[str], object]) -> Callable[[str], list]:
    """argparse type of a comma-separated list, each item checked by ``kind``."""

    def parse(text: str) -> list:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected one value or more, comma-separated")
        return items

    return parse
