"""--time-limit: no trial starts after it; the best model verified until then is written and the report says so."""
from __future__ import annotations

import json
import time
from pathlib import Path

import onnx
import pytest

from onnx_easier import select
from onnx_easier.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_cut_short_after_one_trial_writes_what_was_accepted(tmp_path: Path, monkeypatch) -> None:
    """The clock runs out right after the first trial (the trial moves the deadline into the past): the search
    stops, the state it accepted is written and verified, exit 0, and the report says what was left untried."""
    real = select.Search._trial

    def one_then_out_of_time(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        self.deadline = time.perf_counter() - 1.0
        return out

    monkeypatch.setattr(select.Search, "_trial", one_then_out_of_time)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code = main([str(ROOT / "models/vgg_digits.onnx"), str(out), "--data", str(ROOT / "models/digits16_calib.npz"),
                 "--samples", "400", "--strategy", "entropy", "--time-limit", "3600", "--report", str(rep), "-q"])
    assert code == 0
    report = json.loads(rep.read_text())
    trials = report["search"]["entropy"]["trials"]
    assert len(trials) == 1
    planned = len(report["activations"]) - len(report["search"]["entropy"]["skipped"])  # no-gain ones skipped
    assert report["time_limit"]["cut_short"] and report["time_limit"]["untried"]["entropy"] == planned - 1
    accepted = trials[0]["activations"] if trials[0]["accepted"] else []
    assert report["search"]["entropy"]["linearized"] == accepted
    assert report["verification"]["ok"]
    assert any("time limit" in w for w in report["warnings"])
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_time_limit_must_be_positive(tmp_path: Path, capsys) -> None:
    code = main([str(ROOT / "models/vgg_digits.onnx"), str(tmp_path / "o.onnx"), "--time-limit", "-1", "-q"])
    assert code == 2
    assert "--time-limit" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("limit", ["0"])
def test_zero_means_no_limit(tmp_path: Path, limit: str) -> None:
    rep = tmp_path / "r.json"
    code = main([str(ROOT / "models/vgg_digits.onnx"), str(tmp_path / "o.onnx"), "--data",
                 str(ROOT / "models/digits16_calib.npz"), "--samples", "200", "--max-remove", "1",
                 "--strategy", "entropy", "--time-limit", limit, "--report", str(rep), "-q"])
    assert code == 0
    assert "time_limit" not in json.loads(rep.read_text())
