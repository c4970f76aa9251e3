"""The numpy reference of a lookup: a table file's row for its keys, the default otherwise;
and what a VDB returns for a row it stores in a 16-bit dtype."""

import numpy as np

from hps_core.cache.reference import from_bf16_bits, to_bf16_bits


def stored(v: np.ndarray, dtype: str) -> np.ndarray:
    """What a VDB returns for vectors v: float32, cast through the storage dtype (bf16: the L1
    reference's round-to-nearest-even; int8: symmetric per-row quantisation)."""
    v = np.asarray(v, np.float32)
    if dtype == "bfloat16":
        return from_bf16_bits(to_bf16_bits(v))
    if dtype == "int8":  # per row: q = rint(x / s), s = max |x| / 127, back as float32(q) * s
        s = np.abs(v).max(axis=1, keepdims=True) / np.float32(127)
        q = np.rint(np.divide(v, s, out=np.zeros_like(v), where=s > 0))
        return np.clip(q, -127, 127).astype(np.float32) * s
    return v.astype(dtype).astype(np.float32)


def file_rows(keys: np.ndarray, vecs: np.ndarray, query: np.ndarray, default: float) -> np.ndarray:
    """Rows of ``query`` in the table (keys, vecs); ``default`` for keys it does not hold."""
    order = np.argsort(keys)
    sk = keys[order]
    pos = np.clip(np.searchsorted(sk, query), 0, len(sk) - 1)
    found = sk[pos] == query
    out = np.full((len(query), vecs.shape[1]), default, dtype=np.float32)
    out[found] = vecs[order[pos[found]]]
    return out
