"""Routing and sending for the Redis VDB: which node holds a key, one pipeline per node, outages.

``RedisNodes`` talks to one standalone server or a Redis Cluster. For a cluster, redis-py's
``RedisCluster`` keeps the slot map and a connection pool per node; a batch of commands is
grouped by node and written to each node as one pipeline (pre-encoded RESP bytes), the nodes in
parallel. ``MOVED`` reloads the slot map and re-sends the command to the node named;
``ASK`` re-sends it there after ``ASKING``.

A node that refuses, resets or times out is marked down: its commands get ``NodeDown`` results
(callers decide: reads report the keys missing, writes raise) without touching the network until
the back-off (``reconnect_backoff_ms``, doubling up to ``reconnect_backoff_max_ms``) has passed;
the next command then probes it. The outage is logged once and counted in
``hps_vdb_redis_outages_total``; every command refused meanwhile in
``hps_vdb_redis_failed_ops_total``.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, RedisClusterException, ResponseError
from redis.retry import Retry

from ..config import split_address
from ..errors import ConfigError, StorageError
from ..metrics import REGISTRY
from . import _resp as R

log = logging.getLogger(__name__)

NODE_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
MAX_ROUTES = 1 << 16  # remembered hash -> node routes (partitions of every table)

_outages = REGISTRY.counter(
    "hps_vdb_redis_outages_total", "Redis node outages seen by this process", ("node",)
)
_failed = REGISTRY.counter(
    "hps_vdb_redis_failed_ops_total", "Redis operations that failed on a down node", ("node",)
)


_ALL: weakref.WeakSet = weakref.WeakSet()  # every RedisNodes: a forked child opens its own
os.register_at_fork(after_in_child=lambda: [n._slots.clear() for n in list(_ALL)])


def tls_classes(server_name: str) -> tuple[type, type]:
    """(connection, pool) classes for TLS connections: redis-py's, except that where
    ``server_name`` (``tls_server_name_identification``) is given, the handshake sends it as
    the TLS server name (SNI) and checks the server's certificate against it instead of the
    address dialled, as gRPC's target name override does. HugeCTR sent the name as SNI only
    (its client did not check names); here a certificate must hold the name that is checked,
    and an error says which one that was.
    """
    if server_name and not hasattr(redis.SSLConnection, "_wrap_socket_with_ssl"):
        raise ConfigError(
            "volatile_db.tls_server_name_identification", server_name,
            f"redis-py >= 5.1 to send a server name (installed: {redis.__version__})",
        )  # fmt: skip

    class TLSConnection(redis.SSLConnection):
        def _wrap_socket_with_ssl(self, sock):
            if not server_name:
                return super()._wrap_socket_with_ssl(sock)
            # redis-py names the server by self.host, which was dialled by now: the handshake
            # alone sees server_name; errors raised after it name the address again.
            dialled, self.host = self.host, server_name
            try:
                return super()._wrap_socket_with_ssl(sock)
            finally:
                self.host = dialled

    class TLSPool(redis.ConnectionPool):
        def __init__(self, **kw):
            super().__init__(**{**kw, "connection_class": TLSConnection})

    return TLSConnection, TLSPool


class NodeDown(StorageError):
    """A Redis node did not answer (refused, reset or timed out)."""


@dataclass
class _Health:
    """Outage state of one node: down since when, next try after when, current back-off."""

    down: bool = False
    retry_at: float = 0.0
    backoff: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Sent:
    """Commands sent to a node whose replies are still to be read (see ``RedisNodes._begin``)."""

    name: str
    conn: object
    slots: queue.SimpleQueue
    health: _Health
    count: int

    def release(self, drop: bool = False) -> None:
        """Give the connection back to its node's slots (``drop``: close it first, its replies
        unread)."""
        if drop:
            self.conn.disconnect()
        self.slots.put(self.conn)


@dataclass
class Cmd:
    """One command of a batch: its partition key (for routing) and its wire bytes."""

    hkey: str
    wire: bytes | memoryview


class RedisNodes:
    """The nodes of a standalone Redis or a Redis Cluster, their pools and their health."""

    def __init__(
        self,
        addresses: list[tuple[str, int]],
        *,
        cluster: bool | None = None,
        user_name: str = "",
        password: str = "",
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
        self.addresses = addresses
        self.backoff = (reconnect_backoff_ms / 1e3, reconnect_backoff_max_ms / 1e3)
        self._kw = dict(
            username=user_name or None,
            password=password or None,
            socket_timeout=socket_timeout_ms / 1e3,
            socket_connect_timeout=connect_timeout_ms / 1e3,
            # No silent retries inside redis-py: an outage is ours to see, count and back off.
            retry=Retry(NoBackoff(), 0),
        )
        self._tls = self._tls_name = None
        if enable_tls:
            self._kw.update(
                ssl_ca_certs=tls_ca_certificate or None,
                ssl_certfile=tls_client_certificate or None,
                ssl_keyfile=tls_client_key or None,
                ssl_check_hostname=True,  # (redis-py 5 did not check by default)
            )
            self._tls = tls_classes(tls_server_name_identification)
            self._tls_name = tls_server_name_identification
        # At most num_node_connections commands in flight per node (HPS's pool size): a burst
        # of lookups queues for a connection instead of opening more or failing the node.
        self._per_node = int(num_node_connections)
        # Each node's slots: num_node_connections tokens, each an idle connection (None until
        # first used). A command takes one and puts it back once its replies were read whole
        # (or the connection was closed), so the next command's replies are the next on that
        # socket. Kept here rather than handed back to redis-py's pool after every command:
        # its get/release (locks, a readiness poll of the socket, usage counters) cost ~45 us
        # per node and fetch; of those only the poll is kept (``_stale``). A connection comes
        # from the pool once, so the pool closes it.
        self._slots: dict[str, queue.SimpleQueue] = {}
        _ALL.add(self)
        self._health: dict[str, _Health] = {}
        self._redirect_clients: dict[str, redis.Redis] = {}
        self._routes: dict[str, tuple[str, redis.Redis]] = {}  # see route
        self.routes_gen = 0  # moves on whenever remembered routes are forgotten
        self._lock = threading.Lock()
        self.cluster = self._is_cluster() if cluster is None else bool(cluster)
        try:
            if self.cluster:
                nodes = [ClusterNode(h, p) for h, p in self.addresses]
                tls = {}
                if self._tls:  # its node clients' pools come from connection_pool_class only
                    h, p = self.addresses[0]  # when a URL is given
                    tls = dict(url=f"rediss://{h}:{p}", connection_pool_class=self._tls[1])
                self._rc = RedisCluster(
                    startup_nodes=nodes, require_full_coverage=False, **tls, **self._kw
                )
                self._single = None
            else:
                h, p = self.addresses[0]
                self._rc = None
                self._single = self._node_client(h, p)
                self._single.ping()
        except NODE_ERRORS + (redis.RedisError, RedisClusterException) as e:
            raise StorageError(
                f"Redis VDB at {_names(addresses)}: cannot connect ({e}){self._tls_hint(e)}"
            ) from None
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="hps-redis")

    def _is_cluster(self) -> bool:
        if len(self.addresses) > 1:
            return True
        h, p = self.addresses[0]
        try:
            info = self._node_client(h, p).info("cluster")
        except NODE_ERRORS + (redis.RedisError,) as e:
            raise StorageError(
                f"Redis VDB: cannot reach {h}:{p} ({e}){self._tls_hint(e)}"
            ) from None
        return bool(info.get("cluster_enabled"))

    def _node_client(self, host: str, port: int) -> redis.Redis:
        """A new client of one node, over TLS connections of ours when TLS is on."""
        if self._tls is None:
            return redis.Redis(host=host, port=port, **self._kw)
        c = redis.Redis(host=host, port=port, ssl=True, **self._kw)
        c.connection_pool.connection_class = self._tls[0]  # (it connects on first use)
        return c

    def _tls_hint(self, e: Exception) -> str:
        """Which name a server certificate that failed the check was checked against."""
        if self._tls_name is None or "certificate" not in str(e):
            return ""
        if self._tls_name:
            return (
                f"; the server certificate was checked against "
                f"volatile_db.tls_server_name_identification = {self._tls_name!r}"
            )
        return (
            "; the server certificate was checked against the address dialled: set "
            "volatile_db.tls_server_name_identification to a name the certificate holds"
        )

    def route(self, hkey: str) -> tuple[str, redis.Redis]:
        """(name, client) of the node that holds the hash ``hkey``. Remembered per hash (a
        fetch sends a command per partition, and redis-py's slot lookup costs ~2.5 us each);
        forgotten when a redirect reloads the slot map or a node goes down. A stale entry
        costs one redirect."""
        hit = self._routes.get(hkey)
        if hit is not None:
            return hit
        if self._single is not None:
            c = self._single.connection_pool.connection_kwargs  # host and port
            route = f"{c['host']}:{c['port']}", self._single
        else:
            n = self._rc.nodes_manager.get_node_from_slot(key_slot(hkey.encode()))
            if n.redis_connection is None:
                self._rc.nodes_manager.create_redis_connections([n])
            route = n.name, n.redis_connection
        if len(self._routes) >= MAX_ROUTES:
            self._forget_routes()
        self._routes[hkey] = route
        return route

    def _forget_routes(self) -> None:
        self._routes.clear()
        self.routes_gen += 1

    def run(self, cmds: list[Cmd]) -> list[object]:
        """Results of ``cmds`` in order: a reply, or an exception (NodeDown / ResponseError);
        a command redirected (MOVED/ASK) is re-sent where the redirect says."""
        by_node: dict[str, tuple[redis.Redis, list[int]]] = {}
        for i, c in enumerate(cmds):
            name, client = self.route(c.hkey)
            by_node.setdefault(name, (client, []))[1].append(i)
        out: list[object] = [None] * len(cmds)

        def one(name: str, client: redis.Redis, idx: list[int]) -> None:
            replies = self._send(name, client, [cmds[i].wire for i in idx])
            for i, r in zip(idx, replies, strict=True):
                out[i] = r

        jobs = list(by_node.items())
        if len(jobs) == 1:
            one(jobs[0][0], *jobs[0][1])
        else:
            for f in [self._pool.submit(one, n, c, idx) for n, (c, idx) in jobs]:
                f.result()
        return self.follow(out, lambda i: cmds[i].wire)

    def read_nodes(self, jobs: list[tuple[str, redis.Redis, list, int]], read) -> list[list]:
        """Send each job (node name, client, wire pieces, number of commands) to its node, then
        read each node's replies in turn with ``read(job index, conn)``, which returns one
        result per command (see ``read_raw``). The nodes work at once, and no thread hand-off
        is paid (requests are small; replies wait in the sockets meanwhile). A node that is
        down gives NodeDown results; redirects are the caller's (``follow``)."""
        out: list[list] = [[]] * len(jobs)
        sent = [(j, self._begin(n, c, w, count)) for j, (n, c, w, count) in enumerate(jobs)]
        try:
            while sent:
                j, p = sent.pop(0)
                out[j] = p if isinstance(p, list) else self._finish(p, lambda c, j=j: read(j, c))
        finally:  # a read that raised leaves the other nodes' replies unread: drop them
            for _, p in sent:
                if not isinstance(p, list):
                    p.release(drop=True)
        return out

    def follow(self, results: list, wire_of) -> list:
        """``results`` with every MOVED/ASK redirect replaced by the reply of the node it names
        to the same command (``wire_of(i)``: the bytes of command i); the slot map is reloaded
        at most once per call, and a slot in migration can redirect more than once."""
        out = list(results)
        refreshed = False
        for i, r in enumerate(results):
            for _ in range(3):
                if not isinstance(r, (MovedError, AskError)) or self._rc is None:
                    break
                if isinstance(r, MovedError) and not refreshed:
                    self._rc.nodes_manager.initialize()  # the slot map changed: reload it once
                    self._forget_routes()
                    refreshed = True
                name = f"{r.host}:{r.port}"
                ask = [R.command("ASKING")] if isinstance(r, AskError) else []
                r = self._send(name, self._client(r.host, r.port), [*ask, wire_of(i)])[-1]
            out[i] = r
        return out

    def _client(self, host: str, port: int) -> redis.Redis:
        """A client of the node a redirect names (the slot map may not know it yet)."""
        name = f"{host}:{port}"
        with self._lock:
            c = self._redirect_clients.get(name)
            if c is None:
                c = self._redirect_clients[name] = self._node_client(host, port)
        return c

    def _send(self, name: str, client: redis.Redis, wires: list[bytes]) -> list:
        p = self._begin(name, client, wires, len(wires))
        return p if isinstance(p, list) else self._finish(p)

    def _begin(self, name: str, client: redis.Redis, wires: list, count: int) -> _Sent | list:
        """Send ``wires`` (``count`` commands) to a node: what ``_finish`` needs to read the
        replies, or (the node is down) one NodeDown per command. Holds one of the node's slots
        until ``_finish``."""
        slots = self._slots.get(name)
        if slots is None:
            with self._lock:
                slots = self._slots.get(name)
                if slots is None:
                    slots = self._slots[name] = queue.SimpleQueue()
                    for _ in range(self._per_node):
                        slots.put(None)
        conn = slots.get()
        h = self._health.setdefault(name, _Health())
        if h.down and time.monotonic() < h.retry_at:
            slots.put(conn)
            _failed.inc(node=name)
            err = NodeDown(f"Redis VDB node {name} is down (retrying in the background)")
            return [err] * count
        try:
            if conn is None:
                conn = _connection(client.connection_pool)
            elif _stale(conn):
                conn.disconnect()  # the send below connects it again
            conn.send_packed_command([b"".join(wires)], check_health=False)
        except BaseException as e:
            if conn is not None:
                conn.disconnect()
            slots.put(conn)
            if not isinstance(e, NODE_ERRORS):
                raise
            return self._down(name, h, e, count)
        return _Sent(name, conn, slots, h, count)

    def _finish(self, sent: _Sent, read=None) -> list:
        """The replies of what ``_begin`` sent (``read(conn)`` reads them itself if given)."""
        conn, h = sent.conn, sent.health
        try:
            if read is not None and _parser_idle(conn):
                replies = read(conn)
            else:
                replies = []
                for _ in range(sent.count):
                    try:
                        replies.append(conn.read_response())
                    except ResponseError as e:
                        replies.append(e)
        except NODE_ERRORS as e:
            conn.disconnect()
            return self._down(sent.name, h, e, sent.count)
        finally:
            sent.release()
        if h.down:
            with h.lock:
                if h.down:
                    h.down, h.backoff = False, 0.0
                    log.warning("Redis VDB node %s is back", sent.name)
        return replies

    def _down(self, name: str, h: _Health, e: Exception, n: int) -> list:
        self._mark_down(name, h, e)
        _failed.inc(node=name)
        return [NodeDown(f"Redis VDB node {name}: {type(e).__name__}: {e}")] * n

    def _mark_down(self, name: str, h: _Health, e: Exception) -> None:
        self._forget_routes()  # routes are looked up again (from redis-py's slot map)
        with h.lock:
            first, lo_hi = not h.down, self.backoff
            h.backoff = lo_hi[0] if first else min(lo_hi[1], h.backoff * 2)
            h.down, h.retry_at = True, time.monotonic() + h.backoff
        if first:
            _outages.inc(node=name)
            log.warning(
                "Redis VDB node %s is down (%s: %s); its keys fall through to the next tier "
                "until it answers again",
                name,
                type(e).__name__,
                e,
            )

    def node_down(self, name: str) -> bool:
        """Whether this process currently considers the node ``host:port`` down."""
        h = self._health.get(name)
        return bool(h and h.down)

    def clients(self) -> list[redis.Redis]:
        """A client of each primary node."""
        if self._single is not None:
            return [self._single]
        return [n.redis_connection for n in self._rc.get_primaries()]

    def close(self) -> None:
        """Close every connection."""
        self._pool.shutdown(wait=True)
        for slots in self._slots.values():
            while not slots.empty():
                c = slots.get_nowait()
                if c is not None:
                    c.disconnect()
        self._slots.clear()
        if self._single is not None:
            self._single.close()
        if self._rc is not None:
            self._rc.close()
        for c in self._redirect_clients.values():
            c.close()


def _parser_idle(conn) -> bool:
    """Whether the connection's reply parser holds no bytes already read from its socket, so
    the next bytes on the socket are the next reply (always so between whole replies; checked
    rather than assumed)."""
    if getattr(conn, "_sock", None) is None:
        return False
    parser = conn._parser
    reader = getattr(parser, "_reader", None)
    if reader is not None:  # hiredis
        return not reader.has_data()
    buf = getattr(parser, "_buffer", None)
    return buf is None or not buf.unread_bytes()


def _stale(conn) -> bool:
    """Whether an idle connection's socket is readable: the server closed it (it restarted, or
    dropped an idle client) or sent what no command asked for. Such a connection must connect
    again before its next command, as redis-py's pool checks when it hands one out."""
    sock = getattr(conn, "_sock", None)
    return sock is not None and bool(select.select([sock], [], [], 0)[0])


def read_raw(conn, size: int, consume) -> None:
    """Read replies from ``conn``'s socket into a buffer of ``size`` bytes, calling
    ``consume(buf, end)`` after each read until it returns True. A connection error or
    timeout raises as redis-py's own reads would (the caller marks the node down)."""
    buf = np.empty(size, np.uint8)
    view = memoryview(buf)
    sock = conn._sock
    end = 0
    try:
        while True:
            if end == size:
                raise redis.ConnectionError("reply larger than the replies asked for")
            n = sock.recv_into(view[end:])
            if n == 0:
                raise redis.ConnectionError("connection closed by the server")
            end += n
            if consume(buf, end):
                return
    except BaseException:
        conn.disconnect()  # a half-read reply leaves the connection unusable
        raise


def _connection(pool: redis.ConnectionPool):
    try:
        return pool.get_connection()
    except TypeError:  # redis-py 5 wants a command name
        return pool.get_connection("_")


def host_port(a: str) -> tuple[str, int]:
    hp = split_address(a)
    if hp is None:
        raise ConfigError("volatile_db.address", a, "'host:port' entries (port 1-65535)")
    return hp


def _names(addresses: list[tuple[str, int]]) -> str:
    return ",".join(f"{h}:{p}" for h, p in addresses)
