"""Validity checks (issue 24): misconfigured preprocessing, chance-level models and substituted
figures are flagged, change the gates and the decision, and are named in metrics.json, run.log
and the report."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from audit.cli import main
from audit.config import ConfigError, from_dict
from audit.data.preprocess import resolve_preprocess
from audit.metrics import validity as v
from audit.metrics.gates import evaluate_gates, verdicts
from audit.models.io import save_checkpoint
from audit.models.sources import parse_arch
from audit.pipeline.obtain import recorded_preprocess
from audit.report.validity_view import amend_decisions, validity_context
from audit.report.words import decisions
from tests.conftest import write_config
from tests.test_report_decision import _metrics

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


# -- preprocessing: the first BatchNorm's statistics ------------------------------------------
def _images(n: int = 48, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images in [0, 1] (blurred noise, so convolutions see structure)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand((n, 3, size // 4, size // 4), generator=g)
    return nn.functional.interpolate(noise, size=(size, size), mode="bilinear").clamp(0, 1)


def _bn_model(images: torch.Tensor, preprocess) -> nn.Module:
    """A conv + BatchNorm model whose running statistics are those of `images` as `preprocess`
    feeds them (cumulative average, as training to convergence would leave them)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    model.train()
    with torch.no_grad(), preprocess.attach(model):
        for batch in images.split(16):
            model(batch)
    return model.eval()


def test_norm_statistics_are_the_first_batchnorms_input_statistics():
    images = _images()
    identity = resolve_preprocess({}, nn.Conv2d(3, 1, 1), "python", 32)
    model = _bn_model(images, identity)
    stats = v.norm_statistics(model, images)
    conv_out = model[0](images).detach().double()  # independent: the BatchNorm's input itself
    assert stats["layer"] == "1" and stats["n_images"] == len(images)
    np.testing.assert_allclose(stats["batch_mean"], conv_out.mean(dim=(0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(
        stats["batch_var"], conv_out.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4
    )
    # norm_mismatch: RMS over channels, by hand
    toy = {
        "batch_mean": np.array([1.0, 0.0]),
        "batch_var": np.array([4.0, 1.0]) - v.NORM_EPS,
        "running_mean": np.array([0.0, 0.0]),
        "running_var": np.array([1.0, 1.0]) - v.NORM_EPS,
    }
    found = v.norm_mismatch(toy)
    assert found["shift"] == pytest.approx(np.sqrt(0.5))
    assert found["scale"] == pytest.approx(np.sqrt(np.log(2.0) ** 2 / 2))
    assert v.norm_statistics(nn.Sequential(nn.Conv2d(3, 2, 1), nn.LayerNorm(32)), images) is None


def test_forgotten_normalisation_is_flagged_and_the_right_one_is_not():
    images = _images()
    probe = nn.Conv2d(3, 1, 1)
    trained_with = resolve_preprocess(IMAGENET, probe, "python", 32)
    forgotten = resolve_preprocess({}, probe, "python", 32)  # mean 0, std 1
    model = _bn_model(images, trained_with)
    held_out = _images(seed=1)
    with trained_with.attach(model):
        assert v.check_norm_statistics("m", v.norm_statistics(model, held_out)) is None
    with forgotten.attach(model):
        found = v.check_norm_statistics("m", v.norm_statistics(model, held_out))
    assert found is not None and found["severity"] == "invalid"
    assert found["gate_status"] == v.NOT_JUDGED
    assert "not normalised as in training" in found["message"]
    assert found["values"]["scale"] > v.NORM_SCALE_LIMIT or found["values"]["shift"] > 1


# -- preprocessing: collapsed predictions --------------------------------------------------------
def test_predictions_collapsed_onto_one_class_are_flagged():
    labels = ["doctor"] * 50 + ["nurse"] * 50
    found = v.check_collapse("m", labels, ["doctor"] * 100)
    assert found["values"] == {"class": "doctor", "share": 1.0, "label_share": 0.5}
    assert "100.0% of the 100 images" in found["message"]
    assert v.check_collapse("m", labels, labels) is None
    # a data set that is 96% one class, predicted 100% that class, is not a collapse
    assert v.check_collapse("m", ["a"] * 96 + ["b"] * 4, ["a"] * 100) is None


# -- preprocessing: a model with its own data config ---------------------------------------------
def _timm_frames(user: dict) -> tuple[dict, dict]:
    """(the audit's frame with `user`'s keys, timm's own data config) for timm:resnet18."""
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=2)
    source = parse_arch("timm:resnet18")
    audit = resolve_preprocess(user, model, source, 64).to_dict()
    own = resolve_preprocess(None, model, source, 64).to_dict()
    return audit, own


def test_squash_instead_of_crop_is_flagged_against_timms_config():
    audit, own = _timm_frames({"mode": "squash"})
    found = v.check_frame("m", audit, own, "timm's own data config for timm:resnet18")
    assert set(found["values"]) == {"mode"}
    assert found["values"]["mode"] == {"audit": "squash", "own": "crop"}
    assert "mode squash (its own: crop)" in found["message"]
    assert v.check_frame("m", *_timm_frames({}), "timm") is None


def test_forgotten_normalisation_and_a_wrong_frame_are_flagged_against_timms_config():
    audit, own = _timm_frames({"mean": [0.0] * 3, "std": [1.0] * 3})
    assert set(v.check_frame("m", audit, own, "timm")["values"]) == {"mean", "std"}
    audit, own = _timm_frames({"resize": 160, "crop": 160})
    found = v.check_frame("m", audit, own, "timm")
    assert found["values"]["frame"] == {"audit": [160, 160], "own": [224, 224]}
    assert {"resize", "crop"} <= set(found["values"])


def test_the_frame_a_checkpoint_records_is_compared(tmp_path):
    """No [model.preprocess] table: the audit's 224 px frame against the 160 px one the
    checkpoint was trained with (recorded by this tool when it trained the model)."""
    audit, own = _timm_frames({})
    recorded, _ = _timm_frames({"resize": 182, "crop": 160})
    path = tmp_path / "m.pt"
    save_checkpoint(
        nn.Linear(2, 2),
        path,
        arch="timm:resnet18",
        classes=["a", "b"],
        meta={"preprocess": recorded},
    )
    assert recorded_preprocess(path) == recorded
    found = v.check_frame("m", audit, recorded_preprocess(path), "the checkpoint's record")
    assert found["values"]["frame"] == {"audit": [224, 224], "own": [160, 160]}
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    assert recorded_preprocess(tmp_path / "plain.pt") is None


# -- a model at chance ------------------------------------------------------------------------
def test_a_model_whose_accuracy_interval_reaches_chance_is_too_weak_to_judge():
    labels = ["doctor"] * 400 + ["nurse"] * 400
    chance = v.chance_accuracy(labels)
    assert chance == 0.5 and v.chance_accuracy(["a"] * 3 + ["b"]) == 0.75
    weak = {"value": 0.516, "ci_low": 0.481, "ci_high": 0.55}  # the model
    found = v.check_too_weak("m", weak, chance)
    assert found["gate_status"] == v.TOO_WEAK
    assert "51.6% [48.1%-55.0%] does not clear chance (50.0%" in found["message"]
    good = {"value": 0.9, "ci_low": 0.88, "ci_high": 0.92}
    assert v.check_too_weak("m", good, chance) is None
    found = v.check_too_weak("m", good, chance, floor=0.95)  # a stated floor
    assert "the stated floor 95.0%" in found["message"]


def _weak_metrics() -> dict:
    metrics = _metrics(protected_share=0.5, area=0.1, worst=0.3, flips=0.2)
    for model in metrics["models"].values():
        model["performance"]["accuracy"] = {"value": 0.516, "ci_low": 0.481, "ci_high": 0.55}
    metrics["gates"] = evaluate_gates(metrics, None)
    return metrics


def test_too_weak_changes_the_gates_and_the_decision():
    metrics = _weak_metrics()
    labels = np.array(["doctor", "nurse"] * 50)
    probes = {n: {"labels": labels, "predictions": labels} for n in metrics["models"]}
    findings = v.validity_findings(metrics, probes, trust_enabled=True)
    assert {f["check"] for f in findings} == {"too_weak"}
    gates = v.apply_to_gates(metrics["gates"], findings)
    assert {g["status"] for g in gates} == {v.TOO_WEAK} and not any(g["passed"] for g in gates)
    metrics |= {"gates": gates, "verdicts": verdicts(gates, list(metrics["models"]))}
    metrics["validity"] = {
        "findings": findings,
        "models": {n: v.model_status(findings, n) for n in metrics["models"]},
    }
    before = decisions(metrics, {}, {})
    steps = " ".join(str(s) for d in before for s in d["next"])
    assert "Rebalance the training split" in steps  # the group step a weak model must not get
    after = amend_decisions(before, metrics)
    for d in after:
        assert "too weak to judge" in d["headline"] and not d["ship"]
        assert "does not clear chance" in str(d["why"][0])
        text = " ".join(str(s) for s in d["next"])
        assert "Collect more" not in text and "Rebalance" not in text
        assert str(d["looks"]).startswith("Not evidence")
    assert validity_context(metrics)["invalid"] == list(metrics["models"])


# -- substitutions ------------------------------------------------------------------------------
def test_substitutions_are_named_with_their_counts():
    cf = v.check_counterfactuals("m", {"n": 80, "from_twins": 0})
    assert cf["gates"] == ["max_flip_rate"] and "80 of 80 counterfactuals" in cf["message"]
    assert v.check_counterfactuals("m", {"n": 80, "from_twins": 80}) is None
    trust = {"occlusion": {"no_control": {"protected": 3}, "protected": {}}}
    found = v.check_occlusion_control("m", trust, ["hair", "face", "clothes"])
    assert [f["check"] for f in found] == ["occlusion_control_moved", "occlusion_control_missing"]
    assert "3 images for protected" in found[1]["message"]
    assert v.check_occlusion_control("m", {"occlusion": {"no_control": {}}}, ["person"]) == []
    shares = {
        "share:gradcam:hair": np.array([0.1, np.nan, 0.2, np.nan]),
        "share:gradcam:face": np.array([0.3, np.nan, np.nan, np.nan]),
    }
    assert v.empty_maps(shares) == 2  # rows 1 and 3: no region has a share
    maps = v.check_maps_left_out("m", "gradcam", 800, 102)
    assert "102 of 800 gradcam maps" in maps["message"] and "over 698 images" in maps["message"]
    assert v.check_maps_left_out("m", "gradcam", 800, 0) is None


def test_a_switched_off_check_is_skipped_not_failed():
    metrics = _metrics(protected_share=0.1, area=0.1, worst=0.95, flips=0.0)
    gates = evaluate_gates(metrics, None)  # no trust block: the occlusion gate cannot be measured
    assert all(not g["passed"] for g in gates if g["gate"] == "max_protected_occlusion_effect")
    findings = v.check_switched_off(list(metrics["models"]), False, gates)
    assert (
        len(findings) == len(metrics["models"]) and v.check_switched_off(["x"], True, gates) == []
    )
    applied = v.apply_to_gates(gates, findings)
    occlusion = [g for g in applied if g["gate"] == "max_protected_occlusion_effect"]
    assert occlusion and all(g["status"] == v.SKIPPED and g["passed"] for g in occlusion)
    others = [(g["passed"], g.get("status")) for g in applied if g not in occlusion]
    assert others == [
        (g["passed"], g.get("status")) for g in gates if g["gate"] != occlusion[0]["gate"]
    ]
    assert (
        verdicts(applied, ["fair"])["fair"]
        == verdicts([g for g in gates if g["gate"] != "max_protected_occlusion_effect"], ["fair"])[
            "fair"
        ]
    )


# -- end to end: metrics.json, run.log and the report ----------------------------------------------
def _stripped_dataset(small_dataset: Path, root: Path) -> Path:
    """A copy of the small data set without twins and without the person box."""
    shutil.copytree(small_dataset.parent, root)
    table = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    drop = [c for c in table.columns if c.startswith("twin") or c == "box:person"]
    table.drop(columns=drop).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&#39;", "'")


def test_a_run_names_each_finding_in_metrics_the_log_and_the_report(small_dataset, tmp_path):
    manifest = _stripped_dataset(small_dataset, tmp_path / "data")
    config = write_config(
        tmp_path / "audit.toml",
        manifest,
        model=[{"name": "weak", "train_split": "train_biased", "epochs": 1}],
        explain={"methods": ["gradcam"], "samples_per_cell": 1},
        trust={"samples": 16, "faithfulness_samples": 4, "steps": 4},
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(config), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    findings = metrics["validity"]["findings"]
    checks = {f["check"] for f in findings}
    assert {"mean_fill_counterfactuals", "occlusion_control_moved"} <= checks
    accuracy = metrics["models"]["weak"]["performance"]["accuracy"]
    if accuracy["ci_low"] <= 0.5:  # one epoch on 200 images: at chance on this seed
        assert "too_weak" in checks
        assert metrics["validity"]["models"]["weak"] in (v.TOO_WEAK, v.NOT_JUDGED)
    flip = next(g for g in metrics["gates"] if g["gate"] == "max_flip_rate")
    assert any("mean colour" in s for s in flip["substitutions"])
    log = (out / "run.log").read_text()
    for f in findings:
        assert f"validity {f['severity'].upper()}: {f['message']}" in log
    page = _text((out / "report.html").read_text())
    start = page.index("Validity: can these figures be read?")
    summary = page[start : page.index("Contents", start)]  # the first section, up to its contents
    for f in findings:
        assert f["message"] in summary, f["check"]
    counterfactuals = page[page.index("Counterfactuals Each evaluated") :]
    assert next(f for f in findings if f["check"] == "mean_fill_counterfactuals")["message"] in (
        counterfactuals
    )
    occlusion = page[page.index("Occlusion: does the model use the region?") :]
    moved = next(f for f in findings if f["check"] == "occlusion_control_moved")
    assert moved["message"] in occlusion
    # The same run with the trust checks switched off, as `audit check` and the report read it:
    # the occlusion gate is skipped, not failed.
    metrics = json.loads((out / "metrics.json").read_text())
    del metrics["models"]["weak"]["trust"]
    gates = evaluate_gates(metrics, json.loads((out / "config.json").read_text())["gates"])
    metrics["validity"]["findings"] = [
        f
        for f in findings
        if f["check"] not in ("occlusion_control_moved", "occlusion_control_missing")
    ] + v.check_switched_off(["weak"], False, gates)
    metrics["gates"] = v.apply_to_gates(gates, metrics["validity"]["findings"])
    (out / "metrics.json").write_text(json.dumps(metrics))
    result = CliRunner().invoke(main, ["check", str(out)])
    assert result.exit_code == 1  # the model's other gates do not pass
    assert "SKIPPED weak: drop in confidence when the protected regions are hidden" in result.output
    result = CliRunner().invoke(main, ["report", str(out), "--no-pdf"])
    assert result.exit_code == 0, result.output
    page = _text((out / "report.html").read_text())
    assert "so the occlusion gate of weak is skipped, not failed" in page
    assert "– SKIPPED" in page


def test_min_accuracy_is_a_stated_floor():
    with pytest.raises(ConfigError, match=r"model 'm': min_accuracy must be in \[0, 1\], got 1.5"):
        from_dict({"model": [{"name": "m", "train_split": "t", "min_accuracy": 1.5}]})
    assert from_dict({"model": [{"name": "m", "train_split": "t"}]}).model[0].min_accuracy is None
    metrics = _weak_metrics()
    for model in metrics["models"].values():
        model["performance"]["accuracy"] = {"value": 0.9, "ci_low": 0.88, "ci_high": 0.92}
    labels = np.array(["doctor", "nurse"] * 50)
    probes = {"biased": {"labels": labels, "predictions": labels, "floor": 0.95}}
    probes["fair"] = {"labels": labels, "predictions": labels}
    findings = v.validity_findings(metrics, probes, trust_enabled=True)
    assert [(f["model"], f["check"]) for f in findings] == [("biased", "too_weak")]
    assert v.model_status(findings, "biased") == v.TOO_WEAK
    assert v.model_status(findings, "fair") == "valid"


def test_a_run_without_validity_findings_renders_as_before():
    metrics = _metrics(protected_share=0.5, area=0.1, worst=0.3, flips=0.2)
    metrics["gates"] = evaluate_gates(metrics, None)
    metrics["verdicts"] = verdicts(metrics["gates"], list(metrics["models"]))
    context = validity_context(metrics)  # a run of an earlier version: no `validity` block
    assert not context["recorded"] and context["rows"] == [] and context["invalid"] == []
    before = decisions(metrics, {}, {})
    assert amend_decisions(before, metrics) == before
    metrics["validity"] = {"findings": [], "models": {n: "valid" for n in metrics["models"]}}
    assert validity_context(metrics)["recorded"] and amend_decisions(before, metrics) == before
