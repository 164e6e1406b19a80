"""Page one of the report, the mistake gallery's choice, the palettes and the stale-PDF rule, on
hand-made metrics (no run, no browser): every sentence must follow the figures it is given."""

from __future__ import annotations

import base64
import html
import re

import pandas as pd
import pytest

from audit.report import charts
from audit.report.context import choose_mistakes, mistakes_shown
from audit.report.fmt import ci_html
from audit.report.words import GATE_TEXTS, decisions, gate_legend


def _estimate(value, low=None, high=None, **extra):
    return {"value": value, "ci_low": low, "ci_high": high, **extra}


def _metrics(protected_share: float, area: float, worst: float, flips: float) -> dict:
    """Two models: 'biased' with the given figures, 'fair' comfortably inside every gate."""
    data = {
        "classes": ["doctor", "nurse"],
        "groups": ["female", "male"],
        "protected_regions": ["hair", "face"],
        "core_regions": ["stethoscope", "badge"],
        "regions": ["clothes", "face", "hair", "stethoscope", "badge"],
        "region_area": {"protected": area, "core": 0.006, "clothes": 0.245},
        "splits": {
            "train_biased": {
                "cells": {
                    "doctor / female": 22,
                    "doctor / male": 78,
                    "nurse / female": 93,
                    "nurse / male": 7,
                }
            }
        },
    }

    def model(share, worst_value, flip):
        return {
            "train_split": "train_biased",
            "performance": {
                "worst_group_accuracy": _estimate(worst_value, cell="doctor / female"),
                "per_cell": {
                    "doctor / female": _estimate(worst_value, n=10),
                    "doctor / male": _estimate(1.0, n=10),
                    "nurse / female": _estimate(0.99, n=10),
                    "nurse / male": _estimate(0.95, n=10),
                },
                "per_group": {"female": _estimate(0.7), "male": _estimate(0.95)},
            },
            "attention": {
                "gradcam": {
                    "n_images": 40,
                    "overall": {
                        "protected": {"share": _estimate(share)},
                        "core": {"share": _estimate(0.03)},
                        "clothes": {"share": _estimate(0.52)},
                        "hair": {"share": _estimate(share / 2)},
                    },
                }
            },
            "counterfactual": {"flip_rate": _estimate(flip), "from_twins": 40},
        }

    models = {"biased": model(protected_share, worst, flips), "fair": model(0.1, 0.95, 0.02)}
    limits = {
        "min_worst_group_accuracy": (">=", 0.85, "worst-group accuracy"),
        "max_protected_attention": ("<=", 0.30, "Grad-CAM share on protected regions"),
        "max_flip_rate": ("<=", 0.10, "counterfactual flip rate"),
    }
    paths = {
        "min_worst_group_accuracy": lambda m: m["performance"]["worst_group_accuracy"]["value"],
        "max_protected_attention": lambda m: m["attention"]["gradcam"]["overall"]["protected"][
            "share"
        ]["value"],
        "max_flip_rate": lambda m: m["counterfactual"]["flip_rate"]["value"],
    }
    gates = []
    for name, m in models.items():
        for key, (op, threshold, label) in limits.items():
            value = paths[key](m)
            passed = value >= threshold if op == ">=" else value <= threshold
            gates.append(
                {
                    "model": name,
                    "gate": key,
                    "label": label,
                    "op": op,
                    "threshold": threshold,
                    "value": value,
                    "passed": passed,
                }
            )
    verdicts = {
        n: "pass" if all(g["passed"] for g in gates if g["model"] == n) else "fail" for n in models
    }
    return {"data": data, "models": models, "gates": gates, "verdicts": verdicts}


def _text(markup) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", str(markup)))


def _mistakes(metrics):
    return {
        n: {
            "doctor / female": {"n": 6, "shown": [3, 1, 2, 0]},
            "nurse / male": {"n": 0, "shown": []},
        }
        for n in metrics["models"]
    }


ANCHORS = {
    "biased": {"doctor / female": "mistakes-0-0", "nurse / male": "mistakes-0-3"},
    "fair": {"doctor / female": "mistakes-1-0", "nurse / male": "mistakes-1-3"},
}


@pytest.mark.parametrize(
    ("share", "area", "worst", "flips"), [(0.383, 0.113, 0.285, 0.448), (0.61, 0.2, 0.5, 0.25)]
)
def test_the_decision_is_written_from_the_figures(share, area, worst, flips):
    metrics = _metrics(share, area, worst, flips)
    biased, fair = decisions(metrics, _mistakes(metrics), ANCHORS)
    assert not biased["ship"] and fair["ship"]
    assert _text(biased["headline"]) == "Do not ship biased: it fails 3 of 3 gates."
    assert _text(fair["headline"]) == "fair can ship: it passes all 3 gates."
    assert len(biased["why"]) == 2  # the two findings that decide it
    # The worst two gates, by relative distance from the threshold computed by hand.
    severity = {
        "worst": (0.85 - worst) / 0.85,
        "attention": (share - 0.30) / 0.30,
        "flips": (flips - 0.10) / 0.10,
    }
    expected = {
        "worst": f"It fails on female doctor images: right for {100 * worst:.1f}% of them, "
        "against 100% of male doctor images (limit: at least 85% in every cell).",
        "attention": f"It decides from hair + face rather than from stethoscope + badge: "
        f"{100 * share:.1f}% of its Grad-CAM falls on hair + face, which cover "
        f"{100 * area:.0f}% of the image (limit: at most 30%).",
        "flips": "Its answer depends on the group: changing only the protected attribute (its "
        "twin with the group's cues swapped) changes its prediction for "
        f"{100 * flips:.1f}% of the images (limit: at most 10%).",
    }
    top = sorted(severity, key=severity.get, reverse=True)[:2]
    assert [_text(s) for s in biased["why"]] == [expected[k] for k in top]
    # A passing model is told by the gates it passes with the least room.
    assert len(fair["why"]) == 2 and "limit" in _text(fair["why"][0])
    # Look first at the worst cell's mistakes, through the gallery's anchor.
    assert biased["look_first"]["href"] == "#mistakes-0-0"
    assert "6 misclassified female doctor images" in _text(biased["look_first"]["text"])
    assert "4 most confident" in _text(biased["look_first"]["text"])
    # Next: the training split's counts of the weak cell, then retrain and re-audit.
    steps = " ".join(_text(s) for s in biased["next"])
    assert "“train_biased”" in steps and "22 female doctor" in steps and "93 female nurse" in steps
    assert "re-run this audit" in steps
    # What is measured of where it looks (clothes, the top other region, included).
    looks = _text(biased["looks"])
    assert "52% on clothes" in looks and "3.0% on stethoscope + badge" in looks
    assert "over 40 images" in looks


def test_a_model_without_gates_is_not_cleared():
    metrics = _metrics(0.2, 0.11, 0.9, 0.0)
    metrics["gates"] = []
    metrics["verdicts"] = {"biased": "pass", "fair": "pass"}
    for d in decisions(metrics, _mistakes(metrics), ANCHORS):
        assert not d["ship"] and "No gate is configured" in _text(d["headline"])


def test_gate_legend_uses_the_rows_texts_else_the_built_in_ones():
    metrics = _metrics(0.4, 0.1, 0.5, 0.3)
    rows = metrics["gates"]
    legend = {r["gate"]: r for r in gate_legend(rows)}
    assert len(legend) == 3  # one per gate, not per model
    for row in legend.values():
        assert row["protects"] and row["origin"]
        assert "the default" in row["origin"]  # thresholds equal to the defaults
    assert legend["min_worst_group_accuracy"]["origin"].startswith(">= 85%")
    given = [
        {
            **rows[0],
            "protects": "P-TEXT",
            "why_default": "W-TEXT",
            "source": "config",
            "threshold": 0.9,
            "default": 0.85,
        }
    ]
    row = gate_legend(given)[0]
    assert row["protects"] == "P-TEXT"
    assert row["origin"] == ">= 90%, set in the run's config (the default is >= 85%). W-TEXT"
    assert set(GATE_TEXTS) >= {g["gate"] for g in rows}


def test_choose_mistakes_most_confident_first_capped_per_cell():
    rows = pd.DataFrame(
        {
            "label": ["a", "a", "a", "a", "b", "b", "a", "a"],
            "group": ["x", "x", "x", "y", "x", "x", "x", ""],
            "correct": [False, True, False, False, True, True, False, False],
            "confidence": [0.6, 0.99, 0.9, 0.7, 0.8, 0.5, 0.9, 0.55],
        }
    )
    # By hand: cell a / x has mistakes at 0 (0.6), 2 (0.9), 6 (0.9): by confidence, ties by position.
    assert choose_mistakes(rows, 2) == {
        "a / (none)": {"n": 1, "shown": [7]},
        "a / x": {"n": 3, "shown": [2, 6]},
        "a / y": {"n": 1, "shown": [3]},
        "b / x": {"n": 0, "shown": []},
    }
    recorded = {"a / x": {"n": 3, "shown": [6]}}
    metrics = {"models": {"m": {"mistakes_shown": recorded}, "k": {}}}
    chosen = mistakes_shown(metrics, {"m": rows, "k": rows}, {"explain": {"mistakes_per_cell": 1}})
    assert chosen["m"] == recorded  # the runner's record wins
    assert chosen["k"]["a / x"] == {"n": 3, "shown": [2]}


def test_intervals_never_break_inside():
    html = str(ci_html(_estimate(0.02, 0.015, 0.025)))
    assert html == '<span class="nw">2%</span> <span class="nw">[2–2]</span>'
    assert str(ci_html(None)) == '<span class="nw">n/a</span>'


def _svg_fills(svg: str) -> set[str]:
    return {c.upper() for c in re.findall(r"fill:\s*(#[0-9a-fA-F]{6})", svg)}


def test_palettes_are_separate_and_charts_use_them():
    models = charts.model_colours(["biased", "unbiased"])
    groups = charts.group_colours(["female", "male"])
    verdict = {c.upper() for c in charts.VERDICT_COLOURS.values()}
    assert not {c.upper() for c in charts.MODEL_COLOURS} & {c.upper() for c in charts.GROUP_COLOURS}
    assert not ({c.upper() for c in charts.MODEL_COLOURS + charts.GROUP_COLOURS} & verdict)
    est = [_estimate(0.3, 0.2, 0.4), _estimate(0.6, 0.5, 0.7)]
    by_model = charts.grouped_bars(["a", "b"], {"biased": est, "unbiased": est}, "x", "t", models)
    by_group = charts.grouped_bars(["a", "b"], {"female": est, "male": est}, "x", "t", groups)
    assert {c.upper() for c in models.values()} <= _svg_fills(by_model)
    assert not _svg_fills(by_model) & {c.upper() for c in groups.values()}
    assert {c.upper() for c in groups.values()} <= _svg_fills(by_group)
    assert not _svg_fills(by_group) & {c.upper() for c in models.values()}
    for svg in (by_model, by_group, charts.colour_bar("scale")):
        sizes = [float(s) for s in re.findall(r"font[^;\"]*?([\d.]+)px", svg)]
        assert sizes and min(sizes) >= charts.MIN_FONT_PT  # text kept as text, >= 9 pt


def test_long_category_names_do_not_collide():
    """Horizontal bars: category labels are stacked vertically, one per bar row."""
    long = [f"a rather long region name number {i}" for i in range(8)]
    est = [_estimate(0.1 * i) for i in range(8)]
    svg = charts.grouped_bars(long, {"m": est}, "x", "t", {"m": "#E69F00"})
    assert base64.b64encode(svg.encode())  # renders
    ys = [float(y) for y in re.findall(r'<text[^>]*\by="([\d.]+)"[^>]*>a rather', svg)]
    ys += [float(y) for y in re.findall(r"translate\([\d.]+ ([\d.]+)\)[^>]*>a rather", svg)]
    # Every label sits on its own row: distinct positions at least a line of 9 pt apart.
    assert len(ys) >= 8
    first_lines = sorted(set(round(y, 1) for y in ys))
    assert all(b - a >= 9 for a, b in zip(first_lines, first_lines[1:], strict=False))


def test_one_finding_per_kind_of_gate():
    """Gates repeated per protected attribute give one sentence, from that attribute's figures."""
    metrics = _metrics(0.2, 0.11, 0.5, 0.02)
    per_attribute = []
    for gate in metrics["gates"]:
        if gate["gate"] == "min_worst_group_accuracy":
            for attribute, value in (("sex", 0.5), ("age", 0.6)):
                per_attribute.append(
                    {**gate, "attribute": attribute, "value": value, "label": f"x ({attribute})"}
                )
        else:
            per_attribute.append(gate)
    cell = {
        "worst_cell_accuracy": _estimate(0.6, cell="nurse / male"),
        "per_cell": {"nurse / male": _estimate(0.6), "nurse / female": _estimate(0.9)},
    }
    for model in metrics["models"].values():
        model["fairness"] = {"sex": {}, "age": cell}
    metrics["gates"] = per_attribute
    biased = decisions(metrics, _mistakes(metrics), ANCHORS)[0]
    assert len(biased["why"]) == 1  # both failing gates are worst-group accuracy
    # The sex gate (worse) is told; with no block of its own it reads the model's figures.
    assert _text(biased["why"][0]).startswith("It fails on female doctor images: right for 50.0%")
    # The age gate alone reads the age block's worst cell.
    metrics["gates"] = [g for g in per_attribute if g.get("attribute") != "sex"]
    biased = decisions(metrics, _mistakes(metrics), ANCHORS)[0]
    assert _text(biased["why"][0]).startswith("It fails on male nurse images: right for 60.0%")
    legend = gate_legend(per_attribute)
    assert [r["label"] for r in legend].count("x (per protected attribute)") == 1
