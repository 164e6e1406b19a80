"""The one way the audit turns an image file into pixels: validation, the map, the gallery and
`audit explain` all decode through `read_pixels` / `read_mask`, so they see the same image.

Every mode Pillow opens becomes the 8-bit RGB a team's own loader gives (`Image.open(p).convert
("RGB")`, as torchvision's ImageFolder does), after the EXIF orientation is applied
(`ImageOps.exif_transpose`), with one exception Pillow gets wrong: 16-bit greyscale (modes
`I;16*`) is scaled to 8 bits by its top byte (value >> 8, as torchvision's `to_dtype(...,
scale=True)` and scikit-image's `img_as_ubyte` do), where `convert` would clip every value above 255
to white. 16-bit RGB(A) and LA PNGs are already reduced that way by Pillow's decoder. Palette, CMYK,
YCbCr, LAB, HSV and 1-bit images go through Pillow's conversion; alpha is dropped, not composited.
32-bit integer (`I`, e.g. a 16-bit PGM) and floating-point (`F`) pixels have no agreed 8-bit scale
and are refused (`UnsupportedImageError`), as is any mode Pillow cannot convert to RGB.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps
from torch import Tensor

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
REFUSED = {
    "I": "pixels Pillow reads as 32-bit integers (mode I: a 32-bit TIFF, a 16-bit PGM)",
    "F": "pixels Pillow reads as 32-bit floats (mode F: a floating-point TIFF)",
}
ORIENTATION = ExifTags.Base.Orientation
SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


class ImageTooLargeError(ValueError):
    """An image over Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`)."""


class UnsupportedImageError(ValueError):
    """An image whose pixels have no single agreed 8-bit RGB reading (mode I or F, or unconvertible)."""


@contextmanager
def strict_decoding() -> Iterator[None]:
    """Make Pillow refuse truncated files, whatever another library set globally.

    WeasyPrint sets `ImageFile.LOAD_TRUNCATED_IMAGES = True` when imported, which would let a
    truncated image through validation in any process that has rendered a PDF.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _oriented(image: Image.Image) -> Image.Image:
    """The loaded image turned as its EXIF orientation says (itself when upright or untagged)."""
    if image.getexif().get(ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def _refuse(what: str) -> UnsupportedImageError:
    return UnsupportedImageError(
        f"{what} have no agreed 8-bit RGB reading; save the image as an 8-bit (or 16-bit) "
        "RGB or greyscale PNG, or a JPEG"
    )


def to_rgb(image: Image.Image) -> np.ndarray:
    """A loaded, oriented Pillow image as (H, W, 3) uint8 RGB (see the module's rules)."""
    if image.mode in SIXTEEN_BIT:
        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in REFUSED:
        raise _refuse(REFUSED[image.mode])
    try:
        with warnings.catch_warnings():
            # "Palette images with Transparency expressed in bytes should be converted to RGBA":
            # the RGB pixels are the palette's either way.
            warnings.simplefilter("ignore", UserWarning)
            return np.asarray(image.convert("RGB"))
    except ValueError as error:
        raise _refuse(f"pixels of mode {image.mode} ({error})") from None


def to_mask(image: Image.Image) -> np.ndarray:
    """A loaded, oriented Pillow image as an (H, W) bool mask: True where any colour channel of
    the file's own values is nonzero (16- and 32-bit values read as they are, alpha ignored)."""
    if image.mode in SIXTEEN_BIT or image.mode in REFUSED:
        return np.asarray(image) != 0
    return to_rgb(image).any(axis=2)


def _open(path: str | Path, read: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Decode a whole file (truncation and images over Pillow's pixel limit refused), upright."""
    try:
        with warnings.catch_warnings(), strict_decoding():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return read(_oriented(image))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ImageTooLargeError(str(error).splitlines()[0]) from None


def read_pixels(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, upright; OSError / SyntaxError for an unreadable or
    truncated file, UnsupportedImageError for pixels with no agreed 8-bit reading, and
    ImageTooLargeError over Pillow's pixel limit (both ValueError)."""
    return _open(path, to_rgb)


def read_mask(path: str | Path) -> np.ndarray:
    """A mask image file as an (H, W) bool array, upright: True where the file is nonzero."""
    return _open(path, to_mask)


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as `read_pixels` returns it, from its header only where
    the EXIF is in the header (JPEG, TIFF, WebP); a PNG's eXIf after its pixels is not read."""
    width, height = image.size
    if "exif" in image.info and image.getexif().get(ORIENTATION, 1) in SWAPS_SIDES:
        return height, width
    return width, height


def read_image(path: str, mode: str = "RGB") -> Tensor:
    """An image file as a (C, H, W) uint8 tensor, decoded by audit.data.images (every mode to the
    same 8-bit RGB, upright): mode "RGB" gives (3, H, W); "mask" gives (1, H, W), 255 where the
    file is nonzero, 0 elsewhere."""
    if mode == "mask":
        return torch.from_numpy(read_mask(path)).to(torch.uint8).mul_(255)[None]
    if mode != "RGB":
        raise ValueError(f"read_image: mode must be 'RGB' or 'mask', got {mode!r}")
    return torch.from_numpy(read_pixels(path).copy()).permute(2, 0, 1)


def read_rgb(path: str) -> Tensor:
    """An image file as a (3, H, W) uint8 tensor (greyscale expanded to RGB)."""
    return read_image(path, "RGB")
