"""Train the example models in ``models/`` on scikit-learn's digits and export them to ONNX.

    python tools/train_digits.py                      # every model, about 3 minutes on 2 idle CPU cores
    python tools/train_digits.py --only resnet_digits # one model (its data files are rewritten too)

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, pixel values 0..16, 10 classes), split once with
``train_test_split(test_size=0.3, stratify=y, random_state=0)``. Each model sees the images upsampled to its
resolution ``R`` with ``torch.nn.functional.interpolate`` and normalised as ``x = (pixel / 16 - 0.25) / 0.5``.
All the arithmetic is exact in float32 (dyadic weights on small integers), so the data files are bit-for-bit
reproducible. Per resolution two files are written:

- ``models/digits<R>_calib.npz``: ``x`` = the train split, float32 ``[1257, 1, R, R]``: the calibration data
  users pass with ``--data``;
- ``models/digits<R>_test.npz``: ``x``, ``y`` = the held-out test split, ``[540, 1, R, R]`` and int64 ``[540]``.

R = 16 is upsampled bilinearly. R = 64 is upsampled by pixel replication (``mode="nearest"``): bilinear
64x64 data would take 8 MB even compressed, replicated pixels take 0.25 MB, and ``models/`` has a 4 MB budget.

Each model is trained with Adam and a cosine learning-rate schedule under fixed seeds, put in ``eval()``
mode and exported with the TorchScript exporter (opset 17, input ``x``, output ``logits``, batch axis
``N``). The test accuracy goes to ``models/accuracy.json`` (percent) and the table in ``models/README.md``
is rewritten from the files on disk.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

try:  # run as a script: tools/ is on sys.path
    import zoo
except ModuleNotFoundError:  # imported as tools.train_digits from the repository root
    from tools import zoo

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
SEED = 0
TEST_SIZE = 0.3
PIXEL_MAX = 16.0
MEAN, STD = 0.25, 0.5
UPSAMPLE_MODE = {16: "bilinear", 64: "nearest"}
OPSET = 17


@dataclass(frozen=True)
class ModelSpec:
    """One example model: how to build it, what it eats and how long to train it."""

    name: str
    resolution: int
    build: Callable[[], nn.Module]
    summary: str
    epochs: int
    lr: float = 3e-3
    batch_size: int = 64


SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "vgg_digits",
        16,
        lambda: zoo.VGG(config=(16, 16, "M", 32, 32, "M"), resolution=16, hidden=32),
        "VGG: 4x Conv3x3-BN-ReLU (16,16,32,32), 2 max pools, MLP 512-32-32-10",
        epochs=20,
    ),
    ModelSpec(
        "resnet_digits",
        16,
        lambda: zoo.ResNet(widths=(16, 32), depths=(2, 2), resolution=16),
        "ResNet: stem 16, 4 BasicBlocks (16,16,32s2,32), GAP, Linear",
        epochs=20,
    ),
    ModelSpec(
        "mobilenetv2_digits",
        16,
        lambda: zoo.MobileNetV2(
            stem=16,
            blocks=((4, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2), (4, 32, 1), (4, 32, 1)),
            last=64,
            resolution=16,
        ),
        "MobileNetV2: stem 16, 6 inverted residuals t=4 (16,24s2,24,32s2,32,32), 1x1 64, GAP, Linear",
        epochs=20,
    ),
    ModelSpec(
        "ffn_digits",
        16,
        lambda: zoo.TokenFFN(dim=64, depth=4, resolution=16, patch=4),
        "TokenFFN: 16 tokens of 4x4, d=64, 4 blocks LN-FFN(64-256-64, GELU), mean pool, Linear",
        epochs=40,
        lr=2e-3,
    ),
    ModelSpec(
        "mobilenetv2_wide_digits",
        64,
        lambda: zoo.MobileNetV2(
            stem=32,
            stem_stride=2,
            blocks=((6, 32, 2), (6, 32, 1), (6, 32, 1), (6, 48, 2), (6, 48, 1), (6, 48, 1)),
            last=96,
            resolution=64,
        ),
        "MobileNetV2: stem 32 s2, 6 inverted residuals t=6 (32s2,32,32,48s2,48,48), 1x1 96, GAP, Linear",
        epochs=8,
    ),
    ModelSpec(
        "ffn_wide_digits",
        16,
        lambda: zoo.TokenFFN(dim=192, depth=2, resolution=16, patch=4),
        "TokenFFN: 16 tokens of 4x4, d=192, 2 blocks LN-FFN(192-768-192, GELU), mean pool, Linear",
        epochs=30,
        lr=1e-3,
    ),
)


@dataclass(frozen=True)
class Split:
    """The digits split at one resolution: inputs ``[N, 1, R, R]`` float32, labels ``[N]`` int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def preprocess(images: np.ndarray, resolution: int) -> np.ndarray:
    """8x8 digits with pixels 0..16 ``[N, 8, 8]`` -> normalised model inputs ``[N, 1, R, R]`` float32."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None]
    size = (resolution, resolution)
    if UPSAMPLE_MODE[resolution] == "bilinear":
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    else:
        x = F.interpolate(x, size=size, mode="nearest")
    return ((x / PIXEL_MAX - MEAN) / STD).numpy()


def load_split(resolution: int) -> Split:
    """The fixed stratified split (seed 0, 30% test) of ``load_digits``, preprocessed for ``resolution``."""
    digits = load_digits()
    img_train, img_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=TEST_SIZE, stratify=digits.target, random_state=SEED
    )
    return Split(
        preprocess(img_train, resolution),
        y_train.astype(np.int64),
        preprocess(img_test, resolution),
        y_test.astype(np.int64),
    )


def write_data(split: Split, resolution: int, out: Path) -> None:
    """Write ``digits<R>_calib.npz`` (train inputs) and ``digits<R>_test.npz`` (test inputs and labels)."""
    np.savez_compressed(out / f"digits{resolution}_calib.npz", x=split.x_train)
    np.savez_compressed(out / f"digits{resolution}_test.npz", x=split.x_test, y=split.y_test)


def train(spec: ModelSpec, split: Split) -> nn.Module:
    """Build ``spec``'s model under a fixed seed and train it with Adam + cosine decay (cross entropy).

    Training runs in channels-last layout (about twice as fast for the depthwise convolutions on CPU);
    the returned model is back in the default layout, in eval mode.
    """
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    model = spec.build().to(memory_format=torch.channels_last)
    x = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train)
    steps_per_epoch = -(-len(x) // spec.batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(spec.epochs):
        for idx in torch.randperm(len(x), generator=order).split(spec.batch_size):
            loss = F.cross_entropy(model(x[idx].contiguous(memory_format=torch.channels_last)), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent of an eval-mode ``model``."""
    predicted = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predicted == y).mean() * 100)


def export(model: nn.Module, resolution: int, path: Path) -> None:
    """Export an eval-mode model to ONNX (opset 17, ``x [N, 1, R, R] -> logits [N, 10]``) and check it."""
    dummy = torch.zeros(1, 1, resolution, resolution)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def onnx_params(path: Path) -> int:
    """Number of floating-point weights stored in an ONNX file."""
    model = onnx.load(str(path))
    return sum(
        int(numpy_helper.to_array(t).size)
        for t in model.graph.initializer
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    )


def write_readme(out: Path, accuracies: dict[str, float]) -> None:
    """Rewrite ``README.md`` from the models and data files present in ``out``."""
    rows = []
    for spec in SPECS:
        path = out / f"{spec.name}.onnx"
        if not path.exists() or spec.name not in accuracies:
            continue
        rows.append(
            f"| `{spec.name}` | 1x{spec.resolution}x{spec.resolution} | {onnx_params(path):,} "
            f"| {accuracies[spec.name]:.2f} | {path.stat().st_size / 1024:.0f} | {spec.summary} |"
        )
    data_rows = []
    for path in sorted(out.glob("digits*_*.npz")):
        with np.load(path) as data:
            shapes = ", ".join(f"`{key}` {data[key].dtype} {list(data[key].shape)}" for key in data.files)
        data_rows.append(f"| `{path.name}` | {shapes} | {path.stat().st_size / 1024:.0f} |")
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file() and p.name != "README.md")
    text = "\n".join(
        [
            "# Example models",
            "",
            "Small classifiers trained on scikit-learn's bundled digits data set (1797 8x8 images, 10 classes),",
            "used by the tests and benchmarks. All take `x: float32[N, 1, R, R]` and return `logits: float32[N, 10]`",
            "(TorchScript exporter, opset 17, batch axis `N`, BatchNorm folded into the convolutions by the exporter).",
            "",
            "Regenerate everything (about 3 minutes on 2 idle CPU cores; seeded, so reruns on one machine agree):",
            "",
            "    python tools/train_digits.py",
            "    python tools/train_digits.py --only NAME   # one model",
            "",
            "Architectures: `tools/zoo.py`. Accuracy (top-1, %) is on the held-out test split, also in `accuracy.json`;",
            "params counts the float weights in the ONNX file. ReLU6 exports as `Clip`, GELU as the `Erf` formula.",
            "",
            "| model | input | params | test acc. (%) | size (KB) | architecture |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "## Data",
            "",
            "Split: `train_test_split(test_size=0.3, stratify=y, random_state=0)`. Inputs are the 8x8 images",
            "upsampled to R (bilinear for R=16; pixel replication for R=64, because bilinear 64x64 data would take",
            "8 MB even compressed) and normalised as",
            "`x = (pixel / 16 - 0.25) / 0.5`. The `calib` files hold the train split: pass them with `--data`.",
            "The `test` files hold the test split with labels; the optimizer never sees them.",
            "",
            "| file | arrays | size (KB) |",
            "|---|---|---|",
            *data_rows,
            "",
            f"Total size of `models/`: {total / 2**20:.2f} MiB.",
            "",
        ]
    )
    (out / "README.md").write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    names = [spec.name for spec in SPECS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=names, metavar="NAME", help=f"one of {names}")
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="output folder (default: models/)")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads (default 2; use 1 on a machine shared with other jobs)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    accuracy_path = args.out / "accuracy.json"
    accuracies: dict[str, float] = json.loads(accuracy_path.read_text()) if accuracy_path.exists() else {}
    selected = [spec for spec in SPECS if not args.only or spec.name in args.only]
    splits: dict[int, Split] = {}
    start = time.perf_counter()
    for spec in selected:
        if spec.resolution not in splits:
            splits[spec.resolution] = load_split(spec.resolution)
            write_data(splits[spec.resolution], spec.resolution, args.out)
        split = splits[spec.resolution]
        tic = time.perf_counter()
        model = train(spec, split)
        seconds = time.perf_counter() - tic
        accuracies[spec.name] = round(accuracy(model, split.x_test, split.y_test), 2)
        path = args.out / f"{spec.name}.onnx"
        export(model, spec.resolution, path)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{spec.name:26s} {params:>8,} params  test acc {accuracies[spec.name]:6.2f}%  "
            f"train {seconds:5.1f}s  {path.stat().st_size / 1024:6.0f} KB"
        )
    ordered = {spec.name: accuracies[spec.name] for spec in SPECS if spec.name in accuracies}
    accuracy_path.write_text(json.dumps(ordered, indent=2) + "\n")
    write_readme(args.out, accuracies)
    print(f"total {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
