"""The report's mitigation section: the side-by-side table of `sections.mitigation_context`, plus
what a team needs before adopting a fix:

- each mitigated model judged against its plain-training baseline (metrics.json
  `mitigation_harm`, audit.metrics.harm): **harmful** when its worst-group accuracy is below plain
  training's with the paired 95% interval of the difference wholly below 0; a harmful model is
  never named as a candidate, on page one or here;
- how each was selected (metrics.json `models.<m>.history.selection`): the grid, the chosen
  values, the epoch kept, and the validation worst-group curve of every chosen run (one chart);
- a penalty mitigation whose selection chose strength 0 is plain training: said so, never a candidate;
- DFR's refit (`models.<m>.dfr`): the layer, the regularisation chosen, its time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import matplotlib.pyplot as plt
from markupsafe import Markup

from audit.models.mitigations import PENALTY_STRENGTH
from audit.report import charts, sections
from audit.report.fmt import ci_html, points_html

PLAIN = sections.PLAIN


def switched_off(model: dict[str, Any]) -> str | None:
    """The strength key when the model's penalty was switched off (strength 0), else None."""
    name, params = sections.mitigation_of(model)
    key = PENALTY_STRENGTH.get(name or "")
    if key is not None and params.get(key) == 0:
        return key
    return None


def switched_off_text(model: dict[str, Any]) -> str | None:
    """One line saying that the model is plain training because its penalty is off."""
    key = switched_off(model)
    if key is None:
        return None
    return (
        f"{key} = 0: the penalty is off (no strength tried did better on validation), so this "
        "model is plain training, not a fix"
    )


def _values(values: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}" for k, v in values.items()
    )


def selection_text(model: dict[str, Any]) -> str | None:
    """One line: the grid tried, the values chosen and the epoch kept (None: not selected)."""
    history = model.get("history") or {}
    selection = history.get("selection")
    if not selection:
        return None
    if "skipped" in selection:
        return f"not selected on validation: {selection['skipped']}"
    grid = "; ".join(f"{k} in {v}" for k, v in selection["grid"].items()) or "no grid"
    chosen = selection["candidates"][selection["chosen_index"]]
    picked = _values(selection["chosen"]) or "the one setting"
    return (
        f"selected by validation worst-group accuracy over {len(selection['candidates'])} "
        f"run(s) ({grid}): {picked}, epoch {chosen['best_epoch']} of {chosen['epochs_run']} "
        f"(validation worst group {chosen['val_worst_group_accuracy']:.3f})"
    )


def dfr_text(model: dict[str, Any]) -> str | None:
    """One line on a DFR refit (None for other models)."""
    dfr = model.get("dfr")
    if not dfr:
        return None
    return (
        f"last layer {dfr['layer']!s} refitted on {dfr['n']} validation images "
        f"({dfr['features']} features, C = {dfr['C']:g} chosen on the held-out half, "
        f"{dfr['nonzero_features']} features kept) in {dfr['seconds']:.1f} s"
    )


def harm_summary(metrics: dict[str, Any]) -> Markup | None:
    """Page one's sentence: among the mitigations that are not harmful, the one that passes every
    gate with the highest accuracy, else the best worst-group accuracy; then the harmful ones,
    named as such (never as candidates)."""
    models, verdicts = metrics["models"], metrics.get("verdicts", {})
    harm = metrics.get("mitigation_harm", {})
    tried = {n: sections.mitigation_of(m)[0] for n, m in models.items()}
    tried = {n: t for n, t in tried.items() if t not in (None, PLAIN)}
    if not tried:
        return None
    harmful = [n for n in tried if harm.get(n, {}).get("harmful")]
    off = [n for n in tried if n not in harmful and switched_off(models[n])]
    candidates = [n for n in tried if n not in harmful and n not in off]
    accuracy = {n: sections._lookup(models[n], "performance", "accuracy") or {} for n in tried}
    worst = {
        n: sections._lookup(models[n], "performance", "worst_group_accuracy") or {} for n in tried
    }
    passing = [n for n in candidates if verdicts.get(n) == "pass"]
    if passing:
        best = max(passing, key=lambda n: accuracy[n].get("value") or 0.0)
        lead = Markup(
            "Of the {} mitigations tried, {} (model {}) passes every gate with the highest "
            "accuracy: {}."
        ).format(len(tried), tried[best], best, ci_html(accuracy[best], 1))
    elif candidates:
        best = max(candidates, key=lambda n: worst[n].get("value") or 0.0)
        among = "them" if not harmful else "those that are not harmful"
        lead = Markup(
            "None of the {} mitigations tried passes every gate; the best worst-group accuracy "
            "among {} is {}'s (model {}): {}."
        ).format(len(tried), among, tried[best], best, ci_html(worst[best], 1))
    else:
        lead = Markup("None of the {} mitigations tried is a candidate.").format(len(tried))
    if off:
        lead += Markup(
            " Switched off by validation selection (strength 0, plain training, not a fix): {}."
        ).format(Markup(", ").join(Markup("{} (model {})").format(tried[n], n) for n in off))
    named = Markup(", ").join(Markup("{} (model {})").format(tried[n], n) for n in harmful)
    if harmful and not candidates and not off:
        return Markup(
            "Every one of the {} mitigations tried is harmful, worse than plain training "
            "(worst group, paired 95% CI below 0): {}."
        ).format(len(tried), named)
    if not harmful:
        return lead
    return lead + Markup(
        " Harmful, worse than plain training (worst group, paired 95% CI below 0): {}."
    ).format(named)


def curves_chart(metrics: dict[str, Any], colours: dict[str, str]) -> str | None:
    """SVG: validation worst-group accuracy per epoch of every selected model's chosen run."""
    series = {}
    for name, model in metrics["models"].items():
        selection = (model.get("history") or {}).get("selection") or {}
        if selection.get("candidates"):
            chosen = selection["candidates"][selection["chosen_index"]]
            series[name] = (chosen["curve"], chosen["best_epoch"])
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(charts.CHART_WIDTH_IN, 2.4))
    for name, (curve, best) in series.items():
        epochs = list(range(1, len(curve) + 1))
        ax.plot(epochs, curve, color=colours.get(name, "#000000"), label=name, lw=1.5)
        if best:
            ax.plot([best], [curve[best - 1]], "o", color=colours.get(name, "#000000"), ms=5)
    ax.set_xlabel("epoch (dot: the epoch kept)")
    ax.set_ylabel("val worst group")
    ax.set_ylim(0, 1.02)
    ax.set_title("Validation worst-group accuracy of each chosen run")
    ax.legend(fontsize=charts.MIN_FONT_PT, frameon=False, loc="lower right")
    return charts._svg(fig)


def mitigation_context(
    metrics: dict[str, Any], svg_uri: Callable[[str], str], model_colours: dict[str, str]
) -> dict[str, Any] | None:
    """sections.mitigation_context with harm marks, selection and DFR notes, the curves chart
    and a summary that never names a harmful model as a candidate."""
    context = sections.mitigation_context(metrics, svg_uri, model_colours)
    if context is None:
        return None
    models = metrics["models"]
    harm = metrics.get("mitigation_harm", {})
    for row in context["rows"]:
        judged = harm.get(row["model"])
        row["harm"] = None
        if judged:
            status = (
                "harmful"
                if judged["harmful"]
                else "helps"
                if judged["helps"]
                else "no clear change"
            )
            row["harm"] = {
                "status": status,
                "baseline": judged["baseline"],
                "difference": points_html(judged["worst_group_accuracy_difference"]),
            }
        row["notes"] = [
            text
            for text in (
                selection_text(models[row["model"]]),
                switched_off_text(models[row["model"]]),
                dfr_text(models[row["model"]]),
            )
            if text
        ]
    chart = curves_chart(metrics, model_colours)
    context["curves"] = svg_uri(chart) if chart else None
    context["summary"] = harm_summary(metrics)
    context["harmful"] = [n for n, j in harm.items() if j.get("harmful")]
    return context
