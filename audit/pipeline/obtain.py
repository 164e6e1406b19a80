"""The models stage: each model loaded, taken as given or trained, saved into the run, and probed.

A trained model is saved (with its training history) before anything else uses it, so a resumed
run reuses it instead of training again. `validity_probe` records what the validity checks need
from the model itself: its first BatchNorm's statistics on the evaluated frames, and the
preprocessing its checkpoint or source says it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from audit.config import ModelConfig
from audit.data.preprocess import resolve_preprocess
from audit.explain.layers import resolve_layer
from audit.metrics import validity
from audit.models.dfr import reweight_last_layer
from audit.models.io import read_state_dict, save_checkpoint, sha256
from audit.models.mitigations import NEEDS_MASKS
from audit.models.selection import train_selected
from audit.models.train import TrainConfig
from audit.pipeline.frames import float_pixels
from audit.pipeline.plan import RunContext
from audit.pipeline.rundir import fsync_path, write_durably

TRAIN_CACHE_BYTES = 1 << 30  # a training split up to 1 GiB of frames is decoded once, not per epoch


def obtain_model(ctx: RunContext, spec: ModelConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Load or train a model; a trained one is saved first, so a resumed run reuses it."""
    plan = ctx.plan
    prepared = plan.prepared[spec.name]
    model = prepared.model
    info: dict[str, Any] = {
        "arch": spec.arch,
        "source_kind": prepared.source.kind,
        "preprocess": prepared.preprocess.to_dict(),
    }
    checkpoint = ctx.work / "models" / f"{spec.name}.pt"
    history_file = checkpoint.with_suffix(".history.json")
    resumed = plan.options.resume and checkpoint.is_file() and history_file.is_file()
    if spec.name in plan.given:
        info |= {"source": "given", "checkpoint": "memory (a module given to audit.run)"}
    elif spec.checkpoint:
        info |= {
            "source": "loaded",
            "checkpoint": spec.checkpoint,
            "checkpoint_sha256": sha256(plan.config.resolve(spec.checkpoint)),
        }
    elif not spec.train_split:
        info |= {"source": "loaded", "checkpoint": spec.arch}
    else:
        info |= {"source": "trained", "train_split": spec.train_split, "epochs": spec.epochs}
        info["n_train"] = len(plan.manifest.split(spec.train_split))
        if spec.init:
            info["init"] = spec.init
        if resumed:
            model.load_state_dict(read_state_dict(checkpoint))
            info["history"] = json.loads(history_file.read_text())
            ctx.log(f"{spec.name}: resumed with the model trained before the interruption")
        else:
            info |= train(ctx, spec, model)
        # The hyperparameters the model was trained with: the selected grid point's, where one was.
        chosen = (info["history"].get("selection") or {}).get("chosen") or {}
        info |= spec.mitigation_config().with_values(chosen).resolved()
    model.to(plan.device).eval()
    if spec.mitigation == "dfr":  # the last layer retrained on the val split (audit.models.dfr)
        info |= {"mitigation": "dfr", "dfr": refit_last_layer(ctx, spec, model)}
        ctx.log(f"{spec.name}: DFR last layer refitted in {info['dfr']['seconds']:.1f} s")
    if not resumed:
        save_checkpoint(
            model,
            checkpoint,
            arch=spec.arch,
            classes=plan.classes,
            meta={
                "seed": plan.config.seed,
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


def refit_last_layer(ctx: RunContext, spec: ModelConfig, model: nn.Module) -> dict[str, Any]:
    """Deep Feature Reweighting of `model` in place on the val split; what it did, for metrics.json."""
    plan = ctx.plan
    with plan.prepared[spec.name].preprocess.attach(model):
        val_set = plan.dataset(spec, plan.manifest.split(plan.config.data.val_split))
        return reweight_last_layer(
            model, val_set, len(plan.classes), seed=plan.config.seed, device=plan.device
        )


def train(ctx: RunContext, spec: ModelConfig, model: nn.Module) -> dict[str, Any]:
    """Train `model` on its train split (with its mitigation); its history for metrics.json."""
    plan = ctx.plan
    started = time.perf_counter()
    model.to(plan.device)
    val = None
    val_split = plan.config.data.val_split
    if val_split and (plan.manifest.table["split"] == val_split).any():
        val = plan.dataset(spec, plan.manifest.split(val_split), cache_bytes=TRAIN_CACHE_BYTES)
    mitigation = spec.mitigation_config()
    protected = plan.config.data.protected_regions if mitigation.name in NEEDS_MASKS else None
    train_rows = plan.manifest.split(spec.train_split)
    with plan.prepared[spec.name].preprocess.attach(model):
        history = train_selected(
            model,
            plan.dataset(spec, train_rows, protected=protected, cache_bytes=TRAIN_CACHE_BYTES),
            TrainConfig(
                epochs=spec.epochs,
                batch_size=spec.batch_size,
                lr=spec.lr,
                seed=plan.config.seed,
                mitigation=mitigation,
            ),
            val=val,
            desc=f"train {spec.name}",
            progress=plan.options.progress,
            device=plan.device,
        )
    info: dict[str, Any] = {"history": history.record()}
    if history.group_weights is not None:
        info["dro_group_weights"] = history.group_weights
    if history.jtt_errors is not None:
        info["jtt_errors"] = history.jtt_errors
    ctx.log(f"{spec.name}: trained in {time.perf_counter() - started:.1f} s")
    return info


def found_layer(ctx: RunContext, spec: ModelConfig, model: nn.Module) -> str:
    """The layer the engine explains when none is configured (recorded in metrics.json)."""
    height, width = ctx.plan.prepared[spec.name].preprocess.frame
    probe = torch.zeros(1, 3, height, width, device=ctx.plan.device)
    return resolve_layer(model, None, probe)[0]


def validity_probe(ctx: RunContext, spec: ModelConfig, model: nn.Module) -> dict[str, Any]:
    """The first BatchNorm's statistics on up to 64 frames spread over the split, and the
    model's own data config (its checkpoint's record, else the timm / hf source's)."""
    plan = ctx.plan
    n = len(plan.eval_rows)
    positions = np.unique(np.linspace(0, n - 1, min(n, 64)).astype(int)) if n else []
    dataset = plan.dataset(spec, plan.eval_rows)
    stats = None
    if len(positions):
        batch = default_collate([dataset[int(i)] for i in positions])
        stats = validity.norm_statistics(model, float_pixels(batch["image"]).to(plan.device))
    prepared = plan.prepared[spec.name]
    own, where = None, ""
    recorded = (
        recorded_preprocess(plan.config.resolve(spec.checkpoint)) if spec.checkpoint else None
    )
    if recorded:
        own, where = recorded, f"the preprocessing recorded in {spec.checkpoint}"
    elif prepared.source.kind in ("timm", "hf") and not spec.train_split:
        own = resolve_preprocess(
            None, model, prepared.source, plan.config.data.image_size
        ).to_dict()
        where = f"{prepared.source.kind}'s own data config for {spec.arch}"
    return {"norm_stats": stats, "own": own, "own_where": where, "floor": spec.min_accuracy}


def recorded_preprocess(path: Path) -> dict[str, Any] | None:
    """The preprocessing a checkpoint written by this tool records (`meta.preprocess`), or None."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - safetensors, TorchScript or another format: no record
        return None
    meta = payload.get("meta") if isinstance(payload, dict) else None
    recorded = meta.get("preprocess") if isinstance(meta, dict) else None
    return recorded if isinstance(recorded, dict) else None
