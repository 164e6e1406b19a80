"""The map stage's driver: one model over the eval split, shard by shard, into per-image rows.

The per-batch work is `audit.pipeline.map` (locally) or `audit.pipeline.ray_map` (on Ray); this
module chooses the shards still to do (a resumed run skips the written ones), the layout and
precision (channels-last, bfloat16 only where it keeps every prediction), and turns the map's rows
into samples.csv's rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
from torch import nn
from torch.utils.data import default_collate
from tqdm import tqdm

from audit.config import ModelConfig
from audit.errors import AuditError
from audit.models.inference import use_channels_last
from audit.pipeline import map as mapping
from audit.pipeline.frames import FrameDataset, float_pixels
from audit.pipeline.map import MapSpec
from audit.pipeline.plan import RunContext, RunPlan

SHARD_BATCHES = 16  # batches per shard: the unit of resumption


def map_model(ctx: RunContext, spec: ModelConfig, model: nn.Module) -> pd.DataFrame:
    """Per-image rows of one model over the eval split, shard by shard (resumable)."""
    plan, options = ctx.plan, ctx.plan.options
    map_spec = plan.map_spec(spec)
    dataset = plan.eval_dataset(
        spec,
        twins=True,
        uint8_pixels=True,  # uint8: a quarter of the bytes per batch from workers
    )
    n = len(dataset)
    bounds = mapping.shard_bounds(n, map_spec.batch_size * SHARD_BATCHES)
    folder = ctx.work / "shards" / spec.name
    if n:
        probe = float_pixels(default_collate([dataset[i] for i in range(min(n, 8))])["image"])
        if use_channels_last(model, probe.to(plan.device)):
            ctx.log(f"{spec.name}: channels-last convolutions (same outputs on a probe batch)")
    if options.precision == "bf16":
        map_spec.autocast = bf16_keeps_predictions(ctx, spec.name, model, map_spec, dataset)
    pending = list(mapping.pending_shards(folder, bounds))
    if len(pending) < len(bounds):
        ctx.log(f"{spec.name}: {len(bounds) - len(pending)} of {len(bounds)} shards resumed")
    bar = tqdm(
        total=n,
        initial=n - sum(e - s for s, e in pending),
        desc=f"explain {spec.name}",
        unit="img",
        disable=not options.progress,
    )
    try:
        if options.ray:
            from audit.pipeline.ray_map import RayError, quiet_stderr, ray_map

            try:
                with quiet_stderr(ctx.work / "ray.log", not options.progress):
                    for b, table in ray_map(
                        options.ray, model, map_spec, dataset, pending, plan.workers or 1
                    ):
                        mapping.write_shard(table, mapping.shard_path(folder, b[0]))
                        bar.update(b[1] - b[0])
            except RayError as error:
                raise AuditError(str(error)) from None
        else:
            for b, table in mapping.map_shards(
                model, map_spec, dataset, pending, plan.device, plan.workers, on_batch=bar.update
            ):
                mapping.write_shard(table, mapping.shard_path(folder, b[0]))
    finally:
        bar.close()
    return mapping.read_shards(folder, bounds)


def bf16_keeps_predictions(
    ctx: RunContext, name: str, model: nn.Module, spec: MapSpec, dataset: FrameDataset
) -> bool:
    """Whether bfloat16 autocast predicts exactly as float32 on the first batches of the split;
    the map uses it only then (the run says which)."""
    device = ctx.plan.device
    probe = [(0, min(len(dataset), 4 * spec.batch_size))]
    exact = dataclasses.replace(spec, autocast=False)
    mixed = dataclasses.replace(spec, autocast=True)
    ((_, a),) = mapping.map_shards(model, exact, dataset, probe, device, 0)
    ((_, b),) = mapping.map_shards(model, mixed, dataset, probe, device, 0)
    same = bool((a["prediction"].to_numpy() == b["prediction"].to_numpy()).all())
    changed = int((a["prediction"].to_numpy() != b["prediction"].to_numpy()).sum())
    ctx.log(
        f"{name}: bfloat16 autocast used (same predictions on {probe[0][1]} images)"
        if same
        else f"{name}: float32 kept: bfloat16 changed {changed} of {probe[0][1]} predictions"
    )
    return same


def sample_table(plan: RunPlan, spec: ModelConfig, rows: pd.DataFrame) -> pd.DataFrame:
    """samples.csv's rows of one model from its map rows (names instead of indices)."""
    eval_rows = plan.eval_rows.reset_index(drop=True)
    bad = ~rows["ok"].to_numpy(bool)
    classes = np.array(plan.classes, dtype=object)
    columns: dict[str, Any] = {
        "model": spec.name,
        "image": eval_rows["image"],
        "label": eval_rows["label"],
        "group": eval_rows["group"],
        "split": eval_rows["split"],
        "prediction": classes[rows["prediction"]],
        "confidence": rows["confidence"].to_numpy(np.float64),
        "correct": rows["correct"].to_numpy(bool),
    }
    if "flipped" in rows:
        columns["counterfactual_prediction"] = classes[rows["counterfactual_prediction"]]
        columns["counterfactual_source"] = np.where(
            rows["counterfactual_from_twin"].to_numpy(bool), "twin", "mean_fill"
        )
        columns["flipped"] = rows["flipped"].to_numpy(bool)
    for attribute in plan.attributes:
        column = plan.manifest.attribute_columns[attribute]
        columns[f"group:{attribute}"] = eval_rows[column].to_numpy()
    columns |= {c: rows[c].to_numpy(np.float64) for c in rows if c.startswith("flipped:")}
    columns["explained"] = False
    columns["gradcam_mass"] = rows["gradcam_mass"].to_numpy(np.float64)
    for column in rows.columns:
        if column.split(":")[0] in ("share", "hit", "iou", "area"):
            columns[column] = rows[column].to_numpy(np.float64)
    for extra in plan.manifest.extra_columns:
        columns[f"extra:{extra}"] = eval_rows[extra].to_numpy()
    table = pd.DataFrame(columns)
    return table[~bad].reset_index(drop=True) if bad.any() else table
