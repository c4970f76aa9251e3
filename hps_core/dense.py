"""The dense half of a DLRM: an ONNX graph built with ``onnx.helper``, and its numpy reference.

Graph (all FP32, batch dimension dynamic)::

    DENSE [B, num_dense] -> bottom MLP (ReLU after every layer) -> x [B, dim]
    EMB [B, num_slots * dim] -> [B, num_slots, dim]
    T = concat(x[:, None], EMB) [B, n, dim], n = num_slots + 1
    Z = T @ T^T [B, n, n]; keep Z[:, i, j] for i in range(n) for j in range(i)  (DLRM's order)
    concat(x, Z pairs) [B, dim + n(n-1)/2] -> top MLP (ReLU, last layer linear) -> sigmoid
    -> PROB [B, 1]

The pair order is DLRM's ``interact_features`` (strictly lower triangle, row by row; the
values equal the upper triangle's, since Z is symmetric), so weights trained with DLRM load
unchanged. Layer ``k`` of the bottom MLP holds ``bot_w{k}`` [in, out] and ``bot_b{k}`` [out];
the top MLP ``top_w{k}`` / ``top_b{k}``. Weights are ONNX initializers of those names, so
``load_dense_weights`` reads back any model ``save_dense_model`` wrote.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, InvalidInputError, ModelFileError

DENSE_INPUT = "DENSE"
EMB_INPUT = "EMB"
PROB_OUTPUT = "PROB"
NUM_DENSE = 13
NUM_SLOTS = 26
# Opset 17 / IR 8: loadable by the onnxruntime of every NGC Triton image since 22.x.
OPSET = 17
IR_VERSION = 8

_WEIGHT_NAME = re.compile(r"^(bot|top)_([wb])(\d+)$")

# ONNX TensorProto element type -> (numpy dtype name, Triton datatype).
_ONNX_TYPES = {
    1: ("float32", "FP32"),
    2: ("uint8", "UINT8"),
    3: ("int8", "INT8"),
    4: ("uint16", "UINT16"),
    5: ("int16", "INT16"),
    6: ("int32", "INT32"),
    7: ("int64", "INT64"),
    8: ("object", "BYTES"),
    9: ("bool", "BOOL"),
    10: ("float16", "FP16"),
    11: ("float64", "FP64"),
    12: ("uint32", "UINT32"),
    13: ("uint64", "UINT64"),
    16: ("bfloat16", "BF16"),
}


@dataclass(frozen=True)
class DenseArch:
    """Layer sizes of a DLRM dense network; ``bottom[-1]`` is the embedding ``dim``."""

    num_dense: int
    num_slots: int
    bottom: tuple[int, ...]
    top: tuple[int, ...]

    @property
    def dim(self) -> int:
        """Embedding vector size of every slot (the bottom MLP's output size)."""
        return self.bottom[-1]

    @property
    def num_pairs(self) -> int:
        """Interaction pairs: (num_slots + 1) choose 2."""
        n = self.num_slots + 1
        return n * (n - 1) // 2

    @property
    def top_input(self) -> int:
        """Width of the top MLP's input: the bottom output and the pairs."""
        return self.dim + self.num_pairs

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every weight array, by name."""
        shapes: dict[str, tuple[int, ...]] = {}
        for prefix, fan_in, sizes in (
            ("bot", self.num_dense, self.bottom),
            ("top", self.top_input, self.top),
        ):
            for k, out in enumerate(sizes):
                shapes[f"{prefix}_w{k}"] = (fan_in, out)
                shapes[f"{prefix}_b{k}"] = (out,)
                fan_in = out
        return shapes


def dense_arch(
    dim: int,
    num_dense: int = NUM_DENSE,
    num_slots: int = NUM_SLOTS,
    bottom: Sequence[int] | None = None,
    top: Sequence[int] | None = None,
) -> DenseArch:
    """A validated architecture; defaults: bottom [64, dim], top [128, 64, 1]."""
    bottom = (64, dim) if bottom is None else tuple(int(b) for b in bottom)
    top = (128, 64, 1) if top is None else tuple(int(t) for t in top)
    for name, value in (("dim", dim), ("num_dense", num_dense), ("num_slots", num_slots)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(name, value, "an integer >= 1")
    if not bottom or bottom[-1] != dim:
        raise ConfigError("bottom", list(bottom), f"a list of layer sizes ending in dim ({dim})")
    if not top or top[-1] != 1:
        raise ConfigError("top", list(top), "a list of layer sizes ending in 1")
    if min(bottom + top) < 1:
        raise ConfigError("bottom + top", list(bottom + top), "layer sizes >= 1")
    return DenseArch(int(num_dense), int(num_slots), bottom, top)


def arch_of(weights: Mapping[str, np.ndarray]) -> DenseArch:
    """The architecture a weight dict describes (checked for consistency)."""
    layers: dict[str, int] = {"bot": 0, "top": 0}
    for name in weights:
        m = _WEIGHT_NAME.match(name)
        if m is None:
            raise ValueError(
                f"weight '{name}': expected names bot_w<k>, bot_b<k>, top_w<k>, top_b<k>"
            )
        layers[m[1]] = max(layers[m[1]], int(m[3]) + 1)
    if not layers["bot"] or not layers["top"]:
        raise ValueError(f"weights {sorted(weights)}: expected a bottom and a top MLP")
    for p in ("bot", "top"):
        for k in range(layers[p]):
            for kind in "wb":
                if f"{p}_{kind}{k}" not in weights:
                    raise ValueError(f"weight '{p}_{kind}{k}' is missing")
    bottom = tuple(int(np.shape(weights[f"bot_w{k}"])[-1]) for k in range(layers["bot"]))
    top = tuple(int(np.shape(weights[f"top_w{k}"])[-1]) for k in range(layers["top"]))
    num_dense = int(np.shape(weights["bot_w0"])[0])
    # top_w0 has dim + n(n-1)/2 rows, n = num_slots + 1; solve for n.
    pairs = int(np.shape(weights["top_w0"])[0]) - bottom[-1]
    n = int(round((1 + np.sqrt(1 + 8 * max(pairs, 0))) / 2))
    if pairs < 1 or n * (n - 1) // 2 != pairs:
        raise ValueError(
            f"top_w0 has {np.shape(weights['top_w0'])[0]} rows: expected dim ({bottom[-1]}) + "
            "n(n-1)/2 interaction pairs for some n >= 2"
        )
    arch = dense_arch(bottom[-1], num_dense, n - 1, bottom, top)
    for name, shape in arch.layer_shapes().items():
        if tuple(np.shape(weights[name])) != shape:
            raise ValueError(
                f"weight '{name}' has shape {np.shape(weights[name])}: expected {shape}"
            )
    return arch


def init_weights(arch: DenseArch, seed: int = 0) -> dict[str, np.ndarray]:
    """DLRM's initialisation, from a seed: W ~ N(0, sqrt(2/(in+out))), b ~ N(0, sqrt(1/out))."""
    if seed < 0:
        raise ConfigError("seed", seed, "an integer >= 0")
    weights = {}
    for k, (name, shape) in enumerate(arch.layer_shapes().items()):
        rng = np.random.default_rng([seed, k])
        std = np.sqrt(2.0 / sum(shape)) if len(shape) == 2 else np.sqrt(1.0 / shape[0])
        weights[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    return weights


def _pair_indices(n: int) -> np.ndarray:
    """Flat indices into an [n, n] matrix of DLRM's pairs (i, j), j < i, row by row."""
    return np.array([i * n + j for i in range(n) for j in range(i)], dtype=np.int64)


# -- the numpy reference ---------------------------------------------------------------------------


def _check_input(name: str, a: np.ndarray, shapes: list[tuple], expected: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "fiub":
        raise InvalidInputError(name, f"dtype {a.dtype}", "a real-valued array (FP32)")
    for shape in shapes:
        if a.ndim == len(shape) and all(s in (-1, d) for s, d in zip(shape, a.shape, strict=True)):
            return a.astype(np.float32, copy=False)
    raise InvalidInputError(name, f"shape {list(a.shape)}", expected)


def dense_forward(
    weights: Mapping[str, np.ndarray], dense: np.ndarray, emb: np.ndarray
) -> np.ndarray:
    """PROB [B, 1] float32 for DENSE [B, num_dense] and EMB [B, num_slots * dim] (or [B, S, dim])."""
    arch = arch_of(weights)
    S, D = arch.num_slots, arch.dim
    x = _check_input(DENSE_INPUT, dense, [(-1, arch.num_dense)], f"[batch, {arch.num_dense}]")
    e = _check_input(
        EMB_INPUT, emb, [(-1, S * D), (-1, S, D)], f"[batch, {S * D}] ({S} slots x dim {D})"
    )
    if e.shape[0] != x.shape[0]:
        raise InvalidInputError(
            EMB_INPUT, f"batch {e.shape[0]}", f"the batch size of {DENSE_INPUT} ({x.shape[0]})"
        )
    # float64 accumulation: the reference should be closer to exact than the engine it checks.
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    h = x.astype(np.float64)
    for k in range(len(arch.bottom)):
        h = np.maximum(h @ w[f"bot_w{k}"] + w[f"bot_b{k}"], 0.0)
    t = np.concatenate([h[:, None, :], e.reshape(-1, S, D).astype(np.float64)], axis=1)
    z = np.einsum("bid,bjd->bij", t, t).reshape(len(t), (S + 1) ** 2)[:, _pair_indices(S + 1)]
    h = np.concatenate([h, z], axis=1)
    for k in range(len(arch.top)):
        h = h @ w[f"top_w{k}"] + w[f"top_b{k}"]
        if k < len(arch.top) - 1:
            h = np.maximum(h, 0.0)
    return np.exp(-np.logaddexp(0.0, -h)).astype(np.float32)  # sigmoid without overflow


class DeviceDense:
    """The same network in float32 on an array module, for the GPU path where onnxruntime has
    no CUDA provider (the GPU machines' onnxruntime is the CPU build): CuPy runs the matrix
    products on cuBLAS, with the embeddings where the device lookup left them. ``dense_forward``
    is its reference (tests run it over NumPy).

    Args:
        weights: as ``dense_forward`` takes them (``load_dense_weights`` of an ONNX file).
        xp: the array module (``cupy``; ``numpy`` in tests).
    """

    def __init__(self, weights: Mapping[str, np.ndarray], xp=np):
        self.arch = arch_of(weights)
        self.xp = xp
        self.w = {k: xp.asarray(np.asarray(v, np.float32)) for k, v in weights.items()}
        self.pairs = xp.asarray(_pair_indices(self.arch.num_slots + 1))

    def __call__(self, dense, emb):
        """PROB [B, 1] float32 (on the module's device) for DENSE [B, num_dense] and EMB
        [B, num_slots * dim], both arrays of the module."""
        xp, w, arch = self.xp, self.w, self.arch
        S, D = arch.num_slots, arch.dim
        h = dense.astype(np.float32, copy=False)
        for k in range(len(arch.bottom)):
            h = xp.maximum(h @ w[f"bot_w{k}"] + w[f"bot_b{k}"], 0.0)
        t = xp.concatenate([h[:, None, :], emb.reshape(-1, S, D)], axis=1)
        z = xp.matmul(t, t.transpose(0, 2, 1)).reshape(len(t), (S + 1) ** 2)[:, self.pairs]
        h = xp.concatenate([h, z], axis=1)
        for k in range(len(arch.top)):
            h = h @ w[f"top_w{k}"] + w[f"top_b{k}"]
            if k < len(arch.top) - 1:
                h = xp.maximum(h, 0.0)
        return xp.exp(-xp.logaddexp(0.0, -h)).astype(np.float32)


# -- the ONNX graph --------------------------------------------------------------------------------


def build_dense_model(weights: Mapping[str, np.ndarray]):
    """The ``onnx.ModelProto`` of the network with these weights (checked by onnx.checker)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    arch = arch_of(weights)
    S, D, n = arch.num_slots, arch.dim, arch.num_slots + 1
    init = [
        numpy_helper.from_array(np.asarray(weights[k], np.float32), k) for k in arch.layer_shapes()
    ]
    init += [
        numpy_helper.from_array(np.array([-1, 1, D], np.int64), "shape_x3"),
        numpy_helper.from_array(np.array([-1, S, D], np.int64), "shape_emb3"),
        numpy_helper.from_array(np.array([-1, n * n], np.int64), "shape_flat"),
        numpy_helper.from_array(_pair_indices(n), "pair_idx"),
    ]
    nodes = []
    h = DENSE_INPUT
    for k in range(len(arch.bottom)):
        nodes.append(helper.make_node("Gemm", [h, f"bot_w{k}", f"bot_b{k}"], [f"bot_y{k}"]))
        nodes.append(helper.make_node("Relu", [f"bot_y{k}"], [f"bot_h{k}"]))
        h = f"bot_h{k}"
    nodes += [
        helper.make_node("Reshape", [h, "shape_x3"], ["x3"]),
        helper.make_node("Reshape", [EMB_INPUT, "shape_emb3"], ["emb3"]),
        helper.make_node("Concat", ["x3", "emb3"], ["feats"], axis=1),
        helper.make_node("Transpose", ["feats"], ["feats_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["feats", "feats_t"], ["dots"]),
        helper.make_node("Reshape", ["dots", "shape_flat"], ["dots_flat"]),
        helper.make_node("Gather", ["dots_flat", "pair_idx"], ["pairs"], axis=1),
        helper.make_node("Concat", [h, "pairs"], ["top_in"], axis=1),
    ]
    h = "top_in"
    for k in range(len(arch.top)):
        nodes.append(helper.make_node("Gemm", [h, f"top_w{k}", f"top_b{k}"], [f"top_y{k}"]))
        h = f"top_y{k}"
        if k < len(arch.top) - 1:
            nodes.append(helper.make_node("Relu", [h], [f"top_h{k}"]))
            h = f"top_h{k}"
    nodes.append(helper.make_node("Sigmoid", [h], [PROB_OUTPUT]))
    graph = helper.make_graph(
        nodes,
        "dlrm_dense",
        [
            helper.make_tensor_value_info(
                DENSE_INPUT, TensorProto.FLOAT, ["batch", arch.num_dense]
            ),
            helper.make_tensor_value_info(EMB_INPUT, TensorProto.FLOAT, ["batch", S * D]),
        ],
        [helper.make_tensor_value_info(PROB_OUTPUT, TensorProto.FLOAT, ["batch", 1])],
        init,
    )
    model = helper.make_model(
        graph, producer_name="hps_core", opset_imports=[helper.make_opsetid("", OPSET)]
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {
            "num_dense": str(arch.num_dense),
            "num_slots": str(S),
            "dim": str(D),
            "bottom": ",".join(map(str, arch.bottom)),
            "top": ",".join(map(str, arch.top)),
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def save_dense_model(
    path: str | os.PathLike,
    dim: int = 16,
    seed: int = 0,
    weights: Mapping[str, np.ndarray] | None = None,
    *,
    num_dense: int = NUM_DENSE,
    num_slots: int = NUM_SLOTS,
    bottom: Sequence[int] | None = None,
    top: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Write the ONNX file (seeded weights unless ``weights`` is given); returns the weights."""
    if weights is None:
        weights = init_weights(dense_arch(dim, num_dense, num_slots, bottom, top), seed)
    else:
        weights = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    model = build_dense_model(weights)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return dict(weights)


def load_dense_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The weight dict of a model written by ``save_dense_model`` (for ``dense_forward``)."""
    from onnx import numpy_helper

    model = _load(path)
    weights = {
        t.name: numpy_helper.to_array(t)
        for t in model.graph.initializer
        if _WEIGHT_NAME.match(t.name)
    }
    try:
        arch_of(weights)
    except ValueError as e:
        raise ModelFileError(
            str(path), f"not a DLRM dense model written by hps_core.dense ({e})"
        ) from None
    return weights


# -- describing any ONNX file ----------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: name, element type and shape (-1 where dynamic)."""

    name: str
    dtype: str  # numpy name, e.g. "float32"
    datatype: str  # Triton / KServe name, e.g. "FP32"
    shape: tuple[int, ...]

    @property
    def triton_dtype(self) -> str:
        """The ``data_type`` of a Triton model config, e.g. ``TYPE_FP32``."""
        return "TYPE_STRING" if self.datatype == "BYTES" else f"TYPE_{self.datatype}"

    @property
    def batched(self) -> bool:
        """True when the first dimension is dynamic (Triton can batch along it)."""
        return bool(self.shape) and self.shape[0] == -1

    def triton_dims(self) -> list[int]:
        """The ``dims`` of a Triton config with ``max_batch_size > 0`` (batch dim left out)."""
        return list(self.shape[1:] if self.batched else self.shape)


@dataclass(frozen=True)
class OnnxIO:
    """The inputs and outputs of an ONNX graph, in graph order."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def input(self, name: str) -> TensorInfo:
        """The input called ``name`` (KeyError listing the inputs when there is none)."""
        return _by_name(self.inputs, name, "input")

    def output(self, name: str) -> TensorInfo:
        """The output called ``name`` (KeyError listing the outputs when there is none)."""
        return _by_name(self.outputs, name, "output")


def _by_name(infos: tuple[TensorInfo, ...], name: str, kind: str) -> TensorInfo:
    for i in infos:
        if i.name == name:
            return i
    raise KeyError(f"the graph has no {kind} '{name}'; {kind}s: {[i.name for i in infos]}")


def _load(path: str | os.PathLike):
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ModelFileError(str(p), "no such ONNX file")
    try:
        return onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ModelFileError(
            str(p), f"not a readable ONNX model ({type(e).__name__}: {e})"
        ) from None


def _tensor_info(vi) -> TensorInfo:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        raise ValueError(f"'{vi.name}' is not a tensor (sequence and map I/O are not supported)")
    dtype, datatype = _ONNX_TYPES.get(tt.elem_type, (f"onnx_type_{tt.elem_type}", "UNKNOWN"))
    dims = tt.shape.dim if tt.HasField("shape") else []
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    return TensorInfo(vi.name, dtype, datatype, shape)


def check_ensemble_io(io: OnnxIO, path: str | os.PathLike, slots: int, dim: int) -> None:
    """An ONNX model fits the ensemble: inputs DENSE [B, n] and EMB [B, slots * dim] (the
    embedding model's output for this config), output PROB; a ModelFileError naming the tensor
    otherwise (a model made for other tables failed every request at the dense step)."""
    names = {t.name: t for t in io.inputs}
    for name in (DENSE_INPUT, EMB_INPUT):
        if name not in names:
            raise ModelFileError(
                str(path), f"no input '{name}'; its inputs are {sorted(names)}, expected "
                f"'{DENSE_INPUT}' [B, n] and '{EMB_INPUT}' [B, {slots * dim}]",
            )  # fmt: skip
    emb = names[EMB_INPUT].shape
    if len(emb) != 2 or emb[-1] not in (-1, slots * dim):
        raise ModelFileError(
            str(path), f"input '{EMB_INPUT}' has shape {list(emb)}, expected [B, {slots * dim}]: "
            f"{slots} tables of dim {dim}, as the config has them",
        )  # fmt: skip
    if len(names[DENSE_INPUT].shape) != 2:
        raise ModelFileError(
            str(path), f"input '{DENSE_INPUT}' has shape {list(names[DENSE_INPUT].shape)}, "
            "expected [B, n]",
        )  # fmt: skip
    if PROB_OUTPUT not in {t.name for t in io.outputs}:
        raise ModelFileError(
            str(path), f"no output '{PROB_OUTPUT}'; its outputs are "
            f"{[t.name for t in io.outputs]}, expected '{PROB_OUTPUT}' [B, 1]",
        )  # fmt: skip


def describe_onnx(path: str | os.PathLike) -> OnnxIO:
    """Names, dtypes and shapes of an ONNX file's inputs and outputs (initializers left out)."""
    model = _load(path)
    g = model.graph
    # Exporters with IR < 4 list initializers among the inputs; they are not fed by a client.
    weights = {t.name for t in g.initializer}
    try:
        inputs = tuple(_tensor_info(v) for v in g.input if v.name not in weights)
        outputs = tuple(_tensor_info(v) for v in g.output)
    except ValueError as e:
        raise ModelFileError(str(path), str(e)) from None
    return OnnxIO(inputs, outputs)
