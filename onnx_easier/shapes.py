"""Shapes in one place: ONNX shape inference (lenient for the passes, strict for the checks), the ONNX Runtime
fallback for tensors ONNX cannot type, and exposing inner tensors as outputs. The passes, the calibration and the
checks all come here; this module imports nothing of theirs (no import cycle).

- ``infer_shapes(model)``: lenient inference (value_info of the main graph) + the ORT fallback; for the passes.
- ``strict_failure(model)``: why strict, typed inference fails (None when it passes); for the checks.
- ``augment(model, tensors)``: a copy with inner tensors exposed as graph outputs; for calibration and checks.

The ORT fallback: Tensor shapes that ONNX shape inference leaves unknown, read from ONNX Runtime instead.

Some ops have no ONNX shape inference (ai.onnx.ml's Scaler, Normalizer, ... in skl2onnx pipelines): every tensor
after them has an unknown rank, and the fusion passes refuse layers whose data rank they cannot see. ORT knows the
shapes once it runs. ``ort_value_info(model, names)`` runs the model twice on synthetic inputs, with batch sizes 1
and 2, exposing ``names``; for each tensor it returns a ValueInfoProto with the element type ORT produced and one
dim per axis:

- a dim equal in both runs: that size (``dim_value``);
- a dim that is 1 then 2: the batch dim (``dim_param`` = the inputs' first symbolic batch name, else ``N``);
- any other change: unknown (neither value nor param).

Synthetic inputs: standard normal values for float inputs, zeros for integer and bool inputs (valid indices and
masks). Only models whose graph inputs are tensors with fixed dims except the first can be run this way, and not
those with If/Loop/Scan (a synthetic run takes one branch or trip count of many); for others (and when ORT fails)
nothing is returned. Data-dependent shapes (NonZero, ...) may differ on real data: a size read
from the synthetic runs is trusted only where the dim did not change between them, and a rank is a property of the
graph, not of the data.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from onnx_easier.data import InputSpec, input_specs
from onnx_easier.errors import OnnxEasierError
from onnx_easier.joint import digests
from onnx_easier.model_io import inline_bytes, make_session, tensor_bytes, weightless

_LOG = logging.getLogger(__name__)
MAX_BYTES = 256 * 2**20  # models larger than this (weights on disk included) are not run for their shapes


def unknown_tensors(model: onnx.ModelProto, *, dims: bool = False) -> list[str]:
    """Node outputs of the main graph whose type is unknown or a tensor type without a shape (in ``model``'s
    value_info, inputs and outputs), in graph order; with ``dims=True`` also those with a dim of unknown size
    (symbolic or empty). Tensors of a known non-tensor type (sequences, maps) are not listed."""
    g = model.graph
    types = {vi.name: vi.type for vi in [*g.input, *g.value_info, *g.output]}
    out: list[str] = []
    for node in g.node:
        for name in node.output:
            if not name:
                continue
            if _unknown(types.get(name), dims):
                out.append(name)
    return out


def _unknown(t: onnx.TypeProto | None, dims: bool) -> bool:
    kind = t.WhichOneof("value") if t is not None else None
    if kind is None:
        return True
    if kind != "tensor_type":
        return False
    shape = t.tensor_type
    if not shape.HasField("shape"):
        return True
    return dims and any(not d.HasField("dim_value") for d in shape.shape.dim)


def _inputs(specs: list[InputSpec], batch: int) -> dict[str, np.ndarray] | None:
    """Synthetic feeds with ``batch`` samples (a fixed first dim stays as it is); None unless every dim but the
    first is fixed."""
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        if not spec.shape or not all(isinstance(d, int) for d in spec.shape[1:]):
            return None
        first = spec.shape[0] if isinstance(spec.shape[0], int) else batch
        shape = (first, *spec.shape[1:])
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    """If/Loop/Scan: what a synthetic run sees depends on the branch or trip count it happens to take."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in model.graph.node for a in n.attribute)


def ort_value_info(model: onnx.ModelProto, names: list[str]) -> list[onnx.ValueInfoProto]:
    """ValueInfoProtos for the tensors ``names`` from two ORT runs (module docstring); [] when the model cannot
    be run on synthetic inputs."""
    if not names or _too_big(model, MAX_BYTES) or tensor_bytes(model) >= MAX_BYTES or _has_subgraphs(model):
        return []
    try:
        specs = input_specs(model)
    except OnnxEasierError:  # an input that is not a typed tensor
        return []
    feeds = [_inputs(specs, batch) for batch in (1, 2)]
    if feeds[0] is None or feeds[1] is None:
        return []
    try:
        session = make_session(augment(model, names))
        wanted = [o.name for o in session.get_outputs() if o.name in set(names)]
        runs = [dict(zip(wanted, session.run(wanted, f))) for f in feeds]
    except Exception as exc:  # noqa: BLE001 - any failure only means no extra shapes
        _LOG.debug("shapes from ONNX Runtime unavailable: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return []
    batch_name = next((sp.shape[0] for sp in specs if isinstance(sp.shape[0], str)), "N")
    out: list[onnx.ValueInfoProto] = []
    for name in wanted:
        a, b = runs[0].get(name), runs[1].get(name)
        if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray) or a.ndim != b.ndim:
            continue
        dims: list[int | str | None] = []
        for d1, d2 in zip(a.shape, b.shape):
            dims.append(d1 if d1 == d2 else batch_name if (d1, d2) == (1, 2) else None)
        elem = helper.np_dtype_to_tensor_dtype(a.dtype)
        out.append(helper.make_tensor_value_info(name, elem, dims))
    return out


_FOUND: dict[bytes, onnx.ValueInfoProto] = {}  # shape digest (joint.digests, values=False) -> what ORT read
_FOUND_MAX = 50_000


def fill_unknown(model: onnx.ModelProto, *, dims: bool = False) -> None:
    """Replace, in ``model``'s value_info, the entries of ``unknown_tensors(model, dims=dims)`` by what
    ``ort_value_info`` reads for them (in place; nothing changes when the model cannot be run). What ORT read is
    remembered by the tensor's shape digest: the next model that computes a tensor from the same nodes, input
    types and weight shapes (the search's next candidate, upstream of its change) runs nothing for it."""
    names = unknown_tensors(model, dims=dims)
    if not names:
        return
    keys = digests(model, values=False)
    found, missing = [], []
    for name in names:
        hit = _FOUND.get(keys.get(name, b""))
        if hit is None:
            missing.append(name)
            continue
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(hit)
        vi.name = name
        found.append(vi)
    fresh = ort_value_info(model, missing)
    if len(_FOUND) + len(fresh) > _FOUND_MAX:
        _FOUND.clear()
    for vi in fresh:
        if vi.name in keys:
            _FOUND[keys[vi.name]] = vi
    found += fresh
    if found:
        names = {vi.name for vi in found}
        kept = [vi for vi in model.graph.value_info if vi.name not in names]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept + found)


# --- exposing tensors as outputs -----------------------------------------------------------------------------


def augment(model: onnx.ModelProto, tensors: list[str],
            types: dict[str, onnx.TypeProto] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with ``tensors`` added as graph outputs (element type from shape inference when it is
    known; no shape). Tensors that already are graph outputs are not added again."""
    return _augment(model, tensors, tensor_types(model) if types is None else types)


def tensor_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Type of every main-graph tensor ONNX shape inference knows (inputs, value_info, outputs); {} entries are
    missing where inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless(model))
    except (onnx.shape_inference.InferenceError, ValueError) as exc:  # unknown ops, models over 2 GB
        _LOG.debug("shape inference failed (%s); exposed tensors get no type", exc)
        inferred = model
    g = inferred.graph
    return {vi.name: vi.type for vi in [*g.input, *g.value_info, *g.output]}


def _augment(model: onnx.ModelProto, tensors: list[str], types: dict[str, onnx.TypeProto]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    known = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
    present = {o.name for o in g.output}
    for name in dict.fromkeys(tensors):
        if name in present:
            continue
        if name not in known:
            raise OnnxEasierError(f"tensor {name!r} is not in the model's main graph; cannot expose it for calibration")
        vi = onnx.ValueInfoProto(name=name)
        t = types.get(name)
        if t is not None and t.HasField("tensor_type") and t.tensor_type.elem_type:
            vi.type.tensor_type.elem_type = t.tensor_type.elem_type
        g.output.append(vi)
        present.add(name)
    return out


# --- lenient inference for the passes ------------------------------------------------------------------------


_TWO_GB = 2**31 - 1


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model whose MAIN graph's value_info is filled in by ONNX shape inference (subgraphs, node
    attributes and graph inputs/outputs stay exactly as they were: inference would rewrite a Loop body's unknown
    dims), or ``model`` unchanged when inference fails or the model is over 2 GB. Tensors inference leaves without
    a shape (after ops it cannot infer, e.g. ai.onnx.ml's) get theirs from ONNX Runtime (``fill_unknown`` below) when the
    model runs on synthetic inputs. Run it before ``model_io.to_graph`` so that ranks and ``Activation.channels``
    are known."""
    if _too_big(model):
        _LOG.warning("shape inference skipped: the model is over 2 GB; channel counts may be unknown")
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless(model), check_type=False, strict_mode=False,
                                                     data_prop=True)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        del out.graph.value_info[:]
        out.graph.value_info.extend(inferred.graph.value_info)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        _LOG.warning("shape inference failed (%s); channel counts may be unknown", first)
        return model
    fill_unknown(out)  # ops without ONNX shape inference (ai.onnx.ml): ask ONNX Runtime
    return out


def strict_failure(model: onnx.ModelProto) -> str | None:
    """The first line of the error strict, typed ONNX shape inference raises on ``model``, or None if it passes.
    Models over 2 GB are not inferred (protobuf cannot serialise them for the checker): None."""
    if _too_big(model):
        return None
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError, ValueError) as exc:
        return _first_line(exc)
    return None


def _too_big(model: onnx.ModelProto, limit: int = _TWO_GB) -> bool:
    """Whether ``model`` holds ``limit`` bytes or more of tensors in the proto itself, which ONNX shape inference
    would serialise (a model whose weights stay on disk holds only references). Not ``ByteSize``: protobuf computes
    it by serialising the whole model, and raises over 2 GB."""
    return inline_bytes(model) >= limit


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
