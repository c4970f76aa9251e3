"""The lookup's key dedupe against numpy's unique."""

from __future__ import annotations

import numpy as np
import pytest

from hps_core.hash_kernels import dedupe

I64 = np.iinfo(np.int64)


@pytest.mark.parametrize("n", [0, 1, 2, 15, 16, 17, 1000, 70000])
def test_dedupe_matches_unique(n):
    rng = np.random.default_rng(n)
    pool = np.concatenate([[I64.min, I64.max, 0, -1], rng.integers(I64.min, I64.max, 50)])
    keys = rng.choice(pool, n) if n < 1000 else rng.integers(-(n // 3), n // 3, n)
    uniq, inverse = dedupe(keys)
    np.testing.assert_array_equal(uniq[inverse], keys)
    np.testing.assert_array_equal(np.sort(uniq), np.unique(keys))
    # first-appearance order
    _, first = np.unique(keys, return_index=True)
    np.testing.assert_array_equal(uniq, keys[np.sort(first)])
