"""Accuracy per model, class, group and cell; worst-group accuracy; group-fairness differences.

Point estimates of demographic parity and equalized odds differences come from fairlearn; the same
quantities are computed for bootstrap resamples by the vectorised formulas here (tests check that
the two agree).
"""

from __future__ import annotations

import numpy as np
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
from sklearn.metrics import confusion_matrix

from audit.metrics.bootstrap import estimate, weighted_means


def _members(keys: np.ndarray, names: list[str]) -> np.ndarray:
    return np.stack([keys == name for name in names]).astype(np.float64)


def _spread(rates: np.ndarray) -> np.ndarray:
    """max - min over the last axis, ignoring NaN (a group absent from a resample)."""
    with np.errstate(all="ignore"):
        return np.nanmax(rates, axis=-1) - np.nanmin(rates, axis=-1)


def fairness_differences(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    groups: np.ndarray,
    classes: list[str],
    weights: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Demographic parity and equalized odds differences per resample (rows of `weights`).

    For more than two classes each class is taken one-vs-rest and the largest difference reported.
    """
    group_names = sorted(set(groups))
    members = _members(groups, group_names)
    dp, eo = [], []
    positives = classes if len(classes) > 2 else classes[:1]
    for positive in positives:
        selected = (y_pred == positive).astype(np.float64)
        dp.append(_spread(weighted_means(selected, members, weights)))
        truth = y_true == positive
        tpr = _spread(weighted_means(selected, members * truth, weights))
        fpr = _spread(weighted_means(selected, members * ~truth, weights))
        eo.append(np.fmax(tpr, fpr))
    return np.nanmax(np.stack(dp), axis=0), np.nanmax(np.stack(eo), axis=0)


def performance(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    groups: np.ndarray,
    classes: list[str],
    weights: np.ndarray,
) -> dict:
    """All performance metrics of one model as {"value", "ci_low", "ci_high"} estimates."""
    y_true, y_pred, groups = np.asarray(y_true), np.asarray(y_pred), np.asarray(groups)
    correct = (y_true == y_pred).astype(np.float64)
    ones = np.ones((1, len(correct)))
    group_names = sorted(set(groups))
    cells = [(c, g) for c in classes for g in group_names if np.any((y_true == c) & (groups == g))]
    cell_members = np.stack([(y_true == c) & (groups == g) for c, g in cells]).astype(np.float64)
    class_members = _members(y_true, classes)
    group_members = _members(groups, group_names)

    def by(members: np.ndarray, names: list) -> dict:
        point = weighted_means(correct, members, ones)[0]
        boot = weighted_means(correct, members, weights)
        return {
            name: estimate(point[i], boot[:, i]) | {"n": int(members[i].sum())}
            for i, name in enumerate(names)
        }

    point_cells = weighted_means(correct, cell_members, ones)[0]
    boot_cells = weighted_means(correct, cell_members, weights)
    point_groups = weighted_means(correct, group_members, ones)[0]
    boot_groups = weighted_means(correct, group_members, weights)
    with np.errstate(all="ignore"):
        worst_boot = np.nanmin(boot_cells, axis=1) if len(weights) else None
    dp_boot, eo_boot = (
        fairness_differences(y_true, y_pred, groups, classes, weights)
        if len(weights)
        else (None, None)
    )
    positive = classes[0]
    dp = demographic_parity_difference(
        y_true == positive, y_pred == positive, sensitive_features=groups
    )
    eo = equalized_odds_difference(
        y_true == positive, y_pred == positive, sensitive_features=groups
    )
    if len(classes) > 2:
        dp_all, eo_all = fairness_differences(y_true, y_pred, groups, classes, ones)
        dp, eo = float(dp_all[0]), float(eo_all[0])
    worst_index = int(np.nanargmin(point_cells))
    return {
        "n": len(correct),
        "accuracy": estimate(
            correct.mean(), weights @ correct / len(correct) if len(weights) else None
        ),
        "per_class": by(class_members, classes),
        "per_group": by(group_members, group_names),
        "per_cell": {
            f"{c} / {g}": v
            for (c, g), v in zip(cells, by(cell_members, cells).values(), strict=True)
        },
        "worst_group_accuracy": estimate(point_cells[worst_index], worst_boot)
        | {"cell": f"{cells[worst_index][0]} / {cells[worst_index][1]}"},
        "accuracy_gap": estimate(
            _spread(point_groups), _spread(boot_groups) if len(weights) else None
        ),
        "demographic_parity_difference": estimate(dp, dp_boot),
        "equalized_odds_difference": estimate(eo, eo_boot),
        "confusion_matrix": {
            "labels": list(classes),
            "counts": confusion_matrix(y_true, y_pred, labels=list(classes)).tolist(),
        },
    }


def headline_samples(
    correct: np.ndarray, y_true: np.ndarray, groups: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Accuracy, worst-group (cell) accuracy and group accuracy gap: row 0 the estimate on the data,
    then one row per resample of `weights`. Shared resamples make two models' differences paired."""
    correct = np.asarray(correct, dtype=np.float64)
    rows = np.vstack([np.ones((1, len(correct))), weights])
    cells = sorted(set(zip(y_true, groups, strict=True)))
    cell_members = np.stack([(y_true == c) & (groups == g) for c, g in cells]).astype(np.float64)
    group_members = _members(groups, sorted(set(groups)))
    with np.errstate(all="ignore"):
        worst = np.nanmin(weighted_means(correct, cell_members, rows), axis=1)
    return {
        "accuracy": rows @ correct / len(correct),
        "worst_group_accuracy": worst,
        "accuracy_gap": _spread(weighted_means(correct, group_members, rows)),
    }
