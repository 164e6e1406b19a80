"""One audit end to end: data -> models -> explanations -> per-sample table -> aggregates -> report.

Everything is written into a temporary folder beside the run folder and moved into place only when
the run (report included) has finished, so an interrupted or failed run never leaves a folder that
looks complete.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from audit import __version__
from audit.config import AuditConfig
from audit.data.dataset import SampleSet, load_samples
from audit.data.manifest import Manifest, read_manifest
from audit.explain import CAMNotApplicableError, explain_many, mask_boxes
from audit.metrics.aggregate import aggregate_attention, groups_of
from audit.metrics.attention import as_heat, region_attention, union_region
from audit.metrics.bootstrap import estimate, resample_weights, weighted_means
from audit.metrics.counterfactual import counterfactual_images
from audit.metrics.gates import evaluate_gates, verdicts
from audit.metrics.performance import headline_samples, performance
from audit.models.io import load_model, save_checkpoint, sha256
from audit.models.train import TrainConfig, predict_logits, train_model
from audit.models.zoo import build_model, check_arch, default_layer
from audit.report.overlays import save_overlays, save_pairs
from audit.report.render import MAX_FLIPPED_SHOWN

PROTECTED = "protected"  # union of the protected regions
CORE = "core"  # union of the core regions
METRICS_SCHEMA_VERSION = 1


class AuditError(ValueError):
    """A user-facing problem with the audit's inputs."""


@dataclass
class ModelResult:
    name: str
    samples: pd.DataFrame
    metrics: dict[str, Any]
    shares: dict[str, np.ndarray]  # region -> per eval image Grad-CAM share (for comparisons)


class RunLog:
    """Messages to the console (through `echo`) and to run.log."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.lines: list[str] = []

    def __call__(self, message: str) -> None:
        self.lines.append(f"{time.strftime('%H:%M:%S')} {message}")
        self.echo(message)


def _check_regions(config: AuditConfig, manifest: Manifest) -> None:
    for key in ("protected_regions", "core_regions"):
        for region in getattr(config.data, key):
            if region not in manifest.regions:
                known = ", ".join(manifest.regions) or "none"
                raise AuditError(
                    f"data.{key}: region {region!r} is not in {manifest.path} (regions: {known})"
                )


def _check_layer(name: str, arch: str, model: torch.nn.Module, layer: str | None) -> None:
    modules = [n for n, _ in model.named_modules() if n]
    if layer is not None and layer not in modules:
        close = difflib.get_close_matches(layer, modules, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise AuditError(f"model {name!r}: unknown layer {layer!r} in {arch}{hint}")


def _cells(samples: SampleSet) -> list[tuple[str, str]]:
    rows = samples.rows
    return sorted(
        {(label, group) for label, group in zip(rows["label"], rows["group"], strict=True)}
    )


def choose_gallery(samples: SampleSet, per_cell: int, seed: int) -> np.ndarray:
    """Eval-set positions shown for every model: `per_cell` random images of each class x group cell."""
    rng = np.random.default_rng([seed, 17])
    chosen = []
    for label, group in _cells(samples):
        members = np.flatnonzero(
            ((samples.rows["label"] == label) & (samples.rows["group"] == group)).to_numpy()
        )
        chosen.extend(rng.choice(members, size=min(per_cell, len(members)), replace=False).tolist())
    return np.array(sorted(chosen), dtype=np.int64)


class Auditor:
    """Runs one audit described by an AuditConfig into a run folder."""

    def __init__(
        self, config: AuditConfig, run_dir: Path, log: RunLog, progress: bool = True
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.log = log
        self.progress = progress
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # -- data -----------------------------------------------------------------------------
    def preflight(self) -> None:
        """Checks that need no data: fail before any work is done."""
        for spec in self.config.model:
            check_arch(spec.arch)
            if spec.layer:
                _check_layer(spec.name, spec.arch, build_model(spec.arch, 2), spec.layer)
            if spec.checkpoint and not self.config.resolve(spec.checkpoint).is_file():
                raise AuditError(
                    f"model {spec.name!r}: checkpoint not found: {self.config.resolve(spec.checkpoint)}"
                )
        if not self.config.manifest_path.is_file():
            raise AuditError(f"data.manifest: manifest not found: {self.config.manifest_path}")

    def load_data(self) -> None:
        config = self.config
        self.manifest = read_manifest(config.manifest_path)
        _check_regions(config, self.manifest)
        table = self.manifest.table
        self.classes = sorted(set(table["label"]))
        if len(self.classes) < 2:
            raise AuditError(
                f"{self.manifest.path}: at least two classes are needed, found {self.classes}"
            )
        for model in config.model:
            if model.train_split:
                self.manifest.split(model.train_split)
        # Checkpoints are loaded now, so that a wrong one fails before any work is done.
        self.loaded = {
            spec.name: load_model(
                self.config.resolve(spec.checkpoint), spec.arch, len(self.classes), trust=spec.trust
            )
            for spec in config.model
            if spec.checkpoint
        }
        for name, model in self.loaded.items():
            if isinstance(model, torch.jit.ScriptModule):
                raise AuditError(
                    f"model {name!r} is a TorchScript file: Grad-CAM needs forward hooks, which "
                    "ScriptModules do not support; give its state dict with arch instead"
                )
        size = config.data.image_size
        self.eval = load_samples(
            self.manifest, self.manifest.split(config.data.eval_split), self.classes, size
        )
        self.val = None
        if config.data.val_split and (table["split"] == config.data.val_split).any():
            self.val = load_samples(
                self.manifest,
                self.manifest.split(config.data.val_split),
                self.classes,
                size,
                with_regions=False,
            )
        self.regions = {name: self.eval.regions[name] for name in self.manifest.regions}
        self.present = dict(self.eval.region_present)
        self.boxes = dict(self.eval.region_boxes)
        for union, names in (
            (PROTECTED, config.data.protected_regions),
            (CORE, config.data.core_regions),
        ):
            if names:
                masks, present = union_region(self.eval.regions, self.eval.region_present, names)
                self.regions[union], self.present[union] = masks, present
                self.boxes[union] = mask_boxes(masks)
        self.log(
            f"data: {len(self.manifest.table)} rows, eval split {config.data.eval_split!r} with {len(self.eval)} images, classes {self.classes}"
        )

    def data_summary(self) -> dict[str, Any]:
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
            "splits": splits,
            # Mean share of the image a region covers: the share uniform attention would give it.
            "region_area": {
                region: round(float(masks[self.present[region]].float().mean()), 6)
                if bool(self.present[region].any())
                else None
                for region, masks in self.regions.items()
            },
        }

    # -- models ---------------------------------------------------------------------------
    def obtain_model(self, spec) -> tuple[torch.nn.Module, dict[str, Any]]:  # noqa: ANN001
        info: dict[str, Any] = {"arch": spec.arch}
        if spec.checkpoint:
            path = self.config.resolve(spec.checkpoint)
            model = self.loaded[spec.name]
            info |= {
                "source": "loaded",
                "checkpoint": spec.checkpoint,
                "checkpoint_sha256": sha256(path),
            }
        else:
            torch.manual_seed(self.config.seed)
            model = build_model(spec.arch, len(self.classes))
            train = load_samples(
                self.manifest,
                self.manifest.split(spec.train_split),
                self.classes,
                self.config.data.image_size,
                with_regions=False,
            )
            model.to(self.device)
            history = train_model(
                model,
                train.images,
                train.labels,
                TrainConfig(
                    epochs=spec.epochs,
                    batch_size=spec.batch_size,
                    lr=spec.lr,
                    seed=self.config.seed,
                ),
                val=(self.val.images, self.val.labels) if self.val is not None else None,
                desc=f"train {spec.name}",
                progress=self.progress,
            )
            info |= {
                "source": "trained",
                "train_split": spec.train_split,
                "n_train": len(train),
                "epochs": spec.epochs,
                "history": {"loss": history.loss, "val_accuracy": history.val_accuracy},
            }
        model.to(self.device).eval()
        checkpoint = self.run_dir / "models" / f"{spec.name}.pt"
        save_checkpoint(
            model,
            checkpoint,
            arch=spec.arch,
            classes=self.classes,
            meta={"seed": self.config.seed, "config": dataclasses.asdict(spec)},
        )
        info["saved_checkpoint"] = f"models/{spec.name}.pt"
        info["saved_checkpoint_sha256"] = sha256(checkpoint)
        return model, info

    # -- explanations ----------------------------------------------------------------------
    def explain_all(
        self, name: str, model: torch.nn.Module, layer: str | None, gallery: np.ndarray
    ) -> tuple[torch.Tensor, dict[str, np.ndarray], np.ndarray]:
        """Grad-CAM (pred) for every eval image and every method (pred and, if wrong, true) for the
        gallery and misclassified images. Returns logits, per-sample attention columns, explained mask."""
        config, samples = self.config, self.eval
        n = len(samples)
        batch = config.explain.batch_size
        methods = config.explain.methods
        columns: dict[str, np.ndarray] = {}
        logits_parts = []
        gradcam_parts: list[torch.Tensor] = []
        bar = tqdm(total=n, desc=f"explain {name}", unit="img", disable=not self.progress)
        for start in range(0, n, batch):
            x = samples.images[start : start + batch].to(self.device)
            result = explain_many(model, x, ["gradcam"], {"pred": None}, layer=layer)
            logits_parts.append(result.logits.cpu())
            gradcam_parts.append(result.maps["gradcam", "pred"].cpu())
            bar.update(len(x))
        bar.close()
        logits = torch.cat(logits_parts)
        gradcam = torch.cat(gradcam_parts)
        # Total Grad-CAM mass per image: 0 means the map is empty and every share is undefined.
        columns["gradcam_mass"] = gradcam.flatten(1).sum(dim=1).numpy().astype(np.float64)
        self._add_attention(columns, "gradcam", gradcam, np.arange(n), n)
        predictions = logits.argmax(1)
        wrong = (predictions != samples.labels).numpy()
        explained = np.zeros(n, dtype=bool)
        explained[gallery] = True
        explained |= wrong
        positions = np.flatnonzero(explained)
        other_methods = [m for m in methods if m != "gradcam"]
        cam_ok = True
        for start in range(0, len(positions), batch):
            pos = torch.from_numpy(positions[start : start + batch])
            x = samples.images[pos].to(self.device)
            run_methods = list(methods)
            if "cam" in run_methods and not cam_ok:
                run_methods.remove("cam")
            targets = {
                "pred": predictions[pos].to(self.device),
                "true": samples.labels[pos].to(self.device),
            }
            try:
                result = explain_many(model, x, run_methods, targets, layer=layer)
            except CAMNotApplicableError as error:
                self.log(f"{name}: CAM skipped: {error}")
                cam_ok = False
                run_methods.remove("cam")
                result = explain_many(model, x, run_methods, targets, layer=layer)
            for method in other_methods:
                if (method, "pred") in result.maps:
                    self._add_attention(
                        columns, method, as_heat(result.maps[method, "pred"].cpu()), pos.numpy(), n
                    )
            save_overlays(
                self.run_dir / "overlays" / name,
                samples.images,
                pos,
                result,
                wrong[pos.numpy()],
                self.regions_for_overlay(),
            )
        return logits, columns, explained

    def regions_for_overlay(self) -> dict[str, torch.Tensor]:
        names = [*self.config.data.protected_regions, *self.config.data.core_regions]
        return {r: self.eval.regions[r] for r in names}

    def _add_attention(
        self,
        columns: dict[str, np.ndarray],
        method: str,
        heat: torch.Tensor,
        positions: np.ndarray,
        n: int,
    ) -> None:
        idx = torch.from_numpy(positions)
        measures = region_attention(
            heat,
            {r: m[idx] for r, m in self.regions.items()},
            {r: p[idx] for r, p in self.present.items()},
            {r: b[idx] for r, b in self.boxes.items()},
        )
        for region, values in measures.items():
            for measure, tensor in values.items():
                if measure == "iou" and method != "gradcam":
                    continue
                key = f"{measure}:{method}:{region}"
                if key not in columns:
                    columns[key] = np.full(n, np.nan)
                columns[key][positions] = tensor.numpy()

    # -- one model ---------------------------------------------------------------------------
    def audit_model(self, spec, gallery: np.ndarray, weights: np.ndarray) -> ModelResult:  # noqa: ANN001
        model, info = self.obtain_model(spec)
        layer = spec.layer or default_layer(spec.arch)
        _check_layer(spec.name, spec.arch, model, layer)
        logits, columns, explained = self.explain_all(spec.name, model, layer, gallery)
        samples = self.eval
        probs = logits.softmax(1)
        predictions = probs.argmax(1)
        # Counterfactuals: twins where present, protected regions filled with the mean otherwise.
        protected = self.regions.get(PROTECTED)
        cf_images, source = counterfactual_images(
            samples.images, samples.twins, samples.twin_present, protected
        )
        cf_pred = predict_logits(model, cf_images.to(self.device)).argmax(1).cpu()
        flipped = (cf_pred != predictions).numpy().astype(np.float64)
        shown = torch.from_numpy(np.flatnonzero(flipped)[:MAX_FLIPPED_SHOWN])
        save_pairs(
            self.run_dir / "overlays" / "counterfactuals" / spec.name,
            samples.images[shown],
            cf_images[shown],
            shown,
        )
        rows = samples.rows
        table = pd.DataFrame(
            {
                "model": spec.name,
                "image": rows["image"],
                "label": rows["label"],
                "group": rows["group"],
                "split": rows["split"],
                "prediction": [self.classes[i] for i in predictions.tolist()],
                "confidence": probs.max(1).values.numpy().round(6),
                "correct": (predictions == samples.labels).numpy(),
                "counterfactual_prediction": [self.classes[i] for i in cf_pred.tolist()],
                "counterfactual_source": np.where(source.numpy() == 1, "twin", "mean_fill"),
                "flipped": flipped.astype(bool),
                "explained": explained,
            }
        )
        table["gradcam_mass"] = np.round(columns.pop("gradcam_mass"), 6)
        for key in sorted(
            columns, key=lambda k: (k.split(":")[1], k.split(":")[2], k.split(":")[0])
        ):
            table[key] = np.round(columns[key], 6)
        for extra in self.manifest.extra_columns:
            table[f"extra:{extra}"] = rows[extra].to_numpy()
        y_true = rows["label"].to_numpy()
        y_pred = table["prediction"].to_numpy()
        attention = {}
        for method in self.config.explain.methods:
            values = {}
            for measure in ("share", "hit", "iou"):
                for region in self.regions:
                    key = f"{measure}:{method}:{region}"
                    if key in columns:
                        values[f"{region}|{measure}"] = columns[key]
            # Grad-CAM covers every evaluated image; other methods the explained ones.
            explained_rows = explained if method != "gradcam" else np.ones(len(rows), bool)
            if values and explained_rows.any():
                sub = rows[explained_rows].reset_index(drop=True)
                sub_weights = (
                    resample_weights(len(sub), len(weights), self.config.seed + 1)
                    if method != "gradcam"
                    else weights
                )
                attention[method] = aggregate_attention(
                    {k: v[explained_rows] for k, v in values.items()}, sub, sub_weights
                ) | {"n_images": int(explained_rows.sum())}
        groups = groups_of(rows)
        group_names = sorted(set(groups))
        members = np.stack([groups == g for g in group_names]).astype(np.float64)
        ones = np.ones((1, len(flipped)))
        flip_point = weighted_means(flipped, members, ones)[0]
        flip_boot = weighted_means(flipped, members, weights) if len(weights) else None
        metrics = {
            **info,
            "layer": layer,
            "performance": performance(y_true, y_pred, groups, self.classes, weights),
            "attention": attention,
            "counterfactual": {
                "flip_rate": estimate(
                    flipped.mean(), weights @ flipped / len(flipped) if len(weights) else None
                ),
                "n": len(flipped),
                "from_twins": int(source.sum()),
                "per_group": {
                    g: estimate(flip_point[i], None if flip_boot is None else flip_boot[:, i])
                    for i, g in enumerate(group_names)
                },
            },
            "explained_images": int(explained.sum()),
            "misclassified_images": int((~table["correct"]).sum()),
        }
        shares = {r: columns[f"share:gradcam:{r}"] for r in self.regions}
        self.log(
            f"{spec.name}: accuracy {metrics['performance']['accuracy']['value']:.3f}, worst group {metrics['performance']['worst_group_accuracy']['value']:.3f}"
        )
        return ModelResult(spec.name, table, metrics, shares)


def compare(
    results: list[ModelResult], weights: np.ndarray, rows: pd.DataFrame
) -> list[dict[str, Any]]:
    """Differences (second minus first) between each model and the first, paired over the same images."""
    comparisons = []
    base = results[0]
    n = len(rows)
    everyone = np.ones((1, n))
    groups = groups_of(rows)
    headline = {
        r.name: headline_samples(
            r.samples["correct"].to_numpy(float), rows["label"].to_numpy(), groups, weights
        )
        for r in results
    }
    for other in results[1:]:
        entry: dict[str, Any] = {"a": base.name, "b": other.name, "attention_share_difference": {}}
        for region, values in base.shares.items():
            diff = other.shares[region] - values
            point = weighted_means(diff, everyone, np.ones((1, n)))[0, 0]
            boot = weighted_means(diff, everyone, weights)[:, 0] if len(weights) else None
            entry["attention_share_difference"][region] = estimate(point, boot)
        for metric, a_values in headline[base.name].items():
            diff = headline[other.name][metric] - a_values
            entry[f"{metric}_difference"] = estimate(diff[0], diff[1:] if len(weights) else None)
        flips = other.samples["flipped"].to_numpy(float) - base.samples["flipped"].to_numpy(float)
        entry["flip_rate_difference"] = estimate(
            flips.mean(), weights @ flips / n if len(weights) else None
        )
        comparisons.append(entry)
    return comparisons


def software_versions() -> dict[str, str]:
    import fairlearn
    import jinja2
    import matplotlib
    import sklearn
    import torchvision
    import weasyprint

    return {
        "audit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "scikit-learn": sklearn.__version__,
        "fairlearn": fairlearn.__version__,
        "matplotlib": matplotlib.__version__,
        "jinja2": jinja2.__version__,
        "weasyprint": weasyprint.__version__,
    }


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


def run_audit(
    config: AuditConfig,
    out: Path,
    *,
    echo: Callable[[str], None] = print,
    progress: bool = True,
    render: bool = True,
) -> Path:
    """Run the audit into `out` (replaced when the run succeeds); returns the run folder."""
    started = time.time()
    out = Path(out)
    if (
        out.exists()
        and not (out / "metrics.json").exists()
        and (not out.is_dir() or any(out.iterdir()))
    ):
        raise AuditError(f"{out} exists and is not an audit run folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    log = RunLog(echo)
    try:
        torch.manual_seed(config.seed)
        auditor = Auditor(config, work, log, progress)
        auditor.preflight()
        auditor.load_data()
        n = len(auditor.eval)
        weights = resample_weights(n, config.bootstrap, config.seed)
        gallery = choose_gallery(auditor.eval, config.explain.samples_per_cell, config.seed)
        results = [auditor.audit_model(spec, gallery, weights) for spec in config.model]
        samples = pd.concat([r.samples for r in results], ignore_index=True)
        samples.to_csv(work / "samples.csv", index=False, lineterminator="\n")
        metrics = {
            "schema_version": METRICS_SCHEMA_VERSION,
            "seed": config.seed,
            "bootstrap": config.bootstrap,
            "data": auditor.data_summary(),
            "gallery": [int(i) for i in gallery],
            "models": {r.name: r.metrics for r in results},
            "comparisons": compare(results, weights, auditor.eval.rows),
        }
        gate_config = {k: v for k, v in config.to_dict()["gates"].items()}
        metrics["gates"] = evaluate_gates(metrics, gate_config)
        metrics["verdicts"] = verdicts(metrics["gates"], [r.name for r in results])
        metrics = _clean_nan(metrics)
        (work / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        _write_json(work / "metrics.json", metrics)
        _write_json(
            work / "run.json",
            {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                "duration_s": round(time.time() - started, 2),
                "device": str(auditor.device),
                "manifest_sha256": sha256(auditor.manifest.path),
                "dataset_sha256": auditor.manifest.checksum(),
                "versions": software_versions(),
                "platform": platform.platform(),
            },
        )
        for gate in metrics["gates"]:
            status = "PASS" if gate["passed"] else "FAIL"
            value = "n/a" if gate["value"] is None else f"{gate['value']:.3f}"
            log(
                f"gate {status}: {gate['model']}: {gate['label']} {value} (must be {gate['op']} {gate['threshold']})"
            )
        (work / "run.log").write_text("\n".join(log.lines) + "\n")
        if render:
            from audit.report.render import render_report

            render_report(work, echo=log)
            (work / "run.log").write_text("\n".join(log.lines) + "\n")
        _replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, target: Path) -> None:
    """Move a finished folder into place, replacing an earlier run of the same name."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
