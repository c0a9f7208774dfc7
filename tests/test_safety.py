"""Fail-safe rewrites (safety.py, fusion.fuse with a guard): a pass that breaks the graph is rolled back, a single
inexact fusion is rolled back alone, and the run goes on."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_easier import fusion
from onnx_easier.cli import main
from onnx_easier.model_io import make_session, to_graph
from onnx_easier.passes import fuse_chains
from onnx_easier.passes.base import PassResult
from onnx_easier.safety import CheckData, exactness_bound, output_error, perturbed
from onnx_easier.select import fuse_model
from onnx_easier.shapes import infer_shapes

RNG = np.random.default_rng(0)


def conv_chain(blocks: int = 2) -> onnx.ModelProto:
    """``blocks`` times Conv3x3 -> Conv1x1 (linear, fusable into one 3x3) -> Relu; then Flatten -> Gemm."""
    rng = np.random.default_rng(1)  # the same weights on every call
    nodes, inits = [], []
    x = "x"
    c = 4
    for b in range(blocks):
        for k, name in ((3, f"a{b}"), (1, f"b{b}")):
            inits.append(numpy_helper.from_array(rng.standard_normal((c, c, k, k)).astype(np.float32) * 0.3,
                                                 f"W_{name}"))
            inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, f"B_{name}"))
            nodes.append(helper.make_node("Conv", [x, f"W_{name}", f"B_{name}"], [f"{name}_out"], name=f"conv_{name}",
                                          pads=[k // 2] * 4))
            x = f"{name}_out"
        nodes.append(helper.make_node("Relu", [x], [f"r{b}"], name=f"relu{b}"))
        x = f"r{b}"
    nodes.append(helper.make_node("Flatten", [x], ["f"], name="flat"))
    inits.append(numpy_helper.from_array(rng.standard_normal((3, c * 36)).astype(np.float32) * 0.1, "W_fc"))
    inits.append(numpy_helper.from_array(np.zeros(3, np.float32), "B_fc"))
    nodes.append(helper.make_node("Gemm", ["f", "W_fc", "B_fc"], ["y"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds(n: int = 4) -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.standard_normal((n, 4, 6, 6)).astype(np.float32)}]


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    s = make_session(model)
    return s.run(None, feed)


def conv_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "Conv" for n in model.graph.node)


def test_unguarded_fusion_merges_both_chains() -> None:
    out, _ = fuse_model(conv_chain(), conv_chain())
    assert conv_count(out) == 2


def break_everything(graph: gs.Graph, ctx: object) -> PassResult:
    """A pass gone wrong: the first Relu reads a tensor of another shape (the model no longer runs)."""
    relu = next(n for n in graph.nodes if n.op == "Relu")
    flat = next(n for n in graph.nodes if n.op == "Flatten")
    relu.inputs[0] = flat.outputs[0]
    return PassResult("break_everything", 1, ["broke the first Relu"])


def test_a_pass_that_breaks_the_graph_is_rolled_back(monkeypatch, caplog) -> None:
    monkeypatch.setattr(fusion, "FUSION_PIPELINE", (break_everything, *fusion.FUSION_PIPELINE))
    model = conv_chain()
    checks = CheckData(feeds(), 1e-4)
    out, result = fuse_model(model, model, checks=checks)
    assert conv_count(out) == 2  # the real passes still fused both chains
    notes = [n for r in result.results if r.name == "break_everything" for n in r.notes]
    assert any("rolled back the whole pass break_everything" in n for n in notes)
    assert any("not run: rolled back earlier" in n for n in notes)  # not retried in later rounds
    assert output_error(run(model, checks.feeds[0]), run(out, checks.feeds[0])) <= 1e-4
    assert "break_everything" in caplog.text


def test_one_inexact_fusion_is_rolled_back_alone(monkeypatch, caplog) -> None:
    """The chain fusion is made wrong for the chain of block 1 only: that fusion is given up (its two convs stay),
    block 0's fusion is kept, and the result equals the original."""
    real = fuse_chains.run

    def wrong_for_block1(graph: gs.Graph, ctx) -> PassResult:
        result = real(graph, ctx)
        for r in ctx.journal:
            if "conv_a1" in ctx.expand(list(r.replaced)):
                node = next((n for n in graph.nodes if n.name == r.name), None)
                if node is not None and isinstance(node.inputs[1], gs.Constant):
                    node.inputs[1] = gs.Constant(node.inputs[1].name + "_bad", node.inputs[1].values * 1.01)
        return result

    monkeypatch.setattr(fusion, "FUSION_PIPELINE", tuple(wrong_for_block1 if p is real else p
                                                          for p in fusion.FUSION_PIPELINE))
    model = conv_chain()
    checks = CheckData(feeds(), 1e-4)
    out, result = fuse_model(model, model, checks=checks)
    assert conv_count(out) == 3  # block 0 fused (1 conv), block 1 kept as it was (2 convs)
    names = {n.name for n in out.graph.node}
    assert {"conv_a1", "conv_b1"} <= names
    notes = [n for r in result.results for n in r.notes]
    assert any("rolled back the rewrite of conv_a1, conv_b1" in n for n in notes), notes
    assert output_error(run(model, checks.feeds[0]), run(out, checks.feeds[0])) <= 1e-4
    assert "conv_a1" in caplog.text


def test_cli_exact_mode_survives_a_broken_pass(tmp_path: Path, monkeypatch, capsys) -> None:
    """The acceptance case: a pass made to fail on purpose; ``--tolerance 0`` still exits 0, writes a model equal
    to the input's outputs, warns, and reports the rollback in passes[].notes."""
    monkeypatch.setattr(fusion, "FUSION_PIPELINE", (break_everything, *fusion.FUSION_PIPELINE))
    src, out, rep = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(conv_chain(), src)
    data = tmp_path / "d.npz"
    np.savez(data, x=RNG.standard_normal((32, 4, 6, 6)).astype(np.float32))
    assert main([str(src), str(out), "--data", str(data), "--tolerance", "0", "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    notes = [n for p in report["passes"] for n in p["notes"]]
    assert any("rolled back the whole pass break_everything" in n for n in notes)
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    feed = {"x": np.load(data)["x"][:8]}
    assert output_error(run(conv_chain(), feed), run(written, feed)) <= 1e-4
    assert "break_everything" in capsys.readouterr().err


def test_cli_default_mode_survives_a_broken_pass(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fusion, "FUSION_PIPELINE", (break_everything, *fusion.FUSION_PIPELINE))
    src, out, rep = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(conv_chain(), src)
    data = tmp_path / "d.npz"
    np.savez(data, x=RNG.standard_normal((64, 4, 6, 6)).astype(np.float32))
    assert main([str(src), str(out), "--data", str(data), "--report", str(rep), "-q"]) == 0
    assert json.loads(rep.read_text())["verification"]["ok"]


def test_failure_names_the_node_of_a_shape_error() -> None:
    model = conv_chain()
    graph = to_graph(infer_shapes(model))
    guard = CheckData(feeds(), 1e-4).guard(model, model)
    assert guard.failure(graph) is None
    flat = next(n for n in graph.nodes if n.op == "Flatten")
    fc = next(n for n in graph.nodes if n.op == "Gemm")
    fc.inputs[0] = flat.inputs[0]  # rank 4 into Gemm
    failure = guard.failure(graph)
    assert failure is not None and failure.node == "fc", failure


def test_failure_when_outputs_change() -> None:
    model = conv_chain()
    graph = to_graph(infer_shapes(model))
    guard = CheckData(feeds(), 1e-4).guard(model, model)
    fc = next(n for n in graph.nodes if n.op == "Gemm")
    fc.inputs[1] = gs.Constant("W_fc_moved", fc.inputs[1].values * 1.001)
    failure = guard.failure(graph)
    assert failure is not None and "outputs changed" in failure.reason


def test_output_error_shapes_and_nan() -> None:
    a = np.ones((2, 3), np.float32)
    assert output_error([a], [a]) == 0.0
    assert output_error([a], [np.ones((3, 2), np.float32)]) == float("inf")
    nan = a.copy()
    nan[0, 0] = np.nan
    assert output_error([nan], [nan]) == 0.0
    assert output_error([a], [nan]) == float("inf")


def test_exactness_bound_follows_the_models_conditioning() -> None:
    """A well-conditioned model keeps the base bound; one that amplifies input rounding (a large-gain chain into
    a sharp softmax-free output) gets a bound 16x its measured sensitivity."""
    model = conv_chain()
    bound, e = exactness_bound(model, feeds())
    assert bound == 1e-4 and 0 < e < 1e-5
    # y = 1e4 * (x - x'), where x' is x rounded through a Cast to float16 and back: tiny input changes move y a lot
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["h"], ["xr"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["x", "xr"], ["d"]),
             helper.make_node("Mul", ["d", "g"], ["y"])]
    g = helper.make_graph(nodes, "amp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                          [numpy_helper.from_array(np.array(1e3, np.float32), "g")])
    amp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    f = [{"x": RNG.standard_normal((4, 8)).astype(np.float32)}]
    bound, e = exactness_bound(amp, f)
    assert e > 1e-6 and bound == pytest.approx(16 * e)


def test_perturbed_leaves_integer_inputs() -> None:
    f = {"ids": np.arange(6, dtype=np.int64), "x": np.ones(6, np.float32)}
    p = perturbed(f)
    assert np.array_equal(p["ids"], f["ids"])
    assert np.abs(p["x"] - 1).max() > 0 and np.abs(p["x"] - 1).max() <= 2.0**-19
