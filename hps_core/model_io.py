"""HugeCTR sparse model files: one directory per table with ``key``, ``emb_vector`` and optional ``meta``.

``key`` holds int64 keys (native little-endian), ``emb_vector`` float32 rows (row-major, rows x dim).
``meta`` is our optional JSON: ``{"format": "hugectr_sparse", "rows", "dim", "key_dtype",
"hot_keys": [...]}``, hottest keys first, used to pre-fill caches. Reading is memory-mapped and
chunked: each chunk's pages are released after use, so resident memory stays near one chunk
however large the table.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import InvalidInputError, ModelFileError

CHUNK_BYTES = 8 * 1024 * 1024


def write_table(
    path: str | os.PathLike,
    keys: np.ndarray,
    vectors: np.ndarray,
    *,
    meta: bool = True,
    hot_keys: np.ndarray | None = None,
) -> None:
    """Write one table as a HugeCTR sparse model directory."""
    k = np.asarray(keys)
    if k.dtype.kind not in "iu" or k.ndim != 1:
        raise InvalidInputError("keys", f"dtype {k.dtype}, shape {k.shape}", "a 1-D integer array")
    v = np.asarray(vectors)
    if v.ndim != 2 or len(v) != len(k):
        raise InvalidInputError("vectors", f"shape {v.shape}", f"[{len(k)}, dim]")
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    k.astype("<i8").tofile(p / "key")
    v.astype("<f4").tofile(p / "emb_vector")
    if meta:
        m = {
            "format": "hugectr_sparse",
            "rows": len(k),
            "dim": int(v.shape[1]),
            "key_dtype": "int64",
        }
        if hot_keys is not None:
            m["hot_keys"] = [int(x) for x in np.asarray(hot_keys)]
        (p / "meta").write_text(json.dumps(m))


class SparseTable:
    """An open sparse model directory: validated sizes, chunked memory-mapped reads."""

    def __init__(self, path: Path, rows: int, dim: int, hot_keys: np.ndarray | None):
        self.path = path
        self.rows = rows
        self.dim = dim
        self.hot_keys = hot_keys
        self._files: list = []

    @classmethod
    def open(cls, path: str | os.PathLike, dim: int | None = None) -> SparseTable:
        """Open and validate a table directory; ``dim`` (from the config) must match the files."""
        p = Path(path)
        if not p.is_dir():
            raise ModelFileError(str(p), "sparse model directory not found")
        kf, vf = p / "key", p / "emb_vector"
        for f in (kf, vf):
            if not f.is_file():
                raise ModelFileError(str(f), "missing file (expected 'key' and 'emb_vector')")
        kbytes, vbytes = kf.stat().st_size, vf.stat().st_size
        if kbytes % 8:
            raise ModelFileError(
                str(kf), f"{kbytes} bytes is not a multiple of 8 (int64 keys): truncated"
            )
        rows = kbytes // 8
        meta = cls._read_meta(p / "meta")
        if meta is not None and meta.get("rows", rows) != rows:
            raise ModelFileError(
                str(p / "meta"), f"says {meta['rows']} rows, but 'key' holds {rows}"
            )
        meta_dim = meta.get("dim") if meta is not None else None
        if dim is None:
            dim = meta_dim
        if dim is None:
            if rows == 0 or vbytes % (4 * rows):
                raise ModelFileError(
                    str(vf), f"{vbytes} bytes is not a whole number of float32 rows for {rows} keys"
                )
            dim = vbytes // (4 * rows)
        expect = rows * dim * 4
        if vbytes != expect:
            implied = f"{vbytes / (4 * rows):g}" if rows else "?"
            why = "truncated" if vbytes < expect else "too long"
            raise ModelFileError(
                str(vf),
                f"{vbytes} bytes, expected {expect} for {rows} keys x dim {dim} float32 "
                f"({why}; the file implies dim {implied}: a key/vector count or dim mismatch)",
            )
        if meta_dim is not None and meta_dim != dim:
            raise ModelFileError(
                str(p / "meta"), f"says dim {meta_dim}, but the files hold dim {dim}"
            )
        hot = None
        if meta is not None and meta.get("hot_keys") is not None:
            hot = np.asarray(meta["hot_keys"], dtype=np.int64)
        return cls(p, rows, int(dim), hot)

    @staticmethod
    def _read_meta(path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelFileError(str(path), f"not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise ModelFileError(str(path), "expected a JSON object")
        return meta

    @property
    def nbytes(self) -> int:
        """Bytes of keys plus vectors."""
        return self.rows * (8 + 4 * self.dim)

    def iter_chunks(
        self, rows_per_chunk: int | None = None, max_bytes: int = CHUNK_BYTES
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (keys int64, vectors float32 [n, dim]) copies, chunk by chunk."""
        if self.rows == 0:
            return
        step = rows_per_chunk or max(1, max_bytes // (8 + 4 * self.dim))
        with open(self.path / "key", "rb") as kf, open(self.path / "emb_vector", "rb") as vf:
            km = mmap.mmap(kf.fileno(), 0, access=mmap.ACCESS_READ)
            vm = mmap.mmap(vf.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                keys = np.frombuffer(km, dtype="<i8")
                vecs = np.frombuffer(vm, dtype="<f4").reshape(self.rows, self.dim)
                row_bytes = 4 * self.dim
                for s in range(0, self.rows, step):
                    e = min(s + step, self.rows)
                    yield keys[s:e].astype(np.int64), vecs[s:e].astype(np.float32)
                    _release(km, s * 8, e * 8)
                    _release(vm, s * row_bytes, e * row_bytes)
                del keys, vecs
            finally:
                km.close()
                vm.close()

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole table in memory (small tables, tests)."""
        keys = np.fromfile(self.path / "key", dtype="<i8").astype(np.int64)
        vecs = np.fromfile(self.path / "emb_vector", dtype="<f4").reshape(self.rows, self.dim)
        return keys, vecs.astype(np.float32)

    def close(self) -> None:
        """Nothing stays open between reads; kept for symmetry with the tiers."""

    def __enter__(self) -> SparseTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release(m: mmap.mmap, start: int, end: int) -> None:
    """Drop the pages of [start, end) from this process's resident set."""
    page = mmap.PAGESIZE
    s = start - start % page
    if end > s and hasattr(m, "madvise"):
        m.madvise(mmap.MADV_DONTNEED, s, end - s)
