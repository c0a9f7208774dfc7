"""Recognise activation functions in a graph, whatever their spelling, as one record per activation.

(The record type is fixed here; recognition is implemented below it.)
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Activation:
    """One activation function of the graph.

    name:     the activation's name in reports (the name of the node that writes ``output``).
    op:       canonical kind: Relu, Clip, LeakyRelu, PRelu, HardSigmoid, HardSwish, Gelu, SiLU.
    spelling: how it is written, e.g. "op", "erf", "tanh", "mul-sigmoid", "mul-clip-div".
    input:    name of the pre-activation tensor x.
    output:   name of the activation's output tensor act(x).
    nodes:    names of every node that makes up the activation (1 for an op, several for a decomposition).
    axis:     channel axis of ``input``: 1 after Conv/ConvTranspose/BatchNormalization, -1 (last) after Gemm/MatMul.
    channels: size of that axis when known statically, else None.
    params:   constants of the function (alpha, beta, min, max, slope array for PRelu, approximate...).
    """

    name: str
    op: str
    spelling: str
    input: str
    output: str
    nodes: tuple[str, ...]
    axis: int
    channels: int | None
    params: dict = field(default_factory=dict, compare=False, hash=False)
