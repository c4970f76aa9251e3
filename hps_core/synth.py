"""Synthetic Criteo-like models (HugeCTR sparse files + hps.json) and Zipf request streams.

Everything is a pure function of the seed:

- a table's row ``i`` has key ``splitmix64(i + offset)`` viewed as int64 (splitmix64 is a
  bijection of 64-bit words, so keys are distinct and cover negatives), and a N(0, 0.05) float32
  vector drawn in fixed chunks of ``CHUNK_ROWS`` rows, each from its own seeded generator, so
  a table can be written chunk by chunk and still equal ``make_table``;
- popularity rank ``r`` (0 = hottest) is row ``(a * r + b) % rows`` with ``a`` coprime to
  ``rows``: a seeded permutation that needs no memory, so 10M-row tables stay cheap.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import ConfigError, InvalidInputError
from .hashing import splitmix64

# The 26 categorical vocabulary sizes of the Criteo Kaggle display-advertising data set.
CRITEO_VOCAB_SIZES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
HOT_KEYS_IN_META = 1024
CHUNK_ROWS = 1 << 20
VECTOR_STD = 0.05
MAX_ROWS = 1 << 32  # keeps a * r of the popularity permutation below 2**63


def criteo_vocab_sizes(total_rows: int) -> list[int]:
    """The Criteo table sizes scaled to sum to ``total_rows`` (exactly when >= 26), each >= 1."""
    if total_rows < 1:
        raise ConfigError("rows", total_rows, "an integer >= 1 (total rows of the tables)")
    raw = np.array(CRITEO_VOCAB_SIZES, np.float64) * (total_rows / sum(CRITEO_VOCAB_SIZES))
    sizes = np.maximum(1, np.floor(raw)).astype(np.int64)
    short = total_rows - int(sizes.sum())
    if short > 0:  # largest remainders get the rows that flooring dropped (short < 26)
        sizes[np.argsort(-(raw - np.floor(raw)), kind="stable")[:short]] += 1
    for _ in range(min(-short, int(sizes.sum()) - len(sizes))):  # the 1-row floor added rows
        sizes[np.argmax(sizes)] -= 1
    return [int(s) for s in sizes]


def _check_rows(rows: int, dim: int, seed: int) -> None:
    if not 0 <= rows < MAX_ROWS:
        raise ConfigError("rows", rows, "0 <= rows < 2**32 (rows of a table)")
    if dim < 1:
        raise ConfigError("dim", dim, "an integer >= 1")
    if seed < 0:
        raise ConfigError("seed", seed, "an integer >= 0")


@lru_cache(maxsize=1024)
def _key_offset(seed: int) -> np.uint64:
    return np.random.default_rng([seed, 0]).integers(0, 2**64, dtype=np.uint64)


def _chunk(rows: int, dim: int, seed: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys and vectors of rows [c * CHUNK_ROWS, ...) of a table."""
    lo, hi = c * CHUNK_ROWS, min(rows, (c + 1) * CHUNK_ROWS)
    keys = splitmix64(np.arange(lo, hi, dtype=np.uint64) + _key_offset(seed)).view(np.int64)
    rng = np.random.default_rng([seed, 1, c])
    vectors = rng.standard_normal((hi - lo, dim), dtype=np.float32) * np.float32(VECTOR_STD)
    return keys, vectors


def _chunks(rows: int, dim: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for c in range(math.ceil(rows / CHUNK_ROWS)):
        yield _chunk(rows, dim, seed, c)


def make_table(rows: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct int64 keys spread over all of int64, and N(0, 0.05) float32 vectors [rows, dim]."""
    _check_rows(rows, dim, seed)
    keys = np.empty(rows, np.int64)
    vectors = np.empty((rows, dim), np.float32)
    for c, (k, v) in enumerate(_chunks(rows, dim, seed)):
        keys[c * CHUNK_ROWS : c * CHUNK_ROWS + len(k)] = k
        vectors[c * CHUNK_ROWS : c * CHUNK_ROWS + len(k)] = v
    return keys, vectors


@lru_cache(maxsize=1024)
def _popularity_params(rows: int, seed: int) -> tuple[int, int]:
    """(a, b) of the rank -> row permutation ``(a * r + b) % rows``; gcd(a, rows) = 1."""
    rng = np.random.default_rng([seed, 2])
    limit = max(2, min(rows, 1 << 31))
    a = int(rng.integers(1, limit))
    while math.gcd(a, rows) != 1:
        a = int(rng.integers(1, limit))
    return a, int(rng.integers(0, max(rows, 1)))


def popularity_rank_to_row(rows: int, seed: int, ranks: np.ndarray) -> np.ndarray:
    """Row index (file order) of each popularity rank of a table made with this seed."""
    r = np.asarray(ranks, dtype=np.int64)
    if r.size and (r.min() < 0 or r.max() >= rows):
        raise InvalidInputError("ranks", f"[{r.min()}, {r.max()}]", f"ranks in [0, {rows})")
    a, b = _popularity_params(rows, seed)
    return ((r.astype(np.uint64) * np.uint64(a) + np.uint64(b)) % np.uint64(rows)).astype(np.int64)


def _write_sparse_dir(
    path: Path, rows: int, dim: int, chunks: Iterator, hot_keys: np.ndarray | None
) -> None:
    """One HugeCTR sparse table directory: ``key`` (<i8), ``emb_vector`` (<f4), ``meta`` JSON."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "key", "wb") as kf, open(path / "emb_vector", "wb") as vf:
        for keys, vectors in chunks:
            keys.astype("<i8").tofile(kf)
            vectors.astype("<f4").tofile(vf)
    meta = {"format": "hugectr_sparse", "rows": rows, "dim": dim, "key_dtype": "int64"}
    if hot_keys is not None:
        meta["hot_keys"] = [int(k) for k in hot_keys]
    (path / "meta").write_text(json.dumps(meta))


@lru_cache(maxsize=1024)
def _table_seed(seed: int, t: int) -> int:
    return int(np.random.SeedSequence([seed, t]).generate_state(1, np.uint32)[0])


@dataclass
class SyntheticModel:
    """A generated model: where its files are, and how its keys rank by popularity."""

    name: str
    directory: str
    table_paths: list[str]
    vocab_sizes: list[int]
    dims: list[int]
    config_path: str
    seed: int

    @property
    def num_tables(self) -> int:
        return len(self.vocab_sizes)

    def table_seed(self, t: int) -> int:
        """The ``make_table`` seed of table t."""
        return _table_seed(self.seed, t)

    def table(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Table t's (keys, vectors), regenerated (equal to its files)."""
        return make_table(self.vocab_sizes[t], self.dims[t], self.table_seed(t))

    def popularity_rank_to_key(self, t: int, ranks: np.ndarray) -> np.ndarray:
        """Keys of table t at the given popularity ranks (0 = hottest), int64."""
        rows = popularity_rank_to_row(self.vocab_sizes[t], self.table_seed(t), ranks)
        offset = _key_offset(self.table_seed(t))
        return splitmix64(rows.astype(np.uint64) + offset).view(np.int64)


def model_spec(
    out_dir: str | os.PathLike,
    vocab_sizes: Sequence[int],
    dims: Sequence[int],
    seed: int = 0,
    name: str = "synthetic",
) -> SyntheticModel:
    """The description of the model ``make_model`` writes (or wrote) with these arguments."""
    if len(vocab_sizes) != len(dims) or not vocab_sizes:
        raise ConfigError(
            "vocab_sizes, dims", (len(vocab_sizes), len(dims)), "equal lengths, at least 1 table"
        )
    if seed < 0:
        raise ConfigError("seed", seed, "an integer >= 0")
    out = Path(out_dir).resolve()
    paths = [str(out / f"{name}{t}_sparse_0.model") for t in range(len(vocab_sizes))]
    return SyntheticModel(
        name, str(out), paths, [int(v) for v in vocab_sizes], [int(d) for d in dims],
        str(out / "hps.json"), seed,
    )  # fmt: skip


def hps_json(model: SyntheticModel) -> dict:
    """The HugeCTR ``hps.json`` of a synthetic model."""
    T = model.num_tables
    return {
        "supportlonglong": True,
        "models": [{
            "model": model.name,
            "sparse_files": list(model.table_paths),
            "embedding_table_names": [f"table{t}" for t in range(T)],
            "embedding_vecsize_per_table": list(model.dims),
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


def make_model(
    out_dir: str | os.PathLike,
    vocab_sizes: Sequence[int],
    dims: Sequence[int],
    seed: int = 0,
    name: str = "synthetic",
    hot_keys: bool = True,
) -> SyntheticModel:
    """Write one HugeCTR sparse directory per table and an ``hps.json`` for them."""
    model = model_spec(out_dir, vocab_sizes, dims, seed, name)
    for t, (rows, dim) in enumerate(zip(model.vocab_sizes, model.dims, strict=True)):
        s = model.table_seed(t)
        _check_rows(rows, dim, s)
        hot = None
        if hot_keys:
            hot = model.popularity_rank_to_key(t, np.arange(min(rows, HOT_KEYS_IN_META)))
        _write_sparse_dir(Path(model.table_paths[t]), rows, dim, _chunks(rows, dim, s), hot)
    Path(model.config_path).write_text(json.dumps(hps_json(model), indent=2))
    return model


# -- Zipf popularity ------------------------------------------------------------------------------


def zipf_probabilities(n: int, alpha: float) -> np.ndarray:
    """p_r proportional to 1 / (r + 1)**alpha for ranks r = 0..n-1 (alpha 0: uniform), float64."""
    if n < 1:
        raise ConfigError("n", n, "an integer >= 1")
    if not alpha >= 0:
        raise ConfigError("alpha", alpha, "a number >= 0")
    w = np.arange(1, n + 1, dtype=np.float64) ** -float(alpha)
    return w / w.sum()


@lru_cache(maxsize=32)  # one Criteo model's 26 tables fit
def _zipf_cdf(n: int, alpha: float) -> np.ndarray:
    cdf = np.cumsum(zipf_probabilities(n, alpha))
    cdf /= cdf[-1]
    cdf.flags.writeable = False
    return cdf


def zipf_ranks(n: int, alpha: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` popularity ranks (int64 in [0, n)) drawn from Zipf(alpha) by inverse CDF."""
    cdf = _zipf_cdf(int(n), float(alpha))
    ranks = np.searchsorted(cdf, rng.random(size), side="right")
    return np.minimum(ranks, n - 1).astype(np.int64)


def oracle_top_c_hit_rate(n: int, alpha: float, c: int) -> float:
    """Expected hit rate of an oracle cache holding the c most popular of n Zipf rows."""
    if c <= 0:
        return 0.0
    return float(_zipf_cdf(int(n), float(alpha))[min(c, n) - 1])


def empirical_top_c_hit_rate(keys: np.ndarray, c: int) -> float:
    """For a concrete key sequence: the share of accesses that go to its c most frequent keys."""
    keys = np.asarray(keys).ravel()
    if len(keys) == 0 or c <= 0:
        return 0.0
    _, counts = np.unique(keys, return_counts=True)
    return float(np.sort(counts)[::-1][:c].sum() / len(keys))


class RequestStream:
    """Batches of Criteo-like samples: one Zipf-distributed key per table per sample."""

    def __init__(
        self,
        model: SyntheticModel,
        alpha: float | Sequence[float],
        batch_size: int,
        seed: int = 0,
    ):
        T = model.num_tables
        self.alphas = [float(a) for a in np.ravel(alpha)] if np.ndim(alpha) else [float(alpha)] * T
        if len(self.alphas) != T:
            raise ConfigError("alpha", self.alphas, f"one alpha, or one per table ({T})")
        if batch_size < 1:
            raise ConfigError("batch_size", batch_size, "an integer >= 1")
        self.model, self.batch_size = model, batch_size
        self.rng = np.random.default_rng(seed)

    def keys_for_table(self, t: int, n: int) -> np.ndarray:
        """n Zipf-distributed int64 keys of table t (advances the stream's generator)."""
        ranks = zipf_ranks(self.model.vocab_sizes[t], self.alphas[t], n, self.rng)
        return self.model.popularity_rank_to_key(t, ranks)

    def next_batch(self) -> np.ndarray:
        """int64 [batch_size, num_tables]: column t holds table t's keys."""
        cols = [self.keys_for_table(t, self.batch_size) for t in range(self.model.num_tables)]
        return np.stack(cols, axis=1)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        return self.next_batch()
