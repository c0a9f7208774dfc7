"""A model the tool has never seen, for trying it as a user would: an MLP-Mixer trained on the digits, both exporters.

    python tools/train_mixer.py --out out/mixer            # about 1.5 minutes on 2 CPU cores
    python tools/bench_distill.py --models-dir out/mixer --models mixer_ts mixer_dynamo --tolerances 0.01

The architecture is none of the example models' (tools/train_digits.py) nor the zoo's (tools/zoo.py): the 16x16
digits cut into 4x4 patches (a Conv of stride 4: 16 tokens of 192), 4 Mixer blocks of pre-norm residual
``h + TokenMLP(LN(h)^T)^T`` (16 -> 64 -> 16, GELU tanh approximation) and ``h + FFN(LN(h))`` (192 -> 768 -> 192, exact
GELU), a LayerNorm, the mean over tokens and a linear head. Trained with AdamW (1e-3, weight decay 0.05) on a
cosine schedule, batches of 64, ``--epochs`` epochs, +-1 pixel random shifts and label smoothing 0.05, torch seed 1,
on the calibration split (``models/digits16_calib.npz``, the labels from ``sklearn.datasets.load_digits`` split as
tools/train_digits.py splits them); test accuracy on ``models/digits16_test.npz`` is printed.

Written to ``--out``: ``mixer_dynamo.onnx`` (torch.export-based exporter, opset 18: GELUs as Erf / Tanh arithmetic,
LayerNormalization ops; its weights in ``mixer_dynamo.onnx.data`` as that exporter writes them), ``mixer_ts.onnx``
(TorchScript exporter, opset 14: the LayerNorms decomposed too), each with the batch axis dynamic, and a copy of the
digits16 data files, so that ``--out`` serves as ``--models-dir`` of the benchmarks.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_digits  # a sibling script in tools/, not a package

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
TOKENS, WIDTH, HIDDEN, TOKEN_HIDDEN, BLOCKS = 16, 192, 768, 64, 4


class MixerBlock(nn.Module):
    """``h + TokenMLP(LN(h)^T)^T``, then ``h + FFN(LN(h))``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH)
        self.tokens = nn.Sequential(nn.Linear(TOKENS, TOKEN_HIDDEN), nn.GELU(approximate="tanh"),
                                    nn.Linear(TOKEN_HIDDEN, TOKENS))
        self.norm2 = nn.LayerNorm(WIDTH)
        self.ffn = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.tokens(self.norm1(h).transpose(1, 2)).transpose(1, 2)
        return h + self.ffn(self.norm2(h))


class Mixer(nn.Module):
    """Patches (Conv 4x4, stride 4) -> BLOCKS Mixer blocks -> LayerNorm -> mean over tokens -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, WIDTH, 4, 4)
        self.blocks = nn.Sequential(*[MixerBlock() for _ in range(BLOCKS)])
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(h)).mean(1))


def labels() -> np.ndarray:
    """The calibration split's labels: tools/train_digits.py's split of load_digits (its x is the .npz file)."""
    return train_digits.load_split(16).y_train


def train(x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int = 64) -> Mixer:
    """The recipe of the module doc; the model in eval mode."""
    torch.manual_seed(1)
    model = Mixer()
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(x) // batch))
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            shift = (int(torch.randint(-1, 2, ())), int(torch.randint(-1, 2, ())))
            loss = F.cross_entropy(model(torch.roll(x[idx], shift, dims=(2, 3))), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def export(model: Mixer, example: torch.Tensor, out: Path) -> None:
    """Both exporters, batch axis dynamic (module doc); their notices about each other silenced."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.onnx.export(model, (example,), str(out / "mixer_dynamo.onnx"), input_names=["x"], output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("N")}}, dynamo=True, opset_version=18,
                      verbose=False)
    torch.onnx.export(model, (example,), str(out / "mixer_ts.onnx"), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "N"}}, dynamo=False, opset_version=14)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/mixer"), help="folder of the exports and data files")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with np.load(MODELS_DIR / "digits16_calib.npz") as calib, np.load(MODELS_DIR / "digits16_test.npz") as test:
        x, x_test, y_test = torch.from_numpy(calib["x"]), torch.from_numpy(test["x"]), test["y"]
    model = train(x, torch.from_numpy(labels()), args.epochs)
    with torch.no_grad():
        acc = float((model(x_test).argmax(1).numpy() == y_test).mean() * 100)
    print(f"test accuracy {acc:.2f}%", file=sys.stderr)
    export(model, x[:2], args.out)
    for name in ("digits16_calib.npz", "digits16_test.npz"):
        shutil.copyfile(MODELS_DIR / name, args.out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
