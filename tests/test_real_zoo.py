"""Real architectures as their reference code writes them (tests/zoo_arch.py: torchvision, Hugging Face BERT,
YOLOv5, nn.LSTM / nn.GRU), exported at test time with untrained seeded weights and random normalization
statistics, through the command line in both modes:

- ``exact``: ``--tolerance 0``: exit 0; every output within rtol 1e-4 of the original's, ``max|a - b| / max(1,
  max|a|)`` (float16 models: the tool's float16 bound); graph inputs and outputs kept, in order;
  ``onnx.checker`` (full) passes when it passes on the input.
- ``default``: the default search (tolerance 0.01, strategy auto: entropy then merge, affine, re-fit, latency
  choice) with ``--report``: exit 0, the report's verification ok, interface kept, full checker as above.
  ``--max-remove 2`` keeps the suite's budget deterministically (each strategy stops after two activations, so the
  merge strategy still tries its first group); ``--time-limit`` is only a backstop.

In both modes a fail-safe rollback is a failure (README: "a rewrite that breaks a graph is a bug of ours"): no pass
note, warning or log line may say that a rewrite, a pass, the exact fusions or a search's model was rolled back,
undone after failing, or dropped.

Exporters: TorchScript (``dynamo=False``, opset 17, dynamic batch) and dynamo (``dynamo=True``, opset 18 or 20 per
model; static shapes, or a dynamic batch where the case says so). Beyond the torch exports: ORT ``quantize_dynamic``
(BERT) and ``quantize_static`` QDQ (MobileNetV2), float16 (``onnxruntime.transformers.float16``: ResNet-18 with and
without float32 I/O, BERT), the committed tf2onnx exports, a Paddle-style input (``-1`` batch, unnamed spatial
dims), TorchScript at opset 13, a graph saved by ORT after its extended optimizations and the output of
onnxruntime.transformers' BERT optimizer (contrib ops). Nothing here is xfail: a failure is a bug. A run that
would repeat another's path (``REPEATS``, with the run that covers it) is left out.

    python -m pytest -q tests/test_real_zoo.py -k 'vit and dynamo'
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
import zoo_arch as A

from onnx_easier.cli import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 16
DEFAULT_ARGS = ("--max-remove", "2", "--time-limit", "30")
RTOL = 1e-4
MODES = ("exact", "default")


@dataclass
class Case:
    """``build()`` the module; ``example(batch)`` the export inputs; ``inputs`` / ``outputs`` their names;
    ``data(n)`` calibration arrays for n samples; ``dynamic``: dynamic axes (TorchScript always; dynamo when
    ``dynamo_dynamic``); ``opset`` of the dynamo export."""

    build: Callable[[], torch.nn.Module]
    example: Callable[[int], tuple]
    inputs: list[str]
    outputs: list[str]
    data: Callable[[int], dict[str, np.ndarray]]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    opset: int = 18
    slow: bool = False
    dynamo_dynamic: bool = False


def images(side: int) -> Callable[[int], dict[str, np.ndarray]]:
    """Normalized-image statistics: a smooth random field plus pixel noise, per channel mean 0 / std ~1."""
    def data(n: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(11)
        coarse = rng.standard_normal((n, 3, side // 8, side // 8))
        smooth = np.repeat(np.repeat(coarse, 8, 2), 8, 3)
        return {"x": (0.8 * smooth + 0.6 * rng.standard_normal((n, 3, side, side))).astype(np.float32)}
    return data


def image_case(build: Callable[[], torch.nn.Module], side: int = 64, opset: int = 18, slow: bool = False,
               dynamo_dynamic: bool = False) -> Case:
    return Case(build, lambda b: (torch.randn(b, 3, side, side),), ["x"], ["logits"], images(side),
                {"x": {0: "N"}, "logits": {0: "N"}}, opset, slow, dynamo_dynamic)


VOCAB, SEQ = 1000, 32


def tokens(n: int) -> dict[str, np.ndarray]:
    """Token ids with a [CLS]-like first token, padding (id 0, mask 0) after a random length, two segments."""
    rng = np.random.default_rng(11)
    ids = rng.integers(5, VOCAB, (n, SEQ)).astype(np.int64)
    ids[:, 0] = 2
    lengths = rng.integers(SEQ // 4, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids[mask == 0] = 0
    split = rng.integers(2, SEQ // 2, n)
    segments = ((np.arange(SEQ)[None, :] >= split[:, None]) & (mask == 1)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": segments}


def bert_case(sdpa: bool, opset: int, dynamo_dynamic: bool) -> Case:
    def example(batch: int) -> tuple:
        d = tokens(batch)
        return tuple(torch.from_numpy(d[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))

    axes = {0: "N", 1: "T"}
    return Case(lambda: A.Bert(VOCAB, 64, 4, 4, 128, SEQ, 3, sdpa=sdpa), example,
                ["input_ids", "attention_mask", "token_type_ids"], ["logits"], tokens,
                {"input_ids": axes, "attention_mask": axes, "token_type_ids": axes, "logits": {0: "N"}}, opset,
                dynamo_dynamic=dynamo_dynamic)


T, FEATURES, HIDDEN = 12, 8, 16


def recurrent_case(gru: bool, opset: int) -> Case:
    """States [layers * directions, N, H] have their batch on axis 1: the data holds whole feeds (one more axis
    than the input, batch 1 each)."""
    layers = 2

    def data(n: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(11)
        out = {"x": rng.standard_normal((n, 1, T, FEATURES)).astype(np.float32),
               "h0": (0.3 * rng.standard_normal((n, layers, 1, HIDDEN))).astype(np.float32)}
        if not gru:
            out["c0"] = (0.3 * rng.standard_normal((n, layers, 1, HIDDEN))).astype(np.float32)
        return out

    def example(batch: int) -> tuple:  # whole feeds of batch 1, concatenated on each input's batch axis
        return tuple(torch.from_numpy(np.concatenate(list(a), axis=0 if k == "x" else 1)) for k, a in data(batch).items())

    if gru:
        return Case(lambda: A.GRUTagger(FEATURES, HIDDEN, 4), example, ["x", "h0"], ["logits", "hn"], data,
                    {"x": {0: "N"}, "h0": {1: "N"}, "logits": {0: "N"}, "hn": {1: "N"}}, opset, dynamo_dynamic=True)
    return Case(lambda: A.LSTMTagger(FEATURES, HIDDEN, layers, 4), example, ["x", "h0", "c0"], ["logits", "hn", "cn"],
                data, {"x": {0: "N"}, "h0": {1: "N"}, "c0": {1: "N"}, "logits": {0: "N"}, "hn": {1: "N"},
                       "cn": {1: "N"}}, opset, dynamo_dynamic=True)


CASES: dict[str, Case] = {
    "resnet18": image_case(lambda: A.resnet18(16, 10)),
    "resnet50": image_case(lambda: A.resnet50(16, 10), opset=20, slow=True, dynamo_dynamic=True),
    "mobilenetv2": image_case(lambda: A.MobileNetV2(0.35, 10)),
    "mobilenetv3": image_case(lambda: A.MobileNetV3(0.5, 10), opset=20, slow=True, dynamo_dynamic=True),
    "efficientnet_b0": image_case(lambda: A.EfficientNet(0.5, 1.0, 10), slow=True),
    "convnext_t": image_case(lambda: A.ConvNeXt((24, 48, 96, 192), (3, 3, 9, 3), 10), opset=20, slow=True),
    "vit": image_case(lambda: A.VisionTransformer(32, 8, 12, 4, 64, 128, 10), side=32, dynamo_dynamic=True),
    "swin_t": image_case(lambda: A.SwinTransformer(24, (2, 2, 6, 2), (3, 6, 12, 24), 4, 4, 10), opset=18,
                         slow=True, dynamo_dynamic=True),
    "yolov5": Case(lambda: A.YOLOv5(0.125, 0.33, 4), lambda b: (torch.randn(b, 3, 64, 64),), ["images"], ["output0"],
                   lambda n: {"images": images(64)(n)["x"]}, {"images": {0: "N"}, "output0": {0: "N"}}, opset=20),
    "bert": bert_case(sdpa=False, opset=20, dynamo_dynamic=True),
    "bert_sdpa": bert_case(sdpa=True, opset=18, dynamo_dynamic=False),
    "lstm": recurrent_case(gru=False, opset=18),
    "gru": recurrent_case(gru=True, opset=20),
}
EXPORTERS = ("ts", "dynamo")
# runs that would repeat another's path: (case, exporter, mode) -> the run that already covers it
REPEATS = {("bert_sdpa", "ts", "default"): "bert-ts-default: the same erf-spelled GELU FFNs (SDPA only respells the "
                                           "attention, which the default mode never linearizes; exact mode kept)"}


def export(case: Case, exporter: str, path: Path) -> None:
    """TorchScript (opset 17, the case's dynamic axes) or dynamo (the case's opset; its dynamic axes when
    ``dynamo_dynamic``, else static shapes), as tests/torch_models.export does for one input, with the case's
    input and output names. A dynamic export traces batch 2 (torch.export specializes a batch of 1: the ViT's
    MultiheadAttention Reshape and the LSTM's output would keep 1), a static one batch 1."""
    torch.manual_seed(0)
    module = A.randomize(case.build())
    dynamic = exporter == "ts" or case.dynamo_dynamic
    kwargs = ({"dynamo": False, "opset_version": 17, "dynamic_axes": case.dynamic or None} if exporter == "ts"
              else {"dynamo": True, "opset_version": case.opset,
                    "dynamic_axes": case.dynamic if case.dynamo_dynamic else None})
    with warnings.catch_warnings():  # not under no_grad: nn.MultiheadAttention's fast path has no TorchScript export
        warnings.simplefilter("ignore")  # exporter chatter
        torch.onnx.export(module, case.example(2 if dynamic else 1), str(path), input_names=case.inputs, output_names=case.outputs,
                          external_data=False, **kwargs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    folder = tmp_path_factory.mktemp("real_zoo")
    done: dict[tuple[str, str], Path] = {}

    def get(name: str, exporter: str) -> Path:
        if (name, exporter) not in done:
            path = folder / f"{name}_{exporter}.onnx"
            export(CASES[name], exporter, path)
            done[(name, exporter)] = path
        return done[(name, exporter)]

    return get


# --- checks ----------------------------------------------------------------------------------------------------


def feeds_for(model: onnx.ModelProto, arrays: dict[str, np.ndarray], k: int = 3) -> list[dict[str, np.ndarray]]:
    """``k`` feeds: ``arr[i]`` where an array holds whole feeds (one more axis than the input), else batches of the
    model's fixed batch size, or of 4 where axis 0 is dynamic."""
    dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    fixed = [d[0].dim_value for d in dims.values() if d and d[0].dim_value > 0]
    b = fixed[0] if fixed else 4
    return [{n: (a[i] if a.ndim == len(dims[n]) + 1 else a[i * b:(i + 1) * b]) for n, a in arrays.items()}
            for i in range(k)]


def run_ort(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [s.run(None, f) for f in feeds]


def max_rel(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    """``max|a - b| / max(1, max|a|)`` over every output of every feed (the tool's exactness measure)."""
    worst = 0.0
    for ra, rb in zip(ref, got):
        for a, b in zip(ra, rb):
            assert a.shape == b.shape, (a.shape, b.shape)
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            worst = max(worst, float(np.abs(a64 - b64).max(initial=0)) / max(1.0, float(np.abs(a64).max(initial=0))))
    return worst


def computes_in_float16(model: onnx.ModelProto) -> bool:
    """A float16 input or weight: exactness is then float16's (the tool's bound: 4 units of its last place)."""
    f16 = onnx.TensorProto.FLOAT16
    return (any(i.type.tensor_type.elem_type == f16 for i in model.graph.input)
            or any(t.data_type == f16 for t in model.graph.initializer))


def passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


FAILSAFE = ("rolled back", "failed and was undone", "failed and undone", "is dropped", "internal error")


def failsafe_events(report: dict, log: str) -> list[str]:
    """What the fail-safe machinery had to catch: rollbacks in the passes' notes and the warnings, search trials
    undone because they broke the model, a search's model dropped at the final check (log only)."""
    lines = [n for p in report.get("passes", []) for n in p.get("notes", [])] + list(report.get("warnings", []))
    lines += [f"trial {t['activations']}: {t.get('note')}" for v in report.get("search", {}).values()
              for t in v.get("trials", []) if t.get("note")]
    lines += log.splitlines()
    return sorted({line.strip()[:300] for line in lines if any(k in line for k in FAILSAFE)})


def check_mode(src: Path, arrays: dict[str, np.ndarray], mode: str, tmp_path: Path, capsys: pytest.CaptureFixture
               ) -> dict:
    """Run the CLI on ``src`` in ``mode`` and check the written model; returns the report."""
    data, out, rep = tmp_path / "calib.npz", tmp_path / f"{mode}.onnx", tmp_path / f"{mode}.json"
    np.savez(data, **arrays)
    argv = [str(src), str(out), "--data", str(data), "--report", str(rep)]
    argv += ["--tolerance", "0"] if mode == "exact" else list(DEFAULT_ARGS)
    capsys.readouterr()
    code = main(argv)
    log = capsys.readouterr().err
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert code == 0, f"exit {code}: {' | '.join(errors)[-1500:] or log[-1500:]}"
    report = json.loads(rep.read_text())
    original, written = onnx.load(src), onnx.load(out)
    assert [i.name for i in written.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in written.graph.output] == [o.name for o in original.graph.output]
    if passes_full_check(original):
        onnx.checker.check_model(written, full_check=True)
    if mode == "exact":
        feeds = feeds_for(original, arrays)
        rtol = max(RTOL, report["exactness"]["rtol"]) if computes_in_float16(original) else RTOL
        err_rel = max_rel(run_ort(src, feeds), run_ort(out, feeds))
        assert err_rel <= rtol, f"max rel error {err_rel:.3g} > {rtol:g} (tool's bound {report['exactness']})"
    else:
        assert report["verification"]["ok"], report["verification"]
    assert not failsafe_events(report, log), failsafe_events(report, log)
    return report


# --- the zoo ----------------------------------------------------------------------------------------------------


def _params() -> list:
    out = []
    for name, case in CASES.items():
        for exporter in EXPORTERS:
            for mode in MODES:
                if (name, exporter, mode) in REPEATS:
                    continue
                marks = [pytest.mark.slow] if case.slow else []
                out.append(pytest.param(name, exporter, mode, marks=marks, id=f"{name}-{exporter}-{mode}"))
    return out


@pytest.mark.parametrize(("name", "exporter", "mode"), _params())
def test_zoo(name: str, exporter: str, mode: str, exported, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    check_mode(exported(name, exporter), CASES[name].data(SAMPLES), mode, tmp_path, capsys)


@pytest.mark.parametrize("mode", MODES)
def test_quantize_dynamic_bert(mode: str, exported, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """ORT dynamic quantization (DynamicQuantizeLinear, MatMulInteger) of the TorchScript BERT export."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = tmp_path / "bert_qdyn.onnx"
    quantize_dynamic(str(exported("bert", "ts")), str(src), weight_type=QuantType.QInt8)
    check_mode(src, tokens(SAMPLES), mode, tmp_path, capsys)


@pytest.mark.parametrize("mode", MODES)
def test_quantize_static_qdq_mobilenetv2(mode: str, exported, tmp_path: Path, capsys: pytest.CaptureFixture
                                        ) -> None:
    """ORT static quantization, QDQ format (QuantizeLinear/DequantizeLinear around every Conv), calibrated with a
    CalibrationDataReader."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calib = images(64)(8)["x"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    src = tmp_path / "mobilenetv2_qdq.onnx"
    quantize_static(str(exported("mobilenetv2", "ts")), str(src), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    check_mode(src, images(64)(SAMPLES), mode, tmp_path, capsys)


@pytest.mark.parametrize("keep_io", [True, False], ids=["fp32io", "fp16io"])
@pytest.mark.parametrize("mode", MODES)
def test_float16_resnet18(mode: str, keep_io: bool, exported, tmp_path: Path, capsys: pytest.CaptureFixture
                          ) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src = tmp_path / "resnet18_fp16.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx.save(convert_float_to_float16(onnx.load(exported("resnet18", "ts")), keep_io_types=keep_io), src)
    arrays = images(64)(SAMPLES)
    if not keep_io:
        arrays = {"x": arrays["x"].astype(np.float16)}
    check_mode(src, arrays, mode, tmp_path, capsys)


@pytest.mark.parametrize("mode", MODES)
def test_float16_bert(mode: str, exported, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The TorchScript BERT in float16 with int64 inputs and a float32 output (the converter clamps the
    ``finfo(float32).min`` of the extended mask to float16's range)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src = tmp_path / "bert_fp16.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx.save(convert_float_to_float16(onnx.load(exported("bert", "ts")), keep_io_types=True), src)
    check_mode(src, tokens(SAMPLES), mode, tmp_path, capsys)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["keras_cnn", "keras_mlp"])
def test_tf2onnx(name: str, mode: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = ROOT / "tests/data/tf2onnx" / f"{name}.onnx"
    model = onnx.load(src)
    rng = np.random.default_rng(11)
    arrays = {i.name: rng.standard_normal([d.dim_value if d.dim_value > 0 else SAMPLES
                                           for d in i.type.tensor_type.shape.dim]).astype(np.float32)
              for i in model.graph.input}
    check_mode(src, arrays, mode, tmp_path, capsys)


OLD_OPSETS = [pytest.param("bert", 13, id="bert-13"),
              pytest.param("convnext_t", 13, id="convnext_t-13", marks=pytest.mark.slow),
              pytest.param("mobilenetv3", 13, id="mobilenetv3-13", marks=pytest.mark.slow)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "opset"), OLD_OPSETS)
def test_torchscript_old_opset(name: str, opset: int, mode: str, tmp_path: Path, capsys: pytest.CaptureFixture
                               ) -> None:
    """Exports at the opsets many published models still have: below 17 LayerNorm is spelled ReduceMean / Sub /
    Pow / Sqrt / Div, below 14 HardSwish is HardSigmoid and Mul."""
    case = CASES[name]
    src = tmp_path / f"{name}_ts{opset}.onnx"
    torch.manual_seed(0)
    module = A.randomize(case.build())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, case.example(2), str(src), input_names=case.inputs, output_names=case.outputs,
                          dynamo=False, opset_version=opset, dynamic_axes=case.dynamic, external_data=False)
    check_mode(src, case.data(SAMPLES), mode, tmp_path, capsys)


@pytest.mark.parametrize("mode", MODES)
def test_ort_optimized_resnet18(mode: str, exported, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A model saved by ONNX Runtime after its extended graph optimizations (``optimized_model_filepath``):
    com.microsoft FusedConv with the ReLU as an attribute, constants folded."""
    src = tmp_path / "resnet18_ort.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(src)
    ort.InferenceSession(str(exported("resnet18", "ts")), so, providers=["CPUExecutionProvider"])
    check_mode(src, images(64)(SAMPLES), mode, tmp_path, capsys)


@pytest.mark.parametrize("mode", MODES)
def test_transformers_optimizer_bert(mode: str, exported, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """onnxruntime.transformers' BERT optimizer: EmbedLayerNormalization, Attention, SkipLayerNormalization,
    BiasGelu (com.microsoft)."""
    from onnxruntime.transformers import optimizer

    src = tmp_path / "bert_opt.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer.optimize_model(str(exported("bert", "ts")), model_type="bert", num_heads=4, hidden_size=64,
                                 opt_level=1).save_model_to_file(str(src))
    check_mode(src, tokens(SAMPLES), mode, tmp_path, capsys)


@pytest.mark.parametrize("mode", MODES)
def test_paddle_style_dims(mode: str, exported, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The TorchScript MobileNetV2 with its input declared as Paddle writes it: batch ``dim_value: -1``, the
    spatial dims unnamed (no value, no param); the output's batch ``-1`` too."""
    model = onnx.load(exported("mobilenetv2", "ts"))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = -1
    for d in dims[2:]:
        d.Clear()
    out_dim = model.graph.output[0].type.tensor_type.shape.dim[0]
    out_dim.Clear()
    out_dim.dim_value = -1
    src = tmp_path / "mobilenetv2_paddle.onnx"
    onnx.save(model, src)
    check_mode(src, images(64)(SAMPLES), mode, tmp_path, capsys)
