"""A run's gates as JUnit XML, the test-report format CI systems display (Jenkins, GitLab, GitHub).

One `<testsuite>` per model, one `<testcase>` per gate row of that model (a gate measured per
protected attribute gives one case per attribute); a gate that did not pass carries a `<failure>`
whose message names the measured value and the limit. Written with the standard library's
ElementTree, so names and messages are escaped as XML requires.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from audit.report.words import gate_figure, threshold_text


def case_name(row: Mapping[str, Any]) -> str:
    """The test case's name: the gate's key, with the attribute it was measured on if any."""
    attribute = row.get("attribute")
    return f"{row['gate']}[{attribute}]" if attribute else str(row["gate"])


def gate_text(row: Mapping[str, Any]) -> str:
    """One line for a gate row: model, gate, value with its interval, the limit and the status, in
    the report's units (percent for shares and accuracies, points for gaps and effects)."""
    value = row.get("value")
    measured = "n/a (could not be measured)" if value is None else gate_figure(dict(row))
    status = row.get("status") or ("pass" if row["passed"] else "fail")
    line = (
        f"{row['model']}: {row['label']} = {measured}, must be {row['op']} "
        f"{threshold_text(dict(row))} [{status}]"
    )
    return f"{line}: {row['note']}" if status == "not trusted" and row.get("note") else line


def junit_xml(rows: Iterable[Mapping[str, Any]], suite: str = "audit gates") -> str:
    """The gate rows (metrics.json's `gates`) as a JUnit XML document."""
    rows = list(rows)
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    failed = sum(not r["passed"] for r in rows)
    root = ET.Element(
        "testsuites", name=suite, tests=str(len(rows)), failures=str(failed), errors="0"
    )
    for model in models:
        mine = [r for r in rows if str(r["model"]) == model]
        element = ET.SubElement(
            root,
            "testsuite",
            name=f"{suite}: {model}",
            tests=str(len(mine)),
            failures=str(sum(not r["passed"] for r in mine)),
            errors="0",
            skipped="0",
        )
        for row in mine:
            case = ET.SubElement(
                element, "testcase", classname=f"audit.{model}", name=case_name(row), time="0"
            )
            text = gate_text(row)
            if row["passed"]:
                ET.SubElement(case, "system-out").text = text
            else:
                kind = "NotTrusted" if row.get("status") == "not trusted" else "GateFailed"
                failure = ET.SubElement(case, "failure", message=text, type=kind)
                failure.text = text + (f"\n{row['protects']}" if row.get("protects") else "")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(rows: Iterable[Mapping[str, Any]], path: Path, suite: str = "audit gates") -> Path:
    """Write `junit_xml(rows)` to `path` whole (a temporary file renamed), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(junit_xml(rows, suite), encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
