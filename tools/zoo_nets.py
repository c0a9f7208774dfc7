"""Compact torch versions of real architectures, faithful to the op patterns their ONNX exports hold.

torchvision's wheels need a CUDA torch, so the structures are written out here: the same blocks (BasicBlock,
Bottleneck with a conv+BN downsample, inverted residuals with ReLU6, HardSwish and a HardSigmoid squeeze-excite,
MBConv with SiLU, ConvNeXt's depthwise 7x7 + channels-last LayerNorm + Linear/GELU + layer scale, a ViT encoder with
a class token and position embedding, a BERT-style encoder with token ids and an attention mask, a Swin block with
window partition, cyclic shift and relative position bias, a YOLO-style decoupled head with DFL box decoding, LSTM
and GRU with their initial states as inputs). Widths and depths are parameters: the tests use small ones, the
benchmarks real ones. Every BatchNorm gets random running statistics (``randomize``), so that folding it is not a
no-op.
"""
from __future__ import annotations

import torch
from torch import nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (seeded); eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
    return model.eval()


def conv_bn(c_in: int, c_out: int, k: int = 3, s: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU
            ) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# --- ResNet ---------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.a = conv_bn(c_in, c_out, 3, stride)
        self.b = conv_bn(c_out, c_out, 3, 1, act=None)
        self.down = conv_bn(c_in, c_out, 1, stride, act=None) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(self.a(x)) + self.down(x))


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int = 4) -> None:
        super().__init__()
        mid = c_out // expansion
        self.a = conv_bn(c_in, mid, 1)
        self.b = conv_bn(mid, mid, 3, stride)
        self.c = conv_bn(mid, c_out, 1, act=None)
        self.down = conv_bn(c_in, c_out, 1, stride, act=None) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.c(self.b(self.a(x))) + self.down(x))


class ResNet(nn.Module):
    """ResNet-18 (``bottleneck=False, blocks=(2, 2, 2, 2)``) / ResNet-50 (``True, (3, 4, 6, 3)``); ``width`` 64 is
    the real one."""

    def __init__(self, bottleneck: bool, blocks: tuple[int, ...], width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, width, 7, 2), nn.MaxPool2d(3, 2, 1))
        layers: list[nn.Module] = []
        c = width
        for i, n in enumerate(blocks):
            out = width * 2**i * (4 if bottleneck else 1)
            for j in range(n):
                stride = 2 if j == 0 and i > 0 else 1
                layers.append(Bottleneck(c, out, stride) if bottleneck else BasicBlock(c, out, stride))
                c = out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


# --- MobileNetV2 / V3, EfficientNet ---------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int, gate: type[nn.Module], act: type[nn.Module]) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act, self.gate = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1), act(), gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2 (ReLU6, no SE), MobileNetV3 (HardSwish/ReLU, HardSigmoid SE), EfficientNet MBConv (SiLU,
    Sigmoid SE)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, expand: int, act: type[nn.Module],
                 se: tuple[type[nn.Module], type[nn.Module]] | None) -> None:
        super().__init__()
        mid = c_in * expand
        layers: list[nn.Module] = [] if expand == 1 else [conv_bn(c_in, mid, 1, act=act)]
        layers.append(conv_bn(mid, mid, k, stride, groups=mid, act=act))
        if se is not None:
            layers.append(SqueezeExcite(mid, max(8, mid // 4), se[0], se[1]))
        layers.append(conv_bn(mid, c_out, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNet(nn.Module):
    """``kind``: "v2" (ReLU6), "v3" (HardSwish + HardSigmoid SE, Linear-HardSwish head), "efficientnet" (SiLU +
    Sigmoid SE, MBConv k3/k5). ``width`` multiplies every channel count."""

    def __init__(self, kind: str, width: float = 1.0, classes: int = 10) -> None:
        super().__init__()

        def ch(c: int) -> int:
            return max(8, int(c * width) // 8 * 8)

        if kind == "v2":
            act, se = nn.ReLU6, None
            cfg = [(16, 3, 1, 1, 1), (24, 3, 2, 6, 2), (32, 3, 2, 6, 3), (64, 3, 2, 6, 4), (96, 3, 1, 6, 3),
                   (160, 3, 2, 6, 3), (320, 3, 1, 6, 1)]
            stem, last = 32, 1280
        elif kind == "v3":
            act, se = nn.Hardswish, (nn.Hardsigmoid, nn.ReLU)
            cfg = [(16, 3, 1, 1, 1), (24, 3, 2, 4, 2), (40, 5, 2, 3, 3), (80, 3, 2, 6, 4), (112, 3, 1, 6, 2),
                   (160, 5, 2, 6, 3)]
            stem, last = 16, 960
        elif kind == "efficientnet":
            act, se = nn.SiLU, (nn.Sigmoid, nn.SiLU)
            cfg = [(16, 3, 1, 1, 1), (24, 3, 2, 6, 2), (40, 5, 2, 6, 2), (80, 3, 2, 6, 3), (112, 5, 1, 6, 3),
                   (192, 5, 2, 6, 4), (320, 3, 1, 6, 1)]
            stem, last = 32, 1280
        else:
            raise ValueError(kind)
        layers: list[nn.Module] = [conv_bn(3, ch(stem), 3, 2, act=act)]
        c = ch(stem)
        for out, k, s, e, n in cfg:
            for j in range(n):
                layers.append(InvertedResidual(c, ch(out), k, s if j == 0 else 1, e, act, se))
                c = ch(out)
        layers.append(conv_bn(c, ch(last), 1, act=act))
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Linear(ch(last), ch(last)), nn.Hardswish()] if kind == "v3" else []
        self.head = nn.Sequential(*head, nn.Linear(ch(last), classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


# --- ConvNeXt -------------------------------------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) * 0.5 + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.gamma * y


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """ConvNeXt-T is ``dims=(96, 192, 384, 768), depths=(3, 3, 9, 3)``."""

    def __init__(self, dims: tuple[int, ...] = (96, 192, 384, 768), depths: tuple[int, ...] = (3, 3, 9, 3),
                 classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6)]
        for i, (d, n) in enumerate(zip(dims, depths)):
            if i:
                layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], d, 2, 2)]
            layers += [ConvNeXtBlock(d) for _ in range(n)]
        self.features = nn.Sequential(*layers)
        self.norm, self.fc = nn.LayerNorm(dims[-1], eps=1e-6), nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.features(x).mean((2, 3))))


# --- transformers ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention written out (q/k/v projections, Reshape/Transpose, scaled scores, optional
    additive bias or mask, Softmax)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.h, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (d // self.h) ** -0.5
        if bias is not None:
            scores = scores + bias
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, post_norm: bool = False) -> None:
        super().__init__()
        self.n1, self.att, self.n2 = nn.LayerNorm(d), Attention(d, heads), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.post = post_norm

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.post:  # BERT
            x = self.n1(x + self.att(x, bias))
            return self.n2(x + self.mlp(x))
        x = x + self.att(self.n1(x), bias)  # ViT
        return x + self.mlp(self.n2(x))


class ViT(nn.Module):
    """ViT-S/16 is ``d=384, depth=12, heads=6, patch=16`` at 224."""

    def __init__(self, d: int = 384, depth: int = 12, heads: int = 6, patch: int = 16, image: int = 224,
                 classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.ModuleList([EncoderLayer(d, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x)[:, 0])


class Bert(nn.Module):
    """BERT-style: token + position + segment embeddings (Gather), post-norm layers with the extended attention
    mask ``(1 - mask) * -10000`` added to the scores, a Tanh pooler and a classifier."""

    def __init__(self, vocab: int = 1000, d: int = 128, depth: int = 2, heads: int = 4, max_len: int = 64,
                 classes: int = 3) -> None:
        super().__init__()
        self.tok, self.pos, self.seg = nn.Embedding(vocab, d), nn.Embedding(max_len, d), nn.Embedding(2, d)
        self.norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList([EncoderLayer(d, heads, post_norm=True) for _ in range(depth)])
        self.pool, self.cls = nn.Linear(d, d), nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.norm(self.tok(ids) + self.pos(pos) + self.seg(torch.zeros_like(ids)))
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        return self.cls(torch.tanh(self.pool(x[:, 0])))


class SwinBlock(nn.Module):
    """Two Swin blocks (plain and shifted windows) on ``[N, H, W, C]`` after a patch embedding: window partition
    by Reshape/Permute, cyclic shift by ``torch.roll``, relative position bias gathered from a table, an attention
    mask for the shifted windows, GELU MLP, then a classifier."""

    def __init__(self, d: int = 48, heads: int = 3, window: int = 4, image: int = 32, patch: int = 4,
                 classes: int = 10) -> None:
        super().__init__()
        self.embed, self.w, self.h = nn.Conv2d(3, d, patch, patch), window, heads
        self.side = image // patch
        self.n1 = nn.ModuleList([nn.LayerNorm(d) for _ in range(2)])
        self.n2 = nn.ModuleList([nn.LayerNorm(d) for _ in range(2)])
        self.qkv = nn.ModuleList([nn.Linear(d, 3 * d) for _ in range(2)])
        self.proj = nn.ModuleList([nn.Linear(d, d) for _ in range(2)])
        self.mlp = nn.ModuleList([nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(2)])
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("rel_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)
        self.register_buffer("shift_mask", self._mask(), persistent=False)
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, classes)

    def _mask(self) -> torch.Tensor:
        s, w, sh = self.side, self.w, self.w // 2
        img = torch.zeros(1, s, s, 1)
        k = 0
        for hs in (slice(0, -w), slice(-w, -sh), slice(-sh, None)):
            for ws in (slice(0, -w), slice(-w, -sh), slice(-sh, None)):
                img[:, hs, ws, :] = k
                k += 1
        win = self._windows(img).squeeze(-1)
        diff = win[:, None, :] - win[:, :, None]
        return diff.ne(0).float() * -100.0

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _, c = x.shape
        w = self.w
        return x.reshape(b, s // w, w, s // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)

    def _block(self, i: int, x: torch.Tensor, shifted: bool) -> torch.Tensor:
        b, s, _, c = x.shape
        w, sh = self.w, self.w // 2
        y = self.n1[i](x)
        if shifted:
            y = torch.roll(y, (-sh, -sh), (1, 2))
        win = self._windows(y)
        nw, t = win.shape[0], w * w
        q, k, v = self.qkv[i](win).reshape(nw, t, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (c // self.h) ** -0.5
        att = att + self.table[self.rel_index.reshape(-1)].reshape(t, t, -1).permute(2, 0, 1).unsqueeze(0)
        if shifted:
            per = self.shift_mask.shape[0]
            att = att.reshape(-1, per, self.h, t, t) + self.shift_mask[None, :, None]
            att = att.reshape(-1, self.h, t, t)
        y = self.proj[i]((att.softmax(-1) @ v).transpose(1, 2).reshape(nw, t, c))
        y = y.reshape(b, s // w, s // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, s, s, c)
        if shifted:
            y = torch.roll(y, (sh, sh), (1, 2))
        x = x + y
        return x + self.mlp[i](self.n2[i](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).permute(0, 2, 3, 1)
        x = self._block(1, self._block(0, x, False), True)
        return self.fc(self.norm(x.mean((1, 2))))


class YoloHead(nn.Module):
    """A YOLOv8-style detector: Conv-BN-SiLU backbone, decoupled box / class branches, Split, DFL softmax over
    ``reg`` bins, anchor-grid decoding (Slice, Sub/Add, Concat), Sigmoid class scores: ``[N, cells, 4 + classes]``."""

    def __init__(self, width: int = 16, classes: int = 4, reg: int = 8) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(conv_bn(3, w, 3, 2, act=nn.SiLU), conv_bn(w, 2 * w, 3, 2, act=nn.SiLU),
                                  conv_bn(2 * w, 2 * w, 3, 1, act=nn.SiLU), conv_bn(2 * w, 4 * w, 3, 2, act=nn.SiLU))
        self.box = nn.Sequential(conv_bn(4 * w, 2 * w, act=nn.SiLU), nn.Conv2d(2 * w, 4 * reg, 1))
        self.cls = nn.Sequential(conv_bn(4 * w, 2 * w, act=nn.SiLU), nn.Conv2d(2 * w, classes, 1))
        self.reg, self.classes = reg, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        n, _, h, w = f.shape
        y = torch.cat([self.box(f), self.cls(f)], 1).view(n, 4 * self.reg + self.classes, -1)
        box, cls = y.split((4 * self.reg, self.classes), 1)
        bins = box.view(n, 4, self.reg, -1).transpose(2, 1).softmax(1)
        dist = (bins * torch.arange(self.reg, dtype=x.dtype).view(1, -1, 1, 1)).sum(1)
        lt, rb = dist[:, :2], dist[:, 2:4]
        gy, gx = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
        anchors = torch.stack([gx, gy]).view(1, 2, -1) + 0.5
        xy, wh = (2 * anchors - lt + rb) / 2, lt + rb
        return torch.cat([xy, wh, cls.sigmoid()], 1).transpose(1, 2)


class Recurrent(nn.Module):
    """LSTM or GRU over ``x [N, T, F]`` with the initial states as inputs (``h0 [1, N, H]``, and ``c0`` for the
    LSTM: their batch is axis 1), then a Linear-ReLU-Linear head on every step; returns the outputs and states."""

    def __init__(self, gru: bool, features: int = 8, hidden: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.gru = gru
        self.rnn = (nn.GRU if gru else nn.LSTM)(features, hidden, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None = None):
        if self.gru:
            y, h = self.rnn(x, h0)
            return self.head(y), h
        y, (h, c) = self.rnn(x, (h0, c0))
        return self.head(y), h, c
