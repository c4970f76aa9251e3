"""L1 admission: the count-min sketch against exact counts, and the session's use of it."""

from __future__ import annotations

import numpy as np
import pytest

from hps_core import ConfigError, ParameterServer
from hps_core.cache.admission import DEPTH, Admission, FrequencySketch, sketch_bytes
from hps_core.config import load_config


def test_sketch_never_undercounts_and_is_exact_without_collisions():
    rng = np.random.default_rng(0)
    keys = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 200, dtype=np.int64)
    reps = rng.integers(1, 9, len(keys))
    stream = np.repeat(keys, reps)
    rng.shuffle(stream)
    s = FrequencySketch(1 << 16, sample=10**9)  # 200 keys in 65536 counters: no collisions
    for part in np.array_split(stream, 7):
        s.record(part)
    np.testing.assert_array_equal(s.estimate(keys), reps)
    # a crowded sketch may overcount, never undercount
    small = FrequencySketch(1024, sample=10**9)
    many = rng.integers(0, 10**12, 20000)
    small.record(many)
    small.record(many[:500])
    truth = 1 + (np.arange(20000) < 500)
    assert (small.estimate(many).astype(int) >= np.minimum(truth, 255)).all()


def test_sketch_saturates_at_255_and_halves_after_its_sample():
    s = FrequencySketch(1024, sample=300)
    k = np.array([42], np.int64)
    s.record(np.repeat(k, 299))
    assert s.estimate(k)[0] == 255  # saturated
    s.record(k)  # the 300th request: every counter halves
    assert s.estimate(k)[0] == 127
    assert s.recorded == 150
    assert s.memory_bytes() == DEPTH * 1024 == sketch_bytes(1000)


def test_admission_lets_in_keys_seen_min_count_times():
    a = Admission(1000, 2)
    once, twice = np.array([1, 2, 3]), np.array([7, 8])
    a.record(np.concatenate([once, twice, twice]))
    np.testing.assert_array_equal(a.admit(np.array([1, 7, 2, 8, 99])), [0, 1, 0, 1, 0])
    everyone = Admission(1000, 1)
    assert everyone.sketch is None and everyone.admit(np.array([5, 6])).all()
    with pytest.raises(ConfigError, match="cache_admission_min_count"):
        Admission(1000, 0)


def _config(tmp_path, min_count):
    from hps_core.model_io import write_table

    keys = np.arange(-500, 500, dtype=np.int64) * 7919
    vecs = np.random.default_rng(1).standard_normal((len(keys), 4)).astype(np.float32)
    write_table(tmp_path / "t_sparse_0.model", keys, vecs)
    cfg = {
        "supportlonglong": True,
        "volatile_db": {"type": "parallel_hash_map", "num_partitions": 2},
        "persistent_db": {"type": "disabled"},
        "models": [
            {
                "model": "m",
                "sparse_files": [str(tmp_path / "t_sparse_0.model")],
                "embedding_vecsize_per_table": [4],
                "maxnum_catfeature_query_per_table_per_sample": [1],
                "gpucacheper": 0.5,
                "hit_rate_threshold": 1.0,  # fill L1 before returning: deterministic for the test
                "cache_admission_min_count": min_count,
            }
        ],
    }
    return cfg, keys, vecs


@pytest.mark.parametrize("min_count", [1, 2])
def test_session_caches_a_miss_only_once_admitted(tmp_path, min_count):
    cfg, keys, vecs = _config(tmp_path, min_count)
    with ParameterServer(cfg) as ps:
        s = ps.session("m")
        t = s.tables[0]
        assert (t.admission is None) == (min_count == 1)
        q = keys[:50]
        for n in range(1, 4):
            got = s.lookup(q, 0)
            np.testing.assert_array_equal(got, vecs[:50])  # the answer never depends on it
            cached = t.cache.contains(q)
            assert cached.all() == (n >= min_count), (n, cached.sum())
            assert cached.any() == (n >= min_count)


def test_config_names_a_bad_admission_count(tmp_path):
    for bad in (0, 256):
        cfg, _, _ = _config(tmp_path, bad)
        with pytest.raises(ConfigError, match=r"models\[0\]\.cache_admission_min_count"):
            load_config(cfg)
