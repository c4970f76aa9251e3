"""``hps repo``: a Triton model repository for a DLRM-style model served by our backends.

Layout written under ``<repo>/``::

    hps_data/hps.json          the parameter-server config every embedding model reads
    hps_data/<table>/...       sparse files (generated when no config is given)
    hps_data/rocksdb/          the persistent tier (filled by ``hps load`` before serving)
    hps_embedding/             backend "hps", HugeCTR I/O: KEYS [1, n] + NUMKEYS [1, tables] -> OUTPUT0
    <name>_embedding/          backend "hps", CAT [B, slots] -> EMB [B, slots * dim]
    <name>_dense/1/model.onnx  backend "onnx": DENSE + EMB -> PROB
    <name>/                    the ensemble: DENSE [B, 13] + CAT [B, slots] -> PROB [B, 1]

Triton runs every model instance in its own process, so the config puts the VDB in shared
memory (``multi_process_hash_map``) and the models say ``preloaded: true``: ``hps load`` fills
the VDB and RocksDB once, and each instance attaches the same copy (RocksDB read-only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .config import load_config, load_config_dict, resolve_path
from .errors import ConfigError

log = logging.getLogger(__name__)

DATA_DIR = "hps_data"
HPS_MODEL = "hps_embedding"


@dataclass
class RepoSpec:
    """What ``write_repository`` produced: names a client needs."""

    root: Path
    config: Path
    model: str  # the model in hps.json
    ensemble: str
    embedding: str
    dense: str
    slots: int
    dim: int
    num_dense: int
    max_batch_size: int

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _tensor(name: str, dtype: str, dims: list[int]) -> str:
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] }}'


def _params(params: dict[str, str]) -> str:
    return "\n".join(
        f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()
    )


def _model_config(
    name: str,
    backend: str,
    inputs: list[str],
    outputs: list[str],
    max_batch_size: int,
    *,
    instances: int = 1,
    params: dict[str, str] | None = None,
    batching: bool = True,
) -> str:
    lines = [f'name: "{name}"', f'backend: "{backend}"', f"max_batch_size: {max_batch_size}"]
    lines += ["input [", ",\n".join(inputs), "]", "output [", ",\n".join(outputs), "]"]
    lines.append(f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]")
    if batching and max_batch_size > 0:
        lines.append("dynamic_batching { max_queue_delay_microseconds: 200 }")
    if params:
        lines.append(_params(params))
    return "\n".join(lines) + "\n"


def _ensemble_config(name: str, spec: RepoSpec) -> str:
    return f"""name: "{name}"
platform: "ensemble"
max_batch_size: {spec.max_batch_size}
input [
{_tensor("DENSE", "TYPE_FP32", [spec.num_dense])},
{_tensor("CAT", "TYPE_INT64", [spec.slots])}
]
output [
{_tensor("PROB", "TYPE_FP32", [1])}
]
ensemble_scheduling {{
  step [
    {{
      model_name: "{spec.embedding}"
      model_version: -1
      input_map {{ key: "CAT" value: "CAT" }}
      output_map {{ key: "EMB" value: "emb" }}
    }},
    {{
      model_name: "{spec.dense}"
      model_version: -1
      input_map {{ key: "DENSE" value: "DENSE" }}
      input_map {{ key: "EMB" value: "emb" }}
      output_map {{ key: "PROB" value: "PROB" }}
    }}
  ]
}}
"""


def serving_hps_config(cfg: dict, data: Path) -> dict:
    """The config with a shared-memory VDB named after the repository and RocksDB under data/."""
    cfg = json.loads(json.dumps(cfg))
    v = cfg.setdefault("volatile_db", {})
    if v.get("type", "hash_map") in ("hash_map", "parallel_hash_map", "multi_process_hash_map"):
        v["type"] = "multi_process_hash_map"
        digest = hashlib.sha1(str(data.resolve()).encode()).hexdigest()[:12]
        v.setdefault("shared_memory_name", f"hps_{digest}")
        v["cache_missed_embeddings"] = False  # instances only read the shared tiers
    p = cfg.setdefault("persistent_db", {"type": "rocks_db"})
    if p.get("type", "rocks_db") == "rocks_db":
        p.setdefault("path", str(data / "rocksdb"))
    return cfg


def _with_absolute_paths(raw: dict, base: Path) -> dict:
    """The config's file paths made absolute (relative ones are relative to its directory), so
    that the copy under hps_data/ names the same files."""
    models = raw.get("models")
    for m in models if isinstance(models, list) else []:
        for key in ("sparse_files", "hot_key_files"):
            if isinstance(m, dict) and isinstance(m.get(key), list):
                m[key] = [resolve_path(base, f) if isinstance(f, str) and f else f for f in m[key]]
    p = raw.get("persistent_db")
    if isinstance(p, dict) and isinstance(p.get("path"), str) and p["path"]:
        p["path"] = resolve_path(base, p["path"])
    return raw


def write_repository(
    root: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    onnx: str | os.PathLike | None = None,
    name: str = "dlrm",
    rows: int = 1_000_000,
    dim: int = 16,
    seed: int = 0,
    instances: int = 1,
    max_batch_size: int = 4096,
) -> RepoSpec:
    """Write (or refresh) a model repository; generates a synthetic model when none is given."""
    from .dense import DENSE_INPUT, check_ensemble_io, describe_onnx, save_dense_model
    from .synth import criteo_vocab_sizes, make_model, model_spec

    root = Path(root).resolve()
    data = root / DATA_DIR
    data.mkdir(parents=True, exist_ok=True)
    if config is None:
        sizes = criteo_vocab_sizes(rows)
        stamp = data / "synth.json"
        want = {"rows": rows, "dim": dim, "seed": seed, "sizes": sizes}
        if stamp.is_file() and json.loads(stamp.read_text()) == want:
            synth = model_spec(data, sizes, [dim] * len(sizes), seed=seed, name=name)
        else:
            synth = make_model(data, sizes, [dim] * len(sizes), seed=seed, name=name)
            stamp.write_text(json.dumps(want))
        raw = json.loads(Path(synth.config_path).read_text())
        raw["models"][0]["max_batch_size"] = max_batch_size
    else:
        raw = _with_absolute_paths(load_config_dict(config), Path(config).resolve().parent)
    cfg_path = data / "hps.json"
    cfg_path.write_text(json.dumps(serving_hps_config(raw, data), indent=2))
    cfg = load_config(cfg_path)
    m = cfg.models[0]
    if len(cfg.models) > 1:
        log.warning(
            "%s: the repository serves its first model, %r; the other %d are not served",
            config, m.model, len(cfg.models) - 1,
        )  # fmt: skip
    dims = set(m.embedding_vecsize_per_table)
    if len(dims) != 1:
        raise ConfigError(
            "embedding_vecsize_per_table", sorted(dims), "one dim for every table (an ensemble)"
        )
    dim = dims.pop()
    slots = len(m.sparse_files)

    dense_dir = root / f"{name}_dense" / "1"
    dense_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = dense_dir / "model.onnx"
    if onnx is None and not onnx_path.is_file():
        save_dense_model(onnx_path, dim=dim, seed=seed, num_slots=slots)
    source = onnx_path if onnx is None else onnx
    io = describe_onnx(source)
    check_ensemble_io(io, source, slots, dim)  # before it is copied into the repository
    if onnx is not None:
        shutil.copy2(onnx, onnx_path)
    num_dense = int(next(i for i in io.inputs if i.name == DENSE_INPUT).shape[-1])

    spec = RepoSpec(
        root, cfg_path, m.model, name, f"{name}_embedding", f"{name}_dense",
        slots, dim, num_dense, min(max_batch_size, m.max_batch_size),
    )  # fmt: skip
    rel = f"../{DATA_DIR}/hps.json"
    common = {"config": rel, "model": m.model, "preloaded": "true"}
    files = {
        HPS_MODEL: _model_config(
            HPS_MODEL, "hps",
            [_tensor("KEYS", "TYPE_INT64", [-1]), _tensor("NUMKEYS", "TYPE_INT32", [-1])],
            [_tensor("OUTPUT0", "TYPE_FP32", [-1])],
            spec.max_batch_size, instances=instances, params={**common, "io": "hps"},
            batching=False,
        ),
        spec.embedding: _model_config(
            spec.embedding, "hps",
            [_tensor("CAT", "TYPE_INT64", [slots])],
            [_tensor("EMB", "TYPE_FP32", [slots * dim])],
            spec.max_batch_size, instances=instances, params={**common, "io": "slots"},
        ),
        spec.dense: _model_config(
            spec.dense, "onnx",
            [_tensor("DENSE", "TYPE_FP32", [num_dense]), _tensor("EMB", "TYPE_FP32", [slots * dim])],
            [_tensor("PROB", "TYPE_FP32", [1])],
            spec.max_batch_size, instances=instances,
        ),
        spec.ensemble: _ensemble_config(spec.ensemble, spec),
    }  # fmt: skip
    for model, text in files.items():
        (root / model / "1").mkdir(parents=True, exist_ok=True)
        (root / model / "config.pbtxt").write_text(text)
    (data / "repo.json").write_text(json.dumps(spec.to_json(), indent=2))
    return spec


def read_spec(root: str | os.PathLike) -> RepoSpec:
    """The RepoSpec ``write_repository`` saved in ``<root>/hps_data/repo.json``."""
    path = Path(root) / DATA_DIR / "repo.json"
    if not path.is_file():
        raise ConfigError("repository", str(root), f"a repository written by `hps repo` ({path})")
    d = json.loads(path.read_text())
    d["root"], d["config"] = Path(d["root"]), Path(d["config"])
    return RepoSpec(**d)


def preload(config: str | os.PathLike, *, progress: bool = False) -> None:
    """Fill the shared tiers of a serving config once (``hps load``), before the server starts."""
    from .server import ParameterServer

    with ParameterServer(config, progress=progress):
        pass


def release_shared(config: str | os.PathLike) -> None:
    """Remove a serving config's shared-memory VDB from /dev/shm (after the server stopped)."""
    from .server import build_vdb

    cfg = load_config(config)
    if cfg.volatile_db.type == "multi_process_hash_map":
        vdb = build_vdb(cfg)
        if vdb is not None:
            vdb.unlink()


TRITON_SHM_BYTES = 64 << 20
"""Room the shared VDB leaves in /dev/shm for Triton's own regions (16 MiB per Python-backend
stub, see ``launcher``) when ``serving`` decides whether its tables fit there."""


def spill_shared_tables(cfg, directory: Path) -> str | None:
    """Point ``HPS_SHM_DIR`` (this process and the servers it starts) at ``directory`` when
    the shared VDB's tables, by ``hps estimate``, do not fit where they would go with
    ``TRITON_SHM_BYTES`` to spare; returns what was done, for the user, or None when they fit.

    Files on a disk-backed filesystem are shared by the processes that map them just as a
    tmpfs's are (the kernel's page cache holds one copy), so the server answers the same; but
    the kernel also writes the rows out to the disk, and under memory pressure a lookup may
    read them back from it."""
    from .doctor_config import shared_room, size
    from .estimate import estimate_config
    from .vdb.shm import shm_dir

    if cfg.volatile_db.type != "multi_process_hash_map":
        return None
    need = sum(e.vdb_bytes for e in estimate_config(cfg))
    free, held = shared_room(cfg)
    if free + held >= need + TRITON_SHM_BYTES:
        return None
    where = shm_dir()
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["HPS_SHM_DIR"] = str(directory)
    return (
        f"{where} has {size(free + held)} free, the shared VDB needs {size(need)} and Triton "
        f"{size(TRITON_SHM_BYTES)}: this run keeps the VDB's files in {directory} instead (on "
        f"disk, shared through the page cache). To serve from memory give {where} more room "
        f"(docker run --shm-size=1g)"
    )


@contextmanager
def serving(
    root: str | os.PathLike,
    *,
    rows: int = 1_000_000,
    dim: int = 16,
    instances: int = 1,
    progress: bool = False,
    start_timeout: float = 300.0,
    ingest: bool = True,
    spill: Callable[[str], None] | None = None,
):
    """Write the repository if needed, fill the shared tiers, run Triton; stops and cleans up.

    Yields (RepoSpec, TritonServer) with the ensemble and ``hps_embedding`` loaded. With an
    ``update_source`` of type ``redis_stream`` in the config and ``ingest``, this process also
    applies the update stream to the shared VDB and RocksDB (the backend instances follow
    RocksDB as secondaries and keep their own L1 caches fresh); ``ingest=False`` leaves that to
    a separate ``hps ingest CONFIG``. With ``spill``, a shared VDB too large for /dev/shm goes
    to ``hps_data/shm`` under the repository (``spill_shared_tables``) and ``spill`` is told;
    without it such a VDB is a ``SharedMemoryFullError``.
    """
    from .launcher import TritonServer

    try:  # a repository written before (perhaps from the user's own model) is served as it is
        spec = read_spec(root)
    except ConfigError:
        spec = write_repository(root, rows=rows, dim=dim, instances=instances)
    cfg = load_config(spec.config)
    env = os.environ.get("HPS_SHM_DIR")
    server = updates = None
    try:
        if spill is not None:
            note = spill_shared_tables(cfg, spec.root / DATA_DIR / "shm")
            if note:
                spill(note)
        preload(spec.config, progress=progress)
        server = TritonServer(spec.root, models=[spec.ensemble, HPS_MODEL])
        if ingest and cfg.update_source.type == "redis_stream":
            from .updates.ingestor import StoreIngestor

            updates = StoreIngestor(cfg, scope="all")
            updates.ingestor.start()
        server.start(timeout=start_timeout)
        yield spec, server
    finally:
        if server is not None:
            server.stop()
        if updates is not None:
            updates.close()
        release_shared(spec.config)  # also the tables of a load that failed halfway
        if env is None:
            os.environ.pop("HPS_SHM_DIR", None)
        else:
            os.environ["HPS_SHM_DIR"] = env
