"""Heat-map overlays as PNG: Grad-CAM over the image with the CAM-paper box, annotated regions outlined.

All images of a batch are composed in torch; only the PNG encoding is per image.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from audit.explain import CAM_METHODS, Explanation, cam_boxes, normalize_maps

DISPLAY_SIZE = 128  # overlays are upscaled to at least this many pixels a side
_LUT = torch.from_numpy(matplotlib.colormaps["jet"](np.linspace(0, 1, 256))[:, :3]).float()
OUTLINE_COLOURS = [
    (1.0, 0.0, 1.0),
    (0.0, 1.0, 1.0),
    (0.2, 1.0, 0.2),
    (1.0, 0.85, 0.0),
    (1.0, 0.5, 0.0),
]


def _scale(images: Tensor) -> int:
    return max(1, -(-DISPLAY_SIZE // images.shape[-1]))


def _upscale(images: Tensor, k: int) -> Tensor:
    return images.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def heat_overlay(images: Tensor, maps: Tensor, alpha: float = 0.5) -> Tensor:
    """(N, 3, H, W) images blended with jet-coloured (N, H, W) maps scaled to each map's max."""
    index = (normalize_maps(maps) * 255).round().long().clamp(0, 255)
    colours = _LUT[index].permute(0, 3, 1, 2)
    return (1 - alpha) * images + alpha * colours


def pixel_map_image(maps: Tensor, quantile: float = 0.99) -> Tensor:
    """Guided backprop / Guided Grad-CAM (N, 3, H, W) gradients as images: grey 0.5 is zero.

    Scaled by each map's 99th percentile of |value| rather than its maximum, because these maps
    are sparse: a few extreme pixels would otherwise leave the rest an even grey.
    """
    magnitudes = maps.flatten(1).abs()
    top = torch.quantile(magnitudes, quantile, dim=1)
    top = torch.where(top > 0, top, magnitudes.amax(dim=1)).clamp(min=1e-12).view(-1, 1, 1, 1)
    return (0.5 + 0.5 * maps / top).clamp(0, 1)


def draw_boxes(images: Tensor, boxes: Tensor, colour: tuple[float, float, float], k: int) -> Tensor:
    """Outline end-exclusive boxes (in original pixels) on images upscaled by k; -1 boxes skipped."""
    images = images.clone()
    n, _, h, w = images.shape
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    x0, y0, x1, y1 = (boxes[:, i].view(n, 1, 1) * k for i in range(4))
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    core = (xs >= x0 + 1) & (xs < x1 - 1) & (ys >= y0 + 1) & (ys < y1 - 1)
    edge = inside & ~core & (boxes[:, 0] >= 0).view(n, 1, 1)
    paint = torch.tensor(colour).view(1, 3, 1, 1)
    return torch.where(edge[:, None], paint, images)


def draw_outlines(images: Tensor, masks: dict[str, Tensor], k: int) -> Tensor:
    """Outline each region's mask (N, H, W) on images upscaled by k, one colour per region."""
    images = images.clone()
    for (_name, mask), colour in zip(masks.items(), OUTLINE_COLOURS, strict=False):
        big = _upscale(mask.float()[:, None], k)
        eroded = -F.max_pool2d(-big, 3, stride=1, padding=1)
        edge = (big - eroded) > 0
        images = torch.where(edge, torch.tensor(colour).view(1, 3, 1, 1), images)
    return images


def _write(images: Tensor, paths: list[Path]) -> None:
    data = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    for image, path in zip(data, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, compress_level=6)


def save_overlays(
    folder: Path,
    all_images: Tensor,
    positions: Tensor,
    result: Explanation,
    wrong: np.ndarray,
    regions: dict[str, Tensor],
) -> None:
    """Write <folder>/<method>/<pred|true>/<position>.png and, beside it, images/<position>.png
    (the original with the regions outlined). `positions` index `all_images` and the masks."""
    images = all_images[positions]
    k = _scale(images)
    big = _upscale(images, k)
    names = [f"{int(p):05d}.png" for p in positions]
    originals = draw_outlines(big, {r: m[positions] for r, m in regions.items()}, k)
    _write(originals, [folder.parent / "images" / n for n in names])
    for (method, target), maps in result.maps.items():
        keep = np.ones(len(positions), bool) if target == "pred" else wrong
        if not keep.any():
            continue
        sel = torch.from_numpy(np.flatnonzero(keep))
        maps = maps.detach().cpu()[sel]
        if method in CAM_METHODS:
            heat = F.interpolate(
                maps[:, None], scale_factor=k, mode="bilinear", align_corners=False
            )[:, 0]
            picture = heat_overlay(big[sel], heat)
            picture = draw_boxes(picture, cam_boxes(maps), (1.0, 1.0, 1.0), k)
        else:
            picture = _upscale(pixel_map_image(maps), k)
        _write(picture, [folder / method / target / names[i] for i in sel.tolist()])


def save_pairs(folder: Path, images: Tensor, counterfactuals: Tensor, positions: Tensor) -> None:
    """Write <position>.png showing an image and its counterfactual side by side."""
    if len(positions) == 0:
        return
    k = _scale(images)
    gap = torch.ones(len(images), 3, images.shape[2] * k, 4)
    pairs = torch.cat([_upscale(images, k), gap, _upscale(counterfactuals, k)], dim=3)
    _write(pairs, [folder / f"{int(p):05d}.png" for p in positions])
