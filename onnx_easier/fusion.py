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

**Output.** ``FusionResult.results``: every PassResult in order; ``FusionResult.mapping``: fused node name ->
``FusedLayer(input, output, sources)`` (JSON-serialisable as ``[input, output, [sources...]]``): the fused node reads
tensor ``input`` and writes the original tensor ``output``, replacing the original nodes ``sources``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from onnx_easier.passes import cleanup, fuse_chains, fuse_gap, fuse_residual, fuse_transpose
from onnx_easier.passes.base import PassResult
from onnx_easier.passes.fuse_common import FusedLayer, FusionContext

log = logging.getLogger(__name__)

Pass = Callable[[gs.Graph, FusionContext], PassResult]

FUSION_PIPELINE: tuple[Pass, ...] = (cleanup.run, fuse_gap.run, fuse_transpose.run, fuse_chains.run, fuse_residual.run)
FINISH_PIPELINE: tuple[Pass, ...] = (cleanup.run, cleanup.merge_constants)
MAX_ROUNDS = 5


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


def fuse(graph: gs.Graph, max_rounds: int = MAX_ROUNDS, protected: Collection[str] = ()) -> FusionResult:
    """Run the fusion pipeline on ``graph`` in place, repeated until a round changes nothing (or ``max_rounds``).

    ``protected``: names of nodes no pass may absorb or rewrite, e.g. the nodes of activations that stay
    nonlinear (a decomposed GELU's trailing ``Mul`` by 0.5 is linear and would otherwise fuse into the next layer,
    leaving an activation that no longer has its output tensor). They are marked with a private domain, which
    every pass refuses, for the duration of the call.
    """
    marked = [(n, n.domain) for n in graph.nodes if n.name in set(protected)]
    for n, _ in marked:
        n.domain = PROTECTED_DOMAIN
    try:
        return _fuse(graph, max_rounds)
    finally:
        for n, domain in marked:
            n.domain = domain


def _fuse(graph: gs.Graph, max_rounds: int) -> FusionResult:
    ctx = FusionContext()
    out = FusionResult(mapping=ctx.mapping)
    for _ in range(max_rounds):
        out.rounds += 1
        round_results = [p(graph, ctx) for p in FUSION_PIPELINE]
        out.results.extend(round_results)
        if not any(r.changed for r in round_results):
            break
    out.results.extend(p(graph, ctx) for p in FINISH_PIPELINE)
    fused = sum(r.changed for r in out.results if r.name.startswith("fuse"))
    log.info("fusion: %d rewrites in %d rounds, %d fused layers", fused, out.rounds, len(out.mapping))
    return out
