"""Realistic sizes: the CLI on torchvision architectures at 224x224 with 256 random samples, in both modes, with
the wall time, CPU time and peak RSS of the run.

    python tools/bench_scale.py [--models resnet50,convnext_tiny,efficientnet_b0,mobilenet_v3_large,vit_s16]
                                [--modes exact,default] [--samples 256] [--exporters ts] [--time-limit S]
                                [--vit-layers 12] [--work /tmp/bench_scale] [--json rows.json]

Each model is exported once (``torch.onnx.export``, opset 17; ``ts``: the TorchScript exporter, ``dynamo=False``;
``dynamo``: the dynamo exporter), with a dynamic batch axis, untrained (torchvision's initialisation, seed 0; no
weights are downloaded), and cached under ``--work`` with its random samples (``.npz``, standard normal). Each run
is ``onnx-easier M.onnx OUT.onnx --data D.npz --report R.json`` in a child process (``exact`` adds
``--tolerance 0``, ``default`` nothing), measured by ``os.wait4`` on that child: wall seconds, CPU seconds
(user + system) and peak RSS (``ru_maxrss``). The rest comes from the report: search trials, activations
linearized, compute nodes before -> after, latency ratio after / before (the tool's own interleaved measurement).

``vit_s16`` is torchvision's ``VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=6,
hidden_dim=384, mlp_dim=1536)``: a ViT-S/16-size encoder. torchvision is needed only here (not by the package).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np

MODELS = ("resnet50", "convnext_tiny", "efficientnet_b0", "mobilenet_v3_large", "vit_s16")
MODES = {"exact": ["--tolerance", "0"], "default": []}
SIZE = 224


def build(name: str, vit_layers: int):
    """The untrained torchvision model ``name`` (seed 0), in eval mode."""
    import torch

    # torchvision's meta registrations need a torch build they match; the models do not use them
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision

    torch.manual_seed(0)
    if name == "vit_s16":
        model = torchvision.models.VisionTransformer(image_size=SIZE, patch_size=16, num_layers=vit_layers,
                                                     num_heads=6, hidden_dim=384, mlp_dim=1536)
    else:
        model = getattr(torchvision.models, name)(weights=None)
    return model.eval()


def export(name: str, exporter: str, path: Path, vit_layers: int) -> None:
    """``name`` exported to ``path`` at opset 17 with a dynamic batch axis (traced at batch 2)."""
    import torch

    model = build(name, vit_layers)
    x = torch.randn(2, 3, SIZE, SIZE)
    tmp = path.with_suffix(".tmp.onnx")
    # not under torch.no_grad(): nn.MultiheadAttention would take its fused fast path, which TorchScript cannot export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        if exporter == "ts":
            torch.onnx.export(model, (x,), str(tmp), opset_version=17, dynamo=False, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
        else:
            batch = torch.export.Dim("N", min=1, max=1024)
            torch.onnx.export(model, (x,), str(tmp), opset_version=17, dynamo=True, input_names=["x"],
                              output_names=["y"], dynamic_shapes={"x": {0: batch}}, external_data=False)
    tmp.replace(path)


def prepare(name: str, exporter: str, samples: int, work: Path, vit_layers: int) -> tuple[Path, Path]:
    """The cached model and data (exported / drawn only when missing)."""
    tag = f"{name}_{vit_layers}blocks" if name == "vit_s16" else name
    model = work / f"{tag}_{exporter}.onnx"
    data = work / f"data{SIZE}_{samples}.npz"
    if not model.exists():
        t0 = time.perf_counter()
        export(name, exporter, model, vit_layers)
        print(f"exported {model} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    if not data.exists():
        x = np.random.default_rng(0).standard_normal((samples, 3, SIZE, SIZE), dtype=np.float32)
        np.savez(data.with_suffix(".tmp.npz"), x=x)
        data.with_suffix(".tmp.npz").replace(data)
    return model, data


def run(model: Path, data: Path, mode: str, extra: list[str], work: Path) -> dict:
    """One CLI run in a child process, measured by wait4 (that child only), and its report's figures."""
    stem = f"{model.stem}_{mode}"
    out, rep, log = work / f"{stem}_easier.onnx", work / f"{stem}.json", work / f"{stem}.log"
    rep.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", "import sys; from onnx_easier.cli import main; sys.exit(main())",
           str(model), str(out), "--data", str(data), "--report", str(rep), *MODES[mode], *extra]
    t0 = time.perf_counter()
    with open(log, "w") as err:
        child = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    row = {"model": model.stem, "mode": mode, "exit": child.returncode, "wall": time.perf_counter() - t0,
           "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024, "command": " ".join(cmd[3:])}
    if not rep.exists():
        lines = [x for x in log.read_text().splitlines() if x.strip()]
        return {**row, "error": (lines[-1] if lines else "")[:200]}
    r = json.loads(rep.read_text())
    acts = r["activations"]
    lat = r.get("latency_ms") or {}
    return {**row, "trials": r.get("trials", 0), "linearized": sum(a["action"] == "linearized" for a in acts),
            "activations": len(acts), "compute": (r["before"]["compute_nodes"], r["after"]["compute_nodes"]),
            "ratio": lat.get("ratio"), "cut_short": (r.get("time_limit") or {}).get("cut_short", False),
            "phases": r.get("phases") or r.get("seconds")}


def table(rows: list[dict]) -> str:
    lines = [("| model | mode | wall (s) | CPU (s) | peak RSS (MB) | trials | linearized | compute nodes | "
              "latency ratio |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} | {r['mode']} | {r['wall']:.0f} | {r['cpu']:.0f} | {r['rss_mb']:.0f} |"
        if "error" in r:
            lines.append(f"{head} exit {r['exit']}: {r['error']} | | | |")
            continue
        cut = " (time limit)" if r["cut_short"] else ""
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"{head} {r['trials']} | {r['linearized']}/{r['activations']}{cut} | "
                     f"{r['compute'][0]} -> {r['compute'][1]} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--modes", default=",".join(MODES), help="exact (--tolerance 0), default")
    p.add_argument("--exporters", default="ts", help="ts (TorchScript, dynamo=False), dynamo")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--time-limit", help="the tool's --time-limit (seconds; default: the tool's own)")
    p.add_argument("--vit-layers", type=int, default=12, help="encoder blocks of vit_s16")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_scale"), help="cache of exports, data, reports")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in models if m not in MODELS] + [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown model or mode: {', '.join(bad)}")
    extra = ["-q"] + (["--time-limit", args.time_limit] if args.time_limit else [])
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for exporter in [e for e in args.exporters.split(",") if e]:
        for name in models:
            model, data = prepare(name, exporter, args.samples, args.work, args.vit_layers)
            for mode in modes:
                rows.append(run(model, data, mode, extra, args.work))
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
