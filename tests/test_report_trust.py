"""The report's trust, fairness, many-class and mitigation parts, on hand-made run folders (no
training, no browser): metrics.json written by hand, gates evaluated by audit.metrics.gates, and the
page rendered by audit.report.render. Every expected sentence or figure is derived here from the
figures the test gives, not copied from the report."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from markupsafe import escape

from audit.metrics.gates import evaluate_gates, verdicts
from audit.report import sections
from audit.report.context import build_context
from audit.report.render import render_html
from audit.report.words import decisions

METHODS = ["gradcam", "guided_gradcam"]


def _e(value, low=None, high=None, **extra):
    return {"value": value, "ci_low": low, "ci_high": high, **extra}


def _text(markup) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", str(markup)))


def _trust(final: dict[str, float], faithful: bool = True, effect: float = 0.02) -> dict:
    """A trust block: per method the randomization cascade ending at `final[method]`."""
    layers = ["fc", "features.4+features.5", "features.0+features.1"]
    methods = {}
    for method, rho in final.items():
        steps = [
            {"layer": layer, "spearman": _e(1 - (1 - rho) * (i + 1) / 3), "ssim": _e(0.5)}
            for i, layer in enumerate(layers)
        ]
        fractions = [0.0, 0.5, 1.0]
        methods[method] = {
            "randomization": {
                "steps": steps,
                "final_spearman": _e(rho, rho - 0.05, rho + 0.05),
                "threshold": 0.5,
                "passed": rho < 0.5,
            },
            "faithfulness": {
                "fractions": fractions,
                "deletion_auc": _e(0.2),
                "random_deletion_auc": _e(0.4),
                "deletion_minus_random": _e(-0.2, -0.25, -0.15),
                "insertion_auc": _e(0.7),
                "random_insertion_auc": _e(0.5),
                "insertion_minus_random": _e(0.2, 0.15, 0.25),
                "deletion_curve": [0.9, 0.2, 0.1],
                "random_deletion_curve": [0.9, 0.5, 0.1],
                "insertion_curve": [0.2, 0.8, 0.9],
                "random_insertion_curve": [0.2, 0.5, 0.9],
                "faithful": faithful,
            },
            "trusted": rho < 0.5,
        }
    entry = {
        "effect": _e(effect, effect - 0.01, effect + 0.01, n=8),
        "drop": _e(effect + 0.01),
        "control_drop": _e(0.01),
        "flip_rate": _e(0.25),
        "control_flip_rate": _e(0.0),
    }
    groups = {"female": entry, "male": entry}
    occlusion = {
        region: {
            "mean": {"overall": entry, "per_group": groups, "per_cell": {}},
            "blur": {"overall": entry, "per_group": groups, "per_cell": {}},
        }
        for region in ("protected", "core")
    }
    return {"n_images": 8, "n_faithfulness_images": 4, "methods": methods, "occlusion": occlusion}


def _model(classes: list[str], worst: float, share: float, flips: float, acc: float) -> dict:
    cells = {
        f"{c} / {g}": _e(worst if (c, g) == (classes[0], "female") else 0.97, n=20, too_few=False)
        for c in classes
        for g in ("female", "male")
    }
    per_class = {c: _e(0.9 - 0.01 * i, n=40, too_few=False) for i, c in enumerate(classes)}
    performance = {
        "accuracy": _e(acc, acc - 0.02, acc + 0.02),
        "worst_group_accuracy": _e(worst, cell=f"{classes[0]} / female"),
        "accuracy_gap": _e(0.02),
        "demographic_parity_difference": _e(0.1),
        "equalized_odds_difference": _e(0.1),
        "per_class": per_class,
        "classes_worst_first": sorted(per_class, key=lambda c: per_class[c]["value"]),
        "per_group": {"female": _e(0.8, n=80), "male": _e(0.95, n=80)},
        "per_cell": cells,
        "top_confusions": [
            {"true": classes[1], "predicted": classes[0], "count": 7, "share": 0.175},
            {"true": classes[0], "predicted": classes[-1], "count": 3, "share": 0.075},
        ],
    }
    if len(classes) <= 20:
        performance["confusion_matrix"] = {
            "labels": classes,
            "counts": [[1 if i != j else 9 for j in classes] for i in classes],
        }
    regions = {"protected": {"share": _e(share)}, "core": {"share": _e(0.05)}}
    return {
        "arch": "small_cnn",
        "source": "trained",
        "train_split": "train",
        "n_train": 100,
        "epochs": 1,
        "layer": "features",
        "saved_checkpoint": "models/m.pt",
        "saved_checkpoint_sha256": "0" * 64,
        "performance": performance,
        "attention": {
            "gradcam": {
                "n_images": 4,
                "overall": regions,
                "per_group": {"female": regions, "male": regions},
                "per_class": {},
                "per_cell": {},
            }
        },
        "counterfactual": {
            "flip_rate": _e(flips),
            "per_group": {"female": _e(flips), "male": _e(flips)},
            "n": 4,
            "from_twins": 4,
        },
    }


def _fairness(too_few_cell: str | None = None) -> dict:
    """One attribute 'sex' whose cells are judged, except `too_few_cell` (3 images, 0%)."""
    cells = {}
    for label, group, value in (
        ("doctor", "female", 0.5),
        ("doctor", "male", 0.9),
        ("nurse", "female", 0.95),
        ("nurse", "male", 0.8),
    ):
        name = f"{label} / {group}"
        few = name == too_few_cell
        cells[name] = _e(
            0.0 if few else value,
            0.0 if few else value - 0.1,
            0.0 if few else value + 0.05,
            n=3 if few else 30,
            too_few=few,
            **{"class": label, "group": group},
        )
    judged = {k: v for k, v in cells.items() if not v["too_few"]}
    worst = min(judged, key=lambda k: judged[k]["value"])
    return {
        "sex": {
            "kind": "attribute",
            "attributes": ["sex"],
            "groups": ["female", "male"],
            "min_cell_size": 5,
            "per_group": {"female": _e(0.7, n=33), "male": _e(0.85, n=60)},
            "per_cell": cells,
            "worst_group_accuracy": _e(0.7, group="female"),
            "worst_cell_accuracy": _e(judged[worst]["value"], cell=worst),
            "accuracy_gap": _e(0.15) | {"high": "male", "low": "female"},
            "skipped": {"groups": [], "cells": int(too_few_cell is not None)},
            "attention": {
                "gradcam": {
                    "protected": {
                        "per_group": {
                            "female": _e(0.3, 0.28, 0.32, n=33),
                            "male": _e(0.1, 0.09, 0.11, n=60),
                        },
                        "gap": _e(0.2, 0.17, 0.23) | {"high": "female", "low": "male"},
                    }
                }
            },
            "attention_gap": _e(0.2, 0.17, 0.23)
            | {"high": "female", "low": "male", "region": "protected"},
        }
    }


def fake_run(root: Path, models: dict[str, dict], classes: list[str], gates=None) -> Path:
    """A run folder with hand-made metrics (gates evaluated by audit.metrics.gates) and a samples
    table of four images per model (one mistake each), no overlays."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(models)
    metrics = {
        "schema_version": 1,
        "seed": 0,
        "bootstrap": 10,
        "data": {
            "manifest": "manifest.csv",
            "eval_split": "test",
            "classes": classes,
            "groups": ["female", "male"],
            "regions": ["hair", "face", "stethoscope"],
            "protected_regions": ["hair", "face"],
            "core_regions": ["stethoscope"],
            "region_area": {"protected": 0.1, "core": 0.01},
            "splits": {
                "train": {
                    "cells": {f"{classes[0]} / female": 5, f"{classes[0]} / male": 20},
                    "group_share_per_class": {classes[0]: {"female": 0.2, "male": 0.8}},
                }
            },
        },
        "gallery": [0],
        "models": models,
        "comparisons": [
            {
                "a": names[0],
                "b": n,
                "attention_share_difference": {"protected": _e(-0.1, -0.12, -0.08)},
                "accuracy_difference": _e(0.05, 0.01, 0.09),
                "worst_group_accuracy_difference": _e(0.3, 0.2, 0.4),
                "flip_rate_difference": _e(-0.2, -0.25, -0.15),
                "occlusion_difference": {
                    "protected": {
                        "mean": {
                            "effect_difference": _e(-0.123, -0.15, -0.1),
                            "flip_rate_difference": _e(-0.1, -0.2, 0.0),
                        }
                    }
                },
            }
            for n in names[1:]
        ],
    }
    metrics["gates"] = evaluate_gates(metrics, gates)
    metrics["verdicts"] = verdicts(metrics["gates"], names)
    (root / "metrics.json").write_text(json.dumps(metrics))
    (root / "config.json").write_text(json.dumps({"title": "T", "explain": {"methods": METHODS}}))
    (root / "run.json").write_text("{}")
    rows = []
    for n in names:
        for i in range(4):
            label = classes[i % 2]
            rows.append(
                {
                    "model": n,
                    "image": f"images/{i}.png",
                    "label": label,
                    "group": ["female", "male"][i // 2],
                    "split": "test",
                    "prediction": classes[1] if i == 0 else label,
                    "confidence": 0.9,
                    "correct": i != 0,
                    "counterfactual_prediction": label,
                    "flipped": False,
                }
            )
    pd.DataFrame(rows).to_csv(root / "samples.csv", index=False)
    return root


CLASSES = ["doctor", "nurse"]


def test_a_not_trusted_gate_shows_not_trusted_and_why(tmp_path):
    # gradcam fails the randomization test for "biased" (0.93 >= 0.5), passes for "fair".
    biased = _model(CLASSES, 0.5, 0.4, 0.3, 0.8) | {
        "trust": _trust({"gradcam": 0.93, "guided_gradcam": 0.2})
    }
    fair = _model(CLASSES, 0.95, 0.1, 0.02, 0.95) | {
        "trust": _trust({"gradcam": 0.1, "guided_gradcam": 0.8}, faithful=False)
    }
    run = fake_run(tmp_path / "run", {"biased": biased, "fair": fair}, CLASSES)
    metrics = json.loads((run / "metrics.json").read_text())
    untrusted = [g for g in metrics["gates"] if g["status"] == "not trusted"]
    # gates.py marks the Grad-CAM gates of "biased" only (attention share, attention gap).
    assert untrusted and {g["model"] for g in untrusted} == {"biased"}
    page = render_html(run)
    text = _text(page)
    # The gates table: the row's badge reads NOT TRUSTED and the note (gates.py's reason) is shown.
    for gate in untrusted:
        row = page.split(f">{str(escape(gate['label']))}<", 1)[1].split("</tr>", 1)[0]
        assert "NOT TRUSTED" in row and "PASS" not in row and "FAIL" not in row
        assert str(escape(gate["note"])) in row
    assert "rank correlation 0.93 after the full cascade" in text
    # Page one: the headline counts the gate apart, and the reason is told.
    context = build_context(run)
    first = next(d for d in context["decisions"] if d["model"] == "biased")
    failing = [g for g in metrics["gates"] if g["model"] == "biased" and g["status"] == "fail"]
    own = [g for g in metrics["gates"] if g["model"] == "biased"]
    expected = (
        f"Do not ship biased: it fails {len(failing)} of {len(own)} gates, and "
        f"{len(untrusted)} more cannot be trusted."
        if failing
        else f"Do not ship biased: {len(untrusted)} of {len(own)} gates cannot be trusted"
    )
    assert _text(first["headline"]).startswith(expected)
    # Which methods can be believed, one sentence per model, from the trust blocks.
    assert _text(first["believe"]) == (
        "For biased, Guided Grad-CAM can be believed (its maps depend on the weights; deletion "
        "and insertion beat a random order); Grad-CAM cannot: its maps barely change when the "
        "weights are randomized (rank correlation 0.93)."
    )
    second = next(d for d in context["decisions"] if d["model"] == "fair")
    # fair's Grad-CAM passes the sanity check but not faithfulness: the two said together.
    assert _text(second["believe"]).startswith(
        "For fair, use Grad-CAM with care: its maps depend on the weights (the sanity check "
        "passes), but deletion and insertion do not clearly beat a random order (faithfulness is "
        "not shown); Guided Grad-CAM cannot"
    )
    assert "not trusted" in _text(first["looks"]).lower()
    # The trust table: one row per model x method with its verdict.
    rows = context["trust"]["rows"]
    assert [(r["model"], r["method"], r["trusted"]) for r in rows] == [
        ("biased", "Grad-CAM", False),
        ("biased", "Guided Grad-CAM", True),
        ("fair", "Grad-CAM", True),
        ("fair", "Guided Grad-CAM", False),
    ]
    assert _text(rows[0]["rho"]) == "0.93 [0.88 to 0.98]"
    assert [r["verdict"] for r in rows] == [
        "not trusted",
        "trusted",
        "use with care",
        "not trusted",
    ]
    assert "does not clearly beat a random order: use with care" in rows[2]["short"]
    assert "does not clearly beat a random order" in rows[3]["short"]
    care = page.split("fair · Grad-CAM</td>", 1)[1].split("</tr>", 1)[0]
    assert "⚠ USE WITH CARE" in care and "✓ TRUSTED" not in care
    # The section comes before the attention section, and the TOC follows the numbering.
    assert page.index('id="trust"') < page.index('id="attention"')
    assert "4. Can these explanations be trusted?" in text and "5. Attention on regions" in text
    # Gallery tiles of a failing method carry the warning: biased · gradcam, fair · guided_gradcam.
    columns = context["gallery"]["columns"]
    assert [c for c in columns if "not trusted" in c] == [
        "biased · Grad-CAM (⚠ not trusted)",
        "fair · Guided Grad-CAM (⚠ not trusted)",
    ]
    gallery = page.split('id="gallery"', 1)[1].split('id="misclassified"', 1)[0]
    assert gallery.count('class="tile correct untrusted"') + gallery.count(
        'class="tile wrong untrusted"'
    ) == 2 * len(metrics["gallery"])
    # Occlusion: effects with CIs per model and group, and the paired difference (b minus a).
    occlusion = context["trust"]["occlusion"]
    assert len(occlusion["rows"]) == 2 * 2 * 2  # models x (protected, core) x (mean, blur)
    assert _text(occlusion["rows"][0]["effect"]) == "2.0 pts [1.0 to 3.0]"  # an effect: points
    assert "-12.3 pts [-15.0 to -10.0]" in text


def test_many_classes_show_the_top_confusions_and_the_worst_cells(tmp_path):
    classes = [f"class{i:02d}" for i in range(30)]
    model = _model(classes, 0.4, 0.1, 0.0, 0.9)
    assert "confusion_matrix" not in model["performance"]  # above 20 classes, as the runner does
    run = fake_run(
        tmp_path / "run", {"m": model, "n": _model(classes, 0.6, 0.1, 0.0, 0.9)}, classes
    )
    metrics = json.loads((run / "metrics.json").read_text())
    counts = {f"{c} / {g}": 10 + i for i, c in enumerate(classes) for g in ("female", "male")}
    shares = {c: {"female": 0.5 + i / 100, "male": 0.5 - i / 100} for i, c in enumerate(classes)}
    metrics["data"]["splits"] = {
        "train": {"cells": counts, "group_share_per_class": shares},
        "test": {"cells": counts, "group_share_per_class": shares},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    page = render_html(run)
    text = _text(page)
    assert "Confusion matrix" not in text and "Most confused pairs" in text
    assert "30 classes: too many for a confusion matrix" in text
    first = model["performance"]["top_confusions"][0]
    assert re.search(
        rf'<td data-label="True class">{first["true"]}</td><td data-label="Predicted">'
        rf'{first["predicted"]}</td><td data-label="Images">7</td><td data-label="Share">17.5%</td>',
        page,
    )
    # The cells: 60, the worst 12 shown worst first, the rest counted.
    context = build_context(run)
    shown = [r["cell"] for r in context["per_cell_rows"]]
    assert len(shown) == 12 and shown[0] == "class00 / female"
    assert context["cells_more"] == 60 - 12
    assert "the 12 worst shown, 48 more" in text
    # The data: 60 cells per split are summed per group (by hand: sum of 10 + i over 30 classes).
    assert context["all_cells"] == ["female", "male"]
    assert context["split_cells"]["train"] == {"female": 300 + 435, "male": 300 + 435}
    assert "Images per group, summed over the 30 classes" in text
    assert "and 10 more" in text  # the class list is cut at 20
    # The bias chart keeps the models' training split and its most unequal classes.
    assert context["bias_trimmed"] and "most unequal" in text
    # The classes, worst first, capped.
    worst = context["classes"]["models"][0]["worst_classes"]
    assert [w["cls"] for w in worst] == model["performance"]["classes_worst_first"][:10]


def test_a_cell_too_few_to_judge_is_marked(tmp_path):
    biased = _model(CLASSES, 0.5, 0.4, 0.3, 0.8) | {"fairness": _fairness("nurse / male")}
    fair = _model(CLASSES, 0.95, 0.1, 0.02, 0.95) | {"fairness": _fairness(None)}
    run = fake_run(tmp_path / "run", {"biased": biased, "fair": fair}, CLASSES)
    (run / "per_cell.csv").write_text("model,attribute\n")
    page = render_html(run)
    context = build_context(run)
    cells = context["fairness"]["cells"]["biased"]
    # Judged cells worst first (0.5, 0.9, 0.95), then the too-few one, marked.
    assert [(r["cell"], r["too_few"]) for r in cells["rows"]] == [
        ("doctor / female", False),
        ("doctor / male", False),
        ("nurse / female", False),
        ("nurse / male", True),
    ]
    table = page.split("biased: the 4 worst cells of 4", 1)[1].split("</table>", 1)[0]
    row = table.split("nurse / male", 1)[1].split("</tr>", 1)[0]
    assert "too few to judge" in row
    assert "too few to judge" not in table.split("nurse / male", 1)[0]
    assert '<a href="per_cell.csv">' in page
    # The gate row of the attribute carries gates.py's note about the skipped cell.
    metrics = json.loads((run / "metrics.json").read_text())
    noted = [g for g in metrics["gates"] if g["model"] == "biased" and g.get("note")]
    assert noted and all(str(escape(g["note"])) in page for g in noted)
    # Attention by group, per attribute, with the gap.
    attention = context["fairness"]["attention"]["biased"][0]
    assert attention["attribute"] == "sex"
    assert _text(attention["gap"]) == "20.0 pts [17.0 to 23.0]"  # a gap: in points, unsigned
    assert "the worst attribute is doctor / female in “sex”, right 50.0%" in _text(page)


def _with_mitigation(model: dict, name: str | None, **params) -> dict:
    """As the runner writes it: MitigationConfig.resolved() merged into the model's entry."""
    return model | {"mitigation": name or "none", **params}


@pytest.mark.parametrize("some_pass", [True, False])
def test_mitigations_are_compared_and_the_best_passing_one_named(tmp_path, some_pass):
    good = 0.95 if some_pass else 0.5  # worst-group accuracy of the two candidates
    specs = {
        "plain": (None, 0.3, 0.4, 0.3, 0.80),
        "dro": ("group_dro", good, 0.1, 0.02, 0.90),
        "jtt": ("jtt", good, 0.1, 0.02, 0.93),
        "rrr": ("right_reasons", 0.6, 0.1, 0.02, 0.95),
    }
    models = {
        n: _with_mitigation(_model(CLASSES, w, s, f, a), m, **({"dro_eta": 0.1} if m else {}))
        for n, (m, w, s, f, a) in specs.items()
    }
    for m in models.values():
        m["trust"] = _trust({"gradcam": 0.1})
    gates = {"min_worst_group_accuracy": 0.85, "max_flip_rate": 0.1}
    run = fake_run(tmp_path / "run", models, CLASSES, gates=gates)
    metrics = json.loads((run / "metrics.json").read_text())
    passing = [n for n, v in metrics["verdicts"].items() if v == "pass"]
    context = build_context(run)
    summary = _text(context["mitigations"]["summary"])
    if some_pass:
        best = max(passing, key=lambda n: specs[n][4])  # by hand: jtt, 93%
        assert best == "jtt"
        assert summary == (
            "Of the 3 mitigations tried, jtt (model jtt) passes every gate with the highest "
            "accuracy: 93.0% [91.0–95.0]."
        )
    else:
        assert passing == []
        assert summary.startswith("None of the 3 mitigations tried passes every gate")
        assert "right_reasons's (model rrr): 60.0%" in summary
    page = render_html(run)
    text = _text(page)
    assert summary in text  # on page one and in the section
    assert text.index(summary) < text.index("Mitigations compared")  # page one first
    table = page.split('class="dense mitigations"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 1 + len(models)  # header + one row per model
    assert "group_dro" in table and "dro_eta = 0.1" in table
    diffs = context["mitigations"]["differences"]
    assert [d["model"] for d in diffs] == ["dro", "jtt", "rrr"]
    assert "2. Mitigations compared" in text and "3. Data" in text


def test_no_mitigation_no_trust_shows_neither(tmp_path):
    plain = _with_mitigation(_model(CLASSES, 0.5, 0.4, 0.3, 0.8), None)  # "none": plain training
    run = fake_run(
        tmp_path / "run", {"a": plain, "b": _model(CLASSES, 0.9, 0.1, 0.0, 0.9)}, CLASSES
    )
    context = build_context(run)
    assert context["mitigations"] is None and context["trust"] is None
    assert all(d["believe"] is None for d in context["decisions"])
    text = _text(render_html(run))
    assert "Mitigations compared" not in text and "Can these explanations" not in text
    assert "4. Attention on regions" in text


def test_trust_sentence_and_untrusted_methods_by_hand():
    model = {"trust": _trust({"gradcam": 0.2, "guided_gradcam": 0.7, "saliency": 0.1})}
    model["trust"]["methods"]["saliency"]["faithfulness"]["faithful"] = False
    assert list(sections.untrusted_methods(model)) == ["guided_gradcam"]
    assert _text(sections.trust_sentence("m", model)) == (
        "For m, Grad-CAM can be believed (its maps depend on the weights; deletion and insertion "
        "beat a random order); use saliency with care: its maps depend on the weights (the sanity "
        "check passes), but deletion and insertion do not clearly beat a random order "
        "(faithfulness is not shown); Guided Grad-CAM cannot: its maps barely change when the "
        "weights are randomized (rank correlation 0.70)."
    )
    verdicts = {m: sections.trust_verdict(e) for m, e in model["trust"]["methods"].items()}
    assert verdicts == {
        "gradcam": "trusted",
        "guided_gradcam": "not trusted",
        "saliency": "use with care",
    }
    assert sections.trust_sentence("m", {}) is None
    # Constant maps after randomization: no correlation, not trusted, said so (no crash).
    flat = {"trust": _trust({"gradcam": 0.9})}
    flat["trust"]["methods"]["gradcam"]["randomization"]["final_spearman"] = _e(None)
    flat["trust"]["methods"]["gradcam"]["randomization"]["passed"] = None
    flat["trust"]["methods"]["gradcam"]["trusted"] = False
    assert _text(sections.trust_sentence("f", flat)) == (
        "For f, Grad-CAM cannot: the randomization test could not be made."
    )
    entry = flat["trust"]["methods"]["gradcam"]
    assert sections.short_reason(entry).startswith("maps constant after randomization")


def test_names_in_the_new_sections_are_escaped(tmp_path):
    evil = "<i>x</i>"
    biased = _model(CLASSES, 0.5, 0.4, 0.3, 0.8) | {"trust": _trust({"gradcam": 0.9})}
    biased = _with_mitigation(biased, "<b>dro</b>")
    run = fake_run(
        tmp_path / "run", {evil: biased, "b": _model(CLASSES, 0.9, 0.1, 0, 0.9)}, CLASSES
    )
    page = render_html(run)
    assert evil not in page and "<b>dro</b>" not in page
    assert "&lt;i&gt;x&lt;/i&gt;" in page and "&lt;b&gt;dro&lt;/b&gt;" in page


def test_decisions_of_old_gate_rows_without_status_still_work():
    """Gate rows of earlier runs carry no status: read from `passed`."""
    model = _model(CLASSES, 0.5, 0.4, 0.3, 0.8)
    metrics = {
        "data": {"protected_regions": ["hair"], "core_regions": [], "splits": {}},
        "models": {"m": model},
        "gates": [
            {
                "model": "m",
                "gate": "max_flip_rate",
                "label": "flips",
                "op": "<=",
                "threshold": 0.1,
                "value": 0.3,
                "passed": False,
            }
        ],
        "verdicts": {"m": "fail"},
    }
    d = decisions(metrics, {"m": {}}, {"m": {}})[0]
    assert _text(d["headline"]) == "Do not ship m: it fails 1 of 1 gates."


def test_the_occlusion_gate_is_told_in_words():
    from audit.report.words import gate_sentence

    gate = {
        "gate": "max_protected_occlusion_effect",
        "label": "drop in confidence when the protected regions are hidden, beyond a control",
        "op": "<=",
        "threshold": 0.1,
        "value": 0.234,
        "passed": False,
        "status": "fail",
    }
    data = {"protected_regions": ["hair", "face"], "core_regions": []}
    assert _text(gate_sentence(gate, {}, data)) == (
        "its decision uses the protected attribute's pixels: hiding hair + face (filled with the "
        "image's mean colour) lowers its confidence by 23.4 pts more than hiding a patch of "
        "the same shape elsewhere (limit: at most 10 pts)."
    )
