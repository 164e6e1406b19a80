"""How a layer lays out its activations: (N, C, h, w) maps, channels-last maps, or tokens.

CNNs output (N, C, h, w) maps. Vision transformers output tokens (N, T, C), where the first
tokens may be a class token, a distillation token or registers ("prefix tokens") and the rest are
the patches of an h x w grid in row-major order. Swin stages and some ConvNeXt blocks output
channels-last maps (N, h, w, C). The engine turns each of them into a (N, C, h, w) *view* with
`Layout.to_map`, so that Grad-CAM and friends need no hand-written reshape.

Everything is decided from the model itself, never from a user-written transform:
- tokens: the prefix count from timm's `num_prefix_tokens`; the patch grid from timm's
  `patch_embed` (`grid_size`, `patch_size`, `dynamic_img_pad`), a Hugging Face `config.patch_size`
  or a module's `patch_size`, at 1/1, 1/2, 1/4, ... of it (Swin's later stages); without such a
  hint, the smallest prefix count k in 0..8 for which T - k tokens tile the input's aspect ratio
  (for a square input: T - k is a perfect square).
- channels-last vs channels-first for a 4-D output: from the modules that produce or consume a
  tensor of that very shape in one traced forward pass of one image. A Conv2d or a batch/group
  norm reads dimension 1 as channels; a Linear, or a LayerNorm normalising the last dimension,
  reads the last one. The first such witness (the layer itself, then its own sub-modules, then the
  modules that run after it, then those before it) decides; with no witness the map is (N, C, h, w),
  so ordinary CNN maps never become channels-last by accident.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from audit.explain.errors import LayerError

MAX_PREFIX_TOKENS = 8
_DOWNSAMPLING = (1, 2, 4, 8, 16, 32, 64)

Kind = Literal["nchw", "nhwc", "tokens"]


@dataclass(frozen=True)
class Layout:
    """The layout of one layer's output; `to_map` gives the (N, C, h, w) view of a tensor in it."""

    kind: Kind
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None  # (h, w) of the patch grid, for tokens

    def to_map(self, t: Tensor) -> Tensor:
        """(N, C, h, w) view of an activation (or of its gradient) laid out like this layer's."""
        if self.kind == "nchw":
            return t
        if self.kind == "nhwc":
            return t.permute(0, 3, 1, 2)
        h, w = self.grid  # type: ignore[misc]
        return t[:, self.prefix_tokens :].unflatten(1, (h, w)).permute(0, 3, 1, 2)

    def describe(self) -> str:
        if self.kind == "nchw":
            return "(N, C, h, w) map"
        if self.kind == "nhwc":
            return "channels-last (N, h, w, C) map"
        h, w = self.grid  # type: ignore[misc]
        return f"tokens: {self.prefix_tokens} prefix + a {h}x{w} patch grid"


# -- tracing one forward pass ------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One module call of a traced forward pass (shapes without the batch dimension)."""

    name: str
    start: int
    end: int
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None
    vote: Kind | None  # what this module says about the layout of its 4-D input/output
    has_conv: bool
    is_layer_norm: bool


# model -> {input shape without batch: calls}. Calls hold no module, so the model can be freed.
_TRACES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], list[Call]]] = (
    weakref.WeakKeyDictionary()
)


def _first_tensor(args: Any, kwargs: dict[str, Any] | None = None) -> Tensor | None:
    for value in list(args) + list((kwargs or {}).values()):
        if isinstance(value, Tensor):
            return value
    return None


def _channel_vote(module: nn.Module, shape: tuple[int, ...] | None) -> Kind | None:
    """Which dimension of a 4-D tensor of `shape` (no batch dim) `module` treats as channels."""
    if shape is None or len(shape) != 3:
        return None
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return "nchw"
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        return "nchw"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return "nchw"
    if isinstance(module, nn.Linear):
        return "nhwc"
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        size = module.normalized_shape[0]
        first, last = shape[0] == size, shape[-1] == size
        if last and not first:
            return "nhwc"
        if first and not last:
            return "nchw"  # a "LayerNorm2d" that normalises dimension 1
        if first and last and type(module).forward is nn.LayerNorm.forward:
            return "nhwc"  # plain nn.LayerNorm always normalises the last dimension
    return None


def _contains_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def trace(model: nn.Module, images: Tensor) -> list[Call]:
    """Every module call of one forward pass of `images[:1]`, cached per model and input shape.

    The pass runs under no_grad with every module in eval mode (restored afterwards), so batch-norm
    statistics are not updated; all hooks are removed even when the forward fails.
    """
    key = tuple(images.shape[1:])
    cached = _TRACES.get(model, {}).get(key)
    if cached is not None:
        return cached
    counter = [0]
    started: dict[int, tuple[str, int, tuple[int, ...] | None]] = {}
    calls: list[Call] = []
    handles = []

    def pre(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            tensor = _first_tensor(args, kwargs)
            started[id(module)] = (
                name,
                counter[0],
                tuple(tensor.shape[1:]) if tensor is not None else None,
            )
            counter[0] += 1

        return hook

    def post(_name: str) -> Callable[..., None]:
        def hook(module: nn.Module, _args: Any, output: Any) -> None:
            name, start, in_shape = started.pop(id(module), (_name, counter[0], None))
            out_shape = tuple(output.shape[1:]) if isinstance(output, Tensor) else None
            vote = _channel_vote(module, out_shape) or _channel_vote(module, in_shape)
            calls.append(
                Call(
                    name=name,
                    start=start,
                    end=counter[0],
                    in_shape=in_shape,
                    out_shape=out_shape,
                    vote=vote,
                    has_conv=_contains_conv(module),
                    is_layer_norm=isinstance(module, nn.LayerNorm),
                )
            )
            counter[0] += 1

        return hook

    modes = [(m, m.training) for m in model.modules()]
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(module.register_forward_hook(post(name)))
        model.eval()
        with torch.no_grad():
            model(images[:1])
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode
    _TRACES.setdefault(model, {})[key] = calls
    return calls


def map_layout(calls: list[Call], name: str) -> Kind:
    """'nhwc' or 'nchw' for the 4-D output of the module `name`, from the witnesses in `calls`."""
    own = [c for c in calls if c.name == name]
    if not own or own[0].out_shape is None:
        return "nchw"
    layer = own[0]
    shape = layer.out_shape
    prefix = name + "." if name else ""
    inside = [c for c in calls if c.name.startswith(prefix) and c.name != name]
    after = [c for c in calls if c.start > layer.end and c.in_shape == shape]
    before = [
        c
        for c in calls
        if c.end < layer.start and c.out_shape == shape and not c.name.startswith(prefix)
    ]
    witnesses = (
        [layer]
        + sorted((c for c in inside if c.out_shape == shape), key=lambda c: -c.end)
        + sorted(after, key=lambda c: c.start)
        + sorted(before, key=lambda c: -c.end)
    )
    for call in witnesses:
        if call.vote is not None:
            return call.vote
    return "nchw"


# -- token grids -------------------------------------------------------------------------------


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return value, value
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


def declared_prefix_tokens(model: nn.Module) -> int | None:
    """timm's `num_prefix_tokens` (class + distillation + register tokens), where the model has it."""
    for module in model.modules():
        value = getattr(module, "num_prefix_tokens", None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _grid_hints(model: nn.Module, image_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Patch grids the model declares for an input of `image_hw`, finest first."""
    height, width = image_hw
    grids: list[tuple[int, int]] = []
    patch_sizes: list[tuple[int, int]] = []
    for module in model.modules():
        embed = getattr(module, "patch_embed", None)
        if isinstance(embed, nn.Module):
            size = _pair(getattr(embed, "patch_size", None))
            if size is not None:
                patch_sizes.append(size)
            grid = _pair(getattr(embed, "grid_size", None))
            if grid is not None and not getattr(module, "dynamic_img_size", False):
                grids.append(grid)
        config = getattr(module, "config", None)
        size = _pair(getattr(config, "patch_size", None)) if config is not None else None
        if size is not None:
            patch_sizes.append(size)
        size = _pair(getattr(module, "patch_size", None))
        if size is not None and not isinstance(module, nn.Conv2d):
            patch_sizes.append(size)
    for ph, pw in patch_sizes:
        grids.append((height // ph, width // pw))
        grids.append((math.ceil(height / ph), math.ceil(width / pw)))
    out: list[tuple[int, int]] = []
    for factor in _DOWNSAMPLING:  # Swin-style stages halve the grid
        for gh, gw in grids:
            grid = (math.ceil(gh / factor), math.ceil(gw / factor))
            if grid not in out and grid[0] > 0 and grid[1] > 0:
                out.append(grid)
    return out


# model -> {input (h, w): (declared prefix count, grid hints)}: read once, not on every batch.
_HINTS: weakref.WeakKeyDictionary[
    nn.Module, dict[tuple[int, int], tuple[int | None, list[tuple[int, int]]]]
] = weakref.WeakKeyDictionary()


def token_layout(model: nn.Module, tokens: int, image_hw: tuple[int, int]) -> Layout | None:
    """The prefix count and patch grid of T = `tokens` tokens for an input of `image_hw`, or None."""
    per_size = _HINTS.setdefault(model, {})
    if image_hw not in per_size:
        per_size[image_hw] = (declared_prefix_tokens(model), _grid_hints(model, image_hw))
    declared, grids = per_size[image_hw]
    prefixes = [declared] if declared is not None else list(range(MAX_PREFIX_TOKENS + 1))
    for gh, gw in grids:
        for k in prefixes:
            if tokens - k == gh * gw:
                return Layout("tokens", k, (gh, gw))
    # No declared grid fits: the grid with the input's aspect ratio, fewest prefix tokens first.
    height, width = image_hw
    for k in prefixes:
        n = tokens - k
        if n < 1:
            continue
        for h in range(1, n + 1):
            if n % h == 0 and h * width == (n // h) * height:
                return Layout("tokens", k, (h, n // h))
    return None


def describe_output(output: Any) -> str:
    """The shape of a layer output for an error message: `(2, 3)`, or `a tuple of (..), (..)`."""
    if isinstance(output, Tensor):
        return str(tuple(output.shape))
    if isinstance(output, (tuple, list)):
        parts = [str(tuple(v.shape)) if isinstance(v, Tensor) else type(v).__name__ for v in output]
        return f"a {type(output).__name__} of {', '.join(parts) or 'nothing'}"
    return f"a {type(output).__name__}"


def layer_layout(
    model: nn.Module, name: str, module: nn.Module, output: Any, images: Tensor
) -> Layout:
    """The layout of `module`'s output `output` (for `images`), or one ValueError naming the layer.

    Accepted: a (N, C, h, w) map, a channels-last (N, h, w, C) map, or (N, T, C) tokens whose
    prefix tokens and patch grid can be read off the model (see the module docstring).
    """
    expected = (
        f"layer {name!r} must output a (N, C, h, w) map, a channels-last (N, h, w, C) map or "
        "(N, T, C) tokens"
    )
    if not isinstance(output, Tensor) or output.dim() not in (3, 4):
        raise LayerError(f"{expected}, got {describe_output(output)}")
    if output.dim() == 4:
        kind = _channel_vote(module, tuple(output.shape[1:]))
        if kind is None:
            kind = map_layout(trace(model, images), name)
        return Layout(kind)
    image_hw = (int(images.shape[2]), int(images.shape[3]))
    layout = token_layout(model, int(output.shape[1]), image_hw)
    if layout is None:
        declared = declared_prefix_tokens(model)
        prefix = f"{declared}" if declared is not None else f"0-{MAX_PREFIX_TOKENS}"
        raise LayerError(
            f"{expected}; it outputs {tuple(output.shape)}, and {output.shape[1]} tokens less "
            f"{prefix} prefix tokens do not fill a patch grid of the "
            f"{image_hw[0]}x{image_hw[1]} input: choose a layer with patch tokens or a map"
        )
    return layout
