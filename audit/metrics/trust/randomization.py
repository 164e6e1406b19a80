"""Model-parameter randomization test (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

Cascading: the parameters of a deep copy of the model are re-initialised one step at a time from the
output towards the input, and after each step the maps of every method are recomputed for the same
images and the same targets (the original model's predicted classes). A map that still looks the same
once the weights are random does not explain the model. Per step and image we measure

- the Spearman rank correlation of the absolute maps (pixel maps: |.| summed over the channels),
  with tied values given their average rank, as scipy and Quantus do;
- SSIM between the maps normalised to [0, 1] by their maximum.

What a step is (`cascade`):
- "module": every module that owns parameters, in reverse registration order, one per step
  (Quantus's MPRT `layer_order="top_down"`: its modules are those with `reset_parameters`);
- "block" (default): the same modules, but a normalisation layer (BatchNorm, GroupNorm, LayerNorm,
  InstanceNorm) joins the step of the layer registered before it. For the built-in SmallCNN the
  steps are fc, then each conv + BatchNorm pair from the last to the first (5 steps).
A module is re-initialised by its own `reset_parameters()` (BatchNorm: weight 1, bias 0, running
statistics reset) under `torch.manual_seed(seed + 1)`, the convention of Quantus, inside
`torch.random.fork_rng` so that the caller's random state is untouched; a module without
`reset_parameters` gets N(0, 0.02) weights. The original model is never modified (its mode is
restored too).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from audit.explain import CAM_METHODS, explain_many, normalize_maps, resolve_layer
from audit.explain.layers import OutputSelector
from audit.metrics.attention import as_heat
from audit.metrics.bootstrap import resample_weights
from audit.metrics.trust.config import CASCADES
from audit.metrics.trust.ops import eval_mode, mean_estimate, spearman_rows, ssim_rows

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class CascadeResult:
    """Per-image similarities of a cascade: `spearman[method]` and `ssim[method]` are (steps, N)."""

    methods: tuple[str, ...]
    layers: list[str]
    targets: Tensor
    spearman: dict[str, Tensor] = field(default_factory=dict)
    ssim: dict[str, Tensor] = field(default_factory=dict)
    strip: dict[str, list[Tensor]] = field(default_factory=dict)
    figure_index: int = 0


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def cascade_steps(model: nn.Module, cascade: str = "block") -> list[tuple[str, list[str]]]:
    """The randomization steps as (step name, module names), from the output towards the input."""
    if cascade not in CASCADES:
        raise ValueError(f"cascade must be one of {', '.join(CASCADES)}, got {cascade!r}")
    groups: list[list[str]] = []
    for name, module in model.named_modules():
        if not _owns_parameters(module):
            continue
        if cascade == "block" and groups and isinstance(module, NORM_LAYERS):
            groups[-1].append(name)
        else:
            groups.append([name])
    if not groups:
        raise ValueError(f"{type(model).__name__} has no parameters to randomize")
    return [("+".join(g) or "(root)", g) for g in reversed(groups)]


def randomize_module(module: nn.Module, seed: int) -> None:
    """Re-initialise one module's own parameters in place (see the module docstring)."""
    param = next(module.parameters(recurse=False))
    devices = [param.device] if param.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed + 1)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            for p in module.parameters(recurse=False):
                p.normal_(0.0, 0.02)


def _heats(
    model: nn.Module,
    images: Tensor,
    methods: Sequence[str],
    targets: Tensor | None,
    layer: str | None,
    batch_size: int,
    output: OutputSelector | None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Absolute (N, H, W) heat maps of each method and the targets used, `batch_size` per pass."""
    parts: dict[str, list[Tensor]] = {m: [] for m in methods}
    used = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        spec = None if targets is None else targets[start : start + batch_size]
        result = explain_many(model, chunk, methods, {"t": spec}, layer=layer, output=output)
        used.append(result.targets["t"])
        for method in methods:
            parts[method].append(as_heat(result.maps[method, "t"].detach()).abs())
    return {m: torch.cat(p) for m, p in parts.items()}, torch.cat(used)


def randomization_cascade(
    model: nn.Module,
    images: Tensor,
    methods: Iterable[str],
    *,
    layer: str | nn.Module | None = None,
    cascade: str = "block",
    seed: int = 0,
    batch_size: int = 256,
    figure_index: int = 0,
    output: OutputSelector | None = None,
) -> CascadeResult:
    """Run the cascade for all `methods` at once (one explain pass per step serves every method).

    `images` (N, 3, H, W) in [0, 1] on the model's device. Returns per-image Spearman and SSIM per
    step, and for image `figure_index` the normalised maps before and after each step (`strip`).
    """
    methods = tuple(methods)
    if not 0 <= figure_index < len(images):
        raise ValueError(f"figure_index {figure_index} out of range for {len(images)} images")
    steps = cascade_steps(model, cascade)
    needs_layer = any(m in CAM_METHODS or m == "guided_gradcam" for m in methods)
    with eval_mode(model):
        name = resolve_layer(model, layer, images[:1])[0] if needs_layer else None
        original, targets = _heats(model, images, methods, None, name, batch_size, output)
    randomized = copy.deepcopy(model).eval()
    modules = dict(randomized.named_modules())
    result = CascadeResult(methods, [s for s, _ in steps], targets, figure_index=figure_index)
    for method in methods:
        result.strip[method] = [
            normalize_maps(original[method][figure_index : figure_index + 1])[0]
        ]
    spearman: dict[str, list[Tensor]] = {m: [] for m in methods}
    ssim: dict[str, list[Tensor]] = {m: [] for m in methods}
    normalised = {m: normalize_maps(original[m]) for m in methods}
    for _step, names in steps:
        for module_name in names:
            randomize_module(modules[module_name], seed)
        maps, _ = _heats(randomized, images, methods, targets, name, batch_size, output)
        for method in methods:
            spearman[method].append(spearman_rows(original[method], maps[method]))
            scaled = normalize_maps(maps[method])
            ssim[method].append(ssim_rows(normalised[method], scaled))
            result.strip[method].append(scaled[figure_index].cpu())
    del randomized
    result.spearman = {m: torch.stack(v).cpu() for m, v in spearman.items()}
    result.ssim = {m: torch.stack(v).cpu() for m, v in ssim.items()}
    result.strip = {m: [t.cpu() for t in v] for m, v in result.strip.items()}
    return result


def randomization_summary(
    result: CascadeResult,
    method: str,
    threshold: float = 0.5,
    weights: np.ndarray | None = None,
) -> dict[str, Any]:
    """JSON-ready verdict of one method: per-step mean Spearman / SSIM with bootstrap 95% CIs.

    `weights` are (B, N) bootstrap resample weights (audit.metrics.bootstrap.resample_weights).
    Images whose map is constant at a step (Spearman undefined) are left out of that step's mean;
    `undefined_final` counts them at the last step. `passed` is None when no image has a value.
    """
    rho = result.spearman[method].numpy()
    ssim = result.ssim[method].numpy()
    steps = [
        {
            "layer": layer,
            "spearman": mean_estimate(rho[i], weights),
            "ssim": mean_estimate(ssim[i], weights),
        }
        for i, layer in enumerate(result.layers)
    ]
    final = steps[-1]["spearman"]
    return {
        "method": method,
        "steps": steps,
        "final_spearman": final,
        "final_ssim": steps[-1]["ssim"],
        "threshold": float(threshold),
        "passed": None if final["value"] is None else bool(final["value"] < threshold),
        "n_images": int(rho.shape[1]),
        "undefined_final": int((~np.isfinite(rho[-1])).sum()),
    }


def randomization_test(
    model: nn.Module,
    images: Tensor,
    methods: Iterable[str],
    *,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    layer: str | nn.Module | None = None,
    cascade: str = "block",
    batch_size: int = 256,
    figure_index: int = 0,
    output: OutputSelector | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[Tensor]]]:
    """The whole test: ({method: summary dict}, {method: [original map, after step 1, ...]})."""
    result = randomization_cascade(
        model,
        images,
        methods,
        layer=layer,
        cascade=cascade,
        seed=seed,
        batch_size=batch_size,
        figure_index=figure_index,
        output=output,
    )
    weights = resample_weights(len(images), n_boot, seed)
    summaries = {m: randomization_summary(result, m, threshold, weights) for m in result.methods}
    return summaries, result.strip
