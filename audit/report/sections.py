"""The report's newer parts, computed from metrics.json: trust, fairness, many classes, mitigations.

- Trust ("Can these explanations be trusted?"): per model and method, the randomization test
  (Adebayo et al.), deletion / insertion against a random order (Petsiuk et al.) and region
  occlusion against a same-shaped control, from `metrics.models.<m>.trust`; the page-one sentence
  saying which methods can be believed for which model.
- Fairness per protected attribute and intersection, from `metrics.models.<m>.fairness`: the worst
  intersection first, the worst cells across attributes (too-few cells marked), attention by group.
- Many classes: per-class accuracy worst first and the top confused pairs (the confusion matrix is
  absent from metrics.json above 20 classes).
- Mitigations: models trained with a `mitigation` side by side, the paired differences against the
  first model, and the sentence naming the mitigation that passes the gates with the best accuracy.

Every function is a pure function of the metrics (and, for images, of the run folder's files read
through a given callable), returning plain values and Markup that the templates lay out; every part
is optional: a run without the block gets None or an empty list and the report shows nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from markupsafe import Markup

from audit.report import charts
from audit.report.fmt import amount_html, ci_html, nowrap, pct, points_html, signed_html

WORST_CELLS_SHOWN = 8  # worst class x group cells per model across attributes and intersections
WORST_CLASSES_SHOWN = 10  # classes per model, worst first, when there are more than two
CONFUSIONS_SHOWN = 10  # top confused pairs per model when the confusion matrix is absent
MAX_STRIPS = 8  # cascade strips: the first model's methods, then the failing methods of others
METHOD_NAMES = {
    "cam": "CAM",
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "saliency": "saliency",
    "guided_backprop": "Guided Backprop",
    "guided_gradcam": "Guided Grad-CAM",
}
PLAIN = "none"  # the mitigation of plain training


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def region_words(region: str, data: dict[str, Any]) -> str:
    """A region's name for a sentence: the union regions by their members."""
    if region == "protected" and data.get("protected_regions"):
        return " + ".join(data["protected_regions"])
    if region == "core" and data.get("core_regions"):
        return " + ".join(data["core_regions"])
    return region


def region_label(region: str, data: dict[str, Any]) -> str:
    if region in ("protected", "core"):
        return f"{region_words(region, data)} ({region})"
    return region


# -- trust -------------------------------------------------------------------------------------------
def trust_methods(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return ((model.get("trust") or {}).get("methods")) or {}


def randomization_reason(entry: dict[str, Any]) -> str:
    """Why a method passes or fails the randomization test, with the measured correlation."""
    test = entry.get("randomization") or {}
    final = (test.get("final_spearman") or {}).get("value")
    threshold = test.get("threshold")
    steps = test.get("cascade_steps") or len(test.get("steps") or [])
    limit = f" (a pass needs below {threshold:.2f})" if threshold is not None else ""
    after = f"after all {steps} randomization steps" if steps else "after the full cascade"
    if final is None:
        return (
            "its maps were constant once the weights were randomized, so the test could not be made"
        )
    if entry.get("trusted", test.get("passed")):
        return (
            f"its maps change when the model's weights are randomized: rank correlation "
            f"{final:.2f} with the original maps {after}{limit}"
        )
    return (
        f"its maps barely change when the model's weights are randomized: rank correlation "
        f"{final:.2f} with the original maps {after}{limit}, so they do not show this model"
    )


def trust_verdict(entry: dict[str, Any]) -> str:
    """'trusted', 'use with care' or 'not trusted': what the two checks say together.

    The randomization test is a sanity check (the maps depend on the model); deletion / insertion
    a faithfulness check (the map's top pixels drive the decision). A method that passes the first
    and fails the second shows the model, but not clearly what decides: use it with care."""
    if not entry.get("trusted", (entry.get("randomization") or {}).get("passed")):
        return "not trusted"
    faith = entry.get("faithfulness") or {}
    return "use with care" if faith and faith.get("faithful") is False else "trusted"


def short_reason(entry: dict[str, Any]) -> str:
    """The verdict's reason in a few words, for the trust table."""
    test = entry.get("randomization") or {}
    final = (test.get("final_spearman") or {}).get("value")
    threshold = test.get("threshold")
    limit = f"{threshold:.2f}" if threshold is not None else "the limit"
    if final is None:
        text = "maps constant after randomization: the test could not be made"
    elif entry.get("trusted", test.get("passed")):
        text = f"maps change with random weights (ρ {final:.2f} < {limit})"
    else:
        text = f"maps barely change with random weights (ρ {final:.2f} ≥ {limit})"
    faith = entry.get("faithfulness")
    if trust_verdict(entry) == "use with care":
        text += (
            "; does not clearly beat a random order: use with care (the maps show the model, "
            "but not clearly what drives its decisions)"
        )
    elif faith:
        text += (
            "; beats a random order"
            if faith.get("faithful")
            else "; does not clearly beat a random order"
        )
    return text


def faithfulness_words(entry: dict[str, Any]) -> str:
    """Whether deletion and insertion beat a random pixel order, in words."""
    faith = entry.get("faithfulness")
    if not faith:
        return ""
    if faith.get("faithful"):
        return "deleting or revealing its top pixels first moves the prediction more than a random order"
    return "deleting or revealing its top pixels first does not clearly beat a random order"


def untrusted_methods(model: dict[str, Any]) -> dict[str, str]:
    """method -> reason, for every method of this model that failed the randomization test."""
    return {
        m: randomization_reason(e)
        for m, e in trust_methods(model).items()
        if not e.get("trusted", True)
    }


def trust_sentence(name: str, model: dict[str, Any]) -> Markup | None:
    """One sentence for page one: which explanation methods can be believed for this model, which
    to use with care (sanity check passed, faithfulness not shown) and which not at all."""
    methods = trust_methods(model)
    if not methods:
        return None
    verdicts = {m: trust_verdict(e) for m, e in methods.items()}
    good = [m for m, v in verdicts.items() if v == "trusted"]
    care = [m for m, v in verdicts.items() if v == "use with care"]
    bad = [m for m, v in verdicts.items() if v == "not trusted"]
    parts = []
    if good:
        names = " and ".join(method_name(m) for m in good)
        faithful = all((methods[m].get("faithfulness") or {}).get("faithful") for m in good)
        parts.append(
            Markup("{} can be believed ({} maps depend on the weights{})").format(
                names,
                "their" if len(good) > 1 else "its",
                "; deletion and insertion beat a random order" if faithful else "",
            )
        )
    if care:
        names = " and ".join(method_name(m) for m in care)
        parts.append(
            Markup(
                "use {} with care: {} maps depend on the weights (the sanity check passes), but "
                "deletion and insertion do not clearly beat a random order (faithfulness is not "
                "shown)"
            ).format(names, "their" if len(care) > 1 else "its")
        )
    for m in bad:
        final = ((methods[m].get("randomization") or {}).get("final_spearman") or {}).get("value")
        why = (
            Markup(
                "its maps barely change when the weights are randomized (rank correlation {})"
            ).format(nowrap(f"{final:.2f}"))
            if final is not None
            else Markup("the randomization test could not be made")
        )
        parts.append(Markup("{} cannot: {}").format(method_name(m), why))
    return Markup("For {}, {}.").format(name, Markup("; ").join(parts))


def _rho_html(estimate: dict[str, Any] | None) -> Markup:
    """A correlation with its interval, '0.39 [0.36 to 0.42]' (signs kept readable)."""
    if not estimate or estimate.get("value") is None:
        return Markup("n/a")
    text = nowrap(f"{estimate['value']:.2f}")
    if estimate.get("ci_low") is not None:
        text += Markup(" ") + nowrap(f"[{estimate['ci_low']:.2f} to {estimate['ci_high']:.2f}]")
    return text


def _auc_cell(faith: dict[str, Any], curve: str) -> Markup:
    own = (faith.get(f"{curve}_auc") or {}).get("value")
    rnd = (faith.get(f"random_{curve}_auc") or {}).get("value")
    if own is None:
        return Markup("n/a")
    diff = faith.get(f"{curve}_minus_random")
    return Markup("{} vs {} random; {}").format(
        nowrap(f"{own:.2f}"),
        nowrap(f"{rnd:.2f}") if rnd is not None else "n/a",
        signed_html(diff),
    )


def _strip_caption(method: str, test: dict[str, Any]) -> Markup:
    steps = test.get("steps") or []
    parts = [
        Markup("{} {}{}").format(
            i + 1,
            step.get("layer", "?"),
            Markup(" (ρ {})").format(nowrap(f"{step['spearman']['value']:.2f}"))
            if (step.get("spearman") or {}).get("value") is not None
            else "",
        )
        for i, step in enumerate(steps)
    ]
    return Markup(
        "Left to right: the image; {}'s map of the trained model; then after re-initialising, "
        "cumulatively from the output: {} (ρ: mean rank correlation with the original maps)."
    ).format(method_name(method), Markup(" · ").join(parts))


def occlusion_regions(models: dict[str, Any]) -> list[str]:
    """The occlusion regions to show: the protected and core unions first, when measured."""
    found: list[str] = []
    for model in models.values():
        occlusion = (model.get("trust") or {}).get("occlusion") or {}
        for region in occlusion:
            if region != "no_control" and region not in found:
                found.append(region)
    return [r for r in ("protected", "core") if r in found]


def trust_context(
    metrics: dict[str, Any],
    run_dir: Path,
    image_uri: Callable[[Path], str | None],
    svg_uri: Callable[[str], str],
    model_colours: dict[str, str],
) -> dict[str, Any] | None:
    """Everything the trust section shows, or None when no model has a trust block."""
    models, data = metrics["models"], metrics["data"]
    names = [n for n in models if trust_methods(models[n])]
    if not names:
        return None
    rows, strips, curves = [], [], []
    for name in names:
        methods = trust_methods(models[name])
        for method, entry in methods.items():
            test = entry.get("randomization") or {}
            faith = entry.get("faithfulness") or {}
            trusted = bool(entry.get("trusted"))
            rows.append(
                {
                    "model": name,
                    "method": method_name(method),
                    "rho": _rho_html(test.get("final_spearman")),
                    "threshold": test.get("threshold"),
                    "deletion": _auc_cell(faith, "deletion"),
                    "insertion": _auc_cell(faith, "insertion"),
                    "trusted": trusted,
                    "verdict": trust_verdict(entry),
                    "faithful": faith.get("faithful"),
                    "reason": randomization_reason(entry),
                    "short": short_reason(entry),
                    "faithfulness": faithfulness_words(entry),
                }
            )
            # Every method's strip for the first model, and any failing method's for the others.
            if (name == names[0] or not trusted) and len(strips) < MAX_STRIPS:
                uri = image_uri(run_dir / "overlays" / "trust" / name / f"{method}.png")
                if uri is not None:
                    strips.append(
                        {
                            "model": name,
                            "method": method_name(method),
                            "uri": uri,
                            "trusted": trusted,
                            "verdict": trust_verdict(entry),
                            "caption": _strip_caption(method, test),
                        }
                    )
        series = {
            method_name(m): e["faithfulness"]
            for m, e in methods.items()
            if (e.get("faithfulness") or {}).get("deletion_curve")
        }
        if series:
            curves.append(
                {
                    "model": name,
                    "uri": svg_uri(
                        charts.deletion_insertion(
                            series, f"{name}: deletion and insertion", model_colours[name]
                        )
                    ),
                }
            )
    return {
        "models": names,
        "rows": rows,
        "strips": strips,
        "curves": curves,
        "n_images": {n: models[n]["trust"].get("n_images") for n in names},
        "n_faithfulness": {n: models[n]["trust"].get("n_faithfulness_images") for n in names},
        "n_randomization": {
            n: models[n]["trust"].get("n_randomization_images", models[n]["trust"].get("n_images"))
            for n in names
        },
        "occlusion": occlusion_context(metrics, svg_uri, model_colours),
        "not_trusted": {n: untrusted_methods(models[n]) for n in names},
        "region_words": region_words("protected", data),
    }


def occlusion_context(
    metrics: dict[str, Any], svg_uri: Callable[[str], str], model_colours: dict[str, str]
) -> dict[str, Any] | None:
    """Occlusion effects per model, region (protected and core unions), fill and group, with the
    paired differences between models; None when nothing was measured."""
    models, data = metrics["models"], metrics["data"]
    regions = occlusion_regions(models)
    if not regions:
        return None
    groups = list(data.get("groups") or [])
    rows = []
    chart_series: dict[str, list[dict[str, Any] | None]] = {}
    categories: list[str] = []
    chart_fill = None  # the chart shows the first fill (the gate's "mean"); the table shows all
    for name, model in models.items():
        occlusion = (model.get("trust") or {}).get("occlusion") or {}
        for region in regions:
            for fill, entry in (occlusion.get(region) or {}).items():
                overall = entry.get("overall") or {}
                per_group = entry.get("per_group") or {}
                rows.append(
                    {
                        "model": name,
                        "region": region_label(region, data),
                        "fill": fill,
                        "effect": amount_html(overall.get("effect"), 1),
                        "groups": [
                            amount_html((per_group.get(g) or {}).get("effect"), 1) for g in groups
                        ],
                        "flips": Markup("{} vs {}").format(
                            ci_html(overall.get("flip_rate")),
                            ci_html(overall.get("control_flip_rate")),
                        ),
                        "n": (overall.get("effect") or {}).get("n"),
                    }
                )
                chart_fill = chart_fill or fill
                if fill != chart_fill:
                    continue
                label = f"{region_label(region, data)}, {fill} fill"
                if label not in categories:
                    categories.append(label)
                chart_series.setdefault(name, []).append(overall.get("effect"))
    chart = None
    if chart_series and all(len(v) == len(categories) for v in chart_series.values()):
        chart = svg_uri(
            charts.grouped_bars(
                categories,
                chart_series,
                "drop in confidence beyond the control",
                "Occlusion effect beyond a control (95% CI)",
                model_colours,
                signed=True,
            )
        )
    differences = []
    for comparison in metrics.get("comparisons", []):
        paired = comparison.get("occlusion_difference") or {}
        diff_rows = [
            {
                "region": region_label(region, data),
                "fill": fill,
                "effect": points_html(values.get("effect_difference")),
                "flips": points_html(values.get("flip_rate_difference")),
            }
            for region in regions
            for fill, values in (paired.get(region) or {}).items()
        ]
        if diff_rows:
            differences.append({"a": comparison["a"], "b": comparison["b"], "rows": diff_rows})
    return {"rows": rows, "groups": groups, "chart": chart, "differences": differences}


# -- fairness per attribute and intersection ---------------------------------------------------------
def worst_intersections(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model, the worst judged cell of its intersections (else of any attribute), as words."""
    out = []
    for name, model in metrics["models"].items():
        fairness = model.get("fairness") or {}
        blocks = {a: b for a, b in fairness.items() if b.get("kind") == "intersection"}
        kind = "intersection" if blocks else "attribute"
        blocks = blocks or fairness
        ranked = [
            (a, b["worst_cell_accuracy"])
            for a, b in blocks.items()
            if (b.get("worst_cell_accuracy") or {}).get("value") is not None
        ]
        if not ranked:
            continue
        attribute, worst = min(ranked, key=lambda item: item[1]["value"])
        cell = worst.get("cell") or ""
        n = ((blocks[attribute].get("per_cell") or {}).get(cell) or {}).get("n")
        out.append(
            {
                "model": name,
                "kind": kind,
                "attribute": attribute,
                "text": Markup("{}: the worst {} is {} in “{}”, right {} of the time{}.").format(
                    name,
                    kind,
                    cell,
                    attribute,
                    ci_html(worst, 1),
                    Markup(" (n={})").format(n) if n is not None else "",
                ),
            }
        )
    return out


def worst_cells(model: dict[str, Any], k: int = WORST_CELLS_SHOWN) -> dict[str, Any]:
    """The k worst cells of one model across attributes and intersections (too-few cells marked),
    with how many cells there are in all and how many are too few to judge."""
    from audit.metrics.groups import cell_rows

    fairness = model.get("fairness") or {}
    if not fairness:
        return {"rows": [], "total": 0, "too_few": 0, "min_cell_size": None}
    frame = cell_rows(fairness)
    judged = frame[~frame["too_few"].astype(bool)]
    few = frame[frame["too_few"].astype(bool)]
    shown = judged.head(k)
    if len(shown) < k:
        shown = pd.concat([shown, few.head(k - len(shown))])
    elif len(few):  # the worst too-few cell still gets a line, marked, when it is worse
        worst_few = few.sort_values("accuracy", kind="mergesort").head(1)
        if worst_few["accuracy"].iloc[0] < shown["accuracy"].max():
            shown = pd.concat([shown, worst_few])
    rows = [
        {
            "attribute": r["attribute"],
            "cell": f"{r['class']} / {r['group']}",
            "n": int(r["n"]),
            "accuracy": ci_html(
                {"value": r["accuracy"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}
                if pd.notna(r["accuracy"])
                else None,
                1,
            ),
            "too_few": bool(r["too_few"]),
        }
        for r in shown.to_dict("records")
    ]
    sizes = [b.get("min_cell_size") for b in fairness.values() if b.get("min_cell_size")]
    return {
        "rows": rows,
        "total": len(frame),
        "too_few": len(few),
        "min_cell_size": sizes[0] if sizes else None,
    }


def attention_by_group(model: dict[str, Any]) -> list[dict[str, Any]]:
    """Per attribute: the Grad-CAM share on the protected union per group, and the gap."""
    rows = []
    for attribute, block in (model.get("fairness") or {}).items():
        entry = ((block.get("attention") or {}).get("gradcam") or {}).get("protected")
        if not entry:
            continue
        groups = entry.get("per_group") or {}
        gap = block.get("attention_gap") or entry.get("gap") or {}
        rows.append(
            {
                "attribute": attribute,
                "groups": [
                    {
                        "group": g,
                        "share": ci_html(e),
                        "too_few": bool(e.get("too_few")),
                        "n": e.get("n"),
                    }
                    for g, e in groups.items()
                ],
                "gap": amount_html(gap),
                "between": (
                    f"{gap['high']} − {gap['low']}" if gap.get("high") and gap.get("low") else ""
                ),
            }
        )
    return rows


def fairness_context(metrics: dict[str, Any], run_dir: Path) -> dict[str, Any] | None:
    """The fairness part of the performance section, or None for a run without fairness blocks."""
    models = metrics["models"]
    if not any(m.get("fairness") for m in models.values()):
        return None
    attributes = sorted({a for m in models.values() for a in (m.get("fairness") or {})})
    return {
        "attributes": attributes,
        "worst": worst_intersections(metrics),
        "cells": {n: worst_cells(m) for n, m in models.items() if m.get("fairness")},
        "attention": {n: attention_by_group(m) for n, m in models.items()},
        "per_cell_file": "per_cell.csv" if (Path(run_dir) / "per_cell.csv").is_file() else None,
        "k": WORST_CELLS_SHOWN,
    }


# -- many classes -----------------------------------------------------------------------------------
def classes_context(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per model: the classes worst first (when more than two) and the top confused pairs (when the
    confusion matrix is absent, i.e. above 20 classes)."""
    n_classes = len(metrics["data"].get("classes") or [])
    out = []
    for name, model in metrics["models"].items():
        perf = model.get("performance") or {}
        per_class = perf.get("per_class") or {}
        order = perf.get("classes_worst_first") or sorted(
            per_class,
            key=lambda c: (per_class[c].get("value") is None, per_class[c].get("value") or 0),
        )
        worst = (
            [
                {
                    "cls": c,
                    "accuracy": ci_html(per_class.get(c), 1),
                    "n": (per_class.get(c) or {}).get("n"),
                    "too_few": bool((per_class.get(c) or {}).get("too_few")),
                }
                for c in order[:WORST_CLASSES_SHOWN]
            ]
            if n_classes > 2
            else []
        )
        matrix = perf.get("confusion_matrix")
        confusions = (
            [
                {
                    "true": c.get("true"),
                    "predicted": c.get("predicted"),
                    "count": c.get("count"),
                    "share": pct(c.get("share"), 1),
                }
                for c in (perf.get("top_confusions") or [])[:CONFUSIONS_SHOWN]
            ]
            if matrix is None
            else []
        )
        out.append(
            {
                "model": name,
                "worst_classes": worst,
                "more_classes": max(0, len(order) - len(worst)) if worst else 0,
                "matrix": matrix,
                "confusions": confusions,
                "n_confusions": len(perf.get("top_confusions") or []),
            }
        )
    return {"n_classes": n_classes, "models": out, "k": WORST_CLASSES_SHOWN}


# -- mitigations ----------------------------------------------------------------------------------------
def _mitigation_keys() -> tuple[str, ...]:
    """The hyperparameter names of audit.models.mitigations.MitigationConfig (not its `name`)."""
    try:
        from audit.models.mitigations import MitigationConfig
    except ImportError:  # pragma: no cover - part of the package
        return ()
    return tuple(f.name for f in dataclasses.fields(MitigationConfig) if f.name != "name")


def mitigation_of(model: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(mitigation name, its hyperparameters) of a model; (None, {}) when the run records none.

    The runner writes `MitigationConfig.resolved()` into the model's entry: `mitigation` (a name,
    "none" for plain training) beside the chosen mitigation's own keys. A `mitigation_config`
    dict, or `mitigation` given as a dict, are read too."""
    value = model.get("mitigation")
    config = dict(model.get("mitigation_config") or {})
    if isinstance(value, dict):
        config = {**value, **config}
        value = value.get("mitigation") or value.get("name")
    if value is None:
        value = config.get("mitigation") or config.get("name")
    if value is None:
        return None, {}
    if not config:
        config = {k: model[k] for k in _mitigation_keys() if k in model}
    params = {k: v for k, v in config.items() if k not in ("mitigation", "name")}
    return str(value), params


def _lookup(node: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


MITIGATION_FIGURES = [
    ("Accuracy", ("performance", "accuracy"), "accuracy_difference"),
    (
        "Worst-group accuracy",
        ("performance", "worst_group_accuracy"),
        "worst_group_accuracy_difference",
    ),
    (
        "Grad-CAM share on protected regions",
        ("attention", "gradcam", "overall", "protected", "share"),
        ("attention_share_difference", "protected"),
    ),
    (
        "Occlusion effect, protected (mean fill)",
        ("trust", "occlusion", "protected", "mean", "overall", "effect"),
        ("occlusion_difference", "protected", "mean", "effect_difference"),
    ),
    ("Counterfactual flip rate", ("counterfactual", "flip_rate"), "flip_rate_difference"),
]


# Figures that are effects (differences of probabilities): shown in points, the others in percent.
EFFECTS = ("Occlusion effect, protected (mean fill)",)

# The chart keeps the three figures the gates judge most directly; the table has them all.
CHARTED = (
    "Worst-group accuracy",
    "Grad-CAM share on protected regions",
    "Counterfactual flip rate",
)


def mitigation_summary(metrics: dict[str, Any]) -> Markup | None:
    """The mitigation that passes every gate with the highest accuracy, or that none does."""
    models, verdicts = metrics["models"], metrics.get("verdicts", {})
    tried = {n: mitigation_of(m)[0] for n, m in models.items()}
    tried = {n: t for n, t in tried.items() if t not in (None, PLAIN)}
    if not tried:
        return None
    passing = [n for n in tried if verdicts.get(n) == "pass"]
    accuracy = {n: _lookup(models[n], "performance", "accuracy") or {} for n in models}
    if passing:
        best = max(passing, key=lambda n: accuracy[n].get("value") or 0.0)
        return Markup(
            "Of the {} mitigations tried, {} (model {}) passes every gate with the highest "
            "accuracy: {}."
        ).format(len(tried), tried[best], best, ci_html(accuracy[best], 1))
    worst = {n: _lookup(models[n], "performance", "worst_group_accuracy") or {} for n in tried}
    best = max(tried, key=lambda n: worst[n].get("value") or 0.0)
    return Markup(
        "None of the {} mitigations tried passes every gate; the best worst-group accuracy among "
        "them is {}'s (model {}): {}."
    ).format(len(tried), tried[best], best, ci_html(worst[best], 1))


def mitigation_context(
    metrics: dict[str, Any], svg_uri: Callable[[str], str], model_colours: dict[str, str]
) -> dict[str, Any] | None:
    """The mitigations comparison (table, chart, paired differences), or None when no model of the
    run was trained with a mitigation other than plain training."""
    models = metrics["models"]
    mitigations = {n: mitigation_of(m) for n, m in models.items()}
    if all(name in (None, PLAIN) for name, _ in mitigations.values()):
        return None  # plain training only: nothing to compare
    names = list(models)
    figures = [
        (label, path, diff)
        for label, path, diff in MITIGATION_FIGURES
        if any(_lookup(models[n], *path) for n in names)
    ]
    verdicts = metrics.get("verdicts", {})
    gates = metrics.get("gates", [])
    rows = []
    for n in names:
        mitigation, params = mitigations[n]
        own = [g for g in gates if g["model"] == n]
        rows.append(
            {
                "model": n,
                "mitigation": mitigation or PLAIN,
                "params": ", ".join(f"{k} = {v}" for k, v in params.items()),
                "values": [
                    (amount_html if label in EFFECTS else ci_html)(_lookup(models[n], *path), 1)
                    for label, path, _ in figures
                ],
                "verdict": verdicts.get(n, "fail"),
                "gates": f"{sum(1 for g in own if g['passed'])} of {len(own)}",
            }
        )
    differences = []
    for comparison in metrics.get("comparisons", []):
        values = []
        for _, _, diff in figures:
            path = (diff,) if isinstance(diff, str) else diff
            values.append(points_html(_lookup(comparison, *path)))
        differences.append({"model": comparison["b"], "values": values})
    charted = [f for f in figures if f[0] in CHARTED]
    chart = svg_uri(
        charts.grouped_bars(
            [label for label, _, _ in charted],
            {n: [_lookup(models[n], *path) for _, path, _ in charted] for n in names},
            "value (95% CI)",
            "Models side by side: mitigations against the first model",
            model_colours,
            signed=True,
        )
    )
    return {
        "labels": [label for label, _, _ in figures],
        "rows": rows,
        "baseline": names[0],
        "differences": differences,
        "chart": chart,
        "summary": mitigation_summary(metrics),
    }
