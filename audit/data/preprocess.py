"""Per-model preprocessing: the geometry that puts an image into a model's frame, and its normalisation.

An audit measures a team's model as it was trained, so each model gets the resize / crop / pad and the
mean / std it was trained with. The steps are split so that the rest of the audit can work in the
model's frame without normalisation:

- `Preprocess.geometry` turns a uint8 image (C, H, W) into the model's frame (C, h, w), still uint8:
  what the overlays show and what region masks are compared with;
- `Preprocess.geometry_mask` applies the same steps to a bool mask (nearest neighbour);
- `Preprocess.normalize` maps a float batch in [0, 1] to what the model expects, batched on its device;
- `Preprocess.attach` hooks `normalize` in front of the model, so the audit feeds [0, 1] frames, layer
  names stay unchanged and gradients flow to the [0, 1] input; for models whose output is an object
  with `.logits` (Hugging Face) or whose classes are in another order, a forward hook returns the plain
  logits tensor in the manifest's class order.

Modes (`mode`):
- "squash": resize to `resize` ([h, w], or n x n for an int) ignoring the aspect ratio, then center
  crop to `crop` if given (the audit's historical behaviour, and Hugging Face's `{"height", "width"}`);
- "crop": resize keeping the aspect ratio so that the image covers `resize` (an int is the shorter
  side, as torchvision's `Resize(n)`), then center crop to `crop` (or to `resize`);
- "pad": resize keeping the aspect ratio so that the image fits inside `resize`, pad with zeros
  (black, before normalisation) to `resize`, then center crop to `crop` if given.

`crop = false` says "no crop" where the source's defaults have one: the whole image is squashed
(or padded, with mode "pad") to `resize`, by default the frame size the model had.

Backends (`backend`): "pil" resizes with PIL and center crops as torchvision does (`round`), exactly
what torchvision and timm transforms do on PIL images; "torch" resizes the uint8 tensor with
`torchvision.transforms.v2.functional.resize(antialias=True)` and center crops as transformers'
image processors do (`floor`), exactly what transformers' (torchvision-backed) image processors do.
The two differ by one grey level on about 1% of the pixels, so each source defaults to its own.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode

from audit.errors import ConfigError

MODES = ("squash", "crop", "pad")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
BACKENDS = ("pil", "torch")
KEYS = ("resize", "crop", "mode", "interpolation", "mean", "std", "backend")

_PIL = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
_TORCH = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST_EXACT,
}
# PIL resampling codes as saved in Hugging Face `preprocessor_config.json` files.
_HF_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class PreprocessError(ConfigError):
    """A preprocessing setting that cannot be used, in one line naming the model and the key."""


Size = tuple[int, int]


def _pair(value: int | Size) -> Size:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class Preprocess:
    """The resolved preprocessing of one model (see the module docstring for the meaning of each field).

    resize: int (shorter side under "crop"; n x n under "squash" and "pad") or (h, w); crop: (h, w)
    or None; mean/std: one value per input channel (0 and 1 = identity); origin: where the defaults
    came from ("timm", "hf", "default"), with the user's keys on top; class_order: for each manifest
    class, the index of the model's output that scores it (None = the same order).
    """

    resize: int | Size
    crop: Size | None
    mode: str
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    backend: str = "pil"
    origin: str = "default"
    class_order: tuple[int, ...] | None = None

    # -- geometry ------------------------------------------------------------------------
    @property
    def frame(self) -> Size:
        """(h, w) of every image after `geometry`."""
        if self.crop is not None:
            return self.crop
        return _pair(self.resize)

    def _resized_size(self, height: int, width: int) -> Size:
        """Size of the image after the resize step (before pad / crop)."""
        if self.mode == "squash":
            return _pair(self.resize)
        if self.mode == "crop":
            if isinstance(self.resize, int):  # torchvision's Resize(n): shorter side n
                short, long = (height, width) if height <= width else (width, height)
                new_short, new_long = self.resize, int(self.resize * long / short)
                return (new_short, new_long) if height <= width else (new_long, new_short)
            rh, rw = self.resize
            scale = max(rh / height, rw / width)  # cover the box
            return max(rh, round(height * scale)), max(rw, round(width * scale))
        rh, rw = _pair(self.resize)  # pad: fit inside the box
        scale = min(rh / height, rw / width)
        return (
            min(rh, max(1, round(height * scale))),
            min(rw, max(1, round(width * scale))),
        )

    def _steps(self, image: Tensor, resize: Any) -> Tensor:
        """Resize (with `resize`), pad, center crop: the geometric steps shared by images and masks."""
        height, width = image.shape[-2:]
        size = self._resized_size(height, width)
        image = resize(image, size)
        if self.mode == "pad":
            rh, rw = _pair(self.resize)
            top, left = (rh - size[0]) // 2, (rw - size[1]) // 2
            image = F.pad(image, (left, rw - size[1] - left, top, rh - size[0] - top))
        target = self.crop if self.crop is not None else _pair(self.resize)
        if tuple(image.shape[-2:]) != tuple(target):
            image = self._center_crop(image, target)
        return image

    def _center_crop(self, image: Tensor, size: Size) -> Tensor:
        height, width = image.shape[-2:]
        if self.backend == "pil":  # torchvision's center_crop rounds
            return TF.center_crop(image, list(size))
        top, left = int((height - size[0]) / 2.0), int((width - size[1]) / 2.0)  # transformers'
        return image[..., top : top + size[0], left : left + size[1]]

    def _resize_image(self, image: Tensor, size: Size) -> Tensor:
        if tuple(image.shape[-2:]) == tuple(size):
            return image
        if self.backend == "torch":
            return TF.resize(
                image, list(size), interpolation=_TORCH[self.interpolation], antialias=True
            )
        array = image.permute(1, 2, 0).contiguous().numpy()
        pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
        out = np.asarray(pil.resize((size[1], size[0]), _PIL[self.interpolation]))
        return torch.from_numpy(out.copy()).reshape(size[0], size[1], -1).permute(2, 0, 1)

    def geometry(self, image: Tensor) -> Tensor:
        """A uint8 image (C, H, W) in the model's frame (C, h, w), not normalised."""
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise ValueError(
                f"geometry expects a uint8 (C, H, W) image, got {image.dtype} {tuple(image.shape)}"
            )
        return self._steps(image, self._resize_image).contiguous()

    def geometry_mask(self, mask: Tensor) -> Tensor:
        """A bool mask (H, W) through the same steps as `geometry`, with nearest neighbour."""

        def resize(m: Tensor, size: Size) -> Tensor:
            if tuple(m.shape[-2:]) == tuple(size):
                return m
            return F.interpolate(m[None, None].float(), size=size, mode="nearest-exact")[0, 0]

        return self._steps(mask.bool(), resize).bool().contiguous()

    # -- normalisation -------------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        return all(m == 0 for m in self.mean) and all(s == 1 for s in self.std)

    def normalize(self, x: Tensor) -> Tensor:
        """(x - mean) / std for a float batch (N, C, h, w) in [0, 1], on x's device."""
        if self.is_identity:
            return x
        if x.ndim != 4 or x.shape[1] != len(self.mean):
            raise ValueError(f"normalize expects (N, {len(self.mean)}, h, w), got {tuple(x.shape)}")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def attach(self, model: nn.Module) -> Attached:
        """Hook this preprocessing onto `model` (see the module docstring); `.remove()` undoes it.

        A forward pre-hook normalises the first input (positional, or `pixel_values=` / `x=`); a forward
        hook returns the plain logits tensor (`.logits` of an object output) in the manifest's class
        order. Both are hooks, not a wrapper, so module names and `model.eval()` / `.to()` are unchanged.
        """
        if getattr(model, "_audit_preprocess_attached", False):
            raise RuntimeError("a Preprocess is already attached to this model")
        handles = []
        if not self.is_identity:
            handles.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        handles.append(model.register_forward_hook(self._post_hook))
        model._audit_preprocess_attached = True
        return Attached(model, handles)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (self.normalize(args[0]), *args[1:]), kwargs
        for key in ("pixel_values", "x"):
            if key in kwargs:
                return args, {**kwargs, key: self.normalize(kwargs[key])}
        raise ValueError("the model was called without an image input to normalise")

    def _post_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        logits = output
        if not isinstance(logits, Tensor):
            if hasattr(logits, "logits"):
                logits = logits.logits
            elif isinstance(logits, Mapping) and "logits" in logits:
                logits = logits["logits"]
            else:
                return output  # leave unknown outputs to the engine's output selector
        if self.class_order is not None:
            logits = logits[:, list(self.class_order)]
        return logits

    # -- records -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The resolved values, for config.json / run.json and the report."""
        return {
            "resize": self.resize if isinstance(self.resize, int) else list(self.resize),
            "crop": list(self.crop) if self.crop is not None else None,
            "mode": self.mode,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "backend": self.backend,
            "frame": list(self.frame),
            "defaults_from": self.origin,
        }


class Attached:
    """What `Preprocess.attach` returns: `.remove()` takes the hooks off the model again."""

    def __init__(self, model: nn.Module, handles: list) -> None:
        self._model, self._handles = model, handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._model._audit_preprocess_attached = False

    def __enter__(self) -> Attached:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# -- resolution ----------------------------------------------------------------------------
def _in_channels(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def fixed_input_size(model: nn.Module) -> Size | None:
    """The input size a model requires (ViT-style patch embeddings, HF configs), or None if any fits."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is not None and not getattr(patch_embed, "dynamic_img_size", False):
        return _pair(tuple(size) if not isinstance(size, int) else size)
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None)
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return (int(size[0]), int(size[1]))
    return None


def timm_defaults(model: nn.Module, data_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """timm's eval preprocessing of `model` (`resolve_data_config`, or the given `data_config`),
    as Preprocess keys.

    timm resizes to floor(size / crop_pct) and center crops `size`; the input size follows the model
    itself where it was built with another `img_size` than its pretrained config says.
    """
    config = data_config
    if config is None:
        import timm.data

        config = timm.data.resolve_data_config({}, model=model)
    height, width = config["input_size"][1:]
    fixed = fixed_input_size(model)
    if fixed is not None:
        height, width = fixed
    crop_pct = config.get("crop_pct") or 0.875
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    interpolation = config.get("interpolation", "bilinear")
    return {
        "resize": scale[0] if scale[0] == scale[1] else list(scale),
        "crop": [height, width],
        "mode": "squash" if config.get("crop_mode") == "squash" else "crop",
        "interpolation": interpolation if interpolation in INTERPOLATIONS else "bilinear",
        "mean": list(config["mean"]),
        "std": list(config["std"]),
        "backend": "pil",
    }


def hf_defaults(folder: Path, name: str = "model") -> dict[str, Any]:
    """The preprocessing saved with a Hugging Face model (`preprocessor_config.json`), as Preprocess keys."""
    path = Path(folder) / "preprocessor_config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PreprocessError(f"model {name!r}: cannot read {path}: {error}") from None
    return hf_keys(saved, path, name)


def hf_keys(saved: Mapping[str, Any], path: Any, name: str = "model") -> dict[str, Any]:
    """A Hugging Face image processor's settings (`to_dict()`, or its saved JSON at `path`, named
    in errors) as Preprocess keys."""
    out: dict[str, Any] = {
        "backend": "pil" if str(saved.get("image_processor_type", "")).endswith("Pil") else "torch"
    }
    resample = saved.get("resample", 2)
    if resample not in _HF_RESAMPLE:
        raise PreprocessError(
            f"model {name!r}: {path}: resample {resample!r} is not supported (use 0, 2 or 3: nearest, bilinear, bicubic)"
        )
    out["interpolation"] = _HF_RESAMPLE[resample]
    size = saved.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = saved.get("crop_size") if saved.get("do_center_crop") else None
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if saved.get("do_resize", True) is False:
        raise PreprocessError(f"model {name!r}: {path}: do_resize = false leaves the size open")
    if "height" in size and "width" in size:
        out |= {"mode": "squash", "resize": [size["height"], size["width"]]}
    elif "shortest_edge" in size and "longest_edge" not in size:
        edge = int(size["shortest_edge"])
        crop_pct = saved.get("crop_pct")
        if crop_pct and crop is None and edge < 384:  # ConvNeXt's processor
            out |= {"mode": "crop", "resize": int(edge / crop_pct)}
            crop = {"height": edge, "width": edge}
        else:
            out |= {"mode": "crop", "resize": edge}
    else:
        raise PreprocessError(f"model {name!r}: {path}: size {size!r} is not supported")
    if crop is not None:
        out["crop"] = [crop["height"], crop["width"]]
    if saved.get("do_rescale", True) and not math.isclose(
        saved.get("rescale_factor", 1 / 255), 1 / 255
    ):
        raise PreprocessError(f"model {name!r}: {path}: rescale_factor must be 1/255")
    if saved.get("do_rescale", True) is False:
        raise PreprocessError(
            f"model {name!r}: {path}: do_rescale = false (0-255 inputs) is not supported"
        )
    if saved.get("do_normalize", True):
        out["mean"] = list(saved.get("image_mean", [0.5, 0.5, 0.5]))
        out["std"] = list(saved.get("image_std", [0.5, 0.5, 0.5]))
    return out


def _user_keys(user_table: Any) -> dict[str, Any]:
    """The keys a user set: a dict, or a config dataclass whose None / "" fields are unset."""
    if user_table is None:
        return {}
    if dataclasses.is_dataclass(user_table):
        user_table = dataclasses.asdict(user_table)
    return {k: v for k, v in dict(user_table).items() if v is not None and v != ""}


def resolve_preprocess(
    user_table: Any,
    model: nn.Module,
    source: Any,
    image_size: int,
    *,
    source_defaults: bool = True,
    name: str = "model",
    class_order: tuple[int, ...] | None = None,
) -> Preprocess:
    """The Preprocess of a model: today's default, under the source's own, under the user's keys.

    user_table: the `[model.preprocess]` keys (a dict or a PreprocessConfig; None / "" = unset).
    source: an `audit.models.sources.Source` (its `kind` "timm" / "hf" brings defaults) or a kind
    string. source_defaults: False for a model trained here from scratch, which learns whatever it
    is given, so it keeps today's behaviour: squash to `image_size` (or the model's fixed input size)
    and no normalisation. Raises PreprocessError naming the model and the key.
    """
    user = _user_keys(user_table)
    unknown = sorted(set(user) - set(KEYS))
    if unknown:
        raise PreprocessError(
            f"model {name!r}: unknown key preprocess.{unknown[0]}; known keys: {', '.join(KEYS)}"
        )
    if user.get("crop") is True:
        raise PreprocessError(
            f"model {name!r}: preprocess.crop = true is not a size; give an int, [height, width], "
            "or false for no crop"
        )
    channels = _in_channels(model) or 3
    frame = fixed_input_size(model) or (image_size, image_size)
    values: dict[str, Any] = {
        "resize": list(frame),
        "crop": None,
        "mode": "squash",
        "interpolation": "bilinear",
        "mean": [0.0] * channels,
        "std": [1.0] * channels,
        "backend": "pil",
    }
    origin = "default"
    kind = getattr(source, "kind", source)
    if source_defaults and kind == "timm":
        values |= timm_defaults(model)
        origin = "timm"
    elif source_defaults and kind == "hf":
        values |= hf_defaults(Path(source.path), name)
        origin = "hf"
    if user:
        if user.get("crop") is False:
            user = _without_crop(user, values, name)
        if ("resize" in user or "crop" in user) and "mode" not in user:
            # The user's sizes replace the source's geometry; an int resize means the shorter side.
            values["mode"] = "crop" if isinstance(user.get("resize"), int) else "squash"
            if "crop" not in user:
                values["crop"] = None
            if "resize" not in user:
                values["resize"] = user["crop"]
        values |= user
        origin = f"{origin}+user" if origin != "default" else "user"
    return _validated(values, name, channels, origin, class_order)


def _without_crop(user: dict[str, Any], values: dict[str, Any], name: str) -> dict[str, Any]:
    """`crop = false`: nothing of the image is cut away, whatever the source's defaults say.

    The whole image goes into the frame: squashed (or, with `mode = "pad"`, letterboxed) to
    `resize` if given, else to the frame the model had (the source's crop, else its resize), so a
    model with a fixed input size keeps it. `mode = "crop"` always cuts, so it is refused.
    """
    mode = user.get("mode", "squash")
    if mode == "crop":
        raise PreprocessError(
            f"model {name!r}: preprocess.crop = false (no crop) cannot go with mode = 'crop', "
            "which cuts what overflows resize; use mode 'squash' or 'pad'"
        )
    previous = values["crop"] if values["crop"] is not None else values["resize"]
    resize = user.get("resize", list(_pair(previous)) if isinstance(previous, int) else previous)
    return {**user, "crop": None, "mode": mode, "resize": resize}


def _size(value: Any, key: str, name: str, allow_int: bool) -> int | Size:
    bad = PreprocessError(
        f"model {name!r}: preprocess.{key} must be a positive int or [height, width], got {value!r}"
    )
    if isinstance(value, bool):
        raise bad
    if isinstance(value, int):
        if value < 1:
            raise bad
        return value if allow_int else (value, value)
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise bad


def _validated(
    values: dict[str, Any],
    name: str,
    channels: int,
    origin: str,
    class_order: tuple[int, ...] | None,
) -> Preprocess:
    for key, allowed in (("mode", MODES), ("interpolation", INTERPOLATIONS), ("backend", BACKENDS)):
        if values[key] not in allowed:
            raise PreprocessError(
                f"model {name!r}: preprocess.{key} = {values[key]!r} is unknown; choose from {', '.join(allowed)}"
            )
    crop = None if values["crop"] is None else _size(values["crop"], "crop", name, allow_int=False)
    resize = _size(values["resize"], "resize", name, allow_int=True)
    for key in ("mean", "std"):
        seq = values[key]
        if not isinstance(seq, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in seq
        ):
            raise PreprocessError(
                f"model {name!r}: preprocess.{key} must be a list of numbers, got {seq!r}"
            )
        if len(seq) != channels:
            raise PreprocessError(
                f"model {name!r}: preprocess.{key} has {len(seq)} values, but the model takes {channels} input channels"
            )
    if any(s <= 0 for s in values["std"]):
        raise PreprocessError(
            f"model {name!r}: preprocess.std must be positive, got {values['std']!r}"
        )
    if crop is not None:
        box = _pair(resize)
        if crop[0] > box[0] or crop[1] > box[1]:
            raise PreprocessError(
                f"model {name!r}: preprocess.crop {list(crop)} is larger than resize {values['resize']!r}"
            )
    return Preprocess(
        resize=resize,
        crop=crop,
        mode=values["mode"],
        interpolation=values["interpolation"],
        mean=tuple(float(v) for v in values["mean"]),
        std=tuple(float(v) for v in values["std"]),
        backend=values["backend"],
        origin=origin,
        class_order=tuple(class_order) if class_order is not None else None,
    )
