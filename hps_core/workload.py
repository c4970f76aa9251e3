"""Request batches for a repository: synthetic Zipf streams, and perf_analyzer input data."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .repo import DATA_DIR, RepoSpec
from .synth import RequestStream, model_spec


def zipf_batches(
    spec: RepoSpec, batch: int, alpha: float = 1.05, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (DENSE [batch, 13], CAT [batch, slots]) of a synthetic repository's model."""
    stamp = spec.root / DATA_DIR / "synth.json"
    if not stamp.is_file():
        raise FileNotFoundError(f"{stamp}: synthetic streams need a repository from `hps repo`")
    s = json.loads(stamp.read_text())
    model = model_spec(spec.root / DATA_DIR, s["sizes"], [s["dim"]] * len(s["sizes"]), s["seed"])
    stream = RequestStream(model, alpha, batch, seed=seed)
    rng = np.random.default_rng(seed + 1)
    while True:
        dense = np.log1p(rng.exponential(20.0, (batch, spec.num_dense))).astype(np.float32)
        yield dense, stream.next_batch()


def write_perf_data(
    spec: RepoSpec,
    path: str | os.PathLike,
    entries: int = 1024,
    model: str = "ensemble",
    keys_per_table: int = 64,
) -> Path:
    """perf_analyzer ``--input-data`` JSON with ``entries`` distinct inputs from a Zipf stream.

    model: ``ensemble`` (one DENSE + CAT sample per entry; perf_analyzer's ``-b`` batches
    them), ``embedding`` (CAT) or ``hps`` (KEYS + NUMKEYS: keys_per_table keys of every table
    per entry, HugeCTR's [1, n] layout).
    """
    data = []
    rows = keys_per_table if model == "hps" else 1
    batches = zipf_batches(spec, rows, seed=entries)
    for _ in range(entries):
        dense, cat = next(batches)
        if model == "hps":
            keys = np.ascontiguousarray(cat.T).ravel()  # table by table
            counts = np.full(spec.slots, rows, np.int32)
            entry = {
                "KEYS": {"content": keys.tolist(), "shape": [len(keys)]},
                "NUMKEYS": {"content": counts.tolist(), "shape": [spec.slots]},
            }
        else:
            entry = {"CAT": {"content": cat[0].tolist(), "shape": [spec.slots]}}
            if model == "ensemble":
                entry["DENSE"] = {"content": dense[0].tolist(), "shape": [spec.num_dense]}
        data.append(entry)
    path = Path(path)
    path.write_text(json.dumps({"data": data}))
    return path
