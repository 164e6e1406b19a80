"""Finding the feature layer to explain and reading logits from a model's output."""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from audit.explain.errors import LayerError
from audit.explain.layout import Call, Layout, map_layout, token_layout, trace

OutputSelector = Callable[[Any], Tensor]

# Cache of automatically found layers: model -> {input spatial size: layer name}.
_FOUND_LAYERS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], str]] = (
    weakref.WeakKeyDictionary()
)


def default_output(output: Any) -> Tensor:
    """Return the logits from a model's output: a tensor, `.logits`, a dict or the first of a tuple."""
    if isinstance(output, Tensor):
        return output
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    if isinstance(output, Mapping):
        for key in ("logits", "out", "output"):
            if isinstance(output.get(key), Tensor):
                return output[key]
        raise TypeError(
            f"model returned a dict with keys {sorted(output)}; pass output=... to select the logits"
        )
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}; "
        "pass output=... to select them"
    )


def resolve_layer(
    model: nn.Module, layer: str | nn.Module | None, images: Tensor
) -> tuple[str, nn.Module]:
    """Return (name, module) for `layer`: a name, a module of `model`, or None for the default
    (`find_last_feature_layer`)."""
    modules = dict(model.named_modules())
    if isinstance(layer, str):
        if layer not in modules:
            close = difflib.get_close_matches(layer, [n for n in modules if n], n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise LayerError(f"unknown layer {layer!r} in {type(model).__name__}{hint}")
        return layer, modules[layer]
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer:
                return name, module
        raise ValueError(
            f"the module {type(layer).__name__} given as layer is not part of the model"
        )
    if layer is not None:
        raise TypeError(
            f"layer must be a module name, a module or None, not {type(layer).__name__}"
        )
    name = find_last_feature_layer(model, images)
    return name, modules[name]


def _block_of(name: str) -> str | None:
    """The repeated block a module sits in directly: `blocks.11` for `blocks.11.norm1`.

    A block is a parent whose own name ends in a number (`blocks.11`, `layer.3`,
    `encoder_layer_11`), as the blocks of a transformer's ModuleList/Sequential are named.
    """
    parent, _, _ = name.rpartition(".")
    if parent and parent[-1].isdigit():
        return parent
    return None


def _last_conv_map(model: nn.Module, calls: list[Call], images: Tensor) -> Call | None:
    """The last-finishing module holding a conv whose output is a spatial map (either layout)."""
    for call in sorted(calls, key=lambda c: -c.end):
        if not call.name or not call.has_conv or call.out_shape is None:
            continue
        if len(call.out_shape) != 3:
            continue
        kind = map_layout(calls, call.name)
        c_h_w = call.out_shape if kind == "nchw" else (call.out_shape[2], *call.out_shape[:2])
        if c_h_w[1] * c_h_w[2] > 1:
            return call
    return None


def _last_block_norm(model: nn.Module, calls: list[Call], images: Tensor) -> Call | None:
    """A LayerNorm of the last transformer block whose output is patch tokens or a channels-last map.

    With prefix tokens (a class or distillation token that the head reads) the block's first norm,
    before its attention mixes patch tokens into the class token (pytorch-grad-cam's advice for
    ViT: `blocks[-1].norm1`); without them (Swin, pooled heads) the block's last norm, nearest the
    output (`layers[-1].blocks[-1].norm2`).
    """
    image_hw = (int(images.shape[2]), int(images.shape[3]))
    found: dict[str, list[tuple[Call, Layout]]] = {}
    for call in calls:
        block = _block_of(call.name)
        if not call.is_layer_norm or block is None or call.out_shape is None:
            continue
        if len(call.out_shape) == 2:
            layout = token_layout(model, call.out_shape[0], image_hw)
        elif len(call.out_shape) == 3 and map_layout(calls, call.name) == "nhwc":
            layout = Layout("nhwc")
        else:
            layout = None
        if layout is not None:
            found.setdefault(block, []).append((call, layout))
    if not found:
        return None
    last = max(found.values(), key=lambda norms: max(c.end for c, _ in norms))
    last.sort(key=lambda item: item[0].start)
    first_call, first_layout = last[0]
    return first_call if first_layout.prefix_tokens > 0 else last[-1][0]


def find_last_feature_layer(model: nn.Module, images: Tensor) -> str:
    """Name of the layer explained by default: the last spatial feature map or patch tokens.

    From one traced forward pass of a single image (cached per model and input size): the last
    module holding a conv that outputs a spatial map (CNNs, ConvNeXt), or, where a transformer
    block finishes after it (ViT, DeiT, Swin, Hugging Face ViT), a LayerNorm of the last block
    (see `_last_block_norm`).
    """
    key = tuple(images.shape[1:])
    cached = _FOUND_LAYERS.get(model, {}).get(key)
    if cached is not None:
        return cached
    calls = trace(model, images)
    conv = _last_conv_map(model, calls, images)
    norm = _last_block_norm(model, calls, images)
    if conv is None and norm is None:
        raise LayerError(
            f"{type(model).__name__} has no convolutional layer with a spatial output and no "
            "transformer block with patch tokens; pass layer=..."
        )
    best = norm if conv is None or (norm is not None and norm.end > conv.end) else conv
    _FOUND_LAYERS.setdefault(model, {})[key] = best.name
    return best.name


def final_linear(model: nn.Module) -> nn.Linear | None:
    """The last nn.Linear of the model in registration order (the classifier of a GAP network)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None
