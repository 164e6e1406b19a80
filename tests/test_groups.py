"""Fairness per attribute and intersection, and many-class metrics, against independent computations:
a table worked by hand, fairlearn (MetricFrame, demographic parity, equalized odds), sklearn's
confusion matrix, pandas groupby, and a naive loop over bootstrap resamples."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
)
from sklearn.metrics import confusion_matrix

from audit.metrics.bootstrap import resample_weights
from audit.metrics.groups import (
    CELL_COLUMNS,
    GroupError,
    cell_rows,
    group_labels,
    group_metrics,
    group_samples,
    ranked_groups,
    worst_cells,
)
from audit.metrics.performance import confusion_counts, performance, top_confusions


def hand_table() -> pd.DataFrame:
    """Eight images; the figures below are worked out by hand in the tests' comments."""
    return pd.DataFrame(
        {
            "image": [f"{i}.png" for i in range(1, 9)],
            "label": list("aabbaabb"),
            "prediction": list("abbaaabb"),
            "group:sex": ["f"] * 4 + ["m"] * 4,
            "group:age": ["old", "old", "young", "young", "old", "young", "young", "old"],
            "flipped": [True, False, False, True, False, False, False, True],
            "share:gradcam:protected": [0.4, 0.2, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1],
        }
    )


def test_hand_computed_table():
    out = group_metrics(hand_table(), ["sex", "age"], ["a", "b"], np.zeros((0, 8)), min_cell_size=1)
    assert list(out) == ["sex", "age", "sex x age"]
    sex = out["sex"]
    # f: images 1 and 3 right of 4; m: all 4 right
    assert sex["per_group"]["f"]["value"] == 0.5 and sex["per_group"]["m"]["value"] == 1.0
    assert sex["accuracy_gap"] == {
        "value": 0.5,
        "ci_low": None,
        "ci_high": None,
        "high": "m",
        "low": "f",
    }
    assert sex["worst_group_accuracy"]["group"] == "f"
    # cells a/f (images 1, 2) and b/f (3, 4) are both 1/2; ties go to class order
    assert sex["per_cell"]["a / f"]["value"] == 0.5 and sex["per_cell"]["b / m"]["value"] == 1.0
    assert sex["worst_cell_accuracy"]["cell"] == "a / f"
    assert sex["worst_cell_accuracy"]["value"] == 0.5
    # positive "a": selection f = {1, 4} / 4, m = {5, 6} / 4 -> DP 0;
    # TPR f 1/2, m 2/2; FPR f 1/2 (image 4), m 0/2 -> EO 0.5
    assert sex["demographic_parity_difference"]["value"] == pytest.approx(0.0)
    assert sex["equalized_odds_difference"]["value"] == pytest.approx(0.5)
    # flips: f {1, 4} / 4, m {8} / 4
    assert sex["flip_rate"]["per_group"]["f"]["value"] == 0.5
    assert sex["flip_rate"]["per_group"]["m"]["value"] == 0.25
    # protected share: f (0.4 + 0.2 + 0.3 + 0.3) / 4 = 0.3 against m 0.1
    assert sex["attention_gap"]["value"] == pytest.approx(0.2)
    assert (sex["attention_gap"]["high"], sex["attention_gap"]["low"]) == ("f", "m")
    assert sex["attention"]["gradcam"]["protected"]["per_group"]["f"]["value"] == pytest.approx(0.3)
    # age: old {1, 5, 8} / 4 right, young {3, 6, 7} / 4 -> no gap
    assert out["age"]["accuracy_gap"]["value"] == 0.0
    both = out["sex x age"]
    assert both["kind"] == "intersection" and both["attributes"] == ["sex", "age"]
    assert both["groups"] == ["f x old", "f x young", "m x old", "m x young"]
    assert both["per_group"]["f x young"]["value"] == 0.5  # images 3 (right) and 4 (wrong)
    assert both["per_group"]["m x old"]["value"] == 1.0
    assert both["per_cell"]["b / f x young"]["value"] == 0.5


def test_too_few_cells_are_shown_marked_and_skipped():
    weights = resample_weights(8, 50, 0)
    out = group_metrics(hand_table(), ["sex", "age"], ["a", "b"], weights, min_cell_size=3)
    sex = out["sex"]
    # groups hold 4 images (judged); every class x group cell holds 2 (too few)
    assert not any(e["too_few"] for e in sex["per_group"].values())
    assert all(e["too_few"] for e in sex["per_cell"].values())
    assert sex["per_cell"]["a / f"]["value"] == 0.5  # still shown, with its interval
    assert sex["per_cell"]["a / f"]["ci_low"] is not None
    assert (
        sex["worst_cell_accuracy"]["value"] is None and sex["worst_cell_accuracy"]["cell"] is None
    )
    assert sex["skipped"] == {"groups": [], "cells": 4}
    assert sex["worst_group_accuracy"]["group"] == "f"
    both = out["sex x age"]  # every intersection group holds 2 images
    assert both["skipped"]["groups"] == both["groups"]
    assert both["worst_group_accuracy"]["value"] is None
    assert both["accuracy_gap"]["value"] is None and both["attention_gap"]["value"] is None
    assert both["demographic_parity_difference"]["value"] is None
    # only two cells hold 3 images: age old / a (images 1, 2, 5) and young / b (3, 4, 7), 2/3 each
    worst = worst_cells(out, 5)
    assert [(w["attribute"], w["group"], w["class"], w["n"]) for w in worst] == [
        ("age", "old", "a", 3),
        ("age", "young", "b", 3),
    ]
    assert worst[0]["accuracy"] == pytest.approx(2 / 3)
    assert out["age"]["worst_cell_accuracy"]["cell"] == "a / old"
    rows = cell_rows(out)
    # sex: 4 cells; age: 4; intersection: a/f x old, b/f x young, and 2 cells in each male group
    assert list(rows.columns) == CELL_COLUMNS and len(rows) == 4 + 4 + 6
    assert rows["too_few"].tolist() == [False] * 2 + [True] * 12


def _synthetic(n: int, n_classes: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    classes = [f"c{k}" for k in range(n_classes)]
    label = rng.choice(classes, n)
    sex = rng.choice(["female", "male"], n, p=[0.4, 0.6])
    age = rng.choice(["old", "young", "mid"], n)
    wrong = rng.random(n) < np.where(sex == "female", 0.35, 0.15)
    prediction = np.where(wrong, rng.choice(classes, n), label)
    share = np.where(sex == "female", 0.3, 0.1) + rng.normal(0, 0.05, n)
    share[rng.random(n) < 0.05] = np.nan  # empty maps
    return pd.DataFrame(
        {
            "label": label,
            "prediction": prediction,
            "group:sex": sex,
            "group:age": age,
            "flipped": rng.random(n) < np.where(sex == "female", 0.2, 0.05),
            "share:gradcam:protected": share,
        }
    )


@pytest.mark.parametrize("n_classes", [2, 3])
def test_against_fairlearn_and_pandas(n_classes):
    table = _synthetic(600, n_classes, seed=n_classes)
    classes = [f"c{k}" for k in range(n_classes)]
    out = group_metrics(table, ["sex", "age"], classes, np.zeros((0, 600)), min_cell_size=1)
    correct = table["label"] == table["prediction"]
    features = {"sex": ["group:sex"], "age": ["group:age"], "sex x age": ["group:sex", "group:age"]}
    for name, columns in features.items():
        block = out[name]
        frame = MetricFrame(
            metrics=lambda t, p: np.mean(t == p),
            y_true=table["label"],
            y_pred=table["prediction"],
            sensitive_features=table[columns],
        )
        for key, value in frame.by_group.items():
            group = " x ".join(key) if isinstance(key, tuple) else key
            assert block["per_group"][group]["value"] == pytest.approx(value)
        assert block["accuracy_gap"]["value"] == pytest.approx(frame.difference())
        assert block["worst_group_accuracy"]["value"] == pytest.approx(frame.group_min())
        cells = correct.groupby([table["label"], *(table[c] for c in columns)]).agg(
            ["mean", "size"]
        )
        assert len(block["per_cell"]) == len(cells)
        for key, row in cells.iterrows():
            entry = block["per_cell"][f"{key[0]} / {' x '.join(key[1:])}"]
            assert entry["value"] == pytest.approx(row["mean"]) and entry["n"] == row["size"]
        assert block["worst_cell_accuracy"]["value"] == pytest.approx(cells["mean"].min())
        sensitive = table[columns]
        positives = classes[:1] if n_classes == 2 else classes
        dp = max(
            demographic_parity_difference(
                table["label"] == c, table["prediction"] == c, sensitive_features=sensitive
            )
            for c in positives
        )
        eo = max(
            equalized_odds_difference(
                table["label"] == c, table["prediction"] == c, sensitive_features=sensitive
            )
            for c in positives
        )
        assert block["demographic_parity_difference"]["value"] == pytest.approx(dp)
        assert block["equalized_odds_difference"]["value"] == pytest.approx(eo)
        keys = [table[c] for c in columns]
        flips = table["flipped"].groupby(keys).mean()
        shares = table["share:gradcam:protected"].groupby(keys).mean()  # pandas skips NaN
        for key in flips.index:
            group = " x ".join(key) if isinstance(key, tuple) else key
            assert block["flip_rate"]["per_group"][group]["value"] == pytest.approx(flips[key])
            got = block["attention"]["gradcam"]["protected"]["per_group"][group]
            assert got["value"] == pytest.approx(shares[key])
        assert block["attention_gap"]["value"] == pytest.approx(shares.max() - shares.min())
    # the one-attribute form: a plain `group` column
    single = table.drop(columns=["group:age"]).rename(columns={"group:sex": "group"})
    one = group_metrics(single, None, classes, np.zeros((0, 600)), min_cell_size=1)
    assert list(one) == ["group"]
    assert one["group"]["per_group"] == out["sex"]["per_group"]


def test_bootstrap_intervals_equal_a_naive_loop_over_resamples():
    """Every interval against resamples drawn row by row with pandas: group and cell means, and the
    gaps between the two named groups, as BCa intervals (Efron's definition, written out in
    tests.test_metrics.naive_bca, with a leave-one-out loop); the worst group and cell carry their
    own entry's interval; demographic parity and equalized odds, the BCa interval of the difference
    between the named groups in the named class's rate."""
    from tests.test_metrics import naive_bca

    table = _synthetic(90, 3, seed=7)
    classes = ["c0", "c1", "c2"]
    n = len(table)
    weights = resample_weights(n, 40, seed=3)
    min_size = 12
    out = group_metrics(table, ["sex", "age"], classes, weights, min_cell_size=min_size)
    labels = group_labels(table, ["sex", "age"])
    right_all = (table["label"] == table["prediction"]).to_numpy().astype(float)
    labels_all, predictions_all = table["label"].to_numpy(), table["prediction"].to_numpy()
    shares_all = table["share:gradcam:protected"].to_numpy()
    for name, groups in labels.items():
        block = out[name]
        sizes = pd.Series(groups).value_counts()
        judged = set(sizes[sizes >= min_size].index)
        cell_keys = table["label"].to_numpy() + " / " + groups

        def figures(rows: np.ndarray, block=block, groups=groups, keys=cell_keys, sizes=sizes):
            """Each figure on the rows `rows` (a resample or a leave-one-out set) by pandas."""
            right = pd.Series(right_all[rows]).groupby(groups[rows]).mean()
            shares = pd.Series(shares_all[rows]).groupby(groups[rows]).mean()
            cells = pd.Series(right_all[rows]).groupby(keys[rows]).mean()
            out = {f"group {g}": right.get(g, np.nan) for g in sizes.index}
            out |= {f"cell {c}": cells.get(c, np.nan) for c in block["per_cell"]}
            gap, att = block["accuracy_gap"], block["attention_gap"]
            if gap["high"] is not None:
                out["gap"] = right.get(gap["high"], np.nan) - right.get(gap["low"], np.nan)
                out["attention"] = shares.get(att["high"], np.nan) - shares.get(att["low"], np.nan)
            true, pred = labels_all[rows], predictions_all[rows]
            for key in ("demographic_parity_difference", "equalized_odds_difference"):
                named = block[key]
                if named["high"] is None:
                    continue
                k = named["class"]
                per_image = {  # the named class's rate, per image, and who counts
                    None: (pred == k, np.ones(len(rows), bool)),
                    "true positive rate": (pred == k, true == k),
                    "false positive rate": (pred == k, true != k),
                }[named.get("rate")]
                rate = pd.Series(per_image[0][per_image[1]].astype(float))
                rate = rate.groupby(groups[rows][per_image[1]]).mean()
                out[key] = rate.get(named["high"], np.nan) - rate.get(named["low"], np.nan)
            return out

        draws = pd.DataFrame([figures(np.repeat(np.arange(n), w.astype(int))) for w in weights])
        jackknife = pd.DataFrame([figures(np.delete(np.arange(n), i)) for i in range(n)])
        point = figures(np.arange(n))
        entries = {f"group {g}": block["per_group"][g] for g in sizes.index}
        entries |= {f"cell {c}": e for c, e in block["per_cell"].items()}
        if len(judged) >= 2:
            entries |= {"gap": block["accuracy_gap"], "attention": block["attention_gap"]}
            for key in ("demographic_parity_difference", "equalized_odds_difference"):
                entries[key] = block[key]
        for key, entry in entries.items():
            assert entry["value"] == pytest.approx(point[key]), key
            if jackknife[key].nunique() > 1:  # a group of one image has no jackknife to speak of
                assert [entry["ci_low"], entry["ci_high"]] == pytest.approx(
                    naive_bca(draws[key], point[key], jackknife[key])
                ), key
                assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], key
        figure = ("value", "ci_low", "ci_high")
        for key, entries_of, name_key in (
            ("worst_group_accuracy", "per_group", "group"),
            ("worst_cell_accuracy", "per_cell", "cell"),
        ):
            worst = block[key]
            if worst[name_key] is not None:  # one cell, one interval
                own = block[entries_of][worst[name_key]]
                assert [worst[k] for k in figure] == [own[k] for k in figure]
        assert judged == set() or block["worst_group_accuracy"]["group"] is not None
        # paired samples for comparisons: row 0 the estimate, then the same resamples
        samples = group_samples(table, name, groups, classes, weights, min_cell_size=min_size)
        assert samples["accuracy_gap"][0] == pytest.approx(
            block["accuracy_gap"]["value"], nan_ok=True
        )
        if len(judged) >= 2:
            assert samples["accuracy_gap"][1:] == pytest.approx(draws["gap"].to_numpy())
        assert len(samples["worst_cell_accuracy"]) == 41
    assert out["sex"]["skipped"]["cells"] > 0  # the test exercises skipping


def test_attention_gap_finds_the_documented_finding():
    """30% of Grad-CAM on women's protected regions against 10% on men's: a gap of 20 points."""
    table = _synthetic(400, 2, seed=1)
    out = group_metrics(table, ["sex"], ["c0", "c1"], resample_weights(400, 200, 0))
    gap = out["sex"]["attention_gap"]
    assert gap["high"] == "female" and gap["low"] == "male"
    assert gap["ci_low"] < 0.2 < gap["ci_high"] and 0.18 < gap["value"] < 0.22
    assert (gap["region"], gap["method"]) == ("protected", "gradcam")


def test_digits_ten_classes_against_sklearn():
    """A real 10-class data set (scikit-learn's 1,797 handwritten digits) with a generated protected
    attribute that is correlated with the label, a second random one, and a generated region."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    rng = np.random.default_rng(0)
    n = len(digits.target)
    order = rng.permutation(n)
    train, test = order[: n // 2], order[n // 2 :]
    model = LogisticRegression(max_iter=300).fit(digits.data[train] / 16, digits.target[train])
    y_true = digits.target[test].astype(str)
    y_pred = model.predict(digits.data[test] / 16).astype(str)
    # "ink": heavy for most 0/8/9, light for most others; noise in the rest
    heavy = np.isin(digits.target[test], [0, 8, 9])
    ink = np.where(rng.random(len(test)) < np.where(heavy, 0.8, 0.2), "heavy", "light")
    y_pred = np.where((ink == "heavy") & (rng.random(len(test)) < 0.15), "1", y_pred)  # a bias
    hand = rng.choice(["left", "right"], len(test))
    images = digits.images[test]
    share = images[:, :, :4].sum(axis=(1, 2)) / images.sum(axis=(1, 2))  # ink on the left half
    table = pd.DataFrame(
        {
            "label": y_true,
            "prediction": y_pred,
            "group:ink": ink,
            "group:hand": hand,
            "share:gradcam:protected": share,
        }
    )
    classes = [str(k) for k in range(10)]
    weights = resample_weights(len(test), 100, 0)
    perf = performance(y_true, y_pred, ink, classes, weights, min_cell_size=30)
    matrix = confusion_matrix(y_true, y_pred, labels=classes)
    assert perf["confusion_matrix"]["counts"] == matrix.tolist()
    recall = matrix.diagonal() / matrix.sum(axis=1)
    for k, c in enumerate(classes):
        assert perf["per_class"][c]["value"] == pytest.approx(recall[k])
    assert perf["classes_worst_first"][0] == classes[int(np.argmin(recall))]
    assert [perf["per_class"][c]["value"] for c in perf["classes_worst_first"]] == sorted(recall)
    # top confused pairs: every off-diagonal pair sorted in plain Python by count, then share of
    # the true class, then class order
    pairs = sorted(
        (-matrix[i, j], -matrix[i, j] / matrix[i].sum(), i, j)
        for i in range(10)
        for j in range(10)
        if i != j and matrix[i, j]
    )
    top = perf["top_confusions"]
    assert [(t["true"], t["predicted"], t["count"]) for t in top[:3]] == [
        (classes[i], classes[j], -c) for c, _, i, j in pairs[:3]
    ]
    assert top[0]["share"] == pytest.approx(-pairs[0][1])
    assert {t["predicted"] for t in top[:3]} >= {"1"}  # the injected confusion shows up
    out = group_metrics(table, ["ink", "hand"], classes, weights, min_cell_size=30)
    frame = MetricFrame(
        metrics=lambda t, p: np.mean(t == p),
        y_true=y_true,
        y_pred=y_pred,
        sensitive_features=table[["group:ink", "group:hand"]],
    )
    for (a, b), value in frame.by_group.items():
        assert out["ink x hand"]["per_group"][f"{a} x {b}"]["value"] == pytest.approx(value)
    assert out["ink"]["worst_group_accuracy"]["group"] == "heavy"
    cells = pd.Series(y_true == y_pred).groupby([y_true, ink]).agg(["mean", "size"])
    big = cells[cells["size"] >= 30]
    assert out["ink"]["worst_cell_accuracy"]["value"] == pytest.approx(big["mean"].min())
    small = cells[cells["size"] < 30]
    assert len(small) > 0 and out["ink"]["skipped"]["cells"] == len(small)
    for c, g in small.index:
        assert out["ink"]["per_cell"][f"{c} / {g}"]["too_few"] is True
    shares = table.groupby("group:ink")["share:gradcam:protected"].mean()
    assert out["ink"]["attention_gap"]["value"] == pytest.approx(shares.max() - shares.min())
    rows = cell_rows(out)
    judged = rows[~rows["too_few"]]
    assert judged["accuracy"].is_monotonic_increasing
    assert rows["too_few"].is_monotonic_increasing  # judged cells first
    worst = worst_cells(out, 3, attribute="ink x hand")
    assert worst[0]["accuracy"] == out["ink x hand"]["worst_cell_accuracy"]["value"]
    assert ranked_groups(out["ink"])[0] == "heavy"


def test_hundred_classes_known_confusions_fast():
    """100 classes, 40 images each; class k < 5 sends 10 + k images to class k + 50, and every class
    sends one image to the next class: the top confusions and the worst class are known."""
    k_classes, per_class = 100, 40
    classes = [f"c{k:03d}" for k in range(k_classes)]
    true_idx = np.repeat(np.arange(k_classes), per_class)
    pred_idx = true_idx.copy()
    position = np.tile(np.arange(per_class), k_classes)
    for k in range(5):
        pred_idx[(true_idx == k) & (position >= 1) & (position < 11 + k)] = k + 50
    pred_idx[position == 0] = (true_idx[position == 0] + 1) % k_classes
    rng = np.random.default_rng(0)
    groups = rng.choice(["a", "b", "c"], len(true_idx))
    y_true, y_pred = np.array(classes)[true_idx], np.array(classes)[pred_idx]
    weights = resample_weights(len(true_idx), 200, 0)
    start = time.perf_counter()
    perf = performance(y_true, y_pred, groups, classes, weights, min_cell_size=30)
    table = pd.DataFrame({"label": y_true, "prediction": y_pred, "group": groups})
    out = group_metrics(table, None, classes, weights, min_cell_size=30)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, elapsed  # about 0.3 s here; no loop over classes or class pairs
    assert "confusion_matrix" not in perf  # more than 20 classes: the top pairs instead
    counts = confusion_counts(true_idx, pred_idx, k_classes)
    assert np.array_equal(counts, confusion_matrix(true_idx, pred_idx, labels=range(k_classes)))
    top = perf["top_confusions"]
    assert [(t["true"], t["predicted"], t["count"]) for t in top[:5]] == [
        (classes[k], classes[k + 50], 10 + k) for k in (4, 3, 2, 1, 0)
    ]
    assert top[0]["share"] == pytest.approx(14 / 40)
    assert [(t["true"], t["predicted"], t["count"]) for t in top[5:7]] == [
        (classes[0], classes[1], 1),
        (classes[1], classes[2], 1),
    ]
    assert len(top) == 20
    assert perf["classes_worst_first"][:5] == [classes[k] for k in (4, 3, 2, 1, 0)]
    assert perf["per_class"][classes[4]]["value"] == pytest.approx((40 - 14 - 1) / 40)
    # every class x group cell holds about 13 images: all too few, none judged
    assert out["group"]["worst_cell_accuracy"]["value"] is None
    assert out["group"]["skipped"]["cells"] == len(out["group"]["per_cell"]) == 300
    assert perf["worst_group_accuracy"]["cell"] is None


def test_top_confusions_ties_and_empty():
    counts = np.array([[5, 2, 2], [0, 4, 0], [1, 0, 3]])
    top = top_confusions(counts, ["x", "y", "z"], k=2)
    assert [(t["true"], t["predicted"], t["count"]) for t in top] == [("x", "y", 2), ("x", "z", 2)]
    assert top[0]["share"] == pytest.approx(2 / 9)
    assert top_confusions(np.eye(3, dtype=int), ["x", "y", "z"]) == []


def test_bad_input_names_the_column():
    table = hand_table()
    with pytest.raises(GroupError, match="group:skin"):
        group_metrics(table, ["skin"], ["a", "b"], np.zeros((0, 8)))
    with pytest.raises(ValueError, match="'b'"):
        group_metrics(table, ["sex"], ["a"], np.zeros((0, 8)))
    with pytest.raises(GroupError, match="prediction"):
        group_metrics(table.drop(columns="prediction"), ["sex"], ["a", "b"], np.zeros((0, 8)))
