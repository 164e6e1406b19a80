"""The discovery stage: strategies and slices of one model, from the rows its map kept.

Reads each image's embedding and pooled Grad-CAM map from the map's rows (no image is decoded
again), runs `audit.metrics.discovery`, and says what each finding coincides with among the
annotations the data set has: classes, groups of every attribute, class x group cells and their
intersections, and the regions' Grad-CAM shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from audit.metrics.discovery import (
    SliceSettings,
    accuracy_estimate,
    best_matches,
    error_slices,
    normalized_maps,
    strategies,
)
from audit.pipeline.plan import RunContext

if TYPE_CHECKING:
    from audit.config import ModelConfig

FAR_BELOW = 0.10  # a slice this far below every annotated cell is "a group the data does not name"


@dataclass
class DiscoveryInput:
    """What discovery needs of one model's map and of the data set, positions aligned."""

    rows: pd.DataFrame  # the map's rows of the decodable images (embedding, heat, correct, ...)
    images: np.ndarray  # image path per row
    labels: np.ndarray  # class index per row
    classes: list[str]
    attributes: dict[str, np.ndarray] = field(default_factory=dict)  # attribute -> value per row
    min_cell_size: int = 30


def annotated_groups(data: DiscoveryInput) -> dict[str, np.ndarray]:
    """Name -> positions for every class, group, class x group cell and class x intersection."""
    groups: dict[str, np.ndarray] = {}
    for c, name in enumerate(data.classes):
        groups[name] = np.flatnonzero(data.labels == c)
    names = list(data.attributes)
    for attribute in names:
        values = data.attributes[attribute]
        for value in sorted(set(values.tolist())):
            groups[f"{attribute}={value}"] = np.flatnonzero(values == value)
    combos = [names[:1], names] if len(names) > 1 else [names]
    for combo in combos:
        if not combo:
            continue
        choices = [sorted(set(data.attributes[a].tolist())) for a in combo]
        for c, name in enumerate(data.classes):
            for picked in product(*choices):
                inside = data.labels == c
                for attribute, value in zip(combo, picked, strict=True):
                    inside &= data.attributes[attribute] == value
                if inside.any():
                    label = ", ".join(f"{a}={v}" for a, v in zip(combo, picked, strict=True))
                    groups[f"{name} / {label}"] = np.flatnonzero(inside)
    return groups


def worst_annotated_cell(data: DiscoveryInput, correct: np.ndarray) -> float | None:
    """The lowest accuracy of any annotated class x group cell large enough to judge (else class)."""
    cells = [
        positions
        for name, positions in annotated_groups(data).items()
        if " / " in name and positions.size >= data.min_cell_size
    ]
    if not cells:
        cells = [np.flatnonzero(data.labels == c) for c in range(len(data.classes))]
    rates = [correct[p].mean() for p in cells if p.size]
    return float(min(rates)) if rates else None


def _region_shares(rows: pd.DataFrame, members: np.ndarray) -> dict[str, float]:
    """Mean Grad-CAM share of each annotated region over the members (regions with masks only)."""
    shares = {}
    for column in rows.columns:
        if column.startswith("share:gradcam:"):
            values = rows[column].to_numpy(np.float64)[members]
            if np.isfinite(values).any():
                shares[column.split(":", 2)[2]] = float(np.nanmean(values))
    return shares


def _finding(
    data: DiscoveryInput, found: dict, groups: dict[str, np.ndarray], maps: np.ndarray
) -> dict[str, Any]:
    """The JSON form of one strategy or slice (member lists reduced to what a reader needs);
    `maps` are every row's unit-sum pooled Grad-CAM maps."""
    mean_map = maps[found["members"]].mean(axis=0)
    entry = {
        "class": found["class"],
        "size": found["size"],
        "accuracy": found["accuracy"],
        "matches": best_matches(
            found["members"], {k: v for k, v in groups.items() if k not in data.classes}
        ),
        "region_shares": _region_shares(data.rows, found["members"]),
        "mean_gradcam": [round(float(v), 6) for v in mean_map],
        "typical": [str(data.images[p]) for p in found["typical"]],
        "typical_positions": [int(p) for p in found["typical"]],
    }
    for key in ("rest_of_class", "gap", "share_of_class", "cluster"):
        if key in found:
            entry[key] = found[key]
    return entry


def discover(
    data: DiscoveryInput, seed: int, settings: SliceSettings | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """metrics.json's `discovery` block and per-row `slice` / `strategy` ids (0: none)."""
    with threadpool_limits(limits=1):  # small problems: OpenMP threads beside torch's only contend
        return _discover(data, seed, settings or SliceSettings())


def _discover(
    data: DiscoveryInput, seed: int, settings: SliceSettings
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    correct = data.rows["correct"].to_numpy(bool)
    n = len(data.rows)
    if "embedding" not in data.rows or n == 0:
        note = (
            "the map kept no features of this model: its explained layer gives no feature map "
            "(name one with the [[model]] key `layer`)"
        )
        return {"skipped": note}, {}
    embeddings = np.stack(data.rows["embedding"].to_numpy()).astype(np.float32)
    heat = np.stack(data.rows["heat"].to_numpy()).astype(np.float32)
    groups = annotated_groups(data)
    maps = normalized_maps(heat)  # once, for every finding's mean map
    found_slices = error_slices(embeddings, data.labels, correct, data.classes, settings, seed)
    found_strategies = strategies(heat, data.labels, correct, data.classes, seed)
    columns = {"slice": np.zeros(n, np.int64), "strategy": np.zeros(n, np.int64)}
    slices = []
    for i, found in enumerate(found_slices, start=1):
        columns["slice"][found["members"]] = i
        slices.append({"id": i, **_finding(data, found, groups, maps)})
    kinds = []
    for i, found in enumerate(found_strategies, start=1):
        columns["strategy"][found["members"]] = i
        kinds.append({"id": i, **_finding(data, found, groups, maps)})
    block: dict[str, Any] = {
        "method": {
            "slices": "error-aware mixture over the explained layer's pooled activations "
            f"(Domino-style; {settings.components} components per class, error weight "
            f"{settings.error_weight:g}, {settings.pca_dims} PCA dimensions, "
            f"at least {settings.min_size} images)",
            "strategies": "k-means on unit-sum Grad-CAM maps pooled to 8x8, per class, k by "
            "silhouette (SpRAy-style)",
        },
        "slices": slices,
        "strategies": kinds,
        "classes_too_small": [
            c
            for i, c in enumerate(data.classes)
            if (data.labels == i).sum() < 2 * settings.min_size
        ],
    }
    floor = worst_annotated_cell(data, correct)
    block["worst_annotated_accuracy"] = floor
    if slices:
        worst = min(slices, key=lambda s: (s["accuracy"]["value"], s["id"]))
        block["worst_slice"] = {"id": worst["id"], "accuracy": worst["accuracy"]}
        block["unnamed_failure"] = bool(
            floor is not None
            and worst["accuracy"]["value"] <= floor - FAR_BELOW
            and worst["gap"] <= -FAR_BELOW
        )
    else:  # no coherent part of any class stands apart: the worst class is the worst "slice"
        by_class = [accuracy_estimate(correct[data.labels == c]) for c in range(len(data.classes))]
        worst_class = min(by_class, key=lambda e: e["value"] if e["n"] else 2.0)
        block["worst_slice"] = {"id": None, "accuracy": worst_class}
        block["unnamed_failure"] = False
    block["overall"] = accuracy_estimate(correct)
    return block, columns


def discover_model(
    ctx: RunContext, spec: ModelConfig, rows: pd.DataFrame
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Slices and strategies of one model from its map rows (positions over the eval split)."""
    plan = ctx.plan
    settings = plan.config.discovery
    if not settings.enabled:
        return {"skipped": "switched off ([discovery] enabled = false)"}, {}
    keep = rows["ok"].to_numpy(bool)
    eval_rows = plan.eval_rows.reset_index(drop=True)[keep]
    data = DiscoveryInput(
        rows=rows[keep].reset_index(drop=True),
        images=eval_rows["image"].to_numpy(),
        labels=np.searchsorted(plan.classes, eval_rows["label"].to_numpy()),
        classes=list(plan.classes),
        attributes={
            a: eval_rows[plan.manifest.attribute_columns[a]].astype(str).to_numpy()
            for a in plan.attributes
        },
        min_cell_size=plan.config.data.min_cell_size,
    )
    block, columns = discover(data, plan.config.seed, settings.slice_settings())
    ok_positions = np.flatnonzero(keep)
    for finding in [*block.get("slices", []), *block.get("strategies", [])]:
        finding["typical_positions"] = [int(ok_positions[p]) for p in finding["typical_positions"]]
    worst = block.get("worst_slice")
    if worst:
        ctx.log(
            f"{spec.name}: worst discovered slice {worst['id']} at accuracy "
            f"{worst['accuracy']['value']:.3f} ({len(block['slices'])} slices, "
            f"{len(block['strategies'])} explanation strategies)"
        )
    return block, columns  # aligned with samples.csv's rows (decodable images)
