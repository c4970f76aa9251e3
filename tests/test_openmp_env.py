"""How numba's OpenMP workers wait: set by importing hps_core unless the user chose."""

import os
import subprocess
import sys

import pytest

from hps_core import OMP_SPIN_COUNT, quiet_openmp

SHOW = (
    "import os, hps_core; "
    "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
)


def imported_env(**set_vars: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(set_vars)
    out = subprocess.run(
        [sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_import_sets_passive_with_a_short_spin():
    assert imported_env() == ["PASSIVE", OMP_SPIN_COUNT]


@pytest.mark.parametrize(
    "given, expected",
    [
        ({"OMP_WAIT_POLICY": "ACTIVE"}, ["ACTIVE", "None"]),  # the user's policy, libgomp's spin
        ({"OMP_WAIT_POLICY": "PASSIVE"}, ["PASSIVE", "None"]),
        ({"GOMP_SPINCOUNT": "5000"}, ["PASSIVE", "5000"]),
    ],
)
def test_a_value_the_user_set_wins(given, expected):
    assert imported_env(**given) == expected


def test_quiet_openmp_on_a_mapping():
    env: dict[str, str] = {"PATH": "/bin"}
    quiet_openmp(env)
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": OMP_SPIN_COUNT}
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    quiet_openmp(mine)
    assert mine == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_triton_server_processes_get_it(monkeypatch, tmp_path):
    from hps_core.launcher import TritonServer

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    env = TritonServer(tmp_path).environment()
    assert (env["OMP_WAIT_POLICY"], env["GOMP_SPINCOUNT"]) == ("PASSIVE", OMP_SPIN_COUNT)
