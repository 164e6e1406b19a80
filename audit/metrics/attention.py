"""Where an explanation falls: mass share per region, pointing game, CAM-box IoU; batched in torch."""

from __future__ import annotations

import torch
from torch import Tensor

from audit.explain.boxes import cam_boxes


def as_heat(maps: Tensor) -> Tensor:
    """A non-negative (N, H, W) heat map: CAM-family maps as they are, pixel maps by |.| summed over C."""
    return maps.abs().sum(dim=1) if maps.dim() == 4 else maps.clamp(min=0)


def mass_share(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of each map's mass inside the region: sum inside / sum over the image; NaN for a zero map."""
    total = maps.flatten(1).sum(dim=1)
    inside = (maps * masks).flatten(1).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(maps.dtype).tiny), torch.nan)


def pointing_hit(maps: Tensor, masks: Tensor) -> Tensor:
    """Whether the map's maximum falls inside the region (pointing game), as 0/1; NaN for a zero map."""
    flat = maps.flatten(1)
    top = flat.argmax(dim=1)
    hit = masks.flatten(1).gather(1, top[:, None])[:, 0].float()
    return torch.where(flat.amax(dim=1) > 0, hit, torch.nan)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of end-exclusive (N, 4) boxes; NaN where either box is missing (-1)."""
    x0 = torch.maximum(a[:, 0], b[:, 0])
    y0 = torch.maximum(a[:, 1], b[:, 1])
    x1 = torch.minimum(a[:, 2], b[:, 2])
    y1 = torch.minimum(a[:, 3], b[:, 3])
    inter = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    area = lambda box: (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])  # noqa: E731
    union = area(a) + area(b) - inter
    valid = (a[:, 0] >= 0) & (b[:, 0] >= 0) & (union > 0)
    return torch.where(valid, inter.float() / union.clamp(min=1).float(), torch.nan)


def region_attention(
    maps: Tensor,
    regions: dict[str, Tensor],
    present: dict[str, Tensor],
    region_boxes: dict[str, Tensor],
) -> dict[str, dict[str, Tensor]]:
    """For each region: {"share", "hit", "iou"} per image, NaN where the image lacks the region.

    `maps` are (N, H, W) heat maps at the masks' resolution; the box is the CAM paper's (20% threshold,
    largest connected component), compared with the region's bounding box. All regions at once:
    the same figures as `mass_share`, `pointing_hit` and `box_iou` region by region, in a few
    batched passes over the (N, R, H*W) stack of masks instead of several per region.
    """
    names = list(regions)
    if not names:
        return {}
    n = maps.shape[0]
    flat = maps.flatten(1)  # (N, HW)
    masks = torch.stack([regions[r].to(maps.device) for r in names], dim=1).flatten(2)  # (N, R, HW)
    missing = ~torch.stack([present[r].to(maps.device) for r in names], dim=1)  # (N, R)
    total = flat.sum(dim=1, keepdim=True)
    inside = torch.bmm(masks.to(flat.dtype), flat[:, :, None])[..., 0]  # (N, R)
    share = torch.where(
        total > 0, inside / total.clamp(min=torch.finfo(flat.dtype).tiny), torch.nan
    )
    top = flat.argmax(dim=1)
    hit = masks.gather(2, top.view(n, 1, 1).expand(n, len(names), 1))[..., 0].float()
    hit = torch.where(flat.amax(dim=1, keepdim=True) > 0, hit, torch.nan)
    boxes = cam_boxes(maps)
    theirs = torch.stack([region_boxes[r].to(maps.device) for r in names], dim=1)  # (N, R, 4)
    iou = box_iou(boxes.repeat_interleave(len(names), dim=0), theirs.reshape(-1, 4)).view(n, -1)
    share, hit, iou = (v.masked_fill(missing, torch.nan) for v in (share, hit, iou))
    return {
        r: {"share": share[:, i], "hit": hit[:, i], "iou": iou[:, i]} for i, r in enumerate(names)
    }


def union_region(
    regions: dict[str, Tensor], present: dict[str, Tensor], names: list[str]
) -> tuple[Tensor, Tensor]:
    """The union of several regions' masks (e.g. hair + face) and where any of them is present."""
    masks = torch.stack([regions[n] for n in names]).any(dim=0)
    return masks, torch.stack([present[n] for n in names]).any(dim=0)
