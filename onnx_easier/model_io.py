"""Load, validate and save ONNX models; convert ModelProto <-> onnx-graphsurgeon Graph at the edges only.

Edge cases handled here, once:
- weights held in ``Constant`` nodes of the main graph become initializers (subgraphs are left alone);
- initializers that are also graph inputs are *overridable*: they are kept as plain inputs inside (so no pass
  ever folds them) and restored as initializers on export;
- models over 2 GB are saved with external data; every save is atomic (temporary file, then rename).
"""
from __future__ import annotations

import heapq
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import numpy_helper

from onnx_easier.errors import InvalidModelError, UnsupportedModelError

MIN_OPSET, MAX_OPSET = 11, 21
_TWO_GB = 2**31 - 1


def default_opset(model: onnx.ModelProto) -> int:
    """Opset of the default ("" / "ai.onnx") domain; 1 when the model does not import it."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read and validate a model. Raises InvalidModelError / UnsupportedModelError with a one-line message."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        label = "model"
    else:
        path = Path(source)
        label = str(path)
        if not path.exists():
            raise InvalidModelError(f"{path}: no such file; give the path of an .onnx model")
        if path.is_dir():
            raise InvalidModelError(f"{path}: is a directory, not an .onnx model file")
        if path.stat().st_size == 0:
            raise InvalidModelError(f"{path}: the file is empty; re-export the model")
        try:
            model = onnx.load(str(path), load_external_data=True)
        except Exception as exc:  # protobuf gives many exception types for garbage
            raise InvalidModelError(
                f"{path}: not a readable ONNX model ({type(exc).__name__}); is it truncated or another format?"
            ) from exc
        if not model.graph.node and not model.graph.output:
            raise InvalidModelError(f"{path}: not an ONNX model (no graph found); is it another format?")
    try:
        onnx.checker.check_model(model if model.ByteSize() < _TWO_GB else str(source))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "topologically sorted" not in first or not sort_nodes(model):
            raise InvalidModelError(f"{label}: fails onnx.checker: {first}") from exc
        onnx.checker.check_model(model)  # sorted: valid now (ORT runs unsorted graphs; converters write them)
    opset = default_opset(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModelError(
            f"{label}: opset {opset} is not supported (supported: {MIN_OPSET}-{MAX_OPSET}); "
            "convert it with onnx.version_converter first"
        )
    return constants_to_initializers(model)


def sort_nodes(model: onnx.ModelProto) -> bool:
    """Put the main graph's nodes in topological order, in place (Kahn's algorithm, stable: a node keeps its
    position among the nodes ready with it). Tensors read inside a node's subgraphs count as its inputs. Returns
    False, changing nothing, when the graph has a cycle or reads a tensor nothing produces."""
    g = model.graph
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    producer = {o: k for k, n in enumerate(g.node) for o in n.output}
    needs: list[set[int]] = []
    for n in g.node:
        names = set(n.input) | {i for a in n.attribute for sg in [*([a.g] if a.HasField("g") else []), *a.graphs]
                                for sn in sg.node for i in sn.input}
        if any(x not in known and x not in producer for x in n.input):
            return False
        needs.append({producer[x] for x in names if x in producer})
    readers: list[list[int]] = [[] for _ in g.node]
    for k, deps in enumerate(needs):
        for d in deps:
            readers[d].append(k)
    waiting = [len(deps) for deps in needs]
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for r in readers[k]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) < len(g.node):
        return False
    nodes = [g.node[k] for k in order]
    copies = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        copies.append(c)
    del g.node[:]
    g.node.extend(copies)
    return True


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move tensor-valued ``Constant`` nodes of the main graph into initializers (same tensor names)."""
    keep = []
    moved = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            arr = _constant_value(attr)
            if arr is not None:
                moved.append(numpy_helper.from_array(arr, node.output[0]))
                continue
        keep.append(node)
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(keep)
        model.graph.initializer.extend(moved)
    return model


def _constant_value(attr: onnx.AttributeProto) -> np.ndarray | None:
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, dtype=np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse or string constants stay as nodes


def overridable_initializers(model: onnx.ModelProto) -> set[str]:
    """Names of initializers that are also graph inputs (the user may feed them: never fold them)."""
    inputs = {i.name for i in model.graph.input}
    return {t.name for t in model.graph.initializer if t.name in inputs}


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """ModelProto -> gs.Graph. Overridable initializers stay graph inputs (Variables), so passes cannot fold them."""
    over = overridable_initializers(model)
    if over:
        stripped = onnx.ModelProto()
        stripped.CopyFrom(model)
        keep = [t for t in stripped.graph.initializer if t.name not in over]
        del stripped.graph.initializer[:]
        stripped.graph.initializer.extend(keep)
        model = stripped
    return gs.import_onnx(model)


def to_model(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """gs.Graph -> ModelProto, restoring what gs does not carry: overridable initializers, ir_version,
    producer, metadata and local functions of ``original``."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    over = overridable_initializers(original)
    if over:
        names = {i.name for i in model.graph.input}
        model.graph.initializer.extend(t for t in original.graph.initializer if t.name in over and t.name in names)
    kinds = {o.name: o.type for o in [*original.graph.input, *original.graph.output]}
    for out in [*model.graph.input, *model.graph.output]:
        t = kinds.get(out.name)
        if t is None:
            continue
        if not t.HasField("tensor_type"):  # gs keeps tensor types only: restore sequence / map / optional outputs
            out.type.CopyFrom(t)
        elif not out.type.tensor_type.HasField("shape") and t.tensor_type.HasField("shape") and (
                out.type.tensor_type.elem_type in (0, t.tensor_type.elem_type)):
            out.type.CopyFrom(t)  # the checker requires a shape field on graph inputs/outputs (a rewrite lost it)
    model.ir_version = original.ir_version
    model.producer_name = original.producer_name or "onnx-easier"
    model.producer_version = original.producer_version
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    if original.functions and not model.functions:
        model.functions.extend(original.functions)
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    return model


def _default_mode(fd_or_path: int | str) -> None:
    """Give a temporary file the mode a newly created file would have (0666 minus the umask; mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(fd_or_path, 0o666 & ~mask)


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then os.replace): readers see the
    old file or the new one, never a part; on any failure (or KeyboardInterrupt) nothing is left behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        _default_mode(fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model(model: onnx.ModelProto, path: str | os.PathLike,
               check: Callable[[str], None] | None = None) -> None:
    """Write ``model`` to ``path`` atomically: a temporary file in the same folder, then os.replace.

    ``check(tmp_path)`` runs on the written temporary file before it is published (e.g. reload and verify); if
    it raises, nothing is published. Models over 2 GB go with one external-data file ``<name>.data`` beside them
    (also written first under a temporary name). On any failure (or KeyboardInterrupt) nothing is left at ``path``.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    _default_mode(fd)
    os.close(fd)
    try:
        if model.ByteSize() < _TWO_GB:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
            if check is not None:
                check(tmp)
            os.replace(tmp, path)
        else:
            data_name = f"{path.name}.data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{Path(tmp).name}.data", size_threshold=1024)
            os.replace(f"{tmp}.data", folder / data_name)
            model_ext = onnx.load(tmp, load_external_data=False)
            for t in model_ext.graph.initializer:
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            with open(tmp, "wb") as f:
                f.write(model_ext.SerializeToString())
            if check is not None:
                check(tmp)
            os.replace(tmp, path)
    finally:
        for leftover in (tmp, f"{tmp}.data"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def make_session(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    optimize: bool = False,
    providers: list[str] | None = None,
    threads: int = 0,
) -> ort.InferenceSession:
    """An ORT session with logging at errors only. ``optimize=False`` keeps every tensor name (no fusions)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    if isinstance(model, onnx.ModelProto) and model.ByteSize() >= _TWO_GB:
        raise UnsupportedModelError("models over 2 GB must be passed to ORT as a path with external data")
    try:
        return ort.InferenceSession(src, so, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"ONNX Runtime cannot run this model: {first}") from exc
