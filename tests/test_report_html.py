"""report_html.py: a well-formed, self-contained page; one SVG bar per activation in graph order; escaping;
optional blocks."""
from __future__ import annotations

import copy
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from onnx_easier.report_html import render_html, write_html

VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "embed", "source", "track", "wbr"}
EVIL = '<script>alert("x")</script>" onmouseover="alert(1)'


class _Page(HTMLParser):
    """Checks that tags nest and close; records tags, classes, rect attributes and <title> texts in SVG."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.rects: list[dict[str, str]] = []
        self.rect_titles: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self._in_rect_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend(attrs)
        if tag == "rect":
            self.rects.append({k: v or "" for k, v in attrs})
        if tag == "title" and self.stack and self.stack[-1] == "rect":
            self._in_rect_title = True
            self.rect_titles.append("")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()
        if tag == "title":
            self._in_rect_title = False

    def handle_data(self, data: str) -> None:
        if self._in_rect_title:
            self.rect_titles[-1] += data


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    assert not p.errors, p.errors
    assert not p.stack, f"unclosed: {p.stack}"
    return p


def _report() -> dict:
    acts = [
        {"node": "relu_1", "op": "Relu", "spelling": "op", "tensor": "a", "channels": 16, "entropy": 0.5,
         "action": "kept"},
        {"node": "clip_2", "op": "Relu6", "spelling": "Clip", "tensor": "b", "channels": 32, "entropy": 0.0,
         "action": "linearized", "fidelity": 0.0042},
        {"node": "relu_3", "op": "Relu", "spelling": "op", "tensor": "c", "channels": 32, "entropy": 1.0,
         "action": "rejected", "fidelity": {"metric": "agreement", "value": 0.031}},
        {"node": "gelu_4", "op": "Gelu", "spelling": "op", "tensor": "d", "channels": 64, "entropy": 0.25,
         "action": "linearized"},
    ]
    cost = {"nodes": 40, "compute_nodes": 12, "activations": 4, "depth": 9, "params": 123456, "macs": 7890123,
            "per_op": {"Conv": 10, "Relu": 2, "Gemm": 2}}
    return {
        "tool": {"name": "onnx-easier", "version": "0.1.0"},
        "model": "models/mnv2_digits.onnx",
        "data": {"source": "models/digits16_calib.npz", "samples": 1257, "synthetic": False},
        "activations": acts,
        "before": cost,
        "after": {**cost, "nodes": 30, "compute_nodes": 8, "activations": 2, "depth": 6,
                  "per_op": {"Conv": 8, "Relu": 1}},
        "calibration_seconds": 1.234,
        "linearize": "affine",
        "remove": 2,
        "fidelity": {"metric": "agreement", "value": 0.0087, "tolerance": 0.01, "samples": 256,
                     "components": {"mean_kl": 0.0039, "top1_agreement": 1.0}},
        "latency_ms": {"before": {"median_ms": 2.0, "p10_ms": 1.9, "p90_ms": 2.3}, "after": 1.0, "provider": "cpu",
                       "batch": 1},
        "exactness": {"max_relative_error": 3e-7, "rtol": 1e-4, "samples": 64},
        "passes": [{"name": "linearize", "changed": True, "notes": ["2 activations"]}],
        "warnings": ["the original model is 99.9% confident on average on these samples"],
    }


def test_full_report_is_well_formed_and_self_contained(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    write_html(_report(), out)
    page = out.read_text(encoding="utf-8")
    p = _parse(page)
    assert p.tags.count("svg") == 1 and p.tags.count("html") == 1
    for banned in ("script", "link", "img", "iframe", "object"):
        assert banned not in p.tags
    assert not any(k in ("src", "href") for k, _ in p.attrs)
    assert "url(" not in page and "@import" not in page
    for text in ("Fidelity against the original", "mean kl", "within tolerance", "Latency", "0.500",
                 "2.00x as fast", "p90 2.3", "Fusions verified exact", "Passes", "99.9% confident", "123,456",
                 "Relu6 (Clip)", "after / before"):
        assert text in page, text
    assert os.listdir(tmp_path) == ["r.html"]  # no temporary file left


def test_one_bar_per_activation_in_graph_order_highlighting_linearized() -> None:
    report = _report()
    p = _parse(render_html(report))
    bars = [r for r in p.rects if "act" in r.get("class", "").split()]
    assert len(bars) == len(report["activations"])
    assert [t.split()[1] for t in p.rect_titles] == ["relu_1", "clip_2", "relu_3", "gelu_4"]  # graph order
    linearized = [i for i, r in enumerate(bars) if "linearized" in r["class"].split()]
    assert linearized == [1, 3]
    assert {bars[i]["fill"] for i in linearized} != {bars[0]["fill"]}
    heights = [float(r["height"]) for r in bars]
    assert heights[2] == pytest.approx(2 * heights[0]) == pytest.approx(4 * heights[3])  # 1.0, 0.5, 0.25 bits
    assert 0 < heights[1] < heights[3]  # entropy 0 stays a visible sliver


def test_decisions_table_rows_and_fidelity_cells() -> None:
    page = render_html(_report())
    assert page.count('<tr class="linearized">') == 2
    assert ">0.0042<" in page and ">0.031<" in page  # number and dict forms of "fidelity"
    assert "rejected" in page


def test_hostile_node_names_are_escaped() -> None:
    report = _report()
    report["activations"][0]["node"] = EVIL
    report["model"] = "<b>model</b>.onnx"
    report["before"]["per_op"]["<img src=x>"] = 1
    page = render_html(report)
    p = _parse(page)
    assert "script" not in p.tags and "b" not in p.tags and "img" not in p.tags
    assert not any(k == "onmouseover" for k, _ in p.attrs)
    assert EVIL in p.rect_titles[0]  # shown verbatim, as text
    assert "&lt;script&gt;" in page


def test_minimal_report_without_optional_blocks(tmp_path: Path) -> None:
    report = _report()
    for key in ("after", "fidelity", "latency_ms", "exactness", "passes", "warnings", "linearize", "remove",
                "calibration_seconds"):
        del report[key]
    for a in report["activations"]:
        a.pop("fidelity", None)
    write_html(report, tmp_path / "m.html")
    page = (tmp_path / "m.html").read_text(encoding="utf-8")
    _parse(page)
    assert "Fidelity against the original" not in page and "Latency" not in page
    assert "<th>after</th>" not in page and "<th>before</th>" not in page and "<th>count</th>" in page


def test_latency_before_only_and_infinite_fidelity() -> None:
    report = _report()
    report["latency_ms"] = {"before": 3.5, "provider": "cuda", "batch": 8}
    report["fidelity"] = {"metric": "rel-l2", "value": None, "tolerance": 0.01, "samples": 10, "ok": False}
    page = render_html(report)
    _parse(page)
    assert "3.5 ms" in page and "as fast" not in page and "cuda" in page
    assert "not finite" in page and "outside tolerance" in page


def test_no_activations_and_missing_entropy() -> None:
    report = copy.deepcopy(_report())
    report["activations"][0]["entropy"] = float("nan")
    p = _parse(render_html(report))
    assert "not measured" in p.rect_titles[0]
    report["activations"] = []
    page = render_html(report)
    _parse(page)
    assert "No activations found" in page and "<svg" not in page


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_html(_report(), tmp_path / "missing" / "r.html")
    assert os.listdir(tmp_path) == []


def test_search_trials_table() -> None:
    report = _report()
    report["strategy"] = {"chosen": "merge"}
    report["search"] = {
        "entropy": {"seconds": 1.5, "trials": [
            {"activations": ["r1"], "fidelity": 0.004, "accepted": True, "refit": [
                {"node": "fc2", "error_before": 0.4, "error_after": 0.1, "accepted": True},
                {"node": "fc2", "error_before": 0.01, "error_after": 0.008, "accepted": True,
                 "note": "KL re-fit of the head"}]},
            {"activations": ["r2"], "fidelity": 0.02, "accepted": False, "refit": [],
             "note": "the affine map would stay as a node: identity + re-fit"}]},
        "merge": {"seconds": 0.5, "trials": [
            {"activations": ["r1", EVIL], "fidelity": 0.003, "accepted": True, "refit": [
                {"node": EVIL, "error_before": 0.2, "error_after": 0.2, "accepted": False}],
             "note": "reused: same state and candidate as an earlier trial"}]},
    }
    page = render_html(report)
    assert "<h2>Search trials</h2>" in page
    assert "entropy: 2 trials, 1.5 s" in page and "merge (written): 1 trials, 0.5 s" in page
    assert "fc2: 0.4 &rarr; 0.1<br>fc2: 0.01 &rarr; 0.008 (KL, nats)" in page and "(not kept)" in page
    assert "identity + re-fit" in page and "reused" in page
    assert "<script>" not in page
    parser = _Page()
    parser.feed(page)
    assert not parser.errors and not parser.stack
    assert "Search trials" not in render_html(_report())  # no search block: no section


# --- a new user's first look (issue 15) ---------------------------------------------------------------------------


def _analysis_report() -> dict:
    acts = [{"node": f"relu{i}", "op": "Relu", "spelling": "op", "tensor": f"t{i}", "channels": 8,
             "entropy": 0.1 * i, "action": "kept"} for i in range(3)]
    return {"model": "m.onnx", "data": {"source": "d.npz", "samples": 8, "synthetic": False}, "activations": acts,
            "before": {"nodes": 9, "compute_nodes": 4, "activations": 3, "depth": 4, "params": 10, "macs": 100,
                       "per_op": {"Conv": 4, "Relu": 3}}}


def test_analyse_mode_says_nothing_was_decided() -> None:
    page = render_html(_analysis_report())
    _parse(page)
    assert "<h2>Model</h2>" in page and "before / after" not in page and "<th>before</th>" not in page
    assert "<h2>Decisions</h2>" not in page and "<h2>Activations (analysis only)</h2>" in page
    assert "nothing was linearized or fused" in page
    assert "<th>action</th>" not in page and "fidelity when tried" not in page  # no column of "kept"
    assert ">kept<" not in page and 'class="linearized"' not in page
    assert page.count('class="act not-decided"') == 3  # the plot's bars are not coloured as kept either


def _long_name_report() -> dict:
    """A searched model whose fused layers name all their sources, with a long note."""
    long = "fused(" + "+".join(f"/backbone/stage{i}/block/conv_{i}" for i in range(12)) + ")"
    report = {**_analysis_report(), "after": {"nodes": 5, "compute_nodes": 2, "activations": 1, "depth": 2,
                                              "params": 8, "macs": 60, "per_op": {"Conv": 2, "Relu": 1}},
              "mode": "tolerance",
              "search": {"entropy": {"linearized": ["relu0"], "seconds": 1.0, "trials": [
                  {"activations": ["relu0"], "fidelity": 0.001, "accepted": True, "seconds": 0.5,
                   "refit": [{"node": long, "target": "t", "error_before": 0.1, "error_after": 0.01,
                              "accepted": True}], "note": "x" * 300},
                  {"activations": [long], "fidelity": 0.02, "accepted": False, "seconds": 0.5,
                   "refit": [{"node": long, "target": "t", "error_before": 0.1, "error_after": 0.05,
                              "accepted": False}], "note": "a long note " * 40}]}},
              "strategy": {"chosen": "entropy"},
              "passes": [{"name": "cleanup", "changed": 0, "notes": []}, {"name": "cleanup", "changed": 0, "notes": []},
                         {"name": "fuse_chains", "changed": 2, "notes": [f"chain cut at {long}"]}]}
    report["activations"] = [{**a, "node": f"{long}/relu{i}"} for i, a in enumerate(report["activations"])]
    report["activations"][0]["action"] = "linearized"
    return report


def test_long_fused_names_are_shortened_with_the_full_name_on_hover() -> None:
    report = _long_name_report()
    long = report["search"]["entropy"]["trials"][0]["refit"][0]["node"]
    page = render_html(report)
    _parse(page)
    tables = re.sub(r'title="[^"]*"|<title>.*?</title>', "", page).split("<h2>Passes")[0]  # notes: prose, wraps
    assert long not in tables  # shown shortened...
    assert f'<abbr title="{long}">' in page  # ...in full on hover
    assert "/<wbr>backbone/<wbr>" in page  # names wrap between their parts, never inside one
    assert "Model before / after" in page
    # every table sits in a box that scrolls on its own: the page never overflows sideways
    assert page.count('<div class="scroll"><table>') == page.count("<table>")
    # one line per pass, with its rewrite count; a page whose model lost layers does not just say "no change"
    assert page.count("<strong>cleanup</strong>") == 1 and "no rewrite in 2 runs" in page
    assert "<strong>fuse_chains</strong>: 2 rewrites in 1 run" in page
    assert "fusions after each linearization are in the search trials" in page


def test_css_keeps_tables_inside_the_page() -> None:
    """The CSS check the issue allows where no headless browser can be installed: the boxes around tables scroll,
    long names and notes wrap, the plot has room for its axis title."""
    from onnx_easier.report_html import _CSS, MIN_PLOT_WIDTH, entropy_svg

    rules = {sel.strip(): body for sel, body in
             (r.split("{", 1) for r in _CSS.replace("\n", " ").split("}") if "{" in r)}
    scroll = next(body for sel, body in rules.items() if ".scroll" in sel)
    assert "overflow-x: auto" in scroll and "max-width: 100%" in scroll
    assert "overflow-wrap: anywhere" in rules["body"]  # prose (warnings, pass notes) wraps, however long a name
    assert "overflow-wrap: break-word" in rules["td.name"] and "max-width" in rules["td.name"]  # at its <wbr>s
    assert "overflow-wrap: anywhere" in rules["td.note"] and "max-width" in rules["td.note"]
    svg = entropy_svg([{"node": "a", "op": "Relu", "entropy": 0.5, "action": "kept"}])
    assert f'width="{MIN_PLOT_WIDTH}"' in svg  # one bar: still wide enough for "activations in graph order (...)"


def _chromium() -> str | None:
    """A Chromium or Chrome on PATH (playwright drives it), else None."""
    import shutil

    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_rendered_in_a_browser_nothing_overflows(tmp_path: Path) -> None:
    """Headless Chromium at 1400 px: neither the page nor a table box is wider than the window (long names wrap),
    and no text of the entropy plot falls outside the SVG (its axis title was cut on small models)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium on PATH")
    pages = {"analysis": _analysis_report(), "long names": _long_name_report(), "full": _report()}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            view = browser.new_page(viewport={"width": 1400, "height": 900})
            for name, report in pages.items():
                write_html(report, tmp_path / "r.html")
                view.goto((tmp_path / "r.html").as_uri())
                page_w, window_w = view.evaluate(
                    "[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
                assert page_w <= window_w, name
                wide = view.evaluate("[...document.querySelectorAll('.scroll')]"
                                     ".filter(d => d.scrollWidth > d.clientWidth).length")
                assert wide == 0, f"{name}: {wide} table(s) scroll sideways at 1400 px"
                cut = view.evaluate("""[...document.querySelectorAll('svg')].flatMap(s =>
                    [...s.querySelectorAll('text')].map(t => [t, t.getBBox()])
                    .filter(([t, b]) => b.x < 0 || b.x + b.width > s.width.baseVal.value)
                    .map(([t]) => t.textContent))""")
                assert cut == [], f"{name}: plot text cut: {cut}"
        finally:
            browser.close()
