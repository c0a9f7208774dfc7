"""Small image classifiers written out by hand, used to build the example models in ``models/``.

Four families, each parametrised by width and input resolution so that the same code gives both the
tiny models the tests use and the wider ones the benchmarks use. Every model maps a batch of one-channel
images ``x: [N, 1, R, R]`` to class scores ``logits: [N, num_classes]``.

- :class:`VGG`: plain ``Conv3x3-BN-ReLU`` stacks with max pooling, then an MLP head.
- :class:`ResNet`: BasicBlocks ``relu(bn(conv(relu(bn(conv(x))))) + skip(x))``.
- :class:`MobileNetV2`: inverted residual blocks ``1x1 expand -> dw3x3 -> 1x1 project (linear)``.
- :class:`TokenFFN`: a transformer-style token model whose blocks are ``x + FFN(LayerNorm(x))``.

Only ``torch`` is imported: torchvision is not needed (and not available here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """``Conv2d(kernel, stride, padding=kernel // 2, bias=False)`` followed by ``BatchNorm2d``."""
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]


class VGG(nn.Module):
    """VGG-style network: ``Conv3x3-BN-ReLU`` layers and ``MaxPool2d(2)``, then a three-layer MLP head.

    Args:
        config: layer list; an int is a ``Conv3x3-BN-ReLU`` with that many output channels, ``"M"`` a
            2x2 max pool. ``(16, 16, "M", 32, 32, "M")`` maps ``[N, 1, R, R]`` to ``[N, 32, R/4, R/4]``.
        resolution: input side ``R``; must be divisible by ``2 ** config.count("M")``.
        hidden: width of the two hidden layers of the head.

    Shapes: ``x [N, in_channels, R, R] -> features [N, C, R/2^P, R/2^P] -> Flatten [N, C*(R/2^P)^2]
    -> Linear-ReLU [N, hidden] -> Linear-ReLU [N, hidden] -> Linear [N, num_classes]``.
    """

    def __init__(
        self,
        config: Sequence[int | str] = (16, 16, "M", 32, 32, "M"),
        resolution: int = 16,
        hidden: int = 64,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = in_channels, resolution
        for item in config:
            if item == "M":
                if side % 2:
                    raise ValueError(f"resolution {resolution} cannot be pooled {config.count('M')} times")
                layers.append(nn.MaxPool2d(2))
                side //= 2
            else:
                layers += [*conv_bn(channels, int(item), 3), nn.ReLU()]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """``y = relu(bn2(conv2(relu(bn1(conv1(x))))) + skip(x))``, both convs 3x3.

    ``skip`` is the identity, or ``1x1 conv(stride)-BN`` when the stride or the channel count changes.
    Shapes: ``[N, c_in, H, W] -> [N, c_out, H/stride, W/stride]``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c_in, c_out, 3, stride), nn.ReLU(), *conv_bn(c_out, c_out, 3))
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(*conv_bn(c_in, c_out, 1, stride))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.skip(x))


class ResNet(nn.Module):
    """ResNet of BasicBlocks: ``stem Conv3x3-BN-ReLU``, stages, global average pool, ``Linear``.

    Args:
        widths: channels of each stage; every stage after the first starts with a stride-2 block.
        depths: BasicBlocks per stage.
        resolution: input side ``R`` (only checked: it must survive the downsampling).

    Shapes: ``x [N, in_channels, R, R] -> stem [N, widths[0], R, R] -> stages
    [N, widths[-1], R/2^(S-1), R/2^(S-1)] -> GAP [N, widths[-1]] -> Linear [N, num_classes]``.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32),
        depths: Sequence[int] = (2, 2),
        resolution: int = 16,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"widths {tuple(widths)} and depths {tuple(depths)} differ in length")
        if resolution % 2 ** (len(widths) - 1):
            raise ValueError(f"resolution {resolution} cannot be halved {len(widths) - 1} times")
        self.stem = nn.Sequential(*conv_bn(in_channels, widths[0], 3), nn.ReLU())
        blocks: list[nn.Module] = []
        channels = widths[0]
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            for i in range(depth):
                blocks.append(BasicBlock(channels, width, stride=2 if stage > 0 and i == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: ``1x1 expand-BN-ReLU6 -> dw3x3(stride)-BN-ReLU6 -> 1x1 project-BN`` (no activation).

    The input is added back when ``stride == 1`` and ``c_in == c_out``.
    Shapes: ``[N, c_in, H, W] -> [N, c_in*expansion, H, W] -> [N, c_in*expansion, H/s, W/s] -> [N, c_out, H/s, W/s]``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.use_skip = stride == 1 and c_in == c_out
        self.body = nn.Sequential(
            *conv_bn(c_in, hidden, 1),
            nn.ReLU6(),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.ReLU6(),
            *conv_bn(hidden, c_out, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.use_skip else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNetV2: ``stem Conv3x3-BN-ReLU6``, inverted residual blocks, ``1x1 Conv-BN-ReLU6``, GAP, ``Linear``.

    Args:
        stem: stem output channels.
        blocks: one ``(expansion, out_channels, stride)`` per inverted residual block.
        last: channels of the final 1x1 convolution.
        stem_stride: stride of the stem convolution.
        resolution: input side ``R`` (only checked: it must survive the downsampling).

    Shapes: ``x [N, in_channels, R, R] -> stem [N, stem, R/s0, R/s0] -> blocks [N, blocks[-1][1], R', R']
    -> 1x1 [N, last, R', R'] -> GAP [N, last] -> Linear [N, num_classes]``, ``R' = R / (s0 * prod(strides))``.
    """

    def __init__(
        self,
        stem: int = 16,
        blocks: Sequence[tuple[int, int, int]] = ((4, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2), (4, 32, 1)),
        last: int = 64,
        stem_stride: int = 1,
        resolution: int = 16,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        downsample = stem_stride
        for _, _, stride in blocks:
            downsample *= stride
        if resolution % downsample:
            raise ValueError(f"resolution {resolution} is not divisible by the total stride {downsample}")
        self.stem = nn.Sequential(*conv_bn(in_channels, stem, 3, stem_stride), nn.ReLU6())
        layers: list[nn.Module] = []
        channels = stem
        for expansion, c_out, stride in blocks:
            layers.append(InvertedResidual(channels, c_out, stride, expansion))
            channels = c_out
        self.blocks = nn.Sequential(*layers)
        self.last = nn.Sequential(*conv_bn(channels, last, 1), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.last(self.blocks(self.stem(x)))), 1))


class Attention(nn.Module):
    """Single-head self-attention ``softmax(q k^T / sqrt(d)) v`` followed by an output projection.

    Shapes: ``[N, T, d] -> q, k, v [N, T, d] -> weights [N, T, T] -> [N, T, d]``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.scale = dim**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(1, 2) * self.scale, dim=-1)
        return self.proj(weights @ v)


class TokenBlock(nn.Module):
    """Pre-norm transformer block: ``x = x + Attn(LN(x))`` (optional), then ``x = x + FFN(LN(x))``.

    ``FFN = Linear(d, ratio*d) -> GELU (erf) -> Linear(ratio*d, d)``. Shapes: ``[N, T, d] -> [N, T, d]``.
    """

    def __init__(self, dim: int, ratio: int = 4, attention: bool = False) -> None:
        super().__init__()
        self.attn = nn.Sequential(nn.LayerNorm(dim), Attention(dim)) if attention else None
        self.ffn = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ratio * dim),
            nn.GELU(),
            nn.Linear(ratio * dim, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.attn(x)
        return x + self.ffn(x)


class TokenFFN(nn.Module):
    """Transformer-style token model on image patches, with FFN blocks (attention optional).

    The image is cut into ``(R/patch)^2`` non-overlapping ``patch x patch`` tokens, each embedded linearly
    to ``dim`` (a ``Conv2d(kernel=stride=patch)``, which is exactly a ``Linear`` on the flattened patch),
    a learned position embedding is added, ``depth`` :class:`TokenBlock` s follow, the tokens are
    mean-pooled and a ``Linear`` head gives the logits.

    Shapes: ``x [N, in_channels, R, R] -> patches [N, dim, R/p, R/p] -> tokens [N, T, dim]
    (T = (R/p)^2) -> + pos [1, T, dim] -> blocks [N, T, dim] -> mean [N, dim] -> Linear [N, num_classes]``.
    """

    def __init__(
        self,
        dim: int = 64,
        depth: int = 2,
        resolution: int = 16,
        patch: int = 4,
        ratio: int = 4,
        attention: bool = False,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if resolution % patch:
            raise ValueError(f"resolution {resolution} is not divisible by the patch size {patch}")
        tokens = (resolution // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(TokenBlock(dim, ratio, attention) for _ in range(depth)))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.blocks(tokens).mean(dim=1))
