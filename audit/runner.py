"""One audit end to end: manifest -> models -> map (batches -> per-image rows) -> reduce -> report.

Memory holds a batch, not the data set: the evaluation split is decoded in DataLoader workers and
explained batch by batch (`audit.pipeline.map`), each shard of rows written to the hidden work folder;
the images the report shows are chosen from those rows and explained again with every method
(`audit.pipeline.gallery`); every metric comes from the rows (`audit.pipeline.reduce`). The map runs
locally or on Ray (`audit.pipeline.ray_map`) with the same per-batch function. The work folder is
moved into place only when the run (report included) has finished (`audit.pipeline.rundir`).
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import default_collate
from tqdm import tqdm

from audit.config import AuditConfig, ModelConfig
from audit.data.manifest import Manifest, one_valued, read_manifest, unseen_classes
from audit.data.preprocess import Preprocess, resolve_preprocess
from audit.explain.errors import LayerError
from audit.explain.layers import resolve_layer
from audit.metrics import validity
from audit.metrics.aggregate import groups_of
from audit.metrics.bootstrap import resample_weights
from audit.metrics.gates import evaluate_gates, verdicts
from audit.metrics.groups import cell_rows
from audit.metrics.harm import judge_harm
from audit.metrics.trust import occlusion_difference
from audit.models.dfr import reweight_last_layer
from audit.models.inference import use_channels_last
from audit.models.io import read_state_dict, save_checkpoint, sha256
from audit.models.mitigations import NEEDS_MASKS, MitigationError
from audit.models.selection import check_inputs, train_selected
from audit.models.sources import Prepared, build_model, check_arch, prepare_model
from audit.models.train import TrainConfig
from audit.models.zoo import default_layer
from audit.pipeline import map as mapping
from audit.pipeline.discover import DiscoveryInput, discover
from audit.pipeline.frames import FrameDataset, ImageDecodeError, float_pixels
from audit.pipeline.gallery import (
    MAX_FLIPPED_SHOWN,
    cell_names,
    choose_gallery,
    choose_mistakes,
    explain_details,
)
from audit.pipeline.map import CORE, PROTECTED, MapSpec
from audit.pipeline.reduce import compare, model_metrics, region_areas
from audit.pipeline.rundir import (
    ResumableError,
    RunInterrupted,
    Terminated,
    check_target,
    fsync_path,
    install,
    list_files,
    prepare_work,
    run_lock,
    sigterm_as_interrupt,
    work_folder,
    write_durably,
)
from audit.pipeline.trust_stage import TRUST_SEED_OFFSET, run_trust, trust_sample
from audit.version import __version__

METRICS_SCHEMA_VERSION = 2
SHARD_BATCHES = 16  # batches per shard: the unit of resumption
TRAIN_CACHE_BYTES = 1 << 30  # a training split up to 1 GiB of frames is decoded once, not per epoch


class AuditError(ValueError):
    """A user-facing problem with the audit's inputs."""


@dataclasses.dataclass
class RunOptions:
    """How to run (not what to audit): these never change the results."""

    device: str = "auto"
    workers: int | None = None  # DataLoader workers; None = one per two cores, at most 4
    ray: str | None = None  # None: local; "local": a local Ray; else a cluster address
    resume: bool = False
    force: bool = False
    skip_bad_images: bool = False
    precision: str = "fp32"  # "bf16": bfloat16 autocast where it keeps the predictions identical
    progress: bool = True
    render: bool = True


class RunLog:
    """Messages to the console (through `echo`) and to run.log."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.lines: list[str] = []

    def __call__(self, message: str) -> None:
        self.lines.append(f"{time.strftime('%H:%M:%S')} {message}")
        self.echo(message)


def resolve_device(name: str) -> torch.device:
    """`auto` (a GPU when there is one), `cpu`, `cuda` or `cuda:N`, checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AuditError(f"--device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AuditError(f"--device {name}: no CUDA GPU is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AuditError(
                f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif device.type != "cpu":
        raise AuditError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 2) // 2))


def _check_regions(config: AuditConfig, manifest: Manifest) -> None:
    for key in ("protected_regions", "core_regions"):
        for region in getattr(config.data, key):
            if region not in manifest.regions:
                known = ", ".join(manifest.regions) or "none"
                raise AuditError(
                    f"data.{key}: region {region!r} is not in {config.data.manifest} (regions: {known})"
                )


def _check_eval_split(
    config: AuditConfig, manifest: Manifest, attributes: list[str], log: Callable[[str], None]
) -> tuple[list[str], dict[str, list[str]]]:
    """Refuse eval classes a trained model never saw (unless data.allow_unseen_classes); return the
    attributes to audit, leaving out (and saying so) those with under two groups in the eval split,
    and those left out with their values."""
    evaluated = manifest.split(config.data.eval_split)
    for model in config.model:
        if not model.train_split:
            continue
        unseen = unseen_classes(manifest.split(model.train_split), evaluated)
        if not unseen:
            continue
        named = "; ".join(f"{label!r} on {lines}" for label, lines in unseen.items())
        where = (
            f"{config.data.manifest}: eval split {config.data.eval_split!r} has class(es) that "
            f"model {model.name!r} never saw in its train_split {model.train_split!r}: {named}"
        )
        if not config.data.allow_unseen_classes:
            raise AuditError(
                f"{where}; correct the labels, or set data.allow_unseen_classes = true to audit "
                "them as classes the model cannot predict"
            )
        log(
            f"warning: {where} (allowed by data.allow_unseen_classes: their rows stay in every "
            "figure, for a model never trained to predict them)"
        )
    candidates = attributes or manifest.attributes
    left_out = one_valued(evaluated, {a: manifest.group_column(a) for a in candidates})
    if all(not values for values in left_out.values()) and len(left_out) == len(candidates):
        log(
            "data: no group column has a value in the eval split: no group figures or gates; "
            "slices and strategies found from the model stand in for the missing annotations"
        )
        return [], left_out
    for attribute, values in left_out.items():
        has = f"only the value {values[0]!r}" if values else "no value"
        log(
            f"warning: attribute {attribute!r} has {has} in eval split "
            f"{config.data.eval_split!r}: left out of the fairness figures, gates and intersections"
        )
    kept = [a for a in candidates if a not in left_out]
    if not kept:
        raise AuditError(
            f"{config.data.manifest}: no protected attribute has two or more groups in eval split "
            f"{config.data.eval_split!r} ({', '.join(candidates)}); a bias audit compares groups"
        )
    return (kept if left_out else attributes), left_out


def _check_layer(name: str, arch: str, model: nn.Module, layer: str | None) -> None:
    modules = [n for n, _ in model.named_modules() if n]
    if layer is not None and layer not in modules:
        close = difflib.get_close_matches(layer, modules, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise AuditError(f"model {name!r}: unknown layer {layer!r} in {arch}{hint}")


# A model given in memory (audit.api): called with the data's classes, it returns the model
# prepared for the audit (its preprocessing resolved), in place of building or training one.
GivenModel = Callable[[list[str]], Prepared]


class Auditor:
    """Runs one audit described by an AuditConfig into a work folder."""

    def __init__(
        self,
        config: AuditConfig,
        work: Path,
        log: RunLog,
        options: RunOptions,
        given: Mapping[str, GivenModel] | None = None,
    ) -> None:
        self.config = config
        self.given = dict(given or {})
        self.work = work
        self.log = log
        self.options = options
        self.device = resolve_device(options.device)
        self.workers = default_workers() if options.workers is None else options.workers

    # -- data -----------------------------------------------------------------------------
    def preflight(self) -> None:
        """Checks that need no data: fail before any work is done."""
        for spec in self.config.model:
            if spec.name in self.given:
                continue
            source = check_arch(spec.arch, self.config.base_dir)
            if spec.layer and source.kind in ("small_cnn", "torchvision"):
                model = build_model(spec.arch, 2, base_dir=self.config.base_dir, kwargs=spec.kwargs)
                _check_layer(spec.name, spec.arch, model, spec.layer)
            if spec.checkpoint and not self.config.resolve(spec.checkpoint).is_file():
                raise AuditError(f"model {spec.name!r}: checkpoint not found: {spec.checkpoint}")
        if not self.config.manifest_path.is_file():
            raise AuditError(f"data.manifest: manifest not found: {self.config.data.manifest}")

    def load_data(self) -> None:
        config = self.config
        self.manifest = read_manifest(config.manifest_path, decode=False)  # the map decodes
        if not self.manifest.regions:  # labels only: discovery still works, region measures not
            self.log(
                "data: the manifest has no mask: or box: columns, so region-based measures "
                "(attention shares, occlusion) are skipped; slices and strategies are still found"
            )
            config.data.protected_regions, config.data.core_regions = [], []
        _check_regions(config, self.manifest)
        table = self.manifest.table
        self.classes = sorted(set(table["label"]))
        if len(self.classes) < 2:
            raise AuditError(
                f"{config.data.manifest}: at least two classes are needed, found {self.classes}"
            )
        self.groups = sorted(set(table["group"]) - {""})
        named = [a for a in self.manifest.attributes if a != "group"]
        for attribute in config.data.attributes:
            if attribute not in self.manifest.attributes:
                known = ", ".join(self.manifest.attributes)
                raise AuditError(
                    f"data.attributes: attribute {attribute!r} is not in {config.data.manifest} "
                    f"(attributes: {known})"
                )
        self.attributes = list(config.data.attributes) or named
        self.attributes, self.left_out = _check_eval_split(
            config, self.manifest, self.attributes, self.log
        )
        for model in config.model:
            if model.train_split:
                rows = self.manifest.split(model.train_split)
                masks = [f"mask:{r}" for r in config.data.protected_regions]
                has_masks = all(c in rows for c in masks) and bool(
                    (rows[[c for c in masks if c in rows]] != "").any(axis=1).all()
                )
                try:
                    model.mitigation_config().check(
                        has_groups=bool((rows["group"] != "").all()), has_masks=has_masks
                    )
                except MitigationError as error:
                    raise AuditError(
                        f"model {model.name!r} (train_split {model.train_split!r}): {error}"
                    ) from None
        # Models are built or loaded now, so that a wrong checkpoint fails before any work is done.
        self.prepared: dict[str, Prepared] = {}
        for spec in config.model:
            torch.manual_seed(config.seed)
            given = self.given.get(spec.name)
            prepared = (
                given(self.classes)
                if given
                else prepare_model(
                    spec, self.classes, base_dir=config.base_dir, image_size=config.data.image_size
                )
            )
            if isinstance(prepared.model, torch.jit.ScriptModule):
                raise AuditError(
                    f"model {spec.name!r} is a TorchScript file: Grad-CAM needs forward hooks, which "
                    "ScriptModules do not support; give its state dict with arch instead"
                )
            for message in prepared.messages:
                self.log(f"{spec.name}: {message}")
            self.prepared[spec.name] = prepared
            try:  # DFR and selection need the val split's groups (audit.models.selection)
                val = config.data.val_split
                has_val = bool(val) and (table["split"] == val).any()
                groups = list(table.loc[table["split"] == val, "group"]) if has_val else None
                check_inputs(spec.mitigation_config(), prepared.model, len(self.classes), groups)
            except MitigationError as error:
                raise AuditError(f"model {spec.name!r}: {error}") from None
        self.eval_rows = self.manifest.split(config.data.eval_split)
        self.unions = {
            name: members
            for name, members in (
                (PROTECTED, config.data.protected_regions),
                (CORE, config.data.core_regions),
            )
            if members
        }
        self.log(
            f"data: {len(table)} rows, eval split {config.data.eval_split!r} with "
            f"{len(self.eval_rows)} images, classes {self.classes}"
        )

    def frame(self, spec: ModelConfig) -> Preprocess:
        """The model's own preprocessing: its geometry makes the frames the data set is read in."""
        return self.prepared[spec.name].preprocess

    def dataset(self, spec: ModelConfig, rows: pd.DataFrame, **kwargs: Any) -> FrameDataset:
        return FrameDataset(
            self.manifest,
            rows,
            self.classes,
            self.frame(spec),
            groups=self.groups,
            skip_bad=self.options.skip_bad_images,
            **kwargs,
        )

    def data_summary(self, areas: dict[str, float | None]) -> dict[str, Any]:
        table = self.manifest.table
        splits = {}
        for split, rows in table.groupby("split", sort=True):
            cells = rows.groupby(["label", "group"]).size()
            per_class = {}
            for label, by_label in rows.groupby("label"):
                counts = by_label["group"].replace("", "(none)").value_counts()
                per_class[label] = {
                    g: round(c / len(by_label), 4) for g, c in sorted(counts.items())
                }
            splits[split or "(none)"] = {
                "n": len(rows),
                "cells": {
                    f"{label} / {group or '(none)'}": int(c) for (label, group), c in cells.items()
                },
                "group_share_per_class": per_class,
            }
        return {
            "manifest": str(self.config.data.manifest),
            "classes": self.classes,
            "groups": sorted(set(groups_of(table))),
            "regions": self.manifest.regions,
            "protected_regions": self.config.data.protected_regions,
            "core_regions": self.config.data.core_regions,
            "eval_split": self.config.data.eval_split,
            "attributes_left_out": self.left_out,  # attribute -> its only value(s) in eval_split
            "splits": splits,
            "region_area": areas,
        }

    # -- models ---------------------------------------------------------------------------
    def obtain_model(self, spec: ModelConfig) -> tuple[nn.Module, dict[str, Any]]:
        """Load or train a model; a trained one is saved first, so a resumed run reuses it."""
        prepared = self.prepared[spec.name]
        model = prepared.model
        info: dict[str, Any] = {
            "arch": spec.arch,
            "source_kind": prepared.source.kind,
            "preprocess": prepared.preprocess.to_dict(),
        }
        checkpoint = self.work / "models" / f"{spec.name}.pt"
        history_file = checkpoint.with_suffix(".history.json")
        resumed = self.options.resume and checkpoint.is_file() and history_file.is_file()
        if spec.name in self.given:
            info |= {"source": "given", "checkpoint": "memory (a module given to audit.run)"}
        elif spec.checkpoint:
            info |= {
                "source": "loaded",
                "checkpoint": spec.checkpoint,
                "checkpoint_sha256": sha256(self.config.resolve(spec.checkpoint)),
            }
        elif not spec.train_split:
            info |= {"source": "loaded", "checkpoint": spec.arch}
        else:
            info |= {"source": "trained", "train_split": spec.train_split, "epochs": spec.epochs}
            train_rows = self.manifest.split(spec.train_split)
            info["n_train"] = len(train_rows)
            if spec.init:
                info["init"] = spec.init
            info |= spec.mitigation_config().resolved()
            if resumed:
                model.load_state_dict(read_state_dict(checkpoint))
                info["history"] = json.loads(history_file.read_text())
                self.log(f"{spec.name}: resumed with the model trained before the interruption")
            else:
                started = time.perf_counter()
                model.to(self.device)
                val = None
                if (
                    self.config.data.val_split
                    and (self.manifest.table["split"] == self.config.data.val_split).any()
                ):
                    val = self.dataset(
                        spec,
                        self.manifest.split(self.config.data.val_split),
                        cache_bytes=TRAIN_CACHE_BYTES,
                    )
                mitigation = spec.mitigation_config()
                protected = (
                    self.config.data.protected_regions if mitigation.name in NEEDS_MASKS else None
                )
                with prepared.preprocess.attach(model):
                    history = train_selected(
                        model,
                        self.dataset(
                            spec, train_rows, protected=protected, cache_bytes=TRAIN_CACHE_BYTES
                        ),
                        TrainConfig(
                            epochs=spec.epochs,
                            batch_size=spec.batch_size,
                            lr=spec.lr,
                            seed=self.config.seed,
                            mitigation=mitigation,
                        ),
                        val=val,
                        desc=f"train {spec.name}",
                        progress=self.options.progress,
                        device=self.device,
                    )
                info["history"] = history.record()
                if history.group_weights is not None:
                    info["dro_group_weights"] = history.group_weights
                if history.jtt_errors is not None:
                    info["jtt_errors"] = history.jtt_errors
                self.log(f"{spec.name}: trained in {time.perf_counter() - started:.1f} s")
        model.to(self.device).eval()
        if spec.mitigation == "dfr":  # the last layer retrained on the val split (audit.models.dfr)
            with prepared.preprocess.attach(model):
                val_set = self.dataset(spec, self.manifest.split(self.config.data.val_split))
                info |= {"mitigation": "dfr", "dfr": reweight_last_layer(
                    model, val_set, len(self.classes), seed=self.config.seed, device=self.device
                )}  # fmt: skip
            self.log(f"{spec.name}: DFR last layer refitted in {info['dfr']['seconds']:.1f} s")
        if not resumed:
            save_checkpoint(
                model,
                checkpoint,
                arch=spec.arch,
                classes=self.classes,
                meta={
                    "seed": self.config.seed,
                    "config": dataclasses.asdict(spec),
                    "preprocess": info["preprocess"],
                },
            )
            fsync_path(checkpoint)  # the history file marks a durable checkpoint for --resume
            if spec.train_split:
                write_durably(history_file, json.dumps(info["history"]).encode("utf-8"))
        info["saved_checkpoint"] = f"models/{spec.name}.pt"
        info["saved_checkpoint_sha256"] = sha256(checkpoint)
        return model, info

    # -- map ---------------------------------------------------------------------------------
    def map_spec(self, spec: ModelConfig) -> MapSpec:
        return MapSpec(
            layer=spec.layer or default_layer(spec.arch),
            regions=list(self.manifest.regions),
            unions=self.unions,
            counterfactual_union=PROTECTED,
            twin_attributes=list(self.twin_columns()),
            batch_size=self.config.explain.batch_size,
        )

    def twin_columns(self) -> dict[str, str]:
        """Attribute -> twin column of the counterfactuals (the first falls back to a mean fill)."""
        twins = dict(self.manifest.twin_columns)
        if not twins and PROTECTED in self.unions:
            twins = {self.manifest.attributes[0]: "twin"}
        return twins

    def map_model(self, spec: ModelConfig, model: nn.Module) -> pd.DataFrame:
        """Per-image rows of one model over the eval split, shard by shard (resumable)."""
        map_spec = self.map_spec(spec)
        dataset = self.dataset(
            spec,
            self.eval_rows,
            regions=map_spec.regions,
            twins=list(self.twin_columns().values()),
            uint8_pixels=True,  # a quarter of the bytes per batch from the workers
        )
        n = len(dataset)
        bounds = mapping.shard_bounds(n, map_spec.batch_size * SHARD_BATCHES)
        folder = self.work / "shards" / spec.name
        if n:
            probe = float_pixels(default_collate([dataset[i] for i in range(min(n, 8))])["image"])
            if use_channels_last(model, probe.to(self.device)):
                self.log(f"{spec.name}: channels-last convolutions (same outputs on a probe batch)")
        if self.options.precision == "bf16":
            map_spec.autocast = self.bf16_keeps_predictions(spec.name, model, map_spec, dataset)
        pending = list(mapping.pending_shards(folder, bounds))
        if len(pending) < len(bounds):
            self.log(f"{spec.name}: {len(bounds) - len(pending)} of {len(bounds)} shards resumed")
        bar = tqdm(
            total=n,
            initial=n - sum(e - s for s, e in pending),
            desc=f"explain {spec.name}",
            unit="img",
            disable=not self.options.progress,
        )
        try:
            if self.options.ray:
                from audit.pipeline.ray_map import RayError, quiet_stderr, ray_map

                try:
                    with quiet_stderr(self.work / "ray.log", not self.options.progress):
                        for b, table in ray_map(
                            self.options.ray, model, map_spec, dataset, pending, self.workers or 1
                        ):
                            mapping.write_shard(table, mapping.shard_path(folder, b[0]))
                            bar.update(b[1] - b[0])
                except RayError as error:
                    raise AuditError(str(error)) from None
            else:
                for b, table in mapping.map_shards(
                    model, map_spec, dataset, pending, self.device, self.workers, bar.update
                ):
                    mapping.write_shard(table, mapping.shard_path(folder, b[0]))
        finally:
            bar.close()
        return mapping.read_shards(folder, bounds)

    # -- one model ---------------------------------------------------------------------------
    def bf16_keeps_predictions(
        self, name: str, model: nn.Module, spec: MapSpec, dataset: FrameDataset
    ) -> bool:
        """Whether bfloat16 autocast predicts exactly as float32 on the first batches of the split;
        the map uses it only then (the run says which)."""
        probe = [(0, min(len(dataset), 4 * spec.batch_size))]
        exact = dataclasses.replace(spec, autocast=False)
        mixed = dataclasses.replace(spec, autocast=True)
        ((_, a),) = mapping.map_shards(model, exact, dataset, probe, self.device, 0)
        ((_, b),) = mapping.map_shards(model, mixed, dataset, probe, self.device, 0)
        same = bool((a["prediction"].to_numpy() == b["prediction"].to_numpy()).all())
        changed = int((a["prediction"].to_numpy() != b["prediction"].to_numpy()).sum())
        self.log(
            f"{name}: bfloat16 autocast used (same predictions on {probe[0][1]} images)"
            if same
            else f"{name}: float32 kept: bfloat16 changed {changed} of {probe[0][1]} predictions"
        )
        return same

    def found_layer(self, spec: ModelConfig, model: nn.Module) -> str:
        """The layer the engine explains when none is configured (recorded in metrics.json)."""
        height, width = self.prepared[spec.name].preprocess.frame
        probe = torch.zeros(1, 3, height, width, device=self.device)
        return resolve_layer(model, None, probe)[0]

    def _lap(self, what: str) -> None:
        """Log how long a stage took (and restart the clock)."""
        now = time.perf_counter()
        self.log(f"{what} in {now - self.timer:.1f} s")
        self.timer = now

    def sample_table(self, spec: ModelConfig, rows: pd.DataFrame) -> pd.DataFrame:
        """samples.csv's rows of one model from its map rows (names instead of indices)."""
        eval_rows = self.eval_rows.reset_index(drop=True)
        bad = ~rows["ok"].to_numpy(bool)
        classes = np.array(self.classes, dtype=object)
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
        for attribute in self.attributes:
            column = self.manifest.attribute_columns[attribute]
            columns[f"group:{attribute}"] = eval_rows[column].to_numpy()
        columns |= {c: rows[c].to_numpy(np.float64) for c in rows if c.startswith("flipped:")}
        columns["explained"] = False
        columns["gradcam_mass"] = rows["gradcam_mass"].to_numpy(np.float64)
        for column in rows.columns:
            if column.split(":")[0] in ("share", "hit", "iou", "area"):
                columns[column] = rows[column].to_numpy(np.float64)
        for extra in self.manifest.extra_columns:
            columns[f"extra:{extra}"] = eval_rows[extra].to_numpy()
        table = pd.DataFrame(columns)
        return table[~bad].reset_index(drop=True) if bad.any() else table

    def discover(
        self, spec: ModelConfig, rows: pd.DataFrame
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Slices and strategies of one model from its map rows (positions over the eval split)."""
        settings = self.config.discovery
        if not settings.enabled:
            return {"skipped": "switched off ([discovery] enabled = false)"}, {}
        keep = rows["ok"].to_numpy(bool)
        eval_rows = self.eval_rows.reset_index(drop=True)[keep]
        data = DiscoveryInput(
            rows=rows[keep].reset_index(drop=True),
            images=eval_rows["image"].to_numpy(),
            labels=np.searchsorted(self.classes, eval_rows["label"].to_numpy()),
            classes=list(self.classes),
            attributes={
                a: eval_rows[self.manifest.attribute_columns[a]].astype(str).to_numpy()
                for a in self.attributes
            },
            min_cell_size=self.config.data.min_cell_size,
        )
        block, columns = discover(data, self.config.seed, settings.slice_settings())
        ok_positions = np.flatnonzero(keep)
        for finding in [*block.get("slices", []), *block.get("strategies", [])]:
            finding["typical_positions"] = [
                int(ok_positions[p]) for p in finding["typical_positions"]
            ]
        worst = block.get("worst_slice")
        if worst:
            self.log(
                f"{spec.name}: worst discovered slice {worst['id']} at accuracy "
                f"{worst['accuracy']['value']:.3f} ({len(block['slices'])} slices, "
                f"{len(block['strategies'])} explanation strategies)"
            )
        return block, columns  # aligned with samples.csv's rows (decodable images)

    def audit_model(
        self, spec: ModelConfig, gallery: np.ndarray
    ) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any]]:
        model, info = self.obtain_model(spec)
        self.timer = time.perf_counter()
        with self.prepared[spec.name].preprocess.attach(model):
            return self._audit_model(spec, model, info, gallery)

    def _audit_model(
        self, spec: ModelConfig, model: nn.Module, info: dict[str, Any], gallery: np.ndarray
    ) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any]]:
        layer = spec.layer or default_layer(spec.arch)
        _check_layer(spec.name, spec.arch, model, layer)
        try:
            rows = self.map_model(spec, model)
        except LayerError as error:  # the engine refuses the layer's output (not a map or tokens)
            raise AuditError(f"model {spec.name!r}: {error}") from None
        self._lap(f"{spec.name}: map of {len(rows)} images")
        self.probes[spec.name] = self.validity_probe(spec, model)
        table = self.sample_table(spec, rows)
        info["bad_images"] = int((~rows["ok"].to_numpy(bool)).sum())
        if info["bad_images"]:
            self.log(
                f"{spec.name}: {info['bad_images']} images could not be decoded and were skipped"
            )
        eval_rows = self.eval_rows.reset_index(drop=True)
        mistakes = choose_mistakes(
            eval_rows,
            rows["correct"].to_numpy(bool),
            rows["confidence"].to_numpy(np.float64),
            self.config.explain.mistakes_per_cell,
        )
        shown = np.array(sorted({p for cell in mistakes.values() for p in cell["shown"]}), int)
        discovery, discovered = self.discover(spec, rows)
        self._lap(f"{spec.name}: slices and strategies discovered")
        positions = np.union1d(gallery, shown)
        for finding in [*discovery.get("slices", []), *discovery.get("strategies", [])]:
            positions = np.union1d(positions, finding["typical_positions"])
        positions = positions.astype(np.int64)
        flipped = (
            np.flatnonzero(rows["flipped"].to_numpy(bool))[:MAX_FLIPPED_SHOWN]
            if "flipped" in rows
            else np.zeros(0, np.int64)
        )
        map_spec = self.map_spec(spec)
        columns = explain_details(
            spec.name,
            model,
            map_spec,
            self.dataset(
                spec,
                self.eval_rows,
                regions=map_spec.regions,
                twins=list(self.twin_columns().values()),
            ),
            positions,
            flipped,
            rows["prediction"].to_numpy(),
            self.config.explain.methods,
            [*self.config.data.protected_regions, *self.config.data.core_regions],
            self.work / "overlays",
            self.device,
            0,
            self.log,
        )
        self._lap(f"{spec.name}: {len(positions)} gallery images explained with every method")
        explained = np.zeros(len(rows), bool)
        explained[positions] = True
        keep = rows["ok"].to_numpy(bool)
        table["explained"] = explained[keep]
        order = sorted(columns, key=lambda k: (k.split(":")[1], k.split(":")[2], k.split(":")[0]))
        added = {key: columns[key][keep] for key in order}
        info["layer"] = layer or self.found_layer(spec, model)
        info["mistakes_shown"] = mistakes
        info["discovery"] = discovery
        added |= discovered
        extra: dict[str, Any] = {}
        if self.config.trust.enabled:
            sample = self.trust_positions
            block, trust_columns, occlusion = run_trust(
                spec.name,
                model,
                map_spec,
                self.dataset(spec, self.eval_rows, regions=map_spec.regions),
                sample,
                groups_of(eval_rows.iloc[sample]),
                eval_rows["label"].to_numpy()[sample],
                self.config.explain.methods,
                self.config.trust,
                self.config.bootstrap,
                self.config.seed,
                self.work / "overlays",
                self.device,
            )
            info["trust"] = block
            for column, values in trust_columns.items():
                full = np.full(len(rows), np.nan)
                full[sample] = values
                added[column] = full[keep]
            extra["occlusion"] = occlusion
            self._lap(f"{spec.name}: trust checks on {len(sample)} images")
            for method, entry in block["methods"].items():
                verdict = "trusted" if entry["trusted"] else "NOT trusted"
                final = entry["randomization"]["final_spearman"]["value"]
                shown = "n/a" if final is None else f"{final:.2f}"
                self.log(
                    f"{spec.name}: {method} {verdict} (rank correlation after randomizing "
                    f"every layer: {shown})"
                )
        table = pd.concat([table, pd.DataFrame(added, index=table.index)], axis=1)
        return table, info, extra

    # -- all models ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        config = self.config
        gallery = choose_gallery(
            self.eval_rows.reset_index(drop=True), config.explain.samples_per_cell, config.seed
        )
        tables: dict[str, pd.DataFrame] = {}
        infos: dict[str, dict[str, Any]] = {}
        extras: dict[str, dict[str, Any]] = {}
        self.trust_positions = trust_sample(len(self.eval_rows), config.trust, config.seed)
        self.probes: dict[str, dict[str, Any]] = {}
        for spec in config.model:
            tables[spec.name], infos[spec.name], extras[spec.name] = self.audit_model(spec, gallery)
        images = set.intersection(*(set(t["image"] + "\0" + t["split"]) for t in tables.values()))
        if any(len(t) != len(images) for t in tables.values()):  # bad images differ by frame
            tables = {
                k: t[(t["image"] + "\0" + t["split"]).isin(images)].reset_index(drop=True)
                for k, t in tables.items()
            }
        # Metrics are reduced from exactly what samples.csv holds (6 decimals).
        tables = {k: t.round(6) for k, t in tables.items()}
        first = next(iter(tables.values()))
        weights = resample_weights(len(first), config.bootstrap, config.seed)
        models = {}
        cells: list[pd.DataFrame] = []
        for name, table in tables.items():
            metrics = model_metrics(
                table,
                self.classes,
                config.explain.methods,
                weights,
                config.seed,
                attributes=self.attributes,
                intersections=config.data.intersections,
                min_cell_size=config.data.min_cell_size,
            )
            cells.append(cell_rows(metrics["fairness"]).assign(model=name))
            models[name] = infos[name] | metrics
            perf = metrics["performance"]
            worst = perf["worst_group_accuracy"]["value"]  # None: every cell is too few to judge
            self.log(
                f"{name}: accuracy {perf['accuracy']['value']:.3f}, "
                f"worst group {'n/a (cells too small)' if worst is None else f'{worst:.3f}'}"
            )
        per_cell = pd.concat(cells, ignore_index=True)
        per_cell[["model", *per_cell.columns[:-1]]].to_csv(
            self.work / "per_cell.csv", index=False, lineterminator="\n"
        )
        samples = pd.concat(tables.values(), ignore_index=True)
        samples.to_csv(self.work / "samples.csv", index=False, lineterminator="\n")
        mistakes = samples[~samples["correct"]].assign(cell=lambda t: cell_names(t))
        mistakes.sort_values(
            ["model", "cell", "confidence"], ascending=[True, True, False], kind="stable"
        )[["model", "image", "label", "group", "prediction", "confidence"]].to_csv(
            self.work / "mistakes.csv", index=False, lineterminator="\n"
        )
        shutil.rmtree(self.work / "shards", ignore_errors=True)
        metrics = {
            "schema_version": METRICS_SCHEMA_VERSION,
            "seed": config.seed,
            "bootstrap": config.bootstrap,
            "data": self.data_summary(region_areas(first)),
            "gallery": [int(i) for i in gallery],
            "models": models,
            "comparisons": compare(tables, first, weights),
            "mitigation_harm": judge_harm(tables, infos, first, weights),  # audit.metrics.harm
        }
        if config.trust.enabled:
            names = list(tables)
            trust_weights = resample_weights(
                len(self.trust_positions), config.bootstrap, config.seed + TRUST_SEED_OFFSET
            )
            for entry, other in zip(metrics["comparisons"], names[1:], strict=True):
                if extras[names[0]]["occlusion"] is None:  # no regions to occlude
                    continue
                entry["occlusion_difference"] = occlusion_difference(
                    extras[names[0]]["occlusion"], extras[other]["occlusion"], trust_weights
                )
        metrics["gates"] = evaluate_gates(metrics, config.to_dict()["gates"])
        found = self.add_validity(metrics, tables)
        metrics["verdicts"] = verdicts(metrics["gates"], list(tables))
        metrics["validity"] = found
        return _clean_nan(metrics)

    def add_validity(
        self, metrics: dict[str, Any], tables: dict[str, pd.DataFrame]
    ) -> dict[str, Any]:
        """Validity findings (metrics.json's `validity`), logged; the gates they change (issue 24)."""
        for name, table in tables.items():
            shares = {c: table[c].to_numpy() for c in table if c.startswith("share:gradcam:")}
            self.probes[name] |= {
                "labels": table["label"].to_numpy(),
                "predictions": table["prediction"].to_numpy(),
                "empty_maps": validity.empty_maps(shares),
            }
        findings = validity.validity_findings(metrics, self.probes, self.config.trust.enabled)
        metrics["gates"] = validity.apply_to_gates(metrics["gates"], findings)
        for line in validity.log_lines(findings):
            self.log(line)
        return {
            "findings": findings,
            "models": {n: validity.model_status(findings, n) for n in tables},
        }

    def validity_probe(self, spec: ModelConfig, model: nn.Module) -> dict[str, Any]:
        """The first BatchNorm's statistics on up to 64 frames spread over the split, and the
        model's own data config (its checkpoint's record, else the timm / hf source's)."""
        n = len(self.eval_rows)
        positions = np.unique(np.linspace(0, n - 1, min(n, 64)).astype(int)) if n else []
        dataset = self.dataset(spec, self.eval_rows)
        stats = None
        if len(positions):
            batch = default_collate([dataset[int(i)] for i in positions])
            stats = validity.norm_statistics(model, float_pixels(batch["image"]).to(self.device))
        prepared = self.prepared[spec.name]
        own, where = None, ""
        recorded = (
            _recorded_preprocess(self.config.resolve(spec.checkpoint)) if spec.checkpoint else None
        )
        if recorded:
            own, where = recorded, f"the preprocessing recorded in {spec.checkpoint}"
        elif prepared.source.kind in ("timm", "hf") and not spec.train_split:
            own = resolve_preprocess(
                None, model, prepared.source, self.config.data.image_size
            ).to_dict()
            where = f"{prepared.source.kind}'s own data config for {spec.arch}"
        return {"norm_stats": stats, "own": own, "own_where": where, "floor": spec.min_accuracy}


def _recorded_preprocess(path: Path) -> dict[str, Any] | None:
    """The preprocessing a checkpoint written by this tool records (`meta.preprocess`), or None."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - safetensors, TorchScript or another format: no record
        return None
    meta = payload.get("meta") if isinstance(payload, dict) else None
    recorded = meta.get("preprocess") if isinstance(meta, dict) else None
    return recorded if isinstance(recorded, dict) else None


def software_versions() -> dict[str, str]:
    """The versions of the software that computed the run, for its reproducibility section.

    Read from the installed distributions' metadata: importing fairlearn or WeasyPrint only to
    read `__version__` cost seconds of every run."""
    import torchvision  # imported by the model sources anyway; its version names the build

    versions = {"audit": __version__, "python": platform.python_version()}
    versions |= {"torch": torch.__version__, "torchvision": torchvision.__version__}
    names = ["numpy", "pandas", "scikit-learn", "fairlearn", "matplotlib", "jinja2", "weasyprint"]
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _write_json(path: Path, data: Any) -> None:
    path.write_text(
        json.dumps(data, indent=2, allow_nan=False, default=_json_default) + "\n", encoding="utf-8"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _clean_nan(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_nan(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _identity(config: AuditConfig) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: the config and the manifest."""
    digest = hashlib.sha256(config.manifest_path.read_bytes()).hexdigest()
    return {"audit": __version__, "config": config.to_dict(), "manifest_sha256": digest}


def run_audit(
    config: AuditConfig,
    out: Path,
    *,
    echo: Callable[[str], None] = print,
    options: RunOptions | None = None,
    models: Mapping[str, GivenModel] | None = None,
) -> Path:
    """Run the audit into `out`; returns the run folder. See RunOptions for resume, Ray, devices;
    `models`: models given in memory by name (audit.api), used instead of building them."""
    options = dataclasses.replace(options or RunOptions())
    out = Path(out)
    try:
        with sigterm_as_interrupt(), run_lock(out):
            return _run_locked(config, out, Auditor(config, out, RunLog(echo), options, models))
    except KeyboardInterrupt as stop:  # before the work folder exists
        code = 143 if isinstance(stop, Terminated) else 130
        raise RunInterrupted(f"interrupted; nothing was written to {out}", code) from None
    except OSError as error:  # before the work folder exists (it cannot be made)
        if not _disk_full(error, out.parent):
            raise
        raise AuditError(
            f"no space left on the device of {out.parent}: nothing was written to {out}"
        ) from None


def _disk_full(error: BaseException, folder: Path) -> bool:
    """A write into `folder` that failed for want of space. torch.save reports it as a RuntimeError
    of its zip writer, recognised here by its origin and a device with under 1 MiB free."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(error, RuntimeError) or "inline_container" not in str(error):
        return False
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _run_locked(config: AuditConfig, out: Path, auditor: Auditor) -> Path:
    """run_audit's work, holding out's lock."""
    started = time.time()
    log, options = auditor.log, auditor.options
    check_target(out, options.force)
    auditor.preflight()
    if options.ray:
        from audit.pipeline.ray_map import RayError, connect

        try:
            connect(options.ray, auditor.workers or 1, quiet=not options.progress)
        except RayError as error:
            raise AuditError(str(error)) from None
    work, resumed = prepare_work(out, _identity(config), resume=options.resume, force=options.force)
    auditor.work = work
    keep_work = False
    try:
        with sigterm_as_interrupt():
            if resumed:
                log(f"resuming the unfinished run of {out}")
            torch.manual_seed(config.seed)
            auditor.load_data()
            metrics = auditor.run()
            (work / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            _write_json(work / "metrics.json", metrics)
            for gate in metrics["gates"]:
                status = "PASS" if gate["passed"] else "FAIL"
                if gate.get("status") in (*validity.STATUS_ORDER, "not trusted"):
                    status = gate["status"].upper()
                from audit.report.render import gate_figure, threshold_text

                # The report's units: percent for shares and accuracies, points for gaps.
                value = gate_figure(gate, interval=False)
                log(
                    f"gate {status}: {gate['model']}: {gate['label']} {value} "
                    f"(must be {gate['op']} {threshold_text(gate)})"
                )
            run_info = {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                "device": str(auditor.device),
                "workers": auditor.workers,
                "precision": options.precision,
                "ray": options.ray,
                "manifest_sha256": sha256(auditor.manifest.path),
                "dataset_sha256": auditor.manifest.checksum(),
                "versions": software_versions(),
                "platform": platform.platform(),
            }
            _write_json(work / "run.json", run_info)
            (work / "run.log").write_text("\n".join(log.lines) + "\n")
            if options.render:
                from audit.report.render import render_report

                render_report(work, echo=lambda m: log(m.replace(str(work), str(out))))
            run_info["duration_s"] = round(time.time() - started, 2)
            (work / "run.log").write_text("\n".join(log.lines) + "\n")
            run_info["files"] = sorted({*list_files(work), "run.json"} - {"resume.json"})
            _write_json(work / "run.json", run_info)
            install(work, out)
    except KeyboardInterrupt as stop:
        code = 143 if isinstance(stop, Terminated) else 130
        keep_work = (work / "shards").exists() or (work / "models").exists()
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
            raise RunInterrupted(f"interrupted; nothing was written to {out}", code) from None
        raise RunInterrupted(
            f"interrupted; the finished part is kept in {work_folder(out)} - continue with "
            f"the same command and --resume",
            code,
        ) from None
    except ResumableError as error:
        raise AuditError(
            f"{error}; the finished part is kept in {work_folder(out)} - continue with the same "
            "command and --resume"
        ) from None
    except ImageDecodeError as error:
        raise AuditError(
            f"{error}; nothing was lost: fix or remove the image and continue with --resume, "
            "or add --skip-bad-images"
        ) from None
    except BaseException as error:
        if _disk_full(error, work):
            raise AuditError(
                f"no space left on the device of {work_folder(out)}; nothing finished was lost: "
                "free some space and continue with the same command and --resume"
            ) from None
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if options.ray == "local":
            from audit.pipeline.ray_map import shutdown

            shutdown()
    return out
