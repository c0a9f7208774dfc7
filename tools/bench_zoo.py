"""Default-mode figures for the README on compact real architectures (tools/zoo_nets.py, small widths), exported
fresh, run through ``onnx-easier IN OUT --data calib.npz`` (random calibration data, the default tolerance and time
limit unless given), one row per model and exporter. (The test suite's zoo is tests/test_real_zoo.py, written after
the reference implementations.)

    python tools/bench_zoo.py [--exporters ts,dynamo] [--samples 48] [--time-limit 600] [--only resnet18,vit]
    python tools/bench_zoo.py --distill             # the same runs with --distill: the torch path on every export

Columns: activations linearized / found, compute nodes before -> after, depth before -> after, fidelity loss
(metric), latency ratio after / before (the tool's own interleaved measurement, CPU, batch 1), seconds of the run;
with ``--distill``, what distillation did: candidates distilled / accepted in the search, and the chosen model's
fidelity before -> after (kept or not) or the note that says why it was not distilled.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zoo_nets as Z

from onnx_easier.cli import main as easier

SAMPLES = 48


@dataclass
class Case:
    """A model to export: ``build()`` the module, ``example`` inputs, their names, the calibration arrays, dynamic
    axes (TorchScript) and the exporters it runs with."""

    build: Callable[[], torch.nn.Module]
    example: Callable[[], tuple]
    inputs: list[str]
    data: Callable[[int], dict[str, np.ndarray]]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    exporters: tuple[str, ...] = ("ts", "dynamo")
    slow: bool = False


def _images(side: int) -> Callable[[int], dict[str, np.ndarray]]:
    return lambda n: {"x": np.random.default_rng(7).standard_normal((n, 3, side, side)).astype(np.float32)}


def _image_case(build: Callable[[], torch.nn.Module], side: int = 64, slow: bool = False) -> Case:
    return Case(build, lambda: (torch.randn(1, 3, side, side),), ["x"], _images(side), {"x": {0: "N"}}, slow=slow)


def _tokens(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    mask = np.ones((n, 32), np.int64)
    mask[::2, 20:] = 0
    return {"ids": rng.integers(0, 1000, (n, 32)).astype(np.int64), "mask": mask}


def _sequence(gru: bool) -> Callable[[int], dict[str, np.ndarray]]:
    """Whole feeds (one more axis than the model input): the state's batch is axis 1."""
    def data(n: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(7)
        out = {"x": rng.standard_normal((n, 1, 6, 8)).astype(np.float32),
               "h0": (0.1 * rng.standard_normal((n, 1, 1, 16))).astype(np.float32)}
        if not gru:
            out["c0"] = (0.1 * rng.standard_normal((n, 1, 1, 16))).astype(np.float32)
        return out
    return data


def _recurrent(gru: bool) -> Case:
    names = ["x", "h0"] + ([] if gru else ["c0"])
    example = (lambda: (torch.randn(1, 6, 8), torch.zeros(1, 1, 16))) if gru else (
        lambda: (torch.randn(1, 6, 8), torch.zeros(1, 1, 16), torch.zeros(1, 1, 16)))
    return Case(lambda: Z.Recurrent(gru), example, names, _sequence(gru), exporters=("ts", "dynamo"))


CASES: dict[str, Case] = {
    "resnet18": _image_case(lambda: Z.ResNet(False, (2, 2, 2, 2), width=16)),
    "resnet50": _image_case(lambda: Z.ResNet(True, (3, 4, 6, 3), width=16), slow=True),
    "mobilenetv2": _image_case(lambda: Z.MobileNet("v2", 0.35)),
    "mobilenetv3": _image_case(lambda: Z.MobileNet("v3", 0.5), slow=True),
    "efficientnet_b0": _image_case(lambda: Z.MobileNet("efficientnet", 0.35), slow=True),
    "convnext_t": _image_case(lambda: Z.ConvNeXt((24, 48, 96, 192), (3, 3, 9, 3)), slow=True),
    "vit": _image_case(lambda: Z.ViT(d=64, depth=4, heads=4, patch=8, image=32), side=32),
    "swin": _image_case(lambda: Z.SwinBlock(d=48, heads=3, window=4, image=32, patch=4), side=32),
    "yolo": _image_case(lambda: Z.YoloHead(width=16)),
    "bert": Case(lambda: Z.Bert(vocab=1000, d=64, depth=2, heads=4, max_len=32),
                 lambda: (torch.randint(0, 1000, (2, 32)), torch.ones(2, 32, dtype=torch.int64)), ["ids", "mask"],
                 _tokens, {"ids": {0: "N"}, "mask": {0: "N"}}),
    "lstm": _recurrent(False),
    "gru": _recurrent(True),
}


def _export(case: Case, exporter: str, path: Path) -> None:
    torch.manual_seed(0)
    module = Z.randomize(case.build())
    kwargs = ({"dynamo": False, "opset_version": 17, "dynamic_axes": case.dynamic or None} if exporter == "ts"
              else {"dynamo": True, "external_data": False})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, case.example(), str(path), input_names=case.inputs, **kwargs)




def row(name: str, exporter: str, samples: int, time_limit: str, folder: Path, distill: bool = False) -> dict:
    case = CASES[name]
    src = folder / f"{name}_{exporter}.onnx"
    _export(case, exporter, src)
    data = folder / f"{name}.npz"
    np.savez(data, **case.data(samples))
    out, rep = folder / f"{name}_{exporter}_easier.onnx", folder / f"{name}_{exporter}.json"
    t0 = time.perf_counter()
    code = easier([str(src), str(out), "--data", str(data), "--report", str(rep), "--time-limit", time_limit, "-q",
                   *(["--distill"] if distill else [])])
    seconds = time.perf_counter() - t0
    if code != 0:
        return {"model": name, "exporter": exporter, "exit": code, "seconds": seconds}
    return {"model": name, "exporter": exporter, "exit": code, "seconds": seconds,
            **report_summary(json.loads(rep.read_text()))}


def report_summary(r: dict) -> dict:
    """The table's figures from one report: linearized / activations, compute nodes and depth before and after,
    fidelity (metric, value), latency ratio, whether the time limit cut the search short."""
    acts = r["activations"]
    return {"linearized": sum(a["action"] == "linearized" for a in acts), "activations": len(acts),
            "compute": (r["before"]["compute_nodes"], r["after"]["compute_nodes"]),
            "depth": (r["before"]["depth"], r["after"]["depth"]),
            "fidelity": (r["fidelity"]["metric"], r["fidelity"]["value"]), "ratio": r["latency_ms"]["ratio"],
            "cut_short": r.get("time_limit", {}).get("cut_short", False), "distill": distill_summary(r.get("distill"))}


def distill_summary(d: dict | None) -> str:
    """``--distill``'s outcome in a few words ("" without it)."""
    if not d:
        return ""
    search = d.get("search", {})
    inside = f"{search.get('distilled', 0)} distilled / {search.get('accepted', 0)} accepted; "
    if "note" in d:
        return inside + d["note"]
    return inside + f"{d['before']:.4g} -> {d['after']:.4g} {'kept' if d['kept'] else 'not kept'}, {d['steps']} steps"


def table(rows: list[dict]) -> str:
    lines = ["| model | exporter | linearized | compute nodes | depth | fidelity loss | latency ratio | seconds | distill |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["exit"] != 0:
            lines.append(f"| {r['model']} | {r['exporter']} | exit {r['exit']} | | | | | {r['seconds']:.0f} | |")
            continue
        cut = " (time limit)" if r["cut_short"] else ""
        lines.append(f"| {r['model']} | {r['exporter']} | {r['linearized']}/{r['activations']}{cut} | "
                     f"{r['compute'][0]} -> {r['compute'][1]} | {r['depth'][0]} -> {r['depth'][1]} | "
                     f"{r['fidelity'][1]:.4f} ({r['fidelity'][0]}) | {r['ratio']:.3f} | {r['seconds']:.0f} | "
                     f"{r['distill']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exporters", default="ts,dynamo")
    p.add_argument("--samples", type=int, default=SAMPLES)
    p.add_argument("--time-limit", default="600")
    p.add_argument("--only", default="", help="comma-separated model names (default: all)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--distill", action="store_true", help="run each with --distill")
    args = p.parse_args(argv)
    names = [n for n in CASES if not args.only or n in args.only.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for exporter in args.exporters.split(","):
                if exporter not in CASES[name].exporters:
                    continue
                rows.append(row(name, exporter, args.samples, args.time_limit, Path(tmp), args.distill))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
