"""onnx-easier: make exported ONNX networks shallower (EASIER entropy-guided linearization + exact fusion)."""
from __future__ import annotations

from onnx_easier.errors import (
    BadArgumentError,
    BadDataError,
    InvalidModelError,
    OnnxEasierError,
    UnsupportedModelError,
    VerificationError,
)

__version__ = "0.1.0"


def analyze(*args, **kwargs):  # noqa: D103 - thin lazy re-export, documented in api.analyze
    from onnx_easier.api import analyze as _analyze

    return _analyze(*args, **kwargs)


def optimize(*args, **kwargs):  # noqa: D103 - thin lazy re-export, documented in api.optimize
    from onnx_easier.api import optimize as _optimize

    return _optimize(*args, **kwargs)


__all__ = [
    "analyze",
    "optimize",
    "OnnxEasierError",
    "InvalidModelError",
    "UnsupportedModelError",
    "BadDataError",
    "BadArgumentError",
    "VerificationError",
]
