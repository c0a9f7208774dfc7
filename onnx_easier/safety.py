"""Fail-safe rewrites: check a rewritten graph, and find the rewrite to roll back when the check fails.

A rewrite that makes a model invalid or changes what it computes is a bug in that rewrite, but the user must never
pay for it. ``Guard`` holds what a check needs (the model before the rewrites, one calibration batch, the
exactness bound) and answers two questions for ``fusion.fuse``:

- ``failure(graph)``: why the rewritten graph is broken, or None. In order: the full ``onnx.checker``; strict,
  typed shape inference (only when the reference passes it: a bf16 Conv has no ONNX type inference to satisfy);
  an ONNX Runtime session; its outputs on the batch against the reference's (``output_error`` above ``rtol``).
- ``deviations(before, after, tensors)``: for tensors both graphs compute, the relative error of ``after``'s value
  against ``before``'s on the batch (the output of each fused layer is an original tensor name, so this says which
  fused layer went wrong first).

The exactness bound (``exactness_bound``). A fusion reorders float arithmetic: a fused layer rounds once where the
chain it replaces rounded after every element, so its output differs by a few units of the last place (unit
roundoff ``u``: 2^-24 in float32) times the conditioning of the dot products. That difference then propagates
through the rest of the network like any other perturbation of that tensor. The bound is therefore
``max(base, 16 * e)``, where ``base`` is 1e-4 in float32/64 (the rounding of the lowest-precision float type
otherwise) and ``e`` is the output change the model itself shows when every float input is perturbed by a
relative ``2^-20 = 16u`` with random signs: a model that amplifies rounding (long chains, attention over large
logits) gets a bound in proportion, a well-conditioned one keeps 1e-4. The factor 16 stands for the difference
between one perturbation at the input and one at every fused layer (a few ulps each, sqrt(K) growth in length-K
dot products). It is measured on the same batch the checks use.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_easier.errors import OnnxEasierError
from onnx_easier.model_io import check_model, make_session, to_model
from onnx_easier.shapes import augment, strict_failure

log = logging.getLogger(__name__)

BASE_RTOL = 1e-4
PERTURBATION = 2.0**-20
CONDITION_FACTOR = 16.0


def output_error(ref: list, cand: list) -> float:
    """max over outputs of max|r - c| / max(1, max|r|) in float64; inf where shapes differ or values are not
    finite in one but not the other."""
    worst = 0.0
    for u, v in zip(ref, cand):
        u64, v64 = _float64(u), _float64(v)
        if u64 is None or v64 is None:
            if not _same(u, v):
                return float("inf")
            continue
        if u64.shape != v64.shape:
            return float("inf")
        scale = max(1.0, float(np.abs(u64[np.isfinite(u64)]).max(initial=0.0)))
        diff = np.abs(u64 - v64)
        both = ~np.isfinite(u64) & ~np.isfinite(v64) & (np.isnan(u64) == np.isnan(v64))
        diff = np.where(both & ((u64 == v64) | np.isnan(u64)), 0.0, diff)
        worst = max(worst, float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0)) / scale)
    return worst


def _float64(value: object) -> np.ndarray | None:
    arr = _as_array(value)
    if arr.dtype == object:
        return None
    return arr.astype(np.float64)


def _as_array(value: object) -> np.ndarray:
    """ORT outputs as arrays: a sequence of maps (skl2onnx's ZipMap) as [N, K] with sorted keys."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        keys = sorted(value[0])
        return np.array([[d[k] for k in keys] for d in value], dtype=np.float64)
    return np.asarray(value)


def _same(u: object, v: object) -> bool:
    try:
        return bool(np.array_equal(np.asarray(u), np.asarray(v)))
    except (TypeError, ValueError):
        return u == v


def base_rtol(model: onnx.ModelProto) -> float:
    """1e-4 in float32/64; rounding of the lowest-precision float type the model computes in otherwise (4 ulps
    at 1: float16 3.9e-3, bfloat16 3.1e-2)."""
    types = {t.data_type for t in model.graph.initializer}
    types |= {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]
              if v.type.HasField("tensor_type")}
    if onnx.TensorProto.BFLOAT16 in types:
        return 4 * 2.0**-7
    if onnx.TensorProto.FLOAT16 in types:
        return 4 * 2.0**-10
    return BASE_RTOL


def perturbed(feeds: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """``feeds`` with every float input multiplied by ``1 + s * PERTURBATION`` (``s`` random signs); other
    inputs (token ids, masks, state of integer type) unchanged."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, arr in feeds.items():
        a = np.asarray(arr)
        if np.issubdtype(a.dtype, np.floating) and a.dtype.itemsize >= 4:
            signs = rng.choice(np.array([-1.0, 1.0]), size=a.shape)
            a = (a.astype(np.float64) * (1.0 + signs * PERTURBATION)).astype(a.dtype)
        out[name] = a
    return out


def exactness_bound(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """``(bound, e)``: the relative error an exact rewrite of ``model`` may show on ``feeds`` (module doc) and the
    measured rounding sensitivity ``e``. ``e`` is 0 when the model cannot be run here (the base bound stays)."""
    base = base_rtol(model)
    if not feeds:
        return base, 0.0
    try:
        session = make_session(model)
        names = [o.name for o in session.get_outputs()]
        e = max(output_error(session.run(names, f), session.run(names, perturbed(f))) for f in feeds)
    except Exception as exc:  # noqa: BLE001 - no measurement only means the base bound
        log.debug("rounding sensitivity not measured: %s", exc)
        return base, 0.0
    if not np.isfinite(e):
        return base, 0.0
    return max(base, CONDITION_FACTOR * e), float(e)


# how checker, shape inference and ORT name the node they failed on
_NODE_NAMES = (re.compile(r"node name: ([^\s)]+)"), re.compile(r"Name:'([^']+)'"), re.compile(r"Node \(([^)]+)\)"))


@dataclass(frozen=True)
class CheckData:
    """The batch and bound every guard of one run uses (``guard`` makes one for a given reference)."""

    feeds: list[dict[str, np.ndarray]]
    rtol: float

    def guard(self, reference: onnx.ModelProto, template: onnx.ModelProto) -> Guard:
        return Guard(reference, template, self.feeds, self.rtol)


@dataclass
class Failure:
    """Why a rewritten graph was refused: ``reason`` in words; ``node`` when the message names one."""

    reason: str
    node: str | None = None


@dataclass
class Guard:
    """What ``fusion.fuse`` needs to check its rewrites (module doc).

    reference: the model the rewrites started from (the fused result must compute the same).
    template:  the model whose ir_version, opsets and functions a checked graph is exported with.
    feeds:     one or a few calibration batches.
    rtol:      the exactness bound (``exactness_bound``).
    """

    reference: onnx.ModelProto
    template: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]]
    rtol: float
    checks: int = 0
    _expected: list[list] | None = field(default=None, repr=False)
    _strict: bool | None = field(default=None, repr=False)

    def expected(self) -> list[list]:
        if self._expected is None:
            session = make_session(self.reference)
            names = [o.name for o in session.get_outputs()]
            self._expected = [session.run(names, f) for f in self.feeds]
        return self._expected

    def strict(self) -> bool:
        """Whether the reference passes strict shape inference (then every rewrite must keep it passing)."""
        if self._strict is None:
            self._strict = strict_failure(self.reference) is None
        return self._strict

    def model(self, graph: gs.Graph) -> onnx.ModelProto:
        out = to_model(graph.copy(), self.template)
        del out.graph.value_info[:]
        return out

    def failure(self, graph: gs.Graph | onnx.ModelProto) -> Failure | None:
        """Why the graph is broken (module doc), or None."""
        self.checks += 1
        try:
            model = graph if isinstance(graph, onnx.ModelProto) else self.model(graph)
        except Exception as exc:  # noqa: BLE001 - a graph that cannot even be exported is broken
            return Failure(f"export failed: {_first(exc)}")
        try:
            check_model(model, full_check=False)
        except Exception as exc:  # noqa: BLE001 - checker errors have several types
            return _failure("onnx.checker", exc)
        if self.strict():
            reason = strict_failure(model)
            if reason is not None:
                return _failure("strict shape inference", reason)
        expected = self.expected()  # first: one session alive at a time (a large model's weights are mapped by each)
        try:
            session = make_session(model)
            names = [o.name for o in session.get_outputs()]
            got = [session.run(names, f) for f in self.feeds]
        except Exception as exc:  # noqa: BLE001 - any ORT failure means the rewrite broke the model
            return _failure("ONNX Runtime", exc)
        del session
        err = max((output_error(e, g) for e, g in zip(expected, got)), default=0.0)
        if err > self.rtol:
            return Failure(f"outputs changed (relative error {err:.2e} > {self.rtol:.2e})")
        return None

    def deviations(self, before: gs.Graph, after: gs.Graph, tensors: list[str]) -> dict[str, float]:
        """Relative error of each tensor of ``tensors`` in ``after`` against ``before`` on the batch (module doc);
        tensors one of them lacks, or that cannot be run, are left out."""
        try:
            mb, ma = self.model(before), self.model(after)
            have = {o for n in mb.graph.node for o in n.output} & {o for n in ma.graph.node for o in n.output}
            wanted = [t for t in dict.fromkeys(tensors) if t in have]
            if not wanted:
                return {}
            values = []
            for m in (mb, ma):  # one session at a time
                session = make_session(augment(m, wanted))
                values.append([session.run(wanted, f) for f in self.feeds])
                del session
            out: dict[str, float] = {}
            for before_run, after_run in zip(*values):
                for name, u, v in zip(wanted, before_run, after_run):
                    out[name] = max(out.get(name, 0.0), output_error([u], [v]))
            return out
        except (OnnxEasierError, Exception) as exc:  # noqa: BLE001 - no localisation; the caller rolls back more
            log.debug("deviations not measured: %s", exc)
            return {}


def _failure(where: str, exc: Exception | str) -> Failure:
    text = exc if isinstance(exc, str) else _first(exc)
    node = next((m.group(1) for r in _NODE_NAMES for m in [r.search(text)] if m), None)
    return Failure(f"{where}: {text}", node)


def _first(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
