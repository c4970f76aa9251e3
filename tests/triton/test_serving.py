"""A real tritonserver (pip build) with our backends, a real client over HTTP and gRPC.

Every answer is compared with numpy references built from the sparse files and the ONNX
weights, or with the in-process ``HPS.lookup`` of the same tiers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from hps_client import HPSClient
from hps_client.metrics import scrape, total
from small_tmpfs import in_small_tmpfs

from hps_core.bench.e2e import gpu_present
from hps_core.config import load_config
from hps_core.dense import dense_forward, load_dense_weights
from hps_core.hps import HPS
from hps_core.launcher import TritonServer
from hps_core.model_io import SparseTable
from hps_core.repo import preload, read_spec, release_shared, write_repository
from hps_core.serving import serving_config
from hps_core.watchdog import STUB

pytestmark = pytest.mark.triton

PROTOCOLS = ["http", "grpc"]


class FileTables:
    """The model's tables straight from the sparse files: the reference for every lookup."""

    def __init__(self, config_path):
        self.model = load_config(config_path).models[0]
        self.tables = []
        for t, path in enumerate(self.model.sparse_files):
            with SparseTable.open(path, self.model.embedding_vecsize_per_table[t]) as f:
                keys, vecs = f.read_all()
            order = np.argsort(keys)
            self.tables.append((keys[order], np.array(vecs[order])))

    def lookup(self, t: int, keys: np.ndarray) -> np.ndarray:
        k, v = self.tables[t]
        pos = np.clip(np.searchsorted(k, keys), 0, len(k) - 1)
        hit = k[pos] == keys
        out = np.full(
            (len(keys), v.shape[1]), self.model.default_value_for_each_table[t], np.float32
        )
        out[hit] = v[pos[hit]]
        return out

    def embed(self, cat: np.ndarray) -> np.ndarray:
        return np.concatenate([self.lookup(t, cat[:, t]) for t in range(cat.shape[1])], axis=1)

    def sample_cat(self, rng, batch: int, absent: float = 0.1) -> np.ndarray:
        """[batch, slots] keys: present keys (Zipf-ish repeats) and some absent ones."""
        cols = []
        for k, _ in self.tables:
            idx = np.minimum(rng.zipf(1.3, batch) - 1, len(k) - 1)
            col = k[idx].copy()
            miss = rng.random(batch) < absent
            col[miss] = rng.integers(-(2**62), 2**62, int(miss.sum()))
            cols.append(col)
        return np.stack(cols, axis=1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    spec = write_repository(root, rows=60_000, dim=8, instances=2, max_batch_size=512)
    preload(spec.config)
    # hps_embedding as a HugeCTR deployment has it: no config parameter, the server's
    # --backend-config=hps,ps=<hps.json> names the file (test_hps_io_equals_in_process_lookup)
    pbtxt = root / "hps_embedding" / "config.pbtxt"
    lines = pbtxt.read_text().splitlines(keepends=True)
    pbtxt.write_text("".join(x for x in lines if 'key: "config"' not in x))
    server = TritonServer(
        root,
        models=[spec.ensemble, "hps_embedding"],
        args=[f"--backend-config=hps,ps={Path(spec.config).resolve()}"],
    )
    try:
        server.start(timeout=240)
        yield spec, server
    finally:
        server.stop()
        release_shared(spec.config)


@pytest.fixture(scope="module")
def files(served):
    return FileTables(served[0].config)


@pytest.fixture(scope="module")
def weights(served):
    spec = served[0]
    return load_dense_weights(spec.root / spec.dense / "1" / "model.onnx")


def client(server: TritonServer, protocol: str) -> HPSClient:
    return HPSClient(server.http_url if protocol == "http" else server.grpc_url, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("batch", [1, 7, 512])
def test_ensemble_equals_numpy_forward(served, files, weights, protocol, batch):
    spec, server = served
    rng = np.random.default_rng(batch)
    cat = files.sample_cat(rng, batch)
    dense = rng.random((batch, spec.num_dense), dtype=np.float32) * 3
    with client(server, protocol) as c:
        prob = c.predict(dense, cat, model=spec.ensemble)
        emb = c.embed(cat, model=spec.embedding)
    want_emb = files.embed(cat)
    np.testing.assert_array_equal(emb, want_emb)
    want = dense_forward(weights, dense, want_emb)
    assert prob.shape == (batch, 1)
    assert np.max(np.abs(prob - want)) <= 1e-5


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_hps_io_equals_in_process_lookup(served, files, protocol):
    """HugeCTR's HPS backend I/O, served from the hps.json the server's command line names."""
    spec, server = served
    assert 'key: "config"' not in (spec.root / "hps_embedding" / "config.pbtxt").read_text()
    rng = np.random.default_rng(5)
    cfg, model = serving_config(spec.config, spec.model, preloaded=True)
    counts = rng.integers(0, 40, spec.slots).astype(np.int32)
    counts[3] = 0  # a table with no keys
    per_table = [files.sample_cat(rng, int(n))[:, t] for t, n in enumerate(counts)]
    keys = np.concatenate(per_table)
    with client(server, protocol) as c:
        got = c.lookup(keys, counts)
    with HPS(cfg) as hps:
        want = np.concatenate([hps.lookup(k, model, t).ravel() for t, k in enumerate(per_table)])
    from_files = np.concatenate([files.lookup(t, k).ravel() for t, k in enumerate(per_table)])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, from_files)
    with client(server, protocol) as c:  # as HugeCTR's backend: [1, n x dim], not flat
        raw = c.infer("hps_embedding", {"KEYS": keys[None], "NUMKEYS": counts[None]}, "OUTPUT0")
    assert raw.shape == (1, len(from_files))
    np.testing.assert_array_equal(raw[0], from_files)
    # a batch of two rows is not HugeCTR's layout: a clear error, not a wrong answer
    with client(server, protocol) as c:
        two = {"KEYS": np.stack([keys, keys]), "NUMKEYS": np.stack([counts, counts])}
        with pytest.raises(Exception, match="KEYS"):
            c.infer("hps_embedding", two, "OUTPUT0")


def _bad_requests(spec):
    ok_keys = np.arange(5, dtype=np.int64)
    counts = np.zeros(spec.slots, np.int32)
    counts[0] = 5
    neg = counts.copy()
    neg[0], neg[1] = 7, -2
    yield "sum", "hps_embedding", {"KEYS": ok_keys, "NUMKEYS": counts + 1}, "NUMKEYS"
    yield "negative", "hps_embedding", {"KEYS": ok_keys, "NUMKEYS": neg}, "NUMKEYS"
    yield (
        "tables",
        "hps_embedding",
        {"KEYS": ok_keys, "NUMKEYS": np.array([5], np.int32)},
        "NUMKEYS",
    )
    yield "unknown table", "hps_embedding", {"KEYS": ok_keys, "NUMKEYS": np.append(counts, 0).astype(np.int32)}, "NUMKEYS"  # fmt: skip
    yield "dtype", "hps_embedding", {"KEYS": ok_keys.astype(np.float32)[None], "NUMKEYS": counts[None]}, "KEYS"  # fmt: skip
    big = np.zeros(spec.max_batch_size * spec.slots + 1, np.int64)
    many = np.zeros(spec.slots, np.int32)
    many[0] = len(big)
    yield "too many keys", "hps_embedding", {"KEYS": big, "NUMKEYS": many}, "KEYS"
    yield "shape", spec.embedding, {"CAT": np.zeros((2, spec.slots - 1), np.int64)}, "CAT"
    yield "cat dtype", spec.embedding, {"CAT": np.zeros((2, spec.slots), np.float32)}, "CAT"
    cat = np.zeros((3, spec.slots), np.int64)
    for what, value, field in (
        ("NaN", np.nan, "DENSE"),
        ("infinite", -np.inf, "DENSE"),
        ("overflows the network", 3e38, "PROB"),  # finite, but not for the dense layers
    ):
        dense = np.ones((3, spec.num_dense), np.float32)
        dense[1] = value  # a whole row: 3e38 in every feature sums past the float range
        yield what, spec.ensemble, {"DENSE": dense, "CAT": cat}, field


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_requests_get_invalid_arg_and_the_server_goes_on(served, files, weights, protocol):
    spec, server = served
    rng = np.random.default_rng(9)
    cat = files.sample_cat(rng, 4)
    with client(server, protocol) as c:
        for what, model, inputs, field in _bad_requests(spec):
            if model == "hps_embedding":  # HugeCTR's [1, n] layout, so only our checks can object
                inputs = {k: v.reshape(1, -1) for k, v in inputs.items()}
            output = {"hps_embedding": "OUTPUT0", spec.embedding: "EMB"}.get(model, "PROB")
            with pytest.raises(Exception) as err:
                c.infer(model, inputs, output)
            text = str(err.value)
            assert field in text, (what, text)
            if protocol == "grpc":
                assert "INVALID_ARGUMENT" in text, (what, text)
            else:
                assert "[400]" in text or "400" in text, (what, text)
            np.testing.assert_array_equal(c.embed(cat, model=spec.embedding), files.embed(cat))
        dense = rng.random((4, spec.num_dense), dtype=np.float32)
        want = dense_forward(weights, dense, files.embed(cat))
        assert np.max(np.abs(c.predict(dense, cat, model=spec.ensemble) - want)) <= 1e-5


def test_load_and_unload_at_run_time(served, files):
    spec, server = served
    rng = np.random.default_rng(11)
    keys = files.sample_cat(rng, 6)[:, 0]
    counts = np.zeros(spec.slots, np.int32)
    counts[0] = len(keys)
    with client(server, "http") as c:
        c.unload_model("hps_embedding")
        deadline = time.monotonic() + 60
        while c.is_model_ready("hps_embedding") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not c.is_model_ready("hps_embedding")
        with pytest.raises(Exception, match="hps_embedding"):
            c.lookup(keys, counts)
        c.load_model("hps_embedding")
        assert c.is_model_ready("hps_embedding")
        np.testing.assert_array_equal(c.lookup(keys, counts), files.lookup(0, keys).ravel())


def test_metrics_count_the_keys_of_each_table(served, files):
    spec, server = served
    rng = np.random.default_rng(13)
    keys = np.unique(files.sample_cat(rng, 50)[:, 2])
    counts = np.zeros(spec.slots, np.int32)
    counts[2] = len(keys)

    table = load_config(spec.config).models[0].embedding_table_names[2]
    labels = {"model": "hps_embedding", "table": table}
    before = total(scrape(server.metrics_url), "hps_keys_total", **labels)
    fused_before = total(
        scrape(server.metrics_url), "hps_lookup_seconds_total", **labels, level="fused"
    )
    with client(server, "http") as c:
        c.lookup(keys, counts)
    deadline = time.monotonic() + 10  # the backend publishes its metrics every 0.5 s
    while True:
        after = total(
            scrape(server.metrics_url), "hps_keys_total", model="hps_embedding", table=table
        )
        if after != before or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after - before == len(keys)  # unique keys, summed over l1/vdb/pdb/default
    if gpu_present() is None:  # on a CPU all tables go in one fused call, timed as "fused"
        fused = total(
            scrape(server.metrics_url), "hps_lookup_seconds_total", **labels, level="fused"
        )
        assert fused > fused_before


def test_concurrent_clients_over_both_protocols(served, files, weights):
    """32 clients for 30 s against 2 instances per model: no error, every answer checked."""
    spec, server = served
    stop = time.monotonic() + 30
    errors: list[str] = []
    done = [0] * 32

    def worker(i: int) -> None:
        rng = np.random.default_rng(100 + i)
        protocol = PROTOCOLS[i % 2]
        try:
            with client(server, protocol) as c:
                while time.monotonic() < stop and not errors:
                    batch = int(rng.integers(1, 64))
                    cat = files.sample_cat(rng, batch)
                    dense = rng.random((batch, spec.num_dense), dtype=np.float32)
                    prob = c.predict(dense, cat, model=spec.ensemble)
                    want = dense_forward(weights, dense, files.embed(cat))
                    if prob.shape != (batch, 1) or np.max(np.abs(prob - want)) > 1e-5:
                        errors.append(f"client {i}: wrong answer for batch {batch}")
                    done[i] += 1
        except Exception as e:
            errors.append(f"client {i} ({protocol}): {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:5]
    assert all(n > 0 for n in done), done


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_async_client_equals_numpy_forward(served, files, weights, protocol):
    import asyncio

    from hps_client import AsyncHPSClient

    spec, server = served
    rng = np.random.default_rng(21)
    cats = [files.sample_cat(rng, n) for n in (1, 9, 40)]
    denses = [rng.random((len(c), spec.num_dense), dtype=np.float32) for c in cats]

    async def run():
        c = AsyncHPSClient(server.http_url if protocol == "http" else server.grpc_url, protocol)
        try:  # concurrent requests on one client
            return await asyncio.gather(
                *(c.predict(d, k, model=spec.ensemble) for d, k in zip(denses, cats, strict=True))
            )
        finally:
            await c.close()

    for prob, dense, cat in zip(asyncio.run(run()), denses, cats, strict=True):
        assert np.max(np.abs(prob - dense_forward(weights, dense, files.embed(cat)))) <= 1e-5


def test_criteo_tsv_through_the_client_command(served, files, weights, tmp_path):
    """Criteo lines (label, 13 integers, 26 hex) -> predictions, checked by --check too."""
    import subprocess
    import sys

    from hps_client.criteo import CriteoFormatError, parse_criteo_lines

    spec, server = served
    rng = np.random.default_rng(23)
    cat = files.sample_cat(rng, 6)
    cat[0, 4] = 0  # an empty field reads as key 0
    ints = rng.integers(-3, 5000, (6, 13))
    lines = []
    for i in range(6):
        dense = ["" if (i == 2 and j == 5) else str(v) for j, v in enumerate(ints[i])]
        hexes = ["" if k == 0 else format(int(k) & (2**64 - 1), "x") for k in cat[i]]
        lines.append("\t".join([str(i % 2), *dense, *hexes]))
    path = tmp_path / "day.tsv"
    path.write_text("\n".join(lines) + "\n")

    labels, dense, got_cat = parse_criteo_lines(lines)
    ints_clean = ints.astype(np.float64)
    ints_clean[2, 5] = 0
    np.testing.assert_array_equal(labels, np.arange(6) % 2)
    np.testing.assert_allclose(dense, np.log1p(np.maximum(ints_clean, 0)), rtol=1e-6)
    np.testing.assert_array_equal(got_cat, cat)
    with pytest.raises(CriteoFormatError, match="line 1: C3"):
        parse_criteo_lines(["\t".join(["1", *["0"] * 13, "a", "b", "xyz", *["c"] * 23])])

    exe = str(Path(sys.executable).parent / "hps-client")
    r = subprocess.run(
        [exe, "predict", str(path), "--url", server.grpc_url, "--protocol", "grpc",
         "--model", spec.ensemble, "--check", str(spec.root)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    printed = [float(line.split("PROB")[1]) for line in r.stdout.splitlines() if "PROB" in line]
    want = dense_forward(weights, dense, files.embed(cat))[:, 0]
    np.testing.assert_allclose(printed, want, atol=1e-5)


def _stub_pids(server: TritonServer, model: str) -> list[int]:
    """Live stub processes of a model's instances (children of the server)."""
    pids = []
    for child in psutil.Process(server.proc.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            argv = child.cmdline()
            if argv and argv[0].endswith(STUB) and Path(argv[1]).parent.parent.name == model:
                pids.append(child.pid)
    return pids


def _byte_size_wrap(server: TritonServer) -> tuple[int, str]:
    """KEYS of [1, 2^61] INT64 with an empty payload: 2^61 x 8 bytes wraps to 0, so Triton 2.51
    passes it on, and the instance's stub dies building the array, before our code runs."""
    header = json.dumps({
        "inputs": [
            {"name": "KEYS", "shape": [1, 2**61], "datatype": "INT64",
             "parameters": {"binary_data_size": 0}},
            {"name": "NUMKEYS", "shape": [1, 1], "datatype": "INT32",
             "parameters": {"binary_data_size": 4}},
        ],
        "outputs": [{"name": "OUTPUT0"}],
    }).encode()  # fmt: skip
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/hps_embedding/infer",
        data=header + np.array([1], np.int32).tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_model_whose_stub_dies_is_reloaded(served, files, weights):
    """Triton 2.51 leaves a dead stub dead and its model ready, so the launcher's watchdog
    reloads the model. Two deaths: the byte-size-wrap request (an hps_embedding instance) and a
    SIGKILL, as the OOM killer sends (a dlrm_embedding instance). Afterwards every request, to
    either instance of each model, equals the references."""
    spec, server = served
    watchdog = server.watchdog
    assert watchdog is not None
    assert watchdog.reloads == []  # the unloads and loads of the tests before were not deaths
    with client(server, "http") as c:
        c.load_model("hps_embedding")  # test_load_and_unload_at_run_time may have left it out
    deadline = time.monotonic() + 10
    while len(_stub_pids(server, "hps_embedding")) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2 * watchdog.interval)  # the watchdog notes the stubs
    code, text = _byte_size_wrap(server)
    assert code == 500 and "is not healthy" in text, (code, text)
    os.kill(_stub_pids(server, spec.embedding)[0], signal.SIGKILL)
    deadline = time.monotonic() + 180
    while len(watchdog.reloads) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sorted(r.model for r in watchdog.reloads) == sorted(["hps_embedding", spec.embedding])
    assert all(r.ok for r in watchdog.reloads), watchdog.reloads
    rng = np.random.default_rng(21)
    with client(server, "http") as c:
        for _ in range(8):  # two instances each: requests reach both
            cat = files.sample_cat(rng, 16)
            dense = rng.random((16, spec.num_dense), dtype=np.float32)
            want_emb = files.embed(cat)
            np.testing.assert_array_equal(c.embed(cat, model=spec.embedding), want_emb)
            want = dense_forward(weights, dense, want_emb)
            assert np.max(np.abs(c.predict(dense, cat, model=spec.ensemble) - want)) <= 1e-5
            counts = np.zeros(spec.slots, np.int32)
            counts[2] = 16
            np.testing.assert_array_equal(
                c.lookup(cat[:, 2], counts), files.lookup(2, cat[:, 2]).ravel()
            )


def test_hps_watch_reloads_the_models_of_a_server_started_elsewhere(tmp_path):
    """``hps watch --pid $$``, as the container entrypoint runs it: the pid is a shell that
    later execs tritonserver. A SIGKILLed stub's model is reloaded, lookups equal the files
    again, and the watch ends when the server does."""
    spec = write_repository(tmp_path / "repo", rows=2_000, dim=4, instances=1)
    preload(spec.config)
    server = TritonServer(tmp_path / "repo", models=["hps_embedding"], watchdog=None)
    cmd = server.command()
    watch = None
    try:
        server.proc = subprocess.Popen(
            ["sh", "-c", 'sleep 2; exec "$0" "$@"', *cmd], env=server.environment(),
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        hps = Path(sys.executable).parent / "hps"
        watch = subprocess.Popen(
            [hps, "watch", "--pid", str(server.proc.pid), "--url", server.http_url,
             "--interval", "0.2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 240
        while not (server.ready() and _stub_pids(server, "hps_embedding")):
            assert time.monotonic() < deadline and server.proc.poll() is None
            time.sleep(0.2)
        keys = np.array([1, 2, 3, -5, 2**62], np.int64)
        counts = np.zeros(spec.slots, np.int32)
        counts[1] = len(keys)
        want = FileTables(spec.config).lookup(1, keys).ravel()
        time.sleep(1)  # the watch notes the stub
        os.kill(_stub_pids(server, "hps_embedding")[0], signal.SIGKILL)
        got, deadline = None, time.monotonic() + 120
        with client(server, "http") as c:
            while got is None and time.monotonic() < deadline:
                try:
                    got = c.lookup(keys, counts)
                except Exception as e:  # the dead instance, until the reload replaces it
                    assert "is not healthy" in str(e), e
                    time.sleep(0.5)
        assert got is not None, "the model was not reloaded"
        np.testing.assert_array_equal(got, want)
    finally:
        server.stop()
        release_shared(spec.config)
        if watch is not None:
            out = watch.communicate(timeout=30)[0]
    assert watch.returncode == 0, out
    assert "reloaded after the death of instance hps_embedding_0_0" in out, out
    assert "exited: 1 reloads, 0 failed" in out, out


def test_hps_serve_restarts_a_dead_server_then_gives_up_and_says_why(tmp_path):
    """`hps serve` writes a repository and serves it (lookups equal the files). When its
    tritonserver dies it prints the log's end and starts it again on the same ports (lookups
    equal again); with --restarts 1 a second death within the window ends it with status 2
    naming the signal (before restarts it exited 0 in silence)."""
    repo = tmp_path / "repo"
    hps = Path(sys.executable).parent / "hps"
    proc = subprocess.Popen(
        [hps, "serve", repo, "--rows", "2000", "--dim", "4", "--restarts", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []

    def until(prefix: str) -> str:
        for line in proc.stdout:  # bounded: hps serve ends (and stdout closes) if all fails
            lines.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError("".join(lines))

    def server_pid() -> int:
        (p,) = [p for p in psutil.Process(proc.pid).children() if p.name() == "tritonserver"]
        return p.pid

    try:
        url = re.search(r"HTTP (\S+),", until("serving ")).group(1)
        spec = read_spec(repo)
        keys = np.array([3, 1, -7, 2**63 - 1, 3], np.int64)
        counts = np.zeros(spec.slots, np.int32)
        counts[4] = len(keys)
        want = FileTables(spec.config).lookup(4, keys).ravel()
        with HPSClient(url, "http") as c:
            np.testing.assert_array_equal(c.lookup(keys, counts), want)
        first = server_pid()
        os.kill(first, signal.SIGKILL)
        assert "restarting it (1 of 1 restarts in 600 s)" in until("tritonserver exited with")
        assert re.search(r"HTTP (\S+),", until("serving again")).group(1) == url
        second = server_pid()
        assert second != first
        with HPSClient(url, "http") as c:
            np.testing.assert_array_equal(c.lookup(keys, counts), want)
        os.kill(second, signal.SIGKILL)
        out = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 2, out
    assert "error: tritonserver exited with signal 9 (Killed) (restarted 1 times in 600 s)" \
        in out, out  # fmt: skip
    assert out.count("Started HTTPService") >= 2, out  # the log's end, each time


def test_a_killed_server_leaves_no_shared_memory_behind(tmp_path):
    """The Python backend keeps each model instance's messages in /dev/shm regions named by the
    launcher's prefix; a server that dies without cleaning up (SIGKILL) leaves them there, and
    ``stop`` removes them. The same regions exist while the server answers, so the check below
    looks at the right files."""
    spec = write_repository(tmp_path / "repo", rows=2_000, dim=4, instances=1)
    preload(spec.config)
    server = TritonServer(tmp_path / "repo", models=["hps_embedding"])
    shm = Path("/dev/shm")
    try:
        server.start(timeout=240)
        keys = np.array([1, 2, 3], np.int64)
        counts = np.zeros(spec.slots, np.int32)
        counts[0] = len(keys)
        with client(server, "http") as c:
            got = c.lookup(keys, counts)
        want = FileTables(spec.config).lookup(0, keys).ravel()
        np.testing.assert_array_equal(got, want)
        live = sorted(shm.glob(server.shm_prefix + "*"))
        assert live, "no shared-memory regions under the server's prefix while it runs"
        server.proc.kill()
        server.proc.wait(30)
        assert all(p.exists() for p in live)  # SIGKILL: nobody unlinked them
    finally:
        server.stop()
        release_shared(spec.config)
    assert not list(shm.glob(server.shm_prefix + "*"))


def test_make_demo_in_the_64_mib_of_shared_memory_docker_gives(tmp_path):
    """A container gets 64 MiB of /dev/shm unless told otherwise, less than the demo's tables:
    the demo keeps them on disk for the run and says so. Its answers over both protocols
    equal the in-process reference (it checks them, exit 1 otherwise), and afterwards nothing
    is left in /dev/shm or in the directory that held the tables."""
    repo = tmp_path / "repo"
    r = in_small_tmpfs(f"COLUMNS=500 {sys.executable} -m hps_client.cli demo --repo {repo} "
                       '--batches 5; echo "rc=$? left:$(ls -A /dev/shm)"', mib=64,
                       over="/dev/shm")  # fmt: skip
    out = " ".join(r.stdout.split())
    assert "rc=0 left:" in r.stdout.splitlines(), (r.stdout[-3000:], r.stderr[-3000:])
    spill = repo / "hps_data" / "shm"
    assert f"this run keeps the VDB's files in {spill} instead" in out, out[:3000]
    assert "/dev/shm has 64.0 MiB free" in out, out[:3000]
    assert out.count("lookups equal the reference") == 2, out
    assert spill.is_dir() and not list(spill.iterdir())


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT to a background job"])
def test_hps_serve_stops_cleanly_on_sigterm_and_background_sigint(tmp_path, how):
    """`kill` / `docker stop` send SIGTERM, and a shell starts a background job with SIGINT
    ignored: both stop `hps serve` as Ctrl-C does, exit 0, with tritonserver, its stubs and
    every shared-memory file (the VDB's and the backend's regions) gone. (SIGTERM used to
    kill `hps serve` alone and leave the server running in its own session.)"""
    repo = tmp_path / "repo"
    hps = Path(sys.executable).parent / "hps"
    ignore_int = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if "SIGINT" in how else None
    proc = subprocess.Popen(
        [hps, "serve", repo, "--rows", "2000", "--dim", "4", "--restarts", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=ignore_int,
    )  # fmt: skip
    lines: list[str] = []
    try:
        for line in proc.stdout:  # bounded: stdout closes if hps serve ends
            lines.append(line)
            if line.startswith("serving "):
                break
        url = re.search(r"HTTP (\S+),", "".join(lines)).group(1)
        spec = read_spec(repo)
        (triton,) = [p for p in psutil.Process(proc.pid).children() if p.name() == "tritonserver"]
        stubs = triton.children(recursive=True)
        assert stubs, "no backend stub processes"
        mine = [load_config(spec.config).volatile_db.shared_memory_name + ".",
                f"hps{proc.pid}x{url.rsplit(':', 1)[1]}_"]  # fmt: skip
        held = [f for f in os.listdir("/dev/shm") if f.startswith(tuple(mine))]
        assert any(f.startswith(mine[0]) for f in held) and any(f.startswith(mine[1]) for f in held)
        keys = np.array([5, -1, 7], np.int64)
        counts = np.zeros(spec.slots, np.int32)
        counts[1] = len(keys)
        with HPSClient(url, "http") as c:
            np.testing.assert_array_equal(
                c.lookup(keys, counts), FileTables(spec.config).lookup(1, keys).ravel()
            )
        proc.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
        out = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0 and "stopping" in out, out
    gone, alive = psutil.wait_procs([triton, *stubs], timeout=30)
    assert not alive, alive
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(tuple(mine))]
