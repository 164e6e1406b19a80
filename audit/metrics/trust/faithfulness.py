"""Deletion and insertion (Petsiuk et al., "RISE", BMVC 2018): is the map faithful to the decision?

Pixels are ranked by the map (the heat map |.| of a pixel method summed over the channels, upsampled
bilinearly to the image size when smaller); ties are broken by a seeded random permutation, so that
the flat zero area of a Grad-CAM map is removed in random order rather than in raster order.
After k of the H*W pixels, with k = round(s / steps * H*W) for s = 0..steps (20 steps = 5%):

- deletion: the first k pixels (all channels) are replaced by the baseline: "zero" (black, as in
  the paper and Quantus's PixelFlipping with baseline 0; the default), "blur" (the blurred image)
  or "mean" (the image's mean colour);
- insertion: starting from the blurred image (gaussian, `blur_sigma` px), the first k pixels get
  their original values back (as in the paper).

The curve is the softmax probability of the class predicted on the unmodified image at fractions
k / (H*W) = 0..1 (both ends included); the AUC is its trapezoid integral over the fraction, so it
lies in [0, 1]. The same curves for a random pixel order (seeded, shared by all methods) are the
reference: a faithful map has a lower deletion AUC and a higher insertion AUC than random.
(Quantus's PixelFlipping integrates its curve without the unperturbed point and with dx = 1 per step;
tests/test_trust.py converts between the two.)

All inner steps of a chunk of images go through the model in one forward: (steps - 1) x images
stacked, `batch_size` perturbed images per forward; the ends (the image, the deleted image, the
blurred image) are shared by every curve and computed once. Cost: (3 + 2 (M + 1) (steps - 1)) N
images through the model for M methods (N = 256, 20 steps, one method: 20,224).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from audit.explain.layers import OutputSelector
from audit.metrics.attention import as_heat
from audit.metrics.trust.config import DELETION_BASELINES
from audit.metrics.trust.ops import class_probs, eval_mode, gaussian_blur, mean_estimate

CURVES = ("deletion", "insertion")


def step_counts(pixels: int, steps: int) -> Tensor:
    """How many pixels are perturbed after each step: round(s * pixels / steps), s = 0..steps."""
    s = torch.arange(steps + 1, dtype=torch.long)
    return (s * pixels + steps // 2) // steps


def random_permutations(n: int, pixels: int, generator: torch.Generator) -> Tensor:
    """(n, pixels) independent uniform random permutations, drawn on the CPU (device-independent)."""
    return torch.rand((n, pixels), generator=generator).argsort(dim=1)


def ranks_of(order: Tensor) -> Tensor:
    """Invert orders (N, M): rank[i, order[i, j]] = j (0 = first to be perturbed)."""
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def map_ranks(heat: Tensor, tie_break: Tensor) -> Tensor:
    """Rank of each pixel by the (N, H*W) map, descending, ties in the order of `tie_break`."""
    tie_break = tie_break.to(heat.device)
    shuffled = heat.gather(1, tie_break)
    return ranks_of(tie_break.gather(1, shuffled.argsort(dim=1, descending=True, stable=True)))


def _prepare_heat(maps: Tensor, size: tuple[int, int]) -> Tensor:
    heat = as_heat(maps.detach()).abs().float()
    if heat.shape[-2:] != size:
        heat = F.interpolate(heat[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return heat.flatten(1)


def _curve(
    model: nn.Module,
    start: Tensor,
    end: Tensor,
    ranks: Tensor,
    counts: Tensor,
    ends: tuple[Tensor, Tensor],
    targets: Tensor,
    batch_size: int,
    output: OutputSelector | None,
) -> Tensor:
    """Target probabilities (N, steps + 1) along the path that turns `start` into `end` pixel by
    pixel in rank order: at step s the pixels of rank < counts[s] come from `end`. The two ends
    (all `start`, all `end`) are shared by every curve and passed in as `ends`; only the inner
    points go through the model, (steps - 1) x images per chunk stacked into one forward."""
    n, c, h, w = start.shape
    inner = counts[1:-1].to(start.device)
    points = len(inner)
    out = []
    if points:
        per_chunk = max(1, batch_size // points)
        for i in range(0, n, per_chunk):
            j = min(n, i + per_chunk)
            switched = ranks[None, i:j] < inner[:, None, None]  # (points, b, H*W)
            mixed = torch.where(
                switched.view(points, j - i, 1, h, w), end[None, i:j], start[None, i:j]
            ).view(points * (j - i), c, h, w)
            probs = class_probs(model, mixed, batch_size, output).view(points, j - i, -1)
            out.append(probs.gather(2, targets[None, i:j, None].expand(points, -1, 1))[..., 0].T)
    middle = torch.cat(out) if out else start.new_zeros((n, 0))
    return torch.cat([ends[0][:, None], middle, ends[1][:, None]], dim=1).cpu().double()


def deletion_insertion(
    model: nn.Module,
    images: Tensor,
    maps: Mapping[str, Tensor],
    *,
    steps: int = 20,
    baseline: str = "zero",
    blur_sigma: float = 5.0,
    seed: int = 0,
    batch_size: int = 256,
    targets: Tensor | None = None,
    output: OutputSelector | None = None,
) -> dict[str, Any]:
    """Deletion and insertion curves of each method's maps, beside those of a random order.

    `images` (N, 3, H, W) in [0, 1] on the model's device; `maps` method -> (N, H, W) or (N, C, H, W)
    maps of these images (for the predicted class); `targets` default to the predicted classes.
    Returns (numpy, on the CPU):
      {"fractions": (steps + 1,), "targets": (N,),
       "curves": {"<method>/deletion" | "<method>/insertion" | "random/deletion" | "random/insertion":
                  (N, steps + 1)},
       "auc": {same keys: (N,)}, "mean_curves": {same keys: (steps + 1,)}}
    """
    if baseline not in DELETION_BASELINES:
        raise ValueError(
            f"baseline must be one of {', '.join(DELETION_BASELINES)}, got {baseline!r}"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n, _, h, w = images.shape
    generator = torch.Generator().manual_seed(seed)
    counts = step_counts(h * w, steps)
    fractions = counts.double() / (h * w)
    with eval_mode(model):
        blurred = gaussian_blur(images, blur_sigma)
        deleted = {
            "zero": torch.zeros_like(images),
            "blur": blurred,
            "mean": images.mean(dim=(2, 3), keepdim=True).expand_as(images),
        }[baseline]
        everything = class_probs(model, torch.cat([images, deleted, blurred]), batch_size, output)
        if targets is None:
            targets = everything[:n].argmax(dim=1)
        targets = targets.to(images.device).long()
        p_image, p_deleted, p_blurred = everything.view(3, n, -1).gather(
            2, targets[None, :, None].expand(3, -1, 1)
        )[..., 0]
        gone, back = (counts, (p_image, p_deleted)), (counts, (p_blurred, p_image))
        rest = (targets, batch_size, output)
        curves: dict[str, Tensor] = {}
        random_ranks = ranks_of(random_permutations(n, h * w, generator).to(images.device))
        for method, method_maps in maps.items():
            if method_maps.shape[0] != n:
                raise ValueError(f"maps of {method!r}: {method_maps.shape[0]} maps for {n} images")
            tie_break = random_permutations(n, h * w, generator)
            by_map = map_ranks(_prepare_heat(method_maps, (h, w)), tie_break)
            curves[f"{method}/deletion"] = _curve(model, images, deleted, by_map, *gone, *rest)
            curves[f"{method}/insertion"] = _curve(model, blurred, images, by_map, *back, *rest)
        curves["random/deletion"] = _curve(model, images, deleted, random_ranks, *gone, *rest)
        curves["random/insertion"] = _curve(model, blurred, images, random_ranks, *back, *rest)
    auc = {k: torch.trapezoid(v, fractions, dim=1) for k, v in curves.items()}
    return {
        "fractions": fractions.numpy(),
        "targets": targets.cpu().numpy(),
        "curves": {k: v.numpy() for k, v in curves.items()},
        "auc": {k: v.numpy() for k, v in auc.items()},
        "mean_curves": {k: v.mean(dim=0).numpy() for k, v in curves.items()},
    }


def merge_curves(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One `deletion_insertion` result for the images of consecutive calls (same steps), in order:
    curves and AUCs concatenated, the mean curves over all images."""
    if not parts:
        raise ValueError("no deletion / insertion results to merge")
    fractions = parts[0]["fractions"]
    if any(not np.array_equal(p["fractions"], fractions) for p in parts):
        raise ValueError("deletion / insertion results of different steps cannot be merged")
    curves = {k: np.concatenate([p["curves"][k] for p in parts]) for k in parts[0]["curves"]}
    return {
        "fractions": fractions,
        "targets": np.concatenate([p["targets"] for p in parts]),
        "curves": curves,
        "auc": {k: np.concatenate([p["auc"][k] for p in parts]) for k in curves},
        "mean_curves": {k: v.mean(axis=0) for k, v in curves.items()},
    }


def faithfulness_summary(
    result: Mapping[str, Any], method: str, weights: np.ndarray | None = None
) -> dict[str, Any]:
    """JSON-ready: mean deletion / insertion AUC of a method and of random order with bootstrap CIs,
    the paired differences (method minus random), `faithful` (deletion below and insertion above
    random, both CIs excluding 0), and the mean curves for a figure."""
    auc = result["auc"]
    out: dict[str, Any] = {"method": method, "fractions": result["fractions"].tolist()}
    verdict = True
    for curve in CURVES:
        own, rnd = auc[f"{method}/{curve}"], auc[f"random/{curve}"]
        diff = mean_estimate(own - rnd, weights)
        out[f"{curve}_auc"] = mean_estimate(own, weights)
        out[f"random_{curve}_auc"] = mean_estimate(rnd, weights)
        out[f"{curve}_minus_random"] = diff
        out[f"{curve}_curve"] = result["mean_curves"][f"{method}/{curve}"].tolist()
        out[f"random_{curve}_curve"] = result["mean_curves"][f"random/{curve}"].tolist()
        bound = diff["ci_high"] if curve == "deletion" else diff["ci_low"]
        if bound is None:
            bound = diff["value"]
        better = bound is not None and (bound < 0 if curve == "deletion" else bound > 0)
        verdict = verdict and better
    out["faithful"] = bool(verdict)
    return out
