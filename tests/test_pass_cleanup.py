"""cleanup: Identity / inference Dropout, dead nodes, unused initializers, duplicate constants; names and subgraphs
left alone."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

try:
    from test_pass_fuse_common import Net, apply, assert_same, ops
except ImportError:  # tests/ imported as a package
    from tests.test_pass_fuse_common import Net, apply, assert_same, ops

from onnx_easier.passes import cleanup


def cleaned(net_or_model, *passes):
    model = net_or_model.model() if isinstance(net_or_model, Net) else net_or_model
    out, results, _ = apply(model, *(passes or (cleanup.run,)))
    assert_same(model, out)
    return out, results


def test_identities_go_and_graph_output_names_stay() -> None:
    net = Net()
    x = net.input("x", ["N", 3])
    h = net.node("Relu", x, out="r")
    h = net.node("Identity", h, out="i1")
    h = net.node("Neg", h, out="n")
    net.output(net.node("Identity", h, out="y"))
    out, (res,) = cleaned(net)
    assert ops(out) == ["Relu", "Neg"]
    assert out.graph.node[1].output[0] == "y" and out.graph.node[1].input[0] == "r"
    assert res.changed == 2


def test_identity_from_input_to_output_is_kept() -> None:
    net = Net()
    x = net.input("x", ["N", 3])
    net.output(net.node("Identity", x, out="y"))
    out, (res,) = cleaned(net)
    assert ops(out) == ["Identity"]
    assert any("graph output" in n for n in res.notes)


def test_identity_whose_input_is_also_read_elsewhere_before_an_output_is_kept() -> None:
    net = Net()
    x = net.input("x", ["N", 3])
    r = net.node("Relu", x)
    net.output(net.node("Identity", r, out="y"), net.node("Neg", r, out="z"))
    out, _ = cleaned(net)
    assert ops(out) == ["Relu", "Identity", "Neg"]


def test_dropout_variants() -> None:
    net = Net(opset=13)
    x = net.input("x", ["N", 3])
    h = net.node("Dropout", x, net.const(np.float32(0.5)), net.const(np.array(False)))
    net.output(net.node("Neg", net.node("Dropout", h)))
    out, _ = cleaned(net)
    assert ops(out) == ["Neg"]

    net = Net(opset=11)
    x = net.input("x", ["N", 3])
    d = net.node("Dropout", x, n_out=2)  # an unused mask output
    net.output(net.node("Neg", d))
    out, _ = cleaned(net)
    assert ops(out) == ["Neg"]

    net = Net(opset=13)  # training_mode true: kept (and ORT would really drop out, so no run)
    x = net.input("x", ["N", 3])
    d = net.node("Dropout", x, net.const(np.float32(0.0)), net.const(np.array(True)))
    net.output(net.node("Neg", d))
    out, results, _ = apply(net.model(), cleanup.run)
    assert ops(out) == ["Dropout", "Neg"] and any("training_mode" in n for n in results[0].notes)


def test_dropout_with_used_mask_is_kept() -> None:
    net = Net(opset=13)
    x = net.input("x", ["N", 3])
    net.nodes.append(helper.make_node("Dropout", [x], ["d", "mask"], name="drop"))
    net.output(net.node("Neg", "d"))
    net.output("mask", elem=TensorProto.BOOL)
    out, (res,) = cleaned(net)
    assert ops(out) == ["Dropout", "Neg"]
    assert any("mask" in n for n in res.notes)


def test_dead_nodes_and_unused_initializers_go() -> None:
    net = Net()
    x = net.input("x", ["N", 3])
    net.node("Mul", x, net.const(np.ones(3), name="unused_scale"))  # dead
    net.const(np.ones(5), name="orphan")
    net.output(net.node("Neg", x))
    out, (res,) = cleaned(net)
    assert ops(out) == ["Neg"]
    assert not out.graph.initializer
    assert res.changed == 2  # one dead node, one unused initializer (the orphan is dropped on export anyway)


def _if_model(identity_in_branch_input: bool) -> onnx.ModelProto:
    """x -> Identity -> t; If(cond) { then: Neg(t) (t captured from the outer scope), else: Identity(t) }."""
    then_g = helper.make_graph([helper.make_node("Neg", ["t"], ["a"], name="neg_in_branch")], "then", [],
                               [helper.make_tensor_value_info("a", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Identity", ["t"], ["b"], name="id_in_branch")], "else", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Identity", ["x"], ["t"], name="outer_id"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_subgraphs_are_left_alone() -> None:
    model = _if_model(True)
    out, results, _ = apply(model, cleanup.run)
    assert ops(out) == ["Identity", "If"]  # t is read inside the branches by name
    branch = next(a.g for a in out.graph.node[1].attribute if a.name == "else_branch")
    assert [n.op_type for n in branch.node] == ["Identity"]
    assert any("subgraph" in n for n in results[0].notes)
    for cond in (True, False):
        data = {"x": np.array([1.0, -2.0], np.float32), "cond": np.array(cond)}
        assert_same(model, out, data)


def test_merge_constants() -> None:
    net = Net()
    x = net.input("x", ["N", 3])
    a = net.node("Mul", x, net.const(np.array([1.0, 2.0, 3.0]), name="c1"))
    b = net.node("Mul", a, net.const(np.array([1.0, 2.0, 3.0]), name="c2"))
    c = net.node("Add", b, net.const(np.array([1.0, 2.0, 3.0]), name="c3", dtype=np.float32))
    d = net.node("Cast", c, to=TensorProto.DOUBLE)
    net.output(net.node("Cast", net.node("Add", d, net.const(np.array([1.0, 2.0, 3.0]), name="c4",
                                                            dtype=np.float64)), to=TensorProto.FLOAT))
    out, results = cleaned(net, cleanup.merge_constants)
    assert sorted(i.name for i in out.graph.initializer) == ["c1", "c4"]  # float64 c4 is a different constant
    assert results[0].changed == 2


def test_merge_constants_keeps_scalars_apart_from_one_element_vectors() -> None:
    """A 0-d index and a [1] vector with the same bytes are different constants to Gather (rank of the result) and
    Concat: merging them broke a ViT export's cls-token Gather ("All inputs to Concat must have same rank")."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnx_easier.model_io import make_session, to_graph, to_model
    from onnx_easier.passes.cleanup import merge_constants

    nodes = [helper.make_node("Gather", ["x", "i0"], ["g"], axis=1),        # [N, 4] with a scalar index: [N]
             helper.make_node("Unsqueeze", ["g", "ax"], ["u"]),              # [N, 1]
             helper.make_node("Gather", ["x", "i1"], ["h"], axis=1),        # [N, 1] with a [1] index
             helper.make_node("Concat", ["u", "h"], ["y"], axis=1)]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "i0"), numpy_helper.from_array(np.array([0], np.int64), "i1"),
             numpy_helper.from_array(np.array([1], np.int64), "ax")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    graph = to_graph(model)
    merge_constants(graph)
    out = to_model(graph, model)
    assert {n.input[1] for n in out.graph.node if n.op_type == "Gather"} == {"i0", "i1"}
    onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert np.array_equal(make_session(out).run(None, {"x": x})[0], make_session(model).run(None, {"x": x})[0])


def test_contiguous_keeps_the_shape_of_a_scalar() -> None:
    from onnx_easier.graph_utils import contiguous

    assert contiguous(np.float32(2.0)).shape == ()
    assert contiguous(np.ones((3, 2), order="F")).flags["C_CONTIGUOUS"]
