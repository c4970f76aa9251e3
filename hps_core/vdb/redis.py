"""The Redis volatile DB (L2): standalone Redis or Redis Cluster, shared by many processes/machines.

Layout (HPS's): each table is split into ``num_partitions`` partitions by
``splitmix64(key) % num_partitions``; partition ``N`` of table ``T`` is the Redis hash
``hps_et{T/pN}v`` (field: the key as 8 little-endian bytes; value: the row as packed fp32 or
fp16 bytes). The hash tag ``{T/pN}`` keeps a partition on one cluster node. Evicting by age or
use adds the sorted set ``hps_et{T/pN}t`` (member: the key; score: last insert/fetch time in ms,
or the fetch count). ``hps_et{T/meta}`` holds the table's dim, dtype and partition count, so
every process attached to the same Redis sees the same tables.

Standalone or cluster: ``cluster=None`` asks the first reachable address (``INFO cluster``);
several addresses or a cluster-enabled server give a cluster client, a single plain server a
standalone one. Batches are encoded with numpy (``_resp``) and sent as one pipeline per node,
the nodes in parallel; ``_redis_nodes`` does the routing, follows ``MOVED``/``ASK`` and tracks
outages; ``_redis_reads`` holds the read path (``fetch``, ``fetch_many``: several tables in one
pipeline per node).

Failures: a node that refuses, resets or times out is marked down (logged once, counted in
``hps_vdb_redis_outages_total``) and retried after a back-off. Its keys are reported as not
found by ``fetch``/``contains``, so a lookup falls through to the PDB; writes raise
``StorageError`` naming the node and the operation.

Overflow (HPS semantics, per partition): after an upsert, a partition holding more than
``overflow_margin`` rows drops rows until ``overflow_resolution_target * overflow_margin``
remain, in one Lua script per partition: ``evict_random`` picks ``HRANDFIELD`` victims (rows
of the batch itself included), ``evict_oldest`` / ``evict_least_used`` pop the lowest scores.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import ConfigError, InvalidInputError, StorageError
from ..metrics import REGISTRY
from . import _resp as R
from ._redis_nodes import NODE_ERRORS, Cmd, RedisNodes, host_port
from ._redis_reads import RedisReads, _Meta, _part_key, decode_rows, encode_rows
from .base import VolatileDB
from .hashmap import _keys, _vectors, still_held
from .shm import DTYPES

log = logging.getLogger(__name__)

POLICIES = ("evict_random", "evict_least_used", "evict_oldest")

_EVICT = """
local n = redis.call('HLEN', KEYS[1])
if n <= tonumber(ARGV[1]) then return 0 end
local target = tonumber(ARGV[2])
local removed = 0
local function drop(victims)
  for i = 1, #victims, 4096 do
    removed = removed + redis.call('HDEL', KEYS[1], unpack(victims, i, math.min(i + 4095, #victims)))
  end
end
if ARGV[3] ~= 'evict_random' then
  -- the sorted set may hold keys evicted meanwhile: pop until enough rows are gone
  while n > target do
    local popped = redis.call('ZPOPMIN', KEYS[2], n - target)
    if #popped == 0 then break end
    local victims = {}
    for i = 1, #popped, 2 do victims[#victims + 1] = popped[i] end
    drop(victims)
    n = redis.call('HLEN', KEYS[1])
  end
end
if n > target then drop(redis.call('HRANDFIELD', KEYS[1], n - target)) end
return removed
"""
# HSETNX per row, and the row's eviction score where one was set (ARGV[1]: the score, '' for
# evict_random; ARGV[2]: 'NX' for evict_least_used, as upsert), in one step on the node.
_INSERT_MISSING = """
local n = 0
for i = 3, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    n = n + 1
    if ARGV[1] ~= '' then
      if ARGV[2] == 'NX' then redis.call('ZADD', KEYS[2], 'NX', ARGV[1], ARGV[i])
      else redis.call('ZADD', KEYS[2], ARGV[1], ARGV[i]) end
    end
  end
end
return n
"""
_COUNT_USE = "for i = 1, #ARGV do redis.call('ZINCRBY', KEYS[1], 1, ARGV[i]) end return 0"

_evicted = REGISTRY.counter(
    "hps_vdb_evicted_rows_total", "Rows evicted by the VDB overflow policy", ("table",)
)


class RedisVDB(RedisReads, VolatileDB):
    """Tables as partitioned Redis hashes on one server or a Redis Cluster."""

    def __init__(
        self,
        addresses: list[str] | str = "127.0.0.1:6379",
        *,
        cluster: bool | None = None,
        user_name: str = "default",
        password: str = "",
        num_partitions: int = 8,
        max_batch_size: int = 64 * 1024,
        overflow_margin: int = 2**63 - 1,
        overflow_policy: str = "evict_random",
        overflow_resolution_target: float = 0.8,
        refresh_time_after_fetch: bool = False,
        num_node_connections: int = 5,
        enable_tls: bool = False,
        tls_ca_certificate: str = "",
        tls_client_certificate: str = "",
        tls_client_key: str = "",
        tls_server_name_identification: str = "",
        socket_timeout_ms: int = 1000,
        connect_timeout_ms: int = 500,
        reconnect_backoff_ms: int = 100,
        reconnect_backoff_max_ms: int = 5000,
    ):
        if isinstance(addresses, str):
            addresses = [a.strip() for a in addresses.split(",") if a.strip()]
        if not addresses:
            raise ConfigError("volatile_db.address", addresses, "one or more 'host:port'")
        self.addresses = [host_port(a) for a in addresses]
        if overflow_policy not in POLICIES:
            raise ConfigError("volatile_db.overflow_policy", overflow_policy, f"one of {POLICIES}")
        for name, value, low in (
            ("num_partitions", num_partitions, 1),
            ("max_batch_size", max_batch_size, 1),
            ("overflow_margin", overflow_margin, 1),
            ("num_node_connections", num_node_connections, 1),
            ("socket_timeout_ms", socket_timeout_ms, 1),
            ("connect_timeout_ms", connect_timeout_ms, 1),
        ):
            if int(value) < low:
                raise ConfigError(f"volatile_db.{name}", value, f"an integer >= {low}")
        if not 0.0 <= overflow_resolution_target <= 1.0:
            raise ConfigError(
                "volatile_db.overflow_resolution_target", overflow_resolution_target, "0..1"
            )
        self.num_partitions = int(num_partitions)
        self.max_batch_size = int(max_batch_size)
        self.overflow_margin = int(overflow_margin)
        self.policy = overflow_policy
        self.target = float(overflow_resolution_target)
        self.refresh_time_after_fetch = bool(refresh_time_after_fetch)
        self.nodes = RedisNodes(
            self.addresses,
            cluster=cluster,
            user_name=user_name,
            password=password,
            num_node_connections=num_node_connections,
            enable_tls=enable_tls,
            tls_ca_certificate=tls_ca_certificate,
            tls_client_certificate=tls_client_certificate,
            tls_client_key=tls_client_key,
            tls_server_name_identification=tls_server_name_identification,
            socket_timeout_ms=socket_timeout_ms,
            connect_timeout_ms=connect_timeout_ms,
            reconnect_backoff_ms=reconnect_backoff_ms,
            reconnect_backoff_max_ms=reconnect_backoff_max_ms,
        )
        self.cluster = self.nodes.cluster
        self._meta: dict[str, _Meta] = {}
        self.unavailable_keys = 0  # keys reported missing because their node was down
        self._read_errors: set[tuple[str, type]] = set()  # (table, error kind) logged already
        self._heads: dict[str, tuple] = {}  # per table: its HMGET heads (_hmget_heads)
        self._layouts: dict[str, tuple] = {}  # per table: its partitions' nodes (_layout)

    def node_down(self, name: str) -> bool:
        """Whether this process currently considers the node ``host:port`` down."""
        return self.nodes.node_down(name)

    def _checked(self, replies: list[object], op: str, table: str) -> list[object]:
        for r in replies:
            if isinstance(r, Exception):
                raise StorageError(f"Redis VDB table '{table}': {op} failed: {r}")
        return replies

    # -- tables -------------------------------------------------------------------------------
    def _table(self, table: str) -> _Meta:
        m = self._meta.get(table)
        if m is None:
            got = self.nodes.run([_meta_cmd(table, "HGETALL")])[0]
            if isinstance(got, Exception):
                raise StorageError(f"Redis VDB: cannot read table '{table}' ({got})")
            if not got:
                from .hashmap import UnknownVDBTableError

                raise UnknownVDBTableError(table, self.tables())
            d = _pairs_dict(got)
            m = _Meta(int(d[b"dim"]), d[b"dtype"].decode(), int(d[b"partitions"]))
            self._meta[table] = m
        return m

    def create_table(self, table, dim, dtype="float32", capacity_hint=0):
        if dtype not in DTYPES:
            raise InvalidInputError("dtype", dtype, f"one of {list(DTYPES)}")
        if int(dim) < 1:
            raise InvalidInputError("dim", dim, "an integer >= 1")
        if not table or "{" in table or "}" in table or "/" in table:
            raise InvalidInputError("table", repr(table), "a non-empty name without '/{}'")
        self._meta.pop(table, None)
        wire = R.command(
            "HSETNX", _meta_key(table), "dim", int(dim)
        )  # the first writer fixes the layout; the rest must agree
        rest = [
            R.command("HSETNX", _meta_key(table), "dtype", dtype),
            R.command("HSETNX", _meta_key(table), "partitions", self.num_partitions),
        ]
        cmds = [Cmd(_meta_key(table), w) for w in [wire, *rest]]
        self._checked(self.nodes.run(cmds), "create_table", table)
        m = self._table(table)
        if (m.dim, m.dtype) != (int(dim), dtype):
            raise StorageError(
                f"VDB table '{table}' exists with dim {m.dim} {m.dtype}, not {dim} {dtype}"
            )

    def drop_table(self, table):
        m = self._table(table)
        cmds = [
            Cmd(pk, R.command("DEL", pk))
            for p in range(m.partitions)
            for pk in (_part_key(table, p, "v"), _part_key(table, p, "t"))
        ]
        cmds.append(_meta_cmd(table, "DEL"))
        self._checked(self.nodes.run(cmds), "drop_table", table)
        self._meta.pop(table, None)

    def tables(self):
        names = set()
        for client in self.nodes.clients():
            try:
                for k in client.scan_iter(match="hps_et{*/meta}", count=1000):
                    names.add(k.decode()[len("hps_et{") : -len("/meta}")])
            except NODE_ERRORS:
                names |= set(self._meta)  # a down node: report what this process knows
        return sorted(names)

    def dim(self, table):
        return self._table(table).dim

    def size(self, table):
        m = self._table(table)
        cmds = [_part_cmd(table, p, "v", "HLEN") for p in range(m.partitions)]
        return int(sum(self._checked(self.nodes.run(cmds), "size", table)))

    def partition_sizes(self, table: str) -> np.ndarray:
        """Rows held by each partition of a table (int64 [num_partitions])."""
        m = self._table(table)
        cmds = [_part_cmd(table, p, "v", "HLEN") for p in range(m.partitions)]
        return np.array(self._checked(self.nodes.run(cmds), "size", table), np.int64)

    def memory_bytes(self, table=None):
        names = [table] if table is not None else self.tables()
        total = 0
        for t in names:
            m = self._table(t)
            cmds = [
                _part_cmd(t, p, s, "MEMORY", "USAGE") for p in range(m.partitions) for s in "vt"
            ]
            total += sum(int(r) for r in self.nodes.run(cmds) if isinstance(r, int))
        return total

    # -- reads --------------------------------------------------------------------------------
    def _groups(self, m: _Meta, k: np.ndarray):
        """(partition, positions into k) chunks of at most max_batch_size keys."""
        order, bounds = R.group_keys(k, m.partitions)
        for p in range(m.partitions):
            sel = order[bounds[p] : bounds[p + 1]]
            for s in range(0, len(sel), self.max_batch_size):
                yield p, sel[s : s + self.max_batch_size]

    def _touch(self, table: str, m: _Meta, k: np.ndarray, found: np.ndarray) -> None:
        """Refresh recency (evict_oldest + refresh_time_after_fetch) or use counts (least_used)."""
        if self.policy == "evict_oldest" and not self.refresh_time_after_fetch:
            return
        if self.policy == "evict_random" or not found.any():
            return
        kf = k[found]
        kb = R.key_bytes(kf)
        cmds = []
        now = R.bulk(int(time.time() * 1000))
        for p, sel in self._groups(m, kf):
            tk = _part_key(table, p, "t")
            if self.policy == "evict_oldest":
                wire = R.head(3 + 2 * len(sel), "ZADD", tk, "XX") + R.fields(kb[sel], now)
            else:
                wire = R.head(4 + len(sel), "EVAL", _COUNT_USE, 1, tk) + R.fields(kb[sel])
            cmds.append(Cmd(tk, wire))
        self.nodes.run(cmds)  # best effort: a lost touch only skews eviction order

    def contains(self, table, keys):
        return self.fetch(table, keys)[1]

    def dump(self, table):
        m = self._table(table)
        cmds = [_part_cmd(table, p, "v", "HGETALL") for p in range(m.partitions)]
        ks, vs = [], []
        for r in self._checked(self.nodes.run(cmds), "dump", table):
            items = r.items() if isinstance(r, dict) else zip(r[::2], r[1::2], strict=True)
            for f, v in items:
                ks.append(f)
                vs.append(v)
        keys = np.frombuffer(b"".join(ks), "<i8").astype(np.int64)
        return keys, decode_rows(b"".join(vs), m.dtype, m.dim)

    # -- writes -------------------------------------------------------------------------------
    def upsert(self, table, keys, vectors):
        self._write(table, keys, vectors, missing_only=False)

    def insert_missing(self, table, keys, vectors, source=None):
        """A script per partition sets each row only where its key is not held: Redis runs a
        script whole, so no other client's write lands between the check and the insert.
        ``source`` is read just before: an update that writes it and this table, and whose
        row is then evicted, all between that read and the script, is the one race left."""
        return self._write(table, keys, vectors, missing_only=True, source=source)

    def _write(self, table, keys, vectors, missing_only: bool, source=None) -> int:
        m = self._table(table)
        k = _keys(keys)
        v = _vectors(vectors, len(k), m.dim, table)
        if source is not None:
            keep = still_held(source, k, v)
            k, v = k[keep], v[keep]
        if len(k) == 0:
            return 0
        if len(np.unique(k)) != len(k):  # later duplicates win: keep each key's last row
            last = len(k) - 1 - np.unique(k[::-1], return_index=True)[1]
            k, v = k[last], v[last]
        vb = encode_rows(v, m.dtype)
        kb = R.key_bytes(k)
        cmds, touched = [], set()
        now = {"evict_oldest": int(time.time() * 1000), "evict_least_used": 0}.get(self.policy, "")
        score = None if now == "" else R.bulk(now)
        flag = "NX" if self.policy == "evict_least_used" else ""
        for p, sel in self._groups(m, k):
            hk = _part_key(table, p, "v")
            if missing_only:
                tk = _part_key(table, p, "t")
                wire = R.head(7 + 2 * len(sel), "EVAL", _INSERT_MISSING, 2, hk, tk, now, flag)
                cmds.append(Cmd(hk, wire + R.pairs(kb[sel], vb[sel])))
                touched.add(p)
                continue
            wire = R.head(2 + 2 * len(sel), "HSET", hk) + R.pairs(kb[sel], vb[sel])
            cmds.append(Cmd(hk, wire))
            if score is not None:
                tk = _part_key(table, p, "t")
                nx = (flag,) if flag else ()
                wire = R.head(2 + len(nx) + 2 * len(sel), "ZADD", tk, *nx)
                cmds.append(Cmd(tk, wire + R.fields(kb[sel], score)))
            touched.add(p)
        replies = self._checked(self.nodes.run(cmds), "upsert", table)
        if self.overflow_margin < 2**62:
            self._resolve_overflow(table, sorted(touched))
        return int(sum(replies)) if missing_only else len(k)

    def _resolve_overflow(self, table: str, parts: list[int]) -> None:
        keep = int(self.target * self.overflow_margin)
        cmds = []
        for p in parts:
            hk, tk = _part_key(table, p, "v"), _part_key(table, p, "t")
            wire = R.command("EVAL", _EVICT, 2, hk, tk, self.overflow_margin, keep, self.policy)
            cmds.append(Cmd(hk, wire))
        dropped = sum(self._checked(self.nodes.run(cmds), "overflow eviction", table))
        if dropped:
            _evicted.inc(dropped, table=table)
            log.debug("VDB table %s: evicted %d rows (%s)", table, dropped, self.policy)

    def evict(self, table, keys):
        m = self._table(table)
        k = np.unique(_keys(keys))
        if len(k) == 0:
            return 0
        kb = R.key_bytes(k)
        cmds, is_row = [], []
        for p, sel in self._groups(m, k):
            for s in "vt":
                pk = _part_key(table, p, s)
                verb = "HDEL" if s == "v" else "ZREM"
                cmds.append(Cmd(pk, R.head(2 + len(sel), verb, pk) + R.fields(kb[sel])))
                is_row.append(s == "v")
        replies = self._checked(self.nodes.run(cmds), "evict", table)
        return int(sum(r for r, row in zip(replies, is_row, strict=True) if row))

    def load_mark(self, table):
        """The table survives a restart of this process (and serves other processes), and with
        it the rows online updates wrote: a load that finds the mark of the same file leaves
        it as it is. The mark is a field of the table's metadata hash: dropping the table
        drops it."""
        got = self.nodes.run([Cmd(_meta_key(table), R.command("HGET", _meta_key(table), "loaded"))])
        got = self._checked(got, "load_mark", table)[0]
        return None if got is None else bytes(got).decode()

    def set_load_mark(self, table, mark):
        mk = _meta_key(table)
        cmd = (
            R.command("HDEL", mk, "loaded")
            if mark is None
            else R.command("HSET", mk, "loaded", mark)
        )
        self._checked(self.nodes.run([Cmd(mk, cmd)]), "set_load_mark", table)

    def close(self):
        self.nodes.close()


def _meta_key(table: str) -> str:
    return f"hps_et{{{table}/meta}}"


def _part_cmd(table: str, p: int, suffix: str, *verb: str) -> Cmd:
    pk = _part_key(table, p, suffix)
    return Cmd(pk, R.command(*verb, pk))


def _meta_cmd(table: str, verb: str) -> Cmd:
    mk = _meta_key(table)
    return Cmd(mk, R.command(verb, mk))


def _pairs_dict(r: object) -> dict:
    if isinstance(r, dict):
        return r
    return dict(zip(r[::2], r[1::2], strict=True))
