"""Counterfactual flips: does the prediction change when only the protected attribute changes?"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from audit.metrics.bootstrap import estimate, grouped_summary, stamp, transposed


def fill_regions_with_mean(images: Tensor, masks: Tensor) -> Tensor:
    """Replace the pixels inside `masks` (N, H, W) by each image's per-channel mean colour."""
    mean = images.mean(dim=(2, 3), keepdim=True)
    return torch.where(masks[:, None], mean.expand_as(images), images)


def counterfactual_images(
    images: Tensor, twins: Tensor | None, twin_present: Tensor, protected: Tensor
) -> tuple[Tensor, Tensor]:
    """The counterfactual of each image: its twin where the manifest has one, else the image with
    its protected regions filled with its mean. Returns (images, source) with source 1 = twin, 0 = fill."""
    filled = fill_regions_with_mean(images, protected)
    if twins is None:
        return filled, torch.zeros(len(images), dtype=torch.long)
    chosen = torch.where(twin_present[:, None, None, None], twins, filled)
    return chosen, twin_present.long()


def flip_summary(
    flipped: np.ndarray,
    groups: np.ndarray,
    weights: np.ndarray,
    *,
    from_twins: int | None = None,
    min_cell_size: int = 0,
) -> dict[str, Any]:
    """The `counterfactual` block of metrics.json from per-image flips (what the runner writes):
    flip_rate overall, n, from_twins and per_group estimates (with n and too_few; an empty group
    is "(none)"), computed on
    shared bootstrap `weights` (B, n) so that two models' rates are paired."""
    flipped = np.asarray(flipped, dtype=np.float64)
    n = len(flipped)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1, n)
    labels = np.asarray(groups).astype(str)
    codes, names = pd.factorize(np.where(labels == "", "(none)", labels), sort=True)
    summary = grouped_summary(flipped, codes, len(names), transposed(weights))
    out: dict[str, Any] = {
        "flip_rate": estimate(
            flipped.mean() if n else None, weights @ flipped / n if len(weights) else None
        ),
        "n": n,
    }
    if from_twins is not None:
        out["from_twins"] = int(from_twins)
    out["per_group"] = {
        str(g): stamp(
            summary["point"][i], summary["ci_low"][i], summary["ci_high"][i], summary["n"][i]
        )
        | {"too_few": bool(summary["n"][i] < min_cell_size)}
        for i, g in enumerate(names)
    }
    return out
