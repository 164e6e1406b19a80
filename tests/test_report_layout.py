"""The report of a small run as a reader gets it: Chromium at phone width (390 px), the PDF's pages
and text, the capped mistake gallery, and the stale-PDF rule of `audit report --no-pdf`."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from audit.cli import main
from audit.report.render import pdf_digest
from tests.conftest import write_config
from tests.test_report import CHROMIUM_ARGS, _chromium, _tool

PHONE = 390


@pytest.fixture(scope="module")
def small_run(small_dataset, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report-layout")
    config = write_config(root / "audit.toml", small_dataset, explain={"mistakes_per_cell": 2})
    result = CliRunner().invoke(main, ["run", str(config), "--out", str(root / "run"), "--quiet"])
    if result.exit_code != 0 and "mistakes_per_cell" in result.output:  # a config without the key
        config = write_config(root / "audit.toml", small_dataset)
        result = CliRunner().invoke(
            main, ["run", str(config), "--out", str(root / "run"), "--quiet"]
        )
    assert result.exit_code == 0, result.output
    return root / "run"


PHONE_PROBE = r"""() => {
  const W = window.innerWidth;
  const box = e => e.getBoundingClientRect();
  const outside = sel => [...document.querySelectorAll(sel)]
      .filter(e => { const b = box(e); return b.width > 0 && (b.left < -0.5 || b.right > W + 0.5); })
      .map(e => e.textContent.trim().slice(0, 40));
  const charts = [...document.querySelectorAll('figure.chart img')].map(i => ({
      src: i.src, width: box(i).width, right: box(i).right}));
  const rows = [...document.querySelectorAll('.grid')].map(g =>
      [...g.querySelectorAll(':scope > .grid-row')].map(r =>
          [...r.children].map(c => ({top: Math.round(box(c).top), left: Math.round(box(c).left),
                                     right: box(c).right}))));
  // Anything that scrolls sideways: a table, or a box around one, wider inside than outside.
  const scrolling = [...document.querySelectorAll('table, .scroll, pre')]
      .filter(e => box(e).width > 0 &&
              (e.scrollWidth > e.clientWidth + 1 || box(e).right > W + 0.5))
      .map(e => e.tagName + '.' + e.className + ': ' + e.textContent.trim().slice(0, 40));
  // A header broken inside a word: a word (split at spaces and hyphens) on two lines.
  const broken = [];
  const heads = 'th, h1, h2, h3, h4, dt, caption, .grid-head > div, figcaption.strip-title';
  for (const el of document.querySelectorAll(heads)) {
    if (box(el).width === 0) continue;
    const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const m of node.textContent.matchAll(/[^\s\-‐–—\/]+/g)) {
        const range = document.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        const tops = new Set([...range.getClientRects()].filter(r => r.width > 0)
                                 .map(r => Math.round(r.top / 3)));
        if (tops.size > 1) broken.push(el.tagName + ': ' + m[0]);
      }
    }
  }
  return {width: W, overflow: document.documentElement.scrollWidth - W,
          gates: outside('table.gates td'), legend: outside('table.gate-legend td'),
          decisions: outside('.decision'), charts, rows, scrolling, broken};
}"""


def _svg_scale_fonts(src: str) -> tuple[float, float]:
    """(smallest font size, viewBox width) of a chart given as an SVG data: URI."""
    svg = base64.b64decode(src.split(",", 1)[1]).decode()
    sizes = [float(s) for s in re.findall(r"font[^;\"]*?([\d.]+)px", svg)]
    view = float(re.search(r'viewBox="[\d.]+ [\d.]+ ([\d.]+) [\d.]+"', svg).group(1))
    return min(sizes), view


def test_phone_width_is_readable_in_chromium(small_run, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": PHONE, "height": 844})
            page.goto((small_run / "report.html").as_uri(), wait_until="load")
            info = page.evaluate(PHONE_PROBE)
            page.screenshot(path=str(tmp_path / "phone.png"))
        finally:
            browser.close()
    assert info["width"] == PHONE and info["overflow"] <= 1
    assert info["gates"] == [] and info["legend"] == [] and info["decisions"] == []
    # No table scrolls sideways, and no header breaks inside a word (issue 19).
    assert info["scrolling"] == [], info["scrolling"]
    assert info["broken"] == [], info["broken"]
    assert len(info["charts"]) >= 5
    for chart in info["charts"]:
        smallest, view = _svg_scale_fonts(chart["src"])
        assert chart["right"] <= PHONE + 0.5
        assert smallest * chart["width"] / view >= 9, "chart text under 9 CSS px at 390 px"
    grids = [g for g in info["rows"] if len(g) >= 2]
    assert grids, "no gallery grid"
    for grid in grids:
        for row in grid:
            assert len({c["top"] for c in row}) == 1, "a gallery row wraps"
            assert max(c["right"] for c in row) <= PHONE + 0.5
        # Columns line up: the n-th tile of every row starts at the same x.
        lefts = [[c["left"] for c in row] for row in grid if len(row) == len(grid[0])]
        assert all(left == lefts[0] for left in lefts)


def test_phone_width_of_the_demo_has_no_sideways_table_or_broken_header(demo_run):
    """The same phone checks on the demo's report (the session's demo run, shared)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": PHONE, "height": 844})
            page.goto((demo_run / "report.html").as_uri(), wait_until="load")
            info = page.evaluate(PHONE_PROBE)
        finally:
            browser.close()
    assert info["overflow"] <= 1
    assert info["scrolling"] == [] and info["broken"] == [], (info["scrolling"], info["broken"])


def _pdf_pages(pdf: Path) -> list[str]:
    text = subprocess.run(
        [_tool("pdftotext"), "-layout", str(pdf), "-"], capture_output=True, text=True, check=True
    ).stdout
    return text.split("\f")


def test_pdf_pages_gates_intervals_and_chart_text(small_run, tmp_path):
    import json

    pdf = small_run / "report.pdf"
    pages = _pdf_pages(pdf)
    assert len([p for p in pages if p.strip()]) <= 26  # two small models: a short PDF
    # Page one tells the decision before the gates table.
    assert "ship" in pages[0] and "Why" in pages[0] and "Look first at" in pages[0]
    # Each model's gates table is on one page, whole: every verdict badge on a page belongs to a
    # decision block or to a gate row of a table whose header is on that page.
    metrics = json.loads((small_run / "metrics.json").read_text())
    rows = {}
    for gate in metrics["gates"]:
        rows[gate["model"]] = rows.get(gate["model"], 0) + 1
    seen = {name: 0 for name in rows}
    for page in pages:
        headlines = len(re.findall(r"Do not ship|can ship:|No gate is configured", page))
        headlines += len(re.findall(r"\d+ of \d+ gates pass|no gate configured", page))
        here = [name for name in rows if re.search(rf"^\s*{re.escape(name)}: check", page, re.M)]
        badges = page.count("✓ PASS") + page.count("✗ FAIL")
        badges += page.count("⚠ NOT TRUSTED") if here else 0  # a gate of an untrusted method
        # gates changed by the validity findings (e.g. a model at chance: "not judged")
        badges += sum(page.count(b) for b in ("⚠ NOT JUDGED", "⚠ TOO WEAK TO JUDGE", "– SKIPPED"))
        for name in here:
            seen[name] += 1
        assert badges - headlines == sum(rows[name] for name in here)
    assert all(count == 1 for count in seen.values()), seen
    # No interval is cut inside: no line ends in "[12–" or "[12".
    for page in pages:
        for line in page.splitlines():
            assert not re.search(r"\[[-+]?[\d.]+(–|\s*to)?\s*$", line), line
    # Chart text is real text in the PDF, printed at >= 8 pt (bounding box height).
    bbox = subprocess.run(
        [_tool("pdftotext"), "-bbox", str(pdf), "-"], capture_output=True, text=True, check=True
    ).stdout
    words = re.findall(
        r'<word xMin="[\d.]+" yMin="([\d.]+)" xMax="[\d.]+" yMax="([\d.]+)">(accuracy|mass)</word>',
        bbox,
    )
    assert len(words) >= 4
    assert min(float(y1) - float(y0) for y0, y1, _ in words) >= 8


def test_pdf_page_one_has_every_verdict_and_accuracy_and_is_full(small_run):
    """Page one carries every model's verdict and overall accuracy (issue 19: the second model's
    verdict was on page two, page one half empty), and no empty reason ("Why.", issue 24)."""
    import json

    from audit.report.fmt import ci

    metrics = json.loads((small_run / "metrics.json").read_text())
    first = _pdf_pages(small_run / "report.pdf")[0]
    for name, model in metrics["models"].items():
        badge = "✓ PASS" if metrics["verdicts"][name] == "pass" else "✗ FAIL"
        accuracy = ci(model["performance"]["accuracy"], 1)
        assert re.search(rf"^\s*{re.escape(name)}\s+{badge}\s+{re.escape(accuracy)}", first, re.M)
        assert f"Do not ship {name}" in first or f"{name} can ship" in first
    assert not re.search(r"\bWhy\s*\.", first)
    # The page is used: its lowest word (the footer aside) sits in the bottom fifth of the page.
    bbox = subprocess.run(
        [_tool("pdftotext"), "-bbox", "-f", "1", "-l", "1", str(small_run / "report.pdf"), "-"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    height = float(re.search(r'<page width="[\d.]+" height="([\d.]+)"', bbox).group(1))
    words = re.findall(r'yMax="([\d.]+)">([^<]*)</word>', bbox)
    body = [float(y) for y, word in words if word not in ("Page", "1", "of") and not word.isdigit()]
    assert max(body) > 0.8 * height


def test_mistakes_are_capped_per_cell_with_the_rest_counted(small_run):
    import json

    import pandas as pd

    html = (small_run / "report.html").read_text()
    config = json.loads((small_run / "config.json").read_text())
    cap = config["explain"].get("mistakes_per_cell", 4)
    samples = pd.read_csv(small_run / "samples.csv", keep_default_na=False)
    wrong = samples[~samples["correct"].astype(bool)]
    counts = wrong.groupby(["model", "label", "group"]).size()
    assert len(counts) > 0, "the small run has no mistake to show"
    for (model, label, group), n in counts.items():
        heading = f"{model} · {label} / {group}: {n} misclassified"
        assert heading in html
        if n > cap:
            assert f"and {n - cap} more – see" in html
    # Page one links each failing model to the mistakes to look at first.
    links = re.findall(r'<a href="#(mistakes-[\d-]+)"', html)
    assert links and all(f'id="{target}"' in html for target in links)
    sections = html.split('id="misclassified"')[1].split('id="reproducibility"')[0]
    rows = sections.count('class="grid-row" style')
    assert rows == sum(min(n, cap) for n in counts)


def test_report_no_pdf_removes_only_its_own_stale_pdf(small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    pdf = run / "report.pdf"
    assert pdf_digest(pdf) is not None  # marked as written by audit
    invoke = lambda: CliRunner().invoke(main, ["report", str(run), "--no-pdf"])  # noqa: E731
    result = invoke()  # same content: the PDF still matches and stays
    assert result.exit_code == 0, result.output
    assert pdf.is_file()
    config = (run / "config.json").read_text()
    (run / "config.json").write_text(config.replace('"title": "', '"title": "Changed '))
    result = invoke()
    assert result.exit_code == 0, result.output
    assert not pdf.exists() and "removed" in result.output
    pdf.write_bytes(b"%PDF-1.4 the user's own file\n%%EOF\n")
    result = invoke()
    assert result.exit_code == 0 and pdf.read_bytes().startswith(b"%PDF-1.4 the user's own")
    assert "did not write it" in result.output


def test_trust_fairness_and_cells_of_a_small_run(small_run):
    """The trust section of a run with `[trust]` on: before the attention section, one table row
    per model x method with the verdict the metrics give, the cascade strips embedded, the curves,
    the occlusion effects; page one says which methods to believe; the worst cells link to
    per_cell.csv."""
    import json

    from audit.report.sections import method_name, trust_verdict

    html = (small_run / "report.html").read_text()
    metrics = json.loads((small_run / "metrics.json").read_text())
    trust = html.split('id="trust"', 1)[1].split('id="attention"', 1)[0]
    assert html.index('id="trust"') < html.index('id="attention"')
    table = trust.split('class="trust stack"', 1)[1].split("</table>", 1)[0]
    for name, model in metrics["models"].items():
        for method, entry in model["trust"]["methods"].items():
            row = table.split(f"{name} · {method_name(method)}</td>", 1)[1].split("</tr>", 1)[0]
            final = entry["randomization"]["final_spearman"]["value"]
            assert f"{final:.2f}" in row
            badge = {
                "trusted": "✓ TRUSTED",
                "use with care": "⚠ USE WITH CARE",
                "not trusted": "⚠ NOT TRUSTED",
            }[trust_verdict(entry)]
            assert badge in row and sum(b in row for b in ("✓ TRUSTED", "⚠ NOT", "⚠ USE")) == 1
        # Page one: one sentence per model on which methods to believe, unless Validity says
        # the model's figures are not evidence at all (then its decision says so instead).
        page_one = html.split('id="data"', 1)[0]
        if metrics["validity"]["models"][name] == "valid":
            assert f"For {name}, " in page_one
        else:
            assert f"For {name}, " not in page_one and f"Not evidence: {name} " in page_one
    first = next(iter(metrics["models"]))
    strips = trust.split("The randomization cascade", 1)[1]
    assert strips.count('<figure class="strip') >= len(metrics["models"][first]["trust"]["methods"])
    assert strips.count('src="data:image/jpeg;base64,') >= 1
    layers = metrics["models"][first]["trust"]["methods"]["gradcam"]["randomization"]["steps"]
    assert all(step["layer"] in strips for step in layers)  # the caption names each step
    assert trust.count("deletion and insertion curves of") == len(metrics["models"])
    assert "Occlusion: does the model use the region?" in trust
    assert "Occlusion effect: differences against" in trust
    # Fairness: the worst cells across attributes and intersections, with the CSV linked.
    assert (small_run / "per_cell.csv").is_file() and '<a href="per_cell.csv">' in html
    assert "worst cells of" in html and "Grad-CAM share on" in html
