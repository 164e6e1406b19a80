"""One audit end to end: plan -> (per model: obtain, map, discover, gallery, trust) -> reduce ->
write -> report. This module only sequences the stages of `audit.pipeline` and owns the run folder.

Memory holds a batch, not the data set: the evaluation split is decoded in DataLoader workers and
explained batch by batch (`audit.pipeline.map_stage`), each shard of rows written to the hidden
work folder; the images the report shows are chosen from those rows and explained again with every
method (`audit.pipeline.gallery`); every metric comes from the rows (`audit.pipeline.reduce`). The
map runs locally or on Ray (`audit.pipeline.ray_map`) with the same per-batch function. The work
folder is moved into place only when the run (report included) has finished
(`audit.pipeline.rundir`). The stages are described in docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import shutil
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from audit.config import AuditConfig, ModelConfig
from audit.errors import AuditError
from audit.explain.errors import LayerError
from audit.models.parallel import run_forked, worth_forking
from audit.models.zoo import default_layer
from audit.pipeline.discover import discover_model
from audit.pipeline.frames import ImageDecodeError
from audit.pipeline.gallery import choose_gallery, choose_mistakes, explain_gallery
from audit.pipeline.map_stage import map_model, sample_table
from audit.pipeline.obtain import found_layer, obtain_model, validity_probe
from audit.pipeline.plan import (
    GivenModel,
    ManifestSource,
    RunContext,
    RunLog,
    RunOptions,
    TableManifest,
    build_plan,
    check_layer,
    preflight,
    resolve_device,
    workers_of,
)
from audit.pipeline.reduce import ModelResult, run_metrics, sample_tables
from audit.pipeline.rundir import (
    ResumableError,
    RunInterrupted,
    Terminated,
    check_target,
    install,
    prepare_work,
    run_lock,
    sigterm_as_interrupt,
    work_folder,
    write_durably,
)
from audit.pipeline.trust_stage import trust_model, trust_sample
from audit.pipeline.write import finish, run_info, write_metrics, write_tables
from audit.version import __version__

__all__ = ["AuditError", "GivenModel", "RunOptions", "run_audit"]


def audit_models(ctx: RunContext) -> dict[str, Any]:
    """Every model through its stages, then the reduce: metrics.json's content; the sample
    tables are written into the work folder."""
    plan = ctx.plan
    config = plan.config
    eval_rows = plan.eval_rows.reset_index(drop=True)
    gallery = choose_gallery(eval_rows, config.explain.samples_per_cell, config.seed)
    trust_positions = trust_sample(len(eval_rows), config.trust, config.seed)
    results = audit_forked(ctx, gallery, trust_positions)
    if results is None:
        results = {s.name: audit_model(ctx, s, gallery, trust_positions) for s in config.model}
    tables = sample_tables(results)
    metrics, per_cell = run_metrics(ctx, results, tables, gallery)
    write_tables(ctx.work, tables, per_cell)
    return metrics


def audit_forked(
    ctx: RunContext, gallery: np.ndarray, trust_positions: np.ndarray
) -> dict[str, ModelResult] | None:
    """Every model through its stages in its own forked process of one thread, where that is
    faster (RunOptions.parallel_models); None where it is not, and the models go one by one.

    A child decodes in its own thread (no DataLoader workers: the children already fill the
    cores) and draws no progress bar; its log lines reach run.log through the parent."""
    plan = ctx.plan
    threads = torch.get_num_threads()
    models = plan.config.model
    if plan.options.ray or not plan.options.parallel_models:
        return None
    if not worth_forking(len(models), threads, plan.device):
        return None
    child = dataclasses.replace(ctx, plan=dataclasses.replace(plan, workers=0))

    def one(spec: ModelConfig) -> tuple[ModelResult, list[str]]:
        plan.options.progress = False  # in the child: two progress bars would garble
        before = len(child.log.lines)
        return audit_model(child, spec, gallery, trust_positions), child.log.lines[before:]

    forked = run_forked({spec.name: partial(one, spec) for spec in models}, threads)
    for _, lines in forked.values():
        ctx.log.lines.extend(lines)
    return {name: result for name, (result, _) in forked.items()}


def audit_model(
    ctx: RunContext, spec: ModelConfig, gallery: np.ndarray, trust_positions: np.ndarray
) -> ModelResult:
    """One model: obtained, then mapped, discovered, explained and checked with its preprocessing."""
    model, info = obtain_model(ctx, spec)
    ctx.log.start_clock()
    with ctx.plan.prepared[spec.name].preprocess.attach(model):
        return _audit_model(ctx, spec, model, info, (gallery, trust_positions))


def _audit_model(
    ctx: RunContext,
    spec: ModelConfig,
    model: nn.Module,
    info: dict[str, Any],
    positions: tuple[np.ndarray, np.ndarray],
) -> ModelResult:
    """audit_model's stages: map, validity probe, discovery, gallery, trust."""
    plan = ctx.plan
    gallery, trust_positions = positions
    layer = spec.layer or default_layer(spec.arch)
    check_layer(spec.name, spec.arch, model, layer)
    try:
        rows = map_model(ctx, spec, model)
    except LayerError as error:  # the engine refuses the layer's output (not a map or tokens)
        raise AuditError(f"model {spec.name!r}: {error}") from None
    ctx.log.lap(f"{spec.name}: map of {len(rows)} images")
    probe = validity_probe(ctx, spec, model)
    table = sample_table(plan, spec, rows)
    info["bad_images"] = int((~rows["ok"].to_numpy(bool)).sum())
    if info["bad_images"]:
        ctx.log(f"{spec.name}: {info['bad_images']} images could not be decoded and were skipped")
    mistakes = choose_mistakes(
        plan.eval_rows.reset_index(drop=True),
        rows["correct"].to_numpy(bool),
        rows["confidence"].to_numpy(np.float64),
        plan.config.explain.mistakes_per_cell,
    )
    discovery, discovered = discover_model(ctx, spec, rows)
    ctx.log.lap(f"{spec.name}: slices and strategies discovered")
    shown = _shown(gallery, mistakes, discovery)
    columns = explain_gallery(ctx, spec, model, rows, shown)
    explained = np.zeros(len(rows), bool)
    explained[shown] = True
    keep = rows["ok"].to_numpy(bool)
    table["explained"] = explained[keep]
    order = sorted(columns, key=lambda k: (k.split(":")[1], k.split(":")[2], k.split(":")[0]))
    added = {key: columns[key][keep] for key in order}
    info["layer"] = layer or found_layer(ctx, spec, model)
    info["mistakes_shown"] = mistakes
    info["discovery"] = discovery
    added |= discovered
    occlusion = None
    if plan.config.trust.enabled:
        info["trust"], trust_columns, occlusion = trust_model(ctx, spec, model, trust_positions)
        added |= {column: values[keep] for column, values in trust_columns.items()}
    table = pd.concat([table, pd.DataFrame(added, index=table.index)], axis=1)
    return ModelResult(table, info, occlusion, probe)


def _shown(
    gallery: np.ndarray, mistakes: dict[str, dict[str, Any]], discovery: dict[str, Any]
) -> np.ndarray:
    """The eval positions the gallery explains with every method: the shared sample, the mistakes
    shown and every finding's typical images."""
    shown = np.array(sorted({p for cell in mistakes.values() for p in cell["shown"]}), int)
    positions = np.union1d(gallery, shown)
    for finding in [*discovery.get("slices", []), *discovery.get("strategies", [])]:
        positions = np.union1d(positions, finding["typical_positions"])
    return positions.astype(np.int64)


def _identity(config: AuditConfig, table: TableManifest | None) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: the config and the manifest."""
    if table is None:
        digest = hashlib.sha256(config.manifest_path.read_bytes()).hexdigest()
        return {"audit": __version__, "config": config.to_dict(), "manifest_sha256": digest}
    digest = hashlib.sha256(table.text.encode("utf-8")).hexdigest()
    return {
        "audit": __version__,
        "config": config.to_dict(),
        "manifest_sha256": digest,
        "manifest_root": str(table.root),
    }


def _source(config: AuditConfig, work: Path, table: TableManifest | None) -> ManifestSource:
    """The manifest to read: the config's file, or a table written into the work folder."""
    if table is None:
        return ManifestSource(config.manifest_path)
    path = work / TableManifest.NAME
    write_durably(path, table.text.encode("utf-8"))
    return ManifestSource(path, table.root)


def run_audit(
    config: AuditConfig,
    out: Path,
    *,
    echo: Callable[[str], None] = print,
    options: RunOptions | None = None,
    models: Mapping[str, GivenModel] | None = None,
    table: TableManifest | None = None,
) -> Path:
    """Run the audit into `out`; returns the run folder. See RunOptions for resume, Ray, devices;
    `models`: models given in memory by name (audit.api), used instead of building them;
    `table`: a manifest given as a table (audit.api), read instead of the config's manifest."""
    options = dataclasses.replace(options or RunOptions())
    out = Path(out)
    try:
        with sigterm_as_interrupt(), run_lock(out):
            resolve_device(options.device)  # a device this machine lacks fails first
            given = dict(models or {})
            return _run_locked(config, out, options, given, table, RunLog(echo))
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


def _run_locked(
    config: AuditConfig,
    out: Path,
    options: RunOptions,
    given: dict[str, GivenModel],
    table: TableManifest | None,
    log: RunLog,
) -> Path:
    """run_audit's work, holding out's lock."""
    started = time.time()
    check_target(out, options.force)
    preflight(config, given, table)
    if options.ray:
        from audit.pipeline.ray_map import RayError, connect

        try:
            connect(options.ray, workers_of(options) or 1, quiet=not options.progress)
        except RayError as error:
            raise AuditError(str(error)) from None
    identity = _identity(config, table)
    work, resumed = prepare_work(out, identity, resume=options.resume, force=options.force)
    keep_work = False
    try:
        with sigterm_as_interrupt():
            if resumed:
                log(f"resuming the unfinished run of {out}")
            torch.manual_seed(config.seed)
            plan = build_plan(config, options, given, log, _source(config, work, table))
            ctx = RunContext(plan, work, log)
            metrics = audit_models(ctx)
            write_metrics(ctx, metrics)
            info = run_info(ctx, started)
            finish(ctx, info, out, started)
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
