"""Per-image attention values aggregated by group, class and cell, with bootstrap intervals."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from audit.metrics.bootstrap import estimate, weighted_means


def groups_of(rows: pd.DataFrame) -> np.ndarray:
    """The group column with empty cells named "(none)", so that they form a group of their own."""
    return rows["group"].replace("", "(none)").to_numpy()


def aggregate_attention(
    values: dict[str, np.ndarray], rows: pd.DataFrame, weights: np.ndarray
) -> dict[str, Any]:
    """Mean share/hit/iou per region overall, per group, per class and per cell, with bootstrap CIs."""
    n = len(rows)
    groups = groups_of(rows)
    labels = rows["label"].to_numpy()
    breakdowns: dict[str, tuple[list[str], np.ndarray]] = {"overall": (["all"], np.ones((1, n)))}
    for key, keys in (
        ("per_group", groups),
        ("per_class", labels),
        ("per_cell", np.char.add(np.char.add(labels.astype(str), " / "), groups.astype(str))),
    ):
        names = sorted(set(keys))
        breakdowns[key] = (names, np.stack([keys == k for k in names]).astype(np.float64))
    out: dict[str, Any] = {}
    for key, (names, members) in breakdowns.items():
        section: dict[str, Any] = {}
        for column, per_image in values.items():
            region, measure = column.split("|")
            point = weighted_means(per_image, members, np.ones((1, n)))[0]
            boot = weighted_means(per_image, members, weights) if len(weights) else None
            for i, name in enumerate(names):
                entry = section.setdefault(name, {}).setdefault(region, {})
                finite = np.isfinite(per_image) & (members[i] > 0)
                entry[measure] = estimate(point[i], None if boot is None else boot[:, i]) | {
                    "n": int(finite.sum())
                }
        out[key] = section["all"] if key == "overall" else section
    return out
