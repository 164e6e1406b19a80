"""The trust stage: can a model's explanations be believed? Run on a fixed seeded sample.

For each model, on the same `[trust] samples` images of the evaluation split (decoded in the
model's frame): the cascading model-parameter randomization test of every method (Adebayo et al.),
deletion and insertion against a random order (Petsiuk et al.) on the first
`faithfulness_samples` of them, and region occlusion against a same-shaped control (the causal
test). The figures go into `metrics.models.<name>.trust`, the per-image occlusion columns into
samples.csv, and the randomization strip of one image into overlays/trust/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from audit.explain import CAMNotApplicableError, explain_many
from audit.metrics.bootstrap import resample_weights
from audit.metrics.trust import (
    TrustConfig,
    deletion_insertion,
    faithfulness_summary,
    occlusion_columns,
    occlusion_summary,
    randomization_test,
    region_occlusion,
)
from audit.pipeline.frames import FrameDataset
from audit.pipeline.map import MapSpec
from audit.report.overlays import heat_overlay

TRUST_SEED_OFFSET = 29  # the sample and its resamples differ from the gallery's and the run's


def trust_sample(n: int, config: TrustConfig, seed: int) -> np.ndarray:
    """Sorted positions of the evaluation split the checks run on (the same for every model)."""
    rng = np.random.default_rng([seed, TRUST_SEED_OFFSET])
    return np.sort(rng.choice(n, size=min(config.samples, n), replace=False))


def _load(dataset: FrameDataset, positions: np.ndarray) -> dict[str, Tensor]:
    return default_collate([dataset[int(i)] for i in positions])


def run_trust(
    name: str,
    model: nn.Module,
    spec: MapSpec,
    dataset: FrameDataset,
    positions: np.ndarray,
    groups: np.ndarray,
    labels: np.ndarray,
    methods: list[str],
    config: TrustConfig,
    n_boot: int,
    seed: int,
    folder: Path,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """(metrics block, samples.csv columns over `positions`, raw occlusion result for pairing)."""
    batch = _load(dataset, positions)
    images = batch["image"].to(device)
    weights = resample_weights(len(positions), n_boot, seed + TRUST_SEED_OFFSET)
    methods = list(methods)
    try:
        explain_many(model, images[:1], methods, {"pred": None}, layer=spec.layer)
    except CAMNotApplicableError:
        methods.remove("cam")
    randomization, strips = randomization_test(
        model,
        images,
        methods,
        threshold=config.max_randomized_correlation,
        n_boot=n_boot,
        seed=seed,
        layer=spec.layer,
        cascade=config.cascade,
        batch_size=config.batch_size,
    )
    _save_strips(folder / "trust" / name, images[0].cpu(), strips)
    k = min(config.faithfulness_samples, len(positions))
    with torch.no_grad():
        targets = model(images[:k]).argmax(dim=1)
    maps = explain_many(model, images[:k], methods, {"pred": targets}, layer=spec.layer).maps
    curves = deletion_insertion(
        model,
        images[:k],
        {m: maps[m, "pred"] for m in methods},
        steps=config.steps,
        baseline=config.deletion_baseline,
        blur_sigma=config.blur_sigma,
        seed=seed,
        batch_size=config.batch_size,
    )
    faith_weights = resample_weights(k, n_boot, seed + TRUST_SEED_OFFSET + 1)
    faithfulness = {m: faithfulness_summary(curves, m, faith_weights) for m in methods}
    regions, present = spec.region_tensors(batch, device)
    avoid = batch["regions"].to(device).any(dim=1)
    occlusion = region_occlusion(
        model,
        images,
        {r: m.cpu() for r, m in regions.items()},
        {r: p.cpu() for r, p in present.items()},
        fills=config.occlusion_fills,
        blur_sigma=config.blur_sigma,
        seed=seed,
        batch_size=config.batch_size,
        avoid=avoid.cpu(),
    )
    block = {
        "n_images": len(positions),
        "n_faithfulness_images": k,
        "methods": {
            m: {
                "randomization": randomization[m],
                "faithfulness": faithfulness[m],
                "trusted": bool(randomization[m]["passed"]),
            }
            for m in methods
        },
        "occlusion": occlusion_summary(occlusion, groups, labels, weights),
    }
    columns = occlusion_columns(occlusion)
    return block, columns, occlusion


def _save_strips(folder: Path, image: Tensor, strips: dict[str, list[Tensor]]) -> None:
    """One PNG per method: the image, then its map before and after each randomization step."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for method, maps in strips.items():
        tiles = [image.clamp(0, 1)]
        for heat in maps:
            tiles.append(heat_overlay(image[None], heat[None].float().cpu())[0])
        gap = torch.ones(3, image.shape[1], 2)
        row = torch.cat([t for tile in tiles for t in (tile, gap)][:-1], dim=2)
        pixels = (row.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{method}.png")
