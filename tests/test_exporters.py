"""Every exporter's spelling through the command line: torch's legacy (TorchScript) and dynamo exporters at
opsets 17, 18 and 20, static and dynamic shapes, and skl2onnx. Each export must pass ``--remove 0`` numerically
equivalent to itself and ``--remove K --linearize identity`` equal to the export with an Identity swapped in for
the K activations the report marks "linearized" (see test_odd_graphs.identity_reference).

tf2onnx needs tensorflow (hundreds of MB): its exports are made once by tools/export_tf2onnx.py, committed, and
tested in test_exporters_tf.py. paddle2onnx pins onnx <= 1.17 and needs paddlepaddle: not exercised.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_odd_graphs import (
    assert_equivalent,
    calib_for,
    check_optimized,
    identity_reference,
    ops,
    optimize_cli,
    random_feeds,
)
from torch import nn
from torch_models import ACTIVATION_CASES, MixedNet

EXACT = ("--remove", "0")


def identity_mode(k: int) -> tuple[str, ...]:
    return ("--remove", str(k), "--linearize", "identity")


# ----------------------------------------------------------------------------------------------------------------
# torch modules: a small CNN, every activation spelling, a transformer block, a decoder


def _randomize_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


class SmallCNN(nn.Module):
    """Stem conv-bn-relu, a residual depthwise block (relu6), conv-bn-hardswish, spatial mean, Linear-GELU-Linear.
    Works at any H, W."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                                   nn.ReLU6(), nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.post = nn.Sequential(nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12), nn.Hardswish())
        self.head = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 5))
        _randomize_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.post(h + self.block(h))
        return self.head(h.mean(dim=(2, 3)))


class TransformerBlock(nn.Module):
    """Pre-norm single-head attention and a GELU(tanh) feed-forward with a SiLU gate, on [N, T, 16]."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 32), nn.GELU(approximate="tanh"), nn.Linear(32, d)
        self.gate, self.silu = nn.Linear(d, d), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1)
        x = x + self.proj(att @ v)
        h = self.fc2(self.act(self.fc1(self.norm2(x))))
        return x + h * self.silu(self.gate(x))


class Decoder(nn.Module):
    """ConvTranspose upsampling with BN and LeakyReLU, then a 1x1 head: [N, 6, 4, 4] -> [N, 2, 16, 16]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(6, 8, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
            nn.ConvTranspose2d(8, 4, 2, stride=2, bias=False), nn.BatchNorm2d(4), nn.PReLU(4, init=0.2),
            nn.Conv2d(4, 2, 1))
        _randomize_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def export(module: nn.Module, example: torch.Tensor, path: Path, *, dynamo: bool, opset: int,
           dynamic: tuple[int, ...] = ()) -> onnx.ModelProto:
    """Export in eval mode; ``dynamic`` lists the axes of ``x`` made symbolic (axis 0 named N)."""
    module = module.eval()
    names = {0: "N", 1: "T", 2: "H", 3: "W"}
    kwargs: dict = {}
    if dynamic and dynamo:
        kwargs["dynamic_shapes"] = ({a: torch.export.Dim(names[a], min=2 if a else 1, max=64) for a in dynamic},)
    elif dynamic:
        kwargs["dynamic_axes"] = {"x": {a: names[a] for a in dynamic}, "y": {0: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=["x"], output_names=["y"], opset_version=opset,
                          dynamo=dynamo, external_data=False, verbose=False, **kwargs)
    return onnx.load(str(path))


def _mixed() -> nn.Module:
    return MixedNet(sorted(ACTIVATION_CASES))


# name -> (module factory, example shape, dynamic axes, symbolic sizes for calibration, other sizes to check)
TORCH_MODELS = {
    "cnn": (SmallCNN, (2, 3, 8, 8), (), {}, ()),
    "cnn dynamic N,H,W": (SmallCNN, (2, 3, 8, 8), (0, 2, 3), {"H": 8, "W": 8}, ({"H": 5, "W": 11},)),
    "every activation spelling": (_mixed, (2, 4, 5, 5), (), {}, ()),
    "transformer block": (TransformerBlock, (2, 6, 16), (0, 1), {"T": 6}, ({"T": 3},)),
    "decoder": (Decoder, (2, 6, 4, 4), (), {}, ()),
}
EXPORTERS = {"legacy-17": (False, 17), "legacy-20": (False, 20), "dynamo-18": (True, 18), "dynamo-20": (True, 20)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], onnx.ModelProto]:
    """Each (model, exporter) exported once per module run; torch's seed fixed per export."""
    folder = tmp_path_factory.mktemp("exports")
    cache: dict[tuple[str, str], onnx.ModelProto] = {}

    def get(model: str, exporter: str) -> onnx.ModelProto:
        if (model, exporter) not in cache:
            factory, shape, dynamic, _, _ = TORCH_MODELS[model]
            torch.manual_seed(0)
            dynamo, opset = EXPORTERS[exporter]
            path = folder / f"{len(cache)}.onnx"
            cache[model, exporter] = export(factory(), torch.randn(*shape), path, dynamo=dynamo, opset=opset,
                                            dynamic=dynamic)
        return cache[model, exporter]

    return get


def _symbols(model: onnx.ModelProto, sizes: dict[str, int]) -> dict[str, int]:
    """Map an exporter's own symbol names (dynamo writes s0, s1... or the Dim names) onto our sizes by axis."""
    out: dict[str, int] = {}
    by_axis = {2: "H", 3: "W"} if len(model.graph.input[0].type.tensor_type.shape.dim) == 4 else {1: "T"}
    for axis, d in enumerate(model.graph.input[0].type.tensor_type.shape.dim):
        if d.dim_param and axis in by_axis:
            out[d.dim_param] = sizes[by_axis[axis]]
    return out


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("name", list(TORCH_MODELS))
def test_torch_export(tmp_path: Path, capsys, exports, name: str, exporter: str) -> None:
    model = exports(name, exporter)
    _, _, dynamic, sizes, others = TORCH_MODELS[name]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [a in dynamic for a in range(len(dims))]  # the spelling we asked
    calib = calib_for(model, 16, _symbols(model, sizes))
    feeds = random_feeds(model, 21, _symbols(model, sizes), batch=3 if dynamic else dims[0].dim_value)

    exact = optimize_cli(tmp_path, model, calib, *EXACT, capsys=capsys, name="exact")
    out = check_optimized(model, exact, feeds)
    n_acts = len(exact.report["activations"])
    assert n_acts > 0 and all(a["action"] == "kept" for a in exact.report["activations"])
    assert len(out.graph.node) <= len(model.graph.node)

    for k in (1, n_acts):
        lin = optimize_cli(tmp_path, model, calib, *identity_mode(k), capsys=capsys, name=f"identity{k}")
        out = check_optimized(model, lin, feeds)
        assert sum(a["action"] == "linearized" for a in lin.report["activations"]) == k
        for sizes_other in others:
            other = random_feeds(model, 22, _symbols(model, sizes_other), batch=2)
            assert_equivalent(identity_reference(model, lin.report), out, other)
    assert lin.report["after"]["activations"] == 0
    assert lin.report["after"]["depth"] <= lin.report["before"]["depth"]


def test_every_spelling_is_recognised(tmp_path: Path, capsys, exports) -> None:
    """MixedNet holds one activation per ACTIVATION_CASES entry: each exporter's spelling of each is found."""
    for exporter in ("legacy-17", "dynamo-18"):
        model = exports("every activation spelling", exporter)
        result = optimize_cli(tmp_path, model, calib_for(model, 16), *EXACT, capsys=capsys, name=exporter)
        assert result.code == 0, result.err
        kinds = sorted(a["op"] for a in result.report["activations"])
        assert kinds == sorted(kind for _, kind in ACTIVATION_CASES.values()), exporter


# ----------------------------------------------------------------------------------------------------------------
# skl2onnx


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32) / 16.0, y


def _sk_export(estimator, x: np.ndarray, zipmap: bool = False) -> onnx.ModelProto:
    skl2onnx = pytest.importorskip("skl2onnx")
    last = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    options = {id(last): {"zipmap": False}} if not zipmap and hasattr(last, "classes_") else None
    return skl2onnx.to_onnx(estimator, x[:1], target_opset={"": 17, "ai.onnx.ml": 3}, options=options)


def _fit(kind: str, x: np.ndarray, y: np.ndarray):
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: a few iterations are enough for a test
        if kind == "mlp classifier":
            return MLPClassifier(hidden_layer_sizes=(24, 16), max_iter=40, random_state=0).fit(x[:800], y[:800])
        if kind == "scaler + mlp classifier (tanh)":
            est = MLPClassifier(hidden_layer_sizes=(16,), activation="tanh", max_iter=40, random_state=0)
            return make_pipeline(StandardScaler(), est).fit(x[:800], y[:800])
        est = MLPRegressor(hidden_layer_sizes=(16, 8), max_iter=40, random_state=0)
        return make_pipeline(StandardScaler(), est).fit(x[:800], x[:800, :3])


@pytest.mark.parametrize("kind", ["mlp classifier", "scaler + mlp classifier (tanh)", "scaler + mlp regressor"])
def test_skl2onnx(tmp_path: Path, capsys, digits, kind: str) -> None:
    pytest.importorskip("skl2onnx")
    x, y = digits
    model = _sk_export(_fit(kind, x, y), x)
    calib, feeds = {"X": x[800:1000]}, {"X": x[1000:1040]}
    exact = optimize_cli(tmp_path, model, calib, *EXACT, capsys=capsys, name="exact")
    check_optimized(model, exact, feeds)
    acts = exact.report["activations"]
    assert [a["op"] for a in acts] == ([] if "tanh" in kind else ["Relu", "Relu"])  # Tanh is no EASIER activation
    lin = optimize_cli(tmp_path, model, calib, *identity_mode(1), capsys=capsys, name="identity")
    check_optimized(model, lin, feeds)
    assert "ArgMax" in ops(lin.model) or "classifier" not in kind  # the label part of the graph is kept


def test_skl2onnx_scaler_pipeline_fuses(tmp_path: Path, capsys, digits) -> None:
    """ai.onnx.ml's Scaler has no ONNX shape inference: the ranks after it come from ONNX Runtime (shapes.py),
    so with both ReLUs linearized the three MatMul/Add layers fuse into one."""
    pytest.importorskip("skl2onnx")
    x, y = digits
    model = _sk_export(_fit("scaler + mlp regressor", x, y), x)
    lin = optimize_cli(tmp_path, model, {"X": x[800:1000]}, *identity_mode(2), capsys=capsys)
    check_optimized(model, lin, {"X": x[1000:1040]})
    assert ops(lin.model).count("MatMul") + ops(lin.model).count("Gemm") == 1


def test_skl2onnx_default_zipmap(tmp_path: Path, capsys, digits) -> None:
    pytest.importorskip("skl2onnx")
    x, y = digits
    model = _sk_export(_fit("mlp classifier", x, y), x, zipmap=True)
    result = optimize_cli(tmp_path, model, {"X": x[800:1000]}, *EXACT, capsys=capsys)
    assert result.code == 0, result.err


def test_macs_agree_across_exporters(tmp_path: Path, capsys, exports) -> None:
    """The legacy exporter spells chunk() on a dynamic T with Shape arithmetic that ONNX shape inference cannot
    follow (unk__ dims on the attention and later MatMuls); with the data's T the sizes come from ONNX Runtime, so
    both exports count the same MACs."""
    macs = {}
    for exporter in ("legacy-17", "dynamo-18"):
        model = exports("transformer block", exporter)
        result = optimize_cli(tmp_path, model, calib_for(model, 8, {"T": 6} | _symbols(model, {"T": 6})), *EXACT,
                              capsys=capsys, name=exporter)
        assert result.code == 0, result.err
        macs[exporter] = result.report["before"]["macs"]
    d, t = 16, 6  # qkv, q k^T, att v, proj, fc1, fc2, gate
    assert macs == dict.fromkeys(macs, t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * 32 + t * d * d)


@pytest.mark.parametrize("exporter", ["legacy-17", "dynamo-20"])
@pytest.mark.parametrize("name", list(TORCH_MODELS))
def test_budget_mode_with_refit_on_exports(tmp_path: Path, capsys, exports, name: str, exporter: str) -> None:
    """The default mode (linearize under a budget, re-fit, residual targets included) on each exported model: a
    loose tolerance lets every trial through, so every re-fit path runs; the model written passes the full checker
    and strict shape inference, keeps its interface, and every re-fit record targets a tensor of the original and
    never ends worse than it started."""
    model = exports(name, exporter)
    _, _, _, sizes, _ = TORCH_MODELS[name]
    calib = calib_for(model, 48, _symbols(model, sizes))
    res = optimize_cli(tmp_path, model, calib, "--tolerance", "1.0", "--strategy", "entropy", capsys=capsys)
    assert res.code == 0, res.err
    onnx.checker.check_model(res.model, full_check=True)
    onnx.shape_inference.infer_shapes(res.model, strict_mode=True)
    assert [i.name for i in res.model.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in res.model.graph.output] == [o.name for o in model.graph.output]
    rep = res.report
    assert rep["fidelity"]["value"] <= 1.0
    records = [r for t in rep["search"]["entropy"]["trials"] for r in t["refit"]]
    assert records
    tensors = {o for n in model.graph.node for o in n.output}
    for r in records:
        assert r["target"] in tensors, r
        if r["error_before"] == r["error_before"]:  # not NaN (a layer too large to fit)
            assert r["error_after"] <= r["error_before"], r
