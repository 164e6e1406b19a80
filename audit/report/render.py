"""Render a finished run folder into report.html (one offline file) and report.pdf (WeasyPrint).

Everything shown is read from the run folder: metrics.json, run.json, config.json, samples.csv and
the overlay PNGs. The logic lives here; the Jinja2 templates in templates/ only lay it out. Page one
is written for the person who decides whether a model ships: per model, the decision in words, the
one or two findings that decide it, the images to look at first and what to do next - every
sentence computed from this run's metrics.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from PIL import Image

from audit.report import charts, mitigation_view, sections, validity_view
from audit.report.discovery import discovery_context
from audit.report.fmt import (
    amount,
    amount_html,
    ci,
    ci_html,
    digits_against,
    limit_text,
    nowrap,
    pct,
    points_html,
    share_text,
)

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
PAIRS_SHOWN = 8  # counterfactual pairs shown per model (the runner draws up to 24)
CELLS_SHOWN = 12  # class x group cells in the performance table and chart, worst first
DEFAULT_MISTAKES_PER_CELL = 4  # explain.mistakes_per_cell when config.json has none
THUMB_QUALITY = 72  # JPEG quality of the embedded overlays
PDF_ID_PREFIX = (
    "audit-report-"  # PDF file identifier: marks a PDF this tool wrote, and for which HTML
)
# Parts of the page that change on every run or render (times) and are left out of its digest.
VOLATILE = re.compile(r'<span class="volatile">[^<]*</span>')

# What each built-in gate protects against and where its default threshold comes from; used when
# metrics.json's gate rows do not carry these texts themselves (runs of earlier versions).
GATE_TEXTS: dict[str, dict[str, str]] = {
    "min_worst_group_accuracy": {
        "protects": "A model that is accurate on average but fails one class x group cell, "
        "e.g. women doctors taken for nurses.",
        "why_default": "Every cell must be right at least 85% of the time: a floor that a model "
        "trained on balanced data clears with room, and that a model leaning on the protected "
        "attribute does not.",
    },
    "max_accuracy_gap": {
        "protects": "A model that serves one group measurably worse than another.",
        "why_default": "5 points: a gap larger than the sampling noise of a few hundred images "
        "per group is treated as real.",
    },
    "max_protected_attention": {
        "protects": "A model that decides from the protected attribute's cues (hair, face) "
        "instead of what defines the class, even where its accuracy looks fine.",
        "why_default": "30% of the Grad-CAM mass: well above the share of the image the "
        "protected regions cover, so only attention concentrated on them fails.",
    },
    "max_flip_rate": {
        "protects": "A model whose answer changes when only the protected attribute changes "
        "(the same scene with the other group's cues).",
        "why_default": "10% of the images: flips beyond the model's ordinary instability on "
        "near-ties count as dependence on the group.",
    },
}


class ReportError(ValueError):
    """A run folder that cannot be rendered."""


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


def _region_label(region: str, data: dict[str, Any]) -> str:
    if region == "protected":
        return " + ".join(data["protected_regions"]) + " (protected)"
    if region == "core":
        return " + ".join(data["core_regions"]) + " (core)"
    return region


def _region_words(region: str, data: dict[str, Any]) -> str:
    """A region's name for a sentence: the union regions by their members."""
    if region == "protected":
        return " + ".join(data["protected_regions"])
    if region == "core":
        return " + ".join(data["core_regions"])
    return region


def cell_of(label: str, group: str) -> str:
    return f"{label} / {group or '(none)'}"


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


# -- gates ------------------------------------------------------------------------------------------
def _gate_facts(key: str) -> dict[str, Any]:
    """The built-in gate's texts and default: audit.metrics.gates where it has them, else ours."""
    facts: dict[str, Any] = dict(GATE_TEXTS.get(key, {}))
    try:
        from audit.metrics.gates import GATES

        gate = GATES.get(key)
    except ImportError:  # pragma: no cover - the gates module is part of the package
        gate = None
    for name in ("protects", "why_default", "default"):
        if getattr(gate, name, None) is not None:
            facts[name] = getattr(gate, name)
    return facts


# Gates on a gap or an effect are read in percentage points; the others (shares, accuracies) in %.
POINT_GATES = (
    "max_accuracy_gap",
    "max_attention_gap_between_groups",
    "max_protected_occlusion_effect",
)


def gate_unit(gate: dict[str, Any]) -> str:
    """'points' for a gate on a gap or an effect, 'percent' for one on a share or an accuracy."""
    return "points" if gate["gate"] in POINT_GATES else "percent"


def threshold_text(gate: dict[str, Any], threshold: float | None = None) -> str:
    value = gate["threshold"] if threshold is None else threshold
    return limit_text(value, gate_unit(gate))


def gate_digits(gate: dict[str, Any]) -> int:
    """1 decimal, more where a failing value would otherwise read as its own threshold."""
    if gate_status(gate) != "fail":
        return 1
    return digits_against(gate.get("value"), gate["threshold"])


def gate_figure(gate: dict[str, Any], interval: bool = True) -> str:
    """A gate's measured value (with its interval) in the gate's unit, with digits enough to tell
    a failing value from the threshold: the gates table and the gate sentences both use it."""
    shown = gate if interval else {"value": gate.get("value")}
    fmt = amount if gate_unit(gate) == "points" else ci
    return fmt(shown, gate_digits(gate))


def gate_figure_html(gate: dict[str, Any]) -> Markup:
    """`gate_figure` as unbreakable pieces, for the gates table."""
    fmt = amount_html if gate_unit(gate) == "points" else ci_html
    return fmt(gate, gate_digits(gate))


def gate_legend(gates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per applying gate: what it checks, what it protects against, and where its threshold
    comes from (the gate row's own texts where metrics.json has them, else the built-in ones)."""
    rows, seen = [], set()
    for gate in gates:
        key = gate["gate"]
        if key in seen:
            continue
        seen.add(key)
        facts = _gate_facts(key)
        protects = gate.get("protects") or facts.get("protects", "")
        why = gate.get("why_default") or facts.get("why_default", "")
        default = gate.get("default", facts.get("default"))
        source = gate.get("source")
        if source is None and default is not None:  # runs of earlier versions record no source
            source = "default" if abs(gate["threshold"] - default) < 1e-12 else "config"
        limit = f"{gate['op']} {threshold_text(gate)}"
        if source == "default":
            origin = f"{limit}, the default. {why}"
        elif default is not None:
            origin = (
                f"{limit}, set in the run's config (the default is "
                f"{gate['op']} {threshold_text(gate, default)}). {why}"
            )
        else:
            origin = f"{limit}, set in the run's config."
        label = gate["label"]
        if gate.get("attribute") and label.endswith(f" ({gate['attribute']})"):
            label = label[: -len(f" ({gate['attribute']})")] + " (per protected attribute)"
        rows.append({"gate": key, "label": label, "protects": protects, "origin": origin})
    return rows


# -- page one: the decision ---------------------------------------------------------------------------
def _cell_words(cell: str) -> str:
    label, _, group = cell.partition(" / ")
    return f"{group} {label}" if group and group != "(none)" else label


def gate_status(gate: dict[str, Any]) -> str:
    """'pass', 'fail' or 'not trusted' (a gate measured with a method that failed the
    randomization test); rows of earlier versions carry no status and read from `passed`."""
    status = gate.get("status")
    if status in ("pass", "fail", "not trusted"):
        return status
    return "pass" if gate["passed"] else "fail"


def _severity(gate: dict[str, Any]) -> float:
    """How far a gate is on the wrong side of its threshold, relative to it (larger = worse)."""
    value, threshold = gate.get("value"), gate["threshold"]
    if value is None:
        return float("inf")
    scale = max(abs(threshold), 0.01)
    return (threshold - value) / scale if gate["op"] == ">=" else (value - threshold) / scale


def gate_sentence(gate: dict[str, Any], model: dict[str, Any], data: dict[str, Any]) -> Markup:
    """One sentence about one gate of one model, with the measured figures."""
    key, value, passed = gate["gate"], gate.get("value"), gate["passed"]
    limit = nowrap(f"{'at least' if gate['op'] == '>=' else 'at most'} {threshold_text(gate)}")
    figure = nowrap(gate_figure(gate, interval=False))
    if gate_status(gate) == "not trusted":
        reason = str(gate.get("note") or "its explanation method failed the randomization test")
        reason = reason.removeprefix("not trusted: ").strip() or (
            "its explanation method failed the randomization test"
        )
        return Markup("{} cannot be trusted, so the gate does not pass: {}.").format(
            gate["label"].capitalize(), reason.rstrip(".")
        )
    if value is None:
        return Markup("{} could not be measured in this run, so the gate fails ({}).").format(
            gate["label"].capitalize(), limit
        )
    block = model.get("fairness", {}).get(gate.get("attribute") or "", {})
    perf = block or model.get("performance", {})
    if key == "max_protected_attention":
        regions = _region_words("protected", data)
        area = data.get("region_area", {}).get("protected")
        covers = (
            Markup(", which cover {} of the image").format(nowrap(share_text(area)))
            if area is not None
            else ""
        )
        lead = (
            Markup("it decides from {} rather than from {}: ").format(
                regions, _region_words("core", data) or "the class's own cues"
            )
            if not passed
            else ""
        )
        return Markup("{}{} of its Grad-CAM falls on {}{} (limit: {}).").format(
            lead, figure, regions, covers, limit
        )
    if key == "min_worst_group_accuracy":
        worst = (perf.get("worst_cell_accuracy") or perf.get("worst_group_accuracy") or {}).get(
            "cell", "the worst cell"
        )
        per_cell = perf.get("per_cell", {})
        best = max(per_cell, key=lambda c: per_cell[c]["value"] or 0.0) if per_cell else None
        against = (
            Markup(", against {} of {} images").format(
                nowrap(share_text(per_cell[best]["value"])), _cell_words(best)
            )
            if best and best != worst
            else ""
        )
        measured = ci_html(gate, gate_digits(gate))
        if passed:
            return Markup(
                "its weakest cell, {} images, is right {} of the time{} (limit: {} in every cell)."
            ).format(_cell_words(worst), measured, against, limit)
        return Markup(
            "it fails on {} images: right for {} of them{} (limit: {} in every cell)."
        ).format(_cell_words(worst), measured, against, limit)
    if key == "max_accuracy_gap":
        groups = perf.get("per_group", {})
        parts = ", ".join(
            f"{g} {share_text(e['value'])}" for g, e in groups.items() if e.get("value") is not None
        )
        return Markup("accuracy differs between groups by {} ({}; limit: {}).").format(
            figure, parts, limit
        )
    if key == "max_flip_rate":
        cf = model.get("counterfactual", {})
        how = (
            "its twin with the group's cues swapped"
            if cf.get("from_twins")
            else ("the protected regions blanked out")
        )
        lead = "its answer depends on the group: " if not passed else ""
        return Markup(
            "{}changing only the protected attribute ({}) changes its prediction for {} of "
            "the images (limit: {})."
        ).format(lead, how, figure, limit)
    if key == "max_attention_gap_between_groups":
        gap = perf.get("attention_gap", {})
        between = (
            Markup(" between {} and {}").format(gap["high"], gap["low"])
            if gap.get("high") and gap.get("low")
            else ""
        )
        return Markup("the share of its Grad-CAM on {} differs{} by {} (limit: {}).").format(
            _region_words("protected", data), between, figure, limit
        )
    if key == "max_protected_occlusion_effect":
        lead = "its decision uses the protected attribute's pixels: " if not passed else ""
        return Markup(
            "{}hiding {} (filled with the image's mean colour) lowers its confidence by {} more "
            "than hiding a patch of the same shape elsewhere (limit: {})."
        ).format(lead, _region_words("protected", data), figure, limit)
    return Markup("{} is {} (limit: {}).").format(gate["label"].capitalize(), figure, limit)


def attention_sentence(name: str, model: dict[str, Any], data: dict[str, Any]) -> Markup | None:
    """What is measured of where the model's Grad-CAM falls: shares and the regions' areas.

    The protected and core unions, plus the region (outside both) that takes the most mass.
    """
    gradcam = model.get("attention", {}).get("gradcam", {})
    overall = gradcam.get("overall", {})
    if not overall:
        return None
    members = set(data["protected_regions"]) | set(data["core_regions"]) | {"person"}
    others = [
        r for r in overall if r not in members | {"protected", "core"} and overall[r].get("share")
    ]
    others.sort(key=lambda r: -(overall[r]["share"].get("value") or 0.0))
    regions = [r for r in ("protected", "core") if r in overall] + others[:1]
    regions.sort(key=lambda r: -(overall[r]["share"].get("value") or 0.0))
    area = data.get("region_area", {})
    parts = []
    for r in regions:
        value = overall[r]["share"].get("value")
        covers = (
            Markup(" (which cover {} of the image)").format(nowrap(share_text(area[r])))
            if area.get(r) is not None
            else ""
        )
        parts.append(
            Markup("{} on {}{}").format(nowrap(share_text(value)), _region_words(r, data), covers)
        )
    n = gradcam.get("n_images")
    over = f" over {n} images" if n else ""
    return Markup("Measured{}, {}'s Grad-CAM mass falls {}.").format(
        over, name, Markup("; ").join(parts)
    )


def looks_sentence(name: str, model: dict[str, Any], data: dict[str, Any]) -> Markup | None:
    """attention_sentence, with a warning when Grad-CAM failed the randomization test."""
    looks = attention_sentence(name, model, data)
    if looks is not None and "gradcam" in sections.untrusted_methods(model):
        looks += Markup(
            " ⚠ These maps are not trusted: Grad-CAM fails the randomization test for {}."
        ).format(name)
    return looks


def data_step(model: dict[str, Any], data: dict[str, Any], cells: list[str]) -> Markup:
    """What to do about the data of the weak cells, from the training split's cell counts."""
    names = ", ".join(_cell_words(c) for c in cells)
    split = model.get("train_split")
    counts = data.get("splits", {}).get(split, {}).get("cells") if split else None
    if not counts:
        return Markup("Collect more training images of {}.").format(names)
    most = max(counts.values())
    largest = max(counts, key=counts.get)
    under = [c for c in cells if counts.get(c, 0) < most]
    full = [c for c in cells if c not in under]
    parts = []
    if under:
        have = ", ".join(f"{counts.get(c, 0)} {_cell_words(c)}" for c in under)
        parts.append(
            Markup(
                "Rebalance the training split “{}” or collect more images of {}: it has {} "
                "images, against {} {}."
            ).format(
                split, ", ".join(_cell_words(c) for c in under), have, most, _cell_words(largest)
            )
        )
    if full:
        parts.append(
            Markup(
                "The training split “{}” already has as many {} images as any other cell ({}): "
                "collect more, and more varied, images of them."
            ).format(split, ", ".join(_cell_words(c) for c in full), most)
        )
    return Markup(" ").join(parts)


def decisions(
    metrics: dict[str, Any],
    mistakes: dict[str, dict[str, dict[str, Any]]],
    anchors: dict[str, dict[str, str]],
) -> list[dict[str, Any]]:
    """Per model: ship or not, why, which images first, what next - all from the metrics."""
    data = metrics["data"]
    out = []
    for name, model in metrics["models"].items():
        rows = [g for g in metrics["gates"] if g["model"] == name]
        failed = sorted(
            (g for g in rows if not g["passed"]),
            key=lambda g: (gate_status(g) == "fail", _severity(g)),
            reverse=True,
        )
        untrusted = [g for g in failed if gate_status(g) == "not trusted"]
        verdict = metrics["verdicts"].get(name, "fail")
        if not rows:
            headline = Markup("No gate is configured, so this audit does not clear {}.").format(
                name
            )
            ship = False
        elif verdict == "pass" and not failed:
            headline = Markup("{} can ship: it passes all {} gates.").format(name, len(rows))
            ship = True
        elif untrusted and len(untrusted) == len(failed):
            headline = Markup(
                "Do not ship {}: {} of {} gates cannot be trusted (the explanation method they "
                "are measured with fails the randomization test)."
            ).format(name, len(untrusted), len(rows))
            ship = False
        elif untrusted:
            headline = Markup(
                "Do not ship {}: it fails {} of {} gates, and {} more cannot be trusted."
            ).format(name, len(failed) - len(untrusted), len(rows), len(untrusted))
            ship = False
        else:
            headline = Markup("Do not ship {}: it fails {} of {} gates.").format(
                name, len(failed), len(rows)
            )
            ship = False
        # The two findings that decide: the worst failing gates (one per kind of gate), or for a
        # model that passes, the two gates it passes with the least room.
        ranked = failed if failed else sorted(rows, key=_severity, reverse=True)
        chosen, kinds = [], set()
        for g in ranked:
            if g["gate"] not in kinds:
                kinds.add(g["gate"])
                chosen.append(g)
        why = [gate_sentence(g, model, data) for g in chosen[:2]]
        why = [Markup(s[0].upper()) + s[1:] for s in why if s]
        if not why:  # never an empty reason
            why = [Markup("No gate is configured for {}, so nothing was checked.").format(name)]
        # Images to look at first: the worst cell's mistakes, else the cell with the most.
        cells = mistakes.get(name, {})
        worst = model.get("performance", {}).get("worst_group_accuracy", {}).get("cell")
        with_mistakes = [c for c, v in cells.items() if v["n"]]
        first = (
            worst
            if worst in with_mistakes
            else max(with_mistakes, key=lambda c: cells[c]["n"], default=None)
        )
        look = None
        if first is not None:
            n, shown = cells[first]["n"], len(cells[first]["shown"])
            look = {
                "href": "#" + anchors[name][first],
                "text": Markup("the {} misclassified {} images{}").format(
                    n,
                    _cell_words(first),
                    Markup(" (the {} most confident mistakes are shown)").format(shown)
                    if shown < n
                    else "",
                ),
            }
        # What next.
        steps: list[Markup] = []
        if not ship:
            per_cell = model.get("performance", {}).get("per_cell", {})
            floor = next(
                (g["threshold"] for g in rows if g["gate"] == "min_worst_group_accuracy"), None
            )
            weak = sorted(
                (
                    c
                    for c, e in per_cell.items()
                    if e.get("value") is not None and floor is not None and e["value"] < floor
                ),
                key=lambda c: per_cell[c]["value"],
            )[:2] or ([worst] if worst else [])
            if weak:
                steps.append(data_step(model, data, weak))
            steps.append(
                Markup(
                    "Retrain {}, then re-run this audit: every gate must pass before it ships."
                ).format(name)
            )
        else:
            steps.append(
                Markup(
                    "Ship {}; re-run this audit after any retraining or change of data, and on "
                    "data from the population it will serve."
                ).format(name)
            )
        out.append(
            {
                "model": name,
                "ship": ship,
                "verdict": verdict,
                "headline": headline,
                "why": why,
                "looks": looks_sentence(name, model, data),
                "believe": sections.trust_sentence(name, model),
                "look_first": look,
                "next": steps,
            }
        )
    return out


def overview(metrics: dict[str, Any], page_one: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first lines of page one: every model's verdict, overall accuracy and gates passed, so
    that all verdicts are on the first page however long each model's reasons run."""
    rows = []
    for d in page_one:
        own = [g for g in metrics["gates"] if g["model"] == d["model"]]
        accuracy = metrics["models"][d["model"]].get("performance", {}).get("accuracy")
        rows.append(
            {
                "model": d["model"],
                "verdict": "pass" if d["ship"] else "fail",
                "accuracy": ci_html(accuracy, 1),
                "gates": f"{sum(1 for g in own if g['passed'])} of {len(own)} gates pass"
                if own
                else "no gate configured",
            }
        )
    return rows


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


def _gallery(
    run_dir: Path,
    metrics: dict[str, Any],
    by_model: dict[str, pd.DataFrame],
    config: dict[str, Any],
    mistakes: dict[str, dict[str, dict[str, Any]]],
    anchors: dict[str, dict[str, str]],
    cell_ids: dict[str, str],
) -> dict[str, Any]:
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
                    "cell": _cell_words(cell_of(r["label"], r["group"])),
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
    regions = ["protected", "core"] + [r for r in data["regions"] if r not in ("person",)]
    regions = [
        r
        for r in regions
        if r in next(iter(models.values()))["attention"].get("gradcam", {}).get("overall", {})
    ]
    region_labels = [_region_label(r, data) for r in regions]

    mistakes = mistakes_shown(metrics, by_model, config)
    all_cells = sorted(set(cells) | {c for m in mistakes.values() for c in m})
    cell_ids = {c: f"cell-{i}" for i, c in enumerate(all_cells)}
    anchors = {
        n: {c: f"mistakes-{mi}-{cell_ids[c].split('-')[1]}" for c in mistakes[n]}
        for mi, n in enumerate(names)
    }

    chart_cells = charts.grouped_bars(
        shown_cells,
        {n: [models[n]["performance"]["per_cell"].get(c) for c in shown_cells] for n in names},
        "accuracy",
        "Accuracy per class x group cell (95% CI)"
        + (
            f", the {len(shown_cells)} worst of {len(cells)}"
            if len(shown_cells) < len(cells)
            else ""
        ),
        model_colours,
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
                        region_labels,
                        series,
                        "share of Grad-CAM mass",
                        f"{n}: where Grad-CAM looks, by group (95% CI)",
                        group_colours,
                    )
                ),
            }
        )
    reference = "area (uniform attention)"
    compare_chart = charts.grouped_bars(
        region_labels,
        {
            n: [
                models[n]["attention"].get("gradcam", {}).get("overall", {}).get(r, {}).get("share")
                for r in regions
            ]
            for n in names
        }
        | {
            reference: [
                {"value": data.get("region_area", {}).get(r), "ci_low": None, "ci_high": None}
                for r in regions
            ]
        },
        "share of Grad-CAM mass",
        "Grad-CAM mass per region, models side by side (95% CI)",
        model_colours,
        reference=reference,
    )
    flip_chart = charts.grouped_bars(
        groups,
        {
            n: [(models[n].get("counterfactual") or {}).get("per_group", {}).get(g) for g in groups]
            for n in names
        },
        "flip rate",
        "Counterfactual flip rate by group (95% CI)",
        model_colours,
    )
    train_splits, bias_trimmed = bias_rows(data, models)
    split_cells, all_cells, cells_by_group = split_tables(data)
    attention_tables = []
    for n in names:
        gradcam = models[n]["attention"].get("gradcam", {})
        rows = []
        for scope, key in (
            ("all", None),
            *((f"group: {g}", ("per_group", g)) for g in groups),
            *((f"class: {c}", ("per_class", c)) for c in data["classes"]),
            *((f"cell: {c}", ("per_cell", c)) for c in shown_cells),
        ):
            node = (
                gradcam.get("overall", {})
                if key is None
                else gradcam.get(key[0], {}).get(key[1], {})
            )
            rows.append(
                {
                    "scope": scope,
                    "values": [ci_html(node.get(r, {}).get("share")) for r in regions],
                }
            )
        attention_tables.append({"model": n, "rows": rows, "n": gradcam.get("n_images")})
    perf_differences = [
        {
            "a": c["a"],
            "b": c["b"],
            "rows": [
                {"label": label, "value": points_html(c.get(key))}
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
    differences = [
        {
            "a": comparison["a"],
            "b": comparison["b"],
            "rows": [
                {
                    "region": _region_label(r, data),
                    "value": points_html(comparison["attention_share_difference"].get(r)),
                }
                for r in regions
            ],
        }
        for comparison in metrics.get("comparisons", [])
    ]
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
        "per_cell_rows": [
            {
                "cell": c,
                "values": [ci_html(models[n]["performance"]["per_cell"].get(c), 1) for n in names],
                "n": next(
                    (
                        models[n]["performance"]["per_cell"][c]["n"]
                        for n in names
                        if c in models[n]["performance"]["per_cell"]
                    ),
                    0,
                ),
            }
            for c in shown_cells
        ],
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
            "cells": _svg_uri(chart_cells),
            "attention": attention_charts,
            "compare": _svg_uri(compare_chart),
            "flips": _svg_uri(flip_chart),
            "bias": _svg_uri(
                charts.stacked_shares(
                    train_splits, "Group share within each class, per split", group_colours
                )
            ),
            "heat_scale": _svg_uri(
                charts.colour_bar("Grad-CAM overlay colour: each map scaled to its own maximum")
            ),
        },
        "regions": region_labels,
        "attention_tables": attention_tables,
        "differences": differences,
        "perf_differences": perf_differences,
        "counterfactual": {n: models[n].get("counterfactual") for n in names},
        "gallery": _gallery(run_dir, metrics, by_model, config, mistakes, anchors, cell_ids),
        "discovery": discovered,
        "config_text": json.dumps(config, indent=2),
        "run": run,
        "seed": metrics["seed"],
        "bootstrap": metrics["bootstrap"],
    }


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
