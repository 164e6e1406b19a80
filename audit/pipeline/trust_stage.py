"""The trust stage: can a model's explanations be believed? Run on a fixed seeded sample.

For each model, on the same `[trust] samples` images of the evaluation split (decoded in the
model's frame): the cascading model-parameter randomization test of every method (Adebayo et al.)
on the first `randomization_samples` of them, deletion and insertion against a random order
(Petsiuk et al.) on the first `faithfulness_samples`, and region occlusion against a same-shaped
control (the causal test) on all of them, of the protected and core unions by default
(`occlusion_regions`: what the gate and the report read; each occluded region and fill costs two
forwards per image). The figures go into `metrics.models.<name>.trust`, the
per-image occlusion columns into samples.csv, and the randomization strip of one image into
overlays/trust/.

The sample streams through in batches of `[trust] batch_size` (at most `[explain] batch_size`):
explanation passes and the forwards of perturbed images alike (perturbed images 126 at a time
raised a resnet18's peak at 224 px from 2.0 to 2.6 GiB, over the map's 1.96); each batch is explained once (those maps serve randomization and deletion / insertion), then
randomized, perturbed and occluded, and only per-image numbers are kept, so the stage's memory is
that of one batch whatever the sample sizes. The random draws of deletion / insertion (tie-breaks,
the random order) and of the occlusion controls are seeded per batch from the seed and the batch's
first position, so a run is deterministic for a seed and batch size, and every model of a run gets
the same controls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from audit.explain import CAMNotApplicableError, explain_many
from audit.metrics.aggregate import groups_of
from audit.metrics.bootstrap import resample_weights
from audit.metrics.trust import (
    TrustConfig,
    deletion_insertion,
    faithfulness_summary,
    occlusion_columns,
    occlusion_summary,
    randomization_cascade,
    randomization_summary,
    region_occlusion,
)
from audit.metrics.trust.faithfulness import merge_curves
from audit.metrics.trust.occlusion import merge_occlusion
from audit.metrics.trust.ops import eval_mode
from audit.metrics.trust.randomization import CascadeResult, absolute_maps, merge_cascades
from audit.pipeline.frames import FrameDataset
from audit.pipeline.map import MapSpec, loader, release_free_memory
from audit.report.overlays import heat_overlay

if TYPE_CHECKING:
    from audit.config import ModelConfig
    from audit.pipeline.plan import RunContext

TRUST_SEED_OFFSET = 29  # the sample and its resamples differ from the gallery's and the run's


def trust_sample(n: int, config: TrustConfig, seed: int) -> np.ndarray:
    """Sorted positions of the evaluation split the checks run on (the same for every model)."""
    rng = np.random.default_rng([seed, TRUST_SEED_OFFSET])
    return np.sort(rng.choice(n, size=min(config.samples, n), replace=False))


def batch_seed(seed: int, start: int) -> int:
    """The seed of the random draws for the batch starting at sample position `start`."""
    return int(np.random.SeedSequence([seed, start]).generate_state(1, np.uint64)[0] >> 1)


def _applicable(
    model: nn.Module, image: Tensor, methods: list[str], layer: str | None
) -> list[str]:
    """The methods that can explain this model (CAM needs a global-average-pooled linear head)."""
    methods = list(methods)
    try:
        explain_many(model, image, methods, {"pred": None}, layer=layer)
    except CAMNotApplicableError:
        methods.remove("cam")
    return methods


def occluded_regions(
    spec: MapSpec, batch: dict[str, Tensor], which: str
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Masks and presence of the regions to occlude (on the batch's device): `which` "unions" keeps
    the protected / core unions where the config names any (every region where it names none),
    "all" every region and union. Controls avoid every annotated region either way."""
    regions, present = spec.region_tensors(batch, batch["image"].device)
    if which == "unions" and spec.unions:
        regions = {name: regions[name] for name in spec.unions}
        present = {name: present[name] for name in spec.unions}
    return regions, present


def decided(
    parts: list[CascadeResult], methods: list[str], config: TrustConfig, n_boot: int, seed: int
) -> bool:
    """Enough images for the randomization test: at least `randomization_min_samples`, and every
    method's bootstrap 95% interval of the final rank correlation wholly below or wholly above
    the threshold (so more images would not change the verdict but for a 5% chance)."""
    n = sum(p.targets.shape[0] for p in parts)
    if n < config.randomization_min_samples or n_boot == 0:
        return False
    cascade = merge_cascades(parts)
    weights = resample_weights(n, n_boot, seed)
    threshold = config.max_randomized_correlation
    for method in methods:
        final = randomization_summary(cascade, method, threshold, weights)["final_spearman"]
        low, high = final["ci_low"], final["ci_high"]
        if low is None or high is None or low <= threshold <= high:
            return False
    return True


def _check_batch(
    model: nn.Module,
    spec: MapSpec,
    batch: dict[str, Tensor],
    span: tuple[int, int, int],
    job: TrustJob,
    enough: Callable[[list[CascadeResult]], bool],
) -> dict[str, Any]:
    """Every check on one batch: {"randomization": [cascade per chunk], "faithfulness": ...,
    "occlusion": ...} (a check whose sample ends before this batch is absent); `span` is (the
    batch's first sample position, how many of its images the randomization and faithfulness
    samples hold). The randomization test runs on chunks of `randomization_min_samples` images
    until `enough` of the chunks so far (this batch's appended to the earlier ones)."""
    config, seed, methods = job.config, job.seed, job.methods
    images = batch["image"]
    device = images.device
    start, n_random, n_faith = span
    size = min(config.batch_size, spec.batch_size)
    out: dict[str, Any] = {}
    maps: list[tuple[dict[str, Tensor], Tensor]] = []  # the original maps, chunk by chunk
    parts = []
    chunk = config.randomization_min_samples
    for first in range(0, n_random, chunk):
        if enough(parts):
            break
        last = min(first + chunk, n_random)
        with eval_mode(model):
            maps.append(absolute_maps(model, images[first:last], methods, spec.layer, size))
        parts.append(
            randomization_cascade(
                model,
                images[first:last],
                methods,
                layer=spec.layer,
                cascade=config.cascade,
                seed=seed,
                batch_size=size,
                cuts=config.cascade_cuts,
                original=maps[-1],
            )
        )
        if start + first > 0:
            parts[-1].strip = {}  # the figure is the first image's: keep numbers only
    if parts:
        out["randomization"] = parts
    done = sum(len(t) for _, t in maps)
    if n_faith > done:
        with eval_mode(model):
            maps.append(absolute_maps(model, images[done:n_faith], methods, spec.layer, size))
    if n_faith:
        heats = {m: torch.cat([h[m] for h, _ in maps])[:n_faith] for m in methods}
        targets = torch.cat([t for _, t in maps])
        out["faithfulness"] = deletion_insertion(
            model,
            images[:n_faith],
            heats,
            steps=config.steps,
            baseline=config.deletion_baseline,
            blur_sigma=config.blur_sigma,
            seed=batch_seed(seed, start),
            batch_size=size,
            targets=targets[:n_faith],
        )
    if "regions" not in batch:  # a labels-only data set: no region to occlude
        return out
    regions, present = occluded_regions(spec, batch, config.occlusion_regions)
    out["occlusion"] = region_occlusion(
        model,
        images,
        regions,
        present,
        fills=config.occlusion_fills,
        blur_sigma=config.blur_sigma,
        seed=batch_seed(seed, start),
        batch_size=size,
        avoid=batch["regions"].to(device).any(dim=1),
    )
    return out


@dataclass(frozen=True)
class TrustSample:
    """The images the checks run on: sorted eval positions, and the group and label of each."""

    positions: np.ndarray
    groups: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class TrustJob:
    """How to check one model: its name, the methods, the [trust] settings, bootstrap resamples,
    the seed, the folder of the randomization strips, and the device."""

    name: str
    methods: list[str]
    config: TrustConfig
    n_boot: int
    seed: int
    folder: Path
    device: torch.device


def run_trust(
    model: nn.Module, spec: MapSpec, dataset: FrameDataset, sample: TrustSample, job: TrustJob
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """(metrics block, samples.csv columns over the sample's positions, raw occlusion result for
    pairing)."""
    name, methods, config, n_boot = job.name, job.methods, job.config, job.n_boot
    seed, folder, device = job.seed, job.folder, job.device
    positions, groups, labels = sample.positions, sample.groups, sample.labels
    n = len(positions)
    k_random = min(config.randomization_samples, n)
    k_faith = min(config.faithfulness_samples, n)
    size = min(config.batch_size, spec.batch_size)
    parts: dict[str, list[Any]] = {"randomization": [], "faithfulness": [], "occlusion": []}
    randomized: list[CascadeResult] = []

    def enough(more: list[CascadeResult]) -> bool:
        return decided(randomized + more, methods, config, n_boot, seed)

    first_image = None
    start = 0
    for batch in loader(Subset(dataset, positions.tolist()), size, 0, device):
        batch["image"] = batch["image"].to(device)
        if first_image is None:
            first_image = batch["image"][0].cpu()
            methods = _applicable(model, batch["image"][:1], methods, spec.layer)
        end = start + len(batch["image"])
        span = (start, max(0, min(end, k_random) - start), max(0, min(end, k_faith) - start))
        job = replace(job, methods=methods)  # the methods that apply to this model
        checks = _check_batch(model, spec, batch, span, job, enough)
        randomized.extend(checks.pop("randomization", []))
        for check, result in checks.items():
            parts[check].append(result)
        del batch
        release_free_memory()
        start = end
    cascade = merge_cascades(randomized)
    k_random = cascade.targets.shape[0]
    random_weights = resample_weights(k_random, n_boot, seed)
    randomization = {
        m: randomization_summary(cascade, m, config.max_randomized_correlation, random_weights)
        for m in methods
    }
    _save_strips(folder / "trust" / name, first_image, cascade.strip)
    curves = merge_curves(parts["faithfulness"])
    faith_weights = resample_weights(k_faith, n_boot, seed + TRUST_SEED_OFFSET + 1)
    faithfulness = {m: faithfulness_summary(curves, m, faith_weights) for m in methods}
    occlusion = merge_occlusion(parts["occlusion"]) if parts["occlusion"] else None
    weights = resample_weights(n, n_boot, seed + TRUST_SEED_OFFSET)
    block = {
        "n_images": n,
        "n_randomization_images": k_random,
        "n_faithfulness_images": k_faith,
        "methods": {
            m: {
                "randomization": randomization[m],
                "faithfulness": faithfulness[m],
                "trusted": bool(randomization[m]["passed"]),
            }
            for m in methods
        },
        "occlusion": (
            occlusion_summary(occlusion, groups, labels, weights)
            if occlusion is not None
            else {"skipped": "the data set has no region masks: nothing to occlude"}
        ),
    }
    columns = occlusion_columns(occlusion) if occlusion is not None else {}
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


def trust_model(
    ctx: RunContext, spec: ModelConfig, model: nn.Module, positions: np.ndarray
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """The trust stage of one model on the eval `positions`: (metrics block, samples.csv columns
    over the whole eval split, NaN off the sample, raw occlusion result), each verdict logged."""
    plan = ctx.plan
    eval_rows = plan.eval_rows.reset_index(drop=True)
    map_spec = plan.map_spec(spec)
    sample = TrustSample(
        positions, groups_of(eval_rows.iloc[positions]), eval_rows["label"].to_numpy()[positions]
    )
    job = TrustJob(
        name=spec.name,
        methods=plan.config.explain.methods,
        config=plan.config.trust,
        n_boot=plan.config.bootstrap,
        seed=plan.config.seed,
        folder=ctx.work / "overlays",
        device=plan.device,
    )
    dataset = plan.eval_dataset(spec, twins=False)
    block, columns, occlusion = run_trust(model, map_spec, dataset, sample, job)
    full_columns = {}
    for column, values in columns.items():
        full = np.full(len(eval_rows), np.nan)
        full[positions] = values
        full_columns[column] = full
    ctx.log.lap(f"{spec.name}: trust checks on {len(positions)} images")
    for method, entry in block["methods"].items():
        verdict = "trusted" if entry["trusted"] else "NOT trusted"
        final = entry["randomization"]["final_spearman"]["value"]
        shown = "n/a" if final is None else f"{final:.2f}"
        ctx.log(
            f"{spec.name}: {method} {verdict} (rank correlation after randomizing "
            f"every layer: {shown})"
        )
    return block, full_columns, occlusion
