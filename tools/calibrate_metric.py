"""Calibrate the agreement metric's KL coefficient on the example models: KL on held-out calibration data -> test points.

    python tools/calibrate_metric.py                                   # the six example models (~6 min, 2 cores)
    python tools/calibrate_metric.py --models vgg_digits --subsets 8 --json variants.json
    python tools/calibrate_metric.py --from-json variants.json          # re-render the tables, measure nothing
    python tools/calibrate_metric.py --skip-variants --end-to-end       # optimize() itself per coefficient (~22 min)

The default metric (``onnx_easier.fidelity``) is ``loss = max(flip, KL_COEF * sqrt(mean KL(original || candidate)))``
with KL_COEF meant so that loss 0.01 ~ one point of accuracy lost on unseen inputs. This measures that claim.

Per model, many damaged variants built the way the tool builds its candidates:

- ``subset``: a set of activations linearized at once, mode "affine" with per-channel fits from the statistics
  of the tool's FIT split (``calibrate(..., moments=True)`` on ``split_data``'s fit part, as ``Search`` does), through
  ``select.linearize_and_fuse`` with the other activations protected (``kept_nodes``). Subsets: the entropy-ordered
  prefixes (the tool's own order) up to ``--prefixes`` long, every single activation, then random subsets (size
  weighted towards small) up to ``--subsets`` in all; fixed seed.
- ``partial``: one activation, or all of them together, linearized on a random fraction of its channels only,
  ``y' = (1 - m) * act(x) + m * (a x + b)`` with ``m`` a 0/1 channel mask. Only for models with fewer than
  ``--partial-below`` activations (ffn_wide_digits has 2: subsets alone give 3 variants); it fills in the damage range
  with the same kind of damage at finer steps.

Each variant is measured twice: as built, and with the layers downstream of the linearized activations and the output
layers re-fitted by least squares to the original's tensors (``refit_targets`` -> ``refit_layers`` on the fit
split, kept or not on the check split), as the tool does. For each: mean KL(original || variant) and top-1 flip rate
on the HOLDOUT split of the calibration file (``select.Judge``: exactly what the tool measures), and the TEST
accuracy drop in points on ``models/digits<R>_test.npz`` (labels the tool never sees). Variants under 50 % test
accuracy are dropped (irrelevant to any tolerance).

Fits: ``points = c * sqrt(KL)`` by least squares through the origin (per model and pooled), the median of
``points / sqrt(KL)`` (variants with KL >= 1e-3), ``points = d * KL`` for comparison (rms errors of both), and a
power law ``points = a * KL^e`` (grid over e, least squares in a). Implied ``KL_COEF = c / 100`` (loss 0.01 at the
KL where the fit predicts one point). Risk: for candidate coefficients, the largest and mean test-point loss among
variants whose metric loss ``max(flip, coef * sqrt(KL))`` is <= the tolerance (0.01 and 0.02), per model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_easier.activations import Activation
from onnx_easier.api import analyze
from onnx_easier.calibrate import calibrate
from onnx_easier.fidelity import KL_COEF
from onnx_easier.model_io import make_session
from onnx_easier.reconstruct import Targets, refit_layers
from onnx_easier.select import (
    Judge,
    kept_nodes,
    linearize_and_fuse,
    refit_targets,
    run_batch,
    split_data,
)
from onnx_easier.shapes import infer_shapes

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "models"
MODELS = ("vgg_digits", "resnet_digits", "mobilenetv2_digits", "ffn_digits", "mobilenetv2_wide_digits",
          "ffn_wide_digits")
FRACTIONS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.85)
MIN_ACCURACY = 50.0
RATIO_MIN_KL = 1e-3  # median ratio points / sqrt(KL) over variants with at least this KL (tiny KL: ratio is noise)
FIT_MAX_KL = 0.1  # fits use variants up to this KL: any coefficient >= 0.07 puts larger KL above tolerance 0.02,
#                   and far beyond it the drop grows faster than sqrt(KL) (it saturates towards 100 - chance)
LOW_KL = 0.02  # second sqrt fit on the regime of tolerances 0.01-0.02 (KL_COEF 0.07-0.14 accept KL up to 0.02)
PREVIOUS_COEF = 0.14  # KL_COEF before this study (MLP calibration)
SWEEP = (0.07, 0.10, 0.20, 0.25, 0.30)  # further coefficients in the risk table
TOLERANCES = (0.01, 0.02)


@dataclass
class Variant:
    model: str
    kind: str  # subset | partial
    acts: list[int]  # indices into the entropy-ranked activations
    fraction: float  # share of channels linearized (1 for subsets)
    refit: bool
    refit_kept: int  # layers whose re-fit was kept
    mean_kl: float
    flip: float
    test_accuracy: float
    drop: float  # test points lost (original - variant); negative = gained
    changed: int  # test samples whose correctness changed (either way): the drop's noise is ~ sqrt(changed)/N
    seconds: float


# ---------------------------------------------------------------------------------------------------------------
# building variants


def resolution(model: onnx.ModelProto) -> int:
    return int(model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value)


def correct(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per test sample: top-1 of the logits equals the label (ORT, optimizations off)."""
    session = make_session(model)
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i:i + 256]})[0] for i in range(0, len(x), 256)])
    return logits.argmax(axis=1) == y


def choose_subsets(k: int, total: int, prefixes: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Index sets into the entropy-ranked activations: prefixes, singles, then random (1/size-weighted sizes)."""
    out: list[tuple[int, ...]] = []

    def add(s) -> None:
        t = tuple(sorted(int(i) for i in s))
        if t and t not in out and len(out) < total:
            out.append(t)

    for j in range(1, min(prefixes, k) + 1):
        add(range(j))
    for i in range(k):
        add([i])
    sizes = np.arange(2, k + 1)
    if len(sizes):
        p = 1.0 / sizes
        p /= p.sum()
        for _ in range(50 * total):
            if len(out) >= min(total, 2**k - 1):
                break
            add(rng.choice(k, size=int(rng.choice(sizes, p=p)), replace=False))
    return out


def _rank(model: onnx.ModelProto, tensor: str) -> int:
    for vi in infer_shapes(model).graph.value_info:
        if vi.name == tensor:
            return len(vi.type.tensor_type.shape.dim)
    raise RuntimeError(f"no shape for {tensor}")


def partial_linearize(model: onnx.ModelProto, acts: list[Activation], fits: dict, masks: dict) -> onnx.ModelProto:
    """``y' = (1 - m) * act(x) + m * (a x + b)`` per activation (``m`` a per-channel 0/1 mask); readers of ``y`` read
    ``y'``. Nothing is fused (fusion is exact: it would not change the outputs)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    outputs = {o.name for o in g.output}
    for act in acts:
        if act.output in outputs:
            raise RuntimeError(f"{act.name}: output is a graph output")
        a, b = (np.asarray(v, np.float64) for v in fits[act.name])
        m = masks[act.name].astype(np.float64)
        rank = _rank(model, act.input)
        shape = [len(m)] + [1] * (rank - 2) if act.axis == 1 else [len(m)]
        base = f"partial/{act.name}"
        consts = {"keep": 1.0 - m, "a": m * a, "b": m * b}
        for key, v in consts.items():
            g.initializer.append(numpy_helper.from_array(v.reshape(shape).astype(np.float32), f"{base}/{key}"))
        new = f"{base}/y"
        for n in g.node:
            for i, t in enumerate(n.input):
                if t == act.output:
                    n.input[i] = new
        g.node.extend([
            helper.make_node("Mul", [act.output, f"{base}/keep"], [f"{base}/u"], name=f"{base}/mul_keep"),
            helper.make_node("Mul", [act.input, f"{base}/a"], [f"{base}/v"], name=f"{base}/mul_a"),
            helper.make_node("Add", [f"{base}/u", f"{base}/v"], [f"{base}/w"], name=f"{base}/add_uv"),
            helper.make_node("Add", [f"{base}/w", f"{base}/b"], [new], name=f"{base}/add_b"),
        ])
    # topological order (the new nodes were appended at the end)
    placed: list[onnx.NodeProto] = []
    done: set[str] = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending = list(g.node)
    while pending:
        rest = []
        for n in pending:
            if all(t in done for t in n.input):
                placed.append(n)
                done.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError("cycle while ordering nodes")
        pending = rest
    del g.node[:]
    g.node.extend(placed)
    onnx.checker.check_model(out)
    return out


def run_model(name: str, args: argparse.Namespace, log) -> tuple[list[Variant], dict]:
    path = MODELS_DIR / f"{name}.onnx"
    r = resolution(onnx.load(str(path)))
    analysis = analyze(path, MODELS_DIR / f"digits{r}_calib.npz")
    original = analysis.model
    acts = analysis.ranked()
    fit, check, holdout = split_data(analysis.data)
    stats = calibrate(original, acts, fit, moments=True)
    fits = {a.name: stats[a.name].affine_fit() for a in acts}
    batch = run_batch(original, holdout, 32)
    judge = Judge(original, holdout, "agreement", 0.01, batch)
    targets = Targets(original)
    with np.load(MODELS_DIR / f"digits{r}_test.npz") as test:
        x_test, y_test = test["x"], test["y"]
    ok0 = correct(original, x_test, y_test)
    acc0 = float(ok0.mean() * 100)
    rng = np.random.default_rng(args.seed)

    plans: list[tuple[str, tuple[int, ...], float]] = []
    for s in choose_subsets(len(acts), args.subsets, args.prefixes, rng):
        plans.append(("subset", s, 1.0))
    if len(acts) < args.partial_below:
        groups = [(i,) for i in range(len(acts))] + ([tuple(range(len(acts)))] if len(acts) > 1 else [])
        for g in groups:
            for f in FRACTIONS:
                plans.append(("partial", g, f))

    variants: list[Variant] = []
    skipped = 0
    for kind, idx, frac in plans:
        chosen = [acts[i] for i in idx]
        t0 = time.perf_counter()
        if kind == "subset":
            built = linearize_and_fuse(original, chosen, "affine", {a.name: fits[a.name] for a in chosen},
                                       kept_nodes(acts, chosen))
            if built.linearized != len(chosen):
                log(f"  {name} {idx}: could not linearize ({'; '.join(built.notes)})")
                continue
            base_model, reference, fusion = built.model, built.reference, built.fusion
        else:
            masks = {}
            for a in chosen:
                c = len(fits[a.name][0])
                m = np.zeros(c, bool)
                m[rng.choice(c, size=max(1, round(frac * c)), replace=False)] = True
                masks[a.name] = m
            base_model = partial_linearize(original, chosen, fits, masks)
            reference, fusion = base_model, None
        build_s = time.perf_counter() - t0
        for refit in (False, True):
            t1 = time.perf_counter()
            model, kept = base_model, 0
            if refit:
                names = refit_targets(reference, fusion, model, chosen)
                model, records = refit_layers(model, targets, names, fit, check, batch=batch,
                                              softmax_head=judge.softmax_head)
                kept = sum(rec.accepted for rec in records)
            fid = judge(model)
            ok = correct(model, x_test, y_test)
            acc = float(ok.mean() * 100)
            v = Variant(name, kind, list(idx), frac, refit, kept, float(fid.components["mean_kl"]),
                        float(fid.components["flip_loss"]), acc, acc0 - acc, int((ok != ok0).sum()),
                        round(build_s + time.perf_counter() - t1, 3))
            if acc < MIN_ACCURACY:
                skipped += 1
            else:
                variants.append(v)
            log(f"  {name} {kind} {idx} f={frac:g} refit={int(refit)}: KL {v.mean_kl:.2e} flip {v.flip:.4f} "
                f"test {acc:.2f} ({v.drop:+.2f} pt, {v.changed} changed){' [dropped: < 50 %]' if acc < MIN_ACCURACY else ''}")
    info = {"model": name, "activations": len(acts), "test_accuracy": acc0, "holdout": holdout.samples,
            "fit": fit.samples, "check": check.samples, "test": len(y_test), "skipped_below_50": skipped}
    return variants, info


# ---------------------------------------------------------------------------------------------------------------
# fits


def fit_sqrt(kl: np.ndarray, pts: np.ndarray) -> tuple[float, float]:
    """c of points = c sqrt(KL) (least squares through the origin) and its rms error."""
    s = np.sqrt(kl)
    c = float((s * pts).sum() / max((s * s).sum(), 1e-300))
    return c, float(np.sqrt(np.mean((pts - c * s) ** 2)))


def fit_linear(kl: np.ndarray, pts: np.ndarray) -> tuple[float, float]:
    d = float((kl * pts).sum() / max((kl * kl).sum(), 1e-300))
    return d, float(np.sqrt(np.mean((pts - d * kl) ** 2)))


def fit_power(kl: np.ndarray, pts: np.ndarray) -> tuple[float, float, float]:
    """(a, e, rms) of points = a KL^e: e on a grid, a by least squares through the origin."""
    best = (0.0, 0.5, math.inf)
    for e in np.arange(0.2, 1.21, 0.01):
        s = kl**e
        a = float((s * pts).sum() / max((s * s).sum(), 1e-300))
        rms = float(np.sqrt(np.mean((pts - a * s) ** 2)))
        if rms < best[2]:
            best = (a, float(e), rms)
    return best


def summarise(variants: list[Variant], max_kl: float = FIT_MAX_KL) -> dict:
    variants = [v for v in variants if v.mean_kl <= max_kl]
    kl = np.array([v.mean_kl for v in variants])
    pts = np.array([v.drop for v in variants])
    c, rms_c = fit_sqrt(kl, pts)
    low = kl <= LOW_KL
    c_low = fit_sqrt(kl[low], pts[low])[0] if low.any() else float("nan")
    d, rms_d = fit_linear(kl, pts)
    a, e, rms_p = fit_power(kl, pts)
    big = kl >= RATIO_MIN_KL
    ratio = float(np.median(pts[big] / np.sqrt(kl[big]))) if big.any() else float("nan")
    return {"n": len(variants), "kl_min": float(kl.min()), "kl_max": float(kl.max()), "drop_min": float(pts.min()),
            "drop_max": float(pts.max()), "c": c, "rms_sqrt": rms_c, "c_low": c_low, "n_low": int(low.sum()), "median_ratio": ratio, "n_ratio": int(big.sum()),
            "d": d, "rms_linear": rms_d, "power_a": a, "power_e": e, "rms_power": rms_p}


def loss(v: Variant, coef: float) -> float:
    return max(v.flip, coef * math.sqrt(v.mean_kl))


def risk(variants: list[Variant], coef: float, tol: float) -> dict:
    acc = [v for v in variants if loss(v, coef) <= tol]
    drops = [v.drop for v in acc]
    return {"accepted": len(acc), "of": len(variants), "max_drop": max(drops) if drops else None,
            "mean_drop": float(np.mean(drops)) if drops else None,
            "worst": None if not acc else asdict(max(acc, key=lambda v: v.drop))}


def _f(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(variants: list[Variant], infos: list[dict], extra_coefs: list[float],
           max_kl: float = FIT_MAX_KL) -> tuple[str, dict]:
    names = [i["model"] for i in infos]
    def fit(vs: list[Variant]) -> dict:
        return {**summarise(vs, max_kl), "total": len(vs)}

    per = {n: fit([v for v in variants if v.model == n]) for n in names
           if any(v.model == n and v.mean_kl <= max_kl for v in variants)}
    pooled = fit(variants)
    no_partial = fit([v for v in variants if v.kind == "subset"])
    no_refit = fit([v for v in variants if not v.refit])
    refit_only = fit([v for v in variants if v.refit])
    cs = np.array([s["c"] for s in per.values()])
    c_p80 = float(np.percentile(cs, 80))
    coefs = {"previous 0.14": PREVIOUS_COEF}
    if KL_COEF != PREVIOUS_COEF:
        coefs["current (fidelity.KL_COEF)"] = KL_COEF
    coefs |= {"fitted (pooled c/100)": pooled["c"] / 100,
             "median per-model c/100": float(np.median(cs)) / 100, "conservative (p80 per-model c/100)": c_p80 / 100,
             "max per-model c/100": float(cs.max()) / 100}
    for x in extra_coefs:
        coefs[f"extra {x:g}"] = x
    lines = []
    head = ["model", "acts", "test acc. (%)", f"variants fitted (KL <= {max_kl:g}) / all", "KL range",
            "drop range (pt)", "c (pt/sqrt nat)", "rms sqrt", f"c, KL <= {LOW_KL:g} (n)", "median ratio (n)", "d linear (pt/nat)", "rms linear", "power a*KL^e (rms)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [(n, per[n]) for n in per] + [("**pooled**", pooled), ("pooled, subsets only", no_partial),
                                          ("pooled, no re-fit", no_refit), ("pooled, re-fit only", refit_only)]
    info = {i["model"]: i for i in infos}
    for n, s in rows:
        i = info.get(n, {})
        lines.append("| " + " | ".join([
            n, str(i.get("activations", "")), _f(i.get("test_accuracy"), ".2f"), f"{s['n']} / {s['total']}",
            f"{s['kl_min']:.1e} - {s['kl_max']:.1e}", f"{s['drop_min']:+.2f} - {s['drop_max']:+.2f}",
            f"{s['c']:.2f}", f"{s['rms_sqrt']:.2f}", f"{_f(s['c_low'], '.2f')} ({s['n_low']})",
            f"{_f(s['median_ratio'], '.2f')} ({s['n_ratio']})", f"{s['d']:.1f}", f"{s['rms_linear']:.2f}",
            f"{s['power_a']:.1f}*KL^{s['power_e']:.2f} ({s['rms_power']:.2f})"]) + " |")
    lines.append("")
    lines.append(f"Implied KL_COEF = pooled c / 100 = {pooled['c'] / 100:.4f}; per-model c: "
                 + ", ".join(f"{n} {per[n]['c']:.2f}" for n in per) + f"; 80th percentile {c_p80:.2f}.")
    lines.append("")
    risks: dict = {}
    for tol in TOLERANCES:
        head = ["coefficient", "value", "KL accepted up to"] + list(per) + ["worst model"]
        lines += [(f"Risk at tolerance {tol}: accepted variants / all, and the largest test-point loss among "
                   "accepted (mean in brackets)"), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, coef in coefs.items():
            cells, worst = [], None
            for n in per:
                rk = risk([v for v in variants if v.model == n], coef, tol)
                risks[(label, tol, n)] = rk
                cells.append(f"{rk['accepted']}/{rk['of']}: {_f(rk['max_drop'], '+.2f')} "
                             f"({_f(rk['mean_drop'], '+.2f')})")
                if rk["max_drop"] is not None and (worst is None or rk["max_drop"] > worst["drop"]):
                    worst = rk["worst"]
            lines.append("| " + " | ".join([label, f"{coef:.4f}", f"{(tol / coef) ** 2:.2e}", *cells,
                                             "-" if worst is None else
                                             f"{worst['model']} {worst['drop']:+.2f} (KL {worst['mean_kl']:.1e}, "
                                             f"{worst['changed']} changed)"]) + " |")
        lines.append("")
    data = {"per_model": per, "pooled": pooled, "pooled_subsets_only": no_partial, "pooled_no_refit": no_refit,
            "pooled_refit_only": refit_only, "fit_max_kl": max_kl,
            "coefficients": coefs,
            "risk": [{"coefficient": k[0], "tolerance": k[1], "model": k[2], **v} for k, v in risks.items()]}
    return "\n".join(lines), data


def end_to_end(models: list[str], coefs: list[float], tolerances: tuple[float, ...], log) -> str:
    """The tool itself (``optimize``, default strategy and re-fit) with ``fidelity.KL_COEF`` set to each coefficient
    in turn (patched in memory, restored after): activations linearized, the tool's loss and KL, test drop."""
    from onnx_easier import fidelity
    from onnx_easier.api import optimize

    saved = fidelity.KL_COEF
    head = ["model", "coefficient", "tolerance", "linearized", "loss (KL)", "test drop (pt)", "changed", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    try:
        for name in models:
            path = MODELS_DIR / f"{name}.onnx"
            original = onnx.load(str(path))
            r = resolution(original)
            with np.load(MODELS_DIR / f"digits{r}_test.npz") as test:
                x_test, y_test = test["x"], test["y"]
            ok0 = correct(original, x_test, y_test)
            for coef in coefs:
                for tol in tolerances:
                    fidelity.KL_COEF = coef
                    t0 = time.perf_counter()
                    res = optimize(path, MODELS_DIR / f"digits{r}_calib.npz", tolerance=tol)
                    ok = correct(res.model, x_test, y_test)
                    acts = res.report["activations"]
                    fid = res.report["fidelity"]
                    row = [name, f"{coef:g}", f"{tol:g}",
                           f"{sum(a['action'] == 'linearized' for a in acts)}/{len(acts)}",
                           f"{_f(fid['value'], '.4f')} ({fid['components'].get('mean_kl', 0.0):.1e})",
                           f"{(ok0.mean() - ok.mean()) * 100:+.2f}", str(int((ok != ok0).sum())),
                           f"{time.perf_counter() - t0:.0f}"]
                    log("  end-to-end " + " ".join(row))
                    lines.append("| " + " | ".join(row) + " |")
    finally:
        fidelity.KL_COEF = saved
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--subsets", type=int, default=20, help="activation subsets per model (each measured twice)")
    p.add_argument("--prefixes", type=int, default=6, help="entropy-ordered prefixes among them (longest)")
    p.add_argument("--partial-below", type=int, default=4,
                   help="partial-channel variants for models with fewer activations than this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coef", type=float, nargs="*", default=list(SWEEP), help="further KL coefficients for the risk table")
    p.add_argument("--fit-max-kl", type=float, default=FIT_MAX_KL, help="fit variants with mean KL up to this")
    p.add_argument("--json", type=Path, help="write every variant and the fits here")
    p.add_argument("--end-to-end", type=float, nargs="*", metavar="COEF",
                   help="also run optimize (tolerance 0.01 and 0.02) with KL_COEF patched to each COEF "
                        "(no COEF: 0.14, fidelity.KL_COEF, 0.11, 0.07); slow (~22 min more on 2 cores)")
    p.add_argument("--skip-variants", action="store_true", help="only the --end-to-end runs")
    p.add_argument("--from-json", type=Path, help="re-render the fits and risk tables from a --json file "
                                                   "(nothing is measured)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print(report([Variant(**v) for v in saved["variants"]], saved["models"], args.coef, args.fit_max_kl)[0])
        return 0
    t0 = time.perf_counter()
    variants: list[Variant] = []
    infos: list[dict] = []
    for name in ([] if args.skip_variants else args.models):
        t = time.perf_counter()
        vs, info = run_model(name, args, log)
        info["seconds"] = round(time.perf_counter() - t, 1)
        log(f"{name}: {len(vs)} variants in {info['seconds']} s")
        variants += vs
        infos.append(info)
    data: dict = {}
    if variants:
        text, data = report(variants, infos, args.coef, args.fit_max_kl)
        print(text)
        print(f"\n{len(variants)} variants, {time.perf_counter() - t0:.0f} s; models: "
              + ", ".join(f"{i['model']} ({i['seconds']} s, holdout {i['holdout']}, test {i['test']}, "
                          f"{i['skipped_below_50']} dropped < 50 %)" for i in infos))
    if args.end_to_end is not None:
        t1 = time.perf_counter()
        coefs = args.end_to_end or list(dict.fromkeys([PREVIOUS_COEF, KL_COEF, 0.11, 0.07]))
        print("\nEnd to end: optimize (default strategy auto, re-fit) with KL_COEF patched\n")
        print(end_to_end(args.models, coefs, TOLERANCES, log))
        print(f"\n{time.perf_counter() - t1:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"models": infos, "variants": [asdict(v) for v in variants], **data},
                                        indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
