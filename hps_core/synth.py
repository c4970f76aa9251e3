"""Synthetic Criteo-like models (HugeCTR sparse files + hps.json) and Zipf request streams."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .hashing import splitmix64
from .model_io import write_table

# The 26 categorical vocabulary sizes of the Criteo Kaggle display-advertising data set.
CRITEO_VOCAB_SIZES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
HOT_KEYS_IN_META = 1024


def criteo_vocab_sizes(total_rows: int) -> list[int]:
    """The Criteo table shapes scaled so they sum to about ``total_rows`` (each at least 1)."""
    scale = total_rows / sum(CRITEO_VOCAB_SIZES)
    return [max(1, round(v * scale)) for v in CRITEO_VOCAB_SIZES]


def make_table(rows: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys spread over all of int64 (negatives included) and N(0, 0.05) float32 rows."""
    offset = np.int64(np.random.default_rng(seed).integers(0, 2**62))
    keys = splitmix64(np.arange(rows, dtype=np.int64) + offset).view(
        np.int64
    )  # a bijection: distinct
    vecs = np.random.default_rng(seed + 1).normal(0.0, 0.05, size=(rows, dim)).astype(np.float32)
    return keys, vecs


def popularity_order(rows: int, seed: int) -> np.ndarray:
    """Row index of popularity rank r (0 = hottest): a seeded permutation."""
    return np.random.default_rng(seed + 2).permutation(rows)


@dataclass
class SyntheticModel:
    """A generated model: where its files are and how its keys are ranked by popularity."""

    name: str
    directory: str
    table_paths: list[str]
    vocab_sizes: list[int]
    dims: list[int]
    config_path: str
    seed: int

    def table_seed(self, t: int) -> int:
        return self.seed * 1000 + t * 7

    @lru_cache(maxsize=64)  # noqa: B019 (a handful of models live for the whole process)
    def _table(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        keys, _ = make_table(self.vocab_sizes[t], 1, self.table_seed(t))
        return keys, popularity_order(self.vocab_sizes[t], self.table_seed(t))

    def popularity_rank_to_key(self, t: int, ranks: np.ndarray) -> np.ndarray:
        """Keys of table t at the given popularity ranks."""
        keys, order = self._table(t)
        return keys[order[np.asarray(ranks)]]

    def __hash__(self) -> int:
        return hash((self.directory, self.seed))


def model_spec(
    out_dir: str | os.PathLike,
    vocab_sizes: list[int],
    dims: list[int],
    seed: int = 0,
    name: str = "synthetic",
) -> SyntheticModel:
    """The description of the model make_model writes (or wrote) with these arguments."""
    out = Path(out_dir).resolve()
    paths = [str(out / f"{name}{t}_sparse_0.model") for t in range(len(vocab_sizes))]
    return SyntheticModel(
        name, str(out), paths, list(vocab_sizes), list(dims), str(out / "hps.json"), seed
    )


def make_model(
    out_dir: str | os.PathLike,
    vocab_sizes: list[int],
    dims: list[int],
    seed: int = 0,
    name: str = "synthetic",
    hot_keys: bool = True,
) -> SyntheticModel:
    """Write one HugeCTR sparse directory per table and an ``hps.json`` for them."""
    model = model_spec(out_dir, vocab_sizes, dims, seed, name)
    Path(model.directory).mkdir(parents=True, exist_ok=True)
    for t, (rows, dim) in enumerate(zip(vocab_sizes, dims, strict=True)):
        keys, vecs = make_table(rows, dim, model.table_seed(t))
        n_hot = min(rows, HOT_KEYS_IN_META)
        hot = model.popularity_rank_to_key(t, np.arange(n_hot)) if hot_keys else None
        write_table(model.table_paths[t], keys, vecs, hot_keys=hot)
    T = len(vocab_sizes)
    cfg = {
        "supportlonglong": True,
        "models": [{
            "model": name,
            "sparse_files": model.table_paths,
            "embedding_table_names": [f"table{t}" for t in range(T)],
            "embedding_vecsize_per_table": list(dims),
            "maxnum_catfeature_query_per_table_per_sample": [1] * T,
            "deployed_device_list": [0],
            "max_batch_size": 1024,
            "default_value_for_each_table": [0.0] * T,
            "gpucache": True,
            "gpucacheper": 0.1,
            "hit_rate_threshold": 0.9,
        }],
        "volatile_db": {"type": "parallel_hash_map", "num_partitions": 8},
        "persistent_db": {"type": "rocks_db", "path": str(Path(model.directory) / "rocksdb")},
    }  # fmt: skip
    Path(model.config_path).write_text(json.dumps(cfg, indent=2))
    return model


def zipf_probabilities(n: int, alpha: float) -> np.ndarray:
    """p_r proportional to 1/(r+1)^alpha for ranks r = 0..n-1 (alpha 0 is uniform)."""
    if alpha < 0:
        raise ValueError(f"alpha = {alpha}: expected >= 0")
    w = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    return w / w.sum()


@lru_cache(maxsize=64)
def _zipf_cdf(n: int, alpha: float) -> np.ndarray:
    cdf = np.cumsum(zipf_probabilities(n, alpha))
    cdf[-1] = 1.0
    return cdf


def zipf_ranks(n: int, alpha: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Popularity ranks drawn from Zipf(alpha) over n items (inverse-CDF sampling)."""
    return np.minimum(np.searchsorted(_zipf_cdf(n, alpha), rng.random(size), side="right"), n - 1)


def oracle_top_c_hit_rate(n: int, alpha: float, c: int) -> float:
    """Expected hit rate of an oracle cache that holds the c most popular of n rows."""
    if c <= 0:
        return 0.0
    return float(_zipf_cdf(n, alpha)[min(c, n) - 1])


def empirical_top_c_hit_rate(keys: np.ndarray, c: int) -> float:
    """For a concrete key sequence: the share of accesses that go to its c most frequent keys."""
    if len(keys) == 0 or c <= 0:
        return 0.0
    _, counts = np.unique(keys, return_counts=True)
    return float(np.sort(counts)[::-1][:c].sum() / len(keys))


class RequestStream:
    """Batches of Criteo-like samples: one Zipf-distributed key per table per sample."""

    def __init__(self, model: SyntheticModel, alpha: float, batch_size: int, seed: int = 0):
        self.model, self.alpha, self.batch_size = model, alpha, batch_size
        self.rng = np.random.default_rng(seed)

    def keys_for_table(self, t: int, n: int) -> np.ndarray:
        """n Zipf-distributed keys of table t."""
        ranks = zipf_ranks(self.model.vocab_sizes[t], self.alpha, n, self.rng)
        return self.model.popularity_rank_to_key(t, ranks)

    def next_batch(self) -> np.ndarray:
        """int64 [batch_size, num_tables]."""
        return np.stack(
            [self.keys_for_table(t, self.batch_size) for t in range(len(self.model.vocab_sizes))],
            axis=1,
        )

    def __iter__(self):
        while True:
            yield self.next_batch()
