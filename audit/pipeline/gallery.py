"""The images a report shows, chosen from the sample table, and their explanations.

The choice is made after the map, from per-image rows only: a seeded sample per class x group cell
(the same images for every model) and, per model, the most confident mistakes of each cell, capped,
with the number of the others stated. Only those images are decoded again and explained with every
method (predicted class, and the true class where the model is wrong), so a run with 100,000
mistakes keeps and renders a bounded number of maps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from audit.explain import CAMNotApplicableError, explain_many, mask_boxes
from audit.metrics.attention import as_heat, region_attention
from audit.pipeline.frames import FrameDataset
from audit.pipeline.map import MapSpec, counterfactual_images, loader
from audit.report.overlays import save_overlays, save_pairs

if TYPE_CHECKING:
    from audit.config import ModelConfig
    from audit.pipeline.plan import RunContext

MAX_FLIPPED_SHOWN = 24  # counterfactual pairs drawn per model


# Images per pass of the gallery: every method for two target sets, Guided Grad-CAM's input
# gradients included, costs several times a map batch; at 224 px, 128 of them peaked at 3.7 GiB.
GALLERY_BATCH = 32


def cell_names(rows: pd.DataFrame) -> np.ndarray:
    """ "<label> / <group>" per row, "(none)" for an empty group."""
    groups = rows["group"].replace("", "(none)").to_numpy().astype(str)
    return np.char.add(np.char.add(rows["label"].to_numpy().astype(str), " / "), groups)


def choose_gallery(rows: pd.DataFrame, per_cell: int, seed: int) -> np.ndarray:
    """Positions shown for every model: `per_cell` seeded random images of each class x group cell."""
    rng = np.random.default_rng([seed, 17])
    cells = cell_names(rows)
    chosen: list[int] = []
    for cell in sorted(set(cells)):
        members = np.flatnonzero(cells == cell)
        chosen.extend(rng.choice(members, size=min(per_cell, len(members)), replace=False).tolist())
    return np.array(sorted(chosen), dtype=np.int64)


def choose_mistakes(
    rows: pd.DataFrame, correct: np.ndarray, confidence: np.ndarray, cap: int
) -> dict[str, dict[str, Any]]:
    """Per cell: how many mistakes, and the `cap` most confident ones (positions, most confident first)."""
    cells = cell_names(rows)
    out = {}
    for cell in sorted(set(cells)):
        wrong = np.flatnonzero((cells == cell) & ~correct)
        order = wrong[np.argsort(-confidence[wrong], kind="stable")]
        out[cell] = {"n": len(wrong), "shown": [int(p) for p in order[:cap]]}
    return out


class _ByPosition:
    """Index a batch's tensor by eval-set positions (what the overlay writer indexes with)."""

    def __init__(self, values: Tensor, positions: Tensor) -> None:
        self.values = values
        self.lookup = {int(p): i for i, p in enumerate(positions)}

    def __getitem__(self, positions: Tensor) -> Tensor:
        return self.values[[self.lookup[int(p)] for p in positions]]


@dataclass(frozen=True)
class Shown:
    """The images the gallery explains: eval positions, those whose counterfactual pair is
    drawn, and the model's prediction for every eval image (class indices)."""

    positions: np.ndarray
    flipped: np.ndarray
    predictions: np.ndarray


@dataclass(frozen=True)
class GalleryJob:
    """How the gallery explains one model: its name, the methods, the regions outlined on the
    overlays, the folder they go to, the device, DataLoader workers and where messages go."""

    name: str
    methods: list[str]
    overlay_regions: list[str]
    folder: Path
    device: torch.device
    workers: int = 0
    log: Callable[[str], None] = print


def explain_details(
    model: nn.Module, spec: MapSpec, dataset: FrameDataset, shown: Shown, job: GalleryJob
) -> dict[str, np.ndarray]:
    """Every method on the chosen positions; overlays and counterfactual pairs into `job.folder`.

    Returns per-method attention columns (`share:<method>:<region>`, `hit:...`) over the whole
    split, NaN outside `shown.positions`. `shown.flipped` are positions whose counterfactual pair
    is drawn.
    """
    name, methods, overlay_regions = job.name, job.methods, job.overlay_regions
    folder, device, workers, log = job.folder, job.device, job.workers, job.log
    positions, flipped, predictions = shown.positions, shown.flipped, shown.predictions
    n = len(dataset)
    columns: dict[str, np.ndarray] = {}
    wanted = np.union1d(positions, flipped).astype(np.int64)
    explained = set(positions.tolist())
    flipped_set = set(flipped.tolist())
    run_methods = list(methods)
    size = min(spec.batch_size, GALLERY_BATCH)
    for batch in loader(Subset(dataset, wanted.tolist()), size, workers, device):
        pos = batch["index"]
        x = batch["image"].to(device)
        labels = batch["label"].to(device)
        regions, present = spec.region_tensors(batch, device)
        keep = torch.tensor([int(p) in explained for p in pos])
        if keep.any():
            sel = torch.nonzero(keep).flatten()
            targets = {"pred": torch.as_tensor(predictions[pos[sel].numpy()], device=device)}
            targets["true"] = labels[sel.to(device)]
            while True:
                try:
                    result = explain_many(
                        model, x[sel.to(device)], run_methods, targets, layer=spec.layer
                    )
                    break
                except CAMNotApplicableError as error:
                    log(f"{name}: CAM skipped: {error}")
                    run_methods.remove("cam")
            sub = {r: m[sel.to(device)] for r, m in regions.items()}
            sub_present = {r: p[sel.to(device)] for r, p in present.items()}
            boxes = {r: mask_boxes(m) for r, m in sub.items()}
            for method in run_methods:
                if method == "gradcam":
                    continue  # measured for every image by the map
                measures = region_attention(
                    as_heat(result.maps[method, "pred"]).float(), sub, sub_present, boxes
                )
                for region, values in measures.items():
                    for measure in ("share", "hit"):
                        key = f"{measure}:{method}:{region}"
                        column = columns.setdefault(key, np.full(n, np.nan))
                        column[pos[sel].numpy()] = values[measure].cpu().numpy()
            wrong = (targets["pred"] != targets["true"]).cpu().numpy()
            shown = pos[sel]
            images = _ByPosition(x[sel.to(device)].cpu(), shown)
            save_overlays(
                folder / name,
                images,
                shown,
                result,
                wrong,
                {r: _ByPosition(sub[r].cpu(), shown) for r in overlay_regions if r in sub},
            )
        pairs = torch.tensor([int(p) in flipped_set for p in pos])
        if pairs.any() and "twins" in batch:
            sel = torch.nonzero(pairs).flatten().to(device)
            twin, _ = counterfactual_images(spec, batch, x, regions, 0)
            save_pairs(
                folder / "counterfactuals" / name, x[sel].cpu(), twin[sel].cpu(), pos[sel.cpu()]
            )
    return columns


def explain_gallery(
    ctx: RunContext, spec: ModelConfig, model: nn.Module, rows: pd.DataFrame, positions: np.ndarray
) -> dict[str, np.ndarray]:
    """The gallery stage of one model: every method on `positions` (and the first flipped
    counterfactual pairs), overlays into the work folder; attention columns over the eval split."""
    plan = ctx.plan
    flipped = (
        np.flatnonzero(rows["flipped"].to_numpy(bool))[:MAX_FLIPPED_SHOWN]
        if "flipped" in rows
        else np.zeros(0, np.int64)
    )
    map_spec = plan.map_spec(spec)
    dataset = plan.eval_dataset(spec, twins=True)
    job = GalleryJob(
        name=spec.name,
        methods=plan.config.explain.methods,
        overlay_regions=[*plan.config.data.protected_regions, *plan.config.data.core_regions],
        folder=ctx.work / "overlays",
        device=plan.device,
        workers=0,
        log=ctx.log,
    )
    shown = Shown(positions, flipped, rows["prediction"].to_numpy())
    columns = explain_details(model, map_spec, dataset, shown, job)
    ctx.log.lap(f"{spec.name}: {len(positions)} gallery images explained with every method")
    return columns
