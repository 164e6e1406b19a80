"""A manifest split decoded into memory at one square resolution: for benchmarks and tests only.

The audit itself never holds a split in memory (`audit.pipeline.frames` decodes batch by batch in
each model's own frame); benchmarks that train many small models on the same split use this.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import Dataset

from audit.data.images import read_image, read_rgb
from audit.data.manifest import Manifest, parse_box


def resize_image(image: Tensor, size: int) -> Tensor:
    """A (C, H, W) uint8 image resized to size x size with antialiasing."""
    return TF.resize(image, [size, size], antialias=True)


@dataclass
class SampleSet:
    """A manifest split held in memory at the audit's resolution.

    images: (N, 3, S, S) float in [0, 1]; labels: (N,) class indices; regions: name -> (N, S, S)
    bool mask (a box region is filled as a mask too); region_present: name -> (N,) bool;
    region_boxes: name -> (N, 4) end-exclusive boxes at resolution S, -1 where absent; twins:
    (N, 3, S, S) or None, with twin_present (N,).
    """

    rows: pd.DataFrame
    classes: list[str]
    images: Tensor
    labels: Tensor
    regions: dict[str, Tensor]
    region_present: dict[str, Tensor]
    region_boxes: dict[str, Tensor]
    twins: Tensor | None
    twin_present: Tensor

    def __len__(self) -> int:
        return len(self.rows)


def _mask_box(mask: Tensor) -> Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        return torch.full((4,), -1, dtype=torch.long)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def load_samples(
    manifest: Manifest,
    rows: pd.DataFrame,
    classes: list[str],
    size: int,
    *,
    with_regions: bool = True,
) -> SampleSet:
    """Decode, resize and stack the given rows of a validated manifest."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(rows["label"]) - set(index))
    if unknown:
        raise ValueError(
            f"{manifest.path}: labels {unknown} are not among the model's classes {classes}"
        )
    n = len(rows)
    images = torch.empty(n, 3, size, size)
    twins = torch.zeros(n, 3, size, size) if rows["twin"].ne("").any() else None
    twin_present = torch.zeros(n, dtype=torch.bool)
    regions = (
        {r: torch.zeros(n, size, size, dtype=torch.bool) for r in manifest.regions}
        if with_regions
        else {}
    )
    present = {r: torch.zeros(n, dtype=torch.bool) for r in regions}
    boxes = {r: torch.full((n, 4), -1, dtype=torch.long) for r in regions}
    for i, row in enumerate(rows.to_dict("records")):
        raw = read_rgb(str(manifest.resolve(row["image"])))
        height, width = raw.shape[1:]
        images[i] = resize_image(raw, size).float() / 255
        if twins is not None and row["twin"]:
            twins[i] = (
                resize_image(read_rgb(str(manifest.resolve(row["twin"]))), size).float() / 255
            )
            twin_present[i] = True
        for region in regions:
            mask = None
            if row.get(f"mask:{region}"):
                full = read_image(str(manifest.resolve(row[f"mask:{region}"])), "mask")
                mask = (
                    TF.resize(full, [size, size], interpolation=TF.InterpolationMode.NEAREST)[0] > 0
                )
            elif row.get(f"box:{region}"):
                x0, y0, x1, y1 = parse_box(row[f"box:{region}"])
                sx, sy = size / width, size / height
                mask = torch.zeros(size, size, dtype=torch.bool)
                mask[
                    round(y0 * sy) : max(round(y1 * sy), round(y0 * sy) + 1),
                    round(x0 * sx) : max(round(x1 * sx), round(x0 * sx) + 1),
                ] = True
            if mask is not None:
                regions[region][i] = mask
                present[region][i] = bool(mask.any())
                boxes[region][i] = _mask_box(mask)
    labels = torch.tensor([index[v] for v in rows["label"]], dtype=torch.long)
    return SampleSet(
        rows.reset_index(drop=True),
        classes,
        images,
        labels,
        regions,
        present,
        boxes,
        twins,
        twin_present,
    )


class ManifestDataset(Dataset):
    """A torch Dataset over a SampleSet: (image, label index, row position)."""

    def __init__(self, samples: SampleSet) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.samples.images[i], self.samples.labels[i], i
