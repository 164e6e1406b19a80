"""The report: real Chromium, PDF pages, escaping of untrusted names, byte-stable re-rendering."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from audit.cli import main
from audit.report.render import VOLATILE
from tests.conftest import write_config

SECTIONS = [
    "Summary and gates",
    "Data",
    "Performance by group",
    "Can these explanations be trusted?",
    "Attention on regions",
    "Counterfactuals",
    "Slices and strategies found from the model",
    "Gallery",
    "Misclassified images",
    "Reproducibility",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "reports" / "test-output"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is not installed: `make test` installs it (apt-get install chromium)"
    return path


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: `make test` installs it (apt-get install poppler-utils)"
    return path


def _open(html: Path, width: int, height: int, screenshot: Path | None = None) -> dict:
    from playwright.sync_api import sync_playwright

    console, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: console.append((m.type, m.text)))
            page.on("pageerror", lambda e: console.append(("pageerror", str(e))))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html.as_uri(), wait_until="load")
            info = page.evaluate(
                """() => ({
                    overflow: document.documentElement.scrollWidth - window.innerWidth,
                    images: document.images.length,
                    broken: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length,
                    scripts: document.scripts.length,
                    headings: [...document.querySelectorAll('h2')].map(h => h.textContent),
                })"""
            )
            if screenshot:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=False)
        finally:
            browser.close()
    return {"console": console, "requests": requests, **info}


def test_demo_report_in_a_real_browser(demo_run, tmp_path):
    html = demo_run / "report.html"
    assert html.stat().st_size < 3_000_000  # small JPEG thumbnails, capped mistake gallery
    wide = _open(html, 1400, 1000, screenshot=tmp_path / "report-wide.png")
    phone = _open(html, 390, 844, screenshot=tmp_path / "report-phone.png")
    for name in ("report-wide.png", "report-phone.png"):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, ARTIFACTS / name)
        assert (tmp_path / name).stat().st_size > 10_000
    for view in (wide, phone):
        assert view["console"] == []
        assert [u for u in view["requests"] if u != html.as_uri()] == []  # everything is embedded
        assert view["broken"] == 0 and view["images"] > 50
        assert view["scripts"] == 0
        for section in SECTIONS:
            assert any(section in h for h in view["headings"]), section
    assert phone["overflow"] <= 1  # readable on a phone: no sideways scrolling of the page


def test_demo_pdf_pages_and_headings(demo_run, tmp_path):
    pdf = demo_run / "report.pdf"
    info = subprocess.run(
        [_tool("pdfinfo"), str(pdf)], capture_output=True, text=True, check=True
    ).stdout
    pages = int(re.search(r"Pages:\s+(\d+)", info).group(1))
    assert 8 <= pages < 30  # most sections start on a new page; 28 with slices and strategies
    subprocess.run(
        [_tool("pdftoppm"), "-r", "30", "-png", str(pdf), str(tmp_path / "page")], check=True
    )
    assert len(list(tmp_path.glob("page-*.png"))) == pages
    text = subprocess.run(
        [_tool("pdftotext"), "-layout", str(pdf), "-"], capture_output=True, text=True, check=True
    ).stdout
    for number, section in enumerate(SECTIONS, start=1):
        assert f"{number}. {section}" in text, section
    assert f"Page 1 of {pages}" in text and f"Page {pages} of {pages}" in text
    assert "Contents" in text


def _hostile_dataset(small_dataset: Path, root: Path) -> Path:
    """A copy of the small data set whose class, group and region names are hostile HTML."""
    shutil.copytree(small_dataset.parent, root)
    table = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    table["label"] = table["label"].replace({"doctor": '<script>alert("doc")</script>'})
    for column in [c for c in table.columns if c == "group" or c.startswith("group:")]:
        table[column] = table[column].replace({"female": "fe\"ma'le"})
    table = table.rename(columns={"mask:hair": "mask:<i>hair</i>"})
    table.to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def test_hostile_names_are_escaped_in_html_and_pdf(small_dataset, tmp_path):
    manifest = _hostile_dataset(small_dataset, tmp_path / "data")
    config = write_config(
        tmp_path / "audit.toml",
        manifest,
        data={"manifest": str(manifest), "protected_regions": ["<i>hair</i>", "face"]},
        model=[{"name": "m<b>1</b>", "train_split": "train_biased", "epochs": 1}],
        title="Audit <img src=x onerror=alert(1)>",
    )
    result = CliRunner().invoke(
        main, ["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    html = (tmp_path / "run" / "report.html").read_text()
    for raw in (
        '<script>alert("doc")</script>',
        "<i>hair</i>",
        "<b>1</b>",
        "<img src=x",
        "fe\"ma'le",
    ):
        assert raw not in html, raw
    assert "&lt;script&gt;alert(&#34;doc&#34;)&lt;/script&gt;" in html
    assert (
        "fe&#34;ma&#39;le" in html
        and "&lt;i&gt;hair&lt;/i&gt;" in html
        and "m&lt;b&gt;1&lt;/b&gt;" in html
    )
    view = _open(tmp_path / "run" / "report.html", 1200, 800)
    assert view["scripts"] == 0 and view["console"] == []
    text = subprocess.run(
        [_tool("pdftotext"), str(tmp_path / "run" / "report.pdf"), "-"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert '<script>alert("doc")</script>' in text  # shown as text, never run
    assert "<i>hair</i>" in text and "m<b>1</b>" in text


def test_rerendering_is_byte_identical_but_for_the_time(demo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    first = (run / "report.html").read_text()
    result = CliRunner().invoke(main, ["report", str(run), "--no-pdf"])
    assert result.exit_code == 0, result.output
    second = (run / "report.html").read_text()
    strip = lambda text: VOLATILE.sub("", text)  # noqa: E731  (render and run times)
    assert first != "" and strip(first) == strip(second)
    # Only the times differ: the generation time and the run's duration (added to run.json after
    # the runner rendered the page).
    assert sum(a != b for a, b in zip(first.splitlines(), second.splitlines(), strict=True)) <= 2


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not a finished audit run" in result.output
