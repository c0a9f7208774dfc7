"""How close can a token model with every FFN collapsed come to the original at all? An upper bound for distillation.

    python tools/bench_ceiling.py                          # ffn_digits and ffn_wide_digits, 200 epochs
    python tools/bench_ceiling.py --models ffn_wide_digits --epochs 300 --json ceiling.json

Collapsing an FFN ``x + W2 GELU(W1 LN(x) + b1) + b2`` leaves ``x + W LN(x) + b``: with every FFN of a TokenFFN
(tools/zoo.py) collapsed, the model is ``head(mean_t(h_T))`` with ``h_0 = embed(x) + pos`` and ``h_i = h_{i-1} +
W_i LN_i(h_{i-1}) + b_i``, linear but for the LayerNorms. Whatever a distillation does to such a graph, the result is
a member of that family, so the family's best fit to the original bounds what it can reach. Here the family is
trained with more freedom than the tool gives a distillation (every weight, LayerNorms and position embedding
included; AdamW, cosine schedule, batch 64, ``--epochs`` epochs, a fresh random start of the collapsed maps and the
original's other weights) to the original's outputs by KL(original || model), on

- ``tool``: the samples a distillation in the tool sees (fit + check of the tool's split of the calibration file at
  ``--tolerance``, seed 0);
- ``calib``: the whole calibration file (more than the tool ever trains on).

Reported per model and data set, over the recipes (``RECIPES``) and the evaluations every ``EVERY`` epochs: the
best on the TEST split (chosen on the test split itself, so optimistic: a ceiling) of the tool's fidelity loss
(fidelity.measure_fidelity, ``agreement``: max(top-1 flips, 0.11 sqrt(KL))) against the original, and the test
accuracy of that point. A candidate with every FFN collapsed can be accepted at a tolerance only if this loss is
within it (the tool judges on held-out calibration samples, not the test split: the figures are of the same kind).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import onnx
import torch
from bench_easier import MODELS_DIR, digits_case
from onnx import numpy_helper
from torch import nn

from onnx_easier.data import input_specs, load_data
from onnx_easier.fidelity import holdout_needed, measure_fidelity
from onnx_easier.model_io import make_session
from onnx_easier.select import permuted_split

MODELS = ("ffn_digits", "ffn_wide_digits")
RECIPES = ((1e-3, 0.05), (3e-3, 0.05))  # (AdamW learning rate, weight decay): the best two of a wider sweep
EVERY = 25  # epochs between evaluations on the test split
BATCH = 64


class Collapsed(nn.Module):
    """TokenFFN (tools/zoo.py) with each FFN replaced by one ``Linear(dim, dim)`` after its LayerNorm."""

    def __init__(self, dim: int, depth: int, tokens: int, patch: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.maps = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for norm, linear in zip(self.norms, self.maps):
            h = h + linear(norm(h))
        return self.head(h.mean(dim=1))


def collapsed_from(original: onnx.ModelProto) -> Collapsed:
    """The collapsed family of ``original`` (a TokenFFN export: initializers ``embed.weight``, ``pos``,
    ``blocks.<i>.ffn.0.weight`` ...), its embedding, position, LayerNorms and head set to the original's."""
    w = {i.name: numpy_helper.to_array(i) for i in original.graph.initializer}
    dim, _, patch, _ = w["embed.weight"].shape
    depth = sum(1 for k in w if k.startswith("blocks.") and k.endswith(".ffn.0.weight"))
    head = next(n for n in original.graph.node if n.op_type == "Gemm")
    net = Collapsed(dim, depth, w["pos"].shape[1], patch, w[head.input[1]].shape[0])
    with torch.no_grad():
        for name, value in (("embed.weight", "embed.weight"), ("embed.bias", "embed.bias"), ("pos", "pos"),
                            ("head.weight", head.input[1]), ("head.bias", head.input[2]),
                            *((f"norms.{i}.{p}", f"blocks.{i}.ffn.0.{p}") for i in range(depth)
                              for p in ("weight", "bias"))):
            net.get_parameter(name).copy_(torch.from_numpy(w[value].copy()))
    return net


def train(net: Collapsed, x: np.ndarray, z: np.ndarray, x_test: np.ndarray, z_test: np.ndarray, y_test: np.ndarray,
          lr: float, decay: float, epochs: int, seed: int) -> list[dict]:
    """KL(softmax(z) || softmax(net(x))) by AdamW (cosine schedule); an evaluation on the test split every EVERY
    epochs: the tool's fidelity against the original's test outputs ``z_test``, and the accuracy on ``y_test``."""
    gen = torch.Generator().manual_seed(seed)
    xs, target = torch.from_numpy(x), torch.log_softmax(torch.from_numpy(z).double(), dim=1).float()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    points = []
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(len(xs), generator=gen).split(BATCH):
            logq = torch.log_softmax(net(xs[batch]), dim=1)
            loss = (target[batch].exp() * (target[batch] - logq)).sum(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if epoch % EVERY == 0 or epoch == epochs:
            with torch.no_grad():
                out = net(torch.from_numpy(x_test)).numpy()
            fid = measure_fidelity([z_test], [out], "agreement")
            points.append({"epoch": epoch, "lr": lr, "decay": decay, "loss": float(fid.value),
                           "flip": float(fid.components["flip_loss"]), "kl": float(fid.components["mean_kl"]),
                           "accuracy": float((out.argmax(1) == y_test).mean() * 100)})
    return points


def tool_samples(path: Path, model: onnx.ModelProto, tolerance: float) -> np.ndarray:
    """The fit + check samples of the tool's split (select.permuted_split, seed 0) of the calibration file."""
    data = load_data(str(path), input_specs(model))
    _, (fit, check, _) = permuted_split(data, 1, 0, holdout_needed("agreement", tolerance))
    return np.concatenate([f["x"] for part in (fit, check) for f in part.batches(1 << 20)])


def ceiling(name: str, epochs: int, tolerance: float, seed: int) -> dict:
    case = digits_case(name, MODELS_DIR)
    session = make_session(case.original)
    with np.load(case.calib) as f:
        calib = f["x"]
    z_test = session.run(None, {"x": case.x_test})[0]
    rows = []
    for data, x in (("tool", tool_samples(case.calib, case.original, tolerance)), ("calib", calib)):
        z = session.run(None, {"x": x})[0]
        t0 = time.perf_counter()
        points = []
        for lr, decay in RECIPES:
            torch.manual_seed(seed)
            points += train(collapsed_from(case.original), x, z, case.x_test, z_test, case.y_test, lr, decay,
                            epochs, seed)
        best = min(points, key=lambda p: (p["loss"], -p["accuracy"]))
        rows.append({"data": data, "samples": len(x), "seconds": round(time.perf_counter() - t0, 1), "best": best})
        print(f"{name} {data} ({len(x)} samples): best test fidelity loss {best['loss']:.4f} (flip {best['flip']:.4f},"
              f" KL {best['kl']:.4f}), test accuracy {best['accuracy']:.2f} (original {case.accuracy:.2f}) at "
              f"epoch {best['epoch']}, lr {best['lr']:g}", flush=True)
    return {"model": name, "original_accuracy": case.accuracy, "rows": rows}


def table(results: list[dict]) -> str:
    lines = ["| model | trained on | samples | best test fidelity loss (flip, KL) | test accuracy (original) |",
             "|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            b = r["best"]
            lines.append(f"| {res['model']} | {r['data']} | {r['samples']} | {b['loss']:.4f} ({b['flip']:.4f}, "
                         f"{b['kl']:.3f}) | {b['accuracy']:.2f} ({res['original_accuracy']:.2f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--tolerance", type=float, default=0.01, help="the tool's split of the calibration file at it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    results = [ceiling(m, a.epochs, a.tolerance, a.seed) for m in a.models]
    print(table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
