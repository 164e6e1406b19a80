"""Per-model preprocessing (audit.data.preprocess) against torchvision, timm and transformers.

Every geometry is compared with the library pipeline a team would have trained with, on the same
PIL images of odd, non-square sizes: uint8 frames must be identical and normalised batches equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch import nn

from audit.config import ConfigError
from audit.data.preprocess import Preprocess, PreprocessError, hf_defaults, resolve_preprocess

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
SIZES = [(50, 70), (71, 45), (64, 64), (33, 90)]  # (h, w)


def pil_images(seed: int = 0) -> list[Image.Image]:
    """Smooth random images (cumulative noise), so that resampling differences show."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in SIZES:
        steps = rng.integers(-25, 26, size=(h, w, 3))
        array = np.clip(np.cumsum(steps, axis=1) + 128, 0, 255).astype(np.uint8)
        out.append(Image.fromarray(array))
    return out


def to_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def resolve(table: dict, image_size: int = 32) -> Preprocess:
    return resolve_preprocess(table, Tiny(), "torchvision", image_size, name="m")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_crop_mode_equals_torchvision_on_pil(interpolation: str) -> None:
    pre = resolve({"resize": 40, "crop": 32, "interpolation": interpolation})
    assert pre.mode == "crop" and pre.frame == (32, 32)
    mode = (
        T.InterpolationMode.BILINEAR if interpolation == "bilinear" else T.InterpolationMode.BICUBIC
    )
    reference = T.Compose([T.Resize(40, interpolation=mode), T.CenterCrop(32), T.PILToTensor()])
    for image in pil_images():
        assert torch.equal(pre.geometry(to_uint8(image)), reference(image))


def test_squash_and_rectangular_sizes_equal_torchvision() -> None:
    pre = resolve({"resize": [30, 44], "crop": [24, 40]})
    assert pre.mode == "squash" and pre.frame == (24, 40)
    reference = T.Compose([T.Resize([30, 44]), T.CenterCrop([24, 40]), T.PILToTensor()])
    for image in pil_images(1):
        assert torch.equal(pre.geometry(to_uint8(image)), reference(image))


def test_torch_backend_equals_torchvision_on_tensors() -> None:
    pre = resolve({"resize": 40, "crop": 32, "backend": "torch", "interpolation": "bicubic"})
    for image in pil_images(2):
        x = to_uint8(image)
        resized = T.functional.resize(
            x, [40], interpolation=T.InterpolationMode.BICUBIC, antialias=True
        )
        h, w = resized.shape[-2:]
        top, left = (h - 32) // 2, (w - 32) // 2  # transformers' crop floors, torchvision's rounds
        assert torch.equal(pre.geometry(x), resized[:, top : top + 32, left : left + 32])


def test_normalize_equals_torchvision_normalize() -> None:
    pre = resolve({"resize": 32, **IMAGENET})
    x = torch.rand(3, 3, 32, 32)
    expected = T.Normalize(IMAGENET["mean"], IMAGENET["std"])(x)
    torch.testing.assert_close(pre.normalize(x), expected, rtol=0, atol=1e-6)
    assert resolve({"resize": 32}).normalize(x) is x  # identity by default: today's behaviour


def scene(h: int, w: int, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A grey image with a red rectangle at box (x0, y0, x1, y1) and its mask."""
    image = torch.full((3, h, w), 90, dtype=torch.uint8)
    x0, y0, x1, y1 = box
    image[:, y0:y1, x0:x1] = torch.tensor([250, 10, 10], dtype=torch.uint8)[:, None, None]
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return image, mask


def red(image: torch.Tensor) -> torch.Tensor:
    return (image[0].int() > 170) & (image[1].int() < 90)


@pytest.mark.parametrize(
    ("table", "box"),
    [
        ({"resize": 48, "crop": 40, "mode": "crop"}, (70, 20, 90, 40)),
        ({"resize": [40, 40], "mode": "pad"}, (10, 30, 40, 60)),
        ({"resize": [40, 56], "mode": "squash"}, (5, 5, 30, 70)),
        ({"resize": 48, "crop": 40, "mode": "crop", "backend": "torch"}, (70, 20, 90, 40)),
    ],
)
def test_masks_follow_images(table: dict, box: tuple[int, int, int, int]) -> None:
    pre = resolve(table)
    image, mask = scene(80, 120, box)
    frame, frame_mask = pre.geometry(image), pre.geometry_mask(mask)
    assert frame.shape[-2:] == frame_mask.shape == pre.frame
    assert frame_mask.dtype == torch.bool and frame_mask.any()
    seen = red(frame)
    iou = (seen & frame_mask).sum() / (seen | frame_mask).sum()
    assert iou > 0.85, iou


def test_mask_outside_the_crop_is_cut_away() -> None:
    pre = resolve({"resize": 40, "crop": 40, "mode": "crop"})
    image, mask = scene(40, 120, (0, 0, 20, 40))  # at the left edge: outside the center crop
    assert not pre.geometry_mask(mask).any() and not red(pre.geometry(image)).any()


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_aspect_ratio_is_kept(mode: str) -> None:
    """A 20 x 20 square in a 60 x 150 image stays square under crop and pad (not under squash)."""
    image, mask = scene(60, 150, (65, 20, 85, 40))
    pre = resolve({"resize": [48, 48], "mode": mode})
    ys, xs = torch.nonzero(pre.geometry_mask(mask), as_tuple=True)
    height, width = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    assert abs(height - width) <= 1, (height, width)
    squashed = resolve({"resize": [48, 48], "mode": "squash"}).geometry_mask(mask)
    ys, xs = torch.nonzero(squashed, as_tuple=True)
    assert int(ys.max() - ys.min() + 1) > 1.5 * int(xs.max() - xs.min() + 1)


def test_pad_letterboxes_with_black() -> None:
    pre = resolve({"resize": [40, 40], "mode": "pad"})
    frame = pre.geometry(torch.full((3, 20, 40), 200, dtype=torch.uint8))
    assert frame.shape == (3, 40, 40)
    assert (
        (frame[:, :10] == 0).all() and (frame[:, 30:] == 0).all() and (frame[:, 10:30] == 200).all()
    )


def test_attach_normalises_keeps_names_and_gradients() -> None:
    torch.manual_seed(0)
    model = Tiny().eval()
    names = [n for n, _ in model.named_modules()]
    pre = resolve({"resize": 32, **IMAGENET})
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    expected = model(pre.normalize(x))
    handle = pre.attach(model)
    out = model(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert [n for n, _ in model.named_modules()] == names
    with pytest.raises(RuntimeError, match="already attached"):
        pre.attach(model)
    handle.remove()
    assert not torch.allclose(model(x), expected)  # detached: raw input again


def test_attach_reorders_and_unwraps_logits() -> None:
    class Boxed(nn.Module):
        def forward(self, x: torch.Tensor):  # noqa: ANN201 - an HF-style output object
            return type("Out", (), {"logits": x.mean((2, 3))})()

    pre = Preprocess(32, None, "squash", "bilinear", (0.0,) * 3, (1.0,) * 3, class_order=(2, 0, 1))
    model = Boxed()
    pre.attach(model)
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(model(x), x.mean((2, 3))[:, [2, 0, 1]])


def test_to_dict_records_resolved_values() -> None:
    record = resolve({"resize": 40, "crop": 32, **IMAGENET}).to_dict()
    assert record == {
        "resize": 40,
        "crop": [32, 32],
        "mode": "crop",
        "interpolation": "bilinear",
        "mean": IMAGENET["mean"],
        "std": IMAGENET["std"],
        "backend": "pil",
        "frame": [32, 32],
        "defaults_from": "user",
    }
    assert resolve({}, image_size=48).to_dict()["resize"] == [48, 48]  # today's default


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"mean": [0.5, 0.5]}, "preprocess.mean has 2 values, but the model takes 3"),
        ({"std": [0.5] * 4}, "preprocess.std has 4 values"),
        ({"std": [0.5, 0.0, 0.5]}, "preprocess.std must be positive"),
        ({"resize": 32, "crop": 40}, "preprocess.crop [40, 40] is larger than resize 32"),
        ({"resize": [32, 64], "crop": [40, 40]}, "preprocess.crop [40, 40] is larger than resize"),
        (
            {"mode": "stretch"},
            "preprocess.mode = 'stretch' is unknown; choose from squash, crop, pad",
        ),
        ({"interpolation": "lanczos"}, "preprocess.interpolation = 'lanczos' is unknown"),
        ({"backend": "cv2"}, "preprocess.backend = 'cv2' is unknown"),
        ({"resize": 0}, "preprocess.resize must be a positive int or [height, width], got 0"),
        ({"resize": [32, -1]}, "preprocess.resize must be a positive int"),
        ({"crop": [0, 5]}, "preprocess.crop must be a positive int"),
        ({"resize": [1, 2, 3]}, "preprocess.resize must be"),
        ({"mean": "imagenet"}, "preprocess.mean must be a list of numbers"),
        ({"sizes": 3}, "unknown key preprocess.sizes"),
    ],
)
def test_bad_settings_are_one_line_errors(table: dict, words: str) -> None:
    with pytest.raises(PreprocessError) as caught:
        resolve(table)
    message = str(caught.value)
    assert isinstance(caught.value, ConfigError)  # mapped to `error: ...`, exit 2 by the CLI
    assert words in message and message.startswith("model 'm': ") and "\n" not in message


def test_timm_defaults_equal_timm_eval_transform() -> None:
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    pre = resolve_preprocess({}, model, "timm", 64, name="t")
    config = resolve_data_config({}, model=model)
    assert pre.frame == config["input_size"][1:] and pre.interpolation == config["interpolation"]
    transform = create_transform(**config)  # what timm's own eval scripts apply
    for image in pil_images(3):
        frame = pre.geometry(to_uint8(image))
        ours = pre.normalize(frame[None].float() / 255)[0]
        torch.testing.assert_close(ours, transform(image), rtol=0, atol=1e-6)


def test_timm_defaults_follow_the_models_img_size() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=32)
    pre = resolve_preprocess({}, model, "timm", 64, name="v")
    assert pre.frame == (32, 32) and pre.resize == 35 and pre.mean == (0.5, 0.5, 0.5)
    # Without outside weights the model learns what it is given: today's default at its own size.
    fresh = resolve_preprocess({}, model, "timm", 64, source_defaults=False, name="v")
    assert fresh.to_dict()["resize"] == [32, 32] and fresh.is_identity


def hf_processor_folder(tmp_path, processor) -> object:  # noqa: ANN001
    processor.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_hf_defaults_equal_the_image_processor(tmp_path, kind: str) -> None:  # noqa: ANN001
    transformers = pytest.importorskip("transformers")
    if kind == "vit":  # squash to (h, w), mean/std 0.5
        processor = transformers.ViTImageProcessor(size={"height": 30, "width": 42})
    else:  # shorter side, then center crop, CLIP's mean/std, bicubic
        processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}
        )
    processor.save_pretrained(tmp_path)
    source = type("Source", (), {"kind": "hf", "path": tmp_path})()
    pre = resolve_preprocess({}, Tiny(), source, 64, name="h")
    assert pre.to_dict()["defaults_from"] == "hf"
    assert hf_defaults(tmp_path)["backend"] == "torch"
    auto = transformers.AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
    images = pil_images(4)
    expected = auto(images=images, return_tensors="pt")["pixel_values"]
    ours = torch.stack([pre.geometry(to_uint8(image)) for image in images]).float() / 255
    torch.testing.assert_close(pre.normalize(ours), expected, rtol=0, atol=1e-5)


# -- crop = false: an explicit "no crop" ---------------------------------------------------------
def test_no_crop_overrides_the_sources_crop() -> None:
    """timm's default (a resize, then a center crop to the input size) without its crop: the
    whole image squashed to the model's frame, as torchvision's Resize([h, w]); mean/std stay."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    source = resolve_preprocess({}, model, "timm", 64, name="t")
    assert source.crop is not None and source.mode == "crop"
    assert source.frame != (source.resize, source.resize)  # the crop cuts something away
    pre = resolve_preprocess({"crop": False}, model, "timm", 64, name="t")
    assert pre.crop is None and pre.mode == "squash" and pre.frame == source.frame
    assert (pre.mean, pre.std, pre.interpolation) == (source.mean, source.std, source.interpolation)
    mode = T.InterpolationMode(pre.interpolation)
    reference = T.Compose([T.Resize(list(source.frame), interpolation=mode), T.PILToTensor()])
    for image in pil_images(5):
        assert torch.equal(pre.geometry(to_uint8(image)), reference(image))


def test_no_crop_with_resize_and_pad_cuts_nothing() -> None:
    pre = resolve({"resize": 40, "crop": False})  # an int resize: 40 x 40, squashed
    assert (pre.mode, pre.crop, pre.frame) == ("squash", None, (40, 40))
    reference = T.Compose([T.Resize([40, 40]), T.PILToTensor()])
    for image in pil_images(6):
        assert torch.equal(pre.geometry(to_uint8(image)), reference(image))
    # a region at the image's left edge, which a center crop cuts away, survives "no crop"
    image, mask = scene(40, 120, (0, 0, 20, 40))
    assert not resolve({"resize": 40, "crop": 40, "mode": "crop"}).geometry_mask(mask).any()
    padded = resolve({"resize": [40, 40], "crop": False, "mode": "pad"})
    assert padded.mode == "pad" and padded.geometry_mask(mask).any()
    assert red(padded.geometry(image)).any()


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"crop": False, "mode": "crop"}, "crop = false (no crop) cannot go with mode = 'crop'"),
        ({"crop": True}, "preprocess.crop = true is not a size"),
    ],
)
def test_no_crop_refusals(table: dict, words: str) -> None:
    with pytest.raises(PreprocessError) as caught:
        resolve(table)
    assert words in str(caught.value) and str(caught.value).startswith("model 'm': ")


def test_no_crop_in_the_config_file() -> None:
    from audit.config import from_dict

    model = {"name": "m", "train_split": "train", "preprocess": {"resize": 48, "crop": False}}
    config = from_dict({"model": [model]})
    assert config.model[0].preprocess.crop is False
    pre = resolve_preprocess(config.model[0].preprocess, Tiny(), "torchvision", 32, name="m")
    assert pre.to_dict()["crop"] is None and pre.frame == (48, 48)
