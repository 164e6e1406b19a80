"""The attribution engine: CAM, Grad-CAM, Grad-CAM++, saliency, guided backprop, Guided Grad-CAM.

All maps for several methods and several target sets come from one forward pass:
- the hooked layer's output A is cut from the graph as a leaf, so layer gradients
  (`torch.autograd.grad(score, A)`) only backpropagate through the head, never into parameters' `.grad`;
- when no pixel-space method is asked for, the body up to the layer runs under `no_grad`, so
  Grad-CAM costs one inference forward;
- pixel-space methods backpropagate the head gradient through the body in a second stage, with the
  ReLU rule (plain or guided) chosen per backward by `ReluSwitch`.
Everything stays batched in torch on the images' device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from audit.explain.errors import LayerError
from audit.explain.layers import (
    OutputSelector,
    default_output,
    final_linear,
    resolve_layer,
)
from audit.explain.layout import Layout, describe_output, layer_layout
from audit.explain.relu import ReluSwitch

CAM_METHODS = ("cam", "gradcam", "gradcam++")
PIXEL_METHODS = ("saliency", "guided_backprop", "guided_gradcam")
METHODS = CAM_METHODS + PIXEL_METHODS

Targets = None | int | Sequence[int] | Tensor


class CAMNotApplicableError(ValueError):
    """CAM asked of a model whose head is not global average pooling followed by one linear layer."""


@dataclass
class Explanation:
    """Maps of one forward pass, keyed by (method, target set name)."""

    logits: Tensor
    targets: dict[str, Tensor]
    maps: dict[tuple[str, str], Tensor] = field(default_factory=dict)
    low_res: dict[tuple[str, str], Tensor] = field(default_factory=dict)
    layer: str | None = None
    layout: Layout | None = None  # how the layer's output was read as a (N, C, h, w) map
    # The explained layer's activation averaged over space, (N, C): for a network ending in global
    # average pooling, exactly its penultimate features. None when no layer was hooked.
    embedding: Tensor | None = None

    @property
    def probs(self) -> Tensor:
        return self.logits.softmax(dim=1)

    @property
    def predictions(self) -> Tensor:
        return self.logits.argmax(dim=1)

    def __getitem__(self, key: tuple[str, str]) -> Tensor:
        return self.maps[key]


class _LayerCapture:
    """Forward hook that cuts the layer output from the graph as a leaf and hands a clone downstream."""

    def __init__(self, layer_name: str, enable_grad_after: bool) -> None:
        self.layer_name = layer_name
        self.enable_grad_after = enable_grad_after
        self.body_output: Tensor | None = None  # connected to the input (pixel methods only)
        self.activation: Tensor | None = None  # leaf requiring grad; the A of the papers
        self.calls = 0

    def __call__(self, _module: nn.Module, _inputs: Any, output: Any) -> Tensor:
        self.calls += 1
        if self.calls > 1:
            raise LayerError(
                f"layer {self.layer_name!r} runs more than once per forward pass (a shared module); "
                "choose a layer that runs once"
            )
        if not isinstance(output, Tensor) or output.dim() not in (3, 4):
            raise LayerError(
                f"layer {self.layer_name!r} must output a (N, C, h, w) map, a channels-last "
                f"(N, h, w, C) map or (N, T, C) tokens, got {describe_output(output)}"
            )
        self.body_output = output
        self.activation = output.detach().requires_grad_(True)
        if self.enable_grad_after:
            torch.set_grad_enabled(True)
        # A clone goes downstream so that an in-place op there cannot corrupt the saved activation.
        return self.activation.clone()


def _check_images(images: Any) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, not {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor, got {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    return images


def _check_methods(methods: Iterable[str]) -> tuple[str, ...]:
    methods = tuple(methods)
    if not methods:
        raise ValueError("no method given")
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return methods


def _resolve_targets(targets: Targets, name: str, logits: Tensor) -> Tensor:
    n, num_classes = logits.shape
    if targets is None:
        resolved = logits.argmax(dim=1)
    elif isinstance(targets, bool):
        raise TypeError(f"targets {name!r}: a bool is not a class index")
    elif isinstance(targets, int):
        resolved = torch.full((n,), targets, dtype=torch.long, device=logits.device)
    else:
        resolved = torch.as_tensor(targets, device=logits.device)
        if resolved.dim() != 1 or resolved.is_floating_point():
            raise ValueError(f"targets {name!r} must be an int or a 1-D sequence of class indices")
        if resolved.shape[0] != n:
            raise ValueError(f"targets {name!r} has {resolved.shape[0]} entries for {n} images")
        resolved = resolved.long()
    bad = (resolved < 0) | (resolved >= num_classes)
    if bool(bad.any()):
        value = int(resolved[bad][0])
        raise ValueError(f"targets {name!r}: class {value} out of range for {num_classes} classes")
    return resolved


def _cam_weights(model: nn.Module, activation: Tensor, logits: Tensor) -> Tensor:
    """The classifier weights w_c^k, after checking that logits == Linear(GAP(A))."""
    linear = final_linear(model)
    channels = activation.shape[1]
    why = None
    if linear is None:
        why = "it has no nn.Linear classifier"
    elif linear.in_features != channels:
        why = f"its last linear layer takes {linear.in_features} features, the layer has {channels} channels"
    else:
        with torch.no_grad():
            expected = F.linear(activation.mean(dim=(2, 3)), linear.weight, linear.bias)
            scale = float(logits.abs().max().clamp(min=1.0))
            if expected.shape != logits.shape or not torch.allclose(
                expected, logits.detach(), rtol=1e-3, atol=1e-4 * scale
            ):
                why = "its output is not Linear(global average pool of the layer)"
    if why is not None:
        raise CAMNotApplicableError(
            f"CAM needs a network ending in global average pooling and one linear layer right after "
            f"the explained layer, but for {type(model).__name__} {why}; use 'gradcam', which "
            "generalises CAM to any network"
        )
    return linear.weight.detach()


def _combine(weights: Tensor, activation: Tensor) -> Tensor:
    """ReLU(sum_k weights_k A^k) for a batch: (N, K) x (N, K, h, w) -> (N, h, w)."""
    return torch.einsum("nk,nkhw->nhw", weights, activation).clamp(min=0)


def _gradcam_pp_weights(grads: Tensor, activation: Tensor) -> Tensor:
    """Grad-CAM++ channel weights (Chattopadhay et al., closed form for an exponential score).

    w_k = sum_ij alpha_ij relu(g_ij) with alpha = g^2 / (2 g^2 + sum_ab(A) g^3). Where g != 0 this
    is relu(g) / (2 + S g), S = sum_ab(A), which saves several passes over the gradients. Where the
    denominator vanishes alpha is g^2, as in the reference implementations.
    """
    total = activation.sum(dim=(2, 3), keepdim=True)
    positive = grads.clamp(min=0)
    denom = total * grads + 2
    terms = positive / denom
    zero = denom == 0
    if bool(zero.any()):
        terms = torch.where(zero, grads.pow(2) * positive, terms)
    return terms.sum(dim=(2, 3))


def explain_many(
    model: nn.Module,
    images: Tensor,
    methods: Iterable[str],
    targets: Targets | Mapping[str, Targets] = None,
    *,
    layer: str | nn.Module | None = None,
    output: OutputSelector | None = None,
) -> Explanation:
    """Every map of `methods` for every target set, from one forward pass.

    `targets` is one target spec (None: predicted class, an int, or N class indices) or a mapping
    name -> spec such as {"pred": None, "true": labels}; a single spec is named "target".
    Example: `explain_many(model, x, ["gradcam", "cam"], {"pred": None, "true": y})["gradcam", "true"]`.
    """
    methods = _check_methods(methods)
    images = _check_images(images)
    target_specs = dict(targets) if isinstance(targets, Mapping) else {"target": targets}
    if not target_specs:
        raise ValueError("targets is an empty mapping")
    select = output or default_output
    param = next(model.parameters(), None)
    if param is not None and param.device != images.device:
        raise ValueError(f"images are on {images.device} but the model is on {param.device}")

    needs_layer = any(m in CAM_METHODS or m == "guided_gradcam" for m in methods)
    needs_input_grad = any(m in PIXEL_METHODS for m in methods)
    needs_guided = any(m in ("guided_backprop", "guided_gradcam") for m in methods)
    if isinstance(model, torch.jit.ScriptModule) and (needs_layer or needs_guided):
        raise ValueError(
            "a TorchScript model cannot be hooked (no forward hooks, no ReLU interception); "
            "only 'saliency' works on it: load the architecture with a state dict instead"
        )
    layer_name, module = resolve_layer(model, layer, images) if needs_layer else (None, None)
    capture = _LayerCapture(layer_name or "", enable_grad_after=not needs_input_grad)
    switch = ReluSwitch()
    x = images.detach().requires_grad_(needs_input_grad)

    with ExitStack() as stack:
        if module is not None:
            stack.callback(module.register_forward_hook(capture).remove)
        if needs_input_grad:
            stack.enter_context(switch)
        grad_mode = torch.enable_grad() if needs_input_grad else torch.no_grad()
        with grad_mode:
            logits = select(model(x))

    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model's logits must have shape (N, classes), got {shape}")
    if module is not None and capture.activation is None:
        raise LayerError(f"layer {layer_name!r} was not called during the forward pass")

    resolved = {name: _resolve_targets(spec, name, logits) for name, spec in target_specs.items()}
    layout = None
    activation = None
    if capture.activation is not None:
        layout = layer_layout(model, layer_name, module, capture.activation, images)
        activation = layout.to_map(capture.activation.detach())
    result = Explanation(logits=logits.detach(), targets=resolved, layer=layer_name, layout=layout)
    if activation is not None:
        result.embedding = activation.mean(dim=(2, 3))
    cam_weights = _cam_weights(model, activation, logits) if "cam" in methods else None
    size = (images.shape[2], images.shape[3])

    low: dict[tuple[str, str], Tensor] = {}  # CAM-family maps at the layer's resolution
    guided_grads: dict[str, Tensor] = {}
    with torch.enable_grad():
        for name, target in resolved.items():
            score = logits.gather(1, target[:, None]).sum()  # images are independent in a batch
            layer_grads: dict[bool, Tensor] = {}

            def grad_at_layer(guided: bool, score: Tensor = score, cache=layer_grads) -> Tensor:
                if guided not in cache:
                    switch.guided = guided
                    cache[guided] = torch.autograd.grad(
                        score, capture.activation, retain_graph=True
                    )[0]
                return cache[guided]

            def grad_at_input(guided: bool, score: Tensor = score) -> Tensor:
                switch.guided = guided
                if capture.activation is None:
                    return torch.autograd.grad(score, x, retain_graph=True)[0]
                head_grad = grad_at_layer(guided)
                return torch.autograd.grad(
                    capture.body_output, x, grad_outputs=head_grad, retain_graph=True
                )[0]

            if "cam" in methods:
                low["cam", name] = _combine(cam_weights[target], activation)
            if "gradcam" in methods or "guided_gradcam" in methods:
                weights = layout.to_map(grad_at_layer(False)).mean(dim=(2, 3))
                low["gradcam", name] = _combine(weights, activation)
            if "gradcam++" in methods:
                weights = _gradcam_pp_weights(layout.to_map(grad_at_layer(False)), activation)
                low["gradcam++", name] = _combine(weights, activation)
            if "saliency" in methods:
                result.maps["saliency", name] = grad_at_input(False).abs()
            if "guided_backprop" in methods or "guided_gradcam" in methods:
                guided_grads[name] = grad_at_input(True)
    switch.guided = False
    # One interpolation for every map: maps as channels upsample faster than one call each.
    if low:
        keys = list(low)
        upsampled = F.interpolate(
            torch.stack([low[k] for k in keys], dim=1),
            size=size,
            mode="bilinear",
            align_corners=False,
        )
        for i, (method, name) in enumerate(keys):
            if method in methods:
                result.low_res[method, name] = low[method, name]
                result.maps[method, name] = upsampled[:, i]
            if method == "gradcam" and "guided_gradcam" in methods:
                result.maps["guided_gradcam", name] = guided_grads[name] * upsampled[:, i, None]
    if "guided_backprop" in methods:
        for name, grads in guided_grads.items():
            result.maps["guided_backprop", name] = grads
    return result


def explain(
    model: nn.Module,
    images: Tensor,
    method: str,
    *,
    layer: str | nn.Module | None = None,
    targets: Targets = None,
    output: OutputSelector | None = None,
) -> Tensor:
    """One method's maps: (N, H, W) for CAM-family methods, (N, C, H, W) for pixel-space ones.

    Example: `explain(resnet, x, "gradcam", layer="layer4", targets=labels)`.
    """
    if isinstance(targets, Mapping):
        raise TypeError("explain takes one target spec; use explain_many for several")
    result = explain_many(model, images, [method], {"target": targets}, layer=layer, output=output)
    return result.maps[method, "target"]


def normalize_maps(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale each map to [0, 1] by its own maximum; an all-zero map stays zero (never NaN)."""
    flat = maps.flatten(1)
    top = flat.amax(dim=1).clamp(min=eps)
    return (flat / top[:, None]).view_as(maps)
