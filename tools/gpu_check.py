"""Device check of ``--provider cuda`` (issue 13, item 7): run by tools/gpu_check.sh, which sets up the packages.

For each model (the shipped models/vgg_digits.onnx, and a MobileNetV2-style net at 3x128x128 exported here with
torch) and each configuration (``--provider cuda`` with ``--tolerance 0`` and the default, then ``--provider cpu``
for comparison), one ``onnx-easier`` run in a child process of its own (``--run``: CLI ``main`` in-process, with
every ``ort.InferenceSession`` recorded: the onnx_easier module that asked for it, the providers it asked for and
those it got). Printed per run: exit code, wall and CPU seconds, the report's latency figures, the sessions per
module and provider; each written model is also compared with the original on CPU on samples the run never saw.
Everything goes to ``$OUT/gpu_check.json`` (reports included); runs left when ``--budget`` seconds are spent are
skipped (per model, both modes, each on cuda then on cpu).

    python3 tools/gpu_check.py --out DIR [--skip-cuda] [--budget 200]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT = "30"  # --time-limit of the default-mode runs: the whole check must end within 5 minutes
RUN_TIMEOUT = 150  # seconds per child run


# ---------------------------------------------------------------------------------------------------------------
# child: one CLI run with every ORT session recorded


def session_caller() -> str:
    """The innermost onnx_easier module on the stack that asked for a session (model_io and execution are the
    plumbing, except execution.resolve's probe); called from a wrapped ``ort.InferenceSession.__init__``."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        plumbing = module in ("onnx_easier.model_io", "onnx_easier.execution") and frame.f_code.co_name != "resolve"
        if module.startswith("onnx_easier.") and not plumbing:
            return module.rsplit(".", 1)[1]
        frame = frame.f_back
    return "?"


def run_child(record: str, argv: list[str]) -> int:
    if os.environ.get("GPU_CHECK_IMPORT_TORCH"):
        import torch  # noqa: F401 - loads the CUDA / cuDNN libraries that onnxruntime-gpu then finds

    import onnxruntime as ort

    sessions: dict[str, dict[str, int]] = {}
    real = ort.InferenceSession

    class Recorded(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            asked = kwargs.get("providers") or (args[2] if len(args) > 2 else None) or ["default"]
            asked_names = "+".join(p if isinstance(p, str) else p[0] for p in asked)
            key = f"asked {asked_names} -> got {'+'.join(self.get_providers())}"
            per = sessions.setdefault(session_caller(), {})
            per[key] = per.get(key, 0) + 1

    ort.InferenceSession = Recorded
    from onnx_easier.cli import main

    t0, c0 = time.perf_counter(), time.process_time()
    code = main(argv)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(record).write_text(json.dumps({"exit": code, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                                        "peak_rss_mb": round(peak), "sessions": sessions}))
    return code


# ---------------------------------------------------------------------------------------------------------------
# parent: models, runs, summary


def mbv2(path: Path, data: Path, fresh: Path) -> None:
    """A MobileNetV2-style net (inverted residuals, ReLU6, BatchNorm with non-trivial statistics), 3x128x128, 10
    classes, random weights; exported with torch's TorchScript exporter (dynamic batch); 256 calibration samples
    and 64 fresh ones (random images: the entropies describe no real input, which does not matter here)."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    def cbr(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
        bn = nn.BatchNorm2d(cout)
        with torch.no_grad():
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
        return [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), bn] + ([nn.ReLU6()] if act else [])

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, s: int, t: int) -> None:
            super().__init__()
            h = cin * t
            self.body = nn.Sequential(*cbr(cin, h, 1), *cbr(h, h, 3, s, h), *cbr(h, cout, 1, act=False))
            self.skip = s == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x) if self.skip else self.body(x)

    cfg = [(16, 1, 1, 1), (24, 2, 2, 6), (32, 3, 2, 6), (64, 3, 2, 6), (96, 2, 1, 6), (160, 2, 2, 6)]
    layers: list[nn.Module] = [*cbr(3, 32, 3, 2)]
    cin = 32
    for cout, n, s, t in cfg:
        for i in range(n):
            layers.append(Block(cin, cout, s if i == 0 else 1, t))
            cin = cout
    layers += [*cbr(cin, 640, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(640, 10)]
    net = nn.Sequential(*layers).eval()
    x = torch.randn(2, 3, 128, 128)
    torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17,
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, dynamo=False)
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((256, 3, 128, 128), dtype=np.float32))
    np.savez(fresh, x=rng.standard_normal((64, 3, 128, 128), dtype=np.float32))


def cuda_probe(import_torch: bool) -> tuple[bool, str]:
    """Whether execution.resolve("cuda") passes in a fresh process (with torch imported first, or not)."""
    code = ("import sys\nif sys.argv[1] == '1':\n    import torch\nimport onnxruntime as ort\n"
            "from onnx_easier.execution import resolve\nresolve('cuda')\nprint('device', ort.get_device())")
    proc = subprocess.run([sys.executable, "-c", code, "1" if import_torch else "0"], check=False,
                          capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode == 0, lines[-1] if lines else ""


def compare_on_cpu(original: Path, written: Path, fresh: Path) -> dict:
    """Top-1 agreement and max relative error (max|a-b| / max(1, max|a|)) of ``written`` against ``original`` on
    ``fresh`` samples, both on CPU."""
    import onnxruntime as ort

    x = np.load(fresh)["x"]
    out = []
    for p in (original, written):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        out.append(np.concatenate([s.run(None, {"x": x[i:i + 32]})[0] for i in range(0, len(x), 32)]))
    a, b = out
    return {"samples": len(x), "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "max_rel_err": float(np.abs(a - b).max() / max(1.0, float(np.abs(a).max())))}


def latency_line(rep: dict) -> str:
    lat = rep.get("latency_ms") or {}
    if not lat:
        return "latency: -"
    def ms(v: object) -> str:
        if isinstance(v, dict):
            v = v.get("median_ms")
        return f"{v:.3f}" if isinstance(v, (int, float)) else str(v)
    extra = {k: lat[k] for k in ("basis", "label", "interval") if k in lat}
    return (f"latency ({lat.get('provider')}, batch {lat.get('batch')}): {ms(lat.get('before'))} ms -> "
            f"{ms(lat.get('after'))} ms, ratio {ms(lat.get('ratio'))} {json.dumps(extra) if extra else ''}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=False)
    ap.add_argument("--skip-cuda", action="store_true", help="only the cpu runs (a check on a machine without GPU)")
    ap.add_argument("--budget", type=float, default=200.0, help="no run starts after this many seconds")
    ap.add_argument("--run", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # child: RECORD then CLI argv
    args = ap.parse_args()
    if args.run:
        return run_child(args.run[0], args.run[1:])

    t_start = time.perf_counter()
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    import onnxruntime as ort

    env = {"onnxruntime": ort.__version__, "onnxruntime_file": ort.__file__,
           "available_providers": ort.get_available_providers(), "python": sys.version.split()[0]}
    print(f"ORT {env['onnxruntime']} ({env['onnxruntime_file']}), providers {env['available_providers']}",
          flush=True)

    models = {"vgg_digits": (ROOT / "models/vgg_digits.onnx", ROOT / "models/digits16_calib.npz",
                             ROOT / "models/digits16_test.npz")}
    t0 = time.perf_counter()
    try:
        paths = (work / "mbv2_128.onnx", work / "mbv2_calib.npz", work / "mbv2_fresh.npz")
        mbv2(*paths)
        models["mbv2_128"] = paths
        env["torch"] = __import__("torch").__version__
        print(f"exported mbv2_128 with torch {env['torch']} in {time.perf_counter() - t0:.1f} s "
              f"({paths[0].stat().st_size / 2**20:.1f} MB)", flush=True)
    except Exception as exc:  # noqa: BLE001 - a check tool: report and go on with the shipped model
        print(f"mbv2_128 not built: {type(exc).__name__}: {exc}", flush=True)

    providers = ["cpu"] if args.skip_cuda else ["cuda", "cpu"]
    child_env = None
    if not args.skip_cuda:
        for import_torch in (False, True):
            ok, said = cuda_probe(import_torch)
            how = "torch imported first" if import_torch else "library path only"
            env[f"cuda_probe ({how})"] = said
            print(f"CUDA probe ({how}): {'ok' if ok else 'FAILED'}: {said}", flush=True)
            if ok:
                child_env = dict(os.environ, GPU_CHECK_IMPORT_TORCH="1") if import_torch else None
                break
    # per model: both modes, each on cuda then on cpu; once the budget is spent, the runs left are skipped
    plan = [(p, m, tol) for m in models for tol in ("0", "default") for p in providers]
    results = []
    for provider, name, tol in plan:
        entry: dict = {"model": name, "provider": provider, "tolerance": tol}
        results.append(entry)
        if time.perf_counter() - t_start > args.budget:
            entry["skipped"] = f"budget of {args.budget:.0f} s spent"
            print(f"\n== {name} --provider {provider} tolerance {tol}: skipped ({entry['skipped']})", flush=True)
            continue
        model, data, fresh = models[name]
        written = work / f"{name}-{provider}-{tol}.onnx"
        report = work / f"{name}-{provider}-{tol}.json"
        record = work / f"{name}-{provider}-{tol}.rec.json"
        cli = [str(model), str(written), "--data", str(data), "--provider", provider, "--report", str(report),
               "-q"] + (["--tolerance", "0"] if tol == "0" else ["--time-limit", TIME_LIMIT])
        entry["argv"] = cli
        print(f"\n== {name} --provider {provider} tolerance {tol}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run", str(record), *cli],
                                  check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=child_env)
            entry["stderr_tail"] = proc.stderr[-1500:]
            entry["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            entry["returncode"] = "timeout"
        entry["process_wall_s"] = round(time.perf_counter() - t0, 2)
        if record.exists():
            entry.update(json.loads(record.read_text()))
        if report.exists():
            rep = json.loads(report.read_text())
            entry["report"] = rep
            lin = sum(a.get("action") == "linearized" for a in rep.get("activations", []))
            before, after = rep.get("before", {}), rep.get("after", {})
            print(f"exit {entry.get('exit', entry['returncode'])}, wall {entry.get('wall_s')} s (process "
                  f"{entry['process_wall_s']} s), CPU {entry.get('cpu_s')} s, peak RSS {entry.get('peak_rss_mb')} MB, "
                  f"report seconds {rep.get('seconds')}, trials {rep.get('trials')}, linearized {lin}, compute nodes "
                  f"{before.get('compute_nodes')} -> {after.get('compute_nodes')}, fidelity "
                  f"{(rep.get('fidelity') or {}).get('value')}", flush=True)
            print(latency_line(rep), flush=True)
            if rep.get("phases"):
                print(f"phases (s): {json.dumps(rep['phases'])}", flush=True)
            if rep.get("time_limit"):
                print(f"time_limit: {json.dumps(rep['time_limit'])}", flush=True)
            for w in rep.get("warnings", []):
                print(f"warning: {w}", flush=True)
        else:
            print(f"exit {entry.get('exit', entry['returncode'])}, no report", flush=True)
        if entry.get("stderr_tail", "").strip():
            print("stderr: " + entry["stderr_tail"][-800:], flush=True)
        for module, kinds in sorted(entry.get("sessions", {}).items()):
            print(f"  sessions {module:12s} " + "; ".join(f"{n} x {k}" for k, n in kinds.items()), flush=True)
        if written.exists():
            entry["cpu_check"] = compare_on_cpu(model, written, fresh)
            print(f"written model vs original on CPU, {entry['cpu_check']['samples']} unseen samples: top-1 "
                  f"agreement {entry['cpu_check']['top1_agreement']:.4f}, max rel err "
                  f"{entry['cpu_check']['max_rel_err']:.2e}", flush=True)

    print("\n== summary (wall s of the CLI run; latency ratio after/before)", flush=True)
    for e in results:
        rep = e.get("report") or {}
        lat = rep.get("latency_ms") or {}
        print(f"{e['model']:11s} {e['provider']:4s} tol {e['tolerance']:7s} exit {e.get('exit', e.get('returncode', '-'))}"
              f" wall {e.get('wall_s', '-')} trials {rep.get('trials', '-')} ratio {lat.get('ratio', '-')}"
              + (f" ({e['skipped']})" if "skipped" in e else ""), flush=True)
    (out / "gpu_check.json").write_text(json.dumps({"env": env, "runs": results}, indent=1, default=str))
    print(f"total {time.perf_counter() - t_start:.1f} s; {out / 'gpu_check.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
