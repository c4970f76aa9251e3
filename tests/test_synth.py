"""Synthetic models and Zipf streams: determinism, file format, and the popularity maths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hps_core import synth
from hps_core.synth import (
    CRITEO_VOCAB_SIZES,
    RequestStream,
    criteo_vocab_sizes,
    empirical_top_c_hit_rate,
    make_model,
    make_table,
    model_spec,
    oracle_top_c_hit_rate,
    zipf_probabilities,
    zipf_ranks,
)


def read_dir(path: str, dim: int) -> tuple[np.ndarray, np.ndarray, dict]:
    p = Path(path)
    keys = np.fromfile(p / "key", dtype="<i8")
    vectors = np.fromfile(p / "emb_vector", dtype="<f4").reshape(-1, dim)
    return keys, vectors, json.loads((p / "meta").read_text())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("m"), [3000, 1, 17, 2500], [4, 8, 2, 3], seed=5)


# -- tables -----------------------------------------------------------------------------------


def test_make_table_is_deterministic():
    k1, v1 = make_table(5000, 4, 3)
    k2, v2 = make_table(5000, 4, 3)
    assert k1.tobytes() == k2.tobytes() and v1.tobytes() == v2.tobytes()
    k3, v3 = make_table(5000, 4, 4)
    assert not np.array_equal(k1, k3) and not np.array_equal(v1, v3)
    assert k1.dtype == np.int64 and v1.dtype == np.float32 and v1.shape == (5000, 4)


def test_keys_distinct_and_spread_over_int64():
    keys, vectors = make_table(100_000, 2, 0)
    assert len(np.unique(keys)) == len(keys)
    assert 0.45 < (keys < 0).mean() < 0.55
    assert keys.min() < -(2**62) and keys.max() > 2**62
    assert abs(vectors.std() - synth.VECTOR_STD) < 0.002 and abs(vectors.mean()) < 0.002


def test_files_match_make_table_across_chunks(model, monkeypatch, tmp_path):
    for t, path in enumerate(model.table_paths):
        keys, vectors, meta = read_dir(path, model.dims[t])
        k, v = model.table(t)
        np.testing.assert_array_equal(keys, k)
        np.testing.assert_array_equal(vectors, v)
        assert meta["format"] == "hugectr_sparse" and meta["key_dtype"] == "int64"
        assert (meta["rows"], meta["dim"]) == (model.vocab_sizes[t], model.dims[t])
        n_hot = min(model.vocab_sizes[t], synth.HOT_KEYS_IN_META)
        assert meta["hot_keys"] == model.popularity_rank_to_key(t, np.arange(n_hot)).tolist()
    monkeypatch.setattr(synth, "CHUNK_ROWS", 1000)  # a table written in 3 chunks
    m = make_model(tmp_path, [2500], [3], seed=1, hot_keys=False)
    keys, vectors, meta = read_dir(m.table_paths[0], 3)
    k, v = m.table(0)
    np.testing.assert_array_equal(keys, k)
    np.testing.assert_array_equal(vectors, v)
    assert "hot_keys" not in meta


def test_make_model_same_seed_same_bytes(model, tmp_path):
    again = make_model(tmp_path / "a", model.vocab_sizes, model.dims, seed=5)
    other = make_model(tmp_path / "b", model.vocab_sizes, model.dims, seed=6)
    for t in range(model.num_tables):
        for f in ("key", "emb_vector", "meta"):
            mine = (Path(model.table_paths[t]) / f).read_bytes()
            assert (Path(again.table_paths[t]) / f).read_bytes() == mine
            assert (Path(other.table_paths[t]) / f).read_bytes() != mine
    assert model_spec(tmp_path / "a", model.vocab_sizes, model.dims, seed=5) == again


def test_hps_json(model):
    cfg = json.loads(Path(model.config_path).read_text())
    assert cfg["supportlonglong"] is True
    (m,) = cfg["models"]
    T = model.num_tables
    assert m["model"] == "synthetic" and m["sparse_files"] == model.table_paths
    assert all(Path(p).is_absolute() and Path(p).is_dir() for p in m["sparse_files"])
    assert [Path(p).name for p in m["sparse_files"]] == [
        f"synthetic{t}_sparse_0.model" for t in range(T)
    ]
    assert m["embedding_table_names"] == [f"table{t}" for t in range(T)]
    assert m["embedding_vecsize_per_table"] == model.dims
    assert m["maxnum_catfeature_query_per_table_per_sample"] == [1] * T
    assert m["default_value_for_each_table"] == [0.0] * T
    assert (m["deployed_device_list"], m["max_batch_size"], m["gpucache"]) == ([0], 1024, True)
    assert (m["gpucacheper"], m["hit_rate_threshold"]) == (0.1, 0.9)
    assert cfg["volatile_db"] == {"type": "parallel_hash_map", "num_partitions": 8}
    assert cfg["persistent_db"] == {
        "type": "rocks_db",
        "path": str(Path(model.directory) / "rocksdb"),
    }


def test_popularity_is_a_permutation_of_the_keys(model):
    for t in range(model.num_tables):
        n = model.vocab_sizes[t]
        ranked = model.popularity_rank_to_key(t, np.arange(n))
        assert sorted(ranked.tolist()) == sorted(model.table(t)[0].tolist())
        assert not np.array_equal(ranked, model.table(t)[0]) or n == 1
    with pytest.raises(ValueError):
        model.popularity_rank_to_key(0, [model.vocab_sizes[0]])


def test_criteo_vocab_sizes():
    assert len(CRITEO_VOCAB_SIZES) == 26 and sum(CRITEO_VOCAB_SIZES) == 33_762_577
    for total in (1_000_000, 33_762_577, 5_000, 26, 40):
        sizes = criteo_vocab_sizes(total)
        assert len(sizes) == 26 and min(sizes) >= 1 and sum(sizes) == total
    assert criteo_vocab_sizes(33_762_577) == CRITEO_VOCAB_SIZES
    assert criteo_vocab_sizes(10) == [1] * 26
    big = criteo_vocab_sizes(1_000_000)
    assert np.argmax(big) == 2 and abs(big[2] / 1_000_000 - 10131227 / 33_762_577) < 1e-4


# -- Zipf -------------------------------------------------------------------------------------


def test_zipf_probabilities():
    p = zipf_probabilities(1000, 1.2)
    assert p.dtype == np.float64 and abs(p.sum() - 1) < 1e-12 and np.all(np.diff(p) < 0)
    assert p[0] / p[9] == pytest.approx(10**1.2)
    np.testing.assert_allclose(zipf_probabilities(7, 0.0), np.full(7, 1 / 7))
    with pytest.raises(ValueError):
        zipf_probabilities(10, -0.5)


def test_zipf_samples_follow_the_probabilities():
    n, alpha, size = 1000, 1.1, 1_000_000
    ranks = zipf_ranks(n, alpha, size, np.random.default_rng(0))
    assert ranks.dtype == np.int64 and ranks.min() >= 0 and ranks.max() < n
    counts = np.bincount(ranks, minlength=n)
    expected = zipf_probabilities(n, alpha) * size
    np.testing.assert_allclose(counts[:20], expected[:20], rtol=0.05)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < n + 6 * np.sqrt(2 * n)  # mean n - 1, sd sqrt(2 (n - 1))
    assert (zipf_ranks(1, 1.0, 10, np.random.default_rng(0)) == 0).all()


def test_oracle_hit_rate_closed_forms():
    assert oracle_top_c_hit_rate(1000, 0.0, 37) == pytest.approx(37 / 1000)
    harmonic = np.cumsum(1 / np.arange(1, 5001))
    assert oracle_top_c_hit_rate(5000, 1.0, 100) == pytest.approx(harmonic[99] / harmonic[-1])
    assert oracle_top_c_hit_rate(50, 1.0, 80) == 1.0
    assert oracle_top_c_hit_rate(50, 1.0, 0) == 0.0


def test_oracle_hit_rate_matches_a_large_sample():
    n, alpha, c = 100_000, 1.0, 1000
    keys = zipf_ranks(n, alpha, 2_000_000, np.random.default_rng(1))
    assert abs(empirical_top_c_hit_rate(keys, c) - oracle_top_c_hit_rate(n, alpha, c)) < 0.01


def test_empirical_top_c_hit_rate():
    keys = np.array([9, 9, 9, -4, -4, 7])
    assert empirical_top_c_hit_rate(keys, 1) == 0.5
    assert empirical_top_c_hit_rate(keys, 2) == pytest.approx(5 / 6)
    assert empirical_top_c_hit_rate(keys, 10) == 1.0
    assert empirical_top_c_hit_rate(np.array([], np.int64), 3) == 0.0


# -- request streams --------------------------------------------------------------------------


def test_request_stream(model):
    stream = RequestStream(model, 1.2, 4096, seed=3)
    batch = stream.next_batch()
    assert batch.shape == (4096, model.num_tables) and batch.dtype == np.int64
    for t in range(model.num_tables):
        assert np.isin(batch[:, t], model.table(t)[0]).all()
    hottest = model.popularity_rank_to_key(0, [0])[0]
    values, counts = np.unique(batch[:, 0], return_counts=True)
    assert values[np.argmax(counts)] == hottest
    same = RequestStream(model, 1.2, 4096, seed=3)
    np.testing.assert_array_equal(next(iter(same)), batch)
    assert not np.array_equal(RequestStream(model, 1.2, 4096, seed=4).next_batch(), batch)
    keys = stream.keys_for_table(3, 100)
    assert keys.shape == (100,) and np.isin(keys, model.table(3)[0]).all()


def test_request_stream_per_table_alpha(model):
    stream = RequestStream(model, [0.0, 1.0, 3.0, 1.0], 20_000, seed=0)
    batch = stream.next_batch()
    top = model.popularity_rank_to_key(2, [0])[0]
    assert (batch[:, 2] == top).mean() == pytest.approx(zipf_probabilities(17, 3.0)[0], abs=0.02)
    with pytest.raises(ValueError):
        RequestStream(model, [1.0], 8)
