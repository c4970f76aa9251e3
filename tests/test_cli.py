"""The `hps` command, run as a user would (a subprocess), checked against the files it reads."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from small_tmpfs import in_small_tmpfs

from hps_core.model_io import SparseTable


def hps(*args, check=True):
    r = subprocess.run(
        [sys.executable, "-m", "hps_core.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"hps {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    hps("synth", out, "--rows", 20000, "--tables", 3, "--dim", 8, "--name", "cli")
    return out


def test_synth_estimate_load_inspect_lookup(model):
    cfg = model / "hps.json"
    est = json.loads(hps("estimate", cfg, "--json").stdout)
    files = [SparseTable.open(p) for p in json.loads(cfg.read_text())["models"][0]["sparse_files"]]
    assert [e["rows"] for e in est] == [f.rows for f in files]
    assert all(e["vdb_bytes"] >= f.nbytes for e, f in zip(est, files, strict=True))

    load = hps("load", cfg)
    # a pipe, not a terminal: one line per table and tier once it is copied, no redrawn bars
    lines = load.stderr.splitlines()
    want = [f"cli/table{t} -> {tier}: {f.rows:,} rows in " for t, f in enumerate(files)
            for tier in ("RocksDB", "VDB")]  # fmt: skip
    assert len(lines) == len(want), load.stderr
    assert [x[: len(w)] for x, w in zip(lines, want, strict=True)] == want, load.stderr
    info = json.loads(hps("inspect", cfg, "--json", "--quiet").stdout)
    # with the load progress bar on, stdout still holds the JSON alone (the bar is on stderr)
    out = hps("inspect", cfg, "--json").stdout
    assert out.startswith("[") and json.loads(out) == info
    assert [i["rows"] for i in info] == [f.rows for f in files]
    assert [i["pdb_rows"] for i in info] == [f.rows for f in files]
    assert all(i["vdb_rows"] == i["rows"] and i["dim"] == 8 for i in info)

    keys, vecs = files[2].read_all()  # the large Criteo table
    query = [int(keys[0]), int(keys[5]), 123, int(keys[0])]
    out = json.loads(
        hps("lookup", cfg, "--model", "cli", "--table", "table2", "--json", "--keys", *query).stdout
    )
    expect = np.stack([vecs[0], vecs[5], np.zeros(8, np.float32), vecs[0]])
    np.testing.assert_array_equal(np.array(out["vectors"], dtype=np.float32), expect)
    for f in files:
        f.close()


def test_errors_exit_2_with_a_message(model, tmp_path):
    cfg = model / "hps.json"
    r = hps("lookup", cfg, "--model", "nope", "--keys", "1", check=False)
    assert r.returncode == 2 and "model 'nope' is not deployed" in r.stderr and r.stdout == ""
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = hps("estimate", bad, check=False)
    assert r.returncode == 2 and "valid JSON" in r.stderr and r.stdout == ""


def test_demo_runs_and_checks_itself(tmp_path):
    r = hps(
        "demo", "--dir", tmp_path / "demo", "--rows", 30000, "--batches", 3, "--batch-size", 256
    )
    assert "match the source files" in r.stdout
    assert "served by l1" in r.stdout


PDB_MATCHES_FILES = r"""
import json, os, sys
import numpy as np
from hps_core.model_io import SparseTable
from hps_core.pdb.rocksdb import RocksDBPDB

cfg = json.load(open(sys.argv[1]))
m = cfg["models"][0]
db = RocksDBPDB(cfg["persistent_db"]["path"], read_only=True)
same = []
for name, path in zip(m["embedding_table_names"], m["sparse_files"]):
    keys, vecs = SparseTable.open(path).read_all()
    got, found = db.fetch(f"hps_et.{m['model']}.{name}", keys)
    same.append(bool(found.all() and np.array_equal(got, vecs)))
print(json.dumps(same))
"""


def test_hps_load_on_a_full_disk_exits_2_and_a_rerun_with_room_completes_it(tmp_path):
    model = tmp_path / "m"
    hps("synth", model, "--rows", 400_000, "--tables", 3, "--dim", 64, "--name", "full")
    cfg = json.loads((model / "hps.json").read_text())
    cfg["volatile_db"] = {"type": "parallel_hash_map"}
    cfg["persistent_db"] = {"type": "rocks_db", "path": "PDB_DIR"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "check.py").write_text(PDB_MATCHES_FILES)
    run = tmp_path / "run.json"
    hps_ = f"{sys.executable} -m hps_core.cli"
    r = in_small_tmpfs(  # table 2 (120K rows, 31 MiB) does not fit in 8 MiB
        f'sed "s#PDB_DIR#$HPS_SHM_DIR/rdb#" {tmp_path / "cfg.json"} > {run} && '
        f"{{ {hps_} load {run}; echo first=$?; }} && "
        f'mount -o remount,size=96m "$HPS_SHM_DIR" && '
        f"{{ {hps_} load {run}; echo second=$?; }} && {sys.executable} {tmp_path / 'check.py'} {run}"
    )
    lines = r.stdout.strip().splitlines()
    assert "first=2" in lines and "second=0" in lines, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    error = next(x for x in r.stderr.splitlines() if x.startswith("error:"))
    assert "No space left on device" in error and "'hps_et.full.table2'" in error, r.stderr
    assert json.loads(lines[-1]) == [True, True, True]
