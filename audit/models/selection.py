"""Model selection as the mitigation papers do it: a small grid, chosen by validation worst-group
accuracy, each run stopped at its best epoch on the same measure.

Group DRO (Sagawa et al. 2020), JTT (Liu et al. 2021) and DFR (Kirichenko et al. 2023) all pick
their hyperparameters and their stopping epoch by the worst class x group cell accuracy on a
validation split with group labels; a mitigation given fewer chances than that is not the method
its paper reports. `train_selected` is `train_model` with that selection around it:

- every grid point (the product of the grid's lists, in the order written) trains from the same
  initial weights and seed, and keeps the weights of its best validation epoch;
- the chosen point is the documented argmax: the highest validation worst-group accuracy at its
  best epoch; ties go to the higher validation accuracy at that epoch, then to the earlier point
  of the grid (`choose`).

The record (grid, every point's curve and best epoch, the chosen values) goes to metrics.json
through `TrainHistory.selection`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from audit.models.mitigations import TRAINING_KEYS, MitigationConfig, MitigationError
from audit.models.train import TrainConfig, TrainHistory, dataset_targets, train_model

CRITERION = "validation worst class x group accuracy at the run's best epoch"


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first key varying slowest ([{}] for {})."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def _score(value: float | None) -> float:
    return -math.inf if value is None or not math.isfinite(value) else float(value)


def choose(candidates: list[dict[str, Any]]) -> int:
    """Index of the chosen candidate: highest `val_worst_group_accuracy`, then highest
    `val_accuracy`, then the earliest in the list (NaN or None counts as worst)."""
    if not candidates:
        raise ValueError("no candidate to choose from")
    best = 0
    for i, c in enumerate(candidates[1:], start=1):
        key = (_score(c["val_worst_group_accuracy"]), _score(c["val_accuracy"]))
        top = candidates[best]
        if key > (_score(top["val_worst_group_accuracy"]), _score(top["val_accuracy"])):
            best = i
    return best


def selects(mitigation: MitigationConfig, val_has_groups: bool) -> bool:
    """Whether a model is selected on validation: select "on", or "auto" for a mitigation other
    than plain training (and DFR, whose base model is plain) when validation has group labels.
    Raises MitigationError for "on" without them."""
    if mitigation.select == "on" and not val_has_groups:
        raise MitigationError("select = 'on' needs a val split where every image has a group")
    if mitigation.select == "on":
        return True
    return mitigation.select == "auto" and mitigation.name not in ("none", "dfr") and val_has_groups


def _val_has_groups(val: Dataset | None, workers: int) -> bool:
    if val is None or len(val) == 0:
        return False
    _, groups = dataset_targets(val, workers=workers)
    return bool((groups >= 0).all())


def _point_config(config: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of one grid point: its mitigation values and training values set, the
    best epoch kept."""
    training = {k: float(v) for k, v in values.items() if k in TRAINING_KEYS}
    return dataclasses.replace(
        config,
        mitigation=config.mitigation.with_values(values),
        select_epoch=True,
        patience=config.mitigation.patience,
        **training,
    )


def train_selected(
    model: nn.Module, train: Dataset, config: TrainConfig, **kwargs: Any
) -> TrainHistory:
    """Train `model` in place with `config`, selected on `val` when `selects` says so; the
    keyword arguments are train_model's (val, desc, progress, workers, device)."""
    mitigation = config.mitigation
    workers = kwargs.get("workers", 0)
    val = kwargs.get("val")
    if not selects(mitigation, _val_has_groups(val, workers)):
        history = train_model(model, train, config, **kwargs)
        if mitigation.select == "auto" and mitigation.name not in ("none", "dfr"):
            history.selection = {"skipped": "the val split has no group label for every image"}
        return history
    grid = mitigation.search_grid()
    points = grid_points(grid)
    initial = copy.deepcopy(model.state_dict())
    desc = kwargs.pop("desc", "train")
    candidates: list[dict[str, Any]] = []
    kept: tuple[dict[str, torch.Tensor], TrainHistory] | None = None
    for i, values in enumerate(points):
        model.load_state_dict(initial)
        label = ", ".join(f"{k}={v}" for k, v in values.items())
        history = train_model(
            model, train, _point_config(config, values), desc=f"{desc} {label}".strip(), **kwargs
        )
        at = history.best_epoch - 1 if history.best_epoch else -1
        candidates.append(
            {
                "values": values,
                "best_epoch": history.best_epoch,
                "epochs_run": len(history.loss),
                "val_worst_group_accuracy": history.val_worst_group_accuracy[at],
                "val_accuracy": history.val_accuracy[at],
                "curve": history.val_worst_group_accuracy,
            }
        )
        if choose(candidates) == i:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            kept = (state, history)
    assert kept is not None  # at least one point was trained
    state, history = kept
    model.load_state_dict(state)
    chosen = choose(candidates)
    history.selection = {
        "criterion": CRITERION,
        "grid": grid,
        "patience": mitigation.patience,
        "chosen": points[chosen],
        "chosen_index": chosen,
        "candidates": candidates,
    }
    return history


def check_inputs(
    mitigation: MitigationConfig,
    model: nn.Module,
    num_classes: int,
    val_groups: list[str] | None,
) -> None:
    """Before any work: DFR and select = "on" need a val split whose every image has a group
    (`val_groups`: its group column, "" unknown; None: no val split); DFR also needs a final
    linear layer. Raises MitigationError (one line)."""
    needs = mitigation.name == "dfr" or mitigation.select == "on"
    if needs and (not val_groups or any(g == "" for g in val_groups)):
        what = "dfr" if mitigation.name == "dfr" else "select = 'on'"
        raise MitigationError(
            f"{what} needs the val split (data.val_split) with a group label for every image"
        )
    if mitigation.name == "dfr":
        from audit.models.dfr import final_linear

        final_linear(model, num_classes)
