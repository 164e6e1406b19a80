"""Counterfactual flips: does the prediction change when only the protected attribute changes?"""

from __future__ import annotations

import torch
from torch import Tensor


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
