"""What `audit explain` writes: per input image a folder named after it, inside `--out` only.

    OUT/predictions.csv          one row per input: image, folder, prediction, confidence
    OUT/<name>/image.png         the input at the model's resolution, upscaled for viewing
    OUT/<name>/<method>.png      the method's map for the predicted class over the image

`<name>` is the input's file stem; inputs sharing a stem get `-2`, `-3`, ... in input order, so
two inputs never write the same file. Built on audit.report.overlays' public functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from audit.explain import CAM_METHODS, Explanation, cam_boxes
from audit.report.overlays import DISPLAY_SIZE, draw_boxes, heat_overlay, pixel_map_image


def overlay_names(images: Sequence[Path]) -> list[str]:
    """A distinct folder name per input: its stem, with -2, -3, ... for repeated stems."""
    taken: set[str] = set()
    names = []
    for path in images:
        stem = Path(path).stem or "image"
        name, n = stem, 1
        while name.lower() in taken:  # case-insensitive: some file systems fold case
            n += 1
            name = f"{stem}-{n}"
        taken.add(name.lower())
        names.append(name)
    return names


def _upscale(images: Tensor, k: int) -> Tensor:
    return images.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def _write_png(images: Tensor, paths: list[Path]) -> None:
    data = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    for image, path in zip(data, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, compress_level=6)


def save_explanations(
    out: Path, images: Tensor, result: Explanation, names: Sequence[str]
) -> dict[str, list[Path]]:
    """Write OUT/<name>/image.png and OUT/<name>/<method>.png for the predicted-class maps.

    images: (N, 3, H, W) in [0, 1], the model's input; names: one folder name per image (see
    `overlay_names`). Returns "image" and each method -> the N files written, in input order.
    """
    out = Path(out)
    k = max(1, -(-DISPLAY_SIZE // images.shape[-1]))
    big = _upscale(images, k)
    written = {"image": [out / name / "image.png" for name in names]}
    _write_png(big, written["image"])
    for (method, target), maps in result.maps.items():
        if target != "pred":
            continue
        maps = maps.detach().cpu()
        if method in CAM_METHODS:
            heat = F.interpolate(
                maps[:, None], scale_factor=k, mode="bilinear", align_corners=False
            )[:, 0]
            picture = draw_boxes(heat_overlay(big, heat), cam_boxes(maps), (1.0, 1.0, 1.0), k)
        else:
            picture = _upscale(pixel_map_image(maps), k)
        written[method] = [out / name / f"{method}.png" for name in names]
        _write_png(picture, written[method])
    return written
