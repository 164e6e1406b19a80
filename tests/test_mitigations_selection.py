"""Model selection, DFR, Group DRO's adjusted loss and the harm judgement, each against an
independent computation: a planted validation curve, scikit-learn's logistic regression on the
same features and weights, the update done by hand, and paired differences counted by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from audit.metrics.harm import judge_harm, plain_baseline
from audit.models import selection
from audit.models.dfr import (
    balanced_sample_weights,
    final_linear,
    halves,
    penultimate_features,
    reweight_last_layer,
)
from audit.models.mitigations import GroupDRO, MitigationConfig, MitigationError
from audit.models.selection import check_inputs, choose, grid_points, selects, train_selected
from audit.models.train import TensorDictDataset, TrainConfig, TrainHistory, _BestEpoch
from audit.models.zoo import SmallCNN
from tests.test_train import tiny_model, toy


# -- Group DRO's generalisation adjustment ------------------------------------------------------
def test_group_dro_adjusted_update_matches_a_hand_computation() -> None:
    """q <- q exp(eta (loss_g + C / sqrt(n_g))), loss = sum q_g loss_g (Sagawa et al., loss.py)."""
    counts = torch.tensor([100, 4])  # training images per group
    adjust = GroupDRO.adjustments(counts, 2.0)
    assert adjust.tolist() == pytest.approx([2 / 10, 2 / 2])
    dro = GroupDRO(2, eta=0.5, adjustment=adjust)
    losses = torch.tensor([1.0, 3.0, 0.5], requires_grad=True)
    loss = dro.loss(losses, torch.tensor([0, 0, 1]))
    e0 = 0.5 * math.exp(0.5 * (2.0 + 0.2))  # group 0: mean loss 2.0, adjustment 0.2
    e1 = 0.5 * math.exp(0.5 * (0.5 + 1.0))  # group 1: mean loss 0.5, adjustment 1.0
    q = [e0 / (e0 + e1), e1 / (e0 + e1)]
    assert dro.q.tolist() == pytest.approx(q, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(
        q[0] * 2.0 + q[1] * 0.5, rel=1e-6
    )  # unadjusted losses
    assert GroupDRO.adjustments(counts, 0.0) is None


def test_the_adjustment_moves_weight_to_the_small_group() -> None:
    plain, adjusted = GroupDRO(2, 0.1), GroupDRO(2, 0.1, adjustment=torch.tensor([0.1, 1.0]))
    for dro in (plain, adjusted):
        dro.loss(torch.tensor([1.0, 1.0]), torch.tensor([0, 1]))
    assert plain.q.tolist() == pytest.approx([0.5, 0.5])
    assert float(adjusted.q[1]) > 0.5


# -- selection ----------------------------------------------------------------------------------
def test_grid_points_are_the_product_in_written_order() -> None:
    points = grid_points({"a": [1, 2], "b": [10, 20, 30]})
    assert points[:4] == [
        {"a": 1, "b": 10},
        {"a": 1, "b": 20},
        {"a": 1, "b": 30},
        {"a": 2, "b": 10},
    ]
    assert len(points) == 6 and grid_points({}) == [{}]


def test_choose_is_the_documented_argmax() -> None:
    c = [
        {"val_worst_group_accuracy": 0.6, "val_accuracy": 0.9},
        {"val_worst_group_accuracy": 0.8, "val_accuracy": 0.7},
        {"val_worst_group_accuracy": 0.8, "val_accuracy": 0.85},  # tie on worst: higher accuracy
        {"val_worst_group_accuracy": 0.8, "val_accuracy": 0.85},  # full tie: the earlier stays
        {"val_worst_group_accuracy": math.nan, "val_accuracy": 1.0},  # NaN never wins
    ]
    assert choose(c) == 2
    assert choose(c[:2]) == 1 and choose(c[:1]) == 0


def test_best_epoch_keeps_the_first_best_weights_and_stops_after_patience() -> None:
    model = nn.Linear(1, 1, bias=False)
    best = _BestEpoch(model)
    stops = []
    for epoch, score in enumerate([0.2, 0.5, 0.5, 0.3, 0.1], start=1):
        model.weight.data.fill_(epoch)
        stops.append(best.update(score, patience=3))
    assert stops == [False, False, False, False, True]  # epoch 5 is 3 after the best (2)
    assert best.restore() == 2 and float(model.weight) == 2.0


def test_selection_picks_the_argmax_of_a_planted_validation_curve(monkeypatch) -> None:
    """train_model replaced by a stub that plants each grid point's curve and stamps the weights:
    the model kept is the planted argmax's best epoch, and the record says so."""
    curves = {6.0: [0.1, 0.7, 0.4], 20.0: [0.2, 0.5, 0.9], 50.0: [0.9, 0.3, 0.3]}
    accuracy = {6.0: [0.5, 0.8, 0.8], 20.0: [0.5, 0.8, 0.95], 50.0: [0.9, 0.9, 0.9]}

    def planted(model, train, config, **kwargs):  # noqa: ANN001, ANN202
        assert config.select_epoch  # every point keeps its best epoch
        upweight = config.mitigation.jtt_upweight
        curve = curves[upweight]
        best = int(np.argmax(curve)) + 1
        for p in model.parameters():
            p.data.fill_(upweight * 100 + best)
        return TrainHistory(
            loss=[0.0] * 3,
            val_accuracy=accuracy[upweight],
            val_worst_group_accuracy=curve,
            best_epoch=best,
        )

    monkeypatch.setattr(selection, "train_model", planted)
    monkeypatch.setattr(selection, "_val_has_groups", lambda val, workers: True)
    model = nn.Linear(2, 2)
    grid = {"jtt_upweight": [6.0, 20.0, 50.0]}
    config = TrainConfig(mitigation=MitigationConfig("jtt", grid=grid))
    history = train_selected(model, None, config, val=object(), progress=False)
    record = history.selection
    # 20.0 and 50.0 tie at 0.9 worst group; 20.0's epoch 3 has the higher accuracy (0.95)
    assert record["chosen"] == {"jtt_upweight": 20.0} and record["chosen_index"] == 1
    assert [c["best_epoch"] for c in record["candidates"]] == [2, 3, 1]
    assert record["candidates"][1]["curve"] == curves[20.0]
    assert torch.all(model.weight == 20.0 * 100 + 3)  # the chosen run's kept weights


def test_selects_follows_the_select_key() -> None:
    assert selects(MitigationConfig("jtt"), True)
    assert not selects(MitigationConfig("jtt"), False)
    assert not selects(MitigationConfig("none"), True)
    assert not selects(MitigationConfig("jtt", select="off"), True)
    assert selects(MitigationConfig("none", select="on"), True)
    with pytest.raises(MitigationError, match="select = 'on' needs a val split"):
        selects(MitigationConfig("none", select="on"), False)


def test_bad_selection_keys_are_one_line_errors() -> None:
    cases = [
        (MitigationConfig("jtt", grid={"rrr_lambda": [1.0]}), "grid key 'rrr_lambda' is not"),
        (MitigationConfig("jtt", grid={"jtt_upweight": []}), "grid.jtt_upweight must be a non"),
        (MitigationConfig("jtt", grid={"jtt_upweight": [0.5]}), "jtt_upweight must be >= 1"),
        (MitigationConfig("jtt", grid={"lr": [0.0]}), "grid.lr must be > 0"),
        (MitigationConfig("group_dro", grid={"weight_decay": [0.1]}), "grid key 'weight_decay'"),
        (MitigationConfig("jtt", select="maybe"), "select must be one of auto, on, off"),
        (MitigationConfig("jtt", patience=-1), "patience must be an integer >= 0"),
    ]
    for config, message in cases:
        with pytest.raises(MitigationError, match=message) as info:
            config.check(True, True)
        assert "\n" not in str(info.value)


def test_check_inputs_needs_val_groups_for_dfr_and_a_final_linear_layer() -> None:
    model = tiny_model()
    with pytest.raises(MitigationError, match="dfr needs the val split"):
        check_inputs(MitigationConfig("dfr"), model, 2, ["a", ""])
    with pytest.raises(MitigationError, match="dfr needs the val split"):
        check_inputs(MitigationConfig("dfr"), model, 2, None)
    check_inputs(MitigationConfig("dfr"), model, 2, ["a", "b"])
    check_inputs(MitigationConfig("jtt"), model, 2, None)  # auto: selection simply skipped
    convs = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(MitigationError, match="no final nn.Linear layer with 2 outputs") as info:
        check_inputs(MitigationConfig("dfr"), convs, 2, ["a"])
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_selection_trains_every_point_from_the_same_start_deterministically() -> None:
    data = toy(48)
    grid = {"jtt_upweight": [2.0, 4.0]}
    config = TrainConfig(
        epochs=3,
        batch_size=16,
        lr=1e-2,
        mitigation=MitigationConfig("jtt", jtt_epochs=1, grid=grid),
    )
    first, second = tiny_model(), tiny_model()
    a = train_selected(first, data, config, val=data, progress=False)
    b = train_selected(second, data, config, val=data, progress=False)
    assert a.selection == b.selection and len(a.selection["candidates"]) == 2
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


# -- DFR ----------------------------------------------------------------------------------------
def spurious(n: int = 160, seed: int = 0, classes: int = 2) -> TensorDictDataset:
    """Images whose class shows in the top half and whose group in the bottom half."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    groups = (torch.arange(n) // classes) % 2
    images = torch.rand(n, 3, 16, 16, generator=g) * 0.5
    images[:, 0, :8] += labels[:, None, None].float() * 0.4
    images[:, 1, 8:] += groups[:, None, None].float() * 0.4
    return TensorDictDataset(images, labels, groups)


@pytest.mark.parametrize("classes", [2, 3])
def test_dfr_last_layer_equals_sklearn_logistic_regression(classes: int) -> None:
    """The installed layer gives, on the model's own penultimate features, the probabilities of
    scikit-learn's LogisticRegression fitted here on the same standardised features and the same
    group-balancing weights with the C that DFR chose."""
    torch.manual_seed(0)
    model = SmallCNN(num_classes=classes, width=8).eval()
    data = spurious(n=180, classes=classes)
    with torch.no_grad():  # the features computed independently of DFR's hook
        features = model.pool(model.features(data.images)).flatten(1).double().numpy()
    record = reweight_last_layer(model, data, classes, seed=0)
    assert record["layer"] == "fc" and record["features"] == 16 and record["n"] == len(data)
    labels = data.labels.numpy()
    cells = (labels * 2 + data.groups.numpy()).astype(int)
    counts = np.bincount(cells)
    weights = (1 / counts[cells]) * (len(counts) * counts.min()) / (1 / counts[cells]).sum()
    mean, std = features.mean(0), features.std(0)
    std[std == 0] = 1.0  # a dead ReLU channel: constant, left unscaled (as DFR does)
    reference = (
        LogisticRegression(
            l1_ratio=1.0, C=record["C"], solver="liblinear", max_iter=1000, random_state=0
        )
        if classes == 2
        else LogisticRegression(C=record["C"], max_iter=10000, tol=1e-10)
    ).fit((features - mean) / std, labels, sample_weight=weights)
    expected = reference.predict_proba((features - mean) / std)
    with torch.no_grad():
        got = torch.softmax(model(data.images).double(), 1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [t["C"] for t in record["tuning"]] == record["C_grid"]


def test_dfr_fixes_a_model_that_reads_the_spurious_feature() -> None:
    """A last layer planted to read only the group (bottom half, channel 1) is right on half the
    images; DFR on its features reads the class again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    data = spurious(200)
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1, 256 + 128 :] = 1.0  # channel 1, bottom rows: the group
        model[1].bias.fill_(-float(model[1].weight[1].sum()) * 0.45)
    before = (model(data.images).argmax(1) == data.labels).float().mean()
    reweight_last_layer(model, data, 2)
    after = (model(data.images).argmax(1) == data.labels).float().mean()
    assert before < 0.6 and after > 0.95


def test_final_linear_prefers_get_classifier_and_else_the_last_linear() -> None:
    class Timmish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.aux = nn.Linear(4, 2)

        def get_classifier(self) -> nn.Module:
            return self.head

    assert final_linear(Timmish(), 2)[0] == "head"
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert final_linear(seq, 2)[0] == "2"


def test_dfr_refuses_a_model_whose_output_is_not_its_last_linear() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2), nn.Tanh())
    with pytest.raises(MitigationError, match="output is not its final linear layer's output"):
        penultimate_features(model, model[1], spurious(8))


def test_balanced_weights_and_halves() -> None:
    cells = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])
    w = balanced_sample_weights(cells)
    assert w.sum() == pytest.approx(3 * 2)  # cells x smallest cell
    assert np.bincount(cells, weights=w).tolist() == pytest.approx([2, 2, 2])
    first, second = halves(cells, seed=0)
    assert np.bincount(cells[first]).tolist() == [2, 1, 3]
    assert sorted(np.concatenate([first, second]).tolist()) == list(range(12))


# -- harm ---------------------------------------------------------------------------------------
def test_harm_is_the_paired_worst_group_difference_with_its_interval() -> None:
    rows = pd.DataFrame({"label": ["a"] * 40 + ["b"] * 40, "group": (["x"] * 20 + ["y"] * 20) * 2})
    right = np.ones(80, bool)
    worse = right.copy()
    worse[20:40] = False  # cell (a, y) all wrong
    tables = {
        "plain": pd.DataFrame({"correct": right}),
        "fix": pd.DataFrame({"correct": worse}),
        "same": pd.DataFrame({"correct": right}),
    }
    infos = {
        "plain": {"mitigation": "none", "train_split": "t"},
        "fix": {"mitigation": "jtt", "train_split": "t"},
        "same": {"mitigation": "group_dro", "train_split": "t"},
    }
    weights = np.random.default_rng(0).multinomial(80, np.full(80, 1 / 80), size=200).astype(float)
    out = judge_harm(tables, infos, rows, weights)
    assert out["fix"]["baseline"] == "plain"
    assert out["fix"]["worst_group_accuracy_difference"]["value"] == pytest.approx(-1.0)
    assert out["fix"]["harmful"] and not out["fix"]["helps"]
    assert not out["same"]["harmful"] and not out["same"]["helps"]
    assert "plain" not in out


def test_the_baseline_is_the_plain_model_of_the_same_split_or_checkpoint() -> None:
    infos = {
        "balanced": {"mitigation": "none", "train_split": "balanced"},
        "plain": {"mitigation": "none", "train_split": "biased"},
        "jtt": {"mitigation": "jtt", "train_split": "biased"},
        "own": {"checkpoint": "m.pt"},
        "own_dfr": {"mitigation": "dfr", "checkpoint": "m.pt"},
        "other_dfr": {"mitigation": "dfr", "checkpoint": "n.pt"},
    }
    assert plain_baseline("jtt", infos) == "plain"
    assert plain_baseline("own_dfr", infos) == "own"
    assert plain_baseline("other_dfr", infos) == "balanced"  # the run's first model, plain


# -- the report's mitigation section ------------------------------------------------------------
def test_the_report_marks_a_harmful_mitigation_and_never_names_it_as_the_candidate(
    tmp_path,
) -> None:
    from audit.report.render import build_context, render_html
    from tests.test_report_trust import _model, _text, _trust, _with_mitigation, fake_run

    classes = ["doctor", "nurse"]
    specs = {  # name: (mitigation, worst group, share, flips, accuracy)
        "plain": (None, 0.7, 0.4, 0.3, 0.80),
        "rrr": ("right_reasons", 0.99, 0.1, 0.02, 0.99),  # the best figures, but harmful below
        "jtt": ("jtt", 0.9, 0.1, 0.02, 0.93),
    }
    models = {
        n: _with_mitigation(_model(classes, w, s, f, a), m) for n, (m, w, s, f, a) in specs.items()
    }
    for m in models.values():
        m["trust"] = _trust({"gradcam": 0.1})
    models["jtt"]["history"] = {
        "val_worst_group_accuracy": [0.2, 0.8, 0.6],
        "selection": {
            "criterion": "validation worst class x group accuracy at the run's best epoch",
            "grid": {"jtt_upweight": [6.0, 20.0]},
            "patience": 0,
            "chosen": {"jtt_upweight": 20.0},
            "chosen_index": 1,
            "candidates": [
                {"values": {"jtt_upweight": 6.0}, "best_epoch": 3, "epochs_run": 3,
                 "val_worst_group_accuracy": 0.5, "val_accuracy": 0.9, "curve": [0.1, 0.3, 0.5]},
                {"values": {"jtt_upweight": 20.0}, "best_epoch": 2, "epochs_run": 3,
                 "val_worst_group_accuracy": 0.8, "val_accuracy": 0.9, "curve": [0.2, 0.8, 0.6]},
            ],
        },
    }  # fmt: skip
    run = fake_run(tmp_path / "run", models, classes, gates={"min_worst_group_accuracy": 0.5})
    metrics = json.loads((run / "metrics.json").read_text())
    e = {"value": -0.2, "ci_low": -0.3, "ci_high": -0.1}
    metrics["mitigation_harm"] = {
        "rrr": {"baseline": "plain", "worst_group_accuracy_difference": e, "harmful": True,
                "helps": False},
        "jtt": {"baseline": "plain", "worst_group_accuracy_difference": e | {"value": 0.2,
                "ci_low": 0.1, "ci_high": 0.3}, "harmful": False, "helps": True},
    }  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert metrics["verdicts"]["rrr"] == "pass" and metrics["verdicts"]["jtt"] == "pass"
    context = build_context(run)["mitigations"]
    summary = _text(context["summary"])
    assert summary == (
        "Of the 2 mitigations tried, jtt (model jtt) passes every gate with the highest "
        "accuracy: 93.0% [91.0–95.0]. Harmful, worse than plain training (worst group, paired "
        "95% CI below 0): right_reasons (model rrr)."
    )
    assert context["harmful"] == ["rrr"]
    rows = {r["model"]: r for r in context["rows"]}
    assert rows["rrr"]["harm"]["status"] == "harmful" and rows["jtt"]["harm"]["status"] == "helps"
    assert rows["plain"]["harm"] is None
    assert rows["jtt"]["notes"] == [
        "selected by validation worst-group accuracy over 2 run(s) (jtt_upweight in [6.0, 20.0]): "
        "jtt_upweight = 20, epoch 2 of 3 (validation worst group 0.800)"
    ]
    assert context["curves"] is not None
    page = render_html(run)
    table = page.split('class="dense mitigations"', 1)[1].split("</table>", 1)[0]
    row = table.split('<tr class="harmful">', 1)[1].split("</tr>", 1)[0]
    assert "rrr" in row and "HARMFUL" in row
    assert table.count("HARMFUL") == 1
    assert summary in _text(page)


def test_a_penalty_switched_off_by_selection_is_called_plain_training_not_a_fix(
    tmp_path,
) -> None:
    from audit.report.render import build_context
    from tests.test_report_trust import _model, _text, _trust, _with_mitigation, fake_run

    classes = ["doctor", "nurse"]
    models = {
        "plain": _with_mitigation(_model(classes, 0.7, 0.4, 0.3, 0.80), None),
        # the best figures, but selection chose rrr_lambda = 0: plain training with its best epoch
        "rrr": _with_mitigation(_model(classes, 0.99, 0.1, 0.02, 0.99), "right_reasons",
                                rrr_lambda=0.0),
        "jtt": _with_mitigation(_model(classes, 0.9, 0.1, 0.02, 0.93), "jtt", jtt_upweight=20.0),
    }  # fmt: skip
    for m in models.values():
        m["trust"] = _trust({"gradcam": 0.1})
    run = fake_run(tmp_path / "run", models, classes, gates={"min_worst_group_accuracy": 0.5})
    context = build_context(run)["mitigations"]
    assert _text(context["summary"]) == (
        "Of the 2 mitigations tried, jtt (model jtt) passes every gate with the highest "
        "accuracy: 93.0% [91.0–95.0]. Switched off by validation selection (strength 0, plain "
        "training, not a fix): right_reasons (model rrr)."
    )
    rows = {r["model"]: r for r in context["rows"]}
    assert rows["rrr"]["notes"] == [
        "rrr_lambda = 0: the penalty is off (no strength tried did better on validation), so "
        "this model is plain training, not a fix"
    ]
    assert rows["jtt"]["notes"] == []


def test_strength_zero_trains_plainly_and_records_no_penalty() -> None:
    """rrr_lambda = 0 is the grid point that lets selection switch the penalty off: the same
    weights as plain training from the same start, and no penalty figure invented for it."""
    from audit.models.train import train_model

    data = toy(32)  # with protected-region masks
    plain, off = tiny_model(), tiny_model()
    off.load_state_dict(plain.state_dict())
    runs = {}
    for model, mitigation in ((plain, "none"), (off, "right_reasons")):
        config = TrainConfig(
            epochs=2,
            batch_size=16,
            lr=1e-2,
            mitigation=MitigationConfig(mitigation, rrr_lambda=0.0),
        )
        runs[mitigation] = train_model(model, data, config, progress=False)
    assert runs["right_reasons"].penalty == [] and runs["right_reasons"].loss == runs["none"].loss
    for key, value in plain.state_dict().items():
        assert torch.equal(value, off.state_dict()[key]), key
