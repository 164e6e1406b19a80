"""The CAM paper's weakly supervised localisation: threshold at 20% of the max, box the largest blob."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def largest_component(mask: Tensor) -> Tensor:
    """Keep, per image, the largest 8-connected component of a boolean (N, H, W) mask.

    Connected components are found in torch by propagating the maximum pixel label over 3x3
    neighbourhoods until nothing changes, batched over images and on the mask's device.
    Ties between equal-sized components go to the one whose highest pixel index is lowest.
    """
    n, h, w = mask.shape
    maskf = mask.float()
    labels = (
        torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(1, h, w) * maskf
    )
    while True:
        new = labels
        for _ in range(4):
            new = F.max_pool2d(new[:, None], 3, stride=1, padding=1)[:, 0] * maskf
        if torch.equal(new, labels):
            break
        labels = new
    flat = labels.long().view(n, -1)
    offsets = torch.arange(n, device=mask.device)[:, None] * (h * w + 1)
    counts = torch.bincount((flat + offsets).view(-1), minlength=n * (h * w + 1)).view(n, -1)
    counts[:, 0] = 0
    best = counts.argmax(dim=1)
    return (flat == best[:, None]).view(n, h, w) & mask


def mask_boxes(mask: Tensor) -> Tensor:
    """(x0, y0, x1, y1) boxes, end-exclusive, around each boolean (N, H, W) mask; -1s when empty."""
    n, h, w = mask.shape
    cols = mask.any(dim=1)
    rows = mask.any(dim=2)
    xs = torch.arange(w, device=mask.device)
    ys = torch.arange(h, device=mask.device)
    x0 = torch.where(cols, xs, w).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1) + 1
    y0 = torch.where(rows, ys, h).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    empty = ~cols.any(dim=1)
    boxes[empty] = -1
    return boxes


def cam_boxes(maps: Tensor, threshold: float = 0.2) -> Tensor:
    """Boxes around the largest connected region above `threshold` x each map's max (CAM paper).

    `maps` is (N, H, W) or (H, W); returns (N, 4) or (4,) end-exclusive pixel boxes, -1 for a map
    with no positive value.
    """
    single = maps.dim() == 2
    maps = maps[None] if single else maps
    if maps.dim() != 3:
        raise ValueError(f"maps must have shape (N, H, W), got {tuple(maps.shape)}")
    peak = maps.flatten(1).amax(dim=1).view(-1, 1, 1)
    mask = (maps >= threshold * peak) & (peak > 0)
    boxes = mask_boxes(largest_component(mask))
    return boxes[0] if single else boxes
