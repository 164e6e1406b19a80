"""Accuracy per model, class, group and cell; worst-group accuracy; group-fairness differences;
confusions, from two classes to a thousand.

Everything works on integer codes (class index, group index, cell = group * K + class) and
`np.bincount` / sparse one-hot products, so 1,000 classes cost no Python loop over classes or
class pairs. Demographic parity and equalized odds differences follow fairlearn's definitions
(tests check them against `fairlearn.metrics` on the same data); with more than two classes each
class is taken one-vs-rest and the largest difference over classes is reported, because fairlearn's
functions are defined for a binary positive label only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from audit.metrics.bootstrap import (
    CHUNK_FLOATS,
    estimate,
    grouped_summary,
    grouped_sums,
    nan_spread,
    stamp,
    transposed,
)

# Above this many classes the confusion matrix is not written to metrics.json; `top_confusions`
# (always written) and `confusion_counts` (for a CSV file) take its place.
FULL_CONFUSION_MAX_CLASSES = 20
TOP_CONFUSIONS = 20


def encode(values: np.ndarray, names: list[str], what: str = "label") -> np.ndarray:
    """Index of each value in `names`; a value missing from `names` is a ValueError naming it."""
    values = np.asarray(values).astype(str)
    codes = pd.Index(list(names)).astype(str).get_indexer(values).astype(np.int64)
    if (codes < 0).any():
        bad = sorted(set(values[codes < 0]))
        raise ValueError(f"{what} {bad[0]!r} is not one of {', '.join(map(str, names[:10]))}")
    return codes


def ovr_differences(
    true_idx: np.ndarray,
    pred_idx: np.ndarray,
    group_codes: np.ndarray,
    n_groups: int,
    n_classes: int,
    weights_t: np.ndarray,
    *,
    judged: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Demographic parity and equalized odds differences per resample (columns of `weights_t`).

    Two classes: fairlearn's binary definitions with the first class as the positive label. More:
    each class one-vs-rest, the largest difference over classes. Only groups where `judged` is true
    take part (e.g. those with at least `min_cell_size` images). Returns two (B,) arrays.
    Classes are processed in chunks so that the (B, groups, classes) arrays stay bounded.
    """
    true_idx, pred_idx = np.asarray(true_idx), np.asarray(pred_idx)
    judged = np.ones(n_groups, bool) if judged is None else np.asarray(judged, bool)
    compact = np.cumsum(judged) - 1
    gcodes = np.where(judged[group_codes], compact[group_codes], -1)
    n_judged = int(judged.sum())
    n_boot = weights_t.shape[1]
    dp = np.full(n_boot, np.nan)
    eo = np.full(n_boot, np.nan)
    if n_judged < 2:
        return dp, eo
    ones = np.ones(len(true_idx))
    correct = (true_idx == pred_idx).astype(np.float64)
    sizes = grouped_sums(ones, gcodes, n_judged, weights_t)[:, :, None]  # (B, G, 1)
    positives = 1 if n_classes == 2 else n_classes
    step = max(1, CHUNK_FLOATS // max(1, n_boot * n_judged))
    for start in range(0, positives, step):
        width = min(positives, start + step) - start

        def per_cell(index: np.ndarray, values: np.ndarray, start: int = start, width: int = width):
            inside = (gcodes >= 0) & (index >= start) & (index < start + width)
            codes = np.where(inside, gcodes * width + index - start, -1)
            return grouped_sums(values, codes, n_judged * width, weights_t).reshape(
                n_boot, n_judged, width
            )

        selected = per_cell(pred_idx, ones)
        positive = per_cell(true_idx, ones)
        true_pos = per_cell(true_idx, correct)
        with np.errstate(invalid="ignore", divide="ignore"):
            selection = selected / sizes
            tpr = true_pos / positive
            fpr = (selected - true_pos) / (sizes - positive)
        dp_k = nan_spread(selection, axis=1)  # (B, width)
        eo_k = np.fmax(nan_spread(tpr, axis=1), nan_spread(fpr, axis=1))
        dp = np.fmax(dp, _nanmax(dp_k))
        eo = np.fmax(eo, _nanmax(eo_k))
    return dp, eo


def _nanmax(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    return np.where(finite.any(axis=1), np.max(np.where(finite, values, -np.inf), axis=1), np.nan)


def fairness_gaps(
    true_idx: np.ndarray,
    pred_idx: np.ndarray,
    group_idx: np.ndarray,
    shape: tuple[int, int],
    weights_t: np.ndarray,
    judged: np.ndarray | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Demographic parity and equalized odds differences as estimates with BCa intervals.

    The points are those of `ovr_differences` (fairlearn's definitions; one-vs-rest and the largest
    over classes beyond two). The interval is that of the difference between the two groups, of the
    class (and, for equalized odds, the rate) that give the point on the data, over the resamples:
    an interval that holds its estimate, which the resampled maximum over groups and classes (biased
    upwards) does not. `shape` is (groups, classes). Each estimate carries `class`, `high`, `low`
    (+ `rate` for equalized odds: "true positive rate" or "false positive rate"), None where fewer
    than two groups are judged.
    """
    n_groups, n_classes = shape
    judged = np.ones(n_groups, bool) if judged is None else np.asarray(judged, bool)
    none = estimate(None, None) | {"class": None, "high": None, "low": None}
    if judged.sum() < 2:
        return none, none | {"rate": None}
    true_idx, pred_idx = np.asarray(true_idx), np.asarray(pred_idx)
    correct = (true_idx == pred_idx).astype(np.float64)

    def table(index: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        flat = np.bincount(group_idx * n_classes + index, weights, n_groups * n_classes)
        return flat.reshape(n_groups, n_classes)[:, : 1 if n_classes == 2 else n_classes]

    size = np.bincount(group_idx, minlength=n_groups)[:, None].astype(np.float64)
    selected, positive, true_pos = table(pred_idx), table(true_idx), table(true_idx, correct)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = {
            "selection": selected / size,
            "true positive rate": true_pos / positive,
            "false positive rate": (selected - true_pos) / (size - positive),
        }
    rates = {k: np.where(judged[:, None], v, np.nan) for k, v in rates.items()}
    spreads = {k: nan_spread(v, axis=0) for k, v in rates.items()}  # per class

    def named(rate: str, k: int) -> dict[str, Any]:
        column = rates[rate][:, k]
        high, low = int(np.nanargmax(column)), int(np.nanargmin(column))
        if high == low:  # equal rates: any other group with a rate
            high = int(np.flatnonzero(np.isfinite(column) & (np.arange(n_groups) != low))[0])
        values = {  # the per-image quantity whose group mean is the rate
            "selection": pred_idx == k,
            "true positive rate": np.where(true_idx == k, correct, np.nan),
            "false positive rate": np.where(true_idx != k, pred_idx == k, np.nan),
        }[rate]
        pair = np.zeros(n_groups, bool)
        pair[[high, low]] = True
        gap = grouped_summary(values.astype(np.float64), group_idx, n_groups, weights_t, pair, True)
        out = {key: gap["gap"][key] for key in ("value", "ci_low", "ci_high")}
        return out | {"class": k, "high": high, "low": low}

    if not np.isfinite(spreads["selection"]).any():
        dp = none
    else:
        dp = named("selection", int(np.nanargmax(spreads["selection"])))
    odds = np.fmax(spreads["true positive rate"], spreads["false positive rate"])
    if not np.isfinite(odds).any():
        eo = none | {"rate": None}
    else:
        k = int(np.nanargmax(odds))
        tpr = spreads["true positive rate"][k]
        rate = (
            "true positive rate"
            if tpr >= np.nan_to_num(spreads["false positive rate"][k], nan=-1)
            else "false positive rate"
        )
        eo = named(rate, k) | {"rate": rate}
    return dp, eo


def named_pair(entry: dict[str, Any], classes: list[str], groups: list[str]) -> dict[str, Any]:
    """A `fairness_gaps` estimate with its class and groups by name instead of by index."""
    named = {"class": classes, "high": groups, "low": groups}
    return entry | {k: None if entry[k] is None else v[entry[k]] for k, v in named.items()}


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
    group_names = sorted(set(np.asarray(groups).astype(str)))
    return ovr_differences(
        encode(y_true, classes),
        encode(y_pred, classes, "prediction"),
        encode(groups, group_names, "group"),
        len(group_names),
        len(classes),
        transposed(weights),
    )


def confusion_counts(true_idx: np.ndarray, pred_idx: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K) confusion counts, rows true, columns predicted: one bincount on true * K + pred."""
    flat = np.asarray(true_idx, np.int64) * n_classes + np.asarray(pred_idx, np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def top_confusions(counts: np.ndarray, classes: list[str], k: int = TOP_CONFUSIONS) -> list[dict]:
    """The `k` most frequent (true, predicted) errors: count and share of the true class's images.

    Sorted by count (descending), then share (descending), then class order, so the list is
    deterministic. Pairs with no error are left out.
    """
    counts = np.asarray(counts)
    n_classes = len(classes)
    off = counts.astype(np.float64).copy()
    np.fill_diagonal(off, 0)
    flat = off.ravel()
    nonzero = np.flatnonzero(flat)
    if nonzero.size > k:  # partial selection first: O(K^2) once, no sort of all pairs
        kth = np.partition(flat[nonzero], nonzero.size - k)[nonzero.size - k]
        nonzero = nonzero[flat[nonzero] >= kth]
    row_totals = counts.sum(axis=1)
    true_i, pred_i = np.divmod(nonzero, n_classes)
    share = flat[nonzero] / row_totals[true_i]
    order = np.lexsort((pred_i, true_i, -share, -flat[nonzero]))[:k]
    return [
        {
            "true": classes[true_i[j]],
            "predicted": classes[pred_i[j]],
            "count": int(flat[nonzero][j]),
            "share": float(share[j]),
        }
        for j in order
    ]


def worst_first(entries: dict[str, dict[str, Any]]) -> list[str]:
    """Keys of {name: estimate} sorted by how badly they do: lowest value first, ties by larger
    n first (the better-evidenced failure), entries marked too_few and those without a value last."""

    def key(name: str) -> tuple:
        e = entries[name]
        value = e.get("value")
        return (
            bool(e.get("too_few")),
            value is None,
            value if value is not None else 0.0,
            -(e.get("n") or 0),
            name,
        )

    return sorted(entries, key=key)


def _by(
    summary: dict[str, np.ndarray], names: list, present: np.ndarray, min_cell_size: int
) -> dict:
    return {
        name: stamp(
            summary["point"][i], summary["ci_low"][i], summary["ci_high"][i], summary["n"][i]
        )
        | {"too_few": bool(summary["n"][i] < min_cell_size)}
        for i, name in zip(np.flatnonzero(present), names, strict=True)
    }


def performance(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    groups: np.ndarray,
    classes: list[str],
    weights: np.ndarray,
    *,
    min_cell_size: int = 0,
    top_k: int = TOP_CONFUSIONS,
) -> dict:
    """All performance metrics of one model as {"value", "ci_low", "ci_high"} estimates.

    `per_class`, `per_group` and `per_cell` ("class / group") entries carry `n` and `too_few`
    (n < min_cell_size); `worst_group_accuracy` is the worst class x group cell that is not too few
    (`skipped` counts those left out), `accuracy_gap` the spread of the group accuracies over groups
    that are not too few. `classes_worst_first` lists the classes by accuracy, worst first;
    `top_confusions` the most frequent errors; `confusion_matrix` is written up to
    FULL_CONFUSION_MAX_CLASSES classes.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    groups = np.asarray(groups).astype(str)
    classes = list(classes)
    n_classes = len(classes)
    true_idx = encode(y_true, classes)
    pred_idx = encode(y_pred, classes, "prediction")
    group_names = sorted(set(groups))
    group_idx = encode(groups, group_names, "group")
    n_groups = len(group_names)
    correct = (true_idx == pred_idx).astype(np.float64)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1, len(correct))
    weights_t = transposed(weights)
    cell_idx = group_idx * n_classes + true_idx  # cells ordered class-major below

    class_summary = grouped_summary(correct, true_idx, n_classes, weights_t, bca=True)
    group_summary = grouped_summary(
        correct, group_idx, n_groups, weights_t, np.bincount(group_idx) >= min_cell_size, bca=True
    )
    cell_counts = np.bincount(cell_idx, minlength=n_groups * n_classes)
    cell_summary = grouped_summary(
        correct, cell_idx, n_groups * n_classes, weights_t, cell_counts >= min_cell_size, bca=True
    )
    # cells in class order, then group order, that hold at least one image
    order = np.arange(n_groups * n_classes).reshape(n_groups, n_classes).T.ravel()
    present = order[cell_counts[order] > 0]
    cell_names = [f"{classes[c % n_classes]} / {group_names[c // n_classes]}" for c in present]
    per_cell = {
        name: stamp(
            cell_summary["point"][c],
            cell_summary["ci_low"][c],
            cell_summary["ci_high"][c],
            cell_counts[c],
        )
        | {"too_few": bool(cell_counts[c] < min_cell_size)}
        for name, c in zip(cell_names, present, strict=True)
    }
    # The worst cell is reported with its own interval (the one its row of per_cell shows).
    worst = cell_summary["worst"]
    if worst >= 0:
        worst_name = f"{classes[worst % n_classes]} / {group_names[worst // n_classes]}"
        worst_entry = {k: per_cell[worst_name][k] for k in ("value", "ci_low", "ci_high")}
    else:
        worst_name, worst_entry = None, estimate(None, None)
    judged_groups = np.bincount(group_idx, minlength=n_groups) >= min_cell_size
    dp, eo = fairness_gaps(
        true_idx, pred_idx, group_idx, (n_groups, n_classes), weights_t, judged_groups
    )
    counts = confusion_counts(true_idx, pred_idx, n_classes)
    per_class = _by(class_summary, classes, np.ones(n_classes, bool), min_cell_size)
    out = {
        "n": len(correct),
        "accuracy": estimate(
            correct.mean(), weights @ correct / len(correct) if len(weights) else None
        ),
        "per_class": per_class,
        "classes_worst_first": worst_first(per_class),
        "per_group": _by(group_summary, group_names, np.ones(n_groups, bool), min_cell_size),
        "per_cell": per_cell,
        "worst_group_accuracy": worst_entry
        | {
            "cell": worst_name,
            "skipped": int(((cell_counts > 0) & (cell_counts < min_cell_size)).sum()),
        },
        "accuracy_gap": _named_gap(group_summary, group_names),
        "demographic_parity_difference": named_pair(dp, classes, group_names),
        "equalized_odds_difference": named_pair(eo, classes, group_names),
        "fairness_method": _fairness_method(classes),
        "top_confusions": top_confusions(counts, classes, top_k),
    }
    if n_classes <= FULL_CONFUSION_MAX_CLASSES:
        out["confusion_matrix"] = {"labels": classes, "counts": counts.tolist()}
    return out


def _named_gap(summary: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The highest minus the lowest judged mean, with the interval of that named pair's difference
    (+ high, low: the two names, None with fewer than two judged entries)."""
    gap = dict(summary["gap"])
    high, low = gap.pop("high"), gap.pop("low")
    return gap | {
        "high": names[high] if high >= 0 else None,
        "low": names[low] if low >= 0 else None,
    }


def _fairness_method(classes: list[str]) -> str:
    if len(classes) == 2:
        return f"binary, positive label {classes[0]!r} (fairlearn's definitions)"
    return "one-vs-rest per class, the largest difference over classes"


def headline_samples(
    correct: np.ndarray,
    y_true: np.ndarray,
    groups: np.ndarray,
    weights: np.ndarray,
    *,
    min_cell_size: int = 0,
) -> dict[str, np.ndarray]:
    """Accuracy, worst-group (cell) accuracy and group accuracy gap: row 0 the estimate on the data,
    then one row per resample of `weights`. Shared resamples make two models' differences paired.
    The worst cell and the two groups of the gap are those named on the data (as `performance`
    reports them); cells and groups with fewer than `min_cell_size` images are left out."""
    correct = np.asarray(correct, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1, len(correct))
    rows_t = transposed(np.vstack([np.ones((1, len(correct))), weights]))
    # Group-major, as `performance` numbers its cells: a tie for the worst cell names the same one.
    cell_keys = pd.MultiIndex.from_arrays(
        [np.asarray(groups).astype(str), np.asarray(y_true).astype(str)]
    )
    cell_idx, cell_names = pd.factorize(cell_keys, sort=True)
    group_idx, group_names = pd.factorize(np.asarray(groups).astype(str), sort=True)
    cells = grouped_summary(
        correct,
        cell_idx,
        len(cell_names),
        rows_t,
        judged=np.bincount(cell_idx, minlength=len(cell_names)) >= min_cell_size,
    )
    group = grouped_summary(
        correct,
        group_idx,
        len(group_names),
        rows_t,
        judged=np.bincount(group_idx, minlength=len(group_names)) >= min_cell_size,
    )
    return {
        "accuracy": np.vstack([np.ones((1, len(correct))), weights]) @ correct / len(correct),
        "worst_group_accuracy": cells["worst_samples"],
        "accuracy_gap": group["gap_samples"],
    }
