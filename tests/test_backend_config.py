"""Where the hps backend finds its config: the model parameter, HugeCTR's server flag
``--backend-config=hps,ps=<path>`` (read from the server's command line), or env HPS_CONFIG."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from three_tables import DEFAULTS, config, write_tables

from hps_core.errors import ConfigError
from hps_core.serving import EmbeddingService, backend_config, server_backend_config


def test_backend_config_takes_the_hps_settings_of_a_command_line():
    argv = [
        "tritonserver",
        "--model-repository=/models",
        "--backend-config=python,shm-default-byte-size=16777216",
        "--backend-config=hps,ps=/models/ps.json",
        "--backend-config",  # the flag and its value as two arguments
        "hps,extra=a=b,c",  # a value may hold '=' and ','
        "--backend-config=default-max-batch-size=8",  # no backend name: every backend's
        "--backend-config=hpsx,ps=/not/this.json",
        "--load-model=hps_embedding",
    ]
    assert backend_config(argv) == {
        "ps": "/models/ps.json",
        "extra": "a=b,c",
        "default-max-batch-size": "8",
    }
    assert backend_config(argv, "python") == {
        "shm-default-byte-size": "16777216",
        "default-max-batch-size": "8",
    }
    assert backend_config(["tritonserver", "--backend-config"]) == {}


def test_server_backend_config_reads_a_running_process(tmp_path):
    """A real process with HugeCTR's flag on its command line: its ``ps`` comes back, made
    absolute against that process's working directory."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "--backend-config=hps,ps=c/h.json"],
        cwd=tmp_path,
    )
    try:
        # Until the child has exec'd, its command line is still pytest's.
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        deadline = time.monotonic() + 10
        while b"--backend-config" not in cmdline.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server_backend_config(pid=proc.pid) == {"ps": str(tmp_path / "c" / "h.json")}
    finally:
        proc.kill()
        proc.wait()
    assert server_backend_config(pid=proc.pid) == {}  # gone: nothing to read


def test_the_config_comes_from_the_parameter_the_server_flag_or_the_environment(
    tmp_path, monkeypatch
):
    rng = np.random.default_rng(8)
    tables = write_tables(tmp_path, rng, lambda r: r.choice(2**40, 300, replace=False) - 2**39)
    paths = {}
    for name in ("param", "server", "env"):
        paths[name] = tmp_path / f"{name}.json"
        cfg = config(tmp_path, name, {"type": "hash_map"}, f"rocks_{name}")
        paths[name].write_text(json.dumps(cfg))
    monkeypatch.setenv("HPS_CONFIG", str(paths["env"]))
    cases = [
        ({"config": str(paths["param"])}, {"ps": str(paths["server"])}, "param"),
        ({}, {"ps": str(paths["server"])}, "server"),
        ({}, {}, "env"),
    ]
    keys = np.concatenate([tables[0][0][:5], [7, -(2**63)]])  # present, then absent keys
    want = np.full((len(keys), 8), DEFAULTS[0], np.float32)
    want[:5] = tables[0][1][:5]
    for params, server, model in cases:
        svc = EmbeddingService.from_parameters(params, server=server)
        try:
            assert svc.model == model
            counts = np.array([len(keys), 0, 0], np.int32)
            got = svc.run_hps(keys, counts).reshape(len(keys), 8)
            np.testing.assert_array_equal(got, want)
        finally:
            svc.close()
    monkeypatch.delenv("HPS_CONFIG")
    with pytest.raises(ConfigError, match="backend-config=hps,ps="):
        EmbeddingService.from_parameters({}, server={})
