"""``analyze()`` on the example models against an independent numpy computation of the EASIER entropy.

The reference does not use ``onnx_easier.calibrate``: every pre-activation tensor the report names is added as
an extra graph output with ``onnx.helper``, ONNX Runtime runs with graph optimizations off over the whole
calibration file, and per channel::

    p_c = mean(x >= 0)  over samples and positions    (channel axis 1 after Conv, last after Gemm/MatMul)
    H(p) = -p log2 p - (1 - p) log2(1 - p),  H(0) = H(1) = 0
    H_layer = mean_c H(p_c)

The counts are integers, so the two computations must agree to float rounding (1e-6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, shape_inference

from onnx_easier import analyze

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CALIB = MODELS / "digits16_calib.npz"
NAMES = ("resnet_digits", "mobilenetv2_digits")
ACTIVATION_OPS = {"Relu", "Clip", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "Gelu"}
CONV_OPS = {"Conv", "ConvTranspose", "BatchNormalization"}
DENSE_OPS = {"Gemm", "MatMul"}
BATCH = 128


def _paths(name: str) -> tuple[Path, Path]:
    model, data = MODELS / f"{name}.onnx", CALIB
    if not model.exists() or not data.exists():
        pytest.skip(f"{model.name} or {data.name} is not in models/ yet (tools/train_digits.py writes them)")
    return model, data


def _channel_axis(model: onnx.ModelProto, tensor: str) -> int:
    """1 when the nearest layer above ``tensor`` is a Conv (or BN), -1 when it is a Gemm/MatMul: walk up through
    the first non-constant input of each producer (Add of a residual, Clip bounds and the like are skipped)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    constants = {t.name for t in model.graph.initializer}
    name = tensor
    for _ in range(64):
        node = producers.get(name)
        if node is None:
            break
        if node.op_type in CONV_OPS:
            return 1
        if node.op_type in DENSE_OPS:
            return -1
        inputs = [i for i in node.input if i and i not in constants and not _is_constant_node(producers.get(i))]
        if not inputs:
            break
        name = inputs[0]
    raise AssertionError(f"no Conv/Gemm/MatMul above {tensor!r}")


def _is_constant_node(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "Constant"


def _expose(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` with ``tensors`` appended to the graph outputs (element type from shape inference)."""
    inferred = shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for t in tensors:
        if t not in present:
            out.graph.output.append(helper.make_tensor_value_info(t, types.get(t, onnx.TensorProto.FLOAT), None))
    return out


def _numpy_entropies(model: onnx.ModelProto, tensors: list[str], x: np.ndarray) -> dict[str, tuple[int, float]]:
    """tensor -> (channels, mean binary entropy over channels) over every sample of ``x``."""
    axes = {t: _channel_axis(model, t) for t in tensors}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(_expose(model, tensors).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    on: dict[str, np.ndarray] = {}
    total: dict[str, int] = {}
    for i in range(0, len(x), BATCH):
        values = session.run(tensors, {input_name: x[i:i + BATCH]})
        for t, v in zip(tensors, values):
            moved = np.moveaxis(v, axes[t], -1)
            flat = moved.reshape(-1, moved.shape[-1])
            on[t] = on.get(t, 0) + (flat >= 0).sum(axis=0, dtype=np.int64)
            total[t] = total.get(t, 0) + flat.shape[0]
    out = {}
    for t in tensors:
        p = on[t] / total[t]
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(p > 0, p * np.log2(p), 0.0) - np.where(p < 1, (1 - p) * np.log2(1 - p), 0.0)
        out[t] = (int(p.size), float(h.mean()))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_entropies_match_numpy_on_exposed_pre_activations(name: str) -> None:
    model_path, data_path = _paths(name)
    model = onnx.load(str(model_path))
    with np.load(data_path) as data:
        x = data["x"]

    report = analyze(model_path, data_path).report()

    assert report["data"]["samples"] == len(x)
    assert not report["data"]["synthetic"]
    # every activation node of the exported model is reported, once, with its input as the pre-activation tensor
    expected_tensors = [n.input[0] for n in model.graph.node if n.op_type in ACTIVATION_OPS]
    tensors = [a["tensor"] for a in report["activations"]]
    assert expected_tensors
    assert sorted(tensors) == sorted(expected_tensors)

    reference = _numpy_entropies(model, tensors, x)
    for act in report["activations"]:
        channels, entropy = reference[act["tensor"]]
        assert act["channels"] == channels, act["node"]
        assert act["entropy"] == pytest.approx(entropy, abs=1e-6), act["node"]
        assert 0.0 <= act["entropy"] <= 1.0
    # the models were trained: not every layer is saturated, and no entropy is exactly the same for all layers
    assert len({round(a["entropy"], 9) for a in report["activations"]}) > 1
