"""One model that computes tensors of two models in one pass, sharing the nodes they have in common.

A re-fit needs, per batch, the current model's layer input and the original model's target. Computed by two
sessions, the part of the graph both models share (everything upstream of what the search changed: most of it
when the change is deep) runs twice. ``joint`` merges the two cut models into one graph where a node of the second
that computes the same thing as a node of the first is dropped and its readers read the first's tensor.

"The same thing" is decided by a digest (a Merkle hash) per tensor:

    digest(graph input x)   = H("input", name, type)
    digest(initializer w)   = H("const", dtype, dims, raw bytes)   (a Constant node's value alike)
    digest(output k of n)   = H("node", op, domain, attributes, digests of n's inputs, k)
    digest(Identity(x))     = digest(x)

Two tensors with equal digests are computed by identical subgraphs from identical inputs, so ORT computes equal
values for them (same kernels, same inputs). Nodes with subgraph attributes (If/Loop/Scan may read outer tensors
implicitly) and models with local functions are not merged: ``joint`` returns None and the caller uses two sessions.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import onnx
from onnx import numpy_helper

PREFIX = "joint::"
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}  # names of the second model's tensors that are kept apart


def _h(*parts: bytes | str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.digest()


def _initializer_digest(t: onnx.TensorProto) -> bytes:
    """Digest of a constant's value (dtype, dims, content), however it is stored (raw bytes or typed fields);
    the name does not count. A tensor stored outside the file is digested by its location."""
    try:
        value = numpy_helper.to_array(t)
    except Exception:  # noqa: BLE001 - external data not loaded, unusual types: its stored form identifies it
        return _h("const-proto", _anonymous(t).SerializeToString(deterministic=True))
    return _h("const", str(t.data_type), str(value.shape), np.ascontiguousarray(value).tobytes())


def _anonymous(t: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of ``t`` without its name and doc string (what a digest must not see)."""
    copy = onnx.TensorProto()
    copy.CopyFrom(t)
    copy.name = ""
    copy.ClearField("doc_string")
    return copy


def _attribute_bytes(a: onnx.AttributeProto) -> bytes:
    """An attribute's value for a digest: doc strings and the names of tensor values left out."""
    copy = onnx.AttributeProto()
    copy.CopyFrom(a)
    copy.ClearField("doc_string")
    if copy.HasField("t"):
        copy.t.CopyFrom(_anonymous(copy.t))
    return copy.SerializeToString(deterministic=True)


def mergeable(model: onnx.ModelProto) -> bool:
    """Whether ``model`` can take part in ``joint``: no local functions, no subgraph attributes."""
    return not model.functions and not any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute)


def _shape_digest(t: onnx.TensorProto) -> bytes:
    """Digest of what a float constant can tell a tensor's shape: its type and dims (its values cannot, except
    through data-dependent ops, whose inputs are integer tensors, digested by value)."""
    return _h("float-const", str(t.data_type), str(list(t.dims)))


def digests(model: onnx.ModelProto, values: bool = True) -> dict[str, bytes]:
    """The digest of every tensor of ``model``'s main graph (nodes in the file's order, which ONNX requires to be
    topological; a tensor read before it is produced gets a digest of its name alone, so it matches nothing).
    ``values=False``: float initializers of more than 16 elements by type and dims only (``_shape_digest``):
    equal digests then mean equal shapes and types, not equal values (a cache of shapes; cheap: no weights read)."""
    g = model.graph
    out: dict[str, bytes] = {}
    for i in g.input:
        out[i.name] = _h("input", i.name, i.type.SerializeToString(deterministic=True))
    for t in g.initializer:
        if t.name in out:  # an initializer that is also a graph input (old IR) can be fed: an input
            continue
        big_float = t.data_type in _FLOATS and math.prod(t.dims) > 16
        out[t.name] = _shape_digest(t) if big_float and not values else _initializer_digest(t)
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1 \
                and n.attribute[0].name == "value" and n.output:  # a constant node and an initializer alike
            out[n.output[0]] = _initializer_digest(n.attribute[0].t)
            continue
        if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and n.input and n.input[0] in out and n.output:
            out[n.output[0]] = out[n.input[0]]  # the same value (exporters spell shared weights so)
            continue
        attrs = b"".join(_attribute_bytes(a) for a in sorted(n.attribute, key=lambda a: a.name))
        ins = [out.get(i, _h("unknown", i)) if i else b"" for i in n.input]
        node = _h("node", n.op_type, n.domain, attrs, *ins)
        for k, o in enumerate(n.output):
            if o:
                out[o] = _h(node, str(k))
    return out


def joint(first: onnx.ModelProto, second: onnx.ModelProto, second_digests: dict[str, bytes] | None = None,
          wanted: list[str] | tuple[str, ...] = ()) -> tuple[onnx.ModelProto, dict[str, str], float] | None:
    """``first`` with ``second``'s nodes that it lacks appended, so that one session computes both models'
    outputs. Returns (model, names, shared): ``names`` maps each of ``second``'s outputs (or ``wanted`` tensors of
    ``second``) to its name in the joint model; ``shared`` is the fraction of ``second``'s nodes that were not
    needed (computed by ``first`` already). The joint model's outputs are ``first``'s, then the mapped ones not
    among them. Both models must have the same graph inputs (names and types) and opsets; None when they do not or
    when either is not ``mergeable``."""
    if not (mergeable(first) and mergeable(second)):
        return None
    if [(i.name, i.type) for i in first.graph.input] != [(i.name, i.type) for i in second.graph.input]:
        return None
    if list(first.opset_import) != list(second.opset_import):
        return None
    d1 = digests(first)
    d2 = second_digests if second_digests is not None else digests(second)
    by_digest: dict[bytes, str] = {}
    for name, d in d1.items():
        by_digest.setdefault(d, name)
    taken = set(d1) | {n.name for n in first.graph.node}
    rename: dict[str, str] = {}

    def name_of(t: str) -> str:
        """``second``'s tensor ``t`` in the joint model."""
        if not t:
            return t
        if t in rename:
            return rename[t]
        hit = by_digest.get(d2.get(t, b""))
        if hit is not None:
            rename[t] = hit
            return hit
        new = t if t not in taken else PREFIX + t
        while new in taken:
            new = PREFIX + new
        taken.add(new)
        rename[t] = new
        return new

    out = onnx.ModelProto()
    out.CopyFrom(first)
    del out.graph.value_info[:]
    g2 = second.graph
    inits = {t.name: t for t in g2.initializer}
    added = 0
    for n in g2.node:
        if all(o and by_digest.get(d2.get(o, b"")) is not None for o in n.output if o):
            for o in n.output:
                name_of(o)
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        if copy.name:
            copy.name = PREFIX + copy.name
        for k, i in enumerate(n.input):
            if i in inits and by_digest.get(d2.get(i, b"")) is None and i not in rename:
                t = onnx.TensorProto()
                t.CopyFrom(inits[i])
                t.name = name_of(i)
                out.graph.initializer.append(t)
            copy.input[k] = name_of(i)
        for k, o in enumerate(n.output):
            copy.output[k] = name_of(o)
        out.graph.node.append(copy)
        added += 1
    names = {t: name_of(t) for t in ([o.name for o in g2.output] + list(wanted))}
    have = {o.name for o in out.graph.output}
    outputs2 = {o.name: o for o in g2.output}
    for t, new in names.items():
        if new in have:
            continue
        vi = out.graph.output.add()
        if t in outputs2:
            vi.CopyFrom(outputs2[t])
        vi.name = new
        have.add(new)
    shared = 1.0 - added / max(1, len(g2.node))
    return out, names, shared
