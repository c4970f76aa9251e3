"""The hash-map VDB in shared memory: one writer, readers attached read-only, across processes."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest
from file_reference import stored
from small_tmpfs import in_small_tmpfs

from hps_core.errors import HPSError, InvalidInputError, StorageError
from hps_core.vdb import _kernels as K
from hps_core.vdb import hashmap, shm
from hps_core.vdb.hashmap import HashMapVDB

I64 = np.iinfo(np.int64)


@pytest.fixture
def name():
    """A unique shared-memory name; every file of it is gone afterwards, also on failure."""
    n = f"hps_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    yield n
    leftovers = list(shm.shm_dir().glob(f"{n}.*"))
    for p in leftovers:
        p.unlink()


def files(name: str) -> list[str]:
    return sorted(p.name for p in shm.shm_dir().glob(f"{name}.*"))


def test_a_reader_attaches_to_the_writers_tables_without_copying(name):
    writer = HashMapVDB(num_partitions=4, shared_memory_name=name)
    rng = np.random.default_rng(0)
    ref = {}
    for table, dim, dtype in (
        ("hps_et.m.a", 16, "float32"),
        ("hps_et.m.b", 8, "float16"),
        ("hps_et.m.bf", 8, "bfloat16"),
        ("hps_et.m.i8", 9, "int8"),
    ):
        writer.create_table(table, dim, dtype=dtype, capacity_hint=5000)
        keys = np.concatenate([[I64.min, I64.max, 0, -1], rng.integers(I64.min, I64.max, 3000)])
        vecs = rng.standard_normal((len(keys), dim)).astype(np.float32)
        writer.load(table, keys, vecs)
        writer.evict(table, keys[-100:])
        kept = stored(vecs[:-100], dtype)
        ref[table] = dict(zip(keys[:-100].tolist(), kept, strict=True))

    reader = HashMapVDB(shared_memory_name=name, shared_memory_readonly=True)
    assert reader.tables() == ["hps_et.m.a", "hps_et.m.b", "hps_et.m.bf", "hps_et.m.i8"]
    for table, expect in ref.items():
        assert reader.size(table) == len(expect)
        assert reader.dim(table) == writer.dim(table)
        assert reader.memory_bytes(table) == writer.memory_bytes(table)
        probe = np.array(list(expect) + [12345, 678], np.int64)
        got, found = reader.fetch(table, probe)
        np.testing.assert_array_equal(found, [True] * len(expect) + [False, False])
        np.testing.assert_array_equal(got[:-2], np.array(list(expect.values())))
        dk, dv = reader.dump(table)
        assert sorted(dk.tolist()) == sorted(expect)
        np.testing.assert_array_equal(dv, np.array([expect[k] for k in dk.tolist()]))
    # the reader sees later writes without re-attaching: the arrays are the writer's own
    writer.upsert("hps_et.m.a", np.array([42]), np.full((1, 16), 7.0))
    assert (reader.fetch("hps_et.m.a", np.array([42]))[0] == 7.0).all()

    k, v = np.array([1]), np.ones((1, 16), np.float32)
    for call in (
        lambda: reader.upsert("hps_et.m.a", k, v),
        lambda: reader.load("hps_et.m.a", k, v),
        lambda: reader.evict("hps_et.m.a", k),
        lambda: reader.drop_table("hps_et.m.a"),
        lambda: reader.create_table("hps_et.m.c", 4),
        lambda: reader.unlink(),
    ):
        with pytest.raises(StorageError, match="read-only"):
            call()
    assert reader.size("hps_et.m.a") == len(ref["hps_et.m.a"]) + 1
    reader.close()

    writer.drop_table("hps_et.m.a")
    assert not any(".hps_et.m.a." in f for f in files(name))
    assert writer.tables() == ["hps_et.m.b", "hps_et.m.bf", "hps_et.m.i8"]
    writer.unlink()
    assert files(name) == []


def test_shared_capacity_is_fixed_and_full_partitions_evict(name):
    vdb = HashMapVDB(num_partitions=4, shared_memory_name=name, overflow_policy="evict_oldest")
    vdb.create_table("t", 8, capacity_hint=8000)
    size0 = vdb.memory_bytes("t")
    cap = shm.read_header(name)["t"]["pcap"]
    rng = np.random.default_rng(1)
    for _ in range(12):
        keys = rng.integers(I64.min, I64.max, 2000, dtype=np.int64)
        vecs = rng.standard_normal((2000, 8)).astype(np.float32)
        vdb.upsert("t", keys, vecs)
        got, found = vdb.fetch("t", keys)
        assert found.all()
        np.testing.assert_array_equal(got, vecs)
        assert (vdb.partition_sizes("t") <= cap).all()
    assert vdb.memory_bytes("t") == size0  # never grew
    assert vdb.evictions("t") == 12 * 2000 - vdb.size("t") > 0
    vdb.unlink()


def test_reader_access_counts_steer_the_writers_eviction(name):
    writer = HashMapVDB(num_partitions=1, shared_memory_name=name, overflow_margin=100,
                        overflow_policy="evict_least_used", overflow_resolution_target=0.5)  # fmt: skip
    writer.create_table("t", 4)
    keys = np.arange(100)
    writer.upsert("t", keys, np.ones((100, 4)))
    reader = HashMapVDB(shared_memory_name=name, shared_memory_readonly=True)
    reader.fetch("t", keys[50:])  # the reader's hits count for the writer
    writer.upsert("t", np.array([1000]), np.ones((1, 4)))
    assert not writer.contains("t", keys[:50]).any()
    assert writer.contains("t", keys[51:]).all()
    writer.unlink()


WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from hps_core.vdb.hashmap import HashMapVDB
    name, seconds, dim, n = sys.argv[1], float(sys.argv[2]), 32, 6000
    vdb = HashMapVDB(num_partitions=4, shared_memory_name=name)
    vdb.create_table("hps_et.m.t", dim, capacity_hint=n)
    keys = np.arange(n, dtype=np.int64) * 104729 - 5 * 10**8
    vdb.upsert("hps_et.m.t", keys, np.zeros((n, dim), np.float32))
    vdb.evict("hps_et.m.t", keys[:1])  # compile every kernel the loop uses before timing it
    vdb.upsert("hps_et.m.t", keys[:1], np.zeros((1, dim), np.float32))
    print("ready", flush=True)
    sys.stdin.readline()  # the reader has compiled its kernels too
    rng = np.random.default_rng(0)
    v, end = 1, time.time() + seconds
    while time.time() < end:
        vdb.upsert("hps_et.m.t", keys, np.full((n, dim), v, np.float32))
        gone = rng.choice(keys, 100, replace=False)
        vdb.evict("hps_et.m.t", gone)  # swap-removes move rows under the readers
        vdb.upsert("hps_et.m.t", gone, np.full((100, dim), v, np.float32))
        v += 1
    print(v - 1, flush=True)
    sys.stdin.readline()  # keep the segments mapped until the test has read the end state
    """
)


def test_readers_in_another_process_never_see_torn_rows(name):
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, name, "2.5"],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        reader = HashMapVDB(shared_memory_name=name, shared_memory_readonly=True)
        assert reader.tables() == ["hps_et.m.t"]
        keys = np.arange(6000, dtype=np.int64) * 104729 - 5 * 10**8
        assert reader.fetch("hps_et.m.t", keys)[1].all()  # compiles the read kernels
        assert reader.fetch("hps_et.m.t", keys[:300])[1].all()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        last = np.zeros(6000, np.float32)
        reads = 0
        rng = np.random.default_rng(2)
        deadline = time.monotonic() + 60
        while not (reads > 5 and _writer_done(proc)):
            assert proc.poll() is None and time.monotonic() < deadline
            sel = rng.integers(0, 6000, 300) if reads % 2 else np.arange(6000)
            rows, found = reader.fetch("hps_et.m.t", keys[sel])
            assert (rows[found] == rows[found][:, :1]).all(), "torn row"
            seen = last[sel]
            assert (rows[found, 0] >= seen[found]).all(), "a row went back in time"
            np.maximum.at(last, sel[found], rows[found, 0])
            reads += 1
        final = int(proc.stdout.readline())
        rows, found = reader.fetch("hps_et.m.t", keys)
        assert found.all() and (rows == final).all()  # the reader sees the writer's last write
        assert reads > 5 and final > 1
        reader.close()
    finally:
        proc.kill()
        proc.wait()
        HashMapVDB(shared_memory_name=name).unlink()
    assert files(name) == []


def _writer_done(proc: subprocess.Popen) -> bool:
    """Whether the writer printed its last version (its stdout has a line ready)."""
    return bool(select.select([proc.stdout], [], [], 0)[0])


READER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from hps_core.vdb.hashmap import HashMapVDB
    r = HashMapVDB(shared_memory_name=sys.argv[1], shared_memory_readonly=True)
    rows, found = r.fetch("t", np.arange(100))
    print(int(found.sum()), float(rows.sum()))
    """
)


def test_a_reader_process_exiting_leaves_the_segments_in_place(name):
    writer = HashMapVDB(num_partitions=2, shared_memory_name=name)
    writer.create_table("t", 4)
    writer.upsert("t", np.arange(100), np.full((100, 4), 0.5))
    before = files(name)
    for _ in range(2):  # a resource tracker would unlink "its" segments when the reader exits
        out = subprocess.run([sys.executable, "-c", READER, name], capture_output=True,
                             text=True, timeout=120, check=True)  # fmt: skip
        assert out.stdout.split() == ["100", "200.0"]
    assert files(name) == before
    again = HashMapVDB(shared_memory_name=name, shared_memory_readonly=True)
    assert again.size("t") == 100 and (again.fetch("t", np.arange(100))[0] == 0.5).all()
    writer.unlink()


def test_readers_follow_a_table_the_writer_drops_and_recreates(name):
    writer = HashMapVDB(num_partitions=2, shared_memory_name=name)
    writer.create_table("t", 4)
    writer.upsert("t", np.array([1]), np.ones((1, 4)))
    reader = HashMapVDB(shared_memory_name=name, shared_memory_readonly=True)
    assert reader.fetch("t", np.array([1]))[1].all()
    writer.drop_table("t")
    with pytest.raises(HPSError, match="no table 't'"):
        reader.fetch("t", np.array([1]))
    writer.create_table("t", 8, dtype="float16")
    writer.upsert("t", np.array([2]), np.full((1, 8), 3.0))
    got, found = reader.fetch("t", np.array([1, 2]))
    np.testing.assert_array_equal(found, [False, True])
    assert reader.dim("t") == 8 and (got[1] == 3.0).all()
    writer.unlink()


def test_a_new_writer_repairs_a_table_its_predecessor_left_mid_write(name, monkeypatch):
    writer = HashMapVDB(num_partitions=2, shared_memory_name=name)
    writer.create_table("t", 4)
    keys = np.arange(-50, 50)
    writer.upsert("t", keys, np.repeat(keys[:, None], 4, axis=1))
    t = writer._tables["t"]
    # As if the writer died inside a batch that touched partition 0, half way through moving
    # its last row into the slot of a deleted one: the key is stored twice, the count not yet
    # lowered. (It used to be indexed twice by the repair, and an evict left it found.)
    part = K.partitions(keys, 2)
    t.arr.keys[0] = t.arr.keys[int(t.count[0]) - 1]
    t.seq[0] += np.uint64(1)
    writer.close()
    reader = HashMapVDB(shared_memory_name=name, shared_memory_readonly=True)
    monkeypatch.setattr(hashmap, "READ_TIMEOUT_S", 0.2)
    with pytest.raises(StorageError, match="writer process die"):
        reader.fetch("t", keys)
    again = HashMapVDB(num_partitions=2, shared_memory_name=name)
    again.create_table("t", 4)  # attaches to the table and empties partition 0
    got, found = reader.fetch("t", keys)
    np.testing.assert_array_equal(found, part != 0)  # partition 1's rows untouched
    np.testing.assert_array_equal(got[found], np.repeat(keys[found][:, None], 4, axis=1))
    assert again.size("t") == int((part != 0).sum())
    again.upsert("t", keys, np.repeat(keys[:, None], 4, axis=1))  # a load fills it again
    assert again.evict("t", keys[:10]) == 10 and not reader.contains("t", keys[:10]).any()
    got, found = reader.fetch("t", keys[10:])
    assert found.all() and (got == keys[10:, None]).all()
    assert again.size("t") == len(keys) - 10
    again.unlink()


def test_a_reader_attaching_while_the_writer_drops_and_creates_the_table_maps_one_table(
    name, monkeypatch
):
    """A reader maps a table's arrays one by one; the writer dropped the table and created it
    again between two of them. The reader used to hold the old index and rows with the new
    counters, and served the old table's rows for good."""
    writer = HashMapVDB(num_partitions=2, shared_memory_name=name)
    writer.create_table("t", 4)
    writer.upsert("t", np.arange(10), np.full((10, 4), 1.0))
    reader = HashMapVDB(shared_memory_name=name, shared_memory_readonly=True)
    real, raced = np.memmap, []

    def racing_memmap(path, *args, **kwargs):
        m = real(path, *args, **kwargs)
        if str(path).endswith(".t.values") and not raced:
            raced.append(path)
            writer.drop_table("t")
            writer.create_table("t", 4)
            writer.upsert("t", np.arange(10), np.full((10, 4), 2.0))
        return m

    monkeypatch.setattr(shm.np, "memmap", racing_memmap)
    assert reader.dim("t") == 4  # attaches, interleaved with the drop and the new table
    monkeypatch.undo()
    assert raced
    writer.upsert("t", np.arange(10), np.full((10, 4), 3.0))
    writer.upsert("t", np.arange(100, 110), np.full((10, 4), 3.0))
    got, found = reader.fetch("t", np.array([0, 100]))
    assert found.all() and (got == 3.0).all()
    assert reader.size("t") == writer.size("t") == 20
    writer.unlink()


def test_a_table_name_too_long_for_its_files_is_refused_and_leaves_no_file(name):
    writer = HashMapVDB(num_partitions=2, shared_memory_name=name)
    table = "t" * (255 - len(name) - len("..index"))  # name.table.index fits, .values not
    with pytest.raises(InvalidInputError, match="'table'.*a shorter name"):
        writer.create_table(table, 4)
    assert list(shm.shm_dir().glob(f"{name}.*")) == []  # the arrays made before it went too
    writer.create_table("t", 4)
    writer.upsert("t", np.array([7]), np.full((1, 4), 7.0))
    assert (writer.fetch("t", np.array([7]))[0] == 7.0).all()
    writer.unlink()
    assert list(shm.shm_dir().glob(f"{name}.*")) == []


def test_a_shared_tables_pages_are_reserved_when_it_is_created(name):
    """A tmpfs gives a sparse file's pages on first write, where no room left is a SIGBUS."""
    writer = HashMapVDB(num_partitions=2, shared_memory_name=name)
    writer.create_table("t", 32, capacity_hint=20_000)
    for f in shm.shm_dir().glob(f"{name}.t.*"):
        st = f.stat()
        assert st.st_blocks * 512 >= st.st_size > 0, f.name
    writer.unlink()


SMALL_TMPFS = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from hps_core.vdb import shm
    from hps_core.vdb.hashmap import HashMapVDB

    def free():
        st = os.statvfs(shm.shm_dir())
        return st.f_bavail * st.f_frsize

    out = {"free_at_start": free()}
    v = HashMapVDB(num_partitions=2, shared_memory_name="full")
    keys = np.arange(-500, 500)
    vecs = (keys[:, None] * np.arange(1, 9) / 7).astype(np.float32)
    v.create_table("small", 8, capacity_hint=1000)
    v.load("small", keys, vecs)
    out["free_before_big"] = free()
    try:
        v.create_table("big", 64, capacity_hint=200_000)
        out["error"] = None
    except shm.SharedMemoryFullError as e:
        out.update(error=str(e), need=e.need, free=e.free, table=e.table)
    out["free_after_big"] = free()
    out["files"] = sorted(os.listdir(shm.shm_dir()))
    out["tables"] = v.tables()
    got, found = v.fetch("small", keys)
    out["small_equal"] = bool(found.all() and np.array_equal(got, vecs))
    v.create_table("later", 8, capacity_hint=1000)  # the room the failed table took is back
    v.upsert("later", keys[:3], vecs[:3])
    got, found = v.fetch("later", keys[:3])
    out["later_equal"] = bool(found.all() and np.array_equal(got, vecs[:3]))
    print(json.dumps(out))
    """
)


def test_a_table_larger_than_the_shared_memory_left_is_a_clear_error_not_a_crash(tmp_path):
    """Docker's default /dev/shm is 64 MiB: a table that did not fit used to be created
    and then kill the process that filled it (SIGBUS)."""
    (tmp_path / "script.py").write_text(SMALL_TMPFS)
    r = in_small_tmpfs(f"{sys.executable} {tmp_path / 'script.py'}")
    assert r.returncode == 0, r.stderr  # alive (a SIGBUS is 135 / -7)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    big = 2 * shm.partition_rows(200_000, 2)
    assert out["table"] == "big" and out["need"] > big * (64 * 4 + 8) > 8 * 2**20
    assert out["free"] == out["free_before_big"] == out["free_after_big"]
    assert out["free_at_start"] - out["free_before_big"] >= 2 * 1024 * (8 * 4 + 8)
    assert "--shm-size" in out["error"] and "'big'" in out["error"]
    assert not [f for f in out["files"] if ".big." in f]
    assert out["tables"] == ["small"]
    assert out["small_equal"] and out["later_equal"]


def test_hps_load_into_too_small_shared_memory_names_the_table_and_exits_2(tmp_path):
    model = tmp_path / "m"
    subprocess.run([sys.executable, "-m", "hps_core.cli", "synth", str(model), "--rows",
                    "400000", "--tables", "3", "--dim", "64", "--name", "shm"], check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    cfg = json.loads((model / "hps.json").read_text())
    cfg["volatile_db"] = {"type": "multi_process_hash_map"}
    cfg.pop("persistent_db", None)
    (model / "hps.json").write_text(json.dumps(cfg))
    r = in_small_tmpfs(f"{sys.executable} -m hps_core.cli load {model / 'hps.json'}")
    assert r.returncode == 2, (r.stdout, r.stderr)  # tables 0 and 1: 17 and 7 rows; 2: 120K
    assert "VDB table 'hps_et.shm.table2'" in r.stderr and "--shm-size" in r.stderr


def test_damaged_table_files_are_an_error_for_readers_and_made_anew_by_the_writer(name):
    """A map past a file's end faults (SIGBUS) on the first read there; a file shorter than
    its header says (damaged, or from another version) is refused when attaching."""
    writer = HashMapVDB(num_partitions=2, shared_memory_name=name)
    writer.create_table("t", 8, capacity_hint=1000)
    writer.upsert("t", np.arange(10), np.ones((10, 8)))
    writer.close()
    os.truncate(shm.array_path(name, "t", "values"), 100)
    with pytest.raises(StorageError) as e:
        HashMapVDB(shared_memory_name=name, shared_memory_readonly=True).fetch("t", [1])
    assert f"{shm.array_path(name, 't', 'values')} holds 100 bytes" in str(e.value)
    assert "remove the files" in str(e.value)
    shm.array_path(name, "t", "keys").unlink()
    with pytest.raises(StorageError, match=r"\.t\.keys is missing"):
        HashMapVDB(shared_memory_name=name, shared_memory_readonly=True).fetch("t", [1])
    again = HashMapVDB(num_partitions=2, shared_memory_name=name)
    again.create_table("t", 8, capacity_hint=1000)  # the writer: the table anew, empty
    keys = np.array([-3, 5, 2**62])
    again.upsert("t", keys, np.full((3, 8), 2.5))
    reader = HashMapVDB(shared_memory_name=name, shared_memory_readonly=True)
    got, found = reader.fetch("t", np.concatenate([keys, [1]]))
    np.testing.assert_array_equal(found, [True, True, True, False])
    assert (got[:3] == 2.5).all() and reader.size("t") == 3
    again.unlink()
