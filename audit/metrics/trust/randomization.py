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

Cut points (`cuts`): the cascade still randomizes every step in turn, but the maps are recomputed
only after `cuts` evenly spaced steps, the last (every parameter random) always among them: the
randomization itself costs next to nothing, each measured step costs one explanation pass. The
verdict is read at the last step, so it does not depend on `cuts`.

Memory: one call holds the maps of the images it is given; `merge_cascades` joins the per-image
numbers of calls on consecutive batches (the audit streams its sample through in batches).
"""

from __future__ import annotations

import copy
import math
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
    cascade_steps: int = 0  # steps of the whole cascade (`layers` names the measured ones)


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


def cut_steps(n_steps: int, cuts: int | None) -> list[int]:
    """Indices of the steps after which the maps are measured: `cuts` evenly spaced over the
    cascade, the last step always included (None, or cuts >= n_steps: every step)."""
    if cuts is None or cuts >= n_steps:
        return list(range(n_steps))
    if cuts < 1:
        raise ValueError(f"cuts must be >= 1, got {cuts}")
    return sorted({math.ceil((i + 1) * n_steps / cuts) - 1 for i in range(cuts)})


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


def absolute_maps(
    model: nn.Module,
    images: Tensor,
    methods: Sequence[str],
    layer: str | None,
    batch_size: int,
    output: OutputSelector | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """|maps| (N, H, W) of each method for the predicted classes, and those classes: what the
    cascade compares against (and what deletion / insertion ranks the pixels by)."""
    return _heats(model, images, methods, None, layer, batch_size, output)


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
    cuts: int | None = None,
    original: tuple[dict[str, Tensor], Tensor] | None = None,
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
    measured = set(cut_steps(len(steps), cuts))
    with eval_mode(model):
        name = resolve_layer(model, layer, images[:1])[0] if needs_layer else None
        if original is None:
            original = _heats(model, images, methods, None, name, batch_size, output)
    original, targets = original
    randomized = copy.deepcopy(model).eval()
    modules = dict(randomized.named_modules())
    layers = [s for i, (s, _) in enumerate(steps) if i in measured]
    result = CascadeResult(methods, layers, targets, figure_index=figure_index)
    result.cascade_steps = len(steps)
    for method in methods:
        result.strip[method] = [
            normalize_maps(original[method][figure_index : figure_index + 1])[0]
        ]
    spearman: dict[str, list[Tensor]] = {m: [] for m in methods}
    ssim: dict[str, list[Tensor]] = {m: [] for m in methods}
    normalised = {m: normalize_maps(original[m]) for m in methods}
    for index, (_step, names) in enumerate(steps):
        for module_name in names:
            randomize_module(modules[module_name], seed)
        if index not in measured:
            continue
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


def merge_cascades(parts: Sequence[CascadeResult]) -> CascadeResult:
    """One result for the images of consecutive calls, in order: the per-image similarities and
    targets concatenated; the strip of the first part (its `figure_index`)."""
    if not parts:
        raise ValueError("no cascade results to merge")
    first = parts[0]
    if any(p.layers != first.layers or p.methods != first.methods for p in parts):
        raise ValueError("cascade results of different steps or methods cannot be merged")
    return CascadeResult(
        first.methods,
        list(first.layers),
        torch.cat([p.targets.cpu() for p in parts]),
        spearman={m: torch.cat([p.spearman[m] for p in parts], dim=1) for m in first.methods},
        ssim={m: torch.cat([p.ssim[m] for p in parts], dim=1) for m in first.methods},
        strip=first.strip,
        figure_index=first.figure_index,
        cascade_steps=first.cascade_steps,
    )


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
        "cascade_steps": result.cascade_steps or len(result.layers),
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
    cuts: int | None = None,
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
        cuts=cuts,
    )
    weights = resample_weights(len(images), n_boot, seed)
    summaries = {m: randomization_summary(result, m, threshold, weights) for m in result.methods}
    return summaries, result.strip
