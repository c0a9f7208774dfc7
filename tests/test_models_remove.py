"""The paper's mode on the example models: ``onnx-easier IN OUT --data calib --remove K --linearize identity``.

For K = every activation and K = half of them, the written model must compute what the original computes with
the same K activations replaced by Identity and nothing fused. That reference is built here from the report
(the activations whose action is "linearized"): each activation's nodes (all nodes of a decomposed GELU) are
removed and one ``Identity(pre-activation) -> activation output`` takes their place. With every activation
gone, the layers they separated must have been fused: fewer compute nodes, smaller depth, except in the ResNet,
where no fusion is both exact and cheaper (see ``_assert_resnet_keeps_its_layers``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import helper, shape_inference

from onnx_easier.activations import find_activations
from onnx_easier.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
NAMES = ("vgg_digits", "resnet_digits", "mobilenetv2_digits", "ffn_digits")
CALIB = MODELS / "digits16_calib.npz"
TEST = MODELS / "digits16_test.npz"  # inputs the tool never saw: the fusions must be exact on any input
COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
SAMPLES = 64
SHALLOWER = {"vgg_digits", "mobilenetv2_digits", "ffn_digits"}  # K = all fuses layers: fewer, shallower


def _paths(name: str) -> Path:
    model = MODELS / f"{name}.onnx"
    missing = [p.name for p in (model, CALIB, TEST) if not p.exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not in models/ yet (tools/train_digits.py writes them)")
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _compute_nodes(model: onnx.ModelProto) -> int:
    return sum(n.op_type in COMPUTE_OPS for n in model.graph.node)


def _depth(model: onnx.ModelProto) -> int:
    """Largest number of compute nodes on a path to a graph output (nodes are in topological order)."""
    level: dict[str, int] = {}
    for node in model.graph.node:
        d = max((level.get(i, 0) for i in node.input), default=0) + (node.op_type in COMPUTE_OPS)
        level.update(dict.fromkeys(node.output, d))
    return max(level.get(o.name, 0) for o in model.graph.output)


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nobody reads (the Constant nodes of a removed pattern)."""
    while True:
        read = {i for n in nodes for i in n.input} | outputs
        kept = [n for n in nodes if any(o in read for o in n.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


def _identity_reference(original: onnx.ModelProto, linearized: list[str]) -> onnx.ModelProto:
    """``original`` with the activations named ``linearized`` replaced by Identity, pattern nodes removed."""
    names = [n.name for n in original.graph.node]
    assert all(names) and len(set(names)) == len(names), "the example models name every node uniquely"
    acts = {a.name: a for a in find_activations(gs.import_onnx(shape_inference.infer_shapes(original)))}
    assert set(linearized) <= set(acts)
    chosen = [acts[n] for n in linearized]
    drop = {node for a in chosen for node in a.nodes}
    root = {a.name: a for a in chosen}
    out = onnx.ModelProto()
    out.CopyFrom(original)
    nodes = []
    for node in original.graph.node:
        if node.name in root:
            a = root[node.name]
            nodes.append(helper.make_node("Identity", [a.input], [a.output], name=f"{a.name}/identity"))
        elif node.name not in drop:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(_live(nodes, {o.name for o in original.graph.output}))
    del out.graph.value_info[:]
    onnx.checker.check_model(out, full_check=True)
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("which", ["all", "half"])
def test_remove_k_equals_identity_reference(name: str, which: str, tmp_path: Path) -> None:
    model_path = _paths(name)
    original = onnx.load(str(model_path))
    n_acts = len(find_activations(gs.import_onnx(shape_inference.infer_shapes(original))))
    assert n_acts > 0
    k = n_acts if which == "all" else n_acts // 2
    out_path, report_path = tmp_path / "out.onnx", tmp_path / "report.json"

    code = main([str(model_path), str(out_path), "--data", str(CALIB), "--remove", str(k), "--linearize",
                 "identity", "--samples", str(SAMPLES), "--report", str(report_path), "-q"])

    assert code == 0
    report = json.loads(report_path.read_text())
    linearized = [a["node"] for a in report["activations"] if a["action"] == "linearized"]
    assert len(linearized) == k
    # the K lowest entropies were chosen
    kept = [a["entropy"] for a in report["activations"] if a["action"] == "kept"]
    if linearized and kept:
        assert max(a["entropy"] for a in report["activations"] if a["action"] == "linearized") <= min(kept)

    fused = onnx.load(str(out_path))
    onnx.checker.check_model(fused, full_check=True)
    reference = _identity_reference(original, linearized)
    with np.load(TEST) as data:
        x = data["x"][:SAMPLES]
    input_name = original.graph.input[0].name
    expected = _session(reference).run(None, {input_name: x})
    got = _session(fused).run(None, {input_name: x})
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        scale = max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * scale)

    before, after = report["before"], report["after"]
    assert (before["compute_nodes"], before["depth"]) == (_compute_nodes(original), _depth(original))
    assert (after["compute_nodes"], after["depth"]) == (_compute_nodes(fused), _depth(fused))
    assert after["compute_nodes"] <= before["compute_nodes"]
    assert after["depth"] <= before["depth"]
    assert after["macs"] <= before["macs"]
    if which == "all":
        assert after["activations"] == 0
        if name in SHALLOWER:
            assert after["compute_nodes"] < before["compute_nodes"]
            assert after["depth"] < before["depth"]
        if name == "vgg_digits":  # Flatten -> Gemm -> Gemm -> Gemm: the MLP head is one Gemm
            assert sum(n.op_type in ("Gemm", "MatMul") for n in original.graph.node) == 3
            assert sum(n.op_type in ("Gemm", "MatMul") for n in fused.graph.node) == 1
        if name == "ffn_digits":  # each FFN's Linear -> GELU -> Linear is one MatMul (+ Add of the bias)
            assert after["compute_nodes"] == before["compute_nodes"] - report["before"]["activations"]
        if name == "resnet_digits":
            _assert_resnet_keeps_its_layers(report)


def _assert_resnet_keeps_its_layers(report: dict) -> None:
    """With every ReLU gone, a BasicBlock is Conv3x3 -> Conv3x3 (+ skip). No exact fusion is cheaper: the two
    convolutions as one 5x5 cost more MACs, and at the zero-padded borders the pair differs from any single
    convolution, so the residual Add cannot be folded either. The passes say so, and nothing changes."""
    before, after = report["before"], report["after"]
    assert (after["compute_nodes"], after["depth"], after["macs"]) == (
        before["compute_nodes"],
        before["depth"],
        before["macs"],
    )
    notes = [n for p in report["passes"] for n in p["notes"]]
    assert any("fusing costs more" in n for n in notes)
    assert any("zero-pads its input" in n for n in notes)
