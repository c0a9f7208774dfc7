"""tools/train_mixer.py: the unseen model of the README's distillation figures is what its docstring says, and both
of its exports compute what the torch module computes (untrained weights: the export, not the training, is tested)."""

from __future__ import annotations

import collections
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def train_mixer() -> ModuleType:
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    pytest.importorskip("sklearn")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "tools"))
        import train_mixer

        return train_mixer


def test_labels_match_the_calibration_file(train_mixer: ModuleType) -> None:
    with np.load(ROOT / "models" / "digits16_calib.npz") as calib:
        assert train_mixer.labels().shape == (calib["x"].shape[0],)


@pytest.mark.slow
def test_exports_equal_torch(train_mixer: ModuleType, tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    model = train_mixer.Mixer().eval()
    x = torch.randn(5, 1, 16, 16)
    train_mixer.export(model, x[:2], tmp_path)
    with torch.no_grad():
        want = model(x).numpy()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for name, opset in (("mixer_dynamo.onnx", 18), ("mixer_ts.onnx", 14)):
        path = tmp_path / name
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {opset}
        ops = collections.Counter(n.op_type for n in proto.graph.node)
        assert ops["MatMul"] == 4 * train_mixer.BLOCKS  # two Linear layers per MLP, two MLPs per block
        assert ops["Erf"] == ops["Tanh"] == train_mixer.BLOCKS  # exact GELU in the FFNs, tanh GELU in the token MLPs
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x.numpy()})[0]  # 5 samples: the batch axis is dynamic
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
