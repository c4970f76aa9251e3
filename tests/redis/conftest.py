"""Real redis-server processes on free loopback ports, started by deploy/redis/redis-local.sh."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import redis

from hps_core.launcher import free_ports

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "redis" / "redis-local.sh"


class LocalRedis:
    """A standalone server or a cluster under ``root``; stopped by the fixture in any case."""

    def __init__(self, root: Path, ports: list[int], password: str = "", tls: bool = False):
        if shutil.which("redis-server") is None:
            raise RuntimeError(
                "redis-server is not installed: run `make install` (apt redis-server)"
            )
        self.root, self.ports, self.password, self.tls = root, ports, password, tls
        self.cluster = len(ports) > 1
        mode = ("cluster" if self.cluster else "standalone") + ("-tls" if tls else "")
        self._sh(mode, str(root), *map(str, ports))

    def tls_file(self, name: str) -> str:
        """A file the TLS server's test CA made (ca.crt, client.crt, client.key...)."""
        return str(self.root / "tls" / name)

    @property
    def address(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def _sh(self, *args: str) -> None:
        env = dict(os.environ, REDIS_PASSWORD=self.password)
        subprocess.run([str(SCRIPT), *args], check=True, capture_output=True, timeout=60, env=env)

    def kill(self, port: int) -> None:
        self._sh("kill-node", str(self.root), str(port))

    def start(self, port: int) -> None:
        self._sh("start-node", str(self.root), str(port))

    def flush(self) -> None:
        tls = {}
        if self.tls:
            tls = dict(
                ssl=True,
                ssl_ca_certs=self.tls_file("ca.crt"),
                ssl_certfile=self.tls_file("client.crt"),
                ssl_keyfile=self.tls_file("client.key"),
            )
        for p in self.ports:
            redis.Redis(port=p, password=self.password or None, **tls).flushall()

    def stop(self) -> None:
        subprocess.run([str(SCRIPT), "stop", str(self.root)], capture_output=True, timeout=60)


def _start(tmp_path_factory, n: int, password: str = "", tls: bool = False):
    root = tmp_path_factory.mktemp("redis")
    server = None
    try:
        server = LocalRedis(root, free_ports(n, redis_cluster=True), password, tls)
        yield server
    finally:
        if server is not None:
            server.stop()
        else:
            subprocess.run([str(SCRIPT), "stop", str(root)], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def redis_standalone(tmp_path_factory):
    yield from _start(tmp_path_factory, 1)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    yield from _start(tmp_path_factory, 3)


@pytest.fixture(params=["standalone", "cluster"])
def redis_any(request):
    """Each test runs once against a standalone server and once against a 3-node cluster."""
    server = request.getfixturevalue(f"redis_{request.param}")
    server.flush()
    return server


@pytest.fixture
def redis_cluster_own(tmp_path_factory):
    """A cluster of its own, for tests that kill nodes."""
    yield from _start(tmp_path_factory, 3)


@pytest.fixture
def redis_with_password(tmp_path_factory):
    """A standalone server that requires AUTH (password "s3cret" for the default user)."""
    yield from _start(tmp_path_factory, 1, "s3cret")


@pytest.fixture
def redis_tls(tmp_path_factory):
    """A standalone server that speaks only TLS and requires a client certificate (a test CA
    made by redis-local.sh standalone-tls)."""
    yield from _start(tmp_path_factory, 1, tls=True)


@pytest.fixture
def redis_cluster_tls(tmp_path_factory):
    """A 3-node cluster that speaks only TLS, to clients and on its bus (redis-local.sh
    cluster-tls), with the same kind of test CA."""
    yield from _start(tmp_path_factory, 3, tls=True)


@pytest.fixture
def redis_standalone_own(tmp_path_factory):
    """A standalone server of its own, for tests that kill it."""
    yield from _start(tmp_path_factory, 1)
