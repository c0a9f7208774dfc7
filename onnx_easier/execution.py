"""Where a run's ONNX Runtime sessions execute: the one place that turns ``--provider cpu|cuda`` into ORT providers.

``resolve(provider)`` checks the provider once, before any work: an onnxruntime without CUDAExecutionProvider (the
``onnxruntime`` package, not ``onnxruntime-gpu``), or one whose CUDA provider fails to load (CUDA or cuDNN libraries
missing: ORT then falls back to CPU with only a warning), is a BadArgumentError of one line (exit code 2). The
``Execution`` it returns is passed explicitly down the pipeline, and every session it makes is checked again (its
first provider must be the one asked for).

Sessions on the run's provider:

- *work sessions* (``Execution.session``): calibration (calibrate.py), the fidelity runs of the search and the
  exactness checks against the original (select.Judge, api.max_relative_error), the runs that collect a re-fit's
  layer inputs and the original's targets (reconstruct.py). They run lean (model_io.make_session): without ORT's
  CPU memory arena, so each run's memory goes back when it ends, and without pre-packed weight copies. On CUDA
  they run with TF32 off (``use_tf32=0``; ORT enables it by default on Ampere and later GPUs, where it rounds the
  inputs of Conv and MatMul to 10 mantissa bits, about 1e-3 relative: fusions could not be checked exact to 1e-4,
  and fidelity would measure TF32 rather than the linearization) and with cuDNN's heuristic choice of convolution
  algorithm (ORT's default benchmarks every convolution in each new session, and every trial makes new
  sessions). An exactness check compares a model against the original run through the same ``Execution``;
- *timed sessions* (``Execution.session(..., timed=True)``, latency.py): ORT's defaults, as a model is deployed
  (TF32 and the exhaustive algorithm search included).

On CUDA both list CPUExecutionProvider second, for the nodes that CUDA has no kernel for.

Guard sessions stay on CPU whatever the provider (safety.py: the fail-safe check of every rewrite and the
exactness bound; shapes.py: tensor shapes from two runs): they check that a rewrite is exact, a property of the
graph, on one batch of at most 8 samples, against a bound derived from float32 rounding as the CPU provider does it
(deterministic, no algorithm choice between runs).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from onnx_easier.errors import BadArgumentError
from onnx_easier.model_io import make_session

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# provider options of the work sessions (module docstring); timed sessions get ORT's defaults
WORK_OPTIONS = {"cuda": {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}}


@dataclass(frozen=True)
class Execution:
    """The ORT execution provider of one run (``cpu`` or ``cuda``); build it with ``resolve``."""

    provider: str = "cpu"

    @property
    def name(self) -> str:
        """ORT's name of the provider (``CUDAExecutionProvider``)."""
        return PROVIDERS[self.provider]

    def providers(self, timed: bool = False) -> list[str | tuple[str, dict[str, str]]]:
        """The ``providers`` argument of ``ort.InferenceSession`` for a work session (or a timed one)."""
        if self.provider == "cpu":
            return [self.name]
        options = {} if timed else WORK_OPTIONS.get(self.provider, {})
        return [(self.name, dict(options)), PROVIDERS["cpu"]]

    def session(self, model: onnx.ModelProto | str | os.PathLike, *, optimize: bool = False, threads: int = 0,
                timed: bool = False) -> ort.InferenceSession:
        """``model_io.make_session`` on this provider; BadArgumentError when ORT did not start it."""
        sess = make_session(model, optimize=optimize, providers=self.providers(timed), threads=threads, lean=not timed)
        used = sess.get_providers()
        if used[0] != self.name:  # ORT falls back to CPU with a warning when CUDA fails to load
            raise BadArgumentError(
                f"--provider {self.provider}: ONNX Runtime could not start {self.name} (CUDA or cuDNN libraries "
                "missing? see the README's GPU section)"
            )
        log.debug("ORT session on %s", ", ".join(used))
        return sess


CPU = Execution("cpu")


def resolve(provider: str) -> Execution:
    """The ``Execution`` of ``--provider``, checked: unknown names, an onnxruntime without the provider, and a
    provider that fails to start (a one-node model is run on it) are BadArgumentError."""
    if provider not in PROVIDERS:
        raise BadArgumentError(f"--provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
    execution = Execution(provider)
    if provider == "cpu":
        return execution
    if execution.name not in ort.get_available_providers():
        raise BadArgumentError(
            f"--provider {provider}: this onnxruntime has no {execution.name}; install onnxruntime-gpu in its "
            "place (README, GPU) or use --provider cpu"
        )
    _preload()
    execution.session(_probe())
    return execution


def _preload() -> None:
    """Load the CUDA and cuDNN libraries of NVIDIA's pip packages (``onnxruntime-gpu[cuda,cudnn]``), which are on
    no library path: ``onnxruntime.preload_dlls`` (ORT 1.21 and later). Libraries already loaded (e.g. by torch) or
    found on the library path are used as they are; what it prints about libraries it could not load goes to the
    debug log (the probe session then says whether CUDA starts)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        preload()
    if said.getvalue().strip():
        log.debug("onnxruntime.preload_dlls: %s", " ".join(said.getvalue().split()))


def _probe() -> onnx.ModelProto:
    """A one-node model (Identity) that any provider runs: creating its session loads the provider's libraries."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
