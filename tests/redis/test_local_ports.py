"""Ports for a local Redis Cluster: each node also needs its port + 10000 (the cluster bus)."""

import socket
import subprocess
from pathlib import Path

import pytest

from hps_core.launcher import CLUSTER_BUS_OFFSET, free_ports

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "redis" / "redis-local.sh"


def test_cluster_ports_leave_room_for_the_bus_port():
    ports = free_ports(40, redis_cluster=True)
    assert len(set(ports)) == 40
    for p in ports:
        assert p + CLUSTER_BUS_OFFSET <= 65535
        for q in (p, p + CLUSTER_BUS_OFFSET):
            with socket.socket() as s:
                s.bind(("127.0.0.1", q))  # free


@pytest.mark.parametrize("bad", ["55536", "60000", "7000x"])
def test_script_refuses_a_cluster_port_without_a_bus_port(tmp_path, bad):
    r = subprocess.run(
        [str(SCRIPT), "cluster", str(tmp_path), bad, "20001", "20002"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert f"cluster port {bad}: must be a number <= 55535" in r.stderr
    assert not list(tmp_path.iterdir())  # nothing was started
