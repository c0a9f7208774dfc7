"""The torch executor (onnx_easier/torch_exec.py) against ONNX Runtime (optimizations off): single ops with the
attribute cases torch computes differently (asymmetric pads, auto_pad, negative Slice steps, opset-11 Softmax,
Split by count, Resize modes), the reference-code architectures of tests/zoo_arch.py at tiny sizes (TorchScript
export: the zoo's op spellings at a fraction of its export time), and the example models in models/ with the fused
graphs the tool writes for them. Tolerance: ``max|a - b| / max(1, max|a|) <= 1e-4`` per output (safety.output_error).

Not run: ``nn.LSTM`` / ``nn.GRU`` (the executor has no LSTM / GRU op: ``check_against_ort`` says so, which the
test asserts) and the dynamo exports (their extra spellings: Gelu, ScatterND, ReduceMean with axes as an input,
Gather, are single-op cases here; a dynamo export costs 3-20 s), and to keep this file within seconds the
architectures whose ops the others and the example models already hold: ResNet-50 (ResNet-18's), MobileNetV2
(models/mobilenetv2_digits.onnx), MobileNetV3 and EfficientNet (HardSigmoid, HardSwish, Sigmoid, Mul: single ops
here), ConvNeXt (ViT's and Swin's). All of these, at the sizes of tests/test_real_zoo.py and with both
exporters, matched ORT within 1e-4 when the executor was written (LSTM / GRU excepted).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
import zoo_arch as A

from onnx_easier.torch_exec import NotExecutable, TorchGraph, check_against_ort, unsupported

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-4


def single_op(op: str, x_shape: list[int], attrs: dict | None = None, consts: tuple = (), opset: int = 18,
              outputs: int = 1) -> onnx.ModelProto:
    """One ``op`` node on input ``x`` and constant inputs ``consts`` (arrays; None: an empty optional input)."""
    inits, names = [], ["x"]
    for i, c in enumerate(consts):
        if c is None:
            names.append("")
            continue
        inits.append(numpy_helper.from_array(np.asarray(c), f"c{i}"))
        names.append(f"c{i}")
    outs = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op, names, outs, name="n", **(attrs or {}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def feeds(shape: list[int]) -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}]


W = np.random.default_rng(1).standard_normal((6, 2, 3, 3)).astype(np.float32)
OP_CASES = {
    "conv_asym_pads_groups_dilation": ("Conv", [2, 4, 9, 8], {"pads": [0, 1, 2, 0], "group": 2, "dilations": [2, 1],
                                                              "strides": [2, 1]}, (W, np.ones(6, np.float32))),
    "conv_same_lower": ("Conv", [1, 4, 7, 8], {"auto_pad": "SAME_LOWER", "strides": [2, 2], "group": 2}, (W,)),
    "conv_transpose": ("ConvTranspose", [1, 6, 5, 5], {"strides": [2, 2], "pads": [1, 1, 1, 1],
                                                       "output_padding": [1, 1], "group": 2}, (W,)),
    "maxpool_asym_ceil": ("MaxPool", [1, 2, 9, 9], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 0, 1, 1],
                                                    "ceil_mode": 1}, ()),
    "avgpool_pads": ("AveragePool", [1, 2, 8, 8], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, ()),
    "avgpool_include": ("AveragePool", [1, 2, 8, 8], {"kernel_shape": [2, 2], "pads": [0, 0, 1, 1],
                                                      "count_include_pad": 1}, ()),
    "slice_negative_step": ("Slice", [3, 10], {}, (np.array([-2, 8]), np.array([-100, 1]), np.array([0, 1]),
                                                   np.array([-1, -3]))),
    "softmax_opset11": ("Softmax", [2, 3, 4], {"axis": 1}, (), 11),
    "split_num_outputs": ("Split", [2, 7], {"axis": 1, "num_outputs": 3}, (), 18, 3),
    "reduce_mean_axes_input": ("ReduceMean", [2, 3, 4], {"keepdims": 0}, (np.array([-1, 1]),)),
    "gelu_tanh": ("Gelu", [2, 5], {"approximate": "tanh"}, (), 20),
    "gather_negative": ("Gather", [5, 3], {"axis": 0}, (np.array([[-1, 0], [2, -2]]),)),
    "pad_reflect": ("Pad", [1, 2, 4, 5], {"mode": "reflect"}, (np.array([0, 0, 1, 2, 0, 0, 2, 1]),)),
    "resize_nearest": ("Resize", [1, 2, 3, 4], {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                                "nearest_mode": "floor"}, (None, np.array([1, 1, 2, 2], np.float32))),
    "resize_linear": ("Resize", [1, 2, 3, 4], {"mode": "linear"}, (None, np.array([1, 1, 2, 2], np.float32))),
    "layer_norm_axis": ("LayerNormalization", [2, 3, 4], {"axis": -2, "epsilon": 1e-3},
                        (np.full((3, 4), 1.5, np.float32), np.full((3, 4), 0.1, np.float32))),
    "scatter_nd": ("ScatterND", [4, 3], {}, (np.array([[1], [3]]), np.ones((2, 3), np.float32))),
    "gemm_trans": ("Gemm", [4, 3], {"transA": 1, "alpha": 0.5, "beta": 2.0},
                   (np.ones((4, 2), np.float32), np.arange(2, dtype=np.float32))),
    "clip_one_bound": ("Clip", [3, 4], {}, (None, np.array(0.5, np.float32))),
    "hardsigmoid": ("HardSigmoid", [3, 4], {"alpha": 0.3, "beta": 0.4}, ()),
    "hardswish": ("HardSwish", [3, 4], {}, ()),
    "prelu": ("PRelu", [2, 3, 4], {}, (np.array([[0.1], [0.2], [-0.3]], np.float32),)),
    "sigmoid": ("Sigmoid", [3, 4], {}, ()),
}


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_single_op(name: str) -> None:
    op, shape, attrs, consts, *rest = OP_CASES[name]
    model = single_op(op, shape, attrs, consts, *rest)
    assert check_against_ort(model, feeds(shape), RTOL) is None


def test_unsupported_op_is_named() -> None:
    model = single_op("Relu", [2, 3])
    model.graph.node[0].op_type = "Celu"
    model.graph.node[0].domain = "com.example"
    assert unsupported(model) == ["com.example:Celu"]
    with pytest.raises(NotExecutable, match="com.example:Celu"):
        TorchGraph(model)
    assert "com.example:Celu" in check_against_ort(model, feeds([2, 3]), RTOL)


def test_unsupported_attribute_is_a_difference_not_an_error() -> None:
    model = single_op("Resize", [1, 1, 3, 3], {"mode": "cubic"}, (None, np.array([1, 1, 2, 2], np.float32)))
    assert "Resize mode cubic" in check_against_ort(model, feeds([1, 1, 3, 3]), RTOL)


def test_parameters_and_values() -> None:
    """Trainable initializers become parameters; gradients reach them; ``values`` gives them back by name."""
    model = single_op("Conv", [1, 4, 5, 5], {"group": 2}, (W, np.zeros(6, np.float32)))
    graph = TorchGraph(model, trainable={"c0"})
    assert [p.shape for p in graph.parameters()] == [torch.Size(W.shape)]
    graph.run(feeds([1, 4, 5, 5])[0])[0].sum().backward()
    assert graph.params["c0"].grad is not None and graph.params["c0"].grad.abs().sum() > 0
    np.testing.assert_array_equal(graph.values()["c0"], W)
    graph.load({"c0": W * 2})
    np.testing.assert_array_equal(graph.values()["c0"], W * 2)


# --- the zoo's architectures, tiny -------------------------------------------------------------------------------

ZOO: dict[str, tuple[Callable[[], torch.nn.Module], int]] = {
    "resnet18": (lambda: A.resnet18(4, 10), 32),
    "vit": (lambda: A.VisionTransformer(16, 8, 1, 2, 16, 32, 10), 16),
    "swin": (lambda: A.SwinTransformer(8, (1, 1, 1, 1), (1, 1, 1, 1), 4, 4, 10), 32),
    "yolov5": (lambda: A.YOLOv5(0.125, 0.33, 4), 32),
}


def export(module: torch.nn.Module, args: tuple, names: list[str], path: Path) -> onnx.ModelProto:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(A.randomize(module), args, str(path), input_names=names, dynamo=False, opset_version=17,
                          external_data=False)
    return onnx.load(path)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_image(name: str, tmp_path: Path) -> None:
    build, side = ZOO[name]
    torch.manual_seed(0)
    model = export(build(), (torch.randn(2, 3, side, side),), ["x"], tmp_path / "m.onnx")
    assert check_against_ort(model, feeds([2, 3, side, side]), RTOL) is None


@pytest.mark.parametrize("sdpa", [False, True])
def test_zoo_bert(sdpa: bool, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (2, 8)).astype(np.int64)
    mask = np.ones((2, 8), np.int64)
    mask[1, 5:] = 0
    types = (np.arange(8)[None] >= 4).astype(np.int64).repeat(2, 0)
    args = tuple(torch.from_numpy(a) for a in (ids, mask, types))
    model = export(A.Bert(50, 16, 1, 2, 32, 8, 3, sdpa=sdpa), args,
                   ["input_ids", "attention_mask", "token_type_ids"], tmp_path / "m.onnx")
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    assert check_against_ort(model, [feed], RTOL) is None


def test_zoo_recurrent_falls_back(tmp_path: Path) -> None:
    """LSTM is no op of the executor: the check says so (distillation falls back on it)."""
    model = export(A.LSTMTagger(4, 8, 1, 3), (torch.randn(1, 5, 4), torch.zeros(1, 1, 8), torch.zeros(1, 1, 8)),
                   ["x", "h0", "c0"], tmp_path / "m.onnx")
    assert unsupported(model) == ["LSTM"]
    assert "LSTM" in check_against_ort(model, [], RTOL)


# --- example models ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vgg_digits", "resnet_digits", "mobilenetv2_digits", "ffn_digits",
                                  "mobilenetv2_wide_digits", "ffn_wide_digits"])
def test_example_models(name: str) -> None:
    model = onnx.load(ROOT / "models" / f"{name}.onnx")
    side = model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    x = np.load(ROOT / "models" / f"digits{side}_calib.npz")["x"][:8]
    assert check_against_ort(model, [{"x": x}], RTOL) is None
