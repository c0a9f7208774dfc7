"""Recovery by distillation: train the optimized model's weights to the original's outputs, on calibration inputs
only (no labels, no training code). The graph stays exactly as it is; only initializer values change, so every
exactness and verification check of the tool still applies to the result.

Teacher: the original model in ONNX Runtime (its outputs computed once per sample). Student: the optimized model
executed in torch (torch_exec.TorchGraph), checked equal to ORT's execution on the check samples before any step
(else nothing is trained: ``DistillResult.note`` says why). Loss per batch, summed over the outputs:

    classifier outputs (metric "agreement"):  KL(p || q) = (1/N) sum_n sum_k p[n,k] (log p[n,k] - log q[n,k])
        p = softmax(teacher) (or the teacher's probabilities, fidelity.looks_like_probabilities), q likewise
      with ``loss="logits"``:                ||z_S - z_T||^2 / ||z_T||^2 on the logits z (logit regression; log p
                                             where the outputs are probabilities): the whole score vector, where a
                                             near one-hot p says little (it won ffn_digits' third FFN back: README)
    other outputs:                           ||S - T||^2 / ||T||^2   (relative squared error: 0.0001 = rel-l2 0.01)
    features (``feature_weight`` > 0):       feature_weight * ||s - t||^2 / ||t||^2  per (student, teacher) tensor
                                             pair: the trained layers' outputs that the original has by name

Trained (``trainable``): the float initializers of Conv / ConvTranspose / Gemm / MatMul nodes and the constant
addend of an Add right after one (a bias); scope ``merged`` (default) only those of layers that the search created
or re-fitted, i.e. whose node name is not in ``baseline`` (the model before the search: the exact fusions) or whose
initializers differ from ``baseline``'s; scope ``all`` every one of them.

Schedule: Adam (betas 0.9 / 0.999) at lr ``DEFAULT_LR`` = 3e-4 over ``steps`` (default ``DEFAULT_STEPS`` = 300)
batches of up to 32 samples, fewer where one sample's forward tensors (``data.training_bytes``) times the batch
would pass ``TRAIN_BYTES`` = 512 MB (one seeded random order of the fit samples, then fixed batches drawn in a seeded
order): a linear warm-up over the first ``steps // EVALS`` steps (at least ``WARMUP`` = 5), then cosine-annealed to
0. The loss on the check samples is measured at the end of the warm-up, then ``EVALS`` = 10 times over the schedule,
and when the time cap stops it; the best weights are kept (the starting ones included), and training stops after
``PATIENCE`` = 4 evaluations without a gain. When the first evaluation of a start is over ``BACKOFF_MARGIN`` = 1.5
times the starting loss, the step was too large for this model: the weights are reset and the schedule starts again
at lr / 3 (down to 1e-5); a smaller rise is the transient of the first steps (backing off at any rise cost
ffn_digits' third FFN: README). ``seconds`` caps the wall time; within it the result depends on the seed alone
(``cut_by_time`` in the report says when the cap stopped it). On CPU torch runs with ``CPU_THREADS`` = 1 thread
while distilling (restored after) when a step's forward tensors take under ``PARALLEL_BYTES`` = 128 MB: the layers
of the example models are small (under 32 MB a step), and two threads took 1.5 to 9 times as long as one on a busy
2-core machine (300 steps of mobilenetv2_digits: 49-69 s against 7-8 s; 131 steps of ffn_digits, the first
distillation in the process: 10.5 s against 1.3 s), with ORT's own threads beside them. Larger steps get torch's
default threads: on a ViT-S (7 samples a step, about 500 MB) two threads took 28-33 s against 42-44 s for the
same 8 steps and their setup.
``mixup`` (off by default: it made the held-out loss worse on both digits models measured) trains half the batches
on float inputs mixed with another batch's, labelled by the teacher.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from onnx_easier.data import CalibrationData, batch_multiple, input_specs, training_bytes
from onnx_easier.fidelity import default_metric, log_probabilities, looks_like_probabilities
from onnx_easier.model_io import make_session
from onnx_easier.safety import exactness_bound
from onnx_easier.torch_exec import NotExecutable, TorchGraph, check_against_ort

log = logging.getLogger(__name__)

SCOPES = ("merged", "all")
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DEFAULT_LR = 3e-4
BACKOFF = 3.0  # the learning rate is divided by this when the first evaluation after a start is far worse
BACKOFF_MARGIN = 1.5  # "far worse": the check loss above this multiple of the starting one (less is a transient)
MIN_LR = 1e-5
DEFAULT_STEPS = 300
BATCH = 32
TRAIN_BYTES = 512 * 2**20  # the forward tensors of one training step (data.training_bytes per sample) bound its batch
WARMUP = 5  # at least this many steps of linear warm-up of the rate before the first evaluation
EVALS = 10  # evaluations on the check samples over the planned steps
PATIENCE = 4  # evaluations without a gain before stopping
MIX_SHARE = 0.5  # share of the training batches whose float inputs are mixed with another batch's (mixup)
CPU_THREADS = 1  # torch's threads while distilling on CPU (module doc: measured faster than 2 on the example models)
PARALLEL_BYTES = 128 * 2**20  # ... unless a step's forward tensors take this much: then torch's default threads
CHECK_FEEDS = 2  # check batches on which torch execution is compared with ORT's before training
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)


@dataclass
class DistillResult:
    """``model``: the optimized model with the trained initializer values (the input itself when nothing was
    trained); ``before`` / ``after``: the distillation loss on the check samples; ``note``: why nothing was
    trained, if so."""

    model: onnx.ModelProto
    trained: list[str]
    before: float
    after: float
    steps: int
    seconds: float
    scope: str
    device: str = "cpu"
    features: list[str] = field(default_factory=list)
    note: str = ""
    lr: float = DEFAULT_LR  # the learning rate of the last start
    cut: bool = False  # the time budget stopped it before its steps (the one case where the seed does not decide)
    loss: str = "kl"  # how classifier outputs were compared: "kl" or "logits"
    batch: int = 0  # samples per step (0: nothing trained)
    feature_weight: float = 0.0  # the weight of the feature-matching term asked for (``features``: the tensors matched)

    def as_report(self) -> dict:
        return {"scope": self.scope, "loss": self.loss, "trained": len(self.trained), "loss_before": self.before,
                "loss_after": self.after, "steps": self.steps, "batch": self.batch, "lr": self.lr,
                "cut_by_time": self.cut, "seconds": round(self.seconds, 3),
                "device": self.device,
                **({"feature_weight": self.feature_weight, "features": self.features} if self.feature_weight else {}),
                **({"note": self.note} if self.note else {})}


def torch_device(provider: str) -> str:
    """``cuda`` when the ORT provider is cuda and torch sees a GPU, else ``cpu``."""
    return "cuda" if provider == "cuda" and torch.cuda.is_available() else "cpu"


def _arrays(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def _same(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    x, y = numpy_helper.to_array(a), numpy_helper.to_array(b)
    return x.shape == y.shape and x.dtype == y.dtype and bool(np.array_equal(x, y))


def _bias_add(node: onnx.NodeProto, inits: Collection[str]) -> tuple[str, str] | None:
    """``(constant, computed input)`` of an Add of one initializer and one computed tensor (a layer's bias when the
    computed tensor is a layer's output); None for any other node."""
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    a, b = node.input
    if (a in inits) == (b in inits):
        return None
    return (a, b) if a in inits else (b, a)


def trainable(model: onnx.ModelProto, baseline: onnx.ModelProto | None = None, scope: str = "merged") -> list[str]:
    """The initializers of ``model`` that distillation trains (module doc): per layer, its float initializer inputs
    and the float constant of a bias Add right after it; with scope ``merged`` only for layers whose node name is
    not in ``baseline`` or whose initializers differ from ``baseline``'s."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
    inits = {k: v for k, v in _arrays(model).items() if v.data_type in _FLOATS}
    producer = {o: n for n in model.graph.node for o in n.output}
    base = _arrays(baseline) if baseline is not None else {}
    base_nodes = {n.name for n in baseline.graph.node} if baseline is not None else set()
    layers: dict[str, list[str]] = {}  # layer node name -> its initializers (weight, bias, bias of an Add after it)
    for node in model.graph.node:
        if node.op_type in LAYER_OPS:
            layers.setdefault(node.name, []).extend(i for i in node.input if i in inits)
        elif (bias := _bias_add(node, inits)) is not None:
            layer = producer.get(bias[1])
            if layer is not None and layer.op_type in LAYER_OPS:
                layers.setdefault(layer.name, []).append(bias[0])
    out: list[str] = []
    for name, names in layers.items():
        changed = (scope == "all" or name not in base_nodes
                   or any(n not in base or not _same(inits[n], base[n]) for n in names))
        if changed:
            out.extend(n for n in names if n not in out)
    return out


def feature_pairs(model: onnx.ModelProto, original: onnx.ModelProto, names: Sequence[str]) -> list[str]:
    """Output tensors of the layers that own the initializers ``names`` and that the original also computes (by
    name): where the student's features can be matched to the teacher's. A layer's output is that of its bias Add
    where one follows it (its only reader, with one constant addend): a fused MatMul writes a new tensor, and the bias
    Add after it the name the original's layer wrote."""
    owned = set(names)
    inits = {i.name for i in model.graph.initializer}
    produced = {o for n in original.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outs = []
    for n in model.graph.node:
        if n.op_type not in LAYER_OPS or not owned & set(n.input):
            continue
        out = n.output[0]
        after = readers.get(out, [])
        if len(after) == 1 and _bias_add(after[0], inits) is not None:
            out = after[0].output[0]
        outs.append(out)
    finals = {o.name for o in model.graph.output}
    return [t for t in outs if t in produced and t not in finals]


def _batch_for_memory(per_sample: int) -> int:
    """The most samples per step whose forward tensors (``per_sample`` bytes each: ``training_bytes``, what autograd
    may keep for the backward pass) fit in ``TRAIN_BYTES``: a ViT-S at 224x224 holds about 70 MB per sample, so 32
    samples took its distillation to 4.7 GB (README). BATCH when the estimate failed (0)."""
    return max(1, TRAIN_BYTES // per_sample) if per_sample > 0 else BATCH


def _feeds(data: CalibrationData, batch: int) -> list[dict[str, np.ndarray]]:
    return [{k: np.ascontiguousarray(v) for k, v in f.items()} for f in data.batches(batch, drop_last=batch > 1 and
                                                                                    data.samples >= batch)]


class _Adam:
    """Adam (Kingma & Ba) on a list of parameters, bias-corrected, the learning rate given per step. Written out
    rather than ``torch.optim.Adam``, whose first use imports torch._dynamo (seconds, once per process)."""

    def __init__(self, params: list[torch.nn.Parameter], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params, self.betas, self.eps, self.t = params, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def step(self, lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v):
                if p.grad is None:
                    continue
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-lr / c1)
                p.grad = None


def _ramp(steps: int) -> int:
    """Warm-up steps of a schedule of ``steps``: one evaluation interval (``steps // EVALS``), at least WARMUP."""
    return max(1, min(steps, max(WARMUP, steps // EVALS)))


def _schedule(step: int, steps: int, ramp: int) -> float:
    """The rate's factor at ``step`` of ``steps``: linear warm-up over ``ramp`` steps, times a cosine to 0."""
    return min(1.0, (step + 1) / ramp) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))


class _Loss:
    """The distillation loss of one batch against fixed teacher outputs (module doc). ``classifier``: the outputs
    are compared as class distributions (KL, targets hold log p) when ``logits`` is False, else as logits (relative
    squared error; targets hold the teacher's logits, or log p where the outputs are probabilities)."""

    def __init__(self, classifier: bool, probabilities: list[bool], feature_weight: float,
                 logits: bool = False) -> None:
        self.classifier = classifier
        self.probabilities = probabilities
        self.feature_weight = feature_weight
        self.logits = logits

    def __call__(self, got: list[torch.Tensor], want: list[torch.Tensor], n_out: int) -> torch.Tensor:
        total = got[0].new_zeros(())
        for i, (s, t) in enumerate(zip(got, want)):
            s = s.to(torch.float64) if t.dtype == torch.float64 else s.float()
            if i < n_out and self.classifier:
                s2 = s.reshape(s.shape[0], -1)
                if self.probabilities[i]:
                    logq = torch.log(torch.clamp(s2 / s2.sum(dim=1, keepdim=True), min=1e-30))
                elif self.logits:
                    logq = s2
                else:
                    logq = torch.log_softmax(s2, dim=1)
                if self.logits:  # logit regression: the teacher's scores, not only its ranking near 1
                    total = total + ((logq - t) ** 2).sum() / torch.clamp((t**2).sum(), min=1e-12)
                else:
                    total = total + (t.exp() * (t - logq)).sum(dim=1).mean()  # t holds log p
            else:
                term = ((s - t) ** 2).sum() / torch.clamp((t**2).sum(), min=1e-12)
                total = total + (term if i < n_out else self.feature_weight * term)
        return total


def _torch_settings(fn: Callable[..., DistillResult]) -> Callable[..., DistillResult]:
    """While ``fn`` runs, restored after: TF32 off (on CUDA, torch computes float32 matmuls and convolutions in TF32
    by default, a 10-bit mantissa: relative errors near 4e-4 on models/mobilenetv2_digits.onnx, which the comparison
    with ORT rightly refuses); torch's thread count (``fn`` sets its own: ``_cpu_threads``)."""

    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> DistillResult:
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        threads = torch.get_num_threads()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            return fn(*args, **kwargs)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
            torch.set_num_threads(threads)

    return run


def _cpu_threads(step_bytes: int, default: int) -> int:
    """torch's CPU threads for training steps whose forward tensors take ``step_bytes`` (module doc): CPU_THREADS
    below PARALLEL_BYTES (small layers, where more threads only synchronise), else ``default`` (torch's own)."""
    return CPU_THREADS if step_bytes < PARALLEL_BYTES else default


@_torch_settings
def distill(
    original: onnx.ModelProto,
    optimized: onnx.ModelProto,
    fit: CalibrationData,
    check: CalibrationData,
    *,
    baseline: onnx.ModelProto | None = None,
    scope: str = "merged",
    metric: str | None = None,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    seconds: float = 60.0,
    seed: int = 0,
    device: str = "cpu",
    batch: int = BATCH,
    feature_weight: float = 0.0,
    mixup: bool = False,
    teacher: dict | None = None,
    loss: str = "kl",
) -> DistillResult:
    """``optimized`` with its ``trainable(optimized, baseline or original, scope)`` initializers trained to
    ``original``'s outputs on ``fit`` (early stopping on ``check``; module doc). ``metric``: the fidelity metric
    (None: fidelity.default_metric of the outputs); "agreement" trains by KL, the others by relative squared error.
    Never raises for a graph it cannot run in torch: the result then has ``note`` and the input model.
    ``teacher``: a dict the caller keeps between calls with the same ``original``, data and seed: the original's
    session and outputs are computed once and kept there."""
    t0 = time.perf_counter()
    names = trainable(optimized, baseline if baseline is not None else original, scope)
    fixed = batch_multiple(input_specs(optimized), fit)
    per_sample = training_bytes(optimized, fit.feed_shapes())
    b = 1 if fit.feedwise else fixed or max(1, min(batch, fit.samples, _batch_for_memory(per_sample)))
    if device == "cpu":
        torch.set_num_threads(_cpu_threads(b * per_sample, torch.get_num_threads()))

    def skip(note: str) -> DistillResult:
        log.warning("no distillation: %s", note)
        return DistillResult(optimized, [], math.nan, math.nan, 0, time.perf_counter() - t0, scope, device,
                             note=note, loss=loss)

    if not names:
        return skip("no layer to train")
    inits = _arrays(optimized)
    if any(inits[n].data_location == onnx.TensorProto.EXTERNAL for n in names):
        return skip("weights stored as external data")
    if any(inits[n].data_type != onnx.TensorProto.FLOAT for n in names):
        return skip("weights other than float32")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if not fit.feedwise:  # file order may be class by class: one random order, then fixed batches
        fit = fit.take(rng.permutation(fit.samples))
    fit_feeds, check_feeds = _feeds(fit, b), _feeds(check, b)
    if not fit_feeds or not check_feeds:
        return skip("too few samples for one batch")
    try:
        student = TorchGraph(optimized, names, device)
    except NotExecutable as exc:
        return skip(str(exc))
    rtol = exactness_bound(optimized, check_feeds[:CHECK_FEEDS])[0]
    differs = check_against_ort(optimized, check_feeds[:CHECK_FEEDS], rtol, student)
    if differs:
        return skip(differs)
    features = feature_pairs(optimized, original, names) if feature_weight > 0 else []
    if feature_weight > 0 and not features:
        log.info("no feature matching: no trained layer's output is computed by the original under the same name")
    teacher_graph = None
    if features:
        try:
            teacher_graph = TorchGraph(original, (), device)
        except NotExecutable as exc:
            log.info("no feature matching: %s", exc)
            features = []
    if teacher_graph is not None:  # a name the original also writes, with another shape, is no feature of it
        with torch.no_grad():
            mine = student.run(check_feeds[0], features)
            theirs = teacher_graph.run(check_feeds[0], features)
        features = [f for f, s, t in zip(features, mine, theirs) if s.shape == t.shape]
        if not features:
            teacher_graph = None

    cache = teacher if teacher is not None else {}
    if "session" not in cache:
        cache["session"] = make_session(original)
    session = cache["session"]
    out_names = [o.name for o in session.get_outputs()]
    first = [np.asarray(v) for v in session.run(out_names, fit_feeds[0])]
    effective = metric or default_metric([v.shape for v in first])
    probabilities = [looks_like_probabilities(v.reshape(v.shape[0], -1)) if v.ndim >= 1 else False for v in first]
    classifier = effective == "agreement" and all(v.ndim == 2 for v in first)
    logits = loss == "logits"
    loss_fn = _Loss(classifier, probabilities, feature_weight, logits)

    def targets(feed: dict[str, np.ndarray]) -> list[torch.Tensor]:
        outs = [np.asarray(v) for v in session.run(out_names, feed)]
        if classifier:
            outs = [log_probabilities(v.reshape(v.shape[0], -1), p) if p or not logits else v.reshape(v.shape[0], -1)
                    for v, p in zip(outs, probabilities)]
        ts = [torch.from_numpy(np.ascontiguousarray(v)).to(device) for v in outs]
        if teacher_graph is not None:
            with torch.no_grad():
                ts += [t.detach() for t in teacher_graph.run(feed, features)]
        return ts

    key = (b, tuple(features), classifier, logits, device)
    if ("fit", key) not in cache:
        cache[("fit", key)] = [targets(f) for f in fit_feeds]
        cache[("check", key)] = [targets(f) for f in check_feeds]
    fit_targets, check_targets = cache[("fit", key)], cache[("check", key)]
    wanted = [*out_names, *features]

    def check_loss() -> float:
        """The loss of the outputs alone on the check samples (the feature term trains, the outputs decide: a
        distillation that matches features better but the outputs worse gains nothing)."""
        n = len(out_names)
        with torch.no_grad():
            return float(np.mean([loss_fn(student.run(f, out_names), t[:n], n).item()
                                  for f, t in zip(check_feeds, check_targets)]))

    floats = [k for k, v in fit_feeds[0].items() if v.dtype.kind == "f"]
    mix = mixup and bool(floats)

    def mixed(a: dict[str, np.ndarray], b: dict[str, np.ndarray], lam: float) -> dict[str, np.ndarray]:
        """Float inputs ``lam * a + (1 - lam) * b[perm]`` (the teacher labels any input; mixing real inputs
        keeps a small calibration set from being memorized); other inputs those of ``a``."""
        out = dict(a)
        perm = rng.permutation(len(b[floats[0]])) if not fit.feedwise else None
        for k in floats:
            other = b[k][perm] if perm is not None and b[k].shape == a[k].shape else b[k]
            if other.shape == a[k].shape:
                out[k] = (lam * a[k] + (1 - lam) * other).astype(a[k].dtype)
        return out

    before = best = check_loss()
    best_values = student.values()
    initial = best_values
    optimizer = _Adam(student.parameters())
    deadline = t0 + seconds
    done, stale, order, planned = 0, 0, [], steps
    begin, fresh = 0, True  # the step the current schedule began at; no evaluation since
    ramp = _ramp(planned)
    next_eval = ramp
    cut = False
    batch_loss = None
    evaluated = 0  # the step of the last evaluation

    def evaluate() -> float:
        nonlocal evaluated
        evaluated = done
        value = check_loss()
        log.debug("distillation step %d of %d (lr %.2g): batch loss %.4g, check loss %.4g", done, planned, lr,
                  batch_loss.item() if batch_loss is not None else math.nan, value)
        return value

    while done < planned and stale < PATIENCE:
        if time.perf_counter() >= deadline:
            cut = True
            if done > max(begin, evaluated):  # steps since the last evaluation: not wasted
                value = evaluate()
                if value < best:
                    best, best_values = value, student.values()
            break
        if not order:
            order = list(rng.permutation(len(fit_feeds)))
        i = order.pop()
        feed, target = fit_feeds[i], fit_targets[i]
        if mix and rng.uniform() < MIX_SHARE:
            feed = mixed(feed, fit_feeds[int(rng.integers(len(fit_feeds)))], float(rng.uniform()))
            target = targets(feed)
        batch_loss = loss_fn(student.run(feed, wanted), target, len(out_names))
        if not torch.isfinite(batch_loss) or not batch_loss.requires_grad:  # diverged, or no output depends on it
            break
        batch_loss.backward()
        optimizer.step(lr * _schedule(done - begin, planned - begin, ramp))
        done += 1
        if done >= next_eval or done == planned:
            value = evaluate()
            if fresh and value > BACKOFF_MARGIN * before and lr / BACKOFF >= MIN_LR:
                # after the ramp it is far worse than at the start: too large a step for this model; again, smaller
                lr /= BACKOFF
                student.load(initial)
                optimizer = _Adam(student.parameters())
                ramp = _ramp(planned - done)
                begin, stale, next_eval = done, 0, done + ramp
                continue
            fresh = False
            next_eval = done + max(1, (planned - begin) // EVALS)
            if value < best:
                best, best_values, stale = value, student.values(), 0
            else:
                stale += 1
    out = optimized
    if best < before:
        out = onnx.ModelProto()
        out.CopyFrom(optimized)
        for init in out.graph.initializer:
            if init.name in best_values:
                init.CopyFrom(numpy_helper.from_array(best_values[init.name].astype(np.float32), init.name))
    seconds_used = time.perf_counter() - t0
    log.info("distillation: %d initializers, %d steps, check loss %.4g -> %.4g (%.1f s, %s)", len(names), done,
             before, best, seconds_used, device)
    return DistillResult(out, names, before, best, done, seconds_used, scope, device, features, lr=lr, cut=cut,
                         loss=loss, batch=b, feature_weight=feature_weight)


RECOVER_FACTOR = 2.5  # a rejected candidate is distilled only when its loss is within this factor of the tolerance
RECOVER_MIN_SECONDS = 1.5  # no distillation in the search starts with less time left than this
RECOVER_SHARE = 0.25  # one candidate's distillation gets at most this share of the whole budget (at least the minimum)
FINAL_MIN_SECONDS = 0.3  # the chosen model is not distilled with less time left than this (its setup alone)
BUDGET_SHARE = 0.6  # without --distill-seconds, all distillation gets this share of the run's own time so far
LEARN_AFTER = 2  # candidates judged after distillation, in a run, before the loss tried follows their gains (reach)
REACH_SLACK = 1.25  # ... the best gain seen (loss before / after) times this
NOTHING_TO_RECOVER = 1e-6  # a fidelity loss at or below this is rounding (agreement: a KL near 1e-10; rel-l2: a few
# float32 ulps): the chosen model is not distilled (on an untrained ViT-S that saved 95 s of a 248 s run: README)


class Recovery:
    """Distillation inside the search: ``recover(model, loss)`` distils a candidate that the search is about to
    reject for a fidelity ``loss`` over ``tolerance``, when the loss is within ``RECOVER_FACTOR`` of it (measured,
    distillation divided the loss by 1.05 to 1.8: further off, it cannot win the candidate back), and returns the
    distilled model (``model`` itself when the check samples showed no gain; None when not tried). Once
    ``LEARN_AFTER`` candidates of the run were distilled and judged again (``judged``), the factor is what this model
    showed instead (``reach``): the best gain seen times ``REACH_SLACK``, at most ``RECOVER_FACTOR``.

    Time: ``seconds`` in all; None: at any moment ``BUDGET_SHARE`` of the run's own time so far (since ``started``,
    the run's start, less the distillation's time), so that a run with distillation costs less than twice the run
    without (the search charges its judging of a distilled candidate, ``judged``; the rest of the factor pays for the
    chosen model's last check). A candidate gets at most ``RECOVER_SHARE`` of the budget and is not tried with under
    ``RECOVER_MIN_SECONDS`` left once the longest judging of a distilled candidate so far is set aside (``judging``:
    the search judges it again, on the budget; a candidate tried early may find no time yet); what is left goes to
    the chosen model (``final``). Each distillation is charged all its time, its setup (the torch/ORT comparison,
    the original's outputs) included; ``spent``: seconds charged before (torch's import). ``records`` keeps one entry
    per candidate distilled."""

    def __init__(self, original: onnx.ModelProto, baseline: onnx.ModelProto, fit: CalibrationData,
                 check: CalibrationData, *, tolerance: float, metric: str | None, seconds: float | None,
                 scope: str = "merged", seed: int = 0, device: str = "cpu", spent: float = 0.0,
                 started: float | None = None, loss: str = "kl", steps: int | None = None,
                 features: float = 0.0) -> None:
        self.original, self.baseline, self.fit, self.check = original, baseline, fit, check
        self.tolerance, self.metric, self.seconds = tolerance, metric, seconds
        self.scope, self.seed, self.device, self.loss = scope, seed, device, loss
        self.steps = DEFAULT_STEPS if steps is None else steps
        self.features = features  # the weight of the feature-matching term (distill's feature_weight)
        self.started = time.perf_counter() if started is None else started
        self.used = spent
        self.records: list[DistillResult] = []
        self.gains: list[float] = []  # per candidate distilled and judged: its loss before / after
        self.judging = 0.0  # the longest judging of a distilled candidate so far: reserved before the next one
        self.teacher: dict = {}  # the original's session and outputs, shared by the distillations

    def left(self) -> float:
        """Seconds of the budget left now."""
        return max(0.0, self.budget() - self.used)

    def budget(self) -> float:
        """The whole budget now: ``seconds``, or ``BUDGET_SHARE`` of the run's own time so far (distillation
        excluded)."""
        if self.seconds is not None:
            return self.seconds
        return BUDGET_SHARE * max(0.0, time.perf_counter() - self.started - self.used)

    def judged(self, seconds: float, before: float, after: float) -> None:
        """The search judged a distilled candidate again: ``seconds`` charged to the budget (spent because of the
        distillation), the fidelity loss ``before`` and ``after`` distillation recorded as a gain."""
        self.used += seconds
        self.judging = max(self.judging, seconds)
        self.gains.append(before / after if after > 0 else RECOVER_FACTOR)

    def reach(self) -> float:
        """The largest loss / tolerance at which a candidate is distilled: RECOVER_FACTOR until LEARN_AFTER
        candidates of this run were judged; then REACH_SLACK times the best gain seen (at most RECOVER_FACTOR), so
        that where distillation wins little on this model the candidates it cannot win back are left alone and the
        time goes to the chosen model (mobilenetv2_wide_digits: 5 to 10 candidates distilled in a run, none
        accepted, the chosen model then 1 to 25 steps: README)."""
        if len(self.gains) < LEARN_AFTER:
            return RECOVER_FACTOR
        return min(RECOVER_FACTOR, REACH_SLACK * max(self.gains))

    def _distill(self, model: onnx.ModelProto, seconds: float) -> DistillResult:
        r = distill(self.original, model, self.fit, self.check, baseline=self.baseline, scope=self.scope,
                    metric=self.metric, seconds=seconds, seed=self.seed, device=self.device, teacher=self.teacher,
                    loss=self.loss, steps=self.steps,
                    feature_weight=self.features)
        self.used += r.seconds
        return r

    def __call__(self, model: onnx.ModelProto, loss: float) -> onnx.ModelProto | None:
        if not loss <= self.reach() * self.tolerance:
            return None
        left = self.left() - self.judging  # a distilled candidate is judged again, on the budget too
        if left < RECOVER_MIN_SECONDS:
            return None
        r = self._distill(model, min(left, max(RECOVER_MIN_SECONDS, RECOVER_SHARE * self.budget())))
        self.records.append(r)
        if r.model is model:  # no gain on the check samples: the search keeps the loss as it was
            self.gains.append(1.0)
        return r.model

    def final(self, model: onnx.ModelProto) -> DistillResult | None:
        """The chosen model distilled with all the time left; None when under ``FINAL_MIN_SECONDS`` is left."""
        left = self.left()
        return self._distill(model, left) if left >= FINAL_MIN_SECONDS else None
