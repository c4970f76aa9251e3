"""hps repo with a user's own config: the copy it serves from names the same files."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import yaml

from hps_core import ConfigError, ParameterServer
from hps_core.config import load_config
from hps_core.model_io import SparseTable
from hps_core.repo import release_shared, write_repository
from hps_core.synth import make_model


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_config_with_relative_paths_serves_its_own_files(tmp_path, suffix, caplog):
    """Relative sparse_files / persistent_db.path are relative to the user's config; the copy
    under hps_data/ lives elsewhere, so it must name them absolutely. Rows served from the
    repository's config equal the sparse files'."""
    src = tmp_path / "mine"
    model = make_model(src, [40, 50], [4, 4], seed=3, name="mine")
    raw = json.loads(open(model.config_path).read())
    m = raw["models"][0]
    m["sparse_files"] = [os.path.relpath(p, src) for p in m["sparse_files"]]
    assert not any(os.path.isabs(p) for p in m["sparse_files"])
    raw["persistent_db"] = {"type": "rocks_db", "path": "rocks"}
    raw["models"].append({**m, "model": "other"})  # not served: said so
    cfg = src / f"hps{suffix}"
    cfg.write_text(json.dumps(raw) if suffix == ".json" else yaml.safe_dump(raw))
    with caplog.at_level(logging.WARNING, logger="hps_core.repo"):
        spec = write_repository(tmp_path / "repo", config=cfg)
    assert "serves its first model, 'mine'; the other 1 are not served" in caplog.text
    served = load_config(spec.config)
    want = [str(src / p) for p in m["sparse_files"]]
    assert served.models[0].sparse_files == want
    assert served.persistent_db.path == str(src / "rocks")
    try:
        with ParameterServer(spec.config) as ps:
            for t, path in enumerate(want):
                with SparseTable.open(path, 4) as f:
                    keys, vecs = next(f.iter_chunks())
                np.testing.assert_array_equal(ps.lookup(keys, "mine", t), vecs)
    finally:
        release_shared(spec.config)


def test_a_config_that_is_not_one_is_a_clear_error(tmp_path):
    bad = tmp_path / "hps.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="valid JSON"):
        write_repository(tmp_path / "repo", config=bad)
    with pytest.raises(ConfigError, match="existing config file"):
        write_repository(tmp_path / "repo", config=tmp_path / "nope.json")
