"""Validity checks: is this audit's figure worth reading for this model, and what was substituted?

Pure functions of values passed in (statistics, metrics blocks, resolved preprocessing as dicts);
each returns findings, plain dicts for metrics.json:

    {"check": ..., "model": name | None, "severity": "invalid" | "substitution" | "skipped",
     "message": one sentence with the measured figures, "changes": the decision it changes,
     "gates": [gate keys whose figure it concerns], "values": {...}}

"invalid": the model was not measured as it works (wrong preprocessing, collapsed predictions)
or is too weak for any finding to mean something; "substitution": a figure measured with a
stand-in (mean-fill counterfactuals, a control that can move onto the person, maps left out);
"skipped": a check switched off, whose gate is skipped rather than failed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

# -- the first normalisation layer's statistics ----------------------------------------------------
NORM_EPS = 1e-5


def first_batchnorm(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first BatchNorm (in module order) that tracks running statistics, or None."""
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.track_running_stats
            and module.running_mean is not None
        ):
            return name, module
    return None


@torch.no_grad()
def norm_statistics(model: nn.Module, images: Tensor) -> dict[str, Any] | None:
    """The first BatchNorm's input statistics on `images` next to its running statistics.

    The model is called once on the batch as the audit calls it (preprocessing attached); a
    forward pre-hook reads the per-channel mean and variance of the BatchNorm's input. None for a
    model without a BatchNorm that tracks running statistics (ViTs, LayerNorm models).
    """
    found = first_batchnorm(model)
    if found is None:
        return None
    name, layer = found
    seen: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float()
        dims = [d for d in range(x.ndim) if d != 1]
        seen["mean"] = x.mean(dim=dims)
        seen["var"] = x.var(dim=dims, unbiased=False)

    handle = layer.register_forward_pre_hook(hook)
    training = model.training
    try:
        model.eval()
        model(images)
    finally:
        handle.remove()
        model.train(training)
    if "mean" not in seen:
        return None
    return {
        "layer": name,
        "n_images": len(images),
        "batch_mean": seen["mean"].cpu().double().numpy(),
        "batch_var": seen["var"].cpu().double().numpy(),
        "running_mean": layer.running_mean.detach().cpu().double().numpy(),
        "running_var": layer.running_var.detach().cpu().double().numpy(),
    }


def norm_mismatch(stats: Mapping[str, Any]) -> dict[str, float]:
    """How far the batch is from what the first BatchNorm was trained on, over its channels:
    `shift`, the RMS of (batch mean - running mean) / running std, and `scale`, the RMS of
    log(batch std / running std). Both are 0 for a batch like the training data."""
    running_std = np.sqrt(np.asarray(stats["running_var"], np.float64) + NORM_EPS)
    batch_std = np.sqrt(np.asarray(stats["batch_var"], np.float64) + NORM_EPS)
    shift = (np.asarray(stats["batch_mean"]) - np.asarray(stats["running_mean"])) / running_std
    scale = np.log(batch_std / running_std)
    return {
        "shift": float(np.sqrt(np.mean(shift**2))),
        "scale": float(np.sqrt(np.mean(scale**2))),
    }


# -- findings ------------------------------------------------------------------------------------
NORM_SHIFT_LIMIT = 1.0  # RMS over channels of the mean shift, in running standard deviations
NORM_SCALE_LIMIT = 0.5  # RMS over channels of |log(batch std / running std)|: a factor of 1.65
COLLAPSE_SHARE = 0.95  # one class predicted for at least this share of the images ...
COLLAPSE_MARGIN = 0.25  # ... while it is at least this much rarer among the labels
FRAME_KEYS = ("frame", "resize", "crop", "mode", "interpolation", "mean", "std")
ALL_GATES = (
    "min_worst_group_accuracy",
    "max_accuracy_gap",
    "max_protected_attention",
    "max_flip_rate",
    "max_attention_gap_between_groups",
    "max_protected_occlusion_effect",
)
ATTENTION_GATES = ("max_protected_attention", "max_attention_gap_between_groups")
TRUST_GATES = ("max_protected_occlusion_effect",)
NOT_JUDGED = "not judged"  # gate status where the model was not measured as it works
TOO_WEAK = "too weak to judge"  # gate status of a model whose accuracy is not above chance
SKIPPED = "skipped"  # gate status of a check switched off
# Gates that need region masks, and gates that need a group column, to be measured at all.
MASK_GATES = (
    "max_protected_attention",
    "max_attention_gap_between_groups",
    "max_protected_occlusion_effect",
    "max_flip_rate",
)
GROUP_GATES = (
    "min_worst_group_accuracy",
    "max_accuracy_gap",
    "max_attention_gap_between_groups",
    "max_flip_rate",
)


def finding(
    check: str, model: str | None, severity: str, message: str, changes: str, **extra: Any
) -> dict[str, Any]:
    """One finding as metrics.json holds it (gates: the gate keys whose figure it concerns)."""
    return {
        "check": check,
        "model": model,
        "severity": severity,
        "message": message,
        "changes": changes,
        "gates": list(extra.pop("gates", ())),
        "values": extra.pop("values", {}),
        **extra,
    }


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def check_norm_statistics(model: str, stats: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Flag a batch whose first-BatchNorm input is far from the running statistics: the frames
    are not scaled or normalised as in training (e.g. the normalisation forgotten)."""
    if stats is None:
        return None
    found = norm_mismatch(stats)
    if found["shift"] <= NORM_SHIFT_LIMIT and found["scale"] <= NORM_SCALE_LIMIT:
        return None
    factor = math.exp(found["scale"])
    return finding(
        "preprocessing_statistics",
        model,
        "invalid",
        f"the input of {model}'s first BatchNorm ({stats['layer']}) on {stats['n_images']} of "
        f"the audit's frames is far from the statistics it was trained with: mean off by "
        f"{found['shift']:.2f} running standard deviations, spread off by a factor of "
        f"{factor:.2f} (RMS over channels; limits {NORM_SHIFT_LIMIT:.1f} and "
        f"{math.exp(NORM_SCALE_LIMIT):.2f}): the frames are not normalised as in training - "
        "check mean and std in [model.preprocess] (or its BatchNorm statistics were never "
        "trained to convergence)",
        "no figure of this model is judged: it was not measured on inputs like its training data",
        gates=ALL_GATES,
        values={"layer": stats["layer"], **found},
        gate_status=NOT_JUDGED,
        short="its frames are not normalised as in training",
    )


def check_collapse(
    model: str, labels: Sequence[str], predictions: Sequence[str]
) -> dict[str, Any] | None:
    """Flag predictions collapsed onto one class: one class predicted for nearly every image
    though the labels are not (a frame the model cannot read gives this)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if len(predictions) == 0:
        return None
    names, counts = np.unique(predictions, return_counts=True)
    top = names[counts.argmax()]
    share = counts.max() / len(predictions)
    label_share = float((labels == top).mean())
    if share < COLLAPSE_SHARE or share - label_share < COLLAPSE_MARGIN:
        return None
    return finding(
        "collapsed_predictions",
        model,
        "invalid",
        f"{model} predicts {top!r} for {_pct(share)} of the {len(predictions)} images, which "
        f"are {_pct(label_share)} {top!r}: its predictions collapsed onto one class, the sign "
        "of a frame it cannot read (preprocessing) or of a broken model",
        "no figure of this model is judged: it does not tell the classes apart on these frames",
        gates=ALL_GATES,
        values={"class": str(top), "share": float(share), "label_share": label_share},
        gate_status=NOT_JUDGED,
        short=f"its predictions collapsed onto {str(top)!r}",
    )


def _shown(value: Any) -> str:
    if isinstance(value, list) and value and isinstance(value[0], float):
        return "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
    return str(value)


def frame_differences(audit: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, tuple]:
    """key -> (audit's value, the data config's value) for each FRAME_KEYS entry that differs."""
    return {
        key: (audit.get(key), own.get(key))
        for key in FRAME_KEYS
        if not _same(audit.get(key), own.get(key))
    }


def _same(a: Any, b: Any) -> bool:
    numbers = (
        isinstance(a, list)
        and isinstance(b, list)
        and len(a) == len(b)
        and all(isinstance(v, (int, float)) for v in (*a, *b))
    )
    return bool(np.allclose(a, b, rtol=0, atol=1e-6)) if numbers else a == b


def check_frame(
    model: str, audit: Mapping[str, Any], own: Mapping[str, Any] | None, where: str
) -> dict[str, Any] | None:
    """Say where the audit's preprocessing (a Preprocess.to_dict()) differs from the model's own
    data config `own` (the source's, e.g. timm's pretrained config, or the checkpoint's record)."""
    if not own:
        return None
    differs = frame_differences(audit, own)
    if not differs:
        return None
    parts = "; ".join(f"{k} {_shown(a)} (its own: {_shown(b)})" for k, (a, b) in differs.items())
    return finding(
        "preprocessing_config",
        model,
        "warning",
        f"the audit's frame for {model} differs from {where}: {parts}",
        "every figure of this model is measured on this frame: if the model was trained with "
        f"{where}, remove those keys from [model.preprocess] and re-run",
        gates=ALL_GATES,
        values={k: {"audit": a, "own": b} for k, (a, b) in differs.items()},
        short=f"frame differs from its own data config ({', '.join(differs)})",
    )


def chance_accuracy(labels: Sequence[str]) -> float:
    """The accuracy of always answering the most common class: what a model must beat."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return float(counts.max() / counts.sum()) if counts.size else 0.0


def check_too_weak(
    model: str, accuracy: Mapping[str, Any], chance: float, floor: float | None = None
) -> dict[str, Any] | None:
    """A model whose accuracy's 95% interval reaches chance (or `floor`) is too weak to judge:
    its attention and group figures describe noise, not the model's bias."""
    value, low, high = accuracy.get("value"), accuracy.get("ci_low"), accuracy.get("ci_high")
    if value is None:
        return None
    bar = max(chance, floor) if floor is not None else chance
    reach = low if low is not None else value
    if reach > bar:
        return None
    interval = f" [{_pct(low)}-{_pct(high)}]" if low is not None and high is not None else ""
    what = (
        f"the stated floor {_pct(bar)}"
        if floor is not None and floor > chance
        else f"chance ({_pct(chance)}, always answering the most common class)"
    )
    return finding(
        "too_weak",
        model,
        "invalid",
        f"{model}'s accuracy {_pct(value)}{interval} does not clear {what}",
        "too weak to judge: no attention or group finding of this model is evidence of bias; "
        "make it learn the task first",
        gates=ALL_GATES,
        values={
            "accuracy": value,
            "ci_low": low,
            "ci_high": high,
            "chance": chance,
            "floor": floor,
        },
        gate_status=TOO_WEAK,
        short=f"its accuracy does not clear {what.split(' (')[0]}",
    )


def check_counterfactuals(model: str, counterfactual: Mapping[str, Any] | None) -> dict | None:
    """Name mean-fill counterfactuals (the protected regions filled with the image's mean colour)
    standing in for twins in the flip rate."""
    if not counterfactual or not counterfactual.get("n"):
        return None
    n, twins = int(counterfactual["n"]), int(counterfactual.get("from_twins") or 0)
    if twins >= n:
        return None
    return finding(
        "mean_fill_counterfactuals",
        model,
        "substitution",
        f"{n - twins} of {n} counterfactuals of {model} are its images with the protected "
        "regions filled with the image's mean colour, not twins with the other group's cues: "
        "the flip rate measures blanking those regions out",
        "the flip-rate gate reads how the model reacts to hidden protected regions, not to a "
        "changed group",
        gates=("max_flip_rate",),
        values={"n": n, "from_twins": twins, "mean_fill": n - twins},
        short=f"{n - twins} of {n} counterfactuals are mean-colour fills, not twins",
    )


def check_occlusion_control(
    model: str, trust: Mapping[str, Any] | None, regions: Sequence[str]
) -> list[dict[str, Any]]:
    """Name an occlusion control that may move onto the person (no `person` region to keep it
    off) and images left without a control."""
    occlusion = (trust or {}).get("occlusion") or {}
    if not occlusion:
        return []
    out = []
    if "person" not in regions:
        out.append(
            finding(
                "occlusion_control_moved",
                model,
                "substitution",
                "the manifest has no `person` region, so the occlusion control patch is kept "
                "off the annotated regions only and may land on the person's unannotated parts "
                f"(clothes, arms) instead of the background (regions: {', '.join(regions)})",
                "the occlusion effect compares the protected regions with a control that can "
                "cover the person: add a `box:person` or `mask:person` column to the manifest",
                gates=TRUST_GATES,
                short="the control may land on the person (no `person` region)",
            )
        )
    missing = {r: int(n) for r, n in (occlusion.get("no_control") or {}).items() if n}
    if missing:
        text = ", ".join(f"{n} images for {r}" for r, n in missing.items())
        out.append(
            finding(
                "occlusion_control_missing",
                model,
                "substitution",
                f"no place for the occlusion control was free on {text}: those images are left "
                "out of the occlusion effect",
                "the occlusion figures of those regions are measured on fewer images than the "
                "trust sample",
                gates=TRUST_GATES if "protected" in missing else (),
                values={"no_control": missing},
                short=f"no control on {missing.get('protected', 0)} images, left out",
            )
        )
    return out


def check_maps_left_out(
    model: str, method: str, n_images: int, n_empty: int
) -> dict[str, Any] | None:
    """Name maps that were all zero and so left out of the attention figures, with the count."""
    if not n_empty:
        return None
    return finding(
        "maps_left_out",
        model,
        "substitution",
        f"{n_empty} of {n_images} {method} maps of {model} were all zero and are left out: the "
        f"attention figures are measured over {n_images - n_empty} images",
        "the attention gates are measured over the images with a non-zero map only",
        gates=ATTENTION_GATES if method == "gradcam" else (),
        values={"method": method, "n_images": n_images, "left_out": n_empty},
        short=f"{n_empty} of {n_images} maps all zero, left out",
    )


def check_switched_off(
    models: Sequence[str], trust_enabled: bool, gates: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Gates whose check was switched off in the config: skipped, not failed."""
    if trust_enabled:
        return []
    out = []
    for model in models:
        keys = sorted(
            {g["gate"] for g in gates if g["model"] == model and g["gate"] in TRUST_GATES}
        )
        if keys:
            out.append(
                finding(
                    "check_switched_off",
                    model,
                    "skipped",
                    f"the trust checks are switched off ([trust] enabled = false), so the "
                    f"occlusion gate of {model} is skipped, not failed",
                    "the verdict is made without the occlusion gate",
                    gates=keys,
                    gate_status=SKIPPED,
                    short="trust checks off: the occlusion gate is skipped",
                )
            )
    return out


def check_unannotated(
    models: Sequence[str], gates: Sequence[Mapping[str, Any]], data: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Gates the data set cannot measure (no region masks, no group column): skipped, not failed,
    each named with the annotation it lacks."""
    lacking = []
    if not data.get("regions"):
        lacking.append(("region masks (mask: or box: columns)", MASK_GATES))
    if not [g for g in data.get("groups") or [] if g != "(none)"]:
        lacking.append(("group columns", GROUP_GATES))
    out = []
    for model in models:
        for what, keys in lacking:
            unmeasured = sorted(
                {
                    g["gate"]
                    for g in gates
                    if g["model"] == model and g["gate"] in keys and g.get("value") is None
                }
            )
            if unmeasured:
                out.append(
                    finding(
                        "check_unannotated",
                        model,
                        "skipped",
                        f"the data set has no {what}, so {', '.join(unmeasured)} cannot be "
                        f"measured for {model}: skipped, not failed",
                        "the verdict is made without these gates; slices and strategies found "
                        "from the model stand in for the missing annotations",
                        gates=unmeasured,
                        gate_status=SKIPPED,
                        short=f"no {what.split(' (')[0]} in the data set: skipped",
                    )
                )
    return out


# -- what the findings change --------------------------------------------------------------------
STATUS_ORDER = (SKIPPED, NOT_JUDGED, TOO_WEAK)  # the first that applies sets a gate's status


def apply_to_gates(
    gates: Sequence[Mapping[str, Any]], findings: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Gate rows with the findings applied: a model not measured as it works or too weak to judge
    gets that status on its gates (not passed); a switched-off check's gate is skipped (counted as
    passed, status "skipped"); a substitution is named in the note of each gate it concerns."""
    out = []
    for gate in gates:
        row = dict(gate)
        concerns = [f for f in findings if f["model"] == row["model"] and row["gate"] in f["gates"]]
        statuses = {f.get("gate_status") for f in concerns}
        status = next((s for s in STATUS_ORDER if s in statuses), None)
        if status is not None:
            reason = next(f for f in concerns if f.get("gate_status") == status)
            row["status"] = status
            row["passed"] = status == SKIPPED
            row["note"] = f"{status}: {reason.get('short') or reason['message']} (see Validity)"
        named = [f for f in concerns if f["severity"] in ("substitution", "warning")]
        if named and status is None:
            short = "; ".join(f.get("short") or f["message"] for f in named) + " (see Validity)"
            row["note"] = "; ".join([*([row["note"]] if row.get("note") else []), short])
        if named:
            row["substitutions"] = [f["message"] for f in named]
        out.append(row)
    return out


def log_lines(findings: Sequence[Mapping[str, Any]]) -> list[str]:
    """One run.log line per finding: what was found and the decision it changes."""
    return [f"validity {f['severity'].upper()}: {f['message']} -> {f['changes']}" for f in findings]


def model_status(findings: Sequence[Mapping[str, Any]], model: str) -> str:
    """ "not judged", "too weak to judge" or "valid": how far this model's figures can be read."""
    statuses = {f.get("gate_status") for f in findings if f["model"] == model}
    return next((s for s in (NOT_JUDGED, TOO_WEAK) if s in statuses), "valid")


# -- every check of a run ------------------------------------------------------------------------
def empty_maps(share_columns: Mapping[str, np.ndarray]) -> int:
    """Images whose map was all zero: every region's share is NaN (a zero map has no share)."""
    if not share_columns:
        return 0
    stacked = np.stack([np.asarray(v, np.float64) for v in share_columns.values()])
    return int(np.isnan(stacked).all(axis=0).sum())


def validity_findings(
    metrics: Mapping[str, Any],
    probes: Mapping[str, Mapping[str, Any]],
    trust_enabled: bool,
    floor: float | None = None,
) -> list[dict[str, Any]]:
    """Every finding of a run, models in order, from its metrics (models, data, gates) and per
    model the probe values: labels, predictions, norm_stats (norm_statistics or None), own (the
    model's own data config as Preprocess keys, or None), own_where (where it comes from) and
    empty_maps (Grad-CAM maps all zero); optionally floor, the model's stated accuracy floor
    (else `floor`)."""
    found: list[dict[str, Any] | None] = []
    regions = list(metrics["data"].get("regions") or [])
    for name, model in metrics["models"].items():
        probe = probes.get(name, {})
        labels = probe.get("labels", [])
        found.append(check_norm_statistics(name, probe.get("norm_stats")))
        found.append(check_collapse(name, labels, probe.get("predictions", [])))
        found.append(
            check_frame(
                name, model.get("preprocess") or {}, probe.get("own"), probe.get("own_where", "")
            )
        )
        accuracy = (model.get("performance") or {}).get("accuracy") or {}
        stated = probe.get("floor", floor)
        found.append(check_too_weak(name, accuracy, chance_accuracy(labels), stated))
        found.append(check_counterfactuals(name, model.get("counterfactual")))
        found.extend(check_occlusion_control(name, model.get("trust"), regions))
        n_images = ((model.get("attention") or {}).get("gradcam") or {}).get("n_images")
        if n_images:
            found.append(check_maps_left_out(name, "gradcam", n_images, probe.get("empty_maps", 0)))
    found.extend(check_switched_off(list(metrics["models"]), trust_enabled, metrics["gates"]))
    found.extend(check_unannotated(list(metrics["models"]), metrics["gates"], metrics["data"]))
    return [f for f in found if f is not None]
