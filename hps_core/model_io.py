"""HugeCTR sparse model files: one directory per table with ``key``, ``emb_vector`` and optional ``meta``.

``key`` holds int64 keys (native little-endian), ``emb_vector`` float32 rows (row-major, rows x dim).
``meta`` is our optional JSON: ``{"format": "hugectr_sparse", "rows", "dim", "key_dtype",
"hot_keys": [...]}``, hottest keys first, used to pre-fill caches. ``key_dtype`` may also be
``"uint32"`` (4-byte keys, widened to int64 on read). Reading is chunked: each chunk is read
into arrays of its own, so resident memory stays near one chunk however large the table. Plain
reads rather than a memory map: a file cut short while it is read (a training job writing a
new model over it) then gives a short read, a ``ModelFileError``, where a mapped page past the
new end would have killed the process with SIGBUS.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import InvalidInputError, ModelFileError

CHUNK_BYTES = 4 << 20  # rows read per step: small next to a table, large enough to amortise
FORMAT = "hugectr_sparse"
KEY_DTYPES = {"int64": np.dtype("<i8"), "uint32": np.dtype("<u4")}
_I64_MAX = np.iinfo(np.int64).max


def _int_keys(name: str, keys: object) -> np.ndarray:
    """A 1-D integer array as int64 (uint32 widened; uint64 only if it fits)."""
    k = np.asarray(keys)
    if k.size == 0 and k.dtype.kind == "f":
        k = k.astype(np.int64)  # np.asarray([]) is float64
    if k.ndim != 1 or k.dtype.kind not in "iu":
        raise InvalidInputError(name, f"dtype {k.dtype}, shape {k.shape}", "a 1-D integer array")
    if k.dtype == np.uint64 and k.size and int(k.max()) > _I64_MAX:
        raise InvalidInputError(name, f"max {int(k.max())}", "keys that fit int64")
    return k.astype("<i8", copy=False)


_BASE10 = re.compile(r"[+-]?[0-9]{1,20}")  # 20 digits bound int() well below its size limit
KEY_EXPECTED = "a base-10 integer in int64 range"


def parse_key(text: str) -> int | None:
    """``text`` as an int64 key (base-10, sign allowed), or None when it is not one."""
    t = text.strip()
    if not _BASE10.fullmatch(t):
        return None
    k = int(t)
    return k if -_I64_MAX - 1 <= k <= _I64_MAX else None


def read_key_text(path: str | os.PathLike) -> np.ndarray:
    """int64 keys of a text file, one per line (blank lines and ``#`` comments skipped). Any
    other line, a float or a key past int64 included, is a ModelFileError naming its number."""
    p = Path(path)
    if p.is_dir():
        raise ModelFileError(path, "is a directory, expected a file with one key per line")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a BOM (some editors write one) is not a key
    except UnicodeDecodeError as e:
        raise ModelFileError(path, f"not a UTF-8 text file (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot read it ({e.strerror})") from None
    keys = []
    for n, line in enumerate(text.split("\n"), 1):
        t = line.split("#", 1)[0].strip()
        if not t:
            continue
        k = parse_key(t)
        if k is None:
            raise ModelFileError(
                f"{path}, line {n}", f"{t!r}: expected {KEY_EXPECTED}, one per line"
            )
        keys.append(k)
    if not keys:
        raise ModelFileError(path, "holds no keys (expected one key per line)")
    return np.array(keys, dtype=np.int64)


def write_table(
    path: str | os.PathLike,
    keys: np.ndarray,
    vectors: np.ndarray,
    *,
    meta: bool = True,
    hot_keys: np.ndarray | None = None,
) -> None:
    """Write one table as a HugeCTR sparse model directory (int64 keys, float32 rows)."""
    k = _int_keys("keys", keys)
    v = np.asarray(vectors)
    if v.ndim != 2 or len(v) != len(k) or v.shape[1] < 1 or v.dtype.kind not in "fiu":
        raise InvalidInputError("vectors", f"{v.dtype} {v.shape}", f"float32 [{len(k)}, dim >= 1]")
    hot = _int_keys("hot_keys", hot_keys) if hot_keys is not None else None
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    (p / "meta").unlink(missing_ok=True)  # a stale meta would contradict the new files
    k.tofile(p / "key")
    np.ascontiguousarray(v, dtype="<f4").tofile(p / "emb_vector")
    if meta:
        m = {"format": FORMAT, "rows": len(k), "dim": int(v.shape[1]), "key_dtype": "int64"}
        if hot is not None:
            m["hot_keys"] = hot.tolist()
        (p / "meta").write_text(json.dumps(m))


class SparseTable:
    """An open sparse model directory: validated sizes, chunked memory-mapped reads."""

    def __init__(
        self,
        path: Path,
        rows: int,
        dim: int,
        hot_keys: np.ndarray | None,
        key_dtype: np.dtype = KEY_DTYPES["int64"],
    ):
        self.path = path
        self.rows = rows
        self.dim = dim
        self.hot_keys = hot_keys
        self.key_dtype = key_dtype
        self._open: list[io.BufferedReader] = []  # open while a chunked read is under way

    @classmethod
    def open(cls, path: str | os.PathLike, dim: int | None = None) -> SparseTable:
        """Open and validate a table directory; ``dim`` (from the config) must match the files."""
        p = Path(path)
        if not p.is_dir():
            raise ModelFileError(str(p), "sparse model directory not found")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer))):
            raise ModelFileError(str(p), f"dim {dim!r} is not an integer")
        if dim is not None and dim < 1:
            raise ModelFileError(str(p), f"dim {dim} must be at least 1")
        kf, vf, mf = p / "key", p / "emb_vector", p / "meta"
        for f in (kf, vf):
            if not f.is_file():
                what = "not a regular file" if f.exists() or f.is_symlink() else "missing file"
                raise ModelFileError(str(f), f"{what} (expected 'key' and 'emb_vector')")
        meta = _read_meta(mf)
        kdt = KEY_DTYPES[meta.get("key_dtype", "int64")]
        kbytes, vbytes = kf.stat().st_size, vf.stat().st_size
        if kbytes % kdt.itemsize:
            raise ModelFileError(
                str(kf),
                f"{kbytes} bytes is not a multiple of {kdt.itemsize} "
                f"({kdt.itemsize * 8}-bit keys): truncated",
            )
        rows = kbytes // kdt.itemsize
        if meta.get("rows", rows) != rows:
            raise ModelFileError(str(mf), f"says {meta['rows']} rows, but 'key' holds {rows} keys")
        meta_dim = meta.get("dim")
        src = "given"
        if dim is None and meta_dim is not None:
            dim, src = meta_dim, f"from {mf.name}"
        if dim is None:
            if rows == 0 or vbytes % (4 * rows):
                raise ModelFileError(
                    str(vf),
                    f"{vbytes} bytes is not a whole number of float32 rows for {rows} keys "
                    "(truncated, or a key/vector count mismatch); cannot infer dim",
                )
            dim, src = vbytes // (4 * rows), "inferred"
        expect = rows * dim * 4
        if vbytes != expect:
            implied = f"{vbytes / (4 * rows):g}" if rows else "?"
            why = "truncated" if vbytes < expect else "too long"
            raise ModelFileError(
                str(vf),
                f"{vbytes} bytes, expected {expect} for {rows} keys x dim {dim} ({src}) float32 "
                f"({why}; the file implies dim {implied}: a key/vector count or dim mismatch)",
            )
        if meta_dim is not None and meta_dim != dim:
            raise ModelFileError(str(mf), f"says dim {meta_dim}, but the files hold dim {dim}")
        hot = None
        if meta.get("hot_keys") is not None:
            try:
                hot = _int_keys("hot_keys", meta["hot_keys"])
            except (InvalidInputError, OverflowError, ValueError, TypeError) as e:
                raise ModelFileError(str(mf), f"'hot_keys' must be a list of int64 ({e})") from None
        return cls(p, rows, int(dim), hot, kdt)

    @property
    def nbytes(self) -> int:
        """Bytes of keys plus vectors."""
        return self.rows * (self.key_dtype.itemsize + 4 * self.dim)

    def iter_chunks(
        self, rows_per_chunk: int | None = None, max_bytes: int = CHUNK_BYTES
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (keys int64 [n], vectors float32 [n, dim]) copies, chunk by chunk."""
        row_bytes, ks = 4 * self.dim, self.key_dtype.itemsize
        if rows_per_chunk is not None and rows_per_chunk < 1:
            raise InvalidInputError("rows_per_chunk", rows_per_chunk, "a positive integer")
        step = rows_per_chunk or max(1, max_bytes // (ks + row_bytes))
        if self.rows == 0:
            return
        kf = self._file(self.path / "key", self.rows * ks)
        vf = self._file(self.path / "emb_vector", self.rows * row_bytes)
        try:
            for s in range(0, self.rows, step):
                n = min(step, self.rows - s)
                keys = _read(kf, self.key_dtype, n).astype(np.int64, copy=False)
                vecs = _read(vf, np.dtype("<f4"), n * self.dim).astype(np.float32, copy=False)
                yield keys, vecs.reshape(n, self.dim)
        finally:
            for f in (kf, vf):
                f.close()
                if f in self._open:
                    self._open.remove(f)

    def iter_keys(
        self, start: int = 0, max_bytes: int = CHUNK_BYTES
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (row number of the first, keys int64) chunk by chunk from row ``start``, read
        from the key file alone."""
        ks = self.key_dtype.itemsize
        step = max(1, max_bytes // ks)
        if start >= self.rows:
            return
        kf = self._file(self.path / "key", self.rows * ks)
        try:
            kf.seek(start * ks)
            for s in range(start, self.rows, step):
                n = min(step, self.rows - s)
                yield s, _read(kf, self.key_dtype, n).astype(np.int64, copy=False)
        finally:
            kf.close()
            if kf in self._open:
                self._open.remove(kf)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """The vectors (float32 [len(rows), dim]) of the given row numbers, read one by one:
        for a few rows out of a large file."""
        row_bytes = 4 * self.dim
        out = np.empty((len(rows), self.dim), np.float32)
        path = self.path / "emb_vector"
        fd = os.open(path, os.O_RDONLY)
        try:
            for i, r in enumerate(np.asarray(rows, np.int64).tolist()):
                if not 0 <= r < self.rows:
                    raise InvalidInputError("rows", r, f"row numbers in [0, {self.rows})")
                b = os.pread(fd, row_bytes, r * row_bytes)
                if len(b) != row_bytes:
                    raise ModelFileError(str(path), "shrank since the table was opened")
                out[i] = np.frombuffer(b, "<f4")
        finally:
            os.close(fd)
        return out

    def _file(self, path: Path, nbytes: int) -> io.BufferedReader:
        f = open(path, "rb")  # noqa: SIM115 - closed by iter_chunks or close()
        if os.fstat(f.fileno()).st_size < nbytes:
            f.close()
            raise ModelFileError(str(path), "shrank since the table was opened")
        self._open.append(f)
        return f

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole table in memory (small tables, tests)."""
        keys = np.fromfile(self.path / "key", dtype=self.key_dtype, count=self.rows)
        vecs = np.fromfile(self.path / "emb_vector", dtype="<f4", count=self.rows * self.dim)
        if len(keys) != self.rows or len(vecs) != self.rows * self.dim:
            raise ModelFileError(str(self.path), "files shrank since the table was opened")
        return keys.astype(np.int64), vecs.astype(np.float32).reshape(self.rows, self.dim)

    def close(self) -> None:
        """Close the files of an unfinished chunked read (nothing else stays open)."""
        for f in self._open:
            f.close()
        self._open.clear()

    def __enter__(self) -> SparseTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SparseTable({str(self.path)!r}, rows={self.rows}, dim={self.dim})"


def _read_meta(path: Path) -> dict:
    """The validated ``meta`` JSON, or {} when the file is absent."""
    if not path.is_file():
        if path.exists():  # a directory, a FIFO: not silently without its hot keys
            raise ModelFileError(str(path), "not a regular file")
        return {}
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: JSON, or a 5000-digit number
        raise ModelFileError(str(path), f"not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ModelFileError(str(path), "expected a JSON object")
    if meta.get("format", FORMAT) != FORMAT:
        raise ModelFileError(str(path), f"format {meta['format']!r}, expected '{FORMAT}'")
    kdt = meta.get("key_dtype", "int64")
    if not isinstance(kdt, str) or kdt not in KEY_DTYPES:
        raise ModelFileError(
            str(path), f"key_dtype {meta['key_dtype']!r}, expected one of {sorted(KEY_DTYPES)}"
        )
    for field, least in (("rows", 0), ("dim", 1)):
        v = meta.get(field)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise ModelFileError(str(path), f"{field} {v!r}, expected an integer >= {least}")
    return meta


def _read(f: io.BufferedReader, dtype: np.dtype, count: int) -> np.ndarray:
    """The next ``count`` elements of ``f``; a ModelFileError where the file ends first."""
    a = np.empty(count, dtype)
    buf = memoryview(a).cast("B")
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            raise ModelFileError(
                f.name, f"ends at byte {f.tell()}: cut short while it was read (being rewritten?)"
            )
        got += n
    return a
