"""Calibration data: read it (``.npz``, ``.npy``, a folder of them, feed dicts, or random), check it against the
model's inputs, and hand it out batch by batch as ORT feed dicts.

Layout convention: axis 0 of every array is the *sample* axis. An array of the model input's rank stands for a
batch: its axis 0 is the model's axis 0 (the batch axis) and the other axes must match the model's input shape. An
array with ONE MORE axis than the model input holds *whole feeds*: each ``arr[i]`` is fed to the model as it is
(for state inputs whose batch is not axis 0, e.g. a recurrent model's ``state [2, N, 128]``, or models that cannot
be batched); such data is fed one sample at a time, and the inputs given in batches beside it then get axis 0 = 1
(checked). A rank-0 (scalar) input is the simplest case of this: a 1-D array, one value per sample. ``x.npz`` holds
one array per input name, ``x.npy`` one array for a single-input model, a folder holds chunks of samples (``.npz``
files keyed like above, or ``.npy`` files for a single-input model) concatenated in sorted file-name order (so
zero-pad the numbers: ``part_002.npz`` sorts before ``part_010.npz``). The Python API also takes a dict of arrays
(read like an ``.npz``), an iterable of feed dicts (one whole feed each) or an ONNX Runtime quantization
``CalibrationDataReader`` (``load_feeds``).

Random data is in batches, unless samples on axis 0 cannot feed the model (a scalar input, inputs that fix axis 0
to different sizes, a named dim on axis 0 of one input and a later axis of another, as a recurrent state): then
whole feeds of the full input shapes (``--input-shape`` gives every dynamic axis but an unnamed axis 0, which is 1).

Dims: a negative ``dim_value`` (Paddle writes ``-1``) is dynamic, as ONNX Runtime reads it; a ``dim_param`` that
names nothing (``?``, ``-1``: no letter or digit in it but the sign) is an unnamed dynamic dim, so two of them never
have to agree; equal ``dim_param`` names must (in one ORT run).

When the model fixes axis 0 to ``N`` (and the data is not whole feeds), batches hold exactly ``N`` samples;
otherwise the batch size is chosen so that one batch of inputs is about 16 MB.
"""

from __future__ import annotations

import logging
import math
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnx_easier.errors import BadArgumentError, BadDataError, UnsupportedModelError
from onnx_easier.model_io import weightless

log = logging.getLogger(__name__)

DEFAULT_RANDOM_SAMPLES = 64
BATCH_BYTES = 16 * 2**20
RUN_BYTES = 128 * 2**20  # tensors alive in one ORT run (activation_bytes per sample): sets the batch size
MAX_BATCH = 256
_RANDOM_INT_HIGH = 10  # random integer inputs are drawn from [0, 10)
_LOAD_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)

Dim = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """One input the model must be fed.

    shape: one entry per axis: an int (fixed), a str (symbolic ``dim_param``) or None (unknown).
    ranked: False when the model does not give the input's rank at all (``shape`` is then ``()``).
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]
    ranked: bool = True

    @property
    def scalar(self) -> bool:
        """A rank-0 input: the data holds one value per sample and is fed one sample at a time."""
        return self.ranked and not self.shape

    def show(self) -> str:
        """The shape as ``[N,3,224,224]`` for messages."""
        return _show(self.shape) if self.ranked else "[unknown rank]"


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that calibration data must feed (inputs that are also initializers are left out)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        kind = vi.type.WhichOneof("value")
        if kind != "tensor_type":
            raise UnsupportedModelError(
                f"input {vi.name!r} is a {kind or 'value of unknown type'}, not a tensor; calibration can only feed tensors"
            )
        tt = vi.type.tensor_type
        if tt.elem_type == onnx.TensorProto.UNDEFINED:
            raise UnsupportedModelError(f"input {vi.name!r} has no element type; re-export the model with typed inputs")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        if tt.HasField("shape"):
            shape = tuple(_dim(d) for d in tt.shape.dim)
            specs.append(InputSpec(vi.name, dtype, shape))
        else:
            specs.append(InputSpec(vi.name, dtype, (), ranked=False))
    return specs


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    """A fixed size, a symbol, or None (dynamic and unnamed: negative sizes, placeholder names like ``?``)."""
    if d.HasField("dim_value"):
        return int(d.dim_value) if d.dim_value >= 0 else None
    name = d.dim_param.strip()
    return name if any(c.isalnum() for c in name.lstrip("-")) and not name.lstrip("-").isdigit() else None


_SHAPE_FORM = "expected NAME:D0,D1,... with positive integers, e.g. --input-shape input:1,3,224,224"


def parse_input_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    """``["x:1,3,224,224", ...]`` -> ``{"x": (1, 3, 224, 224)}``. The name may itself contain ``:``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        if not sep or not name or not dims.strip():
            raise BadDataError(f"--input-shape {item!r}: {_SHAPE_FORM}")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise BadDataError(f"--input-shape {item!r}: {_SHAPE_FORM}") from None
        if any(d <= 0 for d in shape):
            raise BadDataError(f"--input-shape {item!r}: {_SHAPE_FORM}")
        if name in shapes:
            raise BadDataError(f"--input-shape {item!r}: input {name!r} is given twice; give each input once")
        shapes[name] = shape
    return shapes


@dataclass
class CalibrationData:
    """Calibration samples, checked against the model: ``arrays[name]`` has the samples on axis 0.

    source: the path read, or "random". synthetic: True for random data (its entropies describe no real input).
    whole: names of inputs whose arrays hold whole feeds (one more axis than the model input; scalars' 1-D arrays
    too): ``arr[i]`` is fed as it is, so the data is fed one sample at a time (``feedwise``).
    """

    source: str
    samples: int
    arrays: dict[str, np.ndarray]
    synthetic: bool = False
    whole: frozenset[str] = field(default_factory=frozenset)

    @property
    def feedwise(self) -> bool:
        """Fed one sample (one whole feed) per ORT run: the model's batch axis plays no part."""
        return bool(self.whole)

    def __post_init__(self) -> None:
        for name, arr in self.arrays.items():
            if arr.ndim == 0 or arr.shape[0] != self.samples:
                raise ValueError(f"array {name!r} does not hold {self.samples} samples on axis 0")

    def batches(
        self, batch_size: int, start: int = 0, stop: int | None = None, *, drop_last: bool = False
    ) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts of ``batch_size`` consecutive samples from ``[start, stop)`` (views, no copies).

        The last batch is shorter unless ``drop_last``, which leaves it out.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.whole and batch_size != 1:
            raise ValueError(f"input(s) {sorted(self.whole)} hold whole feeds: fed one sample at a time")
        stop = self.samples if stop is None else min(stop, self.samples)
        for i in range(start, stop, batch_size):
            j = min(i + batch_size, stop)
            if drop_last and j - i < batch_size:
                return
            yield {k: (v[i, ...] if k in self.whole else v[i:j]) for k, v in self.arrays.items()}

    def feed_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each input's shape in the ORT run of one sample: a whole feed's own shape, else ``(1, *sample shape)``."""
        return {k: tuple(v.shape[1:]) if k in self.whole else (1, *v.shape[1:]) for k, v in self.arrays.items()}

    def take(self, indices: np.ndarray) -> CalibrationData:
        """The samples at ``indices`` (in that order) as their own CalibrationData (copies)."""
        arrays = {k: v[indices] for k, v in self.arrays.items()}
        return CalibrationData(self.source, len(indices), arrays, self.synthetic, self.whole)

    def subset(self, start: int, stop: int) -> CalibrationData:
        """Samples ``[start, stop)`` as their own CalibrationData (views of the same arrays)."""
        arrays = {k: v[start:stop] for k, v in self.arrays.items()}
        n = len(range(*slice(start, stop).indices(self.samples)))
        return CalibrationData(self.source, n, arrays, self.synthetic, self.whole)


def fixed_batch(specs: list[InputSpec]) -> int | None:
    """The model's batch size when axis 0 of its inputs is a fixed integer, else None."""
    fixed = {s.name: s.shape[0] for s in specs if s.ranked and s.shape and isinstance(s.shape[0], int)}
    if len(set(fixed.values())) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in fixed.items())
        raise BadDataError(
            f"inputs fix axis 0 to different sizes ({shown}); calibration reads axis 0 of every input as the "
            "sample axis, so it cannot feed this model"
        )
    return next(iter(fixed.values()), None)


def common_batch(specs: list[InputSpec]) -> int | None:
    """N when every input of rank >= 1 fixes axis 0 to the same N (a batch they all carry), else None: a fixed axis
    0 beside a dynamic one may be no batch at all (a recurrent state ``[layers, N, H]`` beside ``x [N, T, C]``)."""
    firsts = {s.shape[0] if s.ranked and s.shape else None for s in specs if not s.scalar}
    n = next(iter(firsts)) if len(firsts) == 1 else None
    return n if isinstance(n, int) and n > 0 else None


def batch_multiple(specs: list[InputSpec], data: CalibrationData) -> int | None:
    """The number of samples every ORT run must hold: None for whole-feed data (one feed per run, whatever the
    model's axis 0 says), else the model's fixed batch size (``fixed_batch``)."""
    return None if data.feedwise else fixed_batch(specs)


def choose_batch_size(
    specs: list[InputSpec], data: CalibrationData, *, max_bytes: int = BATCH_BYTES, max_batch: int = MAX_BATCH,
    sample_bytes: int = 0, run_bytes: int = RUN_BYTES,
) -> int:
    """Samples per ORT run: the model's fixed batch size if axis 0 is fixed (the remainder is then dropped by the
    caller), 1 for whole-feed data (scalar inputs among them), else as many samples as fit in ``max_bytes`` of
    inputs and, given ``sample_bytes`` (``activation_bytes``: the tensors one sample keeps alive at once inside
    the model), in ``run_bytes`` of those, clamped to ``[1, max_batch]`` and to the number of samples."""
    if data.feedwise:
        return 1
    fixed = fixed_batch(specs)
    if fixed is not None:
        return fixed
    per_sample = sum(arr[:1].nbytes for arr in data.arrays.values())
    size = max_bytes // max(per_sample, 1)
    if sample_bytes > 0:
        size = min(size, run_bytes // sample_bytes)
    return int(max(1, min(size, max_batch, data.samples)))


def tensor_bytes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Bytes of each tensor (graph inputs, node outputs) for inputs of ``shapes``, from ONNX shape inference on a
    copy that holds only the small initializers (the large ones become typed inputs: no copy of the weights);
    tensors of unknown size are left out (a lower bound where inference stops); {} when inference fails."""
    light = weightless(model)
    del light.graph.value_info[:]
    for vi in light.graph.input:
        if vi.name in shapes and vi.type.HasField("tensor_type"):
            vi.type.tensor_type.shape.Clear()
            for d in shapes[vi.name]:
                vi.type.tensor_type.shape.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # noqa: BLE001 - an estimate: the model was validated on load
        return {}
    size: dict[str, int] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is None or not tt.HasField("shape") or tt.elem_type == onnx.TensorProto.UNDEFINED:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
        size[vi.name] = math.prod(dims) * itemsize
    return size


def training_bytes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Estimated bytes one sample costs in a training step: every node output of one forward pass (``tensor_bytes``),
    as autograd may keep each of them for the backward pass (views and tensors it does not keep count too: an upper
    estimate), weights not counted; 0 when inference fails."""
    size = tensor_bytes(model, shapes)
    return sum(size.get(o, 0) for n in model.graph.node for o in n.output if o)


def activation_bytes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Estimated peak bytes of the tensors one ORT run keeps alive at once, for inputs of ``shapes`` (one sample:
    ``CalibrationData.feed_shapes``), weights not counted: the nodes run in graph order, each output is allocated
    when its node runs and freed after its last reader (graph outputs stay), so the peak is the largest sum of live
    tensors (ORT's planner reuses freed buffers the same way). Sizes: ``tensor_bytes``; 0 when inference fails."""
    g = model.graph
    size = tensor_bytes(model, shapes)
    if not size:
        return 0
    weights = {t.name for t in g.initializer}
    last: dict[str, int] = {}
    for i, node in enumerate(g.node):
        for name in node.input:
            last[name] = i
    kept = {o.name for o in g.output}
    live = sum(size.get(s.name, 0) for s in g.input if s.name not in weights)
    peak = live
    for i, node in enumerate(g.node):
        live += sum(size.get(o, 0) for o in node.output if o)
        peak = max(peak, live)
        for name in dict.fromkeys([*node.input, *node.output]):
            if name and name not in weights and name not in kept and last.get(name, -1) <= i:
                live -= size.get(name, 0)
    return int(peak)


def load_data(
    path: str | None,
    specs: list[InputSpec],
    *,
    samples: int | None = None,
    seed: int = 0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> CalibrationData:
    """Read calibration data from ``path`` (or make random data when ``path`` is None) and check it.

    samples: keep only the first ``samples`` samples (for random data: how many to make, default 64).
    input_shapes: full model shapes for inputs with dynamic axes (``--input-shape``); for data in batches axis 0
    is the sample axis, so its value is only checked when the model fixes it (random whole feeds take it as it is).
    Raises BadDataError with a one-line message.
    """
    if samples is not None and samples < 1:
        raise BadArgumentError(f"--samples {samples}: give a positive number of samples")
    if not specs:
        raise UnsupportedModelError("the model has no inputs to feed; there is nothing to calibrate")
    shapes = _resolve_shapes(specs, input_shapes or {})
    if path is None:
        source = "random"
        arrays = _random_arrays(specs, shapes, samples, seed)
        log.warning(
            "no calibration data given: using %d random samples; entropies of random data do not describe real "
            "inputs, so give real samples with --data",
            next(iter(arrays.values())).shape[0],
        )
    else:
        source = str(path)
        arrays = _read(Path(path), specs, samples)
    arrays, whole = _check(arrays, specs, shapes, source, samples)
    n = next(iter(arrays.values())).shape[0]
    return CalibrationData(source, n, arrays, synthetic=path is None, whole=whole)


def load_feeds(
    feeds: Iterable[Mapping[str, object]] | Mapping[str, object] | object,
    specs: list[InputSpec],
    *,
    samples: int | None = None,
) -> CalibrationData:
    """Calibration data handed over in memory, checked against the model's inputs.

    feeds: an iterable of ``{input name: array}`` dicts, one whole feed each (as ``session.run`` takes it), or an
    object whose ``get_next()`` returns such dicts and then None (ONNX Runtime quantization's
    ``CalibrationDataReader``), so existing calibration code plugs in; or one dict of arrays laid out like an
    ``.npz`` (samples on axis 0, module doc). At most ``samples`` feeds are read.

    The feeds are read once and kept: each array is copied as it arrives (a reader may refill one buffer), then
    stacked into one whole-feed array per input (peak memory about twice the feeds, for a moment); the tool makes
    several passes over them. Every feed of an input must have the shape and type of the first, except the last,
    which is left out with a warning when its shapes differ (the shorter last batch of a batching reader). The first
    feed is checked against the model before the rest is read.
    """
    if samples is not None and samples < 1:
        raise BadArgumentError(f"--samples {samples}: give a positive number of samples")
    if isinstance(feeds, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in feeds.items()}
        arrays, whole = _check(arrays, specs, _resolve_shapes(specs, {}), "<arrays>", samples)
        return CalibrationData("<arrays>", next(iter(arrays.values())).shape[0], arrays, whole=whole)
    if callable(getattr(feeds, "get_next", None)):
        reader = feeds
        stream: Iterator[object] = iter(lambda: reader.get_next(), None)  # type: ignore[attr-defined]
    elif isinstance(feeds, Iterable) and not isinstance(feeds, (str, bytes)):
        stream = iter(feeds)
    else:
        raise BadDataError(
            f"calibration data of type {type(feeds).__name__}: give a path, an iterable of {{input name: array}} "
            "dicts, a CalibrationDataReader (get_next()) or a dict of arrays"
        )
    shapes = _resolve_shapes(specs, {})
    parts: dict[str, list[np.ndarray]] = {}
    odd: tuple[int, str] | None = None  # a feed unlike the first: left out if it is the last
    count = 0
    for i, feed in enumerate(stream):
        if not isinstance(feed, Mapping):
            raise BadDataError(f"feed {i} is a {type(feed).__name__}, not a dict of input name -> array")
        if odd is not None:
            raise BadDataError(
                f"feed {odd[0]} {odd[1]}; every feed must have the shapes of feed 0 (only the last may differ: it "
                "is then left out)"
            )
        arrays = {str(k): np.array(v) for k, v in feed.items()}  # copies
        if not parts:
            _check({k: v[None] for k, v in arrays.items()}, specs, shapes, "feed 0", None, feeds_only=True)
            parts = {k: [v] for k, v in arrays.items()}
        else:
            kind, unlike = _unlike(arrays, {k: v[0] for k, v in parts.items()})
            if kind == "inputs":
                raise BadDataError(f"feed {i} {unlike}; every feed must hold the inputs of feed 0")
            if kind == "dtype":
                raise BadDataError(f"feed {i} {unlike}; give every feed the types of feed 0")
            if kind == "shape":
                odd = (i, unlike)
                continue
            for k, v in arrays.items():
                parts[k].append(v)
        count += 1
        if samples is not None and count >= samples:
            break
    if not parts:
        raise BadDataError("the calibration feeds are empty; give at least one feed")
    if odd is not None:
        log.warning("feed %d %s: left out (a shorter last batch?); %d feed(s) kept", odd[0], odd[1], count)
    source = f"<{count} feeds>"
    stacked = {k: _stack(v) for k, v in parts.items()}
    del parts
    stacked, whole = _check(stacked, specs, shapes, source, None, feeds_only=True)
    return CalibrationData(source, count, stacked, whole=whole)


def _unlike(feed: dict[str, np.ndarray], first: dict[str, np.ndarray]) -> tuple[str, str]:
    """How ``feed`` differs from the first feed: ("inputs" | "dtype" | "shape", the rest of a sentence "feed i ..."),
    or ("", "") when it does not."""
    missing = [k for k in first if k not in feed]
    if missing:
        return "inputs", f"has no input {missing[0]!r}"
    extra = [k for k in feed if k not in first]
    if extra:
        return "inputs", f"holds input {extra[0]!r}, which feed 0 does not"
    for k, v in feed.items():
        if v.dtype != first[k].dtype:
            return "dtype", f"gives input {k!r} as {v.dtype}, feed 0 as {first[k].dtype}"
    for k, v in feed.items():
        if v.shape != first[k].shape:
            return "shape", f"gives input {k!r} the shape {tuple(v.shape)}, feed 0 {tuple(first[k].shape)}"
    return "", ""


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    """``np.stack(parts)``, releasing each part once copied (peak: the result and the parts not yet copied)."""
    out = np.empty((len(parts), *parts[0].shape), parts[0].dtype)
    for i in range(len(parts)):
        out[i] = parts[i]
        parts[i] = None  # type: ignore[call-overload]
    return out


# --- shapes -------------------------------------------------------------------------------------------------------


def _resolve_shapes(specs: list[InputSpec], given: dict[str, tuple[int, ...]]) -> dict[str, tuple[Dim, ...] | None]:
    """Each input's shape with the dynamic axes filled from ``given`` (None: rank unknown and not given)."""
    names = [s.name for s in specs]
    unknown = [k for k in given if k not in names]
    if unknown:
        raise BadDataError(
            f"--input-shape names unknown input(s) {', '.join(map(repr, unknown))}; the model's inputs are: "
            f"{', '.join(names)}"
        )
    shapes: dict[str, tuple[Dim, ...] | None] = {}
    for s in specs:
        user = given.get(s.name)
        if user is None:
            shapes[s.name] = s.shape if s.ranked else None
            continue
        if s.ranked and len(user) != len(s.shape):
            raise BadDataError(
                f"--input-shape {s.name}: gives {len(user)} dims but the model's input has rank {len(s.shape)} "
                f"{s.show()}"
            )
        if s.ranked:
            for axis, (want, got) in enumerate(zip(s.shape, user)):
                if isinstance(want, int) and want != got:
                    raise BadDataError(
                        f"--input-shape {s.name}: axis {axis} is {got} but the model fixes it to {want} {s.show()}"
                    )
        shapes[s.name] = tuple(user)
    return shapes


def _show(shape: tuple[Dim, ...]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


# --- reading ------------------------------------------------------------------------------------------------------


def _read(path: Path, specs: list[InputSpec], limit: int | None) -> dict[str, np.ndarray]:
    if not path.exists():
        raise BadDataError(f"{path}: no such file or folder; give an .npz, an .npy or a folder of them")
    if path.is_dir():
        return _read_folder(path, specs, limit)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path)
    if suffix == ".npy":
        return {_single_input(specs, path): _read_npy(path)}
    raise BadDataError(f"{path}: unknown data format {suffix or '(no suffix)'!r}; give an .npz, an .npy or a folder")


def _single_input(specs: list[InputSpec], path: Path) -> str:
    if len(specs) != 1:
        raise BadDataError(
            f"{path}: an .npy file holds one array but the model has {len(specs)} inputs "
            f"({', '.join(s.name for s in specs)}); give an .npz keyed by input name"
        )
    return specs[0].name


def _load_error(path: Path, exc: Exception, kind: str) -> BadDataError:
    text = str(exc).strip().splitlines()
    reason = text[0][:200] if text else type(exc).__name__
    return BadDataError(f"{path}: cannot read it as {kind} ({reason}); is the file complete and written by numpy?")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise BadDataError(f"{path}: not an .npz archive (no zip header); write it with numpy.savez")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except _LOAD_ERRORS as exc:
        raise _load_error(path, exc, ".npz") from exc
    if not arrays:
        raise BadDataError(f"{path}: the .npz archive is empty; save one array per model input")
    return arrays


def _read_npy(path: Path) -> np.ndarray:
    """Memory-mapped when possible: batches then read only their own samples from disk."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except _LOAD_ERRORS as exc:
        raise _load_error(path, exc, ".npy") from exc
    if not isinstance(arr, np.ndarray):
        raise BadDataError(f"{path}: holds an archive, not one array; name it .npz")
    return arr


def _read_folder(path: Path, specs: list[InputSpec], limit: int | None) -> dict[str, np.ndarray]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".npz", ".npy"))
    if not files:
        raise BadDataError(f"{path}: the folder holds no .npz or .npy files")
    kinds = {p.suffix.lower() for p in files}
    if len(kinds) > 1:
        raise BadDataError(f"{path}: the folder mixes .npz and .npy files; use one kind")
    chunks: list[dict[str, np.ndarray]] = []
    have = 0
    for p in files:
        if limit is not None and have >= limit:
            break
        chunk = _read_npz(p) if p.suffix.lower() == ".npz" else {_single_input(specs, p): _read_npy(p)}
        if chunks and set(chunk) != set(chunks[0]):
            raise BadDataError(
                f"{p}: holds inputs {sorted(chunk)} but {files[0].name} holds {sorted(chunks[0])}; every chunk "
                "must hold the same inputs"
            )
        for name, arr in chunk.items():
            if arr.ndim == 0:
                raise BadDataError(f"{p}: input {name!r} is a 0-d array; put the samples on axis 0")
            first = chunks[0][name] if chunks else arr
            if arr.shape[1:] != first.shape[1:]:
                raise BadDataError(
                    f"{p}: input {name!r} has sample shape {arr.shape[1:]} but {files[0].name} has "
                    f"{first.shape[1:]}; every chunk must agree past axis 0"
                )
        chunks.append(chunk)
        have += min(arr.shape[0] for arr in chunk.values())
    log.debug("read %d chunk file(s) from %s", len(chunks), path)
    if len(chunks) == 1:
        return chunks[0]
    return {name: np.concatenate([c[name] for c in chunks], axis=0) for name in chunks[0]}


# --- random -------------------------------------------------------------------------------------------------------


def _random_arrays(
    specs: list[InputSpec], shapes: dict[str, tuple[Dim, ...] | None], samples: int | None, seed: int
) -> dict[str, np.ndarray]:
    """Standard-normal floats, integers in [0, 10), fair booleans. In batches (samples on the model's axis 0) unless
    ``_random_feeds`` says the model cannot take them; then whole feeds, each of the full input shape."""
    for s in specs:
        if shapes[s.name] is None:
            raise BadDataError(
                f"input {s.name!r} has no known rank; pass --input-shape {s.name}:d0,d1,... to make random data"
            )
    feeds = _random_feeds(specs)
    fixed = None if feeds else fixed_batch(specs)
    if samples is None:
        samples = DEFAULT_RANDOM_SAMPLES
        if fixed:  # whole batches only
            samples = max(fixed, samples // fixed * fixed)
    sizes = _symbol_sizes(specs, shapes) if feeds else {}
    rng = np.random.default_rng(seed)
    arrays = {}
    for s in specs:
        shape = shapes[s.name]
        assert shape is not None
        if feeds:
            # a named dim takes its size from --input-shape of any input; an unnamed dynamic axis 0 (a batch) is 1
            shape = tuple(sizes.get(d) if isinstance(d, str) else 1 if d is None and axis == 0 else d
                          for axis, d in enumerate(shape))
        dynamic = [axis for axis, d in enumerate(shape) if (feeds or axis > 0) and not isinstance(d, int)]
        if dynamic:
            whole = " (its whole shape: random data for this model is whole feeds)" if feeds else ""
            raise BadDataError(
                f"input {s.name!r} {_show(shapes[s.name])} has dynamic axes {dynamic}; pass --input-shape "
                f"{s.name}:d0,d1,...{whole} (or give calibration data)"
            )
        full = (samples, *shape) if feeds else (samples, *shape[1:])
        kind = s.dtype.kind
        if kind == "f" and s.dtype.itemsize in (2, 4, 8):
            arrays[s.name] = rng.standard_normal(full, dtype=np.float64 if s.dtype.itemsize == 8 else np.float32)
            arrays[s.name] = arrays[s.name].astype(s.dtype, copy=False)
        elif kind in "iu":
            high = min(_RANDOM_INT_HIGH, int(np.iinfo(s.dtype).max) + 1)
            arrays[s.name] = rng.integers(0, high, size=full, dtype=s.dtype)
        elif kind == "b":
            arrays[s.name] = rng.random(full) < 0.5
        else:
            raise BadDataError(
                f"input {s.name!r}: cannot make random data of type {s.dtype}; give calibration data with --data"
            )
    return arrays


def _random_feeds(specs: list[InputSpec]) -> bool:
    """Whether random data must be whole feeds because samples on every input's axis 0 cannot feed the model: a
    scalar input (the data is then fed one sample at a time, and an input that fixes axis 0 above 1 would get 1),
    inputs that fix axis 0 to different sizes, or a named dim on axis 0 of one input and on a later axis of another
    (a recurrent model's ``x [N, T, C]`` beside ``state [layers, N, H]``)."""
    ranked = [s for s in specs if s.ranked]
    if any(s.scalar for s in ranked):
        return True
    if len({s.shape[0] for s in ranked if isinstance(s.shape[0], int)}) > 1:
        return True
    first = {s.shape[0] for s in ranked if isinstance(s.shape[0], str)}
    return any(d in first for s in ranked for d in s.shape[1:])


def _symbol_sizes(specs: list[InputSpec], shapes: dict[str, tuple[Dim, ...] | None]) -> dict[str, int]:
    """The size of every ``dim_param`` name: from the inputs that ``--input-shape`` made concrete, else 1 for a name
    on some input's axis 0 (the batch of one feed)."""
    sizes: dict[str, int] = {}
    for s in specs:
        for want, got in zip(s.shape, shapes[s.name] or ()):
            if isinstance(want, str) and isinstance(got, int):
                sizes.setdefault(want, got)
    for s in specs:
        if s.ranked and s.shape and isinstance(s.shape[0], str):
            sizes.setdefault(s.shape[0], 1)
    return sizes


# --- checking -----------------------------------------------------------------------------------------------------


def _check(
    arrays: dict[str, np.ndarray],
    specs: list[InputSpec],
    shapes: dict[str, tuple[Dim, ...] | None],
    source: str,
    limit: int | None,
    *,
    feeds_only: bool = False,
) -> tuple[dict[str, np.ndarray], frozenset[str]]:
    """The arrays checked against the inputs (same-kind casts applied) and the names of those holding whole feeds
    (module doc; all of them with ``feeds_only``, whose messages then speak of one feed's shape).

    Every model axis is checked as ONE ORT run sees it: a whole feed as it is; samples on axis 0 one at a time when
    any input holds whole feeds (the model's axis 0 is then 1), else in batches (axis 0 unchecked but for a fixed
    batch size). Only equal ``dim_param`` names must agree; unnamed dynamic dims never do.
    """
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    keyed = "every feed must hold every input" if feeds_only else "key the arrays by input name"
    if missing:
        raise BadDataError(
            f"{source}: no data for input(s) {', '.join(map(repr, missing))}; the model's inputs are: "
            f"{', '.join(names)} ({keyed})"
        )
    extra = [k for k in arrays if k not in names]
    if extra:
        raise BadDataError(
            f"{source}: data for unknown input(s) {', '.join(map(repr, extra))}; the model's inputs are: "
            f"{', '.join(names)}"
        )
    for s in specs:
        if arrays[s.name].dtype.kind not in "biuf":
            raise BadDataError(f"{source}: input {s.name!r} is an array of {arrays[s.name].dtype}; give numbers")
    whole = frozenset(s.name for s in specs if _check_shape(arrays[s.name], s, shapes[s.name], source, feeds_only))
    symbols: dict[str, tuple[int, str]] = {}
    out: dict[str, np.ndarray] = {}
    for s in specs:
        arr = arrays[s.name]
        if limit is not None and limit < arr.shape[0]:
            # a copy lets the rest of an in-memory array go; a memory-mapped one reads only what is used
            arr = arr[:limit] if isinstance(arr, np.memmap) else arr[:limit].copy()
        shape = shapes[s.name]
        if shape is not None:
            _check_dims(arr, s, shape, whole, symbols, source, feeds_only)
        out[s.name] = _convert(arr, s, source)
    counts = {k: v.shape[0] for k, v in out.items()}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise BadDataError(
            f"{source}: inputs have different sample counts ({shown}); give every input the same number of samples "
            "on axis 0"
        )
    n = next(iter(counts.values()))
    fixed = None if whole else fixed_batch(specs)
    if fixed is not None and n < fixed:
        raise BadDataError(
            f"{source}: {n} sample(s), but the model fixes its batch axis to {fixed}; give at least {fixed} samples"
        )
    return out, whole


def _check_dims(arr: np.ndarray, s: InputSpec, shape: tuple[Dim, ...], whole: frozenset[str],
                symbols: dict[str, tuple[int, str]], source: str, feeds_only: bool) -> None:
    """Check ``arr``'s axes against the model's ``shape`` as one ORT run sees them (``_check``); ``symbols`` collects
    the size of every ``dim_param`` name and the input that set it."""
    feeds = s.name in whole
    run: tuple[int | None, ...] = tuple(arr.shape[1:]) if feeds else (1 if whole else None, *arr.shape[1:])
    for axis, (want, got) in enumerate(zip(shape, run)):
        if got is None or want is None:
            continue
        if isinstance(want, int) and want != got:
            if not feeds and axis == 0:
                other = min(whole)
                raise BadDataError(
                    f"{source}: input {s.name!r} holds samples on the model's axis 0, which the model fixes to {want} "
                    f"{_show(shape)}, but {other!r} holds whole feeds, so every ORT run takes one sample; give "
                    f"{s.name!r} whole feeds too (one more axis than the model input: [S,{_show(shape)[1:]})"
                )
            if feeds_only:
                raise BadDataError(
                    f"{source}: input {s.name!r}: a feed of shape {tuple(run)} but the model expects {_show(shape)}: "
                    f"axis {axis} is {got}, expected {want}"
                )
            layout = "axis 0 = samples, then one whole feed" if feeds else "axis 0 = samples"
            raise BadDataError(
                f"{source}: input {s.name!r} has shape {tuple(arr.shape)} but the model expects "
                f"{_show(shape)} ({layout}): model axis {axis} is {got}, expected {want}"
            )
        if isinstance(want, str):
            size, other = symbols.setdefault(want, (got, s.name))
            if size != got:
                one = "" if feeds_only or not whole else " in one ORT run (one sample: whole feeds are fed one at a time)"
                raise BadDataError(
                    f"{source}: inputs {other!r} and {s.name!r} disagree on dimension {want!r} "
                    f"({size} vs {got}{one}); the model needs them equal"
                )


def _check_shape(arr: np.ndarray, s: InputSpec, shape: tuple[Dim, ...] | None, source: str,
                 feeds_only: bool = False) -> bool:
    """Check the rank of ``arr`` for input ``s``; True when it holds whole feeds (one axis more than the model's
    input; a scalar's 1-D array), False for batches (the model's rank, samples on the model's axis 0). An input of
    unknown rank takes batches (whole feeds with ``feeds_only``)."""
    if arr.ndim == 0:
        raise BadDataError(f"{source}: input {s.name!r} is a 0-d array; put the samples on axis 0")
    if arr.shape[0] == 0:
        raise BadDataError(f"{source}: input {s.name!r} has 0 samples; give at least one")
    if shape is None:
        return feeds_only
    rank = len(shape)
    if arr.ndim == rank + 1:
        return True
    if arr.ndim == rank and rank > 0 and not feeds_only:
        return False
    if feeds_only:
        raise BadDataError(
            f"{source}: input {s.name!r}: a feed of shape {tuple(arr.shape[1:])} (rank {arr.ndim - 1}) but the "
            f"model's input is {_show(shape)} (rank {rank})"
        )
    hint = " (a scalar input takes one value per sample: a 1-D array)" if s.scalar else ""
    if arr.ndim < rank:
        hint = "; add the sample axis in front (x[None] for one sample)"
    layouts = (f"rank {rank + 1} (axis 0 = samples, each one whole feed)" if rank == 0 else
               f"rank {rank} (samples on the model's axis 0) or {rank + 1} (axis 0 = samples, each one whole feed)")
    raise BadDataError(
        f"{source}: input {s.name!r} has rank {arr.ndim} {tuple(arr.shape)} but the model's input is "
        f"{_show(shape)}, so the data needs {layouts}{hint}"
    )


def _convert(arr: np.ndarray, s: InputSpec, source: str) -> np.ndarray:
    """Same-kind casts only: any float to the model's float type, any int to its int type (range checked)."""
    have, want = arr.dtype, s.dtype
    if have != want:
        if have.kind == "f" and want.kind == "f":
            log.debug("%s: casting input %r from %s to %s", source, s.name, have, want)
            with np.errstate(over="ignore"):  # overflow becomes Inf, reported below
                arr = arr.astype(want)
        elif have.kind in "iu" and want.kind in "iu":
            info = np.iinfo(want)
            if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
                raise BadDataError(
                    f"{source}: input {s.name!r} holds values outside the range of {want}, the model's type"
                )
            log.debug("%s: casting input %r from %s to %s", source, s.name, have, want)
            arr = arr.astype(want)
        else:
            raise BadDataError(
                f"{source}: input {s.name!r} is {have} but the model expects {want}; convert it "
                f"(x.astype(np.{want.name}))"
            )
    if want.kind == "f" and not _all_finite(arr):
        cast = f" after casting to {want}" if have != want else ""
        raise BadDataError(f"{source}: input {s.name!r} holds NaN or Inf{cast}; clean the data")
    return arr


def _all_finite(arr: np.ndarray, chunk_bytes: int = 64 * 2**20) -> bool:
    """np.isfinite over chunks of samples, so a large (memory-mapped) array is never doubled in memory."""
    step = max(1, chunk_bytes // max(arr[:1].nbytes, 1))
    return all(bool(np.isfinite(arr[i : i + step]).all()) for i in range(0, arr.shape[0], step))
