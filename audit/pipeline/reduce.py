"""The reduce stage: per-image rows -> every metric, interval, comparison and gate of a run.

Everything here reads the sample table (one row per model x evaluated image, as in samples.csv), so
a local run, a resumed run and a Ray run give the same metrics from the same rows. Bootstrap weights
are drawn once per run and shared by all models, so differences between models are paired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from audit.metrics import validity
from audit.metrics.aggregate import aggregate_attention, groups_of
from audit.metrics.bootstrap import estimate, resample_weights, weighted_means
from audit.metrics.gates import evaluate_gates, verdicts
from audit.metrics.groups import cell_rows, group_metrics
from audit.metrics.harm import judge_harm
from audit.metrics.performance import headline_samples, performance
from audit.metrics.trust import occlusion_difference
from audit.pipeline.plan import RunContext, RunPlan
from audit.pipeline.trust_stage import TRUST_SEED_OFFSET, trust_sample

MEASURES = ("share", "hit", "iou")
METRICS_SCHEMA_VERSION = 2


def attention_columns(table: pd.DataFrame, method: str) -> dict[str, np.ndarray]:
    """`region|measure` -> per-image values of one method, from `measure:method:region` columns."""
    values = {}
    for column in table.columns:
        parts = column.split(":")
        if len(parts) == 3 and parts[0] in MEASURES and parts[1] == method:
            values[f"{parts[2]}|{parts[0]}"] = table[column].to_numpy(np.float64)
    return values


def model_metrics(
    table: pd.DataFrame,
    classes: list[str],
    methods: list[str],
    weights: np.ndarray,
    seed: int,
    *,
    attributes: list[str] | None = None,
    intersections: bool = True,
    min_cell_size: int = 0,
) -> dict[str, Any]:
    """Performance, attention per method, counterfactual flips and fairness per protected
    attribute (and their intersection) of one model's sample table."""
    groups = groups_of(table)
    explained = table["explained"].to_numpy(bool)
    attention = {}
    for method in methods:
        values = attention_columns(table, method)
        # Grad-CAM covers every evaluated image; the other methods the explained ones.
        rows = np.ones(len(table), bool) if method == "gradcam" else explained
        if not values or not rows.any():
            continue
        sub = table[rows].reset_index(drop=True)
        sub_weights = (
            weights if method == "gradcam" else resample_weights(len(sub), len(weights), seed + 1)
        )
        attention[method] = aggregate_attention(
            {k: v[rows] for k, v in values.items()}, sub, sub_weights
        ) | {"n_images": int(rows.sum())}
    metrics: dict[str, Any] = {
        "performance": performance(
            table["label"].to_numpy(),
            table["prediction"].to_numpy(),
            groups,
            classes,
            weights,
            min_cell_size=min_cell_size,
        ),
        "fairness": group_metrics(
            table,
            attributes or None,
            classes,
            weights,
            intersections=intersections,
            min_cell_size=min_cell_size,
        ),
        "attention": attention,
        "explained_images": int(explained.sum()),
        "misclassified_images": int((~table["correct"].to_numpy(bool)).sum()),
    }
    if "flipped" in table:
        metrics["counterfactual"] = counterfactual_metrics(table, groups, weights)
    return metrics


def counterfactual_metrics(
    table: pd.DataFrame, groups: np.ndarray, weights: np.ndarray
) -> dict[str, Any]:
    """Flip rate overall and per group, with bootstrap intervals."""
    flipped = table["flipped"].to_numpy(np.float64)
    names = sorted(set(groups))
    members = np.stack([groups == g for g in names]).astype(np.float64)
    point = weighted_means(flipped, members, np.ones((1, len(flipped))))[0]
    boot = weighted_means(flipped, members, weights) if len(weights) else None
    return {
        "flip_rate": estimate(
            flipped.mean(), weights @ flipped / len(flipped) if len(weights) else None
        ),
        "n": len(flipped),
        "from_twins": int((table["counterfactual_source"] == "twin").sum()),
        "per_group": {
            g: estimate(point[i], None if boot is None else boot[:, i]) for i, g in enumerate(names)
        },
    }


def compare(
    tables: dict[str, pd.DataFrame], rows: pd.DataFrame, weights: np.ndarray
) -> list[dict[str, Any]]:
    """Differences (each model minus the first), paired over the same images and resamples."""
    names = list(tables)
    base = tables[names[0]]
    n = len(rows)
    everyone = np.ones((1, n))
    groups = groups_of(rows)
    headline = {
        name: headline_samples(
            table["correct"].to_numpy(float), rows["label"].to_numpy(), groups, weights
        )
        for name, table in tables.items()
    }
    shares = [c for c in base.columns if c.startswith("share:gradcam:")]
    comparisons = []
    for name in names[1:]:
        other = tables[name]
        entry: dict[str, Any] = {"a": names[0], "b": name, "attention_share_difference": {}}
        for column in shares:
            diff = other[column].to_numpy(np.float64) - base[column].to_numpy(np.float64)
            point = weighted_means(diff, everyone, np.ones((1, n)))[0, 0]
            boot = weighted_means(diff, everyone, weights)[:, 0] if len(weights) else None
            entry["attention_share_difference"][column.split(":")[2]] = estimate(point, boot)
        for metric, a_values in headline[names[0]].items():
            diff = headline[name][metric] - a_values
            entry[f"{metric}_difference"] = estimate(diff[0], diff[1:] if len(weights) else None)
        if "flipped" in base and "flipped" in other:
            flips = other["flipped"].to_numpy(float) - base["flipped"].to_numpy(float)
            entry["flip_rate_difference"] = estimate(
                flips.mean(), weights @ flips / n if len(weights) else None
            )
        comparisons.append(entry)
    return comparisons


def region_areas(table: pd.DataFrame) -> dict[str, float | None]:
    """Mean share of the image each region covers where present: what uniform attention gives it."""
    out: dict[str, float | None] = {}
    for column in table.columns:
        if column.startswith("area:"):
            values = table[column].to_numpy(np.float64)
            finite = values[np.isfinite(values)]
            out[column[5:]] = round(float(finite.mean()), 6) if finite.size else None
    return out


# -- the run's reduce: every model's rows -> metrics.json ------------------------------------------
@dataclass
class ModelResult:
    """What the per-model stages hand to the reduce: samples.csv's rows of the model, its entry
    of metrics.json so far, its raw occlusion result (paired between models) and validity probe."""

    table: pd.DataFrame
    info: dict[str, Any]
    occlusion: dict[str, Any] | None
    probe: dict[str, Any]


def sample_tables(results: dict[str, ModelResult]) -> dict[str, pd.DataFrame]:
    """Every model's rows on the images every model could decode, rounded as samples.csv is: the
    metrics are reduced from exactly what samples.csv holds (6 decimals)."""
    tables = {name: result.table for name, result in results.items()}
    images = set.intersection(*(set(t["image"] + "\0" + t["split"]) for t in tables.values()))
    if any(len(t) != len(images) for t in tables.values()):  # bad images differ by frame
        tables = {
            k: t[(t["image"] + "\0" + t["split"]).isin(images)].reset_index(drop=True)
            for k, t in tables.items()
        }
    return {k: t.round(6) for k, t in tables.items()}


def run_metrics(
    ctx: RunContext,
    results: dict[str, ModelResult],
    tables: dict[str, pd.DataFrame],
    gallery: np.ndarray,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """metrics.json of the run (NaN written as null), and per_cell.csv's rows."""
    config = ctx.plan.config
    first = next(iter(tables.values()))
    weights = resample_weights(len(first), config.bootstrap, config.seed)
    models, per_cell = _model_blocks(ctx, results, tables, weights)
    metrics = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "seed": config.seed,
        "bootstrap": config.bootstrap,
        "data": data_summary(ctx.plan, region_areas(first)),
        "gallery": [int(i) for i in gallery],
        "models": models,
        "comparisons": compare(tables, first, weights),
        "mitigation_harm": judge_harm(  # audit.metrics.harm
            tables, {name: r.info for name, r in results.items()}, first, weights
        ),
    }
    if config.trust.enabled:
        _occlusion_differences(ctx.plan, metrics["comparisons"], results)
    metrics["gates"] = evaluate_gates(metrics, config.to_dict()["gates"])
    found = add_validity(ctx, metrics, tables, results)
    metrics["verdicts"] = verdicts(metrics["gates"], list(tables))
    metrics["validity"] = found
    return clean_nan(metrics), per_cell


def _model_blocks(
    ctx: RunContext,
    results: dict[str, ModelResult],
    tables: dict[str, pd.DataFrame],
    weights: np.ndarray,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """metrics.json's `models` (each model's info and metrics) and per_cell.csv's rows."""
    plan = ctx.plan
    config = plan.config
    models = {}
    cells: list[pd.DataFrame] = []
    for name, table in tables.items():
        metrics = model_metrics(
            table,
            plan.classes,
            config.explain.methods,
            weights,
            config.seed,
            attributes=plan.attributes,
            intersections=config.data.intersections,
            min_cell_size=config.data.min_cell_size,
        )
        cells.append(cell_rows(metrics["fairness"]).assign(model=name))
        models[name] = results[name].info | metrics
        perf = metrics["performance"]
        worst = perf["worst_group_accuracy"]["value"]  # None: every cell is too few to judge
        ctx.log(
            f"{name}: accuracy {perf['accuracy']['value']:.3f}, "
            f"worst group {'n/a (cells too small)' if worst is None else f'{worst:.3f}'}"
        )
    per_cell = pd.concat(cells, ignore_index=True)
    return models, per_cell[["model", *per_cell.columns[:-1]]]


def _occlusion_differences(
    plan: RunPlan, comparisons: list[dict[str, Any]], results: dict[str, ModelResult]
) -> None:
    """Each comparison with the first model gets the paired difference of occlusion effects."""
    config = plan.config
    names = list(results)
    n_sample = len(trust_sample(len(plan.eval_rows), config.trust, config.seed))
    trust_weights = resample_weights(n_sample, config.bootstrap, config.seed + TRUST_SEED_OFFSET)
    for entry, other in zip(comparisons, names[1:], strict=True):
        if results[names[0]].occlusion is None:  # no regions to occlude
            continue
        entry["occlusion_difference"] = occlusion_difference(
            results[names[0]].occlusion, results[other].occlusion, trust_weights
        )


def add_validity(
    ctx: RunContext,
    metrics: dict[str, Any],
    tables: dict[str, pd.DataFrame],
    results: dict[str, ModelResult],
) -> dict[str, Any]:
    """Validity findings (metrics.json's `validity`), logged; the gates they change (issue 24)."""
    probes = {}
    for name, table in tables.items():
        shares = {c: table[c].to_numpy() for c in table if c.startswith("share:gradcam:")}
        probes[name] = results[name].probe | {
            "labels": table["label"].to_numpy(),
            "predictions": table["prediction"].to_numpy(),
            "empty_maps": validity.empty_maps(shares),
        }
    findings = validity.validity_findings(metrics, probes, ctx.plan.config.trust.enabled)
    metrics["gates"] = validity.apply_to_gates(metrics["gates"], findings)
    for line in validity.log_lines(findings):
        ctx.log(line)
    return {
        "findings": findings,
        "models": {n: validity.model_status(findings, n) for n in tables},
    }


def data_summary(plan: RunPlan, areas: dict[str, float | None]) -> dict[str, Any]:
    """metrics.json's `data`: the manifest, classes, groups, regions and every split's cells."""
    table = plan.manifest.table
    data = plan.config.data
    splits = {}
    for split, rows in table.groupby("split", sort=True):
        cells = rows.groupby(["label", "group"]).size()
        per_class = {}
        for label, by_label in rows.groupby("label"):
            counts = by_label["group"].replace("", "(none)").value_counts()
            per_class[label] = {g: round(c / len(by_label), 4) for g, c in sorted(counts.items())}
        splits[split or "(none)"] = {
            "n": len(rows),
            "cells": {
                f"{label} / {group or '(none)'}": int(c) for (label, group), c in cells.items()
            },
            "group_share_per_class": per_class,
        }
    return {
        "manifest": str(data.manifest),
        "classes": plan.classes,
        "groups": sorted(set(groups_of(table))),
        "regions": plan.manifest.regions,
        "protected_regions": data.protected_regions,
        "core_regions": data.core_regions,
        "eval_split": data.eval_split,
        "attributes_left_out": plan.left_out,  # attribute -> its only value(s) in eval_split
        "splits": splits,
        "region_area": areas,
    }


def clean_nan(value: Any) -> Any:
    """NaN and infinities as None (JSON's null), in nested dicts and lists."""
    if isinstance(value, dict):
        return {k: clean_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_nan(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
