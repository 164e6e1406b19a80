"""The report says the same thing everywhere (issue 19) and never an empty reason (issue 24), on
hand-made run folders whose fairness blocks come from audit.metrics.groups on generated data: one
cell, one interval; gaps and effects in points, shares and accuracies in percent, in sentences,
tables and limits; a failing gate that rounds to its limit shown with the digits that tell them
apart; every model's verdict and accuracy first. No training, no browser."""

from __future__ import annotations

import re

from audit.metrics.bootstrap import resample_weights
from audit.metrics.groups import group_metrics
from audit.report.context import build_context
from audit.report.fmt import ci
from audit.report.render import render_html
from audit.report.words import decisions, gate_figure, gate_sentence
from tests.test_groups import _synthetic
from tests.test_report_trust import CLASSES, _model, _text, _trust, fake_run


def _fairness_run(tmp_path, flips: float = 0.02):
    """Two models whose fairness blocks are measured on 400 generated images (sex, age and the
    intersection, 200 resamples), with a trust block (occlusion effects) and `flips` for 'a'."""
    table = _synthetic(400, 2, seed=1)
    fairness = group_metrics(
        table, ["sex", "age"], ["c0", "c1"], resample_weights(400, 200, 0), min_cell_size=10
    )
    models = {
        "a": _model(CLASSES, 0.5, 0.2, flips, 0.8)
        | {"fairness": fairness, "trust": _trust({"gradcam": 0.1})},
        "b": _model(CLASSES, 0.9, 0.1, 0.0, 0.9) | {"fairness": fairness},
    }
    return fake_run(tmp_path / "run", models, CLASSES), fairness


def _row(page: str, label: str) -> str:
    """The text of the gates-table row whose first cell is `label` (the first such row)."""
    return _text(page.split(f">{label}<", 1)[1].split("</tr>", 1)[0])


def test_one_cell_one_interval_in_the_summary_the_gates_and_the_worst_cells(tmp_path):
    run, fairness = _fairness_run(tmp_path)
    page = render_html(run)
    context = build_context(run)
    cells_table = page.split("a: the ", 1)[1].split("</table>", 1)[0]
    worst_sentences = [w for w in context["fairness"]["worst"] if w["model"] == "a"]
    found_in_table = 0
    for attribute, block in fairness.items():
        worst = block["worst_cell_accuracy"]
        own = block["per_cell"][worst["cell"]]
        shown = ci(own, 1)  # the cell's own interval, as the worst-cells table prints it
        assert ci(worst, 1) == shown
        # The gates table: the worst-group gate of this attribute.
        assert shown in _row(page, f"worst-group accuracy ({attribute})")
        # The worst-cells table, where this cell is among the rows shown.
        for row in re.findall(r"<tr[^>]*>(.*?)</tr>", cells_table, re.S):
            cells = [_text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            if cells[:2] == [attribute, worst["cell"]]:
                assert cells[3].startswith(shown), (attribute, cells)
                found_in_table += 1
        # The summary sentence of the worst intersection.
        for w in worst_sentences:
            if w["attribute"] == attribute:
                assert shown in _text(w["text"])
    assert found_in_table >= 1 and worst_sentences
    # Page one: a worst-group gate's sentence prints the same interval for the same cell.
    for gate in context["gates"]:
        if gate["model"] == "a" and gate["gate"] == "min_worst_group_accuracy":
            sentence = _text(gate_sentence(gate, context["model_info"]["a"], context["data"]))
            worst = fairness[gate["attribute"]]["worst_cell_accuracy"]
            assert f"right for {ci(worst, 1)} of them" in sentence, sentence


def test_points_for_gaps_and_effects_percent_for_shares_everywhere(tmp_path):
    run, _ = _fairness_run(tmp_path)
    page = render_html(run)
    context = build_context(run)
    points = {
        "max_accuracy_gap",
        "max_attention_gap_between_groups",
        "max_protected_occlusion_effect",
    }
    gates = [g for g in context["gates"] if g["model"] == "a"]
    assert {g["gate"] for g in gates} >= points | {"min_worst_group_accuracy", "max_flip_rate"}
    for gate in gates:
        row = _row(page, gate["label"])
        if gate["gate"] in points:
            interval = r" \[-?\d+\.\d to -?\d+\.\d\]" if gate.get("ci_low") is not None else ""
            assert re.search(r"-?\d+\.\d pts" + interval, row), row
            assert re.search(r"<= \d+ pts", row) and "%" not in row, row
        else:
            interval = r" \[\d+\.\d–\d+\.\d\]" if gate.get("ci_low") is not None else ""
            assert re.search(r"\d+\.\d%" + interval, row), row
            assert re.search(r"(<=|>=) \d+%", row) and "pts" not in row, row
    # The legend states each limit in the same unit.
    legend = {r["gate"]: r["origin"] for r in context["gate_legend"]}
    for key, origin in legend.items():
        assert origin.split(",")[0].endswith("pts" if key in points else "%"), origin
    # The sentences of page one, for every gate of model a.
    model = context["model_info"]["a"]
    for gate in gates:
        sentence = _text(gate_sentence(gate, model, context["data"]))
        limit = re.search(r"limit: at (least|most) ([\d.]+)( pts|%)", sentence)
        assert limit and (limit.group(3) == " pts") == (gate["gate"] in points), sentence
        if gate["gate"] in points:
            assert gate_figure(gate, interval=False) in sentence and "points" not in sentence
    # The performance table: the gap and the fairness differences in points.
    perf = page.split('id="performance"', 1)[1].split("</table>", 1)[0]
    for label in (
        "Accuracy gap between groups",
        "Demographic parity difference",
        "Equalized odds difference",
    ):
        values = _text(perf.split(f"<td>{label}</td>", 1)[1].split("</tr>", 1)[0])
        assert values.count("pts") == 2 and "%" not in values, values
    occlusion = page.split('class="dense occlusion"', 1)[1].split("</table>", 1)[0]
    assert "pts" in _text(occlusion)


def test_a_failing_gate_that_rounds_to_its_limit_shows_why(tmp_path):
    """A flip rate of 10.03% against a limit of 10%: '10.0% <= 10% FAIL' would read as a pass."""
    gate = {
        "gate": "max_flip_rate",
        "label": "counterfactual flip rate",
        "op": "<=",
        "threshold": 0.10,
        "value": 0.1003,
        "ci_low": 0.081,
        "ci_high": 0.1204,
        "passed": False,
        "status": "fail",
    }
    assert gate_figure(gate) == "10.03% [8.10–12.04]"
    assert gate_figure(gate | {"value": 0.0996, "passed": True, "status": "pass"}) == (
        "10.0% [8.1–12.0]"  # a pass needs no more digits
    )
    gap = gate | {"gate": "max_attention_gap_between_groups", "value": 0.10004}
    assert gate_figure(gap, interval=False) == "10.004 pts"
    run, _ = _fairness_run(tmp_path, flips=0.1003)
    page = render_html(run)
    row = _row(page, "counterfactual flip rate")
    assert "10.03%" in row and "<= 10%" in row and "FAIL" in row
    why = " ".join(_text(s) for s in build_context(run)["decisions"][0]["why"])
    if "flip" in why:  # told on page one: with the same digits
        assert "10.03% of the images (limit: at most 10%)" in why


def test_page_one_has_every_verdict_and_accuracy_and_no_empty_reason(tmp_path):
    run, _ = _fairness_run(tmp_path)
    context = build_context(run)
    page = render_html(run)
    summary = page.split('id="summary"', 1)[1].split('class="decision', 1)[0]
    for name, model in context["model_info"].items():
        row = _text(summary.split(f"{name}</td>", 1)[1].split("</tr>", 1)[0])
        verdict = "✓ PASS" if context["verdicts"][name] == "pass" else "✗ FAIL"
        assert verdict in row and ci(model["performance"]["accuracy"], 1) in row
        own = [g for g in context["gates"] if g["model"] == name]
        assert f"{sum(g['passed'] for g in own)} of {len(own)} gates pass" in row
    # "Why." (a bare link, read as an empty reason) is gone; every reason has words.
    first_page = _text(page.split('id="summary"', 1)[1].split("<h3>Gates</h3>", 1)[0])
    assert not re.search(r"\bWhy\s*\.", first_page)
    assert "How each was checked: section" in first_page
    for d in context["decisions"]:
        assert d["why"] and all(len(_text(s).split()) >= 5 for s in d["why"])
    # A model without gates, and a not-trusted gate whose note is empty, still get a reason.
    metrics = {
        "data": {"protected_regions": ["hair"], "core_regions": [], "splits": {}},
        "models": {"m": _model(CLASSES, 0.5, 0.4, 0.3, 0.8)},
        "gates": [],
        "verdicts": {"m": "fail"},
    }
    assert _text(decisions(metrics, {"m": {}}, {"m": {}})[0]["why"][0]) == (
        "No gate is configured for m, so nothing was checked."
    )
    untrusted = {
        "model": "m",
        "gate": "max_protected_attention",
        "label": "Grad-CAM share on protected regions",
        "op": "<=",
        "threshold": 0.3,
        "value": 0.2,
        "passed": False,
        "status": "not trusted",
        "note": "not trusted: ",
    }
    sentence = _text(gate_sentence(untrusted, metrics["models"]["m"], metrics["data"]))
    assert not sentence.endswith(": .") and "randomization test" in sentence
