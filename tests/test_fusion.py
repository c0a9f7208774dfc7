"""fusion.fuse: the whole pipeline to a fixpoint, the traceability mapping, torch exports with linearized
activations (nn.Identity in place of the activation)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

try:
    from test_pass_fuse_common import Net, assert_same, check_valid, feeds, ops
except ImportError:  # tests/ imported as a package
    from tests.test_pass_fuse_common import Net, assert_same, check_valid, feeds, ops
from torch_models import export

from onnx_easier.fusion import FUSION_PIPELINE, FusionResult, fuse
from onnx_easier.model_io import to_graph, to_model


def run_fuse(model: onnx.ModelProto, data: dict | None = None) -> tuple[onnx.ModelProto, FusionResult]:
    graph = to_graph(onnx.shape_inference.infer_shapes(model))
    result = fuse(graph)
    out = to_model(graph, model)
    check_valid(out)
    assert_same(model, out, data)
    return out, result


def test_pipeline_is_a_plain_tuple_of_passes() -> None:
    assert isinstance(FUSION_PIPELINE, tuple) and all(callable(p) for p in FUSION_PIPELINE)


def test_residual_fold_enables_a_second_round_of_chain_fusion() -> None:
    """conv_a -> [y + conv3x3(y)] -> conv_b: y has two readers until the residual folds; the next round fuses the
    three layers into one 3x3 convolution (+ the bias map of conv_a's bias through the padding)."""
    net = Net()
    x = net.input("x", ["N", 8, 6, 6])
    y = net.conv(x, 8, 8, k=1, name="conv_a")
    z = net.node("Add", y, net.conv(y, 8, 8, k=3, pads=[1, 1, 1, 1], name="conv_r"), out="res")
    net.output(net.conv(z, 8, 8, k=1, name="out"))
    out, result = run_fuse(net.model())
    assert ops(out) == ["Conv", "Add"]
    assert result.rounds >= 2
    (name, layer), = result.mapping.items()
    assert layer.input == "x" and layer.output == "out"
    assert sorted(layer.sources) == sorted(["conv_a", "conv_r", "res", "out"])
    assert name.startswith("fused(")
    json.dumps(result.mapping)  # the report writes it as JSON: [input, output, [sources]]


def test_fuse_is_idempotent_and_keeps_names() -> None:
    net = Net()
    x = net.input("x", ["N", 16, 8, 8])
    h = net.bn(net.conv(x, 16, 64, k=1), 64)
    h = net.node("Identity", h)
    h = net.bn(net.conv(h, 64, 64, k=3, group=64, pads=[1, 1, 1, 1]), 64)
    h = net.node("Identity", h)
    h = net.bn(net.conv(h, 64, 16, k=1), 16)
    net.output(net.node("Add", x, h, out="y"))
    model = net.model()
    once, first = run_fuse(model)
    assert ops(once) == ["Conv", "Add"]
    twice, second = run_fuse(once)
    assert ops(twice) == ops(once) and second.changed == 0 and second.rounds == 1
    assert first.changed > 0


def test_merged_constants_come_last() -> None:
    """Two BNs with the same (fresh) parameters: merging first would make them look shared and block the folds."""
    net = Net()
    x = net.input("x", ["N", 4, 5, 5])
    ones, zeros = np.ones(4), np.zeros(4)
    h = net.conv(x, 4, 4, k=1)
    h = net.node("BatchNormalization", h, net.const(ones), net.const(zeros), net.const(zeros), net.const(ones))
    h = net.node("Relu", h)
    h = net.conv(h, 4, 4, k=1)
    h = net.node("BatchNormalization", h, net.const(ones), net.const(zeros), net.const(zeros), net.const(ones))
    net.output(h)
    out, result = run_fuse(net.model())
    assert ops(out) == ["Conv", "Relu", "Conv"]
    assert [r.name for r in result.results][-1] == "merge_constants"


def test_subgraph_bodies_are_untouched() -> None:
    """A conv+bn inside an If branch stays as it is; the main graph's fuses."""
    inner = Net()
    inner._count = 1000  # names unique across scopes (ONNX forbids a subgraph shadowing an outer name)
    t = "t"
    w = inner.weight(4, 4, 1, 1)
    c = inner.node("Conv", t, w, out="ic")
    inner.bn(c, 4, name="ib")
    then_g = onnx.helper.make_graph(inner.nodes, "then", [], [onnx.helper.make_tensor_value_info(
        "ib", onnx.TensorProto.FLOAT, None)], inner.inits)
    else_g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["t"], ["e"])], "else", [],
                                    [onnx.helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, None)])
    net = Net()
    x = net.input("x", [1, 4, 3, 3])
    cond = net.input("cond", [], dtype=np.float32)
    net.inputs[-1] = onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])
    h = net.bn(net.conv(x, 4, 4, k=1), 4, name="t")
    net.nodes.append(onnx.helper.make_node("If", [cond], ["y"], name="if", then_branch=then_g, else_branch=else_g))
    net.output("y")
    model = net.model()
    for flag in (True, False):
        data = {"x": np.random.default_rng(0).standard_normal((1, 4, 3, 3)).astype(np.float32),
                "cond": np.array(flag)}
        out, _ = run_fuse(model, data)
    assert ops(out) == ["Conv", "If"]
    branch = next(a.g for a in out.graph.node[1].attribute if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["Conv", "BatchNormalization"]
    assert h == "t"


# ----------------------------------------------------------------------------------------------------------------
# torch exports with linearized activations


class InvertedResidual(nn.Module):
    """MobileNetV2 block with its ReLU6 linearized (nn.Identity): expand 1x1, depthwise 3x3, project 1x1, skip."""

    def __init__(self, c: int = 8, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.body = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.Identity(),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.Identity(),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class FFN(nn.Module):
    """Transformer feed-forward with its GELU linearized, and the residual: x + W2 (W1 x + b1) + b2 on [N, T, F]."""

    def __init__(self, d: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.Identity(), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("module,example,expected", [
    (InvertedResidual, torch.randn(2, 8, 6, 6), ["Conv", "Add"]),
    (FFN, torch.randn(2, 5, 16), ["MatMul", "Add"]),
])
def test_torch_exports_fuse_to_one_layer(tmp_path, module, example, expected) -> None:
    torch.manual_seed(0)
    model = export(module(), example, tmp_path / "m.onnx", dynamo=False, opset=17)
    out, result = run_fuse(model, feeds(model, dim=2))
    assert ops(out) == expected
    (layer,) = result.mapping.values()
    assert layer.input == "x" and layer.output == "y"
