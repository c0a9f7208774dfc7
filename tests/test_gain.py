"""Gain prediction from the graph alone (gain.py) and the search's use of it (skipping candidates that gain nothing)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_easier import optimize
from onnx_easier.activations import find_activations
from onnx_easier.cost import measure
from onnx_easier.gain import GainModel, graph_cost
from onnx_easier.model_io import to_graph
from onnx_easier.select import kept_nodes
from onnx_easier.shapes import infer_shapes


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(arr.astype(np.float32), name)


def _model(nodes: list, inits: list, x_shape: list, y_shape: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def pointwise_pair(c: int = 32) -> onnx.ModelProto:
    """x[N,c,8,8] -> Conv 1x1 c->c 'c1' -> Relu 'r1' -> Conv 1x1 c->c 'c2' -> y: linearizing r1 merges the two."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1"),
             helper.make_node("Relu", ["h"], ["a"], name="r1"),
             helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="c2")]
    inits = [_init("w1", rng.standard_normal((c, c, 1, 1))), _init("b1", rng.standard_normal(c)),
             _init("w2", rng.standard_normal((c, c, 1, 1))), _init("b2", rng.standard_normal(c))]
    return _model(nodes, inits, ["N", c, 8, 8], ["N", c, 8, 8])


def basic_block(c: int = 8) -> onnx.ModelProto:
    """A ResNet BasicBlock: y = Relu('post') (Conv3x3(Relu('mid')(Conv3x3(x))) + x). Linearizing 'post' merges no
    layer and ORT fuses a Relu after Conv + Add for free: no gain. 'mid' cannot merge either (two padded 3x3 convs
    compose into a 5x5 with more MACs): no gain."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Relu", ["h1"], ["a1"], name="mid"),
             helper.make_node("Conv", ["a1", "w2", "b2"], ["h2"], pads=[1, 1, 1, 1], name="c2"),
             helper.make_node("Add", ["h2", "x"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="post")]
    inits = [_init("w1", rng.standard_normal((c, c, 3, 3)) * 0.2), _init("b1", rng.standard_normal(c)),
             _init("w2", rng.standard_normal((c, c, 3, 3)) * 0.2), _init("b2", rng.standard_normal(c))]
    return _model(nodes, inits, ["N", c, 8, 8], ["N", c, 8, 8])


def gelu_ffn(d: int = 16, hidden: int = 64) -> onnx.ModelProto:
    """x[N,T,d] -> MatMul d->hidden -> Gelu (Erf spelling) -> MatMul hidden->d: the FFN collapses into one MatMul."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="m1"),
             helper.make_node("Div", ["h", "sqrt2"], ["hd"], name="div"),
             helper.make_node("Erf", ["hd"], ["e"], name="erf"),
             helper.make_node("Add", ["e", "one"], ["e1"], name="add1"),
             helper.make_node("Mul", ["h", "e1"], ["he"], name="mul"),
             helper.make_node("Mul", ["he", "half"], ["g"], name="half_mul"),
             helper.make_node("MatMul", ["g", "w2"], ["y"], name="m2")]
    inits = [_init("w1", rng.standard_normal((d, hidden))), _init("w2", rng.standard_normal((hidden, d))),
             _init("sqrt2", np.array(np.sqrt(2.0))), _init("one", np.array(1.0)), _init("half", np.array(0.5))]
    return _model(nodes, inits, ["N", 4, d], ["N", 4, d])


def _gains(model: onnx.ModelProto) -> dict[str, object]:
    acts = find_activations(to_graph(infer_shapes(model)))
    gm = GainModel(model, acts)
    return {a.name: gm.predict([a], kept_nodes(acts, [a])) for a in acts}


@pytest.mark.parametrize("build", [pointwise_pair, basic_block, gelu_ffn])
def test_graph_cost_matches_measure(build) -> None:
    model = build()
    cost = measure(model, 0)
    gc = graph_cost(GainModel(model, []).graph)
    assert (gc.compute_nodes, gc.depth, gc.macs, gc.complete) == (cost.compute_nodes, cost.depth, cost.macs, True)


def test_a_merge_is_predicted_with_its_saving() -> None:
    g = _gains(pointwise_pair(32))["r1"]
    assert (g.compute_nodes, g.depth, g.macs, g.elementwise) == (1, 1, 32 * 32 * 64, 0)  # ORT fuses Conv+Relu
    assert g.any and g.known and g.relative > 0.5


def test_basic_block_activations_gain_nothing() -> None:
    gains = _gains(basic_block())
    assert set(gains) == {"mid", "post"}
    for g in gains.values():
        assert g.known and not g.any, g


def test_gelu_ffn_gains_macs_and_elementwise_work() -> None:
    (g,) = _gains(gelu_ffn(16, 64)).values()
    assert g.compute_nodes == 1 and g.macs == 4 * (16 * 64 + 64 * 16) - 4 * 16 * 16
    assert g.elementwise == 5  # the Erf spelling's own nodes are not free in ORT


def test_prediction_leaves_the_model_untouched() -> None:
    model = pointwise_pair()
    before = model.SerializeToString()
    _gains(model)
    assert model.SerializeToString() == before


def test_search_skips_no_gain_candidates_and_reports_them(tmp_path) -> None:
    model = basic_block()
    x = np.random.default_rng(0).standard_normal((64, 8, 8, 8)).astype(np.float32)
    res = optimize(model, {"x": x})
    assert res.report["trials"] == 0
    skipped = {tuple(s["activations"]) for r in res.report["search"].values() for s in r["skipped"]}
    assert skipped == {("mid",), ("post",)}
    assert all("no predicted gain" in s["reason"] for r in res.report["search"].values() for s in r["skipped"])
    tried = optimize(model, {"x": x}, try_all=True)
    assert tried.report["trials"] > 0


def test_a_failing_prediction_tries_every_candidate(monkeypatch) -> None:
    """If the gain model cannot be built, nothing is skipped (the search runs as without prediction)."""
    from onnx_easier import select

    def broken(*args, **kwargs):
        raise RuntimeError("no shapes")

    monkeypatch.setattr(select, "GainModel", broken)
    x = np.random.default_rng(0).standard_normal((64, 8, 8, 8)).astype(np.float32)
    res = optimize(basic_block(), {"x": x})
    assert res.report["trials"] > 0
    assert not any(r["skipped"] for r in res.report["search"].values())


def inverted_residual(c: int = 4, t: int = 6) -> onnx.ModelProto:
    """1x1 expand c -> t*c, Relu 'r1', depthwise 3x3, Relu 'r2', 1x1 project -> c: neither Relu alone lets layers
    merge (each merge would add MACs), both together collapse the block into one 3x3 conv c -> c."""
    rng = np.random.default_rng(3)
    h = c * t
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="expand"),
             helper.make_node("Relu", ["a"], ["ra"], name="r1"),
             helper.make_node("Conv", ["ra", "w2", "b2"], ["b"], group=h, pads=[1, 1, 1, 1], name="dw"),
             helper.make_node("Relu", ["b"], ["rb"], name="r2"),
             helper.make_node("Conv", ["rb", "w3", "b3"], ["y"], name="project")]
    inits = [_init("w1", rng.standard_normal((h, c, 1, 1)) * 0.5), _init("b1", np.abs(rng.standard_normal(h)) + 2),
             _init("w2", rng.standard_normal((h, 1, 3, 3)) * 0.3), _init("b2", np.abs(rng.standard_normal(h)) + 2),
             _init("w3", rng.standard_normal((c, h, 1, 1)) * 0.2), _init("b3", np.zeros(c))]
    return _model(nodes, inits, ["N", c, 8, 8], ["N", c, 8, 8])


def test_a_group_merge_is_predicted_and_auto_keeps_it_without_the_entropy_search() -> None:
    model = inverted_residual()
    gains = _gains(model)
    assert not gains["r1"].any and not gains["r2"].any  # alone: nothing merges (cost-aware fusion refuses)
    acts = find_activations(to_graph(infer_shapes(model)))
    both = GainModel(model, acts).predict(acts)
    assert both.compute_nodes == 2 and both.macs > 0
    x = np.random.default_rng(1).standard_normal((256, 4, 8, 8)).astype(np.float32)
    res = optimize(model, {"x": x}, tolerance=1.0, metric="rel-l2")
    merge = res.report["search"]["merge"]
    assert merge["trials"][0]["activations"] == ["r1", "r2"] and merge["trials"][0]["accepted"]
    assert "entropy" not in res.report["search"]
    assert "kept a group of several activations" in res.report["strategy"]["not_run"]["entropy"]
