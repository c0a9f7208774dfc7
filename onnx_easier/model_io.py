"""Load, validate and save ONNX models; convert ModelProto <-> onnx-graphsurgeon Graph at the edges only.

Edge cases handled here, once:
- weights held in ``Constant`` nodes of the main graph become initializers (subgraphs are left alone);
- initializers that are also graph inputs are *overridable*: they are kept as plain inputs inside (so no pass
  ever folds them) and restored as initializers on export;
- every save is atomic (temporary file, then rename).

**Models over 2 GB** (``EXTERNAL_LIMIT``: the most protobuf can serialise) never have their weights in memory as a
whole. ``load_model`` reads the graph without its external data and records, in the model's metadata
(``EXTERNAL_DIR_KEY``), the absolute folder the data locations are relative to; the proto then stays small and
every proto operation (copies, shape inference, the passes) works as for any model. A weight is read only when a
pass needs its values (``to_graph`` makes graphsurgeon read it from that folder). ONNX Runtime and the checker get
the model by path: ``on_disk`` writes the small proto into that folder for the moment they read it, so ORT maps the
weights from the user's data file itself (one copy, shared by every session). ``save_model`` writes the output with
one data file beside it (``<name>.data``), copying the input's weights range by range.
"""
from __future__ import annotations

import heapq
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnx_easier.errors import InvalidModelError, UnsupportedModelError

MIN_OPSET, MAX_OPSET = 11, 21
_TWO_GB = 2**31 - 1
EXTERNAL_LIMIT = _TWO_GB  # models whose tensors hold this many bytes or more keep their weights on disk
EXTERNAL_DIR_KEY = "onnx_easier.external_data_dir"  # metadata of such a model: where its data locations start
_COPY_CHUNK = 64 * 2**20


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
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf gives many exception types for garbage
            raise InvalidModelError(
                f"{path}: not a readable ONNX model ({type(exc).__name__}); is it truncated or another format?"
            ) from exc
        if not model.graph.node and not model.graph.output:
            raise InvalidModelError(f"{path}: not an ONNX model (no graph found); is it another format?")
        big = tensor_bytes(model) >= EXTERNAL_LIMIT and has_external_data(model)
        try:
            if big:
                _set_external_dir(model, str(path.resolve().parent))
            else:
                onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise InvalidModelError(f"{path}: its external data cannot be read ({_first(exc)})") from exc
    try:
        if has_external_data(model):
            with on_disk(model) as where:
                onnx.checker.check_model(where)
        else:
            onnx.checker.check_model(model)
    except Exception as exc:
        first = _first(exc)
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


def _first(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers, inline or external (protobuf's ByteSize raises over 2 GB)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            if "length" in info:
                total += int(info["length"])
                continue
            n = int(np.prod(t.dims, dtype=np.int64))
            total += n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        else:
            total += len(t.raw_data) or t.ByteSize()
    return total


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def external_dir(model: onnx.ModelProto) -> str | None:
    """The folder a large model's external data locations are relative to (None: weights in memory)."""
    return next((p.value for p in model.metadata_props if p.key == EXTERNAL_DIR_KEY), None)


def _set_external_dir(model: onnx.ModelProto, folder: str | None) -> None:
    keep = [p for p in model.metadata_props if p.key != EXTERNAL_DIR_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    if folder is not None:
        model.metadata_props.add(key=EXTERNAL_DIR_KEY, value=folder)


@contextmanager
def on_disk(model: onnx.ModelProto) -> Iterator[str]:
    """A path from which ``model`` (weights external) reads completely: a temporary copy of the small proto in the
    folder its data locations are relative to, removed on exit. For ONNX Runtime and the checker, which resolve
    external data from a model's path only."""
    folder = external_dir(model)
    if folder is None:
        raise UnsupportedModelError("internal error: a model with external data but no data folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnx-easier-", suffix=".onnx", dir=folder)
    except OSError as exc:
        raise UnsupportedModelError(f"models over 2 GB need their folder writable for a moment ({folder}: "
                                    f"{exc.strerror})") from exc
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        _set_external_dir(copy, None)
        with os.fdopen(fd, "wb") as f:
            f.write(copy.SerializeToString())
        yield tmp
    finally:
        os.unlink(tmp)


def check_model(model: onnx.ModelProto, *, full_check: bool = False) -> None:
    """``onnx.checker.check_model``, by path for a model whose weights are on disk (the checker resolves external
    data from a model's path only)."""
    if has_external_data(model):
        with on_disk(model) as where:
            onnx.checker.check_model(where, full_check=full_check)
    else:
        onnx.checker.check_model(model, full_check=full_check)


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """A model written by ``save_model``, read back the way ``load_model`` reads its input (large ones keep their
    weights on disk), without the input checks."""
    model = onnx.load(str(path), load_external_data=False)
    if tensor_bytes(model) >= EXTERNAL_LIMIT and has_external_data(model):
        _set_external_dir(model, str(Path(path).resolve().parent))
    else:
        onnx.load_external_data_for_model(model, str(Path(path).parent))
    return model


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
    graph = gs.import_onnx(model)
    folder = external_dir(model)
    if folder is not None:
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues) and (
                    t._values.tensor.data_location == onnx.TensorProto.EXTERNAL):
                t._values = _ExternalValues(t._values.tensor, folder)
    return graph


class _ExternalValues(LazyValues):
    """graphsurgeon's lazy constant, read from the large model's data folder (not the working directory) when a
    pass asks for its values; exported again as the same external reference when it never was."""

    def __init__(self, tensor: onnx.TensorProto, folder: str) -> None:
        super().__init__(tensor)
        self.folder = folder

    def load(self) -> np.ndarray:
        return np.array(numpy_helper.to_array(self.tensor, base_dir=self.folder))


def to_model(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """gs.Graph -> ModelProto, restoring what gs does not carry: overridable initializers, ir_version,
    producer, metadata and local functions of ``original``."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    for t in model.graph.initializer:  # a weight read from disk is exported inline, still flagged external
        if t.data_location == onnx.TensorProto.EXTERNAL and not any(e.key == "location" for e in t.external_data):
            t.data_location = onnx.TensorProto.DEFAULT
        elif t.data_location == onnx.TensorProto.EXTERNAL and t.HasField("raw_data"):
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
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
    it raises, nothing is published. Large models (weights on disk, or over ``EXTERNAL_LIMIT`` in memory) go with
    one external-data file ``<name>.data`` beside them, written first (the model refers to it by that name); a
    failed check removes it again. On any failure (or KeyboardInterrupt) nothing is left at ``path``.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    _default_mode(fd)
    os.close(fd)
    data_path = folder / f"{path.name}.data"
    data_tmp = f"{tmp}.data"
    published_data = False
    try:
        if external_dir(model) is None and tensor_bytes(model) < EXTERNAL_LIMIT:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        else:
            out = _with_data_file(model, data_tmp, data_path.name)
            with open(tmp, "wb") as f:
                f.write(out.SerializeToString())
            os.replace(data_tmp, data_path)
            published_data = True
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
        published_data = False
    finally:
        for leftover in (tmp, data_tmp, *([data_path] if published_data else [])):
            if os.path.exists(leftover):
                os.unlink(leftover)


def _with_data_file(model: onnx.ModelProto, data_file: str, location: str) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers of 1 KiB or more are written to ``data_file`` (aligned to 4 KiB, so
    ORT can map them) and referenced as ``location``; weights still on disk are copied range by range."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    folder = external_dir(model)
    _set_external_dir(out, None)
    with open(data_file, "wb") as f:
        for t in out.graph.initializer:
            external = t.data_location == onnx.TensorProto.EXTERNAL
            if not external and len(t.raw_data) < 1024 and t.ByteSize() < 1024:
                continue
            offset = -(-f.tell() // 4096) * 4096
            f.seek(offset)
            if external:
                info = {e.key: e.value for e in t.external_data}
                if folder is None:
                    raise UnsupportedModelError(f"tensor {t.name!r} refers to external data no folder is known for")
                length = _copy_range(os.path.join(folder, info["location"]), int(info.get("offset", 0)),
                                     int(info["length"]) if "length" in info else None, f)
            else:
                raw = t.raw_data or numpy_helper.from_array(numpy_helper.to_array(t)).raw_data
                f.write(raw)
                length = len(raw)
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(field)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=key, value=value)
    return out


def _copy_range(src: str, offset: int, length: int | None, dst) -> int:
    """Copy ``length`` bytes (to the end if None) of ``src`` from ``offset`` into the open file ``dst``."""
    copied = 0
    with open(src, "rb") as f:
        f.seek(offset)
        while length is None or copied < length:
            chunk = f.read(_COPY_CHUNK if length is None else min(_COPY_CHUNK, length - copied))
            if not chunk:
                break
            dst.write(chunk)
            copied += len(chunk)
    if length is not None and copied != length:
        raise UnsupportedModelError(f"{src}: external data ends before {offset + length} bytes")
    return copied


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
    if isinstance(model, onnx.ModelProto) and has_external_data(model):
        so.add_session_config_entry("session.disable_prepacking", "1")  # a packed copy of every weight otherwise
        with on_disk(model) as where:
            return _session(where, so, providers)
    if isinstance(model, onnx.ModelProto) and tensor_bytes(model) >= _TWO_GB:
        raise UnsupportedModelError("models over 2 GB must be passed to ORT as a path with external data")
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return _session(src, so, providers)


def _session(src: bytes | str, so: ort.SessionOptions, providers: list[str] | None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(src, so, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"ONNX Runtime cannot run this model: {first}") from exc
