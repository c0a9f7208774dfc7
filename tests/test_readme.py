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
