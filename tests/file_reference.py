"""The numpy reference of a lookup: a table file's row for its keys, the default otherwise."""

import numpy as np


def file_rows(keys: np.ndarray, vecs: np.ndarray, query: np.ndarray, default: float) -> np.ndarray:
    """Rows of ``query`` in the table (keys, vecs); ``default`` for keys it does not hold."""
    order = np.argsort(keys)
    sk = keys[order]
    pos = np.clip(np.searchsorted(sk, query), 0, len(sk) - 1)
    found = sk[pos] == query
    out = np.full((len(query), vecs.shape[1]), default, dtype=np.float32)
    out[found] = vecs[order[pos[found]]]
    return out
