"""Does `audit run` find the doctor/nurse shortcut in a timm model and a Hugging Face ViT?

For each family (the built-in CNN as the reference, `timm:NAME`, a tiny Hugging Face ViT loaded
with `hf:FOLDER`) the audit trains one model on `train_biased` and one on `train_balanced` with the
same recipe (same init, epochs, lr, batch, data size; only the training split differs) and audits
both on the balanced test set (Grad-CAM, counterfactual twins). The table shows, per model,
accuracy, worst-group accuracy (class x group cell), the share of Grad-CAM mass on hair + face
(`protected`), the counterfactual flip rate and, for the families in `--trust-families` (default:
hf), the region occlusion test of the trust stage (confidence lost when hair + face are filled
with the image's mean colour, beyond a same-shaped control), with bootstrap 95% intervals: the
shortcut is found when the biased model is worse on its worst cell, looks more at hair and face,
flips more often and depends causally on the hair and face pixels.

Recipe (what makes each family learn on CPU; measured, not guessed):

- timm: `test_resnet` (timm's 0.4 M-parameter ResNet) with `[model.kwargs] output_stride = 8`,
  so the explained map is 8x8 at 64 px, 12 epochs, lr 3e-3, batch 64 (about 7 s an epoch on one
  thread). resnet10t (2x2 map at 64 px; 4.9 M parameters) was still at 58% on `train_balanced`
  after 12 epochs, and 41 s an epoch with `output_stride = 8`.
- Hugging Face (NO working reference recipe on this CPU budget): a ViTForImageClassification with
  8 px patches (8x8 tokens at 64 px), width 64, 2 layers, 2 heads, lr 1e-3, batch 64, 35 epochs,
  on a doctor/nurse set drawn with 6,400 images in each training split (`--hf-n-train`; same
  biases, and the same val and test images as the default set). It learns the sex shortcut on
  `train_biased`, but on `train_balanced` it stays on the chance plateau (loss 0.69; 25 and 35
  epochs under `audit run`: 52% and 48% on test), so the ViT pair has no reference model. The
  evidence for the biased ViT alone is therefore the trust stage's occlusion test (on by default
  for hf): see the table.

What was tried to make a Hugging Face transformer leave chance on `train_balanced` (outside the
audit, with the audit's own trainer `audit.models.train.train_model` - AdamW, weight decay 1e-4,
one-cycle lr, flips, seed 0 - on in-memory tensors, the processor's normalisation mean = std =
0.5, seed-0 init; val = the 400 balanced val images; one thread on 2 shared cores, load ~5):

| model (HF class) | training images | epochs, lr | val accuracy (last epoch) | s / epoch |
|---|---|---|---|---|
| ViT, 8 px patches, width 64, 2 layers | 12,800 | 12, 1e-3 | 50.7% (loss 0.693) | 9 |
| ViT, same | 12,800 | 20, 3e-3 | 49.5% (loss 0.693) | 13 |
| ViT, same | 12,800 | 40, 1e-3 | 48.5% (loss 0.693 in every epoch) | 17 |
| ViT, same | 12,800 | 12, 3e-4 | 49.8% (loss 0.693) | 14 |
| ViT, 4 px patches (16x16 tokens), width 64, 2 layers | 12,800 | 5 of 12, 1e-3 | 50.7% (loss 0.694), stopped | 57-69 |
| BEiT (BeitForImageClassification: mean pooling, relative position bias, layer scale 0.1), 8 px, width 64, 2 layers | 12,800 | 15, 1e-3 | 45.5% (loss 0.691) | 16 |
| Swin (SwinForImageClassification: 4 px patches, dim 32, depths 2-2, heads 2-4, window 4) | 1,600 | 15, 2e-3 | 46.8% (loss 0.689) | 7 |
| Swin, same | 6,400 | 12, 1e-3 | 48.5% (loss 0.693) | 23 |
| CvT (CvtForImageClassification: conv token embedding 7/4 then 3/2, dims 32-64, depths 1-2) | 1,600 | 12, 3e-3 | 51.2% (loss 0.693) | 4 |
| MobileViT (MobileViTForImageClassification, conv + BN stem, output_stride 8) | 1,600 | 12, 3e-3 | 50.0% (loss 0.693) | 20 |
| control: timm test_resnet, output_stride 8 (same harness) | 1,600 | 12, 3e-3 | 100% (left the plateau at epoch 6) | 6 |

Earlier (previous sessions): on the default 1,600 images no ViT left chance (widths 64-128, 2-4
layers, 4 or 8 px patches, lr 5e-4 to 3e-3, batch 16-64, 11-36 epochs; 100 epochs at width 64:
53% on test while it memorised the training set); outside the audit, the 8 px ViT on another
6,400-image draw left the plateau at epoch 18 of 25 (71% on test), so leaving it is luck at this
budget. The job cue is a ~20-pixel shape (stethoscope or badge) whose colour is the clothes'
shifted by 55-80 levels either way; a CNN with BatchNorm finds it within a few epochs, the
transformers above did not. Not tried: a pretrained start (none can be downloaded; `init` does
not apply to hf: models, whose folder holds the weights) and runs of hours on a GPU.

Run (CPU, shared machine: nice, one thread; the data sets are generated when missing):

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_own_models.py --families timm,hf \\
        --data /tmp/h9/dn --data-hf /tmp/vit/dn6400 --out /tmp/vit/bench

Measured 2026-11-26 (2 shared CPU cores, one thread, bootstrap 200, 800 balanced test images;
occlusion on the trust stage's seeded 256 of them, mean-colour fill; n/a: trust stage off):

| model | arch, epochs | accuracy | worst cell (which) | Grad-CAM on hair+face | peak on hair+face | flip rate | hair+face occlusion effect |
|---|---|---|---|---|---|---|---|
| timm_biased | test_resnet, 12 | 85.4% [82.7-87.2] | 68.0% [62.6-73.5] (nurse / male) | 23.1% [22.1-24.3] | 50.2% [46.5-53.9] | 27.1% [23.7-30.4] | n/a |
| timm_balanced | test_resnet, 12 | 100.0% [100.0-100.0] | 100.0% [100.0-100.0] | 11.6% [11.2-12.0] | 13.8% [11.6-16.0] | 0.0% [0.0-0.0] | n/a |
| hf_biased | hf:hf_vit, 35 | 50.0% [46.2-52.9] | 3.5% [1.0-6.1] (nurse / male) | 32.4% [30.2-34.5] | 53.7% [49.6-57.6] | 88.2% [85.7-90.3] | 23.6 pts [18.0-28.8] |
| hf_balanced | hf:hf_vit, 35 | 48.1% [44.4-51.5] | 41.5% [34.1-47.3] (doctor / female) | 14.9% [13.5-16.2] | 25.0% [21.7-27.8] | 19.4% [16.0-22.0] | -0.6 pts [-1.0--0.2] |

timm: 287 s for the whole audit run (both models trained, audited); hf: 512 s with the trust
stage (load ~5 on the 2 cores). The timm pair shows the shortcut with intervals that do not
overlap. The ViT pair does not (its balanced model is at chance), but the biased ViT alone shows
it three ways: Grad-CAM puts 32.4% of its mass on hair + face, which cover 10.3% of the pixels
(mean over the 800 test images of |hair OR face| / image, read from the mask PNGs; the audit's
`data.region_area.protected` says 10.27% too); filling hair + face with the image's mean colour
costs it 31.3 points of confidence against 0.0 for a same-shaped control elsewhere (effect 23.6
points [18.0-28.8] over the images with a control; 45.7% of predictions flip against 1.5%),
while filling the stethoscope + badge costs 0.1 points; paired over the same images, the
balanced ViT's effect is 24.2 points [18.6-29.6] lower. Grad-CAM of both ViTs passes the
randomization check (rank correlation after the cascade 0.17 and 0.04, below 0.5), but its
deletion / insertion curves (32 images, 10 steps) are no better than a random order, so the
occlusion test, not the map, is the causal evidence.

Each family is one `audit run` of its own (config written to OUT/<family>.toml, run folder
OUT/<family>), so a family that finished is kept if a later one is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

AUDIT = str(Path(sys.executable).with_name("audit"))

MODEL = """
[[model]]
name = "{family}_{split}"
arch = "{arch}"
train_split = "train_{split}"
epochs = {epochs}
lr = {lr}
batch_size = {batch_size}
{kwargs}"""

CONFIG = """seed = 0
bootstrap = {bootstrap}
title = "Shortcut found in own models? ({family})"
[data]
manifest = "{manifest}"
protected_regions = ["hair", "face"]
core_regions = ["stethoscope", "badge"]
[explain]
methods = ["gradcam"]
samples_per_cell = 2
[trust]
{trust}
"""

TRUST_OFF = "enabled = false"
# The region occlusion test (hair + face filled, against a same-shaped control) is what the trust
# stage adds here; deletion / insertion runs on fewer images than by default to save time.
TRUST_ON = """enabled = true
samples = {samples}
faithfulness_samples = 32
steps = 10"""


def save_hf_vit(
    folder: Path, size: int = 64, patch: int = 8, hidden: int = 64, layers: int = 2, heads: int = 2
) -> None:
    """A tiny ViT from scratch (random weights, seed 0) with its image processor, as save_pretrained
    writes them: the labels in the manifest's names, the processor squashing to size x size
    (mean = std = 0.5). Written on every run, so the folder always matches the options."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = ["doctor", "nurse"]
    config = ViTConfig(
        image_size=size,
        patch_size=patch,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)


def families(args: argparse.Namespace) -> dict[str, tuple[str, int, float, int, dict[str, Any]]]:
    """family -> (arch, epochs, lr, batch_size, [model.kwargs])."""
    timm_kwargs = {"output_stride": args.timm_output_stride} if args.timm_output_stride else {}
    return {
        "cnn": ("small_cnn", args.epochs_cnn, 3e-3, 64, {}),
        "timm": (f"timm:{args.timm}", args.epochs_timm, args.lr_timm, 64, timm_kwargs),
        "hf": ("hf:hf_vit", args.epochs_hf, args.lr_hf, args.batch_hf, {}),
    }


def _kwargs_table(kwargs: dict[str, Any]) -> str:
    """A `[model.kwargs]` table for the model above it (values are numbers here)."""
    if not kwargs:
        return ""
    return "[model.kwargs]\n" + "".join(f"{key} = {value}\n" for key, value in kwargs.items())


def run_family(
    family: str,
    arch: str,
    epochs: int,
    lr: float,
    batch_size: int,
    kwargs: dict[str, Any],
    args: argparse.Namespace,
) -> dict:
    out = Path(args.out)
    config = out / f"{family}.toml"
    data = args.data_hf if family == "hf" and args.data_hf else args.data
    trusted = family in args.trust_families.split(",")
    text = CONFIG.format(
        bootstrap=args.bootstrap,
        family=family,
        manifest=Path(data) / "manifest.csv",
        trust=TRUST_ON.format(samples=args.trust_samples) if trusted else TRUST_OFF,
    )
    for split in ("biased", "balanced"):
        text += MODEL.format(
            family=family,
            split=split,
            arch=arch,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            kwargs=_kwargs_table(kwargs),
        )
    config.write_text(text)
    if args.reuse and (out / family / "metrics.json").is_file():  # finished earlier: read it
        seconds = json.loads((out / family / "run.json").read_text()).get("duration_s", 0.0)
        metrics = json.loads((out / family / "metrics.json").read_text())
        return {"seconds": seconds, "metrics": metrics, "epochs": epochs, "arch": arch}
    command = [AUDIT, "run", str(config), "--out", str(out / family), "--no-report", "--quiet"]
    command += ["--force"] if (out / family).exists() else []
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    metrics = json.loads((out / family / "metrics.json").read_text())
    return {"seconds": seconds, "metrics": metrics, "epochs": epochs, "arch": arch}


def _ci(estimate: dict[str, Any], scale: float = 100.0) -> str:
    value, low, high = (estimate.get(k) for k in ("value", "ci_low", "ci_high"))
    if value is None:
        return "n/a"
    if low is None or high is None:
        return f"{value * scale:.1f}%"
    return f"{value * scale:.1f}% [{low * scale:.1f}-{high * scale:.1f}]"


def _occlusion(model: dict[str, Any], fill: str = "mean") -> str:
    """Confidence lost when hair + face are filled (the image's mean colour), beyond a same-shaped
    control, in points with its interval; n/a where the trust stage was off."""
    occlusion = model.get("trust", {}).get("occlusion", {})
    effect = occlusion.get("protected", {}).get(fill, {}).get("overall", {}).get("effect")
    return _ci(effect).replace("%", " pts", 1).replace("%", "") if effect else "n/a"


def table(results: dict[str, dict]) -> str:
    lines = [
        "| model | arch, epochs | accuracy | worst-group accuracy (cell) | Grad-CAM on hair+face "
        "| Grad-CAM peak on hair+face | flip rate | hair+face occlusion effect | audit run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results.values():
        for name, model in result["metrics"]["models"].items():
            perf = model["performance"]
            worst = perf["worst_group_accuracy"]
            protected = model["attention"]["gradcam"]["overall"]["protected"]
            share, peak = protected["share"], protected["hit"]
            flips = model.get("counterfactual", {}).get("flip_rate", {})
            lines.append(
                f"| {name} | {result['arch']}, {result['epochs']} | {_ci(perf['accuracy'])} "
                f"| {_ci(worst)} ({worst.get('cell')}) | {_ci(share)} | {_ci(peak)} | {_ci(flips)} "
                f"| {_occlusion(model)} | {result['seconds']:.0f} s |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default="/tmp/h9/dn", help="doctor/nurse folder (made if missing)"
    )
    parser.add_argument("--out", default="/tmp/h9/bench")
    parser.add_argument("--families", default="cnn,timm,hf")
    parser.add_argument("--timm", default="test_resnet", help="timm model name")
    parser.add_argument(
        "--timm-output-stride",
        type=int,
        default=8,
        help="timm output_stride kwarg (8: an 8x8 explained map at 64 px; 0: not passed)",
    )
    parser.add_argument("--lr-timm", type=float, default=3e-3)
    parser.add_argument("--epochs-cnn", type=int, default=10)
    parser.add_argument("--epochs-timm", type=int, default=12)
    parser.add_argument("--epochs-hf", type=int, default=35)
    parser.add_argument("--lr-hf", type=float, default=1e-3)
    parser.add_argument("--batch-hf", type=int, default=64)
    parser.add_argument(
        "--data-hf",
        default="/tmp/h9/dn6400",
        help="doctor/nurse folder for the ViT ('' for --data; made if missing, --hf-n-train images "
        "in each training split, the rest as the default set)",
    )
    parser.add_argument("--hf-n-train", type=int, default=6400)
    parser.add_argument("--hf-patch", type=int, default=8, help="ViT patch size (px)")
    parser.add_argument("--hf-hidden", type=int, default=64, help="ViT width (MLP: twice that)")
    parser.add_argument("--hf-layers", type=int, default=2)
    parser.add_argument("--hf-heads", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument(
        "--trust-families",
        default="hf",
        help="families audited with the trust stage on (region occlusion; default hf, '': none)",
    )
    parser.add_argument("--trust-samples", type=int, default=256, help="[trust] samples")
    parser.add_argument(
        "--reuse", action="store_true", help="read families whose run folder is finished"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(args.data) / "manifest.csv").is_file():
        subprocess.run([AUDIT, "data", "doctor-nurse", "--out", args.data, "--quiet"], check=True)
    hf_data = Path(args.data_hf) if args.data_hf else None
    if "hf" in args.families.split(",") and hf_data and not (hf_data / "manifest.csv").is_file():
        command = [AUDIT, "data", "doctor-nurse", "--out", str(hf_data), "--quiet"]
        subprocess.run(command + ["--n-train", str(args.hf_n_train)], check=True)
    if "hf" in args.families.split(","):
        save_hf_vit(
            out / "hf_vit",
            patch=args.hf_patch,
            hidden=args.hf_hidden,
            layers=args.hf_layers,
            heads=args.hf_heads,
        )
    results: dict[str, dict] = {}
    chosen = families(args)
    for family in args.families.split(","):
        arch, epochs, lr, batch_size, kwargs = chosen[family]
        results[family] = run_family(family, arch, epochs, lr, batch_size, kwargs, args)
        print(table({family: results[family]}), flush=True)
    print(f"\ncores: {os.cpu_count()}, seed 0, test split of {args.data} (800 images)")
    print(table(results))
    (out / "table.md").write_text(table(results) + "\n")


if __name__ == "__main__":
    main()
