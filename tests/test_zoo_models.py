"""The example models in ``models/``: valid ONNX, accurate in ONNX Runtime, data files as documented.

Also checks that ``tools/zoo.py`` builds what its docstrings say and that ``tools/train_digits.py``
regenerates the committed data files bit for bit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"

# name -> input resolution; other tests and the benchmarks rely on these names.
EXPECTED = {
    "vgg_digits": 16,
    "resnet_digits": 16,
    "mobilenetv2_digits": 16,
    "ffn_digits": 16,
    "mobilenetv2_wide_digits": 64,
    "ffn_wide_digits": 16,
}
RESOLUTIONS = sorted(set(EXPECTED.values()))
N_TRAIN, N_TEST = 1257, 540
BUDGET_BYTES = 4.5 * 2**20


@pytest.fixture(scope="module")
def tools() -> Iterator[tuple[ModuleType, ModuleType]]:
    """``(zoo, train_digits)`` imported from ``tools/``, which is a folder of scripts, not a package."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    torch.set_num_threads(2)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "tools"))
        import train_digits
        import zoo

        yield zoo, train_digits


@pytest.fixture(scope="module")
def accuracies() -> dict[str, float]:
    return json.loads((MODELS / "accuracy.json").read_text())


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_accuracy_json_lists_exactly_the_models(accuracies: dict[str, float]) -> None:
    assert set(accuracies) == set(EXPECTED)
    assert {p.stem for p in MODELS.glob("*.onnx")} == set(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_model_is_valid_onnx(name: str) -> None:
    model = onnx.load(str(MODELS / f"{name}.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (x,), (logits,) = model.graph.input, model.graph.output
    assert x.name == "x" and logits.name == "logits"
    r = EXPECTED[name]
    dims = [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim]
    assert dims == ["N", 1, r, r]
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["N", 10]


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPECTED)
def test_model_reaches_listed_accuracy_in_ort(name: str, accuracies: dict[str, float]) -> None:
    with np.load(MODELS / f"digits{EXPECTED[name]}_test.npz") as data:
        x, y = data["x"], data["y"]
    (logits,) = session(MODELS / f"{name}.onnx").run(["logits"], {"x": x})
    assert logits.shape == (N_TEST, 10)
    assert (logits.argmax(axis=1) == y).mean() * 100 >= accuracies[name] - 0.5
    assert accuracies[name] >= 95.0


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_data_files_have_documented_shapes(resolution: int) -> None:
    with np.load(MODELS / f"digits{resolution}_calib.npz") as calib:
        assert calib.files == ["x"]
        assert calib["x"].dtype == np.float32 and calib["x"].shape == (N_TRAIN, 1, resolution, resolution)
    with np.load(MODELS / f"digits{resolution}_test.npz") as test:
        assert sorted(test.files) == ["x", "y"]
        assert test["x"].dtype == np.float32 and test["x"].shape == (N_TEST, 1, resolution, resolution)
        assert test["y"].dtype == np.int64 and test["y"].shape == (N_TEST,)
        assert np.bincount(test["y"]).tolist() == [54, 55, 53, 55, 54, 55, 54, 54, 52, 54]


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_data_files_are_reproducible(resolution: int, tools: tuple[ModuleType, ModuleType]) -> None:
    _, train_digits = tools
    split = train_digits.load_split(resolution)
    with np.load(MODELS / f"digits{resolution}_calib.npz") as calib:
        np.testing.assert_array_equal(calib["x"], split.x_train)
    with np.load(MODELS / f"digits{resolution}_test.npz") as test:
        np.testing.assert_array_equal(test["x"], split.x_test)
        np.testing.assert_array_equal(test["y"], split.y_test)


def test_readme_lists_the_measured_accuracies(accuracies: dict[str, float]) -> None:
    readme = (MODELS / "README.md").read_text()
    assert "python tools/train_digits.py" in readme
    for name, acc in accuracies.items():
        row = re.search(rf"^\| `{name}` \|.*$", readme, flags=re.MULTILINE)
        assert row is not None, f"{name} missing from models/README.md"
        assert f"| {acc:.2f} |" in row.group(0)


def test_models_folder_stays_small() -> None:
    assert sum(p.stat().st_size for p in MODELS.iterdir() if p.is_file()) < BUDGET_BYTES


def test_train_digits_specs_match_the_committed_models(tools: tuple[ModuleType, ModuleType]) -> None:
    _, train_digits = tools
    assert {s.name: s.resolution for s in train_digits.SPECS} == EXPECTED


@pytest.mark.parametrize(
    ("arch", "kwargs", "resolution"),
    [
        ("VGG", {"config": (8, "M", 8, "M"), "resolution": 12, "hidden": 16}, 12),
        ("ResNet", {"widths": (8, 16, 16), "depths": (1, 2, 1), "resolution": 16}, 16),
        ("MobileNetV2", {"stem": 8, "blocks": ((2, 8, 1), (2, 16, 2)), "last": 32, "resolution": 8}, 8),
        ("MobileNetV2", {"stem": 8, "stem_stride": 2, "blocks": ((6, 8, 1),), "last": 16, "resolution": 32}, 32),
        ("TokenFFN", {"dim": 16, "depth": 1, "resolution": 8, "patch": 2}, 8),
        ("TokenFFN", {"dim": 16, "depth": 2, "resolution": 16, "patch": 4, "attention": True}, 16),
    ],
)
def test_zoo_maps_images_to_logits(
    arch: str, kwargs: dict[str, object], resolution: int, tools: tuple[ModuleType, ModuleType]
) -> None:
    import torch

    zoo, _ = tools
    model = getattr(zoo, arch)(num_classes=7, **kwargs).eval()
    assert model(torch.zeros(3, 1, resolution, resolution)).shape == (3, 7)


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("VGG", {"config": (8, "M", 8, "M"), "resolution": 14}),
        ("ResNet", {"widths": (8, 16), "depths": (1, 1), "resolution": 15}),
        ("MobileNetV2", {"blocks": ((2, 8, 2),), "stem_stride": 2, "resolution": 18}),
        ("TokenFFN", {"resolution": 16, "patch": 3}),
    ],
)
def test_zoo_refuses_resolutions_it_cannot_downsample(
    arch: str, kwargs: dict[str, object], tools: tuple[ModuleType, ModuleType]
) -> None:
    zoo, _ = tools
    with pytest.raises(ValueError, match="resolution"):
        getattr(zoo, arch)(**kwargs)


def test_inverted_residual_skips_only_when_shapes_match(tools: tuple[ModuleType, ModuleType]) -> None:
    zoo, _ = tools
    assert zoo.InvertedResidual(8, 8, 1, 6).use_skip
    assert not zoo.InvertedResidual(8, 8, 2, 6).use_skip
    assert not zoo.InvertedResidual(8, 16, 1, 6).use_skip
