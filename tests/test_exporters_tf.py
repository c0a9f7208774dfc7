"""tf2onnx spellings (Keras NHWC graphs with Transposes, tf2onnx's activation decompositions), from models exported
once by tools/export_tf2onnx.py and committed under tests/data/tf2onnx (tensorflow is not a test dependency).
Each must pass ``--remove 0`` numerically equivalent and ``--remove K --linearize identity`` equal to the export
with an Identity swapped in for the K activations the report marks "linearized"."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from test_odd_graphs import calib_for, check_optimized, optimize_cli, random_feeds

DATA = Path(__file__).resolve().parent / "data" / "tf2onnx"
# model -> the activation kinds (op, spelling) tf2onnx's export of it holds
EXPECTED = {
    "keras_cnn": {("Relu", "op"), ("Clip", "op"), ("HardSwish", "mul-clip-div"), ("Gelu", "tanh")},
    "keras_mlp": {("Relu", "op"), ("SiLU", "mul-sigmoid"), ("LeakyRelu", "op"), ("Clip", "op")},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tf2onnx_export(tmp_path: Path, capsys, name: str) -> None:
    model = onnx.load(str(DATA / f"{name}.onnx"))
    assert model.producer_name == "tf2onnx"
    calib = calib_for(model, 24)
    feeds = random_feeds(model, 5, batch=3)

    exact = optimize_cli(tmp_path, model, calib, "--remove", "0", capsys=capsys, name="exact")
    check_optimized(model, exact, feeds)
    kinds = {(a["op"], a["spelling"]) for a in exact.report["activations"]}
    assert kinds == EXPECTED[name]

    n = len(exact.report["activations"])
    for k in (1, n):
        lin = optimize_cli(tmp_path, model, calib, "--remove", str(k), "--linearize", "identity", capsys=capsys,
                           name=f"identity{k}")
        check_optimized(model, lin, feeds)
        assert sum(a["action"] == "linearized" for a in lin.report["activations"]) == k
    assert lin.report["after"]["compute_nodes"] < lin.report["before"]["compute_nodes"]
