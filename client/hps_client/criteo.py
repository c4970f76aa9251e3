"""Criteo-format TSV lines (label, 13 integers, 26 hex categoricals) -> request arrays."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

NUM_DENSE, NUM_CAT = 13, 26


class CriteoFormatError(ValueError):
    """A TSV line that is not label + 13 integers + 26 hex fields; names the line and field."""


def parse_criteo_lines(lines: Iterable[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label int32 [B], DENSE float32 [B, 13] as log(1 + max(x, 0)), CAT int64 [B, 26]).

    Empty fields are 0, as in the Criteo preprocessing of DLRM; categoricals are the hex hash
    read as an unsigned integer.
    """
    labels, dense, cat = [], [], []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line:
            continue
        f = line.split("\t")
        if len(f) != 1 + NUM_DENSE + NUM_CAT:
            raise CriteoFormatError(
                f"line {n}: {len(f)} fields, expected {1 + NUM_DENSE + NUM_CAT}"
            )
        try:
            labels.append(int(f[0] or 0))
        except ValueError:
            raise CriteoFormatError(f"line {n}: label {f[0]!r} is not an integer") from None
        row = []
        for j, v in enumerate(f[1 : 1 + NUM_DENSE]):
            try:
                row.append(int(v) if v else 0)
            except ValueError:
                raise CriteoFormatError(f"line {n}: I{j + 1} {v!r} is not an integer") from None
        dense.append(row)
        crow = []
        for j, v in enumerate(f[1 + NUM_DENSE :]):
            try:
                crow.append(int(v, 16) if v else 0)
            except ValueError:
                raise CriteoFormatError(f"line {n}: C{j + 1} {v!r} is not hexadecimal") from None
        cat.append(crow)
    d = np.log1p(np.maximum(np.asarray(dense, np.float64).reshape(-1, NUM_DENSE), 0))
    return (
        np.asarray(labels, np.int32),
        d.astype(np.float32),
        np.asarray(cat, np.uint64).reshape(-1, NUM_CAT).astype(np.int64),
    )
