"""Per-image attention values aggregated by group, class and cell, with bootstrap intervals."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from audit.metrics.bootstrap import grouped_summary, stamp, transposed


def groups_of(rows: pd.DataFrame, column: str = "group") -> np.ndarray:
    """A group column with empty cells named "(none)", so that they form a group of their own.

    `column` is "group" (one attribute) or "group:<attribute>"."""
    text = rows[column].astype("string").fillna("").to_numpy(dtype=object)
    return np.where(text == "", "(none)", text).astype(str)


def aggregate_attention(
    values: dict[str, np.ndarray],
    rows: pd.DataFrame,
    weights: np.ndarray,
    *,
    group_column: str = "group",
) -> dict[str, Any]:
    """Mean share/hit/iou per region overall, per group, per class and per cell, with bootstrap CIs.

    `values` maps "region|measure" to one value per row (NaN where not measured); groups are read
    from `group_column`. Rows are grouped by integer codes (bincount and a sparse one-hot product),
    so a thousand classes cost no loop over cells.
    """
    n = len(rows)
    groups = groups_of(rows, group_column)
    labels = rows["label"].to_numpy().astype(str)
    weights_t = transposed(np.asarray(weights, dtype=np.float64).reshape(-1, n))
    breakdowns: dict[str, tuple[list[str], np.ndarray]] = {
        "overall": (["all"], np.zeros(n, dtype=np.int64))
    }
    for key, keys in (
        ("per_group", groups),
        ("per_class", labels),
        ("per_cell", np.char.add(np.char.add(labels, " / "), groups)),
    ):
        codes, names = pd.factorize(keys, sort=True)
        breakdowns[key] = ([str(k) for k in names], codes)
    out: dict[str, Any] = {}
    for key, (names, codes) in breakdowns.items():
        section: dict[str, Any] = {}
        for column, per_image in values.items():
            region, measure = column.split("|")
            summary = grouped_summary(per_image, codes, len(names), weights_t)
            for i, name in enumerate(names):
                entry = section.setdefault(name, {}).setdefault(region, {})
                entry[measure] = stamp(
                    summary["point"][i],
                    summary["ci_low"][i],
                    summary["ci_high"][i],
                    summary["n"][i],
                )
        out[key] = section["all"] if key == "overall" else section
    return out
