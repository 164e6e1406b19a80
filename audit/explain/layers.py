"""Finding the feature layer to explain and reading logits from a model's output."""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

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
    """Return (name, module) for `layer`: a name, a module of `model`, or None for the last conv map."""
    modules = dict(model.named_modules())
    if isinstance(layer, str):
        if layer not in modules:
            close = difflib.get_close_matches(layer, [n for n in modules if n], n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown layer {layer!r} in {type(model).__name__}{hint}")
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


def _contains_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def find_last_feature_layer(model: nn.Module, images: Tensor) -> str:
    """Name of the last module (a conv or a block holding convs) that outputs a spatial 4-D map.

    Found by one forward pass of a single image with hooks on the candidates; cached per model.
    """
    key = tuple(images.shape[1:])
    cached = _FOUND_LAYERS.get(model, {}).get(key)
    if cached is not None:
        return cached
    order: list[str] = []
    handles = []

    def record(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
                order.append(name)

        return hook

    try:
        for name, module in model.named_modules():
            if name and _contains_conv(module):
                handles.append(module.register_forward_hook(record(name)))
        with torch.no_grad():
            model(images[:1])
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        raise ValueError(
            f"{type(model).__name__} has no convolutional layer with a spatial output; pass layer=..."
        )
    _FOUND_LAYERS.setdefault(model, {})[key] = order[-1]
    return order[-1]


def final_linear(model: nn.Module) -> nn.Linear | None:
    """The last nn.Linear of the model in registration order (the classifier of a GAP network)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None
