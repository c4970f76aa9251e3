"""Config loading: HugeCTR hps.json unchanged, our YAML, and errors that name the field."""

from __future__ import annotations

import json
import logging

import pytest

from hps_core import ConfigError, load_config
from hps_core.config import MAX_SIZE_T

# A HugeCTR hps.json as HPS users wrote them (fields from the HPS documentation), unchanged.
HUGECTR_HPS_JSON = {
    "supportlonglong": True,
    "volatile_db": {
        "type": "parallel_hash_map",
        "num_partitions": 15,
        "overflow_policy": "evict_least_used",
        "overflow_margin": 1000000,
        "overflow_resolution_target": 0.95,
        "initial_cache_rate": 1.0,
        "initialize_after_startup": True,
        "cache_missed_embeddings": False,
        "max_get_batch_size": 10000,
        "update_filters": ["^hps_.+$"],
    },
    "persistent_db": {
        "type": "rocks_db",
        "path": "/tmp/hps_rocksdb",
        "num_threads": 8,
        "read_only": False,
        "max_batch_size": 10000,
    },
    "update_source": {"type": "null"},
    "models": [
        {
            "model": "wdl",
            "sparse_files": [
                "/wdl_infer/model/wdl/1/wdl0_sparse_20000.model",
                "/wdl_infer/model/wdl/1/wdl1_sparse_20000.model",
            ],
            "dense_file": "/wdl_infer/model/wdl/1/wdl_dense_20000.model",
            "network_file": "/wdl_infer/model/wdl/1/wdl.json",
            "num_of_worker_buffer_in_pool": 4,
            "num_of_refresher_buffer_in_pool": 1,
            "deployed_device_list": [0],
            "max_batch_size": 64,
            "default_value_for_each_table": [0.0, 0.0],
            "maxnum_des_feature_per_sample": 13,
            "maxnum_catfeature_query_per_table_per_sample": [2, 26],
            "embedding_vecsize_per_table": [1, 16],
            "embedding_table_names": ["table1", "table2"],
            "refresh_delay": 0.0,
            "refresh_interval": 0.0,
            "hit_rate_threshold": 0.9,
            "gpucacheper": 0.1,
            "gpucache": True,
            "cache_refresh_percentage_per_iteration": 0.2,
            "label_dim": 1,
            "slot_num": 28,
            "use_static_table": False,
        }
    ],
}


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj) if name.endswith(".json") else obj)
    return p


def test_hugectr_hps_json_loads_unchanged(tmp_path):
    cfg = load_config(write(tmp_path, "hps.json", HUGECTR_HPS_JSON))
    m = cfg.model("wdl")
    assert m.sparse_files == HUGECTR_HPS_JSON["models"][0]["sparse_files"]
    assert m.embedding_table_names == ["table1", "table2"]
    assert m.embedding_vecsize_per_table == [1, 16]
    assert m.maxnum_catfeature_query_per_table_per_sample == [2, 26]
    assert m.max_keys_per_request() == 64 * 28
    assert (m.gpucache, m.gpucacheper, m.hit_rate_threshold) == (True, 0.1, 0.9)
    assert m.cache_refresh_percentage_per_iteration == 0.2
    v = cfg.volatile_db
    assert (v.type, v.num_partitions, v.overflow_policy) == (
        "parallel_hash_map",
        15,
        "evict_least_used",
    )
    assert (v.overflow_margin, v.overflow_resolution_target) == (1000000, 0.95)
    assert v.max_batch_size == 10000  # max_get_batch_size is HPS's older name
    p = cfg.persistent_db
    assert (p.type, p.path, p.num_threads, p.read_only, p.max_batch_size) == (
        "rocks_db",
        "/tmp/hps_rocksdb",
        8,
        False,
        10000,
    )
    assert cfg.update_source.type == "null"


def test_hps_defaults_are_kept(tmp_path):
    cfg = load_config(
        {
            "models": [
                {
                    "model": "m",
                    "sparse_files": ["/a"],
                    "embedding_vecsize_per_table": [8],
                    "maxnum_catfeature_query_per_table_per_sample": [1],
                }
            ]
        }
    )
    v, p, m = cfg.volatile_db, cfg.persistent_db, cfg.models[0]
    assert cfg.supportlonglong is True
    assert v.type == "parallel_hash_map" and v.overflow_policy == "evict_random"
    assert v.overflow_margin == MAX_SIZE_T and v.overflow_resolution_target == 0.8
    assert v.initial_cache_rate == 1.0 and v.cache_missed_embeddings is False
    assert v.max_batch_size == 65536 and v.user_name == "default"
    assert p.type == "disabled" and p.num_threads == 16 and p.read_only is False
    assert m.embedding_table_names == ["sparse_embedding0"]
    assert m.default_value_for_each_table == [0.0]
    assert m.deployed_device_list == [0] and m.hit_rate_threshold == 0.9
    assert m.gpucacheper == 0.2 and m.gpucache is True  # HugeCTR's hps.json parser's defaults


def test_what_hugectr_and_its_triton_backends_also_took(tmp_path, caplog):
    """Spellings real hps.json files use: numbers and booleans as strings (the Triton
    backends parsed them), HugeCTR's other names for types and policies, Redis addresses
    separated by ';' or without a port, hit_rate_threshold above 1 (asynchronous L1
    insertion off), a shorter default_value_for_each_table (the rest 0.0, as HugeCTR's
    parser), and keys HugeCTR read that change nothing here (said, not warned about)."""
    raw = json.loads(json.dumps(HUGECTR_HPS_JSON))
    raw["supportlonglong"] = "true"
    raw["fuse_embedding_table"] = True
    raw["volatile_db"].update(type="Redis", address="10.0.0.1:7000;10.0.0.2 ; [::1]",
                              overflow_policy="least-used", num_partitions=" 6",
                              shared_memory_auto_remove=True, shared_memory_size=1 << 30,
                              update_filters=["^hps_et.m.t0$"])  # fmt: skip
    raw["persistent_db"].update(type="rocksdb", read_only="0")
    raw["update_source"] = {"type": "none", "receive_buffer_size": 1024}
    m = raw["models"][0]
    m.update(max_batch_size="64", gpucacheper="0.25", hit_rate_threshold=1.1, init_ec=True,
             default_value_for_each_table=["0.5"], deployed_device_list=["1"],
             refresh_interval=10.0, thread_pool_size=4, label_dim=2)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="hps_core.config"):
        cfg = load_config(write(tmp_path, "hps.json", raw))
    v, p, m = cfg.volatile_db, cfg.persistent_db, cfg.models[0]
    assert cfg.supportlonglong is True and cfg.fuse_embedding_table is True
    assert (v.type, v.overflow_policy, v.num_partitions) == ("redis_cluster", "evict_least_used", 6)
    assert v.addresses() == ["10.0.0.1:7000", "10.0.0.2:6379", "[::1]:6379"]
    assert (p.type, p.read_only, cfg.update_source.type) == ("rocks_db", False, "null")
    assert (m.max_batch_size, m.gpucacheper, m.hit_rate_threshold) == (64, 0.25, 1.1)
    assert m.default_value_for_each_table == [0.5, 0.0] and m.deployed_device_list == [1]
    text = caplog.text
    assert "unknown config key" not in text, text
    for key in ("fuse_embedding_table", "volatile_db.shared_memory_auto_remove", "init_ec",
                "volatile_db.shared_memory_size", "volatile_db.update_filters",
                "update_source.receive_buffer_size", "refresh_interval", "thread_pool_size",
                "label_dim"):  # fmt: skip
        assert f"config key '{key}' has no effect" in text or f"].{key}' has no effect" in text, key
    assert "default_value_for_each_table gives 1 value(s) for 2 tables: tables 1..1 default" in text
    raw["models"][0]["default_value_for_each_table"] = [1.0, 2.0, 3.0]  # one too many
    cfg = load_config(write(tmp_path, "hps.json", raw))
    assert cfg.models[0].default_value_for_each_table == [1.0, 2.0]


def test_yaml_equals_json(tmp_path):
    yaml = pytest.importorskip("yaml")
    j = load_config(write(tmp_path, "hps.json", HUGECTR_HPS_JSON))
    y = load_config(write(tmp_path, "hps.yaml", yaml.safe_dump(HUGECTR_HPS_JSON)))
    j.source = y.source = None
    assert j == y


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    raw = json.loads(json.dumps(HUGECTR_HPS_JSON))
    raw["models"][0]["sparse_files"] = ["t0", "sub/t1"]
    raw["persistent_db"]["path"] = "db"
    cfg = load_config(write(tmp_path, "hps.json", raw))
    assert cfg.models[0].sparse_files == [str(tmp_path / "t0"), str(tmp_path / "sub/t1")]
    assert cfg.persistent_db.path == str(tmp_path / "db")


def test_unknown_keys_warn_and_kafka_says_unsupported(tmp_path, caplog):
    raw = json.loads(json.dumps(HUGECTR_HPS_JSON))
    raw["volatile_db"]["no_such_option"] = 3
    raw["update_source"] = {"type": "kafka_message_queue", "brokers": "127.0.0.1:9092"}
    with caplog.at_level(logging.WARNING):
        cfg = load_config(write(tmp_path, "hps.json", raw))
    assert cfg.update_source.type == "kafka_message_queue"
    text = caplog.text
    assert "volatile_db.no_such_option" in text
    assert "Kafka is not supported" in text


@pytest.mark.parametrize(
    "source,brokers",
    [
        ({"type": "redis_stream"}, "127.0.0.1:6379"),  # was Kafka's 127.0.0.1:9092
        ({"type": "redis_stream", "brokers": ""}, "127.0.0.1:6379"),
        ({"type": "redis_stream", "brokers": "10.0.0.5"}, "10.0.0.5:6379"),
        ({"type": "kafka_message_queue"}, "127.0.0.1:9092"),  # HPS's default
        ({"type": "redis_stream", "brokers": "h:7001,h:7002"}, "h:7001,h:7002"),
    ],
)
def test_the_update_stream_address_defaults_to_the_types_port(tmp_path, source, brokers):
    raw = json.loads(json.dumps(HUGECTR_HPS_JSON))
    raw["update_source"] = source
    assert load_config(write(tmp_path, "hps.json", raw)).update_source.brokers == brokers


def mutate(path, value):
    raw = json.loads(json.dumps(HUGECTR_HPS_JSON))
    obj = raw
    for p in path[:-1]:
        obj = obj[p]
    if value is KeyError:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return raw


@pytest.mark.parametrize(
    "path,value,field,expected",
    [
        (("volatile_db", "type"), "memcached", "volatile_db.type", "one of"),
        (
            ("volatile_db", "overflow_policy"),
            "evict_lru",
            "volatile_db.overflow_policy",
            "evict_least_used",
        ),
        (("volatile_db", "num_partitions"), "8 parts", "volatile_db.num_partitions", "integer"),
        (("volatile_db", "address"), "h:70000", "volatile_db.address", "'host:port' entries"),
        (("models", 0, "hit_rate_threshold"), -0.1, "models[0].hit_rate_threshold", ">= 0"),
        (
            ("volatile_db", "overflow_resolution_target"),
            1.5,
            "volatile_db.overflow_resolution_target",
            "between 0 and 1",
        ),
        (("persistent_db", "type"), "leveldb", "persistent_db.type", "rocks_db"),
        (
            ("volatile_db", "storage_dtype"),
            "int4",
            "volatile_db.storage_dtype",
            "'float32', 'float16', 'bfloat16', 'int8'",
        ),
        (("persistent_db", "read_only"), "yes", "persistent_db.read_only", "true or false"),
        (
            ("models", 0, "embedding_vecsize_per_table"),
            [16],
            "models[0].embedding_vecsize_per_table",
            "one entry per sparse file",
        ),
        (
            ("models", 0, "embedding_vecsize_per_table"),
            [0, 16],
            "models[0].embedding_vecsize_per_table[0]",
            ">= 1",
        ),
        (("models", 0, "gpucacheper"), 2.0, "models[0].gpucacheper", "between 0 and 1"),
        (
            ("models", 0, "embedding_cache_type"),
            "huge",
            "models[0].embedding_cache_type",
            "'dynamic', 'static', 'uvm'",
        ),
        (("models", 0, "model"), KeyError, "models[0].model", "required"),
        (("models", 0, "sparse_files"), 7, "models[0].sparse_files", "a list of str"),
        (("models",), [], "models", "non-empty"),
        (
            ("models", 0, "embedding_table_names"),
            ["a", "a"],
            "models[0].embedding_table_names",
            "unique",
        ),
        (
            ("models", 0, "embedding_table_names"),
            ["", "a"],
            "models[0].embedding_table_names[0]",
            "non-empty",
        ),
        # json.dumps writes NaN / Infinity, and json.loads (as YAML's .nan / .inf) reads them
        (("volatile_db", "num_partitions"), float("nan"), "volatile_db.num_partitions", "integer"),
        (("volatile_db", "num_partitions"), float("inf"), "volatile_db.num_partitions", "integer"),
        (("volatile_db", "num_partitions"), 1e30, "volatile_db.num_partitions", "64 bits"),
        (("volatile_db", "type"), ["hash_map"], "volatile_db.type", "a string"),
        (("models", 0, "model"), ["a", "b"], "models[0].model", "a string"),
    ],
)
def test_bad_fields_name_field_value_and_expectation(tmp_path, path, value, field, expected):
    p = write(tmp_path, "hps.json", mutate(path, value))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"'{field}'" in msg and expected in msg and str(p) in msg
    assert e.value.field == field


def test_a_number_past_pythons_digit_limit_is_a_config_error(tmp_path):
    for name in ("hps.json", "hps.yaml"):
        p = tmp_path / name
        p.write_text('{"models": [], "supportlonglong": 1' + "0" * 5000 + "}")
        with pytest.raises(ConfigError, match="valid (JSON|YAML)") as e:
            load_config(p)
        assert str(p) in str(e.value)


def test_malformed_json_names_line(tmp_path):
    p = tmp_path / "hps.json"
    p.write_text('{\n  "models": [\n    {"model": "m",,}\n  ]\n}\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "line 3" in str(e.value) and str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="existing config file"):
        load_config(tmp_path / "nope.json")


def test_unreadable_text_and_upper_case_yaml(tmp_path):
    p = tmp_path / "hps.json"
    p.write_bytes(b'{"models": "\xff\xfe"}')
    with pytest.raises(ConfigError, match="UTF-8") as e:
        load_config(p)
    assert e.value.field == "<file>" and str(p) in str(e.value)
    model = {"model": "m", "sparse_files": ["a"], "embedding_vecsize_per_table": [4]}
    model["maxnum_catfeature_query_per_table_per_sample"] = [2]
    y = write(tmp_path, "hps.YAML", f"models: [{json.dumps(model)}]\n")  # JSON is YAML too
    assert load_config(y).models[0].embedding_vecsize_per_table == [4]
    raw = {
        "volatile_db": {"type": "redis_cluster", "address": ["h1:1", "h2:2"]},
        "models": [model],
    }
    assert load_config(raw).volatile_db.address == "h1:1,h2:2"  # a list of addresses is kept


def test_stored_table_names_of_two_models_may_not_meet(tmp_path):
    """Model 'a.b' + table 'c' and model 'a' + table 'b.c' would be one table hps_et.a.b.c."""
    raw = json.loads(json.dumps(HUGECTR_HPS_JSON))
    second = json.loads(json.dumps(raw["models"][0]))
    raw["models"][0]["model"], raw["models"][0]["embedding_table_names"] = "a", ["b.c", "d"]
    second["model"], second["embedding_table_names"] = "a.b", ["c", "e"]
    raw["models"].append(second)
    with pytest.raises(ConfigError, match=r"models\[1\].embedding_table_names.*hps_et\.a\.b\.c"):
        load_config(write(tmp_path, "hps.json", raw))
    second["embedding_table_names"] = ["c2", "e"]  # no shared stored name: fine
    assert [m.model for m in load_config(write(tmp_path, "hps.json", raw)).models] == ["a", "a.b"]


def test_duplicate_model_names(tmp_path):
    raw = json.loads(json.dumps(HUGECTR_HPS_JSON))
    raw["models"].append(raw["models"][0])
    with pytest.raises(ConfigError, match=r"models\[1\].model"):
        load_config(write(tmp_path, "hps.json", raw))


def test_static_table_from_either_hps_field(tmp_path, caplog):
    """HPS's static embedding table: ``use_static_table: true`` or ``embedding_cache_type:
    static``; 'uvm' loads with a warning that it is served as 'dynamic'."""
    for field, value, static in (
        ("use_static_table", True, True),
        ("embedding_cache_type", "static", True),
        ("embedding_cache_type", "dynamic", False),
        ("use_static_table", False, False),
    ):
        m = load_config(write(tmp_path, "hps.json", mutate(("models", 0, field), value))).models[0]
        assert m.static_table is static, (field, value)
    with caplog.at_level(logging.WARNING):
        load_config(
            write(tmp_path, "hps.json", mutate(("models", 0, "embedding_cache_type"), "uvm"))
        )
    assert "embedding_cache_type = 'uvm' is not supported" in caplog.text


def test_get_and_set_batch_sizes_that_differ_take_the_smaller(caplog):
    model = {"model": "m", "sparse_files": ["a"], "embedding_vecsize_per_table": [4]}
    model["maxnum_catfeature_query_per_table_per_sample"] = [2]
    for get, put in ((500, 800), (800, 500), (700, 700)):
        caplog.clear()
        raw = {"volatile_db": {"max_get_batch_size": get, "max_set_batch_size": put}}
        with caplog.at_level(logging.WARNING, logger="hps_core.config"):
            cfg = load_config({**raw, "models": [model]})
        assert cfg.volatile_db.max_batch_size == min(get, put)
        assert ("differ" in caplog.text) == (get != put)


def test_one_reading_of_host_port_for_every_address():
    """Redis addresses (VDB, update stream), the doctor and ``hps watch --url`` read
    "host:port" one way: a port outside 1-65535 or a missing host is refused everywhere (the
    stream and the VDB took port 0 or 70000 and failed later, at the connection)."""
    from hps_core.config import split_address
    from hps_core.doctor import FAIL
    from hps_core.doctor_config import check_redis_address
    from hps_core.updates.stream import connect
    from hps_core.vdb._redis_nodes import host_port

    good = {"h:1": ("h", 1), " 127.0.0.1:6379 ": ("127.0.0.1", 6379), "[::1]:7000": ("[::1]", 7000)}
    for text, want in good.items():
        assert split_address(text) == want
        assert host_port(text) == want
    for bad in ["h", "h:", ":6379", "h:0", "h:65536", "h:70000", "h:-1", "h:6379x", ""]:
        assert split_address(bad) is None, bad
        with pytest.raises(ConfigError, match="volatile_db.address"):
            host_port(bad)
        with pytest.raises(ConfigError, match="update_source.brokers"):
            connect(f"127.0.0.1:6379,{bad}" if bad else ",")
        assert check_redis_address(bad).status == FAIL
