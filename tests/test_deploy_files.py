"""The deployment files under deploy/: syntax, and agreement with each other and with the code.

No Docker daemon or Kubernetes API server is reachable here, so what is checked is: every file
parses, every object has its required fields, every path a file names exists, and the values
that must agree across files (ports, config path, model name, Redis nodes, the demo model's
files) do. What can run does: the container's entrypoint (on a small model), the Redis Cluster
init script (against local redis-servers) and `kubectl kustomize`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from hps_core.cli import build_parser
from hps_core.config import load_config, store_table_name
from hps_core.dense import load_dense_weights, save_dense_model
from hps_core.pdb.rocksdb import RocksDBPDB
from hps_core.repo import read_spec
from hps_core.synth import criteo_vocab_sizes, make_model, model_spec

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
CONFIG_PATH = "/config/hps.json"
MODEL = "dlrm"


# -- Dockerfile ------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in (DEPLOY / "docker" / "Dockerfile").read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def arg_defaults(instrs) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in instrs if i == "ARG" and "=" in a)


def dockerfile_env() -> dict[str, str]:
    """The ENV the image sets (ENV a=b c=d form)."""
    env = {}
    for i, a in dockerfile():
        if i == "ENV":
            env.update(kv.split("=", 1) for kv in shlex.split(a))
    return env


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], text)


def triton_cmd() -> list[str]:
    cmds = [a for i, a in dockerfile() if i == "CMD"]
    assert len(cmds) == 1
    return json.loads(cmds[0])  # exec form, so signals reach tritonserver


def flags(argv: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in argv[1:]:
        k, _, v = a.partition("=")
        out.setdefault(k, []).append(v)
    return out


def test_dockerfile_base_image_and_instructions():
    instrs = dockerfile()
    known = {"ARG", "FROM", "ENV", "WORKDIR", "COPY", "RUN", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL"}
    assert {i for i, _ in instrs} <= known
    before_from = [i for i, _ in instrs[: [i for i, _ in instrs].index("FROM")]]
    assert set(before_from) <= {"ARG"}
    (base,) = [a for i, a in instrs if i == "FROM"]
    image = expand(base, arg_defaults(instrs))
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", image), image
    exposed = sorted(int(p) for i, a in instrs if i == "EXPOSE" for p in a.split())
    assert exposed == sorted(PORTS.values())


def test_dockerfile_copies_existing_paths_and_the_backends():
    copies = [shlex.split(a) for i, a in dockerfile() if i == "COPY"]
    assert copies and all(not c[0].startswith("--from") for c in copies)
    dest_of = {}
    for *sources, dest in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
            dest_of[src.rstrip("/")] = dest
    # Triton finds a Python-based backend as <backend-directory>/<name>/model.py.
    backends = {s: d for s, d in dest_of.items() if s.startswith("backend/")}
    assert backends == {f"backend/{b}": f"/opt/tritonserver/backends/{b}/" for b in ("hps", "onnx")}
    assert all((ROOT / b / "model.py").is_file() for b in backends)
    assert dest_of["deploy/config/hps.json"] == CONFIG_PATH
    # pip install . needs every package pyproject.toml names
    assert {"pyproject.toml", "README.md", "hps_core", "client"} <= set(dest_of)
    entry = [json.loads(a) for i, a in dockerfile() if i == "ENTRYPOINT"]
    assert entry == [[dest_of["deploy/docker/entrypoint.sh"]]]


def test_dockerfile_cmd_serves_the_model_repository():
    cmd = triton_cmd()
    f = flags(cmd)
    env = dockerfile_env()
    assert cmd[0] == "tritonserver"
    assert f["--model-repository"] == [env["HPS_REPOSITORY"]] == ["/models"]
    assert f["--model-control-mode"] == ["explicit"]
    assert f["--load-model"] == [env["HPS_MODEL_NAME"]] == [MODEL]
    assert env["HPS_CONFIG"] == CONFIG_PATH
    ports = {k: int(v[0]) for k, v in f.items() if k.endswith("-port")}
    assert ports == {f"--{k}-port": v for k, v in PORTS.items()}


def test_dockerfile_demo_model_is_the_one_the_config_names():
    """The image's `hps synth` / `hps dense` runs are valid CLI calls and write the files
    deploy/config/hps.json lists, with its dims."""
    instrs = dockerfile()
    env = arg_defaults(instrs)
    runs = [expand(a, env) for i, a in instrs if i == "RUN"]
    calls = [
        shlex.split(part)
        for run in runs
        for part in re.split(r"&&", run)
        if part.strip().startswith("hps ")
    ]
    parsed = {c[1]: build_parser().parse_args(c[1:]) for c in calls}
    assert set(parsed) == {"synth", "dense"}
    synth, dense = parsed["synth"], parsed["dense"]
    assert dense.dim == synth.dim and dense.slots == synth.tables == 26
    assert Path(dense.out).parent == Path(synth.out)
    assert dockerfile_env()["HPS_DENSE_ONNX"] == dense.out
    cfg = load_config(DEPLOY / "config" / "hps.json")
    m = cfg.model(MODEL)
    spec = model_spec(synth.out, criteo_vocab_sizes(synth.rows), [synth.dim] * 26, name=synth.name)
    assert m.sparse_files == spec.table_paths
    assert m.embedding_vecsize_per_table == [synth.dim] * 26
    assert cfg.persistent_db.path.startswith(synth.out + "/")


def test_entrypoint_writes_the_repository_and_fills_the_tiers(tmp_path):
    """The container's start script, run here on a small model: `hps repo` + `hps load`, then
    the command. The repository serves the given ONNX file; RocksDB holds every table row."""
    script = DEPLOY / "docker" / "entrypoint.sh"
    sizes = criteo_vocab_sizes(2600)
    synth = make_model(tmp_path / "data", sizes, [4] * 26, seed=3, name=MODEL)
    cfg = json.loads(Path(synth.config_path).read_text())
    cfg["volatile_db"] = {"type": "disabled"}  # no shared memory left behind by the test
    cfg["persistent_db"] = {"type": "rocks_db", "path": str(tmp_path / "rocksdb")}
    (tmp_path / "hps.json").write_text(json.dumps(cfg))
    onnx_path = tmp_path / "dense.onnx"
    weights = save_dense_model(onnx_path, dim=4, seed=3)
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        PYTHONPATH=str(ROOT),
        HPS_CONFIG=str(tmp_path / "hps.json"),
        HPS_DENSE_ONNX=str(onnx_path),
        HPS_REPOSITORY=str(tmp_path / "models"),
        HPS_MODEL_NAME=MODEL,
    )
    served = [sys.executable, "-c", "import sys; print('serving', sys.argv[1])", "/models"]
    r = subprocess.run(
        ["sh", script, *served], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().endswith("serving /models")

    spec = read_spec(tmp_path / "models")
    assert (spec.ensemble, spec.slots, spec.dim, spec.num_dense) == (MODEL, 26, 4, 13)
    served_onnx = tmp_path / "models" / spec.dense / "1" / "model.onnx"
    assert served_onnx.read_bytes() == onnx_path.read_bytes()
    loaded = load_dense_weights(served_onnx)
    assert all(np.array_equal(loaded[k], weights[k]) for k in weights)
    with RocksDBPDB(tmp_path / "rocksdb", read_only=True) as pdb:
        for t in (0, 2, 25):
            keys, vectors = synth.table(t)
            got, found = pdb.fetch(store_table_name(MODEL, f"table{t}"), keys)
            assert found.all()
            np.testing.assert_array_equal(got, vectors)

    env["HPS_CONFIG"] = str(tmp_path / "missing.json")
    r = subprocess.run(["sh", script, "true"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and f"HPS_CONFIG={tmp_path}/missing.json: no such file" in r.stderr


# -- compose ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def redis_services(compose) -> list[str]:
    return sorted(s for s in compose["services"] if re.fullmatch(r"redis-\d+", s))


def test_compose_structure(compose):
    services = compose["services"]
    assert {"triton", "redis-cluster-init"} <= set(services)
    assert redis_services(compose) == ["redis-0", "redis-1", "redis-2"]
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            host = vol.split(":")[0]
            if host.startswith("."):
                assert (DEPLOY / host).exists(), f"{name} mounts missing {host}"
    deps = services["redis-cluster-init"]["depends_on"]
    assert {d: c["condition"] for d, c in deps.items()} == dict.fromkeys(
        redis_services(compose), "service_healthy"
    )
    assert services["triton"]["depends_on"]["redis-cluster-init"] == {
        "condition": "service_completed_successfully"
    }


def test_compose_triton_matches_the_image(compose):
    triton = compose["services"]["triton"]
    build = triton["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]) == DEPLOY / "docker" / "Dockerfile"
    assert "./config/hps.json:/config/hps.json:ro" in triton["volumes"]
    published = sorted(int(p.split(":")[1]) for p in triton["ports"])
    assert published == sorted(PORTS.values())
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])


def test_compose_redis_cluster_is_the_configured_vdb(compose):
    cfg = load_config(DEPLOY / "config" / "hps.json")
    assert cfg.volatile_db.type == "redis_cluster"
    nodes = cfg.volatile_db.address.split(",")
    for svc in redis_services(compose):
        cmd = compose["services"][svc]["command"]
        assert cmd[cmd.index("--cluster-enabled") + 1] == "yes"
        assert f"{svc}:{cmd[cmd.index('--port') + 1]}" in nodes
    init = compose["services"]["redis-cluster-init"]
    assert init["environment"]["REDIS_NODES"].split() == nodes
    assert init["entrypoint"] == ["sh", "/cluster-init.sh"]
    assert "./redis/cluster-init.sh:/cluster-init.sh:ro" in init["volumes"]


def test_cluster_init_script_syntax():
    r = subprocess.run(["sh", "-n", DEPLOY / "redis" / "cluster-init.sh"], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()


def _free_cluster_port() -> int:
    """A loopback port p with p and its cluster bus port p + 10000 both free."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 >= 65536:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


@pytest.fixture
def redis_nodes(tmp_path):
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli not installed (apt-get install redis-server)")
    procs, ports = [], []
    try:
        for i in range(3):
            port = _free_cluster_port()
            d = tmp_path / f"node{i}"
            d.mkdir()
            cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
            cmd += ["--cluster-enabled", "yes", "--save", "", "--appendonly", "no"]
            procs.append(subprocess.Popen(cmd, cwd=d, stdout=subprocess.DEVNULL))
            ports.append(port)
        yield ports
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


@pytest.mark.redis
def test_cluster_init_script_creates_the_cluster(redis_nodes):
    script = DEPLOY / "redis" / "cluster-init.sh"
    nodes = " ".join(f"localhost:{p}" for p in redis_nodes)
    env = {"PATH": "/usr/bin:/bin", "REDIS_NODES": nodes, "REDIS_CLUSTER_TIMEOUT": "20"}
    t0 = time.monotonic()
    r = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cluster ready" in r.stdout and time.monotonic() - t0 < 30

    def info(port: int) -> dict[str, str]:
        out = subprocess.run(
            ["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, text=True
        ).stdout
        return dict(line.split(":", 1) for line in out.split() if ":" in line)

    for p in redis_nodes:
        i = info(p)
        assert (i["cluster_state"], i["cluster_slots_ok"], i["cluster_known_nodes"]) == (
            "ok",
            "16384",
            "3",
        )
    # Idempotent: a restarted init container leaves the cluster alone.
    r = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "already serves every slot" in r.stdout
    # A node that does not exist is named in the error.
    bad = dict(env, REDIS_NODES="no-such-host.invalid:7000")
    r = subprocess.run(["sh", script], env=bad, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot resolve Redis node 'no-such-host.invalid'" in r.stderr


# -- Kubernetes ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    """Every object in deploy/k8s by kind, the kustomization left out."""
    objs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None or doc.get("kind") == "Kustomization":
                continue
            for field in ("apiVersion", "kind", "metadata"):
                assert field in doc, f"{path.name}: no {field}"
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
            assert doc["kind"] not in objs, f"two {doc['kind']} objects"
            objs[doc["kind"]] = doc
    return objs


def test_k8s_objects_and_kustomization(k8s):
    assert {k: o["apiVersion"] for k, o in k8s.items()} == {
        "ConfigMap": "v1",
        "Deployment": "apps/v1",
        "Service": "v1",
    }
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_k8s_deployment(k8s):
    dep = k8s["Deployment"]
    template = dep["spec"]["template"]
    labels = template["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= labels.items()
    (c,) = template["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == PORTS
    probe = {k: c[k]["httpGet"] for k in ("readinessProbe", "livenessProbe")}
    assert probe["readinessProbe"]["path"] == "/v2/health/ready"
    assert probe["livenessProbe"]["path"] == "/v2/health/live"
    for p in probe.values():
        assert PORTS.get(p["port"], p["port"]) == PORTS["http"]
    # The same server command as the image's, and the config where the command expects it.
    assert c["args"] == triton_cmd()
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    cfg_volume = volumes[mounts[str(Path(CONFIG_PATH).parent)]]
    assert cfg_volume["configMap"]["name"] == k8s["ConfigMap"]["metadata"]["name"]
    assert [i["path"] for i in cfg_volume["configMap"]["items"]] == [Path(CONFIG_PATH).name]
    assert {e["name"]: e["value"] for e in c["env"]}["HPS_CONFIG"] == CONFIG_PATH
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_k8s_service_selects_the_pods(k8s):
    svc, dep = k8s["Service"], k8s["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"] and svc["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    assert ports == {name: (port, name) for name, port in PORTS.items()}


def test_k8s_configmap_is_the_compose_config_with_the_cluster_address(k8s):
    cm = k8s["ConfigMap"]["data"]
    assert list(cm) == [Path(CONFIG_PATH).name]
    ours = json.loads(cm["hps.json"])
    compose_cfg = json.loads((DEPLOY / "config" / "hps.json").read_text())
    assert ours["volatile_db"].pop("address") == "redis-cluster:6379"
    compose_cfg["volatile_db"].pop("address")
    assert ours == compose_cfg
    cfg = load_config(json.loads(cm["hps.json"]))
    assert cfg.volatile_db.type == "redis_cluster" and cfg.model(MODEL).num_tables == 26


def test_kustomize_builds_the_same_objects(k8s):
    """`kubectl kustomize` (offline) accepts the kustomization and emits exactly our objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the kustomization is only checked by the tests above")
    r = subprocess.run([kubectl, "kustomize", K8S], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    built = {d["kind"]: d for d in yaml.safe_load_all(r.stdout) if d}
    assert built == k8s
