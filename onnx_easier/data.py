"""Calibration data: read it (``.npz``, ``.npy``, a folder of them, or random), check it against the model's inputs,
and hand it out batch by batch as ORT feed dicts.

Layout convention: axis 0 of every array is the *sample* axis and stands for the model's axis 0 (the batch
axis); the other axes must match the model's input shape. ``x.npz`` holds one array per input name,
``x.npy`` one array for a single-input model, a folder holds chunks of samples (``.npz`` files keyed like above,
or ``.npy`` files for a single-input model) concatenated in sorted file-name order (so zero-pad the numbers:
``part_002.npz`` sorts before ``part_010.npz``). A rank-0 (scalar) input takes a 1-D array, one value per sample,
and is fed one sample at a time.

When the model fixes axis 0 to ``N``, batches hold exactly ``N`` samples; otherwise the batch size is chosen
so that one batch of inputs is about 16 MB.
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnx_easier.errors import BadArgumentError, BadDataError, UnsupportedModelError

log = logging.getLogger(__name__)

DEFAULT_RANDOM_SAMPLES = 64
BATCH_BYTES = 16 * 2**20
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
    if d.HasField("dim_value"):
        return int(d.dim_value)
    return d.dim_param or None


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
    scalars: names of rank-0 inputs; their arrays are 1-D and they are fed one sample at a time.
    """

    source: str
    samples: int
    arrays: dict[str, np.ndarray]
    synthetic: bool = False
    scalars: frozenset[str] = field(default_factory=frozenset)

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
        if self.scalars and batch_size != 1:
            raise ValueError(f"scalar input(s) {sorted(self.scalars)} can only be fed one sample at a time")
        stop = self.samples if stop is None else min(stop, self.samples)
        for i in range(start, stop, batch_size):
            j = min(i + batch_size, stop)
            if drop_last and j - i < batch_size:
                return
            yield {k: (v[i, ...] if k in self.scalars else v[i:j]) for k, v in self.arrays.items()}

    def take(self, indices: np.ndarray) -> CalibrationData:
        """The samples at ``indices`` (in that order) as their own CalibrationData (copies)."""
        arrays = {k: v[indices] for k, v in self.arrays.items()}
        return CalibrationData(self.source, len(indices), arrays, self.synthetic, self.scalars)

    def subset(self, start: int, stop: int) -> CalibrationData:
        """Samples ``[start, stop)`` as their own CalibrationData (views of the same arrays)."""
        arrays = {k: v[start:stop] for k, v in self.arrays.items()}
        n = len(range(*slice(start, stop).indices(self.samples)))
        return CalibrationData(self.source, n, arrays, self.synthetic, self.scalars)


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


def choose_batch_size(
    specs: list[InputSpec], data: CalibrationData, *, max_bytes: int = BATCH_BYTES, max_batch: int = MAX_BATCH
) -> int:
    """Samples per ORT run: the model's fixed batch size if axis 0 is fixed (the remainder is then dropped by the
    caller), 1 for models with scalar inputs, else as many samples as fit in ``max_bytes`` of inputs, clamped to
    ``[1, max_batch]`` and to the number of samples."""
    fixed = fixed_batch(specs)
    if any(s.scalar for s in specs):
        if fixed not in (None, 1):
            raise BadDataError(
                f"the model has scalar inputs and a batch axis fixed to {fixed}; calibration cannot batch it"
            )
        return 1
    if fixed is not None:
        return fixed
    per_sample = sum(arr[:1].nbytes for arr in data.arrays.values())
    size = max_bytes // max(per_sample, 1)
    return int(max(1, min(size, max_batch, data.samples)))


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
    input_shapes: full model shapes for inputs with dynamic axes (``--input-shape``); axis 0 is the sample axis,
    so its value is only checked when the model fixes it. Raises BadDataError with a one-line message.
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
    arrays = _check(arrays, specs, shapes, source, samples)
    n = next(iter(arrays.values())).shape[0]
    scalars = frozenset(s.name for s in specs if s.scalar)
    return CalibrationData(source, n, arrays, synthetic=path is None, scalars=scalars)


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
    fixed = fixed_batch(specs)
    if samples is None:
        samples = DEFAULT_RANDOM_SAMPLES
        if fixed:  # whole batches only
            samples = max(fixed, samples // fixed * fixed)
    rng = np.random.default_rng(seed)
    arrays = {}
    for s in specs:
        shape = shapes[s.name]
        if shape is None:
            raise BadDataError(
                f"input {s.name!r} has no known rank; pass --input-shape {s.name}:d0,d1,... to make random data"
            )
        dynamic = [axis for axis, d in enumerate(shape) if axis > 0 and not isinstance(d, int)]
        if dynamic:
            raise BadDataError(
                f"input {s.name!r} {_show(shape)} has dynamic axes {dynamic}; pass --input-shape "
                f"{s.name}:d0,d1,... (or give calibration data)"
            )
        full = (samples, *shape[1:])
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


# --- checking -----------------------------------------------------------------------------------------------------


def _check(
    arrays: dict[str, np.ndarray],
    specs: list[InputSpec],
    shapes: dict[str, tuple[Dim, ...] | None],
    source: str,
    limit: int | None,
) -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise BadDataError(
            f"{source}: no data for input(s) {', '.join(map(repr, missing))}; the model's inputs are: "
            f"{', '.join(names)} (key the arrays by input name)"
        )
    extra = [k for k in arrays if k not in names]
    if extra:
        raise BadDataError(
            f"{source}: data for unknown input(s) {', '.join(map(repr, extra))}; the model's inputs are: "
            f"{', '.join(names)}"
        )
    out: dict[str, np.ndarray] = {}
    symbols: dict[str, tuple[int, str]] = {}
    for s in specs:
        arr = arrays[s.name]
        if arr.dtype.kind not in "biuf":
            raise BadDataError(f"{source}: input {s.name!r} is an array of {arr.dtype}; give numbers")
        shape = shapes[s.name]
        _check_shape(arr, s, shape, source)
        if limit is not None and limit < arr.shape[0]:
            # a copy lets the rest of an in-memory array go; a memory-mapped one reads only what is used
            arr = arr[:limit] if isinstance(arr, np.memmap) else arr[:limit].copy()
        if shape is not None:
            for axis, (want, got) in enumerate(zip(shape, arr.shape)):
                if axis == 0:
                    continue
                if isinstance(want, int) and want != got:
                    raise BadDataError(
                        f"{source}: input {s.name!r} has shape {tuple(arr.shape)} but the model expects "
                        f"{_show(shape)} (axis 0 = samples): axis {axis} is {got}, expected {want}"
                    )
                if isinstance(want, str):
                    size, other = symbols.setdefault(want, (got, s.name))
                    if size != got:
                        raise BadDataError(
                            f"{source}: inputs {other!r} and {s.name!r} disagree on dimension {want!r} "
                            f"({size} vs {got}); the model needs them equal"
                        )
        out[s.name] = _convert(arr, s, source)
    counts = {k: v.shape[0] for k, v in out.items()}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise BadDataError(
            f"{source}: inputs have different sample counts ({shown}); give every input the same number of samples "
            "on axis 0"
        )
    n = next(iter(counts.values()))
    fixed = fixed_batch(specs)
    if fixed is not None and n < fixed:
        raise BadDataError(
            f"{source}: {n} sample(s), but the model fixes its batch axis to {fixed}; give at least {fixed} samples"
        )
    return out


def _check_shape(arr: np.ndarray, s: InputSpec, shape: tuple[Dim, ...] | None, source: str) -> None:
    want_rank = None if shape is None else max(len(shape), 1)
    if want_rank is not None and arr.ndim != want_rank:
        hint = " (a scalar input takes one value per sample: a 1-D array)" if s.scalar else ""
        if arr.ndim == want_rank - 1:
            hint = "; add the sample axis in front (x[None] for one sample)"
        raise BadDataError(
            f"{source}: input {s.name!r} has rank {arr.ndim} {tuple(arr.shape)} but the model's input is "
            f"{_show(shape)}, so the data needs rank {want_rank} with the samples on axis 0{hint}"
        )
    if arr.ndim == 0:
        raise BadDataError(f"{source}: input {s.name!r} is a 0-d array; put the samples on axis 0")
    if arr.shape[0] == 0:
        raise BadDataError(f"{source}: input {s.name!r} has 0 samples; give at least one")


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
