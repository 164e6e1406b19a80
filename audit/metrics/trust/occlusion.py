"""Region occlusion, the causal test: does the prediction depend on a region's pixels?

For each annotated region and fill, the region's pixels are replaced and the drop of the probability
of the class predicted on the intact image is measured, together with whether the prediction flips:
- fill "mean": the image's mean colour (per channel, over the whole image);
- fill "blur": the same image blurred with a gaussian of `blur_sigma` pixels.

Control: the same mask moved by a random offset (dy, dx) with wrap-around (torch.roll semantics, so
the control has exactly the region's area and shape) to a place where it overlaps no annotated
region of that image (the union of every region given, plus `avoid`). The overlap of every offset
with the union is one circular cross-correlation, computed for all offsets and images at once by
FFT; one of the free offsets (never (0, 0)) is drawn uniformly, seeded per region name. Where no
offset is free the control values are NaN and the image is counted in `no_control`.

Per image: drop = p - p(region filled), control_drop = p - p(control filled), effect = drop -
control_drop, flipped / control_flipped (0/1). An image that lacks the region gets NaN throughout.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from audit.explain.layers import OutputSelector
from audit.metrics.bootstrap import estimate, weighted_means
from audit.metrics.trust.config import OCCLUSION_FILLS
from audit.metrics.trust.ops import class_probs, eval_mode, gaussian_blur, mean_estimate

MEASURES = ("drop", "control_drop", "effect", "flipped", "control_flipped")
SUMMARY = {
    "effect": "effect",
    "drop": "drop",
    "control_drop": "control_drop",
    "flip_rate": "flipped",
    "control_flip_rate": "control_flipped",
}


def region_seed(seed: int, region: str) -> int:
    """A per-region seed that does not depend on the order of the regions (nor on PYTHONHASHSEED)."""
    return (seed * 1_000_003 + zlib.crc32(region.encode())) % (2**63)


def overlap_by_offset(masks: Tensor, union: Tensor) -> Tensor:
    """(N, H, W): at [n, dy, dx] the number of pixels of `masks[n]` rolled by (dy, dx) that fall on
    `union[n]`, for every offset at once (FFT circular cross-correlation, float64, rounded)."""
    h, w = masks.shape[-2:]
    m = torch.fft.rfft2(masks.to(torch.float64))
    u = torch.fft.rfft2(union.to(torch.float64))
    return torch.fft.irfft2(u * m.conj(), s=(h, w)).round()


def control_offsets(
    masks: Tensor, union: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """(dy, dx, found) per image: a uniformly drawn offset that moves the mask off the union."""
    n, h, w = masks.shape
    free = overlap_by_offset(masks, union).flatten(1) == 0
    free[:, 0] = False  # (0, 0) is the region itself
    scores = torch.rand((n, h * w), generator=generator).to(masks.device)
    pick = torch.where(free, scores, -1.0).argmax(dim=1)
    return pick // w, pick % w, free.any(dim=1)


def roll_masks(masks: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Each (H, W) mask rolled by its own (dy, dx), as torch.roll(mask, (dy, dx), (0, 1)) would."""
    n, h, w = masks.shape
    rows = (torch.arange(h, device=masks.device)[None] - dy[:, None]) % h
    cols = (torch.arange(w, device=masks.device)[None] - dx[:, None]) % w
    index = torch.arange(n, device=masks.device)[:, None, None]
    return masks[index, rows[:, :, None], cols[:, None, :]]


def region_occlusion(
    model: nn.Module,
    images: Tensor,
    regions: Mapping[str, Tensor],
    present: Mapping[str, Tensor],
    *,
    fills: Iterable[str] = OCCLUSION_FILLS,
    blur_sigma: float = 5.0,
    seed: int = 0,
    batch_size: int = 256,
    targets: Tensor | None = None,
    avoid: Tensor | None = None,
    output: OutputSelector | None = None,
) -> dict[str, Any]:
    """Occlusion drops of every region and fill against a same-shaped control (numpy, CPU).

    `images` (N, 3, H, W) in [0, 1] on the model's device; `regions` name -> bool (N, H, W) masks,
    `present` name -> bool (N,); to test a union (e.g. hair + face) add it as a region
    (audit.metrics.attention.union_region). Returns
      {"targets": (N,), "probability": (N,), "no_control": {region: int},
       "control_offsets": {region: (N, 2) (dy, dx) the control's roll, -1 where there is none},
       "regions": {region: {fill: {"drop" | "control_drop" | "effect" | "flipped" |
                                   "control_flipped": (N,) float64}}}}
    """
    fills = tuple(fills)
    for fill in fills:
        if fill not in OCCLUSION_FILLS:
            raise ValueError(
                f"unknown occlusion fill {fill!r}; choose from {', '.join(OCCLUSION_FILLS)}"
            )
    n, _, h, w = images.shape
    device = images.device
    masks = {}
    for name, mask in regions.items():
        if mask.shape != (n, h, w):
            raise ValueError(
                f"region {name!r}: masks of shape {tuple(mask.shape)} for images {(n, h, w)}"
            )
        masks[name] = mask.to(device).bool() & present[name].to(device).bool()[:, None, None]
    union = torch.zeros((n, h, w), dtype=torch.bool, device=device)
    for mask in masks.values():
        union |= mask
    if avoid is not None:
        union |= avoid.to(device).bool()
    out: dict[str, Any] = {"regions": {}, "no_control": {}, "control_offsets": {}}
    with eval_mode(model):
        probs = class_probs(model, images, batch_size, output)
        if targets is None:
            targets = probs.argmax(dim=1)
        targets = targets.to(device).long()
        p = probs.gather(1, targets[:, None])[:, 0].double()
        filled = {
            fill: (
                images.mean(dim=(2, 3), keepdim=True).expand_as(images)
                if fill == "mean"
                else gaussian_blur(images, blur_sigma)
            )
            for fill in fills
        }
        for name, mask in masks.items():
            generator = torch.Generator().manual_seed(region_seed(seed, name))
            dy, dx, found = control_offsets(mask, union, generator)
            control = roll_masks(mask, dy, dx) & found[:, None, None]
            has = present[name].to(device).bool()
            out["no_control"][name] = int((has & ~found).sum())
            offsets = torch.stack([dy, dx], dim=1).masked_fill(~(has & found)[:, None], -1)
            out["control_offsets"][name] = offsets.cpu().numpy()
            out["regions"][name] = {}
            for fill, source in filled.items():
                both = torch.cat(
                    [
                        torch.where(mask[:, None], source, images),
                        torch.where(control[:, None], source, images),
                    ]
                )
                after = class_probs(model, both, batch_size, output)
                q = after.gather(1, targets.repeat(2)[:, None])[:, 0].double()
                flip = (after.argmax(dim=1) != targets.repeat(2)).double()
                drop, control_drop = p - q[:n], p - q[n:]
                valid_control = has & found
                columns = {
                    "drop": torch.where(has, drop, torch.nan),
                    "control_drop": torch.where(valid_control, control_drop, torch.nan),
                    "flipped": torch.where(has, flip[:n], torch.nan),
                    "control_flipped": torch.where(valid_control, flip[n:], torch.nan),
                }
                columns["effect"] = columns["drop"] - columns["control_drop"]
                out["regions"][name][fill] = {k: columns[k].cpu().numpy() for k in MEASURES}
    out["targets"] = targets.cpu().numpy()
    out["probability"] = p.cpu().numpy()
    return out


def merge_occlusion(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One `region_occlusion` result for the images of consecutive calls, in order: per-image
    values concatenated, the `no_control` counts summed."""
    if not parts:
        raise ValueError("no occlusion results to merge")
    first = parts[0]
    return {
        "targets": np.concatenate([p["targets"] for p in parts]),
        "probability": np.concatenate([p["probability"] for p in parts]),
        "no_control": {r: sum(int(p["no_control"][r]) for p in parts) for r in first["no_control"]},
        "control_offsets": {
            r: np.concatenate([p["control_offsets"][r] for p in parts])
            for r in first["control_offsets"]
        },
        "regions": {
            region: {
                fill: {
                    k: np.concatenate([p["regions"][region][fill][k] for p in parts])
                    for k in columns
                }
                for fill, columns in by_fill.items()
            }
            for region, by_fill in first["regions"].items()
        },
    }


def occlusion_columns(result: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per-image columns for samples.csv: `occlusion_<measure>:<fill>:<region>`."""
    return {
        f"occlusion_{measure}:{fill}:{region}": values
        for region, by_fill in result["regions"].items()
        for fill, columns in by_fill.items()
        for measure, values in columns.items()
    }


def _breakdowns(groups: np.ndarray, labels: np.ndarray) -> dict[str, tuple[list[str], np.ndarray]]:
    n = len(groups)
    groups = np.where(groups.astype(str) == "", "(none)", groups.astype(str))
    labels = labels.astype(str)
    cells = np.char.add(np.char.add(labels, " / "), groups)
    out = {"overall": (["all"], np.ones((1, n)))}
    for key, keys in (("per_group", groups), ("per_cell", cells)):
        names = sorted(set(keys.tolist()))
        out[key] = (names, np.stack([keys == k for k in names]).astype(np.float64))
    return out


def occlusion_summary(
    result: Mapping[str, Any],
    groups: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
) -> dict[str, Any]:
    """Means with bootstrap 95% CIs: {region: {fill: {"overall" | "per_group" | "per_cell": ...}}}.

    Each entry holds effect, drop, control_drop, flip_rate, control_flip_rate as
    {"value", "ci_low", "ci_high", "n"} (n: images with a finite value); per_group and per_cell map
    a group / "label / group" name to such an entry. `weights` are (B, N) resample weights.
    """
    breakdowns = _breakdowns(np.asarray(groups), np.asarray(labels))
    out: dict[str, Any] = {"no_control": dict(result["no_control"])}
    for region, by_fill in result["regions"].items():
        out[region] = {}
        for fill, columns in by_fill.items():
            entry: dict[str, Any] = {}
            for key, (names, members) in breakdowns.items():
                section: dict[str, dict[str, Any]] = {name: {} for name in names}
                for label, column in SUMMARY.items():
                    values = columns[column]
                    point = weighted_means(values, members, np.ones((1, len(values))))[0]
                    boot = (
                        weighted_means(values, members, weights)
                        if weights is not None and len(weights)
                        else None
                    )
                    for i, name in enumerate(names):
                        finite = np.isfinite(values) & (members[i] > 0)
                        section[name][label] = estimate(
                            point[i], None if boot is None else boot[:, i]
                        ) | {"n": int(finite.sum())}
                entry[key] = section["all"] if key == "overall" else section
            out[region][fill] = entry
    return out


def occlusion_difference(
    a: Mapping[str, Any], b: Mapping[str, Any], weights: np.ndarray | None = None
) -> dict[str, Any]:
    """Model b minus model a, paired over the same images (same order, same seed so the same
    controls): {region: {fill: {"effect_difference", "flip_rate_difference"}}} with bootstrap CIs,
    over the images where both models have a value."""
    out: dict[str, Any] = {}
    for region, by_fill in a["regions"].items():
        out[region] = {}
        for fill, columns in by_fill.items():
            other = b["regions"][region][fill]
            if len(other["effect"]) != len(columns["effect"]):
                raise ValueError("occlusion results of different images cannot be paired")
            out[region][fill] = {
                "effect_difference": mean_estimate(other["effect"] - columns["effect"], weights),
                "flip_rate_difference": mean_estimate(
                    other["flipped"] - columns["flipped"], weights
                ),
            }
    return out
