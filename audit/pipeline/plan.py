"""The plan stage: config, data and models resolved and validated once, into one frozen run plan.

`preflight` checks what needs no data (architectures, layers, checkpoint and manifest files), so a
mistake fails before any work; `build_plan` reads the manifest, checks the regions, attributes and
splits against the config, and builds or loads every model (a wrong checkpoint fails here too).
Every later stage reads the `RunPlan` and writes only into the run's work folder (`RunContext`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from audit.config import AuditConfig, ModelConfig
from audit.data.manifest import Manifest, one_valued, read_manifest, unseen_classes
from audit.data.preprocess import Preprocess
from audit.errors import AuditError
from audit.models.mitigations import MitigationError
from audit.models.selection import check_inputs
from audit.models.sources import Prepared, build_model, check_arch, prepare_model
from audit.models.zoo import default_layer
from audit.pipeline.frames import FrameDataset
from audit.pipeline.map import CORE, PROTECTED, MapSpec

# A model given in memory (audit.api): called with the data's classes, it returns the model
# prepared for the audit (its preprocessing resolved), in place of building or training one.
GivenModel = Callable[[list[str]], Prepared]


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
    # Each model trained and audited in its own forked process of one thread, where there are
    # at least as many models as threads, on the CPU and without Ray (audit.models.parallel;
    # `audit demo` turns it on). Trained weights and float sums depend on the thread count in
    # their last bits, as any computation's do.
    parallel_models: bool = False


class RunLog:
    """Messages to the console (through `echo`) and to run.log; `lap` times the stages."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.lines: list[str] = []
        self.timer = time.perf_counter()

    def __call__(self, message: str) -> None:
        self.lines.append(f"{time.strftime('%H:%M:%S')} {message}")
        self.echo(message)

    def start_clock(self) -> None:
        """Restart the stage clock."""
        self.timer = time.perf_counter()

    def lap(self, what: str) -> None:
        """Log how long a stage took (and restart the clock)."""
        now = time.perf_counter()
        self(f"{what} in {now - self.timer:.1f} s")
        self.timer = now


@dataclasses.dataclass(frozen=True)
class TableManifest:
    """A manifest given as a table (audit.api): its CSV text, whose paths are relative to `root`.
    The run writes it into its own folder as `TableManifest.NAME`; nothing is written beside the
    user's images."""

    text: str
    root: Path
    NAME = "manifest.csv"


@dataclasses.dataclass(frozen=True)
class ManifestSource:
    """The manifest file to read, and the folder its paths are relative to (None: its own)."""

    path: Path
    root: Path | None = None


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Everything the stages need to know, resolved and checked once: what to audit and how."""

    config: AuditConfig  # a copy: a labels-only manifest clears its region keys here
    options: RunOptions
    device: torch.device
    workers: int
    manifest: Manifest
    classes: list[str]
    groups: list[str]  # every non-empty value of the manifest's group column
    attributes: list[str]  # the protected attributes audited (two or more groups in eval)
    left_out: dict[str, list[str]]  # attribute -> its only value(s) in the eval split
    eval_rows: pd.DataFrame  # the eval split, in manifest order
    unions: dict[str, list[str]]  # "protected" / "core" -> the regions they join
    prepared: dict[str, Prepared]  # model name -> its model and preprocessing
    given: frozenset[str]  # names of models given in memory (audit.api)

    def frame(self, spec: ModelConfig) -> Preprocess:
        """The model's own preprocessing: its geometry makes the frames the data set is read in."""
        return self.prepared[spec.name].preprocess

    def dataset(self, spec: ModelConfig, rows: pd.DataFrame, **kwargs: Any) -> FrameDataset:
        """`rows` of the manifest read in the frame of model `spec`."""
        return FrameDataset(
            self.manifest,
            rows,
            self.classes,
            self.frame(spec),
            groups=self.groups,
            skip_bad=self.options.skip_bad_images,
            **kwargs,
        )

    def eval_dataset(self, spec: ModelConfig, *, twins: bool, **kwargs: Any) -> FrameDataset:
        """The eval split in the frame of model `spec` with the map's regions (the map, the gallery
        and the trust checks read it so), with each image's twins where `twins`."""
        columns = list(self.twin_columns().values()) if twins else None
        return self.dataset(
            spec, self.eval_rows, regions=self.map_spec(spec).regions, twins=columns, **kwargs
        )

    def twin_columns(self) -> dict[str, str]:
        """Attribute -> twin column of the counterfactuals (the first falls back to a mean fill)."""
        twins = dict(self.manifest.twin_columns)
        if not twins and PROTECTED in self.unions:
            twins = {self.manifest.attributes[0]: "twin"}
        return twins

    def map_spec(self, spec: ModelConfig) -> MapSpec:
        """What the map computes for model `spec`: its layer, the regions and their unions."""
        return MapSpec(
            layer=spec.layer or default_layer(spec.arch),
            regions=list(self.manifest.regions),
            unions=self.unions,
            counterfactual_union=PROTECTED,
            twin_attributes=list(self.twin_columns()),
            batch_size=self.config.explain.batch_size,
        )


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a stage works with: the plan, the work folder it writes into, and the run's log."""

    plan: RunPlan
    work: Path
    log: RunLog


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
    """DataLoader workers when not given: one per two cores, at most 4."""
    return max(0, min(4, (os.cpu_count() or 2) // 2))


def workers_of(options: RunOptions) -> int:
    """The DataLoader workers the options ask for."""
    return default_workers() if options.workers is None else options.workers


def check_layer(name: str, arch: str, model: nn.Module, layer: str | None) -> None:
    """An unknown layer name is refused, with the closest names the model has."""
    modules = [n for n, _ in model.named_modules() if n]
    if layer is not None and layer not in modules:
        close = difflib.get_close_matches(layer, modules, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise AuditError(f"model {name!r}: unknown layer {layer!r} in {arch}{hint}")


def preflight(
    config: AuditConfig, given: Mapping[str, GivenModel], table: TableManifest | None = None
) -> None:
    """Checks that need no data: fail before any work is done."""
    for spec in config.model:
        if spec.name in given:
            continue
        source = check_arch(spec.arch, config.base_dir)
        if spec.layer and source.kind in ("small_cnn", "torchvision"):
            model = build_model(spec.arch, 2, base_dir=config.base_dir, kwargs=spec.kwargs)
            check_layer(spec.name, spec.arch, model, spec.layer)
        if spec.checkpoint and not config.resolve(spec.checkpoint).is_file():
            raise AuditError(f"model {spec.name!r}: checkpoint not found: {spec.checkpoint}")
    if table is None and not config.manifest_path.is_file():
        raise AuditError(f"data.manifest: manifest not found: {config.data.manifest}")


def _check_regions(config: AuditConfig, manifest: Manifest) -> None:
    for key in ("protected_regions", "core_regions"):
        for region in getattr(config.data, key):
            if region not in manifest.regions:
                known = ", ".join(manifest.regions) or "none"
                raise AuditError(
                    f"data.{key}: region {region!r} is not in {config.data.manifest} (regions: {known})"
                )


def check_eval_split(
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


def _check_mitigations(config: AuditConfig, manifest: Manifest) -> None:
    """A mitigation that needs group labels or region masks refuses a train split without them."""
    for model in config.model:
        if model.train_split:
            rows = manifest.split(model.train_split)
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


def _check_model_selection(
    config: AuditConfig, manifest: Manifest, prepared: dict[str, Prepared], num_classes: int
) -> None:
    """DFR and selection on validation need the val split's groups (and DFR a final linear
    layer): refused now, in one line, rather than after training (audit.models.selection)."""
    table = manifest.table
    val = config.data.val_split
    has_val = bool(val) and bool((table["split"] == val).any())
    groups = list(table.loc[table["split"] == val, "group"]) if has_val else None
    for spec in config.model:
        try:
            check_inputs(spec.mitigation_config(), prepared[spec.name].model, num_classes, groups)
        except MitigationError as error:
            raise AuditError(f"model {spec.name!r}: {error}") from None


def _prepare_models(
    config: AuditConfig, classes: list[str], given: Mapping[str, GivenModel], log: RunLog
) -> dict[str, Prepared]:
    """Every model built, loaded or taken as given, so that a wrong checkpoint fails now."""
    prepared: dict[str, Prepared] = {}
    for spec in config.model:
        torch.manual_seed(config.seed)
        own = given.get(spec.name)
        model = (
            own(classes)
            if own
            else prepare_model(
                spec, classes, base_dir=config.base_dir, image_size=config.data.image_size
            )
        )
        if isinstance(model.model, torch.jit.ScriptModule):
            raise AuditError(
                f"model {spec.name!r} is a TorchScript file: Grad-CAM needs forward hooks, which "
                "ScriptModules do not support; give its state dict with arch instead"
            )
        for message in model.messages:
            log(f"{spec.name}: {message}")
        prepared[spec.name] = model
    return prepared


def _without_regions(config: AuditConfig) -> AuditConfig:
    """A copy of the config whose protected and core regions are empty (a labels-only manifest)."""
    data = dataclasses.replace(config.data, protected_regions=[], core_regions=[])
    return dataclasses.replace(config, data=data)


def build_plan(
    config: AuditConfig,
    options: RunOptions,
    given: Mapping[str, GivenModel],
    log: RunLog,
    source: ManifestSource,
) -> RunPlan:
    """Read the manifest, check it against the config, prepare every model: the run's plan."""
    manifest = read_manifest(source.path, decode=False, root=source.root)  # the map decodes
    if not manifest.regions:  # labels only: discovery still works, region measures not
        log(
            "data: the manifest has no mask: or box: columns, so region-based measures "
            "(attention shares, occlusion) are skipped; slices and strategies are still found"
        )
        config = _without_regions(config)
    _check_regions(config, manifest)
    table = manifest.table
    classes = sorted(set(table["label"]))
    if len(classes) < 2:
        raise AuditError(
            f"{config.data.manifest}: at least two classes are needed, found {classes}"
        )
    named = [a for a in manifest.attributes if a != "group"]
    for attribute in config.data.attributes:
        if attribute not in manifest.attributes:
            known = ", ".join(manifest.attributes)
            raise AuditError(
                f"data.attributes: attribute {attribute!r} is not in {config.data.manifest} "
                f"(attributes: {known})"
            )
    attributes, left_out = check_eval_split(
        config, manifest, list(config.data.attributes) or named, log
    )
    _check_mitigations(config, manifest)
    prepared = _prepare_models(config, classes, given, log)
    _check_model_selection(config, manifest, prepared, len(classes))
    eval_rows = manifest.split(config.data.eval_split)
    unions = {
        name: members
        for name, members in (
            (PROTECTED, config.data.protected_regions),
            (CORE, config.data.core_regions),
        )
        if members
    }
    log(
        f"data: {len(table)} rows, eval split {config.data.eval_split!r} with "
        f"{len(eval_rows)} images, classes {classes}"
    )
    return RunPlan(
        config=config,
        options=options,
        device=resolve_device(options.device),
        workers=workers_of(options),
        manifest=manifest,
        classes=classes,
        groups=sorted(set(table["group"]) - {""}),
        attributes=attributes,
        left_out=left_out,
        eval_rows=eval_rows,
        unions=unions,
        prepared=prepared,
        given=frozenset(given),
    )
