"""Load, validate and save ONNX models; convert ModelProto <-> onnx-graphsurgeon Graph at the edges only.

Edge cases handled here, once:
- weights held in ``Constant`` nodes of the main graph become initializers (subgraphs are left alone);
- initializers that are also graph inputs are *overridable*: they are kept as plain inputs inside (so no pass
  ever folds them) and restored as initializers on export;
- every save is atomic (temporary file, then rename).

**Models over 2 GB** (``EXTERNAL_LIMIT``: the most protobuf can serialise; tests lower it) never have their weights in
memory as a whole. Sizes are told without ``ByteSize`` (protobuf serialises the model to compute it, and raises over
2 GB): ``data_bytes`` of each tensor from its external ``length`` or its dims; ``tensor_bytes`` is the weights,
``inline_bytes`` what the proto itself holds. ``load_model`` reads the graph without its external data and records,
in the model's metadata (``EXTERNAL_DIR_KEY``), the absolute folder the data locations are relative to; the proto
then stays small and every proto operation (copies, shape inference, the passes) works as for any model. A weight is
read only when a pass needs its values (``to_graph`` makes graphsurgeon read it from that folder, into one array).
ONNX Runtime and the checker get the model by path: ``on_disk`` writes the small proto into that folder for the
moment they read it (so the folder must be writable), and ORT maps the weights from the user's data file itself.
Each live session maps them once more (the pages are shared, but each mapping counts in the resident size): callers
keep one session alive at a time. ``save_model`` writes the output with one data file beside it (``<name>.data``),
copying the input's weights range by range, and publishes the pair only once it is checked. A ``ModelProto`` handed
over in memory cannot be over 2 GB (protobuf cannot serialise it for ORT) nor refer to external data (no folder is
known): ``load_model`` says to pass the path.
"""
from __future__ import annotations

import heapq
import math
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

from onnx_easier.errors import BadArgumentError, InvalidModelError, UnsupportedModelError

MIN_OPSET, MAX_OPSET = 11, 21
_TWO_GB = 2**31 - 1
SMALL_INITIALIZER = 64  # values: initializers up to this size stay in ``weightless`` copies (shape operands)
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
        if has_external_data(source):
            raise UnsupportedModelError("model: its weights are in external data files, and a ModelProto does not say "
                                        "where they are: pass the model's path instead")
        if inline_bytes(source) >= _TWO_GB:
            raise UnsupportedModelError("model: over 2 GB in memory, which protobuf cannot serialise for ONNX Runtime "
                                        "and the checker: save it with onnx.save(model, path, save_as_external_data="
                                        "True) and pass the path")
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
        try:
            if _weights_stay_on_disk(model):
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
    """Bytes of the main graph's initializers, inline or external: the size of the weights (module doc)."""
    return sum(data_bytes(t) for t in model.graph.initializer)


def inline_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the tensors held in the proto itself (initializers, sparse initializers, node attributes, in every
    graph and function): what protobuf must serialise with the graph, which it cannot over 2 GB."""
    return sum(data_bytes(t) for t in _all_tensors(model) if t.data_location != onnx.TensorProto.EXTERNAL)


_SUB_BYTE_BITS = {getattr(onnx.TensorProto, k): b for k, b in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4),
                                                               ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6),
                                                               ("FLOAT6E3M2", 6)) if hasattr(onnx.TensorProto, k)}


def data_bytes(t: onnx.TensorProto) -> int:
    """Bytes of one tensor's data, without reading it: its external ``length`` or element count times element size.
    Neither protobuf's ``ByteSize`` (it serialises the message, and raises over 2 GB) nor ``len(raw_data)`` (it
    copies the bytes) is used for a raw or external tensor."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        length = next((e.value for e in t.external_data if e.key == "length"), None)
        if length is not None:
            return int(length)
    elif not t.HasField("raw_data") or t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        try:
            return t.ByteSize()  # typed fields (float_data, ...): small tensors in practice
        except Exception:  # noqa: BLE001 - protobuf's size errors have no common type: over 2 GB
            return _TWO_GB
    n = int(np.prod(t.dims, dtype=np.int64))
    bits = _SUB_BYTE_BITS.get(t.data_type)
    if bits is not None:
        return -(-n * bits // 8)
    return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    def in_nodes(nodes) -> Iterator[onnx.TensorProto]:
        for n in nodes:
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for g in [*([a.g] if a.HasField("g") else []), *a.graphs]:
                    yield from in_graph(g)

    def in_graph(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        yield from in_nodes(g.node)

    yield from in_graph(model.graph)
    for f in model.functions:
        yield from in_nodes(f.node)


def _weights_stay_on_disk(model: onnx.ModelProto) -> bool:
    """Whether a model read without its external data keeps it on disk: its tensors (``Constant`` values included:
    ``onnx.save(..., convert_attribute=True)`` puts them there too) hold ``EXTERNAL_LIMIT`` bytes or more, and some
    are external."""
    return has_external_data(model) and sum(data_bytes(t) for t in _all_tensors(model)) >= EXTERNAL_LIMIT


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor of ``model`` (initializer, Constant value, in any graph) refers to external data."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model))


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
    """A path from which ``model`` (weights external) reads completely: the small proto written to a temporary file
    in the folder its data locations are relative to, removed on exit. For ONNX Runtime and the checker, which resolve
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
        with os.fdopen(fd, "wb") as f:  # as it is: no copy of weights made in memory (fused ones); ORT and the
            f.write(model.SerializeToString())  # checker ignore the EXTERNAL_DIR_KEY metadata
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
    if _weights_stay_on_disk(model):
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


def weightless(model: onnx.ModelProto, max_elements: int = SMALL_INITIALIZER) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference that does not copy its weights: nodes, inputs, outputs, value_info,
    opsets and functions as they are, the initializers of at most ``max_elements`` values too (shape operands:
    Reshape's shape, Slice's starts, Pad's pads keep their values for data propagation), and every larger
    initializer as a graph input of its type and shape. ONNX shape inference serialises the model it is given:
    for a 100 MB model that is 100 MB less to write, parse and copy back per inference."""
    g = model.graph
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    lg = light.graph
    lg.name = g.name
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    lg.sparse_initializer.extend(g.sparse_initializer)
    declared = {i.name for i in g.input}
    for t in g.initializer:
        if math.prod(t.dims) <= max_elements:
            lg.initializer.append(t)
        elif t.name not in declared:
            lg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move tensor-valued ``Constant`` nodes of the main graph into initializers (same tensor names)."""
    keep = []
    moved = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            if attr.name == "value" and attr.t.data_location == onnx.TensorProto.EXTERNAL:  # a weight left on disk
                t = onnx.TensorProto()
                t.CopyFrom(attr.t)
                t.name = node.output[0]
                moved.append(t)
                continue
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
        """The values, read straight into one writable array (``numpy_helper.to_array`` holds the bytes, then a
        read-only view of them; a weight of the size that puts a model over 2 GB should be in memory once)."""
        t = self.tensor
        info = {e.key: e.value for e in t.external_data}
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        n = int(np.prod(t.dims, dtype=np.int64))
        if t.data_type in _SUB_BYTE_BITS or dtype.kind not in "biufc" or "location" not in info:
            return np.array(numpy_helper.to_array(t, base_dir=self.folder))
        with open(os.path.join(self.folder, info["location"]), "rb") as f:
            f.seek(int(info.get("offset", 0)))
            values = np.fromfile(f, dtype=dtype.newbyteorder("<"), count=n)  # ONNX data is little-endian
        if values.size != n:
            raise UnsupportedModelError(f"tensor {t.name!r}: its external data ends before {n} values")
        return values.astype(dtype, copy=False).reshape(tuple(t.dims))


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
    one external-data file ``<name>.data`` beside them: the pair is written and checked under temporary names (the
    model referring to its temporary data file), then the model is rewritten to refer to ``<name>.data`` (a few KB)
    and both are renamed into place, the data first. So a failed check or an interruption leaves nothing, and an
    existing ``path`` and its data file stay as they were until the new pair replaces them. A data file the weights
    are read from is never replaced, except by ``path`` overwriting the very model that owns it (``--overwrite``)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    data_path = folder / f"{path.name}.data"
    inline = external_dir(model) is None and tensor_bytes(model) < EXTERNAL_LIMIT
    if not inline:
        _refuse_input_data(model, path, data_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    _default_mode(fd)
    os.close(fd)
    data_tmp = f"{tmp}.data"
    try:
        if inline:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
            if check is not None:
                check(tmp)
        else:
            out = _with_data_file(model, data_tmp, os.path.basename(data_tmp))
            with open(tmp, "wb") as f:
                f.write(out.SerializeToString())
            if check is not None:
                check(tmp)
            _relocate(out, os.path.basename(data_tmp), data_path.name)
            with open(tmp, "wb") as f:
                f.write(out.SerializeToString())
            os.replace(data_tmp, data_path)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, data_tmp):
            if os.path.exists(leftover):
                os.unlink(leftover)


def external_files(model: onnx.ModelProto, folder: str | os.PathLike) -> set[str]:
    """Real paths of the files the external tensors of ``model`` read from, relative to ``folder``."""
    return {os.path.realpath(os.path.join(folder, e.value)) for t in _all_tensors(model)
            if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data if e.key == "location"}


def _refuse_input_data(model: onnx.ModelProto, path: Path, data_path: Path) -> None:
    """Raise BadArgumentError when ``data_path`` is a file the weights of ``model`` are read from and ``path`` is not
    the model that owns it (writing there would change the input behind its back)."""
    folder = external_dir(model)
    if folder is None or not data_path.exists() or os.path.realpath(data_path) not in external_files(model, folder):
        return
    if path.is_file():
        try:
            owner = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 - not a model: it does not own the data file
            owner = None
        if owner is not None and os.path.realpath(data_path) in external_files(owner, path.parent):
            return
    raise BadArgumentError(f"{data_path} holds the input's weights, and OUT's data would be written there: "
                           "choose another OUT")


def _relocate(model: onnx.ModelProto, old: str, new: str) -> None:
    """Point the external tensors of ``model`` stored in ``old`` to ``new`` (same offsets), in place."""
    for t in _all_tensors(model):
        for e in t.external_data:
            if e.key == "location" and e.value == old:
                e.value = new


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
            if not external and data_bytes(t) < 1024:
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
    providers: list[str | tuple[str, dict[str, str]]] | None = None,
    threads: int = 0,
    lean: bool = True,
) -> ort.InferenceSession:
    """An ORT session with logging at errors only. ``optimize=False`` keeps every tensor name (no fusions).

    ``lean=True`` (work sessions): no CPU memory arena, so the memory of a run goes back as soon as the run ends
    (an arena keeps the largest run's tensors for the session's life: 700 MB for ResNet-50 at batch 32, against a
    400 MB peak without, at the same CPU time), and no pre-packed copy of the MatMul/Gemm weights (ConvNeXt-T:
    a session holds 122 MB instead of 211 MB, at the same CPU time within 2%), and intra-op threads that sleep
    between runs instead of spinning (a spinning thread holds a core while the search does its own numpy work
    between runs: the default run on ffn_digits took 5.1 s wall / 7.7 s CPU with spinning, 3.4 / 5.7 without, on
    2 cores; mobilenetv2_digits 10.6 / 17.9 against 6.9 / 11.7). ``lean=False``: ORT's defaults, as a model is
    deployed (timed sessions)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = not lean
    if lean:
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if isinstance(model, onnx.ModelProto) and has_external_data(model):
        if not lean:
            so.add_session_config_entry("session.disable_prepacking", "1")  # a packed copy of every weight otherwise
        with on_disk(model) as where:
            return _session(where, so, providers)
    if isinstance(model, onnx.ModelProto) and inline_bytes(model) >= _TWO_GB:
        raise UnsupportedModelError("models over 2 GB must be passed to ORT as a path with external data")
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return _session(src, so, providers)


def _session(src: bytes | str, so: ort.SessionOptions,
             providers: list[str | tuple[str, dict[str, str]]] | None) -> ort.InferenceSession:
    """ORT's session of ``src``. Its Python object keeps the model's bytes for its whole life, to re-create the
    session on CPU when a run fails on another provider: dropped here with that fallback (a run's error is raised
    as it is; callers check the providers themselves), so a live session no longer holds a serialized copy of the
    weights (a ViT-S work session: 186 MB -> about 100)."""
    try:
        sess = ort.InferenceSession(src, so, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"ONNX Runtime cannot run this model: {first}") from exc
    if isinstance(src, bytes):
        sess.disable_fallback()
        sess._model_bytes = None  # ORT's copy of the model, kept only for that fallback
    return sess
