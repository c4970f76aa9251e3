"""The stub watchdog's reading of a server's children, over real processes: a "server" whose
children run under the stub's name and command line (``<stub> <repo>/<model>/1/model.py ...
<instance>``), and a local HTTP endpoint that records the configuration and load requests the
watchdog sends (the reload itself on a real Triton is tested in tests/triton/test_serving.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest

from hps_core.watchdog import STUB, ZOMBIE_CONFIRM_S, Reload, StubWatchdog

SERVER = r"""
import os, subprocess, sys, time
repo, exit_after = sys.argv[1], float(sys.argv[2])

def stub(model):
    argv = [sys.argv[3], f"{repo}/{model}/1/model.py", "0.5", *"abcde", f"{model}_0_0"]
    return subprocess.Popen(argv, executable=sys.executable)

died = stub("died")  # exits on its own and is never waited for: stays a zombie
stopped = stub("stopped")  # exits, and is reaped 0.3 s later, as Triton reaps a stub it stopped
os.waitid(os.P_PID, stopped.pid, os.WEXITED | os.WNOWAIT)
time.sleep(0.3)
stopped.wait()
time.sleep(exit_after)
"""


class Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str]] = []

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's name
        self.seen.append(("GET", self.path))
        self._answer(json.dumps({"name": self.path.split("/")[3]}).encode())

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append(("POST", self.path))
        self._answer(b"")

    def log_message(self, *args):
        pass


def _server(tmp_path, exit_after: float) -> subprocess.Popen:
    for model in ("died", "stopped"):
        (tmp_path / model / "1").mkdir(parents=True)
        (tmp_path / model / "1" / "model.py").write_text(
            "import sys, time\ntime.sleep(float(sys.argv[1]))\n"
        )
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    return subprocess.Popen([sys.executable, script, tmp_path, str(exit_after), STUB])


def _watch(proc: subprocess.Popen, url: str, seconds: float) -> StubWatchdog:
    watchdog = StubWatchdog(proc.pid, url, interval=0.05).start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    watchdog.stop()
    return watchdog


@pytest.fixture
def endpoint():
    Recorder.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_stub_that_died_is_reloaded_and_one_that_was_stopped_is_not(tmp_path, endpoint):
    """A scan that caught a stopped stub in the moment before Triton reaped it reloaded its
    model: a model being unloaded came back, and a stopping server's models were "reloaded"."""
    proc = _server(tmp_path, exit_after=60)
    try:
        watchdog = _watch(proc, endpoint, 3 + ZOMBIE_CONFIRM_S)
        died = [c.pid for c in psutil.Process(proc.pid).children()]
    finally:
        proc.kill()
        proc.wait()
    assert watchdog.reloads == [Reload("died", "died_0_0", died[0], True)]
    assert Recorder.seen == [
        ("GET", "/v2/models/died/config"),
        ("POST", "/v2/repository/models/died/load"),
    ]


def test_a_reload_that_fails_because_the_server_exits_is_no_failure(tmp_path):
    """A stub that dies as its server stops: the reload finds the endpoint closed. That was
    counted a failed reload (``hps watch`` ended with "1 failed" after a clean stop)."""
    proc = _server(tmp_path, exit_after=2 + ZOMBIE_CONFIRM_S)
    try:
        watchdog = _watch(proc, "127.0.0.1:9", 8 + ZOMBIE_CONFIRM_S)  # nothing listens there
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
    assert watchdog.reloads == []
