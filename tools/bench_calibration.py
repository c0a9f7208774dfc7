"""Benchmark calibration: (a) throughput against plain ORT inference, (b) peak memory against the sample count.

    python tools/bench_calibration.py                      # a small generated conv net, random data
    python tools/bench_calibration.py model.onnx --samples 256 --input-shape x:1,3,224,224

(a) runs plain inference (ORT, optimizations off, the same batch size) and ``calibrate`` over the same samples,
interleaved, and prints the median time of each and their ratio (goal: calibration <= 1.5x inference).
(b) runs ``calibrate`` with 1x and 10x the samples in fresh subprocesses and prints each one's peak RSS
(``ru_maxrss``) before and after calibration: the growth must not depend on the sample count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_easier.activations import Activation
from onnx_easier.calibrate import calibrate
from onnx_easier.data import CalibrationData, choose_batch_size, input_specs, load_data, parse_input_shapes
from onnx_easier.model_io import load_model, make_session, to_graph


def default_net() -> tuple[onnx.ModelProto, list[Activation]]:
    """x[N,3,32,32] -> 4 x (Conv 3x3 -> Relu), channels 16-32-32-64, strides 1-2-1-2 -> GlobalAveragePool -> Gemm."""
    rng = np.random.default_rng(0)
    nodes, inits, acts = [], [], []
    prev, cin = "x", 3
    for i, (cout, stride) in enumerate([(16, 1), (32, 2), (32, 1), (64, 2)]):
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
        nodes.append(
            helper.make_node(
                "Conv", [prev, f"w{i}", f"b{i}"], [f"conv{i}"], name=f"conv{i}", pads=[1] * 4, strides=[stride] * 2
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        acts.append(Activation(f"relu{i}", "Relu", "op", f"conv{i}", f"relu{i}", (f"relu{i}",), 1, cout))
        prev, cin = f"relu{i}", cout
    inits += [
        numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32) * 0.1, "fc_w"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bench_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model, acts


def _model_and_acts(path: str | None) -> tuple[onnx.ModelProto, list[Activation]]:
    if path is None:
        return default_net()
    from onnx_easier.activations import find_activations

    model = load_model(path)
    return model, find_activations(to_graph(model))


def _data(model: onnx.ModelProto, samples: int, shapes: list[str]) -> CalibrationData:
    return load_data(None, input_specs(model), samples=samples, input_shapes=parse_input_shapes(shapes))


def throughput(args: argparse.Namespace) -> None:
    model, acts = _model_and_acts(args.model)
    data = _data(model, args.samples, args.input_shape)
    batch = args.batch or choose_batch_size(input_specs(model), data)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"model: {args.model or 'generated conv net'}, {len(acts)} activations, {data.samples} samples, batch {batch}"
        f" ({os.cpu_count()} CPUs, load average {load}: other work on the machine skews the times)"
    )

    def plain() -> None:
        sess = make_session(model, optimize=False)
        for feed in data.batches(batch):
            sess.run(None, feed)

    runs = {
        "plain ORT inference": plain,
        "calibrate (counts)": lambda: calibrate(model, acts, data, batch_size=batch),
        "calibrate (counts + moments)": lambda: calibrate(model, acts, data, batch_size=batch, moments=True),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up: page in the model, first allocations
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain ORT inference"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:30s} median {med * 1e3:8.1f} ms  ({data.samples / med:8.0f} samples/s)  x{med / base:.2f}")


def memory_child(args: argparse.Namespace) -> None:
    model, acts = _model_and_acts(args.model)
    data = _data(model, args.samples, args.input_shape)
    batch = args.batch or choose_batch_size(input_specs(model), data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    calibrate(model, acts, data, batch_size=batch, moments=args.moments)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data_mb = sum(a.nbytes for a in data.arrays.values()) / 2**20
    print(
        json.dumps({"samples": data.samples, "batch": batch, "data_mb": data_mb, "before_kb": before, "peak_kb": after})
    )


def memory(args: argparse.Namespace) -> None:
    rows = []
    for n in (args.samples, args.samples * args.memory_scale):
        cmd = [sys.executable, __file__, "--memory-child", "--samples", str(n), "--batch", str(args.batch or 64)]
        cmd += [args.model] if args.model else []
        cmd += [f"--input-shape={s}" for s in args.input_shape] + (["--moments"] if args.moments else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"peak RSS (ru_maxrss), calibrate{' with moments' if args.moments else ''} in a fresh process each:")
    for r in rows:
        data_kb = r["data_mb"] * 1024
        print(
            f"  {r['samples']:6d} samples (batch {r['batch']}, data {r['data_mb']:6.1f} MB): "
            f"before calibrate {r['before_kb'] / 1024:7.1f} MB, peak {r['peak_kb'] / 1024:7.1f} MB, "
            f"peak minus the data arrays {(r['peak_kb'] - data_kb) / 1024:7.1f} MB"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="an .onnx model (default: a generated conv net)")
    p.add_argument("--samples", type=int, default=1024, help="random samples for (a), and the 1x count of (b)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: chosen as calibrate would)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats (median reported)")
    p.add_argument("--memory-scale", type=int, default=10, help="(b) compares 1x and this many times the samples")
    p.add_argument("--moments", action="store_true", help="(b): collect moments too")
    p.add_argument("--input-shape", action="append", default=[], help="NAME:D0,D1,... for dynamic input dims")
    p.add_argument("--only", choices=["throughput", "memory"], help="run one part only")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return 0
    # memory first: a child's ru_maxrss starts at what this process held when it was spawned (Linux carries it
    # across fork and exec), so this process must still be small then
    if args.only in (None, "memory"):
        memory(args)
    if args.only in (None, "throughput"):
        throughput(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
