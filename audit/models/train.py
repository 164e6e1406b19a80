"""Seeded training of a classifier that streams a Dataset through a DataLoader, with mitigations.

A training Dataset yields dicts: "image" float32 (3, H, W) in [0, 1] in the model's frame,
"label" int64, "group" int64 (index of the protected group, -1 where unknown), "index" int64 (row
position) and, for the mask-based mitigations, "protected" bool (H, W): the union of the protected
regions; an optional "ok" bool marks an image that failed to decode (left out of the loss). A
Dataset may expose `labels` and `groups` (tensors or lists of ints) and `has_masks` (bool); the
group mitigations then need no pass over the images to read them.

The recipe is the audit's default: AdamW (weight decay 1e-4), a one-cycle learning rate, random
horizontal flips (masks flipped with their images). Shuffling, resampling and flips each draw from
their own seeded torch.Generator in the main process, so a seed gives the same model whatever the
number of DataLoader workers. The mitigations (audit.models.mitigations) change the sampler, the
loss, or, for JTT, train twice.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)
from tqdm import tqdm

from audit.explain.layers import resolve_layer
from audit.models.inference import channels_last_for_training
from audit.models.mitigations import (
    NEEDS_GROUPS,
    NEEDS_MASKS,
    GroupDRO,
    MitigationConfig,
    MitigationError,
    balanced_weights,
    capture_layer,
    compact_cells,
    differentiable_gradcam,
    gradcam_share_penalty,
    jtt_weights,
    rrr_penalty,
)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    mitigation: MitigationConfig = field(default_factory=MitigationConfig)
    # Keep the weights of the epoch with the best validation worst-group accuracy (ties: the
    # earliest), as the papers' early stopping does; `patience` > 0 also stops a run after that
    # many epochs without improvement. Needs `val` with group labels.
    select_epoch: bool = False
    patience: int = 0


@dataclass
class TrainHistory:
    """Per-epoch training objective (cross-entropy, or DRO's weighted loss, plus any penalty), the
    penalty alone, validation accuracy and worst class x group cell accuracy (NaN when the
    validation set lacks groups); Group DRO's final cell weights; JTT's first-model history and
    its number of flagged training errors."""

    loss: list[float] = field(default_factory=list)
    penalty: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    val_worst_group_accuracy: list[float] = field(default_factory=list)
    group_weights: list[float] | None = None
    jtt_errors: int | None = None
    jtt_first: TrainHistory | None = None
    best_epoch: int | None = None  # 1-based epoch whose weights were kept (select_epoch)
    selection: dict | None = None  # the grid search's record (audit.models.selection)

    def record(self) -> dict:
        """What metrics.json keeps of a training run (the runner's `history`)."""
        out: dict = {
            "loss": self.loss,
            "val_accuracy": self.val_accuracy,
            "val_worst_group_accuracy": self.val_worst_group_accuracy,
        }
        if self.best_epoch is not None:
            out["best_epoch"] = self.best_epoch
        if self.selection is not None:
            out["selection"] = self.selection
        return out


class TensorDictDataset(Dataset):
    """An in-memory Dataset of the training dict format over stacked tensors.

    images (N, 3, H, W) float in [0, 1]; labels (N,); groups (N,) or None (all -1); protected
    (N, H, W) bool or None (no "protected" key: the mask-based mitigations refuse it).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        groups: Tensor | None = None,
        protected: Tensor | None = None,
    ) -> None:
        n = len(images)
        self.images = images
        self.labels = labels.long()
        self.groups = groups.long() if groups is not None else torch.full((n,), -1)
        self.protected = protected.bool() if protected is not None else None
        for name, tensor in (("labels", self.labels), ("groups", self.groups)):
            if tensor.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {tuple(tensor.shape)}")
        if self.protected is not None and self.protected.shape != (n, *images.shape[2:]):
            raise ValueError(
                f"protected must have shape {(n, *images.shape[2:])}, got {tuple(protected.shape)}"
            )

    @property
    def has_masks(self) -> bool:
        return self.protected is not None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {
            "image": self.images[i],
            "label": self.labels[i],
            "group": self.groups[i],
            "index": torch.tensor(i),
        }
        if self.protected is not None:
            item["protected"] = self.protected[i]
        return item


def _loader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler,
    workers: int,
    device: torch.device,
    drop_last: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
    )


def _model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def dataset_targets(
    dataset: Dataset, *, batch_size: int = 256, workers: int = 0
) -> tuple[Tensor, Tensor]:
    """(labels, groups) of every item in order: from the dataset's `labels`/`groups` attributes
    (tensors, arrays or lists) when it has them, else by one pass through a DataLoader."""
    labels, groups = getattr(dataset, "labels", None), getattr(dataset, "groups", None)
    listed = (Tensor, np.ndarray, list, tuple)
    if isinstance(labels, listed) and isinstance(groups, listed):
        labels, groups = torch.as_tensor(labels).long(), torch.as_tensor(groups).long()
        if labels.shape == groups.shape == (len(dataset),):
            return labels, groups
    loader = _loader(dataset, batch_size, SequentialSampler(dataset), workers, torch.device("cpu"))
    parts = [(batch["label"], batch["group"]) for batch in loader]
    return torch.cat([p[0] for p in parts]).long(), torch.cat([p[1] for p in parts]).long()


def _has_masks(dataset: Dataset) -> bool:
    flag = getattr(dataset, "has_masks", None)
    if isinstance(flag, bool):
        return flag
    return len(dataset) > 0 and "protected" in dataset[0]


def _eval_forward(model: nn.Module, x: Tensor) -> Tensor:
    """An eval-mode forward, on a channels-last copy of the images where the model takes one
    (about 2x faster convolutions on CPU, same logits to float rounding); else as given."""
    if x.dim() == 4:
        try:
            return model(x.contiguous(memory_format=torch.channels_last))
        except RuntimeError:  # e.g. the model's own code .view()s an NHWC feature map
            pass
    return model(x)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    data: Tensor | Dataset,
    batch_size: int = 256,
    *,
    workers: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Logits (on the CPU) for a stack of images or a training-format Dataset, batched, in eval
    mode (the model's mode is restored), in the data's order."""
    was_training = model.training
    model.eval()
    device = _model_device(model, device)
    try:
        if isinstance(data, Tensor):
            batches = (data[i : i + batch_size] for i in range(0, len(data), batch_size))
        else:
            loader = _loader(data, batch_size, SequentialSampler(data), workers, device)
            batches = (batch["image"] for batch in loader)
        outputs = [_eval_forward(model, x.to(device, non_blocking=True)).cpu() for x in batches]
        return torch.cat(outputs) if outputs else torch.empty(0)
    finally:
        model.train(was_training)


def worst_group_accuracy(correct: Tensor, labels: Tensor, groups: Tensor) -> float:
    """Lowest accuracy over the class x group cells that occur (images without a group ignored);
    NaN when no image has a group."""
    known = groups >= 0
    if not bool(known.any()):
        return math.nan
    cells, num_cells = compact_cells(labels[known], groups[known])
    hits = torch.bincount(cells, weights=correct[known].double(), minlength=num_cells)
    return float((hits / torch.bincount(cells, minlength=num_cells)).min())


class _BestEpoch:
    """The weights of the epoch with the highest validation worst-group accuracy so far."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.seen = 0
        self.epoch = 0
        self.score = -math.inf
        self.state: dict[str, Tensor] | None = None

    def update(self, score: float, patience: int) -> bool:
        """Record this epoch; True when `patience` epochs have passed without a better score."""
        self.seen += 1
        epoch = self.seen
        if score > self.score:  # strictly better: ties keep the earlier epoch
            self.score, self.epoch = score, epoch
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return patience > 0 and epoch - self.epoch >= patience

    def restore(self) -> int:
        """Load the best epoch's weights into the model; its 1-based number."""
        if self.state is not None:
            self.model.load_state_dict(self.state)
        return self.epoch


def _seeds(seed: int) -> tuple[int, int]:
    """Two independent seeds (sampler, augmentation) derived from the run's seed."""
    base = torch.Generator().manual_seed(seed)
    return tuple(int(v) for v in torch.randint(0, 2**62, (2,), generator=base))  # type: ignore[return-value]


def train_model(
    model: nn.Module,
    train: Dataset,
    config: TrainConfig,
    *,
    val: Dataset | None = None,
    desc: str = "train",
    progress: bool = True,
    workers: int = 0,
    device: torch.device | str | None = None,
) -> TrainHistory:
    """Train `model` in place on `train` with `config` (and its mitigation); return its history.

    Raises MitigationError (a ValueError, one line) for an unknown mitigation, a hyperparameter out
    of range, or a training split without the group labels or masks the mitigation needs.
    """
    mitigation = config.mitigation
    name = mitigation.name
    if len(train) == 0:
        raise MitigationError(f"{desc}: the training split is empty")
    # Groups and masks are only read where the mitigation needs them (reading groups from a
    # dataset without attributes costs a pass); check() only consults them for those mitigations.
    labels = groups = None
    has_groups = has_masks = True
    if name in NEEDS_GROUPS:
        labels, groups = dataset_targets(train, workers=workers)
        has_groups = bool((groups >= 0).all())
    if name in NEEDS_MASKS:
        has_masks = _has_masks(train)
    mitigation.check(has_groups=has_groups, has_masks=has_masks)
    device = _model_device(model, device)
    model.to(device)
    channels_last: bool | None = None  # decided on the first batch, so no extra reads

    sampler_seed, flip_seed = _seeds(config.seed)
    weights = None
    cells = None
    history = TrainHistory()
    if name == "group_balanced":
        weights = balanced_weights(compact_cells(labels, groups)[0])
    elif name == "group_dro":
        # As the authors ran Group DRO (their released commands pair --robust with
        # --reweight_groups): the batches draw every cell equally often, so each cell's loss is a
        # mean over ~batch/cells images instead of the one or two a shuffled batch holds of a
        # rare cell; the online weights q then act on those per-cell losses.
        cells, num_cells = compact_cells(labels, groups)
        weights = balanced_weights(cells)
    elif name == "jtt":
        initial = copy.deepcopy(model.state_dict())
        first = TrainConfig(
            epochs=mitigation.jtt_epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            weight_decay=config.weight_decay,
            seed=config.seed,
        )
        history.jtt_first = train_model(
            model, train, first, desc=f"{desc} (jtt first model)", progress=progress,
            workers=workers, device=device,
        )  # fmt: skip
        predictions = predict_logits(model, train, workers=workers, device=device).argmax(1)
        train_labels, _ = dataset_targets(train, workers=workers)
        weights = jtt_weights(predictions, train_labels, mitigation.jtt_upweight)
        history.jtt_errors = int((predictions != train_labels).sum())
        model.load_state_dict(initial)

    torch.manual_seed(config.seed)
    sampler_generator = torch.Generator().manual_seed(sampler_seed)
    flip_generator = torch.Generator().manual_seed(flip_seed)
    n = len(train)
    sampler: Sampler = (
        RandomSampler(train, generator=sampler_generator)
        if weights is None
        else WeightedRandomSampler(weights, n, replacement=True, generator=sampler_generator)
    )
    # A last batch of one image would break BatchNorm's batch statistics.
    loader = _loader(
        train, config.batch_size, sampler, workers, device, drop_last=n % config.batch_size == 1
    )
    steps_per_epoch = max(1, len(loader))
    weight_decay = mitigation.dro_weight_decay if name == "group_dro" else config.weight_decay
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=max(1, config.epochs * steps_per_epoch)
    )
    dro = None
    if name == "group_dro":
        adjust = GroupDRO.adjustments(torch.bincount(cells), mitigation.dro_adjustment)
        dro = GroupDRO(num_cells, mitigation.dro_eta, device, adjust)
    layer = None
    if name == "attention_penalty":
        probe = train[0]["image"][None].to(device)
        try:
            _, layer = resolve_layer(model, mitigation.attention_layer, probe)
        except ValueError as error:
            raise MitigationError(f"attention_layer: {error}") from None
    val_labels = val_groups = None
    if val is not None:
        val_labels, val_groups = dataset_targets(val, workers=workers)
    if config.select_epoch and (val is None or not bool((val_groups >= 0).all())):
        raise MitigationError(f"{desc}: choosing the epoch needs a val split with group labels")
    best = _BestEpoch(model) if config.select_epoch else None

    bar = tqdm(range(config.epochs), desc=desc, unit="epoch", disable=not progress)
    penalty_off = mitigation.penalty_off()  # strength 0: no double backpropagation
    for _epoch in bar:
        model.train()
        total = penalty_total = 0.0
        seen = 0
        for batch in loader:
            if "ok" in batch and not bool(batch["ok"].all()):  # images that failed to decode
                keep = batch["ok"].bool()
                if not bool(keep.any()):
                    continue
                batch = {k: v[keep] for k, v in batch.items() if isinstance(v, Tensor)}
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            flip = (torch.rand(len(y), generator=flip_generator) < 0.5).to(device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            if channels_last is None:
                channels_last = channels_last_for_training(model, x[:8])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            penalty = None
            if name in ("none", "group_balanced", "jtt", "dfr") or penalty_off:
                loss = F.cross_entropy(model(x), y)  # dfr: a plain base; penalty_off: strength 0
            elif name == "group_dro":
                losses = F.cross_entropy(model(x), y, reduction="none")
                loss = dro.loss(losses, cells[batch["index"]].to(device))
            else:
                mask = batch["protected"].to(device, non_blocking=True)
                mask = torch.where(flip[:, None, None], mask.flip(-1), mask)
                if name == "right_reasons":
                    x.requires_grad_(True)
                    logits = model(x)
                    log_probs = F.log_softmax(logits, dim=1)
                    penalty = rrr_penalty(log_probs, x, mask)
                    loss = F.nll_loss(log_probs, y) + mitigation.rrr_lambda * penalty
                else:
                    with capture_layer(layer) as store:
                        logits = model(x)
                    scores = logits.gather(1, y[:, None])[:, 0]
                    maps = differentiable_gradcam(store["activation"], scores, x.shape[-2:])
                    penalty = gradcam_share_penalty(maps, mask)
                    loss = F.cross_entropy(logits, y) + mitigation.attention_lambda * penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(y)
            if penalty is not None:
                penalty_total += float(penalty.detach()) * len(y)
            seen += len(y)
        history.loss.append(total / max(1, seen))
        if name in NEEDS_MASKS and not penalty_off:
            history.penalty.append(penalty_total / max(1, seen))
        postfix = {"loss": f"{history.loss[-1]:.3f}"}
        if val is not None:
            correct = predict_logits(model, val, workers=workers, device=device).argmax(1)
            correct = correct == val_labels
            history.val_accuracy.append(float(correct.float().mean()))
            history.val_worst_group_accuracy.append(
                worst_group_accuracy(correct, val_labels, val_groups)
            )
            postfix["val_acc"] = f"{history.val_accuracy[-1]:.3f}"
        bar.set_postfix(postfix)
        if best is not None and best.update(history.val_worst_group_accuracy[-1], config.patience):
            break
    if dro is not None:
        history.group_weights = [float(v) for v in dro.q.cpu()]
    if best is not None:
        history.best_epoch = best.restore()
    model.eval()
    if channels_last:  # checkpoints keep the usual layout; the audit switches again where it helps
        model.to(memory_format=torch.contiguous_format)
    return history
