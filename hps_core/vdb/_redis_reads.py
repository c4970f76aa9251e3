"""The read path of the Redis VDB (``redis.py``): HMGETs of one or many tables in one
pipeline per node, their replies parsed straight into the output, and what a failed command
means (its keys fall through). Also the table layout both sides share: row widths and the
partition hash keys."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidInputError, StorageError
from ..metrics import REGISTRY
from . import _resp as R
from . import shm
from ._redis_nodes import NodeDown, read_raw
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
    """One table's part of a fetch: its HMGET commands and where their replies go.

    Command c is ``wire[at[c]:at[c + 1]]``, reads partition ``part[c]`` and asks for the keys
    at ``order[lo[c]:hi[c]]``; the commands are in node order, ``spans`` giving each node's
    (name, client, first command, end command)."""

    table: str
    m: _Meta
    k: np.ndarray
    out: np.ndarray
    fresh: bool
    found: np.ndarray
    direct: bool  # fp32 rows land in out itself; fp16 ones in rows, decoded at the end
    rows: np.ndarray
    spans: list = field(default_factory=list)
    wire: memoryview | None = None
    at: np.ndarray | None = None
    part: np.ndarray | None = None
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    order: np.ndarray | None = None
    failed: bool = False

    def commands(self, c0: int, c1: int) -> memoryview:
        """The wire bytes of commands c0 to c1 - 1."""
        return self.wire[self.at[c0] : self.at[c1]]


class RedisReads:
    """``fetch`` and ``fetch_many`` of ``RedisVDB`` (which provides ``_table``, ``_touch``,
    ``nodes``, ``_heads``, ``_layouts``, ``_read_errors`` and ``unavailable_keys``)."""

    def fetch(self, table, keys, out=None):
        return self.fetch_many([(table, keys, out)])[0]

    def fetch_many(
        self, requests: list[tuple[str, object, np.ndarray | None]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``fetch`` of several (table, keys, out) requests, all in one pipeline per node: one
        round trip for a request of many tables instead of one per table."""
        plans = [self._plan(table, keys, out) for table, keys, out in requests]
        jobs: dict[str, list] = {}  # node -> [client, wire pieces, commands, (plan, c0, c1)...]
        for pl in plans:
            for name, client, c0, c1 in pl.spans:
                job = jobs.get(name)
                if job is None:
                    job = jobs[name] = [client, [], 0, []]
                job[1].append(pl.commands(c0, c1))
                job[2] += c1 - c0
                job[3].append((pl, c0, c1))
        if jobs:
            todo = [(name, *job) for name, job in jobs.items()]
            results = self.nodes.read_nodes(
                [job[:4] for job in todo], lambda j, conn: self._read_rows(todo[j][4], conn)
            )
            for job, res in zip(todo, results, strict=True):
                if res.count(True) != len(res):  # a failure, a redirect or a plain reply
                    self._settle(job[4], res)
        return [self._done(pl) for pl in plans]

    def _settle(self, spans: list, res: list) -> None:
        """Take the results of a node's commands that were not read in place: redirects are
        followed (``RedisNodes.follow``), then each reply or failure is taken (``_take``)."""
        cmds = [(pl, c) for pl, c0, c1 in spans for c in range(c0, c1)]
        odd = [(cmds[i], r) for i, r in enumerate(res) if r is not True]
        wire_of = lambda j: odd[j][0][0].commands(odd[j][0][1], odd[j][0][1] + 1)  # noqa: E731
        done = self.nodes.follow([r for _, r in odd], wire_of)
        for ((pl, c), _), r in zip(odd, done, strict=True):
            self._take(pl, c, r)

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
        direct = m.dtype == "float32" and out.flags.c_contiguous  # rows land in out
        rows = out.view(np.uint8) if direct else np.empty((n, m.width), np.uint8)
        pl = _Fetch(table, m, k, out, fresh, np.zeros(n, bool), direct, rows)
        if n:
            hkeys, heads, head_at = self._hmget_heads(table, m.partitions)
            perm, nodes = self._layout(table, hkeys)
            wire, pl.at, pl.part, pl.lo, pl.hi, pl.order, first = R.hmget_commands(
                k, m.partitions, self.max_batch_size, heads, head_at, perm
            )
            pl.wire = memoryview(wire)
            first_ = first.tolist()
            pl.spans = [
                (name, client, first_[r0], first_[r1])
                for name, client, r0, r1 in nodes
                if first_[r1] > first_[r0]
            ]
        return pl

    def _layout(self, table: str, hkeys: list[str]) -> tuple[np.ndarray, list[tuple]]:
        """The table's partitions in node order, and each node's (name, client, first rank,
        end rank) in it; looked up again when the routes were forgotten (a redirect or a node
        down)."""
        gen = self.nodes.routes_gen
        got = self._layouts.get(table)
        if got is not None and got[0] == gen and len(got[1]) == len(hkeys):
            return got[1], got[2]
        routes = [self.nodes.route(hk) for hk in hkeys]
        rank = {name: i for i, name in enumerate(dict.fromkeys(r[0] for r in routes))}
        perm = sorted(range(len(hkeys)), key=lambda p: rank[routes[p][0]])
        nodes: list[tuple] = []
        for r, p in enumerate(perm):
            if nodes and nodes[-1][0] == routes[p][0]:
                nodes[-1][3] = r + 1
            else:
                nodes.append([routes[p][0], routes[p][1], r, r + 1])
        got = gen, np.array(perm, np.int64), [tuple(x) for x in nodes]
        self._layouts[table] = got
        return got[1], got[2]

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

    def _take(self, pl: _Fetch, c: int, r: object) -> None:
        """Account for the reply of command c that was not read in place: a plain reply (a
        redirected or generically read one) or a failure (its keys fall through)."""
        p, sel = int(pl.part[c]), pl.order[pl.lo[c] : pl.hi[c]]
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

    def _read_rows(self, spans: list[tuple[_Fetch, int, int]], conn) -> list[object]:
        """Read the HMGET replies of a node's commands (``spans``: (fetch, first command, end
        command), one per fetch, in the order sent) off ``conn`` straight into the rows of
        their fetches: True per command read in place, or the error it got."""
        runs = []  # (fetch, first command, counts, sel, starts, err, position in the node's)
        n_cmd = 0
        for pl, c0, c1 in spans:
            lo, hi = pl.lo[c0:c1], pl.hi[c0:c1]
            err = np.full((c1 - c0, 2), -1, np.int64)
            runs.append((pl, c0, hi - lo, pl.order[lo[0] : hi[-1]], lo - lo[0], err, n_cmd))
            n_cmd += c1 - c0
        state = np.array([0, -1, 0], np.int64)
        at = [0]  # the run being parsed; state[2] carries the buffer position across runs
        errors: dict[int, str] = {}

        def consume(buf: np.ndarray, end: int) -> bool:
            while at[0] < len(runs):
                pl, c0, counts, sel, starts, err, pos = runs[at[0]]
                status = R.parse_rows(buf, end, state, counts, sel, starts, pl.rows, pl.found, err)
                for c in np.flatnonzero(err[:, 0] >= 0):
                    if pos + c not in errors:
                        msg = bytes(buf[err[c, 0] : err[c, 1]]).decode(errors="replace")
                        errors[pos + c] = msg
                if status in (R.BAD_WIDTH, R.BAD):
                    p = int(pl.part[c0 + state[0]])
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
        out: list[object] = [True] * n_cmd
        # an error reply becomes the exception redis-py's own parser would have raised
        for j, msg in errors.items():
            out[j] = conn._parser.parse_error(msg)
        return out
