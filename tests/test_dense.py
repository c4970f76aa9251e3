"""The dense DLRM network: onnxruntime against the numpy reference, weights, I/O, errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from hps_core.dense import (
    DeviceDense,
    arch_of,
    dense_arch,
    dense_forward,
    describe_onnx,
    init_weights,
    load_dense_weights,
    save_dense_model,
)
from hps_core.errors import ConfigError, InvalidInputError, ModelFileError

TOL = 1e-5


def session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the machine is shared; determinism does not depend on it
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def inputs(batch: int, dim: int, slots: int = 26, seed: int = 0):
    """Criteo-like inputs: log-scaled counts for DENSE, N(0, 0.05) vectors for EMB."""
    rng = np.random.default_rng([seed, batch, dim])
    dense = np.log1p(rng.exponential(20.0, (batch, 13))).astype(np.float32)
    emb = (rng.standard_normal((batch, slots * dim)) * 0.05).astype(np.float32)
    return dense, emb


@pytest.fixture(scope="module", params=[1, 8, 64])
def model(request, tmp_path_factory):
    dim = request.param
    path = tmp_path_factory.mktemp("dense") / f"dense_{dim}.onnx"
    weights = save_dense_model(path, dim=dim, seed=dim)
    return path, dim, weights, session(path)


@pytest.mark.parametrize("batch", [0, 1, 3, 256, 4096])  # 0: the reference crashed
def test_onnxruntime_equals_numpy_reference(model, batch):
    path, dim, weights, sess = model
    dense, emb = inputs(batch, dim)
    (prob,) = sess.run(["PROB"], {"DENSE": dense, "EMB": emb})
    ref = dense_forward(weights, dense, emb)
    assert prob.shape == ref.shape == (batch, 1)
    assert prob.dtype == ref.dtype == np.float32
    np.testing.assert_allclose(prob, ref, rtol=0, atol=TOL)
    assert np.all((ref > 0) & (ref < 1))


@pytest.mark.parametrize("batch", [0, 1, 3, 256, 4096])
def test_device_dense_equals_numpy_reference(model, batch):
    """The float32 forward pass the GPU path runs (over CuPy there; NumPy here), with the
    weights read back from the ONNX file."""
    path, dim, weights, _ = model
    dense, emb = inputs(batch, dim, seed=1)
    prob = DeviceDense(load_dense_weights(path), np)(dense, emb)
    ref = dense_forward(weights, dense, emb)
    assert prob.shape == (batch, 1) and prob.dtype == np.float32
    np.testing.assert_allclose(prob, ref, rtol=0, atol=TOL)


def test_reference_matches_hand_computed_dlrm():
    """2 dense features, 2 slots, dim 2; interaction pairs in DLRM's order (1,0), (2,0), (2,1)."""
    w = {
        "bot_w0": np.array([[1.0, 0.0], [0.0, 2.0]], np.float32),
        "bot_b0": np.array([0.0, -1.0], np.float32),
        # top input: x (2) + 3 pairs
        "top_w0": np.array([[1.0], [10.0], [100.0], [1000.0], [10000.0]], np.float32) * 1e-4,
        "top_b0": np.array([0.5], np.float32),
    }
    dense = np.array([[3.0, 1.0]], np.float32)
    emb = np.array([[1.0, 2.0, -1.0, 1.5]], np.float32)
    x = np.array([3.0, 1.0])  # relu([3, 2 - 1])
    e1, e2 = np.array([1.0, 2.0]), np.array([-1.0, 1.5])
    top_in = np.array([x[0], x[1], x @ e1, x @ e2, e2 @ e1])  # = [3, 1, 5, -1.5, 2]
    logit = top_in @ np.array([1e-4, 1e-3, 1e-2, 1e-1, 1.0]) + 0.5
    expected = 1 / (1 + np.exp(-logit))
    assert dense_forward(w, dense, emb)[0, 0] == pytest.approx(expected, abs=1e-7)
    assert top_in.tolist() == [3, 1, 5, -1.5, 2]


def test_onnx_matches_reference_with_wide_outputs(tmp_path):
    """Given weights, scaled so probabilities span (0, 1): the interaction and top MLP matter."""
    arch = dense_arch(dim=4, num_slots=3, bottom=[8, 4], top=[16, 1])
    weights = {k: v * 4 for k, v in init_weights(arch, seed=7).items()}
    saved = save_dense_model(tmp_path / "m.onnx", weights=weights)
    dense, emb = inputs(512, 4, slots=3)
    emb *= 20
    ref = dense_forward(weights, dense, emb)
    assert ref.min() < 0.05 and ref.max() > 0.95
    (prob,) = session(tmp_path / "m.onnx").run(None, {"DENSE": dense, "EMB": emb})
    np.testing.assert_allclose(prob, ref, rtol=0, atol=TOL)
    assert all(np.array_equal(saved[k], weights[k]) for k in weights)


def test_weights_round_trip(model):
    path, dim, weights, _ = model
    loaded = load_dense_weights(path)
    assert sorted(loaded) == sorted(weights)
    for k in weights:
        assert loaded[k].dtype == np.float32
        np.testing.assert_array_equal(loaded[k], weights[k])
    assert arch_of(loaded) == dense_arch(dim)
    assert arch_of(loaded).layer_shapes()["top_w0"] == (dim + 27 * 26 // 2, 128)


def test_seeded_weights_are_deterministic(tmp_path):
    a = save_dense_model(tmp_path / "a.onnx", dim=8, seed=3)
    b = save_dense_model(tmp_path / "b.onnx", dim=8, seed=3)
    c = init_weights(dense_arch(8), seed=4)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["bot_w0"], c["bot_w0"])
    # Glorot-scaled: the spread follows sqrt(2 / (fan_in + fan_out))
    w = init_weights(dense_arch(8), seed=0)["top_w0"]
    assert w.std() == pytest.approx(np.sqrt(2 / sum(w.shape)), rel=0.05)


def test_describe_our_model(model):
    path, dim, _, _ = model
    io = describe_onnx(path)
    got = [(t.name, t.dtype, t.datatype, t.shape) for t in io.inputs + io.outputs]
    assert got == [
        ("DENSE", "float32", "FP32", (-1, 13)),
        ("EMB", "float32", "FP32", (-1, 26 * dim)),
        ("PROB", "float32", "FP32", (-1, 1)),
    ]
    emb = io.input("EMB")
    assert emb.batched and emb.triton_dims() == [26 * dim] and emb.triton_dtype == "TYPE_FP32"
    with pytest.raises(KeyError, match="no input 'KEYS'.*DENSE"):
        io.input("KEYS")


def test_describe_foreign_model(tmp_path):
    """A graph like a torch.onnx export: other names and types, an initializer listed as input."""
    g = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["ids_f", "w"], ["y"]),
            helper.make_node("Cast", ["y"], ["logits"], to=TensorProto.FLOAT16),
        ],
        "torch_jit",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch_size", 4]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 2]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, [None, 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 2], np.ones(8, np.float32))],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "foreign.onnx")
    io = describe_onnx(tmp_path / "foreign.onnx")
    assert [(t.name, t.datatype, t.shape) for t in io.inputs] == [("ids", "INT64", (-1, 4))]
    assert [(t.name, t.dtype, t.triton_dtype, t.shape) for t in io.outputs] == [
        ("logits", "float16", "TYPE_FP16", (-1, 2))
    ]
    with pytest.raises(ModelFileError, match="not a DLRM dense model"):
        load_dense_weights(tmp_path / "foreign.onnx")


def test_bad_files(tmp_path):
    with pytest.raises(ModelFileError, match="no such ONNX file"):
        describe_onnx(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 100)
    with pytest.raises(ModelFileError, match="junk.onnx: not a readable ONNX model"):
        describe_onnx(tmp_path / "junk.onnx")


@pytest.mark.parametrize(
    "dense_shape, emb_shape, field, match",
    [
        ((4, 12), (4, 26 * 8), "DENSE", r"shape \[4, 12\]: expected \[batch, 13\]"),
        ((4,), (4, 26 * 8), "DENSE", r"shape \[4\]: expected \[batch, 13\]"),
        ((4, 13), (4, 25 * 8), "EMB", r"shape \[4, 200\]: expected \[batch, 208\]"),
        ((4, 13), (4, 26, 7), "EMB", r"shape \[4, 26, 7\]: expected \[batch, 208\]"),
        ((4, 13), (5, 26 * 8), "EMB", r"batch 5: expected the batch size of DENSE \(4\)"),
    ],
)
def test_reference_rejects_bad_shapes(dense_shape, emb_shape, field, match):
    weights = init_weights(dense_arch(8), seed=0)
    with pytest.raises(InvalidInputError, match=match) as e:
        dense_forward(weights, np.zeros(dense_shape, np.float32), np.zeros(emb_shape, np.float32))
    assert e.value.field == field


def test_reference_accepts_3d_embeddings_and_rejects_strings():
    weights = init_weights(dense_arch(8), seed=0)
    dense, emb = inputs(5, 8)
    flat = dense_forward(weights, dense, emb)
    np.testing.assert_array_equal(dense_forward(weights, dense, emb.reshape(5, 26, 8)), flat)
    with pytest.raises(InvalidInputError, match="'DENSE' = dtype <U1: expected a real-valued"):
        dense_forward(weights, np.full((5, 13), "a"), emb)


def test_bad_weights_and_sizes():
    weights = init_weights(dense_arch(8), seed=0)
    with pytest.raises(ValueError, match="weight 'top_b1' is missing"):
        dense_forward({k: v for k, v in weights.items() if k != "top_b1"}, *inputs(2, 8))
    bad = dict(weights, bot_b1=np.zeros(7, np.float32))
    with pytest.raises(ValueError, match=r"'bot_b1' has shape \(7,\): expected \(8,\)"):
        arch_of(bad)
    with pytest.raises(ConfigError, match="'dim' = 0"):
        dense_arch(0)
    with pytest.raises(ConfigError, match="'top' = \\[128, 2\\]: expected a list .* ending in 1"):
        dense_arch(8, top=[128, 2])


def test_cli_writes_the_same_model(tmp_path):
    out = tmp_path / "cli" / "model.onnx"
    r = subprocess.run(
        [sys.executable, "-m", "hps_core.cli", "dense", "--dim", "4", "--seed", "9", "--out", out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "EMB FP32 [-1, 104]" in r.stdout
    expected = save_dense_model(tmp_path / "api.onnx", dim=4, seed=9)
    assert out.read_bytes() == (tmp_path / "api.onnx").read_bytes()
    loaded = load_dense_weights(out)
    assert all(np.array_equal(loaded[k], expected[k]) for k in expected)
    r = subprocess.run(
        [sys.executable, "-m", "hps_core.cli", "dense", "--dim", "0", "--out", out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "'dim' = 0: expected an integer >= 1" in r.stderr


def test_reference_saturates_without_overflow():
    """Huge logits give exactly 0 and 1 with no overflow (underflow to 0 is what we want)."""
    arch = dense_arch(dim=2, num_slots=1, bottom=[2], top=[1])
    w = init_weights(arch, seed=0)
    w["top_b0"] = np.array([0.0], np.float32)
    w["top_w0"] = np.zeros((arch.top_input, 1), np.float32)
    dense = np.zeros((2, 13), np.float32)
    emb = np.zeros((2, 2), np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for bias, want in ((-1e4, 0.0), (1e4, 1.0), (0.0, 0.5)):
            w["top_b0"][0] = bias
            assert dense_forward(w, dense, emb)[:, 0].tolist() == [want, want]
