"""The exact fusion pipeline: make a graph shallower without changing what it computes.

Pipeline, written out (each pass is ``run(graph, ctx) -> PassResult``):

    FUSION_PIPELINE = (cleanup, fuse_gap, fuse_transpose, fuse_chains, fuse_residual)   # repeated to a fixpoint
    FINISH_PIPELINE = (cleanup, merge_constants)                                        # once at the end

- ``cleanup``: Identity / inference Dropout, dead nodes, unused initializers (so linearized activations vanish);
- ``fuse_gap``: GlobalAveragePool moved before position-wise linear elements;
- ``fuse_transpose``: per-channel affines folded into ConvTranspose;
- ``fuse_chains``: chains of linear elements fused into their least-MACs exact partition;
- ``fuse_residual``: ``x + f(x)`` and ``g(x) + h(x)`` folded into one layer; a folded block may then fuse with its
  neighbours, hence the repetition (at most ``MAX_ROUNDS`` rounds, stopping at the first round that changes nothing);
- ``merge_constants`` last: merging equal constants earlier would make them look shared and block fusions.

**Input contract.** ``graph`` comes from ``model_io.to_graph`` of a model on which ``onnx.shape_inference`` has run:
tensors carry their dtype and shape (static where the model's are). Ranks are needed to recognise most elements;
static spatial sizes are needed for exact MAC costs and for bias maps (symbolic ones fall back to size-independent
checks); symbolic batch sizes are fine. Initializers that are also graph inputs arrive as graph inputs and are never
folded. Only the main graph is rewritten; If/Loop/Scan bodies are left as they are. Graph input and output names
never change.

**Fail-safe** (``guard``, safety.py). With a guard, every pass that changed the graph is checked (checker, strict
shape inference, ORT on a calibration batch, outputs within the exactness bound). A failed check restores the graph
as it was before the pass and finds the rewrite at fault: the node the error names, else the fused layer whose
output deviates first (in graph order); that rewrite's nodes are protected and the pass runs again, so only that
fusion is given up (at most ``MAX_ROLLBACKS`` times per pass and round). When no single rewrite can be blamed
(cleanup, merge_constants, or an error that names no new node) the whole pass is rolled back and not run again in
this call. Each rollback is a warning naming the pass and the node, and a line in the pass's ``notes``.

**Output.** ``FusionResult.results``: every PassResult in order; ``FusionResult.mapping``: fused node name ->
``FusedLayer(input, output, sources)`` (JSON-serialisable as ``[input, output, [sources...]]``): the fused node reads
tensor ``input`` and writes the original tensor ``output``, replacing the original nodes ``sources``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

import onnx_graphsurgeon as gs

from onnx_easier.passes import cleanup, fuse_chains, fuse_gap, fuse_residual, fuse_transpose
from onnx_easier.passes.base import PassResult
from onnx_easier.passes.fuse_common import FusedLayer, FusionContext, Rewrite
from onnx_easier.safety import Failure

log = logging.getLogger(__name__)

Pass = Callable[[gs.Graph, FusionContext], PassResult]

FUSION_PIPELINE: tuple[Pass, ...] = (cleanup.run, fuse_gap.run, fuse_transpose.run, fuse_chains.run, fuse_residual.run)
FINISH_PIPELINE: tuple[Pass, ...] = (cleanup.run, cleanup.merge_constants)
MAX_ROUNDS = 5
MAX_ROLLBACKS = 8


class Checker(Protocol):
    """What a guard answers (safety.Guard): why a graph is broken, and how far tensors moved."""

    def failure(self, graph: gs.Graph) -> Failure | None: ...

    def deviations(self, before: gs.Graph, after: gs.Graph, tensors: list[str]) -> dict[str, float]: ...

    rtol: float


@dataclass
class FusionResult:
    """What ``fuse`` did: the pass results in order, the traceability mapping, the number of rounds run."""

    results: list[PassResult] = field(default_factory=list)
    mapping: dict[str, FusedLayer] = field(default_factory=dict)
    rounds: int = 0

    @property
    def changed(self) -> int:
        return sum(r.changed for r in self.results)


PROTECTED_DOMAIN = "onnx_easier.protected"  # a domain no pass recognises: marked nodes are left alone


def fuse(graph: gs.Graph, max_rounds: int = MAX_ROUNDS, protected: Collection[str] = (),
         guard: Checker | None = None) -> FusionResult:
    """Run the fusion pipeline on ``graph`` in place, repeated until a round changes nothing (or ``max_rounds``).

    ``protected``: names of nodes no pass may absorb or rewrite, e.g. the nodes of activations that stay
    nonlinear (a decomposed GELU's trailing ``Mul`` by 0.5 is linear and would otherwise fuse into the next layer,
    leaving an activation that no longer has its output tensor). They are marked with a private domain, which
    every pass refuses, for the duration of the call. ``guard``: check every changing pass and roll back what
    breaks the graph (module doc).
    """
    domains = {n.name: n.domain for n in graph.nodes}
    blocked = set(protected)
    try:
        return _fuse(graph, max_rounds, guard and _Unmarked(guard, domains), blocked)
    finally:
        _unmark(graph, domains)


def _mark(graph: gs.Graph, blocked: set[str]) -> None:
    for n in graph.nodes:
        if n.name in blocked:
            n.domain = PROTECTED_DOMAIN


def _unmark(graph: gs.Graph, domains: dict[str, str]) -> None:
    for n in graph.nodes:
        if n.domain == PROTECTED_DOMAIN:
            n.domain = domains.get(n.name, "")


@dataclass
class _Unmarked:
    """A guard that sees graphs without the private marks (a checker would refuse their unknown domain)."""

    guard: Checker
    domains: dict[str, str]

    @property
    def rtol(self) -> float:
        return self.guard.rtol

    def failure(self, graph: gs.Graph) -> Failure | None:
        return self.guard.failure(self._plain(graph))

    def deviations(self, before: gs.Graph, after: gs.Graph, tensors: list[str]) -> dict[str, float]:
        return self.guard.deviations(self._plain(before), self._plain(after), tensors)

    def _plain(self, graph: gs.Graph) -> gs.Graph:
        copy = graph.copy()
        _unmark(copy, self.domains)
        return copy


def _fuse(graph: gs.Graph, max_rounds: int, guard: Checker | None, blocked: set[str]) -> FusionResult:
    ctx = FusionContext()
    out = FusionResult(mapping=ctx.mapping)
    disabled: set[str] = set()

    def step(p: Pass) -> PassResult:
        _mark(graph, blocked)
        if guard is None:
            return p(graph, ctx)
        return _guarded(p, graph, ctx, guard, blocked, disabled)

    for _ in range(max_rounds):
        out.rounds += 1
        round_results = [step(p) for p in FUSION_PIPELINE]
        out.results.extend(round_results)
        if not any(r.changed for r in round_results):
            break
    out.results.extend(step(p) for p in FINISH_PIPELINE)
    fused = sum(r.changed for r in out.results if r.name.startswith("fuse"))
    log.info("fusion: %d rewrites in %d rounds, %d fused layers", fused, out.rounds, len(out.mapping))
    return out


def _pass_name(p: Pass) -> str:
    return p.__name__ if p.__name__ != "run" else p.__module__.rsplit(".", 1)[-1]


def _restore(graph: gs.Graph, snap: gs.Graph) -> None:
    """Make ``graph`` the copy ``snap`` (in place: callers hold ``graph``)."""
    graph.nodes = snap.nodes
    graph.inputs = snap.inputs
    graph.outputs = snap.outputs


def _guarded(p: Pass, graph: gs.Graph, ctx: FusionContext, guard: Checker, blocked: set[str],
             disabled: set[str]) -> PassResult:
    """Run pass ``p`` with its check and rollbacks (module doc)."""
    name = _pass_name(p)
    if name in disabled:
        return PassResult(name, 0, ["not run: rolled back earlier in this fusion"])
    notes: list[str] = []
    for attempt in range(MAX_ROLLBACKS + 1):
        snap, saved = graph.copy(), ctx.snapshot()
        try:
            result = p(graph, ctx)
        except Exception as exc:  # noqa: BLE001 - a pass that crashes is rolled back like one that breaks the graph
            result, failure = PassResult(name, 1), Failure(f"the pass raised {type(exc).__name__}: {exc}")
        else:
            if not result.changed:
                result.notes.extend(notes)
                return result
            failure = guard.failure(graph)
            if failure is None:
                result.notes.extend(notes)
                return result
        rewrites = ctx.journal[saved[2]:]
        culprit = _culprit(failure, rewrites, snap, graph, guard)
        _restore(graph, snap)
        ctx.restore(saved)
        if culprit is None or attempt == MAX_ROLLBACKS:
            disabled.add(name)
            note = f"rolled back the whole pass {name} ({result.changed} rewrites): {failure.reason}"
            log.warning("%s", note)
            return PassResult(result.name, 0, [*notes, note])
        blocked.update(culprit.replaced)
        _mark(graph, blocked)
        note = (f"rolled back the rewrite of {', '.join(culprit.replaced)} into {culprit.name} "
                f"(pass {name}): {failure.reason}")
        log.warning("%s", note)
        notes.append(note)
    raise AssertionError("unreachable")  # the loop returns on its last attempt


def _culprit(failure: Failure, rewrites: list[Rewrite], before: gs.Graph, after: gs.Graph,
             guard: Checker) -> Rewrite | None:
    """The rewrite to give up: the one whose nodes the error names, else (outputs changed) the first in graph
    order whose output moved beyond the bound, else the only one; None when none can be blamed."""
    if not rewrites:
        return None
    if failure.node:
        for r in rewrites:
            if failure.node == r.name or failure.node in r.helpers or failure.node in r.replaced:
                return r
    moved = guard.deviations(before, after, [r.output for r in rewrites])
    try:
        order = {t.name: i for i, n in enumerate(after.copy().toposort().nodes) for t in n.outputs}
    except Exception:  # noqa: BLE001 - a graph with a cycle has no order: blame none, roll back the pass
        return None
    bad = [r for r in rewrites if moved.get(r.output, 0.0) > guard.rtol]
    if bad:
        return min(bad, key=lambda r: order.get(r.output, len(order)))
    return rewrites[0] if len(rewrites) == 1 else None
