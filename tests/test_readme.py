"""The README's examples run as written, and their answers match the model files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hps_core.config import load_config
from hps_core.dense import describe_onnx
from hps_core.model_io import SparseTable

README = Path(__file__).resolve().parent.parent / "README.md"
LONG_RUNNING = ("hps serve", "hps watch", "hps demo", "hps bench", "hps doctor")


def block(heading: str, lang: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    m = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert m, f"no {lang} block under {heading}"
    return m.group(1)


def file_rows(config: Path, table: int, keys: list[int]) -> np.ndarray:
    m = load_config(config).models[0]
    with SparseTable.open(m.sparse_files[table], m.embedding_vecsize_per_table[table]) as f:
        k, v = f.read_all()
    out = np.full((len(keys), v.shape[1]), m.default_value_for_each_table[table], np.float32)
    for i, key in enumerate(keys):
        hit = np.flatnonzero(k == key)
        if len(hit):
            out[i] = v[hit[0]]
    return out


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Runs the Command line block's lines in a scratch directory: {line: stdout}."""
    cwd = tmp_path_factory.mktemp("readme")
    hps = str(Path(sys.executable).parent / "hps")
    outputs = {}
    for line in block("## Command line", "bash").splitlines():
        cmd = line.split("#", 1)[0].strip()
        if not cmd or cmd.startswith(LONG_RUNNING):
            continue
        r = subprocess.run(
            [hps, *cmd.split()[1:]], cwd=cwd, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        outputs[cmd] = r.stdout
    return cwd, outputs


def test_command_line_block_runs_and_answers_from_the_files(ran):
    cwd, outputs = ran
    lookup = next(c for c in outputs if c.startswith("hps lookup"))
    keys = [int(k) for k in lookup.split("--keys")[1].split()]
    r = subprocess.run(
        [str(Path(sys.executable).parent / "hps"), *lookup.split()[1:], "--json"],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    got = np.asarray(json.loads(r.stdout)["vectors"], np.float32)
    np.testing.assert_array_equal(got, file_rows(cwd / "OUT" / "hps.json", 2, keys))
    # the same command with keys the table holds
    m = load_config(cwd / "OUT" / "hps.json").models[0]
    with SparseTable.open(m.sparse_files[2], m.embedding_vecsize_per_table[2]) as f:
        present = [int(k) for k in f.read_all()[0][[0, 7, -1]]]
    cmd = lookup.split("--keys")[0].split()[1:] + ["--keys", *map(str, present), "--json"]
    r = subprocess.run([str(Path(sys.executable).parent / "hps"), *cmd], cwd=cwd,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    got = np.asarray(json.loads(r.stdout)["vectors"], np.float32)
    want = file_rows(cwd / "OUT" / "hps.json", 2, present)
    assert np.abs(want).sum() > 0  # real rows, not default vectors
    np.testing.assert_array_equal(got, want)
    tables = json.loads(outputs["hps inspect OUT/hps.json --json"])
    rows = [t["rows"] for t in tables]
    assert sum(rows) == 100_000 and len(rows) == 26
    io = describe_onnx(cwd / "dense.onnx")
    assert [i.name for i in io.inputs] == ["DENSE", "EMB"]
    for repo in ("REPO", "EXAMPLE"):
        for model in ("dlrm", "dlrm_embedding", "dlrm_dense", "hps_embedding"):
            assert (cwd / repo / model / "config.pbtxt").is_file(), (repo, model)


def test_python_api_example_matches_the_files(tmp_path, monkeypatch):
    from hps_core.synth import criteo_vocab_sizes, make_model

    make_model(tmp_path, criteo_vocab_sizes(20_000), [8] * 26, name="synthetic")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(block("## Python API", "python"), scope)
    np.testing.assert_array_equal(
        scope["vectors"], file_rows(tmp_path / "hps.json", 0, [3, -17, 42])
    )
    m = load_config(tmp_path / "hps.json").models[0]
    with SparseTable.open(m.sparse_files[0], 8) as f:
        keys, vecs = f.read_all()
    np.testing.assert_array_equal(scope["hps"].lookup(keys[:50], "synthetic", 0), vecs[:50])
    scope["hps"].close()
