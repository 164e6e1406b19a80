"""Image decoding: every mode Pillow opens gives the RGB a team's own loader gives, checked against
conversions computed here independently (numpy on the values written), or is refused by line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from audit.data.images import UnsupportedImageError, read_image, read_mask, read_pixels, read_rgb
from audit.data.manifest import read_manifest, validate
from audit.pipeline.frames import FrameDataset, ImageDecodeError, squash

RNG = np.random.default_rng(7)
H, W = 20, 40


def _grey3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[:, :, None], 3, axis=2).astype(np.uint8)


def test_16_bit_greyscale_is_scaled_by_its_top_byte_not_clipped_to_white(tmp_path):
    raw = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
    Image.fromarray(raw).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    expected = _grey3(raw // 256)
    assert np.array_equal(read_pixels(tmp_path / "g16.png"), expected)
    # Pillow's own convert clips at 255: what the audit read before (almost all white).
    clipped = np.asarray(Image.open(tmp_path / "g16.png").convert("RGB"))
    assert (clipped == 255).mean() > 0.99 and not np.array_equal(clipped, expected)
    # `audit explain` reads through read_rgb: the same pixels, channels first.
    assert torch.equal(
        read_rgb(str(tmp_path / "g16.png")), torch.from_numpy(expected).permute(2, 0, 1)
    )


def test_16_bit_big_endian_tiff_reads_the_same_values(tmp_path):
    raw = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
    Image.frombytes("I;16B", (W, H), raw.astype(">u2").tobytes()).save(tmp_path / "g.tif")
    assert Image.open(tmp_path / "g.tif").mode.startswith("I;16")
    assert np.array_equal(read_pixels(tmp_path / "g.tif"), _grey3(raw // 256))


def test_16_bit_colour_png_is_reduced_the_same_way(tmp_path):
    cv2 = pytest.importorskip("cv2")
    raw = RNG.integers(0, 65536, (H, W, 3)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), raw[:, :, ::-1])  # OpenCV writes BGR
    assert np.array_equal(read_pixels(tmp_path / "rgb16.png"), (raw // 256).astype(np.uint8))


def test_palette_image_gives_its_palette_colours(tmp_path):
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    index = RNG.integers(0, 256, (H, W)).astype(np.uint8)
    image = Image.fromarray(index).convert("P")
    image.putpalette(palette.ravel().tolist())
    image.save(tmp_path / "p.png", transparency=3)  # a transparent index: its RGB is the palette's
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert np.array_equal(read_pixels(tmp_path / "p.png"), palette[index])


def test_alpha_is_dropped_and_greyscale_and_1_bit_expanded(tmp_path):
    la = RNG.integers(0, 256, (H, W, 2)).astype(np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert np.array_equal(read_pixels(tmp_path / "la.png"), _grey3(la[:, :, 0]))
    rgba = RNG.integers(0, 256, (H, W, 4)).astype(np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_pixels(tmp_path / "rgba.png"), rgba[:, :, :3])
    bits = RNG.integers(0, 2, (H, W)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "one.png")
    assert Image.open(tmp_path / "one.png").mode == "1"
    assert np.array_equal(read_pixels(tmp_path / "one.png"), _grey3(bits * 255))


def test_cmyk_follows_the_standard_formula(tmp_path):
    cmyk = RNG.integers(0, 256, (H, W, 4)).astype(np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")  # lossless
    c, k = cmyk[:, :, :3].astype(float), cmyk[:, :, 3:].astype(float)
    expected = (255 - c) * (255 - k) / 255  # R = (1 - C)(1 - K), per channel
    got = read_pixels(tmp_path / "c.tif").astype(float)
    assert np.abs(got - expected).max() <= 1  # Pillow's integer rounding
    assert np.array_equal(
        read_pixels(tmp_path / "c.tif"), np.asarray(Image.open(tmp_path / "c.tif").convert("RGB"))
    )


@pytest.mark.parametrize(
    ("orientation", "turn"),
    [
        (2, np.fliplr),
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # displayed turned 90 degrees clockwise
        (8, lambda a: np.rot90(a, 1)),
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    rgb = RNG.integers(0, 256, (H, W, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(tmp_path / "o.png", exif=exif)
    assert np.array_equal(read_pixels(tmp_path / "o.png"), turn(rgb))


def test_every_other_mode_equals_the_reference_conversion(tmp_path):
    """Modes without an arithmetic reference here: transpose by EXIF, then convert("RGB")."""
    from PIL import ImageOps

    rgb = Image.fromarray(RNG.integers(0, 256, (H, W, 3)).astype(np.uint8))
    for mode, suffix in [("YCbCr", "jpg"), ("L", "jpg"), ("RGB", "jpg"), ("LAB", "tif")]:
        path = tmp_path / f"{mode}.{suffix}"
        rgb.convert(mode).save(path)
        with Image.open(path) as image:
            reference = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        assert np.array_equal(read_pixels(path), reference), mode


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_pixels_are_refused(tmp_path, mode):
    Image.fromarray(RNG.integers(0, 70000, (H, W)).astype(np.int32)).convert(mode).save(
        tmp_path / "x.tif"
    )
    with pytest.raises(UnsupportedImageError, match=f"mode {mode}"):
        read_pixels(tmp_path / "x.tif")


def test_masks_are_nonzero_in_the_files_own_values(tmp_path):
    raw = np.zeros((H, W), np.uint16)
    raw[2:5, 3:9] = 1  # a 16-bit mask of ones: top byte 0, but inside
    Image.fromarray(raw).save(tmp_path / "m16.png")
    assert np.array_equal(read_mask(tmp_path / "m16.png"), raw != 0)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[4:6, 1:3, 0] = 1  # luma rounds to 0; a channel is nonzero
    Image.fromarray(rgb).save(tmp_path / "m.png")
    assert np.array_equal(read_mask(tmp_path / "m.png"), rgb.any(axis=2))
    assert torch.equal(
        read_image(str(tmp_path / "m.png"), "mask")[0] > 0, torch.from_numpy(rgb.any(axis=2))
    )


def _manifest(root: Path, rows: list[dict[str, str]]) -> Path:
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_the_map_sees_a_16_bit_png_as_its_8_bit_equivalent(tmp_path):
    raw = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
    Image.fromarray(raw).save(tmp_path / "g16.png")
    Image.fromarray((raw // 256).astype(np.uint8)).save(tmp_path / "g8.png")
    path = _manifest(
        tmp_path,
        [
            {"image": "g16.png", "label": "a", "group": "x", "split": "test"},
            {"image": "g8.png", "label": "b", "group": "y", "split": "test"},
        ],
    )
    assert validate(path) == []
    manifest = read_manifest(path)
    frames = FrameDataset(manifest, manifest.table, ["a", "b"], squash(16))
    assert torch.equal(frames[0]["image"], frames[1]["image"])
    assert frames[0]["image"].max() < 1  # not the all-white image of before


def test_refused_and_misoriented_files_are_named_by_line(tmp_path):
    Image.fromarray(np.ones((H, W), np.float32)).save(tmp_path / "f.tif")
    rgb = RNG.integers(0, 256, (H, W, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "turned.jpg", exif=exif)  # shown as 20 wide, 40 high
    Image.fromarray(np.full((W, H), 255, np.uint8)).save(tmp_path / "upright_mask.png")
    Image.fromarray(np.full((H, W), 255, np.uint8)).save(tmp_path / "raw_mask.png")
    rows = [
        {"image": "f.tif", "label": "a", "split": "test", "mask:hair": ""},
        {"image": "turned.jpg", "label": "b", "split": "test", "mask:hair": "upright_mask.png"},
        {"image": "turned.jpg", "label": "b", "split": "val", "mask:hair": "raw_mask.png"},
    ]
    path = _manifest(tmp_path, rows)
    problems = validate(path)
    assert problems == [
        "line 2, image: f.tif: pixels Pillow reads as 32-bit floats (mode F: a floating-point "
        "TIFF) have no agreed 8-bit RGB reading; save the image as an 8-bit (or 16-bit) RGB or "
        "greyscale PNG, or a JPEG",
        "line 4, mask:hair: raw_mask.png is 40x20 but the image is 20x40 upright (its EXIF "
        "orientation turns the 40x20 pixels the file stores)",
    ]
    # The header-only check (what `audit run` does first) sees the JPEG's orientation too.
    assert validate(path, decode=False) == problems[1:]
    manifest = read_manifest(path, check_files=False)
    frames = FrameDataset(manifest, manifest.table, ["a", "b"], squash(16), regions=["hair"])
    with pytest.raises(ImageDecodeError, match=r"f\.tif \(manifest line 2, image\).*mode F"):
        frames[0]
    assert frames[1]["present"].all()
    with pytest.raises(ImageDecodeError, match=r"manifest line 4, mask:hair\): the mask is 40x20"):
        frames[2]


def test_an_image_over_pillows_pixel_limit_is_a_value_error_everyone_catches(tmp_path, monkeypatch):
    """Pillow warns (or raises) for a decompression bomb; the decoder turns both into one
    ValueError, which validate, the map and `audit explain` all report by file."""
    from audit.data.images import ImageTooLargeError

    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W // 2)  # warns between 1x and 2x
    with pytest.raises(ImageTooLargeError):
        read_pixels(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W // 4)  # raises beyond 2x
    with pytest.raises(ImageTooLargeError):
        read_pixels(tmp_path / "big.png")
    assert issubclass(ImageTooLargeError, ValueError)
