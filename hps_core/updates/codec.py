"""HPS's Kafka message payload, reused for Redis Streams.

One message carries rows of one table (the Kafka topic was the table's name; here it is the
stream entry's ``table`` field). Little-endian layout, as HugeCTR's ``KafkaMessageSink``:

    uint32 magic   = b"HCTR" (0x52544348)
    uint32 value_size            bytes per row: dim * 4 for fp32 (HPS), dim * 2 for fp16 (ours)
    { int64 key; byte value[value_size] } * n

A message with no pairs is a beacon (HPS sends one to check the connection) and carries no rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAGIC = b"HCTR"
HEADER = 8
DEFAULT_MAX_BYTES = 1 << 20  # per message; Redis takes up to 512 MB, consumers like it small


class MalformedMessage(ValueError):
    """A payload that cannot be applied; ``reason`` goes to the dead-letter stream."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass
class Rows:
    """The decoded rows of one message."""

    keys: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float32 [n, dim]


def encode(
    keys: np.ndarray,
    vectors: np.ndarray,
    dtype: str = "float32",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[bytes]:
    """HCTR payloads for rows ``keys -> vectors`` (float32 [n, dim]), split to <= max_bytes each."""
    from ..errors import InvalidInputError
    from ..session import as_keys  # integer keys only: float keys were truncated (3.7 -> 3)

    k = np.ascontiguousarray(as_keys(keys), dtype="<i8")
    v = np.asarray(vectors)
    if v.ndim != 2 or len(v) != len(k):
        raise InvalidInputError("vectors", f"shape {v.shape}", f"[{len(k)}, dim]")
    if dtype not in ("float32", "float16"):
        raise InvalidInputError("dtype", dtype, "'float32' or 'float16'")
    if dtype == "float16" and v.size and np.nanmax(np.abs(v)) > np.finfo(np.float16).max:
        raise InvalidInputError("vectors", f"max |x| {np.nanmax(np.abs(v)):g}",
                                "values within float16's range (65504) for dtype float16")  # fmt: skip
    row = 8 + v.shape[1] * (4 if dtype == "float32" else 2)
    if max_bytes < HEADER + row:
        raise InvalidInputError(
            "max_bytes", max_bytes, f"at least one row's message ({HEADER + row})"
        )
    vb = np.ascontiguousarray(v, dtype="<f4" if dtype == "float32" else "<f2")
    vb = vb.view(np.uint8).reshape(len(k), v.shape[1] * vb.itemsize)
    size = vb.shape[1]
    rec = np.empty((len(k), 8 + size), np.uint8)
    rec[:, :8] = k.view(np.uint8).reshape(-1, 8)
    rec[:, 8:] = vb
    head = MAGIC + np.uint32(size).astype("<u4").tobytes()
    per = max(1, (max_bytes - HEADER) // (8 + size))
    if len(k) == 0:
        return [head]
    return [head + rec[s : s + per].tobytes() for s in range(0, len(k), per)]


def decode(payload: bytes, dim: int, dtype: str = "float32") -> Rows:
    """Rows of a payload for a table of width ``dim``; raises MalformedMessage with the reason.
    ``dtype``: what the entry says its rows are ("float16" only where it says so: fp32 rows of
    half the table's width have the same value size as fp16 rows of its width)."""
    if len(payload) < HEADER:
        raise MalformedMessage(f"payload of {len(payload)} bytes is shorter than the 8-byte header")
    if payload[:4] != MAGIC:
        raise MalformedMessage(f"bad magic {payload[:4]!r} (expected {MAGIC!r})")
    size = int(np.frombuffer(payload, "<u4", 1, 4)[0])
    if dtype not in ("float32", "float16"):
        raise MalformedMessage(f"dtype {dtype!r}: expected 'float32' or 'float16'")
    fp16 = dtype == "float16"
    if size != (2 if fp16 else 4) * dim:
        raise MalformedMessage(
            f"value size {size} does not fit the table's dim {dim} "
            f"(expected {(2 if fp16 else 4) * dim} for {dtype} rows"
            + ("; fp16 rows need the entry field dtype=float16)" if size == 2 * dim else ")")
        )
    dt = np.dtype("<f2" if fp16 else "<f4")
    body = len(payload) - HEADER
    if body % (8 + size):
        raise MalformedMessage(
            f"body of {body} bytes is not a whole number of {8 + size}-byte key/value pairs"
        )
    n = body // (8 + size)
    rec = np.frombuffer(payload, np.uint8, offset=HEADER).reshape(n, 8 + size)
    keys = rec[:, :8].copy().view("<i8").ravel().astype(np.int64)
    vectors = rec[:, 8:].copy().view(dt).reshape(n, dim).astype(np.float32)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise MalformedMessage(
            f"{int(bad.sum())} of {n} rows hold NaN or infinite values (first key {keys[bad][0]})"
        )
    return Rows(keys, vectors)
