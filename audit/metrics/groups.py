"""Fairness per protected attribute and per intersection of attributes, from one model's sample table.

A fairness review looks at several protected attributes (sex, age band, skin tone) and at their
intersections, where the worst errors hide (Buolamwini and Gebru, "Gender Shades", 2018). The
functions here are pure functions of the sample table of one model (one row per evaluated image:
`label`, `prediction`, optionally `flipped` / `flipped:<attribute>`, `share:<method>:<region>`, and one
`group:<attribute>` column per attribute, or just `group`), so the runner's reduce step can call them.

Every figure is a {"value", "ci_low", "ci_high"} estimate (+ "n") with a bootstrap interval from the
shared (B, n) resampling weights, so two models' figures are paired over the same resamples. A group
or class x group cell with fewer than `min_cell_size` images is still shown with its interval, marked
`"too_few": true`, and left out of the worst group/cell and of every gap (it is counted in `skipped`).
Computations run on integer codes through `audit.metrics.bootstrap.grouped_summary` (bincount and a
sparse one-hot product), with no loop over classes or cells; tests check them against fairlearn's
MetricFrame, sklearn and pandas groupby on the same data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from audit.metrics.bootstrap import estimate, grouped_summary, stamp, transposed
from audit.metrics.performance import encode, fairness_gaps, named_pair, worst_first

INTERSECTION = " x "  # joins attribute names ("sex x age") and group names ("female x old")
NO_GROUP = "(none)"  # the group of a row whose attribute cell is empty
PROTECTED = "protected"  # the union of the protected regions: the attention gap is measured on it
CELL_COLUMNS = ["attribute", "group", "class", "n", "accuracy", "ci_low", "ci_high", "too_few"]


class GroupError(ValueError):
    """The sample table lacks a column that a requested attribute or figure needs."""


def attribute_column(table: pd.DataFrame, attribute: str) -> str:
    """The column holding `attribute`: `group:<attribute>`, or `group` for the one-attribute form."""
    for column in (f"group:{attribute}", "group" if attribute == "group" else None):
        if column is not None and column in table.columns:
            return column
    known = ", ".join(attributes_of(table)) or "none"
    raise GroupError(f"attribute {attribute!r}: no column group:{attribute} (attributes: {known})")


def attributes_of(table: pd.DataFrame) -> list[str]:
    """The protected attributes of a table: one per `group:<name>` column, else ["group"]."""
    named = [c.split(":", 1)[1] for c in table.columns if c.startswith("group:")]
    return named or (["group"] if "group" in table.columns else [])


def _labels(values: pd.Series) -> np.ndarray:
    text = values.astype("string").fillna("").to_numpy(dtype=object)
    return np.where(text == "", NO_GROUP, text).astype(str)


def group_labels(
    table: pd.DataFrame, attributes: list[str], *, intersections: bool = True
) -> dict[str, np.ndarray]:
    """Each attribute's group per row, plus the intersection of all of them when there are two or
    more ("sex x age" -> "female x old"). Empty cells form the group "(none)"."""
    out = {a: _labels(table[attribute_column(table, a)]) for a in attributes}
    if intersections and len(attributes) > 1:
        joined = out[attributes[0]].astype(object)
        for a in attributes[1:]:
            joined = joined + INTERSECTION + out[a].astype(object)
        out[INTERSECTION.join(attributes)] = joined.astype(str)
    return out


def _require(table: pd.DataFrame, *columns: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise GroupError(f"sample table lacks column(s) {', '.join(missing)}")


def _entries(summary: dict, names: list[str], min_cell_size: int, **extra: list) -> dict:
    return {
        name: stamp(summary["point"][i], summary["ci_low"][i], summary["ci_high"][i])
        | {"n": int(summary["n"][i]), "too_few": bool(summary["n"][i] < min_cell_size)}
        | {k: v[i] for k, v in extra.items()}
        for i, name in enumerate(names)
    }


def _extreme(summary: dict, names: list[str], key: str) -> dict[str, Any]:
    """The lowest judged entry, with its own interval: one cell reads the same wherever it is shown."""
    i = summary["worst"]
    if i < 0:
        return estimate(None, None) | {key: None}
    return stamp(summary["point"][i], summary["ci_low"][i], summary["ci_high"][i]) | {key: names[i]}


def _gap(summary: dict, names: list[str]) -> dict[str, Any]:
    """max - min of the judged entries' means, with the (BCa) interval of the difference between
    these two named entries over the resamples, which holds its estimate (the resampled spread of
    the max and the min does not: it is biased upwards where the groups are close)."""
    gap = dict(summary["gap"])
    high, low = gap.pop("high"), gap.pop("low")
    if high < 0:
        return estimate(None, None) | {"high": None, "low": None}
    return gap | {"high": names[high], "low": names[low]}


def _one(
    labels: np.ndarray,
    table: pd.DataFrame,
    attribute: str,
    classes: list[str],
    true_idx: np.ndarray,
    pred_idx: np.ndarray,
    weights_t: np.ndarray,
    min_cell_size: int,
) -> dict[str, Any]:
    n_classes = len(classes)
    correct = (true_idx == pred_idx).astype(np.float64)
    group_idx, group_names = pd.factorize(labels, sort=True)
    group_names = [str(g) for g in group_names]
    n_groups = len(group_names)
    sizes = np.bincount(group_idx, minlength=n_groups)
    judged = sizes >= min_cell_size
    groups = grouped_summary(correct, group_idx, n_groups, weights_t, judged, bca=True)
    # class x group cells that hold images, in class order then group order
    cell_idx, cell_codes = pd.factorize(true_idx * n_groups + group_idx, sort=True)
    cell_codes = np.asarray(cell_codes)
    cell_class, cell_group = np.divmod(cell_codes, n_groups)
    cell_sizes = np.bincount(cell_idx, minlength=len(cell_codes))
    cell_judged = cell_sizes >= min_cell_size
    cells = grouped_summary(correct, cell_idx, len(cell_codes), weights_t, cell_judged, bca=True)
    cell_names = [
        f"{classes[c]} / {group_names[g]}" for c, g in zip(cell_class, cell_group, strict=True)
    ]
    dp, eo = fairness_gaps(true_idx, pred_idx, group_idx, (n_groups, n_classes), weights_t, judged)
    worst_group = _extreme(groups, group_names, "group")
    worst_cell = _extreme(cells, cell_names, "cell")
    if worst_cell["cell"] is not None:
        i = cell_names.index(worst_cell["cell"])
        worst_cell |= {"class": classes[cell_class[i]], "group": group_names[cell_group[i]]}
    block: dict[str, Any] = {
        "kind": "intersection" if INTERSECTION in attribute else "attribute",
        "attributes": attribute.split(INTERSECTION),
        "groups": group_names,
        "min_cell_size": int(min_cell_size),
        "per_group": _entries(groups, group_names, min_cell_size),
        "per_cell": _entries(
            cells,
            cell_names,
            min_cell_size,
            **{
                "class": [classes[c] for c in cell_class],
                "group": [group_names[g] for g in cell_group],
            },
        ),
        "worst_group_accuracy": worst_group,
        "worst_cell_accuracy": worst_cell,
        "accuracy_gap": _gap(groups, group_names),
        "demographic_parity_difference": named_pair(dp, classes, group_names),
        "equalized_odds_difference": named_pair(eo, classes, group_names),
        "fairness_method": (
            f"binary, positive label {classes[0]!r} (fairlearn's definitions)"
            if n_classes == 2
            else "one-vs-rest per class, the largest difference over classes"
        ),
        "skipped": {
            "groups": [g for g, ok in zip(group_names, judged, strict=True) if not ok],
            "cells": int((~cell_judged).sum()),
        },
    }
    flip_column = next((c for c in (f"flipped:{attribute}", "flipped") if c in table.columns), None)
    if flip_column is not None:
        flipped = table[flip_column].to_numpy(dtype=np.float64)
        flips = grouped_summary(flipped, group_idx, n_groups, weights_t, judged, bca=True)
        block["flip_rate"] = {
            "column": flip_column,
            "per_group": _entries(flips, group_names, min_cell_size),
            "gap": _gap(flips, group_names),
        }
    attention: dict[str, dict] = {}
    for column in (c for c in table.columns if c.startswith("share:")):
        _, method, region = column.split(":", 2)
        shares = table[column].to_numpy(dtype=np.float64)
        finite_n = np.bincount(group_idx, weights=np.isfinite(shares), minlength=n_groups)
        share_judged = finite_n >= max(min_cell_size, 1)
        summary = grouped_summary(shares, group_idx, n_groups, weights_t, share_judged, bca=True)
        entry = attention.setdefault(method, {}).setdefault(region, {})
        entry["per_group"] = _entries(summary, group_names, min_cell_size)
        entry["gap"] = _gap(summary, group_names)
    if attention:
        block["attention"] = attention
    gradcam = attention.get("gradcam", {}).get(PROTECTED)
    block["attention_gap"] = (
        gradcam["gap"] | {"region": PROTECTED, "method": "gradcam"}
        if gradcam is not None
        else estimate(None, None) | {"high": None, "low": None, "region": None, "method": None}
    )
    return block


def group_metrics(
    table: pd.DataFrame,
    attributes: list[str] | None,
    classes: list[str],
    weights: np.ndarray,
    *,
    intersections: bool = True,
    min_cell_size: int = 30,
) -> dict[str, dict[str, Any]]:
    """Fairness figures of one model per protected attribute and for the intersection of all.

    `table`: one row per evaluated image (label, prediction, group columns, optionally flipped and
    share:<method>:<region>); `attributes`: names as in `group:<name>` (None: all in the table);
    `weights`: the (B, n) bootstrap weights shared by all models. Returns {attribute or
    "a x b": block}. A block holds kind ("attribute" / "intersection"), attributes, groups,
    min_cell_size, per_group and per_cell ("class / group") accuracy entries (+ n, too_few; cells
    also class and group), worst_group_accuracy (+ group), worst_cell_accuracy (+ cell, class,
    group), accuracy_gap (+ high, low), demographic_parity_difference, equalized_odds_difference,
    fairness_method, skipped {groups, cells}, flip_rate {column, per_group, gap} when the table has
    `flipped:<attribute>` or `flipped`, attention {method: {region: {per_group, gap}}} for every
    `share:` column, and attention_gap (Grad-CAM on the protected union, + high, low, region,
    method; None values when the table has no such column).
    """
    _require(table, "label", "prediction")
    attributes = list(attributes) if attributes is not None else attributes_of(table)
    if not attributes:
        raise GroupError("sample table has no group column (group or group:<attribute>)")
    classes = list(classes)
    true_idx = encode(table["label"].to_numpy(), classes)
    pred_idx = encode(table["prediction"].to_numpy(), classes, "prediction")
    weights = np.asarray(weights, dtype=np.float64).reshape(-1, len(table))
    weights_t = transposed(weights)
    labels = group_labels(table, attributes, intersections=intersections)
    return {
        name: _one(values, table, name, classes, true_idx, pred_idx, weights_t, min_cell_size)
        for name, values in labels.items()
    }


def group_samples(
    table: pd.DataFrame,
    attribute: str,
    labels: np.ndarray,
    classes: list[str],
    weights: np.ndarray,
    *,
    min_cell_size: int = 30,
) -> dict[str, np.ndarray]:
    """Headline figures of one attribute as (1 + B,) arrays: row 0 on the data, then one per resample.

    worst_cell_accuracy, accuracy_gap and attention_gap (Grad-CAM share on the protected union, if
    the table has it), over cells/groups with at least `min_cell_size` images: the worst cell and
    the gap's two groups are those named on the data, as `group_metrics` reports them. Two models' arrays
    taken with the same weights give paired differences (b - a) for the comparisons.
    """
    del attribute  # the caller's key; kept in the signature so calls read like group_metrics
    n = len(table)
    rows_t = transposed(np.vstack([np.ones((1, n)), np.asarray(weights).reshape(-1, n)]))
    true_idx = encode(table["label"].to_numpy(), list(classes))
    pred_idx = encode(table["prediction"].to_numpy(), list(classes), "prediction")
    correct = (true_idx == pred_idx).astype(np.float64)
    group_idx, group_names = pd.factorize(np.asarray(labels), sort=True)
    n_groups = len(group_names)
    judged = np.bincount(group_idx, minlength=n_groups) >= min_cell_size
    cell_idx, cell_codes = pd.factorize(true_idx * n_groups + group_idx, sort=True)
    cell_judged = np.bincount(cell_idx, minlength=len(cell_codes)) >= min_cell_size
    cells = grouped_summary(correct, cell_idx, len(cell_codes), rows_t, cell_judged)
    groups = grouped_summary(correct, group_idx, n_groups, rows_t, judged)
    out = {
        "worst_cell_accuracy": cells["worst_samples"],
        "accuracy_gap": groups["gap_samples"],
    }
    column = f"share:gradcam:{PROTECTED}"
    if column in table.columns:
        shares = table[column].to_numpy(dtype=np.float64)
        finite_n = np.bincount(group_idx, weights=np.isfinite(shares), minlength=n_groups)
        share_judged = finite_n >= max(min_cell_size, 1)
        summary = grouped_summary(shares, group_idx, n_groups, rows_t, share_judged)
        out["attention_gap"] = summary["gap_samples"]
    return out


def cell_rows(fairness: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Every class x group cell of every attribute and intersection, worst first.

    Columns CELL_COLUMNS (for a per_cell.csv). Order: cells that can be judged before those marked
    too_few; within each, ascending accuracy, ties by larger n first; then attribute, group, class.
    """
    rows = [
        {
            "attribute": attribute,
            "group": cell["group"],
            "class": cell["class"],
            "n": cell["n"],
            "accuracy": cell["value"],
            "ci_low": cell["ci_low"],
            "ci_high": cell["ci_high"],
            "too_few": cell["too_few"],
        }
        for attribute, block in fairness.items()
        for cell in block["per_cell"].values()
    ]
    frame = pd.DataFrame(rows, columns=CELL_COLUMNS)
    if frame.empty:
        return frame
    frame["_missing"] = frame["accuracy"].isna()
    frame["_minus_n"] = -frame["n"]
    frame = frame.sort_values(
        ["too_few", "_missing", "accuracy", "_minus_n", "attribute", "group", "class"],
        kind="mergesort",
        na_position="last",
    )
    return frame.drop(columns=["_missing", "_minus_n"]).reset_index(drop=True)


def worst_cells(
    fairness: dict[str, dict[str, Any]], k: int = 10, *, attribute: str | None = None
) -> list[dict[str, Any]]:
    """The `k` worst cells that can be judged (records of `cell_rows`), for the report's table;
    `attribute` keeps one attribute or intersection only (e.g. "sex x age")."""
    frame = cell_rows(fairness)
    frame = frame[~frame["too_few"].astype(bool)]
    if attribute is not None:
        frame = frame[frame["attribute"] == attribute]
    return frame.head(k).to_dict("records")


def ranked_groups(block: dict[str, Any]) -> list[str]:
    """The groups of one attribute block by accuracy, worst first (too few last)."""
    return worst_first(block["per_group"])
