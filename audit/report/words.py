"""The decision's words: what each gate result means for the person who decides.

The gates' measured values and limits in the report's units, the sentence that says what a gate's
result means, and page one's decision per model (the verdict, the findings that decide it, the
images to look at first, what to do next) - every sentence computed from the run's metrics.json.
"""

from __future__ import annotations

from typing import Any

from markupsafe import Markup

from audit.report import sections
from audit.report.fmt import (
    amount,
    amount_html,
    ci,
    ci_html,
    digits_against,
    limit_text,
    nowrap,
    share_text,
)

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


def region_label(region: str, data: dict[str, Any]) -> str:
    if region == "protected":
        return " + ".join(data["protected_regions"]) + " (protected)"
    if region == "core":
        return " + ".join(data["core_regions"]) + " (core)"
    return region


def region_words(region: str, data: dict[str, Any]) -> str:
    """A region's name for a sentence: the union regions by their members."""
    if region == "protected":
        return " + ".join(data["protected_regions"])
    if region == "core":
        return " + ".join(data["core_regions"])
    return region


def cell_of(label: str, group: str) -> str:
    return f"{label} / {group or '(none)'}"


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
def cell_words(cell: str) -> str:
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
        regions = region_words("protected", data)
        area = data.get("region_area", {}).get("protected")
        covers = (
            Markup(", which cover {} of the image").format(nowrap(share_text(area)))
            if area is not None
            else ""
        )
        lead = (
            Markup("it decides from {} rather than from {}: ").format(
                regions, region_words("core", data) or "the class's own cues"
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
                nowrap(share_text(per_cell[best]["value"])), cell_words(best)
            )
            if best and best != worst
            else ""
        )
        measured = ci_html(gate, gate_digits(gate))
        if passed:
            return Markup(
                "its weakest cell, {} images, is right {} of the time{} (limit: {} in every cell)."
            ).format(cell_words(worst), measured, against, limit)
        return Markup(
            "it fails on {} images: right for {} of them{} (limit: {} in every cell)."
        ).format(cell_words(worst), measured, against, limit)
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
            region_words("protected", data), between, figure, limit
        )
    if key == "max_protected_occlusion_effect":
        lead = "its decision uses the protected attribute's pixels: " if not passed else ""
        return Markup(
            "{}hiding {} (filled with the image's mean colour) lowers its confidence by {} more "
            "than hiding a patch of the same shape elsewhere (limit: {})."
        ).format(lead, region_words("protected", data), figure, limit)
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
            Markup("{} on {}{}").format(nowrap(share_text(value)), region_words(r, data), covers)
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
    names = ", ".join(cell_words(c) for c in cells)
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
        have = ", ".join(f"{counts.get(c, 0)} {cell_words(c)}" for c in under)
        parts.append(
            Markup(
                "Rebalance the training split “{}” or collect more images of {}: it has {} "
                "images, against {} {}."
            ).format(
                split, ", ".join(cell_words(c) for c in under), have, most, cell_words(largest)
            )
        )
    if full:
        parts.append(
            Markup(
                "The training split “{}” already has as many {} images as any other cell ({}): "
                "collect more, and more varied, images of them."
            ).format(split, ", ".join(cell_words(c) for c in full), most)
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
                    cell_words(first),
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
