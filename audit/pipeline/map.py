"""The map stage: batches of manifest rows -> per-image rows, one forward pass of the engine each.

`map_batch` is the unit of work, the same locally and on Ray: predictions, Grad-CAM for the predicted
class, its share / pointing hit / box IoU on every region (and the protected and core unions), the
counterfactual prediction, as plain per-image columns. Nothing of the batch is kept but those rows.
A split is cut into fixed shards of rows; each shard is written as one Parquet file (temporary name,
fsync, rename; page checksums), so an interrupted run - even by `kill -9` or a power loss - resumes
by skipping the shards already written, and redoes a shard whose file is torn.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from audit.explain import explain_many, mask_boxes
from audit.explain.layers import default_output
from audit.metrics.attention import region_attention
from audit.metrics.counterfactual import fill_regions_with_mean
from audit.pipeline.frames import FrameDataset, float_pixels
from audit.pipeline.rundir import durable_replace

HEAT_GRID = (8, 8)  # each image's Grad-CAM kept at this size for strategy discovery
PROTECTED = "protected"  # union of the protected regions
CORE = "core"  # union of the core regions


@dataclass
class MapSpec:
    """What the map computes for one model: its explained layer, the regions and their unions."""

    layer: str | None
    regions: list[str]
    unions: dict[str, list[str]] = field(default_factory=dict)  # union name -> member regions
    counterfactual_union: str | None = PROTECTED  # filled with the mean where no twin exists
    # Attributes with counterfactual twins, in the dataset's `twins` order; the first one's
    # counterfactual falls back to the mean fill of `counterfactual_union` where a row has no twin.
    twin_attributes: list[str] = field(default_factory=list)
    batch_size: int = 64
    autocast: bool = False  # bfloat16 autocast for the forward (GPU inference)
    keep_embeddings: bool = True  # keep each image's embedding and pooled map (for discovery)

    def region_tensors(
        self, batch: dict[str, Tensor], device: torch.device
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Masks and presence per region and union, on `device` (none for a labels-only set)."""
        if "regions" not in batch:
            return {}, {}
        masks = batch["regions"].to(device)
        present = batch["present"].to(device)
        regions = {name: masks[:, i] for i, name in enumerate(self.regions)}
        presence = {name: present[:, i] for i, name in enumerate(self.regions)}
        for union, members in self.unions.items():
            idx = [self.regions.index(m) for m in members]
            regions[union] = masks[:, idx].any(dim=1)
            presence[union] = present[:, idx].any(dim=1)
        return regions, presence


def _autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    if enabled:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def map_batch(
    model: nn.Module, spec: MapSpec, batch: dict[str, Tensor], device: torch.device
) -> dict[str, np.ndarray]:
    """Per-image columns for one batch (see module docstring); all arithmetic batched in torch."""
    x = float_pixels(batch["image"].to(device, non_blocking=True))
    with _autocast(spec.autocast, device):
        result = explain_many(model, x, ["gradcam"], {"pred": None}, layer=spec.layer)
    heat = result.maps["gradcam", "pred"].float()
    probs = result.probs.float()
    confidence, prediction = probs.max(dim=1)
    labels = batch["label"].to(device)
    regions, present = spec.region_tensors(batch, device)
    boxes = {name: mask_boxes(mask) for name, mask in regions.items()}
    measures = region_attention(heat, regions, present, boxes)
    columns: dict[str, Tensor] = {
        "index": batch["index"].to(device),
        "ok": batch["ok"].to(device),
        "prediction": prediction,
        "confidence": confidence,
        "correct": prediction == labels,
        "gradcam_mass": heat.flatten(1).sum(dim=1),
    }
    for name, values in measures.items():
        for measure, tensor in values.items():
            columns[f"{measure}:gradcam:{name}"] = tensor
    for name, mask in regions.items():
        area = mask.flatten(1).float().mean(dim=1)
        columns[f"area:{name}"] = torch.where(present[name], area, torch.nan)
    if "twins" in batch:
        columns |= counterfactual_columns(model, spec, batch, x, prediction, regions)
    if spec.keep_embeddings and result.embedding is not None:
        # What slice and strategy discovery read later: a few hundred bytes per image.
        columns["embedding"] = result.embedding.float().half()
        pooled = F.adaptive_avg_pool2d(heat[:, None], HEAT_GRID)[:, 0]
        columns["heat"] = pooled.flatten(1).half()
    return {k: v.detach().cpu().numpy() for k, v in columns.items()}


def counterfactual_images(
    spec: MapSpec, batch: dict[str, Tensor], x: Tensor, regions: dict[str, Tensor], k: int
) -> tuple[Tensor, Tensor]:
    """The k-th attribute's counterfactual of each image and whether it is a real twin.

    Where a row has no twin, the first attribute's counterfactual is the image with the protected
    regions filled with its mean colour; the others are the image itself (no counterfactual).
    """
    device = x.device
    present = batch["twins_present"][:, k].to(device)
    twins = float_pixels(batch["twins"][:, k].to(device, non_blocking=True))
    fallback = x
    if k == 0 and spec.counterfactual_union in regions:
        fallback = fill_regions_with_mean(x, regions[spec.counterfactual_union])
    return torch.where(present[:, None, None, None], twins, fallback), present


def counterfactual_columns(
    model: nn.Module,
    spec: MapSpec,
    batch: dict[str, Tensor],
    x: Tensor,
    prediction: Tensor,
    regions: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Counterfactual predictions: `flipped` for the first attribute, `flipped:<a>` for every one
    (NaN where a row has no counterfactual for that attribute); on the device of `x`."""
    device = x.device
    columns: dict[str, Tensor] = {}
    for k, attribute in enumerate(spec.twin_attributes or ["group"]):
        counterfactual, present = counterfactual_images(spec, batch, x, regions, k)
        with torch.no_grad(), _autocast(spec.autocast, device):
            cf_prediction = default_output(model(counterfactual)).float().argmax(dim=1)
        flipped = cf_prediction != prediction
        if k == 0:
            columns["counterfactual_prediction"] = cf_prediction
            columns["counterfactual_from_twin"] = present
            columns["flipped"] = flipped
            has_counterfactual = present | (spec.counterfactual_union in regions)
        else:
            has_counterfactual = present
        if spec.twin_attributes and len(spec.twin_attributes) > 1:
            columns[f"flipped:{attribute}"] = torch.where(
                has_counterfactual, flipped.float(), torch.nan
            )
    return columns


def loader(
    dataset: FrameDataset | Subset,
    batch_size: int,
    workers: int,
    device: torch.device,
) -> DataLoader:
    """Decoding and geometry in worker processes, in order, pinned for a GPU.

    Each worker keeps two batches ready (PyTorch's default): enough to hide decoding behind the
    model, and no more batches in shared memory than that at large frames."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None,
    )


def release_free_memory() -> None:
    """Hand the memory the allocator holds free back to the system (glibc's `malloc_trim`): before
    DataLoader workers are forked, and after each shard.

    A forked worker shares the audit's heap as it is at the fork, and every page either process
    then writes is copied: without the trim, the worker forked after a model's map kept a copy of
    that map's freed activations (637-702 MiB against 388 for the first model's worker, resnet18 at
    224 px; 384 with the trim, and the peak of a 1,000-image run 1,973 MiB instead of 2,403).
    After each shard, so that free space scattered in the heap does not stay resident as a long
    run goes on. A no-op where the C library has no `malloc_trim`.
    """
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def shard_bounds(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of the shards of a split."""
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def shard_path(folder: Path, start: int) -> Path:
    return folder / f"{start:09d}.parquet"


def map_shards(
    model: nn.Module,
    spec: MapSpec,
    dataset: FrameDataset,
    shards: list[tuple[int, int]],
    device: torch.device,
    workers: int,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[tuple[tuple[int, int], pd.DataFrame]]:
    """(shard, rows) for each shard, in order, from one DataLoader over all of them.

    Shards hold whole batches (but the split's last), so batches are the same whichever shards
    are pending: a resumed run, or a Ray worker running one shard, computes the same rows.
    """
    if not shards:
        return
    positions = [i for start, end in shards for i in range(start, end)]
    if workers > 0:
        release_free_memory()
    batches = iter(loader(Subset(dataset, positions), spec.batch_size, workers, device))
    for start, end in shards:
        parts = []
        done = start
        while done < end:
            batch = next(batches)
            parts.append(map_batch(model, spec, batch, device))
            done += len(batch["index"])
            if on_batch is not None:
                on_batch(len(batch["index"]))
        yield (start, end), _table(parts)
        release_free_memory()  # freed activations are not kept resident over a long run


def _table(parts: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    columns: dict[str, Any] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    for key, values in columns.items():
        if values.ndim == 2:  # a vector per image (embeddings, pooled maps): one list cell each
            columns[key] = list(values)
    return pd.DataFrame(columns).sort_values("index", kind="stable").reset_index(drop=True)


def write_shard(table: pd.DataFrame, path: Path) -> None:
    """Write a shard durably: a temporary file, fsynced, then renamed (a half-written shard never
    looks finished, even after a power loss); its pages carry checksums, checked on resume."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        table.to_parquet(tmp, index=False, write_page_checksum=True)
        durable_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def shard_is_whole(path: Path, rows: int) -> bool:
    """Whether a shard file reads back completely, with its page checksums and `rows` rows."""
    try:
        return pq.read_table(path, page_checksum_verification=True).num_rows == rows
    except (OSError, ValueError):  # pyarrow's ArrowIOError / ArrowInvalid: torn or corrupt
        return False


def pending_shards(folder: Path, bounds: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The shards not yet written whole (a resumed run skips the others, and redoes torn ones)."""
    for tmp in folder.glob("*.tmp"):  # a write a crash interrupted
        tmp.unlink()
    for start, end in bounds:
        path = shard_path(folder, start)
        if not path.is_file():
            yield start, end
        elif not shard_is_whole(path, end - start):
            path.unlink()
            yield start, end


def read_shards(folder: Path, bounds: list[tuple[int, int]]) -> pd.DataFrame:
    """All shards of a split, in order, as one table."""
    tables = [pd.read_parquet(shard_path(folder, start)) for start, _ in bounds]
    return pd.concat(tables, ignore_index=True)
