"""model_io: HugeCTR sparse model directories round trip, read in chunks with bounded memory,
and every damaged file is a ModelFileError naming that file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hps_core.errors import InvalidInputError, ModelFileError
from hps_core.model_io import SparseTable, write_table

I64 = np.iinfo(np.int64)


def table(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    extremes = np.array([I64.min, I64.max, 0, -1, I64.min + 1], np.int64)[:n]
    keys = np.concatenate([extremes, rng.integers(I64.min, I64.max, n - len(extremes))])
    return keys.astype(np.int64), rng.standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize("dim", [1, 128])
@pytest.mark.parametrize("meta", [True, False])
def test_round_trip_with_extreme_keys(tmp_path, dim, meta):
    keys, vecs = table(777, dim)
    write_table(tmp_path / "t", keys, vecs, meta=meta, hot_keys=keys[:5] if meta else None)
    # The on-disk layout is HugeCTR's: raw little-endian int64 keys, row-major float32 rows.
    np.testing.assert_array_equal(np.fromfile(tmp_path / "t" / "key", "<i8"), keys)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "t" / "emb_vector", "<f4"), vecs.ravel())
    assert (tmp_path / "t" / "meta").exists() == meta
    with SparseTable.open(tmp_path / "t", None if meta else dim) as f:
        assert (f.rows, f.dim, f.nbytes) == (777, dim, 777 * (8 + 4 * dim))
        assert f.path == tmp_path / "t"
        if meta:
            np.testing.assert_array_equal(f.hot_keys, keys[:5])
            assert f.hot_keys.dtype == np.int64
        else:
            assert f.hot_keys is None
        k, v = f.read_all()
        assert (k.dtype, v.dtype, v.shape) == (np.int64, np.float32, (777, dim))
        np.testing.assert_array_equal(k, keys)
        np.testing.assert_array_equal(v, vecs)


def test_meta_fields_and_dim_inference(tmp_path):
    keys, vecs = table(50, 12)
    write_table(tmp_path / "t", keys, vecs, hot_keys=keys[:2])
    meta = json.loads((tmp_path / "t" / "meta").read_text())
    assert meta == {
        "format": "hugectr_sparse",
        "rows": 50,
        "dim": 12,
        "key_dtype": "int64",
        "hot_keys": keys[:2].tolist(),
    }
    # Rewriting without meta removes the stale one; the dim is then inferred from the sizes.
    write_table(tmp_path / "t", keys[:10], vecs[:10], meta=False)
    f = SparseTable.open(tmp_path / "t")
    assert (f.rows, f.dim, f.hot_keys) == (10, 12, None)


def test_uint32_keys_are_widened(tmp_path):
    keys = np.array([0, 1, 2**32 - 1], np.uint32)
    vecs = np.arange(6, dtype=np.float32).reshape(3, 2)
    write_table(tmp_path / "w", keys, vecs)
    np.testing.assert_array_equal(SparseTable.open(tmp_path / "w").read_all()[0], [0, 1, 2**32 - 1])
    # A file of 4-byte keys declared as such in meta reads as int64 too.
    (tmp_path / "w" / "key").write_bytes(keys.astype("<u4").tobytes())
    meta = {"format": "hugectr_sparse", "rows": 3, "dim": 2, "key_dtype": "uint32"}
    (tmp_path / "w" / "meta").write_text(json.dumps(meta))
    with SparseTable.open(tmp_path / "w", 2) as f:
        assert f.nbytes == 3 * (4 + 8)
        (k, v), *rest = list(f.iter_chunks(rows_per_chunk=5))
        assert not rest and k.dtype == np.int64
        np.testing.assert_array_equal(k, [0, 1, 2**32 - 1])
        np.testing.assert_array_equal(v, vecs)


@pytest.mark.parametrize("dim", [1, 64])
def test_chunks_equal_read_all(tmp_path, dim):
    keys, vecs = table(1000, dim, seed=dim)
    write_table(tmp_path / "t", keys, vecs)
    f = SparseTable.open(tmp_path / "t", dim)
    all_k, all_v = f.read_all()
    for step in (1, 3, 333, 999, 1000, 4096):  # 3 and 333 do not divide 1000
        chunks = list(f.iter_chunks(rows_per_chunk=step))
        assert [len(k) for k, _ in chunks] == [min(step, 1000 - s) for s in range(0, 1000, step)]
        np.testing.assert_array_equal(np.concatenate([k for k, _ in chunks]), all_k)
        np.testing.assert_array_equal(np.concatenate([v for _, v in chunks]), all_v)
    # max_bytes bounds the chunk: 8 + 4 * dim bytes per row.
    row = 8 + 4 * dim
    sizes = [len(k) for k, _ in f.iter_chunks(max_bytes=100 * row + row // 2)]
    assert sizes == [100] * 10
    # Chunks are copies, not views of the map, and an abandoned read leaves nothing open.
    it = f.iter_chunks(rows_per_chunk=10)
    k, v = next(it)
    assert k.flags.writeable and v.flags.writeable  # views of the read-only map would not be
    it.close()
    k[:] = 0
    np.testing.assert_array_equal(f.read_all()[0], all_k)
    f.close()


def test_empty_table(tmp_path):
    write_table(tmp_path / "t", np.empty(0, np.int64), np.empty((0, 4), np.float32))
    f = SparseTable.open(tmp_path / "t")  # dim comes from meta
    assert (f.rows, f.dim) == (0, 4) and list(f.iter_chunks()) == []


def test_write_table_validates_its_input(tmp_path):
    keys, vecs = table(10, 4)
    with pytest.raises(InvalidInputError, match="vectors"):
        write_table(tmp_path / "t", keys, vecs[:9])
    with pytest.raises(InvalidInputError, match="keys"):
        write_table(tmp_path / "t", keys.astype(np.float64), vecs)
    with pytest.raises(InvalidInputError, match="keys"):
        write_table(tmp_path / "t", np.array([2**64 - 1], np.uint64), vecs[:1])
    with pytest.raises(InvalidInputError, match="vectors"):
        write_table(tmp_path / "t", keys, vecs.ravel())


def damaged(tmp_path, damage, rows=100, dim=8):
    keys, vecs = table(rows, dim)
    p = tmp_path / "t"
    write_table(p, keys, vecs)
    damage(p)
    return p


def chop(name, nbytes):
    return lambda p: (p / name).write_bytes((p / name).read_bytes()[:-nbytes])


CASES = {
    "key truncated mid-key": (chop("key", 3), 8, "key", ["truncated", "multiple of 8"]),
    "emb_vector truncated": (
        chop("emb_vector", 32),
        8,
        "emb_vector",
        ["truncated", "3168 bytes, expected 3200", "implies dim 7.92"],
    ),
    "fewer keys than meta rows": (chop("key", 16), 8, "meta", ["says 100 rows", "holds 98 keys"]),
    "key/vector count mismatch": (
        lambda p: ((p / "meta").unlink(), chop("key", 80)(p)),
        8,
        "emb_vector",
        ["too long", "90 keys"],
    ),
    "count mismatch, dim inferred": (
        lambda p: ((p / "meta").unlink(), chop("key", 80)(p)),
        None,
        "emb_vector",
        ["not a whole number", "90 keys"],
    ),
    "wrong dim given": (lambda p: (p / "meta").unlink(), 6, "emb_vector", ["implies dim 8"]),
    "wrong dim given, with meta": (lambda p: None, 16, "emb_vector", ["expected 6400"]),
    "missing key": (lambda p: (p / "key").unlink(), 8, "key", ["missing"]),
    "missing emb_vector": (lambda p: (p / "emb_vector").unlink(), 8, "emb_vector", ["missing"]),
    "meta not JSON": (lambda p: (p / "meta").write_text("{nope"), 8, "meta", ["not valid JSON"]),
    "meta not an object": (lambda p: (p / "meta").write_text("[1]"), 8, "meta", ["JSON object"]),
    "meta dim disagrees": (
        lambda p: (p / "meta").write_text(json.dumps({"rows": 100, "dim": 9})),
        None,
        "emb_vector",
        ["dim 9", "implies dim 8"],
    ),
    "meta dim disagrees, dim given": (
        lambda p: (p / "meta").write_text(json.dumps({"rows": 100, "dim": 9})),
        8,
        "meta",
        ["says dim 9"],
    ),
    "meta rows not an integer": (
        lambda p: (p / "meta").write_text(json.dumps({"rows": "100"})),
        8,
        "meta",
        ["rows '100'"],
    ),
    "meta format": (
        lambda p: (p / "meta").write_text(json.dumps({"format": "tf_saved_model"})),
        8,
        "meta",
        ["format"],
    ),
    "meta hot_keys": (
        lambda p: (p / "meta").write_text(json.dumps({"hot_keys": [1, "x"]})),
        8,
        "meta",
        ["hot_keys"],
    ),
    "meta key_dtype a list": (  # was a TypeError (unhashable) from deep inside
        lambda p: (p / "meta").write_text(json.dumps({"key_dtype": ["int64"]})),
        8,
        "meta",
        ["key_dtype ['int64']"],
    ),
    "meta number of 5000 digits": (  # past Python's int-from-text limit: was a ValueError
        lambda p: (p / "meta").write_text('{"rows": 1' + "0" * 5000 + "}"),
        8,
        "meta",
        ["not valid JSON"],
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_damaged_files_are_errors_naming_the_file(tmp_path, case):
    damage, dim, file, words = CASES[case]
    path = damaged(tmp_path, damage)
    with pytest.raises(ModelFileError) as e:
        SparseTable.open(path, dim)
    assert e.value.path == str(path / file)
    assert str(path / file) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelFileError) as e:
        SparseTable.open(tmp_path / "nope", 8)
    assert str(tmp_path / "nope") in str(e.value) and "not found" in str(e.value)


CHILD = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from hps_core import model_io

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    f = model_io.SparseTable.open(sys.argv[1], int(sys.argv[2]))
    chunks = f.iter_chunks() if sys.argv[3] == "chunks" else (f.read_all() for _ in "1")
    try:  # reset the peak (VmHWM) to the current RSS, so the peak below is this loop's
        open("/proc/self/clear_refs", "w").write("5")
        peak = lambda: status("VmHWM")
    except OSError:
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = status("VmRSS")
    ksum = vsum = np.uint64(0)
    for k, v in chunks:
        ksum += k.view(np.uint64).sum(dtype=np.uint64)
        vsum += v.view(np.uint32).sum(dtype=np.uint64)
    print(peak() - before, int(ksum), int(vsum))
    """
)


def test_chunked_reading_keeps_resident_memory_near_one_chunk(tmp_path):
    rows, dim = 1_500_000, 64  # 396 MB on disk
    rng = np.random.default_rng(3)
    keys = rng.integers(I64.min, I64.max, rows, dtype=np.int64)
    vecs = rng.random((rows, dim), dtype=np.float32)
    path = tmp_path / "big"
    write_table(path, keys, vecs)
    table_bytes = keys.nbytes + vecs.nbytes
    # Exact, order-independent checksums (wrapping uint64 sums of the raw bits).
    ref = (
        int(keys.view(np.uint64).sum(dtype=np.uint64)),
        int(vecs.view(np.uint32).sum(dtype=np.uint64)),
    )
    del keys, vecs
    try:
        grew = {}
        for mode in ("chunks", "whole"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), str(dim), mode],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            grew[mode] = int(out[0])
            assert (int(out[1]), int(out[2])) == ref
    finally:
        for name in ("key", "emb_vector", "meta"):
            (path / name).unlink()
    print(
        {m: f"{g / 2**20:.0f} MiB" for m, g in grew.items()}, f"table {table_bytes / 2**20:.0f} MiB"
    )
    assert grew["chunks"] < 0.25 * table_bytes, (
        f"peak RSS grew {grew['chunks'] / 2**20:.0f} MiB for a {table_bytes / 2**20:.0f} MiB table"
    )
    # The measurement can see the difference: the whole table read at once.
    assert grew["whole"] > 0.5 * table_bytes


def test_a_file_cut_short_while_it_is_read_is_an_error_not_a_crash(tmp_path):
    """A training job writing a new model over the files truncates them first; a memory map
    of the old length then faulted (SIGBUS) on the first page past the new end."""
    rng = np.random.default_rng(8)
    keys = rng.integers(I64.min, I64.max, 50_000, dtype=np.int64)
    vecs = rng.random((50_000, 16), dtype=np.float32)
    write_table(tmp_path / "t", keys, vecs)
    f = SparseTable.open(tmp_path / "t", 16)
    it = f.iter_chunks(rows_per_chunk=10_000)
    k0, v0 = next(it)
    np.testing.assert_array_equal(k0, keys[:10_000])
    np.testing.assert_array_equal(v0, vecs[:10_000])
    os.truncate(tmp_path / "t" / "emb_vector", 25_000 * 16 * 4 + 100)  # mid-row, mid-chunk
    k1, v1 = next(it)  # the rows before the cut are whole
    np.testing.assert_array_equal(v1, vecs[10_000:20_000])
    with pytest.raises(ModelFileError) as e:
        next(it)
    assert e.value.path == str(tmp_path / "t" / "emb_vector") and "cut short" in str(e.value)
    assert f._open == []  # both files closed
    with pytest.raises(ModelFileError, match="shrank"):  # a new read sees the new length
        next(f.iter_chunks())
