"""HugeCTR sparse model files: round trip, chunked reads, bounded memory, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hps_core.errors import ModelFileError
from hps_core.model_io import SparseTable, write_table

I64 = np.iinfo(np.int64)


def table(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    keys = np.concatenate(
        [[I64.min, I64.max, 0, -1], rng.integers(I64.min, I64.max, n - 4, dtype=np.int64)]
    )
    return keys.astype(np.int64), rng.standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize("dim", [1, 16, 128])
def test_round_trip_and_chunks(tmp_path, dim):
    keys, vecs = table(1001, dim)
    write_table(tmp_path / "t", keys, vecs, hot_keys=keys[:3])
    # The HugeCTR layout: raw little-endian int64 keys, row-major float32 vectors.
    np.testing.assert_array_equal(np.fromfile(tmp_path / "t" / "key", "<i8"), keys)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "t" / "emb_vector", "<f4"), vecs.ravel())
    with SparseTable.open(tmp_path / "t", dim) as f:
        assert (f.rows, f.dim, f.nbytes) == (1001, dim, 1001 * (8 + 4 * dim))
        np.testing.assert_array_equal(f.hot_keys, keys[:3])
        k, v = f.read_all()
        np.testing.assert_array_equal(k, keys)
        np.testing.assert_array_equal(v, vecs)
        for step in (1, 7, 1000, 1001, 5000):
            chunks = list(f.iter_chunks(rows_per_chunk=step))
            assert all(len(c[0]) <= step for c in chunks)
            np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), keys)
            np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), vecs)


def test_files_without_meta_infer_dim(tmp_path):
    keys, vecs = table(50, 12)
    write_table(tmp_path / "t", keys, vecs, meta=False)
    assert not (tmp_path / "t" / "meta").exists()
    f = SparseTable.open(tmp_path / "t")
    assert (f.rows, f.dim, f.hot_keys) == (50, 12, None)
    np.testing.assert_array_equal(f.read_all()[1], vecs)


def test_empty_table(tmp_path):
    write_table(tmp_path / "t", np.empty(0, np.int64), np.empty((0, 4), np.float32))
    f = SparseTable.open(tmp_path / "t", 4)
    assert f.rows == 0 and list(f.iter_chunks()) == []


def corrupt(tmp_path, fn):
    keys, vecs = table(100, 8)
    write_table(tmp_path / "t", keys, vecs)
    fn(tmp_path / "t")
    return tmp_path / "t"


@pytest.mark.parametrize(
    "damage,dim,file,words",
    [
        (lambda p: (p / "key").write_bytes((p / "key").read_bytes()[:-3]), 8, "key", "truncated"),
        (
            lambda p: (p / "emb_vector").write_bytes((p / "emb_vector").read_bytes()[:-32]),
            8,
            "emb_vector",
            "truncated",
        ),
        (lambda p: (p / "key").write_bytes((p / "key").read_bytes()[:-16]), 8, "meta", "rows"),
        (lambda p: (p / "meta").unlink(), 6, "emb_vector", "implies dim 8"),
        (lambda p: (p / "emb_vector").unlink(), 8, "emb_vector", "missing"),
        (lambda p: (p / "meta").write_text("{nope"), 8, "meta", "not valid JSON"),
        (
            lambda p: (p / "meta").write_text(json.dumps({"rows": 100, "dim": 9})),
            None,
            "emb_vector",
            "dim 9",
        ),
    ],
)
def test_damaged_files_are_clear_errors_naming_the_file(tmp_path, damage, dim, file, words):
    path = corrupt(tmp_path, damage)
    with pytest.raises(ModelFileError) as e:
        SparseTable.open(path, dim)
    assert str(path / file) in str(e.value) and words in str(e.value)


def test_key_vector_count_mismatch_without_meta(tmp_path):
    keys, vecs = table(100, 8)
    write_table(tmp_path / "t", keys[:90], vecs[:90], meta=False)
    (tmp_path / "t" / "emb_vector").write_bytes(vecs.tobytes())  # 100 rows of vectors, 90 keys
    with pytest.raises(ModelFileError, match="emb_vector.*too long"):
        SparseTable.open(tmp_path / "t", 8)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        SparseTable.open(tmp_path / "nope")


CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from hps_core.model_io import SparseTable

    def vm(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    f = SparseTable.open(sys.argv[1], int(sys.argv[2]))
    before = vm("VmRSS")
    ksum, vsum = 0, 0.0
    for k, v in f.iter_chunks():
        ksum = (ksum + int(k.astype(np.uint64).sum(dtype=np.uint64))) % 2**64
        vsum += float(v.sum(dtype=np.float64))
    print(vm("VmHWM") - before, ksum, repr(vsum))
    """
)


def test_chunked_reading_keeps_memory_near_one_chunk(tmp_path):
    rows, dim = 1_000_000, 64  # 264 MB
    rng = np.random.default_rng(3)
    keys = rng.integers(I64.min, I64.max, rows, dtype=np.int64)
    vecs = rng.standard_normal((rows, dim)).astype(np.float32)
    write_table(tmp_path / "big", keys, vecs)
    ksum = int(keys.astype(np.uint64).sum(dtype=np.uint64))
    table_bytes = keys.nbytes + vecs.nbytes
    del keys
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "big"), str(dim)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    grew, got_ksum, got_vsum = int(out[0]), int(out[1]), float(out[2])
    assert got_ksum == ksum
    expect_vsum = 0.0
    for s in range(0, rows, 100_000):
        expect_vsum += float(vecs[s : s + 100_000].sum(dtype=np.float64))
    assert got_vsum == pytest.approx(expect_vsum, rel=1e-9, abs=1e-6)
    assert grew < 0.25 * table_bytes, (
        f"peak RSS grew {grew / 2**20:.0f} MiB for a {table_bytes / 2**20:.0f} MiB table"
    )
