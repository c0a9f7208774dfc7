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


_API = ("analyze", "optimize", "Analysis", "Result")


def __getattr__(name: str):
    """Lazy access to the API (PEP 562): importing a submodule does not load the whole pipeline."""
    if name in _API:
        from onnx_easier import api

        return getattr(api, name)
    raise AttributeError(f"module 'onnx_easier' has no attribute {name!r}")

__all__ = [
    "Analysis",
    "BadArgumentError",
    "BadDataError",
    "InvalidModelError",
    "OnnxEasierError",
    "Result",
    "UnsupportedModelError",
    "VerificationError",
    "analyze",
    "optimize",
]
