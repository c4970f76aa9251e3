"""Typed configuration. Loads HugeCTR's ``hps.json`` unchanged, and the same schema as YAML.

Our own format *is* the HPS schema (same section and field names, same defaults) plus a few
documented extensions, so a HugeCTR user's file needs no conversion and every field means what
it meant there. Validation happens once, here; errors name the field, the value and what was
expected. Unknown keys log a warning; HPS fields that have no effect here say so once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

VDB_TYPES = ("hash_map", "parallel_hash_map", "multi_process_hash_map", "redis_cluster", "disabled")
PDB_TYPES = ("rocks_db", "disabled")
UPDATE_SOURCE_TYPES = ("null", "kafka_message_queue", "redis_stream")
OVERFLOW_POLICIES = ("evict_random", "evict_least_used", "evict_oldest")
STORAGE_DTYPES = ("float32", "float16", "bfloat16", "int8")
CACHE_DTYPES = ("float32", "float16", "bfloat16")
CACHE_POLICIES = ("lru", "lfu")
CACHE_TYPES = ("dynamic", "static", "uvm")  # HugeCTR's embedding_cache_type
MAX_SIZE_T = 2**63 - 1  # HPS used SIZE_MAX for "no limit"; int64 max keeps numpy happy
# Other spellings HugeCTR's hps.json parser took for the same value (after lower-casing and
# "-"/" " -> "_", as its Triton backend did).
ALIASES = {
    "disable": "disabled", "none": "disabled",
    "hashmap": "hash_map", "hash": "hash_map", "map": "hash_map",
    "parallel_hashmap": "parallel_hash_map", "parallel_hash": "parallel_hash_map",
    "parallel_map": "parallel_hash_map",
    "multi_process_hashmap": "multi_process_hash_map",
    "multi_process_hash": "multi_process_hash_map", "multi_process_map": "multi_process_hash_map",
    "redis": "redis_cluster",
    "rocksdb": "rocks_db", "rocks": "rocks_db",
}  # fmt: skip
UPDATE_SOURCE_ALIASES = {"none": "null", "kafka": "kafka_message_queue",
                         "kafka_mq": "kafka_message_queue"}  # fmt: skip
POLICY_ALIASES = {"random": "evict_random", "least_used": "evict_least_used",
                  "oldest": "evict_oldest"}  # fmt: skip
REDIS_PORT = 6379  # an address without a port, as HugeCTR took it


@dataclass
class VolatileDBConfig:
    """``volatile_db``: the L2 tier in CPU memory (in-process hash map) or Redis."""

    type: str = "parallel_hash_map"
    # Redis (redis_cluster): comma-separated "host:port" list or a JSON list.
    address: str = "127.0.0.1:7000"
    user_name: str = "default"
    password: str = ""
    num_node_connections: int = 5
    enable_tls: bool = False
    tls_ca_certificate: str = ""
    tls_client_certificate: str = ""
    tls_client_key: str = ""
    # Sent as the TLS server name (SNI) and checked against the server's certificate; empty:
    # the address dialled. HugeCTR's default, "redis.localhost", is not applied: HugeCTR sent
    # the name without checking it; checked here, it would reject a certificate issued for the
    # server's own address.
    tls_server_name_identification: str = ""
    # Extensions (Redis): per-operation timeouts and the reconnect back-off after an outage.
    # One address of a non-cluster server means standalone Redis; several addresses, or one
    # of a cluster-enabled server, mean Redis Cluster.
    socket_timeout_ms: int = 1000
    connect_timeout_ms: int = 500
    reconnect_backoff_ms: int = 100
    reconnect_backoff_max_ms: int = 5000
    # Partitioning and bounds (per partition, as HPS).
    num_partitions: int = field(default_factory=lambda: min(16, os.cpu_count() or 1))
    allocation_rate: int = 256 * 1024 * 1024
    shared_memory_size: int = 16 * 1024**3
    shared_memory_name: str = "hctr_mp_hash_map_database"
    max_batch_size: int = 64 * 1024
    overflow_margin: int = MAX_SIZE_T
    overflow_policy: str = "evict_random"
    overflow_resolution_target: float = 0.8
    # Fraction of each table copied into the VDB at start-up.
    initial_cache_rate: float = 1.0
    initialize_after_startup: bool = True
    refresh_time_after_fetch: bool = False
    # Promote rows found only in the PDB into the VDB (in the background).
    cache_missed_embeddings: bool = False
    update_filters: list[str] = field(default_factory=lambda: ["^hps_.+$"])
    # Extension: storage dtype of VDB rows ("float32"; "float16" or "bfloat16": half the
    # memory, bf16 keeps fp32's range, fp16 more mantissa bits; "int8": a quarter plus a
    # 4-byte scale per row, each element within half a step of max |x| / 127 of its row);
    # lookups return float32.
    storage_dtype: str = "float32"

    def validate(self, src: str | None) -> None:
        self.type = _choice("volatile_db.type", self.type, VDB_TYPES, src, ALIASES)
        self.overflow_policy = _choice("volatile_db.overflow_policy", self.overflow_policy,
                                       OVERFLOW_POLICIES, src, POLICY_ALIASES)  # fmt: skip
        self.storage_dtype = _choice("volatile_db.storage_dtype", self.storage_dtype,
                                     STORAGE_DTYPES, src)  # fmt: skip
        _at_least("volatile_db.num_partitions", self.num_partitions, 1, src)
        _at_least("volatile_db.max_batch_size", self.max_batch_size, 1, src)
        _at_least("volatile_db.overflow_margin", self.overflow_margin, 1, src)
        _fraction("volatile_db.overflow_resolution_target", self.overflow_resolution_target, src)
        _fraction("volatile_db.initial_cache_rate", self.initial_cache_rate, src)
        for name in ("socket_timeout_ms", "connect_timeout_ms", "reconnect_backoff_ms"):
            _at_least(f"volatile_db.{name}", getattr(self, name), 1, src)
        _at_least("volatile_db.reconnect_backoff_max_ms", self.reconnect_backoff_max_ms, 1, src)
        if self.type == "redis_cluster" and not self.addresses():
            raise ConfigError("volatile_db.address", self.address, "one or more 'host:port'", src)

    def addresses(self) -> list[str]:
        """Redis endpoints as a list of "host:port" (``address`` was made so at load)."""
        return [a for a in self.address.split(",") if a]


@dataclass
class PersistentDBConfig:
    """``persistent_db``: the L3 tier, RocksDB on local disk."""

    type: str = "disabled"
    path: str = "/tmp/rocksdb"
    num_threads: int = 16
    read_only: bool = False
    max_batch_size: int = 64 * 1024
    update_filters: list[str] = field(default_factory=lambda: ["^hps_.+$"])
    # Extension: open as a RocksDB secondary that follows a live primary (another process that
    # writes updates); the server catches up every catch_up_interval_ms. Implies read-only.
    secondary_path: str = ""
    catch_up_interval_ms: int = 500

    def validate(self, src: str | None) -> None:
        self.type = _choice("persistent_db.type", self.type, PDB_TYPES, src, ALIASES)
        _at_least("persistent_db.num_threads", self.num_threads, 1, src)
        _at_least("persistent_db.max_batch_size", self.max_batch_size, 1, src)
        if self.type == "rocks_db" and not self.path:
            raise ConfigError("persistent_db.path", self.path, "a directory path", src)


@dataclass
class UpdateSourceConfig:
    """``update_source``: where online row updates come from."""

    type: str = "null"
    # "" = the default of the type: Redis's 127.0.0.1:6379 for redis_stream (it was Kafka's
    # 127.0.0.1:9092, HPS's, for every type), Kafka's otherwise
    brokers: str = ""
    metadata_refresh_interval_ms: int = 30_000
    receive_buffer_size: int = 256 * 1024
    poll_timeout_ms: int = 500
    max_batch_size: int = 8 * 1024
    failure_backoff_ms: int = 50
    max_commit_interval: int = 32
    # Extensions (redis_stream): ``brokers`` is the stream's Redis ("host:port", a list for a
    # cluster); one stream holds every table's updates; each store that must see every update
    # reads with its own consumer group ("" = "hps:<scope>"); an entry a crashed consumer left
    # pending longer than claim_idle_ms is taken over by another consumer of the group.
    # A round reads min(max_batch_size, 16) entries (of up to ~1 MB each), so rounds stay short.
    stream: str = "hps_updates"
    group: str = ""
    scope: str = "all"
    user_name: str = ""
    password: str = ""
    claim_idle_ms: int = 30_000

    def validate(self, src: str | None) -> None:
        self.type = _choice("update_source.type", self.type, UPDATE_SOURCE_TYPES, src,
                            UPDATE_SOURCE_ALIASES)  # fmt: skip
        self.scope = _choice("update_source.scope", self.scope, ("all", "shared", "local", "cache"),
                             src)  # fmt: skip
        if not self.brokers:
            self.brokers = "127.0.0.1:6379" if self.type == "redis_stream" else "127.0.0.1:9092"
        _at_least("update_source.max_batch_size", self.max_batch_size, 1, src)
        _at_least("update_source.poll_timeout_ms", self.poll_timeout_ms, 1, src)
        _at_least("update_source.claim_idle_ms", self.claim_idle_ms, 1, src)
        if not self.stream:
            raise ConfigError("update_source.stream", self.stream, "a stream name", src)


@dataclass
class ModelConfig:
    """One entry of ``models``: a model's embedding tables and its cache settings."""

    model: str
    sparse_files: list[str]
    embedding_vecsize_per_table: list[int]
    maxnum_catfeature_query_per_table_per_sample: list[int]
    embedding_table_names: list[str] = field(default_factory=list)
    default_value_for_each_table: list[float] = field(default_factory=list)
    deployed_device_list: list[int] = field(default_factory=lambda: [0])
    max_batch_size: int = 64
    gpucache: bool = True
    gpucacheper: float = 0.2
    hit_rate_threshold: float = 0.9
    cache_refresh_percentage_per_iteration: float = 0.0
    use_static_table: bool = False
    # Accepted for compatibility; the dense network is an ONNX model served beside us.
    dense_file: str = ""
    network_file: str = ""
    maxnum_des_feature_per_sample: int = 26
    label_dim: int = 1
    slot_num: int = 10
    num_of_worker_buffer_in_pool: int = 1
    num_of_refresher_buffer_in_pool: int = 1
    refresh_delay: float = 0.0
    refresh_interval: float = 0.0
    thread_pool_size: int = 16
    use_mixed_precision: bool = False
    scaler: float = 1.0
    use_algorithm_search: bool = True
    use_cuda_graph: bool = True
    use_context_stream: bool = True
    fuse_embedding_table: bool = False
    embedding_cache_type: str = "dynamic"
    # Extensions: L1 replacement policy and associativity, storage dtype of L1 rows.
    cache_policy: str = "lru"
    cache_ways: int = 8
    cache_storage_dtype: str = "float32"
    # Extension: pre-fill L1 at load with each table's hottest keys, from the sparse file's
    # ``meta`` (``hot_keys``) or from ``hot_key_files`` (one .npy/.txt of keys per table,
    # hottest first; "" for none), so the first requests are not cold.
    cache_prefill: bool = True
    hot_key_files: list[str] = field(default_factory=list)
    # Extension: a missed key enters L1 only once it has been requested this many times
    # (counted in a count-min sketch that halves as it ages); 1 admits every miss, as HPS.
    # 2 keeps keys asked for once from evicting hot rows: see hps_core/cache/admission.py.
    cache_admission_min_count: int = 1

    def validate(self, src: str | None, i: int) -> None:
        p = f"models[{i}]"
        if not self.model:
            raise ConfigError(f"{p}.model", self.model, "a non-empty model name", src)
        n = len(self.sparse_files)
        if n == 0:
            raise ConfigError(f"{p}.sparse_files", self.sparse_files, "at least one table", src)
        if not self.embedding_table_names:
            self.embedding_table_names = [f"sparse_embedding{t}" for t in range(n)]
        given = self.default_value_for_each_table
        # As HugeCTR's hps.json parser: the tables past the list get 0.0, extra values are
        # dropped. Said where it matters: [0.0] for many tables is common and means all 0.0.
        if given and (len(given) > n or (len(given) < n and any(given))):
            log.warning(
                "%s: %s.default_value_for_each_table gives %d value(s) for %d tables: %s",
                src or "config", p, len(given), n,
                f"tables {len(given)}..{n - 1} default to 0.0" if len(given) < n
                else f"values past the first {n} are ignored",
            )  # fmt: skip
        self.default_value_for_each_table = (given + [0.0] * n)[:n]
        for name in (
            "embedding_table_names",
            "embedding_vecsize_per_table",
            "maxnum_catfeature_query_per_table_per_sample",
            "default_value_for_each_table",
        ):
            got = getattr(self, name)
            if len(got) != n:
                raise ConfigError(
                    f"{p}.{name}", got, f"one entry per sparse file ({n} entries)", src
                )
        for t, name in enumerate(self.embedding_table_names):
            if not name:
                raise ConfigError(f"{p}.embedding_table_names[{t}]", name, "a non-empty name", src)
        if len(set(self.embedding_table_names)) != n:
            raise ConfigError(
                f"{p}.embedding_table_names", self.embedding_table_names, "unique names", src
            )
        for t, d in enumerate(self.embedding_vecsize_per_table):
            _at_least(f"{p}.embedding_vecsize_per_table[{t}]", d, 1, src)
        for t, q in enumerate(self.maxnum_catfeature_query_per_table_per_sample):
            _at_least(f"{p}.maxnum_catfeature_query_per_table_per_sample[{t}]", q, 1, src)
        _at_least(f"{p}.max_batch_size", self.max_batch_size, 1, src)
        _fraction(f"{p}.gpucacheper", self.gpucacheper, src)
        # above 1: the missed rows always enter L1 before the answer (HPS's way to turn the
        # asynchronous insertion off)
        _at_least(f"{p}.hit_rate_threshold", self.hit_rate_threshold, 0, src)
        _fraction(
            f"{p}.cache_refresh_percentage_per_iteration",
            self.cache_refresh_percentage_per_iteration,
            src,
        )
        self.cache_policy = _choice(f"{p}.cache_policy", self.cache_policy, CACHE_POLICIES, src)
        self.embedding_cache_type = _choice(
            f"{p}.embedding_cache_type", self.embedding_cache_type, CACHE_TYPES, src
        )
        if self.embedding_cache_type == "uvm":
            log.warning(
                "%s: %s.embedding_cache_type = 'uvm' is not supported: the L1 cache is in "
                "device memory ('dynamic')", src or "config", p,
            )  # fmt: skip
        self.cache_storage_dtype = _choice(
            f"{p}.cache_storage_dtype", self.cache_storage_dtype, CACHE_DTYPES, src
        )
        _at_least(f"{p}.cache_ways", self.cache_ways, 1, src)
        _at_least(f"{p}.cache_admission_min_count", self.cache_admission_min_count, 1, src)
        if self.cache_admission_min_count > 255:
            raise ConfigError(
                f"{p}.cache_admission_min_count",
                self.cache_admission_min_count,
                "at most 255 (the sketch counts to 255)",
                src,
            )
        if self.hot_key_files and len(self.hot_key_files) != n:
            raise ConfigError(
                f"{p}.hot_key_files", self.hot_key_files, f"one entry per sparse file ({n})", src
            )
        for d in self.deployed_device_list:
            _at_least(f"{p}.deployed_device_list", d, 0, src)

    @property
    def num_tables(self) -> int:
        return len(self.sparse_files)

    @property
    def static_table(self) -> bool:
        """HPS's static embedding table (``use_static_table``, or ``embedding_cache_type:
        static``): on a GPU, L1 holds the whole table in an open-addressing table that never
        evicts, filled at load; ``gpucacheper`` does not apply."""
        return self.use_static_table or self.embedding_cache_type == "static"

    def max_keys_per_request(self) -> int:
        """Upper bound on keys in one request: max_batch_size x sum of per-table queries."""
        return self.max_batch_size * sum(self.maxnum_catfeature_query_per_table_per_sample)


@dataclass
class HPSConfig:
    """The whole parameter-server configuration."""

    models: list[ModelConfig]
    supportlonglong: bool = True
    volatile_db: VolatileDBConfig = field(default_factory=VolatileDBConfig)
    persistent_db: PersistentDBConfig = field(default_factory=PersistentDBConfig)
    update_source: UpdateSourceConfig = field(default_factory=UpdateSourceConfig)
    fuse_embedding_table: bool = False  # HugeCTR's table fusion (see _NO_EFFECT)
    source: str | None = None

    def model(self, name: str) -> ModelConfig:
        """The model entry called ``name``."""
        for m in self.models:
            if m.model == name:
                return m
        from .errors import UnknownModelError

        raise UnknownModelError(name, [m.model for m in self.models])


# Fields HPS defined that change nothing here; mentioned once per load so nobody is surprised.
_KAFKA = "a Kafka setting; updates arrive over Redis Streams (update_source)"
_DENSE = "the dense network runs as an ONNX model in its own Triton model"
_NO_EFFECT = {
    "dense_file": "the dense network runs as an ONNX model in its own Triton model",
    "network_file": "the dense network runs as an ONNX model in its own Triton model",
    "num_of_worker_buffer_in_pool": "lookups allocate per request",
    "num_of_refresher_buffer_in_pool": "lookups allocate per request",
    "use_cuda_graph": "no CUDA graphs are used",
    "use_algorithm_search": "no dense-layer algorithm search here",
    "allocation_rate": "hash-map rows are sized from the table, not a fixed allocation rate",
    "fuse_embedding_table": "the tables of a request are looked up in one fused call already",
    "shared_memory_size": "shared tables are sized from their rows (see hps estimate)",
    "update_filters": "every table of the update stream goes to the stores that hold it",
    "metadata_refresh_interval_ms": _KAFKA,
    "receive_buffer_size": _KAFKA,
    "max_commit_interval": _KAFKA,
    "cache_refresh_percentage_per_iteration": "L1 is pre-filled at load (cache_prefill) and "
    "online updates reach it directly",
    "refresh_delay": "online updates reach L1 directly; there is no timed refresh",
    "refresh_interval": "online updates reach L1 directly; there is no timed refresh",
    "maxnum_des_feature_per_sample": _DENSE,
    "label_dim": _DENSE,
    "slot_num": "the slots are the model's tables (embedding_table_names)",
    "use_mixed_precision": _DENSE,
    "scaler": _DENSE,
    "thread_pool_size": "lookups run on numba's threads (NUMBA_NUM_THREADS)",
    "use_context_stream": "GPU work runs on CuPy's current stream",
}
# Keys HugeCTR or its Triton backends read (or once read) that have no field here: accepted,
# and said once, instead of the warning for an unknown key.
_HUGECTR_KEYS = {
    "shared_memory_auto_remove": "`hps serve` and `make demo` remove the shared tables they "
    "filled when they stop; tables `hps load` filled stay for the next server",
    "init_ec": "L1 is filled at load from the hottest keys (cache_prefill)",
    "use_hctr_cache_implementation": "L1 is this project's own cache",
    "enable_pagelock": "no page-locked host copy of the tables is kept",
    "fp8_quant": "use storage_dtype / cache_storage_dtype (float16, bfloat16, int8)",
    "algorithm": "the VDB is a numba hash map",
    "max_receive_buffer_size": "updates arrive over Redis Streams (update_source)",
}
_UNSUPPORTED = {
    ("update_source.type", "kafka_message_queue"): (
        "Kafka is not supported in this version: online updates are ignored; use "
        "'redis_stream' (the same HCTR message payload on a Redis Stream)"
    ),
}


def load_config_dict(path: str | os.PathLike) -> dict:
    """A config file (.json, .yaml/.yml) parsed, not yet validated; errors name the file."""
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise ConfigError("<file>", src, "an existing config file (hps.json or .yaml)", None)
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(
            "<file>", src, f"a UTF-8 text file (byte {e.start}: {e.reason})"
        ) from None
    except OSError as e:
        raise ConfigError("<file>", src, f"a readable file ({e.strerror})") from None
    raw = _parse_text(text, path)
    if not isinstance(raw, dict):
        raise ConfigError("<root>", type(raw).__name__, "a JSON/YAML object", src)
    return raw


def load_config(source: str | os.PathLike | dict) -> HPSConfig:
    """Load and validate a config from a path (.json, .yaml/.yml) or an already-parsed dict."""
    if isinstance(source, dict):
        raw, src, base = source, None, Path.cwd()
    else:
        raw, src, base = load_config_dict(source), str(source), Path(source).resolve().parent
    cfg = _build(HPSConfig, raw, "", src)
    cfg.source = src
    if not isinstance(cfg.models, list) or not cfg.models:
        raise ConfigError("models", raw.get("models"), "a non-empty list of models", src)
    if not cfg.supportlonglong:
        log.warning("%s: supportlonglong=false: 32-bit keys are widened to int64", src or "config")
    cfg.volatile_db.validate(src)
    cfg.persistent_db.validate(src)
    cfg.update_source.validate(src)
    names = set()
    stored: dict[str, str] = {}  # the VDB/PDB name of every table: whose it is
    for i, m in enumerate(cfg.models):
        m.validate(src, i)
        if m.model in names:
            raise ConfigError(
                f"models[{i}].model", m.model, "a name not used by another model", src
            )
        names.add(m.model)
        for t in m.embedding_table_names:
            other = stored.setdefault(store_table_name(m.model, t), m.model)
            if other != m.model:
                raise ConfigError(
                    f"models[{i}].embedding_table_names", t,
                    f"a name whose stored name {store_table_name(m.model, t)!r} is not also a table "
                    f"of model {other!r} ('.' in model and table names)", src,
                )  # fmt: skip
        m.sparse_files = [resolve_path(base, p) for p in m.sparse_files]
        m.hot_key_files = [resolve_path(base, p) if p else "" for p in m.hot_key_files]
    if cfg.persistent_db.type != "disabled":
        cfg.persistent_db.path = resolve_path(base, cfg.persistent_db.path)
    for (name, value), why in _UNSUPPORTED.items():
        section, attr = name.split(".")
        if getattr(getattr(cfg, section), attr) == value:
            log.warning("%s: %s = %r: %s", src or "config", name, value, why)
    return cfg


def store_table_name(model: str, table: str) -> str:
    """HPS's storage naming of a model's table in the VDB and PDB."""
    return f"hps_et.{model}.{table}"


def _parse_text(text: str, path: Path) -> Any:
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer of 5000 digits
            raise ConfigError("<file>", str(path), f"valid YAML ({e})", str(path)) from None
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError, or an integer past Python's 4300 digits
        if not isinstance(e, json.JSONDecodeError):
            raise ConfigError("<file>", str(path), f"valid JSON ({e})", str(path)) from None
        raise ConfigError(
            "<file>",
            str(path),
            f"valid JSON (line {e.lineno}, column {e.colno}: {e.msg})",
            str(path),
        ) from None


def resolve_path(base: Path, p: str) -> str:
    """Relative paths are taken relative to the config file's directory."""
    q = Path(os.path.expanduser(p))
    return str(q if q.is_absolute() else (base / q))


def _build(cls: type, raw: Any, prefix: str, src: str | None) -> Any:
    """Build dataclass ``cls`` from a dict, checking each field's type."""
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", raw, "an object", src)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.name != "source"}
    kwargs = {}
    aliases = {"max_get_batch_size": "max_batch_size", "max_set_batch_size": "max_batch_size"}
    for key, value in raw.items():
        name = aliases.get(key, key) if key not in known else key
        if name not in known and key in _HUGECTR_KEYS:
            log.info("config key '%s%s' has no effect: %s", prefix, key, _HUGECTR_KEYS[key])
            continue
        if name not in known:
            log.warning("%s: unknown config key '%s%s' ignored", src or "config", prefix, key)
            continue
        if name in _NO_EFFECT and value not in (None, "", known[name].default):
            log.info("config key '%s%s' has no effect: %s", prefix, key, _NO_EFFECT[name])
        value = _coerce(hints[name], value, f"{prefix}{key}", src)
        if key in aliases and name in kwargs and kwargs[name] != value:
            value = min(value, kwargs[name])
            log.warning(
                "%s: %smax_get_batch_size and %smax_set_batch_size differ: reads and writes "
                "both use the smaller, %d", src or "config", prefix, prefix, value,
            )  # fmt: skip
        kwargs[name] = value
    for f in known.values():
        if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{prefix}{f.name}", None, "a value (the field is required)", src)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str, src: str | None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, name, src)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(name, value, f"a list of {item.__name__}", src)
        return [_coerce(item, v, f"{name}[{i}]", src) for i, v in enumerate(value)]
    if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
        if tp is ModelConfig and isinstance(value, list):
            raise ConfigError(name, value, "an object", src)
        return _build(tp, value, f"{name}.", src)
    if isinstance(value, str) and tp in (bool, int, float):
        value = _from_string(tp, value)  # "6", "0.5", "true": HugeCTR's Triton backends took them
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(name, value, "true or false", src)
    if tp is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value != int(value)
        ):
            raise ConfigError(name, value, "an integer", src)
        if not -(2**63) <= value < 2**63:
            raise ConfigError(name, value, "an integer within 64 bits", src)
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, value, "a number", src)
        return float(value)
    if tp is str:
        if name.endswith(_ADDRESSES):
            return _addresses(name, value, src)
        if not isinstance(value, str):
            raise ConfigError(name, value, "a string", src)
        return value
    return value


_ADDRESSES = (".address", ".brokers")  # Redis "host:port" lists


def _from_string(tp: type, value: str) -> Any:
    """A number or boolean written as a string, or the string itself when it is not one."""
    v = value.strip()
    if tp is bool:
        return {"true": True, "1": True, "false": False, "0": False}.get(v.lower(), value)
    try:
        return int(v) if tp is int else float(v)
    except ValueError:
        return value


def split_address(address: str) -> tuple[str, int] | None:
    """``"host:port"`` (port 1-65535) as (host, port); None for anything else."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _addresses(name: str, value: Any, src: str | None) -> str:
    """Redis addresses as "host:port,host:port": a JSON list or a string separated by "," or
    ";" (HugeCTR's form); an address without a port gets Redis's 6379."""
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in items):
        raise ConfigError(name, value, "a string of 'host:port' entries, or a list of them", src)
    out = []
    for entry in ",".join(items).replace(";", ",").split(","):
        a = entry.strip()
        if not a:
            continue
        host, sep, port = a.rpartition(":")
        if not sep or host.endswith(":") or port.endswith("]"):  # no port (IPv6 in brackets)
            a = f"{a}:{REDIS_PORT}"
        hp = split_address(a)
        if hp is None:
            raise ConfigError(name, value, "'host:port' entries (port 1-65535)", src)
        out.append(f"{hp[0]}:{hp[1]}")
    return ",".join(out)


def _choice(name: str, value: Any, allowed: tuple, src: str | None, aliases=None) -> Any:
    """``value`` if allowed (another spelling HugeCTR took, as ``aliases`` maps it, becomes
    the allowed one); a ConfigError naming the field otherwise."""
    if isinstance(value, str):
        v = value.strip().lower().replace("-", "_").replace(" ", "_")
        v = (aliases or {}).get(v, v)
        if v in allowed:
            return v
    raise ConfigError(name, value, "one of " + ", ".join(repr(a) for a in allowed), src)


def _at_least(name: str, value: float, low: float, src: str | None) -> None:
    if value < low:
        raise ConfigError(name, value, f">= {low}", src)


def _fraction(name: str, value: float, src: str | None) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(name, value, "a number between 0 and 1", src)
