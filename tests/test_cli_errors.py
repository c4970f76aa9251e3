"""User mistakes on the `hps` command line give one `error: ...` line that names the option or
file, exit status 2 and no traceback; correct input still gives the right answers."""

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
import redis
from small_tmpfs import in_small_tmpfs

from hps_core import cli
from hps_core.errors import ConfigError, HPSError
from hps_core.launcher import free_ports
from hps_core.model_io import SparseTable
from hps_core.synth import criteo_vocab_sizes, make_model
from hps_core.updates.codec import decode


def hps(capsys, *args) -> tuple[int, str]:
    """Runs ``main`` in process as the console script would: (exit status, stdout + stderr)."""
    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err


def assert_error(rc: int, out: str, *names: str) -> None:
    """The output ends in one `error:` line naming each of ``names``; status 2, no traceback."""
    assert rc == 2, out
    assert "Traceback" not in out, out
    lines = out.strip().splitlines()
    assert [line for line in lines if "error:" in line] == lines[-1:], out
    assert lines[-1].startswith("error: "), out
    for name in names:
        assert str(name) in lines[-1], (name, out)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A 3-table model (dim 4) and its files' keys and vectors."""
    out = tmp_path_factory.mktemp("cli_errors")
    m = make_model(out, [50, 300, 40], [4, 4, 4], seed=3, name="e")
    rows = []
    for path in m.table_paths:
        with SparseTable.open(path, 4) as f:
            rows.append(f.read_all())
    return m, rows


# -- 1. lookup keys ------------------------------------------------------------------------------


def test_keys_file_gives_the_rows_of_the_sparse_files(model, tmp_path, capsys):
    m, rows = model
    keys, vecs = rows[1]
    neg = int(np.flatnonzero(keys < 0)[0])
    pos = int(np.flatnonzero(keys > 0)[0])
    f = tmp_path / "keys.txt"
    f.write_text(f"# keys of table1\n{keys[neg]}\n\n  +{keys[pos]}  \n7 # not in the table\r\n")
    rc, out = hps(capsys, "lookup", m.config_path, "--model", "e", "--table", "table1",
                  "--json", "--keys", keys[pos], "--keys-file", f)  # fmt: skip
    assert rc == 0, out
    got = json.loads(out)
    assert got["keys"] == [int(keys[pos]), int(keys[neg]), int(keys[pos]), 7]
    want = np.stack([vecs[pos], vecs[neg], vecs[pos], np.zeros(4, np.float32)])
    np.testing.assert_array_equal(np.array(got["vectors"], np.float32), want)


def test_a_keys_file_that_starts_with_a_byte_order_mark(model, tmp_path, capsys):
    """Some editors (Notepad) start UTF-8 files with a BOM: it is not part of the first key."""
    m, rows = model
    keys, vecs = rows[0]
    f = tmp_path / "keys.txt"
    f.write_text(f"{keys[2]}\n{keys[0]}\n", encoding="utf-8-sig")
    assert f.read_bytes().startswith(b"\xef\xbb\xbf")
    rc, out = hps(capsys, "lookup", m.config_path, "--model", "e", "--table", "table0", "--json",
                  "--keys-file", f)  # fmt: skip
    assert rc == 0, out
    np.testing.assert_array_equal(np.array(json.loads(out)["vectors"], np.float32), vecs[[2, 0]])


@pytest.mark.parametrize(
    "text, line, bad",
    [
        ("5\n-3\n1.7\n", 3, "1.7"),  # np.loadtxt read it as 1
        ("99999999999999999999999\n", 1, "99999999999999999999999"),  # was int64 min
        ("9223372036854775808\n", 1, "9223372036854775808"),  # int64 max + 1
        ("-9223372036854775809\n", 1, "-9223372036854775809"),
        ("1e3\n", 1, "1e3"),
        ("0x10\n", 1, "0x10"),
        ("1 2\n", 1, "1 2"),
        ("abc\n", 1, "abc"),
    ],
)
def test_keys_file_with_a_bad_key_names_the_file_and_line(model, tmp_path, capsys, text, line, bad):
    f = tmp_path / "keys.txt"
    f.write_text(text)
    rc, out = hps(capsys, "lookup", model[0].config_path, "--model", "e", "--keys-file", f)
    assert_error(rc, out, "--keys-file", f, f"line {line}", repr(bad))


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "comments only", "binary"])
def test_keys_file_that_holds_no_keys_is_an_error(model, tmp_path, capsys, kind):
    f = tmp_path / "keys.txt"
    if kind == "directory":
        f.mkdir()
    elif kind == "empty":
        f.write_text("")
    elif kind == "comments only":
        f.write_text("# none\n\n")
    elif kind == "binary":
        f.write_bytes(b"\xff\xfe\x00\x01")
    rc, out = hps(capsys, "lookup", model[0].config_path, "--model", "e", "--keys-file", f)
    assert_error(rc, out, "--keys-file", f)


@pytest.mark.parametrize("bad", ["1.5", "abc", "99999999999999999999999", "9223372036854775808"])
def test_bad_keys_option_names_keys(model, capsys, bad):
    rc, out = hps(capsys, "lookup", model[0].config_path, "--model", "e", "--keys", "1", bad)
    assert_error(rc, out, "--keys", repr(bad))


def test_lookup_without_keys_is_an_error(model, capsys):
    rc, out = hps(capsys, "lookup", model[0].config_path, "--model", "e")
    assert_error(rc, out, "--keys", "--keys-file")


def test_console_script_prints_no_traceback(model, tmp_path):
    """The same through the installed entry point, in its own process."""
    f = tmp_path / "keys.txt"
    f.write_text("1.7\n")
    r = subprocess.run(
        [sys.executable, "-m", "hps_core.cli", "lookup", model[0].config_path, "--model", "e",
         "--keys-file", str(f)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == "", r.stderr
    assert r.stderr.strip() == f"error: --keys-file {f}, line 1: '1.7': expected a base-10 " \
        "integer in int64 range, one per line"  # fmt: skip


# -- 2./3./4. numeric options --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, option",
    [
        (["synth", "OUT", "--rows", "0"], "--rows"),
        (["synth", "OUT", "--rows", "-5"], "--rows"),
        (["synth", "OUT", "--dim", "0"], "--dim"),
        (["synth", "OUT", "--dim", "-2"], "--dim"),
        (["synth", "OUT", "--tables", "0"], "--tables"),
        (["synth", "OUT", "--tables", "27"], "--tables"),
        (["synth", "OUT", "--seed", "-1"], "--seed"),
        (["dense", "--out", "OUT/d.onnx", "--slots", "0"], "--slots"),
        (["dense", "--out", "OUT/d.onnx", "--seed", "-1"], "--seed"),
        (["repo", "OUT", "--rows", "0"], "--rows"),
        (["repo", "OUT", "--dim", "0"], "--dim"),
        (["repo", "OUT", "--instances", "0"], "--instances"),
        (["repo", "OUT", "--max-batch-size", "0"], "--max-batch-size"),
        (["serve", "OUT", "--rows", "-1"], "--rows"),
        (["serve", "OUT", "--instances", "0"], "--instances"),
        (["serve", "OUT", "--restarts", "-1"], "--restarts"),
        (["demo", "--dir", "OUT", "--rows", "0"], "--rows"),
        (["demo", "--dir", "OUT", "--dim", "0"], "--dim"),
        (["demo", "--dir", "OUT", "--batch-size", "0"], "--batch-size"),
        (["publish", "--redis", "127.0.0.1:1", "--table", "t", "--random", "3", "--maxlen", "0"],
         "--maxlen"),
        (["publish", "--redis", "127.0.0.1:1", "--table", "t", "--random", "3", "--maxlen", "-1"],
         "--maxlen"),
        (["publish", "--redis", "127.0.0.1:1", "--table", "t", "--random", "-5"], "--random"),
        (["publish", "--redis", "127.0.0.1:1", "--table", "t", "--random", "3", "--dim", "0"],
         "--dim"),
        (["ingest", "CFG", "--seconds", "-1"], "--seconds"),
    ],
)  # fmt: skip
def test_out_of_range_option_is_named_and_nothing_is_written(tmp_path, capsys, args, option):
    out_dir = tmp_path / "out"
    args = [a.replace("OUT", str(out_dir)).replace("CFG", str(tmp_path / "c.json")) for a in args]
    rc, out = hps(capsys, *args)
    assert_error(rc, out, option)
    assert not out_dir.exists()


def test_dense_dim_zero_is_an_error(tmp_path, capsys):
    rc, out = hps(capsys, "dense", "--out", tmp_path / "d.onnx", "--dim", "0")
    assert_error(rc, out, "'dim' = 0")
    assert not (tmp_path / "d.onnx").exists()


def test_synth_errors_are_hps_errors(tmp_path):
    with pytest.raises(ConfigError, match="rows"):
        criteo_vocab_sizes(0)
    with pytest.raises(ConfigError, match="dim"):
        make_model(tmp_path, [5], [0])
    with pytest.raises(ConfigError, match="seed"):
        make_model(tmp_path, [5], [4], seed=-1)
    with pytest.raises(ConfigError, match="vocab_sizes"):
        make_model(tmp_path, [], [])
    assert issubclass(ConfigError, HPSError)


def test_synth_and_dense_name_an_output_they_cannot_write(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, out = hps(capsys, "synth", afile, "--rows", "100")
    assert_error(rc, out, afile, "not a directory")
    assert afile.read_text() == "x"
    rc, out = hps(capsys, "synth", "/proc/nope", "--rows", "100")
    assert_error(rc, out, "/proc/nope")
    rc, out = hps(capsys, "dense", "--out", tmp_path)
    assert_error(rc, out, "--out", tmp_path, "directory")


# -- 4. repo --------------------------------------------------------------------------------------


def _onnx_without_dense(path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["X"], ["Y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(path))


@pytest.mark.parametrize("kind", ["missing", "not json", "directory"])
def test_repo_config_that_is_not_one_names_it(tmp_path, capsys, kind):
    cfg = tmp_path / "c.json"
    if kind == "not json":
        cfg.write_text("{not json")
    elif kind == "directory":
        cfg.mkdir()
    rc, out = hps(capsys, "repo", tmp_path / "repo", "--config", cfg)
    assert_error(rc, out, cfg)
    assert not (tmp_path / "repo").exists()


def _onnx_without_prob(path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("DENSE", TensorProto.FLOAT, [None, 13])
    e = helper.make_tensor_value_info("EMB", TensorProto.FLOAT, [None, 12])  # 3 tables x dim 4
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 13])
    graph = helper.make_graph([helper.make_node("Identity", ["DENSE"], ["Y"])], "g", [x, e], [y])
    onnx.save(helper.make_model(graph), str(path))


ONNX_MISFITS = {"no DENSE input": ["'DENSE'"], "EMB of other tables": ["'EMB'", "[B, 12]"],
                "no PROB output": ["'PROB'"]}  # fmt: skip


@pytest.mark.parametrize("kind", ["missing", "not onnx", *ONNX_MISFITS])
def test_repo_onnx_that_does_not_fit_names_it(model, tmp_path, capsys, kind):
    """A model made for other tables (EMB [B, 97 * 5], the config has 3 x 4) used to be taken: every request then
    failed at the dense step."""
    from hps_core.dense import save_dense_model

    onnx_file = tmp_path / "m.onnx"
    if kind == "not onnx":
        onnx_file.write_text("hello")
    elif kind == "no DENSE input":
        _onnx_without_dense(onnx_file)
    elif kind == "no PROB output":
        _onnx_without_prob(onnx_file)
    elif kind == "EMB of other tables":
        save_dense_model(onnx_file, dim=97, seed=0, num_slots=5)
    repo = tmp_path / "repo"
    rc, out = hps(capsys, "repo", repo, "--config", model[0].config_path, "--onnx", onnx_file)
    assert_error(rc, out, "--onnx" if kind in ("missing", "not onnx") else "", onnx_file,
                 *ONNX_MISFITS.get(kind, []))  # fmt: skip
    assert not repo.exists()


# -- 2. publish ----------------------------------------------------------------------------------


def _npz(path, **arrays) -> None:
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing", ["no such file"]),
        ("empty", ["not a readable .npz"]),
        ("npy", [".npz archive"]),
        ("lengths differ", ["3 keys and 2 vectors"]),
        ("float keys", ["'keys'", "float64"]),
        ("no vectors", ["'vectors'"]),
        ("no rows", ["empty"]),
    ],
)
def test_publish_npz_that_does_not_fit_names_it(tmp_path, capsys, kind, words):
    f = tmp_path / "rows.npz"
    if kind == "empty":
        f.write_bytes(b"")
    elif kind == "npy":
        f = tmp_path / "rows.npy"
        np.save(f, np.arange(3))
    elif kind == "lengths differ":
        _npz(f, keys=np.arange(3), vectors=np.zeros((2, 4), np.float32))
    elif kind == "float keys":
        _npz(f, keys=np.array([1.7, 2.0, 3.0]), vectors=np.zeros((3, 4), np.float32))
    elif kind == "no vectors":
        _npz(f, keys=np.arange(3))
    elif kind == "no rows":
        _npz(f, keys=np.zeros(0, np.int64), vectors=np.zeros((0, 4), np.float32))
    rc, out = hps(capsys, "publish", "--redis", "127.0.0.1:1", "--table", "t", "--npz", f)
    assert_error(rc, out, "--npz", f, *words)


def test_publish_config_without_update_source_says_so(model, capsys):
    cfg = model[0].config_path
    rc, out = hps(capsys, "publish", "--config", cfg, "--table", "t", "--random", "3")
    assert_error(rc, out, cfg, "update_source.type")


@pytest.fixture
def redis_port(tmp_path):
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed: run `make install` (apt redis-server)")
    port = free_ports(1)[0]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.redis
def test_publish_names_the_stream_it_used_and_maxlen_0_keeps_the_stream(redis_port, capsys):
    address = f"127.0.0.1:{redis_port}"
    args = ["publish", "--redis", address, "--table", "hps_et.m.t", "--random", "5", "--dim", "3"]
    rc, out = hps(capsys, *args, "--seed", "7", "--maxlen", "10")
    assert rc == 0, out
    assert out.strip() == "published 5 rows of hps_et.m.t in 1 entries to hps_updates"
    client = redis.Redis(port=redis_port)
    (entry,) = client.xrange("hps_updates")
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 1_000_000, 5, dtype=np.int64)
    vectors = rng.standard_normal((5, 3)).astype(np.float32)
    got = decode(entry[1][b"payload"], 3)
    np.testing.assert_array_equal(got.keys, keys)
    np.testing.assert_array_equal(got.vectors, vectors)
    rc, out = hps(capsys, *args, "--maxlen", "0")  # XADD MAXLEN 0 would empty the stream
    assert_error(rc, out, "--maxlen")
    assert client.xlen("hps_updates") == 1


# -- 5. ingest ------------------------------------------------------------------------------------


def test_ingest_config_without_update_source_says_so(model, capsys):
    t0 = time.monotonic()
    rc, out = hps(capsys, "ingest", model[0].config_path)
    assert_error(rc, out, model[0].config_path, "update_source.type", "'null'")
    assert "cannot connect" not in out and time.monotonic() - t0 < 5


# -- 6. backstop ------------------------------------------------------------------------------------


def test_os_and_decode_errors_of_user_paths_are_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, out = hps(capsys, "demo", "--dir", afile, "--rows", "100")  # NotADirectoryError
    assert_error(rc, out, afile)
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo.json").write_bytes(b"\xff\xfe binary")  # UnicodeDecodeError
    rc, out = hps(capsys, "demo", "--dir", demo, "--rows", "100")
    assert_error(rc, out, "UTF-8")


def test_a_real_bug_still_raises(monkeypatch, capsys):
    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "cmd_estimate", broken)
    with pytest.raises(KeyError):
        cli.main(["estimate", "nope.json"])


def test_watch_of_a_process_that_never_runs_tritonserver(capsys):
    """`hps watch --pid` waits for the pid to run tritonserver (or start one); a pid that exits
    first, or one that does not exist, is an error naming --pid."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    rc, out = hps(capsys, "watch", "--pid", p.pid, "--interval", 0.1)
    assert p.wait() == 0
    assert_error(rc, out, f"--pid {p.pid}", "exited before it ran tritonserver")
    assert "watching" not in out
    assert_error(*hps(capsys, "watch", "--pid", p.pid), f"--pid {p.pid}")
    assert_error(*hps(capsys, "watch", "--pid", 0), "--pid 0")
    assert_error(*hps(capsys, "watch", "--pid", 5, "--interval", 0), "--interval 0")


# -- hps-client ------------------------------------------------------------------------------------


def client(capsys, *args) -> tuple[int, str]:
    from hps_client.cli import main

    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    assert out.out == "", out.out  # errors go to stderr
    return rc, out.err


def test_hps_client_errors_are_one_line_naming_the_server_or_the_line(tmp_path, capsys):
    tsv = tmp_path / "ok.tsv"
    tsv.write_text("\t".join(["1"] + ["3"] * 13 + ["a1b2"] * 26) + "\n")
    (port,) = free_ports(1)  # nothing listens there
    for protocol in ("http", "grpc"):
        rc, err = client(capsys, "predict", tsv, "--url", f"127.0.0.1:{port}", "--protocol",
                         protocol)  # fmt: skip
        assert_error(rc, err, f"Triton at 127.0.0.1:{port} ({protocol}), model dlrm")
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t2\n")
    assert_error(*client(capsys, "predict", bad), "line 1: 2 fields, expected 40")
    assert_error(*client(capsys, "predict", tmp_path / "none.tsv"), str(tmp_path / "none.tsv"))


def test_hps_serve_in_too_small_shared_memory_says_what_to_do(tmp_path):
    """Docker gives a container 64 MiB of /dev/shm: tables that do not fit must not end in
    SIGBUS or a traceback but in one line saying what to change, and the tables that did fit
    are removed again. (``hps serve`` keeps the VDB in memory or fails; the demo moves it to
    disk, see tests/triton/test_serving.py.)"""
    r = in_small_tmpfs(f"{sys.executable} -m hps_core.cli serve {tmp_path / 'repo'} "
                       '--rows 400000; echo "rc=$? left:$(ls -A $HPS_SHM_DIR)"')  # fmt: skip
    assert "rc=2 left:\n" in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert "VDB table 'hps_et.dlrm." in line and "--shm-size" in line, line


@pytest.mark.parametrize(
    "args, names",
    [
        (["synth", "OUT", "--rows", 100, "--dim", 10**8], ["--dim 100000000", "[1, 1048576]"]),
        (["dense", "--out", "OUT/d.onnx", "--dim", 10**11], ["not enough memory", "TiB"]),
        (
            [
                "publish",
                "--table",
                "t",
                "--redis",
                "127.0.0.1:1",
                "--random",
                5,
                "--key-range",
                10**20,
            ],
            ["--key-range", "9223372036854775807"],
        ),  # fmt: skip
    ],
)
def test_sizes_past_the_machine_are_one_error_line(tmp_path, capsys, args, names):
    """Numbers that passed the lower bounds used to end in MemoryError or ValueError
    tracebacks from numpy."""
    args = [str(a).replace("OUT", str(tmp_path)) for a in args]
    assert_error(*hps(capsys, *args), *names)


@pytest.mark.parametrize("name", ["", "a/b", "../escape", ".hidden"])
def test_model_names_that_are_not_a_directory_name_are_refused(tmp_path, capsys, name):
    """A name with '/' wrote tables outside OUT ('../escape') or nested Triton model
    directories; an empty one a config `hps load` refused."""
    for args in (["synth", tmp_path / "m", "--rows", 100], ["repo", tmp_path / "r", "--rows", 100]):
        rc, out = hps(capsys, *args, "--name", name)
        assert rc == 2 and "argument --name" in out and "letters, digits" in out, out
    assert not list(tmp_path.iterdir())


def test_hps_client_checks_its_numbers(capsys):
    from hps_client.cli import main

    for args, words in ((["demo", "--batches", "0"], "--batches 0: expected an integer >= 1"),
                        (["perf-data", "--out", "x.json", "--entries", "0"], "--entries 0"),
                        (["demo", "--dim", str(10**11)], "[1, 1048576]")):  # fmt: skip
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and words in err, err


@pytest.mark.parametrize(
    "bench, args, words",
    [
        ("cache", ["--dists", "bogus"], "uniform or zipf_<alpha>"),
        ("cache", ["--reps", "0"], "--reps: 0: expected an integer >= 1"),
        ("host-tier", ["--rows", "0"], "--rows: 0"),
        ("memory", ["--only", "9"], "config number 1-4"),
        ("e2e", ["--batches", "0"], "--batches: 0"),
        ("redis", ["--seconds", "-1"], "expected a number > 0"),
    ],
)
def test_bench_options_are_checked_before_anything_runs(capsys, bench, args, words):
    rc, out = hps(capsys, "bench", bench, *args)
    assert rc == 2 and words in out and "Traceback" not in out, out


def test_special_files_and_addresses_are_errors_not_hangs(model, tmp_path, capsys):
    """A FIFO as --keys-file used to block forever, `hps watch` with a bad --url to poll it
    forever; ':abc:' in a message was printed as an emoji."""
    m, _ = model
    fifo = tmp_path / "keys.fifo"
    os.mkfifo(fifo)
    assert_error(*hps(capsys, "lookup", m.config_path, "--model", "e", "--keys-file", fifo),
                 str(fifo), "not a regular file")  # fmt: skip
    assert_error(*hps(capsys, "watch", "--pid", 1, "--url", "nohost:abc"),
                 "--url nohost:abc: expected")  # fmt: skip


def test_a_meta_or_key_that_is_a_directory_is_named_as_such(tmp_path):
    m = make_model(tmp_path, [20], [4], seed=1, name="d")
    table = Path(m.table_paths[0])
    (table / "meta").unlink(missing_ok=True)
    (table / "meta").mkdir()  # its hot keys would be lost without a word
    with pytest.raises(HPSError, match="meta.*not a regular file"):
        SparseTable.open(table, 4)
    (table / "meta").rmdir()
    (table / "key").unlink()
    (table / "key").mkdir()
    with pytest.raises(HPSError, match="key.*not a regular file"):
        SparseTable.open(table, 4)
