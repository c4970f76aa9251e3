"""Arrays in POSIX shared memory (files under /dev/shm), so processes share one copy of a table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

SHM_DIR = Path(os.environ.get("HPS_SHM_DIR", "/dev/shm"))


def array_path(name: str, table: str, array: str) -> Path:
    return SHM_DIR / f"{name}.{table}.{array}"


def create_array(name: str, table: str, array: str, shape: tuple, dtype) -> np.ndarray:
    """A new zero-filled shared array (replaces an old one of the same name)."""
    path = array_path(name, table, array)
    path.unlink(missing_ok=True)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="w+", shape=shape)


def attach_array(
    name: str, table: str, array: str, shape: tuple, dtype, writable: bool
) -> np.ndarray:
    """Map an existing shared array."""
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(
        array_path(name, table, array), dtype=dtype, mode="r+" if writable else "r", shape=shape
    )


def remove_arrays(name: str, table: str) -> None:
    for p in SHM_DIR.glob(f"{name}.{table}.*"):
        p.unlink(missing_ok=True)


def header_path(name: str) -> Path:
    return SHM_DIR / f"{name}.tables.json"


def read_header(name: str) -> dict:
    """Table layouts published by the writer: {table: {dim, dtype, P, pcap, icap, meta}}."""
    try:
        return json.loads(header_path(name).read_text())
    except FileNotFoundError:
        return {}


def write_header(name: str, tables: dict) -> None:
    tmp = header_path(name).with_suffix(".tmp")
    tmp.write_text(json.dumps(tables))
    os.replace(tmp, header_path(name))  # readers see the old or the new header, never half
