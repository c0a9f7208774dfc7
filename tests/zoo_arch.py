"""Real architectures written out as their reference implementations write them, so that the ONNX exports hold
the same op patterns as the models users bring.

The code follows torchvision (ResNet, MobileNetV2/V3, EfficientNet, ConvNeXt, ViT with ``nn.MultiheadAttention``,
Swin with its padded shifted-window attention and patch merging), Hugging Face's BERT (three int64 inputs,
``transpose_for_scores``, the ``finfo.min`` extended mask, eager or SDPA attention), ultralytics' YOLOv5 (C3, SPPF,
FPN/PAN neck, the anchor-grid ``Detect`` decode) and ``nn.LSTM``/``nn.GRU`` with their initial states as inputs.
It differs from tools/zoo_nets.py (compact, hand-written variants, used by tools/bench_zoo.py) where the reference code differs: the spelling
of the layers is the point. torchvision itself is not used (its wheels need a CUDA torch).

Every builder takes width / depth / resolution parameters: the defaults are the real sizes, the tests pass small
ones. ``randomize`` gives every normalization random statistics and affine parameters and every layer scale a
non-trivial value (untrained models would otherwise fold to near no-ops).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Act = Callable[..., nn.Module]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random BatchNorm running statistics and affine parameters, LayerNorm affine parameters, and layer
    scales in [0.1, 0.6] (their real init 1e-6 would make every block an identity); returns the model in eval."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_((torch.rand(c, generator=g) - 0.5) * 0.4)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_((torch.rand(c, generator=g) - 0.5) * 0.4)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_((torch.rand(m.bias.shape, generator=g) - 0.5) * 0.2)
            if isinstance(getattr(m, "layer_scale", None), nn.Parameter):
                m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=g) * 0.5 + 0.1)
    return model.eval()


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of ``divisor``, never more than 10% down."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvNormAct(nn.Sequential):
    """torchvision's ``Conv2dNormActivation``: Conv2d (no bias, padding (k-1)//2), BatchNorm2d, activation."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1, act: Act | None = nn.ReLU,
                 eps: float = 1e-5) -> None:
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(c_out, eps=eps)]
        if act is not None:
            layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU) else act())
        super().__init__(*layers)


# --- ResNet (torchvision.models.resnet) -------------------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet v1.5: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """``resnet18``: ``ResNet(BasicBlock, (2, 2, 2, 2))``; ``resnet50``: ``ResNet(Bottleneck, (3, 4, 6, 3))``.
    ``width`` 64 and 224x224 inputs are the real sizes."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: Sequence[int], width: int = 64,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
                    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(width: int = 64, num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), width, num_classes)


def resnet50(width: int = 64, num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), width, num_classes)


# --- MobileNetV2 (torchvision.models.mobilenetv2) ---------------------------------------------------------------


class InvertedResidualV2(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(inp, hidden, 1, act=nn.ReLU6))
        layers += [ConvNormAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))  # t, c, n, s

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        c_in = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvNormAct(3, c_in, stride=2, act=nn.ReLU6)]
        for t, c, n, s in self.SETTING:
            c_out = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidualV2(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        features.append(ConvNormAct(c_in, self.last_channel, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# --- MobileNetV3 and EfficientNet (torchvision.models.mobilenetv3 / efficientnet) --------------------------------


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: avgpool, fc1 (1x1 conv), act, fc2, scale act, ``scale * input``."""

    def __init__(self, c: int, squeeze: int, act: Act = nn.ReLU, scale_act: Act = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
        self.activation, self.scale_activation = act(), scale_act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidualV3(nn.Module):
    def __init__(self, c_in: int, k: int, expanded: int, c_out: int, use_se: bool, act: Act, stride: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(ConvNormAct(c_in, expanded, 1, act=act, eps=0.001))
        layers.append(ConvNormAct(expanded, expanded, k, stride, groups=expanded, act=act, eps=0.001))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4), nn.ReLU, nn.Hardsigmoid))
        layers.append(ConvNormAct(expanded, c_out, 1, act=None, eps=0.001))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.use_res_connect else y


class MobileNetV3(nn.Module):
    """MobileNetV3-Large: ReLU in the early blocks, HardSwish later, HardSigmoid squeeze-excite, a
    Linear-HardSwish-Dropout-Linear classifier."""

    LARGE = ((16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
             (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
             (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
             (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
             (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1))

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, last_channel: int = 1280) -> None:
        super().__init__()

        def ch(c: int) -> int:
            return make_divisible(c * width_mult)

        layers: list[nn.Module] = [ConvNormAct(3, ch(16), 3, 2, act=nn.Hardswish, eps=0.001)]
        for c_in, k, exp, c_out, se, act, s in self.LARGE:
            layers.append(InvertedResidualV3(ch(c_in), k, ch(exp), ch(c_out), se,
                                             nn.Hardswish if act == "HS" else nn.ReLU, s))
        last_in = ch(160)
        layers.append(ConvNormAct(last_in, 6 * last_in, 1, act=nn.Hardswish, eps=0.001))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = make_divisible(last_channel * width_mult)
        self.classifier = nn.Sequential(nn.Linear(6 * last_in, last), nn.Hardswish(inplace=True), nn.Dropout(0.2),
                                        nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class MBConv(nn.Module):
    """EfficientNet's MBConv: expand 1x1 (SiLU), depthwise (SiLU), squeeze-excite (SiLU / Sigmoid, squeeze =
    input channels / 4), project 1x1; the residual when stride 1 and shapes match (stochastic depth: identity in
    eval)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and c_in == c_out
        mid = make_divisible(c_in * expand)
        layers: list[nn.Module] = []
        if mid != c_in:
            layers.append(ConvNormAct(c_in, mid, 1, act=nn.SiLU, eps=0.001))
        layers += [ConvNormAct(mid, mid, k, stride, groups=mid, act=nn.SiLU, eps=0.001),
                   SqueezeExcitation(mid, max(1, c_in // 4), nn.SiLU, nn.Sigmoid),
                   ConvNormAct(mid, c_out, 1, act=None, eps=0.001)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.use_res_connect else y


class EfficientNet(nn.Module):
    """EfficientNet-B0 at ``width_mult=1, depth_mult=1`` (224x224)."""

    B0 = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
          (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))  # expand, k, s, in, out, n

    def __init__(self, width_mult: float = 1.0, depth_mult: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()

        def ch(c: int) -> int:
            return make_divisible(c * width_mult)

        layers: list[nn.Module] = [ConvNormAct(3, ch(32), 3, 2, act=nn.SiLU, eps=0.001)]
        for e, k, s, c_in, c_out, n in self.B0:
            stage = []
            for i in range(math.ceil(n * depth_mult)):
                stage.append(MBConv(ch(c_in) if i == 0 else ch(c_out), ch(c_out), k, s if i == 0 else 1, e))
            layers.append(nn.Sequential(*stage))
        layers.append(ConvNormAct(ch(320), 4 * ch(320), 1, act=nn.SiLU, eps=0.001))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(4 * ch(320), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --- ConvNeXt (torchvision.models.convnext) ---------------------------------------------------------------------


class Permute(nn.Module):
    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.dims = list(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor: permute to channels-last, ``F.layer_norm``, permute back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=True), Permute([0, 2, 3, 1]),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_scale * self.block(x) + x


class ConvNeXt(nn.Module):
    """ConvNeXt-T: ``dims=(96, 192, 384, 768), depths=(3, 3, 9, 3)``; the classifier is LayerNorm2d on the pooled
    [N, C, 1, 1] map, Flatten, Linear."""

    def __init__(self, dims: Sequence[int] = (96, 192, 384, 768), depths: Sequence[int] = (3, 3, 9, 3),
                 num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4, bias=True), LayerNorm2d(dims[0], eps=1e-6))]
        for i, (d, n) in enumerate(zip(dims, depths)):
            layers.append(nn.Sequential(*[CNBlock(d) for _ in range(n)]))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(d, eps=1e-6), nn.Conv2d(d, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


# --- ViT (torchvision.models.vision_transformer) ---------------------------------------------------------------


class EncoderBlock(nn.Module):
    def __init__(self, heads: int, hidden: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden, heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, hidden),
                                 nn.Dropout(0.0))

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(x_in)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + x_in
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """ViT-B/16: ``image=224, patch=16, layers=12, heads=12, hidden=768, mlp=3072``."""

    def __init__(self, image: int = 224, patch: int = 16, layers: int = 12, heads: int = 12, hidden: int = 768,
                 mlp: int = 3072, num_classes: int = 1000) -> None:
        super().__init__()
        self.patch, self.hidden = patch, hidden
        self.conv_proj = nn.Conv2d(3, hidden, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        seq = (image // patch) ** 2 + 1
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, hidden).normal_(std=0.02))
        self.layers = nn.Sequential(*[EncoderBlock(heads, hidden, mlp) for _ in range(layers)])
        self.ln = nn.LayerNorm(hidden, eps=1e-6)
        self.heads = nn.Sequential(nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        x = self.conv_proj(x).reshape(n, self.hidden, (h // self.patch) * (w // self.patch)).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = self.ln(self.layers(x + self.pos_embedding))
        return self.heads(x[:, 0])


# --- BERT (transformers.models.bert, eager and sdpa attention) ---------------------------------------------------


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, sdpa: bool) -> None:
        super().__init__()
        self.heads, self.head_size, self.sdpa = heads, hidden // heads, sdpa
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(0.1)

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size()[:-1] + (self.heads, self.head_size)).permute(0, 2, 1, 3)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.transpose_for_scores(f(h)) for f in (self.query, self.key, self.value))
        if self.sdpa:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size) + mask
            ctx = torch.matmul(self.dropout(nn.functional.softmax(scores, dim=-1)), v)
        ctx = ctx.permute(0, 2, 1, 3).contiguous()
        return ctx.view(ctx.size()[:-2] + (self.heads * self.head_size,))


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, sdpa: bool) -> None:
        super().__init__()
        self.attention = BertSelfAttention(hidden, heads, sdpa)
        self.attn_dense, self.attn_norm = nn.Linear(hidden, hidden), nn.LayerNorm(hidden, eps=1e-12)
        self.intermediate, self.act = nn.Linear(hidden, inter), nn.GELU()
        self.output, self.out_norm = nn.Linear(inter, hidden), nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(0.1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.attn_norm(self.dropout(self.attn_dense(self.attention(h, mask))) + h)
        return self.out_norm(self.dropout(self.output(self.act(self.intermediate(a)))) + a)


class Bert(nn.Module):
    """``BertForSequenceClassification``: inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64,
    [N, T]); word + token-type + position embeddings (``position_ids`` buffer sliced to T), LayerNorm eps 1e-12,
    the extended mask ``(1 - mask[:, None, None, :]) * finfo(float32).min``, post-norm layers with erf GELU, a Tanh
    pooler on the first token. BERT-base: ``hidden=768, layers=12, heads=12, inter=3072, vocab=30522``."""

    def __init__(self, vocab: int = 30522, hidden: int = 768, layers: int = 12, heads: int = 12, inter: int = 3072,
                 max_pos: int = 512, num_labels: int = 2, sdpa: bool = False) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.token_type_embeddings = nn.Embedding(2, hidden)
        self.emb_norm, self.emb_dropout = nn.LayerNorm(hidden, eps=1e-12), nn.Dropout(0.1)
        self.register_buffer("position_ids", torch.arange(max_pos).expand((1, -1)), persistent=False)
        self.layer = nn.ModuleList([BertLayer(hidden, heads, inter, sdpa) for _ in range(layers)])
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
                ) -> torch.Tensor:
        position_ids = self.position_ids[:, : input_ids.size(1)]
        emb = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        emb = emb + self.position_embeddings(position_ids)
        h = self.emb_dropout(self.emb_norm(emb))
        ext = attention_mask[:, None, None, :].to(dtype=h.dtype)
        ext = (1.0 - ext) * torch.finfo(h.dtype).min
        for layer in self.layer:
            h = layer(h, ext)
        pooled = torch.tanh(self.pooler(h[:, 0]))
        return self.classifier(pooled)


# --- Swin Transformer (torchvision.models.swin_transformer, v1) --------------------------------------------------


def shifted_window_attention(x: torch.Tensor, qkv: nn.Linear, proj: nn.Linear, bias: torch.Tensor, window: int,
                             heads: int, shift: int) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` (square windows): pad to a multiple of the window, cyclic
    shift, window partition, attention with the relative position bias and the shifted-window mask built from
    the padded size, reverse, unshift, crop."""
    b, h, w, c = x.shape
    pad_r, pad_b = (window - w % window) % window, (window - h % window) % window
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, ph, pw, _ = x.shape
    shifts = [0 if window >= ph else shift, 0 if window >= pw else shift]
    if sum(shifts) > 0:
        x = torch.roll(x, shifts=(-shifts[0], -shifts[1]), dims=(1, 2))
    nw = (ph // window) * (pw // window)
    x = x.view(b, ph // window, window, pw // window, window, c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * nw, window * window, c)
    q, k, v = F.linear(x, qkv.weight, qkv.bias).reshape(x.size(0), x.size(1), 3, heads, c // heads).permute(
        2, 0, 3, 1, 4)
    q = q * (c // heads) ** -0.5
    attn = q.matmul(k.transpose(-2, -1)) + bias
    if sum(shifts) > 0:
        mask = x.new_zeros((ph, pw))
        hs = ((0, -window), (-window, -shifts[0]), (-shifts[0], None))
        ws = ((0, -window), (-window, -shifts[1]), (-shifts[1], None))
        count = 0
        for a in hs:
            for e in ws:
                mask[a[0]: a[1], e[0]: e[1]] = count
                count += 1
        mask = mask.view(ph // window, window, pw // window, window).permute(0, 2, 1, 3).reshape(nw, window * window)
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(x.size(0) // nw, nw, heads, x.size(1), x.size(1)) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
    x = F.linear(x, proj.weight, proj.bias)
    x = x.view(b, ph // window, pw // window, window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if sum(shifts) > 0:
        x = torch.roll(x, shifts=(shifts[0], shifts[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


class ShiftedWindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, shift: int, heads: int) -> None:
        super().__init__()
        self.window, self.shift, self.heads = window, shift, heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += window - 1
        rel[:, :, 1] += window - 1
        rel[:, :, 0] *= 2 * window - 1
        self.register_buffer("relative_position_index", rel.sum(-1).flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index]
        bias = bias.view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        return shifted_window_attention(x, self.qkv, self.proj, bias, self.window, self.heads, self.shift)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-5), nn.LayerNorm(dim, eps=1e-5)
        self.attn = ShiftedWindowAttention(dim, window, shift, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(4 * dim, dim),
                                 nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Pad to even H, W; the four strided sub-grids ``x[..., 0::2, 0::2, :]`` ... concatenated; LayerNorm;
    Linear 4C -> 2C without bias."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction, self.norm = nn.Linear(4 * dim, 2 * dim, bias=False), nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w, _ = x.shape[-3:]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class SwinTransformer(nn.Module):
    """Swin-T: ``embed=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7, patch=4`` at 224."""

    def __init__(self, embed: int = 96, depths: Sequence[int] = (2, 2, 6, 2), heads: Sequence[int] = (3, 6, 12, 24),
                 window: int = 7, patch: int = 4, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, embed, patch, patch), Permute([0, 2, 3, 1]),
                                                 nn.LayerNorm(embed))]
        dim = embed
        for i, (depth, h) in enumerate(zip(depths, heads)):
            layers.append(nn.Sequential(*[SwinBlock(dim, h, window, 0 if j % 2 == 0 else window // 2)
                                          for j in range(depth)]))
            if i + 1 < len(depths):
                layers.append(PatchMerging(dim))
                dim *= 2
        self.features = nn.Sequential(*layers)
        self.norm, self.permute = nn.LayerNorm(dim), Permute([0, 3, 1, 2])
        self.avgpool, self.flatten, self.head = nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.permute(self.norm(self.features(x)))
        return self.head(self.flatten(self.avgpool(x)))


# --- YOLOv5 (ultralytics/yolov5 models/common.py, models/yolo.py) ------------------------------------------------


class YConv(nn.Module):
    """ultralytics' Conv: Conv2d (no bias, 'same' padding), BatchNorm2d (eps 1e-3), SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=0.001, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class YBottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1, self.cv2 = YConv(c1, c2, 1), YConv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C3(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        c_ = c2 // 2
        self.cv1, self.cv2, self.cv3 = YConv(c1, c_), YConv(c1, c_), YConv(2 * c_, c2)
        self.m = nn.Sequential(*(YBottleneck(c_, c_, shortcut) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2, self.m = YConv(c1, c_), YConv(c_ * 4, c2), nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Detect(nn.Module):
    """YOLOv5's Detect in inference: per level a 1x1 conv to ``na * (5 + nc)``, view/permute to
    ``[N, na, ny, nx, no]``, Sigmoid, Split into xy / wh / conf, ``(xy * 2 + grid) * stride``,
    ``(wh * 2) ** 2 * anchor_grid``, Concat, view to ``[N, na * ny * nx, no]``; levels concatenated."""

    ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))

    def __init__(self, nc: int, ch: Sequence[int], strides: Sequence[int] = (8, 16, 32)) -> None:
        super().__init__()
        self.nc, self.no, self.nl, self.na = nc, nc + 5, len(ch), 3
        self.stride = list(strides)
        self.register_buffer("anchors", torch.tensor(self.ANCHORS, dtype=torch.float32).view(3, 3, 2)
                             / torch.tensor(strides, dtype=torch.float32).view(-1, 1, 1))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def _make_grid(self, nx: int, ny: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        d, t = self.anchors[i].device, self.anchors[i].dtype
        shape = 1, self.na, ny, nx, 2
        y, x = torch.arange(ny, device=d, dtype=t), torch.arange(nx, device=d, dtype=t)
        yv, xv = torch.meshgrid(y, x, indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        z = []
        for i in range(self.nl):
            x = self.m[i](xs[i])
            bs, _, ny, nx = x.shape
            x = x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            grid, anchor_grid = self._make_grid(nx, ny, i)
            xy, wh, conf = x.sigmoid().split((2, 2, self.nc + 1), 4)
            xy = (xy * 2 + grid) * self.stride[i]
            wh = (wh * 2) ** 2 * anchor_grid
            z.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * nx * ny, self.no))
        return torch.cat(z, 1)


class YOLOv5(nn.Module):
    """YOLOv5 v6+ (``yolov5n``: ``width=0.25, depth=0.33``; ``yolov5s``: 0.5, 0.33) at 640: backbone of Conv and
    C3 with SPPF, FPN/PAN neck with nearest Upsample and Concat, three-level anchor Detect."""

    def __init__(self, width: float = 0.25, depth: float = 0.33, nc: int = 80) -> None:
        super().__init__()

        def c(x: int) -> int:
            return make_divisible(x * width)

        def n(x: int) -> int:
            return max(round(x * depth), 1)

        self.b0, self.b1, self.b2 = YConv(3, c(64), 6, 2, 2), YConv(c(64), c(128), 3, 2), C3(c(128), c(128), n(3))
        self.b3, self.b4 = YConv(c(128), c(256), 3, 2), C3(c(256), c(256), n(6))
        self.b5, self.b6 = YConv(c(256), c(512), 3, 2), C3(c(512), c(512), n(9))
        self.b7, self.b8 = YConv(c(512), c(1024), 3, 2), C3(c(1024), c(1024), n(3))
        self.b9 = SPPF(c(1024), c(1024), 5)
        self.h10, self.up = YConv(c(1024), c(512), 1, 1), nn.Upsample(None, 2, "nearest")
        self.h13 = C3(c(1024), c(512), n(3), False)
        self.h14 = YConv(c(512), c(256), 1, 1)
        self.h17 = C3(c(512), c(256), n(3), False)
        self.h18, self.h20 = YConv(c(256), c(256), 3, 2), C3(c(512), c(512), n(3), False)
        self.h21, self.h23 = YConv(c(512), c(512), 3, 2), C3(c(1024), c(1024), n(3), False)
        self.detect = Detect(nc, (c(256), c(512), c(1024)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        h10 = self.h10(p5)
        h14 = self.h14(self.h13(torch.cat((self.up(h10), p4), 1)))
        out3 = self.h17(torch.cat((self.up(h14), p3), 1))
        out4 = self.h20(torch.cat((self.h18(out3), h14), 1))
        out5 = self.h23(torch.cat((self.h21(out4), h10), 1))
        return self.detect([out3, out4, out5])


# --- recurrent models ------------------------------------------------------------------------------------------


class LSTMTagger(nn.Module):
    """A two-layer LSTM over ``x [N, T, F]`` (batch first) with ``h0, c0 [layers, N, H]`` as inputs, a Linear on
    the last step; returns the logits and the final states."""

    def __init__(self, features: int = 40, hidden: int = 256, layers: int = 2, num_classes: int = 12) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, (h, c) = self.lstm(x, (h0, c0))
        return self.fc(y[:, -1]), h, c


class GRUTagger(nn.Module):
    """A bidirectional GRU over ``x [N, T, F]`` with ``h0 [2, N, H]`` as input, a Linear-ReLU-Linear head on every
    step; returns the per-step logits and the final state."""

    def __init__(self, features: int = 40, hidden: int = 128, num_classes: int = 12) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, h = self.gru(x, h0)
        return self.head(y), h
