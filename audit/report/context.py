"""The page's context: everything the report template shows, computed from a finished run folder.

`build_context` reads metrics.json, run.json, config.json, samples.csv and the overlay PNGs and
returns the dict the Jinja2 templates lay out (their variable names); the sentences come from
`audit.report.words`, the rendering is `audit.report.render`.
"""

from __future__ import annotations

import base64
import io
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from PIL import Image

from audit.report import charts, mitigation_view, sections, validity_view
from audit.report.discovery import discovery_context
from audit.report.fmt import (
    amount_html,
    ci_html,
    pct,
    points_html,
)
from audit.report.words import (
    cell_of,
    cell_words,
    decisions,
    gate_legend,
    gate_status,
    overview,
    region_label,
)

PAIRS_SHOWN = 8  # counterfactual pairs shown per model (the runner draws up to 24)
CELLS_SHOWN = 12  # class x group cells in the performance table and chart, worst first
DEFAULT_MISTAKES_PER_CELL = 4  # explain.mistakes_per_cell when config.json has none
THUMB_QUALITY = 72  # JPEG quality of the embedded overlays


class ReportError(ValueError):
    """A run folder that cannot be rendered."""


@lru_cache(maxsize=4096)
def _encoded(path: Path, mtime_ns: int) -> str:
    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=THUMB_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _data_uri(path: Path) -> str | None:
    """An overlay as a small JPEG data: URI (the page stays one offline file)."""
    if not path.is_file():
        return None
    return _encoded(path, path.stat().st_mtime_ns)


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
                dtype={"image": str, "label": str, "group": str, "prediction": str},
                keep_default_na=False,
            ),
        }
    except (json.JSONDecodeError, pd.errors.ParserError) as error:
        raise ReportError(f"{run_dir}: unreadable run file: {error}") from None


# -- the misclassified images shown ----------------------------------------------------------------
def choose_mistakes(model_rows: pd.DataFrame, cap: int) -> dict[str, dict[str, Any]]:
    """Per class x group cell: the number of mistakes and the `cap` most confident ones.

    The same choice the runner records as `mistakes_shown` (positions in the evaluated split, most
    confident first, ties by position), derived from samples.csv for runs that do not record it.
    """
    rows = model_rows.reset_index(drop=True)
    cells = [cell_of(lab, grp) for lab, grp in zip(rows["label"], rows["group"], strict=True)]
    frame = pd.DataFrame(
        {
            "cell": cells,
            "wrong": ~rows["correct"].astype(bool),
            "confidence": rows["confidence"].astype(float),
        }
    )
    out = {}
    for cell in sorted(set(cells)):
        wrong = frame[(frame["cell"] == cell) & frame["wrong"]]
        order = wrong.sort_values("confidence", ascending=False, kind="stable").index
        out[cell] = {"n": len(wrong), "shown": [int(p) for p in order[:cap]]}
    return out


def mistakes_shown(
    metrics: dict[str, Any], by_model: dict[str, pd.DataFrame], config: dict[str, Any]
) -> dict[str, dict[str, dict[str, Any]]]:
    """model -> cell -> {"n", "shown"}: the runner's record where present, else derived."""
    cap = int(config.get("explain", {}).get("mistakes_per_cell", DEFAULT_MISTAKES_PER_CELL))
    out = {}
    for name, rows in by_model.items():
        recorded = metrics["models"][name].get("mistakes_shown")
        out[name] = recorded if recorded is not None else choose_mistakes(rows, cap)
    return out


# -- tables and galleries -------------------------------------------------------------------------------
def _perf_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance table: accuracies in percent, gaps and differences in points."""
    rows = []
    for label, key, shown in [
        ("Accuracy", "accuracy", ci_html),
        ("Worst-group accuracy", "worst_group_accuracy", ci_html),
        ("Accuracy gap between groups", "accuracy_gap", amount_html),
        ("Demographic parity difference", "demographic_parity_difference", amount_html),
        ("Equalized odds difference", "equalized_odds_difference", amount_html),
    ]:
        rows.append(
            {
                "label": label,
                "values": [shown(m["performance"][key], 1) for m in metrics["models"].values()],
            }
        )
    return rows


class PageIds(NamedTuple):
    """The page's anchors: model -> cell -> id of its mistakes, and cell -> id of its gallery row."""

    anchors: dict[str, dict[str, str]]
    cell_ids: dict[str, str]


def _gallery(
    run_dir: Path,
    metrics: dict[str, Any],
    by_model: dict[str, pd.DataFrame],
    config: dict[str, Any],
    mistakes: dict[str, dict[str, dict[str, Any]]],
    ids: PageIds,
) -> dict[str, Any]:
    """The gallery's and the misclassified images' sections: per cell, every model's maps."""
    anchors, cell_ids = ids.anchors, ids.cell_ids
    names = list(metrics["models"])
    methods = list(config["explain"]["methods"])
    overlays = run_dir / "overlays"
    # Maps of a method that failed the randomization test for a model carry a visible warning.
    untrusted = {n: sections.untrusted_methods(metrics["models"][n]) for n in names}
    warning = "⚠ not trusted"
    first = by_model[names[0]]

    def image(position: int) -> str | None:
        return _data_uri(overlays / "images" / f"{position:05d}.png")

    cells: dict[str, dict[str, Any]] = {}
    for position in metrics["gallery"]:
        row = first.iloc[position]
        cell = cell_of(row["label"], row["group"])
        item = {"image": image(position), "caption": row["image"], "tiles": []}
        for n in names:
            r = by_model[n].iloc[position]
            for m in methods:
                item["tiles"].append(
                    {
                        "uri": _data_uri(overlays / n / m / "pred" / f"{position:05d}.png"),
                        "caption": f"{r['prediction']} {pct(float(r['confidence']))}",
                        "correct": bool(r["correct"]),
                        "untrusted": warning if m in untrusted[n] else "",
                    }
                )
        entry = cells.setdefault(cell, {"id": cell_ids.get(cell, ""), "items": []})
        entry["items"].append(item)
    # Column headers name the methods as people write them ("Guided Grad-CAM"): a narrow phone
    # column then breaks between words, never inside "guided_gradcam".
    label = sections.method_name
    columns = [
        f"{n} · {label(m)}" + (f" ({warning})" if m in untrusted[n] else "")
        for n in names
        for m in methods
    ]

    misclassified = {}
    mistakes_csv = (run_dir / "mistakes.csv").is_file()
    for n in names:
        rows = by_model[n]
        model_cells = []
        for cell, choice in mistakes[n].items():
            if not choice["n"]:
                continue
            items = []
            for position in choice["shown"]:
                r = rows.iloc[position]
                items.append(
                    {
                        "caption": r["image"],
                        "detail": f"→ {r['prediction']} {pct(float(r['confidence']))}",
                        "image": image(position),
                        "tiles": [
                            {
                                "uri": _data_uri(overlays / n / m / t / f"{position:05d}.png"),
                                "caption": warning if m in untrusted[n] else "",
                                "untrusted": warning if m in untrusted[n] else "",
                            }
                            for m in methods
                            for t in ("pred", "true")
                        ],
                    }
                )
            model_cells.append(
                {
                    "cell": cell,
                    "id": anchors[n][cell],
                    "n": choice["n"],
                    "items": items,
                    "more": choice["n"] - len(items),
                }
            )
        misclassified[n] = {
            "cells": model_cells,
            "total": sum(c["n"] for c in model_cells),
        }
    mistake_columns = [
        f"{label(m)} · {'predicted' if t == 'pred' else 'true'} class"
        for m in methods
        for t in ("pred", "true")
    ]
    mistake_warnings = {
        n: [
            f"{method_label} ({warning})"
            for method_label in methods
            if method_label in untrusted[n]
        ]
        for n in names
    }

    flipped = {}
    for n in names:
        rows = by_model[n]
        flips = rows[rows["flipped"].astype(bool)] if "flipped" in rows else rows.iloc[:0]
        shown = []
        for position, r in flips.iterrows():
            uri = _data_uri(overlays / "counterfactuals" / n / f"{position:05d}.png")
            if uri is None:
                continue
            source = r.get("counterfactual_source", "twin")
            shown.append(
                {
                    "caption": r["image"],
                    "cell": cell_words(cell_of(r["label"], r["group"])),
                    "prediction": r["prediction"],
                    "cf_prediction": r["counterfactual_prediction"],
                    "twin": "twin" if source == "twin" else "protected regions filled",
                    "uri": uri,
                }
            )
            if len(shown) == PAIRS_SHOWN:
                break
        flipped[n] = {"shown": shown, "total": len(flips)}
    return {
        "cells": cells,
        "columns": columns,
        "misclassified": misclassified,
        "mistake_columns": mistake_columns,
        "mistake_warnings": mistake_warnings,
        "untrusted": untrusted,
        "mistakes_file": "mistakes.csv" if mistakes_csv else None,
        "flipped": flipped,
        "methods": methods,
    }


def worst_cells_first(models: dict[str, Any], cells: list[str]) -> list[str]:
    """Class x group cells by their lowest accuracy over the models, worst first; cells too few to
    judge for every model last."""

    def key(cell: str) -> tuple:
        entries = [m["performance"]["per_cell"].get(cell) or {} for m in models.values()]
        judged = [e for e in entries if not e.get("too_few") and e.get("value") is not None]
        low = min((e["value"] for e in judged), default=None)
        return (low is None, low if low is not None else 0.0, cell)

    return sorted(cells, key=key)


BIAS_ROWS = (
    16  # bars of the split-bias chart; more classes: the most unequal of the training splits
)


def split_tables(data: dict[str, Any]) -> tuple[dict[str, dict[str, int]], list[str], bool]:
    """(split -> column -> count, columns, summed by group): the class x group cells of each
    split, or with more cells than CELLS_SHOWN the counts per group summed over the classes."""
    splits = {s: v.get("cells", {}) for s, v in data["splits"].items()}
    cells = sorted({c for v in splits.values() for c in v})
    if len(cells) <= CELLS_SHOWN:
        return splits, cells, False
    by_group: dict[str, dict[str, int]] = {}
    for split, counts in splits.items():
        row = by_group.setdefault(split, {})
        for cell, n in counts.items():
            group = cell.partition(" / ")[2] or "(none)"
            row[group] = row.get(group, 0) + n
    return by_group, sorted({g for v in by_group.values() for g in v}), True


def bias_rows(
    data: dict[str, Any], models: dict[str, Any]
) -> tuple[dict[str, dict[str, dict[str, float]]], bool]:
    """The group shares per split and class for the bias chart; with more than BIAS_ROWS bars,
    only the models' training splits and in each the classes whose groups are most unequal."""
    splits = {s: v.get("group_share_per_class", {}) for s, v in data["splits"].items()}
    if sum(len(v) for v in splits.values()) <= BIAS_ROWS:
        return splits, False
    used = [s for s in dict.fromkeys(m.get("train_split") for m in models.values()) if s in splits]
    used = used or list(splits)[:1]
    per_split = max(1, BIAS_ROWS // len(used))
    out = {}
    for split in used:
        classes = splits[split]
        ranked = sorted(classes, key=lambda c: -max(classes[c].values(), default=0.0))
        out[split] = {c: classes[c] for c in ranked[:per_split]}
    return out, True


def section_list(
    trust: bool, mitigations: bool, discovery: bool = False, counterfactuals: bool = True
) -> dict[str, dict[str, Any]]:
    """id -> {"number", "title"} of the report's sections, in order: the trust and mitigation
    sections appear only when the run has their metrics, and the numbers follow."""
    titles = [
        ("summary", "Summary and gates", True),
        ("mitigations", "Mitigations compared", mitigations),
        ("data", "Data", True),
        ("performance", "Performance by group", True),
        ("trust", "Can these explanations be trusted?", trust),
        ("attention", "Attention on regions", True),
        ("counterfactuals", "Counterfactuals", counterfactuals),
        ("discovery", "Slices and strategies found from the model", discovery),
        ("gallery", "Gallery: the same images under each model", True),
        ("misclassified", "Misclassified images", True),
        ("reproducibility", "Reproducibility", True),
    ]
    shown = [(key, title) for key, title, present in titles if present]
    return {key: {"number": i, "title": title} for i, (key, title) in enumerate(shown, start=1)}


def audited_regions(data: dict[str, Any], models: dict[str, Any]) -> list[str]:
    """The regions whose Grad-CAM share the run measured: protected, core, then each region."""
    regions = ["protected", "core"] + [r for r in data["regions"] if r not in ("person",)]
    measured = next(iter(models.values()))["attention"].get("gradcam", {}).get("overall", {})
    return [r for r in regions if r in measured]


def cells_chart(models: dict[str, Any], shown: list[str], n_cells: int, colours: dict) -> str:
    """SVG: accuracy per class x group cell, models side by side (the shown cells)."""
    title = "Accuracy per class x group cell (95% CI)"
    if len(shown) < n_cells:
        title += f", the {len(shown)} worst of {n_cells}"
    values = {n: [m["performance"]["per_cell"].get(c) for c in shown] for n, m in models.items()}
    return charts.grouped_bars(shown, values, "accuracy", title, colours)


def attention_charts(
    models: dict[str, Any], data: dict[str, Any], regions: list[str], colours: dict
) -> list[dict[str, Any]]:
    """Per model, an SVG data URI: the Grad-CAM share of each region by group."""
    labels = [region_label(r, data) for r in regions]
    found = []
    for n, model in models.items():
        per_group = model["attention"].get("gradcam", {}).get("per_group", {})
        series = {
            g: [per_group.get(g, {}).get(r, {}).get("share") for r in regions]
            for g in data["groups"]
        }
        svg = charts.grouped_bars(
            labels,
            series,
            "share of Grad-CAM mass",
            f"{n}: where Grad-CAM looks, by group (95% CI)",
            colours,
        )
        found.append({"model": n, "uri": _svg_uri(svg)})
    return found


def compare_chart(
    models: dict[str, Any], data: dict[str, Any], regions: list[str], colours: dict
) -> str:
    """SVG: each model's Grad-CAM share per region beside the regions' area (uniform attention)."""
    reference = "area (uniform attention)"
    series = {
        n: [m["attention"].get("gradcam", {}).get("overall", {}).get(r, {}).get("share")
            for r in regions]
        for n, m in models.items()
    }  # fmt: skip
    area = data.get("region_area", {})
    series[reference] = [{"value": area.get(r), "ci_low": None, "ci_high": None} for r in regions]
    return charts.grouped_bars(
        [region_label(r, data) for r in regions],
        series,
        "share of Grad-CAM mass",
        "Grad-CAM mass per region, models side by side (95% CI)",
        colours,
        reference=reference,
    )


def flip_chart(models: dict[str, Any], groups: list[str], colours: dict) -> str:
    """SVG: the counterfactual flip rate of each model by group."""
    series = {
        n: [(m.get("counterfactual") or {}).get("per_group", {}).get(g) for g in groups]
        for n, m in models.items()
    }
    return charts.grouped_bars(
        groups, series, "flip rate", "Counterfactual flip rate by group (95% CI)", colours
    )


def attention_tables(
    models: dict[str, Any], data: dict[str, Any], regions: list[str], shown_cells: list[str]
) -> list[dict[str, Any]]:
    """Per model, the Grad-CAM share of each region overall, per group, class and shown cell."""
    scopes = (
        ("all", None),
        *((f"group: {g}", ("per_group", g)) for g in data["groups"]),
        *((f"class: {c}", ("per_class", c)) for c in data["classes"]),
        *((f"cell: {c}", ("per_cell", c)) for c in shown_cells),
    )
    tables = []
    for n, model in models.items():
        gradcam = model["attention"].get("gradcam", {})
        rows = []
        for scope, key in scopes:
            if key is None:
                node = gradcam.get("overall", {})
            else:
                node = gradcam.get(key[0], {}).get(key[1], {})
            rows.append(
                {"scope": scope, "values": [ci_html(node.get(r, {}).get("share")) for r in regions]}
            )
        tables.append({"model": n, "rows": rows, "n": gradcam.get("n_images")})
    return tables


PERFORMANCE_DIFFERENCES = (
    ("Accuracy", "accuracy_difference"),
    ("Worst-group accuracy", "worst_group_accuracy_difference"),
    ("Accuracy gap between groups", "accuracy_gap_difference"),
    ("Counterfactual flip rate", "flip_rate_difference"),
)


def performance_differences(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Per compared pair, the paired differences of the headline figures."""
    return [
        {
            "a": c["a"],
            "b": c["b"],
            "rows": [
                {"label": label, "value": points_html(c.get(key))}
                for label, key in PERFORMANCE_DIFFERENCES
            ],
        }
        for c in metrics.get("comparisons", [])
    ]


def attention_differences(metrics: dict[str, Any], regions: list[str]) -> list[dict[str, Any]]:
    """Per compared pair, the paired difference of each region's Grad-CAM share."""
    data = metrics["data"]
    return [
        {
            "a": c["a"],
            "b": c["b"],
            "rows": [
                {
                    "region": region_label(r, data),
                    "value": points_html(c["attention_share_difference"].get(r)),
                }
                for r in regions
            ],
        }
        for c in metrics.get("comparisons", [])
    ]


def per_cell_rows(models: dict[str, Any], shown_cells: list[str]) -> list[dict[str, Any]]:
    """Per shown cell, each model's accuracy (95% CI) and the cell's number of images."""
    per_cell = [m["performance"]["per_cell"] for m in models.values()]
    rows = []
    for c in shown_cells:
        n = next((cells[c]["n"] for cells in per_cell if c in cells), 0)
        rows.append({"cell": c, "values": [ci_html(cells.get(c), 1) for cells in per_cell], "n": n})
    return rows


def build_context(run_dir: Path) -> dict[str, Any]:
    """Everything the template shows, computed from the run folder."""
    run_dir = Path(run_dir)
    loaded = load_run(run_dir)
    metrics, config, run = loaded["metrics"], loaded["config"], loaded["run"]
    data, models = metrics["data"], metrics["models"]
    names = list(models)
    samples = loaded["samples"]
    by_model = {n: samples[samples["model"] == n].reset_index(drop=True) for n in names}
    cells = sorted({c for m in models.values() for c in m["performance"]["per_cell"]})
    shown_cells = worst_cells_first(models, cells)[:CELLS_SHOWN]
    groups = data["groups"]
    model_colours = charts.model_colours(names)
    group_colours = charts.group_colours(groups)
    regions = audited_regions(data, models)

    mistakes = mistakes_shown(metrics, by_model, config)
    all_cells = sorted(set(cells) | {c for m in mistakes.values() for c in m})
    cell_ids = {c: f"cell-{i}" for i, c in enumerate(all_cells)}
    anchors = {
        n: {c: f"mistakes-{mi}-{cell_ids[c].split('-')[1]}" for c in mistakes[n]}
        for mi, n in enumerate(names)
    }
    train_splits, bias_trimmed = bias_rows(data, models)
    split_cells, all_cells, cells_by_group = split_tables(data)
    gates = metrics["gates"]
    for gate in gates:  # rows of earlier versions carry no status
        gate.setdefault("status", gate_status(gate))
    trust = sections.trust_context(metrics, run_dir, _data_uri, _svg_uri, model_colours)
    mitigations = mitigation_view.mitigation_context(metrics, _svg_uri, model_colours)
    discovered = discovery_context(run_dir, metrics)
    numbered = section_list(
        trust is not None,
        mitigations is not None,
        discovered is not None,
        any(m.get("counterfactual") for m in models.values()),
    )
    page_one = validity_view.amend_decisions(decisions(metrics, mistakes, anchors), metrics)
    return {
        "title": config.get("title", "Bias audit"),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "models": names,
        "model_colours": model_colours,
        "group_colours": group_colours,
        "model_info": models,
        "verdicts": metrics["verdicts"],
        "decisions": page_one,
        "overview": overview(metrics, page_one),
        "validity": validity_view.validity_context(metrics),
        "gates": gates,
        "gates_by_model": {n: [g for g in gates if g["model"] == n] for n in names},
        "gate_legend": gate_legend(gates),
        "data": data,
        "split_cells": split_cells,
        "all_cells": all_cells,
        "cells_by_group": cells_by_group,
        "bias_trimmed": bias_trimmed,
        "perf_rows": _perf_rows(metrics),
        "per_cell_rows": per_cell_rows(models, shown_cells),
        "cells_more": len(cells) - len(shown_cells),
        "confusions": [
            {"model": n, **models[n]["performance"]["confusion_matrix"]}
            for n in names
            if models[n]["performance"].get("confusion_matrix")
        ],
        "classes": sections.classes_context(metrics),
        "fairness": sections.fairness_context(metrics, run_dir),
        "trust": trust,
        "mitigations": mitigations,
        "sections": numbered,
        "charts": {
            "cells": _svg_uri(cells_chart(models, shown_cells, len(cells), model_colours)),
            "attention": attention_charts(models, data, regions, group_colours),
            "compare": _svg_uri(compare_chart(models, data, regions, model_colours)),
            "flips": _svg_uri(flip_chart(models, groups, model_colours)),
            "bias": _svg_uri(
                charts.stacked_shares(
                    train_splits, "Group share within each class, per split", group_colours
                )
            ),
            "heat_scale": _svg_uri(
                charts.colour_bar("Grad-CAM overlay colour: each map scaled to its own maximum")
            ),
        },
        "regions": [region_label(r, data) for r in regions],
        "attention_tables": attention_tables(models, data, regions, shown_cells),
        "differences": attention_differences(metrics, regions),
        "perf_differences": performance_differences(metrics),
        "counterfactual": {n: models[n].get("counterfactual") for n in names},
        "gallery": _gallery(
            run_dir, metrics, by_model, config, mistakes, PageIds(anchors, cell_ids)
        ),
        "discovery": discovered,
        "config_text": json.dumps(config, indent=2),
        "run": run,
        "seed": metrics["seed"],
        "bootstrap": metrics["bootstrap"],
    }
