"""The public error family. The CLI turns each into one line and the exit code named here."""
from __future__ import annotations


class OnnxEasierError(Exception):
    """Base of every error onnx-easier raises on purpose. Exit code 1 (internal failure)."""

    exit_code = 1


class InvalidModelError(OnnxEasierError):
    """The input is not a valid ONNX model (missing, unreadable, fails onnx.checker). Exit code 2."""

    exit_code = 2


class UnsupportedModelError(OnnxEasierError):
    """A valid model that onnx-easier cannot handle (opset out of range, ops ORT cannot run). Exit code 2."""

    exit_code = 2


class BadDataError(OnnxEasierError):
    """Calibration data or input shapes that do not match the model. Exit code 2."""

    exit_code = 2


class BadArgumentError(OnnxEasierError):
    """A command-line argument that cannot be honoured (output path, option values). Exit code 2."""

    exit_code = 2


class VerificationError(OnnxEasierError):
    """The written model is outside the fidelity tolerance against the original. Exit code 1."""

    exit_code = 1
