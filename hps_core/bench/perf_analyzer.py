"""perf_analyzer (from tritonclient 2.50.0's wheel) run as a subprocess: one measurement -> dict.

Used by ``make perf`` (``hps_client.perf``) and ``hps bench e2e``; it imports nothing of Triton.
"""

from __future__ import annotations

import csv
import os
import subprocess
import tempfile
from pathlib import Path

PERF_VENV = Path(".venv-perf")


def perf_analyzer() -> tuple[str, dict[str, str]]:
    """The perf_analyzer binary (tritonclient 2.50.0's wheel) and the environment it needs."""
    exe = os.environ.get("PERF_ANALYZER") or str(PERF_VENV / "bin" / "perf_analyzer")
    if not Path(exe).is_file():
        raise FileNotFoundError(
            f"{exe}: run `make perf` (it installs tritonclient==2.50.0 into {PERF_VENV})"
        )
    env = dict(os.environ)
    libs = [str(p.parent) for p in Path(exe).resolve().parents[1].glob("lib/python*/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12")]  # fmt: skip
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")])
    return exe, env


def run_perf(model: str, url: str, data: Path, batch: int, concurrency: int, seconds: float):
    """One perf_analyzer measurement -> {inferences_s, p50_us, p99_us, ...}."""
    exe, env = perf_analyzer()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        cmd = [
            exe, "-m", model, "-u", url, "-i", "grpc", "-b", str(batch),
            "--concurrency-range", f"{concurrency}:{concurrency}", "--input-data", str(data),
            "-p", str(int(seconds * 1000)), "-r", "4", "-s", "50", "-f", str(out),
        ]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
        if r.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"perf_analyzer failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
            )
        row = next(csv.DictReader(out.open()))
    return {
        "model": model,
        "batch": batch,
        "concurrency": concurrency,
        # perf_analyzer counts every sample of a batch as an inference
        "samples_s": float(row["Inferences/Second"]),
        "requests_s": float(row["Inferences/Second"]) / batch,
        "p50_us": float(row["p50 latency"]),
        "p99_us": float(row["p99 latency"]),
    }
