"""The reduce stage: per-image rows -> every metric, interval, comparison and gate of a run.

Everything here reads the sample table (one row per model x evaluated image, as in samples.csv), so
a local run, a resumed run and a Ray run give the same metrics from the same rows. Bootstrap weights
are drawn once per run and shared by all models, so differences between models are paired.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from audit.metrics.aggregate import aggregate_attention, groups_of
from audit.metrics.bootstrap import estimate, resample_weights, weighted_means
from audit.metrics.groups import group_metrics
from audit.metrics.performance import headline_samples, performance

MEASURES = ("share", "hit", "iou")


def attention_columns(table: pd.DataFrame, method: str) -> dict[str, np.ndarray]:
    """`region|measure` -> per-image values of one method, from `measure:method:region` columns."""
    values = {}
    for column in table.columns:
        parts = column.split(":")
        if len(parts) == 3 and parts[0] in MEASURES and parts[1] == method:
            values[f"{parts[2]}|{parts[0]}"] = table[column].to_numpy(np.float64)
    return values


def model_metrics(
    table: pd.DataFrame,
    classes: list[str],
    methods: list[str],
    weights: np.ndarray,
    seed: int,
    *,
    attributes: list[str] | None = None,
    intersections: bool = True,
    min_cell_size: int = 0,
) -> dict[str, Any]:
    """Performance, attention per method, counterfactual flips and fairness per protected
    attribute (and their intersection) of one model's sample table."""
    groups = groups_of(table)
    explained = table["explained"].to_numpy(bool)
    attention = {}
    for method in methods:
        values = attention_columns(table, method)
        # Grad-CAM covers every evaluated image; the other methods the explained ones.
        rows = np.ones(len(table), bool) if method == "gradcam" else explained
        if not values or not rows.any():
            continue
        sub = table[rows].reset_index(drop=True)
        sub_weights = (
            weights if method == "gradcam" else resample_weights(len(sub), len(weights), seed + 1)
        )
        attention[method] = aggregate_attention(
            {k: v[rows] for k, v in values.items()}, sub, sub_weights
        ) | {"n_images": int(rows.sum())}
    metrics: dict[str, Any] = {
        "performance": performance(
            table["label"].to_numpy(),
            table["prediction"].to_numpy(),
            groups,
            classes,
            weights,
            min_cell_size=min_cell_size,
        ),
        "fairness": group_metrics(
            table,
            attributes or None,
            classes,
            weights,
            intersections=intersections,
            min_cell_size=min_cell_size,
        ),
        "attention": attention,
        "explained_images": int(explained.sum()),
        "misclassified_images": int((~table["correct"].to_numpy(bool)).sum()),
    }
    if "flipped" in table:
        metrics["counterfactual"] = counterfactual_metrics(table, groups, weights)
    return metrics


def counterfactual_metrics(
    table: pd.DataFrame, groups: np.ndarray, weights: np.ndarray
) -> dict[str, Any]:
    """Flip rate overall and per group, with bootstrap intervals."""
    flipped = table["flipped"].to_numpy(np.float64)
    names = sorted(set(groups))
    members = np.stack([groups == g for g in names]).astype(np.float64)
    point = weighted_means(flipped, members, np.ones((1, len(flipped))))[0]
    boot = weighted_means(flipped, members, weights) if len(weights) else None
    return {
        "flip_rate": estimate(
            flipped.mean(), weights @ flipped / len(flipped) if len(weights) else None
        ),
        "n": len(flipped),
        "from_twins": int((table["counterfactual_source"] == "twin").sum()),
        "per_group": {
            g: estimate(point[i], None if boot is None else boot[:, i]) for i, g in enumerate(names)
        },
    }


def compare(
    tables: dict[str, pd.DataFrame], rows: pd.DataFrame, weights: np.ndarray
) -> list[dict[str, Any]]:
    """Differences (each model minus the first), paired over the same images and resamples."""
    names = list(tables)
    base = tables[names[0]]
    n = len(rows)
    everyone = np.ones((1, n))
    groups = groups_of(rows)
    headline = {
        name: headline_samples(
            table["correct"].to_numpy(float), rows["label"].to_numpy(), groups, weights
        )
        for name, table in tables.items()
    }
    shares = [c for c in base.columns if c.startswith("share:gradcam:")]
    comparisons = []
    for name in names[1:]:
        other = tables[name]
        entry: dict[str, Any] = {"a": names[0], "b": name, "attention_share_difference": {}}
        for column in shares:
            diff = other[column].to_numpy(np.float64) - base[column].to_numpy(np.float64)
            point = weighted_means(diff, everyone, np.ones((1, n)))[0, 0]
            boot = weighted_means(diff, everyone, weights)[:, 0] if len(weights) else None
            entry["attention_share_difference"][column.split(":")[2]] = estimate(point, boot)
        for metric, a_values in headline[names[0]].items():
            diff = headline[name][metric] - a_values
            entry[f"{metric}_difference"] = estimate(diff[0], diff[1:] if len(weights) else None)
        if "flipped" in base and "flipped" in other:
            flips = other["flipped"].to_numpy(float) - base["flipped"].to_numpy(float)
            entry["flip_rate_difference"] = estimate(
                flips.mean(), weights @ flips / n if len(weights) else None
            )
        comparisons.append(entry)
    return comparisons


def region_areas(table: pd.DataFrame) -> dict[str, float | None]:
    """Mean share of the image each region covers where present: what uniform attention gives it."""
    out: dict[str, float | None] = {}
    for column in table.columns:
        if column.startswith("area:"):
            values = table[column].to_numpy(np.float64)
            finite = values[np.isfinite(values)]
            out[column[5:]] = round(float(finite.mean()), 6) if finite.size else None
    return out
