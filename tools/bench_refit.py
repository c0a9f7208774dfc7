"""Benchmark the least-squares re-fit (``onnx_easier.refit.NormalEquations``) on ResNet-50-size layer shapes.

    python tools/bench_refit.py                                  # batch 8, 3 batches, all positions
    python tools/bench_refit.py --max-positions 4096             # subsample output positions per batch
    python tools/bench_refit.py --max-features 8192 --only l4    # include the 3x3 512-channel convs

For each layer (224x224 input, ResNet-50 stages at 112/56/28/14/7, plus a ResNeXt-style grouped and a
MobileNet-style depthwise conv) it streams ``--batches`` batches of random inputs and targets through
``NormalEquations.update`` and solves once, printing: features per group ``f``, the state's size
(``memory_estimate``: ``groups * f^2`` float64 plus ``X^T Y``), output positions per batch (and how many were used),
update milliseconds per batch, solve milliseconds, and the peak memory traced (``tracemalloc``) above the inputs
during update + solve. Layers above ``--max-features`` show ``RefitTooLarge`` (the caller skips them). The process
peak RSS (``ru_maxrss``) is printed at the end. Timings include the im2col gather (float64 throughout).
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import sys
import time
import tracemalloc
from dataclasses import dataclass

import numpy as np

from onnx_easier.linear_math import ConvLayer, make_layer, output_spatial
from onnx_easier.refit import NormalEquations, RefitTooLarge, feature_count, memory_estimate


@dataclass(frozen=True)
class Shape:
    name: str
    cin: int
    cout: int
    kernel: int  # 0: dense layer on [N, C]
    stride: int
    pad: int
    groups: int
    size: int  # input height = width


RESNET50 = (
    Shape("conv1 7x7/2", 3, 64, 7, 2, 3, 1, 224),
    Shape("l1 1x1 64->64", 64, 64, 1, 1, 0, 1, 56),
    Shape("l1 3x3 64", 64, 64, 3, 1, 1, 1, 56),
    Shape("l1 1x1 64->256", 64, 256, 1, 1, 0, 1, 56),
    Shape("l1 1x1 256->64", 256, 64, 1, 1, 0, 1, 56),
    Shape("l2 3x3/2 128", 128, 128, 3, 2, 1, 1, 56),
    Shape("l2 3x3 128", 128, 128, 3, 1, 1, 1, 28),
    Shape("l2 1x1 512->128", 512, 128, 1, 1, 0, 1, 28),
    Shape("l2 1x1 128->512", 128, 512, 1, 1, 0, 1, 28),
    Shape("l3 3x3 256", 256, 256, 3, 1, 1, 1, 14),
    Shape("l3 1x1 1024->256", 1024, 256, 1, 1, 0, 1, 14),
    Shape("l3 1x1 256->1024", 256, 1024, 1, 1, 0, 1, 14),
    Shape("l4 3x3 512", 512, 512, 3, 1, 1, 1, 7),
    Shape("l4 1x1 2048->512", 2048, 512, 1, 1, 0, 1, 7),
    Shape("l4 1x1 512->2048", 512, 2048, 1, 1, 0, 1, 7),
    Shape("fc 2048->1000", 2048, 1000, 0, 1, 0, 1, 1),
    Shape("resnext 3x3 256 g32", 256, 256, 3, 1, 1, 32, 28),
    Shape("mobilenet dw 3x3 256", 256, 256, 3, 1, 1, 256, 28),
)


def layer_for(shape: Shape, rng: np.random.Generator) -> ConvLayer:
    if shape.kernel == 0:
        return make_layer(rng.normal(size=(shape.cout, shape.cin)), rng.normal(size=shape.cout))
    weight = rng.normal(size=(shape.cout, shape.cin // shape.groups, shape.kernel, shape.kernel))
    return make_layer(
        weight, rng.normal(size=shape.cout), (shape.stride,) * 2, (1, 1), (shape.pad,) * 4, groups=shape.groups
    )


def bench(shape: Shape, args: argparse.Namespace) -> str:
    rng = np.random.default_rng(0)
    layer = layer_for(shape, rng)
    f = feature_count(layer)
    mb = memory_estimate(layer) / 2**20
    io = f"{shape.cin}->{shape.cout}"
    head = f"{shape.name:22s} {io:>10s} {shape.groups:>4d} {f:>6d} {mb:>9.1f}"
    try:
        equations = NormalEquations(
            layer, max_features=args.max_features, max_positions_per_batch=args.max_positions, seed=0
        )
    except RefitTooLarge:
        return f"{head}  RefitTooLarge (f > max_features = {args.max_features})"
    in_spatial = (shape.size, shape.size)
    out = output_spatial(layer, in_spatial) if shape.kernel else ()
    xs = [rng.normal(size=(args.batch_size, shape.cin) + (in_spatial if shape.kernel else ())) for _ in range(2)]
    ys = [rng.normal(size=(args.batch_size, shape.cout) + out) for _ in range(2)]
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    updates = []
    for i in range(args.batches):
        start = time.perf_counter()
        equations.update(xs[i % 2], ys[i % 2])
        updates.append(time.perf_counter() - start)
    start = time.perf_counter()
    equations.solve()
    solve = time.perf_counter() - start
    peak = (tracemalloc.get_traced_memory()[1] - base) / 2**20
    positions = args.batch_size * math.prod(out)
    used = positions if args.max_positions is None else min(positions, args.max_positions)
    update_ms = 1e3 * float(np.median(updates))
    return f"{head} {positions:>8d} {used:>7d} {update_ms:>9.1f} {solve * 1e3:>8.1f} {peak:>8.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--max-positions", type=int, default=None, help="max_positions_per_batch (default: all)")
    parser.add_argument("--max-features", type=int, default=4096)
    parser.add_argument("--only", default="", help="run only layers whose name contains this")
    args = parser.parse_args(argv)
    print(
        f"NormalEquations on ResNet-50 layer shapes: batch {args.batch_size}, {args.batches} batches, "
        f"max_positions_per_batch={args.max_positions}, max_features={args.max_features}; "
        f"numpy {np.__version__}, {platform.processor() or platform.machine()}"
    )
    print(
        f"{'layer':22s} {'Cin->Cout':>10s} {'grp':>4s} {'f':>6s} {'state MB':>9s} {'pos/batch':>8s} {'used':>7s} "
        f"{'update ms':>9s} {'solve ms':>8s} {'peak MB':>8s}"
    )
    tracemalloc.start()
    total = time.perf_counter()
    for shape in RESNET50:
        if args.only in shape.name:
            print(bench(shape, args), flush=True)
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"total {time.perf_counter() - total:.1f} s; process peak RSS (ru_maxrss) {rss:.0f} MB")
    print("update ms: median per batch; peak MB: tracemalloc peak above the inputs during update + solve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
