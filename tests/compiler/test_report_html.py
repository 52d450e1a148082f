"""The HTML report: one self-contained page (no scripts, nothing fetched) that holds every node."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from xml.etree import ElementTree

import pytest
import torch

import netsqueeze as ns
from tests.zoo import ZOO

POLICY = """policy p {
  budget flops <= 60%
  guard output error <= 30%
  squeeze_fold on type(linear)
}"""


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.text: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture(scope="module")
def result() -> ns.CompileResult:
    model, inputs = ZOO["mlp"]()
    calib = torch.randn(64, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(0))
    return ns.compile(model, POLICY, example_inputs=inputs, calibration=calib, progress=False)


def test_html_is_self_contained(result: ns.CompileResult) -> None:
    page = result.report.to_html()
    p = _Collect()
    p.feed(page)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(p.tags)
    # the plots' internal references (clip paths, tick markers) point at ids inside the page, nothing else
    ids = {v for _, k, v in p.attrs if k == "id"}
    refs = [v for _, k, v in p.attrs if k in ("src", "href", "xlink:href", "action", "srcset")]
    urls = re.findall(r"url\(([^)]*)\)", page)
    assert refs and urls and all(v is not None and v[:1] == "#" and v[1:] in ids for v in [*refs, *urls])
    assert not re.search(r"@import|https?://|xmlns", page)
    assert len([v for _, k, v in p.attrs if k == "id"]) == len(ids)  # ids unique across the plots


def test_html_same_report_same_bytes(result: ns.CompileResult) -> None:
    page = result.report.to_html()
    again = ns.CompileReport.from_json(result.report.to_json()).to_html()
    assert page == again and page.count("<svg") == 6


def test_html_holds_every_node_plots_and_plan(result: ns.CompileResult) -> None:
    rep = result.report
    page = rep.to_html()
    p = _Collect()
    p.feed(page)
    cells = set(p.text)
    for nid in [*rep.before.nodes, *rep.after.nodes]:
        assert nid in cells, nid
    assert p.tags.count("svg") == 6  # channels, params, FLOPs, bytes, time per pass, search trajectory
    # one marker per candidate in the trajectory's dots (the output error) and squares (FLOPs)
    n = len([s for s in rep.search if s["metric"] == "output_error"])
    assert n >= 2
    search_svg = page[page.index('<svg role="img" aria-label="search trajectory"'):]
    tree = ElementTree.fromstring(search_svg[:search_svg.index("</svg>") + 6])
    for gid in ("search-candidates", "search-flops"):
        group = tree.find(f".//*[@id='{gid}']")
        # matplotlib writes a collection's markers as <use> of one shared path, or (few of them) each as a <path>
        assert group is not None and len(group.findall(".//use") or group.findall(".//path")) == n, gid
    # every weighted node labels a bar of the params plot
    params_svg = page[page.index('aria-label="params"'):]
    params_svg = params_svg[:params_svg.index("</svg>")]
    weighted = [nid for nid, st in rep.before.nodes.items() if st.params]
    assert weighted and all(f">{nid}<" in params_svg for nid in weighted)
    assert rep.plan is not None and rep.plan.splitlines()[0].replace("<", "&lt;") in page
    assert f"{rep.before.params / rep.after.params:.2f}× smaller" in page
    assert rep._repr_html_() == page


def test_html_escapes_what_it_shows(result: ns.CompileResult) -> None:
    rep = ns.CompileReport.from_json(result.report.to_json())
    rep.notes.append("<script>alert(1)</script>")
    page = rep.to_html()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
