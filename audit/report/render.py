"""Render a finished run folder into report.html (one offline file) and report.pdf (WeasyPrint).

Everything shown is read from the run folder: metrics.json, run.json, config.json, samples.csv and
the overlay PNGs. The logic lives here; the Jinja2 templates in templates/ only lay it out.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from PIL import Image

from audit.report import charts

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
MAX_FLIPPED_SHOWN = 24


class ReportError(ValueError):
    """A run folder that cannot be rendered."""


def pct(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def ci(estimate: dict[str, Any] | None, digits: int = 0, percent: bool = True) -> str:
    """'61% [57–65]' from a {"value", "ci_low", "ci_high"} estimate."""
    if not estimate or estimate.get("value") is None:
        return "n/a"
    fmt = (lambda v: f"{100 * v:.{digits}f}") if percent else (lambda v: f"{v:.{digits + 2}f}")
    text = fmt(estimate["value"]) + ("%" if percent else "")
    if estimate.get("ci_low") is not None:
        text += f" [{fmt(estimate['ci_low'])}–{fmt(estimate['ci_high'])}]"
    return text


def points(estimate: dict[str, Any] | None) -> str:
    """A difference of shares in percentage points: '-18.1 pts [-19.7 to -16.6]'."""
    if not estimate or estimate.get("value") is None:
        return "n/a"
    text = f"{100 * estimate['value']:+.1f} pts"
    if estimate.get("ci_low") is not None:
        text += f" [{100 * estimate['ci_low']:+.1f} to {100 * estimate['ci_high']:+.1f}]"
    return text


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html", "j2"], default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = pct
    env.filters["ci"] = ci
    env.filters["points"] = points
    return env


def _data_uri(path: Path, mime_hint: str = "png") -> str | None:
    """An image file as a data: URI, re-encoded as JPEG for photos to keep the page small."""
    if not path.is_file():
        return None
    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=88, optimize=False)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _svg_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def load_run(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    needed = ["metrics.json", "config.json", "run.json", "samples.csv"]
    missing = [name for name in needed if not (run_dir / name).is_file()]
    if missing:
        raise ReportError(f"{run_dir} is not a finished audit run: missing {', '.join(missing)}")
    try:
        return {
            "metrics": json.loads((run_dir / "metrics.json").read_text()),
            "config": json.loads((run_dir / "config.json").read_text()),
            "run": json.loads((run_dir / "run.json").read_text()),
            "samples": pd.read_csv(
                run_dir / "samples.csv",
                dtype={"image": str, "label": str, "group": str},
                keep_default_na=False,
            ),
        }
    except (json.JSONDecodeError, pd.errors.ParserError) as error:
        raise ReportError(f"{run_dir}: unreadable run file: {error}") from None


def _region_label(region: str, data: dict[str, Any]) -> str:
    if region == "protected":
        return " + ".join(data["protected_regions"]) + " (protected)"
    if region == "core":
        return " + ".join(data["core_regions"]) + " (core)"
    return region


def findings(metrics: dict[str, Any]) -> list[str]:
    """The few sentences a decision-maker needs, generated from the figures of this run."""
    data, models = metrics["data"], metrics["models"]
    protected = " and ".join(data["protected_regions"])
    core = " and ".join(data["core_regions"]) or "the core regions"
    names = list(models)

    def share(name: str, region: str) -> str:
        overall = models[name]["attention"].get("gradcam", {}).get("overall", {})
        return ci(overall.get(region, {}).get("share"), 1)

    out = [
        f"Share of Grad-CAM mass on {protected} (the protected attribute): "
        + "; ".join(f"the {n} model {share(n, 'protected')}" for n in names)
        + ".",
        f"Share on {core} (what should decide the class): "
        + "; ".join(f"the {n} model {share(n, 'core')}" for n in names)
        + ".",
    ]
    parts = []
    for n in names:
        worst = models[n]["performance"]["worst_group_accuracy"]
        parts.append(f"the {n} model {ci(worst, 1)} (worst cell: {worst.get('cell', 'n/a')})")
    out.append("Worst-group accuracy: " + "; ".join(parts) + ".")
    flips = "; ".join(
        f"the {n} model {ci(models[n]['counterfactual']['flip_rate'], 1)}" for n in names
    )
    out.append(f"Predictions that flip when only the protected attribute changes: {flips}.")
    for comparison in metrics.get("comparisons", []):
        diff = comparison["attention_share_difference"].get("protected")
        if diff and diff.get("ci_low") is not None:
            excludes = diff["ci_low"] > 0 or diff["ci_high"] < 0
            verdict = (
                "the interval excludes zero"
                if excludes
                else "the interval includes zero: no clear difference"
            )
            out.append(
                f"Protected-region attention, {comparison['b']} minus {comparison['a']}: "
                f"{points(diff)} ({verdict})."
            )
    return out


def _perf_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for label, key, percent in [
        ("Accuracy", "accuracy", True),
        ("Worst-group accuracy", "worst_group_accuracy", True),
        ("Accuracy gap between groups", "accuracy_gap", True),
        ("Demographic parity difference", "demographic_parity_difference", False),
        ("Equalized odds difference", "equalized_odds_difference", False),
    ]:
        rows.append(
            {
                "label": label,
                "values": [
                    ci(m["performance"][key], 1 if percent else 0, percent)
                    for m in metrics["models"].values()
                ],
            }
        )
    return rows


def _gallery(
    run_dir: Path, metrics: dict[str, Any], samples: pd.DataFrame, config: dict[str, Any]
) -> dict[str, Any]:
    names = list(metrics["models"])
    methods = [m for m in config["explain"]["methods"]]
    first = samples[samples["model"] == names[0]].reset_index(drop=True)
    by_model = {n: samples[samples["model"] == n].reset_index(drop=True) for n in names}
    cells: dict[str, list[dict[str, Any]]] = {}
    for position in metrics["gallery"]:
        row = first.iloc[position]
        cell = f"{row['label']} / {row['group'] or '(none)'}"
        item = {
            "image": _data_uri(run_dir / "overlays" / "images" / f"{position:05d}.png"),
            "caption": row["image"],
            "models": [],
        }
        for n in names:
            r = by_model[n].iloc[position]
            item["models"].append(
                {
                    "name": n,
                    "prediction": r["prediction"],
                    "confidence": float(r["confidence"]),
                    "correct": bool(r["correct"]),
                    "maps": [
                        {
                            "method": m,
                            "uri": _data_uri(
                                run_dir / "overlays" / n / m / "pred" / f"{position:05d}.png"
                            ),
                        }
                        for m in methods
                    ],
                }
            )
        cells.setdefault(cell, []).append(item)
    misclassified = {}
    for n in names:
        wrong = by_model[n][~by_model[n]["correct"].astype(bool)]
        items = []
        for position, r in wrong.iterrows():
            items.append(
                {
                    "caption": r["image"],
                    "label": r["label"],
                    "group": r["group"],
                    "prediction": r["prediction"],
                    "confidence": float(r["confidence"]),
                    "image": _data_uri(run_dir / "overlays" / "images" / f"{position:05d}.png"),
                    "maps": [
                        {
                            "method": m,
                            "target": t,
                            "uri": _data_uri(
                                run_dir / "overlays" / n / m / t / f"{position:05d}.png"
                            ),
                        }
                        for m in methods
                        for t in ("pred", "true")
                    ],
                }
            )
        misclassified[n] = items
    flipped = {}
    for n in names:
        rows = by_model[n][by_model[n]["flipped"].astype(bool)]
        shown = []
        for position, r in rows.head(MAX_FLIPPED_SHOWN).iterrows():
            shown.append(
                {
                    "caption": r["image"],
                    "group": r["group"],
                    "prediction": r["prediction"],
                    "cf_prediction": r["counterfactual_prediction"],
                    "source": r["counterfactual_source"],
                    "uri": _data_uri(
                        run_dir / "overlays" / "counterfactuals" / n / f"{position:05d}.png"
                    ),
                }
            )
        flipped[n] = {"shown": shown, "total": len(rows)}
    return {"cells": cells, "misclassified": misclassified, "flipped": flipped, "methods": methods}


def build_context(run_dir: Path) -> dict[str, Any]:
    """Everything the template shows, computed from the run folder."""
    loaded = load_run(run_dir)
    metrics, config, run = loaded["metrics"], loaded["config"], loaded["run"]
    data, models = metrics["data"], metrics["models"]
    names = list(models)
    cells = sorted({c for m in models.values() for c in m["performance"]["per_cell"]})
    groups = data["groups"]
    regions = ["protected", "core"] + [r for r in data["regions"] if r not in ("person",)]
    regions = [
        r
        for r in regions
        if r in next(iter(models.values()))["attention"].get("gradcam", {}).get("overall", {})
    ]
    chart_cells = charts.grouped_bars(
        cells,
        {n: [models[n]["performance"]["per_cell"].get(c) for c in cells] for n in names},
        "accuracy",
        "Accuracy per class x group cell (95% CI)",
    )
    attention_charts = []
    for n in names:
        gradcam = models[n]["attention"].get("gradcam", {})
        series = {
            g: [gradcam.get("per_group", {}).get(g, {}).get(r, {}).get("share") for r in regions]
            for g in groups
        }
        attention_charts.append(
            {
                "model": n,
                "uri": _svg_uri(
                    charts.grouped_bars(
                        [_region_label(r, data) for r in regions],
                        series,
                        "share of Grad-CAM mass",
                        f"{n}: where Grad-CAM looks, by group (95% CI)",
                    )
                ),
            }
        )
    compare_chart = charts.grouped_bars(
        [_region_label(r, data) for r in regions],
        {
            n: [
                models[n]["attention"].get("gradcam", {}).get("overall", {}).get(r, {}).get("share")
                for r in regions
            ]
            for n in names
        }
        | {
            "region's area (uniform attention)": [
                {"value": data.get("region_area", {}).get(r), "ci_low": None, "ci_high": None}
                for r in regions
            ]
        },
        "share of Grad-CAM mass",
        "Grad-CAM mass per region, models side by side (95% CI)",
    )
    flip_chart = charts.grouped_bars(
        groups,
        {n: [models[n]["counterfactual"]["per_group"].get(g) for g in groups] for n in names},
        "flip rate",
        "Counterfactual flip rate by group (95% CI)",
    )
    train_splits = {s: v["group_share_per_class"] for s, v in data["splits"].items()}
    attention_tables = []
    for n in names:
        gradcam = models[n]["attention"].get("gradcam", {})
        rows = []
        for scope, key in (
            ("all", None),
            *((f"group: {g}", ("per_group", g)) for g in groups),
            *((f"class: {c}", ("per_class", c)) for c in data["classes"]),
            *((f"cell: {c}", ("per_cell", c)) for c in cells),
        ):
            node = (
                gradcam.get("overall", {})
                if key is None
                else gradcam.get(key[0], {}).get(key[1], {})
            )
            rows.append(
                {
                    "scope": scope,
                    "values": [ci(node.get(r, {}).get("share")) for r in regions],
                    "hits": [ci(node.get(r, {}).get("hit")) for r in regions],
                }
            )
        attention_tables.append({"model": n, "rows": rows, "n": gradcam.get("n_images")})
    perf_differences = [
        {
            "a": c["a"],
            "b": c["b"],
            "rows": [
                {"label": label, "value": points(c.get(key))}
                for label, key in (
                    ("Accuracy", "accuracy_difference"),
                    ("Worst-group accuracy", "worst_group_accuracy_difference"),
                    ("Accuracy gap between groups", "accuracy_gap_difference"),
                    ("Counterfactual flip rate", "flip_rate_difference"),
                )
            ],
        }
        for c in metrics.get("comparisons", [])
    ]
    differences = []
    for comparison in metrics.get("comparisons", []):
        differences.append(
            {
                "a": comparison["a"],
                "b": comparison["b"],
                "rows": [
                    {
                        "region": _region_label(r, data),
                        "value": points(comparison["attention_share_difference"].get(r)),
                    }
                    for r in regions
                ],
            }
        )
    gates = metrics["gates"]
    return {
        "title": config.get("title", "Bias audit"),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "models": names,
        "model_info": models,
        "verdicts": metrics["verdicts"],
        "gates": gates,
        "findings": findings(metrics),
        "data": data,
        "split_cells": {s: v["cells"] for s, v in data["splits"].items()},
        "all_cells": sorted({c for v in data["splits"].values() for c in v["cells"]}),
        "perf_rows": _perf_rows(metrics),
        "per_cell_rows": [
            {
                "cell": c,
                "values": [ci(models[n]["performance"]["per_cell"].get(c), 1) for n in names],
                "n": next(
                    (
                        models[n]["performance"]["per_cell"][c]["n"]
                        for n in names
                        if c in models[n]["performance"]["per_cell"]
                    ),
                    0,
                ),
            }
            for c in cells
        ],
        "confusions": [{"model": n, **models[n]["performance"]["confusion_matrix"]} for n in names],
        "charts": {
            "cells": _svg_uri(chart_cells),
            "attention": attention_charts,
            "compare": _svg_uri(compare_chart),
            "flips": _svg_uri(flip_chart),
            "bias": _svg_uri(
                charts.stacked_shares(train_splits, "Group share within each class, per split")
            ),
        },
        "regions": [_region_label(r, data) for r in regions],
        "attention_tables": attention_tables,
        "differences": differences,
        "perf_differences": perf_differences,
        "counterfactual": {n: models[n]["counterfactual"] for n in names},
        "gallery": _gallery(run_dir, metrics, loaded["samples"], config),
        "config_text": json.dumps(config, indent=2),
        "run": run,
        "seed": metrics["seed"],
        "bootstrap": metrics["bootstrap"],
    }


def render_html(run_dir: Path) -> str:
    context = build_context(run_dir)
    context["css"] = (TEMPLATES / "report.css").read_text()
    return environment().get_template("report.html.j2").render(**context)


def render_report(
    run_dir: Path, *, pdf: bool = True, echo: Callable[[str], None] = print
) -> tuple[Path, Path | None]:
    """Write report.html and report.pdf into the run folder (each written whole, then renamed)."""
    run_dir = Path(run_dir)
    html = render_html(run_dir)
    html_path = run_dir / "report.html"
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(html_path)
    echo(f"report: {html_path} ({html_path.stat().st_size / 1e6:.1f} MB)")
    pdf_path = None
    if pdf:
        from weasyprint import HTML

        pdf_path = run_dir / "report.pdf"
        tmp_pdf = pdf_path.with_suffix(".pdf.tmp")
        HTML(string=html, base_url=str(run_dir)).write_pdf(tmp_pdf)
        tmp_pdf.replace(pdf_path)
        echo(f"report: {pdf_path} ({pdf_path.stat().st_size / 1e6:.1f} MB)")
    return html_path, pdf_path
