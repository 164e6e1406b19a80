"""Manifest rows -> model-frame tensors, decoded lazily (in DataLoader workers) one row at a time.

A `FrameDataset` never holds a split in memory: each item is decoded from disk when asked for, and
put through the model's own geometric preprocessing (resize / crop / pad), so images, region masks,
boxes and twins all live in the frame the model sees. Normalisation is not applied here: items are
floats in [0, 1], and the model normalises its own input (a forward pre-hook), so overlays, occlusion
and counterfactual fills work on plain pixels.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from audit.data.images import read_image
from audit.data.manifest import Manifest, parse_box
from audit.data.preprocess import Preprocess


class ImageDecodeError(ValueError):
    """An image that cannot be decoded while the audit runs, naming the file and manifest line."""


class Geometry(Protocol):
    """What a FrameDataset needs of a model's preprocessing (see audit.data.preprocess)."""

    def geometry(self, image: Tensor) -> Tensor: ...

    def geometry_mask(self, mask: Tensor) -> Tensor: ...


def squash(size: int) -> Preprocess:
    """The default frame: the whole image squashed to size x size, no normalisation."""
    return Preprocess(
        resize=size,
        crop=None,
        mode="squash",
        interpolation="bilinear",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )


def float_pixels(pixels: Tensor) -> Tensor:
    """Pixels as floats in [0, 1]: uint8 ones divided by 255 (exactly what the dataset would have
    made of them), float ones unchanged."""
    return pixels.float().div_(255) if pixels.dtype == torch.uint8 else pixels


class FrameDataset(Dataset):
    """Rows of a manifest split as dicts of tensors in a model's frame.

    Every item has `index` (position in `rows`), `image` (3, h, w) float in [0, 1], `label` (class
    index), `group` (index into `groups`, -1 for none) and `ok` (False for a skipped bad image).
    With `regions`: `regions` (R, h, w) bool in the order given and `present` (R,) bool; with
    `twins` (the manifest's twin columns, one per attribute): `twins` (A, 3, h, w) and
    `twins_present` (A,); with `protected` (region names): `protected`, the union of those masks
    (h, w), for training that needs it.

    With `uint8_pixels`, `image` and `twins` stay uint8 (0-255) and the consumer turns them into
    floats (`float_pixels`) where they are used: a batch crossing from a DataLoader worker is then a
    quarter of the bytes, which bounds the memory of the batches in flight at large frames.
    """

    def __init__(
        self,
        manifest: Manifest,
        rows: pd.DataFrame,
        classes: list[str],
        frame: Geometry,
        *,
        groups: list[str] | None = None,
        regions: list[str] | None = None,
        twins: list[str] | None = None,
        protected: list[str] | None = None,
        skip_bad: bool = False,
        cache_bytes: int = 0,
        uint8_pixels: bool = False,
    ) -> None:
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted(set(rows["label"]) - set(index))
        if unknown:
            raise ValueError(
                f"{manifest.path}: labels {unknown} are not among the model's classes {classes}"
            )
        # Only what items are made of, in arrays: no DataFrame, no Python object per row, so the
        # dataset pickles small for a worker process and the worker's pages stay shared.
        self.manifest_path = manifest.path
        self.root = manifest.root
        self.lines = rows.index.to_numpy(np.int64) + 2  # manifest lines (line 1 is the header)
        read = [
            "image",
            *(twins or []),
            *(c for c in rows.columns if c.startswith(("mask:", "box:"))),
        ]
        self.cells = {column: _utf8(rows[column]) for column in read if column in rows.columns}
        self.labels = np.array([index[v] for v in rows["label"]], dtype=np.int64)
        group_index = {g: i for i, g in enumerate(groups or [])}
        self.groups = np.array([group_index.get(g, -1) for g in rows["group"]], dtype=np.int64)
        self.frame = frame
        self.regions = list(regions or [])
        self.twins = list(twins or [])
        self.protected = list(protected or [])
        self.skip_bad = skip_bad
        self.uint8_pixels = uint8_pixels
        # Items decoded once are kept (images as uint8) when the whole split fits in cache_bytes:
        # training reads a small split every epoch; a large one is streamed, never held.
        height, width = getattr(frame, "frame", (0, 0))
        per_item = 3 * height * width * (1 + len(self.twins)) + height * width * (
            len(self.regions) + bool(self.protected)
        )
        self.cache: dict[int, dict[str, Any]] | None = (
            {} if 0 < per_item * len(rows) <= cache_bytes else None
        )

    def __len__(self) -> int:
        return len(self.lines)

    def cell(self, i: int, column: str) -> str:
        """The manifest's value in column `column` of row i ("" where empty or absent)."""
        values = self.cells.get(column)
        return "" if values is None else values[i].decode("utf-8")

    def _read(self, i: int, column: str, mode: str = "RGB") -> Tensor:
        path = self.root / self.cell(i, column)
        try:
            return read_image(str(path), mode)
        except (OSError, SyntaxError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ImageDecodeError(
                f"{path} (manifest line {self.lines[i]}, {column}): "
                f"cannot decode the image: {reason}"
            ) from None

    def _region(self, i: int, name: str, size: tuple[int, int]) -> Tensor | None:
        """The region's mask in the original image's pixels, or None where the row has none."""
        if self.cell(i, f"mask:{name}"):
            mask = self._read(i, f"mask:{name}", "mask")[0] > 0
            if tuple(mask.shape) != size:
                raise ImageDecodeError(
                    f"{self.root / self.cell(i, f'mask:{name}')} (manifest line {self.lines[i]}, "
                    f"mask:{name}): the mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                    f"{size[1]}x{size[0]} (after EXIF orientation)"
                )
            return mask
        if box := self.cell(i, f"box:{name}"):
            x0, y0, x1, y1 = parse_box(box)
            mask = torch.zeros(size, dtype=torch.bool)
            top, left = round(y0), round(x0)
            mask[top : max(round(y1), top + 1), left : max(round(x1), left + 1)] = True
            return mask
        return None

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.cache is not None and i in self.cache:
            return self.cache[i] if self.uint8_pixels else _from_cache(self.cache[i])
        try:
            item = self._item(i)
        except ImageDecodeError:
            if not self.skip_bad:
                raise
            item = self._blank(i)
        if self.cache is not None:
            self.cache[i] = item if self.uint8_pixels else _to_cache(item)
        return item

    def _item(self, i: int) -> dict[str, Any]:
        raw = self._read(i, "image")
        size = (raw.shape[1], raw.shape[2])
        image = self.frame.geometry(raw)
        h, w = image.shape[1:]
        item: dict[str, Any] = {
            "index": i,
            "image": self._pixels(image),
            "label": int(self.labels[i]),
            "group": int(self.groups[i]),
            "ok": True,
        }
        masks: dict[str, Tensor | None] = {}
        for name in {*self.regions, *self.protected}:
            full = self._region(i, name, size)
            masks[name] = None if full is None else self.frame.geometry_mask(full)
        if self.regions:
            empty = torch.zeros(h, w, dtype=torch.bool)
            item["regions"] = torch.stack(
                [m if (m := masks[r]) is not None else empty for r in self.regions]
            )
            item["present"] = torch.tensor(
                [masks[r] is not None and bool(masks[r].any()) for r in self.regions]
            )
        if self.protected:
            union = torch.zeros(h, w, dtype=torch.bool)
            for name in self.protected:
                if masks[name] is not None:
                    union |= masks[name]
            item["protected"] = union
        if self.twins:
            twins, present = [], []
            for column in self.twins:
                if self.cell(i, column):
                    twins.append(self._pixels(self.frame.geometry(self._read(i, column))))
                    present.append(True)
                else:
                    twins.append(torch.zeros_like(item["image"]))
                    present.append(False)
            item["twins"] = torch.stack(twins)
            item["twins_present"] = torch.tensor(present)
        return item

    def _pixels(self, image: Tensor) -> Tensor:
        """A decoded uint8 image as the items carry it: uint8, or float in [0, 1]."""
        return image if self.uint8_pixels else float_pixels(image)

    def _blank(self, i: int) -> dict[str, Any]:
        """A placeholder for an image that failed to decode (with skip_bad): marked not ok."""
        probe = next(
            (j for j in range(len(self)) if j != i and self._decodable(j)),
            None,
        )
        if probe is None:
            raise ImageDecodeError(f"{self.manifest_path}: no image of the split can be decoded")
        item = self._item(probe)
        zeros = {k: torch.zeros_like(v) if isinstance(v, Tensor) else v for k, v in item.items()}
        zeros |= {"index": i, "label": int(self.labels[i]), "group": int(self.groups[i])}
        zeros["ok"] = False
        if "twins_present" in zeros:
            zeros["twins_present"] = torch.zeros_like(item["twins_present"])
        return zeros

    def _decodable(self, j: int) -> bool:
        try:
            self._read(j, "image")
            return True
        except ImageDecodeError:
            return False


def _utf8(column: pd.Series) -> np.ndarray:
    """A column of strings as one fixed-width UTF-8 byte array.

    A list of per-row dicts would hold a Python object per cell; forked DataLoader workers touch
    their reference counts (and the garbage collector their headers) and so copy those pages, each
    worker growing with the data set. One array holds no object per row and stays shared.
    """
    return np.array([str(value).encode("utf-8") for value in column], dtype=np.bytes_)


_PIXELS = ("image", "twins")


def _to_cache(item: dict[str, Any]) -> dict[str, Any]:
    """An item with its pixels as uint8 (a quarter of the memory; exact, as they came from uint8)."""
    return {k: (v * 255).round().to(torch.uint8) if k in _PIXELS else v for k, v in item.items()}


def _from_cache(item: dict[str, Any]) -> dict[str, Any]:
    return {k: float_pixels(v) if k in _PIXELS else v for k, v in item.items()}
