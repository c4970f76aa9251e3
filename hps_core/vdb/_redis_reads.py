"""The read path of the Redis VDB (``redis.py``): HMGETs of one or many tables in one
pipeline per node, their replies parsed straight into the output, and what a failed command
means (its keys fall through). Also the table layout both sides share: row widths and the
partition hash keys."""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError, StorageError
from ..metrics import REGISTRY
from . import _resp as R
from . import shm
from ._redis_nodes import Cmd, NodeDown, read_raw
from .hashmap import _keys

log = logging.getLogger("hps_core.vdb.redis")


def _wire(dtype: str) -> np.dtype:
    """Element type of a row in Redis: the hash map's storage type, little-endian (fp32, the
    bits of fp16 / bf16 rows, or an int8 row and its scale; see ``shm.encode`` / ``decode``)."""
    return np.dtype(shm.DTYPES[dtype]).newbyteorder("<")


def encode_rows(v: np.ndarray, dtype: str) -> np.ndarray:
    """float rows -> uint8 [n, width]: the bytes Redis keeps per row."""
    bits = np.ascontiguousarray(shm.encode(v, dtype), dtype=_wire(dtype))
    return bits.view(np.uint8).reshape(len(v), -1)


def decode_rows(raw: np.ndarray, dtype: str, dim: int) -> np.ndarray:
    """Row bytes (uint8 or bytes) -> float32 [n, dim]."""
    bits = np.frombuffer(raw, _wire(dtype)).reshape(-1, shm.value_columns(dim, dtype))
    return shm.decode(bits.astype(shm.DTYPES[dtype]), dtype, dim)


_unavailable = REGISTRY.counter(
    "hps_vdb_redis_unavailable_keys_total",
    "Keys a fetch reported missing because their Redis node was down",
    ("table",),
)


@dataclass
class _Meta:
    dim: int
    dtype: str
    partitions: int

    @property
    def width(self) -> int:
        return shm.row_bytes(self.dim, self.dtype)


def _part_key(table: str, p: int, suffix: str) -> str:
    """The Redis key of partition p of a table: its rows ("v") or their scores ("t")."""
    return f"hps_et{{{table}/p{p}}}{suffix}"


@dataclass
class _Fetch:
    """One table's part of a fetch: its HMGET commands and where their replies go."""

    table: str
    m: _Meta
    k: np.ndarray
    out: np.ndarray
    fresh: bool
    found: np.ndarray
    groups: list[tuple[int, np.ndarray]]
    cmds: list[Cmd]
    direct: bool  # fp32 rows land in out itself; fp16 ones in rows, decoded at the end
    rows: np.ndarray
    failed: bool = False


class RedisReads:
    """``fetch`` and ``fetch_many`` of ``RedisVDB`` (which provides ``_table``, ``_groups``,
    ``_touch``, ``nodes``, ``_read_errors`` and ``unavailable_keys``)."""

    def fetch(self, table, keys, out=None):
        return self.fetch_many([(table, keys, out)])[0]

    def fetch_many(
        self, requests: list[tuple[str, object, np.ndarray | None]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``fetch`` of several (table, keys, out) requests, all in one pipeline per node: one
        round trip for a request of many tables instead of one per table."""
        plans = [self._plan(table, keys, out) for table, keys, out in requests]
        cmds: list[Cmd] = []
        owner: list[tuple[int, int]] = []  # (plan, group) of each command
        for i, pl in enumerate(plans):
            cmds += pl.cmds
            owner += [(i, g) for g in range(len(pl.groups))]
        if cmds:
            read = functools.partial(self._read_rows, plans, owner)
            for (i, g), r in zip(owner, self.nodes.run(cmds, read), strict=True):
                self._take(plans[i], g, r)
        return [self._done(pl) for pl in plans]

    def _plan(self, table: str, keys: object, out: np.ndarray | None) -> _Fetch:
        """The HMGET commands of one fetch, and where their rows go."""
        m = self._table(table)
        k = _keys(keys)
        n = len(k)
        fresh = out is None
        if fresh:
            out = np.zeros((n, m.dim), np.float32)
        elif out.shape != (n, m.dim) or out.dtype != np.float32 or not out.flags.writeable:
            raise InvalidInputError("out", f"{out.dtype} {out.shape}", f"float32 [{n}, {m.dim}]")
        groups: list[tuple[int, np.ndarray]] = []
        cmds: list[Cmd] = []
        if n:
            hkeys, heads, head_at = self._hmget_heads(table, m.partitions)
            wire, at, part, lo, hi, order = R.hmget_commands(
                k, m.partitions, self.max_batch_size, heads, head_at
            )
            view = memoryview(wire)
            at_, lo_, hi_ = at.tolist(), lo.tolist(), hi.tolist()
            for c, p in enumerate(part.tolist()):
                groups.append((p, order[lo_[c] : hi_[c]]))
                cmds.append(Cmd(hkeys[p], view[at_[c] : at_[c + 1]]))
        direct = m.dtype == "float32" and out.flags.c_contiguous  # rows land in out
        rows = out.view(np.uint8) if direct else np.empty((n, m.width), np.uint8)
        return _Fetch(table, m, k, out, fresh, np.zeros(n, bool), groups, cmds, direct, rows)

    def _hmget_heads(self, table: str, parts: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Each partition's hash key, and the first arguments of an HMGET of it (``$5 HMGET``
        and the key as bulk strings) packed for ``R.hmget_commands``; built once per table."""
        cached = self._heads.get(table)
        if cached is None or len(cached[0]) != parts:
            hkeys = [_part_key(table, p, "v") for p in range(parts)]
            raw = [R.bulk("HMGET") + R.bulk(hk) for hk in hkeys]
            head_at = np.zeros(parts + 1, np.int64)
            np.cumsum([len(b) for b in raw], out=head_at[1:])
            cached = hkeys, np.frombuffer(b"".join(raw), np.uint8), head_at
            self._heads[table] = cached
        return cached

    def _take(self, pl: _Fetch, g: int, r: object) -> None:
        """Account for the reply of group g: rows read in place (True), a redirected plain
        reply, or a failure (its keys fall through)."""
        p, sel = pl.groups[g]
        if isinstance(r, Exception):
            # NodeDown was logged by the node; other errors (LOADING, CLUSTERDOWN...) are
            # logged once per table and kind until a fetch of the table works again.
            if not isinstance(r, NodeDown) and (pl.table, type(r)) not in self._read_errors:
                self._read_errors.add((pl.table, type(r)))
                log.warning(
                    "Redis VDB table '%s': fetch failed, keys fall through: %s", pl.table, r
                )
            pl.failed = True
            self.unavailable_keys += len(sel)
            _unavailable.inc(len(sel), table=pl.table)
            # a read cut off mid-reply may have placed some whole rows: the keys of a failed
            # command all fall through, as documented, and a fresh out stays zero
            pl.found[sel] = False
            if pl.fresh and pl.direct:
                pl.out[sel] = 0.0
            return
        if r is True:  # read_rows put the rows in place
            return
        hit = np.fromiter((v is not None for v in r), bool, len(sel))  # a redirected read
        if not hit.any():
            return
        buf = b"".join([v for v in r if v is not None])
        if len(buf) != int(hit.sum()) * pl.m.width:
            raise self._width_error(pl.table, p, pl.m)
        pos = sel[hit]
        pl.rows[pos] = np.frombuffer(buf, np.uint8).reshape(-1, pl.m.width)
        pl.found[pos] = True

    def _done(self, pl: _Fetch) -> tuple[np.ndarray, np.ndarray]:
        if not pl.direct:
            pl.out[pl.found] = decode_rows(pl.rows[pl.found], pl.m.dtype, pl.m.dim)
        if not pl.failed and self._read_errors:
            self._read_errors = {e for e in self._read_errors if e[0] != pl.table}
        if len(pl.k):
            self._touch(pl.table, pl.m, pl.k, pl.found)
        return pl.out, pl.found

    @staticmethod
    def _width_error(table: str, p: int, m: _Meta) -> StorageError:
        return StorageError(
            f"Redis VDB table '{table}' partition {p}: stored rows are not "
            f"{m.width} bytes (dim {m.dim} {m.dtype}); was the table re-created?"
        )

    def _read_rows(self, plans, owner, conn, idx) -> list[object]:
        """Read the HMGET replies of commands ``idx`` off ``conn`` straight into the rows of
        their fetches (consecutive commands of one fetch parse as one run)."""
        runs = []  # (fetch, positions in idx, counts, sel, starts, err)
        for i, js in itertools.groupby(range(len(idx)), key=lambda j: owner[idx[j]][0]):
            js = list(js)
            pl = plans[i]
            sels = [pl.groups[owner[idx[j]][1]][1] for j in js]
            counts = np.array([len(x) for x in sels], np.int64)
            starts = np.zeros(len(js), np.int64)
            np.cumsum(counts[:-1], out=starts[1:])
            err = np.full((len(js), 2), -1, np.int64)
            runs.append((pl, js, counts, np.concatenate(sels), starts, err))
        state = np.array([0, -1, 0], np.int64)
        at = [0]  # the run being parsed; state[2] carries the buffer position across runs
        errors: dict[int, str] = {}

        def consume(buf: np.ndarray, end: int) -> bool:
            while at[0] < len(runs):
                pl, js, counts, sel, starts, err = runs[at[0]]
                status = R.parse_rows(buf, end, state, counts, sel, starts, pl.rows, pl.found, err)
                for c in np.flatnonzero(err[:, 0] >= 0):
                    if js[c] not in errors:
                        errors[js[c]] = bytes(buf[err[c, 0] : err[c, 1]]).decode(errors="replace")
                if status in (R.BAD_WIDTH, R.BAD):
                    p = pl.groups[owner[idx[js[state[0]]]][1]][0]
                    if status == R.BAD_WIDTH:
                        raise self._width_error(pl.table, p, pl.m)
                    got = bytes(buf[int(state[2]) : min(end, int(state[2]) + 40)])
                    raise StorageError(
                        f"Redis VDB table '{pl.table}' partition {p}: not an HMGET reply: {got!r}"
                    )
                if status != R.DONE:
                    return False
                at[0] += 1
                state[0], state[1] = 0, -1
            return True

        read_raw(conn, sum(R.reply_bytes(r[2], r[0].m.width) for r in runs), consume)
        # an error reply becomes the exception redis-py's own parser would have raised
        parse_error = conn._parser.parse_error
        return [parse_error(errors[j]) if j in errors else True for j in range(len(idx))]
