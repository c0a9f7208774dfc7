"""Tiny torch modules covering every activation spelling, and one export helper for the tests.

Each case of ``ACTIVATION_CASES`` is a factory of the bare activation module and the canonical kind
(``Activation.op``) that onnx-easier should recognise after export. ``ConvAct`` / ``LinearAct`` put one activation
between two layers so the channel axis is known (1 after a Conv, last after a Linear); ``MixedNet`` strings every
case of the list together so one export exercises all spellings at once.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

CHANNELS = 4  # output channels of the first layer of ConvAct / LinearAct (the activation's channel count)


class ManualHardswish(nn.Module):
    """``x * relu6(x + 3) / 6`` written out by hand (exported as Add, Clip, Mul, Div)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


class ManualSiLU(nn.Module):
    """``x * sigmoid(x)`` written out by hand (exported as Sigmoid, Mul with x first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


ACTIVATION_CASES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "relu": (nn.ReLU, "Relu"),
    "relu6": (nn.ReLU6, "Clip"),
    "hardtanh": (lambda: nn.Hardtanh(-2.0, 3.0), "Clip"),
    "leaky_relu": (lambda: nn.LeakyReLU(0.1), "LeakyRelu"),
    "prelu_channel": (lambda: nn.PReLU(CHANNELS, init=0.2), "PRelu"),
    "prelu_single": (lambda: nn.PReLU(1, init=0.3), "PRelu"),
    "hardsigmoid": (nn.Hardsigmoid, "HardSigmoid"),
    "hardswish": (nn.Hardswish, "HardSwish"),
    "gelu": (nn.GELU, "Gelu"),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), "Gelu"),
    "silu": (nn.SiLU, "SiLU"),
    "manual_silu": (ManualSiLU, "SiLU"),
    "manual_hardswish": (ManualHardswish, "HardSwish"),
}


def _randomize_prelu(module: nn.Module) -> None:
    """Give PReLU slopes distinct values per channel so a wrong broadcast shows in the numbers."""
    for m in module.modules():
        if isinstance(m, nn.PReLU):
            with torch.no_grad():
                m.weight.copy_(torch.linspace(0.05, 0.5, m.weight.numel()))


class ConvAct(nn.Module):
    """Conv2d(3 -> CHANNELS, 3x3) -> act -> Conv2d(CHANNELS -> 2, 1x1); input [N, 3, H, W]."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, CHANNELS, 3, padding=1)
        self.act = act
        self.conv2 = nn.Conv2d(CHANNELS, 2, 1)
        _randomize_prelu(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class LinearAct(nn.Module):
    """Linear(8 -> CHANNELS) -> act -> Linear(CHANNELS -> 3); input [N, T, 8] (channels last)."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, CHANNELS)
        self.act = act
        self.fc2 = nn.Linear(CHANNELS, 3)
        _randomize_prelu(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixedNet(nn.Module):
    """One 1x1 Conv(CHANNELS -> CHANNELS) followed by each activation of ``names`` in turn; input [N, CHANNELS, H, W].

    Each activation reads the output of its own Conv, so every activation's channel axis is 1 and its channel
    count is CHANNELS.
    """

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = list(names)
        self.convs = nn.ModuleList(nn.Conv2d(CHANNELS, CHANNELS, 1) for _ in self.names)
        self.acts = nn.ModuleList(ACTIVATION_CASES[n][0]() for n in self.names)
        _randomize_prelu(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, act in zip(self.convs, self.acts):
            x = act(conv(x))
        return x


def export(module: nn.Module, example: torch.Tensor, path: str | Path, *, dynamo: bool, opset: int) -> onnx.ModelProto:
    """Export ``module`` (in eval mode) on ``example`` to ``path`` and return the loaded model.

    ``dynamo=False`` uses the legacy TorchScript exporter, ``dynamo=True`` the torch.export + onnxscript exporter
    (with its default graph optimisation). Input is named ``x``, output ``y``. Exporter errors propagate; the
    caller decides whether an unsupported op means a skip.
    """
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer chatter from the exporters
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["x"],
            output_names=["y"],
            opset_version=opset,
            dynamo=dynamo,
            external_data=False,
        )
    return onnx.load(str(path))
