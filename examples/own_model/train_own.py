"""Train models OUTSIDE the audit tool, as a team would, and save them the way they ship.

- timm: `timm.create_model("resnet10t", num_classes=2)` trained at 64 px with ImageNet mean/std,
  saved as a state dict (`models/timm_resnet10t.safetensors`);
- Hugging Face: a tiny `ViTForImageClassification` (64 px, 8 px patches) trained from scratch on
  the pixels its `ViTImageProcessor` makes, saved with `save_pretrained` together with the
  processor (`models/hf_vit/`);
- the team's own code: `team_models.build` (this folder), squashed to 64 px and normalised with
  mean = std = 0.5, saved as a state dict (`models/team_cnn.pt`).

Nothing here uses the audit package: the audit then reads the models exactly as shipped, with the
preprocessing each config states (timm.toml, hf.toml, python.toml). From the repository root:

    .venv/bin/audit data doctor-nurse --out datasets/doctor_nurse
    .venv/bin/python examples/own_model/train_own.py            # about 3 min on 2 CPU cores
    .venv/bin/audit run examples/own_model/timm.toml --out reports/own_timm
    .venv/bin/audit run examples/own_model/hf.toml --out reports/own_hf
    .venv/bin/audit run examples/own_model/python.toml --out reports/own_python
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2

HERE = Path(__file__).resolve().parent
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def read_split(manifest: Path, split: str) -> tuple[list[Image.Image], Tensor, list[str]]:
    """The split's images (PIL, RGB), their label indices, and the class names (sorted)."""
    with manifest.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    classes = sorted({row["label"] for row in rows})
    chosen = [row for row in rows if row["split"] == split]
    if not chosen:
        sys.exit(f"error: {manifest} has no rows in split {split!r}")
    images = []
    for row in chosen:
        with Image.open(manifest.parent / row["image"]) as image:
            images.append(image.convert("RGB"))
    labels = torch.tensor([classes.index(row["label"]) for row in chosen])
    return images, labels, classes


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    logits_of: Callable[[nn.Module, Tensor], Tensor],
    *,
    epochs: int,
    lr: float,
    seed: int,
    name: str,
    batch_size: int = 64,
) -> None:
    """A plain training loop: AdamW, one-cycle schedule, shuffled mini-batches, horizontal flips."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        start, total, correct = time.time(), 0.0, 0
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            images = x[batch]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            logits = logits_of(model, images)
            loss = nn.functional.cross_entropy(logits, y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
            correct += int((logits.argmax(1) == y[batch]).sum())
        print(
            f"{name}: epoch {epoch + 1}/{epochs} loss {total / len(x):.3f} "
            f"train accuracy {correct / len(x):.3f} ({time.time() - start:.0f} s)",
            flush=True,
        )
    model.eval()


def train_timm(images: list[Image.Image], y: Tensor, args: argparse.Namespace) -> None:
    import timm
    from safetensors.torch import save_file

    transform = v2.Compose(  # the team's preprocessing: 64 px, ImageNet mean/std
        [
            v2.Resize(64),
            v2.CenterCrop(64),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    x = torch.stack([transform(image) for image in images])
    torch.manual_seed(args.seed)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    fit(model, x, y, lambda m, b: m(b), epochs=args.epochs, lr=3e-3, seed=args.seed, name="timm")
    save_file(model.state_dict(), str(args.out / "timm_resnet10t.safetensors"))


def train_hf(
    images: list[Image.Image], y: Tensor, classes: list[str], args: argparse.Namespace
) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 64, "width": 64})  # mean = std = 0.5
    x = processor(images=images, return_tensors="pt")["pixel_values"]
    config = ViTConfig(
        image_size=64,
        patch_size=8,
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=3,
        intermediate_size=192,
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),  # the audit matches these names to the manifest's
        label2id={name: i for i, name in enumerate(classes)},
    )
    torch.manual_seed(args.seed)
    model = ViTForImageClassification(config)
    fit(
        model,
        x,
        y,
        lambda m, b: m(pixel_values=b).logits,
        epochs=args.epochs_hf or args.epochs,
        lr=1e-3,
        seed=args.seed,
        name="hf",
    )
    model.save_pretrained(args.out / "hf_vit")
    processor.save_pretrained(args.out / "hf_vit")


def train_team(images: list[Image.Image], y: Tensor, args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE))
    from team_models import build

    transform = v2.Compose(
        [
            v2.Resize((64, 64)),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    x = torch.stack([transform(image) for image in images])
    torch.manual_seed(args.seed)
    model = build(num_classes=2, width=16)
    fit(model, x, y, lambda m, b: m(b), epochs=args.epochs, lr=3e-3, seed=args.seed, name="team")
    torch.save(model.state_dict(), args.out / "team_cnn.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path("datasets/doctor_nurse"), help="doctor/nurse folder"
    )
    parser.add_argument("--split", default="train_biased")
    parser.add_argument("--out", type=Path, default=HERE / "models")
    parser.add_argument("--models", default="timm,hf,python", help="which to train")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--epochs-hf", type=int, default=0, help="[default: --epochs]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    manifest = args.data / "manifest.csv"
    if not manifest.is_file():
        sys.exit(f"error: {manifest} not found: run `audit data doctor-nurse --out {args.data}`")
    args.out.mkdir(parents=True, exist_ok=True)
    images, y, classes = read_split(manifest, args.split)
    chosen = args.models.split(",")
    if "timm" in chosen:
        train_timm(images, y, args)
    if "hf" in chosen:
        train_hf(images, y, classes, args)
    if "python" in chosen:
        train_team(images, y, args)
    print(f"models written to {args.out}")


if __name__ == "__main__":
    main()
