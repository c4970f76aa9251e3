"""`hps doctor`, run as a user would, against what the test finds out on its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from small_tmpfs import in_small_tmpfs

from hps_core.estimate import estimate_config
from hps_core.launcher import PROJECT_BACKENDS, free_ports, triton_home
from hps_core.synth import make_model


def doctor(*args: str) -> tuple[int, dict]:
    r = subprocess.run(
        [sys.executable, "-m", "hps_core.cli", "doctor", "--json", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def by_name(result: dict) -> dict[str, dict]:
    return {c["name"]: c for c in result["checks"]}


@pytest.fixture(scope="module")
def env_result() -> tuple[int, dict]:
    return doctor()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("doctor"), [300, 50], [8, 8], name="doc")


def write_config(model, tmp_path: Path, **changes) -> Path:
    cfg = json.loads(Path(model.config_path).read_text())
    for section, values in changes.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp_path / "hps.json"
    path.write_text(json.dumps(cfg))
    return path


def test_exit_code_is_1_exactly_when_a_check_fails(env_result):
    rc, result = env_result
    failed = [c for c in result["checks"] if c["status"] == "FAIL"]
    assert rc == (1 if failed else 0)
    assert result["ok"] == (not failed)
    assert all(c["status"] in ("OK", "WARN", "FAIL") for c in result["checks"])
    assert all(c["fix"] for c in result["checks"] if c["status"] != "OK")


def test_numpy_verdict_is_major_version_below_2(env_result):
    c = by_name(env_result[1])["numpy"]
    assert c["data"]["version"] == np.__version__
    assert (c["status"] == "OK") == (int(np.__version__.split(".")[0]) < 2)


def test_numba_threading_layer_is_the_one_a_parallel_kernel_gets(env_result):
    import numba

    @numba.njit(parallel=True)
    def total(a):
        s = 0
        for i in numba.prange(a.shape[0]):
            s += a[i]
        return s

    assert total(np.arange(100)) == 4950
    c = by_name(env_result[1])["numba"]
    assert c["data"]["layer"] == numba.threading_layer()
    assert (c["status"] == "OK") == (numba.threading_layer() in ("omp", "tbb"))


def test_onnxruntime_providers_and_cupy_devices(env_result):
    import onnxruntime

    checks = by_name(env_result[1])
    assert checks["onnxruntime"]["data"]["providers"] == onnxruntime.get_available_providers()
    try:
        import cupy

        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        devices = 0
    assert checks["cupy"]["status"] == ("OK" if devices else "WARN")  # CPU mode is no failure
    if devices:
        assert checks["cupy"]["data"]["devices"] == devices


def test_triton_binary_stub_and_backends_are_the_files_that_exist(env_result):
    checks = by_name(env_result[1])
    binary = triton_home() / "bin" / "tritonserver"
    assert binary.is_file()
    assert checks["triton server"]["status"] == "OK"
    assert checks["triton server"]["data"]["path"] == str(binary)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton_home() / "python_backend_stubs" / py / "triton_python_backend_stub"
    assert checks["python stub"]["status"] == ("OK" if stub.is_file() else "FAIL")
    present = all((PROJECT_BACKENDS / n / "model.py").is_file() for n in ("hps", "onnx"))
    assert checks["project backends"]["status"] == ("OK" if present else "FAIL")
    assert checks["redis-server"]["status"] == ("OK" if shutil.which("redis-server") else "WARN")


def test_config_with_a_missing_sparse_file_fails_naming_it(model, tmp_path):
    cfg = json.loads(Path(model.config_path).read_text())
    gone = str(tmp_path / "gone_sparse_0.model")
    cfg["models"][0]["sparse_files"][1] = gone
    path = tmp_path / "hps.json"
    path.write_text(json.dumps(cfg))
    rc, result = doctor("--config", path)
    c = by_name(result)["sparse files doc"]
    assert rc == 1 and c["status"] == "FAIL"
    assert gone in c["detail"] and model.table_paths[0] not in c["detail"]


def test_config_files_and_shared_memory_against_the_estimate(model, tmp_path):
    vdb = {"type": "multi_process_hash_map", "shared_memory_name": f"hps_doctor_{os.getpid()}"}
    path = write_config(model, tmp_path, volatile_db=vdb)
    rc, result = doctor("--config", path)
    checks = by_name(result)
    assert checks["config"]["status"] == "OK"
    assert checks["sparse files doc"]["status"] == "OK"
    assert checks["sparse files doc"]["detail"].startswith("2 tables, 350 rows")
    assert checks["rocksdb path"]["status"] == "WARN"  # not loaded yet: hps load creates it
    from hps_core.config import load_config

    est = estimate_config(load_config(path))
    expect = sum(e.vdb_bytes for e in est)
    host = sum(e.pdb_host_bytes + (e.l1_bytes if e.l1_device == "host" else 0) for e in est)
    assert checks["host memory"]["data"]["estimate_bytes"] == host  # the VDB is in /dev/shm
    assert all(e.pdb_host_bytes > 0 for e in est)  # RocksDB's column families
    shm = checks["/dev/shm"]["data"]
    assert shm["estimate_bytes"] == expect and shm["own_bytes"] == 0
    st = os.statvfs("/dev/shm")
    assert abs(shm["free_bytes"] - st.f_bavail * st.f_frsize) < 256 * 2**20  # others write too
    assert checks["/dev/shm"]["status"] == ("OK" if shm["free_bytes"] > 1.2 * expect else "WARN")
    disk = checks["rocksdb disk"]["data"]  # the database does not exist yet: its parent's disk
    assert disk["estimate_bytes"] == sum(e.pdb_bytes for e in est) > 0 and disk["own_bytes"] == 0
    pdb = Path(load_config(path).persistent_db.path)
    assert disk["path"] == str(next(d for d in (pdb, *pdb.parents) if d.exists()))
    st = os.statvfs(disk["path"])
    assert abs(disk["free_bytes"] - st.f_bavail * st.f_frsize) < 256 * 2**20


def test_shared_memory_check_looks_where_the_vdb_puts_its_files(model, tmp_path):
    """With HPS_SHM_DIR set the shared VDB's files go there, so that is the room checked."""
    vdb = {"type": "multi_process_hash_map", "shared_memory_name": f"hps_doctor_{os.getpid()}"}
    path = write_config(model, tmp_path, volatile_db=vdb)
    r = in_small_tmpfs('mount -o remount,size=8k "$HPS_SHM_DIR" && echo "$HPS_SHM_DIR" && '
                       f"{sys.executable} -m hps_core.cli doctor --json --config {path}")  # fmt: skip
    where, out = r.stdout.split("\n", 1)
    checks = by_name(json.loads(out))
    assert r.returncode == 1 and "/dev/shm" not in checks, r.stderr
    c = checks[where]
    assert c["status"] == "FAIL" and where in c["fix"], c
    assert c["data"]["free_bytes"] <= 8192 < c["data"]["estimate_bytes"], c
    gone = str(tmp_path / "no-such-dir")  # a container without /dev/shm
    r = subprocess.run([sys.executable, "-m", "hps_core.cli", "doctor", "--json", "--config",
                        str(path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HPS_SHM_DIR": gone})  # fmt: skip
    c = by_name(json.loads(r.stdout))[gone]
    assert r.returncode == 1 and c["status"] == "FAIL" and c["data"]["free_bytes"] == 0, c


DISK_SIZES = r"""
import json, subprocess, sys
cfg, sizes = sys.argv[1], sys.argv[2:]
d = __import__("os").environ["HPS_SHM_DIR"]
out = []
for kib in sizes:
    subprocess.run(["mount", "-o", f"remount,size={kib}k", d], check=True)
    r = subprocess.run([sys.executable, "-m", "hps_core.cli", "doctor", "--json", "--config", cfg],
                       capture_output=True, text=True)
    c = {c["name"]: c for c in json.loads(r.stdout)["checks"]}["rocksdb disk"]
    out.append([r.returncode, c["status"], c["data"]["free_bytes"], c["fix"]])
print(json.dumps(out))
"""


def test_rocksdb_disk_space_against_the_estimate(model, tmp_path):
    """On a tmpfs of its own, sized around the estimate: too small fails, tight warns."""
    path = write_config(model, tmp_path, persistent_db={"path": "PDB_DIR"})
    from hps_core.config import load_config

    est = sum(e.pdb_bytes for e in estimate_config(load_config(path)))
    kib = [4, -(-int(1.2 * est) // 4096) * 4, 4 * 1024]  # < est, 1.2x (pages), 4 MiB
    (tmp_path / "sizes.py").write_text(DISK_SIZES)
    run = tmp_path / "run.json"
    r = in_small_tmpfs(f'sed "s#PDB_DIR#$HPS_SHM_DIR/rdb#" {path} > {run} && '
                       f"{sys.executable} {tmp_path / 'sizes.py'} {run} {' '.join(map(str, kib))}")  # fmt: skip
    assert r.returncode == 0, r.stderr
    (small, tight, roomy) = json.loads(r.stdout.strip().splitlines()[-1])
    assert small[:2] == [1, "FAIL"] and small[2] < est and "larger disk" in small[3]
    assert tight[1] == "WARN" and est <= tight[2] < 1.5 * est
    assert roomy[1] == "OK" and roomy[2] >= 1.5 * est


def test_invalid_config_fails_naming_the_field(model, tmp_path):
    path = write_config(model, tmp_path, volatile_db={"overflow_policy": "evict_lru"})
    rc, result = doctor("--config", path)
    c = by_name(result)["config"]
    assert rc == 1 and c["status"] == "FAIL"
    assert "volatile_db.overflow_policy" in c["detail"] and "evict_lru" in c["detail"]
    rc, result = doctor("--config", tmp_path / "missing.json")
    assert rc == 1 and "no such file" in by_name(result)["config"]["detail"]


def test_unreachable_redis_address_fails(model, tmp_path):
    (port,) = free_ports(1)  # nothing listens there
    vdb = {"type": "redis_cluster", "address": f"127.0.0.1:{port}"}
    rc, result = doctor("--config", write_config(model, tmp_path, volatile_db=vdb))
    c = by_name(result)[f"redis 127.0.0.1:{port}"]
    assert rc == 1 and c["status"] == "FAIL" and "unreachable" in c["detail"]


@pytest.fixture
def redis_port(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: apt-get install redis-server")
    (port,) = free_ports(1)
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    proc = subprocess.Popen(cmd + ["--appendonly", "no"], cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:
        from hps_core.doctor_config import redis_ping

        deadline = time.monotonic() + 10
        while True:
            try:
                redis_ping("127.0.0.1", port)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.redis
def test_running_redis_server_answers_pong(model, tmp_path, redis_port):
    (closed,) = free_ports(1)
    address = f"127.0.0.1:{redis_port},127.0.0.1:{closed}"
    vdb = {"type": "redis_cluster", "address": address}
    rc, result = doctor("--config", write_config(model, tmp_path, volatile_db=vdb))
    checks = by_name(result)
    assert checks[f"redis 127.0.0.1:{redis_port}"]["status"] == "OK"
    assert checks[f"redis 127.0.0.1:{redis_port}"]["data"]["reply"] == "+PONG"
    assert checks[f"redis 127.0.0.1:{closed}"]["status"] == "FAIL"
    assert rc == 1


MOUNTS = """\
overlay / overlay rw,relatime 0 0
proc /proc proc rw,nosuid 0 0
tmpfs /dev/shm tmpfs rw,relatime,size=24684092k 0 0
tmpfs /dev/shm/big tmpfs rw,relatime,size=8g,huge=within_size 0 0
/dev/vda1 /data\\040x ext4 rw,relatime 0 0
"""


@pytest.mark.parametrize(
    "path, status, huge",
    [
        ("/dev/shm", "WARN", "never"),  # no huge= option: tmpfs's default
        ("/dev/shm/sub", "WARN", "never"),
        ("/dev/shm/big", "OK", "within_size"),  # the longer mount point wins
        ("/dev/shm/big/x", "OK", "within_size"),
        ("/dev/shmother", "OK", None),  # a name that merely starts like the mount: under /
        ("/data x/vdb", "OK", None),  # \040 in /proc/mounts is a space
    ],
)
def test_shm_pages_reads_the_tmpfs_huge_option(tmp_path, path, status, huge):
    from hps_core.doctor_config import check_shm_pages

    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    c = check_shm_pages(Path(path), mounts)
    assert c.status == status, c
    assert c.data.get("huge") == huge
    if status == "WARN":
        assert c.fix == "sudo mount -o remount,huge=within_size /dev/shm (then reload the tables)"
    if huge is None:
        assert c.data["fstype"] == ("ext4" if path.startswith("/data") else "overlay")


def test_shm_pages_on_this_machine(env_result):
    """The check names this machine's /dev/shm mount option as /proc/mounts lists it."""
    lines = [x.split() for x in Path("/proc/mounts").read_text().splitlines()
             if x.split()[1:2] == ["/dev/shm"]]  # fmt: skip
    if not lines or lines[-1][2] != "tmpfs":
        pytest.skip("/dev/shm is not a tmpfs mount of its own here")
    line = lines[-1]  # the last mount on a point is the one in effect
    c = by_name(env_result[1])["/dev/shm pages"]
    opts = dict(o.partition("=")[::2] for o in line[3].split(","))
    want = opts.get("huge", "never")
    assert c["data"]["huge"] == want
    assert c["status"] == ("OK" if want in ("always", "within_size") else "WARN")
