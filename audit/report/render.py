"""Render a finished run folder into report.html (one offline file) and report.pdf (WeasyPrint).

Three modules make the report: `audit.report.words` (what each gate result means for the person
who decides: page one's verdicts, findings and next steps), `audit.report.context` (the template's
context, computed from the run folder: metrics.json, run.json, config.json, samples.csv and the
overlay PNGs) and this one: the Jinja2 environment and its filters, and the HTML and PDF files,
each written whole. The templates in templates/ only lay the context out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from audit.report.context import (  # noqa: F401 - load_run and ReportError for the command line
    ReportError,
    build_context,
    load_run,
)
from audit.report.fmt import ci_html, nowrap, pct, points_html
from audit.report.words import gate_figure_html, threshold_text

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
PDF_ID_PREFIX = (
    "audit-report-"  # PDF file identifier: marks a PDF this tool wrote, and for which HTML
)
# Parts of the page that change on every run or render (times) and are left out of its digest.
VOLATILE = re.compile(r'<span class="volatile">[^<]*</span>')


# -- formatting: audit.report.fmt (imported above) ------------------------------------------
def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html", "j2"], default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = pct
    env.filters["ci"] = ci_html
    env.filters["nw"] = nowrap
    env.filters["points"] = points_html
    env.filters["gate_measured"] = gate_figure_html
    env.filters["gate_limit"] = lambda gate: nowrap(f"{gate['op']} {threshold_text(gate)}")
    return env


def render_html(run_dir: Path) -> str:
    context = build_context(run_dir)
    context["css"] = (TEMPLATES / "report.css").read_text()
    return environment().get_template("report.html.j2").render(**context)


def content_digest(html: str) -> str:
    """SHA-256 of the page without its times: equal for an unchanged re-render."""
    return hashlib.sha256(VOLATILE.sub("", html).encode("utf-8")).hexdigest()


def pdf_digest(path: Path) -> str | None:
    """The content digest a PDF written by this tool carries in its file identifier, else None."""
    try:
        tail = path.read_bytes()[-65536:]
    except OSError:
        return None
    found = re.search(rb"\(" + PDF_ID_PREFIX.encode() + rb"([0-9a-f]{64})\)", tail)
    return found.group(1).decode() if found else None


def render_report(
    run_dir: Path, *, pdf: bool = True, echo: Callable[[str], None] = print
) -> tuple[Path, Path | None]:
    """Write report.html and report.pdf into the run folder (each written whole, then renamed).

    Without the PDF, a report.pdf this tool wrote from different content is removed, so that a
    stale PDF never sits beside the new page; a report.pdf the tool did not write is left alone.
    """
    run_dir = Path(run_dir)
    html = render_html(run_dir)
    digest = content_digest(html)
    html_path = run_dir / "report.html"
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(html_path)
    echo(f"report: {html_path} ({html_path.stat().st_size / 1e6:.1f} MB)")
    pdf_path = run_dir / "report.pdf"
    if not pdf:
        if pdf_path.is_file():
            old = pdf_digest(pdf_path)
            if old is None:
                echo(f"report: left {pdf_path} as it is: audit did not write it")
            elif old != digest:
                pdf_path.unlink()
                echo(f"report: removed {pdf_path}: it showed an earlier version of the report")
        return html_path, None
    from weasyprint import HTML

    tmp_pdf = pdf_path.with_suffix(".pdf.tmp")
    HTML(string=html, base_url=str(run_dir)).write_pdf(
        tmp_pdf, pdf_identifier=(PDF_ID_PREFIX + digest).encode("ascii")
    )
    tmp_pdf.replace(pdf_path)
    echo(f"report: {pdf_path} ({pdf_path.stat().st_size / 1e6:.1f} MB)")
    return html_path, pdf_path
