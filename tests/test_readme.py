"""The README's two commands are the contract: run the main job exactly as the README writes it (on the shipped
example model), and check that CI runs the README's test command."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from onnx_easier.cli import main

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The indented command lines of the README's "Set up" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one() -> None:
    cmds = readme_commands()
    assert len(cmds) == 2
    assert "pip install" in cmds[0] and "onnx-easier" in cmds[0]
    assert "pytest" in cmds[1]
    assert cmds[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_main_command_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    steps = [shlex.split(part) for part in readme_commands()[0].split("&&")]
    argv = steps[-1]
    assert argv[0] == "onnx-easier"
    args = [str(ROOT / a) if re.match(r"^models/", a) else a for a in argv[1:]]
    if not Path(args[0]).exists():
        pytest.skip(f"{args[0]} is not shipped yet")
    monkeypatch.chdir(tmp_path)
    for step in steps[1:-1]:  # the folders the README makes for the outputs
        assert step[:2] == ["mkdir", "-p"], step
        for folder in step[2:]:
            Path(folder).mkdir(parents=True)
    outputs = [a for a in argv[2:] if not a.startswith("-") and not re.match(r"^models/", a)]
    assert all(a.startswith("out/") for a in outputs), "the quick start writes under out/ (ignored by git)"
    assert "/out/" in (ROOT / ".gitignore").read_text().split()
    code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err
    reports = [a for a, prev in zip(args[1:], args) if prev == "--report"]
    assert reports, "the README's example writes a report"
    rep = json.loads((tmp_path / reports[0]).read_text())
    assert {"model", "data", "activations", "before", "after"} <= set(rep)
    assert (tmp_path / args[1]).exists()
    # the README says why the shipped example warns, and with the figure the run measures; it warns of nothing else
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert len(rep["warnings"]) == 1 and "mean top-1 confidence" in rep["warnings"][0], rep["warnings"]
    figure = re.search(r"is (\d+\.\d%)", rep["warnings"][0]).group(1)
    assert f"mean top-1 confidence is {figure}" in readme
    assert "may understate the loss on harder inputs" in readme and "may understate the loss" in rep["warnings"][0]
    held = rep["fidelity"]["samples"]
    assert f"Of its {rep['data']['samples']} samples the run holds out {held}" in readme


def test_readme_claims_match_the_code(capsys) -> None:
    """The intro's latency rule is the code's margin; --help and the README list the same exit codes; a test the
    README names exists; the README mentions xfail tests only if there are some."""
    from onnx_easier.api import NOISE_MARGIN

    readme = " ".join((ROOT / "README.md").read_text().split())
    intro = readme.split("## Set up", 1)[0]
    assert f"more than {NOISE_MARGIN:.0%} slower than the input" in intro
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for code in ("0", "1", "2", "130"):
        assert re.search(rf"\b{code} (ok|success|bad input|internal failure|interrupted)", help_text), code
        assert re.search(rf"Exit codes:[^.]*\b{code} ", readme), code
    for path, name in re.findall(r"`(tests/test_\w+\.py)::(\w+)`", readme):
        assert f"def {name}(" in (ROOT / path).read_text(), f"{path}::{name}"
    tests = [f for f in (ROOT / "tests").glob("test_*.py") if f.name != "test_readme.py"]
    xfails = any("pytest.mark.xfail" in f.read_text() for f in tests)
    assert "xfail" not in readme or xfails
