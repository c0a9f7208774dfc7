"""Command line: ``onnx-easier IN.onnx [OUT.onnx] [options]``. The only module that prints or configures logging.

Exit codes: 0 success; 2 bad input (model, data, arguments); 1 internal failure or failed verification;
130 interrupted. Errors are one line on stderr; ``-v`` adds the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from onnx_easier import __version__
from onnx_easier.errors import BadArgumentError, OnnxEasierError
from onnx_easier.memory import one_heap

log = logging.getLogger("onnx_easier")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onnx-easier",
        description="Make an exported ONNX network shallower: EASIER entropy of every activation, "
        "linearization of the lowest-entropy ones, exact fusion of the layers they leave linear.",
        epilog="Without OUT the model is only analysed (entropy table, --report). Exit codes: 0 ok, 2 bad input, "
        "1 internal failure or failed verification, 130 interrupted (Ctrl-C: nothing written).",
    )
    p.add_argument("input", metavar="IN.onnx", help="the exported model")
    p.add_argument("output", metavar="OUT.onnx", nargs="?", help="where to write the optimized model")
    p.add_argument("--data", metavar="PATH", help=".npz keyed by input names, .npy (single input), or a folder of "
                   "them; first axis = samples. Default: random samples (entropies then describe no real input)")
    p.add_argument("--report", metavar="R.json|R.html", action="append", default=[],
                   help="write the report: JSON, or one self-contained HTML page when the name ends in .html "
                   "(repeatable)")
    p.add_argument("--samples", type=int, metavar="N", help="use at most N calibration samples")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed for random data and for the split of --data into fit / check / held-out samples "
                        "(default 0)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                   help="shape of a dynamic input for random data, e.g. x:1,3,224,224 (repeatable)")
    p.add_argument("--linearize", choices=("identity", "affine"), default="affine",
                   help="identity (the paper) or per-channel least-squares affine fit (default)")
    p.add_argument("--tolerance", type=float, default=0.01, metavar="T",
                   help="allowed fidelity loss against the original on held-out samples (default 0.01; "
                   "0 = exact fusions only)")
    p.add_argument("--metric", choices=("agreement", "cosine", "rel-l2"),
                   help="fidelity metric (default: agreement, KL-aware, for classifiers [N, K>1]; rel-l2 otherwise)")
    p.add_argument("--strategy", choices=("auto", "entropy", "merge"), default="auto",
                   help="entropy: single activations in EASIER order (the paper); merge: groups whose removal "
                   "lets layers merge first; auto (default): both, keep the faster model")
    p.add_argument("--max-remove", type=int, metavar="K", help="linearize at most K activations")
    p.add_argument("--try-all", action="store_true",
                   help="also try candidates predicted to gain nothing (no layer, depth, MACs or elementwise work "
                   "saved); by default they are skipped and listed in the report")
    p.add_argument("--no-refit", action="store_true",
                   help="do not re-fit merged layers by least squares to the original model's tensors")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                   help="ONNX Runtime execution provider of calibration, search trials and latency (default cpu; "
                   "cuda needs onnxruntime-gpu in place of onnxruntime)")
    p.add_argument("--remove", type=int, metavar="K",
                   help="the paper's mode: linearize exactly the K lowest-entropy activations, then fuse (no "
                   "budget, no re-fit); --remove 0 runs only the exact fusions")
    p.add_argument("--time-limit", type=float, default=600.0, metavar="SECONDS",
                   help="no search trial starts after SECONDS from the start (default 600): the best model verified "
                        "until then is written and the report says the search was cut short; 0: no limit")
    p.add_argument("--distill", action="store_true",
                   help="distil to the original's outputs on the calibration data (torch: pip install "
                   "\"onnx-easier[distill]\"): a candidate that fails the budget by at most 2.5x, before it is "
                   "rejected, and the chosen model (kept only if its held-out fidelity improves)")
    p.add_argument("--distill-scope", choices=("merged", "all"), default="merged",
                   help="layers --distill trains: those the search merged or re-fitted (default), or all")
    p.add_argument("--distill-loss", choices=("kl", "logits"), default="kl",
                   help="how --distill compares a classifier's outputs with the original's: KL of the class "
                        "distributions (default) or the squared error of the logits (logit regression)")
    p.add_argument("--distill-steps", type=int, metavar="N",
                   help="length of each distillation's schedule, in batches (default 300; the time budget may stop "
                        "it sooner)")
    p.add_argument("--distill-features", type=float, default=0.0, metavar="W",
                   help="weight of a feature-matching term in --distill's loss: the relative squared error of the "
                        "trained layers' outputs that the original computes under the same name (default 0: off)")
    p.add_argument("--distill-seconds", type=float, metavar="S",
                   help="time for all of --distill (default: 0.6 of the run's own time)")
    p.add_argument("--keep-failed", action="store_true",
                   help="write OUT even when its final verification fails (exit code stays 1)")
    p.add_argument("--overwrite", action="store_true", help="allow OUT to be the same file as IN")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", help="debug log, tracebacks on errors")
    g.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p.add_argument("--version", action="version", version=f"onnx-easier {__version__}")
    return p


def _check_output_path(out: str, src: str, overwrite: bool, flag: str) -> None:
    """Refuse before any work: OUT equal to IN (without --overwrite), missing or read-only folder, a directory."""
    path = Path(out)
    folder = path.parent if str(path.parent) else Path(".")
    same = path.resolve() == Path(src).resolve() or (path.exists() and Path(src).exists()
                                                      and os.path.samefile(path, src))
    if same and not overwrite:
        raise BadArgumentError(f"{flag} {out} is the input model; pass --overwrite to replace it (atomically)")
    if path.is_dir():
        raise BadArgumentError(f"{flag} {out} is a directory; give a file path")
    if not folder.is_dir():
        raise BadArgumentError(f"{flag} {out}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise BadArgumentError(f"{flag} {out}: folder {folder} is not writable")


def _setup_logging(verbose: bool, quiet: bool) -> Console:
    console = Console(stderr=True)
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    handler = RichHandler(console=console, show_time=False, show_path=verbose, markup=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)
    return console


class Interrupts:
    """SIGINT bookkeeping: the handler records the interrupt before raising KeyboardInterrupt, so an interrupt
    that Python swallows (raised inside a finalizer or weakref callback) still stops the tool before it writes."""

    def __init__(self) -> None:
        self.seen = False

    def handler(self, signum: int, frame: object) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if an interrupt arrived at any time, even a swallowed one."""
        if self.seen:
            raise KeyboardInterrupt


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``12s``."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _TimeLeft(ProgressColumn):
    """``~3m05s left``, counting down to the task's ``until`` field (a time.perf_counter(); None: nothing shown)."""

    def render(self, task: Task) -> Text:
        until = task.fields.get("until")
        return Text("" if until is None else f"~{_duration(max(0.0, until - time.perf_counter()))} left")


class StepDisplay:
    """What a terminal shows of a run (``on_step(phase, done, planned, message)``, select.StepHook): the phase,
    steps done / planned and the time left, estimated from the mean step of the phase so far and capped by the time
    limit (no trial starts after it); each message is one line above the bar. Calibration shows its own bar
    (calibrate.py): this one is not live meanwhile (one live display at a time)."""

    def __init__(self, console: Console, deadline: float | None = None) -> None:
        self.console = console
        self.deadline = deadline  # time.perf_counter() of the time limit
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._phase: str | None = None
        self._t0 = 0.0

    def __call__(self, phase: str, done: int, planned: int, message: str) -> None:
        now = time.perf_counter()
        new = phase != self._phase
        if new:
            self._phase, self._t0 = phase, now
        if phase == "calibration":
            self.close()
            return
        if self._progress is None:
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.fields[count]}"), TimeElapsedColumn(), _TimeLeft(),
                                      console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task("", total=None, count="", until=None)
            new = True
        if message:
            self._progress.console.print(message, markup=False, highlight=False)
        fields = {"total": planned or None, "completed": done, "description": phase.replace("_", " "),
                  "count": f"{done}/{planned}" if planned else "", "until": self.finish(done, planned, now)}
        if new:  # the elapsed time counts from the phase's start
            self._progress.reset(self._task, **fields)
        else:
            self._progress.update(self._task, **fields)

    def finish(self, done: int, planned: int, now: float) -> float | None:
        """When the phase should end (time.perf_counter()), from the mean step so far; at the latest one step
        after the time limit. None before the first step or without a plan."""
        if not done or done >= planned:
            return None
        mean = (now - self._t0) / done
        left = mean * (planned - done)
        if self.deadline is not None:
            left = min(left, max(0.0, self.deadline - now) + mean)
        return now + left

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def run(args: argparse.Namespace, console: Console, interrupts: Interrupts | None = None) -> int:
    """Do the job described by parsed ``args``; raise OnnxEasierError on bad input."""
    from onnx_easier.data import parse_input_shapes

    if args.samples is not None and args.samples < 1:
        raise BadArgumentError(f"--samples must be >= 1, not {args.samples}")
    if args.output:
        _check_output_path(args.output, args.input, args.overwrite, "OUT")
    for rep_path in args.report:
        _check_output_path(rep_path, args.input, False, "--report")
    if args.output and args.output in args.report:
        raise BadArgumentError("OUT and --report name the same file")
    shapes = parse_input_shapes(args.input_shape) if args.input_shape else None
    progress = not args.quiet and sys.stderr.isatty()
    display = StepDisplay(console, None if not args.time_limit else time.perf_counter() + args.time_limit) \
        if progress and args.output else None
    try:
        return _run(args, shapes, progress, display, interrupts)
    finally:
        if display is not None:
            display.close()


def _run(args: argparse.Namespace, shapes: dict | None, progress: bool, display: StepDisplay | None,
         interrupts: Interrupts | None) -> int:
    from onnx_easier import api, report

    if args.output is None:
        analysis = api.analyze(args.input, args.data, samples=args.samples, seed=args.seed, input_shapes=shapes,
                               progress=progress, provider=args.provider)
        rep = analysis.report()
    else:
        result = api.optimize(args.input, args.data, tolerance=args.tolerance, metric=args.metric,
                              strategy=args.strategy, max_remove=args.max_remove, remove=args.remove,
                              linearize_mode=args.linearize, refit=not args.no_refit, provider=args.provider,
                              try_all=args.try_all,
                              samples=args.samples, seed=args.seed, input_shapes=shapes, progress=progress,
                              time_limit=args.time_limit or None, on_step=display, distill=args.distill,
                              distill_scope=args.distill_scope, distill_seconds=args.distill_seconds,
                              distill_loss=args.distill_loss, distill_steps=args.distill_steps,
                              distill_features=args.distill_features)
        rep = result.report
        rep["output"] = args.output
        if interrupts is not None:
            interrupts.check()
        if display is not None:
            display("verification", 0, 0, f"writing {args.output}: reload and verify")
        try:
            result.write(args.output, keep_failed=args.keep_failed)
        except OnnxEasierError:
            _write_reports(rep, args.report)  # a failed verification is reported (not on an interrupt)
            raise
    if display is not None:
        display.close()
    _write_reports(rep, args.report)
    if not args.quiet:
        report.print_report(rep, Console())
    return 0


def _write_reports(rep: dict, paths: list[str]) -> None:
    from onnx_easier import report
    from onnx_easier.report_html import write_html

    for path in paths:
        if path.lower().endswith((".html", ".htm")):
            write_html(rep, path)
        else:
            report.write_json(rep, path)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``onnx-easier`` command."""
    args = build_parser().parse_args(argv)
    one_heap()  # before ORT starts any thread (memory.one_heap)
    console = _setup_logging(args.verbose, args.quiet)
    interrupts = Interrupts()
    previous = signal.getsignal(signal.SIGINT)
    installed = threading.current_thread() is threading.main_thread()
    hook = sys.unraisablehook
    if installed:
        signal.signal(signal.SIGINT, interrupts.handler)
        # an interrupt raised inside a finalizer cannot propagate: it is recorded (and acted on before writing),
        # so Python's "Exception ignored" traceback would only be noise
        sys.unraisablehook = lambda u: None if issubclass(u.exc_type, KeyboardInterrupt) else hook(u)
    try:
        return run(args, console, interrupts)
    except OnnxEasierError as exc:
        if args.verbose:
            traceback.print_exc()
        console.print(f"onnx-easier: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("onnx-easier: interrupted; nothing was written", markup=False, highlight=False)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: one line, traceback only with -v
        if args.verbose:
            traceback.print_exc()
        console.print(f"onnx-easier: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)",
                      markup=False, highlight=False, soft_wrap=True)
        return 1
    finally:
        if installed:
            signal.signal(signal.SIGINT, previous)
            sys.unraisablehook = hook


if __name__ == "__main__":
    sys.exit(main())
