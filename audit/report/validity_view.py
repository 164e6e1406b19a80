"""The report's validity section and what it changes on page one, from `metrics.validity`.

`metrics.validity.findings` (written by the runner with `audit.metrics.validity`) says, per model,
whether its figures can be read at all (preprocessing, collapsed predictions, a model too weak to
judge), which figures were measured with a stand-in (mean-fill counterfactuals, a control that can
move onto the person, maps left out) and which checks were switched off. This module lays them out
for the template (`templates/validity.html.j2`), names each stand-in where its figure is shown,
and rewrites the decision of a model that cannot be judged, so that no attention or group finding
of it reads as evidence. A run of an earlier version (no `validity` block) shows a line saying so.
"""

from __future__ import annotations

from typing import Any

from markupsafe import Markup

SEVERITY_WORDS = {
    "invalid": "not judged",
    "warning": "differs from its own config",
    "substitution": "stand-in used",
    "skipped": "check switched off",
}
# The figure of the report each check concerns: where its message is shown besides this section.
FIGURE_OF = {
    "mean_fill_counterfactuals": "counterfactual",
    "maps_left_out": "attention",
    "occlusion_control_moved": "occlusion",
    "occlusion_control_missing": "occlusion",
    "check_switched_off": "occlusion",
}
INVALID = ("not judged", "too weak to judge")


def findings_of(metrics: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The run's validity findings, or None for a run made before they were recorded."""
    block = metrics.get("validity")
    return None if block is None else list(block.get("findings") or [])


def validity_context(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the validity section shows: one row per finding (models in order), the status of each
    model, and per model and figure the messages to repeat where that figure is shown."""
    findings = findings_of(metrics)
    status = (metrics.get("validity") or {}).get("models") or {}
    notes: dict[str, dict[str, list[str]]] = {}
    rows = []
    for f in findings or []:
        rows.append(
            {
                "model": f.get("model") or "all models",
                "severity": f["severity"],
                "kind": f.get("gate_status") or SEVERITY_WORDS.get(f["severity"], f["severity"]),
                "message": f["message"],
                "changes": f["changes"],
            }
        )
        figure = FIGURE_OF.get(f["check"])
        if figure and f.get("model"):
            notes.setdefault(f["model"], {}).setdefault(figure, []).append(f["message"])
    summary: dict[str, dict[str, Any]] = {}
    for f in findings or []:
        entry = summary.setdefault(
            f.get("model") or "all models",
            {"status": status.get(f.get("model"), "valid"), "items": []},
        )
        entry["items"].append(f.get("short") or f["message"])
    return {
        "recorded": findings is not None,
        "summary": summary,
        "rows": rows,
        "status": status,
        "notes": notes,
        "invalid": [m for m, s in status.items() if s in INVALID],
    }


def amend_decisions(
    decisions: list[dict[str, Any]], metrics: dict[str, Any]
) -> list[dict[str, Any]]:
    """Page one's decisions with the validity findings applied: a model not measured as it works
    or too weak to judge gets a headline saying so, the findings as its reasons and no attention
    or group step; skipped gates are named; maps left out are counted where attention is quoted."""
    findings = findings_of(metrics) or []
    status = (metrics.get("validity") or {}).get("models") or {}
    out = []
    for decision in decisions:
        name = decision["model"]
        own = [f for f in findings if f.get("model") == name]
        entry = dict(decision)
        left_out = [f for f in own if f["check"] == "maps_left_out"]
        if entry.get("looks") is not None and left_out:
            values = left_out[0]["values"]
            entry["looks"] = entry["looks"] + Markup(
                " ({} of these {} maps were all zero and are left out: the shares are over {} "
                "images.)"
            ).format(
                values["left_out"], values["n_images"], values["n_images"] - values["left_out"]
            )
        skipped = [f for f in own if f["severity"] == "skipped"]
        if skipped:
            entry["headline"] = entry["headline"] + Markup(" {}").format(
                " ".join(f"The {f['message'].removeprefix('the ')}." for f in skipped)
            )
        if status.get(name) in INVALID:
            entry |= _not_judged(name, status[name], own)
        out.append(entry)
    return out


def _not_judged(name: str, status: str, own: list[dict[str, Any]]) -> dict[str, Any]:
    """The parts of a decision for a model whose figures cannot be read as evidence."""
    invalid = [f for f in own if f["severity"] == "invalid"]
    if status == "too weak to judge":
        headline = Markup(
            "Do not ship {}: it is too weak to judge. Its accuracy does not clear chance, so "
            "no attention or group finding of this audit is evidence about its bias."
        ).format(name)
        step = Markup(
            "Make {} learn the task first (its data, training and preprocessing: see "
            '<a href="#validity">Validity</a>), then re-run this audit.'
        ).format(name)
    else:
        headline = Markup(
            "Do not ship {}, and do not read its figures: this audit did not measure it as it "
            "works, so no finding below is evidence about its bias."
        ).format(name)
        step = Markup(
            'Fix what <a href="#validity">Validity</a> names for {} (its [model.preprocess] '
            "table first), then re-run this audit."
        ).format(name)
    # In a few words: each finding in full follows the decisions (Validity findings).
    why = [
        Markup("{} (in full under Validity).").format(f.get("short") or f["message"])
        for f in invalid
    ]
    return {
        "ship": False,
        "headline": headline,
        "why": why,
        "looks": Markup(
            "Not evidence: {} {}, so where its Grad-CAM falls says nothing about bias."
        ).format(
            name,
            "is too weak to judge"
            if status == "too weak to judge"
            else "was not measured as it works",
        ),
        "next": [step],
        "believe": None,  # moot: none of its maps is evidence
    }
