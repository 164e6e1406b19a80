"""Seeded training of a classifier on an in-memory SampleSet, with progress and validation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


@dataclass
class TrainHistory:
    loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Logits for a stack of images, batched, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        return torch.cat(
            [
                model(images[i : i + batch_size].to(device)).cpu()
                for i in range(0, len(images), batch_size)
            ]
        )
    finally:
        model.train(was_training)


def train_model(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    config: TrainConfig,
    *,
    val: tuple[Tensor, Tensor] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> TrainHistory:
    """Train with AdamW and a one-cycle schedule; return per-epoch loss and validation accuracy."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device
    steps_per_epoch = (len(images) + config.batch_size - 1) // config.batch_size
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=max(1, config.epochs * steps_per_epoch)
    )
    history = TrainHistory()
    bar = tqdm(range(config.epochs), desc=desc, unit="epoch", disable=not progress)
    for _epoch in bar:
        model.train()
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(images), config.batch_size):
            batch = order[start : start + config.batch_size]
            x, y = images[batch].to(device), labels[batch].to(device)
            flip = torch.rand(len(batch), generator=generator) < 0.5
            x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        history.loss.append(total / len(images))
        postfix = {"loss": f"{history.loss[-1]:.3f}"}
        if val is not None:
            accuracy = float((predict_logits(model, val[0]).argmax(1) == val[1]).float().mean())
            history.val_accuracy.append(accuracy)
            postfix["val_acc"] = f"{accuracy:.3f}"
        bar.set_postfix(postfix)
    model.eval()
    return history
