"""The statistics of tools/bench_easier.py (its checks are reported figures: they must be right)."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("bench_easier", Path(__file__).parents[1] / "tools" / "bench_easier.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_easier"] = bench  # its dataclasses look their module up
_SPEC.loader.exec_module(bench)


@pytest.mark.parametrize(("b", "c", "p"), [(0, 0, 1.0), (1, 0, 1.0), (2, 1, 1.0), (5, 0, 2 / 32),
                                           (10, 2, 2 * (1 + 12 + 66) / 4096), (3, 30, 2 * sum(
                                               math.comb(33, k) for k in range(4)) / 2**33)])
def test_mcnemar_exact(b: int, c: int, p: float) -> None:
    assert bench.mcnemar(b, c) == pytest.approx(p)
    assert bench.mcnemar(c, b) == pytest.approx(p)  # two-sided


def test_t6_is_literal_and_reports_the_paired_split() -> None:
    rf = {"linearized": 2, "accuracy_loss": 0.19, "test_errors": [1, 5, 9]}
    nr = {"linearized": 1, "accuracy_loss": 0.0, "test_errors": [1, 7]}
    text, ok = bench._t6(rf, nr)
    assert not ok  # one sample more lost: the literal target fails
    assert "2 vs 1, +0.19 vs +0.00 pt" in text and "only without: 2/1, McNemar p 1.00" in text
    text, ok = bench._t6({**rf, "accuracy_loss": 0.0, "test_errors": [1, 7]}, nr)
    assert ok and "0/0" in text
    assert not bench._t6({**rf, "linearized": 1, "accuracy_loss": -1.0}, nr)[1]  # not twice as many


def _tradeoff():
    spec = importlib.util.spec_from_file_location("bench_tradeoff",
                                                  Path(__file__).parents[1] / "tools" / "bench_tradeoff.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_iso_loss_takes_the_best_no_refit_count_at_no_more_test_loss() -> None:
    def point(refit: bool, tol: float, lin: int, loss: float) -> dict:
        return {"refit": refit, "tolerance": tol, "linearized": lin, "accuracy_loss": loss}

    res = {"points": [point(False, 0.01, 1, 0.0), point(False, 0.02, 3, 0.56), point(False, 0.04, 4, 2.0),
                      point(True, 0.01, 4, 0.37), point(True, 0.02, 6, 0.56), point(True, 0.04, 8, -0.19)]}
    got = [(q["tolerance"], q["linearized"], q["no_refit_best"]) for q in _tradeoff().iso_loss(res)]
    # 0.37: only the 1-activation run lost no more; 0.56: the 3-activation run ties it; a gain: no rival at all
    assert got == [(0.01, 4, 1), (0.02, 6, 3), (0.04, 8, None)]


def test_seed_summary_counts_the_literal_t6_per_model() -> None:
    spec = importlib.util.spec_from_file_location("bench_seeds", Path(__file__).parents[1] / "tools" / "bench_seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)
    nr = {"linearized": 1, "accuracy_loss": 0.0, "test_errors": [3]}
    rows = []
    for loss, errors in ((0.0, [3]), (0.19, [3, 4]), (-0.19, [])):
        rf = {"linearized": 2, "accuracy_loss": loss, "test_errors": errors}
        runs = {"no-refit": nr, "refit": rf, "matched": rf}
        t6 = {k: dict(zip(("text", "ok"), bench._t6(runs[k], nr))) for k in ("refit", "matched")}
        rows.append({"seed": len(rows), "runs": runs, "t6": t6})
    res = [{"model": "m", "rows": rows}]
    assert "| m | 3 | 2/3 | 2/3 |" in seeds.summary(res)
    assert "FAIL (wrong only with re-fit / only without: 1/0, McNemar p 1.00)" in seeds.table(res)
